//! Pacing: how fast a provider may be called.
//!
//! Each gateway may have its own rate (`rate` in the provider config) and the whole
//! process may have one more (`SMSGW_RATE_LIMIT`); a call waits until both allow it.
//!
//! A message passes two gates per rate:
//!
//! 1. [`Pace::admit`], before its attempt is claimed, is where it waits its turn (a crash
//!    during a long wait then leaves nothing to reconcile). It is `governor`'s GCRA, one
//!    message every `1.005 / rate` seconds: evenly spaced, 0.5% under the rate. Its burst of
//!    two lets a waiter that woke a millisecond late (timers are coarse) make that time
//!    up, instead of losing it on every call and falling several percent short.
//! 2. [`Pace::call`], right before the call, is the hard ceiling: it lets a call through
//!    only while fewer than `rate` calls went out in the last 1.01 seconds. The 10 ms
//!    are for the jitter between here and the provider: a call that has to open a
//!    connection first arrives later than one that reuses it. Claiming takes a few
//!    milliseconds, more or less, and can bunch calls up; this gate holds them back. At
//!    full speed it is the one that binds, so the average is 1% under the rate.
//!
//! A provider that answers "too many requests" (HTTP 429, Twilio 20429) pauses that
//! gateway for every task in the process, for its `Retry-After` or a second, instead of
//! each task finding out for itself.
//!
//! In the daemon a rate is the account's, shared with every other replica: the first gate
//! is then a call slot leased from the account's clock ([`SharedClock`]), and the call
//! waits for that slot exactly, and nothing else holds it back once the slot has come.

use std::{
    collections::VecDeque,
    num::NonZeroU32,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use super::clock::SharedClock;

/// The spacing of admissions, as a multiple of `1 / rate`: 0.5% under the rate.
const SPACING: f64 = 1.005;
/// The window of the ceiling: a second and 10 ms, for the jitter after the gate.
const WINDOW: Duration = Duration::from_millis(1_010);
/// How long before its slot a call's turn comes: the claim is made meanwhile, so that the
/// call itself goes out on time.
const LEAD: Duration = Duration::from_millis(50);
/// How late after its slot a call may still go out: the margin the clock's spacing
/// leaves (3%, 30 ms of each second) less the time from here to the provider.
const MAX_LATE: Duration = Duration::from_millis(10);
/// How long a provider is paused after a 429 that named no `Retry-After`.
const DEFAULT_PAUSE: Duration = Duration::from_secs(1);
/// Longest pause a provider's `Retry-After` may impose on every task at once.
const MAX_PAUSE: Duration = Duration::from_secs(60);

/// The two gates of one rate.
#[derive(Debug)]
pub struct Gates {
    rate: u32,
    admit: DefaultDirectRateLimiter,
    /// When the calls of the last window went out, oldest first.
    calls: Mutex<VecDeque<Instant>>,
}

impl Gates {
    /// `rate` calls per second, at least one.
    pub fn per_second(rate: u32) -> Self {
        let rate = rate.max(1);
        let period = Duration::from_secs_f64(SPACING / f64::from(rate));
        // `with_period` refuses only a zero period, which `rate <= u32::MAX` never gives.
        let quota = Quota::with_period(period)
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
            .allow_burst(NonZeroU32::MIN.saturating_add(1));
        Gates {
            rate,
            admit: RateLimiter::direct(quota),
            calls: Mutex::new(VecDeque::new()),
        }
    }

    pub fn rate(&self) -> u32 {
        self.rate
    }

    async fn admit(&self) {
        self.admit.until_ready().await;
    }

    /// Waits until fewer than `rate` calls went out in the last window, and counts this
    /// one.
    async fn call(&self) {
        loop {
            let wait = {
                let mut calls = self
                    .calls
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                let now = Instant::now();
                while calls
                    .front()
                    .is_some_and(|at| now.duration_since(*at) >= WINDOW)
                {
                    calls.pop_front();
                }
                match calls.front() {
                    Some(oldest) if calls.len() >= self.rate as usize => {
                        WINDOW - now.duration_since(*oldest)
                    }
                    _ => {
                        calls.push_back(now);
                        return;
                    }
                }
            };
            tokio::time::sleep(wait).await;
        }
    }
}

/// The pace of one gateway: its own limiter, the process-wide one, and a pause set by
/// the provider itself; in the daemon, also the account's clock both rates share with
/// the other replicas.
#[derive(Debug)]
pub struct Pace {
    own: Option<Gates>,
    global: Option<Arc<Gates>>,
    shared: Option<SharedClock>,
    paused_until: Mutex<Option<Instant>>,
}

/// Waits for `slot`. A wake-up later than [`MAX_LATE`] (a busy machine) gives the slot up
/// for a fresh one: a call that late could crowd the calls of the slots after it. The
/// attempt is already claimed, so the fresh slot is waited for as long as it takes (a
/// bound would let calls out late, over the rate): behind the messages already waiting
/// their turn, or until the database answers again, when the outcome could not be
/// recorded anyway. A stop in between leaves the attempt to be reconciled, as a crash
/// would.
async fn on_time(mut slot: tokio::time::Instant, clock: &SharedClock) {
    loop {
        tokio::time::sleep_until(slot).await;
        let late = slot.elapsed();
        if late <= MAX_LATE {
            return;
        }
        tracing::debug!(?late, "woke too late for the call slot; taking another");
        slot = clock.slot().await;
    }
}

/// A message's turn: how long it waited, and the instant its call may go out.
#[derive(Debug, Clone, Copy)]
pub struct Turn {
    pub waited: Duration,
    slot: Option<tokio::time::Instant>,
}

impl Pace {
    /// Rates kept by this process alone.
    pub fn new(rate: Option<u32>, global: Option<Arc<Gates>>) -> Self {
        Pace {
            own: rate.map(Gates::per_second),
            global,
            shared: None,
            paused_until: Mutex::new(None),
        }
    }

    /// Rates shared with every replica through `clock`; this process's own ceilings stay.
    pub fn shared(rate: Option<u32>, global: Option<Arc<Gates>>, clock: SharedClock) -> Self {
        Pace {
            shared: Some(clock),
            ..Pace::new(rate, global)
        }
    }

    /// Without any limit: calls go as fast as they come.
    pub fn unlimited() -> Self {
        Pace::new(None, None)
    }

    /// The rate calls are held to, if any: the lower of the two limits.
    pub fn rate(&self) -> Option<u32> {
        match (&self.own, &self.global) {
            (Some(own), Some(global)) => Some(own.rate().min(global.rate())),
            (Some(own), None) => Some(own.rate()),
            (None, Some(global)) => Some(global.rate()),
            (None, None) => None,
        }
    }

    /// The first gate: waits for this message's turn (and for the end of a pause the
    /// provider asked for).
    pub async fn admit(&self) -> Turn {
        let started = Instant::now();
        loop {
            let pause = self.pause_left();
            if pause.is_zero() {
                break;
            }
            tokio::time::sleep(pause).await;
        }
        let slot = match &self.shared {
            Some(clock) => {
                let slot = clock.slot().await;
                tokio::time::sleep_until(slot - LEAD).await;
                Some(slot)
            }
            None => {
                self.admit_locally().await;
                None
            }
        };
        Turn {
            waited: started.elapsed(),
            slot,
        }
    }

    async fn admit_locally(&self) {
        if let Some(own) = &self.own {
            own.admit().await;
        }
        if let Some(global) = &self.global {
            global.admit().await;
        }
    }

    /// The second gate, right before the call: the turn's slot on the account's clock;
    /// without one, this process's hard ceiling. (After the slot nothing may hold the
    /// call back: it would go out late and crowd the next slots.)
    pub async fn call(&self, turn: &Turn) {
        if let (Some(slot), Some(clock)) = (turn.slot, &self.shared) {
            on_time(slot, clock).await;
            return;
        }
        if let Some(own) = &self.own {
            own.call().await;
        }
        if let Some(global) = &self.global {
            global.call().await;
        }
    }

    /// The provider said it is being called too fast: nobody calls it for `retry_after`
    /// (or a second when it did not say).
    pub fn throttled(&self, retry_after: Option<Duration>) {
        let pause = retry_after.unwrap_or(DEFAULT_PAUSE).min(MAX_PAUSE);
        let until = Instant::now() + pause;
        let mut paused = self
            .paused_until
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if paused.is_none_or(|current| current < until) {
            *paused = Some(until);
        }
    }

    /// How long the provider's own pause still lasts.
    pub fn pause_left(&self) -> Duration {
        let paused = self
            .paused_until
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        paused.map_or(Duration::ZERO, |until| {
            until.saturating_duration_since(Instant::now())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn calls_are_spaced_at_no_more_than_the_rate() {
        let pace = Pace::new(Some(200), None);
        let started = Instant::now();
        for _ in 0..41 {
            let turn = pace.admit().await;
            pace.call(&turn).await;
        }
        // 40 gaps of at least 5 ms each (less the burst of two).
        assert!(started.elapsed() >= Duration::from_millis(195));
    }

    #[tokio::test]
    async fn the_ceiling_holds_even_when_calls_bunch_up() {
        let gates = Gates::per_second(10);
        let started = Instant::now();
        // Eleven calls at once, past the first gate: the eleventh waits for the window.
        for _ in 0..11 {
            gates.call().await;
        }
        assert!(started.elapsed() >= WINDOW - Duration::from_millis(5));
    }

    #[tokio::test]
    async fn the_lower_of_the_two_limits_wins() {
        let global = Arc::new(Gates::per_second(100));
        assert_eq!(Pace::new(Some(500), Some(global.clone())).rate(), Some(100));
        assert_eq!(Pace::new(Some(20), Some(global)).rate(), Some(20));
        assert_eq!(Pace::unlimited().rate(), None);
    }

    #[tokio::test]
    async fn a_throttled_provider_is_paused_for_its_retry_after() {
        let pace = Pace::unlimited();
        pace.throttled(Some(Duration::from_millis(150)));
        // A shorter pause never cuts a longer one short.
        pace.throttled(Some(Duration::from_millis(10)));
        assert!(pace.pause_left() > Duration::from_millis(100));
        let waited = pace.admit().await.waited;
        assert!(waited >= Duration::from_millis(140), "{waited:?}");
        assert_eq!(pace.pause_left(), Duration::ZERO);
    }

    #[test]
    fn a_retry_after_of_an_hour_pauses_at_most_a_minute() {
        let pace = Pace::unlimited();
        pace.throttled(Some(Duration::from_secs(3600)));
        assert!(pace.pause_left() <= MAX_PAUSE);
    }
}
