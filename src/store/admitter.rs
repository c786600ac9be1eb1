//! Group commit for the guards: every message that involves a guard's count (a login
//! code, a text abroad, a message of a school with a budget) is admitted before it is
//! claimed. The admitter task gathers the admissions waiting, of every school, into one
//! statement (`sms_guard_admit_many`), so a turn on a school's month or on the day's row
//! admits many messages instead of one, and a hundred messages cost one transaction
//! instead of a hundred; each caller still waits for its own answer, committed.
//!
//! Why batches and not the claim: an admission is decided before the provider's pace and
//! the claim, and a refusal is recorded without a claim, so the two cannot share a
//! statement without the claim taking on every guard's rules. The claims are batched
//! too, by the recorder, on other connections.
//!
//! One batch at a time: every batch of a busy account touches the same rows (its schools'
//! months, the day's), so a second batch would only wait for the first's locks, holding a
//! connection, and the admissions that arrive meanwhile make the next batch bigger. Across
//! replicas, batches lock their rows in one order (see the migration), so two never wait
//! for each other in a circle.
//!
//! The statement is in `guards.rs`; this file only batches and answers.

use std::{
    collections::{HashSet, VecDeque},
    sync::Arc,
    time::Duration,
};

use deadpool_postgres::Pool;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::{
    Store, StoreError,
    connect::{acquire, settle, within},
    guards::{Admission, CheckRow, GuardCheck, admit_batch},
    recorder::answer,
};
use crate::config::RateWindow;

/// Most messages in one statement (an announcement with more goes alone).
const MAX_MESSAGES: usize = 512;
/// How long a small batch waits for company before it is admitted.
const LINGER: Duration = Duration::from_millis(2);
/// Below this many messages, a batch lingers.
const SMALL_BATCH: usize = 32;

/// The checks one statement admits. The statement takes the login-code limit and the
/// international limit once, so the checks that count against one of them name the same
/// (they come from one process's settings: a check with another waits for the next
/// batch). A message is in one check of a batch at most: the statement reads what each
/// message counted before it counts anything, so the second check of a message would
/// find nothing counted, and its reservation would fail the whole batch.
#[derive(Default)]
struct Batch {
    rows: Vec<CheckRow>,
    ids: HashSet<Uuid>,
    messages: usize,
    login_codes: Option<RateWindow>,
    international: Option<u32>,
}

impl Batch {
    /// Whether `row` can join: room, none of its messages in already, the same limits.
    fn fits(&self, row: &CheckRow) -> bool {
        let room = self.rows.is_empty() || self.messages + row.messages.len() <= MAX_MESSAGES;
        room && agree(self.login_codes, row.login_codes)
            && agree(self.international, row.international)
            && row.messages.iter().all(|id| !self.ids.contains(id))
    }

    fn add(&mut self, row: CheckRow) {
        self.ids.extend(row.messages.iter().copied());
        self.messages += row.messages.len();
        self.login_codes = self.login_codes.or(row.login_codes);
        self.international = self.international.or(row.international);
        self.rows.push(row);
    }
}

/// Whether a limit of the batch and one of a check can go in one statement.
fn agree<T: PartialEq>(batch: Option<T>, check: Option<T>) -> bool {
    batch.is_none() || check.is_none() || batch == check
}

/// `rows` in batches that keep their order: each batch is the longest run that fits.
pub(super) fn in_order(rows: Vec<CheckRow>) -> Vec<Vec<CheckRow>> {
    let mut batches = Vec::new();
    let mut batch = Batch::default();
    for row in rows {
        if !batch.fits(&row) {
            batches.push(std::mem::take(&mut batch).rows);
        }
        batch.add(row);
    }
    if !batch.rows.is_empty() {
        batches.push(batch.rows);
    }
    batches
}

impl Store {
    /// Admits the messages past the guards they involve, counting them once, or says
    /// which guard refuses them (and counts nothing).
    ///
    /// With the admitter (the daemon's store), the check waits to go with the others
    /// waiting, in one statement (see `admitter.rs`); without it, it goes alone.
    pub async fn admit(&self, check: &GuardCheck<'_>) -> Result<Admission, StoreError> {
        if check.messages.is_empty() {
            return Ok(Admission::Admitted);
        }
        let row = CheckRow::of(check);
        match &self.admitter {
            Some(admitter) => admitter.admit(row).await,
            None => {
                self.admit_in_order(vec![row]).await?.pop().ok_or_else(|| {
                    StoreError::Corrupt("no answer from sms_guard_admit_many".into())
                })
            }
        }
    }

    /// Admits `checks` in their order, each as if alone: in one statement when they can
    /// go together, else in as few as their order allows (a message checked twice, or
    /// another limit of the same counter, starts the next). One answer per check.
    pub async fn admit_all(&self, checks: &[GuardCheck<'_>]) -> Result<Vec<Admission>, StoreError> {
        self.admit_in_order(checks.iter().map(CheckRow::of).collect())
            .await
    }

    async fn admit_in_order(&self, rows: Vec<CheckRow>) -> Result<Vec<Admission>, StoreError> {
        let mut answers = Vec::with_capacity(rows.len());
        for batch in in_order(rows) {
            let admitted = on_connection!(self, |client| admit_batch(&client, &batch).await)?;
            answers.extend(admitted);
        }
        Ok(answers)
    }
}

/// An admission waiting, and where its answer goes.
type Waiting = (CheckRow, oneshot::Sender<Result<Admission, StoreError>>);

/// The handle the store sends admissions through.
#[derive(Debug, Clone)]
pub(crate) struct Admitter {
    tx: mpsc::UnboundedSender<Waiting>,
}

type PoolSource = Arc<dyn Fn() -> Pool + Send + Sync>;

impl Admitter {
    /// Starts the admitter task, admitting through `pool()`, each batch's statement
    /// bounded by `limit`. The task ends once every handle is dropped and the admissions
    /// it holds are answered.
    pub(crate) fn start(pool: impl Fn() -> Pool + Send + Sync + 'static, limit: Duration) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(collect(rx, Arc::new(pool), limit));
        Admitter { tx }
    }

    /// Hands one check to the batches and waits for its answer, committed.
    pub(crate) async fn admit(&self, row: CheckRow) -> Result<Admission, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send((row, reply))
            .map_err(|_| StoreError::Corrupt("the admitter has stopped".into()))?;
        answer
            .await
            .map_err(|_| StoreError::Batch("the admitter dropped an admission".into()))?
    }
}

/// Gathers the waiting admissions into batches, one batch at a time, until the last
/// handle is gone (the channel closes) and nothing is deferred.
async fn collect(mut rx: mpsc::UnboundedReceiver<Waiting>, pool: PoolSource, limit: Duration) {
    let mut later: VecDeque<Waiting> = VecDeque::new();
    loop {
        if later.is_empty() {
            match rx.recv().await {
                Some(waiting) => later.push_back(waiting),
                None => return,
            }
        }
        // While a batch was being admitted, admissions piled up: all of them go now.
        while let Ok(waiting) = rx.try_recv() {
            later.push_back(waiting);
        }
        let messages = later.iter().map(|(row, _)| row.messages.len()).sum();
        if messages < SMALL_BATCH {
            linger(&mut rx, &mut later, messages).await;
        }
        let batch = next_batch(&mut later);
        admit_waiting(&pool(), batch, limit).await;
    }
}

/// Waits up to [`LINGER`] for more admissions, while they are few (`messages` so far).
async fn linger(
    rx: &mut mpsc::UnboundedReceiver<Waiting>,
    later: &mut VecDeque<Waiting>,
    mut messages: usize,
) {
    let deadline = tokio::time::Instant::now() + LINGER;
    while messages < SMALL_BATCH {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(waiting)) => {
                messages += waiting.0.messages.len();
                later.push_back(waiting);
            }
            Ok(None) | Err(_) => break,
        }
    }
}

/// Takes from `waiting` every admission that fits one batch, oldest first; the others
/// stay, in their order, for the next.
fn next_batch(waiting: &mut VecDeque<Waiting>) -> Vec<Waiting> {
    let mut batch = Batch::default();
    let mut replies = Vec::new();
    let mut deferred = VecDeque::new();
    for (row, reply) in waiting.drain(..) {
        if batch.fits(&row) {
            batch.add(row);
            replies.push(reply);
        } else {
            deferred.push_back((row, reply));
        }
    }
    *waiting = deferred;
    batch.rows.into_iter().zip(replies).collect()
}

/// Admits one batch and answers every waiter. A statement the database refused is tried
/// again check by check, so that one bad check cannot hold up the others.
async fn admit_waiting(pool: &Pool, batch: Vec<Waiting>, limit: Duration) {
    answer(batch, |rows| async move {
        let client = acquire(pool).await?;
        let result = within(limit, admit_batch(&client, &rows)).await;
        settle(client, result)
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(messages: usize) -> CheckRow {
        CheckRow {
            messages: (0..messages).map(|_| Uuid::new_v4()).collect(),
            recipients: vec!["+447700900123".to_owned(); messages],
            school_id: 42,
            segments: 1,
            login_codes: None,
            international: None,
            budget: None,
        }
    }

    fn sizes(batches: &[Vec<CheckRow>]) -> Vec<usize> {
        batches.iter().map(Vec::len).collect()
    }

    #[test]
    fn checks_go_together_until_a_message_comes_again() {
        let first = row(1);
        let again = first.clone();
        let batches = in_order(vec![first, row(1), again, row(1)]);
        assert_eq!(sizes(&batches), [2, 2]);
    }

    #[test]
    fn a_check_with_another_limit_of_a_counter_starts_the_next_statement() {
        let hourly = RateWindow {
            count: 5,
            window: Duration::from_secs(3600),
        };
        let daily = RateWindow {
            window: Duration::from_secs(86_400),
            ..hourly
        };
        let code = |limit| CheckRow {
            login_codes: Some(limit),
            ..row(1)
        };
        let abroad = |limit| CheckRow {
            international: Some(limit),
            ..row(1)
        };
        let batches = in_order(vec![code(hourly), row(1), code(hourly), code(daily)]);
        assert_eq!(sizes(&batches), [3, 1]);
        let batches = in_order(vec![abroad(7), code(hourly), abroad(8)]);
        assert_eq!(sizes(&batches), [2, 1]);
    }

    #[test]
    fn an_announcement_bigger_than_a_batch_goes_alone() {
        let batches = in_order(vec![row(1), row(MAX_MESSAGES + 1), row(MAX_MESSAGES - 1)]);
        assert_eq!(sizes(&batches), [1, 1, 1]);
    }

    #[test]
    fn a_waiting_check_that_does_not_fit_stays_for_the_next_batch_in_its_place() {
        let first = row(1);
        let again = first.clone();
        let mut waiting: VecDeque<Waiting> = [first, again, row(1)]
            .into_iter()
            .map(|r| (r, oneshot::channel().0))
            .collect();
        let taken = next_batch(&mut waiting);
        assert_eq!(taken.len(), 2);
        assert_eq!(waiting.len(), 1);
        assert_eq!(next_batch(&mut waiting).len(), 1);
        assert!(waiting.is_empty());
    }
}
