//! Faults smsgw survives, against the real services: the daemon killed mid-work, its broker
//! and database connections cut or stalled (through a proxy each test owns, so the shared
//! services are never touched), a misbehaving provider, and SIGTERM under load.
//!
//! The promise: every job reaches a recorded outcome, and nobody is texted twice; every
//! committed status change has its event, in order per message.
//! Each test adds a row to the fault report (`make test` prints it).

mod helpers;

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use helpers::{
    Reply, TestEnv, TwilioStub, base_settings,
    events::{EventTap, assert_events_match_log},
    free_port,
    process::{Daemon, wait_ready},
    spawn_app, spawn_app_behind_proxies, spawn_app_with, twilio_stub,
};

const SCHOOL: i64 = 42;
const PUBLIC: &str = "https://smsgw.example.com";

/// Posts replies from a student to the daemon on `port`, one after another, each until it
/// is answered 2xx (as a provider retries a webhook), until `stop`; how many were taken.
fn post_replies(port: u16, stop: CancellationToken) -> tokio::task::JoinHandle<usize> {
    tokio::spawn(async move {
        let url = format!("http://127.0.0.1:{port}");
        let mut taken = 0;
        while !stop.is_cancelled() {
            let (sid, body) = (format!("SM{taken:032x}"), format!("reply {taken}"));
            let params = [
                ("AccountSid", twilio_stub::ACCOUNT_SID),
                ("From", "+447700900123"),
                ("To", twilio_stub::DEFAULT_FROM),
                ("Body", body.as_str()),
                ("MessageSid", sid.as_str()),
            ];
            let path = "/webhooks/twilio/inbound";
            while !helpers::post_twilio_to(&url, PUBLIC, path, &params, None)
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            taken += 1;
        }
        taken
    })
}

/// Waits for every id to be sent; returns (lost, duplicates) and prints the duplicates.
async fn tally(app: &helpers::App, ids: &[uuid::Uuid], patience: Duration) -> (usize, usize) {
    let lost = app.wait_all(ids, "sent", patience).await;
    let twice = app.stub.texted_twice();
    if !twice.is_empty() {
        println!("texted more than once: {twice:?}");
    }
    (lost, twice.len())
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_again_and_again_nothing_is_lost_or_sent_twice() {
    helpers::init_logs();
    let env = TestEnv::new().await;
    let stub = TwilioStub::start().await;
    let port = free_port();
    helpers::migrate(&env.database_url).await;
    let mut vars: Vec<(String, String)> = base_settings(&env, &stub, port).into_iter().collect();
    vars.push(("SMSGW_LOG_FORMAT".into(), "json".into()));
    vars.push(("RUST_LOG".into(), "warn".into()));
    vars.push(("SMSGW_PUBLIC_URL".into(), PUBLIC.into()));
    // A little provider latency keeps messages in the window between call and record.
    stub.reply_always(Reply::Slow(Duration::from_millis(3)));

    // The daemon declares the topology; then the web app publishes.
    let mut daemon = Daemon::spawn(&vars);
    wait_ready(port, &mut daemon).await;
    daemon.signal("KILL");
    let _ = daemon.wait_exit(Duration::from_secs(10));
    let app = helpers::attach(env, stub).await;
    app.add_school(SCHOOL, "GB").await;
    let mut tap = EventTap::bind(&app.env.amqp_url, "#").await;
    let jobs = 5_000;
    let ids = app.publish_many(jobs, "booking_reminder", SCHOOL).await;

    let started = Instant::now();
    let stop_replies = CancellationToken::new();
    let replies = post_replies(port, stop_replies.clone());
    let mut kills = 0;
    while kills < 6 {
        let mut daemon = Daemon::spawn(&vars);
        wait_ready(port, &mut daemon).await;
        tokio::time::sleep(Duration::from_millis(400 + 150 * kills)).await;
        daemon.signal("KILL");
        let _ = daemon.wait_exit(Duration::from_secs(10));
        kills += 1;
    }
    let mut daemon = Daemon::spawn(&vars);
    wait_ready(port, &mut daemon).await;
    stop_replies.cancel();
    let replies = replies.await.expect("the replies' poster");
    let (lost, duplicates) = tally(&app, &ids, Duration::from_secs(180)).await;
    let took = started.elapsed();
    // Copies waiting in a tier (a redelivery that looked again later) come back and are
    // acked as duplicates, while the daemon still runs. Until its `retry_at`, such a copy
    // goes back and forth between a tier and its lane, so the queues must be empty
    // together, and for longer than the longest tier.
    let tiers = ["100ms", "200ms", "400ms"].map(|d| format!("sms.retry.{d}"));
    let lanes = ["sms.urgent", "sms.default", "sms.bulk", "sms.dead"].map(String::from);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut empty_since: Option<Instant> = None;
    while empty_since.is_none_or(|since| since.elapsed() < Duration::from_secs(1)) {
        let mut empty = true;
        for queue in tiers.iter().chain(&lanes) {
            empty &= app.queue_depth(queue).await == 0;
        }
        empty_since = if empty {
            empty_since.or(Some(Instant::now()))
        } else {
            None
        };
        assert!(Instant::now() < deadline, "the queues never emptied");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tap.drain(&app.db, Duration::from_secs(60)).await;
    daemon.signal("TERM");
    assert_eq!(daemon.wait_exit(Duration::from_secs(30)).0, Some(0));
    let copies = assert_events_match_log(&tap, &app.db).await;
    println!("events published again after a kill: {copies}; replies taken: {replies}");
    let kept: i64 = app.db.scalar("SELECT count(*) FROM sms_replies", &[]).await;
    assert_eq!(kept, replies as i64, "each reply taken kept once");

    helpers::report(
        "SIGKILL mid-work",
        jobs,
        &format!("{kills} kills"),
        lost,
        duplicates,
        took,
    );
    assert_eq!(lost, 0, "jobs without an outcome");
    assert_eq!(duplicates, 0, "recipients texted twice");
    assert_eq!(app.stub.taken(), jobs, "each text taken once");
    // Every delivery was settled: nothing came back to the queues when the daemon left.
    for queue in &lanes {
        assert_eq!(
            app.queue_depth(queue).await,
            0,
            "{queue} after the daemon stopped"
        );
    }
    let rows: i64 = app
        .db
        .scalar("SELECT count(*) FROM sms_messages", &[])
        .await;
    assert_eq!(rows, jobs as i64, "one row per job");
}

#[tokio::test(flavor = "multi_thread")]
async fn broker_connections_cut_mid_run_are_rebuilt_by_themselves() {
    let app = spawn_app_behind_proxies(&[], true, false).await;
    let proxy = app.amqp_proxy.clone().expect("proxy");
    app.add_school(SCHOOL, "GB").await;
    app.stub.reply_always(Reply::Slow(Duration::from_millis(2)));
    let jobs = 1_000;
    let started = Instant::now();
    let ids = app.publish_many(jobs, "booking_reminder", SCHOOL).await;
    let mut cuts = 0;
    while cuts < 5 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        proxy.cut();
        cuts += 1;
    }
    let (lost, duplicates) = tally(&app, &ids, Duration::from_secs(120)).await;
    helpers::report(
        "broker connection cut",
        jobs,
        &format!("{cuts} cuts"),
        lost,
        duplicates,
        started.elapsed(),
    );
    assert_eq!((lost, duplicates), (0, 0));
    // The work may be done before the daemon came back from the last cut.
    let deadline = Instant::now() + Duration::from_secs(30);
    while app.readiness().await["ready"] != true && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(app.readiness().await["ready"], true, "ready again");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_broker_is_noticed_by_heartbeat_and_left_behind() {
    // Behind the proxy the daemon uses a 2 s heartbeat, so a silent peer is noticed fast.
    let app = spawn_app_behind_proxies(&[], true, false).await;
    let proxy = app.amqp_proxy.clone().expect("proxy");
    app.add_school(SCHOOL, "GB").await;
    let started = Instant::now();
    let first = app.publish_many(100, "booking_reminder", SCHOOL).await;
    assert_eq!(
        app.wait_all(&first, "sent", Duration::from_secs(30)).await,
        0
    );

    proxy.stall(true);
    let deadline = Instant::now() + Duration::from_secs(60);
    while app.readiness().await["broker"] != false {
        assert!(
            Instant::now() < deadline,
            "a stalled broker was never noticed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let during = app.publish_many(200, "login_code", SCHOOL).await;
    proxy.stall(false);
    let (lost, duplicates) = tally(&app, &during, Duration::from_secs(90)).await;
    helpers::report(
        "broker stalled (heartbeat)",
        300,
        "1 stall",
        lost,
        duplicates,
        started.elapsed(),
    );
    assert_eq!((lost, duplicates), (0, 0));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_consumer_cancelled_by_the_broker_comes_back() {
    let app = spawn_app().await;
    app.add_school(SCHOOL, "GB").await;
    // Deleting the queue cancels the daemon's consumer on it.
    app.delete_queue("sms.urgent").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !app.queue_exists("sms.urgent").await {
        assert!(
            Instant::now() < deadline,
            "the lane was never declared again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    helpers::wait_until_ready_url(&app.http_url).await;
    let ids = app.publish_many(20, "login_code", SCHOOL).await;
    let (lost, duplicates) = tally(&app, &ids, Duration::from_secs(30)).await;
    assert_eq!(
        (lost, duplicates),
        (0, 0),
        "a consumer that silently stops is a bug"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_database_outage_holds_messages_and_never_sends_unrecorded() {
    let app = spawn_app_behind_proxies(&[], false, true).await;
    let proxy = app.db_proxy.clone().expect("proxy");
    app.add_school(SCHOOL, "GB").await;
    app.stub.reply_always(Reply::Slow(Duration::from_millis(5)));
    let jobs = 600;
    let started = Instant::now();
    let ids = app.publish_many(jobs, "booking_reminder", SCHOOL).await;
    while app.stub.requests().len() < 50 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    proxy.refuse(true);
    proxy.cut();
    let calls_at_cut = app.stub.requests().len();
    let deadline = Instant::now() + Duration::from_secs(30);
    while app.readiness().await["database"] != false {
        assert!(Instant::now() < deadline, "the outage was never reported");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let calls_during = app.stub.requests().len() - calls_at_cut;
    proxy.refuse(false);
    let (lost, duplicates) = tally(&app, &ids, Duration::from_secs(120)).await;
    helpers::report(
        "database connections cut for 5 s",
        jobs,
        "1 outage",
        lost,
        duplicates,
        started.elapsed(),
    );
    assert_eq!((lost, duplicates), (0, 0));
    // Every provider call has its attempt row: none was made unrecorded.
    let attempts: i64 = app
        .db
        .scalar("SELECT count(*) FROM sms_attempts", &[])
        .await;
    assert_eq!(attempts as usize, app.stub.requests().len());
    // Calls already recorded as started may finish; no new ones start during the outage.
    assert!(
        calls_during <= 320,
        "{calls_during} calls while the database was down"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flaky_provider_ends_every_job_sent_or_dead_lettered() {
    let app = spawn_app_with(&[
        ("SMSGW_PROVIDER_TIMEOUT", "400ms"),
        ("SMSGW_MAX_ATTEMPTS", "4"),
        ("SMSGW_CIRCUIT_THRESHOLD", "1000"),
    ])
    .await;
    app.add_school(SCHOOL, "GB").await;
    app.stub.reply_always(Reply::Flaky {
        error_percent: 30,
        hang_percent: 5,
        hang: Duration::from_secs(2),
    });
    let jobs = 1_000;
    let started = Instant::now();
    let ids = app.publish_many(jobs, "booking_reminder", SCHOOL).await;

    let deadline = Instant::now() + Duration::from_secs(180);
    let (sent, failed) = loop {
        let counts = app
            .db
            .rows(
                "SELECT count(*) FILTER (WHERE status = 'sent'), count(*) FILTER (WHERE status = 'failed')
                 FROM sms_messages WHERE id = ANY($1)",
                &[&ids],
            )
            .await;
        let (sent, failed): (i64, i64) = (counts[0].get(0), counts[0].get(1));
        if (sent + failed) as usize == jobs || Instant::now() > deadline {
            break (sent as usize, failed as usize);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let lost = jobs - sent - failed;
    let duplicates = app.stub.texted_twice().len();
    helpers::report(
        "provider 30% 5xx, 5% hanging",
        jobs,
        &format!("{} calls", app.stub.requests().len()),
        lost,
        duplicates,
        started.elapsed(),
    );
    assert_eq!(lost, 0);
    assert_eq!(duplicates, 0);
    let dead = app.dead_letters(failed).await;
    // Out of attempts; `outcome_unknown` when the last call hung (it may have gone out).
    assert!(dead.iter().all(|d| matches!(
        d.reason.as_deref(),
        Some("attempts_exhausted" | "outcome_unknown")
    )));
    assert_eq!(app.stub.taken(), sent, "each sent message taken once");
    let attempts: i64 = app
        .db
        .scalar("SELECT count(*) FROM sms_attempts", &[])
        .await;
    assert_eq!(
        attempts as usize,
        app.stub.requests().len(),
        "an attempt row per call"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_with_200_in_flight_exits_0_in_grace_and_loses_nothing() {
    helpers::init_logs();
    let env = TestEnv::new().await;
    let stub = TwilioStub::start().await;
    let port = free_port();
    helpers::migrate(&env.database_url).await;
    let mut vars: Vec<(String, String)> = base_settings(&env, &stub, port).into_iter().collect();
    vars.push(("SMSGW_DEFAULT_CONCURRENCY".into(), "256".into()));
    vars.retain(|(k, _)| k != "SMSGW_SHUTDOWN_GRACE");
    vars.push(("SMSGW_SHUTDOWN_GRACE".into(), "10s".into()));
    vars.push(("RUST_LOG".into(), "warn".into()));
    stub.reply_always(Reply::Slow(Duration::from_millis(1500)));
    let mut daemon = Daemon::spawn(&vars);
    wait_ready(port, &mut daemon).await;
    let app = helpers::attach(env, stub).await;
    app.add_school(SCHOOL, "GB").await;
    let started = Instant::now();
    let ids = app.publish_many(200, "booking_reminder", SCHOOL).await;
    while app.stub.requests().len() < 200 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    daemon.signal("TERM");
    let (code, took) = daemon.wait_exit(Duration::from_secs(30));
    assert_eq!(code, Some(0), "{:#?}", daemon.logs());
    assert!(
        took < Duration::from_secs(11),
        "exit took {took:?}, over the 10 s grace"
    );
    let finished: i64 = app
        .db
        .scalar(
            "SELECT count(*) FROM sms_messages WHERE status = 'sent'",
            &[],
        )
        .await;

    // Whatever did not finish went back to the broker: the next daemon finishes it, and
    // nobody is texted twice.
    let mut next = Daemon::spawn(&vars);
    wait_ready(port, &mut next).await;
    let (lost, duplicates) = tally(&app, &ids, Duration::from_secs(60)).await;
    next.signal("TERM");
    let _ = next.wait_exit(Duration::from_secs(30));
    helpers::report(
        "SIGTERM with 200 in flight",
        200,
        &format!("1 SIGTERM ({finished} finished in grace)"),
        lost,
        duplicates,
        started.elapsed(),
    );
    assert_eq!((lost, duplicates), (0, 0));
    assert_eq!(
        finished, 200,
        "in-flight sends finish within the grace period"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_database_that_stops_answering_is_given_up_on_and_retried() {
    let app = spawn_app_behind_proxies(&[], false, true).await;
    let proxy = app.db_proxy.clone().expect("proxy");
    app.add_school(SCHOOL, "GB").await;
    app.stub.reply_always(Reply::Slow(Duration::from_millis(5)));
    let jobs = 300;
    let started = Instant::now();
    let ids = app.publish_many(jobs, "booking_reminder", SCHOOL).await;
    while app.stub.requests().len() < 30 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // No error, no reset: the open connections just never answer again.
    proxy.freeze();
    let (lost, duplicates) = tally(&app, &ids, Duration::from_secs(120)).await;
    helpers::report(
        "database connections gone silent",
        jobs,
        "1 stall",
        lost,
        duplicates,
        started.elapsed(),
    );
    assert_eq!((lost, duplicates), (0, 0));
    app.assert_every_call_recorded().await;
    proxy.cut();
}
