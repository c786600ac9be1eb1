//! The message log (`sms_messages`, `sms_attempts`): the writes the pipeline makes,
//! through the recorder's batches when it runs.

use std::{sync::LazyLock, time::Duration};

use serde_json::Value;
use uuid::Uuid;

use super::{
    Store, StoreError, apply_pending_receipts, log, prepared,
    recorder::Op,
    vocabulary::{
        AttemptOutcome, Claim, ClaimRow, FinishRow, MessageColumns, MessageState, RecordRow,
        Status, keeps_body, storable,
    },
};
use crate::{job::JobType, segments::Encoding};

/// A message as first recorded.
#[derive(Debug, Clone)]
pub struct NewMessage<'a> {
    pub id: Uuid,
    pub bulk_id: Option<Uuid>,
    pub school_id: i64,
    pub kind: JobType,
    /// E.164 when it could be normalised, else as given.
    pub recipient: &'a str,
    pub body: &'a str,
    pub context: Option<&'a Value>,
    pub provider: &'a str,
    pub segments: Option<i32>,
    pub encoding: Option<Encoding>,
    /// Replayed from the dead-letter queue: a `failed` message may be tried again.
    pub reopen_failed: bool,
}

impl NewMessage<'_> {
    /// The row's columns, owned, for the batch writer.
    fn columns(&self) -> MessageColumns {
        MessageColumns {
            id: self.id,
            bulk_id: self.bulk_id,
            school_id: self.school_id,
            kind: self.kind.as_str(),
            recipient: self.recipient.to_owned(),
            body: self.body.to_owned(),
            context: self.context.cloned(),
            provider: self.provider.to_owned(),
            segments: self.segments,
            encoding: self.encoding.map(Encoding::as_str),
            reopen_failed: self.reopen_failed,
        }
    }
}

/// How one provider call ended, for `finish_attempt`.
#[derive(Debug, Clone)]
pub struct AttemptRecord<'a> {
    pub outcome: AttemptOutcome,
    pub duration: Duration,
    pub http_status: Option<u16>,
    pub error_code: Option<&'a str>,
    pub error_message: Option<&'a str>,
    /// The provider may have taken the message although the call failed.
    pub outcome_unknown: bool,
    pub provider_message_id: Option<&'a str>,
    /// The message's status after this attempt.
    pub status: Status,
    pub reason: Option<&'a str>,
}

impl Store {
    /// Removes the bodies of at most `batch` messages created before `older_than` ago;
    /// returns how many. Locked rows (in flight) are skipped, never waited for.
    pub async fn purge_bodies(&self, older_than: Duration, batch: i64) -> Result<u64, StoreError> {
        self.execute(
            "UPDATE sms_messages SET body = NULL
              WHERE id IN (SELECT id FROM sms_messages
                            WHERE body IS NOT NULL
                              AND created_at < now() - make_interval(secs => $1)
                            LIMIT $2 FOR UPDATE SKIP LOCKED)",
            &[&older_than.as_secs_f64(), &batch],
        )
        .await
    }

    /// Deletes at most `batch` finished messages (with their attempts) created before
    /// `older_than` ago; returns how many.
    pub async fn delete_messages(
        &self,
        older_than: Duration,
        batch: i64,
    ) -> Result<u64, StoreError> {
        self.execute(
            "DELETE FROM sms_messages
              WHERE id IN (SELECT id FROM sms_messages
                            WHERE created_at < now() - make_interval(secs => $1)
                              AND status NOT IN ('queued', 'sending', 'retrying')
                            LIMIT $2 FOR UPDATE SKIP LOCKED)",
            &[&older_than.as_secs_f64(), &batch],
        )
        .await
    }

    pub async fn message_state(&self, id: Uuid) -> Result<Option<MessageState>, StoreError> {
        on_connection!(self, |client| log::read_state(&client, id).await)
    }

    /// Writes a `queued` row for each message (left alone where the row exists): the
    /// recipients of an announcement are in the log as soon as it is accepted.
    pub async fn queue_messages(&self, messages: &[NewMessage<'_>]) -> Result<(), StoreError> {
        let rows: Vec<MessageColumns> = messages.iter().map(NewMessage::columns).collect();
        on_connection!(self, |client| log::queue_batch(&client, &rows).await)
    }

    /// Writes a `suppressed` row with `reason` for each message (left alone where the row
    /// exists): an announcement refused whole before any recipient was queued.
    pub async fn suppress_messages(
        &self,
        messages: &[NewMessage<'_>],
        reason: &str,
    ) -> Result<(), StoreError> {
        let rows: Vec<MessageColumns> = messages.iter().map(NewMessage::columns).collect();
        on_connection!(self, |client| log::suppress_batch(
            &client,
            &rows,
            reason,
            self.keep_body
        )
        .await)
    }

    /// Records a message that ends without a provider call (suppressed, expired, refused),
    /// or that waits (queued). Returns the state it found instead when the message already
    /// has an outcome or is in flight.
    pub async fn record_without_call(
        &self,
        message: &NewMessage<'_>,
        status: Status,
        reason: Option<&str>,
    ) -> Result<Option<MessageState>, StoreError> {
        let row = RecordRow {
            message: message.columns(),
            status: status.as_str(),
            reason: reason.map(str::to_owned),
        };
        match &self.recorder {
            Some(recorder) => recorder.write(|reply| Op::Record(row, reply)).await,
            None => on_connection!(self, |client| log::record_batch(
                &client,
                &[row],
                self.keep_body
            )
            .await)?
            .pop()
            .ok_or_else(|| StoreError::Corrupt("no answer".into())),
        }
    }

    /// Claims the next attempt: inserts the message (or moves it from `queued`/`retrying`,
    /// from `failed` when replayed, or takes over attempt `take_over` left open by a crash)
    /// to `sending`, recording the attempt as started. A message whose last attempt's
    /// outcome is unknown is claimed only once `reconciled` (the provider was asked).
    ///
    /// `claim` identifies this try: if the commit succeeded but its answer was lost with
    /// the connection, trying again with the same `claim` finds the attempt it started.
    pub async fn begin_attempt(
        &self,
        message: &NewMessage<'_>,
        take_over: Option<i32>,
        reconciled: bool,
        claim: Uuid,
    ) -> Result<Claim, StoreError> {
        let row = ClaimRow {
            message: message.columns(),
            take_over,
            reconciled,
            claim,
        };
        match &self.recorder {
            Some(recorder) => recorder.write(|reply| Op::Claim(row, reply)).await,
            None => on_connection!(self, |client| log::claim_batch(&client, &[row]).await)?
                .pop()
                .ok_or_else(|| StoreError::Corrupt("no answer".into())),
        }
    }

    /// Records how attempt `attempt` ended and the message's new status, atomically.
    pub async fn finish_attempt(
        &self,
        id: Uuid,
        attempt: i32,
        record: &AttemptRecord<'_>,
    ) -> Result<(), StoreError> {
        let row = FinishRow {
            id,
            attempt,
            duration_ms: i32::try_from(record.duration.as_millis()).unwrap_or(i32::MAX),
            outcome: record.outcome.as_str(),
            http_status: record.http_status.map(i32::from),
            error_code: record.error_code.map(storable),
            error_message: record.error_message.map(storable),
            outcome_unknown: record.outcome_unknown,
            provider_message_id: record.provider_message_id.map(storable),
            status: record.status.as_str(),
            reason: record.reason.map(storable),
        };
        match &self.recorder {
            Some(recorder) => recorder.write(|reply| Op::Finish(row, reply)).await,
            None => on_connection!(self, |client| log::finish_batch(
                &client,
                &[row],
                self.keep_body
            )
            .await),
        }
    }

    /// Gives a message up as `failed` (`outcome_unknown`) without another call. The flag
    /// `last_outcome_unknown` stays set: a replay of the dead letter asks the provider (or
    /// gives up again) instead of sending blindly.
    pub async fn fail_unknown(&self, id: Uuid) -> Result<(), StoreError> {
        static FAIL_UNKNOWN: LazyLock<String> = LazyLock::new(|| {
            format!(
                "UPDATE sms_messages
                    SET status = 'failed', reason = 'outcome_unknown',
                        body = CASE WHEN {keep} THEN body END, updated_at = now()
                  WHERE id = $1 AND status IN ('queued', 'sending', 'retrying')",
                keep = keeps_body("$2", "type"),
            )
        });
        self.execute(&FAIL_UNKNOWN, &[&id, &self.keep_body]).await?;
        Ok(())
    }

    /// The provider did take attempt `attempt` (found by asking it): records that attempt
    /// as sent with the provider's id, and the message as sent.
    pub async fn adopt_attempt(
        &self,
        id: Uuid,
        attempt: i32,
        provider_message_id: &str,
    ) -> Result<(), StoreError> {
        let provider_message_id = storable(provider_message_id);
        let provider_message_id = provider_message_id.as_str();
        static ADOPT: LazyLock<String> = LazyLock::new(|| {
            format!(
                "WITH attempt AS (
                INSERT INTO sms_attempts (message_id, attempt, provider, started_at, outcome,
                                          provider_message_id, error_message)
                SELECT m.id, $2, m.provider, COALESCE(m.attempt_started_at, now()), 'sent', $3,
                       '(reconciled: the provider had taken it)'
                  FROM sms_messages m WHERE m.id = $1
                ON CONFLICT (message_id, attempt) DO UPDATE
                   SET outcome = 'sent', outcome_unknown = false,
                       provider_message_id = EXCLUDED.provider_message_id,
                       error_message = concat_ws(' ', sms_attempts.error_message,
                                                 '(reconciled: the provider had taken it)')
             )
             UPDATE sms_messages
                SET status = 'sent', reason = NULL, provider_message_id = $3,
                    sent_at = COALESCE(sent_at, now()), last_outcome_unknown = false,
                    body = CASE WHEN {keep} THEN body END, updated_at = now()
              WHERE id = $1 AND status IN ('queued', 'sending', 'retrying', 'failed')",
                keep = keeps_body("$4", "type"),
            )
        });
        on_connection!(self, |client| {
            let adopt = prepared(&client, &ADOPT).await?;
            client
                .execute(
                    &adopt,
                    &[&id, &attempt, &provider_message_id, &self.keep_body],
                )
                .await?;
            apply_pending_receipts(&client, &[provider_message_id]).await
        })
    }

    /// Whether the provider's message `provider_message_id` is recorded on an attempt of a
    /// message other than `id`. Only `sms_attempts` is asked (through its index): every id
    /// on `sms_messages` is on one of its attempts too, except on messages from before
    /// attempts kept it, long older than any lookup reaches.
    pub async fn provider_message_taken(
        &self,
        provider_message_id: &str,
        id: Uuid,
    ) -> Result<bool, StoreError> {
        let provider_message_id = storable(provider_message_id);
        let row = self
            .row(
                "SELECT EXISTS (SELECT 1 FROM sms_attempts
                                 WHERE provider_message_id = $1 AND message_id <> $2)",
                &[&provider_message_id.as_str(), &id],
            )
            .await?;
        Ok(row.map(|row| row.try_get(0)).transpose()?.unwrap_or(false))
    }
}
