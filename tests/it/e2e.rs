//! End to end: the layer as it runs in the cluster. Five `access` processes configured the way the
//! chart renders them (ACCESS_* environment, `--config` file with the topic registry, the
//! PostgreSQL DSN and the dev key read from files), against the real Redis, PostgreSQL and tansu,
//! with a real Prometheus scraping all of them; a trader's day, asserted as the user sees it, with
//! the time each step took.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::sse::SseClient;
use crate::stream::{close_code, create_topic, kafka_client, next_json, produce, send};
use crate::support::{
    closed_port, eventually, http, kafka_bootstrap, redis_prefix, spawn_binary_with, Db, Process,
    REDIS_URL,
};

/// A private Prometheus (Debian's package) scraping `targets` every second; killed when dropped.
struct Prometheus {
    child: std::process::Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    async fn start(targets: &[(&str, &str)]) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let mut scrape = String::new();
        for (role, url) in targets {
            let host = url.trim_start_matches("http://");
            scrape.push_str(&format!(
                "      - targets: ['{host}']\n        labels: {{role: {role}}}\n"
            ));
        }
        let config = format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\nscrape_configs:\n  - job_name: access\n    static_configs:\n{scrape}"
        );
        std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
        let port = closed_port().await;
        let child = std::process::Command::new("prometheus")
            .args([
                &format!("--config.file={}", dir.path().join("prometheus.yml").display()),
                &format!("--storage.tsdb.path={}", dir.path().join("data").display()),
                &format!("--web.listen-address=127.0.0.1:{port}"),
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("prometheus (Debian's package, installed by tests/services.sh)");
        let url = format!("http://127.0.0.1:{port}");
        let ready = format!("{url}/-/ready");
        eventually(Duration::from_secs(20), "prometheus ready", || {
            let ready = ready.clone();
            async move { http().get(ready).send().await.ok().filter(|r| r.status() == 200) }
        })
        .await;
        Prometheus { child, url, _dir: dir }
    }

    async fn query(&self, promql: &str) -> Vec<Value> {
        let r: Value = http()
            .get(format!("{}/api/v1/query", self.url))
            .query(&[("query", promql)])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        r["data"]["result"].as_array().cloned().unwrap_or_default()
    }
}

struct Steps(Instant);

impl Steps {
    fn done(&mut self, what: &str) {
        println!("e2e: {what}: {:.2} s", self.0.elapsed().as_secs_f64());
        self.0 = Instant::now();
    }
}

#[tokio::test]
async fn a_traders_day_through_the_whole_layer() {
    let mut steps = Steps(Instant::now());
    let dir = tempfile::tempdir().unwrap();
    // The chart mounts a PEM dev key from a Secret and the DSN as a file.
    let key_path = dir.path().join("dev-key.pem");
    let ec = openssl::ec::EcKey::generate(
        &openssl::ec::EcGroup::from_curve_name(openssl::nid::Nid::X9_62_PRIME256V1).unwrap(),
    )
    .unwrap();
    std::fs::write(&key_path, ec.private_key_to_pem().unwrap()).unwrap();
    let signer = access::auth::devkey::DevKey::load_or_create(&key_path).unwrap();
    let token = |sub: &str, roles: &[&str]| {
        let roles: Vec<String> = roles.iter().map(|r| r.to_string()).collect();
        signer
            .issue(&access::auth::devkey::TokenRequest {
                subject: sub,
                tenant: "t1",
                roles: &roles,
                ttl: Duration::from_secs(3600),
                issuer: None,
                audience: None,
            })
            .unwrap()
    };
    let db = Db::new().await;
    let dsn_file = dir.path().join("postgres-dsn");
    std::fs::write(&dsn_file, &db.dsn).unwrap();
    let bootstrap = kafka_bootstrap();
    let topic = format!("e2e-prices-{}", uuid::Uuid::new_v4().simple());
    create_topic(&kafka_client(&bootstrap).await, &topic).await;
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_url = format!("http://{}", upstream.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(upstream, access::sample::upstream()).await });
    // What the chart's access-files ConfigMap holds, plus the test's upstream and a tight limit.
    let config_file = dir.path().join("access.yaml");
    std::fs::write(
        &config_file,
        format!(
            "stream:\n  topics:\n    - {{name: {topic}, resource: market_data}}\n  fetch_wait: 5ms\n  metadata_refresh: 200ms\n  usage_interval: 200ms\n\
             gateway:\n  usage_interval: 200ms\n  upstreams:\n    market_data: ['{upstream_url}']\n    curves: ['{upstream_url}']\n    projections: ['{upstream_url}']\n\
             \x20 rate_limits:\n    market_data: {{rate: 30, period: 1m, burst: 6}}\n"
        ),
    )
    .unwrap();
    let config_arg = config_file.display().to_string();
    let prefix = redis_prefix();
    let key = key_path.display().to_string();
    let dsn = dsn_file.display().to_string();
    // What the chart's access-config ConfigMap and Deployment env hold.
    let mut env: Vec<(&str, String)> = vec![
        ("ACCESS_ENV", "development".into()),
        ("ACCESS_LOG_LEVEL", "info".into()),
        ("ACCESS_REDIS_URL", REDIS_URL.into()),
        ("ACCESS_REDIS__PREFIX", prefix.clone()),
        ("ACCESS_KAFKA_BOOTSTRAP", bootstrap.clone()),
        ("ACCESS_POSTGRES_DSN_FILE", dsn),
        ("ACCESS_AUTH__DEV_KEY_FILE", key),
        ("ACCESS_ENABLE_TRACING", "false".into()),
    ];
    let spawn = |role: &str, env: &[(&str, String)]| {
        let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        spawn_binary_with(role, &pairs, &["--config", &config_arg])
    };
    let auth = spawn("auth", &env);
    let entitlements = spawn("entitlements", &env);
    let metrics = spawn("metrics", &env);
    env.push(("ACCESS_AUTH_SERVICE_URL", auth.url.clone()));
    env.push(("ACCESS_ENTITLEMENTS_SERVICE_URL", entitlements.url.clone()));
    env.push(("ACCESS_METRICS_SERVICE_URL", metrics.url.clone()));
    let gateway = spawn("gateway", &env);
    let stream = spawn("stream", &env);
    let roles: [(&str, &Process); 5] = [
        ("auth", &auth),
        ("entitlements", &entitlements),
        ("metrics", &metrics),
        ("gateway", &gateway),
        ("stream", &stream),
    ];
    for (_, p) in &roles {
        crate::support::wait_ready(&p.url).await;
    }
    let targets: Vec<(&str, &str)> = roles.iter().map(|(r, p)| (*r, p.url.as_str())).collect();
    let prometheus = Prometheus::start(&targets).await;
    steps.done("five roles and Prometheus up");

    // 1. An admin creates rules; the trader gets an allowed instrument, 403 for a denied one, and
    //    the second identical call is a cache hit.
    let admin = token("root", &["admin"]);
    let trader = token("alice", &["trader"]);
    for rule in [
        json!({"name": "traders-read", "effect": "allow", "resource": "instrument:*", "actions": ["read"], "roles": ["trader"], "priority": 100}),
        json!({"name": "traders-stream", "effect": "allow", "resource": "market_data", "actions": ["read", "subscribe"], "roles": ["trader"], "priority": 100}),
        json!({"name": "no-brent", "effect": "deny", "resource": "instrument:BRN-*", "actions": ["read"], "priority": 500}),
    ] {
        let r = http()
            .post(format!("{}/entitlements/rules", entitlements.url))
            .bearer_auth(&admin)
            .json(&rule)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "{:?}", r.text().await);
    }
    let price = |id: &str| format!("{}/api/v1/prices/latest/{id}", gateway.url);
    let r = http().get(price("NG-H27")).bearer_auth(&trader).send().await.unwrap();
    assert_eq!((r.status().as_u16(), r.headers()["x-cache"].to_str().unwrap()), (200, "MISS"));
    let r = http().get(price("BRN-F27")).bearer_auth(&trader).send().await.unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(r.json::<Value>().await.unwrap()["code"], "forbidden");
    let r = http().get(price("NG-H27")).bearer_auth(&trader).send().await.unwrap();
    assert_eq!((r.status().as_u16(), r.headers()["x-cache"].to_str().unwrap()), (200, "HIT"));
    steps.done("1. rules, an allowed instrument, a denied one, a cache hit");

    // 2. The trader exceeds the rate limit (burst 6 for market data) and gets 429 with Retry-After.
    let limited = loop {
        let r = http().get(price("NG-H27")).bearer_auth(&trader).send().await.unwrap();
        if r.status() == 429 {
            break r;
        }
        assert_eq!(r.status(), 200);
    };
    assert!(limited.headers()["retry-after"].to_str().unwrap().parse::<u64>().unwrap() >= 1);
    let body: Value = limited.json().await.unwrap();
    assert_eq!(body["code"], "rate_limited");
    assert!(body["retry_after"].as_u64().unwrap() >= 1);
    steps.done("2. 429 with Retry-After");

    // 3. WebSocket and SSE subscribers get a record produced to Kafka; a reconnect with the last
    //    position misses nothing.
    let ws_url = format!("{}/ws/stream?token={trader}", stream.url.replacen("http", "ws", 1));
    let (mut ws, _) = tokio_tungstenite::connect_async(&ws_url).await.unwrap();
    next_json(&mut ws).await;
    send(&mut ws, json!({"action": "subscribe", "topics": [topic]})).await;
    let answer = next_json(&mut ws).await;
    assert_eq!(answer["topics"], json!([topic]), "{answer}");
    let sse_url = format!("{}/sse/stream?topics={topic}&token={trader}", stream.url);
    let mut sse = SseClient::open(sse_url.clone(), None).await;
    assert_eq!(sse.next().await.event, "connection_established");
    let kafka = kafka_client(&bootstrap).await;
    produce(&kafka, &topic, &[json!({"instrument_id": "NG-H27", "price": 3.1})]).await;
    let on_ws = next_json(&mut ws).await;
    let on_sse = sse.next().await;
    assert_eq!(
        (on_ws["data"]["price"].as_f64(), on_sse.data["data"]["price"].as_f64()),
        (Some(3.1), Some(3.1))
    );
    let last_seen = on_sse.id.clone();
    drop(sse);
    produce(&kafka, &topic, &[json!({"instrument_id": "NG-H27", "price": 3.2})]).await;
    assert_eq!(next_json(&mut ws).await["data"]["price"], 3.2);
    let mut sse = SseClient::open(sse_url, last_seen.as_deref()).await;
    let hello = sse.next().await;
    assert_eq!(hello.data["recovered"], true, "{hello:?}");
    assert_eq!(sse.next().await.data["data"]["price"], 3.2, "the record produced while away");
    steps.done("3. a record on WebSocket and SSE; a resume misses nothing");

    // 4. The admin revokes the trader: the next gateway call is 401 and both streams close.
    let r = http()
        .post(format!("{}/auth/users/alice/revoke", auth.url))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = http().get(price("NG-H27")).bearer_auth(&trader).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.json::<Value>().await.unwrap()["reason"], "revoked");
    assert_eq!(close_code(&mut ws, Duration::from_secs(2)).await, Some(4003));
    let close = sse.next().await;
    assert_eq!((close.event.as_str(), close.data["code"].as_str()), ("close", Some("revoked")));
    let _ = ws.close(None).await;
    steps.done("4. revoked: 401 at the gateway, both streams closed");

    // 5. Prometheus scraped every role, and the usage pushed to the metrics role is queryable.
    eventually(Duration::from_secs(20), "up == 1 for all five roles", || {
        let p = &prometheus;
        async move {
            let up = p.query("up{job=\"access\"} == 1").await;
            (up.len() == 5).then_some(())
        }
    })
    .await;
    let usage = eventually(Duration::from_secs(20), "usage of tenant t1 in Prometheus", || {
        let p = &prometheus;
        async move {
            let r = p.query("sum(access_usage_requests_total{tenant_id=\"t1\"})").await;
            r.first()
                .and_then(|s| s["value"][1].as_str().and_then(|v| v.parse::<f64>().ok()))
                .filter(|v| *v >= 3.0)
        }
    })
    .await;
    println!("e2e: usage requests of tenant t1 in Prometheus: {usage}");
    let messages =
        eventually(Duration::from_secs(20), "stream usage of tenant t1 in Prometheus", || {
            let p = &prometheus;
            async move {
                let r = p.query("sum(access_usage_messages_total{tenant_id=\"t1\"})").await;
                r.first()
                    .and_then(|s| s["value"][1].as_str().and_then(|v| v.parse::<f64>().ok()))
                    .filter(|v| *v >= 3.0)
            }
        })
        .await;
    println!("e2e: stream messages of tenant t1 in Prometheus: {messages}");
    steps.done("5. Prometheus: every role up, usage queryable");
}
