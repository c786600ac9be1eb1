//! The end-to-end pipeline against the real RabbitMQ and PostgreSQL, with Twilio at a
//! local stub that checks every request against Twilio's OpenAPI description.

mod helpers;

use std::time::{Duration, Instant};

use serde_json::json;
use time::{OffsetDateTime, format_description::well_known::Rfc3339};
use uuid::Uuid;

use helpers::{Reply, id_of, job, spawn_app, spawn_app_with, twilio_stub};

const SCHOOL: i64 = 42;

#[tokio::test(flavor = "multi_thread")]
async fn every_job_type_is_sent_once_with_the_right_request() {
    let app = spawn_app().await;
    app.add_school(SCHOOL, "GB").await;
    let types = [
        "booking_confirmation",
        "booking_reminder",
        "booking_change",
        "booking_cancellation",
        "announcement",
        "login_code",
    ];
    let mut jobs = Vec::new();
    for (i, kind) in types.iter().enumerate() {
        let to = format!("+4477009001{i:02}");
        let job = job(kind, SCHOOL, &to, &format!("Hello from {kind} ✓"));
        app.publish(&job).await;
        jobs.push((job, to));
    }

    for (job, to) in &jobs {
        let row = app.wait_for_status(id_of(job), "sent").await;
        let requests = app.stub.requests_to(to);
        assert_eq!(requests.len(), 1, "one call for {}", job["type"]);
        let request = &requests[0];
        assert_eq!(request.get("From"), Some(twilio_stub::DEFAULT_FROM));
        assert_eq!(request.get("Body"), job["body"].as_str());
        assert_eq!(
            request.get("StatusCallback"),
            None,
            "no public URL configured"
        );
        assert!(
            row.provider_message_id
                .as_deref()
                .is_some_and(|sid| sid.starts_with("SM"))
        );
        assert_eq!(row.attempts, 1);
        let attempts = app.attempts(id_of(job)).await;
        assert_eq!(attempts.len(), 1);
        assert_eq!(attempts[0].outcome.as_deref(), Some("sent"));
        assert_eq!(attempts[0].http_status, Some(201));
        assert!(attempts[0].duration_ms.is_some());
    }
    app.stub.assert_no_violations();
}

#[tokio::test(flavor = "multi_thread")]
async fn national_numbers_are_read_with_the_school_country() {
    let app = spawn_app().await;
    app.add_school(SCHOOL, "GB").await;
    app.add_school(7, "US").await;
    let uk = job("booking_reminder", SCHOOL, "07700 900456", "See you at 10");
    let us = job("booking_reminder", 7, "(201) 555-0123", "See you at 10");
    app.publish(&uk).await;
    app.publish(&us).await;

    assert_eq!(
        app.wait_for_status(id_of(&uk), "sent").await.recipient,
        "+447700900456"
    );
    assert_eq!(
        app.wait_for_status(id_of(&us), "sent").await.recipient,
        "+12015550123"
    );
    assert_eq!(app.stub.requests_to("+447700900456").len(), 1);
    assert_eq!(app.stub.requests_to("+12015550123").len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn each_suppression_reason_is_recorded_without_a_provider_call() {
    let app = spawn_app().await;
    app.add_school(1, "GB").await;
    app.sql(
        "INSERT INTO sms_school_settings (school_id, sms_enabled, country) VALUES (2, false, 'GB')",
    )
    .await;
    app.sql("INSERT INTO sms_school_settings (school_id, sms_enabled, country, allow_reminders) VALUES (3, true, 'GB', false)")
        .await;
    app.sql(
        "INSERT INTO sms_opt_outs (school_id, phone, source) VALUES (1, '+447700900222', 'web')",
    )
    .await;
    app.sql(
        "INSERT INTO sms_opt_outs (school_id, phone, source) VALUES (NULL, '+447700900333', 'web')",
    )
    .await;

    let cases = [
        (
            job("booking_reminder", 99, "+447700900111", "x"),
            "no_school_settings",
        ),
        (
            job("booking_reminder", 2, "+447700900111", "x"),
            "school_disabled",
        ),
        (
            job("booking_reminder", 3, "+447700900111", "x"),
            "type_not_allowed",
        ),
        (
            job("booking_reminder", 1, "+447700900222", "x"),
            "opted_out",
        ),
        (job("booking_reminder", 1, "07700 900333", "x"), "opted_out"),
    ];
    for (job, _) in &cases {
        app.publish(job).await;
    }
    for (job, reason) in &cases {
        let row = app.wait_for_status(id_of(job), "suppressed").await;
        assert_eq!(row.reason.as_deref(), Some(*reason));
        assert!(app.attempts(id_of(job)).await.is_empty());
    }
    // Type allowed for the same school: still sent, proving the suppressions were targeted.
    let allowed = job("booking_change", 3, "+447700900111", "moved to 11:00");
    app.publish(&allowed).await;
    app.wait_for_status(id_of(&allowed), "sent").await;
    assert_eq!(app.stub.requests().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_expired_job_is_never_sent() {
    let app = spawn_app().await;
    app.add_school(SCHOOL, "GB").await;
    let mut expired = job("login_code", SCHOOL, "+447700900123", "Code 1234");
    expired["expires_at"] = json!("2020-01-01T00:00:00Z");
    app.publish(&expired).await;
    let row = app.wait_for_status(id_of(&expired), "expired").await;
    assert!(row.reason.is_some());
    assert!(app.stub.requests().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn not_before_in_the_future_delays_the_send() {
    let app = spawn_app().await;
    app.add_school(SCHOOL, "GB").await;
    let published = Instant::now();
    let due = OffsetDateTime::now_utc() + time::Duration::milliseconds(3000);
    let mut later = job(
        "booking_reminder",
        SCHOOL,
        "+447700900123",
        "Tomorrow 10:00",
    );
    later["not_before"] = json!(due.format(&Rfc3339).expect("format"));
    app.publish(&later).await;

    let queued = app.wait_for_status(id_of(&later), "queued").await;
    assert_eq!(queued.reason.as_deref(), Some("not_before"));
    app.wait_for_status(id_of(&later), "sent").await;
    let request = &app.stub.requests_to("+447700900123")[0];
    assert!(
        request.at.duration_since(published) >= Duration::from_millis(2900),
        "sent {:?} after publishing, before not_before",
        request.at.duration_since(published)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_school_sender_id_overrides_the_default_sender() {
    let app = spawn_app().await;
    app.sql("INSERT INTO sms_school_settings (school_id, sms_enabled, country, sender_id) VALUES (5, true, 'GB', 'DriveSafe')")
        .await;
    app.sql("INSERT INTO sms_school_settings (school_id, sms_enabled, country, sender_id) VALUES (6, true, 'GB', 'Not a valid sender')")
        .await;
    let own = job("booking_confirmation", 5, "+447700900123", "Booked");
    let broken = job("booking_confirmation", 6, "+447700900124", "Booked");
    app.publish(&own).await;
    app.publish(&broken).await;

    app.wait_for_status(id_of(&own), "sent").await;
    assert_eq!(
        app.stub.requests_to("+447700900123")[0].get("From"),
        Some("DriveSafe")
    );

    let row = app.wait_for_status(id_of(&broken), "failed").await;
    assert_eq!(row.reason.as_deref(), Some("invalid_sender_id"));
    let dead = app.dead_letters(1).await;
    assert_eq!(dead[0].reason.as_deref(), Some("permanent_failure"));
    assert!(app.stub.requests_to("+447700900124").is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_impossible_number_fails_permanently_without_a_call() {
    let app = spawn_app().await;
    app.add_school(SCHOOL, "GB").await;
    let bad = job("login_code", SCHOOL, "+44 12", "Code 1234");
    app.publish(&bad).await;
    let row = app.wait_for_status(id_of(&bad), "failed").await;
    assert_eq!(row.reason.as_deref(), Some("invalid_number"));
    let dead = app.dead_letters(1).await;
    assert_eq!(dead[0].reason.as_deref(), Some("permanent_failure"));
    assert!(
        dead[0]
            .error
            .as_deref()
            .is_some_and(|e| e.contains("invalid recipient"))
    );
    assert!(app.stub.requests().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_jobs_are_dead_lettered_while_later_jobs_still_flow() {
    let app = spawn_app().await;
    app.add_school(SCHOOL, "GB").await;
    let valid = || job("booking_reminder", SCHOOL, "+447700900123", "ok");
    let mut missing_to = valid();
    missing_to.as_object_mut().map(|o| o.remove("to"));
    let mut wrong_type = valid();
    wrong_type["school_id"] = json!("forty-two");
    let mut bad_id = valid();
    bad_id["id"] = json!("not-a-uuid");
    let mut empty_body = valid();
    empty_body["body"] = json!("");
    let mut long_body = valid();
    long_body["body"] = json!("x".repeat(1601));
    let mut big_context = valid();
    big_context["context"] = json!({"notes": "y".repeat(3000)});
    let mut absurd_school = valid();
    absurd_school["school_id"] = json!(1e300);
    let mut unknown_type = valid();
    unknown_type["type"] = json!("fax");
    // PostgreSQL cannot store U+0000: the log could never record this message.
    let mut nul_in_to = valid();
    nul_in_to["to"] = json!("+4477009\u{0}00123");
    let mut nul_in_context = valid();
    nul_in_context["context"] = json!({"note": "a\u{0}b"});

    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("booking_reminder", b"this is not json".to_vec(), "not JSON"),
        (
            "booking_reminder",
            b"[1, 2, 3]".to_vec(),
            "not a JSON object",
        ),
        (
            "booking_reminder",
            missing_to.to_string().into_bytes(),
            "to: missing",
        ),
        (
            "booking_reminder",
            wrong_type.to_string().into_bytes(),
            "school_id: expected",
        ),
        (
            "booking_reminder",
            bad_id.to_string().into_bytes(),
            "id: not a UUID",
        ),
        (
            "booking_reminder",
            empty_body.to_string().into_bytes(),
            "body: empty",
        ),
        (
            "booking_reminder",
            long_body.to_string().into_bytes(),
            "body: 1601 characters",
        ),
        (
            "booking_reminder",
            big_context.to_string().into_bytes(),
            "context:",
        ),
        (
            "booking_reminder",
            absurd_school.to_string().into_bytes(),
            "school_id",
        ),
        (
            "fax",
            unknown_type.to_string().into_bytes(),
            "type: unknown type 'fax'",
        ),
        (
            "booking_reminder",
            vec![0xff, 0xfe, b'{', 0x80],
            "not UTF-8",
        ),
        (
            "booking_reminder",
            nul_in_to.to_string().into_bytes(),
            "to: contains a NUL character",
        ),
        (
            "booking_reminder",
            nul_in_context.to_string().into_bytes(),
            "context: contains a NUL character",
        ),
    ];
    for (key, body, _) in &cases {
        app.publish_raw(key, &Uuid::new_v4().to_string(), body)
            .await;
    }
    let after = valid();
    app.publish(&after).await;

    app.wait_for_status(id_of(&after), "sent").await;
    let dead = app.dead_letters(cases.len()).await;
    for (_, body, expected) in &cases {
        let letter = dead
            .iter()
            .find(|d| &d.body == body)
            .unwrap_or_else(|| panic!("no dead letter for the case '{expected}'"));
        assert_eq!(letter.reason.as_deref(), Some("invalid_job"));
        let error = letter.error.as_deref().unwrap_or_default();
        assert!(
            error.contains(expected),
            "'{error}' should say '{expected}'"
        );
        assert_eq!(letter.attempts, Some(0));
    }
    assert_eq!(app.stub.requests().len(), 1);
}

/// `n` with thousands separators, as smsgw writes sizes.
fn grouped(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_over_the_size_limit_is_dead_lettered_unread_with_its_size() {
    let app = spawn_app_with(&[("SMSGW_MAX_JOB_BYTES", "65536")]).await;
    app.add_school(SCHOOL, "GB").await;
    let mut big = job("login_code", SCHOOL, "+447700900123", "Code 1234");
    big["padding"] = json!("x".repeat(70_000));
    let body = big.to_string().into_bytes();
    app.publish_raw("login_code", &id_of(&big).to_string(), &body)
        .await;
    let after = job("login_code", SCHOOL, "+447700900124", "Code 5678");
    app.publish(&after).await;

    app.wait_for_status(id_of(&after), "sent").await;
    let dead = app.dead_letters(1).await;
    assert_eq!(dead[0].reason.as_deref(), Some("invalid_job"));
    assert_eq!(dead[0].body, body, "body unchanged");
    let expected = format!(
        "job: {} bytes, more than SMSGW_MAX_JOB_BYTES (65,536)",
        grouped(body.len())
    );
    assert_eq!(dead[0].error.as_deref(), Some(expected.as_str()));
    assert!(app.message(id_of(&big)).await.is_none(), "never decoded");
    assert_eq!(app.stub.requests_to("+447700900123").len(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_the_database_refuses_as_data_is_dead_lettered_not_held() {
    let app = spawn_app().await;
    app.add_school(SCHOOL, "GB").await;
    // Data PostgreSQL will not store, whatever the reason: a data exception (class 22).
    app.sql(
        "CREATE FUNCTION refuse_poison() RETURNS trigger AS $$
         BEGIN
             IF NEW.body = 'Poison' THEN
                 RAISE EXCEPTION 'this value cannot be stored' USING ERRCODE = '22023';
             END IF;
             RETURN NEW;
         END $$ LANGUAGE plpgsql",
    )
    .await;
    app.sql(
        "CREATE TRIGGER refuse_poison BEFORE INSERT OR UPDATE ON sms_messages
         FOR EACH ROW EXECUTE FUNCTION refuse_poison()",
    )
    .await;
    let poison = job("booking_reminder", SCHOOL, "+447700900123", "Poison");
    let fine = job("booking_reminder", SCHOOL, "+447700900124", "Fine");
    app.publish(&poison).await;
    app.publish(&fine).await;

    app.wait_for_status(id_of(&fine), "sent").await;
    let dead = app.dead_letters(1).await;
    assert_eq!(dead[0].reason.as_deref(), Some("invalid_job"));
    let error = dead[0].error.as_deref().unwrap_or_default();
    assert!(
        error.contains("the database refused the message's data")
            && error.contains("this value cannot be stored"),
        "{error}"
    );
    assert!(app.message(id_of(&poison)).await.is_none());
    assert_eq!(
        app.stub.requests().len(),
        1,
        "the refused one was never sent"
    );
    let ready = reqwest::get(format!("{}/readyz", app.http_url))
        .await
        .expect("readyz");
    assert_eq!(
        ready.status(),
        200,
        "one refused message is no database outage"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn temporary_failures_are_retried_until_sent() {
    let app = spawn_app().await;
    app.add_school(SCHOOL, "GB").await;
    app.stub.script([
        Reply::error(500, 20500, "Internal Server Error"),
        Reply::Raw {
            status: 503,
            body: "<html><body>Service Unavailable</body></html>".into(),
        },
    ]);
    let job = job("booking_change", SCHOOL, "+447700900123", "Moved to 11:00");
    app.publish(&job).await;

    let row = app.wait_for_status(id_of(&job), "sent").await;
    assert_eq!(row.attempts, 3);
    let attempts = app.attempts(id_of(&job)).await;
    let outcomes: Vec<_> = attempts.iter().map(|a| a.outcome.as_deref()).collect();
    assert_eq!(
        outcomes,
        [
            Some("temporary_failure"),
            Some("temporary_failure"),
            Some("sent")
        ]
    );
    assert_eq!(attempts[0].http_status, Some(500));
    assert_eq!(attempts[0].error_code.as_deref(), Some("20500"));
    assert_eq!(attempts[1].http_status, Some(503));
    assert_eq!(app.stub.requests().len(), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn throttling_waits_as_long_as_retry_after_asks() {
    let app = spawn_app().await;
    app.add_school(SCHOOL, "GB").await;
    app.stub.script([Reply::Error {
        status: 429,
        code: 20429,
        message: "Too Many Requests".into(),
        retry_after: Some("2".into()),
    }]);
    let job = job("login_code", SCHOOL, "+447700900123", "Code 1234");
    app.publish(&job).await;

    app.wait_for_status(id_of(&job), "sent").await;
    let requests = app.stub.requests();
    assert_eq!(requests.len(), 2);
    let waited = requests[1].at.duration_since(requests[0].at);
    // The longest retry tier is 400ms: honouring 2s means waiting in it more than once.
    assert!(waited >= Duration::from_secs(2), "retried after {waited:?}");
    let attempts = app.attempts(id_of(&job)).await;
    assert_eq!(attempts[0].http_status, Some(429));
    assert_eq!(attempts[0].error_code.as_deref(), Some("20429"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rejected_number_is_dead_lettered_after_one_call() {
    let app = spawn_app().await;
    app.add_school(SCHOOL, "GB").await;
    app.stub.reply_for(
        "+447700900123",
        Reply::error(400, 21211, "Invalid 'To' Phone Number: +447700900123"),
    );
    let job = job("booking_reminder", SCHOOL, "+447700900123", "Reminder");
    app.publish(&job).await;

    let row = app.wait_for_status(id_of(&job), "failed").await;
    assert_eq!(row.reason.as_deref(), Some("permanent_failure"));
    let attempts = app.attempts(id_of(&job)).await;
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0].outcome.as_deref(), Some("permanent_failure"));
    assert_eq!(attempts[0].error_code.as_deref(), Some("21211"));
    assert_eq!(attempts[0].http_status, Some(400));
    let dead = app.dead_letters(1).await;
    assert_eq!(dead[0].reason.as_deref(), Some("permanent_failure"));
    assert_eq!(dead[0].attempts, Some(1));
    assert_eq!(dead[0].body, job.to_string().into_bytes(), "body unchanged");
    assert!(
        dead[0]
            .error
            .as_deref()
            .is_some_and(|e| e.contains("21211"))
    );
    assert_eq!(app.stub.requests().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_carrier_stop_records_an_opt_out_and_is_not_tried_again() {
    let app = spawn_app().await;
    app.add_school(SCHOOL, "GB").await;
    app.stub.reply_for(
        "+447700900123",
        Reply::error(400, 21610, "Attempt to send to unsubscribed recipient"),
    );
    let first = job("booking_reminder", SCHOOL, "+447700900123", "Reminder");
    app.publish(&first).await;
    let row = app.wait_for_status(id_of(&first), "failed").await;
    assert_eq!(row.reason.as_deref(), Some("recipient_opted_out"));
    let dead = app.dead_letters(1).await;
    assert_eq!(dead[0].reason.as_deref(), Some("permanent_failure"));

    let source: Option<String> = app
        .db
        .optional(
            "SELECT source FROM sms_opt_outs WHERE phone = '+447700900123' AND school_id = $1",
            &[&SCHOOL],
        )
        .await;
    assert_eq!(source.as_deref(), Some("provider"));

    let second = job(
        "booking_reminder",
        SCHOOL,
        "+447700900123",
        "Another reminder",
    );
    app.publish(&second).await;
    let row = app.wait_for_status(id_of(&second), "suppressed").await;
    assert_eq!(row.reason.as_deref(), Some("opted_out"));
    assert_eq!(app.stub.requests().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_always_failing_provider_is_given_up_after_max_attempts() {
    let app = spawn_app_with(&[("SMSGW_MAX_ATTEMPTS", "3")]).await;
    app.add_school(SCHOOL, "GB").await;
    app.stub
        .reply_always(Reply::error(503, 20503, "Service Unavailable"));
    let job = job("booking_confirmation", SCHOOL, "+447700900123", "Booked");
    app.publish(&job).await;

    let row = app.wait_for_status(id_of(&job), "failed").await;
    assert_eq!(row.reason.as_deref(), Some("attempts_exhausted"));
    let dead = app.dead_letters(1).await;
    assert_eq!(dead[0].reason.as_deref(), Some("attempts_exhausted"));
    assert_eq!(dead[0].attempts, Some(3));
    assert_eq!(app.attempts(id_of(&job)).await.len(), 3);
    assert_eq!(app.stub.requests().len(), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn garbage_from_the_provider_is_recorded_and_retried() {
    let app = spawn_app().await;
    app.add_school(SCHOOL, "GB").await;
    app.stub.script([
        Reply::Raw {
            status: 200,
            body: "<html>Welcome to the hotel wifi</html>".into(),
        },
        Reply::Raw {
            status: 201,
            body: "{\"sid\": \"SMabc".into(),
        },
    ]);
    let job = job("booking_reminder", SCHOOL, "+447700900123", "Reminder");
    app.publish(&job).await;

    app.wait_for_status(id_of(&job), "sent").await;
    let attempts = app.attempts(id_of(&job)).await;
    assert_eq!(attempts.len(), 3);
    assert_eq!(attempts[0].outcome.as_deref(), Some("temporary_failure"));
    assert_eq!(attempts[0].http_status, Some(200));
    assert!(
        attempts[0]
            .error_message
            .as_deref()
            .is_some_and(|m| m.contains("no message sid"))
    );
    assert_eq!(attempts[1].http_status, Some(201));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_provider_error_with_a_nul_character_is_still_recorded() {
    // PostgreSQL's text cannot hold U+0000: stored as it came, the outcome could never be
    // written and the message would be held for ever.
    let app = spawn_app().await;
    app.add_school(SCHOOL, "GB").await;
    app.stub.script([Reply::Raw {
        status: 400,
        body: r#"{"code": 21211, "message": "Invalid \u0000 'To' number", "status": 400}"#.into(),
    }]);
    let job = job("booking_reminder", SCHOOL, "+447700900123", "Reminder");
    app.publish(&job).await;

    let row = app.wait_for_status(id_of(&job), "failed").await;
    assert_eq!(row.attempts, 1);
    let attempts = app.attempts(id_of(&job)).await;
    assert_eq!(attempts[0].outcome.as_deref(), Some("permanent_failure"));
    let message = attempts[0].error_message.as_deref().unwrap_or_default();
    assert!(
        message.contains("Invalid \u{fffd} 'To' number"),
        "{message}"
    );
    let dead = app.dead_letters(1).await;
    assert_eq!(dead[0].reason.as_deref(), Some("permanent_failure"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hanging_provider_times_out_and_is_retried() {
    let app = spawn_app_with(&[("SMSGW_PROVIDER_TIMEOUT", "300ms")]).await;
    app.add_school(SCHOOL, "GB").await;
    app.stub.script([Reply::Hang(Duration::from_secs(3))]);
    let job = job("login_code", SCHOOL, "+447700900123", "Code 1234");
    app.publish(&job).await;

    app.wait_for_status(id_of(&job), "sent").await;
    let attempts = app.attempts(id_of(&job)).await;
    assert_eq!(attempts[0].outcome.as_deref(), Some("temporary_failure"));
    assert!(
        attempts[0]
            .error_message
            .as_deref()
            .is_some_and(|m| m.contains("no answer"))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_same_job_published_twice_is_sent_once() {
    let app = spawn_app().await;
    app.add_school(SCHOOL, "GB").await;
    let job = job("login_code", SCHOOL, "+447700900123", "Code 1234");
    // Concurrently, then again after it was sent.
    app.publish(&job).await;
    app.publish(&job).await;
    app.wait_for_status(id_of(&job), "sent").await;
    app.publish(&job).await;
    let marker = helpers::job("login_code", SCHOOL, "+447700900999", "marker");
    app.publish(&marker).await;
    app.wait_for_status(id_of(&marker), "sent").await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    assert_eq!(app.stub.requests_to("+447700900123").len(), 1);
    assert_eq!(app.attempts(id_of(&job)).await.len(), 1);
    assert_eq!(
        app.queue_depth("sms.urgent").await,
        0,
        "duplicates are acked"
    );
}

/// Headers a publisher to `sms.jobs` could set to pass for a message smsgw has seen before:
/// its last attempt spent, a retry not due for an hour, back from a tier.
fn forged_history() -> lapin::types::FieldTable {
    use lapin::types::AMQPValue;
    let in_an_hour =
        (OffsetDateTime::now_utc() + Duration::from_secs(3600)).unix_timestamp() * 1000;
    let mut headers = lapin::types::FieldTable::default();
    headers.insert("x-smsgw-attempts".into(), AMQPValue::LongLongInt(6));
    headers.insert(
        "x-smsgw-retry-at".into(),
        AMQPValue::LongLongInt(in_an_hour),
    );
    headers.insert("x-smsgw-requeued".into(), AMQPValue::Boolean(true));
    headers.insert(
        "x-smsgw-replayed-at".into(),
        AMQPValue::LongLongInt(in_an_hour),
    );
    headers
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fresh_publish_with_smsgws_own_headers_is_still_a_fresh_job() {
    let app = spawn_app().await;
    app.add_school(SCHOOL, "GB").await;
    let job = job("login_code", SCHOOL, "+447700900123", "Code 1234");
    let id = id_of(&job).to_string();
    let body = job.to_string().into_bytes();
    app.publish_with_headers("login_code", &id, &body, forged_history())
        .await;

    let row = app.wait_for_status(id_of(&job), "sent").await;
    assert_eq!(row.attempts, 1, "attempts counted from 1");
    let attempts = app.attempts(id_of(&job)).await;
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0].attempt, 1);
    assert_eq!(app.stub.requests_to("+447700900123").len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_forged_replay_mark_does_not_send_a_failed_message_again() {
    let app = spawn_app().await;
    app.add_school(SCHOOL, "GB").await;
    app.stub.reply_for(
        "+447700900123",
        Reply::error(400, 21211, "Invalid 'To' Phone Number"),
    );
    let job = job("booking_reminder", SCHOOL, "+447700900123", "Reminder");
    app.publish(&job).await;
    app.wait_for_status(id_of(&job), "failed").await;
    app.dead_letters(1).await;

    // The provider would take it now; only a replay through smsgw may try it again.
    app.stub.reply_for("+447700900123", Reply::Created);
    let id = id_of(&job).to_string();
    let body = job.to_string().into_bytes();
    let mut replayed = lapin::types::FieldTable::default();
    replayed.insert(
        "x-smsgw-replayed-at".into(),
        lapin::types::AMQPValue::LongLongInt(0),
    );
    app.publish_with_headers("booking_reminder", &id, &body, replayed)
        .await;
    let marker = helpers::job("booking_reminder", SCHOOL, "+447700900999", "marker");
    app.publish(&marker).await;
    app.wait_for_status(id_of(&marker), "sent").await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    assert_eq!(app.stub.requests_to("+447700900123").len(), 1);
    let row = app.message(id_of(&job)).await.expect("row");
    assert_eq!(row.status, "failed");
    assert_eq!(app.queue_depth("sms.default").await, 0, "acked as done");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sent_message_delivered_again_after_an_opt_out_stays_sent() {
    let app = spawn_app().await;
    app.add_school(SCHOOL, "GB").await;
    let job = job("booking_reminder", SCHOOL, "+447700900123", "Reminder");
    app.publish(&job).await;
    app.wait_for_status(id_of(&job), "sent").await;
    app.sql(&format!(
        "INSERT INTO sms_opt_outs (school_id, phone, source) VALUES ({SCHOOL}, '+447700900123', 'web')"
    ))
    .await;
    // Once a new message to the number is suppressed, the opt-out is known everywhere.
    let probe = helpers::job("booking_reminder", SCHOOL, "+447700900123", "Probe");
    app.publish(&probe).await;
    app.wait_for_status(id_of(&probe), "suppressed").await;

    // The sent message comes again (a redelivery, or the web app publishing twice): its
    // row already holds the outcome, which the suppression must not overwrite.
    app.publish(&job).await;
    let marker = helpers::job("booking_reminder", SCHOOL, "+447700900999", "marker");
    app.publish(&marker).await;
    app.wait_for_status(id_of(&marker), "sent").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let row = app.message(id_of(&job)).await.expect("the message's row");
    assert_eq!(row.status, "sent");
    assert_eq!(row.reason, None);
    assert_eq!(app.attempts(id_of(&job)).await.len(), 1);
    assert_eq!(app.stub.requests_to("+447700900123").len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn staging_redirects_every_message_to_one_number() {
    let app = spawn_app_with(&[
        ("SMSGW_ENV", "staging"),
        ("SMSGW_REDIRECT_TO", "+447700900999"),
    ])
    .await;
    app.add_school(SCHOOL, "GB").await;
    let job = job("booking_reminder", SCHOOL, "+447700900123", "Reminder");
    app.publish(&job).await;

    let row = app.wait_for_status(id_of(&job), "sent").await;
    assert_eq!(
        row.recipient, "+447700900123",
        "the log keeps the real recipient"
    );
    let requests = app.stub.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].get("To"), Some("+447700900999"));
}

#[tokio::test(flavor = "multi_thread")]
async fn status_callbacks_and_validity_follow_the_job() {
    let app = spawn_app_with(&[("SMSGW_PUBLIC_URL", "https://smsgw.example.com/")]).await;
    app.add_school(SCHOOL, "GB").await;
    let mut code = job("login_code", SCHOOL, "+447700900123", "Code 1234");
    let expiry = OffsetDateTime::now_utc() + time::Duration::minutes(10);
    code["expires_at"] = json!(expiry.format(&Rfc3339).expect("format"));
    app.publish(&code).await;

    app.wait_for_status(id_of(&code), "sent").await;
    let request = &app.stub.requests()[0];
    assert_eq!(
        request.get("StatusCallback"),
        Some("https://smsgw.example.com/webhooks/twilio/status")
    );
    let validity: u64 = request
        .get("ValidityPeriod")
        .and_then(|v| v.parse().ok())
        .expect("a validity period");
    assert!((590..=600).contains(&validity), "{validity}");
    app.stub.assert_no_violations();
}

#[tokio::test(flavor = "multi_thread")]
async fn an_announcement_fans_out_once_per_recipient() {
    let app = spawn_app().await;
    app.add_school(SCHOOL, "GB").await;
    let bulk = json!({
        "id": Uuid::new_v4(),
        "type": "announcement",
        "school_id": SCHOOL,
        "recipients": [
            {"to": "+447700900001", "ref": "user-1"},
            {"to": "07700 900002", "ref": "user-2"},
            {"to": "+447700900002", "ref": "user-2-again"},
            {"to": "+447700900003"}
        ],
        "body": "The office is closed on Friday."
    });
    app.publish(&bulk).await;
    // A redelivered (or republished) announcement must not text anyone twice.
    app.publish(&bulk).await;

    let bulk_id = id_of(&bulk);
    for to in ["+447700900001", "+447700900002", "+447700900003"] {
        let id = Uuid::new_v5(&bulk_id, to.as_bytes());
        let row = app.wait_for_status(id, "sent").await;
        assert_eq!(row.bulk_id, Some(bulk_id));
    }
    let first = app
        .message(Uuid::new_v5(&bulk_id, b"+447700900001"))
        .await
        .expect("row");
    assert_eq!(first.context, Some(json!({"ref": "user-1"})));
    tokio::time::sleep(Duration::from_millis(500)).await;
    for to in ["+447700900001", "+447700900002", "+447700900003"] {
        assert_eq!(app.stub.requests_to(to).len(), 1, "{to}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn readiness_reports_broker_consumers_and_database() {
    let mut app = spawn_app().await;
    let response = reqwest::get(format!("{}/readyz", app.http_url))
        .await
        .expect("readyz");
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.expect("json");
    assert_eq!(body["consumers"], 3);
    let live = reqwest::get(format!("{}/healthz", app.http_url))
        .await
        .expect("healthz");
    assert_eq!(live.status(), 200);
    app.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_delivered_past_the_delivery_limit_lands_in_sms_dead() {
    let mut app = spawn_app_with(&[("SMSGW_DELIVERY_LIMIT", "3")]).await;
    app.stop().await.expect("clean stop");
    // With the daemon gone, play a consumer that dies on this message every time.
    let job = job("login_code", SCHOOL, "+447700900123", "Code 1234");
    app.publish(&job).await;
    let returned = app.redeliver_until_gone("sms.urgent").await;
    assert_eq!(
        returned, 4,
        "delivered limit + 1 times before the broker gave up"
    );

    let dead = app.dead_letters(1).await;
    assert_eq!(dead[0].body, job.to_string().into_bytes());
    assert_eq!(
        dead[0].message_id.as_deref(),
        Some(id_of(&job).to_string().as_str())
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unanswered_call_the_provider_took_is_adopted_not_sent_again() {
    let app = spawn_app_with(&[("SMSGW_PROVIDER_TIMEOUT", "300ms")]).await;
    app.add_school(SCHOOL, "GB").await;
    app.stub
        .script([Reply::TakeThenHang(Duration::from_secs(2))]);
    let job = job("login_code", SCHOOL, "+447700900123", "Code 1234");
    app.publish(&job).await;

    let row = app.wait_for_status(id_of(&job), "sent").await;
    assert_eq!(app.stub.taken_to("+447700900123"), 1, "texted once");
    assert!(app.stub.lookups() >= 1, "asked Twilio before sending again");
    let attempts = app.attempts(id_of(&job)).await;
    assert_eq!(attempts.len(), 1, "no second call");
    assert_eq!(attempts[0].outcome.as_deref(), Some("sent"));
    assert!(
        attempts[0]
            .error_message
            .as_deref()
            .is_some_and(|m| m.contains("reconciled"))
    );
    assert!(row.provider_message_id.is_some());
    app.stub.assert_no_violations();
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unanswered_call_the_provider_never_took_is_sent_again() {
    let app = spawn_app_with(&[("SMSGW_PROVIDER_TIMEOUT", "300ms")]).await;
    app.add_school(SCHOOL, "GB").await;
    app.stub.script([Reply::Hang(Duration::from_secs(2))]);
    let job = job("login_code", SCHOOL, "+447700900123", "Code 1234");
    app.publish(&job).await;

    app.wait_for_status(id_of(&job), "sent").await;
    assert_eq!(app.stub.taken_to("+447700900123"), 1);
    assert_eq!(app.stub.lookups(), 1);
    assert_eq!(app.attempts(id_of(&job)).await.len(), 2);
}

/// As in staging, where every message goes to one number: the lookup for an unanswered
/// call also finds an earlier message with the same text, which is another's.
#[tokio::test(flavor = "multi_thread")]
async fn a_lookup_never_adopts_a_message_recorded_for_another() {
    let app = spawn_app_with(&[("SMSGW_PROVIDER_TIMEOUT", "300ms")]).await;
    app.add_school(SCHOOL, "GB").await;
    let first = job("login_code", SCHOOL, "+447700900123", "Code 1234");
    app.publish(&first).await;
    let first = app.wait_for_status(id_of(&first), "sent").await;

    app.stub.script([Reply::Hang(Duration::from_secs(2))]);
    let second = job("login_code", SCHOOL, "+447700900123", "Code 1234");
    app.publish(&second).await;

    let second = app.wait_for_status(id_of(&second), "sent").await;
    assert!(app.stub.lookups() >= 1, "asked Twilio before sending again");
    assert_eq!(app.stub.taken_to("+447700900123"), 2, "sent again");
    assert!(second.provider_message_id.is_some());
    assert_ne!(second.provider_message_id, first.provider_message_id);
}

#[tokio::test(flavor = "multi_thread")]
async fn when_the_provider_cannot_be_asked_the_message_waits_instead_of_resending() {
    let app = spawn_app_with(&[("SMSGW_PROVIDER_TIMEOUT", "300ms")]).await;
    app.add_school(SCHOOL, "GB").await;
    app.stub
        .script([Reply::TakeThenHang(Duration::from_secs(2))]);
    app.stub
        .list_reply(Some(Reply::error(500, 20500, "List is down")));
    let job = job("login_code", SCHOOL, "+447700900123", "Code 1234");
    app.publish(&job).await;

    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while app.stub.lookups() < 3 {
        assert!(std::time::Instant::now() < deadline, "kept asking");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        app.stub.requests().len(),
        1,
        "no resend while the outcome is unknown"
    );
    app.stub.list_reply(None);
    app.wait_for_status(id_of(&job), "sent").await;
    assert_eq!(app.stub.taken_to("+447700900123"), 1);
}

/// A message whose last attempt's outcome is unknown, as a crash or timeout leaves it.
async fn unknown_outcome_row(app: &helpers::App, job: &serde_json::Value) {
    app.sql(&format!(
        "INSERT INTO sms_messages (id, school_id, type, recipient, body, status, provider, attempts,
                                   attempt_started_at, last_outcome_unknown)
         VALUES ('{}', {SCHOOL}, 'login_code', '+447700900123', 'Code 1234', 'retrying', 'log', 1,
                 now() - interval '1 minute', true)",
        id_of(job)
    ))
    .await;
    app.sql(&format!(
        "INSERT INTO sms_attempts (message_id, attempt, provider, started_at, outcome, outcome_unknown)
         VALUES ('{}', 1, 'log', now() - interval '1 minute', 'temporary_failure', true)",
        id_of(job)
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_lookup_an_unknown_outcome_is_resent_and_counted() {
    let app = spawn_app_with(&[("SMSGW_PROVIDER", "log")]).await;
    app.add_school(SCHOOL, "GB").await;
    let job = job("login_code", SCHOOL, "+447700900123", "Code 1234");
    unknown_outcome_row(&app, &job).await;
    app.publish(&job).await;
    app.wait_for_status(id_of(&job), "sent").await;
    let metrics = app.metrics().await;
    assert!(
        metrics.contains("smsgw_possible_duplicates_total 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_lookup_an_unknown_outcome_can_be_dead_lettered_instead() {
    let app = spawn_app_with(&[
        ("SMSGW_PROVIDER", "log"),
        ("SMSGW_UNKNOWN_OUTCOME", "dead_letter"),
    ])
    .await;
    app.add_school(SCHOOL, "GB").await;
    let job = job("login_code", SCHOOL, "+447700900123", "Code 1234");
    unknown_outcome_row(&app, &job).await;
    app.publish(&job).await;
    let row = app.wait_for_status(id_of(&job), "failed").await;
    assert_eq!(row.reason.as_deref(), Some("outcome_unknown"));
    let dead = app.dead_letters(1).await;
    assert!(
        dead[0]
            .error
            .as_deref()
            .is_some_and(|e| e.contains("unknown"))
    );
    assert_eq!(app.attempts(id_of(&job)).await.len(), 1, "no new attempt");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_provider_outage_pauses_traffic_instead_of_exhausting_every_job() {
    let app = spawn_app_with(&[
        ("SMSGW_MAX_ATTEMPTS", "3"),
        ("SMSGW_CIRCUIT_THRESHOLD", "3"),
        ("SMSGW_CIRCUIT_COOLDOWN", "1s"),
    ])
    .await;
    app.add_school(SCHOOL, "GB").await;
    app.stub
        .reply_always(Reply::error(503, 20503, "Service Unavailable"));
    let jobs: Vec<_> = (0..30)
        .map(|i| {
            job(
                "booking_reminder",
                SCHOOL,
                &format!("+4477009005{i:02}"),
                "Reminder",
            )
        })
        .collect();
    for job in &jobs {
        app.publish(job).await;
    }
    // The outage lasts long enough to exhaust every job three times over without a circuit.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let during = app.stub.requests().len();
    let metrics = app.metrics().await;
    // The series starts at 0: messages were put off only if it grew.
    let paused = metrics
        .lines()
        .find_map(|l| l.strip_prefix(r#"smsgw_paused_total{provider="twilio"} "#))
        .and_then(|n| n.parse::<u64>().ok());
    assert!(paused.is_some_and(|n| n > 0), "{metrics}");
    app.stub.reply_always(Reply::Created);

    for job in &jobs {
        app.wait_for_status(id_of(job), "sent").await;
    }
    assert!(
        during < 30 * 3,
        "{during} calls during the outage: the circuit did not pause"
    );
    assert_eq!(app.queue_depth("sms.dead").await, 0, "nothing exhausted");
    let metrics = app.metrics().await;
    assert!(
        metrics.contains(r#"smsgw_circuit_state{provider="twilio"} 0"#),
        "closed again: {metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_changed_setting_takes_effect_within_a_second() {
    let app = spawn_app().await;
    app.add_school(SCHOOL, "GB").await;
    let before = job("booking_reminder", SCHOOL, "+447700900123", "Reminder");
    app.publish(&before).await;
    app.wait_for_status(id_of(&before), "sent").await;

    app.sql(&format!(
        "UPDATE sms_school_settings SET sms_enabled = false WHERE school_id = {SCHOOL}"
    ))
    .await;
    let changed = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = job("booking_reminder", SCHOOL, "+447700900124", "Reminder");
    app.publish(&after).await;
    let row = app.wait_for_status(id_of(&after), "suppressed").await;
    assert_eq!(row.reason.as_deref(), Some("school_disabled"));
    assert!(changed.elapsed() < Duration::from_secs(10));

    // An opt-out counts at once, even before the cache hears of it.
    app.sql(&format!(
        "UPDATE sms_school_settings SET sms_enabled = true WHERE school_id = {SCHOOL}"
    ))
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    app.sql(
        "INSERT INTO sms_opt_outs (school_id, phone, source) VALUES (NULL, '+447700900125', 'web')",
    )
    .await;
    let opted = job("booking_reminder", SCHOOL, "+447700900125", "Reminder");
    app.publish(&opted).await;
    let row = app.wait_for_status(id_of(&opted), "suppressed").await;
    assert_eq!(row.reason.as_deref(), Some("opted_out"));
    assert!(app.stub.requests_to("+447700900125").is_empty());

    // And so does taking it back: no copy of the old opt-out outlives it.
    app.sql("DELETE FROM sms_opt_outs WHERE phone = '+447700900125'")
        .await;
    let resumed = job(
        "booking_reminder",
        SCHOOL,
        "+447700900125",
        "Reminder again",
    );
    app.publish(&resumed).await;
    app.wait_for_status(id_of(&resumed), "sent").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_login_codes_text_is_not_kept_once_it_has_an_outcome() {
    let app = spawn_app().await;
    app.add_school(SCHOOL, "GB").await;
    let sent = job("login_code", SCHOOL, "+447700900123", "Your code is 4711");
    let mut expired = job("login_code", SCHOOL, "+447700900124", "Your code is 4712");
    expired["expires_at"] = json!("2020-01-01T00:00:00Z");
    let reminder = job(
        "booking_reminder",
        SCHOOL,
        "+447700900125",
        "Lesson at 10:00",
    );
    for job in [&sent, &expired, &reminder] {
        app.publish(job).await;
    }
    app.wait_for_status(id_of(&sent), "sent").await;
    app.wait_for_status(id_of(&expired), "expired").await;
    app.wait_for_status(id_of(&reminder), "sent").await;

    let db = &app.db;
    let body = |id: Uuid| async move {
        db.optional::<Option<String>>("SELECT body FROM sms_messages WHERE id = $1", &[&id])
            .await
            .flatten()
    };
    assert_eq!(body(id_of(&sent)).await, None, "a sent code is not kept");
    assert_eq!(
        body(id_of(&expired)).await,
        None,
        "an expired code is not kept"
    );
    assert_eq!(
        body(id_of(&reminder)).await.as_deref(),
        Some("Lesson at 10:00"),
        "other texts are kept until the body retention"
    );
}
