//! The auth role (port 8010): the auth module over HTTP for callers outside the layer.
//!
//! - `POST /auth/verify`, `POST /auth/verify-ws`: `{"token"}` -> 200 `{"valid": true, "claims",
//!   "user_info"}` or 200 `{"valid": false, "code", "reason", "message"}`; a missing or malformed
//!   body is 400.
//! - `GET /auth/me`: the caller's own user info.
//! - `POST /auth/logout`: revokes the caller's token until it expires.
//! - `POST /auth/users/{id}/revoke` (admin): revokes every token of the user issued until now.
//! - `GET /auth/users/{id}` (admin): tenant, roles, last seen, revoked-before; 404 if unknown.
//! - `GET /.well-known/jwks.json`: the dev key's public half (dev mode only).
//! - API keys (admin): `POST /auth/api-keys` (the key is shown once), `GET /auth/api-keys`,
//!   `POST /auth/api-keys/{id}/rotate` (`{"overlap": "1h"}`: the old secret works that long),
//!   `DELETE /auth/api-keys/{id}`, `GET /auth/api-keys/{id}/audit`.
//! - [`console`]: the operator's console under `/console/` (when `console.enabled`).

pub mod console;

use crate::role::Role;
use crate::server::openapi::{self, Errors};
use std::sync::Arc;
use utoipa_axum::{router::OpenApiRouter, routes};

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRef, Path, State as AxumState};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;
use utoipa::ToSchema;

use super::common::{Deps, RunError, Service};
use crate::auth::api_keys::{ApiKey, NewKey};
use crate::auth::revocation::Revocation;
use crate::auth::revocation::UserRecord;
use crate::auth::{unix_now, Auth, AuthError, Caller, Identity, Reason, UserInfo, Verifier};
use crate::error::{ApiError, ApiResult, ErrorCode};
use crate::server::Context;

/// The auth role's state: the shared auth handles and the admin role's name.
#[derive(Clone)]
pub struct State {
    auth: Auth,
    admin_role: Arc<str>,
    /// The console, when enabled.
    console: Option<console::State>,
}

impl FromRef<State> for Arc<Verifier> {
    fn from_ref(state: &State) -> Self {
        state.auth.verifier.clone()
    }
}

/// The auth role's own section: the operator's console (its port is the shared `auth.port`).
pub use console::Config;

/// Builds the state from the auth handles (built once per process by the caller), and the
/// console when `console.enabled` (its dev sign-in code is written here).
pub async fn build(config: &Config, deps: &Deps) -> Result<State, RunError> {
    let ctx = &deps.ctx;
    let auth = deps.auth.clone();
    let mut state =
        State { auth, admin_role: ctx.config.auth.admin_role.as_str().into(), console: None };
    if config.enabled {
        let api = api().with_state(state.clone()).split_for_parts().0;
        let built = console::build(config, ctx, &state.auth, api)
            .map_err(|e| RunError::Other(anyhow::anyhow!("console: {e}")))?;
        state.console = Some(built);
    }
    Ok(state)
}

/// The role's routes, with the console's when it is enabled.
pub fn router(state: State) -> Router {
    let mut routes = api().with_state(state.clone());
    if let Some(console) = state.console.clone() {
        routes = routes.merge(console::router(console, state.auth.verifier.clone()));
    }
    openapi::finish(routes)
}

/// The role's API document (`/openapi.json`), built without a state.
pub fn openapi() -> utoipa::openapi::OpenApi {
    api().into_openapi()
}

/// The role's documented routes.
fn api() -> OpenApiRouter<State> {
    OpenApiRouter::with_openapi(openapi::base(Role::Auth))
        .routes(routes!(verify))
        .routes(routes!(verify_ws))
        .routes(routes!(me))
        .routes(routes!(logout))
        .routes(routes!(user))
        .routes(routes!(revoke_user))
        .routes(routes!(jwks))
        .routes(routes!(list_keys, create_key))
        .routes(routes!(revoke_key))
        .routes(routes!(rotate_key))
        .routes(routes!(key_audit))
}

#[utoipa::path(post, path = "/auth/verify-ws", tag = "auth", summary = "Verify a token for a WebSocket connection (as /auth/verify)",
    request_body(content = VerifyBody, example = json!({"token": "eyJhbGciOiJFUzI1NiIsInR5cCI6IkpXVCJ9.e30.c2ln"})),
    responses((status = 200, description = "The verdict: valid with the claims, or not valid with the reason", body = VerifyAnswer), Errors))]
async fn verify_ws(
    state: AxumState<State>,
    body: Result<Json<VerifyBody>, JsonRejection>,
) -> ApiResult<Response> {
    verify(state, body).await
}

/// What `common::run` serves.
pub fn service(state: State, _ctx: &Context) -> Service {
    Service::new(router(state))
}

/// The body of `POST /auth/verify` and `/auth/verify-ws`.
#[derive(Deserialize, ToSchema)]
struct VerifyBody {
    /// The token (a `Bearer ` prefix is fine).
    token: String,
}

/// The answer of `POST /auth/verify`: 200 whether or not the token is valid.
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
enum VerifyAnswer<'a> {
    /// The token verifies.
    Valid(Valid<'a>),
    /// It does not: why.
    Invalid(Invalid),
}

/// A token that verifies.
#[derive(Serialize, ToSchema)]
struct Valid<'a> {
    /// Always `true`.
    #[schema(value_type = bool, example = true)]
    valid: bool,
    /// Every claim of the token, as signed.
    #[schema(value_type = Object)]
    claims: &'a RawValue,
    /// The user-facing view of the token.
    user_info: &'a UserInfo,
}

/// A token that does not verify.
#[derive(Serialize, ToSchema)]
struct Invalid {
    /// Always `false`.
    #[schema(example = false)]
    valid: bool,
    /// Always `unauthenticated`.
    #[schema(value_type = ErrorCode)]
    code: &'static str,
    /// Why it was refused.
    reason: Reason,
    /// For a human.
    message: &'static str,
}

#[utoipa::path(post, path = "/auth/verify", tag = "auth", summary = "Verify a token: 200 with valid true or false and the reason",
    request_body(content = VerifyBody, example = json!({"token": "Bearer eyJhbGciOiJFUzI1NiIsInR5cCI6IkpXVCJ9.e30.c2ln"})),
    responses((status = 200, description = "The verdict: valid with the claims, or not valid with the reason", body = VerifyAnswer), Errors))]
async fn verify(
    AxumState(state): AxumState<State>,
    body: Result<Json<VerifyBody>, JsonRejection>,
) -> ApiResult<Response> {
    let Json(body) = body.map_err(|e| {
        ApiError::invalid_request(format!("expected {{\"token\": \"...\"}}: {}", e.body_text()))
    })?;
    match state.auth.verifier.verify(&body.token).await {
        Ok(v) => {
            let answer = Valid { valid: true, claims: &v.claims, user_info: &v.info };
            Ok(Json(VerifyAnswer::Valid(answer)).into_response())
        }
        Err(AuthError::Rejected(reason)) => Ok(Json(VerifyAnswer::Invalid(Invalid {
            valid: false,
            code: ErrorCode::Unauthenticated.as_str(),
            reason,
            message: reason.message(),
        }))
        .into_response()),
        Err(e) => Err(e.into()),
    }
}

/// The body of `GET /auth/me`.
#[derive(Serialize, ToSchema)]
struct Me<'a> {
    /// Who is calling.
    identity: &'a Identity,
    /// The user-facing view of the credential.
    user_info: &'a UserInfo,
}

#[utoipa::path(get, path = "/auth/me", tag = "auth", summary = "The caller's identity and user info", security(("bearer" = [])), responses((status = 200, description = "The caller", body = Me), Errors))]
async fn me(caller: Caller) -> Response {
    Json(Me { identity: &caller.0.identity, user_info: &caller.0.info }).into_response()
}

/// The body of `POST /auth/logout`.
#[derive(Serialize, ToSchema)]
struct LoggedOut {
    /// Always `true`.
    #[schema(example = true)]
    revoked: bool,
    /// Unix seconds until which the token stays revoked (its expiry).
    until: u64,
}

#[utoipa::path(post, path = "/auth/logout", tag = "auth", summary = "Revoke the caller's token until it expires", security(("bearer" = [])), responses((status = 200, description = "The token is revoked", body = LoggedOut), Errors))]
async fn logout(AxumState(state): AxumState<State>, caller: Caller) -> ApiResult<Response> {
    let until = caller.0.identity.expires_at;
    let revocation = Revocation::Token { hash: caller.0.token_hash.clone(), until };
    state.auth.revoke(revocation).await?;
    tracing::info!(subject = %caller.0.identity.subject, "token revoked by logout");
    Ok(Json(LoggedOut { revoked: true, until }).into_response())
}

/// The body of `POST /auth/users/{id}/revoke`.
#[derive(Serialize, ToSchema)]
struct UserRevoked {
    /// The user.
    user_id: String,
    /// Tokens issued at or before this (unix seconds) are revoked.
    revoked_before: u64,
}

#[utoipa::path(post, path = "/auth/users/{id}/revoke", tag = "auth", summary = "Revoke every token of a user issued until now (admin)", params(("id" = String, Path, description = "The user's subject", example = "alice")), security(("bearer" = [])), responses((status = 200, description = "The user's tokens are revoked", body = UserRevoked), Errors))]
async fn revoke_user(
    AxumState(state): AxumState<State>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    caller.require_role(&state.admin_role)?;
    let not_before = unix_now();
    let revocation = Revocation::User { subject: id.clone(), not_before };
    state.auth.revoke(revocation).await?;
    tracing::info!(admin = %caller.0.identity.subject, user = %id, "user's tokens revoked");
    Ok(Json(UserRevoked { user_id: id, revoked_before: not_before }).into_response())
}

#[utoipa::path(get, path = "/auth/users/{id}", tag = "auth", summary = "A user's tenant, roles, last sight and revocation (admin)", params(("id" = String, Path, description = "The user's subject", example = "alice")), security(("bearer" = [])), responses((status = 200, description = "The user", body = UserRecord), Errors))]
async fn user(
    AxumState(state): AxumState<State>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    caller.require_role(&state.admin_role)?;
    match state.auth.revocations.user(&id).await? {
        Some(record) => Ok(Json(record).into_response()),
        None => Err(ApiError::not_found(format!("no user {id:?} has been seen or revoked"))),
    }
}

/// A JSON Web Key Set (RFC 7517).
#[derive(Serialize, Deserialize, ToSchema)]
struct JwkSet {
    /// The public keys: JWKs (`kty`, `crv`, `x`, `y`, `kid`, `alg`, `use`), as RFC 7517 defines
    /// them.
    #[schema(value_type = Vec<Object>)]
    keys: Vec<Value>,
}

#[utoipa::path(get, path = "/.well-known/jwks.json", tag = "auth", summary = "The dev key's public JWKS (dev mode only)", responses((status = 200, description = "The dev key's public half", body = JwkSet), Errors))]
async fn jwks(AxumState(state): AxumState<State>) -> ApiResult<Response> {
    match &state.auth.dev_key {
        Some(key) => {
            let set: JwkSet = serde_json::from_value(key.jwks()).map_err(ApiError::internal)?;
            Ok(Json(set).into_response())
        }
        None => Err(ApiError::not_found("keys are published by the identity provider, not here")),
    }
}

/// A key with its secret: the answer of create and rotate, the only time the secret is shown.
#[derive(Serialize, ToSchema)]
struct KeyWithSecret {
    /// The stored key.
    #[serde(flatten)]
    api_key: ApiKey,
    /// The key to send as `X-API-Key`: `ak_<id>_<secret>`.
    #[schema(
        example = "ak_0123456789ab_0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
    )]
    key: String,
}

/// The body of `GET /auth/api-keys`.
#[derive(Serialize, ToSchema)]
struct KeyList {
    /// Every key, revoked ones too.
    api_keys: Vec<ApiKey>,
}

#[utoipa::path(post, path = "/auth/api-keys", tag = "auth", summary = "Create an API key (admin); the key is shown once",
    request_body(content = NewKey, example = json!({"name": "pricing-batch", "tenant_id": "t1", "roles": ["trader"]})),
    security(("bearer" = [])), responses((status = 201, description = "Created; `key` is shown only now", body = KeyWithSecret), Errors))]
async fn create_key(
    AxumState(state): AxumState<State>,
    caller: Caller,
    crate::error::Json(new): crate::error::Json<NewKey>,
) -> ApiResult<Response> {
    caller.require_role(&state.admin_role)?;
    if new.name.trim().is_empty() {
        return Err(ApiError::validation("name", "a name is required"));
    }
    if new.tenant_id.trim().is_empty() {
        return Err(ApiError::validation("tenant_id", "a tenant is required"));
    }
    let (key, text) = state.auth.api_keys.create(new, &caller.0.identity.subject).await?;
    tracing::info!(admin = %caller.0.identity.subject, key = %key.id, "API key created");
    let body = KeyWithSecret { api_key: key, key: text };
    Ok((http::StatusCode::CREATED, Json(body)).into_response())
}

#[utoipa::path(get, path = "/auth/api-keys", tag = "auth", summary = "List API keys (admin)", security(("bearer" = [])), responses((status = 200, description = "Every key", body = KeyList), Errors))]
async fn list_keys(AxumState(state): AxumState<State>, caller: Caller) -> ApiResult<Response> {
    caller.require_role(&state.admin_role)?;
    let keys = state.auth.api_keys.store().list().await?;
    Ok(Json(KeyList { api_keys: keys }).into_response())
}

/// The optional body of `POST /auth/api-keys/{id}/rotate`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct RotateBody {
    /// How long the old secret keeps working (`"1h"`); default none.
    #[serde(default, with = "humantime_serde")]
    #[schema(value_type = Option<String>, example = "1h")]
    overlap: Option<std::time::Duration>,
}

#[utoipa::path(post, path = "/auth/api-keys/{id}/rotate", tag = "auth", summary = "Rotate an API key, the old secret working for an optional overlap (admin)",
    request_body(content = Option<RotateBody>, example = json!({"overlap": "1h"})),
    params(("id" = String, Path, description = "The key id (the part after `ak_`)", example = "0123456789ab")), security(("bearer" = [])),
    responses((status = 200, description = "Rotated; `key` is the new secret, shown only now", body = KeyWithSecret), Errors))]
async fn rotate_key(
    AxumState(state): AxumState<State>,
    caller: Caller,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult<Response> {
    caller.require_role(&state.admin_role)?;
    // The body is optional: no overlap means the old secret stops at once.
    let overlap = if body.is_empty() {
        None
    } else {
        serde_json::from_slice::<RotateBody>(&body)
            .map_err(|e| ApiError::validation("overlap", e.to_string()))?
            .overlap
    }
    .unwrap_or_default();
    let until = chrono::Utc::now()
        + chrono::Duration::from_std(overlap)
            .map_err(|_| ApiError::validation("overlap", "too long"))?;
    let (key, text) = state.auth.api_keys.rotate(&id, until, &caller.0.identity.subject).await?;
    announce_key(&state, &key.id).await;
    tracing::info!(admin = %caller.0.identity.subject, key = %key.id, "API key rotated");
    Ok(Json(KeyWithSecret { api_key: key, key: text }).into_response())
}

#[utoipa::path(delete, path = "/auth/api-keys/{id}", tag = "auth", summary = "Revoke an API key (admin)", params(("id" = String, Path, description = "The key id (the part after `ak_`)", example = "0123456789ab")), security(("bearer" = [])), responses((status = 204, description = "Revoked"), Errors))]
async fn revoke_key(
    AxumState(state): AxumState<State>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    caller.require_role(&state.admin_role)?;
    state.auth.api_keys.revoke(&id, &caller.0.identity.subject).await?;
    announce_key(&state, &id).await;
    tracing::info!(admin = %caller.0.identity.subject, key = %id, "API key revoked");
    Ok(http::StatusCode::NO_CONTENT.into_response())
}

/// Tells every verifier to drop its cached record of a key (best effort: the change is already
/// in PostgreSQL, and every record expires within a second while PostgreSQL answers).
async fn announce_key(state: &State, id: &str) {
    let announced = state.auth.revoke(Revocation::ApiKey { id: id.to_string() }).await;
    if let Err(e) = announced {
        tracing::warn!(key = %id, error = %e, "API key change not announced; other replicas see it within a second");
    }
}

/// The body of `GET /auth/api-keys/{id}/audit`.
#[derive(Serialize, ToSchema)]
struct KeyAudit {
    /// The key.
    key_id: String,
    /// Every change, oldest first.
    audit: Vec<KeyAuditRow>,
}

/// One change to a key.
#[derive(Serialize, ToSchema)]
struct KeyAuditRow {
    /// `create`, `rotate` or `revoke`.
    #[schema(example = "create")]
    action: String,
    /// Who made it (the admin's subject).
    actor: String,
    /// When.
    at: chrono::DateTime<chrono::Utc>,
}

#[utoipa::path(get, path = "/auth/api-keys/{id}/audit", tag = "auth", summary = "An API key's audit trail (admin)", params(("id" = String, Path, description = "The key id (the part after `ak_`)", example = "0123456789ab")), security(("bearer" = [])), responses((status = 200, description = "The key's changes", body = KeyAudit), Errors))]
async fn key_audit(
    AxumState(state): AxumState<State>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    caller.require_role(&state.admin_role)?;
    let rows = state.auth.api_keys.store().audit(&id).await?;
    let audit =
        rows.into_iter().map(|(action, actor, at)| KeyAuditRow { action, actor, at }).collect();
    Ok(Json(KeyAudit { key_id: id, audit }).into_response())
}
