//! The store: the only module that speaks SQL. Settings and opt-outs in; the message log
//! (`sms_messages`, `sms_attempts`) out.
//!
//! The rule it keeps: an attempt row exists, committed, before its provider call starts, and
//! claiming that attempt is one atomic statement, so two deliveries of one job can never both
//! call the provider.

use std::{
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use serde_json::Value;
use sqlx::{
    PgPool, Row,
    migrate::MigrateDatabase,
    postgres::{PgConnectOptions, PgPoolOptions},
};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::{job::JobType, phone::PhoneNumber, policy::SchoolSettings};

mod log;

pub use log::Claim;
use log::{ClaimRow, FinishRow, MessageColumns, Op, RecordRow, Recorder};

/// The migrations in `schema/`, embedded at build time.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./schema");

/// A database failure. Every one is treated as "the database is unavailable": the caller
/// keeps the delivery and tries again, it never guesses.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("unexpected data in the database: {0}")]
    Corrupt(String),
    #[error("the database did not answer within {0:?}")]
    Timeout(Duration),
    #[error("database error: {0}")]
    Batch(String),
}

impl StoreError {
    /// PostgreSQL refused the data itself (SQLSTATE class 22, a data exception, such as a
    /// value it cannot store): trying the same write again cannot succeed.
    pub fn is_data_error(&self) -> bool {
        match self {
            StoreError::Database(sqlx::Error::Database(e)) => {
                e.code().is_some_and(|code| code.starts_with("22"))
            }
            _ => false,
        }
    }
}

/// The status of a message, as `sms_messages.status` stores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageStatus {
    Queued,
    Sending,
    Sent,
    Delivered,
    Undelivered,
    Failed,
    Retrying,
    Suppressed,
    Expired,
}

impl MessageStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            MessageStatus::Queued => "queued",
            MessageStatus::Sending => "sending",
            MessageStatus::Sent => "sent",
            MessageStatus::Delivered => "delivered",
            MessageStatus::Undelivered => "undelivered",
            MessageStatus::Failed => "failed",
            MessageStatus::Retrying => "retrying",
            MessageStatus::Suppressed => "suppressed",
            MessageStatus::Expired => "expired",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        [
            MessageStatus::Queued,
            MessageStatus::Sending,
            MessageStatus::Sent,
            MessageStatus::Delivered,
            MessageStatus::Undelivered,
            MessageStatus::Failed,
            MessageStatus::Retrying,
            MessageStatus::Suppressed,
            MessageStatus::Expired,
        ]
        .into_iter()
        .find(|s| s.as_str() == text)
    }

    /// Whether the message has an outcome: nothing more will be sent for it.
    pub fn is_final(self) -> bool {
        match self {
            MessageStatus::Queued | MessageStatus::Sending | MessageStatus::Retrying => false,
            MessageStatus::Sent
            | MessageStatus::Delivered
            | MessageStatus::Undelivered
            | MessageStatus::Failed
            | MessageStatus::Suppressed
            | MessageStatus::Expired => true,
        }
    }
}

/// What `sms_attempts.outcome` records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptOutcome {
    Sent,
    TemporaryFailure,
    PermanentFailure,
}

impl AttemptOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            AttemptOutcome::Sent => "sent",
            AttemptOutcome::TemporaryFailure => "temporary_failure",
            AttemptOutcome::PermanentFailure => "permanent_failure",
        }
    }
}

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
            reopen_failed: self.reopen_failed,
        }
    }
}

/// Text from outside (a provider's answer) as PostgreSQL can store it: a NUL character,
/// which its text type cannot hold, becomes U+FFFD. Without this, an answer with one
/// could never be recorded, and the message would be held for ever.
fn storable(text: &str) -> String {
    text.replace('\0', "\u{fffd}")
}

/// The state of a message already in the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageState {
    pub status: MessageStatus,
    pub attempts: i32,
    /// When the latest attempt started, if it has no outcome yet.
    pub open_attempt_started: Option<OffsetDateTime>,
    /// The latest attempt, if the provider may have taken it without our knowing: cut off
    /// by a crash (no outcome) or ended without an answer we could read.
    pub unknown_attempt: Option<UnknownAttempt>,
}

/// An attempt whose outcome is not known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownAttempt {
    pub attempt: i32,
    pub started_at: OffsetDateTime,
    /// The provider that was called: the one to ask.
    pub provider: String,
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
    pub status: MessageStatus,
    pub reason: Option<&'a str>,
}

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
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ReceiptApplied {
    pub id: Uuid,
    pub recipient: String,
    pub school_id: i64,
}

/// How far along a status is; a receipt only ever moves a message forward.
const RANK: &str = "CASE $S WHEN 'sent' THEN 1 WHEN 'undelivered' THEN 2 WHEN 'failed' THEN 2 \
                    WHEN 'delivered' THEN 3 ELSE 0 END";

fn rank(of: &str) -> String {
    RANK.replace("$S", of)
}

const SETTINGS_SELECT: &str = "SELECT school_id, sms_enabled, country, sender_id, provider,
        fallback_provider, allow_confirmations, allow_reminders, allow_changes,
        allow_announcements, allow_login_codes
   FROM sms_school_settings";

fn settings_of(row: &sqlx::postgres::PgRow) -> Result<SchoolSettings, StoreError> {
    // A NULL flag (written by hand) reads as "no": never send on a guess.
    let flag = |name: &str| -> Result<bool, StoreError> {
        Ok(row.try_get::<Option<bool>, _>(name)?.unwrap_or(false))
    };
    Ok(SchoolSettings {
        school_id: row.try_get("school_id")?,
        sms_enabled: flag("sms_enabled")?,
        country: row.try_get("country")?,
        sender_id: row.try_get("sender_id")?,
        provider: row.try_get("provider")?,
        fallback_provider: row.try_get("fallback_provider")?,
        allow_confirmations: flag("allow_confirmations")?,
        allow_reminders: flag("allow_reminders")?,
        allow_changes: flag("allow_changes")?,
        allow_announcements: flag("allow_announcements")?,
        allow_login_codes: flag("allow_login_codes")?,
    })
}

/// Applies receipts that came before the messages' own records had the provider ids.
pub(crate) async fn apply_pending_receipts(pool: &PgPool, sids: &[&str]) -> Result<(), StoreError> {
    let sql = format!(
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
    );
    sqlx::query(&sql).bind(sids).execute(pool).await?;
    Ok(())
}

/// A message row, as support reads it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct MessageView {
    pub id: Uuid,
    pub bulk_id: Option<Uuid>,
    pub school_id: i64,
    #[sqlx(rename = "type")]
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

/// One provider call, as support reads it.
#[derive(Debug, Clone, sqlx::FromRow)]
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

#[derive(Debug, Clone)]
pub struct Store {
    pools: Arc<Pools>,
    /// `false`: a body is dropped as soon as its message has a final outcome.
    keep_body: bool,
    /// Writes the message log in batches; without it (the tools) each write goes alone.
    recorder: Option<Recorder>,
}

/// The connection pool, replaceable as a whole: a connection that went silent (no error,
/// no reset) would hang the pool's own health check when released, so after a statement
/// timed out the daemon starts over with a fresh pool and lets the old one go.
#[derive(Debug)]
struct Pools {
    current: RwLock<(PgPool, Instant)>,
    options: PgConnectOptions,
    settings: PgPoolOptions,
}

fn pool_settings(max_connections: u32) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .min_connections(1)
        .acquire_timeout(Duration::from_secs(5))
        .test_before_acquire(false)
}

impl Store {
    /// Connects a pool. The pool replaces connections that died and times out acquiring.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self, StoreError> {
        let options: PgConnectOptions = url
            .parse::<PgConnectOptions>()?
            .application_name("smsgw")
            // The server gives up on a statement the daemon has stopped waiting for.
            .options([("statement_timeout", "15s")]);
        let settings = pool_settings(max_connections);
        let pool = settings.clone().connect_with(options.clone()).await?;
        Ok(Store {
            pools: Arc::new(Pools {
                current: RwLock::new((pool, Instant::now())),
                options,
                settings,
            }),
            keep_body: true,
            recorder: None,
        })
    }

    /// From now on, writes of the message log from all callers are gathered into batches
    /// (group commit). Call once the body policy is set.
    pub fn with_recorder(mut self) -> Self {
        let store = self.clone();
        self.recorder = Some(Recorder::start(move || store.pool(), self.keep_body));
        self
    }

    /// The current pool (a cheap handle).
    pub fn pool(&self) -> PgPool {
        self.pools
            .current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .clone()
    }

    /// Starts over with a fresh pool after a statement got no answer in time; at most
    /// once every few seconds however many statements timed out together.
    pub fn replace_pool(&self) {
        let mut current = self
            .pools
            .current
            .write()
            .unwrap_or_else(|p| p.into_inner());
        if current.1.elapsed() < Duration::from_secs(5) {
            return;
        }
        let fresh = self
            .pools
            .settings
            .clone()
            .connect_lazy_with(self.pools.options.clone());
        let old = std::mem::replace(&mut *current, (fresh, Instant::now()));
        tracing::warn!("database statements time out: starting over with new connections");
        // Closing waits for connections that may never answer: let it run on its own.
        tokio::spawn(async move { old.0.close().await });
    }

    /// Drops each body as soon as its message has a final outcome (`SMSGW_KEEP_BODY=false`).
    pub fn keep_bodies(mut self, keep: bool) -> Self {
        self.keep_body = keep;
        self
    }

    /// Removes the bodies of at most `batch` messages created before `older_than` ago;
    /// returns how many. Locked rows (in flight) are skipped, never waited for.
    pub async fn purge_bodies(&self, older_than: Duration, batch: i64) -> Result<u64, StoreError> {
        let done = sqlx::query(
            "UPDATE sms_messages SET body = NULL
              WHERE id IN (SELECT id FROM sms_messages
                            WHERE body IS NOT NULL
                              AND created_at < now() - make_interval(secs => $1)
                            LIMIT $2 FOR UPDATE SKIP LOCKED)",
        )
        .bind(older_than.as_secs_f64())
        .bind(batch)
        .execute(&self.pool())
        .await?;
        Ok(done.rows_affected())
    }

    /// Deletes at most `batch` finished messages (with their attempts) created before
    /// `older_than` ago; returns how many.
    pub async fn delete_messages(
        &self,
        older_than: Duration,
        batch: i64,
    ) -> Result<u64, StoreError> {
        let done = sqlx::query(
            "DELETE FROM sms_messages
              WHERE id IN (SELECT id FROM sms_messages
                            WHERE created_at < now() - make_interval(secs => $1)
                              AND status NOT IN ('queued', 'sending', 'retrying')
                            LIMIT $2 FOR UPDATE SKIP LOCKED)",
        )
        .bind(older_than.as_secs_f64())
        .bind(batch)
        .execute(&self.pool())
        .await?;
        Ok(done.rows_affected())
    }

    /// Creates the database named in `url` if it does not exist yet.
    pub async fn create_database_if_missing(url: &str) -> Result<bool, StoreError> {
        if sqlx::Postgres::database_exists(url).await? {
            return Ok(false);
        }
        match sqlx::Postgres::create_database(url).await {
            Ok(()) => Ok(true),
            // Another process created it between our check and our create.
            Err(e) if sqlx::Postgres::database_exists(url).await.unwrap_or(false) => {
                tracing::debug!(error = %e, "database appeared meanwhile");
                Ok(false)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Applies pending migrations. Safe to run twice and from two processes at once: the
    /// migrator holds a Postgres advisory lock while it works.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        MIGRATOR.run(&self.pool()).await?;
        Ok(())
    }

    /// Version of the newest migration this build knows.
    pub fn latest_migration() -> i64 {
        MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0)
    }

    /// The newest migration applied to this database (0 when none is).
    pub async fn schema_version(&self) -> Result<i64, StoreError> {
        let exists: bool = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
            .fetch_one(&self.pool())
            .await?;
        if !exists {
            return Ok(0);
        }
        let version: Option<i64> =
            sqlx::query_scalar("SELECT max(version) FROM _sqlx_migrations WHERE success")
                .fetch_one(&self.pool())
                .await?;
        Ok(version.unwrap_or(0))
    }

    pub async fn ping(&self) -> bool {
        sqlx::query("SELECT 1").execute(&self.pool()).await.is_ok()
    }

    pub async fn close(&self) {
        self.pool().close().await;
    }

    /// Every provider name the schools' settings use (as provider or fallback), with the
    /// schools (up to a few) that use it.
    pub async fn school_provider_names(&self) -> Result<Vec<(String, String)>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT name, string_agg(school_id::text, ', ' ORDER BY school_id)
               FROM (SELECT trim(provider) AS name, school_id FROM sms_school_settings
                      WHERE provider IS NOT NULL AND trim(provider) <> ''
                     UNION
                     SELECT trim(fallback_provider), school_id FROM sms_school_settings
                      WHERE fallback_provider IS NOT NULL AND trim(fallback_provider) <> '') n
              GROUP BY name",
        )
        .fetch_all(&self.pool())
        .await?)
    }

    pub async fn message_view(&self, id: Uuid) -> Result<Option<MessageView>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT id, bulk_id, school_id, type, recipient, body, context, status, reason,
                    provider, provider_message_id, provider_status, error_code, segments,
                    attempts, created_at, sent_at,
                    delivered_at, updated_at
             FROM sms_messages WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool())
        .await?)
    }

    pub async fn attempt_views(&self, id: Uuid) -> Result<Vec<AttemptView>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT attempt, provider, started_at, duration_ms, outcome, http_status,
                    error_code, error_message
             FROM sms_attempts WHERE message_id = $1 ORDER BY attempt",
        )
        .bind(id)
        .fetch_all(&self.pool())
        .await?)
    }

    pub async fn school_settings(
        &self,
        school_id: i64,
    ) -> Result<Option<SchoolSettings>, StoreError> {
        let sql = format!("{SETTINGS_SELECT} WHERE school_id = $1");
        let row = sqlx::query(&sql)
            .bind(school_id)
            .fetch_optional(&self.pool())
            .await?;
        row.as_ref().map(settings_of).transpose()
    }

    /// Every school's settings, for the in-memory cache.
    pub async fn all_school_settings(&self) -> Result<Vec<SchoolSettings>, StoreError> {
        let rows = sqlx::query(SETTINGS_SELECT).fetch_all(&self.pool()).await?;
        rows.iter().map(settings_of).collect()
    }

    pub async fn is_opted_out(
        &self,
        school_id: i64,
        phone: &PhoneNumber,
    ) -> Result<bool, StoreError> {
        let opted_out: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM sms_opt_outs
                            WHERE phone = $1 AND (school_id IS NULL OR school_id = $2))",
        )
        .bind(phone.as_str())
        .bind(school_id)
        .fetch_one(&self.pool())
        .await?;
        Ok(opted_out)
    }

    /// Records an opt-out; a second one for the same number and school changes nothing.
    pub async fn add_opt_out(
        &self,
        school_id: Option<i64>,
        phone: &PhoneNumber,
        source: &str,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO sms_opt_outs (school_id, phone, source) VALUES ($1, $2, $3)
             ON CONFLICT (phone, (COALESCE(school_id, -1))) DO NOTHING",
        )
        .bind(school_id)
        .bind(phone.as_str())
        .bind(source)
        .execute(&self.pool())
        .await?;
        Ok(())
    }

    pub async fn message_state(&self, id: Uuid) -> Result<Option<MessageState>, StoreError> {
        log::read_state(&self.pool(), id).await
    }

    /// Writes a `queued` row for each message (left alone where the row exists): the
    /// recipients of an announcement are in the log as soon as it is accepted.
    pub async fn queue_messages(&self, messages: &[NewMessage<'_>]) -> Result<(), StoreError> {
        let rows: Vec<MessageColumns> = messages.iter().map(NewMessage::columns).collect();
        log::queue_batch(&self.pool(), &rows).await
    }

    /// Records a message that ends without a provider call (suppressed, expired, refused),
    /// or that waits (queued). Returns the state it found instead when the message already
    /// has an outcome or is in flight.
    pub async fn record_without_call(
        &self,
        message: &NewMessage<'_>,
        status: MessageStatus,
        reason: Option<&str>,
    ) -> Result<Option<MessageState>, StoreError> {
        let row = RecordRow {
            message: message.columns(),
            status: status.as_str(),
            reason: reason.map(str::to_owned),
        };
        match &self.recorder {
            Some(recorder) => recorder.write(|reply| Op::Record(row, reply)).await,
            None => log::record_batch(&self.pool(), &[row], self.keep_body)
                .await?
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
            None => log::claim_batch(&self.pool(), &[row])
                .await?
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
            None => log::finish_batch(&self.pool(), &[row], self.keep_body).await,
        }
    }

    /// Records a receipt and moves its message forward (never back: `delivered` stays
    /// `delivered`). `None` when no sent message has that provider id yet: the receipt is
    /// kept and applied when the send's own record lands.
    pub async fn apply_receipt(
        &self,
        receipt: &Receipt<'_>,
    ) -> Result<Option<ReceiptApplied>, StoreError> {
        let sql = format!(
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
        );
        Ok(sqlx::query_as(&sql)
            .bind(receipt.provider)
            .bind(storable(receipt.provider_message_id))
            .bind(storable(receipt.provider_status))
            .bind(receipt.status.map(MessageStatus::as_str))
            .bind(receipt.error_code.map(storable))
            .fetch_optional(&self.pool())
            .await?)
    }

    /// START: removes the opt-outs a carrier or an inbound STOP made for `phone` (not the
    /// ones the web app wrote: those are the user's settings there).
    pub async fn remove_carrier_opt_outs(&self, phone: &PhoneNumber) -> Result<(), StoreError> {
        sqlx::query(
            "DELETE FROM sms_opt_outs WHERE phone = $1 AND source IN ('inbound', 'provider')",
        )
        .bind(phone.as_str())
        .execute(&self.pool())
        .await?;
        Ok(())
    }

    /// Gives a message up as `failed` (`outcome_unknown`) without another call.
    pub async fn fail_unknown(&self, id: Uuid) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE sms_messages
                SET status = 'failed', reason = 'outcome_unknown', last_outcome_unknown = false,
                    updated_at = now()
              WHERE id = $1 AND status IN ('queued', 'sending', 'retrying')",
        )
        .bind(id)
        .execute(&self.pool())
        .await?;
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
        let pool = self.pool();
        sqlx::query(
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
                    body = CASE WHEN $4 THEN body END, updated_at = now()
              WHERE id = $1 AND status IN ('queued', 'sending', 'retrying', 'failed')",
        )
        .bind(id)
        .bind(attempt)
        .bind(provider_message_id)
        .bind(self.keep_body)
        .execute(&pool)
        .await?;
        apply_pending_receipts(&pool, &[provider_message_id]).await
    }
}
