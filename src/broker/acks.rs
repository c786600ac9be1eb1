//! Acks settled in batches, one batcher per lane channel.
//!
//! RabbitMQ takes one `basic.ack` with `multiple` for every delivery up to a tag about
//! seven times as fast as one ack per delivery (see `make bench`). Deliveries finish out
//! of order, so the batcher keeps every tag of its channel from delivery to settlement
//! and acks, with one `multiple`, the longest run of finished tags from the oldest one
//! still open. A finished delivery behind one still in flight waits for it at most
//! [`STRAGGLER_WAIT`], then is acked on its own: a slow message never holds the others'
//! prefetch slots for long.
//!
//! A multiple ack settles every unsettled delivery up to its tag, so a tag the pipeline
//! left unsettled on purpose (a delivery given back to the broker at shutdown, say) stays
//! held here for the channel's life: no multiple ack ever reaches past it.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use lapin::{Acker, options::BasicAckOptions};
use tokio::sync::{mpsc, oneshot};

/// How long a finished delivery may wait for an older one to finish too. Measured with
/// `make bench` (40,000 jobs, 0 ms provider): at 5 ms a quarter of the deliveries were
/// acked alone, 12,600 to 15,000 ack frames in all and RabbitMQ's CPU 0.77 to 1.07 s per
/// 10k jobs; at 25 ms 4,000 frames and 0.47 to 0.50 s; 50 and 100 ms saved no more CPU.
const STRAGGLER_WAIT: Duration = Duration::from_millis(25);
/// How long the batcher gathers finished deliveries before it acks.
const GATHER: Duration = Duration::from_micros(500);
/// Longest wait for the broker to take an ack.
const ACK_TIMEOUT: Duration = Duration::from_secs(30);

pub(crate) enum AckOp {
    /// A delivery was taken from the channel.
    Delivered(u64),
    /// Ack it; the answer says whether the ack reached a live channel.
    Ack(u64, Acker, oneshot::Sender<bool>),
    /// Settled some other way (nacked or rejected): forget it.
    Settled(u64),
    /// Left unsettled on purpose: never ack past it.
    Held(u64),
}

enum Entry {
    Open,
    Held,
    Finished {
        acker: Acker,
        reply: oneshot::Sender<bool>,
        at: Instant,
    },
}

/// The sending side, kept by the consumer and by each delivery.
#[derive(Clone, Debug)]
pub(crate) struct AckBatcher {
    tx: mpsc::UnboundedSender<AckOp>,
}

impl AckBatcher {
    /// Starts the batcher task of one channel; it ends when every sender is gone.
    pub(crate) fn start() -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(rx));
        AckBatcher { tx }
    }

    pub(crate) fn send(&self, op: AckOp) -> bool {
        self.tx.send(op).is_ok()
    }
}

async fn run(mut rx: mpsc::UnboundedReceiver<AckOp>) {
    let mut open: BTreeMap<u64, Entry> = BTreeMap::new();
    loop {
        let deadline = straggler_deadline(&open);
        let op = match deadline {
            Some(at) => match tokio::time::timeout_at(at.into(), rx.recv()).await {
                Ok(op) => op,
                Err(_) => {
                    flush(&mut open, Instant::now()).await;
                    continue;
                }
            },
            None => rx.recv().await,
        };
        let Some(op) = op else {
            // Every sender is gone: ack what finished, one by one.
            flush(&mut open, Instant::now() + STRAGGLER_WAIT * 1_000).await;
            return;
        };
        let mut finished = apply(&mut open, op);
        // Gather what else finished meanwhile before acking.
        if finished {
            let until = tokio::time::Instant::now() + GATHER;
            while let Ok(Some(op)) = tokio::time::timeout_at(until, rx.recv()).await {
                finished |= apply(&mut open, op);
            }
        }
        while let Ok(op) = rx.try_recv() {
            finished |= apply(&mut open, op);
        }
        if finished {
            flush(&mut open, Instant::now()).await;
        }
    }
}

/// Applies one operation; says whether something can now be acked.
fn apply(open: &mut BTreeMap<u64, Entry>, op: AckOp) -> bool {
    match op {
        AckOp::Delivered(tag) => {
            open.insert(tag, Entry::Open);
            false
        }
        AckOp::Ack(tag, acker, reply) => {
            open.insert(
                tag,
                Entry::Finished {
                    acker,
                    reply,
                    at: Instant::now(),
                },
            );
            true
        }
        AckOp::Settled(tag) => {
            open.remove(&tag);
            true
        }
        AckOp::Held(tag) => {
            open.insert(tag, Entry::Held);
            true
        }
    }
}

/// When the oldest finished delivery stuck behind an open one must be acked alone.
fn straggler_deadline(open: &BTreeMap<u64, Entry>) -> Option<Instant> {
    open.values()
        .filter_map(|entry| match entry {
            Entry::Finished { at, .. } => Some(*at + STRAGGLER_WAIT),
            _ => None,
        })
        .min()
}

/// Acks the finished run from the oldest open tag with one multiple ack, and each
/// finished delivery behind an open one that has waited long enough (as of `now`) alone.
async fn flush(open: &mut BTreeMap<u64, Entry>, now: Instant) {
    // The leading run of finished tags.
    let mut run = Vec::new();
    while let Some(entry) = open.first_entry() {
        if !matches!(entry.get(), Entry::Finished { .. }) {
            break;
        }
        let (tag, entry) = entry.remove_entry();
        run.push((tag, entry));
    }
    if let Some((_, Entry::Finished { acker, .. })) = run.last() {
        let multiple = run.len() > 1;
        let acked = ack(acker, multiple).await;
        for (_, entry) in run {
            if let Entry::Finished { reply, .. } = entry {
                let _ = reply.send(acked);
            }
        }
    }
    // Stragglers: finished, but behind an open or held delivery.
    let due: Vec<u64> = open
        .iter()
        .filter_map(|(tag, entry)| match entry {
            Entry::Finished { at, .. } if *at + STRAGGLER_WAIT <= now => Some(*tag),
            _ => None,
        })
        .collect();
    for tag in due {
        if let Some(Entry::Finished { acker, reply, .. }) = open.remove(&tag) {
            let _ = reply.send(ack(&acker, false).await);
        }
    }
}

async fn ack(acker: &Acker, multiple: bool) -> bool {
    matches!(
        tokio::time::timeout(ACK_TIMEOUT, acker.ack(BasicAckOptions { multiple })).await,
        Ok(Ok(true))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_leading_run_of_finished_tags_is_acked_together() {
        let mut open = BTreeMap::new();
        for tag in 1..=4 {
            apply(&mut open, AckOp::Delivered(tag));
        }
        apply(&mut open, AckOp::Held(2));
        assert!(straggler_deadline(&open).is_none());
        // A held tag is never passed by a multiple ack: 1 stays the oldest open one.
        assert!(matches!(open.first_key_value(), Some((1, Entry::Open))));
        apply(&mut open, AckOp::Settled(1));
        assert!(matches!(open.first_key_value(), Some((2, Entry::Held))));
    }
}
