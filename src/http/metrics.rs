//! Prometheus metrics, served as text on `GET /metrics`.

use std::sync::atomic::AtomicU64;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
    pub r#type: &'static str,
    pub provider: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProviderLabels {
    pub provider: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReceiptLabels {
    pub provider: String,
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueueLabels {
    pub queue: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LaneLabels {
    pub lane: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

fn call_duration_histogram() -> Histogram {
    // 1 ms to ~16 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

/// Every metric the daemon keeps. Cheap to clone (each metric is an `Arc` inside).
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Messages by how their handling ended this time (sent, suppressed, expired,
    /// retrying, failed, duplicate, deferred).
    pub messages: Family<OutcomeLabels, Counter>,
    pub provider_calls: Family<ProviderLabels, Histogram, fn() -> Histogram>,
    pub retries: Family<LaneLabels, Counter>,
    pub dead_letters: Family<ReasonLabels, Counter>,
    pub in_flight: Family<LaneLabels, Gauge>,
    pub bodies_purged: Counter,
    pub messages_deleted: Counter,
    /// Dead letters removed from `sms.dead` past `SMSGW_DEAD_RETENTION`.
    pub dead_letters_removed: Counter,
    /// 0 closed, 1 half-open, 2 open.
    pub circuit_state: Family<ProviderLabels, Gauge>,
    /// Messages put off because their provider's circuit was open.
    pub paused: Family<ProviderLabels, Counter>,
    /// Delivery receipts, by provider and the provider's status word.
    pub receipts: Family<ReceiptLabels, Counter>,
    /// Messages waiting in each queue (lanes, retry tiers, dead letters): the lag.
    pub queue_depth: Family<QueueLabels, Gauge>,
    /// Resends after an unknown outcome that the provider could not be asked about.
    pub possible_duplicates: Counter,
    /// Status events published to `sms.events` (and confirmed by the broker).
    pub events_published: Counter,
    /// Status events waiting in the outbox.
    pub events_outbox: Gauge,
    /// Age of the oldest status event waiting in the outbox.
    pub events_outbox_oldest: Gauge<f64, AtomicU64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut metrics = Self::unregistered();
        // Registered in this order, which is the order of `/metrics`.
        metrics.register_handling();
        metrics.register_retention();
        metrics.register_provider_health();
        metrics.register_queues();
        metrics.register_possible_duplicates();
        metrics.register_events();
        metrics
    }

    /// Every metric, none of them in the registry yet: only [`Metrics::new`] should call it.
    fn unregistered() -> Self {
        Metrics {
            registry: Registry::with_prefix("smsgw"),
            messages: Family::default(),
            provider_calls: Family::new_with_constructor(call_duration_histogram),
            retries: Family::default(),
            dead_letters: Family::default(),
            in_flight: Family::default(),
            bodies_purged: Counter::default(),
            messages_deleted: Counter::default(),
            dead_letters_removed: Counter::default(),
            circuit_state: Family::default(),
            paused: Family::default(),
            receipts: Family::default(),
            queue_depth: Family::default(),
            possible_duplicates: Counter::default(),
            events_published: Counter::default(),
            events_outbox: Gauge::default(),
            events_outbox_oldest: Gauge::default(),
        }
    }

    fn register_handling(&mut self) {
        let registry = &mut self.registry;
        registry.register(
            "messages",
            "Messages handled, by outcome, type and provider",
            self.messages.clone(),
        );
        registry.register(
            "provider_call_duration_seconds",
            "Duration of provider calls",
            self.provider_calls.clone(),
        );
        registry.register(
            "retries",
            "Messages sent to a retry tier after a temporary failure",
            self.retries.clone(),
        );
        registry.register(
            "dead_letters",
            "Messages published to sms.dead, by reason",
            self.dead_letters.clone(),
        );
        registry.register(
            "in_flight",
            "Messages being handled right now, by lane",
            self.in_flight.clone(),
        );
    }

    fn register_retention(&mut self) {
        let registry = &mut self.registry;
        registry.register(
            "bodies_purged",
            "Message bodies removed by the retention task",
            self.bodies_purged.clone(),
        );
        registry.register(
            "messages_deleted",
            "Message rows removed by the retention task",
            self.messages_deleted.clone(),
        );
        registry.register(
            "dead_letters_removed",
            "Dead letters removed from sms.dead by the retention task",
            self.dead_letters_removed.clone(),
        );
    }

    fn register_provider_health(&mut self) {
        let registry = &mut self.registry;
        registry.register(
            "circuit_state",
            "Provider circuit breaker: 0 closed, 1 half-open, 2 open",
            self.circuit_state.clone(),
        );
        registry.register(
            "paused",
            "Messages put off because their provider's circuit was open",
            self.paused.clone(),
        );
        registry.register(
            "receipts",
            "Delivery receipts received, by provider and status",
            self.receipts.clone(),
        );
    }

    fn register_queues(&mut self) {
        self.registry.register(
            "queue_depth",
            "Messages waiting in each of smsgw's queues",
            self.queue_depth.clone(),
        );
    }

    fn register_possible_duplicates(&mut self) {
        self.registry.register(
            "possible_duplicates",
            "Messages sent again after an attempt with an unknown outcome that the provider \
             could not be asked about",
            self.possible_duplicates.clone(),
        );
    }

    fn register_events(&mut self) {
        let registry = &mut self.registry;
        registry.register(
            "events_published",
            "Status events published to sms.events and confirmed by the broker",
            self.events_published.clone(),
        );
        registry.register(
            "events_outbox",
            "Status events waiting in the outbox to be published",
            self.events_outbox.clone(),
        );
        registry.register(
            "events_outbox_oldest_seconds",
            "Age of the oldest status event waiting in the outbox",
            self.events_outbox_oldest.clone(),
        );
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }

    pub fn count_message(&self, outcome: &'static str, kind: &'static str, provider: &'static str) {
        self.messages
            .get_or_create(&OutcomeLabels {
                outcome,
                r#type: kind,
                provider,
            })
            .inc();
    }
}
