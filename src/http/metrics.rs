//! Prometheus metrics, served as text on `GET /metrics`.

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
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("smsgw");
        let messages = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "messages",
            "Messages handled, by outcome, type and provider",
            messages.clone(),
        );
        let provider_calls =
            Family::<ProviderLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                call_duration_histogram,
            );
        registry.register(
            "provider_call_duration_seconds",
            "Duration of provider calls",
            provider_calls.clone(),
        );
        let retries = Family::<LaneLabels, Counter>::default();
        registry.register(
            "retries",
            "Messages sent to a retry tier after a temporary failure",
            retries.clone(),
        );
        let dead_letters = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "dead_letters",
            "Messages published to sms.dead, by reason",
            dead_letters.clone(),
        );
        let in_flight = Family::<LaneLabels, Gauge>::default();
        registry.register(
            "in_flight",
            "Messages being handled right now, by lane",
            in_flight.clone(),
        );
        let bodies_purged = Counter::default();
        registry.register(
            "bodies_purged",
            "Message bodies removed by the retention task",
            bodies_purged.clone(),
        );
        let messages_deleted = Counter::default();
        registry.register(
            "messages_deleted",
            "Message rows removed by the retention task",
            messages_deleted.clone(),
        );
        let circuit_state = Family::<ProviderLabels, Gauge>::default();
        registry.register(
            "circuit_state",
            "Provider circuit breaker: 0 closed, 1 half-open, 2 open",
            circuit_state.clone(),
        );
        let paused = Family::<ProviderLabels, Counter>::default();
        registry.register(
            "paused",
            "Messages put off because their provider's circuit was open",
            paused.clone(),
        );
        let receipts = Family::<ReceiptLabels, Counter>::default();
        registry.register(
            "receipts",
            "Delivery receipts received, by provider and status",
            receipts.clone(),
        );
        let queue_depth = Family::<QueueLabels, Gauge>::default();
        registry.register(
            "queue_depth",
            "Messages waiting in each of smsgw's queues",
            queue_depth.clone(),
        );
        let possible_duplicates = Counter::default();
        registry.register(
            "possible_duplicates",
            "Messages sent again after an attempt with an unknown outcome that the provider \
             could not be asked about",
            possible_duplicates.clone(),
        );
        Metrics {
            registry,
            circuit_state,
            paused,
            receipts,
            queue_depth,
            possible_duplicates,
            messages,
            provider_calls,
            retries,
            dead_letters,
            in_flight,
            bodies_purged,
            messages_deleted,
        }
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
