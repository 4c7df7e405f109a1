//! The gateway against real upstream HTTP servers, the real entitlements role (in-process, seeded),
//! the auth role and Redis for revocations, and the metrics role for usage.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use access::role::Role;
use axum::extract::{Path, Request};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::support::{
    closed_port, config, eventually, http, redis_prefix, start, wait_ready, DevKeys, Running,
    REDIS_URL,
};

/// A real upstream: echoes what it received; `/slow` sleeps; `/fail` answers 500.
async fn upstream(hits: Arc<AtomicUsize>) -> String {
    let echo_hits = hits.clone();
    let app = Router::new()
        .route(
            "/prices/latest/{id}",
            get(move |Path(id): Path<String>, req: Request| {
                let hits = echo_hits.clone();
                async move {
                    hits.fetch_add(1, Ordering::SeqCst);
                    let h = |n: &str| req.headers().get(n).and_then(|v| v.to_str().ok()).map(String::from);
                    Json(json!({
                        "instrument": id, "price": 1.0842, "path": req.uri().path(), "query": req.uri().query(),
                        "x-user-id": h("x-user-id"), "x-tenant-id": h("x-tenant-id"), "x-user-roles": h("x-user-roles"),
                        "x-forwarded-for": h("x-forwarded-for"), "x-request-id": h("x-request-id"), "traceparent": h("traceparent"),
                        "host": h("host"), "x-api-key": h("x-api-key"),
                    }))
                }
            }),
        )
        .route("/slow", get(|| async { tokio::time::sleep(Duration::from_secs(2)).await; "late" }))
        .route("/fail", get(|| async { (axum::http::StatusCode::INTERNAL_SERVER_ERROR, "boom") }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

const SEED: &str = r#"
- { name: traders-eurusd, effect: allow, resource: "instrument:EURUSD", actions: [read], roles: [trader], priority: 10 }
- { name: admins, effect: allow, resource: "*", actions: ["*"], roles: [admin], priority: 900 }
"#;

struct Layer {
    _dir: tempfile::TempDir,
    keys: DevKeys,
    gateway: Running,
    entitlements: Running,
    routes_file: std::path::PathBuf,
    hits: Arc<AtomicUsize>,
    upstream: String,
    prefix: String,
}

fn routes_yaml(upstream: &str, refused: u16) -> String {
    format!(
        r#"
- {{ name: prices, path: "/api/v1/prices/latest/{{instrument_id}}", methods: [GET, HEAD], upstreams: ["{upstream}"], strip_prefix: /api/v1, entitlement: {{ resource: "instrument:{{instrument_id}}" }} }}
- {{ name: slow, path: /api/v1/slow, upstreams: ["{upstream}"], strip_prefix: /api/v1, timeout: 300ms, auth: none }}
- {{ name: refused, path: /api/v1/refused, upstreams: ["http://127.0.0.1:{refused}"], strip_prefix: /api/v1, auth: none, retries: 0 }}
- {{ name: flaky, path: /api/v1/fail, upstreams: ["{upstream}"], strip_prefix: /api/v1, auth: none }}
"#
    )
}

async fn layer(extra: &[(&str, &str)]) -> Layer {
    let dir = tempfile::tempdir().unwrap();
    let keys = DevKeys::new();
    let seed = dir.path().join("seed.yaml");
    std::fs::write(&seed, SEED).unwrap();
    let seed = seed.display().to_string();
    let prefix = redis_prefix();
    let entitlements = start(
        Role::Entitlements,
        config(&[
            ("ACCESS_AUTH__DEV_KEY_FILE", &keys.path),
            ("ACCESS_ENTITLEMENTS__SEED_FILE", &seed),
            ("ACCESS_REDIS_URL", REDIS_URL),
            ("ACCESS_REDIS__PREFIX", &prefix),
        ]),
    )
    .await;
    wait_ready(&entitlements.url("")).await;
    let hits = Arc::new(AtomicUsize::new(0));
    let upstream = upstream(hits.clone()).await;
    let routes_file = dir.path().join("routes.yaml");
    std::fs::write(&routes_file, routes_yaml(&upstream, closed_port().await)).unwrap();
    let routes = routes_file.display().to_string();
    let ent_url = entitlements.url("");
    let mut env = vec![
        ("ACCESS_AUTH__DEV_KEY_FILE", keys.path.as_str()),
        ("ACCESS_GATEWAY__ROUTES_FILE", routes.as_str()),
        ("ACCESS_ENTITLEMENTS_SERVICE_URL", ent_url.as_str()),
        ("ACCESS_REDIS_URL", REDIS_URL),
        ("ACCESS_REDIS__PREFIX", prefix.as_str()),
        ("ACCESS_GATEWAY__BREAKER__CONSECUTIVE_FAILURES", "3"),
        ("ACCESS_GATEWAY__BREAKER__OPEN_FOR", "500ms"),
    ];
    env.extend_from_slice(extra);
    let gateway = start(Role::Gateway, config(&env)).await;
    wait_ready(&gateway.url("")).await;
    Layer { _dir: dir, keys, gateway, entitlements, routes_file, hits, upstream, prefix }
}

async fn get_json(url: &str, token: Option<&str>) -> (u16, Value, reqwest::header::HeaderMap) {
    let mut r = http().get(url);
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    let response = r.send().await.unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    (status, response.json().await.unwrap_or(Value::Null), headers)
}

#[tokio::test]
async fn each_status_path_answers_with_the_json_error_contract() {
    let l = layer(&[]).await;
    let g = &l.gateway;
    let trader = l.keys.token("alice", "t1", &["trader"]);

    let (status, body, headers) =
        get_json(&g.url("/api/v1/prices/latest/EURUSD?fields=bid"), Some(&trader)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["path"], "/prices/latest/EURUSD", "prefix stripped");
    assert_eq!(body["query"], "fields=bid");
    assert_eq!(
        (body["x-user-id"].as_str(), body["x-tenant-id"].as_str(), body["x-user-roles"].as_str()),
        (Some("alice"), Some("t1"), Some("trader"))
    );
    assert_eq!(body["x-forwarded-for"], "127.0.0.1");
    assert_eq!(
        body["x-request-id"].as_str(),
        headers.get("x-request-id").and_then(|v| v.to_str().ok()),
        "request id passed on and echoed"
    );
    assert_eq!(body["host"].as_str(), Some(l.upstream.trim_start_matches("http://")));

    let cases: Vec<(&str, Option<&str>, u16, &str)> = vec![
        ("/api/v2/unknown", Some(&trader), 404, "not_found"),
        ("/api/v1/prices/latest/EURUSD", None, 401, "unauthenticated"),
        ("/api/v1/prices/latest/EURUSD", Some("not-a-token"), 401, "unauthenticated"),
        ("/api/v1/prices/latest/USDJPY", Some(&trader), 403, "forbidden"),
        ("/api/v1/refused", None, 502, "upstream_unavailable"),
        ("/api/v1/slow", None, 504, "upstream_timeout"),
    ];
    for (path, token, expected, code) in cases {
        let (status, body, _) = get_json(&g.url(path), token).await;
        assert_eq!((status, body["code"].as_str()), (expected, Some(code)), "{path}: {body}");
        assert!(body["message"].is_string());
    }
    let (_, body, _) = get_json(&g.url("/api/v1/refused"), None).await;
    assert_eq!(body["side"], "upstream", "502 says the upstream failed");
    assert!(!body.to_string().contains("127.0.0.1"), "no internals: {body}");
    let r = http()
        .post(g.url("/api/v1/prices/latest/EURUSD"))
        .bearer_auth(&trader)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
}

#[tokio::test]
async fn spoofed_identity_headers_are_replaced_and_forwarding_is_trusted_only_from_proxies() {
    let l = layer(&[]).await;
    let trader = l.keys.token("alice", "t1", &["trader"]);
    let r = http()
        .get(l.gateway.url("/api/v1/prices/latest/EURUSD"))
        .bearer_auth(&trader)
        .header("x-user-id", "root")
        .header("x-tenant-id", "t-other")
        .header("x-user-roles", "admin")
        .header("x-forwarded-for", "6.6.6.6")
        .send()
        .await
        .unwrap();
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        (body["x-user-id"].as_str(), body["x-tenant-id"].as_str(), body["x-user-roles"].as_str()),
        (Some("alice"), Some("t1"), Some("trader"))
    );
    assert_eq!(
        body["x-forwarded-for"], "127.0.0.1",
        "an untrusted peer's X-Forwarded-For is ignored"
    );

    let trusting = layer(&[("ACCESS_GATEWAY__TRUSTED_PROXIES", "[\"127.0.0.0/8\"]")]).await;
    let trader = trusting.keys.token("alice", "t1", &["trader"]);
    let r = http()
        .get(trusting.gateway.url("/api/v1/prices/latest/EURUSD"))
        .bearer_auth(&trader)
        .header("x-forwarded-for", "203.0.113.7, 127.0.0.2")
        .send()
        .await
        .unwrap();
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["x-forwarded-for"], "203.0.113.7", "the client behind trusted proxies");
}

#[tokio::test]
async fn a_revoked_token_is_refused_within_a_second() {
    let l = layer(&[]).await;
    let auth = start(
        Role::Auth,
        config(&[
            ("ACCESS_AUTH__DEV_KEY_FILE", &l.keys.path),
            ("ACCESS_REDIS_URL", REDIS_URL),
            ("ACCESS_REDIS__PREFIX", &l.prefix),
        ]),
    )
    .await;
    wait_ready(&auth.url("")).await;
    let trader = l.keys.token("alice", "t1", &["trader"]);
    let url = l.gateway.url("/api/v1/prices/latest/EURUSD");
    assert_eq!(get_json(&url, Some(&trader)).await.0, 200);
    assert_eq!(
        http().post(auth.url("/auth/logout")).bearer_auth(&trader).send().await.unwrap().status(),
        200
    );
    let refused =
        eventually(Duration::from_secs(1), "the gateway refuses the revoked token", || async {
            let (status, body, _) = get_json(&url, Some(&trader)).await;
            (status == 401).then_some(body)
        })
        .await;
    assert_eq!(refused["reason"], "revoked");
    assert_eq!(refused["message"], "the token has been revoked");
}

#[tokio::test]
async fn the_breaker_opens_on_failures_and_closes_after_a_good_probe() {
    let l = layer(&[]).await;
    let url = l.gateway.url("/api/v1/fail");
    for _ in 0..3 {
        assert_eq!(get_json(&url, None).await.0, 500, "upstream 5xx are passed on");
    }
    let (status, body, headers) = get_json(&url, None).await;
    assert_eq!((status, body["code"].as_str()), (503, Some("circuit_open")), "{body}");
    assert!(headers.contains_key("retry-after"));
    let admin = l.keys.token("root", "t0", &["admin"]);
    let (_, breakers, _) = get_json(&l.gateway.url("/api/v1/circuit-breakers"), Some(&admin)).await;
    assert_eq!(breakers["circuit_breakers"][0]["state"], "open", "{breakers}");
    // The same upstream serves the prices route: once open_for passes, a good probe closes it.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let trader = l.keys.token("alice", "t1", &["trader"]);
    assert_eq!(
        get_json(&l.gateway.url("/api/v1/prices/latest/EURUSD"), Some(&trader)).await.0,
        200
    );
    let (_, breakers, _) = get_json(&l.gateway.url("/api/v1/circuit-breakers"), Some(&admin)).await;
    assert_eq!(breakers["circuit_breakers"][0]["state"], "closed", "{breakers}");
    let text = http().get(l.gateway.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(
        text.contains(
            "access_gateway_circuit_breaker_state{role=\"gateway\",upstream=\"127.0.0.1:"
        ),
        "{text}"
    );
}

#[tokio::test]
async fn cors_preflights_are_answered_before_auth() {
    let l = layer(&[("ACCESS_GATEWAY__CORS_ORIGINS", "[\"https://app.254carbon.local\"]")]).await;
    let r = http()
        .request(reqwest::Method::OPTIONS, l.gateway.url("/api/v1/prices/latest/EURUSD"))
        .header("origin", "https://app.254carbon.local")
        .header("access-control-request-method", "GET")
        .header("access-control-request-headers", "authorization")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["access-control-allow-origin"], "https://app.254carbon.local");
    let r = http()
        .request(reqwest::Method::OPTIONS, l.gateway.url("/api/v1/prices/latest/EURUSD"))
        .header("origin", "https://evil.example")
        .header("access-control-request-method", "GET")
        .send()
        .await
        .unwrap();
    assert!(!r.headers().contains_key("access-control-allow-origin"));
}

#[tokio::test]
async fn decisions_outlive_the_entitlements_role_and_without_rules_fail_closed_unless_configured_open(
) {
    let l = layer(&[]).await;
    let trader = l.keys.token("alice", "t1", &["trader"]);
    l.entitlements.shutdown().stop();
    eventually(Duration::from_secs(3), "the entitlements role is gone", || async {
        http().get(l.entitlements.url("/health")).send().await.is_err().then_some(())
    })
    .await;
    // The gateway decides from its own copy of the rules: a decision never asked before is made
    // at the version it holds.
    let admin = l.keys.token("root", "t0", &["admin"]);
    let (status, body, headers) =
        get_json(&l.gateway.url("/api/v1/prices/latest/GBPUSD"), Some(&admin)).await;
    assert_eq!(status, 200, "{body}");
    assert!(headers.contains_key("x-entitlements-version"));

    // A gateway that never got the rules cannot decide: 503, nothing forwarded.
    let before = l.hits.load(Ordering::SeqCst);
    let closed = layer_with_keys(&l, &[]).await;
    let (status, body, _) =
        get_json(&closed.url("/api/v1/prices/latest/EURUSD"), Some(&trader)).await;
    assert_eq!((status, body["code"].as_str()), (503, Some("dependency_unavailable")), "{body}");
    assert_eq!(l.hits.load(Ordering::SeqCst), before);
    // Unless configured to fail open.
    let open = layer_with_keys(&l, &[("ACCESS_GATEWAY__ENTITLEMENTS_FAIL_OPEN", "true")]).await;
    assert_eq!(get_json(&open.url("/api/v1/prices/latest/EURUSD"), Some(&trader)).await.0, 200);
}

#[tokio::test]
async fn operators_see_status_routes_and_breakers() {
    let l = layer(&[]).await;
    let admin = l.keys.token("root", "t0", &["admin"]);
    let trader = l.keys.token("alice", "t1", &["trader"]);
    assert_eq!(get_json(&l.gateway.url("/api/v1/status"), Some(&trader)).await.0, 403);
    let (status, body, _) = get_json(&l.gateway.url("/api/v1/status"), Some(&admin)).await;
    assert_eq!(status, 200);
    assert_eq!(body["dependencies"]["entitlements"]["ready"], true);
    assert_eq!(body["dependencies"]["jwks"]["loaded"], true);
    let (_, routes, _) = get_json(&l.gateway.url("/api/v1/metadata/routes"), Some(&admin)).await;
    let names: Vec<_> =
        routes["routes"].as_array().unwrap().iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert_eq!(names, vec!["prices", "slow", "refused", "flaky"]);
    let text = http().get(l.gateway.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(
        !text.contains("alice") && !text.contains("/api/v1/prices/latest/EURUSD"),
        "no user id or raw path as a label"
    );
}

#[tokio::test]
async fn usage_is_pushed_to_the_metrics_role() {
    let l = layer(&[]).await;
    let metrics =
        start(Role::Metrics, config(&[("ACCESS_AUTH__DEV_KEY_FILE", &l.keys.path)])).await;
    wait_ready(&metrics.url("")).await;
    let gateway = layer_with_keys(
        &l,
        &[
            ("ACCESS_METRICS_SERVICE_URL", &metrics.url("")),
            ("ACCESS_GATEWAY__USAGE_INTERVAL", "200ms"),
        ],
    )
    .await;
    let trader = l.keys.token("alice", "t1", &["trader"]);
    for _ in 0..3 {
        assert_eq!(
            get_json(&gateway.url("/api/v1/prices/latest/EURUSD"), Some(&trader)).await.0,
            200
        );
    }
    // The three requests may be pushed in one report or two: wait for all three.
    let line = eventually(Duration::from_secs(3), "usage reaches the metrics role", || async {
        let text = http().get(metrics.url("/metrics")).send().await.unwrap().text().await.unwrap();
        text.lines()
            .find(|l| {
                l.starts_with("access_usage_requests_total{") && l.contains("tenant_id=\"t1\"")
            })
            .filter(|l| l.ends_with(" 3"))
            .map(String::from)
    })
    .await;
    assert!(
        line.contains("route=\"prices\"")
            && line.contains("status_class=\"2xx\"")
            && line.ends_with(" 3"),
        "{line}"
    );
}

#[tokio::test]
async fn routes_reload_on_sighup_under_load_without_a_failed_request() {
    let l = layer(&[]).await;
    let routes = l.routes_file.display().to_string();
    let ent = l.entitlements.url("");
    let mut p = crate::support::spawn_binary(
        "gateway",
        &[
            ("ACCESS_AUTH__DEV_KEY_FILE", &l.keys.path),
            ("ACCESS_GATEWAY__ROUTES_FILE", &routes),
            ("ACCESS_ENTITLEMENTS_SERVICE_URL", &ent),
            // The load is one caller from one address: lift the limits out of its way.
            ("ACCESS_GATEWAY__RATE_LIMITS__AUTHENTICATED__RATE", "1000000"),
            ("ACCESS_GATEWAY__RATE_LIMITS__AUTHENTICATED__PERIOD", "1s"),
            ("ACCESS_GATEWAY__RATE_LIMITS__AUTHENTICATED__BURST", "1000000"),
            ("ACCESS_GATEWAY__IP_LIMIT__RATE", "1000000"),
            ("ACCESS_GATEWAY__IP_LIMIT__PERIOD", "1s"),
            ("ACCESS_GATEWAY__IP_LIMIT__BURST", "1000000"),
        ],
    );
    wait_ready(&p.url).await;
    let trader = l.keys.token("alice", "t1", &["trader"]);
    assert_eq!(
        get_json(&format!("{}/api/v1/renamed/prices/latest/EURUSD", p.url), Some(&trader)).await.0,
        404
    );

    // Load: four clients hitting the prices route while the table changes under them.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load: Vec<_> = (0..4)
        .map(|_| {
            let (url, token, stop) =
                (format!("{}/api/v1/prices/latest/EURUSD", p.url), trader.clone(), stop.clone());
            tokio::spawn(async move {
                let client = reqwest::Client::new();
                let (mut ok, mut failed) = (0, 0);
                while !stop.load(Ordering::SeqCst) {
                    match client.get(&url).bearer_auth(&token).send().await {
                        Ok(r) if r.status() == 200 => ok += 1,
                        _ => failed += 1,
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A bad file is refused and the old table kept...
    std::fs::write(&l.routes_file, "- { name: broken, path: no-slash }\n").unwrap();
    let pid = p.child.id().to_string();
    assert!(std::process::Command::new("kill").args(["-HUP", &pid]).status().unwrap().success());
    tokio::time::sleep(Duration::from_millis(300)).await;
    // ...and a good one replaces it.
    let renamed = format!("{}\n- {{ name: renamed, path: \"/api/v1/renamed/prices/latest/{{instrument_id}}\", upstreams: [\"{}\"], strip_prefix: /api/v1/renamed, entitlement: {{ resource: \"instrument:{{instrument_id}}\" }} }}\n", routes_yaml(&l.upstream, closed_port().await), l.upstream);
    std::fs::write(&l.routes_file, renamed).unwrap();
    assert!(std::process::Command::new("kill").args(["-HUP", &pid]).status().unwrap().success());
    let reloaded = eventually(Duration::from_secs(3), "the new route serves", || async {
        let (status, body, _) =
            get_json(&format!("{}/api/v1/renamed/prices/latest/EURUSD", p.url), Some(&trader))
                .await;
        (status == 200).then_some(body)
    })
    .await;
    assert_eq!(reloaded["path"], "/prices/latest/EURUSD", "{reloaded}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::SeqCst);
    let (mut ok, mut failed) = (0, 0);
    for task in load {
        let (o, f) = task.await.unwrap();
        ok += o;
        failed += f;
    }
    assert!(ok > 20, "the load ran: {ok}");
    assert_eq!(failed, 0, "{failed} of {} requests failed during the reloads", ok + failed);
    assert_eq!(p.terminate(Duration::from_secs(10)).await.code(), Some(0));
}

/// Another gateway over `l`'s upstream, entitlements and keys, with more settings.
async fn layer_with_keys(l: &Layer, extra: &[(&str, &str)]) -> Running {
    let routes = l.routes_file.display().to_string();
    let ent = l.entitlements.url("");
    let mut env = vec![
        ("ACCESS_AUTH__DEV_KEY_FILE", l.keys.path.as_str()),
        ("ACCESS_GATEWAY__ROUTES_FILE", routes.as_str()),
        ("ACCESS_ENTITLEMENTS_SERVICE_URL", ent.as_str()),
    ];
    env.extend_from_slice(extra);
    let g = start(Role::Gateway, config(&env)).await;
    wait_ready(&g.url("")).await;
    g
}

#[tokio::test]
async fn a_rules_change_reaches_the_gateways_decision_cache_at_once() {
    let l = layer(&[]).await;
    let trader = l.keys.token("alice", "t1", &["trader"]);
    let url = l.gateway.url("/api/v1/prices/latest/EURUSD");
    let (status, _, headers) = get_json(&url, Some(&trader)).await;
    assert_eq!(status, 200);
    let version = |h: &reqwest::header::HeaderMap| -> i64 {
        h["x-entitlements-version"].to_str().unwrap().parse().unwrap()
    };
    let before = version(&headers);
    let admin = l.keys.token("root", "t0", &["admin"]);
    let r = http()
        .post(l.entitlements.url("/entitlements/rules"))
        .bearer_auth(&admin)
        .json(&json!({"name": "freeze-eurusd", "effect": "deny", "resource": "instrument:EURUSD", "actions": ["*"], "priority": 500}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    eventually(Duration::from_secs(1), "the gateway refuses after the rules change", || async {
        (get_json(&url, Some(&trader)).await.0 == 403).then_some(())
    })
    .await;
    // Every decision after that is made at the new version, and says so.
    let (status, _, headers) = get_json(&url, Some(&admin)).await;
    assert_eq!(status, 200);
    let after = version(&headers);
    assert!(after > before, "{before} {headers:?}");
    let (_, standing, _) = get_json(&l.gateway.url("/entitlements/version"), Some(&trader)).await;
    assert_eq!(standing["role"], "gateway");
    assert_eq!(standing["rules_version"].as_i64(), Some(after), "{standing}");
}

#[tokio::test]
async fn api_key_lifecycle_create_use_rotate_with_overlap_revoke() {
    let db = crate::support::Db::new().await;
    let l = layer(&[("ACCESS_POSTGRES_DSN", &db.dsn)]).await;
    let auth = start(
        Role::Auth,
        config(&[("ACCESS_AUTH__DEV_KEY_FILE", &l.keys.path), ("ACCESS_POSTGRES_DSN", &db.dsn)]),
    )
    .await;
    wait_ready(&auth.url("")).await;
    let admin = l.keys.token("root", "t0", &["admin"]);
    let trader = l.keys.token("alice", "t1", &["trader"]);

    let r = http()
        .post(auth.url("/auth/api-keys"))
        .bearer_auth(&trader)
        .json(&json!({"name": "x", "tenant_id": "t1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "only admins manage keys");
    let r = http()
        .post(auth.url("/auth/api-keys"))
        .bearer_auth(&admin)
        .json(&json!({"name": "pricing-bot", "tenant_id": "t1", "roles": ["trader"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let created: Value = r.json().await.unwrap();
    let (id, key) =
        (created["id"].as_str().unwrap().to_string(), created["key"].as_str().unwrap().to_string());
    assert!(key.starts_with(&format!("ak_{id}_")));
    let (_, listed, _) = get_json(&auth.url("/auth/api-keys"), Some(&admin)).await;
    assert_eq!(listed["api_keys"][0]["id"], id.as_str());
    assert!(
        !listed.to_string().contains(&key[key.len() - 20..]),
        "the secret is shown once, never listed"
    );

    let use_key = |k: String| {
        let url = l.gateway.url("/api/v1/prices/latest/EURUSD");
        async move {
            let r = http().get(url).header("x-api-key", k).send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let (status, body) = use_key(key.clone()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["x-user-id"], format!("apikey:{id}"));
    assert_eq!(body["x-tenant-id"], "t1");
    assert_eq!(body["x-api-key"], Value::Null, "the key is not forwarded upstream");
    // A refused key is told in API-key words, not a JWT's.
    let (status, wrong) = use_key(format!("ak_{id}_wrong")).await;
    assert_eq!((status, wrong["reason"].as_str()), (401, Some("bad_signature")), "{wrong}");
    assert_eq!(wrong["message"], "the API key's secret does not match", "{wrong}");
    let (status, unknown) = use_key("ak_nosuchkey_secret".into()).await;
    assert_eq!((status, unknown["reason"].as_str()), (401, Some("unknown_key")), "{unknown}");
    assert_eq!(unknown["message"], "no API key has this id", "{unknown}");
    let (status, malformed) = use_key("not-a-key".into()).await;
    assert_eq!((status, malformed["reason"].as_str()), (401, Some("malformed")), "{malformed}");
    assert!(malformed["message"].as_str().unwrap().contains("API key"), "{malformed}");

    let r = http()
        .post(auth.url(&format!("/auth/api-keys/{id}/rotate")))
        .bearer_auth(&admin)
        .json(&json!({"overlap": "1h"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let rotated: Value = r.json().await.unwrap();
    let new_key = rotated["key"].as_str().unwrap().to_string();
    assert_ne!(new_key, key);
    assert_eq!(use_key(new_key.clone()).await.0, 200);
    assert_eq!(use_key(key.clone()).await.0, 200, "the old key works during the overlap");
    let r = http()
        .post(auth.url(&format!("/auth/api-keys/{id}/rotate")))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    let newest = r.json::<Value>().await.unwrap()["key"].as_str().unwrap().to_string();
    eventually(
        Duration::from_secs(2),
        "a rotation without overlap retires the previous key",
        || async { (use_key(new_key.clone()).await.0 == 401).then_some(()) },
    )
    .await;
    assert_eq!(use_key(newest.clone()).await.0, 200);

    let r = http()
        .delete(auth.url(&format!("/auth/api-keys/{id}")))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let refused = eventually(Duration::from_secs(2), "the revoked key is refused", || async {
        let (status, body) = use_key(newest.clone()).await;
        (status == 401).then_some(body)
    })
    .await;
    assert_eq!(refused["reason"], "revoked");
    assert_eq!(refused["message"], "the API key has been revoked");

    let (_, audit, _) =
        get_json(&auth.url(&format!("/auth/api-keys/{id}/audit")), Some(&admin)).await;
    let actions: Vec<_> =
        audit["audit"].as_array().unwrap().iter().map(|a| a["action"].as_str().unwrap()).collect();
    assert_eq!(actions, vec!["create", "rotate", "rotate", "revoke"]);
    assert_eq!(audit["audit"][0]["actor"], "root");
    let (_, listed, _) = get_json(&auth.url("/auth/api-keys"), Some(&admin)).await;
    assert!(listed["api_keys"][0]["last_used_at"].is_string(), "last use recorded: {listed}");
}
