//! Consuming: a lane's deliveries, decoded into plain data for the pipeline, and the
//! acks and requeues that settle them.

use std::sync::atomic::{AtomicBool, Ordering};

use futures_util::StreamExt;
use lapin::{
    Acker, BasicProperties, Channel, Consumer,
    options::{
        BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions,
        BasicRejectOptions,
    },
    types::{FieldTable, ShortString},
};
use time::OffsetDateTime;
use uuid::Uuid;

use super::{
    Broker, BrokerError, REPLAY_EXCHANGE, REQUEUE_EXCHANGE,
    acks::{AckBatcher, AckOp},
    headers::{
        HEADER_ATTEMPTS, HEADER_BULK_ID, HEADER_FANOUT_QUEUED, HEADER_FIRST_SEEN,
        HEADER_REPLAYED_AT, HEADER_REQUEUED, HEADER_RETRY_AT, OUR_PREFIX, amqp_int, amqp_text,
        carried, from_unix_ms,
    },
    topology::lane_queue,
    within,
};
use crate::{job::Lane, phone::redact_numbers};

/// A delivery as the pipeline sees it: plain data, decoded from the AMQP message and our
/// headers. The pipeline decides over it; only the broker settles it.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub lane: Lane,
    pub body: Vec<u8>,
    /// The `message_id` property, as the web app set it.
    pub message_id: Option<String>,
    /// The broker delivered it before (to us or another consumer) without a settlement.
    pub redelivered: bool,
    /// Provider calls made for this job so far, from our `x-smsgw-attempts` header.
    pub attempts: u32,
    pub bulk_id: Option<Uuid>,
    /// Set on retries: not to be tried before this moment.
    pub retry_at: Option<OffsetDateTime>,
    /// Put back by `smsgw dlq replay`.
    pub replayed: bool,
    /// Came back from one of our delay tiers (not a fresh publish).
    pub requeued: bool,
    /// An announcement's continuation: its recipients' rows were written by the first pass.
    pub fanout_queued: bool,
    /// When the job was published (its AMQP `timestamp`), else when smsgw first saw it.
    pub first_seen: OffsetDateTime,
}

impl Delivery {
    /// A first delivery of a fresh publish, with none of our headers.
    pub fn fresh(lane: Lane, body: Vec<u8>) -> Self {
        Delivery {
            lane,
            body,
            message_id: None,
            redelivered: false,
            attempts: 0,
            bulk_id: None,
            retry_at: None,
            replayed: false,
            requeued: false,
            fanout_queued: false,
            first_seen: OffsetDateTime::now_utc(),
        }
    }

    /// Whether the job may have been seen before: redelivered, back from a tier, replayed.
    pub fn has_history(&self) -> bool {
        self.redelivered || self.requeued || self.replayed
    }
}

/// A delivery taken from a lane: its data, and what settling it needs.
pub struct Incoming {
    pub delivery: Delivery,
    pub(super) routing_key: ShortString,
    pub(super) properties: BasicProperties,
    acker: Acker,
    delivery_tag: u64,
    /// The lane channel's ack batcher; `None` acks on its own.
    batcher: Option<AckBatcher>,
    /// Acked, nacked or rejected.
    settled: AtomicBool,
}

impl Drop for Incoming {
    fn drop(&mut self) {
        // Left unsettled (given back to the broker at shutdown, say): no batched ack
        // may ever reach past it.
        if let Some(batcher) = &self.batcher
            && !self.settled.load(Ordering::Acquire)
        {
            batcher.send(AckOp::Held(self.delivery_tag));
        }
    }
}

impl std::fmt::Debug for Incoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incoming")
            .field("delivery", &self.delivery)
            .finish()
    }
}
impl Incoming {
    fn from_delivery(lane: Lane, delivery: lapin::message::Delivery) -> Self {
        let properties = trusted_properties(delivery.exchange.as_str(), delivery.properties);
        let history = History::read(properties.headers().as_ref());
        let message_id = properties
            .message_id()
            .as_ref()
            .map(|id| id.as_str().to_owned());
        Incoming {
            delivery: Delivery {
                lane,
                body: delivery.data,
                message_id,
                redelivered: delivery.redelivered,
                attempts: history.attempts,
                bulk_id: history.bulk_id,
                retry_at: history.retry_at,
                replayed: history.replayed,
                requeued: history.requeued,
                fanout_queued: history.fanout_queued,
                first_seen: published_at(&properties)
                    .or(history.first_seen)
                    .unwrap_or_else(OffsetDateTime::now_utc),
            },
            routing_key: delivery.routing_key,
            properties,
            acker: delivery.acker,
            delivery_tag: delivery.delivery_tag,
            batcher: None,
            settled: AtomicBool::new(false),
        }
    }

    /// Acks the delivery, with others of its channel when it can. Says whether the ack
    /// reached a live channel.
    pub(super) async fn ack(&self) -> Result<bool, BrokerError> {
        self.settled.store(true, Ordering::Release);
        if let Some(batcher) = &self.batcher {
            let (reply, answer) = tokio::sync::oneshot::channel();
            if batcher.send(AckOp::Ack(self.delivery_tag, self.acker.clone(), reply)) {
                return Ok(answer.await.unwrap_or(false));
            }
        }
        within(self.acker.ack(BasicAckOptions::default())).await
    }

    /// Gives the delivery back to its queue as a failed delivery: `basic.reject`, which
    /// counts toward the lane's `x-delivery-limit` on every RabbitMQ version. (From 4.3 a
    /// `basic.nack` no longer counts, and a message that keeps crashing the pipeline would
    /// come back for ever instead of reaching `sms.dead`.)
    pub(super) async fn give_back(&self) -> Result<bool, BrokerError> {
        self.settled.store(true, Ordering::Release);
        let rejected = within(self.acker.reject(BasicRejectOptions { requeue: true })).await;
        if let Some(batcher) = &self.batcher {
            batcher.send(AckOp::Settled(self.delivery_tag));
        }
        rejected
    }

    /// Whether the delivery can still be settled (its channel is alive and it was not yet).
    pub fn settleable(&self) -> bool {
        self.acker.usable()
    }
}

/// Whether a delivery came through an exchange only smsgw publishes to: `sms.requeue`
/// (back from a retry tier, fanned out, an announcement's continuation) or `sms.replay`
/// (`smsgw dlq replay`). Anything else was published to `sms.jobs` by someone else.
fn came_through_ours(exchange: &str) -> bool {
    exchange == REQUEUE_EXCHANGE || exchange == REPLAY_EXCHANGE
}

/// The delivery's properties, with our headers removed unless it came through one of our
/// exchanges: whoever may publish to `sms.jobs` must not set an attempt count, a retry
/// time or a replay mark, nor have one carried into a retry tier where it would then be
/// trusted.
fn trusted_properties(exchange: &str, properties: BasicProperties) -> BasicProperties {
    if came_through_ours(exchange) {
        return properties;
    }
    let forged: Vec<String> = properties
        .headers()
        .iter()
        .flat_map(|h| h.inner().keys())
        .filter(|k| k.as_str().starts_with(OUR_PREFIX))
        .map(|k| k.as_str().chars().take(40).collect())
        .collect();
    if forged.is_empty() {
        return properties;
    }
    tracing::warn!(
        exchange = %exchange.chars().take(40).collect::<String>(),
        headers = %redact_numbers(&forged.join(", ")),
        "a publish carried smsgw's own headers; they are ignored"
    );
    let headers = carried(&properties, |k| k.starts_with(OUR_PREFIX));
    properties.with_headers(headers)
}

/// What our headers say about a delivery's past.
#[derive(Debug, Default, PartialEq)]
struct History {
    attempts: u32,
    bulk_id: Option<Uuid>,
    retry_at: Option<OffsetDateTime>,
    replayed: bool,
    requeued: bool,
    fanout_queued: bool,
    first_seen: Option<OffsetDateTime>,
}

/// The AMQP `timestamp` the publisher set (Unix seconds), if any. Zero, which some
/// clients send for "not set", counts as none: read as 1970 it would expire every login
/// code on arrival.
fn published_at(properties: &BasicProperties) -> Option<OffsetDateTime> {
    let seconds = i64::try_from((*properties.timestamp())?)
        .ok()
        .filter(|s| *s > 0)?;
    OffsetDateTime::from_unix_timestamp(seconds).ok()
}

impl History {
    fn read(headers: Option<&FieldTable>) -> Self {
        let Some(headers) = headers else {
            return History::default();
        };
        let get = |key: &str| headers.inner().get(key);
        History {
            attempts: get(HEADER_ATTEMPTS)
                .and_then(amqp_int)
                .and_then(|n| u32::try_from(n).ok())
                .unwrap_or(0),
            bulk_id: get(HEADER_BULK_ID)
                .and_then(amqp_text)
                .and_then(|text| Uuid::parse_str(&text).ok()),
            retry_at: get(HEADER_RETRY_AT)
                .and_then(amqp_int)
                .and_then(from_unix_ms),
            replayed: headers.contains_key(HEADER_REPLAYED_AT),
            requeued: headers.contains_key(HEADER_REQUEUED),
            fanout_queued: headers.contains_key(HEADER_FANOUT_QUEUED),
            first_seen: get(HEADER_FIRST_SEEN)
                .and_then(amqp_int)
                .and_then(from_unix_ms),
        }
    }
}

/// A consumer on one lane, on its own channel with its own prefetch.
pub struct LaneConsumer {
    pub lane: Lane,
    channel: Channel,
    consumer: Consumer,
    tag: ShortString,
    batcher: AckBatcher,
}

impl LaneConsumer {
    /// The next delivery; `None` when the consumer was cancelled or its channel closed.
    pub async fn next(&mut self) -> Option<Result<Incoming, BrokerError>> {
        let lane = self.lane;
        let batcher = &self.batcher;
        self.consumer.next().await.map(|delivery| {
            delivery
                .map(|d| {
                    let mut incoming = Incoming::from_delivery(lane, d);
                    if batcher.send(AckOp::Delivered(incoming.delivery_tag)) {
                        incoming.batcher = Some(batcher.clone());
                    }
                    incoming
                })
                .map_err(BrokerError::from)
        })
    }

    /// Asks the broker to stop delivering; what was delivered stays ours to settle.
    pub async fn cancel(&self) -> Result<(), BrokerError> {
        within(
            self.channel
                .basic_cancel(self.tag.clone(), BasicCancelOptions::default()),
        )
        .await
    }

    pub async fn close(&self) {
        let _ = within(self.channel.close(200, "smsgw stopping".into())).await;
    }
}

impl Broker {
    /// Starts consuming `lane` on a channel of its own, with at most `prefetch` unsettled.
    pub async fn consume(&self, lane: Lane, prefetch: u16) -> Result<LaneConsumer, BrokerError> {
        let channel = within(self.connection.create_channel()).await?;
        within(channel.basic_qos(prefetch, BasicQosOptions::default())).await?;
        let tag = ShortString::from(format!("smsgw-{}-{}", lane.as_str(), Uuid::new_v4()));
        let consumer = within(channel.basic_consume(
            lane_queue(lane).into(),
            tag.clone(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        ))
        .await?;
        Ok(LaneConsumer {
            lane,
            channel,
            consumer,
            tag,
            batcher: AckBatcher::start(),
        })
    }
}

#[cfg(test)]
mod tests {
    use lapin::types::AMQPValue;

    use super::*;
    use crate::broker::{DEAD_EXCHANGE, JOBS_EXCHANGE, headers::long_string};

    #[test]
    fn a_publish_time_that_is_no_time_at_all_is_not_used() {
        let at = |seconds: u64| published_at(&BasicProperties::default().with_timestamp(seconds));
        assert_eq!(
            at(1_764_057_600),
            OffsetDateTime::from_unix_timestamp(1_764_057_600).ok()
        );
        assert_eq!(at(u64::MAX), None, "beyond what a time can hold");
        assert_eq!(at(i64::MAX as u64), None, "beyond the year 9999");
        assert_eq!(at(0), None, "zero is no time set");
        assert_eq!(published_at(&BasicProperties::default()), None);
    }

    /// A publish whose headers claim a whole history, plus one header of the web app's.
    fn forged() -> BasicProperties {
        let mut headers = FieldTable::default();
        headers.insert(HEADER_ATTEMPTS.into(), AMQPValue::LongLongInt(6));
        headers.insert(HEADER_RETRY_AT.into(), AMQPValue::LongLongInt(i64::MAX / 2));
        headers.insert(HEADER_REPLAYED_AT.into(), AMQPValue::LongLongInt(1));
        headers.insert(HEADER_REQUEUED.into(), AMQPValue::Boolean(true));
        headers.insert(HEADER_FANOUT_QUEUED.into(), AMQPValue::Boolean(true));
        headers.insert(HEADER_BULK_ID.into(), long_string(&Uuid::nil().to_string()));
        headers.insert("x-webapp-trace".into(), long_string("abc"));
        BasicProperties::default().with_headers(headers)
    }

    #[test]
    fn our_headers_on_a_publish_to_sms_jobs_are_dropped() {
        for exchange in [JOBS_EXCHANGE, DEAD_EXCHANGE, "sms.retry.10s", ""] {
            let properties = trusted_properties(exchange, forged());
            assert_eq!(
                History::read(properties.headers().as_ref()),
                History::default(),
                "{exchange}"
            );
            let kept = properties.headers().clone().unwrap_or_default();
            assert!(kept.contains_key("x-webapp-trace"), "{exchange}");
        }
    }

    #[test]
    fn our_headers_are_read_on_what_came_through_our_exchanges() {
        for exchange in [REQUEUE_EXCHANGE, REPLAY_EXCHANGE] {
            let properties = trusted_properties(exchange, forged());
            let history = History::read(properties.headers().as_ref());
            assert_eq!(history.attempts, 6, "{exchange}");
            assert!(history.replayed && history.requeued && history.fanout_queued);
            assert_eq!(history.bulk_id, Some(Uuid::nil()));
        }
    }
}
