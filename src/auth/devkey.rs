//! The dev signing key: one ES256 key in a file, shared by every `access` process on a machine so
//! separate processes agree (dev mode only; `ACCESS_ENV=production` refuses it).
//!
//! Created atomically by whichever process needs it first: the key is written to a private
//! temporary file and hard-linked into place, which fails if another process won the race, in
//! which case that process's key is read instead.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use josekit::jwk::{Jwk, KeyPair};
use josekit::jws::alg::ecdsa::EcdsaJwsSigner;
use josekit::jws::{JwsHeader, ES256};
use josekit::jwt::{self, JwtPayload};
use serde_json::{json, Map, Value};
use sha2::Digest;

use super::jwks::KeySet;
use super::unix_now;

/// The issuer of dev tokens when `auth.issuer` is not set.
pub const DEV_ISSUER: &str = "access-dev";

/// Why the dev key could not be read, created or used.
#[derive(Debug, thiserror::Error)]
pub enum DevKeyError {
    /// The key file could not be read, created or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The key file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file holds no usable key: `what` says which reading failed (not a P-256 PEM key,
    /// not a JWK, not an ES256 key).
    #[error("{}: {what}: {source}", path.display())]
    NotAKey {
        /// The key file.
        path: PathBuf,
        /// What the file is not.
        what: &'static str,
        /// The cause.
        #[source]
        source: josekit::JoseError,
    },
    /// No key could be generated for a new file.
    #[error("{}: {source}", path.display())]
    Generate {
        /// The key file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: josekit::JoseError,
    },
    /// josekit refused to derive the public half or to sign.
    #[error("{0}")]
    Jose(#[from] josekit::JoseError),
}

/// The dev key: its signer and its public JWK.
pub struct DevKey {
    path: PathBuf,
    signer: EcdsaJwsSigner,
    public: Jwk,
}

impl std::fmt::Debug for DevKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevKey")
            .field("path", &self.path)
            .field("kid", &self.kid())
            .finish_non_exhaustive()
    }
}

/// A P-256 private key in PEM (as Helm's `genPrivateKey "ecdsa"` makes for the chart's dev-key
/// Secret), as a JWK whose key id is derived from the public key, so every process agrees on it.
fn pem_key(pem: &[u8]) -> Result<Jwk, josekit::JoseError> {
    let pair = ES256.key_pair_from_pem(pem)?;
    let mut jwk = pair.to_jwk_key_pair();
    let public = jwk.to_public_key()?;
    let thumb = |k: &str| public.parameter(k).and_then(|v| v.as_str()).unwrap_or("").to_string();
    let digest = sha2::Sha256::digest(format!("{}.{}", thumb("x"), thumb("y")).as_bytes());
    jwk.set_key_id(format!("dev-{}", &hex::encode(digest)[..16]));
    Ok(jwk)
}

/// The configuration problem of `auth.dev_key_file`, if the file exists and is not a dev key
/// (`access check-config` reports it with the other problems).
pub fn config_problems(auth: &crate::config::AuthConfig) -> Vec<crate::config::Problem> {
    match &auth.dev_key_file {
        Some(path) if path.exists() => match DevKey::load_or_create(path) {
            Ok(_) => Vec::new(),
            Err(e) => vec![crate::config::Problem::new("auth.dev_key_file", e.to_string())],
        },
        _ => Vec::new(),
    }
}

impl DevKey {
    /// Reads the key at `path`, creating it first if there is none.
    pub fn load_or_create(path: &Path) -> Result<DevKey, DevKeyError> {
        if !path.exists() {
            create(path)?;
        }
        let not_a =
            |what| move |source| DevKeyError::NotAKey { path: path.to_path_buf(), what, source };
        let bytes = std::fs::read(path)
            .map_err(|source| DevKeyError::Io { path: path.to_path_buf(), source })?;
        let private = if bytes.starts_with(b"-----BEGIN") {
            pem_key(&bytes).map_err(not_a("not a P-256 PEM key"))?
        } else {
            Jwk::from_bytes(&bytes).map_err(not_a("not a JWK"))?
        };
        let signer = ES256.signer_from_jwk(&private).map_err(not_a("not an ES256 key"))?;
        let mut public = private.to_public_key()?;
        public.set_key_use("sig");
        public.set_algorithm("ES256");
        // josekit's public half drops the key id; tokens name the key by it.
        if let Some(kid) = private.key_id() {
            public.set_key_id(kid);
        }
        Ok(DevKey { path: path.to_path_buf(), signer, public })
    }

    /// The key id.
    pub fn kid(&self) -> Option<&str> {
        self.public.key_id()
    }

    /// Where the key lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The public JWKS document (`/.well-known/jwks.json`).
    pub fn jwks(&self) -> Value {
        json!({ "keys": [Value::Object(self.public.as_ref().clone())] })
    }

    /// The key set verifiers use in dev mode.
    pub fn key_set(&self) -> KeySet {
        KeySet::from_jwks(self.jwks().to_string().as_bytes(), &["ES256".to_string()])
            .unwrap_or_default()
    }

    /// Signs these claims as a JWT.
    pub fn sign(&self, claims: Map<String, Value>) -> Result<String, DevKeyError> {
        let payload = JwtPayload::from_map(claims)?;
        let mut header = JwsHeader::new();
        header.set_token_type("JWT");
        if let Some(kid) = self.kid() {
            header.set_key_id(kid);
        }
        Ok(jwt::encode_with_signer(&payload, &header, &self.signer)?)
    }

    /// A token for `subject` in `tenant` with `roles`, valid for `ttl`.
    pub fn issue(&self, request: &TokenRequest<'_>) -> Result<String, DevKeyError> {
        let now = unix_now();
        let mut claims = Map::new();
        claims.insert("sub".into(), json!(request.subject));
        claims.insert("tenant_id".into(), json!(request.tenant));
        claims.insert("roles".into(), json!(request.roles));
        claims.insert("iss".into(), json!(request.issuer.unwrap_or(DEV_ISSUER)));
        if let Some(aud) = request.audience {
            claims.insert("aud".into(), json!(aud));
            claims.insert("azp".into(), json!(aud));
        }
        claims.insert("iat".into(), json!(now));
        claims.insert("exp".into(), json!(now + request.ttl.as_secs()));
        claims.insert("jti".into(), json!(uuid::Uuid::new_v4().to_string()));
        self.sign(claims)
    }
}

/// What a dev token says.
#[derive(Debug, Clone)]
pub struct TokenRequest<'a> {
    /// `sub`.
    pub subject: &'a str,
    /// `tenant_id`.
    pub tenant: &'a str,
    /// `roles`.
    pub roles: &'a [String],
    /// Lifetime.
    pub ttl: Duration,
    /// `iss`; the dev issuer when `None`.
    pub issuer: Option<&'a str>,
    /// `aud` and `azp`.
    pub audience: Option<&'a str>,
}

fn create(path: &Path) -> Result<(), DevKeyError> {
    let err = |source| DevKeyError::Io { path: path.to_path_buf(), source };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let pair = ES256
        .generate_key_pair()
        .map_err(|source| DevKeyError::Generate { path: path.to_path_buf(), source })?;
    let mut jwk = pair.to_jwk_key_pair();
    jwk.set_key_id(format!("dev-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]));
    jwk.set_algorithm("ES256");
    jwk.set_key_use("sig");
    let tmp = path.with_extension(format!(
        "tmp.{}.{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    ));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(&tmp).map_err(err)?;
    let written = file
        .write_all(jwk.to_string().as_bytes())
        .and_then(|_| file.sync_all())
        .and_then(|_| match std::fs::hard_link(&tmp, path) {
            Ok(()) => Ok(()),
            // Another process created it first: theirs is the key.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(e),
        })
        .map_err(err);
    let _ = std::fs::remove_file(&tmp);
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn racing_processes_end_up_with_one_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/dev-key.json");
        let kids: Vec<String> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    s.spawn(|| DevKey::load_or_create(&path).unwrap().kid().unwrap().to_string())
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(kids.windows(2).all(|w| w[0] == w[1]), "{kids:?}");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
        let leftovers = std::fs::read_dir(path.parent().unwrap()).unwrap().count();
        assert_eq!(leftovers, 1, "no temporary files left behind");
    }

    #[test]
    fn a_pem_key_from_the_charts_secret_signs_tokens_every_process_accepts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dev-key.pem");
        // What Helm's genPrivateKey "ecdsa" writes: a SEC1 P-256 key.
        let key = openssl::ec::EcKey::generate(
            &openssl::ec::EcGroup::from_curve_name(openssl::nid::Nid::X9_62_PRIME256V1).unwrap(),
        )
        .unwrap();
        std::fs::write(&path, key.private_key_to_pem().unwrap()).unwrap();
        let one = DevKey::load_or_create(&path).unwrap();
        let two = DevKey::load_or_create(&path).unwrap();
        assert_eq!(one.kid(), two.kid(), "the key id comes from the key");
        assert!(one.kid().unwrap().starts_with("dev-"));
        let token = one
            .issue(&TokenRequest {
                subject: "a",
                tenant: "t",
                roles: &[],
                ttl: Duration::from_secs(60),
                issuer: None,
                audience: None,
            })
            .unwrap();
        let header = token.split('.').next().unwrap();
        let header: Value = serde_json::from_slice(
            &base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, header)
                .unwrap(),
        )
        .unwrap();
        assert_eq!(header["kid"].as_str(), two.kid());
        std::fs::write(&path, "-----BEGIN nonsense").unwrap();
        assert!(DevKey::load_or_create(&path).unwrap_err().to_string().contains("PEM"));
    }

    #[test]
    fn the_published_key_holds_no_private_part() {
        let dir = tempfile::tempdir().unwrap();
        let key = DevKey::load_or_create(&dir.path().join("k.json")).unwrap();
        let jwks = key.jwks();
        assert!(jwks["keys"][0].get("d").is_none(), "{jwks}");
        assert_eq!(jwks["keys"][0]["kid"].as_str(), key.kid());
        assert!(key.kid().is_some_and(|k| k.starts_with("dev-")));
        assert!(key.key_set().verifier(key.kid(), "ES256").is_some());
    }
}
