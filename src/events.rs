//! Events (interface sections 9 and 13): the relay from the outbox to `sms.events`.
//!
//! The store writes an event for every status change, and for every reply, in the
//! change's own transaction (`store::outbox`); this task publishes them. It keeps a broker connection of its own,
//! so that it goes on while the lanes reconnect or drain, and it empties the outbox once
//! more when the daemon stops. Delivery is at least once: a consumer de-duplicates on
//! `event_id`, which a status event derives from the message and `seq`, and any other
//! event keeps in its outbox row, so a copy published again after a crash carries the
//! same id.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use backon::BackoffBuilder;
use serde::Serialize;
use serde_json::Value;
use time::{OffsetDateTime, format_description::FormatItem, macros::format_description};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    broker::{Broker, BrokerError, NodeCursor, OutgoingEvent},
    config::{BrokerSettings, EventSettings},
    health::Health,
    metrics::Metrics,
    retry::pause,
    store::{OutboxBacklog, OutboxEvent, RelayTurn, StatusEvent, Store, StoreError},
};

/// Most events per relay turn.
const BATCH: usize = 1_000;
/// How often an idle relay looks for new events, with events on.
const POLL: Duration = Duration::from_millis(50);
/// How often it looks with events off: only rows left from before are relayed then.
const POLL_OFF: Duration = Duration::from_secs(5);
/// How often a relay waiting for another daemon's turn to end asks again.
const BUSY_POLL: Duration = Duration::from_millis(500);
/// How often the backlog metrics are read, and the outbox's bound checked: the outbox
/// may pass its bound by what is written in that time.
const BACKLOG_EVERY: Duration = Duration::from_secs(5);
/// How long a stopping daemon goes on relaying what its last messages wrote.
const FLUSH: Duration = Duration::from_secs(5);

const OCCURRED_AT: &[FormatItem<'static>] =
    format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");

/// The event as the web app reads it (contract section 9): no text, no number.
#[derive(Debug, Serialize)]
struct EventBody<'a> {
    event_id: Uuid,
    seq: i32,
    message_id: Uuid,
    job_id: Uuid,
    #[serde(rename = "ref")]
    reference: Option<&'a str>,
    #[serde(rename = "type")]
    kind: &'a str,
    school_id: i64,
    status: &'a str,
    previous_status: Option<&'a str>,
    reason: Option<&'a str>,
    error_code: Option<&'a str>,
    provider: Option<&'a str>,
    provider_message_id: Option<&'a str>,
    attempts: i32,
    segments: Option<i32>,
    context: Option<&'a Value>,
    occurred_at: String,
}

/// The same id for every copy of one event: one status change of one message.
pub fn event_id(message_id: Uuid, seq: i32) -> Uuid {
    Uuid::new_v5(&message_id, &seq.to_be_bytes())
}

/// An outbox row as the message published to `sms.events`.
pub fn encode(event: &OutboxEvent) -> OutgoingEvent {
    match event {
        OutboxEvent::Status(status) => encode_status(status),
        OutboxEvent::Payload {
            event_id,
            routing_key,
            payload,
        } => OutgoingEvent {
            event_id: *event_id,
            routing_key: routing_key.clone(),
            // Serialising a `Value` cannot fail.
            body: serde_json::to_vec(payload).unwrap_or_default(),
        },
    }
}

/// A status change as its event.
fn encode_status(event: &StatusEvent) -> OutgoingEvent {
    let event_id = event_id(event.message_id, event.seq);
    // An announcement's recipient keeps its `ref` in its context (see the fan-out).
    let reference = event
        .bulk_id
        .and(event.context.as_ref())
        .and_then(|context| context.get("ref"))
        .and_then(Value::as_str);
    let body = EventBody {
        event_id,
        seq: event.seq,
        message_id: event.message_id,
        job_id: event.bulk_id.unwrap_or(event.message_id),
        reference,
        kind: &event.kind,
        school_id: event.school_id,
        status: &event.status,
        previous_status: event.previous_status.as_deref(),
        reason: event.reason.as_deref(),
        error_code: event.error_code.as_deref(),
        provider: event.provider.as_deref(),
        provider_message_id: event.provider_message_id.as_deref(),
        attempts: event.attempts,
        segments: event.segments,
        context: event.context.as_ref(),
        occurred_at: occurred_at(event.occurred_at),
    };
    OutgoingEvent {
        event_id,
        routing_key: format!("{}.{}", event.kind, event.status),
        // Serialising plain fields and a `Value` cannot fail.
        body: serde_json::to_vec(&body).unwrap_or_default(),
    }
}

fn occurred_at(at: OffsetDateTime) -> String {
    at.to_offset(time::UtcOffset::UTC)
        .format(OCCURRED_AT)
        .unwrap_or_default()
}

/// Why a relay turn failed.
#[derive(Debug, thiserror::Error)]
enum RelayError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

/// What the relay needs to run.
pub struct Relay {
    pub store: Store,
    /// Where the broker is, and the queues' shape (the relay declares only `sms.events`).
    pub broker: BrokerSettings,
    /// On (new events are looked for often) or off, and the outbox's bound.
    pub events: EventSettings,
    pub metrics: Arc<Metrics>,
    /// Where `/readyz` learns whether this relay can publish.
    pub health: Arc<Health>,
}

impl Relay {
    /// Relays until `stop` fires, reconnecting to the broker as needed, then relays what
    /// is left for a few seconds more.
    pub async fn run(self, stop: CancellationToken) {
        let backlog = BacklogWatch {
            bound: self.events.max_backlog,
        };
        // The backlog is watched apart from the broker's connection: a relay that cannot
        // connect is exactly when the outbox fills.
        tokio::join!(
            backlog.run(&self.store, &self.metrics, &stop),
            self.relay(&stop)
        );
    }

    async fn relay(&self, stop: &CancellationToken) {
        // As the lanes' session does: each connection starts past the node of the last,
        // so a node that is down costs its connect timeout once, not at every reconnect.
        let cursor = std::sync::Mutex::new(NodeCursor::default());
        loop {
            let connected = crate::retry::until_ok(
                crate::retry::reconnecting(),
                stop,
                || self.connect(&cursor),
                |e, wait| {
                    self.publishing(false);
                    tracing::warn!(broker = %self.broker.url, error = %e, retry_in = ?wait,
                        "status events: broker unavailable");
                },
            );
            let Some(broker) = connected.await else {
                return;
            };
            match self.relay_on(&broker, stop).await {
                Ok(()) => {
                    self.flush(&broker).await;
                    broker.close().await;
                    return;
                }
                Err(e) => {
                    self.publishing(false);
                    tracing::warn!(error = %e, "status events: lost the broker; reconnecting");
                    broker.close().await;
                }
            }
        }
    }

    async fn connect(&self, cursor: &std::sync::Mutex<NodeCursor>) -> Result<Broker, BrokerError> {
        let name = format!(
            "smsgw {} events pid {}",
            env!("CARGO_PKG_VERSION"),
            std::process::id()
        );
        let first = *cursor
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let broker = Broker::connect_from(&self.broker, first, &name).await?;
        cursor
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .connected_to(broker.node_index());
        broker.declare_events_exchange().await?;
        Ok(broker)
    }

    /// Takes relay turns until `stop` fires (`Ok`) or the broker fails (`Err`). A database
    /// failure is waited out here: the broker connection is fine.
    async fn relay_on(&self, broker: &Broker, stop: &CancellationToken) -> Result<(), BrokerError> {
        let idle = if self.events.on { POLL } else { POLL_OFF };
        let mut store_backoff = crate::retry::reconnecting().build();
        loop {
            let turn = self.turn(broker).await;
            self.publishing(turn.is_ok());
            let wait = match turn {
                Ok(RelayTurn::Relayed(n)) if n == BATCH => Duration::ZERO,
                Ok(RelayTurn::Relayed(_)) => idle,
                Ok(RelayTurn::Busy) => BUSY_POLL,
                Err(RelayError::Broker(e)) => return Err(e),
                Err(RelayError::Store(e)) => {
                    let wait = store_backoff.next().unwrap_or(Duration::from_secs(10));
                    tracing::warn!(error = %e, retry_in = ?wait,
                        "status events: the database is unavailable");
                    wait
                }
            };
            if !wait.is_zero() && pause(wait, stop).await {
                return Ok(());
            }
            if stop.is_cancelled() {
                return Ok(());
            }
        }
    }

    /// Whether this relay can publish (its last turn went through, or another relay's
    /// turn was running), for `/readyz` and `smsgw_events_relay_up`.
    fn publishing(&self, up: bool) {
        self.health.set_events_relay(up);
        self.metrics.events_relay_up.set(i64::from(up));
    }

    /// One turn: publishes up to [`BATCH`] events and removes them from the outbox.
    async fn turn(&self, broker: &Broker) -> Result<RelayTurn, RelayError> {
        let turn = self
            .store
            .relay_events(BATCH as i64, |events| async move {
                let outgoing: Vec<OutgoingEvent> = events.iter().map(encode).collect();
                broker.publish_events(&outgoing).await?;
                Ok::<(), RelayError>(())
            })
            .await?;
        if let RelayTurn::Relayed(n) = turn {
            self.metrics.events_published.inc_by(n as u64);
        }
        Ok(turn)
    }

    /// On the way out: relays what the last messages wrote, for a few seconds at most.
    async fn flush(&self, broker: &Broker) {
        let deadline = Instant::now() + FLUSH;
        while Instant::now() < deadline {
            match self.turn(broker).await {
                Ok(RelayTurn::Relayed(n)) if n == BATCH => continue,
                Ok(RelayTurn::Relayed(_)) | Ok(RelayTurn::Busy) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "status events: left in the outbox for the next start");
                    return;
                }
            }
        }
    }
}

/// Reads the outbox's backlog into the metrics every few seconds, and keeps the outbox
/// within its bound.
struct BacklogWatch {
    bound: Option<i64>,
}

impl BacklogWatch {
    async fn run(&self, store: &Store, metrics: &Metrics, stop: &CancellationToken) {
        loop {
            self.refresh(store, metrics).await;
            if pause(BACKLOG_EVERY, stop).await {
                return;
            }
        }
    }

    async fn refresh(&self, store: &Store, metrics: &Metrics) {
        let Ok(backlog) = store.outbox_backlog().await else {
            return;
        };
        metrics.events_outbox.set(backlog.events);
        metrics.events_outbox_oldest.set(backlog.oldest_seconds);
        metrics.events_dropped.set(backlog.dropped);
        let change =
            gate_wanted(backlog.events, self.bound).filter(|&open| open != backlog.accepting);
        if let Some(open) = change {
            self.set_gate(store, open, &backlog).await;
        }
    }

    async fn set_gate(&self, store: &Store, open: bool, backlog: &OutboxBacklog) {
        match store.accept_events(open).await {
            // Another relay saw the same and changed it first.
            Ok(false) => {}
            Ok(true) if open => tracing::warn!(
                waiting = backlog.events,
                dropped_in_all = backlog.dropped,
                "status events: the outbox is below its bound again; new events are written"
            ),
            Ok(true) => tracing::error!(
                waiting = backlog.events,
                bound = self.bound,
                "status events: the outbox is full (SMSGW_EVENTS_MAX_BACKLOG); new events are \
                 dropped, and counted in smsgw_events_dropped, until the relay publishes"
            ),
            Err(e) => tracing::warn!(error = %e, "status events: cannot set the outbox's bound"),
        }
    }
}

/// Whether the outbox should take new events, given how many wait and its bound: `None`
/// leaves it as it is, between the bound and a tenth below it, so that it does not open
/// and close at every look while the backlog hovers at the bound.
fn gate_wanted(backlog: i64, bound: Option<i64>) -> Option<bool> {
    let Some(bound) = bound else {
        return Some(true);
    };
    if backlog >= bound {
        Some(false)
    } else if backlog <= bound - bound / 10 {
        Some(true)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn event() -> StatusEvent {
        StatusEvent {
            message_id: Uuid::from_u128(1),
            seq: 2,
            bulk_id: None,
            kind: "booking_cancellation".into(),
            school_id: 42,
            status: "failed".into(),
            previous_status: Some("sending".into()),
            reason: Some("permanent_failure".into()),
            error_code: Some("21211".into()),
            provider: Some("twilio".into()),
            provider_message_id: None,
            attempts: 1,
            segments: Some(1),
            context: Some(json!({"booking_id": 981})),
            occurred_at: time::macros::datetime!(2026-11-25 08:00:01.123456 UTC),
        }
    }

    fn body(event: &StatusEvent) -> Value {
        serde_json::from_slice(&encode_status(event).body).expect("an event is JSON")
    }

    #[test]
    fn an_event_has_the_contracts_fields_and_routing_key() {
        let encoded = encode_status(&event());
        assert_eq!(encoded.routing_key, "booking_cancellation.failed");
        assert_eq!(
            body(&event()),
            json!({
                "event_id": encoded.event_id, "seq": 2,
                "message_id": Uuid::from_u128(1), "job_id": Uuid::from_u128(1), "ref": null,
                "type": "booking_cancellation", "school_id": 42, "status": "failed",
                "previous_status": "sending", "reason": "permanent_failure",
                "error_code": "21211", "provider": "twilio", "provider_message_id": null,
                "attempts": 1, "segments": 1, "context": {"booking_id": 981},
                "occurred_at": "2026-11-25T08:00:01.123Z"
            })
        );
    }

    #[test]
    fn the_outbox_closes_at_its_bound_and_opens_a_tenth_below_it() {
        let bound = Some(1_000);
        assert_eq!(gate_wanted(1_000, bound), Some(false));
        assert_eq!(gate_wanted(950, bound), None);
        assert_eq!(gate_wanted(900, bound), Some(true));
        assert_eq!(gate_wanted(0, bound), Some(true));
        // No bound (any more): an outbox a bound closed opens.
        assert_eq!(gate_wanted(5_000_000, None), Some(true));
    }

    #[test]
    fn every_copy_of_an_event_has_one_id_and_each_change_its_own() {
        let first = encode_status(&event()).event_id;
        assert_eq!(first, encode_status(&event()).event_id);
        let next = StatusEvent { seq: 3, ..event() };
        assert_ne!(first, encode_status(&next).event_id);
    }

    #[test]
    fn a_recipients_event_names_its_announcement_and_ref() {
        let recipient = StatusEvent {
            bulk_id: Some(Uuid::from_u128(9)),
            kind: "announcement".into(),
            context: Some(json!({"ref": "user-77", "term": "spring"})),
            ..event()
        };
        let body = body(&recipient);
        assert_eq!(body["job_id"], json!(Uuid::from_u128(9)));
        assert_eq!(body["message_id"], json!(Uuid::from_u128(1)));
        assert_eq!(body["ref"], json!("user-77"));
    }

    #[test]
    fn a_ref_in_a_single_jobs_context_is_not_a_recipients_ref() {
        let single = StatusEvent {
            context: Some(json!({"ref": "mine"})),
            ..event()
        };
        assert_eq!(body(&single)["ref"], Value::Null);
    }
}
