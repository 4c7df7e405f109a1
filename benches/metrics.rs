//! The metrics role's ingest: points per second over HTTP, one point per request and in batches of
//! 1000, and the memory each series costs (resident-set growth over 100,000 new series).
//! `cargo bench --bench metrics` (`make bench-metrics`); not part of `make test`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use access::config::Sources;
use access::role::Role;
use access::server::{Context, Shutdown};
use serde_json::json;

const CONNECTIONS: usize = 8;
const RUN: Duration = Duration::from_secs(4);

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|p| p.parse().ok()).unwrap_or(0);
    pages * 4096
}

async fn start() -> String {
    let dir = tempfile::tempdir().unwrap().keep();
    let env = vec![
        ("ACCESS_AUTH__DEV_KEY_FILE".to_string(), dir.join("k.json").display().to_string()),
        ("ACCESS_METRICS__OPEN_INGEST".to_string(), "true".to_string()),
        ("ACCESS_METRICS__MAX_SERIES".to_string(), "1000000".to_string()),
        ("ACCESS_METRICS__MAX_SERIES_PER_METRIC".to_string(), "1000000".to_string()),
        ("ACCESS_METRICS__MAX_BATCH".to_string(), "10000".to_string()),
        ("ACCESS_SERVER__MAX_BODY_BYTES".to_string(), "16777216".to_string()),
        ("ACCESS_LOG_LEVEL".to_string(), "warn".to_string()),
    ];
    let config = access::roles::load(&Sources::from_env(env)).unwrap_or_else(|e| panic!("{e}"));
    let ctx = Context::new(Role::Metrics, Arc::new(config.shared.clone()), Shutdown::new());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { access::roles::start(Role::Metrics, listener, ctx, &config).await });
    for _ in 0..200 {
        if reqwest::get(format!("{url}/ready")).await.is_ok_and(|r| r.status() == 200) {
            return url;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("not ready");
}

/// Points per second for `CONNECTIONS` clients, `batch` points per request, existing series.
async fn ingest_rate(url: &str, batch: usize) -> f64 {
    let started = Instant::now();
    let tasks: Vec<_> = (0..CONNECTIONS)
        .map(|c| {
            let url = url.to_string();
            tokio::spawn(async move {
                let client = reqwest::Client::new();
                let mut points = 0usize;
                while started.elapsed() < RUN {
                    if batch == 1 {
                        let body = json!({"name": "bench_requests", "type": "counter", "value": 1, "labels": {"client": c.to_string()}});
                        let r = client.post(format!("{url}/metrics/track")).json(&body).send().await.unwrap();
                        assert_eq!(r.status(), 200);
                    } else {
                        let body: Vec<_> = (0..batch)
                            .map(|i| json!({"name": "bench_gauge", "type": "gauge", "value": i, "labels": {"client": c.to_string(), "slot": (i % 50).to_string()}}))
                            .collect();
                        let r = client.post(format!("{url}/metrics/track/batch")).json(&body).send().await.unwrap();
                        assert_eq!(r.status(), 200);
                    }
                    points += batch;
                }
                points
            })
        })
        .collect();
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    total as f64 / started.elapsed().as_secs_f64()
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let url = start().await;
        let single = ingest_rate(&url, 1).await;
        let batched = ingest_rate(&url, 1000).await;
        // Memory per series: 100,000 new series (each a gauge with two labels), in batches.
        let client = reqwest::Client::new();
        let before = rss_bytes();
        const SERIES: usize = 100_000;
        for chunk in 0..SERIES / 5000 {
            let body: Vec<_> = (0..5000)
                .map(|i| json!({"name": "bench_series", "type": "gauge", "value": 1, "labels": {"instrument": format!("SYM{}", chunk * 5000 + i), "venue": "XLON"}}))
                .collect();
            let r = client.post(format!("{url}/metrics/track/batch")).json(&body).send().await.unwrap();
            assert_eq!(r.status(), 200);
        }
        let after = rss_bytes();
        println!();
        println!("metrics ingest over HTTP, {CONNECTIONS} connections, {RUN:?} each, client in-process");
        println!("{:<38} {:>14}", "case", "points/s");
        println!("{:<38} {:>14.0}", "one point per request", single);
        println!("{:<38} {:>14.0}", "batches of 1000 points", batched);
        println!(
            "memory per series: {:.0} bytes (RSS {} MiB -> {} MiB over {SERIES} new series, labels instrument and venue)",
            (after.saturating_sub(before)) as f64 / SERIES as f64,
            before / 1_048_576,
            after / 1_048_576
        );
    });
}
