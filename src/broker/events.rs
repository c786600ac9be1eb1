//! Status events out to `sms.events` (contract section 9): a topic exchange the web app
//! binds its own queues to (`*.failed`, `#`, ...). Events are published in the order
//! given and each is confirmed before the batch counts as published.

use futures_util::future::try_join_all;
use lapin::{
    BasicProperties, ExchangeKind,
    options::{BasicPublishOptions, ExchangeDeclareOptions},
    types::FieldTable,
};
use uuid::Uuid;

use super::{Broker, BrokerError, EVENTS_EXCHANGE, within};

/// One event, encoded.
#[derive(Debug, Clone)]
pub struct OutgoingEvent {
    pub event_id: Uuid,
    /// `<type>.<status>`.
    pub routing_key: String,
    /// The event as JSON.
    pub body: Vec<u8>,
}

impl Broker {
    /// Declares `sms.events` (topic, durable). Idempotent.
    pub async fn declare_events_exchange(&self) -> Result<(), BrokerError> {
        let options = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        within(self.publisher.exchange_declare(
            EVENTS_EXCHANGE.into(),
            ExchangeKind::Topic,
            options,
            FieldTable::default(),
        ))
        .await
    }

    /// Publishes `events` in order on one channel (so each queue receives them in that
    /// order) and returns once the broker confirmed all of them. An event nobody is bound
    /// to is dropped by the broker, as a topic exchange does: that is not an error.
    pub async fn publish_events(&self, events: &[OutgoingEvent]) -> Result<(), BrokerError> {
        let mut confirms = Vec::with_capacity(events.len());
        for event in events {
            let properties = BasicProperties::default()
                .with_content_type("application/json".into())
                .with_delivery_mode(2)
                .with_message_id(event.event_id.to_string().into());
            confirms.push(
                within(self.publisher.basic_publish(
                    EVENTS_EXCHANGE.into(),
                    event.routing_key.as_str().into(),
                    BasicPublishOptions::default(),
                    &event.body,
                    properties,
                ))
                .await?,
            );
        }
        let confirmations = within(try_join_all(confirms)).await?;
        if confirmations.iter().any(lapin::Confirmation::is_nack) {
            return Err(BrokerError::Nacked);
        }
        Ok(())
    }
}
