//! Named providers, per-school routing and failover between two Twilio stubs, segment
//! limits, and `smsgw status`.

mod helpers;

use std::time::Duration;

use helpers::{Reply, TwilioStub, id_of, job, spawn_app_with, twilio_stub};

const SCHOOL: i64 = 42;

/// A config file with two Twilio providers, `primary` (the app's own stub) and `backup`.
fn config_file(primary: &TwilioStub, backup: &TwilioStub, default: &str) -> String {
    helpers::write_config(
        default,
        &[
            helpers::twilio_provider_toml("primary", "+15005550006", primary, ""),
            helpers::twilio_provider_toml("backup", "+15005550007", backup, ""),
        ],
    )
}

/// An app routed through `primary` (its own stub) with `backup` as the fallback.
async fn two_providers(extra: &[(&str, &str)]) -> (helpers::App, TwilioStub) {
    let backup = TwilioStub::start().await;
    // The app's stub is created inside spawn_app; the config needs its URL first, so the
    // primary is a stub of our own too and the app's default stub stays unused.
    let primary = TwilioStub::start().await;
    let path = config_file(&primary, &backup, "primary");
    let mut overrides: Vec<(&str, &str)> = vec![
        ("SMSGW_CONFIG", path.as_str()),
        ("TEST_TWILIO_TOKEN", twilio_stub::AUTH_TOKEN),
        ("SMSGW_PROVIDER_TIMEOUT", "500ms"),
    ];
    overrides.extend_from_slice(extra);
    let mut app = spawn_app_with(&overrides).await;
    app.stub = primary;
    app.sql(&format!(
        "INSERT INTO sms_school_settings (school_id, sms_enabled, country, provider, fallback_provider)
         VALUES ({SCHOOL}, true, 'GB', 'primary', 'backup')"
    ))
    .await;
    (app, backup)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refusal_another_gateway_may_not_share_fails_over() {
    let (app, backup) = two_providers(&[]).await;
    app.stub.reply_always(Reply::error(
        400,
        21608,
        "The number is unverified (trial account)",
    ));
    let job = job("login_code", SCHOOL, "+447700900123", "Code 1234");
    app.publish(&job).await;

    let row = app.wait_for_status(id_of(&job), "sent").await;
    assert_eq!(app.stub.requests().len(), 1);
    assert_eq!(backup.requests().len(), 1);
    assert_eq!(backup.requests()[0].get("From"), Some("+15005550007"));
    let attempts = app.attempts(id_of(&job)).await;
    assert_eq!(attempts.len(), 2);
    assert_eq!(attempts[0].outcome.as_deref(), Some("permanent_failure"));
    assert_eq!(attempts[0].error_code.as_deref(), Some("21608"));
    assert_eq!(attempts[1].outcome.as_deref(), Some("sent"));
    let provider: String = app
        .db
        .scalar(
            "SELECT provider FROM sms_messages WHERE id = $1",
            &[&id_of(&job)],
        )
        .await;
    assert_eq!(provider, "backup");
    assert!(row.provider_message_id.is_some());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_recipient_problem_does_not_fail_over() {
    let (app, backup) = two_providers(&[]).await;
    app.stub
        .reply_always(Reply::error(400, 21211, "Invalid 'To' Phone Number"));
    let job = job("login_code", SCHOOL, "+447700900123", "Code 1234");
    app.publish(&job).await;
    app.wait_for_status(id_of(&job), "failed").await;
    assert!(backup.requests().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unknown_outcome_never_fails_over() {
    let (app, backup) = two_providers(&[]).await;
    app.stub
        .script([Reply::TakeThenHang(Duration::from_secs(2))]);
    let job = job("login_code", SCHOOL, "+447700900123", "Code 1234");
    app.publish(&job).await;
    app.wait_for_status(id_of(&job), "sent").await;
    assert!(backup.requests().is_empty(), "the primary may have sent it");
    assert_eq!(
        app.stub.taken_to("+447700900123"),
        1,
        "and it had: adopted, not resent"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_open_circuit_sends_through_the_fallback() {
    let (app, backup) = two_providers(&[
        ("SMSGW_CIRCUIT_THRESHOLD", "2"),
        ("SMSGW_CIRCUIT_COOLDOWN", "60s"),
    ])
    .await;
    app.stub
        .reply_always(Reply::error(503, 20503, "Service Unavailable"));
    let jobs: Vec<_> = (0..10)
        .map(|i| {
            job(
                "booking_reminder",
                SCHOOL,
                &format!("+4477009007{i:02}"),
                "Reminder",
            )
        })
        .collect();
    // The first three fail on the primary (two failures open the circuit) and go out
    // through the fallback; messages claimed together may all have tried the primary.
    let (first, rest) = jobs.split_at(3);
    for job in first {
        app.publish(job).await;
    }
    for job in first {
        app.wait_for_status(id_of(job), "sent").await;
    }
    let primary_calls = app.stub.requests().len();
    assert!(primary_calls >= 2, "{primary_calls} calls to the primary");
    // With the circuit open, the rest never try the primary.
    for job in rest {
        app.publish(job).await;
    }
    for job in rest {
        app.wait_for_status(id_of(job), "sent").await;
    }
    assert_eq!(
        backup.requests().len(),
        jobs.len(),
        "all went out through the fallback"
    );
    assert_eq!(
        app.stub.requests().len(),
        primary_calls,
        "the primary was called again while its circuit was open"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn schools_without_a_provider_use_the_default_and_unknown_names_fail() {
    let (app, backup) = two_providers(&[]).await;
    app.sql(
        "INSERT INTO sms_school_settings (school_id, sms_enabled, country) VALUES (7, true, 'GB')",
    )
    .await;
    let plain = job("login_code", 7, "+447700900123", "Code 1234");
    app.publish(&plain).await;
    app.wait_for_status(id_of(&plain), "sent").await;
    assert_eq!(
        app.stub.requests().len(),
        1,
        "the default provider is 'primary'"
    );
    assert!(backup.requests().is_empty());

    // A name written after start-up fails its messages, replayably.
    app.sql("UPDATE sms_school_settings SET provider = 'nope' WHERE school_id = 7")
        .await;
    // A changed setting takes effect within a second.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let lost = job("login_code", 7, "+447700900124", "Code 1234");
    app.publish(&lost).await;
    let row = app.wait_for_status(id_of(&lost), "failed").await;
    assert_eq!(row.reason.as_deref(), Some("unknown_provider"));
    let dead = app.dead_letters(1).await;
    assert!(
        dead[0]
            .error
            .as_deref()
            .is_some_and(|e| e.contains("'nope'"))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unknown_provider_in_the_schools_settings_stops_the_start() {
    helpers::init_logs();
    let env = helpers::TestEnv::new().await;
    let stub = TwilioStub::start().await;
    helpers::migrate(&env.database_url).await;
    let db = helpers::Db::connect(&env.database_url).await;
    db.batch("INSERT INTO sms_school_settings (school_id, sms_enabled, provider) VALUES (3, true, 'vonage-eu')")
        .await;
    let vars = helpers::base_settings(&env, &stub, helpers::free_port());
    let settings =
        smsgw::config::Settings::from_lookup(|k| vars.get(k).cloned()).expect("settings");
    let result = tokio::time::timeout(
        Duration::from_secs(30),
        smsgw::daemon::run(settings, tokio_util::sync::CancellationToken::new()),
    )
    .await
    .expect("stops by itself");
    match result {
        Err(smsgw::daemon::DaemonError::Config(text)) => {
            assert!(text.contains("'vonage-eu' (schools 3)"), "{text}")
        }
        other => panic!("expected a configuration error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_text_over_its_segment_limit_fails_before_any_call() {
    let app = spawn_app_with(&[("SMSGW_MAX_SEGMENTS", "login_code:1")]).await;
    app.add_school(SCHOOL, "GB").await;
    let long_code = job("login_code", SCHOOL, "+447700900123", &"7".repeat(161));
    let emoji_code = job("login_code", SCHOOL, "+447700900124", &"👍".repeat(36));
    let long_reminder = job(
        "booking_reminder",
        SCHOOL,
        "+447700900125",
        &"a".repeat(161),
    );
    for job in [&long_code, &emoji_code, &long_reminder] {
        app.publish(job).await;
    }
    for job in [&long_code, &emoji_code] {
        let row = app.wait_for_status(id_of(job), "failed").await;
        assert_eq!(row.reason.as_deref(), Some("too_many_segments"));
    }
    app.wait_for_status(id_of(&long_reminder), "sent").await;
    let segments: Option<i32> = app
        .db
        .scalar(
            "SELECT segments FROM sms_messages WHERE id = $1",
            &[&id_of(&long_reminder)],
        )
        .await;
    assert_eq!(segments, Some(2));
    assert_eq!(app.stub.requests().len(), 1, "only the reminder was sent");
}

#[tokio::test(flavor = "multi_thread")]
async fn status_shows_support_the_record_masked() {
    let app = spawn_app_with(&[]).await;
    app.add_school(SCHOOL, "GB").await;
    let job = job(
        "booking_reminder",
        SCHOOL,
        "+447700900123",
        "Reminder for Sam",
    );
    app.publish(&job).await;
    app.wait_for_status(id_of(&job), "sent").await;
    let output = app.run_cli(&["status", &id_of(&job).to_string()]);
    assert_eq!(output.status.code(), Some(0));
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.contains("status     sent"), "{text}");
    assert!(text.contains("+44*******123"), "{text}");
    assert!(
        !text.contains("+447700900123") && !text.contains("Reminder for Sam"),
        "{text}"
    );
    assert!(text.contains("#1") && text.contains("HTTP 201"), "{text}");
    let revealed = String::from_utf8_lossy(
        &app.run_cli(&["status", &id_of(&job).to_string(), "--reveal"])
            .stdout,
    )
    .into_owned();
    assert!(revealed.contains("+447700900123") && revealed.contains("Reminder for Sam"));
    let missing = app.run_cli(&["status", &uuid::Uuid::new_v4().to_string()]);
    assert_eq!(missing.status.code(), Some(1));
}
