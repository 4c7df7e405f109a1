//! The cached request path for GET and HEAD on routes with a cache policy: a fresh entry is a
//! `HIT`; a stale one within `stale-while-revalidate` is served (`STALE`) while one revalidation
//! goes upstream; otherwise one request per key per replica goes upstream (`MISS`) and the others
//! wait for it. A client's `If-None-Match` that matches gets 304.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, StatusCode};
use http_body_util::BodyExt;

use super::cache::{self, CachePolicy, Entry, Flight, Outcome};
use super::proxy::{upstream, Handled, X_CACHE};
use super::routes::Route;
use super::State;
use crate::auth::Identity;
use crate::error::ApiError;
use crate::ratelimit::CacheRead;

/// The cache key of a request on `route`: per tenant, and per user when the policy says so.
pub fn key(
    route: &Route,
    policy: &CachePolicy,
    identity: Option<&Identity>,
    req: &Request,
) -> String {
    let tenant = identity.map(|i| i.tenant.as_str()).unwrap_or("anonymous");
    let user = identity.filter(|_| policy.vary_user).map(|i| i.subject.as_str());
    let uri = req.uri();
    cache::key(req.method().as_str(), &route.spec.name, uri.path(), uri.query(), tenant, user)
}

/// A cacheable request's policy and key, and the entry the rate-limit script already read.
pub struct Lookup<'a> {
    /// The route's cache policy.
    pub policy: &'a CachePolicy,
    /// From [`key`].
    pub key: String,
    /// What the rate-limit round trip read for the key.
    pub cached: CacheRead,
}

/// Serves a cacheable request.
pub async fn serve(
    state: &State,
    route: &Route,
    wanted: Lookup<'_>,
    peer: SocketAddr,
    client: IpAddr,
    identity: Option<Identity>,
    mut req: Request,
) -> Result<Handled, ApiError> {
    let Lookup { policy, key, cached } = wanted;
    let if_none_match =
        req.headers().get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()).map(String::from);
    let head = req.method() == Method::HEAD;

    let first = match cached {
        CacheRead::Hit(raw) => Entry::decode(&raw),
        CacheRead::Miss => None,
        CacheRead::NotAsked => lookup(state, &key).await,
    };
    if let Some(entry) = first {
        let (age, now) = (entry.age(cache::now_ms()), cache::now_ms());
        if age < entry.max_age {
            state.cache.count(route, Outcome::Hit);
            return Ok((
                from_entry(&entry, Outcome::Hit, now, if_none_match.as_deref(), head),
                identity,
                0,
            ));
        }
        if age < entry.max_age + entry.swr {
            state.cache.count(route, Outcome::Stale);
            if let Flight::Leader(guard) = state.cache.flight(&key) {
                revalidate(
                    state.clone(),
                    route,
                    &req,
                    identity.clone(),
                    key.clone(),
                    entry.clone(),
                    guard,
                );
            }
            return Ok((
                from_entry(&entry, Outcome::Stale, now, if_none_match.as_deref(), head),
                identity,
                0,
            ));
        }
    }
    let guard = match state.cache.flight(&key) {
        Flight::Leader(guard) => guard,
        Flight::Follower(mut done) => {
            state.cache.stats.coalesced.fetch_add(1, Ordering::Relaxed);
            let _ = tokio::time::timeout(route.timeout, done.wait_for(|d| *d)).await;
            if let Some(entry) =
                lookup(state, &key).await.filter(|e| e.age(cache::now_ms()) < e.max_age)
            {
                state.cache.count(route, Outcome::Hit);
                return Ok((
                    from_entry(
                        &entry,
                        Outcome::Hit,
                        cache::now_ms(),
                        if_none_match.as_deref(),
                        head,
                    ),
                    identity,
                    0,
                ));
            }
            // The leader's answer was not cacheable: go upstream like it did.
            state.cache.count(route, Outcome::Miss);
            let mut handled = upstream(state, route, peer, client, identity, req).await?;
            handled.0.headers_mut().insert(X_CACHE.clone(), Outcome::Miss.header());
            return Ok(handled);
        }
    };
    state.cache.count(route, Outcome::Miss);
    // The cache needs the full response: the client's own validators are applied afterwards.
    req.headers_mut().remove(header::IF_NONE_MATCH);
    req.headers_mut().remove(header::IF_MODIFIED_SINCE);
    let (response, identity, bytes_in) =
        upstream(state, route, peer, client, identity, req).await?;
    let response = store(state, route, policy, &key, response).await;
    drop(guard);
    Ok((
        with_client_validator(response, if_none_match.as_deref(), Outcome::Miss),
        identity,
        bytes_in,
    ))
}

async fn lookup(state: &State, key: &str) -> Option<Entry> {
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
    let not_modified = matches!((if_none_match, entry.etag()), (Some(inm), Some(etag)) if cache::etag_matches(inm, etag));
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
    let directives = cache::directives(
        response.headers().get(header::CACHE_CONTROL).and_then(|v| v.to_str().ok()),
    );
    let declared = response
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    let max_age = match directives.max_age {
        Some(age) if response.status() == StatusCode::OK && !directives.uncacheable && age > 0 => {
            age
        }
        _ => return response,
    };
    if declared.is_some_and(|n| n > policy.max_entry_bytes) {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let bytes = match http_body_util::Limited::new(body, policy.max_entry_bytes).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) => {
            tracing::warn!(role = "gateway", route = %route.spec.name, error = %e, "upstream body failed or exceeded the cache cap");
            return ApiError::new(
                crate::error::ErrorCode::UpstreamUnavailable,
                "the upstream body could not be read",
            )
            .into_response();
        }
    };
    if !parts.headers.contains_key(header::ETAG) {
        if let Ok(v) = HeaderValue::from_str(&cache::weak_etag(&bytes)) {
            parts.headers.insert(header::ETAG, v);
        }
    }
    let entry = Entry {
        status: 200,
        headers: cache::KEPT
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
        stored_at: cache::now_ms(),
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
                response.status() == StatusCode::OK && cache::etag_matches(inm, etag)
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
    guard: cache::FlightGuard,
) {
    let Some(route) = state
        .table()
        .find(req.uri().path())
        .map(|m| m.route)
        .filter(|r| r.spec.name == route.spec.name)
    else {
        return;
    };
    let mut request = Request::builder().method(Method::GET).uri(req.uri().clone());
    for name in [header::ACCEPT, header::ACCEPT_ENCODING] {
        if let Some(v) = req.headers().get(&name) {
            request = request.header(name, v.clone());
        }
    }
    if let Some(etag) = entry.etag() {
        request = request.header(header::IF_NONE_MATCH, etag);
    }
    let Ok(request) = request.body(Body::empty()) else { return };
    let policy =
        route.cache.clone().unwrap_or(CachePolicy { vary_user: false, max_entry_bytes: 1 << 20 });
    tokio::spawn(async move {
        let _guard = guard;
        state.cache.stats.revalidations.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(cache::names::REVALIDATIONS, "role" => "gateway", "route" => route.spec.name.clone()).increment(1);
        let peer = SocketAddr::from(([127, 0, 0, 1], 0));
        match upstream(&state, &route, peer, peer.ip(), identity, request).await {
            Ok((response, _, _)) if response.status() == StatusCode::NOT_MODIFIED => {
                let directives = cache::directives(
                    response.headers().get(header::CACHE_CONTROL).and_then(|v| v.to_str().ok()),
                );
                let refreshed = Entry {
                    stored_at: cache::now_ms(),
                    max_age: directives.max_age.unwrap_or(entry.max_age),
                    ..entry
                };
                let ttl = Duration::from_secs(refreshed.max_age + refreshed.swr);
                let _ = state.cache.store.put(&key, &refreshed, ttl).await;
            }
            Ok((response, _, _)) => {
                let _ = store(&state, &route, &policy, &key, response).await;
            }
            Err(e) => {
                tracing::debug!(role = "gateway", error = %e.public_message(), "revalidation failed; the stale entry stays")
            }
        }
    });
}
