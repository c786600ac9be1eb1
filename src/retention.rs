//! Retention: removes what smsgw keeps once it is past its age, in small batches with
//! pauses between them, so it never holds up sending.
//!
//! - message bodies after `SMSGW_BODY_RETENTION`, and the development inbox's copies of
//!   them then too (or with their messages, if `SMSGW_LOG_RETENTION` is shorter);
//! - finished messages with their attempts, delivery receipts, the records of applied
//!   webhooks, and the guards' counts (messages' reservations, numbers' login codes,
//!   days, schools' months) after `SMSGW_LOG_RETENTION`;
//! - the records of Vonage's webhooks (their signatures) once a replay of them would be
//!   refused anyway, ten minutes on (`provider::vonage::callbacks::REPLAY_WINDOW`);
//! - the bookings cancelled after `SMSGW_WITHDRAW_WINDOW`, when they withdraw nothing more;
//! - dead letters after `SMSGW_DEAD_RETENTION`, from the head of `sms.dead` (RabbitMQ
//!   cannot delete from the middle of a queue; letters are appended as they die, so the
//!   head is the oldest). That part runs on each broker session.

use std::{future::Future, sync::Arc, time::Duration};

use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::{
    broker::Broker,
    config::RetentionSettings,
    metrics::Metrics,
    provider::vonage::callbacks::REPLAY_WINDOW,
    retry::pause,
    store::{Store, StoreError},
};

/// Rows per statement: small enough that each is a short transaction.
const BATCH: i64 = 500;
/// Pause between two batches of one pass.
const BREATHER: Duration = Duration::from_millis(50);
/// Dead letters one pass reads at most: a pass holds them while it looks.
const DEAD_BATCH: u32 = 500;

/// Runs a pass over the database at start and then every `interval`, until `stop` fires.
/// Cancelled bookings are forgotten `withdraw_window` on, when they withdraw nothing more.
pub async fn run(
    store: Store,
    settings: RetentionSettings,
    withdraw_window: Duration,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    loop {
        if let Err(e) = pass(&store, &settings, withdraw_window, &metrics, &stop).await {
            tracing::warn!(error = %e, "retention pass failed; trying again next time");
        }
        if pause(settings.interval, &stop).await {
            return;
        }
    }
}

async fn pass(
    store: &Store,
    settings: &RetentionSettings,
    withdraw_window: Duration,
    metrics: &Metrics,
    stop: &CancellationToken,
) -> Result<(), StoreError> {
    let purged = in_batches(
        stop,
        || store.purge_bodies(settings.body_retention, BATCH),
        |n| {
            metrics.bodies_purged.inc_by(n);
        },
    )
    .await?;
    let deleted = in_batches(
        stop,
        || store.delete_messages(settings.log_retention, BATCH),
        |n| {
            metrics.messages_deleted.inc_by(n);
        },
    )
    .await?;
    let forgotten = forget_webhooks(store, settings, stop).await?;
    let receipts = in_batches(
        stop,
        || store.purge_receipts(settings.log_retention, BATCH),
        |_| {},
    )
    .await?;
    let inbox_age = settings.body_retention.min(settings.log_retention);
    let inbox = in_batches(stop, || store.purge_inbox(inbox_age, BATCH), |_| {}).await?;
    let (reply_bodies, replies) = purge_replies(store, settings, stop).await?;
    let guards = in_batches(
        stop,
        || store.purge_guards(settings.log_retention, BATCH),
        |_| {},
    )
    .await?;
    let withdrawals = in_batches(
        stop,
        || store.forget_withdrawals(withdraw_window, BATCH),
        |_| {},
    )
    .await?;
    let any = [
        withdrawals,
        purged,
        deleted,
        forgotten,
        receipts,
        inbox,
        reply_bodies,
        replies,
        guards,
    ];
    if any.iter().any(|n| *n > 0) {
        tracing::info!(
            bodies_purged = purged,
            messages_deleted = deleted,
            webhook_ids_deleted = forgotten,
            receipts_deleted = receipts,
            inbox_copies_deleted = inbox,
            reply_bodies_purged = reply_bodies,
            replies_deleted = replies,
            guard_counts_deleted = guards,
            withdrawals_deleted = withdrawals,
            "retention pass"
        );
    }
    Ok(())
}

/// Webhooks' records: Vonage's once their signatures' window closed, the rest (Twilio's
/// inbound ids, whose signatures carry no time) with the log.
async fn forget_webhooks(
    store: &Store,
    settings: &RetentionSettings,
    stop: &CancellationToken,
) -> Result<u64, StoreError> {
    let window = REPLAY_WINDOW.min(settings.log_retention);
    let signed = in_batches(
        stop,
        || store.forget_webhooks(Some("vonage"), window, BATCH),
        |_| {},
    )
    .await?;
    let rest = in_batches(
        stop,
        || store.forget_webhooks(None, settings.log_retention, BATCH),
        |_| {},
    )
    .await?;
    Ok(signed + rest)
}

/// Reply bodies go with message bodies, whole replies with whole messages.
async fn purge_replies(
    store: &Store,
    settings: &RetentionSettings,
    stop: &CancellationToken,
) -> Result<(u64, u64), StoreError> {
    let bodies = in_batches(
        stop,
        || store.purge_reply_bodies(settings.body_retention, BATCH),
        |_| {},
    )
    .await?;
    let rows = in_batches(
        stop,
        || store.delete_replies(settings.log_retention, BATCH),
        |_| {},
    )
    .await?;
    Ok((bodies, rows))
}

/// Runs `step` (one batch) until a batch comes back short or `stop` fires; `counted`
/// hears each batch's count at once, so a later failure loses none of them.
async fn in_batches<F, Fut>(
    stop: &CancellationToken,
    mut step: F,
    counted: impl Fn(u64),
) -> Result<u64, StoreError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<u64, StoreError>>,
{
    let mut total = 0;
    loop {
        let n = step().await?;
        total += n;
        counted(n);
        if n < BATCH as u64 || pause(BREATHER, stop).await {
            return Ok(total);
        }
    }
}

/// Removes dead letters past `dead_retention` while the broker session lasts: a pass at
/// once, then again when the oldest letter left is due, but at most every `interval`.
/// Looking at the head takes it off the queue for a moment, so it is not looked at more
/// often than needed.
pub async fn prune_dead_letters(
    broker: Broker,
    settings: RetentionSettings,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    loop {
        let wait = match broker
            .remove_old_dead_letters(settings.dead_retention, DEAD_BATCH)
            .await
        {
            Ok(pruned) => {
                metrics
                    .dead_letters_removed
                    .inc_by(u64::from(pruned.removed));
                report_dead(&pruned, settings.dead_retention);
                if pruned.removed == DEAD_BATCH {
                    BREATHER
                } else {
                    until_due(pruned.next_due).max(settings.interval)
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not remove old dead letters; trying again later");
                settings.interval
            }
        };
        if pause(wait, &stop).await {
            return;
        }
    }
}

fn report_dead(pruned: &crate::broker::DeadPruned, age: Duration) {
    if pruned.removed > 0 {
        tracing::info!(
            removed = pruned.removed,
            older_than = %humantime::format_duration(age),
            "retention: dead letters removed from sms.dead"
        );
    }
    if pruned.undated > 0 {
        tracing::warn!(
            undated = pruned.undated,
            "dead letters that say nothing about when they died are kept; purge them by hand"
        );
    }
}

fn until_due(due: Option<OffsetDateTime>) -> Duration {
    due.and_then(|at| Duration::try_from(at - OffsetDateTime::now_utc()).ok())
        .unwrap_or_default()
}
