//! How long smsgw keeps what it records: message bodies (`SMSGW_BODY_RETENTION`,
//! `SMSGW_KEEP_BODY`), the message log (`SMSGW_LOG_RETENTION`), dead letters
//! (`SMSGW_DEAD_RETENTION`), and how often it purges (`SMSGW_RETENTION_INTERVAL`).

use std::time::Duration;

use super::{ConfigError, bad, parse::duration};

/// What is kept, and for how long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetentionSettings {
    /// Message bodies older than this are removed from the log.
    pub body_retention: Duration,
    /// Whole finished message rows (and their attempts) and the records of applied
    /// webhooks older than this are removed.
    pub log_retention: Duration,
    /// Dead letters older than this are removed from `sms.dead`.
    pub dead_retention: Duration,
    /// `false`: a message's body is dropped as soon as it has a final outcome.
    pub keep_body: bool,
    /// How often the retention task runs.
    pub interval: Duration,
}

pub(super) fn retention(
    get: &impl Fn(&str) -> Option<String>,
) -> Result<RetentionSettings, ConfigError> {
    let (log_retention, dead_retention) = log_and_dead(get)?;
    Ok(RetentionSettings {
        body_retention: duration(get, "SMSGW_BODY_RETENTION", "30d")?,
        log_retention,
        dead_retention,
        keep_body: keep_body(get)?,
        interval: duration(get, "SMSGW_RETENTION_INTERVAL", "10m")?,
    })
}

/// How long the message log and the dead letters are kept. The log is kept 180 days by
/// default: long enough for support's questions and billing disputes over several
/// months, and no longer, since it holds every recipient's number and the providers'
/// error texts. It must outlast the dead letters: a replayed letter is recognised (and an
/// unknown outcome asked about) through its message's row.
fn log_and_dead(
    get: &impl Fn(&str) -> Option<String>,
) -> Result<(Duration, Duration), ConfigError> {
    let log = duration(get, "SMSGW_LOG_RETENTION", "180d")?;
    let dead = duration(get, "SMSGW_DEAD_RETENTION", "30d")?;
    if log < dead {
        return Err(bad(
            "SMSGW_LOG_RETENTION",
            format!(
                "must be at least SMSGW_DEAD_RETENTION ({}): a replayed dead letter needs its \
                 message's row",
                humantime::format_duration(dead)
            ),
        ));
    }
    Ok((log, dead))
}

fn keep_body(get: &impl Fn(&str) -> Option<String>) -> Result<bool, ConfigError> {
    match get("SMSGW_KEEP_BODY").as_deref().map(str::trim) {
        None | Some("true") | Some("1") | Some("yes") => Ok(true),
        Some("false") | Some("0") | Some("no") => Ok(false),
        Some(other) => Err(bad(
            "SMSGW_KEEP_BODY",
            format!("'{other}' is not true or false"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::settings;

    #[test]
    fn nothing_personal_is_kept_for_ever_by_default() {
        let s = settings(&[]).expect("defaults are valid").retention;
        let days = |d: u64| Duration::from_secs(d * 86_400);
        assert_eq!(
            (s.body_retention, s.log_retention, s.dead_retention),
            (days(30), days(180), days(30))
        );
        let err = settings(&[("SMSGW_LOG_RETENTION", "7d")]).expect_err("log shorter");
        assert_eq!(err.variable, "SMSGW_LOG_RETENTION");
        assert!(
            settings(&[
                ("SMSGW_LOG_RETENTION", "7d"),
                ("SMSGW_DEAD_RETENTION", "7d")
            ])
            .is_ok()
        );
    }
}
