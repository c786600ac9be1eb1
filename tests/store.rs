//! The store's own connection work: migrations (and databases the sqlx migrator set up),
//! creating the database, TLS, and the settings listener's reconnection.

mod helpers;

use std::time::{Duration, Instant};

use helpers::{Db, TestEnv, id_of, job, spawn_app};
use smsgw::store::Store;

const SCHOOL: i64 = 7;

/// The rows the sqlx migrator (sqlx 0.8) wrote for the first six migrations, as it wrote
/// them: description, and checksum (SHA-384 of the file) in hex.
const SQLX_ROWS: [(i64, &str, &str); 6] = [
    (
        20261125000001,
        "initial",
        "113b2170ad45b8cd83ead0c017ba4323d999f5e0f7d2560b691a3bc28e43c06167952bf178fb8e6ee4829b81f3bf735b",
    ),
    (
        20261125000002,
        "retention",
        "89a43765d1d08d2fbabfc4c8a114bb9cd11dd83703e05b3f7d1c28d94fd1f5aed446fad8d197dcd91ebfa8c377ce30d3",
    ),
    (
        20261125000003,
        "unknown outcome",
        "e1034a1c3424d13829d2c9d62d8d2ea1847812bd6365a976eb75e83885b1e0f25fbc4f911c68e4a9b3ab2eff341f85bc",
    ),
    (
        20261125000004,
        "attempt claims",
        "f396645bcbab399bed1d3f683257e049ef05ec92d7c5e7fcb5a7c9e2118d4b211b2b86a251a72a5aa3a3b7a3ab5158fa",
    ),
    (
        20261125000005,
        "routing and receipts",
        "aff84953d98ddac4a89bb7db7a164eafb0f7facff674a61a232a386fb78376e4728d55830399e3afc322f3778beeaede",
    ),
    (
        20261125000006,
        "throughput",
        "4ba0591af7096084c79314a4121d995d4b41f6702c1666928dbca830481828de375056751e752d0dfd2a2719cce69dd0",
    ),
];

/// The first six schema files, applied as the sqlx migrator applied them.
const FIRST_SIX: [&str; 6] = [
    include_str!("../schema/20261125000001_initial.sql"),
    include_str!("../schema/20261125000002_retention.sql"),
    include_str!("../schema/20261125000003_unknown_outcome.sql"),
    include_str!("../schema/20261125000004_attempt_claims.sql"),
    include_str!("../schema/20261125000005_routing_and_receipts.sql"),
    include_str!("../schema/20261125000006_throughput.sql"),
];

/// A database as the sqlx-based build left it, six migrations in.
async fn migrated_by_sqlx(db: &Db) {
    for sql in FIRST_SIX {
        db.batch(sql).await;
    }
    db.batch(
        "CREATE TABLE _sqlx_migrations (
            version BIGINT PRIMARY KEY,
            description TEXT NOT NULL,
            installed_on TIMESTAMPTZ NOT NULL DEFAULT now(),
            success BOOLEAN NOT NULL,
            checksum BYTEA NOT NULL,
            execution_time BIGINT NOT NULL
        )",
    )
    .await;
    for (version, description, checksum) in SQLX_ROWS {
        db.execute(
            "INSERT INTO _sqlx_migrations (version, description, installed_on, success, checksum,
                                           execution_time)
             VALUES ($1, $2, now() - interval '30 days', TRUE, decode($3, 'hex'), 1234567)",
            &[&version, &description, &checksum],
        )
        .await;
    }
}

async fn store(env: &TestEnv) -> Store {
    Store::connect(&env.database_url, 2).await.expect("connect")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_database_the_sqlx_migrator_set_up_gets_only_what_it_lacks() {
    let env = TestEnv::new().await;
    let db = Db::connect(&env.database_url).await;
    migrated_by_sqlx(&db).await;
    // Migration 2 made this index; were it applied again, the index would be back.
    db.batch("DROP INDEX sms_messages_created").await;

    let store = store(&env).await;
    assert_eq!(
        store.schema_version().await.expect("version"),
        20261125000006
    );
    store.migrate().await.expect("migrate");
    store.migrate().await.expect("and again");

    assert_eq!(
        store.schema_version().await.expect("version"),
        Store::latest_migration()
    );
    let old_rows: i64 = db
        .scalar(
            "SELECT count(*) FROM _sqlx_migrations
              WHERE installed_on < now() - interval '29 days' AND execution_time = 1234567",
            &[],
        )
        .await;
    assert_eq!(old_rows, 6, "the old records are left as they were");
    let index: Option<String> = db
        .scalar("SELECT to_regclass('sms_messages_created')::text", &[])
        .await;
    assert_eq!(index, None, "migration 2 was not applied again");
    let (description, success): (String, bool) = {
        let rows = db
            .rows(
                "SELECT description, success FROM _sqlx_migrations WHERE version = 20261125000007",
                &[],
            )
            .await;
        (rows[0].get(0), rows[0].get(1))
    };
    assert_eq!((description.as_str(), success), ("hot updates", true));
    let options: Option<Vec<String>> = db
        .scalar(
            "SELECT reloptions FROM pg_class WHERE oid = 'sms_messages'::regclass",
            &[],
        )
        .await;
    assert_eq!(options, Some(vec!["fillfactor=70".to_owned()]));
    store.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_migration_changed_after_it_was_applied_stops_the_migrator() {
    let env = TestEnv::new().await;
    let store = store(&env).await;
    store.migrate().await.expect("migrate");
    let db = Db::connect(&env.database_url).await;
    db.batch("UPDATE _sqlx_migrations SET checksum = '\\x00' WHERE version = 20261125000003")
        .await;
    let refused = store.migrate().await.expect_err("refused");
    assert!(refused.to_string().contains("20261125000003"), "{refused}");
    store.close().await;
}

/// A rollback runs the previous version, and its `smsgw migrate` (the Kubernetes Job of
/// every rollout), on the schema a later version left: migrations newer than the build
/// are accepted and nothing is applied. One the build should know but does not (another
/// history) still stops it.
#[tokio::test(flavor = "multi_thread")]
async fn a_schema_a_later_version_migrated_is_accepted_but_another_history_is_not() {
    let env = TestEnv::new().await;
    let store = store(&env).await;
    store.migrate().await.expect("migrate");
    let db = Db::connect(&env.database_url).await;
    let later = Store::latest_migration() + 1;
    // What a later version's additive migration does, and its record.
    db.batch("ALTER TABLE sms_messages ADD COLUMN later_column text")
        .await;
    db.execute(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
         VALUES ($1, 'later', TRUE, '\\x00', 1)",
        &[&later],
    )
    .await;

    store.migrate().await.expect("a newer schema is accepted");
    assert_eq!(store.schema_version().await.expect("version"), later);
    let vars = [("SMSGW_DATABASE_URL".to_owned(), env.database_url.clone())];
    let output = helpers::smsgw_command(&vars, &["migrate"])
        .output()
        .expect("smsgw migrate");
    let said = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    assert!(
        said.contains(&format!("version {later}, newer than this build's")),
        "{said}"
    );

    // An unknown migration among the build's own: another branch applied it. A day
    // before the newest (in the timestamp's digits), where none of ours is: the newest two
    // may be one apart.
    let between = Store::latest_migration() - 1_000_000;
    db.execute(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
         VALUES ($1, 'elsewhere', TRUE, '\\x00', 1)",
        &[&between],
    )
    .await;
    let refused = store.migrate().await.expect_err("refused");
    assert!(
        refused.to_string().contains("different histories"),
        "{refused}"
    );
    store.close().await;
}

/// A migration on a big table may run for minutes: the daemon's 15 s statement timeout
/// must not cut it off half-way. An event trigger notes the timeout in force for every
/// schema change the migrations make.
#[tokio::test(flavor = "multi_thread")]
async fn migrations_run_without_the_daemons_statement_timeout() {
    let env = TestEnv::new().await;
    let db = Db::connect(&env.database_url).await;
    db.batch(
        "CREATE TABLE seen_timeouts (statement_timeout text NOT NULL);
         CREATE FUNCTION note_timeout() RETURNS event_trigger LANGUAGE plpgsql AS $$
         BEGIN
             INSERT INTO seen_timeouts VALUES (current_setting('statement_timeout'));
         END $$;
         CREATE EVENT TRIGGER note_timeout ON ddl_command_end
             EXECUTE FUNCTION note_timeout();",
    )
    .await;

    store(&env).await.migrate().await.expect("migrate");

    let seen: Vec<String> = db
        .rows("SELECT DISTINCT statement_timeout FROM seen_timeouts", &[])
        .await
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(seen, vec!["0".to_owned()], "no limit on any migration");
}

#[tokio::test(flavor = "multi_thread")]
async fn migrations_from_many_callers_at_once_apply_each_once() {
    let env = TestEnv::new().await;
    let stores = [store(&env).await, store(&env).await, store(&env).await];
    let results = futures_util::future::join_all(stores.iter().map(Store::migrate)).await;
    for result in results {
        result.expect("every caller succeeds");
    }
    let db = Db::connect(&env.database_url).await;
    let (rows, versions): (i64, i64) = {
        let rows = db
            .rows(
                "SELECT count(*), count(DISTINCT version) FROM _sqlx_migrations WHERE success",
                &[],
            )
            .await;
        (rows[0].get(0), rows[0].get(1))
    };
    assert_eq!(rows, versions);
    assert_eq!(
        rows,
        smsgw_migration_files(),
        "each migration applied exactly once"
    );
}

fn smsgw_migration_files() -> i64 {
    std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/schema"))
        .expect("schema/")
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "sql"))
        })
        .count() as i64
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_database_is_created_once_whatever_its_name() {
    let env = TestEnv::new().await;
    // A name that needs quoting, in the same server and the same test namespace.
    let name = format!("{}_\"quoted\" Name", env.name);
    let mut url = reqwest::Url::parse(&env.database_url).expect("URL");
    url.set_path(&format!("/{name}"));
    let url = url.to_string();

    let (first, second) = tokio::join!(
        Store::create_database_if_missing(&url),
        Store::create_database_if_missing(&url)
    );
    let created = [first.expect("first"), second.expect("second")];
    assert_eq!(
        created.iter().filter(|c| **c).count(),
        1,
        "exactly one of two callers created it: {created:?}"
    );
    assert!(
        !Store::create_database_if_missing(&url)
            .await
            .expect("third")
    );
    let store = Store::connect(&url, 1).await.expect("connect to it");
    assert!(store.ping().await);
    store.close().await;
    drop(store);
    helpers::db::drop_database(&env.database_url, &name)
        .await
        .expect("drop it");
}

/// Whether this connection is encrypted.
async fn encrypted(store: &Store) -> bool {
    let client = store.pool().get().await.expect("a connection");
    client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .expect("pg_stat_ssl")
        .get(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn sslmode_is_read_as_libpq_reads_it() {
    let env = TestEnv::new().await;
    let db = Db::connect(&env.database_url).await;
    let server_tls: String = db.scalar("SHOW ssl", &[]).await;
    let with = |mode: &str| format!("{}?sslmode={mode}", env.database_url);

    let plain = Store::connect(&with("disable"), 1).await.expect("disable");
    assert!(!encrypted(&plain).await);
    let required = Store::connect(&with("require"), 1).await;
    if server_tls == "on" {
        // Encrypted even though the server's certificate is its own (self-signed).
        assert!(encrypted(&required.expect("require")).await);
        let preferred = Store::connect(&with("prefer"), 1).await.expect("prefer");
        assert!(encrypted(&preferred).await);
    } else {
        assert!(required.is_err(), "require without TLS on the server");
    }
    // 127.0.0.1 has no certificate from a root the system trusts.
    assert!(Store::connect(&with("verify-full"), 1).await.is_err());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_settings_cache_hears_changes_again_after_its_connection_is_killed() {
    let app = spawn_app().await;
    app.add_school(SCHOOL, "GB").await;
    let before = job("booking_reminder", SCHOOL, "+447700900123", "Reminder");
    app.publish(&before).await;
    app.wait_for_status(id_of(&before), "sent").await;

    let killed: i64 = app
        .db
        .scalar(
            "SELECT count(*) FROM (
                SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                 WHERE datname = current_database() AND query LIKE 'LISTEN%') t",
            &[],
        )
        .await;
    assert_eq!(killed, 1, "one listening connection");
    // The cache reconnects (after a second) and reloads; then it hears changes again.
    let deadline = Instant::now() + helpers::PATIENCE;
    loop {
        let listening: i64 = app
            .db
            .scalar(
                "SELECT count(*) FROM pg_stat_activity
                  WHERE datname = current_database() AND query LIKE 'LISTEN%'",
                &[],
            )
            .await;
        if listening == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "the cache never listened again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    app.sql(&format!(
        "UPDATE sms_school_settings SET sms_enabled = false WHERE school_id = {SCHOOL}"
    ))
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = job("booking_reminder", SCHOOL, "+447700900124", "Reminder");
    app.publish(&after).await;
    let row = app.wait_for_status(id_of(&after), "suppressed").await;
    assert_eq!(row.reason.as_deref(), Some("school_disabled"));
}

/// Any role that can connect may LISTEN, so a change of opt-out must not announce the
/// number; a settings change still is announced (the settings cache needs it).
#[tokio::test(flavor = "multi_thread")]
async fn an_opt_out_is_not_announced_to_listeners() {
    let env = TestEnv::new().await;
    helpers::migrate(&env.database_url).await;
    let (client, mut heard) = listen(&env.database_url, "smsgw_changes").await;

    for statement in [
        "INSERT INTO sms_opt_outs (school_id, phone, source) VALUES (NULL, '+447700900123', 'web')",
        "UPDATE sms_opt_outs SET phone = '+447700900124'",
        "DELETE FROM sms_opt_outs",
        "INSERT INTO sms_school_settings (school_id, sms_enabled, country) VALUES (7, true, 'GB')",
    ] {
        client.batch_execute(statement).await.expect(statement);
    }

    // Notifications arrive in commit order: the opt-outs' would come first.
    let first = tokio::time::timeout(helpers::PATIENCE, heard.recv())
        .await
        .expect("the settings change is announced")
        .expect("the listening connection is open");
    assert_eq!(first, "settings:7");
}

/// A connection of the test's own that LISTENs on `channel`, and the payloads it hears.
async fn listen(
    url: &str,
    channel: &str,
) -> (
    tokio_postgres::Client,
    tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    use futures_util::StreamExt;
    let (client, mut connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect to the test database");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = message {
                let _ = tx.send(n.payload().to_owned());
            }
        }
    });
    client
        .batch_execute(&format!("LISTEN {channel}"))
        .await
        .expect("LISTEN");
    (client, rx)
}

/// Leases from the account-wide rate clocks never hand one instant out twice and keep
/// each clock's spacing, also for a call that takes a slot of two clocks at once.
#[tokio::test(flavor = "multi_thread")]
async fn rate_clocks_hand_out_each_instant_once_at_their_spacing() {
    use smsgw::store::ClockSpacing;
    helpers::init_logs();
    let env = TestEnv::new().await;
    helpers::migrate(&env.database_url).await;
    let store = Store::connect(&env.database_url, 4).await.expect("store");
    // Spacings of seconds keep every lease ahead of the clock however slow the machine.
    let clock = |name: &str, seconds: u64| ClockSpacing {
        name: name.to_owned(),
        spacing: Duration::from_secs(seconds),
    };
    let provider = [clock("provider:twilio", 2)];
    let both = [clock("provider:twilio", 2), clock("account", 5)];

    // Four slots: the next lease starts where they end, 8 s on.
    let first = store.lease_slots(&provider, 4).await.expect("lease");
    let second = store.lease_slots(&provider, 4).await.expect("lease");
    let gap = second.unix_seconds - first.unix_seconds;
    assert!(
        (gap - 8.0).abs() < 1e-6,
        "second lease {gap} s after the first"
    );
    // One slot of both clocks: after the provider's slots, and then each clock moves on
    // by its own spacing.
    let joint = store.lease_slots(&both, 1).await.expect("lease");
    assert!((joint.unix_seconds - second.unix_seconds - 8.0).abs() < 1e-6);
    let account_only = store
        .lease_slots(&[clock("account", 5)], 1)
        .await
        .expect("lease");
    let after_provider = store.lease_slots(&provider, 1).await.expect("lease");
    assert!((account_only.unix_seconds - joint.unix_seconds - 5.0).abs() < 1e-6);
    assert!((after_provider.unix_seconds - joint.unix_seconds - 2.0).abs() < 1e-6);

    // Leases made at once from many connections never overlap.
    let leases =
        futures_util::future::join_all((0..20).map(|_| store.lease_slots(&provider, 3))).await;
    let mut starts: Vec<f64> = leases
        .into_iter()
        .map(|lease| lease.expect("lease").unix_seconds)
        .collect();
    starts.sort_by(f64::total_cmp);
    for pair in starts.windows(2) {
        assert!(
            pair[1] - pair[0] >= 6.0 - 1e-6,
            "overlapping leases: {pair:?}"
        );
    }
    store.close().await;
}
