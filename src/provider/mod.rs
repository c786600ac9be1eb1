//! Providers: the one place that knows how a text leaves the building.
//!
//! - the adapters (`log`, `inbox`, `twilio`, `vonage`), each keeping its wire format
//!   private;
//! - [`Gateway`]: a configured provider with its [`circuit`] breaker, its [`pace`] (with
//!   the account-wide [`clock`] shared by every replica) and its call slots;
//! - [`route`]: the gateways a school's settings name, primary and fallback.
//!
//! Every adapter speaks our own types ([`OutboundSms`] in, [`Accepted`] or
//! [`ProviderError`] out) and keeps its wire format private. [`Provider`] chooses the
//! adapter by enum dispatch, so adding one is a new variant and a new file.

pub mod callback;
pub mod circuit;
pub mod clock;
mod gateway;
pub mod inbox;
mod log;
pub mod pace;
mod routing;
#[cfg(test)]
pub(crate) mod scripted;
pub mod twilio;
pub mod vonage;

use std::time::Duration;

use uuid::Uuid;

use crate::{
    config::{ProviderKindSettings, ProviderSettings},
    phone::{PhoneNumber, SenderId},
    policy::sender::ProviderSender,
};

pub use self::{
    callback::{Callback, InboundText, ReceiptReport, Refused, our_number},
    gateway::{Gateway, Gateways},
    inbox::InboxProvider,
    log::LogProvider,
    routing::{Route, route},
    twilio::Twilio,
    vonage::Vonage,
};

/// One text to hand to a provider.
#[derive(Debug, Clone)]
pub struct OutboundSms<'a> {
    pub message_id: Uuid,
    /// Where it really goes (the staging redirect is already applied).
    pub to: &'a PhoneNumber,
    /// The school's own sender; `None` means the provider's configured default.
    pub sender: Option<&'a SenderId>,
    pub body: &'a str,
    /// How long the provider may keep trying to deliver it: the time left before the
    /// message expires, within the provider's [`ValidityBounds`].
    pub validity: Option<Duration>,
}

/// How long a provider may be asked to keep a message before it drops it, as the
/// provider documents it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ValidityBounds {
    pub min: Duration,
    pub max: Duration,
}

impl ValidityBounds {
    /// The validity to ask for with `left` before the message expires: at most the
    /// provider's maximum; `None` when less than its minimum is left, too little to send.
    pub fn clamp(self, left: Duration) -> Option<Duration> {
        (left >= self.min).then_some(left.min(self.max))
    }
}

/// The provider took the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub provider_message_id: String,
    pub http_status: Option<u16>,
}

/// Why a provider call did not end in acceptance.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProviderError {
    /// The request never reached the provider (connection refused, DNS, TLS).
    #[error("could not reach the provider: {detail}")]
    Unreachable { detail: String },
    /// The connection broke after the request was sent: the provider may have taken it.
    #[error("connection lost during the call: {detail}")]
    ConnectionLost { detail: String },
    #[error("no answer within {after:?}")]
    Timeout { after: Duration },
    /// 5xx: the provider is having trouble; try again later.
    #[error("provider unavailable (HTTP {http_status}){}", describe(code, message))]
    Unavailable {
        http_status: u16,
        code: Option<String>,
        message: Option<String>,
        retry_after: Option<Duration>,
    },
    /// 429 or a provider throttling code: too fast; try again after `retry_after`.
    #[error(
        "throttled by the provider (HTTP {http_status}){}",
        describe(code, message)
    )]
    Throttled {
        http_status: u16,
        code: Option<String>,
        message: Option<String>,
        retry_after: Option<Duration>,
    },
    /// The provider refused this message for good (bad number, not mobile, bad credentials...).
    #[error("refused by the provider (HTTP {http_status}){}", describe(code, &Some(message.clone())))]
    Rejected {
        http_status: u16,
        code: Option<String>,
        message: String,
        /// The recipient has unsubscribed at the carrier (Twilio 21610): record an opt-out.
        recipient_opted_out: bool,
        /// The refusal is about our account, credentials, sender or route with this
        /// provider, not about the recipient: another gateway may send it.
        other_gateway_may_succeed: bool,
    },
    /// A 2xx answer we cannot read (no message id, HTML, truncated JSON): the message may
    /// or may not have been taken.
    #[error("unreadable answer to an accepted request (HTTP {http_status}): {detail}")]
    Unreadable { http_status: u16, detail: String },
}

fn describe(code: &Option<String>, message: &Option<String>) -> String {
    match (code, message) {
        (Some(code), Some(message)) => format!(": {code} {message}"),
        (Some(code), None) => format!(": {code}"),
        (None, Some(message)) => format!(": {message}"),
        (None, None) => String::new(),
    }
}

impl ProviderError {
    /// Whether trying again later can succeed. Every variant is decided here, with no
    /// wildcard, so a new variant forces the question.
    pub fn is_retryable(&self) -> bool {
        match self {
            ProviderError::Unreachable { .. } => true,
            ProviderError::ConnectionLost { .. } => true,
            ProviderError::Timeout { .. } => true,
            ProviderError::Unavailable { .. } => true,
            ProviderError::Throttled { .. } => true,
            ProviderError::Rejected { .. } => false,
            ProviderError::Unreadable { .. } => true,
        }
    }

    /// Whether this failure looks like the provider being down (it feeds the circuit
    /// breaker); a refusal or throttling means it is up and answering.
    pub fn suggests_outage(&self) -> bool {
        match self {
            ProviderError::Unreachable { .. }
            | ProviderError::ConnectionLost { .. }
            | ProviderError::Timeout { .. }
            | ProviderError::Unavailable { .. }
            | ProviderError::Unreadable { .. } => true,
            ProviderError::Throttled { .. } | ProviderError::Rejected { .. } => false,
        }
    }

    /// Whether the provider may have taken the message although we got no acceptance.
    pub fn outcome_unknown(&self) -> bool {
        match self {
            ProviderError::ConnectionLost { .. }
            | ProviderError::Timeout { .. }
            | ProviderError::Unreadable { .. } => true,
            ProviderError::Unreachable { .. }
            | ProviderError::Unavailable { .. }
            | ProviderError::Throttled { .. }
            | ProviderError::Rejected { .. } => false,
        }
    }

    /// The earliest moment the provider asked us to come back.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ProviderError::Unavailable { retry_after, .. }
            | ProviderError::Throttled { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    pub fn http_status(&self) -> Option<u16> {
        match self {
            ProviderError::Unavailable { http_status, .. }
            | ProviderError::Throttled { http_status, .. }
            | ProviderError::Rejected { http_status, .. }
            | ProviderError::Unreadable { http_status, .. } => Some(*http_status),
            _ => None,
        }
    }

    pub fn code(&self) -> Option<&str> {
        match self {
            ProviderError::Unavailable { code, .. }
            | ProviderError::Throttled { code, .. }
            | ProviderError::Rejected { code, .. } => code.as_deref(),
            _ => None,
        }
    }

    pub fn other_gateway_may_succeed(&self) -> bool {
        matches!(
            self,
            ProviderError::Rejected {
                other_gateway_may_succeed: true,
                ..
            }
        )
    }

    pub fn recipient_opted_out(&self) -> bool {
        matches!(
            self,
            ProviderError::Rejected {
                recipient_opted_out: true,
                ..
            }
        )
    }
}

/// What asking the provider "did you take this message?" found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// Messages it took that look like ours (recipient, text, time), newest first. One may
    /// be another message's with the same text and recipient (in staging every message
    /// goes to one number): the log tells which are taken.
    Found(Vec<Accepted>),
    /// No such message: sending again cannot make a duplicate.
    NotFound,
    /// The provider offers no such question.
    Unsupported,
    /// The question itself failed: we still do not know.
    Failed(ProviderError),
}

/// The adapters, chosen by configuration.
#[derive(Debug, Clone)]
pub enum Provider {
    Log(LogProvider),
    Inbox(InboxProvider),
    Twilio(Twilio),
    Vonage(Vonage),
    /// Answers as a unit test scripts it.
    #[cfg(test)]
    Scripted(scripted::Scripted),
}

/// Error building a provider from settings.
#[derive(Debug, thiserror::Error)]
#[error("cannot set up the provider '{provider}': {reason}")]
pub struct ProviderSetupError {
    provider: String,
    reason: String,
}

impl Provider {
    pub fn new(
        settings: &ProviderSettings,
        public_url: Option<&str>,
        timeout: Duration,
    ) -> Result<Self, ProviderSetupError> {
        let failed = |reason: String| ProviderSetupError {
            provider: settings.name.clone(),
            reason,
        };
        Ok(match &settings.kind {
            ProviderKindSettings::Log => Provider::Log(LogProvider),
            ProviderKindSettings::Inbox => Provider::Inbox(InboxProvider::default()),
            ProviderKindSettings::Twilio(twilio) => {
                Provider::Twilio(Twilio::new(twilio, public_url, timeout).map_err(failed)?)
            }
            ProviderKindSettings::Vonage(vonage) => {
                Provider::Vonage(Vonage::new(vonage, public_url, timeout).map_err(failed)?)
            }
        })
    }

    /// The development inbox, whose messages are kept and shown at `/inbox`.
    pub fn inbox(&self) -> Option<&InboxProvider> {
        match self {
            Provider::Inbox(inbox) => Some(inbox),
            _ => None,
        }
    }

    /// What the provider sends from when given no sender; `None` for those that reach no
    /// carrier (any sender will do).
    pub fn default_sender(&self) -> Option<ProviderSender> {
        match self {
            Provider::Log(_) | Provider::Inbox(_) => None,
            Provider::Twilio(p) => Some(p.default_sender()),
            Provider::Vonage(p) => Some(p.default_sender()),
            #[cfg(test)]
            Provider::Scripted(_) => Some(ProviderSender::Number),
        }
    }

    /// The bounds of the validity the provider takes; `None` for those that keep nothing
    /// waiting at a carrier.
    pub fn validity_bounds(&self) -> Option<ValidityBounds> {
        match self {
            Provider::Log(_) | Provider::Inbox(_) => None,
            Provider::Twilio(_) => Some(twilio::VALIDITY),
            Provider::Vonage(_) => Some(vonage::VALIDITY),
            #[cfg(test)]
            Provider::Scripted(_) => None,
        }
    }

    pub async fn send(&self, sms: &OutboundSms<'_>) -> Result<Accepted, ProviderError> {
        match self {
            Provider::Log(p) => p.send(sms).await,
            Provider::Inbox(p) => p.send(sms).await,
            Provider::Twilio(p) => p.send(sms).await,
            Provider::Vonage(p) => p.send(sms).await,
            #[cfg(test)]
            Provider::Scripted(p) => p.send(sms),
        }
    }

    /// Asks whether the provider took `sms` at or after `since` (an attempt whose outcome
    /// we could not learn), so that it is not sent twice.
    pub async fn lookup(&self, sms: &OutboundSms<'_>, since: time::OffsetDateTime) -> Lookup {
        match self {
            Provider::Log(_) => Lookup::Unsupported,
            // Nothing left the machine: sending again reaches no phone.
            Provider::Inbox(_) => Lookup::NotFound,
            Provider::Twilio(p) => p.lookup(sms, since).await,
            // Vonage's SMS API offers no search by recipient.
            Provider::Vonage(_) => Lookup::Unsupported,
            #[cfg(test)]
            Provider::Scripted(p) => p.lookup(),
        }
    }
}

/// Idle time before a pooled provider connection is probed, the time between probes,
/// and the probes unanswered before it is dropped: a connection a firewall or a load
/// balancer silently forgot is found in about a minute, before a call waits on it.
/// reqwest's own defaults today, stated so that a change of theirs cannot drop them.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(15);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(15);
const KEEPALIVE_PROBES: u32 = 3;
/// Longest a connection to a provider may take to open (TCP and TLS), at most the call's
/// own timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The HTTP client of an adapter: every call time-limited, no redirects followed (a
/// provider that redirects a POST is misconfigured, not to be followed blindly), and as
/// many pooled connections as there are calls in flight (at most the gateway's call
/// slots, `SMSGW_PROVIDER_CONCURRENCY`). Each connection opens within its own bound, is
/// probed by TCP keepalive while idle, and (on Linux) gives up on data the provider does
/// not acknowledge within the call's timeout.
pub(crate) fn http_client(timeout: Duration) -> Result<reqwest::Client, reqwest::Error> {
    crate::install_crypto_provider();
    let builder = reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout.min(CONNECT_TIMEOUT))
        .tcp_keepalive(KEEPALIVE_IDLE)
        .tcp_keepalive_interval(KEEPALIVE_INTERVAL)
        .tcp_keepalive_retries(KEEPALIVE_PROBES)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("smsgw/", env!("CARGO_PKG_VERSION")));
    #[cfg(any(target_os = "android", target_os = "fuchsia", target_os = "linux"))]
    let builder = builder.tcp_user_timeout(timeout);
    builder.build()
}

/// Parses `Retry-After`: delay-seconds or an HTTP date.
pub(crate) fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds.min(24 * 3600)));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO)
            .min(Duration::from_secs(24 * 3600)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        assert_eq!(parse_retry_after("30"), Some(Duration::from_secs(30)));
        assert_eq!(parse_retry_after(" 5 "), Some(Duration::from_secs(5)));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
        assert_eq!(
            parse_retry_after("99999999999"),
            Some(Duration::from_secs(24 * 3600))
        );
    }

    #[test]
    fn validity_is_clamped_to_the_providers_bounds() {
        let secs = Duration::from_secs;
        let twilio = twilio::VALIDITY;
        assert_eq!(twilio.clamp(secs(900)), Some(secs(900)));
        assert_eq!(twilio.clamp(secs(1)), Some(secs(1)), "Twilio's minimum");
        assert_eq!(twilio.clamp(Duration::from_millis(999)), None, "too late");
        assert_eq!(
            twilio.clamp(secs(3 * 86_400)),
            Some(secs(36_000)),
            "Twilio's maximum"
        );
        let vonage = vonage::VALIDITY;
        assert_eq!(vonage.clamp(secs(20)), Some(secs(20)), "Vonage's minimum");
        assert_eq!(vonage.clamp(secs(19)), None);
        assert_eq!(vonage.clamp(secs(900)), Some(secs(900)));
        assert_eq!(
            vonage.clamp(secs(30 * 86_400)),
            Some(secs(604_800)),
            "7 days"
        );
    }

    #[test]
    fn only_rejections_are_final() {
        let rejected = ProviderError::Rejected {
            http_status: 400,
            code: Some("21211".into()),
            message: "invalid To".into(),
            recipient_opted_out: false,
            other_gateway_may_succeed: false,
        };
        assert!(!rejected.is_retryable());
        assert!(
            ProviderError::Timeout {
                after: Duration::from_secs(1)
            }
            .is_retryable()
        );
        assert_eq!(
            rejected.to_string(),
            "refused by the provider (HTTP 400): 21211 invalid To"
        );
    }

    /// The `tr` (timer) field of `/proc/net/tcp` for the established connections to
    /// 127.0.0.1:`port`: `02` while a keepalive timer runs, `00` with none.
    #[cfg(target_os = "linux")]
    fn timers_of_connections_to(port: u16) -> Vec<String> {
        let peer = format!("0100007F:{port:04X}");
        let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
        table
            .lines()
            .map(|line| line.split_whitespace().collect::<Vec<_>>())
            .filter(|fields| fields.get(2) == Some(&peer.as_str()) && fields.get(3) == Some(&"01"))
            .filter_map(|fields| fields.get(5).map(|t| t[..2].to_owned()))
            .collect()
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn an_idle_provider_connection_is_probed_by_keepalive() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("address").port();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.expect("accept");
            let mut request = [0u8; 4096];
            let _ = socket.read(&mut request).await;
            let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
            let _ = socket.write_all(answer).await;
            // Held open, idle, as a provider's pooled connection is between calls.
            tokio::time::sleep(Duration::from_secs(10)).await;
        });
        let client = http_client(Duration::from_secs(10)).expect("client");
        let answer = client
            .get(format!("http://127.0.0.1:{port}/"))
            .send()
            .await
            .expect("an answer");
        assert_eq!(answer.status(), 200);
        assert_eq!(
            timers_of_connections_to(port),
            ["02"],
            "a keepalive timer runs"
        );
    }
}
