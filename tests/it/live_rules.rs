//! One entitlement model in every role: the stream checks every record against the recipient's
//! entitlement to its resource, and rule changes reach open streams, on two stream replicas,
//! against the real Redis, PostgreSQL (the rules) and tansu.

use std::time::{Duration, Instant};

use access::role::Role;
use futures::StreamExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::stream::{create_topic, kafka_client, next_json, produce, send};
use crate::support::{
    config, config_with_file, eventually, http, kafka_bootstrap, redis_prefix, start, wait_ready,
    Db, DevKeys, Running, REDIS_URL,
};

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Entitlements on PostgreSQL, two stream replicas on one tansu topic, one Redis prefix.
struct Layer {
    _db: Db,
    keys: DevKeys,
    entitlements: Running,
    replicas: [Running; 2],
    prices: String,
    kafka: rskafka::client::Client,
}

/// The base rules: traders may subscribe to market data and read the instruments in `instruments`
/// (a glob).
async fn layer(instruments: &str, toml: &str) -> Layer {
    let prices = format!("prices-{}", uuid::Uuid::new_v4().simple());
    let bootstrap = kafka_bootstrap();
    let kafka = kafka_client(&bootstrap).await;
    create_topic(&kafka, &prices).await;
    let Rules { db, keys, prefix, entitlements } = Rules::start(&[
        json!({"name": "stream", "effect": "allow", "resource": "market_data", "actions": ["subscribe"], "roles": ["trader"], "priority": 10}),
        json!({"name": "instruments", "effect": "allow", "resource": instruments, "actions": ["read"], "roles": ["trader"], "priority": 10}),
    ])
    .await;
    let common = [
        ("ACCESS_AUTH__DEV_KEY_FILE", keys.path.as_str()),
        ("ACCESS_REDIS_URL", REDIS_URL),
        ("ACCESS_REDIS__PREFIX", prefix.as_str()),
    ];
    let ent_url = entitlements.url("");
    let mut env = common.to_vec();
    env.push(("ACCESS_ENTITLEMENTS_SERVICE_URL", &ent_url));
    env.push(("ACCESS_STREAM__FETCH_WAIT", "5ms"));
    env.push(("ACCESS_STREAM__METADATA_REFRESH", "200ms"));
    env.push(("ACCESS_KAFKA_BOOTSTRAP", &bootstrap));
    let file = format!(
        r#"
[[stream.topics]]
name = "{prices}"
resource = "market_data"
record_resource = "instrument:{{instrument_id}}"
{toml}
"#
    );
    let stream_config = config_with_file(&file, &env);
    let a = start(Role::Stream, stream_config.clone()).await;
    let b = start(Role::Stream, stream_config).await;
    wait_ready(&a.url("")).await;
    wait_ready(&b.url("")).await;
    Layer { _db: db, keys, entitlements, replicas: [a, b], prices, kafka }
}

/// The entitlements role on a PostgreSQL database and a Redis prefix of its own, with `rules`
/// created through its API by an admin.
struct Rules {
    db: Db,
    keys: DevKeys,
    prefix: String,
    entitlements: Running,
}

impl Rules {
    async fn start(rules: &[Value]) -> Rules {
        let db = Db::new().await;
        let keys = DevKeys::new();
        let prefix = redis_prefix();
        let env = [
            ("ACCESS_AUTH__DEV_KEY_FILE", keys.path.as_str()),
            ("ACCESS_REDIS_URL", REDIS_URL),
            ("ACCESS_REDIS__PREFIX", prefix.as_str()),
            ("ACCESS_POSTGRES_DSN", db.dsn.as_str()),
        ];
        let entitlements = start(Role::Entitlements, config(&env)).await;
        wait_ready(&entitlements.url("")).await;
        let admin = keys.token("root", "ops", &["admin"]);
        for rule in rules {
            create_rule(&entitlements, &admin, rule.clone()).await;
        }
        Rules { db, keys, prefix, entitlements }
    }
}

async fn create_rule(entitlements: &Running, admin: &str, rule: Value) -> i64 {
    let r = http()
        .post(entitlements.url("/entitlements/rules"))
        .bearer_auth(admin)
        .json(&rule)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{rule}");
    r.json::<Value>().await.unwrap()["version"].as_i64().unwrap()
}

impl Layer {
    fn admin(&self) -> String {
        self.keys.token("root", "ops", &["admin"])
    }

    async fn connect(&self, replica: usize, token: &str) -> Ws {
        let url = self.replicas[replica].url("/ws/stream").replacen("http://", "ws://", 1);
        let (mut ws, _) =
            tokio_tungstenite::connect_async(format!("{url}?token={token}")).await.unwrap();
        assert_eq!(next_json(&mut ws).await["type"], "connection_established");
        ws
    }

    async fn subscribed(&self, replica: usize, token: &str) -> Ws {
        let mut ws = self.connect(replica, token).await;
        send(&mut ws, json!({"action": "subscribe", "topics": [self.prices]})).await;
        let answer = next_json(&mut ws).await;
        assert_eq!(answer["topics"], json!([self.prices]), "{answer}");
        ws
    }

    async fn produce(&self, instruments: &[&str], marker: &str) {
        let values: Vec<Value> = instruments
            .iter()
            .map(|i| json!({"instrument_id": i, "price": 1.0, "marker": marker}))
            .collect();
        produce(&self.kafka, &self.prices, &values).await;
    }

    /// Waits until both replicas decide at `version` at least; returns how long that took.
    async fn applied_everywhere(&self, version: i64) -> Duration {
        let started = Instant::now();
        let token = self.admin();
        for replica in &self.replicas {
            eventually(Duration::from_secs(2), "the replica applies the version", || async {
                let r = http()
                    .get(replica.url("/entitlements/version"))
                    .bearer_auth(&token)
                    .send()
                    .await
                    .ok()?;
                let v: Value = r.json().await.ok()?;
                (v["rules_version"].as_i64()? >= version).then_some(())
            })
            .await;
        }
        started.elapsed()
    }
}

/// Data frames carrying `marker` until `n` of them arrived or `quiet` passed without a frame;
/// other frames are skipped.
async fn marked(ws: &mut Ws, marker: &str, n: usize, quiet: Duration) -> Vec<String> {
    let mut got = Vec::new();
    while got.len() < n {
        let Ok(Some(Ok(m))) = tokio::time::timeout(quiet, ws.next()).await else { break };
        // A ping does not end the wait.
        let Message::Text(t) = m else { continue };
        let v: Value = serde_json::from_str(&t).unwrap();
        if v["type"] == "data" && v["data"]["marker"] == marker {
            got.push(v["data"]["instrument_id"].as_str().unwrap_or("?").to_string());
        }
    }
    got.sort();
    got
}

#[tokio::test]
async fn a_deny_on_one_instrument_stops_its_records_for_that_user_on_both_replicas_live_and_on_resume(
) {
    let l = layer("instrument:*", "").await;
    let alice = l.keys.token("alice", "t1", &["trader"]);
    let bob = l.keys.token("bob", "t1", &["trader"]);
    let mut alice_a = l.subscribed(0, &alice).await;
    let mut alice_b = l.subscribed(1, &alice).await;
    let mut bob_a = l.subscribed(0, &bob).await;
    let mut bob_b = l.subscribed(1, &bob).await;

    l.produce(&["BRN-F27", "NG-H27"], "before").await;
    for ws in [&mut alice_a, &mut alice_b, &mut bob_a, &mut bob_b] {
        assert_eq!(marked(ws, "before", 2, Duration::from_secs(5)).await, ["BRN-F27", "NG-H27"]);
    }
    // Where alice's second connection stands, to resume from after the change.
    send(&mut alice_b, json!({"action": "get_stats"})).await;
    let position = next_json(&mut alice_b).await["position"].as_str().unwrap().to_string();
    drop(alice_b);
    // Missed while away: one record of each instrument, produced before the deny.
    l.produce(&["BRN-F27", "NG-H27"], "missed").await;

    let started = Instant::now();
    let version = create_rule(
        &l.entitlements,
        &l.admin(),
        json!({"name": "no-brent-for-alice", "effect": "deny", "resource": "instrument:BRN-*",
            "actions": ["read"], "user_id": "alice", "priority": 500}),
    )
    .await;
    let took = l.applied_everywhere(version).await;
    println!("rule change to the last stream replica applying it: {:?}", started.elapsed());
    assert!(took < Duration::from_secs(1), "applied in {took:?}");

    // Live: alice gets NG but not BRN on both replicas; bob still gets both.
    l.produce(&["BRN-F27", "NG-H27"], "after").await;
    assert_eq!(marked(&mut alice_a, "after", 2, Duration::from_secs(2)).await, ["NG-H27"]);
    for ws in [&mut bob_a, &mut bob_b] {
        assert_eq!(marked(ws, "after", 2, Duration::from_secs(5)).await, ["BRN-F27", "NG-H27"]);
    }
    // Resume on the other replica: what was missed comes back, except what she may not read now.
    let mut resumed = l.connect(1, &alice).await;
    send(&mut resumed, json!({"action": "subscribe", "topics": [l.prices], "position": position}))
        .await;
    let answer = next_json(&mut resumed).await;
    assert_eq!(answer["recovered"], true, "{answer}");
    let mut frames = Vec::new();
    while let Ok(Some(Ok(m))) =
        tokio::time::timeout(Duration::from_millis(500), resumed.next()).await
    {
        let Message::Text(t) = m else { continue };
        let v: Value = serde_json::from_str(&t).unwrap();
        if v["type"] == "data" {
            frames.push(format!(
                "{}/{}",
                v["data"]["marker"].as_str().unwrap(),
                v["data"]["instrument_id"].as_str().unwrap()
            ));
        }
    }
    assert_eq!(frames, ["missed/NG-H27", "after/NG-H27"], "resumed frames");
}

#[tokio::test]
async fn a_rule_allowing_a_new_instrument_starts_its_records_flowing() {
    let l = layer("instrument:NG-*", "").await;
    let alice = l.keys.token("alice", "t1", &["trader"]);
    let mut a = l.subscribed(0, &alice).await;
    let mut b = l.subscribed(1, &alice).await;
    l.produce(&["BRN-F27", "NG-H27"], "before").await;
    for ws in [&mut a, &mut b] {
        assert_eq!(marked(ws, "before", 2, Duration::from_secs(2)).await, ["NG-H27"]);
    }
    let version = create_rule(
        &l.entitlements,
        &l.admin(),
        json!({"name": "brent-too", "effect": "allow", "resource": "instrument:BRN-F27",
            "actions": ["read"], "roles": ["trader"], "priority": 10}),
    )
    .await;
    l.applied_everywhere(version).await;
    l.produce(&["BRN-F27", "NG-H27"], "after").await;
    for ws in [&mut a, &mut b] {
        assert_eq!(marked(ws, "after", 2, Duration::from_secs(5)).await, ["BRN-F27", "NG-H27"]);
    }
    // A record without the field its topic's template names reaches no one, and is counted.
    let values = [
        json!({"price": 1.0, "marker": "unnamed"}),
        json!({"instrument_id": "NG-H27", "price": 1.0, "marker": "unnamed"}),
    ];
    produce(&l.kafka, &l.prices, &values).await;
    for ws in [&mut a, &mut b] {
        assert_eq!(marked(ws, "unnamed", 2, Duration::from_secs(2)).await, ["NG-H27"]);
    }
    let metrics =
        http().get(l.replicas[0].url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(
        metrics.lines().any(|line| line.starts_with("access_stream_messages_dropped_total")
            && line.contains(&format!("topic=\"{}\"", l.prices))
            && line.contains("reason=\"no_record_resource\"")),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_rules_change_reaches_a_thousand_open_clients_with_an_unsubscribed_frame() {
    let l = layer(
        "instrument:*",
        "[stream.limits.connect_rate]\nrate = 5000\nperiod = \"1s\"\nburst = 5000\n",
    )
    .await;
    let mut clients = Vec::new();
    for i in 0..1000 {
        let token = l.keys.token(&format!("user-{i}"), "t1", &["trader"]);
        clients.push(l.subscribed(i % 2, &token).await);
    }
    // An SSE client on the second replica, too.
    let sse_token = l.keys.token("sse-user", "t1", &["trader"]);
    let sse = http()
        .get(l.replicas[1].url(&format!("/sse/stream?topics={}&token={sse_token}", l.prices)))
        .send()
        .await
        .unwrap();
    assert_eq!(sse.status(), 200);
    let mut sse = sse.bytes_stream();
    let started = Instant::now();
    create_rule(
        &l.entitlements,
        &l.admin(),
        json!({"name": "stream-closed", "effect": "deny", "resource": "market_data",
            "actions": ["subscribe"], "priority": 500}),
    )
    .await;
    let mut reached = 0;
    for ws in &mut clients {
        let frame = loop {
            let v = next_json(ws).await;
            if v["type"] != "data" {
                break v;
            }
        };
        assert_eq!(frame["type"], "unsubscribed", "{frame}");
        assert_eq!(frame["reason"], "not_entitled", "{frame}");
        assert_eq!(frame["topics"], json!([l.prices]));
        reached += 1;
    }
    let took = started.elapsed();
    println!("a rule change reached {reached} WebSocket clients in {took:?}");
    assert!(took < Duration::from_secs(1), "{took:?}");
    let mut text = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while !text.contains("event: unsubscribed") {
        let chunk = tokio::time::timeout_at(deadline, sse.next()).await.expect("an SSE event");
        text.push_str(&String::from_utf8_lossy(&chunk.unwrap().unwrap()));
    }
    assert!(text.contains("not_entitled"), "{text}");
    // Subscribing again is refused now.
    let mut again = l.connect(0, &l.keys.token("user-0", "t1", &["trader"])).await;
    send(&mut again, json!({"action": "subscribe", "topics": [l.prices]})).await;
    let answer = next_json(&mut again).await;
    assert_eq!(answer["failed"][0]["code"], "forbidden", "{answer}");
}

#[tokio::test]
async fn a_rule_that_expires_stops_its_records_at_its_expiry_without_a_new_version() {
    let l = layer("instrument:NG-*", "").await;
    let alice = l.keys.token("alice", "t1", &["trader"]);
    let mut ws = l.subscribed(0, &alice).await;
    let expires = chrono::Utc::now() + chrono::Duration::milliseconds(2500);
    let version = create_rule(
        &l.entitlements,
        &l.admin(),
        json!({"name": "brent-for-now", "effect": "allow", "resource": "instrument:BRN-F27",
            "actions": ["read"], "roles": ["trader"], "priority": 10, "expires_at": expires.to_rfc3339()}),
    )
    .await;
    l.applied_everywhere(version).await;
    l.produce(&["BRN-F27", "NG-H27"], "before").await;
    assert_eq!(marked(&mut ws, "before", 2, Duration::from_secs(5)).await, ["BRN-F27", "NG-H27"]);
    let left = (expires - chrono::Utc::now()).to_std().unwrap_or_default();
    tokio::time::sleep(left + Duration::from_millis(100)).await;
    l.produce(&["BRN-F27", "NG-H27"], "after").await;
    assert_eq!(marked(&mut ws, "after", 2, Duration::from_secs(2)).await, ["NG-H27"]);
}

#[tokio::test]
async fn a_restarted_embedded_rules_store_is_followed_although_its_versions_start_again() {
    let keys = DevKeys::new();
    let dir = tempfile::tempdir().unwrap();
    let seed = dir.path().join("seed.yaml");
    std::fs::write(
        &seed,
        "- { name: all, effect: allow, resource: \"instrument:*\", actions: [read], roles: [trader] }\n",
    )
    .unwrap();
    let seed = seed.display().to_string();
    let prefix = redis_prefix();
    let env = [
        ("ACCESS_AUTH__DEV_KEY_FILE", keys.path.as_str()),
        ("ACCESS_ENTITLEMENTS__SEED_FILE", seed.as_str()),
        ("ACCESS_REDIS_URL", REDIS_URL),
        ("ACCESS_REDIS__PREFIX", prefix.as_str()),
    ];
    let entitlements = start(Role::Entitlements, config(&env)).await;
    wait_ready(&entitlements.url("")).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let app = axum::Router::new().route("/r/{id}", axum::routing::get(|| async { "ok" }));
        axum::serve(listener, app).await
    });
    let routes = dir.path().join("routes.yaml");
    std::fs::write(
        &routes,
        format!("- {{ name: r, path: \"/api/r/{{id}}\", upstreams: [\"{upstream}\"], strip_prefix: /api, entitlement: {{ resource: \"instrument:{{id}}\" }} }}\n"),
    )
    .unwrap();
    let (routes, ent_url) = (routes.display().to_string(), entitlements.url(""));
    let gateway = start(
        Role::Gateway,
        config(&[
            ("ACCESS_AUTH__DEV_KEY_FILE", keys.path.as_str()),
            ("ACCESS_GATEWAY__ROUTES_FILE", routes.as_str()),
            ("ACCESS_ENTITLEMENTS_SERVICE_URL", ent_url.as_str()),
            ("ACCESS_GATEWAY__DECISION_CACHE_TTL", "300ms"),
            ("ACCESS_REDIS_URL", REDIS_URL),
            ("ACCESS_REDIS__PREFIX", prefix.as_str()),
        ]),
    )
    .await;
    wait_ready(&gateway.url("")).await;
    let admin = keys.token("root", "ops", &["admin"]);
    let alice = keys.token("alice", "t1", &["trader"]);
    let status = || async {
        http().get(gateway.url("/api/r/EURUSD")).bearer_auth(&alice).send().await.unwrap().status()
    };
    assert_eq!(status().await, 200);
    for n in 0..3 {
        create_rule(
            &entitlements,
            &admin,
            json!({"name": format!("deny-{n}"), "effect": "deny", "resource": "instrument:EURUSD", "actions": ["read"], "priority": 5}),
        )
        .await;
    }
    eventually(Duration::from_secs(1), "the deny reaches the gateway", || async {
        (status().await == 403).then_some(())
    })
    .await;

    // The embedded store starts again, at version 1, without the denies, on the same address.
    let addr = entitlements.addr;
    entitlements.shutdown().stop();
    eventually(Duration::from_secs(5), "the entitlements role is gone", || async {
        http().get(entitlements.url("/health")).send().await.is_err().then_some(())
    })
    .await;
    let listener = eventually(Duration::from_secs(5), "the port is free again", || async {
        tokio::net::TcpListener::bind(addr).await.ok()
    })
    .await;
    let settings = config(&env);
    let ctx = access::server::Context::new(
        Role::Entitlements,
        std::sync::Arc::new(settings.shared.clone()),
        access::server::Shutdown::new(),
    );
    tokio::spawn(async move {
        access::roles::start(Role::Entitlements, listener, ctx, &settings).await
    });
    eventually(Duration::from_secs(5), "the gateway follows the restarted store", || async {
        (status().await == 200).then_some(())
    })
    .await;
}

/// A list response (`entitlement.items`) holds only the items the caller may read, on a cache
/// miss and a hit alike (the cache keeps the whole body), and a deny reaches it within a second;
/// an item the template cannot name reaches no one; a body that cannot be filtered is refused,
/// never passed on; validators of the whole body are removed, and HEAD tells no size.
#[tokio::test]
async fn list_responses_hold_only_the_items_the_caller_may_read() {
    let Rules { db: _db, keys, prefix, entitlements } = Rules::start(&[
        json!({"name": "data", "effect": "allow", "resource": "market_data", "actions": ["read"], "roles": ["trader"], "priority": 10}),
        json!({"name": "all", "effect": "allow", "resource": "instrument:*", "actions": ["read"], "roles": ["trader"], "priority": 10}),
    ])
    .await;
    let admin = keys.token("root", "ops", &["admin"]);
    let common = [
        ("ACCESS_AUTH__DEV_KEY_FILE", keys.path.as_str()),
        ("ACCESS_REDIS_URL", REDIS_URL),
        ("ACCESS_REDIS__PREFIX", prefix.as_str()),
    ];
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let cacheable = |body: String| {
            (
                [
                    (http::header::CACHE_CONTROL, "max-age=60"),
                    (http::header::ETAG, "\"whole-list\""),
                    (http::header::CONTENT_TYPE, "application/json"),
                ],
                body,
            )
        };
        let app = axum::Router::new()
            .route(
                "/prices",
                axum::routing::get(move || async move {
                    cacheable(
                        json!({"prices": [
                            {"instrument_id": "NG-H27", "price": 1},
                            {"instrument_id": "BRN-F27", "price": 2},
                            {"price": 3},
                            {"instrument_id": "BRN-G27", "price": 4},
                        ], "as_of": "now"})
                        .to_string(),
                    )
                }),
            )
            .route(
                "/ids",
                axum::routing::get(move || async move {
                    cacheable(json!(["NG-H27", "BRN-F27"]).to_string())
                }),
            )
            .route("/text", axum::routing::get(|| async { "NG-H27,BRN-F27" }));
        axum::serve(listener, app).await
    });
    let dir = tempfile::tempdir().unwrap();
    let routes = dir.path().join("routes.yaml");
    std::fs::write(
        &routes,
        format!(
            r#"
- {{ name: prices, path: /api/prices, methods: [GET, HEAD], upstreams: ["{upstream}"], strip_prefix: /api, cache: {{}}, entitlement: {{ resource: market_data, items: {{ array: prices, resource: "instrument:{{instrument_id}}" }} }} }}
- {{ name: ids, path: /api/ids, upstreams: ["{upstream}"], strip_prefix: /api, entitlement: {{ resource: market_data, items: {{ resource: "instrument:{{.}}" }} }} }}
- {{ name: text, path: /api/text, upstreams: ["{upstream}"], strip_prefix: /api, entitlement: {{ resource: market_data, items: {{ resource: "instrument:{{.}}" }} }} }}
"#
        ),
    )
    .unwrap();
    let (routes, ent_url) = (routes.display().to_string(), entitlements.url(""));
    let mut env = common.to_vec();
    env.push(("ACCESS_GATEWAY__ROUTES_FILE", routes.as_str()));
    env.push(("ACCESS_ENTITLEMENTS_SERVICE_URL", ent_url.as_str()));
    let gateway = start(Role::Gateway, config(&env)).await;
    wait_ready(&gateway.url("")).await;
    let (alice, bob) =
        (keys.token("alice", "t1", &["trader"]), keys.token("bob", "t1", &["trader"]));
    let get = |path: &'static str, token: String| {
        let url = gateway.url(path);
        async move {
            let r = http().get(url).bearer_auth(token).send().await.unwrap();
            let status = r.status().as_u16();
            let cache = r.headers().get("x-cache").map(|v| v.to_str().unwrap().to_string());
            assert!(r.headers().get("etag").is_none(), "no validator of the whole list");
            let body: Value = r.json().await.unwrap_or(Value::Null);
            (status, cache, body)
        }
    };
    let ids = |body: &Value| -> Vec<String> {
        body["prices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["instrument_id"].as_str().unwrap().to_string())
            .collect()
    };
    // Everything allowed: every named item, never the one without a name.
    let (status, cache, body) = get("/api/prices", alice.clone()).await;
    assert_eq!((status, cache.as_deref()), (200, Some("MISS")));
    assert_eq!(ids(&body), ["NG-H27", "BRN-F27", "BRN-G27"]);
    assert_eq!(body["as_of"], "now", "the rest of the body is kept");

    create_rule(
        &entitlements,
        &admin,
        json!({"name": "alice-no-brent", "effect": "deny", "resource": "instrument:BRN-*", "actions": ["read"], "user_id": "alice", "priority": 100}),
    )
    .await;
    let seen = eventually(Duration::from_secs(1), "the deny reaches the list", || async {
        let (status, cache, body) = get("/api/prices", alice.clone()).await;
        (status == 200 && ids(&body) == ["NG-H27"]).then_some(cache)
    })
    .await;
    assert_eq!(seen.as_deref(), Some("HIT"), "filtered from the cached whole list");
    let (_, cache, body) = get("/api/prices", bob.clone()).await;
    assert_eq!(
        (cache.as_deref(), ids(&body)),
        (Some("HIT"), vec!["NG-H27".into(), "BRN-F27".into(), "BRN-G27".into()])
    );
    let (status, _, body) = get("/api/ids", alice.clone()).await;
    assert_eq!((status, body), (200, json!(["NG-H27"])));
    let (status, _, body) = get("/api/ids", bob.clone()).await;
    assert_eq!((status, body), (200, json!(["NG-H27", "BRN-F27"])));
    // A conditional or ranged request gets the caller's own copy: never a 304 confirming a copy
    // made at an older rules version, never a range of the whole body.
    for (name, value) in [
        ("if-none-match", "*"),
        ("if-modified-since", "Mon, 01 Jan 2024 00:00:00 GMT"),
        ("range", "bytes=0-10"),
    ] {
        let r = http()
            .get(gateway.url("/api/prices"))
            .bearer_auth(&alice)
            .header(name, value)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{name}");
        // Decided for this caller: no shared cache in front of the gateway may keep it.
        let cc = r.headers()["cache-control"].to_str().unwrap().to_string();
        assert!(cc.starts_with("private") && !cc.contains("public"), "{cc}");
        assert_eq!(ids(&r.json().await.unwrap()), ["NG-H27"], "{name}");
    }
    // A HEAD answer does not tell the size of the whole list.
    let head = http().head(gateway.url("/api/prices")).bearer_auth(&alice).send().await.unwrap();
    assert_eq!(head.status(), 200);
    assert!(head.headers().get("content-length").is_none_or(|v| v == "0"), "{:?}", head.headers());
    // Cannot be filtered: refused, not passed on.
    let (status, _, body) = get("/api/text", alice.clone()).await;
    assert_eq!(
        (status, body["code"].as_str(), body["reason"].as_str()),
        (502, Some("upstream_unavailable"), Some("unfilterable_response")),
        "{body}"
    );
    let metrics = http().get(gateway.url("/metrics")).send().await.unwrap().text().await.unwrap();
    for reason in ["denied", "no_resource"] {
        assert!(
            metrics.lines().any(|l| l.starts_with("access_gateway_items_filtered_total")
                && l.contains("route=\"prices\"")
                && l.contains(&format!("reason=\"{reason}\""))),
            "{reason}: {metrics}"
        );
    }
}
