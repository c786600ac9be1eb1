//! Provider settings: one provider from the environment (`SMSGW_PROVIDER` with `TWILIO_*`
//! or `VONAGE_*`), or several named ones from the TOML file in `SMSGW_CONFIG` (read in
//! `provider_file`); what each reaches, and how it is described at start-up.

use std::collections::BTreeMap;

use secrecy::SecretString;

use super::{ConfigError, bad};

pub const DEFAULT_TWILIO_BASE_URL: &str = "https://api.twilio.com";
pub const DEFAULT_VONAGE_BASE_URL: &str = "https://rest.nexmo.com";
/// The providers' own domains: a base URL on one of them (or below) reaches real phones.
const TWILIO_DOMAINS: &[&str] = &["twilio.com"];
const VONAGE_DOMAINS: &[&str] = &["nexmo.com", "vonage.com"];

/// Whether `base_url`'s host is one of `domains` or a host below one. A URL without a
/// readable host counts as inside: when in doubt, a provider reaches real phones.
fn host_within(base_url: &str, domains: &[&str]) -> bool {
    let Some(host) = url::Url::parse(base_url).ok().and_then(|u| {
        u.host_str()
            .map(|h| h.trim_end_matches('.').to_ascii_lowercase())
    }) else {
        return true;
    };
    domains
        .iter()
        .any(|d| host == *d || host.ends_with(&format!(".{d}")))
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

/// How Vonage signs its webhooks (the account's "signature method").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignatureMethod {
    /// MD5 of the parameters followed by the secret (Vonage's `md5hash`).
    Md5Hash,
    /// HMAC-MD5 keyed by the secret.
    Md5,
    Sha1,
    Sha256,
    Sha512,
}

/// Vonage's SMS API.
#[derive(Debug, Clone)]
pub struct VonageSettings {
    pub api_key: String,
    pub api_secret: SecretString,
    /// Default sender (number or alphanumeric); a school's `sender_id` overrides it.
    pub from: String,
    pub base_url: String,
    /// Checks signed delivery receipts.
    pub signature_secret: Option<SecretString>,
    pub signature_method: SignatureMethod,
}

#[derive(Debug, Clone)]
pub enum ProviderKindSettings {
    Log,
    /// The development inbox: nothing leaves the machine; every message is kept and shown.
    Inbox,
    Twilio(TwilioSettings),
    Vonage(VonageSettings),
}

/// One named provider.
#[derive(Debug, Clone)]
pub struct ProviderSettings {
    pub name: String,
    pub kind: ProviderKindSettings,
    /// Most calls per second to this provider (also bounded by `SMSGW_RATE_LIMIT`).
    pub rate: Option<u32>,
}

impl ProviderSettings {
    pub fn type_name(&self) -> &'static str {
        match self.kind {
            ProviderKindSettings::Log => "log",
            ProviderKindSettings::Inbox => "inbox",
            ProviderKindSettings::Twilio(_) => "twilio",
            ProviderKindSettings::Vonage(_) => "vonage",
        }
    }

    /// Whether messages sent through this provider get delivery receipts: a real API only
    /// when smsgw has a public URL to give it; the inbox always simulates them.
    pub fn sends_receipts(&self, public_url: bool) -> bool {
        match self.kind {
            ProviderKindSettings::Log => false,
            ProviderKindSettings::Inbox => true,
            ProviderKindSettings::Twilio(_) | ProviderKindSettings::Vonage(_) => public_url,
        }
    }

    /// Whether this provider reaches real phones: a real API, not the log, the inbox, a
    /// sandbox or a stub. Decided from the base URL's host, so that any port, path or
    /// regional host of the provider counts as real, and staging cannot run unredirected
    /// against it.
    pub fn reaches_real_phones(&self) -> bool {
        match &self.kind {
            ProviderKindSettings::Log | ProviderKindSettings::Inbox => false,
            ProviderKindSettings::Twilio(t) => {
                !t.sandbox && host_within(&t.base_url, TWILIO_DOMAINS)
            }
            ProviderKindSettings::Vonage(v) => host_within(&v.base_url, VONAGE_DOMAINS),
        }
    }

    /// Why production refuses this provider, if it does: it would deliver nothing while
    /// the log says sent. What it is, and why that is refused.
    pub fn delivers_nothing(&self) -> Option<(&'static str, &'static str)> {
        match &self.kind {
            ProviderKindSettings::Log => {
                Some(("the log provider", "it would silently send nothing"))
            }
            ProviderKindSettings::Inbox => Some((
                "the inbox provider",
                "it sends nothing, and keeps every text, login codes included",
            )),
            ProviderKindSettings::Twilio(t) if t.sandbox => Some((
                "a sandbox provider",
                "Twilio's test credentials accept messages and deliver none",
            )),
            ProviderKindSettings::Twilio(_) | ProviderKindSettings::Vonage(_) => None,
        }
    }

    /// Where this provider sends, for the start-up line.
    pub fn describe(&self) -> String {
        match &self.kind {
            ProviderKindSettings::Log => format!("'{}' (log: nothing is sent)", self.name),
            ProviderKindSettings::Inbox => {
                format!(
                    "'{}' (inbox: kept and shown at /inbox, nothing is sent)",
                    self.name
                )
            }
            ProviderKindSettings::Twilio(t) if t.sandbox => format!(
                "'{}': twilio sandbox (test credentials): nothing is delivered",
                self.name
            ),
            ProviderKindSettings::Twilio(t) if self.reaches_real_phones() => {
                format!("'{}' via Twilio's API", self.name)
            }
            ProviderKindSettings::Twilio(t) => {
                format!(
                    "'{}' via a Twilio-compatible endpoint at {}",
                    self.name, t.base_url
                )
            }
            ProviderKindSettings::Vonage(_) if self.reaches_real_phones() => {
                format!("'{}' via Vonage's API", self.name)
            }
            ProviderKindSettings::Vonage(v) => {
                format!(
                    "'{}' via a Vonage-compatible endpoint at {}",
                    self.name, v.base_url
                )
            }
        }
    }
}
/// The providers and which one is the default.
#[derive(Debug, Clone)]
pub(super) struct ProviderConfig {
    pub providers: Vec<ProviderSettings>,
    pub default_provider: String,
    pub max_segments: BTreeMap<String, u32>,
}

pub(super) type Get<'a> = &'a dyn Fn(&str) -> Option<String>;

fn is_hex_sid(sid: &str, prefix: &str) -> bool {
    sid.len() == 34 && sid.starts_with(prefix) && sid[2..].chars().all(|c| c.is_ascii_hexdigit())
}

pub(super) fn base_url(
    raw: Option<String>,
    default: &str,
    variable: &'static str,
) -> Result<String, ConfigError> {
    let url = raw
        .unwrap_or_else(|| default.to_owned())
        .trim_end_matches('/')
        .to_owned();
    reqwest::Url::parse(&url).map_err(|e| bad(variable, format!("not a URL: {e}")))?;
    Ok(url)
}

pub(super) fn twilio(
    name: &str,
    account_sid: String,
    auth_token: SecretString,
    from: Option<String>,
    messaging_service_sid: Option<String>,
    base: Option<String>,
    variable: &'static str,
) -> Result<TwilioSettings, ConfigError> {
    if !is_hex_sid(&account_sid, "AC") {
        return Err(bad(
            variable,
            format!("{name}: the account SID is not AC followed by 32 hex digits"),
        ));
    }
    let sender = match (from, messaging_service_sid) {
        (Some(from), None) => TwilioSender::From(from),
        (None, Some(sid)) if is_hex_sid(&sid, "MG") => TwilioSender::MessagingService(sid),
        (None, Some(_)) => {
            return Err(bad(
                variable,
                format!("{name}: the messaging service SID is not MG followed by 32 hex digits"),
            ));
        }
        (Some(_), Some(_)) => {
            return Err(bad(
                variable,
                format!("{name}: give a from number or a messaging service SID, not both"),
            ));
        }
        (None, None) => {
            return Err(bad(
                variable,
                format!("{name}: needs a from number or a messaging service SID"),
            ));
        }
    };
    Ok(TwilioSettings {
        account_sid,
        auth_token,
        sender,
        base_url: base_url(base, DEFAULT_TWILIO_BASE_URL, variable)?,
        sandbox: false,
    })
}

pub(super) fn signature_method(
    raw: Option<&str>,
    variable: &'static str,
) -> Result<SignatureMethod, ConfigError> {
    match raw.map(str::trim) {
        None | Some("sha256") => Ok(SignatureMethod::Sha256),
        Some("sha512") => Ok(SignatureMethod::Sha512),
        Some("sha1") => Ok(SignatureMethod::Sha1),
        Some("md5") => Ok(SignatureMethod::Md5),
        Some("md5hash") => Ok(SignatureMethod::Md5Hash),
        Some(other) => Err(bad(
            variable,
            format!("signature method '{other}' is not one of md5hash, md5, sha1, sha256, sha512"),
        )),
    }
}

/// The single provider named by `SMSGW_PROVIDER`, configured from the environment.
pub(super) fn from_env(get: Get<'_>, kind: &str) -> Result<ProviderConfig, ConfigError> {
    let provider = match kind {
        "log" => ProviderKindSettings::Log,
        "inbox" => ProviderKindSettings::Inbox,
        "twilio" => ProviderKindSettings::Twilio(twilio_from_env(get)?),
        "vonage" => ProviderKindSettings::Vonage(vonage_from_env(get)?),
        other => {
            return Err(bad(
                "SMSGW_PROVIDER",
                format!("unknown provider '{other}' (known: inbox, log, twilio, vonage)"),
            ));
        }
    };
    Ok(ProviderConfig {
        providers: vec![ProviderSettings {
            name: kind.to_owned(),
            kind: provider,
            rate: None,
        }],
        default_provider: kind.to_owned(),
        max_segments: BTreeMap::new(),
    })
}

fn required(get: Get<'_>, name: &'static str, by: &str) -> Result<String, ConfigError> {
    get(name).ok_or_else(|| bad(name, format!("is required by the {by} provider")))
}

fn twilio_from_env(get: Get<'_>) -> Result<TwilioSettings, ConfigError> {
    let from = get("TWILIO_FROM");
    let service = get("TWILIO_MESSAGING_SERVICE_SID");
    // A problem with the sender names the variable the operator actually set.
    let variable = if service.is_some() && from.is_none() {
        "TWILIO_MESSAGING_SERVICE_SID"
    } else {
        "TWILIO_FROM"
    };
    let account_sid = required(get, "TWILIO_ACCOUNT_SID", "twilio")?;
    if !is_hex_sid(&account_sid, "AC") {
        return Err(bad(
            "TWILIO_ACCOUNT_SID",
            "is not an account SID (AC followed by 32 hex digits)",
        ));
    }
    let token = SecretString::from(required(get, "TWILIO_AUTH_TOKEN", "twilio")?);
    twilio(
        "twilio",
        account_sid,
        token,
        from,
        service,
        get("SMSGW_TWILIO_BASE_URL"),
        variable,
    )
}

fn vonage_from_env(get: Get<'_>) -> Result<VonageSettings, ConfigError> {
    Ok(VonageSettings {
        api_key: required(get, "VONAGE_API_KEY", "vonage")?,
        api_secret: SecretString::from(required(get, "VONAGE_API_SECRET", "vonage")?),
        from: required(get, "VONAGE_FROM", "vonage")?,
        base_url: base_url(
            get("SMSGW_VONAGE_BASE_URL"),
            DEFAULT_VONAGE_BASE_URL,
            "SMSGW_VONAGE_BASE_URL",
        )?,
        signature_secret: get("VONAGE_SIGNATURE_SECRET").map(SecretString::from),
        signature_method: signature_method(
            get("VONAGE_SIGNATURE_METHOD").as_deref(),
            "VONAGE_SIGNATURE_METHOD",
        )?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_providers_own_hosts_reach_real_phones_on_any_port_or_region() {
        for url in [
            "https://api.twilio.com",
            "https://api.twilio.com:443",
            "https://API.Twilio.com./2010-04-01",
            "https://api.dublin.ie1.twilio.com",
        ] {
            assert!(host_within(url, TWILIO_DOMAINS), "{url}");
        }
        for url in ["https://rest.nexmo.com:443", "https://api-eu.vonage.com"] {
            assert!(host_within(url, VONAGE_DOMAINS), "{url}");
        }
        for url in [
            "http://127.0.0.1:8089",
            "http://twilio-stub:8080",
            "https://twilio.com.example.org",
            "https://nottwilio.com",
        ] {
            assert!(!host_within(url, TWILIO_DOMAINS), "{url}");
        }
        assert!(host_within("not a url", TWILIO_DOMAINS), "in doubt, real");
    }
}
