//! Delivery receipts: kept in `sms_receipts`, and moving their message forward (never
//! back), also when the receipt came before the send's own record.

use std::{sync::LazyLock, time::Duration};

use tokio_postgres::Row;
use uuid::Uuid;

use super::{
    Store, StoreError, prepared,
    vocabulary::{Status, storable},
};

/// A delivery receipt, as a webhook reports it.
#[derive(Debug, Clone)]
pub struct Receipt<'a> {
    /// The provider type that sent it (`twilio`, `vonage`).
    pub provider: &'a str,
    pub provider_message_id: &'a str,
    /// The provider's own status word.
    pub provider_status: &'a str,
    /// Ours, when the word maps onto one.
    pub status: Option<Status>,
    pub error_code: Option<&'a str>,
    /// The recipient unsubscribed at the carrier (Twilio 21610).
    pub opted_out: bool,
    /// The configured providers whose secret signed it: it touches only messages sent
    /// through one of them, so one provider's webhook cannot move another's message that
    /// happens to share its id.
    pub signed_by: &'a [String],
}

/// The message a receipt was applied to.
#[derive(Debug, Clone)]
pub struct ReceiptApplied {
    pub id: Uuid,
    pub recipient: String,
    pub school_id: i64,
    /// Seconds since the provider accepted the message, by the database's clock.
    pub since_sent: Option<f64>,
}

impl ReceiptApplied {
    fn from_row(row: &Row) -> Result<Self, StoreError> {
        Ok(ReceiptApplied {
            id: row.try_get("id")?,
            recipient: row.try_get("recipient")?,
            school_id: row.try_get("school_id")?,
            since_sent: row.try_get("since_sent")?,
        })
    }
}

/// How far along a status is; a receipt only ever moves a message forward.
const RANK: &str = "CASE $S WHEN 'sent' THEN 1 WHEN 'undelivered' THEN 2 WHEN 'failed' THEN 2 \
                    WHEN 'delivered' THEN 3 ELSE 0 END";

fn rank(of: &str) -> String {
    RANK.replace("$S", of)
}

/// A message's rank as a receipt sees it: one given up for want of a receipt ranks as
/// `sent`, so the receipt that comes late still tells what happened.
static MESSAGE_RANK: LazyLock<String> = LazyLock::new(|| {
    format!(
        "CASE WHEN m.reason = '{NO_RECEIPT}' THEN 1 ELSE {} END",
        rank("m.status")
    )
});

/// The reason of a message given up for want of a receipt.
pub const NO_RECEIPT: &str = "no_receipt";

/// Gives up the sent messages whose attempt was accepted before `now() - $1` seconds
/// through one of the providers `$2`, walking at most `$3` accepted attempts on from where
/// the last walk stopped; see `schema/20261208000400_receipt_timeout.sql`. Returns how
/// many attempts it looked at and how many messages it gave up.
static GIVE_UP_ON_RECEIPTS: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH watch AS (
            SELECT started_at, message_id FROM sms_receipt_watch FOR UPDATE
         ), due AS (
            SELECT a.started_at, a.message_id, a.provider
              FROM sms_attempts a, watch w
             WHERE a.outcome = 'sent'
               AND (a.started_at, a.message_id) > (w.started_at, w.message_id)
               AND a.started_at <= now() - make_interval(secs => $1)
             ORDER BY a.started_at, a.message_id
             LIMIT $3
         ), given_up AS (
            UPDATE sms_messages m
               SET status = 'undelivered', reason = '{NO_RECEIPT}', updated_at = now()
              FROM due
             WHERE m.id = due.message_id AND due.provider = ANY($2) AND m.status = 'sent'
            RETURNING m.id
         ), walked AS (
            UPDATE sms_receipt_watch
               SET (started_at, message_id) = (
                       SELECT started_at, message_id FROM due
                        ORDER BY started_at DESC, message_id DESC LIMIT 1)
             WHERE EXISTS (SELECT 1 FROM due)
         )
         SELECT (SELECT count(*) FROM due) AS looked,
                (SELECT count(*) FROM given_up) AS given_up"
    )
});

/// Applies receipts that came before the messages' own records had the provider ids: per
/// message, the furthest receipt signed by the provider its attempt went through.
/// Receipts kept before `signed_by` existed apply as they always did.
pub(super) static APPLY_PENDING_RECEIPTS: LazyLock<String> = LazyLock::new(|| {
    format!(
        "UPDATE sms_messages m
            SET status = r.status, provider_status = r.provider_status,
                error_code = COALESCE(r.error_code, m.error_code),
                delivered_at = CASE WHEN r.status = 'delivered' THEN r.received_at
                                    ELSE m.delivered_at END,
                updated_at = now()
           FROM (SELECT DISTINCT ON (a.message_id)
                        a.message_id, r.status, r.provider_status, r.error_code, r.received_at
                   FROM sms_receipts r
                   JOIN sms_attempts a ON a.provider_message_id = r.provider_message_id
                  WHERE r.provider_message_id = ANY($1) AND r.status IS NOT NULL
                    AND (r.signed_by IS NULL OR a.provider = ANY(r.signed_by))
                  ORDER BY a.message_id, {rank_r} DESC, r.id DESC) r
          WHERE m.id = r.message_id AND {rank_r} > {rank_m}",
        rank_r = rank("r.status"),
        rank_m = rank("m.status"),
    )
});

/// Records a receipt and moves its message forward; see [`Store::apply_receipt`].
static APPLY_RECEIPT: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH kept AS (
            INSERT INTO sms_receipts
                (provider, provider_message_id, provider_status, status, error_code, signed_by)
            VALUES ($1, $2, $3, $4, $5, $6)
         )
         UPDATE sms_messages m
            SET status = CASE WHEN {new} > {old} THEN $4 ELSE m.status END,
                reason = CASE WHEN {new} > {old} AND m.reason = '{NO_RECEIPT}' THEN NULL
                              ELSE m.reason END,
                provider_status = CASE WHEN {new} >= {old} THEN $3 ELSE m.provider_status END,
                error_code = COALESCE($5, m.error_code),
                delivered_at = CASE WHEN $4 = 'delivered' AND {new} > {old} THEN now()
                                    ELSE m.delivered_at END,
                updated_at = now()
           FROM sms_attempts a
          WHERE a.provider_message_id = $2 AND a.outcome = 'sent' AND m.id = a.message_id
            AND a.provider = ANY($6)
            AND m.status IN ('sent', 'delivered', 'undelivered', 'failed')
          RETURNING m.id, m.recipient, m.school_id,
                    EXTRACT(EPOCH FROM now() - m.sent_at)::float8 AS since_sent",
        new = rank("$4"),
        old = MESSAGE_RANK.as_str(),
    )
});

/// The statement that applies pending receipts, ready to run on `client`.
pub(crate) async fn apply_pending_receipts(
    client: &deadpool_postgres::Client,
    sids: &[&str],
) -> Result<(), StoreError> {
    let statement = prepared(client, &APPLY_PENDING_RECEIPTS).await?;
    client.execute(&statement, &[&sids]).await?;
    Ok(())
}

/// One walk of [`Store::give_up_on_receipts`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReceiptsGivenUp {
    /// Accepted attempts looked at: fewer than asked means the walk has caught up.
    pub looked: u64,
    /// Messages that became `undelivered` / `no_receipt`.
    pub given_up: u64,
}

impl Store {
    /// Gives up, as `undelivered` / `no_receipt`, the messages still `sent` `timeout`
    /// after their provider (one of `providers`, those that send receipts) accepted them:
    /// at most `batch` accepted attempts on from the last walk, in one short statement.
    pub async fn give_up_on_receipts(
        &self,
        timeout: Duration,
        providers: &[String],
        batch: i64,
    ) -> Result<ReceiptsGivenUp, StoreError> {
        let row = self
            .row(
                &GIVE_UP_ON_RECEIPTS,
                &[&timeout.as_secs_f64(), &providers, &batch],
            )
            .await?
            .ok_or_else(|| StoreError::Config("the receipt watch has no row".into()))?;
        let count = |name: &str| -> Result<u64, StoreError> {
            Ok(u64::try_from(row.try_get::<_, i64>(name)?).unwrap_or(0))
        };
        Ok(ReceiptsGivenUp {
            looked: count("looked")?,
            given_up: count("given_up")?,
        })
    }

    /// Records a receipt and moves its message forward (never back: `delivered` stays
    /// `delivered`). `None` when no sent message has that provider id yet: the receipt is
    /// kept and applied when the send's own record lands.
    pub async fn apply_receipt(
        &self,
        receipt: &Receipt<'_>,
    ) -> Result<Option<ReceiptApplied>, StoreError> {
        // Two messages of one provider could share an id (two accounts' id spaces): the
        // first one answers, and a second is no error.
        let rows = self
            .rows(
                &APPLY_RECEIPT,
                &[
                    &receipt.provider,
                    &storable(receipt.provider_message_id),
                    &storable(receipt.provider_status),
                    &receipt.status.map(Status::as_str),
                    &receipt.error_code.map(storable),
                    &receipt.signed_by,
                ],
            )
            .await?;
        rows.first().map(ReceiptApplied::from_row).transpose()
    }

    /// Claims a webhook (`provider`, `webhook_id`) for applying: `false` when it was
    /// claimed before (a replay, or the same request arriving twice at once), which must
    /// then change nothing. One statement, so two copies racing cannot both win.
    pub async fn claim_webhook(
        &self,
        provider: &str,
        webhook_id: &str,
    ) -> Result<bool, StoreError> {
        Ok(self
            .row(
                "INSERT INTO sms_webhooks_seen (provider, webhook_id) VALUES ($1, $2)
                 ON CONFLICT DO NOTHING RETURNING 1",
                &[&provider, &storable(webhook_id)],
            )
            .await?
            .is_some())
    }

    /// Gives back the claim of a webhook that could not be applied, so that the
    /// provider's retry of it is applied.
    pub async fn release_webhook(
        &self,
        provider: &str,
        webhook_id: &str,
    ) -> Result<(), StoreError> {
        self.execute(
            "DELETE FROM sms_webhooks_seen WHERE provider = $1 AND webhook_id = $2",
            &[&provider, &storable(webhook_id)],
        )
        .await?;
        Ok(())
    }

    /// Deletes at most `batch` of the oldest receipts, those received before
    /// `older_than`; returns how many. Receipts are numbered as they come, so the oldest
    /// are the first by id: only the head of the table is read, however long it is.
    pub async fn purge_receipts(
        &self,
        older_than: Duration,
        batch: i64,
    ) -> Result<u64, StoreError> {
        self.execute(
            "DELETE FROM sms_receipts
              WHERE id IN (
                    SELECT id FROM (SELECT id, received_at FROM sms_receipts ORDER BY id LIMIT $2) head
                     WHERE received_at < now() - make_interval(secs => $1))",
            &[&older_than.as_secs_f64(), &batch],
        )
        .await
    }

    /// Deletes at most `batch` records of applied webhooks older than `older_than`, of
    /// `provider` only when given; returns how many. For a provider whose every webhook is
    /// signed with a time, a record outlives the window in which a replay would be
    /// accepted by no use.
    pub async fn forget_webhooks(
        &self,
        provider: Option<&str>,
        older_than: Duration,
        batch: i64,
    ) -> Result<u64, StoreError> {
        self.execute(
            "DELETE FROM sms_webhooks_seen
              WHERE (provider, webhook_id) IN (
                    SELECT provider, webhook_id FROM sms_webhooks_seen
                     WHERE received_at < now() - make_interval(secs => $1)
                       AND ($3::text IS NULL OR provider = $3)
                     LIMIT $2)",
            &[&older_than.as_secs_f64(), &batch, &provider],
        )
        .await
    }
}
