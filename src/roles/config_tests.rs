//! Layering, validation and redaction of the configuration loader, on the whole configuration
//! (the shared sections and every role's).

use std::io::Write;

use super::{load, Role};
use crate::config::*;

fn env(pairs: &[(&str, &str)]) -> Sources {
    Sources::from_env(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())))
}

fn problems(sources: &Sources) -> Vec<Problem> {
    match load(sources) {
        Ok(c) => panic!("expected problems, loaded {c:?}"),
        Err(e) => e.0,
    }
}

fn keys(problems: &[Problem]) -> Vec<&str> {
    problems.iter().map(|p| p.key.as_str()).collect()
}

fn file(ext: &str, text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::Builder::new().suffix(ext).tempfile().unwrap();
    f.write_all(text.as_bytes()).unwrap();
    f
}

#[test]
fn defaults_need_nothing() {
    let c = load(&Sources::default()).unwrap();
    assert_eq!(c.env, Environment::Development);
    assert_eq!(c.port(Role::Gateway), 8000);
    assert_eq!(c.port(Role::Stream), 8001);
    assert_eq!(c.port(Role::Auth), 8010);
    assert_eq!(c.port(Role::Entitlements), 8011);
    assert_eq!(c.port(Role::Metrics), 8012);
    assert!(c.redis_url.is_none() && c.postgres_dsn.is_none() && c.kafka_bootstrap.is_empty());
    assert_eq!(c.server.host.to_string(), "0.0.0.0");
    assert_eq!(c.redis_prefix(), "access:development:");
}

#[test]
fn layers_apply_in_order_file_env_flags() {
    let f = file(
        ".toml",
        "log_level = \"debug\"\n[gateway]\nport = 1111\n[server]\ngrace_period = \"9s\"\n",
    );
    let mut s = env(&[("ACCESS_LOG_LEVEL", "warn"), ("ACCESS_GATEWAY__PORT", "2222")]);
    s.file = Some(f.path().to_path_buf());
    let c = load(&s).unwrap();
    assert_eq!(c.log_level.0, "warn", "env beats file");
    assert_eq!(c.port(Role::Gateway), 2222, "env beats file");
    assert_eq!(c.server.grace_period, std::time::Duration::from_secs(9), "file beats defaults");

    let c = load(&s.clone().with_override("gateway.port", 3333)).unwrap();
    assert_eq!(c.port(Role::Gateway), 3333, "flags beat env");
}

#[test]
fn yaml_files_work_too() {
    let f = file(".yaml", "kafka_bootstrap: [\"k1:9092\", \"k2:9092\"]\nauth:\n  leeway: 30s\n");
    let s = Sources { file: Some(f.path().to_path_buf()), ..Sources::default() };
    let c = load(&s).unwrap();
    assert_eq!(c.kafka_bootstrap, vec!["k1:9092", "k2:9092"]);
    assert_eq!(c.auth.leeway, std::time::Duration::from_secs(30));
}

#[test]
fn flat_operator_names_keep_working() {
    let c = load(&env(&[
        ("ACCESS_ENV", "staging"),
        ("ACCESS_LOG_LEVEL", "debug"),
        ("ACCESS_REDIS_URL", "redis://:pw@cache:6379/0"),
        ("ACCESS_POSTGRES_DSN", "postgres://access:pw@db/access"),
        ("ACCESS_KAFKA_BOOTSTRAP", "k1:9092, k2:9092"),
        ("ACCESS_JWKS_URL", "https://idp/realms/r/protocol/openid-connect/certs"),
        ("ACCESS_AUTH_SERVICE_URL", "http://auth-service:8010"),
        ("ACCESS_ENTITLEMENTS_SERVICE_URL", "http://entitlements-service:8011"),
        ("ACCESS_METRICS_SERVICE_URL", "http://metrics-service:8012"),
        ("ACCESS_ENABLE_TRACING", "true"),
        ("ACCESS_OTEL_EXPORTER", "http://collector:4318/v1/traces"),
        ("PATH", "/usr/bin"),
    ]))
    .unwrap();
    assert_eq!(c.env, Environment::Staging);
    assert_eq!(c.redis_url.as_ref().unwrap().expose().host_str(), Some("cache"));
    assert_eq!(c.postgres_dsn.as_ref().unwrap().expose(), "postgres://access:pw@db/access");
    assert_eq!(c.kafka_bootstrap, vec!["k1:9092", "k2:9092"]);
    assert_eq!(c.jwks_url.as_ref().unwrap().host_str(), Some("idp"));
    assert_eq!(c.auth_service_url.as_ref().unwrap().port(), Some(8010));
    assert!(c.entitlements_service_url.is_some() && c.metrics_service_url.is_some());
    assert!(c.enable_tracing);
    assert_eq!(c.otel_exporter.as_ref().unwrap().path(), "/v1/traces");
}

#[test]
fn nested_keys_use_double_underscore() {
    let c = load(&env(&[
        ("ACCESS_SERVER__GRACE_PERIOD", "7s"),
        ("ACCESS_SERVER__MAX_BODY_BYTES", "2048"),
        ("ACCESS_AUTH__DEFAULT_TENANT", "t0"),
    ]))
    .unwrap();
    assert_eq!(c.server.grace_period, std::time::Duration::from_secs(7));
    assert_eq!(c.server.max_body_bytes, 2048);
    assert_eq!(c.auth.default_tenant.as_deref(), Some("t0"));
}

#[test]
fn every_problem_is_reported_with_its_key() {
    let f = file(".toml", "[metrics]\nport = \"high\"\n[nonsense]\nx = 1\n");
    let mut s = env(&[
        ("ACCESS_GATEWAY__PORT", "abc"),
        ("ACCESS_SERVER__GRACE_PERIOD", "forever"),
        ("ACCESS_SERVER__NOPE", "1"),
        ("ACCESS_BOGUS", "1"),
        ("ACCESS_LOG_LEVEL", "info,["),
    ]);
    s.file = Some(f.path().to_path_buf());
    let p = problems(&s);
    let k = keys(&p);
    for expected in [
        "gateway.port",
        "server.grace_period",
        "server.nope",
        "bogus",
        "log_level",
        "metrics.port",
        "nonsense",
    ] {
        assert!(k.contains(&expected), "{expected} missing from {p:#?}");
    }
    let gateway = p.iter().find(|p| p.key == "gateway.port").unwrap();
    assert_eq!(gateway.env_var(), "ACCESS_GATEWAY__PORT");
    assert!(gateway.to_string().starts_with("gateway.port (ACCESS_GATEWAY__PORT): "), "{gateway}");
    let from_file = p.iter().find(|p| p.key == "metrics.port").unwrap();
    // figment names the file relative to the working directory: look for its name.
    let file_name = f.path().file_name().unwrap().to_string_lossy().to_string();
    assert!(from_file.message.contains(&file_name), "{from_file}");
}

#[test]
fn semantic_problems_name_their_keys() {
    let p = problems(&env(&[
        ("ACCESS_REDIS_URL", "http://cache:6379"),
        ("ACCESS_POSTGRES_DSN", "postgres://db:notaport/x"),
        ("ACCESS_KAFKA_BOOTSTRAP", "nohost"),
        ("ACCESS_ENABLE_TRACING", "true"),
        ("ACCESS_SERVER__MAX_CONCURRENCY", "0"),
        ("ACCESS_SERVER__IO_THREADS", "100000"),
        ("ACCESS_AUTH__ALGORITHMS", "[\"HS256\", \"none\"]"),
        ("ACCESS_KAFKA__CA_FILE", "/nonexistent/ca.pem"),
        ("ACCESS_KAFKA__TLS", "true"),
    ]));
    let k = keys(&p);
    for expected in [
        "redis_url",
        "postgres_dsn",
        "kafka_bootstrap",
        "otel_exporter",
        "server.max_concurrency",
        "server.io_threads",
        "auth.algorithms",
        "kafka.ca_file",
    ] {
        assert!(k.contains(&expected), "{expected} missing from {p:#?}");
    }
    assert_eq!(k.iter().filter(|k| **k == "auth.algorithms").count(), 2, "HS256 and none");
}

#[test]
fn production_refuses_missing_backends() {
    let p = problems(&env(&[("ACCESS_ENV", "production")]));
    let k = keys(&p);
    for expected in
        ["redis_url", "postgres_dsn", "kafka_bootstrap", "jwks_url", "auth.issuer", "auth.audience"]
    {
        assert!(k.contains(&expected), "{expected} missing from {p:#?}");
    }
    let complete = env(&[
        ("ACCESS_ENV", "production"),
        ("ACCESS_REDIS_URL", "rediss://:pw@cache:6380"),
        ("ACCESS_POSTGRES_DSN", "postgres://access@db/access?sslmode=require"),
        ("ACCESS_KAFKA_BOOTSTRAP", "kafka:9092"),
        ("ACCESS_JWKS_URL", "https://idp/certs"),
        ("ACCESS_AUTH__ISSUER", "https://idp/realms/254carbon"),
        ("ACCESS_AUTH__AUDIENCE", "access"),
    ]);
    assert_eq!(load(&complete).unwrap().env, Environment::Production);
}

#[test]
fn secrets_come_from_files_and_never_print() {
    let secret = file(".txt", "postgres://access:s3cr3t@db/access\n");
    let path = secret.path().display().to_string();
    let c = load(&env(&[
        ("ACCESS_POSTGRES_DSN_FILE", &path),
        ("ACCESS_REDIS_URL", "redis://:r3d1s@cache:6379"),
        ("ACCESS_AUTH__CLIENT_SECRET", "0123"),
    ]))
    .unwrap();
    assert_eq!(c.postgres_dsn.as_ref().unwrap().expose(), "postgres://access:s3cr3t@db/access");
    assert_eq!(c.auth.client_secret.as_ref().unwrap().expose(), "0123", "secrets stay strings");
    let printed = format!("{c:?} {}", serde_json::to_string(&c).unwrap());
    for leaked in ["s3cr3t", "r3d1s", "0123"] {
        assert!(!printed.contains(leaked), "{leaked} leaked");
    }

    let p = problems(&env(&[("ACCESS_POSTGRES_DSN_FILE", "/nonexistent/dsn")]));
    assert_eq!(keys(&p), vec!["postgres_dsn"]);
    let p = problems(&env(&[
        ("ACCESS_POSTGRES_DSN_FILE", &path),
        ("ACCESS_POSTGRES_DSN", "postgres://db/x"),
    ]));
    assert_eq!(keys(&p), vec!["postgres_dsn"]);
}

#[test]
fn a_bad_config_file_is_named() {
    let s = Sources { file: Some("/nonexistent/access.toml".into()), ..Sources::default() };
    assert_eq!(keys(&problems(&s)), vec!["--config"]);
    let f = file(".ini", "x=1");
    let s = Sources { file: Some(f.path().to_path_buf()), ..Sources::default() };
    assert_eq!(keys(&problems(&s)), vec!["--config"]);
}

#[test]
fn every_wrong_type_and_every_semantic_problem_is_reported_at_once() {
    let p = problems(&env(&[
        // Two wrong types in one section, one in another...
        ("ACCESS_SERVER__MAX_BODY_BYTES", "lots"),
        ("ACCESS_SERVER__GRACE_PERIOD", "soon"),
        ("ACCESS_STREAM__PING_INTERVAL", "often"),
        // ...and semantic problems beside them, in a section with a wrong type too.
        ("ACCESS_GATEWAY__BREAKER__ERROR_RATE", "2"),
        ("ACCESS_GATEWAY__PORT", "eighty"),
        ("ACCESS_SERVER__MAX_CONCURRENCY", "0"),
    ]));
    let k = keys(&p);
    for expected in [
        "server.max_body_bytes",
        "server.grace_period",
        "stream.ping_interval",
        "gateway.breaker.error_rate",
        "gateway.port",
        "server.max_concurrency",
    ] {
        assert_eq!(k.iter().filter(|k| **k == expected).count(), 1, "{expected} once in {p:#?}");
    }
    assert_eq!(p.len(), 6, "{p:#?}");
}

#[test]
fn redis_urls_name_one_server_a_sentinel_service_or_a_cluster() {
    for good in [
        "redis://cache:6379",
        "rediss://:pw@cache:6380/0",
        "redis-sentinel://s1:26379?sentinelServiceName=main&node=s2:26379",
        "rediss-sentinel://:pw@s1:26379/0?sentinelServiceName=main&sentinelPassword=x",
        "redis-cluster://n1:6379?node=n2:6379&node=n3:6379",
        "rediss-cluster://:pw@n1:6380",
    ] {
        let c = load(&env(&[("ACCESS_REDIS_URL", good)])).unwrap_or_else(|e| panic!("{good}: {e}"));
        assert!(c.redis_url.is_some());
    }
    for (bad, says) in [
        ("redis-sentinel://s1:26379", "sentinelServiceName"),
        ("http://cache:6379", "redis-sentinel://"),
    ] {
        let p = problems(&env(&[("ACCESS_REDIS_URL", bad)]));
        assert_eq!(keys(&p), ["redis_url"], "{bad}");
        assert!(p[0].message.contains(says), "{bad}: {}", p[0].message);
    }
}
