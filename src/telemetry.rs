//! Logging: `tracing` to stderr, JSON unless stderr is a terminal, filtered by `RUST_LOG`.
//!
//! What never reaches a log line: auth tokens, message bodies, full phone numbers. The
//! code logs masked numbers only; provider error texts pass through
//! [`crate::phone::redact_numbers`] first.

use std::io::IsTerminal;

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

use crate::config::LogFormat;

/// Installs the global subscriber. Safe to call once per process.
pub fn init(format: Option<LogFormat>) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new("info,tokio_postgres=warn,lapin=warn,amq_protocol=warn")
    });
    let format = format.unwrap_or(if std::io::stderr().is_terminal() {
        LogFormat::Pretty
    } else {
        LogFormat::Json
    });
    let registry = tracing_subscriber::registry().with(filter);
    let result = match format {
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .with_current_span(true)
                    .with_span_list(false)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
        LogFormat::Pretty => registry
            .with(fmt::layer().with_target(false).with_writer(std::io::stderr))
            .try_init(),
    };
    // Already installed (e.g. by a test harness): keep that one.
    let _ = result;
}
