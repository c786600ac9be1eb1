//! Supervision: the store's connect loop, the broker sessions (reconnecting from the next
//! node when one is lost), and the drain when told to stop.
//!
//! The reconnecting loop sees the broker through the small [`Sessions`] trait, and the
//! drain is handed the closing as a future, so that both are unit-tested with a scripted
//! cluster and plain tasks, no broker needed.

use std::{sync::Arc, time::Duration};

use tokio::task::JoinSet;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{
    DaemonError,
    lanes::{Handler, run_lane},
    reconnect_backoff,
};
use crate::{
    broker::{Broker, BrokerError, BrokerEvent, LaneConsumer, NodeCursor},
    config::{Environment, Settings},
    health::Health,
    job::Lane,
    metrics::Metrics,
    pipeline::{FanoutTurns, Pipeline},
    retry::pause,
    store::Store,
};

/// Connects to PostgreSQL, retrying until it answers or `shutdown` fires (`Ok(None)`).
/// Development creates and migrates the database; elsewhere the schema must be current.
pub(super) async fn connect_store(
    settings: &Settings,
    shutdown: &CancellationToken,
) -> Result<Option<Store>, DaemonError> {
    let mut backoff = reconnect_backoff();
    let development = settings.env == Environment::Development;
    loop {
        let attempt = async {
            if development {
                Store::create_database_if_missing(settings.store.url.expose()).await?;
            }
            Store::connect_with_events(
                settings.store.url.expose(),
                16,
                settings.events.on,
                settings.store.timeout,
            )
            .await
        };
        match attempt.await {
            Ok(store) => {
                if development {
                    let locks = settings.store.migrate_lock_timeout;
                    store.migrate_waiting_for_locks(locks).await.map_err(|e| {
                        DaemonError::Runtime(format!("database migration failed: {e}"))
                    })?;
                } else {
                    let have = store
                        .schema_version()
                        .await
                        .map_err(|e| DaemonError::Runtime(e.to_string()))?;
                    let need = Store::latest_migration();
                    if have < need {
                        return Err(DaemonError::Runtime(format!(
                            "the database schema is at version {have}, this build needs {need}: \
                             run `smsgw migrate` first"
                        )));
                    }
                    if have > need {
                        tracing::info!(
                            database_version = have,
                            build_version = need,
                            "the schema is newer than this build (a later version migrated \
                             it); migrations only add, so this build runs on it"
                        );
                    }
                }
                tracing::info!(database = %settings.store.url.redacted(), "database ready");
                return Ok(Some(store));
            }
            Err(e) => {
                let wait = backoff.next().unwrap_or(Duration::from_secs(10));
                tracing::warn!(
                    database = %settings.store.url.redacted(),
                    error = %e,
                    retry_in = ?wait,
                    "database unavailable"
                );
                crate::systemd::status("waiting for the database");
                if pause(wait, shutdown).await {
                    return Ok(None);
                }
            }
        }
    }
}

/// The consuming side of the daemon.
pub(super) struct Worker<'a> {
    pub(super) settings: &'a Settings,
    pub(super) pipeline: Arc<Pipeline>,
    pub(super) health: Arc<Health>,
    pub(super) metrics: Arc<Metrics>,
    /// Every in-flight message, across broker sessions.
    pub(super) tracker: TaskTracker,
    /// Fires when shutdown stops waiting for in-flight messages.
    pub(super) abandon: CancellationToken,
    pub(super) default_provider: &'static str,
    /// Shared by the lanes: how many large jobs are decoded and fanned out at once.
    pub(super) turns: FanoutTurns,
}

/// A broker session that ended because we were told to stop; its channels are still open
/// so the in-flight messages can be settled on them.
pub(super) struct Stopped {
    broker: Broker,
    consumers: Vec<LaneConsumer>,
}

/// How a session ended; `Stopped` holds what it keeps open for the drain.
enum SessionEnd<K> {
    Stopped(K),
    Lost(String),
}

/// The broker sessions, apart from the reconnecting around them.
trait Sessions {
    /// One connection to one node.
    type Session;
    /// What a stopped session keeps open (its consumers) for the drain to settle on.
    type Kept;
    /// Connects to the first node that answers, trying them from `cursor`'s on.
    async fn connect(&self, cursor: NodeCursor) -> Result<Self::Session, BrokerError>;
    /// The place in the node list of the node `session` went to.
    fn node_index(session: &Self::Session) -> usize;
    /// Declares the queues and exchanges on `session`.
    async fn declare(&self, session: &Self::Session) -> Result<(), BrokerError>;
    /// Runs the lanes on `session` until one of them ends or `shutdown` fires.
    async fn run(
        &self,
        session: &Self::Session,
        shutdown: &CancellationToken,
    ) -> SessionEnd<Self::Kept>;
    /// Closes a lost session's connection.
    async fn close(&self, session: Self::Session);
    /// The broker's address, its passwords hidden, for the logs.
    fn redacted_url(&self) -> String;
}

struct OnBroker<'a, 'w> {
    worker: &'a Worker<'w>,
    /// The connection's name, as the broker's management shows it.
    name: String,
}

impl Sessions for OnBroker<'_, '_> {
    type Session = Broker;
    type Kept = Vec<LaneConsumer>;

    async fn connect(&self, cursor: NodeCursor) -> Result<Broker, BrokerError> {
        Broker::connect_from(&self.worker.settings.broker, cursor, &self.name).await
    }

    fn node_index(broker: &Broker) -> usize {
        broker.node_index()
    }

    async fn declare(&self, broker: &Broker) -> Result<(), BrokerError> {
        broker.declare_topology().await
    }

    async fn run(
        &self,
        broker: &Broker,
        shutdown: &CancellationToken,
    ) -> SessionEnd<Vec<LaneConsumer>> {
        tracing::info!(broker = %broker.node(), "broker connected; consuming");
        self.worker.session(broker, shutdown).await
    }

    async fn close(&self, broker: Broker) {
        broker.close().await;
    }

    fn redacted_url(&self) -> String {
        self.worker.settings.broker.url.redacted()
    }
}

/// Connects, declares, runs a session; reconnects with backoff whenever the broker is
/// lost. Returns the session that `shutdown` stopped, with what it kept open, or `None`
/// when stopped between sessions.
async fn run_sessions<S: Sessions>(
    sessions: &S,
    health: &Health,
    shutdown: &CancellationToken,
) -> Result<Option<(S::Session, S::Kept)>, DaemonError> {
    let mut backoff = reconnect_backoff();
    // Where the next connection starts in the node list: past the node of the last
    // one, so that a node that went away, or took the connection but could not declare
    // the queues, is tried last.
    let mut cursor = NodeCursor::default();
    while !shutdown.is_cancelled() {
        let connected = async {
            let session = sessions.connect(cursor).await?;
            cursor.connected_to(S::node_index(&session));
            sessions.declare(&session).await?;
            Ok::<_, BrokerError>(session)
        }
        .await;
        let session = match connected {
            Ok(session) => session,
            Err(e @ BrokerError::BadUrl) => {
                return Err(DaemonError::Config(format!("SMSGW_AMQP_URL: {e}")));
            }
            Err(e) if e.is_precondition_failed() => {
                return Err(DaemonError::Runtime(format!(
                    "the broker's queues do not match this configuration ({e}); \
                     see the README on changing queue arguments"
                )));
            }
            Err(e) => {
                let wait = backoff.next().unwrap_or(Duration::from_secs(10));
                tracing::warn!(
                    broker = %sessions.redacted_url(),
                    error = %e,
                    retry_in = ?wait,
                    "broker unavailable"
                );
                crate::systemd::status("waiting for the broker");
                if pause(wait, shutdown).await {
                    break;
                }
                continue;
            }
        };
        health.set_broker(true);
        backoff = reconnect_backoff();
        match sessions.run(&session, shutdown).await {
            SessionEnd::Stopped(kept) => return Ok(Some((session, kept))),
            SessionEnd::Lost(reason) => {
                health.set_broker(false);
                crate::systemd::status("broker connection lost; reconnecting");
                tracing::warn!(reason = %reason, "lost the broker; reconnecting");
                sessions.close(session).await;
            }
        }
    }
    Ok(None)
}

impl Worker<'_> {
    /// Connects, declares, consumes; reconnects with backoff whenever the broker is lost.
    pub(super) async fn consume_until_stopped(
        &self,
        shutdown: &CancellationToken,
    ) -> Result<Option<Stopped>, DaemonError> {
        let name = format!(
            "smsgw {} pid {}",
            env!("CARGO_PKG_VERSION"),
            std::process::id()
        );
        let on = OnBroker { worker: self, name };
        let stopped = run_sessions(&on, &self.health, shutdown).await?;
        Ok(stopped.map(|(broker, consumers)| Stopped { broker, consumers }))
    }

    async fn session(
        &self,
        broker: &Broker,
        shutdown: &CancellationToken,
    ) -> SessionEnd<Vec<LaneConsumer>> {
        let mut consumers = Vec::new();
        for lane in Lane::ALL {
            match broker.consume(lane, self.settings.lanes.budget(lane)).await {
                Ok(consumer) => consumers.push(consumer),
                Err(e) => {
                    return SessionEnd::Lost(format!("cannot consume {}: {e}", lane.as_str()));
                }
            }
        }
        self.health.set_consumers(consumers.len());
        crate::systemd::ready("consuming");

        let stop = shutdown.child_token();
        let depths = tokio::spawn(watch_queue_depths(
            broker.clone(),
            self.metrics.clone(),
            stop.clone(),
        ));
        let watcher = tokio::spawn(watch_events(
            broker.clone(),
            self.health.clone(),
            stop.clone(),
        ));
        let pruning = tokio::spawn(crate::retention::prune_dead_letters(
            broker.clone(),
            self.settings.retention.clone(),
            self.metrics.clone(),
            stop.clone(),
        ));
        let mut lanes = JoinSet::new();
        for consumer in consumers {
            lanes.spawn(run_lane(
                consumer,
                Handler {
                    pipeline: self.pipeline.clone(),
                    broker: broker.clone(),
                    metrics: self.metrics.clone(),
                    abandon: self.abandon.clone(),
                    default_provider: self.default_provider,
                    turns: self.turns.clone(),
                },
                self.tracker.clone(),
                stop.clone(),
            ));
        }
        let mut lost = None;
        let mut kept = Vec::new();
        while let Some(ended) = lanes.join_next().await {
            // The first lane to end ends the session: stop the others too.
            stop.cancel();
            match ended {
                Ok((consumer, None)) => kept.push(consumer),
                Ok((_, Some(reason))) => {
                    lost.get_or_insert(reason);
                }
                Err(e) => {
                    lost.get_or_insert(format!("lane task failed: {e}"));
                }
            }
        }
        self.health.set_consumers(0);
        watcher.abort();
        depths.abort();
        // Letters a pass held go back to their places when the connection closes.
        pruning.abort();
        self.health.set_blocked(false);
        match lost {
            Some(reason) if !shutdown.is_cancelled() => SessionEnd::Lost(reason),
            _ => SessionEnd::Stopped(kept),
        }
    }

    /// Waits for in-flight messages (up to the grace period), then closes the channels
    /// and the connection.
    pub(super) async fn drain(&self, stopped: Option<&Option<Stopped>>) {
        crate::systemd::stopping();
        let close = async {
            if let Some(Some(stopped)) = stopped {
                for consumer in &stopped.consumers {
                    consumer.close().await;
                }
                stopped.broker.close().await;
            }
        };
        let grace = self.settings.lanes.shutdown_grace;
        drain(&self.tracker, grace, &self.abandon, close).await;
    }
}

/// Waits for the tasks of `tracker` up to `grace`, then fires `abandon` and waits a
/// little more for them to give up; then runs `close`, so that what finished in time
/// is settled on channels still open.
async fn drain(
    tracker: &TaskTracker,
    grace: Duration,
    abandon: &CancellationToken,
    close: impl Future<Output = ()>,
) {
    tracker.close();
    let in_flight = tracker.len();
    if in_flight > 0 {
        tracing::info!(in_flight, "finishing in-flight messages");
    }
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!(
            left = tracker.len(),
            "grace period over; leaving the rest to the broker"
        );
        abandon.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(2), tracker.wait()).await;
    }
    close.await;
}

/// Follows the broker's resource alarms: a blocked connection takes no publishes, so the
/// daemon is not ready while it lasts.
async fn watch_events(broker: Broker, health: Arc<Health>, stop: CancellationToken) {
    use futures_util::StreamExt;
    let mut events = std::pin::pin!(broker.events());
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            event = events.next() => match event {
                Some(BrokerEvent::Blocked(reason)) => {
                    tracing::warn!(reason = %reason, "the broker blocked the connection (resource alarm): not ready");
                    health.set_blocked(true);
                }
                Some(BrokerEvent::Unblocked) => {
                    tracing::info!("the broker unblocked the connection");
                    health.set_blocked(false);
                }
                None => break,
            }
        }
    }
    health.set_blocked(false);
}

/// Reads the queues' depths into `/metrics` every few seconds (the lag behind the web app).
async fn watch_queue_depths(broker: Broker, metrics: Arc<Metrics>, stop: CancellationToken) {
    loop {
        match broker.queue_depths().await {
            Ok(depths) => {
                for (queue, depth) in depths {
                    metrics
                        .queue_depth
                        .get_or_create(&crate::metrics::QueueLabels { queue })
                        .set(i64::from(depth));
                }
            }
            Err(e) => tracing::debug!(error = %e, "could not read queue depths"),
        }
        if pause(Duration::from_secs(5), &stop).await {
            return;
        }
    }
}

#[cfg(test)]
#[path = "supervise_tests.rs"]
mod tests;
