//! The command line: `smsgw run | migrate | send | dlq | check | status | usage`. Exit
//! codes: 0 done, 1 failed at run time, 2 bad usage or configuration.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    broker::Broker,
    config::Settings,
    daemon::{self, DaemonError},
    job::{Job, JobType},
    phone::PhoneNumber,
    store::Store,
    telemetry,
};

const EXIT_FAILED: u8 = 1;
const EXIT_USAGE: u8 = 2;

/// What `smsgw --version` prints after the name: the Cargo version and the commit it was
/// built from (`unknown` when the build knew none; see build.rs), e.g. `0.1.0 (a1b2c3d)`.
pub const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (", env!("SMSGW_COMMIT"), ")");

#[derive(Debug, Parser)]
#[command(
    name = "smsgw",
    version = VERSION,
    about = "The SMS gateway worker: consumes SMS jobs from RabbitMQ, applies each school's \
             settings from PostgreSQL, sends through the configured provider and records every \
             attempt.",
    after_help = "Configuration comes from SMSGW_* and TWILIO_* environment variables; see the \
                  README. Exit codes: 0 done, 1 failed at run time, 2 bad usage or configuration."
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon until SIGTERM or SIGINT (a second signal exits at once).
    Run,
    /// Create the database if needed and apply pending schema migrations.
    Migrate,
    /// Publish one job onto sms.jobs, as the web app does, and print its id.
    Send(SendArgs),
    /// Inspect, replay or purge the dead-letter queue (sms.dead).
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Check configuration, broker, database, schema and provider credentials.
    Check,
    /// Show a message's record and its attempts, or find messages by number, school,
    /// age or context, newest first (for support: did the text go out?).
    Status(StatusArgs),
    /// Messages and segments per school and status, of the messages created in a range
    /// (from inclusive, to exclusive, UTC): the figures a school is billed on.
    Usage(UsageArgs),
    /// Replies (inbound texts that are not STOP/START keywords), newest first, with the
    /// message each answers.
    Replies(RepliesArgs),
    /// A person's right to erasure: removes the bodies of their messages and replies and
    /// their inbox copies, masks their number in the log (keeping what billing needs),
    /// and keeps their opt-out. Without --yes it only says what it would do.
    Erase(EraseArgs),
}

#[derive(Debug, clap::Args)]
struct EraseArgs {
    /// Their number (E.164, +447700900123).
    #[arg(long, value_name = "NUMBER")]
    to: String,
    /// Erase; without it, nothing is changed.
    #[arg(long)]
    yes: bool,
}

#[derive(Debug, clap::Args)]
struct RepliesArgs {
    /// Only replies from this number (E.164, +447700900123).
    #[arg(long, value_name = "NUMBER")]
    from: Option<String>,
    /// Only replies attributed to this school.
    #[arg(long, value_name = "ID")]
    school: Option<i64>,
    /// Only replies received since: an age (24h, 7d) or a time (2026-11-25, RFC 3339).
    #[arg(long, value_name = "WHEN", value_parser = crate::ops::parse_since)]
    since: Option<time::OffsetDateTime>,
    /// Show at most this many, the newest.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u16).range(1..=1000))]
    limit: u16,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Show phone numbers and texts unmasked.
    #[arg(long)]
    reveal: bool,
}

#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("which").required(true).multiple(true)
    .args(["id", "to", "school", "context"])))]
struct StatusArgs {
    /// The job id (or, for an announcement's recipient, the message id): that message's
    /// record and attempts.
    #[arg(conflicts_with_all = ["to", "school", "since", "context", "limit", "json"])]
    id: Option<uuid::Uuid>,
    /// Messages to this number: E.164 (+447700900123), or a national number read with
    /// the country of --school.
    #[arg(long, value_name = "NUMBER")]
    to: Option<String>,
    /// Only this school's messages.
    #[arg(long, value_name = "ID")]
    school: Option<i64>,
    /// Only messages created since: an age (24h, 7d) or a time (2026-11-25, RFC 3339).
    #[arg(long, value_name = "WHEN", value_parser = crate::ops::parse_since)]
    since: Option<time::OffsetDateTime>,
    /// Messages whose context has this top-level key and value (booking_id=981 matches
    /// the number 981 and the string "981").
    #[arg(long, value_name = "KEY=VALUE", value_parser = crate::ops::ContextMatch::parse)]
    context: Option<crate::ops::ContextMatch>,
    /// Show at most this many, the newest.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u16).range(1..=1000))]
    limit: u16,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Show phone numbers, the body and the context unmasked.
    #[arg(long)]
    reveal: bool,
}

#[derive(Debug, clap::Args)]
struct UsageArgs {
    /// First day counted (2026-11-01, midnight UTC) or an RFC 3339 time; inclusive.
    #[arg(long, value_name = "DATE", value_parser = crate::ops::parse_instant)]
    from: time::OffsetDateTime,
    /// The day after the last one counted (2026-12-01) or an RFC 3339 time; exclusive.
    #[arg(long, value_name = "DATE", value_parser = crate::ops::parse_instant)]
    to: time::OffsetDateTime,
    /// Only this school.
    #[arg(long, value_name = "ID")]
    school: Option<i64>,
    /// Print CSV with a header row instead of a table.
    #[arg(long)]
    csv: bool,
}

#[derive(Debug, Subcommand)]
enum DlqCommand {
    /// List dead letters (nothing is removed or reordered).
    List {
        #[command(flatten)]
        filter: FilterArgs,
        /// Show at most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one dead letter: the job, its headers and its attempts from the log.
    Show {
        /// The job id.
        id: String,
        /// Show phone numbers, the body and the context unmasked.
        #[arg(long)]
        reveal: bool,
    },
    /// Put dead letters back on sms.jobs with a fresh attempt budget. For an
    /// outcome_unknown letter the daemon first asks the provider whether it took the
    /// message, and sends only if it did not.
    #[command(group(clap::ArgGroup::new("which").required(true).args(["id", "reason", "all"])))]
    Replay {
        /// Only this job.
        #[arg(long)]
        id: Option<String>,
        /// Only dead letters with this reason (invalid_job, permanent_failure,
        /// attempts_exhausted, outcome_unknown, delivery_limit).
        #[arg(long)]
        reason: Option<String>,
        /// Every dead letter.
        #[arg(long)]
        all: bool,
        /// Say what would be replayed, change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Delete dead letters for good. Deleting every one takes `--all`, so that a filter
    /// left out by mistake never empties the queue.
    #[command(group(clap::ArgGroup::new("which").required(true).multiple(true).args(["reason", "older_than", "all"])))]
    Purge {
        /// Only dead letters with this reason.
        #[arg(long)]
        reason: Option<String>,
        /// Only dead letters older than this (e.g. 7d, 12h).
        #[arg(long, value_parser = parse_age)]
        older_than: Option<std::time::Duration>,
        /// Every dead letter.
        #[arg(long, conflicts_with_all = ["reason", "older_than"])]
        all: bool,
        /// Yes, delete them.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Debug, clap::Args)]
struct FilterArgs {
    /// Only dead letters with this reason.
    #[arg(long)]
    reason: Option<String>,
    /// Only jobs of this type.
    #[arg(long = "type")]
    kind: Option<String>,
    /// Only jobs of this school.
    #[arg(long)]
    school: Option<i64>,
}

fn parse_age(text: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(text).map_err(|e| e.to_string())
}

#[derive(Debug, clap::Args)]
struct SendArgs {
    /// The school the text is sent for (sms_school_settings.school_id).
    #[arg(long, value_name = "ID")]
    school: i64,
    /// Recipient: E.164 (+447700900123) or a national number read with the school's country.
    #[arg(long, value_name = "NUMBER", required_unless_present = "recipients")]
    to: Option<String>,
    /// An announcement's recipients, instead of --to: a file with one number a line,
    /// optionally followed by a comma and the recipient's ref (+447700900123,user-77);
    /// blank lines and lines starting with # are skipped.
    #[arg(long, value_name = "FILE", conflicts_with = "to")]
    recipients: Option<std::path::PathBuf>,
    /// Job type.
    #[arg(long = "type", value_name = "TYPE", value_parser = job_types())]
    kind: String,
    /// The text, 1 to 1,600 characters.
    #[arg(long, value_name = "TEXT")]
    body: String,
    /// Job id (idempotency key); a new one when left out.
    #[arg(long, value_name = "UUID")]
    id: Option<Uuid>,
    /// Do not send before this RFC 3339 time.
    #[arg(long, value_name = "TIME")]
    not_before: Option<String>,
    /// Never send after this RFC 3339 time.
    #[arg(long, value_name = "TIME")]
    expires_at: Option<String>,
    /// A JSON object kept with the message and sent back in its events, at most 2 KiB
    /// ({"booking_id": 981}).
    #[arg(long, value_name = "JSON")]
    context: Option<String>,
}

fn job_types() -> clap::builder::PossibleValuesParser {
    clap::builder::PossibleValuesParser::new(JobType::ALL.map(JobType::as_str))
}

/// The whole program: parse, configure, run; returns the exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Check = cli.command {
        return block_on(crate::ops::check(Settings::from_env()));
    }
    let settings = match &cli.command {
        Command::Run | Command::Check => Settings::from_env(),
        Command::Migrate
        | Command::Send(_)
        | Command::Dlq { .. }
        | Command::Status(_)
        | Command::Usage(_)
        | Command::Replies(_)
        | Command::Erase(_) => Settings::from_env_for_tools(),
    };
    let settings = match settings {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("smsgw: configuration error: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    telemetry::init(settings.log_format);
    block_on(async move {
        match cli.command {
            Command::Run => run(settings).await,
            Command::Migrate => migrate(&settings).await,
            Command::Send(args) => send(&settings, args).await,
            Command::Dlq { command } => dlq(&settings, command).await,
            Command::Check => ExitCode::SUCCESS,
            Command::Status(args) => status(&settings, args).await,
            Command::Usage(args) => usage(&settings, args).await,
            Command::Replies(args) => replies(&settings, args).await,
            Command::Erase(args) => erase(&settings, args).await,
        }
    })
}

/// A value clap took but `subcommand` refuses: as clap says it, and exit code 2.
fn refuse(subcommand: &str, message: String) -> ExitCode {
    use clap::CommandFactory;
    let mut cli = Cli::command();
    cli.build();
    let kind = clap::error::ErrorKind::ValueValidation;
    let error = match cli.find_subcommand_mut(subcommand) {
        Some(command) => command.error(kind, message),
        None => cli.error(kind, message),
    };
    let _ = error.print();
    ExitCode::from(EXIT_USAGE)
}

async fn status(settings: &Settings, args: StatusArgs) -> ExitCode {
    if let Some(id) = args.id {
        return if crate::ops::print_log(settings, id, args.reveal).await {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(EXIT_FAILED)
        };
    }
    // Parsed here rather than by clap, whose message would repeat the number in full.
    use crate::ops::NumberQuery;
    let to = match args.to.as_deref().map(NumberQuery::parse) {
        None => None,
        Some(Ok(number)) => Some(number),
        Some(Err(e)) => return refuse("status", format!("invalid value for '--to <NUMBER>': {e}")),
    };
    if to.as_ref().is_some_and(NumberQuery::is_national) && args.school.is_none() {
        return refuse(
            "status",
            "--to: a national number is read with the country of --school; give --school, \
             or the number in E.164 (+44...)"
                .into(),
        );
    }
    let lookup = crate::ops::Lookup {
        to,
        school: args.school,
        since: args.since,
        context: args.context,
        limit: args.limit,
        json: args.json,
        reveal: args.reveal,
    };
    crate::ops::find_messages(settings, &lookup).await
}

async fn erase(settings: &Settings, args: EraseArgs) -> ExitCode {
    // Parsed here rather than by clap, whose message would repeat the number in full.
    match PhoneNumber::parse(&args.to, None) {
        Ok(number) => crate::ops::erase(settings, &number, args.yes).await,
        Err(e) => refuse(
            "erase",
            format!("invalid value for '--to <NUMBER>': {e} (E.164: +447700900123)"),
        ),
    }
}

async fn replies(settings: &Settings, args: RepliesArgs) -> ExitCode {
    // Parsed here rather than by clap, whose message would repeat the number in full.
    let from = match args.from.as_deref().map(|n| PhoneNumber::parse(n, None)) {
        None => None,
        Some(Ok(number)) => Some(number),
        Some(Err(e)) => {
            return refuse(
                "replies",
                format!("invalid value for '--from <NUMBER>': {e} (E.164: +447700900123)"),
            );
        }
    };
    let lookup = crate::ops::ReplyLookup {
        from,
        school: args.school,
        since: args.since,
        limit: args.limit,
        json: args.json,
        reveal: args.reveal,
    };
    crate::ops::list_replies(settings, &lookup).await
}

async fn usage(settings: &Settings, args: UsageArgs) -> ExitCode {
    match crate::ops::UsageRange::new(args.from, args.to) {
        Ok(range) => crate::ops::print_usage(settings, range, args.school, args.csv).await,
        Err(e) => refuse("usage", e.to_string()),
    }
}

fn block_on(work: impl Future<Output = ExitCode>) -> ExitCode {
    crate::install_crypto_provider();
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime.block_on(work),
        Err(e) => {
            eprintln!("smsgw: cannot start the async runtime: {e}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}

async fn dlq(settings: &Settings, command: DlqCommand) -> ExitCode {
    use crate::ops::{DeadFilter, dlq_list, dlq_purge, dlq_replay, dlq_show};
    match command {
        DlqCommand::List {
            filter,
            limit,
            json,
        } => {
            let filter = DeadFilter {
                reason: filter.reason,
                kind: filter.kind,
                school: filter.school,
                ..DeadFilter::default()
            };
            dlq_list(settings, &filter, limit, json).await
        }
        DlqCommand::Show { id, reveal } => dlq_show(settings, &id, reveal).await,
        DlqCommand::Replay {
            id,
            reason,
            all: _,
            dry_run,
        } => {
            let filter = DeadFilter {
                id,
                reason,
                ..DeadFilter::default()
            };
            dlq_replay(settings, &filter, dry_run).await
        }
        DlqCommand::Purge {
            reason,
            older_than,
            yes,
            ..
        } => {
            let filter = DeadFilter {
                reason,
                older_than,
                ..DeadFilter::default()
            };
            dlq_purge(settings, &filter, yes).await
        }
    }
}

async fn run(settings: Settings) -> ExitCode {
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("stopping: finishing in-flight messages (signal again to exit at once)");
        stop.cancel();
        wait_for_signal().await;
        tracing::warn!("second signal: exiting now; unsettled messages return to the broker");
        std::process::exit(i32::from(EXIT_FAILED));
    });
    match daemon::run(settings, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(DaemonError::Config(e)) => {
            eprintln!("smsgw: configuration error: {e}");
            ExitCode::from(EXIT_USAGE)
        }
        Err(DaemonError::Runtime(_)) => ExitCode::from(EXIT_FAILED),
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

async fn migrate(settings: &Settings) -> ExitCode {
    let result = async {
        Store::create_database_if_missing(settings.store.url.expose()).await?;
        let store = Store::connect(settings.store.url.expose(), 2).await?;
        store
            .migrate_waiting_for_locks(settings.store.migrate_lock_timeout)
            .await?;
        let version = store.schema_version().await?;
        store.close().await;
        Ok::<_, crate::store::StoreError>(version)
    }
    .await;
    match result {
        Ok(version) if version > Store::latest_migration() => {
            println!(
                "schema is at version {version}, newer than this build's {}: nothing to apply \
                 (a later version migrated it; migrations only add, so this build runs on it)",
                Store::latest_migration()
            );
            ExitCode::SUCCESS
        }
        Ok(version) => {
            println!("schema is at version {version}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!(
                "smsgw: migration failed ({}): {e}",
                settings.store.url.redacted()
            );
            ExitCode::from(EXIT_FAILED)
        }
    }
}

async fn send(settings: &Settings, args: SendArgs) -> ExitCode {
    let id = args.id.unwrap_or_else(Uuid::new_v4);
    let mut job = json!({
        "id": id,
        "type": args.kind,
        "school_id": args.school,
        "body": args.body,
    });
    match (&args.to, &args.recipients) {
        (Some(to), _) => job["to"] = to.as_str().into(),
        (None, Some(path)) => match read_recipients(path, &args.kind) {
            Ok(recipients) => job["recipients"] = recipients.into(),
            Err(message) => return refuse("send", message),
        },
        (None, None) => return refuse("send", "--to or --recipients is required".into()),
    }
    if let Some(context) = &args.context {
        match parse_context(context) {
            Ok(context) => job["context"] = context,
            Err(message) => return refuse("send", message),
        }
    }
    if let Some(at) = args.not_before {
        job["not_before"] = at.into();
    }
    if let Some(at) = args.expires_at {
        job["expires_at"] = at.into();
    }
    let body = job.to_string().into_bytes();
    if let Err(e) = Job::decode(&body) {
        eprintln!("smsgw: this job would be invalid: {e}");
        return ExitCode::from(EXIT_USAGE);
    }
    if body.len() > settings.lanes.max_job_bytes {
        return refuse(
            "send",
            format!(
                "the job is {} bytes, more than SMSGW_MAX_JOB_BYTES ({}): the daemon would \
                 refuse it unread; send the recipients in several announcements",
                body.len(),
                settings.lanes.max_job_bytes
            ),
        );
    }
    let result = async {
        let broker = Broker::connect(&settings.broker, "smsgw send").await?;
        // Declaring is idempotent; it makes a job sent before the daemon's first start
        // land in its queue instead of nowhere.
        broker.declare_topology().await?;
        broker.publish_job(id, &args.kind, &body).await?;
        broker.close().await;
        Ok::<_, crate::broker::BrokerError>(())
    }
    .await;
    match result {
        Ok(()) => {
            println!("{id}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!(
                "smsgw: could not publish to {}: {e}",
                settings.broker.url.redacted()
            );
            ExitCode::from(EXIT_FAILED)
        }
    }
}

/// `--recipients FILE` for an announcement: its entries, or why the file is refused (its
/// line named, never quoted).
fn read_recipients(path: &std::path::Path, kind: &str) -> Result<Vec<serde_json::Value>, String> {
    if kind != JobType::Announcement.as_str() {
        return Err(format!(
            "--recipients is for --type announcement; a {kind} has one recipient: --to"
        ));
    }
    let text = std::fs::read(path)
        .map_err(|e| format!("--recipients {}: cannot read it: {e}", path.display()))?;
    crate::ops::parse_recipients(&text).map_err(|e| format!("--recipients {}: {e}", path.display()))
}

/// `--context JSON`: an object of at most 2 KiB as compact JSON, as a job's `context`.
fn parse_context(text: &str) -> Result<serde_json::Value, String> {
    let context: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("--context: not JSON: {e}"))?;
    if !context.is_object() {
        return Err("--context: a JSON object is expected ({\"booking_id\": 981})".into());
    }
    let size = context.to_string().len();
    if size > crate::job::MAX_CONTEXT_BYTES {
        return Err(format!(
            "--context: {size} bytes as compact JSON, more than {}",
            crate::job::MAX_CONTEXT_BYTES
        ));
    }
    Ok(context)
}
