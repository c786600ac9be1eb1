//! Status events (contract section 9), as the web app receives them: a queue bound to
//! `sms.events`, against the real RabbitMQ and PostgreSQL, Twilio at the local stub.

mod helpers;

use std::time::Duration;

use serde_json::{Value, json};
use uuid::Uuid;

use helpers::{
    Reply, base_settings,
    events::{EventTap, assert_events_match_log},
    free_port, id_of, job,
    process::{Daemon, wait_ready},
    spawn_app, spawn_app_with, twilio_stub,
};

const SCHOOL: i64 = 42;
const PUBLIC: &str = "https://smsgw.example.com";

fn statuses(events: &[&helpers::events::Event]) -> Vec<String> {
    events.iter().map(|e| e.status().to_owned()).collect()
}

async fn tap(app: &helpers::App) -> EventTap {
    EventTap::bind(&app.env.amqp_url, "#").await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sent_then_delivered_text_gives_one_event_per_status_in_order() {
    let app = spawn_app_with(&[("SMSGW_PUBLIC_URL", PUBLIC)]).await;
    app.add_school(SCHOOL, "GB").await;
    let mut tap = tap(&app).await;
    let code = job("login_code", SCHOOL, "+447700900123", "Your code is 4711");
    let id = id_of(&code);
    app.publish(&code).await;
    let sid = app
        .wait_for_status(id, "sent")
        .await
        .provider_message_id
        .expect("a sid");
    let receipt = [
        ("AccountSid", twilio_stub::ACCOUNT_SID),
        ("MessageSid", sid.as_str()),
        ("MessageStatus", "delivered"),
    ];
    let answer = app
        .post_twilio(PUBLIC, "/webhooks/twilio/status", &receipt, None)
        .await;
    assert!(answer.status().is_success(), "{}", answer.status());

    tap.until(|events| events.iter().any(|e| e.status() == "delivered"))
        .await;
    let events = tap.of(id);
    assert_eq!(statuses(&events), ["sending", "sent", "delivered"]);
    let keys: Vec<&str> = events.iter().map(|e| e.routing_key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "login_code.sending",
            "login_code.sent",
            "login_code.delivered"
        ]
    );
    let delivered = events[2];
    assert_eq!(delivered.content_type.as_deref(), Some("application/json"));
    assert!(delivered.persistent);
    assert_eq!(
        delivered.message_id.as_deref(),
        delivered.body["event_id"].as_str()
    );
    let body = &delivered.body;
    assert_eq!(body["seq"], 3);
    assert_eq!(body["message_id"], json!(id));
    assert_eq!(body["job_id"], json!(id));
    assert_eq!(body["ref"], Value::Null);
    assert_eq!(body["school_id"], SCHOOL);
    assert_eq!(body["previous_status"], "sent");
    assert_eq!(body["provider"], "twilio");
    assert_eq!(body["provider_message_id"], json!(sid));
    assert_eq!(body["attempts"], 1);
    assert_eq!(body["segments"], 1);
    let text = body.to_string();
    assert!(
        !text.contains("4711"),
        "no message text in an event: {text}"
    );
    assert!(
        !text.contains("900123"),
        "no phone number in an event: {text}"
    );

    let metrics = app.metrics().await;
    assert!(
        metrics.contains("smsgw_events_published_total"),
        "{metrics}"
    );
    assert!(metrics.contains("smsgw_events_outbox "), "{metrics}");
}

#[tokio::test(flavor = "multi_thread")]
async fn suppressed_and_expired_messages_each_give_one_event_with_the_reason() {
    let app = spawn_app().await;
    app.add_school(SCHOOL, "GB").await;
    let mut tap = tap(&app).await;
    let unknown_school = job("booking_reminder", 99, "+447700900111", "x");
    let mut expired = job("login_code", SCHOOL, "+447700900123", "Code 1234");
    expired["expires_at"] = json!("2020-01-01T00:00:00Z");
    app.publish(&unknown_school).await;
    app.publish(&expired).await;

    tap.until(|events| events.len() >= 2).await;
    let suppressed = tap.of(id_of(&unknown_school));
    assert_eq!(statuses(&suppressed), ["suppressed"]);
    assert_eq!(suppressed[0].routing_key, "booking_reminder.suppressed");
    assert_eq!(suppressed[0].body["reason"], "no_school_settings");
    assert_eq!(suppressed[0].body["previous_status"], Value::Null);
    let expired = tap.of(id_of(&expired));
    assert_eq!(statuses(&expired), ["expired"]);
    assert_eq!(expired[0].routing_key, "login_code.expired");
}

#[tokio::test(flavor = "multi_thread")]
async fn temporary_failures_give_retrying_events_before_the_send() {
    let app = spawn_app().await;
    app.add_school(SCHOOL, "GB").await;
    let mut tap = tap(&app).await;
    app.stub.script([
        Reply::error(500, 20500, "Internal Server Error"),
        Reply::error(500, 20500, "Internal Server Error"),
    ]);
    let change = job("booking_change", SCHOOL, "+447700900123", "Moved to 11:00");
    app.publish(&change).await;

    tap.until(|events| events.iter().any(|e| e.status() == "sent"))
        .await;
    let events = tap.of(id_of(&change));
    assert_eq!(
        statuses(&events),
        [
            "sending", "retrying", "sending", "retrying", "sending", "sent"
        ]
    );
    let seqs: Vec<i64> = events.iter().map(|e| e.seq()).collect();
    assert_eq!(seqs, [1, 2, 3, 4, 5, 6]);
    assert_eq!(events[1].body["error_code"], "20500");
    assert_eq!(events[1].body["attempts"], 1);
    assert_eq!(events[3].body["attempts"], 2);
    assert_eq!(events[5].body["attempts"], 3);
    assert_eq!(events[5].body["error_code"], Value::Null);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_permanent_failure_gives_a_failed_event_with_the_providers_code() {
    let app = spawn_app().await;
    app.add_school(SCHOOL, "GB").await;
    let mut tap = EventTap::bind(&app.env.amqp_url, "*.failed").await;
    app.stub.reply_for(
        "+447700900123",
        Reply::error(400, 21211, "Invalid 'To' Phone Number: +447700900123"),
    );
    let cancellation = job("booking_cancellation", SCHOOL, "+447700900123", "Cancelled");
    app.publish(&cancellation).await;

    let events = tap.until(|events| !events.is_empty()).await;
    assert_eq!(events.len(), 1, "only the failure matches *.failed");
    let failed = &events[0];
    assert_eq!(failed.routing_key, "booking_cancellation.failed");
    assert_eq!(failed.body["previous_status"], "sending");
    assert_eq!(failed.body["reason"], "permanent_failure");
    assert_eq!(failed.body["error_code"], "21211");
    assert_eq!(failed.body["seq"], 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_announcements_recipients_have_events_naming_the_announcement_and_ref() {
    let app = spawn_app().await;
    app.add_school(SCHOOL, "GB").await;
    let mut tap = tap(&app).await;
    let bulk = json!({
        "id": Uuid::new_v4(),
        "type": "announcement",
        "school_id": SCHOOL,
        "recipients": [{"to": "+447700900001", "ref": "user-1"}, {"to": "+447700900002"}],
        "body": "The office is closed on Friday.",
        "context": {"term": "spring"}
    });
    app.publish(&bulk).await;

    tap.until(|events| events.iter().filter(|e| e.status() == "sent").count() == 2)
        .await;
    let bulk_id = id_of(&bulk);
    let first = tap.of(Uuid::new_v5(&bulk_id, b"+447700900001"));
    assert_eq!(statuses(&first), ["queued", "sending", "sent"]);
    for event in &first {
        assert_eq!(event.body["job_id"], json!(bulk_id));
        assert_eq!(event.body["ref"], "user-1");
        assert_eq!(event.body["context"]["term"], "spring");
    }
    let second = tap.of(Uuid::new_v5(&bulk_id, b"+447700900002"));
    assert_eq!(second[0].body["ref"], Value::Null);
    assert_eq!(second[0].routing_key, "announcement.queued");
}

#[tokio::test(flavor = "multi_thread")]
async fn with_events_off_no_event_is_written_or_published() {
    let app = spawn_app_with(&[("SMSGW_EVENTS", "off")]).await;
    app.add_school(SCHOOL, "GB").await;
    let mut tap = tap(&app).await;
    let reminder = job("booking_reminder", SCHOOL, "+447700900123", "Reminder");
    app.publish(&reminder).await;
    app.wait_for_status(id_of(&reminder), "sent").await;

    tokio::time::sleep(Duration::from_millis(500)).await;
    tap.take().await;
    assert!(tap.received.is_empty(), "{:#?}", tap.received);
    let outbox: i64 = app.db.scalar("SELECT count(*) FROM sms_events", &[]).await;
    assert_eq!(outbox, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn two_daemons_relaying_one_outbox_keep_each_messages_order_without_copies() {
    let app = spawn_app().await;
    app.add_school(SCHOOL, "GB").await;
    let mut tap = tap(&app).await;
    let port = free_port();
    let vars: Vec<(String, String)> = base_settings(&app.env, &app.stub, port)
        .into_iter()
        .chain([("RUST_LOG".to_owned(), "warn".to_owned())])
        .collect();
    let mut second = Daemon::spawn(&vars);
    wait_ready(port, &mut second).await;
    app.stub.script(std::iter::repeat_n(
        Reply::error(500, 20500, "Internal Server Error"),
        50,
    ));
    let ids = app.publish_many(2_000, "booking_reminder", SCHOOL).await;
    assert_eq!(
        app.wait_all(&ids, "sent", Duration::from_secs(120)).await,
        0
    );

    tap.drain(&app.db, Duration::from_secs(60)).await;
    second.signal("TERM");
    let copies = assert_events_match_log(&tap, &app.db).await;
    assert_eq!(copies, 0, "an event published twice without a crash");
}

#[tokio::test(flavor = "multi_thread")]
async fn check_warns_of_events_that_no_daemon_relays() {
    let mut app = spawn_app().await;
    let _ = app.stop().await;
    app.sql(
        "INSERT INTO sms_messages (id, school_id, type, recipient, status)
         VALUES (gen_random_uuid(), 42, 'login_code', '+447700900123', 'sent')",
    )
    .await;
    app.sql("UPDATE sms_events SET occurred_at = now() - interval '5 minutes'")
        .await;

    let check = app.run_cli(&["check"]);
    let text = String::from_utf8_lossy(&check.stdout);
    assert_eq!(
        check.status.code(),
        Some(0),
        "a backlog is not a failure: {text}"
    );
    let events = text
        .lines()
        .find(|l| l.starts_with("events"))
        .unwrap_or_default();
    assert!(events.contains("WARN"), "{text}");
    assert!(events.contains("1 waiting"), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_invalid_job_gives_a_job_rejected_event_with_what_could_be_read() {
    let app = spawn_app().await;
    let mut tap = EventTap::bind(&app.env.amqp_url, "job.rejected").await;
    let id = Uuid::new_v4();
    let bad = json!({"id": id, "type": "sms_blast", "school_id": SCHOOL, "to": "+447700900123",
                     "body": "hi"});
    app.publish_raw("sms_blast", &id.to_string(), bad.to_string().as_bytes())
        .await;
    let unreadable = Uuid::new_v4();
    app.publish_raw("login_code", &unreadable.to_string(), b"call +447700900123")
        .await;
    app.dead_letters(2).await;
    let events = tap.until(|received| received.len() >= 2).await.to_vec();
    let of = |job: Uuid| {
        events
            .iter()
            .find(|e| e.body["job_id"] == json!(job))
            .unwrap_or_else(|| panic!("no event for {job}: {events:#?}"))
    };
    let named = of(id);
    assert_eq!(named.routing_key, "job.rejected");
    assert_eq!(named.message_id.as_deref(), named.body["event_id"].as_str());
    assert!(named.persistent);
    assert_eq!(named.body["type"], "sms_blast");
    assert_eq!(named.body["school_id"], SCHOOL);
    assert_eq!(named.body["reason"], "invalid_job");
    assert_eq!(named.body["error"], "type: unknown type 'sms_blast'");
    assert!(
        named.body["occurred_at"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z'))
    );
    // Not JSON: the id comes from the AMQP message id; type and school are unknown.
    let not_json = of(unreadable);
    assert_eq!(not_json.body["type"], Value::Null);
    assert_eq!(not_json.body["school_id"], Value::Null);
    let error = not_json.body["error"].as_str().unwrap_or_default();
    assert!(error.starts_with("not JSON"), "{error}");
    assert!(
        !not_json.body.to_string().contains("7700900123"),
        "no number"
    );
}

async fn outbox(app: &helpers::App) -> (i64, bool, i64) {
    let rows = app
        .db
        .rows(
            "SELECT (SELECT count(*) FROM sms_events), (SELECT open FROM sms_events_gate),
                    (SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM sms_events_dropped)",
            &[],
        )
        .await;
    (rows[0].get(0), rows[0].get(1), rows[0].get(2))
}

async fn wait_for_outbox(
    app: &helpers::App,
    done: impl Fn((i64, bool, i64)) -> bool,
) -> (i64, bool, i64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let state = outbox(app).await;
        if done(state) {
            return state;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the outbox stays {state:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn get(port: u16, path: &str) -> String {
    reqwest::get(format!("http://127.0.0.1:{port}{path}"))
        .await
        .expect("the daemon answers")
        .text()
        .await
        .expect("a body")
}

async fn metric(port: u16, name: &str) -> f64 {
    let text = get(port, "/metrics").await;
    text.lines()
        .find_map(|line| {
            line.strip_prefix(name)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no {name} in {text}"))
}

/// The broker refuses the relay `sms.events` (a permission missing), so nothing can be
/// published: past `SMSGW_EVENTS_MAX_BACKLOG` the outbox stops growing and the events
/// dropped are counted, while texts still go; once the relay may publish, the backlog
/// drains and new events flow again.
#[tokio::test(flavor = "multi_thread")]
async fn an_outbox_no_relay_can_empty_stops_at_its_bound_and_flows_again_once_one_can() {
    helpers::init_logs();
    let env = helpers::TestEnv::new().await;
    helpers::allow_configuring(&env, r"^(?!sms\.events$).*");
    helpers::migrate(&env.database_url).await;
    let port = free_port();
    let stub = helpers::TwilioStub::start().await;
    let vars: Vec<(String, String)> = base_settings(&env, &stub, port)
        .into_iter()
        .chain([("SMSGW_EVENTS_MAX_BACKLOG".to_owned(), "10".to_owned())])
        .collect();
    let app = helpers::attach(env, stub).await;
    app.add_school(SCHOOL, "GB").await;
    let mut daemon = Daemon::spawn(&vars);
    wait_ready(port, &mut daemon).await;

    let before = app.publish_many(8, "booking_reminder", SCHOOL).await;
    assert_eq!(app.wait_all(&before, "sent", helpers::PATIENCE).await, 0);
    let (full, _, _) = wait_for_outbox(&app, |(_, open, _)| !open).await;
    assert!(full >= 10, "closed at {full} events");
    let during = app.publish_many(8, "booking_reminder", SCHOOL).await;
    assert_eq!(
        app.wait_all(&during, "sent", helpers::PATIENCE).await,
        0,
        "texts still go"
    );
    let (waiting, _, dropped) = outbox(&app).await;
    assert_eq!(waiting, full, "no event is written past the bound");
    // Each text's claim and its sending give at least two events.
    assert!(dropped >= 16, "{dropped} dropped");
    assert_eq!(metric(port, "smsgw_events_relay_up").await, 0.0);
    // Read every few seconds: it may be a look behind the count.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while metric(port, "smsgw_events_dropped").await < dropped as f64 {
        assert!(
            std::time::Instant::now() < deadline,
            "no metric of the {dropped} dropped"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let readiness: Value = serde_json::from_str(&get(port, "/readyz").await).expect("JSON");
    assert_eq!(readiness["ready"], json!(true), "{readiness}");
    assert_eq!(readiness["events_relay"], json!(false), "{readiness}");

    helpers::allow_configuring(&app.env, ".*");
    wait_for_outbox(&app, |(waiting, open, _)| waiting == 0 && open).await;
    let mut tap = tap(&app).await;
    let after = job("booking_reminder", SCHOOL, "+447700900999", "Reminder");
    app.publish(&after).await;
    let events = tap
        .until(|events| {
            events
                .iter()
                .any(|e| e.message() == id_of(&after) && e.status() == "sent")
        })
        .await;
    assert!(!events.is_empty());
    assert_eq!(metric(port, "smsgw_events_relay_up").await, 1.0);
    daemon.signal("TERM");
}
