//! Receipts that never come: a message still `sent` `SMSGW_RECEIPT_TIMEOUT` after its
//! provider accepted it becomes `undelivered`, reason `no_receipt`, with its status event,
//! so support can tell a lost text from a delivered one. Only messages of providers that
//! send receipts wait for one. A receipt that comes later still applies.
//!
//! Each look walks the accepted attempts on from where the last one stopped, in short
//! statements of a few hundred rows: it never scans the log, and never holds a message
//! for longer than one statement.

use std::{sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;

use crate::{
    config::{ReceiptWatch, Settings},
    metrics::Metrics,
    retry::pause,
    store::{Store, StoreError},
};

/// Accepted attempts one statement looks at.
const BATCH: i64 = 500;
/// Pause between two statements of one look.
const BREATHER: Duration = Duration::from_millis(20);

/// What the watch needs to know: how long to wait, and for which providers.
#[derive(Debug, Clone)]
pub struct Overdue {
    pub watch: ReceiptWatch,
    /// The configured providers (by name) whose messages get receipts.
    pub providers: Vec<String>,
}

impl From<&Settings> for Overdue {
    fn from(settings: &Settings) -> Self {
        let public_url = settings.http.public_url.is_some();
        Overdue {
            watch: settings.receipts,
            providers: settings
                .delivery
                .providers
                .iter()
                .filter(|p| p.sends_receipts(public_url))
                .map(|p| p.name.clone())
                .collect(),
        }
    }
}

/// Looks for overdue messages now and then every [`ReceiptWatch::pause`] until `stop`.
pub async fn run(store: Store, overdue: Overdue, metrics: Arc<Metrics>, stop: CancellationToken) {
    let Some(timeout) = overdue.watch.timeout else {
        return;
    };
    if overdue.providers.is_empty() {
        return;
    }
    loop {
        match look(&store, timeout, &overdue.providers, &stop).await {
            Ok(given_up) => {
                metrics.receipt_timeouts.inc_by(given_up);
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not look for overdue receipts; trying again later")
            }
        }
        if pause(overdue.watch.pause(), &stop).await {
            return;
        }
    }
}

/// Walks until caught up; returns how many messages it gave up.
async fn look(
    store: &Store,
    timeout: Duration,
    providers: &[String],
    stop: &CancellationToken,
) -> Result<u64, StoreError> {
    let mut given_up = 0;
    loop {
        let walk = store.give_up_on_receipts(timeout, providers, BATCH).await?;
        given_up += walk.given_up;
        if walk.looked < BATCH as u64 || pause(BREATHER, stop).await {
            if given_up > 0 {
                tracing::info!(messages = given_up, "gave up waiting for delivery receipts");
            }
            return Ok(given_up);
        }
    }
}
