//! Secret-bearing config values whose `Debug`, `Display` and `Serialize` redact them.
//!
//! A secret is only readable through `expose()`, so every place that touches the real value is
//! greppable. URLs and DSNs keep their non-secret parts visible (host, port, database) because an
//! operator debugging a connection needs them; only the password is replaced.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use url::Url;

/// What a redacted value prints as.
pub const REDACTED: &str = "***";

/// A secret string: a password, a client secret, a DSN.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The real value. Never log or format what this returns.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(REDACTED)
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret)
    }
}

/// A URL that may carry a password (`redis://:pw@host:6379/0`). Prints with the password redacted.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretUrl(Url);

impl SecretUrl {
    /// The real URL, password included. Never log or format what this returns.
    pub fn expose(&self) -> &Url {
        &self.0
    }

    /// The URL with its password replaced by `***`: safe for logs and errors.
    pub fn redacted(&self) -> String {
        redact_url(&self.0)
    }
}

impl From<Url> for SecretUrl {
    fn from(url: Url) -> Self {
        SecretUrl(url)
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl Serialize for SecretUrl {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.redacted())
    }
}

impl<'de> Deserialize<'de> for SecretUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        // The parse error is about the shape only; it never echoes the input (which may hold a
        // password).
        Url::parse(&raw)
            .map(SecretUrl)
            .map_err(|e| serde::de::Error::custom(format!("not a valid URL: {e}")))
    }
}

/// A URL with any password replaced by `***`.
pub fn redact_url(url: &Url) -> String {
    // A Redis Sentinel URL carries the sentinels' password in its query.
    let query_secret = |key: &str| key.eq_ignore_ascii_case("sentinelpassword");
    let secret_query = url.query_pairs().any(|(k, _)| query_secret(&k));
    if url.password().is_none() && !secret_query {
        return url.to_string();
    }
    let mut shown = url.clone();
    if url.password().is_some() {
        // Only fails for cannot-be-a-base URLs, which have no password to hide.
        let _ = shown.set_password(Some(REDACTED));
    }
    if secret_query {
        let pairs: Vec<(String, String)> = url
            .query_pairs()
            .map(|(k, v)| {
                let v = if query_secret(&k) { REDACTED.to_string() } else { v.into_owned() };
                (k.into_owned(), v)
            })
            .collect();
        shown.query_pairs_mut().clear().extend_pairs(pairs);
    }
    shown.to_string()
}

/// A PostgreSQL DSN (URL or `key=value` form) with its password redacted.
pub fn redact_dsn(dsn: &str) -> String {
    if let Ok(url) = Url::parse(dsn) {
        if url.has_host() {
            return redact_url(&url);
        }
    }
    dsn.split_whitespace()
        .map(|pair| match pair.split_once('=') {
            Some((key, _)) if key.eq_ignore_ascii_case("password") => format!("{key}={REDACTED}"),
            _ => pair.to_string(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_print() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?}"), REDACTED);
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"***\"");
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn urls_keep_their_host_but_not_their_password() {
        let u: SecretUrl = serde_json::from_str("\"redis://:hunter2@cache:6379/0\"").unwrap();
        for shown in [format!("{u:?}"), format!("{u}"), serde_json::to_string(&u).unwrap()] {
            assert!(!shown.contains("hunter2"), "{shown}");
            assert!(shown.contains("cache:6379"), "{shown}");
        }
        assert_eq!(u.expose().password(), Some("hunter2"));
        let sentinel: SecretUrl = serde_json::from_str(
            "\"redis-sentinel://:hunter2@s1:26379?sentinelServiceName=main&sentinelPassword=hunter3&node=s2:26379\"",
        )
        .unwrap();
        let shown = sentinel.redacted();
        assert!(!shown.contains("hunter2") && !shown.contains("hunter3"), "{shown}");
        assert!(shown.contains("sentinelServiceName=main") && shown.contains("node=s2"), "{shown}");
    }

    #[test]
    fn dsns_in_both_forms_are_redacted() {
        assert_eq!(
            redact_dsn("postgres://access:hunter2@db:5432/access?sslmode=require"),
            "postgres://access:***@db:5432/access?sslmode=require"
        );
        assert_eq!(
            redact_dsn("host=db user=access password=hunter2 dbname=access"),
            "host=db user=access password=*** dbname=access"
        );
    }
}
