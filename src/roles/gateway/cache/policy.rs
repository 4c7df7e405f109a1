//! The HTTP caching rules: which requests may be served from the cache and under which key,
//! which upstream answers may be stored and for how long (`Cache-Control`), validators, and what
//! an identified caller's answer tells caches in front of the gateway.
//!
//! Keys cover the method, the route, the path, the sorted query and the tenant (and the user when
//! the route says `vary_user`), so no tenant ever sees another's data:
//! `<prefix>cache:<route>:<sha256>`. Upstream `Cache-Control` decides: `no-store`, `private` and
//! `no-cache` are never stored, `s-maxage` beats `max-age`, nothing without either is stored, and
//! `stale-while-revalidate` lets a stale entry be served while one revalidation (with
//! `If-None-Match`) goes upstream. Entries over the route's size cap are not stored.

use axum::extract::Request;
use base64::Engine;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, StatusCode};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::super::routes::Route;
use crate::auth::Identity;

/// A route's cache policy (`cache:` in the route table).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CachePolicy {
    /// Key on the user as well as the tenant.
    #[serde(default)]
    pub vary_user: bool,
    /// Largest body stored, bytes.
    #[serde(default = "default_max_entry")]
    pub max_entry_bytes: usize,
}

fn default_max_entry() -> usize {
    1024 * 1024
}

/// The key of a request `route` may serve from the cache, or `None` when it may not: only GET and
/// HEAD on a route with a cache policy, and not when the client asks for a fresh answer
/// (`Cache-Control: no-store` or `no-cache`). Per tenant, and per user when the policy says so.
pub fn cache_key(route: &Route, identity: Option<&Identity>, req: &Request) -> Option<String> {
    let policy = route.cache.as_ref()?;
    if !matches!(*req.method(), Method::GET | Method::HEAD) {
        return None;
    }
    let client_bypass = req
        .headers()
        .get(header::CACHE_CONTROL)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("no-store") || v.contains("no-cache"));
    if client_bypass {
        return None;
    }
    let tenant = identity.map(|i| i.tenant.as_str()).unwrap_or("anonymous");
    let user = identity.filter(|_| policy.vary_user).map(|i| i.subject.as_str());
    let uri = req.uri();
    Some(key(req.method().as_str(), &route.spec.name, uri.path(), uri.query(), tenant, user))
}

/// The cache key of a request.
pub fn key(
    method: &str,
    route: &str,
    path: &str,
    query: Option<&str>,
    tenant: &str,
    user: Option<&str>,
) -> String {
    // The query as forwarded (canonical: `server::target`), its parameters ordered by name with
    // a stable sort: distinct names in any order share an entry, but repeated names keep their
    // order (`limit=2&limit=1` is not `limit=1&limit=2` to an upstream that takes the first)
    // and `a` stays distinct from `a=`.
    let query = match query.unwrap_or_default() {
        "" => String::new(),
        query => {
            let mut params: Vec<&str> = query.split('&').collect();
            params.sort_by_key(|p| p.split('=').next().unwrap_or_default());
            params.join("&")
        }
    };
    let material =
        format!("{method}\n{route}\n{path}\n{query}\n{tenant}\n{}", user.unwrap_or_default());
    format!("cache:{route}:{}", hex::encode(Sha256::digest(material.as_bytes())))
}

/// What `Cache-Control` allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Directives {
    /// `no-store` or `private`: never stored here.
    pub uncacheable: bool,
    /// `s-maxage`, else `max-age`.
    pub max_age: Option<u64>,
    /// `stale-while-revalidate`.
    pub swr: u64,
}

/// Parses a `Cache-Control` value.
pub fn directives(value: Option<&str>) -> Directives {
    let mut d = Directives::default();
    let (mut max_age, mut s_maxage) = (None, None);
    for part in value.unwrap_or_default().split(',') {
        let part = part.trim().to_ascii_lowercase();
        let (name, arg) = part
            .split_once('=')
            .map(|(n, a)| (n.trim().to_string(), Some(a.trim().trim_matches('"').to_string())))
            .unwrap_or((part.clone(), None));
        let secs = arg.as_deref().and_then(|a| a.parse::<u64>().ok());
        match name.as_str() {
            "no-store" | "private" | "no-cache" => d.uncacheable = true,
            "max-age" => max_age = secs,
            "s-maxage" => s_maxage = secs,
            "stale-while-revalidate" => d.swr = secs.unwrap_or(0),
            _ => {}
        }
    }
    d.max_age = s_maxage.or(max_age);
    d
}

/// The directives of a response's `Cache-Control`.
pub fn directives_of(headers: &HeaderMap) -> Directives {
    directives(headers.get(header::CACHE_CONTROL).and_then(|v| v.to_str().ok()))
}

/// How long an upstream answer may be stored (seconds fresh, and its directives), or `None`: only
/// a 200 whose `Cache-Control` gives a positive age and allows storing, with a body not declared
/// larger than the route's `max_entry_bytes`.
pub fn storable(
    status: StatusCode,
    headers: &HeaderMap,
    policy: &CachePolicy,
) -> Option<(u64, Directives)> {
    let directives = directives_of(headers);
    let max_age = match directives.max_age {
        Some(age) if status == StatusCode::OK && !directives.uncacheable && age > 0 => age,
        _ => return None,
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > policy.max_entry_bytes) {
        return None;
    }
    Some((max_age, directives))
}

/// Headers kept with an entry.
pub const KEPT: &[&str] =
    &["content-type", "etag", "cache-control", "last-modified", "content-encoding", "vary"];

/// Whether an `If-None-Match` value matches `etag`.
pub fn etag_matches(if_none_match: &str, etag: &str) -> bool {
    let bare = |t: &str| t.trim().trim_start_matches("W/").to_string();
    if_none_match.trim() == "*" || if_none_match.split(',').any(|t| bare(t) == bare(etag))
}

/// A stable ETag for a body when the upstream gives none.
pub fn weak_etag(body: &[u8]) -> String {
    format!(
        "W/\"{}\"",
        &base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(Sha256::digest(body))[..22]
    )
}

/// Makes a response's `Cache-Control` private: `public` and `s-maxage` (which let a shared
/// cache store a response to an authenticated request, RFC 9111 section 3.5) are removed and
/// `private` added; the caller's own cache keeps `max-age` and the rest. A response without
/// `Cache-Control` is left alone (shared caches do not store authenticated responses by default).
pub fn privatize(headers: &mut HeaderMap) {
    let Some(value) = headers.get(header::CACHE_CONTROL) else { return };
    let text = value.to_str().unwrap_or_default().to_string();
    let mut directives: Vec<&str> = text
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .filter(|d| {
            let name = d.split('=').next().unwrap_or_default().trim().to_ascii_lowercase();
            name != "public" && name != "s-maxage" && name != "proxy-revalidate"
        })
        .collect();
    let private_already = directives.iter().any(|d| {
        let d = d.to_ascii_lowercase();
        d == "private" || d == "no-store" || d.starts_with("private=")
    });
    if !private_already {
        directives.insert(0, "private");
    }
    match HeaderValue::from_str(&directives.join(", ")) {
        Ok(v) => {
            headers.insert(header::CACHE_CONTROL, v);
        }
        Err(_) => {
            headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("private, no-cache"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_control_is_read_as_documented() {
        assert_eq!(
            directives(Some("max-age=60")),
            Directives { uncacheable: false, max_age: Some(60), swr: 0 }
        );
        assert_eq!(
            directives(Some("public, max-age=60, s-maxage=10, stale-while-revalidate=30")).max_age,
            Some(10)
        );
        assert_eq!(directives(Some("max-age=60, stale-while-revalidate=30")).swr, 30);
        assert!(directives(Some("no-store")).uncacheable);
        assert!(directives(Some("private, max-age=60")).uncacheable);
        assert_eq!(directives(None).max_age, None);
    }

    #[test]
    fn keys_separate_tenants_and_users_and_ignore_query_order() {
        let a = key("GET", "prices", "/p", Some("a=1&b=2"), "t1", None);
        assert_eq!(a, key("GET", "prices", "/p", Some("b=2&a=1"), "t1", None));
        assert_ne!(a, key("GET", "prices", "/p", Some("a=1&b=2"), "t2", None));
        assert_ne!(a, key("HEAD", "prices", "/p", Some("a=1&b=2"), "t1", None));
        assert_ne!(
            key("GET", "r", "/p", None, "t1", Some("u1")),
            key("GET", "r", "/p", None, "t1", Some("u2"))
        );
        assert!(a.starts_with("cache:prices:"));
        // What an upstream may read differently never shares an entry.
        let k = |q: &str| key("GET", "r", "/p", Some(q), "t1", None);
        assert_ne!(k("limit=2&limit=1"), k("limit=1&limit=2"), "repeated names keep their order");
        assert_eq!(k("b=1&limit=2&limit=1"), k("limit=2&b=1&limit=1"));
        assert_ne!(k("a"), k("a="));
        assert_ne!(k("a=x+y"), k("a=x%20y"));
    }

    #[test]
    fn etags_match_weak_and_lists() {
        assert!(etag_matches("\"abc\"", "\"abc\""));
        assert!(etag_matches("W/\"abc\", \"x\"", "\"abc\""));
        assert!(etag_matches("*", "\"abc\""));
        assert!(!etag_matches("\"abd\"", "\"abc\""));
    }
}
