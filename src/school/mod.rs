//! A school's settings as values: the row of `sms_school_settings` the policy reads, its
//! quiet hours in the school's own time zone, and its guards (where it may text, its
//! monthly budget). No I/O: the store reads the row, the policy decides with it.

pub mod quiet;

pub use quiet::{QuietHours, zone};

use time::OffsetDateTime;

use crate::{job::JobType, phone::Country};

/// A school's quiet hours, as its settings give them.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Quiet {
    #[default]
    None,
    Hours(QuietHours),
    /// Quiet hours are set, but `timezone` is not a known IANA name: nothing is held
    /// (a text sent at night beats one held for ever on a guess).
    UnknownZone(String),
}

impl Quiet {
    /// The school's quiet hours from its columns; `None` unless both ends are set.
    pub fn of(timezone: Option<&str>, start: Option<time::Time>, end: Option<time::Time>) -> Self {
        let (Some(start), Some(end)) = (start, end) else {
            return Quiet::None;
        };
        let name = timezone.unwrap_or_default();
        match zone(name) {
            Some(zone) => Quiet::Hours(QuietHours {
                start: civil(start),
                end: civil(end),
                zone,
            }),
            None => Quiet::UnknownZone(name.to_owned()),
        }
    }

    /// When the quiet window around `now` ends, if `now` is in one.
    pub fn release(&self, now: OffsetDateTime) -> Option<OffsetDateTime> {
        let Quiet::Hours(hours) = self else {
            return None;
        };
        let now = jiff::Timestamp::from_nanosecond(now.unix_timestamp_nanos()).ok()?;
        let until = hours.release(now)?;
        OffsetDateTime::from_unix_timestamp_nanos(until.as_nanosecond()).ok()
    }
}

fn civil(at: time::Time) -> jiff::civil::Time {
    let (hour, minute, second, nanosecond) = at.as_hms_nano();
    // Each part is within range, so the narrowing casts are exact.
    jiff::civil::time(hour as i8, minute as i8, second as i8, nanosecond as i32)
}

/// A school's row in `sms_school_settings`.
#[derive(Debug, Clone, PartialEq)]
pub struct SchoolSettings {
    pub school_id: i64,
    pub sms_enabled: bool,
    pub country: Option<String>,
    pub sender_id: Option<String>,
    /// The school's own number, for destinations that refuse an alphanumeric `sender_id`.
    pub sender_number: Option<String>,
    pub provider: Option<String>,
    /// Used when `provider` refuses for a reason it may not share, or its circuit is open.
    pub fallback_provider: Option<String>,
    pub allow_confirmations: bool,
    pub allow_reminders: bool,
    pub allow_changes: bool,
    pub allow_announcements: bool,
    pub allow_login_codes: bool,
    pub quiet: Quiet,
    /// Where the school may text (`allowed_countries`).
    pub destinations: Destinations,
    /// Billable segments a UTC calendar month (`monthly_segment_budget`).
    pub budget: Budget,
}

/// The countries a school may text, from its `allowed_countries`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Destinations {
    /// Null: its own `country` and the account's `SMSGW_ALLOWED_COUNTRIES`.
    #[default]
    Default,
    /// Exactly these (an empty list: nowhere).
    Only(Vec<Country>),
    /// A code the numbering plans do not know, as written: the school's messages are
    /// refused (`invalid_allowed_countries`) until the row is corrected.
    Invalid(String),
}

impl Destinations {
    /// The column as read (a null element of the array is not a code either).
    pub fn of(column: Option<&[Option<String>]>) -> Self {
        let Some(codes) = column else {
            return Destinations::Default;
        };
        let mut countries = Vec::with_capacity(codes.len());
        for code in codes {
            let raw = code.as_deref().unwrap_or("NULL");
            match Country::parse(raw) {
                Some(country) => countries.push(country),
                None => return Destinations::Invalid(raw.chars().take(16).collect()),
            }
        }
        Destinations::Only(countries)
    }
}

/// A school's monthly budget of billable segments, from its `monthly_segment_budget`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Budget {
    /// Null: no budget.
    #[default]
    Unlimited,
    Segments(u32),
    /// Negative: the school's messages are refused (`invalid_budget`) until the row is
    /// corrected.
    Invalid(i32),
}

impl Budget {
    pub fn of(column: Option<i32>) -> Self {
        match column {
            None => Budget::Unlimited,
            Some(n) => u32::try_from(n).map_or(Budget::Invalid(n), Budget::Segments),
        }
    }
}

impl SchoolSettings {
    /// A British school that allows every type, with no sender or provider of its own:
    /// for unit tests.
    #[cfg(test)]
    pub(crate) fn example(school_id: i64) -> Self {
        SchoolSettings {
            school_id,
            sms_enabled: true,
            country: Some("GB".into()),
            sender_id: None,
            sender_number: None,
            provider: None,
            fallback_provider: None,
            allow_confirmations: true,
            allow_reminders: true,
            allow_changes: true,
            allow_announcements: true,
            allow_login_codes: true,
            quiet: Quiet::None,
            destinations: Destinations::Default,
            budget: Budget::Unlimited,
        }
    }

    pub fn allows(&self, kind: JobType) -> bool {
        match kind {
            JobType::BookingConfirmation => self.allow_confirmations,
            JobType::BookingReminder => self.allow_reminders,
            JobType::BookingChange | JobType::BookingCancellation => self.allow_changes,
            JobType::Announcement => self.allow_announcements,
            JobType::LoginCode => self.allow_login_codes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowed_countries_are_read_code_by_code() {
        let codes = |list: &[Option<&str>]| -> Vec<Option<String>> {
            list.iter().map(|c| c.map(str::to_owned)).collect()
        };
        assert_eq!(Destinations::of(None), Destinations::Default);
        let Destinations::Only(list) = Destinations::of(Some(&codes(&[Some("ie"), Some("FR")])))
        else {
            panic!("two countries")
        };
        assert_eq!(
            list.iter().map(Country::as_str).collect::<Vec<_>>(),
            ["IE", "FR"]
        );
        assert_eq!(Destinations::of(Some(&[])), Destinations::Only(Vec::new()));
        assert_eq!(
            Destinations::of(Some(&codes(&[Some("GB"), Some("UK")]))),
            Destinations::Invalid("UK".into())
        );
        assert_eq!(
            Destinations::of(Some(&codes(&[None]))),
            Destinations::Invalid("NULL".into())
        );
    }

    #[test]
    fn a_negative_budget_is_invalid_and_zero_is_a_budget() {
        assert_eq!(Budget::of(None), Budget::Unlimited);
        assert_eq!(Budget::of(Some(0)), Budget::Segments(0));
        assert_eq!(
            Budget::of(Some(i32::MAX)),
            Budget::Segments(i32::MAX as u32)
        );
        assert_eq!(Budget::of(Some(-1)), Budget::Invalid(-1));
    }

    #[test]
    fn quiet_hours_need_both_ends() {
        assert_eq!(
            Quiet::of(
                Some("Europe/London"),
                Some(time::macros::time!(21:00)),
                None
            ),
            Quiet::None
        );
    }
}
