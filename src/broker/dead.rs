//! The dead letters: browsing `sms.dead` without taking anything, replaying, and removing
//! those past their retention from the head of the queue.

use std::time::Duration;

use futures_util::StreamExt;
use lapin::{
    Acker, BasicProperties, Channel, Consumer,
    options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable, ShortString},
};
use time::OffsetDateTime;
use uuid::Uuid;

use super::{
    Broker, BrokerError, DEAD_QUEUE, REPLAY_EXCHANGE,
    headers::{
        HEADER_ATTEMPTS, HEADER_DEAD_AT, HEADER_ERROR, HEADER_REASON, HEADER_REPLAYED_AT,
        HEADER_REQUEUED, HEADER_RETRY_AT, amqp_int, amqp_text, carried, from_unix_ms, unix_ms,
    },
    within,
};

/// How many letters `sms.dead` holds; an error unless it exists (a passive declare).
pub(super) async fn dead_letter_count(channel: &Channel) -> Result<u32, BrokerError> {
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let queue =
        within(channel.queue_declare(DEAD_QUEUE.into(), passive, FieldTable::default())).await?;
    Ok(queue.message_count())
}

impl Broker {
    /// Starts browsing `sms.dead`.
    pub async fn browse_dead(&self) -> Result<DeadBrowser, BrokerError> {
        let channel = within(self.connection.create_channel()).await?;
        let total = dead_letter_count(&channel).await?;
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
            stalled: false,
        })
    }

    /// Puts a dead letter back on `sms.jobs`, body unchanged, its history headers removed
    /// (a fresh attempt budget), and waits for the broker's confirm. It goes through
    /// `sms.replay`, bound to `sms.jobs`: the delivery then shows it came from smsgw, and
    /// its replay mark is trusted (one on a publish to `sms.jobs` is not).
    pub async fn replay(&self, letter: &DeadLetter) -> Result<(), BrokerError> {
        let mut headers = carried(&letter.properties, is_history_header);
        headers.insert(
            HEADER_REPLAYED_AT.into(),
            AMQPValue::LongLongInt(unix_ms(OffsetDateTime::now_utc())),
        );
        let properties = letter
            .properties
            .clone()
            .with_delivery_mode(2)
            .with_headers(headers);
        self.publish_confirmed(
            REPLAY_EXCHANGE,
            &letter.routing_key,
            &letter.body,
            properties,
        )
        .await
    }
}

/// What one pass of [`Broker::remove_old_dead_letters`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeadPruned {
    /// Letters removed for good.
    pub removed: u32,
    /// Letters that say nothing about when they died (not ours, nor the broker's): kept.
    pub undated: u32,
    /// When the first letter kept for its age becomes old enough: no letter behind it
    /// can be due sooner.
    pub next_due: Option<OffsetDateTime>,
}

/// Letters a pruning pass holds at once: the undated ones it steps over, the one it stops
/// at, and those the broker sent ahead. Few, because each one handed back may count as a
/// redelivery, which a quorum queue with a delivery limit holds against it.
const PRUNE_PREFETCH: u16 = 16;

impl Broker {
    /// Removes dead letters that died more than `age` ago from the head of `sms.dead`,
    /// reading at most `max_read`. Letters are appended as they die, so the head is the
    /// oldest: the pass stops at the first letter younger than `age`, and everything it
    /// took without removing goes back to its place when its channel closes.
    pub async fn remove_old_dead_letters(
        &self,
        age: Duration,
        max_read: u32,
    ) -> Result<DeadPruned, BrokerError> {
        let channel = within(self.connection.create_channel()).await?;
        let pruned = prune_head(&channel, age, max_read).await;
        let _ = within(channel.close(200, "retention done".into())).await;
        pruned
    }
}

async fn prune_head(
    channel: &Channel,
    age: Duration,
    max_read: u32,
) -> Result<DeadPruned, BrokerError> {
    let mut pruned = DeadPruned::default();
    let to_read = dead_letter_count(channel).await?.min(max_read);
    if to_read == 0 {
        return Ok(pruned);
    }
    within(channel.basic_qos(PRUNE_PREFETCH, BasicQosOptions::default())).await?;
    let mut consumer = within(channel.basic_consume(
        DEAD_QUEUE.into(),
        ShortString::from(format!("smsgw-retention-{}", Uuid::new_v4())),
        BasicConsumeOptions::default(),
        FieldTable::default(),
    ))
    .await?;
    let cutoff = OffsetDateTime::now_utc() - age;
    for _ in 0..to_read {
        let Ok(Some(delivery)) = tokio::time::timeout(SILENCE, consumer.next()).await else {
            break;
        };
        let letter = DeadLetter::from_delivery(delivery?);
        match letter.dead_at {
            Some(at) if at <= cutoff => {
                if within(letter.acker.ack(BasicAckOptions::default())).await? {
                    pruned.removed += 1;
                }
            }
            Some(at) => {
                pruned.next_due = Some(at + age);
                break;
            }
            None => {
                pruned.undated += 1;
                // The window is full of letters held back: no more would come.
                if pruned.undated >= u32::from(PRUNE_PREFETCH) {
                    break;
                }
            }
        }
    }
    Ok(pruned)
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
    /// Nothing came for a while although letters were left to see.
    stalled: bool,
}

/// Why a browse saw fewer dead letters than the queue held when it began.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shortfall {
    /// One browse holds at most [`MAX_BROWSE`] letters at once.
    Limit,
    /// The rest did not come within [`SILENCE`]: another client holds them, or they were
    /// taken meanwhile.
    Silence,
}

/// How long a browse waits for the next letter before it stops.
pub const SILENCE: Duration = Duration::from_secs(5);

/// Most messages one browse holds at once (AMQP's prefetch is a 16-bit number).
pub const MAX_BROWSE: u32 = u16::MAX as u32;

impl DeadBrowser {
    /// The next dead letter; `None` when every message present at the start was seen.
    pub async fn next(&mut self) -> Option<Result<DeadLetter, BrokerError>> {
        if self.seen >= self.total.min(MAX_BROWSE) {
            return None;
        }
        // Another client may hold some of them: stop when nothing comes for a while.
        match tokio::time::timeout(SILENCE, self.consumer.next()).await {
            Ok(Some(Ok(delivery))) => {
                self.seen += 1;
                Some(Ok(DeadLetter::from_delivery(delivery)))
            }
            Ok(Some(Err(e))) => Some(Err(e.into())),
            Ok(None) | Err(_) => {
                self.stalled = true;
                None
            }
        }
    }

    /// How many dead letters this browse has read.
    pub fn seen(&self) -> u32 {
        self.seen
    }

    /// Why the browse, read to its end, missed letters that were there when it began;
    /// `None` when it saw them all.
    pub fn shortfall(&self) -> Option<Shortfall> {
        if self.seen >= self.total {
            None
        } else if self.stalled {
            Some(Shortfall::Silence)
        } else {
            Some(Shortfall::Limit)
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
