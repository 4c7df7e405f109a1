//! The operator's console: a browser UI served by the auth role under `/console/` (off unless
//! `console.enabled`). Its assets are compiled into the binary; nothing is loaded from elsewhere.
//!
//! - `GET /console/` and `/console/assets/*`: the page, its script and its style, each answered
//!   with the console's security headers ([`security_headers`]): a strict Content-Security-Policy
//!   (`script-src 'self'`, no inline script, `connect-src 'self'`, `frame-ancestors 'none'`),
//!   `X-Frame-Options: DENY`, `nosniff`, `Referrer-Policy: no-referrer`, `Cache-Control:
//!   no-store`.
//! - [`signin`]: how an operator gets a token: the IdP (OIDC authorization code with PKCE, the
//!   code exchanged here so the page talks to its own origin only) or, in dev mode, a one-time
//!   sign-in code written to a file only the operator's account can read. Only the admin role
//!   gets in.
//! - [`relay`]: `/console/api/<role>/<path>`, the page's one way to the roles' APIs: allow-listed
//!   paths forwarded with the operator's own `Authorization` header (so every role's checks and
//!   audit apply to the operator), rate-limited per operator.
//!
//! The page keeps the token in `sessionStorage` (the tab's own storage, gone when the tab
//! closes, never shared with other tabs or written to disk by the browser): a reload keeps the
//! operator signed in, a new tab or a closed one does not. Never in a URL, a cookie or
//! `localStorage`.

pub mod relay;
pub mod signin;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::Path;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde::{Deserialize, Serialize};
use url::Url;

use crate::config::Problem;
use crate::ratelimit::{LocalGcra, Policy};

/// The `console` config section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Serve the console on the auth role (`/console/`).
    pub enabled: bool,
    /// Where the relay reaches the gateway (`http://gateway-service:8000`); `access all` fills
    /// it in. Unset: the console's gateway pages say it is not configured.
    pub gateway_url: Option<Url>,
    /// Where the relay reaches the stream role (`http://streaming-service:8001`).
    pub stream_url: Option<Url>,
    /// The OIDC client the console signs in with (a public client allowed the redirect URI
    /// `<console origin>/console/`); default `auth.audience`.
    pub oidc_client_id: Option<String>,
    /// The IdP's authorization endpoint; default from the issuer's discovery document.
    pub oidc_authorization_url: Option<Url>,
    /// The IdP's token endpoint; default from the issuer's discovery document.
    pub oidc_token_url: Option<Url>,
    /// Scopes asked for at sign-in.
    pub oidc_scopes: Vec<String>,
    /// The console's own calls, per operator (subject), per auth replica.
    pub rate_limit: Policy,
    /// Sign-in attempts per client address (dev codes and OIDC exchanges).
    pub signin_limit: Policy,
    /// Dev mode: the file the one-time sign-in code is written to (mode 0600); default
    /// `console-code` beside the dev key.
    pub dev_code_file: Option<PathBuf>,
    /// Dev mode: lifetime of the admin token a sign-in code buys.
    #[serde(with = "humantime_serde")]
    pub dev_token_ttl: Duration,
    /// Dev mode: the tenant of that token.
    pub dev_tenant: String,
    /// Deadline of one relayed call.
    #[serde(with = "humantime_serde")]
    pub relay_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            enabled: false,
            gateway_url: None,
            stream_url: None,
            oidc_client_id: None,
            oidc_authorization_url: None,
            oidc_token_url: None,
            oidc_scopes: vec!["openid".into()],
            rate_limit: Policy { rate: 600, period: Duration::from_secs(60), burst: 120 },
            signin_limit: Policy { rate: 10, period: Duration::from_secs(60), burst: 5 },
            dev_code_file: None,
            dev_token_ttl: Duration::from_secs(3600),
            dev_tenant: "console".into(),
            relay_timeout: Duration::from_secs(10),
        }
    }
}

impl Config {
    /// Checks the section.
    pub fn validate(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        for (key, url) in [
            ("console.gateway_url", &self.gateway_url),
            ("console.stream_url", &self.stream_url),
            ("console.oidc_authorization_url", &self.oidc_authorization_url),
            ("console.oidc_token_url", &self.oidc_token_url),
        ] {
            if url.as_ref().is_some_and(|u| !matches!(u.scheme(), "http" | "https")) {
                problems.push(Problem::new(key, "scheme must be http:// or https://"));
            }
        }
        for (key, policy) in
            [("console.rate_limit", &self.rate_limit), ("console.signin_limit", &self.signin_limit)]
        {
            if policy.rate == 0 || policy.burst == 0 || policy.period.is_zero() {
                problems.push(Problem::new(key, "rate, burst and period must be greater than 0"));
            }
        }
        if self.dev_token_ttl.is_zero() || self.dev_token_ttl > Duration::from_secs(12 * 3600) {
            problems.push(Problem::new("console.dev_token_ttl", "must be between 1s and 12h"));
        }
        if self.dev_tenant.trim().is_empty() {
            problems.push(Problem::new("console.dev_tenant", "must not be empty"));
        }
        if self.relay_timeout.is_zero() {
            problems.push(Problem::new("console.relay_timeout", "must be greater than 0"));
        }
        problems
    }
}

/// The console's state (cheap to clone).
#[derive(Clone)]
pub struct State {
    pub(crate) signin: Arc<signin::SignIn>,
    pub(crate) relay: Arc<relay::Relay>,
    /// The operator's calls, by subject; sign-in attempts, by client address.
    pub(crate) limits: Arc<Limits>,
}

/// The console's in-process limiters.
pub(crate) struct Limits {
    pub(crate) calls: LocalGcra<String>,
    pub(crate) call_policy: Policy,
    pub(crate) signins: LocalGcra<std::net::IpAddr>,
    pub(crate) signin_policy: Policy,
}

impl Limits {
    /// Refuses with 429 (and `Retry-After`) when `verdict` is a refusal.
    pub(crate) fn refusal(verdict: &crate::ratelimit::Verdict) -> Option<crate::error::ApiError> {
        (!verdict.allowed).then(|| {
            crate::error::ApiError::new(
                crate::error::ErrorCode::RateLimited,
                "the console's calls are rate-limited like any other caller's; slow down",
            )
            .with_retry_after(verdict.retry_us.div_ceil(1_000_000).max(1))
        })
    }
}

/// Builds the console for the auth role: the sign-in mode (dev code written now) and the relay.
/// `api` is the auth role's own API, which the relay calls in-process for `auth` paths.
pub fn build(
    section: &Config,
    ctx: &crate::server::Context,
    auth: &crate::auth::Auth,
    api: Router,
) -> Result<State, String> {
    Ok(State {
        signin: Arc::new(signin::SignIn::new(section, ctx, auth)?),
        relay: Arc::new(relay::Relay::new(section, &ctx.config, api)?),
        limits: Arc::new(Limits {
            calls: LocalGcra::new(),
            call_policy: section.rate_limit.clone(),
            signins: LocalGcra::new(),
            signin_policy: section.signin_limit.clone(),
        }),
    })
}

/// The console's routes: the page, its assets, sign-in and the relay. The JSON endpoints are in
/// the auth role's OpenAPI document; the page and the relay (which forwards other roles'
/// documented endpoints) are not.
pub fn router(
    state: State,
    verifier: Arc<crate::auth::Verifier>,
) -> utoipa_axum::router::OpenApiRouter {
    use axum::routing::{any, get};
    use utoipa_axum::routes;
    let pages = Router::new()
        .route("/console", get(|| async { axum::response::Redirect::permanent("/console/") }))
        .route("/console/", get(index))
        .route("/console/assets/{name}", get(asset));
    let relay = Router::new()
        .route("/console/api/{role}/{*path}", any(relay::forward))
        .with_state(relay::RelayState { console: state.clone(), verifier: verifier.clone() });
    utoipa_axum::router::OpenApiRouter::new()
        .routes(routes!(signin::setup))
        .routes(routes!(signin::dev))
        .routes(routes!(signin::oidc))
        .with_state(signin::SignInState { console: state, verifier })
        .merge(utoipa_axum::router::OpenApiRouter::from(pages.merge(relay)))
        .layer(axum::middleware::map_response(security_headers))
}

/// The Content-Security-Policy of every console response: only this origin's script, style
/// and connections; no inline script or style, no plugins, no framing, no base or form tricks.
pub const CSP: &str =
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
    connect-src 'self'; font-src 'none'; object-src 'none'; base-uri 'none'; form-action 'self'; \
    frame-ancestors 'none'";

/// Adds the console's security headers to every response under `/console/`.
pub async fn security_headers(mut response: Response) -> Response {
    let h = response.headers_mut();
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert("cross-origin-opener-policy", HeaderValue::from_static("same-origin"));
    h.insert("cross-origin-resource-policy", HeaderValue::from_static("same-origin"));
    h.insert(
        "permissions-policy",
        HeaderValue::from_static("camera=(), microphone=(), geolocation=(), payment=()"),
    );
    response
}

/// The page.
const INDEX: &str = include_str!("assets/index.html");

/// The assets: name, content type, bytes.
const ASSETS: &[(&str, &str, &str)] = &[
    ("console.js", "text/javascript; charset=utf-8", include_str!("assets/console.js")),
    ("console.css", "text/css; charset=utf-8", include_str!("assets/console.css")),
    ("favicon.svg", "image/svg+xml", include_str!("assets/favicon.svg")),
];

async fn index() -> Response {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], INDEX).into_response()
}

async fn asset(Path(name): Path<String>) -> Response {
    match ASSETS.iter().find(|(n, _, _)| *n == name) {
        Some((_, kind, body)) => ([(header::CONTENT_TYPE, *kind)], *body).into_response(),
        None => crate::error::ApiError::not_found("no such console asset").into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_allows_no_inline_script_and_no_framing() {
        let script = CSP.split(';').find(|d| d.trim().starts_with("script-src")).unwrap();
        assert_eq!(script.trim(), "script-src 'self'");
        assert!(!CSP.contains("unsafe"));
        assert!(CSP.contains("frame-ancestors 'none'"));
        assert!(CSP.contains("connect-src 'self'"));
    }

    #[test]
    fn the_page_loads_its_script_from_its_own_origin_and_has_no_inline_script() {
        assert!(INDEX.contains(r#"<script type="module" src="/console/assets/console.js">"#));
        assert_eq!(INDEX.matches("<script").count(), 1, "one script element, external");
        let handler = INDEX.split(['<', ' ']).any(|word| {
            word.strip_prefix("on").is_some_and(|rest| {
                rest.split_once('=').is_some_and(|(name, _)| {
                    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphabetic())
                })
            })
        });
        assert!(!handler, "no inline event handlers");
        assert!(!INDEX.contains("style="), "no inline style");
        for (name, _, body) in ASSETS.iter().chain([&("index.html", "", INDEX)]) {
            let body = body.replace("http://www.w3.org/2000/svg", "");
            assert!(
                !body.contains("http://") && !body.contains("https://") && !body.contains("//cdn"),
                "{name} loads nothing from elsewhere"
            );
        }
    }

    #[test]
    fn the_script_never_writes_markup_from_data() {
        let js = ASSETS[0].2;
        for sink in [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "eval(",
            "new Function",
        ] {
            assert!(!js.contains(sink), "console.js uses {sink}");
        }
        assert!(!js.contains("localStorage"), "the token never outlives the tab");
    }
}
