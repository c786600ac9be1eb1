//! The right text, or none (interface section 15): smart encoding of GSM-7 look-alikes,
//! the sender each destination accepts, and the validity the carrier is given.

mod helpers;

use helpers::{App, id_of, job, spawn_app_with, vonage_stub};
use tokio_postgres::Row;

const SCHOOL: i64 = 42;
const STUDENT: &str = "+447700900123";

fn vonage_overrides(stub: &vonage_stub::VonageStub) -> Vec<(&'static str, String)> {
    vec![
        ("SMSGW_PROVIDER", "vonage".into()),
        ("VONAGE_API_KEY", vonage_stub::API_KEY.into()),
        ("VONAGE_API_SECRET", vonage_stub::API_SECRET.into()),
        ("VONAGE_FROM", "447700900000".into()),
        ("SMSGW_VONAGE_BASE_URL", stub.url.clone()),
    ]
}

async fn vonage_app(stub: &vonage_stub::VonageStub, extra: &[(&'static str, &str)]) -> App {
    let mut overrides = vonage_overrides(stub);
    overrides.extend(extra.iter().map(|(k, v)| (*k, (*v).to_owned())));
    let borrowed: Vec<(&str, &str)> = overrides.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let app = spawn_app_with(&borrowed).await;
    app.add_school(SCHOOL, "GB").await;
    app
}

/// Publishes a reminder with `body` and waits until it is sent; its log row.
async fn sent(app: &App, body: &str) -> Row {
    let job = job("booking_reminder", SCHOOL, STUDENT, body);
    app.publish(&job).await;
    let id = id_of(&job);
    app.wait_for_status(id, "sent").await;
    let rows = app
        .db
        .rows(
            "SELECT body, segments, encoding FROM sms_messages WHERE id = $1",
            &[&id],
        )
        .await;
    rows.into_iter().next().expect("a row")
}

#[tokio::test(flavor = "multi_thread")]
async fn look_alikes_are_replaced_and_vonage_gets_unicode_only_when_the_text_needs_it() {
    let vonage = vonage_stub::VonageStub::start().await;
    let app = vonage_app(&vonage, &[]).await;
    let reminder = format!("You’re booked – see you at 10… {}", "a".repeat(110));
    let emoji = "See you 👍 – Sam";

    let row = sent(&app, &reminder).await;
    let expected = format!("You're booked - see you at 10... {}", "a".repeat(110));
    assert_eq!(row.get::<_, Option<String>>("body"), Some(expected.clone()));
    assert_eq!(
        row.get::<_, Option<i32>>("segments"),
        Some(1),
        "not 3 as UCS-2"
    );
    assert_eq!(
        row.get::<_, Option<String>>("encoding").as_deref(),
        Some("GSM-7")
    );
    let row = sent(&app, emoji).await;
    assert_eq!(row.get::<_, Option<String>>("body").as_deref(), Some(emoji));
    assert_eq!(
        row.get::<_, Option<String>>("encoding").as_deref(),
        Some("UCS-2")
    );

    let requests = vonage.requests();
    assert_eq!(requests.len(), 2);
    let (gsm, unicode) = (&requests[0], &requests[1]);
    assert_eq!(gsm.get("text"), Some(expected.as_str()));
    assert_eq!(gsm.get("type"), Some("text"));
    assert_eq!(unicode.get("text"), Some(emoji), "sent exactly as written");
    assert_eq!(unicode.get("type"), Some("unicode"));
    vonage.assert_no_violations();
}

#[tokio::test(flavor = "multi_thread")]
async fn with_smart_encoding_off_the_text_goes_as_written() {
    let vonage = vonage_stub::VonageStub::start().await;
    let app = vonage_app(&vonage, &[("SMSGW_SMART_ENCODING", "off")]).await;
    let body = "You’re booked";
    let row = sent(&app, body).await;
    assert_eq!(
        row.get::<_, Option<String>>("encoding").as_deref(),
        Some("UCS-2")
    );
    let request = &vonage.requests()[0];
    assert_eq!(request.get("text"), Some(body));
    assert_eq!(request.get("type"), Some("unicode"));
}

/// Publishes `job` and waits for its `status`; the log row.
async fn settled(app: &App, job: &serde_json::Value, status: &str) -> helpers::MessageRow {
    app.publish(job).await;
    app.wait_for_status(id_of(job), status).await
}

fn expiring_in(kind: &str, to: &str, seconds: i64) -> serde_json::Value {
    let mut job = job(kind, SCHOOL, to, "Your code is 4711");
    let at = time::OffsetDateTime::now_utc() + time::Duration::seconds(seconds);
    let at = at.format(&time::format_description::well_known::Rfc3339);
    job["expires_at"] = at.expect("a timestamp").into();
    job
}

#[tokio::test(flavor = "multi_thread")]
async fn twilio_is_given_the_time_left_as_its_validity_period() {
    let app = spawn_app_with(&[]).await;
    app.add_school(SCHOOL, "GB").await;
    // Its own expiry, ten minutes ahead; the type's default (15 minutes); and a day, more
    // than Twilio keeps a message.
    let own = expiring_in("login_code", STUDENT, 600);
    let default = job("login_code", SCHOOL, "+447700900124", "Your code is 4712");
    let long = expiring_in("booking_reminder", "+447700900125", 86_400);
    for job in [&own, &default, &long] {
        settled(&app, job, "sent").await;
    }
    let validity = |to: &str| -> u64 {
        let requests = app.stub.requests_to(to);
        let period = requests[0].get("ValidityPeriod").expect("a ValidityPeriod");
        period.parse().expect("whole seconds")
    };
    assert!(
        (590..=600).contains(&validity(STUDENT)),
        "{}",
        validity(STUDENT)
    );
    assert!((890..=900).contains(&validity("+447700900124")));
    assert_eq!(validity("+447700900125"), 36_000, "Twilio's maximum");
    app.stub.assert_no_violations();
}

#[tokio::test(flavor = "multi_thread")]
async fn vonage_is_given_a_ttl_and_nothing_is_sent_below_its_minimum() {
    let vonage = vonage_stub::VonageStub::start().await;
    let app = vonage_app(&vonage, &[]).await;
    let code = expiring_in("login_code", STUDENT, 600);
    settled(&app, &code, "sent").await;
    let ttl: u64 = vonage.requests()[0]
        .get("ttl")
        .and_then(|t| t.parse().ok())
        .expect("a ttl in ms");
    assert!((590_000..=600_000).contains(&ttl), "{ttl}");

    // Ten seconds left: Vonage keeps a text at least 20, so it could arrive late.
    let late = expiring_in("login_code", "+447700900124", 10);
    let row = settled(&app, &late, "expired").await;
    assert_eq!(row.reason.as_deref(), Some("expires_too_soon"));
    assert_eq!(vonage.requests().len(), 1, "never sent");
    vonage.assert_no_violations();
}

const US: &str = "+12015550123";

/// A school texting Britain and the United States from `sender_id`, with `sender_number`.
async fn add_sender_school(app: &App, school_id: i64, sender_number: Option<&str>) {
    app.db
        .execute(
            "INSERT INTO sms_school_settings
                 (school_id, sms_enabled, country, sender_id, sender_number, allowed_countries)
             VALUES ($1, true, 'GB', 'DriveCo', $2, '{GB,US}')",
            &[&school_id, &sender_number],
        )
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_alphanumeric_sender_goes_only_where_the_destination_accepts_one() {
    let app = spawn_app_with(&[]).await;
    add_sender_school(&app, SCHOOL, None).await;
    add_sender_school(&app, 43, Some("+12015550199")).await;
    let to_gb = job("booking_reminder", SCHOOL, STUDENT, "See you at 10");
    let to_us = job("booking_reminder", SCHOOL, US, "See you at 10");
    let own_number = job("booking_reminder", 43, "+12015550124", "See you at 10");
    for job in [&to_gb, &to_us, &own_number] {
        settled(&app, job, "sent").await;
    }
    let from = |to: &str| app.stub.requests_to(to)[0].get("From").map(str::to_owned);
    assert_eq!(
        from(STUDENT).as_deref(),
        Some("DriveCo"),
        "Britain accepts names"
    );
    let twilio_from = helpers::twilio_stub::DEFAULT_FROM;
    assert_eq!(
        from(US).as_deref(),
        Some(twilio_from),
        "the provider's number"
    );
    assert_eq!(
        from("+12015550124").as_deref(),
        Some("+12015550199"),
        "the school's own"
    );
    app.stub.assert_no_violations();
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_number_to_send_from_a_text_to_the_us_fails_no_sender() {
    let vonage = vonage_stub::VonageStub::start().await;
    let app = vonage_app(&vonage, &[("VONAGE_FROM", "DriveCo")]).await;
    add_sender_school(&app, 43, None).await;
    let to_us = job("booking_reminder", 43, US, "See you at 10");
    let row = settled(&app, &to_us, "failed").await;
    assert_eq!(row.reason.as_deref(), Some("no_sender"));
    let letters = app.dead_letters(1).await;
    assert_eq!(letters[0].reason.as_deref(), Some("permanent_failure"));
    let error = letters[0].error.as_deref().unwrap_or_default();
    assert!(error.contains("no_sender"), "{error}");
    assert!(
        vonage.requests().is_empty(),
        "never sent from a name the carrier refuses"
    );
}

#[test]
fn a_sender_country_list_that_does_not_parse_stops_the_daemon() {
    let path = std::env::temp_dir().join(format!("smsgw-senders-{}.txt", uuid::Uuid::new_v4()));
    std::fs::write(&path, "# ours\nUS\nCanada\n").expect("write the list");
    let file = path.to_string_lossy().into_owned();
    let bad = [
        (
            "SMSGW_SENDER_COUNTRIES_FILE",
            file.as_str(),
            "line 3: 'Canada'",
        ),
        ("SMSGW_SMART_ENCODING", "sometimes", "not on or off"),
    ];
    for (variable, value, says) in bad {
        let output = helpers::smsgw_command(&helpers::vars(&[(variable, value)]), &["run"])
            .output()
            .expect("run");
        assert_eq!(output.status.code(), Some(2), "{variable}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains(variable) && stderr.contains(says),
            "{stderr}"
        );
    }
    let _ = std::fs::remove_file(path);
}
