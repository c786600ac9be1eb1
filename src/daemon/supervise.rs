//! Supervision: the store's connect loop, the broker sessions (reconnecting from the next
//! node when one is lost), and the drain when told to stop.

use std::{sync::Arc, time::Duration};

use tokio::task::JoinSet;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{
    DaemonError,
    lanes::{Handler, run_lane},
    reconnect_backoff,
};
use crate::{
    broker::{Broker, BrokerEvent, LaneConsumer, NodeCursor},
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

enum SessionEnd {
    Stopped(Vec<LaneConsumer>),
    Lost(String),
}

impl Worker<'_> {
    /// Connects, declares, consumes; reconnects with backoff whenever the broker is lost.
    pub(super) async fn consume_until_stopped(
        &self,
        shutdown: &CancellationToken,
    ) -> Result<Option<Stopped>, DaemonError> {
        let mut backoff = reconnect_backoff();
        let name = format!(
            "smsgw {} pid {}",
            env!("CARGO_PKG_VERSION"),
            std::process::id()
        );
        // Where the next connection starts in the node list: past the node of the last
        // one, so that a node that went away, or took the connection but could not declare
        // the queues, is tried last.
        let mut cursor = NodeCursor::default();
        while !shutdown.is_cancelled() {
            let connected = async {
                let broker = Broker::connect_from(&self.settings.broker, cursor, &name).await?;
                cursor.connected_to(broker.node_index());
                broker.declare_topology().await?;
                Ok::<_, crate::broker::BrokerError>(broker)
            }
            .await;
            let broker = match connected {
                Ok(broker) => broker,
                Err(e @ crate::broker::BrokerError::BadUrl) => {
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
                        broker = %self.settings.broker.url.redacted(),
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
            self.health.set_broker(true);
            tracing::info!(broker = %broker.node(), "broker connected; consuming");
            backoff = reconnect_backoff();
            match self.session(&broker, shutdown).await {
                SessionEnd::Stopped(consumers) => {
                    return Ok(Some(Stopped { broker, consumers }));
                }
                SessionEnd::Lost(reason) => {
                    self.health.set_broker(false);
                    crate::systemd::status("broker connection lost; reconnecting");
                    tracing::warn!(reason = %reason, "lost the broker; reconnecting");
                    broker.close().await;
                }
            }
        }
        Ok(None)
    }

    async fn session(&self, broker: &Broker, shutdown: &CancellationToken) -> SessionEnd {
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
        self.tracker.close();
        let in_flight = self.tracker.len();
        if in_flight > 0 {
            tracing::info!(in_flight, "finishing in-flight messages");
        }
        if tokio::time::timeout(self.settings.lanes.shutdown_grace, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                left = self.tracker.len(),
                "grace period over; leaving the rest to the broker"
            );
            self.abandon.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(2), self.tracker.wait()).await;
        }
        if let Some(Some(stopped)) = stopped {
            for consumer in &stopped.consumers {
                consumer.close().await;
            }
            stopped.broker.close().await;
        }
    }
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
