//! Liveness is cheap, readiness is honest.
//!
//! `/health` never touches a dependency. `/ready` answers 200 only when start-up work is done, the
//! process is not draining, and every registered dependency check passes within its timeout; else
//! 503 naming each failing one. A soft check (a dependency the role can serve without, such as
//! the entitlements role's PostgreSQL for reads) only turns the status to `degraded`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use serde::Serialize;

use super::Shutdown;
pub use crate::backends::CheckError;

/// A dependency check: `Ok` when the dependency answers.
pub trait ReadyCheck: Send + Sync {
    /// Checks once; the error names what is wrong, without secrets.
    fn check(&self) -> BoxFuture<'_, Result<(), CheckError>>;
}

/// A check of start-up state held in memory (signing keys, a rules snapshot): passes once
/// `loaded` says so, else fails with `missing` (no I/O; the state's own task fetches it).
pub fn loaded(
    loaded: impl Fn() -> bool + Send + Sync + 'static,
    missing: &'static str,
) -> impl ReadyCheck {
    move || -> BoxFuture<'static, Result<(), CheckError>> {
        let ok = loaded();
        Box::pin(async move {
            if ok {
                Ok(())
            } else {
                Err(CheckError::NotYet(missing))
            }
        })
    }
}

impl<F> ReadyCheck for F
where
    F: Fn() -> BoxFuture<'static, Result<(), CheckError>> + Send + Sync,
{
    fn check(&self) -> BoxFuture<'_, Result<(), CheckError>> {
        self()
    }
}

/// A registered check: its name, the check, and whether it is soft.
type Registered = (&'static str, Arc<dyn ReadyCheck>, bool);

/// The readiness of one role: its checks, whether start-up is done, and the shutdown state.
#[derive(Clone)]
pub struct Readiness {
    inner: Arc<Inner>,
}

struct Inner {
    /// Written at start-up, read per probe: a std lock held only to clone the list. The flag
    /// marks a soft check: failing, it reports `degraded` but keeps the role ready.
    checks: RwLock<Vec<Registered>>,
    started: AtomicBool,
    shutdown: Shutdown,
    timeout: Duration,
    since: Instant,
}

/// What `/ready` reports.
#[derive(Debug, Serialize)]
pub struct Report {
    /// `ready`, `degraded` (a soft check fails; still ready), `starting`, `draining` or
    /// `not_ready`.
    pub status: &'static str,
    /// Each check by name: `ok` or the error.
    pub checks: Vec<CheckResult>,
}

/// The values of `/ready`'s `status` (the schema of [`Report::status`]).
#[derive(utoipa::ToSchema)]
#[schema(as = ReadinessStatus, rename_all = "snake_case")]
#[allow(dead_code)]
pub enum Status {
    /// Every check passes.
    Ready,
    /// A soft check fails; the role still serves.
    Degraded,
    /// Start-up work is not done.
    Starting,
    /// Shutting down.
    Draining,
    /// A hard check fails.
    NotReady,
}

/// One check's outcome.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CheckResult {
    /// The dependency (`redis`, `postgres`, `kafka`, `jwks`, ...).
    #[schema(example = "redis")]
    pub name: &'static str,
    /// Whether it answered.
    pub ok: bool,
    /// Whether the role keeps serving without it.
    pub soft: bool,
    /// Why not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Report {
    /// Whether the role is ready (degraded counts: it still serves).
    pub fn is_ready(&self) -> bool {
        matches!(self.status, "ready" | "degraded")
    }
}

impl Readiness {
    /// Readiness that is "starting" until [`Readiness::mark_started`].
    pub fn new(shutdown: Shutdown, timeout: Duration) -> Self {
        Readiness {
            inner: Arc::new(Inner {
                checks: RwLock::new(Vec::new()),
                started: AtomicBool::new(false),
                shutdown,
                timeout,
                since: Instant::now(),
            }),
        }
    }

    /// Registers a dependency check under a name: failing, the role is not ready.
    pub fn add_check(&self, name: &'static str, check: impl ReadyCheck + 'static) {
        let mut checks = self.inner.checks.write().unwrap_or_else(|p| p.into_inner());
        checks.push((name, Arc::new(check), false));
    }

    /// Registers a check the role can serve without (it degrades): failing, `/ready` still
    /// answers 200 with status `degraded` and names it, so load balancers keep sending traffic.
    pub fn add_soft_check(&self, name: &'static str, check: impl ReadyCheck + 'static) {
        let mut checks = self.inner.checks.write().unwrap_or_else(|p| p.into_inner());
        checks.push((name, Arc::new(check), true));
    }

    /// Start-up work is done.
    pub fn mark_started(&self) {
        self.inner.started.store(true, Ordering::Release);
    }

    /// How long since this role began starting.
    pub fn uptime(&self) -> Duration {
        self.inner.since.elapsed()
    }

    /// Runs every check concurrently, each under the timeout.
    pub async fn report(&self) -> Report {
        let checks: Vec<_> = self.inner.checks.read().unwrap_or_else(|p| p.into_inner()).clone();
        let results =
            futures::future::join_all(checks.iter().map(|(name, check, soft)| async move {
                let outcome = match tokio::time::timeout(self.inner.timeout, check.check()).await {
                    Ok(outcome) => outcome,
                    Err(_) => Err(CheckError::Timeout(self.inner.timeout)),
                };
                let error = outcome.err().map(|e| e.to_string());
                CheckResult { name, ok: error.is_none(), soft: *soft, error }
            }))
            .await;
        let status = if self.inner.shutdown.is_draining() {
            "draining"
        } else if !self.inner.started.load(Ordering::Acquire) {
            "starting"
        } else if results.iter().all(|r| r.ok) {
            "ready"
        } else if results.iter().all(|r| r.ok || r.soft) {
            "degraded"
        } else {
            "not_ready"
        };
        Report { status, checks: results }
    }
}
