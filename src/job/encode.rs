//! The v1 job as smsgw publishes it: one message per recipient of an announcement, and
//! the rest of an announcement whose fan-out goes on.
//!
//! Encoding destructures the whole [`Job`], so a field added to it fails to compile here
//! until it is encoded too: nothing is silently dropped from the jobs smsgw publishes.

use serde_json::{Map, Value, json};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};
use uuid::Uuid;

use super::{BulkRecipient, Job, Target};

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
        let mut job = Map::new();
        job.insert("id".into(), json!(id));
        job.insert("type".into(), json!(kind.as_str()));
        job.insert("school_id".into(), json!(school_id));
        match target {
            Target::One(to) => job.insert("to".into(), json!(to)),
            Target::Many(recipients) => {
                job.insert("recipients".into(), recipients_json(recipients))
            }
        };
        job.insert("body".into(), json!(body));
        let optional = [
            ("context", context.clone()),
            ("not_before", time_json(*not_before)),
            ("expires_at", time_json(*expires_at)),
            ("ref", reference.as_ref().map(|r| json!(r))),
        ];
        for (field, value) in optional {
            if let Some(value) = value {
                job.insert(field.into(), value);
            }
        }
        Value::Object(job).to_string().into_bytes()
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

fn recipients_json(recipients: &[BulkRecipient]) -> Value {
    recipients
        .iter()
        .map(|r| match &r.reference {
            Some(reference) => json!({ "to": r.to, "ref": reference }),
            None => json!({ "to": r.to }),
        })
        .collect()
}

fn time_json(at: Option<OffsetDateTime>) -> Option<Value> {
    at.and_then(|at| at.format(&Rfc3339).ok())
        .map(Value::String)
}

#[cfg(test)]
mod tests {
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
