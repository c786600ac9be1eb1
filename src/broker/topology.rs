//! The queues and exchanges, declared idempotently at every start, and their depths.

use std::time::Duration;

use lapin::{
    Channel, ExchangeKind,
    options::{ExchangeBindOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable},
};

use super::{
    Broker, BrokerError, DEAD_EXCHANGE, DEAD_QUEUE, JOBS_EXCHANGE, REPLAY_EXCHANGE,
    REQUEUE_EXCHANGE, UNROUTED_EXCHANGE, headers::long_string, within,
};
use crate::{
    config::BrokerSettings,
    job::{JobType, Lane},
};

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

/// The shape of the queues, from configuration.
#[derive(Debug, Clone)]
pub struct Topology {
    /// Delay tiers, shortest first.
    pub delays: Vec<Duration>,
    pub delivery_limit: u32,
}

impl From<&BrokerSettings> for Topology {
    fn from(settings: &BrokerSettings) -> Self {
        Topology {
            delays: settings.retry_delays.clone(),
            delivery_limit: settings.delivery_limit,
        }
    }
}

impl Topology {
    /// The tier to wait in for a retry: the shortest one at least `delay` long.
    pub(super) fn tier_at_least(&self, delay: Duration) -> Duration {
        self.delays
            .iter()
            .copied()
            .find(|tier| *tier >= delay)
            .or_else(|| self.delays.last().copied())
            .unwrap_or(delay)
    }

    /// The tier to wait in for a scheduled send: the longest one that does not overshoot
    /// `remaining` (the shortest when all do), so the message comes back on time.
    pub(super) fn tier_at_most(&self, remaining: Duration) -> Duration {
        self.delays
            .iter()
            .rev()
            .copied()
            .find(|tier| *tier <= remaining)
            .or_else(|| self.delays.first().copied())
            .unwrap_or(remaining)
    }
}

/// `x-delivery-limit` of `sms.dead`, a number no browsing ever reaches. Browsing gives
/// back every letter it looked at, and RabbitMQ may count that as a delivery (every return
/// up to 4.2; a closed channel on 4.3). From 4.0 a quorum queue without a limit has one of
/// 20, and `sms.dead` has nowhere to dead-letter to: twenty browses would drop its letters.
/// `-1`, "no limit" on 4.x, is no answer: 3.x takes it as a limit below zero and drops a
/// letter the first time it is given back.
pub(super) const DEAD_DELIVERY_LIMIT: i64 = 2_147_483_647;

impl Broker {
    /// Declares every exchange, queue and binding. Idempotent; fails with
    /// PRECONDITION_FAILED when a lane or a tier exists with other arguments. An existing
    /// `sms.dead` with other arguments is used as it is (see [`Broker::declare_dead_queue`]).
    pub async fn declare_topology(&self) -> Result<(), BrokerError> {
        let channel = within(self.connection.create_channel()).await?;
        declare_exchanges(&channel).await?;
        self.declare_dead_queue().await?;
        bind(&channel, DEAD_QUEUE, DEAD_EXCHANGE, "").await?;
        for lane in Lane::ALL {
            self.declare_lane(&channel, lane).await?;
        }
        bind(&channel, lane_queue(Lane::Default), UNROUTED_EXCHANGE, "").await?;
        for delay in &self.topology.delays {
            declare_tier(&channel, *delay).await?;
        }
        let _ = within(channel.close(200, "topology declared".into())).await;
        Ok(())
    }

    /// Declares `sms.dead` with [`DEAD_DELIVERY_LIMIT`], on a channel of its own. A queue
    /// declared before with other arguments (an older smsgw declared it with none) cannot
    /// be redeclared, and holds letters that must not be lost by recreating it: it is used
    /// as it is, with a warning, and a policy sets its limit (docs/operations.md).
    async fn declare_dead_queue(&self) -> Result<(), BrokerError> {
        let channel = within(self.connection.create_channel()).await?;
        let mut args = FieldTable::default();
        args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(DEAD_DELIVERY_LIMIT),
        );
        match declare_quorum(&channel, DEAD_QUEUE, args).await {
            Ok(()) => {
                let _ = within(channel.close(200, "sms.dead declared".into())).await;
                Ok(())
            }
            Err(e) if e.is_precondition_failed() => {
                // The broker closed that channel; check on another that the queue is there.
                self.check_dead_queue().await?;
                tracing::warn!(
                    error = %e,
                    "sms.dead exists with other arguments than smsgw declares; it is used as \
                     it is. Unless a policy sets its delivery-limit, RabbitMQ 4.x drops a \
                     letter browsed 20 times: see the operations guide on sms.dead"
                );
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Fails unless `sms.dead` exists (a passive declare).
    async fn check_dead_queue(&self) -> Result<(), BrokerError> {
        let channel = within(self.connection.create_channel()).await?;
        super::dead::dead_letter_count(&channel).await?;
        let _ = within(channel.close(200, "sms.dead checked".into())).await;
        Ok(())
    }

    /// A lane: its quorum queue, dead-lettering to `sms.dead` past the delivery limit, bound
    /// to its job types on `sms.jobs` (fresh publishes) and `sms.requeue` (our own).
    async fn declare_lane(&self, channel: &Channel, lane: Lane) -> Result<(), BrokerError> {
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
        declare_quorum(channel, queue, args).await?;
        for kind in JobType::ALL.into_iter().filter(|k| k.lane() == lane) {
            bind(channel, queue, JOBS_EXCHANGE, kind.as_str()).await?;
            bind(channel, queue, REQUEUE_EXCHANGE, kind.as_str()).await?;
        }
        Ok(())
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
}

/// The exchanges, and `sms.replay` bound to `sms.jobs`: a replay is routed exactly as a
/// fresh publish is (unroutable types to `sms.unrouted` too), yet its delivery names
/// `sms.replay`, an exchange only smsgw publishes to.
async fn declare_exchanges(channel: &Channel) -> Result<(), BrokerError> {
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
        (REPLAY_EXCHANGE, ExchangeKind::Fanout, FieldTable::default()),
    ] {
        within(channel.exchange_declare(name.into(), kind, durable(), args)).await?;
    }
    within(channel.exchange_bind(
        JOBS_EXCHANGE.into(),
        REPLAY_EXCHANGE.into(),
        "".into(),
        ExchangeBindOptions::default(),
        FieldTable::default(),
    ))
    .await
}

/// A retry tier: a fanout exchange and a queue of its name whose messages expire after
/// `delay` into `sms.requeue`, which routes them back to their lane by job type.
async fn declare_tier(channel: &Channel, delay: Duration) -> Result<(), BrokerError> {
    let name = tier_name(delay);
    within(channel.exchange_declare(
        name.as_str().into(),
        ExchangeKind::Fanout,
        durable(),
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
    declare_quorum(channel, &name, args).await?;
    bind(channel, &name, &name, "").await
}

fn durable() -> ExchangeDeclareOptions {
    ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
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
