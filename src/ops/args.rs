//! The values `smsgw status` and `smsgw usage` take, each parsed once into its type, so
//! that bad input is refused (exit 2) before anything is looked up.

use std::fmt;

use serde_json::{Map, Value};
use time::{
    Date, OffsetDateTime, Time, format_description::well_known::Rfc3339, macros::format_description,
};

use crate::phone::{PhoneError, PhoneNumber, mask};

/// `status --to`: a number as support was given it. One in E.164 (or with `00`) is read
/// at once; a national one waits for its school's country.
#[derive(Clone, PartialEq, Eq)]
pub enum NumberQuery {
    E164(PhoneNumber),
    National(String),
}

impl NumberQuery {
    pub fn parse(text: &str) -> Result<Self, PhoneError> {
        let text = text.trim();
        let number_like = text.chars().any(|c| c.is_ascii_digit())
            && text
                .chars()
                .all(|c| c.is_ascii_digit() || " +-.()/".contains(c));
        if !number_like {
            return Err(PhoneError::Unparsable);
        }
        if text.starts_with('+') || text.starts_with("00") {
            PhoneNumber::parse(text, None).map(NumberQuery::E164)
        } else {
            Ok(NumberQuery::National(text.to_owned()))
        }
    }

    /// Whether reading it takes the school's country.
    pub fn is_national(&self) -> bool {
        matches!(self, NumberQuery::National(_))
    }

    /// The number in E.164 (as the log keeps it), a national one read with `country`.
    pub fn resolve(&self, country: Option<&str>) -> Result<PhoneNumber, PhoneError> {
        match self {
            NumberQuery::E164(number) => Ok(number.clone()),
            NumberQuery::National(raw) => PhoneNumber::parse(raw, country),
        }
    }
}

/// Masked, as everywhere a number could reach a log.
impl fmt::Debug for NumberQuery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NumberQuery::E164(number) => write!(f, "E164({number:?})"),
            NumberQuery::National(raw) => write!(f, "National({})", mask(raw)),
        }
    }
}

/// `status --context KEY=VALUE`: a top-level key of the context the web app attached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContextMatch {
    key: String,
    value: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContextMatchError {
    #[error("expected KEY=VALUE, such as booking_id=981")]
    NoEquals,
    #[error("the key before '=' is empty")]
    EmptyKey,
    #[error("the value after '=' is empty")]
    EmptyValue,
}

impl ContextMatch {
    pub fn parse(text: &str) -> Result<Self, ContextMatchError> {
        let (key, value) = text.split_once('=').ok_or(ContextMatchError::NoEquals)?;
        let key = key.trim();
        if key.is_empty() {
            return Err(ContextMatchError::EmptyKey);
        }
        if value.is_empty() {
            return Err(ContextMatchError::EmptyValue);
        }
        Ok(ContextMatch {
            key: key.to_owned(),
            value: value.to_owned(),
        })
    }

    /// The objects a matching context contains, any one of them. The web app may send an
    /// id as a number or as a string, and support cannot tell which from the booking
    /// page, so a whole number or `true`/`false` also matches the JSON string of the same
    /// text (`booking_id=981`: `{"booking_id": 981}` or `{"booking_id": "981"}`). Any
    /// other value matches only the string.
    pub fn forms(&self) -> Vec<Value> {
        let typed = match self.value.as_str() {
            "true" => Some(Value::Bool(true)),
            "false" => Some(Value::Bool(false)),
            text => text.parse::<i64>().ok().map(Value::from),
        };
        typed
            .into_iter()
            .chain([Value::String(self.value.clone())])
            .map(|value| Value::Object(Map::from_iter([(self.key.clone(), value)])))
            .collect()
    }
}

const DATE: &[time::format_description::BorrowedFormatItem<'_>] =
    format_description!("[year]-[month]-[day]");

/// `usage --from/--to`: a day (`2026-11-01`, its midnight UTC) or an RFC 3339 time.
pub fn parse_instant(text: &str) -> Result<OffsetDateTime, String> {
    let text = text.trim();
    if let Ok(date) = Date::parse(text, DATE) {
        return Ok(date.with_time(Time::MIDNIGHT).assume_utc());
    }
    OffsetDateTime::parse(text, &Rfc3339).map_err(|_| {
        "expected a day (2026-11-01) or an RFC 3339 time (2026-11-01T08:00:00Z)".into()
    })
}

/// `status --since`: an age (`24h`, `7d`, `90m`) before now, or a day or an RFC 3339 time.
pub fn parse_since(text: &str) -> Result<OffsetDateTime, String> {
    since_at(text, OffsetDateTime::now_utc())
}

fn since_at(text: &str, now: OffsetDateTime) -> Result<OffsetDateTime, String> {
    if let Ok(age) = humantime::parse_duration(text.trim()) {
        return time::Duration::try_from(age)
            .ok()
            .and_then(|age| now.checked_sub(age))
            .ok_or_else(|| "that age reaches back beyond any date".into());
    }
    parse_instant(text).map_err(|_| {
        "expected an age (24h, 7d), a day (2026-11-01) or an RFC 3339 time \
         (2026-11-01T08:00:00Z)"
            .into()
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use time::macros::datetime;

    use super::*;

    #[test]
    fn numbers_in_e164_are_read_at_once_national_ones_with_the_country() {
        let e164 = NumberQuery::parse(" +44 7700 900123 ").expect("E.164");
        assert!(!e164.is_national());
        assert_eq!(e164.resolve(None).expect("read").as_str(), "+447700900123");

        let national = NumberQuery::parse("07700 900123").expect("national");
        assert!(national.is_national());
        assert_eq!(
            national.resolve(Some("GB")).expect("read").as_str(),
            "+447700900123"
        );
        assert_eq!(national.resolve(None), Err(PhoneError::NoCountry));
        assert_eq!(
            NumberQuery::parse("(201) 555-0123")
                .and_then(|n| n.resolve(Some("US")))
                .expect("read")
                .as_str(),
            "+12015550123"
        );
    }

    #[test]
    fn what_is_not_a_number_is_refused() {
        for text in ["", "hello", "+44 hello", "booking_id=981", "+44123", "--"] {
            assert!(NumberQuery::parse(text).is_err(), "{text}");
        }
    }

    #[test]
    fn a_number_is_masked_when_debugged() {
        let shown = format!("{:?}", NumberQuery::parse("07700900123").expect("national"));
        assert!(!shown.contains("7700900"), "{shown}");
        let shown = format!("{:?}", NumberQuery::parse("+447700900123").expect("E.164"));
        assert!(!shown.contains("7700900"), "{shown}");
    }

    #[test]
    fn a_whole_number_matches_the_number_and_the_string() {
        let id = ContextMatch::parse("booking_id=981").expect("parsed");
        assert_eq!(
            id.forms(),
            vec![json!({"booking_id": 981}), json!({"booking_id": "981"})]
        );
        let flag = ContextMatch::parse("trial=true").expect("parsed");
        assert_eq!(
            flag.forms(),
            vec![json!({"trial": true}), json!({"trial": "true"})]
        );
        for text in ["ref=user-77", "price=9.5", "code=0981x", "a=b=c"] {
            let only = ContextMatch::parse(text).expect("parsed");
            assert_eq!(only.forms().len(), 1, "{text}: the string only");
        }
        let split = ContextMatch::parse(" a =b=c").expect("parsed");
        assert_eq!(split.forms(), vec![json!({"a": "b=c"})]);
    }

    #[test]
    fn a_context_match_needs_a_key_an_equals_and_a_value() {
        assert_eq!(
            ContextMatch::parse("booking_id"),
            Err(ContextMatchError::NoEquals)
        );
        assert_eq!(
            ContextMatch::parse("=981"),
            Err(ContextMatchError::EmptyKey)
        );
        assert_eq!(
            ContextMatch::parse("booking_id="),
            Err(ContextMatchError::EmptyValue)
        );
    }

    #[test]
    fn since_takes_an_age_a_day_or_a_time() {
        let now = datetime!(2026-11-25 12:00 UTC);
        assert_eq!(since_at("24h", now), Ok(datetime!(2026-11-24 12:00 UTC)));
        assert_eq!(since_at("7d", now), Ok(datetime!(2026-11-18 12:00 UTC)));
        assert_eq!(
            since_at("2026-11-20", now),
            Ok(datetime!(2026-11-20 0:00 UTC))
        );
        assert_eq!(
            since_at("2026-11-20T08:00:00+01:00", now),
            Ok(datetime!(2026-11-20 7:00 UTC))
        );
        for bad in ["yesterday", "24", "", "2026-13-01", "100000000000d"] {
            assert!(since_at(bad, now).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_day_is_its_midnight_utc() {
        assert_eq!(
            parse_instant("2026-11-01"),
            Ok(datetime!(2026-11-01 0:00 UTC))
        );
        assert_eq!(
            parse_instant("2026-11-01T08:30:00Z"),
            Ok(datetime!(2026-11-01 8:30 UTC))
        );
        for bad in ["01/11/2026", "2026-11", "2026-11-31", "now"] {
            assert!(parse_instant(bad).is_err(), "{bad}");
        }
    }
}
