//! Withdrawal through the pipeline, without services: a cancellation withdraws its
//! booking's unsent reminders and confirmations (waiting, held or between retries), and
//! those that arrive after it within the window, and nothing else.

use std::time::Duration;

use serde_json::{Value, json};
use time::OffsetDateTime;
use uuid::Uuid;

use super::{
    memory::Row,
    tests::{NUMBER, SCHOOL, World, delivery, job, retried, school},
};
use crate::{disposition::Disposition, job::JobType, school::SchoolSettings, store::Status};

/// The student's number for the cancellation itself, told apart from the reminders'.
const STUDENT: &str = "+447700900456";

fn withdrawn() -> (Status, Option<String>) {
    (Status::Cancelled, Some("booking_cancelled".into()))
}

/// A job of `kind` about `booking`, for `school`.
fn about(kind: JobType, school: i64, booking: Value) -> (Uuid, Value) {
    let (id, mut job) = job(kind);
    job["school_id"] = json!(school);
    job["context"] = json!({ "booking_id": booking, "user_id": 77 });
    (id, job)
}

/// Handles a cancellation of `booking` for the test school: it is sent.
async fn cancel(world: &World, booking: Value) {
    let (id, mut cancellation) = about(JobType::BookingCancellation, SCHOOL, booking);
    cancellation["to"] = json!(STUDENT);
    assert_eq!(
        world.handle(&delivery(&cancellation)).await,
        Disposition::Ack
    );
    assert_eq!(world.status(id).0, Status::Sent, "the cancellation is sent");
}

/// Handles a reminder of `booking` due in 2099: queued and deferred.
async fn waiting_reminder(world: &World, booking: Value) -> (Uuid, Value) {
    let (id, mut reminder) = about(JobType::BookingReminder, SCHOOL, booking);
    reminder["not_before"] = json!("2099-01-01T08:00:00Z");
    let deferred = world.handle(&delivery(&reminder)).await;
    assert!(
        matches!(deferred, Disposition::Defer { .. }),
        "{deferred:?}"
    );
    (id, reminder)
}

fn reminders_sent(world: &World) -> usize {
    world
        .twilio
        .calls()
        .iter()
        .filter(|to| *to == NUMBER)
        .count()
}

#[tokio::test]
async fn a_cancellation_withdraws_a_waiting_reminder_which_is_then_acked_unsent() {
    let world = World::new();
    let (id, reminder) = waiting_reminder(&world, json!(981)).await;
    cancel(&world, json!(981)).await;
    assert_eq!(world.status(id), withdrawn());
    let back = retried(&reminder, 0);
    assert_eq!(world.handle(&back).await, Disposition::Ack);
    assert_eq!(world.status(id), withdrawn());
    assert_eq!(reminders_sent(&world), 0);
}

#[tokio::test]
async fn a_reminder_waiting_for_a_retry_is_withdrawn_and_its_retry_acked_unsent() {
    let world = World::new();
    let (id, reminder) = waiting_reminder(&world, json!("b-981")).await;
    let retrying = Row {
        status: Status::Retrying,
        attempts: 1,
        ..world.log().row(id).expect("a row")
    };
    world.log().insert(id, retrying);
    cancel(&world, json!("b-981")).await;
    assert_eq!(world.status(id), withdrawn());
    assert_eq!(world.handle(&retried(&reminder, 1)).await, Disposition::Ack);
    assert_eq!(reminders_sent(&world), 0);
}

#[tokio::test]
async fn reminders_and_confirmations_published_after_the_cancellation_are_withdrawn() {
    let world = World::new();
    cancel(&world, json!(981)).await;
    for kind in [JobType::BookingReminder, JobType::BookingConfirmation] {
        // The number 981 and the string "981" are one booking.
        let (id, job) = about(kind, SCHOOL, json!("981"));
        assert_eq!(world.handle(&delivery(&job)).await, Disposition::Ack);
        assert_eq!(world.status(id), withdrawn(), "{kind:?}");
    }
    assert_eq!(reminders_sent(&world), 0);
}

#[tokio::test]
async fn a_reminder_published_after_the_window_is_sent() {
    let world = World::new();
    world
        .log()
        .set_now(OffsetDateTime::now_utc() - Duration::from_secs(31 * 86_400));
    cancel(&world, json!(981)).await;
    world.log().set_now(OffsetDateTime::now_utc());
    let (id, reminder) = about(JobType::BookingReminder, SCHOOL, json!(981));
    assert_eq!(world.handle(&delivery(&reminder)).await, Disposition::Ack);
    assert_eq!(world.status(id).0, Status::Sent);
}

#[tokio::test]
async fn only_the_same_schools_unsent_reminders_of_the_booking_are_withdrawn() {
    let world = World::new();
    world.log().set_school(SchoolSettings {
        school_id: SCHOOL + 1,
        ..school()
    });
    let (sent, reminder) = about(JobType::BookingReminder, SCHOOL, json!(981));
    assert_eq!(world.handle(&delivery(&reminder)).await, Disposition::Ack);
    let (other_booking, _) = waiting_reminder(&world, json!(982)).await;
    let (change, mut job) = about(JobType::BookingChange, SCHOOL, json!(981));
    job["not_before"] = json!("2099-01-01T08:00:00Z");
    world.handle(&delivery(&job)).await;
    let (other_school, mut job) = about(JobType::BookingReminder, SCHOOL + 1, json!(981));
    job["not_before"] = json!("2099-01-01T08:00:00Z");
    world.handle(&delivery(&job)).await;
    cancel(&world, json!(981)).await;
    assert_eq!(world.status(sent).0, Status::Sent, "already sent");
    for id in [other_booking, change, other_school] {
        assert_eq!(
            world.status(id),
            (Status::Queued, Some("not_before".into()))
        );
    }
}

#[tokio::test]
async fn a_reminder_being_sent_is_not_withdrawn() {
    let world = World::new();
    let (id, _) = waiting_reminder(&world, json!(981)).await;
    let mut row = world.log().row(id).expect("a row");
    row.status = Status::Sending;
    world.log().insert(id, row);
    cancel(&world, json!(981)).await;
    assert_eq!(world.status(id).0, Status::Sending);
}

#[tokio::test]
async fn a_booking_id_neither_string_nor_number_withdraws_nothing() {
    let world = World::new();
    let (id, _) = waiting_reminder(&world, json!({"id": 981})).await;
    let (numbered, _) = waiting_reminder(&world, json!(981)).await;
    cancel(&world, json!({"id": 981})).await;
    cancel(&world, json!([981])).await;
    assert_eq!(world.status(id).0, Status::Queued);
    assert_eq!(world.status(numbered).0, Status::Queued);
}
