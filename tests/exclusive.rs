//! Faults that restart or stop the shared services themselves. They would break every
//! other test running at that moment, so `make test` runs this binary alone, one test at a
//! time, after the parallel suite. Each test restores its service and waits until it is
//! healthy again before it ends, even when it fails (a guard does it on drop).

mod helpers;

use std::{
    process::Command,
    time::{Duration, Instant},
};

use helpers::{
    Reply,
    events::{EventTap, assert_events_match_log},
    spawn_app, spawn_app_with,
};

const SCHOOL: i64 = 42;

fn run(program: &str, args: &[&str]) -> String {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} {args:?}: {e}"));
    assert!(
        output.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn postgres_cluster() -> String {
    let mut versions: Vec<String> = std::fs::read_dir("/etc/postgresql")
        .expect("a Debian PostgreSQL cluster")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    versions.sort();
    versions.pop().expect("a cluster version")
}

fn port_open(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(500),
    )
    .is_ok()
}

/// Brings RabbitMQ back (and waits for it) however the test ends.
struct RabbitGuard;

impl Drop for RabbitGuard {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl").arg("start_app").output();
        let _ = Command::new("rabbitmqctl")
            .args(["await_startup", "--timeout", "120"])
            .output();
        let _ = Command::new("rabbitmqctl")
            .args(["set_vm_memory_high_watermark", "0.4"])
            .output();
    }
}

/// Brings PostgreSQL back (and waits for it) however the test ends.
struct PostgresGuard;

impl Drop for PostgresGuard {
    fn drop(&mut self) {
        let cluster = postgres_cluster();
        let _ = Command::new("pg_ctlcluster")
            .args(["--skip-systemctl-redirect", &cluster, "main", "start"])
            .output();
        let deadline = Instant::now() + Duration::from_secs(60);
        while !port_open(5432) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn rabbitmq_restarted_mid_run_the_daemon_recovers_by_itself() {
    let app = spawn_app().await;
    app.add_school(SCHOOL, "GB").await;
    app.stub.reply_always(Reply::Slow(Duration::from_millis(2)));
    let mut tap = EventTap::bind(&app.env.amqp_url, "#").await;
    let jobs = 2_000;
    let started = Instant::now();
    let ids = app.publish_many(jobs, "booking_reminder", SCHOOL).await;
    while app.stub.requests().len() < 200 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let guard = RabbitGuard;
    run("rabbitmqctl", &["stop_app"]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_ne!(
        app.readiness().await["ready"],
        true,
        "not ready without a broker"
    );
    drop(guard);

    let lost = app.wait_all(&ids, "sent", Duration::from_secs(180)).await;
    let duplicates = app.stub.texted_twice().len();
    helpers::report(
        "RabbitMQ restarted (stop_app/start_app)",
        jobs,
        "1 restart",
        lost,
        duplicates,
        started.elapsed(),
    );
    assert_eq!((lost, duplicates), (0, 0));
    helpers::wait_until_ready_url(&app.http_url).await;
    tap.drain(&app.db, Duration::from_secs(60)).await;
    assert_events_match_log(&tap, &app.db).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_stopped_for_10_s_nothing_is_lost_or_sent_unrecorded() {
    let app = spawn_app().await;
    app.add_school(SCHOOL, "GB").await;
    app.stub.reply_always(Reply::Slow(Duration::from_millis(5)));
    let mut tap = EventTap::bind(&app.env.amqp_url, "#").await;
    let jobs = 1_000;
    let started = Instant::now();
    let ids = app.publish_many(jobs, "booking_reminder", SCHOOL).await;
    while app.stub.requests().len() < 100 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let guard = PostgresGuard;
    run(
        "pg_ctlcluster",
        &[
            "--skip-systemctl-redirect",
            &postgres_cluster(),
            "main",
            "stop",
            "-m",
            "fast",
        ],
    );
    let calls_at_stop = app.stub.requests().len();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(app.readiness().await["database"], false);
    tokio::time::sleep(Duration::from_secs(7)).await;
    let calls_during = app.stub.requests().len() - calls_at_stop;
    drop(guard);

    let lost = app.wait_all(&ids, "sent", Duration::from_secs(180)).await;
    let duplicates = app.stub.texted_twice().len();
    helpers::report(
        "PostgreSQL stopped for 10 s",
        jobs,
        "1 stop",
        lost,
        duplicates,
        started.elapsed(),
    );
    assert_eq!((lost, duplicates), (0, 0));
    app.assert_every_call_recorded().await;
    assert!(
        calls_during <= 200,
        "{calls_during} calls while the database was down"
    );
    tap.drain(&app.db, Duration::from_secs(60)).await;
    assert_events_match_log(&tap, &app.db).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broker_memory_alarm_makes_the_daemon_not_ready_until_it_clears() {
    let app = spawn_app_with(&[]).await;
    app.add_school(SCHOOL, "GB").await;
    // The broker blocks a connection when it publishes: give the daemon a retry to publish
    // (the provider answers only after the alarm is on).
    app.stub.script([Reply::Hang(Duration::from_secs(3))]);
    let job = helpers::job("login_code", SCHOOL, "+447700900123", "Code 1234");
    app.publish(&job).await;
    let guard = RabbitGuard;
    run(
        "rabbitmqctl",
        &["set_vm_memory_high_watermark", "0.0000001"],
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while app.readiness().await["broker_blocked"] != true {
        assert!(
            Instant::now() < deadline,
            "the alarm was never reported: {}",
            app.readiness().await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(app.readiness().await["ready"], false);
    drop(guard);
    helpers::wait_until_ready_url(&app.http_url).await;
    assert_eq!(app.readiness().await["broker_blocked"], false);
    app.wait_for_status(helpers::id_of(&job), "sent").await;
}
