//! The pipeline: one delivery in, one [`Disposition`] out. It never holds the broker:
//! whatever must be published (a retry, a dead letter, an announcement's recipients) is a
//! disposition that the broker carries out.
//!
//! ```text
//! Delivery ─▶ Job::decode ─▶ log lookup ─▶ settings, recipient, route ─▶ policy::decide
//!    │            │ invalid      │ done before                             │
//!    │            ▼              ▼                                         ▼
//!    │        DeadLetter        Ack       Suppress/Expire ─▶ record ─▶ Ack
//!    │                                    booking cancelled ─▶ record cancelled ─▶ Ack
//!    │                                    Refuse ─▶ record ─▶ DeadLetter
//!    │                                    Defer ─▶ record queued ─▶ Defer
//!    │                                    Send ─▶ guards ─▶ claim ─▶ provider ─▶ record
//!    │                                              │             ─▶ Ack / Retry / DeadLetter
//!    │                                              └ refused ─▶ record suppressed ─▶ Ack
//!    └─ announcement with recipients ─▶ its budget ─▶ queue their rows ─▶ FanOut
//! ```
//!
//! - [`outcome`]: the pure rules: which status, reason and disposition each decision,
//!   provider error and earlier state leads to.
//! - `attempt`: wait for a call slot, claim, call, record; failover.
//! - `reconcile`: ask the provider about an attempt whose outcome is unknown.
//! - `fanout`: an announcement into one message per recipient.
//! - `guard`: the guards against fraud and spend: a message (or an announcement, whole)
//!   admitted past the counts it involves before it is claimed.
//! - `inbox`: the development inbox's copy of each message, whatever its outcome.
//! - `withdraw`: a booking's cancellation withdraws its unsent reminders and
//!   confirmations (before it is sent itself), and those that arrive after it.
//! - [`MessageLog`]: the narrow interface to the message log, with an in-memory
//!   implementation for the unit tests.
//!
//! The pipeline never guesses about the database: a failed write is retried (the delivery
//! held, unsettled) until it works or the daemon gives up at shutdown, and no provider call
//! starts before its attempt row is committed.

mod attempt;
mod fanout;
mod guard;
mod inbox;
mod log;
pub mod outcome;
mod reconcile;
mod withdraw;

#[cfg(test)]
mod guard_tests;
#[cfg(test)]
mod memory;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod withdraw_tests;

use std::{borrow::Cow, collections::HashMap, sync::Arc, time::Duration};

use serde_json::{Value, json};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use self::outcome::{Plan, Seen, Verdict};
pub use self::{
    fanout::FanoutTurns,
    log::{MessageLog, ReconcileLog, SideLog},
};
use crate::{
    broker::Delivery,
    cache::PolicyCache,
    config::{GuardSettings, Settings},
    disposition::{DeadReason, Disposition},
    health::Health,
    job::{self, Job, JobType, Salvaged, Target},
    metrics::Metrics,
    phone::{Country, PhoneNumber, redact_numbers},
    policy::{self, Decision, Facts},
    provider::Gateways,
    provider::{self, Route},
    school::SchoolSettings,
    segments::{Encoding, lookalikes},
    store::{MessageState, NewMessage, RejectedJob, Status, Store, UnknownAttempt},
};

/// Namespace of the ids of `job.rejected` events (any constant unique to smsgw).
const REJECTED: Uuid = Uuid::from_u128(0x736d_7367_7700_4a4f_4252_454a_4543_5444);

/// A `job.rejected` event's id, derived from the delivery's AMQP message id and bytes: the
/// same for every copy of one rejection, different for two jobs that differ in either.
fn rejection_id(delivery: &Delivery) -> Uuid {
    let mut name = delivery.message_id.clone().unwrap_or_default().into_bytes();
    name.push(0);
    name.extend_from_slice(&delivery.body);
    Uuid::new_v5(&REJECTED, &name)
}

/// What the pipeline needs from the configuration.
#[derive(Debug, Clone)]
pub struct PipelineSettings {
    pub max_attempts: u32,
    pub retry_delays: Vec<Duration>,
    pub redirect_to: Option<PhoneNumber>,
    pub provider_timeout: Duration,
    pub unknown_outcome: UnknownOutcome,
    /// Most segments a text of a type may have.
    pub max_segments: HashMap<JobType, u32>,
    /// Recipients of an announcement fanned out per turn in the bulk lane.
    pub fanout_chunk: usize,
    /// Largest job body decoded; a larger one is dead-lettered unread.
    pub max_job_bytes: usize,
    /// The types that wait out a school's quiet hours.
    pub quiet_types: Vec<JobType>,
    /// How long after publication a job of a type without `expires_at` expires.
    pub default_expiry: HashMap<JobType, Duration>,
    /// The account's guards against fraud and spend.
    pub guards: GuardSettings,
    /// How long after a booking's cancellation its reminders and confirmations that
    /// arrive are withdrawn.
    pub withdraw_window: Duration,
    /// Replace GSM-7 look-alikes (curly quotes, dashes) when that makes the text GSM-7.
    pub smart_encoding: bool,
    /// Countries whose carriers refuse alphanumeric senders.
    pub alphanumeric_refused: Vec<Country>,
}

impl PipelineSettings {
    /// Three attempts, tiers of 10 s and 1 min, a 5 s provider timeout: for unit tests.
    #[cfg(test)]
    pub(crate) fn example() -> Self {
        PipelineSettings {
            max_attempts: 3,
            retry_delays: vec![Duration::from_secs(10), Duration::from_secs(60)],
            redirect_to: None,
            provider_timeout: Duration::from_secs(5),
            unknown_outcome: UnknownOutcome::Resend,
            max_segments: HashMap::new(),
            fanout_chunk: 100,
            max_job_bytes: 64 * 1024,
            quiet_types: vec![JobType::BookingReminder],
            default_expiry: HashMap::from([(JobType::LoginCode, Duration::from_secs(900))]),
            guards: GuardSettings::default(),
            withdraw_window: Duration::from_secs(30 * 86_400),
            smart_encoding: true,
            alphanumeric_refused: ["US", "CA"]
                .into_iter()
                .filter_map(Country::parse)
                .collect(),
        }
    }

    /// How long an attempt may still be running in another process: a claim older than
    /// this was cut off, and a message busy elsewhere is looked at again after it.
    pub fn recheck_after(&self) -> Duration {
        self.provider_timeout * 2
    }
}

impl From<&Settings> for PipelineSettings {
    /// The parts of each concern's settings that one delivery needs.
    fn from(settings: &Settings) -> Self {
        let delivery = &settings.delivery;
        PipelineSettings {
            max_attempts: delivery.max_attempts,
            retry_delays: settings.broker.retry_delays.clone(),
            redirect_to: delivery.redirect_to.clone(),
            provider_timeout: delivery.provider_timeout,
            max_segments: delivery.max_segments.clone(),
            fanout_chunk: settings.lanes.fanout_chunk,
            max_job_bytes: settings.lanes.max_job_bytes,
            quiet_types: settings.schedule.quiet_types.clone(),
            default_expiry: settings.schedule.default_expiry.clone(),
            guards: settings.guards.clone(),
            withdraw_window: settings.schedule.withdraw_window,
            smart_encoding: delivery.smart_encoding,
            alphanumeric_refused: delivery.alphanumeric_refused.clone(),
            unknown_outcome: if delivery.resend_unknown {
                UnknownOutcome::Resend
            } else {
                UnknownOutcome::DeadLetter
            },
        }
    }
}

/// What to do when an attempt's outcome is unknown and the provider cannot be asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnknownOutcome {
    /// Send again, and count it as a possible duplicate.
    Resend,
    /// Dead-letter it for a human to decide.
    DeadLetter,
}

/// What the log knew about the message before this delivery.
#[derive(Debug, Clone, Default)]
struct Prior {
    /// An attempt left open by a crash, to take over.
    take_over: Option<i32>,
    /// An attempt whose outcome is unknown, to reconcile before sending again.
    unknown: Option<UnknownAttempt>,
}

/// Why the pipeline gave up on a database write.
#[derive(Debug)]
pub enum Abandoned {
    /// The daemon is stopping: the delivery is left for the broker to deliver again.
    Stopping,
    /// PostgreSQL refused the message's data itself (a data exception): no retry can
    /// record it, so the job is dead-lettered with the database's error.
    Unrecordable(String),
}

/// A message's row as the log first records it, before it is sent or settled.
struct Draft {
    recipient: String,
    context: Option<Value>,
    segments: Option<i32>,
    encoding: Encoding,
    provider: &'static str,
}

/// One message on its way through the pipeline: what every step needs.
struct Message<'a> {
    delivery: &'a Delivery,
    job: &'a Job,
    row: NewMessage<'a>,
    /// The provider it is recorded with, as metrics label it.
    label: &'static str,
    abandon: &'a CancellationToken,
}

pub struct Pipeline<L = Store> {
    log: L,
    cache: PolicyCache,
    gateways: Arc<Gateways>,
    settings: PipelineSettings,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
}

impl<L: MessageLog> Pipeline<L> {
    pub fn new(
        log: L,
        cache: PolicyCache,
        gateways: Arc<Gateways>,
        settings: PipelineSettings,
        health: Arc<Health>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Pipeline {
            log,
            cache,
            gateways,
            settings,
            health,
            metrics,
        }
    }

    /// Handles one delivery. `abandon` fires when the daemon must stop waiting for the
    /// database; the delivery is then left unsettled for the broker to deliver again.
    pub async fn handle(&self, delivery: &Delivery, abandon: &CancellationToken) -> Disposition {
        let decoded = job::check_size(&delivery.body, self.settings.max_job_bytes)
            .and_then(|()| Job::decode(&delivery.body));
        let job = match decoded {
            Ok(job) if self.settings.smart_encoding => smart_encoded(job),
            Ok(job) => job,
            Err(invalid) => {
                return match self.invalid(delivery, &invalid.to_string(), abandon).await {
                    Ok(done) => done,
                    Err(abandoned) => self.abandoned(abandoned, delivery, None).await,
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
            let now = OffsetDateTime::now_utc();
            if let Some(early) = outcome::came_back_early(delivery.retry_at, now, job.kind) {
                return early;
            }
            let handled = match &job.target {
                Target::Many(recipients) => self.fan_out(delivery, &job, recipients, abandon).await,
                Target::One(to) => self.handle_one(delivery, &job, to, abandon).await,
            };
            match handled {
                Ok(done) => done,
                Err(abandoned) => self.abandoned(abandoned, delivery, Some(&job)).await,
            }
        }
        .instrument(span)
        .await
    }

    /// One message to one recipient: decide, then record the outcome or send.
    async fn handle_one(
        &self,
        delivery: &Delivery,
        job: &Job,
        to: &str,
        abandon: &CancellationToken,
    ) -> Result<Disposition, Abandoned> {
        let prior = match self.look_back(delivery, job, abandon).await? {
            Ok(prior) => prior,
            Err(done) => return Ok(done),
        };
        let settings = self.school_settings(job.school_id, abandon).await?;
        let (decision, draft) = self.decide(delivery, job, to, settings.as_deref());
        tracing::Span::current().record("provider", draft.provider);
        let message = Message {
            delivery,
            job,
            row: new_message(delivery, job, &draft),
            label: draft.provider,
            abandon,
        };
        self.keep_in_inbox(&message, &decision, settings.as_deref())
            .await?;
        let plan = if self.withdrawn(job, abandon).await? {
            Plan::Record(outcome::withdrawn())
        } else {
            outcome::plan(decision, job.kind, delivery.attempts)
        };
        match plan {
            Plan::Send {
                to,
                sender,
                sender_number,
                route,
            } => {
                if let Some(refused) = self.guard(&message, &to, settings.as_deref()).await? {
                    return self.record_without_call(&message, refused).await;
                }
                let senders = (sender.as_ref(), sender_number.as_ref());
                let out = self.outgoing(message, &to, senders);
                self.send(&out, prior, &route).await
            }
            Plan::Record(verdict) => self.record_without_call(&message, verdict).await,
        }
    }

    /// A delivery with a history looks at the log first, to take over or reconcile an
    /// attempt. A fresh publish needs no look: the claim itself finds a job that was done
    /// or is in flight. `Err` settles the delivery now.
    async fn look_back(
        &self,
        delivery: &Delivery,
        job: &Job,
        abandon: &CancellationToken,
    ) -> Result<Result<Prior, Disposition>, Abandoned> {
        if !delivery.has_history() {
            return Ok(Ok(Prior::default()));
        }
        let Some(state) = self
            .persist(abandon, || self.log.message_state(job.id))
            .await?
        else {
            return Ok(Ok(Prior::default()));
        };
        let take_over = match self.seen_before(delivery, job, &state) {
            Some(done) => return Ok(Err(done)),
            None => (state.status == Status::Sending).then_some(state.attempts),
        };
        Ok(Ok(Prior {
            take_over,
            unknown: state.unknown_attempt,
        }))
    }

    /// The job's own `expires_at`, else its type's default expiry counted from when it
    /// was published (or first seen).
    fn expires_at(&self, delivery: &Delivery, job: &Job) -> Option<OffsetDateTime> {
        job.expires_at.or_else(|| {
            let after = self.settings.default_expiry.get(&job.kind)?;
            Some(delivery.first_seen + *after)
        })
    }

    /// The policy's decision, and the row the log keeps for the message whatever it is.
    fn decide(
        &self,
        delivery: &Delivery,
        job: &Job,
        to: &str,
        settings: Option<&SchoolSettings>,
    ) -> (Decision<Route>, Draft) {
        let country = settings.and_then(|s| s.country.as_deref());
        let recipient = PhoneNumber::parse(to, country);
        let segmentation = crate::segments::segment(&job.body);
        let segments = segmentation.segments;
        let route = provider::route(settings, &self.gateways);
        let decision = policy::decide(
            job.kind,
            job.not_before,
            self.expires_at(delivery, job),
            &Facts {
                settings,
                recipient: &recipient,
                route: &route,
                segments,
                max_segments: self.settings.max_segments.get(&job.kind).copied(),
                quiet_types: &self.settings.quiet_types,
                allowed_countries: &self.settings.guards.allowed_countries,
                now: OffsetDateTime::now_utc(),
            },
        );
        let draft = Draft {
            recipient: match &recipient {
                Ok(number) => number.as_str().to_owned(),
                Err(_) => to.trim().to_owned(),
            },
            context: merged_context(job.context.as_ref(), job.reference.as_deref()),
            segments: i32::try_from(segments).ok(),
            encoding: segmentation.encoding,
            provider: self.provider_label(&route),
        };
        (decision, draft)
    }

    /// Records an outcome reached without a provider call: suppressed, expired, refused,
    /// or queued until `not_before`.
    async fn record_without_call(
        &self,
        message: &Message<'_>,
        verdict: Verdict,
    ) -> Result<Disposition, Abandoned> {
        let Message { delivery, job, .. } = *message;
        verdict.log();
        let found = self
            .persist(message.abandon, || {
                self.log
                    .record_without_call(&message.row, verdict.status, Some(verdict.reason))
            })
            .await?;
        match found {
            None => {
                self.count(verdict.status.as_str(), job.kind, message.label);
                if verdict.status == Status::Suppressed {
                    self.metrics.count_suppressed(verdict.reason);
                }
                Ok(verdict.disposition)
            }
            Some(state) => Ok(self
                .seen_before(delivery, job, &state)
                .unwrap_or(verdict.disposition)),
        }
    }

    /// Decides a delivery of a job the log already knows: done (ack), in flight elsewhere
    /// (ack, or wait and look again), or `None` to carry on.
    fn seen_before(
        &self,
        delivery: &Delivery,
        job: &Job,
        state: &MessageState,
    ) -> Option<Disposition> {
        let label = self.gateways.default_gateway().name;
        let recheck = self.settings.recheck_after();
        match outcome::seen(delivery, state, OffsetDateTime::now_utc(), recheck) {
            Seen::Done => {
                self.count("duplicate", job.kind, label);
                tracing::info!(
                    status = state.status.as_str(),
                    "already handled; acked without a second provider call"
                );
                Some(Disposition::Ack)
            }
            Seen::InFlight => {
                // That delivery is unacked, so the broker keeps it until it has an outcome.
                self.count("duplicate", job.kind, label);
                tracing::info!("duplicate of a message in flight; acked");
                Some(Disposition::Ack)
            }
            Seen::MayStillRun => {
                // The copy that comes back is marked requeued: not taken for a duplicate.
                tracing::info!("redelivered while an attempt may still be running; waiting");
                Some(outcome::look_again(recheck, delivery.attempts, job.kind))
            }
            Seen::CutOff => {
                tracing::warn!(
                    attempt = state.attempts,
                    "an attempt was cut off without an outcome (crash?); trying again"
                );
                None
            }
            Seen::Open => None,
        }
    }

    /// A job that cannot be decoded: dead-lettered, once its `job.rejected` event is
    /// written (so that the web app learns of it without reading `sms.dead`).
    async fn invalid(
        &self,
        delivery: &Delivery,
        error: &str,
        abandon: &CancellationToken,
    ) -> Result<Disposition, Abandoned> {
        let salvaged = Salvaged::of(
            &delivery.body,
            self.settings.max_job_bytes,
            delivery.message_id.as_deref(),
        );
        self.reject(delivery, &salvaged, error, Some(abandon))
            .await?;
        let message_id: String = delivery
            .message_id
            .as_deref()
            .unwrap_or("-")
            .chars()
            .take(64)
            .collect();
        tracing::warn!(
            lane = delivery.lane.as_str(),
            message_id = %redact_numbers(&message_id),
            error = %error,
            "invalid job dead-lettered"
        );
        let default = self.gateways.default_gateway().name;
        self.metrics.count_message("invalid", "unknown", default);
        Ok(outcome::invalid(error, delivery.attempts))
    }

    /// Writes a job's `job.rejected` event. Its id is the same for every copy of one
    /// delivery's rejection, so the web app can drop the copies a redelivery writes.
    /// `abandon`: `None` tries once only.
    async fn reject(
        &self,
        delivery: &Delivery,
        salvaged: &Salvaged,
        error: &str,
        abandon: Option<&CancellationToken>,
    ) -> Result<(), Abandoned> {
        let error: String = redact_numbers(error).chars().take(1_000).collect();
        let rejected = RejectedJob {
            event_id: rejection_id(delivery),
            job_id: salvaged.id,
            kind: salvaged.kind.as_deref(),
            school_id: salvaged.school_id,
            reason: DeadReason::InvalidJob.as_str(),
            error: &error,
        };
        match abandon {
            Some(abandon) => {
                self.persist(abandon, || self.log.reject_job(&rejected))
                    .await
            }
            None => self.log.reject_job(&rejected).await.map_err(|e| {
                tracing::warn!(error = %e, "could not write the job.rejected event of a refused job");
                Abandoned::Stopping
            }),
        }
    }

    /// A database write given up on. The data the database refused makes the job
    /// invalid: its `job.rejected` event is written, if the database takes that.
    async fn abandoned(
        &self,
        abandoned: Abandoned,
        delivery: &Delivery,
        job: Option<&Job>,
    ) -> Disposition {
        if let Abandoned::Unrecordable(error) = &abandoned {
            tracing::error!(error = %redact_numbers(error), "the database refused the message's data; dead-lettered");
            if let Some(job) = job {
                let salvaged = Salvaged {
                    id: Some(job.id),
                    kind: Some(job.kind.as_str().to_owned()),
                    school_id: Some(job.school_id),
                };
                let error = format!("the database refused the message's data: {error}");
                // Once only: the message is dead-lettered whether or not this is written.
                let _ = self.reject(delivery, &salvaged, &error, None).await;
            }
        }
        outcome::abandoned(abandoned, delivery.attempts)
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
            .persist(abandon, || self.log.school_settings(school_id))
            .await?
            .map(Arc::new))
    }

    /// The provider a message is recorded with: its route's primary, or the default when
    /// the school names one that is not configured.
    fn provider_label(&self, route: &Result<Route, String>) -> &'static str {
        match route {
            Ok(route) => route.primary.name,
            Err(_) => self.gateways.default_gateway().name,
        }
    }

    fn count(&self, outcome: &'static str, kind: JobType, provider: &'static str) {
        self.metrics.count_message(outcome, kind.as_str(), provider);
    }
}

/// The job with the text as it is sent: every later step (segments, the log, the inbox,
/// the provider) sees that text, and a copy is made only when a character is replaced.
fn smart_encoded(mut job: Job) -> Job {
    if let Cow::Owned(text) = lookalikes::smart_encode(&job.body) {
        job.body = text;
    }
    job
}

fn new_message<'a>(delivery: &Delivery, job: &'a Job, draft: &'a Draft) -> NewMessage<'a> {
    NewMessage {
        id: job.id,
        bulk_id: delivery.bulk_id,
        school_id: job.school_id,
        kind: job.kind,
        recipient: &draft.recipient,
        body: &job.body,
        context: draft.context.as_ref(),
        provider: draft.provider,
        segments: draft.segments,
        encoding: Some(draft.encoding),
        reopen_failed: delivery.replayed,
    }
}

/// The job's context with a recipient's `ref` merged in, as the log row keeps it.
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
