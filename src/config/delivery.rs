//! How messages are delivered: the providers (`SMSGW_PROVIDER` with `TWILIO_*` or
//! `VONAGE_*`, or `SMSGW_CONFIG`) and the default one, where messages may go
//! (`SMSGW_REDIRECT_TO`), how long texts may be (`SMSGW_MAX_SEGMENTS`), how often and how
//! long a message is tried (`SMSGW_MAX_ATTEMPTS`, `SMSGW_PROVIDER_TIMEOUT`,
//! `SMSGW_UNKNOWN_OUTCOME`), how hard a provider is pressed (`SMSGW_RATE_LIMIT`,
//! `SMSGW_PROVIDER_CONCURRENCY`, `SMSGW_CIRCUIT_*`) and how a text is written
//! (`SMSGW_SMART_ENCODING`, `SMSGW_SENDER_COUNTRIES_FILE`).

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    time::Duration,
};

use super::{
    ConfigError, Environment, bad,
    parse::{duration, number, on_or_off},
    provider_file,
    providers::{self, ProviderKindSettings, ProviderSettings},
    senders,
};
use crate::{
    job::JobType,
    phone::{Country, PhoneNumber},
};

/// Every setting of sending a message to a provider.
#[derive(Debug, Clone)]
pub struct DeliverySettings {
    /// Every configured provider (one from the environment, or several from `SMSGW_CONFIG`).
    pub providers: Vec<ProviderSettings>,
    /// Used for schools whose settings name none.
    pub default_provider: String,
    /// Most segments a text of a type may have; longer ones fail before any call.
    pub max_segments: HashMap<JobType, u32>,
    /// Staging: every message goes to this one number instead of its recipient.
    pub redirect_to: Option<PhoneNumber>,
    pub max_attempts: u32,
    /// Upper bound of one provider call; far below RabbitMQ's consumer timeout.
    pub provider_timeout: Duration,
    /// Most calls in flight to one gateway at once (and so most connections open to it).
    pub provider_concurrency: u32,
    /// Outage-like failures in a row that open a provider's circuit.
    pub circuit_threshold: u32,
    /// How long an open circuit pauses the provider before a probe.
    pub circuit_cooldown: Duration,
    /// After an attempt with an unknown outcome, when the provider cannot be asked:
    /// `true` sends again (counted as a possible duplicate), `false` dead-letters.
    pub resend_unknown: bool,
    /// Messages per second for the whole process; `None`: only each provider's own rate.
    pub rate_limit: Option<u32>,
    /// Replace GSM-7 look-alikes when that makes a text GSM-7 (`SMSGW_SMART_ENCODING`).
    pub smart_encoding: bool,
    /// Countries whose carriers refuse alphanumeric senders (`SMSGW_SENDER_COUNTRIES_FILE`).
    pub alphanumeric_refused: Vec<Country>,
}

/// `delivery`: the daemon's rules apply; `false` for a tool that sends nothing itself,
/// which gets the log provider alone.
pub(super) fn delivery(
    get: &impl Fn(&str) -> Option<String>,
    env: Environment,
    delivery: bool,
) -> Result<DeliverySettings, ConfigError> {
    let provider_config = provider_config(get, env, delivery)?;
    if delivery {
        refuse_non_delivering_in_production(env, &provider_config.providers)?;
    }
    let redirect_to = redirect_to(get)?;
    check_redirect(env, redirect_to.as_ref(), &provider_config.providers)?;
    Ok(DeliverySettings {
        max_segments: max_segments(get, &provider_config.max_segments)?,
        providers: provider_config.providers,
        default_provider: provider_config.default_provider,
        redirect_to,
        max_attempts: number(get, "SMSGW_MAX_ATTEMPTS", 6, 1, 100)?,
        rate_limit: rate_limit(get)?,
        provider_timeout: duration(get, "SMSGW_PROVIDER_TIMEOUT", "10s")?,
        circuit_threshold: number(get, "SMSGW_CIRCUIT_THRESHOLD", 5, 1, 10_000)?,
        circuit_cooldown: duration(get, "SMSGW_CIRCUIT_COOLDOWN", "30s")?,
        provider_concurrency: number(get, "SMSGW_PROVIDER_CONCURRENCY", 512, 1, 10_000)?,
        resend_unknown: resend_unknown(get)?,
        smart_encoding: on_or_off(get, "SMSGW_SMART_ENCODING", true)?,
        alphanumeric_refused: senders::refusing_countries(get)?,
    })
}

impl DeliverySettings {
    /// The provider used when a school names none.
    pub fn default_provider_settings(&self) -> Option<&ProviderSettings> {
        self.providers
            .iter()
            .find(|p| p.name == self.default_provider)
    }

    /// One line that says where messages will really go in `env`, with the development
    /// inbox at `http_addr`.
    pub(super) fn destination(&self, env: Environment, http_addr: SocketAddr) -> String {
        let env = env.as_str();
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
                "{env}: provider '{}': messages are kept in the inbox at http://{http_addr}/inbox, \
                 none is sent",
                self.default_provider
            );
        }
        format!("{env}: {}", self.real_destination())
    }

    /// Where messages go when some provider delivers them: the providers, and to whom.
    fn real_destination(&self) -> String {
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
                "{which}: every message is redirected to {}",
                number.masked()
            ),
            // Each provider's description already says that it delivers nothing.
            None if self
                .providers
                .iter()
                .all(|p| p.delivers_nothing().is_some()) =>
            {
                which
            }
            None => format!("{which}: messages go to their real recipients"),
        }
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
        return provider_file::from_file(get, &path, get("SMSGW_PROVIDER"));
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

/// Unset means no process-wide limit; each provider's own `rate` still applies.
fn rate_limit(get: &impl Fn(&str) -> Option<String>) -> Result<Option<u32>, ConfigError> {
    match get("SMSGW_RATE_LIMIT") {
        None => Ok(None),
        Some(_) => Ok(Some(number(get, "SMSGW_RATE_LIMIT", 0, 1, 1_000_000)?)),
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

#[cfg(test)]
mod tests {
    use crate::config::{
        ConfigError, Settings,
        tests::{SID, real_twilio, settings},
    };

    #[test]
    fn smart_encoding_is_on_unless_turned_off() {
        assert!(settings(&[]).expect("defaults").delivery.smart_encoding);
        let off = settings(&[("SMSGW_SMART_ENCODING", "off")]).expect("off");
        assert!(!off.delivery.smart_encoding);
        let error = settings(&[("SMSGW_SMART_ENCODING", "yes")]).expect_err("refused");
        assert_eq!(error.variable, "SMSGW_SMART_ENCODING");
    }

    #[test]
    fn production_refuses_the_inbox() {
        let err = settings(&[("SMSGW_ENV", "production"), ("SMSGW_PROVIDER", "inbox")])
            .expect_err("inbox in production");
        assert_eq!(err.variable, "SMSGW_PROVIDER");
        assert!(err.problem.contains("inbox provider"), "{err}");
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
}
