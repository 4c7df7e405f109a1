//! GCRA rate limits in the gateway against the real Redis, shared by two gateways, and with a
//! private Redis stopped mid-test under each failure mode and in shadow mode.

use std::time::Duration;

use access::role::Role;
use axum::routing::get;
use axum::Router;
use serde_json::Value;

use crate::support::{
    config_with_file, http, redis_prefix, start, wait_ready, DevKeys, PrivateRedis, Running,
    REDIS_URL,
};

async fn upstream() -> String {
    let app = Router::new().route("/{*rest}", get(|| async { "ok" }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

struct Gw {
    _dir: tempfile::TempDir,
    up: String,
    keys: DevKeys,
    routes: String,
}

/// The route file, with its policies (reloaded with it): `/limited` (`burst3`, burst `burst`),
/// `/both` (`burst3` and `slow`), `/open` (auth required), `/outage` (`burst3_per_minute`).
/// `burst3` refills one cell every 3 s: far more than a loaded debug build takes for the requests
/// of one assertion (at 1 s a slow machine saw a cell come back mid-test).
fn routes_file(up: &str, burst: u64) -> String {
    format!(
        r#"
routes:
  - {{ name: limited, path: /limited, upstreams: ["{up}"], auth: none, rate_limits: [burst3] }}
  - {{ name: both, path: /both, upstreams: ["{up}"], auth: none, rate_limits: [burst3, slow] }}
  - {{ name: open, path: /open, upstreams: ["{up}"], auth: required }}
  - {{ name: outage, path: /outage, upstreams: ["{up}"], auth: none, rate_limits: [burst3_per_minute] }}
rate_limits:
  burst3: {{ rate: 1, period: 3s, burst: {burst} }}
  burst3_per_minute: {{ rate: 1, period: 1m, burst: 3 }}
  slow: {{ rate: 1, period: 1m, burst: 1 }}
  public: {{ rate: 100, period: 1m, burst: 100 }}
  authenticated: {{ rate: 100, period: 1m, burst: 100 }}
"#
    )
}

async fn setup() -> Gw {
    let dir = tempfile::tempdir().unwrap();
    let up = upstream().await;
    let routes = dir.path().join("routes.yaml");
    std::fs::write(&routes, routes_file(&up, 3)).unwrap();
    Gw { routes: routes.display().to_string(), keys: DevKeys::new(), _dir: dir, up }
}

const POLICIES: &str = "";

async fn gateway(gw: &Gw, toml_extra: &str, env: &[(&str, &str)]) -> Running {
    let mut all = vec![
        ("ACCESS_AUTH__DEV_KEY_FILE", gw.keys.path.as_str()),
        ("ACCESS_GATEWAY__ROUTES_FILE", gw.routes.as_str()),
    ];
    all.extend_from_slice(env);
    let s =
        start(Role::Gateway, config_with_file(&format!("{POLICIES}\n{toml_extra}"), &all)).await;
    wait_ready(&s.url("")).await;
    s
}

async fn hit(g: &Running, path: &str) -> (u16, reqwest::header::HeaderMap, Value) {
    let r = http().get(g.url(path)).send().await.unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    (status, headers, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn gcra_is_exact_at_the_boundary() {
    let gw = setup().await;
    let prefix = redis_prefix();
    let g = gateway(&gw, "", &[("ACCESS_REDIS_URL", REDIS_URL), ("ACCESS_REDIS__PREFIX", &prefix)])
        .await;
    let mut statuses = Vec::new();
    let mut remaining = Vec::new();
    for _ in 0..4 {
        let (status, headers, _) = hit(&g, "/limited").await;
        statuses.push(status);
        remaining.push(headers.get("ratelimit-remaining").map(|v| v.to_str().unwrap().to_string()));
    }
    assert_eq!(statuses, vec![200, 200, 200, 429], "the request after the burst is limited");
    assert_eq!(remaining[0].as_deref(), Some("2"));
    let (status, headers, body) = hit(&g, "/limited").await;
    assert_eq!(status, 429);
    assert_eq!(body["code"], "rate_limited");
    // The next cell comes back one emission interval (3 s) after the first allowed request.
    let retry = headers["retry-after"].to_str().unwrap().parse::<u64>().unwrap();
    assert!((1..=3).contains(&retry), "retry after: {retry}");
    assert_eq!(body["retry_after"], retry);
    assert_eq!(headers["ratelimit-limit"], "3");
    assert_eq!(headers["ratelimit-remaining"], "0");
    let wait = headers["ratelimit-reset"].to_str().unwrap().parse::<u64>().unwrap();
    assert!((1..=9).contains(&wait), "reset in seconds: {wait}");
    // Once that cell is back, exactly one more is allowed.
    tokio::time::sleep(Duration::from_millis(retry * 1000 + 50)).await;
    assert_eq!(hit(&g, "/limited").await.0, 200);
    assert_eq!(hit(&g, "/limited").await.0, 429);
}

#[tokio::test]
async fn several_policies_on_one_route_and_a_refusal_consumes_none() {
    let gw = setup().await;
    let prefix = redis_prefix();
    let g = gateway(&gw, "", &[("ACCESS_REDIS_URL", REDIS_URL), ("ACCESS_REDIS__PREFIX", &prefix)])
        .await;
    assert_eq!(hit(&g, "/both").await.0, 200);
    let (status, headers, _) = hit(&g, "/both").await;
    assert_eq!(status, 429, "slow (1 per minute) limits");
    assert!(headers["retry-after"].to_str().unwrap().parse::<u64>().unwrap() > 50);
    // The refused requests did not consume burst3 (same caller key: the client address).
    assert_eq!(hit(&g, "/limited").await.0, 200);
    assert_eq!(hit(&g, "/limited").await.0, 200);
    assert_eq!(hit(&g, "/limited").await.0, 429, "burst3 had one used by the first /both");
}

#[tokio::test]
async fn two_gateways_share_one_limit() {
    let gw = setup().await;
    let prefix = redis_prefix();
    let env = [("ACCESS_REDIS_URL", REDIS_URL), ("ACCESS_REDIS__PREFIX", prefix.as_str())];
    let a = gateway(&gw, "", &env).await;
    // The other gateway is another process: the built binary.
    let b = crate::support::spawn_binary(
        "gateway",
        &[
            ("ACCESS_AUTH__DEV_KEY_FILE", &gw.keys.path),
            ("ACCESS_GATEWAY__ROUTES_FILE", &gw.routes),
            env[0],
            env[1],
        ],
    );
    wait_ready(&b.url).await;
    let mut allowed = 0;
    for i in 0..6 {
        let url = if i % 2 == 0 { a.url("/limited") } else { format!("{}/limited", b.url) };
        if http().get(url).send().await.unwrap().status() == 200 {
            allowed += 1;
        }
    }
    assert_eq!(allowed, 3, "one burst across both replicas");
    let admin = gw.keys.token("root", "t0", &["admin"]);
    let stats: Value = http()
        .get(a.url("/api/v1/rate-limits"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let burst3 = stats["policies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "burst3")
        .unwrap()
        .clone();
    assert!(
        burst3["allowed"].as_u64().unwrap() >= 1 && burst3["limited"].as_u64().unwrap() >= 1,
        "{stats}"
    );
}

/// With I/O threads, each thread batches its checks over a Redis connection of its own; one limit
/// stays exact across them.
#[tokio::test]
async fn io_threads_with_their_own_redis_connections_keep_one_exact_limit() {
    let gw = setup().await;
    let prefix = redis_prefix();
    let env = [
        ("ACCESS_REDIS_URL", REDIS_URL),
        ("ACCESS_REDIS__PREFIX", prefix.as_str()),
        ("ACCESS_SERVER__IO_THREADS", "2"),
    ];
    let g = gateway(&gw, "", &env).await;
    // 60 concurrent requests, each on a connection of its own, against 3 per minute.
    let requests = (0..60).map(|_| {
        let url = g.url("/outage");
        tokio::spawn(async move { http().get(url).send().await.unwrap().status().as_u16() })
    });
    let statuses = futures::future::join_all(requests).await;
    let allowed = statuses.iter().filter(|s| *s.as_ref().unwrap() == 200).count();
    let limited = statuses.iter().filter(|s| *s.as_ref().unwrap() == 429).count();
    assert_eq!((allowed, limited), (3, 57), "{statuses:?}");
}

async fn with_outage(mode: &str, shadow: bool) -> Vec<u16> {
    let gw = setup().await;
    let mut redis = PrivateRedis::start().await;
    let toml = format!(
        "[gateway]\nrate_limit_on_store_error = \"{mode}\"\nrate_limit_shadow = {shadow}\n"
    );
    let g = gateway(
        &gw,
        &toml,
        &[("ACCESS_REDIS_URL", &redis.url), ("ACCESS_REDIS__TIMEOUT", "300ms")],
    )
    .await;
    redis.stop();
    let mut statuses = Vec::new();
    // Each request waits out the Redis timeout first, so the policy's interval is long.
    for _ in 0..5 {
        statuses.push(hit(&g, "/outage").await.0);
    }
    // (The admin API needs Redis for revocation checks, so the counters are read from /metrics.)
    let text = http().get(g.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let errors = text.lines().find(|l| {
        l.starts_with("access_gateway_rate_limit_decisions_total{")
            && l.contains("policy=\"burst3_per_minute\"")
            && l.contains("store_error")
    });
    assert!(errors.is_some(), "store errors are counted:\n{text}");
    statuses
}

#[tokio::test]
async fn with_redis_down_each_failure_mode_does_what_it_says() {
    assert_eq!(
        with_outage("local", false).await,
        vec![200, 200, 200, 429, 429],
        "local: the in-process GCRA limits"
    );
    assert_eq!(with_outage("open", false).await, vec![200; 5], "open: allowed");
    assert_eq!(with_outage("closed", false).await, vec![503; 5], "closed: refused");
    assert_eq!(with_outage("local", true).await, vec![200; 5], "shadow: counted, never refused");
}

#[tokio::test]
async fn shadow_mode_counts_would_be_rejections() {
    let gw = setup().await;
    let prefix = redis_prefix();
    let g = gateway(
        &gw,
        "[gateway]\nrate_limit_shadow = true\n",
        &[("ACCESS_REDIS_URL", REDIS_URL), ("ACCESS_REDIS__PREFIX", &prefix)],
    )
    .await;
    for _ in 0..5 {
        assert_eq!(hit(&g, "/limited").await.0, 200);
    }
    let admin = gw.keys.token("root", "t0", &["admin"]);
    let stats: Value = http()
        .get(g.url("/api/v1/rate-limits"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let burst3 = stats["policies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "burst3")
        .unwrap()
        .clone();
    assert_eq!(
        (burst3["shadow_limited"].as_u64(), burst3["limited"].as_u64()),
        (Some(2), Some(0)),
        "{stats}"
    );
}

#[tokio::test]
async fn the_per_address_limit_stops_floods_of_bad_tokens_before_verification() {
    let gw = setup().await;
    let g = gateway(&gw, "[gateway.ip_limit]\nrate = 5\nperiod = \"1m\"\nburst = 5\n", &[]).await;
    let mut statuses = Vec::new();
    for _ in 0..7 {
        let r = http().get(g.url("/open")).bearer_auth("bad.token.here").send().await.unwrap();
        statuses.push(r.status().as_u16());
    }
    assert_eq!(statuses, vec![401, 401, 401, 401, 401, 429, 429]);
    // The refusal is the per-address limit, reached before the token is looked at.
    let r = http().get(g.url("/open")).bearer_auth("bad.token.here").send().await.unwrap();
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        (body["code"].as_str(), body["message"].as_str()),
        (Some("rate_limited"), Some("too many requests from this address"))
    );
    assert!(body.get("reason").is_none(), "no authentication reason: the token was never verified");
}

#[tokio::test]
async fn policies_reload_with_the_routes_on_sighup() {
    let gw = setup().await;
    let prefix = redis_prefix();
    let mut p = crate::support::spawn_binary(
        "gateway",
        &[
            ("ACCESS_AUTH__DEV_KEY_FILE", &gw.keys.path),
            ("ACCESS_GATEWAY__ROUTES_FILE", &gw.routes),
            ("ACCESS_REDIS_URL", REDIS_URL),
            ("ACCESS_REDIS__PREFIX", &prefix),
        ],
    );
    wait_ready(&p.url).await;
    let url = format!("{}/limited", p.url);
    let statuses = |n: usize| {
        let url = url.clone();
        async move {
            let mut out = Vec::new();
            for _ in 0..n {
                out.push(http().get(&url).send().await.unwrap().status().as_u16());
            }
            out
        }
    };
    assert_eq!(statuses(4).await, vec![200, 200, 200, 429]);
    // A bigger burst in the file, then SIGHUP: the new policy applies at once.
    std::fs::write(&gw.routes, routes_file(&gw.up, 50)).unwrap();
    crate::support::signal(p.child.id(), "HUP");
    crate::support::eventually(Duration::from_secs(3), "the new burst applies", || async {
        let r = http().get(&url).send().await.unwrap();
        (r.status() == 200 && r.headers()["ratelimit-limit"] == "50").then_some(())
    })
    .await;
    assert_eq!(p.terminate(Duration::from_secs(10)).await.code(), Some(0));
}

/// A client of the Redis at `url`, as the gateway connects one, for the limiter tests.
async fn redis_client(url: &str, timeout: Option<Duration>) -> access::backends::redis::Guarded {
    let mut config = access::config::RedisConfig::default();
    config.timeout = timeout.unwrap_or(config.timeout);
    let url = access::config::SecretUrl::from(url::Url::parse(url).unwrap());
    let client = access::backends::redis::connect(&url, &config).await.unwrap();
    access::backends::redis::Guarded::new(client, Role::Gateway, "rate_limits", &config)
}

/// The script reads the cache entry in the rate limit's round trip: the value when the key
/// exists, an explicit "none" when it does not, and the verdicts are the same as without it.
#[tokio::test]
async fn the_limit_script_reads_the_cache_entry_in_the_same_round_trip() {
    use access::ratelimit::{CacheRead, Limiter, OnStoreError, Policy};
    use fred::prelude::KeysInterface;
    let guarded = redis_client(REDIS_URL, None).await;
    let client = guarded.client.clone();
    let prefix = format!("it:{}:", uuid::Uuid::new_v4().simple());
    let policy = Policy { rate: 10, period: Duration::from_secs(60), burst: 2 };
    let limiter = Limiter::new(
        [("p".to_string(), policy)].into(),
        Some((guarded, prefix.clone())),
        OnStoreError::Closed,
        false,
    );
    let entry = format!("{prefix}cache:r:1");
    let _: () = client.set(&entry, "{\"stored\":1}", None, None, false).await.unwrap();
    let names = ["p".to_string()];
    let first = limiter.check(&names, "u", Some(entry.clone())).await;
    assert!(first.outcome.allowed);
    assert_eq!(first.cached, CacheRead::Hit(bytes::Bytes::from_static(b"{\"stored\":1}")));
    let second = limiter.check(&names, "u", Some(format!("{prefix}cache:r:absent"))).await;
    assert!(second.outcome.allowed);
    assert_eq!(second.cached, CacheRead::Miss, "a missing entry is read as none, not skipped");
    let third = limiter.check(&names, "u", Some(entry.clone())).await;
    assert!(!third.outcome.allowed, "the burst of 2 is spent whether or not an entry is read");
    assert_ne!(
        third.cached,
        CacheRead::NotAsked,
        "a limited request still gets the script's answer"
    );
    let without = limiter.check(&names, "u", None).await;
    assert!(!without.outcome.allowed);
    assert_eq!(without.cached, CacheRead::NotAsked, "nothing asked, nothing read");
    let _: i64 = client.del(vec![entry, format!("{prefix}rl:p:u")]).await.unwrap();
}

/// Concurrent checks share script calls, and the limit stays exact: of 300 requests at once
/// against a burst of 100, exactly 100 pass, in fewer calls than requests.
#[tokio::test]
async fn concurrent_checks_share_script_calls_and_stay_exact() {
    use access::ratelimit::{Limiter, OnStoreError, Policy};
    let guarded = redis_client(REDIS_URL, None).await;
    let client = guarded.client.clone();
    let prefix = format!("it:{}:", uuid::Uuid::new_v4().simple());
    // A rate so slow that no emission interval passes during the test.
    let policy = Policy { rate: 1, period: Duration::from_secs(3600), burst: 100 };
    // Roomier than `p`: the checks `p` refuses must not consume it, in a batch or across batches.
    let wide = Policy { rate: 1, period: Duration::from_secs(3600), burst: 150 };
    let limiter = std::sync::Arc::new(Limiter::new(
        [("p".to_string(), policy), ("wide".to_string(), wide)].into(),
        Some((guarded, prefix.clone())),
        OnStoreError::Closed,
        false,
    ));
    let names = ["p".to_string(), "wide".to_string()];
    let checks = (0..300).map(|i| {
        let (limiter, names) = (limiter.clone(), names.clone());
        // Two subjects: each has its own bucket of 100.
        tokio::spawn(
            async move { limiter.check(&names, &format!("u{}", i % 2), None).await.outcome },
        )
    });
    let outcomes = futures::future::join_all(checks).await;
    let mut allowed = [0, 0];
    for (i, outcome) in outcomes.into_iter().enumerate() {
        let outcome = outcome.unwrap();
        assert!(!outcome.store_unavailable, "Redis answered every check");
        if outcome.allowed {
            allowed[i % 2] += 1;
        }
    }
    assert_eq!(allowed, [100, 100], "exactly the burst passes for each subject");
    let calls = limiter.script_calls().unwrap();
    assert!(calls < 300, "{calls} script calls for 300 concurrent checks: none were batched");
    let counts = limiter.counts();
    assert_eq!(counts["p"].allowed.load(std::sync::atomic::Ordering::Relaxed), 200);
    assert_eq!(counts["p"].limited.load(std::sync::atomic::Ordering::Relaxed), 100);
    for subject in ["u0", "u1"] {
        let wide_only = limiter.check(&["wide".to_string()], subject, None).await.outcome;
        let (_, _, verdict) = wide_only.tightest.expect("a verdict");
        assert!(wide_only.allowed);
        assert_eq!(verdict.remaining, 150 - 100 - 1, "only the 100 allowed checks consumed it");
    }
    let keys: Vec<String> = ["p", "wide"]
        .iter()
        .flat_map(|p| ["u0", "u1"].map(|u| format!("{prefix}rl:{p}:{u}")))
        .collect();
    let _: i64 = fred::prelude::KeysInterface::del(&client, keys).await.unwrap();
}

/// A limiter refusing when its store fails (one policy, `p`, roomy enough for every check) on
/// `redis`, with the Redis `timeout`, after one check Redis answered.
async fn closed_limiter(
    redis: &PrivateRedis,
    timeout: Duration,
) -> (std::sync::Arc<access::ratelimit::Limiter>, [String; 1]) {
    use access::ratelimit::{Limiter, OnStoreError, Policy};
    let client = redis_client(&redis.url, Some(timeout)).await;
    let policy = Policy { rate: 1000, period: Duration::from_secs(1), burst: 1000 };
    let limiter = std::sync::Arc::new(Limiter::new(
        [("p".to_string(), policy)].into(),
        Some((client, "it:".to_string())),
        OnStoreError::Closed,
        false,
    ));
    let names = ["p".to_string()];
    assert!(limiter.check(&names, "warm", None).await.outcome.allowed, "Redis answers");
    (limiter, names)
}

/// When Redis hangs, every check still ends within the Redis timeout, queueing included: calls
/// fail one timeout at a time, and without that bound checks queued behind them would wait many
/// timeouts (10,000 checks are 157 calls of 64, two at a time; more than the queue's 8,192
/// places, so some also wait for room).
#[tokio::test]
async fn a_hanging_redis_costs_each_check_one_timeout_not_a_queue_of_them() {
    let redis = PrivateRedis::start().await;
    let (limiter, names) = closed_limiter(&redis, Duration::from_millis(300)).await;
    redis.freeze();
    let started = std::time::Instant::now();
    let checks = (0..10_000).map(|i| {
        let (limiter, names) = (limiter.clone(), names.clone());
        tokio::spawn(async move { limiter.check(&names, &format!("u{i}"), None).await.outcome })
    });
    for outcome in futures::future::join_all(checks).await {
        let outcome = outcome.unwrap();
        assert!(outcome.store_unavailable && !outcome.allowed, "closed mode refuses");
    }
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_secs(3),
        "10,000 checks against a hung Redis took {elapsed:?}; each should wait one 300 ms timeout"
    );
}

/// A Redis that answers, but slowly (frozen 250 ms, thawed 5 ms, over and over: every call is
/// answered within the 300 ms timeout, so the breaker never opens), still answers each check
/// within the timeout, queueing included: 3,000 checks are 47 calls of 64, two at a time, about
/// 6 s to drain; the checks the calls cannot reach in time are answered as unanswered, not kept
/// waiting.
#[tokio::test]
async fn a_slow_redis_keeps_no_check_waiting_past_the_timeout() {
    let redis = PrivateRedis::start().await;
    let timeout = Duration::from_millis(300);
    let (limiter, names) = closed_limiter(&redis, timeout).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let slow = {
        let (stop, pid) = (stop.clone(), redis.pid());
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                crate::support::signal(pid, "STOP");
                std::thread::sleep(Duration::from_millis(250));
                crate::support::signal(pid, "CONT");
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let checks = (0..3000).map(|i| {
        let (limiter, names) = (limiter.clone(), names.clone());
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let outcome = limiter.check(&names, &format!("u{i}"), None).await.outcome;
            (outcome.allowed, started.elapsed())
        })
    });
    let waits = futures::future::join_all(checks).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    slow.join().unwrap();
    redis.thaw();
    let answered = waits.iter().filter(|w| w.as_ref().unwrap().0).count();
    let longest = waits.iter().map(|w| w.as_ref().unwrap().1).max().unwrap();
    assert!(answered > 0, "Redis answered some checks");
    assert!(
        longest < timeout + Duration::from_secs(1),
        "a check waited {longest:?} with a 300 ms timeout ({answered} of 3,000 answered)"
    );
}

/// Leased mode, three replicas (three limiters, each with its own Redis connection) taking
/// turns on one budget that does not refill during the test: exactly the burst is admitted in
/// all (a cell is taken from the shared budget when leased and spent once), though most
/// requests never asked Redis (leases grow from one cell as they are spent, and a refusal is
/// kept until the next cell is due).
#[tokio::test]
async fn leased_replicas_share_one_budget_without_admitting_more() {
    use access::ratelimit::{Lease, Limiter, OnStoreError, Policy};
    let prefix = format!("it:{}:", uuid::Uuid::new_v4().simple());
    let policy = Policy { rate: 1, period: Duration::from_secs(3600), burst: 40 };
    let lease = Lease { share: 0.5, max_age: Duration::from_secs(60) };
    let mut replicas = Vec::new();
    for _ in 0..3 {
        let guarded = redis_client(REDIS_URL, None).await;
        let limiter = Limiter::new(
            [("p".to_string(), policy.clone())].into(),
            Some((guarded, prefix.clone())),
            OnStoreError::Closed,
            false,
        );
        replicas.push(limiter.leased(lease));
    }
    let names = ["p".to_string()];
    let mut admitted = [0; 3];
    for round in 0..40 {
        for (i, replica) in replicas.iter().enumerate() {
            let outcome = replica.check(&names, "u", None).await.outcome;
            assert!(!outcome.store_unavailable, "round {round}: Redis answered");
            admitted[i] += usize::from(outcome.allowed);
        }
    }
    assert_eq!(admitted.iter().sum::<usize>(), 40, "exactly the burst in all: {admitted:?}");
    assert!(admitted.iter().all(|a| *a > 0), "every replica leased some: {admitted:?}");
    let calls: Vec<u64> = replicas.iter().map(|r| r.script_calls().unwrap()).collect();
    // Leases of 1, 2, 4, 8 (and what is left), then one refusal kept for the hour.
    assert!(calls.iter().all(|c| *c <= 7), "{calls:?} Redis calls for 40 checks each");
}

/// Leased cells are dropped after `max_age` (never spent later, which is what bounds
/// over-admission): a replica whose lease grew to 10 cells spends one of them, waits past the
/// age, and the 9 it held are lost, not admitted: the budget of 100 admits 91 in all.
#[tokio::test]
async fn leased_cells_older_than_max_age_are_dropped_not_spent() {
    use access::ratelimit::{Lease, Limiter, OnStoreError, Policy};
    let prefix = format!("it:{}:", uuid::Uuid::new_v4().simple());
    let policy = Policy { rate: 1, period: Duration::from_secs(3600), burst: 100 };
    let lease = Lease { share: 0.1, max_age: Duration::from_millis(300) };
    let limiter = Limiter::new(
        [("p".to_string(), policy)].into(),
        Some((redis_client(REDIS_URL, None).await, prefix)),
        OnStoreError::Closed,
        false,
    )
    .leased(lease);
    let names = ["p".to_string()];
    // Leases of 1, 2, 4 and 8 are spent by 15 checks; the 16th leases 10 (the largest: a tenth
    // of the burst) and holds 9.
    for i in 0..16 {
        assert!(limiter.check(&names, "u", None).await.outcome.allowed, "check {i}");
    }
    assert_eq!(limiter.script_calls(), Some(5), "five leases");
    tokio::time::sleep(Duration::from_millis(400)).await;
    let mut admitted = 16;
    for _ in 0..200 {
        admitted += usize::from(limiter.check(&names, "u", None).await.outcome.allowed);
    }
    assert_eq!(admitted, 91, "the 9 cells held past max_age were dropped");
}

/// Leased mode under load: three replicas, eight callers each, hammer one subject for two
/// seconds on a budget that refills (100 per second, burst 50). What they admit stays within
/// the documented bound (what the exact limiter admits over the window stretched by
/// `max_age`: burst + rate * (W + max_age)), yet most of it (the cells are not wasted), with
/// far fewer Redis calls than requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leased_replicas_under_load_stay_within_the_documented_bound() {
    use access::ratelimit::{Lease, Limiter, OnStoreError, Policy};
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    let prefix = format!("it:{}:", uuid::Uuid::new_v4().simple());
    let policy = Policy { rate: 100, period: Duration::from_secs(1), burst: 50 };
    let lease = Lease { share: 0.2, max_age: Duration::from_millis(300) };
    let mut replicas = Vec::new();
    for _ in 0..3 {
        let limiter = Limiter::new(
            [("p".to_string(), policy.clone())].into(),
            Some((redis_client(REDIS_URL, None).await, prefix.clone())),
            OnStoreError::Closed,
            false,
        );
        replicas.push(Arc::new(limiter.leased(lease)));
    }
    let (admitted, requests) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let stop = Arc::new(AtomicBool::new(false));
    let started = std::time::Instant::now();
    let callers: Vec<_> = (0..24)
        .map(|i| {
            let replica = replicas[i % 3].clone();
            let (admitted, requests, stop) = (admitted.clone(), requests.clone(), stop.clone());
            tokio::spawn(async move {
                let names = ["p".to_string()];
                while !stop.load(Ordering::Relaxed) {
                    let outcome = replica.check(&names, "u", None).await.outcome;
                    assert!(!outcome.store_unavailable, "Redis answered");
                    requests.fetch_add(1, Ordering::Relaxed);
                    admitted.fetch_add(u64::from(outcome.allowed), Ordering::Relaxed);
                    if !outcome.allowed {
                        // A refused caller backs off a little, as clients told Retry-After do.
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    for caller in callers {
        caller.await.unwrap();
    }
    let window = started.elapsed().as_secs_f64();
    let (admitted, requests) = (admitted.load(Ordering::Relaxed), requests.load(Ordering::Relaxed));
    let exact = 50.0 + 100.0 * window;
    let bound = 50.0 + 100.0 * (window + lease.max_age.as_secs_f64());
    let calls: u64 = replicas.iter().map(|r| r.script_calls().unwrap()).sum();
    eprintln!(
        "leased: {admitted} admitted of {requests} in {window:.2} s (exact at most {exact:.0}, \
         leased bound {bound:.0}), {calls} Redis calls"
    );
    assert!((admitted as f64) <= bound, "{admitted} admitted, bound {bound:.0}");
    assert!((admitted as f64) >= exact * 0.5, "{admitted} admitted: leased cells were wasted");
    assert!(calls * 5 < requests, "{calls} Redis calls for {requests} requests");
}

/// The gateway in leased mode, two replicas (one another process): one budget between them,
/// and the mode shown by `GET /api/v1/rate-limits`.
#[tokio::test]
async fn two_leased_gateways_share_one_budget() {
    let gw = setup().await;
    let prefix = redis_prefix();
    let env = [
        ("ACCESS_REDIS_URL", REDIS_URL),
        ("ACCESS_REDIS__PREFIX", prefix.as_str()),
        ("ACCESS_GATEWAY__RATE_LIMIT_MODE", "leased"),
        ("ACCESS_GATEWAY__RATE_LIMIT_LEASE__SHARE", "0.5"),
        ("ACCESS_GATEWAY__RATE_LIMIT_LEASE__MAX_AGE", "1m"),
    ];
    let a = gateway(&gw, "", &env).await;
    let mut spawn_env = vec![
        ("ACCESS_AUTH__DEV_KEY_FILE", gw.keys.path.as_str()),
        ("ACCESS_GATEWAY__ROUTES_FILE", gw.routes.as_str()),
    ];
    spawn_env.extend_from_slice(&env);
    let b = crate::support::spawn_binary("gateway", &spawn_env);
    wait_ready(&b.url).await;
    // `/outage`: 3 per minute; a lease is half the burst, rounded up: 2 cells.
    let mut allowed = 0;
    for i in 0..8 {
        let url = if i % 2 == 0 { a.url("/outage") } else { format!("{}/outage", b.url) };
        if http().get(url).send().await.unwrap().status() == 200 {
            allowed += 1;
        }
    }
    assert_eq!(allowed, 3, "one budget across both replicas, leased");
    let admin = gw.keys.token("root", "t0", &["admin"]);
    let r = http().get(a.url("/api/v1/rate-limits")).bearer_auth(&admin).send().await.unwrap();
    let stats: Value = r.json().await.unwrap();
    assert_eq!(stats["mode"], "leased", "{stats}");
    assert_eq!(stats["lease"]["share"], 0.5, "{stats}");
    assert!(stats["redis_calls"].as_u64().unwrap() < 4, "{stats}");
}

/// Leased mode still reads the cache entry in the script: with the lease (first check) and
/// when held cells decide (later checks, a script call with the read alone, batched with the
/// other requests'), so a leased hit costs no GET of its own.
#[tokio::test]
async fn leased_checks_read_the_cache_entry_in_the_script_too() {
    use access::ratelimit::{CacheRead, Lease, Limiter, OnStoreError, Policy};
    use fred::prelude::KeysInterface;
    let guarded = redis_client(REDIS_URL, None).await;
    let client = guarded.client.clone();
    let prefix = format!("it:{}:", uuid::Uuid::new_v4().simple());
    let policy = Policy { rate: 1, period: Duration::from_secs(3600), burst: 10 };
    let lease = Lease { share: 1.0, max_age: Duration::from_secs(60) };
    let limiter = Limiter::new(
        [("p".to_string(), policy)].into(),
        Some((guarded, prefix.clone())),
        OnStoreError::Closed,
        false,
    )
    .leased(lease);
    let entry = format!("{prefix}cache:r:1");
    let _: () = client.set(&entry, "{\"stored\":1}", None, None, false).await.unwrap();
    let names = ["p".to_string()];
    let hit = CacheRead::Hit(bytes::Bytes::from_static(b"{\"stored\":1}"));
    // Leases of 1 then 2: the third check is decided by a held cell.
    for i in 0..3 {
        let answer = limiter.check(&names, "u", Some(entry.clone())).await;
        assert!(answer.outcome.allowed, "check {i}");
        assert_eq!(answer.cached, hit, "check {i}");
    }
    assert_eq!(limiter.script_calls(), Some(3), "two leases and one read alone");
    let absent = limiter.check(&names, "u", Some(format!("{prefix}cache:r:absent"))).await;
    assert_eq!(absent.cached, CacheRead::Miss, "an absent entry is read as none");
    let _: i64 = client.del(vec![entry]).await.unwrap();
}
