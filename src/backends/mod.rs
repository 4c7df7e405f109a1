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
