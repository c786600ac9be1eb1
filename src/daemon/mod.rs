//! The daemon: wires the store, the broker and the pipeline, keeps the broker connection
//! alive, and shuts down without losing a message.
//!
//! Shutdown, in order: stop taking deliveries (cancel the consumers), let in-flight messages
//! finish within `SMSGW_SHUTDOWN_GRACE`, settle every delivery, close the channels, then the
//! connection. Whatever could not finish is left unsettled and the broker delivers it again.
//!
//! - this file: wiring, the HTTP server's life, the background tasks;
//! - `supervise`: connecting the store, the broker sessions and their reconnection, the
//!   drain at shutdown, the watchers of a session;
//! - `lanes`: taking deliveries from a lane and handling each, up to its settlement.

mod lanes;
mod supervise;

use std::{sync::Arc, time::Duration};

use backon::BackoffBuilder;
use tokio::{net::TcpListener, sync::watch};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use self::supervise::{Worker, connect_store};
use crate::{
    cache::PolicyCache,
    callbacks::{Callbacks, post_inbox_receipts},
    config::Settings,
    health::Health,
    http,
    metrics::Metrics,
    pipeline::{FanoutTurns, Pipeline, PipelineSettings},
    provider::Gateways,
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
