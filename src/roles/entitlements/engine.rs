//! The engine behind the API: the current snapshot, the decision cache, and rule changes.
//!
//! Checks read an immutable [`Snapshot`] (swapped whole on reload), so they never wait for the
//! store and keep answering while PostgreSQL is down. A change is written to the store, then this
//! replica reloads before answering, and every other replica reloads on the announcement; the
//! decision cache is keyed by rules version, so no decision from an older version is served.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use chrono::Utc;
use fred::prelude::PubsubInterface;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::store::{RuleStore, StoreError};
use crate::backends::breaker::CallError;
use crate::backends::redis::JsonError;
use crate::cache::Bounded;
use crate::policy::eval::{CheckRequest, Reason, Snapshot};
use crate::server::Shutdown;

/// Metric names.
pub mod names {
    /// Checks by outcome and cache use.
    pub const CHECKS: &str = "access_entitlements_checks_total";
    /// The rules version served.
    pub const RULES_VERSION: &str = "access_entitlements_rules_version";
    /// Unix time of the last successful snapshot load.
    pub const SNAPSHOT_LOADED: &str = "access_entitlements_snapshot_loaded_timestamp_seconds";
    /// Rules in the snapshot.
    pub const RULES: &str = "access_entitlements_rules";
    /// Decision-cache operations that failed (Redis down): the check was computed instead.
    pub const CACHE_ERRORS: &str = "access_entitlements_cache_errors_total";

    /// Registers the descriptions.
    pub fn describe() {
        metrics::describe_counter!(
            CHECKS,
            "Entitlement checks, by outcome (allowed, denied) and cache (hit, miss)"
        );
        metrics::describe_gauge!(RULES_VERSION, "The rules version this replica serves");
        metrics::describe_gauge!(
            SNAPSHOT_LOADED,
            metrics::Unit::Seconds,
            "Unix time the rules snapshot was last loaded"
        );
        metrics::describe_gauge!(RULES, "Rules in the snapshot");
        metrics::describe_counter!(
            CACHE_ERRORS,
            "Decision-cache operations that failed; the check was computed instead"
        );
    }
}

/// A decision, as answered.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Decision {
    /// Whether the action is allowed.
    pub allowed: bool,
    /// Why: `allowed_by_rule`, `denied_by_rule` or `default_deny`.
    pub reason: Reason,
    /// The deciding rule.
    pub rule_id: Option<Uuid>,
    /// Identifies this decision (for audit and support).
    pub decision_id: Uuid,
    /// The rules version it was computed against.
    pub rules_version: i64,
    /// How long a caller may cache it, seconds.
    pub ttl_seconds: u64,
    /// Whether it came from the decision cache.
    #[serde(default)]
    pub cached: bool,
}

/// Why the decision cache could not answer or store (Redis failing; the in-memory cache never
/// fails). Never answered to a caller: the check is computed instead, and counted.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The Redis call did not succeed (breaker open, failed, unanswered).
    #[error(transparent)]
    Unavailable(#[from] CallError),
    /// The decision does not encode as JSON.
    #[error("cannot encode the decision: {0}")]
    Encode(#[source] serde_json::Error),
}

impl From<JsonError> for CacheError {
    fn from(e: JsonError) -> Self {
        match e {
            JsonError::Call(e) => CacheError::Unavailable(e),
            JsonError::Encode(e) => CacheError::Encode(e),
        }
    }
}

/// Where decisions are cached: Redis (shared) or memory (one process).
pub trait DecisionCache: Send + Sync {
    /// A cached decision.
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Decision>, CacheError>>;
    /// Caches a decision for `ttl`.
    fn put<'a>(
        &'a self,
        key: &'a str,
        decision: &'a Decision,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), CacheError>>;
}

/// In-process decision cache: at most about `capacity` decisions (the least used evicted first),
/// each until its TTL ([`crate::cache::Bounded`]). Keys carry the rules version, so a decision
/// of an older version is never looked up again and ages out.
pub struct MemoryCache {
    entries: Bounded<String, Decision>,
}

impl MemoryCache {
    /// A cache of at most about `capacity` decisions.
    pub fn new(capacity: usize) -> Self {
        MemoryCache { entries: Bounded::new(capacity) }
    }
}

impl DecisionCache for MemoryCache {
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Decision>, CacheError>> {
        let hit = self.entries.get(key);
        Box::pin(async move { Ok(hit) })
    }

    fn put<'a>(
        &'a self,
        key: &'a str,
        decision: &'a Decision,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), CacheError>> {
        self.entries.insert(key.to_string(), *decision, ttl);
        Box::pin(async { Ok(()) })
    }
}

/// The decision cache in Redis: `<prefix>ent:<rules version>:<sha256 of request>`, with this
/// process's own copies in front of it. Calls go through the connection's breaker: while Redis
/// is failing the cache is skipped at once and decisions are computed (a check never waits for
/// the Redis timeout twice).
///
/// The copies in memory ([`MemoryCache`], `entitlements.cache_capacity`) spare a warm check its
/// Redis round trip. Each is kept no longer than its Redis entry: a decision this replica
/// computed for its TTL, one read from Redis for what Redis says is left of it (`PTTL`, read in
/// the same round trip as the value), so a decision still never outlives the rule expiry that
/// capped its TTL. Keys carry the rules version, so a rule change is never answered from either.
pub struct RedisCache {
    redis: crate::backends::redis::Guarded,
    prefix: String,
    local: MemoryCache,
}

impl RedisCache {
    /// A cache under `prefix` (`access:<env>:`), with at most about `local_capacity` decisions
    /// kept in memory.
    pub fn new(
        redis: crate::backends::redis::Guarded,
        prefix: String,
        local_capacity: usize,
    ) -> Self {
        RedisCache { redis, prefix, local: MemoryCache::new(local_capacity) }
    }
}

impl DecisionCache for RedisCache {
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Decision>, CacheError>> {
        if let Some(hit) = self.local.entries.get(key) {
            return Box::pin(async move { Ok(Some(hit)) });
        }
        let full = format!("{}{key}", self.prefix);
        Box::pin(async move {
            use fred::prelude::KeysInterface;
            let (value, pttl): (Option<String>, i64) = self
                .redis
                .call(|c| async move {
                    let pipeline = c.pipeline();
                    let () = pipeline.get(&full).await?;
                    let () = pipeline.pttl(&full).await?;
                    pipeline.all().await
                })
                .await?;
            let Some(decision) = value.and_then(|v| serde_json::from_str::<Decision>(&v).ok())
            else {
                return Ok(None);
            };
            // -1 (no expiry) never happens to an entry written here; -2 (gone meanwhile) and
            // anything under a millisecond are not kept.
            if pttl >= 1 {
                let left = Duration::from_millis(pttl as u64);
                self.local.entries.insert(key.to_string(), decision, left);
            }
            Ok(Some(decision))
        })
    }

    fn put<'a>(
        &'a self,
        key: &'a str,
        decision: &'a Decision,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), CacheError>> {
        self.local.entries.insert(key.to_string(), *decision, ttl);
        let key = format!("{}{key}", self.prefix);
        Box::pin(async move { Ok(self.redis.set_json(&key, decision, ttl).await?) })
    }
}

/// Counters for `/entitlements/stats`.
#[derive(Default)]
pub struct Stats {
    /// Checks answered.
    pub checks: AtomicU64,
    /// Of which allowed.
    pub allowed: AtomicU64,
    /// Served from the cache.
    pub cache_hits: AtomicU64,
    /// Cache failures (computed instead).
    pub cache_errors: AtomicU64,
    /// Snapshot reloads that failed.
    pub reload_errors: AtomicU64,
}

/// The engine.
pub struct Engine {
    store: Arc<dyn RuleStore>,
    /// Swapped whole on reload; readers clone the `Arc` under a short read lock.
    snapshot: RwLock<Arc<Snapshot>>,
    /// Serialises reloads so an older load never replaces a newer one.
    reloading: tokio::sync::Mutex<()>,
    cache: Arc<dyn DecisionCache>,
    publisher: Option<(crate::backends::redis::Guarded, String)>,
    ttl: Duration,
    /// The version of the snapshot served, for followers in this process (the in-process rules
    /// bus, the change feed); only moves forward.
    versions: tokio::sync::watch::Sender<i64>,
    /// Counters.
    pub stats: Stats,
    /// The checks counter's four series, registered once: [allowed][hit].
    checks: [[metrics::Counter; 2]; 2],
    cache_errors: metrics::Counter,
}

impl Engine {
    /// Loads the first snapshot from `store`.
    pub async fn start(
        store: Arc<dyn RuleStore>,
        cache: Arc<dyn DecisionCache>,
        publisher: Option<(crate::backends::redis::Guarded, String)>,
        ttl: Duration,
    ) -> Result<Arc<Self>, StoreError> {
        let loaded = store.load().await?;
        let version = loaded.version;
        let engine = Arc::new(Engine {
            store,
            snapshot: RwLock::new(Arc::new(Snapshot::new(loaded.rules, version))),
            reloading: tokio::sync::Mutex::new(()),
            cache,
            publisher,
            ttl,
            versions: tokio::sync::watch::channel(version).0,
            stats: Stats::default(),
            checks: [false, true].map(|allowed| {
                [false, true].map(|hit| {
                    metrics::counter!(names::CHECKS, "role" => "entitlements",
                        "outcome" => if allowed { "allowed" } else { "denied" },
                        "cache" => if hit { "hit" } else { "miss" })
                })
            }),
            cache_errors: metrics::counter!(names::CACHE_ERRORS, "role" => "entitlements"),
        });
        engine.record_snapshot();
        Ok(engine)
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn RuleStore> {
        &self.store
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Follows the version of the snapshot served (a new value after every reload that moved it).
    pub fn versions(&self) -> tokio::sync::watch::Receiver<i64> {
        self.versions.subscribe()
    }

    fn record_snapshot(&self) {
        let snap = self.snapshot();
        let version = snap.version();
        self.versions.send_if_modified(|v| {
            let newer = version > *v;
            if newer {
                *v = version;
            }
            newer
        });
        metrics::gauge!(names::RULES_VERSION, "role" => "entitlements").set(snap.version() as f64);
        metrics::gauge!(names::RULES, "role" => "entitlements").set(snap.rules().len() as f64);
        metrics::gauge!(names::SNAPSHOT_LOADED, "role" => "entitlements")
            .set(snap.loaded_at().timestamp() as f64);
    }

    /// Reloads the snapshot from the store; keeps the current one when the store fails.
    pub async fn reload(&self) -> Result<(), StoreError> {
        let _one_at_a_time = self.reloading.lock().await;
        match self.store.load().await {
            Ok(loaded) => {
                if loaded.version >= self.snapshot().version() {
                    *self.snapshot.write().unwrap_or_else(|p| p.into_inner()) =
                        Arc::new(Snapshot::new(loaded.rules, loaded.version));
                    self.record_snapshot();
                }
                Ok(())
            }
            Err(e) => {
                self.stats.reload_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(role = "entitlements", error = %e, "cannot reload rules; serving the last snapshot");
                Err(e)
            }
        }
    }

    /// After a change this replica made: reload at once, and tell other roles' caches.
    pub async fn changed(&self, version: i64) {
        let _ = self.reload().await;
        if let Some((redis, channel)) = &self.publisher {
            // Under the connection's breaker: with Redis down the change is not held up (the
            // other replicas' periodic reload picks it up).
            let channel = channel.clone();
            let published = redis
                .call(|c| async move { c.publish::<i64, _, _>(channel, version.to_string()).await })
                .await;
            if let Err(e) = published {
                tracing::warn!(role = "entitlements", error = %e, "cannot announce the rules version");
            }
        }
    }

    /// Reloads on every announced change and every `interval` (in case an announcement was
    /// missed), until shutdown.
    pub fn spawn_refresh(self: &Arc<Self>, interval: Duration, shutdown: Shutdown) {
        let engine = self.clone();
        let mut changes = self.store.changes();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    change = changes.recv() => match change {
                        Ok(v) if v >= 0 && v <= engine.snapshot().version() => {}
                        Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => { let _ = engine.reload().await; }
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    },
                    _ = tokio::time::sleep(interval) => { let _ = engine.reload().await; }
                    _ = shutdown.stopping() => return,
                }
            }
        });
    }

    /// Answers one check.
    pub async fn check(&self, req: &CheckRequest) -> Decision {
        let mut tally = Tally::default();
        let decision = self.check_in(&self.snapshot(), req, &mut tally).await;
        self.record(&tally);
        decision
    }

    /// Answers one check against `snap`, counting it in `tally` (a batch decides all its checks
    /// against one snapshot, and adds them to the counters once: [`Engine::record`]).
    pub async fn check_in(
        &self,
        snap: &Snapshot,
        req: &CheckRequest,
        tally: &mut Tally,
    ) -> Decision {
        let key = cache_key(snap.version(), req);
        // A cache that failed the read is skipped for the write too: one failure per check at
        // most (and none while the Redis breaker is open).
        let cache_up = match self.cache.get(&key).await {
            Ok(Some(mut hit)) => {
                tally.count(hit.allowed, true);
                hit.cached = true;
                return hit;
            }
            Ok(None) => true,
            Err(e) => {
                tally.cache_error(&e);
                false
            }
        };
        let now = Utc::now();
        let outcome = snap.evaluate(req, now);
        // A decision holds until the next rule of this version expires (or starts to count as
        // expired), never past it: the cache must not answer with what an expired rule decided.
        let ttl = match snap.next_expiry(now) {
            Some(at) => self.ttl.min((at - now).to_std().unwrap_or_default()),
            None => self.ttl,
        };
        let decision = Decision {
            allowed: outcome.allowed,
            reason: outcome.reason,
            rule_id: outcome.rule_id,
            decision_id: Uuid::new_v4(),
            rules_version: snap.version(),
            ttl_seconds: ttl.as_secs(),
            cached: false,
        };
        tally.count(decision.allowed, false);
        if cache_up && ttl >= Duration::from_millis(1) {
            if let Err(e) = self.cache.put(&key, &decision, ttl).await {
                tally.cache_error(&e);
            }
        }
        decision
    }

    /// Adds a run of checks to the counters.
    pub fn record(&self, tally: &Tally) {
        let relaxed = Ordering::Relaxed;
        let [[denied_miss, denied_hit], [allowed_miss, allowed_hit]] = tally.checks;
        self.stats.checks.fetch_add(denied_miss + denied_hit + allowed_miss + allowed_hit, relaxed);
        self.stats.allowed.fetch_add(allowed_miss + allowed_hit, relaxed);
        self.stats.cache_hits.fetch_add(denied_hit + allowed_hit, relaxed);
        for (allowed, by_hit) in tally.checks.iter().enumerate() {
            for (hit, n) in by_hit.iter().enumerate() {
                if *n > 0 {
                    self.checks[allowed][hit].increment(*n);
                }
            }
        }
        if tally.cache_errors > 0 {
            self.stats.cache_errors.fetch_add(tally.cache_errors, relaxed);
            self.cache_errors.increment(tally.cache_errors);
        }
    }
}

/// Checks counted by outcome, added to the engine's counters at once ([`Engine::record`]).
#[derive(Default)]
pub struct Tally {
    /// [allowed][hit].
    checks: [[u64; 2]; 2],
    cache_errors: u64,
}

impl Tally {
    fn count(&mut self, allowed: bool, hit: bool) {
        self.checks[usize::from(allowed)][usize::from(hit)] += 1;
    }

    fn cache_error(&mut self, e: &CacheError) {
        self.cache_errors += 1;
        tracing::debug!(role = "entitlements", error = %e, "decision cache unavailable; computing");
    }
}

/// `ent:<rules version>:<sha256 of the request>`: the SHA-256 of the request's JSON, hashed as
/// it is written (no copy of the JSON is made).
pub fn cache_key(version: i64, req: &CheckRequest) -> String {
    use std::fmt::Write as _;
    let mut hasher = Sha256::new();
    // Writing into a hasher cannot fail, and a CheckRequest always serializes.
    let _ = serde_json::to_writer(&mut hasher, req);
    let mut key = String::with_capacity(4 + 20 + 1 + 64);
    let _ = write!(key, "ent:{version}:");
    let mut hex = [0u8; 64];
    if hex::encode_to_slice(hasher.finalize(), &mut hex).is_ok() {
        key.push_str(std::str::from_utf8(&hex).unwrap_or_default());
    }
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_key_is_the_sha256_of_the_requests_json_under_its_rules_version() {
        let req = CheckRequest {
            user_id: "u1".into(),
            tenant_id: "t1".into(),
            roles: vec!["trader".into()],
            resource: "instrument:NG-H27".into(),
            action: "read".into(),
            context: serde_json::json!({"size": 10}),
        };
        let body = serde_json::to_vec(&req).unwrap();
        let expected = format!("ent:42:{}", hex::encode(Sha256::digest(&body)));
        assert_eq!(cache_key(42, &req), expected);
        let other = CheckRequest { action: "write".into(), ..req };
        assert_ne!(cache_key(42, &other), expected);
        assert!(cache_key(-1, &other).starts_with("ent:-1:"));
    }

    fn decision(version: i64) -> Decision {
        Decision {
            allowed: true,
            reason: Reason::AllowedByRule,
            rule_id: None,
            decision_id: Uuid::new_v4(),
            rules_version: version,
            ttl_seconds: 60,
            cached: false,
        }
    }

    #[tokio::test]
    async fn a_full_memory_cache_keeps_the_decisions_in_use_and_never_empties_itself() {
        let cache = MemoryCache::new(64);
        for i in 0..300 {
            let key = format!("ent:1:{i}");
            cache.put(&key, &decision(i), Duration::from_secs(60)).await.unwrap();
            assert!(cache.get(&key).await.unwrap().is_some());
        }
        assert!((48..=80).contains(&cache.entries.len()), "{}", cache.entries.len());
        for i in 260..300 {
            let hit = cache.get(&format!("ent:1:{i}")).await.unwrap();
            assert_eq!(hit.map(|d| d.rules_version), Some(i), "the latest are kept");
        }
        for i in 0..64 {
            assert!(cache.get(&format!("ent:1:{i}")).await.unwrap().is_none(), "the oldest went");
        }
    }

    #[tokio::test]
    async fn a_cached_decision_expires_with_its_ttl() {
        let cache = MemoryCache::new(64);
        cache.put("short", &decision(1), Duration::from_millis(30)).await.unwrap();
        cache.put("long", &decision(1), Duration::from_secs(60)).await.unwrap();
        assert!(cache.get("short").await.unwrap().is_some());
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(cache.get("short").await.unwrap().is_none());
        assert!(cache.get("long").await.unwrap().is_some());
    }
}
