//! One rate for the whole account: call slots leased from clocks kept in PostgreSQL, the
//! store every replica already shares.
//!
//! Each rate has a clock (`sms_rate_clocks`). A replica that wants to call leases a few
//! consecutive slots from it (about a tenth of a second's worth), and each call waits for
//! its own slot. The database hands every instant out once, and the instants of one
//! clock are never closer together than `SPACING / rate` seconds, so the calls of all
//! replicas together stay under the rate, however many replicas run; a replica that has
//! work keeps leasing, so the rate is used in full whichever replicas have the work.
//!
//! A call goes out a little after its slot (timers, the claim, the network): if that
//! delay varies by less than `(SPACING - 1)` seconds, 30 ms, no one-second window holds
//! more than `rate` calls. So a call that would go out more than 10 ms late takes a fresh
//! slot (`pace`), and a slot is placed on this process's clock by the wall clock, held
//! within the lease's round trip ([`place`]), so that an answer read late does not make
//! every slot of the batch late. A replica holds at most [`LOOKAHEAD`] of slots ahead, so
//! one that dies takes that much of the rate with it, once. Slots left unused for longer
//! than [`STALE`] are dropped, not used late.
//!
//! A clock far ahead of the database's time (a clock step) starts again from now (see the
//! `rate_clock_steps` migration), with a warning.
//!
//! The cost is one statement per lease, about ten a second per rate, whatever the rate;
//! a call under two rates leases alone, one statement per call ([`batch_size`]).

use std::{
    collections::VecDeque,
    time::{Duration, SystemTime},
};

use backon::Retryable;
use tokio::{sync::watch, time::Instant};

use crate::store::{ClockSpacing, LeaseStart, Store, StoreError};

/// Slot spacing as a multiple of `1 / rate`: 3% under the rate, the margin for the delay
/// between a slot and its call.
pub const SPACING: f64 = 1.03;
/// How much of the rate one lease takes.
const LEASE_SPAN: Duration = Duration::from_millis(100);
/// A replica leases no more while its last slot is further ahead than this.
const LOOKAHEAD: Duration = Duration::from_millis(250);
/// A slot this far in the past is dropped: a call that late could crowd the next ones.
const STALE: Duration = Duration::from_millis(5);

/// The clocks one gateway's calls take slots from (its own rate, the account-wide
/// `SMSGW_RATE_LIMIT`, or both at once).
#[derive(Debug)]
pub struct SharedClock {
    clocks: Vec<ClockSpacing>,
    /// Slots per lease.
    batch: u32,
    store: watch::Receiver<Option<Store>>,
    leased: tokio::sync::Mutex<Leased>,
}

/// The slots this replica holds, earliest first.
#[derive(Debug, Default)]
struct Leased {
    slots: VecDeque<Instant>,
    last: Option<Instant>,
}

/// A clock's name in `sms_rate_clocks`, and its rate in calls per second.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rate {
    pub clock: String,
    pub per_second: u32,
}

impl SharedClock {
    /// `store` is the daemon's store, once it is connected.
    pub fn new(rates: &[Rate], store: watch::Receiver<Option<Store>>) -> Self {
        let clocks: Vec<ClockSpacing> = rates
            .iter()
            .map(|rate| ClockSpacing {
                name: rate.clock.clone(),
                spacing: Duration::from_secs_f64(SPACING / f64::from(rate.per_second.max(1))),
            })
            .collect();
        SharedClock {
            batch: batch_size(&clocks),
            clocks,
            store,
            leased: tokio::sync::Mutex::new(Leased::default()),
        }
    }

    /// This call's slot: the instant it may go out. Waits while the replica already
    /// holds [`LOOKAHEAD`] of slots, and while the database cannot be reached.
    pub async fn slot(&self) -> Instant {
        let mut leased = self.leased.lock().await;
        loop {
            let now = Instant::now();
            if let Some(slot) = leased.take(now) {
                return slot;
            }
            if let Some(last) = leased.last.filter(|last| *last > now + LOOKAHEAD) {
                tokio::time::sleep_until(last - LOOKAHEAD).await;
                continue;
            }
            if let Some((first, step)) = self.lease().await {
                leased.add(first, step, self.batch);
            }
        }
    }

    /// Leases the next batch, trying again until the database answers. Returns the first
    /// slot and the spacing of the rest; `None` only if trying again ever stops, and then
    /// no slot is invented.
    async fn lease(&self) -> Option<(Instant, Duration)> {
        let store = self.connected_store().await;
        // Each try times its own round trip: an outage before it must not widen the span
        // the slot is placed in.
        let once = || async {
            let sent = Instant::now();
            let start = store.lease_slots(&self.clocks, self.batch).await?;
            Ok::<_, StoreError>((start, sent, Instant::now(), SystemTime::now()))
        };
        let (start, sent, answered, wall) = once
            .retry(crate::retry::patiently())
            .notify(|e: &StoreError, wait| {
                tracing::warn!(error = %e, retry_in = ?wait, "cannot lease call slots");
            })
            .await
            .ok()?;
        if start.clock_stepped {
            tracing::warn!(
                clocks = ?self.clocks.iter().map(|c| &c.name).collect::<Vec<_>>(),
                "a rate clock was far ahead of the database's time (a clock step?): \
                 it starts again from now"
            );
        }
        Some((place(start, sent, answered, wall), self.step()))
    }

    async fn connected_store(&self) -> Store {
        let mut store = self.store.clone();
        loop {
            if let Some(store) = store.borrow_and_update().clone() {
                return store;
            }
            if store.changed().await.is_err() {
                // The daemon is stopping: no call will be made anyway.
                std::future::pending::<()>().await;
            }
        }
    }

    /// The spacing of slots that serve every clock at once: the largest.
    fn step(&self) -> Duration {
        self.clocks
            .iter()
            .map(|c| c.spacing)
            .max()
            .unwrap_or(Duration::ZERO)
    }
}

impl Leased {
    /// The earliest slot still usable, dropping those gone stale.
    fn take(&mut self, now: Instant) -> Option<Instant> {
        while let Some(slot) = self.slots.pop_front() {
            if slot + STALE >= now {
                return Some(slot);
            }
        }
        None
    }

    fn add(&mut self, first: Instant, step: Duration, count: u32) {
        for n in 0..count {
            let slot = first + step * n;
            self.slots.push_back(slot);
            self.last = Some(slot);
        }
    }
}

/// Where a lease's first slot falls on this process's clock. The database made the lease
/// somewhere between `sent` and `answered`, so the slot lies `start.after` past a point
/// in that span. The wall clock (kept in step with the database's by NTP) places it
/// exactly unless the two clocks disagree, so it is used, held inside the span. A busy
/// process that reads the answer late then still places the slot where it belongs.
fn place(start: LeaseStart, sent: Instant, answered: Instant, wall_now: SystemTime) -> Instant {
    let earliest = sent + start.after;
    let latest = answered + start.after;
    let wall_now = wall_now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |since| since.as_secs_f64());
    let ahead = start.unix_seconds - wall_now;
    let by_wall = if ahead >= 0.0 {
        answered.checked_add(Duration::from_secs_f64(ahead.min(3_600.0)))
    } else {
        answered.checked_sub(Duration::from_secs_f64((-ahead).min(3_600.0)))
    };
    by_wall.map_or(latest, |at| at.clamp(earliest, latest))
}

/// About [`LEASE_SPAN`] of slots; one when a call needs a slot of two clocks at once, as
/// the database keeps each clock's spacing only for slots it hands out together.
fn batch_size(clocks: &[ClockSpacing]) -> u32 {
    match clocks {
        [one] => {
            let span = LEASE_SPAN.as_secs_f64() / one.spacing.as_secs_f64().max(1e-6);
            (span.floor() as u32).clamp(1, 1_000)
        }
        _ => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clock(rate: u32) -> ClockSpacing {
        ClockSpacing {
            name: format!("r{rate}"),
            spacing: Duration::from_secs_f64(SPACING / f64::from(rate)),
        }
    }

    #[test]
    fn a_lease_takes_about_a_tenth_of_a_second_of_the_rate() {
        assert_eq!(batch_size(&[clock(1_000)]), 97);
        assert_eq!(batch_size(&[clock(50)]), 4);
        // Slower than ten a second: one slot at a time.
        assert_eq!(batch_size(&[clock(2)]), 1);
        assert_eq!(batch_size(&[clock(100), clock(1_000)]), 1);
    }

    #[test]
    fn stale_slots_are_dropped_not_used_late() {
        let now = Instant::now();
        let mut leased = Leased::default();
        leased.add(
            now - Duration::from_millis(50),
            Duration::from_millis(20),
            4,
        );
        // 50 and 30 ms ago are stale; 10 ms ago too; the fourth is 10 ms ahead.
        assert_eq!(leased.take(now), Some(now + Duration::from_millis(10)));
        assert_eq!(leased.take(now), None);
    }

    fn lease_at(after_ms: u64, unix_seconds: f64) -> LeaseStart {
        LeaseStart {
            after: Duration::from_millis(after_ms),
            unix_seconds,
            clock_stepped: false,
        }
    }

    #[test]
    fn a_slot_read_late_is_placed_by_the_wall_clock() {
        let sent = Instant::now();
        let answered = sent + Duration::from_millis(80);
        let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        // Leased 10 ms after sending, first slot 50 ms after that: 20 ms before the
        // answer was read.
        let start = lease_at(50, 1_000.0 - 0.020);
        let placed = place(start, sent, answered, wall);
        assert_eq!(placed, answered - Duration::from_millis(20));
    }

    #[test]
    fn a_wall_clock_out_of_step_is_held_to_what_the_round_trip_allows() {
        let sent = Instant::now();
        let answered = sent + Duration::from_millis(4);
        let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        // The database's clock says the slot is 2 s away; the lease said 50 ms.
        let start = lease_at(50, 1_002.0);
        assert_eq!(
            place(start, sent, answered, wall),
            answered + Duration::from_millis(50)
        );
        let start = lease_at(50, 990.0);
        assert_eq!(
            place(start, sent, answered, wall),
            sent + Duration::from_millis(50)
        );
    }
}
