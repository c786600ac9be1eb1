//! The providers' webhooks, carried from HTTP to the adapters that read them and the
//! callbacks that apply them. Nothing is changed for a request whose signature does not
//! check out (403). A receipt for an unknown message is answered 2xx and kept (a provider
//! retrying a 5xx for ever helps nobody); malformed bodies get a 400; a database that
//! cannot be reached, a 503, so that the provider tries again.

use axum::{
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode, Uri, header},
    response::{IntoResponse, Response},
};

use crate::{
    callbacks::{CallbackError, Callbacks},
    provider::{Callback, InboundText, ReceiptReport, Refused, twilio, vonage},
};

/// What the webhook handlers share.
#[derive(Clone)]
pub struct Webhooks {
    pub callbacks: Callbacks,
    /// `SMSGW_PUBLIC_URL`: the base of the URLs providers sign.
    pub public_url: Option<String>,
}

impl Webhooks {
    /// The public URL of a request to `path`, as the provider signed it.
    fn url(&self, path: &str, query: Option<&str>) -> Option<String> {
        let base = self.public_url.as_deref()?;
        Some(match query {
            Some(q) => format!("{base}{path}?{q}"),
            None => format!("{base}{path}"),
        })
    }
}

fn refused(refusal: Refused) -> Response {
    let (status, why) = match refusal {
        Refused::Unsigned(why) => (StatusCode::FORBIDDEN, why),
        Refused::Malformed(why) => (StatusCode::BAD_REQUEST, why),
    };
    (status, why).into_response()
}

fn failed(error: &CallbackError) -> Response {
    match error {
        CallbackError::NotReady => (StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        CallbackError::Invalid(why) => (StatusCode::BAD_REQUEST, *why),
        CallbackError::Store(_) | CallbackError::OptOut(_) => {
            tracing::warn!(error = %error, "could not apply a webhook; the provider will retry");
            (StatusCode::SERVICE_UNAVAILABLE, "try again\n")
        }
    }
    .into_response()
}

/// Applies an inbound text an adapter read; `answer` is what its provider expects back.
async fn inbound(
    hooks: &Webhooks,
    read: Result<InboundText, Refused>,
    answer: impl FnOnce() -> Response,
) -> Response {
    match read {
        Ok(text) => match hooks.callbacks.receive_inbound(&text).await {
            Ok(_) => answer(),
            Err(e) => failed(&e),
        },
        Err(refusal) => refused(refusal),
    }
}

/// Applies a receipt an adapter read: 204 once kept, whether or not its message is known.
async fn receipt(hooks: &Webhooks, read: Result<ReceiptReport, Refused>) -> Response {
    match read {
        Ok(report) => match hooks.callbacks.receive_receipt(&report).await {
            Ok(()) => StatusCode::NO_CONTENT.into_response(),
            Err(e) => failed(&e),
        },
        Err(refusal) => refused(refusal),
    }
}

/// `POST /webhooks/twilio/status`
pub async fn twilio_status_callback(
    State(hooks): State<Webhooks>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let url = hooks.url("/webhooks/twilio/status", uri.query());
    let request = Callback {
        url: url.as_deref(),
        headers: &headers,
        body: &body,
    };
    let read = twilio::callbacks::read_status(&hooks.callbacks.gateways, &request);
    receipt(&hooks, read).await
}

/// `POST /webhooks/twilio/inbound`: opt-out and opt-in keywords, and replies, each
/// applied once.
pub async fn twilio_inbound(
    State(hooks): State<Webhooks>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let url = hooks.url("/webhooks/twilio/inbound", uri.query());
    let request = Callback {
        url: url.as_deref(),
        headers: &headers,
        body: &body,
    };
    let read = twilio::callbacks::read_inbound(&hooks.callbacks.gateways, &request);
    inbound(&hooks, read, || {
        let (content_type, answer) = twilio::callbacks::INBOUND_ANSWER;
        (
            StatusCode::OK,
            [(header::CONTENT_TYPE, content_type)],
            answer,
        )
            .into_response()
    })
    .await
}

/// `POST /webhooks/vonage/inbound`: a signed inbound message (JSON or form): keywords and
/// replies as Twilio's, each applied once per provider message id.
pub async fn vonage_inbound(
    State(hooks): State<Webhooks>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let request = Callback::unsigned_url(&headers, &body);
    let read = vonage::callbacks::read_inbound(&hooks.callbacks.gateways, &request);
    inbound(&hooks, read, || StatusCode::NO_CONTENT.into_response()).await
}

/// `POST /webhooks/vonage/status`: a signed delivery receipt (JSON or form), applied once.
pub async fn vonage_status_callback(
    State(hooks): State<Webhooks>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let request = Callback::unsigned_url(&headers, &body);
    let read = vonage::callbacks::read_status(&hooks.callbacks.gateways, &request);
    receipt(&hooks, read).await
}
