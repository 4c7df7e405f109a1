//! The response cache for GET and HEAD: Redis (shared) or in-process (the embedded default).
//!
//! Keys cover the method, the route, the path, the sorted query and the tenant (and the user when
//! the route says `vary_user`), so no tenant ever sees another's data:
//! `<prefix>cache:<route>:<sha256>`. Upstream `Cache-Control` decides: `no-store` and `private`
//! are never stored, `s-maxage` beats `max-age`, nothing without either is stored, and
//! `stale-while-revalidate` lets a stale entry be served while one revalidation (with
//! `If-None-Match`) goes upstream. Entries over the route's size cap are not stored.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use fred::prelude::KeysInterface;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::backends::breaker::CallError;
use crate::backends::redis::{Client as RedisClient, Guarded};

/// A route's cache policy (`cache:` in the route table).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CachePolicy {
    /// Key on the user as well as the tenant.
    #[serde(default)]
    pub vary_user: bool,
    /// Largest body stored, bytes.
    #[serde(default = "default_max_entry")]
    pub max_entry_bytes: usize,
}

fn default_max_entry() -> usize {
    1024 * 1024
}

/// A stored response.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// Status (only 200 is stored).
    pub status: u16,
    /// Headers worth replaying (content type, ETag, Cache-Control, Last-Modified).
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Bytes,
    /// Unix ms when stored (or last revalidated).
    pub stored_at: u64,
    /// Freshness, seconds.
    pub max_age: u64,
    /// Stale-while-revalidate, seconds.
    pub swr: u64,
}

/// The first bytes of a stored entry: the format and its version.
const ENTRY_MAGIC: &[u8; 4] = b"acE1";

impl Entry {
    /// The stored form: [`ENTRY_MAGIC`]; status (u16); stored_at, max_age, swr (u64); the header
    /// count (u16) and each name and value (u16 length, bytes); then the body, raw. Big-endian.
    /// Binary rather than JSON with a base64 body: a cache hit decodes it on the request path.
    pub fn encode(&self) -> Vec<u8> {
        let headers: usize = self.headers.iter().map(|(k, v)| 4 + k.len() + v.len()).sum();
        let mut out = Vec::with_capacity(32 + headers + self.body.len());
        out.extend_from_slice(ENTRY_MAGIC);
        out.extend_from_slice(&self.status.to_be_bytes());
        for n in [self.stored_at, self.max_age, self.swr] {
            out.extend_from_slice(&n.to_be_bytes());
        }
        // Only short headers are kept (the store side skips longer ones), so lengths fit a u16.
        let kept: Vec<_> = self
            .headers
            .iter()
            .filter(|(k, v)| k.len() <= usize::from(u16::MAX) && v.len() <= usize::from(u16::MAX))
            .collect();
        out.extend_from_slice(&(kept.len().min(usize::from(u16::MAX)) as u16).to_be_bytes());
        for (k, v) in kept.into_iter().take(usize::from(u16::MAX)) {
            for text in [k, v] {
                out.extend_from_slice(&(text.len() as u16).to_be_bytes());
                out.extend_from_slice(text.as_bytes());
            }
        }
        out.extend_from_slice(&self.body);
        out
    }

    /// Reads [`Entry::encode`]'s form; `None` for anything else (another version, a truncated
    /// value): the request then goes upstream and the entry is stored again.
    pub fn decode(raw: &Bytes) -> Option<Entry> {
        let mut at = 0usize;
        let mut take = |n: usize| {
            let part = raw.get(at..at.checked_add(n)?)?;
            at += n;
            Some(part)
        };
        if take(4)? != ENTRY_MAGIC {
            return None;
        }
        let status = u16::from_be_bytes(take(2)?.try_into().ok()?);
        let mut longs = [0u64; 3];
        for n in &mut longs {
            *n = u64::from_be_bytes(take(8)?.try_into().ok()?);
        }
        let count = u16::from_be_bytes(take(2)?.try_into().ok()?);
        let mut headers = Vec::with_capacity(usize::from(count));
        for _ in 0..count {
            let mut text = || {
                let len = u16::from_be_bytes(take(2)?.try_into().ok()?);
                String::from_utf8(take(usize::from(len))?.to_vec()).ok()
            };
            headers.push((text()?, text()?));
        }
        let [stored_at, max_age, swr] = longs;
        Some(Entry { status, headers, body: raw.slice(at..), stored_at, max_age, swr })
    }

    /// The entry's ETag.
    pub fn etag(&self) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == "etag").map(|(_, v)| v.as_str())
    }

    /// Age in seconds at unix ms `now`.
    pub fn age(&self, now: u64) -> u64 {
        now.saturating_sub(self.stored_at) / 1000
    }

    /// What the entry costs a [`MemoryStore`], bytes: its body and headers.
    fn weight(&self) -> usize {
        self.body.len() + self.headers.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()
    }
}

/// What `Cache-Control` allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Directives {
    /// `no-store` or `private`: never stored here.
    pub uncacheable: bool,
    /// `s-maxage`, else `max-age`.
    pub max_age: Option<u64>,
    /// `stale-while-revalidate`.
    pub swr: u64,
}

/// Parses a `Cache-Control` value.
pub fn directives(value: Option<&str>) -> Directives {
    let mut d = Directives::default();
    let (mut max_age, mut s_maxage) = (None, None);
    for part in value.unwrap_or_default().split(',') {
        let part = part.trim().to_ascii_lowercase();
        let (name, arg) = part
            .split_once('=')
            .map(|(n, a)| (n.trim().to_string(), Some(a.trim().trim_matches('"').to_string())))
            .unwrap_or((part.clone(), None));
        let secs = arg.as_deref().and_then(|a| a.parse::<u64>().ok());
        match name.as_str() {
            "no-store" | "private" | "no-cache" => d.uncacheable = true,
            "max-age" => max_age = secs,
            "s-maxage" => s_maxage = secs,
            "stale-while-revalidate" => d.swr = secs.unwrap_or(0),
            _ => {}
        }
    }
    d.max_age = s_maxage.or(max_age);
    d
}

/// The cache key of a request.
pub fn key(
    method: &str,
    route: &str,
    path: &str,
    query: Option<&str>,
    tenant: &str,
    user: Option<&str>,
) -> String {
    // The query as forwarded (canonical: `server::target`), its parameters ordered by name with
    // a stable sort: distinct names in any order share an entry, but repeated names keep their
    // order (`limit=2&limit=1` is not `limit=1&limit=2` to an upstream that takes the first)
    // and `a` stays distinct from `a=`.
    let query = match query.unwrap_or_default() {
        "" => String::new(),
        query => {
            let mut params: Vec<&str> = query.split('&').collect();
            params.sort_by_key(|p| p.split('=').next().unwrap_or_default());
            params.join("&")
        }
    };
    let material =
        format!("{method}\n{route}\n{path}\n{query}\n{tenant}\n{}", user.unwrap_or_default());
    format!("cache:{route}:{}", hex::encode(Sha256::digest(material.as_bytes())))
}

/// Unix ms now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Why a store could not answer. Callers on the request path count it and go on without the
/// cache (a read is a miss, a write is skipped); the purge endpoint answers 503.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A command through Redis's breaker failed: the breaker is open, Redis did not answer in
    /// time, or it answered with an error.
    #[error(transparent)]
    Redis(#[from] CallError),
    /// A purge's `SCAN` or `DEL` failed (an admin operation, not under the breaker).
    #[error("redis: {0}")]
    Purge(#[from] fred::error::Error),
}

/// Where entries live.
pub trait Store: Send + Sync {
    /// An entry.
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Entry>, StoreError>>;
    /// Stores an entry for `ttl`.
    fn put<'a>(
        &'a self,
        key: &'a str,
        entry: &'a Entry,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), StoreError>>;
    /// Deletes every entry whose route name starts with `route_prefix`; returns how many.
    fn purge<'a>(&'a self, route_prefix: &'a str) -> BoxFuture<'a, Result<u64, StoreError>>;
    /// The Redis key of `key`, when entries live in the same Redis as the rate limits: the
    /// limiter's script then reads the entry in the same round trip.
    fn shared_key(&self, _key: &str) -> Option<String> {
        None
    }
}

/// An entry in a [`MemoryStore`] with its time to live (the entry is shared, not copied, by the
/// cache's internal bookkeeping).
#[derive(Clone)]
struct Kept {
    entry: Arc<Entry>,
    ttl: Duration,
}

/// Each entry expires after its own time to live (from `Cache-Control`), counted from its last
/// write; reads do not extend it.
struct PerEntryTtl;

impl moka::Expiry<String, Kept> for PerEntryTtl {
    fn expire_after_create(&self, _: &String, kept: &Kept, _: Instant) -> Option<Duration> {
        Some(kept.ttl)
    }

    fn expire_after_update(
        &self,
        _: &String,
        kept: &Kept,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(kept.ttl)
    }
}

/// In-process entries, bounded by their bytes (keys, bodies, headers: `gateway.cache_max_bytes`):
/// a `moka` cache that, when full, evicts the least recently used entries, one by one, and
/// expires each entry after its own time to live. Never emptied to make room.
pub struct MemoryStore {
    /// moka's cache is concurrent (no lock of ours); its eviction and expiry run on later calls.
    entries: moka::sync::Cache<String, Kept>,
}

impl MemoryStore {
    /// A store of at most `max_bytes` of entries.
    pub fn new(max_bytes: usize) -> Self {
        let entries = moka::sync::Cache::builder()
            .max_capacity(max_bytes as u64)
            .weigher(|key: &String, kept: &Kept| {
                u32::try_from(key.len() + kept.entry.weight()).unwrap_or(u32::MAX)
            })
            .expire_after(PerEntryTtl)
            // Recency, not popularity: a new entry (a new instrument, a new curve date) is the
            // likeliest to be asked again, and TinyLFU's admission would refuse it while old
            // ones are hot.
            .eviction_policy(moka::policy::EvictionPolicy::lru())
            .build();
        MemoryStore { entries }
    }
}

impl Store for MemoryStore {
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Entry>, StoreError>> {
        let hit = self.entries.get(key).map(|kept| Entry::clone(&kept.entry));
        Box::pin(async move { Ok(hit) })
    }
    fn put<'a>(
        &'a self,
        key: &'a str,
        entry: &'a Entry,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        self.entries.insert(key.to_string(), Kept { entry: Arc::new(entry.clone()), ttl });
        Box::pin(async { Ok(()) })
    }
    fn purge<'a>(&'a self, route_prefix: &'a str) -> BoxFuture<'a, Result<u64, StoreError>> {
        let lead = format!("cache:{route_prefix}");
        let keys: Vec<Arc<String>> =
            self.entries.iter().map(|(k, _)| k).filter(|k| k.starts_with(&lead)).collect();
        let n = keys.iter().filter(|k| self.entries.remove(k.as_str()).is_some()).count() as u64;
        Box::pin(async move { Ok(n) })
    }
}

/// Entries in Redis. Reads and writes go through the connection's breaker: while Redis is
/// failing the cache is skipped at once (a miss goes upstream) instead of costing the timeout.
pub struct RedisStore {
    redis: Guarded,
    client: RedisClient,
    prefix: String,
}

impl RedisStore {
    /// A store under `prefix` (`access:<env>:`).
    pub fn new(redis: Guarded, prefix: String) -> Self {
        RedisStore { client: redis.client.clone(), redis, prefix }
    }

    /// The Redis key of `key`: under the prefix.
    fn full_key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }
}

impl Store for RedisStore {
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Entry>, StoreError>> {
        let key = self.full_key(key);
        Box::pin(async move {
            let raw: Option<Bytes> = self.redis.call(|c| async move { c.get(&key).await }).await?;
            Ok(raw.as_ref().and_then(Entry::decode))
        })
    }
    fn put<'a>(
        &'a self,
        key: &'a str,
        entry: &'a Entry,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let key = self.full_key(key);
        Box::pin(async move {
            let px = fred::types::Expiration::PX(ttl.as_millis().clamp(1, i64::MAX as u128) as i64);
            let value = Bytes::from(entry.encode());
            self.redis
                .call(
                    |c| async move { c.set::<(), _, _>(&key, value, Some(px), None, false).await },
                )
                .await?;
            Ok(())
        })
    }
    fn purge<'a>(&'a self, route_prefix: &'a str) -> BoxFuture<'a, Result<u64, StoreError>> {
        Box::pin(async move {
            use fred::prelude::ClientLike;
            use futures::TryStreamExt;
            // An admin operation: SCAN in pages (never KEYS), deleting as it goes.
            let pattern =
                format!("{}cache:{}*", self.prefix, route_prefix.replace(['*', '?', '['], ""));
            let mut pages = self.client.scan_buffered(pattern, Some(500), None);
            let mut deleted = 0u64;
            let mut batch = Vec::new();
            while let Some(key) = pages.try_next().await? {
                batch.push(key);
                if batch.len() >= 500 {
                    let n: u64 = self.client.del(std::mem::take(&mut batch)).await?;
                    deleted += n;
                }
            }
            if !batch.is_empty() {
                let n: u64 = self.client.del(batch).await?;
                deleted += n;
            }
            let _ = self.client.is_connected();
            Ok(deleted)
        })
    }
    fn shared_key(&self, key: &str) -> Option<String> {
        Some(self.full_key(key))
    }
}

/// Counters for `GET /api/v1/cache/stats`.
#[derive(Debug, Default)]
pub struct Stats {
    /// Served fresh from the cache.
    pub hits: AtomicU64,
    /// Went upstream.
    pub misses: AtomicU64,
    /// Served stale while revalidating.
    pub stale: AtomicU64,
    /// Not cacheable.
    pub bypass: AtomicU64,
    /// Revalidations sent upstream.
    pub revalidations: AtomicU64,
    /// Requests that waited for another request's upstream fetch.
    pub coalesced: AtomicU64,
    /// Store failures (the request went upstream).
    pub errors: AtomicU64,
}

/// Metric names.
pub mod names {
    /// Cache results by route and result.
    pub const RESULTS: &str = "access_gateway_cache_results_total";
    /// Revalidations by route.
    pub const REVALIDATIONS: &str = "access_gateway_cache_revalidations_total";
}

/// The cache: a store, single-flight per key, and counters.
pub struct Cache {
    /// The store.
    pub store: Arc<dyn Store>,
    /// In-flight fetches by key: later requests wait for the first (one upstream hit per key per
    /// replica). A std mutex held to look up or insert a sender.
    inflight: Mutex<HashMap<String, tokio::sync::watch::Sender<bool>>>,
    /// Counters.
    pub stats: Stats,
}

/// Who fetches a key.
pub enum Flight {
    /// This request fetches; finishing (or dropping) the guard wakes the others.
    Leader(FlightGuard),
    /// Another request is fetching; wait, then look again.
    Follower(tokio::sync::watch::Receiver<bool>),
}

/// Held by the fetching request.
pub struct FlightGuard {
    cache: Arc<Cache>,
    key: String,
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        if let Some(tx) =
            self.cache.inflight.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.key)
        {
            let _ = tx.send(true);
        }
    }
}

impl Cache {
    /// A cache over `store`.
    pub fn new(store: Arc<dyn Store>) -> Arc<Self> {
        Arc::new(Cache { store, inflight: Mutex::default(), stats: Stats::default() })
    }

    /// Joins or leads the fetch of `key`.
    pub fn flight(self: &Arc<Self>, key: &str) -> Flight {
        let mut inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        match inflight.get(key) {
            Some(tx) => Flight::Follower(tx.subscribe()),
            None => {
                inflight.insert(key.to_string(), tokio::sync::watch::channel(false).0);
                Flight::Leader(FlightGuard { cache: self.clone(), key: key.to_string() })
            }
        }
    }

    /// Counts a result for `route`.
    pub fn count(&self, route: &super::routes::Route, result: Outcome) {
        let field = match result {
            Outcome::Hit => &self.stats.hits,
            Outcome::Miss => &self.stats.misses,
            Outcome::Stale => &self.stats.stale,
            Outcome::Bypass => &self.stats.bypass,
        };
        field.fetch_add(1, Ordering::Relaxed);
        route.cache_results.0[result as usize].increment(1);
    }
}

/// How the cache treated a request: the `result` label, and the `X-Cache` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Served fresh from the cache.
    Hit = 0,
    /// Fetched upstream.
    Miss = 1,
    /// Served stale while one revalidation goes upstream.
    Stale = 2,
    /// Not cacheable (route, method or the client's `Cache-Control`).
    Bypass = 3,
}

impl Outcome {
    /// Every outcome, in discriminant order.
    pub const ALL: [Outcome; 4] = [Outcome::Hit, Outcome::Miss, Outcome::Stale, Outcome::Bypass];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Hit => "hit",
            Outcome::Miss => "miss",
            Outcome::Stale => "stale",
            Outcome::Bypass => "bypass",
        }
    }

    /// The `X-Cache` value.
    pub fn header(self) -> http::HeaderValue {
        http::HeaderValue::from_static(match self {
            Outcome::Hit => "HIT",
            Outcome::Miss => "MISS",
            Outcome::Stale => "STALE",
            Outcome::Bypass => "BYPASS",
        })
    }
}

/// A route's `access_gateway_cache_results_total` counters, by [`Outcome`], registered once.
pub struct ResultCounters([metrics::Counter; 4]);

impl std::fmt::Debug for ResultCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ResultCounters")
    }
}

impl ResultCounters {
    /// For the route named `route`.
    pub fn new(route: &str) -> Self {
        ResultCounters(Outcome::ALL.map(|result| {
            metrics::counter!(names::RESULTS, "role" => "gateway", "route" => route.to_string(), "result" => result.label())
        }))
    }
}

/// Headers kept with an entry.
pub const KEPT: &[&str] =
    &["content-type", "etag", "cache-control", "last-modified", "content-encoding", "vary"];

/// Whether an `If-None-Match` value matches `etag`.
pub fn etag_matches(if_none_match: &str, etag: &str) -> bool {
    let bare = |t: &str| t.trim().trim_start_matches("W/").to_string();
    if_none_match.trim() == "*" || if_none_match.split(',').any(|t| bare(t) == bare(etag))
}

/// A stable ETag for a body when the upstream gives none.
pub fn weak_etag(body: &[u8]) -> String {
    format!(
        "W/\"{}\"",
        &base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(Sha256::digest(body))[..22]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_index_their_counters_and_name_their_header() {
        for (i, outcome) in Outcome::ALL.into_iter().enumerate() {
            assert_eq!(outcome as usize, i, "ALL is in discriminant order");
            assert_eq!(outcome.header(), outcome.label().to_ascii_uppercase().as_str());
        }
    }

    #[test]
    fn entries_round_trip_and_anything_else_is_refused() {
        let entry = Entry {
            status: 200,
            headers: vec![
                ("content-type".into(), "application/json".into()),
                ("etag".into(), "W/\"é\"".into()),
            ],
            body: Bytes::from_static(b"{\"bid\":1.0841}\x00\xff"),
            stored_at: 1_795_600_000_123,
            max_age: 300,
            swr: 30,
        };
        let raw = Bytes::from(entry.encode());
        assert_eq!(Entry::decode(&raw), Some(entry.clone()));
        let empty = Entry { headers: vec![], body: Bytes::new(), ..entry.clone() };
        assert_eq!(Entry::decode(&Bytes::from(empty.encode())), Some(empty));
        // Every cut inside the fixed part or the headers is refused (a cut in the body is a
        // shorter body: the length is the value's own).
        let body_at = raw.len() - entry.body.len();
        for cut in 0..body_at {
            assert_eq!(Entry::decode(&raw.slice(..cut)), None, "cut at {cut}");
        }
        let mut other = raw.to_vec();
        other[3] = b'2';
        assert_eq!(Entry::decode(&Bytes::from(other)), None, "another version");
        assert_eq!(Entry::decode(&Bytes::from_static(b"{\"status\":200}")), None, "the old JSON");
    }

    #[test]
    fn cache_control_is_read_as_documented() {
        assert_eq!(
            directives(Some("max-age=60")),
            Directives { uncacheable: false, max_age: Some(60), swr: 0 }
        );
        assert_eq!(
            directives(Some("public, max-age=60, s-maxage=10, stale-while-revalidate=30")).max_age,
            Some(10)
        );
        assert_eq!(directives(Some("max-age=60, stale-while-revalidate=30")).swr, 30);
        assert!(directives(Some("no-store")).uncacheable);
        assert!(directives(Some("private, max-age=60")).uncacheable);
        assert_eq!(directives(None).max_age, None);
    }

    #[test]
    fn keys_separate_tenants_and_users_and_ignore_query_order() {
        let a = key("GET", "prices", "/p", Some("a=1&b=2"), "t1", None);
        assert_eq!(a, key("GET", "prices", "/p", Some("b=2&a=1"), "t1", None));
        assert_ne!(a, key("GET", "prices", "/p", Some("a=1&b=2"), "t2", None));
        assert_ne!(a, key("HEAD", "prices", "/p", Some("a=1&b=2"), "t1", None));
        assert_ne!(
            key("GET", "r", "/p", None, "t1", Some("u1")),
            key("GET", "r", "/p", None, "t1", Some("u2"))
        );
        assert!(a.starts_with("cache:prices:"));
        // What an upstream may read differently never shares an entry.
        let k = |q: &str| key("GET", "r", "/p", Some(q), "t1", None);
        assert_ne!(k("limit=2&limit=1"), k("limit=1&limit=2"), "repeated names keep their order");
        assert_eq!(k("b=1&limit=2&limit=1"), k("limit=2&b=1&limit=1"));
        assert_ne!(k("a"), k("a="));
        assert_ne!(k("a=x+y"), k("a=x%20y"));
    }

    #[test]
    fn etags_match_weak_and_lists() {
        assert!(etag_matches("\"abc\"", "\"abc\""));
        assert!(etag_matches("W/\"abc\", \"x\"", "\"abc\""));
        assert!(etag_matches("*", "\"abc\""));
        assert!(!etag_matches("\"abd\"", "\"abc\""));
    }

    fn entry(body: usize) -> Entry {
        Entry {
            status: 200,
            headers: Vec::new(),
            body: Bytes::from(vec![b'x'; body]),
            stored_at: now_ms(),
            max_age: 60,
            swr: 0,
        }
    }

    fn block_on<T>(future: impl std::future::Future<Output = T>) -> T {
        futures::executor::block_on(future)
    }

    /// Filled far past its size, the memory store evicts the least recently used entries, one
    /// by one, and keeps the recent ones (the hand-written map it replaced emptied itself).
    #[test]
    fn a_full_memory_store_evicts_the_least_recent_entries_and_keeps_the_recent_ones() {
        // Room for ten entries of 1,000 bytes under 12-byte keys, not eleven.
        let store = MemoryStore::new(10 * 1100);
        let ttl = Duration::from_secs(60);
        let key = |i: usize| format!("cache:r:{i:04}");
        let kept = |range: std::ops::Range<usize>| -> Vec<usize> {
            range.filter(|i| block_on(store.get(&key(*i))).unwrap().is_some()).collect()
        };
        let put = |i: usize| {
            block_on(store.put(&key(i), &entry(1000), ttl)).unwrap();
            store.entries.run_pending_tasks();
        };
        (0..10).for_each(put);
        assert_eq!(kept(0..1), [0], "entry 0 is read: now the most recently used");
        store.entries.run_pending_tasks();
        (10..13).for_each(put);
        assert_eq!(kept(0..13), [0, 4, 5, 6, 7, 8, 9, 10, 11, 12], "1, 2 and 3 made room");
        store.entries.run_pending_tasks();
        (13..100).for_each(put);
        assert!(store.entries.weighted_size() <= 10 * 1100, "bounded by its bytes");
        assert_eq!(kept(0..100), (90..100).collect::<Vec<_>>(), "full of the newest entries");
    }

    #[test]
    fn memory_entries_expire_after_their_own_ttl_and_purge_by_route() {
        let store = MemoryStore::new(1 << 20);
        block_on(store.put("cache:prices:1", &entry(10), Duration::from_millis(30))).unwrap();
        block_on(store.put("cache:prices:2", &entry(10), Duration::from_secs(60))).unwrap();
        block_on(store.put("cache:curves:1", &entry(10), Duration::from_secs(60))).unwrap();
        std::thread::sleep(Duration::from_millis(60));
        assert!(block_on(store.get("cache:prices:1")).unwrap().is_none(), "expired");
        assert!(block_on(store.get("cache:prices:2")).unwrap().is_some(), "its own TTL");
        assert_eq!(block_on(store.purge("pri")).unwrap(), 1, "the live entry of the route");
        assert!(block_on(store.get("cache:prices:2")).unwrap().is_none());
        assert!(block_on(store.get("cache:curves:1")).unwrap().is_some(), "other routes stay");
    }
}
