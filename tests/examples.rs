//! The examples in `examples/` (a publisher and an event consumer in Python, Node and
//! Ruby, as the web app's developers write them) run here against the real daemon, so
//! that they never rot: each language's publisher sends a login code that is delivered,
//! and its consumer hears it, a rejected job and a reply, once each, ignoring a copy and
//! an older status. A language whose runtime or client library is missing is skipped,
//! saying so; under CI (`CI=true`) that fails instead, since `.ci/run` installs them.

mod helpers;

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use lapin::{
    BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind,
    options::{
        BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
        QueueBindOptions, QueueDeclareOptions,
    },
    types::{AMQPValue, FieldTable},
};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
    task::JoinHandle,
};
use uuid::Uuid;

use helpers::{
    App, PATIENCE, TestEnv,
    events::{Event, EventTap},
    spawn_app_with,
};

const SCHOOL: i64 = 42;
const STUDENT: &str = "+447700900123";

/// One language's examples: `examples/<dir>/publish.<ext>` and `consume.<ext>`, run by
/// `program`, which can run them when `probe` succeeds in that folder.
struct Lang {
    dir: &'static str,
    ext: &'static str,
    program: &'static str,
    probe: [&'static str; 2],
    install: &'static str,
}

const PYTHON: Lang = Lang {
    dir: "python",
    ext: "py",
    program: "python3",
    probe: ["-c", "import pika"],
    install: "apt-get install -y python3-pika",
};
const NODE: Lang = Lang {
    dir: "node",
    ext: "js",
    program: "node",
    probe: ["-e", "require('amqplib')"],
    install: "apt-get install -y nodejs npm; npm ci in examples/node",
};
const RUBY: Lang = Lang {
    dir: "ruby",
    ext: "rb",
    program: "ruby",
    probe: ["-e", "require 'bunny'"],
    install: "apt-get install -y ruby-bunny",
};

impl Lang {
    fn folder(&self) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("examples")
            .join(self.dir)
    }

    /// The first `program` on `PATH` that passes the probe (a Python from pyenv may come
    /// before Debian's, which has python3-pika); `None`, said on stderr, when there is
    /// none, and a failure under CI.
    fn runtime(&self) -> Option<PathBuf> {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let found = std::env::split_paths(&path)
            .map(|dir| dir.join(self.program))
            .filter(|candidate| candidate.is_file())
            .find(|candidate| {
                std::process::Command::new(candidate)
                    .args(self.probe)
                    .current_dir(self.folder())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|status| status.success())
            });
        if found.is_none() {
            let missing = format!("{} with its AMQP client ({})", self.program, self.install);
            assert_ne!(
                std::env::var("CI").as_deref(),
                Ok("true"),
                "CI must run the {} examples: {missing}",
                self.dir
            );
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED the {} examples: no {missing}",
                self.dir
            );
        }
        found
    }

    fn command(&self, runtime: &Path, script: &str, amqp_url: &str) -> Command {
        let mut command = Command::new(runtime);
        command
            .arg(format!("{script}.{}", self.ext))
            .current_dir(self.folder())
            .env("AMQP_URL", amqp_url)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        command
    }

    /// Runs the publisher with `args`: its exit code, stdout and stderr.
    async fn publish(
        &self,
        runtime: &Path,
        amqp_url: &str,
        args: &[&str],
    ) -> (i32, String, String) {
        let run = self
            .command(runtime, "publish", amqp_url)
            .args(args)
            .output();
        let output = tokio::time::timeout(PATIENCE, run)
            .await
            .expect("the publisher ends in time")
            .expect("the publisher runs");
        let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).trim().to_owned();
        (
            output.status.code().unwrap_or(-1),
            text(&output.stdout),
            text(&output.stderr),
        )
    }
}

/// The example consumer, running: the lines it printed so far, and its stderr.
struct Consumer {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
    readers: [JoinHandle<()>; 2],
}

impl Consumer {
    /// Starts it on queue `queue` until `count` events, and waits until it is bound.
    async fn start(lang: &Lang, runtime: &Path, app: &App, queue: &str, count: usize) -> Self {
        let mut child = lang
            .command(runtime, "consume", &app.env.amqp_url)
            .env("QUEUE", queue)
            .args(["--max-events", &count.to_string(), "--timeout", "60"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the consumer starts");
        let (lines, out) = collect(child.stdout.take().expect("stdout"));
        let (stderr, err) = collect(child.stderr.take().expect("stderr"));
        let consumer = Consumer {
            child,
            lines,
            stderr,
            readers: [out, err],
        };
        let listening = format!("listening on {queue}");
        consumer
            .wait(|| consumer.stderr.lock().expect("lock").contains(&listening))
            .await;
        consumer
    }

    async fn wait(&self, done: impl Fn() -> bool) {
        let deadline = Instant::now() + PATIENCE;
        while !done() {
            assert!(
                Instant::now() < deadline,
                "the consumer printed {:?}; stderr: {:?}",
                self.lines.lock().expect("lock"),
                self.stderr.lock().expect("lock")
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn wait_for_lines(&self, count: usize) {
        self.wait(|| self.lines.lock().expect("lock").len() >= count)
            .await;
    }

    /// Waits for it to exit by itself (0); the lines it printed.
    async fn finish(mut self) -> Vec<String> {
        let status = tokio::time::timeout(PATIENCE, self.child.wait())
            .await
            .expect("the consumer stops after its events")
            .expect("wait");
        for reader in self.readers {
            reader.await.expect("read to the end");
        }
        let stderr = self.stderr.lock().expect("lock").clone();
        assert!(status.success(), "{status}; stderr: {stderr:?}");
        self.lines.lock().expect("lock").clone()
    }
}

/// The lines of `stream`, as they come, and the task reading it to its end.
fn collect(
    stream: impl tokio::io::AsyncRead + Unpin + Send + 'static,
) -> (Arc<Mutex<Vec<String>>>, JoinHandle<()>) {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = lines.clone();
    let reader = tokio::spawn(async move {
        let mut reader = BufReader::new(stream).lines();
        while let Ok(Some(line)) = reader.next_line().await {
            sink.lock().expect("lock").push(line);
        }
    });
    (lines, reader)
}

/// A channel in confirm mode on `amqp_url` (its connection lives as long as the channel's).
async fn channel(amqp_url: &str) -> (Connection, Channel) {
    let connection = Connection::connect(amqp_url, ConnectionProperties::default())
        .await
        .expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    (connection, channel)
}

/// Publishes `body` to `exchange` and waits for the broker's ack.
async fn publish_to(channel: &Channel, exchange: &str, key: &str, body: &Value) {
    let confirmation = channel
        .basic_publish(
            exchange.into(),
            key.into(),
            BasicPublishOptions::default(),
            body.to_string().as_bytes(),
            BasicProperties::default().with_content_type("application/json".into()),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    assert!(confirmation.is_ack());
}

/// Declares `queue` and binds it to `exchange` with `key`.
async fn bind(channel: &Channel, queue: &str, exchange: &str, key: &str, args: FieldTable) {
    channel
        .queue_declare(queue.into(), QueueDeclareOptions::default(), args)
        .await
        .expect("declare a queue");
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind");
}

/// Checks the job the publisher left in `spy` (bound to `sms.jobs` with `#`): published as
/// the interface asks, with a timestamp of now.
async fn assert_published_as_the_interface_asks(channel: &Channel, spy: &str, id: Uuid) {
    let message = channel
        .basic_get(spy.into(), BasicGetOptions { no_ack: true })
        .await
        .expect("basic.get")
        .expect("the spy queue has the job");
    let delivery = message.delivery;
    let properties = &delivery.properties;
    assert_eq!(delivery.routing_key.as_str(), "login_code");
    assert_eq!(
        properties.content_type().as_ref().map(|c| c.as_str()),
        Some("application/json")
    );
    assert_eq!(*properties.delivery_mode(), Some(2), "persistent");
    let message_id = properties.message_id().as_ref().map(|m| m.to_string());
    assert_eq!(message_id, Some(id.to_string()));
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let stamp = properties.timestamp().map_or(0, |t| t as i64);
    assert!((now - stamp).abs() < 120, "timestamp {stamp}, now {now}");
    let job: Value = serde_json::from_slice(&delivery.data).expect("JSON");
    assert_eq!(job["school_id"], SCHOOL, "a number, not a string: {job}");
    assert_eq!(job["context"], json!({"booking_id": 981}));
}

/// The publisher's arguments: a login code, with a context.
#[rustfmt::skip]
const LOGIN_CODE: [&str; 10] = [
    "--school", "42", "--to", STUDENT, "--type", "login_code", "--body", "Your code is 4711",
    "--context", r#"{"booking_id": 981}"#,
];

/// Publishes `delivered` again (events come at least once), then an older status of the
/// same message: a consumer handles neither.
async fn send_a_copy_and_older_news(channel: &Channel, delivered: &Event) {
    let (key, body) = (&delivered.routing_key, &delivered.body);
    publish_to(channel, "sms.events", key, body).await;
    let mut older = body.clone();
    older["event_id"] = json!(Uuid::new_v4());
    (older["seq"], older["status"]) = (json!(1), json!("failed"));
    publish_to(channel, "sms.events", "login_code.failed", &older).await;
}

/// A reply from the student, through the inbox's API as its reply box sends it.
async fn post_reply(app: &App, body: &str) {
    let reply = json!({"from": STUDENT, "to": "", "body": body});
    let posted = reqwest::Client::new()
        .post(format!("{}/inbox/api/replies", app.http_url))
        .json(&reply)
        .send()
        .await
        .expect("the inbox answers");
    assert_eq!(posted.status(), 201);
}

/// The whole round: publish, deliver, hear the events; copies and older news ignored.
async fn round_trip(lang: &Lang) {
    let Some(runtime) = lang.runtime() else {
        return;
    };
    let app = spawn_app_with(&[("SMSGW_PROVIDER", "inbox")]).await;
    app.add_school(SCHOOL, "GB").await;
    let (_connection, channel) = channel(&app.env.amqp_url).await;
    let spy = "spy-on-sms.jobs";
    bind(&channel, spy, "sms.jobs", "#", FieldTable::default()).await;
    let mut tap = EventTap::bind(&app.env.amqp_url, "*.delivered").await;
    let queue = format!("webapp-{}", lang.dir);
    let consumer = Consumer::start(lang, &runtime, &app, &queue, 3).await;

    let (code, out, err) = lang.publish(&runtime, &app.env.amqp_url, &LOGIN_CODE).await;
    assert_eq!(code, 0, "{err}");
    let id: Uuid = out.parse().expect("the publisher prints the job's id");
    app.wait_for_status(id, "delivered").await;
    assert_published_as_the_interface_asks(&channel, spy, id).await;

    consumer.wait_for_lines(1).await;
    let delivered = tap.until(|events| !events.is_empty()).await[0].clone();
    send_a_copy_and_older_news(&channel, &delivered).await;

    let rejected = Uuid::new_v4();
    let invalid = json!({"id": rejected, "type": "login_code", "school_id": SCHOOL, "to": STUDENT});
    publish_to(&channel, "sms.jobs", "login_code", &invalid).await;
    consumer.wait_for_lines(2).await;
    post_reply(&app, "Running late").await;

    let lines = consumer.finish().await;
    let seq = delivered.seq();
    let expected = [
        format!("login_code.delivered job={id} message={id} seq={seq} "),
        format!("job.rejected job={rejected} error=body: missing"),
        format!("reply.received job={id} from={STUDENT} body=Running late"),
    ];
    assert_eq!(lines.len(), 3, "{lines:#?}");
    for (line, start) in lines.iter().zip(&expected) {
        assert!(
            line.starts_with(start.as_str()),
            "{line:?} is not {start:?}…"
        );
    }
    assert_eq!(app.queue_depth(&queue).await, 0, "every event acked");
}

/// Without smsgw's exchange, with a job no queue takes, and with one the broker refuses,
/// the publisher fails (exit 1, saying why) and prints no id.
async fn fails_loudly(lang: &Lang) {
    let Some(runtime) = lang.runtime() else {
        return;
    };
    let env = TestEnv::new().await;
    let (_connection, channel) = channel(&env.amqp_url).await;
    let args = [
        "--school",
        "42",
        "--to",
        STUDENT,
        "--type",
        "login_code",
        "--body",
        "Code 1",
    ];
    let (code, out, err) = lang.publish(&runtime, &env.amqp_url, &args).await;
    assert_eq!((code, out.as_str()), (1, ""), "no exchange: {err}");
    assert!(err.contains("no exchange 'sms.jobs'"), "{err}");

    let topic = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    channel
        .exchange_declare(
            "sms.jobs".into(),
            ExchangeKind::Topic,
            topic,
            FieldTable::default(),
        )
        .await
        .expect("declare sms.jobs");
    let (code, out, err) = lang.publish(&runtime, &env.amqp_url, &args).await;
    assert_eq!((code, out.as_str()), (1, ""), "unroutable: {err}");
    assert!(err.contains("returned unroutable"), "{err}");

    // A queue that refuses every message: the broker nacks the job.
    let mut full = FieldTable::default();
    full.insert("x-max-length".into(), AMQPValue::LongInt(0));
    full.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    bind(&channel, "full", "sms.jobs", "#", full).await;
    let (code, out, err) = lang.publish(&runtime, &env.amqp_url, &args).await;
    assert_eq!((code, out.as_str()), (1, ""), "nacked: {err}");
    assert!(err.contains("nack"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn python_publisher_and_consumer_against_the_daemon() {
    round_trip(&PYTHON).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn node_publisher_and_consumer_against_the_daemon() {
    round_trip(&NODE).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn ruby_publisher_and_consumer_against_the_daemon() {
    round_trip(&RUBY).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn python_publisher_fails_loudly_when_the_broker_does_not_take_the_job() {
    fails_loudly(&PYTHON).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn node_publisher_fails_loudly_when_the_broker_does_not_take_the_job() {
    fails_loudly(&NODE).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn ruby_publisher_fails_loudly_when_the_broker_does_not_take_the_job() {
    fails_loudly(&RUBY).await;
}
