//! Retry pacing and the circuit breaker that keeps an outage from hammering the database.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The delay before retry number `attempt` (0-based): exponential from `initial`, capped at
/// `max`, with the upper half jittered so writers that failed together do not retry together.
pub fn backoff(attempt: u32, initial: Duration, max: Duration) -> Duration {
    let ceiling = initial
        .saturating_mul(1u32.checked_shl(attempt).unwrap_or(u32::MAX))
        .min(max);
    ceiling / 2 + ceiling.mul_f64(fastrand::f64() / 2.0)
}

enum State {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// One probe is allowed through; its result closes or re-opens the breaker.
    HalfOpen,
}

/// Closed: calls go through. After `threshold` failures in a row it opens: calls are refused
/// (the writer spools instead) for `cooldown`, then one probe is let through.
pub struct Breaker {
    state: Mutex<State>,
    threshold: u32,
    cooldown: Duration,
}

impl Breaker {
    pub fn new(threshold: u32, cooldown: Duration) -> Breaker {
        Breaker {
            state: Mutex::new(State::Closed { failures: 0 }),
            threshold: threshold.max(1),
            cooldown,
        }
    }

    /// Whether a call may go to the database now.
    pub fn allow(&self) -> bool {
        let mut state = self.state.lock().expect("breaker lock");
        match *state {
            State::Closed { .. } => true,
            State::Open { until } if Instant::now() >= until => {
                *state = State::HalfOpen;
                true
            }
            State::Open { .. } | State::HalfOpen => false,
        }
    }

    pub fn is_closed(&self) -> bool {
        matches!(
            *self.state.lock().expect("breaker lock"),
            State::Closed { .. }
        )
    }

    pub fn success(&self) {
        let mut state = self.state.lock().expect("breaker lock");
        if !matches!(*state, State::Closed { .. }) {
            tracing::info!("database reachable again: circuit closed");
        }
        *state = State::Closed { failures: 0 };
    }

    /// Records a failed call; returns true when this failure opened the circuit.
    pub fn failure(&self) -> bool {
        let mut state = self.state.lock().expect("breaker lock");
        let open = match *state {
            State::Closed { failures } if failures + 1 < self.threshold => {
                *state = State::Closed {
                    failures: failures + 1,
                };
                false
            }
            State::Open { .. } => false,
            State::Closed { .. } | State::HalfOpen => true,
        };
        if open {
            *state = State::Open {
                until: Instant::now() + self.cooldown,
            };
            tracing::warn!(cooldown = ?self.cooldown, "database failing: circuit open, batches go to the spool");
        }
        open
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_and_stays_within_bounds() {
        let (initial, max) = (Duration::from_millis(100), Duration::from_secs(2));
        for attempt in 0..40 {
            let ceiling = (initial * 2u32.saturating_pow(attempt.min(20))).min(max);
            let d = backoff(attempt, initial, max);
            assert!(d >= ceiling / 2 && d <= ceiling, "attempt {attempt}: {d:?}");
        }
    }

    #[test]
    fn opens_after_the_threshold_then_lets_one_probe_through_after_the_cooldown() {
        let breaker = Breaker::new(3, Duration::from_millis(30));
        assert!(!breaker.failure() && !breaker.failure());
        assert!(breaker.allow());
        assert!(breaker.failure(), "the third failure in a row opens it");
        assert!(!breaker.allow());
        std::thread::sleep(Duration::from_millis(40));
        assert!(breaker.allow(), "one probe after the cooldown");
        assert!(!breaker.allow(), "only one");
        assert!(breaker.failure(), "a failed probe opens it again");
        assert!(!breaker.allow());
        std::thread::sleep(Duration::from_millis(40));
        assert!(breaker.allow());
        breaker.success();
        assert!(breaker.is_closed() && breaker.allow() && breaker.allow());
    }
}
