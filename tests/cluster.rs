//! Past one machine (contract section 12): replicas on a RabbitMQ cluster of the test's
//! own, and one account-wide rate shared by several replicas. These tests start and stop
//! broker nodes and run several daemons flat out: `make test` runs them alone.

mod helpers;

use std::time::{Duration, Instant};

use helpers::{
    Reply, TestEnv, TwilioStub, base_settings, busiest_second,
    cluster::Cluster,
    free_port,
    process::{Daemon, wait_ready},
};
use lapin::{Connection, ConnectionProperties, options::ConfirmSelectOptions};
use uuid::Uuid;

const SCHOOL: i64 = 42;

/// Publishes `count` reminders, each to its own number, through the broker at `url`.
async fn publish_reminders(url: &str, count: usize) -> Vec<Uuid> {
    let connection = Connection::connect(url, ConnectionProperties::default())
        .await
        .expect("connect to publish");
    let channel = connection.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let jobs: Vec<_> = (0..count)
        .map(|i| {
            helpers::job(
                "booking_reminder",
                SCHOOL,
                &format!("+447{:09}", 700_000_000 + i),
                "Reminder: lesson tomorrow",
            )
        })
        .collect();
    helpers::publish_jobs(&channel, &jobs).await;
    let _ = connection.close(200, "published".into()).await;
    jobs.iter().map(helpers::id_of).collect()
}

async fn add_school(db: &helpers::Db) {
    db.execute(
        "INSERT INTO sms_school_settings (school_id, sms_enabled, country) VALUES ($1, true, 'GB')",
        &[&SCHOOL],
    )
    .await;
}

/// How many of `ids` are not `sent` after waiting up to `patience` for them.
async fn unsent(db: &helpers::Db, ids: &[Uuid], patience: Duration) -> usize {
    let deadline = Instant::now() + patience;
    loop {
        let sent: i64 = db
            .scalar(
                "SELECT count(*) FROM sms_messages WHERE id = ANY($1) AND status = 'sent'",
                &[&ids],
            )
            .await;
        let missing = ids.len() - usize::try_from(sent).unwrap_or(0);
        if missing == 0 || Instant::now() > deadline {
            return missing;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn replica(env: &TestEnv, stub: &TwilioStub, extra: &[(&str, String)]) -> (Daemon, u16) {
    let port = free_port();
    let mut vars = base_settings(env, stub, port);
    vars.insert("RUST_LOG".into(), "smsgw=info".into());
    vars.insert("SMSGW_LOG_FORMAT".into(), "json".into());
    for (key, value) in extra {
        vars.insert((*key).to_owned(), value.clone());
    }
    let vars: Vec<(String, String)> = vars.into_iter().collect();
    (Daemon::spawn(&vars), port)
}

async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(work)
        .await
        .expect("cluster command thread")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_going_away_moves_its_replica_to_another_and_loses_nothing() {
    helpers::init_logs();
    let cluster = std::sync::Arc::new(blocking(|| Cluster::start(3)).await);
    let env = TestEnv::new().await;
    helpers::migrate(&env.database_url).await;
    let db = helpers::Db::connect(&env.database_url).await;
    add_school(&db).await;
    let stub = TwilioStub::start().await;
    stub.reply_always(Reply::Slow(Duration::from_millis(2)));

    // The first replica declares the lanes through node 0, which then leads them.
    let (mut first, first_port) =
        replica(&env, &stub, &[("SMSGW_AMQP_URL", cluster.urls(&[0, 1, 2]))]);
    wait_ready(first_port, &mut first).await;
    let (mut second, second_port) =
        replica(&env, &stub, &[("SMSGW_AMQP_URL", cluster.urls(&[1, 2, 0]))]);
    wait_ready(second_port, &mut second).await;
    assert_eq!(
        cluster.leader_of("sms.default", 1),
        0,
        "node 0 leads the lane"
    );
    for lane in ["sms.urgent", "sms.default", "sms.bulk", "sms.dead"] {
        assert_eq!(
            cluster.members_of(lane, 1),
            3,
            "{lane} is replicated on every node"
        );
    }

    let jobs = 3_000;
    let started = Instant::now();
    let ids = publish_reminders(&cluster.url(1), jobs).await;
    while stub.requests().len() < jobs / 4 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let stopping = cluster.clone();
    blocking(move || stopping.stop(0)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let restarting = cluster.clone();
    blocking(move || restarting.restart(0)).await;

    let lost = unsent(&db, &ids, Duration::from_secs(180)).await;
    let duplicates = stub.texted_twice().len();
    helpers::report(
        "cluster node leading the lanes stopped (2 replicas)",
        jobs,
        "1 node stop",
        lost,
        duplicates,
        started.elapsed(),
    );
    assert_eq!((lost, duplicates), (0, 0));
    wait_ready(first_port, &mut first).await;
    wait_ready(second_port, &mut second).await;
    let moved = first
        .logs()
        .iter()
        .filter(|line| line.contains("broker connected; consuming"))
        .any(|line| !line.contains(&format!(":{}/", cluster.nodes[0].amqp_port)));
    assert!(
        moved,
        "the first replica never moved off node 0: {:#?}",
        first.logs()
    );
}

/// How many of `times` fall in each whole second after the first.
fn per_second(times: &[Instant]) -> Vec<usize> {
    let Some(first) = times.iter().min() else {
        return Vec::new();
    };
    let mut counts = Vec::new();
    for t in times {
        let second = t.duration_since(*first).as_secs() as usize;
        if counts.len() <= second {
            counts.resize(second + 1, 0);
        }
        counts[second] += 1;
    }
    counts
}

/// Calls per second over `times` from `from` to `to`.
fn rate_between(times: &[Instant], from: Instant, to: Instant) -> f64 {
    let calls = times.iter().filter(|t| **t >= from && **t < to).count();
    calls as f64 / to.duration_since(from).as_secs_f64()
}

#[tokio::test(flavor = "multi_thread")]
async fn replicas_share_one_rate_and_take_up_a_dead_ones_share() {
    const RATE: usize = 50;
    helpers::init_logs();
    let env = TestEnv::new().await;
    helpers::migrate(&env.database_url).await;
    let db = helpers::Db::connect(&env.database_url).await;
    add_school(&db).await;
    let stub = TwilioStub::start().await;
    let rate = [("SMSGW_RATE_LIMIT", RATE.to_string())];
    let mut replicas: Vec<(Daemon, u16)> = (0..3).map(|_| replica(&env, &stub, &rate)).collect();
    for (daemon, port) in &mut replicas {
        wait_ready(*port, daemon).await;
    }

    let jobs = 1_200;
    let ids = publish_reminders(&env.amqp_url, jobs).await;
    while stub.requests().len() < RATE * 8 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let killed_at = Instant::now();
    let (mut victim, _) = replicas.remove(0);
    victim.signal("KILL");
    victim.wait_exit(Duration::from_secs(10));

    assert_eq!(unsent(&db, &ids, Duration::from_secs(120)).await, 0);
    assert!(stub.texted_twice().is_empty(), "{:?}", stub.texted_twice());
    let times: Vec<Instant> = stub.requests().iter().map(|r| r.at).collect();
    let busiest = busiest_second(times.clone());
    let seconds = per_second(&times);
    assert!(
        busiest <= RATE,
        "{busiest} calls in one second at a shared rate of {RATE}; by second: {seconds:?}"
    );
    let first = times.iter().min().copied().expect("calls");
    // Until the last few, which wait for the killed replica's messages to come back.
    let mut sorted = times.clone();
    sorted.sort();
    let busy_until = sorted[sorted.len() - RATE];
    let before = rate_between(&times, first + Duration::from_secs(1), killed_at);
    let after = rate_between(&times, killed_at + Duration::from_secs(2), busy_until);
    let floor = RATE as f64 * 0.95;
    assert!(
        before >= floor,
        "three replicas used {before:.1}/s of {RATE}/s"
    );
    assert!(
        after >= floor,
        "two replicas used {after:.1}/s of {RATE}/s after a third died"
    );
}
