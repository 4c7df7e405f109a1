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

/// One exported span: service, trace id, span id, parent span id (hex), name.
#[derive(Debug, Clone)]
struct Exported {
    service: String,
    trace: String,
    span: String,
    parent: String,
    name: String,
}

/// Decodes every OTLP/HTTP protobuf export received.
fn decode(received: &Received) -> Vec<Exported> {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
    use prost::Message;
    let mut out = Vec::new();
    for (_, body) in received.lock().unwrap().iter() {
        let request = ExportTraceServiceRequest::decode(body.as_slice()).expect("OTLP protobuf");
        for resource_spans in request.resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                    Any::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for span in resource_spans.scope_spans.into_iter().flat_map(|s| s.spans) {
                out.push(Exported {
                    service: service.clone(),
                    trace: hex::encode(&span.trace_id),
                    span: hex::encode(&span.span_id),
                    parent: hex::encode(&span.parent_span_id),
                    name: span.name,
                });
            }
        }
    }
    out
}

/// `(trace id, parent span id)` of a well-formed `traceparent`.
fn parse_traceparent(value: &str) -> (String, String) {
    let parts: Vec<&str> = value.split('-').collect();
    assert_eq!(parts.len(), 4, "{value}");
    (parts[1].to_string(), parts[2].to_string())
}

type Seen = Arc<Mutex<Vec<(Option<String>, Option<String>)>>>;

/// With tracing on, a real upstream gets the gateway's own span as the parent (a child of the
/// caller's `traceparent`, with its `tracestate`; a new trace without one), and the entitlements
/// role's span for the route's check is a child of the gateway's check span: one trace from the
/// caller through the gateway to both, as a real OTLP receiver sees it.
#[tokio::test]
async fn upstreams_and_the_entitlements_role_continue_the_gateways_trace() {
    let received: Received = Arc::default();
    let app = Router::new().route("/v1/traces", post(collect)).with_state(received.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}/v1/traces", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });

    // The upstream records the trace headers it gets.
    let seen: Seen = Arc::default();
    let record = seen.clone();
    let upstream = Router::new().route(
        "/prices/latest/{id}",
        axum::routing::get(move |headers: HeaderMap| {
            let record = record.clone();
            async move {
                let h = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).map(String::from);
                record.lock().unwrap().push((h("traceparent"), h("tracestate")));
                axum::Json(serde_json::json!({"price": 1.0}))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, upstream).await });

    let keys = crate::support::DevKeys::new();
    let dir = tempfile::tempdir().unwrap();
    let seed = dir.path().join("seed.yaml");
    std::fs::write(
        &seed,
        r#"- { name: traders, effect: allow, resource: "instrument:*", actions: [read], roles: [trader], priority: 10 }"#,
    )
    .unwrap();
    let routes = dir.path().join("routes.yaml");
    std::fs::write(
        &routes,
        format!(
            r#"- {{ name: prices, path: "/api/v1/prices/latest/{{instrument_id}}", methods: [GET], upstreams: ["{upstream_url}"], strip_prefix: /api/v1, entitlement: {{ resource: "instrument:{{instrument_id}}" }} }}"#
        ),
    )
    .unwrap();
    let (seed, routes) = (seed.display().to_string(), routes.display().to_string());
    let common = [
        ("ACCESS_ENABLE_TRACING", "true"),
        ("ACCESS_OTEL_EXPORTER", endpoint.as_str()),
        ("ACCESS_AUTH__DEV_KEY_FILE", keys.path.as_str()),
        ("ACCESS_SERVER__GRACE_PERIOD", "0s"),
    ];
    let mut env = common.to_vec();
    env.push(("ACCESS_ENTITLEMENTS__SEED_FILE", &seed));
    let mut entitlements = spawn_binary("entitlements", &env);
    wait_ready(&entitlements.url).await;
    let mut env = common.to_vec();
    env.push(("ACCESS_ENTITLEMENTS_SERVICE_URL", &entitlements.url));
    env.push(("ACCESS_GATEWAY__ROUTES_FILE", &routes));
    let mut gateway = spawn_binary("gateway", &env);
    wait_ready(&gateway.url).await;

    let token = keys.token("alice", "t1", &["trader"]);
    let caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let r = http()
        .get(format!("{}/api/v1/prices/latest/EURUSD", gateway.url))
        .bearer_auth(&token)
        .header("traceparent", format!("00-{caller_trace}-{caller_span}-01"))
        .header("tracestate", "vendor=opaque")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = http()
        .get(format!("{}/api/v1/prices/latest/EURUSD", gateway.url))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Exit flushes the batches.
    assert_eq!(gateway.terminate(Duration::from_secs(10)).await.code(), Some(0));
    assert_eq!(entitlements.terminate(Duration::from_secs(10)).await.code(), Some(0));

    let spans = decode(&received);
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "{seen:?}");
    let gateway_span = |trace: &str, span: &str| {
        spans
            .iter()
            .find(|s| s.service == "access-gateway" && s.trace == trace && s.span == span)
            .cloned()
            .unwrap_or_else(|| panic!("no gateway span {trace}/{span} among {spans:#?}"))
    };

    // With the caller's context: the same trace, the gateway's span as the parent, the state kept.
    let (traceparent, tracestate) = &seen[0];
    let (trace, parent) = parse_traceparent(traceparent.as_deref().expect("a traceparent"));
    assert_eq!(trace, caller_trace);
    assert_ne!(
        parent, caller_span,
        "the upstream's parent is the gateway's span, not the caller's"
    );
    assert_eq!(
        gateway_span(&trace, &parent).parent,
        caller_span,
        "and that span is the caller's child"
    );
    assert_eq!(tracestate.as_deref(), Some("vendor=opaque"));

    // Without one: a trace the gateway started.
    let (traceparent, tracestate) = &seen[1];
    let (trace, parent) = parse_traceparent(traceparent.as_deref().expect("a traceparent"));
    assert_ne!(trace, caller_trace);
    assert_eq!(gateway_span(&trace, &parent).parent, "", "the gateway's span is the root");
    assert_eq!(tracestate, &None);

    // Entitlements are decided in the gateway, with no call per request: the caller's trace has
    // no entitlements span. The rules it decides by were fetched in a span of the gateway's own,
    // whose context the entitlements role continued.
    assert!(
        !spans.iter().any(|s| s.service == "access-entitlements" && s.trace == caller_trace),
        "{spans:#?}"
    );
    let fetch = spans
        .iter()
        .find(|s| s.service == "access-gateway" && s.name == "rules_snapshot_fetch")
        .unwrap_or_else(|| panic!("no rules fetch span: {spans:#?}"));
    let served = spans
        .iter()
        .find(|s| s.service == "access-entitlements" && s.trace == fetch.trace)
        .unwrap_or_else(|| panic!("no entitlements span in the fetch's trace: {spans:#?}"));
    assert_eq!(served.parent, fetch.span);
}
