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
//! many timeouts. A check that gave up is dropped from the queue, not sent.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use fred::prelude::{ClientLike, LuaInterface};
use fred::types::Key;
use fred::types::Value;
use futures::stream::{FuturesUnordered, StreamExt};
use tokio::sync::{mpsc, oneshot};

use super::{Policy, Verdict};
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
pub(super) type Answer = Result<(Vec<Verdict>, Option<Bytes>), String>;

/// One request's check.
struct Job {
    /// Full keys, one per policy, then the cache entry's when `reads`.
    keys: Vec<String>,
    /// `(T, tau)` per policy, in µs.
    limits: Vec<(u64, u64)>,
    reads: bool,
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

    /// Checks `(full key, policy)` pairs, reading `also_get` (a full key) when given.
    pub(super) async fn check(
        &self,
        items: Vec<(String, &Policy)>,
        also_get: Option<String>,
    ) -> Answer {
        let (reply, answer) = oneshot::channel();
        let limits = items.iter().map(|(_, p)| (p.interval_us(), p.tolerance_us())).collect();
        let mut keys: Vec<String> = items.into_iter().map(|(k, _)| k).collect();
        let reads = also_get.is_some();
        keys.extend(also_get);
        let job = Job { keys, limits, reads, reply };
        let answered = async {
            if self.jobs.send(job).await.is_err() {
                return Err("the rate-limit batching task has stopped".into());
            }
            answer
                .await
                .unwrap_or_else(|_| Err("the rate-limit batching task dropped a check".into()))
        };
        tokio::time::timeout(self.deadline, answered)
            .await
            .unwrap_or_else(|_| Err(format!("no answer from Redis within {:?}", self.deadline)))
    }
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

    async fn load(&self) -> Result<Arc<str>, fred::error::Error> {
        let sha: String = self.client.script_load(SCRIPT).await?;
        let sha: Arc<str> = sha.into();
        *self.sha.lock().unwrap_or_else(|p| p.into_inner()) = Some(sha.clone());
        Ok(sha)
    }

    /// Runs the script. Keys are `Bytes` inside, so the copy kept for a retry after NOSCRIPT costs
    /// reference counts, not string copies.
    async fn run(&self, keys: Vec<Key>, args: Vec<u64>) -> Result<Value, fred::error::Error> {
        let sha = match self.sha() {
            Some(sha) => sha,
            None => self.load().await?,
        };
        match self.client.evalsha::<Value, _, _, _>(&*sha, keys.clone(), args.clone()).await {
            Err(e) if e.details().contains("NOSCRIPT") => {
                let sha = self.load().await?;
                self.client.evalsha(&*sha, keys, args).await
            }
            other => other,
        }
    }
}

/// Takes the first waiting check, waits for a free call slot (checks queue meanwhile), then sends
/// everything waiting, up to [`MAX_BATCH`], as one call. Checks whose caller gave up are skipped.
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
                batch.extend(Some(first).filter(|job| !job.reply.is_closed()));
                while batch.len() < MAX_BATCH {
                    match queue.try_recv() {
                        Ok(job) if job.reply.is_closed() => {}
                        Ok(job) => batch.push(job),
                        Err(_) => break,
                    }
                }
                if !batch.is_empty() {
                    running.push(run_batch(&script, batch));
                }
            }
        }
    }
    while running.next().await.is_some() {}
    if script.own {
        let _ = script.client.quit().await;
    }
}

async fn run_batch(script: &Script, batch: Vec<Job>) {
    let mut keys = Vec::with_capacity(batch.iter().map(|j| j.keys.len()).sum());
    let mut args =
        Vec::with_capacity(1 + batch.iter().map(|j| 2 + 2 * j.limits.len()).sum::<usize>());
    args.push(batch.len() as u64);
    script.calls.fetch_add(1, Ordering::Relaxed);
    script.batch_size.record(batch.len() as f64);
    let mut replies = Vec::with_capacity(batch.len());
    for job in batch {
        args.push(job.limits.len() as u64);
        args.push(u64::from(job.reads));
        args.extend(job.limits.iter().flat_map(|&(t, tau)| [t, tau]));
        keys.extend(job.keys.into_iter().map(Key::from));
        replies.push((job.limits.len(), job.reads, job.reply));
    }
    // Under the breaker: a call Redis does not answer within `trip_after` fails (each check
    // then follows `on_store_error`) and opens it, so later checks skip Redis at once.
    // The script call's future (fred's, a retry on NOSCRIPT included) is large: boxed where it
    // is made, it is copied once, not again with every future that holds it (the breaker's
    // timeout, this batch, the running set). Measured: 39k instructions per batch otherwise.
    let call = Box::pin(script.run(keys, args));
    let outcome = script.breaker.call(script.deadline, call).await;
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

/// One request's answer: four integers per policy, then, when a key was read, its value or nil.
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
            allowed: c[0] == 1,
            remaining: c[1].max(0) as u64,
            reset_us: c[2].max(0) as u64,
            retry_us: c[3].max(0) as u64,
        })
        .collect();
    Ok((verdicts, value))
}
