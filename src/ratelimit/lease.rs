//! Leased mode (`gateway.rate_limit_mode = leased`): each replica takes cells from a policy's
//! shared budget in Redis (the GCRA script's lease branch, `gcra.lua`) and spends them locally,
//! so only a request that finds none held asks Redis. Over any window `W` a subject is admitted
//! at most what the exact limiter admits over `W + max_age` (a cell is taken from the shared
//! budget when leased and spent within `max_age` or dropped); `docs/gateway.md` ("Rate limits")
//! gives the bound and `tests/it/ratelimit.rs` (`leased_*`) checks it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::redis::Batcher;
use super::{CacheRead, Policy, Verdict};

/// How the gateway's limits are decided with Redis.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Every request is decided by Redis (batched): exact across replicas.
    #[default]
    Exact,
    /// Replicas lease shares of each budget and decide locally ([`super::Limiter::leased`]).
    Leased,
}

/// Leased mode ([`super::Limiter::leased`]): each replica takes a share of a policy's budget
/// from Redis and spends it locally, instead of asking Redis for every request.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Lease {
    /// The largest lease, as a share of the policy's burst (at least one cell). Leases start at
    /// one cell and double while spent in time, so a replica leases about what it spends.
    pub share: f64,
    /// Leased cells not spent within this are dropped (they stay spent in Redis).
    #[serde(with = "humantime_serde")]
    #[schema(value_type = String, example = "1s")]
    pub max_age: Duration,
}

impl Default for Lease {
    fn default() -> Self {
        Lease { share: 0.1, max_age: Duration::from_secs(1) }
    }
}

impl Lease {
    /// The cells one lease of `policy` asks for: `ceil(burst * share)`, at least 1, at most the
    /// burst.
    pub fn cells(&self, policy: &Policy) -> u64 {
        ((policy.burst as f64 * self.share).ceil() as u64).clamp(1, policy.burst.max(1))
    }

    /// What is wrong with it, for the config check.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if !(self.share > 0.0 && self.share <= 1.0) {
            problems.push(format!("share must be in (0, 1], not {}", self.share));
        }
        if self.max_age.is_zero() || self.max_age > Duration::from_secs(60) {
            problems.push(format!("max_age must be in (0, 1m], not {:?}", self.max_age));
        }
        problems
    }
}

/// Cells leased and not yet spent, for one policy key, usable until `until`; or, after Redis
/// granted none, the refusal, repeated locally until the next cell is due or `until`, whichever
/// is sooner (what Redis would answer meanwhile: a budget never gets fuller before then).
/// `size` is the last lease asked for: the next one doubles it when every cell was spent in time
/// and halves it when cells expired unspent (up to [`Lease::cells`]), so a replica leases about
/// what it spends within `max_age` and drops little.
#[derive(Debug, Clone, Copy)]
struct Held {
    cells: u64,
    until: Instant,
    refused: Option<(Instant, Verdict)>,
    size: u64,
}

impl Held {
    /// How many cells the next lease asks for, at most `cap`.
    fn next_size(held: Option<&Held>, cap: u64, now: Instant) -> u64 {
        match held {
            None => 1,
            Some(h) if h.cells > 0 && h.until <= now => (h.size / 2).max(1),
            Some(h) if h.cells == 0 && h.refused.is_none() => h.size.saturating_mul(2).min(cap),
            Some(h) => h.size.clamp(1, cap),
        }
    }
}

/// What the held cells decide for a request.
enum FromHeld {
    /// A cell of each policy taken.
    Taken(Vec<Verdict>),
    /// A policy was refused by Redis and its next cell is not due yet.
    Refused(Vec<Verdict>),
    /// Some policy has no cell held: lease.
    Missing,
}

/// Leased mode's state: the lease, and the cells held by policy key (a std mutex held for one
/// lookup and update).
pub(super) struct Leases {
    lease: Lease,
    held: Mutex<HashMap<String, Held>>,
}

impl Leases {
    pub(super) fn new(lease: Lease) -> Self {
        Leases { lease, held: Mutex::default() }
    }

    /// Takes one held cell of every policy key when each has one (all or nothing), under the
    /// lock; the verdicts say what is held after. A refusal still in force refuses.
    fn take_held(&self, items: &[(String, &Policy, &str)], now: Instant) -> FromHeld {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        for (refused_key, _, _) in items {
            // Kept until the next cell is due, but no longer than `max_age` (`until`): entries
            // live only while in use, whatever the refusal's wait.
            let refusal = held
                .get(refused_key)
                .filter(|h| h.until > now)
                .and_then(|h| h.refused)
                .filter(|(at, _)| *at > now);
            if let Some((at, verdict)) = refusal {
                let retry_us = at.duration_since(now).as_micros() as u64;
                let verdicts = items
                    .iter()
                    .map(|(key, _, _)| match key == refused_key {
                        true => Verdict { retry_us, ..verdict },
                        false => Verdict::NOT_DECIDING,
                    })
                    .collect();
                return FromHeld::Refused(verdicts);
            }
        }
        let usable = |h: Option<&Held>| h.filter(|h| h.until > now && h.cells > 0).is_some();
        if !items.iter().all(|(key, _, _)| usable(held.get(key))) {
            return FromHeld::Missing;
        }
        let verdicts = items
            .iter()
            .map(|(key, policy, _)| {
                let h = held.get_mut(key).expect("checked above");
                h.cells -= 1;
                // What this replica holds: a lower bound of what the subject has left.
                Verdict {
                    allowed: true,
                    granted: 1,
                    remaining: h.cells,
                    reset_us: policy.interval_us() * policy.burst.saturating_sub(h.cells),
                    retry_us: 0,
                }
            })
            .collect();
        FromHeld::Taken(verdicts)
    }

    /// Adds what Redis answered a lease of `size` cells: the cells granted, usable until
    /// `max_age` after the lease, or until the cells already held expire if that is sooner (a
    /// lease never makes older cells live longer); none granted, the refusal until the next
    /// cell is due.
    fn add_held(&self, key: &str, size: u64, answer: Verdict, until: Instant, now: Instant) {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if held.len() > 100_000 {
            // Every entry, refusals included, is stale after `until`: what is kept is bounded by
            // the subjects seen within `max_age`.
            held.retain(|_, h| h.until > now);
        }
        let fresh = Held { cells: 0, until, refused: None, size };
        let entry = held.entry(key.to_string()).or_insert(fresh);
        if answer.granted == 0 {
            let due = now + Duration::from_micros(answer.retry_us);
            *entry = Held { refused: Some((due, answer)), ..fresh };
        } else if entry.until <= now || entry.cells == 0 {
            *entry = Held { cells: answer.granted, ..fresh };
        } else {
            *entry = Held { cells: entry.cells + answer.granted, until: entry.until, ..fresh };
        }
    }

    /// Leased mode's decision: held cells, else a lease from Redis for the policies with none
    /// (the cache read rides along), then held cells again. A request that finds cells held
    /// for every policy costs no Redis call for its limits; its cache entry, if it reads one, is
    /// read by the script all the same, batched with the other requests'.
    pub(super) async fn check(
        &self,
        batcher: &Batcher,
        items: &[(String, &Policy, &str)],
        mut also_get: Option<String>,
    ) -> Result<(Vec<Verdict>, CacheRead), String> {
        let mut cached = CacheRead::NotAsked;
        // Cells a concurrent request took between the lease and the take are leased again; a
        // few rounds at most, as each lease grants many cells.
        for _ in 0..3 {
            let now = Instant::now();
            match self.take_held(items, now) {
                FromHeld::Taken(verdicts) => {
                    // Decided here; the cache read still shares a script call with the other
                    // requests waiting (one call per batch, not a GET per request).
                    // A failed read is left to the caller (`NotAsked`): the cells are spent.
                    if let Some(key) = also_get.take() {
                        let read = batcher.check(Vec::new(), true, Some(key)).await;
                        cached = read.map_or(CacheRead::NotAsked, |(_, read)| read);
                    }
                    return Ok((verdicts, cached));
                }
                FromHeld::Refused(verdicts) => return Ok((verdicts, cached)),
                FromHeld::Missing => {}
            }
            let missing: Vec<(String, &Policy, u64)> = {
                let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
                items
                    .iter()
                    .filter(|(key, _, _)| {
                        !held.get(key).is_some_and(|h| h.until > now && h.cells > 0)
                    })
                    .map(|(key, policy, _)| {
                        let size = Held::next_size(held.get(key), self.lease.cells(policy), now);
                        (key.clone(), *policy, size)
                    })
                    .collect()
            };
            if missing.is_empty() {
                continue;
            }
            let (answers, read) = batcher.check(missing.clone(), true, also_get.take()).await?;
            if !matches!(read, CacheRead::NotAsked) {
                cached = read;
            }
            let until = now + self.lease.max_age;
            for ((key, _, size), answer) in missing.iter().zip(&answers) {
                self.add_held(key, *size, *answer, until, Instant::now());
            }
            if let Some(refused) = answers.iter().position(|a| a.granted == 0) {
                // The shared budget has nothing for this policy: refused, with Redis's verdict
                // for it and what is held for the others (nothing of theirs is taken).
                let verdicts = items
                    .iter()
                    .map(|(key, _, _)| {
                        if *key == missing[refused].0 {
                            answers[refused]
                        } else {
                            Verdict::NOT_DECIDING
                        }
                    })
                    .collect();
                return Ok((verdicts, cached));
            }
        }
        Err("leased cells were taken by concurrent requests three times over".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_double_while_spent_and_halve_when_cells_expire_unspent() {
        let now = Instant::now();
        let (later, earlier) = (now + Duration::from_secs(1), now - Duration::from_millis(1));
        let held = |cells, until, size| Held { cells, until, refused: None, size };
        assert_eq!(Held::next_size(None, 10, now), 1, "a first lease is one cell");
        assert_eq!(Held::next_size(Some(&held(0, later, 4)), 10, now), 8, "spent in time");
        assert_eq!(Held::next_size(Some(&held(0, earlier, 8)), 10, now), 10, "at most the cap");
        assert_eq!(Held::next_size(Some(&held(3, earlier, 8)), 10, now), 4, "some expired");
        assert_eq!(Held::next_size(Some(&held(3, earlier, 1)), 10, now), 1, "at least one");
        let verdict =
            Verdict { allowed: false, granted: 0, remaining: 0, reset_us: 0, retry_us: 9 };
        let refused = Held { refused: Some((earlier, verdict)), ..held(0, later, 4) };
        assert_eq!(Held::next_size(Some(&refused), 10, now), 4, "after a refusal, the same");
    }

    #[test]
    fn a_refusal_is_repeated_locally_at_most_for_max_age() {
        let leases = Leases::new(Lease { share: 0.5, max_age: Duration::from_millis(50) });
        let policy = Policy { rate: 1, period: Duration::from_secs(3600), burst: 2 };
        let items = [("k".to_string(), &policy, "p")];
        let now = Instant::now();
        let hour = 3_600_000_000;
        let refusal =
            Verdict { allowed: false, granted: 0, remaining: 0, reset_us: hour, retry_us: hour };
        leases.add_held("k", 1, refusal, now + Duration::from_millis(50), now);
        match leases.take_held(&items, now + Duration::from_millis(10)) {
            FromHeld::Refused(v) => assert!(!v[0].allowed && v[0].retry_us > hour - 1_000_000),
            _ => panic!("refused locally within max_age"),
        }
        assert!(
            matches!(leases.take_held(&items, now + Duration::from_millis(60)), FromHeld::Missing),
            "past max_age Redis is asked again, though the next cell is an hour away"
        );
    }

    #[test]
    fn a_lease_is_a_share_of_the_burst_at_least_one_cell_at_most_the_burst() {
        let policy = |burst| Policy { rate: 10, period: Duration::from_secs(1), burst };
        let lease = |share| Lease { share, max_age: Duration::from_secs(1) };
        assert_eq!(lease(0.1).cells(&policy(100)), 10);
        assert_eq!(lease(0.1).cells(&policy(15)), 2, "rounded up");
        assert_eq!(lease(0.1).cells(&policy(3)), 1, "at least one");
        assert_eq!(lease(1.0).cells(&policy(3)), 3, "at most the burst");
        assert!(lease(0.1).problems().is_empty());
        assert_eq!(lease(0.0).problems().len(), 1);
        assert_eq!(lease(1.5).problems().len(), 1);
        assert_eq!(lease(f64::NAN).problems().len(), 1);
        let old = Lease { share: 0.1, max_age: Duration::from_secs(120) };
        assert_eq!(old.problems().len(), 1, "max_age at most a minute");
    }
}
