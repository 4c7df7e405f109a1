//! One record's fan-out: the record framed once ([`Fanout`]), handed to each recipient (written
//! to a WebSocket connection's [`super::outbox`], queued for an SSE connection), and what that did
//! ([`Tally`]), which the hub then counts. The hub picks the recipients; see `Hub::dispatch`.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use super::conn::{Conn, Delivery, Record, Sink};
use super::outbox::{text_frame, Mark, Push};
use super::protocol::Close;

/// One record on its way to its recipients, framed once.
pub(super) struct Fanout {
    /// The data frame (SSE connections' queues carry it).
    frame: Utf8Bytes,
    /// The same frame as a WebSocket text frame, written as is to every WebSocket recipient.
    ws_frame: bytes::Bytes,
    /// The record's topic, partition and offset.
    mark: Mark,
    timestamp_ms: i64,
}

/// What a fan-out did.
#[derive(Default)]
pub(super) struct Tally {
    pub(super) delivered: u64,
    pub(super) written: u64,
    pub(super) dropped: u64,
    /// Frames per tenant (a record usually reaches few tenants, so a short list beats a map).
    pub(super) per_tenant: Vec<(Arc<str>, u64)>,
    /// The transports of connections closed as slow consumers.
    pub(super) slow: Vec<&'static str>,
}

impl Tally {
    fn count_tenant(&mut self, tenant: &Arc<str>) {
        // Tenant names are shared per tenant (see `Hub::admit`), so the pointer usually decides;
        // the text compare keeps the count right if it does not.
        match self.per_tenant.iter_mut().find(|(t, _)| Arc::ptr_eq(t, tenant) || **t == **tenant) {
            Some((_, c)) => *c += 1,
            None => self.per_tenant.push((tenant.clone(), 1)),
        }
    }
}

impl Fanout {
    pub(super) fn new(record: &Record) -> Self {
        let frame = Utf8Bytes::from(record.frame());
        Fanout {
            ws_frame: text_frame(frame.as_bytes()),
            frame,
            mark: Mark {
                topic: record.topic.clone(),
                partition: record.partition,
                offset: record.offset,
            },
            timestamp_ms: record.timestamp_ms,
        }
    }

    /// Hands the record to `conn`: written to a WebSocket connection's socket (or left pending
    /// in its outbox), queued for an SSE connection; a connection over its bound is closed as a
    /// slow consumer.
    pub(super) fn deliver(&self, conn: &Arc<Conn>, tally: &mut Tally) {
        let outcome = match &conn.sink {
            Sink::Socket(socket) => {
                // The position moves under the outbox's lock, with the frame (see `outbox`).
                let sent = |m: &Mark| conn.sent(&m.topic, m.partition, m.offset);
                let pushed =
                    socket.get().map_or(Push::Gone, |o| o.push(&self.ws_frame, &self.mark, sent));
                if pushed == Push::Accepted {
                    tally.written += 1;
                }
                pushed
            }
            Sink::Queue(queue) => {
                let delivery = Delivery {
                    frame: self.frame.clone(),
                    topic: self.mark.topic.clone(),
                    partition: self.mark.partition,
                    offset: self.mark.offset,
                    timestamp_ms: self.timestamp_ms,
                    event: None,
                };
                match queue.try_send(delivery) {
                    Ok(()) => Push::Accepted,
                    Err(mpsc::error::TrySendError::Full(_)) => Push::Full,
                    Err(mpsc::error::TrySendError::Closed(_)) => Push::Gone,
                }
            }
        };
        match outcome {
            Push::Accepted => {
                tally.delivered += 1;
                conn.delivered.fetch_add(1, Ordering::Relaxed);
                tally.count_tenant(&conn.tenant);
            }
            // The client does not keep up.
            Push::Full => {
                tally.dropped += 1;
                if !conn.closer.token.is_cancelled() {
                    tally.slow.push(conn.transport);
                    tracing::info!(role = "stream", conn = conn.id, user = %conn.subject, "slow consumer; closing");
                }
                conn.closer.close(Close::SlowConsumer);
            }
            // The connection is going; its registration removes it.
            Push::Gone => {}
        }
    }
}
