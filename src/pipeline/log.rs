//! The message log as the pipeline sees it: the few reads and writes it needs, and the
//! rule for a database that does not answer (hold the delivery and try again).
//!
//! The daemon's log is the PostgreSQL [`Store`]; the unit tests use an in-memory log with
//! the same semantics, so every decision can be exercised without services.

use std::time::Duration;

use backon::Retryable;
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{Abandoned, Pipeline};
use crate::{
    phone::{PhoneNumber, redact_numbers},
    school::SchoolSettings,
    store::{
        Admission, AttemptRecord, Claim, GuardCheck, InboxCopy, MessageState, NewMessage,
        RejectedJob, Status, Store, StoreError, Withdrawn,
    },
};

/// Longest wait for one log operation before it counts as failed, unless the log says.
const STORE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the pipeline reads from and writes to the message log. Every write is safe to
/// repeat, even after a try that timed out but did commit.
pub trait MessageLog: ReconcileLog + SideLog {
    /// A school's settings, for one the cache does not know yet.
    fn school_settings(
        &self,
        school_id: i64,
    ) -> impl Future<Output = Result<Option<SchoolSettings>, StoreError>> + Send;

    fn message_state(
        &self,
        id: Uuid,
    ) -> impl Future<Output = Result<Option<MessageState>, StoreError>> + Send;

    /// `queued` rows for an announcement's recipients; a row already there stays.
    fn queue_messages(
        &self,
        messages: &[NewMessage<'_>],
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// `suppressed` rows with `reason` for messages refused before any was queued (an
    /// announcement refused whole); a row already there stays.
    fn suppress_messages(
        &self,
        messages: &[NewMessage<'_>],
        reason: &str,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Admits messages past the guards' counts, counting each once, or names the guard
    /// that refuses them (see [`Store::admit`]).
    fn admit(
        &self,
        check: &GuardCheck<'_>,
    ) -> impl Future<Output = Result<Admission, StoreError>> + Send;

    /// An outcome without a provider call. `Some` is the state found instead when the
    /// message already has an outcome or is in flight.
    fn record_without_call(
        &self,
        message: &NewMessage<'_>,
        status: Status,
        reason: Option<&str>,
    ) -> impl Future<Output = Result<Option<MessageState>, StoreError>> + Send;

    /// Claims the next attempt (see [`Store::begin_attempt`]).
    fn begin_attempt(
        &self,
        message: &NewMessage<'_>,
        take_over: Option<i32>,
        reconciled: bool,
        claim: Uuid,
    ) -> impl Future<Output = Result<Claim, StoreError>> + Send;

    fn finish_attempt(
        &self,
        id: Uuid,
        attempt: i32,
        record: &AttemptRecord<'_>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Withdraws the school's unsent reminders and confirmations of a cancelled booking,
    /// and remembers the booking for those that arrive later (see
    /// [`Store::withdraw_booking`]).
    fn withdraw_booking(
        &self,
        school_id: i64,
        booking_id: &Value,
    ) -> impl Future<Output = Result<Vec<Withdrawn>, StoreError>> + Send;

    /// Whether the school's booking was cancelled less than `window` ago.
    fn booking_withdrawn(
        &self,
        school_id: i64,
        booking_id: &Value,
        window: Duration,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// A statement got no answer in time: connections may have gone silent.
    fn stalled(&self) {}

    /// Longest wait for one operation (a connection, then its statements).
    fn time_limit(&self) -> Duration {
        STORE_TIMEOUT
    }
}

/// What handling a message writes beside its own row: an opt-out a provider reported,
/// the development inbox's copy, a rejected job's event.
pub trait SideLog: Send + Sync + 'static {
    fn add_opt_out(
        &self,
        school_id: Option<i64>,
        phone: &PhoneNumber,
        source: &str,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Keeps the development inbox's copy of a message (its body and sender).
    fn keep_in_inbox(
        &self,
        copy: &InboxCopy<'_>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Tells the web app that a job will never be sent (its `job.rejected` event).
    fn reject_job(
        &self,
        rejected: &RejectedJob<'_>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// What reconciling an attempt with an unknown outcome writes: the part of the log that
/// settles what a provider did or did not take.
pub trait ReconcileLog: Send + Sync + 'static {
    /// Gives a message with an unknown outcome up as `failed`, still marked unknown.
    fn fail_unknown(&self, id: Uuid) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The provider did take attempt `attempt`: it and the message are `sent`.
    fn adopt_attempt(
        &self,
        id: Uuid,
        attempt: i32,
        provider_message_id: &str,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Whether the provider's message `provider_message_id` is already recorded for a
    /// message other than `id`: then it is that one's, not ours to adopt.
    fn provider_message_taken(
        &self,
        provider_message_id: &str,
        id: Uuid,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;
}

impl ReconcileLog for Store {
    fn fail_unknown(&self, id: Uuid) -> impl Future<Output = Result<(), StoreError>> + Send {
        Store::fail_unknown(self, id)
    }

    fn adopt_attempt(
        &self,
        id: Uuid,
        attempt: i32,
        provider_message_id: &str,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        Store::adopt_attempt(self, id, attempt, provider_message_id)
    }

    fn provider_message_taken(
        &self,
        provider_message_id: &str,
        id: Uuid,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        Store::provider_message_taken(self, provider_message_id, id)
    }
}

impl MessageLog for Store {
    fn school_settings(
        &self,
        school_id: i64,
    ) -> impl Future<Output = Result<Option<SchoolSettings>, StoreError>> + Send {
        Store::school_settings(self, school_id)
    }

    fn message_state(
        &self,
        id: Uuid,
    ) -> impl Future<Output = Result<Option<MessageState>, StoreError>> + Send {
        Store::message_state(self, id)
    }

    fn queue_messages(
        &self,
        messages: &[NewMessage<'_>],
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        Store::queue_messages(self, messages)
    }

    fn suppress_messages(
        &self,
        messages: &[NewMessage<'_>],
        reason: &str,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        Store::suppress_messages(self, messages, reason)
    }

    fn admit(
        &self,
        check: &GuardCheck<'_>,
    ) -> impl Future<Output = Result<Admission, StoreError>> + Send {
        Store::admit(self, check)
    }

    fn record_without_call(
        &self,
        message: &NewMessage<'_>,
        status: Status,
        reason: Option<&str>,
    ) -> impl Future<Output = Result<Option<MessageState>, StoreError>> + Send {
        Store::record_without_call(self, message, status, reason)
    }

    fn begin_attempt(
        &self,
        message: &NewMessage<'_>,
        take_over: Option<i32>,
        reconciled: bool,
        claim: Uuid,
    ) -> impl Future<Output = Result<Claim, StoreError>> + Send {
        Store::begin_attempt(self, message, take_over, reconciled, claim)
    }

    fn finish_attempt(
        &self,
        id: Uuid,
        attempt: i32,
        record: &AttemptRecord<'_>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        Store::finish_attempt(self, id, attempt, record)
    }

    fn withdraw_booking(
        &self,
        school_id: i64,
        booking_id: &Value,
    ) -> impl Future<Output = Result<Vec<Withdrawn>, StoreError>> + Send {
        Store::withdraw_booking(self, school_id, booking_id)
    }

    fn booking_withdrawn(
        &self,
        school_id: i64,
        booking_id: &Value,
        window: Duration,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        Store::booking_withdrawn(self, school_id, booking_id, window)
    }

    fn stalled(&self) {
        self.replace_pool();
    }

    fn time_limit(&self) -> Duration {
        self.operation_limit()
    }
}

impl SideLog for Store {
    fn add_opt_out(
        &self,
        school_id: Option<i64>,
        phone: &PhoneNumber,
        source: &str,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        Store::add_opt_out(self, school_id, phone, source)
    }

    fn keep_in_inbox(
        &self,
        copy: &InboxCopy<'_>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        Store::keep_in_inbox(self, copy)
    }

    fn reject_job(
        &self,
        rejected: &RejectedJob<'_>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        Store::reject_job(self, rejected)
    }
}

impl<L: MessageLog> Pipeline<L> {
    /// Runs a log operation until it succeeds, waiting longer between tries, while the
    /// delivery stays unsettled. Gives up only when `abandon` fires, or when the database
    /// refused the data itself (no retry can record it).
    ///
    /// Each try has a time limit: a database that stops answering (a stalled connection
    /// sends no error) is treated like one that refuses.
    pub(super) async fn persist<T, F, Fut>(
        &self,
        abandon: &CancellationToken,
        mut op: F,
    ) -> Result<T, Abandoned>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        let limit = self.log.time_limit();
        let limited = || {
            let attempt = op();
            async move {
                tokio::time::timeout(limit, attempt)
                    .await
                    .unwrap_or(Err(StoreError::Timeout(limit)))
            }
        };
        let retrying = limited
            .retry(crate::retry::patiently())
            .when(|error| !error.is_data_error())
            .notify(|error, wait| {
                self.health.set_database(false);
                if matches!(error, StoreError::Timeout(_)) {
                    self.log.stalled();
                }
                tracing::warn!(
                    error = %redact_numbers(&error.to_string()),
                    retry_in = ?wait,
                    "database unavailable; holding the message"
                );
            });
        tokio::select! {
            result = retrying => {
                let value = result.map_err(|e| Abandoned::Unrecordable(e.to_string()))?;
                self.health.set_database(true);
                Ok(value)
            }
            () = abandon.cancelled() => Err(Abandoned::Stopping),
        }
    }
}
