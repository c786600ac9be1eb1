//! A message's record in the log, as support reads it (`smsgw status`, `dlq show`):
//! numbers masked and the body hidden unless `--reveal`.

use time::{OffsetDateTime, format_description::well_known::Rfc3339};

use super::{hider, print_table, shorten};
use crate::{
    config::Settings,
    phone::mask,
    store::{AttemptView, MessageView, Store},
};

/// Prints the message's row and attempts from the log; says whether it found the row.
pub async fn print_log(settings: &Settings, id: uuid::Uuid, reveal: bool) -> bool {
    let store = match Store::connect(settings.database_url.expose(), 1).await {
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
