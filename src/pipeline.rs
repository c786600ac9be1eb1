//! The pipeline: one delivery in, one [`Disposition`] out.
//!
//! ```text
//! Incoming ─▶ Job::decode ─▶ log lookup ─▶ settings, recipient, opt-out ─▶ policy::decide
//!    │            │ invalid      │ done before                             │
//!    │            ▼              ▼                                         ▼
//!    │        DeadLetter        Ack       Suppress/Expire ─▶ record ─▶ Ack
//!    │                                    Refuse ─▶ record ─▶ DeadLetter
//!    │                                    Defer ─▶ record queued ─▶ Defer
//!    │                                    Send ─▶ begin_attempt ─▶ provider ─▶ finish_attempt
//!    │                                                  ─▶ Ack / Retry / DeadLetter
//!    └─ announcement with recipients ─▶ fan out one job per recipient ─▶ Ack
//! ```
//!
//! The pipeline never guesses about the database: a failed write is retried (the delivery
//! held, unsettled) until it works or the daemon gives up at shutdown, and no provider call
//! starts before its attempt row is committed.

use std::{
    collections::HashSet,
    sync::Arc,
    time::{Duration, Instant},
};

use backon::{ExponentialBuilder, Retryable};
use serde_json::{Value, json};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use crate::{
    broker::{Broker, Incoming},
    cache::PolicyCache,
    circuit::{CallResult, Permit},
    disposition::{DeadReason, Disposition},
    health::Health,
    job::{BulkRecipient, Job, JobType, Target},
    metrics::Metrics,
    phone::{PhoneNumber, redact_numbers},
    policy::{Decision, Facts, Refusal, SchoolSettings, decide},
    provider::{Gateway, Gateways, Lookup, OutboundSms, ProviderError},
    store::{
        AttemptOutcome, AttemptRecord, Claim, MessageState, MessageStatus, NewMessage, Store,
        StoreError, UnknownAttempt,
    },
};

/// What the pipeline needs from the configuration.
#[derive(Debug, Clone)]
pub struct PipelineSettings {
    pub max_attempts: u32,
    pub retry_delays: Vec<Duration>,
    pub redirect_to: Option<PhoneNumber>,
    pub provider_timeout: Duration,
    pub unknown_outcome: UnknownOutcome,
    /// Most segments a text of a type may have.
    pub max_segments: std::collections::HashMap<JobType, u32>,
    /// Recipients of an announcement fanned out per turn in the bulk lane.
    pub fanout_chunk: usize,
}

/// Rows of an announcement's recipients written per statement when it is accepted.
const QUEUE_PIECE: usize = 5_000;
/// Longest wait for one database statement before it counts as failed.
const STORE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a message holds its delivery waiting for its turn under a rate limit; past
/// that it is put off through a retry tier, so that a slow pace never runs into the
/// broker's consumer timeout.
const PACE_MAX_WAIT: Duration = Duration::from_secs(30);

/// What to do when an attempt's outcome is unknown and the provider cannot be asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnknownOutcome {
    /// Send again, and count it as a possible duplicate.
    Resend,
    /// Dead-letter it for a human to decide.
    DeadLetter,
}

/// What the log knew about the message before this delivery.
#[derive(Debug, Clone)]
struct Prior {
    /// An attempt left open by a crash, to take over.
    take_over: Option<i32>,
    /// An attempt whose outcome is unknown, to reconcile before sending again.
    unknown: Option<UnknownAttempt>,
}

/// Why the pipeline gave up on a database write.
#[derive(Debug)]
enum Abandoned {
    /// The daemon is stopping: the delivery is left for the broker to deliver again.
    Stopping,
    /// PostgreSQL refused the message's data itself (a data exception): no retry can
    /// record it, so the job is dead-lettered with the database's error.
    Unrecordable(String),
}

/// Which gateways a school's messages go through.
#[derive(Debug, Clone)]
struct Route {
    primary: Arc<Gateway>,
    fallback: Option<Arc<Gateway>>,
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

pub struct Pipeline {
    store: Store,
    cache: PolicyCache,
    gateways: Arc<Gateways>,
    settings: PipelineSettings,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
}

impl Pipeline {
    pub fn new(
        store: Store,
        cache: PolicyCache,
        gateways: Arc<Gateways>,
        settings: PipelineSettings,
        health: Arc<Health>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Pipeline {
            store,
            cache,
            gateways,
            settings,
            health,
            metrics,
        }
    }

    fn count(&self, outcome: &'static str, kind: JobType, provider: &'static str) {
        self.metrics.count_message(outcome, kind.as_str(), provider);
    }

    /// The gateways a school's settings name (the default when none). `Err` names a
    /// provider that is not configured.
    fn route(&self, settings: Option<&SchoolSettings>) -> Result<Route, String> {
        let named = |name: Option<&str>| -> Result<Option<Arc<Gateway>>, String> {
            match name.map(str::trim).filter(|n| !n.is_empty()) {
                None => Ok(None),
                Some(name) => self
                    .gateways
                    .get(name)
                    .cloned()
                    .map(Some)
                    .ok_or_else(|| name.to_owned()),
            }
        };
        let primary = named(settings.and_then(|s| s.provider.as_deref()))?
            .unwrap_or_else(|| self.gateways.default_gateway().clone());
        let fallback = named(settings.and_then(|s| s.fallback_provider.as_deref()))?
            .filter(|f| !Arc::ptr_eq(f, &primary));
        Ok(Route { primary, fallback })
    }

    /// Handles one delivery. `abandon` fires when the daemon must stop waiting for the
    /// database; the delivery is then left unsettled for the broker to deliver again.
    pub async fn handle(
        &self,
        incoming: &Incoming,
        broker: &Broker,
        abandon: &CancellationToken,
    ) -> Disposition {
        let job = match Job::decode(&incoming.body) {
            Ok(job) => job,
            Err(invalid) => {
                let message_id: String = incoming
                    .message_id()
                    .unwrap_or("-")
                    .chars()
                    .take(64)
                    .collect();
                tracing::warn!(
                    lane = incoming.lane.as_str(),
                    message_id = %redact_numbers(&message_id),
                    error = %invalid,
                    "invalid job dead-lettered"
                );
                self.metrics.count_message(
                    "invalid",
                    "unknown",
                    self.gateways.default_gateway().name,
                );
                return Disposition::DeadLetter {
                    reason: DeadReason::InvalidJob,
                    error: invalid.to_string(),
                    attempts: incoming.attempts,
                };
            }
        };
        let span = tracing::info_span!(
            "message",
            job_id = %job.id,
            school_id = job.school_id,
            r#type = job.kind.as_str(),
            provider = tracing::field::Empty,
        );
        async {
            if let Some(at) = incoming.retry_at
                && at - OffsetDateTime::now_utc() > time::Duration::milliseconds(20)
            {
                // Back from a tier shorter than the provider asked us to wait.
                return Disposition::Defer {
                    until: at,
                    kind: job.kind,
                };
            }
            let result = match &job.target {
                Target::Many(recipients) => {
                    self.fan_out(incoming, &job, recipients, broker, abandon)
                        .await
                }
                Target::One(to) => self.handle_one(incoming, &job, to, abandon).await,
            };
            match result {
                Ok(disposition) => disposition,
                Err(Abandoned::Stopping) => Disposition::Unsettled,
                Err(Abandoned::Unrecordable(error)) => {
                    tracing::error!(error = %redact_numbers(&error), "the database refused the message's data; dead-lettered");
                    Disposition::DeadLetter {
                        reason: DeadReason::InvalidJob,
                        error: format!("the database refused the message's data: {error}"),
                        attempts: incoming.attempts,
                    }
                }
            }
        }
        .instrument(span)
        .await
    }

    async fn handle_one(
        &self,
        incoming: &Incoming,
        job: &Job,
        to: &str,
        abandon: &CancellationToken,
    ) -> Result<Disposition, Abandoned> {
        let mut take_over = None;
        let mut unknown = None;
        // A fresh publish needs no look at the log first: the claim itself finds a job
        // that was done or is in flight. Only a delivery with a history (redelivered, back
        // from a tier, replayed) looks first, to take over or reconcile an attempt.
        let has_history = incoming.redelivered || incoming.requeued || incoming.replayed;
        let state = if has_history {
            self.persist(abandon, || self.store.message_state(job.id))
                .await?
        } else {
            None
        };
        if let Some(state) = state {
            match self.already_handled(incoming, job, &state) {
                Some(disposition) => return Ok(disposition),
                None if state.status == MessageStatus::Sending => take_over = Some(state.attempts),
                None => {}
            }
            unknown = state.unknown_attempt.clone();
        }

        let settings = self.school_settings(job.school_id, abandon).await?;
        let country = settings.as_ref().and_then(|s| s.country.as_deref());
        let recipient = PhoneNumber::parse(to, country);
        let now = OffsetDateTime::now_utc();
        let segmentation = crate::segments::segment(&job.body);
        let mut decision = decide(
            job.kind,
            job.not_before,
            job.expires_at,
            &Facts {
                settings: settings.as_deref(),
                recipient: &recipient,
                // Read from `sms_opt_outs` by the claim, in the statement that starts the
                // attempt: the table is the authority, never a copy of it.
                opted_out: false,
                segments: segmentation.segments,
                max_segments: self.settings.max_segments.get(&job.kind).copied(),
                now,
            },
        );
        let route = self.route(settings.as_deref());
        let label = match &route {
            Ok(route) => route.primary.name,
            Err(_) => self.gateways.default_gateway().name,
        };
        tracing::Span::current().record("provider", label);
        if let (Decision::Send { .. }, Err(name)) = (&decision, &route) {
            decision = Decision::Refuse(Refusal::UnknownProvider(name.clone()));
        }

        let recorded_recipient = match &recipient {
            Ok(number) => number.as_str().to_owned(),
            Err(_) => to.trim().to_owned(),
        };
        let context = context_with_reference(job);
        let message = NewMessage {
            id: job.id,
            bulk_id: incoming.bulk_id,
            school_id: job.school_id,
            kind: job.kind,
            recipient: &recorded_recipient,
            body: &job.body,
            context: context.as_ref(),
            provider: label,
            segments: i32::try_from(segmentation.segments).ok(),
            reopen_failed: incoming.replayed,
        };

        let (status, reason, disposition) = match decision {
            Decision::Send { to, sender } => {
                let Ok(route) = &route else {
                    unreachable!("an unknown provider was turned into a refusal above")
                };
                return self
                    .send(
                        incoming,
                        job,
                        &message,
                        &to,
                        sender.as_ref(),
                        Prior { take_over, unknown },
                        route,
                        abandon,
                    )
                    .await;
            }
            Decision::Expire => {
                tracing::info!("expired before it could be sent");
                (
                    MessageStatus::Expired,
                    "expires_at passed".to_owned(),
                    Disposition::Ack,
                )
            }
            Decision::Suppress(reason) => {
                tracing::info!(reason = reason.as_str(), "suppressed");
                (
                    MessageStatus::Suppressed,
                    reason.as_str().to_owned(),
                    Disposition::Ack,
                )
            }
            Decision::Refuse(refusal) => {
                tracing::warn!(reason = refusal.reason(), error = %refusal, "refused before sending");
                (
                    MessageStatus::Failed,
                    refusal.reason().to_owned(),
                    Disposition::DeadLetter {
                        reason: DeadReason::PermanentFailure,
                        error: refusal.to_string(),
                        attempts: incoming.attempts,
                    },
                )
            }
            Decision::Defer { until } => {
                tracing::debug!(until = %until.format(&Rfc3339).unwrap_or_default(), "not due yet");
                (
                    MessageStatus::Queued,
                    "not_before".to_owned(),
                    Disposition::Defer {
                        until,
                        kind: job.kind,
                    },
                )
            }
        };
        let found = self
            .persist(abandon, || {
                self.store
                    .record_without_call(&message, status, Some(&reason))
            })
            .await?;
        match found {
            None => {
                self.count(status.as_str(), job.kind, label);
                Ok(disposition)
            }
            Some(state) => Ok(self
                .already_handled(incoming, job, &state)
                .unwrap_or(disposition)),
        }
    }

    /// Decides a delivery of a job the log already knows: done (ack), in flight elsewhere
    /// (ack, or wait and look again), or `None` to carry on.
    fn already_handled(
        &self,
        incoming: &Incoming,
        job: &Job,
        state: &MessageState,
    ) -> Option<Disposition> {
        let replay_of_failure = incoming.replayed && state.status == MessageStatus::Failed;
        let label = self.gateways.default_gateway().name;
        if state.status.is_final() && !replay_of_failure {
            self.count("duplicate", job.kind, label);
            tracing::info!(
                status = state.status.as_str(),
                "already handled; acked without a second provider call"
            );
            return Some(Disposition::Ack);
        }
        if state.status != MessageStatus::Sending {
            return None;
        }
        if !incoming.redelivered && !incoming.requeued {
            // A second publish of a job that another delivery is sending right now. That
            // delivery is unacked, so the broker keeps it until it has an outcome.
            self.count("duplicate", job.kind, label);
            tracing::info!("duplicate of a message in flight; acked");
            return Some(Disposition::Ack);
        }
        let age = state
            .open_attempt_started
            .map(|started| OffsetDateTime::now_utc() - started)
            .and_then(|age| Duration::try_from(age).ok())
            .unwrap_or(Duration::MAX);
        if age < self.settings.provider_timeout * 2 {
            // Its attempt may still be running in another process: look again later (the
            // copy that comes back is marked requeued, so it is not taken for a duplicate).
            tracing::info!("redelivered while an attempt may still be running; waiting");
            return Some(Disposition::Retry {
                delay: self.settings.provider_timeout * 2,
                attempts: incoming.attempts,
                kind: job.kind,
            });
        }
        tracing::warn!(
            attempt = state.attempts,
            "an attempt was cut off without an outcome (crash?); trying again"
        );
        None
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
            .get_or_create(&crate::metrics::ProviderLabels {
                provider: gateway.name,
            })
            .set(gateway.circuit.state() as i64);
    }

    #[allow(clippy::too_many_arguments)]
    async fn send(
        &self,
        incoming: &Incoming,
        job: &Job,
        message: &NewMessage<'_>,
        number: &PhoneNumber,
        sender: Option<&crate::phone::SenderId>,
        prior: Prior,
        route: &Route,
        abandon: &CancellationToken,
    ) -> Result<Disposition, Abandoned> {
        let to = self.settings.redirect_to.as_ref().unwrap_or(number);
        if self.settings.redirect_to.is_some() {
            tracing::info!(to = %number.masked(), redirected_to = %to.masked(), "staging redirect");
        }
        let validity = job
            .expires_at
            .and_then(|at| Duration::try_from(at - OffsetDateTime::now_utc()).ok());
        let sms = OutboundSms {
            message_id: job.id,
            to,
            sender,
            body: &job.body,
            validity,
        };
        let gateway = match self.pick(route) {
            Ok(gateway) => gateway,
            Err(wait) => {
                self.metrics
                    .paused
                    .get_or_create(&crate::metrics::ProviderLabels {
                        provider: route.primary.name,
                    })
                    .inc();
                tracing::debug!(retry_in = ?wait, "provider circuit open; put off");
                return Ok(Disposition::Defer {
                    until: OffsetDateTime::now_utc() + wait,
                    kind: job.kind,
                });
            }
        };
        let mut unknown = prior.unknown.clone();
        let mut reconciled = false;
        let attempts = loop {
            if let Some(unknown) = unknown.take() {
                let asked = self
                    .gateways
                    .get(&unknown.provider)
                    .cloned()
                    .unwrap_or_else(|| gateway.clone());
                if let Some(disposition) = self
                    .reconcile(incoming, job, &sms, &unknown, &asked, abandon)
                    .await?
                {
                    return Ok(disposition);
                }
                reconciled = true;
            }
            let first = self
                .attempt(
                    incoming,
                    job,
                    message,
                    &sms,
                    &gateway,
                    (prior.take_over, reconciled),
                    incoming.attempts,
                    route.fallback.is_some(),
                    abandon,
                )
                .await?;
            match first {
                Attempted::Done(disposition) => return Ok(disposition),
                Attempted::FailOver { attempts } => break attempts,
                // The claim found an attempt with an unknown outcome: ask first.
                Attempted::Unknown(found) if !reconciled => unknown = Some(found),
                Attempted::Unknown(_) => {
                    return Ok(Disposition::Retry {
                        delay: self.settings.provider_timeout * 2,
                        attempts: incoming.attempts,
                        kind: job.kind,
                    });
                }
            }
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
        match self
            .attempt(
                incoming,
                job,
                message,
                &sms,
                fallback,
                (None, true),
                attempts,
                false,
                abandon,
            )
            .await?
        {
            Attempted::Done(disposition) => Ok(disposition),
            // Not asked to fail over again; `attempt` settles it itself.
            Attempted::FailOver { .. } | Attempted::Unknown(_) => Ok(Disposition::Requeue),
        }
    }

    /// One attempt through `gateway`: claim it, call, record the outcome. With
    /// `may_fail_over`, a refusal another gateway may not share is recorded and handed
    /// back instead of being final.
    #[allow(clippy::too_many_arguments)]
    async fn attempt(
        &self,
        incoming: &Incoming,
        job: &Job,
        message: &NewMessage<'_>,
        sms: &OutboundSms<'_>,
        gateway: &Gateway,
        (take_over, reconciled): (Option<i32>, bool),
        attempts_before: u32,
        may_fail_over: bool,
        abandon: &CancellationToken,
    ) -> Result<Attempted, Abandoned> {
        let message = NewMessage {
            provider: gateway.name,
            ..message.clone()
        };
        // Wait for a free call slot and the provider's pace before claiming: a claimed
        // attempt that waits and is then cut short by a crash would leave an outcome to
        // reconcile. The slot is held until the call has ended.
        let ready = async {
            let slot = gateway.calls.acquire().await.ok();
            gateway.pace.admit().await;
            slot
        };
        let slot = tokio::select! {
            ready = tokio::time::timeout(PACE_MAX_WAIT, ready) => match ready {
                Ok(slot) => slot,
                Err(_) => {
                    tracing::debug!("rate limit or call backlog; put off");
                    return Ok(Attempted::Done(Disposition::Defer {
                        until: OffsetDateTime::now_utc() + PACE_MAX_WAIT,
                        kind: job.kind,
                    }));
                }
            },
            () = abandon.cancelled() => return Err(Abandoned::Stopping),
        };
        // One id for this claim, kept across retries of the same statement.
        let claim_id = Uuid::new_v4();
        let claim = self
            .persist(abandon, || {
                self.store
                    .begin_attempt(&message, take_over, reconciled, claim_id)
            })
            .await?;
        let attempt = match claim {
            Claim::Started { attempt } => attempt,
            Claim::OptedOut => {
                let recorded = self
                    .persist(abandon, || {
                        self.store.record_without_call(
                            &message,
                            MessageStatus::Suppressed,
                            Some("opted_out"),
                        )
                    })
                    .await?;
                if recorded.is_none() {
                    self.count("suppressed", job.kind, gateway.name);
                    tracing::info!(reason = "opted_out", "suppressed");
                }
                return Ok(Attempted::Done(Disposition::Ack));
            }
            Claim::Busy(state)
                if matches!(
                    state.status,
                    MessageStatus::Queued | MessageStatus::Retrying
                ) =>
            {
                // Not claimed although waiting: its last attempt's outcome is unknown.
                return Ok(match state.unknown_attempt {
                    Some(unknown) => Attempted::Unknown(unknown),
                    None => Attempted::Done(Disposition::Retry {
                        delay: self.settings.provider_timeout * 2,
                        attempts: attempts_before,
                        kind: job.kind,
                    }),
                });
            }
            Claim::Busy(state) => {
                return Ok(Attempted::Done(
                    self.already_handled(incoming, job, &state)
                        .unwrap_or(Disposition::Retry {
                            delay: self.settings.provider_timeout * 2,
                            attempts: attempts_before,
                            kind: job.kind,
                        }),
                ));
            }
        };

        // Claiming took a few milliseconds, more or less: space the calls out again.
        gateway.pace.call().await;
        let started = Instant::now();
        // The adapter has its own timeout; this one only guards against an adapter bug.
        let result = match tokio::time::timeout(
            self.settings.provider_timeout + Duration::from_secs(1),
            gateway.provider.send(sms),
        )
        .await
        {
            Ok(result) => result,
            Err(_) => Err(ProviderError::Timeout {
                after: self.settings.provider_timeout,
            }),
        };
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
            .get_or_create(&crate::metrics::ProviderLabels {
                provider: gateway.name,
            })
            .observe(duration.as_secs_f64());
        let attempts = attempts_before.saturating_add(1);
        match result {
            Ok(accepted) => {
                let record = AttemptRecord {
                    outcome: AttemptOutcome::Sent,
                    duration,
                    http_status: accepted.http_status,
                    error_code: None,
                    error_message: None,
                    outcome_unknown: false,
                    provider_message_id: Some(&accepted.provider_message_id),
                    status: MessageStatus::Sent,
                    reason: None,
                };
                self.persist(abandon, || {
                    self.store.finish_attempt(job.id, attempt, &record)
                })
                .await?;
                self.count("sent", job.kind, gateway.name);
                tracing::info!(
                    to = %sms.to.masked(),
                    sender = sms.sender.map(|s| s.as_str()).unwrap_or("default"),
                    attempt,
                    provider_message_id = %accepted.provider_message_id,
                    duration_ms = duration.as_millis() as u64,
                    "sent via {}",
                    gateway.name
                );
                Ok(Attempted::Done(Disposition::Ack))
            }
            Err(error) => {
                let fail_over = may_fail_over && error.other_gateway_may_succeed();
                self.failed(
                    job, sms, gateway, attempt, attempts, duration, error, fail_over, abandon,
                )
                .await
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn failed(
        &self,
        job: &Job,
        sms: &OutboundSms<'_>,
        gateway: &Gateway,
        attempt: i32,
        attempts: u32,
        duration: Duration,
        error: ProviderError,
        fail_over: bool,
        abandon: &CancellationToken,
    ) -> Result<Attempted, Abandoned> {
        let text = error.to_string();
        let error_message = match &error {
            ProviderError::Rejected { message, .. } => message.clone(),
            ProviderError::Unavailable { message, .. }
            | ProviderError::Throttled { message, .. } => {
                message.clone().unwrap_or_else(|| text.clone())
            }
            _ => text.clone(),
        };
        let (outcome, status, reason, disposition) = if fail_over {
            (
                AttemptOutcome::PermanentFailure,
                MessageStatus::Retrying,
                Some("failing_over"),
                None,
            )
        } else if !error.is_retryable() {
            let reason = if error.recipient_opted_out() {
                "recipient_opted_out"
            } else {
                "permanent_failure"
            };
            (
                AttemptOutcome::PermanentFailure,
                MessageStatus::Failed,
                Some(reason),
                Some(Disposition::DeadLetter {
                    reason: DeadReason::PermanentFailure,
                    error: text.clone(),
                    attempts,
                }),
            )
        } else if attempts >= self.settings.max_attempts {
            (
                AttemptOutcome::TemporaryFailure,
                MessageStatus::Failed,
                Some("attempts_exhausted"),
                Some(Disposition::DeadLetter {
                    reason: DeadReason::AttemptsExhausted,
                    error: format!("after {attempts} attempts: {text}"),
                    attempts,
                }),
            )
        } else {
            let delay = self.retry_delay(attempts, error.retry_after());
            (
                AttemptOutcome::TemporaryFailure,
                MessageStatus::Retrying,
                None,
                Some(Disposition::Retry {
                    delay,
                    attempts,
                    kind: job.kind,
                }),
            )
        };
        let record = AttemptRecord {
            outcome,
            duration,
            http_status: error.http_status(),
            error_code: error.code(),
            error_message: Some(&error_message),
            outcome_unknown: error.outcome_unknown(),
            provider_message_id: None,
            status,
            reason,
        };
        self.persist(abandon, || {
            self.store.finish_attempt(job.id, attempt, &record)
        })
        .await?;
        if error.recipient_opted_out() {
            self.persist(abandon, || {
                self.store
                    .add_opt_out(Some(job.school_id), sms.to, "provider")
            })
            .await?;
            tracing::info!(to = %sms.to.masked(), "recipient unsubscribed at the carrier; opt-out recorded");
        }
        let logged = redact_numbers(&text);
        let Some(disposition) = disposition else {
            tracing::warn!(attempt, error = %logged, "refused by {}", gateway.name);
            return Ok(Attempted::FailOver { attempts });
        };
        self.count(status.as_str(), job.kind, gateway.name);
        match &disposition {
            Disposition::Retry { delay, .. } => tracing::warn!(
                attempt,
                error = %logged,
                retry_in = %humantime::format_duration(*delay),
                "temporary failure; will retry"
            ),
            _ => tracing::warn!(
                attempt,
                error = %logged,
                reason = reason.unwrap_or_default(),
                "failed; dead-lettered"
            ),
        }
        Ok(Attempted::Done(disposition))
    }

    /// Before sending again after an attempt whose outcome is unknown, asks the provider
    /// whether it took the message. `Some` settles the delivery; `None` means send.
    async fn reconcile(
        &self,
        incoming: &Incoming,
        job: &Job,
        sms: &OutboundSms<'_>,
        unknown: &UnknownAttempt,
        gateway: &Gateway,
        abandon: &CancellationToken,
    ) -> Result<Option<Disposition>, Abandoned> {
        match gateway.provider.lookup(sms, unknown.started_at).await {
            Lookup::Found(accepted) => {
                self.persist(abandon, || {
                    self.store
                        .adopt_attempt(job.id, unknown.attempt, &accepted.provider_message_id)
                })
                .await?;
                self.count("sent", job.kind, gateway.name);
                tracing::info!(
                    attempt = unknown.attempt,
                    provider_message_id = %accepted.provider_message_id,
                    "the provider had taken it: recorded as sent, not sent again"
                );
                Ok(Some(Disposition::Ack))
            }
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
                    delay: self.retry_delay(1, error.retry_after()),
                    attempts: incoming.attempts,
                    kind: job.kind,
                }))
            }
            Lookup::Unsupported => match self.settings.unknown_outcome {
                UnknownOutcome::Resend => {
                    self.metrics.possible_duplicates.inc();
                    tracing::warn!(
                        attempt = unknown.attempt,
                        "the provider cannot be asked about an unanswered attempt; sending \
                         again (possible duplicate)"
                    );
                    Ok(None)
                }
                UnknownOutcome::DeadLetter => {
                    self.persist(abandon, || self.store.fail_unknown(job.id))
                        .await?;
                    self.count("failed", job.kind, gateway.name);
                    tracing::warn!(
                        attempt = unknown.attempt,
                        "outcome unknown and the provider cannot be asked; not sent again"
                    );
                    Ok(Some(Disposition::DeadLetter {
                        reason: DeadReason::PermanentFailure,
                        error: format!(
                            "the outcome of attempt {} is unknown and the provider offers no \
                             lookup; not sent again (SMSGW_UNKNOWN_OUTCOME=dead_letter)",
                            unknown.attempt
                        ),
                        attempts: incoming.attempts,
                    }))
                }
            },
        }
    }

    /// The wait before attempt `attempts + 1`: the tier for this attempt, or longer when the
    /// provider asked for it.
    fn retry_delay(&self, attempts: u32, retry_after: Option<Duration>) -> Duration {
        let delays = &self.settings.retry_delays;
        let index = (attempts as usize)
            .saturating_sub(1)
            .min(delays.len().saturating_sub(1));
        let tier = delays
            .get(index)
            .copied()
            .unwrap_or(Duration::from_secs(10));
        tier.max(retry_after.unwrap_or_default())
    }

    /// Turns an announcement to many into one job per recipient, each with an id derived
    /// from the announcement's id and the recipient, so a redelivered announcement (or a
    /// number listed twice) never texts anyone twice.
    ///
    /// A big announcement is fanned out a chunk at a time (`SMSGW_FANOUT_CHUNK`): the
    /// first chunk's messages, then the announcement with the recipients still to go, at
    /// the back of the bulk lane. Another school's announcement published meanwhile gets
    /// its turn after one chunk, not after all of this one. The delivery is acked only
    /// when both were confirmed; a crash in between fans the same chunk out again, to the
    /// same ids.
    async fn fan_out(
        &self,
        incoming: &Incoming,
        job: &Job,
        recipients: &[BulkRecipient],
        broker: &Broker,
        abandon: &CancellationToken,
    ) -> Result<Disposition, Abandoned> {
        let settings = self.school_settings(job.school_id, abandon).await?;
        let country = settings.as_ref().and_then(|s| s.country.as_deref());
        if !incoming.fanout_queued {
            self.queue_recipients(job, recipients, settings.as_deref(), abandon)
                .await?;
        }
        let (now, later) = recipients.split_at(recipients.len().min(self.settings.fanout_chunk));
        let mut seen = HashSet::with_capacity(now.len());
        let mut messages = Vec::with_capacity(now.len());
        for recipient in now {
            let to = recipient_number(recipient, country);
            let id = Uuid::new_v5(&job.id, to.as_bytes());
            if !seen.insert(id) {
                continue;
            }
            messages.push((id, child_job(job, id, &to, recipient.reference.as_deref())));
        }
        let count = messages.len();
        if let Err(e) = broker.publish_fanout(job.id, job.kind, messages).await {
            tracing::warn!(error = %e, "fan-out failed; the announcement goes back to its lane");
            return Ok(Disposition::Requeue);
        }
        if !later.is_empty() {
            let Some(rest) = without_first_recipients(&incoming.body, now.len()) else {
                // The job was decoded from these very bytes: this cannot happen.
                return Ok(Disposition::DeadLetter {
                    reason: DeadReason::InvalidJob,
                    error: "recipients could not be split for fan-out".into(),
                    attempts: incoming.attempts,
                });
            };
            if let Err(e) = broker.publish_continuation(job.id, job.kind, &rest).await {
                tracing::warn!(error = %e, "fan-out could not be continued; the announcement goes back to its lane");
                return Ok(Disposition::Requeue);
            }
        }
        self.count("fanned_out", job.kind, self.gateways.default_gateway().name);
        tracing::info!(
            recipients = count,
            remaining = later.len(),
            "announcement fanned out"
        );
        Ok(Disposition::Ack)
    }

    /// Writes a `queued` row for every recipient of an announcement, [`QUEUE_PIECE`] rows a
    /// statement, before the first chunk is fanned out: the whole announcement is in the
    /// log (for support, and for `smsgw status`) as soon as it is accepted, while the
    /// sending goes on a chunk at a time. Each row has the id, recipient, context and
    /// provider its own message will have; writing them again changes nothing.
    async fn queue_recipients(
        &self,
        job: &Job,
        recipients: &[BulkRecipient],
        settings: Option<&SchoolSettings>,
        abandon: &CancellationToken,
    ) -> Result<(), Abandoned> {
        let country = settings.and_then(|s| s.country.as_deref());
        let provider = match self.route(settings) {
            Ok(route) => route.primary.name,
            Err(_) => self.gateways.default_gateway().name,
        };
        let segments = i32::try_from(crate::segments::segment(&job.body).segments).ok();
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
                    reopen_failed: false,
                })
                .collect();
            self.persist(abandon, || self.store.queue_messages(&messages))
                .await?;
        }
        Ok(())
    }

    /// A school's settings from the cache; a school the cache does not know is looked up
    /// (it may have been added a moment ago, before its notification arrived).
    async fn school_settings(
        &self,
        school_id: i64,
        abandon: &CancellationToken,
    ) -> Result<Option<Arc<SchoolSettings>>, Abandoned> {
        if let Some(settings) = self.cache.settings(school_id) {
            return Ok(Some(settings));
        }
        Ok(self
            .persist(abandon, || self.store.school_settings(school_id))
            .await?
            .map(Arc::new))
    }

    /// Runs a store operation until it succeeds, waiting longer between tries, while the
    /// delivery stays unsettled. Gives up only when `abandon` fires.
    ///
    /// Each try has a time limit: a database that stops answering (a stalled connection
    /// sends no error) is treated like one that refuses. Every store write is safe to
    /// repeat, even when the timed-out try did commit.
    async fn persist<T, F, Fut>(
        &self,
        abandon: &CancellationToken,
        mut op: F,
    ) -> Result<T, Abandoned>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        let limited = || {
            let attempt = op();
            async move {
                tokio::time::timeout(STORE_TIMEOUT, attempt)
                    .await
                    .unwrap_or(Err(StoreError::Timeout(STORE_TIMEOUT)))
            }
        };
        let retrying = limited
            .retry(
                ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(50))
                    .with_max_delay(Duration::from_secs(5))
                    .with_jitter()
                    .without_max_times(),
            )
            .when(|error| !error.is_data_error())
            .notify(|error, wait| {
                self.health.set_database(false);
                if matches!(error, StoreError::Timeout(_)) {
                    self.store.replace_pool();
                }
                tracing::warn!(
                    error = %redact_numbers(&error.to_string()),
                    retry_in = ?wait,
                    "database unavailable; holding the message"
                );
            });
        tokio::select! {
            result = retrying => {
                let value = result.map_err(|e| Abandoned::Unrecordable(e.to_string()))?;
                self.health.set_database(true);
                Ok(value)
            }
            () = abandon.cancelled() => Err(Abandoned::Stopping),
        }
    }
}

/// The job's context with the bulk recipient's `ref` merged in, as the log row keeps it.
fn context_with_reference(job: &Job) -> Option<Value> {
    merged_context(job.context.as_ref(), job.reference.as_deref())
}

fn merged_context(context: Option<&Value>, reference: Option<&str>) -> Option<Value> {
    match (context, reference) {
        (context, None) => context.cloned(),
        (Some(Value::Object(object)), Some(reference)) => {
            let mut object = object.clone();
            object.insert("ref".into(), Value::String(reference.to_owned()));
            Some(Value::Object(object))
        }
        (_, Some(reference)) => Some(json!({ "ref": reference })),
    }
}

/// A bulk recipient's number as its message has it: E.164, or as given (trimmed) when it
/// cannot be read (its own message then fails with the reason).
fn recipient_number(recipient: &BulkRecipient, country: Option<&str>) -> String {
    PhoneNumber::parse(&recipient.to, country)
        .map(|n| n.as_str().to_owned())
        .unwrap_or_else(|_| recipient.to.trim().to_owned())
}

/// The v1 job for one recipient of an announcement.
/// The announcement in `body` without its first `skip` recipients; everything else as
/// it was.
fn without_first_recipients(body: &[u8], skip: usize) -> Option<Vec<u8>> {
    let mut job: Value = serde_json::from_slice(body).ok()?;
    let Value::Array(recipients) = job.get_mut("recipients")? else {
        return None;
    };
    recipients.drain(..skip.min(recipients.len()));
    serde_json::to_vec(&job).ok()
}

fn child_job(parent: &Job, id: Uuid, to: &str, reference: Option<&str>) -> Vec<u8> {
    let time = |t: Option<OffsetDateTime>| t.and_then(|t| t.format(&Rfc3339).ok());
    let mut child = json!({
        "id": id,
        "type": JobType::Announcement.as_str(),
        "school_id": parent.school_id,
        "to": to,
        "body": parent.body,
    });
    if let Some(context) = &parent.context {
        child["context"] = context.clone();
    }
    if let Some(reference) = reference {
        child["ref"] = Value::String(reference.to_owned());
    }
    if let Some(at) = time(parent.not_before) {
        child["not_before"] = Value::String(at);
    }
    if let Some(at) = time(parent.expires_at) {
        child["expires_at"] = Value::String(at);
    }
    child.to_string().into_bytes()
}
