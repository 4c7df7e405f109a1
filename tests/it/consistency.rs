//! One entitlement model: over generated rules and requests, the gateway (a route's entitlement)
//! and the stream (a topic's per-record check) give the same answer as the entitlements role's
//! own `POST /entitlements/check` for the same (subject, tenant, roles, resource, action), after
//! every batch of rule changes.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use access::role::Role;
use axum::routing::get;
use axum::Router;
use futures::StreamExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::stream::{next_json, send};
use crate::support::{
    config, config_with_file, eventually, http, redis_prefix, start, wait_ready, DevKeys, REDIS_URL,
};

/// A small deterministic generator (xorshift64*), so a failure can be replayed from its seed.
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

const IDS: [&str; 6] = ["a1", "a2", "b1", "b2", "c", "zz"];
const USERS: [(&str, &str, &[&str]); 5] = [
    ("u1", "t1", &["trader"]),
    ("u2", "t1", &["analyst"]),
    ("u3", "t2", &["trader", "analyst"]),
    ("u4", "t2", &[]),
    ("u5", "t1", &["ops"]),
];

/// A random rule over `res:<id>` resources (never the topic's own `feed` resource).
fn rule(g: &mut Gen, n: usize) -> Value {
    let resource = *g.pick(&["res:a1", "res:a*", "res:*", "res:b2", "res:c", "r*", "res:*1"]);
    let actions = g
        .pick(&[json!(["read"]), json!(["*"]), json!(["write"]), json!(["read", "subscribe"])])
        .clone();
    let mut r = json!({
        "name": format!("gen-{n}"),
        "effect": if g.chance(40) { "deny" } else { "allow" },
        "resource": resource,
        "actions": actions,
        "priority": g.below(4),
        "enabled": !g.chance(10),
    });
    if g.chance(25) {
        r["user_id"] = json!(g.pick(&USERS).0);
    }
    if g.chance(25) {
        r["tenant_id"] = json!(*g.pick(&["t1", "t2"]));
    }
    if g.chance(35) {
        r["roles"] = json!([*g.pick(&["trader", "analyst", "ops"])]);
    }
    if g.chance(30) {
        r["conditions"] = json!([g
            .pick(&[
                json!({"field": "roles", "operator": "in", "value": ["analyst"]}),
                json!({"field": "user_id", "operator": "starts_with", "value": "u1"}),
                json!({"field": "tenant_id", "operator": "not_equals", "value": "t2"}),
                json!({"field": "resource", "operator": "ends_with", "value": "2"}),
                json!({"field": "context.tenant_id", "operator": "exists", "value": false}),
            ])
            .clone()]);
    }
    r
}

#[tokio::test]
async fn the_gateway_and_the_stream_decide_as_the_entitlements_role_over_generated_rules() {
    let seed = 0x5EED_2026_u64;
    let mut g = Gen(seed);
    let keys = DevKeys::new();
    let prefix = redis_prefix();
    let dir = tempfile::tempdir().unwrap();
    let seed_file = dir.path().join("seed.yaml");
    std::fs::write(
        &seed_file,
        "- { name: feed, effect: allow, resource: feed, actions: [subscribe], priority: 10 }\n",
    )
    .unwrap();
    let seed_path = seed_file.display().to_string();
    let common = [
        ("ACCESS_AUTH__DEV_KEY_FILE", keys.path.as_str()),
        ("ACCESS_REDIS_URL", REDIS_URL),
        ("ACCESS_REDIS__PREFIX", prefix.as_str()),
    ];
    let mut env = common.to_vec();
    env.push(("ACCESS_ENTITLEMENTS__SEED_FILE", &seed_path));
    let entitlements = start(Role::Entitlements, config(&env)).await;
    wait_ready(&entitlements.url("")).await;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let app = Router::new().route("/r/{id}", get(|| async { "ok" }));
        axum::serve(listener, app).await
    });
    let routes = dir.path().join("routes.yaml");
    std::fs::write(
        &routes,
        format!(
            "- {{ name: res, path: \"/api/r/{{id}}\", methods: [GET], upstreams: [\"{upstream}\"], strip_prefix: /api, entitlement: {{ resource: \"res:{{id}}\" }} }}\n"
        ),
    )
    .unwrap();
    let routes = routes.display().to_string();
    let ent_url = entitlements.url("");
    let mut env = common.to_vec();
    env.push(("ACCESS_ENTITLEMENTS_SERVICE_URL", &ent_url));
    env.push(("ACCESS_GATEWAY__ROUTES_FILE", &routes));
    let gateway = start(Role::Gateway, config(&env)).await;
    let topic = format!("gen-{}", uuid::Uuid::new_v4().simple());
    env.retain(|(k, _)| *k != "ACCESS_GATEWAY__ROUTES_FILE");
    let file = format!(
        "[[stream.topics]]\nname = \"{topic}\"\nresource = \"feed\"\nrecord_resource = \"res:{{id}}\"\n"
    );
    let stream = start(Role::Stream, config_with_file(&file, &env)).await;
    wait_ready(&gateway.url("")).await;
    wait_ready(&stream.url("")).await;

    let admin = keys.token("root", "ops", &["admin"]);
    let service = keys.token("checker", "ops", &["service"]);
    let mut sockets = Vec::new();
    for (user, tenant, roles) in USERS {
        let token = keys.token(user, tenant, roles);
        let url = stream.url("/ws/stream").replacen("http://", "ws://", 1);
        let (mut ws, _) =
            tokio_tungstenite::connect_async(format!("{url}?token={token}")).await.unwrap();
        next_json(&mut ws).await;
        send(&mut ws, json!({"action": "subscribe", "topics": [topic]})).await;
        assert_eq!(next_json(&mut ws).await["topics"], json!([topic]));
        sockets.push(ws);
    }

    let mut compared = 0;
    for round in 0..4 {
        for n in 0..15 {
            let r = http()
                .post(entitlements.url("/entitlements/rules"))
                .bearer_auth(&admin)
                .json(&rule(&mut g, round * 100 + n))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 201);
        }
        let version: i64 = http()
            .get(entitlements.url("/entitlements/version"))
            .bearer_auth(&admin)
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()["rules_version"]
            .as_i64()
            .unwrap();
        for role in [&gateway, &stream] {
            eventually(Duration::from_secs(2), "the role follows the rules", || async {
                let v: Value = http()
                    .get(role.url("/entitlements/version"))
                    .bearer_auth(&admin)
                    .send()
                    .await
                    .ok()?
                    .json()
                    .await
                    .ok()?;
                (v["rules_version"].as_i64()? >= version).then_some(())
            })
            .await;
        }

        // The entitlements role's answers.
        let mut expected: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        for (user, tenant, roles) in USERS {
            for id in IDS {
                let d: Value = http()
                    .post(entitlements.url("/entitlements/check"))
                    .bearer_auth(&service)
                    .json(&json!({"user_id": user, "tenant_id": tenant, "roles": roles,
                        "resource": format!("res:{id}"), "action": "read", "context": {}}))
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                assert_eq!(d["rules_version"].as_i64(), Some(version));
                if d["allowed"] == true {
                    expected.entry(user).or_default().insert(id);
                }
                // The gateway's.
                let token = keys.token(user, tenant, roles);
                let r = http()
                    .get(gateway.url(&format!("/api/r/{id}")))
                    .bearer_auth(&token)
                    .send()
                    .await
                    .unwrap();
                let status = r.status().as_u16();
                let want = if d["allowed"] == true { 200 } else { 403 };
                assert_eq!(status, want, "seed {seed:#x} round {round}: {user} read res:{id}: {d}");
                if status == 200 {
                    assert_eq!(r.headers()["x-entitlements-version"], version.to_string().as_str());
                }
                compared += 1;
            }
        }
        // The stream's: one record per id, each user receives exactly the allowed ones.
        let marker = format!("round-{round}");
        let publisher = keys.token("publisher", "ops", &["service"]);
        for id in IDS {
            let r = http()
                .post(stream.url("/publish"))
                .bearer_auth(&publisher)
                .json(&json!({"topic": topic, "key": id, "data": {"id": id, "marker": marker}}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
        }
        for ((user, _, _), ws) in USERS.iter().zip(sockets.iter_mut()) {
            let mut got = BTreeSet::new();
            // Until the socket is quiet (a ping does not end the wait).
            while let Ok(Some(Ok(m))) =
                tokio::time::timeout(Duration::from_millis(150), ws.next()).await
            {
                let Message::Text(t) = m else { continue };
                let v: Value = serde_json::from_str(&t).unwrap();
                if v["type"] == "data" && v["data"]["marker"] == marker {
                    got.insert(v["data"]["id"].as_str().unwrap().to_string());
                }
            }
            let want: BTreeSet<String> = expected
                .get(user)
                .map(|s| s.iter().map(|i| i.to_string()).collect())
                .unwrap_or_default();
            assert_eq!(got, want, "seed {seed:#x} round {round}: {user}'s records");
            compared += IDS.len();
        }
    }
    println!("{compared} decisions compared");
}
