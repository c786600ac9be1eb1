//! Tools for ops and support: the dead-letter queue (`smsgw dlq ...`) and `smsgw check`.
//!
//! Reading `sms.dead` never loses or reorders anything: messages are held unacked while
//! they are looked at and go back to their original places; only `replay` (after the
//! broker confirmed the republish) and `purge` remove what they were asked to.

use std::{process::ExitCode, time::Duration};

use serde_json::{Value, json};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

use crate::{
    broker::{Broker, DeadBrowser, DeadLetter, Topology},
    config::{ProviderKindSettings, Settings, TwilioSender},
    phone::{mask, redact_numbers},
    store::Store,
};

const EXIT_FAILED: u8 = 1;
const EXIT_USAGE: u8 = 2;

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

/// `3m12s`, `2h5m`, `4d3h`: the two largest units.
fn short_duration(duration: Duration) -> String {
    let s = duration.as_secs();
    let (d, h, m, sec) = (s / 86_400, s / 3_600 % 24, s / 60 % 60, s % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{sec}s"),
        (0, 0, _) => format!("{m}m{sec}s"),
        (0, _, _) => format!("{h}h{m}m"),
        _ => format!("{d}d{h}h"),
    }
}

fn shorten(text: &str, max: usize) -> String {
    let text = text.replace(['\n', '\r'], " ");
    if text.chars().count() <= max {
        text
    } else {
        let mut cut: String = text.chars().take(max.saturating_sub(1)).collect();
        cut.push('…');
        cut
    }
}

/// Prints rows as aligned columns.
fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let last = cells.len().saturating_sub(1);
        let text: Vec<String> = cells
            .into_iter()
            .enumerate()
            .map(|(i, c)| {
                if i == last {
                    c
                } else {
                    format!("{c:<width$}", width = widths[i])
                }
            })
            .collect();
        println!("{}", text.join("  ").trim_end());
    };
    line(header.iter().map(|h| (*h).to_owned()).collect());
    for row in rows {
        line(row.clone());
    }
}

async fn connect_broker(settings: &Settings) -> Result<Broker, ExitCode> {
    let topology = Topology {
        delays: settings.retry_delays.clone(),
        delivery_limit: settings.delivery_limit,
    };
    let connected = async {
        let broker = Broker::connect(&settings.amqp_url, "smsgw dlq", topology).await?;
        broker.declare_topology().await?;
        Ok::<_, crate::broker::BrokerError>(broker)
    }
    .await;
    connected.map_err(|e| {
        eprintln!(
            "smsgw: cannot reach the broker at {}: {e}",
            settings.amqp_url_redacted()
        );
        ExitCode::from(EXIT_FAILED)
    })
}

async fn browse(broker: &Broker) -> Result<DeadBrowser, ExitCode> {
    broker.browse_dead().await.map_err(|e| {
        eprintln!("smsgw: cannot read sms.dead: {e}");
        ExitCode::from(EXIT_FAILED)
    })
}

/// `smsgw dlq list`.
pub async fn dlq_list(
    settings: &Settings,
    filter: &DeadFilter,
    limit: usize,
    as_json: bool,
) -> ExitCode {
    let broker = match connect_broker(settings).await {
        Ok(b) => b,
        Err(code) => return code,
    };
    let mut browser = match browse(&broker).await {
        Ok(b) => b,
        Err(code) => return code,
    };
    let now = OffsetDateTime::now_utc();
    let total = browser.total;
    let mut matched = 0usize;
    let mut rows = Vec::new();
    let mut objects = Vec::new();
    let mut failure = None;
    while let Some(next) = browser.next().await {
        let letter = match next {
            Ok(letter) => letter,
            Err(e) => {
                failure = Some(e);
                break;
            }
        };
        let job = summarize(&letter);
        if !filter.matches(&letter, &job, now) {
            continue;
        }
        matched += 1;
        if rows.len() >= limit {
            continue;
        }
        let error = letter.error.as_deref().map(redact_numbers);
        let age = age(&letter, now);
        if as_json {
            objects.push(json!({
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
        }
        rows.push(vec![
            job.id.unwrap_or_else(|| "-".into()),
            job.kind.unwrap_or_else(|| "-".into()),
            job.school_id.map_or("-".into(), |s| s.to_string()),
            letter.reason.clone(),
            letter.attempts.map_or("-".into(), |a| a.to_string()),
            age.map_or("-".into(), short_duration),
            shorten(error.as_deref().unwrap_or("-"), 70),
        ]);
    }
    browser.close().await;
    broker.close().await;
    if let Some(e) = failure {
        eprintln!("smsgw: reading sms.dead failed: {e}");
        return ExitCode::from(EXIT_FAILED);
    }
    if as_json {
        println!("{}", Value::Array(objects));
    } else {
        print_table(
            &[
                "JOB ID",
                "TYPE",
                "SCHOOL",
                "REASON",
                "ATTEMPTS",
                "AGE",
                "LAST ERROR",
            ],
            &rows,
        );
        println!(
            "{} shown, {matched} matching, {total} in sms.dead",
            rows.len()
        );
    }
    ExitCode::SUCCESS
}

/// Masks `to` and every `recipients[].to` of a job.
fn mask_job(job: &mut Value) {
    if let Some(to) = job.get("to").and_then(Value::as_str).map(mask) {
        job["to"] = Value::String(to);
    }
    if let Some(list) = job.get_mut("recipients").and_then(Value::as_array_mut) {
        for entry in list {
            if let Some(to) = entry.get("to").and_then(Value::as_str).map(mask) {
                entry["to"] = Value::String(to);
            }
        }
    }
}

/// `smsgw dlq show ID`.
pub async fn dlq_show(settings: &Settings, id: &str, reveal: bool) -> ExitCode {
    let broker = match connect_broker(settings).await {
        Ok(b) => b,
        Err(code) => return code,
    };
    let mut browser = match browse(&broker).await {
        Ok(b) => b,
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
        browser.close().await;
        broker.close().await;
        eprintln!("smsgw: no dead letter with id {id}");
        return ExitCode::from(EXIT_FAILED);
    };
    let hide = |text: &str| {
        if reveal {
            text.to_owned()
        } else {
            redact_numbers(text)
        }
    };
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
            age(&letter, now).map_or("-".into(), short_duration)
        );
    }
    println!("  routing    {}", letter.routing_key);
    println!("headers");
    for (key, value) in letter.headers() {
        println!("  {key}: {}", hide(&value));
    }
    println!("job");
    match serde_json::from_slice::<Value>(&letter.body) {
        Ok(mut job) => {
            if !reveal {
                mask_job(&mut job);
            }
            let text = serde_json::to_string_pretty(&job).unwrap_or_default();
            for line in text.lines() {
                println!("  {line}");
            }
        }
        Err(_) => println!(
            "  (not JSON, {} bytes) {}",
            letter.body.len(),
            hide(&shorten(&String::from_utf8_lossy(&letter.body), 300))
        ),
    }
    browser.close().await;
    broker.close().await;

    let message_id = summarize(&letter)
        .id
        .and_then(|id| uuid::Uuid::parse_str(&id).ok());
    if let Some(message_id) = message_id {
        print_log(settings, message_id, reveal).await;
    }
    ExitCode::SUCCESS
}

/// Prints the message's row and attempts from the log, for `dlq show` and `status`.
pub async fn print_log(settings: &Settings, id: uuid::Uuid, reveal: bool) -> bool {
    let store = match Store::connect(&settings.database_url, 1).await {
        Ok(store) => store,
        Err(e) => {
            println!("message log: unavailable ({e})");
            return false;
        }
    };
    let message = store.message_view(id).await;
    let attempts = store.attempt_views(id).await;
    store.close().await;
    let hide = |text: &str| {
        if reveal {
            text.to_owned()
        } else {
            redact_numbers(text)
        }
    };
    match message {
        Ok(Some(m)) => {
            let time = |t: Option<OffsetDateTime>| {
                t.and_then(|t| t.format(&Rfc3339).ok())
                    .unwrap_or_else(|| "-".into())
            };
            println!("message log");
            println!(
                "  status     {}{}",
                m.status,
                m.reason.map(|r| format!(" ({r})")).unwrap_or_default()
            );
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
                println!(
                    "  receipt    {}{}",
                    m.provider_status.as_deref().unwrap_or("-"),
                    m.error_code
                        .as_deref()
                        .map(|c| format!(" (error {c})"))
                        .unwrap_or_default()
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
        Ok(attempts) if !attempts.is_empty() => {
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
            print_table(
                &[
                    "", "STARTED", "PROVIDER", "TOOK", "OUTCOME", "HTTP", "CODE", "MESSAGE",
                ],
                &rows,
            );
        }
        Ok(_) => println!("attempts: none (no provider call was made)"),
        Err(e) => println!("attempts: unavailable ({e})"),
    }
    true
}

/// `smsgw dlq replay`: publishes matching dead letters back onto `sms.jobs` (confirmed
/// by the broker) and only then removes them from `sms.dead`.
pub async fn dlq_replay(settings: &Settings, filter: &DeadFilter, dry_run: bool) -> ExitCode {
    let broker = match connect_broker(settings).await {
        Ok(b) => b,
        Err(code) => return code,
    };
    let mut browser = match browse(&broker).await {
        Ok(b) => b,
        Err(code) => return code,
    };
    let progress = indicatif::ProgressBar::new(u64::from(browser.total));
    progress.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} dead letters read {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let now = OffsetDateTime::now_utc();
    let (mut replayed, mut kept) = (0u64, 0u64);
    let mut failure = None;
    while let Some(next) = browser.next().await {
        progress.inc(1);
        let letter = match next {
            Ok(letter) => letter,
            Err(e) => {
                failure = Some(e.to_string());
                break;
            }
        };
        let job = summarize(&letter);
        if !filter.matches(&letter, &job, now) {
            kept += 1;
            continue;
        }
        if dry_run {
            progress.suspend(|| {
                println!(
                    "would replay {} ({}, {})",
                    job.id.as_deref().unwrap_or("-"),
                    job.kind.as_deref().unwrap_or("-"),
                    letter.reason
                )
            });
            replayed += 1;
            continue;
        }
        if let Err(e) = broker.replay(&letter).await {
            failure = Some(format!(
                "republishing {}: {e}",
                job.id.as_deref().unwrap_or("-")
            ));
            break;
        }
        // Confirmed on sms.jobs: now (and only now) it leaves sms.dead. A crash right here
        // leaves it in both; the job id keeps the daemon from sending it twice.
        if let Err(e) = browser.remove(&letter).await {
            failure = Some(format!("removing a replayed letter: {e}"));
            break;
        }
        replayed += 1;
        progress.set_message(format!("({replayed} replayed)"));
    }
    progress.finish_and_clear();
    browser.close().await;
    broker.close().await;
    let verb = if dry_run { "would replay" } else { "replayed" };
    println!("{verb} {replayed}, kept {kept} in sms.dead");
    match failure {
        Some(e) => {
            eprintln!("smsgw: replay stopped: {e}; what was not replayed is still in sms.dead");
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
    let broker = match connect_broker(settings).await {
        Ok(b) => b,
        Err(code) => return code,
    };
    let mut browser = match browse(&broker).await {
        Ok(b) => b,
        Err(code) => return code,
    };
    let now = OffsetDateTime::now_utc();
    let (mut purged, mut kept) = (0u64, 0u64);
    let mut failure = None;
    while let Some(next) = browser.next().await {
        match next {
            Ok(letter) if filter.matches(&letter, &summarize(&letter), now) => {
                if let Err(e) = browser.remove(&letter).await {
                    failure = Some(e);
                    break;
                }
                purged += 1;
            }
            Ok(_) => kept += 1,
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    browser.close().await;
    broker.close().await;
    println!("purged {purged}, kept {kept} in sms.dead");
    match failure {
        Some(e) => {
            eprintln!("smsgw: purge stopped: {e}");
            ExitCode::from(EXIT_FAILED)
        }
        None => ExitCode::SUCCESS,
    }
}

/// `smsgw check`: one line per item; exit 2 on a configuration error, 1 when something
/// cannot be reached.
pub async fn check(settings: Result<Settings, crate::config::ConfigError>) -> ExitCode {
    let line = |item: &str, ok: bool, text: &str| {
        println!("{item:<14} {:<4} {text}", if ok { "ok" } else { "FAIL" });
    };
    let settings = match settings {
        Ok(settings) => {
            line("configuration", true, &settings.destination_summary());
            settings
        }
        Err(e) => {
            line("configuration", false, &e.to_string());
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let mut healthy = true;

    let topology = Topology {
        delays: settings.retry_delays.clone(),
        delivery_limit: settings.delivery_limit,
    };
    match Broker::connect(&settings.amqp_url, "smsgw check", topology).await {
        Ok(broker) => {
            line("broker", true, &settings.amqp_url_redacted());
            broker.close().await;
        }
        Err(e) => {
            healthy = false;
            line(
                "broker",
                false,
                &format!("{}: {e}", settings.amqp_url_redacted()),
            );
        }
    }

    match Store::connect(&settings.database_url, 1).await {
        Ok(store) => {
            line("database", true, &settings.database_url_redacted());
            let need = Store::latest_migration();
            match store.schema_version().await {
                Ok(have) if have >= need => line("schema", true, &format!("version {have}")),
                Ok(have) => {
                    healthy = false;
                    line(
                        "schema",
                        false,
                        &format!("version {have}, this build needs {need}: run `smsgw migrate`"),
                    );
                }
                Err(e) => {
                    healthy = false;
                    line("schema", false, &e.to_string());
                }
            }
            store.close().await;
        }
        Err(e) => {
            healthy = false;
            line(
                "database",
                false,
                &format!("{}: {e}", settings.database_url_redacted()),
            );
        }
    }

    for provider in &settings.providers {
        let detail = match &provider.kind {
            ProviderKindSettings::Log => "log: nothing is sent, no credentials needed".to_owned(),
            ProviderKindSettings::Twilio(twilio) => {
                let sender = match &twilio.sender {
                    TwilioSender::From(from) => format!("from {from}"),
                    TwilioSender::MessagingService(sid) => format!("messaging service {sid}"),
                };
                format!(
                    "twilio credentials present (account {}…{}), {sender}",
                    &twilio.account_sid[..6],
                    &twilio.account_sid[twilio.account_sid.len() - 4..]
                )
            }
            ProviderKindSettings::Vonage(vonage) => format!(
                "vonage credentials present (key {}…), from {}{}",
                vonage.api_key.chars().take(4).collect::<String>(),
                vonage.from,
                if vonage.signature_secret.is_some() {
                    ", receipts signed"
                } else {
                    ", receipts unsigned (refused)"
                }
            ),
        };
        let default = if provider.name == settings.default_provider {
            " (default)"
        } else {
            ""
        };
        line(
            "provider",
            true,
            &format!("'{}'{default}: {detail}", provider.name),
        );
    }
    if healthy {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_FAILED)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_at_a_glance() {
        assert_eq!(short_duration(Duration::from_secs(42)), "42s");
        assert_eq!(short_duration(Duration::from_secs(192)), "3m12s");
        assert_eq!(short_duration(Duration::from_secs(7_500)), "2h5m");
        assert_eq!(short_duration(Duration::from_secs(356_400)), "4d3h");
    }

    #[test]
    fn jobs_are_masked_for_display() {
        let mut job = json!({"to": "+447700900123", "recipients": [{"to": "+447700900124"}]});
        mask_job(&mut job);
        assert_eq!(job["to"], "+44*******123");
        assert_eq!(job["recipients"][0]["to"], "+44*******124");
    }
}
