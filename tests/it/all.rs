//! `access all`: the built binary runs the five roles in one process with the embedded backends,
//! a sample upstream and sample updates; the roles share one auth (a logout at the auth role is
//! seen by the gateway).

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::support::{closed_port, http, wait_ready, DevKeys};

/// `access all` on free ports with the given extra environment and arguments; ready when this
/// returns, killed when dropped.
struct All {
    process: crate::support::Process,
    keys: DevKeys,
    gw: u16,
    st: u16,
    au: u16,
    en: u16,
    me: u16,
}

impl All {
    async fn start(extra_env: &[(&str, String)], extra_args: &[&str]) -> All {
        let keys = DevKeys::new();
        let mut ports = Vec::new();
        for _ in 0..6 {
            ports.push(closed_port().await);
        }
        let (gw, st, au, en, me, up) = (ports[0], ports[1], ports[2], ports[3], ports[4], ports[5]);
        let mut env = vec![
            ("ACCESS_GATEWAY__PORT", gw.to_string()),
            ("ACCESS_STREAM__PORT", st.to_string()),
            ("ACCESS_AUTH__PORT", au.to_string()),
            ("ACCESS_ENTITLEMENTS__PORT", en.to_string()),
            ("ACCESS_METRICS__PORT", me.to_string()),
            ("ACCESS_AUTH__DEV_KEY_FILE", keys.path.clone()),
            ("ACCESS_SERVER__HOST", "127.0.0.1".into()),
            ("ACCESS_SERVER__GRACE_PERIOD", "100ms".into()),
        ];
        env.extend(extra_env.iter().cloned());
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_access"))
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .args(["all", "--upstream-port", &up.to_string()])
            .args(extra_args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let process = crate::support::Process { child, url: format!("http://127.0.0.1:{gw}") };
        for port in [gw, st, au, en, me] {
            wait_ready(&format!("http://127.0.0.1:{port}")).await;
        }
        All { process, keys, gw, st, au, en, me }
    }
}

#[tokio::test]
async fn access_all_runs_the_whole_layer_in_one_process() {
    let mut all = All::start(&[], &[]).await;
    let (keys, gw, st, au, en, me) = (&all.keys, all.gw, all.st, all.au, all.en, all.me);
    let token = keys.token("alice", "t1", &["trader"]);
    let price = format!("http://127.0.0.1:{gw}/api/v1/prices/latest/NG-H27");
    let get = || http().get(&price).bearer_auth(&token).send();
    let first = get().await.unwrap();
    assert_eq!(first.status(), 200);
    assert_eq!(first.headers()["x-cache"], "MISS");
    assert!(first.headers().contains_key("ratelimit-remaining"));
    let body: Value = first.json().await.unwrap();
    assert_eq!(body["instrument_id"], "NG-H27", "the sample upstream answered: {body}");
    assert_eq!(get().await.unwrap().headers()["x-cache"], "HIT");

    // Sample updates reach a WebSocket subscriber.
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{st}/ws/stream?token={token}"))
            .await
            .unwrap();
    ws.send(Message::text(
        json!({"action": "subscribe", "topics": ["served.market.latest_prices.v1"]}).to_string(),
    ))
    .await
    .unwrap();
    let data = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(Ok(m)) = ws.next().await {
            if let Message::Text(t) = m {
                let v: Value = serde_json::from_str(&t).unwrap();
                if v["type"] == "data" {
                    return v;
                }
            }
        }
        panic!("the stream ended")
    })
    .await
    .expect("a sample update within 5s");
    assert!(data["data"]["price"].is_number(), "{data}");

    // Every role publishes its OpenAPI document, generated with its routes.
    for (port, path) in [
        (gw, "/api/v1/status"),
        (st, "/publish"),
        (au, "/auth/verify"),
        (en, "/entitlements/check"),
        (me, "/metrics/track"),
    ] {
        let doc: Value = http()
            .get(format!("http://127.0.0.1:{port}/openapi.json"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert!(doc["openapi"].as_str().unwrap().starts_with("3."), "{doc}");
        for p in [path, "/health", "/ready"] {
            assert!(doc["paths"].get(p).is_some(), "{p} on :{port}");
        }
        assert!(doc["components"]["schemas"]["ErrorBody"].is_object());
    }

    // One auth for every role: a logout at the auth role is seen by the gateway.
    let r = http()
        .post(format!("http://127.0.0.1:{au}/auth/logout"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let after = get().await.unwrap();
    assert_eq!(after.status(), 401);
    let status = all.process.terminate(Duration::from_secs(30)).await;
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn access_all_uses_the_real_backends_when_they_are_configured() {
    let db = crate::support::Db::new().await;
    let backends = [
        ("ACCESS_REDIS_URL", crate::support::REDIS_URL.to_string()),
        ("ACCESS_REDIS__PREFIX", crate::support::redis_prefix()),
        ("ACCESS_POSTGRES_DSN", db.dsn.clone()),
        ("ACCESS_KAFKA_BOOTSTRAP", crate::support::kafka_bootstrap()),
    ];
    let mut all = All::start(&backends, &["--no-samples"]).await;
    let (gw, st, en) = (all.gw, all.st, all.en);
    let admin = all.keys.token("root", "t1", &["admin"]);
    let get = |url: String, token: Option<String>| async move {
        let mut r = http().get(url);
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        r.send().await.unwrap().json::<Value>().await.unwrap()
    };
    let stats = get(format!("http://127.0.0.1:{st}/stats"), Some(admin.clone())).await;
    assert_eq!(stats["source"], "kafka", "{stats}");
    let stats = get(format!("http://127.0.0.1:{en}/entitlements/stats"), Some(admin)).await;
    assert_eq!(stats["store"], "postgres", "{stats}");
    let ready = get(format!("http://127.0.0.1:{gw}/ready"), None).await;
    let checks: Vec<&str> =
        ready["checks"].as_array().unwrap().iter().filter_map(|c| c["name"].as_str()).collect();
    assert!(checks.contains(&"redis"), "the gateway checks Redis: {ready}");
    let status = all.process.terminate(Duration::from_secs(30)).await;
    assert!(status.success(), "{status:?}");
}

/// The README's deny example under `access all`, without Redis: the in-process bus carries the
/// new rules version, and within a second the gateway refuses BRN-F27 and the stream stops
/// sending its prices to the same user, while her other instruments keep flowing.
#[tokio::test]
async fn the_readme_deny_reaches_the_gateway_and_the_stream_within_a_second_without_redis() {
    let mut all = All::start(&[], &[]).await;
    let (gw, st, en) = (all.gw, all.st, all.en);
    let token = all.keys.token("alice", "t1", &["trader"]);
    let admin = all.keys.token("root", "t1", &["admin"]);
    let brent = format!("http://127.0.0.1:{gw}/api/v1/prices/latest/BRN-F27");
    assert_eq!(http().get(&brent).bearer_auth(&token).send().await.unwrap().status(), 200);
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{st}/ws/stream?token={token}"))
            .await
            .unwrap();
    ws.send(Message::text(
        json!({"action": "subscribe", "topics": ["served.market.latest_prices.v1"]}).to_string(),
    ))
    .await
    .unwrap();
    // Instruments of the data frames that arrive within `within`.
    async fn instruments<S>(ws: &mut S, within: Duration) -> Vec<String>
    where
        S: futures::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
    {
        let deadline = tokio::time::Instant::now() + within;
        let mut seen = Vec::new();
        while let Ok(Some(Ok(m))) = tokio::time::timeout_at(deadline, ws.next()).await {
            if let Message::Text(t) = m {
                let v: Value = serde_json::from_str(&t).unwrap();
                if v["type"] == "data" {
                    seen.push(v["data"]["instrument_id"].as_str().unwrap_or("?").to_string());
                }
            }
        }
        seen
    }
    let before = instruments(&mut ws, Duration::from_millis(2500)).await;
    assert!(before.iter().any(|i| i == "BRN-F27"), "{before:?}");

    let started = std::time::Instant::now();
    let r = http()
        .post(format!("http://127.0.0.1:{en}/entitlements/rules"))
        .bearer_auth(&admin)
        .json(&json!({"name": "no-brent", "effect": "deny", "resource": "instrument:BRN-*",
            "actions": ["read"], "priority": 500}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let version = r.json::<Value>().await.unwrap()["version"].as_i64().unwrap();
    for port in [gw, st] {
        crate::support::eventually(Duration::from_secs(1), "the role applies the rule", || {
            let (url, admin) = (format!("http://127.0.0.1:{port}/entitlements/version"), &admin);
            async move {
                let v: Value =
                    http().get(url).bearer_auth(admin).send().await.ok()?.json().await.ok()?;
                (v["rules_version"].as_i64()? >= version).then_some(())
            }
        })
        .await;
    }
    println!("access all: the rule reached the gateway and the stream in {:?}", started.elapsed());
    assert_eq!(http().get(&brent).bearer_auth(&token).send().await.unwrap().status(), 403);
    // The bulk lists of the built-in routes leave it out of her copy, and only it.
    let list = |path: &str| {
        let url = format!("http://127.0.0.1:{gw}{path}");
        let token = token.clone();
        async move {
            http().get(url).bearer_auth(token).send().await.unwrap().json::<Value>().await.unwrap()
        }
    };
    let prices = list("/api/v1/prices/latest").await;
    let ids: Vec<&str> = prices["prices"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["instrument_id"].as_str())
        .collect();
    assert_eq!(ids, ["NG-H27", "WTI-G27", "TTF-H27", "PWR-DE-Q1"], "{prices}");
    let instruments_list = list("/api/v1/instruments").await;
    assert_eq!(
        instruments_list["instruments"],
        json!(["NG-H27", "WTI-G27", "TTF-H27", "PWR-DE-Q1"]),
        "{instruments_list}"
    );
    // Frames already on their way are drained; from then on no BRN-F27, the others still.
    instruments(&mut ws, Duration::from_millis(50)).await;
    let after = instruments(&mut ws, Duration::from_millis(2500)).await;
    assert!(!after.iter().any(|i| i == "BRN-F27"), "{after:?}");
    assert!(after.iter().any(|i| i == "NG-H27"), "{after:?}");
    // The entitlements role lists where every role of the process stands.
    let standing: Value = http()
        .get(format!("http://127.0.0.1:{en}/entitlements/version"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let roles: Vec<&str> = standing["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["role"].as_str())
        .collect();
    for role in ["entitlements", "gateway", "stream"] {
        assert!(roles.contains(&role), "{standing}");
    }
    let status = all.process.terminate(Duration::from_secs(30)).await;
    assert!(status.success(), "{status:?}");
}
