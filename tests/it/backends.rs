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
    RedisConfig { timeout: Duration::from_millis(500), prefix: None }
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
    let err =
        kafka::connect(&[broker.clone()], &KafkaConfig::default(), Duration::from_millis(300))
            .await
            .unwrap_err();
    assert_eq!(err.backend, "kafka");
    assert!(err.to_string().starts_with(&format!("kafka at {broker}")), "{err}");
}
