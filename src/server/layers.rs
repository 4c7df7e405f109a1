//! The layer every listener shares, one tower service doing, outermost first: the request id
//! (kept or generated, echoed on the response), one trace span and the access metrics per
//! request, the client's address ([`super::client`]), its share of the request slots, load
//! shedding, and the body's size limit and read deadline. Applied by [`super::app`].
//!
//! One hand-written service rather than a stack of `from_fn` middlewares and tower-http's
//! request-id pair: each of those boxed and cloned the rest of the stack per request, and
//! together they took about a fifth of the gateway's CPU on a cache hit
//! (`scripts/bench-gateway.sh`, perf).

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{ConnectInfo, MatchedPath, Request};
use axum::response::{IntoResponse, Response};
use futures::future::BoxFuture;
use http::header::CONTENT_LENGTH;
use http::{HeaderName, HeaderValue};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::Limited;
use metrics::{Counter, Histogram};
use tokio::sync::Semaphore;
use tower::{Layer, Service, ServiceExt};
use tracing::Instrument;

use super::client::{client_addr, ClientAddr, PerKey};
use crate::config::ServerConfig;
use crate::error::{ApiError, ErrorCode};
use crate::role::Role;
use crate::telemetry::names;

/// `X-Request-Id`: generated when absent, echoed on the response, passed upstream.
pub static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// W3C trace context.
pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// Paths exempt from load shedding: probes must answer even when the role is saturated, or the
/// kubelet would restart a pod for being busy.
const PROBES: &[&str] = &["/health", "/ready"];

/// The shared layer's settings, built once per listener.
#[derive(Clone)]
pub struct Shared(Arc<SharedInner>);

struct SharedInner {
    role: Role,
    /// Permits = `server.max_concurrency`; a request that finds none is refused at once with
    /// 503 instead of queueing without bound. A permit is held until the handler returns its
    /// response head (a streaming body or an upgraded socket no longer holds one; the stream role
    /// bounds those itself).
    permits: Semaphore,
    max_concurrency: usize,
    /// Requests in flight per client address (`server.max_in_flight_per_client`): taken before a
    /// permit, so one client never holds more than its share of them.
    per_client: Arc<PerKey<IpAddr>>,
    trusted_proxies: Vec<ipnet::IpNet>,
    max_body: usize,
    body_read_timeout: Duration,
    metrics: RouteMetrics,
}

impl Shared {
    /// For `role`, with the `server` section's limits.
    pub fn new(role: Role, server: &ServerConfig) -> Self {
        Shared(Arc::new(SharedInner {
            role,
            permits: Semaphore::new(server.max_concurrency),
            max_concurrency: server.max_concurrency,
            per_client: PerKey::new(server.max_in_flight_per_client),
            trusted_proxies: server.trusted_proxies.clone(),
            max_body: server.max_body_bytes,
            body_read_timeout: server.body_read_timeout,
            metrics: RouteMetrics::new(role, names::HTTP_REQUESTS, names::HTTP_REQUEST_DURATION),
        }))
    }

    /// Whether every request slot is taken (`server.max_concurrency`): `/ready` reports it.
    pub fn saturated(&self) -> Option<crate::backends::CheckError> {
        (self.0.permits.available_permits() == 0)
            .then_some(crate::backends::CheckError::Saturated(self.0.max_concurrency))
    }
}

impl<S> Layer<S> for Shared {
    type Service = SharedService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        SharedService { shared: self.clone(), inner }
    }
}

/// [`Shared`] around a route's service.
#[derive(Clone)]
pub struct SharedService<S> {
    shared: Shared,
    inner: S,
}

impl<S> Service<Request> for SharedService<S>
where
    S: Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // Readiness is the inner service's business at call time (`oneshot`).
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let (shared, inner) = (self.shared.clone(), self.inner.clone());
        Box::pin(async move { Ok(shared.0.handle(req, inner).await) })
    }
}

impl SharedInner {
    async fn handle<S>(&self, mut req: Request, inner: S) -> Response
    where
        S: Service<Request, Response = Response, Error = Infallible>,
    {
        let start = Instant::now();
        // A client's id is kept only when it is one short token (it goes into logs, traces and
        // upstream requests); anything else, or a second copy, is replaced by a fresh id.
        let mut given = req.headers().get_all(&REQUEST_ID).iter();
        let request_id = match (given.next(), given.next()) {
            (Some(id), None) if valid_request_id(id.as_bytes()) => id.clone(),
            _ => {
                let id = HeaderValue::from_str(&uuid::Uuid::new_v4().to_string())
                    .unwrap_or(HeaderValue::from_static("invalid"));
                req.headers_mut().insert(REQUEST_ID.clone(), id.clone());
                id
            }
        };
        if let Some(ConnectInfo(peer)) = req.extensions().get::<ConnectInfo<SocketAddr>>() {
            let client = client_addr(peer.ip(), req.headers(), &self.trusted_proxies);
            req.extensions_mut().insert(ClientAddr(client));
        }
        let route = req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_owned());
        let route = route.as_deref().unwrap_or("unmatched");
        let method = method_label(req.method());
        let span = tracing::info_span!("request", role = %self.role,
            request_id = %request_id.to_str().unwrap_or_default(),
            trace_id = %header_str(&req, &TRACEPARENT).and_then(trace_id_of).unwrap_or_default(),
            method, route = %route);
        let mut response = if span.is_disabled() {
            self.admitted(req, inner).await
        } else {
            crate::telemetry::adopt_trace_parent(&span, req.headers());
            self.admitted(req, inner).instrument(span.clone()).await
        };
        let elapsed = start.elapsed();
        let status = response.status();
        if status.is_server_error() {
            let _entered = span.enter();
            tracing::warn!(
                status = status.as_u16(),
                latency_ms = elapsed.as_secs_f64() * 1e3,
                "request failed"
            );
        } else if tracing::enabled!(tracing::Level::DEBUG) {
            let _entered = span.enter();
            tracing::debug!(
                status = status.as_u16(),
                latency_ms = elapsed.as_secs_f64() * 1e3,
                "request"
            );
        }
        if status.is_client_error() && response.extensions().get::<Proxied>().is_none() {
            response = json_rejection(response).await;
        }
        self.metrics.record(route, method, status.as_u16(), elapsed.as_secs_f64());
        response.headers_mut().entry(&REQUEST_ID).or_insert(request_id);
        response
    }

    /// The client's share of the slots, load shedding, then the body limits, then the route.
    async fn admitted<S>(&self, req: Request, inner: S) -> Response
    where
        S: Service<Request, Response = Response, Error = Infallible>,
    {
        if PROBES.contains(&req.uri().path()) {
            return self.limited(req, inner).await;
        }
        let client = req.extensions().get::<ClientAddr>().map(|c| c.0);
        let _client_slot = match client.map(|c| self.per_client.try_acquire(c)) {
            Some(None) => {
                metrics::counter!(names::HTTP_REFUSED, "role" => self.role.as_str(),
                    "reason" => "too_many_in_flight")
                .increment(1);
                return ApiError::new(
                    ErrorCode::RateLimited,
                    "too many requests in flight from this address",
                )
                .with_reason("too_many_in_flight")
                .with_retry_after(1)
                .into_response();
            }
            Some(Some(slot)) => slot,
            None => None,
        };
        match self.permits.try_acquire() {
            Ok(_permit) => self.limited(req, inner).await,
            Err(_) => {
                metrics::counter!(names::HTTP_SHED, "role" => self.role.as_str()).increment(1);
                ApiError::new(
                    ErrorCode::DependencyUnavailable,
                    "server is at its concurrency limit",
                )
                .with_reason("overloaded")
                .with_retry_after(1)
                .into_response()
            }
        }
    }

    /// Refuses a declared body over the limit with 413 before reading it, and caps a streamed
    /// one: reading past the limit fails, and extractors turn that into 413 too.
    async fn limited<S>(&self, req: Request, inner: S) -> Response
    where
        S: Service<Request, Response = Response, Error = Infallible>,
    {
        let max = self.max_body;
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
        // A request without a body (every GET) costs nothing more here.
        if req.body().is_end_stream() {
            return match inner.oneshot(req).await {
                Ok(response) => response,
                Err(never) => match never {},
            };
        }
        let expired = Arc::new(AtomicBool::new(false));
        let deadline = tokio::time::Instant::now() + self.body_read_timeout;
        let watch = expired.clone();
        let req = req.map(|body| {
            Body::new(Limited::new(
                Deadline {
                    inner: body,
                    sleep: Box::pin(tokio::time::sleep_until(deadline)),
                    expired: watch,
                },
                max,
            ))
        });
        let response = match inner.oneshot(req).await {
            Ok(response) => response,
            Err(never) => match never {},
        };
        if expired.load(Ordering::Relaxed) {
            // Whatever the handler made of the failed read, the client's answer is 408; the
            // connection is closed, as the rest of the body may still be on its way.
            metrics::counter!(names::HTTP_REFUSED, "role" => self.role.as_str(),
                "reason" => "body_timeout")
            .increment(1);
            let mut response = ApiError::new(
                ErrorCode::RequestTimeout,
                format!(
                    "the request body was not received within {}",
                    humantime::format_duration(self.body_read_timeout)
                ),
            )
            .into_response();
            response
                .headers_mut()
                .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
            return response;
        }
        response
    }
}

/// Marks a response that came from an upstream: passed on as it is, never rewritten here.
#[derive(Debug, Clone, Copy)]
pub struct Proxied;

/// Whether a client's `X-Request-Id` is kept: 1 to 128 characters of `A-Z a-z 0-9 . _ : -`.
fn valid_request_id(id: &[u8]) -> bool {
    (1..=128).contains(&id.len())
        && id.iter().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// A 4xx that is not JSON (axum's own rejections of a path or query it cannot parse answer in
/// plain text) becomes the error contract's JSON, with the same status and the same message:
/// every refusal a client gets from a role carries a `code`.
async fn json_rejection(response: Response) -> Response {
    let is_json = response
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.starts_with("application/json") || v.starts_with("application/problem+json")
        });
    if is_json {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
    let code = match parts.status.as_u16() {
        401 => ErrorCode::Unauthenticated,
        403 => ErrorCode::Forbidden,
        404 => ErrorCode::NotFound,
        405 => ErrorCode::MethodNotAllowed,
        408 => ErrorCode::RequestTimeout,
        409 => ErrorCode::Conflict,
        413 => ErrorCode::PayloadTooLarge,
        422 => ErrorCode::ValidationFailed,
        429 => ErrorCode::RateLimited,
        _ => ErrorCode::InvalidRequest,
    };
    let message = String::from_utf8_lossy(&text).trim().to_string();
    let message = if message.is_empty() { parts.status.to_string() } else { message };
    let mut json = ApiError::new(code, message).into_response();
    *json.status_mut() = parts.status;
    for (name, value) in &parts.headers {
        if name != http::header::CONTENT_TYPE && name != http::header::CONTENT_LENGTH {
            json.headers_mut().insert(name.clone(), value.clone());
        }
    }
    json
}

/// The answer to a request body that could not be read: 413 over the limit, 408 past the read
/// deadline, 400 when the client stopped sending (the body ended early or the connection broke).
pub fn body_error(e: &(dyn std::error::Error + 'static), max: usize) -> ApiError {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if c.is::<http_body_util::LengthLimitError>() {
            return ApiError::new(
                ErrorCode::PayloadTooLarge,
                format!("request body is larger than {max} bytes"),
            );
        }
        if c.is::<BodyTimeout>() {
            return ApiError::new(
                ErrorCode::RequestTimeout,
                "the request body was not received in time",
            );
        }
        cause = c.source();
    }
    ApiError::new(ErrorCode::InvalidRequest, "the request body was not received in full")
}

/// A request body that fails with [`BodyTimeout`] once its deadline passes before it has been
/// read in full, and says so in `expired` (the shared layer then answers 408). The deadline runs
/// from the request's head, whether or not anyone polls the body.
struct Deadline<B> {
    inner: B,
    sleep: Pin<Box<tokio::time::Sleep>>,
    expired: Arc<AtomicBool>,
}

/// The error a [`Deadline`] body fails with.
#[derive(Debug, thiserror::Error)]
#[error("the request body was not received in time")]
pub struct BodyTimeout;

impl<B> HttpBody for Deadline<B>
where
    B: HttpBody<Data = bytes::Bytes> + Unpin,
    B::Error: Into<axum::BoxError>,
{
    type Data = bytes::Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<bytes::Bytes>, Self::Error>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        if self.sleep.as_mut().poll(cx).is_ready() {
            self.expired.store(true, Ordering::Relaxed);
            return Poll::Ready(Some(Err(Box::new(BodyTimeout))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A request counter (by role, route, method and status class) and a latency histogram (by role
/// and route), their handles kept by route once registered: recording a request then costs one
/// map lookup by the route's name, not a key built and hashed by the metrics registry. Routes
/// are a closed set (the router's patterns or `unmatched`; the gateway's route names). A std lock,
/// held for one lookup (read) or one insertion (write).
pub struct RouteMetrics {
    role: Role,
    requests: &'static str,
    duration: &'static str,
    routes: RwLock<HashMap<String, Arc<OneRoute>>>,
}

/// One route's histogram, and its counters by method and status class.
struct OneRoute {
    duration: Histogram,
    requests: [[OnceLock<Counter>; 5]; METHODS.len()],
}

const METHODS: [&str; 8] = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "other"];
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

impl RouteMetrics {
    /// The counter named `requests` and the histogram named `duration`, for `role`.
    pub fn new(role: Role, requests: &'static str, duration: &'static str) -> Self {
        RouteMetrics { role, requests, duration, routes: RwLock::default() }
    }

    /// Counts and times one request.
    pub fn record(&self, route: &str, method: &'static str, status: u16, seconds: f64) {
        let known = self.routes.read().unwrap_or_else(|p| p.into_inner()).get(route).cloned();
        let one = known.unwrap_or_else(|| {
            let mut routes = self.routes.write().unwrap_or_else(|p| p.into_inner());
            routes
                .entry(route.to_owned())
                .or_insert_with(|| {
                    Arc::new(OneRoute {
                        duration: metrics::histogram!(self.duration,
                            "role" => self.role.as_str(), "route" => route.to_owned()),
                        requests: Default::default(),
                    })
                })
                .clone()
        });
        one.duration.record(seconds);
        let m = METHODS.iter().position(|m| *m == method).unwrap_or(METHODS.len() - 1);
        let class = status_class(status);
        let c = CLASSES.iter().position(|c| *c == class).unwrap_or(CLASSES.len() - 1);
        one.requests[m][c]
            .get_or_init(|| {
                metrics::counter!(self.requests, "role" => self.role.as_str(),
                    "route" => route.to_owned(), "method" => METHODS[m], "status_class" => CLASSES[c])
            })
            .increment(1);
    }
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
        // The metric handles are indexed by these labels: every one must have a slot.
        for m in ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "BREW"] {
            let label = method_label(&http::Method::from_bytes(m.as_bytes()).unwrap());
            assert!(METHODS.contains(&label), "{label}");
        }
        for status in [100, 200, 302, 404, 503] {
            assert!(CLASSES.contains(&status_class(status)));
        }
    }
}
