//! The broker: the only module that speaks AMQP.
//!
//! Topology (declared idempotently at every start):
//!
//! ```text
//!  web app ──▶ sms.jobs (topic) ──type──▶ sms.urgent  (login_code, booking_change, booking_cancellation)
//!                 │                 └───▶ sms.default (booking_confirmation, booking_reminder)
//!                 │                 └───▶ sms.bulk    (announcement)
//!                 └─ unroutable ─▶ sms.unrouted (fanout) ─▶ sms.default (decoded, dead-lettered)
//!
//!  retry / defer ─▶ sms.retry.<delay> (fanout) ─▶ sms.retry.<delay> queue, TTL = delay
//!                                  └─ expired ─▶ sms.requeue (direct, key = type) ─▶ its lane
//!
//!  dead letters ─▶ sms.dead (fanout) ─▶ sms.dead queue
//!  lanes past x-delivery-limit ──────────▲ (the broker dead-letters them itself)
//! ```
//!
//! Every queue is a quorum queue; the broker dead-letters at-least-once. Every publish of
//! ours waits for the broker's confirm before the delivery it replaces is acked.

use std::{sync::Arc, time::Duration};

use futures_util::StreamExt;
use lapin::{
    Acker, BasicProperties, Channel, Connection, ConnectionProperties, Consumer, ExchangeKind,
    options::{
        BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
        BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
        QueueBindOptions, QueueDeclareOptions,
    },
    types::{AMQPValue, FieldTable, LongString, ShortString},
};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::{
    acks::{AckBatcher, AckOp},
    disposition::{DeadReason, Disposition},
    job::{JobType, Lane},
};

pub const JOBS_EXCHANGE: &str = "sms.jobs";
pub const UNROUTED_EXCHANGE: &str = "sms.unrouted";
pub const REQUEUE_EXCHANGE: &str = "sms.requeue";
pub const DEAD_EXCHANGE: &str = "sms.dead";
pub const DEAD_QUEUE: &str = "sms.dead";

pub const HEADER_REASON: &str = "x-smsgw-reason";
pub const HEADER_ERROR: &str = "x-smsgw-error";
pub const HEADER_ATTEMPTS: &str = "x-smsgw-attempts";
/// On a message fanned out of an announcement: the announcement's job id.
pub const HEADER_BULK_ID: &str = "x-smsgw-bulk-id";
/// On a dead letter: when it was dead-lettered (Unix milliseconds).
pub const HEADER_DEAD_AT: &str = "x-smsgw-dead-at";
/// On a job put back by `smsgw dlq replay`: when (Unix milliseconds). A replayed job whose
/// message failed may be tried again, with a fresh attempt budget.
pub const HEADER_REPLAYED_AT: &str = "x-smsgw-replayed-at";
/// On a message we put in a delay tier (retry, defer): it is not a fresh publish, so
/// finding its job in flight never makes it a duplicate to drop.
pub const HEADER_REQUEUED: &str = "x-smsgw-requeued";
/// On a retried message: not to be tried before this moment (Unix milliseconds). A retry
/// longer than the longest tier (a long `Retry-After`) waits in that tier more than once.
pub const HEADER_RETRY_AT: &str = "x-smsgw-retry-at";
/// On an announcement whose fan-out goes on: every recipient already has its `queued` row.
pub const HEADER_FANOUT_QUEUED: &str = "x-smsgw-fanout-queued";

/// How long we wait for the broker to confirm a publish or take an ack.
const BROKER_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest `x-smsgw-error` we write.
const MAX_ERROR_HEADER: usize = 1_000;

pub fn lane_queue(lane: Lane) -> &'static str {
    match lane {
        Lane::Urgent => "sms.urgent",
        Lane::Default => "sms.default",
        Lane::Bulk => "sms.bulk",
    }
}

/// `sms.retry.10s`, `sms.retry.1m`, `sms.retry.1h30m`.
pub fn tier_name(delay: Duration) -> String {
    let text: String = humantime::format_duration(delay)
        .to_string()
        .split_whitespace()
        .collect();
    format!("sms.retry.{text}")
}

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("AMQP error: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("the broker refused the publish (nack)")]
    Nacked,
    #[error("the broker could not route the publish: {0}")]
    Returned(String),
    #[error("the broker did not answer within {0:?}")]
    Timeout(Duration),
}

impl BrokerError {
    /// A topology mismatch (a queue declared with other arguments) will not fix itself.
    pub fn is_precondition_failed(&self) -> bool {
        matches!(self, BrokerError::Amqp(e) if e.to_string().contains("PRECONDITION_FAILED"))
    }
}

async fn within<T, E>(future: impl Future<Output = Result<T, E>>) -> Result<T, BrokerError>
where
    BrokerError: From<E>,
{
    match tokio::time::timeout(BROKER_TIMEOUT, future).await {
        Ok(result) => result.map_err(BrokerError::from),
        Err(_) => Err(BrokerError::Timeout(BROKER_TIMEOUT)),
    }
}

/// The shape of the queues, from configuration.
#[derive(Debug, Clone)]
pub struct Topology {
    /// Delay tiers, shortest first.
    pub delays: Vec<Duration>,
    pub delivery_limit: u32,
}

impl Topology {
    /// The tier to wait in for a retry: the shortest one at least `delay` long.
    fn tier_at_least(&self, delay: Duration) -> Duration {
        self.delays
            .iter()
            .copied()
            .find(|tier| *tier >= delay)
            .or_else(|| self.delays.last().copied())
            .unwrap_or(delay)
    }

    /// The tier to wait in for a scheduled send: the longest one that does not overshoot
    /// `remaining` (the shortest when all do), so the message comes back on time.
    fn tier_at_most(&self, remaining: Duration) -> Duration {
        self.delays
            .iter()
            .rev()
            .copied()
            .find(|tier| *tier <= remaining)
            .or_else(|| self.delays.first().copied())
            .unwrap_or(remaining)
    }
}

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
}

impl Delivery {
    /// Whether the job may have been seen before: redelivered, back from a tier, replayed.
    pub fn has_history(&self) -> bool {
        self.redelivered || self.requeued || self.replayed
    }
}

/// A delivery taken from a lane: its data, and what settling it needs.
pub struct Incoming {
    pub delivery: Delivery,
    routing_key: ShortString,
    properties: BasicProperties,
    acker: Acker,
    delivery_tag: u64,
    /// The lane channel's ack batcher; `None` acks on its own.
    batcher: Option<AckBatcher>,
    /// Acked, nacked or rejected.
    settled: std::sync::atomic::AtomicBool,
}

impl Drop for Incoming {
    fn drop(&mut self) {
        // Left unsettled (given back to the broker at shutdown, say): no batched ack
        // may ever reach past it.
        if let Some(batcher) = &self.batcher
            && !self.settled.load(std::sync::atomic::Ordering::Acquire)
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
        let headers = delivery.properties.headers().as_ref();
        let attempts = headers
            .and_then(|h| h.inner().get(HEADER_ATTEMPTS))
            .and_then(amqp_int)
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(0);
        let bulk_id = headers
            .and_then(|h| h.inner().get(HEADER_BULK_ID))
            .and_then(amqp_text)
            .and_then(|text| Uuid::parse_str(&text).ok());
        let retry_at = headers
            .and_then(|h| h.inner().get(HEADER_RETRY_AT))
            .and_then(amqp_int)
            .and_then(|ms| {
                OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).ok()
            });
        let replayed = headers.is_some_and(|h| h.contains_key(HEADER_REPLAYED_AT));
        let requeued = headers.is_some_and(|h| h.contains_key(HEADER_REQUEUED));
        let fanout_queued = headers.is_some_and(|h| h.contains_key(HEADER_FANOUT_QUEUED));
        let message_id = delivery
            .properties
            .message_id()
            .as_ref()
            .map(|id| id.as_str().to_owned());
        Incoming {
            delivery: Delivery {
                lane,
                body: delivery.data,
                message_id,
                redelivered: delivery.redelivered,
                attempts,
                bulk_id,
                retry_at,
                replayed,
                requeued,
                fanout_queued,
            },
            routing_key: delivery.routing_key,
            properties: delivery.properties,
            acker: delivery.acker,
            delivery_tag: delivery.delivery_tag,
            batcher: None,
            settled: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Acks the delivery, with others of its channel when it can. Says whether the ack
    /// reached a live channel.
    async fn ack(&self) -> Result<bool, BrokerError> {
        self.settled
            .store(true, std::sync::atomic::Ordering::Release);
        if let Some(batcher) = &self.batcher {
            let (reply, answer) = tokio::sync::oneshot::channel();
            if batcher.send(AckOp::Ack(self.delivery_tag, self.acker.clone(), reply)) {
                return Ok(answer.await.unwrap_or(false));
            }
        }
        within(self.acker.ack(BasicAckOptions::default())).await
    }

    /// Gives the delivery back to its queue.
    async fn requeue(&self) -> Result<bool, BrokerError> {
        self.settled
            .store(true, std::sync::atomic::Ordering::Release);
        let nacked = within(self.acker.nack(BasicNackOptions {
            requeue: true,
            ..BasicNackOptions::default()
        }))
        .await;
        if let Some(batcher) = &self.batcher {
            batcher.send(AckOp::Settled(self.delivery_tag));
        }
        nacked
    }

    /// Whether the delivery can still be settled (its channel is alive and it was not yet).
    pub fn settleable(&self) -> bool {
        self.acker.usable()
    }
}

fn amqp_int(value: &AMQPValue) -> Option<i64> {
    match value {
        AMQPValue::ShortShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortShortUInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortUInt(n) => Some(i64::from(*n)),
        AMQPValue::LongInt(n) => Some(i64::from(*n)),
        AMQPValue::LongUInt(n) => Some(i64::from(*n)),
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok()?.parse().ok(),
        _ => None,
    }
}

fn amqp_text(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(s) => String::from_utf8(s.as_bytes().to_vec()).ok(),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

fn long_string(text: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(text.as_bytes().to_vec()))
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

/// What the connection tells us besides deliveries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrokerEvent {
    /// The broker stopped accepting publishes (a memory or disk alarm).
    Blocked(String),
    Unblocked,
}

/// A connection with a confirmed publishing channel.
#[derive(Clone)]
pub struct Broker {
    connection: Arc<Connection>,
    publisher: Channel,
    topology: Arc<Topology>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("connected", &self.is_connected())
            .finish()
    }
}

/// Adds a heartbeat to the URL unless it already sets one, so a dead peer is noticed in
/// seconds, not minutes.
fn with_heartbeat(url: &str) -> String {
    if url.contains("heartbeat=") {
        url.to_owned()
    } else if url.contains('?') {
        format!("{url}&heartbeat=20")
    } else {
        format!("{url}?heartbeat=20")
    }
}

impl Broker {
    pub async fn connect(url: &str, name: &str, topology: Topology) -> Result<Self, BrokerError> {
        let properties =
            ConnectionProperties::default().with_connection_name(LongString::from(name));
        let connection = within(Connection::connect(&with_heartbeat(url), properties)).await?;
        let publisher = within(connection.create_channel()).await?;
        within(publisher.confirm_select(ConfirmSelectOptions::default())).await?;
        Ok(Broker {
            connection: Arc::new(connection),
            publisher,
            topology: Arc::new(topology),
        })
    }

    /// Connection events (blocked, unblocked) until the connection ends.
    pub fn events(&self) -> impl futures_util::Stream<Item = BrokerEvent> + Send + 'static {
        self.connection
            .events_listener()
            .filter_map(|event| async move {
                match event {
                    lapin::Event::ConnectionBlocked(reason) => Some(BrokerEvent::Blocked(reason)),
                    lapin::Event::ConnectionUnblocked => Some(BrokerEvent::Unblocked),
                    _ => None,
                }
            })
    }

    pub fn is_connected(&self) -> bool {
        self.connection.status().connected() && self.publisher.status().connected()
    }

    pub async fn close(&self) {
        let _ = within(self.publisher.close(200, "smsgw stopping".into())).await;
        let _ = within(self.connection.close(200, "smsgw stopping".into())).await;
    }

    /// Declares every exchange, queue and binding. Idempotent; fails with
    /// PRECONDITION_FAILED when a queue exists with other arguments.
    pub async fn declare_topology(&self) -> Result<(), BrokerError> {
        let channel = within(self.connection.create_channel()).await?;
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        let mut jobs_args = FieldTable::default();
        jobs_args.insert("alternate-exchange".into(), long_string(UNROUTED_EXCHANGE));
        for (name, kind, args) in [
            (
                UNROUTED_EXCHANGE,
                ExchangeKind::Fanout,
                FieldTable::default(),
            ),
            (JOBS_EXCHANGE, ExchangeKind::Topic, jobs_args),
            (
                REQUEUE_EXCHANGE,
                ExchangeKind::Direct,
                FieldTable::default(),
            ),
            (DEAD_EXCHANGE, ExchangeKind::Fanout, FieldTable::default()),
        ] {
            within(channel.exchange_declare(name.into(), kind, durable, args)).await?;
        }

        declare_quorum(&channel, DEAD_QUEUE, FieldTable::default()).await?;
        bind(&channel, DEAD_QUEUE, DEAD_EXCHANGE, "").await?;

        for lane in Lane::ALL {
            let queue = lane_queue(lane);
            let mut args = FieldTable::default();
            args.insert(
                "x-delivery-limit".into(),
                AMQPValue::LongLongInt(i64::from(self.topology.delivery_limit)),
            );
            args.insert("x-dead-letter-exchange".into(), long_string(DEAD_EXCHANGE));
            args.insert(
                "x-dead-letter-strategy".into(),
                long_string("at-least-once"),
            );
            args.insert("x-overflow".into(), long_string("reject-publish"));
            declare_quorum(&channel, queue, args).await?;
            for kind in JobType::ALL.into_iter().filter(|k| k.lane() == lane) {
                bind(&channel, queue, JOBS_EXCHANGE, kind.as_str()).await?;
                bind(&channel, queue, REQUEUE_EXCHANGE, kind.as_str()).await?;
            }
        }
        bind(&channel, lane_queue(Lane::Default), UNROUTED_EXCHANGE, "").await?;

        for delay in &self.topology.delays {
            let name = tier_name(*delay);
            within(channel.exchange_declare(
                name.as_str().into(),
                ExchangeKind::Fanout,
                durable,
                FieldTable::default(),
            ))
            .await?;
            let mut args = FieldTable::default();
            let ttl = i64::try_from(delay.as_millis()).unwrap_or(i64::MAX);
            args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ttl));
            args.insert(
                "x-dead-letter-exchange".into(),
                long_string(REQUEUE_EXCHANGE),
            );
            args.insert(
                "x-dead-letter-strategy".into(),
                long_string("at-least-once"),
            );
            args.insert("x-overflow".into(), long_string("reject-publish"));
            declare_quorum(&channel, &name, args).await?;
            bind(&channel, &name, &name, "").await?;
        }
        let _ = within(channel.close(200, "topology declared".into())).await;
        Ok(())
    }

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

    /// How many messages wait in each of our queues (lanes, tiers, dead letters).
    pub async fn queue_depths(&self) -> Result<Vec<(String, u32)>, BrokerError> {
        let channel = within(self.connection.create_channel()).await?;
        let mut names: Vec<String> = Lane::ALL
            .iter()
            .map(|l| lane_queue(*l).to_owned())
            .collect();
        names.extend(self.topology.delays.iter().map(|d| tier_name(*d)));
        names.push(DEAD_QUEUE.to_owned());
        let mut depths = Vec::with_capacity(names.len());
        for name in names {
            let queue = within(channel.queue_declare(
                name.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            ))
            .await?;
            depths.push((name, queue.message_count()));
        }
        let _ = within(channel.close(200, "depths read".into())).await;
        Ok(depths)
    }

    /// Starts browsing `sms.dead`.
    pub async fn browse_dead(&self) -> Result<DeadBrowser, BrokerError> {
        let channel = within(self.connection.create_channel()).await?;
        let queue = within(channel.queue_declare(
            DEAD_QUEUE.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        ))
        .await?;
        let total = queue.message_count();
        within(channel.basic_qos(u16::MAX, BasicQosOptions::default())).await?;
        let consumer = within(channel.basic_consume(
            DEAD_QUEUE.into(),
            ShortString::from(format!("smsgw-dlq-{}", Uuid::new_v4())),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        ))
        .await?;
        Ok(DeadBrowser {
            channel,
            consumer,
            total,
            seen: 0,
        })
    }

    /// Puts a dead letter back on `sms.jobs`, body unchanged, its history headers removed
    /// (a fresh attempt budget), and waits for the broker's confirm.
    pub async fn replay(&self, letter: &DeadLetter) -> Result<(), BrokerError> {
        let mut headers: FieldTable = letter
            .properties
            .headers()
            .as_ref()
            .map(|h| {
                h.inner()
                    .iter()
                    .filter(|(k, _)| !is_history_header(k.as_str()))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect::<std::collections::BTreeMap<_, _>>()
                    .into()
            })
            .unwrap_or_default();
        headers.insert(
            HEADER_REPLAYED_AT.into(),
            AMQPValue::LongLongInt(unix_ms(OffsetDateTime::now_utc())),
        );
        let properties = letter
            .properties
            .clone()
            .with_delivery_mode(2)
            .with_headers(headers);
        self.publish_confirmed(JOBS_EXCHANGE, &letter.routing_key, &letter.body, properties)
            .await
    }

    /// Publishes a job onto `sms.jobs` (as the web app does) and waits for the confirm.
    pub async fn publish_job(&self, id: Uuid, kind: &str, body: &[u8]) -> Result<(), BrokerError> {
        let properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_message_id(id.to_string().into());
        self.publish_confirmed(JOBS_EXCHANGE, kind, body, properties)
            .await
    }

    /// Publishes fanned-out messages of announcement `bulk_id` straight to their lane,
    /// pipelined, and returns once the broker confirmed every one.
    pub async fn publish_fanout(
        &self,
        bulk_id: Uuid,
        kind: JobType,
        messages: &[(Uuid, Vec<u8>)],
    ) -> Result<(), BrokerError> {
        let mut headers = FieldTable::default();
        headers.insert(HEADER_BULK_ID.into(), long_string(&bulk_id.to_string()));
        let mut pending = Vec::new();
        for (id, body) in messages {
            let properties = BasicProperties::default()
                .with_content_type("application/json".into())
                .with_delivery_mode(2)
                .with_message_id(id.to_string().into())
                .with_headers(headers.clone());
            let confirm = within(self.publisher.basic_publish(
                REQUEUE_EXCHANGE.into(),
                kind.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                body,
                properties,
            ))
            .await?;
            pending.push(confirm);
        }
        for confirm in pending {
            check_confirmation(within(confirm).await?)?;
        }
        Ok(())
    }

    /// Puts an announcement whose fan-out goes on at the back of its lane, as a new
    /// message with the same job id, marked as having its recipients' rows written.
    pub async fn publish_continuation(
        &self,
        job_id: Uuid,
        kind: JobType,
        body: &[u8],
    ) -> Result<(), BrokerError> {
        let mut headers = FieldTable::default();
        headers.insert(HEADER_FANOUT_QUEUED.into(), AMQPValue::Boolean(true));
        let properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_message_id(job_id.to_string().into())
            .with_headers(headers);
        self.publish_confirmed(REQUEUE_EXCHANGE, kind.as_str(), body, properties)
            .await
    }

    async fn publish_confirmed(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), BrokerError> {
        let confirm = within(self.publisher.basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            body,
            properties,
        ))
        .await?;
        check_confirmation(within(confirm).await?)
    }

    /// Carries out a disposition. The delivery is acked only after any republish it needs
    /// was confirmed; on an error it stays unsettled (the caller decides what next).
    pub async fn settle(
        &self,
        incoming: &Incoming,
        disposition: &Disposition,
    ) -> Result<(), BrokerError> {
        match disposition {
            Disposition::Ack => {}
            Disposition::Retry {
                delay,
                attempts,
                kind,
            } => {
                let tier = self.topology.tier_at_least(*delay);
                let retry_at = OffsetDateTime::now_utc() + *delay;
                self.republish(
                    incoming,
                    &tier_name(tier),
                    kind.as_str(),
                    *attempts,
                    Some(retry_at),
                    None,
                )
                .await?;
            }
            Disposition::Defer { until, kind } => {
                let remaining = (*until - OffsetDateTime::now_utc())
                    .try_into()
                    .unwrap_or(Duration::ZERO);
                let tier = self.topology.tier_at_most(remaining);
                self.republish(
                    incoming,
                    &tier_name(tier),
                    kind.as_str(),
                    incoming.delivery.attempts,
                    incoming.delivery.retry_at,
                    None,
                )
                .await?;
            }
            Disposition::DeadLetter {
                reason,
                error,
                attempts,
            } => {
                let routing_key = incoming.routing_key.as_str().to_owned();
                self.republish(
                    incoming,
                    DEAD_EXCHANGE,
                    &routing_key,
                    *attempts,
                    None,
                    Some((*reason, error.as_str())),
                )
                .await?;
            }
            Disposition::FanOut {
                announcement,
                kind,
                messages,
                rest,
            } => {
                self.publish_fanout(*announcement, *kind, messages).await?;
                if let Some(rest) = rest {
                    self.publish_continuation(*announcement, *kind, rest)
                        .await?;
                }
            }
            Disposition::Unsettled => return Ok(()),
            Disposition::Requeue => {
                incoming.requeue().await?;
                return Ok(());
            }
        }
        let acked = incoming.ack().await?;
        if !acked {
            // The channel died under us: the broker will deliver it again, and the log
            // (not the broker) tells the next delivery what was already done.
            tracing::warn!("could not ack: the channel closed; the message will come back");
        }
        Ok(())
    }

    /// Publishes the delivery's body unchanged with our headers added.
    async fn republish(
        &self,
        incoming: &Incoming,
        exchange: &str,
        routing_key: &str,
        attempts: u32,
        retry_at: Option<OffsetDateTime>,
        dead: Option<(DeadReason, &str)>,
    ) -> Result<(), BrokerError> {
        let mut headers: FieldTable = incoming
            .properties
            .headers()
            .as_ref()
            .map(|h| {
                h.inner()
                    .iter()
                    .filter(|(k, _)| {
                        // The broker's delivery count belongs to the queue it came from.
                        k.as_str() != HEADER_RETRY_AT
                            && k.as_str() != "x-delivery-count"
                            && !(dead.is_some() && k.as_str() == HEADER_REPLAYED_AT)
                    })
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect::<std::collections::BTreeMap<_, _>>()
                    .into()
            })
            .unwrap_or_default();
        headers.insert(
            HEADER_ATTEMPTS.into(),
            AMQPValue::LongLongInt(i64::from(attempts)),
        );
        if let Some(at) = retry_at {
            headers.insert(HEADER_RETRY_AT.into(), AMQPValue::LongLongInt(unix_ms(at)));
        }
        if dead.is_none() {
            headers.insert(HEADER_REQUEUED.into(), AMQPValue::Boolean(true));
        }
        if let Some((reason, error)) = dead {
            headers.insert(
                HEADER_DEAD_AT.into(),
                AMQPValue::LongLongInt(unix_ms(OffsetDateTime::now_utc())),
            );
            headers.insert(HEADER_REASON.into(), long_string(reason.as_str()));
            let error: String = error.chars().take(MAX_ERROR_HEADER).collect();
            headers.insert(HEADER_ERROR.into(), long_string(&error));
        }
        let properties = incoming
            .properties
            .clone()
            .with_delivery_mode(2)
            .with_headers(headers);
        self.publish_confirmed(exchange, routing_key, &incoming.delivery.body, properties)
            .await
    }
}

fn unix_ms(at: OffsetDateTime) -> i64 {
    i64::try_from(at.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

fn from_unix_ms(ms: i64) -> Option<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).ok()
}

/// Headers a replay removes: ours (reason, error, attempts, timing) and the broker's
/// dead-lettering history, so the job starts with a fresh attempt budget.
fn is_history_header(name: &str) -> bool {
    matches!(
        name,
        HEADER_REASON
            | HEADER_ERROR
            | HEADER_ATTEMPTS
            | HEADER_RETRY_AT
            | HEADER_DEAD_AT
            | HEADER_REPLAYED_AT
            | HEADER_REQUEUED
            | "x-death"
            | "x-delivery-count"
    ) || name.starts_with("x-first-death-")
        || name.starts_with("x-last-death-")
}

/// A message in `sms.dead`, as the dead-letter tools see it.
pub struct DeadLetter {
    pub message_id: Option<String>,
    pub routing_key: String,
    pub body: Vec<u8>,
    /// `x-smsgw-reason`, or the broker's own reason (e.g. `delivery_limit`).
    pub reason: String,
    pub error: Option<String>,
    pub attempts: Option<i64>,
    pub dead_at: Option<OffsetDateTime>,
    properties: BasicProperties,
    acker: Acker,
}

impl std::fmt::Debug for DeadLetter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeadLetter")
            .field("message_id", &self.message_id)
            .field("reason", &self.reason)
            .finish()
    }
}

impl DeadLetter {
    fn from_delivery(delivery: lapin::message::Delivery) -> Self {
        let headers = delivery.properties.headers().clone().unwrap_or_default();
        let get = |key: &str| headers.inner().get(key);
        let first_death = get("x-death").and_then(|v| match v {
            AMQPValue::FieldArray(deaths) => deaths.as_slice().first().and_then(|d| match d {
                AMQPValue::FieldTable(t) => Some(t.clone()),
                _ => None,
            }),
            _ => None,
        });
        let death = |key: &str| {
            first_death
                .as_ref()
                .and_then(|t| t.inner().get(key).cloned())
        };
        let reason = get(HEADER_REASON)
            .and_then(amqp_text)
            .or_else(|| death("reason").as_ref().and_then(amqp_text))
            .unwrap_or_else(|| "unknown".to_owned());
        let dead_at = get(HEADER_DEAD_AT)
            .and_then(amqp_int)
            .and_then(from_unix_ms)
            .or_else(|| match death("time") {
                Some(AMQPValue::Timestamp(seconds)) => {
                    OffsetDateTime::from_unix_timestamp(i64::try_from(seconds).ok()?).ok()
                }
                _ => None,
            });
        DeadLetter {
            message_id: delivery
                .properties
                .message_id()
                .as_ref()
                .map(|m| m.as_str().to_owned()),
            routing_key: delivery.routing_key.as_str().to_owned(),
            reason,
            error: get(HEADER_ERROR).and_then(amqp_text),
            attempts: get(HEADER_ATTEMPTS).and_then(amqp_int),
            dead_at,
            body: delivery.data,
            properties: delivery.properties,
            acker: delivery.acker,
        }
    }

    /// Every header, printable, for `smsgw dlq show`.
    pub fn headers(&self) -> Vec<(String, String)> {
        self.properties
            .headers()
            .as_ref()
            .map(|h| {
                h.inner()
                    .iter()
                    .map(|(k, v)| (k.as_str().to_owned(), printable(v)))
                    .collect()
            })
            .unwrap_or_default()
    }
}

fn printable(value: &AMQPValue) -> String {
    match value {
        AMQPValue::LongString(_) | AMQPValue::ShortString(_) => {
            amqp_text(value).unwrap_or_default()
        }
        AMQPValue::FieldArray(items) => format!(
            "[{}]",
            items
                .as_slice()
                .iter()
                .map(printable)
                .collect::<Vec<_>>()
                .join(", ")
        ),
        AMQPValue::FieldTable(table) => format!(
            "{{{}}}",
            table
                .inner()
                .iter()
                .map(|(k, v)| format!("{}: {}", k.as_str(), printable(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        other => amqp_int(other)
            .map(|n| n.to_string())
            .unwrap_or_else(|| format!("{other:?}")),
    }
}

/// Reads `sms.dead` without taking anything: deliveries stay unacked until [`remove`]d;
/// the rest go back to their original places when the browser closes.
///
/// [`remove`]: DeadBrowser::remove
pub struct DeadBrowser {
    channel: Channel,
    consumer: Consumer,
    /// How many messages the queue held when browsing began.
    pub total: u32,
    seen: u32,
}

/// Most messages one browse holds at once (AMQP's prefetch is a 16-bit number).
pub const MAX_BROWSE: u32 = u16::MAX as u32;

impl DeadBrowser {
    /// The next dead letter; `None` when every message present at the start was seen.
    pub async fn next(&mut self) -> Option<Result<DeadLetter, BrokerError>> {
        if self.seen >= self.total.min(MAX_BROWSE) {
            return None;
        }
        // Another client may hold some of them: stop when nothing comes for a while.
        match tokio::time::timeout(Duration::from_secs(5), self.consumer.next()).await {
            Ok(Some(Ok(delivery))) => {
                self.seen += 1;
                Some(Ok(DeadLetter::from_delivery(delivery)))
            }
            Ok(Some(Err(e))) => Some(Err(e.into())),
            Ok(None) | Err(_) => None,
        }
    }

    /// Removes a dead letter from `sms.dead` for good.
    pub async fn remove(&self, letter: &DeadLetter) -> Result<(), BrokerError> {
        if within(letter.acker.ack(BasicAckOptions::default())).await? {
            Ok(())
        } else {
            Err(BrokerError::Returned("the browse channel closed".into()))
        }
    }

    /// Puts everything not removed back where it was.
    pub async fn close(self) {
        let _ = within(self.channel.close(200, "browse done".into())).await;
    }
}

fn check_confirmation(confirmation: lapin::Confirmation) -> Result<(), BrokerError> {
    if confirmation.is_nack() {
        return Err(BrokerError::Nacked);
    }
    match confirmation.take_message() {
        Some(returned) => Err(BrokerError::Returned(returned.reply_text.to_string())),
        None => Ok(()),
    }
}

async fn declare_quorum(
    channel: &Channel,
    name: &str,
    mut args: FieldTable,
) -> Result<(), BrokerError> {
    args.insert("x-queue-type".into(), long_string("quorum"));
    within(channel.queue_declare(
        name.into(),
        QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        },
        args,
    ))
    .await?;
    Ok(())
}

async fn bind(
    channel: &Channel,
    queue: &str,
    exchange: &str,
    key: &str,
) -> Result<(), BrokerError> {
    within(channel.queue_bind(
        queue.into(),
        exchange.into(),
        key.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    ))
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topology() -> Topology {
        Topology {
            delays: [10, 60, 300].into_iter().map(Duration::from_secs).collect(),
            delivery_limit: 10,
        }
    }

    #[test]
    fn tier_names_are_compact() {
        assert_eq!(tier_name(Duration::from_secs(10)), "sms.retry.10s");
        assert_eq!(tier_name(Duration::from_secs(90)), "sms.retry.1m30s");
        assert_eq!(tier_name(Duration::from_millis(200)), "sms.retry.200ms");
    }

    #[test]
    fn retries_wait_at_least_the_delay_asked() {
        let t = topology();
        assert_eq!(
            t.tier_at_least(Duration::from_secs(10)),
            Duration::from_secs(10)
        );
        assert_eq!(
            t.tier_at_least(Duration::from_secs(11)),
            Duration::from_secs(60)
        );
        assert_eq!(
            t.tier_at_least(Duration::from_secs(9999)),
            Duration::from_secs(300)
        );
    }

    #[test]
    fn scheduled_sends_never_overshoot_by_more_than_the_shortest_tier() {
        let t = topology();
        assert_eq!(
            t.tier_at_most(Duration::from_secs(3)),
            Duration::from_secs(10)
        );
        assert_eq!(
            t.tier_at_most(Duration::from_secs(70)),
            Duration::from_secs(60)
        );
        assert_eq!(
            t.tier_at_most(Duration::from_secs(9999)),
            Duration::from_secs(300)
        );
    }
}
