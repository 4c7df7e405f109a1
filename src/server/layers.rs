//! The tower layers every listener shares: request id, trace span and access metrics, load
//! shedding, and the body-size limit. Applied by [`super::app`] in that order, outermost first.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::header::CONTENT_LENGTH;
use http::HeaderName;
use http_body_util::Limited;
use tokio::sync::Semaphore;
use tracing::Instrument;

use crate::error::{ApiError, ErrorCode};
use crate::roles::Role;
use crate::telemetry::names;

/// `X-Request-Id`: generated when absent, echoed on the response, passed upstream.
pub static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// W3C trace context.
pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// Paths exempt from load shedding: probes must answer even when the role is saturated, or the
/// kubelet would restart a pod for being busy.
const PROBES: &[&str] = &["/health", "/ready"];

/// State of the access-log and metrics middleware.
#[derive(Clone)]
pub struct Observe {
    /// The role label.
    pub role: Role,
}

/// One span per request carrying the request id, route and trace id; counts and times every
/// request by route, method and status class.
pub async fn observe(State(o): State<Observe>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let method = method_label(req.method());
    let request_id = header_str(&req, &REQUEST_ID).unwrap_or_default().to_owned();
    let trace_id = header_str(&req, &TRACEPARENT).and_then(trace_id_of).unwrap_or_default();
    let span = tracing::info_span!("request", role = %o.role, request_id = %request_id,
        trace_id = %trace_id, method, route = %route);
    crate::telemetry::adopt_trace_parent(&span, req.headers());
    let response = next.run(req).instrument(span.clone()).await;
    let elapsed = start.elapsed();
    let status = response.status();
    let _entered = span.enter();
    if status.is_server_error() {
        tracing::warn!(
            status = status.as_u16(),
            latency_ms = elapsed.as_secs_f64() * 1e3,
            "request failed"
        );
    } else {
        tracing::debug!(
            status = status.as_u16(),
            latency_ms = elapsed.as_secs_f64() * 1e3,
            "request"
        );
    }
    let labels = [
        ("role", o.role.as_str().to_owned()),
        ("route", route.clone()),
        ("method", method.to_owned()),
        ("status_class", status_class(status.as_u16()).to_owned()),
    ];
    metrics::counter!(names::HTTP_REQUESTS, &labels).increment(1);
    metrics::histogram!(names::HTTP_REQUEST_DURATION, "role" => o.role.as_str(), "route" => route)
        .record(elapsed.as_secs_f64());
    response
}

/// State of the load shedder: one semaphore per listener.
#[derive(Clone)]
pub struct Shed {
    /// The role label.
    pub role: Role,
    /// Permits = `server.max_concurrency`; a request that finds none is refused at once.
    pub permits: Arc<Semaphore>,
}

/// Refuses with 503 when `server.max_concurrency` requests are already in flight, instead of
/// queueing without bound. A permit is held until the handler returns its response head (a
/// streaming body or an upgraded socket no longer holds one; the stream role bounds those itself).
pub async fn shed(State(s): State<Shed>, req: Request, next: Next) -> Response {
    if PROBES.contains(&req.uri().path()) {
        return next.run(req).await;
    }
    match s.permits.clone().try_acquire_owned() {
        Ok(_permit) => next.run(req).await,
        Err(_) => {
            metrics::counter!(names::HTTP_SHED, "role" => s.role.as_str()).increment(1);
            ApiError::new(ErrorCode::DependencyUnavailable, "server is at its concurrency limit")
                .with_retry_after(1)
                .into_response()
        }
    }
}

/// Refuses a declared body over the limit with 413 before reading it, and caps a streamed one:
/// reading past the limit fails, and extractors turn that into 413 too.
pub async fn limit_body(State(max): State<usize>, req: Request, next: Next) -> Response {
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!("request body is larger than {max} bytes"),
        )
        .into_response();
    }
    next.run(req.map(|body| Body::new(Limited::new(body, max)))).await
}

fn header_str<'a>(req: &'a Request, name: &HeaderName) -> Option<&'a str> {
    req.headers().get(name).and_then(|v| v.to_str().ok())
}

/// The trace id of a W3C `traceparent` (`00-<trace id>-<span id>-<flags>`), if well formed.
pub fn trace_id_of(traceparent: &str) -> Option<String> {
    let mut parts = traceparent.trim().split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    let valid = hex(version, 2)
        && version != "ff"
        && hex(trace, 32)
        && trace.bytes().any(|b| b != b'0')
        && hex(span, 16)
        && span.bytes().any(|b| b != b'0')
        && hex(flags, 2);
    valid.then(|| trace.to_ascii_lowercase())
}

/// `2xx`, `4xx`, ...: a closed label set.
pub fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// The method as a closed label set.
pub fn method_label(method: &http::Method) -> &'static str {
    match *method {
        http::Method::GET => "GET",
        http::Method::HEAD => "HEAD",
        http::Method::POST => "POST",
        http::Method::PUT => "PUT",
        http::Method::PATCH => "PATCH",
        http::Method::DELETE => "DELETE",
        http::Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_is_parsed_strictly() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(trace_id_of(good).as_deref(), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-zzf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(trace_id_of(bad), None, "{bad}");
        }
    }

    #[test]
    fn labels_are_a_closed_set() {
        assert_eq!(status_class(204), "2xx");
        assert_eq!(status_class(503), "5xx");
        assert_eq!(method_label(&http::Method::from_bytes(b"BREW").unwrap()), "other");
    }
}
