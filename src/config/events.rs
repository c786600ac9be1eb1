//! The status events' settings: whether status changes write events at all
//! (`SMSGW_EVENTS`), and how many may wait in the outbox before new ones are dropped
//! (`SMSGW_EVENTS_MAX_BACKLOG`).

use super::{ConfigError, bad, parse::on_or_off};

const MAX_BACKLOG: &str = "SMSGW_EVENTS_MAX_BACKLOG";

/// By default a million: a day of a busy account's events, about 600 MB of outbox, far
/// from filling a disk sized for the log.
pub const DEFAULT_MAX_BACKLOG: i64 = 1_000_000;

/// What the daemon does with status events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventSettings {
    /// Status changes write events to the outbox, and the daemon relays them to
    /// `sms.events`.
    pub on: bool,
    /// Past this many events waiting in the outbox, new ones are dropped (and counted)
    /// until the relay has published a tenth of them; `None`: never.
    pub max_backlog: Option<i64>,
}

pub(super) fn events(get: &impl Fn(&str) -> Option<String>) -> Result<EventSettings, ConfigError> {
    Ok(EventSettings {
        on: on_or_off(get, "SMSGW_EVENTS", true)?,
        max_backlog: max_backlog(get(MAX_BACKLOG).as_deref())?,
    })
}

fn max_backlog(raw: Option<&str>) -> Result<Option<i64>, ConfigError> {
    let Some(raw) = raw.map(str::trim) else {
        return Ok(Some(DEFAULT_MAX_BACKLOG));
    };
    if raw == "off" {
        return Ok(None);
    }
    match raw.replace('_', "").parse::<i64>() {
        Ok(n) if (10..=1_000_000_000_000).contains(&n) => Ok(Some(n)),
        Ok(_) => Err(bad(
            MAX_BACKLOG,
            "must be between 10 and 1000000000000, or off",
        )),
        Err(_) => Err(bad(
            MAX_BACKLOG,
            format!("'{raw}' is not a whole number or off"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backlog_is_bounded_unless_told_off() {
        assert_eq!(
            max_backlog(None).expect("default"),
            Some(DEFAULT_MAX_BACKLOG)
        );
        assert_eq!(max_backlog(Some(" 5_000 ")).expect("set"), Some(5_000));
        assert_eq!(max_backlog(Some("off")).expect("off"), None);
    }

    #[test]
    fn a_bound_that_is_not_one_is_refused_naming_the_variable() {
        for raw in ["-1", "0", "9", "lots", "1e6"] {
            let error = max_backlog(Some(raw)).expect_err(raw);
            assert_eq!(error.variable, MAX_BACKLOG, "{raw}");
        }
    }
}
