//! Pacing and fairness: the rate limits, a 429 that pauses a provider for everyone, and
//! big announcements fanned out a chunk at a time so another school's gets its turn.

mod helpers;

use std::time::{Duration, Instant};

use helpers::{Reply, TwilioStub, id_of, spawn_app_with, twilio_stub};
use serde_json::json;
use uuid::Uuid;

const SCHOOL: i64 = 42;
const OTHER_SCHOOL: i64 = 43;

/// The most requests the stub saw in any one-second window, after the first: that one
/// opened the connection, so it arrived later after leaving the gate than the others,
/// by as long as connecting took on a machine that may be busy with other tests.
///
/// The stub notes when a request reached its handler, in a test process that shares
/// the machine with the rest of the suite, so an arrival can be late by tens of
/// milliseconds: the windows here are 950 ms, 50 ms for that jitter. (`make bench`
/// checks whole seconds, running alone.)
fn busiest_second(stub: &TwilioStub) -> usize {
    helpers::busiest_window(
        stub.requests().iter().skip(1).map(|r| r.at).collect(),
        Duration::from_millis(950),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn the_rate_limit_holds_every_second_to_at_most_the_rate() {
    // A low rate: calls 200 ms apart, so that a test machine busy with other tests does
    // not bunch the stub's arrival times up (`make bench` measures 100/s, alone).
    let app = spawn_app_with(&[("SMSGW_RATE_LIMIT", "5")]).await;
    app.add_school(SCHOOL, "GB").await;
    let ids = app.publish_many(15, "booking_reminder", SCHOOL).await;

    assert_eq!(app.wait_all(&ids, "sent", Duration::from_secs(30)).await, 0);
    assert_eq!(app.stub.requests().len(), 15);
    let busiest = busiest_second(&app.stub);
    assert!(
        busiest <= 5,
        "{busiest} calls in one second at a limit of 5"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rate_clock_stepped_an_hour_ahead_sends_again_within_seconds() {
    let app = spawn_app_with(&[("SMSGW_RATE_LIMIT", "5")]).await;
    app.add_school(SCHOOL, "GB").await;
    let first = app.publish_many(1, "booking_reminder", SCHOOL).await;
    assert_eq!(
        app.wait_all(&first, "sent", Duration::from_secs(30)).await,
        0
    );

    // As after a failover to a database whose clock is an hour behind the old one's.
    app.sql("UPDATE sms_rate_clocks SET next_slot = now() + interval '1 hour'")
        .await;
    let ids = app.publish_many(3, "booking_reminder", SCHOOL).await;
    assert_eq!(
        app.wait_all(&ids, "sent", Duration::from_secs(10)).await,
        0,
        "still waiting for the stepped clock"
    );
    let ahead: f64 = app
        .db
        .scalar(
            "SELECT extract(epoch FROM max(next_slot) - now())::float8 FROM sms_rate_clocks",
            &[],
        )
        .await;
    assert!(ahead < 60.0, "the clock is still {ahead} s ahead");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_providers_own_rate_in_the_config_file_paces_it() {
    let stub = TwilioStub::start().await;
    let path = helpers::write_config(
        "paced",
        &[helpers::twilio_provider_toml(
            "paced",
            "+15005550006",
            &stub,
            "rate = 4",
        )],
    );
    let mut app = spawn_app_with(&[
        ("SMSGW_CONFIG", path.as_str()),
        ("TEST_TWILIO_TOKEN", twilio_stub::AUTH_TOKEN),
    ])
    .await;
    app.stub = stub;
    app.add_school(SCHOOL, "GB").await;
    let ids = app.publish_many(10, "booking_reminder", SCHOOL).await;

    assert_eq!(app.wait_all(&ids, "sent", Duration::from_secs(30)).await, 0);
    let busiest = busiest_second(&app.stub);
    assert!(busiest <= 4, "{busiest} calls in one second at a rate of 4");
}

#[tokio::test(flavor = "multi_thread")]
async fn no_more_calls_are_in_flight_to_a_provider_than_its_concurrency() {
    // A slow provider and many more deliveries in flight than call slots: the rest wait
    // for a slot (and so no more connections are opened than there are slots).
    let app = spawn_app_with(&[
        ("SMSGW_PROVIDER_CONCURRENCY", "3"),
        ("SMSGW_DEFAULT_CONCURRENCY", "32"),
    ])
    .await;
    app.stub
        .reply_always(Reply::Slow(Duration::from_millis(150)));
    app.add_school(SCHOOL, "GB").await;
    let ids = app.publish_many(24, "booking_reminder", SCHOOL).await;

    assert_eq!(app.wait_all(&ids, "sent", Duration::from_secs(30)).await, 0);
    assert_eq!(app.stub.requests().len(), 24);
    assert_eq!(app.stub.most_open(), 3, "calls in flight at once");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_429_pauses_the_provider_for_every_message() {
    let app = spawn_app_with(&[]).await;
    app.add_school(SCHOOL, "GB").await;
    app.stub.script([Reply::Error {
        status: 429,
        code: 20429,
        message: "Too Many Requests".into(),
        retry_after: Some("2".into()),
    }]);
    let first = app.publish_many(1, "booking_reminder", SCHOOL).await;
    let started = Instant::now();
    while app.stub.requests().is_empty() && started.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let throttled_at = app.stub.requests()[0].at;
    // Once the refused attempt is recorded, the daemon has read the answer (and paused).
    let deadline = Instant::now() + Duration::from_secs(10);
    while app.attempts(first[0]).await.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Published after the 429: none of these may reach the provider during the pause.
    let others = app.publish_many(5, "booking_reminder", SCHOOL).await;

    let all: Vec<Uuid> = first.iter().chain(&others).copied().collect();
    assert_eq!(app.wait_all(&all, "sent", Duration::from_secs(30)).await, 0);
    let requests = app.stub.requests();
    assert_eq!(requests.len(), 7, "one refused call and six sends");
    for request in &requests[1..] {
        let after = request.at.duration_since(throttled_at);
        assert!(
            after >= Duration::from_millis(1_900),
            "called {after:?} after a 429 that asked for 2 s"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_small_announcement_is_not_stuck_behind_a_big_one() {
    let app = spawn_app_with(&[
        ("SMSGW_FANOUT_CHUNK", "10"),
        ("SMSGW_BULK_CONCURRENCY", "4"),
        ("SMSGW_RATE_LIMIT", "100"),
    ])
    .await;
    app.add_school(SCHOOL, "GB").await;
    app.add_school(OTHER_SCHOOL, "GB").await;
    let big = json!({
        "id": Uuid::new_v4(),
        "type": "announcement",
        "school_id": SCHOOL,
        "recipients": (0..200).map(|i| json!({"to": format!("+4477009{i:05}")})).collect::<Vec<_>>(),
        "body": "The office is closed on Friday."
    });
    // In the range kept for drama (07700 900xxx): the rest of 07700 is Jersey's.
    let small_numbers: Vec<String> = (0..3)
        .map(|i| format!("+447700900{:03}", 900 + i))
        .collect();
    let small = json!({
        "id": Uuid::new_v4(),
        "type": "announcement",
        "school_id": OTHER_SCHOOL,
        "recipients": small_numbers.iter().map(|to| json!({"to": to})).collect::<Vec<_>>(),
        "body": "Lessons resume on Monday."
    });
    app.publish(&big).await;
    // The big one is under way (paced, so that it takes a while) when the small one comes.
    let started = Instant::now();
    while app.stub.requests().is_empty() && started.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    app.publish(&small).await;

    let ids: Vec<Uuid> = (0..200)
        .map(|i| Uuid::new_v5(&id_of(&big), format!("+4477009{i:05}").as_bytes()))
        .chain(
            small_numbers
                .iter()
                .map(|to| Uuid::new_v5(&id_of(&small), to.as_bytes())),
        )
        .collect();
    assert_eq!(app.wait_all(&ids, "sent", Duration::from_secs(60)).await, 0);
    let order: Vec<String> = app
        .stub
        .requests()
        .iter()
        .filter_map(|r| r.get("To").map(str::to_owned))
        .collect();
    assert_eq!(order.len(), 203, "every recipient texted once");
    let small_done = small_numbers
        .iter()
        .filter_map(|to| order.iter().position(|t| t == to))
        .max()
        .expect("the small announcement was sent");
    // Fanned out 10 at a time, the big one is at most a few chunks ahead; all at once,
    // all 200 of its texts would go first.
    assert!(
        small_done < 60,
        "the small announcement finished after {small_done} texts of the big one"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_big_announcement_is_in_the_log_before_its_first_text() {
    // Fanned out 5 at a time and paced, the sending takes seconds; the log has every
    // recipient from the start.
    let app = spawn_app_with(&[("SMSGW_FANOUT_CHUNK", "5"), ("SMSGW_RATE_LIMIT", "20")]).await;
    app.add_school(SCHOOL, "GB").await;
    let numbers: Vec<String> = (0..40).map(|i| format!("+4477009{i:05}")).collect();
    let opted_out = numbers[17].clone();
    app.sql(&format!(
        "INSERT INTO sms_opt_outs (school_id, phone, source) VALUES (NULL, '{opted_out}', 'web')"
    ))
    .await;
    let mut recipients: Vec<serde_json::Value> = numbers
        .iter()
        .enumerate()
        .map(|(i, to)| json!({"to": to, "ref": format!("user-{i}")}))
        .collect();
    // The same person twice (once as a national number), and a number that is none.
    recipients.insert(3, json!({"to": "07700 900000", "ref": "again"}));
    recipients.push(json!({"to": "not a number"}));
    let bulk = json!({
        "id": Uuid::new_v4(),
        "type": "announcement",
        "school_id": SCHOOL,
        "recipients": recipients,
        "body": "The office is closed on Friday."
    });
    let bulk_id = id_of(&bulk);
    app.publish(&bulk).await;

    let started = Instant::now();
    while app.stub.requests().is_empty() && started.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let rows: i64 = app
        .db
        .scalar(
            "SELECT count(*) FROM sms_messages WHERE bulk_id = $1",
            &[&bulk_id],
        )
        .await;
    assert_eq!(
        rows, 41,
        "every recipient (once) has its row by the first text"
    );
    let queued: i64 = app
        .db
        .scalar(
            "SELECT count(*) FROM sms_messages WHERE bulk_id = $1 AND status = 'queued'",
            &[&bulk_id],
        )
        .await;
    assert!(queued >= 30, "only {queued} still queued at the first text");
    let first = app
        .message(Uuid::new_v5(&bulk_id, numbers[39].as_bytes()))
        .await
        .expect("the last recipient's row");
    assert_eq!(first.context, Some(json!({"ref": "user-39"})));

    let sent: Vec<Uuid> = numbers
        .iter()
        .filter(|to| **to != opted_out)
        .map(|to| Uuid::new_v5(&bulk_id, to.as_bytes()))
        .collect();
    assert_eq!(
        app.wait_all(&sent, "sent", Duration::from_secs(30)).await,
        0
    );
    let suppressed = app
        .wait_for_status(Uuid::new_v5(&bulk_id, opted_out.as_bytes()), "suppressed")
        .await;
    assert_eq!(suppressed.reason.as_deref(), Some("opted_out"));
    let invalid = app
        .wait_for_status(Uuid::new_v5(&bulk_id, b"not a number"), "failed")
        .await;
    assert_eq!(invalid.recipient, "not a number");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let requests = app.stub.requests();
    assert_eq!(requests.len(), 39, "each reachable recipient texted once");
    for to in numbers.iter().filter(|to| **to != opted_out) {
        assert_eq!(app.stub.requests_to(to).len(), 1, "{to}");
    }
}
