//! The development inbox (contract section 10): the inbox provider's simulated outcomes,
//! the JSON API the web app's end-to-end tests read, the page in a real browser, and the
//! rules that keep it (and a provider's sandbox) out of production.

mod helpers;

use std::time::{Duration, Instant};

use serde_json::Value;
use uuid::Uuid;

use helpers::{
    App, PATIENCE, TwilioStub, browser, id_of, job, smsgw_command, spawn_app, spawn_app_with,
    twilio_provider_toml, write_config,
};

const SCHOOL: i64 = 42;

/// The daemon with the inbox, and a British school that may text the United States: the
/// magic numbers are American.
async fn inbox_app() -> App {
    let app = spawn_app_with(&[
        ("SMSGW_PROVIDER", "inbox"),
        ("SMSGW_ALLOWED_COUNTRIES", "US"),
    ])
    .await;
    app.add_school(SCHOOL, "GB").await;
    app
}

/// Publishes a job of `kind` to `to` for the test school; returns its id.
async fn send(app: &App, kind: &str, to: &str, body: &str) -> Uuid {
    let job = job(kind, SCHOOL, to, body);
    app.publish(&job).await;
    id_of(&job)
}

/// `GET /inbox/api/messages` with `query` exactly as written (not encoded again).
async fn api(app: &App, query: &str) -> Vec<Value> {
    let response = reqwest::get(format!("{}/inbox/api/messages{query}", app.http_url))
        .await
        .expect("the inbox answers");
    assert_eq!(response.status(), 200, "{query}");
    response.json().await.expect("a JSON array")
}

/// The API's item for message `id`, once it has `status`.
async fn wait_in_inbox(app: &App, id: Uuid, status: &str) -> Value {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let items = api(app, "?limit=1000").await;
        let item = items
            .into_iter()
            .find(|m| m["message_id"] == id.to_string());
        if let Some(item) = &item
            && item["status"] == status
        {
            return item.clone();
        }
        assert!(
            Instant::now() < deadline,
            "{id} never '{status}' in the inbox: {item:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn refused_magic_numbers_fail_for_good_with_twilios_codes() {
    let app = inbox_app().await;
    let cases = [
        ("+15005550001", "21211"),
        ("+15005550002", "21612"),
        ("+15005550003", "21408"),
        ("+15005550009", "21614"),
    ];
    let mut ids = Vec::new();
    for (to, _) in cases {
        ids.push(send(&app, "booking_change", to, "Your lesson moved to 11:00.").await);
    }
    for (id, (to, code)) in ids.iter().zip(cases) {
        let item = wait_in_inbox(&app, *id, "failed").await;
        assert_eq!(item["reason"], "permanent_failure", "{to}");
        assert_eq!(item["error_code"], code, "{to}");
        assert_eq!(item["to"], to);
        assert_eq!(app.attempts(*id).await.len(), 1, "{to}: never retried");
    }
    let letters = app.dead_letters(cases.len()).await;
    assert!(
        letters
            .iter()
            .all(|l| l.reason.as_deref() == Some("permanent_failure"))
    );
}

#[tokio::test]
async fn the_unsubscribed_number_records_an_opt_out_and_later_texts_are_suppressed() {
    let app = inbox_app().await;
    let blocked = "+15005550004";
    let first = send(&app, "booking_reminder", blocked, "Lesson tomorrow.").await;
    let item = wait_in_inbox(&app, first, "failed").await;
    assert_eq!(item["reason"], "recipient_opted_out");
    assert_eq!(item["error_code"], "21610");
    let opt_outs: i64 = app
        .db
        .scalar(
            "SELECT count(*) FROM sms_opt_outs
              WHERE phone = $1 AND school_id = $2 AND source = 'provider'",
            &[&blocked, &SCHOOL],
        )
        .await;
    assert_eq!(opt_outs, 1, "recorded as a real 21610 is");

    let second = send(&app, "booking_reminder", blocked, "Lesson on Friday.").await;
    let shown = wait_in_inbox(&app, second, "suppressed").await;
    assert_eq!(shown["reason"], "opted_out");
    assert_eq!(shown["body"], "Lesson on Friday.", "shown with its text");
}

#[tokio::test]
async fn a_suppressed_text_is_shown_with_its_reason() {
    let app = inbox_app().await;
    let unknown_school = job(
        "booking_confirmation",
        7,
        "+447700900123",
        "Booked: Monday.",
    );
    app.publish(&unknown_school).await;
    let item = wait_in_inbox(&app, id_of(&unknown_school), "suppressed").await;
    assert_eq!(item["reason"], "no_school_settings");
    assert_eq!(item["body"], "Booked: Monday.");
    assert_eq!(item["school_id"], 7);
}

#[tokio::test]
async fn the_outage_number_is_sent_on_its_third_attempt_through_the_retry_tiers() {
    let app = inbox_app().await;
    let id = send(&app, "login_code", "+15005550500", "Your code is 0500").await;
    let item = wait_in_inbox(&app, id, "delivered").await;
    assert_eq!(item["attempts"], 3);
    let outcomes: Vec<Option<String>> = app
        .attempts(id)
        .await
        .into_iter()
        .map(|a| a.outcome)
        .collect();
    let expected = ["temporary_failure", "temporary_failure", "sent"];
    assert_eq!(outcomes, expected.map(|o| Some(o.to_owned())));
}

#[tokio::test]
async fn an_ordinary_number_is_delivered_by_a_receipt_about_a_second_later() {
    let app = inbox_app().await;
    let id = send(
        &app,
        "booking_reminder",
        "+447700900123",
        "Lesson at 10:00.",
    )
    .await;
    let row = app.wait_for_status(id, "delivered").await;
    let receipts: i64 = app
        .db
        .scalar(
            "SELECT count(*) FROM sms_receipts
              WHERE provider = 'inbox' AND provider_message_id = $1 AND status = 'delivered'",
            &[&row.provider_message_id],
        )
        .await;
    assert_eq!(receipts, 1, "through the receipts' own path");
    let delay: f64 = app
        .db
        .scalar(
            "SELECT extract(epoch FROM delivered_at - sent_at)::float8
               FROM sms_messages WHERE id = $1",
            &[&id],
        )
        .await;
    assert!(
        (0.5..5.0).contains(&delay),
        "delivered {delay} s after sent"
    );
}

#[tokio::test]
async fn an_end_to_end_test_reads_a_login_code_with_one_get() {
    let app = inbox_app().await;
    let to = "+447700900456";
    let id = send(&app, "login_code", "07700 900456", "Your code is 4711").await;
    app.wait_for_status(id, "sent").await;
    // As a test would write it, unencoded: the `+` arrives as a space.
    let items = api(&app, &format!("?to={to}&limit=1")).await;
    assert_eq!(items.len(), 1, "{items:?}");
    let item = &items[0];
    assert_eq!(item["body"], "Your code is 4711");
    assert_eq!(
        (&item["to"], &item["job_id"]),
        (&Value::from(to), &Value::from(id.to_string()))
    );
    assert_eq!(
        (&item["encoding"], &item["segments"]),
        (&Value::from("GSM-7"), &Value::from(1))
    );
    assert_eq!(item["type"], "login_code");
    let logged: Option<String> = app
        .db
        .scalar("SELECT body FROM sms_messages WHERE id = $1", &[&id])
        .await;
    assert_eq!(
        logged, None,
        "the log itself still drops a login code's body"
    );
}

#[tokio::test]
async fn an_emoji_that_costs_segments_is_flagged() {
    let app = inbox_app().await;
    let body = format!(
        "{} See you there 👍",
        "Reminder: lesson tomorrow at 10:00. ".repeat(3)
    );
    let id = send(&app, "booking_reminder", "+447700900123", &body).await;
    let item = wait_in_inbox(&app, id, "delivered").await;
    assert_eq!(item["encoding"], "UCS-2");
    // 125 UTF-16 units: two segments of 67; without the emoji, 123 septets fit one.
    assert_eq!(item["segments"], 2);
    assert_eq!(
        item["encoding_warning"],
        "UCS-2 because of '👍': 2 segments instead of 1"
    );
}

#[tokio::test]
async fn filters_select_by_school_and_number_and_emptying_keeps_the_log() {
    let app = inbox_app().await;
    app.add_school(43, "GB").await;
    let a = send(&app, "booking_reminder", "+447700900001", "For one.").await;
    // In the log before the next is published, so that "newest first" has one answer.
    app.wait_for_status(a, "delivered").await;
    let b = send(&app, "booking_reminder", "+447700900002", "For two.").await;
    let other = job("booking_reminder", 43, "+447700900001", "Other school.");
    app.publish(&other).await;
    for id in [a, b, id_of(&other)] {
        app.wait_for_status(id, "delivered").await;
    }
    let ids = |items: Vec<Value>| -> Vec<String> {
        items
            .iter()
            .map(|m| m["message_id"].as_str().unwrap_or_default().to_owned())
            .collect()
    };
    assert_eq!(
        ids(api(&app, "?to=%2B447700900001&school_id=42").await),
        [a.to_string()]
    );
    assert_eq!(
        ids(api(&app, "?school_id=43").await),
        [id_of(&other).to_string()]
    );
    assert_eq!(api(&app, "?to=+447700900001").await.len(), 2);
    let newest_first = ids(api(&app, "?school_id=42").await);
    assert_eq!(newest_first, [b.to_string(), a.to_string()]);

    let client = reqwest::Client::new();
    let url = format!("{}/inbox/api/messages", app.http_url);
    let one = client
        .delete(format!("{url}?school_id=43"))
        .send()
        .await
        .expect("delete");
    assert_eq!(one.status(), 200);
    assert_eq!(api(&app, "").await.len(), 2, "only school 43's went");
    client.delete(&url).send().await.expect("delete all");
    assert!(api(&app, "").await.is_empty(), "the inbox is empty");
    let logged: i64 = app
        .db
        .scalar("SELECT count(*) FROM sms_messages", &[])
        .await;
    assert_eq!(logged, 3, "the message log keeps every row");

    let later = send(&app, "booking_reminder", "+447700900002", "After emptying.").await;
    wait_in_inbox(&app, later, "delivered").await;
    assert_eq!(api(&app, "").await.len(), 1, "new texts show again");
}

/// An inbox request with `Host: host`, as a browser sends it to a name rebound to us.
async fn with_host(app: &App, method: reqwest::Method, path: &str, host: &str) -> u16 {
    let response = reqwest::Client::new()
        .request(method, format!("{}{path}", app.http_url))
        .header(reqwest::header::HOST, host)
        .send()
        .await
        .expect("answers");
    response.status().as_u16()
}

#[tokio::test]
async fn a_request_for_another_host_name_is_refused_against_dns_rebinding() {
    let app = spawn_app_with(&[
        ("SMSGW_PROVIDER", "inbox"),
        ("SMSGW_INBOX_HOSTS", "smsgw.test"),
    ])
    .await;
    app.add_school(SCHOOL, "GB").await;
    let code = send(&app, "login_code", "+447700900001", "Your code is 4711").await;
    wait_in_inbox(&app, code, "delivered").await;
    let port = app.http_url.rsplit(':').next().expect("a port");
    let forged = format!("rebind.example:{port}");
    for path in ["/inbox", "/inbox/api/messages", "/inbox/api/replies"] {
        assert_eq!(
            with_host(&app, reqwest::Method::GET, path, &forged).await,
            421
        );
    }
    let delete = with_host(
        &app,
        reqwest::Method::DELETE,
        "/inbox/api/messages",
        &forged,
    );
    assert_eq!(delete.await, 421);
    assert_eq!(api(&app, "").await.len(), 1, "nothing was emptied");

    for host in [format!("localhost:{port}"), "smsgw.test".to_owned()] {
        let read = with_host(&app, reqwest::Method::GET, "/inbox/api/messages", &host);
        assert_eq!(read.await, 200, "{host}");
    }
    let health = with_host(&app, reqwest::Method::GET, "/healthz", &forged);
    assert_eq!(health.await, 200, "only the inbox is checked");
}

#[tokio::test]
async fn a_bad_filter_is_a_400() {
    let app = inbox_app().await;
    let response = reqwest::get(format!("{}/inbox/api/messages?school_id=x", app.http_url))
        .await
        .expect("answers");
    assert_eq!(response.status(), 400);
}

#[tokio::test]
async fn the_inbox_is_not_served_unless_its_provider_is_configured() {
    let app = spawn_app().await;
    for path in ["/inbox", "/inbox/api/messages"] {
        let response = reqwest::get(format!("{}{path}", app.http_url))
            .await
            .expect("answers");
        assert_eq!(response.status(), 404, "{path}");
    }
    let client = reqwest::Client::new();
    let delete = client
        .delete(format!("{}/inbox/api/messages", app.http_url))
        .send()
        .await
        .expect("answers");
    assert_eq!(delete.status(), 404);
}

use helpers::vars;

#[test]
fn production_refuses_the_inbox_with_exit_code_2() {
    let env = vars(&[("SMSGW_ENV", "production"), ("SMSGW_PROVIDER", "inbox")]);
    let output = smsgw_command(&env, &["run"]).output().expect("run");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("inbox provider"), "{stderr}");
}

#[tokio::test]
async fn production_refuses_a_sandbox_provider_with_exit_code_2() {
    let stub = TwilioStub::start().await;
    let sandbox = twilio_provider_toml("twilio", "+15005550006", &stub, "sandbox = true");
    let config = write_config("twilio", &[sandbox]);
    let env = vars(&[
        ("SMSGW_ENV", "production"),
        ("SMSGW_CONFIG", &config),
        ("SMSGW_PUBLIC_URL", "https://smsgw.example.com"),
        ("TEST_TWILIO_TOKEN", helpers::twilio_stub::AUTH_TOKEN),
    ]);
    let output = smsgw_command(&env, &["run"]).output().expect("run");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("sandbox provider"), "{stderr}");
}

#[tokio::test]
async fn the_page_shows_a_new_text_without_a_reload_and_a_script_as_text() {
    let Some(chromium) = browser::chromium() else {
        browser::skipped("the inbox page's browser test");
        return;
    };
    let app = inbox_app().await;
    let script = "<script>document.title='owned'</script><b>bold</b>";
    let first = send(&app, "booking_reminder", "+447700900123", script).await;
    app.wait_for_status(first, "delivered").await;

    let mut page = browser::Browser::open(&chromium, &format!("{}/inbox", app.http_url)).await;
    let shown = page.wait_for_text(script).await;
    assert!(shown.contains("booking_reminder"), "{shown}");
    let injected = page
        .eval("document.querySelectorAll('main script, main b').length")
        .await;
    assert_eq!(injected, 0, "the body is text, not markup");
    // Set on this page: a reload would lose it.
    page.eval("window.openedOnce = true").await;

    send(&app, "login_code", "+447700900999", "Your code is 8642").await;
    let shown = page.wait_for_text("Your code is 8642").await;
    assert!(
        shown.contains("+447700900999"),
        "in its own conversation: {shown}"
    );
    assert_eq!(
        page.eval("window.openedOnce === true").await,
        true,
        "no reload"
    );
    let title = page.eval("document.title").await;
    assert_eq!(title, "smsgw inbox (2)", "the script never ran");
}

/// `POST /inbox/api/replies`, as the page's reply box sends it.
async fn post_reply(app: &App, reply: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{}/inbox/api/replies", app.http_url))
        .json(reply)
        .send()
        .await
        .expect("the inbox answers")
}

#[tokio::test]
async fn a_reply_through_the_api_takes_the_webhooks_path() {
    let app = inbox_app().await;
    let to = "+447700900123";
    let reminder = send(&app, "booking_reminder", to, "Lesson at 10:00").await;
    app.wait_for_status(reminder, "delivered").await;
    let kept = post_reply(
        &app,
        &serde_json::json!({"from": to, "to": "", "body": "Running late"}),
    )
    .await;
    assert_eq!(kept.status(), 201);
    let listed: Vec<Value> = reqwest::get(format!("{}/inbox/api/replies?to={to}", app.http_url))
        .await
        .expect("replies")
        .json()
        .await
        .expect("a JSON array");
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["body"], "Running late");
    assert_eq!(listed[0]["in_reply_to"], reminder.to_string());
    assert_eq!(listed[0]["school_id"], SCHOOL);

    let stop = post_reply(&app, &serde_json::json!({"from": to, "body": "STOP"})).await;
    assert_eq!(
        stop.json::<Value>().await.expect("JSON")["keyword"],
        "opt_out"
    );
    let later = send(&app, "booking_reminder", to, "Another lesson").await;
    app.wait_for_status(later, "suppressed").await;

    for bad in [
        serde_json::json!({"from": "nobody", "body": "hi"}),
        serde_json::json!({"from": to, "body": ""}),
        serde_json::json!({"from": to}),
    ] {
        let refused = post_reply(&app, &bad).await;
        assert!(
            refused.status().is_client_error(),
            "{bad}: {}",
            refused.status()
        );
    }
    let emptied: Value = reqwest::Client::new()
        .delete(format!("{}/inbox/api/messages", app.http_url))
        .send()
        .await
        .expect("empty")
        .json()
        .await
        .expect("JSON");
    assert_eq!(emptied["replies"], 1, "{emptied}");
}

#[tokio::test]
async fn a_reply_typed_into_the_page_shows_in_its_conversation() {
    let Some(chromium) = browser::chromium() else {
        browser::skipped("the inbox page's reply box test");
        return;
    };
    let app = inbox_app().await;
    let to = "+447700900123";
    let reminder = send(&app, "booking_reminder", to, "Lesson at 10:00").await;
    app.wait_for_status(reminder, "delivered").await;

    let mut page = browser::Browser::open(&chromium, &format!("{}/inbox", app.http_url)).await;
    page.wait_for_text("Lesson at 10:00").await;
    // The text is in the page before its script runs; a box submitted before the script
    // took it would submit natively, and no reply would be posted.
    let deadline = Instant::now() + PATIENCE;
    while page.eval("document.readyState").await != "complete" {
        assert!(
            Instant::now() < deadline,
            "the inbox page never finished loading"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let typed = page
        .eval(
            "(function () { var form = document.querySelector('.reply-box'); \
             form.querySelector('input').value = 'Running 10 min late'; \
             form.requestSubmit(); return form.getAttribute('data-from'); })()",
        )
        .await;
    assert_eq!(typed, to, "the box answers as the conversation's number");
    let deadline = Instant::now() + PATIENCE;
    loop {
        let kept: i64 = app
            .db
            .scalar(
                "SELECT count(*) FROM sms_replies WHERE from_number = $1",
                &[&to],
            )
            .await;
        if kept > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the reply box posted no reply");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let shown = page.wait_for_text("Running 10 min late").await;
    assert!(shown.contains("reply from"), "{shown}");
    let bubbles = page
        .eval("document.querySelectorAll('.conversation .sms.reply').length")
        .await;
    assert_eq!(bubbles, 1);
    let kept: i64 = app
        .db
        .scalar(
            "SELECT count(*) FROM sms_replies WHERE from_number = $1 AND in_reply_to = $2",
            &[&to, &reminder],
        )
        .await;
    assert_eq!(kept, 1, "kept, and attributed to the reminder");
}
