//! Operating smsgw: the dead-letter tools, `smsgw check`, retention and metrics.

mod helpers;

use std::time::Duration;

use serde_json::Value;
use time::OffsetDateTime;

use helpers::{App, Reply, id_of, job, spawn_app, spawn_app_with};

const SCHOOL: i64 = 42;

fn stdout(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Three dead letters, in this order: an invalid job, a rejected number, an exhausted one.
async fn three_dead_letters(app: &App) -> Vec<Value> {
    app.add_school(SCHOOL, "GB").await;
    app.add_school(7, "GB").await;
    app.stub.reply_for(
        "+447700900111",
        Reply::error(400, 21211, "Invalid 'To' Phone Number: +447700900111"),
    );
    app.stub
        .reply_for("+447700900222", Reply::error(503, 20503, "unavailable"));
    let mut invalid = job("booking_reminder", SCHOOL, "+447700900333", "x");
    invalid["body"] = Value::String(String::new());
    let rejected = job("booking_reminder", SCHOOL, "+447700900111", "Reminder");
    let exhausted = job("login_code", 7, "+447700900222", "Code 1234");
    app.publish(&invalid).await;
    wait_depth(app, "sms.dead", 1).await;
    app.publish(&rejected).await;
    wait_depth(app, "sms.dead", 2).await;
    app.publish(&exhausted).await;
    wait_depth(app, "sms.dead", 3).await;
    vec![invalid, rejected, exhausted]
}

async fn wait_depth(app: &App, queue: &str, depth: u32) {
    let deadline = std::time::Instant::now() + helpers::PATIENCE;
    while app.queue_depth(queue).await != depth {
        assert!(
            std::time::Instant::now() < deadline,
            "{queue} never held {depth}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Lists `sms.dead` once all its `depth` messages are back in the queue (a previous
/// tool's channel may still be closing).
async fn listed_ids(app: &App, depth: u32, args: &[&str]) -> Vec<String> {
    wait_depth(app, "sms.dead", depth).await;
    let mut all = vec!["dlq", "list", "--json"];
    all.extend_from_slice(args);
    let output = app.run_cli(&all);
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    let rows: Value = serde_json::from_str(&stdout(&output)).expect("JSON list");
    rows.as_array()
        .expect("array")
        .iter()
        .map(|r| r["id"].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn dlq_list_shows_dead_letters_without_taking_or_reordering_them() {
    let app = spawn_app_with(&[("SMSGW_MAX_ATTEMPTS", "2")]).await;
    let jobs = three_dead_letters(&app).await;
    let ids: Vec<String> = jobs.iter().map(|j| id_of(j).to_string()).collect();

    assert_eq!(listed_ids(&app, 3, &[]).await, ids, "in queue order");
    assert_eq!(
        listed_ids(&app, 3, &[]).await,
        ids,
        "a second look sees the same"
    );
    assert_eq!(
        listed_ids(&app, 3, &["--reason", "invalid_job"]).await,
        ids[..1]
    );
    assert_eq!(
        listed_ids(&app, 3, &["--reason", "attempts_exhausted"]).await,
        ids[2..]
    );
    assert_eq!(
        listed_ids(&app, 3, &["--type", "booking_reminder"]).await,
        ids[..2]
    );
    assert_eq!(listed_ids(&app, 3, &["--school", "7"]).await, ids[2..]);

    let table = app.run_cli(&["dlq", "list", "--limit", "2"]);
    let text = stdout(&table);
    assert!(
        text.contains("JOB ID") && text.contains("LAST ERROR"),
        "{text}"
    );
    assert!(
        text.contains(&ids[0]) && text.contains("invalid_job"),
        "{text}"
    );
    assert!(text.contains("body: empty"), "{text}");
    assert!(!text.contains(&ids[2]), "--limit 2 shows two: {text}");
    assert!(
        text.contains("2 shown, 3 matching; looked at 3 of 3 in sms.dead"),
        "{text}"
    );
    assert!(
        !text.contains("7700900111"),
        "numbers in errors are masked: {text}"
    );
    wait_depth(&app, "sms.dead", 3).await; // messages come back when the tool closes its channel
}

#[tokio::test(flavor = "multi_thread")]
async fn dlq_show_prints_the_job_masked_its_headers_and_its_attempts() {
    let app = spawn_app_with(&[("SMSGW_MAX_ATTEMPTS", "2")]).await;
    let jobs = three_dead_letters(&app).await;
    let id = id_of(&jobs[1]).to_string();

    let output = app.run_cli(&["dlq", "show", &id]);
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    let text = stdout(&output);
    assert!(text.contains("permanent_failure"), "{text}");
    assert!(text.contains("x-smsgw-attempts: 1"), "{text}");
    assert!(text.contains("+44*******111"), "{text}");
    assert!(
        !text.contains("+447700900111"),
        "masked unless --reveal: {text}"
    );
    assert!(
        text.contains("#1") && text.contains("HTTP 400") && text.contains("21211"),
        "{text}"
    );

    let revealed = stdout(&app.run_cli(&["dlq", "show", &id, "--reveal"]));
    assert!(revealed.contains("+447700900111"), "{revealed}");

    let missing = app.run_cli(&["dlq", "show", "no-such-id"]);
    assert_eq!(missing.status.code(), Some(1));
    wait_depth(&app, "sms.dead", 3).await; // messages come back when the tool closes its channel
}

#[tokio::test(flavor = "multi_thread")]
async fn dlq_show_hides_the_body_and_the_context_unless_revealed() {
    let app = spawn_app().await;
    // Invalid (no such school id): dead-lettered as it came, text and context included.
    let mut code = job("login_code", -1, "+447700900123", "Your code is 4711");
    code["context"] = serde_json::json!({"student": "Sam Smith", "booking_id": 981});
    app.publish(&code).await;
    wait_depth(&app, "sms.dead", 1).await;
    let id = id_of(&code).to_string();

    let masked = stdout(&app.run_cli(&["dlq", "show", &id]));
    for secret in ["4711", "Sam Smith", "981", "+447700900123"] {
        assert!(!masked.contains(secret), "{secret} shown: {masked}");
    }
    assert!(masked.contains("(hidden, 17 characters)"), "{masked}");
    assert!(masked.contains("\"student\": \"***\""), "{masked}");
    assert!(masked.contains("+44*******123"), "{masked}");
    wait_depth(&app, "sms.dead", 1).await; // messages come back when the tool closes its channel

    let revealed = stdout(&app.run_cli(&["dlq", "show", &id, "--reveal"]));
    for secret in ["Your code is 4711", "Sam Smith", "+447700900123"] {
        assert!(
            revealed.contains(secret),
            "{secret} not revealed: {revealed}"
        );
    }
    wait_depth(&app, "sms.dead", 1).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn dlq_says_plainly_when_one_run_could_not_look_at_every_letter() {
    let app = spawn_app().await;
    // One more than a run can hold (AMQP's prefetch is a 16-bit number).
    let count = u32::from(u16::MAX) + 1;
    let (_connection, channel) = amqp_channel(&app).await;
    for n in 0..count {
        let body = format!("{{\"n\": {n}}}");
        dead_letter(&channel, body.as_bytes(), Some(OffsetDateTime::now_utc())).await;
    }
    wait_depth(&app, "sms.dead", count).await;

    let list = app.run_cli(&["dlq", "list", "--limit", "1"]);
    let (out, err) = (stdout(&list), String::from_utf8_lossy(&list.stderr));
    assert_eq!(list.status.code(), Some(1), "{out}\n{err}");
    assert!(
        out.contains("looked at 65535 of 65536 in sms.dead"),
        "{out}"
    );
    assert!(
        err.contains("only 65535 of the 65536 dead letters were looked at"),
        "{err}"
    );
    wait_depth(&app, "sms.dead", count).await; // nothing was taken
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replayed_outcome_unknown_letter_is_asked_about_not_sent_twice() {
    let app = spawn_app_with(&[
        ("SMSGW_MAX_ATTEMPTS", "1"),
        ("SMSGW_PROVIDER_TIMEOUT", "300ms"),
    ])
    .await;
    app.add_school(SCHOOL, "GB").await;
    // Twilio takes the text but the answer never comes: it may have gone out.
    app.stub
        .script([Reply::TakeThenHang(Duration::from_secs(2))]);
    let code = job("login_code", SCHOOL, "+447700900123", "Code 1234");
    app.publish(&code).await;
    let failed = app.wait_for_status(id_of(&code), "failed").await;
    assert_eq!(failed.reason.as_deref(), Some("outcome_unknown"));
    assert_eq!(
        listed_ids(&app, 1, &["--reason", "outcome_unknown"]).await,
        [id_of(&code).to_string()]
    );

    let replay = app.run_cli(&["dlq", "replay", "--reason", "outcome_unknown"]);
    assert_eq!(replay.status.code(), Some(0), "{replay:?}");
    let row = app.wait_for_status(id_of(&code), "sent").await;
    assert!(
        row.provider_message_id.is_some(),
        "the taken message adopted"
    );
    assert!(app.stub.lookups() >= 1, "Twilio was asked first");
    assert_eq!(app.stub.requests().len(), 1, "never sent a second time");
    assert_eq!(app.stub.taken_to("+447700900123"), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn dlq_replay_sends_again_with_a_fresh_budget_and_keeps_the_history() {
    let app = spawn_app_with(&[("SMSGW_MAX_ATTEMPTS", "2")]).await;
    let jobs = three_dead_letters(&app).await;
    let exhausted = id_of(&jobs[2]);

    let dry = app.run_cli(&[
        "dlq",
        "replay",
        "--reason",
        "attempts_exhausted",
        "--dry-run",
    ]);
    assert_eq!(dry.status.code(), Some(0));
    assert!(stdout(&dry).contains("would replay 1"), "{}", stdout(&dry));
    wait_depth(&app, "sms.dead", 3).await; // messages come back when the tool closes its channel

    // The provider is back: the replayed job is sent.
    app.stub.reply_for("+447700900222", Reply::Created);
    let replay = app.run_cli(&["dlq", "replay", "--reason", "attempts_exhausted"]);
    assert_eq!(replay.status.code(), Some(0), "{replay:?}");
    assert!(
        stdout(&replay).contains("replayed 1, kept 2"),
        "{}",
        stdout(&replay)
    );

    let row = app.wait_for_status(exhausted, "sent").await;
    assert_eq!(row.attempts, 3);
    let outcomes: Vec<_> = app
        .attempts(exhausted)
        .await
        .into_iter()
        .map(|a| a.outcome.unwrap_or_default())
        .collect();
    assert_eq!(outcomes, ["temporary_failure", "temporary_failure", "sent"]);
    assert_eq!(listed_ids(&app, 2, &[]).await.len(), 2, "the others stay");

    let usage = app.run_cli(&["dlq", "replay"]);
    assert_eq!(
        usage.status.code(),
        Some(2),
        "replay needs --id, --reason or --all"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_interrupted_replay_loses_nothing_and_texts_nobody_twice() {
    // Every job fails at once (no circuit pause): 300 dead letters to replay.
    let app = spawn_app_with(&[
        ("SMSGW_MAX_ATTEMPTS", "1"),
        ("SMSGW_CIRCUIT_THRESHOLD", "10000"),
    ])
    .await;
    app.add_school(SCHOOL, "GB").await;
    app.stub
        .reply_always(Reply::error(503, 20503, "unavailable"));
    let count = 300;
    let mut ids = Vec::new();
    for i in 0..count {
        let job = job(
            "booking_reminder",
            SCHOOL,
            &format!("+4477009{i:05}"),
            "Reminder",
        );
        app.publish(&job).await;
        ids.push(id_of(&job));
    }
    wait_depth(&app, "sms.dead", count).await;
    app.stub.reply_always(Reply::Created);
    let requests_before = app.stub.requests().len();

    // Kill the first replay part-way; run it again to the end.
    let vars = [
        ("SMSGW_AMQP_URL".to_owned(), app.env.amqp_url.clone()),
        (
            "SMSGW_DATABASE_URL".to_owned(),
            app.env.database_url.clone(),
        ),
        (
            "SMSGW_RETRY_DELAYS".to_owned(),
            "100ms,200ms,400ms".to_owned(),
        ),
    ];
    let mut first = helpers::smsgw_command(&vars, &["dlq", "replay", "--all"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("replay");
    while app.stub.requests().len() < requests_before + 20 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let _ = first.kill();
    let _ = first.wait();
    let second = app.run_cli(&["dlq", "replay", "--all"]);
    assert_eq!(second.status.code(), Some(0), "{second:?}");

    for id in &ids {
        app.wait_for_status(*id, "sent").await;
    }
    wait_depth(&app, "sms.dead", 0).await;
    let mut sends = std::collections::HashMap::new();
    for request in app.stub.requests().into_iter().skip(requests_before) {
        *sends
            .entry(request.get("To").unwrap_or_default().to_owned())
            .or_insert(0) += 1;
    }
    let twice: Vec<_> = sends.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "texted twice: {twice:?}");
    assert_eq!(sends.len(), count as usize);
}

/// `queue`'s arguments as `rabbitmqctl list_queues` prints them.
fn queue_arguments(vhost: &str, queue: &str) -> String {
    let output = std::process::Command::new("rabbitmqctl")
        .args(["list_queues", "-p", vhost, "name", "arguments"])
        .args(["--no-table-headers", "--quiet"])
        .output()
        .expect("rabbitmqctl runs");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .find(|line| line.split_whitespace().next() == Some(queue))
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn sms_dead_keeps_its_letters_however_often_it_is_browsed() {
    let app = spawn_app_with(&[("SMSGW_MAX_ATTEMPTS", "2")]).await;
    three_dead_letters(&app).await;
    // RabbitMQ 4.x would give a quorum queue without one a limit of 20 deliveries.
    let arguments = queue_arguments(&app.env.name, "sms.dead");
    assert!(
        arguments.contains("x-delivery-limit") && arguments.contains("2147483647"),
        "{arguments}"
    );
    let first = listed_ids(&app, 3, &[]).await;
    for _ in 0..25 {
        assert_eq!(listed_ids(&app, 3, &[]).await, first);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_sms_dead_declared_by_an_older_smsgw_is_used_as_it_is() {
    use lapin::{options::*, types::*};
    let env = helpers::TestEnv::new().await;
    let connection = lapin::Connection::connect(&env.amqp_url, Default::default())
        .await
        .expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    let mut quorum = FieldTable::default();
    quorum.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .queue_declare("sms.dead".into(), durable, quorum)
        .await
        .expect("sms.dead as an older smsgw declared it");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let letter = job("login_code", SCHOOL, "+447700900123", "Code 1234");
    channel
        .basic_publish(
            "".into(),
            "sms.dead".into(),
            BasicPublishOptions::default(),
            letter.to_string().as_bytes(),
            lapin::BasicProperties::default().with_message_id(id_of(&letter).to_string().into()),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    let vhost = env.name.clone();
    let app = helpers::attach(env, helpers::TwilioStub::start().await).await;

    let ids = listed_ids(&app, 1, &[]).await;
    assert_eq!(ids, vec![id_of(&letter).to_string()]);
    assert!(
        !queue_arguments(&vhost, "sms.dead").contains("x-delivery-limit"),
        "left as it was"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn dlq_purge_needs_yes_and_deletes_only_what_it_matches() {
    let app = spawn_app_with(&[("SMSGW_MAX_ATTEMPTS", "2")]).await;
    let jobs = three_dead_letters(&app).await;

    let refused = app.run_cli(&["dlq", "purge", "--reason", "invalid_job"]);
    assert_eq!(refused.status.code(), Some(2));
    wait_depth(&app, "sms.dead", 3).await; // messages come back when the tool closes its channel

    // Without a filter, deleting everything must be asked for by name.
    let unfiltered = app.run_cli(&["dlq", "purge", "--yes"]);
    assert_eq!(unfiltered.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&unfiltered.stderr).contains("--all"));
    wait_depth(&app, "sms.dead", 3).await;

    let young = app.run_cli(&["dlq", "purge", "--older-than", "1h", "--yes"]);
    assert_eq!(young.status.code(), Some(0));
    wait_depth(&app, "sms.dead", 3).await; // messages come back when the tool closes its channel

    let purged = app.run_cli(&["dlq", "purge", "--reason", "invalid_job", "--yes"]);
    assert_eq!(purged.status.code(), Some(0));
    assert!(
        stdout(&purged).contains("purged 1, kept 2"),
        "{}",
        stdout(&purged)
    );
    let left = listed_ids(&app, 2, &[]).await;
    assert_eq!(
        left,
        [id_of(&jobs[1]).to_string(), id_of(&jobs[2]).to_string()]
    );

    let all = app.run_cli(&["dlq", "purge", "--all", "--yes"]);
    assert_eq!(all.status.code(), Some(0));
    assert!(
        stdout(&all).contains("purged 2, kept 0"),
        "{}",
        stdout(&all)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn check_reports_each_item_and_exits_by_what_failed() {
    let app = spawn_app().await;
    let ok = app.run_cli(&["check"]);
    let text = stdout(&ok);
    assert_eq!(ok.status.code(), Some(0), "{text}");
    for item in ["configuration", "broker", "database", "schema", "provider"] {
        assert!(
            text.lines()
                .any(|l| l.starts_with(item) && l.contains(" ok ")),
            "{item}: {text}"
        );
    }

    let vars = [
        (
            "SMSGW_AMQP_URL".to_owned(),
            "amqp://guest:guest@127.0.0.1:1/%2f".to_owned(),
        ),
        (
            "SMSGW_DATABASE_URL".to_owned(),
            app.env.database_url.clone(),
        ),
    ];
    let down = helpers::smsgw_command(&vars, &["check"])
        .output()
        .expect("check");
    assert_eq!(down.status.code(), Some(1), "{}", stdout(&down));
    assert!(
        stdout(&down)
            .lines()
            .any(|l| l.starts_with("broker") && l.contains("FAIL"))
    );

    // A cluster's node list with one node down: usable, with a warning.
    let vars = [
        (
            "SMSGW_AMQP_URL".to_owned(),
            format!("amqp://guest:hunter2@127.0.0.1:1/%2f,{}", app.env.amqp_url),
        ),
        (
            "SMSGW_DATABASE_URL".to_owned(),
            app.env.database_url.clone(),
        ),
    ];
    let one_down = helpers::smsgw_command(&vars, &["check"])
        .output()
        .expect("check");
    let text = stdout(&one_down);
    assert_eq!(one_down.status.code(), Some(0), "{text}");
    assert!(text.contains("1 of 2 nodes answer"), "{text}");
    assert!(!text.contains("hunter2"), "{text}");

    let vars = [("SMSGW_ENV".to_owned(), "production".to_owned())];
    let bad = helpers::smsgw_command(&vars, &["check"])
        .output()
        .expect("check");
    assert_eq!(bad.status.code(), Some(2));
    assert!(
        stdout(&bad).starts_with("configuration  FAIL"),
        "{}",
        stdout(&bad)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn retention_purges_old_bodies_and_rows_in_the_background() {
    let app = spawn_app_with(&[
        ("SMSGW_BODY_RETENTION", "1h"),
        ("SMSGW_LOG_RETENTION", "30d"),
        ("SMSGW_RETENTION_INTERVAL", "200ms"),
    ])
    .await;
    app.sql(
        "INSERT INTO sms_messages (id, school_id, type, recipient, body, status, created_at)
         SELECT gen_random_uuid(), 1, 'booking_reminder', '+447700900123', 'old text',
                status, now() - age::interval
           FROM (VALUES ('2 hours', 'sent'), ('2 hours', 'sent'), ('2 hours', 'sent'),
                        ('10 minutes', 'sent'), ('40 days', 'delivered'),
                        ('40 days', 'retrying')) AS t(age, status)",
    )
    .await;

    let deadline = std::time::Instant::now() + helpers::PATIENCE;
    loop {
        let counts = app
            .db
            .rows("SELECT count(body), count(*) FROM sms_messages", &[])
            .await;
        let (with_body, rows): (i64, i64) = (counts[0].get(0), counts[0].get(1));
        if with_body == 1 && rows == 5 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "bodies {with_body}, rows {rows}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let recent: Option<String> = app
        .db
        .scalar(
            "SELECT body FROM sms_messages WHERE created_at > now() - interval '1 hour'",
            &[],
        )
        .await;
    assert_eq!(recent.as_deref(), Some("old text"), "a recent body stays");
    let metrics = app.metrics().await;
    // The 40-day-old finished row is deleted; its body counts as purged only when a pass
    // purged it before deleting it, which depends on when the rows landed in the pass.
    assert!(
        metrics.contains("smsgw_bodies_purged_total 5")
            || metrics.contains("smsgw_bodies_purged_total 4"),
        "{metrics}"
    );
    assert!(
        metrics.contains("smsgw_messages_deleted_total 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn retention_purges_old_receipts_and_vonage_signatures_once_they_cannot_be_replayed() {
    let app = spawn_app_with(&[
        ("SMSGW_LOG_RETENTION", "30d"),
        ("SMSGW_RETENTION_INTERVAL", "200ms"),
    ])
    .await;
    app.sql(
        "INSERT INTO sms_receipts (provider, provider_message_id, provider_status, received_at)
         SELECT 'twilio', 'SM' || n, 'delivered', now() - age::interval
           FROM (VALUES (1, '40 days'), (2, '40 days'), (3, '1 day')) AS t(n, age)",
    )
    .await;
    app.sql(
        "INSERT INTO sms_webhooks_seen (provider, webhook_id, received_at)
         VALUES ('vonage', 'old-signature', now() - interval '11 minutes'),
                ('vonage', 'fresh-signature', now() - interval '1 minute'),
                ('twilio', 'SM-inbound-stop', now() - interval '11 minutes')",
    )
    .await;

    let deadline = std::time::Instant::now() + helpers::PATIENCE;
    loop {
        let receipts: i64 = app
            .db
            .scalar("SELECT count(*) FROM sms_receipts", &[])
            .await;
        let seen: Vec<String> = app
            .db
            .rows(
                "SELECT webhook_id FROM sms_webhooks_seen ORDER BY webhook_id",
                &[],
            )
            .await
            .iter()
            .map(|row| row.get(0))
            .collect();
        // Twilio's inbound ids are kept with the log: their signatures carry no time.
        if receipts == 1 && seen == ["SM-inbound-stop", "fresh-signature"] {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "receipts {receipts}, webhooks seen {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A connection of the test's own to the app's vhost, and a channel on it.
async fn amqp_channel(app: &App) -> (lapin::Connection, lapin::Channel) {
    let connection =
        lapin::Connection::connect(&app.env.amqp_url, lapin::ConnectionProperties::default())
            .await
            .expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    (connection, channel)
}

/// Appends a dead letter with `body` to `sms.dead`, dead since `dead_at` (`None`: a
/// letter that does not say).
async fn dead_letter(channel: &lapin::Channel, body: &[u8], dead_at: Option<OffsetDateTime>) {
    let mut headers = lapin::types::FieldTable::default();
    headers.insert(
        "x-smsgw-reason".into(),
        lapin::types::AMQPValue::LongString("permanent_failure".into()),
    );
    if let Some(at) = dead_at {
        let ms = i64::try_from(at.unix_timestamp_nanos() / 1_000_000).expect("a time");
        headers.insert(
            "x-smsgw-dead-at".into(),
            lapin::types::AMQPValue::LongLongInt(ms),
        );
    }
    channel
        .basic_publish(
            "sms.dead".into(),
            "".into(),
            lapin::options::BasicPublishOptions::default(),
            body,
            lapin::BasicProperties::default()
                .with_delivery_mode(2)
                .with_headers(headers),
        )
        .await
        .expect("publish a dead letter");
}

#[tokio::test(flavor = "multi_thread")]
async fn retention_removes_old_dead_letters_and_old_log_rows_by_default() {
    let mut app = spawn_app().await;
    // Everything is in place before the daemon that keeps it starts: its first pass sees
    // it all.
    app.stop().await.expect("stopped");
    app.sql(
        "INSERT INTO sms_messages (id, school_id, type, recipient, status, created_at)
         SELECT gen_random_uuid(), 1, 'booking_reminder', '+447700900123', 'delivered',
                now() - age::interval
           FROM (VALUES ('200 days'), ('100 days')) AS t(age)",
    )
    .await;
    app.sql(
        "INSERT INTO sms_webhooks_seen (provider, webhook_id, received_at)
         VALUES ('twilio', 'SM-old', now() - interval '200 days'),
                ('twilio', 'SM-recent', now() - interval '1 day')",
    )
    .await;
    let (_connection, channel) = amqp_channel(&app).await;
    let ago = |d: time::Duration| Some(OffsetDateTime::now_utc() - d);
    let letters = [
        ("40 days", ago(time::Duration::days(40))),
        ("undated", None),
        ("31 days", ago(time::Duration::days(31))),
        ("1 hour", ago(time::Duration::hours(1))),
        (
            "35 days, behind a younger one",
            ago(time::Duration::days(35)),
        ),
    ];
    for (name, dead_at) in letters {
        let body = serde_json::json!({ "id": name }).to_string();
        dead_letter(&channel, body.as_bytes(), dead_at).await;
    }
    wait_depth(&app, "sms.dead", 5).await;

    // Default retention: dead letters 30 days, the log 180.
    let http_url = restart(&app, &[("SMSGW_RETENTION_INTERVAL", "200ms")]).await;
    let deadline = std::time::Instant::now() + helpers::PATIENCE;
    loop {
        let rows: i64 = app
            .db
            .scalar("SELECT count(*) FROM sms_messages", &[])
            .await;
        let ids: Vec<String> = app
            .db
            .rows("SELECT webhook_id FROM sms_webhooks_seen", &[])
            .await
            .iter()
            .map(|row| row.get(0))
            .collect();
        let metrics = reqwest::get(format!("{http_url}/metrics"))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
        let removed = metrics.contains("smsgw_dead_letters_removed_total 2");
        if rows == 1 && ids == ["SM-recent"] && removed {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "rows {rows}, ids {ids:?}, {metrics}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The head is the oldest: a pass stops at the first letter younger than the limit.
    assert_eq!(
        listed_ids(&app, 3, &[]).await,
        ["undated", "1 hour", "35 days, behind a younger one"]
    );
}

/// Starts a daemon again on the app's vhost and database (the app's own was stopped),
/// with the base settings changed by `overrides`; its HTTP URL.
async fn restart(app: &App, overrides: &[(&str, &str)]) -> String {
    let port = helpers::free_port();
    let mut vars = helpers::base_settings(&app.env, &app.stub, port);
    for (k, v) in overrides {
        vars.insert((*k).to_owned(), (*v).to_owned());
    }
    let settings =
        smsgw::config::Settings::from_lookup(|k| vars.get(k).cloned()).expect("valid settings");
    // Runs until the test ends.
    let daemon = tokio::spawn(smsgw::daemon::run(
        settings,
        tokio_util::sync::CancellationToken::new(),
    ));
    let http_url = format!("http://127.0.0.1:{port}");
    helpers::wait_until_ready(&http_url, &daemon).await;
    http_url
}

#[tokio::test(flavor = "multi_thread")]
async fn bodies_can_be_dropped_as_soon_as_a_message_is_done() {
    let app = spawn_app_with(&[("SMSGW_KEEP_BODY", "false")]).await;
    app.add_school(SCHOOL, "GB").await;
    let sent = job("login_code", SCHOOL, "+447700900123", "Code 1234");
    let suppressed = job("login_code", 99, "+447700900123", "Code 1234");
    app.publish(&sent).await;
    app.publish(&suppressed).await;
    app.wait_for_status(id_of(&sent), "sent").await;
    app.wait_for_status(id_of(&suppressed), "suppressed").await;
    let bodies: i64 = app
        .db
        .scalar("SELECT count(body) FROM sms_messages", &[])
        .await;
    assert_eq!(bodies, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_outcomes_calls_and_dead_letters() {
    let app = spawn_app_with(&[("SMSGW_MAX_ATTEMPTS", "2")]).await;
    three_dead_letters(&app).await;
    let ok = job("login_code", SCHOOL, "+447700900444", "Code");
    app.publish(&ok).await;
    app.wait_for_status(id_of(&ok), "sent").await;

    let text = app.metrics().await;
    for expected in [
        r#"smsgw_messages_total{outcome="sent",type="login_code",provider="twilio"} 1"#,
        r#"smsgw_messages_total{outcome="failed",type="booking_reminder",provider="twilio"} 1"#,
        r#"smsgw_dead_letters_total{reason="invalid_job"} 1"#,
        r#"smsgw_dead_letters_total{reason="attempts_exhausted"} 1"#,
        r#"smsgw_retries_total{lane="urgent"} 1"#,
        "smsgw_provider_call_duration_seconds_count{provider=\"twilio\"} 4",
    ] {
        assert!(text.contains(expected), "missing {expected}:\n{text}");
    }
}

/// A row in the log as the daemon would have written it, created `ago` (an interval)
/// before now; its id.
async fn logged(app: &App, school: i64, to: &str, ago: &str, context: Value) -> uuid::Uuid {
    let id = uuid::Uuid::new_v4();
    app.db
        .execute(
            "INSERT INTO sms_messages (id, school_id, type, recipient, body, context, status,
                                       segments, provider, created_at)
             VALUES ($1, $2, 'booking_reminder', $3, 'Your code is 4711', $4, 'delivered', 1,
                     'twilio', now() - $5::text::interval)",
            &[&id, &school, &to, &context, &ago],
        )
        .await;
    id
}

/// Where each id appears in `text` (None when absent).
fn positions(text: &str, ids: &[uuid::Uuid]) -> Vec<Option<usize>> {
    ids.iter().map(|id| text.find(&id.to_string())).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn status_lists_a_numbers_messages_newest_first_masked_unless_revealed() {
    let app = spawn_app().await;
    app.add_school(SCHOOL, "GB").await;
    let to = "+447700900123";
    let old = logged(&app, SCHOOL, to, "3 days", Value::Null).await;
    let newest = logged(&app, SCHOOL, to, "1 minute", Value::Null).await;
    let middle = logged(&app, SCHOOL, to, "2 hours", Value::Null).await;
    let other_school = logged(&app, 7, to, "1 hour", Value::Null).await;
    let other_number = logged(&app, SCHOOL, "+447700900124", "1 minute", Value::Null).await;

    let output = app.run_cli(&["status", "--to", to]);
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    let text = stdout(&output);
    let at = positions(&text, &[newest, other_school, middle, old, other_number]);
    assert!(at[..4].iter().all(Option::is_some), "{text}");
    assert!(at[..4].is_sorted(), "newest first: {text}");
    assert_eq!(at[4], None, "another number's message: {text}");
    assert!(
        text.contains("+44*******123") && text.contains("4 shown"),
        "{text}"
    );
    for secret in [to, "4711"] {
        assert!(!text.contains(secret), "{secret} shown: {text}");
        assert!(!String::from_utf8_lossy(&output.stderr).contains(secret));
    }

    // A national number, read with the school's country; only that school's messages.
    let national = stdout(&app.run_cli(&["status", "--to", "07700 900123", "--school", "42"]));
    let at = positions(&national, &[newest, middle, old, other_school]);
    assert!(at[..3].iter().all(Option::is_some), "{national}");
    assert_eq!(at[3], None, "school 7's message: {national}");
    let recent = stdout(&app.run_cli(&["status", "--to", to, "--since", "24h"]));
    assert!(recent.contains(&middle.to_string()), "{recent}");
    assert!(
        !recent.contains(&old.to_string()),
        "older than 24h: {recent}"
    );
    let limited = stdout(&app.run_cli(&["status", "--to", to, "--limit", "2"]));
    assert!(
        limited.contains("2 shown, newest first; more match"),
        "{limited}"
    );
    assert!(!limited.contains(&middle.to_string()), "{limited}");

    let revealed = stdout(&app.run_cli(&["status", "--to", to, "--reveal"]));
    assert!(revealed.contains(to), "{revealed}");
    let json: Value =
        serde_json::from_str(&stdout(&app.run_cli(&["status", "--to", to, "--json"])))
            .expect("JSON");
    assert_eq!(json[0]["id"], newest.to_string());
    assert_eq!(json[0]["to"], "+44*******123");
    assert_eq!(json[0]["status"], "delivered");
    assert!(json[0].get("body").is_none(), "{json}");
    let json: Value = serde_json::from_str(&stdout(
        &app.run_cli(&["status", "--to", to, "--json", "--reveal"]),
    ))
    .expect("JSON");
    assert_eq!(json[0]["to"], to);
    assert_eq!(json[0]["body"], "Your code is 4711");
}

/// Whether a write as `url`'s login is refused for want of privilege.
async fn write_refused(url: &str, statement: &str) -> bool {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect as the login");
    tokio::spawn(connection);
    let refused = client.batch_execute(statement).await.err();
    refused.and_then(|e| e.code().cloned())
        == Some(tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE)
}

/// The roles of `deploy/postgresql/roles.sql`: support looks messages up and counts them,
/// billing counts them, and neither can write; the web app writes its own tables only.
/// `status` and `usage` connect without migrating, creating or locking anything.
#[tokio::test(flavor = "multi_thread")]
async fn support_and_billing_read_through_their_roles_and_cannot_write() {
    let app = spawn_app().await;
    app.add_school(SCHOOL, "GB").await;
    let to = "+447700900123";
    let id = logged(&app, SCHOOL, to, "1 hour", Value::Null).await;
    let prefix = app.env.name.as_str();
    helpers::db::apply_roles(&app.env.database_url, prefix);
    let support = app.db.login(prefix, "alice", "support").await;
    let billing = app.db.login(prefix, "bob", "billing").await;
    let webapp = app.db.login(prefix, "web", "webapp").await;
    let as_login = |url: &str, args: &[&str]| {
        let vars = [("SMSGW_DATABASE_URL".to_owned(), url.to_owned())];
        helpers::smsgw_command(&vars, args).output().expect("smsgw")
    };
    let today = OffsetDateTime::now_utc().date();
    let (from, until) = (
        today.previous_day().expect("a day").to_string(),
        today.next_day().expect("a day").to_string(),
    );

    let found = as_login(&support, &["status", "--to", to]);
    assert_eq!(found.status.code(), Some(0), "{found:?}");
    assert!(stdout(&found).contains(&id.to_string()), "{found:?}");
    let one = as_login(&support, &["status", &id.to_string()]);
    assert_eq!(one.status.code(), Some(0), "{one:?}");
    for login in [&support, &billing] {
        let usage = as_login(login, &["usage", "--from", &from, "--to", &until, "--csv"]);
        assert_eq!(usage.status.code(), Some(0), "{usage:?}");
        assert!(stdout(&usage).contains("\n42,1,1,"), "{usage:?}");
    }
    // Billing reads the log's rows and nothing else (not the replies status shows).
    let narrow = as_login(&billing, &["status", "--to", to]);
    assert_eq!(narrow.status.code(), Some(1), "{narrow:?}");

    let opt_out = "INSERT INTO sms_opt_outs (phone, source) VALUES ('+447700900123', 'web')";
    for login in [&support, &billing] {
        assert!(
            write_refused(login, opt_out).await,
            "{login} wrote an opt-out"
        );
        let update = "UPDATE sms_messages SET status = 'failed'";
        assert!(
            write_refused(login, update).await,
            "{login} changed the log"
        );
    }
    assert!(
        !write_refused(&webapp, opt_out).await,
        "the web app writes opt-outs"
    );
    let forged = format!("UPDATE sms_messages SET status = 'failed' WHERE id = '{id}'");
    assert!(
        write_refused(&webapp, &forged).await,
        "the web app changed the log"
    );
    app.db.drop_roles(prefix).await;
}

/// The daemon needs no more than `smsgw_daemon` of `deploy/postgresql/roles.sql`: as a
/// login of that role alone (a staging daemon: it does not migrate), it sends and records
/// a text, relays its events and applies a STOP, on tables it does not own.
#[tokio::test(flavor = "multi_thread")]
async fn the_daemon_sends_and_applies_a_stop_as_a_login_of_its_role() {
    let mut app = spawn_app().await;
    app.stop().await.expect("the owner's daemon stops");
    let prefix = app.env.name.clone();
    helpers::db::apply_roles(&app.env.database_url, &prefix);
    let login = app.db.login(&prefix, "app", "daemon").await;
    let public = "https://smsgw.example.com";
    app.http_url = restart(
        &app,
        &[
            ("SMSGW_ENV", "staging"),
            ("SMSGW_DATABASE_URL", &login),
            ("SMSGW_PUBLIC_URL", public),
        ],
    )
    .await;
    app.add_school(SCHOOL, "GB").await;

    let sent = job("booking_reminder", SCHOOL, "+447700900123", "Reminder");
    app.publish(&sent).await;
    let row = app.wait_for_status(id_of(&sent), "sent").await;
    assert_eq!(row.attempts, 1);
    assert_eq!(app.attempts(id_of(&sent)).await.len(), 1);
    let stop = app
        .post_twilio_inbound(public, "+447700900123", "STOP", "SMroles0001")
        .await;
    assert!(stop.status().is_success(), "{stop:?}");
    let opted_out: i64 = app
        .db
        .scalar(
            "SELECT count(*) FROM sms_opt_outs WHERE phone = '+447700900123'",
            &[],
        )
        .await;
    assert_eq!(opted_out, 1);
    let deadline = std::time::Instant::now() + helpers::PATIENCE;
    while app
        .db
        .scalar::<i64>("SELECT count(*) FROM sms_events", &[])
        .await
        > 0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the events were never relayed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let sessions: i64 = app
        .db
        .scalar(
            "SELECT count(*) FROM pg_stat_activity
              WHERE usename = $1 AND datname = current_database()",
            &[&format!("{prefix}_app")],
        )
        .await;
    assert!(sessions > 0, "the daemon is connected as its login");
    app.db.drop_roles(&prefix).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn status_finds_a_booking_by_its_context_as_a_number_or_a_string() {
    let app = spawn_app().await;
    app.add_school(SCHOOL, "GB").await;
    let mut sent = job("booking_cancellation", SCHOOL, "+447700900123", "Cancelled");
    sent["context"] = serde_json::json!({"booking_id": 981, "student": "Sam Smith"});
    app.publish(&sent).await;
    app.wait_for_status(id_of(&sent), "sent").await;
    let as_string = logged(
        &app,
        7,
        "+447700900124",
        "1 day",
        serde_json::json!({"booking_id": "981"}),
    )
    .await;
    let mut others = Vec::new();
    for context in [
        serde_json::json!({"booking_id": 9810}),
        serde_json::json!({"booking_id": "0981"}),
        serde_json::json!({"user_id": 981}),
        serde_json::json!({"nested": {"booking_id": 981}}),
    ] {
        others.push(logged(&app, SCHOOL, "+447700900125", "1 minute", context).await);
    }

    let output = app.run_cli(&["status", "--context", "booking_id=981", "--json"]);
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    let found: Value = serde_json::from_str(&stdout(&output)).expect("JSON");
    let ids: Vec<&str> = found
        .as_array()
        .expect("array")
        .iter()
        .map(|m| m["id"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(
        ids,
        [id_of(&sent).to_string(), as_string.to_string()],
        "newest first"
    );
    assert_eq!(
        found[0]["context"],
        serde_json::json!({"booking_id": "***", "student": "***"}),
        "keys shown, values hidden"
    );
    assert_eq!(found[0]["to"], "+44*******123");

    let table = stdout(&app.run_cli(&["status", "--context", "booking_id=981", "--school", "42"]));
    assert!(table.contains(&id_of(&sent).to_string()), "{table}");
    assert!(
        table.contains("booking_cancellation") && table.contains("sent"),
        "{table}"
    );
    assert!(
        !table.contains(&as_string.to_string()),
        "school 7's: {table}"
    );
    let none = app.run_cli(&["status", "--context", "booking_id=404"]);
    assert_eq!(none.status.code(), Some(0), "none found is an answer");
    assert!(stdout(&none).contains("no messages match"));
}

#[tokio::test(flavor = "multi_thread")]
async fn usage_counts_each_message_once_across_retries_failover_and_announcements() {
    let backup = helpers::TwilioStub::start().await;
    let primary = helpers::TwilioStub::start().await;
    let config = helpers::write_config(
        "primary",
        &[
            helpers::twilio_provider_toml("primary", "+15005550006", &primary, ""),
            helpers::twilio_provider_toml("backup", "+15005550007", &backup, ""),
        ],
    );
    let app = spawn_app_with(&[
        ("SMSGW_CONFIG", config.as_str()),
        ("TEST_TWILIO_TOKEN", helpers::twilio_stub::AUTH_TOKEN),
    ])
    .await;
    app.db
        .batch(&format!(
            "INSERT INTO sms_school_settings (school_id, sms_enabled, country, provider,
                                              fallback_provider)
             VALUES ({SCHOOL}, true, 'GB', 'primary', 'backup');
             INSERT INTO sms_opt_outs (school_id, phone, source)
             VALUES ({SCHOOL}, '+447700900144', 'web')"
        ))
        .await;
    let from = OffsetDateTime::now_utc() - Duration::from_secs(3_600);

    // Retried twice, then sent: one message, three attempts.
    primary.script([
        Reply::error(500, 20500, "oops"),
        Reply::error(500, 20500, "oops"),
    ]);
    let retried = job("booking_reminder", SCHOOL, "+447700900111", "Reminder");
    app.publish(&retried).await;
    app.wait_for_status(id_of(&retried), "sent").await;
    assert_eq!(app.attempts(id_of(&retried)).await.len(), 3);
    // Refused by the primary in a way another provider may not share: sent by the backup.
    primary.reply_for("+447700900122", Reply::error(400, 21608, "unverified"));
    let failed_over = job("booking_reminder", SCHOOL, "+447700900122", "Reminder");
    app.publish(&failed_over).await;
    app.wait_for_status(id_of(&failed_over), "sent").await;
    assert_eq!(backup.requests().len(), 1);
    // Three recipients: three messages; the announcement itself has no row.
    let mut announcement = job("announcement", SCHOOL, "+447700900133", "Closed on Monday");
    announcement.as_object_mut().expect("object").remove("to");
    announcement["recipients"] = serde_json::json!([
        {"to": "+447700900133"}, {"to": "+447700900134"}, {"to": "07700 900135"}
    ]);
    app.publish(&announcement).await;
    let suppressed = job("booking_reminder", SCHOOL, "+447700900144", "Reminder");
    app.publish(&suppressed).await;
    app.wait_for_status(id_of(&suppressed), "suppressed").await;
    let long = job(
        "booking_change",
        SCHOOL,
        "+447700900155",
        &"Moved. ".repeat(25),
    );
    app.publish(&long).await;
    app.wait_for_status(id_of(&long), "sent").await;
    let deadline = std::time::Instant::now() + helpers::PATIENCE;
    while app
        .db
        .scalar::<i64>(
            "SELECT count(*) FROM sms_messages WHERE status = 'sent' AND bulk_id IS NOT NULL",
            &[],
        )
        .await
        < 3
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the announcement never went out"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(app.message(id_of(&announcement)).await.is_none());

    let to = OffsetDateTime::now_utc() + Duration::from_secs(3_600);
    let rfc = |at: OffsetDateTime| {
        at.format(&time::format_description::well_known::Rfc3339)
            .expect("format")
    };
    let output = app.run_cli(&["usage", "--from", &rfc(from), "--to", &rfc(to), "--csv"]);
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    let csv = stdout(&output);
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 2, "{csv}");
    let header: Vec<&str> = lines[0].split(',').collect();
    let figures: std::collections::HashMap<&str, &str> =
        header.into_iter().zip(lines[1].split(',')).collect();
    // Seven messages: retried, failed over, three recipients, suppressed, long (2 segments).
    for (column, expected) in [
        ("school_id", "42"),
        ("messages", "7"),
        ("segments", "8"),
        ("sent_messages", "6"),
        ("sent_segments", "7"),
        ("suppressed_messages", "1"),
        ("failed_messages", "0"),
        ("in_progress_messages", "0"),
        ("billable_messages", "6"),
        ("billable_segments", "7"),
    ] {
        assert_eq!(figures[column], expected, "{column}: {csv}");
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("has not ended yet"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn usage_counts_what_was_created_from_the_first_day_up_to_the_last_one_excluded() {
    let app = spawn_app().await;
    app.sql(
        "INSERT INTO sms_messages (id, school_id, type, recipient, status, segments, created_at)
         SELECT gen_random_uuid(), school, 'booking_reminder', '+447700900123', status, 2,
                at::timestamptz
           FROM (VALUES (7, 'delivered', '2026-11-01T00:00:00Z'),
                        (7, 'undelivered', '2026-11-30T23:59:59.999999Z'),
                        (7, 'queued', '2026-11-15T12:00:00+01:00'),
                        (8, 'failed', '2026-11-10T00:00:00Z'),
                        (7, 'delivered', '2026-12-01T00:00:00Z'),
                        (9, 'delivered', '2026-10-31T23:59:59.999999Z')) AS t(school, status, at)",
    )
    .await;

    let csv = app.run_cli(&[
        "usage",
        "--from",
        "2026-11-01",
        "--to",
        "2026-12-01",
        "--csv",
    ]);
    assert_eq!(csv.status.code(), Some(0), "{csv:?}");
    let lines: Vec<String> = stdout(&csv).lines().map(str::to_owned).collect();
    assert!(
        lines[0].starts_with("school_id,messages,segments,sent_messages"),
        "{lines:?}"
    );
    assert_eq!(
        lines[1..],
        [
            "7,3,6,0,0,1,2,1,2,0,0,0,0,0,0,0,0,1,2,2,4",
            "8,1,2,0,0,0,0,0,0,1,2,0,0,0,0,0,0,0,0,0,0",
        ],
        "the first instant counts, the last one does not"
    );
    assert!(
        String::from_utf8_lossy(&csv.stderr).contains("1 messages are still in progress"),
        "{csv:?}"
    );

    let table = stdout(&app.run_cli(&["usage", "--from", "2026-11-01", "--to", "2026-12-01"]));
    assert!(
        table.contains("messages created from 2026-11-01T00:00:00Z (inclusive) to 2026-12-01T00:00:00Z (exclusive)"),
        "{table}"
    );
    assert!(
        table.contains("BILLABLE") && table.contains("IN PROGRESS"),
        "{table}"
    );
    let total = table
        .lines()
        .find(|l| l.starts_with("all"))
        .expect("a total line");
    assert_eq!(
        total.split_whitespace().collect::<Vec<_>>()[..4],
        ["all", "messages", "4", "0"]
    );
    let one = stdout(&app.run_cli(&[
        "usage",
        "--from",
        "2026-11-01",
        "--to",
        "2026-12-01",
        "--school",
        "8",
        "--csv",
    ]));
    assert_eq!(one.lines().count(), 2, "{one}");
    assert!(
        one.lines().nth(1).is_some_and(|l| l.starts_with("8,")),
        "{one}"
    );
}
