//! Twilio's Create Message (`POST /2010-04-01/Accounts/{AccountSid}/Messages.json`),
//! built to Twilio's OpenAPI description: form-encoded, basic auth, JSON answers.

pub mod callbacks;

use std::time::{Duration, Instant};

use base64::Engine;
use reqwest::{
    StatusCode, Url,
    header::{AUTHORIZATION, HeaderValue, RETRY_AFTER},
};
use secrecy::ExposeSecret;
use serde_json::Value;

use super::{Accepted, Lookup, OutboundSms, ProviderError, ValidityBounds, parse_retry_after};
use crate::{
    config::{TwilioSender, TwilioSettings},
    policy::sender::ProviderSender,
};

/// Largest answer we read; Twilio's are a few KiB.
const MAX_ANSWER_BYTES: usize = 64 * 1024;
/// Largest List Messages page we read (50 messages of up to 1,600 characters).
const MAX_LIST_BYTES: usize = 1024 * 1024;
/// How far before the attempt's start a message may have been created (clock skew).
const LOOKUP_SKEW: time::Duration = time::Duration::minutes(5);
/// `ValidityPeriod`: whole seconds from 1 to 36,000 in Twilio's queue, as its Create
/// Message description documents.
pub const VALIDITY: ValidityBounds = ValidityBounds {
    min: Duration::from_secs(1),
    max: Duration::from_secs(36_000),
};

/// The recipient replied STOP: do not try this number again.
const CODE_UNSUBSCRIBED: &str = "21610";
/// Too many requests.
const CODE_TOO_MANY_REQUESTS: &str = "20429";
/// Refusals about our account, credentials, sender or route, not the recipient: another
/// gateway may succeed (authentication, region not enabled, From not valid for To,
/// unverified trial number, unreachable route, From not a valid/our number).
const OTHER_GATEWAY_MAY_SUCCEED: &[&str] = &[
    "20003", "21408", "21606", "21608", "21612", "21659", "21660",
];

#[derive(Debug, Clone)]
pub struct Twilio {
    client: reqwest::Client,
    /// Parsed once: parsing it for every call cost as much as the rest of building it.
    messages_url: Url,
    /// `Basic` credentials, encoded once, marked sensitive (never shown or logged).
    authorization: HeaderValue,
    default_sender: TwilioSender,
    status_callback: Option<String>,
    timeout: Duration,
    /// Test credentials: nothing is delivered, and Twilio keeps no messages to look up.
    sandbox: bool,
}

impl Twilio {
    pub fn new(
        settings: &TwilioSettings,
        public_url: Option<&str>,
        timeout: Duration,
    ) -> Result<Self, String> {
        let client = super::http_client(timeout).map_err(|e| e.to_string())?;
        let messages_url = format!(
            "{}/2010-04-01/Accounts/{}/Messages.json",
            settings.base_url, settings.account_sid
        );
        let messages_url = Url::parse(&messages_url)
            .map_err(|e| format!("the Messages URL '{messages_url}' is not valid: {e}"))?;
        let credentials = base64::engine::general_purpose::STANDARD.encode(format!(
            "{}:{}",
            settings.account_sid,
            settings.auth_token.expose_secret()
        ));
        let mut authorization = HeaderValue::from_str(&format!("Basic {credentials}"))
            .map_err(|_| "the account SID cannot go into a header".to_owned())?;
        authorization.set_sensitive(true);
        Ok(Twilio {
            client,
            messages_url,
            authorization,
            default_sender: settings.sender.clone(),
            status_callback: public_url.map(|url| format!("{url}/webhooks/twilio/status")),
            timeout,
            sandbox: settings.sandbox,
        })
    }

    pub(super) fn default_sender(&self) -> ProviderSender {
        match &self.default_sender {
            TwilioSender::From(from) if from.starts_with('+') => ProviderSender::Number,
            TwilioSender::From(_) => ProviderSender::Alphanumeric,
            TwilioSender::MessagingService(_) => ProviderSender::Pool,
        }
    }

    fn form<'a>(&'a self, sms: &'a OutboundSms<'a>) -> Vec<(&'static str, String)> {
        let mut form = vec![
            ("To", sms.to.as_str().to_owned()),
            ("Body", sms.body.to_owned()),
        ];
        match (sms.sender, &self.default_sender) {
            (Some(sender), TwilioSender::MessagingService(sid)) => {
                form.push(("From", sender.as_str().to_owned()));
                form.push(("MessagingServiceSid", sid.clone()));
            }
            (Some(sender), TwilioSender::From(_)) => {
                form.push(("From", sender.as_str().to_owned()))
            }
            (None, TwilioSender::From(from)) => form.push(("From", from.clone())),
            (None, TwilioSender::MessagingService(sid)) => {
                form.push(("MessagingServiceSid", sid.clone()))
            }
        }
        if let Some(url) = &self.status_callback {
            form.push(("StatusCallback", url.clone()));
        }
        if let Some(validity) = sms.validity {
            // Rounded down: the message must not outlive its expiry.
            let seconds = validity
                .as_secs()
                .clamp(VALIDITY.min.as_secs(), VALIDITY.max.as_secs());
            form.push(("ValidityPeriod", seconds.to_string()));
        }
        form
    }

    pub async fn send(&self, sms: &OutboundSms<'_>) -> Result<Accepted, ProviderError> {
        let started = Instant::now();
        let response = self
            .client
            .post(self.messages_url.clone())
            .header(AUTHORIZATION, self.authorization.clone())
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
        let body = read_capped(response, MAX_ANSWER_BYTES)
            .await
            .map_err(|e| self.transport_error(e, started))?;
        interpret(status, retry_after, &body)
    }

    /// Lists the latest messages to the recipient (Twilio's List Messages, newest first) and
    /// picks those that may be ours: same body, outbound, created since the attempt began
    /// (with a margin for clock skew).
    pub async fn lookup(&self, sms: &OutboundSms<'_>, since: time::OffsetDateTime) -> Lookup {
        if self.sandbox {
            // Test credentials cannot list messages, and a resend reaches no phone.
            return Lookup::NotFound;
        }
        let started = Instant::now();
        let response = self
            .client
            .get(self.messages_url.clone())
            .header(AUTHORIZATION, self.authorization.clone())
            .query(&[("To", sms.to.as_str()), ("PageSize", "50")])
            .send()
            .await;
        let response = match response {
            Ok(response) => response,
            Err(e) => return Lookup::Failed(self.transport_error(e, started)),
        };
        let status = response.status();
        let body = match read_capped(response, MAX_LIST_BYTES).await {
            Ok(body) => body,
            Err(e) => return Lookup::Failed(self.transport_error(e, started)),
        };
        if !status.is_success() {
            return match interpret(status, None, &body) {
                Err(e) => Lookup::Failed(e),
                Ok(_) => Lookup::Failed(ProviderError::Unreadable {
                    http_status: status.as_u16(),
                    detail: "unexpected answer to List Messages".into(),
                }),
            };
        }
        find_in_list(&body, sms.body, since)
    }

    fn transport_error(&self, error: reqwest::Error, started: Instant) -> ProviderError {
        // The URL holds the account SID only, but keep error text minimal anyway.
        let error = error.without_url();
        if error.is_timeout() {
            ProviderError::Timeout {
                after: started.elapsed().min(self.timeout),
            }
        } else if error.is_connect() {
            ProviderError::Unreachable {
                detail: error_chain(&error),
            }
        } else {
            ProviderError::ConnectionLost {
                detail: error_chain(&error),
            }
        }
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

async fn read_capped(
    mut response: reqwest::Response,
    limit: usize,
) -> Result<Vec<u8>, reqwest::Error> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        let room = limit.saturating_sub(body.len());
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if body.len() >= limit {
            break;
        }
    }
    Ok(body)
}

/// The messages of a List Messages page that may be ours, in the page's order (newest
/// first). Pure, so it is unit-tested.
fn find_in_list(page: &[u8], body: &str, since: time::OffsetDateTime) -> Lookup {
    let Ok(page) = serde_json::from_slice::<Value>(page) else {
        return Lookup::Failed(ProviderError::Unreadable {
            http_status: 200,
            detail: "List Messages answer is not JSON".into(),
        });
    };
    let Some(messages) = page.get("messages").and_then(Value::as_array) else {
        return Lookup::Failed(ProviderError::Unreadable {
            http_status: 200,
            detail: "List Messages answer has no messages".into(),
        });
    };
    let earliest = since - LOOKUP_SKEW;
    let candidates = messages.iter().filter(|m| {
        let outbound = m
            .get("direction")
            .and_then(Value::as_str)
            .is_some_and(|d| d.starts_with("outbound"));
        let same_body = m.get("body").and_then(Value::as_str) == Some(body);
        let recent = m
            .get("date_created")
            .and_then(Value::as_str)
            .and_then(|d| {
                time::OffsetDateTime::parse(d, &time::format_description::well_known::Rfc2822).ok()
            })
            .is_some_and(|created| created >= earliest);
        outbound && same_body && recent
    });
    let found: Vec<Accepted> = candidates
        .filter_map(|m| m.get("sid").and_then(Value::as_str))
        .filter(|sid| !sid.is_empty() && sid.len() <= 64)
        .map(|sid| Accepted {
            provider_message_id: sid.to_owned(),
            http_status: Some(200),
        })
        .collect();
    if found.is_empty() {
        Lookup::NotFound
    } else {
        Lookup::Found(found)
    }
}

/// Twilio's error fields, read leniently: `code` may come as a number or a string.
fn error_fields(body: &[u8]) -> (Option<String>, Option<String>) {
    let Ok(Value::Object(object)) = serde_json::from_slice::<Value>(body) else {
        return (None, None);
    };
    let code = match object.get("code") {
        Some(Value::Number(n)) => Some(n.to_string()),
        Some(Value::String(s)) if !s.is_empty() => Some(s.chars().take(32).collect()),
        _ => None,
    };
    let message = match object.get("message") {
        Some(Value::String(s)) => Some(s.chars().take(500).collect()),
        _ => None,
    };
    (code, message)
}

/// A short, printable excerpt of an answer we could not read.
fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(120)]);
    let cleaned: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if cleaned.trim().is_empty() {
        "empty body".to_owned()
    } else {
        format!("body starts '{}'", cleaned.trim())
    }
}

/// Turns Twilio's answer into ours. Pure, so every branch is unit-tested.
fn interpret(
    status: StatusCode,
    retry_after: Option<Duration>,
    body: &[u8],
) -> Result<Accepted, ProviderError> {
    let http_status = status.as_u16();
    if status.is_success() {
        let sid = serde_json::from_slice::<Value>(body)
            .ok()
            .and_then(|v| v.get("sid").and_then(Value::as_str).map(str::to_owned))
            .filter(|sid| !sid.is_empty() && sid.len() <= 64);
        return match sid {
            Some(sid) => Ok(Accepted {
                provider_message_id: sid,
                http_status: Some(http_status),
            }),
            None => Err(ProviderError::Unreadable {
                http_status,
                detail: format!("no message sid ({})", excerpt(body)),
            }),
        };
    }
    let (code, message) = error_fields(body);
    let message = message.or_else(|| {
        if code.is_none() {
            Some(format!("unreadable error answer ({})", excerpt(body)))
        } else {
            None
        }
    });
    if status == StatusCode::TOO_MANY_REQUESTS || code.as_deref() == Some(CODE_TOO_MANY_REQUESTS) {
        return Err(ProviderError::Throttled {
            http_status,
            code,
            message,
            retry_after,
        });
    }
    if status.is_server_error() {
        return Err(ProviderError::Unavailable {
            http_status,
            code,
            message,
            retry_after,
        });
    }
    Err(rejected(
        http_status,
        code,
        message.unwrap_or_else(|| format!("HTTP {http_status}")),
    ))
}

/// A refusal with Twilio's error `code`, classified as Twilio's refusals are: the inbox
/// simulates its magic numbers through this too, so that they end as Twilio's would.
pub(super) fn rejected(http_status: u16, code: Option<String>, message: String) -> ProviderError {
    let recipient_opted_out = code.as_deref() == Some(CODE_UNSUBSCRIBED);
    let other_gateway_may_succeed = code
        .as_deref()
        .is_some_and(|c| OTHER_GATEWAY_MAY_SUCCEED.contains(&c));
    ProviderError::Rejected {
        http_status,
        message,
        code,
        recipient_opted_out,
        other_gateway_may_succeed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_created_message_is_accepted_with_its_sid() {
        let body = br#"{"sid": "SMaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "status": "queued"}"#;
        let accepted = interpret(StatusCode::CREATED, None, body).expect("accepted");
        assert_eq!(
            accepted.provider_message_id,
            "SMaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
        );
    }

    #[test]
    fn garbage_answers_are_errors_not_panics() {
        for body in [
            &b"<html>Bad Gateway</html>"[..],
            b"{\"sid\": \"SMaaaa",
            b"",
            b"{\"status\": \"queued\"}",
            b"\xff\xfe",
            b"null",
        ] {
            let err = interpret(StatusCode::OK, None, body).expect_err("no sid");
            assert!(matches!(err, ProviderError::Unreadable { .. }), "{err:?}");
            assert!(err.is_retryable() && err.outcome_unknown());
        }
        let err = interpret(StatusCode::BAD_GATEWAY, None, b"<html>oops</html>").expect_err("5xx");
        assert!(matches!(
            err,
            ProviderError::Unavailable {
                http_status: 502,
                ..
            }
        ));
    }

    #[test]
    fn twilio_codes_are_kept() {
        let body = br#"{"code": 21211, "message": "Invalid 'To' Phone Number", "more_info": "https://www.twilio.com/docs/errors/21211", "status": 400}"#;
        let err = interpret(StatusCode::BAD_REQUEST, None, body).expect_err("rejected");
        assert_eq!(err.code(), Some("21211"));
        assert!(!err.is_retryable());
        assert!(!err.recipient_opted_out());

        let body = br#"{"code": 21610, "message": "Attempt to send to unsubscribed recipient", "status": 400}"#;
        let err = interpret(StatusCode::BAD_REQUEST, None, body).expect_err("stop");
        assert!(err.recipient_opted_out());
    }

    #[test]
    fn throttling_is_temporary_and_keeps_retry_after() {
        let body = br#"{"code": 20429, "message": "Too Many Requests", "status": 429}"#;
        let err = interpret(
            StatusCode::TOO_MANY_REQUESTS,
            Some(Duration::from_secs(7)),
            body,
        )
        .expect_err("throttled");
        assert!(err.is_retryable());
        assert_eq!(err.retry_after(), Some(Duration::from_secs(7)));
        let err = interpret(StatusCode::BAD_REQUEST, None, body).expect_err("20429 on 400");
        assert!(matches!(err, ProviderError::Throttled { .. }));
    }

    #[test]
    fn listed_messages_are_found_by_body_direction_and_age() {
        let since = time::macros::datetime!(2026-11-25 10:00 UTC);
        let page = br#"{"messages": [
            {"sid": "SM1", "body": "Code 1234", "direction": "inbound", "date_created": "Wed, 25 Nov 2026 10:00:05 +0000"},
            {"sid": "SM5", "body": "Code 1234", "direction": "outbound-api", "date_created": "Wed, 25 Nov 2026 10:00:02 +0000"},
            {"sid": "SM2", "body": "Code 1234", "direction": "outbound-api", "date_created": "Wed, 25 Nov 2026 09:00:00 +0000"},
            {"sid": "SM3", "body": "Other", "direction": "outbound-api", "date_created": "Wed, 25 Nov 2026 10:00:05 +0000"},
            {"sid": "SM4", "body": "Code 1234", "direction": "outbound-api", "date_created": "Wed, 25 Nov 2026 09:59:30 +0000"}
        ]}"#;
        let found = |sid: &str| Accepted {
            provider_message_id: sid.into(),
            http_status: Some(200),
        };
        assert_eq!(
            find_in_list(page, "Code 1234", since),
            Lookup::Found(vec![found("SM5"), found("SM4")])
        );
        assert_eq!(find_in_list(page, "Nope", since), Lookup::NotFound);
        assert!(matches!(
            find_in_list(b"<html>", "x", since),
            Lookup::Failed(_)
        ));
        assert!(matches!(find_in_list(b"{}", "x", since), Lookup::Failed(_)));
    }

    #[test]
    fn authentication_failure_is_permanent() {
        let body = br#"{"code": 20003, "message": "Authenticate", "status": 401}"#;
        let err = interpret(StatusCode::UNAUTHORIZED, None, body).expect_err("401");
        assert!(!err.is_retryable());
        assert_eq!(err.code(), Some("20003"));
    }
}
