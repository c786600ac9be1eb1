//! Accepting connections: HTTP/1 through hyper, with the limits that keep slow or idle
//! clients from holding the daemon's file descriptors and memory.
//!
//! - A client must send a request's headers within `header_timeout`, or its connection is
//!   closed. Hyper's HTTP/1 runs this timer whenever the connection waits for a request,
//!   so it is also how long an idle keep-alive connection is kept.
//! - Once the headers are in, the request (its body included) has the router's time limit.
//! - At most `max_connections` are open at once. The next connection waits in the
//!   kernel's listen backlog, costing the daemon nothing, until one closes; since every
//!   connection's life is bounded by the limits above, that is seconds at most. Waiting
//!   rather than refusing: a burst of receipts (Twilio does not send a status callback
//!   again) or a health probe is served a moment late instead of failed.

use std::{sync::Arc, time::Duration};

use axum::Router;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::graceful::GracefulShutdown,
    service::TowerToHyperService,
};
use tokio::{net::TcpListener, sync::Semaphore};
use tokio_util::sync::CancellationToken;

use crate::config::HttpLimits;

/// Longest the server waits, at shutdown, for requests under way to be answered.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Pause after a failed accept that is not about one connection (out of file
/// descriptors, say), so the loop does not spin.
const ACCEPT_PAUSE: Duration = Duration::from_secs(1);

/// Serves `app` on `listener` until `shutdown` fires, then lets requests under way finish.
pub(super) async fn run(
    listener: TcpListener,
    app: Router,
    limits: HttpLimits,
    shutdown: CancellationToken,
) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    loop {
        let accepted = tokio::select! {
            accepted = accept(&listener, &slots) => accepted,
            () = shutdown.cancelled() => break,
        };
        let Some((stream, slot)) = accepted else {
            continue;
        };
        let connection =
            http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "HTTP connection ended");
            }
            drop(slot);
        });
    }
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::debug!("HTTP connections still open at shutdown; closing them");
    }
}

/// The next connection, once a slot is free; `None` when accepting it failed.
async fn accept(
    listener: &TcpListener,
    slots: &Arc<Semaphore>,
) -> Option<(tokio::net::TcpStream, tokio::sync::OwnedSemaphorePermit)> {
    // The semaphore is never closed, so this waits for a slot rather than failing.
    let slot = slots.clone().acquire_owned().await.ok()?;
    match listener.accept().await {
        Ok((stream, _)) => Some((stream, slot)),
        Err(e) if is_connection_error(&e) => None,
        Err(e) => {
            tracing::warn!(error = %e, "cannot accept HTTP connections; pausing");
            tokio::time::sleep(ACCEPT_PAUSE).await;
            None
        }
    }
}

/// An error about the one connection being accepted (gone before it was accepted).
fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionRefused | ConnectionReset
    )
}
