//! Settling a delivery as its [`Disposition`] asks, trying again when the broker refuses
//! or does not answer: the one place a disposition becomes acks, nacks and republishes.

use std::time::Duration;

use backon::BackoffBuilder;
use tokio_util::sync::CancellationToken;

use super::{Broker, BrokerError, Incoming};
use crate::{disposition::Disposition, retry::pause};

/// Tries at a disposition before the delivery is given back instead.
const TRIES: u32 = 5;

/// One delivery's settling, apart from the retries around it.
trait Settling {
    /// Carries out `disposition` once.
    async fn settle(&self, disposition: &Disposition) -> Result<(), BrokerError>;
    /// Whether the delivery's channel is alive and it is not yet settled.
    fn settleable(&self) -> bool;
}

struct OnBroker<'a> {
    broker: &'a Broker,
    incoming: &'a Incoming,
}

impl Settling for OnBroker<'_> {
    async fn settle(&self, disposition: &Disposition) -> Result<(), BrokerError> {
        self.broker.settle(self.incoming, disposition).await
    }

    fn settleable(&self) -> bool {
        self.incoming.settleable()
    }
}

impl Broker {
    /// Settles a delivery, trying a refused or timed-out republish again; says whether it
    /// was settled as `disposition` asked. If it keeps failing the delivery is requeued
    /// rather than acked: nothing is acked before its republish is confirmed. A fan-out
    /// that fails is requeued at once: fanning out again sends nobody anything twice.
    /// `abandon` stops the waiting between tries, leaving the delivery unsettled.
    pub async fn settle_retrying(
        &self,
        incoming: &Incoming,
        disposition: Disposition,
        abandon: &CancellationToken,
    ) -> bool {
        let on = OnBroker {
            broker: self,
            incoming,
        };
        let waits =
            || crate::retry::backoff(Duration::from_millis(100), Duration::from_secs(5)).build();
        settle_retrying(&on, disposition, waits, abandon).await
    }
}

/// `waits` gives the pauses between tries; it is called at the first failure only, as
/// most deliveries settle at once.
async fn settle_retrying<W: Iterator<Item = Duration>>(
    settling: &impl Settling,
    mut disposition: Disposition,
    waits: impl FnOnce() -> W,
    abandon: &CancellationToken,
) -> bool {
    let mut waits = std::iter::once(waits).flat_map(|make| make());
    let mut asked = true;
    for attempt in 1.. {
        let Err(e) = settling.settle(&disposition).await else {
            return asked;
        };
        if !settling.settleable() {
            tracing::debug!(error = %e, "channel gone; the broker will deliver it again");
            return false;
        }
        let fan_out = matches!(disposition, Disposition::FanOut { .. });
        if fan_out {
            tracing::warn!(error = %e, "fan-out failed; the announcement goes back to its lane");
        } else {
            tracing::warn!(error = %e, attempt, "could not settle the delivery; trying again");
        }
        if (fan_out || attempt >= TRIES) && !matches!(disposition, Disposition::Requeue) {
            disposition = Disposition::Requeue;
            asked = false;
        }
        let wait = waits.next().unwrap_or(Duration::from_secs(5));
        if pause(wait, abandon).await {
            return false;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use std::{
        cell::{Cell, RefCell},
        iter,
    };

    use uuid::Uuid;

    use super::*;
    use crate::job::JobType;

    /// A delivery whose first `failures` settlements fail.
    struct Scripted {
        failures: Cell<u32>,
        alive: bool,
        tried: RefCell<Vec<Disposition>>,
    }

    impl Scripted {
        fn failing(failures: u32) -> Self {
            Scripted {
                failures: Cell::new(failures),
                alive: true,
                tried: RefCell::new(Vec::new()),
            }
        }

        fn tried(&self) -> Vec<Disposition> {
            self.tried.borrow().clone()
        }
    }

    impl Settling for Scripted {
        async fn settle(&self, disposition: &Disposition) -> Result<(), BrokerError> {
            self.tried.borrow_mut().push(disposition.clone());
            let left = self.failures.get();
            if left == 0 {
                return Ok(());
            }
            self.failures.set(left - 1);
            Err(BrokerError::Nacked)
        }

        fn settleable(&self) -> bool {
            self.alive
        }
    }

    fn retry() -> Disposition {
        Disposition::Retry {
            delay: Duration::from_secs(10),
            attempts: 1,
            kind: JobType::BookingReminder,
        }
    }

    async fn settle(scripted: &Scripted, disposition: Disposition) -> bool {
        let no_waiting = || iter::repeat(Duration::ZERO);
        settle_retrying(scripted, disposition, no_waiting, &CancellationToken::new()).await
    }

    #[tokio::test]
    async fn a_refused_settlement_is_tried_again_as_asked() {
        let scripted = Scripted::failing(2);
        assert!(settle(&scripted, retry()).await);
        assert_eq!(scripted.tried(), [retry(), retry(), retry()]);
    }

    #[tokio::test]
    async fn a_settlement_that_keeps_failing_gives_the_delivery_back() {
        let scripted = Scripted::failing(7);
        assert!(!settle(&scripted, retry()).await, "not settled as asked");
        let tried = scripted.tried();
        assert_eq!(tried[..5], [retry(), retry(), retry(), retry(), retry()]);
        assert_eq!(tried[5..], vec![Disposition::Requeue; 3]);
    }

    #[tokio::test]
    async fn a_failed_fan_out_goes_back_to_its_lane_at_once() {
        let scripted = Scripted::failing(1);
        let fan_out = Disposition::FanOut {
            announcement: Uuid::nil(),
            kind: JobType::Announcement,
            messages: Vec::new(),
            rest: None,
        };
        assert!(!settle(&scripted, fan_out.clone()).await);
        assert_eq!(scripted.tried(), [fan_out, Disposition::Requeue]);
    }

    #[tokio::test]
    async fn a_delivery_whose_channel_is_gone_is_left_to_the_broker() {
        let scripted = Scripted {
            alive: false,
            ..Scripted::failing(1)
        };
        assert!(!settle(&scripted, Disposition::Ack).await);
        assert_eq!(scripted.tried(), [Disposition::Ack]);
    }

    #[tokio::test]
    async fn abandoning_stops_the_waiting_between_tries() {
        let scripted = Scripted::failing(1);
        let abandon = CancellationToken::new();
        abandon.cancel();
        let long = || iter::repeat(Duration::from_secs(3_600));
        assert!(!settle_retrying(&scripted, Disposition::Ack, long, &abandon).await);
        assert_eq!(scripted.tried(), [Disposition::Ack]);
    }
}
