//! Settings from the environment (`SMSGW_*`, `TWILIO_*`), validated once at start-up.
//!
//! Everything that can be wrong with the configuration is found here, before the daemon
//! touches the broker, so that a bad deployment fails fast with exit code 2 and a message
//! that names the variable.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    net::SocketAddr,
    str::FromStr,
    time::Duration,
};

use secrecy::SecretString;

use crate::{
    job::JobType,
    phone::{Country, PhoneNumber},
};

mod events;
mod guards;
mod inbound;
mod network;
mod providers;
mod receipts;
mod schedule;
mod senders;
mod service_url;

pub use events::{DEFAULT_MAX_BACKLOG, EventSettings};
pub use guards::{GuardSettings, RateWindow};
pub use inbound::{Keyword, Keywords};
pub use receipts::ReceiptWatch;
pub use service_url::ServiceUrl;
pub(crate) use service_url::redact_url;

pub use providers::{
    DEFAULT_TWILIO_BASE_URL, DEFAULT_VONAGE_BASE_URL, ProviderKindSettings, ProviderSettings,
    SignatureMethod, VonageSettings,
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

/// The default sender when a school has no `sender_id` of its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TwilioSender {
    From(String),
    MessagingService(String),
}

/// Twilio credentials and endpoint.
#[derive(Debug, Clone)]
pub struct TwilioSettings {
    pub account_sid: String,
    /// Never logged; exposed only to build the Authorization header.
    pub auth_token: SecretString,
    pub sender: TwilioSender,
    /// `https://api.twilio.com` in real use; tests point it at a local stub.
    pub base_url: String,
    /// Test credentials (`sandbox = true`): Twilio accepts every request and delivers
    /// nothing. Never a real destination; refused in production.
    pub sandbox: bool,
}

/// Concurrency budget of each lane: how many messages of it may be in flight at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaneBudgets {
    pub urgent: u16,
    pub default: u16,
    pub bulk: u16,
}

/// All of smsgw's settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub env: Environment,
    /// May hold a password: printed only redacted.
    pub amqp_url: ServiceUrl,
    /// How long one broker node may take to take a connection.
    pub broker_connect_timeout: Duration,
    /// May hold a password: printed only redacted.
    pub database_url: ServiceUrl,
    /// Every database call's bound: a statement's time on the server, and what the
    /// daemon waits before it gives up on a connection (see `store::connect::Bounds`).
    pub database_timeout: Duration,
    /// How long a migration's statement waits for a table's lock before it gives up and
    /// tries again (PostgreSQL's `lock_timeout`).
    pub migrate_lock_timeout: Duration,
    pub http_addr: SocketAddr,
    /// Against slow and idle clients of the HTTP server.
    pub http_limits: HttpLimits,
    /// Names the development inbox answers to besides localhost and its own address.
    pub inbox_hosts: Vec<String>,
    /// Base URL that providers call back; `None` means no status callbacks are asked for.
    pub public_url: Option<String>,
    /// Every configured provider (one from the environment, or several from `SMSGW_CONFIG`).
    pub providers: Vec<ProviderSettings>,
    /// Used for schools whose settings name none.
    pub default_provider: String,
    /// Most segments a text of a type may have; longer ones fail before any call.
    pub max_segments: HashMap<JobType, u32>,
    /// Staging: every message goes to this one number instead of its recipient.
    pub redirect_to: Option<PhoneNumber>,
    pub max_attempts: u32,
    /// Retry tiers, shortest first; the n-th temporary failure waits the n-th delay
    /// (the last one repeats).
    pub retry_delays: Vec<Duration>,
    pub rate_limit: Option<u32>,
    /// Message bodies older than this are removed from the log.
    pub body_retention: Duration,
    /// Whole finished message rows (and their attempts) and the records of applied
    /// webhooks older than this are removed.
    pub log_retention: Duration,
    /// Dead letters older than this are removed from `sms.dead`.
    pub dead_retention: Duration,
    /// `false`: a message's body is dropped as soon as it has a final outcome.
    pub keep_body: bool,
    /// How often the retention task runs.
    pub retention_interval: Duration,
    /// Upper bound of one provider call; far below RabbitMQ's consumer timeout.
    pub provider_timeout: Duration,
    pub lanes: LaneBudgets,
    /// `x-delivery-limit` of the lane queues: after this many deliveries without a
    /// settlement (daemon crashes) a message is dead-lettered by the broker.
    pub delivery_limit: u32,
    pub shutdown_grace: Duration,
    pub log_format: Option<LogFormat>,
    /// After an attempt with an unknown outcome, when the provider cannot be asked:
    /// `true` sends again (counted as a possible duplicate), `false` dead-letters.
    pub resend_unknown: bool,
    /// Outage-like failures in a row that open a provider's circuit.
    pub circuit_threshold: u32,
    /// How long an open circuit pauses the provider before a probe.
    pub circuit_cooldown: Duration,
    /// Recipients of an announcement fanned out per turn in the bulk lane.
    pub fanout_chunk: usize,
    /// Largest job body accepted; a larger one is dead-lettered before it is decoded.
    pub max_job_bytes: usize,
    /// Large jobs (announcements, in practice) decoded and fanned out at once, per
    /// process: what bounds the memory their decoding takes.
    pub fanout_concurrency: usize,
    /// Most calls in flight to one gateway at once (and so most connections open to it).
    pub provider_concurrency: u32,
    /// Status events: on or off, and the outbox's bound.
    pub events: EventSettings,
    /// The types that wait while a school's quiet hours last.
    pub quiet_types: Vec<JobType>,
    /// How long after publication a job of a type without `expires_at` expires.
    pub default_expiry: HashMap<JobType, Duration>,
    /// What inbound texts are opt-out or opt-in keywords; any other text is a reply.
    pub keywords: Keywords,
    /// How far back a reply looks for the message it answers.
    pub reply_window: Duration,
    /// How long after a booking's cancellation a reminder or confirmation of it that
    /// arrives is withdrawn rather than sent.
    pub withdraw_window: Duration,
    /// The account's guards against fraud and spend.
    pub guards: GuardSettings,
    /// When a sent message stops waiting for its delivery receipt.
    pub receipt_watch: ReceiptWatch,
    /// Replace GSM-7 look-alikes when that makes a text GSM-7 (`SMSGW_SMART_ENCODING`).
    pub smart_encoding: bool,
    /// Countries whose carriers refuse alphanumeric senders (`SMSGW_SENDER_COUNTRIES_FILE`).
    pub alphanumeric_refused: Vec<Country>,
}

/// `SMSGW_MAX_JOB_BYTES` by default, 8 MiB: the contract's largest job, an announcement to
/// 50,000 recipients, at a generous 160 bytes a recipient (`{"to": "+44 7700 900123",
/// "ref": "…"}` with a 40-character number and a 100-byte `ref`, 8,000,000 bytes) leaves
/// 380 KiB for the body (1,600 characters, 19 KiB even written as `\u` escapes), the context
/// (2 KiB) and the rest. It stays under RabbitMQ 4.x's default `max_message_size` (16 MiB).
pub const DEFAULT_MAX_JOB_BYTES: usize = 8 * 1024 * 1024;

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
        let provider_config = provider_config(&get, env, delivery)?;
        if delivery {
            refuse_non_delivering_in_production(env, &provider_config.providers)?;
        }
        let redirect_to = redirect_to(&get)?;
        check_redirect(env, redirect_to.as_ref(), &provider_config.providers)?;
        let max_segments = max_segments(&get, &provider_config.max_segments)?;
        let public_url = public_url(&get, env, delivery)?;
        let retry_delays = retry_delays(&get)?;
        let lanes = lanes(&get)?;
        let log_format = log_format(&get)?;
        let (log_retention, dead_retention) = retention(&get)?;
        // Fields are evaluated in the order written, which decides which of several bad
        // variables is reported.
        Ok(Settings {
            env,
            amqp_url: amqp_url(&get)?,
            broker_connect_timeout: network::broker_connect_timeout(&get)?,
            database_url: ServiceUrl::new(
                get("SMSGW_DATABASE_URL")
                    .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/smsgw".to_owned()),
            ),
            database_timeout: database_timeout(&get)?,
            migrate_lock_timeout: migrate_lock_timeout(&get)?,
            http_addr: parsed(&get, "SMSGW_HTTP_ADDR", "127.0.0.1:9464")?,
            http_limits: http_limits(&get)?,
            inbox_hosts: network::inbox_hosts(get("SMSGW_INBOX_HOSTS").as_deref())?,
            public_url,
            providers: provider_config.providers,
            default_provider: provider_config.default_provider,
            max_segments,
            redirect_to,
            max_attempts: number(&get, "SMSGW_MAX_ATTEMPTS", 6, 1, 100)?,
            retry_delays,
            rate_limit: rate_limit(&get)?,
            body_retention: duration(&get, "SMSGW_BODY_RETENTION", "30d")?,
            log_retention,
            dead_retention,
            keep_body: keep_body(&get)?,
            retention_interval: duration(&get, "SMSGW_RETENTION_INTERVAL", "10m")?,
            provider_timeout: duration(&get, "SMSGW_PROVIDER_TIMEOUT", "10s")?,
            lanes,
            delivery_limit: number(&get, "SMSGW_DELIVERY_LIMIT", 10, 2, 1_000)?,
            shutdown_grace: duration(&get, "SMSGW_SHUTDOWN_GRACE", "20s")?,
            log_format,
            circuit_threshold: number(&get, "SMSGW_CIRCUIT_THRESHOLD", 5, 1, 10_000)?,
            circuit_cooldown: duration(&get, "SMSGW_CIRCUIT_COOLDOWN", "30s")?,
            fanout_chunk: number(&get, "SMSGW_FANOUT_CHUNK", 1_000, 1, 50_000)?,
            max_job_bytes: max_job_bytes(&get)?,
            fanout_concurrency: number(&get, "SMSGW_FANOUT_CONCURRENCY", 2, 1, 64)?,
            provider_concurrency: number(&get, "SMSGW_PROVIDER_CONCURRENCY", 512, 1, 10_000)?,
            resend_unknown: resend_unknown(&get)?,
            events: events::events(&get)?,
            quiet_types: schedule::quiet_types(get("SMSGW_QUIET_TYPES").as_deref())?,
            default_expiry: schedule::default_expiry(get("SMSGW_DEFAULT_EXPIRY").as_deref())?,
            keywords: Keywords::parse(
                get("SMSGW_OPT_OUT_KEYWORDS").as_deref(),
                get("SMSGW_OPT_IN_KEYWORDS").as_deref(),
            )?,
            reply_window: duration(&get, "SMSGW_REPLY_WINDOW", "7d")?,
            withdraw_window: duration(&get, "SMSGW_WITHDRAW_WINDOW", "30d")?,
            guards: guards::guards(&get)?,
            receipt_watch: ReceiptWatch::parse(get("SMSGW_RECEIPT_TIMEOUT").as_deref())?,
            smart_encoding: on_or_off(&get, "SMSGW_SMART_ENCODING", true)?,
            alphanumeric_refused: senders::refusing_countries(&get)?,
        })
    }

    /// The AMQP URL with any password replaced, for log lines.
    pub fn amqp_url_redacted(&self) -> String {
        self.amqp_url.redacted()
    }

    /// The database URL with any password replaced, for log lines.
    pub fn database_url_redacted(&self) -> String {
        self.database_url.redacted()
    }

    /// One line that says where messages will really go. Printed at start-up in every mode.
    pub fn destination_summary(&self) -> String {
        let env = self.env.as_str();
        let only =
            |kind: fn(&ProviderKindSettings) -> bool| self.providers.iter().all(|p| kind(&p.kind));
        if only(|k| matches!(k, ProviderKindSettings::Log)) {
            return format!(
                "{env}: provider '{}': messages are written to the log, none is sent",
                self.default_provider
            );
        }
        if only(|k| matches!(k, ProviderKindSettings::Inbox)) {
            return format!(
                "{env}: provider '{}': messages are kept in the inbox at http://{}/inbox, \
                 none is sent",
                self.default_provider, self.http_addr
            );
        }
        let list: Vec<String> = self.providers.iter().map(|p| p.describe()).collect();
        let which = if self.providers.len() == 1 {
            format!("provider {}", list.join(""))
        } else {
            format!(
                "providers {} (default '{}')",
                list.join(", "),
                self.default_provider
            )
        };
        match &self.redirect_to {
            Some(number) => format!(
                "{env}: {which}: every message is redirected to {}",
                number.masked()
            ),
            // Each provider's description already says that it delivers nothing.
            None if self
                .providers
                .iter()
                .all(|p| p.delivers_nothing().is_some()) =>
            {
                format!("{env}: {which}")
            }
            None => format!("{env}: {which}: messages go to their real recipients"),
        }
    }

    /// The provider used when a school names none.
    pub fn default_provider_settings(&self) -> Option<&ProviderSettings> {
        self.providers
            .iter()
            .find(|p| p.name == self.default_provider)
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

/// The providers: from `SMSGW_CONFIG` or the environment when delivering; for a tool that
/// sends nothing, the log provider alone, so its credentials need not exist yet.
fn provider_config(
    get: &impl Fn(&str) -> Option<String>,
    env: Environment,
    delivery: bool,
) -> Result<providers::ProviderConfig, ConfigError> {
    if !delivery {
        return Ok(providers::ProviderConfig {
            providers: vec![ProviderSettings {
                name: "log".into(),
                kind: ProviderKindSettings::Log,
                rate: None,
            }],
            default_provider: "log".into(),
            max_segments: Default::default(),
        });
    }
    if let Some(path) = get("SMSGW_CONFIG") {
        return providers::from_file(get, &path, get("SMSGW_PROVIDER"));
    }
    let kind = match get("SMSGW_PROVIDER") {
        None if env == Environment::Production => {
            return Err(bad(
                "SMSGW_PROVIDER",
                "production needs a real provider (e.g. twilio); the log provider sends nothing",
            ));
        }
        // Development shows what it would have sent; staging, where the HTTP address may
        // be reachable by others, keeps to the log unless told otherwise.
        None if env == Environment::Development => "inbox".to_owned(),
        None => "log".to_owned(),
        Some(kind) => kind.trim().to_owned(),
    };
    providers::from_env(get, &kind)
}

/// In production a provider that delivers nothing (the log, the inbox, a sandbox) would
/// make messages vanish while looking sent.
fn refuse_non_delivering_in_production(
    env: Environment,
    providers: &[ProviderSettings],
) -> Result<(), ConfigError> {
    if env != Environment::Production {
        return Ok(());
    }
    let Some((provider, (what, why))) = providers
        .iter()
        .find_map(|p| p.delivers_nothing().map(|refusal| (p, refusal)))
    else {
        return Ok(());
    };
    // A sandbox can only be declared in the file; the others may come from either.
    let variable = match provider.kind {
        ProviderKindSettings::Twilio(_) => "SMSGW_CONFIG",
        _ => "SMSGW_PROVIDER",
    };
    Err(bad(
        variable,
        format!("production refuses {what} ('{}'): {why}", provider.name),
    ))
}

/// A malformed URL is refused here, and not quoted: it may hold a password.
fn amqp_url(get: &impl Fn(&str) -> Option<String>) -> Result<ServiceUrl, ConfigError> {
    let url =
        get("SMSGW_AMQP_URL").unwrap_or_else(|| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned());
    let url = ServiceUrl::new(url);
    if url.nodes().next().is_none() || !url.nodes().all(service_url::is_amqp_url) {
        return Err(bad(
            "SMSGW_AMQP_URL",
            "not an amqp:// or amqps:// URL, or a comma-separated list of them (e.g. \
             amqp://user:password@host:5672/%2f); not shown, as it may hold a password",
        ));
    }
    Ok(url)
}

fn redirect_to(get: &impl Fn(&str) -> Option<String>) -> Result<Option<PhoneNumber>, ConfigError> {
    let Some(raw) = get("SMSGW_REDIRECT_TO") else {
        return Ok(None);
    };
    PhoneNumber::parse(&raw, None).map(Some).map_err(|e| {
        bad(
            "SMSGW_REDIRECT_TO",
            format!("{e} (give the number in E.164, e.g. +447700900123)"),
        )
    })
}

/// Production must reach the real recipients; anywhere else a provider that reaches real
/// phones must be redirected, so a test never texts a real person.
fn check_redirect(
    env: Environment,
    redirect_to: Option<&PhoneNumber>,
    providers: &[ProviderSettings],
) -> Result<(), ConfigError> {
    if env == Environment::Production && redirect_to.is_some() {
        return Err(bad(
            "SMSGW_REDIRECT_TO",
            "is for staging; production never redirects messages",
        ));
    }
    if env != Environment::Production
        && redirect_to.is_none()
        && let Some(real) = providers.iter().find(|p| p.reaches_real_phones())
    {
        return Err(bad(
            "SMSGW_REDIRECT_TO",
            format!(
                "{}: provider {} would text real people: set SMSGW_REDIRECT_TO to your own \
                 number (or use SMSGW_PROVIDER=inbox)",
                env.as_str(),
                real.describe()
            ),
        ));
    }
    Ok(())
}

/// The limits of the file's `[max_segments]`, then those of `SMSGW_MAX_SEGMENTS`, which
/// win for a type named in both.
fn max_segments(
    get: &impl Fn(&str) -> Option<String>,
    from_file: &BTreeMap<String, u32>,
) -> Result<HashMap<JobType, u32>, ConfigError> {
    let mut max_segments = HashMap::new();
    for (name, limit) in from_file {
        let kind = JobType::parse(name).ok_or_else(|| {
            bad(
                "SMSGW_CONFIG",
                format!("max_segments: '{name}' is not a job type"),
            )
        })?;
        max_segments.insert(kind, *limit);
    }
    if let Some(raw) = get("SMSGW_MAX_SEGMENTS") {
        for part in raw.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (kind, limit) = segment_limit(part)?;
            max_segments.insert(kind, limit);
        }
    }
    Ok(max_segments)
}

/// One `TYPE:NUMBER` of `SMSGW_MAX_SEGMENTS`.
fn segment_limit(part: &str) -> Result<(JobType, u32), ConfigError> {
    let (name, limit) = part
        .split_once(':')
        .ok_or_else(|| bad("SMSGW_MAX_SEGMENTS", format!("'{part}' is not TYPE:NUMBER")))?;
    let kind = JobType::parse(name.trim())
        .ok_or_else(|| bad("SMSGW_MAX_SEGMENTS", format!("'{name}' is not a job type")))?;
    let limit: u32 = limit
        .trim()
        .parse()
        .ok()
        .filter(|n| (1..=100).contains(n))
        .ok_or_else(|| {
            bad(
                "SMSGW_MAX_SEGMENTS",
                format!("'{part}': a limit from 1 to 100"),
            )
        })?;
    Ok((kind, limit))
}

/// Kept without a trailing slash, so callback paths can be appended to it.
/// The base URL providers call back. Production needs one, over `https`: receipts and
/// inbound STOP/START carry phone numbers and must not be readable on the wire.
fn public_url(
    get: &impl Fn(&str) -> Option<String>,
    env: Environment,
    delivery: bool,
) -> Result<Option<String>, ConfigError> {
    let production = env == Environment::Production && delivery;
    let Some(url) = get("SMSGW_PUBLIC_URL") else {
        if production {
            return Err(bad(
                "SMSGW_PUBLIC_URL",
                "is required in production: the https URL providers send receipts and STOP/START to",
            ));
        }
        return Ok(None);
    };
    let parsed = reqwest::Url::parse(&url)
        .map_err(|e| bad("SMSGW_PUBLIC_URL", format!("not a URL: {e}")))?;
    match parsed.scheme() {
        "https" => {}
        "http" if !production => {}
        "http" => {
            return Err(bad(
                "SMSGW_PUBLIC_URL",
                "must be an https URL in production: webhooks carry phone numbers",
            ));
        }
        _ => return Err(bad("SMSGW_PUBLIC_URL", "must be an http(s) URL")),
    }
    Ok(Some(url.trim_end_matches('/').to_owned()))
}

fn retry_delays(get: &impl Fn(&str) -> Option<String>) -> Result<Vec<Duration>, ConfigError> {
    let raw = get("SMSGW_RETRY_DELAYS").unwrap_or_else(|| "10s,1m,5m,30m,2h".to_owned());
    parse_delays(&raw).map_err(|problem| bad("SMSGW_RETRY_DELAYS", problem))
}

/// How long a client may take, and how many may be connected at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// For a request's headers; also the idle time after which a keep-alive connection
    /// is closed.
    pub header_timeout: Duration,
    /// Connections open at once; more wait to be accepted.
    pub max_connections: usize,
}

/// A few seconds for the headers: a client on a working network sends them at once, and
/// ingress proxies pass them on whole. Connections: far more than probes, scrapes and
/// receipts need at once, far fewer than the file descriptors the daemon may open.
fn http_limits(get: &impl Fn(&str) -> Option<String>) -> Result<HttpLimits, ConfigError> {
    let header_timeout = duration(get, "SMSGW_HTTP_HEADER_TIMEOUT", "5s")?;
    if !(Duration::from_millis(100)..=Duration::from_secs(300)).contains(&header_timeout) {
        return Err(bad(
            "SMSGW_HTTP_HEADER_TIMEOUT",
            "must be between 100ms and 5m",
        ));
    }
    Ok(HttpLimits {
        header_timeout,
        max_connections: number(get, "SMSGW_HTTP_MAX_CONNECTIONS", 256, 1, 100_000)?,
    })
}

fn lanes(get: &impl Fn(&str) -> Option<String>) -> Result<LaneBudgets, ConfigError> {
    Ok(LaneBudgets {
        urgent: number(get, "SMSGW_URGENT_CONCURRENCY", 32, 1, 10_000)?,
        default: number(get, "SMSGW_DEFAULT_CONCURRENCY", 256, 1, 10_000)?,
        bulk: number(get, "SMSGW_BULK_CONCURRENCY", 256, 1, 10_000)?,
    })
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

/// Unset means no process-wide limit; each provider's own `rate` still applies.
fn rate_limit(get: &impl Fn(&str) -> Option<String>) -> Result<Option<u32>, ConfigError> {
    match get("SMSGW_RATE_LIMIT") {
        None => Ok(None),
        Some(_) => Ok(Some(number(get, "SMSGW_RATE_LIMIT", 0, 1, 1_000_000)?)),
    }
}

/// How long the message log and the dead letters are kept. The log is kept 180 days by
/// default: long enough for support's questions and billing disputes over several
/// months, and no longer, since it holds every recipient's number and the providers'
/// error texts. It must outlast the dead letters: a replayed letter is recognised (and an
/// unknown outcome asked about) through its message's row.
fn retention(get: &impl Fn(&str) -> Option<String>) -> Result<(Duration, Duration), ConfigError> {
    let log = duration(get, "SMSGW_LOG_RETENTION", "180d")?;
    let dead = duration(get, "SMSGW_DEAD_RETENTION", "30d")?;
    if log < dead {
        return Err(bad(
            "SMSGW_LOG_RETENTION",
            format!(
                "must be at least SMSGW_DEAD_RETENTION ({}): a replayed dead letter needs its \
                 message's row",
                humantime::format_duration(dead)
            ),
        ));
    }
    Ok((log, dead))
}

fn keep_body(get: &impl Fn(&str) -> Option<String>) -> Result<bool, ConfigError> {
    match get("SMSGW_KEEP_BODY").as_deref().map(str::trim) {
        None | Some("true") | Some("1") | Some("yes") => Ok(true),
        Some("false") | Some("0") | Some("no") => Ok(false),
        Some(other) => Err(bad(
            "SMSGW_KEEP_BODY",
            format!("'{other}' is not true or false"),
        )),
    }
}

fn on_or_off(
    get: &impl Fn(&str) -> Option<String>,
    variable: &'static str,
    default: bool,
) -> Result<bool, ConfigError> {
    match get(variable).as_deref().map(str::trim) {
        None => Ok(default),
        Some("on") => Ok(true),
        Some("off") => Ok(false),
        Some(other) => Err(bad(variable, format!("'{other}' is not on or off"))),
    }
}

fn resend_unknown(get: &impl Fn(&str) -> Option<String>) -> Result<bool, ConfigError> {
    match get("SMSGW_UNKNOWN_OUTCOME").as_deref().map(str::trim) {
        None | Some("resend") => Ok(true),
        Some("dead_letter") => Ok(false),
        Some(other) => Err(bad(
            "SMSGW_UNKNOWN_OUTCOME",
            format!("'{other}' is not one of resend, dead_letter"),
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

/// Parses `10s,1m,5m` into durations: each at least 1 ms, at most 24 h, strictly growing.
pub fn parse_delays(raw: &str) -> Result<Vec<Duration>, String> {
    let mut delays = Vec::new();
    for part in raw.split(',') {
        let part = part.trim();
        let delay = humantime::parse_duration(part)
            .map_err(|e| format!("'{part}' is not a duration ({e})"))?;
        if delay < Duration::from_millis(1) || delay > Duration::from_secs(24 * 3600) {
            return Err(format!("'{part}' must be between 1ms and 24h"));
        }
        if delays.last().is_some_and(|last| *last >= delay) {
            return Err("delays must grow from one tier to the next".to_owned());
        }
        delays.push(delay);
    }
    if delays.len() > 20 {
        return Err("at most 20 tiers".to_owned());
    }
    Ok(delays)
}

fn number<T>(
    get: &impl Fn(&str) -> Option<String>,
    variable: &'static str,
    default: T,
    min: T,
    max: T,
) -> Result<T, ConfigError>
where
    T: FromStr + PartialOrd + fmt::Display + Copy,
{
    let Some(raw) = get(variable) else {
        return Ok(default);
    };
    let value: T = raw
        .trim()
        .parse()
        .map_err(|_| bad(variable, format!("'{raw}' is not a whole number")))?;
    if value < min || value > max {
        return Err(bad(variable, format!("must be between {min} and {max}")));
    }
    Ok(value)
}

/// Every database call's bound (`SMSGW_DATABASE_TIMEOUT`).
fn database_timeout(get: &impl Fn(&str) -> Option<String>) -> Result<Duration, ConfigError> {
    let range = (Duration::from_secs(1), Duration::from_secs(3_600));
    bounded_duration(get, "SMSGW_DATABASE_TIMEOUT", "15s", range)
}

/// A migration's wait for a table's lock (`SMSGW_MIGRATE_LOCK_TIMEOUT`).
fn migrate_lock_timeout(get: &impl Fn(&str) -> Option<String>) -> Result<Duration, ConfigError> {
    let range = (Duration::from_millis(100), Duration::from_secs(3_600));
    bounded_duration(get, "SMSGW_MIGRATE_LOCK_TIMEOUT", "10s", range)
}

/// The largest job accepted (`SMSGW_MAX_JOB_BYTES`).
fn max_job_bytes(get: &impl Fn(&str) -> Option<String>) -> Result<usize, ConfigError> {
    let (least, most) = (64 * 1024, 128 * 1024 * 1024);
    number(
        get,
        "SMSGW_MAX_JOB_BYTES",
        DEFAULT_MAX_JOB_BYTES,
        least,
        most,
    )
}

fn duration(
    get: &impl Fn(&str) -> Option<String>,
    variable: &'static str,
    default: &str,
) -> Result<Duration, ConfigError> {
    let raw = get(variable).unwrap_or_else(|| default.to_owned());
    humantime::parse_duration(raw.trim())
        .map_err(|e| bad(variable, format!("'{raw}' is not a duration ({e})")))
}

/// A duration within `(min, max)`, both included.
fn bounded_duration(
    get: &impl Fn(&str) -> Option<String>,
    variable: &'static str,
    default: &str,
    (min, max): (Duration, Duration),
) -> Result<Duration, ConfigError> {
    let value = duration(get, variable, default)?;
    if value < min || value > max {
        return Err(bad(
            variable,
            format!(
                "must be between {} and {}",
                humantime::format_duration(min),
                humantime::format_duration(max)
            ),
        ));
    }
    Ok(value)
}

fn parsed<T: FromStr>(
    get: &impl Fn(&str) -> Option<String>,
    variable: &'static str,
    default: &str,
) -> Result<T, ConfigError>
where
    T::Err: fmt::Display,
{
    let raw = get(variable).unwrap_or_else(|| default.to_owned());
    raw.trim()
        .parse()
        .map_err(|e| bad(variable, format!("'{raw}': {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(pairs: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Settings::from_lookup(|k| map.get(k).cloned())
    }

    const SID: &str = "AC0123456789abcdef0123456789abcdef";

    #[test]
    fn smart_encoding_is_on_unless_turned_off() {
        assert!(settings(&[]).expect("defaults").smart_encoding);
        let off = settings(&[("SMSGW_SMART_ENCODING", "off")]).expect("off");
        assert!(!off.smart_encoding);
        let error = settings(&[("SMSGW_SMART_ENCODING", "yes")]).expect_err("refused");
        assert_eq!(error.variable, "SMSGW_SMART_ENCODING");
    }

    #[test]
    fn the_database_timeout_is_a_duration_within_reason() {
        assert_eq!(
            settings(&[]).expect("defaults").database_timeout,
            Duration::from_secs(15)
        );
        let short = settings(&[("SMSGW_DATABASE_TIMEOUT", "2s")]).expect("2s");
        assert_eq!(short.database_timeout, Duration::from_secs(2));
        for wrong in ["soon", "0s", "500ms", "2h"] {
            let error = settings(&[("SMSGW_DATABASE_TIMEOUT", wrong)]).expect_err(wrong);
            assert_eq!(error.variable, "SMSGW_DATABASE_TIMEOUT");
        }
        let migrate = settings(&[("SMSGW_MIGRATE_LOCK_TIMEOUT", "500ms")]).expect("500ms");
        assert_eq!(migrate.migrate_lock_timeout, Duration::from_millis(500));
        assert_eq!(
            settings(&[]).expect("defaults").migrate_lock_timeout,
            Duration::from_secs(10)
        );
        let error = settings(&[("SMSGW_MIGRATE_LOCK_TIMEOUT", "never")]).expect_err("never");
        assert_eq!(error.variable, "SMSGW_MIGRATE_LOCK_TIMEOUT");
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
    fn the_withdraw_window_is_thirty_days_unless_set_and_never_negative() {
        let days = |s: &Settings| s.withdraw_window.as_secs() / 86_400;
        assert_eq!(days(&settings(&[]).expect("defaults")), 30);
        let set = settings(&[("SMSGW_WITHDRAW_WINDOW", "2d")]).expect("valid");
        assert_eq!(days(&set), 2);
        for raw in ["-1d", "soon", "30"] {
            let error = settings(&[("SMSGW_WITHDRAW_WINDOW", raw)]).expect_err(raw);
            assert_eq!(error.variable, "SMSGW_WITHDRAW_WINDOW");
        }
    }

    #[test]
    fn development_defaults_to_the_inbox_and_staging_to_the_log() {
        let s = settings(&[]).expect("defaults are valid");
        assert_eq!(s.env, Environment::Development);
        assert_eq!(s.default_provider, "inbox");
        assert_eq!(s.max_attempts, 6);
        assert_eq!(s.retry_delays.len(), 5);
        assert_eq!((s.max_job_bytes, s.fanout_concurrency), (8_388_608, 2));
        assert_eq!(
            s.destination_summary(),
            "development: provider 'inbox': messages are kept in the inbox at \
             http://127.0.0.1:9464/inbox, none is sent"
        );
        let staging = settings(&[("SMSGW_ENV", "staging")]).expect("valid");
        assert_eq!(staging.default_provider, "log");
        assert!(staging.destination_summary().contains("none is sent"));
    }

    #[test]
    fn production_refuses_the_inbox() {
        let err = settings(&[("SMSGW_ENV", "production"), ("SMSGW_PROVIDER", "inbox")])
            .expect_err("inbox in production");
        assert_eq!(err.variable, "SMSGW_PROVIDER");
        assert!(err.problem.contains("inbox provider"), "{err}");
    }

    #[test]
    fn nothing_personal_is_kept_for_ever_by_default() {
        let s = settings(&[]).expect("defaults are valid");
        let days = |d: u64| Duration::from_secs(d * 86_400);
        assert_eq!(
            (s.body_retention, s.log_retention, s.dead_retention),
            (days(30), days(180), days(30))
        );
        let err = settings(&[("SMSGW_LOG_RETENTION", "7d")]).expect_err("log shorter");
        assert_eq!(err.variable, "SMSGW_LOG_RETENTION");
        assert!(
            settings(&[
                ("SMSGW_LOG_RETENTION", "7d"),
                ("SMSGW_DEAD_RETENTION", "7d")
            ])
            .is_ok()
        );
    }

    #[test]
    fn production_refuses_the_log_provider() {
        let err = settings(&[("SMSGW_ENV", "production"), ("SMSGW_PROVIDER", "log")])
            .expect_err("log in production");
        assert_eq!(err.variable, "SMSGW_PROVIDER");
        let err = settings(&[("SMSGW_ENV", "production")]).expect_err("no provider");
        assert_eq!(err.variable, "SMSGW_PROVIDER");
    }

    #[test]
    fn production_refuses_missing_credentials() {
        let err = settings(&[("SMSGW_ENV", "production"), ("SMSGW_PROVIDER", "twilio")])
            .expect_err("no sid");
        assert_eq!(err.variable, "TWILIO_ACCOUNT_SID");
        let err = settings(&[
            ("SMSGW_ENV", "production"),
            ("SMSGW_PROVIDER", "twilio"),
            ("TWILIO_ACCOUNT_SID", SID),
            ("TWILIO_AUTH_TOKEN", "secret"),
        ])
        .expect_err("no sender");
        assert_eq!(err.variable, "TWILIO_FROM");
    }

    /// Twilio at its real API, with credentials, in `env`.
    fn real_twilio(env: &'static str) -> Vec<(&'static str, &'static str)> {
        vec![
            ("SMSGW_ENV", env),
            ("SMSGW_PROVIDER", "twilio"),
            ("TWILIO_ACCOUNT_SID", SID),
            ("TWILIO_AUTH_TOKEN", "secret"),
            ("TWILIO_FROM", "+15005550006"),
        ]
    }

    #[test]
    fn production_needs_an_https_public_url() {
        let base = real_twilio("production");
        let err = settings(&base).expect_err("no public URL");
        assert_eq!(err.variable, "SMSGW_PUBLIC_URL");
        let mut plain = base.clone();
        plain.push(("SMSGW_PUBLIC_URL", "http://smsgw.example.com"));
        let err = settings(&plain).expect_err("plain http");
        assert!(err.problem.contains("https"), "{err}");
        let mut secure = base.clone();
        secure.push(("SMSGW_PUBLIC_URL", "https://smsgw.example.com/"));
        let s = settings(&secure).expect("https is fine");
        assert_eq!(s.public_url.as_deref(), Some("https://smsgw.example.com"));
    }

    #[test]
    fn staging_with_real_twilio_needs_a_redirect() {
        let base = real_twilio("staging");
        let err = settings(&base).expect_err("no redirect");
        assert_eq!(err.variable, "SMSGW_REDIRECT_TO");
        for real in [
            "https://api.twilio.com:443",
            "https://api.dublin.ie1.twilio.com",
        ] {
            let mut explicit = base.clone();
            explicit.push(("SMSGW_TWILIO_BASE_URL", real));
            let err = settings(&explicit).expect_err("Twilio's own host, written out");
            assert_eq!(err.variable, "SMSGW_REDIRECT_TO", "{real}");
        }
        let mut with_redirect = base.clone();
        with_redirect.push(("SMSGW_REDIRECT_TO", "+447700900123"));
        let s = settings(&with_redirect).expect("redirected staging is fine");
        let line = s.destination_summary();
        assert!(line.contains("redirected to +44*******123"), "{line}");
    }

    /// A Twilio sandbox (test credentials at Twilio's real API) declared in a file.
    fn sandbox(env: &'static str) -> Result<Settings, ConfigError> {
        sandbox_file(env, "true")
    }

    /// A Twilio entry whose `sandbox` is `value`, written as TOML.
    fn sandbox_file(env: &'static str, value: &str) -> Result<Settings, ConfigError> {
        let path = std::env::temp_dir().join(format!(
            "smsgw-sandbox-{}.toml",
            uuid::Uuid::new_v4().simple()
        ));
        let toml = format!(
            "[providers.twilio]\ntype = \"twilio\"\nsandbox = {value}\naccount_sid = \"{SID}\"\n\
             auth_token = {{ env = \"TEST_TOKEN\" }}\nfrom = \"+15005550006\"\n"
        );
        std::fs::write(&path, toml).expect("write");
        let path = path.to_string_lossy().into_owned();
        settings(&[
            ("SMSGW_ENV", env),
            ("SMSGW_CONFIG", &path),
            ("TEST_TOKEN", "test-token"),
            ("SMSGW_PUBLIC_URL", "https://smsgw.example.com"),
        ])
    }

    #[test]
    fn a_sandbox_that_is_not_a_boolean_is_refused() {
        for value in ["\"yes\"", "1"] {
            let err = sandbox_file("staging", value).expect_err(value);
            assert_eq!(err.variable, "SMSGW_CONFIG", "{value}: {err}");
        }
    }

    #[test]
    fn staging_accepts_a_sandbox_without_a_redirect_and_says_so() {
        let s = sandbox("staging").expect("a sandbox texts nobody");
        assert_eq!(
            s.destination_summary(),
            "staging: provider 'twilio': twilio sandbox (test credentials): nothing is delivered"
        );
    }

    #[test]
    fn production_refuses_a_sandbox() {
        let err = sandbox("production").expect_err("a sandbox delivers nothing");
        assert_eq!(err.variable, "SMSGW_CONFIG");
        assert!(err.problem.contains("sandbox"), "{err}");
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
    fn retry_delays_must_grow() {
        assert!(parse_delays("10s,1m,5m").is_ok());
        assert!(parse_delays("1m,10s").is_err());
        assert!(parse_delays("soon").is_err());
        assert!(parse_delays("0s").is_err());
    }

    #[test]
    fn absurd_numbers_are_refused() {
        let err = settings(&[("SMSGW_MAX_ATTEMPTS", "0")]).expect_err("zero");
        assert_eq!(err.variable, "SMSGW_MAX_ATTEMPTS");
        let err = settings(&[("SMSGW_MAX_ATTEMPTS", "-3")]).expect_err("negative");
        assert_eq!(err.variable, "SMSGW_MAX_ATTEMPTS");
        for (variable, value) in [
            ("SMSGW_FANOUT_CHUNK", "0"),
            ("SMSGW_FANOUT_CHUNK", "1e9"),
            ("SMSGW_RATE_LIMIT", "0"),
            ("SMSGW_RATE_LIMIT", "fast"),
            ("SMSGW_PROVIDER_CONCURRENCY", "0"),
            ("SMSGW_PROVIDER_CONCURRENCY", "1000000"),
            ("SMSGW_HTTP_MAX_CONNECTIONS", "0"),
            ("SMSGW_HTTP_HEADER_TIMEOUT", "0s"),
            ("SMSGW_HTTP_HEADER_TIMEOUT", "1h"),
            ("SMSGW_MAX_JOB_BYTES", "1000"),
            ("SMSGW_MAX_JOB_BYTES", "8MiB"),
            ("SMSGW_FANOUT_CONCURRENCY", "0"),
        ] {
            let err = settings(&[(variable, value)]).expect_err(value);
            assert_eq!(err.variable, variable, "{value}");
        }
    }

    #[test]
    fn passwords_are_redacted_from_urls() {
        let s =
            settings(&[("SMSGW_AMQP_URL", "amqp://user:hunter2@rabbit:5672/%2f")]).expect("valid");
        assert!(!s.amqp_url_redacted().contains("hunter2"));
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

    #[test]
    fn a_malformed_amqp_url_is_refused_without_quoting_it() {
        let err = settings(&[("SMSGW_AMQP_URL", "amqp:user:hunter2@rabbit:5672")])
            .expect_err("no // after the scheme");
        assert_eq!(err.variable, "SMSGW_AMQP_URL");
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }

    #[test]
    fn a_broker_list_is_read_node_by_node() {
        let s = settings(&[(
            "SMSGW_AMQP_URL",
            "amqp://guest:guest@rabbit-0:5672/%2f,amqp://guest:guest@rabbit-1:5672/%2f",
        )])
        .expect("two nodes");
        assert_eq!(s.amqp_url.nodes().count(), 2);
        for bad in ["amqp://guest:hunter2@rabbit-0:5672/%2f,rabbit-1:5672", ","] {
            let err = settings(&[("SMSGW_AMQP_URL", bad)]).expect_err(bad);
            assert!(!err.to_string().contains("hunter2"), "{err}");
        }
    }
}
