//! API keys (`X-API-Key`), owned by the auth module.
//!
//! A key reads `ak_<id>_<secret>`; only the SHA-256 of the secret is stored (PostgreSQL when
//! configured, else memory: then keys live in one process). The secret is shown once, when the key
//! is created or rotated. A rotation keeps the previous secret valid until a chosen time, so
//! clients can roll over. An API-key caller is `Identity { subject: "apikey:<id>", kind: ApiKey }`.
//! Verifiers cache a key record for one second, so a revocation is honoured everywhere within it.
//! The records are kept (bounded, [`CACHE_CAP`], the least used evicted first: [`crate::cache`])
//! for [`STALE_FOR`], to serve through an outage of the store.
//!
//! While the store cannot answer (PostgreSQL down: its breaker open), keys seen within
//! [`STALE_FOR`] keep working from their cached record, and a wrong secret is refused from the
//! cache. A secret that does not match the cached record re-reads the store (a rotation elsewhere
//! works at once), within a budget per key id ([`REREAD_BURST`] at once, [`REREAD_RATE`] a
//! second after that): a flood of wrong secrets costs the store a few reads, not one each.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::cache::Bounded;

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use futures::future::BoxFuture;
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::{AuthError, Identity, IdentityKind, Reason};
use crate::backends::postgres::describe;
use crate::error::ApiError;

/// A stored key (no secret).
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct ApiKey {
    /// The key id (the part after `ak_`).
    pub id: String,
    /// A label.
    pub name: String,
    /// The tenant its caller acts in.
    pub tenant_id: String,
    /// Its roles.
    pub roles: Vec<String>,
    /// When created.
    pub created_at: DateTime<Utc>,
    /// When it stops working, if ever.
    pub expires_at: Option<DateTime<Utc>>,
    /// When revoked.
    pub revoked_at: Option<DateTime<Utc>>,
    /// Last use seen (sampled: at most once a minute per process).
    pub last_used_at: Option<DateTime<Utc>>,
    /// Until when the previous secret still works after a rotation.
    pub previous_valid_until: Option<DateTime<Utc>>,
    #[serde(skip)]
    secret_hash: String,
    #[serde(skip)]
    previous_hash: Option<String>,
}

/// What `create` is given (the body of `POST /auth/api-keys`).
#[derive(Debug, Clone, serde::Deserialize, utoipa::ToSchema)]
#[schema(example = json!({"name": "pricing-batch", "tenant_id": "t1", "roles": ["trader"], "expires_at": "2027-01-01T00:00:00Z"}))]
#[serde(deny_unknown_fields)]
pub struct NewKey {
    /// A label.
    pub name: String,
    /// The tenant.
    pub tenant_id: String,
    /// Roles.
    #[serde(default)]
    pub roles: Vec<String>,
    /// Expiry (UTC).
    #[serde(default)]
    pub expires_at: Option<DateTime<Utc>>,
}

/// A store failure.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// No such key.
    #[error("no such API key")]
    NotFound,
    /// The store cannot be reached.
    #[error("{0}")]
    Unavailable(String),
}

impl From<KeyError> for ApiError {
    fn from(e: KeyError) -> Self {
        match e {
            KeyError::NotFound => ApiError::not_found("no such API key (or it is revoked)"),
            unavailable @ KeyError::Unavailable(_) => ApiError::dependency("postgres", unavailable),
        }
    }
}

/// One audit row: (action, actor, when).
pub type AuditRow = (String, String, DateTime<Utc>);

/// An audit row with its key id.
type KeyAudit = (String, AuditRow);

/// Where keys live.
pub trait KeyStore: Send + Sync {
    /// Inserts a key and its audit row.
    fn insert(&self, key: ApiKey, actor: &str) -> BoxFuture<'_, Result<(), KeyError>>;
    /// One key.
    fn get<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<ApiKey>, KeyError>>;
    /// Every key, newest first.
    fn list(&self) -> BoxFuture<'_, Result<Vec<ApiKey>, KeyError>>;
    /// New secret; the old one valid until `until`.
    fn rotate<'a>(
        &'a self,
        id: &'a str,
        new_hash: String,
        until: DateTime<Utc>,
        actor: &'a str,
    ) -> BoxFuture<'a, Result<ApiKey, KeyError>>;
    /// Revokes a key (both secrets).
    fn revoke<'a>(&'a self, id: &'a str, actor: &'a str) -> BoxFuture<'a, Result<(), KeyError>>;
    /// Records a use.
    fn touch<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), KeyError>>;
    /// The audit trail of a key: (action, actor, at).
    fn audit<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Vec<AuditRow>, KeyError>>;
}

fn hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Equal-length comparison that does not stop at the first difference.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn secret() -> String {
    format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple())
}

/// The embedded store.
#[derive(Default)]
pub struct MemoryKeys {
    /// Keys and audit rows; a std mutex held for one map operation.
    state: Mutex<(HashMap<String, ApiKey>, Vec<KeyAudit>)>,
}

impl KeyStore for MemoryKeys {
    fn insert(&self, key: ApiKey, actor: &str) -> BoxFuture<'_, Result<(), KeyError>> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.1.push((key.id.clone(), ("create".into(), actor.into(), Utc::now())));
        s.0.insert(key.id.clone(), key);
        Box::pin(async { Ok(()) })
    }
    fn get<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<ApiKey>, KeyError>> {
        let key = self.state.lock().unwrap_or_else(|p| p.into_inner()).0.get(id).cloned();
        Box::pin(async move { Ok(key) })
    }
    fn list(&self) -> BoxFuture<'_, Result<Vec<ApiKey>, KeyError>> {
        let mut keys: Vec<ApiKey> =
            self.state.lock().unwrap_or_else(|p| p.into_inner()).0.values().cloned().collect();
        keys.sort_by_key(|k| std::cmp::Reverse(k.created_at));
        Box::pin(async move { Ok(keys) })
    }
    fn rotate<'a>(
        &'a self,
        id: &'a str,
        new_hash: String,
        until: DateTime<Utc>,
        actor: &'a str,
    ) -> BoxFuture<'a, Result<ApiKey, KeyError>> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let out = match s.0.get_mut(id) {
            Some(key) if key.revoked_at.is_none() => {
                key.previous_hash = Some(std::mem::replace(&mut key.secret_hash, new_hash));
                key.previous_valid_until = Some(until);
                Ok(key.clone())
            }
            _ => Err(KeyError::NotFound),
        };
        if out.is_ok() {
            s.1.push((id.to_string(), ("rotate".into(), actor.into(), Utc::now())));
        }
        Box::pin(async move { out })
    }
    fn revoke<'a>(&'a self, id: &'a str, actor: &'a str) -> BoxFuture<'a, Result<(), KeyError>> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let out = match s.0.get_mut(id) {
            Some(key) => {
                key.revoked_at.get_or_insert_with(Utc::now);
                Ok(())
            }
            None => Err(KeyError::NotFound),
        };
        if out.is_ok() {
            s.1.push((id.to_string(), ("revoke".into(), actor.into(), Utc::now())));
        }
        Box::pin(async move { out })
    }
    fn touch<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), KeyError>> {
        if let Some(key) = self.state.lock().unwrap_or_else(|p| p.into_inner()).0.get_mut(id) {
            key.last_used_at = Some(Utc::now());
        }
        Box::pin(async { Ok(()) })
    }
    fn audit<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Vec<AuditRow>, KeyError>> {
        let rows = self
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .1
            .iter()
            .filter(|(key, _)| key == id)
            .map(|(_, row)| row.clone())
            .collect();
        Box::pin(async move { Ok(rows) })
    }
}

/// Keys in PostgreSQL (migration 0002).
pub struct PgKeys {
    pool: Pool,
}

impl PgKeys {
    /// A store over a migrated pool.
    pub fn new(pool: Pool) -> Self {
        PgKeys { pool }
    }
}

fn unavailable(e: &dyn std::error::Error) -> KeyError {
    KeyError::Unavailable(describe(e))
}

const COLUMNS: &str = "id, name, tenant_id, roles, secret_hash, previous_hash, previous_valid_until, created_at, expires_at, revoked_at, last_used_at";

fn from_row(r: &tokio_postgres::Row) -> ApiKey {
    ApiKey {
        id: r.get(0),
        name: r.get(1),
        tenant_id: r.get(2),
        roles: r.get(3),
        secret_hash: r.get(4),
        previous_hash: r.get(5),
        previous_valid_until: r.get(6),
        created_at: r.get(7),
        expires_at: r.get(8),
        revoked_at: r.get(9),
        last_used_at: r.get(10),
    }
}

impl PgKeys {
    async fn audited(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
        id: &str,
        action: &str,
        actor: &str,
    ) -> Result<u64, KeyError> {
        let mut client = self.pool.get().await.map_err(|e| unavailable(&e))?;
        let tx = client.transaction().await.map_err(|e| unavailable(&e))?;
        let n = tx.execute(sql, params).await.map_err(|e| unavailable(&e))?;
        if n > 0 {
            tx.execute(
                "INSERT INTO access_api_keys_audit (key_id, action, actor) VALUES ($1, $2, $3)",
                &[&id, &action, &actor],
            )
            .await
            .map_err(|e| unavailable(&e))?;
        }
        tx.commit().await.map_err(|e| unavailable(&e))?;
        Ok(n)
    }
}

impl KeyStore for PgKeys {
    fn insert(&self, key: ApiKey, actor: &str) -> BoxFuture<'_, Result<(), KeyError>> {
        let actor = actor.to_string();
        Box::pin(async move {
            self.audited(
                "INSERT INTO access_api_keys (id, name, tenant_id, roles, secret_hash, created_at, expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                &[&key.id, &key.name, &key.tenant_id, &key.roles, &key.secret_hash, &key.created_at, &key.expires_at],
                &key.id,
                "create",
                &actor,
            )
            .await
            .map(|_| ())
        })
    }
    fn get<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<ApiKey>, KeyError>> {
        Box::pin(async move {
            let client = self.pool.get().await.map_err(|e| unavailable(&e))?;
            let row = client
                .query_opt(&format!("SELECT {COLUMNS} FROM access_api_keys WHERE id = $1"), &[&id])
                .await
                .map_err(|e| unavailable(&e))?;
            Ok(row.as_ref().map(from_row))
        })
    }
    fn list(&self) -> BoxFuture<'_, Result<Vec<ApiKey>, KeyError>> {
        Box::pin(async move {
            let client = self.pool.get().await.map_err(|e| unavailable(&e))?;
            let rows = client
                .query(
                    &format!("SELECT {COLUMNS} FROM access_api_keys ORDER BY created_at DESC"),
                    &[],
                )
                .await
                .map_err(|e| unavailable(&e))?;
            Ok(rows.iter().map(from_row).collect())
        })
    }
    fn rotate<'a>(
        &'a self,
        id: &'a str,
        new_hash: String,
        until: DateTime<Utc>,
        actor: &'a str,
    ) -> BoxFuture<'a, Result<ApiKey, KeyError>> {
        Box::pin(async move {
            let n = self
                .audited(
                    "UPDATE access_api_keys SET previous_hash = secret_hash, secret_hash = $2, previous_valid_until = $3 WHERE id = $1 AND revoked_at IS NULL",
                    &[&id, &new_hash, &until],
                    id,
                    "rotate",
                    actor,
                )
                .await?;
            if n == 0 {
                return Err(KeyError::NotFound);
            }
            self.get(id).await?.ok_or(KeyError::NotFound)
        })
    }
    fn revoke<'a>(&'a self, id: &'a str, actor: &'a str) -> BoxFuture<'a, Result<(), KeyError>> {
        Box::pin(async move {
            let n = self.audited("UPDATE access_api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE id = $1", &[&id], id, "revoke", actor).await?;
            if n == 0 {
                Err(KeyError::NotFound)
            } else {
                Ok(())
            }
        })
    }
    fn touch<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), KeyError>> {
        Box::pin(async move {
            let client = self.pool.get().await.map_err(|e| unavailable(&e))?;
            client
                .execute("UPDATE access_api_keys SET last_used_at = now() WHERE id = $1", &[&id])
                .await
                .map_err(|e| unavailable(&e))?;
            Ok(())
        })
    }
    fn audit<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Vec<AuditRow>, KeyError>> {
        Box::pin(async move {
            let client = self.pool.get().await.map_err(|e| unavailable(&e))?;
            let rows = client.query("SELECT action, actor, at FROM access_api_keys_audit WHERE key_id = $1 ORDER BY id", &[&id]).await.map_err(|e| unavailable(&e))?;
            Ok(rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect())
        })
    }
}

/// Keys with a short-lived local cache of records; the handle every role uses.
pub struct ApiKeys {
    store: Arc<dyn KeyStore>,
    /// Records by id with when they were read, each kept for `stale_for` after its read.
    cache: Bounded<String, (Option<ApiKey>, Instant)>,
    /// How long a record serves while the store cannot answer ([`STALE_FOR`]).
    stale_for: Duration,
    touched: super::revocation::SeenSampler,
    /// In front of the store's reads, with their deadline: while it is open, reads fail at once
    /// and the cached records answer.
    breaker: Option<(Arc<crate::backends::breaker::Breaker>, Duration)>,
    /// Re-read budgets by key id: (tokens, when last refilled), bounded like the records (a
    /// budget evicted is a full one, which it would be again within [`REREAD_BURST`] /
    /// [`REREAD_RATE`] seconds). A std mutex held for one update: a budget is read and spent
    /// at once, so concurrent wrong secrets cannot spend one token twice.
    rereads: Mutex<quick_cache::unsync::Cache<String, (f64, Instant)>>,
}

/// How long a key record is trusted without asking the store again.
const RECORD_TTL: Duration = Duration::from_secs(1);

/// How long a cached record still serves while the store cannot answer.
pub const STALE_FOR: Duration = Duration::from_secs(15 * 60);

/// Re-reads on a mismatching secret allowed at once per key id...
pub const REREAD_BURST: f64 = 5.0;
/// ...and per second after that.
pub const REREAD_RATE: f64 = 4.0;

/// Records kept at most.
const CACHE_CAP: usize = 100_000;

impl ApiKeys {
    /// Keys in `store`.
    pub fn new(store: Arc<dyn KeyStore>) -> Self {
        Self::with_capacity(store, CACHE_CAP, STALE_FOR)
    }

    /// Keys in `store`, with at most about `capacity` records kept `stale_for` each.
    fn with_capacity(store: Arc<dyn KeyStore>, capacity: usize, stale_for: Duration) -> Self {
        ApiKeys {
            store,
            cache: Bounded::new(capacity),
            stale_for,
            touched: super::revocation::SeenSampler::new(Duration::from_secs(60)),
            breaker: None,
            rereads: Mutex::new(quick_cache::unsync::Cache::new(capacity.max(1))),
        }
    }

    /// Whether a mismatching secret for `id` may re-read the store now (takes one from its
    /// budget).
    fn may_reread(&self, id: &str) -> bool {
        let mut budgets = self.rereads.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let (tokens, at) = budgets.get(id).copied().unwrap_or((REREAD_BURST, now));
        let tokens =
            (tokens + now.duration_since(at).as_secs_f64() * REREAD_RATE).min(REREAD_BURST);
        let allowed = tokens >= 1.0;
        budgets.insert(id.to_string(), (if allowed { tokens - 1.0 } else { tokens }, now));
        allowed
    }

    /// Puts `breaker` in front of the store's reads, each bounded by `deadline`.
    pub fn with_breaker(
        mut self,
        breaker: Arc<crate::backends::breaker::Breaker>,
        deadline: Duration,
    ) -> Self {
        self.breaker = Some((breaker, deadline));
        self
    }

    /// The store (admin operations).
    pub fn store(&self) -> &Arc<dyn KeyStore> {
        &self.store
    }

    /// Creates a key; returns it and the full key text (shown once).
    pub async fn create(&self, new: NewKey, actor: &str) -> Result<(ApiKey, String), KeyError> {
        let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
        let secret = secret();
        let key = ApiKey {
            id: id.clone(),
            name: new.name,
            tenant_id: new.tenant_id,
            roles: new.roles,
            created_at: Utc::now(),
            expires_at: new.expires_at,
            revoked_at: None,
            last_used_at: None,
            previous_valid_until: None,
            secret_hash: hash(&secret),
            previous_hash: None,
        };
        self.store.insert(key.clone(), actor).await?;
        Ok((key, format!("ak_{id}_{secret}")))
    }

    /// Rotates a key: a new secret (returned, shown once); the old one works until `until`.
    pub async fn rotate(
        &self,
        id: &str,
        until: DateTime<Utc>,
        actor: &str,
    ) -> Result<(ApiKey, String), KeyError> {
        let secret = secret();
        let key = self.store.rotate(id, hash(&secret), until, actor).await?;
        self.forget(id);
        Ok((key, format!("ak_{id}_{secret}")))
    }

    /// Revokes a key.
    pub async fn revoke(&self, id: &str, actor: &str) -> Result<(), KeyError> {
        self.store.revoke(id, actor).await?;
        self.forget(id);
        Ok(())
    }

    /// Drops the cached record of `id` (revoked or rotated here or on another replica).
    pub fn forget(&self, id: &str) {
        self.cache.remove(id);
    }

    /// Drops cached records as revocations and rotations are announced by any replica, until
    /// shutdown: a record kept to serve through a PostgreSQL outage is never one revoked before.
    pub fn follow_announcements(
        self: &Arc<Self>,
        mut announcements: tokio::sync::broadcast::Receiver<super::revocation::Revocation>,
        shutdown: crate::server::Shutdown,
    ) {
        use tokio::sync::broadcast::error::RecvError;
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    announced = announcements.recv() => match announced {
                        Ok(super::revocation::Revocation::ApiKey { id }) => this.forget(&id),
                        Ok(_) => {}
                        // Announcements were missed: records may be stale; drop them all.
                        Err(RecvError::Lagged(_)) => this.cache.clear(),
                        Err(RecvError::Closed) => return,
                    },
                    _ = shutdown.stopping() => return,
                }
            }
        });
    }

    /// The cached record of `id` and how old it is.
    fn cached(&self, id: &str) -> Option<(Option<ApiKey>, Duration)> {
        self.cache.get(id).map(|(record, at)| (record, at.elapsed()))
    }

    async fn read_store(&self, id: &str) -> Result<Option<ApiKey>, KeyError> {
        match &self.breaker {
            Some((breaker, deadline)) => breaker
                .call(*deadline, self.store.get(id))
                .await
                .map_err(|e| KeyError::Unavailable(e.to_string())),
            None => self.store.get(id).await,
        }
    }

    /// The record of `id`: from the local cache while younger than `max_age`, else from the
    /// store; when the store fails, a cached record up to [`STALE_FOR`] old.
    async fn record(&self, id: &str, max_age: Duration) -> Result<Option<ApiKey>, AuthError> {
        let cached = self.cached(id);
        if let Some((record, age)) = &cached {
            if *age < max_age {
                return Ok(record.clone());
            }
        }
        let record = match self.read_store(id).await {
            Ok(record) => record,
            Err(e) => {
                return match cached.filter(|(_, age)| *age < self.stale_for) {
                    Some((record, _)) => {
                        tracing::debug!(error = %e, "API-key store unavailable; using the cached record");
                        Ok(record)
                    }
                    None => Err(AuthError::Unavailable(format!("API keys: {e}"))),
                };
            }
        };
        self.cache.insert(id.to_string(), (record.clone(), Instant::now()), self.stale_for);
        Ok(record)
    }

    /// Verifies an `X-API-Key` value.
    pub async fn verify(&self, raw: &str) -> Result<Identity, AuthError> {
        let (id, secret) = raw
            .trim()
            .strip_prefix("ak_")
            .and_then(|r| r.split_once('_'))
            .ok_or(AuthError::Rejected(Reason::Malformed))?;
        let given = hash(secret);
        let matches = |key: &ApiKey, now: DateTime<Utc>| {
            same(&given, &key.secret_hash)
                || key.previous_hash.as_deref().is_some_and(|h| same(&given, h))
                    && key.previous_valid_until.is_some_and(|until| now < until)
        };
        let now = Utc::now();
        let mut key =
            self.record(id, RECORD_TTL).await?.ok_or(AuthError::Rejected(Reason::UnknownKey))?;
        if !matches(&key, now) && self.may_reread(id) {
            // The cached record may predate a rotation: ask the store before refusing, within the
            // key's budget (a flood of wrong secrets must not become a flood of reads).
            key = self
                .record(id, Duration::ZERO)
                .await?
                .ok_or(AuthError::Rejected(Reason::UnknownKey))?;
        }
        if !matches(&key, now) {
            let retired = key.previous_hash.as_deref().is_some_and(|h| same(&given, h));
            return Err(AuthError::Rejected(if retired {
                Reason::Expired
            } else {
                Reason::BadSignature
            }));
        }
        if key.revoked_at.is_some() {
            return Err(AuthError::Rejected(Reason::Revoked));
        }
        if key.expires_at.is_some_and(|at| at <= now) {
            return Err(AuthError::Rejected(Reason::Expired));
        }
        if self.touched.should_record(&key.id) {
            let store = self.store.clone();
            let id = key.id.clone();
            tokio::spawn(async move {
                let _ = store.touch(&id).await;
            });
        }
        Ok(Identity {
            subject: format!("apikey:{}", key.id),
            tenant: key.tenant_id,
            roles: key.roles,
            kind: IdentityKind::ApiKey,
            expires_at: key.expires_at.map(|t| t.timestamp().max(0) as u64).unwrap_or(u64::MAX),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// The embedded store, counting reads and failing them on demand.
    #[derive(Default)]
    struct Counted {
        keys: MemoryKeys,
        reads: AtomicUsize,
        down: std::sync::atomic::AtomicBool,
    }

    impl KeyStore for Counted {
        fn insert(&self, key: ApiKey, actor: &str) -> BoxFuture<'_, Result<(), KeyError>> {
            self.keys.insert(key, actor)
        }
        fn get<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<ApiKey>, KeyError>> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            if self.down.load(Ordering::SeqCst) {
                return Box::pin(async { Err(KeyError::Unavailable("down".into())) });
            }
            self.keys.get(id)
        }
        fn list(&self) -> BoxFuture<'_, Result<Vec<ApiKey>, KeyError>> {
            self.keys.list()
        }
        fn rotate<'a>(
            &'a self,
            id: &'a str,
            new_hash: String,
            until: DateTime<Utc>,
            actor: &'a str,
        ) -> BoxFuture<'a, Result<ApiKey, KeyError>> {
            self.keys.rotate(id, new_hash, until, actor)
        }
        fn revoke<'a>(
            &'a self,
            id: &'a str,
            actor: &'a str,
        ) -> BoxFuture<'a, Result<(), KeyError>> {
            self.keys.revoke(id, actor)
        }
        fn touch<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), KeyError>> {
            self.keys.touch(id)
        }
        fn audit<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Vec<AuditRow>, KeyError>> {
            self.keys.audit(id)
        }
    }

    #[tokio::test]
    async fn wrong_secrets_are_refused_from_the_cache_and_seen_keys_survive_a_store_outage() {
        let store = Arc::new(Counted::default());
        let keys = ApiKeys::new(store.clone());
        let new =
            NewKey { name: "n".into(), tenant_id: "t1".into(), roles: vec![], expires_at: None };
        let (key, text) = keys.create(new, "root").await.unwrap();
        assert!(keys.verify(&text).await.is_ok());
        let before = store.reads.load(Ordering::SeqCst);
        for _ in 0..300 {
            assert!(matches!(
                keys.verify(&format!("ak_{}_wrong", key.id)).await,
                Err(AuthError::Rejected(Reason::BadSignature))
            ));
        }
        let reads = store.reads.load(Ordering::SeqCst) - before;
        assert!(reads <= 8, "300 wrong secrets read the store {reads} times");
        // The store goes down: the key seen recently still works, a wrong secret is still
        // refused, a key never seen cannot be checked.
        store.down.store(true, Ordering::SeqCst);
        tokio::time::sleep(RECORD_TTL).await;
        assert!(keys.verify(&text).await.is_ok(), "served from the cached record");
        assert!(matches!(
            keys.verify(&format!("ak_{}_wrong", key.id)).await,
            Err(AuthError::Rejected(Reason::BadSignature))
        ));
        assert!(matches!(keys.verify("ak_000000000000_x").await, Err(AuthError::Unavailable(_))));
    }

    fn new_key(name: &str) -> NewKey {
        NewKey { name: name.into(), tenant_id: "t1".into(), roles: vec![], expires_at: None }
    }

    #[tokio::test]
    async fn a_full_record_cache_keeps_the_keys_in_use_and_never_empties_itself() {
        let keys = ApiKeys::with_capacity(Arc::new(MemoryKeys::default()), 32, STALE_FOR);
        let mut created = Vec::new();
        for i in 0..100 {
            let (key, text) = keys.create(new_key(&format!("k{i}")), "root").await.unwrap();
            keys.verify(&text).await.unwrap();
            keys.verify(&text).await.unwrap();
            created.push(key.id);
        }
        assert!((24..=40).contains(&keys.cache.len()), "{}", keys.cache.len());
        assert!(created[85..].iter().all(|id| keys.cached(id).is_some()), "the latest are kept");
        assert!(created[..32].iter().all(|id| keys.cached(id).is_none()), "the oldest went");
    }

    #[tokio::test]
    async fn a_record_serves_an_outage_until_it_expires() {
        let store = Arc::new(Counted::default());
        let stale_for = RECORD_TTL + Duration::from_millis(500);
        let keys = ApiKeys::with_capacity(store.clone(), 32, stale_for);
        let (_, text) = keys.create(new_key("k"), "root").await.unwrap();
        keys.verify(&text).await.unwrap();
        store.down.store(true, Ordering::SeqCst);
        tokio::time::sleep(RECORD_TTL).await;
        assert!(keys.verify(&text).await.is_ok(), "served from the cached record");
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(
            matches!(keys.verify(&text).await, Err(AuthError::Unavailable(_))),
            "past stale_for the record is gone"
        );
    }

    #[tokio::test]
    async fn lifecycle_in_memory() {
        let keys = ApiKeys::new(Arc::new(MemoryKeys::default()));
        let (key, text) = keys
            .create(
                NewKey {
                    name: "n".into(),
                    tenant_id: "t1".into(),
                    roles: vec!["trader".into()],
                    expires_at: None,
                },
                "root",
            )
            .await
            .unwrap();
        let id = keys.verify(&text).await.unwrap();
        assert_eq!(
            (id.subject.as_str(), id.tenant.as_str(), id.kind),
            (format!("apikey:{}", key.id).as_str(), "t1", IdentityKind::ApiKey)
        );
        assert!(matches!(
            keys.verify(&format!("ak_{}_wrong", key.id)).await,
            Err(AuthError::Rejected(Reason::BadSignature))
        ));
        assert!(matches!(
            keys.verify("ak_nope_x").await,
            Err(AuthError::Rejected(Reason::UnknownKey))
        ));
        assert!(matches!(
            keys.verify("garbage").await,
            Err(AuthError::Rejected(Reason::Malformed))
        ));
        let (_, new_text) =
            keys.rotate(&key.id, Utc::now() + chrono::Duration::hours(1), "root").await.unwrap();
        assert!(keys.verify(&text).await.is_ok(), "old key works during the overlap");
        assert!(keys.verify(&new_text).await.is_ok());
        keys.revoke(&key.id, "root").await.unwrap();
        assert!(matches!(keys.verify(&new_text).await, Err(AuthError::Rejected(Reason::Revoked))));
        let audit: Vec<String> =
            keys.store().audit(&key.id).await.unwrap().into_iter().map(|a| a.0).collect();
        assert_eq!(audit, vec!["create", "rotate", "revoke"]);
    }
}
