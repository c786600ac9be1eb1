//! Replies as support reads them (`smsgw replies`, and beside a number's messages in
//! `smsgw status --to`): newest first, numbers masked and bodies hidden unless
//! `--reveal`.

use std::process::ExitCode;

use serde_json::{Value, json};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

use super::{EXIT_FAILED, print_table, short_time, shorten};
use crate::{
    config::Settings,
    phone::{PhoneNumber, mask},
    store::{ReplySearch, ReplyView, Store},
};

/// What `smsgw replies` looks for; every filter given must hold.
#[derive(Debug, Clone)]
pub struct ReplyLookup {
    pub from: Option<PhoneNumber>,
    pub school: Option<i64>,
    /// Received at or after.
    pub since: Option<OffsetDateTime>,
    pub limit: u16,
    pub json: bool,
    pub reveal: bool,
}

impl ReplyLookup {
    /// One more than shown, to tell whether more match.
    pub(super) fn search(&self) -> ReplySearch {
        ReplySearch {
            from: self.from.as_ref().map(|n| n.as_str().to_owned()),
            school_id: self.school,
            since: self.since,
            limit: i64::from(self.limit) + 1,
        }
    }
}

/// `smsgw replies`: the matching replies, newest first. None is an answer (exit 0).
pub async fn list_replies(settings: &Settings, lookup: &ReplyLookup) -> ExitCode {
    let store = match Store::connect(settings.store.url.expose(), 1).await {
        Ok(store) => store,
        Err(e) => {
            eprintln!("smsgw: message log unavailable: {e}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    let found = store.find_replies(&lookup.search()).await;
    store.close().await;
    match found {
        Ok(replies) => {
            print_replies(replies, lookup);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("smsgw: message log unavailable: {e}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}

/// Prints at most `lookup.limit` of `replies` (fetched one over the limit).
pub(super) fn print_replies(mut replies: Vec<ReplyView>, lookup: &ReplyLookup) {
    let limit = usize::from(lookup.limit);
    let more = replies.len() > limit;
    replies.truncate(limit);
    if lookup.json {
        let items: Vec<Value> = replies.iter().map(|r| json_of(r, lookup.reveal)).collect();
        println!("{}", Value::Array(items));
        if more {
            eprintln!("showing the newest {limit}; more match (--limit, --since)");
        }
        return;
    }
    if replies.is_empty() {
        println!("no replies match");
        return;
    }
    let rows: Vec<Vec<String>> = replies.iter().map(|r| row_of(r, lookup.reveal)).collect();
    print_table(
        &[
            "RECEIVED",
            "REPLY ID",
            "SCHOOL",
            "FROM",
            "TO",
            "PROVIDER",
            "IN REPLY TO",
            "TEXT",
        ],
        &rows,
    );
    let more = if more {
        "; more match (--limit, --since)"
    } else {
        ""
    };
    let hidden = if lookup.reveal {
        ""
    } else {
        "; --reveal shows numbers and texts"
    };
    println!("{} shown, newest first{more}{hidden}", replies.len());
}

fn row_of(r: &ReplyView, reveal: bool) -> Vec<String> {
    let text = match (&r.body, reveal) {
        (None, _) => "(purged)".to_owned(),
        (Some(body), true) => shorten(body, 60),
        (Some(_), false) => "(hidden)".to_owned(),
    };
    vec![
        short_time(r.received_at),
        r.id.to_string(),
        r.school_id.map_or("-".into(), |id| id.to_string()),
        if reveal {
            r.from.clone()
        } else {
            mask(&r.from)
        },
        if reveal { r.to.clone() } else { mask(&r.to) },
        r.provider.clone(),
        r.in_reply_to.map_or("-".into(), |id| id.to_string()),
        text,
    ]
}

fn json_of(r: &ReplyView, reveal: bool) -> Value {
    let mut item = json!({
        "reply_id": r.id,
        "received_at": r.received_at.format(&Rfc3339).ok(),
        "school_id": r.school_id,
        "from": if reveal { r.from.clone() } else { mask(&r.from) },
        "to": if reveal { r.to.clone() } else { mask(&r.to) },
        "provider": r.provider,
        "in_reply_to": r.in_reply_to,
    });
    if reveal {
        item["body"] = r.body.clone().into();
    }
    item
}
