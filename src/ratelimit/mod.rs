//! Rate limits: GCRA (the generic cell rate algorithm) in Redis, exact across replicas.
//!
//! A policy is a rate per period with a burst: emission interval `T = period / rate`, tolerance
//! `tau = T * (burst - 1)`; a request at `now` is allowed when `max(tat, now) + T - tau - T <= now`,
//! and then stores `tat = max(tat, now) + T`. All policies of a request are checked in one Lua
//! script (loaded once, run by SHA) on Redis's clock, so replicas agree and a request limited by
//! one policy consumes none. The same script also reads the request's response-cache entry when
//! asked, so a cache hit costs one round trip, and concurrent requests share one script call
//! ([`redis`]; in a Redis Cluster, one call per hash slot, and a cache entry in another slot is
//! read with a GET sent alongside). The same algorithm runs in-process as the embedded
//! default and, by configuration, as the fallback when Redis fails (or the limiter fails open or
//! closed). [`lease`] is the approximate mode: replicas lease cells of each budget and decide
//! locally.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::backends::breaker::Breaker;
use crate::backends::redis::Guarded;
use crate::server::local::PerThread;

mod lease;
mod redis;

pub use lease::{Lease, Mode};

/// Metric names.
pub mod names {
    /// Decisions by policy and outcome (`allowed`, `limited`, `shadow_limited`, `store_error`).
    pub const DECISIONS: &str = "access_gateway_rate_limit_decisions_total";
    /// Requests decided per Redis script call (concurrent requests share one call).
    pub const BATCH_SIZE: &str = "access_gateway_rate_limit_batch_size";
}

/// A policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Requests per period.
    pub rate: u64,
    /// The period (`1m`, `1s`).
    #[serde(with = "humantime_serde")]
    #[schema(value_type = String, example = "1m")]
    pub period: Duration,
    /// Requests allowed at once.
    pub burst: u64,
}

impl Policy {
    fn interval_us(&self) -> u64 {
        (self.period.as_micros() as u64 / self.rate.max(1)).max(1)
    }

    fn tolerance_us(&self) -> u64 {
        self.interval_us() * self.burst.saturating_sub(1)
    }
}

/// The platform's tiers.
pub fn default_policies() -> BTreeMap<String, Policy> {
    let minute = Duration::from_secs(60);
    [
        ("public", 100, 20),
        ("authenticated", 1000, 100),
        ("heavy", 10, 2),
        ("admin", 5, 5),
        ("market_data", 600, 60),
    ]
    .into_iter()
    .map(|(name, rate, burst)| (name.to_string(), Policy { rate, period: minute, burst }))
    .collect()
}

/// What the limiter does when Redis cannot answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum OnStoreError {
    /// Use the in-process limiter (per replica).
    #[default]
    Local,
    /// Allow.
    Open,
    /// Refuse with 503.
    Closed,
}

/// One policy's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// Allowed by this policy.
    pub allowed: bool,
    /// Requests left right now.
    pub remaining: u64,
    /// Cells taken: 1 or 0, or, for a lease ([`Mode::Leased`]), as many as were granted.
    pub granted: u64,
    /// Microseconds until the bucket is full again.
    pub reset_us: u64,
    /// Microseconds until a request would be allowed (0 when allowed).
    pub retry_us: u64,
}

impl Verdict {
    /// A policy that does not decide a refusal made by another (nothing of it is taken).
    const NOT_DECIDING: Verdict =
        Verdict { allowed: true, granted: 0, remaining: 0, reset_us: 0, retry_us: 0 };
}

/// The outcome for a request over all its policies.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Whether it may proceed (shadow mode always says yes).
    pub allowed: bool,
    /// The most restrictive policy's name and verdict (for the RateLimit-* headers).
    pub tightest: Option<(String, Policy, Verdict)>,
    /// The store failed and `on_store_error` is `closed`.
    pub store_unavailable: bool,
}

impl Outcome {
    /// Allowed without a verdict: no policy applies, or the store failed and the limiter fails
    /// open.
    fn open() -> Self {
        Outcome { allowed: true, tightest: None, store_unavailable: false }
    }
}

/// What the limiter's script read, in the same round trip, for the key [`Limiter::check`] was
/// asked to read (the request's response-cache entry).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheRead {
    /// Nothing was read: none asked, no Redis, or Redis failed (the caller reads it itself).
    NotAsked,
    /// The script looked and the key does not exist.
    Miss,
    /// The key's value.
    Hit(Bytes),
}

/// The answer of one [`Limiter::check`]: the rate-limit outcome and, from the same Redis round
/// trip, the cache read it was asked for. A limited request still gets its read (it is not used).
#[derive(Debug, Clone)]
pub struct LimitAndLookup {
    /// Whether the request may proceed, and the tightest policy.
    pub outcome: Outcome,
    /// The cache read.
    pub cached: CacheRead,
}

impl From<Outcome> for LimitAndLookup {
    fn from(outcome: Outcome) -> Self {
        LimitAndLookup { outcome, cached: CacheRead::NotAsked }
    }
}

/// The in-process GCRA: theoretical arrival times by key (a string, or a client address for the
/// per-address limit), in µs since `epoch`.
pub struct LocalGcra<K = String> {
    epoch: Instant,
    /// TATs; a std mutex held for one lookup and update.
    tats: Mutex<HashMap<K, u64>>,
}

impl<K: std::hash::Hash + Eq + Clone> LocalGcra<K> {
    /// Empty.
    pub fn new() -> Self {
        LocalGcra { epoch: Instant::now(), tats: Mutex::default() }
    }

    /// Checks `(key, policy)` pairs atomically, as the script does.
    pub fn check(&self, items: &[(K, &Policy)]) -> Vec<Verdict> {
        // Offset so that `tat - tau - T` never goes below zero.
        let now = self.epoch.elapsed().as_micros() as u64 + (1 << 50);
        let mut tats = self.tats.lock().unwrap_or_else(|p| p.into_inner());
        if tats.len() > 200_000 {
            tats.retain(|_, tat| *tat > now);
        }
        let mut verdicts = Vec::with_capacity(items.len());
        let mut new_tats = Vec::with_capacity(items.len());
        for (key, policy) in items {
            let (t, tau) = (policy.interval_us(), policy.tolerance_us());
            let tat = tats.get(key).copied().unwrap_or(now).max(now);
            let new_tat = tat + t;
            let allow_at = new_tat - (tau + t);
            if now < allow_at {
                verdicts.push(Verdict {
                    allowed: false,
                    granted: 0,
                    remaining: 0,
                    reset_us: tat - now,
                    retry_us: allow_at - now,
                });
            } else {
                verdicts.push(Verdict {
                    allowed: true,
                    granted: 1,
                    remaining: (now - allow_at) / t,
                    reset_us: new_tat - now,
                    retry_us: 0,
                });
                new_tats.push((key.clone(), new_tat));
            }
        }
        if verdicts.iter().all(|v| v.allowed) {
            tats.extend(new_tats);
        }
        verdicts
    }
}

impl<K: std::hash::Hash + Eq + Clone> Default for LocalGcra<K> {
    fn default() -> Self {
        Self::new()
    }
}

/// Counters per policy for `GET /api/v1/rate-limits`, and the policy's decision metrics.
#[derive(Debug)]
pub struct Counts {
    /// Allowed.
    pub allowed: AtomicU64,
    /// Refused.
    pub limited: AtomicU64,
    /// Would have been refused (shadow mode).
    pub shadow_limited: AtomicU64,
    /// The store failed.
    pub store_errors: AtomicU64,
    /// `access_gateway_rate_limit_decisions_total` by [`Decision`], registered once per policy.
    decisions: [metrics::Counter; 4],
}

impl Counts {
    fn new(policy: &str) -> Self {
        Counts {
            allowed: AtomicU64::new(0),
            limited: AtomicU64::new(0),
            shadow_limited: AtomicU64::new(0),
            store_errors: AtomicU64::new(0),
            decisions: Decision::ALL.map(|outcome| {
                metrics::counter!(names::DECISIONS, "role" => "gateway", "policy" => policy.to_string(), "outcome" => outcome.label())
            }),
        }
    }

    fn add(&self, decision: Decision) {
        let field = match decision {
            Decision::Allowed => &self.allowed,
            Decision::Limited => &self.limited,
            Decision::ShadowLimited => &self.shadow_limited,
            Decision::StoreError => &self.store_errors,
        };
        field.fetch_add(1, Ordering::Relaxed);
        self.decisions[decision as usize].increment(1);
    }
}

/// A policy's decision for one request (the `outcome` label).
#[derive(Debug, Clone, Copy)]
enum Decision {
    Allowed = 0,
    Limited = 1,
    ShadowLimited = 2,
    StoreError = 3,
}

impl Decision {
    /// Every decision, in discriminant order.
    const ALL: [Decision; 4] =
        [Decision::Allowed, Decision::Limited, Decision::ShadowLimited, Decision::StoreError];

    fn label(self) -> &'static str {
        match self {
            Decision::Allowed => "allowed",
            Decision::Limited => "limited",
            Decision::ShadowLimited => "shadow_limited",
            Decision::StoreError => "store_error",
        }
    }
}

/// The limiter.
pub struct Limiter {
    /// Swapped whole when the routes are reloaded.
    policies: std::sync::RwLock<Arc<BTreeMap<String, Policy>>>,
    /// The batching task's handle (one per I/O thread, each with its own connection) and the key
    /// prefix.
    redis: Option<(PerThread<redis::Batcher>, String)>,
    /// Redis's breaker: while it is open, checks are decided by `on_error` at once, never after
    /// the Redis timeout.
    breaker: Option<Arc<Breaker>>,
    local: LocalGcra,
    on_error: OnStoreError,
    shadow: bool,
    /// Leased mode's lease and the cells held ([`lease::Leases`]).
    leases: Option<lease::Leases>,
    /// Counters by policy name; a std lock held to find or add one.
    counts: std::sync::RwLock<HashMap<String, Arc<Counts>>>,
}

impl Limiter {
    /// A limiter over `policies`; Redis (with the key prefix) when given, which starts the task
    /// that batches script calls, so it must be called inside a Tokio runtime.
    pub fn new(
        policies: BTreeMap<String, Policy>,
        redis: Option<(Guarded, String)>,
        on_error: OnStoreError,
        shadow: bool,
    ) -> Self {
        let counts = policies.keys().map(|k| (k.clone(), Arc::new(Counts::new(k)))).collect();
        let breaker = redis.as_ref().map(|(guarded, _)| guarded.breaker.clone());
        Limiter {
            policies: std::sync::RwLock::new(Arc::new(policies)),
            redis: redis.map(|(guarded, prefix)| {
                let (client, breaker) = (guarded.client, guarded.breaker);
                let own = (client.clone(), breaker.clone());
                let per_thread =
                    PerThread::new(redis::Batcher::spawn(client, false, breaker), move || {
                        redis::Batcher::spawn(own.0.clone_new(), true, own.1.clone())
                    });
                (per_thread, prefix)
            }),
            breaker,
            local: LocalGcra::new(),
            on_error,
            shadow,
            leases: None,
            counts: std::sync::RwLock::new(counts),
        }
    }

    /// Leased mode ([`lease`]): with Redis, requests spend cells this replica leased from the
    /// shared budget (a lease doubles while its cells are all spent within `max_age`, halves when
    /// some expire unspent, between 1 and `lease.cells(policy)`), and only a request that finds
    /// none held asks Redis, for a new lease. Approximate: over any window `W`, a subject is
    /// admitted at most what the exact limiter admits over `W + lease.max_age`, in all at most
    /// `burst + rate * (W + max_age) / period` across every replica. A cell leased and dropped
    /// is lost (fewer admitted, never more). Without Redis it changes nothing.
    pub fn leased(mut self, lease: Lease) -> Self {
        self.leases = Some(lease::Leases::new(lease));
        self
    }

    /// The policies.
    pub fn policies(&self) -> Arc<BTreeMap<String, Policy>> {
        self.policies.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replaces the policies (routes reloaded); counters of kept names carry on.
    pub fn set_policies(&self, policies: BTreeMap<String, Policy>) {
        *self.policies.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(policies);
    }

    /// The counters.
    pub fn counts(&self) -> HashMap<String, Arc<Counts>> {
        self.counts.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Redis script calls made so far (`None` without Redis); each decides a batch of requests.
    pub fn script_calls(&self) -> Option<u64> {
        self.redis.as_ref().map(|(batchers, _)| batchers.all().map(|b| b.calls()).sum())
    }

    /// Whether shadow mode is on.
    pub fn shadow(&self) -> bool {
        self.shadow
    }

    /// Checks the named policies for `subject` (a user, `apikey:<id>` or `ip:<addr>`). With Redis,
    /// `also_get` (a full key) is read in the same script: see [`LimitAndLookup::cached`].
    pub async fn check(
        &self,
        policy_names: &[String],
        subject: &str,
        also_get: Option<String>,
    ) -> LimitAndLookup {
        let policies = self.policies();
        // Full keys (with the Redis prefix); the in-process GCRA uses the same ones.
        let prefix = self.redis.as_ref().map_or("", |(_, prefix)| prefix.as_str());
        let items: Vec<(String, &Policy, &str)> = policy_names
            .iter()
            .filter_map(|name| policies.get_key_value(name))
            .map(|(name, p)| (rate_key(prefix, subject, name), p, name.as_str()))
            .collect();
        if items.is_empty() {
            return Outcome::open().into();
        }
        let local = |items: &[(String, &Policy, &str)]| {
            let pairs: Vec<(String, &Policy)> =
                items.iter().map(|(k, p, _)| (k.clone(), *p)).collect();
            self.local.check(&pairs)
        };
        let mut cached = CacheRead::NotAsked;
        let verdicts = match &self.redis {
            None => local(&items),
            Some((batcher, _)) => {
                // While Redis's breaker is open, the check is not even queued.
                let answer = match (self.breaker.as_deref().filter(|b| b.is_open()), &self.leases) {
                    (Some(open), _) => Err(format!("{}: breaker open", open.backend())),
                    (None, Some(leases)) => leases.check(batcher.get(), &items, also_get).await,
                    (None, None) => {
                        let keyed = items.iter().map(|(k, p, _)| (k.clone(), *p, 1)).collect();
                        batcher.get().check(keyed, false, also_get).await
                    }
                };
                match answer {
                    Ok((verdicts, read)) => {
                        cached = read;
                        verdicts
                    }
                    Err(error) => {
                        for (_, _, name) in &items {
                            self.count(name, Decision::StoreError);
                        }
                        // Debug, not warn: with the breaker open this is every request.
                        tracing::debug!(role = "gateway", error = %error, mode = ?self.on_error, "rate-limit store unavailable");
                        match self.on_error {
                            OnStoreError::Local => local(&items),
                            OnStoreError::Open => return Outcome::open().into(),
                            OnStoreError::Closed => {
                                return Outcome {
                                    allowed: false,
                                    tightest: None,
                                    store_unavailable: true,
                                }
                                .into()
                            }
                        }
                    }
                }
            }
        };
        let allowed = verdicts.iter().all(|v| v.allowed);
        for ((_, _, name), v) in items.iter().zip(&verdicts) {
            match (v.allowed, allowed, self.shadow) {
                (false, _, true) => self.count(name, Decision::ShadowLimited),
                (false, _, false) => self.count(name, Decision::Limited),
                (true, true, _) => self.count(name, Decision::Allowed),
                (true, false, _) => {}
            }
        }
        let tightest = items
            .iter()
            .zip(&verdicts)
            .min_by_key(|(_, v)| (v.allowed, v.remaining))
            .map(|((_, p, name), v)| (name.to_string(), (*p).clone(), *v));
        let outcome =
            Outcome { allowed: allowed || self.shadow, tightest, store_unavailable: false };
        LimitAndLookup { outcome, cached }
    }

    fn count(&self, policy: &str, decision: Decision) {
        let existing = self.counts.read().unwrap_or_else(|p| p.into_inner()).get(policy).cloned();
        let counts = existing.unwrap_or_else(|| {
            let mut all = self.counts.write().unwrap_or_else(|p| p.into_inner());
            all.entry(policy.to_string()).or_insert_with(|| Arc::new(Counts::new(policy))).clone()
        });
        counts.add(decision);
    }
}

/// The Redis key of `subject`'s state under `policy`: `<prefix>rl:{<subject>}:<policy>`. The
/// subject is the hash tag, so in a Redis Cluster all the policies of one request's subject live
/// in one slot and one script call checks them together (`docs/contracts.md`).
fn rate_key(prefix: &str, subject: &str, policy: &str) -> String {
    format!("{prefix}rl:{{{subject}}}:{policy}")
}

/// A cheap in-process limit per client address, checked before any signature: floods of bad
/// tokens are stopped before they cost a verification.
pub struct IpLimit {
    policy: Policy,
    gcra: LocalGcra<std::net::IpAddr>,
}

impl IpLimit {
    /// A limit of `policy` per address.
    pub fn new(policy: Policy) -> Arc<Self> {
        Arc::new(IpLimit { policy, gcra: LocalGcra::new() })
    }

    /// Whether `ip` may go on; `Err(retry after seconds)` when not.
    pub fn check(&self, ip: std::net::IpAddr) -> Result<(), u64> {
        let v = self.gcra.check(&[(ip, &self.policy)]);
        match v.first() {
            Some(v) if !v.allowed => Err(v.retry_us.div_ceil(1_000_000).max(1)),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions_index_their_counters() {
        for (i, decision) in Decision::ALL.into_iter().enumerate() {
            assert_eq!(decision as usize, i, "ALL is in discriminant order");
        }
    }

    #[test]
    fn a_subjects_policies_share_one_cluster_slot() {
        use fred::util::redis_keyslot;
        for subject in ["alice", "apikey:k1", "ip:10.0.0.1", "odd{sub}ject", "x}y", "{}"] {
            let slots: Vec<u16> = ["public", "heavy", "market_data"]
                .iter()
                .map(|p| redis_keyslot(rate_key("access:prod:", subject, p).as_bytes()))
                .collect();
            assert!(slots.iter().all(|s| *s == slots[0]), "{subject}: {slots:?}");
        }
        assert_eq!(rate_key("access:prod:", "alice", "heavy"), "access:prod:rl:{alice}:heavy");
        let (a, b) = (rate_key("p:", "alice", "heavy"), rate_key("p:", "bob", "heavy"));
        assert_ne!(redis_keyslot(a.as_bytes()), redis_keyslot(b.as_bytes()), "subjects spread");
    }

    #[test]
    fn gcra_allows_the_burst_then_one_per_interval() {
        let gcra = LocalGcra::new();
        let p = Policy { rate: 10, period: Duration::from_secs(1), burst: 3 };
        let key = || vec![("k".to_string(), &p)];
        let first: Vec<bool> = (0..4).map(|_| gcra.check(&key())[0].allowed).collect();
        assert_eq!(first, vec![true, true, true, false], "the request after the burst is limited");
        let limited = gcra.check(&key())[0];
        assert!(limited.retry_us > 0 && limited.retry_us <= 100_000, "{limited:?}");
        std::thread::sleep(Duration::from_micros(limited.retry_us + 2_000));
        assert!(gcra.check(&key())[0].allowed, "allowed again after the emission interval");
        assert!(!gcra.check(&key())[0].allowed);
    }

    #[test]
    fn a_request_limited_by_one_policy_consumes_none() {
        let gcra = LocalGcra::new();
        let tight = Policy { rate: 1, period: Duration::from_secs(60), burst: 1 };
        let loose = Policy { rate: 100, period: Duration::from_secs(1), burst: 100 };
        let items = || vec![("a".to_string(), &tight), ("b".to_string(), &loose)];
        assert!(gcra.check(&items()).iter().all(|v| v.allowed));
        let second = gcra.check(&items());
        assert!(!second[0].allowed && second[1].allowed);
        let loose_only = gcra.check(&[("b".to_string(), &loose)]);
        assert_eq!(
            loose_only[0].remaining, 98,
            "the refused request did not consume the loose policy"
        );
    }
}
