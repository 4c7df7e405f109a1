//! The console's relay: `/console/api/<role>/<path>` forwards an allow-listed call to a role's
//! API with the operator's own `Authorization` header, so the page talks only to its own origin
//! (`connect-src 'self'`, no CORS opening anywhere) and every role checks and audits the operator
//! as it would any caller.
//!
//! Only the paths in [`ALLOWED`] pass (404 otherwise); the caller must hold the admin role (the
//! target role checks again) and stay within `console.rate_limit` (429). `auth` paths are served
//! by this role's own API in-process; the others go to `console.gateway_url`,
//! `console.stream_url`, `entitlements_service_url` and `metrics_service_url`.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State as AxumState};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use tower::ServiceExt;
use url::Url;

use crate::auth::{Caller, Verifier};
use crate::error::{ApiError, ApiResult, ErrorCode};

/// The relay handler's state.
#[derive(Clone)]
pub struct RelayState {
    pub(crate) console: super::State,
    pub(crate) verifier: Arc<Verifier>,
}

impl axum::extract::FromRef<RelayState> for Arc<Verifier> {
    fn from_ref(state: &RelayState) -> Self {
        state.verifier.clone()
    }
}

/// What the console may call: (role, method, path pattern); `{}` is one path segment.
pub const ALLOWED: &[(&str, &str, &str)] = &[
    ("auth", "GET", "/auth/me"),
    ("auth", "GET", "/auth/users/{}"),
    ("auth", "POST", "/auth/users/{}/revoke"),
    ("auth", "GET", "/auth/api-keys"),
    ("auth", "POST", "/auth/api-keys"),
    ("auth", "POST", "/auth/api-keys/{}/rotate"),
    ("auth", "DELETE", "/auth/api-keys/{}"),
    ("auth", "GET", "/auth/api-keys/{}/audit"),
    ("entitlements", "GET", "/entitlements/rules"),
    ("entitlements", "POST", "/entitlements/rules"),
    ("entitlements", "GET", "/entitlements/rules/{}"),
    ("entitlements", "PUT", "/entitlements/rules/{}"),
    ("entitlements", "DELETE", "/entitlements/rules/{}"),
    ("entitlements", "GET", "/entitlements/rules/{}/history"),
    ("entitlements", "POST", "/entitlements/explain"),
    ("entitlements", "GET", "/entitlements/stats"),
    ("entitlements", "GET", "/entitlements/version"),
    ("gateway", "GET", "/api/v1/status"),
    ("gateway", "GET", "/api/v1/metadata/routes"),
    ("gateway", "GET", "/api/v1/circuit-breakers"),
    ("gateway", "GET", "/api/v1/rate-limits"),
    ("gateway", "GET", "/api/v1/cache/stats"),
    ("stream", "GET", "/stats"),
    ("stream", "GET", "/stats/users/{}"),
    ("metrics", "GET", "/metrics/usage"),
    ("metrics", "GET", "/metrics/stats"),
];

/// Whether `(role, method, path)` is on the allow-list.
pub fn allowed(role: &str, method: &Method, path: &str) -> bool {
    ALLOWED.iter().any(|(r, m, pattern)| {
        *r == role && *m == method.as_str() && matches_pattern(pattern, path)
    })
}

fn matches_pattern(pattern: &str, path: &str) -> bool {
    let (mut p, mut s) = (pattern.split('/'), path.split('/'));
    loop {
        match (p.next(), s.next()) {
            (None, None) => return true,
            (Some("{}"), Some(seg)) if !seg.is_empty() => {}
            (Some(a), Some(b)) if a == b => {}
            _ => return false,
        }
    }
}

/// Where each role is reached, and the client that reaches it.
pub struct Relay {
    targets: Vec<(&'static str, Option<Url>)>,
    /// The auth role's own API, called in-process.
    auth_api: Router,
    http: reqwest::Client,
    /// The largest request body relayed (`server.max_body_bytes`).
    max_body: usize,
}

impl Relay {
    /// The relay for this configuration.
    pub fn new(
        console: &super::Config,
        config: &crate::config::Config,
        auth_api: Router,
    ) -> Result<Relay, String> {
        Ok(Relay {
            targets: vec![
                ("gateway", console.gateway_url.clone()),
                ("stream", console.stream_url.clone()),
                ("entitlements", config.entitlements_service_url.clone()),
                ("metrics", config.metrics_service_url.clone()),
            ],
            auth_api,
            max_body: config.server.max_body_bytes,
            http: reqwest::Client::builder()
                .timeout(console.relay_timeout)
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .map_err(|e| e.to_string())?,
        })
    }

    /// Which roles the relay can reach (the page greys out the others).
    pub fn reachable(&self) -> Vec<&'static str> {
        std::iter::once("auth")
            .chain(self.targets.iter().filter(|(_, url)| url.is_some()).map(|(r, _)| *r))
            .collect()
    }
}

/// Request headers passed on to the role; everything else (cookies, forwarding headers) stays.
const FORWARDED_REQUEST: &[http::HeaderName] = &[
    http::header::AUTHORIZATION,
    http::header::CONTENT_TYPE,
    http::header::IF_MATCH,
    http::header::ACCEPT,
];

/// Response headers passed back to the page.
const FORWARDED_RESPONSE: &[&str] =
    &["content-type", "etag", "retry-after", "x-entitlements-version", "x-request-id"];

/// The largest response relayed (admin answers are small; a runaway one is cut off).
const MAX_RESPONSE_BYTES: usize = 4 << 20;

/// `ANY /console/api/{role}/{*path}`.
pub async fn forward(
    AxumState(state): AxumState<RelayState>,
    caller: Caller,
    request: Request,
) -> ApiResult<Response> {
    let console = &state.console;
    caller.require_role(&console.signin.admin_role)?;
    let subject = caller.0.identity.subject.clone();
    let verdict = console.limits.calls.check(&[(subject, &console.limits.call_policy)]);
    if let Some(refusal) = verdict.first().and_then(super::Limits::refusal) {
        return Err(refusal);
    }
    let (parts, body) = request.into_parts();
    let full = parts.uri.path();
    let rest = full.strip_prefix("/console/api/").unwrap_or_default();
    let (role, path) = match rest.split_once('/') {
        Some((role, path)) => (role, format!("/{path}")),
        None => (rest, "/".to_string()),
    };
    if !allowed(role, &parts.method, &path) {
        return Err(ApiError::not_found(format!(
            "the console does not relay {} {path} to {role:?}",
            parts.method
        )));
    }
    let query = parts.uri.query().map(|q| format!("?{q}")).unwrap_or_default();
    let mut headers = HeaderMap::new();
    for name in FORWARDED_REQUEST {
        if let Some(v) = parts.headers.get(name) {
            headers.insert(name.clone(), v.clone());
        }
    }
    let body = axum::body::to_bytes(body, console.relay.max_body).await.map_err(|_| {
        ApiError::new(ErrorCode::PayloadTooLarge, "the request body is too large to relay")
    })?;
    if role == "auth" {
        let mut inner = http::Request::builder()
            .method(parts.method.clone())
            .uri(format!("{path}{query}"))
            .body(Body::from(body))
            .map_err(|e| ApiError::internal(anyhow::anyhow!(e)))?;
        *inner.headers_mut() = headers;
        let response =
            console.relay.auth_api.clone().oneshot(inner).await.unwrap_or_else(|e| match e {});
        return Ok(filter_response(response));
    }
    let base = console
        .relay
        .targets
        .iter()
        .find(|(r, _)| *r == role)
        .and_then(|(_, url)| url.clone())
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::DependencyUnavailable,
                format!("the console has no URL for the {role} role (see console.* in the configuration)"),
            )
        })?;
    let url = format!("{}{}{query}", base.as_str().trim_end_matches('/'), path);
    let answer = console
        .relay
        .http
        .request(parts.method.clone(), url)
        .headers(headers)
        .body(body)
        .send()
        .await
        .map_err(|e| ApiError::dependency(role, anyhow::anyhow!(e)))?;
    let status = StatusCode::from_u16(answer.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut out = Response::builder().status(status);
    for name in FORWARDED_RESPONSE {
        if let Some(v) = answer.headers().get(*name) {
            out = out.header(*name, v.clone());
        }
    }
    if answer.content_length().is_some_and(|n| n as usize > MAX_RESPONSE_BYTES) {
        return Err(ApiError::new(
            ErrorCode::UpstreamUnavailable,
            "the role's answer is too large to relay",
        ));
    }
    let bytes = answer.bytes().await.map_err(|e| ApiError::dependency(role, anyhow::anyhow!(e)))?;
    if bytes.len() > MAX_RESPONSE_BYTES {
        return Err(ApiError::new(
            ErrorCode::UpstreamUnavailable,
            "the role's answer is too large to relay",
        ));
    }
    out.body(Body::from(bytes)).map_err(|e| ApiError::internal(anyhow::anyhow!(e)))
}

/// Keeps only the response headers the page needs.
fn filter_response(response: Response) -> Response {
    let (mut parts, body) = response.into_parts();
    let kept: HeaderMap = parts
        .headers
        .iter()
        .filter(|(name, _)| FORWARDED_RESPONSE.contains(&name.as_str()))
        .map(|(n, v)| (n.clone(), v.clone()))
        .collect();
    parts.headers = kept;
    Response::from_parts(parts, body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_listed_paths_pass() {
        assert!(allowed("entitlements", &Method::GET, "/entitlements/rules"));
        assert!(allowed("entitlements", &Method::PUT, "/entitlements/rules/abc"));
        assert!(allowed("auth", &Method::POST, "/auth/users/alice/revoke"));
        assert!(!allowed("auth", &Method::POST, "/auth/users//revoke"));
        assert!(!allowed("entitlements", &Method::PUT, "/entitlements/rules"));
        assert!(!allowed("gateway", &Method::GET, "/api/v1/prices/latest/NG-H27"));
        assert!(!allowed("gateway", &Method::POST, "/api/v1/cache/purge"));
        assert!(!allowed("stream", &Method::POST, "/publish"));
        assert!(!allowed("entitlements", &Method::GET, "/entitlements/snapshot"));
        assert!(!allowed("elsewhere", &Method::GET, "/stats"));
        assert!(!allowed("stream", &Method::GET, "/stats/users/a/b"));
    }
}
