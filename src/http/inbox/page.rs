//! The inbox page: conversations by recipient, like a phone's messages app, rendered from
//! `templates/inbox.html` with askama, which escapes every value (a body holding
//! `<script>` is shown as text). The script only fetches the conversations block again.

use askama::Template;
use axum::{
    extract::{Query, State},
    http::{HeaderName, StatusCode, header},
    response::{Html, IntoResponse, Response},
};
use time::{OffsetDateTime, format_description::BorrowedFormatItem, macros::format_description};
use uuid::Uuid;

use super::{Inbox, NO_STORE, Params, Refused, encoding_warning, find_replies, messages};
use crate::{
    segments,
    store::{InboxMessage, ReplyView},
};

/// Messages the page shows at most.
const PAGE_LIMIT: i64 = 200;
const TIME: &[BorrowedFormatItem<'_>] = format_description!("[hour]:[minute]:[second]");
const DATE: &[BorrowedFormatItem<'_>] = format_description!("[year]-[month]-[day]");
/// Only the page's own script and style run: a body that escaped its escaping still would
/// not.
const POLICY: (HeaderName, &str) = (
    header::CONTENT_SECURITY_POLICY,
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
     form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
);

/// One text, as a bubble shows it.
#[derive(Debug)]
pub(super) struct Bubble {
    pub message_id: Uuid,
    /// A reply from the phone, not a text smsgw sent.
    pub incoming: bool,
    pub at: OffsetDateTime,
    pub date: String,
    pub time: String,
    /// `school 42`, or `no school` for a reply that answers nothing found.
    pub school: String,
    pub kind: String,
    pub from: String,
    pub body: String,
    pub segments: String,
    pub encoding: &'static str,
    pub warning: Option<String>,
    pub status: String,
    /// `ok`, `pending`, `held` or `failed`: the bubble's colour.
    pub tone: &'static str,
    /// Why it was held back or failed, with the provider's code and words.
    pub why: Option<String>,
}

/// One recipient's texts and replies, oldest first.
#[derive(Debug)]
pub(super) struct Conversation {
    pub to: String,
    /// The sender a reply from this number answers: the newest text's sender ID, or
    /// empty for the default sender.
    pub reply_to: String,
    pub bubbles: Vec<Bubble>,
}

#[derive(Template)]
#[template(path = "inbox.html")]
struct Page {
    to: String,
    school_id: String,
    count: usize,
    conversations: Vec<Conversation>,
}

/// The page's conversations block alone, for the script to swap in.
#[derive(Template)]
#[template(path = "inbox.html", block = "conversations")]
struct Conversations {
    count: usize,
    conversations: Vec<Conversation>,
}

fn tone(status: &str) -> &'static str {
    match status {
        "sent" | "delivered" => "ok",
        "suppressed" | "expired" | "cancelled" => "held",
        "failed" | "undelivered" => "failed",
        _ => "pending",
    }
}

fn why(m: &InboxMessage) -> Option<String> {
    let error = match (&m.error_code, &m.error) {
        _ if tone(&m.status) == "ok" => None,
        (Some(code), Some(error)) => Some(format!("{code} {error}")),
        (Some(text), None) | (None, Some(text)) => Some(text.clone()),
        (None, None) => None,
    };
    match (&m.reason, error) {
        (Some(reason), Some(error)) => Some(format!("{reason}: {error}")),
        (Some(text), None) => Some(text.clone()),
        (None, error) => error,
    }
}

fn bubble(m: InboxMessage) -> Bubble {
    let segmentation = segments::segment(&m.body);
    let segments = match m.segments {
        Some(1) => "1 segment".to_owned(),
        Some(n) => format!("{n} segments"),
        None => format!("{} segments", segmentation.segments),
    };
    Bubble {
        message_id: m.message_id,
        incoming: false,
        at: m.created_at,
        date: m.created_at.format(DATE).unwrap_or_default(),
        time: m.created_at.format(TIME).unwrap_or_default(),
        school: format!("school {}", m.school_id),
        warning: encoding_warning(&m.body),
        encoding: segmentation.encoding.as_str(),
        segments,
        tone: tone(&m.status),
        why: why(&m),
        from: m
            .from
            .clone()
            .unwrap_or_else(|| "default sender".to_owned()),
        kind: m.kind,
        status: m.status,
        body: m.body,
    }
}

fn reply_bubble(r: ReplyView) -> Bubble {
    let body = r.body.unwrap_or_else(|| "(purged)".to_owned());
    let segmentation = segments::segment(&body);
    Bubble {
        message_id: r.id,
        incoming: true,
        at: r.received_at,
        date: r.received_at.format(DATE).unwrap_or_default(),
        time: r.received_at.format(TIME).unwrap_or_default(),
        school: r
            .school_id
            .map_or_else(|| "no school".to_owned(), |id| format!("school {id}")),
        kind: "reply".to_owned(),
        from: r.from,
        encoding: segmentation.encoding.as_str(),
        segments: String::new(),
        warning: None,
        status: if r.in_reply_to.is_some() {
            "answers a text".to_owned()
        } else {
            "answers nothing found".to_owned()
        },
        tone: "reply",
        why: None,
        body,
    }
}

/// Groups messages and replies (each newest first) by phone number: the conversation
/// with the newest text first, each oldest first, as a phone shows them.
pub(super) fn conversations(
    newest_first: Vec<InboxMessage>,
    replies: Vec<ReplyView>,
) -> Vec<Conversation> {
    let mut grouped: Vec<Conversation> = Vec::new();
    let mut add = |number: String, sender: Option<String>, bubble: Bubble| match grouped
        .iter_mut()
        .find(|c| c.to == number)
    {
        Some(conversation) => conversation.bubbles.push(bubble),
        None => grouped.push(Conversation {
            to: number,
            reply_to: sender.unwrap_or_default(),
            bubbles: vec![bubble],
        }),
    };
    for message in newest_first {
        let (to, from) = (message.to.clone(), message.from.clone());
        add(to, from, bubble(message));
    }
    for reply in replies {
        add(reply.from.clone(), None, reply_bubble(reply));
    }
    for conversation in &mut grouped {
        conversation.bubbles.sort_by_key(|b| b.at);
    }
    grouped.sort_by_key(|c| std::cmp::Reverse(c.bubbles.last().map(|b| b.at)));
    grouped
}

/// The messages and the replies the query selects, grouped.
async fn load(inbox: &Inbox, params: &Params) -> Result<(usize, Vec<Conversation>), Refused> {
    let found = messages(inbox, params, PAGE_LIMIT).await?;
    let replies = find_replies(inbox, params, PAGE_LIMIT).await?;
    let count = found.len() + replies.len();
    Ok((count, conversations(found, replies)))
}

fn html(template: &impl Template) -> Response {
    match template.render() {
        Ok(text) => ([NO_STORE, POLICY], Html(text)).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "cannot render the inbox page");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "cannot render the inbox\n",
            )
                .into_response()
        }
    }
}

/// `GET /inbox`
pub(super) async fn page(State(inbox): State<Inbox>, Query(params): Query<Params>) -> Response {
    let (count, conversations) = match load(&inbox, &params).await {
        Ok(loaded) => loaded,
        Err(refused) => return refused.into_response(),
    };
    html(&Page {
        to: params.to.clone().unwrap_or_default(),
        school_id: params.school_id.clone().unwrap_or_default(),
        count,
        conversations,
    })
}

/// `GET /inbox/conversations`: the page's conversations block, for the script.
pub(super) async fn conversations_block(
    State(inbox): State<Inbox>,
    Query(params): Query<Params>,
) -> Response {
    match load(&inbox, &params).await {
        Ok((count, conversations)) => html(&Conversations {
            count,
            conversations,
        }),
        Err(refused) => refused.into_response(),
    }
}

/// `GET /inbox/inbox.js`
pub(super) async fn script() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("inbox.js"),
    )
}

/// `GET /inbox/inbox.css`
pub(super) async fn style() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("inbox.css"),
    )
}

#[cfg(test)]
mod tests {
    use time::OffsetDateTime;

    use super::*;

    fn message(to: &str, body: &str, status: &str) -> InboxMessage {
        InboxMessage {
            message_id: Uuid::new_v4(),
            job_id: Uuid::new_v4(),
            to: to.into(),
            from: None,
            body: body.into(),
            kind: "login_code".into(),
            school_id: 42,
            status: status.into(),
            reason: None,
            segments: Some(1),
            attempts: 1,
            error_code: None,
            error: None,
            created_at: OffsetDateTime::UNIX_EPOCH,
            updated_at: OffsetDateTime::UNIX_EPOCH,
        }
    }

    #[test]
    fn conversations_are_by_recipient_newest_first_each_oldest_first() {
        let at = |seconds| OffsetDateTime::UNIX_EPOCH + time::Duration::seconds(seconds);
        let grouped = conversations(
            vec![
                InboxMessage {
                    created_at: at(3),
                    ..message("+1", "third", "sent")
                },
                InboxMessage {
                    created_at: at(2),
                    ..message("+2", "second", "sent")
                },
                InboxMessage {
                    created_at: at(1),
                    ..message("+1", "first", "sent")
                },
            ],
            Vec::new(),
        );
        let shown: Vec<(&str, Vec<&str>)> = grouped
            .iter()
            .map(|c| {
                (
                    c.to.as_str(),
                    c.bubbles.iter().map(|b| b.body.as_str()).collect(),
                )
            })
            .collect();
        assert_eq!(
            shown,
            [("+1", vec!["first", "third"]), ("+2", vec!["second"])]
        );
    }

    #[test]
    fn a_body_is_shown_as_text_never_as_markup() {
        let page = Conversations {
            count: 1,
            conversations: conversations(
                vec![message(
                    "+1",
                    "<script>alert(1)</script> & \"quotes\"",
                    "sent",
                )],
                Vec::new(),
            ),
        };
        let html = page.render().expect("renders");
        assert!(!html.contains("<script>"), "{html}");
        assert!(
            html.contains("&#60;script&#62;alert(1)&#60;/script&#62;"),
            "{html}"
        );
    }

    #[test]
    fn a_reply_joins_its_numbers_conversation_in_time_order() {
        let at = |seconds| OffsetDateTime::UNIX_EPOCH + time::Duration::seconds(seconds);
        let reply = |from: &str, body: &str, seconds| ReplyView {
            id: Uuid::new_v4(),
            received_at: at(seconds),
            from: from.into(),
            to: "inbox".into(),
            body: Some(body.into()),
            provider: "inbox".into(),
            school_id: None,
            in_reply_to: None,
        };
        let grouped = conversations(
            vec![InboxMessage {
                created_at: at(1),
                from: Some("DriveCo".into()),
                ..message("+1", "Lesson at 10:00", "sent")
            }],
            vec![
                reply("+2", "who is this?", 5),
                reply("+1", "Running late", 2),
            ],
        );
        assert_eq!(grouped[0].to, "+2", "the newest conversation first");
        assert_eq!(grouped[1].reply_to, "DriveCo");
        let bodies: Vec<(&str, bool)> = grouped[1]
            .bubbles
            .iter()
            .map(|b| (b.body.as_str(), b.incoming))
            .collect();
        assert_eq!(bodies, [("Lesson at 10:00", false), ("Running late", true)]);
    }

    #[test]
    fn a_failure_says_why_with_the_providers_words() {
        let failed = InboxMessage {
            reason: Some("permanent_failure".into()),
            error_code: Some("21211".into()),
            error: Some("The 'To' number is not a valid phone number.".into()),
            ..message("+15005550001", "hi", "failed")
        };
        assert_eq!(
            why(&failed).as_deref(),
            Some("permanent_failure: 21211 The 'To' number is not a valid phone number.")
        );
        let suppressed = InboxMessage {
            reason: Some("opted_out".into()),
            ..message("+1", "hi", "suppressed")
        };
        assert_eq!(why(&suppressed).as_deref(), Some("opted_out"));
    }
}
