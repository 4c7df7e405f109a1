//! The in-process verifier every role uses.
//!
//! Cold path: parse the header, check the algorithm against the allow-list (never `none`, never
//! HMAC), find the key by `kid` (one rate-limited refetch for an unknown kid), verify the
//! signature (josekit over OpenSSL), validate the claims, ask the revocation store. A verified
//! token is cached, keyed by the token itself, until `exp` (plus the leeway): a hit costs a fast
//! hash (foldhash, seeded per process) and a comparison of the whole token, so no other token
//! can ever match an entry, and no cryptographic hash (a SHA-256 of the token cost more than
//! the rest of a hit together). The SHA-256 names the token in revocations, computed on the cold
//! path only. The cache is bounded (`auth.cache_capacity`): full, it evicts the tokens least in use
//! (quick_cache, the crate of every bounded cache here: see [`crate::cache`]); an expired entry is
//! refused when hit and dropped. Cached entries are dropped when a revocation is announced, and a
//! user revoked since start is checked on every hit, so a revocation is honoured on cached tokens
//! too.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use base64::Engine;
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};
use tokio::sync::broadcast::error::RecvError;

use super::claims::{self, ClaimRules, Claims, UserInfo};
use super::jwks::Jwks;
use super::revocation::{Revocation, RevocationStore, SeenSampler};
use super::{strip_bearer, unix_now, AuthError, Identity, Reason};
use crate::role::Role;
use crate::server::Shutdown;

/// Metric names of the verifier.
pub mod names {
    /// Verifications by outcome (`ok`, `cached`, or the rejection reason).
    pub const VERIFICATIONS: &str = "access_auth_verifications_total";
    /// Entries in the verified-token cache.
    pub const CACHE_ENTRIES: &str = "access_auth_token_cache_entries";

    /// Registers the descriptions.
    pub fn describe() {
        metrics::describe_counter!(
            VERIFICATIONS,
            "Token verifications, by outcome (ok, cached, or the rejection reason)"
        );
        metrics::describe_gauge!(CACHE_ENTRIES, "Verified tokens held in the cache");
    }
}

/// A verified token.
#[derive(Debug)]
pub struct Verified {
    /// Who is calling.
    pub identity: Identity,
    /// The user-facing view.
    pub info: UserInfo,
    /// Every claim, as signed (the payload's JSON, kept as text).
    pub claims: Box<RawValue>,
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
    /// Verified tokens, by the token; each entry carries its expiry (the token's `exp`), checked
    /// on every hit. quick_cache directly rather than [`crate::cache::Bounded`]: the hot path of
    /// every request reads one clock (the wall clock `exp` is compared with), not two.
    cache: quick_cache::sync::Cache<Box<str>, Arc<Verified>>,
    /// Users revoked since this process started, from announcements: subject -> not-before.
    revoked_users: RwLock<HashMap<String, u64>>,
    seen: SeenSampler,
    /// Sampled sightings for the one writer task; bounded so a flood of new users cannot queue
    /// without limit.
    sightings: tokio::sync::mpsc::Sender<Identity>,
    cached_hits: metrics::Counter,
    cold_ok: metrics::Counter,
    cache_entries: metrics::Gauge,
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
        let (sightings, mut queue) = tokio::sync::mpsc::channel::<Identity>(1024);
        let store = revocations.clone();
        // Ends when the verifier (the only sender) is dropped.
        tokio::spawn(async move {
            while let Some(identity) = queue.recv().await {
                if let Err(e) = store.record_seen(&identity).await {
                    tracing::debug!(error = %e, "could not record a user sighting");
                }
            }
        });
        Verifier {
            role,
            jwks,
            rules,
            allowed,
            revocations,
            cache: quick_cache::sync::Cache::new(capacity.max(1)),
            revoked_users: RwLock::default(),
            seen: SeenSampler::new(std::time::Duration::from_secs(60)),
            sightings,
            cache_entries: metrics::gauge!(names::CACHE_ENTRIES, "role" => role.as_str()),
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
        let now = unix_now();
        let hit = self.cache.get(token);
        if let Some(hit) = hit {
            if now > hit.identity.expires_at.saturating_add(self.rules.leeway) {
                self.cache.remove(token);
                return Err(self.rejected(Reason::Expired));
            }
            if self.locally_revoked(&hit) {
                return Err(self.rejected(Reason::Revoked));
            }
            self.cached_hits.increment(1);
            return Ok(hit);
        }
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let verified = match self.verify_cold(token, &digest, now).await {
            Ok(v) => Arc::new(v),
            Err(AuthError::Rejected(reason)) => return Err(self.rejected(reason)),
            Err(e) => return Err(e),
        };
        self.cold_ok.increment(1);
        self.cache.insert(token.into(), verified.clone());
        self.cache_entries.set(self.cache.len() as f64);
        if self.seen.should_record(&verified.identity.subject) {
            // Full queue: the sighting is dropped; it is sampled anyway and never worth a wait.
            let _ = self.sightings.try_send(verified.identity.clone());
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
        let jws = Compact::parse(token)?;
        let header = Header::parse(&jws.header)?;
        let alg = header.alg.as_ref();
        if alg.eq_ignore_ascii_case("none")
            || alg.starts_with("HS")
            || !self.allowed.iter().any(|a| a == alg)
        {
            return Err(Reason::AlgorithmNotAllowed.into());
        }
        // Extensions we do not implement (`crit`, and `b64` which needs it) must be refused.
        if header.crit.is_some() || header.b64.is_some() {
            return Err(Reason::Malformed.into());
        }
        if !self.jwks.is_loaded() {
            return Err(AuthError::Unavailable("no signing keys loaded yet".into()));
        }
        let kid = header.kid.as_deref();
        let verifier = self.jwks.verifier(kid, alg).await.map_err(|unknown_kid| {
            if unknown_kid {
                Reason::UnknownKey
            } else {
                Reason::AlgorithmNotAllowed
            }
        })?;
        // The signature over the signing input, checked before the payload is even decoded.
        if !verifier.verify(jws.signing_input.as_bytes(), &jws.signature) {
            return Err(Reason::BadSignature.into());
        }
        let payload = jws.payload()?;
        let (identity, info) = claims::validate(&Claims::parse(&payload)?, &self.rules, now)?;
        // Parsed above, so it is a JSON object; kept as text for whoever wants every claim.
        let claims = String::from_utf8(payload)
            .ok()
            .and_then(|p| RawValue::from_string(p).ok())
            .ok_or(Reason::Malformed)?;
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

    /// Applies one announced revocation to this verifier's caches.
    pub fn apply(&self, revocation: &Revocation) {
        let cache = &self.cache;
        match revocation {
            // Entries are keyed by the token, which the announcement does not carry: a pass
            // over the cache (logouts are rare beside verifications).
            Revocation::Token { hash, .. } => cache.retain(|_, v| v.token_hash != *hash),
            Revocation::User { subject, not_before } => {
                self.revoked_users
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(subject.clone(), *not_before);
                cache.retain(|_, v| &v.identity.subject != subject);
            }
            Revocation::Resync => cache.clear(),
            // API keys are not in this cache (see `api_keys::ApiKeys::follow_announcements`).
            Revocation::ApiKey { .. } => {}
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

/// The JOSE header fields we act on; the rest are ignored.
#[derive(serde::Deserialize)]
struct Header<'a> {
    #[serde(borrow)]
    alg: std::borrow::Cow<'a, str>,
    #[serde(borrow, default)]
    kid: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    crit: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    b64: Option<serde::de::IgnoredAny>,
}

impl<'a> Header<'a> {
    fn parse(bytes: &'a [u8]) -> Result<Self, Reason> {
        serde_json::from_slice(bytes).map_err(|_| Reason::Malformed)
    }
}

/// A compact JWS split into its parts: header and signature decoded, payload still encoded.
struct Compact<'a> {
    header: Vec<u8>,
    signing_input: &'a str,
    payload: &'a str,
    signature: Vec<u8>,
}

impl<'a> Compact<'a> {
    fn parse(token: &'a str) -> Result<Self, Reason> {
        let b64 = &base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let (signing_input, signature) = token.rsplit_once('.').ok_or(Reason::Malformed)?;
        let (header, payload) = signing_input.split_once('.').ok_or(Reason::Malformed)?;
        if payload.contains('.') {
            return Err(Reason::Malformed);
        }
        let header = b64.decode(header).map_err(|_| Reason::Malformed)?;
        let signature = b64.decode(signature).map_err(|_| Reason::Malformed)?;
        Ok(Compact { header, signing_input, payload, signature })
    }

    /// The decoded payload bytes.
    fn payload(&self) -> Result<Vec<u8>, Reason> {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(self.payload)
            .map_err(|_| Reason::Malformed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::devkey::{DevKey, TokenRequest};
    use crate::auth::jwks::Jwks;
    use crate::auth::revocation::MemoryStore;
    use std::time::Duration;

    fn verifier(key: &DevKey, capacity: usize) -> Verifier {
        let rules = ClaimRules {
            issuer: None,
            audience: None,
            leeway: 0,
            default_tenant: None,
            service_role: "service".into(),
        };
        Verifier::new(
            Role::Auth,
            Arc::new(Jwks::fixed(Role::Auth, key.key_set())),
            rules,
            vec!["ES256".into()],
            Arc::new(MemoryStore::new()),
            capacity,
        )
    }

    fn token(key: &DevKey, subject: &str, ttl: Duration) -> String {
        let roles = ["trader".to_string()];
        let request = TokenRequest {
            subject,
            tenant: "t1",
            roles: &roles,
            ttl,
            issuer: None,
            audience: None,
        };
        key.issue(&request).unwrap()
    }

    fn cached(v: &Verifier, token: &str) -> bool {
        v.cache.get(token).is_some()
    }

    #[tokio::test]
    async fn a_cached_token_matches_only_itself_and_its_revocation_drops_only_it() {
        let dir = tempfile::tempdir().unwrap();
        let key = DevKey::load_or_create(&dir.path().join("k.json")).unwrap();
        let v = verifier(&key, 64);
        let (a, b) = (
            token(&key, "a", Duration::from_secs(600)),
            token(&key, "b", Duration::from_secs(600)),
        );
        assert_eq!(v.verify(&a).await.unwrap().identity.subject, "a");
        v.verify(&b).await.unwrap();
        assert!(cached(&v, &a) && cached(&v, &b));
        // The same token with its last signature character changed: never served from the
        // cache (the whole token is compared), and refused on its own merits.
        let mut forged = a.clone();
        let last = forged.pop().unwrap();
        forged.push(if last == 'A' { 'B' } else { 'A' });
        assert!(!cached(&v, &forged));
        assert!(v.verify(&forged).await.is_err(), "a changed signature is refused");
        // A token revocation names the token by its SHA-256: that entry goes, the other stays.
        let hash = crate::auth::token_hash(&a);
        v.apply(&Revocation::Token { hash, until: unix_now() + 600 });
        assert!(!cached(&v, &a), "the revoked token's entry is dropped");
        assert!(cached(&v, &b), "only that one");
    }

    #[tokio::test]
    async fn a_full_cache_keeps_the_tokens_in_use_and_never_empties_itself() {
        let dir = tempfile::tempdir().unwrap();
        let key = DevKey::load_or_create(&dir.path().join("k.json")).unwrap();
        let v = verifier(&key, 64);
        let tokens: Vec<String> =
            (0..200).map(|i| token(&key, &format!("u{i}"), Duration::from_secs(600))).collect();
        for t in &tokens {
            v.verify(t).await.unwrap();
            v.verify(t).await.unwrap(); // in use: the request after the first one hits
        }
        assert!((48..=80).contains(&v.cache.len()), "{}", v.cache.len());
        assert!(tokens[170..].iter().all(|t| cached(&v, t)), "the latest are kept");
        assert!(tokens[..64].iter().all(|t| !cached(&v, t)), "the oldest went first");
    }

    #[tokio::test]
    async fn a_cached_token_is_refused_once_expired_and_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let key = DevKey::load_or_create(&dir.path().join("k.json")).unwrap();
        let v = verifier(&key, 64);
        let short = token(&key, "a", Duration::from_secs(1));
        v.verify(&short).await.unwrap();
        assert!(cached(&v, &short));
        tokio::time::sleep(Duration::from_millis(2100)).await;
        assert!(matches!(v.verify(&short).await, Err(AuthError::Rejected(Reason::Expired))));
        assert!(!cached(&v, &short), "dropped");
        // Revocation still empties what it must.
        let (one, two) = (
            token(&key, "b", Duration::from_secs(600)),
            token(&key, "c", Duration::from_secs(600)),
        );
        v.verify(&one).await.unwrap();
        v.verify(&two).await.unwrap();
        v.apply(&Revocation::User { subject: "b".into(), not_before: unix_now() });
        assert!(!cached(&v, &one) && cached(&v, &two));
        v.apply(&Revocation::Resync);
        assert!(!cached(&v, &two));
    }
}
