//! Connections to the real backends (Redis, PostgreSQL, Kafka), each with a readiness check and an
//! error that names the backend. The in-process defaults used when a URL is not configured live
//! beside the traits of the roles that need them.

pub mod breaker;
pub mod kafka;
pub mod postgres;
pub mod redis;
pub mod sentinel;

/// A backend could not be reached or configured. The target is redacted (no password).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{backend} at {target}: {message}")]
pub struct BackendError {
    /// `redis`, `postgres` or `kafka`.
    pub backend: &'static str,
    /// Where we tried, without secrets.
    pub target: String,
    /// What went wrong.
    pub message: String,
}

impl BackendError {
    pub(crate) fn new(
        backend: &'static str,
        target: impl Into<String>,
        message: impl ToString,
    ) -> Self {
        metrics::counter!(crate::telemetry::names::BACKEND_ERRORS, "backend" => backend)
            .increment(1);
        BackendError { backend, target: target.into(), message: message.to_string() }
    }
}

/// Why a dependency check failed: a readiness check (`server::readiness`; its text is what
/// `/ready` shows for the check, so it names the dependency and never a secret) or a breaker's
/// background probe ([`breaker::Probe`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckError {
    /// The dependency answered with an error, or could not be reached.
    #[error("{backend}: {message}")]
    Failed {
        /// `redis`, `postgres`, `kafka`, `entitlements`.
        backend: &'static str,
        /// What went wrong.
        message: String,
    },
    /// A call through the dependency's breaker did not succeed (open, failed, unanswered).
    #[error(transparent)]
    Call(#[from] breaker::CallError),
    /// No answer within the check's timeout.
    #[error("no answer within {0:?}")]
    Timeout(std::time::Duration),
    /// What the role needs before it serves is not there yet (signing keys, a rules snapshot).
    #[error("{0}")]
    NotYet(&'static str),
    /// Every request slot is in use: the server refuses new requests until one frees.
    #[error("all {0} request slots are in use")]
    Saturated(usize),
}

impl CheckError {
    /// A dependency that answered with an error or could not be reached.
    pub fn failed(backend: &'static str, cause: impl std::fmt::Display) -> Self {
        CheckError::Failed { backend, message: cause.to_string() }
    }
}
