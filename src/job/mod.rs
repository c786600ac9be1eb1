//! The v1 job the web app publishes: decoded and validated here, and encoded here (in
//! [`encode`]) for the jobs smsgw publishes itself, an announcement's recipients.
//!
//! Decoding never echoes field values into its errors: an error lands in a log line and an
//! `x-smsgw-error` header, and a value may be a phone number or a message body.

use std::collections::BTreeMap;

use serde_json::{Map, Value, value::RawValue};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};
use uuid::Uuid;

mod encode;
mod recipients;

/// Longest body accepted, in characters (Twilio's limit).
pub const MAX_BODY_CHARS: usize = 1_600;
/// Largest `context`, serialised, in bytes.
pub const MAX_CONTEXT_BYTES: usize = 2_048;
/// Most recipients one announcement may fan out to.
pub const MAX_RECIPIENTS: usize = 50_000;

/// What kind of text a job is; decides its lane and which school setting allows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobType {
    BookingConfirmation,
    BookingReminder,
    BookingChange,
    BookingCancellation,
    Announcement,
    LoginCode,
}

/// The lanes are consumed with separate budgets so that bulk never starves urgent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Lane {
    Urgent,
    Default,
    Bulk,
}

impl Lane {
    pub const ALL: [Lane; 3] = [Lane::Urgent, Lane::Default, Lane::Bulk];

    pub fn as_str(self) -> &'static str {
        match self {
            Lane::Urgent => "urgent",
            Lane::Default => "default",
            Lane::Bulk => "bulk",
        }
    }
}

impl JobType {
    pub const ALL: [JobType; 6] = [
        JobType::BookingConfirmation,
        JobType::BookingReminder,
        JobType::BookingChange,
        JobType::BookingCancellation,
        JobType::Announcement,
        JobType::LoginCode,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobType::BookingConfirmation => "booking_confirmation",
            JobType::BookingReminder => "booking_reminder",
            JobType::BookingChange => "booking_change",
            JobType::BookingCancellation => "booking_cancellation",
            JobType::Announcement => "announcement",
            JobType::LoginCode => "login_code",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        JobType::ALL.into_iter().find(|t| t.as_str() == name)
    }

    pub fn lane(self) -> Lane {
        match self {
            JobType::LoginCode | JobType::BookingChange | JobType::BookingCancellation => {
                Lane::Urgent
            }
            JobType::BookingConfirmation | JobType::BookingReminder => Lane::Default,
            JobType::Announcement => Lane::Bulk,
        }
    }
}

/// Who a job goes to.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    /// One recipient, as given (E.164 or national); normalised with the school's country.
    One(String),
    /// An announcement to many; fanned out into one message per recipient.
    Many(Vec<BulkRecipient>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct BulkRecipient {
    pub to: String,
    pub reference: Option<String>,
}

/// A decoded, validated v1 job.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub id: Uuid,
    pub kind: JobType,
    pub school_id: i64,
    pub target: Target,
    pub body: String,
    /// Kept with the log row; at most [`MAX_CONTEXT_BYTES`] serialised.
    pub context: Option<Value>,
    pub not_before: Option<OffsetDateTime>,
    pub expires_at: Option<OffsetDateTime>,
    /// `ref` of one recipient of an announcement, carried by the job fanned out for it.
    pub reference: Option<String>,
}

/// What a job's `context.booking_id` asks of the withdrawals (interface section 15).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Withdrawal<'a> {
    /// Nothing: not a booking's reminder, confirmation or cancellation, or no booking.
    None,
    /// A cancellation: withdraw the unsent reminders and confirmations of this booking.
    Withdraws(&'a Value),
    /// A reminder or confirmation, which a cancellation of this booking withdraws.
    Withdrawable(&'a Value),
    /// A cancellation whose `booking_id` is neither a string nor a number: it is sent,
    /// and withdraws nothing.
    Unusable,
}

impl Job {
    /// What the job's `booking_id`, if any, asks of the withdrawals. A string or a number
    /// names a booking; anything else names none.
    pub fn withdrawal(&self) -> Withdrawal<'_> {
        let Some(booking) = self.context.as_ref().and_then(|c| c.get("booking_id")) else {
            return Withdrawal::None;
        };
        let usable = booking.is_string() || booking.is_number();
        match self.kind {
            JobType::BookingCancellation if usable => Withdrawal::Withdraws(booking),
            JobType::BookingCancellation => Withdrawal::Unusable,
            JobType::BookingReminder | JobType::BookingConfirmation if usable => {
                Withdrawal::Withdrawable(booking)
            }
            _ => Withdrawal::None,
        }
    }
}

/// Why a job is invalid. The text names the field and never contains its value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidJob(pub String);

fn invalid(text: impl Into<String>) -> InvalidJob {
    InvalidJob(text.into())
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn required_str<'a>(object: &'a Map<String, Value>, field: &str) -> Result<&'a str, InvalidJob> {
    match object.get(field) {
        None | Some(Value::Null) => Err(invalid(format!("{field}: missing"))),
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(invalid(format!(
            "{field}: expected a string, got {}",
            kind_of(other)
        ))),
    }
}

fn optional_time(
    object: &Map<String, Value>,
    field: &str,
) -> Result<Option<OffsetDateTime>, InvalidJob> {
    match object.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => OffsetDateTime::parse(s, &Rfc3339)
            .map(Some)
            .map_err(|_| invalid(format!("{field}: not an RFC 3339 timestamp"))),
        Some(other) => Err(invalid(format!(
            "{field}: expected an RFC 3339 string, got {}",
            kind_of(other)
        ))),
    }
}

/// Refuses a body over `max_bytes` (`SMSGW_MAX_JOB_BYTES`) before anything is decoded:
/// decoding takes several times a body's size in memory. The sizes are written with
/// thousands separators, so that the dead letter's masking of long numbers leaves them.
pub fn check_size(body: &[u8], max_bytes: usize) -> Result<(), InvalidJob> {
    if body.len() <= max_bytes {
        return Ok(());
    }
    Err(invalid(format!(
        "job: {} bytes, more than SMSGW_MAX_JOB_BYTES ({})",
        grouped(body.len()),
        grouped(max_bytes)
    )))
}

/// `8388608` as `8,388,608`.
fn grouped(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

impl Job {
    /// Decodes a message body. Unknown fields are ignored.
    pub fn decode(bytes: &[u8]) -> Result<Job, InvalidJob> {
        let fields = decode_object(bytes)?;
        let object = &fields.known;
        // Fields are read in the order written, which decides which of several invalid
        // fields is reported.
        let id = decode_id(object)?;
        let kind = decode_kind(object)?;
        let job = Job {
            id,
            kind,
            school_id: decode_school_id(object)?,
            target: decode_target(&fields, kind)?,
            body: decode_body(object)?,
            context: decode_context(object)?,
            not_before: optional_time(object, "not_before")?,
            expires_at: optional_time(object, "expires_at")?,
            reference: decode_reference(object),
        };
        job.reject_nul()?;
        Ok(job)
    }

    /// PostgreSQL's text and jsonb cannot hold a NUL character (`\u0000` in JSON): a job
    /// carrying one in a field the log keeps could never be recorded, so it is invalid
    /// rather than retried for ever.
    fn reject_nul(&self) -> Result<(), InvalidJob> {
        let nul = |s: &str| s.contains('\0');
        let bad = |field: &str| Err(invalid(format!("{field}: contains a NUL character")));
        if nul(&self.body) {
            return bad("body");
        }
        if self.reference.as_deref().is_some_and(nul) {
            return bad("ref");
        }
        if self.context.as_ref().is_some_and(value_has_nul) {
            return bad("context");
        }
        match &self.target {
            Target::One(to) if nul(to) => bad("to"),
            Target::Many(recipients) => {
                for (i, r) in recipients.iter().enumerate() {
                    if nul(&r.to) {
                        return bad(&format!("recipients[{i}].to"));
                    }
                    if r.reference.as_deref().is_some_and(nul) {
                        return bad(&format!("recipients[{i}].ref"));
                    }
                }
                Ok(())
            }
            Target::One(_) => Ok(()),
        }
    }
}

/// The fields a job may have besides `recipients`; any other is ignored, unread.
const KNOWN_FIELDS: [&str; 9] = [
    "id",
    "type",
    "school_id",
    "to",
    "body",
    "context",
    "not_before",
    "expires_at",
    "ref",
];

/// What could still be read of a job that is invalid, for its `job.rejected` event: each
/// field only when it reads as that field should.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Salvaged {
    pub id: Option<Uuid>,
    /// A known type, or an unknown one written as a type name would be (letters, digits
    /// and `_`, at most 40), so the web app sees which of its types was refused.
    pub kind: Option<String>,
    pub school_id: Option<i64>,
}

impl Salvaged {
    /// Reads what it can of `bytes` (a job the decoder refused); `message_id` (the AMQP
    /// property, which the web app sets to the job's id) stands in for an unreadable id. A
    /// body over `max_bytes` is not read.
    pub fn of(bytes: &[u8], max_bytes: usize, message_id: Option<&str>) -> Salvaged {
        /// Only these fields are kept; the rest (50,000 recipients, say) is skipped
        /// without being built.
        #[derive(Default, serde::Deserialize)]
        struct Probe {
            id: Option<Value>,
            #[serde(rename = "type")]
            kind: Option<Value>,
            school_id: Option<Value>,
        }
        let probe: Probe = (bytes.len() <= max_bytes)
            .then(|| serde_json::from_slice(bytes).ok())
            .flatten()
            .unwrap_or_default();
        let kind = probe
            .kind
            .as_ref()
            .and_then(Value::as_str)
            .filter(|t| {
                (1..=40).contains(&t.len())
                    && t.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            })
            .map(str::to_owned);
        Salvaged {
            id: [probe.id.as_ref().and_then(Value::as_str), message_id]
                .into_iter()
                .flatten()
                .find_map(|id| Uuid::parse_str(id.trim()).ok()),
            kind,
            school_id: probe.school_id.as_ref().and_then(Value::as_i64),
        }
    }
}

/// A message body's JSON object: its known fields decoded, and an announcement's
/// `recipients` still raw. Decoded as one tree of values, 50,000 recipients would take
/// some fifteen times the body's size; [`recipients`] reads them one at a time.
struct Fields<'a> {
    known: Map<String, Value>,
    recipients: Option<&'a RawValue>,
}

fn decode_object(bytes: &[u8]) -> Result<Fields<'_>, InvalidJob> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        invalid(format!(
            "not UTF-8: invalid byte at offset {}",
            e.valid_up_to()
        ))
    })?;
    let whole: &RawValue = serde_json::from_str(text).map_err(not_json)?;
    if !whole.get().starts_with('{') {
        let value: Value = serde_json::from_str(whole.get()).map_err(not_json)?;
        return Err(invalid(format!(
            "not a JSON object: got {}",
            kind_of(&value)
        )));
    }
    // In name order, so that of two unreadable fields the same one is always reported.
    let raw: BTreeMap<String, &RawValue> = serde_json::from_str(whole.get()).map_err(not_json)?;
    let mut fields = Fields {
        known: Map::new(),
        recipients: None,
    };
    for (name, value) in raw {
        if name == "recipients" {
            fields.recipients = Some(value);
        } else if KNOWN_FIELDS.contains(&name.as_str()) {
            let value = serde_json::from_str(value.get()).map_err(not_json)?;
            fields.known.insert(name, value);
        }
    }
    Ok(fields)
}

/// A parser's error never quotes a value: only what it expected, and where.
fn not_json(error: serde_json::Error) -> InvalidJob {
    invalid(format!("not JSON: {error}"))
}

fn decode_id(object: &Map<String, Value>) -> Result<Uuid, InvalidJob> {
    Uuid::parse_str(required_str(object, "id")?).map_err(|_| invalid("id: not a UUID"))
}

fn decode_kind(object: &Map<String, Value>) -> Result<JobType, InvalidJob> {
    let type_name = required_str(object, "type")?;
    JobType::parse(type_name).ok_or_else(|| {
        let shown: String = type_name.chars().take(40).collect();
        if shown.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            invalid(format!("type: unknown type '{shown}'"))
        } else {
            invalid("type: unknown type")
        }
    })
}

fn decode_school_id(object: &Map<String, Value>) -> Result<i64, InvalidJob> {
    match object.get("school_id") {
        None | Some(Value::Null) => Err(invalid("school_id: missing")),
        Some(Value::Number(n)) => match n.as_i64() {
            Some(id) if id > 0 => Ok(id),
            _ => Err(invalid("school_id: expected a positive whole number")),
        },
        Some(other) => Err(invalid(format!(
            "school_id: expected a positive whole number, got {}",
            kind_of(other)
        ))),
    }
}

/// `to` for one recipient, or `recipients` for an announcement's many; never both.
fn decode_target(fields: &Fields<'_>, kind: JobType) -> Result<Target, InvalidJob> {
    let to = fields.known.get("to").filter(|to| !to.is_null());
    let list = fields.recipients.filter(|list| list.get() != "null");
    match (to, list) {
        (Some(to), None) => Ok(Target::One(recipient_str("to", to)?.to_owned())),
        (None, Some(list)) => {
            if kind != JobType::Announcement {
                return Err(invalid(
                    "recipients: only an announcement may have recipients",
                ));
            }
            Ok(Target::Many(recipients::decode(list)?))
        }
        (Some(_), Some(_)) => Err(invalid("to and recipients: give one of them, not both")),
        (None, None) => Err(invalid("to: missing")),
    }
}

fn decode_body(object: &Map<String, Value>) -> Result<String, InvalidJob> {
    let body = required_str(object, "body")?;
    let chars = body.chars().count();
    if chars == 0 || body.trim().is_empty() {
        return Err(invalid("body: empty"));
    }
    if chars > MAX_BODY_CHARS {
        return Err(invalid(format!(
            "body: {chars} characters, more than {MAX_BODY_CHARS}"
        )));
    }
    Ok(body.to_owned())
}

fn decode_context(object: &Map<String, Value>) -> Result<Option<Value>, InvalidJob> {
    match object.get("context") {
        None | Some(Value::Null) => Ok(None),
        Some(value @ Value::Object(_)) => {
            let size = value.to_string().len();
            if size > MAX_CONTEXT_BYTES {
                return Err(invalid(format!(
                    "context: {size} bytes, more than {MAX_CONTEXT_BYTES}"
                )));
            }
            Ok(Some(value.clone()))
        }
        Some(other) => Err(invalid(format!(
            "context: expected an object, got {}",
            kind_of(other)
        ))),
    }
}

fn decode_reference(object: &Map<String, Value>) -> Option<String> {
    match object.get("ref") {
        Some(Value::String(s)) => Some(s.chars().take(200).collect()),
        _ => None,
    }
}

fn value_has_nul(value: &Value) -> bool {
    match value {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(value_has_nul),
        Value::Object(object) => object
            .iter()
            .any(|(key, value)| key.contains('\0') || value_has_nul(value)),
        _ => false,
    }
}

fn recipient_str<'a>(field: &str, value: &'a Value) -> Result<&'a str, InvalidJob> {
    match value {
        Value::String(s) if s.trim().is_empty() => Err(invalid(format!("{field}: empty"))),
        Value::String(s) if s.len() > 40 => Err(invalid(format!(
            "{field}: {} characters is too long for a phone number",
            s.len()
        ))),
        Value::String(s) => Ok(s),
        other => Err(invalid(format!(
            "{field}: expected a string, got {}",
            kind_of(other)
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_can_be_read_of_an_invalid_job_is_salvaged() {
        let body = br#"{"id": "6f1c2d3e-8a9b-4c5d-9e0f-1a2b3c4d5e6f", "type": "sms_blast",
                        "school_id": 42, "to": 17}"#;
        let salvaged = Salvaged::of(body, 1024, None);
        assert_eq!(
            salvaged.id.map(|id| id.to_string()).as_deref(),
            Some("6f1c2d3e-8a9b-4c5d-9e0f-1a2b3c4d5e6f")
        );
        assert_eq!(salvaged.kind.as_deref(), Some("sms_blast"));
        assert_eq!(salvaged.school_id, Some(42));
        let odd = br#"{"id": "not a uuid", "type": "<script>", "school_id": "42"}"#;
        assert_eq!(Salvaged::of(odd, 1024, None), Salvaged::default());
        let fallback = "0b6c2d3e-8a9b-4c5d-9e0f-1a2b3c4d5e6f";
        assert_eq!(
            Salvaged::of(odd, 1024, Some(fallback))
                .id
                .map(|u| u.to_string())
                .as_deref(),
            Some(fallback),
            "a body id that is no UUID gives way to the AMQP message id"
        );
        let id = "6f1c2d3e-8a9b-4c5d-9e0f-1a2b3c4d5e6f";
        assert_eq!(
            Salvaged::of(b"not json", 1024, Some(id))
                .id
                .map(|u| u.to_string())
                .as_deref(),
            Some(id),
            "the AMQP message id stands in"
        );
        assert_eq!(
            Salvaged::of(body, 10, None),
            Salvaged::default(),
            "too big to read"
        );
    }
    use serde_json::json;

    #[test]
    fn a_job_over_the_size_limit_is_refused_with_its_size() {
        assert_eq!(check_size(&[b' '; 1_000], 1_000), Ok(()));
        let refused = check_size(&vec![b' '; 9_437_184], 8_388_608).expect_err("too big");
        assert_eq!(
            refused.to_string(),
            "job: 9,437,184 bytes, more than SMSGW_MAX_JOB_BYTES (8,388,608)"
        );
        // The sizes survive the masking of numbers in a dead letter's x-smsgw-error.
        let masked = crate::phone::redact_numbers(&refused.to_string());
        assert_eq!(masked, refused.to_string());
        assert_eq!(grouped(0), "0");
        assert_eq!(grouped(999), "999");
        assert_eq!(grouped(1_000), "1,000");
    }

    fn valid() -> Value {
        json!({
            "id": "6f1c2d3e-8a9b-4c5d-9e0f-1a2b3c4d5e6f",
            "type": "booking_reminder",
            "school_id": 42,
            "to": "+447700900123",
            "body": "Reminder: driving lesson tomorrow 10:00 with Sam.",
            "context": {"booking_id": 981, "user_id": 77},
            "not_before": "2026-11-25T08:00:00Z",
            "expires_at": "2026-11-26T09:00:00Z",
            "some_future_field": [1, 2, 3]
        })
    }

    fn decode(value: &Value) -> Result<Job, InvalidJob> {
        Job::decode(value.to_string().as_bytes())
    }

    fn error_of(mutate: impl FnOnce(&mut Map<String, Value>)) -> String {
        let mut value = valid();
        if let Value::Object(object) = &mut value {
            mutate(object);
        }
        decode(&value).expect_err("should be invalid").0
    }

    #[test]
    fn a_booking_id_names_a_booking_only_as_a_string_or_a_number() {
        let with = |kind: &str, booking: Value| {
            let mut value = valid();
            value["type"] = json!(kind);
            value["context"] = json!({ "booking_id": booking });
            decode(&value).expect("valid")
        };
        let cancellation = with("booking_cancellation", json!(981));
        assert_eq!(
            cancellation.withdrawal(),
            Withdrawal::Withdraws(&json!(981))
        );
        let reminder = with("booking_reminder", json!("b-981"));
        assert_eq!(
            reminder.withdrawal(),
            Withdrawal::Withdrawable(&json!("b-981"))
        );
        let confirmation = with("booking_confirmation", json!(981));
        assert_eq!(
            confirmation.withdrawal(),
            Withdrawal::Withdrawable(&json!(981))
        );
        for unusable in [json!({"id": 981}), json!([981]), json!(true), Value::Null] {
            let reminder = with("booking_reminder", unusable.clone());
            assert_eq!(reminder.withdrawal(), Withdrawal::None);
            let cancellation = with("booking_cancellation", unusable);
            assert_eq!(cancellation.withdrawal(), Withdrawal::Unusable);
        }
        assert_eq!(
            with("booking_change", json!(981)).withdrawal(),
            Withdrawal::None
        );
        let mut without = valid();
        without["type"] = json!("booking_cancellation");
        without["context"] = json!({ "user_id": 77 });
        assert_eq!(
            decode(&without).expect("valid").withdrawal(),
            Withdrawal::None
        );
    }

    #[test]
    fn the_contract_example_decodes() {
        let job = decode(&valid()).expect("valid job");
        assert_eq!(job.kind, JobType::BookingReminder);
        assert_eq!(job.school_id, 42);
        assert_eq!(job.target, Target::One("+447700900123".into()));
        assert!(job.not_before.is_some() && job.expires_at.is_some());
        assert_eq!(job.kind.lane(), Lane::Default);
    }

    #[test]
    fn each_invalid_field_is_named_without_its_value() {
        assert_eq!(
            error_of(|o| {
                o.remove("id");
            }),
            "id: missing"
        );
        assert_eq!(
            error_of(|o| {
                o.insert("id".into(), json!("nope"));
            }),
            "id: not a UUID"
        );
        assert_eq!(
            error_of(|o| {
                o.insert("type".into(), json!("fax"));
            }),
            "type: unknown type 'fax'"
        );
        assert_eq!(
            error_of(|o| {
                o.insert("school_id".into(), json!("42"));
            }),
            "school_id: expected a positive whole number, got a string"
        );
        assert_eq!(
            error_of(|o| {
                o.insert("school_id".into(), json!(1e30));
            }),
            "school_id: expected a positive whole number"
        );
        assert_eq!(
            error_of(|o| {
                o.insert("school_id".into(), json!(-1));
            }),
            "school_id: expected a positive whole number"
        );
        assert_eq!(
            error_of(|o| {
                o.insert("body".into(), json!(""));
            }),
            "body: empty"
        );
        assert_eq!(
            error_of(|o| {
                o.insert("body".into(), json!("é".repeat(1601)));
            }),
            "body: 1601 characters, more than 1600"
        );
        assert!(
            error_of(|o| {
                o.insert("context".into(), json!({"x": "y".repeat(3000)}));
            })
            .starts_with("context: ")
        );
        assert_eq!(
            error_of(|o| {
                o.insert("context".into(), json!([1]));
            }),
            "context: expected an object, got an array"
        );
        assert_eq!(
            error_of(|o| {
                o.insert("not_before".into(), json!("tomorrow"));
            }),
            "not_before: not an RFC 3339 timestamp"
        );
        let text = error_of(|o| {
            o.insert("to".into(), json!(447700900123u64));
        });
        assert_eq!(text, "to: expected a string, got a number");
        assert!(!text.contains("7700900123"));
        assert_eq!(
            error_of(|o| {
                o.remove("to");
            }),
            "to: missing"
        );
    }

    #[test]
    fn a_body_of_exactly_the_limit_is_accepted() {
        let mut value = valid();
        value["body"] = json!("a".repeat(MAX_BODY_CHARS));
        assert!(decode(&value).is_ok());
    }

    #[test]
    fn garbage_is_invalid_not_a_panic() {
        assert!(Job::decode(b"").is_err());
        assert!(
            Job::decode(b"not json")
                .unwrap_err()
                .0
                .starts_with("not JSON")
        );
        assert_eq!(
            Job::decode(b"[1,2]").unwrap_err().0,
            "not a JSON object: got an array"
        );
        assert!(
            Job::decode(&[0xff, 0xfe, 0x00])
                .unwrap_err()
                .0
                .starts_with("not UTF-8")
        );
        let deep = "[".repeat(100_000);
        assert!(Job::decode(deep.as_bytes()).is_err());
    }

    #[test]
    fn a_nul_character_the_log_could_not_keep_is_invalid() {
        let cases = [
            ("to", json!("+44770090\u{0}0123")),
            ("body", json!("Code\u{0}1234")),
            ("context", json!({"booking_id": 1, "note": ["a\u{0}"]})),
            ("context", json!({"k\u{0}": 1})),
            ("ref", json!("user\u{0}")),
        ];
        for (field, value) in cases {
            let mut job = valid();
            job[field] = value;
            let text = serde_json::to_string(&job).expect("json");
            assert!(text.contains("\\u0000"), "{text}");
            let error = Job::decode(text.as_bytes()).expect_err(field).0;
            assert_eq!(error, format!("{field}: contains a NUL character"));
        }
        let mut bulk = valid();
        bulk["type"] = json!("announcement");
        bulk.as_object_mut().map(|o| o.remove("to"));
        bulk["recipients"] = json!([{"to": "+447700900123"}, {"to": "0770\u{0}0900124"}]);
        assert_eq!(
            Job::decode(bulk.to_string().as_bytes()).expect_err("nul").0,
            "recipients[1].to: contains a NUL character"
        );
        // Anywhere else it is ignored, like any unknown field.
        let mut other = valid();
        other["unknown"] = json!("\u{0}");
        assert!(Job::decode(other.to_string().as_bytes()).is_ok());
    }

    #[test]
    fn recipients_are_for_announcements_only() {
        let mut value = valid();
        value["type"] = json!("announcement");
        value.as_object_mut().map(|o| o.remove("to"));
        value["recipients"] =
            json!([{"to": "+447700900123", "ref": "user-77"}, {"to": "07700900124"}]);
        let job = decode(&value).expect("valid announcement");
        assert!(matches!(job.target, Target::Many(ref r) if r.len() == 2));

        value["type"] = json!("login_code");
        assert_eq!(
            decode(&value).unwrap_err().0,
            "recipients: only an announcement may have recipients"
        );

        value["type"] = json!("announcement");
        value["to"] = json!("+447700900123");
        assert_eq!(
            decode(&value).unwrap_err().0,
            "to and recipients: give one of them, not both"
        );
    }
}
