//! `smsgw send --recipients FILE`: an announcement's recipients from a file, one a line.
//!
//! A line is a number (E.164, or national, read with the school's country), optionally
//! followed by a comma and the recipient's `ref`, which comes back in its events:
//!
//! ```text
//! # term dates
//! +447700900123,user-77
//! 07700 900124
//! ```
//!
//! Blank lines and lines starting with `#` are skipped; white space around the number and
//! the ref is trimmed; the ref is the rest of the line after the first comma. A line that
//! is not a number (a header row, a JSON file given by mistake) is refused, naming its line
//! and never quoting it: it may hold someone's number.

use serde_json::{Value, json};

use super::args::NumberQuery;
use crate::job::MAX_RECIPIENTS;

/// Longest number a job takes, in bytes.
const MAX_NUMBER_BYTES: usize = 40;
/// Longest `ref` a job takes, in bytes.
const MAX_REF_BYTES: usize = 200;

/// Why a recipients file was refused; `line` counts from 1.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecipientsError {
    #[error("line {line}: {problem}")]
    Line { line: usize, problem: String },
    #[error("no recipients (one number a line, optionally followed by a comma and a ref)")]
    Empty,
    #[error("{0} recipients, more than the {MAX_RECIPIENTS} an announcement may have")]
    TooMany(usize),
}

/// The recipients in `text`, as the job's `recipients` entries (`{"to"}` or `{"to", "ref"}`).
pub fn parse_recipients(text: &[u8]) -> Result<Vec<Value>, RecipientsError> {
    let mut recipients = Vec::new();
    for (index, line) in text.split(|&b| b == b'\n').enumerate() {
        let bad = |problem: &str| RecipientsError::Line {
            line: index + 1,
            problem: problem.to_owned(),
        };
        let line = std::str::from_utf8(line).map_err(|_| bad("not UTF-8 text"))?;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (number, reference) = match line.split_once(',') {
            Some((number, reference)) => (number.trim(), Some(reference.trim())),
            None => (line, None),
        };
        NumberQuery::parse(number).map_err(|e| bad(&e.to_string()))?;
        if number.len() > MAX_NUMBER_BYTES {
            return Err(bad("longer than a phone number can be (40 bytes)"));
        }
        let entry = match reference {
            None => json!({ "to": number }),
            Some("") => return Err(bad("an empty ref after the comma")),
            Some(r) if r.len() > MAX_REF_BYTES => {
                return Err(bad("the ref is longer than 200 bytes"));
            }
            Some(r) if r.contains('\0') => return Err(bad("the ref contains a NUL character")),
            Some(r) => json!({ "to": number, "ref": r }),
        };
        recipients.push(entry);
    }
    match recipients.len() {
        0 => Err(RecipientsError::Empty),
        n if n > MAX_RECIPIENTS => Err(RecipientsError::TooMany(n)),
        _ => Ok(recipients),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_with_and_without_a_ref_comments_and_blank_lines() {
        let text =
            b"# term dates\r\n+447700900123, user-77\n\n  07700 900124  \n+447700900125,a,b\n";
        let recipients = parse_recipients(text).expect("valid");
        assert_eq!(
            recipients,
            [
                json!({"to": "+447700900123", "ref": "user-77"}),
                json!({"to": "07700 900124"}),
                json!({"to": "+447700900125", "ref": "a,b"}),
            ]
        );
    }

    #[test]
    fn a_bad_line_is_named_and_never_quoted() {
        let long_ref = format!("+447700900123,{}", "r".repeat(201));
        let cases: [(&[u8], usize, &str); 7] = [
            (b"+447700900123\nphone,ref\n", 2, "not a phone number"),
            (b"[{\"to\": \"+447700900123\"}]", 1, "not a phone number"),
            (b"+447700900123999\n", 1, "not a possible phone number"),
            (b"\n\n,user-1\n", 3, "not a phone number"),
            (b"+447700900123,\n", 1, "an empty ref"),
            (long_ref.as_bytes(), 1, "longer than 200 bytes"),
            (b"+447700900123\n\xff\n", 2, "not UTF-8"),
        ];
        for (text, line, says) in cases {
            let error = parse_recipients(text).expect_err("refused").to_string();
            assert!(
                error.starts_with(&format!("line {line}: ")) && error.contains(says),
                "{error}"
            );
            assert!(!error.contains("7700900123"), "quoted: {error}");
        }
    }

    #[test]
    fn none_or_too_many_are_refused() {
        assert_eq!(
            parse_recipients(b"# nobody yet\n\n"),
            Err(RecipientsError::Empty)
        );
        // National numbers: read later, with the school's country, so this stays quick.
        let many = "07700 900123\n".repeat(MAX_RECIPIENTS + 1);
        assert_eq!(
            parse_recipients(many.as_bytes()),
            Err(RecipientsError::TooMany(MAX_RECIPIENTS + 1))
        );
    }
}
