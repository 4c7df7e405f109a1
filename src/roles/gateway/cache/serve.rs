//! Serving from the cache, in two steps of the gateway's pipeline with the upstream between them.
//!
//! [`lookup`], before the upstream: a fresh entry is a `HIT`; a stale one within
//! `stale-while-revalidate` is served (`STALE`) while one revalidation goes upstream in the
//! background; otherwise one request per key per replica fetches (`MISS`) and the others wait
//! for it, then look again. [`fill`], after the upstream: the fetching request's answer is stored
//! (buffered, within the route's size cap) and those waiting are woken; a client's
//! `If-None-Match` that matches gets 304. Neither calls back into the pipeline: a revalidation
//! calls the upstream through [`upstream::Call`], like the pipeline's upstream step.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, StatusCode};
use http_body_util::BodyExt;
use tokio::sync::watch;

use super::super::routes::Route;
use super::super::upstream;
use super::super::State;
use super::policy::{self, CachePolicy};
use super::store::{now_ms, Entry};
use super::{Cache, Outcome, X_CACHE};
use crate::auth::Identity;
use crate::error::{ApiError, ErrorCode};
use crate::ratelimit::CacheRead;

/// Where a request stands with the response cache, from the rate limit to the cache store.
#[derive(Default)]
pub enum Lookup {
    /// Not cacheable (the route, the method or the client's `Cache-Control`): `BYPASS`.
    #[default]
    Bypass,
    /// Cacheable and not looked up yet: the key, and what the rate-limit round trip read for it.
    Wanted {
        /// From [`policy::cache_key`].
        key: String,
        /// The entry as the limiter's script read it, if it did.
        read: CacheRead,
    },
    /// Answered from the cache (`HIT` or `STALE`): nothing goes upstream or is stored.
    Served,
    /// This request fetches the key for every request waiting on it: its answer is stored.
    Fill(Fill),
    /// Waited for another request's fetch, whose answer was not stored: fetches alone and
    /// stores nothing.
    Unfilled,
}

/// The fetching request's hold on its key, until [`fill`] has stored the answer.
pub struct Fill {
    key: String,
    /// Wakes the requests waiting on the key when dropped (stored, or the fetch failed).
    guard: FlightGuard,
    /// The client's `If-None-Match`, applied to the answer once stored (the request that goes
    /// upstream asks for the full body).
    if_none_match: Option<String>,
}

/// Looks a [`Lookup::Wanted`] request up; answers it when the cache can, else says how the
/// answer fetched upstream is to be treated. Counts every result, `BYPASS` included.
pub async fn lookup(
    state: &State,
    route: &Route,
    wanted: Lookup,
    req: &mut Request,
    identity: Option<&Identity>,
) -> (Lookup, Option<Response>) {
    let (key, read) = match wanted {
        Lookup::Wanted { key, read } => (key, read),
        Lookup::Bypass => {
            state.cache.count(route, Outcome::Bypass);
            return (Lookup::Bypass, None);
        }
        other => return (other, None),
    };
    let if_none_match =
        req.headers().get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()).map(String::from);
    let head = req.method() == Method::HEAD;

    let first = match read {
        CacheRead::Hit(raw) => Entry::decode(&raw),
        CacheRead::Miss => None,
        CacheRead::NotAsked => get(state, &key).await,
    };
    if let Some(entry) = first {
        let now = now_ms();
        let age = entry.age(now);
        if age < entry.max_age {
            state.cache.count(route, Outcome::Hit);
            let answer = from_entry(&entry, Outcome::Hit, now, if_none_match.as_deref(), head);
            return (Lookup::Served, Some(answer));
        }
        if age < entry.max_age + entry.swr {
            state.cache.count(route, Outcome::Stale);
            if let Flight::Leader(guard) = flight(&state.cache, &key) {
                let identity = identity.cloned();
                revalidate(state.clone(), route, req, identity, key, entry.clone(), guard);
            }
            let answer = from_entry(&entry, Outcome::Stale, now, if_none_match.as_deref(), head);
            return (Lookup::Served, Some(answer));
        }
    }
    match flight(&state.cache, &key) {
        Flight::Leader(guard) => {
            state.cache.count(route, Outcome::Miss);
            // The cache needs the full response: the client's own validators are applied
            // afterwards.
            req.headers_mut().remove(header::IF_NONE_MATCH);
            req.headers_mut().remove(header::IF_MODIFIED_SINCE);
            (Lookup::Fill(Fill { key, guard, if_none_match }), None)
        }
        Flight::Follower(mut done) => {
            state.cache.stats.coalesced.fetch_add(1, Ordering::Relaxed);
            let _ = tokio::time::timeout(route.timeout, done.wait_for(|d| *d)).await;
            if let Some(entry) = get(state, &key).await.filter(|e| e.age(now_ms()) < e.max_age) {
                state.cache.count(route, Outcome::Hit);
                let answer =
                    from_entry(&entry, Outcome::Hit, now_ms(), if_none_match.as_deref(), head);
                return (Lookup::Served, Some(answer));
            }
            // The leader's answer was not cacheable: go upstream like it did.
            state.cache.count(route, Outcome::Miss);
            (Lookup::Unfilled, None)
        }
    }
}

/// Finishes an answer fetched upstream as its [`Lookup`] says: stored when this request fetched
/// for the key (then the client's validator applied), and marked with `X-Cache`.
pub async fn fill(state: &State, route: &Route, lookup: Lookup, response: Response) -> Response {
    let (result, response) = match lookup {
        Lookup::Served => return response,
        Lookup::Bypass => (Outcome::Bypass, response),
        Lookup::Wanted { .. } | Lookup::Unfilled => (Outcome::Miss, response),
        Lookup::Fill(Fill { key, guard, if_none_match }) => {
            let response = match &route.cache {
                Some(policy) => store(state, route, policy, &key, response).await,
                None => response,
            };
            drop(guard);
            return with_client_validator(response, if_none_match.as_deref(), Outcome::Miss);
        }
    };
    let mut response = response;
    response.headers_mut().insert(X_CACHE.clone(), result.header());
    response
}

async fn get(state: &State, key: &str) -> Option<Entry> {
    match state.cache.store.get(key).await {
        Ok(entry) => entry,
        Err(e) => {
            state.cache.stats.errors.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(role = "gateway", error = %e, "cache store unavailable; going upstream");
            None
        }
    }
}

fn from_entry(
    entry: &Entry,
    result: Outcome,
    now: u64,
    if_none_match: Option<&str>,
    head: bool,
) -> Response {
    let not_modified = matches!((if_none_match, entry.etag()), (Some(inm), Some(etag)) if policy::etag_matches(inm, etag));
    let status = if not_modified {
        StatusCode::NOT_MODIFIED
    } else {
        StatusCode::from_u16(entry.status).unwrap_or(StatusCode::OK)
    };
    let body = if not_modified || head { Body::empty() } else { Body::from(entry.body.clone()) };
    let mut response = Response::builder()
        .status(status)
        .body(body)
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response());
    for (k, v) in &entry.headers {
        if let (Ok(k), Ok(v)) = (HeaderName::from_bytes(k.as_bytes()), HeaderValue::from_str(v)) {
            response.headers_mut().insert(k, v);
        }
    }
    response.headers_mut().insert(header::AGE, HeaderValue::from(entry.age(now)));
    response.headers_mut().insert(X_CACHE.clone(), result.header());
    response
}

/// Stores a 200 the upstream allows caching (buffering its body, within the size cap); returns
/// the response to send.
async fn store(
    state: &State,
    route: &Route,
    policy: &CachePolicy,
    key: &str,
    response: Response,
) -> Response {
    let Some((max_age, directives)) =
        policy::storable(response.status(), response.headers(), policy)
    else {
        return response;
    };
    let (mut parts, body) = response.into_parts();
    let bytes = match http_body_util::Limited::new(body, policy.max_entry_bytes).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) => {
            tracing::warn!(role = "gateway", route = %route.spec.name, error = %e, "upstream body failed or exceeded the cache cap");
            return ApiError::new(
                ErrorCode::UpstreamUnavailable,
                "the upstream body could not be read",
            )
            .into_response();
        }
    };
    if !parts.headers.contains_key(header::ETAG) {
        if let Ok(v) = HeaderValue::from_str(&policy::weak_etag(&bytes)) {
            parts.headers.insert(header::ETAG, v);
        }
    }
    let entry = Entry {
        status: 200,
        headers: policy::KEPT
            .iter()
            .filter_map(|k| {
                parts
                    .headers
                    .get(*k)
                    .and_then(|v| v.to_str().ok())
                    .map(|v| (k.to_string(), v.to_string()))
            })
            .collect(),
        body: bytes.clone(),
        stored_at: now_ms(),
        max_age,
        swr: directives.swr,
    };
    if let Err(e) =
        state.cache.store.put(key, &entry, Duration::from_secs(max_age + directives.swr)).await
    {
        state.cache.stats.errors.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(role = "gateway", error = %e, "cache store unavailable; not stored");
    }
    Response::from_parts(parts, Body::from(bytes))
}

/// A client's matching `If-None-Match` turns a 200 into a 304.
fn with_client_validator(
    mut response: Response,
    if_none_match: Option<&str>,
    result: Outcome,
) -> Response {
    let matched =
        match (if_none_match, response.headers().get(header::ETAG).and_then(|v| v.to_str().ok())) {
            (Some(inm), Some(etag)) => {
                response.status() == StatusCode::OK && policy::etag_matches(inm, etag)
            }
            _ => false,
        };
    if matched {
        *response.status_mut() = StatusCode::NOT_MODIFIED;
        *response.body_mut() = Body::empty();
        response.headers_mut().remove(header::CONTENT_LENGTH);
    }
    response.headers_mut().insert(X_CACHE.clone(), result.header());
    response
}

/// Revalidates a stale entry in the background with `If-None-Match`: a 304 refreshes it, a 200
/// replaces it. The guard keeps other requests from revalidating the same key meanwhile.
fn revalidate(
    state: State,
    route: &Route,
    req: &Request,
    identity: Option<Identity>,
    key: String,
    entry: Entry,
    guard: FlightGuard,
) {
    // The route as the table has it now (it may have been reloaded since).
    let Some(route) = state
        .table()
        .find(req.uri().path())
        .map(|m| m.route)
        .filter(|r| r.spec.name == route.spec.name)
    else {
        return;
    };
    let mut request = http::Request::builder().method(Method::GET).uri(req.uri().clone());
    for name in [header::ACCEPT, header::ACCEPT_ENCODING] {
        if let Some(v) = req.headers().get(&name) {
            request = request.header(name, v.clone());
        }
    }
    if let Some(etag) = entry.etag() {
        request = request.header(header::IF_NONE_MATCH, etag);
    }
    let Ok(request) = request.body(()) else { return };
    let parts = request.into_parts().0;
    let policy =
        route.cache.clone().unwrap_or(CachePolicy { vary_user: false, max_entry_bytes: 1 << 20 });
    tokio::spawn(async move {
        let _guard = guard;
        state.cache.stats.revalidations.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(super::names::REVALIDATIONS, "role" => "gateway", "route" => route.spec.name.clone()).increment(1);
        let peer = SocketAddr::from(([127, 0, 0, 1], 0));
        let call = upstream::Call {
            route: &route,
            parts,
            body: Bytes::new(),
            peer,
            client: peer.ip(),
            identity: identity.as_ref(),
        };
        match upstream::send(&state, call).await {
            Ok(response) if response.status() == StatusCode::NOT_MODIFIED => {
                let directives = policy::directives_of(response.headers());
                let refreshed = Entry {
                    stored_at: now_ms(),
                    max_age: directives.max_age.unwrap_or(entry.max_age),
                    ..entry
                };
                let ttl = Duration::from_secs(refreshed.max_age + refreshed.swr);
                let _ = state.cache.store.put(&key, &refreshed, ttl).await;
            }
            Ok(response) => {
                let _ = store(&state, &route, &policy, &key, response).await;
            }
            Err(e) => {
                tracing::debug!(role = "gateway", error = %e.public_message(), "revalidation failed; the stale entry stays")
            }
        }
    });
}

/// In-flight fetches by key: later requests wait for the first (one upstream fetch per key per
/// replica). A std mutex held to look up, insert or remove a sender.
#[derive(Default)]
pub struct Flights(Mutex<HashMap<String, watch::Sender<bool>>>);

/// Who fetches a key.
pub enum Flight {
    /// This request fetches; finishing (or dropping) the guard wakes the others.
    Leader(FlightGuard),
    /// Another request is fetching; wait, then look again.
    Follower(watch::Receiver<bool>),
}

/// Held by the fetching request.
pub struct FlightGuard {
    cache: Arc<Cache>,
    key: String,
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        let mut flights = self.cache.flights.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = flights.remove(&self.key) {
            let _ = tx.send(true);
        }
    }
}

/// Joins or leads the fetch of `key`.
pub fn flight(cache: &Arc<Cache>, key: &str) -> Flight {
    let mut flights = cache.flights.0.lock().unwrap_or_else(|p| p.into_inner());
    match flights.get(key) {
        Some(tx) => Flight::Follower(tx.subscribe()),
        None => {
            flights.insert(key.to_string(), watch::channel(false).0);
            Flight::Leader(FlightGuard { cache: cache.clone(), key: key.to_string() })
        }
    }
}
