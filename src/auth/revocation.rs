//! Revoked tokens and users, and the user records verifiers keep.
//!
//! Redis (shared by every replica and role) when `redis_url` is set, in memory otherwise. Keys
//! (`docs/contracts.md`): `revoked:token:<sha256>` until the token's `exp`,
//! `revoked:user:<subject>` = not-before (unix s) for `auth.max_token_lifetime`, and
//! `user:<subject>` (last seen, tenant, roles) for 30 days. Every revocation is announced on the
//! `revocations` channel; verifiers drop what they cached, so a revocation is honoured everywhere
//! within the pub/sub delay.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fred::prelude::{ClientLike, Expiration, HashesInterface, KeysInterface, PubsubInterface};
use fred::types::{ClusterHash, CustomCommand};
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use super::{unix_now, Identity};
use crate::backends::breaker::CallError;
use crate::backends::redis::{Client, Guarded};
use crate::error::ApiError;
use crate::server::Shutdown;

/// A revocation, as stored and announced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Revocation {
    /// One token (by hash) until it expires.
    Token {
        /// Hex SHA-256 of the token.
        hash: String,
        /// The token's `exp`.
        until: u64,
    },
    /// Every token of `subject` issued at or before `not_before`.
    User {
        /// The user.
        subject: String,
        /// Unix seconds.
        not_before: u64,
    },
    /// Announcements may have been missed (the subscriber reconnected): drop every cached
    /// verification.
    Resync,
    /// An API key was revoked or rotated: every verifier drops its cached record (nothing is
    /// stored; the key's record in PostgreSQL is the truth).
    ApiKey {
        /// The key id.
        id: String,
    },
}

/// What `GET /auth/users/{id}` shows.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct UserRecord {
    /// The user.
    pub user_id: String,
    /// Tenant at last sight.
    pub tenant_id: Option<String>,
    /// Roles at last sight.
    pub roles: Vec<String>,
    /// Unix seconds of the last verified request (sampled: at most once a minute per process).
    pub last_seen: Option<u64>,
    /// Tokens issued at or before this (unix s) are revoked.
    pub revoked_before: Option<u64>,
}

/// Why the revocation store could not answer. Every case is Redis failing (the in-memory store
/// never fails): an API call that needed the store answers 503 `dependency_unavailable`.
#[derive(Debug, thiserror::Error)]
pub enum RevocationError {
    /// A call through the connection's breaker did not succeed: refused while the breaker is
    /// open, failed, or unanswered in time.
    #[error(transparent)]
    Unavailable(#[from] CallError),
    /// Redis answered a command made outside the breaker (a write that must not be cut short)
    /// with an error.
    #[error("redis: {0}")]
    Redis(#[from] fred::error::Error),
    /// Subscribing to the announcements failed (at start-up).
    #[error("redis subscribe: {0}")]
    Subscribe(#[source] fred::error::Error),
    /// The connection revocations are written on (when replicas must acknowledge them) could
    /// not be opened.
    #[error("redis revocation writer: {0}")]
    Writer(String),
    /// An announcement could not be encoded.
    #[error("cannot encode the announcement: {0}")]
    Encode(#[from] serde_json::Error),
    /// The revocation is stored and announced on the primary, but fewer replicas than required
    /// acknowledged it in time: a failover now could lose it. Revoking again is safe.
    #[error(
        "the revocation is in force, but {acked} of {wanted} replicas acknowledged it within {wait:?}: \
         retry, or a failover could lose it"
    )]
    NotReplicated {
        /// Replicas that acknowledged.
        acked: i64,
        /// Replicas required (`redis.revocation_replicas`).
        wanted: u32,
        /// How long it waited (`redis.revocation_wait`).
        wait: Duration,
    },
}

impl From<RevocationError> for ApiError {
    fn from(e: RevocationError) -> Self {
        match e {
            RevocationError::NotReplicated { .. } => ApiError::dependency("redis", e)
                .with_reason("not_replicated")
                .with_retry_after(1)
                .with_public_detail(
                    "the revocation is in force, but no Redis replica acknowledged it in time \
                     (a failover now could lose it); revoking again is safe",
                ),
            e => ApiError::dependency("redis", e),
        }
    }
}

/// Where revocations and user records live.
pub trait RevocationStore: Send + Sync {
    /// Stores a revocation and announces it to every verifier.
    fn revoke(&self, revocation: Revocation) -> BoxFuture<'_, Result<(), RevocationError>>;
    /// Whether this token (by hash) or its user (issued at `iat`) is revoked.
    fn is_revoked<'a>(
        &'a self,
        hash: &'a str,
        subject: &'a str,
        iat: Option<u64>,
    ) -> BoxFuture<'a, Result<bool, RevocationError>>;
    /// Announcements from every replica (including this one).
    fn subscribe(&self) -> broadcast::Receiver<Revocation>;
    /// Records that `identity` was seen now (sampled by the caller).
    fn record_seen<'a>(
        &'a self,
        identity: &'a Identity,
    ) -> BoxFuture<'a, Result<(), RevocationError>>;
    /// The record of a user; `None` when never seen nor revoked.
    fn user<'a>(
        &'a self,
        subject: &'a str,
    ) -> BoxFuture<'a, Result<Option<UserRecord>, RevocationError>>;
}

/// Whether a token issued at `iat` falls under a user's not-before. A token without `iat` cannot
/// prove it is newer, so it is revoked too.
fn issued_before(iat: Option<u64>, not_before: u64) -> bool {
    iat.is_none_or(|iat| iat <= not_before)
}

/// Announcements are small and rare; a receiver that lags this far resyncs.
const ANNOUNCE_CAPACITY: usize = 1024;

/// The embedded default: one process, maps under a mutex (held for map operations only).
pub struct MemoryStore {
    state: Mutex<MemoryState>,
    tx: broadcast::Sender<Revocation>,
}

#[derive(Default)]
struct MemoryState {
    tokens: HashMap<String, u64>,
    users: HashMap<String, u64>,
    seen: HashMap<String, UserRecord>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        MemoryStore { state: Mutex::default(), tx: broadcast::channel(ANNOUNCE_CAPACITY).0 }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, MemoryState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl RevocationStore for MemoryStore {
    fn revoke(&self, revocation: Revocation) -> BoxFuture<'_, Result<(), RevocationError>> {
        {
            let mut state = self.state();
            let now = unix_now();
            state.tokens.retain(|_, until| *until >= now);
            match &revocation {
                Revocation::Token { hash, until } => {
                    state.tokens.insert(hash.clone(), *until);
                }
                Revocation::User { subject, not_before } => {
                    state.users.insert(subject.clone(), *not_before);
                }
                Revocation::Resync | Revocation::ApiKey { .. } => {}
            }
        }
        let _ = self.tx.send(revocation);
        Box::pin(async { Ok(()) })
    }

    fn is_revoked<'a>(
        &'a self,
        hash: &'a str,
        subject: &'a str,
        iat: Option<u64>,
    ) -> BoxFuture<'a, Result<bool, RevocationError>> {
        let state = self.state();
        let revoked = state.tokens.contains_key(hash)
            || state.users.get(subject).is_some_and(|nb| issued_before(iat, *nb));
        Box::pin(async move { Ok(revoked) })
    }

    fn subscribe(&self) -> broadcast::Receiver<Revocation> {
        self.tx.subscribe()
    }

    fn record_seen<'a>(
        &'a self,
        identity: &'a Identity,
    ) -> BoxFuture<'a, Result<(), RevocationError>> {
        let record = UserRecord {
            user_id: identity.subject.clone(),
            tenant_id: Some(identity.tenant.clone()),
            roles: identity.roles.clone(),
            last_seen: Some(unix_now()),
            revoked_before: None,
        };
        self.state().seen.insert(identity.subject.clone(), record);
        Box::pin(async { Ok(()) })
    }

    fn user<'a>(
        &'a self,
        subject: &'a str,
    ) -> BoxFuture<'a, Result<Option<UserRecord>, RevocationError>> {
        let state = self.state();
        let revoked_before = state.users.get(subject).copied();
        let record = match (state.seen.get(subject), revoked_before) {
            (Some(r), _) => Some(UserRecord { revoked_before, ..r.clone() }),
            (None, Some(_)) => Some(UserRecord {
                user_id: subject.to_string(),
                revoked_before,
                ..Default::default()
            }),
            (None, None) => None,
        };
        Box::pin(async move { Ok(record) })
    }
}

/// How long a user record lives after the last sight.
const USER_RECORD_TTL: i64 = 30 * 24 * 3600;

/// The Redis store, shared by every replica and role. Every command goes through the
/// connection's breaker: while Redis is failing, a check for a token not yet cached fails at once
/// (the verifier answers 503 `dependency_unavailable`, its documented rule) instead of after the
/// Redis timeout.
pub struct RedisStore {
    redis: Guarded,
    client: Client,
    prefix: String,
    channel: String,
    user_ttl: Duration,
    tx: broadcast::Sender<Revocation>,
    durability: Durability,
}

/// How a revocation is made durable: `replicas` acknowledge it (`WAIT`) within `wait`, on a
/// connection of its own (`writer`, opened at the first revocation), since `WAIT` blocks the
/// connection it is sent on and the command connection carries every verification.
pub struct Durability {
    /// Replicas that must acknowledge (0: answer once the primary has it).
    pub replicas: u32,
    /// How long to wait for them.
    pub wait: Duration,
    /// The Redis to open the writer connection to, and its settings.
    url: crate::config::SecretUrl,
    config: crate::config::RedisConfig,
    writer: tokio::sync::OnceCell<Client>,
}

impl Durability {
    /// `redis.revocation_replicas` (unset: 1 for a cluster or Sentinel URL, 0 otherwise) and
    /// `redis.revocation_wait` (at most half of `redis.timeout`) for `url`.
    pub fn new(url: &crate::config::SecretUrl, config: &crate::config::RedisConfig) -> Self {
        let replicated = ["redis-cluster", "rediss-cluster", "redis-sentinel", "rediss-sentinel"]
            .contains(&url.expose().scheme());
        Durability {
            replicas: config.revocation_replicas.unwrap_or(u32::from(replicated)),
            // The wait is one command: it must end well inside the command timeout.
            wait: config.revocation_wait.min(config.timeout / 2),
            url: url.clone(),
            config: config.clone(),
            writer: tokio::sync::OnceCell::new(),
        }
    }
}

impl RedisStore {
    /// A store over `client` with key prefix `prefix` (`access:<env>:`); announcements arrive
    /// through `channels` until shutdown.
    pub async fn start(
        redis: Guarded,
        channels: crate::backends::redis::Channels,
        prefix: String,
        user_ttl: Duration,
        durability: Durability,
        shutdown: Shutdown,
    ) -> Result<Arc<Self>, RevocationError> {
        let channel = format!("{prefix}revocations");
        let (tx, _) = broadcast::channel(ANNOUNCE_CAPACITY);
        let mut listener =
            channels.listen(vec![channel.clone()]).await.map_err(RevocationError::Subscribe)?;
        let forward = tx.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    message = listener.messages.recv() => match message {
                        Ok(message) => {
                            let text = message.value.as_string().unwrap_or_default();
                            match serde_json::from_str::<Revocation>(&text) {
                                Ok(r) => { let _ = forward.send(r); }
                                Err(e) => tracing::warn!(error = %e, "ignoring a malformed revocation announcement"),
                            }
                        }
                        Err(broadcast::error::RecvError::Lagged(_)) => { let _ = forward.send(Revocation::Resync); }
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                    Ok(_) = listener.reconnects.recv() => { let _ = forward.send(Revocation::Resync); }
                    _ = shutdown.stopping() => return,
                }
            }
        });
        let client = redis.client.clone();
        Ok(Arc::new(RedisStore { redis, client, prefix, channel, user_ttl, tx, durability }))
    }

    /// The connection revocations are written on: the command connection when no replica need
    /// acknowledge, else the writer of their own.
    async fn writer(&self) -> Result<&Client, RevocationError> {
        let d = &self.durability;
        if d.replicas == 0 {
            return Ok(&self.client);
        }
        d.writer
            .get_or_try_init(|| async {
                crate::backends::redis::connect(&d.url, &d.config)
                    .await
                    .map_err(|e| RevocationError::Writer(e.to_string()))
            })
            .await
    }

    /// Waits until `redis.revocation_replicas` replicas of `key`'s primary have acknowledged
    /// every write `writer` made (`WAIT`, sent to that primary).
    async fn replicated(&self, writer: &Client, key: &str) -> Result<(), RevocationError> {
        let d = &self.durability;
        if d.replicas == 0 {
            return Ok(());
        }
        let (replicas, ms) = (i64::from(d.replicas), d.wait.as_millis() as i64);
        // WAIT names no key: in a Redis Cluster it is pointed at the key's primary, where the
        // write went (a custom command carries its slot; it blocks its connection, this one's).
        let slot = fred::util::redis_keyslot(key.as_bytes());
        let wait = CustomCommand::new_static("WAIT", ClusterHash::Custom(slot), true);
        let acked: i64 = writer.custom(wait, vec![replicas, ms]).await?;
        if acked < replicas {
            return Err(RevocationError::NotReplicated { acked, wanted: d.replicas, wait: d.wait });
        }
        Ok(())
    }

    fn key(&self, rest: &str) -> String {
        format!("{}{}", self.prefix, rest)
    }
}

impl RevocationStore for RedisStore {
    fn revoke(&self, revocation: Revocation) -> BoxFuture<'_, Result<(), RevocationError>> {
        Box::pin(async move {
            // A write that must not be cut short waits for the command timeout, but not while
            // Redis is known to be failing.
            if self.redis.breaker.is_open() {
                return Err(CallError::Open(self.redis.breaker.backend()).into());
            }
            let now = unix_now();
            // What to store, and for how long: a token until it expires, a user's not-before
            // for the longest token lifetime.
            let stored = match &revocation {
                Revocation::Token { hash, until } => {
                    Some((format!("revoked:token:{hash}"), 1, until.saturating_sub(now)))
                }
                Revocation::User { subject, not_before } => {
                    Some((format!("revoked:user:{subject}"), *not_before, self.user_ttl.as_secs()))
                }
                Revocation::Resync | Revocation::ApiKey { .. } => None,
            };
            let mut replicated = Ok(());
            if let Some((key, value, ttl)) = stored {
                let key = self.key(&key);
                let writer = self.writer().await?;
                let _: () = writer
                    .set(&key, value, Some(Expiration::EX(ttl.max(1) as i64)), None, false)
                    .await?;
                replicated = self.replicated(writer, &key).await;
            }
            // Announced even when not yet replicated: it is in force on the primary now.
            let text = serde_json::to_string(&revocation)?;
            let _: i64 = self.client.publish(self.channel.clone(), text).await?;
            replicated
        })
    }

    fn is_revoked<'a>(
        &'a self,
        hash: &'a str,
        subject: &'a str,
        iat: Option<u64>,
    ) -> BoxFuture<'a, Result<bool, RevocationError>> {
        Box::pin(async move {
            let token_key = self.key(&format!("revoked:token:{hash}"));
            let user_key = self.key(&format!("revoked:user:{subject}"));
            let (token, user): (Option<String>, Option<u64>) = self
                .redis
                .call(|c| async move {
                    if !c.is_clustered() {
                        return c.mget(vec![token_key, user_key]).await;
                    }
                    // In a Redis Cluster the keys may live in different slots: the token's key
                    // names no subject (`docs/contracts.md` keeps both keys as they were, so
                    // revocations stored before a move to a cluster still count). Two GETs,
                    // sent together: still one round trip of latency.
                    tokio::try_join!(c.get(token_key.as_str()), c.get(user_key.as_str()))
                })
                .await?;
            Ok(token.is_some() || user.is_some_and(|nb| issued_before(iat, nb)))
        })
    }

    fn subscribe(&self) -> broadcast::Receiver<Revocation> {
        self.tx.subscribe()
    }

    fn record_seen<'a>(
        &'a self,
        identity: &'a Identity,
    ) -> BoxFuture<'a, Result<(), RevocationError>> {
        Box::pin(async move {
            let key = self.key(&format!("user:{}", identity.subject));
            let fields: HashMap<String, String> = HashMap::from([
                ("last_seen".to_string(), unix_now().to_string()),
                ("tenant_id".to_string(), identity.tenant.clone()),
                ("roles".to_string(), serde_json::to_string(&identity.roles).unwrap_or_default()),
            ]);
            self.redis
                .call(|c| async move {
                    let _: () = c.hset(&key, fields).await?;
                    c.expire::<(), _>(&key, USER_RECORD_TTL, None).await
                })
                .await
                .map_err(RevocationError::from)
        })
    }

    fn user<'a>(
        &'a self,
        subject: &'a str,
    ) -> BoxFuture<'a, Result<Option<UserRecord>, RevocationError>> {
        Box::pin(async move {
            if self.redis.breaker.is_open() {
                return Err(CallError::Open(self.redis.breaker.backend()).into());
            }
            let fields: HashMap<String, String> =
                self.client.hgetall(self.key(&format!("user:{subject}"))).await?;
            let revoked_before: Option<u64> =
                self.client.get(self.key(&format!("revoked:user:{subject}"))).await?;
            if fields.is_empty() && revoked_before.is_none() {
                return Ok(None);
            }
            Ok(Some(UserRecord {
                user_id: subject.to_string(),
                tenant_id: fields.get("tenant_id").cloned(),
                roles: fields
                    .get("roles")
                    .and_then(|r| serde_json::from_str(r).ok())
                    .unwrap_or_default(),
                last_seen: fields.get("last_seen").and_then(|s| s.parse().ok()),
                revoked_before,
            }))
        })
    }
}

/// Decides which sightings to record: at most one per subject per `every` in this process.
pub struct SeenSampler {
    every: Duration,
    last: Mutex<HashMap<String, Instant>>,
}

impl SeenSampler {
    /// A sampler recording each subject at most once per `every`.
    pub fn new(every: Duration) -> Self {
        SeenSampler { every, last: Mutex::default() }
    }

    /// Whether `subject` should be recorded now.
    pub fn should_record(&self, subject: &str) -> bool {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if last.len() > 100_000 {
            last.retain(|_, at| now.duration_since(*at) < self.every);
        }
        match last.get(subject) {
            Some(at) if now.duration_since(*at) < self.every => false,
            _ => {
                last.insert(subject.to_string(), now);
                true
            }
        }
    }
}
