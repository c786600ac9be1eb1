//! The lanes: each takes its deliveries until stopped, and hands every one to a task that
//! runs the pipeline and settles it.

use std::{panic::AssertUnwindSafe, sync::Arc};

use futures_util::FutureExt;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    broker::{Broker, Incoming, LaneConsumer},
    disposition::Disposition,
    metrics::{LaneLabels, Metrics, ReasonLabels},
    pipeline::{FanoutTurns, Pipeline},
};

/// Takes deliveries from one lane until stopped or the channel fails. Returns the consumer
/// (kept open so in-flight deliveries can still be acked) and why it ended, if not stopped.
pub(super) async fn run_lane(
    mut consumer: LaneConsumer,
    handler: Handler,
    tracker: TaskTracker,
    stop: CancellationToken,
) -> (LaneConsumer, Option<String>) {
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => {
                if let Err(e) = consumer.cancel().await {
                    tracing::debug!(error = %e, "cancelling the consumer failed");
                }
                return (consumer, None);
            }
            next = consumer.next() => match next {
                Some(Ok(incoming)) => {
                    tracker.spawn(handler.clone().process(incoming));
                }
                Some(Err(e)) => return (consumer, Some(e.to_string())),
                None => {
                    let lane = consumer.lane.as_str();
                    return (consumer, Some(format!("the {lane} consumer was cancelled by the broker")));
                }
            }
        }
    }
}

/// What each delivery task needs.
#[derive(Clone)]
pub(super) struct Handler {
    pub(super) pipeline: Arc<Pipeline>,
    pub(super) broker: Broker,
    pub(super) metrics: Arc<Metrics>,
    pub(super) abandon: CancellationToken,
    /// Labels the metrics of what belongs to no provider yet.
    pub(super) default_provider: &'static str,
    pub(super) turns: FanoutTurns,
}

impl Handler {
    /// Handles one delivery and settles it. A panic in the pipeline gives the delivery back
    /// with a reject, which counts toward the lane's delivery limit: a message that keeps
    /// failing this way ends in `sms.dead`.
    async fn process(self, incoming: Incoming) {
        let lane = LaneLabels {
            lane: incoming.delivery.lane.as_str(),
        };
        let in_flight = self.metrics.in_flight.get_or_create(&lane).clone();
        in_flight.inc();
        // Held until the delivery is settled; given up (the delivery left unsettled, for
        // the broker to deliver again) when shutdown stops waiting.
        let _turn = tokio::select! {
            turn = self.turns.take(&incoming.delivery) => turn,
            () = self.abandon.cancelled() => {
                in_flight.dec();
                return;
            }
        };
        let handled = AssertUnwindSafe(self.pipeline.handle(&incoming.delivery, &self.abandon))
            .catch_unwind()
            .await;
        let disposition = handled.unwrap_or_else(|_| {
            tracing::error!(
                lane = lane.lane,
                "the pipeline panicked; message given back"
            );
            Disposition::Requeue
        });
        self.count(&lane, &disposition);
        let fanned_out = match &disposition {
            Disposition::FanOut {
                kind,
                messages,
                rest,
                ..
            } => Some((*kind, messages.len(), rest.is_some())),
            _ => None,
        };
        let settled = self
            .broker
            .settle_retrying(&incoming, disposition, &self.abandon)
            .await;
        if let (true, Some((kind, recipients, more))) = (settled, fanned_out) {
            let provider = self.default_provider;
            self.metrics
                .count_message("fanned_out", kind.as_str(), provider);
            tracing::info!(recipients, more_to_come = more, "announcement fanned out");
        }
        in_flight.dec();
    }

    fn count(&self, lane: &LaneLabels, disposition: &Disposition) {
        match disposition {
            Disposition::Retry { .. } => {
                self.metrics.retries.get_or_create(lane).inc();
            }
            Disposition::DeadLetter { reason, .. } => {
                self.metrics
                    .dead_letters
                    .get_or_create(&ReasonLabels {
                        reason: reason.as_str(),
                    })
                    .inc();
            }
            _ => {}
        }
    }
}
