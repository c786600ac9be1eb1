//! smsgw: the SMS gateway worker of a driving-school platform.
//!
//! Data flows one way, and each outside system sits behind one module:
//!
//! ```text
//!            ┌──────────────────────────── pipeline ─────────────────────────────┐
//! broker ──▶ │ job::decode ─▶ policy::decide ─▶ provider (send) ─▶ outcome       │ ──▶ Disposition
//! (Delivery) │                  ▲  settings        │                 │           │        │
//!            │                cache            store (claim, record: MessageLog) │        ▼
//!            └───────────────────────────────────────────────────────────────────┘  broker (ack,
//!                                                                       retry, dead-letter, fan-out)
//! ```
//!
//! - [`config`]: settings from the environment, validated at start-up.
//! - [`broker`]: RabbitMQ: topology, deliveries as plain data, confirmed publishing,
//!   carrying out a [`disposition::Disposition`], dead letters. Only it speaks AMQP.
//! - [`job`]: the v1 job format, decoded, validated and encoded.
//! - [`policy`]: the pure decision: send (by which route), suppress, expire, defer,
//!   hold for the school's quiet hours, or refuse.
//! - [`provider`]: the adapters (`log`, the development `inbox`, Twilio, Vonage), each
//!   behind a gateway with its circuit breaker, pace and call slots.
//! - [`pipeline`]: one delivery in, one disposition out; its rules are pure functions in
//!   [`pipeline::outcome`], and it reaches the log through [`pipeline::MessageLog`].
//! - [`store`]: PostgreSQL: settings, opt-outs, the message log, and the outbox of status
//!   events that triggers fill in each status change's transaction. Only it speaks SQL.
//! - [`events`]: the relay that publishes the outbox's status events to `sms.events`.
//! - [`cache`]: school settings in memory, kept current by LISTEN/NOTIFY.
//! - [`disposition`]: what the broker does with a delivery once it is handled.
//! - [`phone`]: phone numbers (E.164, masked in logs) and sender IDs.
//! - [`segments`]: GSM-7/UCS-2 encoding and segment counts.
//! - [`daemon`]: wiring, reconnection, graceful shutdown.
//! - [`retry`]: the one way to wait and try again.
//! - [`retention`]: purging old bodies, rows, webhook ids and dead letters in the background.
//! - [`http`]: `/healthz`, `/readyz`, `/metrics` and the webhooks (delivery receipts,
//!   inbound STOP/START, with signature checks); `/inbox` with the inbox provider.
//! - [`ops`]: the dead-letter tools, a message's record, support lookups, usage for
//!   billing and `smsgw check`.
//! - [`systemd`]: the notify protocol (ready, stopping, watchdog).
//! - [`telemetry`]: logging setup; [`cli`]: the command line.

pub mod broker;
pub mod cache;
pub mod callbacks;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod disposition;
pub mod events;
pub mod health;
pub mod http;
pub mod job;
pub mod metrics;
pub mod ops;
pub mod phone;
pub mod pipeline;
pub mod policy;
pub mod provider;
pub mod retention;
pub mod retry;
pub mod school;
pub mod segments;
pub mod store;
pub mod systemd;
pub mod telemetry;

/// Makes ring the process's TLS crypto provider (reqwest is built without a default; lapin
/// uses ring too, and the database connections name ring themselves). Call before building
/// any HTTP client; calling again is harmless.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
