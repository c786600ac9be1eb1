//! Logging: `tracing` to stderr, JSON unless stderr is a terminal, filtered by `RUST_LOG`.
//!
//! What never reaches a log line: auth tokens, message bodies, full phone numbers. The
//! code logs masked numbers only; provider error texts pass through
//! [`crate::phone::redact_numbers`] first.

use std::io::IsTerminal;

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

use crate::config::LogFormat;

/// The most that tokio-postgres may log.
const NO_STATEMENT_PARAMETERS: &str = "tokio_postgres=info";

/// Installs the global subscriber. Safe to call once per process.
pub fn init(format: Option<LogFormat>) {
    let mut filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new("info,tokio_postgres=warn,lapin=warn,amq_protocol=warn")
    });
    // At debug, tokio-postgres logs every statement's parameters: bodies and phone
    // numbers. Added last, this directive wins over whatever RUST_LOG says.
    if let Ok(cap) = NO_STATEMENT_PARAMETERS.parse() {
        filter = filter.add_directive(cap);
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_on_tokio_postgres_is_a_valid_directive() {
        assert!(
            NO_STATEMENT_PARAMETERS
                .parse::<tracing_subscriber::filter::Directive>()
                .is_ok()
        );
    }
}
