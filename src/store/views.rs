//! A message and its attempts as support reads them (`smsgw status`, `dlq show`).

use std::sync::LazyLock;

use serde_json::Value;
use time::OffsetDateTime;
use tokio_postgres::Row;
use uuid::Uuid;

use super::{Store, StoreError};

/// The columns [`MessageView::from_row`] reads.
pub(super) const MESSAGE_COLUMNS: &str =
    "id, bulk_id, school_id, type, recipient, body, context, status, reason, provider,
     provider_message_id, provider_status, error_code, segments, attempts, created_at,
     sent_at, delivered_at, updated_at";

/// A message row, as support reads it.
#[derive(Debug, Clone)]
pub struct MessageView {
    pub id: Uuid,
    pub bulk_id: Option<Uuid>,
    pub school_id: i64,
    /// The `type` column.
    pub kind: String,
    pub recipient: String,
    pub body: Option<String>,
    pub context: Option<Value>,
    pub status: String,
    pub reason: Option<String>,
    pub provider: Option<String>,
    pub provider_message_id: Option<String>,
    pub provider_status: Option<String>,
    pub error_code: Option<String>,
    pub segments: Option<i32>,
    pub attempts: i32,
    pub created_at: OffsetDateTime,
    pub sent_at: Option<OffsetDateTime>,
    pub delivered_at: Option<OffsetDateTime>,
    pub updated_at: OffsetDateTime,
}

impl MessageView {
    pub(super) fn from_row(row: &Row) -> Result<Self, StoreError> {
        Ok(MessageView {
            id: row.try_get("id")?,
            bulk_id: row.try_get("bulk_id")?,
            school_id: row.try_get("school_id")?,
            kind: row.try_get("type")?,
            recipient: row.try_get("recipient")?,
            body: row.try_get("body")?,
            context: row.try_get("context")?,
            status: row.try_get("status")?,
            reason: row.try_get("reason")?,
            provider: row.try_get("provider")?,
            provider_message_id: row.try_get("provider_message_id")?,
            provider_status: row.try_get("provider_status")?,
            error_code: row.try_get("error_code")?,
            segments: row.try_get("segments")?,
            attempts: row.try_get("attempts")?,
            created_at: row.try_get("created_at")?,
            sent_at: row.try_get("sent_at")?,
            delivered_at: row.try_get("delivered_at")?,
            updated_at: row.try_get("updated_at")?,
        })
    }
}

/// One provider call, as support reads it.
#[derive(Debug, Clone)]
pub struct AttemptView {
    pub attempt: i32,
    pub provider: String,
    pub started_at: OffsetDateTime,
    pub duration_ms: Option<i32>,
    pub outcome: Option<String>,
    pub http_status: Option<i32>,
    pub error_code: Option<String>,
    pub error_message: Option<String>,
}

impl AttemptView {
    fn from_row(row: &Row) -> Result<Self, StoreError> {
        Ok(AttemptView {
            attempt: row.try_get("attempt")?,
            provider: row.try_get("provider")?,
            started_at: row.try_get("started_at")?,
            duration_ms: row.try_get("duration_ms")?,
            outcome: row.try_get("outcome")?,
            http_status: row.try_get("http_status")?,
            error_code: row.try_get("error_code")?,
            error_message: row.try_get("error_message")?,
        })
    }
}

impl Store {
    pub async fn message_view(&self, id: Uuid) -> Result<Option<MessageView>, StoreError> {
        static SQL: LazyLock<String> =
            LazyLock::new(|| format!("SELECT {MESSAGE_COLUMNS} FROM sms_messages WHERE id = $1"));
        self.row(&SQL, &[&id])
            .await?
            .as_ref()
            .map(MessageView::from_row)
            .transpose()
    }

    pub async fn attempt_views(&self, id: Uuid) -> Result<Vec<AttemptView>, StoreError> {
        self.rows(
            "SELECT attempt, provider, started_at, duration_ms, outcome, http_status,
                    error_code, error_message
             FROM sms_attempts WHERE message_id = $1 ORDER BY attempt",
            &[&id],
        )
        .await?
        .iter()
        .map(AttemptView::from_row)
        .collect()
    }
}
