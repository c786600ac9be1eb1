//! Quiet hours and default expiry (contract section 11), end to end against the real
//! RabbitMQ and PostgreSQL, Twilio at the local stub. The window rule itself, with the
//! nights the clocks move, is unit-tested in `policy::quiet`.

mod helpers;

use std::time::{Duration, Instant};

use helpers::{Reply, id_of, job, spawn_app, spawn_app_with};

const SCHOOL: i64 = 42;

/// Gives the school quiet hours in UTC that began an hour ago and end `seconds` from now.
async fn quiet_until(app: &helpers::App, timezone: &str, seconds: u32) {
    app.db
        .execute(
            "UPDATE sms_school_settings
                SET timezone = $2,
                    quiet_hours_start = (now() AT TIME ZONE 'UTC')::time - interval '1 hour',
                    quiet_hours_end = (now() AT TIME ZONE 'UTC')::time
                                      + make_interval(secs => $3::int)
              WHERE school_id = $1",
            &[&SCHOOL, &timezone, &(seconds as i32)],
        )
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reminder_waits_for_the_end_of_quiet_hours_and_a_login_code_does_not() {
    let app = spawn_app().await;
    app.add_school(SCHOOL, "GB").await;
    let window_set = Instant::now();
    quiet_until(&app, "UTC", 4).await;
    // Settings reach the daemon within a second.
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let started = Instant::now();
    let reminder = job(
        "booking_reminder",
        SCHOOL,
        "+447700900123",
        "Lesson at 10:00",
    );
    let code = job("login_code", SCHOOL, "+447700900124", "Your code is 4711");
    app.publish(&reminder).await;
    app.publish(&code).await;

    app.wait_for_status(id_of(&code), "sent").await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the login code went out at once"
    );
    let held = app.wait_for_status(id_of(&reminder), "queued").await;
    assert_eq!(held.reason.as_deref(), Some("quiet_hours"));
    assert!(app.stub.requests_to("+447700900123").is_empty());

    app.wait_for_status(id_of(&reminder), "sent").await;
    // The window ends 4 s after it was set.
    assert!(
        window_set.elapsed() >= Duration::from_secs(4),
        "sent only once the window ended: {:?}",
        window_set.elapsed()
    );
    assert_eq!(app.stub.requests_to("+447700900123").len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_held_reminder_that_expires_first_is_never_sent() {
    let app = spawn_app().await;
    app.add_school(SCHOOL, "GB").await;
    quiet_until(&app, "UTC", 3_600).await;
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let mut reminder = job(
        "booking_reminder",
        SCHOOL,
        "+447700900123",
        "Lesson at 10:00",
    );
    let expires = time::OffsetDateTime::now_utc() + time::Duration::seconds(2);
    reminder["expires_at"] = serde_json::json!(
        expires
            .format(&time::format_description::well_known::Rfc3339)
            .expect("format")
    );
    app.publish(&reminder).await;

    app.wait_for_status(id_of(&reminder), "queued").await;
    app.wait_for_status(id_of(&reminder), "expired").await;
    assert!(app.stub.requests().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unknown_timezone_holds_nothing_back_and_check_lists_it() {
    let app = spawn_app().await;
    app.add_school(SCHOOL, "GB").await;
    quiet_until(&app, "Europe/Atlantis", 3_600).await;
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let reminder = job(
        "booking_reminder",
        SCHOOL,
        "+447700900123",
        "Lesson at 10:00",
    );
    app.publish(&reminder).await;
    app.wait_for_status(id_of(&reminder), "sent").await;

    let check = app.run_cli(&["check"]);
    let text = String::from_utf8_lossy(&check.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("timezones"))
        .unwrap_or_default();
    assert!(line.contains("WARN"), "{text}");
    assert!(line.contains("42 ('Europe/Atlantis')"), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_login_code_retried_past_its_default_expiry_ends_expired_without_a_call() {
    // Time enough for the first call (a provider takes no validity under a second),
    // none for the retry.
    let app = spawn_app_with(&[
        ("SMSGW_DEFAULT_EXPIRY", "login_code=3s"),
        ("SMSGW_RETRY_DELAYS", "4s"),
    ])
    .await;
    app.add_school(SCHOOL, "GB").await;
    app.stub
        .script([Reply::error(503, 20503, "Service Unavailable")]);
    let code = job("login_code", SCHOOL, "+447700900123", "Your code is 4711");
    app.publish(&code).await;

    let row = app.wait_for_status(id_of(&code), "expired").await;
    assert_eq!(row.attempts, 1);
    assert_eq!(app.stub.requests().len(), 1, "no call after the expiry");
}
