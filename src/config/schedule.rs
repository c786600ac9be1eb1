//! When texts may go: which types wait out a school's quiet hours (`SMSGW_QUIET_TYPES`),
//! how long a job without `expires_at` stays worth sending (`SMSGW_DEFAULT_EXPIRY`), and
//! how long a booking's cancellation withdraws what arrives for it
//! (`SMSGW_WITHDRAW_WINDOW`).

use std::{collections::HashMap, time::Duration};

use super::{ConfigError, bad, parse::duration};
use crate::job::{JobType, Lane};

const QUIET_TYPES: &str = "SMSGW_QUIET_TYPES";
const DEFAULT_EXPIRY: &str = "SMSGW_DEFAULT_EXPIRY";

/// When texts may go, and when they are no longer worth sending.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduleSettings {
    /// The types that wait while a school's quiet hours last.
    pub quiet_types: Vec<JobType>,
    /// How long after publication a job of a type without `expires_at` expires.
    pub default_expiry: HashMap<JobType, Duration>,
    /// How long after a booking's cancellation a reminder or confirmation of it that
    /// arrives is withdrawn rather than sent.
    pub withdraw_window: Duration,
}

pub(super) fn schedule(
    get: &impl Fn(&str) -> Option<String>,
) -> Result<ScheduleSettings, ConfigError> {
    Ok(ScheduleSettings {
        quiet_types: quiet_types(get(QUIET_TYPES).as_deref())?,
        default_expiry: default_expiry(get(DEFAULT_EXPIRY).as_deref())?,
        withdraw_window: duration(get, "SMSGW_WITHDRAW_WINDOW", "30d")?,
    })
}

/// The types that wait while a school's quiet hours last. Urgent types (login codes,
/// changes, cancellations) never wait: naming one is a configuration error.
fn quiet_types(raw: Option<&str>) -> Result<Vec<JobType>, ConfigError> {
    let raw = raw.unwrap_or("booking_confirmation,booking_reminder,announcement");
    if raw.trim() == "none" {
        return Ok(Vec::new());
    }
    let mut types = Vec::new();
    for name in raw.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let kind = JobType::parse(name)
            .ok_or_else(|| bad(QUIET_TYPES, format!("'{name}' is not a job type")))?;
        if kind.lane() == Lane::Urgent {
            return Err(bad(
                QUIET_TYPES,
                format!("'{name}' is urgent and is never held by quiet hours"),
            ));
        }
        if !types.contains(&kind) {
            types.push(kind);
        }
    }
    Ok(types)
}

/// `TYPE=DURATION,...`: a job of that type without `expires_at` expires that long after
/// it was published.
fn default_expiry(raw: Option<&str>) -> Result<HashMap<JobType, Duration>, ConfigError> {
    let raw = raw.unwrap_or("login_code=15m");
    if raw.trim() == "none" {
        return Ok(HashMap::new());
    }
    let mut expiry = HashMap::new();
    for part in raw.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, after) = part
            .split_once('=')
            .ok_or_else(|| bad(DEFAULT_EXPIRY, format!("'{part}' is not TYPE=DURATION")))?;
        let kind = JobType::parse(name.trim())
            .ok_or_else(|| bad(DEFAULT_EXPIRY, format!("'{name}' is not a job type")))?;
        let after = humantime::parse_duration(after.trim())
            .ok()
            .filter(|d| !d.is_zero())
            .ok_or_else(|| bad(DEFAULT_EXPIRY, format!("'{part}': a duration such as 15m")))?;
        expiry.insert(kind, after);
    }
    Ok(expiry)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::settings;

    #[test]
    fn the_withdraw_window_is_thirty_days_unless_set_and_never_negative() {
        let days = |s: &ScheduleSettings| s.withdraw_window.as_secs() / 86_400;
        assert_eq!(days(&settings(&[]).expect("defaults").schedule), 30);
        let set = settings(&[("SMSGW_WITHDRAW_WINDOW", "2d")]).expect("valid");
        assert_eq!(days(&set.schedule), 2);
        for raw in ["-1d", "soon", "30"] {
            let error = settings(&[("SMSGW_WITHDRAW_WINDOW", raw)]).expect_err(raw);
            assert_eq!(error.variable, "SMSGW_WITHDRAW_WINDOW");
        }
    }

    #[test]
    fn reminders_confirmations_and_announcements_wait_by_default() {
        assert_eq!(
            quiet_types(None).expect("valid"),
            [
                JobType::BookingConfirmation,
                JobType::BookingReminder,
                JobType::Announcement
            ]
        );
        assert_eq!(quiet_types(Some("none")).expect("valid"), []);
        assert_eq!(
            quiet_types(Some(" announcement ")).expect("valid"),
            [JobType::Announcement]
        );
    }

    #[test]
    fn urgent_types_can_never_be_made_to_wait() {
        for urgent in ["login_code", "booking_change", "booking_cancellation"] {
            let error =
                quiet_types(Some(&format!("booking_reminder,{urgent}"))).expect_err("refused");
            assert_eq!(error.variable, QUIET_TYPES);
            assert!(error.problem.contains(urgent), "{error}");
        }
        assert!(quiet_types(Some("reminders")).is_err());
    }

    #[test]
    fn login_codes_expire_after_15_minutes_by_default() {
        let expiry = default_expiry(None).expect("valid");
        assert_eq!(
            expiry.get(&JobType::LoginCode),
            Some(&Duration::from_secs(900))
        );
        assert_eq!(expiry.len(), 1);
        assert!(default_expiry(Some("none")).expect("valid").is_empty());
        let both = default_expiry(Some("login_code=5m, booking_change=2h")).expect("valid");
        assert_eq!(
            both.get(&JobType::BookingChange),
            Some(&Duration::from_secs(7200))
        );
    }

    #[test]
    fn a_bad_default_expiry_names_the_variable() {
        for raw in ["login_code", "login_code=soon", "login_code=0s", "codes=5m"] {
            let error = default_expiry(Some(raw)).expect_err(raw);
            assert_eq!(error.variable, DEFAULT_EXPIRY, "{raw}");
        }
    }
}
