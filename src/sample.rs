//! What `access all` adds so the layer has something to front on one machine: a sample upstream
//! serving the platform's data routes (latest prices, ticks, instruments, curves, projections) on
//! 127.0.0.1:8100, where the gateway's default upstream groups point, and a publisher of sample
//! price and curve updates to the stream's registry topics every second (through the stream role's
//! `POST /publish`, so it goes to Kafka when one is configured).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::Path;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};
use url::Url;

use crate::auth::token_source::TokenSource;
use crate::server::Shutdown;

/// The sample instruments.
pub const INSTRUMENTS: [&str; 5] = ["NG-H27", "BRN-F27", "WTI-G27", "TTF-H27", "PWR-DE-Q1"];

fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// A price that moves with time (a slow wave per instrument), so updates and caches are visible.
fn price(instrument: &str, t: f64) -> f64 {
    let seed = instrument.bytes().map(f64::from).sum::<f64>();
    let base = 20.0 + seed % 80.0;
    ((base + (t / 7.0 + seed).sin() * base * 0.01) * 1000.0).round() / 1000.0
}

fn quote(instrument: &str) -> Value {
    let t = now();
    let p = price(instrument, t);
    let cents = |x: f64| (x * 1000.0).round() / 1000.0;
    json!({"instrument_id": instrument, "price": p, "bid": cents(p - 0.005), "ask": cents(p + 0.005),
        "currency": "USD", "as_of": chrono::Utc::now().to_rfc3339()})
}

/// Upstream responses may be cached by the gateway for five seconds (then served stale while
/// one revalidation runs).
fn cached(body: Value) -> Response {
    ([(http::header::CACHE_CONTROL, "public, max-age=5, stale-while-revalidate=10")], Json(body))
        .into_response()
}

/// The sample upstream's routes (the gateway strips `/api/v1`).
pub fn upstream() -> Router {
    Router::new()
        .route(
            "/prices/latest",
            get(|| async {
                cached(json!({"prices": INSTRUMENTS.iter().map(|i| quote(i)).collect::<Vec<_>>()}))
            }),
        )
        .route(
            "/prices/latest/{instrument_id}",
            get(|Path(id): Path<String>| async move { cached(quote(&id)) }),
        )
        .route(
            "/ticks/{instrument_id}",
            get(|Path(id): Path<String>| async move {
                let t = now();
                let ticks: Vec<Value> = (0..10)
                    .map(|k| json!({"t": t - f64::from(k), "price": price(&id, t - f64::from(k))}))
                    .collect();
                cached(json!({"instrument_id": id, "ticks": ticks}))
            }),
        )
        .route("/instruments", get(|| async { cached(json!({"instruments": INSTRUMENTS})) }))
        .route(
            "/instruments/{instrument_id}",
            get(|Path(id): Path<String>| async move {
                cached(json!({"instrument_id": id, "venue": "ICE", "unit": "MMBtu"}))
            }),
        )
        .route("/curves", get(|| async { cached(json!({"curves": ["NG-HH", "BRN"]})) }))
        .route(
            "/curves/{curve_id}/snapshot",
            get(|Path(id): Path<String>| async move { cached(curve(&id)) }),
        )
        .route("/projections/{projection_type}", get(projection).post(projection))
}

fn curve(id: &str) -> Value {
    let t = now();
    let points: Vec<Value> = (1..=12)
        .map(|m| json!({"tenor": format!("M{m}"), "price": price(id, t + f64::from(m) * 30.0)}))
        .collect();
    json!({"curve_id": id, "as_of": chrono::Utc::now().to_rfc3339(), "points": points})
}

async fn projection(Path(kind): Path<String>) -> Response {
    Json(json!({"projection_type": kind, "horizon_days": 30, "values": (1..=5).map(|d| json!({"day": d, "value": 50.0 + f64::from(d)})).collect::<Vec<_>>()}))
        .into_response()
}

/// Publishes a price update for every sample instrument to `prices_topic`, and a curve update to
/// `curves_topic`, every second until shutdown, through the stream role at `stream`.
pub fn spawn_publisher(
    stream: Url,
    prices_topic: Option<String>,
    curves_topic: Option<String>,
    tokens: Arc<TokenSource>,
    shutdown: Shutdown,
) {
    tokio::spawn(async move {
        let http =
            reqwest::Client::builder().timeout(Duration::from_secs(2)).build().unwrap_or_default();
        let Ok(url) = stream.join("publish") else { return };
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut warned = false;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.stopping() => return,
            }
            let Ok(token) = tokens.token().await else { continue };
            let mut records: Vec<Value> = Vec::new();
            if let Some(topic) = &prices_topic {
                records.extend(
                    INSTRUMENTS.iter().map(|i| json!({"topic": topic, "key": i, "data": quote(i)})),
                );
            }
            if let Some(topic) = &curves_topic {
                records.push(json!({"topic": topic, "key": "NG-HH", "data": curve("NG-HH")}));
            }
            for record in records {
                let sent = http.post(url.clone()).bearer_auth(&token).json(&record).send().await;
                match sent {
                    Ok(r) if r.status().is_success() => warned = false,
                    Ok(r) if !warned => {
                        warned = true;
                        tracing::warn!(status = r.status().as_u16(), "sample publish refused");
                    }
                    Err(e) if !warned => {
                        warned = true;
                        tracing::warn!(error = %e, "sample publish failed");
                    }
                    _ => {}
                }
            }
        }
    });
}
