//! RS256/RS384/RS512 signature checks with reused OpenSSL contexts.
//!
//! josekit verifies through `EVP_DigestVerify*`, building a fresh context per call; with OpenSSL 3
//! that set-up costs about as much as the RSA operation itself. Here each key keeps a small pool
//! of contexts initialised once (`EVP_PKEY_verify` with PKCS#1 v1.5 padding and the digest set),
//! and a check is: hash the signing input, take a context, verify the digest, put it back.

use std::sync::Mutex;

use base64::Engine;
use openssl::bn::BigNum;
use openssl::hash::MessageDigest;
use openssl::md::{Md, MdRef};
use openssl::pkey::{PKey, Public};
use openssl::pkey_ctx::PkeyCtx;
use openssl::rsa::{Padding, Rsa};

/// A pooled RSA PKCS#1 v1.5 verifier for one key and one hash.
pub struct RsaVerifier {
    key: PKey<Public>,
    digest: MessageDigest,
    md: &'static MdRef,
    /// Ready contexts. A std mutex held only to pop or push one; at most `POOL` are kept, so the
    /// pool is bounded by the peak concurrency it has seen.
    pool: Mutex<Vec<PkeyCtx<Public>>>,
}

const POOL: usize = 64;

impl RsaVerifier {
    /// A verifier for `RS256`, `RS384` or `RS512` from a JWK's `n` and `e` (base64url).
    pub fn from_components(alg: &str, n: &str, e: &str) -> Option<Self> {
        let (digest, md) = match alg {
            "RS256" => (MessageDigest::sha256(), Md::sha256()),
            "RS384" => (MessageDigest::sha384(), Md::sha384()),
            "RS512" => (MessageDigest::sha512(), Md::sha512()),
            _ => return None,
        };
        let b64 = &base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let n = BigNum::from_slice(&b64.decode(n).ok()?).ok()?;
        let e = BigNum::from_slice(&b64.decode(e).ok()?).ok()?;
        let rsa = Rsa::from_public_components(n, e).ok()?;
        // Keys under 2048 bits are not accepted (RFC 7518 section 3.3).
        if rsa.size() < 256 {
            return None;
        }
        let key = PKey::from_rsa(rsa).ok()?;
        Some(RsaVerifier { key, digest, md, pool: Mutex::new(Vec::new()) })
    }

    fn context(&self) -> Result<PkeyCtx<Public>, openssl::error::ErrorStack> {
        if let Some(ctx) = self.pool.lock().unwrap_or_else(|p| p.into_inner()).pop() {
            return Ok(ctx);
        }
        let mut ctx = PkeyCtx::new(&self.key)?;
        ctx.verify_init()?;
        ctx.set_rsa_padding(Padding::PKCS1)?;
        ctx.set_signature_md(self.md)?;
        Ok(ctx)
    }

    /// Whether `signature` is this key's signature over `message`.
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        let Ok(digest) = openssl::hash::hash(self.digest, message) else { return false };
        let Ok(mut ctx) = self.context() else { return false };
        let valid = ctx.verify(&digest, signature).unwrap_or(false);
        // A failed verification leaves errors on OpenSSL's thread-local queue; clear them.
        let _ = openssl::error::ErrorStack::get();
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        if pool.len() < POOL {
            pool.push(ctx);
        }
        valid
    }
}

#[cfg(test)]
mod tests {
    use josekit::jwk::KeyPair;
    use josekit::jws::{JwsSigner, RS256};

    use super::*;

    #[test]
    fn agrees_with_josekit_on_good_and_bad_signatures() {
        let pair = RS256.generate_key_pair(2048).unwrap();
        let public = pair.to_jwk_public_key();
        let n = public.parameter("n").unwrap().as_str().unwrap();
        let e = public.parameter("e").unwrap().as_str().unwrap();
        let ours = RsaVerifier::from_components("RS256", n, e).unwrap();
        let signer = RS256.signer_from_jwk(&pair.to_jwk_private_key()).unwrap();
        let signature = signer.sign(b"header.payload").unwrap();
        for _ in 0..3 {
            assert!(ours.verify(b"header.payload", &signature));
            assert!(!ours.verify(b"header.payloae", &signature));
        }
        let mut flipped = signature.clone();
        flipped[10] ^= 1;
        assert!(!ours.verify(b"header.payload", &flipped));
        assert!(!ours.verify(b"header.payload", &signature[..100]));
        assert!(RsaVerifier::from_components("RS256", "AQAB", e).is_none(), "tiny keys refused");
    }
}
