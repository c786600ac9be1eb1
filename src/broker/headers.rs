//! Our AMQP headers, and reading and writing AMQP values.

use lapin::{
    BasicProperties,
    types::{AMQPValue, FieldTable, LongString},
};
use time::OffsetDateTime;

/// Every header of ours starts so; only smsgw may set them (see `delivery`).
pub const OUR_PREFIX: &str = "x-smsgw-";
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
/// When smsgw first saw the job (Unix milliseconds), kept on every republish: a job
/// without an AMQP `timestamp` has its default expiry counted from then.
pub const HEADER_FIRST_SEEN: &str = "x-smsgw-first-seen";

/// The message's headers, less those `drop` names: what a republish carries over.
pub(super) fn carried(properties: &BasicProperties, drop: impl Fn(&str) -> bool) -> FieldTable {
    properties
        .headers()
        .as_ref()
        .map(|h| {
            h.inner()
                .iter()
                .filter(|(k, _)| !drop(k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect::<std::collections::BTreeMap<_, _>>()
                .into()
        })
        .unwrap_or_default()
}

pub(super) fn amqp_int(value: &AMQPValue) -> Option<i64> {
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

pub(super) fn amqp_text(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(s) => String::from_utf8(s.as_bytes().to_vec()).ok(),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

pub(super) fn long_string(text: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(text.as_bytes().to_vec()))
}

pub(super) fn unix_ms(at: OffsetDateTime) -> i64 {
    i64::try_from(at.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

pub(super) fn from_unix_ms(ms: i64) -> Option<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).ok()
}
