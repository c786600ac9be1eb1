//! The guards against fraud and spend, on the way to the provider: a message the policy
//! would send is admitted past the counts it involves (a login code's number, the day's
//! texts abroad, the school's monthly budget) before it waits for its provider's pace and
//! is claimed; an announcement is admitted against its school's budget whole, when it is
//! fanned out. Which counts a message involves is decided from the cached settings
//! (`policy::guards`): most involve none and cost no statement. The counting itself is
//! the store's, shared by every replica.

use std::collections::HashSet;

use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{Abandoned, Message, MessageLog, Pipeline, outcome::Verdict};
use crate::{
    job::{BulkRecipient, Job},
    phone::PhoneNumber,
    policy::{
        self, Decision, Facts, SuppressReason,
        guards::{self, Counters},
    },
    school::SchoolSettings,
    store::{Admission, GuardBudget, GuardCheck, GuardRefusal},
};

/// The suppression a guard's refusal is recorded as.
fn reason_of(refusal: GuardRefusal) -> SuppressReason {
    match refusal {
        GuardRefusal::OptedOut => SuppressReason::OptedOut,
        GuardRefusal::RecipientLimit => SuppressReason::RecipientLimit,
        GuardRefusal::InternationalLimit => SuppressReason::InternationalLimit,
        GuardRefusal::BudgetExhausted => SuppressReason::BudgetExhausted,
    }
}

/// What an announcement's recipients count against its school's budget.
pub(super) struct Counted {
    ids: Vec<Uuid>,
    numbers: Vec<String>,
}

impl<L: MessageLog> Pipeline<L> {
    /// The guards' word on a message the policy would send to `to`: `None` to go on,
    /// else the verdict it is recorded with (suppressed, with the guard's reason).
    pub(super) async fn guard(
        &self,
        message: &Message<'_>,
        to: &PhoneNumber,
        settings: Option<&SchoolSettings>,
    ) -> Result<Option<Verdict>, Abandoned> {
        let Some(settings) = settings else {
            return Ok(None);
        };
        let segments = message.row.segments.map_or(0, |n| n.unsigned_abs());
        let guards = &self.settings.guards;
        let counters = guards::counters(message.job.kind, settings, to, segments, guards);
        if !counters.any() {
            return Ok(None);
        }
        let ids = [message.row.id];
        let recipients = [to.as_str()];
        let check = check(&ids, &recipients, message.row.school_id, segments, counters);
        let admission = self
            .persist(message.abandon, || self.log.admit(&check))
            .await?;
        Ok(match admission {
            Admission::Admitted => None,
            Admission::Refused(refusal) => Some(super::outcome::suppressed(reason_of(refusal))),
        })
    }

    /// Admits an announcement against its school's budget whole, when it has one:
    /// reserves the segments of every recipient the policy would send to at once. `false`
    /// when the budget has no room for all of them: then none is sent.
    pub(super) async fn admit_announcement(
        &self,
        job: &Job,
        recipients: &[BulkRecipient],
        settings: Option<&SchoolSettings>,
        first_seen: OffsetDateTime,
        abandon: &CancellationToken,
    ) -> Result<bool, Abandoned> {
        let Some(settings) = settings else {
            return Ok(true);
        };
        let segments = crate::segments::segment(&job.body).segments;
        let guards = &self.settings.guards;
        let Some(budget) = guards::budget_count(job.kind, settings.budget, segments, guards) else {
            return Ok(true);
        };
        let counted = self.counted_recipients(job, recipients, settings, first_seen);
        if counted.ids.is_empty() {
            return Ok(true);
        }
        let numbers: Vec<&str> = counted.numbers.iter().map(String::as_str).collect();
        let counters = Counters {
            budget: Some(budget),
            ..Counters::default()
        };
        let check = check(&counted.ids, &numbers, job.school_id, segments, counters);
        let admission = self.persist(abandon, || self.log.admit(&check)).await?;
        Ok(admission != Admission::Refused(GuardRefusal::BudgetExhausted))
    }

    /// The recipients of an announcement the policy would send to (now or later), each
    /// once: those its budget counts.
    fn counted_recipients(
        &self,
        job: &Job,
        recipients: &[BulkRecipient],
        settings: &SchoolSettings,
        first_seen: OffsetDateTime,
    ) -> Counted {
        let country = settings.country.as_deref();
        let segments = crate::segments::segment(&job.body).segments;
        let expires_at = job.expires_at.or_else(|| {
            let after = self.settings.default_expiry.get(&job.kind)?;
            Some(first_seen + *after)
        });
        let mut seen = HashSet::with_capacity(recipients.len());
        let mut counted = Counted {
            ids: Vec::new(),
            numbers: Vec::new(),
        };
        for recipient in recipients {
            let number = PhoneNumber::parse(&recipient.to, country);
            let facts = Facts {
                settings: Some(settings),
                recipient: &number,
                route: &Ok(()),
                segments,
                max_segments: self.settings.max_segments.get(&job.kind).copied(),
                quiet_types: &self.settings.quiet_types,
                allowed_countries: &self.settings.guards.allowed_countries,
                now: OffsetDateTime::now_utc(),
            };
            let decision = policy::decide(job.kind, job.not_before, expires_at, &facts);
            let goes = matches!(
                decision,
                Decision::Send { .. } | Decision::Defer { .. } | Decision::Hold { .. }
            );
            if let (true, Ok(number)) = (goes, number) {
                let id = Uuid::new_v5(&job.id, number.as_str().as_bytes());
                if seen.insert(id) {
                    counted.ids.push(id);
                    counted.numbers.push(number.as_str().to_owned());
                }
            }
        }
        counted
    }
}

/// The store's check of `counters` for messages `ids` to `recipients`.
fn check<'a>(
    ids: &'a [Uuid],
    recipients: &'a [&'a str],
    school_id: i64,
    segments: u32,
    counters: Counters,
) -> GuardCheck<'a> {
    GuardCheck {
        messages: ids,
        recipients,
        school_id,
        segments,
        login_codes: counters.login_codes,
        international: counters.international,
        budget: counters.budget.map(|b| GuardBudget {
            budget: b.budget,
            exempt: b.exempt,
        }),
    }
}
