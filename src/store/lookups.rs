//! The log as support searches it (`smsgw status --to/--context/--school/--since`) and as
//! billing counts it (`smsgw usage`). Each lookup has an index behind it on a log of tens
//! of millions of rows; the plans are in docs/operations.md.

use serde_json::Value;
use time::OffsetDateTime;

use super::{
    Status, Store, StoreError,
    views::{MESSAGE_COLUMNS, MessageView},
};

/// Which messages to find; every filter given must hold. Newest first.
#[derive(Debug, Clone, Default)]
pub struct MessageSearch {
    /// E.164, as the log keeps it.
    pub recipient: Option<String>,
    pub school_id: Option<i64>,
    /// Created at or after.
    pub since: Option<OffsetDateTime>,
    /// The context contains any one of these objects (`{"booking_id": 981}` or
    /// `{"booking_id": "981"}`).
    pub context_any: Vec<Value>,
    pub limit: i64,
}

/// Messages and segments of one school in one status, over a range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageCount {
    pub school_id: i64,
    pub status: Status,
    pub messages: i64,
    pub segments: i64,
}

impl Store {
    /// The newest `search.limit` messages that match, newest first (ties by id, so that
    /// the order is the same every time).
    pub async fn find_messages(
        &self,
        search: &MessageSearch,
    ) -> Result<Vec<MessageView>, StoreError> {
        let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = Vec::new();
        let mut conditions = Vec::new();
        if let Some(recipient) = &search.recipient {
            params.push(recipient);
            conditions.push(format!("recipient = ${}", params.len()));
        }
        if let Some(school_id) = &search.school_id {
            params.push(school_id);
            conditions.push(format!("school_id = ${}", params.len()));
        }
        if let Some(since) = &search.since {
            params.push(since);
            conditions.push(format!("created_at >= ${}", params.len()));
        }
        if !search.context_any.is_empty() {
            // One `@>` per form, ORed: each is a scan of the GIN index.
            let any: Vec<String> = search
                .context_any
                .iter()
                .map(|object| {
                    params.push(object);
                    format!("context @> ${}", params.len())
                })
                .collect();
            conditions.push(format!("({})", any.join(" OR ")));
        }
        params.push(&search.limit);
        let sql = format!(
            "SELECT {MESSAGE_COLUMNS} FROM sms_messages WHERE {}
             ORDER BY created_at DESC, id DESC LIMIT ${}",
            where_clause(&conditions),
            params.len()
        );
        self.rows(&sql, &params)
            .await?
            .iter()
            .map(MessageView::from_row)
            .collect()
    }

    /// Messages and segments per school and status, of the messages created in
    /// `[from, to)`; of one school, or of every school that has any.
    pub async fn usage(
        &self,
        from: OffsetDateTime,
        to: OffsetDateTime,
        school_id: Option<i64>,
    ) -> Result<Vec<UsageCount>, StoreError> {
        const EVERY_SCHOOL: &str = "SELECT school_id, status, count(*) AS messages,
                                           COALESCE(sum(segments), 0)::bigint AS segments
                                    FROM sms_messages
                                    WHERE created_at >= $1 AND created_at < $2
                                    GROUP BY school_id, status";
        const ONE_SCHOOL: &str = "SELECT school_id, status, count(*) AS messages,
                                         COALESCE(sum(segments), 0)::bigint AS segments
                                  FROM sms_messages
                                  WHERE created_at >= $1 AND created_at < $2 AND school_id = $3
                                  GROUP BY school_id, status";
        let rows = match &school_id {
            None => self.rows(EVERY_SCHOOL, &[&from, &to]).await?,
            Some(id) => self.rows(ONE_SCHOOL, &[&from, &to, id]).await?,
        };
        rows.iter()
            .map(|row| {
                let status: String = row.try_get("status")?;
                Ok(UsageCount {
                    school_id: row.try_get("school_id")?,
                    status: Status::parse(&status)
                        .ok_or_else(|| StoreError::Corrupt(format!("status '{status}'")))?,
                    messages: row.try_get("messages")?,
                    segments: row.try_get("segments")?,
                })
            })
            .collect()
    }
}

/// The conditions joined with AND; `true` when there are none.
fn where_clause(conditions: &[String]) -> String {
    if conditions.is_empty() {
        "true".into()
    } else {
        conditions.join(" AND ")
    }
}
