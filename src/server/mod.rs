//! What every role reuses: the [`Context`] handed to a role, [`app`] (the common routes and layers
//! around a role's router) and [`serve`] (HTTP on an already-bound listener until shutdown).
//!
//! Servers never bind or read the environment: production binds in `cli.rs`, tests bind
//! `127.0.0.1:0`.

pub mod client;
pub mod layers;
pub mod local;
pub mod openapi;
pub mod readiness;
pub mod rules_bus;
mod shutdown;
pub mod target;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, DefaultBodyLimit, Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tower::ServiceExt;

pub use readiness::{CheckResult, Readiness, ReadyCheck, Report};
pub use shutdown::Shutdown;

use crate::config::Config;
use crate::error::{ApiError, ErrorCode};
use crate::role::Role;
use crate::telemetry;

/// What a role is given besides its own config: shared config, shutdown, readiness, metrics.
#[derive(Clone)]
pub struct Context {
    /// The role this context serves (the `role` label of its metrics).
    pub role: Role,
    /// The whole validated configuration.
    pub config: Arc<Config>,
    /// The process's shutdown state.
    pub shutdown: Shutdown,
    /// This role's readiness.
    pub readiness: Readiness,
    /// The process's Prometheus registry, rendered by `/metrics`.
    pub metrics: PrometheusHandle,
    /// Rules versions announced in this process (shared by every role under `access all`).
    pub rules_bus: rules_bus::RulesBus,
    /// More exposition text appended by `/metrics` (the metrics role's ingested series).
    exposition: Arc<std::sync::RwLock<Vec<Exposition>>>,
}

/// Why a shared piece of a role (its auth, the rules mirror, a client of another role) could not
/// be made at start-up; the roles turn it into their `RunError`.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A backend or the IdP could not be reached.
    #[error(transparent)]
    Unavailable(#[from] crate::backends::BackendError),
    /// The configuration asks for what cannot be (dev mode in production, an unreadable key).
    #[error("{0}")]
    Invalid(String),
}

/// Writes Prometheus text for `/metrics` after the process's own metrics.
pub type Exposition = Arc<dyn Fn(&mut String) + Send + Sync>;

impl Context {
    /// A context for `role`; installs the process's metrics recorder if it is not yet.
    pub fn new(role: Role, config: Arc<Config>, shutdown: Shutdown) -> Self {
        let readiness = Readiness::new(shutdown.clone(), config.server.ready_check_timeout);
        let metrics = telemetry::metrics_handle();
        telemetry::record_build_info(role);
        Context {
            role,
            config,
            shutdown,
            readiness,
            metrics,
            rules_bus: rules_bus::RulesBus::default(),
            exposition: Arc::default(),
        }
    }

    /// Adds text to this role's `/metrics`, after the process's own metrics.
    pub fn add_exposition(&self, render: Exposition) {
        self.exposition.write().unwrap_or_else(|p| p.into_inner()).push(render);
    }
}

/// The role's router wrapped with `/health`, `/ready`, `/metrics`, JSON 404/405 and the shared
/// layers (request id, trace span and metrics, load shedding, body limit).
pub fn app(ctx: &Context, role_router: Router) -> Router {
    with_shared(ctx, role_router.fallback(not_found))
}

/// As [`app`], for a role whose router has its own fallback (the gateway proxies every path it
/// does not serve itself).
pub fn app_with_fallback(ctx: &Context, role_router: Router) -> Router {
    with_shared(ctx, role_router)
}

fn with_shared(ctx: &Context, role_router: Router) -> Router {
    let mut server = ctx.config.server.clone();
    server.trusted_proxies = trusted_proxies(&ctx.config);
    let shared = layers::Shared::new(ctx.role, &server);
    let capacity = shared.clone();
    ctx.readiness.add_soft_check("capacity", move || {
        let saturated = capacity.saturated();
        Box::pin(async move { saturated.map_or(Ok(()), Err) })
            as futures::future::BoxFuture<'static, _>
    });
    let common = Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(render_metrics))
        .with_state(ctx.clone());
    role_router
        .merge(common)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(server.max_body_bytes))
        .layer(shared)
}

/// The proxies whose `X-Forwarded-For` is believed: `server.trusted_proxies` (the older
/// `gateway.trusted_proxies` is added to it at load, `roles::Settings`).
pub fn trusted_proxies(config: &Config) -> Vec<ipnet::IpNet> {
    config.server.trusted_proxies.clone()
}

/// Serves `app` on `listener` until the context's shutdown stops it, then drains in-flight
/// connections under `server.drain_timeout`. Each connection gets its peer address as
/// [`ConnectInfo`]; HTTP/1.1 upgrades (WebSocket) are supported. With `server.io_threads` = N,
/// N threads of the role's own each accept on the listener and serve their connections on a
/// single-threaded runtime; what still runs on those runtimes once every thread has drained is
/// dropped with them.
pub async fn serve(listener: TcpListener, app: Router, ctx: &Context) -> std::io::Result<()> {
    serve_until(listener, app, ctx, || true).await
}

/// As [`serve`], for a role whose upgraded connections (WebSocket streams) outlive the drain:
/// after it, what runs them is kept running until `settled()` or `server.drain_timeout` more.
/// With I/O threads their tasks live on those threads' runtimes, which end only then.
pub async fn serve_until(
    listener: TcpListener,
    app: Router,
    ctx: &Context,
    settled: impl Fn() -> bool + Clone + Send + 'static,
) -> std::io::Result<()> {
    let addr = listener.local_addr()?;
    let threads = ctx.config.server.io_threads;
    tracing::info!(role = %ctx.role, addr = %addr, io_threads = threads, "listening");
    if threads == 0 {
        serve_here(listener, app, ctx).await?;
        linger(ctx, settled).await;
        return Ok(());
    }
    let listener = listener.into_std()?;
    let mut done = Vec::with_capacity(threads);
    // Tasks one thread's runtime spawned (a pooled connection's, say) may serve the others'
    // requests: no runtime ends before every thread has drained.
    let all_drained = Arc::new(tokio::sync::Barrier::new(threads));
    for index in 0..threads {
        let listener = listener.try_clone()?;
        let (app, ctx, settled) = (app.clone(), ctx.clone(), settled.clone());
        let all_drained = all_drained.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new().name(format!("{}-io-{index}", ctx.role)).spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(runtime) => runtime,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            runtime.block_on(async {
                let served = async {
                    serve_here(TcpListener::from_std(listener)?, app, &ctx).await?;
                    linger(&ctx, settled).await;
                    Ok(())
                };
                let _ = tx.send(served.await);
                all_drained.wait().await;
            });
        })?;
        done.push(rx);
    }
    drop(listener);
    // The first thread to fail ends the role (and so the process) at once.
    let ended = done.into_iter().map(|rx| async move {
        rx.await.unwrap_or_else(|_| Err(std::io::Error::other("an I/O thread panicked")))
    });
    futures::future::try_join_all(ended).await.map(drop)
}

/// Waits until `settled()`, checking every 20 ms, for at most `server.drain_timeout`.
async fn linger(ctx: &Context, settled: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + ctx.config.server.drain_timeout;
    while !settled() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// The answer to a connection over `server.max_connections_per_client`, written before it is
/// closed (the client has not necessarily sent anything yet).
const TOO_MANY_CONNECTIONS: &[u8] = b"HTTP/1.1 429 Too Many Requests\r\n\
content-type: application/json\r\nconnection: close\r\nretry-after: 1\r\ncontent-length: 138\r\n\r\n\
{\"code\":\"rate_limited\",\"message\":\"too many connections from this address\",\"reason\":\"too_many_connections\",\"retry_after\":1,\"side\":\"client\"}";

/// Accepts and serves HTTP/1.1 connections (upgrades included) until shutdown, then drains.
///
/// HTTP/1 only, on purpose: hyper-util's auto-detecting builder waits for a connection's first
/// bytes with no deadline (an idle socket stayed open forever) and would hand an HTTP/2 preface
/// to an HTTP/2 server with no header deadline. Here an HTTP/2 preface is a malformed HTTP/1
/// request, closed at once, and hyper's header timer (`server.header_read_timeout`) runs from
/// the moment a connection waits for a request head: after it connects and after each
/// response, so an idle keep-alive connection is closed after it too.
async fn serve_here(listener: TcpListener, app: Router, ctx: &Context) -> std::io::Result<()> {
    let server = &ctx.config.server;
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(server.header_read_timeout)
        .max_buf_size(server.max_header_bytes);
    let trusted = trusted_proxies(&ctx.config);
    let per_peer = client::PerKey::new(server.max_connections_per_client);
    // Each connection's task holds a clone; the drain below ends when every one has dropped it.
    let (alive, mut all_closed) = tokio::sync::mpsc::channel::<()>(1);
    let role = ctx.role;
    loop {
        let (mut stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and friends: back off instead of spinning.
                    tracing::warn!(role = %ctx.role, error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = ctx.shutdown.stopping() => break,
        };
        let slot = if client::is_trusted(&peer.ip(), &trusted) {
            None
        } else {
            match per_peer.try_acquire(peer.ip()) {
                Some(slot) => slot,
                None => {
                    metrics::counter!(telemetry::names::CONNECTIONS_REFUSED,
                        "role" => role.as_str(), "reason" => "too_many_connections")
                    .increment(1);
                    tokio::spawn(async move {
                        let write = stream.write_all(TOO_MANY_CONNECTIONS);
                        let _ =
                            tokio::time::timeout(std::time::Duration::from_secs(1), write).await;
                        let _ = stream.shutdown().await;
                    });
                    continue;
                }
            }
        };
        let _ = stream.set_nodelay(true);
        let service = canonical(app.clone(), role, peer, server.max_header_bytes);
        let connection = builder
            .serve_connection(TokioIo::new(stream), TowerToHyperService::new(service))
            .with_upgrades();
        let (stopping, alive) = (ctx.shutdown.clone(), alive.clone());
        tokio::spawn(async move {
            let (_slot, _alive) = (slot, alive);
            tokio::pin!(connection);
            let ended = tokio::select! {
                ended = connection.as_mut() => ended,
                _ = stopping.stopping() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = ended {
                tracing::debug!(peer = %peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    drop(alive);
    tokio::select! {
        _ = all_closed.recv() => tracing::info!(role = %ctx.role, "drained"),
        _ = tokio::time::sleep(server.drain_timeout) => {
            tracing::warn!(role = %ctx.role, deadline = ?server.drain_timeout,
                "drain deadline passed; closing the remaining connections");
        }
    }
    Ok(())
}

/// `app` behind the canonical request target ([`target`]): the path and query are rewritten to
/// their one canonical form before any route is matched, or the request is refused with 400
/// `invalid_request`, reason `invalid_path`. Also hands the handlers the peer's address.
fn canonical(
    app: Router,
    role: Role,
    peer: SocketAddr,
    max_header_bytes: usize,
) -> impl tower::Service<
    Request<hyper::body::Incoming>,
    Response = Response,
    Error = std::convert::Infallible,
    Future = impl std::future::Future<Output = Result<Response, std::convert::Infallible>> + Send,
> + Clone {
    tower::service_fn(move |mut req: Request<hyper::body::Incoming>| {
        let app = app.clone();
        async move {
            // hyper's buffer limit lets a head grow past `max_header_bytes` by up to one read
            // (its reads double in size): the head is measured here, exactly.
            if head_len(&req) > max_header_bytes {
                let mut response = Response::new(axum::body::Body::empty());
                *response.status_mut() = http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE;
                response
                    .headers_mut()
                    .insert(http::header::CONNECTION, http::HeaderValue::from_static("close"));
                return Ok(response);
            }
            // One Host, and a well-formed one (RFC 9112 3.2): the gateway forwards it as
            // X-Forwarded-Host, and a second copy must not decide what an upstream believes.
            if let Some(problem) = host_problem(&req) {
                metrics::counter!(telemetry::names::HTTP_REFUSED,
                    "role" => role.as_str(), "reason" => "invalid_host")
                .increment(1);
                return Ok(ApiError::new(ErrorCode::InvalidRequest, problem)
                    .with_reason("invalid_host")
                    .into_response());
            }
            if let Err(invalid) = canonicalize(req.uri_mut()) {
                metrics::counter!(telemetry::names::HTTP_REFUSED,
                    "role" => role.as_str(), "reason" => "invalid_path")
                .increment(1);
                tracing::debug!(role = %role, peer = %peer, reason = invalid.as_str(),
                    "request target refused");
                let mut response = ApiError::new(ErrorCode::InvalidRequest, invalid.message())
                    .with_reason("invalid_path")
                    .into_response();
                if let Some(id) = req.headers().get(&layers::REQUEST_ID) {
                    response.headers_mut().insert(layers::REQUEST_ID.clone(), id.clone());
                }
                return Ok(response);
            }
            req.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
            app.oneshot(req.map(axum::body::Body::new)).await
        }
    })
}

/// What is wrong with a request's `Host`, if anything: an HTTP/1.1 request needs exactly one, and
/// it must be an authority (`host[:port]`).
fn host_problem<B>(req: &Request<B>) -> Option<&'static str> {
    let mut hosts = req.headers().get_all(http::header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (None, _) if req.version() == http::Version::HTTP_11 => {
            Some("an HTTP/1.1 request needs a Host header")
        }
        (None, _) => None,
        (Some(_), Some(_)) => Some("a request may carry one Host header"),
        (Some(host), None) => {
            let valid = host.to_str().ok().is_some_and(|h| {
                !h.is_empty()
                    && !h.contains(['/', '?', '#', '@'])
                    && h.parse::<http::uri::Authority>().is_ok()
            });
            (!valid).then_some("the Host header is not a host[:port]")
        }
    }
}

/// The size of a request's head as received: request line and header lines.
fn head_len<B>(req: &Request<B>) -> usize {
    let target = req.uri().path_and_query().map_or(1, |p| p.as_str().len());
    let line = req.method().as_str().len() + target + 12;
    req.headers().iter().fold(line, |n, (k, v)| n + k.as_str().len() + v.len() + 4)
}

/// Rewrites `uri` to its canonical path and query, or says why it is refused.
fn canonicalize(uri: &mut http::Uri) -> Result<(), target::Invalid> {
    let path = target::canonical_path(uri.path())?;
    let query = uri.query().map(target::canonical_query).transpose()?;
    let unchanged = matches!(path, std::borrow::Cow::Borrowed(_))
        && query.as_ref().is_none_or(|q| matches!(q, std::borrow::Cow::Borrowed(_)));
    if unchanged {
        return Ok(());
    }
    let path_and_query = match query {
        Some(q) => format!("{path}?{q}"),
        None => path.into_owned(),
    };
    let mut parts = std::mem::take(uri).into_parts();
    parts.path_and_query = path_and_query.parse().ok();
    // Only characters that were already in the target are written: this cannot fail.
    *uri = http::Uri::from_parts(parts).map_err(|_| target::Invalid::MalformedEscape)?;
    Ok(())
}

/// The body of `GET /health`.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct Health {
    /// Always `ok`: the process answers.
    #[schema(example = "ok")]
    status: &'static str,
    /// The role's service name (`access-gateway`, ...).
    #[schema(example = "access-gateway")]
    service: &'static str,
    /// The role.
    role: Role,
    /// The binary's version.
    #[schema(example = "0.1.0")]
    version: &'static str,
    /// Seconds since the process started.
    uptime_seconds: u64,
}

/// Liveness: never touches a dependency.
#[utoipa::path(get, path = "/health", tag = "probes",
    responses((status = 200, description = "The process is alive", body = Health)))]
async fn health(State(ctx): State<Context>) -> Json<Health> {
    Json(Health {
        status: "ok",
        service: ctx.role.service_name(),
        role: ctx.role,
        version: env!("CARGO_PKG_VERSION"),
        uptime_seconds: ctx.readiness.uptime().as_secs(),
    })
}

/// The body of `GET /ready`: 200 when ready or degraded, 503 (with `code` and `message`)
/// otherwise.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct ReadyBody {
    /// `ready`, `degraded` (a soft check fails; still ready), `starting`, `draining` or
    /// `not_ready`.
    #[schema(value_type = readiness::Status)]
    status: &'static str,
    /// `dependency_unavailable` (503 only).
    #[serde(skip_serializing_if = "Option::is_none")]
    code: Option<ErrorCode>,
    /// Why the role is not ready (503 only).
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<String>,
    /// The names of the failing checks.
    failing: Vec<&'static str>,
    /// Each check's outcome.
    checks: Vec<readiness::CheckResult>,
}

/// Readiness: 200 when the role's dependencies answer (`degraded` when only a soft one fails).
#[utoipa::path(get, path = "/ready", tag = "probes",
    responses((status = 200, description = "Ready (or degraded)", body = ReadyBody),
        (status = 503, description = "Starting, draining, or a dependency is unavailable", body = ReadyBody)))]
async fn ready(State(ctx): State<Context>) -> Response {
    let report = ctx.readiness.report().await;
    let failing: Vec<_> = report.checks.iter().filter(|c| !c.ok).map(|c| c.name).collect();
    if report.is_ready() {
        let body = ReadyBody {
            status: report.status,
            code: None,
            message: None,
            failing,
            checks: report.checks,
        };
        return Json(body).into_response();
    }
    let message = match report.status {
        "draining" => "shutting down".to_string(),
        "starting" => "start-up work is not done".to_string(),
        _ => format!("not ready: {} unavailable", failing.join(", ")),
    };
    let body = ReadyBody {
        status: report.status,
        code: Some(ErrorCode::DependencyUnavailable),
        message: Some(message),
        failing,
        checks: report.checks,
    };
    (http::StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
}

/// The Prometheus exposition.
#[utoipa::path(get, path = "/metrics", tag = "probes",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain", body = String)))]
async fn render_metrics(State(ctx): State<Context>) -> Response {
    let mut text = ctx.metrics.render();
    let extra: Vec<Exposition> = ctx.exposition.read().unwrap_or_else(|p| p.into_inner()).clone();
    for render in extra {
        render(&mut text);
    }
    ([(http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text)
        .into_response()
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(ErrorCode::MethodNotAllowed, "method not allowed on this route")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connection_refusal_is_a_well_formed_response() {
        let text = std::str::from_utf8(TOO_MANY_CONNECTIONS).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("content-length: {}", body.len())), "{head}");
        let body: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(
            (body["code"].as_str(), body["reason"].as_str()),
            (Some("rate_limited"), Some("too_many_connections"))
        );
    }

    #[test]
    fn heads_are_measured_as_sent() {
        let req = Request::get("/a?b=c").header("x-big", "v".repeat(100)).body(()).unwrap();
        assert_eq!(head_len(&req), 3 + 6 + 12 + 5 + 100 + 4);
    }
}
