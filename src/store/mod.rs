//! The store: the only module that speaks SQL. Settings and opt-outs in; the message log
//! (`sms_messages`, `sms_attempts`) out.
//!
//! The rule it keeps: an attempt row exists, committed, before its provider call starts, and
//! claiming that attempt is one atomic statement, so two deliveries of one job can never both
//! call the provider.
//!
//! It speaks PostgreSQL through tokio-postgres, from a deadpool-postgres pool that keeps
//! each connection's prepared statements. `connect` holds the connection settings and
//! TLS, `migrate` the schema's migrations, `notify` the LISTEN connection, and `log` the
//! batched writes of the message log.

use std::{
    sync::{Arc, LazyLock, RwLock},
    time::{Duration, Instant},
};

use deadpool_postgres::{Pool, PoolError};
use serde_json::Value;
use time::OffsetDateTime;
use tokio_postgres::{Row, types::ToSql};
use uuid::Uuid;

use crate::{job::JobType, phone::PhoneNumber, policy::SchoolSettings};

mod connect;
mod log;
mod migrate;
mod notify;

use connect::{Connector, quote_identifier};
pub use log::Claim;
use log::{ClaimRow, FinishRow, MessageColumns, Op, RecordRow, Recorder};
pub(crate) use notify::Listener;

/// A statement's parameters.
type Params<'a> = [&'a (dyn ToSql + Sync)];

/// A database failure. Every one is treated as "the database is unavailable": the caller
/// keeps the delivery and tries again, it never guesses.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {}", describe(.0))]
    Database(#[from] tokio_postgres::Error),
    #[error("no database connection: {}", describe_pool(.0))]
    Pool(#[from] PoolError),
    #[error("database settings: {0}")]
    Config(String),
    #[error("migration failed: {0}")]
    Migrate(String),
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
        self.server_error()
            .is_some_and(|e| e.code().code().starts_with("22"))
    }

    /// The server answered with an error (as opposed to: no answer, no connection).
    pub(crate) fn server_error(&self) -> Option<&tokio_postgres::error::DbError> {
        match self {
            StoreError::Database(e) => e.as_db_error(),
            _ => None,
        }
    }
}

/// A tokio-postgres error with what the server said (its own `Display` says only "db
/// error" and leaves the message in its source).
fn describe(e: &tokio_postgres::Error) -> String {
    match (e.as_db_error(), std::error::Error::source(e)) {
        (Some(db), _) => format!("{} {}", db.code().code(), db),
        (None, Some(cause)) => format!("{e}: {cause}"),
        (None, None) => e.to_string(),
    }
}

fn describe_pool(e: &PoolError) -> String {
    match e {
        PoolError::Backend(e) => describe(e),
        other => other.to_string(),
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

const SETTINGS_SELECT: &str = "SELECT school_id, sms_enabled, country, sender_id, provider,
        fallback_provider, allow_confirmations, allow_reminders, allow_changes,
        allow_announcements, allow_login_codes
   FROM sms_school_settings";

fn settings_of(row: &Row) -> Result<SchoolSettings, StoreError> {
    // A NULL flag (written by hand) reads as "no": never send on a guess.
    let flag = |name: &str| -> Result<bool, StoreError> {
        Ok(row.try_get::<_, Option<bool>>(name)?.unwrap_or(false))
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
static APPLY_PENDING_RECEIPTS: LazyLock<String> = LazyLock::new(|| {
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

async fn database_exists(admin: &tokio_postgres::Client, name: &str) -> Result<bool, StoreError> {
    Ok(admin
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)",
            &[&name],
        )
        .await?
        .try_get(0)?)
}

/// Prepares `sql` once per connection (deadpool-postgres keeps the statement with it).
async fn prepared(
    client: &deadpool_postgres::Client,
    sql: &str,
) -> Result<tokio_postgres::Statement, StoreError> {
    Ok(client.prepare_cached(sql).await?)
}

/// The statement that applies pending receipts, ready to run on `client`.
pub(crate) async fn apply_pending_receipts(
    client: &deadpool_postgres::Client,
    sids: &[&str],
) -> Result<(), StoreError> {
    let statement = prepared(client, &APPLY_PENDING_RECEIPTS).await?;
    client.execute(&statement, &[&sids]).await?;
    Ok(())
}

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
    fn from_row(row: &Row) -> Result<Self, StoreError> {
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

#[derive(Debug, Clone)]
pub struct Store {
    pools: Arc<Pools>,
    /// `false`: a body is dropped as soon as its message has a final outcome.
    keep_body: bool,
    /// Writes the message log in batches; without it (the tools) each write goes alone.
    recorder: Option<Recorder>,
}

/// The connection pool, replaceable as a whole (see [`Store::replace_pool`]).
#[derive(Debug)]
struct Pools {
    current: RwLock<(Pool, Instant)>,
    connector: Connector,
    max_connections: u32,
}

/// Replacing the pool again sooner than this does no good: the fresh one is still new.
const REPLACE_AT_MOST_EVERY: Duration = Duration::from_secs(5);

impl Store {
    /// Connects a pool of at most `max_connections`, and opens one connection at once so
    /// that a wrong URL or an unreachable server is reported here. Taking a connection
    /// from the pool waits about 5 s at most (for a free one, or for the server to answer
    /// again); each statement may run 15 s on the server.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self, StoreError> {
        let connector = Connector::from_url(url)?;
        let pool = connector.pool(max_connections)?;
        // Kept in the pool when dropped: the first statement finds it ready.
        drop(connect::acquire(&pool).await?);
        Ok(Store {
            pools: Arc::new(Pools {
                current: RwLock::new((pool, Instant::now())),
                connector,
                max_connections,
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
    pub fn pool(&self) -> Pool {
        self.pools
            .current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .clone()
    }

    /// Starts over with a fresh pool after a statement got no answer in time; at most
    /// once every few seconds however many statements timed out together.
    ///
    /// A connection that went silent (no error, no reset: a stalled network or proxy)
    /// looks healthy to the pool, which only asks whether it is closed, so it would be
    /// handed out again and again and each statement on it would hang until its time
    /// limit. The fresh pool opens new connections. The old one is closed: its idle
    /// connections go at once, its waiters fail at once (and try again on the new pool),
    /// and the connections still in use are dropped when their statements give up.
    pub fn replace_pool(&self) {
        let mut current = self
            .pools
            .current
            .write()
            .unwrap_or_else(|p| p.into_inner());
        if current.1.elapsed() < REPLACE_AT_MOST_EVERY {
            return;
        }
        let fresh = match self.pools.connector.pool(self.pools.max_connections) {
            Ok(pool) => pool,
            Err(e) => {
                tracing::error!(error = %e, "could not set up a new connection pool");
                return;
            }
        };
        let old = std::mem::replace(&mut *current, (fresh, Instant::now()));
        tracing::warn!("database statements time out: starting over with new connections");
        old.0.close();
    }

    /// Drops each body as soon as its message has a final outcome (`SMSGW_KEEP_BODY=false`).
    pub fn keep_bodies(mut self, keep: bool) -> Self {
        self.keep_body = keep;
        self
    }

    /// A connection from the current pool.
    async fn client(&self) -> Result<deadpool_postgres::Client, StoreError> {
        connect::acquire(&self.pool()).await
    }

    async fn rows(&self, sql: &str, params: &Params<'_>) -> Result<Vec<Row>, StoreError> {
        let client = self.client().await?;
        let statement = prepared(&client, sql).await?;
        Ok(client.query(&statement, params).await?)
    }

    async fn row(&self, sql: &str, params: &Params<'_>) -> Result<Option<Row>, StoreError> {
        let client = self.client().await?;
        let statement = prepared(&client, sql).await?;
        Ok(client.query_opt(&statement, params).await?)
    }

    /// Runs a statement; how many rows it changed.
    async fn execute(&self, sql: &str, params: &Params<'_>) -> Result<u64, StoreError> {
        let client = self.client().await?;
        let statement = prepared(&client, sql).await?;
        Ok(client.execute(&statement, params).await?)
    }

    /// A connection of its own that hears the notifications of `channel`.
    pub(crate) async fn listen(&self, channel: &str) -> Result<Listener, StoreError> {
        Listener::start(self.pools.connector.connect_raw().await?, channel).await
    }

    /// Removes the bodies of at most `batch` messages created before `older_than` ago;
    /// returns how many. Locked rows (in flight) are skipped, never waited for.
    pub async fn purge_bodies(&self, older_than: Duration, batch: i64) -> Result<u64, StoreError> {
        self.execute(
            "UPDATE sms_messages SET body = NULL
              WHERE id IN (SELECT id FROM sms_messages
                            WHERE body IS NOT NULL
                              AND created_at < now() - make_interval(secs => $1)
                            LIMIT $2 FOR UPDATE SKIP LOCKED)",
            &[&older_than.as_secs_f64(), &batch],
        )
        .await
    }

    /// Deletes at most `batch` finished messages (with their attempts) created before
    /// `older_than` ago; returns how many.
    pub async fn delete_messages(
        &self,
        older_than: Duration,
        batch: i64,
    ) -> Result<u64, StoreError> {
        self.execute(
            "DELETE FROM sms_messages
              WHERE id IN (SELECT id FROM sms_messages
                            WHERE created_at < now() - make_interval(secs => $1)
                              AND status NOT IN ('queued', 'sending', 'retrying')
                            LIMIT $2 FOR UPDATE SKIP LOCKED)",
            &[&older_than.as_secs_f64(), &batch],
        )
        .await
    }

    /// Creates the database named in `url` if it does not exist yet (connected to the
    /// server's `postgres` database to do it); `true` when it created it.
    pub async fn create_database_if_missing(url: &str) -> Result<bool, StoreError> {
        let connector = Connector::from_url(url)?;
        let name = connector
            .database()
            .ok_or_else(|| StoreError::Config("the database URL names no database".into()))?
            .to_owned();
        let admin = connector.for_database("postgres").connect().await?;
        if database_exists(&admin, &name).await? {
            return Ok(false);
        }
        let create = format!("CREATE DATABASE {}", quote_identifier(&name));
        match admin.batch_execute(&create).await {
            Ok(()) => Ok(true),
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::DUPLICATE_DATABASE) => {
                Ok(false)
            }
            // Another process created it between our check and our create, and the two
            // collided in the catalogue (a unique violation rather than 42P04).
            Err(e) if database_exists(&admin, &name).await.unwrap_or(false) => {
                tracing::debug!(error = %describe(&e), "database appeared meanwhile");
                Ok(false)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Applies pending migrations. Safe to run twice and from two processes at once: the
    /// migrator holds a PostgreSQL advisory lock while it works, on a connection of its
    /// own so that the lock cannot outlive it in the pool.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let mut client = self.pools.connector.connect().await?;
        migrate::run(&mut client).await
    }

    /// Version of the newest migration this build knows.
    pub fn latest_migration() -> i64 {
        migrate::latest()
    }

    /// The newest migration applied to this database (0 when none is).
    pub async fn schema_version(&self) -> Result<i64, StoreError> {
        let exists = self
            .row("SELECT to_regclass('_sqlx_migrations') IS NOT NULL", &[])
            .await?
            .map(|row| row.try_get::<_, bool>(0))
            .transpose()?
            .unwrap_or(false);
        if !exists {
            return Ok(0);
        }
        let version = self
            .row(
                "SELECT max(version) FROM _sqlx_migrations WHERE success",
                &[],
            )
            .await?
            .map(|row| row.try_get::<_, Option<i64>>(0))
            .transpose()?
            .flatten();
        Ok(version.unwrap_or(0))
    }

    pub async fn ping(&self) -> bool {
        match self.client().await {
            Ok(client) => client.batch_execute("SELECT 1").await.is_ok(),
            Err(_) => false,
        }
    }

    /// Closes the pool: idle connections now, the others as they come back.
    pub async fn close(&self) {
        self.pool().close();
    }

    /// Every provider name the schools' settings use (as provider or fallback), with the
    /// schools (up to a few) that use it.
    pub async fn school_provider_names(&self) -> Result<Vec<(String, String)>, StoreError> {
        let rows = self
            .rows(
                "SELECT name, string_agg(school_id::text, ', ' ORDER BY school_id)
                   FROM (SELECT trim(provider) AS name, school_id FROM sms_school_settings
                          WHERE provider IS NOT NULL AND trim(provider) <> ''
                         UNION
                         SELECT trim(fallback_provider), school_id FROM sms_school_settings
                          WHERE fallback_provider IS NOT NULL AND trim(fallback_provider) <> '') n
                  GROUP BY name",
                &[],
            )
            .await?;
        rows.iter()
            .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
            .collect()
    }

    pub async fn message_view(&self, id: Uuid) -> Result<Option<MessageView>, StoreError> {
        self.row(
            "SELECT id, bulk_id, school_id, type, recipient, body, context, status, reason,
                    provider, provider_message_id, provider_status, error_code, segments,
                    attempts, created_at, sent_at,
                    delivered_at, updated_at
             FROM sms_messages WHERE id = $1",
            &[&id],
        )
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

    pub async fn school_settings(
        &self,
        school_id: i64,
    ) -> Result<Option<SchoolSettings>, StoreError> {
        static SQL: LazyLock<String> =
            LazyLock::new(|| format!("{SETTINGS_SELECT} WHERE school_id = $1"));
        let row = self.row(&SQL, &[&school_id]).await?;
        row.as_ref().map(settings_of).transpose()
    }

    /// Every school's settings, for the in-memory cache.
    pub async fn all_school_settings(&self) -> Result<Vec<SchoolSettings>, StoreError> {
        let rows = self.rows(SETTINGS_SELECT, &[]).await?;
        rows.iter().map(settings_of).collect()
    }

    pub async fn is_opted_out(
        &self,
        school_id: i64,
        phone: &PhoneNumber,
    ) -> Result<bool, StoreError> {
        let row = self
            .row(
                "SELECT EXISTS (SELECT 1 FROM sms_opt_outs
                                WHERE phone = $1 AND (school_id IS NULL OR school_id = $2))",
                &[&phone.as_str(), &school_id],
            )
            .await?
            .ok_or_else(|| StoreError::Corrupt("EXISTS gave no row".into()))?;
        Ok(row.try_get(0)?)
    }

    /// Records an opt-out; a second one for the same number and school changes nothing.
    pub async fn add_opt_out(
        &self,
        school_id: Option<i64>,
        phone: &PhoneNumber,
        source: &str,
    ) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO sms_opt_outs (school_id, phone, source) VALUES ($1, $2, $3)
             ON CONFLICT (phone, (COALESCE(school_id, -1))) DO NOTHING",
            &[&school_id, &phone.as_str(), &source],
        )
        .await?;
        Ok(())
    }

    pub async fn message_state(&self, id: Uuid) -> Result<Option<MessageState>, StoreError> {
        log::read_state(&self.client().await?, id).await
    }

    /// Writes a `queued` row for each message (left alone where the row exists): the
    /// recipients of an announcement are in the log as soon as it is accepted.
    pub async fn queue_messages(&self, messages: &[NewMessage<'_>]) -> Result<(), StoreError> {
        let rows: Vec<MessageColumns> = messages.iter().map(NewMessage::columns).collect();
        log::queue_batch(&self.client().await?, &rows).await
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
            None => log::record_batch(&self.client().await?, &[row], self.keep_body)
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
            None => log::claim_batch(&self.client().await?, &[row])
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
            None => log::finish_batch(&self.client().await?, &[row], self.keep_body).await,
        }
    }

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

    /// START: removes the opt-outs a carrier or an inbound STOP made for `phone` (not the
    /// ones the web app wrote: those are the user's settings there).
    pub async fn remove_carrier_opt_outs(&self, phone: &PhoneNumber) -> Result<(), StoreError> {
        self.execute(
            "DELETE FROM sms_opt_outs WHERE phone = $1 AND source IN ('inbound', 'provider')",
            &[&phone.as_str()],
        )
        .await?;
        Ok(())
    }

    /// Gives a message up as `failed` (`outcome_unknown`) without another call.
    pub async fn fail_unknown(&self, id: Uuid) -> Result<(), StoreError> {
        self.execute(
            "UPDATE sms_messages
                SET status = 'failed', reason = 'outcome_unknown', last_outcome_unknown = false,
                    updated_at = now()
              WHERE id = $1 AND status IN ('queued', 'sending', 'retrying')",
            &[&id],
        )
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
        let client = self.client().await?;
        let adopt = prepared(
            &client,
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
        .await?;
        client
            .execute(
                &adopt,
                &[&id, &attempt, &provider_message_id, &self.keep_body],
            )
            .await?;
        apply_pending_receipts(&client, &[provider_message_id]).await
    }
}
