//! Provider callbacks: delivery receipts (Twilio, Vonage) and inbound STOP/START (Twilio).
//!
//! Nothing is changed for a request whose signature does not check out (403). A receipt
//! for an unknown message is answered 2xx and logged (a provider retrying a 5xx forever
//! helps nobody); malformed bodies get a 400.

use std::{collections::BTreeMap, sync::Arc};

use axum::{
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use base64::Engine;
use hmac::{Hmac, Mac};
use secrecy::ExposeSecret;
use serde_json::Value;
use sha1::Sha1;
use sha2::{Sha256, Sha512};
use time::OffsetDateTime;

use crate::{
    config::{ProviderKindSettings, SignatureMethod},
    metrics::Metrics,
    phone::PhoneNumber,
    provider::Gateways,
    store::{MessageStatus, OptOutChange, Receipt, ReceiptApplied, Store, StoreError},
};

/// What the webhook handlers share.
#[derive(Clone)]
pub struct Webhooks {
    pub gateways: Arc<Gateways>,
    pub store: tokio::sync::watch::Receiver<Option<Store>>,
    pub metrics: Arc<Metrics>,
    /// `SMSGW_PUBLIC_URL`: the base of the URLs providers sign.
    pub public_url: Option<String>,
}

/// Form fields as the request sent them (keys may repeat).
type Params = Vec<(String, String)>;

// ---------------------------------------------------------------------------------------
// Twilio signatures

/// `X-Twilio-Signature`: base64 of HMAC-SHA1, keyed by the auth token, over the URL
/// followed by every parameter name and value, sorted by name (then value).
pub fn twilio_signature(auth_token: &str, url: &str, params: &[(String, String)]) -> String {
    let mac = twilio_mac(auth_token, url, params);
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

fn twilio_mac(auth_token: &str, url: &str, params: &[(String, String)]) -> Hmac<Sha1> {
    let mut sorted: Vec<&(String, String)> = params.iter().collect();
    sorted.sort();
    // HMAC accepts keys of any length.
    let mut mac = Hmac::<Sha1>::new_from_slice(auth_token.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(url.as_bytes());
    for (key, value) in sorted {
        mac.update(key.as_bytes());
        mac.update(value.as_bytes());
    }
    mac
}

/// The URL as given, without its port, and with the scheme's default port: Twilio's
/// helper libraries accept a signature over any of them.
pub fn url_variants(url: &str) -> Vec<String> {
    let mut variants = vec![url.to_owned()];
    if let Ok(parsed) = reqwest::Url::parse(url) {
        let mut without = parsed.clone();
        if without.set_port(None).is_ok() {
            variants.push(without.to_string());
        }
        let default = match parsed.scheme() {
            "https" => Some(443),
            "http" => Some(80),
            _ => None,
        };
        if let Some(port) = default {
            // `Url` drops a default port when it is set, so write it by hand.
            let host = parsed.host_str().unwrap_or_default();
            let rest = &parsed[url::Position::BeforePath..];
            variants.push(format!("{}://{host}:{port}{rest}", parsed.scheme()));
        }
    }
    variants.dedup();
    variants
}

/// Checks a Twilio signature in constant time, against every URL variant.
pub fn verify_twilio(
    auth_token: &str,
    url: &str,
    params: &[(String, String)],
    signature: &str,
) -> bool {
    let Ok(given) = base64::engine::general_purpose::STANDARD.decode(signature.trim()) else {
        return false;
    };
    url_variants(url).iter().any(|variant| {
        twilio_mac(auth_token, variant, params)
            .verify_slice(&given)
            .is_ok()
    })
}

// ---------------------------------------------------------------------------------------
// Vonage signatures

/// Vonage's signature base: `&key=value` for every parameter but `sig`, sorted by name,
/// with `&` and `=` in values replaced by `_`.
fn vonage_base(params: &BTreeMap<String, String>) -> String {
    let mut base = String::new();
    for (key, value) in params.iter().filter(|(k, _)| k.as_str() != "sig") {
        base.push('&');
        base.push_str(key);
        base.push('=');
        base.push_str(&value.replace(['&', '='], "_"));
    }
    base
}

/// The `sig` of a signed Vonage webhook: upper-case hex HMAC of the base.
pub fn vonage_signature(
    secret: &str,
    method: SignatureMethod,
    params: &BTreeMap<String, String>,
) -> String {
    let base = vonage_base(params);
    let bytes = match method {
        SignatureMethod::Sha256 => {
            let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes())
                .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
            mac.update(base.as_bytes());
            mac.finalize().into_bytes().to_vec()
        }
        SignatureMethod::Sha512 => {
            let mut mac = Hmac::<Sha512>::new_from_slice(secret.as_bytes())
                .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
            mac.update(base.as_bytes());
            mac.finalize().into_bytes().to_vec()
        }
    };
    hex::encode_upper(bytes)
}

/// Checks a Vonage `sig` (any case) in constant time.
pub fn verify_vonage(
    secret: &str,
    method: SignatureMethod,
    params: &BTreeMap<String, String>,
) -> bool {
    let Some(given) = params
        .get("sig")
        .and_then(|sig| hex::decode(sig.trim()).ok())
    else {
        return false;
    };
    let base = vonage_base(params);
    match method {
        SignatureMethod::Sha256 => Hmac::<Sha256>::new_from_slice(secret.as_bytes())
            .map(|mut mac| {
                mac.update(base.as_bytes());
                mac.verify_slice(&given).is_ok()
            })
            .unwrap_or(false),
        SignatureMethod::Sha512 => Hmac::<Sha512>::new_from_slice(secret.as_bytes())
            .map(|mut mac| {
                mac.update(base.as_bytes());
                mac.verify_slice(&given).is_ok()
            })
            .unwrap_or(false),
    }
}

/// How old a signed Vonage webhook may be (its `timestamp`), against replays.
const VONAGE_MAX_AGE_SECONDS: i64 = 300;

// ---------------------------------------------------------------------------------------
// Status mapping

/// Twilio's message status onto ours; `None` for statuses that change nothing.
pub fn twilio_status(status: &str) -> Option<MessageStatus> {
    match status {
        "accepted" | "scheduled" | "queued" | "sending" | "sent" => Some(MessageStatus::Sent),
        "delivered" | "read" | "partially_delivered" => Some(MessageStatus::Delivered),
        "undelivered" => Some(MessageStatus::Undelivered),
        "failed" | "canceled" => Some(MessageStatus::Failed),
        _ => None,
    }
}

/// Vonage's delivery receipt status onto ours.
pub fn vonage_status(status: &str) -> Option<MessageStatus> {
    match status {
        "accepted" | "buffered" => Some(MessageStatus::Sent),
        "delivered" => Some(MessageStatus::Delivered),
        "expired" => Some(MessageStatus::Undelivered),
        "failed" | "rejected" => Some(MessageStatus::Failed),
        _ => None,
    }
}

const STOP_WORDS: &[&str] = &[
    "STOP",
    "STOPALL",
    "UNSUBSCRIBE",
    "CANCEL",
    "END",
    "QUIT",
    "REVOKE",
    "OPTOUT",
];
const START_WORDS: &[&str] = &["START", "YES", "UNSTOP"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keyword {
    Stop,
    Start,
}

/// A STOP or START keyword: the whole message, any case, surrounding spaces ignored.
pub fn keyword(body: &str) -> Option<Keyword> {
    let word = body.trim().to_ascii_uppercase();
    if STOP_WORDS.contains(&word.as_str()) {
        Some(Keyword::Stop)
    } else if START_WORDS.contains(&word.as_str()) {
        Some(Keyword::Start)
    } else {
        None
    }
}

// ---------------------------------------------------------------------------------------
// Handlers

/// Reads a form body; `None` when it is not one.
pub fn parse_form(body: &[u8]) -> Option<Vec<(String, String)>> {
    serde_urlencoded::from_bytes::<Params>(body).ok()
}

fn first<'a>(params: &'a Params, key: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

fn reject(status: StatusCode, why: &'static str) -> Response {
    (status, why).into_response()
}

/// A request refused: the status and a line saying why.
type Refusal = (StatusCode, &'static str);

impl Webhooks {
    fn store(&self) -> Option<Store> {
        self.store.borrow().clone()
    }

    /// The configured Twilio providers that may have signed a request for `account_sid`:
    /// their names and auth tokens.
    fn twilio_tokens(&self, account_sid: Option<&str>) -> Vec<(&'static str, String)> {
        self.gateways
            .all()
            .iter()
            .filter_map(|g| match &g.settings.kind {
                ProviderKindSettings::Twilio(t)
                    if account_sid.is_none_or(|sid| sid == t.account_sid) =>
                {
                    Some((g.name, t.auth_token.expose_secret().to_owned()))
                }
                _ => None,
            })
            .collect()
    }

    /// Checks `X-Twilio-Signature` for the request to `path`: the names of the providers
    /// whose token signed it, or the response refusing it.
    fn check_twilio(
        &self,
        path: &str,
        query: Option<&str>,
        headers: &HeaderMap,
        params: &Params,
    ) -> Result<Vec<String>, Refusal> {
        let Some(base) = &self.public_url else {
            tracing::error!(
                "a Twilio webhook came, but SMSGW_PUBLIC_URL is not set: cannot check its signature"
            );
            return Err((StatusCode::FORBIDDEN, "signature cannot be checked\n"));
        };
        let url = match query {
            Some(q) => format!("{base}{path}?{q}"),
            None => format!("{base}{path}"),
        };
        let Some(signature) = headers
            .get("x-twilio-signature")
            .and_then(|v| v.to_str().ok())
        else {
            return Err((StatusCode::FORBIDDEN, "missing X-Twilio-Signature\n"));
        };
        let signers: Vec<String> = self
            .twilio_tokens(first(params, "AccountSid"))
            .into_iter()
            .filter(|(_, token)| verify_twilio(token, &url, params, signature))
            .map(|(name, _)| name.to_owned())
            .collect();
        if signers.is_empty() {
            tracing::warn!(path, "a Twilio webhook with a wrong signature was refused");
            return Err((StatusCode::FORBIDDEN, "bad signature\n"));
        }
        Ok(signers)
    }

    /// The configured Vonage providers whose signature secret signed `params`.
    fn vonage_signers(&self, params: &BTreeMap<String, String>) -> Result<Vec<String>, Refusal> {
        let secrets: Vec<_> = self
            .gateways
            .all()
            .iter()
            .filter_map(|g| match &g.settings.kind {
                ProviderKindSettings::Vonage(v) => v
                    .signature_secret
                    .as_ref()
                    .map(|s| (g.name, s.expose_secret().to_owned(), v.signature_method)),
                _ => None,
            })
            .collect();
        if secrets.is_empty() {
            tracing::error!("a Vonage receipt came, but no Vonage signature secret is configured");
            return Err((StatusCode::FORBIDDEN, "signature cannot be checked\n"));
        }
        let signers: Vec<String> = secrets
            .iter()
            .filter(|(_, secret, method)| verify_vonage(secret, *method, params))
            .map(|(name, ..)| (*name).to_owned())
            .collect();
        if signers.is_empty() || !fresh(params) {
            tracing::warn!("a Vonage receipt with a wrong or stale signature was refused");
            return Err((StatusCode::FORBIDDEN, "bad signature\n"));
        }
        Ok(signers)
    }

    async fn record_receipt(&self, receipt: Receipt<'_>) -> Response {
        match self.apply_receipt(&receipt).await {
            Ok(Some(applied)) => {
                tracing::debug!(
                    job_id = %applied.id,
                    provider_status = receipt.provider_status,
                    "receipt applied"
                );
                StatusCode::NO_CONTENT.into_response()
            }
            Ok(None) => {
                tracing::info!(
                    provider = receipt.provider,
                    provider_message_id = receipt.provider_message_id,
                    "receipt for a message not (yet) known; kept"
                );
                StatusCode::NO_CONTENT.into_response()
            }
            Err(ReceiptError::NotReady) => reject(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
            Err(e) => {
                tracing::warn!(error = %e, "could not record a receipt; the provider will retry");
                reject(StatusCode::SERVICE_UNAVAILABLE, "try again\n")
            }
        }
    }

    /// Counts a receipt, keeps it, moves its message forward and records the opt-out it
    /// may carry: the one path of every receipt, a provider's webhook or the development
    /// inbox's simulated one. `None` when no sent message has its id yet (it is applied
    /// when the send's record lands).
    pub(crate) async fn apply_receipt(
        &self,
        receipt: &Receipt<'_>,
    ) -> Result<Option<ReceiptApplied>, ReceiptError> {
        let store = self.store().ok_or(ReceiptError::NotReady)?;
        self.metrics
            .receipts
            .get_or_create(&crate::metrics::ReceiptLabels {
                provider: receipt.provider.to_owned(),
                status: receipt.provider_status.chars().take(30).collect(),
            })
            .inc();
        let Some(applied) = store.apply_receipt(receipt).await? else {
            return Ok(None);
        };
        self.metrics.observe_receipt_delay(receipt, &applied);
        if receipt.opted_out
            && let Ok(number) = PhoneNumber::parse(&applied.recipient, None)
        {
            store
                .add_opt_out(Some(applied.school_id), &number, "provider")
                .await
                .map_err(ReceiptError::OptOut)?;
            tracing::info!(to = %number.masked(), "receipt says the recipient unsubscribed; opt-out recorded");
        }
        Ok(Some(applied))
    }
}

/// Why a receipt could not be recorded; whoever sent it should try again.
#[derive(Debug, thiserror::Error)]
pub enum ReceiptError {
    #[error("the database has not been reached yet")]
    NotReady,
    #[error("could not record the receipt: {0}")]
    Store(#[from] StoreError),
    #[error("could not record the opt-out of a receipt: {0}")]
    OptOut(StoreError),
}

/// `POST /webhooks/twilio/status`
pub async fn twilio_status_callback(
    State(hooks): State<Webhooks>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(params) = parse_form(&body) else {
        return reject(StatusCode::BAD_REQUEST, "not a form\n");
    };
    let signed_by =
        match hooks.check_twilio("/webhooks/twilio/status", uri.query(), &headers, &params) {
            Ok(signers) => signers,
            Err((status, why)) => return reject(status, why),
        };
    let sid = first(&params, "MessageSid").or_else(|| first(&params, "SmsSid"));
    let status = first(&params, "MessageStatus").or_else(|| first(&params, "SmsStatus"));
    let (Some(sid), Some(status)) = (sid, status) else {
        return reject(
            StatusCode::BAD_REQUEST,
            "MessageSid and MessageStatus are required\n",
        );
    };
    let error_code = first(&params, "ErrorCode").filter(|c| !c.is_empty());
    hooks
        .record_receipt(Receipt {
            provider: "twilio",
            provider_message_id: sid,
            provider_status: status,
            status: twilio_status(status),
            error_code,
            opted_out: error_code == Some("21610"),
            signed_by: &signed_by,
        })
        .await
}

/// `POST /webhooks/twilio/inbound`: STOP and START keywords, each applied once.
///
/// Twilio's signature carries no time, so a captured request stays valid for ever: the
/// message's `MessageSid` is recorded with the change it made, and a request whose sid was
/// applied before is answered as usual and changes nothing. Otherwise a replayed START
/// could undo a STOP sent after it.
pub async fn twilio_inbound(
    State(hooks): State<Webhooks>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(params) = parse_form(&body) else {
        return reject(StatusCode::BAD_REQUEST, "not a form\n");
    };
    if let Err(response) =
        hooks.check_twilio("/webhooks/twilio/inbound", uri.query(), &headers, &params)
    {
        return reject(response.0, response.1);
    }
    let from = first(&params, "From").and_then(|f| PhoneNumber::parse(f, None).ok());
    let word = first(&params, "Body").and_then(keyword);
    if let (Some(from), Some(word)) = (from, word) {
        let Some(sid) = first(&params, "MessageSid").or_else(|| first(&params, "SmsSid")) else {
            return reject(StatusCode::BAD_REQUEST, "MessageSid is required\n");
        };
        if let Err((status, why)) = hooks.apply_keyword(sid, &from, word).await {
            return reject(status, why);
        }
    }
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/xml")],
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response/>",
    )
        .into_response()
}

impl Webhooks {
    /// Applies an inbound keyword from `from`, unless message `sid` was applied before.
    async fn apply_keyword(
        &self,
        sid: &str,
        from: &PhoneNumber,
        word: Keyword,
    ) -> Result<(), Refusal> {
        let Some(store) = self.store() else {
            return Err((StatusCode::SERVICE_UNAVAILABLE, "not ready\n"));
        };
        let change = match word {
            Keyword::Stop => OptOutChange::Stop,
            Keyword::Start => OptOutChange::Start,
        };
        match store
            .apply_inbound_keyword("twilio", sid, from, change)
            .await
        {
            Ok(true) => {
                tracing::info!(from = %from.masked(), keyword = ?word, "inbound keyword recorded");
                Ok(())
            }
            Ok(false) => {
                tracing::warn!(
                    from = %from.masked(),
                    keyword = ?word,
                    "an inbound keyword already applied came again (a replay?); changed nothing"
                );
                Ok(())
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not record an inbound keyword; Twilio will retry");
                Err((StatusCode::SERVICE_UNAVAILABLE, "try again\n"))
            }
        }
    }
}

/// Any JSON scalar as text (Vonage sends strings, but be lenient).
fn scalar(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Whether a signed Vonage webhook's `timestamp` is within [`VONAGE_MAX_AGE_SECONDS`].
fn fresh(params: &BTreeMap<String, String>) -> bool {
    params
        .get("timestamp")
        .and_then(|t| t.trim().parse::<i64>().ok())
        .is_some_and(|t| {
            (OffsetDateTime::now_utc().unix_timestamp() - t).abs() <= VONAGE_MAX_AGE_SECONDS
        })
}

/// A Vonage webhook's parameters, from a JSON object or a form.
fn vonage_params(headers: &HeaderMap, body: &[u8]) -> Result<BTreeMap<String, String>, Refusal> {
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if json {
        match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(object)) => Ok(object
                .iter()
                .filter_map(|(k, v)| scalar(v).map(|v| (k.clone(), v)))
                .collect()),
            _ => Err((StatusCode::BAD_REQUEST, "not a JSON object\n")),
        }
    } else {
        match parse_form(body) {
            Some(params) => Ok(params.into_iter().collect()),
            None => Err((StatusCode::BAD_REQUEST, "not a form\n")),
        }
    }
}

/// `POST /webhooks/vonage/status`: a signed delivery receipt (JSON or form), applied once.
///
/// Besides the timestamp window, each signature is recorded once its receipt is applied:
/// the same signed request replayed within the window changes nothing.
pub async fn vonage_status_callback(
    State(hooks): State<Webhooks>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let params = match vonage_params(&headers, &body) {
        Ok(params) => params,
        Err((status, why)) => return reject(status, why),
    };
    let signed_by = match hooks.vonage_signers(&params) {
        Ok(signers) => signers,
        Err((status, why)) => return reject(status, why),
    };
    let (Some(id), Some(status)) = (params.get("messageId"), params.get("status")) else {
        return reject(
            StatusCode::BAD_REQUEST,
            "messageId and status are required\n",
        );
    };
    // A request that passed `vonage_signers` has its `sig`; any case is the same one.
    let signature = params
        .get("sig")
        .map(|s| s.trim().to_ascii_uppercase())
        .unwrap_or_default();
    if let Some(done) = hooks.seen_before("vonage", &signature).await {
        return done;
    }
    let error_code = params
        .get("err-code")
        .map(String::as_str)
        .filter(|c| !c.is_empty() && *c != "0");
    let response = hooks
        .record_receipt(Receipt {
            provider: "vonage",
            provider_message_id: id,
            provider_status: status,
            status: vonage_status(status),
            error_code,
            opted_out: false,
            signed_by: &signed_by,
        })
        .await;
    if response.status().is_success() {
        hooks.remember("vonage", &signature).await;
    }
    response
}

impl Webhooks {
    /// The answer to a webhook applied before (`Some`: a replay, answered 2xx, nothing
    /// changed); `None` to go on. When the database cannot say, the provider tries again.
    async fn seen_before(&self, provider: &str, webhook_id: &str) -> Option<Response> {
        let Some(store) = self.store() else {
            return Some(reject(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"));
        };
        match store.webhook_seen(provider, webhook_id).await {
            Ok(false) => None,
            Ok(true) => {
                tracing::warn!(
                    provider,
                    "a webhook already applied came again (a replay?); changed nothing"
                );
                Some(StatusCode::NO_CONTENT.into_response())
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not check a webhook against those applied");
                Some(reject(StatusCode::SERVICE_UNAVAILABLE, "try again\n"))
            }
        }
    }

    /// Records an applied webhook. Failing here loses only the replay check of a receipt,
    /// which never moves a message backwards anyway.
    async fn remember(&self, provider: &str, webhook_id: &str) {
        if let Some(store) = self.store()
            && let Err(e) = store.record_webhook(provider, webhook_id).await
        {
            tracing::warn!(error = %e, "could not record an applied webhook");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(list: &[(&str, &str)]) -> Params {
        list.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn keywords_are_whole_words_in_any_case() {
        assert_eq!(keyword("stop"), Some(Keyword::Stop));
        assert_eq!(keyword("  Unsubscribe \n"), Some(Keyword::Stop));
        assert_eq!(keyword("OPTOUT"), Some(Keyword::Stop));
        assert_eq!(keyword("start"), Some(Keyword::Start));
        assert_eq!(keyword("Yes"), Some(Keyword::Start));
        assert_eq!(keyword("please stop"), None);
        assert_eq!(keyword("stopping"), None);
    }

    #[test]
    fn vonage_signatures_sort_and_escape() {
        let params: BTreeMap<String, String> = [("b", "2"), ("a", "x&y=z"), ("sig", "ignored")]
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        assert_eq!(vonage_base(&params), "&a=x_y_z&b=2");
        let mut signed = params.clone();
        signed.insert(
            "sig".into(),
            vonage_signature("secret", SignatureMethod::Sha256, &params).to_lowercase(),
        );
        assert!(verify_vonage("secret", SignatureMethod::Sha256, &signed));
        assert!(!verify_vonage("other", SignatureMethod::Sha256, &signed));
        signed.insert("b".into(), "3".into());
        assert!(!verify_vonage("secret", SignatureMethod::Sha256, &signed));
    }

    #[test]
    fn url_variants_add_and_remove_ports() {
        let variants = url_variants("https://example.com:8443/hook?a=1");
        assert!(variants.contains(&"https://example.com/hook?a=1".to_owned()));
        assert!(variants.contains(&"https://example.com:443/hook?a=1".to_owned()));
        assert!(
            url_variants("http://example.com/hook")
                .contains(&"http://example.com:80/hook".to_owned())
        );
    }

    #[test]
    fn a_forged_signature_is_refused() {
        let params = pairs(&[("MessageSid", "SM1"), ("MessageStatus", "delivered")]);
        let good = twilio_signature("token", "https://x.example/webhooks/twilio/status", &params);
        assert!(verify_twilio(
            "token",
            "https://x.example/webhooks/twilio/status",
            &params,
            &good
        ));
        assert!(!verify_twilio(
            "other",
            "https://x.example/webhooks/twilio/status",
            &params,
            &good
        ));
        assert!(!verify_twilio(
            "token",
            "https://x.example/webhooks/twilio/status",
            &params,
            "not base64!"
        ));
        let tampered = pairs(&[("MessageSid", "SM1"), ("MessageStatus", "failed")]);
        assert!(!verify_twilio(
            "token",
            "https://x.example/webhooks/twilio/status",
            &tampered,
            &good
        ));
    }
}
