//! Logs, metrics and traces.
//!
//! Logs are structured (`json` by default) at `log_level`. Metrics go to one process-wide
//! Prometheus registry (metrics-exporter-prometheus), rendered by every role's `/metrics`; every
//! metric carries a `role` label set where it is recorded, so `access all` keeps them apart.
//! Traces: with `enable_tracing`, spans are exported over OTLP/HTTP (protobuf) to `otel_exporter`
//! in batches from a background thread, an incoming W3C `traceparent` becomes the parent of the
//! request's span, and every outgoing call carries the context of the span it is made in
//! ([`inject_trace_context`], [`trace_headers`]), so the callee's spans join the same trace.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

use crate::config::{Config, LogFormat};
use crate::role::Role;

/// Metric names shared across modules, so a rename is one edit (and dashboards can be checked
/// against this list).
pub mod names {
    /// Requests served, by role, route, method and status class.
    pub const HTTP_REQUESTS: &str = "access_http_requests_total";
    /// Request latency, by role and route.
    pub const HTTP_REQUEST_DURATION: &str = "access_http_request_duration_seconds";
    /// Requests refused at the concurrency limit.
    pub const HTTP_SHED: &str = "access_http_requests_shed_total";
    /// Requests refused at the edge, by reason (`invalid_path`, `too_many_in_flight`,
    /// `body_timeout`).
    pub const HTTP_REFUSED: &str = "access_http_requests_refused_total";
    /// Connections refused at accept, by reason (`too_many_connections`).
    pub const CONNECTIONS_REFUSED: &str = "access_http_connections_refused_total";
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

/// Keeps the trace exporter alive; [`Telemetry::shutdown`] flushes what is buffered.
#[must_use = "dropping the guard without shutdown() loses the last spans"]
pub struct Telemetry {
    tracer: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Telemetry {
    /// Flushes and stops the trace exporter (at most a few seconds).
    pub fn shutdown(self) {
        if let Some(provider) = self.tracer {
            if let Err(e) = provider.shutdown_with_timeout(std::time::Duration::from_secs(5)) {
                tracing::warn!(error = %e, "could not flush the last spans");
            }
        }
    }
}

/// Why telemetry could not start (a configuration error: `access` exits with its config code).
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The OTLP trace exporter for the configured endpoint could not be built.
    #[error("OTLP exporter for {endpoint}: {source}")]
    Exporter {
        /// `otel_exporter`.
        endpoint: String,
        /// The cause.
        #[source]
        source: opentelemetry_otlp::ExporterBuildError,
    },
}

/// Starts logging, and trace export when enabled. Call once, in the process's entry point; a
/// second call only logs (tests may start several roles in one process).
pub fn init(config: &Config, service: &str) -> Result<Telemetry, TelemetryError> {
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_otlp::WithExportConfig as _;
    let filter = EnvFilter::try_new(&config.log_level.0).unwrap_or_else(|_| EnvFilter::new("info"));
    let (tracer, otel_layer) = match (&config.enable_tracing, &config.otel_exporter) {
        (true, Some(endpoint)) => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_endpoint(endpoint.as_str())
                .with_timeout(std::time::Duration::from_secs(5))
                .build()
                .map_err(|source| TelemetryError::Exporter {
                    endpoint: endpoint.to_string(),
                    source,
                })?;
            let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(
                    opentelemetry_sdk::Resource::builder()
                        .with_service_name(service.to_string())
                        .build(),
                )
                .build();
            opentelemetry::global::set_text_map_propagator(
                opentelemetry_sdk::propagation::TraceContextPropagator::new(),
            );
            let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("access"));
            (Some(provider), Some(layer))
        }
        _ => (None, None),
    };
    let registry = tracing_subscriber::registry().with(filter).with(otel_layer);
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
    Ok(Telemetry { tracer })
}

/// Reads W3C trace context from request headers.
pub struct HeaderExtractor<'a>(pub &'a http::HeaderMap);

impl opentelemetry::propagation::Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// Writes W3C trace context into request headers; an empty value (no `tracestate`) removes the
/// header, so a stale copy from the incoming request is not passed on.
struct HeaderInjector<'a>(&'a mut http::HeaderMap);

impl opentelemetry::propagation::Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        let Ok(name) = http::HeaderName::from_bytes(key.as_bytes()) else { return };
        match http::HeaderValue::from_str(&value) {
            Ok(value) if !value.is_empty() => {
                self.0.insert(name, value);
            }
            _ => {
                self.0.remove(name);
            }
        }
    }
}

/// Sets `traceparent` (and `tracestate` when the trace has one) of an outgoing request to the
/// current span's context, replacing what the headers held: the callee's spans become children
/// of this process's span, which is itself the child of the caller's `traceparent`, if any. A
/// no-op without tracing (headers are left as they are) or outside a span.
pub fn inject_trace_context(headers: &mut http::HeaderMap) {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let context = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&context, &mut HeaderInjector(headers))
    });
}

/// The trace headers for an outgoing call made in the current span (empty without tracing), for
/// a `reqwest` request: `.headers(trace_headers())`.
pub fn trace_headers() -> http::HeaderMap {
    let mut headers = http::HeaderMap::new();
    inject_trace_context(&mut headers);
    headers
}

/// Makes the request's `traceparent` (if any) the parent of `span`; a no-op without tracing.
pub fn adopt_trace_parent(span: &tracing::Span, headers: &http::HeaderMap) {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let parent =
        opentelemetry::global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(headers)));
    let _ = span.set_parent(parent);
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

/// Describes the metrics of this module (the other modules describe their own: `roles::describe_metrics`).
pub fn describe() {
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
    describe_counter!(
        names::HTTP_REFUSED,
        "Requests refused at the edge by reason (invalid_path, too_many_in_flight, body_timeout)"
    );
    describe_counter!(
        names::CONNECTIONS_REFUSED,
        "Connections refused at accept by reason (too_many_connections)"
    );
    describe_gauge!(names::BUILD_INFO, "Build information; the value is always 1");
    describe_counter!(names::BACKEND_ERRORS, "Backend operations that failed, by backend");
}
