//! Where each replica stands: every role that decides (entitlements, gateway, stream) reports the
//! rules version it decides at, and `GET /entitlements/version` lists them all.
//!
//! With Redis, reports are fields of the hash `<prefix>rules:replicas` (field
//! `<role>:<replica>`, value `{role, replica, rules_version, at}`); a replica reports on every
//! version it applies and every [`HEARTBEAT`], and entries older than [`STALE`] are left out (and
//! removed) when listed, so replicas that stopped disappear. Without Redis the board lives on the
//! process's rules bus, which every role of `access all` shares.

use std::sync::Arc;
use std::time::Duration;

use fred::prelude::HashesInterface;
use serde_json::{json, Value};
use tokio::sync::watch;

use crate::backends::redis::Client as RedisClient;
use crate::server::rules_bus::RulesBus;
use crate::server::Shutdown;

/// How often a replica reports even without a change.
pub const HEARTBEAT: Duration = Duration::from_secs(10);
/// A report older than this is a replica that stopped.
pub const STALE: Duration = Duration::from_secs(35);

/// One replica's report, as kept on the board and listed by `GET /entitlements/version`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct ReplicaReport {
    /// `entitlements`, `gateway` or `stream`.
    #[schema(example = "gateway")]
    pub role: String,
    /// The replica's id.
    pub replica: String,
    /// The rules version it decides at (`-1`: none loaded yet).
    pub rules_version: i64,
    /// When it reported, unix milliseconds.
    pub at: i64,
}

/// The board.
#[derive(Clone)]
pub enum Board {
    /// Shared through Redis.
    Redis {
        /// The client.
        client: RedisClient,
        /// The hash's key.
        key: String,
    },
    /// This process only.
    Local(RulesBus),
}

impl Board {
    /// The board of a role's context: on the process's Redis command connection when Redis is
    /// configured, else the process's bus.
    pub fn for_context(
        ctx: &crate::server::Context,
        redis: Option<&crate::backends::redis::Guarded>,
    ) -> Board {
        match redis {
            Some(redis) => Board::Redis {
                client: redis.client.clone(),
                key: format!("{}rules:replicas", ctx.config.redis_prefix()),
            },
            None => Board::Local(ctx.rules_bus.clone()),
        }
    }

    async fn report(&self, role: &str, replica: &str, version: i64) {
        let field = format!("{role}:{replica}");
        let value = json!({"role": role, "replica": replica, "rules_version": version,
            "at": chrono::Utc::now().timestamp_millis()});
        match self {
            Board::Redis { client, key } => {
                let set: Result<i64, _> =
                    client.hset(key.as_str(), (field, value.to_string())).await;
                if let Err(e) = set {
                    tracing::debug!(role, error = %e, "cannot report the rules version");
                }
            }
            Board::Local(bus) => bus.report(field, value),
        }
    }

    /// Every replica's last report (fresh ones only), sorted by role and replica.
    pub async fn all(&self) -> Vec<ReplicaReport> {
        let now = chrono::Utc::now().timestamp_millis();
        let fresh =
            |v: &Value| v["at"].as_i64().is_some_and(|at| now - at <= STALE.as_millis() as i64);
        let mut entries: Vec<(String, Value)> = match self {
            Board::Redis { client, key } => {
                let all: std::collections::HashMap<String, String> =
                    client.hgetall(key.as_str()).await.unwrap_or_default();
                let mut keep = Vec::new();
                let mut gone = Vec::new();
                for (field, text) in all {
                    match serde_json::from_str::<Value>(&text) {
                        Ok(v) if fresh(&v) => keep.push((field, v)),
                        _ => gone.push(field),
                    }
                }
                if !gone.is_empty() {
                    let _: Result<i64, _> = client.hdel(key.as_str(), gone).await;
                }
                keep
            }
            Board::Local(bus) => bus.reports().into_iter().filter(|(_, v)| fresh(v)).collect(),
        };
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        entries.into_iter().filter_map(|(_, v)| serde_json::from_value(v).ok()).collect()
    }

    /// Reports `versions` (a role's applied version) as `role`/`replica` on every change and
    /// every [`HEARTBEAT`], until shutdown.
    pub fn spawn_reporter(
        self: &Arc<Self>,
        role: &'static str,
        replica: String,
        mut versions: watch::Receiver<i64>,
        shutdown: Shutdown,
    ) {
        let board = self.clone();
        tokio::spawn(async move {
            loop {
                let v = *versions.borrow_and_update();
                board.report(role, &replica, v).await;
                tokio::select! {
                    changed = versions.changed() => if changed.is_err() { return },
                    _ = tokio::time::sleep(HEARTBEAT) => {}
                    _ = shutdown.stopping() => return,
                }
            }
        });
    }
}
