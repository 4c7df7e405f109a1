//! Resume: the records a client missed while away, read straight from Kafka (or the in-process
//! bus) up to a bound in count and age, and whether the recovery was complete (`recovered`, as
//! Centrifugo reports it).
//!
//! A subscription made now starts at each partition's head (`Hub::subscribe`); records at or
//! after the head arrive live through the connection's queue. A resume reads `from..head` for
//! each partition of the position and sends those before anything queued, so every missed record
//! arrives once, in partition order.

use std::time::Duration;

use super::hub::{Conn, Hub, Record};
use super::source::History;

/// How far back a resume may go.
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    /// The most records per partition.
    pub max_records: i64,
    /// The oldest record, by its timestamp.
    pub max_age: Duration,
    /// How long the whole read may take (`stream.relay_timeout`): a resume asked while the
    /// broker is down answers `recovered: false` by then instead of waiting for it.
    pub deadline: Duration,
}

/// What a resume found.
#[derive(Debug, Default)]
pub struct Recovery {
    /// The missed records the connection may see, to be sent before live ones.
    pub records: Vec<Record>,
    /// Whether every missed record was found within the bound.
    pub recovered: bool,
}

/// Recovers the records of `wanted` ((topic, partition, next offset) as the client last saw
/// them) up to `live` ((topic, partition, head) of the subscriptions just made).
pub async fn recover(
    history: &dyn History,
    hub: &Hub,
    conn: &Conn,
    wanted: &[(String, i32, i64)],
    live: &[(String, i32, i64)],
    bound: Bound,
) -> Recovery {
    let mut recovery = Recovery { records: Vec::new(), recovered: true };
    let until = tokio::time::Instant::now() + bound.deadline;
    let oldest = chrono::Utc::now().timestamp_millis() - bound.max_age.as_millis() as i64;
    for (topic, partition, from) in wanted {
        let Some((_, _, head)) = live.iter().find(|(t, p, _)| t == topic && p == partition) else {
            // Not subscribed now (ignored), or a partition this replica does not know yet.
            if live.iter().any(|(t, _, _)| t == topic) {
                recovery.recovered = false;
            }
            continue;
        };
        let (from, head) = (*from, *head);
        if from == head {
            continue;
        }
        if from > head || head - from > bound.max_records {
            // Offsets went backwards (the topic was recreated), or too much was missed.
            recovery.recovered = false;
            continue;
        }
        let read = tokio::time::timeout_at(until, history.read(topic, *partition, from, head));
        let records = match read.await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                tracing::warn!(role = "stream", topic = %topic, partition, error = %e, "resume read failed");
                recovery.recovered = false;
                continue;
            }
            Err(_) => {
                tracing::warn!(role = "stream", topic = %topic, partition, deadline = ?bound.deadline, "resume read timed out");
                recovery.recovered = false;
                continue;
            }
        };
        let complete = records.len() as i64 == head - from
            && records.first().is_some_and(|r| r.offset == from)
            && records.iter().all(|r| r.timestamp_ms >= oldest);
        if !complete {
            recovery.recovered = false;
        }
        conn.set_position(topic, *partition, from);
        recovery.records.extend(
            records.into_iter().filter(|r| r.timestamp_ms >= oldest && hub.accepts(conn, r)),
        );
    }
    recovery
}
