//! smsgw: the SMS gateway worker of a driving-school platform.
//!
//! Data flows one way, and each outside system sits behind one module:
//!
//! ```text
//! broker (consume) -> job (decode) -> policy (settings, opt-out) -> provider (send)
//!       -> store (record outcome) -> disposition -> broker (ack / retry / dead-letter)
//! ```
//!
//! - [`config`]: settings from the environment, validated at start-up.
//! - [`broker`]: RabbitMQ topology, consuming, confirmed republishing. Only it speaks AMQP.
//! - [`cache`]: school settings in memory, kept current by LISTEN/NOTIFY.
//! - [`circuit`]: the per-provider circuit breaker.
//! - [`job`]: the v1 job format, decoded and validated.
//! - [`phone`]: phone numbers (E.164, masked in logs) and sender IDs.
//! - [`segments`]: GSM-7/UCS-2 encoding and segment counts.
//! - [`policy`]: the pure decision: send, suppress, expire, defer or refuse.
//! - [`provider`]: the adapters (`log`, Twilio) behind one interface.
//! - [`store`]: PostgreSQL: settings, opt-outs, the message log. Only it speaks SQL.
//! - [`disposition`]: what the broker does with a delivery once it is handled.
//! - [`pipeline`]: one delivery through all of the above.
//! - [`daemon`]: wiring, reconnection, graceful shutdown.
//! - [`retention`]: purging old bodies and rows in the background.
//! - [`http`], [`health`], [`metrics`]: `/healthz`, `/readyz`, `/metrics`.
//! - [`webhooks`]: delivery receipts and inbound STOP/START, with signature checks.
//! - [`ops`]: the dead-letter tools and `smsgw check`.
//! - [`systemd`]: the notify protocol (ready, stopping, watchdog).
//! - [`telemetry`]: logging setup; [`cli`]: the command line.

mod acks;
pub mod broker;
pub mod cache;
pub mod circuit;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod disposition;
pub mod health;
pub mod http;
pub mod job;
pub mod metrics;
pub mod ops;
pub mod pace;
pub mod phone;
pub mod pipeline;
pub mod policy;
pub mod provider;
pub mod retention;
pub mod segments;
pub mod store;
pub mod systemd;
pub mod telemetry;
pub mod webhooks;

/// Makes ring the process's TLS crypto provider (reqwest is built without a default; lapin
/// uses ring too, and the database connections name ring themselves). Call before building
/// any HTTP client; calling again is harmless.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
