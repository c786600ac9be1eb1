//! Publishing with the broker's confirm, and carrying out a [`Disposition`]: a delivery
//! is acked only after any republish it needs was confirmed.

use std::time::Duration;

use lapin::{
    BasicProperties,
    options::BasicPublishOptions,
    types::{AMQPValue, FieldTable},
};
use time::OffsetDateTime;
use uuid::Uuid;

use super::{
    Broker, BrokerError, DEAD_EXCHANGE, Incoming, JOBS_EXCHANGE, REQUEUE_EXCHANGE,
    headers::{
        HEADER_ATTEMPTS, HEADER_BULK_ID, HEADER_DEAD_AT, HEADER_ERROR, HEADER_FANOUT_QUEUED,
        HEADER_FIRST_SEEN, HEADER_REASON, HEADER_REPLAYED_AT, HEADER_REQUEUED, HEADER_RETRY_AT,
        carried, long_string, unix_ms,
    },
    tier_name, within,
};
use crate::{
    disposition::{DeadReason, Disposition},
    job::JobType,
    phone::redact_numbers,
};

/// Longest `x-smsgw-error` we write.
const MAX_ERROR_HEADER: usize = 1_000;

/// Where a delivery goes before it is acked, and what our headers on it say.
struct Republish<'a> {
    exchange: String,
    routing_key: &'a str,
    attempts: u32,
    retry_at: Option<OffsetDateTime>,
    dead: Option<(DeadReason, &'a str)>,
}

impl Broker {
    /// Publishes a job onto `sms.jobs` (as the web app does) and waits for the confirm. Its
    /// AMQP `timestamp` is now: a default expiry counts from it.
    pub async fn publish_job(&self, id: Uuid, kind: &str, body: &[u8]) -> Result<(), BrokerError> {
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_message_id(id.to_string().into())
            .with_timestamp(u64::try_from(now).unwrap_or_default());
        self.publish_confirmed(JOBS_EXCHANGE, kind, body, properties)
            .await
    }

    /// Carries out a disposition. The delivery is acked only after any republish it needs
    /// was confirmed; on an error it stays unsettled (the caller decides what next).
    pub async fn settle(
        &self,
        incoming: &Incoming,
        disposition: &Disposition,
    ) -> Result<(), BrokerError> {
        match disposition {
            Disposition::Unsettled => return Ok(()),
            Disposition::Requeue => {
                incoming.give_back().await?;
                return Ok(());
            }
            Disposition::FanOut {
                announcement,
                kind,
                messages,
                rest,
            } => {
                let first_seen = incoming.delivery.first_seen;
                self.publish_fanout(*announcement, *kind, messages, first_seen)
                    .await?;
                if let Some(rest) = rest {
                    self.publish_continuation(*announcement, *kind, rest, first_seen)
                        .await?;
                }
            }
            Disposition::Ack => {}
            Disposition::Retry { .. }
            | Disposition::Defer { .. }
            | Disposition::DeadLetter { .. } => {
                if let Some(target) = self.republish_for(incoming, disposition) {
                    self.republish(incoming, target).await?;
                }
            }
        }
        if !incoming.ack().await? {
            // The channel died under us: the broker will deliver it again, and the log
            // (not the broker) tells the next delivery what was already done.
            tracing::warn!("could not ack: the channel closed; the message will come back");
        }
        Ok(())
    }

    /// A retry waits in the shortest tier at least as long as asked; a deferred message
    /// in the longest that does not overshoot; a dead letter goes to `sms.dead`.
    fn republish_for<'a>(
        &self,
        incoming: &'a Incoming,
        disposition: &'a Disposition,
    ) -> Option<Republish<'a>> {
        let delivery = &incoming.delivery;
        Some(match disposition {
            Disposition::Retry {
                delay,
                attempts,
                kind,
            } => Republish {
                exchange: tier_name(self.topology.tier_at_least(*delay)),
                routing_key: kind.as_str(),
                attempts: *attempts,
                retry_at: Some(OffsetDateTime::now_utc() + *delay),
                dead: None,
            },
            Disposition::Defer { until, kind } => {
                let remaining = (*until - OffsetDateTime::now_utc())
                    .try_into()
                    .unwrap_or(Duration::ZERO);
                Republish {
                    exchange: tier_name(self.topology.tier_at_most(remaining)),
                    routing_key: kind.as_str(),
                    attempts: delivery.attempts,
                    retry_at: delivery.retry_at,
                    dead: None,
                }
            }
            Disposition::DeadLetter {
                reason,
                error,
                attempts,
            } => Republish {
                exchange: DEAD_EXCHANGE.to_owned(),
                routing_key: incoming.routing_key.as_str(),
                attempts: *attempts,
                retry_at: None,
                dead: Some((*reason, error.as_str())),
            },
            _ => return None,
        })
    }

    /// Publishes the delivery's body unchanged with our headers added.
    async fn republish(
        &self,
        incoming: &Incoming,
        target: Republish<'_>,
    ) -> Result<(), BrokerError> {
        let dead = target.dead.is_some();
        // The broker's delivery count belongs to the queue it came from.
        let mut headers = carried(&incoming.properties, |k| {
            k == HEADER_RETRY_AT || k == "x-delivery-count" || (dead && k == HEADER_REPLAYED_AT)
        });
        headers.insert(
            HEADER_ATTEMPTS.into(),
            AMQPValue::LongLongInt(i64::from(target.attempts)),
        );
        headers.insert(
            HEADER_FIRST_SEEN.into(),
            AMQPValue::LongLongInt(unix_ms(incoming.delivery.first_seen)),
        );
        if let Some(at) = target.retry_at {
            headers.insert(HEADER_RETRY_AT.into(), AMQPValue::LongLongInt(unix_ms(at)));
        }
        match target.dead {
            None => {
                headers.insert(HEADER_REQUEUED.into(), AMQPValue::Boolean(true));
            }
            Some((reason, error)) => mark_dead(&mut headers, reason, error),
        }
        let properties = incoming
            .properties
            .clone()
            .with_delivery_mode(2)
            .with_headers(headers);
        let body = &incoming.delivery.body;
        self.publish_confirmed(&target.exchange, target.routing_key, body, properties)
            .await
    }

    /// Publishes fanned-out messages of announcement `bulk_id` straight to their lane,
    /// pipelined, and returns once the broker confirmed every one.
    async fn publish_fanout(
        &self,
        bulk_id: Uuid,
        kind: JobType,
        messages: &[(Uuid, Vec<u8>)],
        first_seen: OffsetDateTime,
    ) -> Result<(), BrokerError> {
        let mut headers = first_seen_header(first_seen);
        headers.insert(HEADER_BULK_ID.into(), long_string(&bulk_id.to_string()));
        let mut pending = Vec::with_capacity(messages.len());
        for (id, body) in messages {
            let properties = json_properties(*id).with_headers(headers.clone());
            let confirm = within(self.publisher.basic_publish(
                REQUEUE_EXCHANGE.into(),
                kind.as_str().into(),
                mandatory(),
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
    async fn publish_continuation(
        &self,
        job_id: Uuid,
        kind: JobType,
        body: &[u8],
        first_seen: OffsetDateTime,
    ) -> Result<(), BrokerError> {
        let mut headers = first_seen_header(first_seen);
        headers.insert(HEADER_FANOUT_QUEUED.into(), AMQPValue::Boolean(true));
        let properties = json_properties(job_id).with_headers(headers);
        self.publish_confirmed(REQUEUE_EXCHANGE, kind.as_str(), body, properties)
            .await
    }

    pub(super) async fn publish_confirmed(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), BrokerError> {
        let confirm = within(self.publisher.basic_publish(
            exchange.into(),
            routing_key.into(),
            mandatory(),
            body,
            properties,
        ))
        .await?;
        check_confirmation(within(confirm).await?)
    }
}

/// Our headers on a dead letter: when, why, and the error, shortened and with phone
/// numbers masked (a provider's error text often quotes the recipient, and dead letters
/// are kept and shown to whoever inspects the queue).
fn mark_dead(headers: &mut FieldTable, reason: DeadReason, error: &str) {
    headers.insert(
        HEADER_DEAD_AT.into(),
        AMQPValue::LongLongInt(unix_ms(OffsetDateTime::now_utc())),
    );
    headers.insert(HEADER_REASON.into(), long_string(reason.as_str()));
    let error: String = redact_numbers(error)
        .chars()
        .take(MAX_ERROR_HEADER)
        .collect();
    headers.insert(HEADER_ERROR.into(), long_string(&error));
}

/// Our headers on a job published for an announcement: when the announcement was first
/// seen, so that its recipients' default expiry counts from then.
fn first_seen_header(first_seen: OffsetDateTime) -> FieldTable {
    let mut headers = FieldTable::default();
    headers.insert(
        HEADER_FIRST_SEEN.into(),
        AMQPValue::LongLongInt(unix_ms(first_seen)),
    );
    headers
}

/// A persistent JSON message with our job id as its `message_id`.
fn json_properties(id: Uuid) -> BasicProperties {
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_message_id(id.to_string().into())
}

/// Unroutable publishes come back to us instead of vanishing.
fn mandatory() -> BasicPublishOptions {
    BasicPublishOptions {
        mandatory: true,
        ..BasicPublishOptions::default()
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::headers::amqp_text;

    #[test]
    fn a_dead_letters_error_never_holds_a_full_number() {
        let mut headers = FieldTable::default();
        let error =
            "refused by the provider (HTTP 400): 21211 The 'To' number +447700900123 is not valid";
        mark_dead(&mut headers, DeadReason::PermanentFailure, error);
        let written = headers.inner().get(HEADER_ERROR).and_then(amqp_text);
        assert_eq!(
            written.as_deref(),
            Some(
                "refused by the provider (HTTP 400): 21211 The 'To' number +44*******123 is not valid"
            )
        );
    }
}
