//! How an operator signs in to the console. Only the admin role gets in; the token the page gets
//! is the operator's own, and every call the console makes carries it.
//!
//! - Production (a JWKS URL is configured): OIDC authorization code with PKCE against the IdP.
//!   The page sends the operator to the IdP's authorization endpoint with an S256 challenge;
//!   back on `/console/`, it posts the code and its verifier here, and this endpoint redeems them
//!   at the IdP's token endpoint (so the page needs no connection beyond its own origin), verifies
//!   the access token like any other and refuses it without the admin role.
//! - Dev mode (no JWKS URL, `ACCESS_ENV` not production): the operator proves local access with a
//!   one-time sign-in code that this process writes, at start and after each use, to
//!   `console.dev_code_file` (mode 0600; `make run` prints it). A correct code buys an admin
//!   token signed by the dev key, for `console.dev_token_ttl`; the code is then replaced. There
//!   is no way to an admin token without the file.
//!
//! Attempts are limited per client address (`console.signin_limit`).

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use axum::extract::State as AxumState;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use url::Url;

use crate::auth::devkey::{DevKey, TokenRequest};
use crate::auth::Verifier;
use crate::config::Environment;
use crate::error::{ApiError, ApiResult, ErrorCode, Json};
use crate::server::client::ClientAddr;
use crate::server::openapi::Errors;

/// The sign-in handlers' state.
#[derive(Clone)]
pub struct SignInState {
    pub(crate) console: super::State,
    pub(crate) verifier: Arc<Verifier>,
}

/// The sign-in mode, decided once at start.
pub struct SignIn {
    mode: Mode,
    pub(crate) admin_role: String,
}

enum Mode {
    Dev(Dev),
    /// Boxed: its HTTP client and endpoint cell dwarf the dev mode's fields.
    Oidc(Box<Oidc>),
}

struct Dev {
    key: Arc<DevKey>,
    file: PathBuf,
    /// The current code. A std mutex held to compare or replace it, never across an await.
    code: Mutex<String>,
    ttl: std::time::Duration,
    tenant: String,
    issuer: Option<String>,
    audience: Option<String>,
}

struct Oidc {
    client_id: Option<String>,
    scopes: Vec<String>,
    issuer: Option<String>,
    configured: (Option<Url>, Option<Url>),
    /// The authorization and token endpoints, once known (configured or discovered).
    endpoints: tokio::sync::OnceCell<(Url, Url)>,
    http: reqwest::Client,
}

impl SignIn {
    /// Decides the mode; in dev mode, writes the first sign-in code.
    pub fn new(
        section: &super::Config,
        ctx: &crate::server::Context,
        auth: &crate::auth::Auth,
    ) -> Result<SignIn, String> {
        let config = &ctx.config;
        let admin_role = config.auth.admin_role.clone();
        let dev_allowed = config.jwks_url.is_none() && config.env != Environment::Production;
        let mode = match (&auth.dev_key, dev_allowed) {
            (Some(key), true) => {
                let file = section
                    .dev_code_file
                    .clone()
                    .unwrap_or_else(|| config.auth.dev_key_path().with_file_name("console-code"));
                let dev = Dev {
                    key: key.clone(),
                    file,
                    code: Mutex::new(String::new()),
                    ttl: section.dev_token_ttl,
                    tenant: section.dev_tenant.clone(),
                    issuer: config.auth.issuer.clone(),
                    audience: config.auth.audience.clone(),
                };
                dev.rotate()?;
                tracing::warn!(role = "auth", file = %dev.file.display(),
                    "DEV MODE console: the one-time sign-in code is in this file; open /console/ on the auth port");
                Mode::Dev(dev)
            }
            _ => Mode::Oidc(Box::new(Oidc {
                client_id: section.oidc_client_id.clone().or_else(|| config.auth.audience.clone()),
                scopes: section.oidc_scopes.clone(),
                issuer: config.auth.issuer.clone(),
                configured: (
                    section.oidc_authorization_url.clone(),
                    section.oidc_token_url.clone(),
                ),
                endpoints: tokio::sync::OnceCell::new(),
                http: reqwest::Client::builder()
                    .timeout(config.auth.jwks_timeout)
                    .redirect(reqwest::redirect::Policy::none())
                    .build()
                    .map_err(|e| e.to_string())?,
            })),
        };
        Ok(SignIn { mode, admin_role })
    }
}

impl Dev {
    /// Replaces the code and writes it to the file (mode 0600, through a rename so a reader
    /// never sees half a code).
    fn rotate(&self) -> Result<(), String> {
        let hex = uuid::Uuid::new_v4().simple().to_string();
        let code: String = hex.as_bytes()[..20]
            .chunks(5)
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect::<Vec<_>>()
            .join("-");
        write_private(&self.file, &format!("{code}\n"))
            .map_err(|e| format!("console.dev_code_file {}: {e}", self.file.display()))?;
        *self.code.lock().unwrap_or_else(|p| p.into_inner()) = code;
        Ok(())
    }

    /// Whether `given` is the current code (compared in constant time); a match replaces it.
    fn redeem(&self, given: &str) -> bool {
        let mut code = self.code.lock().unwrap_or_else(|p| p.into_inner());
        let given = given.trim().to_ascii_lowercase();
        let (a, b) = (given.as_bytes(), code.as_bytes());
        let same =
            a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0;
        if same {
            // Spent: nobody may use it again, even if writing the next one fails.
            *code = uuid::Uuid::new_v4().to_string();
        }
        same
    }
}

fn write_private(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!("tmp-{}", uuid::Uuid::new_v4().simple()));
    let mut file =
        std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// How the page should sign in (`GET /console/session/setup`).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Setup {
    /// `dev` (a one-time code) or `oidc` (the IdP).
    mode: String,
    /// Dev mode: the file holding the sign-in code on the machine running the layer.
    code_file: Option<String>,
    /// OIDC: the IdP's authorization endpoint.
    authorization_url: Option<String>,
    /// OIDC: the console's client id.
    client_id: Option<String>,
    /// OIDC: scopes to ask for.
    scopes: Vec<String>,
    /// The role an operator needs.
    admin_role: String,
    /// The roles the console's relay reaches (`auth` always; the others when configured).
    roles: Vec<String>,
}

/// An operator's session token, held by the page for the tab's life.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Session {
    /// The bearer token every console call carries.
    token: String,
    /// Unix seconds when it expires.
    expires_at: u64,
    /// The operator (the token's subject: who the audit names).
    subject: String,
    /// The operator's tenant.
    tenant_id: String,
    /// The operator's roles.
    roles: Vec<String>,
}

/// A dev sign-in (`POST /console/session/dev`).
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DevSignIn {
    /// The code from `console.dev_code_file`.
    code: String,
    /// Who is signing in (the token's subject, which the audit records); default `operator`.
    #[serde(default)]
    operator: Option<String>,
}

/// An OIDC sign-in (`POST /console/session/oidc`): the authorization code and its PKCE verifier.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OidcSignIn {
    /// The authorization code the IdP sent back.
    code: String,
    /// The PKCE code verifier the page kept for the redirect.
    code_verifier: String,
    /// The redirect URI used (the console's own `/console/`).
    redirect_uri: String,
}

#[utoipa::path(get, path = "/console/session/setup", tag = "console", summary = "How the console signs in: dev code or the IdP (OIDC with PKCE)", responses((status = 200, description = "OK", body = Setup), Errors))]
pub(super) async fn setup(AxumState(state): AxumState<SignInState>) -> ApiResult<Response> {
    let signin = &state.console.signin;
    let reachable: Vec<String> =
        state.console.relay.reachable().into_iter().map(String::from).collect();
    let setup = match &signin.mode {
        Mode::Dev(dev) => Setup {
            mode: "dev".into(),
            code_file: Some(dev.file.display().to_string()),
            authorization_url: None,
            client_id: None,
            scopes: Vec::new(),
            admin_role: signin.admin_role.clone(),
            roles: reachable.clone(),
        },
        Mode::Oidc(oidc) => {
            let (authorize, _) = oidc.endpoints().await?;
            Setup {
                mode: "oidc".into(),
                code_file: None,
                authorization_url: Some(authorize.to_string()),
                client_id: oidc.client_id.clone(),
                scopes: oidc.scopes.clone(),
                admin_role: signin.admin_role.clone(),
                roles: reachable,
            }
        }
    };
    Ok(axum::Json(setup).into_response())
}

fn limit_signin(state: &SignInState, client: Option<ClientAddr>) -> Result<(), ApiError> {
    let limits = &state.console.limits;
    let ip = client.map(|c| c.0).unwrap_or(IpAddr::from([0, 0, 0, 0]));
    let verdict = limits.signins.check(&[(ip, &limits.signin_policy)]);
    match verdict.first().and_then(super::Limits::refusal) {
        Some(refusal) => Err(refusal),
        None => Ok(()),
    }
}

#[utoipa::path(post, path = "/console/session/dev", tag = "console", summary = "Dev mode: trade the one-time sign-in code for an admin token", request_body = DevSignIn, responses((status = 200, description = "OK", body = Session), Errors))]
pub(super) async fn dev(
    AxumState(state): AxumState<SignInState>,
    client: Option<axum::Extension<ClientAddr>>,
    Json(body): Json<DevSignIn>,
) -> ApiResult<Response> {
    limit_signin(&state, client.map(|c| c.0))?;
    let signin = &state.console.signin;
    let Mode::Dev(dev) = &signin.mode else {
        return Err(ApiError::not_found(
            "dev sign-in is off: sign in through the identity provider",
        ));
    };
    let operator = body.operator.as_deref().map(str::trim).filter(|o| !o.is_empty());
    let operator = operator.unwrap_or("operator");
    let valid_name = operator.len() <= 64
        && operator.chars().all(|c| c.is_ascii_alphanumeric() || "._@-".contains(c));
    if !valid_name {
        return Err(ApiError::validation("operator", "1 to 64 of A-Z a-z 0-9 . _ @ -"));
    }
    if !dev.redeem(&body.code) {
        tracing::warn!(role = "auth", "console sign-in refused: wrong code");
        return Err(ApiError::new(ErrorCode::Unauthenticated, "wrong or spent sign-in code")
            .with_reason("bad_signature"));
    }
    if let Err(e) = dev.rotate() {
        tracing::error!(role = "auth", error = %e, "the next console sign-in code was not written");
    }
    let roles = vec![signin.admin_role.clone()];
    let token = dev
        .key
        .issue(&TokenRequest {
            subject: operator,
            tenant: &dev.tenant,
            roles: &roles,
            ttl: dev.ttl,
            issuer: dev.issuer.as_deref(),
            audience: dev.audience.as_deref(),
        })
        .map_err(|e| ApiError::internal(anyhow::anyhow!(e)))?;
    tracing::info!(role = "auth", operator = %operator, "console sign-in (dev code)");
    session(&state, token).await
}

/// Verifies `token` like any other and answers it as a session, if it carries the admin role.
async fn session(state: &SignInState, token: String) -> ApiResult<Response> {
    let verified = state.verifier.verify(&token).await.map_err(ApiError::from)?;
    let identity = &verified.identity;
    if !identity.has_role(&state.console.signin.admin_role) {
        return Err(ApiError::new(
            ErrorCode::Forbidden,
            format!("the console is for the {} role only", state.console.signin.admin_role),
        ));
    }
    Ok(axum::Json(Session {
        expires_at: identity.expires_at,
        subject: identity.subject.clone(),
        tenant_id: identity.tenant.clone(),
        roles: identity.roles.clone(),
        token,
    })
    .into_response())
}

#[derive(Deserialize)]
struct Discovery {
    authorization_endpoint: Url,
    token_endpoint: Url,
}

#[derive(Deserialize)]
struct TokenAnswer {
    access_token: String,
}

impl Oidc {
    async fn endpoints(&self) -> Result<(Url, Url), ApiError> {
        self.endpoints
            .get_or_try_init(|| async {
                if let (Some(a), Some(t)) = &self.configured {
                    return Ok((a.clone(), t.clone()));
                }
                let issuer = self.issuer.as_deref().ok_or_else(|| {
                    ApiError::dependency(
                        "idp",
                        anyhow::anyhow!("no auth.issuer and no console.oidc_* endpoints"),
                    )
                })?;
                let url =
                    format!("{}/.well-known/openid-configuration", issuer.trim_end_matches('/'));
                let found: Discovery =
                    async { self.http.get(&url).send().await?.error_for_status()?.json().await }
                        .await
                        .map_err(|e: reqwest::Error| {
                            ApiError::dependency("idp", anyhow::anyhow!(e))
                        })?;
                Ok((
                    self.configured.0.clone().unwrap_or(found.authorization_endpoint),
                    self.configured.1.clone().unwrap_or(found.token_endpoint),
                ))
            })
            .await
            .cloned()
    }
}

#[utoipa::path(post, path = "/console/session/oidc", tag = "console", summary = "Redeem an authorization code (with its PKCE verifier) at the IdP; admin role only", request_body = OidcSignIn, responses((status = 200, description = "OK", body = Session), Errors))]
pub(super) async fn oidc(
    AxumState(state): AxumState<SignInState>,
    client: Option<axum::Extension<ClientAddr>>,
    headers: http::HeaderMap,
    Json(body): Json<OidcSignIn>,
) -> ApiResult<Response> {
    limit_signin(&state, client.map(|c| c.0))?;
    let Mode::Oidc(oidc) = &state.console.signin.mode else {
        return Err(ApiError::not_found("OIDC sign-in is off in dev mode: use the sign-in code"));
    };
    // The redirect URI is this console's own /console/, at the host the browser asked for.
    let host = headers.get(http::header::HOST).and_then(|h| h.to_str().ok()).unwrap_or_default();
    let redirect = Url::parse(&body.redirect_uri)
        .ok()
        .filter(|u| u.path() == "/console/" && u.query().is_none() && u.fragment().is_none())
        .filter(|u| {
            let authority = match (u.host_str(), u.port()) {
                (Some(h), Some(p)) => format!("{h}:{p}"),
                (Some(h), None) => h.to_string(),
                _ => String::new(),
            };
            authority.eq_ignore_ascii_case(host)
        })
        .ok_or_else(|| {
            ApiError::validation("redirect_uri", "must be this console's own /console/ address")
        })?;
    if !(43..=128).contains(&body.code_verifier.len()) {
        return Err(ApiError::validation("code_verifier", "43 to 128 characters (RFC 7636)"));
    }
    let (_, token_url) = oidc.endpoints().await?;
    let client_id = oidc.client_id.clone().ok_or_else(|| {
        ApiError::dependency("idp", anyhow::anyhow!("no console.oidc_client_id or auth.audience"))
    })?;
    let form = [
        ("grant_type", "authorization_code"),
        ("code", body.code.as_str()),
        ("code_verifier", body.code_verifier.as_str()),
        ("redirect_uri", redirect.as_str()),
        ("client_id", client_id.as_str()),
    ];
    let encoded = url::form_urlencoded::Serializer::new(String::new()).extend_pairs(form).finish();
    let answer = oidc
        .http
        .post(token_url)
        .header(http::header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(encoded)
        .send()
        .await
        .map_err(|e| ApiError::dependency("idp", anyhow::anyhow!(e)))?;
    if answer.status().is_client_error() {
        // The IdP refused the code (expired, used, or the verifier does not match).
        return Err(ApiError::new(
            ErrorCode::Unauthenticated,
            "the identity provider refused the sign-in",
        )
        .with_reason("malformed"));
    }
    let answer: TokenAnswer = answer
        .error_for_status()
        .map_err(|e| ApiError::dependency("idp", anyhow::anyhow!(e)))?
        .json()
        .await
        .map_err(|e| ApiError::dependency("idp", anyhow::anyhow!(e)))?;
    let response = session(&state, answer.access_token).await?;
    tracing::info!(role = "auth", "console sign-in (oidc)");
    Ok(response)
}
