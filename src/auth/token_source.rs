//! Service tokens for calls between roles.
//!
//! Two modes: dev (signed with the dev key: `sub = service:<role>`, the service role) and OAuth
//! client credentials (token URL, client id, secret). Either way the token is cached and renewed
//! before it expires: once 80% of its lifetime has passed. Renewal is single-flight.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;
use tracing::Instrument as _;

use super::devkey::{DevKey, TokenRequest};
use crate::config::Secret;

/// How long dev service tokens live.
const DEV_TTL: Duration = Duration::from_secs(3600);

/// Where service tokens come from.
pub struct TokenSource {
    mode: Mode,
    /// The current token and when to renew it. A tokio mutex: held across the renewal request so
    /// concurrent callers wait for one renewal instead of each starting their own.
    cached: tokio::sync::Mutex<Option<(String, Instant)>>,
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
            cached: tokio::sync::Mutex::new(None),
        }
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
            cached: tokio::sync::Mutex::new(None),
        })
    }

    /// A valid token, renewed when 80% of its lifetime has passed.
    pub async fn token(&self) -> Result<String, String> {
        let mut cached = self.cached.lock().await;
        if let Some((token, renew_at)) = cached.as_ref() {
            if Instant::now() < *renew_at {
                return Ok(token.clone());
            }
        }
        let (token, lifetime) = self.fetch().await?;
        let renew_at = Instant::now() + lifetime.mul_f64(0.8);
        *cached = Some((token.clone(), renew_at));
        Ok(token)
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
        (Some(url), Some(id), Some(secret), _) => Ok(Arc::new(TokenSource::client_credentials(url.clone(), id.clone(), secret.clone(), a.jwks_timeout).map_err(|e| anyhow::anyhow!(e))?)),
        (_, _, _, Some(key)) => Ok(Arc::new(TokenSource::dev(
            key.clone(),
            ctx.role.as_str(),
            a.default_tenant.clone().unwrap_or_else(|| "platform".into()),
            a.service_role.clone(),
            a.issuer.clone(),
            a.audience.clone(),
        ))),
        _ => Err(anyhow::anyhow!("service tokens need auth.token_url, auth.client_id and auth.client_secret (or dev mode)").into()),
    }
}
