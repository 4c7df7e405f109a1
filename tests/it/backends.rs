//! The backend helpers against the machine's real Redis and PostgreSQL and the test broker; an
//! unreachable backend is named in the error.

use std::time::Duration;

use access::backends::{kafka, postgres, redis};
use access::config::{KafkaConfig, PostgresConfig, RedisConfig, Secret, SecretUrl};

use crate::support::{closed_port, kafka_bootstrap, POSTGRES_DSN, REDIS_URL};

fn redis_url(url: &str) -> SecretUrl {
    SecretUrl::from(url::Url::parse(url).unwrap())
}

fn quick_redis() -> RedisConfig {
    RedisConfig { timeout: Duration::from_millis(500), ..Default::default() }
}

#[tokio::test]
async fn redis_connects_and_answers_readiness() {
    let client = redis::connect(&redis_url(REDIS_URL), &quick_redis()).await.unwrap();
    assert_eq!(redis::ready_check(client)().await, Ok(()));
}

#[tokio::test]
async fn an_unreachable_redis_is_named_without_its_password() {
    let url = format!("redis://:hunter2@127.0.0.1:{}", closed_port().await);
    let err = redis::connect(&redis_url(&url), &quick_redis()).await.unwrap_err();
    assert_eq!(err.backend, "redis");
    let text = err.to_string();
    assert!(text.starts_with("redis at redis://:***@127.0.0.1:"), "{text}");
    assert!(!text.contains("hunter2"));
}

#[tokio::test]
async fn postgres_connects_and_answers_readiness() {
    let pool =
        postgres::connect(&Secret::new(POSTGRES_DSN), &PostgresConfig::default()).await.unwrap();
    assert_eq!(postgres::ready_check(pool)().await, Ok(()));
}

#[tokio::test]
async fn an_unreachable_postgres_is_named_without_its_password() {
    let dsn = format!("postgres://u:hunter2@127.0.0.1:{}/x", closed_port().await);
    let config =
        PostgresConfig { connect_timeout: Duration::from_millis(500), ..Default::default() };
    let err = postgres::connect(&Secret::new(dsn), &config).await.unwrap_err();
    assert_eq!(err.backend, "postgres");
    let text = err.to_string();
    assert!(text.contains("postgres at postgres://u:***@127.0.0.1:"), "{text}");
    assert!(!text.contains("hunter2"));
}

#[tokio::test]
async fn kafka_connects_and_answers_readiness() {
    let client =
        kafka::connect(&[kafka_bootstrap()], &KafkaConfig::default(), Duration::from_secs(5))
            .await
            .unwrap();
    assert_eq!(kafka::ready_check(client)().await, Ok(()));
}

#[tokio::test]
async fn an_unreachable_kafka_is_named() {
    let broker = format!("127.0.0.1:{}", closed_port().await);
    let err = kafka::connect(
        std::slice::from_ref(&broker),
        &KafkaConfig::default(),
        Duration::from_millis(300),
    )
    .await
    .unwrap_err();
    assert_eq!(err.backend, "kafka");
    assert!(err.to_string().starts_with(&format!("kafka at {broker}")), "{err}");
}

/// This machine kind's PostgreSQL serves TLS with Debian's self-signed `localhost` certificate.
const SNAKEOIL: &str = "/etc/ssl/certs/ssl-cert-snakeoil.pem";

#[tokio::test]
async fn postgres_sslmode_require_verifies_the_server_certificate() {
    let dsn = Secret::new("postgres://postgres@localhost:5432/postgres?sslmode=require");
    let trusting = PostgresConfig { ca_file: Some(SNAKEOIL.into()), ..Default::default() };
    let pool = postgres::connect(&dsn, &trusting).await.unwrap();
    let client = pool.get().await.unwrap();
    let row = client
        .query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[])
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0), "the session is encrypted");
    // The certificate names localhost: reaching the same server by address must fail verification.
    let by_address = Secret::new("postgres://postgres@127.0.0.1:5432/postgres?sslmode=require");
    let err = postgres::connect(&by_address, &trusting).await.unwrap_err();
    assert_eq!(err.backend, "postgres", "the server's name is verified: {err}");
}

#[tokio::test]
async fn rediss_with_a_password_connects_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let made = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let port = closed_port().await;
    let mut server = std::process::Command::new("redis-server")
        .args([
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .args(["--requirepass", "s3cret", "--tls-auth-clients", "no"])
        .arg("--tls-cert-file")
        .arg(&cert)
        .arg("--tls-key-file")
        .arg(&key)
        .arg("--tls-ca-cert-file")
        .arg(&cert)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    crate::support::eventually(Duration::from_secs(5), "TLS redis up", || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()
    })
    .await;
    let url = redis_url(&format!("rediss://:s3cret@localhost:{port}"));
    let trusting = RedisConfig { ca_file: Some(cert.clone()), ..quick_redis() };
    let connected = redis::connect(&url, &trusting).await;
    let answered = match &connected {
        Ok(client) => redis::ready_check(client.clone())().await,
        Err(e) => Err(access::backends::CheckError::failed("redis", e)),
    };
    let untrusted = redis::connect(&url, &quick_redis()).await;
    let wrong_password =
        redis::connect(&redis_url(&format!("rediss://:nope@localhost:{port}")), &trusting).await;
    let _ = server.kill();
    let _ = server.wait();
    assert_eq!(answered, Ok(()), "PING over TLS with the password");
    assert!(untrusted.is_err(), "an untrusted certificate is refused");
    let wrong = wrong_password.unwrap_err().to_string();
    assert!(!wrong.contains("nope"), "the password never appears: {wrong}");
}
