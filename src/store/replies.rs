//! Replies (`sms_replies`): every inbound text that is not a keyword, attributed to the
//! message it answers, and published through the outbox in the same statement.

use std::time::Duration;

use time::OffsetDateTime;
use tokio_postgres::Row;
use uuid::Uuid;

use super::{Store, StoreError, vocabulary::storable};
use crate::phone::PhoneNumber;

/// An inbound text to keep as a reply.
#[derive(Debug, Clone)]
pub struct NewReply<'a> {
    pub from: &'a PhoneNumber,
    /// The number it was sent to, as the provider gave it.
    pub to: &'a str,
    pub body: &'a str,
    /// The provider type (`twilio`, `vonage`, `inbox`).
    pub provider: &'a str,
    pub provider_message_id: &'a str,
    /// The gateways whose messages it may answer.
    pub gateways: &'a [&'a str],
    /// How far back the message it answers may have been sent.
    pub window: Duration,
}

/// A reply kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyRecorded {
    pub id: Uuid,
    pub school_id: Option<i64>,
    pub in_reply_to: Option<Uuid>,
}

/// A reply as support and the inbox read it.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplyView {
    pub id: Uuid,
    pub received_at: OffsetDateTime,
    pub from: String,
    pub to: String,
    /// `None` once purged.
    pub body: Option<String>,
    pub provider: String,
    pub school_id: Option<i64>,
    pub in_reply_to: Option<Uuid>,
}

impl ReplyView {
    fn from_row(row: &Row) -> Result<Self, StoreError> {
        Ok(ReplyView {
            id: row.try_get("id")?,
            received_at: row.try_get("received_at")?,
            from: row.try_get("from_number")?,
            to: row.try_get("to_number")?,
            body: row.try_get("body")?,
            provider: row.try_get("provider")?,
            school_id: row.try_get("school_id")?,
            in_reply_to: row.try_get("in_reply_to")?,
        })
    }
}

/// Which replies to find; every filter given must hold. Newest first.
#[derive(Debug, Clone, Default)]
pub struct ReplySearch {
    /// E.164.
    pub from: Option<String>,
    pub school_id: Option<i64>,
    /// Received at or after.
    pub since: Option<OffsetDateTime>,
    pub limit: i64,
}

/// Finds the message a reply answers, keeps the reply and writes its event, in one
/// statement: a replay (the same provider message id) adds neither.
const RECORD: &str = "
WITH answered AS (
    SELECT m.id, m.bulk_id, m.school_id, m.type, m.context
      FROM sms_messages m
     WHERE m.recipient = $2::text
       AND m.provider = ANY($8::text[])
       AND m.sent_at >= now() - make_interval(secs => $9::float8)
     ORDER BY m.sent_at DESC, m.id DESC
     LIMIT 1
), reply AS (
    INSERT INTO sms_replies (id, from_number, to_number, body, provider, provider_message_id,
                             school_id, in_reply_to)
    SELECT $1::uuid, $2::text, $3::text, $4::text, $5::text, $6::text,
           (SELECT school_id FROM answered), (SELECT id FROM answered)
    ON CONFLICT (provider, provider_message_id) DO NOTHING
    RETURNING id, received_at, school_id, in_reply_to
), event AS (
    INSERT INTO sms_outbox (event_id, routing_key, payload)
    SELECT $7::uuid, 'reply.received', jsonb_build_object(
               'event_id', $7::uuid, 'reply_id', r.id, 'school_id', r.school_id,
               'in_reply_to', r.in_reply_to, 'job_id', COALESCE(a.bulk_id, a.id),
               'type', a.type, 'context', a.context, 'from', $2::text, 'to', $3::text,
               'body', $4::text, 'provider', $5::text,
               'received_at', to_char(r.received_at AT TIME ZONE 'UTC',
                                      'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'))
      FROM reply r LEFT JOIN answered a ON a.id = r.in_reply_to
     WHERE smsgw_events_enabled()
)
SELECT id, school_id, in_reply_to FROM reply";

/// Namespace of replies' ids (any constant unique to smsgw).
const REPLIES: Uuid = Uuid::from_u128(0x736d_7367_7700_5245_504c_4945_5300_0001);

/// A reply's id and its event's, derived from the provider's message: a replay, even one
/// that comes after retention removed the row, is the same reply and the same event.
fn reply_ids(provider: &str, provider_message_id: &str) -> (Uuid, Uuid) {
    let id = Uuid::new_v5(
        &REPLIES,
        format!("{provider}:{provider_message_id}").as_bytes(),
    );
    (id, Uuid::new_v5(&id, b"reply.received"))
}

const REPLY_COLUMNS: &str =
    "id, received_at, from_number, to_number, body, provider, school_id, in_reply_to";

impl Store {
    /// Keeps an inbound text as a reply and writes its `reply.received` event; `None`
    /// when the provider's message was kept before (a replay).
    pub async fn record_reply(
        &self,
        reply: &NewReply<'_>,
    ) -> Result<Option<ReplyRecorded>, StoreError> {
        let gateways: Vec<&str> = reply.gateways.to_vec();
        let (id, event_id) = reply_ids(reply.provider, reply.provider_message_id);
        let row = self
            .row(
                RECORD,
                &[
                    &id,
                    &reply.from.as_str(),
                    &storable(reply.to),
                    &storable(reply.body),
                    &reply.provider,
                    &storable(reply.provider_message_id),
                    &event_id,
                    &gateways,
                    &reply.window.as_secs_f64(),
                ],
            )
            .await?;
        row.map(|row| {
            Ok(ReplyRecorded {
                id: row.try_get("id")?,
                school_id: row.try_get("school_id")?,
                in_reply_to: row.try_get("in_reply_to")?,
            })
        })
        .transpose()
    }

    /// The newest `search.limit` replies that match, newest first.
    pub async fn find_replies(&self, search: &ReplySearch) -> Result<Vec<ReplyView>, StoreError> {
        let sql = format!(
            "SELECT {REPLY_COLUMNS} FROM sms_replies
              WHERE ($1::text IS NULL OR from_number = $1)
                AND ($2::bigint IS NULL OR school_id = $2)
                AND ($3::timestamptz IS NULL OR received_at >= $3)
              ORDER BY received_at DESC, id DESC LIMIT $4"
        );
        self.rows(
            &sql,
            &[
                &search.from,
                &search.school_id,
                &search.since,
                &search.limit,
            ],
        )
        .await?
        .iter()
        .map(ReplyView::from_row)
        .collect()
    }

    /// Empties the bodies of at most `batch` replies received before `older_than` ago.
    pub async fn purge_reply_bodies(
        &self,
        older_than: Duration,
        batch: i64,
    ) -> Result<u64, StoreError> {
        self.execute(
            "UPDATE sms_replies SET body = NULL
              WHERE id IN (SELECT id FROM sms_replies
                            WHERE body IS NOT NULL
                              AND received_at < now() - make_interval(secs => $1)
                            LIMIT $2 FOR UPDATE SKIP LOCKED)",
            &[&older_than.as_secs_f64(), &batch],
        )
        .await
    }

    /// Deletes at most `batch` replies received before `older_than` ago.
    pub async fn delete_replies(
        &self,
        older_than: Duration,
        batch: i64,
    ) -> Result<u64, StoreError> {
        self.execute(
            "DELETE FROM sms_replies
              WHERE id IN (SELECT id FROM sms_replies
                            WHERE received_at < now() - make_interval(secs => $1)
                            LIMIT $2 FOR UPDATE SKIP LOCKED)",
            &[&older_than.as_secs_f64(), &batch],
        )
        .await
    }
}
