//! A consumer of `sms.events`, as the web app would bind one, and the check that what it
//! received matches the message log.

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

use lapin::{
    Connection, ConnectionProperties, ExchangeKind,
    options::{
        BasicAckOptions, BasicGetOptions, ExchangeDeclareOptions, QueueBindOptions,
        QueueDeclareOptions,
    },
    types::FieldTable,
};
use serde_json::Value;
use uuid::Uuid;

use super::{Db, PATIENCE};

/// One event as a consumer receives it.
#[derive(Debug, Clone)]
pub struct Event {
    pub routing_key: String,
    pub message_id: Option<String>,
    pub content_type: Option<String>,
    pub persistent: bool,
    pub body: Value,
}

impl Event {
    pub fn status(&self) -> &str {
        self.body["status"].as_str().unwrap_or_default()
    }

    pub fn seq(&self) -> i64 {
        self.body["seq"].as_i64().unwrap_or_default()
    }

    pub fn message(&self) -> Uuid {
        self.body["message_id"]
            .as_str()
            .and_then(|id| id.parse().ok())
            .unwrap_or_default()
    }
}

/// A durable queue bound to `sms.events`; it survives a broker restart, and each read
/// opens a connection of its own, so it goes on reading after one.
pub struct EventTap {
    amqp_url: String,
    queue: String,
    pub received: Vec<Event>,
}

impl EventTap {
    /// Binds a queue of its own to `sms.events` with `pattern` (`#` for every event).
    pub async fn bind(amqp_url: &str, pattern: &str) -> EventTap {
        let queue = format!("events-tap-{}", Uuid::new_v4().simple());
        let connection = Connection::connect(amqp_url, ConnectionProperties::default())
            .await
            .expect("connect the event tap");
        let channel = connection.create_channel().await.expect("channel");
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        channel
            .exchange_declare(
                "sms.events".into(),
                ExchangeKind::Topic,
                durable,
                FieldTable::default(),
            )
            .await
            .expect("declare sms.events");
        let options = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        channel
            .queue_declare(queue.as_str().into(), options, FieldTable::default())
            .await
            .expect("declare the tap's queue");
        channel
            .queue_bind(
                queue.as_str().into(),
                "sms.events".into(),
                pattern.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind the tap");
        let _ = connection.close(200, "bound".into()).await;
        EventTap {
            amqp_url: amqp_url.to_owned(),
            queue,
            received: Vec::new(),
        }
    }

    /// Takes every event waiting now; how many it took.
    pub async fn take(&mut self) -> usize {
        let Ok(connection) =
            Connection::connect(&self.amqp_url, ConnectionProperties::default()).await
        else {
            return 0;
        };
        let Ok(channel) = connection.create_channel().await else {
            return 0;
        };
        let mut taken = 0;
        while let Ok(Some(message)) = channel
            .basic_get(self.queue.as_str().into(), BasicGetOptions::default())
            .await
        {
            let delivery = message.delivery;
            let properties = &delivery.properties;
            self.received.push(Event {
                routing_key: delivery.routing_key.to_string(),
                message_id: properties.message_id().as_ref().map(|m| m.to_string()),
                content_type: properties.content_type().as_ref().map(|c| c.to_string()),
                persistent: *properties.delivery_mode() == Some(2),
                body: serde_json::from_slice(&delivery.data).expect("an event is JSON"),
            });
            let _ = delivery.ack(BasicAckOptions::default()).await;
            taken += 1;
        }
        let _ = connection.close(200, "taken".into()).await;
        taken
    }

    /// Reads until `done` says the events received are enough; fails after the patience.
    pub async fn until(&mut self, done: impl Fn(&[Event]) -> bool) -> &[Event] {
        let deadline = Instant::now() + PATIENCE;
        while !done(&self.received) {
            assert!(
                Instant::now() < deadline,
                "the events never arrived; received: {:#?}",
                self.received
            );
            if self.take().await == 0 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        &self.received
    }

    /// The events of one message, in the order received.
    pub fn of(&self, message: Uuid) -> Vec<&Event> {
        self.received
            .iter()
            .filter(|e| e.message() == message)
            .collect()
    }

    /// Reads until the outbox is empty and nothing more arrives.
    pub async fn drain(&mut self, db: &Db, patience: Duration) {
        let deadline = Instant::now() + patience;
        loop {
            let waiting: i64 = db
                .scalar(
                    "SELECT (SELECT count(*) FROM sms_events) + (SELECT count(*) FROM sms_outbox)",
                    &[],
                )
                .await;
            let took = self.take().await;
            if waiting == 0 && took == 0 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{waiting} events still in the outbox"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// What the events received say, checked against the message log: for every message,
/// each of its status changes arrived (seq 1 up to the row's count, in order, copies
/// aside), every copy of an event is the same event, and the last is the status the log
/// ends with; every reply kept has its `reply.received` event, and every such event a
/// reply kept. Returns how many copies arrived more than once.
pub async fn assert_events_match_log(tap: &EventTap, db: &Db) -> usize {
    let copies = assert_status_events_match_log(tap, db).await;
    let replies: HashSet<Uuid> = db
        .rows("SELECT id FROM sms_replies", &[])
        .await
        .iter()
        .map(|row| row.get("id"))
        .collect();
    let published: HashSet<Uuid> = tap
        .received
        .iter()
        .filter(|e| e.routing_key == "reply.received")
        .filter_map(|e| e.body["reply_id"].as_str().and_then(|id| id.parse().ok()))
        .collect();
    assert_eq!(
        published, replies,
        "each reply kept, and only those, published"
    );
    copies
}

async fn assert_status_events_match_log(tap: &EventTap, db: &Db) -> usize {
    let mut by_id: HashMap<String, &Value> = HashMap::new();
    let mut copies = 0;
    let mut seen: HashMap<Uuid, Vec<&Event>> = HashMap::new();
    for event in &tap.received {
        let id = event.body["event_id"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        match by_id.get(&id) {
            Some(first) => {
                assert_eq!(*first, &event.body, "two different events with one id");
                copies += 1;
            }
            None => {
                by_id.insert(id, &event.body);
                if event.body.get("seq").is_some() {
                    seen.entry(event.message()).or_default().push(event);
                }
            }
        }
    }
    let rows = db
        .rows("SELECT id, status, status_seq FROM sms_messages", &[])
        .await;
    let mut messages = HashSet::new();
    for row in &rows {
        let id: Uuid = row.get("id");
        let status: String = row.get("status");
        let last_seq: i32 = row.get("status_seq");
        messages.insert(id);
        let events = seen.get(&id).cloned().unwrap_or_default();
        let seqs: Vec<i64> = events.iter().map(|e| e.seq()).collect();
        let expected: Vec<i64> = (1..=i64::from(last_seq)).collect();
        assert_eq!(
            seqs, expected,
            "message {id}: its events in order, none missing"
        );
        assert_eq!(
            events.last().map(|e| e.status()),
            Some(status.as_str()),
            "message {id}: the last event is the status the log ends with"
        );
    }
    assert!(
        seen.keys().all(|id| messages.contains(id)),
        "an event for a message the log does not have"
    );
    copies
}
