//! A school's settings as values: the row of `sms_school_settings` the policy reads, and
//! its quiet hours in the school's own time zone. No I/O: the store reads the row, the
//! policy decides with it.

pub mod quiet;

pub use quiet::{QuietHours, zone};

use time::OffsetDateTime;

use crate::job::JobType;

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
    pub provider: Option<String>,
    /// Used when `provider` refuses for a reason it may not share, or its circuit is open.
    pub fallback_provider: Option<String>,
    pub allow_confirmations: bool,
    pub allow_reminders: bool,
    pub allow_changes: bool,
    pub allow_announcements: bool,
    pub allow_login_codes: bool,
    pub quiet: Quiet,
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
            provider: None,
            fallback_provider: None,
            allow_confirmations: true,
            allow_reminders: true,
            allow_changes: true,
            allow_announcements: true,
            allow_login_codes: true,
            quiet: Quiet::None,
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
