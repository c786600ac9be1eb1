//! Vonage's SMS API (`POST /sms/json`), built to Vonage's OpenAPI description: form-encoded
//! with `api_key`/`api_secret`, and an answer of HTTP 200 whose `messages[].status` says
//! whether each part was taken (`"0"`) or why not.

pub mod callbacks;

use std::time::{Duration, Instant};

use reqwest::{StatusCode, header::RETRY_AFTER};
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;

use super::{Accepted, OutboundSms, ProviderError, ValidityBounds, parse_retry_after};
use crate::{
    config::VonageSettings,
    policy::sender::ProviderSender,
    segments::{Encoding, segment},
};

const MAX_ANSWER_BYTES: usize = 64 * 1024;
/// `ttl`: milliseconds from 20,000 to 604,800,000 (7 days) the carrier keeps trying, as
/// Vonage's SMS API description documents.
pub const VALIDITY: ValidityBounds = ValidityBounds {
    min: Duration::from_millis(20_000),
    max: Duration::from_millis(604_800_000),
};

/// Vonage status codes (`x-errors`) that another gateway may not share: our account,
/// credentials, sender or credit, not the recipient.
const OTHER_GATEWAY_MAY_SUCCEED: &[&str] = &["4", "8", "9", "11", "15", "29"];

#[derive(Debug, Clone)]
pub struct Vonage {
    client: reqwest::Client,
    /// Parsed once, not for every call.
    url: reqwest::Url,
    api_key: String,
    /// Never logged; only put into the request form.
    api_secret: SecretString,
    from: String,
    callback: Option<String>,
    timeout: Duration,
}

impl Vonage {
    pub fn new(
        settings: &VonageSettings,
        public_url: Option<&str>,
        timeout: Duration,
    ) -> Result<Self, String> {
        let client = super::http_client(timeout).map_err(|e| e.to_string())?;
        let url = format!("{}/sms/json", settings.base_url);
        let url = reqwest::Url::parse(&url)
            .map_err(|e| format!("the SMS URL '{url}' is not valid: {e}"))?;
        Ok(Vonage {
            client,
            url,
            api_key: settings.api_key.clone(),
            api_secret: settings.api_secret.clone(),
            from: settings.from.clone(),
            callback: public_url.map(|url| format!("{url}/webhooks/vonage/status")),
            timeout,
        })
    }

    /// Vonage's `from` is a number when it is digits (with or without the plus).
    pub(super) fn default_sender(&self) -> ProviderSender {
        let digits = self.from.trim_start_matches('+');
        if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
            ProviderSender::Number
        } else {
            ProviderSender::Alphanumeric
        }
    }

    fn form(&self, sms: &OutboundSms<'_>) -> Vec<(&'static str, String)> {
        let kind = match segment(sms.body).encoding {
            Encoding::Gsm7 => "text",
            Encoding::Ucs2 => "unicode",
        };
        let mut form = vec![
            ("api_key", self.api_key.clone()),
            ("api_secret", self.api_secret.expose_secret().to_owned()),
            (
                "from",
                sms.sender
                    .map(|s| s.as_str().trim_start_matches('+').to_owned())
                    .unwrap_or_else(|| self.from.trim_start_matches('+').to_owned()),
            ),
            // Vonage wants E.164 digits without the plus.
            ("to", sms.to.as_str().trim_start_matches('+').to_owned()),
            ("text", sms.body.to_owned()),
            ("type", kind.to_owned()),
            ("client-ref", sms.message_id.to_string()),
        ];
        if let Some(callback) = &self.callback {
            form.push(("status-report-req", "true".to_owned()));
            form.push(("callback", callback.clone()));
        }
        if let Some(validity) = sms.validity {
            let ms = validity.clamp(VALIDITY.min, VALIDITY.max).as_millis();
            form.push(("ttl", ms.to_string()));
        }
        form
    }

    pub async fn send(&self, sms: &OutboundSms<'_>) -> Result<Accepted, ProviderError> {
        let started = Instant::now();
        let response = self
            .client
            .post(self.url.clone())
            .form(&self.form(sms))
            .send()
            .await
            .map_err(|e| self.transport_error(e, started))?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        let mut response = response;
        let mut body = Vec::new();
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    let room = MAX_ANSWER_BYTES.saturating_sub(body.len());
                    body.extend_from_slice(&chunk[..chunk.len().min(room)]);
                    if body.len() >= MAX_ANSWER_BYTES {
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => return Err(self.transport_error(e, started)),
            }
        }
        interpret(status, retry_after, &body)
    }

    fn transport_error(&self, error: reqwest::Error, started: Instant) -> ProviderError {
        let error = error.without_url();
        if error.is_timeout() {
            ProviderError::Timeout {
                after: started.elapsed().min(self.timeout),
            }
        } else if error.is_connect() {
            ProviderError::Unreachable {
                detail: error.to_string(),
            }
        } else {
            ProviderError::ConnectionLost {
                detail: error.to_string(),
            }
        }
    }
}

fn text_of(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(s) => Some(s.chars().take(300).collect()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Turns Vonage's answer into ours. Pure, so every branch is unit-tested.
fn interpret(
    status: StatusCode,
    retry_after: Option<Duration>,
    body: &[u8],
) -> Result<Accepted, ProviderError> {
    let http_status = status.as_u16();
    if let Some(error) = http_refusal(status, retry_after) {
        return Err(error);
    }
    let Some(parts) = message_parts(body) else {
        return Err(ProviderError::Unreadable {
            http_status,
            detail: "no messages[] in the answer".into(),
        });
    };
    // Every part must be taken; the first refusal decides.
    if let Some(error) = parts
        .iter()
        .find_map(|part| part_refusal(part, http_status, retry_after))
    {
        return Err(error);
    }
    match text_of(parts[0].get("message-id")) {
        Some(id) if !id.is_empty() => Ok(Accepted {
            provider_message_id: id,
            http_status: Some(http_status),
        }),
        _ => Err(ProviderError::Unreadable {
            http_status,
            detail: "accepted without a message-id".into(),
        }),
    }
}

/// A refusal told by the HTTP status alone, before the body is read.
fn http_refusal(status: StatusCode, retry_after: Option<Duration>) -> Option<ProviderError> {
    let http_status = status.as_u16();
    if status == StatusCode::TOO_MANY_REQUESTS {
        return Some(ProviderError::Throttled {
            http_status,
            code: None,
            message: None,
            retry_after,
        });
    }
    if status.is_server_error() {
        return Some(ProviderError::Unavailable {
            http_status,
            code: None,
            message: None,
            retry_after,
        });
    }
    if !status.is_success() {
        return Some(ProviderError::Rejected {
            http_status,
            code: None,
            message: format!("HTTP {http_status}"),
            recipient_opted_out: false,
            other_gateway_may_succeed: true,
        });
    }
    None
}

/// `messages[]` of the answer, one entry per part of the text; `None` if there is none.
fn message_parts(body: &[u8]) -> Option<Vec<Value>> {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("messages").and_then(Value::as_array).cloned())
        .filter(|parts| !parts.is_empty())
}

/// Why Vonage did not take this part, if it did not (its `status` is not `"0"`).
fn part_refusal(
    part: &Value,
    http_status: u16,
    retry_after: Option<Duration>,
) -> Option<ProviderError> {
    let code = text_of(part.get("status")).unwrap_or_else(|| "?".into());
    if code == "0" {
        return None;
    }
    let message = text_of(part.get("error-text")).unwrap_or_else(|| format!("status {code}"));
    Some(match code.as_str() {
        "1" => ProviderError::Throttled {
            http_status,
            code: Some(code),
            message: Some(message),
            retry_after,
        },
        "5" | "10" => ProviderError::Unavailable {
            http_status,
            code: Some(code),
            message: Some(message),
            retry_after,
        },
        "?" => ProviderError::Unreadable {
            http_status,
            detail: "a message part has no status".into(),
        },
        _ => ProviderError::Rejected {
            http_status,
            other_gateway_may_succeed: OTHER_GATEWAY_MAY_SUCCEED.contains(&code.as_str()),
            code: Some(code),
            message,
            recipient_opted_out: false,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_0_is_accepted_with_its_message_id() {
        let body = br#"{"message-count": "1", "messages": [{"to": "447700900000", "message-id": "0A0000000123ABCD1", "status": "0", "remaining-balance": "3.14", "message-price": "0.03", "network": "12345"}]}"#;
        let accepted = interpret(StatusCode::OK, None, body).expect("accepted");
        assert_eq!(accepted.provider_message_id, "0A0000000123ABCD1");
    }

    #[test]
    fn a_refusal_inside_http_200_is_read_from_the_status() {
        let throttled =
            br#"{"message-count": "1", "messages": [{"status": "1", "error-text": "Throttled"}]}"#;
        let err = interpret(StatusCode::OK, None, throttled).expect_err("throttled");
        assert!(err.is_retryable());
        assert!(matches!(err, ProviderError::Throttled { .. }));

        let invalid =
            br#"{"message-count": "1", "messages": [{"status": "3", "error-text": "Invalid to"}]}"#;
        let err = interpret(StatusCode::OK, None, invalid).expect_err("invalid");
        assert!(!err.is_retryable());
        assert_eq!(err.code(), Some("3"));
        assert!(!err.other_gateway_may_succeed());

        let credentials = br#"{"message-count": "1", "messages": [{"status": "4", "error-text": "Bad Credentials"}]}"#;
        let err = interpret(StatusCode::OK, None, credentials).expect_err("credentials");
        assert!(err.other_gateway_may_succeed());
    }

    #[test]
    fn every_part_must_be_taken() {
        let body = br#"{"message-count": "2", "messages": [{"status": "0", "message-id": "A"}, {"status": "9", "error-text": "Quota"}]}"#;
        let err = interpret(StatusCode::OK, None, body).expect_err("second part refused");
        assert_eq!(err.code(), Some("9"));
    }

    #[test]
    fn garbage_is_unreadable_not_a_panic() {
        for body in [
            &b"<html>"[..],
            b"{}",
            b"{\"messages\": []}",
            b"",
            b"{\"messages\": [{}]}",
        ] {
            let err = interpret(StatusCode::OK, None, body).expect_err("garbage");
            assert!(matches!(err, ProviderError::Unreadable { .. }), "{err:?}");
        }
        let err = interpret(StatusCode::BAD_GATEWAY, None, b"<html>").expect_err("5xx");
        assert!(err.is_retryable());
    }
}
