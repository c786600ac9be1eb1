//! Pacing: how fast a provider may be called.
//!
//! Each gateway may have its own rate (`rate` in the provider config) and the whole
//! process may have one more (`SMSGW_RATE_LIMIT`); a call waits until both allow it. The
//! limiters are `governor`'s GCRA with a burst of one, so calls are evenly spaced rather
//! than let out in a rush at the start of each second, and the spacing is 1% longer than
//! `1 / rate` so that no one-second window, however it is placed, holds more than `rate`
//! calls.
//!
//! A message passes two gates. The first, [`Pace::admit`], is where it waits its turn,
//! before its attempt is claimed: a crash during a long wait then leaves nothing to
//! reconcile. Claiming takes a few milliseconds, more or less, which would bunch calls
//! up; so the second gate, [`Pace::call`], right before the call, spaces them again. It
//! has the same rate, so after the first it only ever waits for those milliseconds.
//!
//! A provider that answers "too many requests" (HTTP 429, Twilio 20429) pauses that
//! gateway for every task in the process, for its `Retry-After` or a second, instead of
//! each task finding out for itself.

use std::{
    num::NonZeroU32,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

/// The spacing between calls, as a multiple of `1 / rate`: 1% slower than the rate
/// allows, so that up to 10 ms of jitter never puts `rate + 1` calls into one second.
const SPACING: f64 = 1.01;
/// How long a provider is paused after a 429 that named no `Retry-After`.
const DEFAULT_PAUSE: Duration = Duration::from_secs(1);
/// Longest pause a provider's `Retry-After` may impose on every task at once.
const MAX_PAUSE: Duration = Duration::from_secs(60);

/// A rate limiter for calls, evenly spaced.
#[derive(Debug)]
pub struct Limiter {
    rate: u32,
    inner: DefaultDirectRateLimiter,
}

impl Limiter {
    /// `rate` calls per second, at least one.
    pub fn per_second(rate: u32) -> Self {
        let rate = rate.max(1);
        let period = Duration::from_secs_f64(SPACING / f64::from(rate));
        // `with_period` refuses only a zero period, which `rate <= u32::MAX` never gives.
        let quota = Quota::with_period(period)
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
            .allow_burst(NonZeroU32::MIN);
        Limiter {
            rate,
            inner: RateLimiter::direct(quota),
        }
    }

    pub fn rate(&self) -> u32 {
        self.rate
    }

    async fn until_ready(&self) {
        self.inner.until_ready().await;
    }
}

/// The pace of one gateway: its own limiter, the process-wide one, and a pause set by
/// the provider itself.
#[derive(Debug)]
pub struct Pace {
    own: Option<Gates>,
    global: Option<Arc<Gates>>,
    paused_until: Mutex<Option<Instant>>,
}

/// The two gates of one rate.
#[derive(Debug)]
pub struct Gates {
    admit: Limiter,
    call: Limiter,
}

impl Gates {
    pub fn per_second(rate: u32) -> Self {
        Gates {
            admit: Limiter::per_second(rate),
            call: Limiter::per_second(rate),
        }
    }
}

impl Pace {
    pub fn new(rate: Option<u32>, global: Option<Arc<Gates>>) -> Self {
        Pace {
            own: rate.map(Gates::per_second),
            global,
            paused_until: Mutex::new(None),
        }
    }

    /// Without any limit: calls go as fast as they come.
    pub fn unlimited() -> Self {
        Pace::new(None, None)
    }

    /// The rate calls are held to, if any: the lower of the two limits.
    pub fn rate(&self) -> Option<u32> {
        match (&self.own, &self.global) {
            (Some(own), Some(global)) => Some(own.call.rate().min(global.call.rate())),
            (Some(own), None) => Some(own.call.rate()),
            (None, Some(global)) => Some(global.call.rate()),
            (None, None) => None,
        }
    }

    /// The first gate: waits for this message's turn (and for the end of a pause the
    /// provider asked for). Returns how long that took.
    pub async fn admit(&self) -> Duration {
        let started = Instant::now();
        loop {
            let pause = self.pause_left();
            if pause.is_zero() {
                break;
            }
            tokio::time::sleep(pause).await;
        }
        if let Some(own) = &self.own {
            own.admit.until_ready().await;
        }
        if let Some(global) = &self.global {
            global.admit.until_ready().await;
        }
        started.elapsed()
    }

    /// The second gate, right before the call: restores the spacing.
    pub async fn call(&self) {
        if let Some(own) = &self.own {
            own.call.until_ready().await;
        }
        if let Some(global) = &self.global {
            global.call.until_ready().await;
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
            pace.admit().await;
            pace.call().await;
        }
        // 40 gaps of at least 5 ms each.
        assert!(started.elapsed() >= Duration::from_millis(200));
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
        let waited = pace.admit().await;
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
