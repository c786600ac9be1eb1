//! The store: the only module that speaks SQL. Settings and opt-outs in; the message log
//! (`sms_messages`, `sms_attempts`) out.
//!
//! The rule it keeps: an attempt row exists, committed, before its provider call starts, and
//! claiming that attempt is one atomic statement, so two deliveries of one job can never both
//! call the provider.
//!
//! It speaks PostgreSQL through tokio-postgres, from a deadpool-postgres pool that keeps
//! each connection's prepared statements. One file per table family, and the machinery
//! apart:
//!
//! - `settings`: the schools' settings and the opt-outs (STOP and START applied once);
//! - `messages`: the message log's rows and the pipeline's writes; `log` their batch
//!   statements, and `recorder` the group commit that batches them;
//! - `receipts`: delivery receipts and the webhooks already applied; `views`: a message
//!   as support reads it; `lookups`: messages as support searches them, and the usage
//!   figures billing counts;
//! - `outbox`: the status events waiting for the relay; `rates`: the account-wide rate
//!   clocks the replicas lease call slots from; `guards`: the counts of the guards
//!   against fraud and spend, shared by the replicas the same way, and `admitter` the
//!   group commit that admits messages past them in batches;
//! - `inbox`: the development inbox's copies of the messages it handled;
//! - `withdrawals`: the reminders a cancelled booking withdraws, and the bookings
//!   cancelled;
//! - `connect`: connection settings, TLS, the pool; `migrate`: the schema's migrations;
//!   `notify`: the LISTEN connection of the settings cache.

use std::{
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use deadpool_postgres::{Pool, PoolError};
use tokio_postgres::{Row, types::ToSql};

/// Runs `$work`, statements on `$client` (a connection from `$store`'s pool), within the
/// time limit of one call. A connection whose work ran out of time is closed, not
/// returned to the pool, and the pool starts over: its idle connections went through
/// the same silent link.
macro_rules! on_connection {
    ($store:expr, |$client:ident| $work:expr) => {{
        let $client = $store.client().await?;
        let result = $crate::store::connect::within($store.call_limit(), async { $work }).await;
        if matches!(result, Err(StoreError::Timeout(_))) {
            $store.replace_pool();
        }
        $crate::store::connect::settle($client, result)
    }};
}

mod admitter;
mod connect;
mod erasure;
mod guards;
mod inbox;
mod log;
mod lookups;
mod messages;
mod migrate;
mod notify;
mod outbox;
mod rates;
mod receipts;
mod recorder;
mod replies;
mod settings;
mod views;
mod vocabulary;
mod withdrawals;

use admitter::Admitter;
use connect::{Connector, quote_identifier};
pub use erasure::Erasure;
/// `SMSGW_DATABASE_TIMEOUT`'s default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(15);
/// `SMSGW_MIGRATE_LOCK_TIMEOUT`'s default.
pub const DEFAULT_MIGRATE_LOCK_TIMEOUT: Duration = Duration::from_secs(10);
pub use guards::{Admission, BudgetUse, GuardBudget, GuardCheck, GuardRefusal, UnreadableGuard};
pub use inbox::{InboxCopy, InboxFilter, InboxMessage};
pub use lookups::{MessageSearch, UsageCount};
pub use messages::{AttemptRecord, NewMessage};
pub(crate) use notify::Listener;
pub use outbox::{OutboxBacklog, OutboxEvent, RejectedJob, RelayTurn, StatusEvent};
pub use rates::{ClockSpacing, LeaseStart};
pub(crate) use receipts::apply_pending_receipts;
pub use receipts::{NO_RECEIPT, Receipt, ReceiptApplied, ReceiptsGivenUp};
use recorder::Recorder;
pub use replies::{NewReply, ReplyRecorded, ReplySearch, ReplyView};
pub use settings::OptOutChange;
pub use views::{AttemptView, MessageView};
pub use vocabulary::{AttemptOutcome, Claim, MessageState, Status, UnknownAttempt};
pub use withdrawals::Withdrawn;

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

#[derive(Debug, Clone)]
pub struct Store {
    pools: Arc<Pools>,
    /// `false`: a body is dropped as soon as its message has a final outcome.
    keep_body: bool,
    /// Writes the message log in batches; without it (the tools) each write goes alone.
    recorder: Option<Recorder>,
    /// Admits messages past the guards in batches; without it (the tools) each admission
    /// goes alone.
    admitter: Option<Admitter>,
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
    /// again); each statement may run [`DEFAULT_TIMEOUT`] on the server.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self, StoreError> {
        Self::connect_with_events(url, max_connections, true, DEFAULT_TIMEOUT).await
    }

    /// As [`Store::connect`]; with `events` false, the status changes made through this
    /// store write no status events (`SMSGW_EVENTS=off`). `timeout` bounds every call
    /// (`SMSGW_DATABASE_TIMEOUT`: see `docs/operations.md`).
    pub async fn connect_with_events(
        url: &str,
        max_connections: u32,
        events: bool,
        timeout: Duration,
    ) -> Result<Self, StoreError> {
        let mut connector = Connector::from_url(url, timeout)?;
        if !events {
            connector = connector.without_events();
        }
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
            admitter: None,
        })
    }

    /// From now on, writes of the message log and admissions past the guards, from all
    /// callers, are gathered into batches (group commit). Call once the body policy is set.
    pub fn with_recorder(mut self) -> Self {
        let limit = self.call_limit();
        let (recording, admitting) = (self.clone(), self.clone());
        self.recorder = Some(Recorder::start(
            move || recording.pool(),
            self.keep_body,
            limit,
        ));
        self.admitter = Some(Admitter::start(move || admitting.pool(), limit));
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

    /// How long the daemon waits for one call's statements before it gives up on them
    /// and on their connection.
    pub fn call_limit(&self) -> Duration {
        self.pools.connector.bounds.call()
    }

    /// How long one operation may take at most: waiting for a connection, then its
    /// statements.
    pub fn operation_limit(&self) -> Duration {
        self.pools.connector.bounds.operation()
    }

    /// A connection from the current pool.
    async fn client(&self) -> Result<deadpool_postgres::Client, StoreError> {
        connect::acquire(&self.pool()).await
    }

    async fn rows(&self, sql: &str, params: &Params<'_>) -> Result<Vec<Row>, StoreError> {
        on_connection!(self, |client| {
            let statement = prepared(&client, sql).await?;
            Ok(client.query(&statement, params).await?)
        })
    }

    async fn row(&self, sql: &str, params: &Params<'_>) -> Result<Option<Row>, StoreError> {
        on_connection!(self, |client| {
            let statement = prepared(&client, sql).await?;
            Ok(client.query_opt(&statement, params).await?)
        })
    }

    /// Runs a statement; how many rows it changed.
    async fn execute(&self, sql: &str, params: &Params<'_>) -> Result<u64, StoreError> {
        on_connection!(self, |client| {
            let statement = prepared(&client, sql).await?;
            Ok(client.execute(&statement, params).await?)
        })
    }

    /// A connection of its own that hears the notifications of `channel`.
    pub(crate) async fn listen(&self, channel: &str) -> Result<Listener, StoreError> {
        Listener::start(self.pools.connector.connect_raw().await?, channel).await
    }

    /// Creates the database named in `url` if it does not exist yet (connected to the
    /// server's `postgres` database to do it); `true` when it created it.
    pub async fn create_database_if_missing(url: &str) -> Result<bool, StoreError> {
        let connector = Connector::from_url(url, DEFAULT_TIMEOUT)?;
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
        self.migrate_waiting_for_locks(DEFAULT_MIGRATE_LOCK_TIMEOUT)
            .await
    }

    /// As [`Store::migrate`], each statement waiting at most `lock_timeout` for a
    /// table's lock (`SMSGW_MIGRATE_LOCK_TIMEOUT`; see `migrate`).
    pub async fn migrate_waiting_for_locks(
        &self,
        lock_timeout: Duration,
    ) -> Result<(), StoreError> {
        let mut client = self.pools.connector.connect().await?;
        migrate::run(&mut client, lock_timeout).await
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
        let ping =
            async { on_connection!(self, |client| Ok(client.batch_execute("SELECT 1").await?)) };
        ping.await.is_ok()
    }

    /// Closes the pool: idle connections now, the others as they come back.
    pub async fn close(&self) {
        self.pool().close();
    }
}
