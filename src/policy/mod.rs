//! Policy: whether, when, from whom and by which route a message is sent. A pure function
//! over the job, the school's settings and its route (whatever the caller resolved the
//! school's provider to: the daemon passes its gateways), so every rule is unit-tested
//! without mocks.
//!
//! Opt-outs are not decided here: the store's claim that starts an attempt reads
//! `sms_opt_outs` in the same statement, so an opt-out written a moment ago counts, and
//! the table stays the only authority. Nor are the guards' counts: [`guards`] says which
//! a message involves, and the store counts them.

pub mod guards;
pub mod sender;

use time::OffsetDateTime;

use crate::{
    job::JobType,
    phone::{Country, PhoneError, PhoneNumber, SenderId},
    school::{Budget, Destinations, SchoolSettings},
};

/// Why a message is not sent although nothing failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SuppressReason {
    NoSchoolSettings,
    SchoolDisabled,
    TypeNotAllowed,
    OptedOut,
    /// The number's country is not one the school may text.
    CountryNotAllowed,
    /// The number had its login codes for the window (`SMSGW_LOGIN_CODE_LIMIT`).
    RecipientLimit,
    /// The account had its texts abroad for the UTC day (`SMSGW_INTERNATIONAL_DAILY_LIMIT`).
    InternationalLimit,
    /// The school's monthly budget has no room for the message.
    BudgetExhausted,
    /// The school's `allowed_countries` holds a code that is not a country.
    InvalidAllowedCountries,
    /// The school's `monthly_segment_budget` is negative.
    InvalidBudget,
}

impl SuppressReason {
    pub const ALL: [SuppressReason; 10] = [
        SuppressReason::NoSchoolSettings,
        SuppressReason::SchoolDisabled,
        SuppressReason::TypeNotAllowed,
        SuppressReason::OptedOut,
        SuppressReason::CountryNotAllowed,
        SuppressReason::RecipientLimit,
        SuppressReason::InternationalLimit,
        SuppressReason::BudgetExhausted,
        SuppressReason::InvalidAllowedCountries,
        SuppressReason::InvalidBudget,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SuppressReason::NoSchoolSettings => "no_school_settings",
            SuppressReason::SchoolDisabled => "school_disabled",
            SuppressReason::TypeNotAllowed => "type_not_allowed",
            SuppressReason::OptedOut => "opted_out",
            SuppressReason::CountryNotAllowed => "country_not_allowed",
            SuppressReason::RecipientLimit => "recipient_limit",
            SuppressReason::InternationalLimit => "international_limit",
            SuppressReason::BudgetExhausted => "budget_exhausted",
            SuppressReason::InvalidAllowedCountries => "invalid_allowed_countries",
            SuppressReason::InvalidBudget => "invalid_budget",
        }
    }
}

/// Why a message can never be sent as it stands: a permanent failure before any provider call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("invalid recipient: {0}")]
    InvalidRecipient(PhoneError),
    #[error("invalid school sender_id: {0}")]
    InvalidSender(crate::phone::SenderIdError),
    #[error("invalid school sender_number: it must be a number in E.164")]
    InvalidSenderNumber,
    #[error("{segments} segments, more than the {max} allowed for this type")]
    TooManySegments { segments: u32, max: u32 },
    #[error("the school's provider '{0}' is not configured")]
    UnknownProvider(String),
}

impl Refusal {
    /// The short reason stored in `sms_messages.reason`.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::InvalidRecipient(_) => "invalid_number",
            Refusal::InvalidSender(_) => "invalid_sender_id",
            Refusal::InvalidSenderNumber => "invalid_sender_number",
            Refusal::TooManySegments { .. } => "too_many_segments",
            Refusal::UnknownProvider(_) => "unknown_provider",
        }
    }
}

/// What to do with a message. `R` is the route it goes by (the provider's `Route` in the
/// daemon).
#[derive(Debug, Clone, PartialEq)]
pub enum Decision<R> {
    /// Send it now to `to` through `route`, from the school's sender if it has one (else
    /// the default), or from its `sender_number` where the destination refuses
    /// alphanumeric senders ([`sender::choose`]).
    Send {
        to: PhoneNumber,
        sender: Option<SenderId>,
        sender_number: Option<SenderId>,
        route: R,
    },
    Suppress(SuppressReason),
    /// Past `expires_at`: never sent.
    Expire,
    /// Not before this moment; come back then.
    Defer {
        until: OffsetDateTime,
    },
    /// The school's quiet hours last until this moment (or the job expires then first).
    Hold {
        until: OffsetDateTime,
    },
    Refuse(Refusal),
}

/// The inputs of [`decide`] that come from outside the job itself.
#[derive(Debug, Clone)]
pub struct Facts<'a, R> {
    pub settings: Option<&'a SchoolSettings>,
    /// The recipient normalised with the school's country (or why it could not be).
    pub recipient: &'a Result<PhoneNumber, PhoneError>,
    /// The gateways the school's settings name, or the name of one not configured.
    pub route: &'a Result<R, String>,
    /// How many segments the body takes, and the most the job's type may take.
    pub segments: u32,
    pub max_segments: Option<u32>,
    /// The types that wait out a school's quiet hours.
    pub quiet_types: &'a [JobType],
    /// The countries every school may text besides its own (`SMSGW_ALLOWED_COUNTRIES`).
    pub allowed_countries: &'a [Country],
    pub now: OffsetDateTime,
}

/// Decides a message's fate. Expiry first (an expired text is never useful), then the
/// school's settings (a guard setting it cannot be read with refuses every message), the
/// recipient and its country, the sender and length, the schedule (`not_before`, then
/// quiet hours), and last the route: a message that waits is deferred even when its
/// provider is missing, so that a configuration fixed before it is due still sends it.
pub fn decide<R: Clone>(
    kind: JobType,
    not_before: Option<OffsetDateTime>,
    expires_at: Option<OffsetDateTime>,
    facts: &Facts<'_, R>,
) -> Decision<R> {
    if expires_at.is_some_and(|at| at <= facts.now) {
        return Decision::Expire;
    }
    let Some(settings) = facts.settings else {
        return Decision::Suppress(SuppressReason::NoSchoolSettings);
    };
    if !settings.sms_enabled {
        return Decision::Suppress(SuppressReason::SchoolDisabled);
    }
    if !settings.allows(kind) {
        return Decision::Suppress(SuppressReason::TypeNotAllowed);
    }
    if let Some(unreadable) = unreadable_guard(settings) {
        return Decision::Suppress(unreadable);
    }
    let to = match facts.recipient {
        Ok(number) => number.clone(),
        Err(e) => return Decision::Refuse(Refusal::InvalidRecipient(e.clone())),
    };
    if !guards::destination_allowed(settings, facts.allowed_countries, to.country()) {
        return Decision::Suppress(SuppressReason::CountryNotAllowed);
    }
    let sender = match settings.sender_id.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(raw) => match SenderId::parse(raw) {
            Ok(sender) => Some(sender),
            Err(e) => return Decision::Refuse(Refusal::InvalidSender(e)),
        },
    };
    let sender_number = match settings.sender_number.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(raw) => match SenderId::parse(raw) {
            Ok(number) if number.is_number() => Some(number),
            _ => return Decision::Refuse(Refusal::InvalidSenderNumber),
        },
    };
    if let Some(max) = facts.max_segments.filter(|max| facts.segments > *max) {
        return Decision::Refuse(Refusal::TooManySegments {
            segments: facts.segments,
            max,
        });
    }
    if let Some(until) = not_before.filter(|at| *at > facts.now) {
        return Decision::Defer { until };
    }
    if facts.quiet_types.contains(&kind)
        && let Some(until) = settings.quiet.release(facts.now)
    {
        // Held no longer than it is worth sending: at `expires_at` it ends as expired.
        let until = expires_at.map_or(until, |at| at.min(until));
        return Decision::Hold { until };
    }
    match facts.route {
        Ok(route) => Decision::Send {
            to,
            sender,
            sender_number,
            route: route.clone(),
        },
        Err(name) => Decision::Refuse(Refusal::UnknownProvider(name.clone())),
    }
}

/// A guard setting of the school's that cannot be read: nothing is sent on a guess.
fn unreadable_guard(settings: &SchoolSettings) -> Option<SuppressReason> {
    if let Destinations::Invalid(_) = settings.destinations {
        return Some(SuppressReason::InvalidAllowedCountries);
    }
    if let Budget::Invalid(_) = settings.budget {
        return Some(SuppressReason::InvalidBudget);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::school::Quiet;
    use time::macros::datetime;

    fn school() -> SchoolSettings {
        SchoolSettings::example(42)
    }

    const NOW: OffsetDateTime = datetime!(2026-11-25 10:00 UTC);

    fn number() -> Result<PhoneNumber, PhoneError> {
        PhoneNumber::parse("+447700900123", None)
    }

    fn decide_with(settings: Option<&SchoolSettings>) -> Decision<()> {
        let recipient = number();
        decide(
            JobType::BookingReminder,
            None,
            None,
            &Facts {
                settings,
                recipient: &recipient,
                route: &Ok(()),
                segments: 1,
                max_segments: None,
                quiet_types: &[],
                allowed_countries: &[],
                now: NOW,
            },
        )
    }

    #[test]
    fn an_enabled_school_sends() {
        assert_eq!(
            decide_with(Some(&school())),
            Decision::Send {
                to: number().expect("valid"),
                sender: None,
                sender_number: None,
                route: ()
            }
        );
    }

    #[test]
    fn each_suppression_reason() {
        assert_eq!(
            decide_with(None),
            Decision::Suppress(SuppressReason::NoSchoolSettings)
        );
        let disabled = SchoolSettings {
            sms_enabled: false,
            ..school()
        };
        assert_eq!(
            decide_with(Some(&disabled)),
            Decision::Suppress(SuppressReason::SchoolDisabled)
        );
        let no_reminders = SchoolSettings {
            allow_reminders: false,
            ..school()
        };
        assert_eq!(
            decide_with(Some(&no_reminders)),
            Decision::Suppress(SuppressReason::TypeNotAllowed)
        );
    }

    #[test]
    fn changes_and_cancellations_share_one_setting() {
        let s = SchoolSettings {
            allow_changes: false,
            ..school()
        };
        assert!(!s.allows(JobType::BookingChange));
        assert!(!s.allows(JobType::BookingCancellation));
        assert!(s.allows(JobType::LoginCode));
    }

    #[test]
    fn expiry_wins_over_everything() {
        let recipient = number();
        let facts = Facts {
            settings: None,
            recipient: &recipient,
            route: &Ok(()),
            segments: 1,
            max_segments: None,
            quiet_types: &[],
            allowed_countries: &[],
            now: NOW,
        };
        assert_eq!(
            decide(JobType::LoginCode, None, Some(NOW), &facts),
            Decision::Expire
        );
    }

    #[test]
    fn not_before_in_the_future_defers() {
        let recipient = number();
        let s = school();
        let facts = Facts {
            settings: Some(&s),
            recipient: &recipient,
            route: &Ok(()),
            segments: 1,
            max_segments: None,
            quiet_types: &[],
            allowed_countries: &[],
            now: NOW,
        };
        let later = datetime!(2026-11-25 11:00 UTC);
        assert_eq!(
            decide(JobType::BookingReminder, Some(later), None, &facts),
            Decision::Defer { until: later }
        );
        let earlier = datetime!(2026-11-25 09:00 UTC);
        assert!(matches!(
            decide(JobType::BookingReminder, Some(earlier), None, &facts),
            Decision::Send { sender: None, .. }
        ));
    }

    #[test]
    fn sender_override_is_validated() {
        let recipient = number();
        let good = SchoolSettings {
            sender_id: Some("DriveSafe".into()),
            ..school()
        };
        let facts = Facts {
            settings: Some(&good),
            recipient: &recipient,
            route: &Ok(()),
            segments: 1,
            max_segments: None,
            quiet_types: &[],
            allowed_countries: &[],
            now: NOW,
        };
        assert_eq!(
            decide(JobType::LoginCode, None, None, &facts),
            Decision::Send {
                to: number().expect("valid"),
                sender: Some(SenderId::parse("DriveSafe").expect("valid")),
                sender_number: None,
                route: ()
            }
        );
        let bad = SchoolSettings {
            sender_id: Some("Drive Safe School".into()),
            ..school()
        };
        let facts = Facts {
            settings: Some(&bad),
            ..facts
        };
        assert!(matches!(
            decide(JobType::LoginCode, None, None, &facts),
            Decision::Refuse(Refusal::InvalidSender(_))
        ));
    }

    #[test]
    fn a_text_over_its_types_segment_limit_is_refused() {
        let recipient = number();
        let s = school();
        let facts = Facts {
            settings: Some(&s),
            recipient: &recipient,
            route: &Ok(()),
            segments: 2,
            max_segments: Some(1),
            quiet_types: &[],
            allowed_countries: &[],
            now: NOW,
        };
        assert_eq!(
            decide(JobType::LoginCode, None, None, &facts),
            Decision::Refuse(Refusal::TooManySegments {
                segments: 2,
                max: 1
            })
        );
        let facts = Facts {
            max_segments: Some(2),
            ..facts
        };
        assert!(matches!(
            decide(JobType::LoginCode, None, None, &facts),
            Decision::Send { .. }
        ));
    }

    #[test]
    fn an_impossible_number_is_refused() {
        let recipient = PhoneNumber::parse("+44123", None);
        let s = school();
        let facts = Facts {
            settings: Some(&s),
            recipient: &recipient,
            route: &Ok(()),
            segments: 1,
            max_segments: None,
            quiet_types: &[],
            allowed_countries: &[],
            now: NOW,
        };
        let decision = decide(JobType::LoginCode, None, None, &facts);
        assert!(matches!(
            decision,
            Decision::Refuse(Refusal::InvalidRecipient(_))
        ));
    }

    #[test]
    fn a_provider_that_is_not_configured_is_refused_when_due() {
        let recipient = number();
        let s = school();
        let missing: Result<(), String> = Err("vonage-eu".into());
        let facts = Facts {
            settings: Some(&s),
            recipient: &recipient,
            route: &missing,
            segments: 1,
            max_segments: None,
            quiet_types: &[],
            allowed_countries: &[],
            now: NOW,
        };
        assert_eq!(
            decide(JobType::LoginCode, None, None, &facts),
            Decision::Refuse(Refusal::UnknownProvider("vonage-eu".into()))
        );
        let later = datetime!(2026-11-25 11:00 UTC);
        assert_eq!(
            decide(JobType::LoginCode, Some(later), None, &facts),
            Decision::Defer { until: later }
        );
        let disabled = SchoolSettings {
            sms_enabled: false,
            ..school()
        };
        let facts = Facts {
            settings: Some(&disabled),
            ..facts
        };
        assert_eq!(
            decide(JobType::LoginCode, None, None, &facts),
            Decision::Suppress(SuppressReason::SchoolDisabled)
        );
    }

    /// A London school quiet from 21:00 to 08:00; NOW (10:00 UTC) is outside it.
    fn quiet_school() -> SchoolSettings {
        SchoolSettings {
            quiet: Quiet::of(
                Some("Europe/London"),
                Some(time::macros::time!(21:00)),
                Some(time::macros::time!(08:00)),
            ),
            ..school()
        }
    }

    const LATE: OffsetDateTime = datetime!(2026-11-25 23:30 UTC);
    const MORNING: OffsetDateTime = datetime!(2026-11-26 08:00 UTC);
    const HELD: [JobType; 3] = [
        JobType::BookingConfirmation,
        JobType::BookingReminder,
        JobType::Announcement,
    ];

    fn decide_at(
        kind: JobType,
        expires_at: Option<OffsetDateTime>,
        settings: &SchoolSettings,
        now: OffsetDateTime,
    ) -> Decision<()> {
        let recipient = number();
        let facts = Facts {
            settings: Some(settings),
            recipient: &recipient,
            route: &Ok(()),
            segments: 1,
            max_segments: None,
            quiet_types: &HELD,
            allowed_countries: &[],
            now,
        };
        decide(kind, None, expires_at, &facts)
    }

    #[test]
    fn quiet_hours_hold_a_reminder_until_the_window_ends() {
        let school = quiet_school();
        assert_eq!(
            decide_at(JobType::BookingReminder, None, &school, LATE),
            Decision::Hold { until: MORNING }
        );
        assert!(matches!(
            decide_at(JobType::BookingReminder, None, &school, NOW),
            Decision::Send { .. }
        ));
    }

    #[test]
    fn quiet_hours_never_hold_urgent_types() {
        let school = quiet_school();
        for kind in [
            JobType::LoginCode,
            JobType::BookingChange,
            JobType::BookingCancellation,
        ] {
            assert!(
                matches!(decide_at(kind, None, &school, LATE), Decision::Send { .. }),
                "{kind:?}"
            );
        }
    }

    #[test]
    fn a_held_text_waits_no_longer_than_it_is_worth_sending() {
        let school = quiet_school();
        let expiry = datetime!(2026-11-26 06:00 UTC);
        assert_eq!(
            decide_at(JobType::BookingReminder, Some(expiry), &school, LATE),
            Decision::Hold { until: expiry }
        );
        assert_eq!(
            decide_at(JobType::BookingReminder, Some(expiry), &school, expiry),
            Decision::Expire
        );
    }

    #[test]
    fn an_unknown_timezone_holds_nothing_back() {
        let school = SchoolSettings {
            quiet: Quiet::of(
                Some("Europe/Atlantis"),
                Some(time::macros::time!(21:00)),
                Some(time::macros::time!(08:00)),
            ),
            ..school()
        };
        assert_eq!(school.quiet, Quiet::UnknownZone("Europe/Atlantis".into()));
        assert!(matches!(
            decide_at(JobType::BookingReminder, None, &school, LATE),
            Decision::Send { .. }
        ));
    }

    fn decide_to(raw: &str, settings: &SchoolSettings, account: &[Country]) -> Decision<()> {
        let recipient = PhoneNumber::parse(raw, None);
        let facts = Facts {
            settings: Some(settings),
            recipient: &recipient,
            route: &Ok(()),
            segments: 1,
            max_segments: None,
            quiet_types: &[],
            allowed_countries: account,
            now: NOW,
        };
        decide(JobType::LoginCode, None, None, &facts)
    }

    #[test]
    fn a_number_abroad_is_suppressed_unless_its_country_is_allowed() {
        let jamaica = "+18765551234";
        assert_eq!(
            decide_to(jamaica, &school(), &[]),
            Decision::Suppress(SuppressReason::CountryNotAllowed)
        );
        let account = [Country::parse("JM").expect("JM")];
        assert!(matches!(
            decide_to(jamaica, &school(), &account),
            Decision::Send { .. }
        ));
        let listed = SchoolSettings {
            destinations: Destinations::Only(account.to_vec()),
            ..school()
        };
        assert!(matches!(
            decide_to(jamaica, &listed, &[]),
            Decision::Send { .. }
        ));
        assert_eq!(
            decide_to("+447700900123", &listed, &[]),
            Decision::Suppress(SuppressReason::CountryNotAllowed),
            "a list of its own replaces the school's country"
        );
    }

    #[test]
    fn a_guard_setting_that_cannot_be_read_suppresses_every_message() {
        let countries = SchoolSettings {
            destinations: Destinations::Invalid("UK".into()),
            ..school()
        };
        assert_eq!(
            decide_to("+447700900123", &countries, &[]),
            Decision::Suppress(SuppressReason::InvalidAllowedCountries)
        );
        let budget = SchoolSettings {
            budget: Budget::Invalid(-5),
            ..school()
        };
        assert_eq!(
            decide_to("+447700900123", &budget, &[]),
            Decision::Suppress(SuppressReason::InvalidBudget)
        );
        let names: Vec<&str> = SuppressReason::ALL.iter().map(|r| r.as_str()).collect();
        let unique: std::collections::HashSet<&&str> = names.iter().collect();
        assert_eq!(unique.len(), names.len());
    }
}
