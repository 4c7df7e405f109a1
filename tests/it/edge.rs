//! The edge against hostile clients (issue: one canonical path, no cross-tenant denial of
//! service): every spelling of a path, header twins, client body faults, slow and idle sockets,
//! per-client shares. Raw TCP wherever a client library would normalise what the attacker sends;
//! real upstreams that record exactly what reached them; the real entitlements role.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use access::role::Role;
use axum::extract::Request;
use axum::routing::any;
use axum::Router;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::support::{config, eventually, http, start, wait_ready, DevKeys, Running};

/// What an upstream received: method, raw path and query, headers, body length.
#[derive(Clone, Debug)]
struct Seen {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
    body: usize,
}

/// A real upstream recording every request; `/slow/...` answers after 1.5 s.
async fn recording_upstream() -> (String, Arc<Mutex<Vec<Seen>>>) {
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let log = seen.clone();
    let app = Router::new().fallback(any(move |req: Request| {
        let log = log.clone();
        async move {
            let (parts, body) = req.into_parts();
            let body = axum::body::to_bytes(body, usize::MAX).await.map(|b| b.len()).unwrap_or(0);
            let headers = parts
                .headers
                .iter()
                .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("?").to_string()))
                .collect();
            let target = parts.uri.path_and_query().map(|p| p.to_string()).unwrap_or_default();
            let slow = target.starts_with("/slow");
            log.lock().unwrap().push(Seen {
                method: parts.method.to_string(),
                target: target.clone(),
                headers,
                body,
            });
            if slow {
                tokio::time::sleep(Duration::from_millis(1500)).await;
            }
            axum::Json(json!({"target": target}))
        }
    }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, seen)
}

const SEED: &str = r#"
- { name: traders, effect: allow, resource: "instrument:*", actions: [read, write], roles: [trader], priority: 10 }
- { name: tina-not-ng, effect: deny, resource: "instrument:NG-H27", actions: [read], user_id: tina, priority: 100 }
"#;

struct Edge {
    _dir: tempfile::TempDir,
    keys: DevKeys,
    gateway: Running,
    _entitlements: Running,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Edge {
    fn targets(&self) -> Vec<String> {
        self.seen.lock().unwrap().iter().map(|s| s.target.clone()).collect()
    }
}

/// The gateway in front of a recording upstream and the entitlements role seeded with `seed`.
async fn edge(seed: &str, extra_routes: &str, env: &[(&str, &str)]) -> Edge {
    let dir = tempfile::tempdir().unwrap();
    let keys = DevKeys::new();
    let seed_file = dir.path().join("seed.yaml");
    std::fs::write(&seed_file, seed).unwrap();
    let seed_file = seed_file.display().to_string();
    let entitlements = start(
        Role::Entitlements,
        config(&[
            ("ACCESS_AUTH__DEV_KEY_FILE", &keys.path),
            ("ACCESS_ENTITLEMENTS__SEED_FILE", &seed_file),
        ]),
    )
    .await;
    wait_ready(&entitlements.url("")).await;
    let (upstream, seen) = recording_upstream().await;
    let routes = format!(
        r#"
- {{ name: prices, path: "/api/v1/prices/latest/{{instrument_id}}", methods: [GET, HEAD], upstreams: ["{upstream}"], strip_prefix: /api/v1, entitlement: {{ resource: "instrument:{{instrument_id}}" }} }}
- {{ name: ticks, path: "/api/v1/ticks/{{instrument_id}}", methods: [GET], upstreams: ["{upstream}"], strip_prefix: /api/v1, entitlement: {{ resource: "instrument:{{instrument_id}}" }}, cache: {{}} }}
- {{ name: instruments, path: "/api/v1/instruments/{{id}}", upstreams: ["{upstream}"], strip_prefix: /api/v1, entitlement: {{ resource: "instrument:{{id}}" }}, retries: 0 }}
- {{ name: orders, path: /api/v1/orders, methods: [POST], upstreams: ["{upstream}"], strip_prefix: /api/v1, auth: none, retries: 0 }}
- {{ name: slow, path: "/api/v1/slow/{{n}}", upstreams: ["{upstream}"], strip_prefix: /api/v1, auth: none }}
- {{ name: slow_auth, path: "/api/v1/slowauth/{{n}}", upstreams: ["{upstream}"], strip_prefix: /api/v1 }}
{extra_routes}"#
    );
    let routes_file = dir.path().join("routes.yaml");
    std::fs::write(&routes_file, routes.replace("{upstream}", &upstream)).unwrap();
    let routes_file = routes_file.display().to_string();
    let ent_url = entitlements.url("");
    let mut pairs = vec![
        ("ACCESS_AUTH__DEV_KEY_FILE", keys.path.as_str()),
        ("ACCESS_GATEWAY__ROUTES_FILE", routes_file.as_str()),
        ("ACCESS_ENTITLEMENTS_SERVICE_URL", ent_url.as_str()),
        ("ACCESS_GATEWAY__BREAKER__CONSECUTIVE_FAILURES", "3"),
        ("ACCESS_GATEWAY__BREAKER__OPEN_FOR", "10s"),
        // These tests send hundreds of requests per identity: rate limits are not what they test.
        ("ACCESS_GATEWAY__RATE_LIMITS__AUTHENTICATED__RATE", "1000000"),
        ("ACCESS_GATEWAY__RATE_LIMITS__AUTHENTICATED__BURST", "1000000"),
        ("ACCESS_GATEWAY__RATE_LIMITS__AUTHENTICATED__PERIOD", "1s"),
    ];
    pairs.extend_from_slice(env);
    let gateway = start(Role::Gateway, config(&pairs)).await;
    wait_ready(&gateway.url("")).await;
    Edge { _dir: dir, keys, gateway, _entitlements: entitlements, seen }
}

/// One raw HTTP/1.1 exchange on a fresh connection: the request is sent byte for byte (no client
/// library normalises it), the answer read to the end. Returns the status and the JSON body.
async fn raw(addr: SocketAddr, request: &[u8]) -> (u16, Value) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut buf)).await;
    parse_response(&buf)
}

fn parse_response(buf: &[u8]) -> (u16, Value) {
    let text = String::from_utf8_lossy(buf);
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

async fn get_raw(addr: SocketAddr, target: &str, token: &str) -> (u16, Value) {
    let request = format!(
        "GET {target} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {token}\r\nconnection: close\r\n\r\n"
    );
    raw(addr, request.as_bytes()).await
}

/// Every spelling of `id`: each character plain or escaped, hex in either case; and escapes of
/// escapes (double encoding).
fn spellings(id: &str, n: usize, seed: &mut u64) -> Vec<String> {
    let mut next = move || {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        *seed
    };
    let mut out = vec![id.to_string()];
    for i in 0..n {
        let mut s = String::new();
        for b in id.bytes() {
            let must = !b.is_ascii_alphanumeric() && !b"-._~:@!$&+,=".contains(&b);
            match if must { 1 + next() % 2 } else { next() % 3 } {
                0 => s.push(b as char),
                1 => s.push_str(&format!("%{b:02X}")),
                _ => s.push_str(&format!("%{b:02x}")),
            }
        }
        if i % 5 == 4 {
            s = s.replace('%', "%25");
        }
        out.push(s);
    }
    out
}

/// An independent percent-decoder (not the layer's), for what an upstream makes of a path.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8(out).unwrap()
}

#[tokio::test]
async fn no_spelling_of_a_denied_instrument_reaches_the_upstream() {
    let e = edge(SEED, "", &[]).await;
    let tina = e.keys.token("tina", "t1", &["trader"]);
    let addr = e.gateway.addr;
    let mut seed = 0x2545_f491_4f6c_dd1d;
    for route in ["/api/v1/prices/latest/", "/api/v1/ticks/", "/api/v1/instruments/"] {
        for spelling in spellings("NG-H27", 40, &mut seed) {
            let (status, body) = get_raw(addr, &format!("{route}{spelling}"), &tina).await;
            assert!(
                status == 403 || (status == 400 && body["reason"] == "invalid_path"),
                "{route}{spelling}: {status} {body}"
            );
        }
        // The same spellings of an instrument she may read reach the upstream as one path.
        for spelling in spellings("NG-J27", 10, &mut seed) {
            let (status, body) = get_raw(addr, &format!("{route}{spelling}"), &tina).await;
            if status == 400 {
                assert_eq!(body["reason"], "invalid_path", "{spelling}");
                assert!(spelling.contains("%25"), "only double encoding is refused: {spelling}");
                continue;
            }
            assert_eq!(status, 200, "{route}{spelling}: {body}");
            assert!(body["target"].as_str().unwrap().ends_with("/NG-J27"), "{body}");
        }
    }
    assert!(
        e.targets().iter().all(|t| !percent_decode(t).contains("NG-H27")),
        "the denied instrument reached the upstream: {:?}",
        e.targets()
    );
}

#[tokio::test]
async fn the_resource_checked_is_the_path_the_upstream_receives() {
    // Property, over generated instrument ids (reserved characters and UTF-8 included) and
    // random spellings: a request is refused (403) exactly when its decoded id is denied, and
    // when it is served the upstream's path decodes to that same id.
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let alphabet: Vec<char> = "AZaz09-._~:@!$&'(),=é".chars().collect();
    let ids: Vec<String> = (0..24)
        .map(|_| {
            let len = 2 + (next() % 5) as usize;
            (0..len).map(|_| alphabet[(next() % alphabet.len() as u64) as usize]).collect()
        })
        .filter(|id: &String| id != "." && id != "..")
        .collect();
    let denied: Vec<&String> = ids.iter().step_by(2).collect();
    let mut seed_yaml = String::from(
        "- { name: traders, effect: allow, resource: \"instrument:*\", actions: [read], roles: [trader], priority: 10 }\n",
    );
    for (i, id) in denied.iter().enumerate() {
        let resource = serde_json::to_string(&format!("instrument:{id}")).unwrap();
        seed_yaml.push_str(&format!(
            "- {{ name: deny-{i}, effect: deny, resource: {resource}, actions: [read], priority: 100 }}\n"
        ));
    }
    let e = edge(&seed_yaml, "", &[]).await;
    let token = e.keys.token("paul", "t1", &["trader"]);
    let mut spelling_seed = 0x1234_5678_9abc_def1;
    for id in &ids {
        let is_denied = denied.contains(&id);
        for spelling in spellings(id, 6, &mut spelling_seed) {
            let before = e.targets().len();
            let (status, body) =
                get_raw(e.gateway.addr, &format!("/api/v1/prices/latest/{spelling}"), &token).await;
            match status {
                403 => assert!(is_denied, "{id:?} ({spelling}) refused: {body}"),
                200 => {
                    assert!(!is_denied, "{id:?} ({spelling}) served though denied");
                    let target = &e.targets()[before];
                    let segment = target.trim_start_matches("/prices/latest/");
                    assert_eq!(&percent_decode(segment), id, "{spelling} forwarded as {target}");
                }
                // Only double encoding is refused: every other spelling of the id is served or
                // refused by its rule.
                400 => {
                    assert_eq!(body["reason"], "invalid_path", "{spelling}: {body}");
                    assert!(spelling.contains("%25"), "{id:?} ({spelling}) refused: {body}");
                }
                other => panic!("{id:?} ({spelling}): {other} {body}"),
            }
        }
    }
}

#[tokio::test]
async fn dot_segments_and_encoded_separators_are_refused_by_every_role() {
    let e = edge(SEED, "", &[]).await;
    let keys = &e.keys;
    let stream = start(Role::Stream, config(&[("ACCESS_AUTH__DEV_KEY_FILE", &keys.path)])).await;
    let auth = start(Role::Auth, config(&[("ACCESS_AUTH__DEV_KEY_FILE", &keys.path)])).await;
    wait_ready(&stream.url("")).await;
    wait_ready(&auth.url("")).await;
    let admin = keys.token("root", "t1", &["admin", "trader"]);
    let bad = [
        "/api/v1/instruments/..",
        "/api/v1/instruments/.",
        "/api/v1/instruments/%2e%2e",
        "/api/v1/instruments/%2E%2e",
        "/api/v1/instruments/.%2E",
        "/api/v1/instruments/%252e%252e",
        "/api/v1/instruments/%25252e",
        "/api/v1/instruments/..%2Fstatus",
        "/api/v1/instruments/a%2fb",
        "/api/v1/instruments/a%5Cb",
        "/api/v1/instruments/a\\b",
        "/api/v1/instruments/a%00",
        "/api/v1/instruments/a%0d%0aX-Injected:%201",
        "/api/v1/instruments//a",
        "/api/v1/instruments/..;/a",
        "/api/v1/instruments/a;jsessionid=1",
        "/api/v1/instruments/%C0%AE%C0%AE",
        "/api/v1/instruments/%zz",
        "/api/v1/prices/latest/NG-H27?x=%00",
        "/api/v1/../v1/status",
        "/./health",
    ];
    for role in [&e.gateway, &stream, &auth] {
        for target in bad {
            let (status, body) = get_raw(role.addr, target, &admin).await;
            assert_eq!(
                (status, body["code"].as_str(), body["reason"].as_str()),
                (400, Some("invalid_request"), Some("invalid_path")),
                "{target} on {}: {body}",
                role.addr
            );
            assert!(body["message"].is_string());
        }
    }
    assert!(e.targets().is_empty(), "refused targets reached the upstream: {:?}", e.targets());
    let (status, _) = get_raw(auth.addr, "/%68ealth", &admin).await;
    assert_eq!(status, 200, "an escaped unreserved character is the same path");
}

#[tokio::test]
async fn reserved_headers_in_any_spelling_never_reach_the_upstream() {
    let e = edge(
        SEED,
        r#"- { name: passthrough, path: "/api/v1/passthrough/{id}", upstreams: ["{upstream}"], strip_prefix: /api/v1, entitlement: { resource: "instrument:{id}" }, forward_authorization: true }"#,
        &[],
    )
    .await;
    let alice = e.keys.token("alice", "t1", &["trader"]);
    let twins = [
        ("X_User_Id", "root"),
        ("x_tenant_id", "t-other"),
        ("X-USER-ROLES", "admin"),
        ("x-user_roles", "admin"),
        ("X_Forwarded_For", "6.6.6.6"),
        ("x-forwarded-host", "evil"),
        ("X_Forwarded_Proto", "https"),
        ("Forwarded", "for=6.6.6.6"),
        ("X-Real-IP", "6.6.6.6"),
        ("X-Original-URL", "/admin"),
        ("X_Rewrite_Url", "/admin"),
        ("X-HTTP-Method-Override", "DELETE"),
        ("x_api_key", "ak_stolen"),
        ("X-Auth-Request-User", "root"),
        ("X-Tenant", "t-other"),
        ("X_Consumer_Username", "root"),
        ("Impersonate-User", "root"),
        ("X-SSL-Client-S-DN", "CN=root"),
        ("X-Amzn-Oidc-Identity", "root"),
    ];
    let send = |path: &'static str| {
        let mut r = http().get(e.gateway.url(path)).bearer_auth(&alice);
        for (k, v) in twins {
            r = r.header(k, v);
        }
        r.send()
    };
    assert_eq!(send("/api/v1/prices/latest/EURUSD").await.unwrap().status(), 200);
    assert_eq!(send("/api/v1/passthrough/EURUSD").await.unwrap().status(), 200);
    let seen = e.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    for (i, s) in seen.iter().enumerate() {
        let names: Vec<String> = s.headers.iter().map(|(k, _)| k.replace('_', "-")).collect();
        let value = |n: &str| s.headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str());
        assert_eq!(
            (value("x-user-id"), value("x-tenant-id"), value("x-user-roles")),
            (Some("alice"), Some("t1"), Some("trader")),
            "{s:?}"
        );
        assert_eq!(value("x-forwarded-for"), Some("127.0.0.1"));
        assert_eq!(value("x-forwarded-proto"), Some("http"));
        for reserved in [
            "forwarded",
            "x-real-ip",
            "x-original-url",
            "x-rewrite-url",
            "x-http-method-override",
            "x-api-key",
            "x-auth-request-user",
            "x-tenant",
            "x-consumer-username",
            "impersonate-user",
            "x-ssl-client-s-dn",
            "x-amzn-oidc-identity",
        ] {
            assert!(!names.iter().any(|n| n == reserved), "{reserved} reached the upstream: {s:?}");
        }
        for identity in [
            "x-user-id",
            "x-tenant-id",
            "x-user-roles",
            "x-forwarded-for",
            "x-forwarded-proto",
            "x-forwarded-host",
        ] {
            assert_eq!(names.iter().filter(|n| *n == identity).count(), 1, "{identity}: {s:?}");
        }
        assert_ne!(value("x-forwarded-host"), Some("evil"));
        // The caller's token reaches only the route that asks for it.
        assert_eq!(value("authorization").is_some(), i == 1, "{s:?}");
    }
}

/// Sends a request head (and `body`), then keeps the socket open without finishing the body.
async fn stalled_upload(addr: SocketAddr, from: IpAddr, head: &str, body: &[u8]) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(from, 0)).unwrap();
    let mut stream = socket.connect(addr).await.unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body).await.unwrap();
    stream
}

async fn answer_of(mut stream: TcpStream, within: Duration) -> (u16, Value) {
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(within, stream.read_to_end(&mut buf)).await;
    parse_response(&buf)
}

#[tokio::test]
async fn client_body_faults_are_client_errors_and_never_open_the_breaker() {
    let e = edge(
        SEED,
        "",
        &[("ACCESS_SERVER__MAX_BODY_BYTES", "1024"), ("ACCESS_SERVER__BODY_READ_TIMEOUT", "400ms")],
    )
    .await;
    let addr = e.gateway.addr;
    let local: IpAddr = "127.0.0.1".parse().unwrap();
    for _ in 0..5 {
        // Over the limit, declared.
        let head = "POST /api/v1/orders HTTP/1.1\r\nhost: x\r\ncontent-length: 5000\r\nconnection: close\r\n\r\n";
        let (status, body) =
            answer_of(stalled_upload(addr, local, head, b"").await, Duration::from_secs(3)).await;
        assert_eq!((status, body["code"].as_str()), (413, Some("payload_too_large")), "{body}");
        // Over the limit, chunked: only the streamed bytes tell.
        let chunk = format!("800\r\n{}\r\n", "x".repeat(0x800));
        let head = "POST /api/v1/orders HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n";
        let (status, body) = answer_of(
            stalled_upload(addr, local, head, chunk.as_bytes()).await,
            Duration::from_secs(3),
        )
        .await;
        assert_eq!((status, body["code"].as_str()), (413, Some("payload_too_large")), "{body}");
        // A body that stops coming: 408 at the read deadline.
        let head = "POST /api/v1/orders HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\nconnection: close\r\n\r\n";
        let (status, body) =
            answer_of(stalled_upload(addr, local, head, b"x").await, Duration::from_secs(3)).await;
        assert_eq!((status, body["code"].as_str()), (408, Some("request_timeout")), "{body}");
        let (status, body) = answer_of(
            stalled_upload(
                addr,
                local,
                &head.replace("content-length: 100", "transfer-encoding: chunked"),
                b"5\r\nab",
            )
            .await,
            Duration::from_secs(3),
        )
        .await;
        assert_eq!((status, body["code"].as_str()), (408, Some("request_timeout")), "{body}");
        // An upload the client abandons.
        let mut abandoned = stalled_upload(addr, local, head, b"xy").await;
        abandoned.shutdown().await.unwrap();
        let (status, _) = answer_of(abandoned, Duration::from_secs(3)).await;
        assert!(status == 400 || status == 0, "abandoned upload: {status}");
    }
    assert!(e.targets().is_empty(), "a partial body reached the upstream: {:?}", e.targets());
    // Nothing above was the upstream's fault: its breaker is closed for everyone else.
    let (status, body) = raw(
        addr,
        b"POST /api/v1/orders HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let seen = e.seen.lock().unwrap().clone();
    assert_eq!((seen.len(), seen[0].method.as_str(), seen[0].body), (1, "POST", 2));
    let breakers: Value = http()
        .get(e.gateway.url("/api/v1/circuit-breakers"))
        .bearer_auth(e.keys.token("root", "t1", &["admin"]))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(!breakers.to_string().contains("\"open\""), "{breakers}");
}

#[tokio::test]
async fn slow_clients_get_their_share_and_no_more() {
    // Sixteen slots in all, four per address and per identity: a client that stalls its bodies
    // (or holds slow requests) is refused past its share, and everyone else is still served.
    let e = edge(
        SEED,
        "",
        &[
            ("ACCESS_SERVER__MAX_CONCURRENCY", "16"),
            ("ACCESS_SERVER__MAX_IN_FLIGHT_PER_CLIENT", "4"),
            ("ACCESS_GATEWAY__MAX_IN_FLIGHT_PER_IDENTITY", "4"),
            ("ACCESS_SERVER__BODY_READ_TIMEOUT", "1500ms"),
        ],
    )
    .await;
    let addr = e.gateway.addr;
    let attacker: IpAddr = "127.0.0.1".parse().unwrap();
    let head = "POST /api/v1/orders HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\nconnection: close\r\n\r\n";
    let mut stalled = Vec::new();
    for _ in 0..16 {
        stalled.push(stalled_upload(addr, attacker, head, b"x").await);
    }
    // Past its four, the attacker's sockets are refused at once.
    let answers = futures::future::join_all(stalled.into_iter().map(|mut s| async move {
        let mut buf = [0u8; 512];
        match tokio::time::timeout(Duration::from_millis(500), s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => Err(parse_response(&buf[..n])),
            _ => Ok(s),
        }
    }))
    .await;
    let mut refused = 0;
    let mut held = Vec::new();
    for answer in answers {
        match answer {
            Ok(s) => held.push(s),
            Err((status, body)) => {
                assert_eq!(
                    (status, body["reason"].as_str()),
                    (429, Some("too_many_in_flight")),
                    "{body}"
                );
                refused += 1;
            }
        }
    }
    assert_eq!((refused, held.len()), (12, 4));
    // Another address is served meanwhile.
    let victim = reqwest::Client::builder()
        .local_address("127.0.0.2".parse::<IpAddr>().unwrap())
        .build()
        .unwrap();
    let token = e.keys.token("vic", "t2", &["trader"]);
    let r = victim
        .get(e.gateway.url("/api/v1/prices/latest/EURUSD"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // The stalled ones end with 408 at the body deadline, and free their slots.
    for s in held {
        let (status, body) = answer_of(s, Duration::from_secs(4)).await;
        assert_eq!((status, body["code"].as_str()), (408, Some("request_timeout")));
    }

    // One identity from many addresses: at most four requests in flight.
    let mallory = e.keys.token("mallory", "t3", &["trader"]);
    let mut slow = Vec::new();
    for i in 0..6u8 {
        let client = reqwest::Client::builder()
            .local_address(IpAddr::from([127, 0, 1, 10 + i]))
            .build()
            .unwrap();
        let req = client
            .get(e.gateway.url(&format!("/api/v1/slowauth/{i}")))
            .bearer_auth(&mallory)
            .send();
        slow.push(tokio::spawn(async move { req.await.map(|r| r.status().as_u16()).unwrap_or(0) }));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut statuses = Vec::new();
    for s in slow {
        statuses.push(s.await.unwrap());
    }
    statuses.sort();
    assert_eq!(statuses, vec![200, 200, 200, 200, 429, 429], "per identity");
}

#[tokio::test]
async fn idle_preface_and_trickling_connections_are_closed_by_every_role() {
    let keys = DevKeys::new();
    let env = [
        ("ACCESS_AUTH__DEV_KEY_FILE", keys.path.as_str()),
        ("ACCESS_SERVER__HEADER_READ_TIMEOUT", "500ms"),
        ("ACCESS_SERVER__BODY_READ_TIMEOUT", "500ms"),
        ("ACCESS_SERVER__MAX_CONNECTIONS_PER_CLIENT", "6"),
    ];
    let stream = start(Role::Stream, config(&env)).await;
    let auth = start(Role::Auth, config(&env)).await;
    wait_ready(&stream.url("")).await;
    wait_ready(&auth.url("")).await;
    for role in [&stream, &auth] {
        // A body that stops coming holds nothing past the read deadline, in a role that is not
        // the gateway too (the auth role's JSON extractor reads it).
        if role.addr == auth.addr {
            let head = "POST /auth/verify HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\nconnection: close\r\n\r\n";
            let local: IpAddr = "127.0.0.1".parse().unwrap();
            let stalled = stalled_upload(role.addr, local, head, b"{").await;
            let (status, body) = answer_of(stalled, Duration::from_secs(3)).await;
            assert_eq!((status, body["code"].as_str()), (408, Some("request_timeout")), "{body}");
        }
        let started = tokio::time::Instant::now();
        // Silent, HTTP/2 preface, a trickled head, and idle after one request.
        let mut silent = TcpStream::connect(role.addr).await.unwrap();
        let mut preface = TcpStream::connect(role.addr).await.unwrap();
        preface.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
        let mut trickle = TcpStream::connect(role.addr).await.unwrap();
        trickle.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n").await.unwrap();
        let mut kept = TcpStream::connect(role.addr).await.unwrap();
        kept.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
        let mut first = [0u8; 1024];
        let n = kept.read(&mut first).await.unwrap();
        assert!(String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"));
        let mut buf = Vec::new();
        let closed_preface =
            tokio::time::timeout(Duration::from_millis(300), preface.read_to_end(&mut buf)).await;
        assert!(closed_preface.is_ok(), "an HTTP/2 preface is closed at once");
        for (what, s) in [("silent", &mut silent), ("trickle", &mut trickle), ("kept", &mut kept)] {
            let mut buf = Vec::new();
            let ended = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut buf)).await;
            assert!(ended.is_ok(), "{what} connection still open on {}", role.addr);
        }
        assert!(started.elapsed() < Duration::from_secs(3));

        // At most six connections from one address; another address is still served.
        let mut open = Vec::new();
        for _ in 0..6 {
            open.push(TcpStream::connect(role.addr).await.unwrap());
        }
        let (status, body) =
            raw(role.addr, b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await;
        assert_eq!(
            (status, body["reason"].as_str()),
            (429, Some("too_many_connections")),
            "{body}"
        );
        let other = reqwest::Client::builder()
            .local_address("127.0.0.2".parse::<IpAddr>().unwrap())
            .build()
            .unwrap();
        assert_eq!(other.get(role.url("/health")).send().await.unwrap().status(), 200);
        drop(open);
        eventually(Duration::from_secs(3), "slots given back", || async {
            let (status, _) =
                raw(role.addr, b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                    .await;
            (status == 200).then_some(())
        })
        .await;
    }
}

#[tokio::test]
async fn stats_need_the_admin_or_service_role_and_ready_reports_saturation() {
    let keys = DevKeys::new();
    let stream = start(Role::Stream, config(&[("ACCESS_AUTH__DEV_KEY_FILE", &keys.path)])).await;
    let entitlements =
        start(Role::Entitlements, config(&[("ACCESS_AUTH__DEV_KEY_FILE", &keys.path)])).await;
    wait_ready(&stream.url("")).await;
    wait_ready(&entitlements.url("")).await;
    let trader = keys.token("alice", "t1", &["trader"]);
    let admin = keys.token("root", "t1", &["admin"]);
    let service = keys.token("svc", "t1", &["service"]);
    // A path or query a role cannot parse is refused in the error contract's JSON too.
    for path in ["/entitlements/rules/not-a-uuid", "/entitlements/rules?limit=-1"] {
        let r = http().get(entitlements.url(path)).bearer_auth(&admin).send().await.unwrap();
        let status = r.status().as_u16();
        let body: Value = r.json().await.unwrap_or(Value::Null);
        assert_eq!(
            (status, body["code"].as_str()),
            (400, Some("invalid_request")),
            "{path}: {body}"
        );
        assert!(body["message"].is_string());
    }
    for url in [stream.url("/stats"), entitlements.url("/entitlements/stats")] {
        let status = |token: Option<String>| {
            let mut r = http().get(&url);
            if let Some(t) = token {
                r = r.bearer_auth(t);
            }
            async move { r.send().await.unwrap().status().as_u16() }
        };
        assert_eq!(status(None).await, 401, "{url}");
        assert_eq!(status(Some(trader.clone())).await, 403, "{url}");
        assert_eq!(status(Some(admin.clone())).await, 200, "{url}");
        assert_eq!(status(Some(service.clone())).await, 200, "{url}");
    }

    let e = edge(SEED, "", &[("ACCESS_SERVER__MAX_CONCURRENCY", "2")]).await;
    let slow: Vec<_> = (0..2)
        .map(|i| tokio::spawn(http().get(e.gateway.url(&format!("/api/v1/slow/{i}"))).send()))
        .collect();
    let ready: Value = eventually(Duration::from_secs(2), "ready reports saturation", || async {
        let body: Value =
            http().get(e.gateway.url("/ready")).send().await.ok()?.json().await.ok()?;
        (body["status"] == "degraded").then_some(body)
    })
    .await;
    assert_eq!(ready["failing"], json!(["capacity"]), "{ready}");
    for s in slow {
        assert_eq!(s.await.unwrap().unwrap().status(), 200);
    }
}

#[tokio::test]
async fn methods_hosts_and_request_ids_are_checked_as_what_they_are() {
    let e = edge(SEED, "", &[]).await;
    let tina = e.keys.token("tina", "t1", &["trader"]);
    let addr = e.gateway.addr;
    let send = |head: String| async move { raw(addr, head.as_bytes()).await };
    // A method the gateway cannot classify is checked as `admin`, never as a read: the trader
    // may read and write instruments, not administer them.
    for method in ["delete", "Delete", "post", "PURGE", "MKCOL", "PROPFIND", "X"] {
        let (status, body) = send(format!(
            "{method} /api/v1/instruments/EURUSD HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {tina}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
        ))
        .await;
        assert_eq!((status, body["code"].as_str()), (403, Some("forbidden")), "{method}: {body}");
    }
    // OPTIONS is forwarded only where a route takes it (CORS preflights never reach routes).
    let (status, body) = send(format!(
        "OPTIONS /api/v1/prices/latest/EURUSD HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {tina}\r\nconnection: close\r\n\r\n"
    ))
    .await;
    assert_eq!((status, body["code"].as_str()), (405, Some("method_not_allowed")), "{body}");
    // One well-formed Host.
    for head in [
        "GET /api/v1/prices/latest/EURUSD HTTP/1.1\r\nconnection: close\r\n\r\n",
        "GET /api/v1/prices/latest/EURUSD HTTP/1.1\r\nhost: evil\r\nhost: x\r\nconnection: close\r\n\r\n",
        "GET /api/v1/prices/latest/EURUSD HTTP/1.1\r\nhost: a b\r\nconnection: close\r\n\r\n",
        "GET /api/v1/prices/latest/EURUSD HTTP/1.1\r\nhost: a/b\r\nconnection: close\r\n\r\n",
    ] {
        let (status, body) = send(head.to_string()).await;
        assert_eq!((status, body["reason"].as_str()), (400, Some("invalid_host")), "{head:?}: {body}");
    }
    assert!(e.targets().is_empty(), "{:?}", e.targets());
    // A client's request id is kept only when it is one short token.
    let keep = http()
        .get(e.gateway.url("/api/v1/prices/latest/EURUSD"))
        .bearer_auth(&tina)
        .header("x-request-id", "client-id.1:a_b")
        .send()
        .await
        .unwrap();
    assert_eq!(keep.headers()["x-request-id"], "client-id.1:a_b");
    for bad in ["x".repeat(129), "has space".to_string(), "semi;colon".to_string()] {
        let r = http()
            .get(e.gateway.url("/api/v1/prices/latest/EURUSD"))
            .bearer_auth(&tina)
            .header("x-request-id", bad.as_str())
            .send()
            .await
            .unwrap();
        let echoed = r.headers()["x-request-id"].to_str().unwrap().to_string();
        assert_ne!(echoed, bad);
        assert_eq!(echoed.len(), 36, "a fresh uuid: {echoed}");
    }
    let seen = e.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 4);
    for s in &seen {
        let ids: Vec<&String> =
            s.headers.iter().filter(|(k, _)| k == "x-request-id").map(|(_, v)| v).collect();
        assert_eq!(ids.len(), 1, "{s:?}");
        assert!(ids[0].len() <= 128);
    }
}
