//! The `smsgw` binary as ops and developers run it: exit codes, signals, start-up line,
//! and what its logs may never contain.

mod helpers;

use std::{process::Stdio, time::Duration};

use helpers::{Reply, TestEnv, TwilioStub, base_settings, free_port, id_of, job, twilio_stub};
use uuid::Uuid;

use helpers::{
    process::{Daemon, wait_ready, wait_status},
    smsgw_command as smsgw,
};

use helpers::vars;

#[test]
fn production_refuses_the_log_provider() {
    let output = smsgw(
        &vars(&[("SMSGW_ENV", "production"), ("SMSGW_PROVIDER", "log")]),
        &["run"],
    )
    .output()
    .expect("run");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("SMSGW_PROVIDER"), "{stderr}");
    assert!(stderr.contains("log provider"), "{stderr}");
}

#[test]
fn production_refuses_missing_credentials() {
    let output = smsgw(
        &vars(&[
            ("SMSGW_ENV", "production"),
            ("SMSGW_PROVIDER", "twilio"),
            ("TWILIO_ACCOUNT_SID", twilio_stub::ACCOUNT_SID),
        ]),
        &["run"],
    )
    .output()
    .expect("run");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("TWILIO_AUTH_TOKEN"), "{stderr}");
}

#[test]
fn a_bad_keyword_list_is_refused_at_start_up() {
    for (variable, list, says) in [
        ("SMSGW_OPT_OUT_KEYWORDS", "STOP,,QUIT", "empty keyword"),
        (
            "SMSGW_OPT_IN_KEYWORDS",
            "START,STOP",
            "also an opt-out keyword",
        ),
        ("SMSGW_OPT_OUT_KEYWORDS", "STOP ALL", "one word"),
    ] {
        let output = smsgw(&vars(&[(variable, list)]), &["run"])
            .output()
            .expect("run");
        assert_eq!(output.status.code(), Some(2), "{list}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains(variable) && stderr.contains(says),
            "{stderr}"
        );
    }
}

#[test]
fn development_never_sends_to_real_twilio_without_a_redirect() {
    let output = smsgw(
        &vars(&[
            ("SMSGW_PROVIDER", "twilio"),
            ("TWILIO_ACCOUNT_SID", twilio_stub::ACCOUNT_SID),
            ("TWILIO_AUTH_TOKEN", "secret"),
            ("TWILIO_FROM", "+15005550006"),
        ]),
        &["run"],
    )
    .output()
    .expect("run");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("SMSGW_REDIRECT_TO"), "{stderr}");
}

#[test]
fn bad_usage_exits_2_and_help_lists_the_commands() {
    let output = smsgw(&[], &["frobnicate"]).output().expect("run");
    assert_eq!(output.status.code(), Some(2));
    let output = smsgw(
        &[],
        &[
            "send",
            "--school",
            "1",
            "--to",
            "+447700900123",
            "--type",
            "fax",
            "--body",
            "x",
        ],
    )
    .output()
    .expect("run");
    assert_eq!(output.status.code(), Some(2), "unknown type");
    let output = smsgw(
        &[],
        &[
            "send",
            "--school",
            "1",
            "--to",
            "+447700900123",
            "--type",
            "login_code",
            "--body",
            "",
        ],
    )
    .output()
    .expect("run");
    assert_eq!(output.status.code(), Some(2), "empty body");
    assert!(String::from_utf8_lossy(&output.stderr).contains("body: empty"));

    let help = smsgw(&[], &["--help"]).output().expect("run");
    assert_eq!(help.status.code(), Some(0));
    let text = String::from_utf8_lossy(&help.stdout);
    for command in ["run", "migrate", "send"] {
        assert!(text.contains(command), "{text}");
    }
}

#[test]
fn version_states_the_cargo_version_and_the_commit() {
    // The commit build.rs found (git, or SMSGW_COMMIT as the image passes it), or
    // `unknown` when there was none.
    let line = regex::Regex::new(r"^smsgw (\S+) \(([0-9a-f]{4,40}|unknown)\)\n$").expect("regex");
    for flag in ["--version", "-V"] {
        let output = smsgw(&[], &[flag]).output().expect("run");
        assert_eq!(output.status.code(), Some(0), "{flag}");
        let text = String::from_utf8_lossy(&output.stdout);
        let parts = line
            .captures(&text)
            .unwrap_or_else(|| panic!("{flag}: {text:?}"));
        assert_eq!(&parts[1], env!("CARGO_PKG_VERSION"), "{text}");
        assert_eq!(&parts[2], env!("SMSGW_COMMIT"), "{text}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn migrate_is_safe_twice_and_from_two_processes_at_once() {
    let env = TestEnv::new().await;
    let db = vars(&[("SMSGW_DATABASE_URL", env.database_url.as_str())]);
    let first = smsgw(&db, &["migrate"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("migrate");
    let second = smsgw(&db, &["migrate"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("migrate");
    for child in [first, second] {
        let output = child.wait_with_output().expect("wait");
        assert_eq!(output.status.code(), Some(0));
        assert!(String::from_utf8_lossy(&output.stdout).contains("schema is at version"));
    }
    let again = smsgw(&db, &["migrate"]).output().expect("migrate");
    assert_eq!(again.status.code(), Some(0));
    let db = helpers::Db::connect(&env.database_url).await;
    let applied: i64 = db
        .scalar("SELECT count(*) FROM _sqlx_migrations", &[])
        .await;
    let files = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/schema"))
        .expect("schema/")
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "sql"))
        })
        .count();
    assert_eq!(applied, files as i64, "each migration applied exactly once");
}

/// Everything a daemon process needs against this test's services and stub.
async fn daemon_vars(env: &TestEnv, stub: &TwilioStub, port: u16) -> Vec<(String, String)> {
    helpers::migrate(&env.database_url).await;
    let mut all: Vec<(String, String)> = base_settings(env, stub, port).into_iter().collect();
    all.push(("SMSGW_LOG_FORMAT".into(), "json".into()));
    all.push(("RUST_LOG".into(), "debug".into()));
    all
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_finishes_in_flight_work_and_exits_zero() {
    helpers::init_logs();
    let env = TestEnv::new().await;
    let stub = TwilioStub::start().await;
    let port = free_port();
    let vars = daemon_vars(&env, &stub, port).await;
    let mut daemon = Daemon::spawn(&vars);
    wait_ready(port, &mut daemon).await;
    let db = helpers::Db::connect(&env.database_url).await;
    db.batch(
        "INSERT INTO sms_school_settings (school_id, sms_enabled, country) VALUES (1, true, 'GB')",
    )
    .await;
    // Slow answers, so that messages are in flight when the signal arrives.
    stub.reply_always(Reply::Slow(Duration::from_millis(700)));
    let mut ids = Vec::new();
    for i in 0..20 {
        let job = job(
            "booking_reminder",
            1,
            &format!("+4477009002{i:02}"),
            "Reminder",
        );
        let output = smsgw(
            &vars,
            &[
                "send",
                "--school",
                "1",
                "--type",
                "booking_reminder",
                "--body",
                "Reminder",
                "--to",
                job["to"].as_str().unwrap_or_default(),
                "--id",
                &id_of(&job).to_string(),
            ],
        )
        .output()
        .expect("send");
        assert_eq!(output.status.code(), Some(0));
        ids.push(id_of(&job));
    }
    while stub.requests().is_empty() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    daemon.signal("TERM");
    let (code, took) = daemon.wait_exit(Duration::from_secs(15));
    assert_eq!(code, Some(0), "logs: {:#?}", daemon.logs());
    assert!(
        took < Duration::from_secs(6),
        "exit took {took:?}, over the 5s grace"
    );

    // Nothing lost, nothing sent twice: every job is either done or still in the broker,
    // and a second daemon finishes the rest.
    stub.reply_always(Reply::Created);
    let mut second = Daemon::spawn(&vars);
    wait_ready(port, &mut second).await;
    for id in &ids {
        wait_status(&db, *id, "sent").await;
    }
    let mut seen = std::collections::HashMap::new();
    for request in stub.requests() {
        *seen
            .entry(request.get("To").unwrap_or_default().to_owned())
            .or_insert(0) += 1;
    }
    // A 700ms answer is slow, not a timeout: each message was sent exactly once.
    assert!(seen.values().all(|&n| n == 1), "duplicates: {seen:?}");
    assert_eq!(seen.len(), ids.len());
    second.signal("INT");
    assert_eq!(second.wait_exit(Duration::from_secs(15)).0, Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn logs_hold_no_phone_number_token_or_body() {
    helpers::init_logs();
    let env = TestEnv::new().await;
    let stub = TwilioStub::start().await;
    let port = free_port();
    let mut vars = daemon_vars(&env, &stub, port).await;
    vars.push((
        "SMSGW_PUBLIC_URL".into(),
        "https://hooks.example.com".into(),
    ));
    let mut daemon = Daemon::spawn(&vars);
    wait_ready(port, &mut daemon).await;
    let db = helpers::Db::connect(&env.database_url).await;
    db.batch(
        "INSERT INTO sms_school_settings (school_id, sms_enabled, country) VALUES (1, true, 'GB')",
    )
    .await;

    let sent_to = "+447700900123";
    let rejected_to = "+447700900456";
    let national = "07700900789";
    let body = "Secret lesson code ZEBRA-7781";
    stub.reply_for(
        rejected_to,
        Reply::error(
            400,
            21211,
            &format!("The 'To' number {rejected_to} is not a valid phone number."),
        ),
    );
    stub.script([Reply::error(500, 20500, "try later")]);
    let send = |to: &str, kind: &str| {
        let output = smsgw(
            &vars,
            &[
                "send", "--school", "1", "--type", kind, "--body", body, "--to", to,
            ],
        )
        .output()
        .expect("send");
        assert_eq!(output.status.code(), Some(0));
        Uuid::parse_str(String::from_utf8_lossy(&output.stdout).trim()).expect("send prints the id")
    };
    let ok = send(sent_to, "login_code");
    let rejected = send(rejected_to, "booking_reminder");
    let nationally = send(national, "booking_change");
    let suppressed = {
        let output = smsgw(
            &vars,
            &[
                "send",
                "--school",
                "2",
                "--type",
                "login_code",
                "--body",
                body,
                "--to",
                sent_to,
            ],
        )
        .output()
        .expect("send");
        Uuid::parse_str(String::from_utf8_lossy(&output.stdout).trim()).expect("id")
    };
    wait_status(&db, ok, "sent").await;
    wait_status(&db, rejected, "failed").await;
    wait_status(&db, nationally, "sent").await;
    wait_status(&db, suppressed, "suppressed").await;
    let http = format!("http://127.0.0.1:{port}");
    let params = [
        ("From", sent_to),
        ("To", twilio_stub::DEFAULT_FROM),
        ("Body", "Reply secret OTTER-4411"),
        ("MessageSid", "SM00000000000000000000000000000001"),
    ];
    let reply = helpers::post_twilio_to(
        &http,
        "https://hooks.example.com",
        "/webhooks/twilio/inbound",
        &params,
        None,
    )
    .await
    .expect("post a reply");
    assert_eq!(reply.status(), 200);
    daemon.signal("TERM");
    assert_eq!(daemon.wait_exit(Duration::from_secs(15)).0, Some(0));

    let logs = daemon.logs().join("\n");
    assert!(logs.contains("reply kept"), "{logs}");
    assert!(
        logs.contains("+44*******123"),
        "masked numbers are logged: {logs}"
    );
    assert!(logs.contains("sent via twilio"), "{logs}");
    assert!(
        logs.contains("messages go to their real recipients") || logs.contains("Twilio-compatible")
    );
    for secret in [
        sent_to,
        rejected_to,
        "7700900123",
        "7700900456",
        "7700900789",
        twilio_stub::AUTH_TOKEN,
        body,
        "ZEBRA",
        "OTTER",
    ] {
        assert!(
            !logs.contains(secret),
            "the logs contain '{secret}':\n{logs}"
        );
    }
    for line in daemon.logs() {
        assert!(
            serde_json::from_str::<serde_json::Value>(&line).is_ok(),
            "not a JSON log line: {line}"
        );
    }
}

#[test]
fn status_and_usage_refuse_bad_input_with_exit_2_before_looking() {
    // No database is reachable: each is refused before one is needed.
    let nowhere = vars(&[("SMSGW_DATABASE_URL", "postgres://postgres@127.0.0.1:1/none")]);
    for (args, says) in [
        (&["status"][..], "required"),
        (&["status", "--to", "hello"], "not a phone number"),
        (
            &["status", "--to", "+447700900123999"],
            "not a possible phone number",
        ),
        (&["status", "--to", "07700 900123"], "--school"),
        (
            &["status", "--since", "yesterday", "--school", "1"],
            "expected an age",
        ),
        (
            &["status", "--context", "booking_id", "--school", "1"],
            "KEY=VALUE",
        ),
        (&["status", "--context", "=981"], "key"),
        (&["status", "--school", "1", "--limit", "0"], "--limit"),
        (
            &[
                "status",
                "6f1c2d3e-8a9b-4c5d-9e0f-1a2b3c4d5e6f",
                "--to",
                "+447700900123",
            ],
            "cannot be used",
        ),
        (
            &["usage", "--from", "2026-12-01", "--to", "2026-11-01"],
            "--from must be before --to",
        ),
        (
            &["usage", "--from", "2026-11-01", "--to", "2026-11-01"],
            "--from must be before --to",
        ),
        (
            &["usage", "--from", "2026-11-31", "--to", "2026-12-01"],
            "expected a day",
        ),
        (&["usage", "--from", "2026-11-01"], "--to"),
    ] {
        let output = smsgw(&nowhere, args).output().expect("run");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
        assert!(!stderr.contains("7700900123"), "a number in full: {stderr}");
    }
}

/// A file of this test's own in the temporary directory, holding `text`; its path.
fn temp_file(text: &str) -> String {
    let path = std::env::temp_dir().join(format!("smsgw-{}.txt", Uuid::new_v4().simple()));
    std::fs::write(&path, text).expect("write a temporary file");
    path.to_string_lossy().into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn send_announces_to_every_recipient_of_a_file_with_their_refs_and_the_context() {
    let app = helpers::spawn_app().await;
    app.add_school(42, "GB").await;
    let file =
        temp_file("# spring term\n+447700900301,user-1\n\n07700 900302\n+447700900303, user-3\n");
    let output = app.run_cli(&[
        "send",
        "--school",
        "42",
        "--type",
        "announcement",
        "--recipients",
        &file,
        "--body",
        "The office is closed on Monday.",
        "--context",
        r#"{"term": "spring"}"#,
    ]);
    let _ = std::fs::remove_file(&file);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    let bulk: Uuid = String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .expect("the id");
    for (number, reference) in [
        ("+447700900301", Some("user-1")),
        ("+447700900302", None),
        ("+447700900303", Some("user-3")),
    ] {
        let row = app
            .wait_for_status(Uuid::new_v5(&bulk, number.as_bytes()), "sent")
            .await;
        assert_eq!((row.recipient.as_str(), row.bulk_id), (number, Some(bulk)));
        let context = row.context.expect("a context");
        assert_eq!(context["term"], "spring", "{context}");
        assert_eq!(context["ref"].as_str(), reference, "{context}");
    }
    assert_eq!(app.stub.requests().len(), 3, "each recipient texted once");
}

#[test]
fn send_refuses_a_bad_recipients_file_or_context_with_exit_2_before_connecting() {
    let header = temp_file("phone,ref\n+447700900123,user-1\n");
    let no_ref = temp_file("+447700900123\n\n+447700900124,\n");
    let empty = temp_file("# nobody yet\n");
    let missing = format!("{header}.missing");
    let announce = [
        "send",
        "--school",
        "42",
        "--type",
        "announcement",
        "--body",
        "Closed",
    ];
    let code = [
        "send",
        "--school",
        "42",
        "--type",
        "login_code",
        "--body",
        "Code 1",
    ];
    let code_to = [&code[..], &["--to", "+447700900123", "--context"]].concat();
    let big = format!(r#"{{"note": "{}"}}"#, "x".repeat(2_040));
    let cases: [(&[&str], &str, &str); 8] = [
        (&announce, &header, "line 1: not a phone number"),
        (&announce, &no_ref, "line 3: an empty ref"),
        (&announce, &empty, "no recipients"),
        (&announce, &missing, "cannot read it"),
        (&code, &header, "--recipients is for --type announcement"),
        (&code_to, "[1, 2]", "a JSON object is expected"),
        (&code_to, "{booking_id: 981}", "--context: not JSON"),
        (&code_to, &big, "more than 2048"),
    ];
    // Nothing listens there: each is refused before the broker is needed.
    let nowhere = vars(&[("SMSGW_AMQP_URL", "amqp://guest:guest@127.0.0.1:1/%2f")]);
    for (args, last, says) in cases {
        // A file goes after --recipients; a context is the last of its arguments.
        let args = match args.last() {
            Some(&"--context") => [args, &[last]].concat(),
            _ => [args, &["--recipients", last]].concat(),
        };
        let output = smsgw(&nowhere, &args).output().expect("run");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
        assert!(!stderr.contains("7700900123"), "a number quoted: {stderr}");
    }
    for file in [header, no_ref, empty] {
        let _ = std::fs::remove_file(file);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn send_sets_the_amqp_timestamp_that_default_expiry_counts_from() {
    use lapin::options::BasicGetOptions;
    let env = TestEnv::new().await;
    let before = time::OffsetDateTime::now_utc().unix_timestamp();
    let amqp = vars(&[("SMSGW_AMQP_URL", &env.amqp_url)]);
    let args = [
        "send",
        "--school",
        "42",
        "--type",
        "login_code",
        "--to",
        "+447700900123",
        "--body",
        "Your code is 4711",
    ];
    let output = smsgw(&amqp, &args).output().expect("send");
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let after = time::OffsetDateTime::now_utc().unix_timestamp();
    // No daemon runs: the job waits in its lane, which `send` declared.
    let connection = lapin::Connection::connect(&env.amqp_url, Default::default())
        .await
        .expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    let message = channel
        .basic_get("sms.urgent".into(), BasicGetOptions { no_ack: true })
        .await
        .expect("basic.get")
        .expect("the job is in its lane");
    let stamp = message.delivery.properties.timestamp().map(|t| t as i64);
    assert!(
        stamp.is_some_and(|t| (before..=after).contains(&t)),
        "timestamp {stamp:?}, published between {before} and {after}"
    );
}
