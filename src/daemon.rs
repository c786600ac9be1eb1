//! The daemon: wires the store, the broker and the pipeline, keeps the broker connection
//! alive, and shuts down without losing a message.
//!
//! Shutdown, in order: stop taking deliveries (cancel the consumers), let in-flight messages
//! finish within `SMSGW_SHUTDOWN_GRACE`, settle every delivery, close the channels, then the
//! connection. Whatever could not finish is left unsettled and the broker delivers it again.

use std::{panic::AssertUnwindSafe, sync::Arc, time::Duration};

use backon::BackoffBuilder;
use futures_util::FutureExt;
use tokio::{net::TcpListener, sync::watch, task::JoinSet};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    broker::{Broker, BrokerEvent, Incoming, LaneConsumer, NodeCursor},
    cache::PolicyCache,
    callbacks::{Callbacks, post_inbox_receipts},
    config::{Environment, Settings},
    disposition::Disposition,
    health::Health,
    http,
    job::Lane,
    metrics::{LaneLabels, Metrics, ReasonLabels},
    pipeline::{FanoutTurns, Pipeline, PipelineSettings},
    provider::Gateways,
    retry::pause,
    store::Store,
};

/// Why the daemon stopped with an error. Configuration errors exit 2, the rest 1.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("configuration: {0}")]
    Config(String),
    #[error("{0}")]
    Runtime(String),
}

fn reconnect_backoff() -> impl Iterator<Item = Duration> {
    crate::retry::reconnecting().build()
}

/// What the daemon's parts share for its whole life.
struct Shared {
    settings: Settings,
    gateways: Arc<Gateways>,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
}

/// Runs the daemon until `shutdown` fires, then drains and returns.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> Result<(), DaemonError> {
    let (store_tx, store_rx) = watch::channel(None);
    let gateways = Gateways::shared(&settings, store_rx.clone())
        .map_err(|e| DaemonError::Config(e.to_string()))?;
    tracing::info!("{}", settings.destination_summary());
    let metrics = Metrics::new();
    metrics.start_providers_at_zero(gateways.names());
    let shared = Shared {
        settings,
        gateways: Arc::new(gateways),
        health: Arc::new(Health::default()),
        metrics: Arc::new(metrics),
    };
    let http = Http::start(&shared, store_rx).await?;
    let result = serve_jobs(&shared, &store_tx, &shutdown).await;
    http.stop().await;
    match &result {
        Ok(()) => tracing::info!("stopped"),
        Err(e) => tracing::error!(error = %e, "stopped with an error"),
    }
    result
}

/// The HTTP server and the systemd watchdog, up from the start to the end, so that
/// health shows what the daemon is waiting for.
struct Http {
    stop: CancellationToken,
    server: tokio::task::JoinHandle<()>,
    watchdog: tokio::task::JoinHandle<()>,
    /// The development inbox's simulated receipts (nothing without an inbox provider).
    inbox_receipts: tokio::task::JoinHandle<()>,
}

impl Http {
    async fn start(
        shared: &Shared,
        store: watch::Receiver<Option<Store>>,
    ) -> Result<Http, DaemonError> {
        let address = shared.settings.http.addr;
        let listener = TcpListener::bind(address)
            .await
            .map_err(|e| DaemonError::Runtime(format!("cannot listen on {address}: {e}")))?;
        tracing::info!(address = %address, "health endpoints listening");
        let stop = CancellationToken::new();
        let callbacks = Callbacks {
            gateways: shared.gateways.clone(),
            store,
            metrics: shared.metrics.clone(),
            inbound: shared.settings.inbound.clone(),
        };
        let hooks = http::webhooks::Webhooks {
            callbacks: callbacks.clone(),
            public_url: shared.settings.http.public_url.clone(),
        };
        let health = shared.health.clone();
        Ok(Http {
            server: tokio::spawn(http::serve(
                listener,
                health,
                hooks,
                shared.settings.http.clone(),
                stop.clone(),
            )),
            watchdog: tokio::spawn(crate::systemd::watchdog(stop.clone())),
            inbox_receipts: tokio::spawn(post_inbox_receipts(callbacks, stop.clone())),
            stop,
        })
    }

    async fn stop(self) {
        self.stop.cancel();
        let _ = self.server.await;
        let _ = self.watchdog.await;
        let _ = self.inbox_receipts.await;
    }
}

/// Connects the store, starts the background tasks, consumes until `shutdown`, drains.
async fn serve_jobs(
    shared: &Shared,
    store_tx: &watch::Sender<Option<Store>>,
    shutdown: &CancellationToken,
) -> Result<(), DaemonError> {
    let settings = &shared.settings;
    let Some(store) = connect_store(settings, shutdown).await? else {
        return Ok(());
    };
    let store = store
        .keep_bodies(settings.retention.keep_body)
        .with_recorder();
    shared.health.set_database(true);
    let _ = store_tx.send(Some(store.clone()));
    let background = CancellationToken::new();
    let retention = tokio::spawn(crate::retention::run(
        store.clone(),
        settings.retention.clone(),
        settings.schedule.withdraw_window,
        shared.metrics.clone(),
        background.clone(),
    ));
    let overdue = tokio::spawn(crate::overdue::run(
        store.clone(),
        crate::overdue::Overdue::from(settings),
        shared.metrics.clone(),
        background.clone(),
    ));
    let relay = tokio::spawn(event_relay(shared, &store).run(background.clone()));
    let consumed = async {
        check_school_providers(&store, &shared.gateways, shutdown).await?;
        let Some(cache) = load_cache(&store, shutdown).await else {
            return Ok(());
        };
        let listener = crate::cache::listen(cache.clone(), store.clone(), background.clone());
        let cache_task = tokio::spawn(listener);
        let result = consume(shared, store.clone(), cache, shutdown).await;
        background.cancel();
        let _ = cache_task.await;
        result
    }
    .await;
    background.cancel();
    let _ = retention.await;
    let _ = overdue.await;
    let _ = relay.await;
    store.close().await;
    consumed
}

fn event_relay(shared: &Shared, store: &Store) -> crate::events::Relay {
    let settings = &shared.settings;
    crate::events::Relay {
        store: store.clone(),
        broker: settings.broker.clone(),
        events: settings.events,
        metrics: shared.metrics.clone(),
        health: shared.health.clone(),
    }
}

/// The schools' settings, read before the first message; `None` when stopped meanwhile.
async fn load_cache(store: &Store, shutdown: &CancellationToken) -> Option<PolicyCache> {
    let cache = PolicyCache::default();
    let loaded = crate::retry::until_ok(
        crate::retry::reconnecting(),
        shutdown,
        || cache.reload(store),
        |e, wait| tracing::warn!(error = %e, retry_in = ?wait, "cannot load the schools' settings; retrying"),
    )
    .await;
    loaded.map(|()| cache)
}

/// Builds the pipeline and consumes the lanes until `shutdown`, then drains.
async fn consume(
    shared: &Shared,
    store: Store,
    cache: PolicyCache,
    shutdown: &CancellationToken,
) -> Result<(), DaemonError> {
    // The phone number metadata (some 5,000 patterns) is compiled on first use:
    // compile it now, not while the first message after a start waits. On a runtime
    // worker, not a blocking thread: the memory the compiling leaves free is then
    // reused by the messages that worker handles (a blocking thread's would be held
    // apart, about 6 MiB more at the peak).
    let _ = tokio::spawn(async { crate::phone::load_metadata() }).await;
    let pipeline = Pipeline::new(
        store,
        cache,
        shared.gateways.clone(),
        PipelineSettings::from(&shared.settings),
        shared.health.clone(),
        shared.metrics.clone(),
    );
    let worker = Worker {
        settings: &shared.settings,
        pipeline: Arc::new(pipeline),
        health: shared.health.clone(),
        metrics: shared.metrics.clone(),
        tracker: TaskTracker::new(),
        abandon: CancellationToken::new(),
        default_provider: shared.gateways.default_gateway().name,
        turns: FanoutTurns::new(
            shared.settings.lanes.fanout_concurrency,
            shared.settings.lanes.max_job_bytes,
        ),
    };
    let consumed = worker.consume_until_stopped(shutdown).await;
    worker.drain(consumed.as_ref().ok()).await;
    consumed.map(|_| ())
}

/// Refuses to start when a school's settings name a provider that is not configured: a
/// start-up error, not a per-message surprise. (A name written later fails its messages
/// as `unknown_provider`, dead-lettered for replay once fixed.)
async fn check_school_providers(
    store: &Store,
    gateways: &Gateways,
    shutdown: &CancellationToken,
) -> Result<(), DaemonError> {
    let names = crate::retry::until_ok(
        crate::retry::reconnecting(),
        shutdown,
        || store.school_provider_names(),
        |e, wait| tracing::warn!(error = %e, retry_in = ?wait, "cannot read the schools' providers; retrying"),
    )
    .await;
    let Some(names) = names else {
        return Ok(());
    };
    let unknown: Vec<String> = names
        .into_iter()
        .filter(|(name, _)| gateways.get(name).is_none())
        .map(|(name, schools)| format!("'{name}' (schools {schools})"))
        .collect();
    if unknown.is_empty() {
        Ok(())
    } else {
        Err(DaemonError::Config(format!(
            "sms_school_settings names providers that are not configured: {}; configured: {}",
            unknown.join(", "),
            gateways.names().join(", ")
        )))
    }
}

/// Connects to PostgreSQL, retrying until it answers or `shutdown` fires (`Ok(None)`).
/// Development creates and migrates the database; elsewhere the schema must be current.
async fn connect_store(
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
struct Worker<'a> {
    settings: &'a Settings,
    pipeline: Arc<Pipeline>,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    /// Every in-flight message, across broker sessions.
    tracker: TaskTracker,
    /// Fires when shutdown stops waiting for in-flight messages.
    abandon: CancellationToken,
    default_provider: &'static str,
    /// Shared by the lanes: how many large jobs are decoded and fanned out at once.
    turns: FanoutTurns,
}

/// A broker session that ended because we were told to stop; its channels are still open
/// so the in-flight messages can be settled on them.
struct Stopped {
    broker: Broker,
    consumers: Vec<LaneConsumer>,
}

enum SessionEnd {
    Stopped(Vec<LaneConsumer>),
    Lost(String),
}

impl Worker<'_> {
    /// Connects, declares, consumes; reconnects with backoff whenever the broker is lost.
    async fn consume_until_stopped(
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
    async fn drain(&self, stopped: Option<&Option<Stopped>>) {
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

/// Takes deliveries from one lane until stopped or the channel fails. Returns the consumer
/// (kept open so in-flight deliveries can still be acked) and why it ended, if not stopped.
async fn run_lane(
    mut consumer: LaneConsumer,
    handler: Handler,
    tracker: TaskTracker,
    stop: CancellationToken,
) -> (LaneConsumer, Option<String>) {
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => {
                if let Err(e) = consumer.cancel().await {
                    tracing::debug!(error = %e, "cancelling the consumer failed");
                }
                return (consumer, None);
            }
            next = consumer.next() => match next {
                Some(Ok(incoming)) => {
                    tracker.spawn(handler.clone().process(incoming));
                }
                Some(Err(e)) => return (consumer, Some(e.to_string())),
                None => {
                    let lane = consumer.lane.as_str();
                    return (consumer, Some(format!("the {lane} consumer was cancelled by the broker")));
                }
            }
        }
    }
}

/// What each delivery task needs.
#[derive(Clone)]
struct Handler {
    pipeline: Arc<Pipeline>,
    broker: Broker,
    metrics: Arc<Metrics>,
    abandon: CancellationToken,
    /// Labels the metrics of what belongs to no provider yet.
    default_provider: &'static str,
    turns: FanoutTurns,
}

impl Handler {
    /// Handles one delivery and settles it. A panic in the pipeline gives the delivery back
    /// with a reject, which counts toward the lane's delivery limit: a message that keeps
    /// failing this way ends in `sms.dead`.
    async fn process(self, incoming: Incoming) {
        let lane = LaneLabels {
            lane: incoming.delivery.lane.as_str(),
        };
        let in_flight = self.metrics.in_flight.get_or_create(&lane).clone();
        in_flight.inc();
        // Held until the delivery is settled; given up (the delivery left unsettled, for
        // the broker to deliver again) when shutdown stops waiting.
        let _turn = tokio::select! {
            turn = self.turns.take(&incoming.delivery) => turn,
            () = self.abandon.cancelled() => {
                in_flight.dec();
                return;
            }
        };
        let handled = AssertUnwindSafe(self.pipeline.handle(&incoming.delivery, &self.abandon))
            .catch_unwind()
            .await;
        let disposition = handled.unwrap_or_else(|_| {
            tracing::error!(
                lane = lane.lane,
                "the pipeline panicked; message given back"
            );
            Disposition::Requeue
        });
        self.count(&lane, &disposition);
        let fanned_out = match &disposition {
            Disposition::FanOut {
                kind,
                messages,
                rest,
                ..
            } => Some((*kind, messages.len(), rest.is_some())),
            _ => None,
        };
        let settled = self
            .broker
            .settle_retrying(&incoming, disposition, &self.abandon)
            .await;
        if let (true, Some((kind, recipients, more))) = (settled, fanned_out) {
            let provider = self.default_provider;
            self.metrics
                .count_message("fanned_out", kind.as_str(), provider);
            tracing::info!(recipients, more_to_come = more, "announcement fanned out");
        }
        in_flight.dec();
    }

    fn count(&self, lane: &LaneLabels, disposition: &Disposition) {
        match disposition {
            Disposition::Retry { .. } => {
                self.metrics.retries.get_or_create(lane).inc();
            }
            Disposition::DeadLetter { reason, .. } => {
                self.metrics
                    .dead_letters
                    .get_or_create(&ReasonLabels {
                        reason: reason.as_str(),
                    })
                    .inc();
            }
            _ => {}
        }
    }
}
