//! The signing keys tokens are verified against.
//!
//! Remote mode: the IdP's JWKS, fetched at start-up (the role is not ready until one fetch
//! succeeded), refreshed every `auth.jwks_refresh`, and refetched once when a token names an
//! unknown `kid`: single-flight (one fetch at a time) and at most once per `auth.jwks_cooldown`, so
//! a flood of made-up kids cannot hammer the IdP. A failed fetch keeps the last good key set.
//! Dev mode: the dev key's public half, fixed.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use josekit::jwk::Jwk;
use josekit::jws::JwsVerifier;
use tracing::Instrument as _;
use url::Url;

use crate::role::Role;
use crate::server::Shutdown;

/// Metric names of the key store.
pub mod names {
    /// JWKS fetches by reason and outcome.
    pub const FETCHES: &str = "access_auth_jwks_fetches_total";
    /// Unix time of the last successful fetch.
    pub const LAST_SUCCESS: &str = "access_auth_jwks_last_success_timestamp_seconds";
    /// Keys in the current set.
    pub const KEYS: &str = "access_auth_jwks_keys";

    /// Registers the descriptions.
    pub fn describe() {
        metrics::describe_counter!(
            FETCHES,
            "JWKS fetches, by reason (startup, periodic, unknown_kid) and outcome"
        );
        metrics::describe_gauge!(
            LAST_SUCCESS,
            metrics::Unit::Seconds,
            "Unix time of the last successful JWKS fetch"
        );
        metrics::describe_gauge!(KEYS, "Signing keys in the current JWKS");
    }
}

/// Why no key set was loaded: a JWKS that does not parse, or a fetch that failed. The last good
/// set stays; the text names the JWKS URL (never a token).
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    /// The document is not JSON.
    #[error("JWKS is not JSON: {0}")]
    NotJson(#[source] serde_json::Error),
    /// The document has no `keys` array.
    #[error("JWKS has no \"keys\" array")]
    NoKeysArray,
    /// The JWKS has no signature key usable with an allowed algorithm.
    #[error("{0} has no usable signing key")]
    NoUsableKey(Url),
    /// The HTTP client could not be built.
    #[error("{0}")]
    Client(#[source] reqwest::Error),
    /// The IdP did not answer, or its body could not be read.
    #[error("{what} {url}: {source}")]
    Fetch {
        /// `fetching` or `reading`.
        what: &'static str,
        /// The JWKS URL.
        url: Url,
        /// The cause.
        #[source]
        source: reqwest::Error,
    },
    /// The IdP answered with an error status.
    #[error("fetching {url}: HTTP {status}")]
    Status {
        /// The JWKS URL.
        url: Url,
        /// Its answer.
        status: reqwest::StatusCode,
    },
}

/// Checks one key's signatures for one algorithm.
pub enum SignatureCheck {
    /// RS256/384/512 with pooled OpenSSL contexts (see [`super::rsa`]).
    Rsa(super::rsa::RsaVerifier),
    /// Every other algorithm, through josekit.
    Jose(Box<dyn JwsVerifier>),
}

impl SignatureCheck {
    /// Whether `signature` signs `message`.
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        match self {
            SignatureCheck::Rsa(v) => v.verify(message, signature),
            SignatureCheck::Jose(v) => v.verify(message, signature).is_ok(),
        }
    }
}

/// A parsed key set: per `kid`, a signature check per algorithm the key may sign with.
#[derive(Default)]
pub struct KeySet {
    keys: HashMap<String, HashMap<&'static str, Arc<SignatureCheck>>>,
}

impl KeySet {
    /// Parses a JWKS document, keeping signature keys usable with an allowed algorithm.
    pub fn from_jwks(document: &[u8], allowed: &[String]) -> Result<KeySet, JwksError> {
        let doc: serde_json::Value =
            serde_json::from_slice(document).map_err(JwksError::NotJson)?;
        let list = doc.get("keys").and_then(|k| k.as_array()).ok_or(JwksError::NoKeysArray)?;
        let mut set = KeySet::default();
        for (i, raw) in list.iter().enumerate() {
            let Some(map) = raw.as_object() else { continue };
            let Ok(jwk) = Jwk::from_map(map.clone()) else { continue };
            if jwk.key_use().is_some_and(|u| u != "sig") {
                continue;
            }
            let kid = jwk.key_id().map(String::from).unwrap_or_else(|| format!("#{i}"));
            let verifiers = verifiers_for(&jwk, allowed);
            if !verifiers.is_empty() {
                set.keys.insert(kid, verifiers);
            }
        }
        Ok(set)
    }

    /// The verifier for a token's `kid` and `alg`. A token without `kid` matches when the set
    /// holds exactly one key.
    pub fn verifier(&self, kid: Option<&str>, alg: &str) -> Option<Arc<SignatureCheck>> {
        let by_alg = match kid {
            Some(kid) => self.keys.get(kid)?,
            None if self.keys.len() == 1 => self.keys.values().next()?,
            None => return None,
        };
        by_alg.get(alg).cloned()
    }

    /// Whether the set knows this `kid` at all (for any algorithm).
    pub fn has_kid(&self, kid: Option<&str>) -> bool {
        match kid {
            Some(kid) => self.keys.contains_key(kid),
            None => self.keys.len() == 1,
        }
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

fn verifiers_for(jwk: &Jwk, allowed: &[String]) -> HashMap<&'static str, Arc<SignatureCheck>> {
    use josekit::jws::{EdDSA, ES256, ES384, PS256, PS384, PS512};
    let candidates: &[&'static str] = match (jwk.key_type(), jwk.curve()) {
        ("RSA", _) => &["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"],
        ("EC", Some("P-256")) => &["ES256"],
        ("EC", Some("P-384")) => &["ES384"],
        ("OKP", Some("Ed25519")) => &["EdDSA"],
        _ => &[],
    };
    let mut out: HashMap<&'static str, Arc<SignatureCheck>> = HashMap::new();
    let rsa_part = |name: &str| jwk.parameter(name).and_then(|v| v.as_str());
    for &alg in candidates {
        if !allowed.iter().any(|a| a == alg) || jwk.algorithm().is_some_and(|a| a != alg) {
            continue;
        }
        let jose =
            |v: Result<Box<dyn JwsVerifier>, josekit::JoseError>| v.ok().map(SignatureCheck::Jose);
        let check = match alg {
            "RS256" | "RS384" | "RS512" => match (rsa_part("n"), rsa_part("e")) {
                (Some(n), Some(e)) => {
                    super::rsa::RsaVerifier::from_components(alg, n, e).map(SignatureCheck::Rsa)
                }
                _ => None,
            },
            "PS256" => jose(PS256.verifier_from_jwk(jwk).map(|v| Box::new(v) as _)),
            "PS384" => jose(PS384.verifier_from_jwk(jwk).map(|v| Box::new(v) as _)),
            "PS512" => jose(PS512.verifier_from_jwk(jwk).map(|v| Box::new(v) as _)),
            "ES256" => jose(ES256.verifier_from_jwk(jwk).map(|v| Box::new(v) as _)),
            "ES384" => jose(ES384.verifier_from_jwk(jwk).map(|v| Box::new(v) as _)),
            "EdDSA" => jose(EdDSA.verifier_from_jwk(jwk).map(|v| Box::new(v) as _)),
            _ => None,
        };
        if let Some(check) = check {
            out.insert(alg, Arc::new(check));
        }
    }
    out
}

/// Where keys come from.
enum Source {
    Remote { url: Url, http: reqwest::Client },
    Fixed,
}

/// The current key set and how to refresh it.
pub struct Jwks {
    role: Role,
    source: Source,
    allowed: Vec<String>,
    /// Swapped whole on refresh; readers clone the `Arc` (a short read lock, no I/O under it).
    current: RwLock<Arc<KeySet>>,
    /// Held across an unknown-kid refetch so only one runs at a time; holds when it last ran.
    refetch: tokio::sync::Mutex<Option<Instant>>,
    cooldown: Duration,
    loaded: std::sync::atomic::AtomicBool,
}

impl Jwks {
    /// A key store over the IdP's JWKS. Call [`Jwks::refresh`] before serving.
    pub fn remote(
        role: Role,
        url: Url,
        allowed: Vec<String>,
        timeout: Duration,
        cooldown: Duration,
    ) -> Result<Self, JwksError> {
        let http =
            reqwest::Client::builder().timeout(timeout).build().map_err(JwksError::Client)?;
        Ok(Self::new(role, Source::Remote { url, http }, allowed, KeySet::default(), cooldown))
    }

    /// A fixed key set (dev mode).
    pub fn fixed(role: Role, set: KeySet) -> Self {
        let jwks = Self::new(role, Source::Fixed, Vec::new(), set, Duration::ZERO);
        jwks.loaded.store(true, std::sync::atomic::Ordering::Release);
        jwks
    }

    fn new(
        role: Role,
        source: Source,
        allowed: Vec<String>,
        set: KeySet,
        cooldown: Duration,
    ) -> Self {
        Jwks {
            role,
            source,
            allowed,
            current: RwLock::new(Arc::new(set)),
            refetch: tokio::sync::Mutex::new(None),
            cooldown,
            loaded: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The current key set.
    pub fn current(&self) -> Arc<KeySet> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Whether a key set was ever loaded (readiness).
    pub fn is_loaded(&self) -> bool {
        self.loaded.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Fetches the JWKS now; on failure the last good set stays.
    pub async fn refresh(&self, why: &'static str) -> Result<(), JwksError> {
        let Source::Remote { url, http } = &self.source else { return Ok(()) };
        let fetch = |what| move |source| JwksError::Fetch { what, url: url.clone(), source };
        let result = async {
            let response = http
                .get(url.clone())
                .headers(crate::telemetry::trace_headers())
                .send()
                .await
                .map_err(fetch("fetching"))?;
            if !response.status().is_success() {
                return Err(JwksError::Status { url: url.clone(), status: response.status() });
            }
            let body = response.bytes().await.map_err(fetch("reading"))?;
            let set = KeySet::from_jwks(&body, &self.allowed)?;
            if set.is_empty() {
                return Err(JwksError::NoUsableKey(url.clone()));
            }
            Ok(set)
        }
        // A span of its own (a child of the request's, for an unknown kid), whose context the
        // IdP receives.
        .instrument(tracing::info_span!("jwks_fetch", reason = why))
        .await;
        let role = self.role.as_str();
        match result {
            Ok(set) => {
                metrics::gauge!(names::KEYS, "role" => role).set(set.len() as f64);
                metrics::gauge!(names::LAST_SUCCESS, "role" => role)
                    .set(crate::auth::unix_now() as f64);
                metrics::counter!(names::FETCHES, "role" => role, "reason" => why, "outcome" => "ok").increment(1);
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(set);
                self.loaded.store(true, std::sync::atomic::Ordering::Release);
                Ok(())
            }
            Err(e) => {
                metrics::counter!(names::FETCHES, "role" => role, "reason" => why, "outcome" => "error").increment(1);
                tracing::warn!(role, reason = why, error = %e, "JWKS fetch failed; keeping the last good keys");
                Err(e)
            }
        }
    }

    /// The verifier for `kid`/`alg`, refetching once (single-flight, rate-limited) for an unknown
    /// kid. `Err(true)` when the kid is unknown, `Err(false)` when the kid is known but not for
    /// this algorithm.
    pub async fn verifier(
        &self,
        kid: Option<&str>,
        alg: &str,
    ) -> Result<Arc<SignatureCheck>, bool> {
        let set = self.current();
        if let Some(v) = set.verifier(kid, alg) {
            return Ok(v);
        }
        if set.has_kid(kid) || matches!(self.source, Source::Fixed) {
            return Err(!set.has_kid(kid));
        }
        let mut last = self.refetch.lock().await;
        // Another task may have refetched while we waited for the lock.
        let set = self.current();
        if let Some(v) = set.verifier(kid, alg) {
            return Ok(v);
        }
        if last.is_none_or(|at| at.elapsed() >= self.cooldown) {
            *last = Some(Instant::now());
            let _ = self.refresh("unknown_kid").await;
        }
        drop(last);
        let set = self.current();
        set.verifier(kid, alg).ok_or(!set.has_kid(kid))
    }

    /// Refreshes every `interval` until shutdown; while no set was ever loaded, retries sooner.
    pub fn spawn_refresh(self: &Arc<Self>, interval: Duration, shutdown: Shutdown) {
        if matches!(self.source, Source::Fixed) {
            return;
        }
        let jwks = self.clone();
        tokio::spawn(async move {
            loop {
                let wait =
                    if jwks.is_loaded() { interval } else { Duration::from_secs(1).min(interval) };
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.stopping() => return,
                }
                let _ = jwks.refresh("periodic").await;
            }
        });
    }
}
