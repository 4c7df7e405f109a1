//! The auth module: in-process JWT verification used by every role (no network hop per request),
//! revocation, the dev signing key and the service-token source. The auth role
//! (`roles::auth`) serves it over HTTP.
//!
//! - [`api_keys`]: API keys (`X-API-Key`), stored hashed, with rotation and revocation.
//! - [`claims`]: claim validation and role extraction (pure).
//! - [`jwks`]: the signing keys: fetched from the IdP's JWKS, or the dev key.
//! - [`devkey`]: the dev signing key file shared by every process on a machine.
//! - [`rsa`]: RS256/384/512 checks with pooled OpenSSL contexts (the hot path of cold verification).
//! - [`revocation`]: revoked tokens and users, in Redis or in memory, announced to every verifier.
//! - [`verifier`]: the verifier with its verified-token cache.
//! - [`token_source`]: service tokens for calls between roles.
//! - [`extract`]: the `Caller` extractor for handlers that need an identity.

pub mod api_keys;
pub mod claims;
pub mod devkey;
pub mod extract;
pub mod jwks;
pub mod revocation;
pub mod rsa;
pub mod token_source;
pub mod verifier;

use std::fmt;
use std::sync::Arc;

use serde::Serialize;
use sha2::{Digest, Sha256};

pub use claims::{ClaimRules, UserInfo};
pub use extract::Caller;
pub use verifier::{Verified, Verifier};

use crate::error::{ApiError, ErrorCode};

/// Who is calling, once verified (`docs/contracts.md`, Identity).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Identity {
    /// `sub` for users and services; `apikey:<key id>` for API keys.
    pub subject: String,
    /// The tenant; never empty.
    pub tenant: String,
    /// Our roles only.
    pub roles: Vec<String>,
    /// How the caller authenticated.
    pub kind: IdentityKind,
    /// Unix seconds after which the credential is no longer valid.
    pub expires_at: u64,
}

impl Identity {
    /// Whether the identity has `role`.
    pub fn has_role(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r == role)
    }
}

/// How a caller authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum IdentityKind {
    /// A JWT from the IdP (or the dev key).
    User,
    /// An API key.
    ApiKey,
    /// A service token (has the service role).
    Service,
}

/// Why a credential was refused: the `reason` of an `unauthenticated` error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// `exp` has passed (beyond the leeway).
    Expired,
    /// `nbf` or `iat` is in the future (beyond the leeway).
    NotYetValid,
    /// The signature does not verify.
    BadSignature,
    /// No key with the token's `kid`, even after a refetch.
    UnknownKey,
    /// `iss` is not ours.
    WrongIssuer,
    /// Neither `aud` nor `azp` names our client.
    WrongAudience,
    /// The algorithm is not on the allow-list (`none` and HMAC never are).
    AlgorithmNotAllowed,
    /// Not a JWT, or a required claim is missing or mistyped; also a missing credential.
    Malformed,
    /// The token, or every token of its user issued before a time, was revoked.
    Revoked,
    /// No `tenant_id` claim and no default tenant.
    MissingTenant,
}

impl Reason {
    /// The wire name (`expired`).
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Expired => "expired",
            Reason::NotYetValid => "not_yet_valid",
            Reason::BadSignature => "bad_signature",
            Reason::UnknownKey => "unknown_key",
            Reason::WrongIssuer => "wrong_issuer",
            Reason::WrongAudience => "wrong_audience",
            Reason::AlgorithmNotAllowed => "algorithm_not_allowed",
            Reason::Malformed => "malformed",
            Reason::Revoked => "revoked",
            Reason::MissingTenant => "missing_tenant",
        }
    }

    /// A human message for the reason.
    pub fn message(self) -> &'static str {
        match self {
            Reason::Expired => "the token has expired",
            Reason::NotYetValid => "the token is not valid yet",
            Reason::BadSignature => "the token's signature does not verify",
            Reason::UnknownKey => "the token was signed by a key we do not know",
            Reason::WrongIssuer => "the token was issued by another issuer",
            Reason::WrongAudience => "the token is not meant for this service",
            Reason::AlgorithmNotAllowed => "the token's signing algorithm is not allowed",
            Reason::Malformed => "the credential is missing or malformed",
            Reason::Revoked => "the token has been revoked",
            Reason::MissingTenant => "the token names no tenant",
        }
    }
}

impl Reason {
    /// A human message for the reason when the credential was an API key (`X-API-Key`), which
    /// has an id and a secret, not a signature or claims.
    pub fn api_key_message(self) -> &'static str {
        match self {
            Reason::BadSignature => "the API key's secret does not match",
            Reason::UnknownKey => "no API key has this id",
            Reason::Expired => "the API key has expired",
            Reason::Revoked => "the API key has been revoked",
            Reason::Malformed => "the API key is malformed (an API key is ak_<id>_<secret>)",
            // Not produced for API keys; the token wording is the best there is.
            other => other.message(),
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A verification that did not produce an identity.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuthError {
    /// The credential is refused (401).
    #[error("{0}")]
    Rejected(Reason),
    /// We could not decide: no keys ever loaded, or the revocation store is down (503).
    #[error("authentication unavailable: {0}")]
    Unavailable(String),
}

impl From<Reason> for AuthError {
    fn from(reason: Reason) -> Self {
        AuthError::Rejected(reason)
    }
}

impl AuthError {
    /// The error answered for a refused API key: the same code and `reason` as for a token, in
    /// API-key words.
    pub fn into_api_key_error(self) -> ApiError {
        match self {
            AuthError::Rejected(reason) => {
                ApiError::new(ErrorCode::Unauthenticated, reason.api_key_message())
                    .with_reason(reason.as_str())
            }
            other => ApiError::from(other),
        }
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::Rejected(reason) => {
                ApiError::new(ErrorCode::Unauthenticated, reason.message())
                    .with_reason(reason.as_str())
            }
            AuthError::Unavailable(cause) => ApiError::dependency("auth", anyhow::anyhow!(cause)),
        }
    }
}

/// The hex SHA-256 of a token: how a token is named in Redis and in announcements.
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Strips an optional `Bearer ` prefix (any case) and surrounding space.
pub fn strip_bearer(raw: &str) -> &str {
    let raw = raw.trim();
    match raw.get(..7) {
        Some(prefix) if prefix.eq_ignore_ascii_case("bearer ") => raw[7..].trim(),
        _ => raw,
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The shared handles every role that authenticates needs.
#[derive(Clone)]
pub struct Auth {
    /// The verifier.
    pub verifier: Arc<Verifier>,
    /// Revocations and user records.
    pub revocations: Arc<dyn revocation::RevocationStore>,
    /// The dev key, in dev mode.
    pub dev_key: Option<Arc<devkey::DevKey>>,
    /// API keys.
    pub api_keys: Arc<api_keys::ApiKeys>,
    /// The process's PostgreSQL pool, migrated, when `postgres_dsn` is set (shared with the
    /// roles that store data there).
    pub postgres: Option<deadpool_postgres::Pool>,
    /// The process's one Redis command connection and its breaker, when `redis_url` is set:
    /// revocations here, and every role of the process that keeps state in Redis (rate limits,
    /// the response cache, the decision cache, the SSE relay), so that one breaker decides for
    /// all of them and a Redis failure is noticed once, not once per use.
    pub redis: Option<crate::backends::redis::Guarded>,
    /// The process's one subscriber connection for control channels (revocations, rules
    /// versions), when `redis_url` is set.
    pub channels: Option<crate::backends::redis::Channels>,
}

impl Auth {
    /// Stores and announces a revocation, and applies it to this process's verifier at once
    /// (the other processes apply it on the announcement).
    pub async fn revoke(
        &self,
        revocation: revocation::Revocation,
    ) -> Result<(), revocation::RevocationError> {
        self.revocations.revoke(revocation.clone()).await?;
        self.verifier.apply(&revocation);
        Ok(())
    }

    /// Builds the auth handles from the configuration: keys (JWKS or the dev key), the revocation
    /// store (Redis or memory), the verifier and its background tasks. Registers the `jwks` (and
    /// `redis`) readiness checks on `ctx`.
    pub async fn build(ctx: &crate::server::Context) -> Result<Auth, crate::server::StartError> {
        use crate::config::Environment;
        let config = &ctx.config;
        let auth = &config.auth;
        let (jwks, dev_key) = match &config.jwks_url {
            Some(url) => {
                let jwks = Arc::new(
                    jwks::Jwks::remote(
                        ctx.role,
                        url.clone(),
                        auth.algorithms.clone(),
                        auth.jwks_timeout,
                        auth.jwks_cooldown,
                    )
                    .map_err(|e| crate::server::StartError::Invalid(e.to_string()))?,
                );
                // A failed first fetch is not fatal: the role stays not-ready and keeps trying.
                if let Err(e) = jwks.refresh("startup").await {
                    tracing::warn!(role = %ctx.role, error = %e, "no signing keys yet; not ready until the JWKS answers");
                }
                jwks.spawn_refresh(auth.jwks_refresh, ctx.shutdown.clone());
                (jwks, None)
            }
            None => {
                if config.env == Environment::Production {
                    return Err(crate::server::StartError::Invalid(
                        "dev mode (no ACCESS_JWKS_URL) is refused when ACCESS_ENV=production"
                            .into(),
                    ));
                }
                let path = auth.dev_key_path();
                let key = devkey::DevKey::load_or_create(&path)
                    .map_err(|e| crate::server::StartError::Invalid(format!("dev key: {e}")))?;
                tracing::warn!(role = %ctx.role, key = %path.display(),
                    "DEV MODE: tokens are verified against a local dev key, not an identity provider; never use this in production");
                (Arc::new(jwks::Jwks::fixed(ctx.role, key.key_set())), Some(Arc::new(key)))
            }
        };
        let (mut redis, mut channels) = (None, None);
        let revocations: Arc<dyn revocation::RevocationStore> = match &config.redis_url {
            Some(url) => {
                let client = crate::backends::redis::connect(url, &config.redis).await?;
                let shutdown = ctx.shutdown.clone();
                let subscriber =
                    crate::backends::redis::Channels::connect(url, &config.redis, async move {
                        shutdown.stopping().await
                    })
                    .await?;
                channels = Some(subscriber.clone());
                // The process's one command connection, with its one breaker: revocations here,
                // and every role of the process that uses Redis (`Auth::redis`).
                let guarded = crate::backends::redis::Guarded::new(
                    client,
                    ctx.role,
                    "commands",
                    &config.redis,
                );
                redis = Some(guarded.clone());
                revocation::RedisStore::start(
                    guarded,
                    subscriber,
                    config.redis_prefix(),
                    auth.max_token_lifetime,
                    revocation::Durability::new(url, &config.redis),
                    ctx.shutdown.clone(),
                )
                .await
                .map_err(|e| crate::backends::BackendError::new("redis", url.redacted(), e))?
            }
            None => Arc::new(revocation::MemoryStore::new()),
        };
        let verifier = Arc::new(Verifier::new(
            ctx.role,
            jwks.clone(),
            claims::ClaimRules::from(auth),
            auth.algorithms.clone(),
            revocations.clone(),
            auth.cache_capacity,
        ));
        verifier.spawn_revocation_listener(ctx.shutdown.clone());
        let postgres = match &config.postgres_dsn {
            Some(dsn) => {
                Some(crate::backends::postgres::connect_and_migrate(dsn, &config.postgres).await?)
            }
            None => None,
        };
        let key_store: Arc<dyn api_keys::KeyStore> = match &postgres {
            Some(pool) => Arc::new(api_keys::PgKeys::new(pool.clone())),
            None => Arc::new(api_keys::MemoryKeys::default()),
        };
        let auth = Auth {
            verifier,
            revocations: revocations.clone(),
            dev_key,
            api_keys: Arc::new(match &postgres {
                Some(pool) => {
                    // While open, `SELECT 1` in the background closes it when PostgreSQL is back.
                    let probe = crate::backends::postgres::ready_check(pool.clone());
                    let breaker = crate::backends::breaker::Breaker::new(
                        ctx.role,
                        "postgres",
                        "api_keys",
                        config.postgres.breaker.clone(),
                        Some(Box::new(probe)),
                    );
                    api_keys::ApiKeys::new(key_store)
                        .with_breaker(breaker, config.postgres.connect_timeout)
                }
                None => api_keys::ApiKeys::new(key_store),
            }),
            postgres,
            redis,
            channels,
        };
        auth.api_keys.follow_announcements(auth.revocations.subscribe(), ctx.shutdown.clone());
        auth.add_checks(ctx);
        Ok(auth)
    }

    /// Registers the `jwks` (and `redis`) readiness checks on a role's context: every role that
    /// authenticates needs the keys (hard). Redis, where revocations live, is soft: without it
    /// tokens already verified keep working and a token not yet seen is refused at once (503
    /// `dependency_unavailable`), so the role still serves (`degraded`).
    pub fn add_checks(&self, ctx: &crate::server::Context) {
        let loaded = self.verifier.jwks().clone();
        ctx.readiness.add_check(
            "jwks",
            crate::server::readiness::loaded(
                move || loaded.is_loaded(),
                "no signing keys loaded from the JWKS yet",
            ),
        );
        if let Some(client) = &self.redis {
            ctx.readiness.add_soft_check("redis", client.ready_check());
        }
        if let Some(pool) = &self.postgres {
            // Soft for every role: API keys seen recently keep working from their cached records,
            // and the entitlements role (whose pool this is) answers from its rules snapshot.
            ctx.readiness
                .add_soft_check("postgres", crate::backends::postgres::ready_check(pool.clone()));
        }
    }
}
