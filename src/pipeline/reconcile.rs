//! Before sending again after an attempt whose outcome is unknown (a timeout, a lost
//! connection, a crash mid-call), the provider is asked whether it took the message, so
//! that nobody is texted twice.

use super::{Abandoned, MessageLog, Pipeline, UnknownOutcome, attempt::Outgoing, outcome};
use crate::{
    disposition::{DeadReason, Disposition},
    phone::redact_numbers,
    provider::{Accepted, Gateway, Lookup},
    store::UnknownAttempt,
};

impl<L: MessageLog> Pipeline<L> {
    /// Asks `gateway` about `unknown`. `Some` settles the delivery; `None` means send.
    pub(super) async fn reconcile(
        &self,
        out: &Outgoing<'_>,
        unknown: &UnknownAttempt,
        gateway: &Gateway,
    ) -> Result<Option<Disposition>, Abandoned> {
        let (job, delivery) = (out.message.job, out.message.delivery);
        match gateway.provider.lookup(&out.sms, unknown.started_at).await {
            Lookup::Found(candidates) => match self.untaken(out, &candidates).await? {
                Some(sid) => {
                    self.persist(out.message.abandon, || {
                        self.log.adopt_attempt(job.id, unknown.attempt, sid)
                    })
                    .await?;
                    self.count("sent", job.kind, gateway.name);
                    tracing::info!(
                        attempt = unknown.attempt,
                        provider_message_id = %sid,
                        "the provider had taken it: recorded as sent, not sent again"
                    );
                    Ok(Some(Disposition::Ack))
                }
                None => {
                    tracing::info!(
                        attempt = unknown.attempt,
                        "the provider's messages with this text are other messages'; sending again"
                    );
                    Ok(None)
                }
            },
            Lookup::NotFound => {
                tracing::info!(
                    attempt = unknown.attempt,
                    "the provider never took the unanswered attempt; sending again"
                );
                Ok(None)
            }
            Lookup::Failed(error) => {
                tracing::warn!(
                    error = %redact_numbers(&error.to_string()),
                    "cannot ask the provider about an unanswered attempt; asking again later"
                );
                Ok(Some(Disposition::Retry {
                    delay: outcome::retry_delay(
                        &self.settings.retry_delays,
                        1,
                        error.retry_after(),
                    ),
                    attempts: delivery.attempts,
                    kind: job.kind,
                }))
            }
            Lookup::Unsupported => self.cannot_ask(out, unknown, gateway).await,
        }
    }

    /// The first of `candidates` that no other message of the log has recorded: a lookup
    /// matches on recipient and text, which another message may share.
    async fn untaken<'a>(
        &self,
        out: &Outgoing<'_>,
        candidates: &'a [Accepted],
    ) -> Result<Option<&'a str>, Abandoned> {
        let id = out.message.job.id;
        for candidate in candidates {
            let sid = candidate.provider_message_id.as_str();
            let taken = self
                .persist(out.message.abandon, || {
                    self.log.provider_message_taken(sid, id)
                })
                .await?;
            if !taken {
                return Ok(Some(sid));
            }
        }
        Ok(None)
    }

    /// The provider offers no lookup: send again (a possible duplicate) or give up, as
    /// `SMSGW_UNKNOWN_OUTCOME` says.
    async fn cannot_ask(
        &self,
        out: &Outgoing<'_>,
        unknown: &UnknownAttempt,
        gateway: &Gateway,
    ) -> Result<Option<Disposition>, Abandoned> {
        let job = out.message.job;
        if self.settings.unknown_outcome == UnknownOutcome::Resend {
            self.metrics.possible_duplicates.inc();
            tracing::warn!(
                attempt = unknown.attempt,
                "the provider cannot be asked about an unanswered attempt; sending again \
                 (possible duplicate)"
            );
            return Ok(None);
        }
        self.persist(out.message.abandon, || self.log.fail_unknown(job.id))
            .await?;
        self.count("failed", job.kind, gateway.name);
        tracing::warn!(
            attempt = unknown.attempt,
            "outcome unknown and the provider cannot be asked; not sent again"
        );
        Ok(Some(Disposition::DeadLetter {
            reason: DeadReason::OutcomeUnknown,
            error: format!(
                "the outcome of attempt {} is unknown and the provider offers no lookup; not \
                 sent again (SMSGW_UNKNOWN_OUTCOME=dead_letter)",
                unknown.attempt
            ),
            attempts: out.message.delivery.attempts,
        }))
    }
}
