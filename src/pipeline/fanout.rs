//! An announcement to many becomes one message per recipient, each with an id derived
//! from the announcement's id and the recipient, so a redelivered announcement (or a
//! number listed twice) never texts anyone twice.
//!
//! A big announcement is fanned out a chunk at a time (`SMSGW_FANOUT_CHUNK`): the first
//! chunk's messages, then the announcement with the recipients still to go, at the back
//! of the bulk lane. Another school's announcement published meanwhile gets its turn
//! after one chunk, not after all of this one. The broker acks the delivery only when both
//! were confirmed; a crash in between fans the same chunk out again, to the same ids.
//!
//! A pass over a large announcement takes about three times its size in memory at its peak
//! (the recipients decoded, the rest encoded again), and each pass decodes what is left
//! again. [`FanoutTurns`] lets only so many large jobs be decoded and fanned out at once
//! (`SMSGW_FANOUT_CONCURRENCY`); the others wait their turn undecoded.

use std::{collections::HashSet, sync::Arc};

use serde_json::Value;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{Abandoned, MessageLog, Pipeline, merged_context};
use crate::{
    broker::Delivery,
    disposition::Disposition,
    job::{BulkRecipient, Job},
    phone::PhoneNumber,
    policy::SuppressReason,
    provider,
    school::SchoolSettings,
    store::NewMessage,
};

/// Rows of an announcement's recipients written per statement when it is accepted.
const QUEUE_PIECE: usize = 5_000;

/// A job body larger than this waits for a fan-out turn before it is decoded. No job to one
/// recipient comes near it (1,600 characters of body, 2 KiB of context), nor does an
/// announcement to a few hundred: only large announcements wait.
pub(super) const LARGE_JOB_BYTES: usize = 64 * 1024;

/// Turns to decode and fan out a large job, shared by every lane of a process. A turn is
/// held from before the job is decoded until its delivery is settled, when the messages of
/// its chunk and the rest of the announcement have been published.
#[derive(Debug, Clone)]
pub struct FanoutTurns {
    turns: Arc<Semaphore>,
    /// A job over `SMSGW_MAX_JOB_BYTES` is refused unread and needs no turn.
    max_job_bytes: usize,
}

impl FanoutTurns {
    pub fn new(at_once: usize, max_job_bytes: usize) -> Self {
        FanoutTurns {
            turns: Arc::new(Semaphore::new(at_once.max(1))),
            max_job_bytes,
        }
    }

    /// Waits for a turn when `delivery` is large enough to need one; `None` otherwise.
    pub async fn take(&self, delivery: &Delivery) -> Option<OwnedSemaphorePermit> {
        let size = delivery.body.len();
        if size <= LARGE_JOB_BYTES || size > self.max_job_bytes {
            return None;
        }
        // The semaphore is never closed, so acquiring fails never.
        self.turns.clone().acquire_owned().await.ok()
    }
}

impl<L: MessageLog> Pipeline<L> {
    /// Queues every recipient's row (on the first pass), then hands the broker this
    /// chunk's messages and the rest of the announcement.
    pub(super) async fn fan_out(
        &self,
        delivery: &Delivery,
        job: &Job,
        recipients: &[BulkRecipient],
        abandon: &CancellationToken,
    ) -> Result<Disposition, Abandoned> {
        let settings = self.school_settings(job.school_id, abandon).await?;
        if !delivery.fanout_queued {
            let first_seen = delivery.first_seen;
            let admitted = self
                .admit_announcement(job, recipients, settings.as_deref(), first_seen, abandon)
                .await?;
            if !admitted {
                return self
                    .refuse_announcement(job, recipients, settings.as_deref(), abandon)
                    .await;
            }
            self.write_recipients(job, recipients, settings.as_deref(), None, abandon)
                .await?;
        }
        let country = settings.as_ref().and_then(|s| s.country.as_deref());
        let chunk = recipients.len().min(self.settings.fanout_chunk);
        let mut seen = HashSet::with_capacity(chunk);
        let messages = recipients[..chunk]
            .iter()
            .filter_map(|recipient| {
                let to = recipient_number(recipient, country);
                let id = Uuid::new_v5(&job.id, to.as_bytes());
                let message = job.for_recipient(id, to, recipient.reference.clone());
                seen.insert(id).then(|| (id, message.encode()))
            })
            .collect();
        let rest = (chunk < recipients.len()).then(|| job.without_first_recipients(chunk).encode());
        Ok(Disposition::FanOut {
            announcement: job.id,
            kind: job.kind,
            messages,
            rest,
        })
    }

    /// An announcement its school's budget has no room for, whole: every recipient is
    /// recorded `suppressed` / `budget_exhausted`, and none is sent.
    async fn refuse_announcement(
        &self,
        job: &Job,
        recipients: &[BulkRecipient],
        settings: Option<&SchoolSettings>,
        abandon: &CancellationToken,
    ) -> Result<Disposition, Abandoned> {
        let verdict = super::outcome::suppressed(SuppressReason::BudgetExhausted);
        let written = self
            .write_recipients(job, recipients, settings, Some(verdict.reason), abandon)
            .await?;
        let label = self.provider_label(&provider::route(settings, &self.gateways));
        for _ in 0..written {
            self.count(verdict.status.as_str(), job.kind, label);
            self.metrics.count_suppressed(verdict.reason);
        }
        tracing::warn!(
            recipients = written,
            "announcement refused whole: the school's monthly budget has no room for it"
        );
        Ok(verdict.disposition)
    }

    /// Writes a row for every recipient of an announcement, [`QUEUE_PIECE`] rows a
    /// statement, before the first chunk is fanned out: `queued`, or `suppressed` with
    /// `refused` when the whole announcement is refused. The whole announcement is in the
    /// log (for support, and for `smsgw status`) as soon as it is accepted, while the
    /// sending goes on a chunk at a time. Each row has the id, recipient, context and
    /// provider its own message will have; writing them again changes nothing. Returns
    /// how many rows it wrote (each recipient once).
    async fn write_recipients(
        &self,
        job: &Job,
        recipients: &[BulkRecipient],
        settings: Option<&SchoolSettings>,
        refused: Option<&str>,
        abandon: &CancellationToken,
    ) -> Result<usize, Abandoned> {
        let country = settings.and_then(|s| s.country.as_deref());
        let provider = self.provider_label(&provider::route(settings, &self.gateways));
        let segmentation = crate::segments::segment(&job.body);
        let segments = i32::try_from(segmentation.segments).ok();
        let mut seen = HashSet::with_capacity(recipients.len());
        for piece in recipients.chunks(QUEUE_PIECE) {
            let rows: Vec<(Uuid, String, Option<Value>)> = piece
                .iter()
                .filter_map(|recipient| {
                    let to = recipient_number(recipient, country);
                    let id = Uuid::new_v5(&job.id, to.as_bytes());
                    let context =
                        merged_context(job.context.as_ref(), recipient.reference.as_deref());
                    seen.insert(id).then_some((id, to, context))
                })
                .collect();
            let messages: Vec<NewMessage<'_>> = rows
                .iter()
                .map(|(id, to, context)| NewMessage {
                    id: *id,
                    bulk_id: Some(job.id),
                    school_id: job.school_id,
                    kind: job.kind,
                    recipient: to,
                    body: &job.body,
                    context: context.as_ref(),
                    provider,
                    segments,
                    encoding: Some(segmentation.encoding),
                    reopen_failed: false,
                })
                .collect();
            match refused {
                None => {
                    self.persist(abandon, || self.log.queue_messages(&messages))
                        .await?
                }
                Some(reason) => {
                    self.persist(abandon, || self.log.suppress_messages(&messages, reason))
                        .await?
                }
            }
        }
        Ok(seen.len())
    }
}

/// A bulk recipient's number as its message has it: E.164, or as given (trimmed) when it
/// cannot be read (its own message then fails with the reason).
fn recipient_number(recipient: &BulkRecipient, country: Option<&str>) -> String {
    PhoneNumber::parse(&recipient.to, country)
        .map(|n| n.as_str().to_owned())
        .unwrap_or_else(|_| recipient.to.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::job::Lane;

    fn of_size(bytes: usize) -> Delivery {
        Delivery::fresh(Lane::Bulk, vec![b' '; bytes])
    }

    #[tokio::test]
    async fn only_so_many_large_jobs_are_decoded_at_once() {
        let turns = FanoutTurns::new(1, 1024 * 1024);
        let first = turns.take(&of_size(LARGE_JOB_BYTES + 1)).await;
        assert!(first.is_some());
        let large = of_size(LARGE_JOB_BYTES + 1);
        let second = turns.take(&large);
        let waited = tokio::time::timeout(Duration::from_millis(50), second).await;
        assert!(
            waited.is_err(),
            "the second waits while the first holds its turn"
        );

        // Small jobs, and those refused unread for their size, need no turn.
        assert!(turns.take(&of_size(LARGE_JOB_BYTES)).await.is_none());
        assert!(turns.take(&of_size(1024 * 1024 + 1)).await.is_none());

        drop(first);
        assert!(turns.take(&of_size(LARGE_JOB_BYTES + 1)).await.is_some());
    }
}
