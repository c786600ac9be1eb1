//! The HTTP surface on `SMSGW_HTTP_ADDR`: liveness, readiness and metrics.

use std::{sync::Arc, time::Duration};

use axum::{Json, Router, extract::State, http::StatusCode, routing::get};
use serde_json::json;
use tokio::{net::TcpListener, sync::watch};
use tokio_util::sync::CancellationToken;

use crate::{health::Health, job::Lane, metrics::Metrics, store::Store};

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
    metrics: Arc<Metrics>,
    store: watch::Receiver<Option<Store>>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(AppState {
            health,
            metrics,
            store,
        });
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn metrics_text(
    State(state): State<AppState>,
) -> ([(axum::http::HeaderName, &'static str); 1], String) {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
}

async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<serde_json::Value>) {
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
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(json!({
            "ready": ready,
            "broker": broker,
            "broker_blocked": blocked,
            "consumers": consumers,
            "database": database,
        })),
    )
}
