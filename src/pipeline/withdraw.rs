//! Withdrawal (interface section 15): a booking's cancellation withdraws the unsent
//! reminders and confirmations of its booking before it is sent itself, and a reminder
//! or confirmation of a booking cancelled within `SMSGW_WITHDRAW_WINDOW` is withdrawn
//! when it arrives. A job without a `booking_id` costs nothing here; one with a booking,
//! one lookup (or the withdrawal itself).
//!
//! What may be sending right now is never withdrawn: the claim of an attempt and the
//! withdrawal are conditional updates of the same row, and only one of them can win
//! (`store::withdrawals`).

use tokio_util::sync::CancellationToken;

use super::{Abandoned, MessageLog, Pipeline};
use crate::job::{Job, Withdrawal};

impl<L: MessageLog> Pipeline<L> {
    /// Carries out what the job's booking asks of the withdrawals; whether the job itself
    /// is withdrawn (a reminder or confirmation of a booking cancelled).
    pub(super) async fn withdrawn(
        &self,
        job: &Job,
        abandon: &CancellationToken,
    ) -> Result<bool, Abandoned> {
        match job.withdrawal() {
            Withdrawal::None => Ok(false),
            Withdrawal::Withdrawable(booking) => {
                let window = self.settings.withdraw_window;
                self.persist(abandon, || {
                    self.log.booking_withdrawn(job.school_id, booking, window)
                })
                .await
            }
            Withdrawal::Withdraws(booking) => {
                let withdrawn = self
                    .persist(abandon, || {
                        self.log.withdraw_booking(job.school_id, booking)
                    })
                    .await?;
                let default = self.gateways.default_gateway().name;
                for message in &withdrawn {
                    let provider = message
                        .provider
                        .as_deref()
                        .and_then(|name| self.gateways.get(name))
                        .map_or(default, |gateway| gateway.name);
                    self.count("cancelled", message.kind, provider);
                }
                tracing::info!(
                    withdrawn = withdrawn.len(),
                    "booking cancelled: its unsent reminders and confirmations withdrawn"
                );
                Ok(false)
            }
            Withdrawal::Unusable => {
                // The value itself stays out of the log: it could hold anything.
                tracing::warn!(
                    "booking_id is neither a string nor a number: the cancellation is sent \
                     and withdraws nothing"
                );
                Ok(false)
            }
        }
    }
}
