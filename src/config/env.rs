//! A figment provider over an `ACCESS_*` environment map that the caller passes in.
//!
//! figment's own `Env` reads the process environment; ours takes a map so tests never mutate
//! `std::env`. `ACCESS_A__B=v` becomes key `a.b`; values are parsed like figment's (`8000` is a
//! number, `true` a bool, `[a, b]` an array) except secrets, which stay strings. A secret key may
//! instead come from a file named by `ACCESS_<KEY>_FILE`.

use std::collections::BTreeMap;

use figment::value::{Dict, Map, Value};
use figment::{Error, Metadata, Profile, Provider};

use super::Problem;

/// The prefix of every variable we read.
pub const PREFIX: &str = "ACCESS_";

/// Keys holding secrets: kept as strings, and readable from `<VAR>_FILE`.
pub const SECRET_KEYS: &[&str] =
    &["redis_url", "postgres_dsn", "kafka.sasl_password", "auth.client_secret"];

/// The environment variable of a dotted key: `gateway.port` -> `ACCESS_GATEWAY__PORT`.
pub fn var_name(key: &str) -> String {
    format!("{PREFIX}{}", key.replace('.', "__").to_uppercase())
}

/// The `ACCESS_*` variables as a figment provider.
pub struct EnvProvider {
    dict: Dict,
}

impl EnvProvider {
    /// Builds the provider, reading `_FILE` secrets; problems (unreadable file, a secret given
    /// both ways) are returned with their keys.
    pub fn new(env: &BTreeMap<String, String>) -> (Self, Vec<Problem>) {
        let mut dict = Dict::new();
        let mut problems = Vec::new();
        for (name, raw) in env {
            let Some(rest) = name.strip_prefix(PREFIX) else { continue };
            if rest.is_empty() {
                continue;
            }
            let key = rest.to_lowercase().replace("__", ".");
            if let Some(base) = key.strip_suffix("_file").filter(|b| SECRET_KEYS.contains(b)) {
                if env.contains_key(&var_name(base)) {
                    problems.push(Problem::new(
                        base,
                        format!("set both {} and {name}", var_name(base)),
                    ));
                    continue;
                }
                match std::fs::read_to_string(raw) {
                    Ok(secret) => {
                        insert(&mut dict, base, Value::from(secret.trim_end().to_string()))
                    }
                    Err(e) => {
                        problems.push(Problem::new(base, format!("cannot read {name}={raw}: {e}")))
                    }
                }
                continue;
            }
            let value = if SECRET_KEYS.contains(&key.as_str()) {
                Value::from(raw.clone())
            } else {
                raw.parse::<Value>().unwrap_or_else(|never| match never {})
            };
            insert(&mut dict, &key, value);
        }
        (EnvProvider { dict }, problems)
    }
}

/// Inserts `value` at a dotted path, creating the dictionaries on the way.
fn insert(dict: &mut Dict, key: &str, value: Value) {
    match key.split_once('.') {
        None => {
            dict.insert(key.to_string(), value);
        }
        Some((head, tail)) => {
            let entry = dict.entry(head.to_string()).or_insert_with(|| Value::from(Dict::new()));
            if !matches!(entry, Value::Dict(..)) {
                *entry = Value::from(Dict::new());
            }
            if let Value::Dict(_, inner) = entry {
                insert(inner, tail, value);
            }
        }
    }
}

impl Provider for EnvProvider {
    fn metadata(&self) -> Metadata {
        Metadata::named("environment variable")
            .interpolater(|_profile: &Profile, keys: &[&str]| var_name(&keys.join(".")))
    }

    fn data(&self) -> Result<Map<Profile, Dict>, Error> {
        Ok(Profile::Default.collect(self.dict.clone()))
    }
}
