//! An announcement's `recipients`, read one at a time from the raw JSON.
//!
//! Up to 50,000 recipients as one tree of JSON values would take some fifteen times the
//! body's size, and each pass of a fan-out decodes what is left of the list again. Here
//! the list is split into its entries' raw text (a slice of the body each, no copy), and
//! each entry is decoded and checked on its own. Past [`MAX_RECIPIENTS`] entries are only
//! counted, so a list of millions of tiny entries holds no more than the allowed number.

use std::fmt;

use serde::{
    Deserialize, Deserializer,
    de::{IgnoredAny, SeqAccess, Visitor},
};
use serde_json::{Value, value::RawValue};

use super::{BulkRecipient, InvalidJob, MAX_RECIPIENTS, invalid, kind_of, not_json, recipient_str};

/// The recipients of an announcement, each checked; the first invalid one is named.
pub(super) fn decode(list: &RawValue) -> Result<Vec<BulkRecipient>, InvalidJob> {
    let entries = split(list)?;
    if entries.count == 0 {
        return Err(invalid("recipients: empty"));
    }
    if entries.count > MAX_RECIPIENTS {
        return Err(invalid(format!(
            "recipients: {} entries, more than {MAX_RECIPIENTS}",
            entries.count
        )));
    }
    entries
        .kept
        .iter()
        .enumerate()
        .map(|(i, raw)| {
            let entry: Value = serde_json::from_str(raw.get()).map_err(not_json)?;
            decode_entry(i, &entry)
        })
        .collect()
}

/// The list's entries as raw JSON: at most [`MAX_RECIPIENTS`] kept, all counted.
struct Entries<'a> {
    kept: Vec<&'a RawValue>,
    count: usize,
}

fn split(list: &RawValue) -> Result<Entries<'_>, InvalidJob> {
    if !list.get().starts_with('[') {
        // Not a list: decoded only to name what it is (a type error would quote it).
        let value: Value = serde_json::from_str(list.get()).map_err(not_json)?;
        return Err(invalid(format!(
            "recipients: expected an array, got {}",
            kind_of(&value)
        )));
    }
    serde_json::from_str(list.get()).map_err(not_json)
}

impl<'de> Deserialize<'de> for Entries<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_seq(EntriesVisitor)
    }
}

struct EntriesVisitor;

impl<'de> Visitor<'de> for EntriesVisitor {
    type Value = Entries<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of recipients")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut entries = Entries {
            kept: Vec::new(),
            count: 0,
        };
        while entries.kept.len() < MAX_RECIPIENTS {
            match seq.next_element::<&'de RawValue>()? {
                Some(entry) => entries.kept.push(entry),
                None => break,
            }
        }
        entries.count = entries.kept.len();
        while seq.next_element::<IgnoredAny>()?.is_some() {
            entries.count += 1;
        }
        Ok(entries)
    }
}

/// Recipient `i`: `{"to": "...", "ref": "..."}`, `ref` optional.
fn decode_entry(i: usize, entry: &Value) -> Result<BulkRecipient, InvalidJob> {
    let Value::Object(entry) = entry else {
        return Err(invalid(format!(
            "recipients[{i}]: expected an object, got {}",
            kind_of(entry)
        )));
    };
    let to = match entry.get("to") {
        None | Some(Value::Null) => {
            return Err(invalid(format!("recipients[{i}].to: missing")));
        }
        Some(value) => recipient_str(&format!("recipients[{i}].to"), value)?,
    };
    let reference = match entry.get("ref") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.len() <= 200 => Some(s.clone()),
        Some(Value::String(_)) => {
            return Err(invalid(format!(
                "recipients[{i}].ref: longer than 200 bytes"
            )));
        }
        Some(Value::Number(n)) => Some(n.to_string()),
        Some(other) => {
            return Err(invalid(format!(
                "recipients[{i}].ref: expected a string, got {}",
                kind_of(other)
            )));
        }
    };
    Ok(BulkRecipient {
        to: to.to_owned(),
        reference,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(text: &str) -> Box<RawValue> {
        RawValue::from_string(text.to_owned()).expect("valid JSON")
    }

    #[test]
    fn each_recipient_is_read_and_checked_on_its_own() {
        let list =
            raw(r#"[{"to": "+447700900001", "ref": "a"}, {"to": "07700 900002", "ref": 7}]"#);
        let decoded = decode(&list).expect("valid");
        assert_eq!(decoded[0].reference.as_deref(), Some("a"));
        assert_eq!(decoded[1].to, "07700 900002");
        assert_eq!(decoded[1].reference.as_deref(), Some("7"));
        let bad = raw(r#"[{"to": "+447700900001"}, {"ref": "b"}]"#);
        assert_eq!(
            decode(&bad).expect_err("second has no number").0,
            "recipients[1].to: missing"
        );
        assert_eq!(
            decode(&raw(r#""+447700900001""#))
                .expect_err("not a list")
                .0,
            "recipients: expected an array, got a string"
        );
    }

    #[test]
    fn a_list_too_long_is_counted_without_being_kept() {
        let entries = vec!["0"; MAX_RECIPIENTS + 2].join(",");
        let list = raw(&format!("[{entries}]"));
        let split = split(&list).expect("an array");
        assert_eq!(
            (split.kept.len(), split.count),
            (MAX_RECIPIENTS, MAX_RECIPIENTS + 2)
        );
        assert_eq!(
            decode(&list).expect_err("too many").0,
            format!("recipients: 50002 entries, more than {MAX_RECIPIENTS}")
        );
    }
}
