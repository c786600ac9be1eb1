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
//! The layers, lowest first. A module imports only from rows below its own (never from
//! its own row or above), so each can be read, and tested, knowing nothing of what sits
//! on it; `tests/layers.rs` reads this table and holds the code to it.
//!
//! ```text
//! 1  job phone segments retry health systemd                values and leaf tools, no I/O of ours
//! 2  config school disposition                              settings; a school's row; a broker action
//! 3  store broker policy telemetry                          the outside systems; the pure decision
//! 4  provider cache metrics                                 adapters and their clocks; what we count
//! 5  pipeline callbacks events retention overdue ops        the work: deliveries, callbacks, relays
//! 6  http                                                   the HTTP surface
//! 7  daemon                                                 wiring, reconnection, shutdown
//! 8  cli                                                    the command line
//! ```
//!
//! - [`job`]: the v1 job format, decoded, validated and encoded.
//! - [`phone`]: phone numbers (E.164, masked in logs) and sender IDs.
//! - [`segments`]: GSM-7/UCS-2 encoding and segment counts; smart encoding of look-alikes.
//! - [`retry`]: the one way to wait and try again.
//! - [`health`]: what the daemon is connected to, for `/readyz`.
//! - [`systemd`]: the notify protocol (ready, stopping, watchdog).
//! - [`config`]: settings from the environment, validated at start-up.
//! - [`school`]: a school's settings as values, and its quiet hours.
//! - [`disposition`]: what the broker does with a delivery once it is handled.
//! - [`store`]: PostgreSQL: settings, opt-outs, the message log, and the outbox of status
//!   events that triggers fill in each status change's transaction. Only it speaks SQL.
//! - [`broker`]: RabbitMQ: topology, deliveries as plain data, confirmed publishing,
//!   carrying out a [`disposition::Disposition`], dead letters. Only it speaks AMQP.
//! - [`policy`]: the pure decision: send (by the route it is given), suppress, expire,
//!   defer, hold for the school's quiet hours, or refuse; and which of the guards' counts
//!   (login codes per number, texts abroad per day, a school's budget) a message involves;
//!   the sender a destination's carriers accept.
//! - [`telemetry`]: logging setup.
//! - [`provider`]: the adapters (`log`, the development `inbox`, Twilio, Vonage), each
//!   behind a gateway with its circuit breaker, pace and call slots; each reads its own
//!   callbacks; [`provider::route`] picks a school's gateways.
//! - [`cache`]: school settings in memory, kept current by LISTEN/NOTIFY.
//! - [`metrics`]: the Prometheus metrics every part reports to.
//! - [`pipeline`]: one delivery in, one disposition out; its rules are pure functions in
//!   [`pipeline::outcome`], and it reaches the log through [`pipeline::MessageLog`].
//! - [`callbacks`]: what a provider's receipt or inbound text (keyword or reply) does, and
//!   the development inbox's simulated receipts.
//! - [`events`]: the relay that publishes the outbox's events (status changes, replies,
//!   rejected jobs) to `sms.events`.
//! - [`retention`]: purging old bodies, rows, webhook ids and dead letters in the background.
//! - [`overdue`]: giving up, as `undelivered`, sent messages whose receipt never came.
//! - [`ops`]: the dead-letter tools, a message's record, support lookups, usage for
//!   billing and `smsgw check`.
//! - [`http`]: `/healthz`, `/readyz`, `/metrics` and the providers' webhooks; `/inbox`
//!   with the inbox provider.
//! - [`daemon`]: wiring, reconnection, graceful shutdown.
//! - [`cli`]: the command line.

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
pub mod overdue;
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
