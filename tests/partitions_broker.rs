//! The broker link when the network lies: a node that black-holes connections, and a
//! link that goes silent (open, but passing nothing, nobody told) and heals. Each with
//! jobs and status events flowing, against the real RabbitMQ and PostgreSQL.

mod helpers;

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;

use helpers::{
    App, Reply, TestEnv, TwilioStub, attach, base_settings,
    events::{EventTap, assert_events_match_log},
    free_port, id_of, job, migrate,
    proxy::Proxy,
    wait_until_ready,
};
use smsgw::{config::Settings, daemon::DaemonError};

const SCHOOL: i64 = 42;

/// A broker node that takes TCP connections and never says a word: each costs a
/// connection attempt its whole connect timeout.
struct BlackHole {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
}

impl BlackHole {
    async fn start() -> BlackHole {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let accepted = Arc::new(AtomicUsize::new(0));
        let counting = accepted.clone();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                counting.fetch_add(1, Ordering::SeqCst);
                held.push(stream);
            }
        });
        BlackHole { addr, accepted }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// `url` with `addr` in place of its host and port.
fn at(url: &str, addr: SocketAddr) -> String {
    let mut parsed = reqwest::Url::parse(url).expect("a URL");
    parsed.set_ip_host(addr.ip()).expect("host");
    parsed.set_port(Some(addr.port())).expect("port");
    parsed.to_string()
}

fn socket_of(url: &str) -> SocketAddr {
    let parsed = reqwest::Url::parse(url).expect("a URL");
    let host = parsed.host_str().unwrap_or("127.0.0.1");
    let port = parsed.port().unwrap_or(5672);
    std::net::ToSocketAddrs::to_socket_addrs(&(host, port))
        .ok()
        .and_then(|mut addrs| addrs.next())
        .expect("resolvable broker address")
}

/// The daemon, in-process, on `env` with `overrides`: the test holds its stop token.
struct Running {
    app: App,
    stop: CancellationToken,
    daemon: JoinHandle<Result<(), DaemonError>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn run_daemon(env: TestEnv, overrides: &[(&str, String)]) -> Running {
    helpers::init_logs();
    let stub = TwilioStub::start().await;
    let port = free_port();
    let mut vars = base_settings(&env, &stub, port);
    for (k, v) in overrides {
        vars.insert((*k).to_owned(), v.clone());
    }
    let settings = Settings::from_lookup(|k| vars.get(k).cloned()).expect("valid settings");
    migrate(&env.database_url).await;
    let stop = CancellationToken::new();
    let daemon = tokio::spawn(smsgw::daemon::run(settings, stop.clone()));
    let http_url = format!("http://127.0.0.1:{port}");
    wait_until_ready(&http_url, &daemon).await;
    let mut app = attach(env, stub).await;
    app.http_url = http_url;
    app.add_school(SCHOOL, "GB").await;
    Running { app, stop, daemon }
}

/// Publishes one reminder and waits for its `sent` event.
async fn sent_with_its_event(app: &App, tap: &mut EventTap, to: &str) {
    let reminder = job("booking_reminder", SCHOOL, to, "Reminder");
    app.publish(&reminder).await;
    let id = id_of(&reminder);
    tap.until(|events| {
        events
            .iter()
            .any(|e| e.message() == id && e.status() == "sent")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_events_relay_reconnects_past_the_node_it_lost_not_from_the_first() {
    let env = TestEnv::new().await;
    let hole = BlackHole::start().await;
    let second = Proxy::start(socket_of(&env.amqp_url)).await;
    // The first node black-holes; the second is the one the daemon reaches first; the
    // third is the same broker, reached directly.
    let nodes = format!(
        "{},{},{}",
        at(&env.amqp_url, hole.addr),
        second.url_for(&env.amqp_url),
        env.amqp_url
    );
    let tap_url = env.amqp_url.clone();
    let running = run_daemon(
        env,
        &[
            ("SMSGW_AMQP_URL", nodes),
            ("SMSGW_BROKER_CONNECT_TIMEOUT", "1s".to_owned()),
        ],
    )
    .await;
    let app = &running.app;
    let mut tap = EventTap::bind(&tap_url, "#").await;
    sent_with_its_event(app, &mut tap, "+447700900001").await;
    let before = hole.accepted();
    assert!(before >= 1, "the first node was tried at start");

    // The lanes and the relay lose the second node: each must move on to the third.
    second.cut();
    sent_with_its_event(app, &mut tap, "+447700900002").await;
    assert_eq!(
        hole.accepted(),
        before,
        "a reconnect went back to the first node, which it had left behind"
    );
    assert!(!running.daemon.is_finished());
}

/// Waits until `/readyz` says the broker is `connected` (true or false).
async fn until_broker(app: &App, connected: bool, patience: Duration) {
    let deadline = Instant::now() + patience;
    while app.readiness().await["broker"] != connected {
        assert!(
            Instant::now() < deadline,
            "the broker link never became {connected}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The partition's bound: once the link heals, new jobs are sent within this.
const RECOVERY: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread")]
async fn a_silent_broker_link_that_heals_loses_nothing_and_sends_nothing_twice() {
    let started = Instant::now();
    let env = TestEnv::new().await;
    let proxy = Proxy::start(socket_of(&env.amqp_url)).await;
    // A 2 s heartbeat: a silent link is given up after two missed, about 4 s.
    let url = format!("{}?heartbeat=2", proxy.url_for(&env.amqp_url));
    let tap_url = env.amqp_url.clone();
    let running = run_daemon(
        env,
        &[
            ("SMSGW_AMQP_URL", url),
            ("SMSGW_BROKER_CONNECT_TIMEOUT", "2s".to_owned()),
        ],
    )
    .await;
    let app = &running.app;
    let mut tap = EventTap::bind(&tap_url, "#").await;
    app.stub.reply_always(Reply::Slow(Duration::from_millis(5)));
    let mut ids = app.publish_many(200, "booking_reminder", SCHOOL).await;
    while app.stub.requests().len() < 30 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    proxy.silence();
    until_broker(app, false, Duration::from_secs(30)).await;
    // Published meanwhile (the test reaches the broker directly): they wait in the queue.
    ids.extend(app.publish_many(100, "login_code", SCHOOL).await);
    // As a firewall that lost its state heals: the connections opened before, or tried
    // during the silence, stay silent for good; only new ones pass.
    proxy.heal_forgetting();
    let healed = Instant::now();
    let after = app.publish_many(20, "booking_change", SCHOOL).await;
    assert_eq!(app.wait_all(&after, "sent", RECOVERY).await, 0);
    let recovered = healed.elapsed();
    ids.extend(after);

    let lost = app.wait_all(&ids, "sent", Duration::from_secs(30)).await;
    let twice = app.stub.texted_twice();
    tap.drain(&app.db, Duration::from_secs(30)).await;
    assert_events_match_log(&tap, &app.db).await;
    helpers::report(
        "broker link silent, then healed",
        ids.len(),
        "1 silence",
        lost,
        twice.len(),
        started.elapsed(),
    );
    assert_eq!((lost, twice.len()), (0, 0), "texted twice: {twice:?}");
    println!("new jobs flowed again {recovered:?} after the link healed");
    assert!(started.elapsed() < Duration::from_secs(60));
}
