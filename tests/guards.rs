//! The guards against fraud and spend (interface section 14), through the daemon, against
//! the real RabbitMQ and PostgreSQL, Twilio at the local stub: where a school may text,
//! login codes per number, the account's texts abroad per day, each school's monthly
//! budget and its events; and two replicas sharing the account-wide counts. Then the
//! store's admissions themselves: many in one statement, each with its own answer, and a
//! budget exact however many stores admit at once.

mod helpers;

use std::time::Duration;

use serde_json::{Value, json};
use uuid::Uuid;

use smsgw::{
    config::RateWindow,
    store::{Admission, GuardBudget, GuardCheck, GuardRefusal, Store},
};

use helpers::{
    App, TestEnv, base_settings,
    db::Db,
    events::EventTap,
    free_port, id_of, job,
    process::{Daemon, wait_ready},
    spawn_app, spawn_app_with,
};

const SCHOOL: i64 = 42;
const NUMBER: &str = "+447700900123";
/// Jamaica: `+1`, as the United States, but a country of its own.
const JAMAICA: &str = "+18765551234";

/// Publishes `count` jobs of `kind` for `school` to `to` (each its own); their ids.
async fn publish(app: &App, count: usize, kind: &str, school: i64, to: &str) -> Vec<Uuid> {
    let jobs: Vec<Value> = (0..count)
        .map(|i| job(kind, school, to, &format!("Message {i}")))
        .collect();
    app.publish_all(&jobs).await;
    jobs.iter().map(id_of).collect()
}

/// Waits until each of `ids` has a final status; how many ended with each
/// (status, reason).
async fn outcomes(app: &App, ids: &[Uuid]) -> Vec<(String, Option<String>, i64)> {
    let deadline = std::time::Instant::now() + helpers::PATIENCE;
    loop {
        let pending: i64 = app
            .db
            .scalar(
                "SELECT count(*) FROM sms_messages WHERE id = ANY($1)
                    AND status IN ('sent', 'delivered', 'suppressed', 'failed', 'expired')",
                &[&ids],
            )
            .await;
        if pending == ids.len() as i64 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{pending} of {ids:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rows = app
        .db
        .rows(
            "SELECT status, reason, count(*) FROM sms_messages WHERE id = ANY($1)
              GROUP BY status, reason ORDER BY status, reason",
            &[&ids],
        )
        .await;
    rows.iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

fn tally(pairs: &[(&str, Option<&str>, i64)]) -> Vec<(String, Option<String>, i64)> {
    pairs
        .iter()
        .map(|(s, r, n)| (s.to_string(), r.map(str::to_owned), *n))
        .collect()
}

/// `smsgw_suppressed_total` of `reason` on the daemon at `http_url`.
async fn suppressed_total(http_url: &str, reason: &str) -> String {
    let text = reqwest::get(format!("{http_url}/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    let series = format!("smsgw_suppressed_total{{reason=\"{reason}\"}} ");
    text.lines()
        .find_map(|line| line.strip_prefix(&series))
        .unwrap_or("none")
        .to_owned()
}

/// A British school that sends everything, with `settings` (SQL assignments) on top, in
/// one transaction: the daemon never sees it without them.
async fn school_with(app: &App, school: i64, settings: &str) {
    let update = if settings.is_empty() {
        String::new()
    } else {
        format!("UPDATE sms_school_settings SET {settings} WHERE school_id = {school};")
    };
    app.db
        .batch(&format!(
            "BEGIN;
             INSERT INTO sms_school_settings (school_id, sms_enabled, country)
             VALUES ({school}, true, 'GB');
             {update}
             COMMIT;"
        ))
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_fifth_login_code_to_a_number_goes_and_the_sixth_is_refused() {
    let app = spawn_app().await;
    school_with(&app, SCHOOL, "").await;
    school_with(&app, 43, "").await;
    let mut ids = publish(&app, 3, "login_code", SCHOOL, NUMBER).await;
    ids.extend(publish(&app, 3, "login_code", 43, NUMBER).await);
    assert_eq!(
        outcomes(&app, &ids).await,
        tally(&[
            ("sent", None, 5),
            ("suppressed", Some("recipient_limit"), 1)
        ]),
        "counted across schools"
    );
    assert_eq!(app.stub.requests_to(NUMBER).len(), 5);
    let other = publish(&app, 1, "login_code", SCHOOL, "+447700900124").await;
    app.wait_for_status(other[0], "sent").await;
    let reminder = publish(&app, 1, "booking_reminder", SCHOOL, NUMBER).await;
    app.wait_for_status(reminder[0], "sent").await;
    assert_eq!(
        suppressed_total(&app.http_url, "recipient_limit").await,
        "1"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_number_abroad_is_refused_unless_the_school_may_text_its_country() {
    let app = spawn_app().await;
    school_with(&app, SCHOOL, "").await;
    school_with(&app, 43, "allowed_countries = '{gb,jm}'").await;
    let refused = publish(&app, 1, "booking_change", SCHOOL, JAMAICA).await;
    let row = app.wait_for_status(refused[0], "suppressed").await;
    assert_eq!(row.reason.as_deref(), Some("country_not_allowed"));
    let allowed = publish(&app, 1, "booking_change", 43, JAMAICA).await;
    app.wait_for_status(allowed[0], "sent").await;
    let satellite = publish(&app, 1, "booking_change", 43, "+881612345678").await;
    let row = app.wait_for_status(satellite[0], "suppressed").await;
    assert_eq!(row.reason.as_deref(), Some("country_not_allowed"));
    assert_eq!(app.stub.requests_to(JAMAICA).len(), 1);
    assert_eq!(
        suppressed_total(&app.http_url, "country_not_allowed").await,
        "2"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_international_cap_sends_its_last_text_abroad_and_refuses_the_next() {
    let app = spawn_app_with(&[
        ("SMSGW_ALLOWED_COUNTRIES", "JM"),
        ("SMSGW_INTERNATIONAL_DAILY_LIMIT", "3"),
    ])
    .await;
    school_with(&app, SCHOOL, "").await;
    let abroad: Vec<Value> = (0..4)
        .map(|i| {
            job(
                "booking_change",
                SCHOOL,
                &format!("+1876555123{i}"),
                "Moved",
            )
        })
        .collect();
    app.publish_all(&abroad).await;
    let ids: Vec<Uuid> = abroad.iter().map(id_of).collect();
    assert_eq!(
        outcomes(&app, &ids).await,
        tally(&[
            ("sent", None, 3),
            ("suppressed", Some("international_limit"), 1)
        ])
    );
    let home = publish(&app, 1, "booking_change", SCHOOL, NUMBER).await;
    app.wait_for_status(home[0], "sent").await;
    let day: i32 = app
        .db
        .scalar("SELECT international FROM sms_guard_days", &[])
        .await;
    assert_eq!(day, 3, "one day's count, texts at home not in it");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_budgets_last_segment_goes_the_next_is_refused_and_exempt_types_go_through() {
    let app = spawn_app().await;
    school_with(&app, SCHOOL, "monthly_segment_budget = 3").await;
    let mut sent = Vec::new();
    for _ in 0..3 {
        let one = publish(&app, 1, "booking_reminder", SCHOOL, NUMBER).await;
        app.wait_for_status(one[0], "sent").await;
        sent.extend(one);
    }
    let over = publish(&app, 1, "booking_confirmation", SCHOOL, NUMBER).await;
    let row = app.wait_for_status(over[0], "suppressed").await;
    assert_eq!(row.reason.as_deref(), Some("budget_exhausted"));
    for kind in ["login_code", "booking_change", "booking_cancellation"] {
        let exempt = publish(&app, 1, kind, SCHOOL, NUMBER).await;
        app.wait_for_status(exempt[0], "sent").await;
    }
    assert_eq!(app.stub.requests_to(NUMBER).len(), 6);
    let used: i64 = app
        .db
        .scalar(
            "SELECT used FROM sms_guard_budgets WHERE school_id = $1",
            &[&SCHOOL],
        )
        .await;
    assert_eq!(used, 6, "exempt types are counted, never refused");
    assert_eq!(
        suppressed_total(&app.http_url, "budget_exhausted").await,
        "1"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_announcement_one_segment_too_big_is_refused_whole() {
    let app = spawn_app().await;
    school_with(&app, SCHOOL, "monthly_segment_budget = 2").await;
    let announcement = |numbers: &[&str]| {
        let recipients: Vec<Value> = numbers.iter().map(|to| json!({ "to": to })).collect();
        json!({
            "id": Uuid::new_v4(), "type": "announcement", "school_id": SCHOOL,
            "recipients": recipients, "body": "The office is closed on Friday.",
        })
    };
    let three = ["+447700900001", "+447700900002", "+447700900003"];
    let too_big = announcement(&three);
    app.publish(&too_big).await;
    let ids: Vec<Uuid> = three
        .iter()
        .map(|to| Uuid::new_v5(&id_of(&too_big), to.as_bytes()))
        .collect();
    assert_eq!(
        outcomes(&app, &ids).await,
        tally(&[("suppressed", Some("budget_exhausted"), 3)])
    );
    let fits = announcement(&three[..2]);
    app.publish(&fits).await;
    let ids: Vec<Uuid> = three[..2]
        .iter()
        .map(|to| Uuid::new_v5(&id_of(&fits), to.as_bytes()))
        .collect();
    assert_eq!(outcomes(&app, &ids).await, tally(&[("sent", None, 2)]));
    assert_eq!(app.stub.requests().len(), 2, "the first sent nobody");
}

/// The budget events received, as (routing key, used), after waiting for `count`.
async fn budget_events(tap: &mut EventTap, count: usize) -> Vec<(String, i64)> {
    tap.until(|events| events.len() >= count).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    tap.take().await;
    tap.received
        .iter()
        .map(|e| (e.routing_key.clone(), e.body["used"].as_i64().unwrap_or(-1)))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_budget_events_come_once_each_with_the_schools_use() {
    let app = spawn_app().await;
    school_with(&app, SCHOOL, "monthly_segment_budget = 5").await;
    let mut tap = EventTap::bind(&app.env.amqp_url, "budget.*").await;
    for _ in 0..7 {
        let one = publish(&app, 1, "booking_reminder", SCHOOL, NUMBER).await;
        outcomes(&app, &one).await;
    }
    let events = budget_events(&mut tap, 2).await;
    assert_eq!(
        events,
        [
            ("budget.warning".to_owned(), 4),
            ("budget.exhausted".to_owned(), 5)
        ]
    );
    let exhausted = &tap.received[1];
    let body = &exhausted.body;
    let month = smsgw::policy::guards::Month::of(time::OffsetDateTime::now_utc());
    assert_eq!(body["school_id"], SCHOOL);
    assert_eq!(body["month"], month.to_string());
    assert_eq!(body["budget"], 5);
    assert_eq!(exhausted.message_id.as_deref(), body["event_id"].as_str());
    assert!(
        body["occurred_at"]
            .as_str()
            .is_some_and(|at| at.ends_with('Z'))
    );
    assert_eq!(app.stub.requests().len(), 5);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_school_with_a_setting_smsgw_cannot_read_is_refused_and_listed_by_check() {
    let app = spawn_app().await;
    school_with(&app, 7, "allowed_countries = '{GB,UK}'").await;
    school_with(&app, 8, "monthly_segment_budget = -1").await;
    school_with(&app, SCHOOL, "monthly_segment_budget = 5").await;
    let countries = publish(&app, 1, "login_code", 7, NUMBER).await;
    let budget = publish(&app, 1, "login_code", 8, NUMBER).await;
    let row = app.wait_for_status(countries[0], "suppressed").await;
    assert_eq!(row.reason.as_deref(), Some("invalid_allowed_countries"));
    let row = app.wait_for_status(budget[0], "suppressed").await;
    assert_eq!(row.reason.as_deref(), Some("invalid_budget"));
    for id in publish(&app, 4, "booking_reminder", SCHOOL, NUMBER).await {
        app.wait_for_status(id, "sent").await;
    }
    assert_eq!(app.stub.requests().len(), 4, "nothing sent on a guess");

    let check = app.run_cli(&["check"]);
    let text = String::from_utf8_lossy(&check.stdout);
    let line = |item: &str| {
        text.lines()
            .find(|l| l.starts_with(item))
            .unwrap_or_default()
            .to_owned()
    };
    assert!(line("guards").contains("WARN"), "{text}");
    assert!(
        line("guards").contains("school 7: allowed_countries 'UK'"),
        "{text}"
    );
    assert!(
        line("guards").contains("school 8: monthly_segment_budget '-1'"),
        "{text}"
    );
    assert!(
        line("budgets").contains("school 42: 4 of 5 (80%)"),
        "{text}"
    );

    let month = smsgw::policy::guards::Month::of(time::OffsetDateTime::now_utc());
    let (from, to) = (month.first_day(), month.next().first_day());
    let usage = app.run_cli(&[
        "usage",
        "--from",
        &from.to_string(),
        "--to",
        &to.to_string(),
    ]);
    let table = String::from_utf8_lossy(&usage.stdout);
    let ours = table
        .lines()
        .find(|l| l.starts_with("42") && l.contains(&month.to_string()))
        .unwrap_or_default();
    assert_eq!(
        ours.split_whitespace().collect::<Vec<_>>(),
        ["42", &month.to_string(), "5", "4", "80%"],
        "{table}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn two_replicas_share_the_international_cap_and_the_login_code_limit() {
    let limits = [
        ("SMSGW_ALLOWED_COUNTRIES", "JM"),
        ("SMSGW_INTERNATIONAL_DAILY_LIMIT", "7"),
        ("SMSGW_LOGIN_CODE_LIMIT", "5/1h"),
    ];
    let app = spawn_app_with(&limits).await;
    school_with(&app, SCHOOL, "").await;
    let port = free_port();
    let vars: Vec<(String, String)> = base_settings(&app.env, &app.stub, port)
        .into_iter()
        .chain(
            limits
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        )
        .chain([("RUST_LOG".to_owned(), "warn".to_owned())])
        .collect();
    let mut second = Daemon::spawn(&vars);
    wait_ready(port, &mut second).await;

    let mut ids = publish(&app, 40, "login_code", SCHOOL, NUMBER).await;
    let abroad: Vec<Value> = (0..40)
        .map(|i| {
            job(
                "booking_change",
                SCHOOL,
                &format!("+18765551{i:03}"),
                "Moved",
            )
        })
        .collect();
    app.publish_all(&abroad).await;
    ids.extend(abroad.iter().map(id_of));
    assert_eq!(
        outcomes(&app, &ids).await,
        tally(&[
            ("sent", None, 12),
            ("suppressed", Some("international_limit"), 33),
            ("suppressed", Some("recipient_limit"), 35),
        ])
    );
    assert_eq!(app.stub.requests_to(NUMBER).len(), 5, "login codes");
    let jamaica = app
        .stub
        .requests()
        .iter()
        .filter(|r| r.get("To").is_some_and(|to| to.starts_with("+1876")))
        .count();
    assert_eq!(jamaica, 7, "texts abroad");
    // Both replicas took their share of the work (the broker deals deliveries round).
    let refusals = |text: String| text.parse::<u32>().unwrap_or_default();
    let here = refusals(suppressed_total(&app.http_url, "recipient_limit").await);
    let second_url = format!("http://127.0.0.1:{port}");
    let there = refusals(suppressed_total(&second_url, "recipient_limit").await);
    assert_eq!(here + there, 35);
    assert!(
        here > 0 && there > 0,
        "{here} here, {there} in the second replica"
    );
    second.signal("TERM");
}

/// A check of one message of `segments` to `to` for `school`, with nothing counted yet.
fn check<'a>(id: &'a [Uuid], to: &'a [&'a str], school: i64, segments: u32) -> GuardCheck<'a> {
    GuardCheck {
        messages: id,
        recipients: to,
        school_id: school,
        segments,
        login_codes: None,
        international: None,
        budget: None,
    }
}

fn budget(budget: u32, exempt: bool) -> Option<GuardBudget> {
    Some(GuardBudget { budget, exempt })
}

/// The budget events written, as (name, used), oldest first.
async fn budget_events_written(db: &Db) -> Vec<(String, i64)> {
    let rows = db
        .rows(
            "SELECT routing_key, (payload->>'used')::int8 FROM sms_outbox
              WHERE routing_key LIKE 'budget.%' ORDER BY id",
            &[],
        )
        .await;
    rows.iter().map(|r| (r.get(0), r.get(1))).collect()
}

/// What a message of the mixed batch counts against: `SCHOOL`'s budget of 6 (with its
/// segments), one login code an hour (counted on that budget, never refused by it), one
/// text abroad a day (of school 43, which has no budget).
#[derive(Clone, Copy)]
enum Counts {
    Budget(u32),
    LoginCode,
    Abroad,
}

fn mixed<'a>(id: &'a [Uuid], to: &'a [&'a str], counts: Counts) -> GuardCheck<'a> {
    let one_code = RateWindow {
        count: 1,
        window: Duration::from_secs(3600),
    };
    match counts {
        Counts::Budget(segments) => GuardCheck {
            budget: budget(6, false),
            ..check(id, to, SCHOOL, segments)
        },
        Counts::LoginCode => GuardCheck {
            login_codes: Some(one_code),
            budget: budget(6, true),
            ..check(id, to, SCHOOL, 1)
        },
        Counts::Abroad => GuardCheck {
            international: Some(1),
            ..check(id, to, 43, 1)
        },
    }
}

/// `SCHOOL`'s segments used, the day's texts abroad, and the reservations.
async fn counts(db: &Db) -> (i64, i32, i64) {
    let used = "SELECT used FROM sms_guard_budgets WHERE school_id = $1";
    (
        db.scalar(used, &[&SCHOOL]).await,
        db.scalar("SELECT international FROM sms_guard_days", &[])
            .await,
        db.scalar("SELECT count(*) FROM sms_guard_reservations", &[])
            .await,
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn one_statement_gives_each_message_of_a_batch_its_own_answer() {
    let env = TestEnv::new().await;
    helpers::migrate(&env.database_url).await;
    let db = Db::connect(&env.database_url).await;
    let opted_out = "+447700900999";
    db.execute(
        "INSERT INTO sms_opt_outs (school_id, phone, source) VALUES (NULL, $1, 'web')",
        &[&opted_out],
    )
    .await;
    let store = Store::connect(&env.database_url, 2).await.expect("store");
    let ids: Vec<[Uuid; 1]> = (0..8).map(|_| [Uuid::new_v4()]).collect();
    let (home, abroad, opted) = ([NUMBER], [JAMAICA], [opted_out]);
    use Counts::{Abroad, Budget, LoginCode};
    let checks = [
        mixed(&ids[0], &home, Budget(2)),
        mixed(&ids[1], &home, Budget(5)),
        mixed(&ids[2], &home, Budget(4)),
        mixed(&ids[3], &opted, Budget(1)),
        mixed(&ids[4], &home, LoginCode),
        mixed(&ids[5], &home, LoginCode),
        mixed(&ids[6], &abroad, Abroad),
        mixed(&ids[7], &abroad, Abroad),
        // Counted before: admitted, and not counted twice.
        mixed(&ids[0], &home, Budget(2)),
    ];

    let answers = store.admit_all(&checks).await.expect("admit");

    let refused = Admission::Refused;
    assert_eq!(
        answers,
        [
            Admission::Admitted,
            refused(GuardRefusal::BudgetExhausted),
            Admission::Admitted,
            refused(GuardRefusal::OptedOut),
            Admission::Admitted,
            refused(GuardRefusal::RecipientLimit),
            Admission::Admitted,
            refused(GuardRefusal::InternationalLimit),
            Admission::Admitted,
        ]
    );
    // Segments 2 + 4 + the login code's 1, no refusal counted; budget reservations of the
    // 1st, 3rd and 5th, the 5th's login code, the 7th's text abroad.
    assert_eq!(counts(&db).await, (7, 1, 5));
    assert_eq!(
        budget_events_written(&db).await,
        [
            ("budget.exhausted".to_owned(), 2),
            ("budget.warning".to_owned(), 6)
        ],
        "exhausted when the 2nd did not fit, then only the warning when the 3rd used it up"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_that_waited_on_another_admission_of_its_message_fails_rather_than_count_twice() {
    let env = TestEnv::new().await;
    helpers::migrate(&env.database_url).await;
    let store = Store::connect(&env.database_url, 2).await.expect("store");
    let (raced, other, to) = ([Uuid::new_v4()], [Uuid::new_v4()], [NUMBER]);
    // Another replica's admission of `raced`, under way: it counted the message on its
    // school's month and reserved it, and has not committed yet.
    let replica = Db::connect(&env.database_url).await;
    replica
        .batch(&format!(
            "BEGIN;
             INSERT INTO sms_guard_budgets (school_id, month, used)
             VALUES ({SCHOOL}, date_trunc('month', now() AT TIME ZONE 'UTC')::date, 1);
             INSERT INTO sms_guard_reservations (message_id, guard)
             VALUES ('{}', 'budget');",
            raced[0]
        ))
        .await;
    let admitting = {
        let store = store.clone();
        tokio::spawn(async move {
            let checks = [
                mixed(&raced, &to, Counts::Budget(1)),
                mixed(&other, &to, Counts::Budget(1)),
            ];
            store.admit_all(&checks).await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!admitting.is_finished(), "waits for the other's row");

    replica.batch("COMMIT").await;

    let first = admitting.await.expect("task");
    assert!(first.is_err(), "{first:?}");
    let checks = [
        mixed(&raced, &to, Counts::Budget(1)),
        mixed(&other, &to, Counts::Budget(1)),
    ];
    let again = store.admit_all(&checks).await.expect("admit again");
    assert_eq!(again, [Admission::Admitted, Admission::Admitted]);
    let db = Db::connect(&env.database_url).await;
    let used: i64 = db.scalar("SELECT used FROM sms_guard_budgets", &[]).await;
    assert_eq!(used, 2, "the other replica's one and `other`; `raced` once");
}

#[tokio::test(flavor = "multi_thread")]
async fn two_stores_admitting_at_once_admit_exactly_what_the_budget_holds() {
    let env = TestEnv::new().await;
    helpers::migrate(&env.database_url).await;
    let mut replicas = Vec::new();
    for _ in 0..2 {
        let store = Store::connect(&env.database_url, 4).await.expect("store");
        replicas.push(store.with_recorder());
    }
    let ids: Vec<Uuid> = (0..200).map(|_| Uuid::new_v4()).collect();
    let admit = |store: &Store, id: Uuid| {
        let store = store.clone();
        tokio::spawn(async move {
            let (id, to) = ([id], [NUMBER]);
            let one = GuardCheck {
                budget: budget(50, false),
                ..check(&id, &to, SCHOOL, 1)
            };
            store.admit(&one).await.expect("admit")
        })
    };

    let tasks: Vec<_> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| admit(&replicas[i % 2], *id))
        .collect();
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.expect("task"));
    }

    let admitted: Vec<Uuid> = ids
        .iter()
        .zip(&answers)
        .filter(|(_, answer)| **answer == Admission::Admitted)
        .map(|(id, _)| *id)
        .collect();
    assert_eq!(admitted.len(), 50);
    let refused = Admission::Refused(GuardRefusal::BudgetExhausted);
    assert!(
        answers
            .iter()
            .all(|a| *a == Admission::Admitted || *a == refused)
    );
    // Each admitted message tried again passes without counting again.
    let again: Vec<_> = admitted.iter().map(|id| admit(&replicas[1], *id)).collect();
    for task in again {
        assert_eq!(task.await.expect("task"), Admission::Admitted);
    }
    let db = Db::connect(&env.database_url).await;
    let used: i64 = db
        .scalar(
            "SELECT used FROM sms_guard_budgets WHERE school_id = $1",
            &[&SCHOOL],
        )
        .await;
    assert_eq!(used, 50);
    let reserved: i64 = db
        .scalar("SELECT count(*) FROM sms_guard_reservations", &[])
        .await;
    assert_eq!(reserved, 50);
    assert_eq!(
        budget_events_written(&db).await,
        [
            ("budget.warning".to_owned(), 40),
            ("budget.exhausted".to_owned(), 50)
        ]
    );
}
