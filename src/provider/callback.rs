//! What a provider's webhook tells us, in our own words. Each adapter reads and verifies
//! its own callbacks (`twilio::callbacks`, `vonage::callbacks`): field names, status
//! words and signature schemes stay there, and the rest of smsgw sees these types.

use reqwest::header::HeaderMap;

use crate::{
    phone::PhoneNumber,
    store::{Receipt, Status},
};

/// A webhook request as it reached us, before anything in it is believed.
#[derive(Debug, Clone, Copy)]
pub struct Callback<'a> {
    /// The public URL the provider called (`SMSGW_PUBLIC_URL`, the path and the query):
    /// what a URL-based signature covers. `None` when no public URL is configured.
    pub url: Option<&'a str>,
    pub headers: &'a HeaderMap,
    pub body: &'a [u8],
}

impl<'a> Callback<'a> {
    /// A request whose signature does not cover the URL (Vonage's).
    pub fn unsigned_url(headers: &'a HeaderMap, body: &'a [u8]) -> Self {
        Callback {
            url: None,
            headers,
            body,
        }
    }
}

/// Why a webhook is not taken: nothing in it is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// Unsigned, wrongly signed, stale, or its signature cannot be checked (403).
    #[error("{0}")]
    Unsigned(&'static str),
    /// Signed, but not what the provider sends (400).
    #[error("{0}")]
    Malformed(&'static str),
}

/// A delivery receipt, read and verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiptReport {
    /// The provider type that sent it (`twilio`, `vonage`).
    pub provider: &'static str,
    pub provider_message_id: String,
    /// The provider's own status word, kept as it came.
    pub provider_status: String,
    /// Ours, when the word maps onto one.
    pub status: Option<Status>,
    pub error_code: Option<String>,
    /// The recipient unsubscribed at the carrier.
    pub opted_out: bool,
    /// The configured providers whose secret signed it.
    pub signed_by: Vec<String>,
    /// For a provider whose signed request could be replayed: the key it is remembered
    /// by once applied, so that a replay changes nothing.
    pub replay_key: Option<String>,
}

impl ReceiptReport {
    /// The receipt as the store keeps it.
    pub fn receipt(&self) -> Receipt<'_> {
        Receipt {
            provider: self.provider,
            provider_message_id: &self.provider_message_id,
            provider_status: &self.provider_status,
            status: self.status,
            error_code: self.error_code.as_deref(),
            opted_out: self.opted_out,
            signed_by: &self.signed_by,
        }
    }
}

/// A text someone sent to one of our numbers, read and verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundText {
    pub provider: &'static str,
    /// The provider's id of the inbound message: a replay carries the same one.
    pub provider_message_id: String,
    pub from: PhoneNumber,
    /// Our number it was sent to, E.164 when it reads as a number.
    pub to: String,
    pub body: String,
    /// The configured providers whose secret signed it (empty: not signed, the
    /// development inbox): a reply answers only messages sent through one of them.
    pub signed_by: Vec<String>,
}

/// Our number as a provider wrote it, in E.164 when it reads as one (Vonage writes no
/// `+`); as given otherwise.
pub fn our_number(raw: &str) -> String {
    let raw = raw.trim();
    let plus = if raw.starts_with('+') {
        raw.to_owned()
    } else {
        format!("+{raw}")
    };
    PhoneNumber::parse(&plus, None).map_or_else(|_| raw.to_owned(), |n| n.as_str().to_owned())
}

/// A form body's pairs as the request sent them (keys may repeat); `None` when it is not
/// a form.
pub fn parse_form(body: &[u8]) -> Option<Vec<(String, String)>> {
    serde_urlencoded::from_bytes::<Vec<(String, String)>>(body).ok()
}
