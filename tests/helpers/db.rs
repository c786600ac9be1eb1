//! The tests' own connection to their database, for setting up data and reading it back,
//! and the creation and removal of a test's database.
//!
//! Plain connections (no TLS): the tests run against the local server.

use std::sync::Arc;

use tokio::sync::RwLock;
use tokio_postgres::{
    Client, NoTls, Row,
    types::{FromSqlOwned, ToSql},
};

/// A statement's parameters.
pub type Params<'a> = [&'a (dyn ToSql + Sync)];

/// One connection; statements from several tasks at once are pipelined on it. A test that
/// stops PostgreSQL finds it connected again afterwards.
pub struct Db {
    url: String,
    client: RwLock<Arc<Client>>,
}

impl Db {
    pub async fn connect(url: &str) -> Db {
        Db {
            url: url.to_owned(),
            client: RwLock::new(Arc::new(connect(url).await)),
        }
    }

    /// The connection, opened again if the server closed it.
    async fn client(&self) -> Arc<Client> {
        let current = self.client.read().await.clone();
        if !current.is_closed() {
            return current;
        }
        let mut client = self.client.write().await;
        if client.is_closed() {
            *client = Arc::new(connect(&self.url).await);
        }
        client.clone()
    }

    /// Runs `sql`; how many rows it changed.
    pub async fn execute(&self, sql: &str, params: &Params<'_>) -> u64 {
        self.client()
            .await
            .execute(sql, params)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {}", describe(&e)))
    }

    pub async fn rows(&self, sql: &str, params: &Params<'_>) -> Vec<Row> {
        self.client()
            .await
            .query(sql, params)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {}", describe(&e)))
    }

    /// The first column of the one row `sql` returns.
    pub async fn scalar<T: FromSqlOwned>(&self, sql: &str, params: &Params<'_>) -> T {
        self.client()
            .await
            .query_one(sql, params)
            .await
            .and_then(|row| row.try_get(0))
            .unwrap_or_else(|e| panic!("{sql}: {}", describe(&e)))
    }

    /// The first column of the row `sql` returns, if it returns one.
    pub async fn optional<T: FromSqlOwned>(&self, sql: &str, params: &Params<'_>) -> Option<T> {
        self.client()
            .await
            .query_opt(sql, params)
            .await
            .and_then(|row| row.map(|row| row.try_get(0)).transpose())
            .unwrap_or_else(|e| panic!("{sql}: {}", describe(&e)))
    }

    /// Statements separated by `;`, without parameters.
    pub async fn batch(&self, sql: &str) {
        self.client()
            .await
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {}", describe(&e)))
    }
}

/// What the server said, not just "db error".
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => db.to_string(),
        None => e.to_string(),
    }
}

async fn connect(url: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect to the test database: {}", describe(&e)));
    tokio::spawn(connection);
    client
}

/// The server's `postgres` database, reached like `url`'s.
fn maintenance_url(url: &str) -> String {
    let mut parsed = reqwest::Url::parse(url).expect("a database URL");
    parsed.set_path("/postgres");
    parsed.to_string()
}

fn quoted(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

pub async fn create_database(url: &str, name: &str) {
    Db::connect(&maintenance_url(url))
        .await
        .batch(&format!("CREATE DATABASE {}", quoted(name)))
        .await;
}

/// Drops the database, whoever is still connected to it.
pub async fn drop_database(url: &str, name: &str) -> Result<(), tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(&maintenance_url(url), NoTls).await?;
    tokio::spawn(connection);
    client
        .batch_execute(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            quoted(name)
        ))
        .await
}

/// The group roles of `deploy/postgresql/roles.sql`, applied to the database at `url`
/// under names of the test's own: `<prefix>_daemon`, `_webapp`, `_support`, `_billing`
/// (roles belong to the whole server, which the tests share).
pub fn apply_roles(url: &str, prefix: &str) {
    let mut psql = std::process::Command::new("psql");
    psql.args(["-X", "-q", "-v", "ON_ERROR_STOP=1"]);
    for group in ["daemon", "webapp", "support", "billing"] {
        psql.args(["-v", &format!("{group}={prefix}_{group}")]);
    }
    let output = psql
        .arg("-f")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/deploy/postgresql/roles.sql"
        ))
        .arg(url)
        .output()
        .expect("psql runs deploy/postgresql/roles.sql");
    assert!(
        output.status.success(),
        "roles.sql: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

impl Db {
    /// A login role `<prefix>_<name>`, member of the group `<prefix>_<group>`; the URL of
    /// this database as that login.
    pub async fn login(&self, prefix: &str, name: &str, group: &str) -> String {
        let login = format!("{prefix}_{name}");
        self.batch(&format!(
            "CREATE ROLE {login} LOGIN PASSWORD 'secret'; GRANT {prefix}_{group} TO {login}"
        ))
        .await;
        let mut url = reqwest::Url::parse(&self.url).expect("a database URL");
        url.set_username(&login).expect("a user");
        url.set_password(Some("secret")).expect("a password");
        url.to_string()
    }

    /// Drops the roles named `<prefix>_...`, and whatever they were granted here.
    /// (`scripts/clean-test-envs.sh` drops those a killed test left.)
    pub async fn drop_roles(&self, prefix: &str) {
        let roles: Vec<String> = self
            .rows(
                "SELECT quote_ident(rolname) FROM pg_roles WHERE starts_with(rolname, $1)",
                &[&format!("{prefix}_")],
            )
            .await
            .iter()
            .map(|row| row.get(0))
            .collect();
        if !roles.is_empty() {
            let list = roles.join(", ");
            self.batch(&format!("DROP OWNED BY {list}; DROP ROLE {list}"))
                .await;
        }
    }
}
