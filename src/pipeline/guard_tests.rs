//! The guards against fraud and spend through the pipeline, without services: the
//! in-memory log counts as `sms_guard_admit_many` does, on a clock the tests set, so the
//! windows', days' and months' edges are given instants.

use serde_json::json;
use time::{OffsetDateTime, macros::datetime};
use uuid::Uuid;

use super::tests::{NUMBER, SCHOOL, World, delivery, job, retried, school, settings, smsgw_job};
use crate::{
    broker::Delivery,
    disposition::Disposition,
    job::{JobType, Lane},
    phone::Country,
    school::{Budget, Destinations, SchoolSettings},
    store::Status,
};

const NOON: OffsetDateTime = datetime!(2026-12-07 12:00 UTC);
const JAMAICA: &str = "+18765551234";

/// Handles a new job of `kind` to `to`; its id and how it ended.
async fn send(world: &World, kind: JobType, to: &str) -> (Uuid, Status, Option<String>) {
    let (id, mut job) = job(kind);
    job["to"] = json!(to);
    assert_eq!(world.handle(&delivery(&job)).await, Disposition::Ack);
    let (status, reason) = world.status(id);
    (id, status, reason)
}

fn suppressed(reason: &str) -> (Status, Option<String>) {
    (Status::Suppressed, Some(reason.to_owned()))
}

fn budgeted(segments: u32) -> SchoolSettings {
    SchoolSettings {
        budget: Budget::Segments(segments),
        ..school()
    }
}

/// `smsgw_suppressed_total` of `reason`, as `/metrics` shows it.
fn suppressed_total(world: &World, reason: &str) -> String {
    let text = world.pipeline.metrics.render();
    let series = format!("smsgw_suppressed_total{{reason=\"{reason}\"}} ");
    text.lines()
        .find_map(|line| line.strip_prefix(&series))
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn the_fifth_login_code_in_the_window_goes_and_the_sixth_does_not() {
    let world = World::new();
    world.log().set_now(NOON);
    for _ in 0..5 {
        assert_eq!(
            send(&world, JobType::LoginCode, NUMBER).await.1,
            Status::Sent
        );
    }
    let (_, status, reason) = send(&world, JobType::LoginCode, NUMBER).await;
    assert_eq!((status, reason), suppressed("recipient_limit"));
    assert_eq!(world.twilio.calls().len(), 5);
    assert_eq!(suppressed_total(&world, "recipient_limit"), "1");
    let other = send(&world, JobType::LoginCode, "+447700900999").await;
    assert_eq!(other.1, Status::Sent, "another number has its own count");
    let reminder = send(&world, JobType::BookingReminder, NUMBER).await;
    assert_eq!(reminder.1, Status::Sent, "only login codes are limited");

    // The window slides: an hour after the first, one more may go.
    world.log().set_now(NOON + time::Duration::minutes(59));
    let early = send(&world, JobType::LoginCode, NUMBER).await;
    assert_eq!((early.1, early.2), suppressed("recipient_limit"));
    world.log().set_now(NOON + time::Duration::hours(1));
    assert_eq!(
        send(&world, JobType::LoginCode, NUMBER).await.1,
        Status::Sent
    );
}

#[tokio::test]
async fn a_login_code_tried_again_is_counted_once() {
    let mut guarded = settings();
    guarded.guards.login_code_limit = crate::config::RateWindow::parse("1/1h").expect("1/1h");
    let world = World::with(guarded, school());
    let (id, job) = job(JobType::LoginCode);
    world.twilio.answer([Err(super::tests::unavailable())]);
    assert!(matches!(
        world.handle(&delivery(&job)).await,
        Disposition::Retry { .. }
    ));
    assert_eq!(world.handle(&retried(&job, 1)).await, Disposition::Ack);
    assert_eq!(
        world.status(id).0,
        Status::Sent,
        "its own reservation lets it pass"
    );
    let (_, status, reason) = send(&world, JobType::LoginCode, NUMBER).await;
    assert_eq!((status, reason), suppressed("recipient_limit"));
}

#[tokio::test]
async fn a_refused_login_code_published_again_is_not_counted() {
    let mut guarded = settings();
    guarded.guards.login_code_limit = crate::config::RateWindow::parse("1/1h").expect("1/1h");
    let world = World::with(guarded, school());
    world.log().set_now(NOON);
    assert_eq!(
        send(&world, JobType::LoginCode, NUMBER).await.1,
        Status::Sent
    );
    let (refused, again) = job(JobType::LoginCode);
    assert_eq!(world.handle(&delivery(&again)).await, Disposition::Ack);
    assert_eq!(world.status(refused), suppressed("recipient_limit"));

    // An hour later the web app publishes the same job again: acked as done, not counted.
    world.log().set_now(NOON + time::Duration::hours(1));
    assert_eq!(world.handle(&delivery(&again)).await, Disposition::Ack);
    assert_eq!(world.status(refused), suppressed("recipient_limit"));
    let next = send(&world, JobType::LoginCode, NUMBER).await;
    assert_eq!(
        next.1,
        Status::Sent,
        "the window's one code is still there to send"
    );
    assert_eq!(world.twilio.calls().len(), 2);
}

#[tokio::test]
async fn a_number_abroad_goes_only_where_the_school_or_the_account_allows() {
    let world = World::new();
    let refused = send(&world, JobType::BookingChange, JAMAICA).await;
    assert_eq!((refused.1, refused.2), suppressed("country_not_allowed"));
    assert!(world.twilio.calls().is_empty());
    assert_eq!(suppressed_total(&world, "country_not_allowed"), "1");

    let mut account = settings();
    account.guards.allowed_countries = vec![Country::parse("JM").expect("JM")];
    let world = World::with(account, school());
    assert_eq!(
        send(&world, JobType::BookingChange, JAMAICA).await.1,
        Status::Sent
    );

    let listed = SchoolSettings {
        destinations: Destinations::Only(vec![Country::parse("JM").expect("JM")]),
        ..school()
    };
    let world = World::with(settings(), listed);
    assert_eq!(
        send(&world, JobType::BookingChange, JAMAICA).await.1,
        Status::Sent
    );
    let home = send(&world, JobType::BookingChange, NUMBER).await;
    assert_eq!((home.1, home.2), suppressed("country_not_allowed"));
}

#[tokio::test]
async fn the_international_cap_holds_for_the_utc_day_and_opens_at_midnight() {
    let mut capped = settings();
    capped.guards.allowed_countries = vec![Country::parse("JM").expect("JM")];
    capped.guards.international_daily_limit = 2;
    let world = World::with(capped, school());
    world.log().set_now(datetime!(2026-12-07 23:59:58 UTC));
    for _ in 0..2 {
        assert_eq!(
            send(&world, JobType::BookingChange, JAMAICA).await.1,
            Status::Sent
        );
    }
    world.log().set_now(datetime!(2026-12-07 23:59:59.999 UTC));
    let third = send(&world, JobType::BookingChange, JAMAICA).await;
    assert_eq!((third.1, third.2), suppressed("international_limit"));
    let domestic = send(&world, JobType::BookingChange, NUMBER).await;
    assert_eq!(domestic.1, Status::Sent, "texts at home are not counted");
    world.log().set_now(datetime!(2026-12-08 00:00 UTC));
    assert_eq!(
        send(&world, JobType::BookingChange, JAMAICA).await.1,
        Status::Sent
    );
    assert_eq!(world.twilio.calls().len(), 4);
}

#[tokio::test]
async fn a_budgets_last_segment_goes_and_the_next_message_does_not() {
    let world = World::with(settings(), budgeted(5));
    world.log().set_now(NOON);
    for _ in 0..5 {
        let (_, status, _) = send(&world, JobType::BookingReminder, NUMBER).await;
        assert_eq!(status, Status::Sent);
    }
    let over = send(&world, JobType::BookingReminder, NUMBER).await;
    assert_eq!((over.1, over.2), suppressed("budget_exhausted"));
    let code = send(&world, JobType::LoginCode, NUMBER).await;
    assert_eq!(code.1, Status::Sent, "an exempt type always goes");
    let events: Vec<(&str, u64)> = world
        .log()
        .budget_events()
        .iter()
        .map(|e| (e.name, e.used))
        .collect();
    assert_eq!(events, [("budget.warning", 4), ("budget.exhausted", 5)]);
    assert_eq!(
        world.log().budget_used(SCHOOL, NOON),
        6,
        "the exempt one counts"
    );
    assert_eq!(suppressed_total(&world, "budget_exhausted"), "1");

    // A new UTC month, a new budget.
    world.log().set_now(datetime!(2027-01-01 00:00 UTC));
    assert_eq!(
        send(&world, JobType::BookingReminder, NUMBER).await.1,
        Status::Sent
    );
}

#[tokio::test]
async fn a_budget_set_in_the_middle_of_a_month_starts_from_what_was_used() {
    let world = World::new();
    world.log().set_now(NOON);
    for _ in 0..3 {
        assert_eq!(
            send(&world, JobType::BookingReminder, NUMBER).await.1,
            Status::Sent
        );
    }
    world.log().set_school(budgeted(4));
    assert_eq!(
        send(&world, JobType::BookingReminder, NUMBER).await.1,
        Status::Sent
    );
    let over = send(&world, JobType::BookingReminder, NUMBER).await;
    assert_eq!((over.1, over.2), suppressed("budget_exhausted"));
    assert_eq!(world.log().budget_used(SCHOOL, NOON), 4);
}

#[tokio::test]
async fn a_message_refused_by_its_budget_sets_off_one_exhausted_event() {
    let world = World::with(settings(), budgeted(1));
    let (_, mut long) = job(JobType::BookingReminder);
    long["body"] = json!("x".repeat(161));
    assert_eq!(world.handle(&delivery(&long)).await, Disposition::Ack);
    assert!(
        world.twilio.calls().is_empty(),
        "two segments do not fit one"
    );
    let fits = send(&world, JobType::BookingReminder, NUMBER).await;
    assert_eq!(fits.1, Status::Sent, "one segment does");
    let over = send(&world, JobType::BookingReminder, NUMBER).await;
    assert_eq!((over.1, over.2), suppressed("budget_exhausted"));
    let events: Vec<(&str, u64)> = world
        .log()
        .budget_events()
        .iter()
        .map(|e| (e.name, e.used))
        .collect();
    // Each once: exhausted at the first refusal, the warning when use reached 80%.
    assert_eq!(events, [("budget.exhausted", 0), ("budget.warning", 1)]);
}

/// An announcement of the test school to `numbers`: its id and its delivery.
fn announcement(numbers: &[&str]) -> (Uuid, Delivery) {
    let id = Uuid::new_v4();
    let recipients: Vec<_> = numbers.iter().map(|to| json!({ "to": to })).collect();
    let job = json!({
        "id": id, "type": "announcement", "school_id": SCHOOL, "body": "Closed on Friday",
        "recipients": recipients,
    });
    (
        id,
        Delivery::fresh(Lane::Bulk, job.to_string().into_bytes()),
    )
}

#[tokio::test]
async fn an_announcement_one_segment_too_big_is_refused_whole() {
    let world = World::with(settings(), budgeted(2));
    let (_, whole) = announcement(&["+447700900001", "+447700900002", "+447700900003"]);
    assert_eq!(
        world.handle(&whole).await,
        Disposition::Ack,
        "nothing fanned out"
    );
    let rows = world.log().rows();
    assert_eq!(rows.len(), 3);
    assert!(rows.iter().all(|(_, row)| row.status == Status::Suppressed
        && row.reason.as_deref() == Some("budget_exhausted")));
    assert_eq!(suppressed_total(&world, "budget_exhausted"), "3");
    assert_eq!(
        world.log().budget_used(SCHOOL, OffsetDateTime::now_utc()),
        0
    );
}

#[tokio::test]
async fn an_announcement_that_fits_reserves_its_recipients_once() {
    let world = World::with(settings(), budgeted(2));
    let (id, whole) = announcement(&["+447700900001", "+447700900002", "+447700900001"]);
    let Disposition::FanOut { messages, .. } = world.handle(&whole).await else {
        panic!("fanned out");
    };
    let now = OffsetDateTime::now_utc();
    assert_eq!(
        world.log().budget_used(SCHOOL, now),
        2,
        "reserved at fan-out"
    );
    for (_, bytes) in &messages {
        let one = Delivery {
            bulk_id: Some(id),
            ..Delivery::fresh(Lane::Bulk, bytes.clone())
        };
        assert_eq!(world.handle(&one).await, Disposition::Ack);
        assert_eq!(world.status(smsgw_job(bytes).id).0, Status::Sent);
    }
    assert_eq!(world.log().budget_used(SCHOOL, now), 2, "not counted again");
    assert!(matches!(
        world.handle(&whole).await,
        Disposition::FanOut { .. }
    ));
    assert_eq!(
        world.log().budget_used(SCHOOL, now),
        2,
        "redelivered: the same"
    );
}

#[tokio::test]
async fn a_guard_setting_that_cannot_be_read_refuses_the_schools_messages() {
    for (school, reason) in [
        (
            SchoolSettings {
                destinations: Destinations::Invalid("UK".into()),
                ..school()
            },
            "invalid_allowed_countries",
        ),
        (
            SchoolSettings {
                budget: Budget::Invalid(-1),
                ..school()
            },
            "invalid_budget",
        ),
    ] {
        let world = World::with(settings(), school);
        let (_, status, got) = send(&world, JobType::LoginCode, NUMBER).await;
        assert_eq!((status, got), suppressed(reason));
        assert!(world.twilio.calls().is_empty());
    }
}

#[tokio::test]
async fn a_domestic_text_without_a_budget_costs_no_statement_of_the_guards() {
    let world = World::new();
    let before = world.log().statements();
    send(&world, JobType::BookingReminder, NUMBER).await;
    let plain = world.log().statements() - before;
    let before = world.log().statements();
    send(&world, JobType::LoginCode, "+447700900555").await;
    let guarded = world.log().statements() - before;
    assert_eq!(
        guarded,
        plain + 1,
        "a login code is counted in one statement"
    );
}
