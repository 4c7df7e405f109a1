//! The operator's console on the auth role, and the endpoints it added to the other roles
//! (`POST /entitlements/explain`, `GET /stats/users/{id}`, `GET /metrics/usage`), against the real
//! PostgreSQL and Redis. The page itself is tested in a real browser by `tests/console/`.

use std::time::Duration;

use access::role::Role;
use serde_json::{json, Value};

use crate::stream::{close_code, next_json};
use crate::support::{
    config, eventually, http, redis_prefix, start, wait_ready, Db, DevKeys, Running, REDIS_URL,
};

/// The roles the console reaches, on real backends, and the auth role serving it.
struct Layer {
    keys: DevKeys,
    auth: Running,
    entitlements: Running,
    stream: Running,
    metrics: Running,
    code_file: std::path::PathBuf,
    _db: Db,
}

async fn layer(extra: &[(&str, &str)]) -> Layer {
    let keys = DevKeys::new();
    let db = Db::new().await;
    let prefix = redis_prefix();
    let common = vec![
        ("ACCESS_AUTH__DEV_KEY_FILE", keys.path.as_str()),
        ("ACCESS_REDIS_URL", REDIS_URL),
        ("ACCESS_REDIS__PREFIX", prefix.as_str()),
    ];
    let mut env = common.clone();
    env.push(("ACCESS_POSTGRES_DSN", db.dsn.as_str()));
    let entitlements = start(Role::Entitlements, config(&env)).await;
    wait_ready(&entitlements.url("")).await;
    let metrics = start(Role::Metrics, config(&common)).await;
    wait_ready(&metrics.url("")).await;
    let ent_url = entitlements.url("");
    let mut env = common.clone();
    env.push(("ACCESS_ENTITLEMENTS_SERVICE_URL", &ent_url));
    let stream = start(Role::Stream, config(&env)).await;
    wait_ready(&stream.url("")).await;
    let (stream_url, metrics_url) = (stream.url(""), metrics.url(""));
    let mut env = common.clone();
    env.extend_from_slice(&[
        ("ACCESS_POSTGRES_DSN", db.dsn.as_str()),
        ("ACCESS_CONSOLE__ENABLED", "true"),
        ("ACCESS_ENTITLEMENTS_SERVICE_URL", &ent_url),
        ("ACCESS_METRICS_SERVICE_URL", &metrics_url),
        ("ACCESS_CONSOLE__STREAM_URL", &stream_url),
    ]);
    env.extend_from_slice(extra);
    let auth = start(Role::Auth, config(&env)).await;
    wait_ready(&auth.url("")).await;
    let code_file = std::path::Path::new(&keys.path).with_file_name("console-code");
    Layer { keys, auth, entitlements, stream, metrics, code_file, _db: db }
}

impl Layer {
    fn code(&self) -> String {
        std::fs::read_to_string(&self.code_file).unwrap().trim().to_string()
    }

    /// Signs in with the current dev code; the session's token.
    async fn sign_in(&self, operator: &str) -> String {
        let (status, body) = post(
            &self.auth,
            "/console/session/dev",
            None,
            json!({"code": self.code(), "operator": operator}),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        body["token"].as_str().unwrap().to_string()
    }

    async fn relay(
        &self,
        token: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut r = http()
            .request(method, self.auth.url(&format!("/console/api{path}")))
            .bearer_auth(token);
        if let Some(body) = body {
            r = r.json(&body);
        }
        let response = r.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }
}

async fn post(s: &Running, path: &str, token: Option<&str>, body: Value) -> (u16, Value) {
    let mut r = http().post(s.url(path)).json(&body);
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    let response = r.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn the_console_is_served_with_strict_headers_and_only_when_enabled() {
    let l = layer(&[]).await;
    for path in ["/console/", "/console/assets/console.js", "/console/session/setup"] {
        let r = http().get(l.auth.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        let h = r.headers();
        let csp = h["content-security-policy"].to_str().unwrap();
        assert!(csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"), "{csp}");
        assert!(
            csp.contains("frame-ancestors 'none'") && csp.contains("connect-src 'self'"),
            "{csp}"
        );
        assert_eq!(h["x-frame-options"], "DENY");
        assert_eq!(h["x-content-type-options"], "nosniff");
        assert_eq!(h["referrer-policy"], "no-referrer");
        assert_eq!(h["cache-control"], "no-store");
    }
    let setup: Value = http()
        .get(l.auth.url("/console/session/setup"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(setup["mode"], "dev");
    assert_eq!(setup["code_file"], l.code_file.display().to_string());
    assert_eq!(setup["roles"], json!(["auth", "stream", "entitlements", "metrics"]));
    // The JSON endpoints are in the role's OpenAPI document.
    let doc: Value =
        http().get(l.auth.url("/openapi.json")).send().await.unwrap().json().await.unwrap();
    assert!(doc["paths"]["/console/session/dev"].is_object());

    // Off by default: another auth role without the flag serves no console.
    let keys = DevKeys::new();
    let plain =
        start(Role::Auth, config(&[("ACCESS_AUTH__DEV_KEY_FILE", keys.path.as_str())])).await;
    wait_ready(&plain.url("")).await;
    for path in ["/console/", "/console/session/setup"] {
        assert_eq!(http().get(plain.url(path)).send().await.unwrap().status(), 404, "{path}");
    }
    assert!(!std::path::Path::new(&keys.path).with_file_name("console-code").exists());
}

#[tokio::test]
async fn the_dev_code_is_single_use_and_buys_an_admin_token() {
    let l = layer(&[]).await;
    let mode = std::fs::metadata(&l.code_file)
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()))
        .unwrap();
    assert_eq!(mode & 0o077, 0, "the code file is private to its owner");
    let (status, body) =
        post(&l.auth, "/console/session/dev", None, json!({"code": "00000-00000-00000-00000"}))
            .await;
    assert_eq!((status, body["code"].as_str()), (401, Some("unauthenticated")), "{body}");

    let spent = l.code();
    let token = l.sign_in("ops-1").await;
    let me: Value = http()
        .get(l.auth.url("/auth/me"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(me["identity"]["subject"], "ops-1");
    assert_eq!(me["identity"]["roles"], json!(["admin"]));
    // Spent: the file now holds another code, and the old one is refused.
    assert_ne!(l.code(), spent);
    let (status, _) = post(&l.auth, "/console/session/dev", None, json!({"code": spent})).await;
    assert_eq!(status, 401);
    // A bad name is refused before the code is spent.
    let (status, body) = post(
        &l.auth,
        "/console/session/dev",
        None,
        json!({"code": l.code(), "operator": "<b>x</b>"}),
    )
    .await;
    assert_eq!((status, body["field"].as_str()), (422, Some("operator")), "{body}");
    // The OIDC exchange is off in dev mode.
    let (status, _) = post(
        &l.auth,
        "/console/session/oidc",
        None,
        json!({"code": "c", "code_verifier": "v".repeat(43), "redirect_uri": "http://x/console/"}),
    )
    .await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn the_relay_acts_as_the_operator_on_allow_listed_paths_only() {
    let l = layer(&[]).await;
    let token = l.sign_in("ops-2").await;
    let get = reqwest::Method::GET;
    let post_m = reqwest::Method::POST;

    // Rules through the relay: created by the operator, audited under the operator's name.
    let rule = json!({"name": "<img src=x onerror=alert(1)>", "effect": "deny", "resource": "instrument:BRN-*", "actions": ["read"], "priority": 500});
    let (status, created) =
        l.relay(&token, post_m.clone(), "/entitlements/entitlements/rules", Some(rule)).await;
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_str().unwrap();
    let (status, history) = l
        .relay(&token, get.clone(), &format!("/entitlements/entitlements/rules/{id}/history"), None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(history["history"][0]["actor"], "ops-2");

    // A stale edit is refused by the entitlements role, and the refusal reaches the page.
    let stale = json!({"name": "x", "effect": "allow", "resource": "instrument:BRN-*", "actions": ["read"], "version": 999});
    let (status, body) = l
        .relay(
            &token,
            reqwest::Method::PUT,
            &format!("/entitlements/entitlements/rules/{id}"),
            Some(stale),
        )
        .await;
    assert_eq!((status, body["code"].as_str()), (409, Some("conflict")), "{body}");

    // Not on the allow-list: 404, whatever the role would say.
    for (method, path) in [
        (get.clone(), "/entitlements/entitlements/snapshot"),
        (post_m.clone(), "/stream/publish"),
        (post_m.clone(), "/gateway/api/v1/cache/purge"),
        (get.clone(), "/nowhere/stats"),
        (get.clone(), "/gateway/api/v1/status"),
    ] {
        let (status, body) = l.relay(&token, method.clone(), path, None).await;
        let expected = if path.starts_with("/gateway/api/v1/status") { 503 } else { 404 };
        assert_eq!(status, expected, "{method} {path}: {body}");
    }

    // Only the admin role gets through; no token is 401.
    let trader = l.keys.token("alice", "t1", &["trader"]);
    let (status, _) = l.relay(&trader, get.clone(), "/entitlements/entitlements/rules", None).await;
    assert_eq!(status, 403);
    let r = http()
        .get(l.auth.url("/console/api/entitlements/entitlements/rules"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

#[tokio::test]
async fn revoking_a_user_through_the_console_closes_their_streams() {
    let l = layer(&[]).await;
    let token = l.sign_in("ops-3").await;
    let alice = l.keys.token("alice", "t1", &["trader"]);
    let url =
        format!("{}?token={alice}", l.stream.url("/ws/stream").replacen("http://", "ws://", 1));
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    assert_eq!(next_json(&mut ws).await["type"], "connection_established");

    let (status, open) =
        l.relay(&token, reqwest::Method::GET, "/stream/stats/users/alice", None).await;
    assert_eq!(status, 200, "{open}");
    assert_eq!(open["connections"].as_array().unwrap().len(), 1, "{open}");
    assert_eq!(open["connections"][0]["tenant_id"], "t1");

    let (status, body) =
        l.relay(&token, reqwest::Method::POST, "/auth/auth/users/alice/revoke", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(close_code(&mut ws, Duration::from_secs(2)).await, Some(4003));
    eventually(Duration::from_secs(2), "alice's connection is gone from /stats/users", || async {
        let (_, now) =
            l.relay(&token, reqwest::Method::GET, "/stream/stats/users/alice", None).await;
        now["connections"].as_array().is_some_and(|c| c.is_empty()).then_some(())
    })
    .await;
}

#[tokio::test]
async fn explain_names_the_deciding_rule_the_losers_and_the_version() {
    let l = layer(&[]).await;
    let admin = l.keys.token("root", "t0", &["admin"]);
    let create = |body: Value| {
        let admin = admin.clone();
        let url = l.entitlements.url("/entitlements/rules");
        async move {
            let r = http().post(url).bearer_auth(admin).json(&body).send().await.unwrap();
            assert_eq!(r.status(), 201);
            r.json::<Value>().await.unwrap()
        }
    };
    create(json!({"name": "traders read", "effect": "allow", "resource": "instrument:*", "actions": ["read"], "roles": ["trader"], "priority": 10})).await;
    create(json!({"name": "no brent", "effect": "deny", "resource": "instrument:BRN-*", "actions": ["read"], "priority": 500})).await;
    create(json!({"name": "quants write", "effect": "allow", "resource": "instrument:*", "actions": ["write"], "roles": ["quant"]})).await;
    let ask = json!({"user_id": "alice", "tenant_id": "t1", "roles": ["trader"], "resource": "instrument:BRN-F27", "action": "read"});
    let (status, why) =
        post(&l.entitlements, "/entitlements/explain", Some(&admin), ask.clone()).await;
    assert_eq!(status, 200, "{why}");
    assert_eq!(why["allowed"], false);
    assert_eq!(why["reason"], "denied_by_rule");
    assert_eq!(why["deciding_rule"]["name"], "no brent");
    assert_eq!(why["applied_and_lost"][0]["name"], "traders read");
    assert_eq!(why["not_applicable"][0]["name"], "quants write");
    assert_eq!(why["not_applicable"][0]["standing"], "other_action");
    // The same decision and version as a check.
    let service = l.keys.token("gateway", "platform", &["service"]);
    let (_, check) =
        post(&l.entitlements, "/entitlements/check", Some(&service), ask.clone()).await;
    assert_eq!(check["allowed"], why["allowed"]);
    assert_eq!(check["rules_version"], why["rules_version"]);
    // Operators only: a trader may not ask, not even about itself.
    let alice = l.keys.token("alice", "t1", &["trader"]);
    let (status, _) = post(&l.entitlements, "/entitlements/explain", Some(&alice), ask).await;
    assert_eq!(status, 403);
}

#[tokio::test]
async fn usage_is_reported_per_tenant_over_time() {
    let l = layer(&[]).await;
    let service = l.keys.token("gateway", "platform", &["service"]);
    for (tenant, n) in [("t1", 3), ("t2", 5), ("t1", 4)] {
        let point = json!({"name": "access_usage_requests_total", "type": "counter", "value": n, "tenant_id": tenant,
            "labels": {"route": "latest_prices", "status_class": "2xx"}});
        let (status, body) = post(&l.metrics, "/metrics/track", Some(&service), point).await;
        assert_eq!(status, 200, "{body}");
    }
    let token = l.sign_in("ops-4").await;
    let (status, usage) = l
        .relay(&token, reqwest::Method::GET, "/metrics/metrics/usage?window=5m&step=5s", None)
        .await;
    assert_eq!(status, 200, "{usage}");
    assert_eq!(usage["step_seconds"], 5);
    let tenants = usage["tenants"].as_array().unwrap();
    assert_eq!(tenants[0]["tenant_id"], "t1");
    assert_eq!(tenants[0]["total"], 7.0);
    assert_eq!(tenants[1]["tenant_id"], "t2");
    assert_eq!(tenants[1]["total"], 5.0);
    let (status, _) =
        l.relay(&token, reqwest::Method::GET, "/metrics/metrics/usage?step=0s", None).await;
    assert_eq!(status, 422);
}

#[tokio::test]
async fn the_consoles_own_calls_are_rate_limited() {
    let l = layer(&[
        ("ACCESS_CONSOLE__RATE_LIMIT__RATE", "3"),
        ("ACCESS_CONSOLE__RATE_LIMIT__BURST", "3"),
        ("ACCESS_CONSOLE__RATE_LIMIT__PERIOD", "1m"),
    ])
    .await;
    let token = l.sign_in("ops-5").await;
    let mut statuses = Vec::new();
    for _ in 0..5 {
        let r = http()
            .get(l.auth.url("/console/api/auth/auth/api-keys"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        statuses.push((r.status().as_u16(), r.headers().get("retry-after").is_some()));
    }
    assert_eq!(&statuses[..3], &[(200, false); 3]);
    assert_eq!(statuses[3], (429, true));
    // Another operator has a budget of their own.
    let other = l.sign_in("ops-6").await;
    let r = http()
        .get(l.auth.url("/console/api/auth/auth/api-keys"))
        .bearer_auth(&other)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// An identity provider with an authorization-code token endpoint that checks PKCE (S256), the
/// client and the redirect URI, and a discovery document naming it.
mod code_idp {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};

    use axum::extract::State;
    use axum::http::StatusCode;
    use axum::response::{IntoResponse, Response};
    use axum::routing::{get, post};
    use axum::{Json, Router};
    use base64::Engine;
    use serde_json::{json, Value};
    use sha2::Digest;

    use crate::idp::{claims, Key};

    pub const CLIENT: &str = "access-console";

    /// code -> (S256 challenge, redirect URI, claims of the token it buys).
    type Codes = HashMap<String, (String, String, Value)>;

    #[derive(Clone)]
    pub struct CodeIdp {
        pub url: String,
        codes: Arc<Mutex<Codes>>,
    }

    struct Shared {
        url: String,
        key: Key,
        codes: Arc<Mutex<Codes>>,
    }

    pub fn challenge(verifier: &str) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(verifier))
    }

    impl CodeIdp {
        pub async fn start() -> CodeIdp {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}", listener.local_addr().unwrap());
            let codes = Arc::new(Mutex::new(HashMap::new()));
            let shared = Arc::new(Shared {
                url: url.clone(),
                key: Key::ec("console-idp"),
                codes: codes.clone(),
            });
            let app = Router::new()
                .route("/.well-known/openid-configuration", get(discovery))
                .route("/certs", get(certs))
                .route("/token", post(token))
                .with_state(shared);
            tokio::spawn(async move { axum::serve(listener, app).await });
            CodeIdp { url, codes }
        }

        /// Issues `code` for a user with `roles`, redeemable with `verifier` at `redirect`.
        pub fn issue(&self, code: &str, verifier: &str, redirect: &str, sub: &str, roles: &[&str]) {
            let c = claims(sub, json!({"iss": self.url, "realm_access": {"roles": roles}}));
            self.codes
                .lock()
                .unwrap()
                .insert(code.into(), (challenge(verifier), redirect.into(), c));
        }
    }

    async fn discovery(State(s): State<Arc<Shared>>) -> Json<Value> {
        Json(json!({
            "issuer": s.url, "authorization_endpoint": format!("{}/auth", s.url),
            "token_endpoint": format!("{}/token", s.url), "jwks_uri": format!("{}/certs", s.url),
        }))
    }

    async fn certs(State(s): State<Arc<Shared>>) -> Json<Value> {
        Json(json!({"keys": [Value::Object(s.key.public.as_ref().clone())]}))
    }

    async fn token(State(s): State<Arc<Shared>>, body: String) -> Response {
        let form: HashMap<String, String> =
            url::form_urlencoded::parse(body.as_bytes()).into_owned().collect();
        let field = |k: &str| form.get(k).cloned().unwrap_or_default();
        // A code is spent by its first use, right or wrong.
        let found = s.codes.lock().unwrap().remove(&field("code"));
        let valid = field("grant_type") == "authorization_code"
            && field("client_id") == CLIENT
            && found.as_ref().is_some_and(|(challenge_, redirect, _)| {
                *challenge_ == challenge(&field("code_verifier"))
                    && *redirect == field("redirect_uri")
            });
        match (valid, found) {
            (true, Some((_, _, c))) => Json(json!({
                "access_token": s.key.sign(&c), "token_type": "Bearer", "expires_in": 600,
            }))
            .into_response(),
            _ => (StatusCode::BAD_REQUEST, Json(json!({"error": "invalid_grant"}))).into_response(),
        }
    }
}

#[tokio::test]
async fn oidc_sign_in_redeems_a_pkce_code_at_the_idp_and_admits_admins_only() {
    use code_idp::{CodeIdp, CLIENT};
    let idp = CodeIdp::start().await;
    let prefix = redis_prefix();
    let jwks = format!("{}/certs", idp.url);
    let auth = start(
        Role::Auth,
        config(&[
            ("ACCESS_JWKS_URL", jwks.as_str()),
            ("ACCESS_AUTH__ISSUER", idp.url.as_str()),
            ("ACCESS_AUTH__AUDIENCE", crate::idp::AUDIENCE),
            ("ACCESS_REDIS_URL", REDIS_URL),
            ("ACCESS_REDIS__PREFIX", prefix.as_str()),
            ("ACCESS_CONSOLE__ENABLED", "true"),
            ("ACCESS_CONSOLE__OIDC_CLIENT_ID", CLIENT),
            // Six attempts here; the default allows five at once per address.
            ("ACCESS_CONSOLE__SIGNIN_LIMIT__RATE", "20"),
            ("ACCESS_CONSOLE__SIGNIN_LIMIT__PERIOD", "1m"),
            ("ACCESS_CONSOLE__SIGNIN_LIMIT__BURST", "20"),
        ]),
    )
    .await;
    wait_ready(&auth.url("")).await;
    let setup: Value =
        http().get(auth.url("/console/session/setup")).send().await.unwrap().json().await.unwrap();
    assert_eq!(setup["mode"], "oidc");
    assert_eq!(setup["authorization_url"], format!("{}/auth", idp.url));
    assert_eq!(setup["client_id"], CLIENT);

    let redirect = auth.url("/console/");
    let verifier = "v".repeat(20) + &uuid::Uuid::new_v4().simple().to_string();
    idp.issue("code-1", &verifier, &redirect, "ops", &["admin"]);
    let sign_in = |code: &str, verifier: &str, redirect: &str| {
        let body = json!({"code": code, "code_verifier": verifier, "redirect_uri": redirect});
        let url = auth.url("/console/session/oidc");
        async move {
            let r = http().post(url).json(&body).send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let (status, session) = sign_in("code-1", &verifier, &redirect).await;
    assert_eq!(status, 200, "{session}");
    assert_eq!(session["subject"], "ops");
    assert!(session["roles"].as_array().unwrap().contains(&json!("admin")));
    let token = session["token"].as_str().unwrap();
    let r = http()
        .get(auth.url("/console/api/auth/auth/api-keys"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "the IdP's token works on the relay");

    // A spent code, and a code with the wrong verifier, are refused by the IdP: 401.
    let (status, _) = sign_in("code-1", &verifier, &redirect).await;
    assert_eq!(status, 401);
    idp.issue("code-2", &verifier, &redirect, "ops", &["admin"]);
    let (status, _) = sign_in("code-2", &"w".repeat(43), &redirect).await;
    assert_eq!(status, 401);
    // Not an admin: the IdP's token is good, the console is not for them.
    idp.issue("code-3", &verifier, &redirect, "alice", &["trader"]);
    let (status, body) = sign_in("code-3", &verifier, &redirect).await;
    assert_eq!((status, body["code"].as_str()), (403, Some("forbidden")), "{body}");
    // Only the console's own address is a redirect URI; dev sign-in is off.
    let (status, _) = sign_in("code-4", &verifier, "https://evil.example/console/").await;
    assert_eq!(status, 422);
    let (status, _) = post(&auth, "/console/session/dev", None, json!({"code": "x"})).await;
    assert_eq!(status, 404);
}
