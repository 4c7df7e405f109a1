//! The client of the entitlements role used by the gateway and the stream: checks asked with a
//! service token, remembered briefly in a local decision cache (bounded, the least used evicted
//! first: [`crate::cache`]) that is emptied when a new rules version is announced. When the role cannot answer, the check fails (fail closed) unless the
//! caller's role is configured to fail open. Checks go through a breaker (`backends::breaker`): a
//! role that is down or frozen opens it, and while open checks fail at once (503, or allowed when
//! failing open) instead of after the timeout; a background `GET /health` closes it.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tracing::Instrument as _;
use url::Url;

use crate::auth::token_source::TokenSource;
use crate::auth::Identity;
use crate::backends::breaker::CallError;
use crate::backends::CheckError;
use crate::cache::Bounded;
use crate::error::ApiError;
use crate::role::Role;
use crate::server::Shutdown;

/// Metric names.
pub mod names {
    /// Checks by outcome (`allowed`, `denied`, `unavailable`, `fail_open`) and source (`cache`, `remote`).
    pub const CHECKS: &str = "access_entitlement_client_checks_total";

    /// Registers the descriptions.
    pub fn describe() {
        metrics::describe_counter!(
            CHECKS,
            "Entitlement checks made by the gateway or stream, by outcome and source (cache, remote)"
        );
    }
}

/// Why the entitlements role could not be asked, or its answer not used (a check, a snapshot
/// fetch, or the client not built).
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// No service token to ask with.
    #[error("{0}")]
    Token(String),
    /// The role's URL does not take the path.
    #[error("{0}")]
    Url(#[from] url::ParseError),
    /// The HTTP client could not be built, the role did not answer, or its body could not be
    /// read.
    #[error("{0}")]
    Http(#[from] reqwest::Error),
    /// The role answered with an error status.
    #[error("HTTP {0}")]
    Status(reqwest::StatusCode),
    /// The role's answer lacks a field.
    #[error("no {0} field")]
    Missing(&'static str),
    /// No answer within the bound of the call.
    #[error("timed out")]
    TimedOut,
}

/// An entitlement that could not be decided: the caller answers 503 `dependency_unavailable`
/// (the gateway, the stream), unless its role fails open.
#[derive(Debug, thiserror::Error)]
pub enum Unavailable {
    /// The role could not be asked (its breaker is open), or the check failed (a
    /// [`RequestError`]) or went unanswered.
    #[error("entitlements unavailable: {0}")]
    Check(#[from] CallError),
    /// No rules snapshot was ever loaded (in-process decisions).
    #[error("entitlements unavailable: no rules snapshot yet")]
    NoSnapshot,
    /// A newer rules version was announced and not applied in time (in-process decisions).
    #[error("entitlements unavailable: rules version {0} not applied yet")]
    NotApplied(i64),
}

impl From<Unavailable> for ApiError {
    fn from(e: Unavailable) -> Self {
        ApiError::dependency("entitlements", e)
    }
}

/// The client.
pub struct Entitlements {
    role: Role,
    http: reqwest::Client,
    url: Url,
    tokens: Arc<TokenSource>,
    /// Decisions by request key, each until the shorter of its TTL and `ttl`.
    cache: Bounded<String, bool>,
    ttl: Duration,
    fail_open: bool,
    breaker: Arc<crate::backends::breaker::Breaker>,
    timeout: Duration,
}

/// Decisions kept at most (about).
const CACHE_CAP: usize = 100_000;

impl Entitlements {
    /// A client of the role at `url`.
    pub fn new(
        role: Role,
        url: Url,
        tokens: Arc<TokenSource>,
        ttl: Duration,
        fail_open: bool,
        timeout: Duration,
    ) -> Result<Self, RequestError> {
        // Idle connections are dropped well before a server closes them (`access` servers close
        // idle keep-alive connections after `server.header_read_timeout`, 10 s by default), so a
        // check rarely lands on a connection that is being closed; `ask` retries once if it does.
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .pool_idle_timeout(Duration::from_secs(5))
            .build()?;
        let health = url.join("health")?;
        let prober = http.clone();
        let probe: crate::backends::breaker::Probe = Box::new(move || {
            let (http, health) = (prober.clone(), health.clone());
            Box::pin(async move {
                match http.get(health).send().await {
                    Ok(r) if r.status().is_success() => Ok(()),
                    Ok(r) => {
                        Err(CheckError::failed("entitlements", format!("HTTP {}", r.status())))
                    }
                    Err(e) => Err(CheckError::failed("entitlements", e)),
                }
            })
        });
        // A check is well under trip_after; the breaker only adds a bound below `timeout`.
        let config = crate::backends::breaker::Config {
            trip_after: timeout.min(Duration::from_secs(1)),
            ..Default::default()
        };
        let breaker = crate::backends::breaker::Breaker::new(
            role,
            "entitlements",
            "checks",
            config,
            Some(probe),
        );
        Ok(Entitlements {
            role,
            http,
            url,
            tokens,
            cache: Bounded::new(CACHE_CAP),
            ttl,
            fail_open,
            breaker,
            timeout,
        })
    }

    /// The client a role of this process uses: the entitlements role at
    /// `ACCESS_ENTITLEMENTS_SERVICE_URL` (default `http://127.0.0.1:8011`), its local cache
    /// emptied on every rules version announced in Redis when Redis is configured.
    pub async fn for_role(
        ctx: &crate::server::Context,
        tokens: Arc<TokenSource>,
        ttl: Duration,
        fail_open: bool,
        channels: Option<&crate::backends::redis::Channels>,
    ) -> Result<Arc<Self>, crate::server::StartError> {
        let url = ctx.config.entitlements_service_url.clone().unwrap_or_else(|| {
            tracing::warn!(role = %ctx.role, "ACCESS_ENTITLEMENTS_SERVICE_URL is not set; using http://127.0.0.1:8011");
            Url::parse("http://127.0.0.1:8011").expect("a valid URL")
        });
        let client =
            Entitlements::new(ctx.role, url, tokens, ttl, fail_open, Duration::from_secs(2))
                .map_err(|e| crate::server::StartError::Invalid(e.to_string()))?;
        let client = Arc::new(client);
        if let Some(channels) = channels {
            let channel = format!("{}rules", ctx.config.redis_prefix());
            client.follow_rules(channels, channel, ctx.shutdown.clone());
        }
        Ok(client)
    }

    /// The role's base URL (for the status page).
    pub fn url(&self) -> &Url {
        &self.url
    }

    /// Empties the local cache (a new rules version).
    pub fn clear(&self) {
        self.cache.clear();
    }

    /// Caches a decision for the shorter of its TTL and the client's.
    fn remember(&self, key: String, allowed: bool, ttl: Duration) {
        self.cache.insert(key, allowed, ttl.min(self.ttl));
    }

    /// Whether `identity` may do `action` on `resource`.
    pub async fn allowed(
        &self,
        identity: &Identity,
        resource: &str,
        action: &str,
    ) -> Result<bool, Unavailable> {
        let key = format!(
            "{}\u{1}{}\u{1}{}\u{1}{}\u{1}{}",
            identity.subject,
            identity.tenant,
            identity.roles.join(","),
            resource,
            action
        );
        if let Some(allowed) = self.cache.get(&key) {
            count(self.role, allowed, "cache");
            return Ok(allowed);
        }
        let asked = self.breaker.call(self.timeout, self.ask(identity, resource, action)).await;
        match asked.map_err(Unavailable::from) {
            Ok((allowed, ttl)) => {
                self.remember(key, allowed, ttl);
                count(self.role, allowed, "remote");
                Ok(allowed)
            }
            Err(e) if self.fail_open => {
                tracing::warn!(role = %self.role, error = %e, "entitlements unavailable; allowing (fail open)");
                metrics::counter!(names::CHECKS, "role" => self.role.as_str(), "outcome" => "fail_open", "source" => "remote").increment(1);
                Ok(true)
            }
            Err(e) => {
                metrics::counter!(names::CHECKS, "role" => self.role.as_str(), "outcome" => "unavailable", "source" => "remote").increment(1);
                Err(e)
            }
        }
    }

    async fn ask(
        &self,
        identity: &Identity,
        resource: &str,
        action: &str,
    ) -> Result<(bool, Duration), RequestError> {
        let token = self.tokens.token().await.map_err(RequestError::Token)?;
        let body = json!({
            "user_id": identity.subject, "tenant_id": identity.tenant, "roles": identity.roles,
            "resource": resource, "action": action, "context": {},
        });
        let url = self.url.join("entitlements/check")?;
        // The check has a span of its own, a child of the request's (or of nothing, for a
        // stream's subscribe), whose context the entitlements role receives.
        let span = tracing::info_span!("entitlements_check", role = %self.role);
        let trace = span.in_scope(crate::telemetry::trace_headers);
        let send = || {
            self.http
                .post(url.clone())
                .headers(trace.clone())
                .bearer_auth(&token)
                .json(&body)
                .send()
                .instrument(span.clone())
        };
        // A check is a read: one retry when the request could not be sent (a pooled connection
        // closed by the server as it was reused), never after an answer or a timeout.
        let response = match send().await {
            Err(e) if e.is_connect() || (e.is_request() && !e.is_timeout()) => {
                tracing::debug!(role = %self.role, error = %e, "entitlements check not sent; retrying once");
                send().await
            }
            other => other,
        }?;
        if !response.status().is_success() {
            return Err(RequestError::Status(response.status()));
        }
        let decision: serde_json::Value = response.json().await?;
        let allowed = decision["allowed"].as_bool().ok_or(RequestError::Missing("allowed"))?;
        let ttl = Duration::from_secs(decision["ttl_seconds"].as_u64().unwrap_or(5));
        Ok((allowed, ttl))
    }

    /// Empties the cache whenever a new rules version is published on the Redis `rules` channel
    /// (and after a reconnect, when one may have been missed), until shutdown.
    pub fn follow_rules(
        self: &Arc<Self>,
        channels: &crate::backends::redis::Channels,
        channel: String,
        shutdown: Shutdown,
    ) {
        let this = self.clone();
        let channels = channels.clone();
        tokio::spawn(async move {
            let mut listener = match channels.listen(vec![channel]).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(role = %this.role, error = %e, "cannot follow rules versions; decisions expire by TTL only");
                    return;
                }
            };
            loop {
                tokio::select! {
                    m = listener.messages.recv() => match m {
                        Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => this.clear(),
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    },
                    Ok(_) = listener.reconnects.recv() => this.clear(),
                    _ = shutdown.stopping() => return,
                }
            }
        });
    }
}

fn count(role: Role, allowed: bool, source: &'static str) {
    let outcome = if allowed { "allowed" } else { "denied" };
    metrics::counter!(names::CHECKS, "role" => role.as_str(), "outcome" => outcome, "source" => source)
        .increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(dir: &std::path::Path, ttl: Duration) -> Entitlements {
        let key = Arc::new(crate::auth::devkey::DevKey::load_or_create(&dir.join("k")).unwrap());
        let tokens = TokenSource::dev(key, "gateway", "t".into(), "service".into(), None, None);
        let url = Url::parse("http://127.0.0.1:9/").unwrap();
        let timeout = Duration::from_secs(1);
        Entitlements::new(Role::Gateway, url, Arc::new(tokens), ttl, false, timeout).unwrap()
    }

    #[tokio::test]
    async fn a_full_decision_cache_keeps_the_decisions_in_use_and_never_empties_itself() {
        let dir = tempfile::tempdir().unwrap();
        let mut client = client(dir.path(), Duration::from_secs(60));
        client.cache = Bounded::new(64);
        for i in 0..300 {
            client.remember(i.to_string(), i % 2 == 0, Duration::from_secs(60));
            assert_eq!(client.cache.get(&i.to_string()), Some(i % 2 == 0));
        }
        assert!((48..=80).contains(&client.cache.len()), "{}", client.cache.len());
        assert!((260..300).all(|i| client.cache.get(&i.to_string()).is_some()), "latest kept");
        assert!((0..64).all(|i| client.cache.get(&i.to_string()).is_none()), "oldest went");
        client.clear();
        assert!(client.cache.is_empty(), "a new rules version empties it");
    }

    #[tokio::test]
    async fn a_decision_is_kept_no_longer_than_its_ttl_nor_the_clients() {
        let dir = tempfile::tempdir().unwrap();
        let client = client(dir.path(), Duration::from_millis(40));
        client.remember("capped".into(), true, Duration::from_secs(60));
        client.remember("own".into(), true, Duration::from_millis(10));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(client.cache.get("own"), None, "its own TTL");
        assert_eq!(client.cache.get("capped"), Some(true));
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert_eq!(client.cache.get("capped"), None, "the client's TTL");
    }
}
