//! How long smsgw waits for a delivery receipt before it gives a message up as
//! `undelivered` / `no_receipt` (`SMSGW_RECEIPT_TIMEOUT`), and so how often it looks.

use std::time::Duration;

use super::{ConfigError, bad};

const RECEIPT_TIMEOUT: &str = "SMSGW_RECEIPT_TIMEOUT";

/// The longest pause between two looks: a message times out at most this late.
const LONGEST_PAUSE: Duration = Duration::from_secs(300);
/// The shortest, for the short timeouts tests use.
const SHORTEST_PAUSE: Duration = Duration::from_millis(100);

/// When a sent message whose provider sends receipts stops waiting for one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReceiptWatch {
    /// `None`: never (`SMSGW_RECEIPT_TIMEOUT=off`).
    pub timeout: Option<Duration>,
}

impl Default for ReceiptWatch {
    /// Three days, as GOV.UK Notify: a phone that is off for a weekend still counts.
    fn default() -> Self {
        ReceiptWatch {
            timeout: Some(Duration::from_secs(72 * 3600)),
        }
    }
}

impl ReceiptWatch {
    /// `72h`, `30m`, or `off`; a zero, negative or unreadable duration is an error.
    pub fn parse(raw: Option<&str>) -> Result<Self, ConfigError> {
        let Some(raw) = raw.map(str::trim) else {
            return Ok(ReceiptWatch::default());
        };
        if raw == "off" {
            return Ok(ReceiptWatch { timeout: None });
        }
        let timeout = humantime::parse_duration(raw)
            .ok()
            .filter(|d| !d.is_zero())
            .ok_or_else(|| {
                bad(
                    RECEIPT_TIMEOUT,
                    format!("'{raw}' is not a duration such as 72h, or off"),
                )
            })?;
        Ok(ReceiptWatch {
            timeout: Some(timeout),
        })
    }

    /// How often to look for messages past the timeout: a twelfth of it, within bounds,
    /// so a message is given up at most that much later than its timeout.
    pub fn pause(&self) -> Duration {
        self.timeout
            .map_or(LONGEST_PAUSE, |t| t / 12)
            .clamp(SHORTEST_PAUSE, LONGEST_PAUSE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_days_unless_set() {
        let watch = ReceiptWatch::parse(None).expect("default");
        assert_eq!(watch.timeout, Some(Duration::from_secs(259_200)));
        assert_eq!(watch.pause(), LONGEST_PAUSE);
    }

    #[test]
    fn off_never_times_out() {
        assert_eq!(ReceiptWatch::parse(Some("off")).expect("off").timeout, None);
    }

    #[test]
    fn a_short_timeout_is_looked_at_often() {
        let watch = ReceiptWatch::parse(Some("2s")).expect("2s");
        assert_eq!(watch.timeout, Some(Duration::from_secs(2)));
        assert_eq!(
            watch.pause(),
            Duration::from_millis(166) + Duration::from_nanos(666_666)
        );
    }

    #[test]
    fn a_bad_timeout_names_the_variable() {
        for raw in ["-1h", "0s", "soon", "72"] {
            let error = ReceiptWatch::parse(Some(raw)).expect_err(raw);
            assert_eq!(error.variable, RECEIPT_TIMEOUT, "{raw}");
        }
    }
}
