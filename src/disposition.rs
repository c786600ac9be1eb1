//! The one place an outcome becomes a broker action.

use std::time::Duration;

use time::OffsetDateTime;
use uuid::Uuid;

use crate::job::JobType;

/// What the broker does with a delivery once the pipeline is done with it.
#[derive(Debug, Clone, PartialEq)]
pub enum Disposition {
    /// Done (sent, suppressed, expired, or a duplicate of something done).
    Ack,
    /// A temporary failure: wait at least `delay` in a retry tier, then back to its lane.
    /// `attempts` is the number of provider calls made so far.
    Retry {
        delay: Duration,
        attempts: u32,
        kind: JobType,
    },
    /// Not due yet (`not_before`): wait in the tier that brings it back closest to `until`.
    Defer {
        until: OffsetDateTime,
        kind: JobType,
    },
    /// Never going to work as it stands: to `sms.dead` for ops to inspect and replay.
    DeadLetter {
        reason: DeadReason,
        error: String,
        attempts: u32,
    },
    /// An announcement accepted: publish one message per recipient of this chunk and,
    /// when recipients are left, the rest of the announcement at the back of its lane;
    /// ack once the broker confirmed them all. A publish that fails requeues the
    /// announcement, which fans the same chunk out again to the same ids.
    FanOut {
        announcement: Uuid,
        kind: JobType,
        /// Each recipient's message: its id and its v1 job.
        messages: Vec<(Uuid, Vec<u8>)>,
        /// The announcement without this chunk's recipients.
        rest: Option<Vec<u8>>,
    },
    /// Give it back to the broker now as failed (a reject: it counts toward the lane's
    /// delivery limit, so a message that keeps failing this way ends in `sms.dead`).
    Requeue,
    /// Leave it unsettled: the broker delivers it again when our channel closes. Used when
    /// shutting down mid-outage, where any settlement would be a guess.
    Unsettled,
}

/// `x-smsgw-reason` of a dead letter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadReason {
    InvalidJob,
    PermanentFailure,
    AttemptsExhausted,
    /// Given up while the provider may have taken the message: a replay asks it first.
    OutcomeUnknown,
}

impl DeadReason {
    pub const ALL: [DeadReason; 4] = [
        DeadReason::InvalidJob,
        DeadReason::PermanentFailure,
        DeadReason::AttemptsExhausted,
        DeadReason::OutcomeUnknown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DeadReason::InvalidJob => "invalid_job",
            DeadReason::PermanentFailure => "permanent_failure",
            DeadReason::AttemptsExhausted => "attempts_exhausted",
            DeadReason::OutcomeUnknown => "outcome_unknown",
        }
    }
}
