//! Changing a connection's subscriptions: the entitled subscribe every transport uses, and the
//! `sse-control` relay (`docs/contracts.md`) through which a replica that does not hold an SSE
//! connection forwards `POST`/`DELETE /sse/subscribe` to the one that does.
//!
//! A relayed request goes out on `<prefix>sse-control` with a request id and this replica's reply
//! channel (`<prefix>sse-control:<replica>`); the replica holding the connection applies it and
//! publishes the answer there. No answer within the relay timeout means no replica holds it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fred::prelude::{ClientLike, EventInterface, PubsubInterface};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::oneshot;

use super::hub::Conn;
use super::topics::Filter;
use super::State;
use crate::backends::breaker::CallError;
use crate::backends::redis::{Guarded, SubscriberClient};
use crate::error::{ApiError, ErrorCode};

/// Why the relay could not forward a request, or listen (Redis failing).
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The publish did not succeed (breaker open, failed, unanswered).
    #[error(transparent)]
    Unavailable(#[from] CallError),
    /// Subscribing to the control channels failed (at start-up).
    #[error("redis subscribe: {0}")]
    Subscribe(#[source] fred::error::Error),
    /// The request could not be encoded.
    #[error("cannot encode the request: {0}")]
    Encode(#[from] serde_json::Error),
}

impl From<RelayError> for ApiError {
    fn from(e: RelayError) -> Self {
        ApiError::dependency("redis", e)
    }
}

/// Subscribes `conn` to each topic it may see. Returns the topics subscribed, the failures, and
/// for each partition of the subscribed topics where live delivery starts.
pub async fn subscribe(
    state: &State,
    conn: &Arc<Conn>,
    topics: &[String],
    filters: &BTreeMap<String, Value>,
) -> (Vec<String>, Vec<Value>, Vec<(String, i32, i64)>) {
    let identity = conn.credential().verified.identity.clone();
    let (mut ok, mut failed, mut live) = (Vec::new(), Vec::new(), Vec::new());
    let fail = |topic: &str, code: &str, message: String| json!({"topic": topic, "code": code, "message": message});
    for topic in filters.keys().filter(|t| !topics.contains(t)) {
        failed.push(fail(topic, "invalid_filter", "a filter for a topic not in \"topics\"".into()));
    }
    let mut seen = HashSet::new();
    for topic in topics.iter().filter(|t| seen.insert(t.as_str())) {
        let Some(spec) = state.hub.topic(topic) else {
            failed.push(fail(
                topic,
                "unknown_topic",
                format!("{topic} is not a stream topic; list_topics shows them"),
            ));
            continue;
        };
        let filter = match filters.get(topic).map(Filter::parse).transpose() {
            Ok(f) => f,
            Err(e) => {
                failed.push(fail(topic, "invalid_filter", e));
                continue;
            }
        };
        let decision = state.rules.decide_current(&identity, &spec.resource, &spec.action).await;
        match decision.map(|d| (d.allowed, d.version)) {
            Ok((true, version)) => {
                let heads = state.hub.subscribe(conn, topic, filter);
                // The rules moved between the decision and the subscription: the hub's
                // re-evaluation may have run before this subscription existed, so decide again.
                if state.rules.version() != version
                    && !state
                        .rules
                        .decide(&identity, &spec.resource, &spec.action)
                        .is_ok_and(|d| d.allowed)
                {
                    state.hub.unsubscribe(conn, topic);
                    failed.push(fail(
                        topic,
                        ErrorCode::Forbidden.as_str(),
                        format!("not entitled to {} {}", spec.action, spec.resource),
                    ));
                    continue;
                }
                live.extend(heads.into_iter().map(|(p, head)| (topic.clone(), p, head)));
                ok.push(topic.clone());
            }
            Ok((false, _)) => failed.push(fail(
                topic,
                ErrorCode::Forbidden.as_str(),
                format!("not entitled to {} {}", spec.action, spec.resource),
            )),
            Err(e) => {
                tracing::warn!(role = "stream", topic = %topic, error = %e, "entitlement check failed");
                failed.push(fail(
                    topic,
                    ErrorCode::DependencyUnavailable.as_str(),
                    "entitlements are unavailable; try again".into(),
                ))
            }
        }
    }
    (ok, failed, live)
}

/// What a control request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// Add topics.
    Subscribe,
    /// Remove topics.
    Unsubscribe,
}

/// A change to an SSE connection's topics, as relayed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Request {
    /// Matches the reply.
    pub request_id: String,
    /// Where the reply goes.
    pub reply_to: String,
    /// The connection.
    pub connection_id: String,
    /// The verified caller, who must own the connection.
    pub subject: String,
    /// The caller's tenant.
    pub tenant: String,
    /// Subscribe or unsubscribe.
    pub op: Op,
    /// Topics.
    pub topics: Vec<String>,
    /// Filters (subscribe).
    #[serde(default)]
    pub filters: BTreeMap<String, Value>,
}

/// The answer to a control request: an HTTP status and body.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reply {
    /// Matches the request.
    pub request_id: String,
    /// HTTP status.
    pub status: u16,
    /// JSON body.
    pub body: Value,
}

/// Applies a control request to a connection of this replica.
pub async fn apply(
    state: &State,
    conn: &Arc<Conn>,
    subject: &str,
    tenant: &str,
    op: Op,
    topics: &[String],
    filters: &BTreeMap<String, Value>,
) -> (u16, Value) {
    if conn.subject != subject || &*conn.tenant != tenant {
        return (
            403,
            json!({"code": "forbidden", "message": "this connection belongs to another user"}),
        );
    }
    match op {
        Op::Subscribe => {
            let (ok, failed, _) = subscribe(state, conn, topics, filters).await;
            (200, json!({"connection_id": conn.public_id, "topics": ok, "failed": failed}))
        }
        Op::Unsubscribe => {
            let removed: Vec<&String> =
                topics.iter().filter(|t| state.hub.unsubscribe(conn, t)).collect();
            (200, json!({"connection_id": conn.public_id, "topics": removed}))
        }
    }
}

/// The relay between replicas. It publishes through the process's Redis connection and its
/// breaker: with Redis down a relayed request fails at once (503 `dependency_unavailable`)
/// instead of waiting for the command timeout.
pub struct Relay {
    redis: Guarded,
    channel: String,
    reply_channel: String,
    timeout: Duration,
    /// Requests waiting for their reply. A std mutex held for one insert or removal.
    pending: Mutex<HashMap<String, oneshot::Sender<Reply>>>,
}

impl Relay {
    /// A relay on `<prefix>sse-control`, replying to this replica's own channel.
    pub fn new(redis: Guarded, prefix: &str, replica: &str, timeout: Duration) -> Arc<Self> {
        Arc::new(Relay {
            redis,
            channel: format!("{prefix}sse-control"),
            reply_channel: format!("{prefix}sse-control:{replica}"),
            timeout,
            pending: Mutex::default(),
        })
    }

    /// Forwards a request; `None` when no replica answered in time (no such connection).
    pub async fn forward(&self, mut request: Request) -> Result<Option<Reply>, RelayError> {
        request.request_id = uuid::Uuid::new_v4().simple().to_string();
        request.reply_to = self.reply_channel.clone();
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(request.request_id.clone(), tx);
        let text = serde_json::to_string(&request)?;
        let channel = self.channel.clone();
        let sent =
            self.redis.call(|c| async move { c.publish::<i64, _, _>(channel, text).await }).await;
        let answer = match sent {
            Ok(_) => tokio::time::timeout(self.timeout, rx).await.ok().and_then(Result::ok),
            Err(e) => {
                self.forget(&request.request_id);
                return Err(e.into());
            }
        };
        self.forget(&request.request_id);
        Ok(answer)
    }

    fn forget(&self, request_id: &str) {
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).remove(request_id);
    }

    /// Listens on the control channel (requests for connections of this replica) and this
    /// replica's reply channel until shutdown.
    pub async fn listen(
        self: Arc<Self>,
        state: State,
        subscriber: SubscriberClient,
    ) -> Result<(), RelayError> {
        subscriber
            .subscribe(vec![self.channel.clone(), self.reply_channel.clone()])
            .await
            .map_err(RelayError::Subscribe)?;
        let _resubscribe = subscriber.manage_subscriptions();
        let mut messages = subscriber.message_rx();
        let shutdown = state.shutdown.clone();
        tokio::spawn(async move {
            loop {
                let message = tokio::select! {
                    m = messages.recv() => match m {
                        Ok(m) => m,
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    },
                    _ = shutdown.stopping() => {
                        let _ = subscriber.quit().await;
                        return;
                    }
                };
                let text = message.value.as_string().unwrap_or_default();
                if message.channel == self.reply_channel {
                    if let Ok(reply) = serde_json::from_str::<Reply>(&text) {
                        let waiting = self
                            .pending
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .remove(&reply.request_id);
                        if let Some(tx) = waiting {
                            let _ = tx.send(reply);
                        }
                    }
                    continue;
                }
                let Ok(request) = serde_json::from_str::<Request>(&text) else {
                    tracing::warn!(role = "stream", "ignoring a malformed sse-control message");
                    continue;
                };
                let Some(conn) = state.hub.find(&request.connection_id) else { continue };
                let (relay, state) = (self.clone(), state.clone());
                tokio::spawn(async move {
                    let (status, body) = apply(
                        &state,
                        &conn,
                        &request.subject,
                        &request.tenant,
                        request.op,
                        &request.topics,
                        &request.filters,
                    )
                    .await;
                    let reply = Reply { request_id: request.request_id, status, body };
                    let text = serde_json::to_string(&reply).unwrap_or_default();
                    let to = request.reply_to;
                    let sent = relay
                        .redis
                        .call(|c| async move { c.publish::<i64, _, _>(to, text).await })
                        .await;
                    if let Err(e) = sent {
                        tracing::warn!(role = "stream", error = %e, "cannot answer a relayed sse-control request");
                    }
                });
            }
        });
        Ok(())
    }
}
