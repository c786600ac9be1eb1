//! `smsgw check`: one line per item; exit 2 on a configuration error, 1 when something
//! cannot be reached.

use std::process::ExitCode;

use time::OffsetDateTime;

use super::{EXIT_FAILED, EXIT_USAGE, usage::percent};
use crate::{
    broker::Broker,
    config::{
        BrokerSettings, ConfigError, ProviderKindSettings, ProviderSettings, ServiceUrl, Settings,
        TwilioSender,
    },
    policy::guards::{Month, reached},
    store::{OutboxBacklog, Store},
};

fn line(item: &str, ok: bool, text: &str) {
    say(item, if ok { "ok" } else { "FAIL" }, text);
}

fn say(item: &str, verdict: &str, text: &str) {
    println!("{item:<14} {verdict:<4} {text}");
}

/// An outbox event older than this means no daemon relays them.
const EVENTS_STALE_AFTER: f64 = 60.0;

pub async fn check(settings: Result<Settings, ConfigError>) -> ExitCode {
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
    let broker = check_broker(&settings).await;
    let database = check_database(&settings).await;
    for provider in &settings.delivery.providers {
        let default = if provider.name == settings.delivery.default_provider {
            " (default)"
        } else {
            ""
        };
        let detail = provider_detail(provider);
        line(
            "provider",
            true,
            &format!("'{}'{default}: {detail}", provider.name),
        );
    }
    if broker && database {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_FAILED)
    }
}

/// Every node of the broker list: one down is a warning, all down a failure.
async fn check_broker(settings: &Settings) -> bool {
    let mut answered = 0;
    let nodes: Vec<BrokerSettings> = settings
        .broker
        .url
        .nodes()
        .map(|node| BrokerSettings {
            url: ServiceUrl::new(node),
            ..settings.broker.clone()
        })
        .collect();
    for node in &nodes {
        let shown = node.url.redacted();
        match Broker::connect(node, "smsgw check").await {
            Ok(broker) => {
                line("broker", true, &shown);
                broker.close().await;
                answered += 1;
            }
            Err(e) if nodes.len() > 1 => say("broker", "WARN", &format!("{shown}: {e}")),
            Err(e) => line("broker", false, &format!("{shown}: {e}")),
        }
    }
    if answered > 0 && answered < nodes.len() {
        say(
            "broker",
            "WARN",
            &format!("{answered} of {} nodes answer", nodes.len()),
        );
    }
    if answered == 0 && nodes.len() > 1 {
        line("broker", false, "no node of the list answers");
    }
    answered > 0
}

async fn check_database(settings: &Settings) -> bool {
    let url = settings.store.url.redacted();
    let store = match Store::connect(settings.store.url.expose(), 1).await {
        Ok(store) => store,
        Err(e) => {
            line("database", false, &format!("{url}: {e}"));
            return false;
        }
    };
    line("database", true, &url);
    let need = Store::latest_migration();
    let current = match store.schema_version().await {
        Ok(have) if have > need => {
            let text = format!(
                "version {have}, newer than this build's {need} (a later version migrated it; \
                 migrations only add)"
            );
            line("schema", true, &text);
            true
        }
        Ok(have) if have == need => {
            line("schema", true, &format!("version {have}"));
            true
        }
        Ok(have) => {
            let text = format!("version {have}, this build needs {need}: run `smsgw migrate`");
            line("schema", false, &text);
            false
        }
        Err(e) => {
            line("schema", false, &e.to_string());
            false
        }
    };
    if current {
        report_events(&store, settings.events.on).await;
        report_timezones(&store).await;
        report_guards(&store).await;
        report_budgets(&store, Month::of(OffsetDateTime::now_utc())).await;
    }
    store.close().await;
    current
}

/// Schools whose time zone is unknown: their quiet hours are ignored (a warning).
async fn report_timezones(store: &Store) {
    match store.schools_with_unknown_timezone().await {
        Ok(schools) if schools.is_empty() => {
            line("timezones", true, "every school's timezone is known");
        }
        Ok(schools) => {
            let list: Vec<String> = schools
                .iter()
                .take(20)
                .map(|(school, zone)| format!("{school} ('{zone}')"))
                .collect();
            let more = schools.len().saturating_sub(list.len());
            let text = format!(
                "unknown, so quiet hours are ignored, for school {}{}",
                list.join(", "),
                if more > 0 {
                    format!(" and {more} more")
                } else {
                    String::new()
                }
            );
            say("timezones", "WARN", &text);
        }
        Err(e) => line("timezones", false, &e.to_string()),
    }
}

/// Schools whose guard settings cannot be read: their messages are refused (a warning:
/// nothing is sent that should not be).
async fn report_guards(store: &Store) {
    match store.schools_with_unreadable_guards().await {
        Ok(schools) if schools.is_empty() => {
            line("guards", true, "every school's guard settings can be read");
        }
        Ok(schools) => {
            let list: Vec<String> = schools
                .iter()
                .take(20)
                .map(|s| format!("school {}: {} '{}'", s.school_id, s.setting, s.value))
                .collect();
            let more = schools.len().saturating_sub(list.len());
            let more = if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            };
            let text = format!(
                "{}{more}: not readable, so these schools' messages are refused",
                list.join(", ")
            );
            say("guards", "WARN", &text);
        }
        Err(e) => line("guards", false, &e.to_string()),
    }
}

/// Schools that used 80% of their monthly budget or more this month (a warning).
async fn report_budgets(store: &Store, month: Month) {
    let day = month.first_day();
    match store.budget_use(day, day, None).await {
        Ok(budgets) => {
            let near: Vec<String> = budgets
                .iter()
                .filter(|b| {
                    let budget = u32::try_from(b.budget).unwrap_or(0);
                    reached(budget, u64::try_from(b.used).unwrap_or(0)).warning
                })
                .map(|b| {
                    let share = percent(b.used, b.budget);
                    format!(
                        "school {}: {} of {} ({share}%)",
                        b.school_id, b.used, b.budget
                    )
                })
                .collect();
            if near.is_empty() {
                let text = format!("no school has used 80% of its budget in {month}");
                line("budgets", true, &text);
            } else {
                let text = format!("segments used in {month}: {}", near.join(", "));
                say("budgets", "WARN", &text);
            }
        }
        Err(e) => line("budgets", false, &e.to_string()),
    }
}

/// The status events waiting to be published: a warning, not a failure, when they are
/// late (the daemon relays them once it can; nothing is lost meanwhile) or when the
/// outbox is at its bound (new events are dropped).
async fn report_events(store: &Store, on: bool) {
    let mode = if on { "on" } else { "off" };
    match store.outbox_backlog().await {
        Ok(backlog) => {
            let (ok, text) = events_line(mode, &backlog);
            say("events", if ok { "ok" } else { "WARN" }, &text);
        }
        Err(e) => line("events", false, &e.to_string()),
    }
}

fn events_line(mode: &str, backlog: &OutboxBacklog) -> (bool, String) {
    let dropped = match backlog.dropped {
        0 => String::new(),
        n => format!(" ({n} dropped for the bound in all)"),
    };
    if !backlog.accepting {
        let text = format!(
            "{mode}; {} waiting: the outbox is at SMSGW_EVENTS_MAX_BACKLOG and new events \
             are dropped{dropped}: can a daemon reach the broker and declare sms.events?",
            backlog.events
        );
        return (false, text);
    }
    if backlog.events == 0 {
        return (true, format!("{mode}; the outbox is empty{dropped}"));
    }
    let late = backlog.oldest_seconds > EVENTS_STALE_AFTER;
    let text = format!(
        "{mode}; {} waiting in the outbox, the oldest for {:.0} s{dropped}{}",
        backlog.events,
        backlog.oldest_seconds,
        if late {
            ": is a daemon running, and can it reach the broker?"
        } else {
            ""
        }
    );
    (!late, text)
}

/// What a provider's configuration says, with the credentials shortened to a hint.
fn provider_detail(provider: &ProviderSettings) -> String {
    match &provider.kind {
        ProviderKindSettings::Log => "log: nothing is sent, no credentials needed".to_owned(),
        ProviderKindSettings::Inbox => {
            "inbox: nothing is sent, messages are shown at /inbox".to_owned()
        }
        ProviderKindSettings::Twilio(twilio) => {
            let sender = match &twilio.sender {
                TwilioSender::From(from) => format!("from {from}"),
                TwilioSender::MessagingService(sid) => format!("messaging service {sid}"),
            };
            let sid: Vec<char> = twilio.account_sid.chars().collect();
            let head: String = sid.iter().take(6).collect();
            let tail: String = sid[sid.len().saturating_sub(4)..].iter().collect();
            let kind = if twilio.sandbox {
                "twilio sandbox: test credentials"
            } else {
                "twilio credentials"
            };
            format!("{kind} present (account {head}…{tail}), {sender}")
        }
        ProviderKindSettings::Vonage(vonage) => {
            let receipts = if vonage.signature_secret.is_some() {
                ", receipts signed"
            } else {
                ", receipts unsigned (refused)"
            };
            let key: String = vonage.api_key.chars().take(4).collect();
            format!(
                "vonage credentials present (key {key}…), from {}{receipts}",
                vonage.from
            )
        }
    }
}
