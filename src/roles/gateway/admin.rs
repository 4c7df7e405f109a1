//! The gateway's own endpoints (admin role, except `/entitlements/version`) and the API document
//! that describes them: dependencies and breakers, the route table, rate-limit policies and
//! counts, the response cache's counters and purge, the rules version. Every body is a type
//! below, so `/openapi.json` says what is sent; the data routes are the upstreams' contracts.

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use axum::extract::State as AxumState;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::routes::{AuthMode, EntitlementSpec};
use super::State;
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::policy::mirror::Standing;
use crate::ratelimit::{self, OnStoreError, Policy};
use crate::role::Role;
use crate::server::openapi::{self, Errors};

/// The gateway's documented routes (the data routes are the router's fallback).
pub(super) fn api() -> OpenApiRouter<State> {
    OpenApiRouter::with_openapi(openapi::base(Role::Gateway))
        .routes(routes!(status))
        .routes(routes!(route_metadata))
        .routes(routes!(circuit_breakers))
        .routes(routes!(rate_limits))
        .routes(routes!(cache_stats))
        .routes(routes!(cache_purge))
        .routes(routes!(rules_version))
}

/// The body of `GET /api/v1/status`.
#[derive(Serialize, ToSchema)]
struct GatewayStatus {
    /// Routes in the table.
    routes: usize,
    /// The gateway's dependencies.
    dependencies: Dependencies,
    /// Each upstream's breaker.
    circuit_breakers: Vec<BreakerState>,
}

/// The gateway's dependencies, as it sees them.
#[derive(Serialize, ToSchema)]
struct Dependencies {
    /// The entitlements role.
    entitlements: EntitlementsDependency,
    /// The signing keys.
    jwks: JwksDependency,
}

/// The entitlements role, as the gateway sees it.
#[derive(Serialize, ToSchema)]
struct EntitlementsDependency {
    /// Its base URL.
    url: String,
    /// Whether its `/ready` answered 200 (within 2 s).
    ready: bool,
}

/// The signing keys, as the gateway holds them.
#[derive(Serialize, ToSchema)]
struct JwksDependency {
    /// Whether a key set is loaded.
    loaded: bool,
}

/// One upstream's circuit breaker.
#[derive(Serialize, ToSchema)]
struct BreakerState {
    /// The upstream's base URL.
    upstream: String,
    /// `closed`, `half_open` or `open`.
    #[schema(example = "closed")]
    state: &'static str,
    /// How often it opened (`GET /api/v1/circuit-breakers` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    times_opened: Option<u64>,
}

#[utoipa::path(get, path = "/api/v1/status", tag = "gateway", summary = "The gateway's view of its dependencies (admin)", security(("bearer" = [])), responses((status = 200, description = "Routes, dependencies and breakers", body = GatewayStatus), Errors))]
async fn status(AxumState(state): AxumState<State>, caller: Caller) -> ApiResult<Response> {
    caller.require_role(&state.admin_role)?;
    let entitlements = reqwest::Client::new()
        .get(
            state
                .entitlements
                .url()
                .join("ready")
                .map_err(|e| ApiError::internal(anyhow::anyhow!(e)))?,
        )
        .timeout(Duration::from_secs(2))
        .headers(crate::telemetry::trace_headers())
        .send()
        .await
        .map(|r| r.status().is_success())
        .unwrap_or(false);
    let now = Instant::now();
    let breakers: Vec<_> = state
        .breakers
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .map(|(u, b)| BreakerState {
            upstream: u.clone(),
            state: b.breaker.describe(now).0,
            times_opened: None,
        })
        .collect();
    Ok(axum::Json(GatewayStatus {
        routes: state.table().routes().len(),
        dependencies: Dependencies {
            entitlements: EntitlementsDependency {
                url: state.entitlements.url().to_string(),
                ready: entitlements,
            },
            jwks: JwksDependency { loaded: state.verifier.jwks().is_loaded() },
        },
        circuit_breakers: breakers,
    })
    .into_response())
}

#[utoipa::path(get, path = "/entitlements/version", tag = "gateway", summary = "The rules version this gateway replica decides at", security(("bearer" = [])), responses((status = 200, description = "Where this replica stands", body = Standing), Errors))]
async fn rules_version(AxumState(state): AxumState<State>, _caller: Caller) -> ApiResult<Response> {
    Ok(axum::Json(state.rules.standing("gateway", &state.replica)).into_response())
}

/// The body of `GET /api/v1/metadata/routes`.
#[derive(Serialize, ToSchema)]
struct RouteTable<'a> {
    /// Every route, in matching order.
    routes: Vec<RouteInfo<'a>>,
}

/// One compiled route.
#[derive(Serialize, ToSchema)]
struct RouteInfo<'a> {
    /// The route's name (the `route` label of metrics).
    name: &'a str,
    /// Its path pattern.
    path: &'a str,
    /// Its methods (empty: all).
    methods: &'a [String],
    /// Whether it needs credentials.
    auth: AuthMode,
    /// The entitlement it checks.
    entitlement: Option<&'a EntitlementSpec>,
    /// Its upstream base URLs.
    #[schema(value_type = Vec<String>)]
    upstreams: &'a [url::Url],
    /// The upstream deadline, seconds.
    timeout_seconds: f64,
    /// Retries after a failed connection.
    retries: u32,
    /// The prefix removed before forwarding.
    strip_prefix: Option<&'a str>,
    /// Its rate-limit policies.
    rate_limits: &'a [String],
}

#[utoipa::path(get, path = "/api/v1/metadata/routes", tag = "gateway", summary = "The route table (admin)", security(("bearer" = [])), responses((status = 200, description = "Every route", body = RouteTable), Errors))]
async fn route_metadata(AxumState(state): AxumState<State>, caller: Caller) -> ApiResult<Response> {
    caller.require_role(&state.admin_role)?;
    let table = state.table();
    let routes = table
        .routes()
        .iter()
        .map(|r| RouteInfo {
            name: &r.spec.name,
            path: &r.spec.path,
            methods: &r.spec.methods,
            auth: r.spec.auth,
            entitlement: r.spec.entitlement.as_ref(),
            upstreams: &r.upstreams,
            timeout_seconds: r.timeout.as_secs_f64(),
            retries: r.retries,
            strip_prefix: r.spec.strip_prefix.as_deref(),
            rate_limits: &r.spec.rate_limits,
        })
        .collect();
    Ok(axum::Json(RouteTable { routes }).into_response())
}

/// The body of `GET /api/v1/circuit-breakers`.
#[derive(Serialize, ToSchema)]
struct Breakers {
    /// Each upstream's breaker, with how often it opened.
    circuit_breakers: Vec<BreakerState>,
}

#[utoipa::path(get, path = "/api/v1/circuit-breakers", tag = "gateway", summary = "Circuit breaker per upstream (admin)", security(("bearer" = [])), responses((status = 200, description = "Each upstream's breaker", body = Breakers), Errors))]
async fn circuit_breakers(
    AxumState(state): AxumState<State>,
    caller: Caller,
) -> ApiResult<Response> {
    caller.require_role(&state.admin_role)?;
    let now = Instant::now();
    let list: Vec<_> = state
        .breakers
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .map(|(u, b)| {
            let (s, opened) = b.breaker.describe(now);
            BreakerState { upstream: u.clone(), state: s, times_opened: Some(opened) }
        })
        .collect();
    Ok(axum::Json(Breakers { circuit_breakers: list }).into_response())
}

/// The body of `GET /api/v1/rate-limits`.
#[derive(Serialize, ToSchema)]
struct RateLimits<'a> {
    /// Every policy with its decision counts.
    policies: Vec<PolicyCounts>,
    /// Whether refusals are only counted (`gateway.rate_limit_shadow`).
    shadow: bool,
    /// What happens when Redis cannot answer.
    on_store_error: OnStoreError,
    /// The per-address limit applied before any token is verified.
    ip_limit: &'a Policy,
    /// `exact` or `leased` (`gateway.rate_limit_mode`).
    mode: ratelimit::Mode,
    /// Leased mode's share and lifetime (`gateway.rate_limit_lease`); absent in exact mode.
    #[serde(skip_serializing_if = "Option::is_none")]
    lease: Option<&'a ratelimit::Lease>,
    /// Redis script calls made since start (each decides a batch of checks, or leases); absent
    /// without Redis.
    redis_calls: Option<u64>,
}

/// One rate-limit policy and its decisions since start.
#[derive(Serialize, ToSchema)]
struct PolicyCounts {
    /// The policy's name.
    name: String,
    /// Requests per period.
    rate: u64,
    /// The period, seconds.
    period_seconds: f64,
    /// Requests allowed at once.
    burst: u64,
    /// Requests allowed.
    allowed: u64,
    /// Requests refused.
    limited: u64,
    /// Requests that would have been refused (shadow mode).
    shadow_limited: u64,
    /// Decisions Redis could not make.
    store_errors: u64,
}

#[utoipa::path(get, path = "/api/v1/rate-limits", tag = "gateway", summary = "Rate-limit policies and decision counts (admin)", security(("bearer" = [])), responses((status = 200, description = "Policies and counts", body = RateLimits), Errors))]
async fn rate_limits(AxumState(state): AxumState<State>, caller: Caller) -> ApiResult<Response> {
    caller.require_role(&state.admin_role)?;
    let counts = state.limiter.counts();
    let policies: Vec<_> = state
        .limiter
        .policies()
        .iter()
        .map(|(name, p)| {
            // A policy added by a reload has no counters until its first decision.
            let load = |field: fn(&ratelimit::Counts) -> &std::sync::atomic::AtomicU64| {
                counts.get(name).map_or(0, |c| field(c).load(Relaxed))
            };
            PolicyCounts {
                name: name.clone(),
                rate: p.rate,
                period_seconds: p.period.as_secs_f64(),
                burst: p.burst,
                allowed: load(|c| &c.allowed),
                limited: load(|c| &c.limited),
                shadow_limited: load(|c| &c.shadow_limited),
                store_errors: load(|c| &c.store_errors),
            }
        })
        .collect();
    Ok(axum::Json(RateLimits {
        policies,
        shadow: state.limiter.shadow(),
        on_store_error: state.config.rate_limit_on_store_error,
        ip_limit: &state.config.ip_limit,
        mode: state.config.rate_limit_mode,
        lease: (state.config.rate_limit_mode == ratelimit::Mode::Leased)
            .then_some(&state.config.rate_limit_lease),
        redis_calls: state.limiter.script_calls(),
    })
    .into_response())
}

/// The body of `GET /api/v1/cache/stats`: the response cache's counters since start.
#[derive(Serialize, ToSchema)]
struct CacheStats {
    /// Served fresh from the cache.
    hits: u64,
    /// Went upstream.
    misses: u64,
    /// Served stale while revalidating.
    stale: u64,
    /// Not cacheable.
    bypass: u64,
    /// Revalidations sent upstream.
    revalidations: u64,
    /// Requests that waited for another request's upstream fetch.
    coalesced: u64,
    /// Store failures (the request went upstream).
    errors: u64,
}

#[utoipa::path(get, path = "/api/v1/cache/stats", tag = "gateway", summary = "Response cache statistics (admin)", security(("bearer" = [])), responses((status = 200, description = "The cache's counters", body = CacheStats), Errors))]
async fn cache_stats(AxumState(state): AxumState<State>, caller: Caller) -> ApiResult<Response> {
    caller.require_role(&state.admin_role)?;
    let s = &state.cache.stats;
    Ok(axum::Json(CacheStats {
        hits: s.hits.load(Relaxed),
        misses: s.misses.load(Relaxed),
        stale: s.stale.load(Relaxed),
        bypass: s.bypass.load(Relaxed),
        revalidations: s.revalidations.load(Relaxed),
        coalesced: s.coalesced.load(Relaxed),
        errors: s.errors.load(Relaxed),
    })
    .into_response())
}

/// The body of `POST /api/v1/cache/purge`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct Purge {
    /// A route name, or a prefix of route names.
    route: String,
}

/// The answer of `POST /api/v1/cache/purge`.
#[derive(Serialize, ToSchema)]
struct Purged {
    /// Entries removed.
    purged: u64,
}

#[utoipa::path(post, path = "/api/v1/cache/purge", tag = "gateway", summary = "Purge cached responses by route or prefix (admin)",
    request_body(content = Purge, example = json!({"route": "latest_prices"})),
    security(("bearer" = [])), responses((status = 200, description = "How many entries were removed", body = Purged), Errors))]
async fn cache_purge(
    AxumState(state): AxumState<State>,
    caller: Caller,
    crate::error::Json(purge): crate::error::Json<Purge>,
) -> ApiResult<Response> {
    caller.require_role(&state.admin_role)?;
    let purged = state
        .cache
        .store
        .purge(&purge.route)
        .await
        .map_err(|e| ApiError::dependency("redis", anyhow::anyhow!(e)))?;
    tracing::info!(role = "gateway", admin = %caller.0.identity.subject, route = %purge.route, purged, "cache purged");
    Ok(axum::Json(Purged { purged }).into_response())
}
