//! One connection as the hub holds it ([`Conn`]: its identity, credential, queue and position),
//! how it is asked to close ([`Closer`]), and what its queue carries ([`Delivery`] of a
//! [`Record`]).

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, OnceLock};

use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tokio_util::sync::CancellationToken;

use super::hub::ConnId;
use super::outbox::Outbox;
use super::position::Positions;
use super::protocol::Close;
use crate::auth::Verified;

/// Which connections a record may reach, by its `tenant_id` ([`Record::scope`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope<'a> {
    /// No `tenant_id`: every tenant.
    Everyone,
    /// Only this tenant's connections.
    Tenant(&'a str),
    /// A `tenant_id` that is not a string: no tenant (counted as `invalid_tenant`).
    Nobody,
}

/// A record from Kafka or the in-process bus, parsed once.
#[derive(Debug, Clone)]
pub struct Record {
    /// The registry topic.
    pub topic: Arc<str>,
    /// Its partition.
    pub partition: i32,
    /// Its offset in the partition.
    pub offset: i64,
    /// The record's timestamp, milliseconds since the epoch.
    pub timestamp_ms: i64,
    /// The record key (instrument or entity id), when it is UTF-8.
    pub key: Option<String>,
    /// The value: a JSON object by contract; anything else is carried as a string.
    pub data: Value,
}

impl Record {
    /// Who may see the record: everyone when it names no tenant, that tenant when its
    /// `tenant_id` is a string, and nobody when `tenant_id` is present but not a string (a number,
    /// a list, an object, a boolean or null): tenant isolation fails closed.
    pub fn scope(&self) -> Scope<'_> {
        match self.data.get("tenant_id") {
            None => Scope::Everyone,
            Some(Value::String(tenant)) => Scope::Tenant(tenant),
            Some(_) => Scope::Nobody,
        }
    }

    /// Whether a connection of `tenant` may see the record.
    pub fn visible_to(&self, tenant: &str) -> bool {
        match self.scope() {
            Scope::Everyone => true,
            Scope::Tenant(t) => t == tenant,
            Scope::Nobody => false,
        }
    }

    /// The data frame sent to clients.
    pub fn frame(&self) -> String {
        json!({
            "type": "data",
            "topic": &*self.topic,
            "partition": self.partition,
            "offset": self.offset,
            "timestamp": self.timestamp_ms,
            "key": self.key,
            "data": self.data,
        })
        .to_string()
    }
}

/// One queued data frame.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The rendered frame, shared by every recipient.
    pub frame: Utf8Bytes,
    /// The record's topic.
    pub topic: Arc<str>,
    /// Its partition.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
    /// The record's timestamp (ms), for the delivery-latency histogram.
    pub timestamp_ms: i64,
    /// Not a record but a notice (the SSE event name: `delayed`, `delay_ended`): no position
    /// moves.
    pub notice: Option<&'static str>,
}

impl Delivery {
    /// A notice that is not a record (it moves no position): sent as the SSE event `event`.
    pub fn notice(event: &'static str, frame: String) -> Delivery {
        Delivery {
            frame: frame.into(),
            topic: "".into(),
            partition: -1,
            offset: -1,
            timestamp_ms: 0,
            notice: Some(event),
        }
    }
}

/// Closes a connection once, with the first reason given.
#[derive(Debug, Clone, Default)]
pub struct Closer {
    pub(super) token: CancellationToken,
    reason: Arc<OnceLock<Close>>,
}

impl Closer {
    /// Asks the connection to close with `why` (the first reason wins).
    pub fn close(&self, why: Close) {
        let _ = self.reason.set(why);
        self.token.cancel();
    }

    /// Resolves with the reason once a close was asked.
    pub async fn closed(&self) -> Close {
        self.token.cancelled().await;
        self.reason.get().copied().unwrap_or(Close::GoingAway)
    }
}

/// The credential a connection currently holds (a fresh `auth` replaces it).
#[derive(Debug, Clone)]
pub struct Credential {
    /// The token, kept to re-verify it when revocation announcements may have been missed.
    pub token: String,
    /// Its verification.
    pub verified: Arc<Verified>,
}

/// Where the hub puts a connection's data frames.
#[derive(Debug)]
pub(super) enum Sink {
    /// An SSE connection's queue, which its task reads.
    Queue(mpsc::Sender<Delivery>),
    /// A WebSocket connection's socket, which the hub writes itself; handed over once the
    /// upgrade is done (no subscription can exist before).
    Socket(OnceLock<Arc<Outbox>>),
}

/// One open connection.
#[derive(Debug)]
pub struct Conn {
    /// Its number on this replica.
    pub id: ConnId,
    /// Its id for clients: `<replica>-<number>`, unique across replicas.
    pub public_id: String,
    /// `ws` or `sse`.
    pub transport: &'static str,
    /// The user.
    pub subject: String,
    /// The tenant records are scoped to.
    pub tenant: Arc<str>,
    pub(super) credential: Mutex<Credential>,
    /// Closes it.
    pub closer: Closer,
    /// Where the hub puts its data frames.
    pub(super) sink: Sink,
    /// Frames queued for it.
    pub delivered: AtomicU64,
    /// Its position vector: set at subscribe, advanced as frames are written. A std mutex held
    /// for one update or read (taken under a WebSocket outbox's lock, never the other way).
    pub(super) positions: Mutex<Positions>,
    /// Its entitlement decisions at the current rules version (see `gate`). A std mutex held
    /// for one lookup or one evaluation.
    pub(super) memo: Mutex<super::gate::Memo>,
}

impl Conn {
    /// The credential in force.
    pub fn credential(&self) -> Credential {
        self.credential.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replaces the credential (same user and tenant, checked by the caller).
    pub fn renew(&self, credential: Credential) {
        *self.credential.lock().unwrap_or_else(|p| p.into_inner()) = credential;
        // Its roles may differ: decide afresh.
        self.memo.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// Records that the client has been sent `offset` of a partition (positions only move
    /// forward). A WebSocket connection's live frames call this under its outbox's lock, as the
    /// frame joins the socket's stream; recovered frames and SSE events just before they are
    /// written, by the connection's own task, which is also the one that reports the position.
    pub fn sent(&self, topic: &Arc<str>, partition: i32, offset: i64) {
        let mut positions = self.positions.lock().unwrap_or_else(|p| p.into_inner());
        match positions.get_mut(&(topic.clone(), partition)) {
            Some(at) => *at = (*at).max(offset + 1),
            None => {
                positions.insert((topic.clone(), partition), offset + 1);
            }
        }
    }

    /// Hands the hub this WebSocket connection's socket.
    pub fn attach(&self, outbox: Arc<Outbox>) {
        if let Sink::Socket(socket) = &self.sink {
            let _ = socket.set(outbox);
        }
    }

    /// Sets where the client is on a partition (a resume starts from the client's own position).
    pub fn set_position(&self, topic: &str, partition: i32, next: i64) {
        let mut positions = self.positions.lock().unwrap_or_else(|p| p.into_inner());
        positions.insert((topic.into(), partition), next);
    }

    /// Moves a partition's position forward to `next` (never back).
    pub fn advance(&self, topic: &str, partition: i32, next: i64) {
        let mut positions = self.positions.lock().unwrap_or_else(|p| p.into_inner());
        let at = positions.entry((topic.into(), partition)).or_insert(next);
        *at = (*at).max(next);
    }

    /// The position vector, encoded.
    pub fn position(&self) -> String {
        super::position::encode(&self.positions.lock().unwrap_or_else(|p| p.into_inner()))
    }
}
