//! `make bench`: smsgw's throughput, latency, memory and CPU against the real RabbitMQ and
//! PostgreSQL on this machine, next to the raw ceilings of those services measured in the
//! same run; then the fairness, fan-out and pacing scenarios.
//!
//! Knobs (environment): `BENCH_JOBS` (default 100000), `BENCH_LATENCIES` (provider latency
//! in ms, default `0,100`), `BENCH_SCENARIOS` (`0` skips them), `BENCH_RECIPIENTS` (of the
//! big announcement, default 50000), `BENCH_VARIANTS` (the runs beside the defaults at the
//! first latency, default `events-off,guards`; see [`Variant::named`]), `BENCH_DAEMON_ENV`
//! (`K=V;K=V`: more of the daemon's environment, for an experiment).

#[path = "../tests/helpers/mod.rs"]
mod helpers;

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use lapin::{
    BasicProperties, Connection, ConnectionProperties, ExchangeKind,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
        ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
    },
    types::{AMQPValue, FieldTable},
};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use helpers::{Reply, TestEnv, TwilioStub, base_settings, free_port, process::Daemon};

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// CPU seconds a process has used (user + system).
fn cpu_seconds(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let after = stat.rsplit_once(')')?.1;
            let fields: Vec<&str> = after.split_whitespace().collect();
            let user: f64 = fields.get(11)?.parse().ok()?;
            let system: f64 = fields.get(12)?.parse().ok()?;
            Some((user + system) / 100.0)
        })
        .unwrap_or(0.0)
}

fn pids(name: &str) -> Vec<u32> {
    std::process::Command::new("pgrep")
        .args(["-x", name])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn cpu_of(name: &str) -> f64 {
    pids(name).into_iter().map(cpu_seconds).sum()
}

fn peak_rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("VmHWM:"))?
                .split_whitespace()
                .nth(1)?
                .parse::<f64>()
                .ok()
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

struct Ceilings {
    publish: f64,
    consume: f64,
    consume_multiple: f64,
    pg_rows: f64,
    stub: f64,
}

async fn quorum_queue(conn: &Connection, name: &str) -> lapin::Channel {
    let channel = conn.create_channel().await.expect("channel");
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    channel
        .queue_declare(
            name.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await
        .expect("declare");
    channel
}

async fn publish_n(conn: &Connection, queue: &str, n: usize) -> f64 {
    let channel = conn.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let body = json!({"id": Uuid::new_v4(), "type": "booking_reminder", "school_id": 1, "to": "+447700900123", "body": "Reminder: driving lesson tomorrow 10:00 with Sam."}).to_string();
    let started = Instant::now();
    for chunk in (0..n).collect::<Vec<_>>().chunks(2_000) {
        let mut confirms = Vec::new();
        for _ in chunk {
            confirms.push(
                channel
                    .basic_publish(
                        "".into(),
                        queue.into(),
                        BasicPublishOptions::default(),
                        body.as_bytes(),
                        BasicProperties::default().with_delivery_mode(2),
                    )
                    .await
                    .expect("publish"),
            );
        }
        for confirm in confirms {
            confirm.await.expect("confirm");
        }
    }
    n as f64 / started.elapsed().as_secs_f64()
}

async fn consume_n(conn: &Connection, queue: &str, n: usize, ack_every: u64) -> f64 {
    let channel = conn.create_channel().await.expect("channel");
    channel
        .basic_qos(1_000, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            "bench".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let started = Instant::now();
    let mut seen = 0usize;
    while let Some(Ok(delivery)) = consumer.next().await {
        seen += 1;
        if ack_every <= 1 {
            delivery.ack(BasicAckOptions::default()).await.expect("ack");
        } else if delivery.delivery_tag % ack_every == 0 || seen == n {
            channel
                .basic_ack(delivery.delivery_tag, BasicAckOptions { multiple: true })
                .await
                .expect("ack");
        }
        if seen == n {
            break;
        }
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    let _ = channel.close(200, "done".into()).await;
    rate
}

async fn ceilings(n: usize) -> Ceilings {
    let env = TestEnv::new().await;
    let conn = Connection::connect(&env.amqp_url, ConnectionProperties::default())
        .await
        .expect("connect");
    quorum_queue(&conn, "bench.single").await;
    quorum_queue(&conn, "bench.multiple").await;
    let publish = publish_n(&conn, "bench.single", n).await;
    publish_n(&conn, "bench.multiple", n).await;
    let consume = consume_n(&conn, "bench.single", n, 1).await;
    let consume_multiple = consume_n(&conn, "bench.multiple", n, 64).await;
    let _ = conn.close(200, "done".into()).await;

    helpers::migrate(&env.database_url).await;
    let db = helpers::Db::connect(&env.database_url).await;
    let rows = n.max(50_000);
    let started = Instant::now();
    for chunk in (0..rows).collect::<Vec<_>>().chunks(1_000) {
        let ids: Vec<Uuid> = chunk.iter().map(|_| Uuid::new_v4()).collect();
        db.execute(
            "INSERT INTO sms_messages (id, school_id, type, recipient, body, status, provider, attempts)
             SELECT id, 1, 'booking_reminder', '+447700900123', 'Reminder: driving lesson tomorrow', 'sent', 'twilio', 1
             FROM UNNEST($1::uuid[]) AS t(id)",
            &[&ids],
        )
        .await;
    }
    let pg_rows = rows as f64 / started.elapsed().as_secs_f64();
    drop(db);

    let stub = TwilioStub::start_lean().await;
    let client = reqwest::Client::new();
    let url = format!(
        "{}/2010-04-01/Accounts/{}/Messages.json",
        stub.url,
        helpers::twilio_stub::ACCOUNT_SID
    );
    let started = Instant::now();
    let window = Duration::from_secs(3);
    let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..64 {
        let (client, url, done) = (client.clone(), url.clone(), done.clone());
        workers.push(tokio::spawn(async move {
            while started.elapsed() < window {
                let _ = client
                    .post(&url)
                    .form(&[
                        ("To", "+447700900123"),
                        ("From", "+15005550006"),
                        ("Body", "x"),
                    ])
                    .send()
                    .await
                    .and_then(|r| r.error_for_status());
                done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }));
    }
    for worker in workers {
        let _ = worker.await;
    }
    let stub_rate =
        done.load(std::sync::atomic::Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
    Ceilings {
        publish,
        consume,
        consume_multiple,
        pg_rows,
        stub: stub_rate,
    }
}

const TYPES: [(&str, u32); 6] = [
    ("booking_reminder", 30),
    ("booking_confirmation", 30),
    ("booking_change", 10),
    ("booking_cancellation", 5),
    ("login_code", 5),
    ("announcement", 20),
];

fn kind_for(i: usize) -> &'static str {
    let slot = (i as u32 * 7919) % 100;
    let mut acc = 0;
    for (kind, share) in TYPES {
        acc += share;
        if slot < acc {
            return kind;
        }
    }
    "booking_reminder"
}

fn number(i: usize) -> String {
    format!("+447{:09}", 100_000_000 + i)
}

/// A prepared environment: schools, 2% of recipients opted out, a lean stub.
struct Run {
    app: helpers::App,
    port: u16,
    vars: Vec<(String, String)>,
}

async fn prepare(latency_ms: u64, extra: &[(&str, String)]) -> Run {
    let env = TestEnv::new().await;
    let stub = TwilioStub::start_lean().await;
    stub.reply_always(Reply::Bench {
        error_percent: 1,
        latency: Duration::from_millis(latency_ms),
    });
    let port = free_port();
    helpers::migrate(&env.database_url).await;
    let mut vars: Vec<(String, String)> = base_settings(&env, &stub, port).into_iter().collect();
    vars.push(("RUST_LOG".into(), "warn".into()));
    vars.push(("SMSGW_LOG_FORMAT".into(), "json".into()));
    vars.push(("SMSGW_RETRY_DELAYS".into(), "200ms,400ms,800ms".into()));
    vars.push(("SMSGW_PROVIDER_TIMEOUT".into(), "5s".into()));
    // The daemon's runtime threads (tokio's own variable; default: one a core).
    if let Ok(threads) = std::env::var("BENCH_WORKER_THREADS") {
        vars.push(("TOKIO_WORKER_THREADS".into(), threads));
    }
    // Anything else the daemon should run with, for an experiment: `K=V;K=V`.
    let passed: Vec<(String, String)> = std::env::var("BENCH_DAEMON_ENV")
        .unwrap_or_default()
        .split(';')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.to_owned()))
        .collect();
    let extra = extra
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .chain(passed);
    for (k, v) in extra {
        vars.retain(|(key, _)| *key != k);
        vars.push((k, v));
    }
    let app = helpers::attach(env, stub).await;
    app.sql(
        "INSERT INTO sms_school_settings (school_id, sms_enabled, country)
         SELECT s, true, 'GB' FROM generate_series(1, 20) s",
    )
    .await;
    Run { app, port, vars }
}

async fn opt_out_every_50th(app: &helpers::App, count: usize) {
    let phones: Vec<String> = (0..count).step_by(50).map(number).collect();
    app.db
        .execute(
            "INSERT INTO sms_opt_outs (school_id, phone, source) SELECT NULL, p, 'web' FROM UNNEST($1::text[]) p",
            &[&phones],
        )
        .await;
}

/// Plain ASCII, as the web app's templates mostly are.
const PLAIN: &str = "driving lesson tomorrow 10:00 with Sam.";
/// With the look-alikes a template pasted from a word processor has: GSM-7 once smart
/// encoding replaces them, UCS-2 as written.
const LOOKALIKES: &str =
    "you\u{2019}re booked \u{2013} driving lesson tomorrow 10:00 with Sam\u{2026}";

fn single_jobs(from: usize, count: usize, tag: &str, variant: Variant) -> Vec<Value> {
    let text = if variant.lookalikes {
        LOOKALIKES
    } else {
        PLAIN
    };
    (from..from + count)
        .map(|i| {
            let mut job = json!({
                "id": Uuid::new_v4(),
                "type": kind_for(i),
                "school_id": (i % 20) + 1,
                "to": number(i),
                "body": format!("{tag}: {text}"),
            });
            // A context of the same size either way: it is stored and in every event.
            let cancels = kind_for(i) == "booking_cancellation";
            job["context"] = if variant.bookings && !(cancels && variant.no_withdrawals) {
                json!({"booking_id": i})
            } else {
                json!({"lesson_id": i})
            };
            job
        })
        .collect()
}

async fn finished(app: &helpers::App) -> i64 {
    app.db
        .scalar(
            "SELECT count(*) FROM sms_messages WHERE status IN ('sent', 'suppressed', 'failed', 'expired')",
            &[],
        )
        .await
}

/// A reading taken during a run: calls the stub took so far, and the CPU seconds of
/// smsgw, PostgreSQL and RabbitMQ.
#[derive(Clone, Copy)]
struct Reading {
    at: Instant,
    calls: usize,
    cpu: [f64; 3],
}

fn reading(stub: &TwilioStub, pid: u32) -> Reading {
    Reading {
        at: Instant::now(),
        calls: stub.arrived(),
        cpu: [cpu_seconds(pid), cpu_of("postgres"), cpu_of("beam.smp")],
    }
}

/// What a worker lives in: the middle of a run, from the reading where a fifth of the
/// calls were made to the one where four fifths were, without the start-up (connecting,
/// the first plans) and the tail (the last retries). Calls per second, and each
/// process's CPU seconds per 10,000 calls.
struct Steady {
    rate: f64,
    cpu: [f64; 3],
}

fn steady(readings: &[Reading], calls: usize) -> Option<Steady> {
    let from = readings.iter().find(|r| r.calls * 5 >= calls)?;
    let to = readings.iter().find(|r| r.calls * 5 >= calls * 4)?;
    let done = to.calls.checked_sub(from.calls).filter(|&n| n > 0)? as f64;
    let seconds = to.at.duration_since(from.at).as_secs_f64();
    let per_10k = |i: usize| (to.cpu[i] - from.cpu[i]) / done * 10_000.0;
    Some(Steady {
        rate: done / seconds.max(f64::EPSILON),
        cpu: [per_10k(0), per_10k(1), per_10k(2)],
    })
}

struct Throughput {
    latency_ms: u64,
    variant: Variant,
    steady: Option<Steady>,
    /// The lanes' budgets (urgent / default / bulk).
    in_flight: String,
    jobs: usize,
    rate: f64,
    p50: Duration,
    p99: Duration,
    rss: f64,
    worker_cpu: f64,
    pg_cpu: f64,
    rabbit_cpu: f64,
}

/// Every status event relayed: the outbox is empty.
async fn events_relayed(app: &helpers::App) -> bool {
    app.db
        .scalar::<i64>("SELECT count(*) FROM sms_events", &[])
        .await
        == 0
}

/// The web app's queue for every status event, with a consumer that keeps up, as the web
/// app's own would: events are taken as they come and acked in batches. Returns how many
/// it took when stopped.
fn keep_up_with_events(amqp_url: &str, stop: CancellationToken) -> tokio::task::JoinHandle<u64> {
    let amqp_url = amqp_url.to_owned();
    tokio::spawn(async move {
        let connection = Connection::connect(&amqp_url, ConnectionProperties::default())
            .await
            .expect("connect the events consumer");
        let channel = connection.create_channel().await.expect("channel");
        channel
            .exchange_declare(
                "sms.events".into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("declare sms.events");
        let queue = channel
            .queue_declare(
                "web-app-events".into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("declare the events queue");
        channel
            .queue_bind(
                queue.name().as_str().into(),
                "sms.events".into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind the events queue");
        channel
            .basic_qos(512, BasicQosOptions::default())
            .await
            .expect("prefetch");
        let mut consumer = channel
            .basic_consume(
                queue.name().as_str().into(),
                "bench-events".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("consume events");
        let mut taken = 0u64;
        loop {
            let next = tokio::select! {
                next = consumer.next() => next,
                () = stop.cancelled() => break,
            };
            let Some(Ok(delivery)) = next else { break };
            taken += 1;
            if taken.is_multiple_of(64) {
                let _ = delivery.ack(BasicAckOptions { multiple: true }).await;
            }
        }
        let _ = connection.close(200, "bench done".into()).await;
        taken
    })
}

/// What a run turns on besides the defaults.
#[derive(Clone, Copy)]
struct Variant {
    name: &'static str,
    events: bool,
    /// Every school with a monthly budget and a country list, and an international cap:
    /// every guard on the hot path, none of them refusing (the budgets are never reached).
    guards: bool,
    /// Texts with look-alikes (`’`, `–`, `…`), and every school with an alphanumeric sender
    /// and a number, so each call chooses between them.
    lookalikes: bool,
    /// `SMSGW_SMART_ENCODING`.
    smart_encoding: bool,
    /// Every job's context has a `booking_id` (else a `lesson_id`): reminders and
    /// confirmations are looked up among the cancelled bookings, and cancellations
    /// withdraw theirs.
    bookings: bool,
    /// Cancellations without one: only the lookups, nothing withdrawn.
    no_withdrawals: bool,
}

impl Variant {
    const DEFAULTS: Variant = Variant {
        name: "defaults",
        events: true,
        guards: false,
        lookalikes: false,
        smart_encoding: true,
        bookings: true,
        no_withdrawals: false,
    };

    /// The runs `BENCH_VARIANTS` may name.
    fn named(name: &str) -> Option<Variant> {
        let d = Variant::DEFAULTS;
        Some(match name {
            // Again, to see how far two runs of the same build differ in one sitting.
            "defaults" => d,
            "events-off" => Variant {
                name: "events off",
                events: false,
                ..d
            },
            "guards" => Variant {
                name: "every guard",
                guards: true,
                ..d
            },
            "lookalikes" => Variant {
                name: "look-alikes, smart encoding",
                lookalikes: true,
                ..d
            },
            "lookalikes-as-written" => Variant {
                name: "look-alikes, as written",
                lookalikes: true,
                smart_encoding: false,
                ..d
            },
            "lookups-only" => Variant {
                name: "booking_id, cancellations without",
                no_withdrawals: true,
                ..d
            },
            "no-bookings" => Variant {
                name: "no booking_id",
                bookings: false,
                ..d
            },
            _ => return None,
        })
    }
}

/// The guards' settings for a run with every guard configured. The login-code limit is
/// always on (it has no "off"), so it is in every run.
const GUARD_VARS: [(&str, &str); 2] = [
    ("SMSGW_INTERNATIONAL_DAILY_LIMIT", "1000000"),
    ("SMSGW_ALLOWED_COUNTRIES", "IE"),
];

async fn configure_guards(app: &helpers::App) {
    app.sql(
        "UPDATE sms_school_settings
         SET monthly_segment_budget = 100000000, allowed_countries = '{GB,IE}'",
    )
    .await;
}

async fn end_to_end(jobs: usize, latency_ms: u64, variant: Variant) -> Throughput {
    // The lanes' budgets: BENCH_CONCURRENCY for the default and bulk lanes (the urgent
    // one 128); else the daemon's own defaults with a fast provider, and 1,024 in flight
    // in all (128 / 448 / 448) with a slow one, the load the memory target is set for.
    let concurrency = std::env::var("BENCH_CONCURRENCY")
        .ok()
        .or_else(|| (latency_ms >= 50).then(|| "448".to_owned()));
    let (lanes, in_flight) = match concurrency {
        Some(c) => (
            vec![
                ("SMSGW_URGENT_CONCURRENCY", "128".to_owned()),
                ("SMSGW_DEFAULT_CONCURRENCY", c.clone()),
                ("SMSGW_BULK_CONCURRENCY", c.clone()),
            ],
            format!("128 / {c} / {c}"),
        ),
        None => (Vec::new(), "defaults".to_owned()),
    };
    let mut extra = lanes;
    let on = |on: bool| if on { "on" } else { "off" }.to_owned();
    extra.push(("SMSGW_EVENTS", on(variant.events)));
    extra.push(("SMSGW_SMART_ENCODING", on(variant.smart_encoding)));
    if variant.guards {
        extra.extend(GUARD_VARS.map(|(k, v)| (k, v.to_owned())));
    }
    let run = prepare(latency_ms, &extra).await;
    if variant.guards {
        configure_guards(&run.app).await;
    }
    if variant.lookalikes {
        run.app
            .sql("UPDATE sms_school_settings SET sender_id = 'DriveCo', sender_number = '+447700900001'")
            .await;
    }
    let events_stop = CancellationToken::new();
    let events_consumer = keep_up_with_events(&run.app.env.amqp_url, events_stop.clone());
    opt_out_every_50th(&run.app, jobs).await;
    // Declare the topology, then publish everything before the clock starts.
    let mut daemon = Daemon::spawn(&run.vars);
    helpers::process::wait_ready(run.port, &mut daemon).await;
    daemon.signal("TERM");
    let _ = daemon.wait_exit(Duration::from_secs(30));
    let all = single_jobs(0, jobs, "Reminder", variant);
    run.app.publish_all(&all).await;

    let (pg0, rabbit0) = (cpu_of("postgres"), cpu_of("beam.smp"));
    let started = Instant::now();
    let mut daemon = Daemon::spawn(&run.vars);
    let pid = daemon.child.id();
    // Every job but the 2% opted out reaches the stub; only then count the rows (a count
    // scans the table: every 250 ms all along, it would take CPU from the run it measures).
    let calls = jobs - jobs.div_ceil(50);
    let mut polls = 0u32;
    let mut readings = Vec::new();
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        polls += 1;
        readings.push(reading(&run.app.stub, pid));
        let due = run.app.stub.arrived() >= calls || polls.is_multiple_of(20);
        if due && finished(&run.app).await as usize >= jobs && events_relayed(&run.app).await {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(1_800),
            "the run never finished"
        );
    }
    let elapsed = started.elapsed();
    events_stop.cancel();
    let _ = events_consumer.await;
    let worker_cpu = cpu_seconds(pid);
    let (pg_cpu, rabbit_cpu) = (cpu_of("postgres") - pg0, cpu_of("beam.smp") - rabbit0);

    // Latency: jobs published one by one at a steady rate while the worker is idle.
    let probes = 2_000.min(jobs);
    let probe_jobs = single_jobs(10_000_000, probes, "Probe", variant);
    let mut published = HashMap::new();
    let pace = Duration::from_micros(1_000_000 / 1_000);
    let probe_start = Instant::now();
    for (i, job) in probe_jobs.iter().enumerate() {
        let due = probe_start + pace * i as u32;
        tokio::time::sleep_until(due.into()).await;
        published.insert(
            job["to"].as_str().unwrap_or_default().to_owned(),
            Instant::now(),
        );
        run.app.publish(job).await;
    }
    tokio::time::sleep(Duration::from_secs(3) + Duration::from_millis(latency_ms * 2)).await;
    let arrivals = run.app.stub.arrivals();
    let mut latencies: Vec<Duration> = published
        .iter()
        .filter_map(|(to, at)| {
            arrivals
                .get(to)
                .map(|(_, arrived)| arrived.duration_since(*at))
        })
        .collect();
    latencies.sort();
    let rss = peak_rss_mib(pid);
    daemon.signal("TERM");
    let _ = daemon.wait_exit(Duration::from_secs(60));
    Throughput {
        latency_ms,
        variant,
        steady: steady(&readings, calls),
        in_flight,
        jobs,
        rate: jobs as f64 / elapsed.as_secs_f64(),
        p50: percentile(&latencies, 0.5),
        p99: percentile(&latencies, 0.99),
        rss,
        worker_cpu: worker_cpu / jobs as f64 * 10_000.0,
        pg_cpu: pg_cpu / jobs as f64 * 10_000.0,
        rabbit_cpu: rabbit_cpu / jobs as f64 * 10_000.0,
    }
}

/// Fan-out, urgent-before-bulk and fairness, on one run: school A's 50,000-recipient
/// announcement, then school B's 20-recipient one, then login codes while it drains.
async fn scenarios(recipients: usize) -> Vec<(String, String)> {
    let run = prepare(0, &[]).await;
    let mut daemon = Daemon::spawn(&run.vars);
    helpers::process::wait_ready(run.port, &mut daemon).await;
    let app = &run.app;
    let a = Uuid::new_v4();
    let bulk_a = json!({
        "id": a,
        "type": "announcement",
        "school_id": 1,
        "recipients": (0..recipients).map(|i| json!({"to": number(i), "ref": format!("user-{i}")})).collect::<Vec<_>>(),
        "body": "The office is closed on Friday.",
    });
    let b = Uuid::new_v4();
    let bulk_b = json!({
        "id": b,
        "type": "announcement",
        "school_id": 2,
        "recipients": (0..20).map(|i| json!({"to": number(5_000_000 + i)})).collect::<Vec<_>>(),
        "body": "Lessons resume on Monday.",
    });
    let started = Instant::now();
    app.publish(&bulk_a).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let b_published = Instant::now();
    app.publish(&bulk_b).await;

    // Login codes, one every 50 ms, while A drains.
    let mut codes = HashMap::new();
    for i in 0..40 {
        let to = number(6_000_000 + i);
        let job = json!({"id": Uuid::new_v4(), "type": "login_code", "school_id": 3, "to": to, "body": "Your code is 4711"});
        codes.insert(to, Instant::now());
        app.publish(&job).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let b_numbers: Vec<String> = (0..20).map(|i| number(5_000_000 + i)).collect();
    let mut b_done = None;
    let mut a_done = None;
    while started.elapsed() < Duration::from_secs(600) && (a_done.is_none() || b_done.is_none()) {
        let arrivals = app.stub.arrivals();
        if b_done.is_none() && b_numbers.iter().all(|n| arrivals.contains_key(n)) {
            b_done = Some(
                b_numbers
                    .iter()
                    .filter_map(|n| {
                        arrivals
                            .get(n)
                            .map(|(_, at)| at.duration_since(b_published))
                    })
                    .max()
                    .unwrap_or_default(),
            );
        }
        let a_count: i64 = app
            .db
            .scalar(
                "SELECT count(*) FROM sms_messages WHERE bulk_id = $1",
                &[&a],
            )
            .await;
        if a_done.is_none() && a_count as usize >= recipients {
            a_done = Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let arrivals = app.stub.arrivals();
    let mut code_latency: Vec<Duration> = codes
        .iter()
        .filter_map(|(to, at)| {
            arrivals
                .get(to)
                .map(|(_, arrived)| arrived.duration_since(*at))
        })
        .collect();
    code_latency.sort();
    daemon.signal("TERM");
    let _ = daemon.wait_exit(Duration::from_secs(60));
    let show = |d: Option<Duration>| {
        d.map_or("did not finish".into(), |d| {
            format!("{:.2} s", d.as_secs_f64())
        })
    };
    vec![
        (
            format!("announcement to {recipients}: all recipients recorded"),
            show(a_done),
        ),
        ("school B's 20 after A's: all sent".into(), show(b_done)),
        (
            "login codes during the drain: p50 / p99 / max".into(),
            format!(
                "{:.0} / {:.0} / {:.0} ms ({} of 40 sent)",
                percentile(&code_latency, 0.5).as_secs_f64() * 1000.0,
                percentile(&code_latency, 0.99).as_secs_f64() * 1000.0,
                code_latency
                    .last()
                    .copied()
                    .unwrap_or_default()
                    .as_secs_f64()
                    * 1000.0,
                code_latency.len()
            ),
        ),
    ]
}

/// Pacing: 2,000 messages with `SMSGW_RATE_LIMIT` = `rate`; the provider sees at most that
/// many in any one-second window.
async fn pacing(rate: u32) -> (String, String) {
    let run = prepare(0, &[("SMSGW_RATE_LIMIT", rate.to_string())]).await;
    // Every call answered: a refused call takes a slot but would not count as arrived.
    run.app.stub.reply_always(Reply::Bench {
        error_percent: 0,
        latency: Duration::ZERO,
    });
    let count = (rate as usize * 5).min(5_000);
    let mut daemon = Daemon::spawn(&run.vars);
    helpers::process::wait_ready(run.port, &mut daemon).await;
    let jobs = single_jobs(20_000_000, count, "Paced", Variant::DEFAULTS);
    run.app.publish_all(&jobs).await;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(120)
        && run.app.stub.arrivals().len() < count * 98 / 100
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut times: Vec<Instant> = run
        .app
        .stub
        .arrivals()
        .values()
        .map(|(_, at)| *at)
        .collect();
    times.sort();
    daemon.signal("TERM");
    let _ = daemon.wait_exit(Duration::from_secs(60));
    if times.len() < 2 {
        return (format!("pacing at {rate}/s"), "no calls".into());
    }
    let span = times[times.len() - 1]
        .duration_since(times[0])
        .as_secs_f64();
    let mean = (times.len() - 1) as f64 / span;
    let busiest = helpers::busiest_second(times.clone());
    (
        format!("pacing at {rate}/s (SMSGW_RATE_LIMIT)"),
        format!(
            "mean {mean:.1}/s ({:+.1}%), busiest 1 s window {busiest}",
            (mean / rate as f64 - 1.0) * 100.0
        ),
    )
}

/// Sent messages a daemon reports on `/metrics`.
async fn sent_by(port: u16) -> u64 {
    let text = match reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await {
        Ok(response) => response.text().await.unwrap_or_default(),
        Err(_) => return 0,
    };
    text.lines()
        .filter(|l| l.starts_with("smsgw_messages_total{") && l.contains("outcome=\"sent\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Two smsgw processes on one load: competing consumers of the same lanes and one log.
/// Every job is done once, and no recipient is texted twice.
async fn two_processes(jobs: usize) -> (String, String) {
    let run = prepare(0, &[]).await;
    let mut first = Daemon::spawn(&run.vars);
    helpers::process::wait_ready(run.port, &mut first).await;
    let second_port = free_port();
    let mut second_vars = run.vars.clone();
    second_vars.retain(|(k, _)| k != "SMSGW_HTTP_ADDR");
    second_vars.push(("SMSGW_HTTP_ADDR".into(), format!("127.0.0.1:{second_port}")));
    let mut second = Daemon::spawn(&second_vars);
    helpers::process::wait_ready(second_port, &mut second).await;
    let all = single_jobs(30_000_000, jobs, "Shared", Variant::DEFAULTS);
    let started = Instant::now();
    run.app.publish_all(&all).await;
    while (finished(&run.app).await as usize) < jobs && started.elapsed() < Duration::from_secs(900)
    {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let elapsed = started.elapsed();
    let done = finished(&run.app).await;
    let (a, b) = (sent_by(run.port).await, sent_by(second_port).await);
    let twice = run
        .app
        .stub
        .arrivals()
        .values()
        .filter(|(count, _)| *count > 1)
        .count();
    for daemon in [&mut first, &mut second] {
        daemon.signal("TERM");
        let _ = daemon.wait_exit(Duration::from_secs(60));
    }
    (
        format!("two processes sharing {jobs} jobs (published while they run)"),
        format!(
            "{done} done in {:.1} s ({:.0} jobs/s); sent {a} + {b}; texted twice: {twice}",
            elapsed.as_secs_f64(),
            done as f64 / elapsed.as_secs_f64()
        ),
    )
}

#[tokio::main]
async fn main() {
    smsgw::install_crypto_provider();
    let jobs = env_number("BENCH_JOBS", 100_000);
    let latencies: Vec<u64> = std::env::var("BENCH_LATENCIES")
        .unwrap_or_else(|_| "0,100".into())
        .split(',')
        .filter_map(|v| v.trim().parse().ok())
        .collect();
    println!(
        "smsgw benchmark: {jobs} jobs, provider latencies {latencies:?} ms, {} cores",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );

    let ceiling = ceilings(jobs.min(50_000)).await;
    println!();
    println!("| raw ceiling (same machine, same run) | per second |");
    println!("|---|---|");
    println!(
        "| RabbitMQ quorum queue: publish with confirms | {:.0} |",
        ceiling.publish
    );
    println!(
        "| RabbitMQ quorum queue: consume, one ack each | {:.0} |",
        ceiling.consume
    );
    println!(
        "| RabbitMQ quorum queue: consume, one multiple-ack per 64 | {:.0} |",
        ceiling.consume_multiple
    );
    println!(
        "| PostgreSQL: batched inserts into sms_messages (rows) | {:.0} |",
        ceiling.pg_rows
    );
    println!(
        "| provider stub: requests with 64 in flight | {:.0} |",
        ceiling.stub
    );

    // The defaults at every latency; at the first, the variants beside them.
    let variants: Vec<Variant> = std::env::var("BENCH_VARIANTS")
        .unwrap_or_else(|_| "events-off,guards".into())
        .split(',')
        .map(str::trim)
        .filter(|name| !name.is_empty())
        .map(|name| {
            Variant::named(name).unwrap_or_else(|| panic!("BENCH_VARIANTS: no variant '{name}'"))
        })
        .collect();
    let mut results = Vec::new();
    for (i, latency) in latencies.into_iter().enumerate() {
        results.push(end_to_end(jobs, latency, Variant::DEFAULTS).await);
        if i == 0 {
            for variant in &variants {
                results.push(end_to_end(jobs, latency, *variant).await);
            }
        }
    }
    println!();
    println!(
        "| provider latency | run | in flight (urgent / default / bulk) | jobs | jobs/s | vs consume ceiling | publish→provider p50 / p99 | peak RSS | CPU s per 10k: worker / PostgreSQL / RabbitMQ | steady: calls/s | steady: CPU s per 10k calls |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for r in &results {
        let (steady_rate, steady_cpu) = match &r.steady {
            Some(s) => (
                format!("{:.0}", s.rate),
                format!("{:.2} / {:.2} / {:.2}", s.cpu[0], s.cpu[1], s.cpu[2]),
            ),
            None => ("-".to_owned(), "-".to_owned()),
        };
        println!(
            "| {} ms | {} | {} | {} | {:.0} | {:.0}% | {:.1} / {:.1} ms | {:.1} MiB | {:.2} / {:.2} / {:.2} | {steady_rate} | {steady_cpu} |",
            r.latency_ms,
            r.variant.name,
            r.in_flight,
            r.jobs,
            r.rate,
            r.rate / ceiling.consume * 100.0,
            r.p50.as_secs_f64() * 1000.0,
            r.p99.as_secs_f64() * 1000.0,
            r.rss,
            r.worker_cpu,
            r.pg_cpu,
            r.rabbit_cpu
        );
    }

    if env_number("BENCH_SCENARIOS", 1) != 0 {
        let mut rows = scenarios(env_number("BENCH_RECIPIENTS", 50_000)).await;
        rows.push(pacing(100).await);
        rows.push(two_processes(jobs.min(20_000)).await);
        println!();
        println!("| scenario | result |");
        println!("|---|---|");
        for (name, result) in rows {
            println!("| {name} | {result} |");
        }
    }
}
