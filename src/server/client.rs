//! Who the client is, and its fair share of the edge.
//!
//! - [`client_addr`]: the client's address: the peer, or, when the peer is one of
//!   `server.trusted_proxies` (an ingress, a load balancer), the rightmost `X-Forwarded-For` entry
//!   that is not itself a trusted proxy. Every role and every per-client limit uses this one rule.
//! - [`PerKey`]: how many of something (open connections, requests in flight) one key (a client
//!   address, an identity) holds, refused past a cap, so that no single client can take the slots
//!   every other client needs.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use http::HeaderMap;
use ipnet::IpNet;

/// The client's address as [`client_addr`] computed it, put in the request's extensions by the
/// shared layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub IpAddr);

/// Whether `ip` is in one of `trusted`.
pub fn is_trusted(ip: &IpAddr, trusted: &[IpNet]) -> bool {
    trusted.iter().any(|net| net.contains(ip))
}

/// The client's address: `peer`, or, when `peer` is a trusted proxy, the rightmost address of
/// `X-Forwarded-For` that is not a trusted proxy (entries a client wrote itself stand left of
/// those its proxies appended, so they are never believed).
pub fn client_addr(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    if !is_trusted(&peer, trusted) {
        return peer;
    }
    let chain: Vec<IpAddr> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    chain.into_iter().rev().find(|ip| !is_trusted(ip, trusted)).unwrap_or(peer)
}

/// Shards of [`PerKey`]: a request takes one short lock on one shard, so concurrent requests of
/// different clients rarely meet.
const SHARDS: usize = 16;

/// Counts held per key, at most `cap` each. The counts live in std mutexes held for one map
/// update. A key whose count falls to zero stays (a client's next request then finds its entry
/// instead of inserting it again: this is on every request's path), and a shard sweeps its idle
/// keys once it holds more than [`SWEEP_AT`], so the map stays bounded by the clients active at
/// once. foldhash (seeded per process) instead of SipHash: the keys are addresses and verified
/// identities, and this runs twice per request.
pub struct PerKey<K> {
    shards: [Mutex<HashMap<K, u32, foldhash::fast::RandomState>>; SHARDS],
    hasher: foldhash::fast::RandomState,
    cap: u32,
}

/// Keys a shard holds before it drops those with nothing held.
const SWEEP_AT: usize = 4096;

/// One unit held by a key; given back when dropped.
pub struct Slot<K: Hash + Eq> {
    owner: Arc<PerKey<K>>,
    key: K,
}

impl<K: Hash + Eq + Clone> PerKey<K> {
    /// At most `cap` per key (0: no cap; nothing is counted).
    pub fn new(cap: u32) -> Arc<Self> {
        Arc::new(PerKey { shards: Default::default(), hasher: Default::default(), cap })
    }

    /// Whether there is a cap at all.
    pub fn enabled(&self) -> bool {
        self.cap > 0
    }

    fn shard(&self, key: &K) -> &Mutex<HashMap<K, u32, foldhash::fast::RandomState>> {
        &self.shards[(self.hasher.hash_one(key) as usize) % SHARDS]
    }

    /// Takes one unit for `key`, or `None` when it already holds `cap`. With no cap, always a
    /// slot (that counts nothing).
    pub fn try_acquire(self: &Arc<Self>, key: K) -> Option<Option<Slot<K>>> {
        if self.cap == 0 {
            return Some(None);
        }
        let mut shard = self.shard(&key).lock().unwrap_or_else(|p| p.into_inner());
        let held = match shard.get_mut(&key) {
            Some(held) => held,
            None => {
                if shard.len() >= SWEEP_AT {
                    shard.retain(|_, held| *held > 0);
                }
                shard.entry(key.clone()).or_insert(0)
            }
        };
        if *held >= self.cap {
            return None;
        }
        *held += 1;
        drop(shard);
        Some(Some(Slot { owner: self.clone(), key }))
    }

    /// How many units `key` holds now.
    pub fn held(&self, key: &K) -> u32 {
        self.shard(key).lock().unwrap_or_else(|p| p.into_inner()).get(key).copied().unwrap_or(0)
    }
}

impl<K: Hash + Eq> Drop for Slot<K> {
    fn drop(&mut self) {
        let shard = &self.owner.shards[(self.owner.hasher.hash_one(&self.key) as usize) % SHARDS];
        let mut shard = shard.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(held) = shard.get_mut(&self.key) {
            *held = held.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_capped_per_key_and_given_back() {
        let per = PerKey::new(2);
        let a1 = per.try_acquire("a").unwrap();
        let _a2 = per.try_acquire("a").unwrap();
        assert!(per.try_acquire("a").is_none(), "a third slot for a");
        assert!(per.try_acquire("b").is_some(), "b has its own share");
        drop(a1);
        assert_eq!(per.held(&"a"), 1);
        // Idle keys are swept once a shard is full of them: the map stays bounded.
        let many = PerKey::new(1);
        for i in 0..(SWEEP_AT * SHARDS * 2) {
            drop(many.try_acquire(i));
        }
        let kept: usize = many.shards.iter().map(|s| s.lock().unwrap().len()).sum();
        assert!(kept <= SWEEP_AT * SHARDS, "{kept} keys kept");
        assert!(per.try_acquire("a").is_some());
        let unlimited = PerKey::<&str>::new(0);
        for _ in 0..10 {
            assert!(unlimited.try_acquire("a").is_some());
        }
    }

    #[test]
    fn forwarded_addresses_are_believed_only_from_trusted_proxies() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-for", "1.1.1.1, 2.2.2.2, 10.0.0.7".parse().unwrap());
        let proxy: IpAddr = "10.0.0.1".parse().unwrap();
        let direct: IpAddr = "3.3.3.3".parse().unwrap();
        assert_eq!(client_addr(proxy, &headers, &trusted), "2.2.2.2".parse::<IpAddr>().unwrap());
        assert_eq!(client_addr(direct, &headers, &trusted), direct);
        assert_eq!(client_addr(proxy, &HeaderMap::new(), &trusted), proxy);
    }
}
