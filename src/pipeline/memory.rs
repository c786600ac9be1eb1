//! An in-memory message log with the store's semantics, for the pipeline's unit tests:
//! the claim that checks opt-outs and takes over or refuses, records that never move a
//! final outcome, the guards' counts (as `sms_guard_admit_many` keeps them, on a clock
//! the tests may set), and a database that can be made to fail for a number of
//! statements.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Mutex, MutexGuard,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use serde_json::Value;
use time::{Date, OffsetDateTime};
use uuid::Uuid;

use super::{MessageLog, ReconcileLog, SideLog};
use crate::{
    job::JobType,
    phone::PhoneNumber,
    policy::guards::{Month, day_of, fits, reached},
    school::SchoolSettings,
    store::{
        Admission, AttemptOutcome, AttemptRecord, Claim, GuardCheck, GuardRefusal, InboxCopy,
        MessageState, NewMessage, RejectedJob, Status, StoreError, UnknownAttempt, Withdrawn,
    },
};

/// One message's row, with its attempts.
#[derive(Debug, Clone)]
pub(super) struct Row {
    pub(super) status: Status,
    pub(super) reason: Option<String>,
    pub(super) recipient: String,
    pub(super) provider: String,
    pub(super) bulk_id: Option<Uuid>,
    pub(super) attempts: i32,
    pub(super) attempt_started: Option<OffsetDateTime>,
    pub(super) claim: Option<Uuid>,
    pub(super) last_outcome_unknown: bool,
    pub(super) provider_message_id: Option<String>,
    /// Each recorded attempt's number and outcome.
    pub(super) recorded: Vec<(i32, Option<AttemptOutcome>)>,
    pub(super) created_at: OffsetDateTime,
    pub(super) school_id: i64,
    pub(super) segments: Option<i32>,
    pub(super) kind: JobType,
    /// The booking a cancellation withdraws it for: a reminder's or confirmation's
    /// `booking_id`, as text.
    pub(super) booking: Option<String>,
}

impl Row {
    fn new(message: &NewMessage<'_>, status: Status, created_at: OffsetDateTime) -> Row {
        Row {
            created_at,
            school_id: message.school_id,
            segments: message.segments,
            kind: message.kind,
            booking: booking_of(message),
            status,
            reason: None,
            recipient: message.recipient.to_owned(),
            provider: message.provider.to_owned(),
            bulk_id: message.bulk_id,
            attempts: 0,
            attempt_started: None,
            claim: None,
            last_outcome_unknown: false,
            provider_message_id: None,
            recorded: Vec::new(),
        }
    }

    fn state(&self) -> MessageState {
        let recorded = self.recorded.iter().any(|(n, _)| *n == self.attempts);
        let open = self.status == Status::Sending && !recorded;
        MessageState {
            status: self.status,
            attempts: self.attempts,
            open_attempt_started: self.attempt_started.filter(|_| open),
            unknown_attempt: self
                .attempt_started
                .filter(|_| open || self.last_outcome_unknown)
                .map(|started_at| UnknownAttempt {
                    attempt: self.attempts,
                    started_at,
                    provider: self.provider.clone(),
                }),
        }
    }

    fn record(&mut self, attempt: i32, outcome: Option<AttemptOutcome>) {
        self.recorded.retain(|(n, _)| *n != attempt);
        self.recorded.push((attempt, outcome));
    }

    fn start_attempt(&mut self, message: &NewMessage<'_>, claim: Uuid) -> i32 {
        self.status = Status::Sending;
        self.attempts += 1;
        self.provider = message.provider.to_owned();
        self.recipient = message.recipient.to_owned();
        self.reason = None;
        self.attempt_started = Some(OffsetDateTime::now_utc());
        self.claim = Some(claim);
        self.last_outcome_unknown = false;
        self.attempts
    }
}

/// A message's booking, as the store's index reads it from the context.
fn booking_of(message: &NewMessage<'_>) -> Option<String> {
    let withdrawable = matches!(
        message.kind,
        JobType::BookingReminder | JobType::BookingConfirmation
    );
    message
        .context
        .and_then(|context| context.get("booking_id"))
        .filter(|_| withdrawable)
        .and_then(booking_text)
}

/// A `booking_id` as text, as PostgreSQL's `->>` gives it: a string or a number only.
fn booking_text(booking: &Value) -> Option<String> {
    match booking {
        Value::String(text) => Some(text.clone()),
        Value::Number(number) => Some(number.to_string()),
        _ => None,
    }
}

/// A `job.rejected` event as the in-memory log keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Rejection {
    pub job_id: Option<Uuid>,
    pub kind: Option<String>,
    pub school_id: Option<i64>,
    pub error: String,
}

/// A school's month of its budget, as `sms_guard_budgets` keeps it.
#[derive(Debug, Default, Clone, Copy)]
struct BudgetMonth {
    used: u64,
    warned: bool,
    exhausted: bool,
}

/// A budget event written: its name, school, month and use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct BudgetEvent {
    pub(super) name: &'static str,
    pub(super) school_id: i64,
    pub(super) month: String,
    pub(super) used: u64,
}

/// The guards' counts, as the `sms_guard_*` tables keep them.
#[derive(Debug, Default)]
struct Counts {
    /// When each number's login codes were admitted.
    recipients: HashMap<String, Vec<OffsetDateTime>>,
    /// Texts abroad, by UTC day.
    days: HashMap<Date, u32>,
    budgets: HashMap<(i64, Month), BudgetMonth>,
    /// (message, guard) counted.
    reservations: HashSet<(Uuid, &'static str)>,
    events: Vec<BudgetEvent>,
}

#[derive(Debug, Default)]
struct Tables {
    /// The database's clock; `None`: the real one.
    now: Option<OffsetDateTime>,
    counts: Counts,
    messages: HashMap<Uuid, Row>,
    /// (school, phone); `None` is every school.
    opt_outs: HashSet<(Option<i64>, String)>,
    settings: HashMap<i64, SchoolSettings>,
    /// The inbox's copies: body and sender, by message.
    inbox: HashMap<Uuid, (String, Option<String>)>,
    /// The `job.rejected` events written.
    rejected: Vec<Rejection>,
    /// The bookings cancelled, by school and booking, and when.
    withdrawals: HashMap<(i64, String), OffsetDateTime>,
}

#[derive(Debug, Default)]
pub(super) struct MemoryLog {
    tables: Mutex<Tables>,
    /// Statements still to fail as if the database were down.
    outage: AtomicU32,
    /// Statements run, failed ones included.
    statements: AtomicU32,
}

impl MemoryLog {
    fn tables(&self) -> MutexGuard<'_, Tables> {
        self.tables.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every statement fails, as if the database were down, for the next `statements`.
    pub(super) fn fail_next(&self, statements: u32) {
        self.outage.store(statements, Ordering::SeqCst);
    }

    pub(super) fn statements(&self) -> u32 {
        self.statements.load(Ordering::SeqCst)
    }

    /// The `job.rejected` events written so far.
    pub(super) fn rejected(&self) -> Vec<Rejection> {
        self.tables().rejected.clone()
    }

    /// Sets the database's clock (the guards' windows, days and months run on it).
    pub(super) fn set_now(&self, at: OffsetDateTime) {
        self.tables().now = Some(at);
    }

    /// The budget events written, in order.
    pub(super) fn budget_events(&self) -> Vec<BudgetEvent> {
        self.tables().counts.events.clone()
    }

    /// Segments counted against a school's budget in the month of `at`.
    pub(super) fn budget_used(&self, school_id: i64, at: OffsetDateTime) -> u64 {
        let tables = self.tables();
        let month = Month::of(at);
        tables
            .counts
            .budgets
            .get(&(school_id, month))
            .map_or(0, |b| b.used)
    }

    pub(super) fn set_school(&self, settings: SchoolSettings) {
        self.tables().settings.insert(settings.school_id, settings);
    }

    pub(super) fn opt_out(&self, school_id: Option<i64>, phone: &str) {
        self.tables().opt_outs.insert((school_id, phone.to_owned()));
    }

    pub(super) fn is_opted_out(&self, school_id: i64, phone: &str) -> bool {
        self.tables().opted_out(school_id, phone)
    }

    /// The inbox's copy of a message: its body and sender.
    pub(super) fn inbox_copy(&self, id: Uuid) -> Option<(String, Option<String>)> {
        self.tables().inbox.get(&id).cloned()
    }

    pub(super) fn row(&self, id: Uuid) -> Option<Row> {
        self.tables().messages.get(&id).cloned()
    }

    pub(super) fn rows(&self) -> Vec<(Uuid, Row)> {
        self.tables()
            .messages
            .iter()
            .map(|(id, row)| (*id, row.clone()))
            .collect()
    }

    /// Puts a message in the log as a crash or a lost answer left it.
    pub(super) fn insert(&self, id: Uuid, row: Row) {
        self.tables().messages.insert(id, row);
    }

    /// Fails while an outage lasts; counts every statement.
    fn run<T>(&self, statement: impl FnOnce(&mut Tables) -> T) -> Result<T, StoreError> {
        self.statements.fetch_add(1, Ordering::SeqCst);
        let down = self
            .outage
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if down {
            return Err(StoreError::Timeout(Duration::ZERO));
        }
        Ok(statement(&mut self.tables()))
    }
}

impl Tables {
    fn clock(&self) -> OffsetDateTime {
        self.now.unwrap_or_else(OffsetDateTime::now_utc)
    }

    fn opted_out(&self, school_id: i64, phone: &str) -> bool {
        self.opt_outs.contains(&(None, phone.to_owned()))
            || self.opt_outs.contains(&(Some(school_id), phone.to_owned()))
    }

    fn reserved(&self, id: Uuid, guard: &'static str) -> bool {
        self.counts.reservations.contains(&(id, guard))
    }
}

/// `sms_guard_admit_many` for one check, rule for rule: every counter checked before any
/// is counted, each message counted once per counter, messages with an outcome and
/// recipients who opted out neither counted nor sent to.
fn admit(t: &mut Tables, check: &GuardCheck<'_>) -> Admission {
    let now = t.clock();
    let open: Vec<(&Uuid, &&str)> = check
        .messages
        .iter()
        .zip(check.recipients)
        .filter(|(id, _)| {
            t.messages
                .get(id)
                .is_none_or(|row| !row.status.is_final() || row.status == Status::Failed)
        })
        .collect();
    if open.is_empty() {
        return Admission::Admitted;
    }
    let wanted: Vec<Uuid> = open
        .into_iter()
        .filter(|(_, to)| !t.opted_out(check.school_id, to))
        .map(|(id, _)| *id)
        .collect();
    let Some(first) = wanted.first().copied() else {
        return Admission::Refused(GuardRefusal::OptedOut);
    };
    let recent = match login_room(t, check, first, now) {
        Ok(recent) => recent,
        Err(refusal) => return Admission::Refused(refusal),
    };
    let abroad = check
        .international
        .filter(|_| !t.reserved(first, "international"));
    let today = day_of(now);
    if abroad.is_some_and(|limit| t.counts.days.get(&today).copied().unwrap_or(0) >= limit) {
        return Admission::Refused(GuardRefusal::InternationalLimit);
    }
    let (month, adding) = match budget_room(t, check, &wanted, now) {
        Ok(room) => room,
        Err(refusal) => return Admission::Refused(refusal),
    };
    if let Some(mut times) = recent {
        times.push(now);
        let number = check.recipients[0].to_owned();
        t.counts.recipients.insert(number, times);
        t.counts.reservations.insert((first, "recipient"));
    }
    if abroad.is_some() {
        *t.counts.days.entry(today).or_default() += 1;
        t.counts.reservations.insert((first, "international"));
    }
    if let Some(budget) = check.budget.filter(|_| adding > 0) {
        for id in &wanted {
            t.counts.reservations.insert((*id, "budget"));
        }
        count_budget(t, check.school_id, month, budget.budget, adding);
    }
    Admission::Admitted
}

/// A login code's number: the times of its codes still in the window, to add this one
/// to (`None`: not a login code, or counted before); `Err` when one more is too many.
fn login_room(
    t: &Tables,
    check: &GuardCheck<'_>,
    first: Uuid,
    now: OffsetDateTime,
) -> Result<Option<Vec<OffsetDateTime>>, GuardRefusal> {
    let Some(limit) = check
        .login_codes
        .filter(|_| !t.reserved(first, "recipient"))
    else {
        return Ok(None);
    };
    let since = now - limit.window;
    let times: Vec<OffsetDateTime> = t
        .counts
        .recipients
        .get(check.recipients[0])
        .map(|times| times.iter().copied().filter(|at| *at > since).collect())
        .unwrap_or_default();
    if times.len() >= limit.count as usize {
        return Err(GuardRefusal::RecipientLimit);
    }
    Ok(Some(times))
}

/// `sms_guard_budget_room`: the month the messages count in and the segments they add
/// (0 without a budget, or when counted before); `Err` when they do not fit, having
/// written `budget.exhausted` the first time.
fn budget_room(
    t: &mut Tables,
    check: &GuardCheck<'_>,
    wanted: &[Uuid],
    now: OffsetDateTime,
) -> Result<(Month, u64), GuardRefusal> {
    let created = wanted
        .iter()
        .filter_map(|id| t.messages.get(id).map(|row| row.created_at))
        .min();
    let month = Month::of(created.unwrap_or(now));
    let Some(budget) = check.budget else {
        return Ok((month, 0));
    };
    let fresh = wanted
        .iter()
        .filter(|id| !t.reserved(**id, "budget"))
        .count() as u64;
    let adding = fresh * u64::from(check.segments);
    if !t.counts.budgets.contains_key(&(check.school_id, month)) {
        let used = billable(t, check.school_id, month);
        let first = BudgetMonth {
            used,
            ..BudgetMonth::default()
        };
        t.counts.budgets.insert((check.school_id, month), first);
    }
    let counted = t
        .counts
        .budgets
        .entry((check.school_id, month))
        .or_default();
    if adding == 0 || budget.exempt || fits(budget.budget, counted.used, adding) {
        return Ok((month, adding));
    }
    if !counted.exhausted {
        counted.exhausted = true;
        let used = counted.used;
        budget_event(t, "budget.exhausted", check.school_id, month, used);
    }
    Err(GuardRefusal::BudgetExhausted)
}

/// A school's billable segments of a month, as `smsgw usage` counts them: what its first
/// admission of the month starts from.
fn billable(t: &Tables, school_id: i64, month: Month) -> u64 {
    t.messages
        .values()
        .filter(|row| row.school_id == school_id && Month::of(row.created_at) == month)
        .filter(|row| {
            matches!(
                row.status,
                Status::Sent | Status::Delivered | Status::Undelivered
            )
        })
        .map(|row| u64::try_from(row.segments.unwrap_or(0)).unwrap_or(0))
        .sum()
}

/// `sms_guard_budget_used`: counts `adding` more and writes the events the use reaches
/// for the first time that month.
fn count_budget(t: &mut Tables, school_id: i64, month: Month, budget: u32, adding: u64) {
    let counted = t.counts.budgets.entry((school_id, month)).or_default();
    counted.used += adding;
    let now = reached(budget, counted.used);
    let warn = now.warning && !counted.warned;
    let exhaust = now.exhausted && !counted.exhausted;
    counted.warned |= warn;
    counted.exhausted |= exhaust;
    let used = counted.used;
    if warn {
        budget_event(t, "budget.warning", school_id, month, used);
    }
    if exhaust {
        budget_event(t, "budget.exhausted", school_id, month, used);
    }
}

fn budget_event(t: &mut Tables, name: &'static str, school_id: i64, month: Month, used: u64) {
    t.counts.events.push(BudgetEvent {
        name,
        school_id,
        month: month.to_string(),
        used,
    });
}

fn claim(
    tables: &mut Tables,
    message: &NewMessage<'_>,
    take_over: Option<i32>,
    reconciled: bool,
    claim: Uuid,
) -> Claim {
    if tables.opted_out(message.school_id, message.recipient) {
        return Claim::OptedOut;
    }
    let Some(row) = tables.messages.get_mut(&message.id) else {
        let mut row = Row::new(message, Status::Queued, tables.clock());
        let attempt = row.start_attempt(message, claim);
        tables.messages.insert(message.id, row);
        return Claim::Started { attempt };
    };
    let waiting = matches!(row.status, Status::Queued | Status::Retrying)
        && (reconciled || !row.last_outcome_unknown);
    let cut_off = row.status == Status::Sending && Some(row.attempts) == take_over;
    let reopened = message.reopen_failed && row.status == Status::Failed;
    if cut_off && !row.recorded.iter().any(|(n, _)| *n == row.attempts) {
        let attempt = row.attempts;
        // Cut off by a crash: recorded without an outcome.
        row.record(attempt, None);
    }
    if waiting || cut_off || reopened {
        return Claim::Started {
            attempt: row.start_attempt(message, claim),
        };
    }
    if row.claim == Some(claim) {
        return Claim::Started {
            attempt: row.attempts,
        };
    }
    Claim::Busy(row.state())
}

impl ReconcileLog for MemoryLog {
    async fn fail_unknown(&self, id: Uuid) -> Result<(), StoreError> {
        self.run(|t| {
            if let Some(row) = t.messages.get_mut(&id).filter(|r| !r.status.is_final()) {
                row.status = Status::Failed;
                row.reason = Some("outcome_unknown".into());
            }
        })
    }

    async fn adopt_attempt(
        &self,
        id: Uuid,
        attempt: i32,
        provider_message_id: &str,
    ) -> Result<(), StoreError> {
        self.run(|t| {
            let Some(row) = t.messages.get_mut(&id) else {
                return;
            };
            row.record(attempt, Some(AttemptOutcome::Sent));
            if !row.status.is_final() || row.status == Status::Failed {
                row.status = Status::Sent;
                row.reason = None;
                row.last_outcome_unknown = false;
                row.provider_message_id = Some(provider_message_id.to_owned());
            }
        })
    }

    async fn provider_message_taken(
        &self,
        provider_message_id: &str,
        id: Uuid,
    ) -> Result<bool, StoreError> {
        self.run(|t| {
            t.messages.iter().any(|(other, row)| {
                *other != id && row.provider_message_id.as_deref() == Some(provider_message_id)
            })
        })
    }
}

impl MessageLog for MemoryLog {
    async fn school_settings(&self, school_id: i64) -> Result<Option<SchoolSettings>, StoreError> {
        self.run(|t| t.settings.get(&school_id).cloned())
    }

    async fn message_state(&self, id: Uuid) -> Result<Option<MessageState>, StoreError> {
        self.run(|t| t.messages.get(&id).map(Row::state))
    }

    async fn queue_messages(&self, messages: &[NewMessage<'_>]) -> Result<(), StoreError> {
        self.run(|t| {
            for message in messages {
                let now = t.clock();
                t.messages
                    .entry(message.id)
                    .or_insert_with(|| Row::new(message, Status::Queued, now));
            }
        })
    }

    async fn suppress_messages(
        &self,
        messages: &[NewMessage<'_>],
        reason: &str,
    ) -> Result<(), StoreError> {
        self.run(|t| {
            let now = t.clock();
            for message in messages {
                t.messages.entry(message.id).or_insert_with(|| Row {
                    reason: Some(reason.to_owned()),
                    ..Row::new(message, Status::Suppressed, now)
                });
            }
        })
    }

    async fn admit(&self, check: &GuardCheck<'_>) -> Result<Admission, StoreError> {
        self.run(|t| admit(t, check))
    }

    async fn record_without_call(
        &self,
        message: &NewMessage<'_>,
        status: Status,
        reason: Option<&str>,
    ) -> Result<Option<MessageState>, StoreError> {
        self.run(|t| {
            let now = t.clock();
            let row = t
                .messages
                .entry(message.id)
                .or_insert_with(|| Row::new(message, Status::Queued, now));
            let open = matches!(row.status, Status::Queued | Status::Retrying)
                || (message.reopen_failed && row.status == Status::Failed);
            if !open {
                return Some(row.state());
            }
            row.status = status;
            row.reason = reason.map(str::to_owned);
            None
        })
    }

    async fn begin_attempt(
        &self,
        message: &NewMessage<'_>,
        take_over: Option<i32>,
        reconciled: bool,
        claim_id: Uuid,
    ) -> Result<Claim, StoreError> {
        self.run(|t| claim(t, message, take_over, reconciled, claim_id))
    }

    async fn finish_attempt(
        &self,
        id: Uuid,
        attempt: i32,
        record: &AttemptRecord<'_>,
    ) -> Result<(), StoreError> {
        self.run(|t| {
            let Some(row) = t.messages.get_mut(&id) else {
                return;
            };
            row.record(attempt, Some(record.outcome));
            if row.status == Status::Sending && row.attempts == attempt {
                row.status = record.status;
                row.reason = record.reason.map(str::to_owned);
                row.last_outcome_unknown = record.outcome_unknown;
                if let Some(sid) = record.provider_message_id {
                    row.provider_message_id = Some(sid.to_owned());
                }
            }
        })
    }

    async fn withdraw_booking(
        &self,
        school_id: i64,
        booking_id: &Value,
    ) -> Result<Vec<Withdrawn>, StoreError> {
        self.run(|t| {
            let Some(booking) = booking_text(booking_id) else {
                return Vec::new();
            };
            let now = t.clock();
            t.withdrawals.insert((school_id, booking.clone()), now);
            t.messages
                .values_mut()
                .filter(|row| row.school_id == school_id && row.booking == Some(booking.clone()))
                .filter(|row| matches!(row.status, Status::Queued | Status::Retrying))
                .map(|row| {
                    row.status = Status::Cancelled;
                    row.reason = Some("booking_cancelled".into());
                    Withdrawn {
                        kind: row.kind,
                        provider: Some(row.provider.clone()),
                    }
                })
                .collect()
        })
    }

    async fn booking_withdrawn(
        &self,
        school_id: i64,
        booking_id: &Value,
        window: Duration,
    ) -> Result<bool, StoreError> {
        self.run(|t| {
            let since = t.clock() - window;
            booking_text(booking_id)
                .and_then(|booking| t.withdrawals.get(&(school_id, booking)))
                .is_some_and(|at| *at > since)
        })
    }
}

impl SideLog for MemoryLog {
    async fn add_opt_out(
        &self,
        school_id: Option<i64>,
        phone: &PhoneNumber,
        _source: &str,
    ) -> Result<(), StoreError> {
        self.run(|t| {
            t.opt_outs.insert((school_id, phone.as_str().to_owned()));
        })
    }

    async fn keep_in_inbox(&self, copy: &InboxCopy<'_>) -> Result<(), StoreError> {
        self.run(|t| {
            let kept = (copy.body.to_owned(), copy.sender.map(str::to_owned));
            t.inbox.insert(copy.message_id, kept);
        })
    }

    async fn reject_job(&self, rejected: &RejectedJob<'_>) -> Result<(), StoreError> {
        self.run(|t| {
            t.rejected.push(Rejection {
                job_id: rejected.job_id,
                kind: rejected.kind.map(str::to_owned),
                school_id: rejected.school_id,
                error: rejected.error.to_owned(),
            });
        })
    }
}
