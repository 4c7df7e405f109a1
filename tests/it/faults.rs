//! The fault suite: each dependency killed or frozen under a steady load, against private
//! instances only (a private redis-server, PostgreSQL cluster, broker proxy), never the machine's
//! shared servers. Each test asserts the decisions and the latency bound: once a backend's breaker
//! is open, no request waits for that backend's timeout.

use std::time::{Duration, Instant};

use access::roles::Role;
use axum::routing::get;
use axum::Router;
use serde_json::Value;

use crate::support::{
    config, config_with_file, eventually, http, redis_prefix, start, wait_ready, DevKeys,
    PrivateRedis, Running,
};

/// An upstream answering every path, cacheable for a minute.
async fn upstream() -> String {
    let app = Router::new()
        .route("/{*rest}", get(|| async { ([(http::header::CACHE_CONTROL, "max-age=60")], "ok") }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

/// How Redis fails.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// The process is killed: connections are refused.
    Killed,
    /// SIGSTOP: connections stay open and nothing answers.
    Frozen,
}

/// A gateway and an entitlements role sharing one private Redis, with a route that asks the
/// entitlements role for every new instrument (`/px/{id}`) and a cached route (`/cached/{id}`).
struct Layer {
    _dir: tempfile::TempDir,
    keys: DevKeys,
    redis: PrivateRedis,
    gateway: Running,
    entitlements: Running,
}

async fn layer(mode: &str) -> Layer {
    let dir = tempfile::tempdir().unwrap();
    let up = upstream().await;
    let routes = dir.path().join("routes.yaml");
    std::fs::write(
        &routes,
        format!(
            r#"
routes:
  - {{ name: px, path: "/px/{{instrument_id}}", upstreams: ["{up}"], auth: required, rate_limits: [roomy], entitlement: {{ resource: "instrument:{{instrument_id}}" }} }}
  - {{ name: cached, path: "/cached/{{id}}", upstreams: ["{up}"], auth: required, rate_limits: [roomy], cache: {{}} }}
rate_limits:
  roomy: {{ rate: 100000, period: 1s, burst: 100000 }}
"#
        ),
    )
    .unwrap();
    let keys = DevKeys::new();
    let redis = PrivateRedis::start().await;
    let prefix = redis_prefix();
    let common = [
        ("ACCESS_AUTH__DEV_KEY_FILE", keys.path.as_str()),
        ("ACCESS_REDIS_URL", redis.url.as_str()),
        ("ACCESS_REDIS__PREFIX", prefix.as_str()),
    ];
    let entitlements = start(Role::Entitlements, config(&common)).await;
    wait_ready(&entitlements.url("")).await;
    let ent_url = entitlements.url("/");
    let mut env = common.to_vec();
    env.push(("ACCESS_GATEWAY__ROUTES_FILE", routes.to_str().unwrap()));
    env.push(("ACCESS_ENTITLEMENTS_SERVICE_URL", ent_url.as_str()));
    let toml = format!("[gateway]\nrate_limit_on_store_error = \"{mode}\"\n");
    let gateway = start(Role::Gateway, config_with_file(&toml, &env)).await;
    wait_ready(&gateway.url("")).await;
    Layer { _dir: dir, keys, redis, gateway, entitlements }
}

async fn get_status(url: &str, token: &str) -> (u16, Value) {
    let r = http().get(url).bearer_auth(token).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn ready(url: &str) -> (u16, Value) {
    let r = http().get(format!("{url}/ready")).send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

/// Requests one at a time for `window` after the fault, each on a new instrument (so each asks
/// the entitlements role, whose decision cache is in the failed Redis) or a cached route; returns
/// (time since the fault, status, latency) of each.
async fn load(l: &Layer, token: &str, fault_at: Instant, window: Duration) -> Vec<(f64, u16, f64)> {
    let mut seen = Vec::new();
    let mut i = 0u32;
    while fault_at.elapsed() < window {
        i += 1;
        let path = if i % 2 == 0 { format!("/px/I{i}") } else { format!("/cached/{}", i % 7) };
        let sent = Instant::now();
        let (status, _) = get_status(&l.gateway.url(&path), token).await;
        seen.push((
            sent.duration_since(fault_at).as_secs_f64(),
            status,
            sent.elapsed().as_secs_f64(),
        ));
    }
    seen
}

async fn redis_fails_under_load(mode: &str, fault: Fault) {
    let mut l = layer(mode).await;
    let token = l.keys.token("alice", "t1", &["trader"]);
    // Warm: the token is verified (and cached), the routes answer.
    assert_eq!(get_status(&l.gateway.url("/px/WARM"), &token).await.0, 200);
    assert_eq!(get_status(&l.gateway.url("/cached/0"), &token).await.0, 200);
    let fault_at = Instant::now();
    match fault {
        Fault::Killed => l.redis.stop(),
        Fault::Frozen => l.redis.freeze(),
    }
    let seen = load(&l, &token, fault_at, Duration::from_millis(2500)).await;
    let settled: Vec<_> = seen.iter().filter(|(at, _, _)| *at >= 1.0).collect();
    assert!(settled.len() >= 5, "{mode} {fault:?}: too few requests after 1 s: {seen:?}");
    let statuses: Vec<u16> = settled.iter().map(|(_, s, _)| *s).collect();
    assert!(statuses.iter().all(|s| *s == 200), "{mode} {fault:?}: every request served: {seen:?}");
    let slowest = settled.iter().map(|(_, _, took)| *took).fold(0.0, f64::max);
    // The Redis timeout is 2 s and a call is given up after `trip_after` (500 ms): no request
    // after the breakers opened waited for either (a debug build on a shared machine takes up to
    // a tenth of a second per request; the figures script measures a release build).
    assert!(slowest < 0.4, "{mode} {fault:?}: slowest request {slowest:.3} s: {seen:?}");
    // Readiness: both roles keep serving with a documented fallback, so both are ready, degraded.
    for (role, url) in [("gateway", l.gateway.url("")), ("entitlements", l.entitlements.url(""))] {
        let (status, body) = ready(&url).await;
        assert_eq!(
            (status, body["status"].as_str()),
            (200, Some("degraded")),
            "{mode} {fault:?}: {role} /ready: {body}"
        );
    }
    // A token not yet verified cannot be checked for revocation: refused at once, as documented.
    let fresh = l.keys.token("bob", "t1", &["trader"]);
    let sent = Instant::now();
    let (status, body) = get_status(&l.gateway.url("/px/NEW"), &fresh).await;
    assert_eq!((status, body["code"].as_str()), (503, Some("dependency_unavailable")), "{body}");
    assert!(sent.elapsed() < Duration::from_millis(400), "refused at once: {:?}", sent.elapsed());
    if let Fault::Frozen = fault {
        l.redis.thaw();
        // A probe closes the breakers: ready again, and a new token is checked again.
        for url in [l.gateway.url(""), l.entitlements.url("")] {
            eventually(Duration::from_secs(10), "ready again after the thaw", || async {
                let (status, body) = ready(&url).await;
                (status == 200 && body["status"] == "ready").then_some(())
            })
            .await;
        }
        eventually(Duration::from_secs(10), "a new token verified after the thaw", || async {
            (get_status(&l.gateway.url("/px/AGAIN"), &fresh).await.0 == 200).then_some(())
        })
        .await;
    }
}

#[tokio::test]
async fn redis_killed_local_mode_serves_at_full_speed_and_stays_ready() {
    redis_fails_under_load("local", Fault::Killed).await;
}

#[tokio::test]
async fn redis_killed_open_mode_serves_at_full_speed_and_stays_ready() {
    redis_fails_under_load("open", Fault::Killed).await;
}

#[tokio::test]
async fn redis_frozen_local_mode_serves_at_full_speed_and_recovers() {
    redis_fails_under_load("local", Fault::Frozen).await;
}

#[tokio::test]
async fn redis_frozen_open_mode_serves_at_full_speed_and_recovers() {
    redis_fails_under_load("open", Fault::Frozen).await;
}

/// `closed` cannot serve without Redis: the gateway refuses at once (503, never after the
/// timeout) and is not ready, since every request would fail.
#[tokio::test]
async fn redis_frozen_closed_mode_refuses_at_once_and_is_not_ready() {
    let l = layer("closed").await;
    let token = l.keys.token("alice", "t1", &["trader"]);
    assert_eq!(get_status(&l.gateway.url("/px/WARM"), &token).await.0, 200);
    let fault_at = Instant::now();
    l.redis.freeze();
    let seen = load(&l, &token, fault_at, Duration::from_millis(2000)).await;
    let settled: Vec<_> = seen.iter().filter(|(at, _, _)| *at >= 1.0).collect();
    assert!(settled.len() >= 5, "too few requests after 1 s: {seen:?}");
    assert!(settled.iter().all(|(_, s, took)| *s == 503 && *took < 0.4), "{seen:?}");
    let (status, body) = ready(&l.gateway.url("")).await;
    assert_eq!((status, body["status"].as_str()), (503, Some("not_ready")), "{body}");
    l.redis.thaw();
}

/// A TCP proxy in front of a broker that can go silent: while silent, every byte either way is
/// read and dropped (no reset, no close), as when a network drops packets. Connections whose
/// first Kafka request names the client id `exempt` are never silenced (the test's producer).
struct SilentProxy {
    port: u16,
    silent: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for SilentProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The client id in a Kafka request frame (length, api key, version, correlation id, client id).
fn kafka_client_id(frame: &[u8]) -> Option<String> {
    let len = i16::from_be_bytes([*frame.get(8)?, *frame.get(9)?]);
    let id = frame.get(10..10 + usize::try_from(len).ok()?)?;
    String::from_utf8(id.to_vec()).ok()
}

impl SilentProxy {
    async fn start(listener: tokio::net::TcpListener, target: u16, exempt: &'static str) -> Self {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let port = listener.local_addr().unwrap().port();
        let silent = Arc::new(AtomicBool::new(false));
        let flag = silent.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let flag = flag.clone();
                tokio::spawn(async move {
                    let Ok(mut server) =
                        tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                    else {
                        return;
                    };
                    // The first request frame tells who the client is.
                    let mut len = [0u8; 4];
                    if client.read_exact(&mut len).await.is_err() {
                        return;
                    }
                    let mut first = vec![0u8; i32::from_be_bytes(len).max(0) as usize];
                    if client.read_exact(&mut first).await.is_err() {
                        return;
                    }
                    let exempt = kafka_client_id(&first).as_deref() == Some(exempt);
                    let dropping = move || !exempt && flag.load(Ordering::SeqCst);
                    if !dropping() {
                        let _ = server.write_all(&len).await;
                        let _ = server.write_all(&first).await;
                    }
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let d = dropping.clone();
                    let up = async move {
                        let mut buf = vec![0u8; 64 * 1024];
                        while let Ok(n @ 1..) = cr.read(&mut buf).await {
                            if !d() && sw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    };
                    let down = async move {
                        let mut buf = vec![0u8; 64 * 1024];
                        while let Ok(n @ 1..) = sr.read(&mut buf).await {
                            if !dropping() && cw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    };
                    // Either side ending ends both (a reset or close passes through).
                    tokio::select! { _ = up => {}, _ = down => {} }
                });
            }
        });
        SilentProxy { port, silent, task }
    }

    fn silence(&self, on: bool) {
        self.silent.store(on, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A private tansu that advertises the proxy's address, so every connection of its clients goes
/// through the proxy.
struct ProxiedTansu {
    child: std::process::Child,
    _dir: tempfile::TempDir,
    proxy: SilentProxy,
}

impl Drop for ProxiedTansu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const EXEMPT: &str = "fault-producer";

impl ProxiedTansu {
    async fn start() -> ProxiedTansu {
        let dir = tempfile::tempdir().unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy_port = listener.local_addr().unwrap().port();
        let port = crate::support::closed_port().await;
        let tansu = std::env::var("ACCESS_TEST_TANSU").unwrap_or_else(|_| "tansu".into());
        let child = std::process::Command::new(tansu)
            .args([
                "broker",
                "--listener-url",
                &format!("tcp://127.0.0.1:{port}"),
                "--advertised-listener-url",
                &format!("tcp://127.0.0.1:{proxy_port}"),
                "--storage-engine",
                "memory://tansu/",
            ])
            .current_dir(dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("tansu (tests/services.sh installs it)");
        eventually(Duration::from_secs(10), "private tansu up", || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()
        })
        .await;
        let proxy = SilentProxy::start(listener, port, EXEMPT).await;
        ProxiedTansu { child, _dir: dir, proxy }
    }

    fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.proxy.port)
    }

    /// A client the proxy never silences.
    async fn producer(&self) -> rskafka::client::Client {
        rskafka::client::ClientBuilder::new(vec![self.bootstrap()])
            .client_id(EXEMPT)
            .build()
            .await
            .unwrap()
    }
}

/// The broker's connections go silent (packets dropped, no reset) for longer than the request
/// deadline, then heal: clients are told their data is delayed, and when it is no more; every
/// record produced meanwhile reaches every client, in order, once; readiness follows the broker;
/// the first missed record arrives soon after the heal.
#[tokio::test]
async fn a_silent_broker_stalls_nothing_once_it_heals() {
    use crate::stream::{layer, next_json, produce};
    use serde_json::json;
    let broker = ProxiedTansu::start().await;
    let bootstrap = broker.bootstrap();
    let l = layer(
        Some(&bootstrap),
        // The default request deadline (fetch_wait 20 ms + margin 1 s); a short delay notice.
        "[stream]\ndelay_notice = \"1s\"\n",
        &[("ACCESS_STREAM__FETCH_WAIT", "20ms")],
    )
    .await;
    let token = |who: &str| l.keys.token(who, "t1", &["trader"]);
    let mut clients = Vec::new();
    for who in ["alice", "bob"] {
        clients.push(l.subscribed(&token(who), &[&l.prices], json!({})).await.0);
    }
    let kafka = broker.producer().await;
    produce(&kafka, &l.prices, &[json!({"instrument_id": "BEFORE"})]).await;
    for ws in &mut clients {
        assert_eq!(next_json(ws).await["data"]["instrument_id"], "BEFORE");
    }

    broker.proxy.silence(true);
    let silent_at = Instant::now();
    let mut produced = Vec::new();
    while silent_at.elapsed() < Duration::from_secs(3) {
        let i = produced.len();
        let value = json!({"instrument_id": format!("S{i}")});
        produce(&kafka, &l.prices, std::slice::from_ref(&value)).await;
        produced.push(format!("S{i}"));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Readiness follows the broker.
    let (status, body) = ready(&l.stream.url("")).await;
    assert_eq!(status, 503, "not ready while the broker is silent: {body}");
    // Clients were told (the notice is a frame of its own, with the partition and the last read).
    for ws in &mut clients {
        let notice = next_json(ws).await;
        assert_eq!(
            (notice["type"].as_str(), notice["partition"].as_i64()),
            (Some("delayed"), Some(0)),
            "{notice}"
        );
        assert_eq!(notice["topic"], l.prices.as_str());
    }

    broker.proxy.silence(false);
    let healed_at = Instant::now();
    for (n, ws) in clients.iter_mut().enumerate() {
        let mut got = Vec::new();
        let mut first_after = None;
        let mut ended = false;
        while got.len() < produced.len() || !ended {
            let frame =
                tokio::time::timeout(Duration::from_secs(10), next_json(ws)).await.unwrap_or_else(
                    |_| panic!("client {n}: {} of {} records", got.len(), produced.len()),
                );
            match frame["type"].as_str() {
                Some("data") => {
                    first_after.get_or_insert(healed_at.elapsed());
                    got.push(frame["data"]["instrument_id"].as_str().unwrap().to_string());
                }
                Some("delay_ended") => ended = true,
                _ => panic!("client {n}: unexpected {frame}"),
            }
        }
        assert_eq!(got, produced, "client {n}: every record once, in order");
        let first = first_after.unwrap();
        println!("faults: first missed record {:.2} s after the heal", first.as_secs_f64());
        assert!(first < Duration::from_secs(3), "client {n}: first missed record after {first:?}");
    }
    eventually(Duration::from_secs(5), "ready after the heal", || async {
        (ready(&l.stream.url("")).await.0 == 200).then_some(())
    })
    .await;
}

/// A client-credentials token endpoint issuing tokens that live `lifetime` seconds; while down it
/// answers 503.
struct TokenEndpoint {
    url: url::Url,
    down: std::sync::Arc<std::sync::atomic::AtomicBool>,
    fetches: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl TokenEndpoint {
    async fn start(lifetime: u64) -> TokenEndpoint {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        use std::sync::Arc;
        let down = Arc::new(AtomicBool::new(false));
        let fetches = Arc::new(AtomicUsize::new(0));
        let (d, f) = (down.clone(), fetches.clone());
        let app = Router::new().route(
            "/token",
            axum::routing::post(move || {
                let (d, f) = (d.clone(), f.clone());
                async move {
                    let n = f.fetch_add(1, Ordering::SeqCst);
                    if d.load(Ordering::SeqCst) {
                        return (http::StatusCode::SERVICE_UNAVAILABLE, String::new());
                    }
                    let body = serde_json::json!({"access_token": format!("token-{n}"), "expires_in": lifetime});
                    (http::StatusCode::OK, body.to_string())
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/token", listener.local_addr().unwrap()).parse().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        TokenEndpoint { url, down, fetches }
    }
}

/// The token endpoint goes down before the renewal point (80% of a 2 s token): the current
/// token is used until it expires, renewal is retried with backoff (not on every call), failures
/// are counted, and once the endpoint is back a new token is fetched.
#[tokio::test]
async fn a_token_endpoint_down_across_the_renewal_point_keeps_the_current_token() {
    use access::auth::token_source::TokenSource;
    use std::sync::atomic::Ordering;
    let idp = TokenEndpoint::start(2).await;
    let source = TokenSource::client_credentials(
        idp.url.clone(),
        "gateway".into(),
        access::config::Secret::new("s3cret"),
        Duration::from_secs(1),
    )
    .unwrap();
    let fetched_at = Instant::now();
    let first = source.token().await.unwrap();
    idp.down.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1650).saturating_sub(fetched_at.elapsed())).await;
    // Past the renewal point, the endpoint down: the current token, at once.
    let sent = Instant::now();
    assert_eq!(source.token().await.as_deref(), Ok(first.as_str()), "renewal due, endpoint down");
    assert!(sent.elapsed() < Duration::from_millis(200));
    assert_eq!(source.renewal_failures(), 1);
    for _ in 0..10 {
        assert_eq!(source.token().await.as_deref(), Ok(first.as_str()));
    }
    assert_eq!(source.renewal_failures(), 1, "retried after a backoff, not on every call");
    // Once it expired (less the margin), and the endpoint still down: an error.
    tokio::time::sleep(Duration::from_millis(2000).saturating_sub(fetched_at.elapsed())).await;
    assert!(source.token().await.is_err(), "an expired token is never used");
    idp.down.store(false, Ordering::SeqCst);
    let renewed =
        eventually(Duration::from_secs(5), "a new token once the endpoint is back", || async {
            source.token().await.ok()
        })
        .await;
    assert_ne!(renewed, first);
    assert!(idp.fetches.load(Ordering::SeqCst) >= 3);
}

/// PostgreSQL killed under API-key traffic: keys seen recently keep working from their cached
/// records, at full speed; wrong secrets are refused from the cache; a key never seen cannot be
/// checked (503 at once); the gateway stays ready, degraded; it is ready again once PostgreSQL is.
#[tokio::test]
async fn postgres_killed_api_keys_seen_recently_keep_working() {
    use access::auth::api_keys::{ApiKeys, NewKey, PgKeys};
    let pg = crate::support::PrivatePostgres::start().await;
    let dsn = access::config::Secret::new(pg.dsn());
    let pool =
        access::backends::postgres::connect_and_migrate(&dsn, &Default::default()).await.unwrap();
    let keys = ApiKeys::new(std::sync::Arc::new(PgKeys::new(pool)));
    let new =
        NewKey { name: "bot".into(), tenant_id: "t1".into(), roles: vec![], expires_at: None };
    let (key, text) = keys.create(new, "root").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let up = upstream().await;
    let routes = dir.path().join("routes.yaml");
    std::fs::write(
        &routes,
        format!(
            "routes:\n  - {{ name: k, path: \"/k\", upstreams: [\"{up}\"], auth: required }}\n"
        ),
    )
    .unwrap();
    let dev = DevKeys::new();
    let gateway = start(
        Role::Gateway,
        config(&[
            ("ACCESS_AUTH__DEV_KEY_FILE", dev.path.as_str()),
            ("ACCESS_POSTGRES_DSN", &pg.dsn()),
            ("ACCESS_GATEWAY__ROUTES_FILE", routes.to_str().unwrap()),
        ]),
    )
    .await;
    wait_ready(&gateway.url("")).await;
    let call = |k: String| {
        let url = gateway.url("/k");
        async move {
            let sent = Instant::now();
            let r = http().get(url).header("x-api-key", k).send().await.unwrap();
            let status = r.status().as_u16();
            let body: Value = r.json().await.unwrap_or(Value::Null);
            (status, body, sent.elapsed())
        }
    };
    assert_eq!(call(text.clone()).await.0, 200);
    let down_at = Instant::now();
    pg.down();
    let mut seen = Vec::new();
    while down_at.elapsed() < Duration::from_millis(2500) {
        let (status, _, took) = call(text.clone()).await;
        seen.push((down_at.elapsed().as_secs_f64(), status, took.as_secs_f64()));
    }
    let settled: Vec<_> = seen.iter().filter(|(at, _, _)| *at >= 1.0).collect();
    assert!(settled.len() >= 5, "{seen:?}");
    assert!(settled.iter().all(|(_, s, took)| *s == 200 && *took < 0.4), "{seen:?}");
    let (status, body, took) = call(format!("ak_{}_wrong", key.id)).await;
    assert_eq!((status, body["reason"].as_str()), (401, Some("bad_signature")), "{body}");
    assert!(took < Duration::from_millis(400));
    let (status, body, took) = call("ak_0123456789ab_nope".into()).await;
    assert_eq!((status, body["code"].as_str()), (503, Some("dependency_unavailable")), "{body}");
    assert!(took < Duration::from_millis(400), "refused at once: {took:?}");
    let (status, body) = ready(&gateway.url("")).await;
    assert_eq!((status, body["status"].as_str()), (200, Some("degraded")), "{body}");
    pg.up();
    eventually(Duration::from_secs(15), "ready again with PostgreSQL back", || async {
        let (status, body) = ready(&gateway.url("")).await;
        (status == 200 && body["status"] == "ready").then_some(())
    })
    .await;
}

/// RFC 6455 close codes: a message over the limit is closed with 1009, a text message that is not
/// UTF-8 with 1007 (before, the connection just dropped).
#[tokio::test]
async fn websocket_messages_too_big_or_not_utf8_get_their_close_codes() {
    use crate::stream::{close_code, layer, next_json};
    use futures::SinkExt;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    use tokio_tungstenite::tungstenite::Message;
    let l = layer(None, "[stream]\nmax_message_bytes = 1024\n", &[]).await;
    let token = l.keys.token("alice", "t1", &["trader"]);
    let open = || async {
        let (mut ws, _) = tokio_tungstenite::connect_async(l.ws_url(Some(&token))).await.unwrap();
        assert_eq!(next_json(&mut ws).await["type"], "connection_established");
        ws
    };
    let mut ws = open().await;
    ws.send(Message::text("x".repeat(4096))).await.unwrap();
    assert_eq!(close_code(&mut ws, Duration::from_secs(3)).await, Some(1009), "too big");
    let mut ws = open().await;
    let invalid = Frame::message(vec![b'{', 0xff, 0xfe, b'}'], OpCode::Data(Data::Text), true);
    ws.send(Message::Frame(invalid)).await.unwrap();
    assert_eq!(close_code(&mut ws, Duration::from_secs(3)).await, Some(1007), "not UTF-8");
}

/// A resume asked while the broker is silent answers `recovered: false` within the relay timeout
/// (before, it got no answer until the broker returned).
#[tokio::test]
async fn a_resume_while_the_broker_is_silent_answers_in_time() {
    use crate::stream::{layer, next_json, produce};
    use serde_json::json;
    let broker = ProxiedTansu::start().await;
    let l = layer(
        Some(&broker.bootstrap()),
        "[stream]\nkafka_request_margin = \"500ms\"\nrelay_timeout = \"700ms\"\n",
        &[],
    )
    .await;
    let token = l.keys.token("alice", "t1", &["trader"]);
    let (mut ws, answer) = l.subscribed(&token, &[&l.prices], json!({})).await;
    let position = answer["position"].as_str().unwrap().to_string();
    let kafka = broker.producer().await;
    produce(&kafka, &l.prices, &[json!({"instrument_id": "A"}), json!({"instrument_id": "B"})])
        .await;
    for _ in 0..2 {
        assert_eq!(next_json(&mut ws).await["type"], "data");
    }
    broker.proxy.silence(true);
    let asked = Instant::now();
    let (_resumed, answer) = l.resumed(&token, &l.prices, &position).await;
    let took = asked.elapsed();
    assert_eq!(answer["type"], "subscribed", "{answer}");
    assert_eq!(answer["recovered"], false, "{answer}");
    assert!(took < Duration::from_millis(1500), "answered within the relay timeout: {took:?}");
    broker.proxy.silence(false);
}

/// Tenant isolation fails closed: a record whose `tenant_id` is present but not a string (a
/// number, a list, an object, `true`, null) reaches no tenant, live on WebSocket and SSE, and on
/// an SSE resume; a string `tenant_id` reaches its tenant only.
#[tokio::test]
async fn records_with_a_tenant_id_that_is_not_a_string_reach_no_tenant() {
    use crate::sse::{sse_url, SseClient};
    use crate::stream::{layer, next_json};
    use serde_json::json;
    let l = layer(None, "", &[]).await;
    let alice = l.keys.token("alice", "t1", &["trader"]);
    let (mut ws, _) = l.subscribed(&alice, &[&l.prices], json!({})).await;
    let mut sse = SseClient::open(sse_url(&l, &alice, &[&l.prices]), None).await;
    let hello = sse.next().await;
    let position = hello.id.clone().unwrap();
    let odd = [json!(1), json!(["t1"]), json!({"id": "t1"}), json!(true), Value::Null];
    for (i, tenant) in odd.iter().enumerate() {
        l.publish(&l.prices, "X", json!({"instrument_id": format!("ODD{i}"), "tenant_id": tenant}))
            .await;
    }
    l.publish(&l.prices, "X", json!({"instrument_id": "OTHER", "tenant_id": "t2"})).await;
    l.publish(&l.prices, "X", json!({"instrument_id": "MINE", "tenant_id": "t1"})).await;
    l.publish(&l.prices, "X", json!({"instrument_id": "ALL"})).await;
    let expected = ["MINE", "ALL"];
    for want in expected {
        assert_eq!(next_json(&mut ws).await["data"]["instrument_id"], want, "websocket");
        assert_eq!(sse.next().await.data["data"]["instrument_id"], want, "sse");
    }
    // On resume, from before those records: the same two.
    let mut resumed = SseClient::open(sse_url(&l, &alice, &[&l.prices]), Some(&position)).await;
    let hello = resumed.next().await;
    assert_eq!(hello.data["recovered"], true, "{:?}", hello.data);
    for want in expected {
        assert_eq!(resumed.next().await.data["data"]["instrument_id"], want, "sse resume");
    }
    assert!(resumed.next_within(Duration::from_millis(300)).await.is_none());
    let metrics = http().get(l.stream.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(
        metrics.lines().any(|line| line.starts_with("access_stream_messages_dropped_total{")
            && line.contains("invalid_tenant")),
        "counted as invalid_tenant"
    );
}
