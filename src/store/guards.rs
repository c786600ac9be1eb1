//! The guards' counts (interface section 14): a message admitted past them, or the guard
//! that refuses it, in one statement (`sms_guard_admit`, in the guards migration, which
//! also writes the budget events); what each school used of its budget; the schools whose
//! guard settings cannot be read; and the purge of old counts.
//!
//! Every count lives in PostgreSQL and changes under its row's lock, so all replicas
//! share it and none passes a limit. A message is counted once, through its reservations
//! (`sms_guard_reservations`, one per message and counter): a retry finds them and passes.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use time::Date;
use uuid::Uuid;

use super::{Store, StoreError};
use crate::{
    config::RateWindow,
    school::{Budget, Destinations},
};

/// The messages to admit, and the counters they involve.
#[derive(Debug, Clone)]
pub struct GuardCheck<'a> {
    /// One message, or an announcement's recipients (then only the budget is counted).
    pub messages: &'a [Uuid],
    /// Their recipients (E.164), in the same order.
    pub recipients: &'a [&'a str],
    pub school_id: i64,
    /// Each message's segments.
    pub segments: u32,
    /// A login code: its number's limit.
    pub login_codes: Option<RateWindow>,
    /// A text abroad: the account's daily limit.
    pub international: Option<u32>,
    /// A school with a budget.
    pub budget: Option<GuardBudget>,
}

/// A school's monthly budget, as a message counts against it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuardBudget {
    pub budget: u32,
    /// Counted, never refused.
    pub exempt: bool,
}

/// What the guards said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Counted (or counted before): it may be sent.
    Admitted,
    Refused(GuardRefusal),
}

/// Why the guards refused a message; nothing was counted for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuardRefusal {
    /// Every recipient opted out (their claims would refuse them anyway).
    OptedOut,
    RecipientLimit,
    InternationalLimit,
    BudgetExhausted,
}

impl GuardRefusal {
    fn parse(text: &str) -> Option<Self> {
        match text {
            "opted_out" => Some(GuardRefusal::OptedOut),
            "recipient_limit" => Some(GuardRefusal::RecipientLimit),
            "international_limit" => Some(GuardRefusal::InternationalLimit),
            "budget_exhausted" => Some(GuardRefusal::BudgetExhausted),
            _ => None,
        }
    }
}

/// One school's budget and what it used of it in one month.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetUse {
    pub school_id: i64,
    /// The month's first day.
    pub month: Date,
    pub budget: i32,
    /// Segments admitted.
    pub used: i64,
}

/// A school whose guard settings cannot be read, and which setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnreadableGuard {
    pub school_id: i64,
    /// `allowed_countries` or `monthly_segment_budget`.
    pub setting: &'static str,
    /// The value, as written (shortened).
    pub value: String,
}

/// A row of counts that many messages of one process would wait on at once: the day's
/// texts abroad (one for the whole account) and a school's month.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum SharedCount {
    Abroad,
    School(i64),
}

/// Admissions of one process that involve the same shared count take turns here, before
/// they take a connection. Waiting on the row's lock instead, each would hold one of the
/// pool's few connections: a school's messages, hundreds in flight, would take them all
/// from the claims and records every other message needs, and sending would crawl.
#[derive(Debug, Default)]
pub(super) struct AdmissionTurns {
    turns: Mutex<HashMap<SharedCount, Arc<tokio::sync::Mutex<()>>>>,
}

impl AdmissionTurns {
    /// The turn of each shared count `check` involves, in the order the statement locks
    /// their rows (the day's before the school's), so two admissions never wait for each
    /// other in a circle.
    async fn take(&self, check: &GuardCheck<'_>) -> Vec<tokio::sync::OwnedMutexGuard<()>> {
        let mut wanted = Vec::with_capacity(2);
        if check.international.is_some() {
            wanted.push(SharedCount::Abroad);
        }
        if check.budget.is_some() {
            wanted.push(SharedCount::School(check.school_id));
        }
        let mut held = Vec::with_capacity(wanted.len());
        for count in wanted {
            let turn = {
                let mut turns = self.turns.lock().unwrap_or_else(|p| p.into_inner());
                turns.entry(count).or_default().clone()
            };
            held.push(turn.lock_owned().await);
        }
        held
    }
}

/// A count that fits PostgreSQL's `integer`.
fn int4(n: u32) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

impl Store {
    /// Admits the messages past the guards they involve, counting them once, or says
    /// which guard refuses them (and counts nothing).
    ///
    /// The admission's commit does not wait for the disk (`synchronous_commit` off for
    /// it alone): it is short, and the row locks it holds are released sooner. Nothing is
    /// given up by that. A message is claimed after it is admitted, and a commit that
    /// waits for the disk flushes the write-ahead log up to itself, every commit before
    /// it included; so an admission a database crash can take away is one whose message
    /// was never claimed, never sent, and then counts nothing, as it should.
    pub async fn admit(&self, check: &GuardCheck<'_>) -> Result<Admission, StoreError> {
        const ADMIT: &str = "SELECT sms_guard_admit($1::uuid[], $2::text[], $3::int8, $4::int4,
                                                   $5::int4, $6::bool, $7::int4, $8::float8,
                                                   $9::int4),
                                   set_config('synchronous_commit', 'off', true)";
        let _turns = self.admission_turns.take(check).await;
        let login_limit = check.login_codes.map(|l| int4(l.count));
        let login_window = check.login_codes.map(|l| l.window.as_secs_f64());
        let international = check.international.map(int4);
        let budget = check.budget.map(|b| int4(b.budget));
        let exempt = check.budget.is_some_and(|b| b.exempt);
        let row = self
            .row(
                ADMIT,
                &[
                    &check.messages,
                    &check.recipients,
                    &check.school_id,
                    &int4(check.segments),
                    &budget,
                    &exempt,
                    &login_limit,
                    &login_window,
                    &international,
                ],
            )
            .await?
            .ok_or_else(|| StoreError::Corrupt("no answer from sms_guard_admit".into()))?;
        match row.try_get::<_, Option<String>>(0)? {
            None => Ok(Admission::Admitted),
            Some(reason) => GuardRefusal::parse(&reason)
                .map(Admission::Refused)
                .ok_or_else(|| StoreError::Corrupt(format!("guard refusal '{reason}'"))),
        }
    }

    /// Each school with a budget (a negative one is none: see
    /// [`Store::schools_with_unreadable_guards`]), of one school or all, and what it used
    /// in each month from `first` to `last` (first days, inclusive); a month it used
    /// nothing in too.
    pub async fn budget_use(
        &self,
        first: Date,
        last: Date,
        school_id: Option<i64>,
    ) -> Result<Vec<BudgetUse>, StoreError> {
        const USE: &str = "
            SELECT s.school_id, s.monthly_segment_budget AS budget, m.month::date AS month,
                   COALESCE(b.used, 0) AS used
              FROM sms_school_settings s
             CROSS JOIN generate_series($1::date, $2::date, interval '1 month') AS m (month)
              LEFT JOIN sms_guard_budgets b
                     ON b.school_id = s.school_id AND b.month = m.month::date
             WHERE s.monthly_segment_budget >= 0
               AND ($3::int8 IS NULL OR s.school_id = $3)
             ORDER BY s.school_id, m.month";
        self.rows(USE, &[&first, &last, &school_id])
            .await?
            .iter()
            .map(|row| {
                Ok(BudgetUse {
                    school_id: row.try_get("school_id")?,
                    month: row.try_get("month")?,
                    budget: row.try_get("budget")?,
                    used: row.try_get("used")?,
                })
            })
            .collect()
    }

    /// The schools whose `allowed_countries` or `monthly_segment_budget` cannot be read:
    /// their messages are refused until the row is corrected.
    pub async fn schools_with_unreadable_guards(&self) -> Result<Vec<UnreadableGuard>, StoreError> {
        const SETTINGS: &str = "
            SELECT school_id, allowed_countries, monthly_segment_budget FROM sms_school_settings
             WHERE allowed_countries IS NOT NULL OR monthly_segment_budget < 0
             ORDER BY school_id";
        let mut unreadable = Vec::new();
        for row in self.rows(SETTINGS, &[]).await? {
            let school_id: i64 = row.try_get("school_id")?;
            let countries: Option<Vec<Option<String>>> = row.try_get("allowed_countries")?;
            if let Destinations::Invalid(code) = Destinations::of(countries.as_deref()) {
                unreadable.push(UnreadableGuard {
                    school_id,
                    setting: "allowed_countries",
                    value: code,
                });
            }
            if let Budget::Invalid(value) = Budget::of(row.try_get("monthly_segment_budget")?) {
                unreadable.push(UnreadableGuard {
                    school_id,
                    setting: "monthly_segment_budget",
                    value: value.to_string(),
                });
            }
        }
        Ok(unreadable)
    }

    /// Deletes at most `batch` of each kind of count older than `older_than`: messages'
    /// reservations, numbers' login codes, days and schools' months. Returns how many.
    pub async fn purge_guards(&self, older_than: Duration, batch: i64) -> Result<u64, StoreError> {
        const PURGE: &str = "
            WITH reservations AS (
                DELETE FROM sms_guard_reservations
                 WHERE (message_id, guard) IN (
                       SELECT message_id, guard FROM sms_guard_reservations
                        WHERE reserved_at < now() - make_interval(secs => $1) LIMIT $2)
                RETURNING 1
            ), recipients AS (
                DELETE FROM sms_guard_recipients
                 WHERE phone IN (SELECT phone FROM sms_guard_recipients
                                  WHERE updated_at < now() - make_interval(secs => $1)
                                  LIMIT $2 FOR UPDATE SKIP LOCKED)
                RETURNING 1
            ), days AS (
                DELETE FROM sms_guard_days
                 WHERE day < (now() - make_interval(secs => $1))::date
                RETURNING 1
            ), months AS (
                DELETE FROM sms_guard_budgets
                 WHERE month < date_trunc('month', now() - make_interval(secs => $1))::date
                RETURNING 1
            )
            SELECT (SELECT count(*) FROM reservations) + (SELECT count(*) FROM recipients)
                 + (SELECT count(*) FROM days) + (SELECT count(*) FROM months)";
        let row = self
            .row(PURGE, &[&older_than.as_secs_f64(), &batch])
            .await?
            .ok_or_else(|| StoreError::Corrupt("no answer from the guards' purge".into()))?;
        Ok(u64::try_from(row.try_get::<_, i64>(0)?).unwrap_or(0))
    }
}
