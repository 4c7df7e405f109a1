//! The stream's JSON protocol (`docs/stream-protocol.md`): the client's actions, the server's
//! frames, and the close codes. Pure: parsing and building text, no I/O.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{json, Value};

/// A client action, parsed.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case", deny_unknown_fields)]
pub enum Action {
    /// Subscribe to topics, each with an optional filter.
    Subscribe {
        /// Registry topic names.
        topics: Vec<String>,
        /// Per-topic filters (`topics.Filter` syntax).
        #[serde(default)]
        filters: BTreeMap<String, Value>,
        /// A position vector to resume from (`position`).
        #[serde(default)]
        position: Option<String>,
        /// Echoed in the answer.
        #[serde(default)]
        id: Option<Value>,
    },
    /// Stop receiving topics.
    Unsubscribe {
        /// Topic names.
        topics: Vec<String>,
        /// Echoed.
        #[serde(default)]
        id: Option<Value>,
    },
    /// Answered with `pong`.
    Ping {
        /// Echoed.
        #[serde(default)]
        id: Option<Value>,
    },
    /// The registry, with this connection's subscriptions marked.
    ListTopics {
        /// Echoed.
        #[serde(default)]
        id: Option<Value>,
    },
    /// This connection's counters.
    GetStats {
        /// Echoed.
        #[serde(default)]
        id: Option<Value>,
    },
    /// A (fresh) token: authenticates a connection opened without one, or extends one before
    /// its token expires.
    Auth {
        /// The JWT.
        token: String,
        /// Echoed.
        #[serde(default)]
        id: Option<Value>,
    },
}

/// Why a client frame was refused; the connection stays up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// `malformed_message`, `unknown_action` or `invalid_request`.
    pub code: &'static str,
    /// For the human.
    pub message: String,
    /// The frame's `id`, when it had one.
    pub id: Option<Value>,
}

/// The actions a client may send.
pub const ACTIONS: [&str; 6] =
    ["subscribe", "unsubscribe", "ping", "list_topics", "get_stats", "auth"];

/// Parses one text frame.
pub fn parse(text: &str) -> Result<Action, Refused> {
    let value: Value = serde_json::from_str(text).map_err(|e| Refused {
        code: "malformed_message",
        message: format!("not a JSON object: {e}"),
        id: None,
    })?;
    let id = value.get("id").cloned();
    let Some(action) = value.get("action").and_then(Value::as_str) else {
        return Err(Refused {
            code: "invalid_request",
            message: "a frame is a JSON object with an \"action\"".into(),
            id,
        });
    };
    if !ACTIONS.contains(&action) {
        return Err(Refused {
            code: "unknown_action",
            message: format!("unknown action {action:?}; one of {}", ACTIONS.join(", ")),
            id,
        });
    }
    let action = action.to_string();
    serde_json::from_value(value).map_err(|e| Refused {
        code: "invalid_request",
        message: format!("{action}: {e}"),
        id,
    })
}

/// An error frame.
pub fn error(code: &str, message: &str, id: Option<&Value>) -> String {
    let mut frame = json!({"type": "error", "code": code, "message": message});
    if let Some(id) = id {
        frame["id"] = id.clone();
    }
    frame.to_string()
}

/// Adds the request's `id` to a response frame and renders it.
pub fn reply(mut frame: Value, id: Option<&Value>) -> String {
    if let Some(id) = id {
        frame["id"] = id.clone();
    }
    frame.to_string()
}

/// Why the server closes a connection: the WebSocket close code and the reason text (the stable
/// code name). Also the `code` of SSE's last event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Close {
    /// The server is shutting down (1001).
    GoingAway,
    /// No valid token in time, or the token was refused (4001).
    Unauthenticated,
    /// The token expired without a fresh `auth` (4002).
    TokenExpired,
    /// The token or its user was revoked (4003).
    Revoked,
    /// The client did not keep up with its outgoing queue (4008).
    SlowConsumer,
    /// No pong (or any frame) within the pong timeout (4009).
    HeartbeatTimeout,
    /// A connection limit (per user or tenant) was reached after a first-frame auth (4029).
    TooManyConnections,
    /// The token could not be checked (the revocation store or the keys are unavailable): try
    /// again later (1013).
    TryAgainLater,
    /// A client message over `stream.max_message_bytes` (1009, RFC 6455 7.4.1).
    MessageTooBig,
    /// A text message that is not UTF-8 (1007).
    InvalidPayload,
    /// A frame that breaks the WebSocket protocol (1002).
    ProtocolError,
    /// A client that breaks this protocol's rules in a way an error frame cannot answer (1008).
    PolicyViolation,
}

impl Close {
    /// The WebSocket close code.
    pub fn code(self) -> u16 {
        match self {
            Close::GoingAway => 1001,
            Close::Unauthenticated => 4001,
            Close::TokenExpired => 4002,
            Close::Revoked => 4003,
            Close::SlowConsumer => 4008,
            Close::HeartbeatTimeout => 4009,
            Close::TooManyConnections => 4029,
            Close::TryAgainLater => 1013,
            Close::MessageTooBig => 1009,
            Close::InvalidPayload => 1007,
            Close::ProtocolError => 1002,
            Close::PolicyViolation => 1008,
        }
    }

    /// The close a read error calls for, when the peer is still there to be told: a message too
    /// big, invalid UTF-8, a protocol violation. `None` when the connection itself failed.
    pub fn for_read_error(error: &tokio_tungstenite::tungstenite::Error) -> Option<Close> {
        use tokio_tungstenite::tungstenite::Error;
        match error {
            Error::Capacity(_) => Some(Close::MessageTooBig),
            Error::Utf8(_) => Some(Close::InvalidPayload),
            Error::Protocol(_) => Some(Close::ProtocolError),
            Error::AttackAttempt => Some(Close::PolicyViolation),
            _ => None,
        }
    }

    /// The stable name, used as the close reason and as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Close::GoingAway => "going_away",
            Close::Unauthenticated => "unauthenticated",
            Close::TokenExpired => "token_expired",
            Close::Revoked => "revoked",
            Close::SlowConsumer => "slow_consumer",
            Close::HeartbeatTimeout => "heartbeat_timeout",
            Close::TooManyConnections => "too_many_connections",
            Close::TryAgainLater => "dependency_unavailable",
            Close::MessageTooBig => "message_too_big",
            Close::InvalidPayload => "invalid_payload",
            Close::ProtocolError => "protocol_error",
            Close::PolicyViolation => "policy_violation",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions_parse() {
        let a = parse(r#"{"action":"subscribe","topics":["t"],"filters":{"t":{"x":1}},"id":7}"#)
            .unwrap();
        let Action::Subscribe { topics, filters, id, .. } = a else { panic!("{a:?}") };
        assert_eq!(topics, vec!["t"]);
        assert_eq!(filters["t"], json!({"x": 1}));
        assert_eq!(id, Some(json!(7)));
        assert_eq!(parse(r#"{"action":"ping"}"#).unwrap(), Action::Ping { id: None });
        assert!(matches!(parse(r#"{"action":"auth","token":"x"}"#), Ok(Action::Auth { .. })));
    }

    #[test]
    fn bad_frames_get_stable_codes_and_keep_the_id() {
        assert_eq!(parse("{nope").unwrap_err().code, "malformed_message");
        let unknown = parse(r#"{"action":"dance","id":"a"}"#).unwrap_err();
        assert_eq!((unknown.code, unknown.id), ("unknown_action", Some(json!("a"))));
        assert_eq!(parse(r#"{"topics":[]}"#).unwrap_err().code, "invalid_request");
        let missing = parse(r#"{"action":"subscribe","id":3}"#).unwrap_err();
        assert_eq!(missing.code, "invalid_request");
        assert!(missing.message.contains("topics"), "{}", missing.message);
        assert_eq!(parse(r#"{"action":"ping","extra":1}"#).unwrap_err().code, "invalid_request");
    }

    #[test]
    fn frames_render() {
        let e: Value = serde_json::from_str(&error("forbidden", "no", Some(&json!(1)))).unwrap();
        assert_eq!(e, json!({"type": "error", "code": "forbidden", "message": "no", "id": 1}));
        assert_eq!(Close::SlowConsumer.code(), 4008);
        assert_eq!(Close::GoingAway.as_str(), "going_away");
    }
}
