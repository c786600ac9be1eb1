//! Replies (two-way SMS, interface section 13): every inbound text that is not an opt-out
//! or opt-in keyword is kept in `sms_replies`, attributed to the message it answers, and
//! published as `reply.received`; keywords as the provider counts them; Twilio's and
//! Vonage's webhooks signed with their real schemes; bad input refused with nothing kept.

mod helpers;

use std::time::Duration;

use serde_json::{Value, json};
use tokio_postgres::Row;
use uuid::Uuid;

use smsgw::config::SignatureMethod;

use helpers::{App, events::EventTap, id_of, job, spawn_app_with, twilio_stub, vonage_stub};

const SCHOOL: i64 = 42;
const PUBLIC: &str = "https://smsgw.example.com";
const STUDENT: &str = "+447700900123";

async fn app_with(extra: &[(&str, &str)]) -> App {
    let mut overrides = vec![("SMSGW_PUBLIC_URL", PUBLIC)];
    overrides.extend_from_slice(extra);
    let app = spawn_app_with(&overrides).await;
    app.add_school(SCHOOL, "GB").await;
    app
}

/// A Twilio message id, unique per call.
fn sid() -> String {
    format!("SM{}", Uuid::new_v4().simple())
}

async fn replies(app: &App) -> Vec<Row> {
    app.db
        .rows("SELECT * FROM sms_replies ORDER BY received_at", &[])
        .await
}

async fn opted_out(app: &App, number: &str) -> bool {
    let n: i64 = app
        .db
        .scalar(
            "SELECT count(*) FROM sms_opt_outs WHERE phone = $1",
            &[&number],
        )
        .await;
    n > 0
}

/// A reminder about booking 981, sent to `to`; its id.
async fn reminder(app: &App, to: &str) -> Uuid {
    let mut reminder = job("booking_reminder", SCHOOL, to, "Lesson tomorrow 10:00");
    reminder["context"] = json!({"booking_id": 981});
    app.publish(&reminder).await;
    app.wait_for_status(id_of(&reminder), "sent").await;
    id_of(&reminder)
}

/// The one `reply.received` event the tap has, after the outbox emptied.
async fn the_reply_event(app: &App, tap: &mut EventTap) -> Value {
    tap.drain(&app.db, Duration::from_secs(20)).await;
    let replies: Vec<_> = tap
        .received
        .iter()
        .filter(|e| e.routing_key == "reply.received")
        .collect();
    assert_eq!(replies.len(), 1, "{:#?}", tap.received);
    let event = replies[0];
    assert!(event.persistent);
    assert_eq!(event.content_type.as_deref(), Some("application/json"));
    assert_eq!(event.message_id.as_deref(), event.body["event_id"].as_str());
    event.body.clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reply_is_kept_attributed_and_published_once() {
    let app = app_with(&[]).await;
    let mut tap = EventTap::bind(&app.env.amqp_url, "reply.#").await;
    let answered = reminder(&app, STUDENT).await;
    let id = sid();
    let answer = app
        .post_twilio_inbound(PUBLIC, STUDENT, "Running 10 min late", &id)
        .await;
    assert_eq!(answer.status(), 200);
    assert_eq!(
        answer.text().await.expect("TwiML"),
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response/>"
    );
    // Twilio sends it again (a retry, or a replay): nothing is added.
    let again = app
        .post_twilio_inbound(PUBLIC, STUDENT, "Running 10 min late", &id)
        .await;
    assert_eq!(again.status(), 200);

    let rows = replies(&app).await;
    assert_eq!(rows.len(), 1);
    let row = &rows[0];
    assert_eq!(row.get::<_, String>("from_number"), STUDENT);
    assert_eq!(row.get::<_, String>("to_number"), twilio_stub::DEFAULT_FROM);
    assert_eq!(
        row.get::<_, Option<String>>("body").as_deref(),
        Some("Running 10 min late")
    );
    assert_eq!(row.get::<_, String>("provider"), "twilio");
    assert_eq!(row.get::<_, String>("provider_message_id"), id);
    assert_eq!(row.get::<_, Option<i64>>("school_id"), Some(SCHOOL));
    assert_eq!(row.get::<_, Option<Uuid>>("in_reply_to"), Some(answered));

    let event = the_reply_event(&app, &mut tap).await;
    let reply_id: Uuid = row.get("id");
    assert_eq!(event["reply_id"], json!(reply_id));
    assert_eq!(event["school_id"], json!(SCHOOL));
    assert_eq!(event["in_reply_to"], json!(answered));
    assert_eq!(event["job_id"], json!(answered));
    assert_eq!(event["type"], "booking_reminder");
    assert_eq!(event["context"], json!({"booking_id": 981}));
    assert_eq!(event["from"], STUDENT);
    assert_eq!(event["to"], twilio_stub::DEFAULT_FROM);
    assert_eq!(event["body"], "Running 10 min late");
    assert_eq!(event["provider"], "twilio");
    let received = event["received_at"].as_str().expect("received_at");
    assert!(
        time::OffsetDateTime::parse(received, &time::format_description::well_known::Rfc3339)
            .is_ok(),
        "{received}"
    );
    let metrics = app.metrics().await;
    assert!(
        metrics.contains("smsgw_replies_total{provider=\"twilio\",attributed=\"true\"} 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reply_that_answers_nothing_is_kept_without_a_school_and_published() {
    let app = app_with(&[("SMSGW_REPLY_WINDOW", "1h")]).await;
    let mut tap = EventTap::bind(&app.env.amqp_url, "reply.#").await;
    // Texted, but longer ago than the window: the reply answers nothing found.
    let old = reminder(&app, STUDENT).await;
    app.db
        .execute(
            "UPDATE sms_messages SET sent_at = now() - interval '2 hours' WHERE id = $1",
            &[&old],
        )
        .await;
    let stranger = "+447700900999";
    for from in [STUDENT, stranger] {
        let answer = app
            .post_twilio_inbound(PUBLIC, from, "Who is this?", &sid())
            .await;
        assert_eq!(answer.status(), 200);
    }
    let rows = replies(&app).await;
    assert_eq!(rows.len(), 2);
    for row in &rows {
        assert_eq!(row.get::<_, Option<i64>>("school_id"), None);
        assert_eq!(row.get::<_, Option<Uuid>>("in_reply_to"), None);
    }
    tap.drain(&app.db, Duration::from_secs(20)).await;
    assert_eq!(tap.received.len(), 2);
    for event in &tap.received {
        for field in ["school_id", "in_reply_to", "job_id", "type", "context"] {
            assert_eq!(event.body[field], Value::Null, "{field}");
        }
        assert_eq!(event.body["body"], "Who is this?");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_default_keyword_opts_out_or_in_and_is_no_reply() {
    let app = app_with(&[]).await;
    for word in ["STOP", "stopall", "Unsubscribe", "CANCEL", "end", " QUIT "] {
        let answer = app.post_twilio_inbound(PUBLIC, STUDENT, word, &sid()).await;
        assert_eq!(answer.status(), 200, "{word}");
        assert!(opted_out(&app, STUDENT).await, "{word} opts out");
        let back = ["START", "unstop", "Yes"][word.len() % 3];
        app.post_twilio_inbound(PUBLIC, STUDENT, back, &sid()).await;
        assert!(!opted_out(&app, STUDENT).await, "{back} opts back in");
    }
    // Two words are a reply, as Twilio counts them.
    app.post_twilio_inbound(PUBLIC, STUDENT, "STOP PLEASE", &sid())
        .await;
    assert!(!opted_out(&app, STUDENT).await);
    let kept: Vec<String> = replies(&app)
        .await
        .iter()
        .filter_map(|r| r.get::<_, Option<String>>("body"))
        .collect();
    assert_eq!(kept, ["STOP PLEASE"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn keywords_in_another_language_by_configuration() {
    let app = app_with(&[
        ("SMSGW_OPT_OUT_KEYWORDS", "STOP,STOPP,ARRET"),
        ("SMSGW_OPT_IN_KEYWORDS", "START,STARTA"),
    ])
    .await;
    app.post_twilio_inbound(PUBLIC, STUDENT, "Stopp", &sid())
        .await;
    assert!(opted_out(&app, STUDENT).await);
    app.post_twilio_inbound(PUBLIC, STUDENT, "starta", &sid())
        .await;
    assert!(!opted_out(&app, STUDENT).await);
    // QUIT is no longer in the list: a reply.
    app.post_twilio_inbound(PUBLIC, STUDENT, "QUIT", &sid())
        .await;
    assert!(!opted_out(&app, STUDENT).await);
    assert_eq!(replies(&app).await.len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_inbound_texts_are_refused_and_nothing_is_kept() {
    let app = app_with(&[]).await;
    let long = "a".repeat(1_601);
    let cases: [(&[(&str, &str)], u16); 5] = [
        (&[("Body", "hi"), ("MessageSid", "SM1")], 400),
        (
            &[
                ("From", "not a number"),
                ("Body", "hi"),
                ("MessageSid", "SM2"),
            ],
            400,
        ),
        (
            &[("From", STUDENT), ("Body", "  "), ("MessageSid", "SM3")],
            400,
        ),
        (
            &[("From", STUDENT), ("Body", &long), ("MessageSid", "SM4")],
            400,
        ),
        (&[("From", STUDENT), ("Body", "hi")], 400),
    ];
    for (params, expected) in cases {
        let answer = app
            .post_twilio(PUBLIC, "/webhooks/twilio/inbound", params, None)
            .await;
        assert_eq!(answer.status().as_u16(), expected, "{params:?}");
    }
    let forged = app
        .post_twilio(
            PUBLIC,
            "/webhooks/twilio/inbound",
            &[("From", STUDENT), ("Body", "STOP"), ("MessageSid", "SM5")],
            Some("Zm9yZ2Vk"),
        )
        .await;
    assert_eq!(forged.status(), 403);
    assert!(replies(&app).await.is_empty());
    assert!(!opted_out(&app, STUDENT).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reply_from_a_number_that_opted_out_is_still_kept() {
    let app = app_with(&[]).await;
    app.post_twilio_inbound(PUBLIC, STUDENT, "STOP", &sid())
        .await;
    app.post_twilio_inbound(PUBLIC, STUDENT, "sorry, wrong button", &sid())
        .await;
    assert!(opted_out(&app, STUDENT).await);
    assert_eq!(replies(&app).await.len(), 1);
}

fn vonage_overrides(stub: &vonage_stub::VonageStub) -> Vec<(&'static str, String)> {
    vec![
        ("SMSGW_PROVIDER", "vonage".into()),
        ("VONAGE_API_KEY", vonage_stub::API_KEY.into()),
        ("VONAGE_API_SECRET", vonage_stub::API_SECRET.into()),
        ("VONAGE_FROM", "447700900000".into()),
        (
            "VONAGE_SIGNATURE_SECRET",
            vonage_stub::SIGNATURE_SECRET.into(),
        ),
        ("VONAGE_SIGNATURE_METHOD", "md5hash".into()),
        ("SMSGW_VONAGE_BASE_URL", stub.url.clone()),
        ("SMSGW_PUBLIC_URL", PUBLIC.into()),
    ]
}

/// An inbound SMS as Vonage sends it (numbers without `+`), signed now.
async fn vonage_inbound(app: &App, id: &str, text: &str, secret: &str, json: bool) -> u16 {
    let now = time::OffsetDateTime::now_utc().unix_timestamp().to_string();
    let params = [
        ("api-key", vonage_stub::API_KEY.to_owned()),
        ("msisdn", STUDENT.trim_start_matches('+').to_owned()),
        ("to", "447700900000".to_owned()),
        ("messageId", id.to_owned()),
        ("text", text.to_owned()),
        ("type", "text".to_owned()),
        (
            "keyword",
            text.split(' ').next().unwrap_or_default().to_uppercase(),
        ),
        ("message-timestamp", "2026-12-07 10:00:00".to_owned()),
        ("timestamp", now),
        ("nonce", Uuid::new_v4().to_string()),
    ];
    let required = vonage_stub::inbound_required_fields();
    assert!(required.len() >= 8, "{required:?}");
    for field in &required {
        assert!(
            params.iter().any(|(k, _)| k == field),
            "Vonage always sends {field}"
        );
    }
    let path = "/webhooks/vonage/inbound";
    vonage_stub::post_signed(
        &app.http_url,
        path,
        &params,
        secret,
        SignatureMethod::Md5Hash,
        json,
    )
    .await
    .status()
    .as_u16()
}

#[tokio::test(flavor = "multi_thread")]
async fn vonage_inbound_stop_is_honoured_and_replies_kept_once() {
    let vonage = vonage_stub::VonageStub::start().await;
    let overrides = vonage_overrides(&vonage);
    let borrowed: Vec<(&str, &str)> = overrides.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let app = spawn_app_with(&borrowed).await;
    app.add_school(SCHOOL, "GB").await;
    let answered = reminder(&app, STUDENT).await;
    let secret = vonage_stub::SIGNATURE_SECRET;

    assert_eq!(
        vonage_inbound(&app, "0A01", "Running late", "wrong", true).await,
        403
    );
    assert!(
        replies(&app).await.is_empty(),
        "a wrong signature stores nothing"
    );
    assert_eq!(
        vonage_inbound(&app, "0A01", "Running late", secret, true).await,
        204
    );
    // The same messageId again, signed afresh (Vonage retries for 24 hours): nothing added.
    assert_eq!(
        vonage_inbound(&app, "0A01", "Running late", secret, false).await,
        204
    );
    let rows = replies(&app).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].get::<_, String>("from_number"), STUDENT);
    assert_eq!(rows[0].get::<_, String>("to_number"), "+447700900000");
    assert_eq!(rows[0].get::<_, String>("provider"), "vonage");
    assert_eq!(
        rows[0].get::<_, Option<Uuid>>("in_reply_to"),
        Some(answered)
    );

    assert_eq!(
        vonage_inbound(&app, "0A02", "stop", secret, false).await,
        204
    );
    assert!(
        opted_out(&app, STUDENT).await,
        "a STOP to a Vonage number is honoured"
    );
    let next = job("booking_reminder", SCHOOL, STUDENT, "Reminder");
    app.publish(&next).await;
    let row = app.wait_for_status(id_of(&next), "suppressed").await;
    assert_eq!(row.reason.as_deref(), Some("opted_out"));
}

/// A reply as the webhook would have kept it, received `ago` (an interval) before now.
async fn kept_reply(app: &App, from: &str, school: Option<i64>, ago: &str, body: &str) -> Uuid {
    let id = Uuid::new_v4();
    app.db
        .execute(
            "INSERT INTO sms_replies (id, received_at, from_number, to_number, body, provider,
                                      provider_message_id, school_id)
             VALUES ($1, now() - $2::text::interval, $3, '+15005550006', $4, 'twilio',
                     gen_random_uuid()::text, $5)",
            &[&id, &ago, &from, &body, &school],
        )
        .await;
    id
}

fn stdout(output: &std::process::Output) -> String {
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn support_lists_replies_masked_and_beside_a_numbers_messages() {
    let app = app_with(&[]).await;
    let old = kept_reply(&app, STUDENT, Some(SCHOOL), "3 days", "See you then").await;
    let new = kept_reply(&app, STUDENT, Some(SCHOOL), "1 minute", "Running late").await;
    let other = kept_reply(&app, "+447700900124", Some(7), "1 hour", "Who is this?").await;

    let all = stdout(&app.run_cli(&["replies"]));
    let at = |text: &str, id: Uuid| text.find(&id.to_string());
    assert!(
        at(&all, new) < at(&all, other) && at(&all, other) < at(&all, old),
        "{all}"
    );
    for secret in [STUDENT, "Running late"] {
        assert!(!all.contains(secret), "{secret} shown: {all}");
    }
    assert!(all.contains("+44*******123"), "{all}");
    let school = stdout(&app.run_cli(&["replies", "--school", "7"]));
    assert!(
        at(&school, other).is_some() && at(&school, new).is_none(),
        "{school}"
    );
    let recent = stdout(&app.run_cli(&["replies", "--since", "24h", "--json", "--reveal"]));
    let json: Value = serde_json::from_str(&recent).expect("JSON");
    assert_eq!(json.as_array().map(Vec::len), Some(2), "{json}");
    assert_eq!(json[0]["body"], "Running late");
    assert_eq!(json[0]["from"], STUDENT);

    let status = stdout(&app.run_cli(&["status", "--to", STUDENT]));
    assert!(status.contains("Replies from this number:"), "{status}");
    assert!(
        at(&status, new).is_some() && at(&status, old).is_some(),
        "{status}"
    );
    assert!(
        at(&status, other).is_none(),
        "another number's reply: {status}"
    );

    let bad = app.run_cli(&["replies", "--from", "not a number"]);
    assert_eq!(bad.status.code(), Some(2), "{bad:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn retention_purges_reply_bodies_with_the_others() {
    let app = app_with(&[
        ("SMSGW_BODY_RETENTION", "1h"),
        ("SMSGW_LOG_RETENTION", "30d"),
        ("SMSGW_RETENTION_INTERVAL", "200ms"),
    ])
    .await;
    kept_reply(&app, STUDENT, None, "2 hours", "old reply").await;
    kept_reply(&app, STUDENT, None, "40 days", "ancient reply").await;
    let recent = kept_reply(&app, STUDENT, None, "10 minutes", "new reply").await;
    let deadline = std::time::Instant::now() + helpers::PATIENCE;
    loop {
        let counts = app
            .db
            .rows("SELECT count(body), count(*) FROM sms_replies", &[])
            .await;
        let (bodies, rows): (i64, i64) = (counts[0].get(0), counts[0].get(1));
        if bodies == 1 && rows == 2 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "bodies {bodies}, rows {rows}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let kept: Option<String> = app
        .db
        .scalar("SELECT body FROM sms_replies WHERE id = $1", &[&recent])
        .await;
    assert_eq!(kept.as_deref(), Some("new reply"));
}

/// What the log holds of `number`: messages to it, replies from it.
async fn kept_of(app: &App, number: &str) -> (i64, i64) {
    let messages = app
        .db
        .scalar(
            "SELECT count(*) FROM sms_messages WHERE recipient = $1",
            &[&number],
        )
        .await;
    let replies = app
        .db
        .scalar(
            "SELECT count(*) FROM sms_replies WHERE from_number = $1",
            &[&number],
        )
        .await;
    (messages, replies)
}

#[tokio::test(flavor = "multi_thread")]
async fn erase_removes_a_persons_texts_and_number_and_keeps_their_opt_out() {
    let app = app_with(&[]).await;
    let other = "+447700900456";
    let theirs = [reminder(&app, STUDENT).await, reminder(&app, STUDENT).await];
    let kept = reminder(&app, other).await;
    app.post_twilio_inbound(PUBLIC, STUDENT, "Running late", &sid())
        .await;
    app.post_twilio_inbound(PUBLIC, STUDENT, "STOP", &sid())
        .await;

    // A number that is not one: refused (exit 2) without echoing it.
    let refused = app.run_cli(&["erase", "--to", "07700 90012x", "--yes"]);
    assert_eq!(refused.status.code(), Some(2));
    assert!(!String::from_utf8_lossy(&refused.stderr).contains("90012x"));

    // Without --yes: what it would do, and nothing changed.
    let preview = app.run_cli(&["erase", "--to", STUDENT]);
    let said = String::from_utf8_lossy(&preview.stdout);
    assert!(preview.status.success(), "{said}");
    assert!(
        said.contains("messages: 2") && said.contains("replies: 1"),
        "{said}"
    );
    assert!(
        said.contains("nothing changed") && !said.contains(STUDENT),
        "{said}"
    );
    assert_eq!(kept_of(&app, STUDENT).await, (2, 1));

    let erased = app.run_cli(&["erase", "--to", STUDENT, "--yes"]);
    let said = String::from_utf8_lossy(&erased.stdout);
    assert!(erased.status.success(), "{said}");
    assert!(said.contains("opt-outs: 1 (kept"), "{said}");
    assert_eq!(
        kept_of(&app, STUDENT).await,
        (0, 0),
        "no trace of the number"
    );
    for id in theirs {
        let row = app.message(id).await.expect("the row stays for billing");
        assert_eq!(
            (row.status.as_str(), row.recipient.as_str()),
            ("sent", "+44*******123")
        );
    }
    let bodies: i64 = app
        .db
        .scalar(
            "SELECT count(body) FROM sms_messages WHERE id = ANY($1)",
            &[&theirs.to_vec()],
        )
        .await;
    assert_eq!(bodies, 0);
    let reply_bodies: i64 = app
        .db
        .scalar("SELECT count(body) FROM sms_replies", &[])
        .await;
    assert_eq!(reply_bodies, 0);
    assert!(opted_out(&app, STUDENT).await, "never texted again");
    let other_row = app.message(kept).await.expect("row");
    assert_eq!(
        other_row.recipient, other,
        "someone else's log is untouched"
    );
}
