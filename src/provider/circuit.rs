//! A circuit breaker per provider: after a run of outage-like failures (unreachable,
//! timeouts, 5xx) the provider's traffic pauses for a cool-down instead of pushing every
//! job through its retry tiers into `sms.dead`; then one probe call decides whether it is
//! back.
//!
//! ```text
//!   Closed --(threshold failures in a row)--> Open --(cool-down over)--> HalfOpen
//!     ^                                        ^                           |
//!     +------------(probe succeeds)------------+-------(probe fails)-------+
//! ```

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

/// What a caller may do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permit {
    /// Call the provider.
    Call,
    /// Call the provider: this call is the probe that decides whether it is back.
    Probe,
    /// Do not call; come back after this long.
    Wait(Duration),
}

/// How a call ended, as the circuit sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallResult {
    /// The provider answered (accepted, refused or throttled): it is up.
    Answered,
    /// Unreachable, timed out or 5xx: it may be down.
    Failed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// A probe is out since `since`; if it never reports back (its task was abandoned),
    /// another may go after `probe_timeout`.
    HalfOpen {
        since: Instant,
    },
}

/// For `/metrics`: 0 closed, 1 half-open, 2 open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    Closed = 0,
    HalfOpen = 1,
    Open = 2,
}

#[derive(Debug)]
pub struct Circuit {
    provider: &'static str,
    threshold: u32,
    cooldown: Duration,
    probe_timeout: Duration,
    state: Mutex<State>,
}

impl Circuit {
    /// `threshold` failures in a row open the circuit for `cooldown`; a probe that has not
    /// reported within `probe_timeout` is considered lost.
    pub fn new(
        provider: &'static str,
        threshold: u32,
        cooldown: Duration,
        probe_timeout: Duration,
    ) -> Self {
        Circuit {
            provider,
            threshold: threshold.max(1),
            cooldown,
            probe_timeout,
            state: Mutex::new(State::Closed { failures: 0 }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock leaves a plain value behind; keep using it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn permit(&self) -> Permit {
        self.permit_at(Instant::now())
    }

    fn permit_at(&self, now: Instant) -> Permit {
        let mut state = self.lock();
        match *state {
            State::Closed { .. } => Permit::Call,
            State::Open { until } if now >= until => {
                *state = State::HalfOpen { since: now };
                tracing::info!(provider = self.provider, "circuit half-open: probing");
                Permit::Probe
            }
            State::Open { until } => Permit::Wait(until - now),
            State::HalfOpen { since } if now.duration_since(since) >= self.probe_timeout => {
                *state = State::HalfOpen { since: now };
                Permit::Probe
            }
            State::HalfOpen { since } => {
                Permit::Wait(self.probe_timeout.saturating_sub(now.duration_since(since)))
            }
        }
    }

    pub fn record(&self, result: CallResult) {
        self.record_at(result, Instant::now());
    }

    fn record_at(&self, result: CallResult, now: Instant) {
        let mut state = self.lock();
        let next = match (*state, result) {
            (State::Closed { .. }, CallResult::Answered) => State::Closed { failures: 0 },
            (State::Closed { failures }, CallResult::Failed) if failures + 1 >= self.threshold => {
                tracing::warn!(
                    provider = self.provider,
                    failures = failures + 1,
                    cooldown = ?self.cooldown,
                    "circuit open: pausing calls to the provider"
                );
                State::Open {
                    until: now + self.cooldown,
                }
            }
            (State::Closed { failures }, CallResult::Failed) => State::Closed {
                failures: failures + 1,
            },
            (State::HalfOpen { .. } | State::Open { .. }, CallResult::Answered) => {
                tracing::info!(
                    provider = self.provider,
                    "circuit closed: the provider answers again"
                );
                State::Closed { failures: 0 }
            }
            (State::HalfOpen { .. }, CallResult::Failed) => {
                tracing::warn!(provider = self.provider, "probe failed: circuit open again");
                State::Open {
                    until: now + self.cooldown,
                }
            }
            // Calls that started before the circuit opened: nothing to add.
            (State::Open { until }, CallResult::Failed) => State::Open { until },
        };
        *state = next;
    }

    pub fn state(&self) -> CircuitState {
        match *self.lock() {
            State::Closed { .. } => CircuitState::Closed,
            State::HalfOpen { .. } => CircuitState::HalfOpen,
            State::Open { .. } => CircuitState::Open,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn circuit() -> Circuit {
        Circuit::new("test", 3, Duration::from_secs(10), Duration::from_secs(2))
    }

    #[test]
    fn a_run_of_failures_opens_it_and_an_answer_resets_the_run() {
        let c = circuit();
        let t = Instant::now();
        c.record_at(CallResult::Failed, t);
        c.record_at(CallResult::Failed, t);
        c.record_at(CallResult::Answered, t);
        c.record_at(CallResult::Failed, t);
        c.record_at(CallResult::Failed, t);
        assert_eq!(c.permit_at(t), Permit::Call);
        c.record_at(CallResult::Failed, t);
        assert_eq!(c.state(), CircuitState::Open);
        assert_eq!(
            c.permit_at(t + Duration::from_secs(4)),
            Permit::Wait(Duration::from_secs(6))
        );
    }

    #[test]
    fn after_the_cooldown_one_probe_decides() {
        let c = circuit();
        let t = Instant::now();
        for _ in 0..3 {
            c.record_at(CallResult::Failed, t);
        }
        let later = t + Duration::from_secs(10);
        assert_eq!(c.permit_at(later), Permit::Probe);
        assert!(
            matches!(c.permit_at(later), Permit::Wait(_)),
            "one probe at a time"
        );
        c.record_at(CallResult::Failed, later);
        assert_eq!(c.state(), CircuitState::Open);
        let again = later + Duration::from_secs(10);
        assert_eq!(c.permit_at(again), Permit::Probe);
        c.record_at(CallResult::Answered, again);
        assert_eq!(c.state(), CircuitState::Closed);
        assert_eq!(c.permit_at(again), Permit::Call);
    }

    #[test]
    fn a_lost_probe_is_replaced() {
        let c = circuit();
        let t = Instant::now();
        for _ in 0..3 {
            c.record_at(CallResult::Failed, t);
        }
        let later = t + Duration::from_secs(10);
        assert_eq!(c.permit_at(later), Permit::Probe);
        assert_eq!(c.permit_at(later + Duration::from_secs(3)), Permit::Probe);
    }
}
