//! The development inbox (`sms_inbox`): a copy of each message an inbox provider handled
//! (its body and sender), read together with the message's row in the log.
//!
//! Only a daemon whose provider is the inbox writes a copy, and production refuses that
//! provider, so in production the table stays empty. Emptying the inbox deletes copies and
//! never the log.

use std::{sync::LazyLock, time::Duration};

use time::OffsetDateTime;
use tokio_postgres::Row;
use uuid::Uuid;

use super::{Store, StoreError};

/// What the inbox keeps of a message, beside its row in the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboxCopy<'a> {
    pub message_id: Uuid,
    /// The text as handled: the log drops a login code's once it has an outcome.
    pub body: &'a str,
    /// The school's sender ID; `None` when the provider's default applies.
    pub sender: Option<&'a str>,
}

/// Which messages of the inbox: all, one recipient's, one school's, or both.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InboxFilter {
    /// As the log records it (E.164 when it could be read).
    pub to: Option<String>,
    pub school_id: Option<i64>,
}

/// A message of the inbox, as the page and the API show it.
#[derive(Debug, Clone, PartialEq)]
pub struct InboxMessage {
    pub message_id: Uuid,
    /// The id the web app published: an announcement's own for each of its recipients.
    pub job_id: Uuid,
    pub to: String,
    pub from: Option<String>,
    pub body: String,
    pub kind: String,
    pub school_id: i64,
    pub status: String,
    pub reason: Option<String>,
    pub segments: Option<i32>,
    pub attempts: i32,
    /// A receipt's error code, else the latest attempt's.
    pub error_code: Option<String>,
    /// The latest attempt's error, as the provider worded it.
    pub error: Option<String>,
    pub created_at: OffsetDateTime,
    pub updated_at: OffsetDateTime,
}

impl InboxMessage {
    fn from_row(row: &Row) -> Result<Self, StoreError> {
        Ok(InboxMessage {
            message_id: row.try_get("id")?,
            job_id: row.try_get("job_id")?,
            to: row.try_get("recipient")?,
            from: row.try_get("sender")?,
            body: row.try_get("body")?,
            kind: row.try_get("type")?,
            school_id: row.try_get("school_id")?,
            status: row.try_get("status")?,
            reason: row.try_get("reason")?,
            segments: row.try_get("segments")?,
            attempts: row.try_get("attempts")?,
            error_code: row.try_get("error_code")?,
            error: row.try_get("error_message")?,
            created_at: row.try_get("created_at")?,
            updated_at: row.try_get("updated_at")?,
        })
    }
}

/// `$1` the recipient, `$2` the school, each null for any.
const FILTER: &str = "($1::text IS NULL OR m.recipient = $1)
                  AND ($2::bigint IS NULL OR m.school_id = $2)";

impl Store {
    /// Keeps (or refreshes) the inbox's copy of a message.
    pub async fn keep_in_inbox(&self, copy: &InboxCopy<'_>) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO sms_inbox (message_id, body, sender) VALUES ($1, $2, $3)
             ON CONFLICT (message_id) DO UPDATE
                SET body = EXCLUDED.body, sender = EXCLUDED.sender",
            &[&copy.message_id, &copy.body, &copy.sender],
        )
        .await?;
        Ok(())
    }

    /// At most `limit` messages of the inbox, newest first.
    pub async fn inbox_messages(
        &self,
        filter: &InboxFilter,
        limit: i64,
    ) -> Result<Vec<InboxMessage>, StoreError> {
        static LIST: LazyLock<String> = LazyLock::new(|| {
            format!(
                "SELECT m.id, COALESCE(m.bulk_id, m.id) AS job_id, m.recipient, i.sender, i.body,
                    m.type, m.school_id, m.status, m.reason, m.segments, m.attempts,
                    COALESCE(m.error_code, a.error_code) AS error_code, a.error_message,
                    m.created_at, m.updated_at
               FROM sms_inbox i
               JOIN sms_messages m ON m.id = i.message_id
               LEFT JOIN LATERAL (SELECT error_code, error_message FROM sms_attempts
                                   WHERE message_id = m.id
                                   ORDER BY attempt DESC LIMIT 1) a ON true
              WHERE {FILTER}
              ORDER BY m.created_at DESC, m.id DESC
              LIMIT $3"
            )
        });
        self.rows(&LIST, &[&filter.to, &filter.school_id, &limit])
            .await?
            .iter()
            .map(InboxMessage::from_row)
            .collect()
    }

    /// Empties the inbox (the messages `filter` selects); the log keeps every row. Returns
    /// how many copies went.
    pub async fn empty_inbox(&self, filter: &InboxFilter) -> Result<u64, StoreError> {
        static EMPTY: LazyLock<String> = LazyLock::new(|| {
            format!(
                "DELETE FROM sms_inbox i
                  WHERE ($1::text IS NULL AND $2::bigint IS NULL)
                     OR EXISTS (SELECT 1 FROM sms_messages m
                                 WHERE m.id = i.message_id AND {FILTER})"
            )
        });
        self.execute(&EMPTY, &[&filter.to, &filter.school_id]).await
    }

    /// Deletes the replies sent through the inbox that `filter` selects (the inbox's
    /// conversations are emptied whole); returns how many.
    pub async fn empty_inbox_replies(&self, filter: &InboxFilter) -> Result<u64, StoreError> {
        self.execute(
            "DELETE FROM sms_replies
              WHERE provider = 'inbox'
                AND ($1::text IS NULL OR from_number = $1)
                AND ($2::bigint IS NULL OR school_id = $2)",
            &[&filter.to, &filter.school_id],
        )
        .await
    }

    /// Deletes at most `batch` copies kept before `older_than` ago; returns how many.
    pub async fn purge_inbox(&self, older_than: Duration, batch: i64) -> Result<u64, StoreError> {
        self.execute(
            "DELETE FROM sms_inbox
              WHERE message_id IN (SELECT message_id FROM sms_inbox
                                    WHERE kept_at < now() - make_interval(secs => $1)
                                    LIMIT $2)",
            &[&older_than.as_secs_f64(), &batch],
        )
        .await
    }
}
