//! The stream role against the tansu broker (records produced with rskafka), the real
//! entitlements role, the auth role with Redis for revocations, and real WebSocket clients
//! (tokio-tungstenite). Topic names are unique per test: the broker is shared.

use std::time::Duration;

use access::role::Role;
use futures::{SinkExt, StreamExt};
use rskafka::client::partition::{Compression, UnknownTopicHandling};
use rskafka::client::{Client, ClientBuilder};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::support::{
    config, config_with_file, eventually, http, kafka_bootstrap, redis_prefix, start, wait_ready,
    DevKeys, Running, REDIS_URL,
};

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

const SEED: &str = r#"
- { name: traders-stream, effect: allow, resource: "market_data", actions: [subscribe], roles: [trader], priority: 10 }
- { name: admins, effect: allow, resource: "*", actions: ["*"], roles: [admin], priority: 900 }
"#;

pub struct Layer {
    _dir: tempfile::TempDir,
    pub keys: DevKeys,
    pub stream: Running,
    /// The stream's configuration, to start another replica like it.
    pub stream_config: access::roles::Settings,
    pub auth: Running,
    _entitlements: Running,
    /// Registry topic for `market_data` (traders may subscribe).
    pub prices: String,
    /// Registry topic for `curve` (traders may not).
    pub curves: String,
}

/// Starts entitlements, auth and the stream, sharing a dev key and a Redis prefix. With `kafka`,
/// the topics are created on that broker first.
pub async fn layer(kafka: Option<&str>, toml: &str, extra: &[(&str, &str)]) -> Layer {
    layer_on(REDIS_URL, kafka, toml, extra).await
}

/// As [`layer`], every role on the Redis at `redis` (a `redis-cluster://` URL, say).
pub async fn layer_on(
    redis: &str,
    kafka: Option<&str>,
    toml: &str,
    extra: &[(&str, &str)],
) -> Layer {
    let dir = tempfile::tempdir().unwrap();
    let keys = DevKeys::new();
    let seed = dir.path().join("seed.yaml");
    std::fs::write(&seed, SEED).unwrap();
    let seed = seed.display().to_string();
    let prefix = redis_prefix();
    let id = uuid::Uuid::new_v4().simple().to_string();
    let (prices, curves) = (format!("prices-{id}"), format!("curves-{id}"));
    if let Some(bootstrap) = kafka {
        let client = kafka_client(bootstrap).await;
        for topic in [&prices, &curves] {
            create_topic(&client, topic).await;
        }
    }
    let common = [
        ("ACCESS_AUTH__DEV_KEY_FILE", keys.path.as_str()),
        ("ACCESS_REDIS_URL", redis),
        ("ACCESS_REDIS__PREFIX", prefix.as_str()),
    ];
    let mut env = common.to_vec();
    env.push(("ACCESS_ENTITLEMENTS__SEED_FILE", &seed));
    let entitlements = start(Role::Entitlements, config(&env)).await;
    wait_ready(&entitlements.url("")).await;
    let auth = start(Role::Auth, config(&common)).await;
    wait_ready(&auth.url("")).await;
    let ent_url = entitlements.url("");
    let mut env = common.to_vec();
    env.push(("ACCESS_ENTITLEMENTS_SERVICE_URL", &ent_url));
    env.push(("ACCESS_STREAM__FETCH_WAIT", "5ms"));
    env.push(("ACCESS_STREAM__METADATA_REFRESH", "200ms"));
    if let Some(bootstrap) = kafka {
        env.push(("ACCESS_KAFKA_BOOTSTRAP", bootstrap));
    }
    env.extend_from_slice(extra);
    let file = format!(
        r#"
[[stream.topics]]
name = "{prices}"
resource = "market_data"
description = "prices"
[[stream.topics]]
name = "{curves}"
resource = "curve"
{toml}
"#
    );
    let stream_config = config_with_file(&file, &env);
    let stream = start(Role::Stream, stream_config.clone()).await;
    wait_ready(&stream.url("")).await;
    Layer {
        _dir: dir,
        keys,
        stream,
        stream_config,
        auth,
        _entitlements: entitlements,
        prices,
        curves,
    }
}

impl Layer {
    /// The stream's `/stats`, read with an admin token (it needs the admin or service role).
    pub async fn stats(&self) -> Value {
        let admin = self.keys.token("root", "t0", &["admin"]);
        let r = http().get(self.stream.url("/stats")).bearer_auth(admin).send().await.unwrap();
        r.json().await.unwrap()
    }

    pub fn ws_url(&self, token: Option<&str>) -> String {
        let base = self.stream.url("/ws/stream").replacen("http://", "ws://", 1);
        match token {
            Some(t) => format!("{base}?token={t}"),
            None => base,
        }
    }

    /// Connects with the token in the query, reads `connection_established`, subscribes.
    pub async fn subscribed(&self, token: &str, topics: &[&str], filters: Value) -> (Ws, Value) {
        let (mut ws, _) = tokio_tungstenite::connect_async(self.ws_url(Some(token))).await.unwrap();
        let hello = next_json(&mut ws).await;
        assert_eq!(hello["type"], "connection_established", "{hello}");
        send(
            &mut ws,
            json!({"action": "subscribe", "topics": topics, "filters": filters, "id": 1}),
        )
        .await;
        let answer = next_json(&mut ws).await;
        assert_eq!(answer["type"], "subscribed", "{answer}");
        (ws, answer)
    }

    /// Publishes through `POST /publish` with a service token.
    pub async fn publish(&self, topic: &str, key: &str, data: Value) -> Value {
        let token = self.keys.token("publisher", "platform", &["service"]);
        publish(&http(), &self.stream.url("/publish"), &token, topic, key, data).await
    }

    /// Connects, reads `connection_established`, and subscribes to `topic` from `position`;
    /// returns the answer.
    pub async fn resumed(&self, token: &str, topic: &str, position: &str) -> (Ws, Value) {
        let (mut ws, _) = tokio_tungstenite::connect_async(self.ws_url(Some(token))).await.unwrap();
        next_json(&mut ws).await;
        send(&mut ws, json!({"action": "subscribe", "topics": [topic], "position": position}))
            .await;
        let answer = next_json(&mut ws).await;
        (ws, answer)
    }
}

/// `POST /publish` at `url` with `token` through `client`; the answer must be 200.
pub async fn publish(
    client: &reqwest::Client,
    url: &str,
    token: &str,
    topic: &str,
    key: &str,
    data: Value,
) -> Value {
    let r = client
        .post(url)
        .bearer_auth(token)
        .json(&json!({"topic": topic, "key": key, "data": data}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

pub async fn kafka_client(bootstrap: &str) -> Client {
    ClientBuilder::new(vec![bootstrap.to_string()]).build().await.unwrap()
}

pub async fn create_topic(client: &Client, topic: &str) {
    client.controller_client().unwrap().create_topic(topic, 1, 1, 5_000).await.unwrap();
}

/// Produces JSON values to partition 0 of `topic`; returns their offsets.
pub async fn produce(client: &Client, topic: &str, values: &[Value]) -> Vec<i64> {
    let partition = client.partition_client(topic, 0, UnknownTopicHandling::Retry).await.unwrap();
    let records = values
        .iter()
        .map(|v| rskafka::record::Record {
            key: v.get("instrument_id").and_then(Value::as_str).map(|k| k.as_bytes().to_vec()),
            value: Some(v.to_string().into_bytes()),
            headers: Default::default(),
            timestamp: chrono::Utc::now(),
        })
        .collect();
    partition.produce(records, Compression::NoCompression).await.unwrap()
}

pub async fn send(ws: &mut Ws, value: Value) {
    ws.send(Message::text(value.to_string())).await.unwrap();
}

/// The next JSON frame (pings skipped), within 5 s.
pub async fn next_json(ws: &mut Ws) -> Value {
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("a frame within 5s")
            .expect("the connection is open")
            .expect("a valid frame");
        match frame {
            Message::Text(t) => return serde_json::from_str(&t).unwrap(),
            Message::Close(c) => panic!("closed: {c:?}"),
            _ => continue,
        }
    }
}

/// Reads until the server closes; the close code (None if the TCP connection just ended).
pub async fn close_code(ws: &mut Ws, within: Duration) -> Option<u16> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let frame = tokio::time::timeout_at(deadline, ws.next()).await.expect("closed in time");
        match frame {
            Some(Ok(Message::Close(c))) => return c.map(|c| u16::from(c.code)),
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => return None,
        }
    }
}

/// The data frames that arrive within `quiet` of each other (stops at the first gap).
async fn data_frames(ws: &mut Ws, quiet: Duration) -> Vec<Value> {
    let mut out = Vec::new();
    while let Ok(Some(Ok(frame))) = tokio::time::timeout(quiet, ws.next()).await {
        if let Message::Text(t) = frame {
            let v: Value = serde_json::from_str(&t).unwrap();
            if v["type"] == "data" {
                out.push(v);
            }
        }
    }
    out
}

/// Data frames until at least `n` arrived (or `within` passed).
async fn collect(ws: &mut Ws, n: usize, within: Duration) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + within;
    let mut got = Vec::new();
    while got.len() < n && tokio::time::Instant::now() < deadline {
        got.extend(data_frames(ws, Duration::from_millis(300)).await);
    }
    got
}

fn instruments(frames: &[Value]) -> Vec<String> {
    frames.iter().map(|f| f["data"]["instrument_id"].as_str().unwrap_or("?").to_string()).collect()
}

#[tokio::test]
async fn kafka_records_reach_subscribers_through_filters_and_tenant_scoping() {
    let bootstrap = kafka_bootstrap();
    let l = layer(Some(&bootstrap), "", &[]).await;
    let alice = l.keys.token("alice", "t1", &["trader"]);
    let bob = l.keys.token("bob", "t2", &["trader"]);
    let filter = json!({ l.prices.clone(): {"instrument_id": ["NG"], "price": {"gte": 2}} });
    let (mut a, answer) = l.subscribed(&alice, &[&l.prices], filter).await;
    assert_eq!(answer["topics"], json!([l.prices]));
    let (mut b, _) = l.subscribed(&bob, &[&l.prices], json!({})).await;

    let kafka = kafka_client(&bootstrap).await;
    let offsets = produce(
        &kafka,
        &l.prices,
        &[
            json!({"instrument_id": "NG", "price": 2.5}),
            json!({"instrument_id": "NG", "price": 1.5}),
            json!({"instrument_id": "BRN", "price": 80}),
            json!({"instrument_id": "NG", "price": 3, "tenant_id": "t2"}),
            json!({"instrument_id": "NG", "price": 4, "tenant_id": "t1"}),
        ],
    )
    .await;

    let got_a = data_frames(&mut a, Duration::from_millis(1500)).await;
    let got_b = data_frames(&mut b, Duration::from_millis(500)).await;
    let prices = |frames: &[Value]| -> Vec<f64> {
        frames.iter().map(|f| f["data"]["price"].as_f64().unwrap()).collect()
    };
    assert_eq!(prices(&got_a), vec![2.5, 4.0], "alice: her filter and her tenant only");
    assert_eq!(prices(&got_b), vec![2.5, 1.5, 80.0, 3.0], "bob: everything but t1's record");
    let first = &got_a[0];
    assert_eq!(first["topic"], l.prices);
    assert_eq!(
        (first["partition"].as_i64(), first["offset"].as_i64()),
        (Some(0), Some(offsets[0]))
    );
    assert_eq!(first["key"], "NG");
    let age = chrono::Utc::now().timestamp_millis() - first["timestamp"].as_i64().unwrap();
    assert!((0..10_000).contains(&age), "the Kafka timestamp in ms: {first}");

    let stats = l.stats().await;
    assert_eq!(stats["connections"], 2, "{stats}");
    assert_eq!(stats["subscriptions"][&l.prices], 2);
    assert_eq!(stats["source"], "kafka");
    let partition = stats["kafka"]["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["topic"] == l.prices)
        .unwrap();
    assert_eq!(partition["lag"], 0, "{partition}");
    // POST /publish goes to Kafka (its own producing client) and comes back through the consumer.
    let position = l
        .publish(&l.prices, "NG", json!({"instrument_id": "NG", "price": 9.5, "tenant_id": "t2"}))
        .await;
    assert_eq!(position["offset"].as_i64(), Some(offsets[4] + 1), "{position}");
    let via_publish = next_json(&mut b).await;
    assert_eq!(
        (via_publish["data"]["price"].as_f64(), via_publish["offset"].as_i64()),
        (Some(9.5), Some(offsets[4] + 1))
    );
    let metrics = http().get(l.stream.url("/metrics")).send().await.unwrap().text().await.unwrap();
    for name in [
        "access_stream_connections",
        "access_stream_delivery_latency_seconds_bucket",
        "access_stream_kafka_lag",
        "access_stream_messages_delivered_total",
    ] {
        assert!(metrics.contains(name), "{name} exported");
    }
}

#[tokio::test]
async fn subscriptions_are_entitled_per_topic_and_bad_frames_keep_the_connection() {
    let l = layer(None, "", &[]).await;
    let alice = l.keys.token("alice", "t1", &["trader"]);
    let (mut ws, answer) = l.subscribed(&alice, &[&l.prices, &l.curves, "nope"], json!({})).await;
    assert_eq!(answer["topics"], json!([l.prices]));
    assert_eq!(answer["id"], 1);
    let failed = answer["failed"].as_array().unwrap();
    let code_of = |t: &str| failed.iter().find(|f| f["topic"] == t).map(|f| f["code"].clone());
    assert_eq!(code_of(&l.curves), Some(json!("forbidden")));
    assert_eq!(code_of("nope"), Some(json!("unknown_topic")));

    ws.send(Message::text("{not json")).await.unwrap();
    assert_eq!(next_json(&mut ws).await["code"], "malformed_message");
    send(&mut ws, json!({"action": "dance", "id": "x"})).await;
    let e = next_json(&mut ws).await;
    assert_eq!(
        (e["type"].as_str(), e["code"].as_str(), e["id"].as_str()),
        (Some("error"), Some("unknown_action"), Some("x"))
    );
    send(&mut ws, json!({"action": "subscribe", "topics": [l.prices], "filters": {l.prices.clone(): {"p": {"near": 1}}}})).await;
    assert_eq!(next_json(&mut ws).await["failed"][0]["code"], "invalid_filter");
    send(&mut ws, json!({"action": "ping", "id": 7})).await;
    let pong = next_json(&mut ws).await;
    assert_eq!((pong["type"].as_str(), pong["id"].as_i64()), (Some("pong"), Some(7)));
    send(&mut ws, json!({"action": "list_topics"})).await;
    let topics = next_json(&mut ws).await;
    let listed: Vec<(String, bool)> = topics["topics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["name"].as_str().unwrap().to_string(), t["subscribed"].as_bool().unwrap()))
        .collect();
    assert_eq!(listed, vec![(l.prices.clone(), true), (l.curves.clone(), false)]);

    // The embedded bus: a publish reaches the subscriber; only services and admins may publish.
    let position = l.publish(&l.prices, "NG", json!({"instrument_id": "NG", "price": 1})).await;
    assert_eq!(position, json!({"topic": l.prices, "partition": 0, "offset": 0}));
    let frame = next_json(&mut ws).await;
    assert_eq!(
        (frame["type"].as_str(), frame["offset"].as_i64(), frame["key"].as_str()),
        (Some("data"), Some(0), Some("NG"))
    );
    let post = |token: String, body: Value| {
        let url = l.stream.url("/publish");
        async move { http().post(url).bearer_auth(token).json(&body).send().await.unwrap() }
    };
    let r = post(alice.clone(), json!({"topic": l.prices, "data": {}})).await;
    assert_eq!(r.status(), 403);
    let service = l.keys.token("svc", "platform", &["service"]);
    let r = post(service.clone(), json!({"topic": "nope", "data": {}})).await;
    assert_eq!(r.status(), 422);
    assert_eq!(r.json::<Value>().await.unwrap()["field"], "topic");
    let r = post(service, json!({"topic": l.prices, "data": [1]})).await;
    assert_eq!(r.status(), 422);

    send(&mut ws, json!({"action": "unsubscribe", "topics": [l.prices]})).await;
    assert_eq!(next_json(&mut ws).await["topics"], json!([l.prices]));
    send(&mut ws, json!({"action": "get_stats"})).await;
    let stats = next_json(&mut ws).await;
    assert_eq!(
        (stats["type"].as_str(), stats["messages_sent"].as_u64()),
        (Some("stats"), Some(1)),
        "{stats}"
    );
    assert_eq!(stats["subscriptions"], json!([]));
}

#[tokio::test]
async fn tokens_come_from_the_query_a_header_or_the_first_frame() {
    let l = layer(
        None,
        "[stream]\nauth_timeout = \"500ms\"\nallowed_origins = [\"https://app.254carbon.local\"]\n",
        &[],
    )
    .await;
    let alice = l.keys.token("alice", "t1", &["trader"]);

    // Header.
    let mut req = l.ws_url(None).into_client_request().unwrap();
    req.headers_mut().insert("authorization", format!("Bearer {alice}").parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(next_json(&mut ws).await["user_id"], "alice");

    // First frame.
    let (mut ws, _) = tokio_tungstenite::connect_async(l.ws_url(None)).await.unwrap();
    send(&mut ws, json!({"action": "ping"})).await;
    assert_eq!(next_json(&mut ws).await["code"], "unauthenticated", "actions wait for auth");
    send(&mut ws, json!({"action": "auth", "token": alice})).await;
    let hello = next_json(&mut ws).await;
    assert_eq!(
        (hello["type"].as_str(), hello["tenant_id"].as_str()),
        (Some("connection_established"), Some("t1"))
    );

    // No auth frame in time; a bad token in the first frame.
    let (mut ws, _) = tokio_tungstenite::connect_async(l.ws_url(None)).await.unwrap();
    assert_eq!(close_code(&mut ws, Duration::from_secs(3)).await, Some(4001));
    let (mut ws, _) = tokio_tungstenite::connect_async(l.ws_url(None)).await.unwrap();
    send(&mut ws, json!({"action": "auth", "token": "not.a.jwt"})).await;
    assert_eq!(next_json(&mut ws).await["reason"], "malformed");
    assert_eq!(close_code(&mut ws, Duration::from_secs(3)).await, Some(4001));

    // A bad token with the upgrade: HTTP 401 with the JSON error body, never an upgrade.
    let refused = |url: String| async move {
        match tokio_tungstenite::connect_async(url).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) => r,
            other => panic!("expected an HTTP refusal, got {:?}", other.map(|(_, r)| r.status())),
        }
    };
    let r = refused(l.ws_url(Some("bad"))).await;
    assert_eq!(r.status(), 401);
    let body: Value = serde_json::from_slice(r.body().as_deref().unwrap()).unwrap();
    assert_eq!(
        (body["code"].as_str(), body["reason"].as_str()),
        (Some("unauthenticated"), Some("malformed"))
    );

    // Origins: the allow-list, and none at all for non-browser clients.
    let mut req = l.ws_url(Some(&alice)).into_client_request().unwrap();
    req.headers_mut().insert("origin", "https://evil.example".parse().unwrap());
    match tokio_tungstenite::connect_async(req).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 403),
        other => panic!("expected 403, got {:?}", other.map(|(_, r)| r.status())),
    }
    let mut req = l.ws_url(Some(&alice)).into_client_request().unwrap();
    req.headers_mut().insert("origin", "https://app.254carbon.local".parse().unwrap());
    assert!(tokio_tungstenite::connect_async(req).await.is_ok());

    // Not a WebSocket request at all.
    let r = http().get(l.stream.url("/ws/stream")).send().await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.json::<Value>().await.unwrap()["code"], "invalid_request");
}

#[tokio::test]
async fn revoked_tokens_and_users_lose_their_streams_within_a_second() {
    let l = layer(None, "", &[]).await;
    let alice = l.keys.token("alice", "t1", &["trader"]);
    let alice2 = l.keys.token("alice", "t1", &["trader"]);
    let bob = l.keys.token("bob", "t1", &["trader"]);
    let (mut a1, _) = l.subscribed(&alice, &[&l.prices], json!({})).await;
    let (mut a2, _) = l.subscribed(&alice2, &[&l.prices], json!({})).await;
    let (mut b, _) = l.subscribed(&bob, &[&l.prices], json!({})).await;

    // Logout revokes one token: that connection closes, alice's other one stays.
    let r = http().post(l.auth.url("/auth/logout")).bearer_auth(&alice).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let started = std::time::Instant::now();
    assert_eq!(close_code(&mut a1, Duration::from_secs(1)).await, Some(4003));
    println!("token revocation closed the stream in {:?}", started.elapsed());
    send(&mut a2, json!({"action": "ping"})).await;
    assert_eq!(next_json(&mut a2).await["type"], "pong");

    // Revoking the user closes all of hers; bob keeps his.
    let admin = l.keys.token("root", "t1", &["admin"]);
    let r = http()
        .post(l.auth.url("/auth/users/alice/revoke"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(close_code(&mut a2, Duration::from_secs(1)).await, Some(4003));
    send(&mut b, json!({"action": "ping"})).await;
    assert_eq!(next_json(&mut b).await["type"], "pong");
}

#[tokio::test]
async fn a_slow_client_is_cut_off_while_a_fast_one_keeps_up() {
    let l = layer(None, "[stream.limits]\nsend_queue = 8\n", &[]).await;
    let (mut fast, _) =
        l.subscribed(&l.keys.token("fast", "t1", &["trader"]), &[&l.prices], json!({})).await;
    let (mut slow, _) =
        l.subscribed(&l.keys.token("slow", "t1", &["trader"]), &[&l.prices], json!({})).await;
    // The slow client never reads: once the kernel's buffers are full its queue fills.
    let blob = "x".repeat(64 * 1024);
    let total = 400;
    let reader = tokio::spawn(async move {
        let mut seen = Vec::new();
        while seen.len() < total {
            let f = next_json(&mut fast).await;
            seen.push(f["offset"].as_i64().unwrap());
        }
        (fast, seen)
    });
    for i in 0..total {
        l.publish(&l.prices, "k", json!({"i": i, "blob": blob})).await;
    }
    let (mut fast, seen) = reader.await.unwrap();
    assert_eq!(
        seen,
        (0..total as i64).collect::<Vec<_>>(),
        "the fast client got every record in order"
    );
    let stats = l.stats().await;
    assert_eq!(stats["slow_consumer_closes"], 1, "{stats}");
    assert!(stats["messages_dropped"].as_u64().unwrap() >= 1);
    assert_eq!(stats["connections"], 1, "the slow connection is gone: {stats}");
    // The slow client, reading at last, finds its stream ended (a 4008 close if the frame fit).
    let code = close_code(&mut slow, Duration::from_secs(5)).await;
    assert!(matches!(code, Some(4008) | None), "{code:?}");
    send(&mut fast, json!({"action": "ping"})).await;
    assert_eq!(next_json(&mut fast).await["type"], "pong");
}

#[tokio::test]
async fn tokens_expire_unless_renewed_and_limits_hold() {
    let l = layer(
        None,
        "[stream.limits]\nmax_connections_per_user = 2\n",
        &[("ACCESS_AUTH__LEEWAY", "0s")],
    )
    .await;
    let short = |sub: &str| l.keys.token_for(sub, "t1", &["trader"], Duration::from_secs(2));
    let (mut renewed, _) = l.subscribed(&short("carol"), &[&l.prices], json!({})).await;
    let (mut lapsed, _) = l.subscribed(&short("dave"), &[&l.prices], json!({})).await;
    send(
        &mut renewed,
        json!({"action": "auth", "token": l.keys.token("carol", "t1", &["trader"]), "id": 2}),
    )
    .await;
    let answer = next_json(&mut renewed).await;
    assert_eq!(answer["type"], "authenticated", "{answer}");
    send(
        &mut renewed,
        json!({"action": "auth", "token": l.keys.token("mallory", "t1", &["trader"])}),
    )
    .await;
    assert_eq!(next_json(&mut renewed).await["code"], "identity_mismatch");
    let code = close_code(&mut lapsed, Duration::from_secs(5)).await;
    assert_eq!(code, Some(4002), "an expired token closes its stream");
    send(&mut renewed, json!({"action": "ping"})).await;
    assert_eq!(next_json(&mut renewed).await["type"], "pong", "the renewed one lives on");

    let carol = l.keys.token("carol", "t1", &["trader"]);
    let (_second, _) = l.subscribed(&carol, &[&l.prices], json!({})).await;
    match tokio_tungstenite::connect_async(l.ws_url(Some(&carol))).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
            assert_eq!(r.status(), 429);
            let body: Value = serde_json::from_slice(r.body().as_deref().unwrap()).unwrap();
            assert_eq!(body["reason"], "user_limit");
        }
        other => panic!("expected 429, got {:?}", other.map(|(_, r)| r.status())),
    }
}

#[tokio::test]
async fn shutdown_closes_every_connection_with_going_away() {
    let l = layer(None, "", &[]).await;
    let mut clients = Vec::new();
    for user in ["u1", "u2", "u3"] {
        clients.push(
            l.subscribed(&l.keys.token(user, "t1", &["trader"]), &[&l.prices], json!({})).await.0,
        );
    }
    l.stream.shutdown().stop();
    for ws in &mut clients {
        assert_eq!(close_code(ws, Duration::from_secs(3)).await, Some(1001));
    }
    let Running { handle, .. } = l.stream;
    let ended = tokio::time::timeout(Duration::from_secs(10), handle).await;
    assert!(matches!(ended, Ok(Ok(Ok(())))), "the role returned cleanly: {ended:?}");
}

/// With I/O threads (`server.io_threads`) the hub still reaches every client, though their sockets
/// live on the I/O threads' runtimes, and shutdown still closes each with 1001.
#[tokio::test]
async fn io_threads_deliver_to_every_client_and_close_them_on_shutdown() {
    let bootstrap = kafka_bootstrap();
    let l = layer(Some(&bootstrap), "", &[("ACCESS_SERVER__IO_THREADS", "2")]).await;
    let mut clients = Vec::new();
    for user in ["u1", "u2", "u3", "u4"] {
        let token = l.keys.token(user, "t1", &["trader"]);
        clients.push(l.subscribed(&token, &[&l.prices], json!({})).await.0);
    }
    let kafka = kafka_client(&bootstrap).await;
    let values = [
        json!({"instrument_id": "NG", "price": 2.5}),
        json!({"instrument_id": "BRN", "price": 80}),
    ];
    produce(&kafka, &l.prices, &values).await;
    for ws in &mut clients {
        let frames = collect(ws, 2, Duration::from_secs(5)).await;
        assert_eq!(instruments(&frames), vec!["NG", "BRN"]);
    }
    l.stream.shutdown().stop();
    for ws in &mut clients {
        assert_eq!(close_code(ws, Duration::from_secs(3)).await, Some(1001));
    }
    let Running { handle, .. } = l.stream;
    let ended = tokio::time::timeout(Duration::from_secs(10), handle).await;
    assert!(matches!(ended, Ok(Ok(Ok(())))), "the role returned cleanly: {ended:?}");
}

/// A private tansu with sqlite storage, for restarts; killed when dropped.
struct PrivateTansu {
    child: Option<std::process::Child>,
    port: u16,
    /// The working directory: tansu resolves `sqlite://tansu.db` against it.
    dir: tempfile::TempDir,
}

impl PrivateTansu {
    async fn start() -> PrivateTansu {
        let dir = tempfile::tempdir().unwrap();
        let mut t = PrivateTansu { child: None, port: crate::support::closed_port().await, dir };
        t.up().await;
        t
    }

    async fn up(&mut self) {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let tansu = std::env::var("ACCESS_TEST_TANSU").unwrap_or_else(|_| "tansu".into());
        let child = std::process::Command::new(tansu)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
                "--storage-engine",
                "sqlite://tansu.db",
            ])
            .current_dir(self.dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("tansu (tests/services.sh installs it)");
        self.child = Some(child);
        let port = self.port;
        eventually(Duration::from_secs(10), "private tansu up", || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()
        })
        .await;
    }

    fn down(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for PrivateTansu {
    fn drop(&mut self) {
        self.down();
    }
}

#[tokio::test]
async fn the_stream_continues_without_a_duplicate_after_the_broker_restarts() {
    let mut broker = PrivateTansu::start().await;
    let l = layer(Some(&broker.bootstrap()), "", &[]).await;
    let (mut ws, _) =
        l.subscribed(&l.keys.token("alice", "t1", &["trader"]), &[&l.prices], json!({})).await;
    let kafka = kafka_client(&broker.bootstrap()).await;
    let before: Vec<Value> = (0..3).map(|i| json!({"instrument_id": format!("A{i}")})).collect();
    produce(&kafka, &l.prices, &before).await;
    let got = data_frames(&mut ws, Duration::from_millis(1500)).await;
    assert_eq!(instruments(&got), vec!["A0", "A1", "A2"]);

    broker.down();
    tokio::time::sleep(Duration::from_millis(500)).await;
    broker.up().await;
    let kafka = kafka_client(&broker.bootstrap()).await;
    let after: Vec<Value> = (0..3).map(|i| json!({"instrument_id": format!("B{i}")})).collect();
    produce(&kafka, &l.prices, &after).await;
    let mut got = collect(&mut ws, 3, Duration::from_secs(20)).await;
    got.extend(data_frames(&mut ws, Duration::from_millis(500)).await);
    assert_eq!(instruments(&got), vec!["B0", "B1", "B2"], "every record once, none again");
    let offsets: Vec<i64> = got.iter().map(|f| f["offset"].as_i64().unwrap()).collect();
    assert_eq!(offsets, vec![3, 4, 5]);
}

#[tokio::test]
async fn a_recreated_topic_is_read_from_its_start() {
    let bootstrap = kafka_bootstrap();
    let l = layer(Some(&bootstrap), "", &[]).await;
    let (mut ws, _) =
        l.subscribed(&l.keys.token("alice", "t1", &["trader"]), &[&l.prices], json!({})).await;
    let kafka = kafka_client(&bootstrap).await;
    let first: Vec<Value> = (0..5).map(|i| json!({"instrument_id": format!("A{i}")})).collect();
    produce(&kafka, &l.prices, &first).await;
    assert_eq!(data_frames(&mut ws, Duration::from_millis(1500)).await.len(), 5);

    kafka.controller_client().unwrap().delete_topic(&l.prices, 5_000).await.unwrap();
    create_topic(&kafka, &l.prices).await;
    let kafka = kafka_client(&bootstrap).await;
    produce(&kafka, &l.prices, &[json!({"instrument_id": "NEW"})]).await;
    let got = collect(&mut ws, 1, Duration::from_secs(10)).await;
    assert_eq!(instruments(&got), vec!["NEW"]);
    assert_eq!(got[0]["offset"], 0);
}

#[tokio::test]
async fn silent_clients_are_closed_and_new_connections_are_rate_limited() {
    let toml = "[stream]\nping_interval = \"200ms\"\npong_timeout = \"200ms\"\n[stream.limits.connect_rate]\nrate = 1\nperiod = \"1m\"\nburst = 3\n";
    let l = layer(None, toml, &[]).await;
    let alice = l.keys.token("alice", "t1", &["trader"]);
    // A client that never reads never answers the server's pings.
    let (mut silent, _) = l.subscribed(&alice, &[&l.prices], json!({})).await;
    let (mut awake, _) = l.subscribed(&alice, &[&l.prices], json!({})).await;
    let keep_awake = tokio::spawn(async move {
        // Reading answers pings (tungstenite replies on the next read or write).
        let end = tokio::time::Instant::now() + Duration::from_millis(1200);
        while tokio::time::Instant::now() < end {
            let _ = tokio::time::timeout(Duration::from_millis(50), awake.next()).await;
        }
        awake
    });
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(close_code(&mut silent, Duration::from_secs(2)).await, Some(4009));
    let mut awake = keep_awake.await.unwrap();
    send(&mut awake, json!({"action": "ping"})).await;
    assert_eq!(next_json(&mut awake).await["type"], "pong", "a client that reads stays");

    // Burst 3 new connections, then 1 a minute: the fourth is refused with Retry-After.
    let _third = tokio_tungstenite::connect_async(l.ws_url(Some(&alice))).await.unwrap();
    match tokio_tungstenite::connect_async(l.ws_url(Some(&alice))).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
            assert_eq!(r.status(), 429);
            assert!(r.headers().contains_key("retry-after"));
        }
        other => panic!("expected 429, got {:?}", other.map(|(_, r)| r.status())),
    }
}

/// `access subscribe ... | head -1`: once the reader is gone, the client stops quietly (exit 0,
/// no panic) at its next write.
#[tokio::test]
async fn the_subscribe_client_exits_quietly_when_its_reader_goes() {
    use std::io::BufRead;
    let l = layer(None, "", &[]).await;
    let alice = l.keys.token("alice", "t1", &["trader"]);
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_access"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("ACCESS_TOKEN", &alice)
        .args(["subscribe", "--url", &l.ws_url(None), "--topic", &l.prices])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let first = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        line
        // The reader goes, as `head -1` does: the pipe's read end closes here.
    })
    .await
    .unwrap();
    assert!(first.contains("\"type\":\"connection_established\""), "{first}");
    // Its next line (the subscription's answer, or a record) meets the closed pipe.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(tokio::time::Instant::now() < deadline, "the client did not exit");
        l.publish(&l.prices, "k", json!({"instrument_id": "k"})).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(status.code(), Some(0), "{stderr}");
}
