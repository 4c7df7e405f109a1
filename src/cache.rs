//! Bounded in-process caches whose entries also expire: one crate for every such cache
//! (`quick_cache`), so that none is a hand-written map that empties itself when full.
//!
//! Full, a cache evicts the entries least in use (quick_cache's CLOCK-PRO: recency, with a
//! memory of which entries were hit, so a burst of entries used once does not push out the ones
//! in use); it never empties itself. An entry is never returned past its deadline: it is dropped
//! when read after it, and otherwise ages out like any unused entry.
//!
//! Chosen by measurement (`docs/benchmarks.md`): on the auth bench's cached verifications
//! quick_cache kept the hand-written map's rate where moka's `sync::Cache` cost about a fifth of
//! it (a hit costs ~15 ns in quick_cache against ~150 ns in moka, 100 hot keys; ~60 against ~450
//! ns with 100,000).

use std::hash::Hash;
use std::time::{Duration, Instant};

pub use quick_cache::Equivalent;

/// A bounded cache of values that expire: at most about `capacity` entries (quick_cache shards
/// it, each shard holding its share), each until its own deadline. Locks are the crate's, per
/// shard, held for one operation.
pub struct Bounded<K, V> {
    entries: quick_cache::sync::Cache<K, (V, Instant)>,
}

impl<K: Eq + Hash + Clone, V: Clone> Bounded<K, V> {
    /// A cache of about `capacity` entries (at least one).
    pub fn new(capacity: usize) -> Self {
        Bounded { entries: quick_cache::sync::Cache::new(capacity.max(1)) }
    }

    /// The value of `key`, unless it is missing or past its deadline (then it is dropped).
    pub fn get<Q>(&self, key: &Q) -> Option<V>
    where
        Q: Hash + Equivalent<K> + ?Sized,
    {
        let (value, until) = self.entries.get(key)?;
        let now = Instant::now();
        if now < until {
            return Some(value);
        }
        // Only if it is still the expired one: a fresh value may have replaced it meanwhile.
        self.entries.remove_if(key, |(_, until)| *until <= now);
        None
    }

    /// Keeps `value` under `key` for `ttl` (replacing what was there).
    pub fn insert(&self, key: K, value: V, ttl: Duration) {
        let until = Instant::now().checked_add(ttl).unwrap_or_else(far_future);
        self.entries.insert(key, (value, until));
    }

    /// Drops `key`.
    pub fn remove<Q>(&self, key: &Q)
    where
        Q: Hash + Equivalent<K> + ?Sized,
    {
        self.entries.remove(key);
    }

    /// Keeps only the entries for which `keep` holds.
    pub fn retain(&self, keep: impl Fn(&K, &V) -> bool) {
        self.entries.retain(|key, (value, _)| keep(key, value));
    }

    /// Drops every entry (an invalidation, never a way to make room).
    pub fn clear(&self) {
        self.entries.clear();
    }

    /// Entries held, expired ones not yet dropped included.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// A deadline no entry reaches (a TTL too long to add to now).
fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_it_keeps_the_entries_in_use_and_never_empties_itself() {
        let cache = Bounded::new(100);
        // As a cache is used: an entry is stored after a miss, then hit.
        for i in 0..1000u32 {
            cache.insert(i, i, Duration::from_secs(60));
            assert_eq!(cache.get(&i), Some(i));
        }
        assert!((90..=110).contains(&cache.len()), "{}", cache.len());
        assert!((950..1000).all(|i| cache.get(&i) == Some(i)), "the latest are kept");
        assert!((0..100).all(|i| cache.get(&i).is_none()), "the oldest went first");
    }

    #[test]
    fn an_entry_is_never_returned_past_its_deadline() {
        let cache = Bounded::new(10);
        cache.insert("short", 1, Duration::from_millis(20));
        cache.insert("long", 2, Duration::from_secs(60));
        cache.insert("forever", 3, Duration::MAX);
        assert_eq!(cache.get("short"), Some(1));
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(cache.get("short"), None);
        assert_eq!(cache.len(), 2, "dropped when read after its deadline");
        assert_eq!((cache.get("long"), cache.get("forever")), (Some(2), Some(3)));
        cache.retain(|_, v| *v != 2);
        assert_eq!(cache.get("long"), None);
        cache.clear();
        assert!(cache.is_empty());
    }
}
