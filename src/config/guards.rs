//! The account's guards against fraud and spend: where texts may go besides each school's
//! own country (`SMSGW_ALLOWED_COUNTRIES`), how many login codes one number gets
//! (`SMSGW_LOGIN_CODE_LIMIT`), how many texts go abroad a day
//! (`SMSGW_INTERNATIONAL_DAILY_LIMIT`), and which types a school's monthly budget never
//! stops (`SMSGW_BUDGET_EXEMPT_TYPES`). Each is read once at start-up; a malformed one
//! stops the daemon (exit 2).

use std::{fmt, time::Duration};

use super::{ConfigError, bad};
use crate::{job::JobType, phone::Country};

const ALLOWED_COUNTRIES: &str = "SMSGW_ALLOWED_COUNTRIES";
const LOGIN_CODE_LIMIT: &str = "SMSGW_LOGIN_CODE_LIMIT";
const INTERNATIONAL_DAILY_LIMIT: &str = "SMSGW_INTERNATIONAL_DAILY_LIMIT";
const BUDGET_EXEMPT_TYPES: &str = "SMSGW_BUDGET_EXEMPT_TYPES";

/// Most login codes a limit may allow in its window: each is remembered until it leaves
/// the window.
const MOST_LOGIN_CODES: u32 = 1_000;
/// The longest window a login-code limit may have.
const LONGEST_WINDOW: Duration = Duration::from_secs(31 * 24 * 3600);

/// The account's guards, as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuardSettings {
    /// Countries every school may text besides its own, unless its `allowed_countries`
    /// says otherwise.
    pub allowed_countries: Vec<Country>,
    /// Login codes one number may get in a sliding window, across schools.
    pub login_code_limit: RateWindow,
    /// Texts to a number outside its school's country per UTC day, for the whole account.
    pub international_daily_limit: u32,
    /// Types a school's monthly budget counts but never stops.
    pub budget_exempt: Vec<JobType>,
}

impl Default for GuardSettings {
    /// The defaults of the variables: no other country, 5 login codes an hour, 100 texts
    /// abroad a day, login codes, changes and cancellations exempt from budgets.
    fn default() -> Self {
        GuardSettings {
            allowed_countries: Vec::new(),
            login_code_limit: RateWindow {
                count: 5,
                window: Duration::from_secs(3600),
            },
            international_daily_limit: 100,
            budget_exempt: vec![
                JobType::LoginCode,
                JobType::BookingChange,
                JobType::BookingCancellation,
            ],
        }
    }
}

/// At most `count` in any `window` (`5/1h`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateWindow {
    pub count: u32,
    pub window: Duration,
}

impl fmt::Display for RateWindow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let window = humantime::format_duration(self.window);
        write!(f, "{}/{window}", self.count)
    }
}

impl RateWindow {
    /// `COUNT/DURATION`: a whole number from 1 to 1,000 and a duration from 1 s to 31 days
    /// (`5/1h`, `3/15m`, `10/1day`).
    pub fn parse(raw: &str) -> Result<RateWindow, String> {
        let (count, window) = raw
            .trim()
            .split_once('/')
            .ok_or_else(|| format!("'{raw}' is not COUNT/DURATION, such as 5/1h"))?;
        let count: u32 = count
            .trim()
            .parse()
            .ok()
            .filter(|n| (1..=MOST_LOGIN_CODES).contains(n))
            .ok_or_else(|| {
                format!("'{raw}': the count must be a whole number from 1 to {MOST_LOGIN_CODES}")
            })?;
        let window = humantime::parse_duration(window.trim())
            .ok()
            .filter(|w| *w >= Duration::from_secs(1) && *w <= LONGEST_WINDOW)
            .ok_or_else(|| format!("'{raw}': the window must be a duration from 1s to 31d"))?;
        Ok(RateWindow { count, window })
    }
}

/// Reads the four variables (each unset: its default).
pub(super) fn guards(get: &impl Fn(&str) -> Option<String>) -> Result<GuardSettings, ConfigError> {
    let defaults = GuardSettings::default();
    Ok(GuardSettings {
        allowed_countries: match get(ALLOWED_COUNTRIES) {
            Some(raw) => countries(&raw).map_err(|e| bad(ALLOWED_COUNTRIES, e))?,
            None => defaults.allowed_countries,
        },
        login_code_limit: match get(LOGIN_CODE_LIMIT) {
            Some(raw) => RateWindow::parse(&raw).map_err(|e| bad(LOGIN_CODE_LIMIT, e))?,
            None => defaults.login_code_limit,
        },
        international_daily_limit: match get(INTERNATIONAL_DAILY_LIMIT) {
            Some(raw) => raw.trim().parse().map_err(|_| {
                bad(
                    INTERNATIONAL_DAILY_LIMIT,
                    format!("'{raw}' is not a whole number from 0 to {}", u32::MAX),
                )
            })?,
            None => defaults.international_daily_limit,
        },
        budget_exempt: match get(BUDGET_EXEMPT_TYPES) {
            Some(raw) => job_types(&raw).map_err(|e| bad(BUDGET_EXEMPT_TYPES, e))?,
            None => defaults.budget_exempt,
        },
    })
}

/// `GB,IE`: ISO 3166 alpha-2 codes, any case; `none` for none.
fn countries(raw: &str) -> Result<Vec<Country>, String> {
    if raw.trim().eq_ignore_ascii_case("none") {
        return Ok(Vec::new());
    }
    let mut list = Vec::new();
    for code in raw.split(',').map(str::trim).filter(|c| !c.is_empty()) {
        let country = Country::parse(code)
            .ok_or_else(|| format!("'{code}' is not an ISO 3166 alpha-2 country code"))?;
        if !list.contains(&country) {
            list.push(country);
        }
    }
    Ok(list)
}

/// `login_code,booking_change`: job types; `none` for none.
fn job_types(raw: &str) -> Result<Vec<JobType>, String> {
    if raw.trim() == "none" {
        return Ok(Vec::new());
    }
    let mut types = Vec::new();
    for name in raw.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let kind = JobType::parse(name).ok_or_else(|| format!("'{name}' is not a job type"))?;
        if !types.contains(&kind) {
            types.push(kind);
        }
    }
    Ok(types)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn read(pairs: &[(&str, &str)]) -> Result<GuardSettings, ConfigError> {
        let map: HashMap<&str, &str> = pairs.iter().copied().collect();
        guards(&|name: &str| map.get(name).map(|v| v.to_string()))
    }

    fn refused(variable: &str, value: &str) -> ConfigError {
        let error = read(&[(variable, value)]).expect_err(value);
        assert_eq!(error.variable, variable, "{value}");
        error
    }

    #[test]
    fn the_defaults_are_the_documented_ones() {
        let settings = read(&[]).expect("defaults");
        assert_eq!(settings, GuardSettings::default());
        assert_eq!(settings.login_code_limit.to_string(), "5/1h");
        assert_eq!(settings.international_daily_limit, 100);
        assert!(settings.allowed_countries.is_empty());
        assert_eq!(settings.budget_exempt.len(), 3);
    }

    #[test]
    fn a_login_code_limit_is_a_count_over_a_window() {
        let limit = RateWindow::parse("5/1h").expect("5/1h");
        assert_eq!((limit.count, limit.window), (5, Duration::from_secs(3600)));
        let limit = RateWindow::parse(" 1 / 1s ").expect("the smallest");
        assert_eq!((limit.count, limit.window), (1, Duration::from_secs(1)));
        assert!(RateWindow::parse("1000/31d").is_ok(), "the largest");
        for bad in [
            "5/0h", "-1", "abc", "5", "0/1h", "-1/1h", "1001/1h", "5/", "/1h", "5/1h/2", "5/500ms",
            "5/32d", "five/1h", "5/soon",
        ] {
            assert!(RateWindow::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_malformed_limit_names_its_variable() {
        for value in ["5/0h", "-1", "abc"] {
            refused("SMSGW_LOGIN_CODE_LIMIT", value);
        }
        for value in ["-1", "abc", "1.5", "4294967296"] {
            refused("SMSGW_INTERNATIONAL_DAILY_LIMIT", value);
        }
        let zero = read(&[("SMSGW_INTERNATIONAL_DAILY_LIMIT", "0")]).expect("none abroad");
        assert_eq!(zero.international_daily_limit, 0);
    }

    #[test]
    fn allowed_countries_are_iso_codes() {
        let settings = read(&[("SMSGW_ALLOWED_COUNTRIES", "ie, fr,IE")]).expect("valid");
        let codes: Vec<&str> = settings
            .allowed_countries
            .iter()
            .map(Country::as_str)
            .collect();
        assert_eq!(codes, ["IE", "FR"]);
        let error = refused("SMSGW_ALLOWED_COUNTRIES", "GB,UK");
        assert!(error.problem.contains("'UK'"), "{error}");
        refused("SMSGW_ALLOWED_COUNTRIES", "Ireland");
        let none = read(&[("SMSGW_ALLOWED_COUNTRIES", "none")]).expect("none");
        assert!(none.allowed_countries.is_empty());
    }

    #[test]
    fn exempt_types_are_job_types() {
        let settings = read(&[("SMSGW_BUDGET_EXEMPT_TYPES", "login_code")]).expect("valid");
        assert_eq!(settings.budget_exempt, [JobType::LoginCode]);
        let none = read(&[("SMSGW_BUDGET_EXEMPT_TYPES", "none")]).expect("none");
        assert!(none.budget_exempt.is_empty());
        refused("SMSGW_BUDGET_EXEMPT_TYPES", "login_codes");
    }
}
