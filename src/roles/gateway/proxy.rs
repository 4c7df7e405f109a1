//! The request path for data routes: one [`Exchange`] per request, carried through the steps of
//! [`forward`] in order, top to bottom (`docs/contracts.md`, "The request path through the
//! gateway"):
//!
//! 1. `Exchange::new`: the canonical target (400 `invalid_path`) and the route (404, 405);
//! 2. `per_client_limit`: the cheap per-address limit (429), before any signature is checked;
//! 3. `identify`: authenticate, JWT or API key (401);
//! 4. `identity_share`: the identity's share of the requests in flight (429);
//! 5. `cache_key`: whether the request may be served from the cache, and under which key;
//! 6. `rate_limit`: GCRA by subject (429), reading the cache entry in the same round trip;
//! 7. `entitle`: the route's entitlement (403), decided in-process;
//! 8. `cache_lookup`: a `HIT` or `STALE` answer here skips the body read and the upstream;
//! 9. `read_body`: the body read in full (413, 408);
//! 10. `upstream`: circuit breaker (503) and upstream with timeout and retries (502, 504);
//! 11. `cache_store`: the answer stored when this request fetched for its key; `X-Cache`;
//! 12. `filter_items`: a list response keeps only the items the caller may read;
//! 13. `response_headers`: private `Cache-Control` for identified callers, `RateLimit-*`,
//!     `X-Entitlements-Version`;
//! 14. `metrics_and_usage`: the route's request metrics and the tenant's usage.
//!
//! A step is `async fn step(x: &mut Exchange, state: &State) -> Result<(), Stop>`: it reads and
//! fills the exchange, and ends the request early with [`Stop`]. Adding a step is one function
//! here and one line in [`forward`] (and its place in the docs).
//!
//! Before this, the target was made canonical (or refused) before any route was matched
//! ([`crate::server::target`]); the shared layer gave the request its id and took its client's
//! share of the request slots, load shedding and size limits ([`crate::server::layers`]); and
//! CORS preflights were answered by the gateway router's CORS layer.

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{ConnectInfo, Request, State as AxumState};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::Method;

use super::cache::serve::{self as cache, Lookup};
use super::routes::{render_resource, AuthMode, Route};
use super::upstream::{self as up, Call};
use super::State;
use crate::auth::{AuthError, Identity, Reason};
use crate::error::{ApiError, ErrorCode};
use crate::ratelimit::LimitAndLookup;
use crate::server::client::{ClientAddr, Slot};
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

/// The rules version a data response's entitlement was decided at.
pub static X_ENTITLEMENTS_VERSION: HeaderName = HeaderName::from_static("x-entitlements-version");

/// The API-key header (never forwarded).
pub static API_KEY: HeaderName = HeaderName::from_static("x-api-key");

/// One proxied request on its way through the steps of [`forward`]: what it asked, what each
/// step found, and the answer once there is one.
pub struct Exchange {
    /// When the gateway's handler took the request (`access_gateway_request_duration_seconds`).
    started: Instant,
    /// The request's method (the request itself goes upstream).
    method: Method,
    /// The client's request, canonical target included; taken by the upstream step.
    request: Request,
    /// The connection's peer.
    peer: SocketAddr,
    /// The client's address: the peer, or what a trusted proxy says ([`ClientAddr`]).
    client: IpAddr,
    /// The matched route.
    route: Arc<Route>,
    /// The route's path parameters, percent-decoded.
    params: Vec<(String, String)>,
    /// The verified caller; `None` for anonymous callers.
    identity: Option<Identity>,
    /// The identity's slot among its requests in flight, given back when the exchange ends.
    in_flight: Option<Slot<String>>,
    /// `RateLimit-*` of the tightest policy, for the answer.
    limit_headers: Vec<(HeaderName, HeaderValue)>,
    /// The rules version the entitlement was decided at (`X-Entitlements-Version`).
    rules_version: Option<i64>,
    /// Where the request stands with the response cache.
    cache: Lookup,
    /// The request body, read in full.
    body: Bytes,
    /// The body's size (usage).
    bytes_in: u64,
    /// The answer, from the cache or the upstream, as the steps after them shape it.
    response: Option<Response>,
}

/// How a step ends the request before the last step.
#[derive(Debug)]
pub enum Stop {
    /// Refused: the error is the answer; no step adds to it and it is not counted as usage.
    Refused(ApiError),
    /// Answered early (a rate-limit refusal): [`Exchange`]'s response is final, and counted as
    /// usage.
    Answered,
}

impl From<ApiError> for Stop {
    fn from(e: ApiError) -> Self {
        Stop::Refused(e)
    }
}

/// The fallback handler: every request that is not a gateway endpoint, through the steps in order.
pub async fn forward(
    AxumState(state): AxumState<State>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
) -> Response {
    // An unrouted request has no exchange, and no metrics (their labels are route names).
    let mut x = match Exchange::new(&state, peer, req) {
        Ok(x) => x,
        Err(unrouted) => return unrouted.into_response(),
    };
    let end = async {
        per_client_limit(&mut x, &state)?;
        identify(&mut x, &state).await?;
        identity_share(&mut x, &state)?;
        cache_key(&mut x, &state)?;
        rate_limit(&mut x, &state).await?;
        entitle(&mut x, &state).await?;
        cache_lookup(&mut x, &state).await?;
        read_body(&mut x, &state).await?;
        upstream(&mut x, &state).await?;
        cache_store(&mut x, &state).await?;
        filter_items(&mut x, &state).await?;
        response_headers(&mut x, &state)
    }
    .await;
    metrics_and_usage(x, &state, end)
}

impl Exchange {
    /// Steps 1 and 2: the target must be canonical, and a route must take it (404) with its
    /// method (405). A list route's request loses its conditional headers here: a caller's copy
    /// of a filtered list is not the upstream's body, so validators and ranges of the whole
    /// body mean nothing for it (and a 304 would confirm a copy made at an older rules version).
    fn new(state: &State, peer: SocketAddr, mut request: Request) -> Result<Exchange, ApiError> {
        let started = Instant::now();
        // `serve` made the target canonical before routing; a router used without it must not
        // match (and check) one spelling and forward another.
        if !matches!(target::canonical_path(request.uri().path()), Ok(Cow::Borrowed(_))) {
            return Err(ApiError::new(
                ErrorCode::InvalidRequest,
                "the request target is not canonical",
            )
            .with_reason("invalid_path"));
        }
        let Some(matched) = state.table().find(request.uri().path()) else {
            return Err(ApiError::not_found("no route for this path"));
        };
        let method = request.method().clone();
        if !matched.route.allows(&method) {
            return Err(ApiError::new(
                ErrorCode::MethodNotAllowed,
                "method not allowed on this route",
            ));
        }
        if matched.route.items.is_some() {
            super::items::strip_conditionals(request.headers_mut());
        }
        let client = request.extensions().get::<ClientAddr>().map_or(peer.ip(), |c| c.0);
        Ok(Exchange {
            started,
            method,
            request,
            peer,
            client,
            route: matched.route,
            params: matched.params,
            identity: None,
            in_flight: None,
            limit_headers: Vec::new(),
            rules_version: None,
            cache: Lookup::Bypass,
            body: Bytes::new(),
            bytes_in: 0,
            response: None,
        })
    }
}

/// The cheap per-address limit (429), before any signature is checked: floods of bad tokens cost
/// no verification.
fn per_client_limit(x: &mut Exchange, state: &State) -> Result<(), Stop> {
    if let Err(retry_after) = state.ip_limit.check(x.client) {
        return Err(ApiError::new(ErrorCode::RateLimited, "too many requests from this address")
            .with_retry_after(retry_after)
            .into());
    }
    Ok(())
}

/// Authenticates the caller as the route asks: a bearer JWT or an API key (401 with a reason).
async fn identify(x: &mut Exchange, state: &State) -> Result<(), Stop> {
    x.identity = authenticate(state, x.route.spec.auth, x.request.headers()).await?;
    Ok(())
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

/// One identity's share of the requests in flight (429 `too_many_in_flight`): a client that
/// holds requests open (slow upstream calls, slow bodies) cannot take the slots every other
/// identity needs. The slot is held until the exchange ends.
fn identity_share(x: &mut Exchange, state: &State) -> Result<(), Stop> {
    let Some(identity) = x.identity.as_ref().filter(|_| state.per_identity.enabled()) else {
        return Ok(());
    };
    match state.per_identity.try_acquire(identity.subject.clone()) {
        Some(slot) => {
            x.in_flight = slot;
            Ok(())
        }
        None => {
            metrics::counter!(crate::telemetry::names::HTTP_REFUSED, "role" => "gateway",
                "reason" => "too_many_in_flight")
            .increment(1);
            Err(ApiError::new(
                ErrorCode::RateLimited,
                "too many requests in flight for this identity",
            )
            .with_reason("too_many_in_flight")
            .with_retry_after(1)
            .into())
        }
    }
}

/// Whether the response cache may answer the request, and under which key (the tenant's, and
/// the user's with `vary_user`): known before the rate limit, whose round trip reads the entry.
fn cache_key(x: &mut Exchange, _state: &State) -> Result<(), Stop> {
    x.cache = match super::cache::policy::cache_key(&x.route, x.identity.as_ref(), &x.request) {
        Some(key) => Lookup::Wanted { key, read: crate::ratelimit::CacheRead::NotAsked },
        None => Lookup::Bypass,
    };
    Ok(())
}

/// The route's rate-limit policies (else `authenticated` or `public`) for the caller's subject,
/// or `ip:<address>` for anonymous callers (429, with `Retry-After`). The limiter's script also
/// reads the request's cache entry in the same round trip; it is used only after the limit and
/// the entitlement allow the request. A refusal is an answer (`RateLimit-*` on it), not an error.
async fn rate_limit(x: &mut Exchange, state: &State) -> Result<(), Stop> {
    let route = &x.route;
    let tier;
    let policies: &[String] = if route.spec.rate_limits.is_empty() {
        tier = [if x.identity.is_some() { "authenticated" } else { "public" }.to_string()];
        &tier
    } else {
        &route.spec.rate_limits
    };
    let anonymous;
    let subject = match &x.identity {
        Some(identity) => identity.subject.as_str(),
        None => {
            anonymous = format!("ip:{}", x.client);
            anonymous.as_str()
        }
    };
    let also_get = match &x.cache {
        Lookup::Wanted { key, .. } => state.cache.store.shared_key(key),
        _ => None,
    };
    let LimitAndLookup { outcome, cached } = state.limiter.check(policies, subject, also_get).await;
    if let Lookup::Wanted { read, .. } = &mut x.cache {
        *read = cached;
    }
    x.limit_headers = rate_limit_headers(&outcome);
    if outcome.store_unavailable {
        return Err(ApiError::dependency(
            "redis",
            anyhow::anyhow!("rate-limit store unavailable; rate_limit_on_store_error = closed"),
        )
        .into());
    }
    if !outcome.allowed {
        let retry_after = outcome
            .tightest
            .as_ref()
            .map(|(_, _, v)| v.retry_us.div_ceil(1_000_000).max(1))
            .unwrap_or(1);
        let mut response = ApiError::new(ErrorCode::RateLimited, "rate limit exceeded")
            .with_retry_after(retry_after)
            .into_response();
        response.headers_mut().extend(std::mem::take(&mut x.limit_headers));
        x.response = Some(response);
        return Err(Stop::Answered);
    }
    Ok(())
}

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

/// The route's entitlement for an identified caller (403), decided in-process at the newest
/// rules version this replica has heard of; the version goes back as `X-Entitlements-Version`.
async fn entitle(x: &mut Exchange, state: &State) -> Result<(), Stop> {
    let (Some(spec), Some(identity)) = (&x.route.spec.entitlement, &x.identity) else {
        return Ok(());
    };
    let resource = render_resource(&spec.resource, &x.params);
    let action = x.route.action(&x.method);
    match state.rules.decide_current(identity, &resource, &action).await {
        Ok(d) if d.allowed => {
            x.rules_version = Some(d.version);
            Ok(())
        }
        Ok(_) => {
            Err(ApiError::new(ErrorCode::Forbidden, format!("not entitled to {action} {resource}"))
                .into())
        }
        Err(e) => Err(ApiError::dependency("entitlements", anyhow::anyhow!(e)).into()),
    }
}

/// Looks the request up in the response cache ([`cache::lookup`]): a fresh entry (`HIT`) or a
/// stale one within `stale-while-revalidate` (`STALE`) is the answer, and the next two steps
/// pass; otherwise this request fetches for its key, or waits for the request that does.
async fn cache_lookup(x: &mut Exchange, state: &State) -> Result<(), Stop> {
    let wanted = std::mem::take(&mut x.cache);
    let identity = x.identity.as_ref();
    (x.cache, x.response) = cache::lookup(state, &x.route, wanted, &mut x.request, identity).await;
    Ok(())
}

/// Reads the request body in full, within `server.max_body_bytes` and the read deadline (413,
/// 408), unless the cache answered.
async fn read_body(x: &mut Exchange, state: &State) -> Result<(), Stop> {
    if x.response.is_some() {
        return Ok(());
    }
    x.body = up::read_body(std::mem::take(x.request.body_mut()), state.max_body).await?;
    x.bytes_in = x.body.len() as u64;
    Ok(())
}

/// Sends the request to the route's upstreams ([`up::send`]: each attempt admitted by its
/// upstream's circuit breaker, 503; timeout 504; retries; 502), unless the cache answered.
async fn upstream(x: &mut Exchange, state: &State) -> Result<(), Stop> {
    if x.response.is_some() {
        return Ok(());
    }
    let (parts, _) = std::mem::take(&mut x.request).into_parts();
    let call = Call {
        route: &x.route,
        parts,
        body: std::mem::take(&mut x.body),
        peer: x.peer,
        client: x.client,
        identity: x.identity.as_ref(),
    };
    x.response = Some(up::send(state, call).await?);
    Ok(())
}

/// Stores the upstream's answer when this request fetched for its key, wakes the requests
/// waiting on it, and says `X-Cache` ([`cache::fill`]).
async fn cache_store(x: &mut Exchange, state: &State) -> Result<(), Stop> {
    if let Some(response) = x.response.take() {
        let lookup = std::mem::take(&mut x.cache);
        x.response = Some(cache::fill(state, &x.route, lookup, response).await);
    }
    Ok(())
}

/// A list response keeps only the items the caller may read ([`super::items`]): after the
/// cache, which keeps the upstream's whole body.
async fn filter_items(x: &mut Exchange, state: &State) -> Result<(), Stop> {
    let (Some(check), Some(identity)) = (&x.route.items, &x.identity) else { return Ok(()) };
    let Some(response) = x.response.take() else { return Ok(()) };
    let head = x.method == Method::HEAD;
    let filtered =
        super::items::filter(check, &state.rules, identity, &x.route.spec.name, head, response);
    x.response = Some(filtered.await?);
    Ok(())
}

/// What an identified caller receives was decided for that caller: no shared cache in front of
/// the gateway may store it for others (`Cache-Control` made private). Then `RateLimit-*` and
/// `X-Entitlements-Version`.
fn response_headers(x: &mut Exchange, _state: &State) -> Result<(), Stop> {
    let Some(response) = x.response.as_mut() else { return Ok(()) };
    if x.identity.is_some() {
        super::cache::policy::privatize(response.headers_mut());
    }
    response.headers_mut().extend(std::mem::take(&mut x.limit_headers));
    if let Some(version) = x.rules_version {
        response.headers_mut().insert(X_ENTITLEMENTS_VERSION.clone(), version.into());
    }
    Ok(())
}

/// The last step, whatever ended the request: the answer (or the refusal) counted in the route's
/// request metrics, and, for an answer to an identified caller, in its tenant's usage.
fn metrics_and_usage(mut x: Exchange, state: &State, end: Result<(), Stop>) -> Response {
    let route = x.route.spec.name.as_str();
    let response = match end {
        Ok(()) | Err(Stop::Answered) => {
            let response = x.response.take().unwrap_or_else(|| {
                ApiError::internal(anyhow::anyhow!("the pipeline ended without an answer"))
                    .into_response()
            });
            if let Some(identity) = &x.identity {
                let bytes_out = response
                    .headers()
                    .get(header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                state.usage.record(
                    &identity.tenant,
                    route,
                    status_class(response.status().as_u16()),
                    x.bytes_in,
                    bytes_out,
                );
            }
            response
        }
        Err(Stop::Refused(e)) => e.into_response(),
    };
    state.metrics.record(
        route,
        method_label(&x.method),
        response.status().as_u16(),
        x.started.elapsed().as_secs_f64(),
    );
    response
}

#[cfg(test)]
mod tests {
    /// The size of the future `f` returns, without making one.
    fn future_size<A, B, C, Fut, F: Fn(A, B, C) -> Fut>(_: F) -> usize {
        std::mem::size_of::<Fut>()
    }

    /// axum boxes each request's handler future, copying it whole: it was 14 KB, most of it a
    /// Redis command's future on a branch few requests take (cluster reads of another slot),
    /// and the copy showed in the miss path's profile. Such branches are boxed; this keeps them.
    #[test]
    fn the_proxy_handlers_future_stays_small() {
        let size = future_size(super::forward);
        eprintln!("forward's future: {size} bytes");
        assert!(size < 4096, "forward's future is {size} bytes: box what made it grow");
    }
}
