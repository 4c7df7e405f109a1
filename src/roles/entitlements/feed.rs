//! What other roles and platform services follow: the whole snapshot with its version
//! (`GET /entitlements/snapshot`, which the gateway's and the stream's rules mirrors load), where
//! this replica stands (`GET /entitlements/version`), and the change feed
//! (`GET /entitlements/watch`, SSE: every rule change with its version, `resync` when the client
//! fell too far behind).
//!
//! The feed is made from the snapshots themselves: every time this replica's snapshot moves to a
//! newer version (its own change, or a reload on another replica's announcement), the rules that
//! appeared, changed or disappeared become `change` events at that version. The last
//! [`RETAIN`] changes are kept so a client that reconnects with `Last-Event-ID` (or `?since=`)
//! gets what it missed; older than that, it gets `resync` and reloads.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use axum::extract::{Query, State as AxumState};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::broadcast;
use uuid::Uuid;

use super::engine::Engine;
use super::State;
use crate::auth::Caller;
use crate::error::ApiResult;
use crate::policy::eval::Snapshot;
use crate::policy::mirror::{WireRule, WireSnapshot};
use crate::server::openapi::Errors;
use crate::server::Shutdown;

/// Changes kept for clients that reconnect.
pub const RETAIN: usize = 10_000;

/// One rule change.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Change {
    /// The rules version it became visible at.
    pub rules_version: i64,
    /// `created`, `updated` or `deleted`.
    pub change: String,
    /// The rule.
    pub rule_id: Uuid,
    /// The rule as it is now (absent when deleted).
    pub rule: Option<WireRule>,
}

#[derive(Default)]
struct Retained {
    changes: VecDeque<Change>,
    /// A client at this version or later can be given every change since.
    floor: i64,
}

/// The change feed of one replica.
pub struct Feed {
    /// A std mutex held for one append or one copy, never across an await.
    retained: Mutex<Retained>,
    live: broadcast::Sender<Change>,
}

impl Feed {
    /// Starts following `engine`'s snapshots until shutdown.
    pub fn start(engine: Arc<Engine>, shutdown: Shutdown) -> Arc<Feed> {
        let first = engine.snapshot();
        let feed = Arc::new(Feed {
            retained: Mutex::new(Retained { changes: VecDeque::new(), floor: first.version() }),
            // A subscriber that falls this far behind is told to resync.
            live: broadcast::channel(1024).0,
        });
        let follower = feed.clone();
        let mut versions = engine.versions();
        tokio::spawn(async move {
            let mut previous = first;
            loop {
                tokio::select! {
                    changed = versions.changed() => if changed.is_err() { return },
                    _ = shutdown.stopping() => return,
                }
                let next = engine.snapshot();
                if next.version() <= previous.version() {
                    continue;
                }
                follower.push(diff(&previous, &next));
                previous = next;
            }
        });
        feed
    }

    /// Keeps and sends one version's changes. They are kept under one lock, so a client's replay
    /// holds all of a version's changes or none of them.
    fn push(&self, changes: Vec<Change>) {
        {
            let mut r = self.retained.lock().unwrap_or_else(|p| p.into_inner());
            for change in &changes {
                if r.changes.len() >= RETAIN {
                    if let Some(dropped) = r.changes.pop_front() {
                        r.floor = r.floor.max(dropped.rules_version);
                    }
                }
                r.changes.push_back(change.clone());
            }
        }
        for change in changes {
            let _ = self.live.send(change);
        }
    }

    /// The changes after `since`, or `None` when some of them are no longer kept.
    fn since(&self, since: i64) -> Option<Vec<Change>> {
        let r = self.retained.lock().unwrap_or_else(|p| p.into_inner());
        (since >= r.floor)
            .then(|| r.changes.iter().filter(|c| c.rules_version > since).cloned().collect())
    }
}

/// The rules that appeared, changed or disappeared from `old` to `new`, at `new`'s version.
pub fn diff(old: &Snapshot, new: &Snapshot) -> Vec<Change> {
    let before: HashMap<Uuid, i64> = old.rules().iter().map(|r| (r.id, r.version)).collect();
    let mut changes = Vec::new();
    for rule in new.rules() {
        let change = match before.get(&rule.id) {
            None => "created",
            Some(v) if *v != rule.version => "updated",
            Some(_) => continue,
        };
        changes.push(Change {
            rules_version: new.version(),
            change: change.into(),
            rule_id: rule.id,
            rule: Some(WireRule::from(rule.as_ref())),
        });
    }
    for rule in old.rules() {
        if new.get(rule.id).is_none() {
            changes.push(Change {
                rules_version: new.version(),
                change: "deleted".into(),
                rule_id: rule.id,
                rule: None,
            });
        }
    }
    changes
}

#[utoipa::path(get, path = "/entitlements/snapshot", tag = "entitlements", summary = "Every rule with the rules version, for the roles' rules mirrors (service or admin role)",
    params(("If-None-Match" = Option<String>, Header, description = "The ETag of the snapshot held (`\"<epoch>:<version>\"`): 304 when unchanged")),
    security(("bearer" = [])),
    responses((status = 200, description = "Every rule at one rules version; `ETag` names it", body = WireSnapshot, headers(("ETag" = String, description = "`\"<epoch>:<version>\"`"))),
        (status = 304, description = "The snapshot held is current (no body)"), Errors))]
pub(super) async fn snapshot(
    AxumState(state): AxumState<State>,
    caller: Caller,
    headers: HeaderMap,
) -> ApiResult<Response> {
    caller.require_any_role(&[&state.admin_role, &state.service_role])?;
    let snap = state.engine.snapshot();
    let etag = format!("\"{}:{}\"", state.engine.store().epoch(), snap.version());
    // A mirror already at this version gets no body (its periodic refresh costs nothing).
    if headers.get(http::header::IF_NONE_MATCH).is_some_and(|v| v.as_bytes() == etag.as_bytes()) {
        return Ok((http::StatusCode::NOT_MODIFIED, [(http::header::ETAG, etag)]).into_response());
    }
    let wire = WireSnapshot {
        epoch: state.engine.store().epoch(),
        rules_version: snap.version(),
        rules: snap.rules().iter().map(|r| WireRule::from(r.as_ref())).collect(),
    };
    Ok(([(http::header::ETAG, etag)], axum::Json(wire)).into_response())
}

#[utoipa::path(get, path = "/entitlements/version", tag = "entitlements", summary = "The rules version this replica decides at, and where every deciding replica stands", security(("bearer" = [])), responses((status = 200, description = "This replica's version and every replica's report", body = super::api::Version), Errors))]
pub(super) async fn version(
    AxumState(state): AxumState<State>,
    _caller: Caller,
) -> ApiResult<Response> {
    let snap = state.engine.snapshot();
    let body = super::api::Version {
        role: "entitlements",
        rules_version: snap.version(),
        applied_at: snap.loaded_at(),
        replicas: state.board.all().await,
    };
    Ok(axum::Json(body).into_response())
}

#[derive(Debug, Deserialize)]
pub(super) struct WatchQuery {
    /// Changes after this rules version (as `Last-Event-ID`).
    since: Option<i64>,
}

/// `GET /entitlements/watch`: an SSE stream, described in `docs/entitlements.md` (OpenAPI covers
/// the JSON endpoints).
pub(super) async fn watch(
    AxumState(state): AxumState<State>,
    caller: Caller,
    headers: HeaderMap,
    Query(q): Query<WatchQuery>,
) -> ApiResult<Response> {
    caller.require_any_role(&[&state.admin_role, &state.service_role])?;
    let since = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<i64>().ok())
        .or(q.since);
    let feed = state.feed.clone();
    // Subscribed before the replay is read, so nothing falls between the two.
    let mut live = feed.live.subscribe();
    let current = state.engine.snapshot().version();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Event, Infallible>>(64);
    let shutdown = state.shutdown.clone();
    tokio::spawn(async move {
        let send = |event: Event| {
            let tx = tx.clone();
            async move { tx.send(Ok(event)).await.is_ok() }
        };
        let hello = Event::default()
            .event("hello")
            .id(current.to_string())
            .data(json!({"rules_version": current}).to_string());
        if !send(hello).await {
            return;
        }
        let mut last = since.unwrap_or(current);
        if let Some(since) = since {
            match feed.since(since) {
                Some(missed) => {
                    for c in missed {
                        last = last.max(c.rules_version);
                        if !send(change_event(&c)).await {
                            return;
                        }
                    }
                }
                None => {
                    last = current;
                    if !send(resync_event(current)).await {
                        return;
                    }
                }
            }
        }
        loop {
            let change = tokio::select! {
                c = live.recv() => c,
                _ = shutdown.stopping() => return,
                _ = tx.closed() => return,
            };
            match change {
                // Already sent by the replay, or older than where the client starts.
                Ok(c) if c.rules_version <= last => {}
                Ok(c) => {
                    last = last.max(c.rules_version);
                    if !send(change_event(&c)).await {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    let now = feed
                        .retained
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .changes
                        .back()
                        .map_or(last, |c| c.rules_version);
                    last = now;
                    if !send(resync_event(now)).await {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    });
    let stream =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|e| (e, rx)) });
    Ok(([("x-accel-buffering", "no")], Sse::new(stream).keep_alive(KeepAlive::default()))
        .into_response())
}

fn change_event(c: &Change) -> Event {
    Event::default()
        .event("change")
        .id(c.rules_version.to_string())
        .data(serde_json::to_string(c).unwrap_or_default())
}

fn resync_event(version: i64) -> Event {
    Event::default().event("resync").id(version.to_string()).data(
        json!({"rules_version": version, "message": "changes were missed; reload the rules (GET /entitlements/rules or /entitlements/snapshot)"})
            .to_string(),
    )
}
