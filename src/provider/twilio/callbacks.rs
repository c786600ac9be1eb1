//! Twilio's webhooks: status callbacks (delivery receipts) and inbound messages, each
//! signed with `X-Twilio-Signature`. Read and verified here, so that nothing outside this
//! adapter knows their field names, status words or signature scheme.

use base64::Engine;
use hmac::{Hmac, Mac};
use secrecy::ExposeSecret;
use sha1::Sha1;

use super::CODE_UNSUBSCRIBED;
use crate::{
    config::ProviderKindSettings,
    phone::PhoneNumber,
    provider::{
        Gateways,
        callback::{Callback, InboundText, ReceiptReport, Refused, our_number, parse_form},
    },
    store::Status,
};

/// What Twilio expects back from an inbound message's webhook: TwiML that sends nothing.
pub const INBOUND_ANSWER: (&str, &str) = (
    "text/xml",
    "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response/>",
);

type Params = Vec<(String, String)>;

/// A status callback, read once its signature is checked.
pub fn read_status(gateways: &Gateways, request: &Callback<'_>) -> Result<ReceiptReport, Refused> {
    let params = parse_form(request.body).ok_or(Refused::Malformed("not a form\n"))?;
    let signed_by = signers(gateways, request, &params)?;
    let sid = first(&params, "MessageSid").or_else(|| first(&params, "SmsSid"));
    let status = first(&params, "MessageStatus").or_else(|| first(&params, "SmsStatus"));
    let (Some(sid), Some(status)) = (sid, status) else {
        return Err(Refused::Malformed("MessageSid and Status are required\n"));
    };
    let error_code = first(&params, "ErrorCode").filter(|c| !c.is_empty());
    Ok(ReceiptReport {
        provider: "twilio",
        provider_message_id: sid.to_owned(),
        provider_status: status.to_owned(),
        status: status_of(status),
        error_code: error_code.map(str::to_owned),
        opted_out: error_code == Some(CODE_UNSUBSCRIBED),
        signed_by,
        // Twilio's signature carries no time, so a captured receipt stays valid for ever:
        // replayed after the student's START, its opt-out would undo it. Twilio sends
        // each status of a message once, with the same error code.
        replay_key: Some(replay_key(sid, status, error_code)),
    })
}

/// The key a status callback is applied once by.
fn replay_key(sid: &str, status: &str, error_code: Option<&str>) -> String {
    format!("status:{sid}:{status}:{}", error_code.unwrap_or_default())
}

/// An inbound message, read once its signature is checked.
pub fn read_inbound(gateways: &Gateways, request: &Callback<'_>) -> Result<InboundText, Refused> {
    let params = parse_form(request.body).ok_or(Refused::Malformed("not a form\n"))?;
    let signed_by = signers(gateways, request, &params)?;
    let id = first(&params, "MessageSid")
        .or_else(|| first(&params, "SmsSid"))
        .filter(|id| !id.trim().is_empty())
        .ok_or(Refused::Malformed("MessageSid is required\n"))?;
    let from = first(&params, "From")
        .and_then(|f| PhoneNumber::parse(f, None).ok())
        .ok_or(Refused::Malformed(
            "From is missing or not a phone number\n",
        ))?;
    Ok(InboundText {
        provider: "twilio",
        provider_message_id: id.to_owned(),
        from,
        to: our_number(first(&params, "To").unwrap_or_default()),
        body: first(&params, "Body").unwrap_or_default().to_owned(),
        signed_by,
    })
}

/// Twilio's message status onto ours; `None` for statuses that change nothing.
pub fn status_of(status: &str) -> Option<Status> {
    match status {
        "accepted" | "scheduled" | "queued" | "sending" | "sent" => Some(Status::Sent),
        "delivered" | "read" | "partially_delivered" => Some(Status::Delivered),
        "undelivered" => Some(Status::Undelivered),
        "failed" | "canceled" => Some(Status::Failed),
        _ => None,
    }
}

fn first<'a>(params: &'a Params, key: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// The names of the configured Twilio providers whose auth token signed the request.
fn signers(
    gateways: &Gateways,
    request: &Callback<'_>,
    params: &Params,
) -> Result<Vec<String>, Refused> {
    let Some(url) = request.url else {
        tracing::error!(
            "a Twilio webhook came, but SMSGW_PUBLIC_URL is not set: cannot check its signature"
        );
        return Err(Refused::Unsigned("signature cannot be checked\n"));
    };
    let Some(signature) = request
        .headers
        .get("x-twilio-signature")
        .and_then(|v| v.to_str().ok())
    else {
        return Err(Refused::Unsigned("missing X-Twilio-Signature\n"));
    };
    let signers: Vec<String> = tokens(gateways, first(params, "AccountSid"))
        .into_iter()
        .filter(|(_, token)| verify(token, url, params, signature))
        .map(|(name, _)| name.to_owned())
        .collect();
    if signers.is_empty() {
        tracing::warn!("a Twilio webhook with a wrong signature was refused");
        return Err(Refused::Unsigned("bad signature\n"));
    }
    Ok(signers)
}

/// The configured Twilio providers that may have signed a request for `account_sid`:
/// their names and auth tokens.
fn tokens(gateways: &Gateways, account_sid: Option<&str>) -> Vec<(&'static str, String)> {
    gateways
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

/// `X-Twilio-Signature`: base64 of HMAC-SHA1, keyed by the auth token, over the URL
/// followed by every parameter name and value, sorted by name (then value).
pub fn signature(auth_token: &str, url: &str, params: &[(String, String)]) -> String {
    let mac = mac(auth_token, url, params);
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

fn mac(auth_token: &str, url: &str, params: &[(String, String)]) -> Hmac<Sha1> {
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
pub fn verify(auth_token: &str, url: &str, params: &[(String, String)], signature: &str) -> bool {
    let Ok(given) = base64::engine::general_purpose::STANDARD.decode(signature.trim()) else {
        return false;
    };
    url_variants(url).iter().any(|variant| {
        mac(auth_token, variant, params)
            .verify_slice(&given)
            .is_ok()
    })
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
        let url = "https://x.example/webhooks/twilio/status";
        let params = pairs(&[("MessageSid", "SM1"), ("MessageStatus", "delivered")]);
        let good = signature("token", url, &params);
        assert!(verify("token", url, &params, &good));
        assert!(!verify("other", url, &params, &good));
        assert!(!verify("token", url, &params, "not base64!"));
        let tampered = pairs(&[("MessageSid", "SM1"), ("MessageStatus", "failed")]);
        assert!(!verify("token", url, &tampered, &good));
    }
}
