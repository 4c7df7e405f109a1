//! The typed sections of [`super::Config`] and their validation.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

use super::{Problem, Secret};
use crate::role::Role;

/// The deployment environment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Environment {
    /// A developer's machine or a dev cluster: embedded backends and the dev key allowed.
    #[default]
    #[serde(alias = "dev", alias = "local")]
    Development,
    /// Pre-production.
    Staging,
    /// Production: every backend must be configured; no dev key.
    #[serde(alias = "prod")]
    Production,
}

impl Environment {
    /// The name used in Redis keys and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Environment::Development => "development",
            Environment::Staging => "staging",
            Environment::Production => "production",
        }
    }
}

/// A `tracing` filter directive, checked when loaded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LogLevel(pub String);

impl Default for LogLevel {
    fn default() -> Self {
        LogLevel("info".into())
    }
}

impl<'de> Deserialize<'de> for LogLevel {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        tracing_subscriber::EnvFilter::try_new(&raw)
            .map(|_| LogLevel(raw.clone()))
            .map_err(|e| serde::de::Error::custom(format!("{raw:?} is not a log filter: {e}")))
    }
}

/// The log line format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One JSON object per line: what the cluster's log pipeline reads.
    #[default]
    Json,
    /// Human-readable lines for a terminal.
    Text,
}

/// A list given either as a list or as a comma-separated string (`"a:9092,b:9092"`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct StringOrList(pub Vec<String>);

impl<'de> Deserialize<'de> for StringOrList {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            One(String),
            Many(Vec<String>),
        }
        Ok(StringOrList(match Raw::deserialize(d)? {
            Raw::One(s) => {
                s.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect()
            }
            Raw::Many(v) => v,
        }))
    }
}

/// What every listener shares: edge limits, timeouts and the shutdown sequence.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address to bind; roles bind all interfaces by default.
    pub host: IpAddr,
    /// A connection must deliver a complete request head within this time of connecting or of
    /// its previous response, or it is closed: this is also the idle keep-alive timeout.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Largest request head (request line and headers) accepted, bytes.
    pub max_header_bytes: usize,
    /// Largest request body accepted, bytes; larger is 413.
    pub max_body_bytes: usize,
    /// A request body not received in full this long after its head is refused with 408 (the
    /// request is dropped, an upstream call with it), so slow bodies cannot hold slots.
    #[serde(with = "humantime_serde")]
    pub body_read_timeout: Duration,
    /// Requests served at once; beyond it, 503 at once instead of an unbounded queue.
    pub max_concurrency: usize,
    /// Requests one client address may have in flight at once; beyond it, 429
    /// `too_many_in_flight` (0: no cap).
    pub max_in_flight_per_client: u32,
    /// Connections one peer address may hold open; beyond it the connection is answered 429
    /// `too_many_connections` and closed (0: no cap). Peers in `trusted_proxies` are exempt.
    pub max_connections_per_client: u32,
    /// Proxies and load balancers (CIDRs) whose `X-Forwarded-For`/`-Proto` are believed: the
    /// client address behind them is what per-client limits count. They are exempt from
    /// `max_connections_per_client`.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// After SIGTERM: report not-ready and keep serving this long, so load balancers move away.
    #[serde(with = "humantime_serde")]
    pub grace_period: Duration,
    /// Then: stop accepting, and give in-flight work this long to finish.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Each readiness check must answer within this.
    #[serde(with = "humantime_serde")]
    pub ready_check_timeout: Duration,
    /// Threads that accept and serve connections, each with a runtime of its own (0: the shared runtime).
    pub io_threads: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            host: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            header_read_timeout: Duration::from_secs(10),
            max_header_bytes: 64 * 1024,
            max_body_bytes: 1024 * 1024,
            body_read_timeout: Duration::from_secs(15),
            max_concurrency: 1024,
            max_in_flight_per_client: 128,
            max_connections_per_client: 512,
            trusted_proxies: Vec::new(),
            grace_period: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(20),
            ready_check_timeout: Duration::from_secs(2),
            io_threads: 0,
        }
    }
}

impl ServerConfig {
    pub(super) fn validate(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        if self.max_header_bytes < 8192 {
            problems.push(Problem::new("server.max_header_bytes", "must be at least 8192"));
        }
        if self.max_body_bytes == 0 {
            problems.push(Problem::new("server.max_body_bytes", "must be greater than 0"));
        }
        if self.max_concurrency == 0 {
            problems.push(Problem::new("server.max_concurrency", "must be greater than 0"));
        }
        if self.body_read_timeout.is_zero() {
            problems.push(Problem::new("server.body_read_timeout", "must be greater than 0"));
        }
        if self.header_read_timeout.is_zero() {
            problems.push(Problem::new("server.header_read_timeout", "must be greater than 0"));
        }
        if self.io_threads > 256 {
            problems.push(Problem::new("server.io_threads", "must be at most 256"));
        }
        if self.ready_check_timeout.is_zero() {
            problems.push(Problem::new("server.ready_check_timeout", "must be greater than 0"));
        }
        problems
    }
}

/// PostgreSQL pool settings (the DSN is the top-level `postgres_dsn`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PostgresConfig {
    /// Connections per replica.
    pub pool_size: usize,
    /// How long to wait for a connection.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// A CA bundle (PEM) to trust for `sslmode=require`, besides the system's.
    pub ca_file: Option<PathBuf>,
    /// The breaker in front of PostgreSQL reads that have a fallback (API-key records): when it
    /// opens, those reads fail at once and the fallback answers.
    pub breaker: BreakerConfig,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        PostgresConfig {
            pool_size: 16,
            connect_timeout: Duration::from_secs(5),
            ca_file: None,
            breaker: BreakerConfig::default(),
        }
    }
}

impl PostgresConfig {
    pub(super) fn validate(&self) -> Vec<Problem> {
        let mut problems = check_file("postgres.ca_file", self.ca_file.as_ref());
        problems.extend(self.breaker.validate("postgres.breaker"));
        if self.pool_size == 0 {
            problems.push(Problem::new("postgres.pool_size", "must be greater than 0"));
        }
        problems
    }
}

/// Redis client settings (the URL is the top-level `redis_url`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// How long to wait for the connection at start-up and for each command.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Key prefix; default `access:<env>:`. Set it to keep two layers (or tests) apart on one Redis.
    pub prefix: Option<String>,
    /// A CA bundle (PEM) to trust for `rediss://`, besides the system's.
    pub ca_file: Option<PathBuf>,
    /// The breaker of each Redis connection: when it opens, calls fail at once and callers use
    /// their fallback instead of waiting for `timeout`.
    pub breaker: BreakerConfig,
    /// How many replicas must acknowledge a revocation (`WAIT` on the key's primary) before it
    /// is answered, so that a failover right after cannot lose it. Unset: 1 for
    /// `redis-cluster://` and `redis-sentinel://` URLs (replicated by design), 0 for one server.
    pub revocation_replicas: Option<u32>,
    /// How long a revocation waits for those acknowledgements (at most half of `timeout`, as the
    /// wait is one command); when fewer arrive, the revocation (stored and announced on the
    /// primary) is answered 503 `dependency_unavailable`, to retry.
    #[serde(with = "humantime_serde")]
    pub revocation_wait: Duration,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            timeout: Duration::from_secs(2),
            prefix: None,
            ca_file: None,
            breaker: BreakerConfig::default(),
            revocation_replicas: None,
            revocation_wait: Duration::from_secs(1),
        }
    }
}

impl RedisConfig {
    pub(super) fn validate(&self) -> Vec<Problem> {
        let mut problems = check_file("redis.ca_file", self.ca_file.as_ref());
        problems.extend(self.breaker.validate("redis.breaker"));
        if self.revocation_wait.is_zero() {
            problems.push(Problem::new("redis.revocation_wait", "must be more than 0"));
        }
        problems
    }
}

/// Kafka client settings (the brokers are the top-level `kafka_bootstrap`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaConfig {
    /// Connect with TLS (system roots, plus `ca_file` when set).
    pub tls: bool,
    /// A CA bundle (PEM) to trust, besides the system's.
    pub ca_file: Option<PathBuf>,
    /// SASL mechanism; unset means no SASL.
    pub sasl_mechanism: Option<SaslMechanism>,
    /// SASL user name.
    pub sasl_username: Option<String>,
    /// SASL password (or `ACCESS_KAFKA__SASL_PASSWORD_FILE`).
    pub sasl_password: Option<Secret>,
    /// Client id sent to the broker.
    pub client_id: String,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            tls: false,
            ca_file: None,
            sasl_mechanism: None,
            sasl_username: None,
            sasl_password: None,
            client_id: "access".into(),
        }
    }
}

/// The SASL mechanisms rskafka speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING-KEBAB-CASE")]
pub enum SaslMechanism {
    /// `PLAIN` (only over TLS).
    Plain,
    /// `SCRAM-SHA-256`.
    ScramSha256,
    /// `SCRAM-SHA-512`.
    ScramSha512,
}

impl KafkaConfig {
    pub(super) fn validate(&self) -> Vec<Problem> {
        let mut problems = check_file("kafka.ca_file", self.ca_file.as_ref());
        if self.sasl_mechanism.is_some()
            && (self.sasl_username.is_none() || self.sasl_password.is_none())
        {
            problems.push(Problem::new(
                "kafka.sasl_username",
                "sasl_mechanism needs both sasl_username and sasl_password",
            ));
        }
        if self.sasl_mechanism == Some(SaslMechanism::Plain) && !self.tls {
            problems.push(Problem::new(
                "kafka.tls",
                "SASL PLAIN sends the password in clear; enable tls",
            ));
        }
        if self.ca_file.is_some() && !self.tls {
            problems.push(Problem::new("kafka.ca_file", "set, but kafka.tls is false"));
        }
        problems
    }
}

/// The one `auth` section every role reads (`docs/contracts.md`, Identity), and the auth role's port.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// The auth role's port.
    pub port: u16,
    /// Exact `iss` required of tokens; unset accepts any issuer (dev mode only).
    pub issuer: Option<String>,
    /// Our client id: `aud` must contain it, or `azp` equal it.
    pub audience: Option<String>,
    /// The signing algorithms accepted.
    pub algorithms: Vec<String>,
    /// Clock skew allowed on `exp`, `nbf`, `iat`.
    #[serde(with = "humantime_serde")]
    pub leeway: Duration,
    /// The role that grants administration.
    pub admin_role: String,
    /// The role that marks a service caller.
    pub service_role: String,
    /// Tenant given to tokens without a `tenant_id` claim; unset refuses them.
    pub default_tenant: Option<String>,
    /// The dev signing key (dev mode only); default under the user's data directory.
    pub dev_key_file: Option<PathBuf>,
    /// Client-credentials token URL for service tokens; unset signs them with the dev key.
    pub token_url: Option<url::Url>,
    /// Client id for client credentials.
    pub client_id: Option<String>,
    /// Client secret for client credentials (or `ACCESS_AUTH__CLIENT_SECRET_FILE`).
    pub client_secret: Option<Secret>,
    /// How often the JWKS is refetched.
    #[serde(with = "humantime_serde")]
    pub jwks_refresh: Duration,
    /// At most one unknown-kid refetch per this interval.
    #[serde(with = "humantime_serde")]
    pub jwks_cooldown: Duration,
    /// Timeout of a JWKS or token-endpoint request.
    #[serde(with = "humantime_serde")]
    pub jwks_timeout: Duration,
    /// Verified tokens cached per process.
    pub cache_capacity: usize,
    /// The longest token lifetime the IdP issues: how long a user revocation is kept.
    #[serde(with = "humantime_serde")]
    pub max_token_lifetime: Duration,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            port: Role::Auth.default_port(),
            issuer: None,
            audience: None,
            algorithms: vec!["RS256".into(), "ES256".into()],
            leeway: Duration::from_secs(60),
            admin_role: "admin".into(),
            service_role: "service".into(),
            default_tenant: None,
            dev_key_file: None,
            token_url: None,
            client_id: None,
            client_secret: None,
            jwks_refresh: Duration::from_secs(300),
            jwks_cooldown: Duration::from_secs(10),
            jwks_timeout: Duration::from_secs(5),
            cache_capacity: 100_000,
            max_token_lifetime: Duration::from_secs(24 * 3600),
        }
    }
}

/// Algorithms we can verify; `none` and HMAC are never accepted.
pub const SUPPORTED_ALGORITHMS: &[&str] =
    &["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA"];

impl AuthConfig {
    /// The dev key file: the configured one, else under the user's data directory (filled in by
    /// the loader from `XDG_DATA_HOME` or `HOME`), else the system's temporary directory.
    pub fn dev_key_path(&self) -> PathBuf {
        self.dev_key_file
            .clone()
            .unwrap_or_else(|| std::env::temp_dir().join("access-dev-key.json"))
    }

    pub(super) fn validate(&self, env: Environment) -> Vec<Problem> {
        let mut problems = Vec::new();
        if self.algorithms.is_empty() {
            problems.push(Problem::new("auth.algorithms", "must name at least one algorithm"));
        }
        for alg in &self.algorithms {
            if !SUPPORTED_ALGORITHMS.contains(&alg.as_str()) {
                problems.push(Problem::new(
                    "auth.algorithms",
                    format!("{alg:?} is not allowed (one of {})", SUPPORTED_ALGORITHMS.join(", ")),
                ));
            }
        }
        if env == Environment::Production {
            if self.issuer.is_none() {
                problems.push(Problem::new("auth.issuer", "required when ACCESS_ENV=production"));
            }
            if self.audience.is_none() {
                problems.push(Problem::new("auth.audience", "required when ACCESS_ENV=production"));
            }
        }
        if self.cache_capacity == 0 {
            problems.push(Problem::new("auth.cache_capacity", "must be greater than 0"));
        }
        if self.token_url.is_some() && (self.client_id.is_none() || self.client_secret.is_none()) {
            problems.push(Problem::new(
                "auth.client_id",
                "token_url needs client_id and client_secret",
            ));
        }
        problems
    }
}

/// A file the configuration points to must exist and be readable.
fn check_file(key: &str, path: Option<&PathBuf>) -> Vec<Problem> {
    match path {
        Some(p) => match std::fs::metadata(p) {
            Ok(m) if m.is_file() => Vec::new(),
            Ok(_) => vec![Problem::new(key, format!("{} is not a file", p.display()))],
            Err(e) => vec![Problem::new(key, format!("{}: {e}", p.display()))],
        },
        None => Vec::new(),
    }
}

/// When a backend's breaker opens and for how long (`backends::breaker`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BreakerConfig {
    /// A call still unanswered after this fails and opens the breaker. Well above a healthy
    /// round trip, well below the command timeout.
    #[serde(with = "humantime_serde")]
    pub trip_after: Duration,
    /// How long the breaker stays open before the first probe.
    #[serde(with = "humantime_serde")]
    pub open_min: Duration,
    /// The longest it stays open (the interval doubles after each failed probe).
    #[serde(with = "humantime_serde")]
    pub open_max: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            trip_after: Duration::from_millis(500),
            open_min: Duration::from_millis(200),
            open_max: Duration::from_secs(5),
        }
    }
}

impl BreakerConfig {
    /// Problems with the values, by key under `section` (e.g. `redis.breaker`).
    pub fn validate(&self, section: &str) -> Vec<Problem> {
        let mut problems = Vec::new();
        if self.trip_after.is_zero() {
            problems.push(Problem::new(format!("{section}.trip_after"), "must be greater than 0"));
        }
        if self.open_min.is_zero() || self.open_max < self.open_min {
            problems.push(Problem::new(
                format!("{section}.open_min"),
                "must be greater than 0 and at most open_max",
            ));
        }
        problems
    }
}
