//! Where rules live: PostgreSQL (shared by every replica) or memory (the embedded default, seeded
//! from a YAML file). Every change bumps the global rules version and writes an audit row in the
//! same transaction, then announces the new version (PostgreSQL `NOTIFY access_rules_changed`).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use futures::future::BoxFuture;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::broadcast;
use uuid::Uuid;

use crate::backends::postgres::describe;
use crate::error::{ApiError, ErrorCode};
use crate::policy::rules::{Rule, RuleInput};
use crate::server::Shutdown;

/// The PostgreSQL channel rule changes are announced on.
pub const CHANNEL: &str = "access_rules_changed";

/// Why a store operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// No rule with that id.
    #[error("no such rule")]
    NotFound,
    /// The rule changed since the version the caller named.
    #[error("the rule is at version {current}, not {expected}")]
    Conflict {
        /// The version the caller named.
        expected: i64,
        /// The stored version.
        current: i64,
    },
    /// The store cannot be reached.
    #[error("{0}")]
    Unavailable(String),
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound => ApiError::not_found("no rule with that id"),
            StoreError::Conflict { .. } => {
                ApiError::new(ErrorCode::Conflict, e.to_string()).with_field("version")
            }
            unavailable @ StoreError::Unavailable(_) => {
                ApiError::dependency("postgres", unavailable)
            }
        }
    }
}

/// One audit row.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct AuditEntry {
    /// `create`, `update` or `delete`.
    pub change: String,
    /// Who made the change (the token's subject).
    pub actor: String,
    /// When.
    pub at: DateTime<Utc>,
    /// The rule before.
    #[schema(value_type = Option<crate::policy::rules::RuleInput>)]
    pub old: Option<Value>,
    /// The rule after.
    #[schema(value_type = Option<crate::policy::rules::RuleInput>)]
    pub new: Option<Value>,
    /// The global rules version the change produced.
    pub rules_version: i64,
}

/// Every rule at one rules version.
pub struct Loaded {
    /// The rules.
    pub rules: Vec<Rule>,
    /// Their version.
    pub version: i64,
}

/// A rule store.
pub trait RuleStore: Send + Sync {
    /// Every rule and the current version, consistently.
    fn load(&self) -> BoxFuture<'_, Result<Loaded, StoreError>>;
    /// Creates a rule; returns it and the new rules version.
    fn create(
        &self,
        input: RuleInput,
        actor: String,
    ) -> BoxFuture<'_, Result<(Rule, i64), StoreError>>;
    /// Replaces a rule if it is still at `expected`.
    fn update(
        &self,
        id: Uuid,
        input: RuleInput,
        expected: i64,
        actor: String,
    ) -> BoxFuture<'_, Result<(Rule, i64), StoreError>>;
    /// Deletes a rule (if still at `expected`, when given); returns the new rules version.
    fn delete(
        &self,
        id: Uuid,
        expected: Option<i64>,
        actor: String,
    ) -> BoxFuture<'_, Result<i64, StoreError>>;
    /// A rule's audit trail, oldest first.
    fn history(&self, id: Uuid) -> BoxFuture<'_, Result<Vec<AuditEntry>, StoreError>>;
    /// New rules versions, from every replica.
    fn changes(&self) -> broadcast::Receiver<i64>;
    /// Names the sequence of versions: versions of one epoch only grow, so a follower that sees
    /// another epoch (the embedded store of a restarted process) takes its rules whatever their
    /// version. Every replica of a shared store answers the same.
    fn epoch(&self) -> String {
        "shared".into()
    }
}

fn to_json(input: &RuleInput) -> Value {
    serde_json::to_value(input).unwrap_or(Value::Null)
}

/// Rules, audit rows by rule, and the rules version.
type MemoryState = (Vec<Rule>, Vec<(Uuid, AuditEntry)>, i64);

/// The embedded default: rules in memory (one process).
pub struct MemoryStore {
    /// The rules, the audit trail and the version; a std mutex never held across an await.
    state: Mutex<MemoryState>,
    changes: broadcast::Sender<i64>,
    /// This store's epoch: its versions start again with every process.
    epoch: String,
}

impl MemoryStore {
    /// A store holding `seed` at version 1 (0 when empty).
    pub fn new(seed: Vec<RuleInput>) -> Self {
        let now = Utc::now();
        let rules: Vec<Rule> = seed
            .into_iter()
            .map(|input| Rule {
                id: Uuid::new_v4(),
                input,
                created_at: now,
                updated_at: now,
                version: 1,
            })
            .collect();
        let version = i64::from(!rules.is_empty());
        MemoryStore {
            state: Mutex::new((rules, Vec::new(), version)),
            changes: broadcast::channel(64).0,
            epoch: format!("memory-{}", Uuid::new_v4().simple()),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut MemoryState) -> T) -> T {
        f(&mut self.state.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

fn audit(
    change: &str,
    actor: String,
    old: Option<&RuleInput>,
    new: Option<&RuleInput>,
    version: i64,
) -> AuditEntry {
    AuditEntry {
        change: change.into(),
        actor,
        at: Utc::now(),
        old: old.map(to_json),
        new: new.map(to_json),
        rules_version: version,
    }
}

impl RuleStore for MemoryStore {
    fn load(&self) -> BoxFuture<'_, Result<Loaded, StoreError>> {
        let loaded =
            self.with(|(rules, _, version)| Loaded { rules: rules.clone(), version: *version });
        Box::pin(async move { Ok(loaded) })
    }

    fn create(
        &self,
        input: RuleInput,
        actor: String,
    ) -> BoxFuture<'_, Result<(Rule, i64), StoreError>> {
        let out = self.with(|(rules, log, version)| {
            *version += 1;
            let now = Utc::now();
            let rule =
                Rule { id: Uuid::new_v4(), input, created_at: now, updated_at: now, version: 1 };
            log.push((rule.id, audit("create", actor, None, Some(&rule.input), *version)));
            rules.push(rule.clone());
            (rule, *version)
        });
        let _ = self.changes.send(out.1);
        Box::pin(async move { Ok(out) })
    }

    fn update(
        &self,
        id: Uuid,
        input: RuleInput,
        expected: i64,
        actor: String,
    ) -> BoxFuture<'_, Result<(Rule, i64), StoreError>> {
        let out = self.with(|(rules, log, version)| {
            let rule = rules.iter_mut().find(|r| r.id == id).ok_or(StoreError::NotFound)?;
            if rule.version != expected {
                return Err(StoreError::Conflict { expected, current: rule.version });
            }
            *version += 1;
            log.push((id, audit("update", actor, Some(&rule.input), Some(&input), *version)));
            rule.input = input;
            rule.version += 1;
            rule.updated_at = Utc::now();
            Ok((rule.clone(), *version))
        });
        if let Ok((_, v)) = &out {
            let _ = self.changes.send(*v);
        }
        Box::pin(async move { out })
    }

    fn delete(
        &self,
        id: Uuid,
        expected: Option<i64>,
        actor: String,
    ) -> BoxFuture<'_, Result<i64, StoreError>> {
        let out = self.with(|(rules, log, version)| {
            let index = rules.iter().position(|r| r.id == id).ok_or(StoreError::NotFound)?;
            if let Some(expected) = expected.filter(|e| *e != rules[index].version) {
                return Err(StoreError::Conflict { expected, current: rules[index].version });
            }
            *version += 1;
            let old = rules.remove(index);
            log.push((id, audit("delete", actor, Some(&old.input), None, *version)));
            Ok(*version)
        });
        if let Ok(v) = &out {
            let _ = self.changes.send(*v);
        }
        Box::pin(async move { out })
    }

    fn history(&self, id: Uuid) -> BoxFuture<'_, Result<Vec<AuditEntry>, StoreError>> {
        let entries = self.with(|(_, log, _)| {
            log.iter().filter(|(r, _)| *r == id).map(|(_, e)| e.clone()).collect()
        });
        Box::pin(async move { Ok(entries) })
    }

    fn changes(&self) -> broadcast::Receiver<i64> {
        self.changes.subscribe()
    }

    fn epoch(&self) -> String {
        self.epoch.clone()
    }
}

/// Rules in PostgreSQL.
pub struct PgStore {
    pool: Pool,
    changes: broadcast::Sender<i64>,
}

fn unavailable(e: &dyn std::error::Error) -> StoreError {
    StoreError::Unavailable(describe(e))
}

fn rule_from_row(row: &tokio_postgres::Row) -> Result<Rule, StoreError> {
    let input: Value = row.get("rule");
    let input: RuleInput = serde_json::from_value(input)
        .map_err(|e| StoreError::Unavailable(format!("stored rule does not parse: {e}")))?;
    Ok(Rule {
        id: row.get("id"),
        input,
        created_at: row.get("created_at"),
        updated_at: row.get("updated_at"),
        version: row.get("version"),
    })
}

impl PgStore {
    /// A store over `pool` (migrated). Announcements arrive through a dedicated LISTEN
    /// connection, reconnected with backoff, until shutdown.
    pub fn start(
        pool: Pool,
        settings: (tokio_postgres::Config, postgres_native_tls::MakeTlsConnector),
        shutdown: Shutdown,
    ) -> Arc<Self> {
        let (changes, _) = broadcast::channel(64);
        let store = Arc::new(PgStore { pool, changes: changes.clone() });
        tokio::spawn(listen(settings, changes, shutdown));
        store
    }

    async fn write<T>(
        &self,
        f: impl for<'t> FnOnce(
                &'t deadpool_postgres::Transaction<'t>,
                i64,
            ) -> BoxFuture<'t, Result<T, StoreError>>
            + Send,
    ) -> Result<(T, i64), StoreError> {
        let mut client = self.pool.get().await.map_err(|e| unavailable(&e))?;
        let tx = client.transaction().await.map_err(|e| unavailable(&e))?;
        let version: i64 = tx
            .query_one("SELECT nextval('access_rules_version')", &[])
            .await
            .map_err(|e| unavailable(&e))?
            .get(0);
        let out = f(&tx, version).await?;
        tx.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &version.to_string()])
            .await
            .map_err(|e| unavailable(&e))?;
        tx.commit().await.map_err(|e| unavailable(&e))?;
        Ok((out, version))
    }
}

/// The rule `id`, locked for the rest of the transaction; a conflict when it is no longer at
/// `expected` (when given).
async fn locked_rule(
    tx: &deadpool_postgres::Transaction<'_>,
    id: Uuid,
    expected: Option<i64>,
) -> Result<Rule, StoreError> {
    let row = tx
        .query_opt("SELECT id, rule, created_at, updated_at, version FROM access_rules WHERE id = $1 FOR UPDATE", &[&id])
        .await
        .map_err(|e| unavailable(&e))?
        .ok_or(StoreError::NotFound)?;
    let rule = rule_from_row(&row)?;
    match expected {
        Some(expected) if expected != rule.version => {
            Err(StoreError::Conflict { expected, current: rule.version })
        }
        _ => Ok(rule),
    }
}

async fn audit_row(
    tx: &deadpool_postgres::Transaction<'_>,
    id: Uuid,
    change: &str,
    actor: &str,
    old: Option<Value>,
    new: Option<Value>,
    version: i64,
) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO access_rules_audit (rule_id, change, actor, old_rule, new_rule, rules_version) VALUES ($1, $2, $3, $4, $5, $6)",
        &[&id, &change, &actor, &old, &new, &version],
    )
    .await
    .map(|_| ())
    .map_err(|e| unavailable(&e))
}

impl RuleStore for PgStore {
    fn load(&self) -> BoxFuture<'_, Result<Loaded, StoreError>> {
        Box::pin(async move {
            let mut client = self.pool.get().await.map_err(|e| unavailable(&e))?;
            let tx = client
                .build_transaction()
                .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await
                .map_err(|e| unavailable(&e))?;
            let row = tx
                .query_one("SELECT last_value, is_called FROM access_rules_version", &[])
                .await
                .map_err(|e| unavailable(&e))?;
            let version: i64 = if row.get::<_, bool>(1) { row.get(0) } else { 0 };
            let rows = tx
                .query("SELECT id, rule, created_at, updated_at, version FROM access_rules", &[])
                .await
                .map_err(|e| unavailable(&e))?;
            let rules = rows.iter().map(rule_from_row).collect::<Result<Vec<_>, _>>()?;
            tx.commit().await.map_err(|e| unavailable(&e))?;
            Ok(Loaded { rules, version })
        })
    }

    fn create(
        &self,
        input: RuleInput,
        actor: String,
    ) -> BoxFuture<'_, Result<(Rule, i64), StoreError>> {
        Box::pin(async move {
            let (rule, version) = self
                .write(move |tx, version| {
                    Box::pin(async move {
                        let now = Utc::now();
                        let rule = Rule { id: Uuid::new_v4(), input, created_at: now, updated_at: now, version: 1 };
                        let body = to_json(&rule.input);
                        tx.execute(
                            "INSERT INTO access_rules (id, rule, tenant_id, user_id, resource, created_at, updated_at, version)
                             VALUES ($1, $2, $3, $4, $5, $6, $6, 1)",
                            &[&rule.id, &body, &rule.input.tenant_id, &rule.input.user_id, &rule.input.resource, &now],
                        )
                        .await
                        .map_err(|e| unavailable(&e))?;
                        audit_row(tx, rule.id, "create", &actor, None, Some(body), version).await?;
                        Ok(rule)
                    })
                })
                .await?;
            Ok((rule, version))
        })
    }

    fn update(
        &self,
        id: Uuid,
        input: RuleInput,
        expected: i64,
        actor: String,
    ) -> BoxFuture<'_, Result<(Rule, i64), StoreError>> {
        Box::pin(async move {
            self.write(move |tx, version| {
                Box::pin(async move {
                    let old = locked_rule(tx, id, Some(expected)).await?;
                    let now = Utc::now();
                    let rule = Rule { id, input, created_at: old.created_at, updated_at: now, version: old.version + 1 };
                    let body = to_json(&rule.input);
                    tx.execute(
                        "UPDATE access_rules SET rule = $2, tenant_id = $3, user_id = $4, resource = $5, updated_at = $6, version = $7 WHERE id = $1",
                        &[&id, &body, &rule.input.tenant_id, &rule.input.user_id, &rule.input.resource, &now, &rule.version],
                    )
                    .await
                    .map_err(|e| unavailable(&e))?;
                    audit_row(tx, id, "update", &actor, Some(to_json(&old.input)), Some(body), version).await?;
                    Ok(rule)
                })
            })
            .await
        })
    }

    fn delete(
        &self,
        id: Uuid,
        expected: Option<i64>,
        actor: String,
    ) -> BoxFuture<'_, Result<i64, StoreError>> {
        Box::pin(async move {
            let ((), version) = self
                .write(move |tx, version| {
                    Box::pin(async move {
                        let old = locked_rule(tx, id, expected).await?;
                        tx.execute("DELETE FROM access_rules WHERE id = $1", &[&id])
                            .await
                            .map_err(|e| unavailable(&e))?;
                        audit_row(
                            tx,
                            id,
                            "delete",
                            &actor,
                            Some(to_json(&old.input)),
                            None,
                            version,
                        )
                        .await
                    })
                })
                .await?;
            Ok(version)
        })
    }

    fn history(&self, id: Uuid) -> BoxFuture<'_, Result<Vec<AuditEntry>, StoreError>> {
        Box::pin(async move {
            let client = self.pool.get().await.map_err(|e| unavailable(&e))?;
            let rows = client
                .query(
                    "SELECT change, actor, at, old_rule, new_rule, rules_version FROM access_rules_audit WHERE rule_id = $1 ORDER BY id",
                    &[&id],
                )
                .await
                .map_err(|e| unavailable(&e))?;
            Ok(rows
                .iter()
                .map(|r| AuditEntry {
                    change: r.get(0),
                    actor: r.get(1),
                    at: r.get(2),
                    old: r.get(3),
                    new: r.get(4),
                    rules_version: r.get(5),
                })
                .collect())
        })
    }

    fn changes(&self) -> broadcast::Receiver<i64> {
        self.changes.subscribe()
    }
}

/// Holds a LISTEN connection and forwards each announced version; after every (re)connect it
/// sends `-1` ("reload: announcements may have been missed").
async fn listen(
    (config, tls): (tokio_postgres::Config, postgres_native_tls::MakeTlsConnector),
    changes: broadcast::Sender<i64>,
    shutdown: Shutdown,
) {
    use futures::StreamExt;
    let mut backoff = Duration::from_millis(100);
    loop {
        let connected = tokio::select! {
            c = config.connect(tls.clone()) => c,
            _ = shutdown.stopping() => return,
        };
        match connected {
            Ok((client, mut connection)) => {
                let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
                // The connection must be polled for LISTEN to complete.
                let statement = format!("LISTEN {CHANNEL}");
                let ok = {
                    let mut listening = std::pin::pin!(client.batch_execute(&statement));
                    loop {
                        tokio::select! {
                            r = &mut listening => break r.is_ok(),
                            m = messages.next() => if m.is_none() { break false },
                        }
                    }
                };
                if ok {
                    backoff = Duration::from_millis(100);
                    let _ = changes.send(-1);
                    loop {
                        tokio::select! {
                            m = messages.next() => match m {
                                Some(Ok(tokio_postgres::AsyncMessage::Notification(n))) => {
                                    let _ = changes.send(n.payload().parse().unwrap_or(-1));
                                }
                                Some(Ok(_)) => {}
                                Some(Err(e)) => { tracing::warn!(error = %e, "rules LISTEN connection failed"); break }
                                None => break,
                            },
                            _ = shutdown.stopping() => return,
                        }
                    }
                }
                drop(client);
            }
            Err(e) => {
                tracing::warn!(error = %describe(&e), "cannot open the rules LISTEN connection")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.stopping() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}
