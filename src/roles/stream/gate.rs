//! Entitlements on the stream's hot path: each record is checked against each recipient's
//! entitlement to its resource (the topic's `record_resource` rendered from the record), and
//! every open subscription is checked again whenever the rules change.
//!
//! Decisions are made in-process by the rules mirror ([`crate::policy::mirror`]),
//! the entitlements role's own evaluator over the same snapshot. A connection remembers its
//! decisions for the snapshot (rules version) they were made at ([`Memo`]): a record of an instrument the
//! connection has seen before costs one map lookup, and the first record after a new version is
//! decided afresh, as is the first after a rule of the version expires. A connection's memo is
//! bounded ([`MEMO_CAP`] decisions, emptied when full).

use std::collections::HashMap;
use std::sync::{Arc, Weak};

use chrono::Utc;
use serde_json::json;

use super::conn::{Conn, Delivery, Sink};
use super::outbox::Push;
use super::protocol::Close;
use super::topics::{Template, TopicSpec};
use crate::policy::eval::Snapshot;
use crate::policy::mirror::{self, Mirror};

/// The most decisions one connection remembers.
pub const MEMO_CAP: usize = 4096;

/// The per-record check of a topic.
#[derive(Debug, Clone)]
pub struct RecordCheck {
    /// The record's resource.
    pub template: Template,
    /// The action checked.
    pub action: String,
}

impl RecordCheck {
    /// The check of a registry topic, if it names a record resource (validated at start-up).
    pub fn of(spec: &TopicSpec) -> Option<RecordCheck> {
        let template = Template::parse(spec.record_resource.as_deref()?).ok()?;
        Some(RecordCheck { template, action: spec.record_action.clone() })
    }
}

/// A connection's decisions at one snapshot of the rules: action -> resource -> allowed.
#[derive(Debug, Default)]
pub struct Memo {
    /// The snapshot the decisions were made at. Compared by address: the weak reference keeps
    /// the allocation, so no later snapshot can have the same address while the memo holds it
    /// (a version number alone could repeat when the rules store starts again).
    snapshot: Weak<Snapshot>,
    /// When a rule of this version expires next (ms since the epoch): the decisions hold until
    /// then.
    until_ms: Option<i64>,
    decisions: HashMap<String, HashMap<String, bool>>,
    size: usize,
}

impl Memo {
    /// Forgets everything (a new credential, whose roles may differ).
    pub fn clear(&mut self) {
        self.decisions.clear();
        self.size = 0;
    }
}

/// Whether `conn` may do `action` on `resource` at `snap` (the mirror's current snapshot).
/// Before the mirror has loaded any snapshot, nothing is allowed unless the role fails open.
pub fn allowed(
    conn: &Conn,
    rules: &Mirror,
    snap: &Arc<Snapshot>,
    resource: &str,
    action: &str,
) -> bool {
    if !rules.is_loaded() {
        return rules.fails_open();
    }
    let now = Utc::now();
    let mut memo = conn.memo.lock().unwrap_or_else(|p| p.into_inner());
    if !std::ptr::eq(memo.snapshot.as_ptr(), Arc::as_ptr(snap))
        || memo.until_ms.is_some_and(|u| now.timestamp_millis() >= u)
    {
        memo.clear();
        memo.snapshot = Arc::downgrade(snap);
        memo.until_ms = snap.next_expiry(now).map(|at| at.timestamp_millis());
    }
    if let Some(hit) = memo.decisions.get(action).and_then(|by| by.get(resource)) {
        return *hit;
    }
    // The credential's own lock is taken and released here, never the other way round.
    let identity = conn.credential().verified.identity.clone();
    let allowed = snap.evaluate(&mirror::request(&identity, resource, action), Utc::now()).allowed;
    if memo.size >= MEMO_CAP {
        memo.clear();
    }
    memo.size += 1;
    memo.decisions.entry(action.to_string()).or_default().insert(resource.to_string(), allowed);
    allowed
}

/// Tells `conn` that the server ended its subscription to `topic` (`unsubscribed`, with the
/// reason): a WebSocket frame after the data frames already sent, an SSE `unsubscribed` event.
/// A connection whose queue is full is closed as a slow consumer.
pub fn tell_unsubscribed(conn: &Conn, topic: &str, reason: &str, message: &str) {
    let frame =
        json!({"type": "unsubscribed", "topics": [topic], "reason": reason, "message": message})
            .to_string();
    let pushed = match &conn.sink {
        Sink::Socket(socket) => socket.get().map_or(Push::Gone, |o| o.reply(|| frame)),
        Sink::Queue(queue) => match queue.try_send(Delivery::notice("unsubscribed", frame)) {
            Ok(()) => Push::Accepted,
            Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => Push::Full,
            Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => Push::Gone,
        },
    };
    if pushed == Push::Full {
        conn.closer.close(Close::SlowConsumer);
    }
}
