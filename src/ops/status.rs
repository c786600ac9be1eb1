//! The log as support reads it (`smsgw status`, `dlq show`): one message's record and
//! attempts, or the messages to a number, of a school, or with a context value, newest
//! first. Numbers masked and the body hidden unless `--reveal`.

use std::process::ExitCode;

use serde_json::{Value, json};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

use super::{
    ContextMatch, EXIT_FAILED, EXIT_USAGE, NumberQuery, hider, masked_values, print_table,
    replies::{ReplyLookup, print_replies},
    short_time, shorten,
};
use crate::{
    config::Settings,
    phone::{PhoneNumber, mask},
    store::{AttemptView, MessageSearch, MessageView, ReplySearch, ReplyView, Store, StoreError},
};

/// What `smsgw status` looks messages up by; every filter given must hold.
#[derive(Debug, Clone)]
pub struct Lookup {
    pub to: Option<NumberQuery>,
    /// Only this school's messages; its country reads a national `to`.
    pub school: Option<i64>,
    /// Created at or after.
    pub since: Option<OffsetDateTime>,
    pub context: Option<ContextMatch>,
    /// Show at most this many, the newest.
    pub limit: u16,
    pub json: bool,
    pub reveal: bool,
}

/// `smsgw status --to/--school/--since/--context`: the matching messages, newest first.
/// Finding none is an answer, not a failure (exit 0).
pub async fn find_messages(settings: &Settings, lookup: &Lookup) -> ExitCode {
    let store = match Store::connect(settings.store.url.expose(), 1).await {
        Ok(store) => store,
        Err(e) => return unavailable(&e),
    };
    let found = match search_for(&store, lookup).await {
        Ok(search) => with_replies(&store, search, lookup).await,
        Err(code) => Err(code),
    };
    store.close().await;
    match found {
        Ok((mut messages, replies)) => {
            let limit = usize::from(lookup.limit);
            let more = messages.len() > limit;
            messages.truncate(limit);
            print_found(&messages, more, lookup);
            if let Some(replies) = replies {
                println!();
                println!("Replies from this number:");
                print_replies(replies, &reply_lookup(lookup));
            }
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

/// The messages found and, for a table of one number's messages, that number's replies.
async fn with_replies(
    store: &Store,
    search: MessageSearch,
    lookup: &Lookup,
) -> Result<(Vec<MessageView>, Option<Vec<ReplyView>>), ExitCode> {
    let messages = store
        .find_messages(&search)
        .await
        .map_err(|e| unavailable(&e))?;
    let Some(number) = search.recipient.filter(|_| !lookup.json) else {
        return Ok((messages, None));
    };
    let search = ReplySearch {
        from: Some(number),
        ..reply_lookup(lookup).search()
    };
    let replies = store
        .find_replies(&search)
        .await
        .map_err(|e| unavailable(&e))?;
    Ok((messages, Some(replies)))
}

/// How the replies beside a number's messages are shown: with the same filters.
fn reply_lookup(lookup: &Lookup) -> ReplyLookup {
    ReplyLookup {
        from: None,
        school: lookup.school,
        since: lookup.since,
        limit: lookup.limit,
        json: false,
        reveal: lookup.reveal,
    }
}

fn unavailable(e: &StoreError) -> ExitCode {
    eprintln!("smsgw: message log unavailable: {e}");
    ExitCode::from(EXIT_FAILED)
}

fn refuse(message: &str) -> ExitCode {
    eprintln!("smsgw: {message}");
    ExitCode::from(EXIT_USAGE)
}

async fn search_for(store: &Store, lookup: &Lookup) -> Result<MessageSearch, ExitCode> {
    let recipient = match &lookup.to {
        Some(number) => Some(recipient(store, number, lookup.school).await?),
        None => None,
    };
    Ok(MessageSearch {
        recipient: recipient.map(|number| number.as_str().to_owned()),
        school_id: lookup.school,
        since: lookup.since,
        context_any: lookup
            .context
            .as_ref()
            .map(ContextMatch::forms)
            .unwrap_or_default(),
        // One more than shown, to tell whether more match.
        limit: i64::from(lookup.limit) + 1,
    })
}

/// `--to` in E.164, as the log keeps it: a national number read with the country of
/// `--school` (`sms_school_settings.country`), as the daemon read it when it was sent.
async fn recipient(
    store: &Store,
    number: &NumberQuery,
    school: Option<i64>,
) -> Result<PhoneNumber, ExitCode> {
    let country = match (number.is_national(), school) {
        (true, Some(id)) => match store.school_settings(id).await {
            Ok(Some(settings)) => settings.country,
            Ok(None) => {
                return Err(refuse(&format!(
                    "--to: school {id} has no row in sms_school_settings to read a national \
                     number with; give it in E.164 (+44...)"
                )));
            }
            Err(e) => return Err(unavailable(&e)),
        },
        // In E.164 already; or national without a school, which `resolve` refuses.
        _ => None,
    };
    number
        .resolve(country.as_deref())
        .map_err(|e| refuse(&format!("--to: {e}")))
}

fn print_found(messages: &[MessageView], more: bool, lookup: &Lookup) {
    let shown = messages.len();
    if lookup.json {
        let items: Vec<Value> = messages.iter().map(|m| json_of(m, lookup.reveal)).collect();
        println!("{}", Value::Array(items));
        if more {
            eprintln!("showing the newest {shown}; more match (--limit, --since)");
        }
        return;
    }
    if messages.is_empty() {
        println!("no messages match");
        return;
    }
    let hide = |number: &str| {
        if lookup.reveal {
            number.to_owned()
        } else {
            mask(number)
        }
    };
    let rows: Vec<Vec<String>> = messages.iter().map(|m| row_of(m, &hide)).collect();
    let header = [
        "CREATED",
        "MESSAGE ID",
        "SCHOOL",
        "TYPE",
        "TO",
        "STATUS",
        "SEGMENTS",
        "ATTEMPTS",
        "PROVIDER",
    ];
    print_table(&header, &rows);
    let more = if more {
        "; more match (--limit, --since)"
    } else {
        ""
    };
    println!("{shown} shown, newest first{more}. `smsgw status ID`: one with its attempts");
}

fn row_of(m: &MessageView, hide: &impl Fn(&str) -> String) -> Vec<String> {
    let status = match &m.reason {
        Some(reason) => format!("{} ({reason})", m.status),
        None => m.status.clone(),
    };
    vec![
        short_time(m.created_at),
        m.id.to_string(),
        m.school_id.to_string(),
        m.kind.clone(),
        hide(&m.recipient),
        status,
        m.segments.map_or("-".into(), |s| s.to_string()),
        m.attempts.to_string(),
        m.provider.clone().unwrap_or_else(|| "-".into()),
    ]
}

/// A message for `--json`: the number masked, the context's values hidden and no body,
/// unless `reveal`.
fn json_of(m: &MessageView, reveal: bool) -> Value {
    let context = if reveal {
        m.context.clone()
    } else {
        m.context.clone().map(masked_values)
    };
    let mut item = json!({
        "id": m.id,
        "bulk_id": m.bulk_id,
        "school_id": m.school_id,
        "type": m.kind,
        "to": if reveal { m.recipient.clone() } else { mask(&m.recipient) },
        "status": m.status,
        "reason": m.reason,
        "provider": m.provider,
        "provider_message_id": m.provider_message_id,
        "provider_status": m.provider_status,
        "error_code": m.error_code,
        "segments": m.segments,
        "attempts": m.attempts,
        "context": context,
        "created_at": rfc3339(Some(m.created_at)),
        "sent_at": rfc3339(m.sent_at),
        "delivered_at": rfc3339(m.delivered_at),
        "updated_at": rfc3339(Some(m.updated_at)),
    });
    if reveal {
        item["body"] = m.body.clone().into();
    }
    item
}

fn rfc3339(at: Option<OffsetDateTime>) -> Option<String> {
    at.and_then(|t| t.format(&Rfc3339).ok())
}

/// `smsgw status ID`: prints the message's row and attempts from the log; says whether it
/// found the row.
pub async fn print_log(settings: &Settings, id: uuid::Uuid, reveal: bool) -> bool {
    let store = match Store::connect(settings.store.url.expose(), 1).await {
        Ok(store) => store,
        Err(e) => {
            println!("message log: unavailable ({e})");
            return false;
        }
    };
    let message = store.message_view(id).await;
    let attempts = store.attempt_views(id).await;
    store.close().await;
    match message {
        Ok(Some(message)) => print_message(&message, reveal),
        Ok(None) => {
            println!("message log: no row for {id}");
            return false;
        }
        Err(e) => {
            println!("message log: unavailable ({e})");
            return false;
        }
    }
    match attempts {
        Ok(attempts) if !attempts.is_empty() => print_attempts(&attempts, reveal),
        Ok(_) => println!("attempts: none (no provider call was made)"),
        Err(e) => println!("attempts: unavailable ({e})"),
    }
    true
}

fn time(at: Option<OffsetDateTime>) -> String {
    at.and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| "-".into())
}

fn print_message(m: &MessageView, reveal: bool) {
    println!("message log");
    let reason = m.reason.as_ref().map(|r| format!(" ({r})"));
    println!("  status     {}{}", m.status, reason.unwrap_or_default());
    println!("  type       {} (school {})", m.kind, m.school_id);
    let recipient = if reveal {
        m.recipient.clone()
    } else {
        mask(&m.recipient)
    };
    println!("  recipient  {recipient}");
    println!(
        "  provider   {} {}",
        m.provider.as_deref().unwrap_or("-"),
        m.provider_message_id.as_deref().unwrap_or("")
    );
    if m.provider_status.is_some() || m.error_code.is_some() {
        let code = m.error_code.as_ref().map(|c| format!(" (error {c})"));
        println!(
            "  receipt    {}{}",
            m.provider_status.as_deref().unwrap_or("-"),
            code.unwrap_or_default()
        );
    }
    if let Some(segments) = m.segments {
        println!("  segments   {segments}");
    }
    println!("  created    {}", time(Some(m.created_at)));
    println!("  sent       {}", time(m.sent_at));
    println!("  delivered  {}", time(m.delivered_at));
    if let Some(bulk) = m.bulk_id {
        println!("  bulk       {bulk}");
    }
    if reveal {
        println!("  body       {}", m.body.as_deref().unwrap_or("(purged)"));
    }
}

fn print_attempts(attempts: &[AttemptView], reveal: bool) {
    let hide = hider(reveal);
    println!("attempts");
    let rows: Vec<Vec<String>> = attempts
        .iter()
        .map(|a| {
            vec![
                format!("  #{}", a.attempt),
                a.started_at.format(&Rfc3339).unwrap_or_default(),
                a.provider.clone(),
                a.duration_ms.map_or("-".into(), |d| format!("{d} ms")),
                a.outcome
                    .clone()
                    .unwrap_or_else(|| "cut off (no outcome)".into()),
                a.http_status.map_or("-".into(), |s| format!("HTTP {s}")),
                a.error_code.clone().unwrap_or_else(|| "-".into()),
                hide(&shorten(a.error_message.as_deref().unwrap_or(""), 80)),
            ]
        })
        .collect();
    let header = [
        "", "STARTED", "PROVIDER", "TOOK", "OUTCOME", "HTTP", "CODE", "MESSAGE",
    ];
    print_table(&header, &rows);
}
