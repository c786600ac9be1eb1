//! Vonage's webhooks: delivery receipts and inbound messages, as JSON or a form, signed
//! with the account's signature secret (`sig`, `timestamp`, `nonce`). Read and verified here, so that nothing
//! outside this adapter knows their field names, status words or signature scheme.

use std::collections::BTreeMap;

use hmac::{Hmac, Mac, digest::KeyInit};
use md5::{Digest, Md5};
use reqwest::header::{CONTENT_TYPE, HeaderMap};
use secrecy::ExposeSecret;
use serde_json::Value;
use sha1::Sha1;
use sha2::{Sha256, Sha512};
use subtle::ConstantTimeEq;
use time::OffsetDateTime;

use crate::{
    config::{ProviderKindSettings, SignatureMethod},
    phone::PhoneNumber,
    provider::{
        Gateways,
        callback::{Callback, InboundText, ReceiptReport, Refused, our_number, parse_form},
    },
    store::Status,
};

/// How old a signed webhook may be (its `timestamp`), against replays.
const MAX_AGE_SECONDS: i64 = 300;

/// How long a Vonage webhook can be replayed and accepted: its timestamp may be up to
/// [`MAX_AGE_SECONDS`] from our clock either way, so a copy of one received now is
/// refused from twice that on. Its record is useless after.
pub const REPLAY_WINDOW: std::time::Duration =
    std::time::Duration::from_secs(2 * MAX_AGE_SECONDS as u64);

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

/// An inbound message (JSON or form), read once its signature is checked. Numbers come
/// without `+`; they are read as E.164. Each part of a long message comes on its own,
/// with its own `messageId`, and is taken as its own text.
pub fn read_inbound(gateways: &Gateways, request: &Callback<'_>) -> Result<InboundText, Refused> {
    let params = params(request.headers, request.body)?;
    let signed_by = signers(gateways, &params)?;
    let id = params
        .get("messageId")
        .filter(|id| !id.trim().is_empty())
        .ok_or(Refused::Malformed("messageId is required\n"))?;
    let from = params
        .get("msisdn")
        .map(|n| our_number(n))
        .and_then(|n| PhoneNumber::parse(&n, None).ok())
        .ok_or(Refused::Malformed(
            "msisdn is missing or not a phone number\n",
        ))?;
    Ok(InboundText {
        provider: "vonage",
        provider_message_id: id.clone(),
        from,
        to: our_number(params.get("to").map_or("", String::as_str)),
        body: params.get("text").cloned().unwrap_or_default(),
        signed_by,
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

/// The `sig` of a signed webhook: the base digested as `method` says, upper-case hex.
pub fn signature(secret: &str, method: SignatureMethod, params: &Params) -> String {
    hex::encode_upper(digest(secret, method, &base(params)))
}

/// Checks a `sig` (any case) in constant time.
pub fn verify(secret: &str, method: SignatureMethod, params: &Params) -> bool {
    let Some(given) = params
        .get("sig")
        .and_then(|sig| hex::decode(sig.trim()).ok())
    else {
        return false;
    };
    let expected = digest(secret, method, &base(params));
    bool::from(expected.as_slice().ct_eq(given.as_slice()))
}

fn digest(secret: &str, method: SignatureMethod, base: &str) -> Vec<u8> {
    match method {
        SignatureMethod::Md5Hash => Md5::digest(format!("{base}{secret}").as_bytes()).to_vec(),
        SignatureMethod::Md5 => mac::<Hmac<Md5>>(secret, base),
        SignatureMethod::Sha1 => mac::<Hmac<Sha1>>(secret, base),
        SignatureMethod::Sha256 => mac::<Hmac<Sha256>>(secret, base),
        SignatureMethod::Sha512 => mac::<Hmac<Sha512>>(secret, base),
    }
}

fn mac<M: Mac + KeyInit>(secret: &str, base: &str) -> Vec<u8> {
    let mut mac = <M as KeyInit>::new_from_slice(secret.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(base.as_bytes());
    mac.finalize().into_bytes().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every method Vonage offers, over one base, against digests computed by hand with
    /// the reference tools (`printf '&a=1&b=2secret' | md5sum`, `openssl dgst -hmac`).
    #[test]
    fn every_signature_method_digests_as_vonage_documents() {
        let params: Params = [("a", "1"), ("b", "2")]
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        for (method, expected) in KNOWN_DIGESTS {
            assert_eq!(signature("secret", method, &params), expected, "{method:?}");
            let mut signed = params.clone();
            signed.insert("sig".into(), expected.to_lowercase());
            assert!(verify("secret", method, &signed), "{method:?}");
            assert!(!verify("wrong", method, &signed), "{method:?}");
        }
    }

    const KNOWN_DIGESTS: [(SignatureMethod, &str); 5] = [
        (SignatureMethod::Md5Hash, "0C3EF6D3BBC60C8C0F3158AE13336710"),
        (SignatureMethod::Md5, "1037DFE6B32747580F3097BBFFC9FEEC"),
        (
            SignatureMethod::Sha1,
            "8944C160BB8BF9A0C8D77ACEEA5E34B30A4A50BF",
        ),
        (
            SignatureMethod::Sha256,
            "1AD820E7A6CEA8F79FCB8EC77D44CDAAA19FBE3FFFD1BBFBCC5336F94AB56457",
        ),
        (
            SignatureMethod::Sha512,
            "0F3B7F4A942B94FD698EB0E805BA7B54D3C597445E5D214404DFD800FB2CD4C8\
             4420319C96E264B4405F52B58EAFE4B94F9113DD4C1F625227FBFE47185ACC86",
        ),
    ];

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
