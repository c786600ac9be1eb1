//! The machine-readable description of the queues and events (`docs/asyncapi.yaml`, AsyncAPI
//! 3) and the events' JSON Schema (`schema/events-v1.schema.json`): the document is valid
//! as the AsyncAPI initiative's own parser reads it, it names what the daemon uses, and
//! every kind of event the daemon really publishes matches the schema.

mod helpers;

use std::{path::Path, process::Command};

use jsonschema::Validator;
use serde_json::{Value, json};
use uuid::Uuid;
use yaml_rust2::YamlLoader;

use helpers::{Reply, browser, events::EventTap, id_of, job, spawn_app_with};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const SCHOOL: i64 = 42;
const PUBLIC: &str = "https://smsgw.example.com";

fn read(path: &str) -> String {
    std::fs::read_to_string(format!("{ROOT}/{path}")).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn events_schema() -> Value {
    serde_json::from_str(&read("schema/events-v1.schema.json")).expect("the schema is JSON")
}

/// The schema of one kind of event (`status`, `reply`, `rejected`), or of any (`None`).
fn validator(kind: Option<&str>) -> Validator {
    let mut schema = events_schema();
    if let Some(kind) = kind {
        schema["$ref"] = json!(format!("#/$defs/{kind}"));
        if let Some(object) = schema.as_object_mut() {
            object.remove("oneOf");
        }
    }
    jsonschema::draft202012::new(&schema).expect("a usable draft 2020-12 schema")
}

#[test]
fn the_asyncapi_document_is_valid_as_the_asyncapi_parser_reads_it() {
    let tool = Path::new(ROOT).join("tools/asyncapi");
    if !tool.join("node_modules/@asyncapi/parser").exists() {
        browser::skipped_without(
            "the AsyncAPI parser's check",
            "the parser is not installed (npm ci --prefix tools/asyncapi; .ci/run does)",
        );
        return;
    }
    let output = Command::new("node")
        .current_dir(&tool)
        .args(["validate.mjs", "../../docs/asyncapi.yaml"])
        .output()
        .expect("node runs");
    let said = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(said.contains("channels sms.jobs, sms.events"), "{said}");
}

#[test]
fn the_document_names_the_exchanges_and_the_schemas_that_exist() {
    let doc = YamlLoader::load_from_str(&read("docs/asyncapi.yaml"))
        .expect("YAML")
        .remove(0);
    assert_eq!(
        doc["channels"]["jobs"]["address"].as_str(),
        Some("sms.jobs")
    );
    assert_eq!(
        doc["channels"]["events"]["address"].as_str(),
        Some("sms.events")
    );
    let messages = doc["components"]["messages"].as_hash().expect("messages");
    let defs = events_schema()["$defs"].clone();
    for (name, message) in messages {
        let reference = message["payload"]["schema"]["$ref"]
            .as_str()
            .expect("a $ref");
        let (file, pointer) = reference.split_once('#').unwrap_or((reference, ""));
        let file = file.trim_start_matches("../");
        assert!(Path::new(ROOT).join(file).exists(), "{name:?}: {file}");
        if let Some(def) = pointer.strip_prefix("/$defs/") {
            assert!(
                defs.get(def).is_some(),
                "{name:?}: no {def} in the events schema"
            );
        }
    }
}

#[test]
fn the_events_schema_is_a_valid_draft_2020_12_schema() {
    if let Err(e) = jsonschema::draft202012::meta::validate(&events_schema()) {
        panic!("{e}");
    }
}

/// Which of the schema's kinds an event of `routing_key` must be.
fn kind_of(routing_key: &str) -> &'static str {
    match routing_key {
        "reply.received" => "reply",
        "job.rejected" => "rejected",
        "budget.warning" | "budget.exhausted" => "budget",
        _ => "status",
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_kind_of_event_the_daemon_publishes_matches_the_schema() {
    let app = spawn_app_with(&[("SMSGW_PUBLIC_URL", PUBLIC)]).await;
    app.add_school(SCHOOL, "GB").await;
    let mut tap = EventTap::bind(&app.env.amqp_url, "#").await;
    app.stub
        .reply_for("+447700900666", Reply::error(400, 21211, "invalid"));
    app.stub.script([Reply::error(500, 20500, "try later")]);
    let mut expired = job("login_code", SCHOOL, "+447700900123", "Code 1234");
    expired["expires_at"] = json!("2020-01-01T00:00:00Z");
    let mut reminder = job("booking_reminder", SCHOOL, "+447700900123", "Lesson at 10");
    reminder["context"] = json!({"booking_id": 981});
    let mut withdrawn = job("booking_reminder", SCHOOL, "+447700900126", "Lesson at 11");
    withdrawn["context"] = json!({"booking_id": 982});
    withdrawn["not_before"] = json!("2099-01-01T08:00:00Z");
    let mut cancellation = job("booking_cancellation", SCHOOL, "+447700900126", "Cancelled");
    cancellation["context"] = json!({"booking_id": 982});
    let jobs = [
        withdrawn,
        cancellation,
        reminder,
        job("booking_change", SCHOOL, "+447700900666", "Moved"),
        job("announcement", 99, "+447700900124", "No such school"),
        expired,
        job(
            "booking_reminder",
            SCHOOL + 1,
            "+447700900125",
            "Within the budget",
        ),
    ];
    app.publish_all(&jobs).await;
    app.wait_for_status(id_of(&jobs[2]), "sent").await;
    app.publish_raw("sms_blast", &Uuid::new_v4().to_string(), b"{}")
        .await;
    let reply = app
        .post_twilio_inbound(
            PUBLIC,
            "+447700900123",
            "Running late",
            "SM0000000000000000000000000000beef",
        )
        .await;
    assert_eq!(reply.status(), 200);
    let kinds = [
        "sent",
        "failed",
        "suppressed",
        "expired",
        "cancelled",
        "retrying",
        "reply.received",
        "job.rejected",
    ];
    let events = tap
        .until(|received| {
            kinds
                .iter()
                .all(|k| received.iter().any(|e| e.routing_key.ends_with(k)))
        })
        .await
        .to_vec();
    let any = validator(None);
    for event in &events {
        let kind = kind_of(&event.routing_key);
        let errors: Vec<String> = validator(Some(kind))
            .iter_errors(&event.body)
            .map(|e| format!("{}: {e}", e.instance_path()))
            .collect();
        assert!(
            errors.is_empty(),
            "{} as {kind}: {errors:?}\n{}",
            event.routing_key,
            event.body
        );
        assert!(
            any.is_valid(&event.body),
            "{}: one kind only",
            event.routing_key
        );
    }
}
