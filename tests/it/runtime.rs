//! The serving machinery every role shares, against a real server on 127.0.0.1:0.

use std::time::Duration;

use access::backends::CheckError;
use access::role::Role;
use axum::routing::{get, post};
use axum::Router;
use futures::future::BoxFuture;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{config, eventually, http, serve};

fn router() -> Router {
    Router::new()
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_millis(600)).await;
                "done"
            }),
        )
        .route(
            "/echo",
            post(|access::error::Json(v): access::error::Json<Value>| async move { axum::Json(v) }),
        )
}

fn failing_check() -> BoxFuture<'static, Result<(), CheckError>> {
    Box::pin(async { Err(CheckError::failed("test", "connection refused")) })
}

#[tokio::test]
async fn health_is_cheap_and_never_asks_dependencies() {
    let s = serve(Role::Auth, config(&[]), router()).await;
    s.ctx.readiness.add_check("redis", failing_check);
    let r = http().get(s.url("/health")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["status"], "ok");
    assert_eq!(body["service"], "access-auth");
    assert_eq!(body["version"], env!("CARGO_PKG_VERSION"));
    assert!(body["uptime_seconds"].is_u64());
}

#[tokio::test]
async fn readiness_is_honest() {
    let s = serve(Role::Auth, config(&[]), router()).await;
    let ready = || async {
        let r = http().get(s.url("/ready")).send().await.unwrap();
        (r.status().as_u16(), r.json::<Value>().await.unwrap())
    };
    let (status, body) = ready().await;
    assert_eq!((status, body["status"].as_str()), (503, Some("starting")));

    s.ctx.readiness.mark_started();
    let (status, body) = ready().await;
    assert_eq!((status, body["status"].as_str()), (200, Some("ready")));

    s.ctx.readiness.add_check("postgres", failing_check);
    let (status, body) = ready().await;
    assert_eq!(status, 503);
    assert_eq!(body["code"], "dependency_unavailable");
    assert_eq!(body["failing"], serde_json::json!(["postgres"]));
    assert!(body["message"].as_str().unwrap().contains("postgres"));

    s.shutdown().begin_drain();
    let (status, body) = ready().await;
    assert_eq!((status, body["status"].as_str()), (503, Some("draining")));
}

#[tokio::test]
async fn a_hanging_check_is_cut_by_its_timeout() {
    let s = serve(Role::Auth, config(&[("ACCESS_SERVER__READY_CHECK_TIMEOUT", "200ms")]), router())
        .await;
    s.ctx.readiness.mark_started();
    s.ctx.readiness.add_check("kafka", || -> BoxFuture<'static, Result<(), CheckError>> {
        Box::pin(futures::future::pending())
    });
    let r = http().get(s.url("/ready")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    let body: Value = r.json().await.unwrap();
    let kafka = body["checks"].as_array().unwrap().iter().find(|c| c["name"] == "kafka").unwrap();
    assert!(kafka["error"].as_str().unwrap().contains("no answer"), "{body}");
}

#[tokio::test]
async fn metrics_carry_role_labels_descriptions_and_build_info() {
    let s = serve(Role::Metrics, config(&[]), router()).await;
    http().get(s.url("/nope")).send().await.unwrap();
    let text = http().get(s.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(text.contains("# HELP access_build_info"), "{text}");
    assert!(text.contains(&format!(
        "access_build_info{{role=\"metrics\",version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    )));
    assert!(text.contains("# TYPE access_http_requests_total counter"));
    let line = text
        .lines()
        .find(|l| l.starts_with("access_http_requests_total{") && l.contains("role=\"metrics\""))
        .unwrap_or_else(|| panic!("no request counter for the role in:\n{text}"));
    assert!(line.contains("route=\"unmatched\"") || line.contains("status_class="), "{line}");
    assert!(text.contains("# TYPE access_http_request_duration_seconds histogram"));
}

#[tokio::test]
async fn request_ids_are_generated_or_propagated() {
    let s = serve(Role::Auth, config(&[]), router()).await;
    let r = http().get(s.url("/health")).send().await.unwrap();
    let generated = r.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(generated.len(), 36, "a UUID: {generated}");
    let r = http().get(s.url("/health")).header("x-request-id", "abc-123").send().await.unwrap();
    assert_eq!(r.headers()["x-request-id"], "abc-123");
    // Also on errors.
    let r = http().get(s.url("/missing")).header("x-request-id", "e-1").send().await.unwrap();
    assert_eq!(r.headers()["x-request-id"], "e-1");
}

#[tokio::test]
async fn unknown_routes_and_methods_get_json_errors() {
    let s = serve(Role::Auth, config(&[]), router()).await;
    let r = http().get(s.url("/missing")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(r.json::<Value>().await.unwrap()["code"], "not_found");
    let r = http().delete(s.url("/echo")).send().await.unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(r.json::<Value>().await.unwrap()["code"], "method_not_allowed");
    let r = http()
        .post(s.url("/echo"))
        .header("content-type", "application/json")
        .body("{nope")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.json::<Value>().await.unwrap()["code"], "invalid_request");
}

#[tokio::test]
async fn bodies_over_the_limit_are_413_declared_or_streamed() {
    let s = serve(Role::Auth, config(&[("ACCESS_SERVER__MAX_BODY_BYTES", "1024")]), router()).await;
    let small = serde_json::json!({"a": "x".repeat(100)});
    let r = http().post(s.url("/echo")).json(&small).send().await.unwrap();
    assert_eq!(r.status(), 200);

    let big = serde_json::json!({"a": "x".repeat(5000)}).to_string();
    let r = http()
        .post(s.url("/echo"))
        .header("content-type", "application/json")
        .body(big.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(r.json::<Value>().await.unwrap()["code"], "payload_too_large");

    // Chunked: no Content-Length, so the limit bites while reading.
    let stream = futures::stream::iter(
        big.into_bytes()
            .chunks(500)
            .map(|c| Ok::<_, std::io::Error>(c.to_vec()))
            .collect::<Vec<_>>(),
    );
    let r = http()
        .post(s.url("/echo"))
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(r.json::<Value>().await.unwrap()["code"], "payload_too_large");
}

#[tokio::test]
async fn load_is_shed_with_503_not_queued() {
    let s = serve(Role::Auth, config(&[("ACCESS_SERVER__MAX_CONCURRENCY", "1")]), router()).await;
    let slow = tokio::spawn(http().get(s.url("/slow")).send());
    // Wait until the slow request holds the only permit.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let started = std::time::Instant::now();
    let r = http().get(s.url("/slow")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert!(started.elapsed() < Duration::from_millis(400), "refused at once, not queued");
    assert_eq!(r.headers()["retry-after"], "1");
    assert_eq!(r.json::<Value>().await.unwrap()["code"], "dependency_unavailable");
    // Probes are exempt.
    assert_eq!(http().get(s.url("/health")).send().await.unwrap().status(), 200);
    assert_eq!(slow.await.unwrap().unwrap().status(), 200);
}

#[tokio::test]
async fn slow_headers_are_cut_off_and_huge_headers_refused() {
    let s = serve(Role::Auth, config(&[("ACCESS_SERVER__HEADER_READ_TIMEOUT", "300ms")]), router())
        .await;
    let mut tcp = TcpStream::connect(s.addr).await.unwrap();
    tcp.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(3), tcp.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the server closed the connection after the header timeout");

    let huge = "x".repeat(100 * 1024);
    let mut tcp = TcpStream::connect(s.addr).await.unwrap();
    let request = format!("GET /health HTTP/1.1\r\nHost: x\r\nX-Big: {huge}\r\n\r\n");
    let _ = tcp.write_all(request.as_bytes()).await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), tcp.read_to_end(&mut buf)).await;
    let head = String::from_utf8_lossy(&buf);
    assert!(head.starts_with("HTTP/1.1 431"), "{head}");
}

#[tokio::test]
async fn shutdown_drains_in_flight_requests_then_stops() {
    let s = serve(Role::Auth, config(&[("ACCESS_SERVER__DRAIN_TIMEOUT", "5s")]), router()).await;
    s.ctx.readiness.mark_started();
    drains_in_flight_requests_then_stops(&s).await;
}

/// Stops `s` while `/slow` is in flight: the request finishes, serve returns, and nothing more is
/// accepted.
async fn drains_in_flight_requests_then_stops(s: &crate::support::Running) {
    let in_flight = tokio::spawn(http().get(s.url("/slow")).send());
    tokio::time::sleep(Duration::from_millis(100)).await;
    s.shutdown().stop();
    let response = in_flight.await.unwrap().unwrap();
    assert_eq!(response.status(), 200, "the in-flight request finished");
    assert_eq!(response.text().await.unwrap(), "done");
    eventually(Duration::from_secs(3), "serve returns", || async {
        s.handle.is_finished().then_some(())
    })
    .await;
    assert!(http().get(s.url("/health")).send().await.is_err(), "no longer accepting");
}

/// With `server.io_threads`, connections are served on that many threads of the role's own, and
/// shutdown drains them as it does the shared runtime's.
#[tokio::test]
async fn io_threads_serve_connections_and_drain_on_shutdown() {
    let thread = || async { std::thread::current().name().unwrap_or_default().to_string() };
    let s = serve(
        Role::Auth,
        config(&[("ACCESS_SERVER__IO_THREADS", "2"), ("ACCESS_SERVER__DRAIN_TIMEOUT", "5s")]),
        router().route("/thread", get(thread)),
    )
    .await;
    let mut served_by = std::collections::BTreeMap::<String, usize>::new();
    // `http()` does not pool: each request is a connection of its own.
    for _ in 0..40 {
        let name = http().get(s.url("/thread")).send().await.unwrap().text().await.unwrap();
        *served_by.entry(name).or_default() += 1;
    }
    assert!(
        served_by.keys().all(|name| name == "auth-io-0" || name == "auth-io-1"),
        "served on the role's I/O threads: {served_by:?}"
    );
    drains_in_flight_requests_then_stops(&s).await;
}

/// A task one I/O thread's runtime spawned (as a pooled connection's is) keeps serving the other
/// threads' requests while they drain: no runtime ends before every thread has drained.
#[tokio::test]
async fn an_io_thread_that_drained_first_keeps_its_tasks_for_the_others() {
    use std::sync::{Arc, OnceLock};
    use tokio::sync::{mpsc, oneshot};
    type Service = mpsc::UnboundedSender<oneshot::Sender<&'static str>>;
    let service: Arc<OnceLock<Service>> = Arc::default();
    let thread = || async { std::thread::current().name().unwrap_or_default().to_string() };
    let (start_service, use_service) = (service.clone(), service);
    let router = router()
        .route("/thread", get(thread))
        // Spawns the answering task on this request's thread (once).
        .route(
            "/start",
            get(move || async move {
                start_service.get_or_init(|| {
                    let (tx, mut rx) = mpsc::unbounded_channel::<oneshot::Sender<&str>>();
                    tokio::spawn(async move {
                        while let Some(reply) = rx.recv().await {
                            let _ = reply.send("answered");
                        }
                    });
                    tx
                });
                std::thread::current().name().unwrap_or_default().to_string()
            }),
        )
        // Waits, then asks the task for its answer.
        .route(
            "/ask-later",
            get(move || async move {
                tokio::time::sleep(Duration::from_millis(400)).await;
                let (reply, answer) = oneshot::channel();
                let Some(service) = use_service.get() else { return "no service".to_string() };
                if service.send(reply).is_err() {
                    return "the task is gone".to_string();
                }
                answer.await.unwrap_or("the task is gone").to_string()
            }),
        );
    let s = serve(
        Role::Auth,
        config(&[("ACCESS_SERVER__IO_THREADS", "2"), ("ACCESS_SERVER__DRAIN_TIMEOUT", "5s")]),
        router,
    )
    .await;
    let started_on = http().get(s.url("/start")).send().await.unwrap().text().await.unwrap();
    // A kept-alive connection served by the other thread.
    let mut other = None;
    for _ in 0..50 {
        let client = reqwest::Client::new();
        let on = client.get(s.url("/thread")).send().await.unwrap().text().await.unwrap();
        if on != started_on {
            other = Some(client);
            break;
        }
    }
    let other = other.expect("a connection on the other I/O thread");
    let in_flight = tokio::spawn({
        let url = s.url("/ask-later");
        async move { other.get(url).send().await.unwrap().text().await.unwrap() }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    s.shutdown().stop();
    assert_eq!(in_flight.await.unwrap(), "answered");
}

#[tokio::test]
async fn the_drain_deadline_bounds_shutdown() {
    let s = serve(Role::Auth, config(&[("ACCESS_SERVER__DRAIN_TIMEOUT", "100ms")]), router()).await;
    let _stuck = tokio::spawn(http().get(s.url("/slow")).send());
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = std::time::Instant::now();
    s.shutdown().stop();
    eventually(Duration::from_secs(2), "serve returns at the deadline", || async {
        s.handle.is_finished().then_some(())
    })
    .await;
    assert!(started.elapsed() < Duration::from_millis(550), "did not wait for the slow request");
}
