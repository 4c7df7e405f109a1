//! The metrics role (port 8012): ingests metrics pushed by the edge and by platform jobs and
//! exports them to Prometheus beside its own, under guards (names, label caps, series limits with
//! overflow folding, a total cap, type conflicts, a TTL).
//!
//! - [`registry`]: tracked points (counter / gauge / histogram), guards, exposition, trends.
//! - [`pushgateway`]: the Pushgateway-compatible path and its text-format parser.
//!
//! State is per replica: run one, or route each job to one replica (docs/roles.md, the metrics role).

pub mod pushgateway;
pub mod registry;

use crate::server::openapi::{self, Errors};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::role::Role;
use axum::body::Bytes;
use axum::extract::{Path, Query, State as AxumState};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::common::{Deps, RunError, Service};
use crate::auth::{AuthError, Reason, Verifier};
use crate::config::Problem;
use crate::error::{ApiError, ApiResult, ErrorCode, Json};
use crate::server::Context;
use registry::{Accepted, Limits, Point, Rejection, Tracked};

/// Metric names of the role itself.
pub mod names {
    /// Points and pushed samples accepted, by kind (`tracked`, `pushed`).
    pub const POINTS: &str = "access_metrics_points_total";
    /// Refusals by reason.
    pub const REJECTED: &str = "access_metrics_rejected_total";
    /// Points folded into a metric's overflow series.
    pub const OVERFLOWED: &str = "access_metrics_overflowed_total";
    /// Series dropped by the TTL.
    pub const EXPIRED: &str = "access_metrics_expired_series_total";
    /// Series held.
    pub const SERIES: &str = "access_metrics_series";
    /// The total series cap.
    pub const SERIES_LIMIT: &str = "access_metrics_series_limit";

    /// Registers the descriptions.
    pub fn describe() {
        metrics::describe_counter!(
            POINTS,
            "Pushed points and samples accepted, by kind (tracked, pushed)"
        );
        metrics::describe_counter!(REJECTED, "Pushed points refused, by reason");
        metrics::describe_counter!(OVERFLOWED, "Points folded into a metric's overflow series");
        metrics::describe_counter!(EXPIRED, "Series dropped after their TTL");
        metrics::describe_gauge!(SERIES, "Ingested series held (tracked and pushed)");
        metrics::describe_gauge!(SERIES_LIMIT, "The total cap on ingested series");
    }
}

/// The `metrics` config section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The role's port.
    pub port: u16,
    /// Accept pushes without a service token (in-cluster jobs fenced by the NetworkPolicy).
    pub open_ingest: bool,
    /// Labels per point, `service` and `tenant_id` included.
    pub max_labels: usize,
    /// Characters per label value.
    pub max_label_value_length: usize,
    /// Series per metric; beyond, points fold into one `overflow="true"` series.
    pub max_series_per_metric: usize,
    /// Series in all; beyond, new series are refused.
    pub max_series: usize,
    /// A series not pushed for this long is dropped.
    #[serde(with = "humantime_serde")]
    pub series_ttl: Duration,
    /// Histogram bucket upper bounds.
    pub buckets: Vec<f64>,
    /// Samples kept per series for `/metrics/trends`.
    pub history: usize,
    /// Points per batch.
    pub max_batch: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            port: crate::role::Role::Metrics.default_port(),
            open_ingest: false,
            max_labels: 16,
            max_label_value_length: 256,
            max_series_per_metric: 1000,
            max_series: 100_000,
            series_ttl: Duration::from_secs(3600),
            buckets: vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0],
            history: 120,
            max_batch: 10_000,
        }
    }
}

impl Config {
    /// Checks the section.
    pub fn validate(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        if self.buckets.is_empty()
            || self.buckets.windows(2).any(|w| w[0] >= w[1])
            || self.buckets.iter().any(|b| !b.is_finite())
        {
            problems.push(Problem::new(
                "metrics.buckets",
                "buckets must be finite and strictly increasing",
            ));
        }
        for (key, value) in [
            ("metrics.max_labels", self.max_labels),
            ("metrics.max_series_per_metric", self.max_series_per_metric),
            ("metrics.max_series", self.max_series),
            ("metrics.max_batch", self.max_batch),
        ] {
            if value == 0 {
                problems.push(Problem::new(key, "must be greater than 0"));
            }
        }
        if self.series_ttl.is_zero() {
            problems.push(Problem::new("metrics.series_ttl", "must be greater than 0"));
        }
        problems
    }

    fn limits(&self) -> Limits {
        Limits {
            max_labels: self.max_labels,
            max_label_value_length: self.max_label_value_length,
            max_series_per_metric: self.max_series_per_metric.max(2),
            max_series: self.max_series,
            buckets: self.buckets.clone(),
            history: self.history,
        }
    }
}

/// Tracked and pushed series. One std mutex: every operation is a short in-memory update, and a
/// push must see both kinds at once to enforce the shared cap and name separation.
#[derive(Default)]
struct Store {
    tracked: Tracked,
    groups: pushgateway::Groups,
}

/// The role's state.
#[derive(Clone)]
pub struct State {
    store: Arc<Mutex<Store>>,
    limits: Arc<Limits>,
    verifier: Arc<Verifier>,
    open_ingest: bool,
    service_role: Arc<str>,
    admin_role: Arc<str>,
    max_batch: usize,
    ttl: Duration,
}

impl State {
    fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A caller with the service role, unless ingest is open.
    async fn authorize_ingest(&self, headers: &HeaderMap) -> ApiResult<()> {
        if self.open_ingest {
            return Ok(());
        }
        let verified = self.caller(headers).await?;
        if verified.identity.has_role(&self.service_role) {
            Ok(())
        } else {
            Err(ApiError::new(ErrorCode::Forbidden, "pushing metrics needs a service token"))
        }
    }

    /// A caller with the admin or service role.
    async fn authorize_read(&self, headers: &HeaderMap) -> ApiResult<()> {
        let verified = self.caller(headers).await?;
        let id = &verified.identity;
        if id.has_role(&self.service_role) || id.has_role(&self.admin_role) {
            Ok(())
        } else {
            Err(ApiError::new(
                ErrorCode::Forbidden,
                "reading series needs the admin or service role",
            ))
        }
    }

    async fn caller(&self, headers: &HeaderMap) -> ApiResult<Arc<crate::auth::Verified>> {
        let header = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .filter(|h| h.get(..7).is_some_and(|p| p.eq_ignore_ascii_case("bearer ")))
            .ok_or(AuthError::Rejected(Reason::Malformed))?;
        Ok(self.verifier.verify(header).await?)
    }

    /// Applies one point, counting the outcome.
    fn track(&self, point: &mut Point) -> Result<Accepted, Rejection> {
        let mut outcome = None;
        self.track_all(std::iter::once(Ok::<_, String>(point)), |_, r| {
            outcome = Some(r.map_err(|(r, _)| r))
        });
        outcome.unwrap_or(Err(Rejection::InvalidValue))
    }

    /// Applies points in order under one lock of the store, handing each outcome to `each` (the
    /// point's index, and `Err((rejection, message))` for a refused or malformed one), and
    /// counts the outcomes once for them all.
    fn track_all<'p>(
        &self,
        points: impl Iterator<Item = Result<&'p mut Point, String>>,
        mut each: impl FnMut(usize, Result<Accepted, (Rejection, String)>),
    ) {
        let now = unix_now();
        let (mut stored, mut overflowed, mut malformed) = (0u64, 0u64, 0u64);
        let mut rejected: Vec<(Rejection, u64)> = Vec::new();
        let series = {
            let mut store = self.store();
            let Store { tracked, groups } = &mut *store;
            let other = groups.series_count();
            for (index, point) in points.enumerate() {
                let outcome = match point {
                    Ok(point) => tracked
                        .ingest(point, now, &self.limits, other, |name| groups.claims(name))
                        .map_err(|r| (r, format!("{}: {}", point.name, r.as_str()))),
                    Err(message) => {
                        malformed += 1;
                        each(index, Err((Rejection::InvalidPoint, message)));
                        continue;
                    }
                };
                match &outcome {
                    Ok(Accepted::Stored) => stored += 1,
                    Ok(Accepted::Overflowed) => overflowed += 1,
                    Err((r, _)) => match rejected.iter_mut().find(|(k, _)| k == r) {
                        Some((_, n)) => *n += 1,
                        None => rejected.push((*r, 1)),
                    },
                }
                each(index, outcome);
            }
            tracked.series_count() + other
        };
        metrics::gauge!(names::SERIES, "role" => "metrics").set(series as f64);
        if stored + overflowed > 0 {
            metrics::counter!(names::POINTS, "role" => "metrics", "kind" => "tracked")
                .increment(stored + overflowed);
        }
        if overflowed > 0 {
            metrics::counter!(names::OVERFLOWED, "role" => "metrics").increment(overflowed);
        }
        if malformed > 0 {
            rejected.push((Rejection::InvalidPoint, malformed));
        }
        for (reason, n) in rejected {
            metrics::counter!(names::REJECTED, "role" => "metrics", "reason" => reason.as_str())
                .increment(n);
        }
    }

    /// Drops series past their TTL.
    fn expire(&self) {
        let cutoff = unix_now() - self.ttl.as_secs_f64();
        let mut store = self.store();
        let dropped = store.tracked.expire(cutoff) + store.groups.expire(cutoff);
        if dropped > 0 {
            metrics::counter!(names::EXPIRED, "role" => "metrics").increment(dropped as u64);
        }
        metrics::gauge!(names::SERIES, "role" => "metrics")
            .set((store.tracked.series_count() + store.groups.series_count()) as f64);
    }
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn rejection_error(reason: Rejection, message: impl Into<String>) -> ApiError {
    let code = match reason {
        Rejection::TypeConflict => ErrorCode::Conflict,
        _ => ErrorCode::ValidationFailed,
    };
    ApiError::new(code, message).with_reason(reason.as_str())
}

/// Builds the state, registers the exposition of ingested series and starts the TTL sweeper.
pub async fn build(config: &Config, deps: &Deps) -> Result<State, RunError> {
    let ctx = &deps.ctx;
    let state = State {
        store: Arc::default(),
        limits: Arc::new(config.limits()),
        verifier: deps.auth.verifier.clone(),
        open_ingest: config.open_ingest,
        service_role: ctx.config.auth.service_role.as_str().into(),
        admin_role: ctx.config.auth.admin_role.as_str().into(),
        max_batch: config.max_batch,
        ttl: config.series_ttl,
    };
    metrics::gauge!(names::SERIES_LIMIT, "role" => "metrics").set(config.max_series as f64);
    metrics::gauge!(names::SERIES, "role" => "metrics").set(0.0);
    let render = state.clone();
    ctx.add_exposition(Arc::new(move |out: &mut String| {
        render.expire();
        let store = render.store();
        store.tracked.render(&render.limits.buckets, out);
        store.groups.render(out);
    }));
    let sweeper = state.clone();
    let shutdown = ctx.shutdown.clone();
    let every = (config.series_ttl / 10).clamp(Duration::from_millis(100), Duration::from_secs(60));
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => sweeper.expire(),
                _ = shutdown.stopping() => return,
            }
        }
    });
    Ok(state)
}

/// The role's routes (`GET /metrics` is the shared one, with the ingested series appended).
pub fn router(state: State) -> Router {
    openapi::finish(api().with_state(state))
}

/// The role's API document (`/openapi.json`), built without a state.
pub fn openapi() -> utoipa::openapi::OpenApi {
    api().into_openapi()
}

/// The role's documented routes.
fn api() -> OpenApiRouter<State> {
    OpenApiRouter::with_openapi(openapi::base(Role::Metrics))
        .routes(routes!(track))
        .routes(routes!(track_batch))
        // Pushgateway-compatible: Prometheus text, not JSON; described in docs/roles.md, not here.
        .route(
            "/metrics/job/{*group}",
            axum::routing::put(push_replace).post(push_merge).delete(push_delete),
        )
        .routes(routes!(series))
        .routes(routes!(stats))
        .routes(routes!(trends))
        .routes(routes!(usage))
}

/// What `common::run` serves.
pub fn service(state: State, _ctx: &Context) -> Service {
    Service::new(router(state))
}

/// The answer of `POST /metrics/track`.
#[derive(Serialize, ToSchema)]
struct TrackAnswer {
    /// Always `true` (a refused point is an error).
    #[schema(example = true)]
    accepted: bool,
    /// Whether the point went into its metric's `overflow="true"` series
    /// (`metrics.max_series_per_metric` reached).
    overflowed: bool,
}

#[utoipa::path(post, path = "/metrics/track", tag = "metrics", summary = "Ingest one point (service token, unless open ingest)",
    request_body(content = registry::Point, example = json!({"name": "jobs_processed", "value": 3, "type": "counter", "labels": {"queue": "pricing"}, "service": "pricing-batch", "tenant_id": "t1"})),
    security(("bearer" = [])), responses((status = 200, description = "Accepted", body = TrackAnswer), Errors))]
async fn track(
    AxumState(state): AxumState<State>,
    headers: HeaderMap,
    Json(mut point): Json<Point>,
) -> ApiResult<Response> {
    state.authorize_ingest(&headers).await?;
    match state.track(&mut point) {
        Ok(accepted) => Ok(axum::Json(TrackAnswer {
            accepted: true,
            overflowed: accepted == Accepted::Overflowed,
        })
        .into_response()),
        Err(reason) => {
            Err(rejection_error(reason, format!("{} refused: {}", point.name, reason.as_str())))
        }
    }
}

/// The answer of `POST /metrics/track/batch`.
#[derive(Serialize, ToSchema)]
struct BatchTracked {
    /// Points accepted.
    accepted: usize,
    /// Points refused.
    rejected: usize,
    /// One result per point, in order.
    results: Vec<PointResult>,
}

/// What became of one point of a batch.
#[derive(Serialize, ToSchema)]
struct PointResult {
    /// The point's position in the batch.
    index: usize,
    /// Whether it was accepted.
    ok: bool,
    /// Accepted: whether it went into the overflow series.
    #[serde(skip_serializing_if = "Option::is_none")]
    overflowed: Option<bool>,
    /// Refused: the guard that refused it (`invalid_point` for a malformed one).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(example = "invalid_name")]
    reason: Option<&'static str>,
    /// Refused: for a human.
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<String>,
}

#[utoipa::path(post, path = "/metrics/track/batch", tag = "metrics", summary = "Ingest points; each succeeds or fails alone",
    request_body(content = Vec<registry::Point>, example = json!([{"name": "jobs_processed", "value": 3, "type": "counter"}, {"name": "queue_depth", "value": 12, "type": "gauge", "labels": {"queue": "pricing"}}])),
    security(("bearer" = [])), responses((status = 200, description = "One result per point", body = BatchTracked), Errors))]
async fn track_batch(
    AxumState(state): AxumState<State>,
    headers: HeaderMap,
    Json(points): Json<Vec<Box<serde_json::value::RawValue>>>,
) -> ApiResult<Response> {
    state.authorize_ingest(&headers).await?;
    if points.len() > state.max_batch {
        return Err(ApiError::validation(
            "body",
            format!("at most {} points per batch", state.max_batch),
        ));
    }
    // Each point is parsed from its own text once, and fails alone.
    let mut parsed: Vec<Result<Point, String>> = points
        .iter()
        .map(|raw| serde_json::from_str::<Point>(raw.get()).map_err(|e| e.to_string()))
        .collect();
    let (mut accepted, mut rejected) = (0, 0);
    let mut results = Vec::with_capacity(parsed.len());
    state.track_all(
        parsed.iter_mut().map(|p| p.as_mut().map_err(|e| e.clone())),
        |index, outcome| {
            results.push(match outcome {
                Ok(a) => {
                    accepted += 1;
                    PointResult {
                        index,
                        ok: true,
                        overflowed: Some(a == Accepted::Overflowed),
                        reason: None,
                        message: None,
                    }
                }
                Err((reason, message)) => {
                    rejected += 1;
                    PointResult {
                        index,
                        ok: false,
                        overflowed: None,
                        reason: Some(reason.as_str()),
                        message: Some(message),
                    }
                }
            })
        },
    );
    Ok(axum::Json(BatchTracked { accepted, rejected, results }).into_response())
}

async fn push(
    state: State,
    headers: HeaderMap,
    group: String,
    body: Bytes,
    mode: pushgateway::Mode,
) -> ApiResult<Response> {
    state.authorize_ingest(&headers).await?;
    let key = pushgateway::grouping_key(&group).map_err(|m| ApiError::validation("path", m))?;
    let text = std::str::from_utf8(&body)
        .map_err(|_| ApiError::invalid_request("the body is not UTF-8 text"))?;
    let families = pushgateway::parse(text)
        .map_err(|e| ApiError::invalid_request(format!("text format: {e}")))?;
    let samples: usize = families.iter().map(|f| f.samples.len()).sum();
    let result = {
        let mut store = state.store();
        let Store { tracked, groups } = &mut *store;
        groups.push(
            key,
            families,
            mode,
            unix_now(),
            &state.limits,
            tracked.series_count(),
            |name| tracked.claims(name),
        )
    };
    match result {
        Ok(()) => {
            metrics::counter!(names::POINTS, "role" => "metrics", "kind" => "pushed")
                .increment(samples as u64);
            Ok(StatusCode::OK.into_response())
        }
        Err((reason, message)) => {
            metrics::counter!(names::REJECTED, "role" => "metrics", "reason" => reason.as_str())
                .increment(1);
            Err(rejection_error(reason, message))
        }
    }
}

async fn push_replace(
    AxumState(state): AxumState<State>,
    headers: HeaderMap,
    Path(group): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    push(state, headers, group, body, pushgateway::Mode::Replace).await
}

async fn push_merge(
    AxumState(state): AxumState<State>,
    headers: HeaderMap,
    Path(group): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    push(state, headers, group, body, pushgateway::Mode::Merge).await
}

async fn push_delete(
    AxumState(state): AxumState<State>,
    headers: HeaderMap,
    Path(group): Path<String>,
) -> ApiResult<Response> {
    state.authorize_ingest(&headers).await?;
    let key = pushgateway::grouping_key(&group).map_err(|m| ApiError::validation("path", m))?;
    state.store().groups.delete(&key);
    // As Pushgateway: deleting a group that is not there is not an error.
    Ok(StatusCode::ACCEPTED.into_response())
}

/// The query of `GET /metrics/series`.
#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct SeriesQuery {
    /// This metric only (a counter with or without `_total`).
    #[param(example = "jobs_processed")]
    name: Option<String>,
    /// Series of this `service` label only.
    service: Option<String>,
    /// Series of this `tenant_id` label only.
    tenant_id: Option<String>,
}

/// The body of `GET /metrics/series`.
#[derive(Serialize, ToSchema)]
struct SeriesList {
    /// The matching series.
    series: Vec<registry::SeriesInfo>,
    /// How many.
    count: usize,
}

#[utoipa::path(get, path = "/metrics/series", tag = "metrics", summary = "Every ingested series with its value and last push (admin or service)", params(SeriesQuery), security(("bearer" = [])), responses((status = 200, description = "The matching series", body = SeriesList), Errors))]
async fn series(
    AxumState(state): AxumState<State>,
    headers: HeaderMap,
    Query(q): Query<SeriesQuery>,
) -> ApiResult<Response> {
    state.authorize_read(&headers).await?;
    let store = state.store();
    let list: Vec<_> = store
        .tracked
        .list()
        .into_iter()
        .chain(store.groups.list())
        .filter(|s| q.name.as_ref().is_none_or(|n| &s.name == n || s.name == format!("{n}_total")))
        .filter(|s| q.service.as_ref().is_none_or(|v| s.labels.get("service") == Some(v)))
        .filter(|s| q.tenant_id.as_ref().is_none_or(|v| s.labels.get("tenant_id") == Some(v)))
        .collect();
    Ok(axum::Json(SeriesList { count: list.len(), series: list }).into_response())
}

/// The body of `GET /metrics/stats`.
#[derive(Serialize, ToSchema)]
struct Stats {
    /// Series held, tracked and pushed.
    series: usize,
    /// Series from `POST /metrics/track`.
    tracked_series: usize,
    /// Series from the Pushgateway endpoints.
    pushed_series: usize,
    /// `metrics.max_series`.
    max_series: usize,
    /// `metrics.max_series_per_metric`.
    max_series_per_metric: usize,
    /// `metrics.series_ttl`, seconds.
    series_ttl_seconds: u64,
}

#[utoipa::path(get, path = "/metrics/stats", tag = "metrics", summary = "Series counts and limits (admin or service)", security(("bearer" = [])), responses((status = 200, description = "Counts and limits", body = Stats), Errors))]
async fn stats(AxumState(state): AxumState<State>, headers: HeaderMap) -> ApiResult<Response> {
    state.authorize_read(&headers).await?;
    let store = state.store();
    let (tracked, pushed) = (store.tracked.series_count(), store.groups.series_count());
    Ok(axum::Json(Stats {
        series: tracked + pushed,
        tracked_series: tracked,
        pushed_series: pushed,
        max_series: state.limits.max_series,
        max_series_per_metric: state.limits.max_series_per_metric,
        series_ttl_seconds: state.ttl.as_secs(),
    })
    .into_response())
}

/// The query of `GET /metrics/trends/{name}`.
#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct TrendQuery {
    /// The window (default `5m`).
    #[param(example = "5m")]
    window: Option<String>,
}

/// The body of `GET /metrics/trends/{name}`.
#[derive(Serialize, ToSchema)]
struct TrendAnswer {
    /// The metric.
    name: String,
    /// The window, seconds.
    window_seconds: u64,
    /// Its trend over the window.
    trend: registry::Trend,
}

#[utoipa::path(get, path = "/metrics/trends/{name}", tag = "metrics", summary = "Min, max, average and direction of a metric over a window", params(("name" = String, Path, description = "A tracked metric's name", example = "jobs_processed"), TrendQuery), security(("bearer" = [])), responses((status = 200, description = "The metric's trend", body = TrendAnswer), Errors))]
async fn trends(
    AxumState(state): AxumState<State>,
    headers: HeaderMap,
    Path(name): Path<String>,
    Query(q): Query<TrendQuery>,
) -> ApiResult<Response> {
    state.authorize_read(&headers).await?;
    let window = match &q.window {
        Some(w) => humantime::parse_duration(w)
            .map_err(|e| ApiError::validation("window", format!("{w:?}: {e}")))?,
        None => Duration::from_secs(300),
    };
    let points = state
        .store()
        .tracked
        .history(&name, unix_now() - window.as_secs_f64())
        .ok_or_else(|| ApiError::not_found(format!("no tracked metric {name:?}")))?;
    let trend = registry::trend(&points);
    Ok(axum::Json(TrendAnswer { name, window_seconds: window.as_secs(), trend }).into_response())
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct UsageQuery {
    /// A counter of per-tenant usage; default `access_usage_requests_total`.
    name: Option<String>,
    /// How far back (`15m`); default 15 minutes.
    window: Option<String>,
    /// Bucket width (`10s`); default 10 seconds, at least 1 second, at most 1000 buckets.
    step: Option<String>,
}

/// One tenant's usage over time.
#[derive(Debug, Serialize, utoipa::ToSchema)]
struct TenantUsage {
    /// The tenant (empty for series without a `tenant_id` label).
    tenant_id: String,
    /// The total over the window.
    total: f64,
    /// `[bucket start (unix seconds), increase in the bucket]`, oldest first; empty buckets
    /// are omitted. (Documented as pairs of numbers: a tuple's schema is one that client
    /// generators refuse.)
    #[schema(value_type = Vec<Vec<f64>>)]
    points: Vec<(i64, f64)>,
}

/// The answer of `GET /metrics/usage`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
struct UsageReport {
    /// The counter.
    name: String,
    /// The window, in seconds.
    window_seconds: u64,
    /// The bucket width, in seconds.
    step_seconds: u64,
    /// Unix seconds: the window's start.
    since: f64,
    /// Per tenant, the largest total first.
    tenants: Vec<TenantUsage>,
}

fn duration_param(field: &str, value: Option<&String>, default: Duration) -> ApiResult<Duration> {
    match value {
        Some(text) => humantime::parse_duration(text)
            .map_err(|e| ApiError::validation(field, format!("{text:?}: {e}"))),
        None => Ok(default),
    }
}

#[utoipa::path(get, path = "/metrics/usage", tag = "metrics", summary = "Per-tenant usage over time from a pushed usage counter, in buckets (admin or service)", params(UsageQuery), security(("bearer" = [])), responses((status = 200, description = "OK", body = UsageReport), Errors))]
async fn usage(
    AxumState(state): AxumState<State>,
    headers: HeaderMap,
    Query(q): Query<UsageQuery>,
) -> ApiResult<Response> {
    state.authorize_read(&headers).await?;
    let window = duration_param("window", q.window.as_ref(), Duration::from_secs(900))?;
    let step = duration_param("step", q.step.as_ref(), Duration::from_secs(10))?;
    if step.as_secs() == 0 || window.as_secs() / step.as_secs().max(1) > 1000 {
        return Err(ApiError::validation(
            "step",
            "at least 1s, and at most 1000 buckets per window",
        ));
    }
    let name = q.name.unwrap_or_else(|| "access_usage_requests_total".into());
    let since = unix_now() - window.as_secs_f64();
    let by_tenant = state
        .store()
        .tracked
        .usage_by_tenant(&name, since, step.as_secs_f64(), state.limits.history)
        .unwrap_or_default();
    let mut tenants: Vec<TenantUsage> = by_tenant
        .into_iter()
        .map(|(tenant_id, buckets)| TenantUsage {
            tenant_id,
            total: buckets.values().sum(),
            points: buckets.into_iter().collect(),
        })
        .collect();
    tenants.sort_by(|a, b| b.total.total_cmp(&a.total).then_with(|| a.tenant_id.cmp(&b.tenant_id)));
    Ok(axum::Json(UsageReport {
        name,
        window_seconds: window.as_secs(),
        step_seconds: step.as_secs(),
        since,
        tenants,
    })
    .into_response())
}
