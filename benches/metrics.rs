//! The metrics role's ingest: points per second over HTTP, one point per request, in batches of
//! 1000, and the same series pushed as Prometheus text (the Pushgateway path), each with the CPU
//! the server spent per point (the role runs on its own runtime, whose threads are named
//! `bench-server`: their CPU time is read from `/proc/self/task`) and the whole process's (server
//! and in-process client); and the memory each series costs (resident-set growth over 100,000 new
//! series).
//! `cargo bench --bench metrics` (`make bench-metrics`); not part of `make test`.

#[path = "support/allocator.rs"]
mod allocator;

use std::sync::Arc;
use std::time::{Duration, Instant};

use access::config::Sources;
use access::role::Role;
use access::server::{Context, Shutdown};
use serde_json::json;

#[path = "support/nginx.rs"]
mod nginx;
#[path = "support/proc.rs"]
mod proc;

const CONNECTIONS: usize = 8;
const RUN: Duration = Duration::from_secs(4);

/// The name of the server runtime's threads (workers and blocking), whose CPU is the server's.
const SERVER_THREADS: &str = "bench-server";

/// CPU seconds (user + system) the threads named [`SERVER_THREADS`] have used.
fn server_cpu_seconds() -> f64 {
    std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("stat")).ok())
        .filter_map(|stat| {
            proc::stat_cpu(&stat).filter(|(name, _)| *name == SERVER_THREADS).map(|(_, s)| s)
        })
        .sum()
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|p| p.parse().ok()).unwrap_or(0);
    pages * 4096
}

async fn start(server: &tokio::runtime::Handle) -> String {
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
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    // Everything of the role is made on its own runtime, so its threads alone serve it.
    server.spawn(async move {
        let config = access::roles::load(&Sources::from_env(env)).unwrap_or_else(|e| panic!("{e}"));
        let ctx = Context::new(Role::Metrics, Arc::new(config.shared.clone()), Shutdown::new());
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        access::roles::start(Role::Metrics, listener, ctx, &config).await
    });
    for _ in 0..200 {
        if reqwest::get(format!("{url}/ready")).await.is_ok_and(|r| r.status() == 200) {
            return url;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("not ready");
}

/// How a case sends its points.
#[derive(Clone, Copy)]
enum Case {
    /// `POST /metrics/track`, one point per request.
    Single,
    /// `POST /metrics/track/batch`, this many points per request.
    Batch(usize),
    /// `PUT /metrics/job/<job>`, the same series as Prometheus text, this many per request.
    Text(usize),
}

/// What one case measured.
#[derive(Clone, Copy)]
struct Figures {
    points_per_second: f64,
    /// CPU seconds per million points, the server's threads only.
    server_cpu: f64,
    /// CPU seconds per million points, the whole process (server and client).
    process_cpu: f64,
}

/// Points per second and CPU seconds per million points for `CONNECTIONS` clients sending the
/// same bodies (made once, so the client's own cost is mostly HTTP), to existing series.
async fn ingest_rate(url: &str, case: Case) -> Figures {
    let started = Instant::now();
    let cpu_before = proc::cpu_seconds("/proc/self/stat");
    let server_before = server_cpu_seconds();
    let tasks: Vec<_> = (0..CONNECTIONS)
        .map(|c| {
            let url = url.to_string();
            tokio::spawn(async move {
                let client = reqwest::Client::new();
                let (target, body, per_request, put) = match case {
                    Case::Single => (
                        format!("{url}/metrics/track"),
                        json!({"name": "bench_requests", "type": "counter", "value": 1, "labels": {"client": c.to_string()}}).to_string(),
                        1,
                        false,
                    ),
                    Case::Batch(n) => (
                        format!("{url}/metrics/track/batch"),
                        serde_json::Value::Array(
                            (0..n)
                                .map(|i| json!({"name": "bench_gauge", "type": "gauge", "value": i, "labels": {"client": c.to_string(), "slot": (i % 50).to_string()}}))
                                .collect(),
                        )
                        .to_string(),
                        n,
                        false,
                    ),
                    Case::Text(n) => {
                        let mut text = String::from("# TYPE bench_text gauge\n");
                        for i in 0..n {
                            text.push_str(&format!("bench_text{{slot=\"{}\"}} {i}\n", i % 1000));
                        }
                        (format!("{url}/metrics/job/bench{c}"), text, n, true)
                    }
                };
                let body = bytes::Bytes::from(body);
                let mut points = 0usize;
                while started.elapsed() < RUN {
                    let request = if put { client.put(&target) } else { client.post(&target) };
                    let r = request
                        .header("content-type", if put { "text/plain" } else { "application/json" })
                        .body(body.clone())
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(r.status(), 200);
                    points += per_request;
                }
                points
            })
        })
        .collect();
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    let cpu = proc::cpu_seconds("/proc/self/stat") - cpu_before;
    let server = server_cpu_seconds() - server_before;
    Figures {
        points_per_second: total as f64 / started.elapsed().as_secs_f64(),
        server_cpu: server / total as f64 * 1e6,
        process_cpu: cpu / total as f64 * 1e6,
    }
}

fn main() {
    // The role on a runtime of its own (as in its own process), the clients on another.
    let server = tokio::runtime::Builder::new_multi_thread()
        .thread_name(SERVER_THREADS)
        .enable_all()
        .build()
        .unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .thread_name("bench-client")
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let url = start(server.handle()).await;
        // The same client and body against nginx's `return 200`: the ceiling for one point per
        // request on this box.
        let ceiling = match nginx::Nginx::start(r#"{"accepted":1}"#) {
            Some(nginx) => Some(ingest_rate(&nginx.url, Case::Single).await.points_per_second),
            None => None,
        };
        let single = ingest_rate(&url, Case::Single).await;
        let batched = ingest_rate(&url, Case::Batch(1000)).await;
        let text = ingest_rate(&url, Case::Text(1000)).await;
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
        println!(
            "{:<44} {:>12} {:>18} {:>18} {:>16}",
            "case", "points/s", "server CPU s/1M", "process CPU s/1M", "points/s/core"
        );
        for (case, f) in [
            ("one point per request (JSON)", single),
            ("batches of 1000 points (JSON)", batched),
            ("1000 samples per push (Pushgateway text)", text),
        ] {
            println!(
                "{case:<44} {:>12.0} {:>18.2} {:>18.2} {:>16.0}",
                f.points_per_second,
                f.server_cpu,
                f.process_cpu,
                1e6 / f.server_cpu
            );
        }
        println!("(server CPU: the role's runtime threads; process: server and client together; 1M points/s per core is 1.0 s per 1M; points/s/core is the server's)");
        match ceiling {
            Some(rate) => println!(
                "nginx return 200, same client and body: {rate:.0} requests/s; one point per request is {:.2} of it",
                single.points_per_second / rate
            ),
            None => println!("nginx is not installed: no ceiling measured"),
        }
        println!(
            "memory per series: {:.0} bytes (RSS {} MiB -> {} MiB over {SERIES} new series, labels instrument and venue)",
            (after.saturating_sub(before)) as f64 / SERIES as f64,
            before / 1_048_576,
            after / 1_048_576
        );
    });
}
