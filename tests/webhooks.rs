//! Delivery receipts and inbound keywords: signatures checked as Twilio's and Vonage's
//! libraries compute them, statuses that never move backwards, STOP and START; and the
//! HTTP server's limits on slow and idle clients.

mod helpers;

use std::time::{Duration, Instant};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use smsgw::{
    config::SignatureMethod,
    provider::twilio::callbacks::{signature as twilio_signature, verify as verify_twilio},
};

use helpers::{Reply, events::EventTap, id_of, job, spawn_app_with, twilio_stub, vonage_stub};

const SCHOOL: i64 = 42;
const PUBLIC: &str = "https://smsgw.example.com";

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// Twilio's published example (auth token 12345), as its helper libraries' tests use it.
#[test]
fn twilio_signatures_match_the_documented_vectors() {
    let url = "https://mycompany.com/myapp.php?foo=1&bar=2";
    let params = pairs(&[
        ("CallSid", "CA1234567890ABCDE"),
        ("Digits", "1234"),
        ("From", "+14158675309"),
        ("To", "+18005551212"),
        ("Caller", "+14158675309"),
    ]);
    assert_eq!(
        twilio_signature("12345", url, &params),
        "RSOYDt4T1cUTdK1PDd93/VVr8B8="
    );
    assert!(verify_twilio(
        "12345",
        url,
        &params,
        "RSOYDt4T1cUTdK1PDd93/VVr8B8="
    ));

    // Repeated keys: every value counts, in order.
    let repeated = pairs(&[
        ("Sid", "CA123"),
        ("SidAccount", "AC123"),
        ("Digits", "5678"),
        ("Digits", "1234"),
    ]);
    assert_eq!(
        twilio_signature("12345", url, &repeated),
        "IK+Dwps556ElfBT0I3Rgjkr1wJU="
    );

    // With and without the port: a port is removed, a default port added.
    let with_port = url.replace(".com", ".com:1234");
    assert!(verify_twilio(
        "12345",
        &with_port,
        &params,
        "RSOYDt4T1cUTdK1PDd93/VVr8B8="
    ));
    let http_with_port = with_port.replace("https", "http");
    assert!(verify_twilio(
        "12345",
        &http_with_port,
        &params,
        "Zmvh+3yNM1Phv2jhDCwEM3q5ebU="
    ));
    assert!(verify_twilio(
        "12345",
        url,
        &params,
        "kvajT1Ptam85bY51eRf/AJRuM3w="
    ));
    assert!(verify_twilio(
        "12345",
        &url.replace("https", "http"),
        &params,
        "0ZXoZLH/DfblKGATFgpif+LLRf4="
    ));

    assert!(!verify_twilio(
        "12346",
        url,
        &params,
        "RSOYDt4T1cUTdK1PDd93/VVr8B8="
    ));
    assert!(!verify_twilio("12345", url, &params, ""));
}

async fn sent_message(app: &helpers::App, to: &str) -> (uuid::Uuid, String) {
    let job = job("booking_reminder", SCHOOL, to, "Reminder");
    app.publish(&job).await;
    let row = app.wait_for_status(id_of(&job), "sent").await;
    (id_of(&job), row.provider_message_id.expect("a sid"))
}

async fn status(app: &helpers::App, sid: &str, status: &str) -> u16 {
    app.post_twilio(
        PUBLIC,
        "/webhooks/twilio/status",
        &[
            ("AccountSid", twilio_stub::ACCOUNT_SID),
            ("MessageSid", sid),
            ("SmsSid", sid),
            ("MessageStatus", status),
            ("ApiVersion", "2010-04-01"),
        ],
        None,
    )
    .await
    .status()
    .as_u16()
}

#[tokio::test(flavor = "multi_thread")]
async fn receipts_move_messages_forward_never_back_in_any_order() {
    let app = spawn_app_with(&[("SMSGW_PUBLIC_URL", PUBLIC)]).await;
    app.add_school(SCHOOL, "GB").await;
    let orders: [(&[&str], &str); 5] = [
        (&["queued", "sent", "delivered"], "delivered"),
        (&["delivered", "sent", "queued"], "delivered"),
        (&["sent", "undelivered", "sent"], "undelivered"),
        (&["delivered", "failed", "undelivered"], "delivered"),
        (&["read", "delivered", "delivered"], "delivered"),
    ];
    for (i, (callbacks, expected)) in orders.iter().enumerate() {
        let (id, sid) = sent_message(&app, &format!("+4477009006{i:02}")).await;
        for callback in *callbacks {
            assert_eq!(status(&app, &sid, callback).await, 204, "{callback}");
        }
        let row = app.message(id).await.expect("row");
        assert_eq!(&row.status, expected, "{callbacks:?}");
    }
    // A receipt for a message we never sent: 2xx, nothing else.
    assert_eq!(
        status(&app, "SM00000000000000000000000000000000", "delivered").await,
        204
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_signed_receipt_with_a_nul_character_is_kept() {
    // PostgreSQL's text cannot hold U+0000; a receipt carrying one is stored with U+FFFD
    // instead of failing with a 5xx that the provider would retry for ever.
    let app = spawn_app_with(&[("SMSGW_PUBLIC_URL", PUBLIC)]).await;
    app.add_school(SCHOOL, "GB").await;
    let (id, sid) = sent_message(&app, "+447700900650").await;
    assert_eq!(status(&app, &sid, "deliv\u{0}ered").await, 204);
    assert_eq!(status(&app, "SM\u{0}unknown", "delivered").await, 204);
    let kept: Vec<String> = app
        .db
        .rows("SELECT provider_status FROM sms_receipts ORDER BY id", &[])
        .await
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(kept, ["deliv\u{fffd}ered", "delivered"]);
    let row = app.message(id).await.expect("row");
    assert_eq!(row.status, "sent", "an unknown status word moves nothing");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_receipt_with_a_wrong_or_missing_signature_changes_nothing() {
    let app = spawn_app_with(&[("SMSGW_PUBLIC_URL", PUBLIC)]).await;
    app.add_school(SCHOOL, "GB").await;
    let (id, sid) = sent_message(&app, "+447700900123").await;
    let params = [("MessageSid", sid.as_str()), ("MessageStatus", "delivered")];
    let forged = app
        .post_twilio(
            PUBLIC,
            "/webhooks/twilio/status",
            &params,
            Some("RSOYDt4T1cUTdK1PDd93/VVr8B8="),
        )
        .await;
    assert_eq!(forged.status(), 403);
    let missing = app
        .post_twilio(PUBLIC, "/webhooks/twilio/status", &params, Some(""))
        .await;
    assert_eq!(missing.status(), 403);
    // Signed for another URL (a replay against another endpoint).
    let wrong_url = app
        .post_twilio(
            "https://evil.example.com",
            "/webhooks/twilio/status",
            &params,
            None,
        )
        .await;
    assert_eq!(wrong_url.status(), 403);
    assert_eq!(app.message(id).await.expect("row").status, "sent");

    let garbage = reqwest::Client::new()
        .post(format!("{}/webhooks/twilio/status", app.http_url))
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(vec![0xff, 0xfe, b'%', b'z'])
        .send()
        .await
        .expect("post");
    assert!(garbage.status().is_client_error());
    let huge = reqwest::Client::new()
        .post(format!("{}/webhooks/twilio/status", app.http_url))
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(vec![b'a'; 200_000])
        .send()
        .await
        .expect("post");
    assert_eq!(huge.status(), 413);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_receipt_before_the_send_is_recorded_waits_and_applies() {
    let app = spawn_app_with(&[("SMSGW_PUBLIC_URL", PUBLIC)]).await;
    app.add_school(SCHOOL, "GB").await;
    app.stub.script([Reply::Slow(Duration::from_millis(1500))]);
    let job = job("booking_reminder", SCHOOL, "+447700900123", "Reminder");
    app.publish(&job).await;
    let sid = loop {
        if let Some(sid) = app.stub.last_sid() {
            break sid;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    // The carrier is faster than our own record of the send.
    assert_eq!(status(&app, &sid, "delivered").await, 204);
    app.wait_for_status(id_of(&job), "delivered").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stop_in_a_receipt_records_an_opt_out() {
    let app = spawn_app_with(&[("SMSGW_PUBLIC_URL", PUBLIC)]).await;
    app.add_school(SCHOOL, "GB").await;
    let (id, sid) = sent_message(&app, "+447700900123").await;
    let response = app
        .post_twilio(
            PUBLIC,
            "/webhooks/twilio/status",
            &[
                ("MessageSid", sid.as_str()),
                ("MessageStatus", "undelivered"),
                ("ErrorCode", "21610"),
            ],
            None,
        )
        .await;
    assert_eq!(response.status(), 204);
    assert_eq!(app.message(id).await.expect("row").status, "undelivered");
    let next = job("booking_reminder", SCHOOL, "+447700900123", "Another");
    app.publish(&next).await;
    let row = app.wait_for_status(id_of(&next), "suppressed").await;
    assert_eq!(row.reason.as_deref(), Some("opted_out"));
}

async fn opt_out_receipt(app: &helpers::App, sid: &str) -> u16 {
    let params = [
        ("MessageSid", sid),
        ("MessageStatus", "undelivered"),
        ("ErrorCode", "21610"),
    ];
    let response = app
        .post_twilio(PUBLIC, "/webhooks/twilio/status", &params, None)
        .await;
    response.status().as_u16()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replayed_opt_out_receipt_does_not_undo_a_later_start() {
    let app = spawn_app_with(&[("SMSGW_PUBLIC_URL", PUBLIC)]).await;
    app.add_school(SCHOOL, "GB").await;
    let to = "+447700900123";
    let (_, sid) = sent_message(&app, to).await;
    assert_eq!(opt_out_receipt(&app, &sid).await, 204);
    let opted_out = "SELECT count(*) FROM sms_opt_outs WHERE phone = $1";
    assert_eq!(app.db.scalar::<i64>(opted_out, &[&to]).await, 1);
    let start = "SM0000000000000000000000000000005a";
    assert_eq!(inbound(&app, to, "START", start).await.status(), 200);
    assert_eq!(app.db.scalar::<i64>(opted_out, &[&to]).await, 0);

    // The receipt captured on its way in, sent again: answered, and nothing changes.
    assert_eq!(opt_out_receipt(&app, &sid).await, 204);
    assert_eq!(
        app.db.scalar::<i64>(opted_out, &[&to]).await,
        0,
        "the START after the receipt is still in force"
    );
    let receipts: i64 = app
        .db
        .scalar(
            "SELECT count(*) FROM sms_receipts WHERE provider_message_id = $1",
            &[&sid],
        )
        .await;
    assert_eq!(receipts, 1, "a replay keeps no receipt row");
    let next = job("booking_reminder", SCHOOL, to, "Reminder");
    app.publish(&next).await;
    app.wait_for_status(id_of(&next), "sent").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn stop_and_start_round_trip_through_a_real_send() {
    let app = spawn_app_with(&[("SMSGW_PUBLIC_URL", PUBLIC)]).await;
    app.add_school(SCHOOL, "GB").await;
    let inbound = |body: &'static str, sid: &'static str| inbound(&app, "+447700900123", body, sid);
    let response = inbound("  Stop ", "SM11111111111111111111111111111111").await;
    assert_eq!(response.status(), 200);
    assert!(response.text().await.expect("body").contains("<Response/>"));

    let stopped = job("booking_reminder", SCHOOL, "+447700900123", "Reminder");
    app.publish(&stopped).await;
    assert_eq!(
        app.wait_for_status(id_of(&stopped), "suppressed")
            .await
            .reason
            .as_deref(),
        Some("opted_out")
    );
    assert_eq!(
        inbound("hello there", "SM22222222222222222222222222222222")
            .await
            .status(),
        200,
        "other texts change nothing"
    );
    assert_eq!(
        inbound("START", "SM33333333333333333333333333333333")
            .await
            .status(),
        200
    );
    let resumed = job(
        "booking_reminder",
        SCHOOL,
        "+447700900123",
        "Reminder again",
    );
    app.publish(&resumed).await;
    app.wait_for_status(id_of(&resumed), "sent").await;

    let forged = app
        .post_twilio(
            PUBLIC,
            "/webhooks/twilio/inbound",
            &[("From", "+447700900999"), ("Body", "STOP")],
            Some("AAAA"),
        )
        .await;
    assert_eq!(forged.status(), 403);
    let opt_outs: i64 = app
        .db
        .scalar(
            "SELECT count(*) FROM sms_opt_outs WHERE phone = '+447700900999'",
            &[],
        )
        .await;
    assert_eq!(opt_outs, 0);
}

async fn inbound(app: &helpers::App, from: &str, body: &str, sid: &str) -> reqwest::Response {
    app.post_twilio_inbound(PUBLIC, from, body, sid).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replayed_start_changes_nothing_and_a_later_stop_stays_in_force() {
    let app = spawn_app_with(&[("SMSGW_PUBLIC_URL", PUBLIC)]).await;
    app.add_school(SCHOOL, "GB").await;
    let from = "+447700900123";
    let start = "SM0000000000000000000000000000000b";
    for (body, sid) in [
        ("STOP", "SM0000000000000000000000000000000a"),
        ("START", start),
        ("STOP", "SM0000000000000000000000000000000c"),
    ] {
        assert_eq!(inbound(&app, from, body, sid).await.status(), 200, "{body}");
    }
    // The START captured on its way in, sent again: answered as Twilio expects, ignored.
    let replay = inbound(&app, from, "START", start).await;
    assert_eq!(replay.status(), 200);
    let opt_outs: i64 = app
        .db
        .scalar(
            "SELECT count(*) FROM sms_opt_outs WHERE phone = $1",
            &[&from],
        )
        .await;
    assert_eq!(opt_outs, 1, "the STOP after the START is still in force");
    let next = job("booking_reminder", SCHOOL, from, "Reminder");
    app.publish(&next).await;
    let row = app.wait_for_status(id_of(&next), "suppressed").await;
    assert_eq!(row.reason.as_deref(), Some("opted_out"));

    let without_sid = app
        .post_twilio(
            PUBLIC,
            "/webhooks/twilio/inbound",
            &[("From", from), ("Body", "START")],
            None,
        )
        .await;
    assert_eq!(
        without_sid.status(),
        400,
        "a keyword is applied only by its id"
    );
}

fn vonage_overrides(stub: &vonage_stub::VonageStub) -> Vec<(&'static str, String)> {
    vec![
        ("SMSGW_PROVIDER", "vonage".into()),
        ("VONAGE_API_KEY", vonage_stub::API_KEY.into()),
        ("VONAGE_API_SECRET", vonage_stub::API_SECRET.into()),
        ("VONAGE_FROM", "DriveSafe".into()),
        (
            "VONAGE_SIGNATURE_SECRET",
            vonage_stub::SIGNATURE_SECRET.into(),
        ),
        ("SMSGW_VONAGE_BASE_URL", stub.url.clone()),
        ("SMSGW_PUBLIC_URL", PUBLIC.into()),
    ]
}

async fn vonage_receipt(app: &helpers::App, params: &[(&str, String)], secret: &str) -> u16 {
    vonage_stub::post_signed(
        &app.http_url,
        "/webhooks/vonage/status",
        params,
        secret,
        SignatureMethod::Sha256,
        true,
    )
    .await
    .status()
    .as_u16()
}

#[tokio::test(flavor = "multi_thread")]
async fn vonage_sends_unicode_when_needed_and_takes_signed_receipts() {
    let vonage = vonage_stub::VonageStub::start().await;
    let overrides = vonage_overrides(&vonage);
    let borrowed: Vec<(&str, &str)> = overrides.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let app = spawn_app_with(&borrowed).await;
    app.add_school(SCHOOL, "GB").await;
    let plain = job(
        "booking_reminder",
        SCHOOL,
        "+447700900123",
        "Lesson at 10:00, £25",
    );
    let emoji = job(
        "booking_reminder",
        SCHOOL,
        "+447700900124",
        "See you tomorrow 👍",
    );
    vonage.status_for("447700900125", "3");
    let refused = job("booking_reminder", SCHOOL, "+447700900125", "Reminder");
    vonage.status_for("447700900126", "1");
    let throttled = job("booking_reminder", SCHOOL, "+447700900126", "Reminder");
    for job in [&plain, &emoji, &refused, &throttled] {
        app.publish(job).await;
    }
    let row = app.wait_for_status(id_of(&plain), "sent").await;
    app.wait_for_status(id_of(&emoji), "sent").await;
    let requests = vonage.requests();
    let by_to = |to: &str| {
        requests
            .iter()
            .find(|r| r.get("to") == Some(to))
            .cloned()
            .expect("request")
    };
    assert_eq!(by_to("447700900123").get("type"), Some("text"));
    assert_eq!(by_to("447700900124").get("type"), Some("unicode"));
    assert_eq!(by_to("447700900123").get("from"), Some("DriveSafe"));
    assert_eq!(
        by_to("447700900123").get("client-ref"),
        Some(id_of(&plain).to_string().as_str())
    );
    assert_eq!(
        by_to("447700900123").get("callback"),
        Some("https://smsgw.example.com/webhooks/vonage/status")
    );
    vonage.assert_no_violations();

    let failed = app.wait_for_status(id_of(&refused), "failed").await;
    assert_eq!(failed.reason.as_deref(), Some("permanent_failure"));
    assert_eq!(
        app.attempts(id_of(&refused)).await[0].error_code.as_deref(),
        Some("3")
    );
    // Its first attempt's outcome is recorded a moment after the others are done.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let throttled_first = loop {
        let first = app.attempts(id_of(&throttled)).await.into_iter().next();
        if first.as_ref().is_some_and(|a| a.outcome.is_some())
            || std::time::Instant::now() > deadline
        {
            break first;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(throttled_first.is_some_and(|a| a.outcome.as_deref() == Some("temporary_failure")));

    let sid = row.provider_message_id.expect("message-id");
    let now = time::OffsetDateTime::now_utc().unix_timestamp().to_string();
    let receipt = |status: &str, timestamp: &str| {
        vec![
            ("msisdn", "447700900123".to_owned()),
            ("to", "DriveSafe".to_owned()),
            ("messageId", sid.clone()),
            ("status", status.to_owned()),
            ("err-code", "0".to_owned()),
            ("message-timestamp", "2026-11-25 10:00:00".to_owned()),
            ("timestamp", timestamp.to_owned()),
            ("nonce", "abc".to_owned()),
        ]
    };
    assert_eq!(
        vonage_receipt(&app, &receipt("delivered", &now), "wrong-secret").await,
        403
    );
    assert_eq!(
        vonage_receipt(
            &app,
            &receipt("delivered", "1000000000"),
            vonage_stub::SIGNATURE_SECRET
        )
        .await,
        403,
        "stale"
    );
    assert_eq!(
        app.message(id_of(&plain)).await.expect("row").status,
        "sent"
    );
    assert_eq!(
        vonage_receipt(
            &app,
            &receipt("delivered", &now),
            vonage_stub::SIGNATURE_SECRET
        )
        .await,
        204
    );
    assert_eq!(
        vonage_receipt(
            &app,
            &receipt("failed", &now),
            vonage_stub::SIGNATURE_SECRET
        )
        .await,
        204
    );
    let row = app.message(id_of(&plain)).await.expect("row");
    assert_eq!(row.status, "delivered", "never backwards");
}

/// What the server sent on `connection` until it closed it; `None` if it was still open
/// after `patience`.
async fn until_closed(connection: &mut TcpStream, patience: Duration) -> Option<Vec<u8>> {
    let mut received = Vec::new();
    match tokio::time::timeout(patience, connection.read_to_end(&mut received)).await {
        Ok(_) => Some(received),
        Err(_) => None,
    }
}

async fn connect(app: &helpers::App) -> TcpStream {
    TcpStream::connect(app.http_url.trim_start_matches("http://"))
        .await
        .expect("connect to the daemon's HTTP server")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_stalls_mid_request_is_cut_off_while_health_answers() {
    let app = spawn_app_with(&[("SMSGW_HTTP_HEADER_TIMEOUT", "1s")]).await;
    let mut stalled = connect(&app).await;
    stalled
        .write_all(b"GET /heal")
        .await
        .expect("half a request line");
    let started = Instant::now();

    let health = reqwest::get(format!("{}/healthz", app.http_url))
        .await
        .expect("healthz answers");
    assert_eq!(health.status(), 200);

    let sent = until_closed(&mut stalled, Duration::from_secs(5)).await;
    assert_eq!(sent, Some(Vec::new()), "closed without an answer");
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(900), "{took:?}");
    assert!(took < Duration::from_secs(4), "{took:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_keep_alive_connection_is_closed() {
    let app = spawn_app_with(&[("SMSGW_HTTP_HEADER_TIMEOUT", "1s")]).await;
    let mut idle = connect(&app).await;
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: smsgw\r\n\r\n")
        .await
        .expect("a whole request");

    let sent = until_closed(&mut idle, Duration::from_secs(5))
        .await
        .expect("closed once idle");
    let sent = String::from_utf8_lossy(&sent);
    assert!(sent.starts_with("HTTP/1.1 200"), "{sent}");
    assert!(sent.ends_with("ok\n"), "{sent}");
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_beyond_the_cap_wait_until_one_is_freed() {
    let app = spawn_app_with(&[
        ("SMSGW_HTTP_HEADER_TIMEOUT", "1s"),
        ("SMSGW_HTTP_MAX_CONNECTIONS", "2"),
    ])
    .await;
    let mut stalled = Vec::new();
    for _ in 0..2 {
        let mut connection = connect(&app).await;
        connection
            .write_all(b"GET /")
            .await
            .expect("a stalled request");
        stalled.push(connection);
    }
    let started = Instant::now();

    let health = reqwest::get(format!("{}/healthz", app.http_url))
        .await
        .expect("healthz answers once a slot is free");
    assert_eq!(health.status(), 200);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(500),
        "did not wait: {waited:?}"
    );
    assert!(waited < Duration::from_secs(5), "{waited:?}");
}

/// An app with two providers: `twilio` (the default, at the app's own stub) and `vonage`
/// (at `vonage`), which school `vonage_school` uses.
async fn twilio_and_vonage(vonage: &vonage_stub::VonageStub, vonage_school: i64) -> helpers::App {
    let twilio = helpers::TwilioStub::start().await;
    let vonage_block = format!(
        r#"
[providers.vonage]
type = "vonage"
api_key = {{ env = "TEST_VONAGE_KEY" }}
api_secret = {{ env = "TEST_VONAGE_SECRET" }}
from = "DriveSafe"
signature_secret = {{ env = "TEST_VONAGE_SIGNATURE" }}
base_url = "{}"
"#,
        vonage.url
    );
    let config = helpers::write_config(
        "twilio",
        &[
            helpers::twilio_provider_toml("twilio", twilio_stub::DEFAULT_FROM, &twilio, ""),
            vonage_block,
        ],
    );
    let mut app = spawn_app_with(&[
        ("SMSGW_CONFIG", config.as_str()),
        ("TEST_TWILIO_TOKEN", twilio_stub::AUTH_TOKEN),
        ("TEST_VONAGE_KEY", vonage_stub::API_KEY),
        ("TEST_VONAGE_SECRET", vonage_stub::API_SECRET),
        ("TEST_VONAGE_SIGNATURE", vonage_stub::SIGNATURE_SECRET),
        ("SMSGW_PUBLIC_URL", PUBLIC),
    ])
    .await;
    app.stub = twilio;
    app.add_school(SCHOOL, "GB").await;
    app.sql(&format!(
        "INSERT INTO sms_school_settings (school_id, sms_enabled, country, provider)
         VALUES ({vonage_school}, true, 'GB', 'vonage')"
    ))
    .await;
    app
}

/// A Vonage receipt for `id`, signed with Vonage's secret and fresh.
fn vonage_delivered(id: &str) -> Vec<(&'static str, String)> {
    let now = time::OffsetDateTime::now_utc().unix_timestamp().to_string();
    vec![
        ("messageId", id.to_owned()),
        ("status", "delivered".to_owned()),
        ("err-code", "0".to_owned()),
        ("timestamp", now),
        ("nonce", uuid::Uuid::new_v4().to_string()),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn a_receipt_moves_only_messages_of_the_provider_that_signed_it() {
    let vonage = vonage_stub::VonageStub::start().await;
    let app = twilio_and_vonage(&vonage, 43).await;
    let (twilio_id, twilio_sid) = sent_message(&app, "+447700900123").await;
    let by_vonage = job("booking_reminder", 43, "+447700900124", "Reminder");
    app.publish(&by_vonage).await;
    let vonage_sid = app
        .wait_for_status(id_of(&by_vonage), "sent")
        .await
        .provider_message_id
        .expect("a message-id");

    // Each provider's signed receipt names the other provider's message.
    let secret = vonage_stub::SIGNATURE_SECRET;
    assert_eq!(
        vonage_receipt(&app, &vonage_delivered(&twilio_sid), secret).await,
        204
    );
    assert_eq!(status(&app, &vonage_sid, "delivered").await, 204);
    assert_eq!(app.message(twilio_id).await.expect("row").status, "sent");
    assert_eq!(
        app.message(id_of(&by_vonage)).await.expect("row").status,
        "sent"
    );

    // A receipt that waits for its message's record: the same rule when it lands.
    app.stub.script([Reply::Slow(Duration::from_millis(1500))]);
    let slow = job("booking_reminder", SCHOOL, "+447700900125", "Reminder");
    app.publish(&slow).await;
    let slow_sid = loop {
        if let Some(sid) = app.stub.last_sid().filter(|sid| *sid != twilio_sid) {
            break sid;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(
        vonage_receipt(&app, &vonage_delivered(&slow_sid), secret).await,
        204
    );
    app.wait_for_status(id_of(&slow), "sent").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(app.message(id_of(&slow)).await.expect("row").status, "sent");

    // Signed by their own provider, they apply.
    assert_eq!(
        vonage_receipt(&app, &vonage_delivered(&vonage_sid), secret).await,
        204
    );
    assert_eq!(status(&app, &twilio_sid, "delivered").await, 204);
    assert_eq!(
        app.message(twilio_id).await.expect("row").status,
        "delivered"
    );
    assert_eq!(
        app.message(id_of(&by_vonage)).await.expect("row").status,
        "delivered"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_vonage_receipt_replayed_within_its_window_changes_nothing() {
    let vonage = vonage_stub::VonageStub::start().await;
    let overrides = vonage_overrides(&vonage);
    let borrowed: Vec<(&str, &str)> = overrides.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let app = spawn_app_with(&borrowed).await;
    app.add_school(SCHOOL, "GB").await;
    let sent = job("booking_reminder", SCHOOL, "+447700900123", "Reminder");
    app.publish(&sent).await;
    let sid = app
        .wait_for_status(id_of(&sent), "sent")
        .await
        .provider_message_id
        .expect("a message-id");
    let receipt = vonage_delivered(&sid);
    let secret = vonage_stub::SIGNATURE_SECRET;
    assert_eq!(vonage_receipt(&app, &receipt, secret).await, 204);
    assert_eq!(vonage_receipt(&app, &receipt, secret).await, 204);
    let kept: i64 = app
        .db
        .scalar("SELECT count(*) FROM sms_receipts", &[])
        .await;
    assert_eq!(kept, 1, "the replay was answered and not applied");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_whose_receipt_never_comes_is_given_up_and_a_late_receipt_still_applies() {
    let app = spawn_app_with(&[
        ("SMSGW_PUBLIC_URL", PUBLIC),
        ("SMSGW_RECEIPT_TIMEOUT", "2s"),
    ])
    .await;
    app.add_school(SCHOOL, "GB").await;
    let mut tap = EventTap::bind(&app.env.amqp_url, "*.undelivered").await;
    let (silent, silent_sid) = sent_message(&app, "+447700900701").await;
    let (answered, answered_sid) = sent_message(&app, "+447700900702").await;
    assert_eq!(status(&app, &answered_sid, "delivered").await, 204);

    let given_up = app.wait_for_status(silent, "undelivered").await;
    assert_eq!(given_up.reason.as_deref(), Some("no_receipt"));
    let events = tap.until(|e| e.iter().any(|e| e.message() == silent)).await;
    let event = events
        .iter()
        .find(|e| e.message() == silent)
        .expect("its event");
    assert_eq!(event.body["reason"], "no_receipt");
    assert_eq!(event.body["previous_status"], "sent");
    assert_eq!(
        app.message(answered).await.expect("row").status,
        "delivered"
    );
    assert!(
        app.metrics()
            .await
            .contains("smsgw_receipt_timeouts_total 1"),
        "counted once"
    );

    // The carrier's word, however late, is what happened.
    assert_eq!(status(&app, &silent_sid, "delivered").await, 204);
    let row = app.message(silent).await.expect("row");
    assert_eq!((row.status.as_str(), row.reason), ("delivered", None));
}

#[tokio::test(flavor = "multi_thread")]
async fn without_receipts_to_wait_for_a_sent_message_stays_sent() {
    // No public URL: the provider is never told where to send receipts.
    let app = spawn_app_with(&[("SMSGW_RECEIPT_TIMEOUT", "1s")]).await;
    app.add_school(SCHOOL, "GB").await;
    let (id, _) = sent_message(&app, "+447700900703").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(app.message(id).await.expect("row").status, "sent");
}
