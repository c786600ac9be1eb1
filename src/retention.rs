//! Retention: removes message bodies (and, when configured, whole rows) past their age, in
//! small batches with pauses between them, so it never holds up sending.

use std::{sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;

use crate::{config::Settings, http::metrics::Metrics, retry::pause, store::Store};

/// Rows per statement: small enough that each is a short transaction.
const BATCH: i64 = 500;
/// Pause between two batches of one pass.
const BREATHER: Duration = Duration::from_millis(50);

#[derive(Debug, Clone)]
pub struct RetentionSettings {
    pub body_retention: Duration,
    pub log_retention: Option<Duration>,
    pub interval: Duration,
}

impl From<&Settings> for RetentionSettings {
    fn from(settings: &Settings) -> Self {
        RetentionSettings {
            body_retention: settings.body_retention,
            log_retention: settings.log_retention,
            interval: settings.retention_interval,
        }
    }
}

/// Runs a pass at start and then every `interval`, until `stop` fires.
pub async fn run(
    store: Store,
    settings: RetentionSettings,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    loop {
        if let Err(e) = pass(&store, &settings, &metrics, &stop).await {
            tracing::warn!(error = %e, "retention pass failed; trying again next time");
        }
        if pause(settings.interval, &stop).await {
            return;
        }
    }
}

async fn pass(
    store: &Store,
    settings: &RetentionSettings,
    metrics: &Metrics,
    stop: &CancellationToken,
) -> Result<(), crate::store::StoreError> {
    let mut purged = 0;
    loop {
        let n = store.purge_bodies(settings.body_retention, BATCH).await?;
        purged += n;
        metrics.bodies_purged.inc_by(n);
        if n < BATCH as u64 || pause(BREATHER, stop).await {
            break;
        }
    }
    let mut deleted = 0;
    if let Some(age) = settings.log_retention {
        loop {
            let n = store.delete_messages(age, BATCH).await?;
            deleted += n;
            metrics.messages_deleted.inc_by(n);
            if n < BATCH as u64 || pause(BREATHER, stop).await {
                break;
            }
        }
    }
    if purged > 0 || deleted > 0 {
        tracing::info!(
            bodies_purged = purged,
            messages_deleted = deleted,
            "retention pass"
        );
    }
    Ok(())
}
