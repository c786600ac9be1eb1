//! Delivery receipts: kept in `sms_receipts`, and moving their message forward (never
//! back), also when the receipt came before the send's own record.

use std::sync::LazyLock;

use tokio_postgres::Row;
use uuid::Uuid;

use super::{MessageStatus, Store, StoreError, messages::storable, prepared};

/// A delivery receipt, as a webhook reports it.
#[derive(Debug, Clone)]
pub struct Receipt<'a> {
    /// The provider type that sent it (`twilio`, `vonage`).
    pub provider: &'a str,
    pub provider_message_id: &'a str,
    /// The provider's own status word.
    pub provider_status: &'a str,
    /// Ours, when the word maps onto one.
    pub status: Option<MessageStatus>,
    pub error_code: Option<&'a str>,
    /// The recipient unsubscribed at the carrier (Twilio 21610).
    pub opted_out: bool,
}

/// The message a receipt was applied to.
#[derive(Debug, Clone)]
pub struct ReceiptApplied {
    pub id: Uuid,
    pub recipient: String,
    pub school_id: i64,
}

impl ReceiptApplied {
    fn from_row(row: &Row) -> Result<Self, StoreError> {
        Ok(ReceiptApplied {
            id: row.try_get("id")?,
            recipient: row.try_get("recipient")?,
            school_id: row.try_get("school_id")?,
        })
    }
}

/// How far along a status is; a receipt only ever moves a message forward.
const RANK: &str = "CASE $S WHEN 'sent' THEN 1 WHEN 'undelivered' THEN 2 WHEN 'failed' THEN 2 \
                    WHEN 'delivered' THEN 3 ELSE 0 END";

fn rank(of: &str) -> String {
    RANK.replace("$S", of)
}

/// Applies receipts that came before the messages' own records had the provider ids.
pub(super) static APPLY_PENDING_RECEIPTS: LazyLock<String> = LazyLock::new(|| {
    format!(
        "UPDATE sms_messages m
            SET status = r.status, provider_status = r.provider_status,
                error_code = COALESCE(r.error_code, m.error_code),
                delivered_at = CASE WHEN r.status = 'delivered' THEN r.received_at
                                    ELSE m.delivered_at END,
                updated_at = now()
           FROM (SELECT DISTINCT ON (provider_message_id)
                        provider_message_id, status, provider_status, error_code, received_at
                   FROM sms_receipts
                  WHERE provider_message_id = ANY($1) AND status IS NOT NULL
                  ORDER BY provider_message_id, {rank_inner} DESC, id DESC) r
           JOIN sms_attempts a ON a.provider_message_id = r.provider_message_id
          WHERE m.id = a.message_id AND {rank_r} > {rank_m}",
        rank_inner = rank("status"),
        rank_r = rank("r.status"),
        rank_m = rank("m.status"),
    )
});

/// Records a receipt and moves its message forward; see [`Store::apply_receipt`].
static APPLY_RECEIPT: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH kept AS (
            INSERT INTO sms_receipts
                (provider, provider_message_id, provider_status, status, error_code)
            VALUES ($1, $2, $3, $4, $5)
         )
         UPDATE sms_messages m
            SET status = CASE WHEN {new} > {old} THEN $4 ELSE m.status END,
                provider_status = CASE WHEN {new} >= {old} THEN $3 ELSE m.provider_status END,
                error_code = COALESCE($5, m.error_code),
                delivered_at = CASE WHEN $4 = 'delivered' AND {new} > {old} THEN now()
                                    ELSE m.delivered_at END,
                updated_at = now()
           FROM sms_attempts a
          WHERE a.provider_message_id = $2 AND a.outcome = 'sent' AND m.id = a.message_id
            AND m.status IN ('sent', 'delivered', 'undelivered', 'failed')
          RETURNING m.id, m.recipient, m.school_id",
        new = rank("$4"),
        old = rank("m.status"),
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

impl Store {
    /// Records a receipt and moves its message forward (never back: `delivered` stays
    /// `delivered`). `None` when no sent message has that provider id yet: the receipt is
    /// kept and applied when the send's own record lands.
    pub async fn apply_receipt(
        &self,
        receipt: &Receipt<'_>,
    ) -> Result<Option<ReceiptApplied>, StoreError> {
        // Two messages could share a provider id (two providers' id spaces): the first one
        // answers, and a second is no error.
        let rows = self
            .rows(
                &APPLY_RECEIPT,
                &[
                    &receipt.provider,
                    &storable(receipt.provider_message_id),
                    &storable(receipt.provider_status),
                    &receipt.status.map(MessageStatus::as_str),
                    &receipt.error_code.map(storable),
                ],
            )
            .await?;
        rows.first().map(ReceiptApplied::from_row).transpose()
    }
}
