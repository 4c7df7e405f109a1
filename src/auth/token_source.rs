//! Service tokens for calls between roles.
//!
//! Two modes: dev (signed with the dev key: `sub = service:<role>`, the service role) and OAuth
//! client credentials (token URL, client id, secret). Either way the token is cached and renewed
//! before it expires: once 80% of its lifetime has passed. Renewal is single-flight.
//!
//! A renewal that fails while the current token is still valid is not an error: the current
//! token is used until it expires, and renewal is tried again after a backoff (1 s doubling to
//! 30 s, never past the expiry), so a token endpoint that is down for less than the last 20% of a
//! token's life costs nothing. Failures are counted (`access_service_token_renewal_failures_total`).
//! Only with no valid token left does a call fail; during the backoff it fails at once.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;
use tracing::Instrument as _;

use super::devkey::{DevKey, TokenRequest};
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

/// The first wait after a failed renewal; it doubles up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// The current token and the renewal schedule.
struct Cached {
    token: Option<String>,
    /// When to renew (80% of the lifetime).
    renew_at: Instant,
    /// When the token stops being usable (its expiry, less a margin for the trip).
    expires_at: Instant,
    /// No renewal before this (backoff after a failure).
    retry_at: Instant,
    /// The next backoff.
    retry_wait: Duration,
}

/// Where service tokens come from.
pub struct TokenSource {
    mode: Mode,
    /// The current token and its schedule. A tokio mutex: held across the renewal request so
    /// concurrent callers wait for one renewal instead of each starting their own.
    cached: tokio::sync::Mutex<Cached>,
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
    },
}

impl Cached {
    fn empty() -> Self {
        let now = Instant::now();
        Cached {
            token: None,
            renew_at: now,
            expires_at: now,
            retry_at: now,
            retry_wait: RETRY_FIRST,
        }
    }
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    expires_in: Option<u64>,
}

impl TokenSource {
    /// Dev mode: tokens signed by the dev key for `service:<name>`.
    pub fn dev(
        key: Arc<DevKey>,
        name: &str,
        tenant: String,
        service_role: String,
        issuer: Option<String>,
        audience: Option<String>,
    ) -> Self {
        TokenSource {
            mode: Mode::Dev {
                key,
                subject: format!("service:{name}"),
                tenant,
                roles: vec![service_role],
                issuer,
                audience,
            },
            cached: tokio::sync::Mutex::new(Cached::empty()),
            failures: AtomicU64::new(0),
            role: "unknown",
        }
    }

    /// Labels the failure metric with the role that uses this source.
    pub fn for_role_label(mut self, role: crate::roles::Role) -> Self {
        self.role = role.as_str();
        self
    }

    /// Renewals that failed so far.
    pub fn renewal_failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Client credentials against `token_url`.
    pub fn client_credentials(
        token_url: url::Url,
        client_id: String,
        secret: Secret,
        timeout: Duration,
    ) -> Result<Self, String> {
        let http =
            reqwest::Client::builder().timeout(timeout).build().map_err(|e| e.to_string())?;
        Ok(TokenSource {
            mode: Mode::ClientCredentials { http, token_url, client_id, secret },
            cached: tokio::sync::Mutex::new(Cached::empty()),
            failures: AtomicU64::new(0),
            role: "unknown",
        })
    }

    /// A valid token, renewed when 80% of its lifetime has passed; while renewal fails, the
    /// current token until it expires.
    pub async fn token(&self) -> Result<String, String> {
        let mut cached = self.cached.lock().await;
        let now = Instant::now();
        let valid = cached.token.clone().filter(|_| now < cached.expires_at);
        match &valid {
            Some(token) if now < cached.renew_at || now < cached.retry_at => {
                return Ok(token.clone())
            }
            None if now < cached.retry_at => {
                return Err(format!(
                    "no service token: the token endpoint failed; retrying in {:?}",
                    cached.retry_at - now
                ))
            }
            _ => {}
        }
        match self.fetch().await {
            Ok((token, lifetime)) => {
                let fetched = Instant::now();
                // A token is not sent in its last moments: it could expire on the way.
                let margin = (lifetime / 10).min(Duration::from_secs(5));
                *cached = Cached {
                    token: Some(token.clone()),
                    renew_at: fetched + lifetime.mul_f64(0.8),
                    expires_at: fetched + lifetime - margin,
                    retry_at: fetched,
                    retry_wait: RETRY_FIRST,
                };
                Ok(token)
            }
            Err(e) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                metrics::counter!(names::RENEWAL_FAILURES, "role" => self.role).increment(1);
                let wait = cached.retry_wait;
                cached.retry_at = Instant::now() + wait;
                cached.retry_wait = (wait * 2).min(RETRY_MAX);
                match valid {
                    Some(token) => {
                        tracing::warn!(role = self.role, error = %e, retry_in = ?wait, "service token renewal failed; using the current token until it expires");
                        Ok(token)
                    }
                    None => Err(e),
                }
            }
        }
    }

    async fn fetch(&self) -> Result<(String, Duration), String> {
        match &self.mode {
            Mode::Dev { key, subject, tenant, roles, issuer, audience } => {
                let token = key.issue(&TokenRequest {
                    subject,
                    tenant,
                    roles,
                    ttl: DEV_TTL,
                    issuer: issuer.as_deref(),
                    audience: audience.as_deref(),
                })?;
                Ok((token, DEV_TTL))
            }
            Mode::ClientCredentials { http, token_url, client_id, secret } => {
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
                    return Err(format!("token endpoint {token_url}: HTTP {}", response.status()));
                }
                let body: TokenResponse = response
                    .json()
                    .await
                    .map_err(|e| format!("token endpoint {token_url}: {e}"))?;
                Ok((body.access_token, Duration::from_secs(body.expires_in.unwrap_or(60).max(1))))
            }
        }
    }
}

/// The service-token source for calls to other roles: client credentials when configured, else
/// the dev key.
pub fn for_role(
    ctx: &crate::server::Context,
    auth: &super::Auth,
) -> Result<Arc<TokenSource>, crate::cli::RunError> {
    let a = &ctx.config.auth;
    match (&a.token_url, &a.client_id, &a.client_secret, &auth.dev_key) {
        (Some(url), Some(id), Some(secret), _) => Ok(Arc::new(
            TokenSource::client_credentials(url.clone(), id.clone(), secret.clone(), a.jwks_timeout)
                .map_err(|e| anyhow::anyhow!(e))?
                .for_role_label(ctx.role),
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
        _ => Err(anyhow::anyhow!("service tokens need auth.token_url, auth.client_id and auth.client_secret (or dev mode)").into()),
    }
}
