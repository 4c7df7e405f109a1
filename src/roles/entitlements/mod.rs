//! The entitlements role (port 8011): access rules in PostgreSQL (or memory), decisions from an
//! in-memory snapshot, cached in Redis (or memory) by rules version.
//!
//! - [`rules`]: the rule model, validation and globs.
//! - [`eval`]: deterministic evaluation over a snapshot.
//! - [`store`]: PostgreSQL and in-memory rule stores (audit, version, announcements).
//! - [`engine`]: snapshot swapping, the decision cache, change handling.
//! - `api`: the HTTP handlers (checks, `explain`, rules CRUD with history).
//! - `feed`: the snapshot, version and change-feed endpoints other roles and services follow.
//! - [`mirror`]: the gateway's and the stream's local copy of the rules, decided in-process.
//! - [`board`]: where each replica stands (the rules version it decides at).
//! - [`client`]: the HTTP client of `/entitlements/check`.

mod api;
pub mod engine;
pub use engine::names;
mod feed;
pub mod store;

use crate::server::openapi;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::role::Role;
use axum::extract::FromRef;
use axum::Router;
use serde::{Deserialize, Serialize};

use super::common::{Deps, RunError, Service};
use crate::auth::Verifier;
use crate::config::Problem;
use crate::policy::board;
use crate::policy::rules::RuleInput;
use crate::server::Context;
use engine::{DecisionCache, Engine};
use store::RuleStore;

/// The built-in seed rules (`config/seed-rules.yaml`).
pub const DEFAULT_SEED: &str = include_str!("../../../config/seed-rules.yaml");

/// The `entitlements` config section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The role's port.
    pub port: u16,
    /// YAML seed rules for the in-memory store; unset uses the built-in seed.
    pub seed_file: Option<PathBuf>,
    /// How long a decision may be cached (here and by callers).
    #[serde(with = "humantime_serde")]
    pub decision_ttl: Duration,
    /// Decisions cached in this process's memory: the whole cache without Redis, the copies in
    /// front of it with Redis (each kept no longer than its Redis entry).
    pub cache_capacity: usize,
    /// Most checks in one batch (and resources in one resources call).
    pub max_batch: usize,
    /// Reload the snapshot this often even without an announcement.
    #[serde(with = "humantime_serde")]
    pub reload_interval: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            port: crate::role::Role::Entitlements.default_port(),
            seed_file: None,
            decision_ttl: Duration::from_secs(30),
            cache_capacity: 100_000,
            max_batch: 1000,
            reload_interval: Duration::from_secs(30),
        }
    }
}

impl Config {
    /// Checks the section, including that the seed file parses.
    pub fn validate(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        if let Some(path) = &self.seed_file {
            if let Err(e) = load_seed(Some(path)) {
                problems.push(Problem::new("entitlements.seed_file", e));
            }
        }
        if self.max_batch == 0 {
            problems.push(Problem::new("entitlements.max_batch", "must be greater than 0"));
        }
        if self.reload_interval.is_zero() {
            problems.push(Problem::new("entitlements.reload_interval", "must be greater than 0"));
        }
        problems
    }
}

/// Reads and validates seed rules (the built-in ones when `path` is `None`).
pub fn load_seed(path: Option<&PathBuf>) -> Result<Vec<RuleInput>, String> {
    let text = match path {
        Some(p) => std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?,
        None => DEFAULT_SEED.to_string(),
    };
    let rules: Vec<RuleInput> =
        serde_yaml::from_str(&text).map_err(|e| format!("seed rules: {e}"))?;
    for (i, rule) in rules.iter().enumerate() {
        rule.validate().map_err(|e| format!("seed rule {i} ({}): {}", rule.name, e))?;
    }
    Ok(rules)
}

/// The role's state.
#[derive(Clone)]
pub struct State {
    engine: Arc<Engine>,
    verifier: Arc<Verifier>,
    admin_role: Arc<str>,
    service_role: Arc<str>,
    max_batch: usize,
    store_kind: &'static str,
    feed: Arc<feed::Feed>,
    board: Arc<board::Board>,
    shutdown: crate::server::Shutdown,
}

impl FromRef<State> for Arc<Verifier> {
    fn from_ref(state: &State) -> Self {
        state.verifier.clone()
    }
}

impl State {
    /// The engine (for tests and benchmarks in this crate).
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }
}

/// Connects the store (migrating PostgreSQL under its advisory lock) and the cache, loads the
/// first snapshot, and starts the refresh task.
pub async fn build(section: &Config, deps: &Deps) -> Result<State, RunError> {
    let (ctx, auth) = (&deps.ctx, deps.auth.clone());
    let config = &ctx.config;
    // The process's PostgreSQL pool (`Auth::postgres`, made and migrated once per process; its
    // soft readiness check is the auth module's: reads keep working from the snapshot while
    // PostgreSQL is down).
    let (store, store_kind): (Arc<dyn RuleStore>, _) = match (&config.postgres_dsn, &auth.postgres)
    {
        (Some(dsn), Some(pool)) => {
            let settings = crate::backends::postgres::settings(dsn, &config.postgres)?;
            (
                store::PgStore::start(pool.clone(), settings, ctx.shutdown.clone())
                    as Arc<dyn RuleStore>,
                "postgres",
            )
        }
        (Some(_), None) => {
            return Err(anyhow::anyhow!("postgres_dsn is set but the process made no pool").into())
        }
        (None, _) => {
            let seed = load_seed(section.seed_file.as_ref()).map_err(|e| anyhow::anyhow!(e))?;
            (Arc::new(store::MemoryStore::new(seed)) as Arc<dyn RuleStore>, "memory")
        }
    };
    // The process's Redis connection and its breaker (`Auth::redis`).
    let (cache, publisher): (Arc<dyn DecisionCache>, _) = match auth.redis.clone() {
        Some(guarded) => {
            // Without Redis decisions are computed uncached: a soft check.
            ctx.readiness.add_soft_check("redis_decision_cache", guarded.ready_check());
            let prefix = config.redis_prefix();
            (
                Arc::new(engine::RedisCache::new(
                    guarded.clone(),
                    prefix.clone(),
                    section.cache_capacity,
                )) as Arc<dyn DecisionCache>,
                Some((guarded, format!("{prefix}rules"))),
            )
        }
        None => (
            Arc::new(engine::MemoryCache::new(section.cache_capacity)) as Arc<dyn DecisionCache>,
            None,
        ),
    };
    let engine = Engine::start(store, cache, publisher, section.decision_ttl)
        .await
        .map_err(|e| anyhow::anyhow!("loading rules: {e}"))?;
    engine.spawn_refresh(section.reload_interval, ctx.shutdown.clone());
    announce_in_process(&engine, ctx);
    let board = Arc::new(board::Board::for_context(ctx, auth.redis.as_ref()));
    let replica = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
    board.spawn_reporter("entitlements", replica, engine.versions(), ctx.shutdown.clone());
    let feed = feed::Feed::start(engine.clone(), ctx.shutdown.clone());
    Ok(State {
        engine,
        verifier: auth.verifier,
        admin_role: config.auth.admin_role.as_str().into(),
        service_role: config.auth.service_role.as_str().into(),
        max_batch: section.max_batch,
        store_kind,
        feed,
        board,
        shutdown: ctx.shutdown.clone(),
    })
}

/// Every version this replica's snapshot moves to is announced on the process's rules bus, so
/// the gateway and the stream of the same process (`access all`) follow it without Redis.
fn announce_in_process(engine: &Arc<Engine>, ctx: &Context) {
    let mut versions = engine.versions();
    let bus = ctx.rules_bus.clone();
    let shutdown = ctx.shutdown.clone();
    tokio::spawn(async move {
        loop {
            bus.announce(*versions.borrow_and_update());
            tokio::select! {
                changed = versions.changed() => if changed.is_err() { return },
                _ = shutdown.stopping() => return,
            }
        }
    });
}

/// The role's routes.
pub fn router(state: State) -> Router {
    openapi::finish(api().with_state(state))
}

/// The role's API document (`/openapi.json`), built without a state.
pub fn openapi() -> utoipa::openapi::OpenApi {
    api().into_openapi()
}

/// The role's documented routes.
fn api() -> OpenApiRouter<State> {
    OpenApiRouter::with_openapi(openapi::base(Role::Entitlements))
        .routes(routes!(api::check))
        .routes(routes!(api::check_batch))
        .routes(routes!(api::explain))
        .routes(routes!(api::resources))
        .routes(routes!(api::list, api::create))
        .routes(routes!(api::get_rule, api::update, api::delete))
        .routes(routes!(api::history))
        .routes(routes!(api::stats))
        .routes(routes!(feed::snapshot))
        .routes(routes!(feed::version))
        .route("/entitlements/watch", axum::routing::get(feed::watch))
}

/// What `common::run` serves.
pub fn service(state: State, _ctx: &Context) -> Service {
    Service::new(router(state))
}
