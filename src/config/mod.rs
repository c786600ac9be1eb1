//! Settings from the environment (`SMSGW_*`, `TWILIO_*`), validated once at start-up.
//!
//! Everything that can be wrong with the configuration is found here, before the daemon
//! touches the broker, so that a bad deployment fails fast with exit code 2 and a message
//! that names the variable.
//!
//! [`Settings`] holds one struct per concern, each read in its own file and handed whole
//! to the part of the daemon it configures: [`BrokerSettings`], [`StoreSettings`],
//! [`HttpSettings`], [`DeliverySettings`], [`LaneSettings`], [`ScheduleSettings`],
//! [`InboundSettings`], [`ReceiptWatch`], [`RetentionSettings`], [`EventSettings`] and
//! [`GuardSettings`].

use std::collections::HashMap;

mod broker;
mod delivery;
mod events;
mod guards;
mod http;
mod inbound;
mod lanes;
mod parse;
mod provider_file;
mod providers;
mod receipts;
mod retention;
mod schedule;
mod senders;
mod service_url;
mod store;

pub use broker::{BrokerSettings, parse_delays};
pub use delivery::DeliverySettings;
pub use events::{DEFAULT_MAX_BACKLOG, EventSettings};
pub use guards::{GuardSettings, RateWindow};
pub use http::{HttpLimits, HttpSettings};
pub use inbound::{InboundSettings, Keyword, Keywords};
pub use lanes::{DEFAULT_MAX_JOB_BYTES, LaneSettings};
pub use receipts::ReceiptWatch;
pub use retention::RetentionSettings;
pub use schedule::ScheduleSettings;
pub use service_url::ServiceUrl;
pub(crate) use service_url::redact_url;
pub use store::StoreSettings;

pub use providers::{
    DEFAULT_TWILIO_BASE_URL, DEFAULT_VONAGE_BASE_URL, ProviderKindSettings, ProviderSettings,
    SignatureMethod, TwilioSender, TwilioSettings, VonageSettings,
};

/// Where this daemon runs; decides what is allowed to reach a real phone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Environment {
    Development,
    Staging,
    Production,
}

impl Environment {
    pub fn as_str(self) -> &'static str {
        match self {
            Environment::Development => "development",
            Environment::Staging => "staging",
            Environment::Production => "production",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Pretty,
    Json,
}

/// All of smsgw's settings, by concern.
#[derive(Debug, Clone)]
pub struct Settings {
    pub env: Environment,
    pub log_format: Option<LogFormat>,
    pub broker: BrokerSettings,
    pub store: StoreSettings,
    pub http: HttpSettings,
    pub delivery: DeliverySettings,
    pub lanes: LaneSettings,
    /// Quiet hours, default expiry, withdrawal after a cancellation.
    pub schedule: ScheduleSettings,
    /// Keywords and replies.
    pub inbound: InboundSettings,
    /// When a sent message stops waiting for its delivery receipt.
    pub receipts: ReceiptWatch,
    pub retention: RetentionSettings,
    /// Status events: on or off, and the outbox's bound.
    pub events: EventSettings,
    /// The account's guards against fraud and spend.
    pub guards: GuardSettings,
}

/// A configuration problem, naming the variable. Exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{variable}: {problem}")]
pub struct ConfigError {
    pub variable: &'static str,
    pub problem: String,
}

pub(crate) fn bad(variable: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError {
        variable,
        problem: problem.into(),
    }
}

/// Every environment variable smsgw reads (besides `RUST_LOG`).
pub const VARIABLES: &[&str] = &[
    "SMSGW_ENV",
    "SMSGW_AMQP_URL",
    "SMSGW_BROKER_CONNECT_TIMEOUT",
    "SMSGW_DATABASE_URL",
    "SMSGW_DATABASE_TIMEOUT",
    "SMSGW_MIGRATE_LOCK_TIMEOUT",
    "SMSGW_HTTP_ADDR",
    "SMSGW_HTTP_HEADER_TIMEOUT",
    "SMSGW_HTTP_MAX_CONNECTIONS",
    "SMSGW_INBOX_HOSTS",
    "SMSGW_PUBLIC_URL",
    "SMSGW_PROVIDER",
    "SMSGW_REDIRECT_TO",
    "TWILIO_ACCOUNT_SID",
    "TWILIO_AUTH_TOKEN",
    "TWILIO_FROM",
    "TWILIO_MESSAGING_SERVICE_SID",
    "SMSGW_TWILIO_BASE_URL",
    "SMSGW_MAX_ATTEMPTS",
    "SMSGW_RETRY_DELAYS",
    "SMSGW_PROVIDER_TIMEOUT",
    "SMSGW_URGENT_CONCURRENCY",
    "SMSGW_DEFAULT_CONCURRENCY",
    "SMSGW_BULK_CONCURRENCY",
    "SMSGW_DELIVERY_LIMIT",
    "SMSGW_SHUTDOWN_GRACE",
    "SMSGW_RATE_LIMIT",
    "SMSGW_BODY_RETENTION",
    "SMSGW_LOG_RETENTION",
    "SMSGW_DEAD_RETENTION",
    "SMSGW_KEEP_BODY",
    "SMSGW_RETENTION_INTERVAL",
    "SMSGW_LOG_FORMAT",
    "SMSGW_UNKNOWN_OUTCOME",
    "SMSGW_CIRCUIT_THRESHOLD",
    "SMSGW_CIRCUIT_COOLDOWN",
    "SMSGW_CONFIG",
    "SMSGW_MAX_SEGMENTS",
    "SMSGW_FANOUT_CHUNK",
    "SMSGW_MAX_JOB_BYTES",
    "SMSGW_FANOUT_CONCURRENCY",
    "SMSGW_PROVIDER_CONCURRENCY",
    "SMSGW_EVENTS",
    "SMSGW_EVENTS_MAX_BACKLOG",
    "SMSGW_SMART_ENCODING",
    "SMSGW_SENDER_COUNTRIES_FILE",
    "SMSGW_QUIET_TYPES",
    "SMSGW_DEFAULT_EXPIRY",
    "SMSGW_OPT_OUT_KEYWORDS",
    "SMSGW_OPT_IN_KEYWORDS",
    "SMSGW_REPLY_WINDOW",
    "SMSGW_RECEIPT_TIMEOUT",
    "SMSGW_WITHDRAW_WINDOW",
    "SMSGW_ALLOWED_COUNTRIES",
    "SMSGW_LOGIN_CODE_LIMIT",
    "SMSGW_INTERNATIONAL_DAILY_LIMIT",
    "SMSGW_BUDGET_EXEMPT_TYPES",
    "VONAGE_API_KEY",
    "VONAGE_API_SECRET",
    "VONAGE_FROM",
    "VONAGE_SIGNATURE_SECRET",
    "VONAGE_SIGNATURE_METHOD",
    "SMSGW_VONAGE_BASE_URL",
];

impl Settings {
    /// Reads the process environment, for the daemon: every rule about where messages may
    /// go is enforced.
    pub fn from_env() -> Result<Self, ConfigError> {
        let vars: HashMap<String, String> = std::env::vars().collect();
        Self::from_lookup(|name| vars.get(name).cloned())
    }

    /// Reads the process environment for a tool that sends nothing itself (`migrate`,
    /// `send`): the provider settings are not required, so ops can migrate before the
    /// provider's credentials exist.
    pub fn from_env_for_tools() -> Result<Self, ConfigError> {
        let vars: HashMap<String, String> = std::env::vars().collect();
        Self::read(|name| vars.get(name).cloned(), false)
    }

    /// Reads settings through `lookup`, so tests can build settings without touching the
    /// process environment. Empty values count as unset.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        Self::read(lookup, true)
    }

    fn read(lookup: impl Fn(&str) -> Option<String>, delivery: bool) -> Result<Self, ConfigError> {
        let get = |name: &str| {
            if !delivery && is_delivery_variable(name) {
                return None;
            }
            lookup(name).filter(|v| !v.trim().is_empty())
        };
        let env = environment(&get)?;
        // Fields are evaluated in the order written, which decides which of several bad
        // variables is reported: where messages go first.
        Ok(Settings {
            env,
            delivery: delivery::delivery(&get, env, delivery)?,
            http: http::http(&get, env, delivery)?,
            broker: broker::broker(&get)?,
            lanes: lanes::lanes(&get)?,
            log_format: log_format(&get)?,
            retention: retention::retention(&get)?,
            store: store::store(&get)?,
            events: events::events(&get)?,
            schedule: schedule::schedule(&get)?,
            inbound: inbound::inbound(&get)?,
            guards: guards::guards(&get)?,
            receipts: ReceiptWatch::parse(get("SMSGW_RECEIPT_TIMEOUT").as_deref())?,
        })
    }

    /// One line that says where messages will really go. Printed at start-up in every mode.
    pub fn destination_summary(&self) -> String {
        self.delivery.destination(self.env, self.http.addr)
    }
}

fn environment(get: &impl Fn(&str) -> Option<String>) -> Result<Environment, ConfigError> {
    match get("SMSGW_ENV").as_deref() {
        None | Some("development") => Ok(Environment::Development),
        Some("staging") => Ok(Environment::Staging),
        Some("production") => Ok(Environment::Production),
        Some(other) => Err(bad(
            "SMSGW_ENV",
            format!("'{other}' is not one of development, staging, production"),
        )),
    }
}

fn log_format(get: &impl Fn(&str) -> Option<String>) -> Result<Option<LogFormat>, ConfigError> {
    match get("SMSGW_LOG_FORMAT").as_deref() {
        None => Ok(None),
        Some("pretty") => Ok(Some(LogFormat::Pretty)),
        Some("json") => Ok(Some(LogFormat::Json)),
        Some(other) => Err(bad(
            "SMSGW_LOG_FORMAT",
            format!("'{other}' is not one of pretty, json"),
        )),
    }
}

/// Variables that decide where messages go; tools that send nothing ignore them.
fn is_delivery_variable(name: &str) -> bool {
    matches!(
        name,
        "SMSGW_PROVIDER" | "SMSGW_REDIRECT_TO" | "SMSGW_CONFIG" | "SMSGW_MAX_SEGMENTS"
    ) || name.starts_with("TWILIO_")
        || name.starts_with("VONAGE_")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Settings read from `pairs` alone, as the daemon reads them.
    pub(super) fn settings(pairs: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Settings::from_lookup(|k| map.get(k).cloned())
    }

    pub(super) const SID: &str = "AC0123456789abcdef0123456789abcdef";

    /// Twilio at its real API, with credentials, in `env`.
    pub(super) fn real_twilio(env: &'static str) -> Vec<(&'static str, &'static str)> {
        vec![
            ("SMSGW_ENV", env),
            ("SMSGW_PROVIDER", "twilio"),
            ("TWILIO_ACCOUNT_SID", SID),
            ("TWILIO_AUTH_TOKEN", "secret"),
            ("TWILIO_FROM", "+15005550006"),
        ]
    }

    #[test]
    fn status_events_are_on_unless_turned_off() {
        assert!(settings(&[]).expect("defaults").events.on);
        assert!(!settings(&[("SMSGW_EVENTS", "off")]).expect("off").events.on);
        let error = settings(&[("SMSGW_EVENTS", "sometimes")]).expect_err("refused");
        assert_eq!(error.variable, "SMSGW_EVENTS");
        let quiet = settings(&[("SMSGW_QUIET_TYPES", "login_code")]).expect_err("refused");
        assert_eq!(quiet.variable, "SMSGW_QUIET_TYPES");
    }

    #[test]
    fn development_defaults_to_the_inbox_and_staging_to_the_log() {
        let s = settings(&[]).expect("defaults are valid");
        assert_eq!(s.env, Environment::Development);
        assert_eq!(s.delivery.default_provider, "inbox");
        assert_eq!(s.delivery.max_attempts, 6);
        assert_eq!(s.broker.retry_delays.len(), 5);
        assert_eq!(
            s.destination_summary(),
            "development: provider 'inbox': messages are kept in the inbox at \
             http://127.0.0.1:9464/inbox, none is sent"
        );
        let staging = settings(&[("SMSGW_ENV", "staging")]).expect("valid");
        assert_eq!(staging.delivery.default_provider, "log");
        assert!(staging.destination_summary().contains("none is sent"));
    }

    #[test]
    fn tools_do_not_need_provider_credentials() {
        let vars: HashMap<String, String> =
            [("SMSGW_ENV", "production"), ("SMSGW_PROVIDER", "twilio")]
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
        let s = Settings::read(|k| vars.get(k).cloned(), false).expect("tools need no provider");
        assert_eq!(s.env, Environment::Production);
    }

    #[test]
    fn every_variable_read_is_listed_and_documented() {
        let seen = std::sync::Mutex::new(std::collections::BTreeSet::new());
        let values: HashMap<&str, &str> = [
            ("SMSGW_PROVIDER", "twilio"),
            ("TWILIO_ACCOUNT_SID", SID),
            ("TWILIO_AUTH_TOKEN", "secret"),
            ("TWILIO_FROM", "+15005550006"),
            ("SMSGW_TWILIO_BASE_URL", "http://127.0.0.1:1"),
            ("SMSGW_RATE_LIMIT", "10"),
            ("SMSGW_LOG_RETENTION", "90d"),
        ]
        .into_iter()
        .collect();
        Settings::from_lookup(|name| {
            seen.lock().expect("lock").insert(name.to_owned());
            values.get(name).map(|v| v.to_string())
        })
        .expect("valid");
        let seen = seen.into_inner().expect("lock");
        for name in &seen {
            assert!(
                VARIABLES.contains(&name.as_str()),
                "{name} is read but not listed"
            );
        }
        let readme = include_str!("../../README.md");
        let reference = include_str!("../../docs/configuration.md");
        for name in VARIABLES {
            assert!(readme.contains(name), "{name} is not in the README");
            assert!(
                reference.contains(name),
                "{name} is not in docs/configuration.md"
            );
        }
    }

    #[test]
    fn absurd_numbers_are_refused() {
        let err = settings(&[("SMSGW_MAX_ATTEMPTS", "0")]).expect_err("zero");
        assert_eq!(err.variable, "SMSGW_MAX_ATTEMPTS");
        let err = settings(&[("SMSGW_MAX_ATTEMPTS", "-3")]).expect_err("negative");
        assert_eq!(err.variable, "SMSGW_MAX_ATTEMPTS");
        for (variable, value) in [
            ("SMSGW_RATE_LIMIT", "0"),
            ("SMSGW_RATE_LIMIT", "fast"),
            ("SMSGW_PROVIDER_CONCURRENCY", "0"),
            ("SMSGW_PROVIDER_CONCURRENCY", "1000000"),
            ("SMSGW_HTTP_MAX_CONNECTIONS", "0"),
            ("SMSGW_HTTP_HEADER_TIMEOUT", "0s"),
            ("SMSGW_HTTP_HEADER_TIMEOUT", "1h"),
        ] {
            let err = settings(&[(variable, value)]).expect_err(value);
            assert_eq!(err.variable, variable, "{value}");
        }
    }

    #[test]
    fn debug_of_the_settings_shows_no_password() {
        let s = settings(&[
            ("SMSGW_AMQP_URL", "amqp://user:hunter2@rabbit:5672/%2f"),
            (
                "SMSGW_DATABASE_URL",
                "postgres://smsgw:hunter3@db/smsgw?password=hunter4",
            ),
        ])
        .expect("valid");
        let printed = format!("{s:?}");
        for password in ["hunter2", "hunter3", "hunter4"] {
            assert!(!printed.contains(password), "{printed}");
        }
        assert!(printed.contains("rabbit:5672"), "{printed}");
    }
}
