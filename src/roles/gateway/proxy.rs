//! The request path for data routes (`docs/contracts.md`): route match on the canonical target
//! (404/405) -> per-address limit (429) -> authenticate (401) -> the identity's share of requests
//! in flight (429) -> rate limit (429) -> entitlement (403) -> cache -> the body read in full
//! (413/408) -> circuit breaker (503) -> upstream with timeout and retries (502/504) -> response.
//! CORS preflights are answered by the CORS layer before this, and the target was made canonical
//! (or refused) before any route was matched ([`crate::server::target`]).

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State as AxumState};
use axum::response::{IntoResponse, Response};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Uri};

use super::breaker::Admission;
use super::routes::{render_resource, AuthMode};
use super::State;
use crate::auth::{AuthError, Identity, Reason};
use crate::error::{ApiError, ErrorCode};
use crate::server::client::ClientAddr;
use crate::server::layers::{method_label, status_class};
use crate::server::target;

/// Metric names.
pub mod names {
    /// Requests by route, method and status class.
    pub const REQUESTS: &str = "access_gateway_requests_total";
    /// Whole-request latency by route.
    pub const DURATION: &str = "access_gateway_request_duration_seconds";
    /// Upstream latency (to the response head) by route.
    pub const UPSTREAM_DURATION: &str = "access_gateway_upstream_duration_seconds";
    /// Authentication failures by reason.
    pub const AUTH_FAILURES: &str = "access_gateway_auth_failures_total";
    /// Breaker state per upstream: 0 closed, 1 half-open, 2 open.
    pub const BREAKER_STATE: &str = "access_gateway_circuit_breaker_state";

    /// Registers the descriptions of every gateway metric.
    pub fn describe() {
        use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
        describe_counter!(REQUESTS, "Gateway requests by route, method and status class");
        describe_histogram!(DURATION, Unit::Seconds, "Whole gateway request latency by route");
        describe_histogram!(
            UPSTREAM_DURATION,
            Unit::Seconds,
            "Upstream latency to the response head by route"
        );
        describe_counter!(AUTH_FAILURES, "Gateway authentication failures by reason");
        describe_gauge!(
            BREAKER_STATE,
            "Circuit breaker state per upstream: 0 closed, 1 half-open, 2 open"
        );
        describe_counter!(
            crate::ratelimit::names::DECISIONS,
            "Rate-limit decisions by policy and outcome (allowed, limited, shadow_limited, store_error)"
        );
        describe_histogram!(
            crate::ratelimit::names::BATCH_SIZE,
            "Requests decided per Redis rate-limit script call"
        );
        describe_counter!(
            super::super::cache::names::RESULTS,
            "Response cache results by route (hit, miss, stale, bypass)"
        );
        describe_counter!(
            super::super::cache::names::REVALIDATIONS,
            "Stale cache entries revalidated upstream, by route"
        );
        super::super::items::names::describe();
        describe_counter!(
            super::super::usage::names::DROPPED,
            "Usage increments dropped (too many keys, or the metrics role unreachable)"
        );
    }
}

/// Says how the response cache treated a response: `HIT`, `MISS`, `STALE` or `BYPASS`.
pub static X_CACHE: HeaderName = HeaderName::from_static("x-cache");
/// The rules version a data response's entitlement was decided at.
pub static X_ENTITLEMENTS_VERSION: HeaderName = HeaderName::from_static("x-entitlements-version");

/// The API-key header (never forwarded).
pub static API_KEY: HeaderName = HeaderName::from_static("x-api-key");

/// Identity headers the gateway sets for upstreams; copies sent by clients are removed.
pub static IDENTITY_HEADERS: [HeaderName; 3] = [
    HeaderName::from_static("x-user-id"),
    HeaderName::from_static("x-tenant-id"),
    HeaderName::from_static("x-user-roles"),
];

/// Client headers whose names, normalised (lower case, `_` read as `-`, since WSGI/CGI servers
/// read `X_User_Id` as `X-User-Id`), are one of these are never forwarded: identity and
/// credentials the gateway owns, forwarding information only trusted proxies may set, and the
/// path and method overrides some frameworks obey (a different target than the one checked).
const RESERVED_HEADERS: &[&str] = &[
    "forwarded",
    "x-forwarded",
    "x-original-forwarded-for",
    "x-user",
    "x-userid",
    "x-tenant",
    "tenant-id",
    "x-roles",
    "x-groups",
    "x-email",
    "x-auth",
    "x-authenticated-user",
    "x-authenticated-userid",
    "x-scope-orgid",
    "x-org-id",
    "x-account-id",
    "x-webauth-user",
    "x-access-token",
    "x-id-token",
    "x-token",
    "x-real-ip",
    "x-client-ip",
    "true-client-ip",
    "cf-connecting-ip",
    "x-cluster-client-ip",
    "x-original-url",
    "x-original-uri",
    "x-original-method",
    "x-rewrite-url",
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    "remote-user",
    "x-remote-user",
    "x-remote-addr",
];

/// Name prefixes reserved the same way: ours (`X-User-*`, `X-Tenant-*`), forwarding
/// (`X-Forwarded-*`), and the identity and client-certificate headers other proxies and
/// platforms set (Kong's `X-Consumer-*`, Kubernetes' `Impersonate-*`, AWS ALB's
/// `X-Amzn-Oidc-*`, IAP's `X-Goog-Authenticated-*`, Azure's `X-MS-Client-Principal*`, TLS
/// terminators' `X-SSL-Client-*` / `X-Client-Cert*`), which an upstream may believe.
const RESERVED_PREFIXES: &[&str] = &[
    "x-forwarded-",
    "x-user-",
    "x-tenant-",
    "x-auth-",
    "x-authenticated-",
    "x-consumer-",
    "impersonate-",
    "x-amzn-oidc-",
    "x-goog-authenticated-",
    "x-ms-client-principal",
    "x-ssl-client",
    "ssl-client",
    "x-client-cert",
    "x-client-ssl",
];

/// Whether a client header must not reach an upstream: see [`RESERVED_HEADERS`]. The caller's
/// credentials (`Authorization`, `X-API-Key`) pass only on routes with `forward_authorization`;
/// their underscore twins never do (they are not what the gateway verified).
pub fn is_reserved(name: &HeaderName, forward_authorization: bool) -> bool {
    let raw = name.as_str();
    if raw == "authorization" || raw == "x-api-key" {
        return !forward_authorization;
    }
    let name: Cow<str> =
        if raw.contains('_') { Cow::Owned(raw.replace('_', "-")) } else { Cow::Borrowed(raw) };
    if name == "authorization" || name == "x-api-key" {
        return true;
    }
    RESERVED_HEADERS.contains(&name.as_ref())
        || RESERVED_PREFIXES.iter().any(|p| name.starts_with(p))
}

const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in HOP_BY_HOP.iter().chain(listed.iter()) {
        headers.remove(name);
    }
}

/// The fallback handler: every request that is not a gateway endpoint.
pub async fn forward(
    AxumState(state): AxumState<State>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
) -> Response {
    let started = Instant::now();
    let table = state.table();
    let method = req.method().clone();
    // `serve` made the target canonical before routing; a router used without it must not
    // match (and check) one spelling and forward another.
    if !matches!(target::canonical_path(req.uri().path()), Ok(Cow::Borrowed(_))) {
        return ApiError::new(ErrorCode::InvalidRequest, "the request target is not canonical")
            .with_reason("invalid_path")
            .into_response();
    }
    let Some(matched) = table.find(req.uri().path()) else {
        return ApiError::not_found("no route for this path").into_response();
    };
    let (route, params) = (matched.route, matched.params);
    if !route.allows(&method) {
        return ApiError::new(ErrorCode::MethodNotAllowed, "method not allowed on this route")
            .into_response();
    }
    let route_name = route.spec.name.as_str();
    let response = match handle(&state, &route, &params, peer, req).await {
        Ok((response, identity, bytes_in)) => {
            if let Some(identity) = &identity {
                let bytes_out = response
                    .headers()
                    .get(header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                state.usage.record(
                    &identity.tenant,
                    route_name,
                    status_class(response.status().as_u16()),
                    bytes_in,
                    bytes_out,
                );
            }
            response
        }
        Err(e) => e.into_response(),
    };
    state.metrics.record(
        route_name,
        method_label(&method),
        response.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    response
}

async fn authenticate(
    state: &State,
    mode: AuthMode,
    headers: &HeaderMap,
) -> Result<Option<Identity>, ApiError> {
    if mode == AuthMode::None {
        return Ok(None);
    }
    let bearer = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let api_key = headers.get(&API_KEY).and_then(|v| v.to_str().ok());
    let outcome = match bearer {
        None if api_key.is_some() => {
            state.api_keys.verify(api_key.unwrap_or_default()).await.map(Some)
        }
        Some(h) if h.get(..7).is_some_and(|p| p.eq_ignore_ascii_case("bearer ")) => {
            state.verifier.verify(h).await.map(|v| Some(v.identity.clone()))
        }
        Some(_) => Err(AuthError::Rejected(Reason::Malformed)),
        None if mode == AuthMode::Optional => Ok(None),
        None => Err(AuthError::Rejected(Reason::Malformed)),
    };
    let by_api_key = bearer.is_none() && api_key.is_some();
    outcome.map_err(|e| {
        if let AuthError::Rejected(reason) = &e {
            metrics::counter!(names::AUTH_FAILURES, "role" => "gateway", "reason" => reason.as_str()).increment(1);
        }
        if by_api_key {
            e.into_api_key_error()
        } else {
            ApiError::from(e)
        }
    })
}

pub(super) type Handled = (Response, Option<Identity>, u64);

/// `RateLimit-Limit` (the burst), `-Remaining`, `-Reset` (seconds) of the tightest policy.
fn rate_limit_headers(outcome: &crate::ratelimit::Outcome) -> Vec<(HeaderName, HeaderValue)> {
    let Some((_, policy, verdict)) = &outcome.tightest else { return Vec::new() };
    vec![
        (HeaderName::from_static("ratelimit-limit"), HeaderValue::from(policy.burst)),
        (HeaderName::from_static("ratelimit-remaining"), HeaderValue::from(verdict.remaining)),
        (
            HeaderName::from_static("ratelimit-reset"),
            HeaderValue::from(verdict.reset_us.div_ceil(1_000_000)),
        ),
    ]
}

async fn handle(
    state: &State,
    route: &super::routes::Route,
    params: &[(String, String)],
    peer: SocketAddr,
    mut req: Request,
) -> Result<Handled, ApiError> {
    let client = req.extensions().get::<ClientAddr>().map_or(peer.ip(), |c| c.0);
    if route.items.is_some() {
        // A caller's copy of a filtered list is not the upstream's body: validators and ranges
        // of the whole body mean nothing for it (and a 304 would confirm a copy made at an
        // older rules version).
        super::items::strip_conditionals(req.headers_mut());
    }
    // The cheap per-address limit, before any signature is checked.
    if let Err(retry_after) = state.ip_limit.check(client) {
        return Err(ApiError::new(ErrorCode::RateLimited, "too many requests from this address")
            .with_retry_after(retry_after));
    }
    let identity = authenticate(state, route.spec.auth, req.headers()).await?;
    // One identity's share of the requests in flight: a client that holds requests open (slow
    // upstream calls, slow bodies) cannot take the slots every other identity needs.
    let _in_flight = match &identity {
        Some(identity) if state.per_identity.enabled() => {
            match state.per_identity.try_acquire(identity.subject.clone()) {
                Some(slot) => slot,
                None => {
                    metrics::counter!(crate::telemetry::names::HTTP_REFUSED, "role" => "gateway",
                        "reason" => "too_many_in_flight")
                    .increment(1);
                    return Err(ApiError::new(
                        ErrorCode::RateLimited,
                        "too many requests in flight for this identity",
                    )
                    .with_reason("too_many_in_flight")
                    .with_retry_after(1));
                }
            }
        }
        _ => None,
    };
    let tier;
    let policies: &[String] = if route.spec.rate_limits.is_empty() {
        tier = [if identity.is_some() { "authenticated" } else { "public" }.to_string()];
        &tier
    } else {
        &route.spec.rate_limits
    };
    let anonymous;
    let subject = match &identity {
        Some(identity) => identity.subject.as_str(),
        None => {
            anonymous = format!("ip:{client}");
            anonymous.as_str()
        }
    };
    let get_like = matches!(*req.method(), Method::GET | Method::HEAD);
    let head = req.method() == Method::HEAD;
    let client_bypass = req
        .headers()
        .get(header::CACHE_CONTROL)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("no-store") || v.contains("no-cache"));
    let cache = route
        .cache
        .as_ref()
        .filter(|_| get_like && !client_bypass)
        .map(|policy| (policy, super::cached::key(route, policy, identity.as_ref(), &req)));
    // The cache entry is read by the rate-limit script (one round trip), and used only after the
    // limit and the entitlement allow the request.
    let also_get = cache.as_ref().and_then(|(_, key)| state.cache.store.shared_key(key));
    let crate::ratelimit::LimitAndLookup { outcome: limit, cached } =
        state.limiter.check(policies, subject, also_get).await;
    let limit_headers = rate_limit_headers(&limit);
    if limit.store_unavailable {
        return Err(ApiError::dependency(
            "redis",
            anyhow::anyhow!("rate-limit store unavailable; rate_limit_on_store_error = closed"),
        ));
    }
    if !limit.allowed {
        let retry_after = limit
            .tightest
            .as_ref()
            .map(|(_, _, v)| v.retry_us.div_ceil(1_000_000).max(1))
            .unwrap_or(1);
        let mut response = ApiError::new(ErrorCode::RateLimited, "rate limit exceeded")
            .with_retry_after(retry_after)
            .into_response();
        response.headers_mut().extend(limit_headers);
        return Ok((response, identity, 0));
    }
    // Decided in-process at the newest rules version this replica has heard of; the version
    // goes back to the caller as `X-Entitlements-Version`.
    let mut rules_version = None;
    if let (Some(spec), Some(identity)) = (&route.spec.entitlement, &identity) {
        let resource = render_resource(&spec.resource, params);
        let action = route.action(req.method());
        match state.rules.decide_current(identity, &resource, &action).await {
            Ok(d) if d.allowed => rules_version = Some(d.version),
            Ok(_) => {
                return Err(ApiError::new(
                    ErrorCode::Forbidden,
                    format!("not entitled to {action} {resource}"),
                ))
            }
            Err(e) => return Err(ApiError::dependency("entitlements", anyhow::anyhow!(e))),
        }
    }
    let mut handled = match cache {
        Some((policy, key)) => {
            let lookup = super::cached::Lookup { policy, key, cached };
            super::cached::serve(state, route, lookup, peer, client, identity, req).await?
        }
        None => {
            let bypass = super::cache::Outcome::Bypass;
            state.cache.count(route, bypass);
            let mut handled = upstream(state, route, peer, client, identity, req).await?;
            handled.0.headers_mut().insert(X_CACHE.clone(), bypass.header());
            handled
        }
    };
    // A list response: each caller sees only the items it may read (after the cache, which
    // keeps the upstream's whole body).
    if let (Some(check), Some(identity)) = (&route.items, &handled.1) {
        let response = std::mem::take(&mut handled.0);
        handled.0 =
            super::items::filter(check, &state.rules, identity, &route.spec.name, head, response)
                .await?;
    }
    if handled.1.is_some() {
        // What an identified caller receives was decided for that caller: no shared cache in
        // front of the gateway may store it for others.
        privatize(handled.0.headers_mut());
    }
    handled.0.headers_mut().extend(limit_headers);
    if let Some(version) = rules_version {
        handled.0.headers_mut().insert(X_ENTITLEMENTS_VERSION.clone(), version.into());
    }
    Ok(handled)
}

/// Makes a response's `Cache-Control` private: `public` and `s-maxage` (which let a shared
/// cache store a response to an authenticated request, RFC 9111 section 3.5) are removed and
/// `private` added; the caller's own cache keeps `max-age` and the rest. A response without
/// `Cache-Control` is left alone (shared caches do not store authenticated responses by default).
pub fn privatize(headers: &mut HeaderMap) {
    let Some(value) = headers.get(header::CACHE_CONTROL) else { return };
    let text = value.to_str().unwrap_or_default().to_string();
    let mut directives: Vec<&str> = text
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .filter(|d| {
            let name = d.split('=').next().unwrap_or_default().trim().to_ascii_lowercase();
            name != "public" && name != "s-maxage" && name != "proxy-revalidate"
        })
        .collect();
    let private_already = directives.iter().any(|d| {
        let d = d.to_ascii_lowercase();
        d == "private" || d == "no-store" || d.starts_with("private=")
    });
    if !private_already {
        directives.insert(0, "private");
    }
    match HeaderValue::from_str(&directives.join(", ")) {
        Ok(v) => {
            headers.insert(header::CACHE_CONTROL, v);
        }
        Err(_) => {
            headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("private, no-cache"));
        }
    }
}

/// Forwards to the route's upstreams: round-robin, breaker, timeout, retries; header rewriting.
pub(super) async fn upstream(
    state: &State,
    route: &super::routes::Route,
    peer: SocketAddr,
    client: IpAddr,
    identity: Option<Identity>,
    req: Request,
) -> Result<Handled, ApiError> {
    let (mut parts, body) = req.into_parts();
    // The body is read in full before any upstream is called: a body over the limit is 413, one
    // not received in time 408, one the client abandons 400, and none of them reaches an
    // upstream truncated or counts against its breaker (nginx buffers request bodies for the
    // same reason). Requests without a body (every GET) skip this.
    let body = read_body(body, state.max_body).await?;
    let bytes_in = body.len() as u64;
    let proto = if crate::server::client::is_trusted(&peer.ip(), &state.trusted_proxies) {
        parts.headers.get("x-forwarded-proto").cloned().unwrap_or(HeaderValue::from_static("http"))
    } else {
        HeaderValue::from_static("http")
    };
    let host = parts.headers.get(header::HOST).cloned();
    strip_hop_by_hop(&mut parts.headers);
    // Client copies of identity, credential and forwarding headers, in any spelling, never reach
    // upstreams.
    let forward_authorization = route.spec.forward_authorization;
    let reserved: Vec<HeaderName> = parts
        .headers
        .keys()
        .filter(|name| is_reserved(name, forward_authorization))
        .cloned()
        .collect();
    for name in &reserved {
        parts.headers.remove(name);
    }
    if !body.is_empty() || parts.headers.contains_key(header::CONTENT_LENGTH) {
        parts.headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    }
    if let Some(identity) = &identity {
        for (name, value) in IDENTITY_HEADERS.iter().zip([
            &identity.subject,
            &identity.tenant,
            &identity.roles.join(","),
        ]) {
            if let Ok(v) = HeaderValue::from_str(value) {
                parts.headers.insert(name.clone(), v);
            }
        }
    }
    if let Ok(v) = HeaderValue::from_str(&client.to_string()) {
        parts.headers.insert("x-forwarded-for", v);
    }
    parts.headers.insert("x-forwarded-proto", proto);
    if let Some(host) = host {
        parts.headers.insert("x-forwarded-host", host);
    }
    let path_and_query = {
        let path = parts.uri.path();
        let stripped =
            route.spec.strip_prefix.as_deref().and_then(|p| path.strip_prefix(p)).unwrap_or(path);
        let stripped = if stripped.is_empty() { "/" } else { stripped };
        match parts.uri.query() {
            Some(q) => format!("{stripped}?{q}"),
            None => stripped.to_string(),
        }
    };
    let idempotent = matches!(
        parts.method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE
    );
    // Only body-less idempotent requests are retried.
    let retryable = idempotent && body.is_empty();
    let attempts = if retryable { route.retries + 1 } else { 1 };
    let mut body = Some(body);
    let mut last_error = None;
    for attempt in 0..attempts {
        let index = route.next.fetch_add(1, Ordering::Relaxed) % route.upstreams.len().max(1);
        let Some(base) = route.upstreams.get(index) else { break };
        let guard = state.breaker(base);
        let breaker = &guard.breaker;
        let admission = breaker.admit(Instant::now());
        if let Admission::Refuse(retry_after) = admission {
            last_error = Some(
                ApiError::new(
                    ErrorCode::CircuitOpen,
                    format!(
                        "the circuit breaker for {} is open",
                        base.host_str().unwrap_or("upstream")
                    ),
                )
                .with_retry_after(retry_after),
            );
            continue;
        }
        let uri: Uri =
            match format!("{}{}", base.as_str().trim_end_matches('/'), path_and_query).parse() {
                Ok(u) => u,
                Err(e) => return Err(ApiError::internal(anyhow::anyhow!("upstream URI: {e}"))),
            };
        let mut upstream =
            http::Request::from_parts(parts.clone(), Body::from(body.take().unwrap_or_default()));
        *upstream.uri_mut() = uri;
        if let Some(authority) = upstream.uri().authority().map(|a| a.as_str().to_string()) {
            if let Ok(v) = HeaderValue::from_str(&authority) {
                upstream.headers_mut().insert(header::HOST, v);
            }
        }
        crate::telemetry::inject_trace_context(upstream.headers_mut());
        let sent = Instant::now();
        let outcome = tokio::time::timeout(
            route.timeout,
            state.clients.request(route.spec.upstream.as_deref(), upstream),
        )
        .await;
        route.upstream_duration.record(sent.elapsed().as_secs_f64());
        match outcome {
            Ok(Ok(response)) => {
                breaker.record(response.status().as_u16() < 500, Instant::now());
                guard.publish();
                let (mut parts, body) = response.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                parts.extensions.insert(crate::server::layers::Proxied);
                return Ok((Response::from_parts(parts, Body::new(body)), identity, bytes_in));
            }
            Ok(Err(e)) => {
                // A request an HTTP/2 upstream refused unprocessed (a graceful GOAWAY) is no
                // failure of the upstream (it answered; a half-open probe closes the breaker),
                // and is retried like a failed connection.
                let unprocessed = super::upstream_tls::unprocessed(&e);
                breaker.record(unprocessed, Instant::now());
                guard.publish();
                tracing::warn!(role = "gateway", route = %route.spec.name, upstream = %base, attempt, error = %e, "upstream request failed");
                last_error = Some(super::upstream_tls::upstream_error(&e));
                if !e.is_connect() && !unprocessed {
                    break;
                }
            }
            Err(_) => {
                breaker.record(false, Instant::now());
                guard.publish();
                return Err(ApiError::new(
                    ErrorCode::UpstreamTimeout,
                    format!("{} did not answer within {:?}", route.spec.name, route.timeout),
                ));
            }
        }
    }
    Err(last_error
        .unwrap_or_else(|| ApiError::new(ErrorCode::UpstreamUnavailable, "no upstream configured")))
}

/// Reads a request body in full (it is already capped at `server.max_body_bytes` and the read
/// deadline by the shared layer; `max` caps it again for a router used without that layer).
async fn read_body(body: Body, max: usize) -> Result<bytes::Bytes, ApiError> {
    use http_body_util::BodyExt;
    if http_body::Body::is_end_stream(&body) {
        return Ok(bytes::Bytes::new());
    }
    match http_body_util::Limited::new(body, max).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) => Err(crate::server::layers::body_error(e.as_ref(), max)),
    }
}
