//! The in-process verifier every role uses.
//!
//! Cold path: parse the header, check the algorithm against the allow-list (never `none`, never
//! HMAC), find the key by `kid` (one rate-limited refetch for an unknown kid), verify the
//! signature (josekit over OpenSSL), validate the claims, ask the revocation store. A verified
//! token is cached by its SHA-256 until `exp`; a cache hit costs a hash and a map lookup. Cached
//! entries are dropped when a revocation is announced, and a user revoked since start is checked
//! on every hit, so a revocation is honoured on cached tokens too.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use base64::Engine;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use tokio::sync::broadcast::error::RecvError;

use super::claims::{self, ClaimRules, UserInfo};
use super::jwks::Jwks;
use super::revocation::{Revocation, RevocationStore, SeenSampler};
use super::{strip_bearer, unix_now, AuthError, Identity, Reason};
use crate::roles::Role;
use crate::server::Shutdown;

/// Metric names of the verifier.
pub mod names {
    /// Verifications by outcome (`ok`, `cached`, or the rejection reason).
    pub const VERIFICATIONS: &str = "access_auth_verifications_total";
    /// Entries in the verified-token cache.
    pub const CACHE_ENTRIES: &str = "access_auth_token_cache_entries";
}

/// A verified token.
#[derive(Debug)]
pub struct Verified {
    /// Who is calling.
    pub identity: Identity,
    /// The user-facing view.
    pub info: UserInfo,
    /// Every claim, as signed.
    pub claims: Map<String, Value>,
    /// Hex SHA-256 of the token (how it is named for revocation).
    pub token_hash: String,
}

/// The verifier. Cheap to share (`Arc`); see the module docs.
pub struct Verifier {
    role: Role,
    jwks: Arc<Jwks>,
    rules: ClaimRules,
    allowed: Vec<String>,
    revocations: Arc<dyn RevocationStore>,
    /// Verified tokens by SHA-256. A std lock: held for a lookup or insert only, never across I/O.
    cache: RwLock<HashMap<[u8; 32], Arc<Verified>>>,
    capacity: usize,
    /// Users revoked since this process started, from announcements: subject -> not-before.
    revoked_users: RwLock<HashMap<String, u64>>,
    seen: SeenSampler,
    cached_hits: metrics::Counter,
    cold_ok: metrics::Counter,
}

impl Verifier {
    /// A verifier over these keys, rules and revocation store; `capacity` bounds the cache.
    pub fn new(
        role: Role,
        jwks: Arc<Jwks>,
        rules: ClaimRules,
        allowed: Vec<String>,
        revocations: Arc<dyn RevocationStore>,
        capacity: usize,
    ) -> Self {
        Verifier {
            role,
            jwks,
            rules,
            allowed,
            revocations,
            cache: RwLock::default(),
            capacity,
            revoked_users: RwLock::default(),
            seen: SeenSampler::new(std::time::Duration::from_secs(60)),
            cached_hits: metrics::counter!(names::VERIFICATIONS, "role" => role.as_str(), "outcome" => "cached"),
            cold_ok: metrics::counter!(names::VERIFICATIONS, "role" => role.as_str(), "outcome" => "ok"),
        }
    }

    /// The key store (for readiness).
    pub fn jwks(&self) -> &Arc<Jwks> {
        &self.jwks
    }

    /// The claim rules in force.
    pub fn rules(&self) -> &ClaimRules {
        &self.rules
    }

    /// Verifies a token (an optional `Bearer ` prefix is accepted).
    pub async fn verify(&self, raw: &str) -> Result<Arc<Verified>, AuthError> {
        let token = strip_bearer(raw);
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let now = unix_now();
        let hit = self.cache.read().unwrap_or_else(|p| p.into_inner()).get(&digest).cloned();
        if let Some(hit) = hit {
            if now > hit.identity.expires_at.saturating_add(self.rules.leeway) {
                self.cache.write().unwrap_or_else(|p| p.into_inner()).remove(&digest);
                return Err(self.rejected(Reason::Expired));
            }
            if self.locally_revoked(&hit) {
                return Err(self.rejected(Reason::Revoked));
            }
            self.cached_hits.increment(1);
            return Ok(hit);
        }
        let verified = match self.verify_cold(token, &digest, now).await {
            Ok(v) => Arc::new(v),
            Err(AuthError::Rejected(reason)) => return Err(self.rejected(reason)),
            Err(e) => return Err(e),
        };
        self.cold_ok.increment(1);
        self.insert(digest, verified.clone(), now);
        if self.seen.should_record(&verified.identity.subject) {
            let store = self.revocations.clone();
            let identity = verified.identity.clone();
            tokio::spawn(async move {
                if let Err(e) = store.record_seen(&identity).await {
                    tracing::debug!(error = %e, "could not record a user sighting");
                }
            });
        }
        Ok(verified)
    }

    fn rejected(&self, reason: Reason) -> AuthError {
        metrics::counter!(names::VERIFICATIONS, "role" => self.role.as_str(), "outcome" => reason.as_str()).increment(1);
        AuthError::Rejected(reason)
    }

    async fn verify_cold(
        &self,
        token: &str,
        digest: &[u8; 32],
        now: u64,
    ) -> Result<Verified, AuthError> {
        let header = parse_header(token)?;
        let alg = header.get("alg").and_then(Value::as_str).ok_or(Reason::Malformed)?;
        if alg.eq_ignore_ascii_case("none")
            || alg.starts_with("HS")
            || !self.allowed.iter().any(|a| a == alg)
        {
            return Err(Reason::AlgorithmNotAllowed.into());
        }
        if !self.jwks.is_loaded() {
            return Err(AuthError::Unavailable("no signing keys loaded yet".into()));
        }
        let kid = header.get("kid").and_then(Value::as_str);
        let verifier = self.jwks.verifier(kid, alg).await.map_err(|unknown_kid| {
            if unknown_kid {
                Reason::UnknownKey
            } else {
                Reason::AlgorithmNotAllowed
            }
        })?;
        let (payload, _) =
            josekit::jwt::decode_with_verifier(token, verifier.as_ref()).map_err(|e| match e {
                josekit::JoseError::InvalidSignature(_) => Reason::BadSignature,
                _ => Reason::Malformed,
            })?;
        let claims = payload.claims_set().clone();
        let (identity, info) = claims::validate(&claims, &self.rules, now)?;
        let token_hash = hex::encode(digest);
        match self.revocations.is_revoked(&token_hash, &identity.subject, info.iat).await {
            Ok(false) => {}
            Ok(true) => return Err(Reason::Revoked.into()),
            Err(e) => return Err(AuthError::Unavailable(format!("revocation store: {e}"))),
        }
        Ok(Verified { identity, info, claims, token_hash })
    }

    fn locally_revoked(&self, v: &Verified) -> bool {
        let users = self.revoked_users.read().unwrap_or_else(|p| p.into_inner());
        users.get(&v.identity.subject).is_some_and(|nb| v.info.iat.is_none_or(|iat| iat <= *nb))
    }

    fn insert(&self, digest: [u8; 32], verified: Arc<Verified>, now: u64) {
        let mut cache = self.cache.write().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= self.capacity {
            cache.retain(|_, v| v.identity.expires_at >= now);
            if cache.len() >= self.capacity {
                // Full of live tokens: start over rather than track recency on every hit.
                cache.clear();
            }
        }
        cache.insert(digest, verified);
        metrics::gauge!(names::CACHE_ENTRIES, "role" => self.role.as_str()).set(cache.len() as f64);
    }

    /// Applies one announced revocation to this verifier's caches.
    pub fn apply(&self, revocation: &Revocation) {
        let mut cache = self.cache.write().unwrap_or_else(|p| p.into_inner());
        match revocation {
            Revocation::Token { hash, .. } => {
                let mut digest = [0u8; 32];
                if hex::decode_to_slice(hash, &mut digest).is_ok() {
                    cache.remove(&digest);
                }
            }
            Revocation::User { subject, not_before } => {
                self.revoked_users
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(subject.clone(), *not_before);
                cache.retain(|_, v| &v.identity.subject != subject);
            }
            Revocation::Resync => cache.clear(),
        }
    }

    /// Applies announced revocations until shutdown.
    pub fn spawn_revocation_listener(self: &Arc<Self>, shutdown: Shutdown) {
        let mut announcements = self.revocations.subscribe();
        let verifier = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    received = announcements.recv() => match received {
                        Ok(r) => verifier.apply(&r),
                        Err(RecvError::Lagged(_)) => verifier.apply(&Revocation::Resync),
                        Err(RecvError::Closed) => return,
                    },
                    _ = shutdown.stopping() => return,
                }
            }
        });
    }
}

/// The decoded JOSE header of a compact JWS, or `malformed`.
fn parse_header(token: &str) -> Result<Map<String, Value>, Reason> {
    let mut parts = token.split('.');
    let (Some(header), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Reason::Malformed);
    };
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| Reason::Malformed)?;
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err(Reason::Malformed),
    }
}
