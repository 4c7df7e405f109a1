//! PostgreSQL through deadpool-postgres, with TLS (native-tls) when the DSN says
//! `sslmode=require`. `sslmode=prefer` (libpq's default) is treated as `disable`: a failed TLS
//! handshake must not turn into an opaque error, so TLS is asked for explicitly.

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use futures::future::BoxFuture;
use postgres_native_tls::MakeTlsConnector;
use tokio_postgres::config::SslMode;

use super::{BackendError, CheckError};
use crate::config::secret::redact_dsn;
use crate::config::{PostgresConfig, Secret};

/// The connection settings and TLS connector for `dsn`.
pub fn settings(
    dsn: &Secret,
    config: &PostgresConfig,
) -> Result<(tokio_postgres::Config, MakeTlsConnector), BackendError> {
    let target = redact_dsn(dsn.expose());
    let err = |m: &dyn std::fmt::Display| BackendError::new("postgres", target.clone(), m);
    let mut pg: tokio_postgres::Config = dsn.expose().parse().map_err(|e| err(&e))?;
    if pg.get_ssl_mode() == SslMode::Prefer {
        pg.ssl_mode(SslMode::Disable);
    }
    if pg.get_connect_timeout().is_none() {
        pg.connect_timeout(config.connect_timeout);
    }
    let mut tls = native_tls::TlsConnector::builder();
    if let Some(path) = &config.ca_file {
        let pem = std::fs::read(path).map_err(|e| err(&format!("{}: {e}", path.display())))?;
        let cert = native_tls::Certificate::from_pem(&pem).map_err(|e| err(&e))?;
        tls.add_root_certificate(cert);
    }
    Ok((pg, MakeTlsConnector::new(tls.build().map_err(|e| err(&e))?)))
}

/// Builds the pool and checks one connection, within `config.connect_timeout`.
pub async fn connect(dsn: &Secret, config: &PostgresConfig) -> Result<Pool, BackendError> {
    let target = redact_dsn(dsn.expose());
    let err = |m: &dyn std::fmt::Display| BackendError::new("postgres", target.clone(), m);
    let (pg, tls) = settings(dsn, config)?;
    let manager =
        Manager::from_config(pg, tls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
    let pool = Pool::builder(manager)
        .max_size(config.pool_size)
        .wait_timeout(Some(config.connect_timeout))
        .create_timeout(Some(config.connect_timeout))
        .recycle_timeout(Some(config.connect_timeout))
        .runtime(Runtime::Tokio1)
        .build()
        .map_err(|e| err(&e))?;
    check(&pool).await.map_err(|e| err(&e))?;
    Ok(pool)
}

async fn check(pool: &Pool) -> Result<(), String> {
    let client = pool.get().await.map_err(|e| describe(&e))?;
    client.simple_query("SELECT 1").await.map_err(|e| describe(&e))?;
    Ok(())
}

/// The error with its sources (tokio-postgres puts the useful part in the source).
pub fn describe(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// A readiness check: a pooled connection answers `SELECT 1`.
pub fn ready_check(
    pool: Pool,
) -> impl Fn() -> BoxFuture<'static, Result<(), CheckError>> + Send + Sync {
    move || {
        let pool = pool.clone();
        Box::pin(async move { check(&pool).await.map_err(|e| CheckError::failed("postgres", e)) })
    }
}

/// Connects (as [`connect`]) and applies the migrations: what every role that uses PostgreSQL
/// does at start-up.
pub async fn connect_and_migrate(
    dsn: &Secret,
    config: &PostgresConfig,
) -> Result<Pool, BackendError> {
    let pool = connect(dsn, config).await?;
    migrate(&pool).await.map_err(|e| BackendError::new("postgres", redact_dsn(dsn.expose()), e))?;
    Ok(pool)
}

/// The layer's one migration set, in order.
const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "entitlements", include_str!("../../migrations/0001_entitlements.sql")),
    (2, "api_keys", include_str!("../../migrations/0002_api_keys.sql")),
];

/// The advisory lock every replica takes to migrate: replicas starting together apply each
/// migration once.
const MIGRATION_LOCK: i64 = 0x0061_6363_6573_735f;

/// Why the migrations were not applied (the transaction rolled back: none of them was).
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// No connection from the pool.
    #[error("{}", describe(.0))]
    Pool(#[from] deadpool_postgres::PoolError),
    /// A statement of the migration machinery failed.
    #[error("{}", describe(.0))]
    Sql(#[from] tokio_postgres::Error),
    /// A migration's own SQL failed.
    #[error("migration {version} ({name}): {}", describe(.source))]
    Migration {
        /// Its version.
        version: i32,
        /// Its name.
        name: &'static str,
        /// The cause.
        #[source]
        source: tokio_postgres::Error,
    },
}

/// Applies the migrations not yet applied, in one transaction under an advisory lock.
pub async fn migrate(pool: &Pool) -> Result<(), MigrateError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS access_schema_migrations (
            version int PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())",
    )
    .await?;
    let applied: Vec<i32> = tx
        .query("SELECT version FROM access_schema_migrations", &[])
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    for (version, name, sql) in MIGRATIONS {
        if applied.contains(version) {
            continue;
        }
        tx.batch_execute(sql).await.map_err(|source| MigrateError::Migration {
            version: *version,
            name,
            source,
        })?;
        tx.execute(
            "INSERT INTO access_schema_migrations (version, name) VALUES ($1, $2)",
            &[version, name],
        )
        .await?;
        tracing::info!(version, name, "applied migration");
    }
    Ok(tx.commit().await?)
}
