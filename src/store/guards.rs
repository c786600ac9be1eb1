//! The guards' counts (interface section 14): messages admitted past them, or the guard
//! that refuses each, in one statement for many messages (`sms_guard_admit_many`, in the
//! guard batches' migration, which also writes the budget events); what each school used
//! of its budget; the schools whose guard settings cannot be read; and the purge of old
//! counts.
//!
//! Every count lives in PostgreSQL and changes under its row's lock, so all replicas
//! share it and none passes a limit. A message is counted once, through its reservations
//! (`sms_guard_reservations`, one per message and counter): a retry finds them and passes.
//! The daemon's admissions wait in the admitter (`admitter.rs`), which gathers them into
//! batches.

use std::time::Duration;

use deadpool_postgres::Client;
use time::Date;
use uuid::Uuid;

use super::{Store, StoreError, prepared};
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

/// A [`GuardCheck`] of its own, to wait in the admitter's queue.
#[derive(Debug, Clone)]
pub(crate) struct CheckRow {
    pub messages: Vec<Uuid>,
    pub recipients: Vec<String>,
    pub school_id: i64,
    pub segments: i32,
    pub login_codes: Option<RateWindow>,
    pub international: Option<u32>,
    pub budget: Option<GuardBudget>,
}

impl CheckRow {
    pub(crate) fn of(check: &GuardCheck<'_>) -> Self {
        CheckRow {
            messages: check.messages.to_vec(),
            recipients: check.recipients.iter().map(|&r| r.to_owned()).collect(),
            school_id: check.school_id,
            segments: int4(check.segments),
            login_codes: check.login_codes,
            international: check.international,
            budget: check.budget,
        }
    }
}

/// A count that fits PostgreSQL's `integer`.
fn int4(n: u32) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

/// The arrays `sms_guard_admit_many` takes: each message with its entry (1-based), and
/// each entry's school and counters.
#[derive(Default)]
struct BatchArrays<'a> {
    message_entries: Vec<i32>,
    message_ids: Vec<Uuid>,
    message_numbers: Vec<&'a str>,
    schools: Vec<i64>,
    segments: Vec<i32>,
    budgets: Vec<Option<i32>>,
    exempt: Vec<bool>,
    login: Vec<bool>,
    abroad: Vec<bool>,
}

impl<'a> BatchArrays<'a> {
    fn of(rows: &'a [CheckRow]) -> Self {
        let mut arrays = BatchArrays::default();
        for (entry, row) in (1..).zip(rows) {
            for (id, number) in row.messages.iter().zip(&row.recipients) {
                arrays.message_entries.push(entry);
                arrays.message_ids.push(*id);
                arrays.message_numbers.push(number);
            }
            arrays.schools.push(row.school_id);
            arrays.segments.push(row.segments);
            arrays.budgets.push(row.budget.map(|b| int4(b.budget)));
            arrays.exempt.push(row.budget.is_some_and(|b| b.exempt));
            arrays.login.push(row.login_codes.is_some());
            arrays.abroad.push(row.international.is_some());
        }
        arrays
    }
}

/// Admits `rows` in one statement, in their order, each as if alone. The rows' messages
/// are distinct, and those that count against the login-code limit or the international
/// limit name the same one (the statement takes each limit once: see the admitter's batches).
///
/// The commit does not wait for the disk (`synchronous_commit` off for it alone): it is
/// short, and the row locks it holds are released sooner. Nothing is given up by that. A
/// message is claimed after it is admitted, and a commit that waits for the disk flushes
/// the write-ahead log up to itself, every commit before it included; so an admission a
/// database crash can take away is one whose message was never claimed, never sent, and
/// then counts nothing, as it should.
pub(super) async fn admit_batch(
    client: &Client,
    rows: &[CheckRow],
) -> Result<Vec<Admission>, StoreError> {
    const ADMIT: &str = "SELECT sms_guard_admit_many($1::int4[], $2::uuid[], $3::text[],
                                                    $4::int8[], $5::int4[], $6::int4[],
                                                    $7::bool[], $8::bool[], $9::bool[],
                                                    $10::int4, $11::float8, $12::int4),
                                set_config('synchronous_commit', 'off', true)";
    let a = BatchArrays::of(rows);
    let login = rows.iter().find_map(|r| r.login_codes);
    let login_limit = login.map(|l| int4(l.count));
    let login_window = login.map(|l| l.window.as_secs_f64());
    let international = rows.iter().find_map(|r| r.international).map(int4);
    let statement = prepared(client, ADMIT).await?;
    let row = client
        .query_one(
            &statement,
            &[
                &a.message_entries,
                &a.message_ids,
                &a.message_numbers,
                &a.schools,
                &a.segments,
                &a.budgets,
                &a.exempt,
                &a.login,
                &a.abroad,
                &login_limit,
                &login_window,
                &international,
            ],
        )
        .await?;
    let refusals: Vec<Option<String>> = row.try_get(0)?;
    if refusals.len() != rows.len() {
        return Err(StoreError::Corrupt(format!(
            "sms_guard_admit_many answered {} of {} admissions",
            refusals.len(),
            rows.len()
        )));
    }
    refusals.into_iter().map(admission).collect()
}

/// An admission as `sms_guard_admit_many` gives it: null, or the refusal's name.
fn admission(refusal: Option<String>) -> Result<Admission, StoreError> {
    match refusal {
        None => Ok(Admission::Admitted),
        Some(reason) => GuardRefusal::parse(&reason)
            .map(Admission::Refused)
            .ok_or_else(|| StoreError::Corrupt(format!("guard refusal '{reason}'"))),
    }
}

impl Store {
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
