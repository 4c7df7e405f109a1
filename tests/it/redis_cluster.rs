//! Redis Cluster: six private `redis-server` nodes (three primaries, three replicas, Debian's
//! `redis-server` with `--cluster-enabled yes`, joined by `redis-cli --cluster create`), the
//! layer given one node's address (`redis-cluster://`). Limits stay exact across two gateways
//! whatever slots the subjects hash to, cache entries stay per tenant, revocations and rules
//! versions reach every role over cluster-wide pub/sub, and a primary killed under load loses
//! neither the limit state nor a revocation that had been replicated.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use access::role::Role;
use serde_json::{json, Value};

use crate::redis_ha::RedisNode;
use crate::support::{
    config_with_file, eventually, http, redis_prefix, spawn_binary, start, wait_ready, DevKeys,
    Process, Running,
};

/// How every cluster node runs (node timeout 1 s); its nodes.conf in its own directory.
const CLUSTER_NODE: &[&str] = &[
    "--cluster-enabled",
    "yes",
    "--cluster-config-file",
    "nodes.conf",
    "--cluster-node-timeout",
    "1000",
];

/// Six cluster nodes, killed when dropped. Node timeout 1 s, so a replica takes over a killed
/// primary within a few seconds.
pub struct PrivateCluster {
    pub nodes: Vec<RedisNode>,
    /// `redis-cluster://<first node>?node=<second node>`.
    pub url: String,
}

impl PrivateCluster {
    pub async fn start() -> PrivateCluster {
        let mut nodes = Vec::new();
        for _ in 0..6 {
            // The node's own temporary directory is its working directory: nodes.conf goes there.
            let node = RedisNode::start(CLUSTER_NODE).await;
            nodes.push(node);
        }
        let addrs: Vec<String> = nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        let out = std::process::Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .expect("redis-cli is installed");
        assert!(out.status.success(), "cluster create: {}", String::from_utf8_lossy(&out.stdout));
        let cluster = PrivateCluster {
            url: format!("redis-cluster://{}?node={}", addrs[0], addrs[1]),
            nodes,
        };
        cluster.wait_ok().await;
        // Every replica in sync with its primary before anything is written.
        cluster.wait_replicated().await;
        cluster
    }

    /// Waits until every live primary has a replica that acknowledges its writes (`WAIT`: a
    /// replica just synchronised is sent the command stream only after its first
    /// acknowledgement, up to a second later).
    pub async fn wait_replicated(&self) {
        self.wait_ok().await;
        eventually(Duration::from_secs(30), "every primary's replica acknowledges", || async {
            let asker = self.live().next()?;
            let primaries = self.primaries(asker);
            self.live()
                .filter(|n| n.cli(&["role"]).starts_with("master"))
                .all(|n| {
                    let Some((_, ranges)) = primaries.iter().find(|(port, _)| *port == n.port)
                    else {
                        return false;
                    };
                    // A key of one of this primary's slots: a write it takes itself.
                    let key = (0..)
                        .map(|i| format!("probe:{i}"))
                        .find(|k| {
                            let slot = fred::util::redis_keyslot(k.as_bytes());
                            ranges.iter().any(|(a, b)| (*a..=*b).contains(&slot))
                        })
                        .unwrap();
                    n.replica_acknowledges_write_to(&key)
                })
                .then_some(())
        })
        .await;
    }

    /// Waits until every live node says `cluster_state:ok` and agrees on three primaries, all
    /// of them live (right after a kill, the nodes still count the dead one until they notice).
    pub async fn wait_ok(&self) {
        eventually(Duration::from_secs(30), "cluster_state:ok on every live node", || async {
            let live: Vec<u16> = self.live().map(|n| n.port).collect();
            self.live()
                .all(|n| {
                    let primaries = self.primaries(n);
                    n.cli(&["cluster", "info"]).contains("cluster_state:ok")
                        && primaries.len() == 3
                        && primaries.iter().all(|(port, _)| live.contains(port))
                })
                .then_some(())
        })
        .await;
    }

    fn live(&self) -> impl Iterator<Item = &RedisNode> {
        self.nodes.iter().filter(|n| n.cli(&["ping"]) == "PONG")
    }

    /// The live primaries `asker` knows: `(port, slot ranges)`.
    fn primaries(&self, asker: &RedisNode) -> Vec<(u16, Vec<(u16, u16)>)> {
        asker
            .cli(&["cluster", "nodes"])
            .lines()
            .filter_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                let flags = fields.get(2)?;
                if !flags.contains("master") || flags.contains("fail") {
                    return None;
                }
                let port = fields[1].split('@').next()?.rsplit(':').next()?.parse().ok()?;
                let ranges = fields[8..]
                    .iter()
                    .filter(|s| !s.starts_with('['))
                    .filter_map(|s| match s.split_once('-') {
                        Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                        None => s.parse().ok().map(|a| (a, a)),
                    })
                    .collect();
                Some((port, ranges))
            })
            .filter(|(_, ranges): &(u16, Vec<(u16, u16)>)| !ranges.is_empty())
            .collect()
    }

    /// The index in `nodes` of a replica of the primary `primary`.
    pub fn replica_of(&self, primary: usize) -> usize {
        let port = format!("master_port:{}", self.nodes[primary].port);
        self.nodes
            .iter()
            .position(|n| {
                let info = n.cli(&["info", "replication"]);
                info.contains("role:slave") && info.lines().any(|l| l.trim() == port)
            })
            .expect("every primary has a replica")
    }

    /// The index in `nodes` of the primary that holds `key`'s slot.
    pub fn primary_of(&self, key: &str) -> usize {
        let asker = self.live().next().expect("a live node");
        let slot: u16 = asker.cli(&["cluster", "keyslot", key]).parse().unwrap();
        let port = self
            .primaries(asker)
            .into_iter()
            .find(|(_, ranges)| ranges.iter().any(|(a, b)| (*a..=*b).contains(&slot)))
            .map(|(port, _)| port)
            .expect("a primary holds every slot");
        self.nodes.iter().position(|n| n.port == port).unwrap()
    }
}

const ROUTES: &str = r#"
routes:
  - { name: limited, path: /limited, upstreams: ["UP"], auth: required, rate_limits: [tight, wide] }
  - { name: open, path: /open, upstreams: ["UP"], auth: required, rate_limits: [wide] }
  - { name: cached, path: "/api/c/{n}", upstreams: ["UP"], strip_prefix: /api, cache: {}, entitlement: { resource: data } }
  - { name: prices, path: "/api/p/{id}", upstreams: ["UP"], strip_prefix: /api, entitlement: { resource: "instrument:{id}" } }
rate_limits:
  tight: { rate: 1, period: 10m, burst: 3 }
  wide: { rate: 100000, period: 1s, burst: 100000 }
"#;

const SEED: &str = r#"
- { name: traders, effect: allow, resource: "*", actions: [read], roles: [trader], priority: 10 }
- { name: admins, effect: allow, resource: "*", actions: ["*"], roles: [admin], priority: 900 }
"#;

/// An upstream answering every path with `max-age=60`, the tenant it was called for, and its
/// hit count.
async fn upstream(hits: Arc<AtomicUsize>) -> String {
    let app = axum::Router::new().route(
        "/{*rest}",
        axum::routing::get(move |headers: axum::http::HeaderMap| {
            let n = hits.fetch_add(1, Ordering::SeqCst) + 1;
            let tenant =
                headers.get("x-tenant-id").and_then(|v| v.to_str().ok()).unwrap_or("-").to_string();
            async move {
                (
                    [("cache-control", "max-age=60")],
                    format!("{{\"hit\":{n},\"tenant\":\"{tenant}\"}}"),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

/// The layer on a cluster: entitlements, auth, one gateway in this process and one as the built
/// binary (another process).
struct Layer {
    _dir: tempfile::TempDir,
    keys: DevKeys,
    hits: Arc<AtomicUsize>,
    env: Vec<(String, String)>,
    entitlements: Running,
    auth: Running,
    a: Running,
    b: Process,
}

impl Layer {
    async fn start(cluster: &PrivateCluster) -> Layer {
        Self::start_on(&cluster.url, &[]).await
    }

    /// The layer on the Redis at `url`, with `extra` settings for every role.
    async fn start_on(url: &str, extra: &[(&str, &str)]) -> Layer {
        let dir = tempfile::tempdir().unwrap();
        let keys = DevKeys::new();
        let hits = Arc::new(AtomicUsize::new(0));
        let routes = dir.path().join("routes.yaml");
        std::fs::write(&routes, ROUTES.replace("UP", &upstream(hits.clone()).await)).unwrap();
        let seed = dir.path().join("seed.yaml");
        std::fs::write(&seed, SEED).unwrap();
        let mut env: Vec<(String, String)> = [
            ("ACCESS_AUTH__DEV_KEY_FILE", keys.path.clone()),
            ("ACCESS_REDIS_URL", url.to_string()),
            ("ACCESS_REDIS__PREFIX", redis_prefix()),
            ("ACCESS_ENTITLEMENTS__SEED_FILE", seed.display().to_string()),
        ]
        .map(|(k, v)| (k.to_string(), v))
        .to_vec();
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let entitlements = start(Role::Entitlements, config_with_file("", &as_refs(&env))).await;
        wait_ready(&entitlements.url("")).await;
        let auth = start(Role::Auth, config_with_file("", &as_refs(&env))).await;
        wait_ready(&auth.url("")).await;
        env.extend(
            [
                ("ACCESS_GATEWAY__ROUTES_FILE", routes.display().to_string()),
                ("ACCESS_ENTITLEMENTS_SERVICE_URL", entitlements.url("")),
                // Rules are refreshed only on an announced version (no periodic refresh in time).
                ("ACCESS_GATEWAY__DECISION_CACHE_TTL", "10m".to_string()),
                // Without Redis no request passes: every decision below is the cluster's.
                ("ACCESS_GATEWAY__RATE_LIMIT_ON_STORE_ERROR", "closed".to_string()),
                // Load loops as fast as the answers come (503s during a failover come at once):
                // the per-address limit, 1000/s by default, is not what is measured.
                ("ACCESS_GATEWAY__IP_LIMIT__RATE", "1000000".to_string()),
                ("ACCESS_GATEWAY__IP_LIMIT__PERIOD", "1s".to_string()),
                ("ACCESS_GATEWAY__IP_LIMIT__BURST", "1000000".to_string()),
            ]
            .map(|(k, v)| (k.to_string(), v)),
        );
        let a = start(Role::Gateway, config_with_file("", &as_refs(&env))).await;
        wait_ready(&a.url("")).await;
        let b = spawn_binary("gateway", &as_refs(&env));
        wait_ready(&b.url).await;
        Layer { _dir: dir, keys, hits, env, entitlements, auth, a, b }
    }

    fn urls(&self) -> [String; 2] {
        [self.a.url(""), self.b.url.clone()]
    }

    async fn fresh_gateway(&self) -> Running {
        let g = start(Role::Gateway, config_with_file("", &as_refs(&self.env))).await;
        wait_ready(&g.url("")).await;
        g
    }
}

fn as_refs(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

async fn status(base: &str, path: &str, token: &str) -> u16 {
    status_on(&http(), base, path, token).await
}

/// As [`status`], with `client` (concurrent requests share one: building a client costs
/// milliseconds of CPU, which a burst of them would spend inside the requests' timeouts).
async fn status_on(client: &reqwest::Client, base: &str, path: &str, token: &str) -> u16 {
    let r = client.get(format!("{base}{path}")).bearer_auth(token);
    match r.timeout(Duration::from_secs(5)).send().await {
        Ok(r) => r.status().as_u16(),
        Err(e) => {
            eprintln!("{base}{path}: {e:?}");
            0
        }
    }
}

async fn cached(base: &str, path: &str, token: &str) -> (String, String) {
    let r = http().get(format!("{base}{path}")).bearer_auth(token).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let x = r.headers().get("x-cache").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
    (x, r.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_keeps_limits_exact_caches_apart_and_carries_revocations_and_rules() {
    let cluster = PrivateCluster::start().await;
    let l = Layer::start(&cluster).await;
    let [a, b] = l.urls();

    // Exact limits: twelve subjects (spread over the three primaries' slots), six concurrent
    // requests each, alternating between the two gateways: exactly the burst of 3 each.
    let subjects: Vec<String> = (0..12).map(|i| format!("user{i}")).collect();
    let primaries: std::collections::HashSet<usize> =
        subjects.iter().map(|s| cluster.primary_of(&format!("x:rl:{{{s}}}:tight"))).collect();
    assert_eq!(primaries.len(), 3, "the subjects' keys live on every primary");
    let tokens: Vec<String> = subjects.iter().map(|s| l.keys.token(s, "t1", &["trader"])).collect();
    let requests = tokens.iter().enumerate().flat_map(|(i, token)| {
        (0..6).map(move |j| (i, if j % 2 == 0 { 0 } else { 1 }, token.clone()))
    });
    let client = http();
    let answers = futures::future::join_all(requests.map(|(i, g, token)| {
        let (base, client) = ([&a, &b][g].clone(), client.clone());
        async move { (i, status_on(&client, &base, "/limited", &token).await) }
    }))
    .await;
    for (i, subject) in subjects.iter().enumerate() {
        let mine: Vec<u16> = answers.iter().filter(|(s, _)| *s == i).map(|(_, c)| *c).collect();
        assert_eq!(mine.iter().filter(|c| **c == 200).count(), 3, "{subject}: {mine:?}");
        assert_eq!(mine.iter().filter(|c| **c == 429).count(), 3, "{subject}: {mine:?}");
    }

    // Cache: an entry is served to its tenant from both gateways (the read is its own GET when
    // its key is in another slot than the subject's limits), never to another tenant.
    let (t1, t1b, t2) = (
        l.keys.token("alice", "t1", &["trader"]),
        l.keys.token("bob", "t1", &["trader"]),
        l.keys.token("carol", "t2", &["trader"]),
    );
    let (x, first) = cached(&a, "/api/c/1", &t1).await;
    assert_eq!(x, "MISS");
    assert!(first.contains("\"tenant\":\"t1\""), "{first}");
    assert_eq!(cached(&a, "/api/c/1", &t1).await, ("HIT".to_string(), first.clone()));
    assert_eq!(cached(&b, "/api/c/1", &t1b).await, ("HIT".to_string(), first.clone()));
    let (x, other) = cached(&b, "/api/c/1", &t2).await;
    assert_eq!(x, "MISS", "another tenant never gets t1's entry");
    assert!(other.contains("\"tenant\":\"t2\""), "{other}");
    assert_eq!(cached(&a, "/api/c/1", &t2).await, ("HIT".to_string(), other));
    let upstream_hits = l.hits.load(Ordering::SeqCst);
    // A purge scans every primary.
    let admin = l.keys.token("root", "t0", &["admin"]);
    let r = http()
        .post(format!("{a}/api/v1/cache/purge"))
        .bearer_auth(&admin)
        .json(&json!({"route": "cached"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let purged: Value = r.json().await.unwrap();
    assert_eq!(purged["purged"].as_u64(), Some(2), "{purged}");
    assert_eq!(cached(&b, "/api/c/1", &t1).await.0, "MISS");
    assert_eq!(l.hits.load(Ordering::SeqCst), upstream_hits + 1);

    // Revocations through the auth role reach both gateways: a token, then a user.
    let (dave, erin) =
        (l.keys.token("dave", "t1", &["trader"]), l.keys.token("erin", "t1", &["trader"]));
    for base in [&a, &b] {
        assert_eq!(status(base, "/open", &dave).await, 200);
        assert_eq!(status(base, "/open", &erin).await, 200);
    }
    let r = http().post(l.auth.url("/auth/logout")).bearer_auth(&dave).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = http().post(l.auth.url("/auth/users/erin/revoke")).bearer_auth(&admin).send();
    assert_eq!(r.await.unwrap().status(), 200);
    for base in [&a, &b] {
        eventually(Duration::from_secs(5), "the revocations reach the gateway", || async {
            (status(base, "/open", &dave).await == 401 && status(base, "/open", &erin).await == 401)
                .then_some(())
        })
        .await;
    }
    let fresh = l.fresh_gateway().await;
    assert_eq!(status(&fresh.url(""), "/open", &dave).await, 401, "read from the cluster");
    assert_eq!(status(&fresh.url(""), "/open", &erin).await, 401);

    // A rules change reaches both gateways' mirrors and decision caches over the cluster's
    // pub/sub (the periodic refresh is ten minutes away).
    let before = rules_version(&a, &t1).await;
    for base in [&a, &b] {
        assert_eq!(status(base, "/api/p/EURUSD", &t1).await, 200);
    }
    let r = http()
        .post(l.entitlements.url("/entitlements/rules"))
        .bearer_auth(&admin)
        .json(&json!({"name": "freeze-eurusd", "effect": "deny", "resource": "instrument:EURUSD", "actions": ["*"], "priority": 500}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    for base in [&a, &b] {
        eventually(
            Duration::from_secs(5),
            "the gateway refuses after the rules change",
            || async { (status(base, "/api/p/EURUSD", &t1).await == 403).then_some(()) },
        )
        .await;
        assert!(rules_version(base, &t1).await > before);
    }
}

async fn rules_version(base: &str, token: &str) -> i64 {
    let r = http().get(format!("{base}/entitlements/version")).bearer_auth(token).send().await;
    let v: Value = r.unwrap().json().await.unwrap();
    v["rules_version"].as_i64().unwrap_or_else(|| panic!("{v}"))
}

/// A revocation is answered 200 only once a replica of its key's primary has it (`WAIT` on that
/// primary): with the replica stopped, the admin's revoke answers 503 within
/// `redis.revocation_wait` (the revocation is in force, but a failover could lose it); with the
/// replica running again it answers 200, and the primary killed right after that answer loses
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_is_answered_only_once_a_replica_has_it() {
    let mut cluster = PrivateCluster::start().await;
    let l = Layer::start(&cluster).await;
    let a = l.a.url("");
    let prefix = l.env.iter().find(|(k, _)| k == "ACCESS_REDIS__PREFIX").unwrap().1.clone();
    let admin = l.keys.token("root", "t0", &["admin"]);
    let erin = l.keys.token("erin", "t1", &["trader"]);
    let primary = cluster.primary_of(&format!("{prefix}revoked:user:erin"));
    let replica = cluster.replica_of(primary);
    assert_eq!(status(&a, "/open", &erin).await, 200);

    cluster.nodes[replica].pause();
    let revoke = || async {
        let r = http().post(l.auth.url("/auth/users/erin/revoke")).bearer_auth(&admin);
        let r = r.send().await.unwrap();
        (r.status().as_u16(), r.json::<Value>().await.unwrap_or(Value::Null))
    };
    let started = Instant::now();
    let (code, body) = revoke().await;
    let waited = started.elapsed();
    assert_eq!(code, 503, "not acknowledged by a replica: {body}");
    assert_eq!(body["code"], "dependency_unavailable", "{body}");
    assert_eq!(body["reason"], "not_replicated", "{body}");
    assert!(body["message"].as_str().unwrap().contains("the revocation is in force"), "{body}");
    assert!(
        waited < Duration::from_secs(2),
        "answered after the wait, not the timeout: {waited:?}"
    );
    eventually(Duration::from_secs(5), "in force on the primary meanwhile", || async {
        (status(&a, "/open", &erin).await == 401).then_some(())
    })
    .await;

    cluster.nodes[replica].resume();
    let (code, body) = revoke().await;
    assert_eq!(code, 200, "acknowledged once the replica runs: {body}");
    // Killed at once: no replication lag left to lose.
    let key = format!("{prefix}revoked:user:erin");
    let stored = cluster.nodes[primary].cli(&["get", &key]);
    cluster.nodes[primary].kill();
    cluster.wait_ok().await;
    let promoted = cluster.primary_of(&key);
    assert_eq!(promoted, replica, "the replica took over");
    assert_eq!(cluster.nodes[promoted].cli(&["get", &key]), stored, "it has the revocation");
    // A gateway started now (nothing cached) reads it from the promoted replica.
    let fresh = l.fresh_gateway().await;
    let after = eventually(Duration::from_secs(20), "the fresh gateway reads Redis", || async {
        let s = status(&fresh.url(""), "/open", &erin).await;
        (s != 503 && s != 0).then_some(s)
    })
    .await;
    assert_eq!(after, 401, "the acknowledged revocation survived the failover");
}

/// The primary holding alice's limits is killed (SIGKILL) under load; its replica takes over.
/// Alice's spent burst stays spent and carol's revocation (made before, replicated) still
/// refuses her token; a revocation made after the failover reaches the gateway too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_killed_under_load_loses_no_limit_state_nor_revocation() {
    let mut cluster = PrivateCluster::start().await;
    let l = Layer::start(&cluster).await;
    let a = l.a.url("");
    let prefix = l.env.iter().find(|(k, _)| k == "ACCESS_REDIS__PREFIX").unwrap().1.clone();
    let [alice, bob, carol, dave] =
        ["alice", "bob", "carol", "dave"].map(|u| l.keys.token(u, "t1", &["trader"]));

    for _ in 0..3 {
        assert_eq!(status(&a, "/limited", &alice).await, 200);
    }
    assert_eq!(status(&a, "/limited", &alice).await, 429);
    assert_eq!(status(&a, "/open", &carol).await, 200);
    let r = http().post(l.auth.url("/auth/logout")).bearer_auth(&carol).send().await.unwrap();
    assert_eq!(r.status(), 200);
    eventually(Duration::from_secs(5), "carol's revocation reaches the gateway", || async {
        (status(&a, "/open", &carol).await == 401).then_some(())
    })
    .await;
    // The bound: writes not yet replicated may be lost with a killed primary. Wait until the
    // replicas have acknowledged everything so far (WAIT on the primary), as the documented
    // bound assumes a kill later than the replication lag.
    let victim = cluster.primary_of(&format!("{prefix}rl:{{alice}}:tight"));
    cluster.wait_replicated().await;

    // Load: bob, without pause, through the failover.
    let stop = Arc::new(AtomicBool::new(false));
    let seen: Arc<Mutex<Vec<u16>>> = Arc::default();
    let load = {
        let (stop, seen, a, bob) = (stop.clone(), seen.clone(), a.clone(), bob.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let s = status(&a, "/open", &bob).await;
                seen.lock().unwrap().push(s);
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let killed = Instant::now();
    cluster.nodes[victim].kill();
    cluster.wait_ok().await;
    eventually(Duration::from_secs(20), "the gateway decides limits again", || async {
        (status(&a, "/open", &bob).await == 200).then_some(())
    })
    .await;
    let healed = killed.elapsed();

    let alice_now = eventually(Duration::from_secs(10), "alice is answered by Redis", || async {
        let s = status(&a, "/limited", &alice).await;
        (s != 503 && s != 0).then_some(s)
    })
    .await;
    assert_eq!(alice_now, 429, "the limit state survived the failover");
    assert_eq!(status(&a, "/open", &carol).await, 401);
    assert_eq!(status(&a, "/open", &dave).await, 200);
    // The killed node's pod restarts: it rejoins as the new primary's replica, and every
    // primary has one again (a revocation is answered once a replica has it).
    cluster.nodes[victim].restart(CLUSTER_NODE).await;
    cluster.wait_replicated().await;
    let r = http().post(l.auth.url("/auth/logout")).bearer_auth(&dave).send().await.unwrap();
    assert_eq!(r.status(), 200, "the auth role writes after the failover");
    eventually(Duration::from_secs(10), "dave's revocation reaches the gateway", || async {
        (status(&a, "/open", &dave).await == 401).then_some(())
    })
    .await;
    // A gateway started now (nothing cached) reads both from the promoted replicas.
    let fresh = l.fresh_gateway().await;
    assert_eq!(status(&fresh.url(""), "/limited", &alice).await, 429);
    assert_eq!(status(&fresh.url(""), "/open", &carol).await, 401);
    assert_eq!(status(&fresh.url(""), "/open", &dave).await, 401);

    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    let seen = seen.lock().unwrap();
    let failed: Vec<u16> = seen.iter().copied().filter(|s| *s != 200).collect();
    assert!(seen.len() > 20, "load ran: {} requests", seen.len());
    assert!(
        failed.iter().all(|s| *s == 503 || *s == 0),
        "requests refused during the failover: {failed:?}"
    );
    eprintln!(
        "cluster failover (primary killed): healed within {healed:?}; {} of {} requests refused meanwhile",
        failed.len(),
        seen.len()
    );
}

/// The SSE relay over a cluster: a subscription change sent to the stream replica that does not
/// hold the stream reaches the one that does (a request on `sse-control`, the answer on the
/// asking replica's reply channel: cluster-wide pub/sub both ways), and the stream gets the new
/// topic's records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sse_relay_carries_subscription_changes_between_replicas_over_a_cluster() {
    use crate::sse::SseClient;
    let cluster = PrivateCluster::start().await;
    let news = format!("news-{}", uuid::Uuid::new_v4().simple());
    let extra = format!("[[stream.topics]]\nname = \"{news}\"\nresource = \"market_data\"\n");
    let l = crate::stream::layer_on(&cluster.url, None, &extra, &[]).await;
    let other = start(Role::Stream, l.stream_config.clone()).await;
    wait_ready(&other.url("")).await;
    let alice = l.keys.token("alice", "t1", &["trader"]);
    let mut sse = SseClient::open(crate::sse::sse_url(&l, &alice, &[&l.prices]), None).await;
    let hello = sse.next().await;
    assert_eq!(hello.event, "connection_established");
    let conn_id = hello.data["connection_id"].as_str().unwrap().to_string();
    let r = http()
        .post(other.url("/sse/subscribe"))
        .bearer_auth(&alice)
        .json(&json!({"connection_id": conn_id, "topics": [news]}))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let body: Value = r.json().await.unwrap();
    assert_eq!((status, &body["topics"]), (200, &json!([news])), "{body}");
    l.publish(&news, "N1", json!({"headline": "over the cluster"})).await;
    let next = sse.next().await;
    assert_eq!(next.data["topic"], news, "{next:?}");
}

/// Three private nodes speaking only TLS (clients, the cluster bus and replication), their
/// certificate signed by the test CA of [`crate::upstream_tls::Certs`] for `localhost` and
/// `127.0.0.1` (the address the nodes announce); killed when dropped.
struct TlsCluster {
    nodes: Vec<std::process::Child>,
    ports: Vec<u16>,
    _dir: tempfile::TempDir,
    /// Kept for the files' lifetime.
    _certs: crate::upstream_tls::Certs,
    /// The CA bundle that signed the nodes' certificate.
    ca: String,
}

impl TlsCluster {
    async fn start() -> TlsCluster {
        let dir = tempfile::tempdir().unwrap();
        let certs = crate::upstream_tls::Certs::new();
        certs.leaf(
            "node",
            "ca",
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth",
        );
        let (cert, key, ca) =
            (certs.path("node.crt"), certs.path("node.key"), certs.path("ca.crt"));
        let (mut nodes, mut ports) = (Vec::new(), Vec::new());
        for i in 0..3 {
            let port = crate::support::closed_port().await;
            let node_dir = dir.path().join(format!("n{i}"));
            std::fs::create_dir(&node_dir).unwrap();
            let child = std::process::Command::new("redis-server")
                .current_dir(&node_dir)
                .args(["--port", "0", "--tls-port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no", "--tls-auth-clients", "no"])
                .args(["--tls-cluster", "yes", "--tls-replication", "yes"])
                .args(CLUSTER_NODE)
                .args(["--tls-cert-file", &cert, "--tls-key-file", &key, "--tls-ca-cert-file", &ca])
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("redis-server is installed");
            nodes.push(child);
            ports.push(port);
        }
        let cluster = TlsCluster { nodes, ports, _dir: dir, _certs: certs, ca };
        for &port in &cluster.ports {
            eventually(Duration::from_secs(5), "a TLS node listens", || async {
                tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()
            })
            .await;
        }
        let addrs: Vec<String> = cluster.ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let out = std::process::Command::new("redis-cli")
            .args(["--tls", "--cacert", &cluster.ca, "--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .unwrap();
        assert!(out.status.success(), "cluster create: {}", String::from_utf8_lossy(&out.stdout));
        eventually(Duration::from_secs(30), "cluster_state:ok on every TLS node", || async {
            cluster
                .ports
                .iter()
                .all(|p| {
                    let out = std::process::Command::new("redis-cli")
                        .args(["--tls", "--cacert", &cluster.ca, "-p", &p.to_string()])
                        .args(["cluster", "info"])
                        .output()
                        .unwrap();
                    String::from_utf8_lossy(&out.stdout).contains("cluster_state:ok")
                })
                .then_some(())
        })
        .await;
        cluster
    }
}

impl Drop for TlsCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            let _ = node.kill();
            let _ = node.wait();
        }
    }
}

/// A Redis Cluster over TLS (`rediss-cluster://`, as ElastiCache and Memorystore run with
/// in-transit encryption), its CA given by `redis.ca_file`: two gateways keep one exact limit,
/// and a revocation reaches them over the cluster's pub/sub. Three primaries without replicas, so
/// revocations are answered once the primary has them (`redis.revocation_replicas = 0`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_cluster_keeps_limits_exact_and_carries_revocations() {
    let cluster = TlsCluster::start().await;
    let url = format!(
        "rediss-cluster://localhost:{}?node=localhost:{}",
        cluster.ports[0], cluster.ports[1]
    );
    let extra = [
        ("ACCESS_REDIS__CA_FILE", cluster.ca.as_str()),
        ("ACCESS_REDIS__REVOCATION_REPLICAS", "0"),
    ];
    let l = Layer::start_on(&url, &extra).await;
    let [alice, carol] = ["alice", "carol"].map(|u| l.keys.token(u, "t1", &["trader"]));
    let mut statuses = Vec::new();
    for i in 0..5 {
        statuses.push(status(&l.urls()[i % 2], "/limited", &alice).await);
    }
    assert_eq!(statuses, [200, 200, 200, 429, 429], "one burst of 3 across both gateways");
    for base in l.urls() {
        assert_eq!(status(&base, "/open", &carol).await, 200);
    }
    let r = http().post(l.auth.url("/auth/logout")).bearer_auth(&carol).send().await.unwrap();
    assert_eq!(r.status(), 200);
    for base in l.urls() {
        eventually(Duration::from_secs(5), "carol's revocation reaches the gateway", || async {
            (status(&base, "/open", &carol).await == 401).then_some(())
        })
        .await;
    }
}

/// The local ports of `pid`'s TCP connections (its sockets, found by inode in
/// `/proc/<pid>/net/tcp`).
fn local_ports(pid: u32) -> Vec<u16> {
    let inodes: std::collections::HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter_map(|target| {
            let t = target.display().to_string();
            Some(t.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
        })
        .collect();
    std::fs::read_to_string(format!("/proc/{pid}/net/tcp"))
        .unwrap()
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local = fields.get(1)?;
            let inode = fields.get(9)?;
            inodes.contains(*inode).then(|| {
                let port = local.rsplit(':').next().unwrap();
                u16::from_str_radix(port, 16).unwrap()
            })
        })
        .collect()
}

/// The node holding a process's pub/sub connection is killed: the gateway (the built binary, so
/// its connections can be told apart) subscribes again elsewhere, and a revocation made after
/// the failover still drops the verification it had cached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_whose_subscriber_node_dies_still_hears_revocations() {
    let mut cluster = PrivateCluster::start().await;
    // The revocation below must be answered while a primary has no replica left.
    let l = Layer::start_on(&cluster.url, &[("ACCESS_REDIS__REVOCATION_REPLICAS", "0")]).await;
    let carol = l.keys.token("carol", "t1", &["trader"]);
    let b = l.b.url.clone();
    assert_eq!(status(&b, "/open", &carol).await, 200, "verified and cached");
    // The node where gateway b's subscriber connection is (flags P in CLIENT LIST).
    let ports = local_ports(l.b.child.id());
    let holder = cluster
        .nodes
        .iter()
        .position(|n| {
            n.cli(&["client", "list"]).lines().any(|c| {
                let flags_p =
                    c.split_whitespace().any(|f| f.starts_with("flags=") && f.contains('P'));
                let port = c
                    .split_whitespace()
                    .find_map(|f| f.strip_prefix("addr=127.0.0.1:"))
                    .and_then(|p| p.parse::<u16>().ok());
                flags_p && port.is_some_and(|p| ports.contains(&p))
            })
        })
        .expect("gateway b has a subscriber connection on some node");
    let role = cluster.nodes[holder].cli(&["role"]);
    cluster.nodes[holder].kill();
    cluster.wait_ok().await;
    // Whatever the gateway dropped on the reconnection, carol is verified and cached again.
    eventually(Duration::from_secs(20), "the gateway answers carol again", || async {
        (status(&b, "/open", &carol).await == 200).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let r = http().post(l.auth.url("/auth/logout")).bearer_auth(&carol).send().await.unwrap();
    assert_eq!(r.status(), 200);
    eventually(Duration::from_secs(10), "carol's revocation reaches gateway b", || async {
        (status(&b, "/open", &carol).await == 401).then_some(())
    })
    .await;
    eprintln!(
        "gateway b's subscriber was on a {} node, killed",
        role.lines().next().unwrap_or("?")
    );
}
