//! The job's JSON Schema (`schema/job-v1.schema.json`), which the web app's developers
//! validate against, and the decoder smsgw runs: both take the same valid jobs and refuse
//! the same invalid ones, one example of each rule.
//!
//! Two short lists name where they part, each checked both ways: what only the decoder
//! can refuse (rules the schema cannot express, which its `description` names), and the
//! spellings the decoder reads but the schema asks the web app not to send.

use jsonschema::Validator;
use serde_json::{Map, Value, json};

use smsgw::{
    config::DEFAULT_MAX_JOB_BYTES,
    job::{Job, JobType, MAX_BODY_CHARS, MAX_CONTEXT_BYTES, MAX_RECIPIENTS, check_size},
};

fn schema() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/schema/job-v1.schema.json");
    let text = std::fs::read_to_string(path).expect("schema/job-v1.schema.json");
    serde_json::from_str(&text).expect("the schema is JSON")
}

/// The schema as its description asks: draft 2020-12, formats asserted.
fn validator() -> Validator {
    jsonschema::draft202012::options()
        .should_validate_formats(true)
        .build(&schema())
        .expect("a usable draft 2020-12 schema")
}

/// What smsgw does with a message body: refuses it unread over the default size limit,
/// else decodes it.
fn decoded(job: &Value) -> Result<(), String> {
    let bytes = serde_json::to_vec(job).expect("encode");
    check_size(&bytes, DEFAULT_MAX_JOB_BYTES).map_err(|e| e.0)?;
    Job::decode(&bytes).map(|_| ()).map_err(|e| e.0)
}

fn schema_errors(validator: &Validator, job: &Value) -> Vec<String> {
    validator
        .iter_errors(job)
        .map(|e| format!("{}: {e}", e.instance_path()))
        .collect()
}

const ID: &str = "6f1c2d3e-8a9b-4c5d-9e0f-1a2b3c4d5e6f";

/// The contract's example, with a field of a later version (ignored).
fn example() -> Value {
    json!({
        "id": ID,
        "type": "booking_reminder",
        "school_id": 42,
        "to": "+447700900123",
        "body": "Reminder: driving lesson tomorrow 10:00 with Sam.",
        "context": {"booking_id": 981, "user_id": 77},
        "not_before": "2026-11-25T08:00:00Z",
        "expires_at": "2026-11-26T09:00:00Z",
        "some_future_field": [1, 2, 3]
    })
}

fn announcement(recipients: Value) -> Value {
    json!({
        "id": ID,
        "type": "announcement",
        "school_id": 42,
        "recipients": recipients,
        "body": "The office is closed on Monday."
    })
}

/// The example with `change` applied to its fields.
fn example_with(change: impl FnOnce(&mut Map<String, Value>)) -> Value {
    let mut job = example();
    if let Value::Object(fields) = &mut job {
        change(fields);
    }
    job
}

fn set(field: &str, value: Value) -> Value {
    example_with(|f| {
        f.insert(field.to_owned(), value);
    })
}

fn without(field: &str) -> Value {
    example_with(|f| {
        f.remove(field);
    })
}

fn recipients(count: usize, reference: impl Fn(usize) -> Value) -> Value {
    (0..count)
        .map(|i| json!({"to": format!("+4477009{i:05}"), "ref": reference(i)}))
        .collect()
}

fn valid_jobs() -> Vec<(String, Value)> {
    let mut jobs: Vec<(String, Value)> = JobType::ALL
        .into_iter()
        .filter(|kind| *kind != JobType::Announcement)
        .map(|kind| {
            (
                format!("a {}", kind.as_str()),
                set("type", json!(kind.as_str())),
            )
        })
        .collect();
    let more = [
        ("the contract's example", example()),
        (
            "only the required fields",
            json!({"id": ID, "type": "login_code", "school_id": 1, "to": "+447700900123", "body": "1"}),
        ),
        ("an upper-case id", set("id", json!(ID.to_uppercase()))),
        ("the largest school_id", set("school_id", json!(i64::MAX))),
        ("a national number", set("to", json!("07700 900123"))),
        ("a 'to' of 40 characters", set("to", json!("+".repeat(40)))),
        (
            "recipients: null beside 'to'",
            set("recipients", Value::Null),
        ),
        (
            "an announcement with refs as text, number, null and none",
            announcement(json!([
                {"to": "+447700900123", "ref": "user-77"},
                {"to": "07700 900124", "ref": 78},
                {"to": "+447700900125", "ref": null},
                {"to": "+447700900126"}
            ])),
        ),
        ("an announcement with to: null", {
            let mut job = announcement(json!([{"to": "+447700900123"}]));
            job["to"] = Value::Null;
            job
        }),
        (
            "an announcement to 50,000",
            announcement(recipients(MAX_RECIPIENTS, |i| json!(format!("user-{i}")))),
        ),
        (
            "a ref of 200 characters",
            announcement(json!([{"to": "+447700900123", "ref": "r".repeat(200)}])),
        ),
        (
            "a body of 1,600 characters",
            set("body", json!("é".repeat(MAX_BODY_CHARS))),
        ),
        (
            "a body of 1,600 characters outside the BMP",
            set("body", json!("🚗".repeat(MAX_BODY_CHARS))),
        ),
        ("context: null", set("context", Value::Null)),
        ("an empty context", set("context", json!({}))),
        (
            "a nested context",
            set(
                "context",
                json!({"booking": {"id": 981, "slots": [1, "two", null]}}),
            ),
        ),
        (
            "a context of 2,048 bytes",
            set("context", json!({"k": "x".repeat(MAX_CONTEXT_BYTES - 8)})),
        ),
        ("not_before: null", set("not_before", Value::Null)),
        (
            "expires_at with an offset",
            set("expires_at", json!("2026-11-26T09:00:00+01:00")),
        ),
        (
            "not_before with fractions of a second",
            set("not_before", json!("2026-11-25T08:00:00.123456Z")),
        ),
        (
            "a time with a lower-case t and z",
            set("not_before", json!("2026-11-25t08:00:00z")),
        ),
        (
            "a time in a leap year",
            set("not_before", json!("2028-02-29T08:00:00Z")),
        ),
        (
            "an unknown field holding a NUL",
            set("note", json!("a\u{0}b")),
        ),
        ("a ref that is not text", set("ref", json!(7))),
    ];
    jobs.extend(more.into_iter().map(|(name, job)| (name.to_owned(), job)));
    jobs
}

/// One job for each refusal of the decoder that the schema expresses too.
fn invalid_jobs() -> Vec<(&'static str, Value)> {
    let one = |entry: Value| announcement(json!([entry]));
    vec![
        ("not an object", json!([1, 2])),
        ("null", Value::Null),
        ("a string", json!("job")),
        ("no id", without("id")),
        ("id: null", set("id", Value::Null)),
        ("id: a number", set("id", json!(42))),
        ("id: not a UUID", set("id", json!("nope"))),
        (
            "id: a non-hex digit",
            set("id", json!("6f1c2d3e-8a9b-4c5d-9e0f-1a2b3c4d5e6g")),
        ),
        ("no type", without("type")),
        ("an unknown type", set("type", json!("fax"))),
        ("a type in the wrong case", set("type", json!("Login_Code"))),
        ("type: a number", set("type", json!(1))),
        ("no school_id", without("school_id")),
        ("school_id: text", set("school_id", json!("42"))),
        ("school_id: 0", set("school_id", json!(0))),
        ("school_id: negative", set("school_id", json!(-1))),
        ("school_id: a fraction", set("school_id", json!(1.5))),
        ("school_id: 1e30", set("school_id", json!(1e30))),
        (
            "school_id: past a bigint",
            set("school_id", json!(9_223_372_036_854_775_808u64)),
        ),
        ("no to and no recipients", without("to")),
        ("to: null and no recipients", set("to", Value::Null)),
        ("to: a number", set("to", json!(447_700_900_123u64))),
        ("to: empty", set("to", json!(""))),
        ("to: blank", set("to", json!("   "))),
        ("to: 41 characters", set("to", json!("+".repeat(41)))),
        ("to: a NUL", set("to", json!("+44770090\u{0}0123"))),
        (
            "recipients on a login_code",
            example_with(|f| {
                f.remove("to");
                f.insert("type".into(), json!("login_code"));
                f.insert("recipients".into(), json!([{"to": "+447700900123"}]));
            }),
        ),
        (
            "both to and recipients",
            example_with(|f| {
                f.insert("type".into(), json!("announcement"));
                f.insert("recipients".into(), json!([{"to": "+447700900123"}]));
            }),
        ),
        ("no recipients in the list", announcement(json!([]))),
        (
            "recipients: not a list",
            announcement(json!("+447700900123")),
        ),
        (
            "recipients: an object",
            announcement(json!({"to": "+447700900123"})),
        ),
        (
            "50,001 recipients",
            announcement(recipients(MAX_RECIPIENTS + 1, |_| Value::Null)),
        ),
        ("a recipient that is text", one(json!("+447700900123"))),
        ("a recipient without to", one(json!({"ref": "user-77"}))),
        ("a recipient with to: null", one(json!({"to": null}))),
        ("a recipient with a blank to", one(json!({"to": " "}))),
        (
            "a recipient with a numeric to",
            one(json!({"to": 447_700_900_123u64})),
        ),
        (
            "a recipient with a NUL in to",
            one(json!({"to": "+4477\u{0}00900123"})),
        ),
        (
            "a recipient with a 41-character to",
            one(json!({"to": "1".repeat(41)})),
        ),
        (
            "a ref that is a boolean",
            one(json!({"to": "+447700900123", "ref": true})),
        ),
        (
            "a ref that is an object",
            one(json!({"to": "+447700900123", "ref": {}})),
        ),
        (
            "a ref of 201 characters",
            one(json!({"to": "+447700900123", "ref": "r".repeat(201)})),
        ),
        (
            "a ref with a NUL",
            one(json!({"to": "+447700900123", "ref": "user\u{0}"})),
        ),
        ("no body", without("body")),
        ("body: null", set("body", Value::Null)),
        ("body: empty", set("body", json!(""))),
        ("body: only white space", set("body", json!(" \n\t "))),
        (
            "body: 1,601 characters",
            set("body", json!("é".repeat(MAX_BODY_CHARS + 1))),
        ),
        ("body: a number", set("body", json!(42))),
        ("body: a NUL", set("body", json!("Code\u{0}1234"))),
        ("context: a list", set("context", json!([1]))),
        ("context: text", set("context", json!("booking 981"))),
        (
            "context: a NUL in a value",
            set("context", json!({"a": {"b": ["x\u{0}"]}})),
        ),
        (
            "context: a NUL in a key",
            set("context", json!({"k\u{0}": 1})),
        ),
        ("not_before: words", set("not_before", json!("tomorrow"))),
        (
            "not_before: a number",
            set("not_before", json!(1_764_057_600)),
        ),
        (
            "not_before: no offset",
            set("not_before", json!("2026-11-25T08:00:00")),
        ),
        (
            "not_before: a date only",
            set("not_before", json!("2026-11-25")),
        ),
        (
            "not_before: month 13",
            set("not_before", json!("2026-13-25T08:00:00Z")),
        ),
        (
            "not_before: 29 February of 2026",
            set("not_before", json!("2026-02-29T08:00:00Z")),
        ),
        (
            "not_before: an offset of 24 hours",
            set("not_before", json!("2026-11-25T08:00:00+24:00")),
        ),
        (
            "expires_at: hour 25",
            set("expires_at", json!("2026-11-26T25:00:00Z")),
        ),
        ("ref: a NUL", set("ref", json!("user\u{0}"))),
    ]
}

/// Refused by the decoder although the schema cannot tell: each is named in the schema's
/// `description`.
fn decoder_only() -> Vec<(&'static str, Value)> {
    vec![
        (
            "a context over 2,048 bytes as compact JSON",
            set("context", json!({"note": "x".repeat(MAX_CONTEXT_BYTES)})),
        ),
        (
            "a school_id written with a fraction",
            set("school_id", json!(42.0)),
        ),
        (
            "a 'to' of 40 characters but 80 bytes",
            set("to", json!("é".repeat(40))),
        ),
        (
            "a recipient ref of 200 characters but 400 bytes",
            announcement(json!([{"to": "+447700900123", "ref": "é".repeat(200)}])),
        ),
        (
            "a job over SMSGW_MAX_JOB_BYTES",
            announcement(recipients(MAX_RECIPIENTS, |_| json!("r".repeat(200)))),
        ),
    ]
}

/// Read by the decoder, which is lenient; the schema asks for the usual spelling.
fn decoder_also_reads() -> Vec<(&'static str, Value)> {
    vec![
        (
            "a space for the T of a time",
            set("expires_at", json!("2026-11-26 09:00:00Z")),
        ),
        (
            "an id without hyphens",
            set("id", json!(ID.replace('-', ""))),
        ),
        ("a braced id", set("id", json!(format!("{{{ID}}}")))),
        ("an id as a URN", set("id", json!(format!("urn:uuid:{ID}")))),
    ]
}

#[test]
fn the_schema_is_a_valid_draft_2020_12_schema() {
    let schema = schema();
    assert_eq!(
        schema["$schema"],
        json!("https://json-schema.org/draft/2020-12/schema")
    );
    if let Err(e) = jsonschema::draft202012::meta::validate(&schema) {
        panic!("not a valid draft 2020-12 schema: {e}");
    }
}

#[test]
fn the_schema_and_the_decoder_accept_the_same_valid_jobs() {
    let validator = validator();
    let mut jobs = valid_jobs();
    let examples = schema()["examples"].as_array().cloned().unwrap_or_default();
    assert!(
        examples.len() >= 2,
        "the schema shows a job and an announcement"
    );
    jobs.extend(
        examples
            .into_iter()
            .map(|job| ("an example of the schema".to_owned(), job)),
    );
    for (name, job) in jobs {
        assert_eq!(decoded(&job), Ok(()), "{name}: refused by the decoder");
        assert_eq!(
            schema_errors(&validator, &job),
            Vec::<String>::new(),
            "{name}"
        );
    }
}

#[test]
fn the_schema_and_the_decoder_refuse_each_kind_of_invalid_job() {
    let validator = validator();
    for (name, job) in invalid_jobs() {
        assert!(decoded(&job).is_err(), "{name}: the decoder accepts it");
        assert!(!validator.is_valid(&job), "{name}: the schema accepts it");
    }
}

#[test]
fn what_the_schema_cannot_express_is_refused_by_the_decoder_alone() {
    let validator = validator();
    for (name, job) in decoder_only() {
        assert!(decoded(&job).is_err(), "{name}: the decoder accepts it");
        assert_eq!(
            schema_errors(&validator, &job),
            Vec::<String>::new(),
            "{name}: the schema refuses it now; move it to the invalid jobs"
        );
    }
    let description = schema()["description"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    for named in [
        "2,048 bytes",
        "42.0",
        "40 bytes",
        "200 bytes",
        "SMSGW_MAX_JOB_BYTES",
    ] {
        assert!(
            description.contains(named),
            "the schema's description does not say that '{named}' is the decoder's alone"
        );
    }
}

#[test]
fn the_decoder_also_reads_spellings_the_schema_asks_the_web_app_not_to_use() {
    let validator = validator();
    for (name, job) in decoder_also_reads() {
        assert_eq!(decoded(&job), Ok(()), "{name}");
        assert!(!validator.is_valid(&job), "{name}: the schema accepts it");
    }
}
