//! The readers every concern's variables share: whole numbers, durations and switches
//! within bounds, each error naming its variable.

use std::{fmt, str::FromStr, time::Duration};

use super::{ConfigError, bad};

pub(super) fn number<T>(
    get: &impl Fn(&str) -> Option<String>,
    variable: &'static str,
    default: T,
    min: T,
    max: T,
) -> Result<T, ConfigError>
where
    T: FromStr + PartialOrd + fmt::Display + Copy,
{
    let Some(raw) = get(variable) else {
        return Ok(default);
    };
    let value: T = raw
        .trim()
        .parse()
        .map_err(|_| bad(variable, format!("'{raw}' is not a whole number")))?;
    if value < min || value > max {
        return Err(bad(variable, format!("must be between {min} and {max}")));
    }
    Ok(value)
}

pub(super) fn duration(
    get: &impl Fn(&str) -> Option<String>,
    variable: &'static str,
    default: &str,
) -> Result<Duration, ConfigError> {
    let raw = get(variable).unwrap_or_else(|| default.to_owned());
    humantime::parse_duration(raw.trim())
        .map_err(|e| bad(variable, format!("'{raw}' is not a duration ({e})")))
}

/// A duration within `(min, max)`, both included.
pub(super) fn bounded_duration(
    get: &impl Fn(&str) -> Option<String>,
    variable: &'static str,
    default: &str,
    (min, max): (Duration, Duration),
) -> Result<Duration, ConfigError> {
    let value = duration(get, variable, default)?;
    if value < min || value > max {
        return Err(bad(
            variable,
            format!(
                "must be between {} and {}",
                humantime::format_duration(min),
                humantime::format_duration(max)
            ),
        ));
    }
    Ok(value)
}

pub(super) fn parsed<T: FromStr>(
    get: &impl Fn(&str) -> Option<String>,
    variable: &'static str,
    default: &str,
) -> Result<T, ConfigError>
where
    T::Err: fmt::Display,
{
    let raw = get(variable).unwrap_or_else(|| default.to_owned());
    raw.trim()
        .parse()
        .map_err(|e| bad(variable, format!("'{raw}': {e}")))
}

pub(super) fn on_or_off(
    get: &impl Fn(&str) -> Option<String>,
    variable: &'static str,
    default: bool,
) -> Result<bool, ConfigError> {
    match get(variable).as_deref().map(str::trim) {
        None => Ok(default),
        Some("on") => Ok(true),
        Some("off") => Ok(false),
        Some(other) => Err(bad(variable, format!("'{other}' is not on or off"))),
    }
}
