//! Ten thousand WebSocket connections on one stream replica: deliveries per second, latency from
//! produce to client, and resident memory per connection. `cargo bench --bench stream`
//! (`make bench-stream`); not part of `make test`.
//!
//! The replica (`access stream`) and the entitlements role run as their own processes (one
//! process cannot hold both ends of 10,000 sockets under the open-file limit); this process holds
//! the clients and produces records to the tansu broker of `tests/services.sh`
//! (`ACCESS_TEST_KAFKA`, default 127.0.0.1:19092) at a steady rate. Latency is measured from the
//! moment before the produce call to the client's receipt (microseconds, one clock). Memory per
//! connection is the server's RSS growth over the connections divided by their number.
//!
//! Each client connects and subscribes with tokio-tungstenite, then reads frames off its socket
//! itself (`read_records`): the clients share the two cores with the server, and a lighter client
//! leaves the server's cost to show. After the measured records, one unmeasured record tells the
//! clients to stop, so their teardown is not charged to a record. The table also gives, over the
//! records, when each record's last copy arrived (the span of its fan-out).
//!
//! The connections are spread over a few topics (`BENCH_TOPICS`, 4): connection i subscribes to
//! topic i mod 4 and record n is produced to topic n mod 4, so a record reaches a quarter of the
//! connections. `BENCH_TOPICS=1` is the worst case: every record to every connection.
//!
//! Knobs (environment): `BENCH_CONNECTIONS` (10000), `BENCH_RATE` (records/s, 20),
//! `BENCH_SECONDS` (10), `BENCH_FETCH_WAIT` (5ms), `BENCH_TOPICS` (4), `BENCH_PER_RECORD` (set:
//! print every record's last-copy time), `BENCH_RECORD_CHECKS` (1: every record checked against
//! each recipient's entitlement to `instrument:<id>`; 0: off), `BENCH_RULES` (10000 rules),
//! `BENCH_IDLE` (seconds: connect and subscribe, produce nothing, and print the server's RSS per
//! connection, the kernel's TCP memory from `/proc/net/sockstat` and the idle CPU per connection
//! per second; the open-file limit of this machine, 20,000 and not raisable, caps the
//! connections of one process below the issue's 50,000). Any `ACCESS_STREAM__*` variable of the
//! bench's environment is passed to the replica (`ACCESS_STREAM__READ_BUFFER_BYTES=512`).

#[path = "support/proc.rs"]
mod proc;

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use rskafka::client::partition::{Compression, UnknownTopicHandling};
use rskafka::client::ClientBuilder;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::MaybeTlsStream;

fn knob(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(role: &str, port: u16, env: &[(&str, String)], config: &std::path::Path) -> Proc {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_access"));
    cmd.args(["--config", &config.display().to_string(), role, "--port", &port.to_string()])
        .env_clear()
        .env("ACCESS_LOG_LEVEL", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    for (k, v) in env {
        cmd.env(k, v);
    }
    Proc(cmd.spawn().expect("the access binary"))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

async fn wait_ready(url: &str) {
    let client = reqwest::Client::new();
    for _ in 0..400 {
        if client.get(format!("{url}/ready")).send().await.is_ok_and(|r| r.status() == 200) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{url} did not become ready");
}

/// The unsigned number after `key` in `text`.
fn field_u64(text: &str, key: &str) -> Option<u64> {
    let rest = &text[text.find(key)? + key.len()..];
    let end = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// CPU seconds (user + system) a process has used.
/// The table's head and its first row: the connections subscribed and how long that took.
fn print_table_start(subscribed: u64, took: Duration) {
    println!("| measure | value |");
    println!("|---|---|");
    println!("| connections (all subscribed) | {subscribed} in {:.1} s |", took.as_secs_f64());
}

/// The table rows of the server's RSS: before and after connecting, and per connection.
fn print_rss(before: u64, after: u64, connections: usize) {
    println!(
        "| server RSS before / after connecting | {:.1} MiB / {:.1} MiB |",
        before as f64 / 1048576.0,
        after as f64 / 1048576.0
    );
    println!(
        "| RSS per connection | {:.1} KB |",
        after.saturating_sub(before) as f64 / connections as f64 / 1000.0
    );
}

/// `/proc/net/sockstat`'s TCP line: sockets in use and memory in pages.
fn tcp_sockstat() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/net/sockstat").unwrap_or_default();
    let line = text.lines().find(|l| l.starts_with("TCP:")).unwrap_or("");
    let field = |name: &str| {
        let mut words = line.split_whitespace();
        words.find(|w| *w == name).and_then(|_| words.next()).and_then(|v| v.parse().ok())
    };
    (field("inuse").unwrap_or(0), field("mem").unwrap_or(0))
}

fn cpu_seconds(pid: &str) -> f64 {
    proc::cpu_seconds(&format!("/proc/{pid}/stat"))
}

/// Reads server frames (unmasked, RFC 6455) off `tcp` until the record marked last, returning
/// each data record's latency in µs. The clients share the two cores with the server, so they
/// do the least work that still receives every frame: no per-frame allocation, a field scan
/// instead of a JSON parse; other frames (pings) are skipped.
async fn read_records(mut tcp: tokio::net::TcpStream, delivered: &AtomicU64) -> Vec<(u64, u64)> {
    use tokio::io::AsyncReadExt;
    let mut mine = Vec::new();
    let mut buf = vec![0u8; 4096];
    let mut filled = 0;
    loop {
        if filled == buf.len() {
            buf.resize(buf.len() * 2, 0);
        }
        let n = match tcp.read(&mut buf[filled..]).await {
            Ok(0) | Err(_) => return mine,
            Ok(n) => n,
        };
        filled += n;
        let received = now_us();
        let mut at = 0;
        while filled - at >= 2 {
            let (opcode, short) = (buf[at] & 0x0f, (buf[at + 1] & 0x7f) as usize);
            let (header, len) = match short {
                126 if filled - at >= 4 => {
                    (4, u16::from_be_bytes([buf[at + 2], buf[at + 3]]) as usize)
                }
                127 if filled - at >= 10 => {
                    let mut l = [0u8; 8];
                    l.copy_from_slice(&buf[at + 2..at + 10]);
                    (10, u64::from_be_bytes(l) as usize)
                }
                126 | 127 => break,
                n => (2, n),
            };
            if filled - at < header + len {
                break;
            }
            let payload = &buf[at + header..at + header + len];
            at += header + len;
            if opcode != 1 {
                continue;
            }
            let text = std::str::from_utf8(payload).unwrap_or_default();
            if let (Some(sent), Some(n)) =
                (field_u64(text, "\"sent_us\":"), field_u64(text, "\"price\":"))
            {
                mine.push((n, received.saturating_sub(sent)));
                delivered.fetch_add(1, Ordering::Relaxed);
            }
            if text.contains("\"last\":true") {
                return mine;
            }
        }
        buf.copy_within(at..filled, 0);
        filled -= at;
    }
}

fn now_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_micros() as u64
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(run());
}

async fn run() {
    let connections = knob("BENCH_CONNECTIONS", 10_000) as usize;
    let rate = knob("BENCH_RATE", 20);
    let topic_count = knob("BENCH_TOPICS", 4).max(1) as usize;
    let seconds = knob("BENCH_SECONDS", 10);
    let fetch_wait = std::env::var("BENCH_FETCH_WAIT").unwrap_or_else(|_| "5ms".into());
    let bootstrap = std::env::var("ACCESS_TEST_KAFKA").unwrap_or_else(|_| "127.0.0.1:19092".into());

    let dir = tempfile::tempdir().unwrap();
    let run_id = uuid::Uuid::new_v4().simple().to_string();
    let topics: Vec<String> =
        (0..topic_count).map(|t| format!("bench-prices-{t}-{run_id}")).collect();
    let kafka =
        ClientBuilder::new(vec![bootstrap.clone()]).build().await.expect("tansu (make services)");
    for topic in &topics {
        kafka.controller_client().unwrap().create_topic(topic, 1, 1, 5_000).await.unwrap();
    }
    // Per-record checks (`BENCH_RECORD_CHECKS`, on by default): every record is checked against
    // each recipient's entitlement to `instrument:<id>`, over `BENCH_RULES` rules.
    let record_checks = knob("BENCH_RECORD_CHECKS", 1) != 0;
    let rule_count = knob("BENCH_RULES", 10_000) as usize;
    let seed = dir.path().join("seed.yaml");
    let mut rules = String::from("- { name: traders, effect: allow, resource: market_data, actions: [subscribe], roles: [trader] }\n- { name: instruments, effect: allow, resource: \"instrument:*\", actions: [read], roles: [trader] }\n");
    for i in 0..rule_count.saturating_sub(2) {
        rules.push_str(&format!("- {{ name: r{i}, effect: allow, resource: \"instrument:SYM{i}\", actions: [read], roles: [trader], priority: {} }}\n", i % 5));
    }
    std::fs::write(&seed, rules).unwrap();
    let config = dir.path().join("access.toml");
    let record_resource =
        if record_checks { "record_resource = \"instrument:{instrument_id}\"\n" } else { "" };
    let registry: String = topics
        .iter()
        .map(|t| {
            format!(
                "[[stream.topics]]\nname = \"{t}\"\nresource = \"market_data\"\n{record_resource}"
            )
        })
        .collect();
    std::fs::write(&config, registry).unwrap();
    let key = dir.path().join("dev-key.json").display().to_string();
    let (ent_port, stream_port) = (free_port(), free_port());
    let common = vec![("ACCESS_AUTH__DEV_KEY_FILE", key.clone())];
    let mut ent_env = common.clone();
    ent_env.push(("ACCESS_ENTITLEMENTS__SEED_FILE", seed.display().to_string()));
    let _entitlements = spawn("entitlements", ent_port, &ent_env, &config);
    let ent_url = format!("http://127.0.0.1:{ent_port}");
    wait_ready(&ent_url).await;
    let mut stream_env = common.clone();
    stream_env.extend([
        ("ACCESS_ENTITLEMENTS_SERVICE_URL", ent_url.clone()),
        ("ACCESS_KAFKA_BOOTSTRAP", bootstrap.clone()),
        ("ACCESS_STREAM__FETCH_WAIT", fetch_wait.clone()),
        ("ACCESS_STREAM__METADATA_REFRESH", "200ms".into()),
        // The clients do not answer pings (see `read_records`); none is due within a run.
        ("ACCESS_STREAM__PING_INTERVAL", "1h".into()),
        ("ACCESS_STREAM__LIMITS__MAX_CONNECTIONS_PER_USER", "1000".into()),
        ("ACCESS_STREAM__LIMITS__CONNECT_RATE__RATE", "100000".into()),
        ("ACCESS_STREAM__LIMITS__CONNECT_RATE__BURST", "100000".into()),
        ("ACCESS_STREAM__LIMITS__CONNECT_RATE__PERIOD", "1s".into()),
        ("ACCESS_SERVER__MAX_CONCURRENCY", "20000".into()),
    ]);
    // The replica's settings under test (`ACCESS_STREAM__READ_BUFFER_BYTES=512`, ...), from this
    // process's environment, after the bench's own so they win.
    let passed: Vec<(String, String)> =
        std::env::vars().filter(|(k, _)| k.starts_with("ACCESS_STREAM__")).collect();
    stream_env.extend(passed.iter().map(|(k, v)| (k.as_str(), v.clone())));
    let stream = spawn("stream", stream_port, &stream_env, &config);
    let stream_url = format!("http://127.0.0.1:{stream_port}");
    wait_ready(&stream_url).await;
    let pid = stream.0.id();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = rss_bytes(pid);

    let signer = access::auth::devkey::DevKey::load_or_create(std::path::Path::new(&key)).unwrap();
    let tokens: Vec<String> = (0..100)
        .map(|u| {
            signer
                .issue(&access::auth::devkey::TokenRequest {
                    subject: &format!("trader{u}"),
                    // Ten tenants: one tenant is capped below 10,000 connections per replica.
                    tenant: &format!("t{}", u % 10),
                    roles: &["trader".to_string()],
                    ttl: Duration::from_secs(3600),
                    issuer: None,
                    audience: None,
                })
                .unwrap()
        })
        .collect();

    // (record number, latency µs) per delivery.
    let latencies = Arc::new(Mutex::new(Vec::<(u64, u64)>::with_capacity(1 << 20)));
    let delivered = Arc::new(AtomicU64::new(0));
    let ready = Arc::new(AtomicU64::new(0));
    let ws_base = format!("ws://127.0.0.1:{stream_port}/ws/stream");
    let connect_started = Instant::now();
    let mut clients = Vec::with_capacity(connections);
    let gate = Arc::new(tokio::sync::Semaphore::new(200));
    for i in 0..connections {
        let url = format!("{ws_base}?token={}", tokens[i % tokens.len()]);
        // Connection i reads topic i mod BENCH_TOPICS.
        let (topic, latencies, delivered, ready, gate) = (
            topics[i % topic_count].clone(),
            latencies.clone(),
            delivered.clone(),
            ready.clone(),
            gate.clone(),
        );
        clients.push(tokio::spawn(async move {
            let permit = gate.acquire_owned().await.unwrap();
            let (mut ws, _) = tokio_tungstenite::connect_async(url).await.expect("connect");
            let _hello = ws.next().await;
            ws.send(Message::text(json!({"action": "subscribe", "topics": [topic]}).to_string()))
                .await
                .unwrap();
            let answer = ws.next().await.unwrap().unwrap();
            assert!(answer.to_text().unwrap().contains("\"subscribed\""), "{answer}");
            drop(permit);
            ready.fetch_add(1, Ordering::Relaxed);
            // From here the client reads frames off the socket itself: nothing is sent before
            // every client has subscribed, so tungstenite's buffer holds nothing more.
            let MaybeTlsStream::Plain(tcp) = ws.into_inner() else { panic!("plain TCP") };
            let mine = read_records(tcp, &delivered).await;
            latencies.lock().unwrap().extend(mine);
        }));
    }
    while (ready.load(Ordering::Relaxed) as usize) < connections {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if connect_started.elapsed() > Duration::from_secs(180) {
            panic!("only {} of {connections} connected", ready.load(Ordering::Relaxed));
        }
    }
    let connect_time = connect_started.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after = rss_bytes(pid);
    let idle_seconds = knob("BENCH_IDLE", 0);
    if idle_seconds > 0 {
        // Idle: the connections hold their subscriptions and nothing is produced; the server's
        // CPU over the wait, its RSS per connection, and the kernel's TCP memory beside it.
        let (cpu_before, sockstat_before) = (cpu_seconds(&pid.to_string()), tcp_sockstat());
        tokio::time::sleep(Duration::from_secs(idle_seconds)).await;
        let cpu = cpu_seconds(&pid.to_string()) - cpu_before;
        let sockstat = tcp_sockstat();
        println!("\nstream bench, idle: {connections} WebSocket connections subscribed, nothing produced, {idle_seconds} s (pings every 1h here: the clients answer none)");
        print_table_start(ready.load(Ordering::Relaxed), connect_time);
        print_rss(rss_before, rss_after, connections);
        println!(
            "| kernel TCP memory (sockstat, both ends of every connection) | {:.1} MiB ({:.1} KB per connection), {} sockets in use (before the wait: {:.1} MiB) |",
            sockstat.1 as f64 * 4096.0 / 1048576.0,
            sockstat.1 as f64 * 4096.0 / connections as f64 / 1000.0,
            sockstat.0,
            sockstat_before.1 as f64 * 4096.0 / 1048576.0
        );
        println!(
            "| idle server CPU per connection per second | {:.3} µs |",
            cpu * 1e6 / connections as f64 / idle_seconds as f64
        );
        return;
    }

    let mut partitions = Vec::new();
    for topic in &topics {
        partitions
            .push(kafka.partition_client(topic, 0, UnknownTopicHandling::Retry).await.unwrap());
    }
    // Record n goes to topic n mod BENCH_TOPICS, which that topic's subscribers receive.
    let readers = |t: usize| (0..connections).filter(|i| i % topic_count == t).count() as u64;
    let total = rate * seconds;
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let mut tick = tokio::time::interval(interval);
    let started = Instant::now();
    let (server_cpu, client_cpu) = (cpu_seconds(&pid.to_string()), cpu_seconds("self"));
    // The measured records, then (once they are all delivered) one unmeasured record that tells
    // the clients to stop: their teardown must not be charged to a measured record.
    let expected: u64 = (0..total as usize).map(|n| readers(n % topic_count)).sum();
    let (mut elapsed, mut server_cpu, mut client_cpu) = (Duration::ZERO, server_cpu, client_cpu);
    for n in 0..total + topic_count as u64 {
        tick.tick().await;
        let data = if n < total {
            json!({"instrument_id": format!("I{}", n % 50), "price": n, "sent_us": now_us()})
        } else {
            if n == total {
                let deadline = Instant::now() + Duration::from_secs(60);
                while delivered.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                elapsed = started.elapsed();
                server_cpu = cpu_seconds(&pid.to_string()) - server_cpu;
                client_cpu = cpu_seconds("self") - client_cpu;
            }
            json!({"instrument_id": "I0", "last": true})
        };
        let partition = &partitions[n as usize % topic_count];
        let record = rskafka::record::Record {
            key: Some(format!("I{}", n % 50).into_bytes()),
            value: Some(data.to_string().into_bytes()),
            headers: Default::default(),
            timestamp: chrono::Utc::now(),
        };
        partition.produce(vec![record], Compression::NoCompression).await.unwrap();
    }
    let finished =
        tokio::time::timeout(Duration::from_secs(60), futures::future::join_all(clients)).await;
    eprintln!(
        "cpu: server {server_cpu:.2}s clients {client_cpu:.2}s over {:.1}s",
        elapsed.as_secs_f64()
    );
    assert!(finished.is_ok(), "clients did not receive every record within 60s");
    let all = latencies.lock().unwrap().clone();
    // Per record: when its last copy arrived (the fan-out's span, from the produce call).
    let mut last_copy = vec![0u64; total as usize];
    for &(n, us) in &all {
        if let Some(slot) = last_copy.get_mut(n as usize) {
            *slot = (*slot).max(us);
        }
    }
    let mut l: Vec<u64> = all.iter().map(|&(_, us)| us).collect();
    l.sort_unstable();
    let pct = |p: f64| {
        l.get(((l.len() as f64 * p) as usize).min(l.len().saturating_sub(1))).copied().unwrap_or(0)
            as f64
            / 1000.0
    };
    let deliveries = delivered.load(Ordering::Relaxed);
    println!("\nstream bench: {connections} WebSocket connections, one replica, tansu, fetch wait {fetch_wait}, per-record checks {}", if record_checks { format!("on ({rule_count} rules)") } else { "off".to_string() });
    print_table_start(ready.load(Ordering::Relaxed), connect_time);
    println!("| publish rate | {rate} records/s for {seconds} s ({total} records) |");
    println!(
        "| topics | {topic_count}: connection i reads topic i mod {topic_count}, record n goes to topic n mod {topic_count} ({} readers per record) |",
        readers(0)
    );
    println!("| deliveries | {deliveries} of {expected} |");
    println!("| deliveries per second | {:.0} |", deliveries as f64 / elapsed.as_secs_f64());
    println!("| latency produce -> client p50 | {:.1} ms |", pct(0.50));
    println!("| latency produce -> client p99 | {:.1} ms |", pct(0.99));
    println!("| latency max | {:.1} ms |", pct(1.0));
    let mut spans = last_copy.clone();
    spans.sort_unstable();
    let span = |p: f64| {
        spans
            .get(((spans.len() as f64 * p) as usize).min(spans.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0) as f64
            / 1000.0
    };
    println!(
        "| last copy of a record, p50 / p90 / max over records | {:.1} / {:.1} / {:.1} ms |",
        span(0.5),
        span(0.9),
        span(1.0)
    );
    if std::env::var_os("BENCH_PER_RECORD").is_some() {
        let each: Vec<String> =
            last_copy.iter().map(|us| format!("{:.0}", *us as f64 / 1000.0)).collect();
        println!("| last copy per record (ms) | {} |", each.join(" "));
    }
    println!(
        "| CPU per delivery: server / clients | {:.2} µs / {:.2} µs |",
        server_cpu * 1e6 / deliveries.max(1) as f64,
        client_cpu * 1e6 / deliveries.max(1) as f64
    );
    print_rss(rss_before, rss_after, connections);
    drop(stream);
}
