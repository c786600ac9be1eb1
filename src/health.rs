//! What `/readyz` reports: shared flags the daemon's parts set as they come and go.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

#[derive(Debug, Default)]
pub struct Health {
    broker: AtomicBool,
    consumers: AtomicUsize,
    database: AtomicBool,
    /// The broker blocked our connection (resource alarm): publishes would hang.
    blocked: AtomicBool,
    /// The events relay can publish; reported, not required for readiness.
    events_relay: AtomicBool,
}

impl Health {
    pub fn set_broker(&self, connected: bool) {
        self.broker.store(connected, Ordering::Relaxed);
    }

    pub fn set_consumers(&self, active: usize) {
        self.consumers.store(active, Ordering::Relaxed);
    }

    pub fn set_database(&self, reachable: bool) {
        self.database.store(reachable, Ordering::Relaxed);
    }

    pub fn set_blocked(&self, blocked: bool) {
        self.blocked.store(blocked, Ordering::Relaxed);
    }

    pub fn set_events_relay(&self, publishing: bool) {
        self.events_relay.store(publishing, Ordering::Relaxed);
    }

    pub fn events_relay(&self) -> bool {
        self.events_relay.load(Ordering::Relaxed)
    }

    pub fn blocked(&self) -> bool {
        self.blocked.load(Ordering::Relaxed)
    }

    pub fn broker(&self) -> bool {
        self.broker.load(Ordering::Relaxed)
    }

    pub fn consumers(&self) -> usize {
        self.consumers.load(Ordering::Relaxed)
    }

    pub fn database(&self) -> bool {
        self.database.load(Ordering::Relaxed)
    }
}
