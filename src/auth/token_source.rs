//! Service tokens for calls between roles.
//!
//! Two modes: dev (signed with the dev key: `sub = service:<role>`, the service role) and OAuth
//! client credentials (token URL, client id, secret). Either way the token is cached and renewed
//! before it expires: once 80% of its lifetime has passed.
//!
//! Renewal never holds a caller up while the current token is valid: the first caller past the
//! renewal point starts one renewal in the background and every caller keeps the current token
//! until it expires. The token endpoint has its own breaker (`backend="token_endpoint"` in
//! `access_backend_breaker_*`): a failed or unanswered fetch opens it for 1 s, doubling up to
//! 30 s; while it is open no fetch is attempted, and one fetch is let through as the probe once
//! the interval has passed. So a token endpoint that is down or frozen for less than the last
//! 20% of a token's life costs nothing. Failures are counted
//! (`access_service_token_renewal_failures_total`). Only with no valid token left does a call
//! wait for a fetch (one at a time), and while the breaker is open it fails at once.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;
use tracing::Instrument as _;

use super::devkey::{DevKey, TokenRequest};
use crate::backends::breaker::{self, Breaker};
use crate::config::Secret;

/// How long dev service tokens live.
const DEV_TTL: Duration = Duration::from_secs(3600);

/// Metric names.
pub mod names {
    /// Failed service-token renewals.
    pub const RENEWAL_FAILURES: &str = "access_service_token_renewal_failures_total";

    /// Registers the descriptions.
    pub fn describe() {
        metrics::describe_counter!(
            RENEWAL_FAILURES,
            "Service-token fetches that failed (the current token, while valid, stays in use)"
        );
    }
}

/// The token endpoint's breaker: open 1 s after a failure, doubling up to 30 s.
const OPEN_MIN: Duration = Duration::from_secs(1);
const OPEN_MAX: Duration = Duration::from_secs(30);

/// The current token and its schedule.
struct Cached {
    token: Option<String>,
    /// When to renew (80% of the lifetime).
    renew_at: Instant,
    /// When the token stops being usable (its expiry, less a margin for the trip).
    expires_at: Instant,
    /// A background renewal is running.
    renewing: bool,
}

/// Where service tokens come from (a cheap handle: clones share the token).
#[derive(Clone)]
pub struct TokenSource {
    inner: Arc<Inner>,
}

struct Inner {
    mode: Mode,
    /// The current token. A std mutex: held for a few reads and writes, never across I/O.
    cached: Mutex<Cached>,
    /// Held across a foreground fetch (no valid token), so concurrent callers wait for one
    /// fetch instead of each starting their own.
    fetching: tokio::sync::Mutex<()>,
    failures: AtomicU64,
    role: &'static str,
}

enum Mode {
    Dev {
        key: Arc<DevKey>,
        subject: String,
        tenant: String,
        roles: Vec<String>,
        issuer: Option<String>,
        audience: Option<String>,
    },
    ClientCredentials {
        http: reqwest::Client,
        token_url: url::Url,
        client_id: String,
        secret: Secret,
        timeout: Duration,
        breaker: Arc<Breaker>,
    },
}

impl Cached {
    fn empty() -> Self {
        let now = Instant::now();
        Cached { token: None, renew_at: now, expires_at: now, renewing: false }
    }
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    expires_in: Option<u64>,
}

impl TokenSource {
    fn from_mode(mode: Mode, role: &'static str) -> Self {
        TokenSource {
            inner: Arc::new(Inner {
                mode,
                cached: Mutex::new(Cached::empty()),
                fetching: tokio::sync::Mutex::new(()),
                failures: AtomicU64::new(0),
                role,
            }),
        }
    }

    /// Dev mode: tokens signed by the dev key for `service:<name>`.
    pub fn dev(
        key: Arc<DevKey>,
        name: &str,
        tenant: String,
        service_role: String,
        issuer: Option<String>,
        audience: Option<String>,
    ) -> Self {
        let mode = Mode::Dev {
            key,
            subject: format!("service:{name}"),
            tenant,
            roles: vec![service_role],
            issuer,
            audience,
        };
        Self::from_mode(mode, "unknown")
    }

    /// Client credentials against `token_url`, each fetch given `timeout`; the breaker's
    /// metrics are labelled with `role`. Fails only if the HTTP client cannot be built.
    pub fn client_credentials(
        token_url: url::Url,
        client_id: String,
        secret: Secret,
        timeout: Duration,
        role: crate::role::Role,
    ) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder().timeout(timeout).build()?;
        let config =
            breaker::Config { trip_after: timeout, open_min: OPEN_MIN, open_max: OPEN_MAX };
        // No background probe: the next fetch after the interval is the probe.
        let breaker = Breaker::new(role, "token_endpoint", "service_tokens", config, None);
        let mode = Mode::ClientCredentials { http, token_url, client_id, secret, timeout, breaker };
        Ok(Self::from_mode(mode, role.as_str()))
    }

    /// Labels the failure metric with the role that uses this source (dev mode).
    pub fn for_role_label(self, role: crate::role::Role) -> Self {
        match Arc::try_unwrap(self.inner) {
            Ok(mut inner) => {
                inner.role = role.as_str();
                TokenSource { inner: Arc::new(inner) }
            }
            Err(inner) => TokenSource { inner },
        }
    }

    /// Renewals that failed so far.
    pub fn renewal_failures(&self) -> u64 {
        self.inner.failures.load(Ordering::Relaxed)
    }

    /// A valid token. Past 80% of its lifetime a renewal starts in the background and the
    /// current token is returned until it expires; only with no valid token does the call
    /// wait for a fetch (refused at once while the token endpoint's breaker is open).
    pub async fn token(&self) -> Result<String, String> {
        if let Some(token) = self.current() {
            return Ok(token);
        }
        let _one_fetch = self.inner.fetching.lock().await;
        // Another caller may have fetched while this one waited.
        if let Some(token) = self.current() {
            return Ok(token);
        }
        self.inner.renew().await
    }

    /// The current token if still valid, starting a background renewal when one is due.
    fn current(&self) -> Option<String> {
        let mut cached = self.inner.cached.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let token = cached.token.clone().filter(|_| now < cached.expires_at)?;
        if now >= cached.renew_at && !cached.renewing {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                cached.renewing = true;
                let inner = self.inner.clone();
                runtime.spawn(async move {
                    let _ = inner.renew().await;
                    inner.cached.lock().unwrap_or_else(|p| p.into_inner()).renewing = false;
                });
            }
        }
        Some(token)
    }
}

impl Inner {
    /// Fetches a token and makes it current; a failure is counted and leaves the current
    /// token (if any) in place.
    async fn renew(&self) -> Result<String, String> {
        match self.fetch().await {
            Ok((token, lifetime)) => {
                let fetched = Instant::now();
                // A token is not sent in its last moments: it could expire on the way.
                let margin = (lifetime / 10).min(Duration::from_secs(5));
                let mut cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
                cached.token = Some(token.clone());
                cached.renew_at = fetched + lifetime.mul_f64(0.8);
                cached.expires_at = fetched + lifetime - margin;
                Ok(token)
            }
            Err(Fetch::Refused(e)) => Err(e),
            Err(Fetch::Failed(e)) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                metrics::counter!(names::RENEWAL_FAILURES, "role" => self.role).increment(1);
                tracing::warn!(role = self.role, error = %e, "service token fetch failed; the current token (if still valid) stays in use");
                Err(e)
            }
        }
    }

    async fn fetch(&self) -> Result<(String, Duration), Fetch> {
        match &self.mode {
            Mode::Dev { key, subject, tenant, roles, issuer, audience } => {
                let token = key
                    .issue(&TokenRequest {
                        subject,
                        tenant,
                        roles,
                        ttl: DEV_TTL,
                        issuer: issuer.as_deref(),
                        audience: audience.as_deref(),
                    })
                    .map_err(|e| Fetch::Failed(e.to_string()))?;
                Ok((token, DEV_TTL))
            }
            Mode::ClientCredentials { http, token_url, client_id, secret, timeout, breaker } => {
                let request = async {
                    let span = tracing::info_span!("service_token_fetch");
                    let response = http
                        .post(token_url.clone())
                        .headers(span.in_scope(crate::telemetry::trace_headers))
                        .form(&[
                            ("grant_type", "client_credentials"),
                            ("client_id", client_id),
                            ("client_secret", secret.expose()),
                        ])
                        .send()
                        .instrument(span)
                        .await
                        .map_err(|e| format!("token endpoint {token_url}: {e}"))?;
                    if !response.status().is_success() {
                        return Err(format!(
                            "token endpoint {token_url}: HTTP {}",
                            response.status()
                        ));
                    }
                    let body: TokenResponse = response
                        .json()
                        .await
                        .map_err(|e| format!("token endpoint {token_url}: {e}"))?;
                    let lifetime = Duration::from_secs(body.expires_in.unwrap_or(60).max(1));
                    Ok((body.access_token, lifetime))
                };
                breaker.call(*timeout, request).await.map_err(|e| match e {
                    breaker::CallError::Open(_) => Fetch::Refused(format!(
                        "no service token: the token endpoint {token_url} failed recently; not asked again yet"
                    )),
                    other => Fetch::Failed(other.to_string()),
                })
            }
        }
    }
}

/// Why no token was fetched.
enum Fetch {
    /// Not asked: the token endpoint's breaker is open.
    Refused(String),
    /// Asked, and it failed.
    Failed(String),
}

/// The service-token source for calls to other roles: client credentials when configured, else
/// the dev key.
pub fn for_role(
    ctx: &crate::server::Context,
    auth: &super::Auth,
) -> Result<Arc<TokenSource>, crate::server::StartError> {
    let a = &ctx.config.auth;
    match (&a.token_url, &a.client_id, &a.client_secret, &auth.dev_key) {
        (Some(url), Some(id), Some(secret), _) => Ok(Arc::new(
            TokenSource::client_credentials(
                url.clone(),
                id.clone(),
                secret.clone(),
                a.jwks_timeout,
                ctx.role,
            )
            .map_err(|e| crate::server::StartError::Invalid(e.to_string()))?,
        )),
        (_, _, _, Some(key)) => Ok(Arc::new(TokenSource::dev(
            key.clone(),
            ctx.role.as_str(),
            a.default_tenant.clone().unwrap_or_else(|| "platform".into()),
            a.service_role.clone(),
            a.issuer.clone(),
            a.audience.clone(),
        )
        .for_role_label(ctx.role))),
        _ => Err(crate::server::StartError::Invalid("service tokens need auth.token_url, auth.client_id and auth.client_secret (or dev mode)".into())),
    }
}
