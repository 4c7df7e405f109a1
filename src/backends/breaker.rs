//! A breaker per backend connection (Redis, PostgreSQL), so that a dead or frozen dependency
//! costs no request its timeout.
//!
//! Closed: calls go through, each bounded by `trip_after` (well above a healthy round trip, well
//! below the backend's command timeout: a frozen server answers nothing, and waiting for the
//! command timeout is what made every request slow). A call that fails or misses that bound opens
//! the breaker. Open: calls fail at once with [`CallError::Open`], and callers with a fallback use
//! it, so they decide in-process at full speed. A breaker given a probe (a `PING`, a `SELECT 1`)
//! runs it in the background after `open_min`, then at intervals doubling up to `open_max`; the
//! first probe that succeeds closes it. No request ever waits for a probe. Without a probe, one
//! call is let through as the probe once the interval has passed.
//!
//! When the breaker opens, the calls still in flight are released at once
//! ([`CallError::Released`]): they do not each wait for their own deadline. A connection that
//! reports its own loss (a Redis connection closed by the server: see
//! [`crate::backends::redis::Guarded`]) opens the breaker at that moment with [`Breaker::trip`],
//! so a killed server costs no call any wait; a frozen one costs the calls in flight at that
//! moment `trip_after` at most. Every call after that is decided without touching the backend
//! (measured with `scripts/fault-figures.sh`).

use std::future::Future;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;

use super::CheckError;
use crate::role::Role;

/// A background probe: `Ok` when the backend answers.
pub type Probe = Box<dyn Fn() -> BoxFuture<'static, Result<(), CheckError>> + Send + Sync>;

/// Metric names.
pub mod names {
    /// Breaker state per backend and client (which connection): 0 closed, 1 open.
    pub const STATE: &str = "access_backend_breaker_state";
    /// Times a breaker opened, per backend.
    pub const OPENED: &str = "access_backend_breaker_opened_total";
    /// Calls refused at once because the breaker was open, per backend.
    pub const REJECTED: &str = "access_backend_breaker_rejected_total";

    /// Registers the descriptions.
    pub fn describe() {
        metrics::describe_gauge!(STATE, "Backend breaker state: 0 closed, 1 open");
        metrics::describe_counter!(OPENED, "Times a backend breaker opened");
        metrics::describe_counter!(
            REJECTED,
            "Backend calls refused at once because the backend's breaker was open"
        );
    }
}

/// When a breaker opens and for how long (`redis.breaker`, `postgres.breaker`).
pub use crate::config::BreakerConfig as Config;

/// Why a guarded call did not succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// The breaker is open: the call was not made.
    #[error("{0}: breaker open after recent failures; not called")]
    Open(&'static str),
    /// No answer within the call's deadline.
    #[error("{0}: no answer within {1:?}")]
    Timeout(&'static str, Duration),
    /// The backend answered with an error, or the connection failed.
    #[error("{0}: {1}")]
    Failed(&'static str, String),
    /// The call was made, but the breaker opened (another call failed, or the connection was
    /// lost) before its answer came: given up at once. Whether it took effect is unknown.
    #[error("{0}: breaker opened while the call was in flight; given up")]
    Released(&'static str),
}

impl CallError {
    /// Whether the call was refused without being made.
    pub fn is_open(&self) -> bool {
        matches!(self, CallError::Open(_))
    }
}

#[derive(Debug)]
struct State {
    /// `None` while closed; else when the next probe may go.
    open_until: Option<Instant>,
    /// The current open interval (doubles after a failed probe).
    interval: Duration,
    /// A probe is in flight: other calls are refused until it ends.
    probing: bool,
}

/// One backend connection's breaker.
pub struct Breaker {
    backend: &'static str,
    config: Config,
    /// A std mutex: every transition is a few comparisons, never held across I/O.
    state: Mutex<State>,
    /// Run in the background while open; `None`: a call is let through as the probe instead.
    probe: Option<Probe>,
    /// Itself, for the background prober it spawns.
    me: Weak<Breaker>,
    /// Notified when the breaker opens: the calls in flight wait on it beside their answer, so
    /// they are released at once rather than each waiting for its deadline.
    opened_signal: tokio::sync::Notify,
    gauge: metrics::Gauge,
    opened: metrics::Counter,
    rejected: metrics::Counter,
}

impl std::fmt::Debug for Breaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Breaker")
            .field("backend", &self.backend)
            .field("open", &self.is_open())
            .finish()
    }
}

/// A call admitted by the breaker; report its outcome with [`Permit::success`] or
/// [`Permit::failure`]. Dropped unreported (the caller gave up), a probe frees its slot so the
/// next call may probe.
#[derive(Debug)]
pub struct Permit<'a> {
    breaker: &'a Breaker,
    probe: bool,
    reported: bool,
}

impl Permit<'_> {
    /// The backend answered.
    pub fn success(mut self) {
        self.reported = true;
        self.breaker.succeeded();
    }

    /// The backend failed as an outage (refused, timed out, connection lost).
    pub fn failure(mut self) {
        self.reported = true;
        self.breaker.failed(self.probe);
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if self.probe && !self.reported {
            self.breaker.lock().probing = false;
        }
    }
}

impl Breaker {
    /// A closed breaker for `backend` (`redis`, `postgres`, `entitlements`) in `role`, on the
    /// connection `client` uses (`rate_limits`, `revocations`, `decision_cache`, `api_keys`,
    /// `checks`: the `client` label, a closed set); with a `probe`, run in the background while it
    /// is open.
    pub fn new(
        role: Role,
        backend: &'static str,
        client: &'static str,
        config: Config,
        probe: Option<Probe>,
    ) -> Arc<Self> {
        let role = role.as_str();
        let labels = [("role", role), ("backend", backend), ("client", client)];
        let gauge = metrics::gauge!(names::STATE, &labels);
        gauge.set(0.0);
        Arc::new_cyclic(|me| Breaker {
            backend,
            state: Mutex::new(State {
                open_until: None,
                interval: config.open_min,
                probing: false,
            }),
            config,
            probe,
            me: me.clone(),
            opened_signal: tokio::sync::Notify::new(),
            gauge,
            opened: metrics::counter!(names::OPENED, &labels),
            rejected: metrics::counter!(names::REJECTED, &labels),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The backend's name.
    pub fn backend(&self) -> &'static str {
        self.backend
    }

    /// Whether calls are being refused now (open, or a probe in flight).
    pub fn is_open(&self) -> bool {
        self.lock().open_until.is_some()
    }

    /// Admits a call, or refuses it at once while the breaker is open.
    pub fn admit(&self) -> Result<Permit<'_>, CallError> {
        let mut state = self.lock();
        let probe = match state.open_until {
            None => false,
            Some(until) if self.probe.is_none() && Instant::now() >= until && !state.probing => {
                state.probing = true;
                true
            }
            Some(_) => {
                drop(state);
                self.rejected.increment(1);
                return Err(CallError::Open(self.backend));
            }
        };
        Ok(Permit { breaker: self, probe, reported: false })
    }

    fn succeeded(&self) {
        let mut state = self.lock();
        if state.open_until.is_some() {
            tracing::info!(backend = self.backend, "backend answers again; breaker closed");
        }
        *state = State { open_until: None, interval: self.config.open_min, probing: false };
        self.gauge.set(0.0);
    }

    /// A failure opens a closed breaker; a failed probe opens it again for twice as long.
    /// Failures of calls admitted before it opened change nothing more.
    fn failed(&self, probe: bool) {
        let mut state = self.lock();
        let now = Instant::now();
        match (state.open_until, probe) {
            (None, _) => self.open(state, now, "a call failed or went unanswered"),
            (Some(_), true) => {
                state.interval = (state.interval * 2).min(self.config.open_max);
                state.open_until = Some(now + state.interval);
                state.probing = false;
            }
            (Some(_), false) => {}
        }
    }

    /// Opens a closed breaker from outside a call: the connection reported its own loss. Calls
    /// in flight are released and new ones refused until a probe succeeds.
    pub fn trip(&self, why: &str) {
        let state = self.lock();
        if state.open_until.is_none() {
            self.open(state, Instant::now(), why);
        }
    }

    /// Opens the (closed) breaker: for `open_min`, then probed.
    fn open(&self, mut state: std::sync::MutexGuard<'_, State>, now: Instant, why: &str) {
        state.interval = self.config.open_min;
        state.open_until = Some(now + state.interval);
        state.probing = false;
        self.opened.increment(1);
        self.gauge.set(1.0);
        tracing::warn!(backend = self.backend, open_for = ?state.interval, why, "backend failing; breaker open");
        drop(state);
        self.opened_signal.notify_waiters();
        self.spawn_prober();
    }

    /// Probes in the background until a probe succeeds (which closes the breaker), waiting the
    /// open interval before each and doubling it after each failure.
    fn spawn_prober(&self) {
        let (Some(this), Ok(runtime)) = (self.me.upgrade(), tokio::runtime::Handle::try_current())
        else {
            return;
        };
        if this.probe.is_none() {
            return;
        }
        runtime.spawn(async move {
            loop {
                let wait = match this.lock().open_until {
                    None => return,
                    Some(until) => until.saturating_duration_since(Instant::now()),
                };
                tokio::time::sleep(wait).await;
                let Some(probe) = &this.probe else { return };
                match tokio::time::timeout(this.config.trip_after, probe()).await {
                    Ok(Ok(())) => {
                        this.succeeded();
                        return;
                    }
                    _ => this.failed(true),
                }
            }
        });
    }

    /// Runs `call` under the breaker: refused at once when open; failed, and the breaker opened,
    /// when it fails or is unanswered after `trip_after` (or `deadline`, if shorter); released
    /// at once if the breaker opens meanwhile.
    pub async fn call<T, E: std::fmt::Display>(
        &self,
        deadline: Duration,
        call: impl Future<Output = Result<T, E>>,
    ) -> Result<T, CallError> {
        let permit = self.admit()?;
        let deadline = deadline.min(self.config.trip_after);
        // Created before the call starts, so an opening at any later moment wakes it (a
        // `Notified` receives `notify_waiters` from its creation on, polled or not).
        let opened = self.opened_signal.notified();
        let outcome = tokio::select! {
            biased;
            outcome = tokio::time::timeout(deadline, call) => outcome,
            () = opened, if !permit.probe => {
                // Not a failure of this call: the breaker is open already.
                drop(permit);
                return Err(CallError::Released(self.backend));
            }
        };
        match outcome {
            Ok(Ok(value)) => {
                permit.success();
                Ok(value)
            }
            Ok(Err(e)) => {
                permit.failure();
                Err(CallError::Failed(self.backend, e.to_string()))
            }
            Err(_) => {
                permit.failure();
                Err(CallError::Timeout(self.backend, deadline))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    fn config() -> Config {
        Config {
            trip_after: Duration::from_millis(50),
            open_min: Duration::from_millis(40),
            open_max: Duration::from_millis(100),
        }
    }

    fn breaker() -> Arc<Breaker> {
        Breaker::new(Role::Gateway, "test", "test", config(), None)
    }

    #[tokio::test]
    async fn a_failure_opens_it_then_one_probe_closes_it() {
        let b = breaker();
        assert_eq!(b.call(Duration::from_secs(1), async { Ok::<_, String>(1) }).await, Ok(1));
        let failed = b.call(Duration::from_secs(1), async { Err::<(), _>("refused") }).await;
        assert_eq!(failed, Err(CallError::Failed("test", "refused".into())));
        // Open: refused without calling.
        let called = AtomicBool::new(false);
        let refused = b
            .call(Duration::from_secs(1), async {
                called.store(true, Ordering::SeqCst);
                Ok::<_, String>(())
            })
            .await;
        assert!(refused.unwrap_err().is_open());
        assert!(!called.load(Ordering::SeqCst));
        tokio::time::sleep(Duration::from_millis(45)).await;
        // One probe at a time: while it is in flight the others are refused.
        let probe = b.admit().unwrap();
        assert!(b.admit().unwrap_err().is_open());
        probe.success();
        assert!(!b.is_open());
        assert!(b.admit().is_ok());
    }

    #[tokio::test]
    async fn failed_probes_double_the_interval_up_to_the_cap() {
        let b = breaker();
        b.admit().unwrap().failure();
        for expected in [80, 100, 100] {
            let interval = b.lock().interval;
            tokio::time::sleep(interval + Duration::from_millis(5)).await;
            b.admit().unwrap().failure();
            assert_eq!(b.lock().interval, Duration::from_millis(expected));
        }
        // A dropped probe frees the slot.
        tokio::time::sleep(Duration::from_millis(105)).await;
        drop(b.admit().unwrap());
        assert!(b.admit().is_ok(), "the next call may probe");
    }

    #[tokio::test]
    async fn a_call_unanswered_after_trip_after_fails_and_opens_it() {
        let b = breaker();
        let started = Instant::now();
        let r = b.call(Duration::from_secs(2), std::future::pending::<Result<(), String>>()).await;
        assert_eq!(r, Err(CallError::Timeout("test", Duration::from_millis(50))));
        assert!(started.elapsed() < Duration::from_millis(500), "bounded by trip_after");
        assert!(b.is_open());
        let at = Instant::now();
        let behind = b.call(Duration::from_secs(1), async { Ok::<_, String>("x") }).await;
        assert!(behind.unwrap_err().is_open(), "the calls behind it are refused at once");
        assert!(at.elapsed() < Duration::from_millis(5));
    }

    #[tokio::test]
    async fn calls_in_flight_are_released_when_it_opens() {
        let b = breaker();
        let long = Duration::from_secs(10);
        let slow = Breaker::new(
            Role::Gateway,
            "test",
            "test",
            Config { trip_after: long, ..config() },
            None,
        );
        // Calls waiting on a frozen backend; another call fails: all of them are given up now.
        for (b, open) in [(&b, 0), (&slow, 1)] {
            let started = Instant::now();
            let waiting = || b.call(long, std::future::pending::<Result<(), String>>());
            let opener = async {
                tokio::time::sleep(Duration::from_millis(20)).await;
                if open == 0 {
                    let _ = b.call(long, async { Err::<(), _>("refused") }).await;
                } else {
                    b.trip("connection lost");
                }
            };
            let (first, second, ()) = tokio::join!(waiting(), waiting(), opener);
            assert_eq!(first, Err(CallError::Released("test")));
            assert_eq!(second, Err(CallError::Released("test")));
            assert!(started.elapsed() < Duration::from_millis(45), "{:?}", started.elapsed());
            assert!(b.is_open());
        }
        // A trip of an open breaker changes nothing; a closed one after a probe trips again.
        slow.trip("again");
        assert!(slow.is_open());
    }

    #[tokio::test]
    async fn a_background_probe_closes_it_and_no_call_is_let_through_meanwhile() {
        let up = Arc::new(AtomicBool::new(false));
        let probes = Arc::new(AtomicUsize::new(0));
        let (u, p) = (up.clone(), probes.clone());
        let probe: Probe = Box::new(move || {
            p.fetch_add(1, Ordering::SeqCst);
            let ok = u.load(Ordering::SeqCst);
            Box::pin(async move {
                if ok {
                    Ok(())
                } else {
                    Err(CheckError::failed("test", "down"))
                }
            })
        });
        let b = Breaker::new(Role::Gateway, "test", "test", config(), Some(probe));
        b.admit().unwrap().failure();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            b.admit().unwrap_err().is_open(),
            "no call is a probe when one runs in the background"
        );
        assert!(probes.load(Ordering::SeqCst) >= 2, "probed, with backoff");
        up.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(!b.is_open(), "the first good probe closed it");
        let n = probes.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(probes.load(Ordering::SeqCst), n, "no probing while closed");
    }
}
