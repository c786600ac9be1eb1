//! The migrations in `schema/`, embedded at build time, and the code that applies them.
//! Only its `.sql` files are migrations, each listed in [`MIGRATIONS`]: the job's JSON
//! Schema beside them (`job-v1.schema.json`) is for the web app's developers.
//!
//! They are recorded in `_sqlx_migrations`, the table (and the row format) of the sqlx
//! migrator this replaced: a database it migrated is recognised as it is, and a database
//! migrated from now on looks the same to an older build. So each row keeps sqlx's
//! description (the file name's words) and checksum (SHA-384 of the file's text), and the
//! advisory lock is sqlx's key for the database, so an old and a new migrator never run at
//! once either.
//!
//! As sqlx did, a migration whose file changed after it was applied stops everything (the
//! files are append-only: an edited one would leave databases that disagree).
//!
//! A database a later build migrated holds migrations this build does not know. Unlike
//! sqlx, this build accepts them, and applies nothing, when each is newer than every one
//! it knows and it finds all of its own applied: the database is then ahead on the same
//! line, and since migrations only ever add (docs/versioning.md), this build's statements
//! still find everything they use. That is what lets a rollback run the previous version,
//! its `smsgw migrate` (the Kubernetes Job of every rollout) included, on the schema the
//! newer one left. An unknown migration older than this build's newest, or one of this
//! build's missing under newer ones, means the two come from different histories: that
//! still stops everything.
//!
//! Each migration runs in a transaction with its record, unless its first line is
//! `-- smsgw:no-transaction` (for `CREATE INDEX CONCURRENTLY`, which PostgreSQL refuses in
//! a transaction): then its statements are sent one at a time, and the record follows.
//! Such a file must be safe to run again, since a failure part-way leaves the statements
//! before it applied; each of its statements ends with a `;` at the end of a line.
//!
//! Migrations run without the pool's statement timeout: one on a big table may take
//! minutes, and cut off half-way it would have to start over. They do wait for their locks
//! a bounded time (`SMSGW_MIGRATE_LOCK_TIMEOUT`, PostgreSQL's `lock_timeout`): an `ALTER`
//! queued behind a long reader would queue every statement on its table behind it, so it
//! gives up, rolls back and tries again a little later; after [`LOCK_TRIES`] the
//! migration stops, naming the oldest open transactions, the likely blockers.

use std::time::{Duration, Instant};

use sha2::{Digest, Sha384};
use tokio_postgres::Client;

use super::StoreError;

/// One file of `schema/`.
#[derive(Debug)]
pub(crate) struct Migration {
    pub version: i64,
    /// The file name's words, as sqlx recorded them.
    name: &'static str,
    sql: &'static str,
}

/// First line of a migration that must run outside a transaction.
const NO_TRANSACTION: &str = "-- smsgw:no-transaction";
/// Pause between two tries for the migrators' lock.
const LOCK_POLL: Duration = Duration::from_millis(200);
/// Tries of a migration that waited too long for a table's lock.
const LOCK_TRIES: u32 = 3;
/// Pause between two such tries, for the traffic queued behind the last one.
const LOCK_PAUSE: Duration = Duration::from_secs(1);

impl Migration {
    fn in_transaction(&self) -> bool {
        self.sql.lines().next().map(str::trim_end) != Some(NO_TRANSACTION)
    }

    fn description(&self) -> String {
        self.name.replace('_', " ")
    }

    fn checksum(&self) -> Vec<u8> {
        Sha384::digest(self.sql.as_bytes()).to_vec()
    }
}

/// `schema/<version>_<name>.sql`
macro_rules! migration {
    ($version:literal, $name:literal) => {
        Migration {
            version: $version,
            name: $name,
            sql: include_str!(concat!(
                "../../schema/",
                stringify!($version),
                "_",
                $name,
                ".sql"
            )),
        }
    };
}

/// Every migration, oldest first. A new file in `schema/` is added here too (a test
/// compares this list with the directory).
pub(crate) static MIGRATIONS: &[Migration] = &[
    migration!(20261125000001, "initial"),
    migration!(20261125000002, "retention"),
    migration!(20261125000003, "unknown_outcome"),
    migration!(20261125000004, "attempt_claims"),
    migration!(20261125000005, "routing_and_receipts"),
    migration!(20261125000006, "throughput"),
    migration!(20261125000007, "hot_updates"),
    migration!(20261204000001, "status_events"),
    migration!(20261204000002, "drop_opt_out_notify"),
    migration!(20261204000003, "inbound_replay"),
    migration!(20261204000004, "quiet_hours"),
    migration!(20261204000005, "support_lookups"),
    migration!(20261204000006, "inbox"),
    migration!(20261204000007, "shared_rates"),
    migration!(20261207000001, "replies"),
    migration!(20261207000010, "guards"),
    migration!(20261208000001, "rate_clock_steps"),
    migration!(20261208000200, "encoding"),
    migration!(20261208000201, "sender_number"),
    migration!(20261208000300, "withdrawals"),
    migration!(20261208000301, "booking_lookup"),
    migration!(20261208000302, "guard_outcomes"),
    migration!(20261208000400, "receipt_timeout"),
    migration!(20261208000401, "receipt_timeout_index"),
    migration!(20261208000402, "guard_plans"),
    migration!(20261209000001, "events_bound"),
    migration!(20261209000100, "guard_batches"),
];

const CREATE_TABLE: &str = "CREATE TABLE IF NOT EXISTS _sqlx_migrations (
    version BIGINT PRIMARY KEY,
    description TEXT NOT NULL,
    installed_on TIMESTAMPTZ NOT NULL DEFAULT now(),
    success BOOLEAN NOT NULL,
    checksum BYTEA NOT NULL,
    execution_time BIGINT NOT NULL
)";

/// Applies what is missing, on `client`, a connection of its own: the advisory lock is
/// the session's, so it goes with the connection whatever happens here.
pub(crate) async fn run(client: &mut Client, lock_timeout: Duration) -> Result<(), StoreError> {
    let database: String = client
        .query_one("SELECT current_database()", &[])
        .await?
        .try_get(0)?;
    // The pool's 15 s limit is for the daemon's statements; a migration of a big table
    // may take longer.
    client
        .batch_execute(&format!(
            "SET statement_timeout = 0; SET lock_timeout = {}",
            lock_timeout.as_millis().max(1)
        ))
        .await?;
    lock(client, lock_key(&database)).await?;
    client.batch_execute(CREATE_TABLE).await?;
    let applied = applied(client).await?;
    if let Some(newest) = applied.newer.last() {
        tracing::info!(
            database_version = newest,
            build_version = latest(),
            "the schema is newer than this build (a later version migrated it): nothing to \
             apply; migrations only add, so this build works on it"
        );
    }
    for migration in MIGRATIONS {
        if !applied.known.contains(&migration.version) {
            apply_when_locks_allow(client, migration, lock_timeout).await?;
        }
    }
    client
        .execute("SELECT pg_advisory_unlock($1)", &[&lock_key(&database)])
        .await?;
    Ok(())
}

/// Takes the migrators' advisory lock, trying again until it is free. Not by waiting in
/// `pg_advisory_lock`: a session waiting there holds a snapshot, which the other
/// migrator's `CREATE INDEX CONCURRENTLY` would wait for in turn (a deadlock).
async fn lock(client: &Client, key: i64) -> Result<(), StoreError> {
    let mut waiting = false;
    loop {
        let taken: bool = client
            .query_one("SELECT pg_try_advisory_lock($1)", &[&key])
            .await?
            .try_get(0)?;
        if taken {
            return Ok(());
        }
        if !waiting {
            tracing::info!("another migrator is at work; waiting for it");
            waiting = true;
        }
        tokio::time::sleep(LOCK_POLL).await;
    }
}

/// A row of `_sqlx_migrations`: version, checksum, success.
type Recorded = (i64, Vec<u8>, bool);

/// The migrations a database has applied, as this build sees them.
#[derive(Debug, Default, PartialEq, Eq)]
struct Applied {
    /// This build's migrations that are applied.
    known: Vec<i64>,
    /// Applied migrations newer than every one this build knows, oldest first: a later
    /// build applied them.
    newer: Vec<i64>,
}

/// The applied migrations, checked against this build's.
async fn applied(client: &Client) -> Result<Applied, StoreError> {
    let rows = client
        .query(
            "SELECT version, checksum, success FROM _sqlx_migrations ORDER BY version",
            &[],
        )
        .await?;
    let mut recorded = Vec::with_capacity(rows.len());
    for row in rows {
        recorded.push((row.try_get(0)?, row.try_get(1)?, row.try_get(2)?));
    }
    check_applied(MIGRATIONS, &recorded)
}

/// `recorded` (by version) against the build's `migrations`.
fn check_applied(migrations: &[Migration], recorded: &[Recorded]) -> Result<Applied, StoreError> {
    let newest_known = migrations.iter().map(|m| m.version).max().unwrap_or(0);
    let mut applied = Applied::default();
    for (version, checksum, success) in recorded {
        let version = *version;
        if !success {
            return Err(StoreError::Migrate(format!(
                "migration {version} is recorded as failed: repair the database by hand"
            )));
        }
        match migrations.iter().find(|m| m.version == version) {
            None if version > newest_known => applied.newer.push(version),
            None => {
                return Err(StoreError::Migrate(format!(
                    "migration {version} was applied but this build does not know it, though \
                     it knows newer ones (up to {newest_known}): the database and this build \
                     come from different histories"
                )));
            }
            Some(known) if known.checksum() != *checksum => {
                return Err(StoreError::Migrate(format!(
                    "migration {version} was applied but its file has changed since"
                )));
            }
            Some(_) => applied.known.push(version),
        }
    }
    if let Some(first_newer) = applied.newer.first() {
        let missing: Vec<String> = migrations
            .iter()
            .filter(|m| !applied.known.contains(&m.version))
            .map(|m| m.version.to_string())
            .collect();
        if !missing.is_empty() {
            return Err(StoreError::Migrate(format!(
                "the database holds migrations newer than this build (from {first_newer}) \
                 but lacks this build's {}: the database and this build come from \
                 different histories",
                missing.join(", ")
            )));
        }
    }
    Ok(applied)
}

/// Applies `migration`, trying again when it waited `lock_timeout` for a lock.
async fn apply_when_locks_allow(
    client: &mut Client,
    migration: &Migration,
    lock_timeout: Duration,
) -> Result<(), StoreError> {
    for tries in 1.. {
        match apply(client, migration).await {
            Err(e) if waited_for_lock(&e) && tries < LOCK_TRIES => {
                tracing::warn!(
                    version = migration.version,
                    name = migration.name,
                    "a migration waited too long for a table's lock; trying again"
                );
                tokio::time::sleep(LOCK_PAUSE).await;
            }
            Err(e) if waited_for_lock(&e) => {
                return Err(StoreError::Migrate(format!(
                    "{} {}: waited {} for a lock {LOCK_TRIES} times; the oldest open \
                     transactions, the likely blockers: {}. End them or let them finish, \
                     then migrate again",
                    migration.version,
                    migration.name,
                    humantime::format_duration(lock_timeout),
                    open_transactions(client).await
                )));
            }
            other => return other,
        }
    }
    Ok(())
}

fn waited_for_lock(e: &StoreError) -> bool {
    e.server_error()
        .is_some_and(|db| db.code() == &tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE)
}

/// The other sessions' open transactions on this database, oldest first: who they are,
/// never what they run (a statement may hold a number).
async fn open_transactions(client: &Client) -> String {
    const OLDEST: &str = "SELECT format('pid %s (%s, user %s, %s for %s s)', pid,
                                 COALESCE(NULLIF(application_name, ''), 'no application name'),
                                 COALESCE(usename, '?'), COALESCE(state, '?'),
                                 extract(epoch FROM now() - xact_start)::bigint)
                            FROM pg_stat_activity
                           WHERE datname = current_database() AND pid <> pg_backend_pid()
                             AND xact_start IS NOT NULL
                           ORDER BY xact_start LIMIT 3";
    match client.query(OLDEST, &[]).await {
        Ok(rows) if !rows.is_empty() => rows
            .iter()
            .filter_map(|row| row.try_get::<_, String>(0).ok())
            .collect::<Vec<_>>()
            .join("; "),
        Ok(_) => "none left open".to_owned(),
        Err(e) => format!("unknown ({})", super::describe(&e)),
    }
}

/// One migration and its record: in one transaction, or one statement after the other.
async fn apply(client: &mut Client, migration: &Migration) -> Result<(), StoreError> {
    let started = Instant::now();
    let failed = |e: tokio_postgres::Error| {
        if e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE) {
            return StoreError::Database(e);
        }
        StoreError::Migrate(format!(
            "{} {}: {}",
            migration.version,
            migration.name,
            super::describe(&e)
        ))
    };
    if migration.in_transaction() {
        let tx = client.transaction().await?;
        tx.batch_execute(migration.sql).await.map_err(failed)?;
        record(&tx, migration, started).await?;
        tx.commit().await?;
    } else {
        // Several statements sent at once would run in one implicit transaction.
        for statement in statements(migration.sql) {
            client.batch_execute(statement).await.map_err(failed)?;
        }
        record(client, migration, started).await?;
    }
    tracing::info!(
        version = migration.version,
        name = migration.name,
        "migration applied"
    );
    Ok(())
}

/// Records `migration` as applied, as sqlx did.
async fn record(
    client: &impl tokio_postgres::GenericClient,
    migration: &Migration,
    started: Instant,
) -> Result<(), StoreError> {
    let took = i64::try_from(started.elapsed().as_nanos()).unwrap_or(i64::MAX);
    client
        .execute(
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
             VALUES ($1, $2, TRUE, $3, $4)",
            &[
                &migration.version,
                &migration.description(),
                &migration.checksum(),
                &took,
            ],
        )
        .await?;
    Ok(())
}

/// The statements of `sql`, each ending with a `;` at the end of a line; lines that hold
/// only a comment or nothing are left out.
fn statements(sql: &str) -> Vec<&str> {
    let mut statements = Vec::new();
    let mut start = 0;
    let mut end = 0;
    for line in sql.split_inclusive('\n') {
        end += line.len();
        if line.trim_end().ends_with(';') {
            statements.push(&sql[start..end]);
            start = end;
        }
    }
    statements.push(&sql[start..]);
    statements.retain(|statement| {
        statement
            .lines()
            .map(str::trim)
            .any(|line| !line.is_empty() && !line.starts_with("--"))
    });
    statements
}

/// The advisory lock's key for `database`, as sqlx computes it (CRC-32 of the name times
/// a constant of its choosing).
fn lock_key(database: &str) -> i64 {
    0x3d32_ad9e * i64::from(crc32(database.as_bytes()))
}

/// CRC-32 (IEEE 802.3, the zlib one), bit by bit: it runs once per migration.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for byte in bytes {
        crc ^= u32::from(*byte);
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0xedb8_8320 & mask);
        }
    }
    !crc
}

/// Version of the newest migration this build knows.
pub(crate) fn latest() -> i64 {
    MIGRATIONS.iter().map(|m| m.version).max().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_is_the_ieee_one() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn every_file_in_schema_is_listed_in_order() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schema");
        let mut files: Vec<String> = std::fs::read_dir(dir)
            .expect("schema/ is readable")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|name| name.ends_with(".sql"))
            .collect();
        files.sort();
        let listed: Vec<String> = MIGRATIONS
            .iter()
            .map(|m| format!("{}_{}.sql", m.version, m.name))
            .collect();
        assert_eq!(listed, files);
    }

    #[test]
    fn a_no_transaction_migration_is_sent_one_statement_at_a_time() {
        let sql = "-- smsgw:no-transaction\n\
                   -- A build cut off leaves an invalid index behind: drop it first.\n\
                   DROP INDEX CONCURRENTLY IF EXISTS sms_messages_x;\n\
                   CREATE INDEX CONCURRENTLY sms_messages_x\n    ON sms_messages (x);  \n\
                   -- the end\n";
        let migration = Migration {
            version: 1,
            name: "x",
            sql,
        };
        assert!(!migration.in_transaction());
        assert_eq!(
            statements(sql),
            vec![
                "-- smsgw:no-transaction\n\
                 -- A build cut off leaves an invalid index behind: drop it first.\n\
                 DROP INDEX CONCURRENTLY IF EXISTS sms_messages_x;\n",
                "CREATE INDEX CONCURRENTLY sms_messages_x\n    ON sms_messages (x);  \n",
            ]
        );
        assert_eq!(statements("SELECT 1"), vec!["SELECT 1"]);
    }

    /// A build of three migrations (10, 20, 30), and the rows a database records for
    /// `versions`.
    fn build_and_rows(versions: &[i64]) -> (Vec<Migration>, Vec<Recorded>) {
        let build: Vec<Migration> = [10, 20, 30]
            .map(|version| Migration {
                version,
                name: "x",
                sql: "SELECT 1",
            })
            .into();
        let rows = versions
            .iter()
            .map(|v| (*v, Sha384::digest(b"SELECT 1").to_vec(), true))
            .collect();
        (build, rows)
    }

    #[test]
    fn migrations_newer_than_the_build_are_accepted_when_the_history_is_the_same() {
        let (build, rows) = build_and_rows(&[10, 20, 30, 40, 50]);
        let applied = check_applied(&build, &rows).expect("a later build's database");
        assert_eq!(
            applied,
            Applied {
                known: vec![10, 20, 30],
                newer: vec![40, 50]
            }
        );
        let (build, rows) = build_and_rows(&[10, 20]);
        let applied = check_applied(&build, &rows).expect("an older database");
        assert_eq!(applied.newer, Vec::<i64>::new(), "30 is simply missing");
    }

    #[test]
    fn a_database_from_another_history_is_refused() {
        // An unknown migration older than the build's newest: another branch applied it.
        let (build, mut rows) = build_and_rows(&[10, 20, 30]);
        rows.insert(2, (25, vec![0], true));
        let refused = check_applied(&build, &rows).expect_err("refused");
        assert!(refused.to_string().contains("migration 25 "), "{refused}");
        // Newer migrations, but one of the build's own missing beneath them.
        let (build, rows) = build_and_rows(&[10, 30, 40]);
        let refused = check_applied(&build, &rows).expect_err("refused");
        assert!(
            refused.to_string().contains("lacks this build's 20"),
            "{refused}"
        );
    }

    #[test]
    fn descriptions_and_checksums_are_the_ones_sqlx_recorded() {
        let unknown = &MIGRATIONS[2];
        assert_eq!(unknown.description(), "unknown outcome");
        assert_eq!(
            hex::encode(MIGRATIONS[0].checksum()),
            "113b2170ad45b8cd83ead0c017ba4323d999f5e0f7d2560b691a3bc28e43c061\
             67952bf178fb8e6ee4829b81f3bf735b"
        );
    }
}
