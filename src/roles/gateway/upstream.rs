//! The call to a route's upstreams: the request's headers rewritten (hop-by-hop and reserved
//! headers removed, identity and forwarding headers set, the prefix stripped), then round-robin
//! over the route's upstreams, each attempt admitted by that upstream's circuit breaker, under
//! the route's timeout, with retries for body-less idempotent requests.

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::time::Instant;

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Uri};

use super::breaker::Admission;
use super::routes::Route;
use super::State;
use crate::auth::Identity;
use crate::error::{ApiError, ErrorCode};

/// Identity headers the gateway sets for upstreams; copies sent by clients are removed.
pub static IDENTITY_HEADERS: [HeaderName; 3] = [
    HeaderName::from_static("x-user-id"),
    HeaderName::from_static("x-tenant-id"),
    HeaderName::from_static("x-user-roles"),
];

/// Client headers whose names, normalised (lower case, `_` read as `-`, since WSGI/CGI servers
/// read `X_User_Id` as `X-User-Id`), are one of these are never forwarded: identity and
/// credentials the gateway owns, forwarding information only trusted proxies may set, and the
/// path and method overrides some frameworks obey (a different target than the one checked).
const RESERVED_HEADERS: &[&str] = &[
    "forwarded",
    "x-forwarded",
    "x-original-forwarded-for",
    "x-user",
    "x-userid",
    "x-tenant",
    "tenant-id",
    "x-roles",
    "x-groups",
    "x-email",
    "x-auth",
    "x-authenticated-user",
    "x-authenticated-userid",
    "x-scope-orgid",
    "x-org-id",
    "x-account-id",
    "x-webauth-user",
    "x-access-token",
    "x-id-token",
    "x-token",
    "x-real-ip",
    "x-client-ip",
    "true-client-ip",
    "cf-connecting-ip",
    "x-cluster-client-ip",
    "x-original-url",
    "x-original-uri",
    "x-original-method",
    "x-rewrite-url",
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    "remote-user",
    "x-remote-user",
    "x-remote-addr",
];

/// Name prefixes reserved the same way: ours (`X-User-*`, `X-Tenant-*`), forwarding
/// (`X-Forwarded-*`), and the identity and client-certificate headers other proxies and
/// platforms set (Kong's `X-Consumer-*`, Kubernetes' `Impersonate-*`, AWS ALB's
/// `X-Amzn-Oidc-*`, IAP's `X-Goog-Authenticated-*`, Azure's `X-MS-Client-Principal*`, TLS
/// terminators' `X-SSL-Client-*` / `X-Client-Cert*`), which an upstream may believe.
const RESERVED_PREFIXES: &[&str] = &[
    "x-forwarded-",
    "x-user-",
    "x-tenant-",
    "x-auth-",
    "x-authenticated-",
    "x-consumer-",
    "impersonate-",
    "x-amzn-oidc-",
    "x-goog-authenticated-",
    "x-ms-client-principal",
    "x-ssl-client",
    "ssl-client",
    "x-client-cert",
    "x-client-ssl",
];

/// Whether a client header must not reach an upstream: see [`RESERVED_HEADERS`]. The caller's
/// credentials (`Authorization`, `X-API-Key`) pass only on routes with `forward_authorization`;
/// their underscore twins never do (they are not what the gateway verified).
pub fn is_reserved(name: &HeaderName, forward_authorization: bool) -> bool {
    let raw = name.as_str();
    if raw == "authorization" || raw == "x-api-key" {
        return !forward_authorization;
    }
    let name: Cow<str> =
        if raw.contains('_') { Cow::Owned(raw.replace('_', "-")) } else { Cow::Borrowed(raw) };
    if name == "authorization" || name == "x-api-key" {
        return true;
    }
    RESERVED_HEADERS.contains(&name.as_ref())
        || RESERVED_PREFIXES.iter().any(|p| name.starts_with(p))
}

const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in HOP_BY_HOP.iter().chain(listed.iter()) {
        headers.remove(name);
    }
}

/// One call to a route's upstreams: the request as the client sent it, its body already read,
/// and who sent it. Built by the pipeline's upstream step, and by a cache revalidation.
pub struct Call<'a> {
    /// The route whose upstreams answer (its timeout, retries and prefix to strip).
    pub route: &'a Route,
    /// The client's method, target and headers; rewritten here before they leave.
    pub parts: http::request::Parts,
    /// The body, read in full ([`read_body`]).
    pub body: Bytes,
    /// The connection's peer: its `X-Forwarded-Proto` is believed when it is a trusted proxy.
    pub peer: SocketAddr,
    /// The client's address (`X-Forwarded-For`).
    pub client: IpAddr,
    /// The caller, whose identity headers the upstream gets.
    pub identity: Option<&'a Identity>,
}

/// Sends a call to the route's upstreams: round-robin, a circuit breaker per upstream (asked
/// before each attempt: a retry may go to another upstream), timeout, retries; header rewriting.
pub async fn send(state: &State, call: Call<'_>) -> Result<Response, ApiError> {
    let Call { route, mut parts, body, peer, client, identity } = call;
    let proto = if crate::server::client::is_trusted(&peer.ip(), &state.trusted_proxies) {
        parts.headers.get("x-forwarded-proto").cloned().unwrap_or(HeaderValue::from_static("http"))
    } else {
        HeaderValue::from_static("http")
    };
    let host = parts.headers.get(header::HOST).cloned();
    strip_hop_by_hop(&mut parts.headers);
    // Client copies of identity, credential and forwarding headers, in any spelling, never reach
    // upstreams.
    let forward_authorization = route.spec.forward_authorization;
    let reserved: Vec<HeaderName> = parts
        .headers
        .keys()
        .filter(|name| is_reserved(name, forward_authorization))
        .cloned()
        .collect();
    for name in &reserved {
        parts.headers.remove(name);
    }
    if !body.is_empty() || parts.headers.contains_key(header::CONTENT_LENGTH) {
        parts.headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    }
    if let Some(identity) = identity {
        for (name, value) in IDENTITY_HEADERS.iter().zip([
            &identity.subject,
            &identity.tenant,
            &identity.roles.join(","),
        ]) {
            if let Ok(v) = HeaderValue::from_str(value) {
                parts.headers.insert(name.clone(), v);
            }
        }
    }
    if let Ok(v) = HeaderValue::from_str(&client.to_string()) {
        parts.headers.insert("x-forwarded-for", v);
    }
    parts.headers.insert("x-forwarded-proto", proto);
    if let Some(host) = host {
        parts.headers.insert("x-forwarded-host", host);
    }
    let path_and_query = {
        let path = parts.uri.path();
        let stripped =
            route.spec.strip_prefix.as_deref().and_then(|p| path.strip_prefix(p)).unwrap_or(path);
        let stripped = if stripped.is_empty() { "/" } else { stripped };
        match parts.uri.query() {
            Some(q) => format!("{stripped}?{q}"),
            None => stripped.to_string(),
        }
    };
    let idempotent = matches!(
        parts.method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE
    );
    // Only body-less idempotent requests are retried. A request an HTTP/2 upstream refused
    // unprocessed (a graceful GOAWAY as it rotates a connection, REFUSED_STREAM) is sent again
    // whatever its method and `retries`: it never reached the application. Up to
    // `UNPROCESSED_RESENDS` times, without spending an attempt.
    const UNPROCESSED_RESENDS: u32 = 3;
    let retryable = idempotent && body.is_empty();
    let attempts = if retryable { route.retries + 1 } else { 1 };
    let mut last_error = None;
    let (mut attempt, mut resends) = (0, 0);
    while attempt < attempts {
        attempt += 1;
        let index = route.next.fetch_add(1, Ordering::Relaxed) % route.upstreams.len().max(1);
        let Some(base) = route.upstreams.get(index) else { break };
        let guard = state.breaker(base);
        let breaker = &guard.breaker;
        let admission = breaker.admit(Instant::now());
        if let Admission::Refuse(retry_after) = admission {
            last_error = Some(
                ApiError::new(
                    ErrorCode::CircuitOpen,
                    format!(
                        "the circuit breaker for {} is open",
                        base.host_str().unwrap_or("upstream")
                    ),
                )
                .with_retry_after(retry_after),
            );
            continue;
        }
        let uri: Uri =
            match format!("{}{}", base.as_str().trim_end_matches('/'), path_and_query).parse() {
                Ok(u) => u,
                Err(e) => return Err(ApiError::internal(anyhow::anyhow!("upstream URI: {e}"))),
            };
        // `Bytes`: a clone for a resend costs a reference count.
        let mut upstream = http::Request::from_parts(parts.clone(), Body::from(body.clone()));
        *upstream.uri_mut() = uri;
        if let Some(authority) = upstream.uri().authority().map(|a| a.as_str().to_string()) {
            if let Ok(v) = HeaderValue::from_str(&authority) {
                upstream.headers_mut().insert(header::HOST, v);
            }
        }
        crate::telemetry::inject_trace_context(upstream.headers_mut());
        let sent = Instant::now();
        let outcome = tokio::time::timeout(
            route.timeout,
            state.clients.request(route.spec.upstream.as_deref(), upstream),
        )
        .await;
        route.upstream_duration.record(sent.elapsed().as_secs_f64());
        match outcome {
            Ok(Ok(response)) => {
                breaker.record(response.status().as_u16() < 500, Instant::now());
                guard.publish();
                let (mut parts, body) = response.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                parts.extensions.insert(crate::server::layers::Proxied);
                return Ok(Response::from_parts(parts, Body::new(body)));
            }
            Ok(Err(e)) => {
                // A request an HTTP/2 upstream refused unprocessed (a graceful GOAWAY) is no
                // failure of the upstream (it answered; a half-open probe closes the breaker),
                // and is retried like a failed connection.
                let unprocessed = super::upstream_tls::unprocessed(&e);
                breaker.record(unprocessed, Instant::now());
                guard.publish();
                if unprocessed {
                    tracing::debug!(role = "gateway", route = %route.spec.name, upstream = %base, error = %e, "upstream refused the request unprocessed; sending it again");
                } else {
                    tracing::warn!(role = "gateway", route = %route.spec.name, upstream = %base, attempt, error = %e, "upstream request failed");
                }
                last_error = Some(super::upstream_tls::upstream_error(&e));
                if unprocessed && resends < UNPROCESSED_RESENDS {
                    resends += 1;
                    attempt -= 1;
                    continue;
                }
                if !e.is_connect() || !retryable {
                    break;
                }
            }
            Err(_) => {
                breaker.record(false, Instant::now());
                guard.publish();
                return Err(ApiError::new(
                    ErrorCode::UpstreamTimeout,
                    format!("{} did not answer within {:?}", route.spec.name, route.timeout),
                ));
            }
        }
    }
    Err(last_error
        .unwrap_or_else(|| ApiError::new(ErrorCode::UpstreamUnavailable, "no upstream configured")))
}

/// Reads a request body in full (it is already capped at `server.max_body_bytes` and the read
/// deadline by the shared layer; `max` caps it again for a router used without that layer).
///
/// The body is read in full before any upstream is called: a body over the limit is 413, one
/// not received in time 408, one the client abandons 400, and none of them reaches an upstream
/// truncated or counts against its breaker (nginx buffers request bodies for the same reason).
/// Requests without a body (every GET) skip this.
pub async fn read_body(body: Body, max: usize) -> Result<Bytes, ApiError> {
    use http_body_util::BodyExt;
    if http_body::Body::is_end_stream(&body) {
        return Ok(Bytes::new());
    }
    match http_body_util::Limited::new(body, max).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) => Err(crate::server::layers::body_error(e.as_ref(), max)),
    }
}
