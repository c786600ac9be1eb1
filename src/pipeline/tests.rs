//! Every outcome of the pipeline, decided without RabbitMQ or PostgreSQL: an in-memory
//! message log and scripted providers stand in for them.

use std::{sync::Arc, time::Duration};

use serde_json::json;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{Pipeline, PipelineSettings, UnknownOutcome, memory::MemoryLog, memory::Row};
use crate::{
    broker::Delivery,
    cache::PolicyCache,
    disposition::{DeadReason, Disposition},
    health::Health,
    job::{JobType, Lane},
    metrics::Metrics,
    provider::{Accepted, Gateways, Lookup, ProviderError, scripted::Scripted},
    school::SchoolSettings,
    store::{AttemptOutcome, Status},
};

pub(super) const SCHOOL: i64 = 42;
pub(super) const NUMBER: &str = "+447700900123";

pub(super) fn school() -> SchoolSettings {
    SchoolSettings::example(SCHOOL)
}

pub(super) fn settings() -> PipelineSettings {
    PipelineSettings {
        fanout_chunk: 2,
        ..PipelineSettings::example()
    }
}

/// A pipeline over an in-memory log, with a primary gateway `twilio` and a second one
/// `vonage` that schools may name as their fallback.
pub(super) struct World {
    pub(super) pipeline: Pipeline<MemoryLog>,
    pub(super) twilio: Scripted,
    vonage: Scripted,
    abandon: CancellationToken,
    health: Arc<Health>,
}

impl World {
    pub(super) fn new() -> World {
        World::with(settings(), school())
    }

    pub(super) fn with(settings: PipelineSettings, school: SchoolSettings) -> World {
        let (twilio, vonage) = (Scripted::default(), Scripted::default());
        let gateways = Gateways::scripted(&[("twilio", &twilio), ("vonage", &vonage)], 2);
        let log = MemoryLog::default();
        log.set_school(school);
        let health = Arc::new(Health::default());
        let pipeline = Pipeline::new(
            log,
            PolicyCache::default(),
            Arc::new(gateways),
            settings,
            health.clone(),
            Arc::new(Metrics::new()),
        );
        World {
            pipeline,
            twilio,
            vonage,
            abandon: CancellationToken::new(),
            health,
        }
    }

    /// Two outage-like failures in a row open `twilio`'s circuit (its threshold here).
    async fn open_twilio_circuit(&self) {
        self.twilio.answer([Err(unavailable()), Err(unavailable())]);
        for _ in 0..2 {
            let (_, job) = job(JobType::BookingReminder);
            self.handle(&delivery(&job)).await;
        }
    }

    pub(super) fn log(&self) -> &MemoryLog {
        &self.pipeline.log
    }

    pub(super) async fn handle(&self, delivery: &Delivery) -> Disposition {
        self.pipeline.handle(delivery, &self.abandon).await
    }

    fn row(&self, id: Uuid) -> Row {
        self.log().row(id).expect("the message has a row")
    }

    pub(super) fn status(&self, id: Uuid) -> (Status, Option<String>) {
        let row = self.row(id);
        (row.status, row.reason)
    }
}

pub(super) fn job(kind: JobType) -> (Uuid, serde_json::Value) {
    let id = Uuid::new_v4();
    let job = json!({
        "id": id, "type": kind.as_str(), "school_id": SCHOOL, "to": NUMBER,
        "body": "Your lesson is at 10:00 tomorrow.",
    });
    (id, job)
}

pub(super) fn delivery(job: &serde_json::Value) -> Delivery {
    Delivery::fresh(Lane::Default, job.to_string().into_bytes())
}

/// Handles `job` and checks it failed for good before any call: dead-lettered as a
/// permanent failure, recorded `failed` with `reason`. Returns the dead letter's error.
async fn refused_without_a_call(world: &World, job: &serde_json::Value, reason: &str) -> String {
    let Disposition::DeadLetter {
        reason: dead,
        error,
        ..
    } = world.handle(&delivery(job)).await
    else {
        panic!("{reason}: dead-lettered");
    };
    assert_eq!(dead, DeadReason::PermanentFailure);
    let id = Uuid::parse_str(job["id"].as_str().unwrap_or_default()).expect("a job id");
    assert_eq!(world.status(id), (Status::Failed, Some(reason.into())));
    assert!(world.twilio.calls().is_empty(), "{reason}: never sent");
    error
}

/// The same job coming back from a retry tier after `attempts` calls.
pub(super) fn retried(job: &serde_json::Value, attempts: u32) -> Delivery {
    Delivery {
        requeued: true,
        attempts,
        ..delivery(job)
    }
}

pub(super) fn unavailable() -> ProviderError {
    ProviderError::Unavailable {
        http_status: 503,
        code: None,
        message: None,
        retry_after: None,
    }
}

fn rejected(other_gateway_may_succeed: bool, recipient_opted_out: bool) -> ProviderError {
    ProviderError::Rejected {
        http_status: 400,
        code: Some("21610".into()),
        message: "refused".into(),
        recipient_opted_out,
        other_gateway_may_succeed,
    }
}

fn accepted(sid: &str) -> Accepted {
    Accepted {
        provider_message_id: sid.into(),
        http_status: Some(201),
    }
}

#[tokio::test]
async fn a_due_message_is_sent_once_and_recorded_sent() {
    let world = World::new();
    let (id, job) = job(JobType::BookingReminder);
    assert_eq!(world.handle(&delivery(&job)).await, Disposition::Ack);
    assert_eq!(world.twilio.calls(), vec![NUMBER.to_owned()]);
    let row = world.row(id);
    assert_eq!((row.status, row.attempts), (Status::Sent, 1));
    assert_eq!(row.recorded, vec![(1, Some(AttemptOutcome::Sent))]);
}

#[tokio::test]
async fn a_national_number_is_read_with_the_schools_country() {
    let world = World::new();
    let (id, mut job) = job(JobType::LoginCode);
    job["to"] = json!("07700 900123");
    assert_eq!(world.handle(&delivery(&job)).await, Disposition::Ack);
    assert_eq!(world.row(id).recipient, NUMBER);
}

#[tokio::test]
async fn each_school_setting_that_says_no_suppresses_without_a_call() {
    let cases = [
        (
            SchoolSettings {
                sms_enabled: false,
                ..school()
            },
            "school_disabled",
        ),
        (
            SchoolSettings {
                allow_reminders: false,
                ..school()
            },
            "type_not_allowed",
        ),
        (
            SchoolSettings {
                school_id: 7,
                ..school()
            },
            "no_school_settings",
        ),
    ];
    for (school, reason) in cases {
        let world = World::with(settings(), school);
        let (id, job) = job(JobType::BookingReminder);
        assert_eq!(world.handle(&delivery(&job)).await, Disposition::Ack);
        let recorded = world.status(id);
        assert_eq!(recorded, (Status::Suppressed, Some(reason.into())));
        assert!(world.twilio.calls().is_empty());
    }
}

#[tokio::test]
async fn an_opted_out_recipient_is_suppressed_by_the_claim() {
    let world = World::new();
    world.log().opt_out(Some(SCHOOL), NUMBER);
    let (id, job) = job(JobType::BookingConfirmation);
    assert_eq!(world.handle(&delivery(&job)).await, Disposition::Ack);
    assert_eq!(
        world.status(id),
        (Status::Suppressed, Some("opted_out".into()))
    );
    assert!(world.twilio.calls().is_empty());
}

#[tokio::test]
async fn an_expired_job_is_recorded_expired_and_never_sent() {
    let world = World::new();
    let (id, mut job) = job(JobType::LoginCode);
    job["expires_at"] = json!("2020-01-01T00:00:00Z");
    assert_eq!(world.handle(&delivery(&job)).await, Disposition::Ack);
    assert_eq!(
        world.status(id),
        (Status::Expired, Some("expires_at passed".into()))
    );
    assert!(world.twilio.calls().is_empty());
}

#[tokio::test]
async fn a_job_not_yet_due_is_queued_and_deferred_until_then() {
    let world = World::new();
    let (id, mut job) = job(JobType::BookingReminder);
    job["not_before"] = json!("2099-01-01T08:00:00Z");
    let Disposition::Defer { until, kind } = world.handle(&delivery(&job)).await else {
        panic!("deferred");
    };
    assert_eq!((until.year(), kind), (2099, JobType::BookingReminder));
    assert_eq!(
        world.status(id),
        (Status::Queued, Some("not_before".into()))
    );
}

#[tokio::test]
async fn an_invalid_job_is_dead_lettered_with_the_decoders_error() {
    let world = World::new();
    let broken = Delivery {
        body: b"{\"id\": 1}".to_vec(),
        ..delivery(&json!({}))
    };
    let Disposition::DeadLetter { reason, error, .. } = world.handle(&broken).await else {
        panic!("dead-lettered");
    };
    assert_eq!(reason, DeadReason::InvalidJob);
    assert_eq!(error, "id: expected a string, got a number");
    assert!(world.log().rows().is_empty());
}

#[tokio::test]
async fn an_invalid_job_tells_the_web_app_what_could_be_read_of_it() {
    let world = World::new();
    let (id, mut bad) = job(JobType::LoginCode);
    bad["type"] = json!("sms_blast");
    bad["body"] = json!("Call +447700900123 now");
    world.handle(&delivery(&bad)).await;
    let rejected = world.log().rejected();
    assert_eq!(rejected.len(), 1);
    assert_eq!(rejected[0].job_id, Some(id));
    assert_eq!(rejected[0].kind.as_deref(), Some("sms_blast"));
    assert_eq!(rejected[0].school_id, Some(SCHOOL));
    assert_eq!(rejected[0].error, "type: unknown type 'sms_blast'");

    // The database is down: the delivery is held until the event is written.
    world.log().fail_next(2);
    let Disposition::DeadLetter { .. } = world.handle(&delivery(&bad)).await else {
        panic!("dead-lettered once the event is written");
    };
    assert_eq!(world.log().rejected().len(), 2);
}

#[tokio::test]
async fn a_job_over_the_size_limit_is_dead_lettered_unread() {
    let world = World::with(
        PipelineSettings {
            max_job_bytes: 100,
            ..settings()
        },
        school(),
    );
    let (_, mut big) = job(JobType::LoginCode);
    big["padding"] = json!("x".repeat(100));
    let Disposition::DeadLetter { reason, error, .. } = world.handle(&delivery(&big)).await else {
        panic!("dead-lettered");
    };
    assert_eq!(reason, DeadReason::InvalidJob);
    assert!(error.starts_with("job: 2"), "{error}");
    assert!(error.ends_with("bytes, more than SMSGW_MAX_JOB_BYTES (100)"));
    assert!(world.log().rows().is_empty());
}

#[tokio::test]
async fn an_impossible_number_fails_permanently_without_a_call() {
    let world = World::new();
    let (_, mut job) = job(JobType::LoginCode);
    job["to"] = json!("+44123");
    refused_without_a_call(&world, &job, "invalid_number").await;
}

#[tokio::test]
async fn an_invalid_sender_or_a_text_too_long_for_its_type_fails_without_a_call() {
    let bad_sender = SchoolSettings {
        sender_id: Some("Drive Safe School".into()),
        ..school()
    };
    let world = World::with(settings(), bad_sender);
    let (_, code) = job(JobType::LoginCode);
    refused_without_a_call(&world, &code, "invalid_sender_id").await;
    let one_segment = PipelineSettings {
        max_segments: [(JobType::LoginCode, 1)].into_iter().collect(),
        ..settings()
    };
    let world = World::with(one_segment, school());
    let (_, mut long) = job(JobType::LoginCode);
    long["body"] = json!(
        "Your code is 123456 🚗 and it stays valid for fifteen minutes from now, so please use it soon."
    );
    refused_without_a_call(&world, &long, "too_many_segments").await;
}

#[tokio::test]
async fn a_school_naming_an_unconfigured_provider_is_refused() {
    let school = SchoolSettings {
        provider: Some("sinch".into()),
        ..school()
    };
    let world = World::with(settings(), school);
    let (_, job) = job(JobType::LoginCode);
    let error = refused_without_a_call(&world, &job, "unknown_provider").await;
    assert!(error.contains("'sinch' is not configured"), "{error}");
}

#[tokio::test]
async fn a_temporary_failure_retries_after_its_tier_then_sends() {
    let world = World::new();
    world.twilio.answer([Err(unavailable())]);
    let (id, job) = job(JobType::BookingChange);
    assert_eq!(
        world.handle(&delivery(&job)).await,
        Disposition::Retry {
            delay: Duration::from_secs(10),
            attempts: 1,
            kind: JobType::BookingChange
        }
    );
    assert_eq!(world.status(id).0, Status::Retrying);
    assert_eq!(world.handle(&retried(&job, 1)).await, Disposition::Ack);
    let row = world.row(id);
    assert_eq!((row.status, row.attempts), (Status::Sent, 2));
}

#[tokio::test]
async fn a_throttled_call_waits_as_long_as_the_provider_asks() {
    let world = World::new();
    world.twilio.answer([Err(ProviderError::Throttled {
        http_status: 429,
        code: None,
        message: None,
        retry_after: Some(Duration::from_secs(120)),
    })]);
    let (_, job) = job(JobType::BookingReminder);
    let Disposition::Retry { delay, .. } = world.handle(&delivery(&job)).await else {
        panic!("retried");
    };
    assert_eq!(delay, Duration::from_secs(120));
}

#[tokio::test]
async fn the_last_failed_attempt_is_dead_lettered_as_exhausted() {
    let world = World::new();
    world.twilio.answer([Err(unavailable())]);
    let (id, job) = job(JobType::BookingReminder);
    world.log().insert(
        id,
        Row {
            status: Status::Retrying,
            ..row_with_attempts(2)
        },
    );
    let Disposition::DeadLetter {
        reason, attempts, ..
    } = world.handle(&retried(&job, 2)).await
    else {
        panic!("dead-lettered");
    };
    assert_eq!((reason, attempts), (DeadReason::AttemptsExhausted, 3));
    assert_eq!(
        world.status(id),
        (Status::Failed, Some("attempts_exhausted".into()))
    );
}

#[tokio::test]
async fn a_carrier_stop_fails_the_message_and_records_an_opt_out() {
    let world = World::new();
    world.twilio.answer([Err(rejected(false, true))]);
    let (id, job) = job(JobType::BookingReminder);
    let disposition = world.handle(&delivery(&job)).await;
    assert!(matches!(
        disposition,
        Disposition::DeadLetter {
            reason: DeadReason::PermanentFailure,
            attempts: 1,
            ..
        }
    ));
    assert_eq!(
        world.status(id),
        (Status::Failed, Some("recipient_opted_out".into()))
    );
    assert!(world.log().is_opted_out(SCHOOL, NUMBER));
}

#[tokio::test]
async fn a_refusal_another_gateway_may_not_share_fails_over_to_the_fallback() {
    let school = SchoolSettings {
        fallback_provider: Some("vonage".into()),
        ..school()
    };
    let world = World::with(settings(), school);
    world.twilio.answer([Err(rejected(true, false))]);
    let (id, job) = job(JobType::LoginCode);
    assert_eq!(world.handle(&delivery(&job)).await, Disposition::Ack);
    assert_eq!(
        (world.twilio.calls().len(), world.vonage.calls().len()),
        (1, 1)
    );
    let row = world.row(id);
    assert_eq!(
        (row.status, row.provider.as_str(), row.attempts),
        (Status::Sent, "vonage", 2)
    );
}

#[tokio::test]
async fn without_a_fallback_the_same_refusal_is_final() {
    let world = World::new();
    world.twilio.answer([Err(rejected(true, false))]);
    let (id, job) = job(JobType::LoginCode);
    assert!(matches!(
        world.handle(&delivery(&job)).await,
        Disposition::DeadLetter { .. }
    ));
    assert_eq!(
        world.status(id),
        (Status::Failed, Some("permanent_failure".into()))
    );
}

#[tokio::test]
async fn an_open_circuit_puts_messages_off_instead_of_calling() {
    let world = World::new();
    world.open_twilio_circuit().await;
    let (id, job) = job(JobType::BookingReminder);
    assert!(matches!(
        world.handle(&delivery(&job)).await,
        Disposition::Defer { .. }
    ));
    assert_eq!(world.twilio.calls().len(), 2);
    assert!(
        world.log().row(id).is_none(),
        "nothing claimed while the circuit is open"
    );
}

#[tokio::test]
async fn an_open_circuit_sends_through_the_fallback_when_there_is_one() {
    let school = SchoolSettings {
        fallback_provider: Some("vonage".into()),
        ..school()
    };
    let world = World::with(settings(), school);
    world.open_twilio_circuit().await;
    let (id, job) = job(JobType::BookingReminder);
    assert_eq!(world.handle(&delivery(&job)).await, Disposition::Ack);
    assert_eq!(world.row(id).provider, "vonage");
}

#[tokio::test]
async fn the_same_job_published_again_after_it_was_sent_is_a_duplicate() {
    let world = World::new();
    let (id, job) = job(JobType::LoginCode);
    world.handle(&delivery(&job)).await;
    assert_eq!(world.handle(&delivery(&job)).await, Disposition::Ack);
    assert_eq!(world.twilio.calls().len(), 1);
    assert_eq!(world.row(id).attempts, 1);
}

#[tokio::test]
async fn a_second_publish_while_the_first_is_sending_is_acked_as_a_duplicate() {
    let world = World::new();
    let (id, job) = job(JobType::LoginCode);
    world
        .log()
        .insert(id, sending(1, OffsetDateTime::now_utc()));
    assert_eq!(world.handle(&delivery(&job)).await, Disposition::Ack);
    assert!(world.twilio.calls().is_empty());
}

#[tokio::test]
async fn a_redelivery_while_an_attempt_may_still_run_waits_and_looks_again() {
    let world = World::new();
    let (id, job) = job(JobType::LoginCode);
    world
        .log()
        .insert(id, sending(1, OffsetDateTime::now_utc()));
    let redelivered = Delivery {
        redelivered: true,
        ..delivery(&job)
    };
    assert_eq!(
        world.handle(&redelivered).await,
        Disposition::Retry {
            delay: Duration::from_secs(10),
            attempts: 0,
            kind: JobType::LoginCode
        }
    );
    assert!(world.twilio.calls().is_empty());
}

#[tokio::test]
async fn an_attempt_cut_off_by_a_crash_is_reconciled_then_taken_over() {
    let world = World::new();
    world.twilio.look_up([Lookup::NotFound]);
    let (id, job) = job(JobType::LoginCode);
    let long_ago = OffsetDateTime::now_utc() - time::Duration::minutes(5);
    world.log().insert(id, sending(1, long_ago));
    let redelivered = Delivery {
        redelivered: true,
        ..delivery(&job)
    };
    assert_eq!(world.handle(&redelivered).await, Disposition::Ack);
    let row = world.row(id);
    assert_eq!((row.status, row.attempts), (Status::Sent, 2));
    assert_eq!(
        row.recorded,
        vec![(1, None), (2, Some(AttemptOutcome::Sent))]
    );
}

#[tokio::test]
async fn a_call_without_an_answer_is_retried_and_asked_about_before_sending_again() {
    let world = World::new();
    world.twilio.answer([Err(ProviderError::Timeout {
        after: Duration::from_secs(5),
    })]);
    world
        .twilio
        .look_up([Lookup::Found(vec![accepted("SM-late")])]);
    let (id, job) = job(JobType::LoginCode);
    assert!(matches!(
        world.handle(&delivery(&job)).await,
        Disposition::Retry { attempts: 1, .. }
    ));
    assert!(world.row(id).last_outcome_unknown);
    assert_eq!(world.handle(&retried(&job, 1)).await, Disposition::Ack);
    assert_eq!(world.twilio.calls().len(), 1, "asked, not sent again");
    assert_eq!(world.row(id).provider_message_id, Some("SM-late".into()));
}

#[tokio::test]
async fn an_unanswered_call_the_provider_took_is_adopted_not_sent_again() {
    let world = World::new();
    world
        .twilio
        .look_up([Lookup::Found(vec![accepted("SM-taken")])]);
    let (id, job) = job(JobType::LoginCode);
    world.log().insert(id, unknown_outcome());
    assert_eq!(world.handle(&retried(&job, 1)).await, Disposition::Ack);
    assert!(world.twilio.calls().is_empty());
    let row = world.row(id);
    assert_eq!(
        (row.status, row.provider_message_id),
        (Status::Sent, Some("SM-taken".into()))
    );
}

/// A world whose log has another message, sent with provider id `sid`.
fn with_another_message_sent_as(sid: &str) -> World {
    let world = World::new();
    let other = Row {
        status: Status::Sent,
        provider_message_id: Some(sid.into()),
        ..row_with_attempts(1)
    };
    world.log().insert(Uuid::new_v4(), other);
    world
}

/// In staging every message goes to one number: another message with the same text is
/// found too, and must not be taken for ours.
#[tokio::test]
async fn a_lookup_never_adopts_another_messages_text() {
    let world = with_another_message_sent_as("SM-other");
    world
        .twilio
        .look_up([Lookup::Found(vec![accepted("SM-other")])]);
    let (id, job) = job(JobType::LoginCode);
    world.log().insert(id, unknown_outcome());

    assert_eq!(world.handle(&retried(&job, 1)).await, Disposition::Ack);

    assert_eq!(world.twilio.calls().len(), 1, "sent again");
    let row = world.row(id);
    assert_eq!((row.status, row.attempts), (Status::Sent, 2));
    assert_ne!(row.provider_message_id, Some("SM-other".into()));
}

#[tokio::test]
async fn a_lookup_adopts_the_newest_match_no_other_message_has() {
    let world = with_another_message_sent_as("SM-other");
    world.twilio.look_up([Lookup::Found(vec![
        accepted("SM-other"),
        accepted("SM-ours"),
        accepted("SM-older"),
    ])]);
    let (id, job) = job(JobType::LoginCode);
    world.log().insert(id, unknown_outcome());

    assert_eq!(world.handle(&retried(&job, 1)).await, Disposition::Ack);

    assert!(world.twilio.calls().is_empty(), "adopted, not sent again");
    assert_eq!(world.row(id).provider_message_id, Some("SM-ours".into()));
}

#[tokio::test]
async fn an_unanswered_call_the_provider_never_took_is_sent_again() {
    let world = World::new();
    world.twilio.look_up([Lookup::NotFound]);
    let (id, job) = job(JobType::LoginCode);
    world.log().insert(id, unknown_outcome());
    assert_eq!(world.handle(&retried(&job, 1)).await, Disposition::Ack);
    assert_eq!(world.twilio.calls().len(), 1);
    assert_eq!(world.row(id).attempts, 2);
}

#[tokio::test]
async fn when_the_provider_cannot_be_asked_the_message_waits() {
    let world = World::new();
    world.twilio.look_up([Lookup::Failed(unavailable())]);
    let (id, job) = job(JobType::LoginCode);
    world.log().insert(id, unknown_outcome());
    assert_eq!(
        world.handle(&retried(&job, 1)).await,
        Disposition::Retry {
            delay: Duration::from_secs(10),
            attempts: 1,
            kind: JobType::LoginCode
        }
    );
    assert!(world.twilio.calls().is_empty());
}

/// `SMSGW_UNKNOWN_OUTCOME=dead_letter`, and a login code whose last call went unanswered.
fn unknown_outcome_dead_lettered_by_setting() -> (World, Uuid, serde_json::Value) {
    let world = World::with(
        PipelineSettings {
            unknown_outcome: UnknownOutcome::DeadLetter,
            ..settings()
        },
        school(),
    );
    let (id, job) = job(JobType::LoginCode);
    world.log().insert(id, unknown_outcome());
    (world, id, job)
}

#[tokio::test]
async fn without_a_lookup_an_unknown_outcome_can_be_dead_lettered() {
    let (world, id, job) = unknown_outcome_dead_lettered_by_setting();
    assert!(matches!(
        world.handle(&retried(&job, 1)).await,
        Disposition::DeadLetter {
            reason: DeadReason::OutcomeUnknown,
            ..
        }
    ));
    assert_eq!(
        world.status(id),
        (Status::Failed, Some("outcome_unknown".into()))
    );
    assert!(world.twilio.calls().is_empty());
}

#[tokio::test]
async fn a_replayed_unknown_outcome_is_not_sent_blindly() {
    let (world, _, job) = unknown_outcome_dead_lettered_by_setting();
    world.handle(&retried(&job, 1)).await;
    let replayed = Delivery {
        replayed: true,
        ..delivery(&job)
    };
    assert!(matches!(
        world.handle(&replayed).await,
        Disposition::DeadLetter {
            reason: DeadReason::OutcomeUnknown,
            ..
        }
    ));
    assert!(world.twilio.calls().is_empty(), "still cannot be asked");
}

#[tokio::test]
async fn a_replayed_unknown_outcome_the_provider_had_taken_is_adopted() {
    let world = World::new();
    world
        .twilio
        .look_up([Lookup::Found(vec![accepted("SM-taken")])]);
    let (id, job) = job(JobType::LoginCode);
    world.log().insert(
        id,
        Row {
            status: Status::Failed,
            reason: Some("outcome_unknown".into()),
            ..unknown_outcome()
        },
    );
    let replayed = Delivery {
        replayed: true,
        ..delivery(&job)
    };
    assert_eq!(world.handle(&replayed).await, Disposition::Ack);
    assert!(world.twilio.calls().is_empty());
    assert_eq!(world.status(id), (Status::Sent, None));
}

#[tokio::test]
async fn without_a_lookup_an_unknown_outcome_is_resent_by_default() {
    let world = World::new();
    let (id, job) = job(JobType::LoginCode);
    world.log().insert(id, unknown_outcome());
    assert_eq!(world.handle(&retried(&job, 1)).await, Disposition::Ack);
    assert_eq!(world.twilio.calls().len(), 1);
}

#[tokio::test]
async fn a_replayed_failure_is_tried_again() {
    let world = World::new();
    let (id, job) = job(JobType::LoginCode);
    world.log().insert(
        id,
        Row {
            status: Status::Failed,
            ..row_with_attempts(3)
        },
    );
    let replayed = Delivery {
        replayed: true,
        ..delivery(&job)
    };
    assert_eq!(world.handle(&replayed).await, Disposition::Ack);
    assert_eq!(world.status(id).0, Status::Sent);
}

#[tokio::test]
async fn an_announcement_queues_every_recipient_and_fans_out_a_chunk() {
    let world = World::new();
    let id = Uuid::new_v4();
    let job = json!({
        "id": id, "type": "announcement", "school_id": SCHOOL, "body": "Closed on Friday",
        "recipients": [
            {"to": "+447700900001", "ref": "s1"}, {"to": "07700 900002"},
            {"to": "+447700900001"}, {"to": "+447700900003"},
        ],
    });
    let Disposition::FanOut {
        announcement,
        messages,
        rest,
        ..
    } = world.handle(&delivery(&job)).await
    else {
        panic!("fanned out");
    };
    assert_eq!(announcement, id);
    let first = smsgw_job(&messages[0].1);
    assert_eq!(
        (first.id, first.reference.as_deref()),
        (messages[0].0, Some("s1"))
    );
    assert_eq!(
        first.target,
        crate::job::Target::One("+447700900001".into())
    );
    assert_eq!(messages.len(), 2, "a chunk of SMSGW_FANOUT_CHUNK");
    let rest = smsgw_job(&rest.expect("two recipients left"));
    assert!(matches!(rest.target, crate::job::Target::Many(ref left) if left.len() == 2));
    let queued = world.log().rows();
    assert_eq!(queued.len(), 3, "one row per distinct recipient");
    assert!(
        queued
            .iter()
            .all(|(_, row)| row.status == Status::Queued && row.bulk_id == Some(id))
    );
    assert!(world.twilio.calls().is_empty());
}

#[tokio::test]
async fn a_database_outage_holds_the_message_until_the_write_succeeds() {
    let world = World::new();
    world.log().fail_next(3);
    let (id, job) = job(JobType::LoginCode);
    assert_eq!(world.handle(&delivery(&job)).await, Disposition::Ack);
    assert_eq!(world.status(id).0, Status::Sent);
    assert_eq!(
        world.twilio.calls().len(),
        1,
        "no call before the attempt was recorded"
    );
    assert!(world.health.database());
}

#[tokio::test]
async fn a_delivery_held_by_an_outage_is_left_unsettled_when_stopping() {
    let world = World::new();
    world.log().fail_next(u32::MAX);
    world.abandon.cancel();
    let (_, job) = job(JobType::LoginCode);
    assert_eq!(world.handle(&delivery(&job)).await, Disposition::Unsettled);
    assert!(world.twilio.calls().is_empty());
}

#[tokio::test]
async fn a_retry_back_before_its_time_is_deferred_without_touching_the_log() {
    let world = World::new();
    let (_, job) = job(JobType::BookingReminder);
    let early = Delivery {
        retry_at: Some(OffsetDateTime::now_utc() + time::Duration::minutes(5)),
        ..retried(&job, 1)
    };
    assert!(matches!(
        world.handle(&early).await,
        Disposition::Defer { .. }
    ));
    assert_eq!(world.log().statements(), 0);
}

pub(super) fn smsgw_job(bytes: &[u8]) -> crate::job::Job {
    crate::job::Job::decode(bytes).expect("smsgw publishes valid jobs")
}

fn row_with_attempts(attempts: i32) -> Row {
    Row {
        status: Status::Queued,
        reason: None,
        recipient: NUMBER.into(),
        provider: "twilio".into(),
        bulk_id: None,
        attempts,
        attempt_started: Some(OffsetDateTime::now_utc() - time::Duration::minutes(1)),
        claim: None,
        last_outcome_unknown: false,
        provider_message_id: None,
        recorded: (1..=attempts)
            .map(|n| (n, Some(AttemptOutcome::TemporaryFailure)))
            .collect(),
        created_at: OffsetDateTime::now_utc(),
        school_id: SCHOOL,
        segments: Some(1),
        kind: JobType::BookingReminder,
        booking: None,
    }
}

/// A message whose attempt 1 started at `started` and has no outcome yet.
fn sending(attempts: i32, started: OffsetDateTime) -> Row {
    Row {
        status: Status::Sending,
        attempt_started: Some(started),
        recorded: Vec::new(),
        ..row_with_attempts(attempts)
    }
}

/// A message whose only attempt timed out: the provider may have taken it.
fn unknown_outcome() -> Row {
    Row {
        status: Status::Retrying,
        last_outcome_unknown: true,
        ..row_with_attempts(1)
    }
}

/// A school whose quiet hours (in UTC) began an hour ago and end in an hour.
fn quiet_now() -> SchoolSettings {
    let now = OffsetDateTime::now_utc();
    SchoolSettings {
        quiet: crate::school::Quiet::of(
            Some("UTC"),
            Some((now - time::Duration::hours(1)).time()),
            Some((now + time::Duration::hours(1)).time()),
        ),
        ..school()
    }
}

#[tokio::test]
async fn quiet_hours_hold_a_reminder_queued_until_the_window_ends() {
    let world = World::with(settings(), quiet_now());
    let (id, reminder) = job(JobType::BookingReminder);
    let Disposition::Defer { until, kind } = world.handle(&delivery(&reminder)).await else {
        panic!("held");
    };
    let left = until - OffsetDateTime::now_utc();
    assert!(left > time::Duration::minutes(59) && left <= time::Duration::hours(1));
    assert_eq!(kind, JobType::BookingReminder);
    assert_eq!(
        world.status(id),
        (Status::Queued, Some("quiet_hours".into()))
    );
    assert!(world.twilio.calls().is_empty());
}

#[tokio::test]
async fn quiet_hours_never_hold_a_login_code() {
    let world = World::with(settings(), quiet_now());
    world.twilio.answer([Ok(accepted("SM1"))]);
    let (id, code) = job(JobType::LoginCode);
    assert_eq!(world.handle(&delivery(&code)).await, Disposition::Ack);
    assert_eq!(world.status(id).0, Status::Sent);
}

#[tokio::test]
async fn a_login_code_past_its_default_expiry_ends_expired_without_a_call() {
    let world = World::new();
    let (id, code) = job(JobType::LoginCode);
    let seen_long_ago = Delivery {
        first_seen: OffsetDateTime::now_utc() - time::Duration::minutes(16),
        ..delivery(&code)
    };
    assert_eq!(world.handle(&seen_long_ago).await, Disposition::Ack);
    assert_eq!(world.status(id).0, Status::Expired);
    assert!(world.twilio.calls().is_empty());

    // Its own expires_at wins over the default.
    let (later, mut code) = job(JobType::LoginCode);
    code["expires_at"] = json!("2099-01-01T00:00:00Z");
    world.twilio.answer([Ok(accepted("SM2"))]);
    let seen_long_ago = Delivery {
        first_seen: OffsetDateTime::now_utc() - time::Duration::minutes(16),
        ..delivery(&code)
    };
    world.handle(&seen_long_ago).await;
    assert_eq!(world.status(later).0, Status::Sent);
}

/// A pipeline whose only provider is the development inbox.
fn inbox_pipeline() -> Pipeline<MemoryLog> {
    let log = MemoryLog::default();
    log.set_school(SchoolSettings {
        sender_id: Some("DriveSafe".into()),
        allow_login_codes: false,
        ..school()
    });
    Pipeline::new(
        log,
        PolicyCache::default(),
        Arc::new(Gateways::inbox()),
        settings(),
        Arc::new(Health::default()),
        Arc::new(Metrics::new()),
    )
}

#[tokio::test]
async fn the_inbox_keeps_every_text_with_its_sender_whatever_the_outcome() {
    let pipeline = inbox_pipeline();
    let abandon = CancellationToken::new();
    let (sent, reminder) = job(JobType::BookingReminder);
    let (suppressed, login) = job(JobType::LoginCode);
    for job in [&reminder, &login] {
        assert_eq!(
            pipeline.handle(&delivery(job), &abandon).await,
            Disposition::Ack
        );
    }
    let body = "Your lesson is at 10:00 tomorrow.".to_owned();
    let expected = Some((body, Some("DriveSafe".to_owned())));
    assert_eq!(pipeline.log.row(sent).map(|r| r.status), Some(Status::Sent));
    assert_eq!(pipeline.log.inbox_copy(sent), expected);
    let row = pipeline.log.row(suppressed).expect("recorded");
    assert_eq!(row.status, Status::Suppressed);
    assert_eq!(
        pipeline.log.inbox_copy(suppressed),
        expected,
        "a refused login code is shown too"
    );
}

#[tokio::test]
async fn no_inbox_copy_is_kept_for_a_real_provider() {
    let world = World::new();
    let (id, job) = job(JobType::LoginCode);
    assert_eq!(world.handle(&delivery(&job)).await, Disposition::Ack);
    assert_eq!(world.status(id).0, Status::Sent);
    assert_eq!(world.log().inbox_copy(id), None);
}
