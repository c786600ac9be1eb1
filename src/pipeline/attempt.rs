//! Sending: pick a gateway, wait for a call slot and the provider's pace, claim the
//! attempt in the log, call, record what happened; fail over once when the provider
//! refuses for a reason another gateway may not share.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use time::OffsetDateTime;
use tokio::sync::SemaphorePermit;
use uuid::Uuid;

use super::{Abandoned, Message, MessageLog, Pipeline, Prior, outcome};
use crate::{
    disposition::{DeadReason, Disposition},
    metrics::ProviderLabels,
    phone::{PhoneNumber, SenderId, redact_numbers},
    policy::{SuppressReason, sender},
    provider::Route,
    provider::{
        Accepted, Gateway, OutboundSms, ProviderError,
        circuit::{CallResult, Permit},
        pace::Turn,
    },
    store::{AttemptOutcome, AttemptRecord, Claim, NewMessage, Status, UnknownAttempt},
};

/// Longest a message holds its delivery waiting for its turn under a rate limit; past
/// that it is put off through a retry tier, so that a slow pace never runs into the
/// broker's consumer timeout.
const PACE_MAX_WAIT: Duration = Duration::from_secs(30);

/// A message about to be sent: the message, and the text as the provider gets it.
pub(super) struct Outgoing<'a> {
    pub message: Message<'a>,
    pub sms: OutboundSms<'a>,
    /// The job's `expires_at`, else its type's default expiry: the provider's validity is
    /// the time left before it, measured again just before each call.
    pub expires_at: Option<OffsetDateTime>,
    /// The school's own number, for destinations that refuse its alphanumeric sender.
    pub sender_number: Option<&'a SenderId>,
}

/// No sender the destination's carriers accept: the school's sender is a name, and there
/// is no number to send from. Sent from the name, the text would be dropped on the way.
fn no_sender(attempts: u32) -> outcome::Verdict {
    outcome::Verdict {
        status: Status::Failed,
        reason: "no_sender",
        disposition: Disposition::DeadLetter {
            reason: DeadReason::PermanentFailure,
            error: "no_sender: the destination's carriers refuse alphanumeric senders, and \
                    neither the school's sender_number nor the provider's sender is a number"
                .to_owned(),
            attempts,
        },
    }
}

/// Less time is left before the message expires than the provider can be asked to keep
/// it: nothing is sent, rather than a text the carrier may deliver late.
fn too_late() -> outcome::Verdict {
    outcome::Verdict {
        status: Status::Expired,
        reason: "expires_too_soon",
        disposition: Disposition::Ack,
    }
}

/// What one attempt starts from.
#[derive(Debug, Clone, Copy)]
struct Try {
    /// An attempt left open by a crash, to take over.
    take_over: Option<i32>,
    /// The provider was asked about an attempt with an unknown outcome.
    reconciled: bool,
    /// Provider calls made before this one.
    attempts_before: u32,
    /// A refusal another gateway may not share is handed back instead of being final.
    may_fail_over: bool,
}

/// How one attempt ended, for the caller that may fail over.
enum Attempted {
    Done(Disposition),
    /// Refused for a reason another gateway may not share; `attempts` calls made so far.
    FailOver {
        attempts: u32,
    },
    /// The message's last attempt has an unknown outcome: reconcile, then claim again.
    Unknown(UnknownAttempt),
}

/// What claiming found: an attempt to make, or an end already reached.
enum Claimed {
    Attempt(i32),
    Settled(Attempted),
}

impl<L: MessageLog> Pipeline<L> {
    /// The text as the provider gets it: to the staging redirect when one is set, valid
    /// until the message expires.
    pub(super) fn outgoing<'a>(
        &'a self,
        message: Message<'a>,
        to: &'a PhoneNumber,
        (sender, sender_number): (Option<&'a SenderId>, Option<&'a SenderId>),
    ) -> Outgoing<'a> {
        let redirect = self.settings.redirect_to.as_ref();
        if let Some(redirect) = redirect {
            tracing::info!(to = %to.masked(), redirected_to = %redirect.masked(), "staging redirect");
        }
        let job = message.job;
        let expires_at = self.expires_at(message.delivery, job);
        let sms = OutboundSms {
            message_id: job.id,
            to: redirect.unwrap_or(to),
            sender,
            body: &job.body,
            validity: None,
        };
        Outgoing {
            message,
            sms,
            expires_at,
            sender_number,
        }
    }

    /// The text as `gateway` gets it: from a sender the destination accepts, with its
    /// validity from the time left now. `Err` when there is no such sender, or too little
    /// time is left for the provider's minimum.
    fn for_gateway<'a>(
        &self,
        out: &Outgoing<'a>,
        gateway: &Gateway,
        attempts: u32,
    ) -> Result<OutboundSms<'a>, outcome::Verdict> {
        let sender = match gateway.provider.default_sender() {
            None => out.sms.sender,
            Some(provider) => {
                let refused = &self.settings.alphanumeric_refused;
                let refuses = sender::refuses_alphanumeric(refused, out.sms.to.country());
                sender::choose(refuses, out.sms.sender, out.sender_number, provider)
                    .ok_or_else(|| no_sender(attempts))?
            }
        };
        let sms = OutboundSms {
            sender,
            ..out.sms.clone()
        };
        let Some(at) = out.expires_at else {
            return Ok(sms);
        };
        let left = Duration::try_from(at - OffsetDateTime::now_utc()).unwrap_or(Duration::ZERO);
        let validity = match gateway.provider.validity_bounds() {
            Some(bounds) => bounds.clamp(left).ok_or_else(too_late)?,
            None => left,
        };
        Ok(OutboundSms {
            validity: Some(validity),
            ..sms
        })
    }

    /// Sends through the route: reconciles an unknown outcome first, then attempts through
    /// the gateway whose circuit allows it, and fails over once if that one refuses.
    pub(super) async fn send(
        &self,
        out: &Outgoing<'_>,
        prior: Prior,
        route: &Route,
    ) -> Result<Disposition, Abandoned> {
        let gateway = match self.pick(route) {
            Ok(gateway) => gateway,
            Err(wait) => return Ok(self.circuit_open(route, wait, out)),
        };
        let first = Try {
            take_over: prior.take_over,
            reconciled: false,
            attempts_before: out.message.delivery.attempts,
            may_fail_over: route.fallback.is_some(),
        };
        let attempts = match self.first_attempt(out, prior, &gateway, first).await? {
            Ok(done) => return Ok(done),
            Err(attempts) => attempts,
        };
        let fallback = route
            .fallback
            .as_ref()
            .filter(|f| !Arc::ptr_eq(f, &gateway))
            .unwrap_or(&route.primary);
        tracing::warn!(
            from = gateway.name,
            to = fallback.name,
            "refused for a reason another gateway may not share; failing over"
        );
        let second = Try {
            take_over: None,
            reconciled: true,
            attempts_before: attempts,
            may_fail_over: false,
        };
        match self.attempt(out, fallback, second).await? {
            Attempted::Done(disposition) => Ok(disposition),
            // Not asked to fail over again; `attempt` settles it itself.
            Attempted::FailOver { .. } | Attempted::Unknown(_) => Ok(Disposition::Requeue),
        }
    }

    /// The attempt through the first gateway, reconciling an unknown outcome before it
    /// (once). `Err` carries the calls made when it should fail over.
    async fn first_attempt(
        &self,
        out: &Outgoing<'_>,
        prior: Prior,
        gateway: &Arc<Gateway>,
        mut next: Try,
    ) -> Result<Result<Disposition, u32>, Abandoned> {
        let mut unknown = prior.unknown;
        loop {
            if let Some(unknown) = unknown.take() {
                let asked = self.gateways.get(&unknown.provider).unwrap_or(gateway);
                if let Some(done) = self.reconcile(out, &unknown, asked).await? {
                    return Ok(Ok(done));
                }
                next.reconciled = true;
            }
            match self.attempt(out, gateway, next).await? {
                Attempted::Done(disposition) => return Ok(Ok(disposition)),
                Attempted::FailOver { attempts } => return Ok(Err(attempts)),
                // The claim found an attempt with an unknown outcome: ask first.
                Attempted::Unknown(found) if !next.reconciled => unknown = Some(found),
                Attempted::Unknown(_) => return Ok(Ok(self.look_again(out))),
            }
        }
    }

    /// Picks the gateway to call now: the primary, or the fallback while the primary's
    /// circuit is open; `Err(wait)` when neither may be called.
    fn pick(&self, route: &Route) -> Result<Arc<Gateway>, Duration> {
        let primary = self.permit(&route.primary);
        match (primary, &route.fallback) {
            (Ok(()), _) => Ok(route.primary.clone()),
            (Err(wait), Some(fallback)) => match self.permit(fallback) {
                Ok(()) => {
                    tracing::warn!(
                        primary = route.primary.name,
                        fallback = fallback.name,
                        "primary provider's circuit is open; using the fallback"
                    );
                    Ok(fallback.clone())
                }
                Err(other) => Err(wait.min(other)),
            },
            (Err(wait), None) => Err(wait),
        }
    }

    fn permit(&self, gateway: &Gateway) -> Result<(), Duration> {
        let permit = gateway.circuit.permit();
        self.report_circuit(gateway);
        match permit {
            Permit::Call | Permit::Probe => Ok(()),
            Permit::Wait(wait) => Err(wait),
        }
    }

    fn report_circuit(&self, gateway: &Gateway) {
        self.metrics
            .circuit_state
            .get_or_create(&ProviderLabels {
                provider: gateway.name,
            })
            .set(gateway.circuit.state() as i64);
    }

    fn circuit_open(&self, route: &Route, wait: Duration, out: &Outgoing<'_>) -> Disposition {
        self.metrics
            .paused
            .get_or_create(&ProviderLabels {
                provider: route.primary.name,
            })
            .inc();
        tracing::debug!(retry_in = ?wait, "provider circuit open; put off");
        Disposition::Defer {
            until: OffsetDateTime::now_utc() + wait,
            kind: out.message.job.kind,
        }
    }

    fn look_again(&self, out: &Outgoing<'_>) -> Disposition {
        let delivery = out.message.delivery;
        let recheck = self.settings.recheck_after();
        outcome::look_again(recheck, delivery.attempts, out.message.job.kind)
    }

    /// One attempt through `gateway`: wait for a turn, claim it, call, record the outcome.
    async fn attempt(
        &self,
        out: &Outgoing<'_>,
        gateway: &Gateway,
        next: Try,
    ) -> Result<Attempted, Abandoned> {
        let (slot, turn) = match self.wait_for_turn(gateway, out).await? {
            Ok(ready) => ready,
            Err(put_off) => return Ok(Attempted::Done(put_off)),
        };
        let sms = match self.for_gateway(out, gateway, next.attempts_before) {
            Ok(sms) => sms,
            Err(verdict) => {
                let done = self.record_without_call(&out.message, verdict).await?;
                return Ok(Attempted::Done(done));
            }
        };
        let message = NewMessage {
            provider: gateway.name,
            ..out.message.row.clone()
        };
        let attempt = match self.claim(out, &message, gateway, next).await? {
            Claimed::Attempt(attempt) => attempt,
            Claimed::Settled(attempted) => return Ok(attempted),
        };
        let (result, duration) = self.call(gateway, &sms, slot, &turn).await;
        let attempts = next.attempts_before.saturating_add(1);
        let call = Call {
            gateway,
            attempt,
            attempts,
            duration,
        };
        match result {
            Ok(accepted) => self.sent(out, &call, &accepted).await,
            Err(error) => {
                let fail_over = next.may_fail_over && error.other_gateway_may_succeed();
                self.failed(out, &call, &error, fail_over).await
            }
        }
    }

    /// Waits for a free call slot and the provider's pace before claiming: a claimed
    /// attempt that waits and is then cut short by a crash would leave an outcome to
    /// reconcile. The slot is held until the call has ended. `Err` puts the message off
    /// when the wait would be too long.
    async fn wait_for_turn<'g>(
        &self,
        gateway: &'g Gateway,
        out: &Outgoing<'_>,
    ) -> Result<Result<(Option<SemaphorePermit<'g>>, Turn), Disposition>, Abandoned> {
        let ready = async {
            let slot = gateway.calls.acquire().await.ok();
            let turn = gateway.pace.admit().await;
            (slot, turn)
        };
        tokio::select! {
            ready = tokio::time::timeout(PACE_MAX_WAIT, ready) => Ok(ready.map_err(|_| {
                tracing::debug!("rate limit or call backlog; put off");
                Disposition::Defer {
                    until: OffsetDateTime::now_utc() + PACE_MAX_WAIT,
                    kind: out.message.job.kind,
                }
            })),
            () = out.message.abandon.cancelled() => Err(Abandoned::Stopping),
        }
    }

    /// Claims the attempt in the log. An opted-out recipient is recorded as suppressed;
    /// a message busy elsewhere, or with an unknown outcome, is handed back.
    async fn claim(
        &self,
        out: &Outgoing<'_>,
        message: &NewMessage<'_>,
        gateway: &Gateway,
        next: Try,
    ) -> Result<Claimed, Abandoned> {
        // One id for this claim, kept across retries of the same statement.
        let claim_id = Uuid::new_v4();
        let claim = self
            .persist(out.message.abandon, || {
                self.log
                    .begin_attempt(message, next.take_over, next.reconciled, claim_id)
            })
            .await?;
        let busy = match claim {
            Claim::Started { attempt } => return Ok(Claimed::Attempt(attempt)),
            Claim::OptedOut => return self.opted_out(out, message, gateway).await,
            Claim::Busy(state) => state,
        };
        let job = out.message.job;
        let look_again = || {
            outcome::look_again(
                self.settings.recheck_after(),
                next.attempts_before,
                job.kind,
            )
        };
        let waiting = matches!(busy.status, Status::Queued | Status::Retrying);
        let attempted = match (waiting, busy.unknown_attempt.clone()) {
            // Not claimed although waiting: its last attempt's outcome is unknown.
            (true, Some(unknown)) => Attempted::Unknown(unknown),
            (true, None) => Attempted::Done(look_again()),
            (false, _) => Attempted::Done(
                self.seen_before(out.message.delivery, job, &busy)
                    .unwrap_or_else(look_again),
            ),
        };
        Ok(Claimed::Settled(attempted))
    }

    async fn opted_out(
        &self,
        out: &Outgoing<'_>,
        message: &NewMessage<'_>,
        gateway: &Gateway,
    ) -> Result<Claimed, Abandoned> {
        let verdict = outcome::suppressed(SuppressReason::OptedOut);
        let recorded = self
            .persist(out.message.abandon, || {
                self.log
                    .record_without_call(message, verdict.status, Some(verdict.reason))
            })
            .await?;
        if recorded.is_none() {
            self.count("suppressed", out.message.job.kind, gateway.name);
            self.metrics.count_suppressed(verdict.reason);
            verdict.log();
        }
        Ok(Claimed::Settled(Attempted::Done(verdict.disposition)))
    }

    /// Calls the provider and feeds the circuit, the pace and the metrics with the result.
    async fn call(
        &self,
        gateway: &Gateway,
        sms: &OutboundSms<'_>,
        slot: Option<SemaphorePermit<'_>>,
        turn: &Turn,
    ) -> (Result<Accepted, ProviderError>, Duration) {
        // Claiming took a few milliseconds, more or less: space the calls out again.
        gateway.pace.call(turn).await;
        let started = Instant::now();
        // The adapter has its own timeout; this one only guards against an adapter bug.
        let limit = self.settings.provider_timeout + Duration::from_secs(1);
        let result = tokio::time::timeout(limit, gateway.provider.send(sms))
            .await
            .unwrap_or(Err(ProviderError::Timeout {
                after: self.settings.provider_timeout,
            }));
        let duration = started.elapsed();
        // Recording the outcome needs no connection: the next call may start.
        drop(slot);
        if let Err(ProviderError::Throttled { retry_after, .. }) = &result {
            // Too fast for the provider: every task waits, not only this one.
            gateway.pace.throttled(*retry_after);
        }
        gateway.circuit.record(match &result {
            Err(e) if e.suggests_outage() => CallResult::Failed,
            _ => CallResult::Answered,
        });
        self.report_circuit(gateway);
        self.metrics
            .provider_calls
            .get_or_create(&ProviderLabels {
                provider: gateway.name,
            })
            .observe(duration.as_secs_f64());
        if let Err(error) = &result {
            self.metrics
                .count_provider_error(gateway.name, error_code_label(error));
        }
        (result, duration)
    }

    async fn sent(
        &self,
        out: &Outgoing<'_>,
        call: &Call<'_>,
        accepted: &Accepted,
    ) -> Result<Attempted, Abandoned> {
        let record = AttemptRecord {
            outcome: AttemptOutcome::Sent,
            duration: call.duration,
            http_status: accepted.http_status,
            error_code: None,
            error_message: None,
            outcome_unknown: false,
            provider_message_id: Some(&accepted.provider_message_id),
            status: Status::Sent,
            reason: None,
        };
        let job = out.message.job;
        self.persist(out.message.abandon, || {
            self.log.finish_attempt(job.id, call.attempt, &record)
        })
        .await?;
        self.count("sent", job.kind, call.gateway.name);
        let delivery = out.message.delivery;
        let due = delivery.retry_at.unwrap_or(delivery.first_seen);
        self.metrics.observe_send_latency(delivery.lane, due);
        tracing::info!(
            to = %out.sms.to.masked(),
            sender = out.sms.sender.map(|s| s.as_str()).unwrap_or("default"),
            attempt = call.attempt,
            provider_message_id = %accepted.provider_message_id,
            duration_ms = call.duration.as_millis() as u64,
            "sent via {}",
            call.gateway.name
        );
        Ok(Attempted::Done(Disposition::Ack))
    }

    async fn failed(
        &self,
        out: &Outgoing<'_>,
        call: &Call<'_>,
        error: &ProviderError,
        fail_over: bool,
    ) -> Result<Attempted, Abandoned> {
        let job = out.message.job;
        let failure =
            outcome::after_failure(error, call.attempts, fail_over, &self.settings, job.kind);
        let error_message = error_message(error);
        let record = AttemptRecord {
            outcome: failure.outcome,
            duration: call.duration,
            http_status: error.http_status(),
            error_code: error.code(),
            error_message: Some(&error_message),
            outcome_unknown: error.outcome_unknown(),
            provider_message_id: None,
            status: failure.status,
            reason: failure.reason,
        };
        self.persist(out.message.abandon, || {
            self.log.finish_attempt(job.id, call.attempt, &record)
        })
        .await?;
        if error.recipient_opted_out() {
            self.carrier_opt_out(out).await?;
        }
        let logged = redact_numbers(&error.to_string());
        let Some(disposition) = failure.disposition else {
            tracing::warn!(attempt = call.attempt, error = %logged, "refused by {}", call.gateway.name);
            return Ok(Attempted::FailOver {
                attempts: call.attempts,
            });
        };
        self.count(failure.status.as_str(), job.kind, call.gateway.name);
        match &disposition {
            Disposition::Retry { delay, .. } => tracing::warn!(
                attempt = call.attempt,
                error = %logged,
                retry_in = %humantime::format_duration(*delay),
                "temporary failure; will retry"
            ),
            _ => tracing::warn!(
                attempt = call.attempt,
                error = %logged,
                reason = failure.reason.unwrap_or_default(),
                "failed; dead-lettered"
            ),
        }
        Ok(Attempted::Done(disposition))
    }

    /// The recipient unsubscribed at the carrier: the school's opt-out is recorded, so that
    /// its later texts are suppressed until the recipient opts in again.
    async fn carrier_opt_out(&self, out: &Outgoing<'_>) -> Result<(), Abandoned> {
        let school = Some(out.message.job.school_id);
        self.persist(out.message.abandon, || {
            self.log.add_opt_out(school, out.sms.to, "provider")
        })
        .await?;
        tracing::info!(to = %out.sms.to.masked(), "recipient unsubscribed at the carrier; opt-out recorded");
        Ok(())
    }
}

/// One provider call that was made.
struct Call<'g> {
    gateway: &'g Gateway,
    attempt: i32,
    /// Provider calls made for the job, this one included.
    attempts: u32,
    duration: Duration,
}

/// The `code` label of a failed call: the provider's own code when it gave a short, plain
/// one (an answer from outside must not make labels of any length), else what went wrong.
fn error_code_label(error: &ProviderError) -> String {
    let plain = |code: &str| {
        code.len() <= 16
            && code
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    };
    match error {
        ProviderError::Unreachable { .. } => "unreachable".to_owned(),
        ProviderError::ConnectionLost { .. } => "connection_lost".to_owned(),
        ProviderError::Timeout { .. } => "timeout".to_owned(),
        ProviderError::Unreadable { .. } => "unreadable".to_owned(),
        ProviderError::Unavailable {
            http_status, code, ..
        }
        | ProviderError::Throttled {
            http_status, code, ..
        }
        | ProviderError::Rejected {
            http_status, code, ..
        } => match code.as_deref() {
            Some(code) if plain(code) => code.to_owned(),
            Some(_) => "other".to_owned(),
            None => format!("http_{http_status}"),
        },
    }
}

/// The provider's own words when it gave any, else our description of the failure.
fn error_message(error: &ProviderError) -> String {
    match error {
        ProviderError::Rejected { message, .. } => message.clone(),
        ProviderError::Unavailable { message, .. } | ProviderError::Throttled { message, .. } => {
            message.clone().unwrap_or_else(|| error.to_string())
        }
        _ => error.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_is_labelled_by_the_providers_code_or_by_what_went_wrong() {
        let rejected = |code: Option<&str>| ProviderError::Rejected {
            http_status: 400,
            code: code.map(str::to_owned),
            message: "no".into(),
            recipient_opted_out: false,
            other_gateway_may_succeed: false,
        };
        assert_eq!(error_code_label(&rejected(Some("21211"))), "21211");
        assert_eq!(error_code_label(&rejected(None)), "http_400");
        // A code from outside that would make a long or odd label is not kept.
        assert_eq!(error_code_label(&rejected(Some(&"9".repeat(40)))), "other");
        assert_eq!(error_code_label(&rejected(Some("a b"))), "other");
        let timeout = ProviderError::Timeout {
            after: Duration::from_secs(10),
        };
        assert_eq!(error_code_label(&timeout), "timeout");
        let unavailable = ProviderError::Unavailable {
            http_status: 503,
            code: None,
            message: None,
            retry_after: None,
        };
        assert_eq!(error_code_label(&unavailable), "http_503");
    }
}
