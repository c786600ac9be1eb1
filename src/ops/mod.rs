//! Tools for ops and support: the dead-letter queue (`smsgw dlq ...`), a message's record
//! and the messages support looks for (`smsgw status`), the usage figures billing reads
//! (`smsgw usage`), an announcement's recipients file (`smsgw send --recipients`) and
//! `smsgw check`.
//!
//! Reading `sms.dead` never loses or reorders anything: messages are held unacked while
//! they are looked at and go back to their original places; only `replay` (after the
//! broker confirmed the republish) and `purge` remove what they were asked to.

mod args;
mod check;
mod dlq;
mod erase;
mod recipients;
mod replies;
mod status;
mod usage;

use std::{process::ExitCode, time::Duration};

use serde_json::Value;

pub use self::{
    args::{ContextMatch, ContextMatchError, NumberQuery, parse_instant, parse_since},
    check::check,
    dlq::{DeadFilter, dlq_list, dlq_purge, dlq_replay, dlq_show},
    erase::erase,
    recipients::{RecipientsError, parse_recipients},
    replies::{ReplyLookup, list_replies},
    status::{Lookup, find_messages, print_log},
    usage::{UsageRange, UsageRangeError, print_usage},
};
use crate::{
    broker::{Broker, DeadBrowser},
    config::Settings,
};

const EXIT_FAILED: u8 = 1;
const EXIT_USAGE: u8 = 2;

/// `3m12s`, `2h5m`, `4d3h`: the two largest units.
fn short_duration(duration: Duration) -> String {
    let s = duration.as_secs();
    let (d, h, m, sec) = (s / 86_400, s / 3_600 % 24, s / 60 % 60, s % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{sec}s"),
        (0, 0, _) => format!("{m}m{sec}s"),
        (0, _, _) => format!("{h}h{m}m"),
        _ => format!("{d}d{h}h"),
    }
}

/// `2026-11-25T08:00:01Z`: to the second, in UTC, for a table.
fn short_time(at: time::OffsetDateTime) -> String {
    at.to_offset(time::UtcOffset::UTC)
        .format(time::macros::format_description!(
            "[year]-[month]-[day]T[hour]:[minute]:[second]Z"
        ))
        .unwrap_or_default()
}

/// One line of at most `max` characters, cut with an ellipsis.
fn shorten(text: &str, max: usize) -> String {
    let text = text.replace(['\n', '\r'], " ");
    if text.chars().count() <= max {
        text
    } else {
        let mut cut: String = text.chars().take(max.saturating_sub(1)).collect();
        cut.push('…');
        cut
    }
}

/// Prints rows as aligned columns.
fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let last = cells.len().saturating_sub(1);
        let text: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if i == last {
                    c.clone()
                } else {
                    format!("{c:<width$}", width = widths[i])
                }
            })
            .collect();
        println!("{}", text.join("  ").trim_end());
    };
    line(&header.iter().map(|h| (*h).to_owned()).collect::<Vec<_>>());
    for row in rows {
        line(row);
    }
}

async fn connect_broker(settings: &Settings) -> Result<Broker, ExitCode> {
    let connected = async {
        let broker = Broker::connect(&settings.broker, "smsgw dlq").await?;
        broker.declare_topology().await?;
        Ok::<_, crate::broker::BrokerError>(broker)
    }
    .await;
    connected.map_err(|e| {
        eprintln!(
            "smsgw: cannot reach the broker at {}: {e}",
            settings.broker.url.redacted()
        );
        ExitCode::from(EXIT_FAILED)
    })
}

/// Connects and starts browsing `sms.dead`.
async fn open_dead(settings: &Settings) -> Result<(Broker, DeadBrowser), ExitCode> {
    let broker = connect_broker(settings).await?;
    match broker.browse_dead().await {
        Ok(browser) => Ok((broker, browser)),
        Err(e) => {
            eprintln!("smsgw: cannot read sms.dead: {e}");
            broker.close().await;
            Err(ExitCode::from(EXIT_FAILED))
        }
    }
}

/// Masks phone numbers unless `reveal`.
fn hider(reveal: bool) -> impl Fn(&str) -> String {
    move |text: &str| {
        if reveal {
            text.to_owned()
        } else {
            crate::phone::redact_numbers(text)
        }
    }
}

const HIDDEN: &str = "***";

/// A context with its keys kept and its values hidden: they say what the web app
/// attached, not to whom.
fn masked_values(value: Value) -> Value {
    match value {
        Value::Object(fields) => Value::Object(
            fields
                .into_iter()
                .map(|(key, _)| (key, Value::String(HIDDEN.into())))
                .collect(),
        ),
        Value::Null => Value::Null,
        _ => Value::String(HIDDEN.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_at_a_glance() {
        assert_eq!(short_duration(Duration::from_secs(42)), "42s");
        assert_eq!(short_duration(Duration::from_secs(192)), "3m12s");
        assert_eq!(short_duration(Duration::from_secs(7_500)), "2h5m");
        assert_eq!(short_duration(Duration::from_secs(356_400)), "4d3h");
    }

    #[test]
    fn long_text_is_cut_to_one_line() {
        assert_eq!(shorten("a\nb", 10), "a b");
        assert_eq!(shorten("abcdefghij", 5), "abcd…");
    }
}
