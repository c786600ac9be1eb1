//! The message log's batch statements: claim attempts, finish them, record outcomes
//! without a call, queue an announcement's recipients. Each takes many rows at once
//! (arrays unnested); the recorder (`recorder.rs`) decides which rows go together.
//!
//! The lookups of existing rows also say `id = ANY($1)`: it lets the planner reach them
//! through the primary key however the table's statistics look (a plan made while the
//! table was small would otherwise scan it whole, again and again, as it grows). The
//! updates join the input row by row instead, each through the primary key.
//!
//! Each statement is prepared once per connection (deadpool-postgres keeps it with the
//! connection), and its arrays travel in PostgreSQL's binary format.
//!
//! Each statement is safe to run again with the same input (a retry after a lost answer
//! finds its own claim; finishing and recording are conditional), and a batch never holds
//! two writes for one message: the later one waits for the next batch.

use std::{
    collections::{HashMap, HashSet},
    sync::LazyLock,
};

use deadpool_postgres::Client;
use serde_json::Value;
use time::OffsetDateTime;
use tokio_postgres::{Row, types::ToSql};
use uuid::Uuid;

use super::{
    Params, StoreError, prepared,
    vocabulary::{
        Claim, ClaimRow, FinishRow, MessageColumns, MessageState, RecordRow, Status,
        UnknownAttempt, keeps_body,
    },
};

/// The columns of a batch of new message rows, as arrays for `UNNEST`.
struct MessageArrays<'a> {
    id: Vec<Uuid>,
    bulk_id: Vec<Option<Uuid>>,
    school_id: Vec<i64>,
    kind: Vec<&'static str>,
    recipient: Vec<&'a str>,
    body: Vec<&'a str>,
    context: Vec<Option<&'a Value>>,
    provider: Vec<&'a str>,
    segments: Vec<Option<i32>>,
    encoding: Vec<Option<&'static str>>,
}

impl<'a> MessageArrays<'a> {
    fn of<R: AsRef<MessageColumns>>(rows: &'a [R]) -> Self {
        let columns = || rows.iter().map(AsRef::as_ref);
        MessageArrays {
            id: columns().map(|m| m.id).collect(),
            bulk_id: columns().map(|m| m.bulk_id).collect(),
            school_id: columns().map(|m| m.school_id).collect(),
            kind: columns().map(|m| m.kind).collect(),
            recipient: columns().map(|m| m.recipient.as_str()).collect(),
            body: columns().map(|m| m.body.as_str()).collect(),
            context: columns().map(|m| m.context.as_ref()).collect(),
            provider: columns().map(|m| m.provider.as_str()).collect(),
            segments: columns().map(|m| m.segments).collect(),
            encoding: columns().map(|m| m.encoding).collect(),
        }
    }

    /// `$1` to `$8` (id, bulk_id, school_id, type, recipient, body, context, provider),
    /// then `rest`.
    fn params<'p>(&'p self, rest: &[&'p (dyn ToSql + Sync)]) -> Vec<&'p (dyn ToSql + Sync)> {
        let mut params: Vec<&'p (dyn ToSql + Sync)> = vec![
            &self.id,
            &self.bulk_id,
            &self.school_id,
            &self.kind,
            &self.recipient,
            &self.body,
            &self.context,
            &self.provider,
        ];
        params.extend_from_slice(rest);
        params
    }
}

/// Runs `sql` (prepared once per connection) and returns its rows.
async fn query(client: &Client, sql: &str, params: &Params<'_>) -> Result<Vec<Row>, StoreError> {
    let statement = prepared(client, sql).await?;
    Ok(client.query(&statement, params).await?)
}

/// The answer rows of a batch statement by the uuid in their first column (the claim or
/// the message id), so each input row finds its answer in one lookup: a search per row
/// would cost a batch of 512 about 130,000 column reads.
fn by_first_column(rows: &[Row]) -> Result<HashMap<Uuid, &Row>, StoreError> {
    rows.iter()
        .map(|row| Ok((row.try_get::<_, Uuid>(0)?, row)))
        .collect()
}

/// A message's state, read from its row (before the statement changed anything).
fn state_of(row: &Row) -> Result<Option<MessageState>, StoreError> {
    let Some(status) = row.try_get::<_, Option<String>>("status")? else {
        return Ok(None);
    };
    let status = Status::parse(&status)
        .ok_or_else(|| StoreError::Corrupt(format!("unknown status '{status}'")))?;
    let attempts: i32 = row.try_get::<_, Option<i32>>("attempts")?.unwrap_or(0);
    let started: Option<OffsetDateTime> = row.try_get("attempt_started_at")?;
    let recorded: bool = row
        .try_get::<_, Option<bool>>("attempt_recorded")?
        .unwrap_or(false);
    let unknown: bool = row
        .try_get::<_, Option<bool>>("last_outcome_unknown")?
        .unwrap_or(false);
    let provider: Option<String> = row.try_get("provider")?;
    let open = status == Status::Sending && !recorded;
    Ok(Some(MessageState {
        status,
        attempts,
        open_attempt_started: started.filter(|_| open),
        unknown_attempt: started
            .filter(|_| open || unknown)
            .map(|started_at| UnknownAttempt {
                attempt: attempts,
                started_at,
                provider: provider.unwrap_or_default(),
            }),
    }))
}

/// The columns of a message's state, for the statements' final SELECT (alias `m`, the
/// row as it was before the statement).
const STATE_COLUMNS: &str = "m.status, m.attempts, m.attempt_started_at, m.last_outcome_unknown,
       m.provider, m.attempt_claim,
       EXISTS (SELECT 1 FROM sms_attempts a WHERE a.message_id = m.id AND a.attempt = m.attempts)
         AS attempt_recorded";

pub(crate) async fn read_state(
    client: &Client,
    id: Uuid,
) -> Result<Option<MessageState>, StoreError> {
    static SQL: LazyLock<String> =
        LazyLock::new(|| format!("SELECT {STATE_COLUMNS} FROM sms_messages m WHERE m.id = $1"));
    let rows = query(client, &SQL, &[&id]).await?;
    match rows.first() {
        Some(row) => state_of(row),
        None => Ok(None),
    }
}

/// The input rows whose recipient opted out, of every school or of the row's own: one
/// rule for both claim statements.
///
/// `OFFSET 0` keeps the test a lookup per row through the (phone, school) index. Without
/// it PostgreSQL turns the `EXISTS` into a semi join, and with the few rows it expects
/// from the arrays it hashes the whole opt-out table for every batch: with 2,000
/// opt-outs that was 0.5 ms of a 20-row claim's 1.1 (`EXPLAIN ANALYZE`), growing with
/// the table.
const REFUSED: &str = "refused AS (
            SELECT i.id FROM input i
             WHERE EXISTS (SELECT 1 FROM sms_opt_outs o
                            WHERE o.phone = i.recipient
                              AND (o.school_id IS NULL OR o.school_id = i.school_id)
                            OFFSET 0)
         ),";

/// A claim of a message seen for the first time: one insert.
static CLAIM_NEW: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH input AS (
            SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::int8[], $4::text[], $5::text[],
                                 $6::text[], $7::jsonb[], $8::text[], $9::int4[], $10::uuid[],
                                 $11::text[])
              AS t(id, bulk_id, school_id, type, recipient, body, context, provider,
                   segments, claim, encoding)
         ),
         {REFUSED}
         inserted AS (
            INSERT INTO sms_messages (id, bulk_id, school_id, type, recipient, body, context,
                                      status, provider, attempts, segments,
                                      attempt_started_at, attempt_claim, encoding)
            SELECT i.id, i.bulk_id, i.school_id, i.type, i.recipient, i.body, i.context,
                   'sending', i.provider, 1, i.segments, now(), i.claim, i.encoding
              FROM input i
             WHERE i.id NOT IN (SELECT id FROM refused)
            ON CONFLICT (id) DO NOTHING
            RETURNING id
         )
         SELECT i.claim, i.id IN (SELECT id FROM inserted) AS inserted,
                i.id IN (SELECT id FROM refused) AS refused
           FROM input i"
    )
});

/// The full claim: take over, reopen, retry, or report what is there.
static CLAIM_EXISTING: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH input AS (
            SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::int8[], $4::text[], $5::text[],
                                 $6::text[], $7::jsonb[], $8::text[], $9::int4[], $10::bool[],
                                 $11::uuid[], $12::int4[], $13::bool[], $14::text[])
              AS t(id, bulk_id, school_id, type, recipient, body, context, provider, take_over,
                   reopen_failed, claim, segments, reconciled, encoding)
         ),
         cut_off AS (
            INSERT INTO sms_attempts (message_id, attempt, provider, started_at)
            SELECT m.id, m.attempts, m.provider, COALESCE(m.attempt_started_at, now())
              FROM sms_messages m JOIN input i ON i.id = m.id
             WHERE m.id = ANY($1) AND m.status = 'sending' AND m.attempts = i.take_over
            ON CONFLICT (message_id, attempt) DO NOTHING
         ),
         {REFUSED}
         updated AS (
            UPDATE sms_messages m
               SET status = 'sending', attempts = m.attempts + 1, provider = i.provider,
                   recipient = i.recipient, reason = NULL, attempt_started_at = now(),
                   attempt_claim = i.claim, last_outcome_unknown = false,
                   encoding = COALESCE(i.encoding, m.encoding), updated_at = now()
              FROM input i
             WHERE m.id = i.id
               AND i.id NOT IN (SELECT id FROM refused)
               AND ((m.status IN ('queued', 'retrying')
                     AND (i.reconciled OR NOT m.last_outcome_unknown))
                    OR (m.status = 'sending' AND m.attempts = i.take_over)
                    OR (i.reopen_failed AND m.status = 'failed'))
            RETURNING m.id, m.attempts
         ),
         inserted AS (
            INSERT INTO sms_messages (id, bulk_id, school_id, type, recipient, body, context,
                                      status, provider, attempts, segments, attempt_started_at,
                                      attempt_claim, encoding)
            SELECT i.id, i.bulk_id, i.school_id, i.type, i.recipient, i.body, i.context,
                   'sending', i.provider, 1, i.segments, now(), i.claim, i.encoding
              FROM input i
             WHERE NOT EXISTS (SELECT 1 FROM sms_messages x WHERE x.id = ANY($1) AND x.id = i.id)
               AND i.id NOT IN (SELECT id FROM refused)
            ON CONFLICT (id) DO NOTHING
            RETURNING id, attempts
         )
         SELECT i.claim AS input_claim, COALESCE(u.attempts, n.attempts) AS claimed,
                i.id IN (SELECT id FROM refused) AS opted_out, {STATE_COLUMNS}
           FROM input i
           LEFT JOIN updated u ON u.id = i.id
           LEFT JOIN inserted n ON n.id = i.id
           LEFT JOIN (SELECT * FROM sms_messages WHERE id = ANY($1)) m ON m.id = i.id"
    )
});

/// A claim that may have a message row already (taken over, reopened, or queued by its
/// announcement's fan-out) goes straight to the full statement.
fn may_exist(row: &ClaimRow) -> bool {
    row.take_over.is_some() || row.message.reopen_failed || row.message.bulk_id.is_some()
}

/// Claims attempts: first the cheap way (a new message is one insert), then the full
/// statement for the messages that already exist.
pub(crate) async fn claim_batch(
    client: &Client,
    rows: &[ClaimRow],
) -> Result<Vec<Claim>, StoreError> {
    let fresh: Vec<&ClaimRow> = rows.iter().filter(|r| !may_exist(r)).collect();
    let mut answers: Vec<Option<Claim>> = vec![None; rows.len()];
    if !fresh.is_empty() {
        let mut found = claim_new(client, &fresh).await?.into_iter();
        for (answer, _) in answers.iter_mut().zip(rows).filter(|(_, r)| !may_exist(r)) {
            *answer = found
                .next()
                .ok_or_else(|| StoreError::Corrupt("a claim without its answer".into()))?;
        }
    }
    let rest: Vec<ClaimRow> = rows
        .iter()
        .zip(&answers)
        .filter(|(_, answer)| answer.is_none())
        .map(|(row, _)| row.clone())
        .collect();
    let mut full = if rest.is_empty() {
        Vec::new().into_iter()
    } else {
        claim_existing(client, &rest).await?.into_iter()
    };
    answers
        .into_iter()
        .map(|answer| {
            answer
                .or_else(|| full.next())
                .ok_or_else(|| StoreError::Corrupt("a claim without its answer".into()))
        })
        .collect()
}

/// The cheap claim, for each row: started, opted out, or `None` (the message has a row
/// already: the full statement decides).
async fn claim_new(client: &Client, rows: &[&ClaimRow]) -> Result<Vec<Option<Claim>>, StoreError> {
    let columns = MessageArrays::of(rows);
    let claims: Vec<Uuid> = rows.iter().map(|r| r.claim).collect();
    let result = query(
        client,
        &CLAIM_NEW,
        &columns.params(&[&columns.segments, &claims, &columns.encoding]),
    )
    .await?;
    let result = by_first_column(&result)?;
    rows.iter()
        .map(|row| {
            let found = result
                .get(&row.claim)
                .copied()
                .ok_or_else(|| StoreError::Corrupt("a claim without its answer".into()))?;
            Ok(if found.try_get::<_, bool>("inserted")? {
                Some(Claim::Started { attempt: 1 })
            } else if found.try_get::<_, bool>("refused")? {
                Some(Claim::OptedOut)
            } else {
                None
            })
        })
        .collect()
}

async fn claim_existing(client: &Client, rows: &[ClaimRow]) -> Result<Vec<Claim>, StoreError> {
    let columns = MessageArrays::of(rows);
    let take_over: Vec<Option<i32>> = rows.iter().map(|r| r.take_over).collect();
    let reopen_failed: Vec<bool> = rows.iter().map(|r| r.message.reopen_failed).collect();
    let claims: Vec<Uuid> = rows.iter().map(|r| r.claim).collect();
    let reconciled: Vec<bool> = rows.iter().map(|r| r.reconciled).collect();
    let params = columns.params(&[
        &take_over,
        &reopen_failed,
        &claims,
        &columns.segments,
        &reconciled,
        &columns.encoding,
    ]);
    let result = query(client, &CLAIM_EXISTING, &params).await?;
    let result = by_first_column(&result)?;
    let mut claims = Vec::with_capacity(rows.len());
    for row in rows {
        let found = result
            .get(&row.claim)
            .copied()
            .ok_or_else(|| StoreError::Corrupt("a claim without its answer".into()))?;
        if let Some(attempt) = found.try_get::<_, Option<i32>>("claimed")? {
            claims.push(Claim::Started { attempt });
            continue;
        }
        if found.try_get::<_, bool>("opted_out")? {
            claims.push(Claim::OptedOut);
            continue;
        }
        // Our own earlier try of this claim committed, but its answer was lost.
        if found.try_get::<_, Option<Uuid>>("attempt_claim")? == Some(row.claim) {
            let attempt = found.try_get::<_, Option<i32>>("attempts")?.unwrap_or(1);
            claims.push(Claim::Started { attempt });
            continue;
        }
        match state_of(found)? {
            Some(state) => claims.push(Claim::Busy(state)),
            // Inserted by another statement at the same moment: in flight elsewhere.
            None => claims.push(Claim::Busy(MessageState {
                status: Status::Sending,
                attempts: 1,
                open_attempt_started: Some(OffsetDateTime::now_utc()),
                unknown_attempt: None,
            })),
        }
    }
    Ok(claims)
}

/// Records attempts' ends and their messages' new statuses.
static FINISH: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH input AS (
            SELECT * FROM UNNEST($1::uuid[], $2::int4[], $3::int4[], $4::text[], $5::int4[],
                                 $6::text[], $7::text[], $8::bool[], $9::text[], $10::text[],
                                 $11::text[])
              AS t(id, attempt, duration_ms, outcome, http_status, error_code, error_message,
                   outcome_unknown, sid, status, reason)
         ),
         attempt AS (
            INSERT INTO sms_attempts (message_id, attempt, provider, started_at, duration_ms,
                                      outcome, http_status, error_code, error_message,
                                      outcome_unknown, provider_message_id)
            SELECT i.id, i.attempt, m.provider, COALESCE(m.attempt_started_at, now()),
                   i.duration_ms, i.outcome, i.http_status, i.error_code, i.error_message,
                   i.outcome_unknown, i.sid
              FROM input i JOIN sms_messages m ON m.id = i.id AND m.id = ANY($1)
            ON CONFLICT (message_id, attempt) DO UPDATE
               SET duration_ms = EXCLUDED.duration_ms, outcome = EXCLUDED.outcome,
                   http_status = EXCLUDED.http_status, error_code = EXCLUDED.error_code,
                   error_message = EXCLUDED.error_message,
                   outcome_unknown = EXCLUDED.outcome_unknown,
                   provider_message_id = EXCLUDED.provider_message_id
         )
         UPDATE sms_messages m
            SET status = i.status, reason = i.reason,
                provider_message_id = COALESCE(i.sid, m.provider_message_id),
                sent_at = CASE WHEN i.status = 'sent' THEN now() ELSE m.sent_at END,
                body = CASE WHEN i.status = 'retrying' OR {keep} THEN m.body END,
                last_outcome_unknown = i.outcome_unknown, updated_at = now()
           FROM input i
          WHERE m.id = i.id AND m.status = 'sending' AND m.attempts = i.attempt",
        keep = keeps_body("$12", "m.type"),
    )
});

/// Finishes attempts, then applies the receipts that arrived before the provider ids
/// were recorded. Both statements go out together on one connection (pipelined): the
/// server runs them in order, each its own transaction, so the second sees the first's
/// ids without waiting a round trip for its answer.
pub(crate) async fn finish_batch(
    client: &Client,
    rows: &[FinishRow],
    keep_body: bool,
) -> Result<(), StoreError> {
    let finish = prepared(client, &FINISH).await?;
    let receipts = prepared(client, &super::receipts::APPLY_PENDING_RECEIPTS).await?;
    let ids: Vec<Uuid> = rows.iter().map(|r| r.id).collect();
    let attempts: Vec<i32> = rows.iter().map(|r| r.attempt).collect();
    let durations: Vec<i32> = rows.iter().map(|r| r.duration_ms).collect();
    let outcomes: Vec<&str> = rows.iter().map(|r| r.outcome).collect();
    let http_statuses: Vec<Option<i32>> = rows.iter().map(|r| r.http_status).collect();
    let error_codes: Vec<Option<&str>> = rows.iter().map(|r| r.error_code.as_deref()).collect();
    let error_messages: Vec<Option<&str>> =
        rows.iter().map(|r| r.error_message.as_deref()).collect();
    let unknown: Vec<bool> = rows.iter().map(|r| r.outcome_unknown).collect();
    let sids: Vec<Option<&str>> = rows
        .iter()
        .map(|r| r.provider_message_id.as_deref())
        .collect();
    let statuses: Vec<&str> = rows.iter().map(|r| r.status).collect();
    let reasons: Vec<Option<&str>> = rows.iter().map(|r| r.reason.as_deref()).collect();
    let params: [&(dyn ToSql + Sync); 12] = [
        &ids,
        &attempts,
        &durations,
        &outcomes,
        &http_statuses,
        &error_codes,
        &error_messages,
        &unknown,
        &sids,
        &statuses,
        &reasons,
        &keep_body,
    ];
    let known_sids: Vec<&str> = sids.iter().flatten().copied().collect();
    let apply_receipts = async {
        if !known_sids.is_empty() {
            client.execute(&receipts, &[&known_sids]).await?;
        }
        Ok::<_, tokio_postgres::Error>(0)
    };
    tokio::try_join!(client.execute(&finish, &params), apply_receipts)?;
    Ok(())
}

/// A record of a message seen for the first time: one insert.
static RECORD_NEW: LazyLock<String> = LazyLock::new(|| {
    format!(
        "INSERT INTO sms_messages (id, bulk_id, school_id, type, recipient, body,
                               context, status, reason, provider, segments, encoding)
     SELECT id, bulk_id, school_id, type, recipient,
            CASE WHEN status = 'queued' OR {keep} THEN body END, context, status, reason,
            provider, segments, encoding
       FROM UNNEST($1::uuid[], $2::uuid[], $3::int8[], $4::text[], $5::text[],
                   $6::text[], $7::jsonb[], $8::text[], $9::int4[], $10::text[],
                   $11::text[], $13::text[])
         AS t(id, bulk_id, school_id, type, recipient, body, context, provider,
              segments, status, reason, encoding)
     ON CONFLICT (id) DO NOTHING
     RETURNING id",
        keep = keeps_body("$12", "type"),
    )
});

/// The full record; see [`record_existing`].
static RECORD_EXISTING: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH input AS (
            SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::int8[], $4::text[], $5::text[],
                                 $6::text[], $7::jsonb[], $8::text[], $9::int4[], $10::bool[],
                                 $11::text[], $12::text[], $14::text[])
              AS t(id, bulk_id, school_id, type, recipient, body, context, provider, segments,
                   reopen_failed, status, reason, encoding)
         ),
         updated AS (
            UPDATE sms_messages m
               SET status = i.status, reason = i.reason,
                   body = CASE WHEN i.status = 'queued' OR {keep_row} THEN m.body END,
                   updated_at = now()
              FROM input i
             WHERE m.id = i.id
               AND (m.status IN ('queued', 'retrying') OR (i.reopen_failed AND m.status = 'failed'))
            RETURNING m.id
         ),
         inserted AS (
            INSERT INTO sms_messages (id, bulk_id, school_id, type, recipient, body, context,
                                      status, reason, provider, segments, encoding)
            SELECT i.id, i.bulk_id, i.school_id, i.type, i.recipient,
                   CASE WHEN i.status = 'queued' OR {keep_input} THEN i.body END, i.context,
                   i.status, i.reason, i.provider, i.segments, i.encoding
              FROM input i
             WHERE NOT EXISTS (SELECT 1 FROM sms_messages x WHERE x.id = ANY($1) AND x.id = i.id)
            ON CONFLICT (id) DO NOTHING
            RETURNING id
         )
         SELECT i.id AS input_id, (u.id IS NOT NULL OR n.id IS NOT NULL) AS done, {STATE_COLUMNS}
           FROM input i
           LEFT JOIN updated u ON u.id = i.id
           LEFT JOIN inserted n ON n.id = i.id
           LEFT JOIN (SELECT * FROM sms_messages WHERE id = ANY($1)) m ON m.id = i.id",
        keep_row = keeps_body("$13", "m.type"),
        keep_input = keeps_body("$13", "i.type"),
    )
});

/// An announcement's recipients and reopened messages have their rows already.
fn is_new(row: &RecordRow) -> bool {
    !row.message.reopen_failed && row.message.bulk_id.is_none()
}

/// Records outcomes reached without a call (suppressed, expired, invalid, ...): first the
/// cheap way (a message seen for the first time is one insert), then the full statement
/// for the messages that already have a row.
pub(crate) async fn record_batch(
    client: &Client,
    rows: &[RecordRow],
    keep_body: bool,
) -> Result<Vec<Option<MessageState>>, StoreError> {
    let fresh: Vec<&RecordRow> = rows.iter().filter(|r| is_new(r)).collect();
    let inserted = if fresh.is_empty() {
        HashSet::new()
    } else {
        record_new(client, &fresh, keep_body).await?
    };
    let rest: Vec<RecordRow> = rows
        .iter()
        .filter(|r| !inserted.contains(&r.message.id))
        .cloned()
        .collect();
    let mut full = if rest.is_empty() {
        Vec::new().into_iter()
    } else {
        record_existing(client, &rest, keep_body).await?.into_iter()
    };
    rows.iter()
        .map(|row| {
            if inserted.contains(&row.message.id) {
                Ok(None)
            } else {
                full.next()
                    .ok_or_else(|| StoreError::Corrupt("a record without its answer".into()))
            }
        })
        .collect()
}

/// The cheap record; the ids of the messages it inserted.
async fn record_new(
    client: &Client,
    rows: &[&RecordRow],
    keep_body: bool,
) -> Result<HashSet<Uuid>, StoreError> {
    let columns = MessageArrays::of(rows);
    let statuses: Vec<&str> = rows.iter().map(|r| r.status).collect();
    let reasons: Vec<Option<&str>> = rows.iter().map(|r| r.reason.as_deref()).collect();
    let params = columns.params(&[
        &columns.segments,
        &statuses,
        &reasons,
        &keep_body,
        &columns.encoding,
    ]);
    query(client, &RECORD_NEW, &params)
        .await?
        .iter()
        .map(|row| Ok(row.try_get::<_, Uuid>(0)?))
        .collect()
}

/// The full record: a message without a row gets one; a message with a row is recorded
/// if it may still change (queued, retrying, or a failure being reopened), otherwise its
/// state is reported.
async fn record_existing(
    client: &Client,
    rows: &[RecordRow],
    keep_body: bool,
) -> Result<Vec<Option<MessageState>>, StoreError> {
    let columns = MessageArrays::of(rows);
    let reopen_failed: Vec<bool> = rows.iter().map(|r| r.message.reopen_failed).collect();
    let statuses: Vec<&str> = rows.iter().map(|r| r.status).collect();
    let reasons: Vec<Option<&str>> = rows.iter().map(|r| r.reason.as_deref()).collect();
    let params = columns.params(&[
        &columns.segments,
        &reopen_failed,
        &statuses,
        &reasons,
        &keep_body,
        &columns.encoding,
    ]);
    let result = query(client, &RECORD_EXISTING, &params).await?;
    let result = by_first_column(&result)?;
    let mut answers = Vec::with_capacity(rows.len());
    for row in rows {
        let found = result
            .get(&row.message.id)
            .copied()
            .ok_or_else(|| StoreError::Corrupt("a record without its answer".into()))?;
        if found.try_get::<_, bool>("done")? {
            answers.push(None);
        } else {
            // Not ours to record: report what is there (final, or in flight).
            answers.push(Some(state_of(found)?.unwrap_or(MessageState {
                status: Status::Sending,
                attempts: 1,
                open_attempt_started: Some(OffsetDateTime::now_utc()),
                unknown_attempt: None,
            })));
        }
    }
    Ok(answers)
}

/// Writes `queued` rows for messages that will be sent later (the recipients of an
/// announcement, fanned out a chunk at a time); a row already there is left as it is.
pub(crate) async fn queue_batch(
    client: &Client,
    rows: &[MessageColumns],
) -> Result<(), StoreError> {
    const QUEUE: &str =
        "INSERT INTO sms_messages (id, bulk_id, school_id, type, recipient, body, context,
                               status, provider, segments, encoding)
     SELECT id, bulk_id, school_id, type, recipient, body, context, 'queued', provider,
            segments, encoding
       FROM UNNEST($1::uuid[], $2::uuid[], $3::int8[], $4::text[], $5::text[],
                   $6::text[], $7::jsonb[], $8::text[], $9::int4[], $10::text[])
         AS t(id, bulk_id, school_id, type, recipient, body, context, provider, segments,
              encoding)
     ON CONFLICT (id) DO NOTHING";
    let columns = MessageArrays::of(rows);
    let statement = prepared(client, QUEUE).await?;
    client
        .execute(
            &statement,
            &columns.params(&[&columns.segments, &columns.encoding]),
        )
        .await?;
    Ok(())
}

/// Writes `suppressed` rows with `reason` for messages refused before any of them was
/// queued (an announcement refused whole); a row already there is left as it is.
pub(crate) async fn suppress_batch(
    client: &Client,
    rows: &[MessageColumns],
    reason: &str,
    keep_body: bool,
) -> Result<(), StoreError> {
    static SUPPRESS: LazyLock<String> = LazyLock::new(|| {
        format!(
            "INSERT INTO sms_messages (id, bulk_id, school_id, type, recipient, body, context,
                                       status, reason, provider, segments, encoding)
             SELECT id, bulk_id, school_id, type, recipient, CASE WHEN {keep} THEN body END,
                    context, 'suppressed', $10, provider, segments, encoding
               FROM UNNEST($1::uuid[], $2::uuid[], $3::int8[], $4::text[], $5::text[],
                           $6::text[], $7::jsonb[], $8::text[], $9::int4[], $12::text[])
                 AS t(id, bulk_id, school_id, type, recipient, body, context, provider, segments,
                      encoding)
             ON CONFLICT (id) DO NOTHING",
            keep = keeps_body("$11", "type"),
        )
    });
    let columns = MessageArrays::of(rows);
    let statement = prepared(client, &SUPPRESS).await?;
    client
        .execute(
            &statement,
            &columns.params(&[&columns.segments, &reason, &keep_body, &columns.encoding]),
        )
        .await?;
    Ok(())
}
