//! A small real identity provider for tests: a JWKS over HTTP from generated RSA and EC keys, a
//! client-credentials token endpoint, and switches for rotation and outage.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use josekit::jwk::{Jwk, KeyPair};
use josekit::jws::{JwsHeader, JwsSigner, ES256, RS256};
use josekit::jwt::{self, JwtPayload};
use serde_json::{json, Value};

pub const ISSUER: &str = "https://idp.test/realms/254carbon";
pub const AUDIENCE: &str = "access";

/// A signing key the IdP may publish.
pub struct Key {
    pub kid: String,
    pub signer: Box<dyn JwsSigner>,
    pub public: Jwk,
}

impl Key {
    pub fn rsa(kid: &str) -> Key {
        let pair = RS256.generate_key_pair(2048).unwrap();
        let mut public = pair.to_jwk_public_key();
        public.set_key_id(kid);
        public.set_algorithm("RS256");
        public.set_key_use("sig");
        // No kid on the signer: josekit would write it over the header's, and tests need to
        // sign with one key while naming another.
        let private = pair.to_jwk_private_key();
        Key { kid: kid.into(), signer: Box::new(RS256.signer_from_jwk(&private).unwrap()), public }
    }

    pub fn ec(kid: &str) -> Key {
        let pair = ES256.generate_key_pair().unwrap();
        let mut public = pair.to_jwk_public_key();
        public.set_key_id(kid);
        public.set_algorithm("ES256");
        public.set_key_use("sig");
        let private = pair.to_jwk_key_pair();
        Key { kid: kid.into(), signer: Box::new(ES256.signer_from_jwk(&private).unwrap()), public }
    }

    /// Signs `claims` with this key, naming `kid` in the header.
    pub fn sign_as(&self, kid: &str, claims: &Value) -> String {
        let mut header = JwsHeader::new();
        header.set_token_type("JWT");
        header.set_key_id(kid);
        let payload = JwtPayload::from_map(claims.as_object().unwrap().clone()).unwrap();
        jwt::encode_with_signer(&payload, &header, self.signer.as_ref()).unwrap()
    }

    pub fn sign(&self, claims: &Value) -> String {
        self.sign_as(&self.kid, claims)
    }
}

pub fn now() -> u64 {
    access::auth::unix_now()
}

/// Claims of a good token for `sub`, with `patch` applied (a null removes a claim).
pub fn claims(sub: &str, patch: Value) -> Value {
    let mut c = json!({
        "sub": sub, "iss": ISSUER, "aud": [AUDIENCE], "azp": AUDIENCE, "tenant_id": "t1",
        "exp": now() + 600, "iat": now() - 5, "realm_access": {"roles": ["trader"]},
        "preferred_username": sub, "email": format!("{sub}@example.com"),
    });
    for (k, v) in patch.as_object().unwrap() {
        if v.is_null() {
            c.as_object_mut().unwrap().remove(k);
        } else {
            c[k] = v.clone();
        }
    }
    c
}

#[derive(Default)]
struct Shared {
    keys: Mutex<Vec<Jwk>>,
    down: AtomicBool,
    jwks_fetches: AtomicUsize,
    token_fetches: AtomicUsize,
    token_lifetime: AtomicUsize,
}

/// The IdP under test.
#[derive(Clone)]
pub struct Idp {
    pub url: String,
    shared: Arc<Shared>,
}

impl Idp {
    pub async fn start(keys: &[&Key]) -> Idp {
        let shared = Arc::new(Shared::default());
        *shared.keys.lock().unwrap() = keys.iter().map(|k| k.public.clone()).collect();
        shared.token_lifetime.store(60, Ordering::SeqCst);
        let app = Router::new()
            .route("/certs", get(certs))
            .route("/token", post(token))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Idp { url, shared }
    }

    pub fn jwks_url(&self) -> String {
        format!("{}/certs", self.url)
    }

    pub fn publish(&self, key: &Key) {
        self.shared.keys.lock().unwrap().push(key.public.clone());
    }

    pub fn set_down(&self, down: bool) {
        self.shared.down.store(down, Ordering::SeqCst);
    }

    pub fn jwks_fetches(&self) -> usize {
        self.shared.jwks_fetches.load(Ordering::SeqCst)
    }

    pub fn token_fetches(&self) -> usize {
        self.shared.token_fetches.load(Ordering::SeqCst)
    }

    pub fn set_token_lifetime(&self, seconds: usize) {
        self.shared.token_lifetime.store(seconds, Ordering::SeqCst);
    }
}

async fn certs(State(s): State<Arc<Shared>>) -> Response {
    s.jwks_fetches.fetch_add(1, Ordering::SeqCst);
    if s.down.load(Ordering::SeqCst) {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    let keys: Vec<Value> =
        s.keys.lock().unwrap().iter().map(|k| Value::Object(k.as_ref().clone())).collect();
    Json(json!({ "keys": keys })).into_response()
}

async fn token(State(s): State<Arc<Shared>>, body: String) -> Response {
    let n = s.token_fetches.fetch_add(1, Ordering::SeqCst);
    let form: std::collections::HashMap<String, String> =
        url::form_urlencoded::parse(body.as_bytes()).into_owned().collect();
    if form.get("grant_type").map(String::as_str) != Some("client_credentials")
        || form.get("client_id").map(String::as_str) != Some("gateway")
        || form.get("client_secret").map(String::as_str) != Some("s3cret")
    {
        return (StatusCode::UNAUTHORIZED, Json(json!({"error": "invalid_client"})))
            .into_response();
    }
    Json(json!({
        "access_token": format!("token-{n}"),
        "token_type": "Bearer",
        "expires_in": s.token_lifetime.load(Ordering::SeqCst),
    }))
    .into_response()
}
