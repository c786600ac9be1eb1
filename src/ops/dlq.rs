//! `smsgw dlq list | show | replay | purge`: the dead letters, read without taking them.

use std::{process::ExitCode, time::Duration};

use serde_json::{Value, json};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

use super::{
    EXIT_FAILED, EXIT_USAGE, HIDDEN, hider, masked_values, open_dead, print_log, print_table,
    short_duration, shorten,
};
use crate::{
    broker::{Broker, BrokerError, DeadBrowser, DeadLetter, MAX_BROWSE, SILENCE, Shortfall},
    config::Settings,
    phone::{mask, redact_numbers},
};

/// Which dead letters a command is about.
#[derive(Debug, Clone, Default)]
pub struct DeadFilter {
    pub id: Option<String>,
    pub reason: Option<String>,
    pub kind: Option<String>,
    pub school: Option<i64>,
    pub older_than: Option<Duration>,
}

/// What the body of a dead letter says, read leniently (it may be the invalid job itself).
#[derive(Debug, Clone, Default)]
struct JobSummary {
    id: Option<String>,
    kind: Option<String>,
    school_id: Option<i64>,
    to: Option<String>,
}

fn summarize(letter: &DeadLetter) -> JobSummary {
    let Ok(Value::Object(job)) = serde_json::from_slice::<Value>(&letter.body) else {
        return JobSummary {
            id: letter.message_id.clone(),
            ..JobSummary::default()
        };
    };
    let text = |key: &str| job.get(key).and_then(Value::as_str).map(str::to_owned);
    JobSummary {
        id: text("id").or_else(|| letter.message_id.clone()),
        kind: text("type"),
        school_id: job.get("school_id").and_then(Value::as_i64),
        to: text("to"),
    }
}

fn age(letter: &DeadLetter, now: OffsetDateTime) -> Option<Duration> {
    letter
        .dead_at
        .and_then(|at| Duration::try_from(now - at).ok())
}

impl DeadFilter {
    fn matches(&self, letter: &DeadLetter, job: &JobSummary, now: OffsetDateTime) -> bool {
        let id_matches =
            |id: &str| job.id.as_deref() == Some(id) || letter.message_id.as_deref() == Some(id);
        self.id.as_deref().is_none_or(id_matches)
            && self.reason.as_deref().is_none_or(|r| letter.reason == r)
            && self
                .kind
                .as_deref()
                .is_none_or(|k| job.kind.as_deref() == Some(k))
            && self.school.is_none_or(|s| job.school_id == Some(s))
            && self
                .older_than
                .is_none_or(|limit| age(letter, now).is_some_and(|a| a >= limit))
    }
}

/// The dead letters `list` found: the first `limit` matching, and how many matched.
#[derive(Default)]
struct Listing {
    rows: Vec<Vec<String>>,
    objects: Vec<Value>,
    matched: usize,
}

impl Listing {
    fn add(&mut self, letter: &DeadLetter, job: JobSummary, now: OffsetDateTime) {
        let error = letter.error.as_deref().map(redact_numbers);
        let age = age(letter, now);
        self.objects.push(json!({
            "id": job.id,
            "type": job.kind,
            "school_id": job.school_id,
            "to": job.to.as_deref().map(mask),
            "reason": letter.reason,
            "attempts": letter.attempts,
            "error": error,
            "dead_at": letter.dead_at.and_then(|t| t.format(&Rfc3339).ok()),
            "age_seconds": age.map(|a| a.as_secs()),
            "routing_key": letter.routing_key,
        }));
        self.rows.push(vec![
            job.id.unwrap_or_else(|| "-".into()),
            job.kind.unwrap_or_else(|| "-".into()),
            job.school_id.map_or("-".into(), |s| s.to_string()),
            letter.reason.clone(),
            letter.attempts.map_or("-".into(), |a| a.to_string()),
            age.map_or("-".into(), short_duration),
            shorten(error.as_deref().unwrap_or("-"), 70),
        ]);
    }

    fn print(self, coverage: &Coverage, as_json: bool) {
        if as_json {
            println!("{}", Value::Array(self.objects));
            // Standard output stays one JSON document.
            eprintln!("{}", coverage.looked_at());
            return;
        }
        let header = [
            "JOB ID",
            "TYPE",
            "SCHOOL",
            "REASON",
            "ATTEMPTS",
            "AGE",
            "LAST ERROR",
        ];
        print_table(&header, &self.rows);
        println!(
            "{} shown, {} matching; {}",
            self.rows.len(),
            self.matched,
            coverage.looked_at()
        );
    }
}

/// How much of `sms.dead` one run saw: at most [`MAX_BROWSE`] letters, and only those
/// that arrived within [`SILENCE`] of each other.
struct Coverage {
    seen: u32,
    total: u32,
    shortfall: Option<Shortfall>,
}

impl Coverage {
    fn of(browser: &DeadBrowser) -> Self {
        Coverage {
            seen: browser.seen(),
            total: browser.total,
            shortfall: browser.shortfall(),
        }
    }

    fn looked_at(&self) -> String {
        format!("looked at {} of {} in sms.dead", self.seen, self.total)
    }

    /// Says plainly on standard error that some letters were not looked at, with `next`
    /// (what to do about it); `true` when it had to.
    fn warn_if_partial(&self, next: &str) -> bool {
        let why = match self.shortfall {
            None => return false,
            Some(Shortfall::Limit) => format!("one run can hold at most {MAX_BROWSE}"),
            Some(Shortfall::Silence) => format!(
                "the rest did not arrive within {} s (another client, such as a second \
                 smsgw dlq, may hold them)",
                SILENCE.as_secs()
            ),
        };
        eprintln!(
            "smsgw: only {} of the {} dead letters were looked at: {why}; {next}",
            self.seen, self.total
        );
        true
    }
}

/// `smsgw dlq list`.
pub async fn dlq_list(
    settings: &Settings,
    filter: &DeadFilter,
    limit: usize,
    as_json: bool,
) -> ExitCode {
    let (broker, mut browser) = match open_dead(settings).await {
        Ok(opened) => opened,
        Err(code) => return code,
    };
    let now = OffsetDateTime::now_utc();
    let mut listing = Listing::default();
    let read = loop {
        let letter = match browser.next().await {
            Some(Ok(letter)) => letter,
            Some(Err(e)) => break Err(e),
            None => break Ok(()),
        };
        let job = summarize(&letter);
        if filter.matches(&letter, &job, now) {
            listing.matched += 1;
            if listing.rows.len() < limit {
                listing.add(&letter, job, now);
            }
        }
    };
    let coverage = Coverage::of(&browser);
    close(browser, broker).await;
    if let Err(e) = read {
        eprintln!("smsgw: reading sms.dead failed: {e}");
        return ExitCode::from(EXIT_FAILED);
    }
    listing.print(&coverage, as_json);
    if coverage.warn_if_partial("the others are not in this list") {
        return ExitCode::from(EXIT_FAILED);
    }
    ExitCode::SUCCESS
}

async fn close(browser: DeadBrowser, broker: Broker) {
    browser.close().await;
    broker.close().await;
}

/// Fields of a job shown as they are: they name the job, never a person.
const PLAIN_FIELDS: &[&str] = &["id", "type", "school_id", "not_before", "expires_at"];

/// The job as `dlq show` prints it without `--reveal`, like `smsgw status`: numbers
/// masked, the body left out (its length shown), the context's values and any other
/// field hidden. Only the fields that name the job are shown as they are.
fn masked_job(job: Value) -> Value {
    let Value::Object(fields) = job else {
        return Value::String(HIDDEN.into());
    };
    let masked = fields
        .into_iter()
        .map(|(key, value)| {
            let value = match key.as_str() {
                k if PLAIN_FIELDS.contains(&k) => value,
                "to" => masked_number(&value),
                "recipients" => masked_recipients(value),
                "body" => Value::String(hidden_body(&value)),
                "context" => masked_values(value),
                _ => Value::String(HIDDEN.into()),
            };
            (key, value)
        })
        .collect();
    Value::Object(masked)
}

fn masked_number(value: &Value) -> Value {
    Value::String(value.as_str().map_or_else(|| HIDDEN.into(), mask))
}

fn hidden_body(value: &Value) -> String {
    match value.as_str() {
        Some(text) => format!("(hidden, {} characters)", text.chars().count()),
        None => HIDDEN.into(),
    }
}

fn masked_recipients(value: Value) -> Value {
    match value {
        Value::Array(list) => Value::Array(list.into_iter().map(masked_recipient).collect()),
        _ => Value::String(HIDDEN.into()),
    }
}

/// A recipient's number masked; its `ref` (the web app's id of a person) hidden.
fn masked_recipient(entry: Value) -> Value {
    let Value::Object(fields) = entry else {
        return Value::String(HIDDEN.into());
    };
    let masked = fields.into_iter().map(|(key, value)| {
        let value = match key.as_str() {
            "to" => masked_number(&value),
            _ => Value::String(HIDDEN.into()),
        };
        (key, value)
    });
    Value::Object(masked.collect())
}

/// `smsgw dlq show ID`.
pub async fn dlq_show(settings: &Settings, id: &str, reveal: bool) -> ExitCode {
    let (broker, mut browser) = match open_dead(settings).await {
        Ok(opened) => opened,
        Err(code) => return code,
    };
    let filter = DeadFilter {
        id: Some(id.to_owned()),
        ..DeadFilter::default()
    };
    let now = OffsetDateTime::now_utc();
    let mut found = None;
    while let Some(Ok(letter)) = browser.next().await {
        if filter.matches(&letter, &summarize(&letter), now) {
            found = Some(letter);
            break;
        }
    }
    let Some(letter) = found else {
        let coverage = Coverage::of(&browser);
        close(browser, broker).await;
        eprintln!(
            "smsgw: no dead letter with id {id}; {}",
            coverage.looked_at()
        );
        coverage.warn_if_partial("it may be among the others");
        return ExitCode::from(EXIT_FAILED);
    };
    print_letter(id, &letter, now, reveal);
    close(browser, broker).await;
    let message_id = summarize(&letter)
        .id
        .and_then(|id| uuid::Uuid::parse_str(&id).ok());
    if let Some(message_id) = message_id {
        print_log(settings, message_id, reveal).await;
    }
    ExitCode::SUCCESS
}

fn print_letter(id: &str, letter: &DeadLetter, now: OffsetDateTime, reveal: bool) {
    let hide = hider(reveal);
    println!("dead letter {id}");
    println!("  reason     {}", letter.reason);
    println!(
        "  error      {}",
        hide(letter.error.as_deref().unwrap_or("-"))
    );
    println!(
        "  attempts   {}",
        letter.attempts.map_or("-".into(), |a| a.to_string())
    );
    if let Some(at) = letter.dead_at {
        println!(
            "  dead since {} ({} ago)",
            at.format(&Rfc3339).unwrap_or_default(),
            age(letter, now).map_or("-".into(), short_duration)
        );
    }
    println!("  routing    {}", letter.routing_key);
    println!("headers");
    for (key, value) in letter.headers() {
        println!("  {key}: {}", hide(&value));
    }
    println!("job");
    print_body(&letter.body, reveal);
}

/// The job as JSON, masked unless `reveal`; a body that is not JSON shown only with
/// `reveal` (shortened).
fn print_body(body: &[u8], reveal: bool) {
    match serde_json::from_slice::<Value>(body) {
        Ok(job) => {
            let job = if reveal { job } else { masked_job(job) };
            let text = serde_json::to_string_pretty(&job).unwrap_or_default();
            for line in text.lines() {
                println!("  {line}");
            }
        }
        Err(_) if reveal => println!(
            "  (not JSON, {} bytes) {}",
            body.len(),
            shorten(&String::from_utf8_lossy(body), 300)
        ),
        Err(_) => println!("  (not JSON, {} bytes; --reveal shows it)", body.len()),
    }
}

/// How a pass over `sms.dead` went.
#[derive(Default)]
struct Pass {
    taken: u64,
    kept: u64,
    failure: Option<String>,
}

/// `smsgw dlq replay`: publishes matching dead letters back onto `sms.jobs` (confirmed
/// by the broker) and only then removes them from `sms.dead`.
pub async fn dlq_replay(settings: &Settings, filter: &DeadFilter, dry_run: bool) -> ExitCode {
    let (broker, mut browser) = match open_dead(settings).await {
        Ok(opened) => opened,
        Err(code) => return code,
    };
    let progress = progress_bar(browser.total);
    let now = OffsetDateTime::now_utc();
    let mut pass = Pass::default();
    while let Some(next) = browser.next().await {
        progress.inc(1);
        let letter = match next {
            Ok(letter) => letter,
            Err(e) => {
                pass.failure = Some(e.to_string());
                break;
            }
        };
        let job = summarize(&letter);
        if !filter.matches(&letter, &job, now) {
            pass.kept += 1;
            continue;
        }
        if dry_run {
            progress.suspend(|| println!("would replay {}", describe(&job, &letter)));
        } else if let Err(e) = replay_one(&broker, &browser, &letter).await {
            let id = job.id.as_deref().unwrap_or("-");
            pass.failure = Some(format!("{id}: {e}"));
            break;
        }
        pass.taken += 1;
        progress.set_message(format!("({} replayed)", pass.taken));
    }
    progress.finish_and_clear();
    let coverage = Coverage::of(&browser);
    close(browser, broker).await;
    let verb = if dry_run { "would replay" } else { "replayed" };
    println!(
        "{verb} {}, kept {} in sms.dead ({})",
        pass.taken,
        pass.kept,
        coverage.looked_at()
    );
    finish(
        pass,
        &coverage,
        "replay stopped",
        "; what was not replayed is still in sms.dead",
    )
}

fn progress_bar(total: u32) -> indicatif::ProgressBar {
    let progress = indicatif::ProgressBar::new(u64::from(total));
    progress.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} dead letters read {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    progress
}

fn describe(job: &JobSummary, letter: &DeadLetter) -> String {
    format!(
        "{} ({}, {})",
        job.id.as_deref().unwrap_or("-"),
        job.kind.as_deref().unwrap_or("-"),
        letter.reason
    )
}

/// Republishes one dead letter and, once the broker confirmed it on `sms.jobs`, removes
/// it from `sms.dead`. A crash in between leaves it in both; the job id keeps the daemon
/// from sending it twice.
async fn replay_one(
    broker: &Broker,
    browser: &DeadBrowser,
    letter: &DeadLetter,
) -> Result<(), String> {
    broker
        .replay(letter)
        .await
        .map_err(|e| format!("republishing: {e}"))?;
    browser
        .remove(letter)
        .await
        .map_err(|e| format!("removing a replayed letter: {e}"))
}

/// The exit code of a pass that changes `sms.dead`: failed when it stopped on an error or
/// could not look at every letter.
fn finish(pass: Pass, coverage: &Coverage, stopped: &str, note: &str) -> ExitCode {
    match pass.failure {
        Some(e) => {
            eprintln!("smsgw: {stopped}: {e}{note}");
            ExitCode::from(EXIT_FAILED)
        }
        None if coverage.warn_if_partial("run it again for the others") => {
            ExitCode::from(EXIT_FAILED)
        }
        None => ExitCode::SUCCESS,
    }
}

/// `smsgw dlq purge`: deletes matching dead letters for good.
pub async fn dlq_purge(settings: &Settings, filter: &DeadFilter, confirmed: bool) -> ExitCode {
    if !confirmed {
        eprintln!("smsgw: purge deletes dead letters for good; add --yes to do it");
        return ExitCode::from(EXIT_USAGE);
    }
    let (broker, mut browser) = match open_dead(settings).await {
        Ok(opened) => opened,
        Err(code) => return code,
    };
    let now = OffsetDateTime::now_utc();
    let mut pass = Pass::default();
    while let Some(next) = browser.next().await {
        let removed = match next {
            Ok(letter) if filter.matches(&letter, &summarize(&letter), now) => {
                browser.remove(&letter).await.map(|()| true)
            }
            Ok(_) => Ok(false),
            Err(e) => Err(e),
        };
        match removed {
            Ok(true) => pass.taken += 1,
            Ok(false) => pass.kept += 1,
            Err(e) => {
                pass.failure = Some(BrokerError::to_string(&e));
                break;
            }
        }
    }
    let coverage = Coverage::of(&browser);
    close(browser, broker).await;
    println!(
        "purged {}, kept {} in sms.dead ({})",
        pass.taken,
        pass.kept,
        coverage.looked_at()
    );
    finish(pass, &coverage, "purge stopped", "")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_are_masked_for_display() {
        let job = json!({
            "id": "6f1c", "type": "announcement", "school_id": 42,
            "to": "+447700900123", "body": "Your code is 4711",
            "context": {"booking_id": 981, "student": "Sam Smith"},
            "recipients": [{"to": "+447700900124", "ref": "user-77"}],
            "nickname": "Sam",
        });
        let masked = masked_job(job);
        assert_eq!(masked["to"], "+44*******123");
        assert_eq!(masked["recipients"][0]["to"], "+44*******124");
        assert_eq!(masked["recipients"][0]["ref"], HIDDEN);
        assert_eq!(masked["body"], "(hidden, 17 characters)");
        assert_eq!(
            masked["context"],
            json!({"booking_id": HIDDEN, "student": HIDDEN})
        );
        assert_eq!(masked["nickname"], HIDDEN);
        assert_eq!(
            (&masked["id"], &masked["school_id"]),
            (&json!("6f1c"), &json!(42))
        );
        assert_eq!(masked_job(json!(["+447700900123"])), json!(HIDDEN));
    }
}
