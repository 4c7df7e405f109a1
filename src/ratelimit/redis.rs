//! The limiter's Redis side: the GCRA script (`gcra.lua`), run for many requests at once.
//!
//! Checks that arrive while script calls are in flight wait in a queue and go together in the next
//! call: one EVALSHA, one round trip, one write and one read on each side for the whole batch
//! (fred flushes every EVALSHA on its own, so separate calls never share a write). Each request is
//! still decided atomically on Redis's clock, in arrival order; a batch shares only the trip. When
//! the gateway is idle a batch is one request, and batching costs a channel hop each way.
//!
//! A check waits at most the Redis command timeout in all, queueing included: when Redis hangs,
//! calls fail only one timeout at a time, so without that bound the queue behind them would wait
//! many timeouts. The bound needs no timer per check (a timer per request, earlier than any
//! other the thread held, woke the I/O driver through its eventfd about once in three
//! requests): each check carries its deadline, a script call's timeout is what its oldest check
//! has left, and checks whose deadline passed in the queue are answered when the task reaches
//! them, without a call. Checks queue in arrival order, so every check in a call is older than
//! every check still queued: the calls in flight end before any queued check's deadline, and the
//! task then reaches it in time. A check whose caller gave up is dropped from the queue, not
//! sent.
//!
//! In a Redis Cluster every key of one script call must live in one hash slot. A request's
//! policy keys share their subject's hash tag (`rl:{<subject>}:<policy>`), so each request fits;
//! the waiting checks are grouped by slot and each group is its own call, sent to the primary
//! of that slot (groups of different slots run side by side). The cache entry a request also
//! reads rides in the script only when its key happens to share the slot; otherwise it is a GET
//! of its own, sent at the same moment as the script call, so a cache hit still costs one round
//! trip of latency (two commands on different nodes). On one server everything stays one call.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use fred::prelude::{ClientLike, KeysInterface, LuaInterface};
use fred::types::Key;
use fred::types::Value;
use fred::types::{ClusterHash, CustomCommand};
use futures::stream::{FuturesUnordered, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::{CacheRead, Policy, Verdict};
use crate::backends::breaker::Breaker;
use crate::backends::redis::Client;

/// The script.
const SCRIPT: &str = include_str!("gcra.lua");

/// Script calls in flight at once. With one, a request may wait a whole round trip for the
/// previous batch before its own is sent; with many, batches shrink towards one request each and
/// the saving goes. Two keeps Redis busy while the next batch forms.
const IN_FLIGHT: usize = 2;

/// Requests in one script call at most: bounds the time Redis spends in one script (other clients
/// wait while it runs) and the size of one command.
const MAX_BATCH: usize = 64;

/// Requests waiting for a batch. When full, checks wait to enqueue (backpressure) rather than
/// growing memory without bound while Redis is slow.
const QUEUE: usize = 8192;

/// What the script answered for one request: verdicts in policy order, and the cache entry's
/// value when one was read (`None` also when the key does not exist).
type Answer = Result<(Vec<Verdict>, Option<Bytes>), String>;

/// One request's check.
struct Job {
    /// The hash slot of its keys in a Redis Cluster (`None` on one server): a script call holds
    /// the checks of one slot.
    slot: Option<u16>,
    /// Full keys, one per policy, then the cache entry's when `reads`.
    keys: Vec<String>,
    /// `(T, tau)` per policy, in µs, and the cells wanted (1 unless it leases).
    limits: Vec<(u64, u64, u64)>,
    reads: bool,
    /// Takes up to the cells wanted of each policy on its own (leased mode), instead of one of
    /// each or none.
    leases: bool,
    /// When the caller stops waiting: the check is answered by then, sent or not.
    deadline: Instant,
    reply: oneshot::Sender<Answer>,
}

/// Sends checks to the batching task. Dropping the last handle ends the task.
pub(super) struct Batcher {
    jobs: mpsc::Sender<Job>,
    script: Arc<Script>,
    /// How long a check waits for its answer, queueing included: the client's command timeout.
    deadline: Duration,
}

impl Batcher {
    /// Starts the batching task on the current Tokio runtime. With `own`, `client` is a new,
    /// unconnected client of this task's alone: it is connected here (its connection's tasks run on
    /// this runtime too; commands wait until it is up) and closed when the task ends.
    /// Script calls go through `breaker`.
    pub(super) fn spawn(client: Client, own: bool, breaker: Arc<Breaker>) -> Self {
        if own {
            drop(client.connect());
        }
        let (jobs, queue) = mpsc::channel(QUEUE);
        let deadline = match client.perf_config().default_command_timeout {
            none if none.is_zero() => Duration::from_secs(2),
            timeout => timeout,
        };
        let script = Arc::new(Script {
            client,
            sha: Mutex::new(None),
            calls: AtomicU64::new(0),
            batch_size: metrics::histogram!(super::names::BATCH_SIZE, "role" => "gateway"),
            own,
            breaker,
            deadline,
        });
        tokio::spawn(batch_loop(script.clone(), queue));
        Batcher { jobs, script, deadline }
    }

    /// Script calls made so far (each carries one batch).
    pub(super) fn calls(&self) -> u64 {
        self.script.calls.load(Ordering::Relaxed)
    }

    /// Checks `(full key, policy, cells wanted)` triples (keys of one hash slot; the cells are
    /// taken only when `leases`, else one of each or none), reading `also_get` (a full
    /// key) when given: in the script when it can share the call (one server, or the same slot),
    /// else with a GET of its own sent alongside. A failed separate GET is
    /// [`CacheRead::NotAsked`] (the caller reads it itself).
    pub(super) async fn check(
        &self,
        items: Vec<(String, &Policy, u64)>,
        leases: bool,
        also_get: Option<String>,
    ) -> Result<(Vec<Verdict>, CacheRead), String> {
        let clustered = self.script.client.is_clustered();
        // The slot of the policy keys; a read alone (leased mode) goes to its key's slot.
        let slot = items
            .first()
            .map(|(key, _, _)| key)
            .or(also_get.as_ref())
            .filter(|_| clustered)
            .map(|key| fred::util::redis_keyslot(key.as_bytes()));
        let (inline, apart) = match also_get {
            Some(key) if slot.is_some_and(|s| s != fred::util::redis_keyslot(key.as_bytes())) => {
                (None, Some(key))
            }
            other => (other, None),
        };
        let reads = inline.is_some();
        let script = self.script_check(slot, items, leases, inline);
        let Some(key) = apart else {
            let (verdicts, value) = script.await?;
            let read = if reads {
                value.map_or(CacheRead::Miss, CacheRead::Hit)
            } else {
                CacheRead::NotAsked
            };
            return Ok((verdicts, read));
        };
        let client = self.script.client.clone();
        // Boxed: a Redis command's future is large (12 KB), and this branch (a cluster whose
        // cache entry lives in another slot) would size every check's future, which each
        // request's handler future holds and is copied with.
        let get = Box::pin(
            self.script
                .breaker
                .call(self.deadline, async move { client.get::<Option<Bytes>, _>(key).await }),
        );
        let (verdicts, read) = tokio::join!(script, get);
        let read = match read {
            Ok(value) => value.map_or(CacheRead::Miss, CacheRead::Hit),
            Err(_) => CacheRead::NotAsked,
        };
        Ok((verdicts?.0, read))
    }

    /// Queues one request's script check and waits for its answer.
    async fn script_check(
        &self,
        slot: Option<u16>,
        items: Vec<(String, &Policy, u64)>,
        leases: bool,
        also_get: Option<String>,
    ) -> Answer {
        let (reply, answer) = oneshot::channel();
        let limits = items
            .iter()
            .map(|(_, p, n)| (p.interval_us(), p.tolerance_us(), if leases { *n } else { 1 }))
            .collect();
        let mut keys: Vec<String> = items.into_iter().map(|(k, _, _)| k).collect();
        let reads = also_get.is_some();
        keys.extend(also_get);
        let deadline = Instant::now() + self.deadline;
        let job = Job { slot, keys, limits, reads, leases, deadline, reply };
        let answered = async {
            answer
                .await
                .unwrap_or_else(|_| Err("the rate-limit batching task dropped a check".into()))
        };
        let stopped = || Err("the rate-limit batching task has stopped".into());
        match self.jobs.try_send(job) {
            // Queued: the batching task answers by the deadline (no timer here).
            Ok(()) => answered.await,
            Err(mpsc::error::TrySendError::Closed(_)) => stopped(),
            // A full queue (Redis far behind): waiting for room counts against the deadline.
            Err(mpsc::error::TrySendError::Full(job)) => {
                let queued = async {
                    match self.jobs.send(job).await {
                        Ok(()) => answered.await,
                        Err(_) => stopped(),
                    }
                };
                tokio::time::timeout_at(deadline, queued)
                    .await
                    .unwrap_or_else(|_| late(self.deadline))
            }
        }
    }
}

/// The answer to a check whose deadline passed before Redis answered it.
fn late(deadline: Duration) -> Answer {
    Err(format!("no answer from Redis within {deadline:?}"))
}

/// The client and the script's SHA once loaded (reloaded after a Redis restart forgets it); a
/// std mutex held only to copy or set the SHA.
struct Script {
    client: Client,
    sha: Mutex<Option<Arc<str>>>,
    calls: AtomicU64,
    /// `access_gateway_rate_limit_batch_size`, registered once.
    batch_size: metrics::Histogram,
    /// The client is this task's alone (closed when it ends).
    own: bool,
    /// Every script call goes through it.
    breaker: Arc<Breaker>,
    /// The command timeout.
    deadline: Duration,
}

impl Script {
    fn sha(&self) -> Option<Arc<str>> {
        self.sha.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Loads the script: in a Redis Cluster on the primary of `slot`, where the call goes (each
    /// primary keeps its own script cache, and a replica promoted by a failover starts empty:
    /// its first call answers NOSCRIPT and loads it there).
    async fn load(&self, slot: Option<u16>) -> Result<Arc<str>, fred::error::Error> {
        let sha: String = match slot {
            None => self.client.script_load(SCRIPT).await?,
            Some(slot) => {
                // SCRIPT LOAD names no key: the command is pointed at the slot's primary.
                // (fred's `with_options` does not reach its Lua commands; a custom command
                // carries its own slot.)
                let load = CustomCommand::new_static("SCRIPT", ClusterHash::Custom(slot), false);
                self.client.custom(load, vec!["LOAD", SCRIPT]).await?
            }
        };
        let sha: Arc<str> = sha.into();
        *self.sha.lock().unwrap_or_else(|p| p.into_inner()) = Some(sha.clone());
        Ok(sha)
    }

    /// Runs the script. Keys are `Bytes` inside, so the copy kept for a retry after NOSCRIPT costs
    /// reference counts, not string copies.
    async fn run(
        &self,
        slot: Option<u16>,
        keys: Vec<Key>,
        args: Vec<u64>,
    ) -> Result<Value, fred::error::Error> {
        let sha = match self.sha() {
            Some(sha) => sha,
            None => self.load(slot).await?,
        };
        match self.client.evalsha::<Value, _, _, _>(&*sha, keys.clone(), args.clone()).await {
            Err(e) if e.details().contains("NOSCRIPT") => {
                let sha = self.load(slot).await?;
                self.client.evalsha(&*sha, keys, args).await
            }
            other => other,
        }
    }
}

/// Takes the first waiting check, waits for a free call slot (checks queue meanwhile), then sends
/// everything waiting, up to [`MAX_BATCH`], as one call (in a Redis Cluster, one call per hash
/// slot among them: the in-flight bound then holds back the next batch, not these calls). Checks
/// whose caller gave up are skipped; checks whose deadline passed are answered, not sent.
/// The calls in flight are polled by this task itself (no task per call); when every handle is
/// gone, the calls in flight finish before it ends.
async fn batch_loop(script: Arc<Script>, mut queue: mpsc::Receiver<Job>) {
    let mut running = FuturesUnordered::new();
    loop {
        tokio::select! {
            Some(()) = running.next(), if !running.is_empty() => {}
            job = queue.recv(), if running.len() < IN_FLIGHT => {
                let Some(first) = job else { break };
                let mut batch = Vec::with_capacity(MAX_BATCH);
                let now = Instant::now();
                take(first, now, &mut batch, script.deadline);
                while batch.len() < MAX_BATCH {
                    match queue.try_recv() {
                        Ok(job) => take(job, now, &mut batch, script.deadline),
                        Err(_) => break,
                    }
                }
                for group in by_slot(batch) {
                    running.push(run_batch(&script, group));
                }
            }
        }
    }
    while running.next().await.is_some() {}
    if script.own {
        let _ = script.client.quit().await;
    }
}

/// Adds a queued check to `batch`: skipped when its caller gave up, answered when its deadline
/// passed.
fn take(job: Job, now: Instant, batch: &mut Vec<Job>, timeout: Duration) {
    if job.reply.is_closed() {
        return;
    }
    if job.deadline <= now {
        let _ = job.reply.send(late(timeout));
        return;
    }
    batch.push(job);
}

/// The checks grouped by hash slot, each group in arrival order (one group on one server).
fn by_slot(batch: Vec<Job>) -> Vec<Vec<Job>> {
    let mut groups: Vec<Vec<Job>> = Vec::new();
    for job in batch {
        match groups.iter_mut().find(|g| g[0].slot == job.slot) {
            Some(group) => group.push(job),
            None => groups.push(vec![job]),
        }
    }
    groups
}

/// One script call for checks of one hash slot.
async fn run_batch(script: &Script, batch: Vec<Job>) {
    let slot = batch.first().and_then(|job| job.slot);
    let oldest = batch.iter().map(|job| job.deadline).min().unwrap_or_else(Instant::now);
    let mut keys = Vec::with_capacity(batch.iter().map(|j| j.keys.len()).sum());
    let mut args =
        Vec::with_capacity(1 + batch.iter().map(|j| 3 + 3 * j.limits.len()).sum::<usize>());
    args.push(batch.len() as u64);
    script.calls.fetch_add(1, Ordering::Relaxed);
    script.batch_size.record(batch.len() as f64);
    let mut replies = Vec::with_capacity(batch.len());
    for job in batch {
        args.push(job.limits.len() as u64);
        args.push(u64::from(job.reads));
        args.push(u64::from(job.leases));
        args.extend(job.limits.iter().flat_map(|&(t, tau, n)| [t, tau, n]));
        keys.extend(job.keys.into_iter().map(Key::from));
        replies.push((job.limits.len(), job.reads, job.reply));
    }
    // Under the breaker: a call Redis does not answer within `trip_after` fails (each check
    // then follows `on_store_error`) and opens it, so later checks skip Redis at once.
    // The script call's future (fred's, a retry on NOSCRIPT included) is large: boxed where it
    // is made, it is copied once, not again with every future that holds it (the breaker's
    // timeout, this batch, the running set). Measured: 39k instructions per batch otherwise.
    // The oldest check's deadline bounds the call (every check is answered by its own). A call
    // cut short by it counts as unanswered for the breaker too: that happens only when checks
    // waited in the queue for most of the timeout, and the bound on every queued check rests on
    // each call ending by its oldest check's deadline.
    let left = oldest.saturating_duration_since(Instant::now());
    let call = Box::pin(script.run(slot, keys, args));
    let outcome = script.breaker.call(left.min(script.deadline), call).await;
    match outcome {
        Ok(Value::Array(answers)) if answers.len() == replies.len() => {
            for (answer, (policies, reads, reply)) in answers.into_iter().zip(replies) {
                let _ = reply.send(parse_answer(answer, policies, reads));
            }
        }
        outcome => {
            let error = match outcome {
                Err(e) => e.to_string(),
                Ok(other) => format!("unexpected script answer: {:?}", other.kind()),
            };
            for (_, _, reply) in replies {
                let _ = reply.send(Err(error.clone()));
            }
        }
    }
}

/// One request's answer: four integers per policy (the first the cells granted), then, when a
/// key was read, its value or nil.
fn parse_answer(raw: Value, policies: usize, read: bool) -> Answer {
    let mut values = match raw {
        Value::Array(values) if values.len() == policies * 4 + usize::from(read) => values,
        other => return Err(format!("unexpected script answer: {:?}", other.kind())),
    };
    let value = match read.then(|| values.pop()).flatten() {
        None | Some(Value::Null) => None,
        Some(Value::Bytes(b)) => Some(b),
        Some(Value::String(s)) => Some(s.into_inner()),
        Some(other) => return Err(format!("unexpected cached value: {:?}", other.kind())),
    };
    let ints = values
        .iter()
        .map(|v| v.as_i64().ok_or_else(|| format!("unexpected script answer: {:?}", v.kind())))
        .collect::<Result<Vec<i64>, String>>()?;
    let verdicts = ints
        .chunks(4)
        .map(|c| Verdict {
            allowed: c[0] >= 1,
            granted: c[0].max(0) as u64,
            remaining: c[1].max(0) as u64,
            reset_us: c[2].max(0) as u64,
            retry_us: c[3].max(0) as u64,
        })
        .collect();
    Ok((verdicts, value))
}
