//! The entitlements HTTP API. Checks need a valid token; a caller without the service role may
//! only ask about itself (its own subject and tenant, with its own roles). Rule changes need the
//! admin role; reading rules needs admin or service.

use crate::server::openapi::Errors;
use axum::extract::{Path, Query, State as AxumState};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{json, Value};
use uuid::Uuid;

use super::eval::CheckRequest;
use super::rules::{glob_matches, RuleInput};
use super::store::StoreError;
use super::State;
use crate::auth::{Caller, IdentityKind};
use crate::error::{ApiError, ApiResult, ErrorCode, Json};

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound => ApiError::not_found("no rule with that id"),
            StoreError::Conflict { .. } => {
                ApiError::new(ErrorCode::Conflict, e.to_string()).with_field("version")
            }
            StoreError::Unavailable(cause) => {
                ApiError::dependency("postgres", anyhow::anyhow!(cause))
            }
        }
    }
}

/// A non-service caller may only check itself; its roles are its token's.
fn authorize(state: &State, caller: &Caller, req: &mut CheckRequest) -> Result<(), ApiError> {
    let id = &caller.0.identity;
    if id.kind == IdentityKind::Service || id.has_role(&state.service_role) {
        return Ok(());
    }
    if req.user_id != id.subject || req.tenant_id != id.tenant {
        return Err(ApiError::new(
            ErrorCode::Forbidden,
            "without the service role a caller may only check itself",
        ));
    }
    req.roles = id.roles.clone();
    Ok(())
}

fn require_admin(state: &State, caller: &Caller) -> Result<(), ApiError> {
    caller.require_role(&state.admin_role)
}

fn require_reader(state: &State, caller: &Caller) -> Result<(), ApiError> {
    let id = &caller.0.identity;
    if id.has_role(&state.admin_role) || id.has_role(&state.service_role) {
        Ok(())
    } else {
        Err(ApiError::new(ErrorCode::Forbidden, "reading rules needs the admin or service role"))
    }
}

#[utoipa::path(post, path = "/entitlements/check", tag = "entitlements", summary = "Decide one check (service or admin role, or the caller for itself)", request_body = serde_json::Value, security(("bearer" = [])), responses((status = 200, description = "OK", body = serde_json::Value), Errors))]
pub(super) async fn check(
    AxumState(state): AxumState<State>,
    caller: Caller,
    Json(mut req): Json<CheckRequest>,
) -> ApiResult<Response> {
    authorize(&state, &caller, &mut req)?;
    Ok(axum::Json(state.engine.check(&req).await).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct BatchItem {
    /// The caller's correlation id, echoed.
    id: Value,
    #[serde(flatten)]
    req: CheckRequest,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Batch {
    checks: Vec<Value>,
}

#[utoipa::path(post, path = "/entitlements/check/batch", tag = "entitlements", summary = "Decide many checks at once", request_body = serde_json::Value, security(("bearer" = [])), responses((status = 200, description = "OK", body = serde_json::Value), Errors))]
pub(super) async fn check_batch(
    AxumState(state): AxumState<State>,
    caller: Caller,
    Json(batch): Json<Batch>,
) -> ApiResult<Response> {
    if batch.checks.len() > state.max_batch {
        return Err(ApiError::validation(
            "checks",
            format!("at most {} checks per batch", state.max_batch),
        ));
    }
    let mut results = Vec::with_capacity(batch.checks.len());
    for (i, raw) in batch.checks.into_iter().enumerate() {
        // Each item stands alone: a malformed or forbidden one fails by itself.
        let id = raw.get("id").cloned().unwrap_or(Value::Null);
        let item: BatchItem = match serde_json::from_value(raw) {
            Ok(item) => item,
            Err(e) => {
                results.push(json!({"id": id, "error": {"code": "validation_failed", "field": format!("checks[{i}]"), "message": e.to_string()}}));
                continue;
            }
        };
        let mut req = item.req;
        match authorize(&state, &caller, &mut req) {
            Ok(()) => {
                let decision = state.engine.check(&req).await;
                let mut v = serde_json::to_value(decision).unwrap_or(Value::Null);
                v["id"] = item.id;
                results.push(v);
            }
            Err(e) => results.push(
                json!({"id": item.id, "error": {"code": e.code(), "message": e.public_message()}}),
            ),
        }
    }
    Ok(axum::Json(json!({ "results": results })).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ResourcesRequest {
    user_id: String,
    tenant_id: String,
    #[serde(default)]
    roles: Vec<String>,
    action: String,
    resources: Vec<String>,
    #[serde(default)]
    context: Value,
}

#[utoipa::path(post, path = "/entitlements/resources", tag = "entitlements", summary = "Which of these resources the subject may act on", request_body = serde_json::Value, security(("bearer" = [])), responses((status = 200, description = "OK", body = serde_json::Value), Errors))]
pub(super) async fn resources(
    AxumState(state): AxumState<State>,
    caller: Caller,
    Json(body): Json<ResourcesRequest>,
) -> ApiResult<Response> {
    if body.resources.len() > state.max_batch {
        return Err(ApiError::validation(
            "resources",
            format!("at most {} resources", state.max_batch),
        ));
    }
    let (mut allowed, mut denied) = (Vec::new(), Vec::new());
    let mut version = 0;
    for resource in body.resources {
        let mut req = CheckRequest {
            user_id: body.user_id.clone(),
            tenant_id: body.tenant_id.clone(),
            roles: body.roles.clone(),
            resource: resource.clone(),
            action: body.action.clone(),
            context: body.context.clone(),
        };
        authorize(&state, &caller, &mut req)?;
        let d = state.engine.check(&req).await;
        version = d.rules_version;
        if d.allowed {
            allowed.push(resource)
        } else {
            denied.push(resource)
        }
    }
    Ok(axum::Json(json!({ "allowed": allowed, "denied": denied, "rules_version": version }))
        .into_response())
}

#[derive(Deserialize)]
pub(super) struct ListQuery {
    tenant_id: Option<String>,
    user_id: Option<String>,
    /// Rules whose resource glob matches this resource.
    resource: Option<String>,
    #[serde(default)]
    offset: usize,
    limit: Option<usize>,
}

#[utoipa::path(get, path = "/entitlements/rules", tag = "entitlements", summary = "List rules (admin)", security(("bearer" = [])), responses((status = 200, description = "OK", body = serde_json::Value), Errors))]
pub(super) async fn list(
    AxumState(state): AxumState<State>,
    caller: Caller,
    Query(q): Query<ListQuery>,
) -> ApiResult<Response> {
    require_reader(&state, &caller)?;
    let limit = q.limit.unwrap_or(100);
    if limit == 0 || limit > 1000 {
        return Err(ApiError::validation("limit", "limit must be 1 to 1000"));
    }
    let snap = state.engine.snapshot();
    let matching: Vec<_> = snap
        .rules()
        .iter()
        .filter(|r| q.tenant_id.as_ref().is_none_or(|t| r.input.tenant_id.as_ref() == Some(t)))
        .filter(|r| q.user_id.as_ref().is_none_or(|u| r.input.user_id.as_ref() == Some(u)))
        .filter(|r| q.resource.as_ref().is_none_or(|res| glob_matches(&r.input.resource, res)))
        .collect();
    let page: Vec<_> = matching.iter().skip(q.offset).take(limit).map(|r| r.as_ref()).collect();
    Ok(axum::Json(json!({
        "rules": page, "total": matching.len(), "offset": q.offset, "limit": limit, "rules_version": snap.version(),
    }))
    .into_response())
}

#[utoipa::path(get, path = "/entitlements/rules/{id}", tag = "entitlements", summary = "One rule (admin)", params(("id" = String, Path, description = "The id")), security(("bearer" = [])), responses((status = 200, description = "OK", body = serde_json::Value), Errors))]
pub(super) async fn get_rule(
    AxumState(state): AxumState<State>,
    caller: Caller,
    Path(id): Path<Uuid>,
) -> ApiResult<Response> {
    require_reader(&state, &caller)?;
    let snap = state.engine.snapshot();
    let rule = snap.get(id).ok_or_else(|| ApiError::not_found("no rule with that id"))?;
    Ok(([(http::header::ETAG, format!("\"{}\"", rule.version))], axum::Json(rule.as_ref()))
        .into_response())
}

#[utoipa::path(get, path = "/entitlements/rules/{id}/history", tag = "entitlements", summary = "A rule's audit trail (admin)", params(("id" = String, Path, description = "The id")), security(("bearer" = [])), responses((status = 200, description = "OK", body = serde_json::Value), Errors))]
pub(super) async fn history(
    AxumState(state): AxumState<State>,
    caller: Caller,
    Path(id): Path<Uuid>,
) -> ApiResult<Response> {
    require_reader(&state, &caller)?;
    let entries = state.engine.store().history(id).await?;
    if entries.is_empty() && state.engine.snapshot().get(id).is_none() {
        return Err(ApiError::not_found("no rule with that id"));
    }
    Ok(axum::Json(json!({ "rule_id": id, "history": entries })).into_response())
}

#[utoipa::path(post, path = "/entitlements/rules", tag = "entitlements", summary = "Create a rule (admin)", request_body = serde_json::Value, security(("bearer" = [])), responses((status = 201, description = "Created", body = serde_json::Value), Errors))]
pub(super) async fn create(
    AxumState(state): AxumState<State>,
    caller: Caller,
    Json(input): Json<RuleInput>,
) -> ApiResult<Response> {
    require_admin(&state, &caller)?;
    input.validate()?;
    let (rule, version) =
        state.engine.store().create(input, caller.0.identity.subject.clone()).await?;
    state.engine.changed(version).await;
    Ok((
        StatusCode::CREATED,
        [(http::header::ETAG, format!("\"{}\"", rule.version))],
        axum::Json(rule),
    )
        .into_response())
}

/// The version a change expects: `If-Match` (an ETag) or, for `PUT`, the body's `version`.
fn expected_version(headers: &HeaderMap, body: Option<i64>) -> Result<Option<i64>, ApiError> {
    match headers.get(http::header::IF_MATCH) {
        Some(v) => {
            let text =
                v.to_str().unwrap_or_default().trim().trim_start_matches("W/").trim_matches('"');
            text.parse().map(Some).map_err(|_| {
                ApiError::validation("If-Match", "If-Match must be a rule version (its ETag)")
            })
        }
        None => Ok(body),
    }
}

#[utoipa::path(put, path = "/entitlements/rules/{id}", tag = "entitlements", summary = "Replace a rule (admin)", request_body = serde_json::Value, params(("id" = String, Path, description = "The id")), security(("bearer" = [])), responses((status = 200, description = "OK", body = serde_json::Value), Errors))]
pub(super) async fn update(
    AxumState(state): AxumState<State>,
    caller: Caller,
    Path(id): Path<Uuid>,
    headers: HeaderMap,
    Json(input): Json<RuleInput>,
) -> ApiResult<Response> {
    require_admin(&state, &caller)?;
    input.validate()?;
    let expected = expected_version(&headers, input.version)?.ok_or_else(|| {
        ApiError::validation(
            "version",
            "name the version you are replacing (body version or If-Match)",
        )
    })?;
    let (rule, version) =
        state.engine.store().update(id, input, expected, caller.0.identity.subject.clone()).await?;
    state.engine.changed(version).await;
    Ok(([(http::header::ETAG, format!("\"{}\"", rule.version))], axum::Json(rule)).into_response())
}

#[utoipa::path(delete, path = "/entitlements/rules/{id}", tag = "entitlements", summary = "Delete a rule (admin)", params(("id" = String, Path, description = "The id")), security(("bearer" = [])), responses((status = 204, description = "Deleted"), Errors))]
pub(super) async fn delete(
    AxumState(state): AxumState<State>,
    caller: Caller,
    Path(id): Path<Uuid>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    require_admin(&state, &caller)?;
    let expected = expected_version(&headers, None)?;
    let version =
        state.engine.store().delete(id, expected, caller.0.identity.subject.clone()).await?;
    state.engine.changed(version).await;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[utoipa::path(get, path = "/entitlements/stats", tag = "entitlements", summary = "Rules version, snapshot age, cache statistics (admin or service role)", security(("bearer" = [])), responses((status = 200, description = "OK", body = serde_json::Value), Errors))]
pub(super) async fn stats(
    AxumState(state): AxumState<State>,
    caller: Caller,
) -> ApiResult<Response> {
    caller.require_any_role(&[&state.admin_role, &state.service_role])?;
    use std::sync::atomic::Ordering::Relaxed;
    let snap = state.engine.snapshot();
    let s = &state.engine.stats;
    let checks = s.checks.load(Relaxed);
    Ok(axum::Json(json!({
        "rules": snap.rules().len(),
        "rules_version": snap.version(),
        "snapshot_loaded_at": snap.loaded_at(),
        "snapshot_age_seconds": (chrono::Utc::now() - snap.loaded_at()).num_seconds(),
        "checks": checks,
        "allowed": s.allowed.load(Relaxed),
        "denied": checks - s.allowed.load(Relaxed).min(checks),
        "cache_hits": s.cache_hits.load(Relaxed),
        "cache_errors": s.cache_errors.load(Relaxed),
        "reload_errors": s.reload_errors.load(Relaxed),
        "store": state.store_kind,
    }))
    .into_response())
}

/// The question of `POST /entitlements/explain`: a check, asked by an operator about anyone.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct ExplainRequest {
    /// The subject.
    user_id: String,
    /// The subject's tenant.
    tenant_id: String,
    /// The subject's roles (as its token would carry them).
    #[serde(default)]
    roles: Vec<String>,
    /// The resource (`instrument:BRN-F27`).
    resource: String,
    /// The action (`read`).
    action: String,
    /// What conditions may test as `context.<path>`.
    #[serde(default)]
    #[schema(value_type = Object)]
    context: Value,
}

/// A rule as an explanation names it.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub(super) struct ExplainedRule {
    /// The rule's id.
    id: String,
    /// Its name (text, never markup).
    name: String,
    /// `allow` or `deny`.
    effect: String,
    /// Its resource glob.
    resource: String,
    /// Its actions.
    actions: Vec<String>,
    /// Its priority.
    priority: i32,
    /// The rule's own version (its ETag).
    version: i64,
    /// `decided`, `lost`, `disabled`, `expired`, `other_action`, `other_tenant`, `other_user`,
    /// `no_matching_role` or `condition_failed`.
    standing: String,
    /// Why, in words.
    because: String,
}

/// The answer of `POST /entitlements/explain`.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub(super) struct Explanation {
    /// The decision, exactly as `/entitlements/check` and the gateway make it.
    allowed: bool,
    /// `allowed_by_rule`, `denied_by_rule` or `default_deny`.
    reason: String,
    /// The rules version the decision was made at.
    rules_version: i64,
    /// The rule that decided, if any.
    deciding_rule: Option<ExplainedRule>,
    /// Rules that applied and lost, in the order they would have decided.
    applied_and_lost: Vec<ExplainedRule>,
    /// Rules whose resource matches but that did not apply, each with why.
    not_applicable: Vec<ExplainedRule>,
}

fn because(c: &super::eval::Considered, outcome: &super::eval::Outcome) -> String {
    use super::eval::Standing;
    let r = &c.rule.input;
    match c.standing {
        Standing::Decided => format!(
            "the highest-priority applicable rule ({}, priority {})",
            if r.effect == super::rules::Effect::Deny { "deny" } else { "allow" },
            r.priority
        ),
        Standing::Lost => match outcome.rule_id {
            Some(_) => format!(
                "applied at priority {}, but lost to the deciding rule (higher priority first, then deny over allow, then the smaller id)",
                r.priority
            ),
            None => "applied but lost".into(),
        },
        Standing::Disabled => "the rule is disabled".into(),
        Standing::Expired => "the rule has expired".into(),
        Standing::OtherAction => format!("its actions ({}) do not include the action", r.actions.join(", ")),
        Standing::OtherTenant => "it is for another tenant".into(),
        Standing::OtherUser => "it is for another user".into(),
        Standing::NoMatchingRole => format!("the subject has none of its roles ({})", r.roles.join(", ")),
        Standing::ConditionFailed => {
            let i = c.condition.unwrap_or_default();
            match r.conditions.get(i) {
                Some(cond) => format!(
                    "condition {i} does not hold: {} {} {}",
                    cond.field,
                    serde_json::to_value(cond.operator)
                        .ok()
                        .and_then(|v| v.as_str().map(String::from))
                        .unwrap_or_default(),
                    cond.value
                ),
                None => "a condition does not hold".into(),
            }
        }
    }
}

#[utoipa::path(post, path = "/entitlements/explain", tag = "entitlements", summary = "Why a check is decided as it is: the deciding rule, the rules that applied and lost, the rules version (admin)", request_body = ExplainRequest, security(("bearer" = [])), responses((status = 200, description = "OK", body = Explanation), Errors))]
pub(super) async fn explain(
    AxumState(state): AxumState<State>,
    caller: Caller,
    Json(body): Json<ExplainRequest>,
) -> ApiResult<Response> {
    require_admin(&state, &caller)?;
    let req = CheckRequest {
        user_id: body.user_id,
        tenant_id: body.tenant_id,
        roles: body.roles,
        resource: body.resource,
        action: body.action,
        context: body.context,
    };
    let snap = state.engine.snapshot();
    let (outcome, considered) = snap.explain(&req, chrono::Utc::now());
    let describe = |c: &super::eval::Considered| {
        let r = &c.rule.input;
        ExplainedRule {
            id: c.rule.id.to_string(),
            name: r.name.clone(),
            effect: if r.effect == super::rules::Effect::Deny { "deny" } else { "allow" }.into(),
            resource: r.resource.clone(),
            actions: r.actions.clone(),
            priority: r.priority,
            version: c.rule.version,
            standing: serde_json::to_value(c.standing)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default(),
            because: because(c, &outcome),
        }
    };
    use super::eval::Standing;
    let explanation = Explanation {
        allowed: outcome.allowed,
        reason: serde_json::to_value(outcome.reason)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default(),
        rules_version: snap.version(),
        deciding_rule: considered.iter().find(|c| c.standing == Standing::Decided).map(describe),
        applied_and_lost: considered
            .iter()
            .filter(|c| c.standing == Standing::Lost)
            .map(describe)
            .collect(),
        not_applicable: considered
            .iter()
            .filter(|c| !matches!(c.standing, Standing::Decided | Standing::Lost))
            .map(describe)
            .collect(),
    };
    Ok(axum::Json(explanation).into_response())
}
