//! Where cached responses live: the [`Store`] seam, [`RedisStore`] (shared by every replica) and
//! [`MemoryStore`] (in-process, the embedded default), and the stored form of a response,
//! [`Entry`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use fred::prelude::{ClientLike, KeysInterface};
use futures::future::BoxFuture;

use crate::backends::breaker::CallError;
use crate::backends::redis::{Client as RedisClient, Guarded};

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

/// An entry in a [`MemoryStore`] with its deadline (the entry is shared, not copied, by the
/// cache's bookkeeping).
#[derive(Clone)]
struct Kept {
    entry: Arc<Entry>,
    until: Instant,
}

/// An entry weighs its key and its bytes (body, headers).
#[derive(Clone)]
struct ByBytes;

impl quick_cache::Weighter<String, Kept> for ByBytes {
    fn weight(&self, key: &String, kept: &Kept) -> u64 {
        (key.len() + kept.entry.weight()).max(1) as u64
    }
}

/// In-process entries, bounded by their bytes (keys, bodies, headers: `gateway.cache_max_bytes`)
/// in the layer's one cache crate (`crate::cache`: quick_cache): when full it evicts the entries
/// least in use, one by one, and never empties itself to make room; each entry is returned only
/// until its own time to live (from `Cache-Control`, counted from its write) has passed.
pub struct MemoryStore {
    /// quick_cache's sharded cache (its locks, per shard, held for one operation).
    entries: quick_cache::sync::Cache<String, Kept, ByBytes>,
}

impl MemoryStore {
    /// A store of at most `max_bytes` of entries.
    pub fn new(max_bytes: usize) -> Self {
        // The item estimate sizes the shards' tables: entries of a few KB on average.
        let items = (max_bytes / 2048).max(16);
        MemoryStore {
            entries: quick_cache::sync::Cache::with_weighter(items, max_bytes as u64, ByBytes),
        }
    }

    /// The bytes held.
    #[cfg(test)]
    fn weight(&self) -> u64 {
        self.entries.weight()
    }
}

impl Store for MemoryStore {
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Entry>, StoreError>> {
        let now = Instant::now();
        let hit = match self.entries.get(key) {
            Some(kept) if now < kept.until => Some(Entry::clone(&kept.entry)),
            Some(_) => {
                // Past its time to live: dropped, unless a fresh write replaced it meanwhile.
                self.entries.remove_if(key, |kept| kept.until <= now);
                None
            }
            None => None,
        };
        Box::pin(async move { Ok(hit) })
    }
    fn put<'a>(
        &'a self,
        key: &'a str,
        entry: &'a Entry,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let until = Instant::now()
            .checked_add(ttl)
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600));
        self.entries.insert(key.to_string(), Kept { entry: Arc::new(entry.clone()), until });
        Box::pin(async { Ok(()) })
    }
    fn purge<'a>(&'a self, route_prefix: &'a str) -> BoxFuture<'a, Result<u64, StoreError>> {
        let lead = format!("cache:{route_prefix}");
        let before = self.entries.len();
        self.entries.retain(|key, _| !key.starts_with(&lead));
        let n = before.saturating_sub(self.entries.len()) as u64;
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
            use futures::{StreamExt, TryStreamExt};
            // An admin operation: SCAN in pages (never KEYS), deleting as it goes; in a Redis
            // Cluster, every primary is scanned.
            let pattern =
                format!("{}cache:{}*", self.prefix, route_prefix.replace(['*', '?', '['], ""));
            let mut pages = if self.client.is_clustered() {
                self.client.scan_cluster_buffered(pattern, Some(500), None).boxed()
            } else {
                self.client.scan_buffered(pattern, Some(500), None).boxed()
            };
            let mut deleted = 0u64;
            let mut batch = Vec::new();
            while let Some(key) = pages.try_next().await? {
                batch.push(key);
                if batch.len() >= 500 {
                    deleted += delete(&self.client, std::mem::take(&mut batch)).await?;
                }
            }
            if !batch.is_empty() {
                deleted += delete(&self.client, batch).await?;
            }
            Ok(deleted)
        })
    }
    fn shared_key(&self, key: &str) -> Option<String> {
        Some(self.full_key(key))
    }
}

/// Deletes `keys`: one DEL on one server; in a Redis Cluster one DEL per hash slot (a command's
/// keys must share a slot there).
async fn delete(client: &RedisClient, keys: Vec<fred::types::Key>) -> Result<u64, StoreError> {
    if !client.is_clustered() {
        return Ok(client.del(keys).await?);
    }
    let mut by_slot: HashMap<u16, Vec<fred::types::Key>> = HashMap::new();
    for key in keys {
        by_slot.entry(key.cluster_hash()).or_default().push(key);
    }
    let mut deleted = 0;
    for (_, keys) in by_slot {
        deleted += client.del::<u64, _>(keys).await?;
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;

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

    /// Filled far past its size (each entry stored after a miss, then read, as the cache is
    /// used), the memory store stays within its bytes, keeps the newest entries and the ones in
    /// use, and lets the oldest go: never emptied (the hand-written map it replaced emptied
    /// itself).
    #[test]
    fn a_full_memory_store_evicts_one_by_one_and_keeps_the_recent_entries() {
        let store = MemoryStore::new(100 * 1100);
        let ttl = Duration::from_secs(60);
        let key = |i: usize| format!("cache:r:{i:04}");
        let hot = key(0);
        for i in 0..1000 {
            block_on(store.put(&key(i), &entry(1000), ttl)).unwrap();
            assert!(block_on(store.get(&key(i))).unwrap().is_some());
            assert!(block_on(store.get(&hot)).unwrap().is_some(), "an entry in use stays: {i}");
            assert!(store.weight() <= 100 * 1100, "bounded by its bytes");
        }
        let kept: Vec<usize> =
            (0..1000).filter(|i| block_on(store.get(&key(*i))).unwrap().is_some()).collect();
        assert!(kept.len() >= 50, "never emptied: {} kept", kept.len());
        assert!((990..1000).all(|i| kept.contains(&i)), "the newest are kept: {kept:?}");
        assert!((1..100).all(|i| !kept.contains(&i)), "the oldest went: {kept:?}");
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
