//! How the lanes consume: how many messages of each may be in flight
//! (`SMSGW_URGENT_CONCURRENCY`, `SMSGW_DEFAULT_CONCURRENCY`, `SMSGW_BULK_CONCURRENCY`),
//! how large jobs are taken (`SMSGW_MAX_JOB_BYTES`, `SMSGW_FANOUT_CHUNK`,
//! `SMSGW_FANOUT_CONCURRENCY`), and how long a stop waits for what is in flight
//! (`SMSGW_SHUTDOWN_GRACE`).

use std::time::Duration;

use super::{
    ConfigError,
    parse::{duration, number},
};
use crate::job::Lane;

/// `SMSGW_MAX_JOB_BYTES` by default, 8 MiB: the contract's largest job, an announcement to
/// 50,000 recipients, at a generous 160 bytes a recipient (`{"to": "+44 7700 900123",
/// "ref": "…"}` with a 40-character number and a 100-byte `ref`, 8,000,000 bytes) leaves
/// 380 KiB for the body (1,600 characters, 19 KiB even written as `\u` escapes), the context
/// (2 KiB) and the rest. It stays under RabbitMQ 4.x's default `max_message_size` (16 MiB).
pub const DEFAULT_MAX_JOB_BYTES: usize = 8 * 1024 * 1024;

/// The lanes' budgets and the bounds of what they take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaneSettings {
    /// How many messages of each lane may be in flight at once.
    pub urgent: u16,
    pub default: u16,
    pub bulk: u16,
    /// Recipients of an announcement fanned out per turn in the bulk lane.
    pub fanout_chunk: usize,
    /// Largest job body accepted; a larger one is dead-lettered before it is decoded.
    pub max_job_bytes: usize,
    /// Large jobs (announcements, in practice) decoded and fanned out at once, per
    /// process: what bounds the memory their decoding takes.
    pub fanout_concurrency: usize,
    /// How long a stop waits for the messages in flight before it leaves them to the
    /// broker.
    pub shutdown_grace: Duration,
}

impl LaneSettings {
    /// How many messages of `lane` may be in flight at once.
    pub fn budget(&self, lane: Lane) -> u16 {
        match lane {
            Lane::Urgent => self.urgent,
            Lane::Default => self.default,
            Lane::Bulk => self.bulk,
        }
    }
}

pub(super) fn lanes(get: &impl Fn(&str) -> Option<String>) -> Result<LaneSettings, ConfigError> {
    Ok(LaneSettings {
        urgent: number(get, "SMSGW_URGENT_CONCURRENCY", 32, 1, 10_000)?,
        default: number(get, "SMSGW_DEFAULT_CONCURRENCY", 256, 1, 10_000)?,
        bulk: number(get, "SMSGW_BULK_CONCURRENCY", 256, 1, 10_000)?,
        shutdown_grace: duration(get, "SMSGW_SHUTDOWN_GRACE", "20s")?,
        fanout_chunk: number(get, "SMSGW_FANOUT_CHUNK", 1_000, 1, 50_000)?,
        max_job_bytes: max_job_bytes(get)?,
        fanout_concurrency: number(get, "SMSGW_FANOUT_CONCURRENCY", 2, 1, 64)?,
    })
}

/// The largest job accepted (`SMSGW_MAX_JOB_BYTES`).
fn max_job_bytes(get: &impl Fn(&str) -> Option<String>) -> Result<usize, ConfigError> {
    let (least, most) = (64 * 1024, 128 * 1024 * 1024);
    number(
        get,
        "SMSGW_MAX_JOB_BYTES",
        DEFAULT_MAX_JOB_BYTES,
        least,
        most,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::settings;

    #[test]
    fn each_lane_has_its_own_budget() {
        let s = settings(&[("SMSGW_URGENT_CONCURRENCY", "3")]).expect("valid");
        let budgets = Lane::ALL.map(|lane| s.lanes.budget(lane));
        assert_eq!(budgets, [3, 256, 256]);
        assert_eq!(
            (s.lanes.max_job_bytes, s.lanes.fanout_concurrency),
            (8_388_608, 2)
        );
    }

    #[test]
    fn job_sizes_and_fan_outs_are_bounded() {
        for (variable, value) in [
            ("SMSGW_FANOUT_CHUNK", "0"),
            ("SMSGW_FANOUT_CHUNK", "1e9"),
            ("SMSGW_MAX_JOB_BYTES", "1000"),
            ("SMSGW_MAX_JOB_BYTES", "8MiB"),
            ("SMSGW_FANOUT_CONCURRENCY", "0"),
        ] {
            let err = settings(&[(variable, value)]).expect_err(value);
            assert_eq!(err.variable, variable, "{value}");
        }
    }
}
