//! The gateway's response cache against the real Redis: tenant isolation, max-age expiry,
//! no-store and private never stored, stale-while-revalidate, 304s, coalescing, purge.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use access::role::Role;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing;
use axum::Router;

use crate::support::{
    config, eventually, http, redis_prefix, start, wait_ready, DevKeys, Running, REDIS_URL,
};

/// An upstream whose `/{policy}` answers with that Cache-Control, counting hits; `ETag` is the
/// hit number's generation (changed by `/bump`); `If-None-Match` gets 304.
#[derive(Clone, Default)]
struct Upstream {
    hits: Arc<AtomicUsize>,
    generation: Arc<AtomicUsize>,
    delay_ms: Arc<AtomicUsize>,
}

async fn answer(
    State(u): State<Upstream>,
    Path(policy): Path<String>,
    headers: HeaderMap,
    req: Request,
) -> impl IntoResponse {
    let n = u.hits.fetch_add(1, Ordering::SeqCst) + 1;
    let delay = u.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay as u64)).await;
    }
    let etag = format!("\"g{}\"", u.generation.load(Ordering::SeqCst));
    let cache_control = policy
        .replace('_', ", ")
        .replace('-', "=")
        .replace("stale=while=revalidate", "stale-while-revalidate")
        .replace("max=age", "max-age")
        .replace("no=store", "no-store");
    if headers.get("if-none-match").and_then(|v| v.to_str().ok()) == Some(etag.as_str()) {
        return (
            StatusCode::NOT_MODIFIED,
            [("etag", etag), ("cache-control", cache_control)],
            String::new(),
        );
    }
    let tenant =
        headers.get("x-tenant-id").and_then(|v| v.to_str().ok()).unwrap_or("-").to_string();
    (
        StatusCode::OK,
        [("etag", etag), ("cache-control", cache_control)],
        format!(
            "{{\"hit\":{n},\"tenant\":\"{tenant}\",\"query\":\"{}\"}}",
            req.uri().query().unwrap_or("")
        ),
    )
}

async fn upstream() -> (String, Upstream) {
    let u = Upstream::default();
    let app = Router::new().route("/c/{policy}", routing::get(answer)).with_state(u.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, u)
}

const SEED: &str =
    "- { name: all, effect: allow, resource: \"*\", actions: [\"*\"], priority: 1 }\n";

struct Setup {
    _dir: tempfile::TempDir,
    keys: DevKeys,
    gateway: Running,
    _entitlements: Running,
    up: Upstream,
}

async fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let keys = DevKeys::new();
    let seed = dir.path().join("seed.yaml");
    std::fs::write(&seed, SEED).unwrap();
    let entitlements = start(
        Role::Entitlements,
        config(&[
            ("ACCESS_AUTH__DEV_KEY_FILE", &keys.path),
            ("ACCESS_ENTITLEMENTS__SEED_FILE", &seed.display().to_string()),
        ]),
    )
    .await;
    wait_ready(&entitlements.url("")).await;
    let (url, up) = upstream().await;
    let routes = dir.path().join("routes.yaml");
    std::fs::write(
        &routes,
        format!(
            "- {{ name: cached, path: \"/api/c/{{policy}}\", upstreams: [\"{url}\"], strip_prefix: /api, cache: {{}}, entitlement: {{ resource: data }} }}\n\
             - {{ name: uncached, path: \"/api/u/{{policy}}\", upstreams: [\"{url}\"], auth: none }}\n"
        ),
    )
    .unwrap();
    let prefix = redis_prefix();
    let gateway = start(
        Role::Gateway,
        config(&[
            ("ACCESS_AUTH__DEV_KEY_FILE", &keys.path),
            ("ACCESS_GATEWAY__ROUTES_FILE", &routes.display().to_string()),
            ("ACCESS_ENTITLEMENTS_SERVICE_URL", &entitlements.url("")),
            ("ACCESS_REDIS_URL", REDIS_URL),
            ("ACCESS_REDIS__PREFIX", &prefix),
        ]),
    )
    .await;
    wait_ready(&gateway.url("")).await;
    Setup { _dir: dir, keys, gateway, _entitlements: entitlements, up }
}

async fn get(s: &Setup, path: &str, token: &str, inm: Option<&str>) -> (u16, String, String) {
    let mut r = http().get(s.gateway.url(path)).bearer_auth(token);
    if let Some(tag) = inm {
        r = r.header("if-none-match", tag);
    }
    let r = r.send().await.unwrap();
    let status = r.status().as_u16();
    let x = r.headers().get("x-cache").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
    (status, x, r.text().await.unwrap())
}

#[tokio::test]
async fn tenants_never_share_entries_and_query_order_does_not_matter() {
    let s = setup().await;
    let (t1, t2) =
        (s.keys.token("alice", "t1", &["trader"]), s.keys.token("bob", "t2", &["trader"]));
    let (_, x, body) = get(&s, "/api/c/max-age-60?a=1&b=2", &t1, None).await;
    assert_eq!(x, "MISS");
    assert!(body.contains("\"tenant\":\"t1\""));
    let (_, x, again) = get(&s, "/api/c/max-age-60?b=2&a=1", &t1, None).await;
    assert_eq!((x.as_str(), again.as_str()), ("HIT", body.as_str()));
    let (_, x, other) = get(&s, "/api/c/max-age-60?a=1&b=2", &t2, None).await;
    assert_eq!(x, "MISS", "another tenant never gets t1's entry");
    assert!(other.contains("\"tenant\":\"t2\""));
    assert_eq!(s.up.hits.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn max_age_expires_and_no_store_and_private_are_never_stored() {
    let s = setup().await;
    let t = s.keys.token("alice", "t1", &["trader"]);
    assert_eq!(get(&s, "/api/c/max-age-1", &t, None).await.1, "MISS");
    assert_eq!(get(&s, "/api/c/max-age-1", &t, None).await.1, "HIT");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(get(&s, "/api/c/max-age-1", &t, None).await.1, "MISS", "expired");
    for policy in ["no-store", "private_max-age-60", "no-cache"] {
        assert_eq!(get(&s, &format!("/api/c/{policy}"), &t, None).await.1, "MISS");
        assert_eq!(
            get(&s, &format!("/api/c/{policy}"), &t, None).await.1,
            "MISS",
            "{policy} is never stored"
        );
    }
    assert_eq!(
        get(&s, "/api/u/max-age-60", &t, None).await.1,
        "BYPASS",
        "routes without a cache policy"
    );
}

#[tokio::test]
async fn stale_while_revalidate_serves_stale_once_while_one_revalidation_goes_upstream() {
    let s = setup().await;
    let t = s.keys.token("alice", "t1", &["trader"]);
    let path = "/api/c/max-age-1_stale-while-revalidate-30";
    assert_eq!(get(&s, path, &t, None).await.1, "MISS");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    s.up.generation.fetch_add(1, Ordering::SeqCst);
    let before = s.up.hits.load(Ordering::SeqCst);
    let (status, x, body) = get(&s, path, &t, None).await;
    assert_eq!((status, x.as_str()), (200, "STALE"));
    assert!(body.contains("\"hit\":1"), "the stale body: {body}");
    eventually(Duration::from_secs(2), "the revalidation stores the new entry", || async {
        let (_, x, body) = get(&s, path, &t, None).await;
        (x == "HIT" && body.contains("\"hit\":2")).then_some(())
    })
    .await;
    assert_eq!(s.up.hits.load(Ordering::SeqCst) - before, 1, "one revalidation went upstream");
}

#[tokio::test]
async fn clients_if_none_match_gets_304() {
    let s = setup().await;
    let t = s.keys.token("alice", "t1", &["trader"]);
    let (status, x, _) = get(&s, "/api/c/max-age-60", &t, Some("\"g0\"")).await;
    assert_eq!((status, x.as_str()), (304, "MISS"), "a 304 on the miss path too");
    let (status, x, body) = get(&s, "/api/c/max-age-60", &t, Some("\"g0\"")).await;
    assert_eq!((status, x.as_str(), body.as_str()), (304, "HIT", ""));
    let (status, _, _) = get(&s, "/api/c/max-age-60", &t, Some("\"other\"")).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn fifty_concurrent_misses_go_upstream_once() {
    let s = setup().await;
    let t = s.keys.token("alice", "t1", &["trader"]);
    s.up.delay_ms.store(300, Ordering::SeqCst);
    let requests = (0..50).map(|_| get(&s, "/api/c/max-age-60?coalesce=1", &t, None));
    let answers = futures::future::join_all(requests).await;
    assert!(
        answers.iter().all(|(status, _, body)| *status == 200 && body.contains("\"hit\":1")),
        "{answers:?}"
    );
    assert_eq!(s.up.hits.load(Ordering::SeqCst), 1, "one upstream hit for 50 concurrent misses");
    assert_eq!(answers.iter().filter(|a| a.1 == "MISS").count(), 1);
}

#[tokio::test]
async fn purge_by_route_needs_admin_and_empties_the_route() {
    let s = setup().await;
    let t = s.keys.token("alice", "t1", &["trader"]);
    let admin = s.keys.token("root", "t0", &["admin"]);
    get(&s, "/api/c/max-age-60", &t, None).await;
    assert_eq!(get(&s, "/api/c/max-age-60", &t, None).await.1, "HIT");
    let r = http()
        .post(s.gateway.url("/api/v1/cache/purge"))
        .bearer_auth(&t)
        .json(&serde_json::json!({"route": "cached"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = http()
        .post(s.gateway.url("/api/v1/cache/purge"))
        .bearer_auth(&admin)
        .json(&serde_json::json!({"route": "cached"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let purged: serde_json::Value = r.json().await.unwrap();
    assert!(purged["purged"].as_u64().unwrap() >= 1);
    assert_eq!(get(&s, "/api/c/max-age-60", &t, None).await.1, "MISS");
    let stats: serde_json::Value = http()
        .get(s.gateway.url("/api/v1/cache/stats"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        stats["hits"].as_u64().unwrap() >= 1 && stats["misses"].as_u64().unwrap() >= 2,
        "{stats}"
    );
}
