//! A person's right to erasure (`smsgw erase`): what smsgw keeps of one number, removed or
//! masked in one transaction. Their opt-outs stay: a suppression list is the one record
//! kept so that they are never texted again.

use super::{Store, StoreError};

/// What erasing a number touches (or would touch).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Erasure {
    /// Messages to the number: bodies removed, the number masked, the providers' error
    /// texts (which may quote it) removed; school, type, segments, dates and statuses
    /// kept for billing.
    pub messages: i64,
    /// Replies from the number: bodies removed, the number masked.
    pub replies: i64,
    /// The development inbox's copies of its messages, deleted.
    pub inbox_copies: i64,
    /// Its record of login codes in the guard's window, deleted.
    pub login_codes: i64,
    /// Its opt-outs, kept.
    pub opt_outs_kept: i64,
}

/// Counts what erasing `$1` would touch.
const COUNT: &str = "SELECT
    (SELECT count(*) FROM sms_messages WHERE recipient = $1) AS messages,
    (SELECT count(*) FROM sms_replies WHERE from_number = $1) AS replies,
    (SELECT count(*) FROM sms_inbox i
       JOIN sms_messages m ON m.id = i.message_id WHERE m.recipient = $1) AS inbox_copies,
    (SELECT count(*) FROM sms_guard_recipients WHERE phone = $1) AS login_codes,
    (SELECT count(*) FROM sms_opt_outs WHERE phone = $1) AS opt_outs_kept";

/// Erases `$1`, writing `$2` (its masked form) where the number stood; the counts as
/// [`COUNT`] gives them. The inbox's copies go before their messages lose the number.
const ERASE: &str = "WITH inbox AS (
        DELETE FROM sms_inbox i USING sms_messages m
         WHERE m.id = i.message_id AND m.recipient = $1
        RETURNING 1
    ), messages AS (
        UPDATE sms_messages SET body = NULL, recipient = $2, updated_at = now()
         WHERE recipient = $1
        RETURNING id
    ), attempts AS (
        UPDATE sms_attempts a SET error_message = NULL
          FROM messages m WHERE a.message_id = m.id AND a.error_message IS NOT NULL
        RETURNING 1
    ), replies AS (
        UPDATE sms_replies SET body = NULL, from_number = $2
         WHERE from_number = $1
        RETURNING 1
    ), login_codes AS (
        DELETE FROM sms_guard_recipients WHERE phone = $1
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM messages) AS messages,
           (SELECT count(*) FROM replies) AS replies,
           (SELECT count(*) FROM inbox) AS inbox_copies,
           (SELECT count(*) FROM login_codes) AS login_codes,
           (SELECT count(*) FROM sms_opt_outs WHERE phone = $1) AS opt_outs_kept,
           (SELECT count(*) FROM attempts) AS attempts";

impl Store {
    /// What erasing `number` (E.164) would touch; changes nothing.
    pub async fn erasure_preview(&self, number: &str) -> Result<Erasure, StoreError> {
        let row = self.row(COUNT, &[&number]).await?;
        row.map(|r| erasure(&r))
            .transpose()
            .map(Option::unwrap_or_default)
    }

    /// Erases `number` (E.164), writing `masked` in its place, in one transaction.
    pub async fn erase(&self, number: &str, masked: &str) -> Result<Erasure, StoreError> {
        let row = self.row(ERASE, &[&number, &masked]).await?;
        row.map(|r| erasure(&r))
            .transpose()
            .map(Option::unwrap_or_default)
    }
}

fn erasure(row: &tokio_postgres::Row) -> Result<Erasure, StoreError> {
    Ok(Erasure {
        messages: row.try_get("messages")?,
        replies: row.try_get("replies")?,
        inbox_copies: row.try_get("inbox_copies")?,
        login_codes: row.try_get("login_codes")?,
        opt_outs_kept: row.try_get("opt_outs_kept")?,
    })
}
