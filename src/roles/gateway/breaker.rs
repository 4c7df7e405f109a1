//! A circuit breaker per upstream.
//!
//! Closed: requests flow; it opens after `consecutive_failures` failures in a row, or when at
//! least `min_requests` in the current `window` failed at `error_rate` or more. Open: requests are
//! refused (503 `circuit_open`) for `open_for`. Then half-open: one probe goes through; its
//! success closes the breaker, its failure opens it again.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Thresholds.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BreakerConfig {
    /// Failures in a row that open the breaker.
    pub consecutive_failures: u32,
    /// Failure ratio in the window that opens it (with at least `min_requests`).
    pub error_rate: f64,
    /// Requests in the window before `error_rate` is considered.
    pub min_requests: u32,
    /// The error-rate window.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// How long it stays open before a probe.
    #[serde(with = "humantime_serde")]
    pub open_for: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            consecutive_failures: 5,
            error_rate: 0.5,
            min_requests: 20,
            window: Duration::from_secs(10),
            open_for: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Closed,
    Open { until: Instant },
    HalfOpen { probing: bool },
}

#[derive(Debug)]
struct State {
    phase: Phase,
    consecutive: u32,
    window_start: Instant,
    requests: u32,
    failures: u32,
    opened: u64,
}

/// One upstream's breaker.
#[derive(Debug)]
pub struct Breaker {
    config: BreakerConfig,
    /// A std mutex: every transition is a few comparisons, never held across I/O.
    state: Mutex<State>,
}

/// What a request may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Go ahead.
    Pass,
    /// Go ahead as the half-open probe.
    Probe,
    /// Refused: the breaker is open (seconds until it may probe).
    Refuse(u64),
}

impl Breaker {
    /// A closed breaker.
    pub fn new(config: BreakerConfig, now: Instant) -> Self {
        Breaker {
            config,
            state: Mutex::new(State {
                phase: Phase::Closed,
                consecutive: 0,
                window_start: now,
                requests: 0,
                failures: 0,
                opened: 0,
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a request may go to the upstream now.
    pub fn admit(&self, now: Instant) -> Admission {
        let mut s = self.state();
        match s.phase {
            Phase::Closed => Admission::Pass,
            Phase::Open { until } if now < until => {
                Admission::Refuse((until - now).as_secs().max(1))
            }
            Phase::Open { .. } | Phase::HalfOpen { probing: false } => {
                s.phase = Phase::HalfOpen { probing: true };
                Admission::Probe
            }
            Phase::HalfOpen { probing: true } => Admission::Refuse(1),
        }
    }

    /// Records the outcome of an admitted request.
    pub fn record(&self, success: bool, now: Instant) {
        let mut s = self.state();
        if now.duration_since(s.window_start) >= self.config.window {
            s.window_start = now;
            s.requests = 0;
            s.failures = 0;
        }
        s.requests += 1;
        if success {
            s.consecutive = 0;
        } else {
            s.consecutive += 1;
            s.failures += 1;
        }
        let open = |s: &mut State, config: &BreakerConfig| {
            s.phase = Phase::Open { until: now + config.open_for };
            s.opened += 1;
            s.consecutive = 0;
            s.requests = 0;
            s.failures = 0;
            s.window_start = now;
        };
        match s.phase {
            Phase::HalfOpen { .. } if success => s.phase = Phase::Closed,
            Phase::HalfOpen { .. } => open(&mut s, &self.config),
            Phase::Closed => {
                let rate_tripped = s.requests >= self.config.min_requests
                    && f64::from(s.failures) / f64::from(s.requests) >= self.config.error_rate;
                if s.consecutive >= self.config.consecutive_failures || rate_tripped {
                    open(&mut s, &self.config);
                }
            }
            Phase::Open { .. } => {}
        }
    }

    /// `closed`, `open` or `half_open`, and how often it has opened.
    pub fn describe(&self, now: Instant) -> (&'static str, u64) {
        let s = self.state();
        let name = match s.phase {
            Phase::Closed => "closed",
            Phase::Open { until } if now < until => "open",
            Phase::Open { .. } | Phase::HalfOpen { .. } => "half_open",
        };
        (name, s.opened)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> BreakerConfig {
        BreakerConfig {
            consecutive_failures: 3,
            error_rate: 0.5,
            min_requests: 10,
            window: Duration::from_secs(10),
            open_for: Duration::from_secs(5),
        }
    }

    #[test]
    fn consecutive_failures_open_then_a_probe_closes() {
        let t0 = Instant::now();
        let b = Breaker::new(config(), t0);
        for _ in 0..3 {
            assert_eq!(b.admit(t0), Admission::Pass);
            b.record(false, t0);
        }
        assert_eq!(b.describe(t0), ("open", 1));
        assert!(matches!(b.admit(t0 + Duration::from_secs(1)), Admission::Refuse(4)));
        let later = t0 + Duration::from_secs(5);
        assert_eq!(b.admit(later), Admission::Probe);
        assert!(matches!(b.admit(later), Admission::Refuse(_)), "one probe at a time");
        b.record(true, later);
        assert_eq!(b.describe(later).0, "closed");
        assert_eq!(b.admit(later), Admission::Pass);
    }

    #[test]
    fn a_failed_probe_opens_again() {
        let t0 = Instant::now();
        let b = Breaker::new(config(), t0);
        for _ in 0..3 {
            b.record(false, t0);
        }
        let later = t0 + Duration::from_secs(6);
        assert_eq!(b.admit(later), Admission::Probe);
        b.record(false, later);
        assert_eq!(b.describe(later), ("open", 2));
    }

    #[test]
    fn the_error_rate_opens_it_too() {
        let t0 = Instant::now();
        let b = Breaker::new(config(), t0);
        for i in 0..10 {
            b.record(i % 2 == 0, t0);
        }
        assert_eq!(b.describe(t0).0, "open", "5 of 10 failed, never 3 in a row");
        let b = Breaker::new(config(), t0);
        for i in 0..10 {
            b.record(i % 3 != 0, t0);
        }
        assert_eq!(b.describe(t0).0, "closed", "4 of 10 failed");
    }
}
