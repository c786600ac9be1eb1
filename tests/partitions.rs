//! Silent partitions: the network between smsgw and PostgreSQL goes quiet without closing
//! anything (a firewall or NAT losing its state, a load balancer's idle timeout), mid-run
//! with jobs and events flowing, then heals. The proxy each test owns goes silent; the
//! shared services are never touched.
//!
//! The promise: every job is sent once and none is lost, every committed status change
//! has its event, and new jobs flow again within [`RECOVERY`] of the healing.

mod helpers;

use std::time::{Duration, Instant};

use helpers::{
    Reply,
    events::{EventTap, assert_events_match_log},
    spawn_app_behind_proxies,
};

const SCHOOL: i64 = 42;
/// The daemon's database timeout in these tests: a statement's bound on the server; the
/// daemon waits 2 s more, and the server ends a session idle in a transaction after 4 s.
const DATABASE_TIMEOUT: &str = "2s";
/// Longer than every bound above, so the daemon has given up on every connection it had.
const SILENCE: Duration = Duration::from_secs(8);
/// From the healing to a new job sent: a try already under way on a connection from
/// before (a connection 2 s, a statement 4 s at most), the pipeline's back-off between
/// tries (5 s at most, 10 s with its jitter), and the next try.
const RECOVERY: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread")]
async fn a_database_link_gone_silent_is_replaced_and_nothing_is_lost() {
    // Every call leases its slot from the rate clock in the database, so a lease is
    // caught on a connection that goes silent, holding the clock's lock for its gateway.
    let overrides = [
        ("SMSGW_DATABASE_TIMEOUT", DATABASE_TIMEOUT),
        ("SMSGW_RATE_LIMIT", "300"),
    ];
    let app = spawn_app_behind_proxies(&overrides, false, true).await;
    let proxy = app.db_proxy.clone().expect("proxy");
    app.add_school(SCHOOL, "GB").await;
    let mut tap = EventTap::bind(&app.env.amqp_url, "#").await;
    app.stub.reply_always(Reply::Slow(Duration::from_millis(5)));
    let started = Instant::now();
    let mut ids = app.publish_many(300, "booking_reminder", SCHOOL).await;
    while app.stub.requests().len() < 30 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // The connections the daemon holds, its relay's transaction and advisory lock among
    // them, stay silent for good: their state is gone from the path.
    proxy.silence();
    ids.extend(app.publish_many(50, "booking_reminder", SCHOOL).await);
    tokio::time::sleep(SILENCE).await;
    proxy.heal_forgetting();
    let healed = Instant::now();

    let next = app.publish_many(1, "booking_reminder", SCHOOL).await;
    let missing = app.wait_all(&next, "sent", RECOVERY).await;
    let recovered = healed.elapsed();
    assert_eq!(
        missing, 0,
        "no new job sent within {RECOVERY:?} of the healing"
    );
    ids.extend(next);
    let lost = app.wait_all(&ids, "sent", Duration::from_secs(30)).await;
    let duplicates = app.stub.texted_twice().len();
    tap.drain(&app.db, Duration::from_secs(20)).await;
    let copies = assert_events_match_log(&tap, &app.db).await;
    helpers::report(
        "database link silent, state lost",
        ids.len(),
        &format!("1 silence of {SILENCE:?}; sending again {recovered:.1?} after"),
        lost,
        duplicates,
        started.elapsed(),
    );
    println!("events published again: {copies}");
    assert_eq!((lost, duplicates), (0, 0), "lost, texted twice");
    app.assert_every_call_recorded().await;
    proxy.cut();
}
