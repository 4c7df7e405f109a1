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

use crate::roles::Role;
use crate::server::openapi::{self, Errors};
use std::sync::Arc;
use utoipa_axum::{router::OpenApiRouter, routes};

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRef, Path, State as AxumState};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use tokio::net::TcpListener;

use crate::auth::revocation::Revocation;
use crate::auth::{unix_now, Auth, AuthError, Caller, Verifier};
use crate::cli::RunError;
use crate::error::{ApiError, ApiResult};
use crate::server::{self, Context};

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

/// Builds the state from the auth handles (built once per process by the caller), and the
/// console when `console.enabled` (its dev sign-in code is written here).
pub fn build(ctx: &Context, auth: Auth) -> Result<State, RunError> {
    let mut state =
        State { auth, admin_role: ctx.config.auth.admin_role.as_str().into(), console: None };
    if ctx.config.console.enabled {
        let api = api_routes(state.clone()).split_for_parts().0;
        let built = console::build(ctx, &state.auth, api)
            .map_err(|e| RunError::Other(anyhow::anyhow!("console: {e}")))?;
        state.console = Some(built);
    }
    Ok(state)
}

/// The role's routes, with the console's when it is enabled.
pub fn router(state: State) -> Router {
    let mut routes = api_routes(state.clone());
    if let Some(console) = state.console.clone() {
        routes = routes.merge(console::router(console, state.auth.verifier.clone()));
    }
    openapi::finish(routes)
}

/// The role's API (without the console).
fn api_routes(state: State) -> OpenApiRouter {
    {
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
            .with_state(state)
    }
}

#[utoipa::path(post, path = "/auth/verify-ws", tag = "auth", summary = "Verify a token for a WebSocket connection (as /auth/verify)", request_body = serde_json::Value, responses((status = 200, description = "OK", body = serde_json::Value), Errors))]
async fn verify_ws(
    state: AxumState<State>,
    body: Result<Json<VerifyBody>, JsonRejection>,
) -> ApiResult<Response> {
    verify(state, body).await
}

/// Serves the role on `listener` until shutdown.
pub async fn run(listener: TcpListener, state: State, ctx: Context) -> Result<(), RunError> {
    ctx.readiness.mark_started();
    let app = server::app(&ctx, router(state));
    server::serve(listener, app, &ctx).await.map_err(|e| RunError::Other(e.into()))
}

#[derive(Deserialize)]
struct VerifyBody {
    token: String,
}

#[utoipa::path(post, path = "/auth/verify", tag = "auth", summary = "Verify a token: 200 with valid true or false and the reason", request_body = serde_json::Value, responses((status = 200, description = "OK", body = serde_json::Value), Errors))]
async fn verify(
    AxumState(state): AxumState<State>,
    body: Result<Json<VerifyBody>, JsonRejection>,
) -> ApiResult<Response> {
    let Json(body) = body.map_err(|e| {
        ApiError::invalid_request(format!("expected {{\"token\": \"...\"}}: {}", e.body_text()))
    })?;
    match state.auth.verifier.verify(&body.token).await {
        Ok(v) => {
            Ok(Json(json!({ "valid": true, "claims": v.claims, "user_info": v.info }))
                .into_response())
        }
        Err(AuthError::Rejected(reason)) => Ok(Json(json!({
            "valid": false,
            "code": "unauthenticated",
            "reason": reason.as_str(),
            "message": reason.message(),
        }))
        .into_response()),
        Err(e) => Err(e.into()),
    }
}

#[utoipa::path(get, path = "/auth/me", tag = "auth", summary = "The caller's identity and user info", security(("bearer" = [])), responses((status = 200, description = "OK", body = serde_json::Value), Errors))]
async fn me(caller: Caller) -> Response {
    Json(json!({ "identity": caller.0.identity, "user_info": caller.0.info })).into_response()
}

#[utoipa::path(post, path = "/auth/logout", tag = "auth", summary = "Revoke the caller's token until it expires", security(("bearer" = [])), responses((status = 200, description = "OK", body = serde_json::Value), Errors))]
async fn logout(AxumState(state): AxumState<State>, caller: Caller) -> ApiResult<Response> {
    let until = caller.0.identity.expires_at;
    let revocation = Revocation::Token { hash: caller.0.token_hash.clone(), until };
    state
        .auth
        .revoke(revocation)
        .await
        .map_err(|e| ApiError::dependency("redis", anyhow::anyhow!(e)))?;
    tracing::info!(subject = %caller.0.identity.subject, "token revoked by logout");
    Ok(Json(json!({ "revoked": true, "until": until })).into_response())
}

#[utoipa::path(post, path = "/auth/users/{id}/revoke", tag = "auth", summary = "Revoke every token of a user issued until now (admin)", params(("id" = String, Path, description = "The id")), security(("bearer" = [])), responses((status = 200, description = "OK", body = serde_json::Value), Errors))]
async fn revoke_user(
    AxumState(state): AxumState<State>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    caller.require_role(&state.admin_role)?;
    let not_before = unix_now();
    let revocation = Revocation::User { subject: id.clone(), not_before };
    state
        .auth
        .revoke(revocation)
        .await
        .map_err(|e| ApiError::dependency("redis", anyhow::anyhow!(e)))?;
    tracing::info!(admin = %caller.0.identity.subject, user = %id, "user's tokens revoked");
    Ok(Json(json!({ "user_id": id, "revoked_before": not_before })).into_response())
}

#[utoipa::path(get, path = "/auth/users/{id}", tag = "auth", summary = "A user's tenant, roles, last sight and revocation (admin)", params(("id" = String, Path, description = "The id")), security(("bearer" = [])), responses((status = 200, description = "OK", body = serde_json::Value), Errors))]
async fn user(
    AxumState(state): AxumState<State>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    caller.require_role(&state.admin_role)?;
    match state
        .auth
        .revocations
        .user(&id)
        .await
        .map_err(|e| ApiError::dependency("redis", anyhow::anyhow!(e)))?
    {
        Some(record) => Ok(Json(record).into_response()),
        None => Err(ApiError::not_found(format!("no user {id:?} has been seen or revoked"))),
    }
}

#[utoipa::path(get, path = "/.well-known/jwks.json", tag = "auth", summary = "The dev key's public JWKS (dev mode only)", responses((status = 200, description = "OK", body = serde_json::Value), Errors))]
async fn jwks(AxumState(state): AxumState<State>) -> ApiResult<Response> {
    match &state.auth.dev_key {
        Some(key) => Ok(Json(key.jwks()).into_response()),
        None => Err(ApiError::not_found("keys are published by the identity provider, not here")),
    }
}

fn key_error(e: crate::auth::api_keys::KeyError) -> ApiError {
    match e {
        crate::auth::api_keys::KeyError::NotFound => {
            ApiError::not_found("no such API key (or it is revoked)")
        }
        crate::auth::api_keys::KeyError::Unavailable(cause) => {
            ApiError::dependency("postgres", anyhow::anyhow!(cause))
        }
    }
}

#[utoipa::path(post, path = "/auth/api-keys", tag = "auth", summary = "Create an API key (admin); the key is shown once", request_body = serde_json::Value, security(("bearer" = [])), responses((status = 201, description = "Created", body = serde_json::Value), Errors))]
async fn create_key(
    AxumState(state): AxumState<State>,
    caller: Caller,
    crate::error::Json(new): crate::error::Json<crate::auth::api_keys::NewKey>,
) -> ApiResult<Response> {
    caller.require_role(&state.admin_role)?;
    if new.name.trim().is_empty() {
        return Err(ApiError::validation("name", "a name is required"));
    }
    if new.tenant_id.trim().is_empty() {
        return Err(ApiError::validation("tenant_id", "a tenant is required"));
    }
    let (key, text) =
        state.auth.api_keys.create(new, &caller.0.identity.subject).await.map_err(key_error)?;
    tracing::info!(admin = %caller.0.identity.subject, key = %key.id, "API key created");
    let mut body = serde_json::to_value(&key).unwrap_or_default();
    body["key"] = json!(text);
    Ok((http::StatusCode::CREATED, Json(body)).into_response())
}

#[utoipa::path(get, path = "/auth/api-keys", tag = "auth", summary = "List API keys (admin)", security(("bearer" = [])), responses((status = 200, description = "OK", body = serde_json::Value), Errors))]
async fn list_keys(AxumState(state): AxumState<State>, caller: Caller) -> ApiResult<Response> {
    caller.require_role(&state.admin_role)?;
    let keys = state.auth.api_keys.store().list().await.map_err(key_error)?;
    Ok(Json(json!({ "api_keys": keys })).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RotateBody {
    /// How long the old secret keeps working (`"1h"`); default none.
    #[serde(default, with = "humantime_serde")]
    overlap: Option<std::time::Duration>,
}

#[utoipa::path(post, path = "/auth/api-keys/{id}/rotate", tag = "auth", summary = "Rotate an API key, the old secret working for an optional overlap (admin)", request_body = Option<serde_json::Value>, params(("id" = String, Path, description = "The id")), security(("bearer" = [])), responses((status = 200, description = "OK", body = serde_json::Value), Errors))]
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
    let (key, text) = state
        .auth
        .api_keys
        .rotate(&id, until, &caller.0.identity.subject)
        .await
        .map_err(key_error)?;
    announce_key(&state, &key.id).await;
    tracing::info!(admin = %caller.0.identity.subject, key = %key.id, "API key rotated");
    let mut body = serde_json::to_value(&key).unwrap_or_default();
    body["key"] = json!(text);
    Ok(Json(body).into_response())
}

#[utoipa::path(delete, path = "/auth/api-keys/{id}", tag = "auth", summary = "Revoke an API key (admin)", params(("id" = String, Path, description = "The id")), security(("bearer" = [])), responses((status = 204, description = "Revoked"), Errors))]
async fn revoke_key(
    AxumState(state): AxumState<State>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    caller.require_role(&state.admin_role)?;
    state.auth.api_keys.revoke(&id, &caller.0.identity.subject).await.map_err(key_error)?;
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

#[utoipa::path(get, path = "/auth/api-keys/{id}/audit", tag = "auth", summary = "An API key's audit trail (admin)", params(("id" = String, Path, description = "The id")), security(("bearer" = [])), responses((status = 200, description = "OK", body = serde_json::Value), Errors))]
async fn key_audit(
    AxumState(state): AxumState<State>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    caller.require_role(&state.admin_role)?;
    let rows = state.auth.api_keys.store().audit(&id).await.map_err(key_error)?;
    let rows: Vec<_> = rows
        .into_iter()
        .map(|(action, actor, at)| json!({"action": action, "actor": actor, "at": at}))
        .collect();
    Ok(Json(json!({ "key_id": id, "audit": rows })).into_response())
}
