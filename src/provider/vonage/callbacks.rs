//! Vonage's webhooks: delivery receipts, as JSON or a form, signed with the account's
//! signature secret (`sig`, `timestamp`, `nonce`). Read and verified here, so that nothing
//! outside this adapter knows their field names, status words or signature scheme.

use std::collections::BTreeMap;

use hmac::{Hmac, Mac};
use reqwest::header::{CONTENT_TYPE, HeaderMap};
use secrecy::ExposeSecret;
use serde_json::Value;
use sha2::{Sha256, Sha512};
use time::OffsetDateTime;

use crate::{
    config::{ProviderKindSettings, SignatureMethod},
    provider::{
        Gateways,
        callback::{Callback, ReceiptReport, Refused, parse_form},
    },
    store::Status,
};

/// How old a signed webhook may be (its `timestamp`), against replays.
const MAX_AGE_SECONDS: i64 = 300;

type Params = BTreeMap<String, String>;

/// A delivery receipt, read once its signature is checked. Its replay key is its
/// signature: the same signed request replayed within the timestamp's window is
/// recognised and changes nothing.
pub fn read_status(gateways: &Gateways, request: &Callback<'_>) -> Result<ReceiptReport, Refused> {
    let params = params(request.headers, request.body)?;
    let signed_by = signers(gateways, &params)?;
    let (Some(id), Some(status)) = (params.get("messageId"), params.get("status")) else {
        return Err(Refused::Malformed("messageId and status are required\n"));
    };
    // A request that passed `signers` has its `sig`; any case is the same one.
    let signature = params
        .get("sig")
        .map(|s| s.trim().to_ascii_uppercase())
        .unwrap_or_default();
    let error_code = params
        .get("err-code")
        .filter(|c| !c.is_empty() && c.as_str() != "0");
    Ok(ReceiptReport {
        provider: "vonage",
        provider_message_id: id.clone(),
        provider_status: status.clone(),
        status: status_of(status),
        error_code: error_code.cloned(),
        opted_out: false,
        signed_by,
        replay_key: Some(signature),
    })
}

/// Vonage's delivery receipt status onto ours.
pub fn status_of(status: &str) -> Option<Status> {
    match status {
        "accepted" | "buffered" => Some(Status::Sent),
        "delivered" => Some(Status::Delivered),
        "expired" => Some(Status::Undelivered),
        "failed" | "rejected" => Some(Status::Failed),
        _ => None,
    }
}

/// The configured Vonage providers whose signature secret signed `params`.
fn signers(gateways: &Gateways, params: &Params) -> Result<Vec<String>, Refused> {
    let secrets: Vec<_> = gateways
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
        tracing::error!("a Vonage webhook came, but no Vonage signature secret is configured");
        return Err(Refused::Unsigned("signature cannot be checked\n"));
    }
    let signers: Vec<String> = secrets
        .iter()
        .filter(|(_, secret, method)| verify(secret, *method, params))
        .map(|(name, ..)| (*name).to_owned())
        .collect();
    if signers.is_empty() || !fresh(params) {
        tracing::warn!("a Vonage webhook with a wrong or stale signature was refused");
        return Err(Refused::Unsigned("bad signature\n"));
    }
    Ok(signers)
}

/// Whether a signed webhook's `timestamp` is within [`MAX_AGE_SECONDS`].
fn fresh(params: &Params) -> bool {
    params
        .get("timestamp")
        .and_then(|t| t.trim().parse::<i64>().ok())
        .is_some_and(|t| (OffsetDateTime::now_utc().unix_timestamp() - t).abs() <= MAX_AGE_SECONDS)
}

/// A webhook's parameters, from a JSON object or a form.
fn params(headers: &HeaderMap, body: &[u8]) -> Result<Params, Refused> {
    let json = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if json {
        match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(object)) => Ok(object
                .iter()
                .filter_map(|(k, v)| scalar(v).map(|v| (k.clone(), v)))
                .collect()),
            _ => Err(Refused::Malformed("not a JSON object\n")),
        }
    } else {
        parse_form(body)
            .map(|pairs| pairs.into_iter().collect())
            .ok_or(Refused::Malformed("not a form\n"))
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

/// Vonage's signature base: `&key=value` for every parameter but `sig`, sorted by name,
/// with `&` and `=` in values replaced by `_`.
fn base(params: &Params) -> String {
    let mut base = String::new();
    for (key, value) in params.iter().filter(|(k, _)| k.as_str() != "sig") {
        base.push('&');
        base.push_str(key);
        base.push('=');
        base.push_str(&value.replace(['&', '='], "_"));
    }
    base
}

/// The `sig` of a signed webhook: upper-case hex HMAC of the base.
pub fn signature(secret: &str, method: SignatureMethod, params: &Params) -> String {
    let base = base(params);
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

/// Checks a `sig` (any case) in constant time.
pub fn verify(secret: &str, method: SignatureMethod, params: &Params) -> bool {
    let Some(given) = params
        .get("sig")
        .and_then(|sig| hex::decode(sig.trim()).ok())
    else {
        return false;
    };
    let base = base(params);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_sort_and_escape() {
        let params: Params = [("b", "2"), ("a", "x&y=z"), ("sig", "ignored")]
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        assert_eq!(base(&params), "&a=x_y_z&b=2");
        let mut signed = params.clone();
        signed.insert(
            "sig".into(),
            signature("secret", SignatureMethod::Sha256, &params).to_lowercase(),
        );
        assert!(verify("secret", SignatureMethod::Sha256, &signed));
        assert!(!verify("other", SignatureMethod::Sha256, &signed));
        signed.insert("b".into(), "3".into());
        assert!(!verify("secret", SignatureMethod::Sha256, &signed));
    }
}
