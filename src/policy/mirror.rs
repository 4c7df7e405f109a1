//! The rules mirror: the gateway's and the stream's own copy of every rule, decided with the
//! entitlements role's evaluator ([`super::eval`]), so a check is a local call of microseconds
//! rather than an HTTP round trip (a per-record check on a stream could not be one).
//!
//! The entitlements role stays the one place that stores rules, audits changes and answers
//! outside callers; the mirror fetches its whole snapshot (`GET /entitlements/snapshot`, with the
//! rules version) and fetches it again whenever a newer version is announced: on the Redis
//! channel `<prefix>rules`, on the in-process bus (`access all`), and every `refresh_interval` in
//! case an announcement was missed. A fetch that returns an older version than the one announced
//! (a replica of the role that has not reloaded yet) is retried shortly.
//!
//! Every decision carries the version of the snapshot it was made at; the snapshot is swapped
//! whole, and [`Mirror::applied`] tells followers (the stream's open subscriptions) when it moved.
//! [`Mirror::decide_current`] (the gateway) waits, briefly, for a version it has heard of but not
//! applied yet, so nothing is decided at an older version once a newer one is known.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Notify};
use tracing::Instrument as _;
use url::Url;
use uuid::Uuid;

use super::client::{RequestError, Unavailable};
use super::eval::{CheckRequest, Snapshot};
use super::rules::{Rule, RuleInput};
use crate::auth::token_source::TokenSource;
use crate::auth::Identity;
use crate::role::Role;
use crate::server::Shutdown;

/// Metric names.
pub mod names {
    /// The rules version a role's mirror decides at.
    pub const VERSION: &str = "access_rules_mirror_version";
    /// Snapshot fetches, by outcome (`ok`, `not_modified`, `stale`, `error`).
    pub const FETCHES: &str = "access_rules_mirror_fetches_total";
    /// From a version's announcement to the mirror applying it.
    pub const APPLY_DELAY: &str = "access_rules_mirror_apply_delay_seconds";

    /// Registers the descriptions.
    pub fn describe() {
        metrics::describe_gauge!(VERSION, "The rules version this role decides at");
        metrics::describe_counter!(
            FETCHES,
            "Rules snapshot fetches from the entitlements role, by outcome (ok, not_modified, stale, error)"
        );
        metrics::describe_histogram!(
            APPLY_DELAY,
            metrics::Unit::Seconds,
            "From a rules version's announcement to this role deciding at it"
        );
    }
}

/// How long [`Mirror::decide_current`] waits for an announced version before deciding anyway
/// fails (closed, or open if configured).
pub const CATCH_UP: Duration = Duration::from_secs(1);

/// How often the snapshot is polled (a conditional `GET`, 304 when unchanged) unless an
/// entitlements role in this process announces every change on the bus. Redis announcements
/// make a change arrive at once; the poll is what bounds it when they cannot: Redis down,
/// frozen (a silent subscription looks healthy), partitioned, or not configured. So a rule change
/// reaches every replica within a second whatever fails but the entitlements role itself.
pub const FALLBACK_POLL: Duration = Duration::from_millis(250);

/// One rule as `GET /entitlements/snapshot` carries it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct WireRule {
    /// The id.
    pub id: Uuid,
    /// The rule's content.
    pub rule: RuleInput,
    /// When created.
    pub created_at: DateTime<Utc>,
    /// When last changed.
    pub updated_at: DateTime<Utc>,
    /// The rules version of its last change.
    pub version: i64,
}

impl From<&Rule> for WireRule {
    fn from(r: &Rule) -> Self {
        WireRule {
            id: r.id,
            rule: r.input.clone(),
            created_at: r.created_at,
            updated_at: r.updated_at,
            version: r.version,
        }
    }
}

impl From<WireRule> for Rule {
    fn from(w: WireRule) -> Self {
        Rule {
            id: w.id,
            input: w.rule,
            created_at: w.created_at,
            updated_at: w.updated_at,
            version: w.version,
        }
    }
}

/// The body of `GET /entitlements/snapshot`: every rule at one rules version.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WireSnapshot {
    /// The store's epoch: versions of one epoch only grow (see `RuleStore::epoch`).
    #[serde(default)]
    pub epoch: String,
    /// The rules version.
    pub rules_version: i64,
    /// Every rule, disabled ones too.
    pub rules: Vec<WireRule>,
}

/// Where one replica of the gateway or the stream stands (`GET /entitlements/version`).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Standing {
    /// `gateway` or `stream`.
    #[schema(example = "gateway")]
    pub role: &'static str,
    /// This replica's id.
    pub replica: String,
    /// The version decisions are made at (`-1`: none loaded).
    pub rules_version: i64,
    /// The newest version announced (decisions wait for it).
    pub announced_version: i64,
    /// Whether a snapshot was ever loaded.
    pub loaded: bool,
    /// When the current snapshot was loaded.
    pub applied_at: DateTime<Utc>,
}

/// A decision made locally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Whether the action is allowed.
    pub allowed: bool,
    /// The rules version it was made at (`-1` when no snapshot was loaded and the role fails
    /// open).
    pub version: i64,
}

/// The check an identity makes: the same request the entitlements client sends to
/// `/entitlements/check` (subject, tenant, roles, an empty context).
pub fn request(identity: &Identity, resource: &str, action: &str) -> CheckRequest {
    CheckRequest {
        user_id: identity.subject.clone(),
        tenant_id: identity.tenant.clone(),
        roles: identity.roles.clone(),
        resource: resource.to_string(),
        action: action.to_string(),
        context: serde_json::Value::Object(Default::default()),
    }
}

/// Where the mirror fetches its snapshot.
struct Source {
    http: reqwest::Client,
    url: Url,
    tokens: Arc<TokenSource>,
}

/// The mirror. Shared as `Arc<Mirror>`.
pub struct Mirror {
    role: Role,
    source: Option<Source>,
    /// Swapped whole; readers clone the `Arc` under a short read lock.
    snapshot: RwLock<Arc<Snapshot>>,
    /// Whether a snapshot was ever loaded (before, every check is unavailable).
    loaded: AtomicBool,
    /// The newest version heard of (announced or fetched).
    announced: AtomicI64,
    /// When the newest version was first heard of, for the apply-delay histogram.
    announced_at: std::sync::Mutex<Option<(i64, Instant)>>,
    /// The version applied, for followers.
    applied: watch::Sender<i64>,
    /// Wakes the refresher (a newer version was announced).
    wake: Notify,
    /// The process's bus has carried a version: an entitlements role in this process announces
    /// every change there, so the refresher need not poll ([`FALLBACK_POLL`]).
    pushed: AtomicBool,
    /// The epoch of the snapshot in place; a std mutex held for one read or write.
    epoch: std::sync::Mutex<String>,
    fail_open: bool,
}

impl Mirror {
    fn with(role: Role, source: Option<Source>, fail_open: bool) -> Self {
        Mirror {
            role,
            source,
            snapshot: RwLock::new(Arc::new(Snapshot::new(Vec::new(), -1))),
            loaded: AtomicBool::new(false),
            announced: AtomicI64::new(-1),
            announced_at: std::sync::Mutex::new(None),
            applied: watch::channel(-1).0,
            wake: Notify::new(),
            pushed: AtomicBool::new(false),
            epoch: std::sync::Mutex::default(),
            fail_open,
        }
    }

    /// A mirror that fetches from the entitlements role at `url` with `tokens`.
    pub fn new(
        role: Role,
        url: Url,
        tokens: Arc<TokenSource>,
        fail_open: bool,
        timeout: Duration,
    ) -> Result<Arc<Self>, RequestError> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .pool_idle_timeout(Duration::from_secs(5))
            .build()?;
        Ok(Arc::new(Mirror::with(role, Some(Source { http, url, tokens }), fail_open)))
    }

    /// A mirror of fixed rules (benchmarks and tests), loaded at `version`.
    pub fn fixed(role: Role, rules: Vec<Rule>, version: i64) -> Arc<Self> {
        let mirror = Arc::new(Mirror::with(role, None, false));
        mirror.apply(Snapshot::new(rules, version));
        mirror
    }

    /// The mirror a role of this process uses: the entitlements role at
    /// `ACCESS_ENTITLEMENTS_SERVICE_URL` (default `http://127.0.0.1:8011`), following versions on
    /// Redis (when configured) and on the process's rules bus. The first fetch is tried for at
    /// most `first_fetch`; until one succeeds checks are unavailable, and the refresher keeps
    /// trying.
    pub async fn for_role(
        ctx: &crate::server::Context,
        tokens: Arc<TokenSource>,
        fail_open: bool,
        refresh_interval: Duration,
        channels: Option<&crate::backends::redis::Channels>,
    ) -> Result<Arc<Self>, crate::server::StartError> {
        let url = ctx
            .config
            .entitlements_service_url
            .clone()
            .unwrap_or_else(|| Url::parse("http://127.0.0.1:8011").expect("a valid URL"));
        let mirror = Mirror::new(ctx.role, url, tokens, fail_open, Duration::from_secs(5))
            .map_err(|e| crate::server::StartError::Invalid(e.to_string()))?;
        if let Some(channels) = channels {
            let channel = format!("{}rules", ctx.config.redis_prefix());
            mirror.follow_redis(channels, channel, ctx.shutdown.clone());
        }
        mirror.follow_bus(ctx.rules_bus.subscribe(), ctx.shutdown.clone());
        if let Err(e) = tokio::time::timeout(Duration::from_secs(2), mirror.fetch())
            .await
            .unwrap_or(Err(RequestError::TimedOut))
        {
            tracing::warn!(role = %ctx.role, error = %e, "no rules yet; entitlement checks are unavailable until the entitlements role answers");
        }
        mirror.spawn_refresh(refresh_interval, ctx.shutdown.clone());
        let loaded = mirror.clone();
        ctx.readiness.add_soft_check(
            "rules",
            crate::server::readiness::loaded(
                move || loaded.is_loaded(),
                "no rules snapshot from the entitlements role yet",
            ),
        );
        Ok(mirror)
    }

    /// Where this replica stands: the body of `GET /entitlements/version` on the gateway and the
    /// stream.
    pub fn standing(&self, role: &'static str, replica: &str) -> Standing {
        Standing {
            role,
            replica: replica.to_string(),
            rules_version: self.version(),
            announced_version: self.announced(),
            loaded: self.is_loaded(),
            applied_at: self.snapshot().loaded_at(),
        }
    }

    /// Whether checks pass while no snapshot was ever loaded.
    pub fn fails_open(&self) -> bool {
        self.fail_open
    }

    /// Whether a snapshot was loaded.
    pub fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }

    /// The snapshot decisions are made at.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The version decisions are made at (`-1`: none loaded).
    pub fn version(&self) -> i64 {
        *self.applied.borrow()
    }

    /// The newest version heard of.
    pub fn announced(&self) -> i64 {
        self.announced.load(Ordering::Acquire)
    }

    /// Follows the applied version.
    pub fn applied(&self) -> watch::Receiver<i64> {
        self.applied.subscribe()
    }

    /// A newer version exists: fetch it.
    pub fn announce(&self, version: i64) {
        let before = self.announced.fetch_max(version, Ordering::AcqRel);
        if version > before {
            let mut at = self.announced_at.lock().unwrap_or_else(|p| p.into_inner());
            if at.is_none_or(|(v, _)| v < version) {
                *at = Some((version, Instant::now()));
            }
        }
        if version > self.version() {
            self.wake.notify_one();
        }
    }

    /// Installs `snapshot` unless an equal or newer one is in place; whether it was installed.
    pub fn apply(&self, snapshot: Snapshot) -> bool {
        self.apply_from(snapshot, None)
    }

    /// As [`Mirror::apply`], for a snapshot of `epoch`: one of another epoch than the snapshot in
    /// place (the entitlements role's embedded store restarted) is installed whatever its version,
    /// and the versions heard of start again from it.
    fn apply_from(&self, snapshot: Snapshot, epoch: Option<String>) -> bool {
        let version = snapshot.version();
        {
            let mut current = self.snapshot.write().unwrap_or_else(|p| p.into_inner());
            let mut known = self.epoch.lock().unwrap_or_else(|p| p.into_inner());
            let new_epoch = epoch.as_ref().is_some_and(|e| *e != *known) && self.is_loaded();
            if self.is_loaded() && !new_epoch && current.version() >= version {
                return false;
            }
            if let Some(e) = epoch {
                *known = e;
            }
            if new_epoch {
                tracing::warn!(role = %self.role, version, "the rules store started again; following its versions from here");
                self.announced.store(version, Ordering::Release);
            }
            *current = Arc::new(snapshot);
            self.loaded.store(true, Ordering::Release);
        }
        self.announced.fetch_max(version, Ordering::AcqRel);
        self.applied.send_replace(version);
        metrics::gauge!(names::VERSION, "role" => self.role.as_str()).set(version as f64);
        if let Some((v, at)) = *self.announced_at.lock().unwrap_or_else(|p| p.into_inner()) {
            if v <= version {
                metrics::histogram!(names::APPLY_DELAY, "role" => self.role.as_str())
                    .record(at.elapsed().as_secs_f64());
            }
        }
        true
    }

    /// Fetches the snapshot from the entitlements role and applies it if newer.
    pub async fn fetch(&self) -> Result<i64, RequestError> {
        let Some(source) = &self.source else { return Ok(self.version()) };
        // The fetch has a span of its own (a root: it serves no one request), whose context the
        // entitlements role receives.
        let span = tracing::info_span!(parent: None, "rules_snapshot_fetch", role = %self.role);
        let trace = span.in_scope(crate::telemetry::trace_headers);
        let outcome = async {
            let token = source.tokens.token().await.map_err(RequestError::Token)?;
            let url = source.url.join("entitlements/snapshot")?;
            let mut request = source.http.get(url).headers(trace).bearer_auth(token);
            if self.is_loaded() {
                let epoch = self.epoch.lock().unwrap_or_else(|p| p.into_inner()).clone();
                request = request
                    .header(http::header::IF_NONE_MATCH, format!("\"{epoch}:{}\"", self.version()));
            }
            let response = request.send().await?;
            if response.status() == http::StatusCode::NOT_MODIFIED {
                return Ok(None);
            }
            if !response.status().is_success() {
                return Err(RequestError::Status(response.status()));
            }
            let wire: WireSnapshot = response.json().await?;
            let rules = wire.rules.into_iter().map(Rule::from).collect();
            Ok(Some((Snapshot::new(rules, wire.rules_version), wire.epoch)))
        }
        .instrument(span)
        .await;
        let fetched = match &outcome {
            Ok(Some((s, _))) => s.version(),
            _ => self.version(),
        };
        let label = match &outcome {
            Err(_) => "error",
            Ok(_) if fetched < self.announced() => "stale",
            Ok(Some(_)) => "ok",
            Ok(None) => "not_modified",
        };
        metrics::counter!(names::FETCHES, "role" => self.role.as_str(), "outcome" => label)
            .increment(1);
        if let Some((snapshot, epoch)) = outcome? {
            self.apply_from(snapshot, Some(epoch));
        }
        Ok(self.version().max(fetched))
    }

    /// Decides at the snapshot in place.
    pub fn decide(
        &self,
        identity: &Identity,
        resource: &str,
        action: &str,
    ) -> Result<Decision, Unavailable> {
        if !self.is_loaded() {
            return if self.fail_open {
                Ok(Decision { allowed: true, version: -1 })
            } else {
                Err(Unavailable::NoSnapshot)
            };
        }
        let snap = self.snapshot();
        let outcome = snap.evaluate(&request(identity, resource, action), Utc::now());
        Ok(Decision { allowed: outcome.allowed, version: snap.version() })
    }

    /// Decides at the newest version heard of: waits up to [`CATCH_UP`] for it to be applied
    /// when it is not yet, and fails (closed, or open if configured) when it is still not.
    pub async fn decide_current(
        &self,
        identity: &Identity,
        resource: &str,
        action: &str,
    ) -> Result<Decision, Unavailable> {
        let wanted = self.announced();
        if self.is_loaded() && self.version() < wanted {
            let mut applied = self.applied();
            let caught_up = tokio::time::timeout(CATCH_UP, applied.wait_for(|v| *v >= wanted));
            if !matches!(caught_up.await, Ok(Ok(_))) {
                if self.fail_open {
                    return Ok(Decision { allowed: true, version: self.version() });
                }
                return Err(Unavailable::NotApplied(wanted));
            }
        }
        self.decide(identity, resource, action)
    }

    /// Fetches whenever a newer version is announced (retrying a failed or stale fetch with a
    /// growing pause, 20 ms to 2 s) and every `interval` (at most [`FALLBACK_POLL`] unless the
    /// process's bus carries the versions), until shutdown.
    pub fn spawn_refresh(self: &Arc<Self>, interval: Duration, shutdown: Shutdown) {
        if self.source.is_none() {
            return;
        }
        let mirror = self.clone();
        tokio::spawn(async move {
            let mut retry: Option<Duration> = None;
            loop {
                let wait = match retry {
                    Some(pause) => pause,
                    None if !mirror.is_loaded() => Duration::ZERO,
                    None if !mirror.pushed.load(Ordering::Acquire) => interval.min(FALLBACK_POLL),
                    None => interval,
                };
                tokio::select! {
                    _ = mirror.wake.notified() => {}
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.stopping() => return,
                }
                let next =
                    |r: Option<Duration>| {
                        Some(r.map_or(Duration::from_millis(20), |d| {
                            (d * 2).min(Duration::from_secs(2))
                        }))
                    };
                retry = match mirror.fetch().await {
                    Ok(v) if v >= mirror.announced() => None,
                    Ok(_) => next(retry),
                    Err(e) => {
                        tracing::warn!(role = %mirror.role, error = %e, "cannot fetch the rules; deciding at the last snapshot");
                        next(retry)
                    }
                };
            }
        });
    }

    /// Follows the process's rules bus until shutdown.
    pub fn follow_bus(self: &Arc<Self>, mut versions: watch::Receiver<i64>, shutdown: Shutdown) {
        let mirror = self.clone();
        tokio::spawn(async move {
            loop {
                let v = *versions.borrow_and_update();
                if v >= 0 {
                    // An entitlements role in this process announces every change here.
                    mirror.pushed.store(true, Ordering::Release);
                    mirror.announce(v);
                }
                tokio::select! {
                    changed = versions.changed() => if changed.is_err() { return },
                    _ = shutdown.stopping() => return,
                }
            }
        });
    }

    /// Follows the Redis `rules` channel (the version is the message) until shutdown; after a
    /// reconnect, when one may have been missed, fetches anyway.
    pub fn follow_redis(
        self: &Arc<Self>,
        channels: &crate::backends::redis::Channels,
        channel: String,
        shutdown: Shutdown,
    ) {
        let mirror = self.clone();
        let channels = channels.clone();
        tokio::spawn(async move {
            let mut listener = match channels.listen(vec![channel]).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(role = %mirror.role, error = %e, "cannot follow rules versions on Redis; refreshing on the interval only");
                    return;
                }
            };
            // A lost connection wakes the refresher at once (then it polls); after a reconnect
            // one fetch catches up with what was missed.
            loop {
                tokio::select! {
                    m = listener.messages.recv() => match m {
                        Ok(m) => match m.value.as_string().and_then(|v| v.trim().parse::<i64>().ok()) {
                            Some(v) => mirror.announce(v),
                            None => mirror.wake.notify_one(),
                        },
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => mirror.wake.notify_one(),
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    },
                    Ok(_) = listener.reconnects.recv() => mirror.wake.notify_one(),
                    Ok(_) = listener.errors.recv() => mirror.wake.notify_one(),
                    _ = shutdown.stopping() => return,
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::IdentityKind;
    use serde_json::json;

    fn rule(n: u128, body: serde_json::Value) -> Rule {
        Rule {
            id: Uuid::from_u128(n),
            input: serde_json::from_value(body).unwrap(),
            created_at: Utc::now(),
            updated_at: Utc::now(),
            version: 1,
        }
    }

    fn alice() -> Identity {
        Identity {
            subject: "alice".into(),
            tenant: "t1".into(),
            roles: vec!["trader".into()],
            kind: IdentityKind::User,
            expires_at: 0,
        }
    }

    #[test]
    fn the_wire_snapshot_round_trips_every_field() {
        let r = rule(
            7,
            json!({"name": "n", "effect": "deny", "resource": "instrument:BRN-*", "actions": ["read"],
                "tenant_id": "t1", "roles": ["trader"], "priority": 5, "enabled": false,
                "conditions": [{"field": "context.x", "operator": "equals", "value": 1}],
                "expires_at": "2030-01-01T00:00:00Z"}),
        );
        let wire =
            WireSnapshot { epoch: "e".into(), rules_version: 9, rules: vec![WireRule::from(&r)] };
        let back: WireSnapshot =
            serde_json::from_str(&serde_json::to_string(&wire).unwrap()).unwrap();
        assert_eq!(Rule::from(back.rules[0].clone()), r);
    }

    #[test]
    fn decisions_carry_their_version_and_only_newer_snapshots_apply() {
        let allow = rule(
            1,
            json!({"name": "a", "effect": "allow", "resource": "instrument:*", "actions": ["read"]}),
        );
        let mirror = Mirror::fixed(Role::Stream, vec![allow.clone()], 3);
        let d = mirror.decide(&alice(), "instrument:BRN-F27", "read").unwrap();
        assert_eq!(d, Decision { allowed: true, version: 3 });
        let deny = rule(
            2,
            json!({"name": "d", "effect": "deny", "resource": "instrument:BRN-*", "actions": ["read"], "priority": 5}),
        );
        assert!(!mirror.apply(Snapshot::new(vec![], 2)), "an older snapshot never replaces");
        assert!(mirror.apply(Snapshot::new(vec![allow, deny], 4)));
        let d = mirror.decide(&alice(), "instrument:BRN-F27", "read").unwrap();
        assert_eq!(d, Decision { allowed: false, version: 4 });
        assert!(mirror.decide(&alice(), "instrument:NG-H", "read").unwrap().allowed);
    }

    #[test]
    fn a_snapshot_of_another_epoch_replaces_a_newer_version() {
        let mirror = Mirror::with(Role::Stream, None, false);
        assert!(mirror.apply_from(Snapshot::new(vec![], 7), Some("a".into())));
        assert!(
            !mirror.apply_from(Snapshot::new(vec![], 3), Some("a".into())),
            "same epoch, older"
        );
        assert!(mirror.apply_from(Snapshot::new(vec![], 1), Some("b".into())), "a new epoch");
        assert_eq!((mirror.version(), mirror.announced()), (1, 1));
        assert!(mirror.apply_from(Snapshot::new(vec![], 2), Some("b".into())));
    }

    #[test]
    fn nothing_is_decided_before_a_snapshot_unless_failing_open() {
        let closed = Mirror::with(Role::Gateway, None, false);
        assert!(closed.decide(&alice(), "x", "read").is_err());
        let open = Mirror::with(Role::Gateway, None, true);
        assert_eq!(
            open.decide(&alice(), "x", "read").unwrap(),
            Decision { allowed: true, version: -1 }
        );
    }
}
