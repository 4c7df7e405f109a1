//! Trace export: the binary sends its spans over OTLP/HTTP to a real receiver, parented on the
//! caller's `traceparent`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::post;
use axum::Router;

use crate::support::{http, spawn_binary, wait_ready};

type Received = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

async fn collect(
    State(received): State<Received>,
    headers: HeaderMap,
    body: Bytes,
) -> &'static str {
    let content_type =
        headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    received.lock().unwrap().push((content_type, body.to_vec()));
    ""
}

#[tokio::test]
async fn spans_are_exported_with_the_callers_trace_id() {
    let received: Received = Arc::default();
    let app = Router::new().route("/v1/traces", post(collect)).with_state(received.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}/v1/traces", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k.json").display().to_string();
    let mut p = spawn_binary(
        "auth",
        &[
            ("ACCESS_ENABLE_TRACING", "true"),
            ("ACCESS_OTEL_EXPORTER", &endpoint),
            ("ACCESS_AUTH__DEV_KEY_FILE", &key),
            ("ACCESS_SERVER__GRACE_PERIOD", "0s"),
        ],
    );
    wait_ready(&p.url).await;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let r = http()
        .get(format!("{}/health", p.url))
        .header("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Exit flushes the batch.
    assert_eq!(p.terminate(Duration::from_secs(10)).await.code(), Some(0));

    let received = received.lock().unwrap();
    assert!(!received.is_empty(), "no OTLP export arrived");
    let wanted: Vec<u8> =
        (0..16).map(|i| u8::from_str_radix(&trace_id[2 * i..2 * i + 2], 16).unwrap()).collect();
    let exported =
        received.iter().find(|(_, body)| body.windows(16).any(|w| w == wanted.as_slice()));
    let (content_type, body) = exported.expect("a span with the caller's trace id");
    assert_eq!(content_type, "application/x-protobuf");
    assert!(body.windows(11).any(|w| w == b"access-auth"), "the service name is exported");
}
