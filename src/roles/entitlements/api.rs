//! The entitlements HTTP API. Checks need a valid token; a caller without the service role may
//! only ask about itself (its own subject and tenant, with its own roles). Rule changes need the
//! admin role; reading rules needs admin or service.

use crate::server::openapi::Errors;
use axum::extract::{Path, Query, State as AxumState};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;
use uuid::Uuid;

use super::engine::Decision;
use super::store::AuditEntry;
use super::State;
use crate::auth::{Caller, IdentityKind};
use crate::error::{ApiError, ApiResult, ErrorCode, Json};
use crate::policy::board::ReplicaReport;
use crate::policy::eval::CheckRequest;
use crate::policy::rules::{glob_matches, Rule, RuleInput};

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

#[utoipa::path(post, path = "/entitlements/check", tag = "entitlements", summary = "Decide one check (service or admin role, or the caller for itself)",
    request_body(content = CheckRequest, example = json!({"user_id": "schemathesis", "tenant_id": "t1", "roles": ["trader"], "resource": "instrument:NG-H27", "action": "read", "context": {}})),
    security(("bearer" = [])), responses((status = 200, description = "The decision", body = Decision), Errors))]
pub(super) async fn check(
    AxumState(state): AxumState<State>,
    caller: Caller,
    Json(mut req): Json<CheckRequest>,
) -> ApiResult<Response> {
    authorize(&state, &caller, &mut req)?;
    Ok(axum::Json(state.engine.check(&req).await).into_response())
}

/// One check of a batch: a check request's fields with the caller's correlation id. Written
/// out rather than a flattened [`CheckRequest`]: serde buffers a flattened struct's fields
/// before reading them, which cost more than the decision.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct BatchItem {
    /// The caller's correlation id, echoed.
    id: Value,
    user_id: String,
    tenant_id: String,
    #[serde(default)]
    roles: Vec<String>,
    resource: String,
    action: String,
    #[serde(default)]
    context: Value,
}

impl BatchItem {
    fn split(self) -> (Value, CheckRequest) {
        let BatchItem { id, user_id, tenant_id, roles, resource, action, context } = self;
        (id, CheckRequest { user_id, tenant_id, roles, resource, action, context })
    }
}

/// The correlation id of a batch item (the schema of [`BatchItem`]'s own part).
#[derive(ToSchema)]
#[allow(dead_code)]
struct Correlation {
    /// The caller's correlation id, echoed in the item's result.
    #[schema(value_type = CorrelationId)]
    id: Value,
}

/// A batch item's correlation id: a string or a number (any JSON value is echoed as sent).
#[derive(ToSchema)]
#[serde(untagged)]
#[allow(dead_code)]
enum CorrelationId {
    /// A string.
    Text(String),
    /// A number.
    Number(f64),
}

impl utoipa::PartialSchema for BatchItem {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        crate::server::openapi::flattened(
            <CheckRequest as utoipa::PartialSchema>::schema(),
            <Correlation as utoipa::PartialSchema>::schema(),
        )
    }
}

impl ToSchema for BatchItem {}

/// The body of `POST /entitlements/check/batch`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct Batch {
    /// The checks; each is read, authorized and decided alone, so one malformed item fails by
    /// itself.
    #[schema(value_type = Vec<BatchItem>)]
    checks: Vec<Box<serde_json::value::RawValue>>,
}

/// The answer of `POST /entitlements/check/batch`.
#[derive(Serialize, ToSchema)]
pub(super) struct BatchResults {
    /// One result per check, in order.
    results: Vec<BatchResult>,
}

/// The result of one check of a batch: its decision, or why it was not decided.
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
pub(super) enum BatchResult {
    /// Decided.
    Decided(Decided),
    /// Malformed or not allowed.
    Failed(Failed),
}

/// A decided check of a batch.
#[derive(Serialize, ToSchema)]
pub(super) struct Decided {
    /// The decision.
    #[serde(flatten)]
    decision: Decision,
    /// The item's correlation id.
    #[schema(value_type = CorrelationId)]
    id: Value,
}

/// A check of a batch that was not decided.
#[derive(Serialize, ToSchema)]
pub(super) struct Failed {
    /// The item's correlation id (null when the item had none).
    #[schema(value_type = Option<CorrelationId>)]
    id: Value,
    /// Why.
    error: ItemError,
}

/// Why one check of a batch was not decided.
#[derive(Serialize, ToSchema)]
pub(super) struct ItemError {
    /// `validation_failed` (a malformed item) or the code of the refusal (`forbidden`).
    code: ErrorCode,
    /// The item at fault (`checks[3]`), for a malformed one.
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<String>,
    /// For a human.
    message: String,
}

#[utoipa::path(post, path = "/entitlements/check/batch", tag = "entitlements", summary = "Decide many checks at once",
    request_body(content = Batch, example = json!({"checks": [{"id": 1, "user_id": "schemathesis", "tenant_id": "t1", "roles": ["trader"], "resource": "instrument:NG-H27", "action": "read"}]})),
    security(("bearer" = [])), responses((status = 200, description = "One result per check", body = BatchResults), Errors))]
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
    // One rules version for the whole batch, and the counters moved once.
    let snapshot = state.engine.snapshot();
    let mut tally = super::engine::Tally::default();
    for (i, raw) in batch.checks.into_iter().enumerate() {
        // Each item stands alone: a malformed or forbidden one fails by itself. Kept as raw text
        // until then, so a well-formed item is parsed once, into its own type.
        let item: BatchItem = match serde_json::from_str(raw.get()) {
            Ok(item) => item,
            Err(e) => {
                let id = serde_json::from_str::<Value>(raw.get())
                    .ok()
                    .and_then(|v| v.get("id").cloned())
                    .unwrap_or(Value::Null);
                results.push(BatchResult::Failed(Failed {
                    id,
                    error: ItemError {
                        code: ErrorCode::ValidationFailed,
                        field: Some(format!("checks[{i}]")),
                        message: e.to_string(),
                    },
                }));
                continue;
            }
        };
        let (id, mut req) = item.split();
        match authorize(&state, &caller, &mut req) {
            Ok(()) => {
                let decision = state.engine.check_in(&snapshot, &req, &mut tally).await;
                results.push(BatchResult::Decided(Decided { decision, id }));
            }
            Err(e) => results.push(BatchResult::Failed(Failed {
                id,
                error: ItemError {
                    code: e.code(),
                    field: None,
                    message: e.public_message().to_string(),
                },
            })),
        }
    }
    state.engine.record(&tally);
    Ok(axum::Json(BatchResults { results }).into_response())
}

/// The body of `POST /entitlements/resources`: one subject, one action, many resources.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct ResourcesRequest {
    /// The subject.
    user_id: String,
    /// The subject's tenant.
    tenant_id: String,
    /// The subject's roles.
    #[serde(default)]
    roles: Vec<String>,
    /// The action (`read`).
    action: String,
    /// The resources to decide.
    resources: Vec<String>,
    /// Anything else conditions may test (`context.<path>`): a free-form JSON object.
    #[serde(default)]
    #[schema(value_type = Object)]
    context: Value,
}

/// The answer of `POST /entitlements/resources`.
#[derive(Serialize, ToSchema)]
pub(super) struct ResourcesAnswer {
    /// The resources the subject may act on.
    allowed: Vec<String>,
    /// The others.
    denied: Vec<String>,
    /// The rules version of the decisions (0 when no resource was asked about).
    rules_version: i64,
}

#[utoipa::path(post, path = "/entitlements/resources", tag = "entitlements", summary = "Which of these resources the subject may act on",
    request_body(content = ResourcesRequest, example = json!({"user_id": "schemathesis", "tenant_id": "t1", "roles": ["trader"], "action": "read", "resources": ["instrument:NG-H27", "instrument:BRN-F27"]})),
    security(("bearer" = [])), responses((status = 200, description = "The resources split into allowed and denied", body = ResourcesAnswer), Errors))]
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
    Ok(axum::Json(ResourcesAnswer { allowed, denied, rules_version: version }).into_response())
}

/// The query of `GET /entitlements/rules`.
#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct ListQuery {
    /// Rules of this tenant only.
    tenant_id: Option<String>,
    /// Rules of this user only.
    user_id: Option<String>,
    /// Rules whose resource glob matches this resource.
    #[param(example = "instrument:NG-H27")]
    resource: Option<String>,
    /// Rules to skip (default 0).
    #[serde(default)]
    offset: usize,
    /// The page size, 1 to 1000 (default 100).
    #[param(example = 100)]
    limit: Option<usize>,
}

/// The body of `GET /entitlements/rules`: one page of the matching rules.
#[derive(Serialize, ToSchema)]
pub(super) struct RulePage<'a> {
    /// The page.
    #[schema(value_type = Vec<Rule>)]
    rules: Vec<&'a Rule>,
    /// Every matching rule.
    total: usize,
    /// As asked.
    offset: usize,
    /// As asked (default 100).
    limit: usize,
    /// The rules version of the snapshot listed.
    rules_version: i64,
}

#[utoipa::path(get, path = "/entitlements/rules", tag = "entitlements", summary = "List rules (admin)", params(ListQuery), security(("bearer" = [])), responses((status = 200, description = "One page of the matching rules", body = RulePage), Errors))]
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
    let body = RulePage {
        rules: page,
        total: matching.len(),
        offset: q.offset,
        limit,
        rules_version: snap.version(),
    };
    Ok(axum::Json(body).into_response())
}

#[utoipa::path(get, path = "/entitlements/rules/{id}", tag = "entitlements", summary = "One rule (admin)", params(("id" = Uuid, Path, description = "The rule's id", example = "0b5a3a32-6a1e-4a59-9a4c-1f0f6a6f2c11")), security(("bearer" = [])),
    responses((status = 200, description = "The rule; `ETag` is its version", body = Rule, headers(("ETag" = String, description = "The rule's version, quoted"))), Errors))]
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

/// The body of `GET /entitlements/rules/{id}/history`.
#[derive(Serialize, ToSchema)]
pub(super) struct History {
    /// The rule.
    rule_id: Uuid,
    /// Every change, oldest first.
    history: Vec<AuditEntry>,
}

#[utoipa::path(get, path = "/entitlements/rules/{id}/history", tag = "entitlements", summary = "A rule's audit trail (admin)", params(("id" = Uuid, Path, description = "The rule's id", example = "0b5a3a32-6a1e-4a59-9a4c-1f0f6a6f2c11")), security(("bearer" = [])), responses((status = 200, description = "The rule's changes", body = History), Errors))]
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
    Ok(axum::Json(History { rule_id: id, history: entries }).into_response())
}

#[utoipa::path(post, path = "/entitlements/rules", tag = "entitlements", summary = "Create a rule (admin)",
    request_body(content = RuleInput, example = json!({"name": "traders read NG", "effect": "allow", "resource": "instrument:NG-*", "actions": ["read"], "tenant_id": "t1", "roles": ["trader"], "priority": 10})),
    security(("bearer" = [])), responses((status = 201, description = "Created; `ETag` is its version", body = Rule, headers(("ETag" = String, description = "The rule's version, quoted"))), Errors))]
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

#[utoipa::path(put, path = "/entitlements/rules/{id}", tag = "entitlements", summary = "Replace a rule (admin), naming the version replaced (body `version` or `If-Match`)",
    request_body(content = RuleInput, example = json!({"name": "traders read NG", "effect": "allow", "resource": "instrument:NG-*", "actions": ["read"], "tenant_id": "t1", "roles": ["trader"], "priority": 10, "version": 1})),
    params(("id" = Uuid, Path, description = "The rule's id", example = "0b5a3a32-6a1e-4a59-9a4c-1f0f6a6f2c11"), ("If-Match" = Option<String>, Header, description = "The version replaced (the rule's ETag)")), security(("bearer" = [])),
    responses((status = 200, description = "Replaced; `ETag` is its new version", body = Rule, headers(("ETag" = String, description = "The rule's version, quoted"))), Errors))]
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

#[utoipa::path(delete, path = "/entitlements/rules/{id}", tag = "entitlements", summary = "Delete a rule (admin)", params(("id" = Uuid, Path, description = "The rule's id", example = "0b5a3a32-6a1e-4a59-9a4c-1f0f6a6f2c11"), ("If-Match" = Option<String>, Header, description = "The version deleted (the rule's ETag); without it, whatever the version")), security(("bearer" = [])), responses((status = 204, description = "Deleted"), Errors))]
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

/// The body of `GET /entitlements/stats`.
#[derive(Serialize, ToSchema)]
pub(super) struct Stats {
    /// Rules in the snapshot (disabled ones too).
    rules: usize,
    /// The snapshot's rules version.
    rules_version: i64,
    /// When the snapshot was loaded.
    snapshot_loaded_at: chrono::DateTime<chrono::Utc>,
    /// Its age, seconds.
    snapshot_age_seconds: i64,
    /// Checks decided since start.
    checks: u64,
    /// Of which allowed.
    allowed: u64,
    /// Of which denied.
    denied: u64,
    /// Answered from the decision cache.
    cache_hits: u64,
    /// Decision-cache failures.
    cache_errors: u64,
    /// Snapshot reloads that failed.
    reload_errors: u64,
    /// Where rules live: `postgres` or `memory`.
    #[schema(example = "memory")]
    store: &'static str,
}

#[utoipa::path(get, path = "/entitlements/stats", tag = "entitlements", summary = "Rules version, snapshot age, cache statistics (admin or service role)", security(("bearer" = [])), responses((status = 200, description = "The statistics", body = Stats), Errors))]
pub(super) async fn stats(
    AxumState(state): AxumState<State>,
    caller: Caller,
) -> ApiResult<Response> {
    caller.require_any_role(&[&state.admin_role, &state.service_role])?;
    use std::sync::atomic::Ordering::Relaxed;
    let snap = state.engine.snapshot();
    let s = &state.engine.stats;
    let checks = s.checks.load(Relaxed);
    Ok(axum::Json(Stats {
        rules: snap.rules().len(),
        rules_version: snap.version(),
        snapshot_loaded_at: snap.loaded_at(),
        snapshot_age_seconds: (chrono::Utc::now() - snap.loaded_at()).num_seconds(),
        checks,
        allowed: s.allowed.load(Relaxed),
        denied: checks - s.allowed.load(Relaxed).min(checks),
        cache_hits: s.cache_hits.load(Relaxed),
        cache_errors: s.cache_errors.load(Relaxed),
        reload_errors: s.reload_errors.load(Relaxed),
        store: state.store_kind,
    })
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

fn because(c: &crate::policy::eval::Considered, outcome: &crate::policy::eval::Outcome) -> String {
    use crate::policy::eval::Standing;
    let r = &c.rule.input;
    match c.standing {
        Standing::Decided => format!(
            "the highest-priority applicable rule ({}, priority {})",
            if r.effect == crate::policy::rules::Effect::Deny { "deny" } else { "allow" },
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

#[utoipa::path(post, path = "/entitlements/explain", tag = "entitlements", summary = "Why a check is decided as it is: the deciding rule, the rules that applied and lost, the rules version (admin)", request_body(content = ExplainRequest, example = json!({"user_id": "alice", "tenant_id": "t1", "roles": ["trader"], "resource": "instrument:BRN-F27", "action": "read"})), security(("bearer" = [])), responses((status = 200, description = "The decision, the deciding rule, the rules that applied and lost, and the rules version", body = Explanation), Errors))]
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
    let describe = |c: &crate::policy::eval::Considered| {
        let r = &c.rule.input;
        ExplainedRule {
            id: c.rule.id.to_string(),
            name: r.name.clone(),
            effect: if r.effect == crate::policy::rules::Effect::Deny { "deny" } else { "allow" }
                .into(),
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
    use crate::policy::eval::Standing;
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

/// The body of `GET /entitlements/version` on the entitlements role.
#[derive(Serialize, ToSchema)]
pub(super) struct Version {
    /// Always `entitlements`.
    #[schema(example = "entitlements")]
    pub(super) role: &'static str,
    /// The version this replica decides at.
    pub(super) rules_version: i64,
    /// When its snapshot was loaded.
    pub(super) applied_at: chrono::DateTime<chrono::Utc>,
    /// Where every replica of every deciding role stands.
    pub(super) replicas: Vec<ReplicaReport>,
}
