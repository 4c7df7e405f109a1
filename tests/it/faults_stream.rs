//! The fault suite, stream side: a TCP proxy between the stream and a private tansu that drops
//! packets silently and heals, a resume while the broker is silent, WebSocket close codes, and
//! records whose tenant is not a string. Private instances only (never the shared broker).

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::faults::ready;
use crate::support::{eventually, http};

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
    use crate::sse::{sse_url, SseClient};
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
    let mut sse = SseClient::open(sse_url(&l, &token("carol"), &[&l.prices]), None).await;
    assert_eq!(sse.next().await.event, "connection_established");
    let kafka = broker.producer().await;
    produce(&kafka, &l.prices, &[json!({"instrument_id": "BEFORE"})]).await;
    for ws in &mut clients {
        assert_eq!(next_json(ws).await["data"]["instrument_id"], "BEFORE");
    }
    assert_eq!(sse.next().await.data["data"]["instrument_id"], "BEFORE");

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
    // SSE: the same, as named events.
    let delayed = sse.next().await;
    assert_eq!(
        (delayed.event.as_str(), delayed.data["type"].as_str()),
        ("delayed", Some("delayed"))
    );
    let mut got = Vec::new();
    let mut ended = false;
    while got.len() < produced.len() || !ended {
        let event = sse.next().await;
        match event.event.as_str() {
            "message" => {
                got.push(event.data["data"]["instrument_id"].as_str().unwrap().to_string())
            }
            "delay_ended" => ended = true,
            other => panic!("sse: unexpected {other}: {:?}", event.data),
        }
    }
    assert_eq!(got, produced, "sse: every record once, in order");
    eventually(Duration::from_secs(5), "ready after the heal", || async {
        (ready(&l.stream.url("")).await.0 == 200).then_some(())
    })
    .await;
}

/// RFC 6455 close codes: a message over the limit is closed with 1009, a text message that is not
/// UTF-8 with 1007 (before, the connection just dropped); one under the limit but over the read
/// buffer is answered.
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
    // Under the limit but bigger than the read buffer (`read_buffer_bytes`, 512 by default),
    // sent in one frame and one write: read in several reads and answered.
    let id = "p".repeat(900);
    ws.send(Message::text(format!(r#"{{"action":"ping","id":"{id}"}}"#))).await.unwrap();
    let pong = next_json(&mut ws).await;
    assert_eq!((pong["type"].as_str(), pong["id"].as_str()), (Some("pong"), Some(id.as_str())));
    ws.send(Message::text("x".repeat(4096))).await.unwrap();
    assert_eq!(close_code(&mut ws, Duration::from_secs(3)).await, Some(1009), "too big");
    let mut ws = open().await;
    let invalid = Frame::message(vec![b'{', 0xff, 0xfe, b'}'], OpCode::Data(Data::Text), true);
    ws.send(Message::Frame(invalid)).await.unwrap();
    assert_eq!(close_code(&mut ws, Duration::from_secs(3)).await, Some(1007), "not UTF-8");
}

/// A resume asked while the broker is silent answers `recovered: false` within the relay timeout
/// (before, it got no answer until the broker returned). The subscription's position names the
/// partition: the stream is ready only once every partition of its topics is read (before, a
/// subscription made in the first moments got the empty position `v1`, and a resume from it
/// answered `recovered: true` with nothing read).
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
    assert_ne!(position, "v1", "the position names the partition: {answer}");
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
