//! Test helpers: every test gets its own RabbitMQ vhost and PostgreSQL database, a Twilio
//! stub, and the daemon running in-process against them.
//!
//! The services are found through the daemon's own variables (`SMSGW_AMQP_URL`,
//! `SMSGW_DATABASE_URL`; the local defaults otherwise); each test swaps in a vhost and a
//! database of its own, so tests run in parallel without seeing each other's data.
#![allow(dead_code, unreachable_pub, unused_imports)]

pub mod browser;
pub mod cluster;
pub mod db;
pub mod events;
pub mod process;
pub mod proxy;
pub mod twilio_stub;
pub mod vonage_stub;

use std::{
    collections::HashMap,
    process::Command,
    time::{Duration, Instant},
};

use lapin::{
    BasicProperties, Channel, Connection, ConnectionProperties,
    options::{BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions},
    types::{AMQPValue, FieldTable},
};
use serde_json::Value;
use tokio::task::JoinHandle;
use tokio_postgres::Row;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use smsgw::{config::Settings, daemon::DaemonError};

pub use db::Db;
pub use twilio_stub::{Reply, TwilioStub};

/// How long a test waits for something to happen before it fails.
pub const PATIENCE: Duration = Duration::from_secs(30);

fn base_amqp_url() -> String {
    std::env::var("SMSGW_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

fn base_database_url() -> String {
    std::env::var("SMSGW_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/smsgw".to_owned())
}

fn rabbitmqctl(args: &[&str]) {
    let output = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl runs (the tests create a vhost per test with it)");
    assert!(
        output.status.success(),
        "rabbitmqctl {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Sets what the tests' broker user may configure in `env`'s vhost (reading and writing
/// stay open to everything), as a deployment's permissions would.
pub fn allow_configuring(env: &TestEnv, pattern: &str) {
    rabbitmqctl(&[
        "set_permissions",
        "-p",
        &env.name,
        &broker_user(),
        pattern,
        ".*",
        ".*",
    ]);
}

fn broker_user() -> String {
    reqwest::Url::parse(&base_amqp_url())
        .map(|u| u.username().to_owned())
        .ok()
        .filter(|user| !user.is_empty())
        .unwrap_or_else(|| "guest".to_owned())
}

/// A vhost and a database that belong to one test; both are removed when it ends.
pub struct TestEnv {
    pub name: String,
    pub amqp_url: String,
    pub database_url: String,
}

impl TestEnv {
    pub async fn new() -> TestEnv {
        let name = format!("smsgw_test_{}", Uuid::new_v4().simple());
        rabbitmqctl(&["add_vhost", &name]);
        rabbitmqctl(&[
            "set_permissions",
            "-p",
            &name,
            &broker_user(),
            ".*",
            ".*",
            ".*",
        ]);

        let mut amqp = reqwest::Url::parse(&base_amqp_url()).expect("SMSGW_AMQP_URL is a URL");
        amqp.set_path(&format!("/{name}"));
        let mut database =
            reqwest::Url::parse(&base_database_url()).expect("SMSGW_DATABASE_URL is a URL");
        database.set_path(&format!("/{name}"));
        let database_url = database.to_string();
        db::create_database(&database_url, &name).await;
        TestEnv {
            name,
            amqp_url: amqp.to_string(),
            database_url,
        }
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        let name = self.name.clone();
        let database_url = self.database_url.clone();
        // Drop cannot await: clean up on a thread with a runtime of its own.
        let _ = std::thread::spawn(move || {
            let _ = Command::new("rabbitmqctl")
                .args(["delete_vhost", &name])
                .output();
            if let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                let _ = runtime.block_on(db::drop_database(&database_url, &name));
            }
        })
        .join();
    }
}

/// A free TCP port on localhost (bound and released; good enough for a test).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// The daemon under test, its services and its Twilio stub.
pub struct App {
    pub env: TestEnv,
    pub stub: TwilioStub,
    pub db: Db,
    pub http_url: String,
    /// Between the daemon and RabbitMQ, when asked for.
    pub amqp_proxy: Option<proxy::Proxy>,
    /// Between the daemon and PostgreSQL, when asked for.
    pub db_proxy: Option<proxy::Proxy>,
    publisher: Channel,
    _connection: Connection,
    shutdown: CancellationToken,
    daemon: Option<JoinHandle<Result<(), DaemonError>>>,
}

/// Posts a Twilio webhook to the daemon at `http_url`, as [`App::post_twilio`] does; an
/// error when the daemon cannot be reached.
pub async fn post_twilio_to(
    http_url: &str,
    public_url: &str,
    path: &str,
    params: &[(&str, &str)],
    signature: Option<&str>,
) -> reqwest::Result<reqwest::Response> {
    let pairs: Vec<(String, String)> = params
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let signed = smsgw::provider::twilio::callbacks::signature(
        twilio_stub::AUTH_TOKEN,
        &format!("{public_url}{path}"),
        &pairs,
    );
    let mut request = reqwest::Client::new()
        .post(format!("{http_url}{path}"))
        .form(&pairs);
    match signature {
        None => request = request.header("X-Twilio-Signature", signed),
        Some("") => {}
        Some(other) => request = request.header("X-Twilio-Signature", other),
    }
    request.send().await
}

/// The settings every test starts from: Twilio at the stub, short retry tiers.
pub fn base_settings(env: &TestEnv, stub: &TwilioStub, http_port: u16) -> HashMap<String, String> {
    [
        ("SMSGW_ENV", "development"),
        ("SMSGW_AMQP_URL", env.amqp_url.as_str()),
        ("SMSGW_DATABASE_URL", env.database_url.as_str()),
        ("SMSGW_PROVIDER", "twilio"),
        ("TWILIO_ACCOUNT_SID", twilio_stub::ACCOUNT_SID),
        ("TWILIO_AUTH_TOKEN", twilio_stub::AUTH_TOKEN),
        ("TWILIO_FROM", twilio_stub::DEFAULT_FROM),
        ("SMSGW_TWILIO_BASE_URL", stub.url.as_str()),
        ("SMSGW_RETRY_DELAYS", "100ms,200ms,400ms"),
        ("SMSGW_PROVIDER_TIMEOUT", "2s"),
        ("SMSGW_SHUTDOWN_GRACE", "5s"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .chain([(
        "SMSGW_HTTP_ADDR".to_owned(),
        format!("127.0.0.1:{http_port}"),
    )])
    .collect()
}

pub fn init_logs() {
    smsgw::install_crypto_provider();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            std::env::var("RUST_LOG").unwrap_or_else(|_| "smsgw=debug,warn".to_owned()),
        )
        .with_test_writer()
        .try_init();
}

/// The `smsgw` binary with a clean environment: only `vars` (and `PATH`).
pub fn smsgw_command(vars: &[(String, String)], args: &[&str]) -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_smsgw"));
    command.env_clear().args(args);
    if let Ok(path) = std::env::var("PATH") {
        command.env("PATH", path);
    }
    for (k, v) in vars {
        command.env(k, v);
    }
    command
}

/// Appends a row to the fault report that `make test` prints at the end.
pub fn report(
    scenario: &str,
    jobs: usize,
    faults: &str,
    lost: usize,
    duplicates: usize,
    took: Duration,
) {
    use std::io::Write;
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("fault-report.md");
    if let Ok(mut file) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = writeln!(
            file,
            "| {scenario} | {jobs} | {faults} | {lost} | {duplicates} | {:.1} s |",
            took.as_secs_f64()
        );
    }
    println!(
        "{scenario}: {jobs} jobs, faults: {faults}, lost {lost}, duplicates {duplicates}, {took:.1?}"
    );
}

/// Starts the daemon with the base settings.
pub async fn spawn_app() -> App {
    spawn_app_with(&[]).await
}

/// Starts the daemon with the base settings changed by `overrides` (an empty value unsets).
pub async fn spawn_app_with(overrides: &[(&str, &str)]) -> App {
    spawn_app_behind_proxies(overrides, false, false).await
}

fn socket_of(url: &str) -> std::net::SocketAddr {
    let parsed = reqwest::Url::parse(url).expect("a URL");
    let host = parsed.host_str().unwrap_or("127.0.0.1");
    let port = parsed.port().unwrap_or(if parsed.scheme() == "amqp" {
        5672
    } else {
        5432
    });
    std::net::ToSocketAddrs::to_socket_addrs(&(host, port))
        .ok()
        .and_then(|mut addrs| addrs.next())
        .expect("resolvable service address")
}

/// Starts the daemon with its broker and/or database connections through proxies the
/// test controls (the test's own connections go direct).
pub async fn spawn_app_behind_proxies(overrides: &[(&str, &str)], amqp: bool, db: bool) -> App {
    init_logs();
    let env = TestEnv::new().await;
    let stub = TwilioStub::start().await;
    let port = free_port();
    let mut vars = base_settings(&env, &stub, port);
    let amqp_proxy = if amqp {
        let proxy = proxy::Proxy::start(socket_of(&env.amqp_url)).await;
        // A short heartbeat, so that a stalled connection is noticed in seconds.
        let url = format!("{}?heartbeat=2", proxy.url_for(&env.amqp_url));
        vars.insert("SMSGW_AMQP_URL".into(), url);
        Some(proxy)
    } else {
        None
    };
    let db_proxy = if db {
        let proxy = proxy::Proxy::start(socket_of(&env.database_url)).await;
        vars.insert(
            "SMSGW_DATABASE_URL".into(),
            proxy.url_for(&env.database_url),
        );
        Some(proxy)
    } else {
        None
    };
    for (k, v) in overrides {
        vars.insert((*k).to_owned(), (*v).to_owned());
    }
    let settings = Settings::from_lookup(|k| vars.get(k).cloned()).expect("valid test settings");
    // As ops do before a rollout (development would migrate by itself).
    migrate(&env.database_url).await;
    let shutdown = CancellationToken::new();
    let daemon = tokio::spawn(smsgw::daemon::run(settings, shutdown.clone()));
    let http_url = format!("http://127.0.0.1:{port}");
    wait_until_ready(&http_url, &daemon).await;

    let db = Db::connect(&env.database_url).await;
    let connection = Connection::connect(&env.amqp_url, ConnectionProperties::default())
        .await
        .expect("connect to the test vhost");
    let publisher = connection.create_channel().await.expect("channel");
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    App {
        env,
        stub,
        db,
        http_url,
        amqp_proxy,
        db_proxy,
        publisher,
        _connection: connection,
        shutdown,
        daemon: Some(daemon),
    }
}

pub async fn migrate(database_url: &str) {
    let store = smsgw::store::Store::connect(database_url, 1)
        .await
        .expect("connect to migrate");
    store.migrate().await.expect("migrate the test database");
    store.close().await;
}

/// Waits until `/readyz` at `http_url` answers 200.
pub async fn wait_until_ready_url(http_url: &str) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Ok(response) = reqwest::get(format!("{http_url}/readyz")).await
            && response.status().is_success()
        {
            return;
        }
        assert!(Instant::now() < deadline, "never ready again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An `App` for a daemon the test runs itself (as a process): the test's connections to
/// this env's broker and database, and the stub.
pub async fn attach(env: TestEnv, stub: TwilioStub) -> App {
    let db = Db::connect(&env.database_url).await;
    let connection = Connection::connect(&env.amqp_url, ConnectionProperties::default())
        .await
        .expect("connect to the test vhost");
    let publisher = connection.create_channel().await.expect("channel");
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    App {
        env,
        stub,
        db,
        http_url: String::new(),
        amqp_proxy: None,
        db_proxy: None,
        publisher,
        _connection: connection,
        shutdown: CancellationToken::new(),
        daemon: None,
    }
}

pub async fn wait_until_ready(http_url: &str, daemon: &JoinHandle<Result<(), DaemonError>>) {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + PATIENCE;
    loop {
        assert!(
            !daemon.is_finished(),
            "the daemon stopped before it was ready"
        );
        if let Ok(response) = client.get(format!("{http_url}/readyz")).send().await
            && response.status().is_success()
        {
            return;
        }
        assert!(Instant::now() < deadline, "the daemon never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A message row as support reads it.
#[derive(Debug, Clone)]
pub struct MessageRow {
    pub status: String,
    pub reason: Option<String>,
    pub recipient: String,
    pub provider_message_id: Option<String>,
    pub attempts: i32,
    pub bulk_id: Option<Uuid>,
    pub context: Option<Value>,
}

impl From<&Row> for MessageRow {
    fn from(row: &Row) -> Self {
        MessageRow {
            status: row.get("status"),
            reason: row.get("reason"),
            recipient: row.get("recipient"),
            provider_message_id: row.get("provider_message_id"),
            attempts: row.get("attempts"),
            bulk_id: row.get("bulk_id"),
            context: row.get("context"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct AttemptRow {
    pub attempt: i32,
    pub outcome: Option<String>,
    pub http_status: Option<i32>,
    pub error_code: Option<String>,
    pub error_message: Option<String>,
    pub duration_ms: Option<i32>,
}

impl From<&Row> for AttemptRow {
    fn from(row: &Row) -> Self {
        AttemptRow {
            attempt: row.get("attempt"),
            outcome: row.get("outcome"),
            http_status: row.get("http_status"),
            error_code: row.get("error_code"),
            error_message: row.get("error_message"),
            duration_ms: row.get("duration_ms"),
        }
    }
}

/// A message read back from `sms.dead`.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub body: Vec<u8>,
    pub reason: Option<String>,
    pub error: Option<String>,
    pub attempts: Option<i64>,
    pub message_id: Option<String>,
}

fn header_text(headers: &FieldTable, key: &str) -> Option<String> {
    match headers.inner().get(key)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

fn header_int(headers: &FieldTable, key: &str) -> Option<i64> {
    match headers.inner().get(key)? {
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::LongInt(n) => Some(i64::from(*n)),
        _ => None,
    }
}

/// A valid job for `school_id` to `to`, of `kind`.
pub fn job(kind: &str, school_id: i64, to: &str, body: &str) -> Value {
    serde_json::json!({
        "id": Uuid::new_v4(),
        "type": kind,
        "school_id": school_id,
        "to": to,
        "body": body,
    })
}

pub fn id_of(job: &Value) -> Uuid {
    job["id"]
        .as_str()
        .and_then(|s| Uuid::parse_str(s).ok())
        .expect("job has an id")
}

/// Publishes `jobs` on `channel` (in confirm mode) as the web app does: to `sms.jobs`,
/// routing key = type, pipelined; waits for every confirm.
pub async fn publish_jobs(channel: &Channel, jobs: &[Value]) {
    for chunk in jobs.chunks(5_000) {
        let mut confirms = Vec::with_capacity(chunk.len());
        for job in chunk {
            let kind = job["type"].as_str().unwrap_or("unknown").to_owned();
            let confirm = channel
                .basic_publish(
                    "sms.jobs".into(),
                    kind.as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    job.to_string().as_bytes(),
                    BasicProperties::default()
                        .with_content_type("application/json".into())
                        .with_delivery_mode(2)
                        .with_message_id(job["id"].as_str().unwrap_or_default().into()),
                )
                .await
                .expect("publish");
            confirms.push(confirm);
        }
        for confirm in confirms {
            let confirmation = confirm.await.expect("confirm");
            assert!(confirmation.is_ack() && confirmation.take_message().is_none());
        }
    }
}

/// Variables for [`smsgw_command`].
pub fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

impl App {
    /// Adds a school that sends everything, with `country`.
    pub async fn add_school(&self, school_id: i64, country: &str) {
        self.db
            .execute(
                "INSERT INTO sms_school_settings (school_id, sms_enabled, country) VALUES ($1, true, $2)",
                &[&school_id, &country],
            )
            .await;
    }

    /// Runs the binary against this app's broker and database (no provider settings).
    pub fn run_cli(&self, args: &[&str]) -> std::process::Output {
        let vars = [
            ("SMSGW_AMQP_URL".to_owned(), self.env.amqp_url.clone()),
            (
                "SMSGW_DATABASE_URL".to_owned(),
                self.env.database_url.clone(),
            ),
            (
                "SMSGW_RETRY_DELAYS".to_owned(),
                "100ms,200ms,400ms".to_owned(),
            ),
        ];
        smsgw_command(&vars, args).output().expect("run smsgw")
    }

    pub async fn sql(&self, statement: &str) {
        self.db.execute(statement, &[]).await;
    }

    /// Publishes a job as the web app does: to `sms.jobs`, routing key = its type.
    pub async fn publish(&self, job: &Value) {
        let kind = job["type"].as_str().unwrap_or("unknown").to_owned();
        let id = job["id"].as_str().unwrap_or_default().to_owned();
        self.publish_raw(&kind, &id, job.to_string().as_bytes())
            .await;
    }

    pub async fn publish_raw(&self, routing_key: &str, message_id: &str, body: &[u8]) {
        self.publish_with_headers(routing_key, message_id, body, FieldTable::default())
            .await;
    }

    /// Publishes to `sms.jobs` as `publish_raw` does, with these AMQP headers.
    pub async fn publish_with_headers(
        &self,
        routing_key: &str,
        message_id: &str,
        body: &[u8],
        headers: FieldTable,
    ) {
        let confirmation = self
            .publisher
            .basic_publish(
                "sms.jobs".into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                body,
                BasicProperties::default()
                    .with_content_type("application/json".into())
                    .with_delivery_mode(2)
                    .with_message_id(message_id.into())
                    .with_headers(headers),
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
        assert!(confirmation.is_ack(), "the broker refused the job");
        assert!(
            confirmation.take_message().is_none(),
            "the job was unroutable"
        );
    }

    pub async fn message(&self, id: Uuid) -> Option<MessageRow> {
        self.db
            .rows(
                "SELECT status, reason, recipient, provider_message_id, attempts, bulk_id, context
                 FROM sms_messages WHERE id = $1",
                &[&id],
            )
            .await
            .first()
            .map(MessageRow::from)
    }

    pub async fn attempts(&self, id: Uuid) -> Vec<AttemptRow> {
        self.db
            .rows(
                "SELECT attempt, outcome, http_status, error_code, error_message, duration_ms
                 FROM sms_attempts WHERE message_id = $1 ORDER BY attempt",
                &[&id],
            )
            .await
            .iter()
            .map(AttemptRow::from)
            .collect()
    }

    /// Waits until message `id` has `status`, and returns its row.
    pub async fn wait_for_status(&self, id: Uuid, status: &str) -> MessageRow {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let row = self.message(id).await;
            if let Some(row) = &row
                && row.status == status
            {
                return row.clone();
            }
            assert!(
                Instant::now() < deadline,
                "message {id} never reached '{status}'; last seen: {row:?}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Waits until `sms.dead` holds `count` messages, takes them (acked) and returns them.
    pub async fn dead_letters(&self, count: usize) -> Vec<DeadLetter> {
        let deadline = Instant::now() + PATIENCE;
        let mut letters = Vec::new();
        while letters.len() < count {
            let got = self
                .publisher
                .basic_get("sms.dead".into(), BasicGetOptions::default())
                .await
                .expect("basic.get sms.dead");
            match got {
                Some(message) => {
                    let delivery = message.delivery;
                    let headers = delivery.properties.headers().clone().unwrap_or_default();
                    letters.push(DeadLetter {
                        body: delivery.data.clone(),
                        reason: header_text(&headers, "x-smsgw-reason"),
                        error: header_text(&headers, "x-smsgw-error"),
                        attempts: header_int(&headers, "x-smsgw-attempts"),
                        message_id: delivery
                            .properties
                            .message_id()
                            .as_ref()
                            .map(|m| m.as_str().to_owned()),
                    });
                    delivery
                        .ack(BasicAckOptions::default())
                        .await
                        .expect("ack dead letter");
                }
                None => {
                    assert!(
                        Instant::now() < deadline,
                        "expected {count} dead letters, found {}: {letters:#?}",
                        letters.len()
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        letters
    }

    /// Takes the head of `queue` and gives it back as failed (a reject, as the daemon gives
    /// back a message that crashed it), until the broker stops delivering it; returns how
    /// many times it was delivered.
    pub async fn redeliver_until_gone(&self, queue: &str) -> usize {
        let mut deliveries = 0;
        let deadline = Instant::now() + PATIENCE;
        while Instant::now() < deadline {
            let got = self
                .publisher
                .basic_get(queue.into(), BasicGetOptions::default())
                .await
                .expect("basic.get");
            match got {
                Some(message) => {
                    deliveries += 1;
                    message
                        .delivery
                        .reject(lapin::options::BasicRejectOptions { requeue: true })
                        .await
                        .expect("reject");
                }
                None if deliveries > 0 => return deliveries,
                None => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
        panic!("{queue} kept delivering the message");
    }

    pub async fn delete_queue(&self, queue: &str) {
        self.publisher
            .queue_delete(queue.into(), lapin::options::QueueDeleteOptions::default())
            .await
            .expect("delete queue");
    }

    /// Whether `queue` exists (checked on a channel of its own: a failed passive declare
    /// closes the channel).
    pub async fn queue_exists(&self, queue: &str) -> bool {
        let channel = self._connection.create_channel().await.expect("channel");
        let exists = channel
            .queue_declare(
                queue.into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .is_ok();
        let _ = channel.close(200, "done".into()).await;
        exists
    }

    /// How many messages wait in `queue` right now.
    pub async fn queue_depth(&self, queue: &str) -> u32 {
        self.publisher
            .queue_declare(
                queue.into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("passive declare")
            .message_count()
    }

    /// Posts a Twilio webhook to `path`, signed for `SMSGW_PUBLIC_URL` = `public_url`
    /// (`signature`: `None` signs correctly, `Some` sends that value instead).
    pub async fn post_twilio(
        &self,
        public_url: &str,
        path: &str,
        params: &[(&str, &str)],
        signature: Option<&str>,
    ) -> reqwest::Response {
        post_twilio_to(&self.http_url, public_url, path, params, signature)
            .await
            .expect("post webhook")
    }

    /// An inbound text from `from` to the Twilio stub's number, signed as Twilio signs it,
    /// with Twilio's id `sid`.
    pub async fn post_twilio_inbound(
        &self,
        public_url: &str,
        from: &str,
        body: &str,
        sid: &str,
    ) -> reqwest::Response {
        self.post_twilio(
            public_url,
            "/webhooks/twilio/inbound",
            &[
                ("AccountSid", twilio_stub::ACCOUNT_SID),
                ("From", from),
                ("To", twilio_stub::DEFAULT_FROM),
                ("Body", body),
                ("MessageSid", sid),
            ],
            None,
        )
        .await
    }

    /// `/metrics`, as Prometheus text.
    pub async fn metrics(&self) -> String {
        reqwest::get(format!("{}/metrics", self.http_url))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics text")
    }

    /// `/readyz` as JSON.
    pub async fn readiness(&self) -> Value {
        match reqwest::get(format!("{}/readyz", self.http_url)).await {
            Ok(response) => response.json().await.unwrap_or(Value::Null),
            Err(_) => Value::Null,
        }
    }

    /// Waits until every job in `ids` reached `status`; returns how many never did.
    /// Every call the stub took has its attempt row: nothing was sent unrecorded.
    pub async fn assert_every_call_recorded(&self) {
        let attempts: i64 = self
            .db
            .scalar("SELECT count(*) FROM sms_attempts", &[])
            .await;
        assert_eq!(
            attempts as usize,
            self.stub.requests().len(),
            "no call without its record"
        );
    }

    pub async fn wait_all(&self, ids: &[Uuid], status: &str, patience: Duration) -> usize {
        let deadline = Instant::now() + patience;
        loop {
            let done: i64 = self
                .db
                .scalar(
                    "SELECT count(*) FROM sms_messages WHERE id = ANY($1) AND status = $2",
                    &[&ids, &status],
                )
                .await;
            let missing = ids.len() - done as usize;
            if missing == 0 || Instant::now() > deadline {
                return missing;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Publishes jobs as the web app does, pipelined, and waits for every confirm.
    pub async fn publish_all(&self, jobs: &[Value]) {
        publish_jobs(&self.publisher, jobs).await;
    }

    /// Publishes `count` distinct jobs of `kind` (each to its own number) and returns ids.
    pub async fn publish_many(&self, count: usize, kind: &str, school: i64) -> Vec<Uuid> {
        static NEXT_NUMBER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let first = NEXT_NUMBER.fetch_add(count, std::sync::atomic::Ordering::SeqCst);
        let jobs: Vec<Value> = (0..count)
            .map(|i| {
                job(
                    kind,
                    school,
                    &format!("+447{:09}", 700_000_000 + first + i),
                    "Your lesson",
                )
            })
            .collect();
        publish_jobs(&self.publisher, &jobs).await;
        jobs.iter().map(id_of).collect()
    }

    /// Stops the daemon as SIGTERM would and returns how it ended.
    pub async fn stop(&mut self) -> Result<(), DaemonError> {
        self.shutdown.cancel();
        match self.daemon.take() {
            Some(handle) => handle.await.expect("the daemon task did not panic"),
            None => Ok(()),
        }
    }
}

impl Drop for App {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The most of `times` that fall into any one-second window.
pub fn busiest_second(times: Vec<Instant>) -> usize {
    busiest_window(times, Duration::from_secs(1))
}

/// The most of `times` that fall into any one window of length `window`.
pub fn busiest_window(mut times: Vec<Instant>, window: Duration) -> usize {
    times.sort();
    let mut busiest = 0;
    let mut start = 0;
    for end in 0..times.len() {
        while times[end].duration_since(times[start]) >= window {
            start += 1;
        }
        busiest = busiest.max(end - start + 1);
    }
    busiest
}

/// A `[providers.NAME]` block of an `SMSGW_CONFIG` file: Twilio at `stub`, its token from
/// `TEST_TWILIO_TOKEN`, then any `extra` lines.
pub fn twilio_provider_toml(name: &str, from: &str, stub: &TwilioStub, extra: &str) -> String {
    format!(
        r#"
[providers.{name}]
type = "twilio"
account_sid = "{sid}"
auth_token = {{ env = "TEST_TWILIO_TOKEN" }}
from = "{from}"
base_url = "{url}"
{extra}
"#,
        sid = twilio_stub::ACCOUNT_SID,
        url = stub.url,
    )
}

/// Writes an `SMSGW_CONFIG` file with `default_provider` and the given blocks; its path.
pub fn write_config(default: &str, providers: &[String]) -> String {
    let path = std::env::temp_dir().join(format!("smsgw-{}.toml", Uuid::new_v4().simple()));
    let text = format!("default_provider = \"{default}\"\n{}", providers.concat());
    std::fs::write(&path, text).expect("write config");
    path.to_string_lossy().into_owned()
}
