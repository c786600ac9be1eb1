//! The status events' outbox (`sms_events`). Triggers write a row in the transaction of
//! every status change (see the `status_events` migration); a relay turn takes rows out
//! in order, hands them to the broker, and commits once the broker confirmed them.
//!
//! One relay at a time: a relay turn runs in a transaction that holds an advisory lock,
//! so with several daemons relaying one outbox, turns follow one another and never
//! overlap. Within a turn, rows are published in `id` order, and `id` orders each message's
//! events (a message's next change waits for the row lock its previous change held until
//! it committed, and takes its `id` after that). So no message's events are ever
//! published out of order, and none twice, unless a relay dies between the broker's
//! confirm and its commit: then the next turn publishes those rows again, with the same
//! `event_id`.

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use serde_json::Value;
use time::OffsetDateTime;
use tokio_postgres::Row;
use uuid::Uuid;

use super::{Store, StoreError, connect::within};

/// The advisory lock that makes relay turns take turns (any constant unique to smsgw).
const RELAY_LOCK: i64 = 0x736d_7367_7700_0001;

/// An event waiting to be published.
// Status events are nearly all of them: boxing the large variant would allocate once per
// event for nothing (a turn keeps its events in one vector).
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum OutboxEvent {
    /// A message's status change, written by the log's triggers.
    Status(StatusEvent),
    /// Any other event (a reply, a rejected job; `sms_outbox`): published as its payload,
    /// under its routing key.
    Payload {
        event_id: Uuid,
        routing_key: String,
        payload: Value,
    },
}

/// The turn's advisory lock, if no other relay holds it.
async fn try_lock(turn: &deadpool_postgres::Transaction<'_>) -> Result<bool, StoreError> {
    let lock = turn
        .prepare_cached("SELECT pg_try_advisory_xact_lock($1)")
        .await?;
    Ok(turn.query_one(&lock, &[&RELAY_LOCK]).await?.try_get(0)?)
}

/// One step of a relay turn, within `limit`; `stuck` remembers that one ran out of time.
async fn bounded<T>(
    limit: Duration,
    stuck: &AtomicBool,
    step: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    let result = within(limit, step).await;
    if matches!(result, Err(StoreError::Timeout(_))) {
        stuck.store(true, Ordering::Relaxed);
    }
    result
}

/// Takes up to `limit` rows out with `statement`, in `id` order (RETURNING gives none).
async fn take(
    turn: &deadpool_postgres::Transaction<'_>,
    statement: &str,
    limit: i64,
    read: impl Fn(&Row) -> Result<OutboxEvent, StoreError>,
) -> Result<Vec<OutboxEvent>, StoreError> {
    let statement = turn.prepare_cached(statement).await?;
    let rows = turn.query(&statement, &[&limit]).await?;
    let mut events = rows
        .iter()
        .map(|row| Ok((row.try_get::<_, i64>("id")?, read(row)?)))
        .collect::<Result<Vec<_>, StoreError>>()?;
    events.sort_unstable_by_key(|(id, _)| *id);
    Ok(events.into_iter().map(|(_, event)| event).collect())
}

fn payload_event(row: &Row) -> Result<OutboxEvent, StoreError> {
    Ok(OutboxEvent::Payload {
        event_id: row.try_get("event_id")?,
        routing_key: row.try_get("routing_key")?,
        payload: row.try_get("payload")?,
    })
}

/// A status change waiting to be published.
#[derive(Debug, Clone, PartialEq)]
pub struct StatusEvent {
    pub message_id: Uuid,
    pub seq: i32,
    /// The announcement a recipient's message came from.
    pub bulk_id: Option<Uuid>,
    pub kind: String,
    pub school_id: i64,
    pub status: String,
    pub previous_status: Option<String>,
    pub reason: Option<String>,
    pub error_code: Option<String>,
    pub provider: Option<String>,
    pub provider_message_id: Option<String>,
    pub attempts: i32,
    pub segments: Option<i32>,
    pub context: Option<Value>,
    pub occurred_at: OffsetDateTime,
}

impl StatusEvent {
    fn from_row(row: &Row) -> Result<Self, StoreError> {
        Ok(StatusEvent {
            message_id: row.try_get("message_id")?,
            seq: row.try_get("seq")?,
            bulk_id: row.try_get("bulk_id")?,
            kind: row.try_get("type")?,
            school_id: row.try_get("school_id")?,
            status: row.try_get("status")?,
            previous_status: row.try_get("previous_status")?,
            reason: row.try_get("reason")?,
            error_code: row.try_get("error_code")?,
            provider: row.try_get("provider")?,
            provider_message_id: row.try_get("provider_message_id")?,
            attempts: row.try_get("attempts")?,
            segments: row.try_get("segments")?,
            context: row.try_get("context")?,
            occurred_at: row.try_get("occurred_at")?,
        })
    }
}

/// How far behind the relay is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OutboxBacklog {
    /// Rows waiting, from the ids: those between the first and the last waiting, the ids
    /// of rolled-back writes among them (a slight overestimate).
    pub events: i64,
    /// Age of the oldest, in seconds; 0 when none waits.
    pub oldest_seconds: f64,
    /// New events are written; when false, they are dropped and counted instead
    /// (`SMSGW_EVENTS_MAX_BACKLOG`).
    pub accepting: bool,
    /// Events ever dropped for the bound, account-wide.
    pub dropped: i64,
}

/// What a relay turn did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayTurn {
    /// Another daemon's relay holds the turn.
    Busy,
    /// This many events were published and removed.
    Relayed(usize),
}

/// A turn's statements: each takes rows out of one table in `id` order (the order of
/// the changes within it), and the turn publishes in the order of the statements.
const TAKE_STATUS: &str = "DELETE FROM sms_events
                            WHERE id IN (SELECT id FROM sms_events ORDER BY id LIMIT $1)
                           RETURNING id, message_id, seq, bulk_id, type, school_id, status,
                                     previous_status, reason, error_code, provider,
                                     provider_message_id, attempts, segments, context,
                                     occurred_at";
const TAKE_PAYLOADS: &str = "DELETE FROM sms_outbox
                              WHERE id IN (SELECT id FROM sms_outbox ORDER BY id LIMIT $1)
                             RETURNING id, event_id, routing_key, payload";

impl Store {
    /// Takes one relay turn: takes up to `limit` status events and up to `limit` other
    /// events out of the outbox, passes them to `publish` in order, and commits once it
    /// returned `Ok`. On an error the turn rolls back, and the events are published again
    /// by a later turn.
    pub async fn relay_events<E, F, Fut>(&self, limit: i64, publish: F) -> Result<RelayTurn, E>
    where
        E: From<StoreError>,
        F: FnOnce(Vec<OutboxEvent>) -> Fut,
        Fut: Future<Output = Result<(), E>>,
    {
        // Taken out and published in one transaction: if publishing fails, the turn
        // rolls back and the rows are back for the next one. Each statement is bounded,
        // publishing is bounded by the broker, and the server ends the session (and its
        // lock) if the daemon falls silent in between (`connect::Bounds`).
        let mut client = self.client().await?;
        let time = self.call_limit();
        let stuck = AtomicBool::new(false);
        let result = async {
            let turn = bounded(time, &stuck, async { Ok(client.transaction().await?) }).await?;
            if !bounded(time, &stuck, try_lock(&turn)).await? {
                return Ok(RelayTurn::Busy);
            }
            let status = take(&turn, TAKE_STATUS, limit, |row| {
                StatusEvent::from_row(row).map(OutboxEvent::Status)
            });
            let mut events = bounded(time, &stuck, status).await?;
            let others = take(&turn, TAKE_PAYLOADS, limit, payload_event);
            events.extend(bounded(time, &stuck, others).await?);
            if events.is_empty() {
                return Ok(RelayTurn::Relayed(0));
            }
            let taken = events.len();
            publish(events).await?;
            bounded(time, &stuck, async { Ok(turn.commit().await?) }).await?;
            Ok(RelayTurn::Relayed(taken))
        }
        .await;
        if stuck.load(Ordering::Relaxed) {
            drop(deadpool_postgres::Client::take(client));
            self.replace_pool();
        }
        result
    }

    /// How many events wait in the outbox, and for how long the oldest has. Read from
    /// the ends of the tables' primary keys, so it costs the same with a million rows
    /// waiting as with none (counting them would add load just when the relay is
    /// behind).
    pub async fn outbox_backlog(&self) -> Result<OutboxBacklog, StoreError> {
        const BACKLOG: &str = "SELECT COALESCE((SELECT max(id) - min(id) + 1 FROM sms_events), 0)
                  + COALESCE((SELECT max(id) - min(id) + 1 FROM sms_outbox), 0),
                    COALESCE(extract(epoch FROM now() - LEAST(
                        (SELECT occurred_at FROM sms_events ORDER BY id LIMIT 1),
                        (SELECT occurred_at FROM sms_outbox ORDER BY id LIMIT 1))), 0)::float8,
                    smsgw_events_gate_open(),
                    (SELECT CASE WHEN is_called THEN last_value ELSE 0 END
                       FROM sms_events_dropped)";
        let row = self
            .row(BACKLOG, &[])
            .await?
            .ok_or_else(|| StoreError::Corrupt("no backlog row".into()))?;
        Ok(OutboxBacklog {
            events: row.try_get(0)?,
            oldest_seconds: row.try_get::<_, f64>(1)?.max(0.0),
            accepting: row.try_get(2)?,
            dropped: row.try_get(3)?,
        })
    }

    /// Opens or closes the outbox to new events (see [`OutboxBacklog::accepting`]); true
    /// if this call changed it (several relays may decide the same at once).
    pub async fn accept_events(&self, accept: bool) -> Result<bool, StoreError> {
        const GATE: &str = "UPDATE sms_events_gate SET open = $1, changed_at = now()
                             WHERE open IS DISTINCT FROM $1";
        Ok(self.execute(GATE, &[&accept]).await? == 1)
    }
}

/// A job that will never be sent, as its `job.rejected` event tells the web app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RejectedJob<'a> {
    /// The same for every copy of one delivery's rejection.
    pub event_id: Uuid,
    pub job_id: Option<Uuid>,
    pub kind: Option<&'a str>,
    pub school_id: Option<i64>,
    pub reason: &'a str,
    /// Numbers already masked.
    pub error: &'a str,
}

impl Store {
    /// Writes a `job.rejected` event to the outbox (nothing with events off).
    pub async fn reject_job(&self, rejected: &RejectedJob<'_>) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO sms_outbox (event_id, routing_key, payload)
             SELECT $1::uuid, 'job.rejected', jsonb_build_object(
                        'event_id', $1::uuid, 'job_id', $2::uuid, 'type', $3::text,
                        'school_id', $4::bigint, 'reason', $5::text, 'error', $6::text,
                        'occurred_at', to_char(now() AT TIME ZONE 'UTC',
                                               'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'))
              WHERE smsgw_events_enabled()",
            &[
                &rejected.event_id,
                &rejected.job_id,
                &rejected.kind,
                &rejected.school_id,
                &rejected.reason,
                &rejected.error,
            ],
        )
        .await
        .map(|_| ())
    }
}
