//! Schools' settings, held in memory so that deciding a message costs no query.
//! PostgreSQL announces every change (`LISTEN smsgw_changes`, sent by a trigger on
//! `sms_school_settings`); the cache reloads what changed, so a change takes effect within
//! a second.
//! After the listening connection is lost it reconnects and reloads everything, and it
//! reloads every few minutes anyway, in case a notification went astray (checking then
//! that the listening connection still answers).
//!
//! Opt-outs are not cached: a cached "opted out" would outlive a START sent a moment
//! ago, and a cached "not opted out" would miss a STOP. The statement that starts an
//! attempt reads `sms_opt_outs` itself, so the table is the only authority and it costs
//! no extra query.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use backon::BackoffBuilder;
use tokio_util::sync::CancellationToken;

use crate::{
    school::SchoolSettings,
    store::{Store, StoreError},
};

const CHANNEL: &str = "smsgw_changes";
/// A full reload, however quiet the notifications.
const FULL_RELOAD: Duration = Duration::from_secs(300);

#[derive(Debug, Default)]
struct Data {
    settings: HashMap<i64, Arc<SchoolSettings>>,
}

#[derive(Debug, Clone, Default)]
pub struct PolicyCache {
    data: Arc<RwLock<Data>>,
}

impl PolicyCache {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Data> {
        self.data.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Data> {
        self.data.write().unwrap_or_else(|p| p.into_inner())
    }

    pub fn settings(&self, school_id: i64) -> Option<Arc<SchoolSettings>> {
        self.read().settings.get(&school_id).cloned()
    }

    /// Loads everything.
    pub async fn reload(&self, store: &Store) -> Result<(), StoreError> {
        let settings = store.all_school_settings().await?;
        let mut data = Data::default();
        for s in settings {
            data.settings.insert(s.school_id, Arc::new(s));
        }
        let schools = data.settings.len();
        *self.write() = data;
        tracing::debug!(schools, "school settings loaded");
        Ok(())
    }

    async fn reload_school(&self, store: &Store, school_id: i64) -> Result<(), StoreError> {
        let settings = store.school_settings(school_id).await?;
        let mut data = self.write();
        match settings {
            Some(s) => data.settings.insert(school_id, Arc::new(s)),
            None => data.settings.remove(&school_id),
        };
        Ok(())
    }

    async fn apply(&self, store: &Store, payload: &str) -> Result<(), StoreError> {
        match payload.split_once(':') {
            Some(("settings", id)) => match id.parse() {
                Ok(id) => self.reload_school(store, id).await,
                Err(_) => self.reload(store).await,
            },
            _ => Ok(()),
        }
    }
}

/// Keeps `cache` current until `stop` fires.
pub async fn listen(cache: PolicyCache, store: Store, stop: CancellationToken) {
    let mut waits = crate::retry::reconnecting().build();
    loop {
        let started = Instant::now();
        let Err(e) = follow(&cache, &store, &stop).await else {
            return;
        };
        if started.elapsed() > FULL_RELOAD {
            // It was listening for a while: a new outage starts with short waits again.
            waits = crate::retry::reconnecting().build();
        }
        let wait = waits.next().unwrap_or(FULL_RELOAD);
        tracing::warn!(error = %e, retry_in = ?wait, "settings cache lost its database connection; reconnecting");
        if crate::retry::pause(wait, &stop).await {
            return;
        }
    }
}

/// Listens on a connection of its own and applies each change; returns when `stop`
/// fires, or with the error that ended the connection (whatever was announced from then
/// on is lost: the next connection loads everything again).
async fn follow(
    cache: &PolicyCache,
    store: &Store,
    stop: &CancellationToken,
) -> Result<(), StoreError> {
    let mut listener = store.listen(CHANNEL).await?;
    // Whatever changed while we were not listening.
    cache.reload(store).await?;
    let mut full = tokio::time::interval(FULL_RELOAD);
    full.tick().await;
    loop {
        tokio::select! {
            payload = listener.recv() => cache.apply(store, &payload?).await?,
            _ = full.tick() => {
                listener.check().await?;
                cache.reload(store).await?;
            }
            () = stop.cancelled() => return Ok(()),
        }
    }
}
