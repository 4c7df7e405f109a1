//! Verifications per second per core, RS256 and ES256, cold (every token seen for the first time)
//! and with the verified-token cache, beside OpenSSL's own `openssl speed` verify figures from the
//! same run. `cargo bench --bench auth` (or `make bench-auth`); not part of `make test`.

#[path = "support/allocator.rs"]
mod allocator;

use std::sync::Arc;
use std::time::{Duration, Instant};

use access::auth::jwks::{Jwks, KeySet};
use access::auth::revocation::{MemoryStore, Revocation};
use access::auth::{unix_now, ClaimRules, Verifier};
use access::role::Role;
use josekit::jwk::KeyPair;
use josekit::jws::{JwsHeader, JwsSigner, ES256, RS256};
use josekit::jwt::{self, JwtPayload};
use serde_json::json;

const COLD_TOKENS: usize = 3000;
/// Distinct users among the cold tokens: fresh tokens mostly come from returning users (token
/// refresh), so the per-user sighting write is sampled as in production.
const USERS: usize = 300;

fn tokens(signer: &dyn JwsSigner, kid: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let mut header = JwsHeader::new();
            header.set_key_id(kid);
            header.set_token_type("JWT");
            let claims = json!({
                "sub": format!("user-{}", i % USERS), "jti": i.to_string(), "iss": "https://idp/realms/254carbon", "aud": "access",
                "tenant_id": "t1", "exp": unix_now() + 3600, "iat": unix_now(),
                "realm_access": {"roles": ["trader"]}, "scope": "openid profile",
                "preferred_username": format!("user-{}", i % USERS), "email": format!("user-{}@example.com", i % USERS),
            });
            let payload = JwtPayload::from_map(claims.as_object().unwrap().clone()).unwrap();
            jwt::encode_with_signer(&payload, &header, signer).unwrap()
        })
        .collect()
}

fn verifier(jwks: serde_json::Value) -> Verifier {
    let allowed = vec!["RS256".to_string(), "ES256".to_string()];
    let set = KeySet::from_jwks(jwks.to_string().as_bytes(), &allowed).unwrap();
    let rules = ClaimRules {
        issuer: Some("https://idp/realms/254carbon".into()),
        audience: Some("access".into()),
        leeway: 60,
        default_tenant: None,
        service_role: "service".into(),
    };
    Verifier::new(
        Role::Auth,
        Arc::new(Jwks::fixed(Role::Auth, set)),
        rules,
        allowed,
        Arc::new(MemoryStore::new()),
        // The role's default `auth.cache_capacity`.
        access::config::AuthConfig::default().cache_capacity,
    )
}

/// Runs `f` over `tokens` (cycling) for at least `min`, returns operations per second.
async fn rate(v: &Verifier, tokens: &[String], min: Duration) -> f64 {
    let start = Instant::now();
    let mut n = 0usize;
    while start.elapsed() < min || n < tokens.len() {
        let token = &tokens[n % tokens.len()];
        v.verify(token).await.expect("benchmark tokens verify");
        n += 1;
        if n == tokens.len() && start.elapsed() >= min {
            break;
        }
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// The median rate of 9 cold passes over `tokens`. `fresh`: each pass with a new verifier (its
/// cache's memory touched for the first time during the pass); otherwise one verifier, as in a
/// running replica, whose cache is emptied before each pass (`Revocation::Resync`) so every
/// token is verified again.
async fn cold(jwks: &serde_json::Value, tokens: &[String], fresh: bool) -> f64 {
    let long_lived = verifier(jwks.clone());
    rate(&long_lived, tokens, Duration::ZERO).await;
    let mut rates = Vec::new();
    for _ in 0..9 {
        let rate = if fresh {
            rate(&verifier(jwks.clone()), tokens, Duration::ZERO).await
        } else {
            long_lived.apply(&Revocation::Resync);
            rate(&long_lived, tokens, Duration::ZERO).await
        };
        rates.push(rate);
    }
    rates.sort_by(f64::total_cmp);
    rates[rates.len() / 2]
}

/// `openssl speed` verify/s for an algorithm (`rsa2048`, `ecdsap256`), single core.
fn openssl_verify_rate(alg: &str) -> Option<f64> {
    let out = std::process::Command::new("openssl")
        .args(["speed", "-seconds", "2", alg])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().rev().find(|l| {
        l.trim_start().starts_with(if alg.starts_with("rsa") { "rsa" } else { "256 bits" })
    })?;
    // rsa:  "rsa 2048 bits 0.000581s 0.000017s   1721.3  58823.5" -> the last column is verify/s
    // ecdsa: " 256 bits ecdsa (nistp256)   0.0000s   0.0001s  40000.0  13000.0" -> the last too
    line.split_whitespace().last()?.parse().ok()
}

fn main() {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let rsa = RS256.generate_key_pair(2048).unwrap();
    let ec = ES256.generate_key_pair().unwrap();
    let mut rsa_public = rsa.to_jwk_public_key();
    rsa_public.set_key_id("rsa");
    let mut ec_public = ec.to_jwk_public_key();
    ec_public.set_key_id("ec");
    let jwks = json!({"keys": [
        serde_json::Value::Object(rsa_public.as_ref().clone()),
        serde_json::Value::Object(ec_public.as_ref().clone()),
    ]});
    let rsa_signer = RS256.signer_from_jwk(&rsa.to_jwk_private_key()).unwrap();
    let ec_signer = ES256.signer_from_jwk(&ec.to_jwk_key_pair()).unwrap();
    eprintln!("signing {COLD_TOKENS} RS256 and {COLD_TOKENS} ES256 tokens...");
    let rsa_tokens = tokens(&rsa_signer, "rsa", COLD_TOKENS);
    let ec_tokens = tokens(&ec_signer, "ec", COLD_TOKENS);

    if std::env::args().any(|a| a == "--profile-cold") {
        // For `perf record`: the cold RS256 path only, repeated.
        runtime.block_on(async {
            let v = verifier(jwks.clone());
            for _ in 0..100 {
                v.apply(&Revocation::Resync);
                rate(&v, &rsa_tokens, Duration::ZERO).await;
            }
        });
        return;
    }
    let (rs_cold, rs_fresh, es_cold, rs_cached, es_cached) = runtime.block_on(async {
        // Cold: no token is ever cached; the median of several passes.
        let rs_cold = cold(&jwks, &rsa_tokens, false).await;
        let rs_fresh = cold(&jwks, &rsa_tokens, true).await;
        let es_cold = cold(&jwks, &ec_tokens, false).await;
        let warm = verifier(jwks.clone());
        rate(&warm, &rsa_tokens[..100], Duration::ZERO).await;
        rate(&warm, &ec_tokens[..100], Duration::ZERO).await;
        let rs_cached = rate(&warm, &rsa_tokens[..100], Duration::from_secs(2)).await;
        let es_cached = rate(&warm, &ec_tokens[..100], Duration::from_secs(2)).await;
        (rs_cold, rs_fresh, es_cold, rs_cached, es_cached)
    });
    // The signature check alone (hash + pooled EVP_PKEY_verify), to separate RSA from token handling.
    let raw = {
        let n = rsa_public.parameter("n").unwrap().as_str().unwrap();
        let e = rsa_public.parameter("e").unwrap().as_str().unwrap();
        let check = access::auth::rsa::RsaVerifier::from_components("RS256", n, e).unwrap();
        let signatures: Vec<(String, Vec<u8>)> = rsa_tokens[..200]
            .iter()
            .map(|t| {
                let (input, sig) = t.rsplit_once('.').unwrap();
                use base64::Engine;
                (
                    input.to_string(),
                    base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(sig).unwrap(),
                )
            })
            .collect();
        let start = Instant::now();
        let mut n = 0;
        while start.elapsed() < Duration::from_secs(2) {
            let (input, sig) = &signatures[n % signatures.len()];
            assert!(check.verify(input.as_bytes(), sig));
            n += 1;
        }
        n as f64 / start.elapsed().as_secs_f64()
    };
    let openssl_rsa = openssl_verify_rate("rsa2048");
    let openssl_ec = openssl_verify_rate("ecdsap256");
    let show = |v: Option<f64>| {
        v.map(|v| format!("{v:>12.0}")).unwrap_or_else(|| format!("{:>12}", "n/a"))
    };
    let ratio = |ours: f64, raw: Option<f64>| {
        raw.map(|r| format!("{:.2}", ours / r)).unwrap_or_else(|| "n/a".into())
    };
    println!();
    println!("verifications per second, one core (tokio current-thread runtime); cold = {COLD_TOKENS} distinct tokens of {USERS} users, median of 9 passes over a running verifier whose cache is emptied before each");
    println!("{:<34} {:>12} {:>12} {:>9}", "case", "ours/s", "openssl/s", "ratio");
    println!(
        "{:<34} {:>12.0} {} {:>9}",
        "RS256 cold (2048-bit)",
        rs_cold,
        show(openssl_rsa),
        ratio(rs_cold, openssl_rsa)
    );
    println!(
        "{:<34} {:>12.0} {} {:>9}",
        "  RS256 cold, a new verifier a pass",
        rs_fresh,
        show(openssl_rsa),
        ratio(rs_fresh, openssl_rsa)
    );
    println!(
        "{:<34} {:>12.0} {} {:>9}",
        "  RS256 signature check only",
        raw,
        show(openssl_rsa),
        ratio(raw, openssl_rsa)
    );
    println!(
        "{:<34} {:>12.0} {} {:>9}",
        "ES256 cold (P-256)",
        es_cold,
        show(openssl_ec),
        ratio(es_cold, openssl_ec)
    );
    println!("{:<34} {:>12.0} {:>12} {:>9}", "RS256 cached", rs_cached, "", "");
    println!("{:<34} {:>12.0} {:>12} {:>9}", "ES256 cached", es_cached, "", "");
}
