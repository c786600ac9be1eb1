//! The guards against fraud and spend, as pure rules: where a school may text, whether a
//! number is abroad, which counters a message involves, whether segments fit a budget,
//! which budget events a use sets off, and which UTC day and month an instant falls in.
//!
//! Counting itself happens in PostgreSQL (the store's `sms_guard_admit_many`), atomically
//! and once per message, so that every replica shares one count; these rules decide, from
//! the cached settings alone, whether a message needs a count at all. Most do not, and
//! pay nothing: a domestic text that is not a login code, from a school without a budget.

use std::fmt;

use time::{Date, OffsetDateTime, UtcOffset};

use crate::{
    config::{GuardSettings, RateWindow},
    job::JobType,
    phone::{Country, PhoneNumber},
    school::{Budget, Destinations, SchoolSettings},
};

/// The school's own country, when its `country` is a code the numbering plans know.
pub fn home(school: &SchoolSettings) -> Option<Country> {
    school.country.as_deref().and_then(Country::parse)
}

/// Whether `school` may text a number of country `to` (`None`: a number of no country,
/// such as a satellite network's, which no list holds). Its `allowed_countries` when set;
/// otherwise its own country and the account's list.
pub fn destination_allowed(
    school: &SchoolSettings,
    account: &[Country],
    to: Option<Country>,
) -> bool {
    let Some(to) = to else {
        return false;
    };
    match &school.destinations {
        Destinations::Only(countries) => countries.contains(&to),
        Destinations::Default => home(school) == Some(to) || account.contains(&to),
        Destinations::Invalid(_) => false,
    }
}

/// Whether a text to a number of country `to` goes abroad for a school at `home`. A school
/// without a country has no home: every text of it is counted as international.
pub fn is_international(home: Option<Country>, to: Option<Country>) -> bool {
    home.is_none() || home != to
}

/// A school's budget, as one message counts against it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BudgetCount {
    pub budget: u32,
    /// The message's segments, counted whatever else happens.
    pub segments: u32,
    /// Counted, never refused (`SMSGW_BUDGET_EXEMPT_TYPES`).
    pub exempt: bool,
}

/// The counters one message involves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counters {
    /// A login code: its number's count in the sliding window.
    pub login_codes: Option<RateWindow>,
    /// A text abroad: the account's count of the UTC day, and its limit.
    pub international: Option<u32>,
    /// A school with a budget: its count of the month.
    pub budget: Option<BudgetCount>,
}

impl Counters {
    /// Whether any counter is involved: without one, no statement is needed.
    pub fn any(&self) -> bool {
        self.login_codes.is_some() || self.international.is_some() || self.budget.is_some()
    }
}

/// The counters a message of `kind` to `to`, taking `segments`, involves.
pub fn counters(
    kind: JobType,
    school: &SchoolSettings,
    to: &PhoneNumber,
    segments: u32,
    guards: &GuardSettings,
) -> Counters {
    Counters {
        login_codes: (kind == JobType::LoginCode).then_some(guards.login_code_limit),
        international: is_international(home(school), to.country())
            .then_some(guards.international_daily_limit),
        budget: budget_count(kind, school.budget, segments, guards),
    }
}

/// How a message of `kind` taking `segments` counts against a school's budget, if it has
/// one.
pub fn budget_count(
    kind: JobType,
    budget: Budget,
    segments: u32,
    guards: &GuardSettings,
) -> Option<BudgetCount> {
    match budget {
        Budget::Segments(budget) => Some(BudgetCount {
            budget,
            segments,
            exempt: guards.budget_exempt.contains(&kind),
        }),
        Budget::Unlimited | Budget::Invalid(_) => None,
    }
}

/// Whether `more` segments fit a budget of which `used` are used: the last segment of a
/// budget goes, the one after it does not.
pub fn fits(budget: u32, used: u64, more: u64) -> bool {
    used.saturating_add(more) <= u64::from(budget)
}

/// The budget events a school's use reaches; each is sent once a month, the first time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Reached {
    /// `budget.warning`: 80% used.
    pub warning: bool,
    /// `budget.exhausted`: all of it used.
    pub exhausted: bool,
}

/// What a use of `used` segments of `budget` reaches. Nothing before the first segment,
/// even of a budget of 0.
pub fn reached(budget: u32, used: u64) -> Reached {
    let budget = u64::from(budget);
    Reached {
        warning: used > 0 && used.saturating_mul(5) >= budget.saturating_mul(4),
        exhausted: used > 0 && used >= budget,
    }
}

/// A UTC calendar month, as budgets count it: written `2026-12`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Month {
    first: Date,
}

impl Month {
    /// The month `at` falls in, in UTC.
    pub fn of(at: OffsetDateTime) -> Month {
        let date = at.to_offset(UtcOffset::UTC).date();
        Month {
            first: date.replace_day(1).unwrap_or(date),
        }
    }

    /// Its first day.
    pub fn first_day(&self) -> Date {
        self.first
    }

    /// The month after it.
    pub fn next(&self) -> Month {
        let (year, month) = (self.first.year(), self.first.month());
        let (year, month) = match month.next() {
            time::Month::January => (year + 1, time::Month::January),
            next => (year, next),
        };
        Month {
            first: Date::from_calendar_date(year, month, 1).unwrap_or(self.first),
        }
    }
}

impl fmt::Display for Month {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04}-{:02}",
            self.first.year(),
            u8::from(self.first.month())
        )
    }
}

/// The UTC day `at` falls in, as the international limit counts it.
pub fn day_of(at: OffsetDateTime) -> Date {
    at.to_offset(UtcOffset::UTC).date()
}

#[cfg(test)]
mod tests {
    use time::macros::{date, datetime};

    use super::*;

    fn school() -> SchoolSettings {
        SchoolSettings::example(42)
    }

    fn country(code: &str) -> Option<Country> {
        Country::parse(code)
    }

    fn number(raw: &str) -> PhoneNumber {
        PhoneNumber::parse(raw, None).expect(raw)
    }

    #[test]
    fn a_school_texts_its_own_country_and_the_accounts_by_default() {
        let gb = school();
        assert!(destination_allowed(&gb, &[], country("GB")));
        assert!(!destination_allowed(&gb, &[], country("JM")));
        let account = [Country::parse("IE").expect("IE")];
        assert!(destination_allowed(&gb, &account, country("IE")));
        assert!(!destination_allowed(&gb, &account, None), "no country");
        let nowhere = SchoolSettings {
            country: None,
            ..school()
        };
        assert!(!destination_allowed(&nowhere, &[], country("GB")));
        assert!(destination_allowed(&nowhere, &account, country("IE")));
    }

    #[test]
    fn a_schools_own_list_replaces_the_default() {
        let listed = SchoolSettings {
            destinations: Destinations::Only(vec![Country::parse("FR").expect("FR")]),
            ..school()
        };
        let account = [Country::parse("IE").expect("IE")];
        assert!(destination_allowed(&listed, &account, country("FR")));
        assert!(
            !destination_allowed(&listed, &account, country("GB")),
            "not even home"
        );
        assert!(!destination_allowed(&listed, &account, country("IE")));
        let invalid = SchoolSettings {
            destinations: Destinations::Invalid("UK".into()),
            ..school()
        };
        assert!(!destination_allowed(&invalid, &account, country("GB")));
    }

    #[test]
    fn a_text_is_international_outside_its_schools_country() {
        let gb = country("GB");
        assert!(!is_international(gb, country("GB")));
        assert!(
            is_international(gb, country("JE")),
            "Jersey has a plan of its own"
        );
        assert!(is_international(gb, None));
        assert!(
            is_international(None, country("GB")),
            "a school without a country"
        );
    }

    #[test]
    fn a_domestic_text_that_is_not_a_login_code_needs_no_counter() {
        let guards = GuardSettings::default();
        let uk = number("+447700900123");
        let plain = counters(JobType::BookingReminder, &school(), &uk, 1, &guards);
        assert!(!plain.any());
        let code = counters(JobType::LoginCode, &school(), &uk, 1, &guards);
        assert_eq!(code.login_codes, Some(guards.login_code_limit));
        assert!(code.international.is_none() && code.budget.is_none());
        let abroad = counters(
            JobType::BookingReminder,
            &school(),
            &number("+18765551234"),
            1,
            &guards,
        );
        assert_eq!(abroad.international, Some(100));
        let budgeted = SchoolSettings {
            budget: Budget::Segments(50),
            ..school()
        };
        let reminder = counters(JobType::BookingReminder, &budgeted, &uk, 2, &guards);
        let change = counters(JobType::BookingChange, &budgeted, &uk, 2, &guards);
        assert_eq!(
            reminder.budget,
            Some(BudgetCount {
                budget: 50,
                segments: 2,
                exempt: false
            })
        );
        assert_eq!(change.budget.map(|b| b.exempt), Some(true));
    }

    #[test]
    fn the_last_segment_of_a_budget_fits_and_the_next_does_not() {
        assert!(fits(10, 9, 1));
        assert!(!fits(10, 10, 1));
        assert!(!fits(10, 9, 2), "a message of two segments is not split");
        assert!(fits(10, 0, 10));
        assert!(fits(0, 0, 0));
        assert!(!fits(0, 0, 1));
        assert!(!fits(u32::MAX, u64::MAX, 1), "no overflow");
    }

    #[test]
    fn the_warning_comes_at_80_percent_and_exhaustion_at_all_of_it() {
        assert_eq!(reached(100, 79), Reached::default());
        assert_eq!(
            reached(100, 80),
            Reached {
                warning: true,
                exhausted: false
            }
        );
        assert_eq!(
            reached(100, 100),
            Reached {
                warning: true,
                exhausted: true
            }
        );
        assert!(!reached(10, 7).warning);
        assert!(reached(10, 8).warning);
        assert_eq!(reached(0, 0), Reached::default(), "nothing used yet");
        assert!(reached(0, 1).exhausted);
    }

    #[test]
    fn months_and_days_are_utcs() {
        let last = datetime!(2026-12-31 23:59:59.999 UTC);
        assert_eq!(Month::of(last).to_string(), "2026-12");
        assert_eq!(Month::of(last).first_day(), date!(2026 - 12 - 01));
        assert_eq!(
            Month::of(datetime!(2027-01-01 00:00 UTC)).to_string(),
            "2027-01"
        );
        assert_eq!(
            Month::of(last).next(),
            Month::of(datetime!(2027-01-01 00:00 UTC))
        );
        // 00:30 in Paris on New Year's Day is still the old year in UTC.
        let paris = datetime!(2027-01-01 00:30 +01:00);
        assert_eq!(Month::of(paris).to_string(), "2026-12");
        assert_eq!(day_of(paris), date!(2026 - 12 - 31));
        assert_eq!(
            day_of(datetime!(2026-12-07 00:00 UTC)),
            date!(2026 - 12 - 07)
        );
        assert_eq!(
            day_of(datetime!(2026-12-06 23:59:59.999 UTC)),
            date!(2026 - 12 - 06)
        );
    }
}
