//! The gateway role (port 8000): the platform's REST front door.
//!
//! - [`routes`]: the route table (file or built-in), compiled and swapped whole on SIGHUP.
//! - [`proxy`]: the request path, a pipeline read top to bottom: one [`proxy::Exchange`] per
//!   request carried through ordered steps (canonical target, route, per-client limit, identity,
//!   the identity's share, cache key, rate limit, entitlement, cache lookup, body, breaker and
//!   upstream, cache store, list items, response headers, metrics and usage). Adding a step is
//!   one function and one line in [`proxy::forward`].
//! - [`upstream`]: the call to a route's upstreams ([`upstream::Call`]): headers rewritten,
//!   round-robin, breaker, timeout, retries.
//! - [`breaker`]: a circuit breaker per upstream.
//! - [`upstream_tls`]: the upstream clients: plain HTTP, TLS and mTLS per upstream group, HTTP/2.
//! - [`cache`]: the response cache: [`cache::store`] (Redis or in-process), [`cache::policy`]
//!   (the HTTP caching rules), [`cache::serve`] (lookup, coalescing, fill, revalidation).
//! - [`ratelimit`]: GCRA rate limits in Redis (or in-process), and the cheap per-IP limit.
//! - [`items`]: per-item entitlements of list responses.
//! - [`usage`]: per-tenant usage pushed to the metrics role.
//! - `admin`: the gateway's own endpoints and their API document.
//!
//! Gateway endpoints (admin role): `GET /api/v1/status`, `/api/v1/metadata/routes`,
//! `/api/v1/circuit-breakers`. Everything else is a data route.

mod admin;
pub mod breaker;
pub mod cache;
pub mod items;
pub mod proxy;
pub use proxy::names;
pub mod routes;
pub mod upstream;
pub mod upstream_tls;
pub mod usage;

use crate::role::Role;
use crate::server::openapi;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use axum::extract::FromRef;
use axum::Router;
use serde::{Deserialize, Serialize};
use url::Url;

use super::common::{Deps, RunError, Service};
use crate::auth::Verifier;
use crate::config::Problem;
use crate::policy::client::Entitlements;
use crate::ratelimit;
use crate::server::{Context, Shutdown};
use breaker::{Breaker, BreakerConfig};
use routes::Table;

/// The `gateway` config section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The role's port.
    pub port: u16,
    /// The route table (YAML); unset uses the built-in `config/routes.yaml`. Reloaded on SIGHUP.
    pub routes_file: Option<PathBuf>,
    /// Upstream groups routes refer to by name (`http://` or `https://` URLs).
    pub upstreams: BTreeMap<String, Vec<Url>>,
    /// TLS to the `https://` upstreams of a group, by group name: a CA file instead of the
    /// system's roots, a client certificate, the server name, HTTP/2. Groups without an entry
    /// (and routes that list their own URLs) use the system's roots and offer HTTP/2.
    pub upstream_tls: BTreeMap<String, upstream_tls::UpstreamTls>,
    /// Default upstream deadline for a response head.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Default retries (idempotent, body-less requests, after a failed connection).
    pub retries: u32,
    /// The older name of `server.trusted_proxies`, still honoured: both lists are one set.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Requests one identity (user, API key, service) may have in flight at once through the
    /// gateway; beyond it, 429 `too_many_in_flight` (0: no cap).
    pub max_in_flight_per_identity: u32,
    /// Browser origins allowed by CORS (exact, or `*`).
    pub cors_origins: Vec<String>,
    /// Allow requests when the entitlements role cannot answer (default: refuse with 503).
    pub entitlements_fail_open: bool,
    /// The longest a decision is remembered locally.
    #[serde(with = "humantime_serde")]
    pub decision_cache_ttl: Duration,
    /// Circuit breakers.
    pub breaker: BreakerConfig,
    /// How often usage is pushed to the metrics role.
    #[serde(with = "humantime_serde")]
    pub usage_interval: Duration,
    /// Distinct (tenant, route, status class) keys kept between pushes.
    pub usage_max_keys: usize,
    /// Rate-limit policies by name (the platform's tiers by default); routes name theirs in
    /// `rate_limits`, else `authenticated` applies to identified callers and `public` to others.
    pub rate_limits: BTreeMap<String, ratelimit::Policy>,
    /// When Redis cannot answer: `local` (in-process limits), `open` (allow) or `closed` (503).
    pub rate_limit_on_store_error: ratelimit::OnStoreError,
    /// Count would-be rejections without rejecting.
    pub rate_limit_shadow: bool,
    /// `exact` (every request decided by Redis) or `leased` (each replica leases shares of a
    /// budget and decides locally; over-admission bounded by `rate_limit_lease.max_age`).
    pub rate_limit_mode: ratelimit::Mode,
    /// Leased mode's share of a policy's burst per lease and the lease's lifetime.
    pub rate_limit_lease: ratelimit::Lease,
    /// The cheap per-address limit applied before any token is verified. Behind a load balancer,
    /// set `trusted_proxies`, or every client shares the balancer's address.
    pub ip_limit: ratelimit::Policy,
    /// Bytes of entries (bodies, headers and keys) kept by the in-process cache (no Redis); when
    /// full, the least recently used entries make room.
    pub cache_max_bytes: usize,
}

impl Default for Config {
    fn default() -> Self {
        let local = Url::parse("http://127.0.0.1:8100").expect("a valid URL");
        Config {
            port: crate::role::Role::Gateway.default_port(),
            routes_file: None,
            upstreams: ["market_data", "curves", "projections"]
                .iter()
                .map(|g| (g.to_string(), vec![local.clone()]))
                .collect(),
            upstream_tls: BTreeMap::new(),
            timeout: Duration::from_secs(10),
            retries: 1,
            trusted_proxies: Vec::new(),
            max_in_flight_per_identity: 64,
            cors_origins: Vec::new(),
            entitlements_fail_open: false,
            decision_cache_ttl: Duration::from_secs(5),
            breaker: BreakerConfig::default(),
            usage_interval: Duration::from_secs(5),
            usage_max_keys: 10_000,
            rate_limits: ratelimit::default_policies(),
            rate_limit_on_store_error: ratelimit::OnStoreError::Local,
            rate_limit_shadow: false,
            rate_limit_mode: ratelimit::Mode::Exact,
            rate_limit_lease: ratelimit::Lease::default(),
            ip_limit: ratelimit::Policy { rate: 1000, period: Duration::from_secs(1), burst: 2000 },
            cache_max_bytes: 64 * 1024 * 1024,
        }
    }
}

impl Config {
    /// Checks the section, compiling the route table.
    pub fn validate(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        if let Err(RouteProblems(table)) = self.table() {
            problems.extend(table);
        }
        let ip = &self.ip_limit;
        if ip.rate == 0 || ip.burst == 0 || ip.period.is_zero() {
            problems.push(Problem::new(
                "gateway.ip_limit",
                "rate, burst and period must be greater than 0",
            ));
        }
        if !(0.0..=1.0).contains(&self.breaker.error_rate) {
            problems.push(Problem::new("gateway.breaker.error_rate", "must be between 0 and 1"));
        }
        problems.extend(upstream_tls::validate(&self.upstreams, &self.upstream_tls));
        problems.extend(
            self.rate_limit_lease
                .problems()
                .into_iter()
                .map(|m| Problem::new("gateway.rate_limit_lease", m)),
        );
        problems
    }

    /// The route table and the rate-limit policies (config, then the route file's), checked
    /// together: every policy a route names must exist.
    fn table(&self) -> Result<(Table, BTreeMap<String, ratelimit::Policy>), RouteProblems> {
        let problem = |message: String| Problem::new("gateway.routes_file", message);
        let file = routes::load_file(self.routes_file.as_deref())
            .map_err(|e| RouteProblems(vec![problem(e)]))?;
        let mut policies = self.rate_limits.clone();
        policies.extend(file.rate_limits);
        let mut problems = Vec::new();
        for spec in &file.routes {
            for policy in spec.rate_limits.iter().filter(|p| !policies.contains_key(*p)) {
                problems.push(problem(format!(
                    "route {} names an unknown rate-limit policy {policy:?}",
                    spec.name
                )));
            }
        }
        for (name, p) in &policies {
            if p.rate == 0 || p.burst == 0 || p.period.is_zero() {
                problems.push(problem(format!(
                    "rate limit {name}: rate, burst and period must be greater than 0"
                )));
            }
        }
        let table = Table::compile(file.routes, &self.upstreams, self.timeout, self.retries);
        match table {
            Ok(table) if problems.is_empty() => Ok((table, policies)),
            Ok(_) => Err(RouteProblems(problems)),
            Err(compiled) => {
                let mut all: Vec<Problem> = compiled.into_iter().map(problem).collect();
                all.extend(problems);
                Err(RouteProblems(all))
            }
        }
    }
}

/// Why a route table (with its rate-limit policies) was refused: every problem, each under the
/// key `gateway.routes_file` and naming its route and field. Shown as one line, the messages
/// joined by `; ` (the reload log, the start-up error); `check-config` lists them one by one.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}", .0.iter().map(|p| p.message.as_str()).collect::<Vec<_>>().join("; "))]
pub struct RouteProblems(pub Vec<Problem>);

/// The role's state: one `Arc`, because axum clones it for every request and extractor.
#[derive(Clone)]
pub struct State(Arc<Shared>);

impl std::ops::Deref for State {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// What the gateway's requests share (already behind [`State`]'s `Arc`).
pub struct Shared {
    /// The route table; swapped whole on reload (readers clone the `Arc` under a short lock).
    table: RwLock<Arc<Table>>,
    verifier: Arc<Verifier>,
    api_keys: Arc<crate::auth::api_keys::ApiKeys>,
    entitlements: Arc<Entitlements>,
    /// The rules every route's entitlement is decided by, in-process.
    rules: Arc<crate::policy::mirror::Mirror>,
    /// This replica's id on the replica board.
    replica: String,
    /// Breakers by upstream base URL, created on first use.
    breakers: RwLock<HashMap<String, Arc<Guard>>>,
    /// The upstream connection pools: one per TLS profile and I/O thread (see [`local`]).
    clients: upstream_tls::Clients,
    usage: Arc<usage::Usage>,
    limiter: ratelimit::Limiter,
    ip_limit: Arc<ratelimit::IpLimit>,
    cache: Arc<cache::Cache>,
    admin_role: String,
    config: Config,
    /// `server.trusted_proxies` and `gateway.trusted_proxies`: whose `X-Forwarded-Proto` is believed.
    trusted_proxies: Vec<ipnet::IpNet>,
    /// Requests in flight per identity (`max_in_flight_per_identity`).
    per_identity: Arc<crate::server::client::PerKey<String>>,
    /// `server.max_body_bytes`: a request body is read in full, up to this, before it goes upstream.
    max_body: usize,
    /// `access_gateway_requests_total` and `access_gateway_request_duration_seconds` by route.
    metrics: crate::server::layers::RouteMetrics,
}

impl FromRef<State> for Arc<Verifier> {
    fn from_ref(state: &State) -> Self {
        state.verifier.clone()
    }
}

impl Shared {
    fn table(&self) -> Arc<Table> {
        self.table.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn breaker(&self, base: &Url) -> Arc<Guard> {
        if let Some(b) = self.breakers.read().unwrap_or_else(|p| p.into_inner()).get(base.as_str())
        {
            return b.clone();
        }
        let mut all = self.breakers.write().unwrap_or_else(|p| p.into_inner());
        all.entry(base.to_string())
            .or_insert_with(|| Arc::new(Guard::new(base, self.config.breaker.clone())))
            .clone()
    }

    /// Re-reads the route table and its rate-limit policies; a bad file is refused and the
    /// current ones kept.
    pub fn reload(&self) -> Result<usize, RouteProblems> {
        let (table, policies) = self.config.table()?;
        let n = table.routes().len();
        *self.table.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(table);
        self.limiter.set_policies(policies);
        Ok(n)
    }
}

/// An upstream's circuit breaker with its state gauge, registered once (not on every request).
pub(crate) struct Guard {
    pub(crate) breaker: Breaker,
    gauge: metrics::Gauge,
}

impl Guard {
    fn new(base: &Url, config: BreakerConfig) -> Self {
        let upstream = base
            .host_str()
            .map(|h| format!("{h}:{}", base.port_or_known_default().unwrap_or(80)))
            .unwrap_or_default();
        let gauge = metrics::gauge!(proxy::names::BREAKER_STATE, "role" => "gateway", "upstream" => upstream);
        Guard { breaker: Breaker::new(config, Instant::now()), gauge }
    }

    /// Sets the gauge: 0 closed, 1 half-open, 2 open.
    pub(crate) fn publish(&self) {
        let value = match self.breaker.describe(Instant::now()).0 {
            "closed" => 0.0,
            "half_open" => 1.0,
            _ => 2.0,
        };
        self.gauge.set(value);
    }
}

/// Builds the state: the route table, the upstream client, entitlements and usage.
pub async fn build(config: &Config, deps: &Deps) -> Result<State, RunError> {
    let (ctx, auth) = (&deps.ctx, deps.auth.clone());
    let config = config.clone();
    let (table, policies) = config.table().map_err(|e| anyhow::anyhow!("routes: {e}"))?;
    let tokens = crate::auth::token_source::for_role(ctx, &auth)?;
    let entitlements = Entitlements::for_role(
        ctx,
        tokens.clone(),
        config.decision_cache_ttl,
        config.entitlements_fail_open,
        auth.channels.as_ref(),
    )
    .await?;
    let rules = crate::policy::mirror::Mirror::for_role(
        ctx,
        tokens.clone(),
        config.entitlements_fail_open,
        config.decision_cache_ttl,
        auth.channels.as_ref(),
    )
    .await?;
    let replica = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
    Arc::new(crate::policy::board::Board::for_context(ctx, auth.redis.as_ref())).spawn_reporter(
        "gateway",
        replica.clone(),
        rules.applied(),
        ctx.shutdown.clone(),
    );
    let usage = usage::Usage::new(config.usage_max_keys);
    if let Some(url) = &ctx.config.metrics_service_url {
        usage.spawn_push(url.clone(), tokens, config.usage_interval, ctx.shutdown.clone());
    }
    // The process's Redis connection (and its breaker), shared with revocations.
    let redis = auth.redis.clone().map(|guarded| (guarded, ctx.config.redis_prefix()));
    if let Some((guarded, _)) = &redis {
        // Rate limits and the response cache have a fallback (`local` or `open` limits, the
        // upstream) unless the limits fail closed: then no request can pass without Redis.
        match config.rate_limit_on_store_error {
            ratelimit::OnStoreError::Closed => {
                ctx.readiness.add_check("redis_rate_limits", guarded.ready_check())
            }
            _ => ctx.readiness.add_soft_check("redis_rate_limits", guarded.ready_check()),
        }
    }
    let cache_store: Arc<dyn cache::Store> = match &redis {
        Some((guarded, prefix)) => {
            Arc::new(cache::RedisStore::new(guarded.clone(), prefix.clone()))
        }
        None => Arc::new(cache::MemoryStore::new(config.cache_max_bytes)),
    };
    let limiter = ratelimit::Limiter::new(
        policies,
        redis,
        config.rate_limit_on_store_error,
        config.rate_limit_shadow,
    );
    let limiter = match config.rate_limit_mode {
        ratelimit::Mode::Exact => limiter,
        ratelimit::Mode::Leased => limiter.leased(config.rate_limit_lease),
    };
    let clients = upstream_tls::Clients::new(&config.upstream_tls)
        .map_err(|e| anyhow::anyhow!("gateway.upstream_tls.{e}"))?;
    Ok(State(Arc::new(Shared {
        table: RwLock::new(Arc::new(table)),
        verifier: auth.verifier,
        api_keys: auth.api_keys,
        entitlements,
        rules,
        replica,
        breakers: RwLock::default(),
        clients,
        usage,
        ip_limit: ratelimit::IpLimit::new(config.ip_limit.clone()),
        limiter,
        cache: cache::Cache::new(cache_store),
        admin_role: ctx.config.auth.admin_role.clone(),
        trusted_proxies: crate::server::trusted_proxies(&ctx.config),
        per_identity: crate::server::client::PerKey::new(config.max_in_flight_per_identity),
        max_body: ctx.config.server.max_body_bytes,
        config,
        metrics: crate::server::layers::RouteMetrics::new(
            Role::Gateway,
            proxy::names::REQUESTS,
            proxy::names::DURATION,
        ),
    })))
}

/// The role's routes: the gateway endpoints, everything else proxied; CORS answered first when
/// origins are configured (with none, no browser origin is allowed, so the layer is left out).
pub fn router(state: State) -> Router {
    let cors = (!state.config.cors_origins.is_empty()).then(|| cors(&state.config.cors_origins));
    // The data routes are proxied (the fallback): their contracts are the upstreams'.
    let router = openapi::finish(admin::api().with_state(state.clone()))
        .fallback_service(axum::routing::any(proxy::forward).with_state(state));
    match cors {
        Some(cors) => router.layer(cors),
        None => router,
    }
}

/// The role's API document (`/openapi.json`), built without a state: the gateway's own
/// endpoints (the data routes are the upstreams').
pub fn openapi() -> utoipa::openapi::OpenApi {
    admin::api().into_openapi()
}

fn cors(origins: &[String]) -> tower_http::cors::CorsLayer {
    use tower_http::cors::{AllowOrigin, CorsLayer};
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| http::HeaderValue::from_str(o).ok()))
    };
    CorsLayer::new()
        .allow_origin(allow)
        .allow_methods(tower_http::cors::Any)
        .allow_headers([
            http::header::AUTHORIZATION,
            http::header::CONTENT_TYPE,
            http::HeaderName::from_static("x-api-key"),
            http::HeaderName::from_static("x-request-id"),
        ])
        .expose_headers([
            http::HeaderName::from_static("x-request-id"),
            http::HeaderName::from_static("x-cache"),
            proxy::X_ENTITLEMENTS_VERSION.clone(),
            http::header::RETRY_AFTER,
        ])
        .max_age(Duration::from_secs(600))
}

/// What `common::run` serves: the routes, reloaded on SIGHUP until shutdown.
pub fn service(state: State, ctx: &Context) -> Service {
    spawn_reload_on_sighup(state.clone(), ctx.shutdown.clone());
    // The data routes are the router's fallback, so the shared 404 must not replace it.
    Service { own_fallback: true, ..Service::new(router(state)) }
}

fn spawn_reload_on_sighup(state: State, shutdown: Shutdown) {
    #[cfg(unix)]
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            tracing::error!(
                role = "gateway",
                "cannot listen for SIGHUP; routes reload only on restart"
            );
            return;
        };
        loop {
            tokio::select! {
                _ = hup.recv() => match state.reload() {
                    Ok(n) => tracing::info!(role = "gateway", routes = n, "routes reloaded"),
                    Err(e) => tracing::error!(role = "gateway", error = %e, "routes not reloaded; keeping the current table"),
                },
                _ = shutdown.stopping() => return,
            }
        }
    });
}
