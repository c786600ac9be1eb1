//! Group commit: every delivery in flight asks for one of three writes (claim an attempt,
//! finish it, or record an outcome without a call). The recorder task gathers what is
//! waiting into one statement per kind, so a thousand messages cost a few statements and
//! commits instead of thousands, while each caller still waits for its own row to be
//! committed before it goes on: nothing is sent before its attempt is durable.
//!
//! The statements themselves are in `log.rs`; this file only batches and answers.

use std::{collections::HashSet, sync::Arc, time::Duration};

use deadpool_postgres::Pool;
use tokio::sync::{Semaphore, mpsc, oneshot};
use uuid::Uuid;

use super::{
    StoreError,
    connect::{acquire, settle, within},
    log::{claim_batch, finish_batch, record_batch},
    vocabulary::{Claim, ClaimRow, FinishRow, MessageState, RecordRow},
};

/// Most rows in one statement.
const MAX_BATCH: usize = 512;
/// Batches written at once (each on its own connection). Few, so that under load the
/// writes waiting for a slot make the next batch bigger.
const CONCURRENT_BATCHES: usize = 2;
/// How long a small batch waits for company before it is written.
const LINGER: Duration = Duration::from_millis(1);
/// Below this many rows, a batch lingers.
const SMALL_BATCH: usize = 32;

/// A write waiting for the recorder, and where its answer goes.
pub(crate) enum Op {
    Claim(ClaimRow, oneshot::Sender<Result<Claim, StoreError>>),
    Finish(FinishRow, oneshot::Sender<Result<(), StoreError>>),
    Record(
        RecordRow,
        oneshot::Sender<Result<Option<MessageState>, StoreError>>,
    ),
}

impl Op {
    /// The message it writes (one write per message per batch).
    fn message(&self) -> Uuid {
        match self {
            Op::Claim(row, _) => row.message.id,
            Op::Finish(row, _) => row.id,
            Op::Record(row, _) => row.message.id,
        }
    }
}

/// The handle the store sends writes through.
#[derive(Debug, Clone)]
pub(crate) struct Recorder {
    tx: mpsc::UnboundedSender<Op>,
}

impl Recorder {
    /// Starts the recorder task writing through `pool()`. The task ends once every
    /// handle is dropped and the writes it holds are written.
    /// `limit` bounds each batch's statements (see `connect::Bounds`).
    pub(crate) fn start(
        pool: impl Fn() -> Pool + Send + Sync + 'static,
        keep_body: bool,
        limit: Duration,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(collect(rx, Arc::new(pool), keep_body, limit));
        Recorder { tx }
    }

    /// Hands one write to the batches and waits until its batch was committed.
    pub(crate) async fn write<T>(
        &self,
        op: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Op,
    ) -> Result<T, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.submit(op(reply))?;
        answer
            .await
            .map_err(|_| StoreError::Batch("the recorder dropped a write".into()))?
    }

    fn submit(&self, op: Op) -> Result<(), StoreError> {
        self.tx
            .send(op)
            .map_err(|_| StoreError::Corrupt("the recorder has stopped".into()))
    }
}

type PoolSource = Arc<dyn Fn() -> Pool + Send + Sync>;

/// Gathers the waiting writes into batches until the last handle is gone (the channel
/// closes) and nothing is deferred.
async fn collect(
    mut rx: mpsc::UnboundedReceiver<Op>,
    pool: PoolSource,
    keep_body: bool,
    limit: Duration,
) {
    let permits = Arc::new(Semaphore::new(CONCURRENT_BATCHES));
    let mut later: Vec<Op> = Vec::new();
    loop {
        // Writes deferred from the last batch go first.
        let mut batch: Vec<Op> = std::mem::take(&mut later);
        if batch.is_empty() {
            match rx.recv().await {
                Some(op) => batch.push(op),
                None => return,
            }
        }
        // While every batch slot is busy, writes pile up and the next batch grows.
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        if batch.len() < SMALL_BATCH {
            let deadline = tokio::time::Instant::now() + LINGER;
            while batch.len() < MAX_BATCH {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(op)) => batch.push(op),
                    Ok(None) | Err(_) => break,
                }
            }
        }
        let mut seen = HashSet::with_capacity(batch.len());
        let (now, deferred): (Vec<Op>, Vec<Op>) =
            batch.into_iter().partition(|op| seen.insert(op.message()));
        later = deferred;
        let pool = pool.clone();
        tokio::spawn(async move {
            write(&pool(), now, keep_body, limit).await;
            drop(permit);
        });
    }
}

/// Writes one batch and answers every waiter. A failed statement is retried row by row,
/// so that one bad row cannot hold up the others.
async fn write(pool: &Pool, ops: Vec<Op>, keep_body: bool, limit: Duration) {
    let mut claims = Vec::new();
    let mut finishes = Vec::new();
    let mut records = Vec::new();
    for op in ops {
        match op {
            Op::Claim(row, reply) => claims.push((row, reply)),
            Op::Finish(row, reply) => finishes.push((row, reply)),
            Op::Record(row, reply) => records.push((row, reply)),
        }
    }
    // The three statements touch different messages (a batch holds one write per
    // message), so they run at once, each on its own connection: a batch takes as long as
    // its slowest statement, not the sum of them.
    tokio::join!(
        answer(claims, |rows| async move {
            let client = acquire(pool).await?;
            let result = within(limit, claim_batch(&client, &rows)).await;
            settle(client, result)
        }),
        answer(finishes, |rows| async move {
            let client = acquire(pool).await?;
            let result = within(limit, finish_batch(&client, &rows, keep_body)).await;
            settle(client, result)?;
            Ok(vec![(); rows.len()])
        }),
        answer(records, |rows| async move {
            let client = acquire(pool).await?;
            let result = within(limit, record_batch(&client, &rows, keep_body)).await;
            settle(client, result)
        }),
    );
}

/// Runs the writes of one kind as one statement and hands each waiter its answer (the
/// admitter's batches too).
pub(super) async fn answer<R, T, F, Fut>(
    writes: Vec<(R, oneshot::Sender<Result<T, StoreError>>)>,
    run: F,
) where
    R: Clone,
    F: Fn(Vec<R>) -> Fut,
    Fut: Future<Output = Result<Vec<T>, StoreError>>,
{
    if writes.is_empty() {
        return;
    }
    let (rows, replies): (Vec<R>, Vec<_>) = writes.into_iter().unzip();
    // `run` bounds its own statements (and closes a connection that ran out of time).
    let all = run(rows.clone()).await;
    match all {
        Ok(answers) => {
            for (reply, answer) in replies.into_iter().zip(answers) {
                let _ = reply.send(Ok(answer));
            }
        }
        Err(e) if rows.len() > 1 && e.server_error().is_some() => {
            // The database refused the statement: find the row it refused.
            for (row, reply) in rows.into_iter().zip(replies) {
                let one = run(vec![row]).await.and_then(|mut answers| {
                    answers
                        .pop()
                        .ok_or_else(|| StoreError::Corrupt("no answer".into()))
                });
                let _ = reply.send(one);
            }
        }
        Err(e) if replies.len() == 1 => {
            // One row: its own error, as the database gave it.
            if let Some(reply) = replies.into_iter().next() {
                let _ = reply.send(Err(e));
            }
        }
        Err(e) => {
            let text = e.to_string();
            let timeout = match e {
                StoreError::Timeout(after) => Some(after),
                _ => None,
            };
            for reply in replies {
                let _ = reply.send(Err(if let Some(after) = timeout {
                    StoreError::Timeout(after)
                } else {
                    StoreError::Batch(text.clone())
                }));
            }
        }
    }
}
