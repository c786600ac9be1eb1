//! The v1 job as smsgw publishes it: one message per recipient of an announcement, and
//! the rest of an announcement whose fan-out goes on.
//!
//! Encoding destructures the whole [`Job`], so a field added to it fails to compile here
//! until it is encoded too: nothing is silently dropped from the jobs smsgw publishes.

use serde::{Serialize, Serializer};
use serde_json::Value;
use time::{OffsetDateTime, format_description::well_known::Rfc3339};
use uuid::Uuid;

use super::{BulkRecipient, Job, Target};

/// A job as it goes on the wire, borrowing from the [`Job`]. Serialised straight to bytes:
/// the recipients of a large announcement never become a tree of JSON values.
#[derive(Serialize)]
struct Wire<'a> {
    id: Uuid,
    #[serde(rename = "type")]
    kind: &'static str,
    school_id: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    to: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    recipients: Option<Recipients<'a>>,
    body: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    context: Option<&'a Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    not_before: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_at: Option<String>,
    #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
    reference: Option<&'a str>,
}

/// An announcement's recipients, written one by one as the serialiser asks for them.
struct Recipients<'a>(&'a [BulkRecipient]);

impl Serialize for Recipients<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0.iter().map(|r| WireRecipient {
            to: &r.to,
            reference: r.reference.as_deref(),
        }))
    }
}

#[derive(Serialize)]
struct WireRecipient<'a> {
    to: &'a str,
    #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
    reference: Option<&'a str>,
}

impl Job {
    /// The job as JSON, in the format [`Job::decode`] reads.
    pub fn encode(&self) -> Vec<u8> {
        let Job {
            id,
            kind,
            school_id,
            target,
            body,
            context,
            not_before,
            expires_at,
            reference,
        } = self;
        let (to, recipients) = match target {
            Target::One(to) => (Some(to.as_str()), None),
            Target::Many(recipients) => (None, Some(Recipients(recipients))),
        };
        let wire = Wire {
            id: *id,
            kind: kind.as_str(),
            school_id: *school_id,
            to,
            recipients,
            body,
            context: context.as_ref(),
            not_before: time_text(*not_before),
            expires_at: time_text(*expires_at),
            reference: reference.as_deref(),
        };
        // Strings, numbers, a UUID and a JSON value: nothing here can fail to serialise
        // (that takes a map with keys that are not strings, or a failing Serialize impl).
        serde_json::to_vec(&wire).expect("a job always serialises")
    }

    /// The message for one recipient of this announcement: its own id, number and `ref`,
    /// everything else as the announcement has it.
    pub fn for_recipient(&self, id: Uuid, to: String, reference: Option<String>) -> Job {
        Job {
            id,
            target: Target::One(to),
            reference,
            ..self.clone_without_target()
        }
    }

    /// This announcement without its first `skip` recipients: what is left to fan out.
    pub fn without_first_recipients(&self, skip: usize) -> Job {
        let rest = match &self.target {
            Target::Many(recipients) => recipients[skip.min(recipients.len())..].to_vec(),
            Target::One(_) => Vec::new(),
        };
        Job {
            target: Target::Many(rest),
            ..self.clone_without_target()
        }
    }

    /// A copy that does not clone a list of recipients only to replace it.
    fn clone_without_target(&self) -> Job {
        Job {
            id: self.id,
            kind: self.kind,
            school_id: self.school_id,
            target: Target::Many(Vec::new()),
            body: self.body.clone(),
            context: self.context.clone(),
            not_before: self.not_before,
            expires_at: self.expires_at,
            reference: self.reference.clone(),
        }
    }
}

fn time_text(at: Option<OffsetDateTime>) -> Option<String> {
    at.and_then(|at| at.format(&Rfc3339).ok())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::job::JobType;
    use time::macros::datetime;

    fn announcement() -> Job {
        Job {
            id: Uuid::from_u128(7),
            kind: JobType::Announcement,
            school_id: 42,
            target: Target::Many(vec![
                BulkRecipient {
                    to: "+447700900001".into(),
                    reference: Some("student-1".into()),
                },
                BulkRecipient {
                    to: "07700 900002".into(),
                    reference: None,
                },
            ]),
            body: "Closed on Friday – sorry! 🚗".into(),
            context: Some(json!({ "announcement_id": 9 })),
            not_before: Some(datetime!(2026-12-04 08:00 UTC)),
            expires_at: Some(datetime!(2026-12-05 08:00:00.5 UTC)),
            reference: None,
        }
    }

    #[test]
    fn every_field_survives_a_round_trip() {
        let job = announcement();
        assert_eq!(Job::decode(&job.encode()), Ok(job.clone()));
        let child = job.for_recipient(Uuid::from_u128(8), "+447700900001".into(), Some("s".into()));
        assert_eq!(Job::decode(&child.encode()), Ok(child));
    }

    #[test]
    fn a_recipients_message_keeps_the_announcement_but_not_its_list() {
        let job = announcement();
        let child = job.for_recipient(Uuid::from_u128(8), "+447700900002".into(), None);
        assert_eq!(child.target, Target::One("+447700900002".into()));
        assert_eq!(child.id, Uuid::from_u128(8));
        assert_eq!(
            (
                child.body.as_str(),
                child.context.as_ref(),
                child.expires_at
            ),
            (job.body.as_str(), job.context.as_ref(), job.expires_at)
        );
    }

    #[test]
    fn the_rest_of_an_announcement_starts_after_the_first_chunk() {
        let job = announcement();
        let rest = job.without_first_recipients(1);
        let Target::Many(left) = &rest.target else {
            panic!("an announcement stays an announcement");
        };
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].to, "07700 900002");
        assert_eq!(rest.id, job.id);
    }
}
