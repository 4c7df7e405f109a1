//! Logs, metrics and traces.
//!
//! Logs are structured (`json` by default) at `log_level`. Metrics go to one process-wide
//! Prometheus registry (metrics-exporter-prometheus), rendered by every role's `/metrics`; every
//! metric carries a `role` label set where it is recorded, so `access all` keeps them apart.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

use crate::config::{Config, LogFormat};
use crate::roles::Role;

/// Metric names shared across modules, so a rename is one edit (and dashboards can be checked
/// against this list).
pub mod names {
    /// Requests served, by role, route, method and status class.
    pub const HTTP_REQUESTS: &str = "access_http_requests_total";
    /// Request latency, by role and route.
    pub const HTTP_REQUEST_DURATION: &str = "access_http_request_duration_seconds";
    /// Requests refused at the concurrency limit.
    pub const HTTP_SHED: &str = "access_http_requests_shed_total";
    /// Build information (value 1).
    pub const BUILD_INFO: &str = "access_build_info";
    /// Backend connection attempts that failed, by backend.
    pub const BACKEND_ERRORS: &str = "access_backend_errors_total";
}

/// Latency buckets (seconds) for every `_seconds` histogram: 100 µs to 10 s.
const SECONDS_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Starts logging. Call once, in `main`; a second call is ignored (tests may start several roles).
pub fn init_logging(config: &Config) {
    let filter = EnvFilter::try_new(&config.log_level.0).unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    let result = match config.log_format {
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_span_list(false)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
        LogFormat::Text => {
            registry.with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr)).try_init()
        }
    };
    drop(result);
}

/// The process's Prometheus registry, installed as the global `metrics` recorder on first use.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
                .expect("the bucket list is not empty")
                .build_recorder();
            let handle = recorder.handle();
            // Fails only if another recorder was installed first, which this crate never does;
            // the handle still renders what this recorder sees.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            handle
        })
        .clone()
}

/// Sets `access_build_info{role,version} 1`.
pub fn record_build_info(role: Role) {
    metrics::gauge!(names::BUILD_INFO, "role" => role.as_str(), "version" => env!("CARGO_PKG_VERSION"))
        .set(1.0);
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        names::HTTP_REQUESTS,
        "HTTP requests served, by role, route, method and status class"
    );
    describe_histogram!(
        names::HTTP_REQUEST_DURATION,
        Unit::Seconds,
        "HTTP request latency, by role and route"
    );
    describe_counter!(names::HTTP_SHED, "Requests refused with 503 at the concurrency limit");
    describe_gauge!(names::BUILD_INFO, "Build information; the value is always 1");
    describe_counter!(names::BACKEND_ERRORS, "Backend operations that failed, by backend");
}
