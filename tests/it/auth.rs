//! The auth role against a JWKS served over real HTTP from generated RSA and EC keys, and the real
//! Redis for revocations.

use std::time::Duration;

use access::role::Role;
use serde_json::{json, Value};

use crate::idp::{claims, now, Idp, Key, AUDIENCE, ISSUER};
use crate::support::{
    config, eventually, http, redis_prefix, spawn_binary, start, wait_ready, Running, REDIS_URL,
};

/// The auth role verifying against `idp`, revocations in the real Redis under a fresh prefix.
async fn auth_role(idp: &Idp, prefix: &str, extra: &[(&str, &str)]) -> Running {
    let jwks = idp.jwks_url();
    let mut env = vec![
        ("ACCESS_JWKS_URL", jwks.as_str()),
        ("ACCESS_AUTH__ISSUER", ISSUER),
        ("ACCESS_AUTH__AUDIENCE", AUDIENCE),
        ("ACCESS_REDIS_URL", REDIS_URL),
        ("ACCESS_REDIS__PREFIX", prefix),
    ];
    env.extend_from_slice(extra);
    let s = start(Role::Auth, config(&env)).await;
    s
}

async fn verify(s: &Running, token: &str) -> Value {
    let r =
        http().post(s.url("/auth/verify")).json(&json!({ "token": token })).send().await.unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

fn reason(v: &Value) -> &str {
    assert_eq!(v["valid"], false, "{v}");
    assert_eq!(v["code"], "unauthenticated");
    v["reason"].as_str().unwrap()
}

#[tokio::test]
async fn rs256_and_es256_verify_and_every_reason_is_reported() {
    let (rsa, ec) = (Key::rsa("rsa-1"), Key::ec("ec-1"));
    let idp = Idp::start(&[&rsa, &ec]).await;
    let s = auth_role(&idp, &redis_prefix(), &[]).await;
    wait_ready(&s.url("")).await;

    let v = verify(&s, &rsa.sign(&claims("alice", json!({})))).await;
    assert_eq!(v["valid"], true, "{v}");
    assert_eq!(v["user_info"]["user_id"], "alice");
    assert_eq!(v["user_info"]["tenant_id"], "t1");
    assert_eq!(v["user_info"]["roles"], json!(["trader"]));
    assert_eq!(v["user_info"]["email"], "alice@example.com");
    assert_eq!(v["claims"]["iss"], ISSUER);
    let ws: Value = http()
        .post(s.url("/auth/verify-ws"))
        .json(&json!({ "token": rsa.sign(&claims("alice", json!({}))) }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ws["valid"], true, "the old streaming handshake endpoint answers the same: {ws}");
    let v = verify(&s, &format!("Bearer {}", ec.sign(&claims("bob", json!({}))))).await;
    assert_eq!(v["valid"], true, "a Bearer prefix is accepted: {v}");

    let stranger = Key::rsa("rsa-1");
    let hs256 = {
        use base64::Engine;
        let b64 =
            |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
        let header = b64(&json!({"alg": "HS256", "kid": "rsa-1", "typ": "JWT"}));
        let body = b64(&claims("eve", json!({})));
        let none = format!("{}.{body}.", b64(&json!({"alg": "none"})));
        (format!("{header}.{body}.c2lnbmF0dXJl"), none)
    };
    let cases: Vec<(&str, String)> = vec![
        ("expired", rsa.sign(&claims("a", json!({"exp": now() - 120})))),
        ("not_yet_valid", rsa.sign(&claims("a", json!({"nbf": now() + 300})))),
        ("bad_signature", stranger.sign(&claims("a", json!({})))),
        ("unknown_key", rsa.sign_as("nobody-knows", &claims("a", json!({})))),
        ("wrong_issuer", rsa.sign(&claims("a", json!({"iss": "https://evil"})))),
        ("wrong_audience", rsa.sign(&claims("a", json!({"aud": "other", "azp": "other"})))),
        ("algorithm_not_allowed", hs256.0.clone()),
        ("algorithm_not_allowed", hs256.1.clone()),
        ("algorithm_not_allowed", ec.sign_as("rsa-1", &claims("a", json!({})))),
        ("malformed", "not-a-jwt".into()),
        ("malformed", "a.b.c".into()),
        ("malformed", rsa.sign(&claims("a", json!({"exp": null})))),
        ("missing_tenant", rsa.sign(&claims("a", json!({"tenant_id": null})))),
    ];
    let mut wrong = Vec::new();
    for (expected, token) in cases {
        let v = verify(&s, &token).await;
        if v["reason"] != expected {
            wrong.push(format!("expected {expected}, got {v}"));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");

    // revoked: log out, then the same token is refused.
    let token = rsa.sign(&claims("carol", json!({})));
    let r = http().post(s.url("/auth/logout")).bearer_auth(&token).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(reason(&verify(&s, &token).await), "revoked");

    // The same reasons reach protected endpoints as 401 bodies.
    let r = http().get(s.url("/auth/me")).bearer_auth("junk").send().await.unwrap();
    assert_eq!(r.status(), 401);
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        (body["code"].as_str(), body["reason"].as_str()),
        (Some("unauthenticated"), Some("malformed"))
    );
    assert_eq!(http().get(s.url("/auth/me")).send().await.unwrap().status(), 401);
}

#[tokio::test]
async fn bad_verify_bodies_are_400() {
    let rsa = Key::rsa("k");
    let idp = Idp::start(&[&rsa]).await;
    let s = auth_role(&idp, &redis_prefix(), &[]).await;
    for body in ["", "{", "{\"tok\": 1}", "[]"] {
        let r = http()
            .post(s.url("/auth/verify"))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{body:?}");
        assert_eq!(r.json::<Value>().await.unwrap()["code"], "invalid_request");
    }
}

#[tokio::test]
async fn a_default_tenant_admits_tokens_without_one() {
    let rsa = Key::rsa("k");
    let idp = Idp::start(&[&rsa]).await;
    let s = auth_role(&idp, &redis_prefix(), &[("ACCESS_AUTH__DEFAULT_TENANT", "t0")]).await;
    let v = verify(&s, &rsa.sign(&claims("a", json!({"tenant_id": null})))).await;
    assert_eq!(v["user_info"]["tenant_id"], "t0", "{v}");
}

#[tokio::test]
async fn a_rotated_key_is_fetched_on_first_sight() {
    let old = Key::rsa("2026-01");
    let idp = Idp::start(&[&old]).await;
    let s = auth_role(&idp, &redis_prefix(), &[]).await;
    wait_ready(&s.url("")).await;
    let new = Key::ec("2026-02");
    idp.publish(&new);
    let v = verify(&s, &new.sign(&claims("alice", json!({})))).await;
    assert_eq!(v["valid"], true, "{v}");
    assert_eq!(verify(&s, &old.sign(&claims("alice", json!({})))).await["valid"], true);
}

#[tokio::test]
async fn during_an_idp_outage_the_last_good_keys_keep_working() {
    let key = Key::rsa("k1");
    let idp = Idp::start(&[&key]).await;
    let s = auth_role(&idp, &redis_prefix(), &[("ACCESS_AUTH__JWKS_REFRESH", "100ms")]).await;
    wait_ready(&s.url("")).await;
    idp.set_down(true);
    let before = idp.jwks_fetches();
    eventually(Duration::from_secs(3), "a refresh fails during the outage", || async {
        (idp.jwks_fetches() > before + 1).then_some(())
    })
    .await;
    let v = verify(&s, &key.sign(&claims("alice", json!({})))).await;
    assert_eq!(v["valid"], true, "last good keys serve: {v}");
    assert_eq!(http().get(s.url("/ready")).send().await.unwrap().status(), 200);
}

#[tokio::test]
async fn with_no_keys_ever_loaded_the_role_is_not_ready() {
    let key = Key::rsa("k1");
    let idp = Idp::start(&[&key]).await;
    idp.set_down(true);
    let s = auth_role(&idp, &redis_prefix(), &[]).await;
    let r = eventually(Duration::from_secs(5), "the role answers", || async {
        http().get(s.url("/ready")).send().await.ok()
    })
    .await;
    assert_eq!(r.status(), 503);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["failing"], json!(["jwks"]), "{body}");
    let r = http()
        .post(s.url("/auth/verify"))
        .json(&json!({"token": key.sign(&claims("a", json!({})))}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503, "cannot decide without keys");
    assert_eq!(r.json::<Value>().await.unwrap()["code"], "dependency_unavailable");

    idp.set_down(false);
    wait_ready(&s.url("")).await;
    assert_eq!(verify(&s, &key.sign(&claims("a", json!({})))).await["valid"], true);
}

#[tokio::test]
async fn a_flood_of_unknown_kids_causes_bounded_refetches() {
    let key = Key::rsa("real");
    let idp = Idp::start(&[&key]).await;
    // 200 at once from one address: past the per-client share, which is not what this tests.
    let s = auth_role(
        &idp,
        &redis_prefix(),
        &[("ACCESS_AUTH__JWKS_COOLDOWN", "30s"), ("ACCESS_SERVER__MAX_IN_FLIGHT_PER_CLIENT", "0")],
    )
    .await;
    wait_ready(&s.url("")).await;
    let before = idp.jwks_fetches();
    let client = http();
    let floods = (0..200).map(|i| {
        let token = key.sign_as(&format!("made-up-{i}"), &claims("mallory", json!({})));
        let client = client.clone();
        let url = s.url("/auth/verify");
        async move {
            client
                .post(url)
                .json(&json!({ "token": token }))
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        }
    });
    let answers = futures::future::join_all(floods).await;
    assert!(answers.iter().all(|v| v["reason"] == "unknown_key"));
    let refetches = idp.jwks_fetches() - before;
    assert!(refetches <= 1, "{refetches} refetches for 200 unknown kids");
}

#[tokio::test]
async fn user_records_need_admin_and_show_revocations() {
    let key = Key::rsa("k");
    let idp = Idp::start(&[&key]).await;
    let s = auth_role(&idp, &redis_prefix(), &[]).await;
    let admin = key.sign(&claims("root", json!({"realm_access": {"roles": ["admin"]}})));
    let trader = key.sign(&claims("dave", json!({"tenant_id": "t9"})));
    assert_eq!(verify(&s, &trader).await["valid"], true);

    let r = http().get(s.url("/auth/users/dave")).bearer_auth(&trader).send().await.unwrap();
    assert_eq!(r.status(), 403);
    let record: Value =
        eventually(Duration::from_secs(2), "dave's sighting is recorded", || async {
            let r = http().get(s.url("/auth/users/dave")).bearer_auth(&admin).send().await.unwrap();
            (r.status() == 200).then_some(())?;
            r.json().await.ok()
        })
        .await;
    assert_eq!(record["tenant_id"], "t9");
    assert_eq!(record["roles"], json!(["trader"]));
    assert!(record["last_seen"].as_u64().unwrap() >= now() - 5);
    assert_eq!(record["revoked_before"], Value::Null);

    let r = http().get(s.url("/auth/users/nobody")).bearer_auth(&admin).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let r =
        http().post(s.url("/auth/users/dave/revoke")).bearer_auth(&trader).send().await.unwrap();
    assert_eq!(r.status(), 403);
    let r = http().post(s.url("/auth/users/dave/revoke")).bearer_auth(&admin).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let record: Value = http()
        .get(s.url("/auth/users/dave"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(record["revoked_before"].as_u64().is_some(), "{record}");
    assert_eq!(reason(&verify(&s, &trader).await), "revoked");
}

#[tokio::test]
async fn revocations_reach_a_second_verifier_process_within_a_second() {
    let key = Key::rsa("k");
    let idp = Idp::start(&[&key]).await;
    let prefix = redis_prefix();
    let a = auth_role(&idp, &prefix, &[]).await;
    let jwks = idp.jwks_url();
    let b = spawn_binary(
        "auth",
        &[
            ("ACCESS_JWKS_URL", &jwks),
            ("ACCESS_AUTH__ISSUER", ISSUER),
            ("ACCESS_AUTH__AUDIENCE", AUDIENCE),
            ("ACCESS_REDIS_URL", REDIS_URL),
            ("ACCESS_REDIS__PREFIX", &prefix),
        ],
    );
    wait_ready(&b.url).await;
    let verify_at_b = |token: String| {
        let url = format!("{}/auth/verify", b.url);
        async move {
            http()
                .post(url)
                .json(&json!({ "token": token }))
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        }
    };

    // A token B has verified (and cached) is refused by B within a second of a logout at A.
    let token = key.sign(&claims("erin", json!({})));
    assert_eq!(verify_at_b(token.clone()).await["valid"], true);
    assert_eq!(
        http().post(a.url("/auth/logout")).bearer_auth(&token).send().await.unwrap().status(),
        200
    );
    let revoked_at = std::time::Instant::now();
    eventually(Duration::from_secs(1), "B refuses the logged-out token", || async {
        (verify_at_b(token.clone()).await["reason"] == "revoked").then_some(())
    })
    .await;
    let token_latency = revoked_at.elapsed();

    // Every token of a user revoked by an admin at A is refused by B within a second.
    let admin = key.sign(&claims("root", json!({"realm_access": {"roles": ["admin"]}})));
    let other = key.sign(&claims("frank", json!({"jti": "1"})));
    let another = key.sign(&claims("frank", json!({"jti": "2"})));
    assert_eq!(verify_at_b(other.clone()).await["valid"], true);
    let r =
        http().post(a.url("/auth/users/frank/revoke")).bearer_auth(&admin).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let revoked_at = std::time::Instant::now();
    eventually(Duration::from_secs(1), "B refuses the user's cached token", || async {
        (verify_at_b(other.clone()).await["reason"] == "revoked").then_some(())
    })
    .await;
    assert_eq!(verify_at_b(another).await["reason"], "revoked", "and the uncached one");
    eprintln!(
        "revocation seen by the second process after {token_latency:?} (token), {:?} (user)",
        revoked_at.elapsed()
    );
}

#[tokio::test]
async fn dev_tokens_from_the_cli_verify_in_another_process() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("dev-key.json").display().to_string();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_access"))
        .env_clear()
        .env("ACCESS_AUTH__DEV_KEY_FILE", &key_file)
        .args([
            "token",
            "--sub",
            "alice",
            "--tenant",
            "t1",
            "--roles",
            "trader,admin",
            "--ttl",
            "10m",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();

    let s = start(Role::Auth, config(&[("ACCESS_AUTH__DEV_KEY_FILE", &key_file)])).await;
    wait_ready(&s.url("")).await;
    let v = verify(&s, &token).await;
    assert_eq!(v["valid"], true, "{v}");
    assert_eq!(v["user_info"]["roles"], json!(["admin", "trader"]));
    let jwks: Value =
        http().get(s.url("/.well-known/jwks.json")).send().await.unwrap().json().await.unwrap();
    assert_eq!(jwks["keys"].as_array().unwrap().len(), 1);
    assert!(jwks["keys"][0].get("d").is_none(), "no private key published");

    // Production refuses dev tokens and dev mode.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_access"))
        .env_clear()
        .env("ACCESS_ENV", "production")
        .args(["token", "--sub", "a", "--tenant", "t"])
        .output()
        .unwrap();
    assert!(!out.status.success());
}

#[tokio::test]
async fn sigterm_reports_not_ready_drains_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("k.json").display().to_string();
    let mut p = spawn_binary(
        "auth",
        &[
            ("ACCESS_AUTH__DEV_KEY_FILE", &key_file),
            ("ACCESS_SERVER__GRACE_PERIOD", "1s"),
            ("ACCESS_SERVER__DRAIN_TIMEOUT", "2s"),
        ],
    );
    wait_ready(&p.url).await;
    let pid = p.child.id().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let sent = std::time::Instant::now();
    // During the grace period: not ready, still serving.
    let r = eventually(Duration::from_millis(800), "ready turns 503", || async {
        let r = http().get(format!("{}/ready", p.url)).send().await.ok()?;
        (r.status() == 503).then_some(r)
    })
    .await;
    assert_eq!(r.json::<Value>().await.unwrap()["status"], "draining");
    assert_eq!(http().get(format!("{}/health", p.url)).send().await.unwrap().status(), 200);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(status) = p.child.try_wait().unwrap() {
            break status;
        }
        assert!(std::time::Instant::now() < deadline, "the process did not exit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status.code(), Some(0));
    assert!(sent.elapsed() < Duration::from_secs(4), "grace 1s + drain under 2s");
}

#[tokio::test]
async fn service_tokens_by_client_credentials_are_cached_and_renewed_before_expiry() {
    use access::auth::token_source::TokenSource;
    use access::config::Secret;
    let idp = Idp::start(&[]).await;
    idp.set_token_lifetime(2);
    let url = url::Url::parse(&format!("{}/token", idp.url)).unwrap();
    let source = TokenSource::client_credentials(
        url.clone(),
        "gateway".into(),
        Secret::new("s3cret"),
        Duration::from_secs(2),
        Role::Gateway,
    )
    .unwrap();
    let first = source.token().await.unwrap();
    let again = futures::future::join_all((0..10).map(|_| source.token())).await;
    assert!(again.iter().all(|t| t.as_deref() == Ok(first.as_str())), "cached");
    assert_eq!(idp.token_fetches(), 1);
    // 80% of 2 s: renewed after 1.6 s, before the token expires.
    tokio::time::sleep(Duration::from_millis(1700)).await;
    // The renewal runs in the background: this caller gets the current token at once.
    assert_eq!(source.token().await.unwrap(), first);
    let renewed = eventually(Duration::from_secs(2), "renewed", || async {
        source.token().await.ok().filter(|t| *t != first)
    })
    .await;
    assert_ne!(renewed, first);
    assert_eq!(idp.token_fetches(), 2);

    let wrong = TokenSource::client_credentials(
        url,
        "gateway".into(),
        Secret::new("wrong"),
        Duration::from_secs(2),
        Role::Gateway,
    )
    .unwrap();
    let err = wrong.token().await.unwrap_err();
    assert!(err.contains("401") && !err.contains("wrong"), "{err}");
}

#[tokio::test]
async fn dev_service_tokens_carry_the_service_role() {
    use access::auth::devkey::DevKey;
    use access::auth::token_source::TokenSource;
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("k.json");
    let key = std::sync::Arc::new(DevKey::load_or_create(&key_file).unwrap());
    let source = TokenSource::dev(key, "gateway", "platform".into(), "service".into(), None, None);
    let token = source.token().await.unwrap();
    let s = start(
        Role::Auth,
        config(&[("ACCESS_AUTH__DEV_KEY_FILE", &key_file.display().to_string())]),
    )
    .await;
    let v = verify(&s, &token).await;
    assert_eq!(v["user_info"]["user_id"], "service:gateway");
    assert_eq!(v["user_info"]["roles"], json!(["service"]));
}
