//! The message log's vocabulary, shared by its statements (`log`), the store's methods
//! (`messages`), receipts and the recorder: the statuses and outcomes as stored, a
//! message's state, the rows the batches write, and the rules every write follows (which
//! bodies are kept, what text can be stored). It imports nothing else of the store.

use serde_json::Value;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::job::JobType;

/// The status of a message, as `sms_messages.status` stores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Queued,
    Sending,
    Sent,
    Delivered,
    Undelivered,
    Failed,
    Retrying,
    Suppressed,
    Expired,
    /// Withdrawn before it was sent: its booking was cancelled.
    Cancelled,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::Sending => "sending",
            Status::Sent => "sent",
            Status::Delivered => "delivered",
            Status::Undelivered => "undelivered",
            Status::Failed => "failed",
            Status::Retrying => "retrying",
            Status::Suppressed => "suppressed",
            Status::Expired => "expired",
            Status::Cancelled => "cancelled",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        [
            Status::Queued,
            Status::Sending,
            Status::Sent,
            Status::Delivered,
            Status::Undelivered,
            Status::Failed,
            Status::Retrying,
            Status::Suppressed,
            Status::Expired,
            Status::Cancelled,
        ]
        .into_iter()
        .find(|s| s.as_str() == text)
    }

    /// Whether the message has an outcome: nothing more will be sent for it.
    pub fn is_final(self) -> bool {
        match self {
            Status::Queued | Status::Sending | Status::Retrying => false,
            Status::Sent
            | Status::Delivered
            | Status::Undelivered
            | Status::Failed
            | Status::Suppressed
            | Status::Expired
            | Status::Cancelled => true,
        }
    }
}

/// What `sms_attempts.outcome` records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptOutcome {
    Sent,
    TemporaryFailure,
    PermanentFailure,
}

impl AttemptOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            AttemptOutcome::Sent => "sent",
            AttemptOutcome::TemporaryFailure => "temporary_failure",
            AttemptOutcome::PermanentFailure => "permanent_failure",
        }
    }
}

/// Whether a message keeps its body once it has an outcome, as SQL over the store's
/// body setting (`keep`, a parameter) and the message's `kind` column: a login code never
/// does, being a secret nobody needs once it went out (or did not).
pub(super) fn keeps_body(keep: &str, kind: &str) -> String {
    format!("({keep} AND {kind} <> '{}')", JobType::LoginCode.as_str())
}

/// Text from outside (a provider's answer) as PostgreSQL can store it: a NUL character,
/// which its text type cannot hold, becomes U+FFFD. Without this, an answer with one
/// could never be recorded, and the message would be held for ever.
pub(super) fn storable(text: &str) -> String {
    text.replace('\0', "\u{fffd}")
}

/// The state of a message already in the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageState {
    pub status: Status,
    pub attempts: i32,
    /// When the latest attempt started, if it has no outcome yet.
    pub open_attempt_started: Option<OffsetDateTime>,
    /// The latest attempt, if the provider may have taken it without our knowing: cut off
    /// by a crash (no outcome) or ended without an answer we could read.
    pub unknown_attempt: Option<UnknownAttempt>,
}

/// An attempt whose outcome is not known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownAttempt {
    pub attempt: i32,
    pub started_at: OffsetDateTime,
    /// The provider that was called: the one to ask.
    pub provider: String,
}

/// What a claim found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// Attempt number `attempt` is recorded as started.
    Started { attempt: i32 },
    /// Not claimable: the message is in this state.
    Busy(MessageState),
    /// The recipient opted out (checked in the same statement, so an opt-out written a
    /// moment ago counts even before the cache hears of it).
    OptedOut,
}

/// The columns a new message row starts with; the first eight are bound as `$1` to
/// `$8` (id, bulk_id, school_id, type, recipient, body, context, provider).
#[derive(Debug, Clone)]
pub(crate) struct MessageColumns {
    pub id: Uuid,
    pub bulk_id: Option<Uuid>,
    pub school_id: i64,
    pub kind: &'static str,
    pub recipient: String,
    pub body: String,
    pub context: Option<Value>,
    pub provider: String,
    pub segments: Option<i32>,
    /// `GSM-7` or `UCS-2`: what the text was sent as.
    pub encoding: Option<&'static str>,
    pub reopen_failed: bool,
}

/// A message to claim an attempt for.
#[derive(Debug, Clone)]
pub(crate) struct ClaimRow {
    pub message: MessageColumns,
    /// Take over this attempt, left open by a crash.
    pub take_over: Option<i32>,
    /// The previous attempt's unknown outcome was reconciled: claim anyway.
    pub reconciled: bool,
    /// This claim's id, kept across retries.
    pub claim: Uuid,
}

/// An attempt's end.
#[derive(Debug, Clone)]
pub(crate) struct FinishRow {
    pub id: Uuid,
    pub attempt: i32,
    pub duration_ms: i32,
    pub outcome: &'static str,
    pub http_status: Option<i32>,
    pub error_code: Option<String>,
    pub error_message: Option<String>,
    pub outcome_unknown: bool,
    pub provider_message_id: Option<String>,
    pub status: &'static str,
    pub reason: Option<String>,
}

/// An outcome without a provider call.
#[derive(Debug, Clone)]
pub(crate) struct RecordRow {
    pub message: MessageColumns,
    pub status: &'static str,
    pub reason: Option<String>,
}

impl AsRef<MessageColumns> for MessageColumns {
    fn as_ref(&self) -> &MessageColumns {
        self
    }
}

impl AsRef<MessageColumns> for ClaimRow {
    fn as_ref(&self) -> &MessageColumns {
        &self.message
    }
}

impl AsRef<MessageColumns> for RecordRow {
    fn as_ref(&self) -> &MessageColumns {
        &self.message
    }
}
