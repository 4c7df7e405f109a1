//! Typed configuration, layered with figment and validated in full at start-up.
//!
//! Layers, later winning: built-in defaults (`Default` impls) -> an optional TOML or YAML file ->
//! `ACCESS_*` environment variables -> CLI flags. The loader takes every source as an argument
//! ([`Sources`]) so tests never touch the process environment.
//!
//! Environment keys nest with `__` (`ACCESS_SERVER__GRACE_PERIOD=5s` is `server.grace_period`), so
//! the operators' flat names (`ACCESS_REDIS_URL`) are simply top-level keys. A secret key can
//! instead be read from a file named by `<KEY>_FILE` (`ACCESS_POSTGRES_DSN_FILE`), as Kubernetes
//! mounts Secrets. Every problem is reported with the key that caused it ([`Problem`]): unknown keys,
//! values of the wrong type, and the semantic checks of [`Config::validate`].

mod env;
pub mod secret;
mod sections;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use figment::providers::{Format, Serialized, Toml, Yaml};
use figment::value::{Dict, Value};
use figment::{Figment, Provider};
use serde::{Deserialize, Serialize};
use url::Url;

pub use secret::{Secret, SecretUrl};
pub use sections::*;

/// The configuration every role shares: backends, identity, the server's limits, telemetry. The
/// roles' own sections are added by `roles::Settings` ([`Sections`]), which this module does
/// not know.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Config {
    /// Deployment environment; `production` forbids the embedded backends and dev keys.
    pub env: Environment,
    /// `tracing` filter directive (`info`, `access=debug,info`).
    pub log_level: LogLevel,
    /// Log line format: `json` (default) or `text` for humans at a terminal.
    pub log_format: LogFormat,
    /// Redis (`redis://` or `rediss://`, password allowed; `redis-sentinel://`,
    /// `redis-cluster://`: `docs/configuration.md`). Unset: in-process maps.
    pub redis_url: Option<SecretUrl>,
    /// PostgreSQL DSN (URL or key=value; `sslmode=require` honoured). Unset: in-memory store.
    pub postgres_dsn: Option<Secret>,
    /// Kafka bootstrap brokers, `host:port`, a list or a comma-separated string. Unset:
    /// in-process bus.
    pub kafka_bootstrap: Vec<String>,
    /// The IdP's JWKS endpoint (Keycloak: `.../realms/<realm>/protocol/openid-connect/certs`).
    /// Unset: dev mode with a local signing key.
    pub jwks_url: Option<Url>,
    /// Where callers outside the layer reach the auth role.
    pub auth_service_url: Option<Url>,
    /// Where the gateway and stream reach the entitlements role.
    pub entitlements_service_url: Option<Url>,
    /// Where the gateway and stream push usage.
    pub metrics_service_url: Option<Url>,
    /// Export OpenTelemetry traces to `otel_exporter`.
    pub enable_tracing: bool,
    /// OTLP/HTTP traces endpoint (`http://collector:4318/v1/traces`).
    pub otel_exporter: Option<Url>,
    /// What every listener shares: limits, timeouts, shutdown.
    pub server: ServerConfig,
    /// PostgreSQL pool settings.
    pub postgres: PostgresConfig,
    /// Redis client settings.
    pub redis: RedisConfig,
    /// Kafka client settings (TLS, SASL).
    pub kafka: KafkaConfig,
    /// The `auth` section every role reads, and the auth role's port.
    pub auth: AuthConfig,
}

/// A whole configuration: the shared [`Config`] and the sections a program adds to it, loaded
/// and checked together by [`load`]. `Config` alone is one (no sections of its own).
pub trait Sections: Serialize + Sized {
    /// Every key at its default (what `load` knows as keys, and what stands in for a bad value).
    fn defaults() -> Self;
    /// The whole configuration from the shared part and the sections taken from `from`.
    fn extract(shared: Config, from: &mut Extract<'_>) -> Self;
    /// Semantic checks of everything, the shared part included; every problem names its key.
    fn validate(&self) -> Vec<Problem>;
    /// Keys whose values are open maps (user-chosen names), not checked key by key.
    fn open_maps() -> &'static [&'static str] {
        &[]
    }
}

impl Sections for Config {
    fn defaults() -> Self {
        Config::default()
    }
    fn extract(shared: Config, _: &mut Extract<'_>) -> Self {
        shared
    }
    fn validate(&self) -> Vec<Problem> {
        Config::validate(self)
    }
}

/// Takes sections out of the loaded layers, reporting each value of the wrong type (its default
/// then stands in).
pub struct Extract<'a> {
    figment: &'a Figment,
    problems: &'a mut Vec<Problem>,
}

impl Extract<'_> {
    /// The section (or top-level key) `key`, or `default` where it is missing or wrong.
    pub fn section<T: for<'de> Deserialize<'de>>(&mut self, key: &str, default: T) -> T {
        extract_reporting(self.figment, key, default, self.problems)
    }
}

impl Config {
    /// The Redis key prefix: `access:<env>:` (`docs/contracts.md`) unless `redis.prefix` is set.
    pub fn redis_prefix(&self) -> String {
        self.redis.prefix.clone().unwrap_or_else(|| format!("access:{}:", self.env.as_str()))
    }

    /// Semantic checks that types cannot express; every problem names its key.
    pub fn validate(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        if self.env == Environment::Production {
            let missing = [
                ("redis_url", self.redis_url.is_none()),
                ("postgres_dsn", self.postgres_dsn.is_none()),
                ("kafka_bootstrap", self.kafka_bootstrap.is_empty()),
                ("jwks_url", self.jwks_url.is_none()),
            ];
            for (key, is_missing) in missing {
                if is_missing {
                    problems.push(Problem::new(
                        key,
                        "required when ACCESS_ENV=production (the in-process default is for \
                         development only)",
                    ));
                }
            }
        }
        if let Some(url) = &self.redis_url {
            problems.extend(redis_url_problems(url.expose()));
        }
        if let Some(dsn) = &self.postgres_dsn {
            if let Err(e) = dsn.expose().parse::<tokio_postgres::Config>() {
                problems.push(Problem::new("postgres_dsn", format!("not a valid DSN: {e}")));
            }
        }
        for broker in &self.kafka_bootstrap {
            let valid = broker
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !valid {
                problems
                    .push(Problem::new("kafka_bootstrap", format!("{broker:?} is not host:port")));
            }
        }
        for (key, url) in [
            ("jwks_url", &self.jwks_url),
            ("auth_service_url", &self.auth_service_url),
            ("entitlements_service_url", &self.entitlements_service_url),
            ("metrics_service_url", &self.metrics_service_url),
            ("otel_exporter", &self.otel_exporter),
        ] {
            if let Some(url) = url {
                if !matches!(url.scheme(), "http" | "https") {
                    problems.push(Problem::new(key, "scheme must be http:// or https://"));
                }
            }
        }
        if self.enable_tracing && self.otel_exporter.is_none() {
            problems.push(Problem::new(
                "otel_exporter",
                "required when enable_tracing is true (an OTLP/HTTP traces URL)",
            ));
        }
        problems.extend(self.server.validate());
        problems.extend(self.kafka.validate());
        problems.extend(self.postgres.validate());
        problems.extend(self.redis.validate());
        problems.extend(self.auth.validate(self.env));
        problems
    }
}

/// A Redis URL names one server (`redis://`, `rediss://`), a primary found through Sentinel
/// (`redis-sentinel://`, `rediss-sentinel://`, which must name the primary's service), or a
/// Redis Cluster by some of its nodes (`redis-cluster://<node>:6379[?node=<node>:6379...]`,
/// `rediss-cluster://`; the others are discovered with `CLUSTER SLOTS`).
fn redis_url_problems(url: &Url) -> Vec<Problem> {
    let service = url.query_pairs().any(|(k, v)| k == "sentinelServiceName" && !v.is_empty());
    match url.scheme() {
        "redis" | "rediss" | "redis-cluster" | "rediss-cluster" => Vec::new(),
        "redis-sentinel" | "rediss-sentinel" if service => Vec::new(),
        "redis-sentinel" | "rediss-sentinel" => vec![Problem::new(
            "redis_url",
            "a Sentinel URL names the primary's service: \
             redis-sentinel://<sentinel>:26379?sentinelServiceName=<name>[&node=<sentinel>:26379]",
        )],
        _ => vec![Problem::new(
            "redis_url",
            "scheme must be redis://, rediss://, redis-sentinel://, rediss-sentinel://, \
             redis-cluster:// or rediss-cluster://",
        )],
    }
}

/// One configuration problem: the key (dotted path) and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// Dotted config path (`gateway.port`).
    pub key: String,
    /// What is wrong, for a human.
    pub message: String,
}

impl Problem {
    /// A problem with `key`.
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Problem { key: key.into(), message: message.into() }
    }

    /// The environment variable that sets this key (`ACCESS_GATEWAY__PORT`).
    pub fn env_var(&self) -> String {
        env::var_name(&self.key)
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}): {}", self.key, self.env_var(), self.message)
    }
}

/// Every problem found while loading; [`fmt::Display`] prints one per line.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigErrors(pub Vec<Problem>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

/// The sources a configuration is built from. `main` fills it from the process; tests build it.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// An optional TOML (`.toml`) or YAML (`.yaml`, `.yml`) file.
    pub file: Option<PathBuf>,
    /// Environment variables; only `ACCESS_*` ones are read.
    pub env: BTreeMap<String, String>,
    /// CLI flags as (dotted key, value), applied last.
    pub overrides: Vec<(String, Value)>,
}

impl Sources {
    /// Sources with this environment map.
    pub fn from_env<K: Into<String>, V: Into<String>>(
        env: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        Sources {
            env: env.into_iter().map(|(k, v)| (k.into(), v.into())).collect(),
            ..Sources::default()
        }
    }

    /// Adds a CLI override.
    pub fn with_override(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.overrides.push((key.to_string(), value.into()));
        self
    }
}

/// Loads, type-checks and validates the shared configuration and the sections of `S`, or returns
/// every problem found.
pub fn load<S: Sections>(sources: &Sources) -> Result<S, ConfigErrors> {
    let mut problems = Vec::new();
    let mut figment = Figment::new();
    if let Some(path) = &sources.file {
        match file_format(path) {
            Ok(FileFormat::Toml) => figment = figment.merge(Toml::file_exact(path)),
            Ok(FileFormat::Yaml) => figment = figment.merge(Yaml::file_exact(path)),
            Err(p) => problems.push(p),
        }
    }
    let (env_provider, env_problems) = env::EnvProvider::new(&sources.env);
    problems.extend(env_problems);
    figment = figment.merge(env_provider);
    for (key, value) in &sources.overrides {
        figment = figment.merge(Serialized::global(key, value.clone()));
    }

    // Unknown keys: everything provided must be a key the defaults know.
    match figment.data() {
        Ok(data) => {
            let known = Figment::from(Serialized::defaults(S::defaults()))
                .data()
                .ok()
                .and_then(|mut d| d.remove(&figment::Profile::Default))
                .unwrap_or_default();
            for data in data.values() {
                unknown_keys(data, &known, "", S::open_maps(), &mut problems);
            }
        }
        Err(e) => problems.extend(figment_problems(e, "")),
    }

    // Types: every value of the wrong type is reported and replaced by its default, so the
    // semantic checks still run on the rest.
    let mut shared = extract_sections(&figment, &mut problems);
    if shared.auth.dev_key_file.is_none() {
        shared.auth.dev_key_file = default_dev_key_file(&sources.env);
    }
    let config = S::extract(shared, &mut Extract { figment: &figment, problems: &mut problems });
    // A semantic check of a key already reported would only judge the default standing in for it.
    let reported: Vec<String> = problems.iter().map(|p| p.key.clone()).collect();
    let covered = |key: &str| {
        reported.iter().any(|r| {
            key == r || key.strip_prefix(r.as_str()).is_some_and(|rest| rest.starts_with('.'))
        })
    };
    problems.extend(config.validate().into_iter().filter(|p| !covered(&p.key)));
    if problems.is_empty() {
        Ok(config)
    } else {
        Err(ConfigErrors(problems))
    }
}

/// The dev key's default home: `$XDG_DATA_HOME/access/dev-key.json`, else
/// `$HOME/.local/share/access/dev-key.json`.
fn default_dev_key_file(env: &BTreeMap<String, String>) -> Option<PathBuf> {
    let data = match env.get("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env.get("HOME").filter(|h| !h.is_empty())?).join(".local/share"),
    };
    Some(data.join("access").join("dev-key.json"))
}

enum FileFormat {
    Toml,
    Yaml,
}

fn file_format(path: &Path) -> Result<FileFormat, Problem> {
    if !path.is_file() {
        return Err(Problem::new("--config", format!("{}: no such file", path.display())));
    }
    match path.extension().and_then(|e| e.to_str()) {
        Some("toml") => Ok(FileFormat::Toml),
        Some("yaml" | "yml") => Ok(FileFormat::Yaml),
        _ => Err(Problem::new(
            "--config",
            format!("{}: the file must end in .toml, .yaml or .yml", path.display()),
        )),
    }
}

fn unknown_keys(
    given: &Dict,
    known: &Dict,
    prefix: &str,
    open_maps: &[&str],
    problems: &mut Vec<Problem>,
) {
    for (key, value) in given {
        let path = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
        match known.get(key) {
            None => problems.push(Problem::new(path, "unknown key")),
            Some(Value::Dict(_, known_inner)) if !open_maps.contains(&path.as_str()) => {
                if let Value::Dict(_, inner) = value {
                    unknown_keys(inner, known_inner, &path, open_maps, problems);
                }
            }
            Some(_) => {}
        }
    }
}

/// Problems of a figment error chain.
fn figment_problems(error: figment::Error, section: &str) -> Vec<Problem> {
    error.into_iter().map(|e| figment_problem(&e, section, None).1).collect()
}

/// One figment error as a problem, with the error's path from the root. `extract_inner(section)`
/// appends the section to the error's path; `section` puts it back in front, where it belongs.
/// An unknown field is named by its own path. `origin` is the figment the value came from, when
/// the error came from a copy of it (which knows no sources).
fn figment_problem(
    e: &figment::Error,
    section: &str,
    origin: Option<&Figment>,
) -> (Vec<String>, Problem) {
    let section: Vec<String> =
        section.split('.').filter(|s| !s.is_empty()).map(String::from).collect();
    let mut path = e.path.clone();
    if !section.is_empty() && path.ends_with(&section) {
        path.truncate(path.len() - section.len());
        path.splice(0..0, section.iter().cloned());
    }
    let mut message = e.kind.to_string();
    if let figment::error::Kind::UnknownField(field, _) = &e.kind {
        path.push(field.clone());
        message = "unknown key".into();
    }
    let key = if path.is_empty() { "(root)".to_string() } else { path.join(".") };
    let source = e
        .metadata
        .as_ref()
        .and_then(|m| m.source.as_ref())
        .or_else(|| origin?.find_metadata(&key)?.source.as_ref());
    if let Some(source) = source {
        message = format!("{message} (from {source})");
    }
    (path, Problem::new(key, message))
}

/// Extracts `key` (a top-level key or section), reporting every value of the wrong type in it
/// and using the default for each. serde stops at the first bad value, so each pass reports the
/// value it stopped at and removes it from a copy of the section (its default then applies),
/// until the rest deserializes. The default of the whole key stands in when that cannot go on.
fn extract_reporting<T: for<'de> Deserialize<'de>>(
    figment: &Figment,
    key: &str,
    default: T,
    problems: &mut Vec<Problem>,
) -> T {
    if !figment.contains(key) {
        return default;
    }
    let mut error = match figment.extract_inner::<T>(key) {
        Ok(value) => return value,
        Err(e) => e,
    };
    let Ok(mut value) = figment.find_value(key) else {
        problems.extend(figment_problems(error, key));
        return default;
    };
    let depth = key.split('.').count();
    // Bounded: each pass removes one provided value, and a section has few.
    for _ in 0..256 {
        let mut removed = true;
        for e in error {
            let (path, problem) = figment_problem(&e, key, Some(figment));
            // An unknown key was already reported, by the pass that compares keys.
            let unknown = matches!(e.kind, figment::error::Kind::UnknownField(..));
            if !problems.iter().any(|p| p.key == problem.key && (unknown || *p == problem)) {
                problems.push(problem);
            }
            removed &= path.len() > depth && remove_path(&mut value, &path[depth..]);
        }
        if !removed {
            return default;
        }
        error = match Figment::from(Serialized::global(key, &value)).extract_inner::<T>(key) {
            Ok(value) => return value,
            Err(e) => e,
        };
    }
    default
}

/// Removes the value at `path` below `value`; whether there was one.
fn remove_path(value: &mut Value, path: &[String]) -> bool {
    let Value::Dict(_, dict) = value else { return false };
    match path {
        [] => false,
        [last] => dict.remove(last).is_some(),
        [head, rest @ ..] => dict.get_mut(head).is_some_and(|inner| remove_path(inner, rest)),
    }
}

/// Extracts each shared top-level key and section on its own, so that one bad value does not
/// hide the problems of the others: every value of the wrong type is in `problems`, its default
/// in the result.
fn extract_sections(figment: &Figment, problems: &mut Vec<Problem>) -> Config {
    let d = Config::default();
    let env = extract_reporting(figment, "env", d.env, problems);
    let log_level = extract_reporting(figment, "log_level", d.log_level, problems);
    let log_format = extract_reporting(figment, "log_format", d.log_format, problems);
    let redis_url = extract_reporting(figment, "redis_url", d.redis_url, problems);
    let postgres_dsn = extract_reporting(figment, "postgres_dsn", d.postgres_dsn, problems);
    let kafka_bootstrap =
        extract_reporting(figment, "kafka_bootstrap", StringOrList::default(), problems);
    let jwks_url = extract_reporting(figment, "jwks_url", d.jwks_url, problems);
    let auth_service_url =
        extract_reporting(figment, "auth_service_url", d.auth_service_url, problems);
    let entitlements_service_url = extract_reporting(
        figment,
        "entitlements_service_url",
        d.entitlements_service_url,
        problems,
    );
    let metrics_service_url =
        extract_reporting(figment, "metrics_service_url", d.metrics_service_url, problems);
    let enable_tracing = extract_reporting(figment, "enable_tracing", d.enable_tracing, problems);
    let otel_exporter = extract_reporting(figment, "otel_exporter", d.otel_exporter, problems);
    let server = extract_reporting(figment, "server", d.server, problems);
    let postgres = extract_reporting(figment, "postgres", d.postgres, problems);
    let redis = extract_reporting(figment, "redis", d.redis, problems);
    let kafka = extract_reporting(figment, "kafka", d.kafka, problems);
    let auth = extract_reporting(figment, "auth", d.auth, problems);
    Config {
        env,
        log_level,
        log_format,
        redis_url,
        postgres_dsn,
        kafka_bootstrap: kafka_bootstrap.0,
        jwks_url,
        auth_service_url,
        entitlements_service_url,
        metrics_service_url,
        enable_tracing,
        otel_exporter,
        server,
        postgres,
        redis,
        kafka,
        auth,
    }
}
