//! The entitlements role against the real PostgreSQL (a database per test) and Redis.

use std::time::{Duration, Instant};

use access::role::Role;
use serde_json::{json, Value};

use crate::support::{
    config, eventually, http, redis_prefix, start, wait_ready, Db, DevKeys, PrivatePostgres,
    Running, REDIS_URL,
};

async fn role(keys: &DevKeys, dsn: Option<&str>, extra: &[(&str, &str)]) -> Running {
    let prefix = redis_prefix();
    let mut env = vec![
        ("ACCESS_AUTH__DEV_KEY_FILE", keys.path.as_str()),
        ("ACCESS_REDIS__PREFIX", prefix.as_str()),
    ];
    if let Some(dsn) = dsn {
        env.push(("ACCESS_POSTGRES_DSN", dsn));
    }
    env.extend_from_slice(extra);
    let s = start(Role::Entitlements, config(&env)).await;
    wait_ready(&s.url("")).await;
    s
}

fn rule(name: &str, body: Value) -> Value {
    let mut r = json!({"name": name, "effect": "allow", "resource": "instrument:*", "actions": ["read"], "priority": 10});
    for (k, v) in body.as_object().unwrap() {
        r[k] = v.clone();
    }
    r
}

struct Api<'a> {
    s: &'a Running,
    token: String,
}

impl Api<'_> {
    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
        if_match: Option<&str>,
    ) -> (u16, Value, Option<String>) {
        let mut r = http().request(method, self.s.url(path)).bearer_auth(&self.token);
        if let Some(body) = body {
            r = r.json(&body);
        }
        if let Some(tag) = if_match {
            r = r.header("if-match", tag);
        }
        let response = r.send().await.unwrap();
        let status = response.status().as_u16();
        let etag = response.headers().get("etag").map(|v| v.to_str().unwrap().to_string());
        let text = response.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null), etag)
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let (s, v, _) = self.send(reqwest::Method::POST, path, Some(body), None).await;
        (s, v)
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        let (s, v, _) = self.send(reqwest::Method::GET, path, None, None).await;
        (s, v)
    }

    async fn check(&self, user: &str, tenant: &str, resource: &str, action: &str) -> Value {
        let (status, v) = self
            .post("/entitlements/check", json!({"user_id": user, "tenant_id": tenant, "roles": [], "resource": resource, "action": action}))
            .await;
        assert_eq!(status, 200, "{v}");
        v
    }
}

#[tokio::test]
async fn crud_round_trip_with_audit_rows_and_optimistic_concurrency() {
    let db = Db::new().await;
    let keys = DevKeys::new();
    let s = role(&keys, Some(&db.dsn), &[("ACCESS_REDIS_URL", REDIS_URL)]).await;
    let admin = Api { s: &s, token: keys.token("root", "t0", &["admin"]) };

    let (status, created, etag) = admin
        .send(
            reqwest::Method::POST,
            "/entitlements/rules",
            Some(rule("eurusd", json!({"tenant_id": "t1"}))),
            None,
        )
        .await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(etag.as_deref(), Some("\"1\""));
    let id = created["id"].as_str().unwrap().to_string();
    assert_eq!(created["version"], 1);
    assert!(created["created_at"].is_string() && created["updated_at"].is_string());

    let (status, got) = admin.get(&format!("/entitlements/rules/{id}")).await;
    assert_eq!((status, &got["name"]), (200, &json!("eurusd")));
    let (_, listed) = admin.get("/entitlements/rules?tenant_id=t1").await;
    assert_eq!(listed["total"], 1);
    let (_, listed) = admin.get("/entitlements/rules?tenant_id=t2").await;
    assert_eq!(listed["total"], 0);
    let (_, listed) = admin.get("/entitlements/rules?resource=instrument:EURUSD&limit=10").await;
    assert_eq!(listed["total"], 1);

    let (status, updated, etag) = admin
        .send(
            reqwest::Method::PUT,
            &format!("/entitlements/rules/{id}"),
            Some(rule("eurusd", json!({"priority": 20}))),
            Some("\"1\""),
        )
        .await;
    assert_eq!(status, 200, "{updated}");
    assert_eq!(
        (updated["version"].as_i64(), updated["priority"].as_i64(), etag.as_deref()),
        (Some(2), Some(20), Some("\"2\""))
    );
    let (status, stale, _) = admin
        .send(
            reqwest::Method::PUT,
            &format!("/entitlements/rules/{id}"),
            Some(rule("eurusd", json!({"priority": 30}))),
            Some("\"1\""),
        )
        .await;
    assert_eq!((status, stale["code"].as_str()), (409, Some("conflict")));
    let (status, _, _) = admin
        .send(
            reqwest::Method::PUT,
            &format!("/entitlements/rules/{id}"),
            Some(rule("eurusd", json!({"version": 1}))),
            None,
        )
        .await;
    assert_eq!(status, 409, "a stale body version is a conflict too");

    let (status, history) = admin.get(&format!("/entitlements/rules/{id}/history")).await;
    assert_eq!(status, 200);
    let changes: Vec<_> = history["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["change"].as_str().unwrap())
        .collect();
    assert_eq!(changes, vec!["create", "update"]);
    assert_eq!(history["history"][1]["actor"], "root");
    assert_eq!(history["history"][1]["old"]["priority"], 10);
    assert_eq!(history["history"][1]["new"]["priority"], 20);

    let (status, _, _) = admin
        .send(reqwest::Method::DELETE, &format!("/entitlements/rules/{id}"), None, Some("\"1\""))
        .await;
    assert_eq!(status, 409);
    let (status, _, _) = admin
        .send(reqwest::Method::DELETE, &format!("/entitlements/rules/{id}"), None, Some("\"2\""))
        .await;
    assert_eq!(status, 204);
    assert_eq!(admin.get(&format!("/entitlements/rules/{id}")).await.0, 404);

    // The audit rows are in PostgreSQL, one per change, each with the version it produced.
    let client = db.client().await;
    let rows = client
        .query("SELECT change, actor, rules_version FROM access_rules_audit ORDER BY id", &[])
        .await
        .unwrap();
    let audit: Vec<(String, String, i64)> =
        rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect();
    assert_eq!(
        audit.iter().map(|a| a.0.as_str()).collect::<Vec<_>>(),
        vec!["create", "update", "delete"]
    );
    assert!(audit.windows(2).all(|w| w[0].2 < w[1].2), "versions increase: {audit:?}");
    let (_, stats) = admin.get("/entitlements/stats").await;
    assert_eq!(stats["rules_version"], audit[2].2);
    assert_eq!(stats["store"], "postgres");
}

#[tokio::test]
async fn checks_carry_their_decision_and_callers_may_only_check_themselves() {
    let db = Db::new().await;
    let keys = DevKeys::new();
    let s = role(&keys, Some(&db.dsn), &[("ACCESS_REDIS_URL", REDIS_URL)]).await;
    let admin = Api { s: &s, token: keys.token("root", "t0", &["admin"]) };
    let (_, allow) =
        admin.post("/entitlements/rules", rule("traders", json!({"roles": ["trader"]}))).await;
    admin
        .post(
            "/entitlements/rules",
            rule(
                "no-jpy",
                json!({"resource": "instrument:USDJPY", "effect": "deny", "priority": 50}),
            ),
        )
        .await;

    let service = Api { s: &s, token: keys.token("service:gateway", "platform", &["service"]) };
    let (status, d) = service
        .post("/entitlements/check", json!({"user_id": "alice", "tenant_id": "t1", "roles": ["trader"], "resource": "instrument:EURUSD", "action": "read"}))
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        (d["allowed"].as_bool(), d["reason"].as_str()),
        (Some(true), Some("allowed_by_rule"))
    );
    assert_eq!(d["rule_id"], allow["id"]);
    assert!(
        d["decision_id"].is_string()
            && d["rules_version"].as_i64().unwrap() >= 2
            && d["ttl_seconds"] == 30
    );
    assert_eq!(d["cached"], false);
    let (_, again) = service
        .post("/entitlements/check", json!({"user_id": "alice", "tenant_id": "t1", "roles": ["trader"], "resource": "instrument:EURUSD", "action": "read"}))
        .await;
    assert_eq!(
        (again["cached"].as_bool(), &again["decision_id"]),
        (Some(true), &d["decision_id"]),
        "the second is from Redis"
    );

    let alice = Api { s: &s, token: keys.token("alice", "t1", &["trader"]) };
    let own = alice.check("alice", "t1", "instrument:EURUSD", "read").await;
    assert_eq!(own["allowed"], true);
    assert_eq!(
        alice.check("alice", "t1", "instrument:USDJPY", "read").await["reason"],
        "denied_by_rule"
    );
    assert_eq!(
        alice.check("alice", "t1", "instrument:EURUSD", "write").await["reason"],
        "default_deny"
    );
    let (status, v) = alice
        .post("/entitlements/check", json!({"user_id": "bob", "tenant_id": "t1", "resource": "instrument:EURUSD", "action": "read"}))
        .await;
    assert_eq!((status, v["code"].as_str()), (403, Some("forbidden")));
    // A user cannot grant itself roles in the request: its token's roles are used.
    let viewer = Api { s: &s, token: keys.token("vera", "t1", &["viewer"]) };
    let (_, v) = viewer
        .post("/entitlements/check", json!({"user_id": "vera", "tenant_id": "t1", "roles": ["trader"], "resource": "instrument:EURUSD", "action": "read"}))
        .await;
    assert_eq!(v["allowed"], false);

    let (_, before) = service.get("/entitlements/stats").await;
    let (status, batch) = service
        .post(
            "/entitlements/check/batch",
            json!({"checks": [
                {"id": "a", "user_id": "alice", "tenant_id": "t1", "roles": ["trader"], "resource": "instrument:EURUSD", "action": "read"},
                {"id": 2, "user_id": "alice", "tenant_id": "t1", "roles": ["trader"], "resource": "instrument:USDJPY", "action": "read"},
                {"id": "bad", "user_id": "alice"},
                {"id": "odd", "user_id": "alice", "tenant_id": "t1", "resource": "instrument:EURUSD", "action": "read", "admin": true},
                {"id": {"n": 1}, "user_id": "alice", "tenant_id": "t1", "roles": ["trader"], "resource": "instrument:EURUSD", "action": "read", "context": {"desk": "x"}}
            ]}),
        )
        .await;
    assert_eq!(status, 200);
    let results = batch["results"].as_array().unwrap();
    assert_eq!(results.len(), 5);
    // A field a check does not have fails that item alone.
    assert_eq!(
        (
            &results[3]["id"],
            results[3]["error"]["code"].as_str(),
            results[3]["error"]["field"].as_str()
        ),
        (&json!("odd"), Some("validation_failed"), Some("checks[3]"))
    );
    assert!(results[3]["error"]["message"].as_str().unwrap().contains("admin"), "{batch}");
    // Any JSON value is echoed as the correlation id.
    assert_eq!(
        (&results[4]["id"], results[4]["allowed"].as_bool()),
        (&json!({"n": 1}), Some(true))
    );
    // The decided items are counted, once each; the failed ones are not.
    let (_, after) = service.get("/entitlements/stats").await;
    let moved = |field: &str| after[field].as_u64().unwrap() - before[field].as_u64().unwrap();
    assert_eq!((moved("checks"), moved("allowed"), moved("denied")), (3, 2, 1), "{after}");
    assert_eq!(
        (results[0]["id"].as_str(), results[0]["allowed"].as_bool()),
        (Some("a"), Some(true))
    );
    assert_eq!(
        (results[1]["id"].as_i64(), results[1]["allowed"].as_bool()),
        (Some(2), Some(false))
    );
    assert_eq!(
        (results[2]["id"].as_str(), results[2]["error"]["code"].as_str()),
        (Some("bad"), Some("validation_failed"))
    );

    let (status, r) = alice
        .post(
            "/entitlements/resources",
            json!({"user_id": "alice", "tenant_id": "t1", "action": "read", "resources": ["instrument:EURUSD", "instrument:USDJPY", "curve:x"]}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(r["allowed"], json!(["instrument:EURUSD"]));
    assert_eq!(r["denied"], json!(["instrument:USDJPY", "curve:x"]));

    // No token at all, or a bad one: 401.
    let r = http().post(s.url("/entitlements/check")).json(&json!({})).send().await.unwrap();
    assert_eq!(r.status(), 401);
    // Only admins change rules.
    assert_eq!(alice.post("/entitlements/rules", rule("mine", json!({}))).await.0, 403);
    assert_eq!(alice.get("/entitlements/rules").await.0, 403);
}

#[tokio::test]
async fn bad_input_is_refused_and_changes_nothing() {
    let db = Db::new().await;
    let keys = DevKeys::new();
    let s = role(&keys, Some(&db.dsn), &[("ACCESS_SERVER__MAX_BODY_BYTES", "4096")]).await;
    let admin = Api { s: &s, token: keys.token("root", "t0", &["admin"]) };
    admin.post("/entitlements/rules", rule("seed", json!({}))).await;
    let (_, before) = admin.get("/entitlements/stats").await;

    let cases = [
        (
            rule(
                "x",
                json!({"conditions": [{"field": "context.a", "operator": "resembles", "value": 1}]}),
            ),
            "conditions",
        ),
        (rule("x", json!({"resource": "curve:**"})), "resource"),
        (rule("x", json!({"actions": ["fly"]})), "actions[0]"),
        (
            rule(
                "x",
                json!({"conditions": [{"field": "context.a", "operator": "in", "value": "x"}]}),
            ),
            "conditions[0].value",
        ),
        (json!({"effect": "allow", "resource": "x", "actions": ["read"]}), "name"),
        (rule("x", json!({"effect": "maybe"})), "effect"),
    ];
    for (body, field) in cases {
        let (status, v) = admin.post("/entitlements/rules", body.clone()).await;
        assert_eq!(status, 422, "{body} -> {v}");
        assert_eq!(v["code"], "validation_failed");
        assert!(v["field"].as_str().unwrap().starts_with(field), "{field} vs {v}");
    }
    let big = rule("big", json!({"description": "x".repeat(10_000)}));
    let (status, v) = admin.post("/entitlements/rules", big).await;
    assert_eq!((status, v["code"].as_str()), (413, Some("payload_too_large")));

    let (_, after) = admin.get("/entitlements/stats").await;
    assert_eq!(
        (&before["rules"], &before["rules_version"]),
        (&after["rules"], &after["rules_version"])
    );
    let count: i64 =
        db.client().await.query_one("SELECT count(*) FROM access_rules", &[]).await.unwrap().get(0);
    assert_eq!(count, 1);
}

#[tokio::test]
async fn concurrent_updates_of_one_version_conflict() {
    let db = Db::new().await;
    let keys = DevKeys::new();
    let s = role(&keys, Some(&db.dsn), &[]).await;
    let admin = Api { s: &s, token: keys.token("root", "t0", &["admin"]) };
    let (_, created) = admin.post("/entitlements/rules", rule("r", json!({}))).await;
    let path = format!("/entitlements/rules/{}", created["id"].as_str().unwrap());
    let updates = (0..5).map(|i| {
        let admin = &admin;
        let path = path.clone();
        async move {
            admin
                .send(
                    reqwest::Method::PUT,
                    &path,
                    Some(rule("r", json!({"priority": i}))),
                    Some("\"1\""),
                )
                .await
                .0
        }
    });
    let mut statuses = futures::future::join_all(updates).await;
    statuses.sort();
    assert_eq!(statuses, vec![200, 409, 409, 409, 409]);
}

#[tokio::test]
async fn a_change_on_one_replica_is_seen_by_another_within_a_second() {
    let db = Db::new().await;
    let keys = DevKeys::new();
    // Replicas starting together migrate once, under the advisory lock.
    let (a, b) = tokio::join!(role(&keys, Some(&db.dsn), &[]), role(&keys, Some(&db.dsn), &[]));
    let admin_a = Api { s: &a, token: keys.token("root", "t0", &["admin"]) };
    let alice_b = Api { s: &b, token: keys.token("alice", "t1", &["trader"]) };
    assert_eq!(alice_b.check("alice", "t1", "instrument:EURUSD", "read").await["allowed"], false);

    let (status, created) = admin_a.post("/entitlements/rules", rule("eurusd", json!({}))).await;
    assert_eq!(status, 201);
    let changed = Instant::now();
    let seen =
        eventually(Duration::from_secs(1), "replica B allows after the change on A", || async {
            let d = alice_b.check("alice", "t1", "instrument:EURUSD", "read").await;
            (d["allowed"] == true).then_some(d)
        })
        .await;
    assert_eq!(seen["rule_id"], created["id"]);
    eprintln!("replica B saw the change after {:?}", changed.elapsed());
    let applied: i64 = db
        .client()
        .await
        .query_one("SELECT count(*) FROM access_schema_migrations", &[])
        .await
        .unwrap()
        .get(0);
    let files =
        std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations")).unwrap().count();
    assert_eq!(applied as usize, files, "each migration applied once by the two replicas");
}

#[tokio::test]
async fn with_postgres_down_reads_keep_working_and_writes_fail_cleanly() {
    let pg = PrivatePostgres::start().await;
    let keys = DevKeys::new();
    let s = role(
        &keys,
        Some(&pg.dsn()),
        &[("ACCESS_POSTGRES__CONNECT_TIMEOUT", "1s"), ("ACCESS_SERVER__READY_CHECK_TIMEOUT", "2s")],
    )
    .await;
    let admin = Api { s: &s, token: keys.token("root", "t0", &["admin"]) };
    let alice = Api { s: &s, token: keys.token("alice", "t1", &["trader"]) };
    let (status, _) = admin.post("/entitlements/rules", rule("eurusd", json!({}))).await;
    assert_eq!(status, 201);

    pg.down();
    assert_eq!(
        alice.check("alice", "t1", "instrument:EURUSD", "read").await["allowed"],
        true,
        "reads from the snapshot"
    );
    let (status, v) = admin.post("/entitlements/rules", rule("during-outage", json!({}))).await;
    assert_eq!((status, v["code"].as_str()), (503, Some("dependency_unavailable")), "{v}");
    assert!(!v.to_string().contains("127.0.0.1"), "no internals in a 5xx body: {v}");
    let r = http().get(s.url("/ready")).send().await.unwrap();
    assert_eq!(r.status(), 200, "still serving reads");
    let ready: Value = r.json().await.unwrap();
    assert_eq!(
        (ready["status"].as_str(), &ready["failing"]),
        (Some("degraded"), &json!(["postgres"]))
    );

    pg.up();
    let (status, _) = eventually(Duration::from_secs(10), "writes work again", || async {
        let (status, v) = admin.post("/entitlements/rules", rule("after", json!({}))).await;
        (status == 201).then_some((status, v))
    })
    .await;
    assert_eq!(status, 201);
    // Nothing half-written: every rule has its create row, and no audit row lacks its rule.
    let (client, connection) =
        tokio_postgres::connect(&pg.dsn(), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let names: Vec<String> = client
        .query("SELECT rule->>'name' FROM access_rules ORDER BY created_at", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(names, vec!["eurusd", "after"]);
    let orphans: i64 = client
        .query_one("SELECT count(*) FROM access_rules_audit a WHERE NOT EXISTS (SELECT 1 FROM access_rules r WHERE r.id = a.rule_id)", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(orphans, 0);
}

#[tokio::test]
async fn with_redis_down_decisions_are_computed_uncached() {
    let mut redis = crate::support::PrivateRedis::start().await;
    let url = redis.url.clone();
    let keys = DevKeys::new();
    let s =
        role(&keys, None, &[("ACCESS_REDIS_URL", &url), ("ACCESS_REDIS__TIMEOUT", "300ms")]).await;
    let alice = Api { s: &s, token: keys.token("alice", "t1", &["trader"]) };
    assert_eq!(alice.check("alice", "t1", "market_data", "read").await["allowed"], true);
    assert_eq!(alice.check("alice", "t1", "market_data", "read").await["cached"], true);
    // Verified (and so cached) while Redis answers: its revocation check needs no Redis later.
    let admin = Api { s: &s, token: keys.token("root", "t0", &["admin"]) };
    assert_eq!(admin.get("/entitlements/stats").await.0, 200);
    redis.stop();
    // What this replica holds in memory is still answered from there, within its TTL.
    let held = alice.check("alice", "t1", "market_data", "read").await;
    assert_eq!((held["allowed"].as_bool(), held["cached"].as_bool()), (Some(true), Some(true)));
    // A check it does not hold is computed, uncached, at once.
    let asked = Instant::now();
    let d = alice.check("alice", "t1", "curve", "subscribe").await;
    assert_eq!((d["allowed"].as_bool(), d["cached"].as_bool()), (Some(true), Some(false)));
    assert!(asked.elapsed() < Duration::from_secs(2), "{:?}", asked.elapsed());
    let again = alice.check("alice", "t1", "curve", "subscribe").await;
    assert_eq!(again["cached"], false, "not cached while Redis fails: {again}");
    let (_, stats) = admin.get("/entitlements/stats").await;
    assert!(stats["cache_errors"].as_u64().is_some_and(|n| n >= 1), "{stats}");
}

#[tokio::test]
async fn the_embedded_default_serves_the_shipped_seed_rules() {
    let keys = DevKeys::new();
    let s = role(&keys, None, &[]).await;
    let alice = Api { s: &s, token: keys.token("alice", "t1", &["trader"]) };
    assert_eq!(alice.check("alice", "t1", "market_data", "read").await["allowed"], true);
    assert_eq!(alice.check("alice", "t1", "curve", "subscribe").await["allowed"], true);
    assert_eq!(alice.check("alice", "t1", "instrument:EURUSD", "read").await["allowed"], true);
    assert_eq!(alice.check("alice", "t1", "instrument:EURUSD", "write").await["allowed"], false);
    // Tenant isolation: another tenant's data is denied even where a rule allows.
    let (_, d) = alice
        .post("/entitlements/check", json!({"user_id": "alice", "tenant_id": "t1", "resource": "market_data", "action": "read", "context": {"tenant_id": "t2"}}))
        .await;
    assert_eq!(
        (d["allowed"].as_bool(), d["reason"].as_str()),
        (Some(false), Some("denied_by_rule"))
    );
    let root = Api { s: &s, token: keys.token("root", "t0", &["admin"]) };
    assert_eq!(root.check("root", "t0", "instrument:EURUSD", "delete").await["allowed"], true);
    let (_, stats) = root.get("/entitlements/stats").await;
    assert_eq!((stats["store"].as_str(), stats["rules"].as_u64()), (Some("memory"), Some(6)));
}

/// A check that could not be sent (the server closed the connection as it was reused) is retried
/// once on a new connection; a server that never answers is still `unavailable`.
#[tokio::test]
async fn a_check_the_server_dropped_unanswered_is_retried_once() {
    use access::auth::devkey::DevKey;
    use access::auth::token_source::TokenSource;
    use access::auth::{Identity, IdentityKind};
    use access::policy::client::Entitlements;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    // A real HTTP/1.1 server: the first connection is closed after the request is read, with no
    // answer; later ones get a decision. `drop_all` closes every connection instead.
    async fn server(drop_all: bool) -> (url::Url, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap()).parse().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let seen = connections.clone();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let n = seen.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 8192];
                    let mut got = Vec::new();
                    // Headers, then the JSON body (its closing brace ends it).
                    while !got.ends_with(b"}") {
                        match socket.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(k) => got.extend_from_slice(&buf[..k]),
                        }
                    }
                    if drop_all || n == 0 {
                        return;
                    }
                    let body = r#"{"allowed":true,"ttl_seconds":30}"#;
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = socket.write_all(answer.as_bytes()).await;
                });
            }
        });
        (url, connections)
    }

    let dir = tempfile::tempdir().unwrap();
    let key = Arc::new(DevKey::load_or_create(&dir.path().join("k.json")).unwrap());
    let tokens =
        Arc::new(TokenSource::dev(key, "gateway", "platform".into(), "service".into(), None, None));
    let identity = Identity {
        subject: "u1".into(),
        tenant: "t1".into(),
        roles: vec!["trader".into()],
        kind: IdentityKind::User,
        expires_at: u64::MAX,
    };
    let client = |url: url::Url| {
        Entitlements::new(
            Role::Gateway,
            url,
            tokens.clone(),
            Duration::from_secs(30),
            false,
            Duration::from_secs(2),
        )
        .unwrap()
    };

    let (url, connections) = server(false).await;
    let allowed = client(url).allowed(&identity, "instrument:EURUSD", "read").await;
    assert!(matches!(allowed, Ok(true)), "{allowed:?}");
    assert_eq!(connections.load(Ordering::SeqCst), 2, "one retry on a new connection");

    let (url, connections) = server(true).await;
    let refused = client(url).allowed(&identity, "instrument:EURUSD", "read").await;
    assert!(refused.is_err(), "{refused:?}");
    assert_eq!(connections.load(Ordering::SeqCst), 2, "retried once, not more");
}

/// Reads SSE events (`event` name, `id`, data as JSON) from `body` until `n` arrived.
async fn sse_events(
    body: &mut (impl futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin),
    buffer: &mut String,
    n: usize,
) -> Vec<(String, String, Value)> {
    use futures::StreamExt;
    let mut events = Vec::new();
    while events.len() < n {
        while let Some(end) = buffer.find("\n\n") {
            let block: String = buffer.drain(..end + 2).collect();
            let (mut event, mut id, mut data) =
                (String::from("message"), String::new(), String::new());
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    event = v.trim().to_string();
                } else if let Some(v) = line.strip_prefix("id:") {
                    id = v.trim().to_string();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.trim());
                }
            }
            if !data.is_empty() {
                events.push((event, id, serde_json::from_str(&data).unwrap()));
            }
        }
        if events.len() >= n {
            break;
        }
        let chunk = tokio::time::timeout(Duration::from_secs(3), body.next())
            .await
            .expect("an event within 3s")
            .expect("the stream is open")
            .unwrap();
        buffer.push_str(&String::from_utf8_lossy(&chunk));
    }
    events
}

#[tokio::test]
async fn the_watch_feed_carries_every_change_with_its_version_and_resync_when_too_far_behind() {
    let keys = DevKeys::new();
    let s = role(&keys, None, &[]).await;
    let admin = Api { s: &s, token: keys.token("root", "t0", &["admin"]) };
    let service = keys.token("platform-cache", "t0", &["service"]);
    let trader = keys.token("alice", "t1", &["trader"]);
    let watch = |token: &str, last: Option<&str>| {
        let mut r = http().get(s.url("/entitlements/watch")).bearer_auth(token);
        if let Some(id) = last {
            r = r.header("last-event-id", id);
        }
        r.send()
    };
    assert_eq!(watch(&trader, None).await.unwrap().status(), 403, "service or admin only");

    let r = watch(&service, None).await.unwrap();
    assert_eq!(r.status(), 200);
    let mut body = r.bytes_stream();
    let mut buffer = String::new();
    let hello = sse_events(&mut body, &mut buffer, 1).await;
    assert_eq!(hello[0].0, "hello");
    let start_version = hello[0].2["rules_version"].as_i64().unwrap();

    let (status, created, etag) = admin
        .send(reqwest::Method::POST, "/entitlements/rules", Some(rule("w", json!({}))), None)
        .await;
    assert_eq!(status, 201);
    let id = created["id"].as_str().unwrap().to_string();
    let path = format!("/entitlements/rules/{id}");
    let (status, _, etag) = admin
        .send(
            reqwest::Method::PUT,
            &path,
            Some(rule("w", json!({"priority": 20}))),
            etag.as_deref(),
        )
        .await;
    assert_eq!(status, 200);
    let (status, _, _) = admin.send(reqwest::Method::DELETE, &path, None, etag.as_deref()).await;
    assert_eq!(status, 204);

    let live = sse_events(&mut body, &mut buffer, 3).await;
    let kinds: Vec<&str> = live.iter().map(|e| e.2["change"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["created", "updated", "deleted"], "{live:?}");
    let versions: Vec<i64> = live.iter().map(|e| e.2["rules_version"].as_i64().unwrap()).collect();
    assert!(
        versions.windows(2).all(|w| w[0] < w[1]) && versions[0] > start_version,
        "{versions:?}"
    );
    for (event, sse_id, change) in &live {
        assert_eq!(event, "change");
        assert_eq!(sse_id, &change["rules_version"].to_string());
        assert_eq!(change["rule_id"], id.as_str());
    }
    assert_eq!(live[1].2["rule"]["rule"]["priority"], 20);
    assert!(live[2].2["rule"].is_null());

    // Reconnecting from where it stood replays what it missed, once.
    let r = watch(&service, Some(&start_version.to_string())).await.unwrap();
    let (mut body, mut buffer) = (r.bytes_stream(), String::new());
    let replay = sse_events(&mut body, &mut buffer, 4).await;
    assert_eq!(replay[0].0, "hello");
    assert_eq!(
        replay[1..].iter().map(|e| e.2.clone()).collect::<Vec<_>>(),
        live.iter().map(|e| e.2.clone()).collect::<Vec<_>>()
    );
    // From before what the replica kept: resync.
    let r = watch(&service, Some("-5")).await.unwrap();
    let (mut body, mut buffer) = (r.bytes_stream(), String::new());
    let events = sse_events(&mut body, &mut buffer, 2).await;
    assert_eq!(events[1].0, "resync", "{events:?}");
    assert_eq!(events[1].2["rules_version"].as_i64(), Some(versions[2]));
}

/// A cached decision never outlives the rule that made it: an allow that expires stops allowing
/// at its expiry on `/entitlements/check` too (Redis decision cache and the in-process one),
/// as it does in the gateway and the stream.
#[tokio::test]
async fn a_cached_decision_ends_when_the_rule_that_made_it_expires() {
    for redis in [true, false] {
        let db = Db::new().await;
        let keys = DevKeys::new();
        let extra: &[(&str, &str)] = if redis { &[("ACCESS_REDIS_URL", REDIS_URL)] } else { &[] };
        let s = role(&keys, Some(&db.dsn), extra).await;
        let admin = Api { s: &s, token: keys.token("root", "t0", &["admin"]) };
        let expires = chrono::Utc::now() + chrono::Duration::milliseconds(4000);
        let (status, body) = admin
            .post(
                "/entitlements/rules",
                rule("brief", json!({"user_id": "root", "expires_at": expires.to_rfc3339()})),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        let first = admin.check("root", "t0", "instrument:BRN-F27", "read").await;
        assert_eq!(first["allowed"], true, "{first}");
        assert!(first["ttl_seconds"].as_u64().unwrap() <= 4, "bounded by the expiry: {first}");
        let again = admin.check("root", "t0", "instrument:BRN-F27", "read").await;
        assert_eq!(
            (again["allowed"].as_bool(), again["cached"].as_bool()),
            (Some(true), Some(true))
        );
        let wait = (expires - chrono::Utc::now()).to_std().unwrap_or_default();
        tokio::time::sleep(wait + Duration::from_millis(50)).await;
        let after = admin.check("root", "t0", "instrument:BRN-F27", "read").await;
        assert_eq!(after["allowed"], false, "redis={redis}: {after}");
    }
}

/// With Redis, each replica keeps copies of decisions in front of it, never longer than their
/// Redis entries: a decision another replica computed is served from this replica's memory once
/// read (even with the Redis entry gone), and only for what Redis said was left of it.
#[tokio::test]
async fn a_replica_keeps_a_decision_read_from_redis_no_longer_than_redis_does() {
    use fred::prelude::KeysInterface;
    let db = Db::new().await;
    let keys = DevKeys::new();
    let prefix = redis_prefix();
    let env = [
        ("ACCESS_AUTH__DEV_KEY_FILE", keys.path.as_str()),
        ("ACCESS_REDIS__PREFIX", prefix.as_str()),
        ("ACCESS_POSTGRES_DSN", db.dsn.as_str()),
        ("ACCESS_REDIS_URL", REDIS_URL),
        ("ACCESS_ENTITLEMENTS__DECISION_TTL", "3s"),
    ];
    let (a, b) = (
        start(Role::Entitlements, config(&env)).await,
        start(Role::Entitlements, config(&env)).await,
    );
    wait_ready(&a.url("")).await;
    wait_ready(&b.url("")).await;
    let token = keys.token("root", "t0", &["admin"]);
    let (on_a, on_b) = (Api { s: &a, token: token.clone() }, Api { s: &b, token });
    on_a.post("/entitlements/rules", rule("all", json!({}))).await;
    let version = on_a.get("/entitlements/stats").await.1["rules_version"].clone();
    eventually(Duration::from_secs(5), "the second replica serves the new rules", || async {
        (on_b.get("/entitlements/stats").await.1["rules_version"] == version).then_some(())
    })
    .await;

    let computed = on_a.check("root", "t0", "instrument:BRN-F27", "read").await;
    let made = Instant::now();
    assert_eq!(
        (computed["allowed"].as_bool(), computed["cached"].as_bool()),
        (Some(true), Some(false))
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let read = on_b.check("root", "t0", "instrument:BRN-F27", "read").await;
    assert_eq!(read["decision_id"], computed["decision_id"], "read from Redis: {read}");
    // With the Redis entry gone, the second replica answers from its own copy.
    let redis = access::backends::redis::connect(
        &access::config::SecretUrl::from(url::Url::parse(REDIS_URL).unwrap()),
        &access::config::RedisConfig::default(),
    )
    .await
    .unwrap();
    let asked = access::policy::eval::CheckRequest {
        user_id: "root".into(),
        tenant_id: "t0".into(),
        // A caller checking itself is checked with its token's roles.
        roles: vec!["admin".into()],
        resource: "instrument:BRN-F27".into(),
        action: "read".into(),
        context: Value::Null,
    };
    let entry = format!(
        "{prefix}{}",
        access::roles::entitlements::engine::cache_key(version.as_i64().unwrap(), &asked)
    );
    let removed: i64 = redis.del(&entry).await.unwrap();
    assert_eq!(removed, 1, "the decision's Redis entry, {entry}");
    let local = on_b.check("root", "t0", "instrument:BRN-F27", "read").await;
    assert_eq!(
        (&local["decision_id"], local["cached"].as_bool()),
        (&computed["decision_id"], Some(true)),
        "from the replica's copy: {local}"
    );
    // Past the Redis entry's end (3 s after it was made, not 3 s after it was read), the copy is
    // gone too: the decision is computed again.
    tokio::time::sleep(Duration::from_millis(3300).saturating_sub(made.elapsed())).await;
    let later = on_b.check("root", "t0", "instrument:BRN-F27", "read").await;
    assert_ne!(later["decision_id"], computed["decision_id"], "{later}");
    assert_eq!(later["cached"], false, "{later}");
}
