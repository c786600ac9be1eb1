//! The development inbox on `SMSGW_HTTP_ADDR` (contract section 10), served only while an
//! inbox provider is configured (which production refuses); 404 otherwise.
//!
//! - `GET /inbox`: the page, conversations by recipient, kept current by a little script
//!   that fetches `GET /inbox/conversations` (the same template's conversations block)
//!   once a second. Everything is rendered and escaped on the server.
//! - `GET /inbox/api/messages?to=&school_id=&limit=`: JSON, newest first, for tests.
//! - `DELETE /inbox/api/messages?to=&school_id=`: empties the inbox (or the part the
//!   filters select), replies sent through it included; the message log keeps every row.
//! - `POST /inbox/api/replies` (`{"from", "to", "body"}`): a reply, as if a phone had sent
//!   it, through the same path as a provider's inbound webhook; `GET /inbox/api/replies`
//!   lists replies, newest first, with the same filters as the messages.
//!
//! Each answers only a request addressed to this machine by name (`hosts`): 421 otherwise.

use axum::{
    Json, Router,
    extract::{Query, State},
    http::{HeaderName, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use serde::{Deserialize, Serialize};
use serde_json::json;
use time::format_description::well_known::Rfc3339;
use tokio::sync::watch;
use uuid::Uuid;

mod hosts;
mod page;

pub(super) use hosts::AllowedHosts;

use crate::{
    callbacks::{CallbackError, Callbacks, Inbound},
    config::Keyword,
    phone::PhoneNumber,
    provider::{InboundText, our_number},
    segments,
    store::{InboxFilter, InboxMessage, ReplySearch, ReplyView, Store},
};

/// Messages the API returns when it is not told how many.
const DEFAULT_LIMIT: i64 = 50;
/// Messages the API or the page returns at most.
const MAX_LIMIT: i64 = 1_000;
/// Nothing here may be kept by a cache: bodies hold login codes.
const NO_STORE: (HeaderName, &str) = (header::CACHE_CONTROL, "no-store");

#[derive(Clone)]
pub(super) struct Inbox {
    /// `None` until the database is first reached.
    pub store: watch::Receiver<Option<Store>>,
    /// Where a reply typed into the inbox goes: where a provider's would.
    pub callbacks: Callbacks,
}

impl Inbox {
    fn store(&self) -> Result<Store, Refused> {
        self.store.borrow().clone().ok_or(Refused::Unavailable)
    }
}

/// Why an inbox request got no answer but an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refused {
    /// A query value that cannot be read (400), naming it.
    BadValue(&'static str),
    /// The database is not reached yet, or did not answer (503).
    Unavailable,
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        match self {
            Refused::BadValue(what) => (
                StatusCode::BAD_REQUEST,
                format!("{what}: not a valid value\n"),
            )
                .into_response(),
            Refused::Unavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "cannot read the inbox now; try again\n",
            )
                .into_response(),
        }
    }
}

/// The inbox's routes, answering only requests addressed to one of the `allowed` hosts.
pub(super) fn routes(inbox: Inbox, allowed: AllowedHosts) -> Router {
    Router::new()
        .route("/inbox", get(page::page))
        .route("/inbox/conversations", get(page::conversations_block))
        .route("/inbox/inbox.js", get(page::script))
        .route("/inbox/inbox.css", get(page::style))
        .route("/inbox/api/messages", get(list).delete(empty))
        .route("/inbox/api/replies", get(replies).post(reply))
        .with_state(inbox)
        .layer(axum::middleware::from_fn_with_state(
            allowed,
            hosts::refuse_other_hosts,
        ))
}

/// The query of every inbox request, as it came.
#[derive(Debug, Default, Deserialize)]
pub(super) struct Params {
    to: Option<String>,
    school_id: Option<String>,
    limit: Option<String>,
}

impl Params {
    /// The filter the query asks for; `Err` names a value that is not a number.
    fn filter(&self) -> Result<InboxFilter, Refused> {
        let school_id = match self.school_id.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(id) => Some(
                id.parse::<i64>()
                    .map_err(|_| Refused::BadValue("school_id"))?,
            ),
        };
        let to = self
            .to
            .as_deref()
            .filter(|to| !to.trim().is_empty())
            .map(recipient);
        Ok(InboxFilter { to, school_id })
    }

    fn limit(&self, default: i64) -> Result<i64, Refused> {
        match self.limit.as_deref().map(str::trim) {
            None | Some("") => Ok(default),
            Some(n) => n
                .parse::<i64>()
                .ok()
                .filter(|n| (1..=MAX_LIMIT).contains(n))
                .ok_or(Refused::BadValue("limit (1 to 1000)")),
        }
    }
}

/// The recipient a `to` filter means, as the log records it. A `+` in a query string
/// that was not percent-encoded arrives as a space: a leading space is read as `+`.
pub(super) fn recipient(raw: &str) -> String {
    let raw = raw.trim_end();
    let given = match raw.strip_prefix(' ') {
        Some(rest) => format!("+{}", rest.trim_start()),
        None => raw.trim_start().to_owned(),
    };
    // Written another way (spaces, dashes): the log has it in E.164. A number that cannot
    // be read is looked for as given, as the log keeps an unreadable one.
    match PhoneNumber::parse(&given, None) {
        Ok(number) => number.as_str().to_owned(),
        Err(_) => given,
    }
}

/// One message as the API gives it (contract section 10, and a few more fields).
#[derive(Debug, Serialize)]
struct ApiMessage<'a> {
    message_id: Uuid,
    job_id: Uuid,
    to: &'a str,
    from: Option<&'a str>,
    body: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    school_id: i64,
    status: &'a str,
    reason: Option<&'a str>,
    segments: Option<i32>,
    encoding: &'static str,
    /// Says which characters made a text UCS-2, when that cost segments.
    encoding_warning: Option<String>,
    attempts: i32,
    error_code: Option<&'a str>,
    error: Option<&'a str>,
    created_at: String,
    updated_at: String,
}

impl<'a> ApiMessage<'a> {
    fn new(m: &'a InboxMessage) -> Self {
        ApiMessage {
            message_id: m.message_id,
            job_id: m.job_id,
            to: &m.to,
            from: m.from.as_deref(),
            body: &m.body,
            kind: &m.kind,
            school_id: m.school_id,
            status: &m.status,
            reason: m.reason.as_deref(),
            segments: m.segments,
            encoding: segments::segment(&m.body).encoding.as_str(),
            encoding_warning: encoding_warning(&m.body),
            attempts: m.attempts,
            error_code: m.error_code.as_deref(),
            error: m.error.as_deref(),
            created_at: m.created_at.format(&Rfc3339).unwrap_or_default(),
            updated_at: m.updated_at.format(&Rfc3339).unwrap_or_default(),
        }
    }
}

/// "UCS-2 because of '👍': 2 segments instead of 1", when a few characters outside the
/// GSM alphabet cost the text segments.
pub(super) fn encoding_warning(body: &str) -> Option<String> {
    let cost = segments::ucs2_cost(body)?;
    let shown: Vec<String> = cost
        .characters
        .iter()
        .take(5)
        .map(|c| format!("'{c}'"))
        .collect();
    let more = if cost.characters.len() > shown.len() {
        " and more"
    } else {
        ""
    };
    Some(format!(
        "UCS-2 because of {}{more}: {} segments instead of {}",
        shown.join(", "),
        cost.segments,
        cost.gsm7_segments
    ))
}

/// The messages the query selects, newest first.
async fn messages(
    inbox: &Inbox,
    params: &Params,
    default_limit: i64,
) -> Result<Vec<InboxMessage>, Refused> {
    let filter = params.filter()?;
    let limit = params.limit(default_limit)?;
    inbox
        .store()?
        .inbox_messages(&filter, limit)
        .await
        .map_err(unavailable)
}

fn unavailable(error: crate::store::StoreError) -> Refused {
    tracing::warn!(error = %error, "cannot read or empty the inbox");
    Refused::Unavailable
}

/// `GET /inbox/api/messages`
async fn list(State(inbox): State<Inbox>, Query(params): Query<Params>) -> Response {
    match messages(&inbox, &params, DEFAULT_LIMIT).await {
        Ok(found) => {
            let items: Vec<ApiMessage<'_>> = found.iter().map(ApiMessage::new).collect();
            ([NO_STORE], Json(items)).into_response()
        }
        Err(refused) => refused.into_response(),
    }
}

/// `DELETE /inbox/api/messages`: how many messages and replies went from the inbox.
async fn empty(State(inbox): State<Inbox>, Query(params): Query<Params>) -> Response {
    let emptied = async {
        let filter = params.filter()?;
        let store = inbox.store()?;
        let messages = store.empty_inbox(&filter).await.map_err(unavailable)?;
        let replies = store
            .empty_inbox_replies(&filter)
            .await
            .map_err(unavailable)?;
        Ok::<_, Refused>((messages, replies))
    };
    match emptied.await {
        Ok((messages, replies)) => {
            Json(json!({ "emptied": messages, "replies": replies })).into_response()
        }
        Err(refused) => refused.into_response(),
    }
}

/// The replies the query selects, newest first.
pub(super) async fn find_replies(
    inbox: &Inbox,
    params: &Params,
    default_limit: i64,
) -> Result<Vec<ReplyView>, Refused> {
    let filter = params.filter()?;
    let search = ReplySearch {
        from: filter.to,
        school_id: filter.school_id,
        since: None,
        limit: params.limit(default_limit)?,
    };
    inbox
        .store()?
        .find_replies(&search)
        .await
        .map_err(unavailable)
}

/// One reply as the API gives it.
fn api_reply(r: &ReplyView) -> serde_json::Value {
    json!({
        "reply_id": r.id,
        "from": r.from,
        "to": r.to,
        "body": r.body,
        "provider": r.provider,
        "school_id": r.school_id,
        "in_reply_to": r.in_reply_to,
        "received_at": r.received_at.format(&Rfc3339).unwrap_or_default(),
    })
}

/// `GET /inbox/api/replies`
async fn replies(State(inbox): State<Inbox>, Query(params): Query<Params>) -> Response {
    match find_replies(&inbox, &params, DEFAULT_LIMIT).await {
        Ok(found) => {
            let items: Vec<serde_json::Value> = found.iter().map(api_reply).collect();
            ([NO_STORE], Json(items)).into_response()
        }
        Err(refused) => refused.into_response(),
    }
}

/// A reply typed into the inbox.
#[derive(Debug, Deserialize)]
struct TypedReply {
    from: String,
    /// The sender it answers: a number, a sender ID, or empty for the default.
    #[serde(default)]
    to: String,
    body: String,
}

/// `POST /inbox/api/replies`: a reply as if a phone had sent it, through the same path
/// as a provider's inbound webhook (so STOP and START work here too).
async fn reply(State(inbox): State<Inbox>, Json(typed): Json<TypedReply>) -> Response {
    let Ok(from) = PhoneNumber::parse(&typed.from, None) else {
        return (StatusCode::BAD_REQUEST, "from: not a phone number\n").into_response();
    };
    let to = match typed.to.trim() {
        "" => "inbox".to_owned(),
        to => our_number(to),
    };
    let text = InboundText {
        provider: "inbox",
        provider_message_id: Uuid::new_v4().to_string(),
        from,
        to,
        body: typed.body,
        signed_by: Vec::new(),
    };
    match inbox.callbacks.receive_inbound(&text).await {
        Ok(Inbound::Reply(id)) => {
            (StatusCode::CREATED, Json(json!({ "reply_id": id }))).into_response()
        }
        Ok(Inbound::Keyword(word)) => {
            let keyword = match word {
                Keyword::OptOut => "opt_out",
                Keyword::OptIn => "opt_in",
            };
            Json(json!({ "keyword": keyword })).into_response()
        }
        Err(CallbackError::Invalid(why)) => (StatusCode::BAD_REQUEST, why).into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "could not keep a reply typed into the inbox");
            Refused::Unavailable.into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plus_that_arrived_as_a_space_is_read_as_plus() {
        assert_eq!(recipient(" 15005550001"), "+15005550001");
        assert_eq!(recipient("+15005550001"), "+15005550001");
        assert_eq!(recipient("+44 7700 900123"), "+447700900123");
        assert_eq!(recipient("not a number"), "not a number");
    }

    #[test]
    fn a_bad_school_or_limit_is_refused() {
        let params = |school: &str, limit: &str| Params {
            to: None,
            school_id: Some(school.into()),
            limit: Some(limit.into()),
        };
        assert_eq!(
            params("x", "1").filter(),
            Err(Refused::BadValue("school_id"))
        );
        assert!(params("42", "0").limit(50).is_err());
        assert!(params("42", "1001").limit(50).is_err());
        assert_eq!(params("42", "").limit(50), Ok(50));
        let filter = params(" 42 ", "").filter().expect("valid");
        assert_eq!(filter.school_id, Some(42));
    }

    #[test]
    fn an_emoji_that_costs_segments_is_named() {
        let body = format!("{} 👍", "a".repeat(100));
        assert_eq!(
            encoding_warning(&body).as_deref(),
            Some("UCS-2 because of '👍': 2 segments instead of 1")
        );
        assert_eq!(encoding_warning("Your code is 4711"), None);
    }
}
