//! An in-memory message log with the store's semantics, for the pipeline's unit tests:
//! the claim that checks opt-outs and takes over or refuses, records that never move a
//! final outcome, and a database that can be made to fail for a number of statements.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Mutex, MutexGuard,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use time::OffsetDateTime;
use uuid::Uuid;

use super::{MessageLog, ReconcileLog};
use crate::{
    phone::PhoneNumber,
    school::SchoolSettings,
    store::{
        AttemptOutcome, AttemptRecord, Claim, InboxCopy, MessageState, NewMessage, RejectedJob,
        Status, StoreError, UnknownAttempt,
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
}

impl Row {
    fn new(message: &NewMessage<'_>, status: Status) -> Row {
        Row {
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

/// A `job.rejected` event as the in-memory log keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Rejection {
    pub job_id: Option<Uuid>,
    pub kind: Option<String>,
    pub school_id: Option<i64>,
    pub error: String,
}

#[derive(Debug, Default)]
struct Tables {
    messages: HashMap<Uuid, Row>,
    /// (school, phone); `None` is every school.
    opt_outs: HashSet<(Option<i64>, String)>,
    settings: HashMap<i64, SchoolSettings>,
    /// The inbox's copies: body and sender, by message.
    inbox: HashMap<Uuid, (String, Option<String>)>,
    /// The `job.rejected` events written.
    rejected: Vec<Rejection>,
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

    pub(super) fn set_school(&self, settings: SchoolSettings) {
        self.tables().settings.insert(settings.school_id, settings);
    }

    pub(super) fn opt_out(&self, school_id: Option<i64>, phone: &str) {
        self.tables().opt_outs.insert((school_id, phone.to_owned()));
    }

    pub(super) fn is_opted_out(&self, school_id: i64, phone: &str) -> bool {
        let tables = self.tables();
        tables.opt_outs.contains(&(None, phone.to_owned()))
            || tables
                .opt_outs
                .contains(&(Some(school_id), phone.to_owned()))
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

fn claim(
    tables: &mut Tables,
    message: &NewMessage<'_>,
    take_over: Option<i32>,
    reconciled: bool,
    claim: Uuid,
) -> Claim {
    let opted_out = tables
        .opt_outs
        .contains(&(None, message.recipient.to_owned()))
        || tables
            .opt_outs
            .contains(&(Some(message.school_id), message.recipient.to_owned()));
    if opted_out {
        return Claim::OptedOut;
    }
    let Some(row) = tables.messages.get_mut(&message.id) else {
        let mut row = Row::new(message, Status::Queued);
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
                t.messages
                    .entry(message.id)
                    .or_insert_with(|| Row::new(message, Status::Queued));
            }
        })
    }

    async fn record_without_call(
        &self,
        message: &NewMessage<'_>,
        status: Status,
        reason: Option<&str>,
    ) -> Result<Option<MessageState>, StoreError> {
        self.run(|t| {
            let row = t
                .messages
                .entry(message.id)
                .or_insert_with(|| Row::new(message, Status::Queued));
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
