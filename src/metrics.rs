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

use time::OffsetDateTime;

use crate::{
    disposition::DeadReason,
    job::Lane,
    policy::SuppressReason,
    store::{Receipt, ReceiptApplied, Status},
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
pub struct ReplyLabels {
    pub provider: &'static str,
    /// `true` when the message it answers was found.
    pub attributed: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReceiptLabels {
    pub provider: String,
    pub status: String,
}

/// A provider's error: the provider's own code when it gave one, else what went wrong
/// (`timeout`, `unreachable`, `http_503`, ...).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProviderErrorLabels {
    pub provider: &'static str,
    pub code: String,
}

/// The provider type a receipt came from (`twilio`, `vonage`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReceiptSourceLabels {
    pub provider: String,
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

fn send_latency_histogram() -> Histogram {
    // 10 ms to ~164 s: the urgent lane's promise is a second or two.
    Histogram::new(exponential_buckets(0.01, 2.0, 15))
}

fn receipt_delay_histogram() -> Histogram {
    // 0.5 s to ~68 min: carriers report within seconds, or hours late.
    Histogram::new(exponential_buckets(0.5, 2.0, 14))
}

/// Every metric the daemon keeps. Cheap to clone (each metric is an `Arc` inside).
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Messages by how their handling ended this time (sent, suppressed, expired,
    /// cancelled, retrying, failed, duplicate, deferred).
    pub messages: Family<OutcomeLabels, Counter>,
    /// Messages suppressed, by reason: the settings, opt-outs and the guards' refusals.
    pub suppressed: Family<ReasonLabels, Counter>,
    pub provider_calls: Family<ProviderLabels, Histogram, fn() -> Histogram>,
    /// From when a message was due (its job published, or its wait in a retry tier over)
    /// to the provider accepting it, by lane: what the urgent lane promises.
    pub send_latency: Family<LaneLabels, Histogram, fn() -> Histogram>,
    /// Provider calls that failed, by provider and error code: which failures, not only
    /// how many.
    pub provider_errors: Family<ProviderErrorLabels, Counter>,
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
    /// Sent messages given up as `undelivered` / `no_receipt` (`SMSGW_RECEIPT_TIMEOUT`).
    pub receipt_timeouts: Counter,
    /// Replies kept, by provider and whether the message they answer was found.
    pub replies: Family<ReplyLabels, Counter>,
    /// From a message's acceptance by the provider to its final receipt (delivered,
    /// undelivered, failed): how late the web app learns whether a text arrived.
    pub receipt_delay: Family<ReceiptSourceLabels, Histogram, fn() -> Histogram>,
    /// Messages waiting in each queue (lanes, retry tiers, dead letters): the lag.
    pub queue_depth: Family<QueueLabels, Gauge>,
    /// Resends after an unknown outcome that the provider could not be asked about.
    pub possible_duplicates: Counter,
    /// Events published to `sms.events` (and confirmed by the broker).
    pub events_published: Counter,
    /// Events waiting in the outbox.
    pub events_outbox: Gauge,
    /// Age of the oldest status event waiting in the outbox.
    pub events_outbox_oldest: Gauge<f64, AtomicU64>,
    /// Events ever dropped because the outbox was at its bound, account-wide.
    pub events_dropped: Gauge,
    /// 1 while this process's events relay can publish, else 0.
    pub events_relay_up: Gauge,
    /// 1 while `/readyz` would answer 200, else 0; set at each scrape.
    pub ready: Gauge,
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
        metrics.register_ready();
        metrics.start_at_zero();
        metrics
    }

    /// Gives the series whose labels are known before anything happens a value of 0, so
    /// that a dashboard shows 0 rather than "no data", and an alert has a series to read.
    /// (Creating a series is the point: the guard `get_or_create` returns goes at once.)
    fn start_at_zero(&self) {
        for lane in Lane::ALL {
            let labels = LaneLabels {
                lane: lane.as_str(),
            };
            drop(self.in_flight.get_or_create(&labels));
            drop(self.retries.get_or_create(&labels));
            drop(self.send_latency.get_or_create(&labels));
        }
        for reason in DeadReason::ALL {
            drop(self.dead_letters.get_or_create(&ReasonLabels {
                reason: reason.as_str(),
            }));
        }
        for reason in SuppressReason::ALL {
            drop(self.suppressed.get_or_create(&ReasonLabels {
                reason: reason.as_str(),
            }));
        }
    }

    /// Series at 0 for each configured provider: its circuit (closed), put-off messages and
    /// call durations.
    pub fn start_providers_at_zero(&self, providers: impl IntoIterator<Item = &'static str>) {
        for provider in providers {
            let labels = ProviderLabels { provider };
            drop(self.circuit_state.get_or_create(&labels));
            drop(self.paused.get_or_create(&labels));
            drop(self.provider_calls.get_or_create(&labels));
        }
    }

    /// Every metric, none of them in the registry yet: only [`Metrics::new`] should call it.
    fn unregistered() -> Self {
        Metrics {
            registry: Registry::with_prefix("smsgw"),
            messages: Family::default(),
            suppressed: Family::default(),
            provider_calls: Family::new_with_constructor(call_duration_histogram),
            provider_errors: Family::default(),
            send_latency: Family::new_with_constructor(send_latency_histogram),
            retries: Family::default(),
            dead_letters: Family::default(),
            in_flight: Family::default(),
            bodies_purged: Counter::default(),
            messages_deleted: Counter::default(),
            dead_letters_removed: Counter::default(),
            circuit_state: Family::default(),
            paused: Family::default(),
            receipts: Family::default(),
            receipt_timeouts: Counter::default(),
            replies: Family::default(),
            receipt_delay: Family::new_with_constructor(receipt_delay_histogram),
            queue_depth: Family::default(),
            possible_duplicates: Counter::default(),
            events_published: Counter::default(),
            events_outbox: Gauge::default(),
            events_outbox_oldest: Gauge::default(),
            events_dropped: Gauge::default(),
            events_relay_up: Gauge::default(),
            ready: Gauge::default(),
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
            "suppressed",
            "Messages suppressed, by reason (settings, opt-outs, the guards' refusals)",
            self.suppressed.clone(),
        );
        registry.register(
            "provider_call_duration_seconds",
            "Duration of provider calls",
            self.provider_calls.clone(),
        );
        registry.register(
            "send_latency_seconds",
            "Time from when a message was due (published, or out of a retry tier) to the \
             provider accepting it, by lane",
            self.send_latency.clone(),
        );
        registry.register(
            "provider_errors",
            "Provider calls that failed, by provider and error code",
            self.provider_errors.clone(),
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
        registry.register(
            "receipt_timeouts",
            "Sent messages given up as undelivered because no receipt came in time",
            self.receipt_timeouts.clone(),
        );
        registry.register(
            "replies",
            "Replies kept, by provider and whether the message they answer was found",
            self.replies.clone(),
        );
        registry.register(
            "receipt_delay_seconds",
            "Time from the provider accepting a message to its final delivery receipt",
            self.receipt_delay.clone(),
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
            "Events published to sms.events and confirmed by the broker",
            self.events_published.clone(),
        );
        registry.register(
            "events_outbox",
            "Events waiting in the outbox to be published",
            self.events_outbox.clone(),
        );
        registry.register(
            "events_outbox_oldest_seconds",
            "Age of the oldest status event waiting in the outbox",
            self.events_outbox_oldest.clone(),
        );
        registry.register(
            "events_dropped",
            "Events dropped, account-wide, because the outbox held SMSGW_EVENTS_MAX_BACKLOG",
            self.events_dropped.clone(),
        );
        registry.register(
            "events_relay_up",
            "1 while this process's events relay can publish to sms.events",
            self.events_relay_up.clone(),
        );
    }

    fn register_ready(&mut self) {
        self.registry.register(
            "ready",
            "1 while the daemon is ready (broker, lane consumers and database usable), else 0",
            self.ready.clone(),
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

    /// Counts a message suppressed for `reason` (as `sms_messages.reason` has it).
    pub fn count_suppressed(&self, reason: &'static str) {
        self.suppressed
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// Counts a reply kept.
    pub fn count_reply(&self, provider: &'static str, attributed: bool) {
        self.replies
            .get_or_create(&ReplyLabels {
                provider,
                attributed: if attributed { "true" } else { "false" },
            })
            .inc();
    }

    /// Observes how long the final word on a message (delivered, undelivered, failed) took
    /// to come; the provider's interim words (queued, sent) are not what anyone waits for.
    pub fn observe_receipt_delay(&self, receipt: &Receipt<'_>, applied: &ReceiptApplied) {
        let last_word = matches!(
            receipt.status,
            Some(Status::Delivered | Status::Undelivered | Status::Failed)
        );
        if let (true, Some(seconds)) = (last_word, applied.since_sent) {
            self.receipt_delay
                .get_or_create(&ReceiptSourceLabels {
                    provider: receipt.provider.to_owned(),
                })
                .observe(seconds.max(0.0));
        }
    }

    /// Observes the time since `due` for a message of `lane` that the provider accepted.
    pub fn observe_send_latency(&self, lane: Lane, due: OffsetDateTime) {
        let seconds = (OffsetDateTime::now_utc() - due).as_seconds_f64();
        self.send_latency
            .get_or_create(&LaneLabels {
                lane: lane.as_str(),
            })
            .observe(seconds.max(0.0));
    }

    pub fn count_provider_error(&self, provider: &'static str, code: String) {
        self.provider_errors
            .get_or_create(&ProviderErrorLabels { provider, code })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receipt(status: Option<Status>) -> Receipt<'static> {
        Receipt {
            provider: "twilio",
            provider_message_id: "SM1",
            provider_status: "x",
            status,
            error_code: None,
            opted_out: false,
            signed_by: &[],
        }
    }

    #[test]
    fn series_known_before_any_event_are_shown_at_zero() {
        let metrics = Metrics::new();
        metrics.start_providers_at_zero(["twilio"]);
        let text = metrics.render();
        for expected in [
            r#"smsgw_in_flight{lane="bulk"} 0"#,
            r#"smsgw_retries_total{lane="urgent"} 0"#,
            r#"smsgw_dead_letters_total{reason="attempts_exhausted"} 0"#,
            r#"smsgw_suppressed_total{reason="recipient_limit"} 0"#,
            r#"smsgw_suppressed_total{reason="international_limit"} 0"#,
            r#"smsgw_circuit_state{provider="twilio"} 0"#,
            r#"smsgw_paused_total{provider="twilio"} 0"#,
            r#"smsgw_send_latency_seconds_count{lane="default"} 0"#,
            "smsgw_ready 0",
        ] {
            assert!(text.contains(expected), "missing {expected}:\n{text}");
        }
    }

    #[test]
    fn only_a_final_receipt_counts_toward_the_receipt_delay() {
        let metrics = Metrics::new();
        let applied = ReceiptApplied {
            id: uuid::Uuid::nil(),
            recipient: "+447700900123".into(),
            school_id: 1,
            since_sent: Some(3.0),
        };
        metrics.observe_receipt_delay(&receipt(Some(Status::Sent)), &applied);
        metrics.observe_receipt_delay(&receipt(None), &applied);
        metrics.observe_receipt_delay(&receipt(Some(Status::Delivered)), &applied);
        let text = metrics.render();
        assert!(
            text.contains(r#"smsgw_receipt_delay_seconds_count{provider="twilio"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"smsgw_receipt_delay_seconds_sum{provider="twilio"} 3.0"#),
            "{text}"
        );
    }
}
