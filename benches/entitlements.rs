//! Entitlement checks with 10,000 rules. First in-process, as the gateway and the stream decide
//! (the rules mirror: the entitlements role's evaluator over its snapshot): decisions per second
//! on one thread and the p50/p99 of one decision. Then over HTTP: checks per second and p50/p99
//! latency, warm (every check a decision-cache hit) and cold (every check a new request:
//! evaluated), with the in-process cache and with Redis, beside nginx answering `return 200`
//! to the same requests from the same client (the ceiling for any HTTP answer on this box; the
//! ratio is printed, nginx skipped when not installed); then batches of 1,000 checks
//! (`POST /entitlements/check/batch`) in decisions per second. `cargo bench --bench
//! entitlements` (`make bench-entitlements`); not part of `make test`. The client runs in the
//! same process, on the same two cores. Knobs (environment): `BENCH_IN_PROCESS_ONLY` (the
//! evaluator alone), `BENCH_ONLY=http` or `BENCH_ONLY=batch` (one part of the HTTP cases, for a
//! profile of it).

#[path = "support/allocator.rs"]
mod allocator;

use std::sync::Arc;
use std::time::{Duration, Instant};

use access::config::Sources;

#[path = "support/nginx.rs"]
mod nginx;
use access::role::Role;
use access::server::{Context, Shutdown};
use nginx::Nginx;
use serde_json::json;

const RULES: usize = 10_000;
const CONNECTIONS: usize = 8;
const RUN: Duration = Duration::from_secs(4);
/// Checks per batch request (the role's default `entitlements.max_batch`).
const BATCH: usize = 1000;

fn seed_file(dir: &std::path::Path) -> String {
    let mut yaml = String::new();
    for i in 0..RULES - 10 {
        yaml.push_str(&format!(
            "- {{name: r{i}, effect: allow, resource: \"instrument:SYM{i}\", actions: [read], roles: [trader], priority: {}}}\n",
            i % 5
        ));
    }
    for i in 0..10 {
        yaml.push_str(&format!(
            "- {{name: g{i}, effect: deny, resource: \"instrument:SYM{i}*\", actions: [write], priority: 10, conditions: [{{field: context.size, operator: greater_than, value: 1000}}]}}\n"
        ));
    }
    let path = dir.join("rules.yaml");
    std::fs::write(&path, yaml).unwrap();
    path.display().to_string()
}

async fn start(env: Vec<(String, String)>) -> String {
    let config = access::roles::load(&Sources::from_env(env)).unwrap_or_else(|e| panic!("{e}"));
    let ctx = Context::new(Role::Entitlements, Arc::new(config.shared.clone()), Shutdown::new());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(
        async move { access::roles::start(Role::Entitlements, listener, ctx, &config).await },
    );
    let client = reqwest::Client::new();
    for _ in 0..200 {
        if client.get(format!("{url}/ready")).send().await.is_ok_and(|r| r.status() == 200) {
            return url;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the role did not become ready");
}

/// Runs `CONNECTIONS` clients for `RUN`; `warm` reuses 100 requests, cold makes each unique.
async fn measure(url: &str, token: &str, warm: bool) -> (f64, f64, f64) {
    measure_path(url, "/entitlements/check", token, warm, 1).await
}

/// As [`measure`], posting to `path` `per_request` checks at once (a batch when more than one);
/// the rate is in checks per second.
async fn measure_path(
    url: &str,
    path: &str,
    token: &str,
    warm: bool,
    per_request: usize,
) -> (f64, f64, f64) {
    let started = Instant::now();
    let tasks: Vec<_> = (0..CONNECTIONS)
        .map(|c| {
            let url = format!("{url}{path}");
            let token = token.to_string();
            tokio::spawn(async move {
                let client = reqwest::Client::builder().pool_max_idle_per_host(1).build().unwrap();
                let mut latencies = Vec::new();
                let mut n = 0usize;
                while started.elapsed() < RUN {
                    let check = |i: usize| {
                        json!({
                            "user_id": format!("user-{i}"), "tenant_id": "t1", "roles": ["trader"],
                            "resource": format!("instrument:SYM{}", (i * 7919) % (RULES - 10)), "action": "read",
                            "context": {"size": 10},
                        })
                    };
                    // The body is written as text: with serde_json values, building a batch
                    // of 1,000 cost the client (on the same two cores) more than the server.
                    let body = if per_request == 1 {
                        serde_json::to_string(&check(if warm { n % 100 } else { c * 10_000_000 + n }))
                            .unwrap()
                    } else {
                        use std::fmt::Write;
                        let mut body = String::with_capacity(per_request * 160);
                        body.push_str(r#"{"checks":["#);
                        for k in 0..per_request {
                            let i = if warm { k % 100 } else { c * 10_000_000 + n * per_request + k };
                            let sep = if k == 0 { "" } else { "," };
                            let _ = write!(
                                body,
                                r#"{sep}{{"id":{k},"user_id":"user-{i}","tenant_id":"t1","roles":["trader"],"resource":"instrument:SYM{}","action":"read","context":{{"size":10}}}}"#,
                                (i * 7919) % (RULES - 10)
                            );
                        }
                        body.push_str("]}");
                        body
                    };
                    let t = Instant::now();
                    let r = client
                        .post(&url)
                        .bearer_auth(&token)
                        .header("content-type", "application/json")
                        .body(body)
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(r.status(), 200);
                    let _ = r.bytes().await.unwrap();
                    latencies.push(t.elapsed());
                    n += 1;
                }
                latencies
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort();
    let pct =
        |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)].as_secs_f64() * 1e3;
    ((all.len() * per_request) as f64 / elapsed, pct(0.50), pct(0.99))
}

/// The in-process evaluator over `seed`'s rules: `Mirror::decide` (what the gateway calls per
/// request, building the request from the identity) on a rotating set of resources, timed one by
/// one.
fn in_process(seed: &str) {
    use access::policy::mirror::Mirror;
    let inputs =
        access::roles::entitlements::load_seed(Some(&std::path::PathBuf::from(seed))).unwrap();
    let now = chrono::Utc::now();
    let rules: Vec<_> = inputs
        .into_iter()
        .enumerate()
        .map(|(i, input)| access::policy::rules::Rule {
            id: uuid::Uuid::from_u128(i as u128 + 1),
            input,
            created_at: now,
            updated_at: now,
            version: 1,
        })
        .collect();
    let mirror = Mirror::fixed(Role::Gateway, rules, 1);
    let identity = access::auth::Identity {
        subject: "alice".into(),
        tenant: "t1".into(),
        roles: vec!["trader".into()],
        kind: access::auth::IdentityKind::User,
        expires_at: 0,
    };
    let resources: Vec<String> = (0..20_000).map(|i| format!("instrument:SYM{i}")).collect();
    const N: usize = 1_000_000;
    let mut times = Vec::with_capacity(N);
    let mut allowed = 0usize;
    let started = Instant::now();
    for i in 0..N {
        let t = Instant::now();
        let d = mirror.decide(&identity, &resources[i % resources.len()], "read").unwrap();
        times.push(t.elapsed());
        allowed += usize::from(d.allowed);
    }
    let elapsed = started.elapsed().as_secs_f64();
    times.sort();
    let pct = |p: f64| times[((N as f64 * p) as usize).min(N - 1)].as_nanos() as f64 / 1e3;
    println!();
    println!("in-process evaluator (rules mirror, what the gateway and stream call), {RULES} rules, one thread");
    println!("{:<40} {:>10} {:>10} {:>10}", "case", "decisions/s", "p50 us", "p99 us");
    println!(
        "{:<40} {:>10.0} {:>10.2} {:>10.2}",
        format!("Mirror::decide ({}% allowed)", allowed * 100 / N),
        N as f64 / elapsed,
        pct(0.50),
        pct(0.99)
    );
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let seed = seed_file(dir.path());
        in_process(&seed);
        if std::env::var_os("BENCH_IN_PROCESS_ONLY").is_some() {
            return;
        }
        let key_file = dir.path().join("dev-key.json").display().to_string();
        let key = access::auth::devkey::DevKey::load_or_create(std::path::Path::new(&key_file)).unwrap();
        let token = key
            .issue(&access::auth::devkey::TokenRequest {
                subject: "service:gateway",
                tenant: "platform",
                roles: &["service".to_string()],
                ttl: Duration::from_secs(3600),
                issuer: None,
                audience: None,
            })
            .unwrap();
        let base = vec![
            ("ACCESS_AUTH__DEV_KEY_FILE".to_string(), key_file.clone()),
            ("ACCESS_ENTITLEMENTS__SEED_FILE".to_string(), seed.clone()),
            ("ACCESS_LOG_LEVEL".to_string(), "warn".to_string()),
        ];
        let memory = start(base.clone()).await;
        let mut with_redis = base.clone();
        with_redis.push(("ACCESS_REDIS_URL".into(), "redis://127.0.0.1:6379".into()));
        with_redis.push(("ACCESS_REDIS__PREFIX".into(), format!("bench:{}:", uuid::Uuid::new_v4().simple())));
        let redis = start(with_redis).await;

        // `BENCH_ONLY=http` or `BENCH_ONLY=batch`: one part alone (for a profile of it).
        let only = std::env::var("BENCH_ONLY").unwrap_or_default();
        if only != "batch" {
        let nginx = Nginx::start(r#"{"allowed":true,"reason":"allowed by rule r1","rules_version":1,"cached":true}"#);
        println!();
        println!("entitlement checks over HTTP, {RULES} rules, {CONNECTIONS} keep-alive connections, {RUN:?} each, client in-process");
        println!("{:<40} {:>10} {:>10} {:>10} {:>10}", "case", "checks/s", "p50 ms", "p99 ms", "/ nginx");
        let ceiling = match &nginx {
            Some(nginx) => {
                let (rate, p50, p99) = measure(&nginx.url, &token, true).await;
                println!("{:<40} {rate:>10.0} {p50:>10.3} {p99:>10.3} {:>10}", "nginx return 200 (one worker)", "1.00");
                Some(rate)
            }
            None => {
                println!("nginx is not installed: no ceiling measured");
                None
            }
        };
        for (name, url, warm) in [
            ("embedded cache, warm (cache hits)", &memory, true),
            ("embedded cache, cold (evaluated)", &memory, false),
            ("Redis cache, warm (cache hits)", &redis, true),
            ("Redis cache, cold (evaluated + SET)", &redis, false),
        ] {
            let (rate, p50, p99) = measure(url, &token, warm).await;
            let ratio = ceiling.map_or("n/a".to_string(), |c| format!("{:.2}", rate / c));
            println!("{name:<40} {rate:>10.0} {p50:>10.3} {p99:>10.3} {ratio:>10}");
        }
        }
        if only == "http" {
            return;
        }
        println!();
        println!("batches of {BATCH} checks (POST /entitlements/check/batch), {CONNECTIONS} connections");
        println!("{:<40} {:>10} {:>10} {:>10}", "case", "decisions/s", "p50 ms", "p99 ms");
        for (name, url, warm) in [
            ("embedded cache, warm (cache hits)", &memory, true),
            ("embedded cache, cold (evaluated)", &memory, false),
        ] {
            let (rate, p50, p99) =
                measure_path(url, "/entitlements/check/batch", &token, warm, BATCH).await;
            println!("{name:<40} {rate:>10.0} {p50:>10.3} {p99:>10.3}");
        }
    });
}
