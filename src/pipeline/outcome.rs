//! The pipeline's rules as pure functions: which status and reason the log records, and
//! which [`Disposition`] the broker carries out, for each decision, provider error and
//! state found in the log. Nothing here waits, calls or writes.

use std::time::Duration;

use time::{OffsetDateTime, format_description::well_known::Rfc3339};

use super::{Abandoned, PipelineSettings};
use crate::{
    broker::Delivery,
    disposition::{DeadReason, Disposition},
    job::JobType,
    phone::{PhoneNumber, SenderId},
    policy::{Decision, Refusal, SuppressReason},
    provider::ProviderError,
    store::{AttemptOutcome, MessageState, Status},
};

/// A retry that comes back sooner than this before its `retry_at` is sent anyway: the
/// tiers' timing is not exact to the millisecond.
const EARLY_TOLERANCE: time::Duration = time::Duration::milliseconds(20);

/// What the pipeline does with a decision: send, or record an outcome without a call.
#[derive(Debug, PartialEq)]
pub enum Plan<R> {
    Send {
        to: PhoneNumber,
        sender: Option<SenderId>,
        sender_number: Option<SenderId>,
        route: R,
    },
    Record(Verdict),
}

/// An outcome reached without a provider call: what the log records and what the
/// broker does.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub status: Status,
    pub reason: &'static str,
    pub disposition: Disposition,
}

impl Verdict {
    pub fn log(&self) {
        match &self.disposition {
            Disposition::DeadLetter { error, .. } => {
                tracing::warn!(reason = self.reason, error = %error, "refused before sending");
            }
            Disposition::Defer { until, .. } => {
                let until = until.format(&Rfc3339).unwrap_or_default();
                tracing::debug!(until = %until, "not due yet");
            }
            _ if self.status == Status::Expired => {
                tracing::info!("expired before it could be sent");
            }
            _ if self.status == Status::Cancelled => {
                tracing::info!("withdrawn before it was sent: its booking was cancelled");
            }
            _ => tracing::info!(reason = self.reason, "suppressed"),
        }
    }
}

/// Turns the policy's decision into a plan. `attempts` is the provider calls made so far
/// (a refusal's dead letter carries it).
pub fn plan<R>(decision: Decision<R>, kind: JobType, attempts: u32) -> Plan<R> {
    let verdict = match decision {
        Decision::Send {
            to,
            sender,
            sender_number,
            route,
        } => {
            return Plan::Send {
                to,
                sender,
                sender_number,
                route,
            };
        }
        Decision::Expire => Verdict {
            status: Status::Expired,
            reason: "expires_at passed",
            disposition: Disposition::Ack,
        },
        Decision::Suppress(reason) => suppressed(reason),
        Decision::Refuse(refusal) => refused(&refusal, attempts),
        Decision::Defer { until } => Verdict {
            status: Status::Queued,
            reason: "not_before",
            disposition: Disposition::Defer { until, kind },
        },
        Decision::Hold { until } => Verdict {
            status: Status::Queued,
            reason: "quiet_hours",
            disposition: Disposition::Defer { until, kind },
        },
    };
    Plan::Record(verdict)
}

/// A reminder or confirmation of a booking cancelled: withdrawn, never sent.
pub fn withdrawn() -> Verdict {
    Verdict {
        status: Status::Cancelled,
        reason: "booking_cancelled",
        disposition: Disposition::Ack,
    }
}

pub fn suppressed(reason: SuppressReason) -> Verdict {
    Verdict {
        status: Status::Suppressed,
        reason: reason.as_str(),
        disposition: Disposition::Ack,
    }
}

fn refused(refusal: &Refusal, attempts: u32) -> Verdict {
    Verdict {
        status: Status::Failed,
        reason: refusal.reason(),
        disposition: Disposition::DeadLetter {
            reason: DeadReason::PermanentFailure,
            error: refusal.to_string(),
            attempts,
        },
    }
}

/// A job that cannot be decoded: to `sms.dead` with the decoder's error.
pub fn invalid(error: &str, attempts: u32) -> Disposition {
    Disposition::DeadLetter {
        reason: DeadReason::InvalidJob,
        error: error.to_owned(),
        attempts,
    }
}

/// A database write given up on: left unsettled while stopping, dead-lettered when the
/// database refused the data itself.
pub fn abandoned(abandoned: Abandoned, attempts: u32) -> Disposition {
    match abandoned {
        Abandoned::Stopping => Disposition::Unsettled,
        Abandoned::Unrecordable(error) => Disposition::DeadLetter {
            reason: DeadReason::InvalidJob,
            error: format!("the database refused the message's data: {error}"),
            attempts,
        },
    }
}

/// A retry back from a tier shorter than the provider asked us to wait goes back to
/// wait the rest.
pub fn came_back_early(
    retry_at: Option<OffsetDateTime>,
    now: OffsetDateTime,
    kind: JobType,
) -> Option<Disposition> {
    retry_at
        .filter(|at| *at - now > EARLY_TOLERANCE)
        .map(|until| Disposition::Defer { until, kind })
}

/// What the log's state of a message says about a delivery of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// It has an outcome: acked without another call.
    Done,
    /// A second publish of a job another delivery is sending right now.
    InFlight,
    /// Redelivered while its attempt may still be running in another process.
    MayStillRun,
    /// Its attempt was cut off without an outcome (a crash): take it over.
    CutOff,
    /// Not started, or waiting for a retry: carry on.
    Open,
}

pub fn seen(
    delivery: &Delivery,
    state: &MessageState,
    now: OffsetDateTime,
    recheck: Duration,
) -> Seen {
    let replay_of_failure = delivery.replayed && state.status == Status::Failed;
    if state.status.is_final() && !replay_of_failure {
        return Seen::Done;
    }
    if state.status != Status::Sending {
        return Seen::Open;
    }
    if !delivery.redelivered && !delivery.requeued {
        return Seen::InFlight;
    }
    let age = state
        .open_attempt_started
        .and_then(|started| Duration::try_from(now - started).ok())
        .unwrap_or(Duration::MAX);
    if age < recheck {
        Seen::MayStillRun
    } else {
        Seen::CutOff
    }
}

/// Wait for a message busy elsewhere, then look again.
pub fn look_again(recheck: Duration, attempts: u32, kind: JobType) -> Disposition {
    Disposition::Retry {
        delay: recheck,
        attempts,
        kind,
    }
}

/// How a failed provider call is recorded, and what follows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    pub outcome: AttemptOutcome,
    pub status: Status,
    pub reason: Option<&'static str>,
    /// `None`: try the other gateway now.
    pub disposition: Option<Disposition>,
}

/// Classifies a failed call. `attempts` counts this one; `fail_over` says another
/// gateway may take what this one refused.
pub fn after_failure(
    error: &ProviderError,
    attempts: u32,
    fail_over: bool,
    settings: &PipelineSettings,
    kind: JobType,
) -> Failure {
    let text = error.to_string();
    if fail_over {
        return Failure {
            outcome: AttemptOutcome::PermanentFailure,
            status: Status::Retrying,
            reason: Some("failing_over"),
            disposition: None,
        };
    }
    if !error.is_retryable() {
        let reason = if error.recipient_opted_out() {
            "recipient_opted_out"
        } else {
            "permanent_failure"
        };
        return given_up(
            AttemptOutcome::PermanentFailure,
            reason,
            DeadReason::PermanentFailure,
            text,
            attempts,
        );
    }
    if attempts >= settings.max_attempts {
        return exhausted(error, attempts);
    }
    Failure {
        outcome: AttemptOutcome::TemporaryFailure,
        status: Status::Retrying,
        reason: None,
        disposition: Some(Disposition::Retry {
            delay: retry_delay(&settings.retry_delays, attempts, error.retry_after()),
            attempts,
            kind,
        }),
    }
}

/// Out of attempts. When the last call went unanswered the provider may have taken the
/// message: that letter gets a reason of its own, so that nobody replays it as a plain
/// failure, and the log keeps the flag that makes a replay ask the provider first.
fn exhausted(error: &ProviderError, attempts: u32) -> Failure {
    let text = error.to_string();
    if error.outcome_unknown() {
        return given_up(
            AttemptOutcome::TemporaryFailure,
            "outcome_unknown",
            DeadReason::OutcomeUnknown,
            format!("after {attempts} attempts, the last unanswered (may have been sent): {text}"),
            attempts,
        );
    }
    given_up(
        AttemptOutcome::TemporaryFailure,
        "attempts_exhausted",
        DeadReason::AttemptsExhausted,
        format!("after {attempts} attempts: {text}"),
        attempts,
    )
}

fn given_up(
    outcome: AttemptOutcome,
    reason: &'static str,
    dead: DeadReason,
    error: String,
    attempts: u32,
) -> Failure {
    Failure {
        outcome,
        status: Status::Failed,
        reason: Some(reason),
        disposition: Some(Disposition::DeadLetter {
            reason: dead,
            error,
            attempts,
        }),
    }
}

/// The wait before attempt `attempts + 1`: the tier for this attempt, or longer when the
/// provider asked for it.
pub fn retry_delay(delays: &[Duration], attempts: u32, retry_after: Option<Duration>) -> Duration {
    let index = (attempts as usize)
        .saturating_sub(1)
        .min(delays.len().saturating_sub(1));
    let tier = delays
        .get(index)
        .copied()
        .unwrap_or(Duration::from_secs(10));
    tier.max(retry_after.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{job::Lane, pipeline::tests::unavailable, store::UnknownAttempt};
    use time::macros::datetime;

    const NOW: OffsetDateTime = datetime!(2026-12-04 10:00 UTC);
    const RECHECK: Duration = Duration::from_secs(20);

    fn settings() -> PipelineSettings {
        PipelineSettings::example()
    }

    fn delivery() -> Delivery {
        Delivery::fresh(Lane::Urgent, Vec::new())
    }

    fn state(status: Status, started: Option<OffsetDateTime>) -> MessageState {
        MessageState {
            status,
            attempts: 1,
            open_attempt_started: started,
            unknown_attempt: started.map(|started_at| UnknownAttempt {
                attempt: 1,
                started_at,
                provider: "twilio".into(),
            }),
        }
    }

    fn rejected(opted_out: bool) -> ProviderError {
        ProviderError::Rejected {
            http_status: 400,
            code: Some("21610".into()),
            message: "unsubscribed".into(),
            recipient_opted_out: opted_out,
            other_gateway_may_succeed: false,
        }
    }

    #[test]
    fn retry_delays_follow_the_tiers_then_stay_on_the_last() {
        let delays = settings().retry_delays;
        assert_eq!(retry_delay(&delays, 1, None), Duration::from_secs(10));
        assert_eq!(retry_delay(&delays, 2, None), Duration::from_secs(60));
        assert_eq!(retry_delay(&delays, 9, None), Duration::from_secs(60));
        let asked = Some(Duration::from_secs(90));
        assert_eq!(retry_delay(&delays, 1, asked), Duration::from_secs(90));
    }

    #[test]
    fn a_temporary_failure_retries_until_the_last_attempt() {
        let failure = after_failure(&unavailable(), 1, false, &settings(), JobType::LoginCode);
        assert_eq!(failure.status, Status::Retrying);
        assert_eq!(
            failure.disposition,
            Some(Disposition::Retry {
                delay: Duration::from_secs(10),
                attempts: 1,
                kind: JobType::LoginCode
            })
        );
        let last = after_failure(&unavailable(), 3, false, &settings(), JobType::LoginCode);
        assert_eq!(
            (last.status, last.reason),
            (Status::Failed, Some("attempts_exhausted"))
        );
        assert!(matches!(
            last.disposition,
            Some(Disposition::DeadLetter {
                reason: DeadReason::AttemptsExhausted,
                attempts: 3,
                ..
            })
        ));
    }

    #[test]
    fn a_last_attempt_without_an_answer_is_dead_lettered_as_outcome_unknown() {
        let timeout = ProviderError::Timeout {
            after: Duration::from_secs(5),
        };
        let last = after_failure(&timeout, 3, false, &settings(), JobType::LoginCode);
        assert_eq!(
            (last.status, last.reason),
            (Status::Failed, Some("outcome_unknown"))
        );
        assert!(matches!(
            last.disposition,
            Some(Disposition::DeadLetter {
                reason: DeadReason::OutcomeUnknown,
                attempts: 3,
                ..
            })
        ));
    }

    #[test]
    fn a_rejection_is_final_and_a_carrier_stop_says_so() {
        let failure = after_failure(&rejected(false), 1, false, &settings(), JobType::LoginCode);
        assert_eq!(failure.reason, Some("permanent_failure"));
        assert_eq!(failure.outcome, AttemptOutcome::PermanentFailure);
        let stop = after_failure(&rejected(true), 1, false, &settings(), JobType::LoginCode);
        assert_eq!(stop.reason, Some("recipient_opted_out"));
        assert!(matches!(
            stop.disposition,
            Some(Disposition::DeadLetter {
                reason: DeadReason::PermanentFailure,
                ..
            })
        ));
    }

    #[test]
    fn failing_over_records_the_refusal_and_settles_nothing() {
        let failure = after_failure(&rejected(false), 1, true, &settings(), JobType::LoginCode);
        assert_eq!(failure.status, Status::Retrying);
        assert_eq!(failure.reason, Some("failing_over"));
        assert_eq!(failure.disposition, None);
    }

    #[test]
    fn each_decision_without_a_call_has_its_status_reason_and_disposition() {
        let plan = |d: Decision<()>| plan(d, JobType::BookingReminder, 2);
        let Plan::Record(expired) = plan(Decision::Expire) else {
            panic!("recorded")
        };
        assert_eq!(
            (expired.status, expired.reason, expired.disposition),
            (Status::Expired, "expires_at passed", Disposition::Ack)
        );
        let Plan::Record(off) = plan(Decision::Suppress(SuppressReason::SchoolDisabled)) else {
            panic!("recorded")
        };
        assert_eq!(
            (off.status, off.reason),
            (Status::Suppressed, "school_disabled")
        );
        let until = NOW + time::Duration::hours(1);
        let Plan::Record(later) = plan(Decision::Defer { until }) else {
            panic!("recorded")
        };
        assert_eq!(later.status, Status::Queued);
        assert_eq!(
            later.disposition,
            Disposition::Defer {
                until,
                kind: JobType::BookingReminder
            }
        );
        let refusal = Refusal::UnknownProvider("vonage-eu".into());
        let Plan::Record(refused) = plan(Decision::Refuse(refusal)) else {
            panic!("recorded")
        };
        assert_eq!(
            (refused.status, refused.reason),
            (Status::Failed, "unknown_provider")
        );
        assert!(matches!(
            refused.disposition,
            Disposition::DeadLetter { attempts: 2, .. }
        ));
    }

    #[test]
    fn a_message_with_an_outcome_is_done_unless_a_replay_reopens_a_failure() {
        let sent = state(Status::Sent, None);
        assert_eq!(seen(&delivery(), &sent, NOW, RECHECK), Seen::Done);
        let failed = state(Status::Failed, None);
        let replayed = Delivery {
            replayed: true,
            ..delivery()
        };
        assert_eq!(seen(&replayed, &failed, NOW, RECHECK), Seen::Open);
        assert_eq!(seen(&replayed, &sent, NOW, RECHECK), Seen::Done);
    }

    #[test]
    fn a_message_in_flight_is_a_duplicate_unless_redelivered() {
        let sending = state(Status::Sending, Some(NOW - time::Duration::seconds(1)));
        assert_eq!(seen(&delivery(), &sending, NOW, RECHECK), Seen::InFlight);
        let redelivered = Delivery {
            redelivered: true,
            ..delivery()
        };
        assert_eq!(
            seen(&redelivered, &sending, NOW, RECHECK),
            Seen::MayStillRun
        );
        let old = state(Status::Sending, Some(NOW - time::Duration::seconds(21)));
        assert_eq!(seen(&redelivered, &old, NOW, RECHECK), Seen::CutOff);
    }

    #[test]
    fn a_retry_back_before_its_time_waits_the_rest() {
        let at = NOW + time::Duration::seconds(30);
        assert_eq!(
            came_back_early(Some(at), NOW, JobType::LoginCode),
            Some(Disposition::Defer {
                until: at,
                kind: JobType::LoginCode
            })
        );
        let almost = NOW + time::Duration::milliseconds(10);
        assert_eq!(came_back_early(Some(almost), NOW, JobType::LoginCode), None);
        assert_eq!(came_back_early(None, NOW, JobType::LoginCode), None);
    }

    #[test]
    fn a_write_given_up_is_unsettled_when_stopping_and_dead_lettered_when_refused() {
        assert_eq!(abandoned(Abandoned::Stopping, 1), Disposition::Unsettled);
        assert!(matches!(
            abandoned(Abandoned::Unrecordable("22P05".into()), 1),
            Disposition::DeadLetter {
                reason: DeadReason::InvalidJob,
                ..
            }
        ));
    }
}
