//! The hub: every open connection of this replica, their subscriptions, and the fan-out of each
//! record to the subscribers that may see it.
//!
//! A record is rendered to its data frame once and the same bytes go to every recipient: written
//! straight to a WebSocket connection's socket (its [`super::outbox`]), or queued for an SSE
//! connection's task. Both are bounded; when a record finds the bound reached, the connection is
//! closed with `slow_consumer` and the record counted as dropped for it: a slow client never
//! slows the others, and memory never grows with its backlog. Dispatch never waits.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::fanout::{Fanout, Tally};
use super::gate::{self, RecordCheck};
use super::names;
use super::protocol::Close;
use super::topics::{Filter, TopicSpec};
use crate::auth::revocation::Revocation;
use crate::auth::{AuthError, Verifier};
use crate::policy::mirror::Mirror;
use crate::ratelimit::{LocalGcra, Policy};
use crate::server::Shutdown;

/// A connection's number on this replica.
pub type ConnId = u64;

/// (tenant, topic), the key of usage counts.
type TenantTopic = (Arc<str>, Arc<str>);

use super::conn::Sink;
pub use super::conn::{Closer, Conn, Credential, Delivery, Record, Scope};

/// The hub's counters and subscriptions (`GET /stats`).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct HubStats {
    /// Open connections on this replica.
    pub connections: usize,
    /// Users with an open connection.
    pub users: usize,
    /// Tenants with an open connection.
    pub tenants: usize,
    /// Subscriptions per registry topic.
    pub subscriptions: BTreeMap<String, usize>,
    /// Frames queued to connections since start.
    pub messages_queued: u64,
    /// Frames dropped (not entitled, filtered out of a closed connection, ...).
    pub messages_dropped: u64,
    /// Connections closed as slow consumers.
    pub slow_consumer_closes: u64,
    /// The limits in force.
    pub limits: LimitsInForce,
}

/// The hub's limits as `GET /stats` shows them: [`Limits`] field for field (a config type
/// whose every field has a default, which API documents cannot carry for an object field).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct LimitsInForce {
    /// Open connections on this replica.
    pub max_connections: usize,
    /// Open connections of one user on this replica.
    pub max_connections_per_user: usize,
    /// Open connections of one tenant on this replica.
    pub max_connections_per_tenant: usize,
    /// New connections accepted by this replica (a GCRA policy).
    pub connect_rate: Policy,
    /// Frames waiting per connection before it is closed as a slow consumer.
    pub send_queue: usize,
}

/// The hub's limits.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Open connections on this replica.
    pub max_connections: usize,
    /// Open connections of one user on this replica.
    pub max_connections_per_user: usize,
    /// Open connections of one tenant on this replica.
    pub max_connections_per_tenant: usize,
    /// New connections accepted by this replica (a GCRA policy).
    pub connect_rate: Policy,
    /// Frames waiting per connection (an SSE connection's queue, a WebSocket connection's
    /// outbox) before it is closed as a slow consumer.
    pub send_queue: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 20_000,
            max_connections_per_user: 50,
            max_connections_per_tenant: 5_000,
            connect_rate: Policy {
                rate: 500,
                period: std::time::Duration::from_secs(1),
                burst: 1000,
            },
            send_queue: 1024,
        }
    }
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The replica is full.
    Replica,
    /// The user has too many.
    User,
    /// The tenant has too many.
    Tenant,
}

impl Refusal {
    /// The metric label and message fragment.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Replica => "replica_limit",
            Refusal::User => "user_limit",
            Refusal::Tenant => "tenant_limit",
        }
    }
}

struct Sub {
    conn: Arc<Conn>,
    filter: Option<Filter>,
}

/// The hub. Shared as `Arc<Hub>`.
pub struct Hub {
    /// This replica's id, the prefix of connection ids.
    replica: String,
    /// Per partition, the offset after the last record dispatched: where a subscription made
    /// now starts. Written by dispatch under the `subs` read lock and read by subscribe under
    /// its write lock, so a record is either before a new subscription's start or delivered
    /// to it, never both and never neither.
    heads: Mutex<HashMap<(Arc<str>, i32), i64>>,
    registry: HashMap<String, TopicSpec>,
    /// The per-record check of each topic that has one.
    record_checks: HashMap<String, RecordCheck>,
    /// The rules every subscription and record is decided by (set once by `build`; a hub
    /// without it checks no record).
    rules: std::sync::OnceLock<Arc<Mirror>>,
    order: Vec<String>,
    limits: Limits,
    /// topic -> connection -> subscription. Read by every dispatch, written by (un)subscribe; a
    /// std lock never held across an await.
    subs: RwLock<HashMap<Arc<str>, HashMap<ConnId, Sub>>>,
    /// Every open connection, and the counts per user and tenant that the limits read. One std
    /// mutex for the three so admission is one atomic decision.
    conns: Mutex<Registry>,
    connect_gate: LocalGcra,
    next_id: AtomicU64,
    open: AtomicUsize,
    delivered: AtomicU64,
    dropped: AtomicU64,
    slow_closes: AtomicU64,
    /// Frames queued per (tenant, topic) since the last usage push. A std mutex taken once per
    /// record (not per recipient), never across I/O.
    usage: Mutex<HashMap<TenantTopic, u64>>,
}

#[derive(Default)]
struct Registry {
    all: HashMap<ConnId, Arc<Conn>>,
    per_user: HashMap<String, usize>,
    per_tenant: HashMap<Arc<str>, usize>,
}

/// An admitted connection: its handle and, for SSE, its queue. Dropping it removes the
/// connection and its subscriptions from the hub.
pub struct Registration {
    hub: Arc<Hub>,
    /// The connection.
    pub conn: Arc<Conn>,
    /// An SSE connection's outgoing queue (a WebSocket connection's frames go to its socket).
    pub queue: Option<mpsc::Receiver<Delivery>>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.hub.remove(&self.conn);
    }
}

impl Hub {
    /// A hub for these topics and limits.
    pub fn new(topics: &[TopicSpec], limits: Limits) -> Arc<Self> {
        Arc::new(Hub {
            replica: uuid::Uuid::new_v4().simple().to_string()[..8].to_string(),
            heads: Mutex::default(),
            registry: topics.iter().map(|t| (t.name.clone(), t.clone())).collect(),
            record_checks: topics
                .iter()
                .filter_map(|t| Some((t.name.clone(), RecordCheck::of(t)?)))
                .collect(),
            rules: std::sync::OnceLock::new(),
            order: topics.iter().map(|t| t.name.clone()).collect(),
            limits,
            subs: RwLock::default(),
            conns: Mutex::default(),
            connect_gate: LocalGcra::new(),
            next_id: AtomicU64::new(1),
            open: AtomicUsize::new(0),
            delivered: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            slow_closes: AtomicU64::new(0),
            usage: Mutex::default(),
        })
    }

    /// The registry entry of `topic`.
    pub fn topic(&self, topic: &str) -> Option<&TopicSpec> {
        self.registry.get(topic)
    }

    /// The registry, in configuration order.
    pub fn topics(&self) -> impl Iterator<Item = &TopicSpec> {
        self.order.iter().filter_map(|t| self.registry.get(t))
    }

    /// Whether one more connection may start now (the replica's connection rate); `Err` holds
    /// the seconds to wait.
    pub fn connect_allowed(&self) -> Result<(), u64> {
        let verdict = self.connect_gate.check(&[("connect".into(), &self.limits.connect_rate)]);
        match verdict.first() {
            Some(v) if !v.allowed => Err(v.retry_us.div_ceil(1_000_000).max(1)),
            _ => Ok(()),
        }
    }

    /// Admits a connection of this credential, within the limits.
    pub fn admit(
        self: &Arc<Self>,
        transport: &'static str,
        credential: Credential,
    ) -> Result<Registration, Refusal> {
        let identity = &credential.verified.identity;
        let mut reg = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        // One shared name per tenant: dispatch tells tenants apart by pointer.
        let tenant: Arc<str> = match reg.per_tenant.get_key_value(identity.tenant.as_str()) {
            Some((name, _)) => name.clone(),
            None => identity.tenant.as_str().into(),
        };
        if reg.all.len() >= self.limits.max_connections {
            return Err(Refusal::Replica);
        }
        if reg.per_user.get(&identity.subject).copied().unwrap_or(0)
            >= self.limits.max_connections_per_user
        {
            return Err(Refusal::User);
        }
        if reg.per_tenant.get(&tenant).copied().unwrap_or(0)
            >= self.limits.max_connections_per_tenant
        {
            return Err(Refusal::Tenant);
        }
        // A WebSocket connection needs no queue (the hub writes its socket): not allocating one
        // keeps a few KB off every connection.
        let (sink, queue) = if transport == "ws" {
            (Sink::Socket(std::sync::OnceLock::new()), None)
        } else {
            let (tx, rx) = mpsc::channel(self.limits.send_queue.max(1));
            (Sink::Queue(tx), Some(rx))
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Conn {
            id,
            // The counter finds the connection; the random part (122 bits) makes the id
            // impossible to guess, so one client cannot name another's connection.
            public_id: format!("{}-{id}-{}", self.replica, uuid::Uuid::new_v4().simple()),
            positions: Mutex::default(),
            transport,
            subject: identity.subject.clone(),
            tenant: tenant.clone(),
            credential: Mutex::new(credential),
            closer: Closer::default(),
            sink,
            delivered: AtomicU64::new(0),
            memo: Mutex::default(),
        });
        *reg.per_user.entry(conn.subject.clone()).or_default() += 1;
        *reg.per_tenant.entry(tenant).or_default() += 1;
        reg.all.insert(conn.id, conn.clone());
        let open = self.open.fetch_add(1, Ordering::Relaxed) + 1;
        metrics::gauge!(names::CONNECTIONS, "role" => "stream", "transport" => transport)
            .increment(1.0);
        drop(reg);
        tracing::debug!(role = "stream", conn = conn.id, open, "connection admitted");
        Ok(Registration { hub: self.clone(), conn, queue })
    }

    fn remove(&self, conn: &Conn) {
        let topics: Vec<Arc<str>> = {
            let mut subs = self.subs.write().unwrap_or_else(|p| p.into_inner());
            let mut left = Vec::new();
            for (topic, by_conn) in subs.iter_mut() {
                if by_conn.remove(&conn.id).is_some() {
                    left.push(topic.clone());
                }
            }
            left
        };
        for topic in topics {
            metrics::gauge!(names::SUBSCRIPTIONS, "role" => "stream", "topic" => topic.to_string())
                .decrement(1.0);
        }
        let mut reg = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        if reg.all.remove(&conn.id).is_none() {
            return;
        }
        decrement(&mut reg.per_user, &conn.subject);
        decrement(&mut reg.per_tenant, &conn.tenant);
        self.open.fetch_sub(1, Ordering::Relaxed);
        metrics::gauge!(names::CONNECTIONS, "role" => "stream", "transport" => conn.transport)
            .decrement(1.0);
    }

    /// This replica's id (the prefix of its connection ids).
    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// A connection of this replica by its public id (`<replica>-<n>-<random>`): the whole id
    /// must match, the random part included.
    pub fn find(&self, public_id: &str) -> Option<Arc<Conn>> {
        let rest = public_id.strip_prefix(&self.replica)?.strip_prefix('-')?;
        let id: ConnId = rest.split('-').next()?.parse().ok()?;
        let conn = self.conns.lock().unwrap_or_else(|p| p.into_inner()).all.get(&id).cloned()?;
        let same = conn.public_id.len() == public_id.len()
            && conn.public_id.bytes().zip(public_id.bytes()).fold(0u8, |d, (a, b)| d | (a ^ b))
                == 0;
        same.then_some(conn)
    }

    /// Where a partition's next record will be (consumers set it when they start or start over).
    pub fn set_head(&self, topic: &str, partition: i32, next: i64) {
        self.heads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((topic.into(), partition), next);
    }

    /// Whether a partition's head is known (its consumer has started): a subscription made
    /// before would get a position without the partition, from which no resume could tell what
    /// it missed.
    pub fn has_head(&self, topic: &str, partition: i32) -> bool {
        self.heads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&(Arc::<str>::from(topic), partition))
    }

    /// Subscribes `conn` to a registry topic (replacing its filter if already subscribed).
    /// Returns the topic's partitions and where live delivery starts on each: a new
    /// subscription's position starts there.
    pub fn subscribe(
        &self,
        conn: &Arc<Conn>,
        topic: &str,
        filter: Option<Filter>,
    ) -> Vec<(i32, i64)> {
        let Some(spec) = self.registry.get(topic) else { return Vec::new() };
        let mut subs = self.subs.write().unwrap_or_else(|p| p.into_inner());
        let heads: Vec<(i32, i64)> = self
            .heads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|((t, _), _)| **t == *topic)
            .map(|((_, p), next)| (*p, *next))
            .collect();
        let by_conn = subs.entry(spec.name.as_str().into()).or_default();
        if by_conn.insert(conn.id, Sub { conn: conn.clone(), filter }).is_none() {
            metrics::gauge!(names::SUBSCRIPTIONS, "role" => "stream", "topic" => spec.name.clone())
                .increment(1.0);
            let mut positions = conn.positions.lock().unwrap_or_else(|p| p.into_inner());
            for (partition, next) in &heads {
                positions.insert((spec.name.as_str().into(), *partition), *next);
            }
        }
        heads
    }

    /// Whether `conn`'s subscription lets `record` through (subscribed, tenant, filter, and the
    /// connection's entitlement to the record's resource).
    pub fn accepts(&self, conn: &Conn, record: &Record) -> bool {
        let subs = self.subs.read().unwrap_or_else(|p| p.into_inner());
        let Some(sub) = subs.get(&record.topic).and_then(|by_conn| by_conn.get(&conn.id)) else {
            return false;
        };
        record.visible_to(&conn.tenant)
            && sub.filter.as_ref().is_none_or(|f| f.matches(&record.data))
            && self.record_gate(record).is_none_or(|g| g.admits(conn))
    }

    /// Hands the hub the rules it decides by.
    pub fn set_rules(&self, rules: Arc<Mirror>) {
        let _ = self.rules.set(rules);
    }

    /// The per-record check of `record`, if its topic has one: its resource rendered once, and
    /// the snapshot it is decided at.
    fn record_gate<'a>(&'a self, record: &Record) -> Option<RecordGate<'a>> {
        let check = self.record_checks.get(&*record.topic)?;
        let rules = self.rules.get()?;
        Some(RecordGate {
            rules,
            snapshot: rules.snapshot(),
            resource: check.template.render(&record.data),
            action: &check.action,
        })
    }

    /// Checks every open subscription against the rules in force (after a rules change), ends
    /// those no longer allowed and tells their clients (`unsubscribed`, reason `not_entitled`).
    /// Returns the number ended.
    pub fn reevaluate(&self) -> usize {
        let Some(rules) = self.rules.get() else { return 0 };
        let snapshot = rules.snapshot();
        let subscribed: Vec<(Arc<str>, Arc<Conn>)> = {
            let subs = self.subs.read().unwrap_or_else(|p| p.into_inner());
            subs.iter()
                .flat_map(|(topic, by_conn)| {
                    by_conn.values().map(move |s| (topic.clone(), s.conn.clone()))
                })
                .collect()
        };
        let mut ended = 0;
        for (topic, conn) in subscribed {
            let Some(spec) = self.registry.get(&*topic) else { continue };
            if gate::allowed(&conn, rules, &snapshot, &spec.resource, &spec.action) {
                continue;
            }
            if self.unsubscribe(&conn, &topic) {
                let message = format!("no longer entitled to {} {}", spec.action, spec.resource);
                gate::tell_unsubscribed(&conn, &topic, "not_entitled", &message);
                ended += 1;
            }
        }
        ended
    }

    /// Re-evaluates the open subscriptions whenever the rules move to a new version (or a rule
    /// expires), until shutdown (records are decided at the new version from the first one after the change).
    pub fn follow_rules(self: &Arc<Self>, shutdown: Shutdown) {
        let Some(rules) = self.rules.get().cloned() else { return };
        let mut versions = rules.applied();
        let hub = self.clone();
        tokio::spawn(async move {
            loop {
                // A rule that expires changes decisions without a new version.
                let expiry = rules.snapshot().next_expiry(chrono::Utc::now()).map(|at| {
                    let left = (at - chrono::Utc::now()).to_std().unwrap_or_default();
                    tokio::time::Instant::now() + left + std::time::Duration::from_millis(1)
                });
                let far = tokio::time::Instant::now() + std::time::Duration::from_secs(3600);
                tokio::select! {
                    changed = versions.changed() => if changed.is_err() { return },
                    _ = tokio::time::sleep_until(expiry.unwrap_or(far).min(far)) => {}
                    _ = shutdown.stopping() => return,
                }
                let version = *versions.borrow_and_update();
                let ended = hub.reevaluate();
                if ended > 0 {
                    tracing::info!(
                        role = "stream",
                        version,
                        ended,
                        "rules change ended subscriptions"
                    );
                }
            }
        });
    }

    /// Removes a subscription; whether there was one.
    pub fn unsubscribe(&self, conn: &Conn, topic: &str) -> bool {
        let mut subs = self.subs.write().unwrap_or_else(|p| p.into_inner());
        let removed = subs.get_mut(topic).and_then(|by_conn| by_conn.remove(&conn.id)).is_some();
        if removed {
            conn.positions
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|(t, _), _| **t != *topic);
            metrics::gauge!(names::SUBSCRIPTIONS, "role" => "stream", "topic" => topic.to_string())
                .decrement(1.0);
        }
        removed
    }

    /// The topics `conn` is subscribed to.
    pub fn subscriptions(&self, conn: &Conn) -> Vec<String> {
        let subs = self.subs.read().unwrap_or_else(|p| p.into_inner());
        let mut topics: Vec<String> = subs
            .iter()
            .filter(|(_, by_conn)| by_conn.contains_key(&conn.id))
            .map(|(t, _)| t.to_string())
            .collect();
        topics.sort();
        topics
    }

    /// Sends `record` to every subscriber of its topic that may see it: the record's tenant (if
    /// any) must be the connection's, and the subscription's filter must pass. Dispatch never
    /// waits.
    ///
    /// The recipients are chosen under the `subs` read lock, together with the partition's head
    /// (so a subscription made meanwhile gets the record either live or by its resume, never
    /// both). The frame is made once. A WebSocket recipient's socket is written right here while
    /// tokio's cooperative budget of this task lasts (about a hundred writes); the rest of a
    /// large fan-out is left pending in each outbox and written by the connections' own tasks,
    /// spread over the worker threads. Measured at ten thousand connections, that split costs
    /// less CPU per delivery than writing them all from one task, or from one task per worker
    /// thread (`make bench-stream`).
    pub fn dispatch(&self, record: &Record) {
        let subs = self.subs.read().unwrap_or_else(|p| p.into_inner());
        {
            let mut heads = self.heads.lock().unwrap_or_else(|p| p.into_inner());
            let head = heads.entry((record.topic.clone(), record.partition)).or_insert(0);
            *head = (*head).max(record.offset + 1);
        }
        let Some(by_conn) = subs.get(&record.topic) else { return };
        if record.scope() == Scope::Nobody {
            drop(subs);
            metrics::counter!(names::MESSAGES_DROPPED, "role" => "stream", "topic" => record.topic.to_string(), "reason" => "invalid_tenant").increment(1);
            return;
        }
        let gate = self.record_gate(record);
        if gate.as_ref().is_some_and(|g| g.resource.is_none()) {
            // The record lacks a field of its topic's `record_resource`: no one may read it.
            drop(subs);
            metrics::counter!(names::MESSAGES_DROPPED, "role" => "stream", "topic" => record.topic.to_string(), "reason" => "no_record_resource").increment(1);
            return;
        }
        let mut fanout: Option<Fanout> = None;
        let mut tally = Tally::default();
        for sub in by_conn.values() {
            if !record.visible_to(&sub.conn.tenant)
                || sub.filter.as_ref().is_some_and(|f| !f.matches(&record.data))
            {
                continue;
            }
            if gate.as_ref().is_some_and(|g| !g.admits(&sub.conn)) {
                continue;
            }
            fanout.get_or_insert_with(|| Fanout::new(record)).deliver(&sub.conn, &mut tally);
        }
        drop(subs);
        self.account(record, tally);
    }

    /// Tells every subscriber of `topic` something about the topic itself (not a record):
    /// `frame` on WebSocket, an SSE event named `event`. Never waits; a connection whose backlog
    /// is full misses the notice (it is behind anyway).
    pub fn notify(&self, topic: &str, event: &'static str, frame: String) {
        let subs = self.subs.read().unwrap_or_else(|p| p.into_inner());
        let Some((topic, by_conn)) = subs.get_key_value(topic) else { return };
        let text = tokio_tungstenite::tungstenite::Utf8Bytes::from(frame);
        for sub in by_conn.values() {
            match &sub.conn.sink {
                super::conn::Sink::Socket(socket) => {
                    if let Some(outbox) = socket.get() {
                        // A notice moves no position: written as a reply, not a data frame.
                        let _ = outbox.reply(|| text.as_str().to_owned());
                    }
                }
                super::conn::Sink::Queue(queue) => {
                    let _ = queue.try_send(Delivery {
                        frame: text.clone(),
                        topic: topic.clone(),
                        partition: -1,
                        offset: -1,
                        timestamp_ms: 0,
                        notice: Some(event),
                    });
                }
            }
        }
    }

    /// Counts a fan-out: per tenant for usage, slow consumers, and the metrics.
    fn account(&self, record: &Record, tally: Tally) {
        if !tally.per_tenant.is_empty() {
            let mut usage = self.usage.lock().unwrap_or_else(|p| p.into_inner());
            for (tenant, n) in tally.per_tenant {
                *usage.entry((tenant, record.topic.clone())).or_default() += n;
            }
        }
        if tally.delivered > 0 {
            self.delivered.fetch_add(tally.delivered, Ordering::Relaxed);
            metrics::counter!(names::MESSAGES_QUEUED, "role" => "stream", "topic" => record.topic.to_string()).increment(tally.delivered);
        }
        if tally.written > 0 {
            // Written (or buffered in order) by the fan-out itself: counted here, once per record.
            metrics::counter!(names::MESSAGES_DELIVERED, "role" => "stream", "transport" => "ws", "topic" => record.topic.to_string()).increment(tally.written);
            let latency = (chrono::Utc::now().timestamp_millis() - record.timestamp_ms).max(0);
            metrics::histogram!(names::DELIVERY_LATENCY, "role" => "stream", "transport" => "ws")
                .record_many(latency as f64 / 1000.0, tally.written as usize);
        }
        if tally.dropped > 0 {
            self.dropped.fetch_add(tally.dropped, Ordering::Relaxed);
            metrics::counter!(names::MESSAGES_DROPPED, "role" => "stream", "topic" => record.topic.to_string(), "reason" => "slow_consumer").increment(tally.dropped);
        }
        for transport in tally.slow {
            self.slow_closes.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(names::SLOW_CONSUMER_CLOSES, "role" => "stream", "transport" => transport).increment(1);
        }
    }

    /// Closes the connections a revocation names.
    pub fn revoke(&self, revocation: &Revocation) -> usize {
        let conns: Vec<Arc<Conn>> =
            self.conns.lock().unwrap_or_else(|p| p.into_inner()).all.values().cloned().collect();
        let mut closed = 0;
        for conn in conns {
            let c = conn.credential();
            let hit = match revocation {
                Revocation::Token { hash, .. } => &c.verified.token_hash == hash,
                Revocation::User { subject, not_before } => {
                    &conn.subject == subject
                        && c.verified.info.iat.is_none_or(|iat| iat <= *not_before)
                }
                Revocation::ApiKey { id } => conn.subject == format!("apikey:{id}"),
                Revocation::Resync => false,
            };
            if hit {
                conn.closer.close(Close::Revoked);
                closed += 1;
            }
        }
        closed
    }

    /// Re-verifies every connection's token (announcements may have been missed) and closes
    /// those now refused.
    pub async fn reverify(&self, verifier: &Verifier) {
        let conns: Vec<Arc<Conn>> =
            self.conns.lock().unwrap_or_else(|p| p.into_inner()).all.values().cloned().collect();
        for conn in conns {
            let token = conn.credential().token;
            match verifier.verify(&token).await {
                Err(AuthError::Rejected(crate::auth::Reason::Expired)) => {
                    conn.closer.close(Close::TokenExpired)
                }
                Err(AuthError::Rejected(_)) => conn.closer.close(Close::Revoked),
                // Unavailable: keep the connection; the next announcement or resync decides.
                Ok(_) | Err(AuthError::Unavailable(_)) => {}
            }
        }
    }

    /// Applies revocation announcements until shutdown.
    pub fn follow_revocations(
        self: &Arc<Self>,
        mut announcements: tokio::sync::broadcast::Receiver<Revocation>,
        verifier: Arc<Verifier>,
        shutdown: Shutdown,
    ) {
        use tokio::sync::broadcast::error::RecvError;
        let hub = self.clone();
        tokio::spawn(async move {
            loop {
                let revocation = tokio::select! {
                    r = announcements.recv() => match r {
                        Ok(r) => r,
                        Err(RecvError::Lagged(_)) => Revocation::Resync,
                        Err(RecvError::Closed) => return,
                    },
                    _ = shutdown.stopping() => return,
                };
                if revocation == Revocation::Resync {
                    hub.reverify(&verifier).await;
                } else {
                    let n = hub.revoke(&revocation);
                    if n > 0 {
                        tracing::info!(
                            role = "stream",
                            closed = n,
                            "revocation closed connections"
                        );
                    }
                }
            }
        });
    }

    /// The usage since the last call, as points for the metrics role
    /// (`access_usage_messages_total{tenant_id, topic}`), and the number of messages they count.
    pub fn take_usage(&self) -> (Vec<Value>, u64) {
        let usage = std::mem::take(&mut *self.usage.lock().unwrap_or_else(|p| p.into_inner()));
        let total = usage.values().sum();
        let points = usage
            .into_iter()
            .map(|((tenant, topic), n)| {
                json!({"name": "access_usage_messages_total", "type": "counter", "value": n,
                    "tenant_id": &*tenant, "labels": {"topic": &*topic}})
            })
            .collect();
        (points, total)
    }

    /// The open connections of one user on this replica, ordered by id.
    pub fn connections_of(&self, subject: &str) -> Vec<Arc<Conn>> {
        let mut conns: Vec<Arc<Conn>> = self
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .all
            .values()
            .filter(|c| c.subject == subject)
            .cloned()
            .collect();
        conns.sort_by_key(|c| c.id);
        conns
    }

    /// Open connections.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// The counters and subscriptions of `GET /stats`.
    pub fn stats(&self) -> HubStats {
        let per_topic: BTreeMap<String, usize> = {
            let subs = self.subs.read().unwrap_or_else(|p| p.into_inner());
            self.order
                .iter()
                .map(|t| (t.clone(), subs.get(t.as_str()).map_or(0, HashMap::len)))
                .collect()
        };
        let (users, tenants) = {
            let reg = self.conns.lock().unwrap_or_else(|p| p.into_inner());
            (reg.per_user.len(), reg.per_tenant.len())
        };
        HubStats {
            connections: self.open(),
            users,
            tenants,
            subscriptions: per_topic,
            messages_queued: self.delivered.load(Ordering::Relaxed),
            messages_dropped: self.dropped.load(Ordering::Relaxed),
            slow_consumer_closes: self.slow_closes.load(Ordering::Relaxed),
            limits: LimitsInForce {
                max_connections: self.limits.max_connections,
                max_connections_per_user: self.limits.max_connections_per_user,
                max_connections_per_tenant: self.limits.max_connections_per_tenant,
                connect_rate: self.limits.connect_rate.clone(),
                send_queue: self.limits.send_queue,
            },
        }
    }
}

/// One record's entitlement check: its resource and the snapshot it is decided at.
struct RecordGate<'a> {
    rules: &'a Mirror,
    snapshot: Arc<crate::policy::eval::Snapshot>,
    /// `None`: the record lacks a field of the template and reaches no one.
    resource: Option<String>,
    action: &'a str,
}

impl RecordGate<'_> {
    fn admits(&self, conn: &Conn) -> bool {
        self.resource.as_deref().is_some_and(|resource| {
            gate::allowed(conn, self.rules, &self.snapshot, resource, self.action)
        })
    }
}

fn decrement<K>(counts: &mut HashMap<<K as ToOwned>::Owned, usize>, key: &K)
where
    K: ToOwned + std::hash::Hash + Eq + ?Sized,
    <K as ToOwned>::Owned: std::hash::Hash + Eq + std::borrow::Borrow<K>,
{
    if let Some(n) = counts.get_mut(key) {
        *n -= 1;
        if *n == 0 {
            counts.remove(key);
        }
    }
}
