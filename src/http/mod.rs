//! The HTTP surface on `SMSGW_HTTP_ADDR`: liveness, readiness, metrics, the provider
//! webhooks, and the development inbox when its provider is configured (`inbox`). Every
//! request is size- and time-limited, and so are connections (`server`).

use std::{sync::Arc, time::Duration};

use axum::{
    Json, Router,
    extract::{DefaultBodyLimit, State},
    http::StatusCode,
    routing::{get, post},
};
use serde_json::json;
use tokio::{net::TcpListener, sync::watch};
use tokio_util::sync::CancellationToken;
use tower_http::timeout::TimeoutLayer;

mod inbox;
mod server;
pub mod webhooks;

use self::webhooks::Webhooks;
use crate::{config::HttpSettings, health::Health, job::Lane, metrics::Metrics, store::Store};

/// Largest request body: a webhook is a few hundred bytes.
const MAX_BODY_BYTES: usize = 64 * 1024;
/// Longest a request may take once its headers are in, reading its body included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone)]
struct AppState {
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    /// `None` until the database is first reached.
    store: watch::Receiver<Option<Store>>,
}

/// Serves until `shutdown` fires.
pub async fn serve(
    listener: TcpListener,
    health: Arc<Health>,
    hooks: Webhooks,
    settings: HttpSettings,
    shutdown: CancellationToken,
) {
    warn_if_inbox_is_exposed(&listener, &hooks);
    let allowed = inbox::AllowedHosts::new(listener.local_addr().ok(), &settings.inbox_hosts);
    let app = router(health, hooks, allowed);
    server::run(listener, app, settings.limits, shutdown).await;
}

/// Whether a provider is the development inbox: then `/inbox` is served.
fn has_inbox(hooks: &Webhooks) -> bool {
    hooks
        .callbacks
        .gateways
        .all()
        .iter()
        .any(|g| g.provider.inbox().is_some())
}

/// The inbox shows every text, login codes included, to whoever reaches the address.
fn warn_if_inbox_is_exposed(listener: &TcpListener, hooks: &Webhooks) {
    let address = listener.local_addr().ok();
    if has_inbox(hooks) && address.is_some_and(|a| !a.ip().is_loopback()) {
        tracing::warn!(
            address = ?address,
            "the inbox is served on an address other hosts may reach: whoever can reach it reads \
             every text, login codes included"
        );
    }
}

/// Every endpoint, with the limits on each request.
fn router(health: Arc<Health>, hooks: Webhooks, inbox_hosts: inbox::AllowedHosts) -> Router {
    let inbox = has_inbox(&hooks).then(|| {
        let inbox = inbox::Inbox {
            store: hooks.callbacks.store.clone(),
            callbacks: hooks.callbacks.clone(),
        };
        inbox::routes(inbox, inbox_hosts)
    });
    let webhooks = Router::new()
        .route(
            "/webhooks/twilio/status",
            post(webhooks::twilio_status_callback),
        )
        .route("/webhooks/twilio/inbound", post(webhooks::twilio_inbound))
        .route(
            "/webhooks/vonage/status",
            post(webhooks::vonage_status_callback),
        )
        .route("/webhooks/vonage/inbound", post(webhooks::vonage_inbound))
        .with_state(hooks.clone());
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(AppState {
            health,
            metrics: hooks.callbacks.metrics.clone(),
            store: hooks.callbacks.store.clone(),
        })
        .merge(webhooks)
        .merge(inbox.unwrap_or_default())
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            REQUEST_TIMEOUT,
        ))
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn metrics_text(
    State(state): State<AppState>,
) -> ([(axum::http::HeaderName, &'static str); 1], String) {
    // Read at each scrape, so that an alert can see a daemon that is up but not ready.
    let (ready, _) = readiness(&state).await;
    state.metrics.ready.set(i64::from(ready));
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
}

async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<serde_json::Value>) {
    let (ready, parts) = readiness(&state).await;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(parts))
}

/// Whether the daemon can do its work, and what `/readyz` says about each part.
async fn readiness(state: &AppState) -> (bool, serde_json::Value) {
    let store = state.store.borrow().clone();
    let database = match &store {
        Some(store) => tokio::time::timeout(Duration::from_secs(2), store.ping())
            .await
            .unwrap_or(false),
        None => false,
    };
    let broker = state.health.broker();
    let blocked = state.health.blocked();
    let consumers = state.health.consumers();
    let ready = broker && !blocked && database && consumers == Lane::ALL.len();
    let parts = json!({
        "ready": ready,
        "broker": broker,
        "broker_blocked": blocked,
        "consumers": consumers,
        "database": database,
        // Events wait in the outbox while the relay cannot publish: worth an alert, not
        // a reason to stop taking providers' callbacks.
        "events_relay": state.health.events_relay(),
    });
    (ready, parts)
}
