//! The account-wide rate clocks (`sms_rate_clocks`): every replica leases its call slots
//! from them, so that all replicas together keep each rate (see the `shared_rates`
//! migration and `provider::clock`).

use std::time::Duration;

use super::{Store, StoreError};

/// A clock and the spacing of its slots.
#[derive(Debug, Clone, PartialEq)]
pub struct ClockSpacing {
    pub name: String,
    pub spacing: Duration,
}

/// When a lease's first slot is, as the database saw it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LeaseStart {
    /// After the lease was made.
    pub after: Duration,
    /// As a Unix time, in seconds.
    pub unix_seconds: f64,
    /// A clock was far ahead of the database's time (a clock step) and started again
    /// from now.
    pub clock_stepped: bool,
}

impl Store {
    /// Leases `slots` consecutive call slots on every clock of `clocks` at once. The rest
    /// follow the first at the largest of the clocks' spacings.
    pub async fn lease_slots(
        &self,
        clocks: &[ClockSpacing],
        slots: u32,
    ) -> Result<LeaseStart, StoreError> {
        const LEASE: &str = "SELECT starts_in, starts_at, stepped FROM sms_lease_slots($1, $2, $3)";
        let names: Vec<&str> = clocks.iter().map(|c| c.name.as_str()).collect();
        let spacings: Vec<f64> = clocks.iter().map(|c| c.spacing.as_secs_f64()).collect();
        let slots = i32::try_from(slots.max(1)).unwrap_or(i32::MAX);
        let row = self
            .row(LEASE, &[&names, &spacings, &slots])
            .await?
            .ok_or_else(|| StoreError::Corrupt("no lease row".into()))?;
        let after: f64 = row.try_get(0)?;
        Ok(LeaseStart {
            // The function never answers a negative wait; read one as "now".
            after: Duration::try_from_secs_f64(after).unwrap_or(Duration::ZERO),
            unix_seconds: row.try_get(1)?,
            clock_stepped: row.try_get(2)?,
        })
    }
}
