//! The providers of the TOML file named by `SMSGW_CONFIG`, each under a name of its own:
//!
//! ```toml
//! default_provider = "twilio"
//!
//! [max_segments]
//! login_code = 1
//!
//! [providers.twilio]
//! type = "twilio"
//! account_sid = "AC0123456789abcdef0123456789abcdef"
//! auth_token = { env = "TWILIO_AUTH_TOKEN" }      # secrets only by environment reference
//! messaging_service_sid = "MG0123456789abcdef0123456789abcdef"
//! rate = 50                                        # messages per second
//!
//! [providers.vonage]
//! type = "vonage"
//! api_key = { env = "VONAGE_API_KEY" }
//! api_secret = { env = "VONAGE_API_SECRET" }
//! from = "DriveSafe"
//! signature_secret = { env = "VONAGE_SIGNATURE_SECRET" }
//!
//! [providers.sandbox]
//! type = "twilio"
//! sandbox = true                                   # Twilio's test credentials
//! account_sid = "AC0123456789abcdef0123456789abcdef"
//! auth_token = { env = "TWILIO_TEST_AUTH_TOKEN" }
//! from = "+15005550006"
//!
//! [providers.inbox]
//! type = "inbox"                                   # development: kept and shown at /inbox
//! ```

use std::collections::BTreeMap;

use secrecy::SecretString;
use serde::Deserialize;

use super::{
    ConfigError, bad,
    providers::{
        DEFAULT_VONAGE_BASE_URL, Get, ProviderConfig, ProviderKindSettings, ProviderSettings,
        TwilioSettings, VonageSettings, base_url, signature_method, twilio,
    },
};

/// A value in the file: literal, or `{ env = "NAME" }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum FileValue {
    Plain(String),
    Env { env: String },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    default_provider: Option<String>,
    #[serde(default)]
    max_segments: BTreeMap<String, u32>,
    #[serde(default)]
    providers: BTreeMap<String, FileProvider>,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
enum FileProvider {
    Log { rate: Option<u32> },
    Inbox { rate: Option<u32> },
    Twilio(FileTwilio),
    Vonage(FileVonage),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTwilio {
    account_sid: FileValue,
    auth_token: FileValue,
    from: Option<FileValue>,
    messaging_service_sid: Option<FileValue>,
    base_url: Option<String>,
    rate: Option<u32>,
    /// Test credentials: Twilio accepts every request and delivers nothing.
    #[serde(default)]
    sandbox: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileVonage {
    api_key: FileValue,
    api_secret: FileValue,
    from: FileValue,
    signature_secret: Option<FileValue>,
    signature_method: Option<String>,
    base_url: Option<String>,
    rate: Option<u32>,
}

fn plain(get: Get<'_>, value: &FileValue, what: &str) -> Result<String, ConfigError> {
    match value {
        FileValue::Plain(text) => Ok(text.clone()),
        FileValue::Env { env } => get(env).ok_or_else(|| {
            bad(
                "SMSGW_CONFIG",
                format!("{what} comes from ${env}, which is not set"),
            )
        }),
    }
}

fn secret(get: Get<'_>, value: &FileValue, what: &str) -> Result<SecretString, ConfigError> {
    match value {
        FileValue::Plain(_) => Err(bad(
            "SMSGW_CONFIG",
            format!("{what} is a secret: give it as {{ env = \"VARIABLE\" }}, not in the file"),
        )),
        FileValue::Env { .. } => Ok(SecretString::from(plain(get, value, what)?)),
    }
}

/// The named providers of the TOML file at `path`; `default` (from `SMSGW_PROVIDER`)
/// names the default when the file does not.
pub(super) fn from_file(
    get: Get<'_>,
    path: &str,
    default: Option<String>,
) -> Result<ProviderConfig, ConfigError> {
    let file = read_file(path)?;
    let providers = file
        .providers
        .into_iter()
        .map(|(name, provider)| file_provider(get, name, provider))
        .collect::<Result<Vec<_>, _>>()?;
    if providers.is_empty() {
        return Err(bad(
            "SMSGW_CONFIG",
            format!("{path} declares no [providers.NAME]"),
        ));
    }
    let default_provider = default_provider(file.default_provider, default, &providers)?;
    Ok(ProviderConfig {
        providers,
        default_provider,
        max_segments: file.max_segments,
    })
}

fn read_file(path: &str) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| bad("SMSGW_CONFIG", format!("cannot read {path}: {e}")))?;
    toml::from_str(&text).map_err(|e| bad("SMSGW_CONFIG", format!("{path}: {e}")))
}

/// One `[providers.NAME]` table.
fn file_provider(
    get: Get<'_>,
    name: String,
    provider: FileProvider,
) -> Result<ProviderSettings, ConfigError> {
    check_provider_name(&name)?;
    let (kind, rate) = match provider {
        FileProvider::Log { rate } => (ProviderKindSettings::Log, rate),
        FileProvider::Inbox { rate } => (ProviderKindSettings::Inbox, rate),
        FileProvider::Twilio(file) => {
            let rate = file.rate;
            let settings = twilio_from_file(get, &name, file)?;
            (ProviderKindSettings::Twilio(settings), rate)
        }
        FileProvider::Vonage(file) => {
            let rate = file.rate;
            let settings = vonage_from_file(get, &name, file)?;
            (ProviderKindSettings::Vonage(settings), rate)
        }
    };
    if rate == Some(0) {
        return Err(bad(
            "SMSGW_CONFIG",
            format!("providers.{name}.rate must be at least 1"),
        ));
    }
    Ok(ProviderSettings { name, kind, rate })
}

/// A name labels metrics and log lines, so it is kept short and plain.
fn check_provider_name(name: &str) -> Result<(), ConfigError> {
    if name.is_empty()
        || name.len() > 40
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(bad(
            "SMSGW_CONFIG",
            format!("provider name '{name}': use 1 to 40 letters, digits, '-' or '_'"),
        ));
    }
    Ok(())
}

fn twilio_from_file(
    get: Get<'_>,
    name: &str,
    file: FileTwilio,
) -> Result<TwilioSettings, ConfigError> {
    let what = |field: &str| format!("providers.{name}.{field}");
    let sandbox = file.sandbox;
    let settings = twilio(
        name,
        plain(get, &file.account_sid, &what("account_sid"))?,
        secret(get, &file.auth_token, &what("auth_token"))?,
        file.from
            .map(|v| plain(get, &v, &what("from")))
            .transpose()?,
        file.messaging_service_sid
            .map(|v| plain(get, &v, &what("messaging_service_sid")))
            .transpose()?,
        file.base_url,
        "SMSGW_CONFIG",
    )?;
    Ok(TwilioSettings {
        sandbox,
        ..settings
    })
}

fn vonage_from_file(
    get: Get<'_>,
    name: &str,
    file: FileVonage,
) -> Result<VonageSettings, ConfigError> {
    let what = |field: &str| format!("providers.{name}.{field}");
    Ok(VonageSettings {
        api_key: plain(get, &file.api_key, &what("api_key"))?,
        api_secret: secret(get, &file.api_secret, &what("api_secret"))?,
        from: plain(get, &file.from, &what("from"))?,
        base_url: base_url(file.base_url, DEFAULT_VONAGE_BASE_URL, "SMSGW_CONFIG")?,
        signature_secret: file
            .signature_secret
            .map(|v| secret(get, &v, &what("signature_secret")))
            .transpose()?,
        signature_method: signature_method(file.signature_method.as_deref(), "SMSGW_CONFIG")?,
    })
}

/// The file's `default_provider`, else `SMSGW_PROVIDER`, else the only provider there is.
fn default_provider(
    in_file: Option<String>,
    from_env: Option<String>,
    providers: &[ProviderSettings],
) -> Result<String, ConfigError> {
    let default_provider = in_file
        .or(from_env)
        .or_else(|| (providers.len() == 1).then(|| providers[0].name.clone()))
        .ok_or_else(|| {
            bad(
                "SMSGW_CONFIG",
                "several providers: name the default with default_provider (or SMSGW_PROVIDER)",
            )
        })?;
    if !providers.iter().any(|p| p.name == default_provider) {
        return Err(bad(
            "SMSGW_CONFIG",
            format!("the default provider '{default_provider}' is not declared"),
        ));
    }
    Ok(default_provider)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> String {
        let path = std::env::temp_dir().join(format!(
            "smsgw-config-{}.toml",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::write(&path, text).expect("write");
        path.to_string_lossy().into_owned()
    }

    fn env(name: &str) -> Option<String> {
        match name {
            "TOKEN" => Some("secret-token".into()),
            "KEY" => Some("abcd1234".into()),
            _ => None,
        }
    }

    const TWILIO: &str = r#"
[providers.uk]
type = "twilio"
account_sid = "AC0123456789abcdef0123456789abcdef"
auth_token = { env = "TOKEN" }
from = "+15005550006"
rate = 20
"#;

    #[test]
    fn one_provider_is_its_own_default() {
        let config = from_file(&env, &file(TWILIO), None).expect("valid");
        assert_eq!(config.default_provider, "uk");
        assert_eq!(config.providers[0].rate, Some(20));
        assert!(config.providers[0].reaches_real_phones());
    }

    #[test]
    fn secrets_only_come_from_the_environment() {
        let literal = TWILIO.replace(r#"{ env = "TOKEN" }"#, r#""secret-token""#);
        let err = from_file(&env, &file(&literal), None).expect_err("literal secret");
        assert!(err.problem.contains("auth_token is a secret"), "{err}");
        let missing = TWILIO.replace("TOKEN", "NOT_SET");
        let err = from_file(&env, &file(&missing), None).expect_err("unset variable");
        assert!(err.problem.contains("$NOT_SET"), "{err}");
    }

    #[test]
    fn mistakes_in_the_file_are_named() {
        let two = format!(
            "{TWILIO}\n[providers.eu]\ntype = \"vonage\"\napi_key = {{ env = \"KEY\" }}\napi_secret = {{ env = \"TOKEN\" }}\nfrom = \"DriveSafe\"\n"
        );
        let err = from_file(&env, &file(&two), None).expect_err("no default");
        assert!(err.problem.contains("default_provider"), "{err}");
        let config =
            from_file(&env, &file(&two), Some("eu".into())).expect("default from SMSGW_PROVIDER");
        assert_eq!(config.default_provider, "eu");
        let err = from_file(
            &env,
            &file(&format!("default_provider = \"us\"\n{two}")),
            None,
        )
        .expect_err("unknown default");
        assert!(err.problem.contains("'us' is not declared"), "{err}");
        let err =
            from_file(&env, &file("[providers.x]\ntype = \"fax\"\n"), None).expect_err("type");
        assert!(err.problem.contains("fax"), "{err}");
        let err =
            from_file(&env, &file(&TWILIO.replace("rate", "speed")), None).expect_err("field");
        assert!(err.problem.contains("speed"), "{err}");
        for rate in ["0", "-5", "\"fast\""] {
            let err = from_file(
                &env,
                &file(&TWILIO.replace("rate = 20", &format!("rate = {rate}"))),
                None,
            )
            .expect_err("absurd rate");
            // The message names the field or the bad value (serde's word for it).
            let value = rate.trim_matches('"');
            assert!(
                err.problem.contains("rate") || err.problem.contains(value),
                "{rate}: {err}"
            );
        }
        let err = from_file(&env, "/nonexistent/smsgw.toml", None).expect_err("no file");
        assert!(err.problem.contains("cannot read"), "{err}");
    }
}
