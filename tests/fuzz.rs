//! Property tests for everything that reads input from outside: no input makes them panic.
//! CI runs proptest's default 256 cases per property; a long run:
//! `PROPTEST_CASES=1000000 cargo test --release --test fuzz`.

use proptest::prelude::*;
use serde_json::{Value, json};
use smsgw::{job::Job, phone::PhoneNumber, phone::redact_numbers};

/// JSON values of any shape, up to a few levels deep.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|n| json!(n)),
        ".{0,40}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::hash_map(".{0,12}", inner, 0..8)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A valid job with one field replaced by anything.
fn mutated_job() -> impl Strategy<Value = Value> {
    let fields = prop::sample::select(vec![
        "id",
        "type",
        "school_id",
        "to",
        "recipients",
        "body",
        "context",
        "not_before",
        "expires_at",
        "ref",
    ]);
    (fields, any_json()).prop_map(|(field, value)| {
        let mut job = json!({
            "id": "6f1c2d3e-8a9b-4c5d-9e0f-1a2b3c4d5e6f",
            "type": "announcement",
            "school_id": 42,
            "to": "+447700900123",
            "body": "Reminder",
        });
        job[field] = value;
        job
    })
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic_the_decoder(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = Job::decode(&bytes);
    }

    #[test]
    fn arbitrary_json_never_panics_the_decoder(value in any_json()) {
        let _ = Job::decode(value.to_string().as_bytes());
    }

    #[test]
    fn a_mutated_job_decodes_or_names_what_is_wrong(job in mutated_job()) {
        match Job::decode(job.to_string().as_bytes()) {
            Err(e) => {
                prop_assert!(!e.0.is_empty());
                prop_assert!(!e.0.contains("7700900123"), "an error echoes the number: {}", e.0);
            }
            // What the log will store holds no NUL (PostgreSQL could not keep it).
            Ok(decoded) => {
                prop_assert!(!decoded.body.contains('\0'));
                prop_assert!(!decoded.reference.as_deref().unwrap_or_default().contains('\0'));
                prop_assert!(!decoded
                    .context
                    .map(|c| c.to_string())
                    .unwrap_or_default()
                    .contains("\\u0000"));
            }
        }
    }

    #[test]
    fn phone_parsing_never_panics(raw in ".{0,64}", country in "[A-Za-z]{0,3}") {
        let _ = PhoneNumber::parse(&raw, Some(&country));
        let _ = PhoneNumber::parse(&raw, None);
    }

    #[test]
    fn redaction_keeps_no_long_digit_run(text in "[0-9 +a-z().-]{0,80}") {
        let red = redact_numbers(&text);
        let mut run = 0;
        for c in red.chars() {
            run = if c.is_ascii_digit() { run + 1 } else { 0 };
            prop_assert!(run < 6, "{text:?} -> {red:?}");
        }
    }
}

proptest! {
    #[test]
    fn webhook_bodies_never_panic_the_parsers(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = smsgw::provider::callback::parse_form(&bytes);
    }

    #[test]
    fn signature_checks_never_panic(
        token in ".{0,40}",
        url in ".{0,80}",
        params in prop::collection::vec((".{0,12}", ".{0,20}"), 0..8),
        signature in ".{0,60}",
    ) {
        let _ = smsgw::provider::twilio::callbacks::verify(&token, &url, &params, &signature);
        let map: std::collections::BTreeMap<String, String> = params.into_iter().chain([("sig".to_owned(), signature)]).collect();
        let _ = smsgw::provider::vonage::callbacks::verify(&token, smsgw::config::SignatureMethod::Sha256, &map);
    }

    #[test]
    fn segment_counts_are_at_least_one_and_bounded(text in ".{1,400}") {
        let s = smsgw::segments::segment(&text);
        prop_assert!(s.segments >= 1);
        prop_assert!(s.segments as usize <= text.chars().count() * 2);
    }
}
