//! Where records come from and where `POST /publish` puts them: the [`Publisher`] and [`History`]
//! seams, and the in-process bus (the embedded default, when no bootstrap broker is configured).
//! Kafka's side is [`super::kafka`].

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use serde::Serialize;
use serde_json::Value;

use super::hub::{Hub, Record};
use crate::backends::BackendError;
use crate::error::ApiError;

/// Where a published record landed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Position {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: i32,
    /// The offset.
    pub offset: i64,
}

/// Why the broker did not do what was asked: a publish, a history read (or the metadata request
/// either needs). The in-process bus never fails.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// A new connection to the broker could not be made.
    #[error(transparent)]
    Connect(#[from] BackendError),
    /// The broker answered with an error, or the connection failed.
    #[error(transparent)]
    Broker(#[from] rskafka::client::error::Error),
    /// No answer within the request deadline (a silent broker): the connection is dropped.
    #[error("no answer from the broker within {0:?}")]
    Deadline(Duration),
    /// The topic does not exist in the broker.
    #[error("topic {0} does not exist in Kafka")]
    UnknownTopic(String),
    /// The broker took the record but returned no offset for it.
    #[error("no offset returned")]
    NoOffset,
}

impl From<SourceError> for ApiError {
    fn from(e: SourceError) -> Self {
        ApiError::dependency("kafka", e)
    }
}

/// Puts records on a topic: Kafka, or the in-process bus.
pub trait Publisher: Send + Sync {
    /// Publishes one JSON value under an optional key.
    fn publish<'a>(
        &'a self,
        topic: &'a str,
        key: Option<String>,
        data: Value,
    ) -> BoxFuture<'a, Result<Position, SourceError>>;

    /// `kafka` or `memory`, for the status page.
    fn kind(&self) -> &'static str;
}

/// Parses a Kafka record value: JSON by contract; anything else travels as a string.
pub fn parse_value(value: Option<&[u8]>) -> Value {
    match value {
        None => Value::Null,
        Some(bytes) => serde_json::from_slice(bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(bytes).into_owned())),
    }
}

/// Reads a partition's past records, for resume.
pub trait History: Send + Sync {
    /// The records of `topic`/`partition` with offsets in `from..until`, in order. Fewer (or a
    /// first offset after `from`) means the rest are no longer kept.
    fn read<'a>(
        &'a self,
        topic: &'a str,
        partition: i32,
        from: i64,
        until: i64,
    ) -> BoxFuture<'a, Result<Vec<Record>, SourceError>>;
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

// --- the in-process bus ------------------------------------------------------------------------

/// The embedded default: one partition per topic, records numbered from 0 and kept (up to
/// `retain` per topic) so that a reader could go back, delivered to the hub as they are published.
pub struct MemoryBus {
    hub: Arc<Hub>,
    /// topic -> its log. A std mutex held while a record is numbered and dispatched, so records
    /// of one topic reach the hub in offset order; dispatch never waits.
    logs: Mutex<HashMap<String, MemoryLog>>,
    retain: usize,
}

#[derive(Default)]
struct MemoryLog {
    next: i64,
    records: VecDeque<Record>,
}

impl MemoryBus {
    /// A bus delivering to `hub`.
    pub fn new(hub: Arc<Hub>, retain: usize) -> Arc<Self> {
        for topic in hub.topics() {
            hub.set_head(&topic.name, 0, 0);
        }
        Arc::new(MemoryBus { hub, logs: Mutex::default(), retain })
    }
}

impl History for MemoryBus {
    fn read<'a>(
        &'a self,
        topic: &'a str,
        partition: i32,
        from: i64,
        until: i64,
    ) -> BoxFuture<'a, Result<Vec<Record>, SourceError>> {
        Box::pin(async move {
            if partition != 0 {
                return Ok(Vec::new());
            }
            let logs = self.logs.lock().unwrap_or_else(|p| p.into_inner());
            Ok(logs.get(topic).map_or_else(Vec::new, |log| {
                log.records
                    .iter()
                    .filter(|r| r.offset >= from && r.offset < until)
                    .cloned()
                    .collect()
            }))
        })
    }
}

impl Publisher for MemoryBus {
    fn publish<'a>(
        &'a self,
        topic: &'a str,
        key: Option<String>,
        data: Value,
    ) -> BoxFuture<'a, Result<Position, SourceError>> {
        Box::pin(async move {
            let mut logs = self.logs.lock().unwrap_or_else(|p| p.into_inner());
            let log = logs.entry(topic.to_string()).or_default();
            let record = Record {
                topic: topic.into(),
                partition: 0,
                offset: log.next,
                timestamp_ms: now_ms(),
                key,
                data,
            };
            log.next += 1;
            self.hub.dispatch(&record);
            let position = Position { topic: topic.into(), partition: 0, offset: record.offset };
            log.records.push_back(record);
            while log.records.len() > self.retain {
                log.records.pop_front();
            }
            Ok(position)
        })
    }

    fn kind(&self) -> &'static str {
        "memory"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_json_or_carried_as_text() {
        assert_eq!(parse_value(Some(br#"{"a":1}"#)), serde_json::json!({"a": 1}));
        assert_eq!(parse_value(Some(b"plain")), Value::String("plain".into()));
        assert_eq!(parse_value(None), Value::Null);
    }
}
