//! A cancelled lesson's reminder is withdrawn (interface section 15), end to end against
//! the real RabbitMQ and PostgreSQL, Twilio at the local stub: reminders waiting for
//! `not_before`, held by quiet hours, between retries or published after the
//! cancellation end `cancelled` and are never sent; a withdrawal racing a send never
//! loses a reminder nor sends one twice. The rules alone are unit-tested in
//! `pipeline::withdraw_tests`.

mod helpers;

use std::time::Duration;

use serde_json::{Value, json};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

use helpers::{App, Reply, id_of, job, spawn_app, spawn_app_with};
use smsgw::store::Store;

const SCHOOL: i64 = 42;
const REMINDED: &str = "+447700900123";
const STUDENT: &str = "+447700900456";

/// A job of `kind` about `booking`, to `to`.
fn about(kind: &str, school: i64, to: &str, booking: Value) -> Value {
    let mut job = job(kind, school, to, "Lesson at 10:00");
    job["context"] = json!({ "booking_id": booking });
    job
}

fn in_seconds(seconds: i64) -> String {
    (OffsetDateTime::now_utc() + time::Duration::seconds(seconds))
        .format(&Rfc3339)
        .expect("a time")
}

/// Publishes the cancellation of `booking` and waits until it is sent.
async fn cancel(app: &App, booking: Value) {
    let cancellation = about("booking_cancellation", SCHOOL, STUDENT, booking);
    app.publish(&cancellation).await;
    app.wait_for_status(id_of(&cancellation), "sent").await;
}

/// Waits until `job` is `cancelled` / `booking_cancelled`.
async fn withdrawn(app: &App, job: &Value) {
    let row = app.wait_for_status(id_of(job), "cancelled").await;
    assert_eq!(row.reason.as_deref(), Some("booking_cancelled"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reminder_waiting_for_not_before_is_withdrawn_and_never_sent() {
    let app = spawn_app().await;
    app.add_school(SCHOOL, "GB").await;
    let mut reminder = about("booking_reminder", SCHOOL, REMINDED, json!(981));
    reminder["not_before"] = json!(in_seconds(3));
    app.publish(&reminder).await;
    app.wait_for_status(id_of(&reminder), "queued").await;
    cancel(&app, json!("981")).await;
    withdrawn(&app, &reminder).await;
    // Its delayed copy comes back after not_before: acked, not sent.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        app.message(id_of(&reminder)).await.expect("row").status,
        "cancelled"
    );
    assert!(app.stub.requests_to(REMINDED).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reminder_held_by_quiet_hours_is_withdrawn_and_never_sent() {
    let app = spawn_app().await;
    app.add_school(SCHOOL, "GB").await;
    app.sql(&format!(
        "UPDATE sms_school_settings
            SET timezone = 'UTC',
                quiet_hours_start = (now() AT TIME ZONE 'UTC')::time - interval '1 hour',
                quiet_hours_end = (now() AT TIME ZONE 'UTC')::time + interval '3 seconds'
          WHERE school_id = {SCHOOL}"
    ))
    .await;
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let confirmation = about("booking_confirmation", SCHOOL, REMINDED, json!(981));
    app.publish(&confirmation).await;
    let held = app.wait_for_status(id_of(&confirmation), "queued").await;
    assert_eq!(held.reason.as_deref(), Some("quiet_hours"));
    cancel(&app, json!(981)).await;
    withdrawn(&app, &confirmation).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(app.stub.requests_to(REMINDED).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reminder_published_after_the_cancellation_is_withdrawn() {
    let app = spawn_app().await;
    app.add_school(SCHOOL, "GB").await;
    cancel(&app, json!(981)).await;
    let reminder = about("booking_reminder", SCHOOL, REMINDED, json!(981));
    app.publish(&reminder).await;
    withdrawn(&app, &reminder).await;
    assert!(app.stub.requests_to(REMINDED).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reminder_waiting_for_a_retry_is_withdrawn_and_its_retry_acked_unsent() {
    let app = spawn_app_with(&[("SMSGW_RETRY_DELAYS", "3s")]).await;
    app.add_school(SCHOOL, "GB").await;
    app.stub.script([Reply::error(500, 20500, "try later")]);
    let reminder = about("booking_reminder", SCHOOL, REMINDED, json!(981));
    app.publish(&reminder).await;
    app.wait_for_status(id_of(&reminder), "retrying").await;
    cancel(&app, json!(981)).await;
    withdrawn(&app, &reminder).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        app.stub.requests_to(REMINDED).len(),
        1,
        "the failed call only"
    );
    assert_eq!(
        app.message(id_of(&reminder)).await.expect("row").status,
        "cancelled"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sent_reminder_and_another_schools_booking_are_not_withdrawn() {
    let app = spawn_app().await;
    app.add_school(SCHOOL, "GB").await;
    app.add_school(SCHOOL + 1, "GB").await;
    let sent = about("booking_reminder", SCHOOL, REMINDED, json!(981));
    app.publish(&sent).await;
    app.wait_for_status(id_of(&sent), "sent").await;
    let mut other = about("booking_reminder", SCHOOL + 1, "+447700900789", json!(981));
    other["not_before"] = json!(in_seconds(3));
    app.publish(&other).await;
    app.wait_for_status(id_of(&other), "queued").await;
    cancel(&app, json!(981)).await;
    app.wait_for_status(id_of(&other), "sent").await;
    assert_eq!(app.message(id_of(&sent)).await.expect("row").status, "sent");
    assert_eq!(app.stub.requests_to(REMINDED).len(), 1);
}

/// Reminders due now and in a moment race their booking's cancellation: each one is
/// either sent exactly once or withdrawn and never sent, and none is left behind.
#[tokio::test(flavor = "multi_thread")]
async fn a_withdrawal_racing_sends_loses_no_reminder_and_sends_none_twice() {
    let app = spawn_app().await;
    app.add_school(SCHOOL, "GB").await;
    let mut sent = 0;
    for round in 0..3_i64 {
        let booking = json!(1000 + round);
        let reminders: Vec<Value> = (0..20)
            .map(|i| {
                let to = format!("+4477009{:02}{:03}", round, i);
                let mut reminder = about("booking_reminder", SCHOOL, &to, booking.clone());
                if i % 2 == 1 {
                    reminder["not_before"] = json!(in_seconds(1));
                }
                reminder
            })
            .collect();
        let cancellation = about("booking_cancellation", SCHOOL, STUDENT, booking);
        app.publish_all(&reminders).await;
        tokio::time::sleep(Duration::from_millis(900 + 50 * round as u64)).await;
        app.publish(&cancellation).await;
        app.wait_for_status(id_of(&cancellation), "sent").await;
        for reminder in &reminders {
            let to = reminder["to"].as_str().expect("a number");
            let status = final_status(&app, reminder).await;
            let calls = app.stub.requests_to(to).len();
            match status.as_str() {
                "sent" => assert_eq!(calls, 1, "sent exactly once"),
                "cancelled" => assert_eq!(calls, 0, "withdrawn and never sent"),
                other => panic!("a reminder ended {other}"),
            }
            sent += usize::from(status == "sent");
        }
    }
    assert!(sent < 60, "some reminders were withdrawn");
}

/// Waits until `job` is sent or cancelled; its status.
async fn final_status(app: &App, job: &Value) -> String {
    for _ in 0..400 {
        if let Some(row) = app.message(id_of(job)).await
            && matches!(row.status.as_str(), "sent" | "cancelled")
        {
            return row.status;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("reminder {} never ended", id_of(job));
}

/// The window applies to lookups at once, and retention deletes a booking past it.
#[tokio::test(flavor = "multi_thread")]
async fn a_cancelled_booking_is_forgotten_after_the_window() {
    let app = spawn_app().await;
    let store = Store::connect(&app.env.database_url, 1)
        .await
        .expect("the store");
    let hour = Duration::from_secs(3_600);
    let withdrawn = store.withdraw_booking(SCHOOL, &json!(981)).await;
    assert_eq!(withdrawn.expect("withdrawn"), [], "nothing to withdraw yet");
    let found = store.booking_withdrawn(SCHOOL, &json!("981"), hour).await;
    assert!(found.expect("looked up"), "981 and \"981\" are one booking");
    let other = store.booking_withdrawn(SCHOOL + 1, &json!(981), hour).await;
    assert!(!other.expect("looked up"), "another school's booking");
    app.sql("UPDATE sms_withdrawals SET withdrawn_at = now() - interval '2 hours'")
        .await;
    let found = store.booking_withdrawn(SCHOOL, &json!(981), hour).await;
    assert!(!found.expect("looked up"), "past the window");
    let forgotten = store.forget_withdrawals(hour, 500).await.expect("purged");
    assert_eq!(forgotten, 1);
    store.close().await;
}

/// A withdrawn message has its outcome: published again, it counts for no guard.
#[tokio::test(flavor = "multi_thread")]
async fn a_withdrawn_message_counts_against_no_budget() {
    let app = spawn_app().await;
    let id = uuid::Uuid::new_v4();
    app.db
        .execute(
            "INSERT INTO sms_messages (id, school_id, type, recipient, status, reason, segments)
             VALUES ($1, $2, 'booking_reminder', $3, 'cancelled', 'booking_cancelled', 1)",
            &[&id, &SCHOOL, &REMINDED],
        )
        .await;
    let refused: Option<String> = app
        .db
        .scalar(
            "SELECT sms_guard_admit(ARRAY[$1::uuid], ARRAY[$2::text], $3, 1, 10, false,
                                    NULL, NULL, NULL)",
            &[&id, &REMINDED, &SCHOOL],
        )
        .await;
    assert_eq!(refused, None, "admitted: nothing to count");
    let counted: i64 = app
        .db
        .scalar("SELECT count(*) FROM sms_guard_reservations", &[])
        .await;
    assert_eq!(counted, 0);
}
