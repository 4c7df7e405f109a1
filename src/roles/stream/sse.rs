//! Server-sent events (`/sse/stream`, `/sse/`) for clients behind proxies that break WebSockets,
//! and `POST`/`DELETE /sse/subscribe` to change an open stream's topics.
//!
//! `GET /sse/stream?topics=a,b&filters=<JSON>&token=...` (or `Authorization`). Every event's `id:`
//! is the connection's position vector, so a browser's automatic reconnect (`Last-Event-ID`)
//! resumes without gaps. Events: `connection_established` first, then unnamed data events (the
//! WebSocket data frame), `close` before the server ends the stream; comment heartbeats keep
//! proxies from closing an idle stream.

use crate::server::openapi::Errors;
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Request, State as AxumState};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::control::{self, Op};
use super::hub::{Delivery, Registration};
use super::protocol::Close;
use super::resume::{self, Bound};
use super::{names, State};
use crate::auth::{unix_now, Caller};
use crate::error::{ApiError, ApiResult, ErrorCode};

/// `GET /sse/stream`.
pub async fn connect(AxumState(state): AxumState<State>, req: Request) -> ApiResult<Response> {
    super::check_origin(&state, req.headers())?;
    let query: BTreeMap<String, String> = req
        .uri()
        .query()
        .map(|q| url::form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    let topics: Vec<String> = query
        .get("topics")
        .map(|t| t.split(',').map(str::trim).filter(|t| !t.is_empty()).map(String::from).collect())
        .unwrap_or_default();
    let filters: BTreeMap<String, Value> = match query.get("filters") {
        Some(text) => serde_json::from_str(text).map_err(|e| {
            ApiError::validation(
                "filters",
                format!("filters must be a JSON object of topic -> filter: {e}"),
            )
        })?,
        None => BTreeMap::new(),
    };
    let resume_from = req
        .headers()
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(String::from)
        .or_else(|| query.get("last_event_id").cloned())
        .filter(|p| !p.is_empty());
    super::check_admission(&state)?;
    let Some(token) = super::token_from(&req) else {
        return Err(crate::auth::AuthError::Rejected(crate::auth::Reason::Malformed).into());
    };
    let credential = super::verify(&state, &token).await?;
    let registration = super::admit(&state, "sse", credential)?;
    let conn = registration.conn.clone();
    let (ok, failed, live) = control::subscribe(&state, &conn, &topics, &filters).await;
    let identity = conn.credential().verified.identity.clone();
    let mut hello = json!({
        "connection_id": conn.public_id,
        "user_id": identity.subject,
        "tenant_id": identity.tenant,
        "expires_at": identity.expires_at,
        "topics": ok,
        "failed": failed,
    });
    let mut catch_up = Vec::new();
    if let Some(position) = resume_from {
        match super::position::decode(&position, &state.config.topics) {
            Ok(wanted) => {
                let r = resume::recover(
                    &*state.history,
                    &state.hub,
                    &conn,
                    &wanted,
                    &live,
                    bound(&state),
                )
                .await;
                hello["recovered"] = json!(r.recovered);
                catch_up = r.records;
            }
            Err(e) => {
                hello["recovered"] = json!(false);
                hello["position_error"] = json!(e);
            }
        }
    }
    let (tx, rx) = mpsc::channel::<Result<Event, Infallible>>(16);
    let first = Event::default()
        .event("connection_established")
        .id(conn.position())
        .data(hello.to_string());
    let _ = tx.try_send(Ok(first));
    tokio::spawn(run(state.clone(), registration, tx, catch_up, live));
    let stream =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|e| (e, rx)) });
    let keep_alive = KeepAlive::new().interval(state.config.sse_heartbeat).text("heartbeat");
    Ok(([("x-accel-buffering", "no")], Sse::new(stream).keep_alive(keep_alive)).into_response())
}

/// The resume bound from the configuration.
pub fn bound(state: &State) -> Bound {
    Bound {
        max_records: state.config.resume_max_records,
        max_age: state.config.resume_max_age,
        deadline: state.config.relay_timeout,
    }
}

/// Feeds one SSE connection until it ends.
async fn run(
    state: State,
    mut registration: Registration,
    tx: mpsc::Sender<Result<Event, Infallible>>,
    catch_up: Vec<super::hub::Record>,
    live: Vec<(String, i32, i64)>,
) {
    let conn = registration.conn.clone();
    // Admitted as `sse`, so it has a queue.
    let Some(mut queue) = registration.queue.take() else { return };
    let latency =
        metrics::histogram!(names::DELIVERY_LATENCY, "role" => "stream", "transport" => "sse");
    let send = |event: Event| {
        let tx = tx.clone();
        let conn = conn.clone();
        async move {
            tokio::select! {
                r = tx.send(Ok(event)) => r.is_ok(),
                _ = conn.closer.closed() => false,
            }
        }
    };
    for record in &catch_up {
        conn.sent(&record.topic, record.partition, record.offset);
        if !send(Event::default().id(conn.position()).data(record.frame())).await {
            break;
        }
    }
    for (topic, partition, head) in &live {
        conn.advance(topic, *partition, *head);
    }
    let leeway = state.verifier.rules().leeway;
    let expires_at = conn.credential().verified.identity.expires_at + leeway;
    let expiry = tokio::time::Instant::now()
        + Duration::from_secs(expires_at.saturating_sub(unix_now()).min(365 * 24 * 3600));
    let why = loop {
        tokio::select! {
            biased;
            why = conn.closer.closed() => break why,
            _ = state.shutdown.stopping() => break Close::GoingAway,
            _ = tokio::time::sleep_until(expiry) => break Close::TokenExpired,
            _ = tx.closed() => break Close::GoingAway,
            Some(d) = queue.recv() => {
                let Delivery { frame, topic, partition, offset, timestamp_ms, notice } = d;
                if let Some(event) = notice {
                    let _ = send(Event::default().event(event).data(frame.as_str())).await;
                    continue;
                }
                conn.sent(&topic, partition, offset);
                if !send(Event::default().id(conn.position()).data(frame.as_str())).await {
                    continue;
                }
                latency.record((chrono::Utc::now().timestamp_millis() - timestamp_ms).max(0) as f64 / 1000.0);
                metrics::counter!(names::MESSAGES_DELIVERED, "role" => "stream", "transport" => "sse", "topic" => topic.to_string()).increment(1);
            }
        }
    };
    let reason = if tx.is_closed() { "client" } else { why.as_str() };
    // The last word, if the client still reads: which close, so it knows whether to reconnect.
    let _ = tx.try_send(Ok(Event::default()
        .event("close")
        .data(json!({"code": why.as_str(), "close_code": why.code()}).to_string())));
    metrics::counter!(names::CLOSES, "role" => "stream", "transport" => "sse", "reason" => reason)
        .increment(1);
}

/// The body of `POST`/`DELETE /sse/subscribe`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ControlBody {
    /// The stream's `connection_id` (its `connection_established` event).
    connection_id: String,
    /// Topics to add or remove.
    topics: Vec<String>,
    /// Filters by topic (subscribe), as `docs/stream-protocol.md` describes them: per field, a
    /// value, a list of values, or a range `{"gte", "lte", ...}`.
    #[serde(default)]
    #[schema(value_type = BTreeMap<String, Object>)]
    filters: BTreeMap<String, Value>,
}

/// The answer of `POST`/`DELETE /sse/subscribe`. The replica holding the stream builds it
/// (`control::apply`, possibly relayed over Redis); this type is its description.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct ControlAnswer {
    /// The stream.
    connection_id: String,
    /// The topics subscribed (`POST`) or removed (`DELETE`).
    topics: Vec<String>,
    /// `POST` only: the topics that could not be subscribed, and why.
    failed: Option<Vec<TopicFailure>>,
}

/// A topic that could not be subscribed.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct TopicFailure {
    /// The topic.
    topic: String,
    /// `unknown_topic`, `invalid_filter`, `forbidden` or `dependency_unavailable`.
    #[schema(example = "unknown_topic")]
    code: String,
    /// For a human.
    message: String,
}

/// `POST /sse/subscribe`: add topics to an open stream (the caller's own).
#[utoipa::path(post, path = "/sse/subscribe", tag = "stream", summary = "Add topics to an open SSE stream of the caller's (any replica)",
    request_body(content = ControlBody, example = json!({"connection_id": "a1b2c3d4-1-0123456789abcdef0123456789abcdef", "topics": ["served.market.latest_prices.v1"], "filters": {"served.market.latest_prices.v1": {"instrument_id": ["NG-H27"]}}})),
    security(("bearer" = [])), responses((status = 200, description = "The topics subscribed and those that failed", body = ControlAnswer), Errors))]
pub async fn add(
    state: AxumState<State>,
    caller: Caller,
    body: crate::error::Json<ControlBody>,
) -> ApiResult<Response> {
    change(state, caller, body, Op::Subscribe).await
}

/// `DELETE /sse/subscribe`: remove topics from an open stream.
#[utoipa::path(delete, path = "/sse/subscribe", tag = "stream", summary = "Remove topics from an open SSE stream of the caller's (any replica)",
    request_body(content = ControlBody, example = json!({"connection_id": "a1b2c3d4-1-0123456789abcdef0123456789abcdef", "topics": ["served.market.latest_prices.v1"]})),
    security(("bearer" = [])), responses((status = 200, description = "The topics removed", body = ControlAnswer), Errors))]
pub async fn remove(
    state: AxumState<State>,
    caller: Caller,
    body: crate::error::Json<ControlBody>,
) -> ApiResult<Response> {
    change(state, caller, body, Op::Unsubscribe).await
}

async fn change(
    AxumState(state): AxumState<State>,
    caller: Caller,
    crate::error::Json(body): crate::error::Json<ControlBody>,
    op: Op,
) -> ApiResult<Response> {
    let identity = &caller.0.identity;
    let (status, body) = match state.hub.find(&body.connection_id) {
        Some(conn) if conn.transport == "sse" => {
            control::apply(
                &state,
                &conn,
                &identity.subject,
                &identity.tenant,
                op,
                &body.topics,
                &body.filters,
            )
            .await
        }
        Some(_) => return Err(ApiError::not_found("no open SSE stream with this connection id")),
        None => {
            let Some(relay) = &state.relay else {
                return Err(ApiError::not_found("no open SSE stream with this connection id"));
            };
            let request = control::Request {
                request_id: String::new(),
                reply_to: String::new(),
                connection_id: body.connection_id,
                subject: identity.subject.clone(),
                tenant: identity.tenant.clone(),
                op,
                topics: body.topics,
                filters: body.filters,
            };
            match relay.forward(request).await {
                Ok(Some(reply)) => (reply.status, reply.body),
                Ok(None) => {
                    return Err(ApiError::not_found("no open SSE stream with this connection id"))
                }
                Err(e) => return Err(e.into()),
            }
        }
    };
    if status == 403 {
        return Err(ApiError::new(ErrorCode::Forbidden, "this connection belongs to another user"));
    }
    let status = http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::OK);
    Ok((status, axum::Json(body)).into_response())
}
