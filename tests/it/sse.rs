//! The stream role's SSE side and resume: a real SSE client over reqwest, a second replica
//! sharing Redis for relayed subscription changes, and records produced to tansu while a client
//! was away.

use std::pin::Pin;
use std::time::Duration;

use access::role::Role;
use futures::{SinkExt, Stream, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::stream::{kafka_client, layer, next_json, produce, publish, send, Layer};
use crate::support::{http, kafka_bootstrap, start, wait_ready};

/// One server-sent event.
#[derive(Debug)]
pub struct Event {
    pub event: String,
    pub id: Option<String>,
    pub data: Value,
}

/// A minimal SSE client: events split on blank lines, comments skipped.
pub struct SseClient {
    body: Pin<Box<dyn Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    buf: String,
    comments: usize,
}

impl SseClient {
    pub async fn open(url: String, last_event_id: Option<&str>) -> SseClient {
        let mut req = http().get(url).header("accept", "text/event-stream");
        if let Some(id) = last_event_id {
            req = req.header("last-event-id", id);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 200, "{:?}", r.text().await);
        SseClient { body: Box::pin(r.bytes_stream()), buf: String::new(), comments: 0 }
    }

    /// The next event within `within`, or None.
    pub async fn next_within(&mut self, within: Duration) -> Option<Event> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let (mut event, mut id, mut data) = ("message".to_string(), None, String::new());
                for line in block.lines() {
                    if line.starts_with(':') {
                        self.comments += 1;
                    } else if let Some(v) = line.strip_prefix("event:") {
                        event = v.trim().to_string();
                    } else if let Some(v) = line.strip_prefix("id:") {
                        id = Some(v.trim().to_string());
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if data.is_empty() {
                    continue;
                }
                return Some(Event { event, id, data: serde_json::from_str(&data).unwrap() });
            }
            match tokio::time::timeout_at(deadline, self.body.next()).await {
                Ok(Some(Ok(chunk))) => self.buf.push_str(&String::from_utf8_lossy(&chunk)),
                _ => return None,
            }
        }
    }

    pub async fn next(&mut self) -> Event {
        self.next_within(Duration::from_secs(5)).await.expect("an event within 5s")
    }
}

pub fn sse_url(l: &Layer, token: &str, topics: &[&str]) -> String {
    format!("{}?topics={}&token={token}", l.stream.url("/sse/stream"), topics.join(","))
}

#[tokio::test]
async fn sse_streams_records_and_an_open_streams_topics_change_through_any_replica() {
    let news = format!("news-{}", uuid::Uuid::new_v4().simple());
    let extra = format!("[[stream.topics]]\nname = \"{news}\"\nresource = \"market_data\"\n[stream]\nsse_heartbeat = \"300ms\"\n");
    let l = layer(None, &extra, &[]).await;
    let other = start(Role::Stream, l.stream_config.clone()).await;
    wait_ready(&other.url("")).await;
    let alice = l.keys.token("alice", "t1", &["trader"]);
    let mut sse = SseClient::open(sse_url(&l, &alice, &[&l.prices]), None).await;
    let hello = sse.next().await;
    assert_eq!(hello.event, "connection_established");
    assert_eq!(hello.data["topics"], json!([l.prices]));
    let conn_id = hello.data["connection_id"].as_str().unwrap().to_string();
    assert!(hello.id.as_deref().is_some_and(|id| id.starts_with("v1")), "{hello:?}");

    l.publish(&l.prices, "NG", json!({"instrument_id": "NG", "price": 1})).await;
    let data = sse.next().await;
    assert_eq!(
        (data.event.as_str(), data.data["type"].as_str(), data.data["key"].as_str()),
        ("message", Some("data"), Some("NG"))
    );
    assert_ne!(data.id, hello.id, "the id moves with the position");

    // Through the other replica, which does not hold the stream: relayed over Redis.
    let change = |method: reqwest::Method, token: &str, body: Value| {
        let url = other.url("/sse/subscribe");
        let req = http().request(method, url).bearer_auth(token).json(&body);
        async move {
            let r = req.send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let (status, body) =
        change(reqwest::Method::POST, &alice, json!({"connection_id": conn_id, "topics": [news]}))
            .await;
    assert_eq!((status, &body["topics"]), (200, &json!([news])), "{body}");
    let (status, body) = change(
        reqwest::Method::DELETE,
        &alice,
        json!({"connection_id": conn_id, "topics": [l.prices]}),
    )
    .await;
    assert_eq!((status, &body["topics"]), (200, &json!([l.prices])), "{body}");
    l.publish(&l.prices, "NG", json!({"instrument_id": "NG", "price": 2})).await;
    l.publish(&news, "N1", json!({"headline": "x"})).await;
    let next = sse.next().await;
    assert_eq!(next.data["topic"], news, "prices were dropped, news added: {next:?}");

    let bob = l.keys.token("bob", "t1", &["trader"]);
    let (status, body) =
        change(reqwest::Method::POST, &bob, json!({"connection_id": conn_id, "topics": [news]}))
            .await;
    assert_eq!((status, body["code"].as_str()), (403, Some("forbidden")));
    let (status, body) = change(
        reqwest::Method::POST,
        &alice,
        json!({"connection_id": "nobody-1", "topics": [news]}),
    )
    .await;
    assert_eq!((status, body["code"].as_str()), (404, Some("not_found")));
    // The id cannot be guessed from its counter: without its random part (or with another), it
    // names nothing.
    let (counter, random) = conn_id.rsplit_once('-').unwrap();
    assert_eq!(random.len(), 32, "{conn_id}");
    for guess in [counter.to_string(), format!("{counter}-{}", "0".repeat(32))] {
        let (status, _) = change(
            reqwest::Method::POST,
            &alice,
            json!({"connection_id": guess, "topics": [news]}),
        )
        .await;
        assert_eq!(status, 404, "{guess}");
    }

    // Idle: comment heartbeats keep proxies from closing the stream.
    assert!(sse.next_within(Duration::from_millis(800)).await.is_none());
    assert!(sse.comments >= 1, "heartbeat comments arrive");

    // Shutdown ends the stream with a close event.
    l.stream.shutdown().stop();
    let close = sse.next().await;
    assert_eq!((close.event.as_str(), close.data["code"].as_str()), ("close", Some("going_away")));
}

#[tokio::test]
async fn sse_refuses_bad_requests_with_the_error_contract() {
    let l = layer(None, "", &[]).await;
    let url = l.stream.url("/sse/stream");
    let r = http().get(&url).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let alice = l.keys.token("alice", "t1", &["trader"]);
    let r = http().get(format!("{url}?filters=nope")).bearer_auth(&alice).send().await.unwrap();
    assert_eq!(r.status(), 422);
    assert_eq!(r.json::<Value>().await.unwrap()["field"], "filters");
    let mut sse =
        SseClient::open(format!("{}&topics={}", sse_url(&l, &alice, &[]), l.curves), None).await;
    let hello = sse.next().await;
    assert_eq!(hello.data["failed"][0]["code"], "forbidden", "{hello:?}");
}

#[tokio::test]
async fn reconnects_resume_every_missed_record_once_in_order_or_say_they_cannot() {
    let bootstrap = kafka_bootstrap();
    let l = layer(Some(&bootstrap), "[stream]\nresume_max_records = 5\n", &[]).await;
    let kafka = kafka_client(&bootstrap).await;
    let alice = l.keys.token("alice", "t1", &["trader"]);
    let rec = |s: &str| json!({"instrument_id": s});
    let key = |e: &Event| e.data["data"]["instrument_id"].as_str().unwrap_or("?").to_string();

    // SSE: one record seen, three produced while away, then a reconnect with Last-Event-ID.
    let mut sse = SseClient::open(sse_url(&l, &alice, &[&l.prices]), None).await;
    sse.next().await;
    produce(&kafka, &l.prices, &[rec("A")]).await;
    let a = sse.next().await;
    assert_eq!(key(&a), "A");
    drop(sse);
    produce(&kafka, &l.prices, &[rec("B"), rec("C"), rec("D")]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut sse = SseClient::open(sse_url(&l, &alice, &[&l.prices]), a.id.as_deref()).await;
    let hello = sse.next().await;
    assert_eq!(hello.data["recovered"], true, "{hello:?}");
    let mut got: Vec<String> = Vec::new();
    for _ in 0..3 {
        got.push(key(&sse.next().await));
    }
    produce(&kafka, &l.prices, &[rec("E")]).await;
    let e = sse.next().await;
    got.push(key(&e));
    assert_eq!(got, vec!["B", "C", "D", "E"], "every missed record once, in order, then live");
    assert!(sse.next_within(Duration::from_millis(300)).await.is_none(), "nothing twice");

    // Beyond the bound (5 records): recovered false, and the stream goes on live.
    drop(sse);
    let many: Vec<Value> = (0..7).map(|i| rec(&format!("M{i}"))).collect();
    produce(&kafka, &l.prices, &many).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut sse = SseClient::open(sse_url(&l, &alice, &[&l.prices]), e.id.as_deref()).await;
    assert_eq!(sse.next().await.data["recovered"], false);
    produce(&kafka, &l.prices, &[rec("LIVE")]).await;
    assert_eq!(key(&sse.next().await), "LIVE");
    drop(sse);

    // WebSocket: the same position, given to subscribe.
    let (mut ws, answer) = l.subscribed(&alice, &[&l.prices], json!({})).await;
    let position = answer["position"].as_str().unwrap().to_string();
    ws.close(None).await.unwrap();
    produce(&kafka, &l.prices, &[rec("W1"), rec("W2")]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (mut ws, answer) = l.resumed(&alice, &l.prices, &position).await;
    assert_eq!(
        (answer["type"].as_str(), answer["recovered"].as_bool()),
        (Some("subscribed"), Some(true)),
        "{answer}"
    );
    let w1 = next_json(&mut ws).await;
    let w2 = next_json(&mut ws).await;
    assert_eq!(
        (w1["data"]["instrument_id"].as_str(), w2["data"]["instrument_id"].as_str()),
        (Some("W1"), Some("W2"))
    );
    assert_eq!(w2["offset"].as_i64(), Some(w1["offset"].as_i64().unwrap() + 1));
    send(&mut ws, json!({"action": "subscribe", "topics": [l.prices], "position": "v9.garbage"}))
        .await;
    let bad = next_json(&mut ws).await;
    assert_eq!(bad["recovered"], false);
    assert!(bad["position_error"].is_string());
}

/// A WebSocket resume while several publishers keep producing: the answer comes first, then
/// every record from the position on, each once and in offset order, the recovered ones and the
/// live ones meeting without a gap or a repeat. (Without the outbox's hold during the answer, a
/// live record arrives before it.)
#[tokio::test]
async fn a_websocket_resume_under_live_publishing_has_no_gap_and_no_repeat() {
    // Through Kafka: the resume's read of the missed records takes a fetch, and live records
    // arrive meanwhile.
    let l = layer(Some(&kafka_bootstrap()), "", &[]).await;
    let alice = l.keys.token("alice", "t1", &["trader"]);
    let (mut ws, answer) = l.subscribed(&alice, &[&l.prices], json!({})).await;
    let position = answer["position"].as_str().unwrap().to_string();
    ws.close(None).await.unwrap();
    for i in 0..20 {
        l.publish(&l.prices, "k", json!({"i": i})).await;
    }
    // Live publishing goes on, from several publishers at once, while the client comes back.
    let service = l.keys.token("publisher", "platform", &["service"]);
    let client = http();
    let publishers: Vec<_> = (0..8)
        .map(|p| {
            let (client, url, topic, service) =
                (client.clone(), l.stream.url("/publish"), l.prices.clone(), service.clone());
            tokio::spawn(async move {
                for i in 0..40 {
                    publish(&client, &url, &service, &topic, "k", json!({"p": p, "i": i})).await;
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let (mut ws, answer) = l.resumed(&alice, &l.prices, &position).await;
    assert_eq!(
        (answer["type"].as_str(), answer["recovered"].as_bool()),
        (Some("subscribed"), Some(true)),
        "the answer comes before any record: {answer}"
    );
    let mut offsets = Vec::new();
    while offsets.len() < 120 {
        let frame = next_json(&mut ws).await;
        assert_eq!(frame["type"], "data", "{frame}");
        offsets.push(frame["offset"].as_i64().unwrap());
    }
    let expected: Vec<i64> = (0..120).collect();
    assert_eq!(offsets, expected, "every record once, in order, recovered then live");
    for publisher in publishers {
        publisher.await.unwrap();
    }
}

/// The offset a position names for partition 0 of `topic`.
fn position_offset(position: &str, topic: &str) -> Option<i64> {
    let hash = access::roles::stream::position::topic_hash(topic);
    position.split('.').skip(1).find_map(|part| {
        let mut fields = part.split('-');
        let (h, p, o) = (fields.next()?, fields.next()?, fields.next()?);
        (u64::from_str_radix(h, 36).ok()? == u64::from(hash) && p == "0")
            .then(|| i64::from_str_radix(o, 36).ok())?
    })
}

/// While records keep arriving and the client keeps asking, every `get_stats` answer's position
/// is exactly one past the last data frame before it: never behind it (a resume would repeat that
/// record), never ahead (it would skip one still coming). Before the position moved under the
/// outbox's lock, a frame written between the answer's rendering and its write, or between a
/// frame's write and the position's move, made the answer lag behind a frame the client already
/// had (this failed within a few hundred answers on every run).
#[tokio::test]
async fn get_stats_positions_describe_exactly_the_frames_before_them() {
    // Through Kafka, as the race was seen: records come in fetched batches, so the hub writes
    // frames in bursts while the connection's task answers.
    // The connection is served on an I/O thread of its own, so its task answers while the hub
    // writes from the consumer's thread.
    let l = layer(Some(&kafka_bootstrap()), "", &[("ACCESS_SERVER__IO_THREADS", "1")]).await;
    let alice = l.keys.token("alice", "t1", &["trader"]);
    let (ws, answer) = l.subscribed(&alice, &[&l.prices], json!({})).await;
    // A fresh topic: its records start at offset 0 (the position names the partition once the
    // stream has seen it).
    assert!(answer["position"].is_string(), "{answer}");
    let mut next = 0;
    let service = l.keys.token("publisher", "platform", &["service"]);
    let (publishers, each) = (8, 200);
    let total = publishers * each;
    let client = http();
    let publishers: Vec<_> = (0..publishers)
        .map(|p| {
            let (client, url, topic, service) =
                (client.clone(), l.stream.url("/publish"), l.prices.clone(), service.clone());
            tokio::spawn(async move {
                for i in 0..each {
                    publish(&client, &url, &service, &topic, "k", json!({"p": p, "i": i})).await;
                }
            })
        })
        .collect();
    // Questions go on all the time, so answers are being made while the hub writes frames.
    let (mut sink, mut stream) = ws.split();
    let asking = tokio::spawn(async move {
        for _ in 0..100_000 {
            let ask = Message::text(json!({"action": "get_stats"}).to_string());
            if sink.send(ask).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_micros(50)).await;
        }
    });
    let (mut frames, mut answers) = (0, 0);
    while frames < total {
        let frame = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("a frame within 10s")
            .expect("the connection is open")
            .expect("a valid frame");
        let Message::Text(text) = frame else { continue };
        let frame: Value = serde_json::from_str(&text).unwrap();
        match frame["type"].as_str() {
            Some("data") => {
                assert_eq!(frame["offset"].as_i64(), Some(next), "frames in order: {frame}");
                next += 1;
                frames += 1;
            }
            Some("stats") => {
                answers += 1;
                let at = position_offset(frame["position"].as_str().unwrap(), &l.prices);
                if at.is_none() && frames == 0 {
                    continue;
                }
                assert_eq!(
                    at,
                    Some(next),
                    "answer {answers}: the position names the next offset after the last frame \
                     received ({frame})"
                );
            }
            _ => panic!("unexpected frame {frame}"),
        }
    }
    asking.abort();
    for publisher in publishers {
        publisher.await.unwrap();
    }
}
