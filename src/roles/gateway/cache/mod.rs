//! The response cache for GET and HEAD: Redis (shared) or in-process (the embedded default).
//!
//! - [`store`]: where entries live ([`Store`]: [`RedisStore`], [`MemoryStore`]) and their stored
//!   form ([`Entry`]).
//! - [`policy`]: the HTTP caching rules: what may be served from the cache and under which key,
//!   what may be stored and for how long, validators, and [`policy::privatize`].
//! - [`serve`]: the two steps of the gateway's pipeline around the upstream: [`serve::lookup`]
//!   (hit, stale while revalidating, or one fetch per key with the others waiting) and
//!   [`serve::fill`] (the answer stored, `X-Cache` set).
//!
//! With Redis, the entry is read by the rate limiter's script in the same round trip as the
//! limit ([`crate::ratelimit::LimitAndLookup`]), and used only once the limit and the
//! entitlement allow the request.

pub mod policy;
pub mod serve;
pub mod store;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use http::HeaderName;

pub use policy::CachePolicy;
pub use store::{Entry, MemoryStore, RedisStore, Store, StoreError};

use super::routes::Route;

/// Says how the response cache treated a response: `HIT`, `MISS`, `STALE` or `BYPASS`.
pub static X_CACHE: HeaderName = HeaderName::from_static("x-cache");

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
    /// The fetches in flight, by key ([`serve::flight`]).
    flights: serve::Flights,
    /// Counters.
    pub stats: Stats,
}

impl Cache {
    /// A cache over `store`.
    pub fn new(store: Arc<dyn Store>) -> Arc<Self> {
        Arc::new(Cache { store, flights: serve::Flights::default(), stats: Stats::default() })
    }

    /// Counts a result for `route`.
    pub fn count(&self, route: &Route, result: Outcome) {
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
}
