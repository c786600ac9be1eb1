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
