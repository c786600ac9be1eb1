//! Withdrawals (interface section 15): a cancelled booking's unsent reminders and
//! confirmations end `cancelled`, and the booking is remembered so that those published
//! after the cancellation end so too.
//!
//! A booking is the context's `booking_id` as text, read by PostgreSQL (`->>`, `#>>`) on
//! both sides, so a reminder's and its cancellation's agree however a number is written.
//!
//! The withdrawal and the claim of an attempt (`log.rs`) are both conditional updates of
//! the message's row: `queued`/`retrying` to `cancelled`, and `queued`/`retrying` to
//! `sending`. PostgreSQL runs the second to reach the row after the first commits and
//! checks its condition again on the row as the first left it, so exactly one of them
//! changes it: a message is either sent or withdrawn, never both (docs/architecture.md).

use std::{sync::LazyLock, time::Duration};

use serde_json::Value;

use super::{Store, StoreError, vocabulary::keeps_body};
use crate::job::JobType;

/// The messages a cancellation withdraws, as the index `sms_messages_booking` is
/// written: a query that repeats its predicate word for word is one index lookup.
const WITHDRAWABLE: &str = "type IN ('booking_reminder', 'booking_confirmation')
      AND jsonb_typeof(context -> 'booking_id') IN ('string', 'number')";

/// A message a cancellation withdrew.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Withdrawn {
    pub kind: JobType,
    /// The provider it was recorded with.
    pub provider: Option<String>,
}

impl Store {
    /// Withdraws the school's unsent reminders and confirmations of `booking_id` (a
    /// string or a number) and remembers the booking for those that arrive later; returns
    /// the messages withdrawn. Safe to repeat: a second run finds nothing left to
    /// withdraw, and starts the window again.
    ///
    /// Its commit does not wait for the disk (`synchronous_commit` off for it alone):
    /// waiting took 4 ms of the statement's 4.3 (`pgbench`, on the bench's machine).
    /// Nothing is given up. The cancellation's own record (its claim, or whatever it
    /// ends as) is committed after this and waits for the disk, which writes the log up
    /// to it, this commit included; and its job is acked only then. A database crash can
    /// take away only a withdrawal whose job was not settled: it comes back and
    /// withdraws again.
    pub async fn withdraw_booking(
        &self,
        school_id: i64,
        booking_id: &Value,
    ) -> Result<Vec<Withdrawn>, StoreError> {
        static WITHDRAW: LazyLock<String> = LazyLock::new(|| {
            format!(
                "WITH booking AS (
                    INSERT INTO sms_withdrawals (school_id, booking_id)
                    VALUES ($1, $2::jsonb #>> '{{}}')
                    ON CONFLICT (school_id, booking_id) DO UPDATE SET withdrawn_at = now()
                    RETURNING booking_id, set_config('synchronous_commit', 'off', true)
                 )
                 UPDATE sms_messages m
                    SET status = 'cancelled', reason = 'booking_cancelled',
                        body = CASE WHEN {keep} THEN m.body END, updated_at = now()
                   FROM booking b
                  WHERE m.school_id = $1 AND (context ->> 'booking_id') = b.booking_id
                    AND {WITHDRAWABLE}
                    AND m.status IN ('queued', 'retrying')
                 RETURNING m.type, m.provider",
                keep = keeps_body("$3", "m.type"),
            )
        });
        let rows = self
            .rows(&WITHDRAW, &[&school_id, booking_id, &self.keep_body])
            .await?;
        rows.iter()
            .map(|row| {
                let kind: String = row.try_get("type")?;
                Ok(Withdrawn {
                    kind: JobType::parse(&kind)
                        .ok_or_else(|| StoreError::Corrupt(format!("unknown type '{kind}'")))?,
                    provider: row.try_get("provider")?,
                })
            })
            .collect()
    }

    /// Whether a cancellation of the school's `booking_id` was handled less than
    /// `window` ago: one lookup through the table's primary key.
    pub async fn booking_withdrawn(
        &self,
        school_id: i64,
        booking_id: &Value,
        window: Duration,
    ) -> Result<bool, StoreError> {
        const FIND: &str = "SELECT EXISTS (
                SELECT 1 FROM sms_withdrawals
                 WHERE school_id = $1 AND booking_id = $2::jsonb #>> '{}'
                   AND withdrawn_at > now() - make_interval(secs => $3))";
        let row = self
            .row(FIND, &[&school_id, booking_id, &window.as_secs_f64()])
            .await?
            .ok_or_else(|| StoreError::Corrupt("no answer from the withdrawals".into()))?;
        Ok(row.try_get(0)?)
    }

    /// Deletes at most `batch` cancelled bookings handled before `older_than` ago (past
    /// `SMSGW_WITHDRAW_WINDOW`, they withdraw nothing more); returns how many.
    pub async fn forget_withdrawals(
        &self,
        older_than: Duration,
        batch: i64,
    ) -> Result<u64, StoreError> {
        self.execute(
            "DELETE FROM sms_withdrawals
              WHERE (school_id, booking_id) IN (
                    SELECT school_id, booking_id FROM sms_withdrawals
                     WHERE withdrawn_at < now() - make_interval(secs => $1)
                     LIMIT $2 FOR UPDATE SKIP LOCKED)",
            &[&older_than.as_secs_f64(), &batch],
        )
        .await
    }
}
