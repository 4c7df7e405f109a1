//! A WebSocket connection's outgoing side, written by the hub itself.
//!
//! Fanning a record out to ten thousand connections by waking ten thousand tasks (one queue
//! each) cost more than the writes: in profiles, waking and polling the tasks and framing the
//! same bytes once per connection was most of the replica's user time. So a WebSocket
//! connection's socket has two writers behind one lock:
//!
//! - the hub, which frames a record once ([`text_frame`]) and, for each recipient, writes those
//!   bytes straight to the socket without blocking ([`Outbox::push`]); whatever the socket does
//!   not take at once (or what tokio's cooperative budget of the dispatching task no longer lets
//!   it try) is kept in the connection's pending buffer;
//! - the connection's own task, whose tungstenite stream writes through [`Duplex`] (replies,
//!   pings, the close frame) and which drains the pending buffer when the socket can take more
//!   ([`Outbox::flush`]).
//!
//! A frame is always written or buffered whole, under the lock, so frames never interleave. The
//! hub only touches the socket while nothing is pending; from the moment something is pending
//! only the connection's task writes (with its own waker), so no wake-up is lost. The pending
//! buffer is bounded by frames and bytes: a client that stops reading is closed as a slow
//! consumer and memory does not grow with its backlog. While a `subscribe` with a resume position
//! is answered, live frames are held back ([`Outbox::hold`]) so that the reply and the recovered
//! records go first, in partition order.
//!
//! The connection's position moves with its frames: a data frame's [`Mark`] is applied (by the
//! caller's `sent`) under the same lock that appends the frame to the socket's byte stream, and a
//! reply that states the position ([`Outbox::reply`]) is rendered and appended under that lock
//! too. So a reply's position describes exactly the data frames before it on the wire: moving the
//! position after the write let a client read a frame and then a `get_stats` saying it had not
//! been sent, and resume with that record again.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use bytes::{Buf, Bytes, BytesMut};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf, ReadHalf, WriteHalf};
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;

/// The upgraded connection.
pub type Io = TokioIo<hyper::upgrade::Upgraded>;

/// A text frame as a server sends it (unmasked), ready to be written to any connection.
pub fn text_frame(payload: &[u8]) -> Bytes {
    let frame = Frame::message(Bytes::copy_from_slice(payload), OpCode::Data(Data::Text), true);
    let mut out = Vec::with_capacity(payload.len() + 10);
    // Formatting into a Vec cannot fail.
    let _ = frame.format(&mut out);
    Bytes::from(out)
}

/// Where a data frame sits: the connection's position moves past it once the frame is on its way
/// to the socket.
#[derive(Debug, Clone)]
pub struct Mark {
    /// The record's topic.
    pub topic: Arc<str>,
    /// Its partition.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
}

/// What became of a pushed frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    /// Written to the socket, or buffered to be written in order.
    Accepted,
    /// The pending buffer is over its bound: the client does not keep up.
    Full,
    /// The connection is gone.
    Gone,
}

/// The outgoing side of one WebSocket connection.
pub struct Outbox {
    /// The socket's write half, what it has not taken yet, and the hold. A std mutex: held for
    /// one non-blocking write or one append, never across an await.
    inner: Mutex<Inner>,
    /// Told when something became pending, so the connection's task drains it.
    pending: Notify,
    max_frames: usize,
    max_bytes: usize,
}

struct Inner {
    /// `None` once the connection ended.
    io: Option<WriteHalf<Io>>,
    /// Bytes accepted but not yet written, whole frames in order.
    buffer: BytesMut,
    /// Frames appended since the buffer was last empty (the bound counts these).
    frames: usize,
    /// Live frames held back while a resume is answered, with where each sits.
    held: Option<Vec<(Bytes, Mark)>>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // `try_lock`: a Debug print from under the lock must not deadlock.
        match self.inner.try_lock() {
            Ok(inner) => f
                .debug_struct("Outbox")
                .field("open", &inner.io.is_some())
                .field("pending_bytes", &inner.buffer.len())
                .field("pending_frames", &inner.frames)
                .field("holding", &inner.held.is_some())
                .finish(),
            Err(_) => f.write_str("Outbox { .. }"),
        }
    }
}

impl Outbox {
    /// An outbox over `io`'s write half, bounded at `max_frames` pending frames and `max_bytes`
    /// pending bytes.
    pub fn new(io: WriteHalf<Io>, max_frames: usize, max_bytes: usize) -> Self {
        Outbox {
            inner: Mutex::new(Inner {
                io: Some(io),
                buffer: BytesMut::new(),
                frames: 0,
                held: None,
            }),
            pending: Notify::new(),
            max_frames: max_frames.max(1),
            max_bytes: max_bytes.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A live data frame from the hub (held back during a resume). `sent` moves the
    /// connection's position past `mark`; it is called under the lock, as the frame joins the
    /// socket's stream (for a held frame, when it is released).
    pub fn push(&self, frame: &Bytes, mark: &Mark, sent: impl Fn(&Mark)) -> Push {
        let mut inner = self.lock();
        if inner.io.is_none() {
            return Push::Gone;
        }
        if inner.frames >= self.max_frames || inner.buffer.len() >= self.max_bytes {
            return Push::Full;
        }
        if let Some(held) = &mut inner.held {
            held.push((frame.clone(), mark.clone()));
            inner.frames += 1;
            return Push::Accepted;
        }
        let pushed = self.write_or_buffer(&mut inner, frame);
        if pushed == Push::Accepted {
            sent(mark);
        }
        pushed
    }

    /// A reply rendered by `render` under the lock, so that what it reads (the connection's
    /// position) matches the frames before it; written, or buffered after what is pending.
    pub fn reply(&self, render: impl FnOnce() -> String) -> Push {
        let mut inner = self.lock();
        if inner.io.is_none() {
            return Push::Gone;
        }
        if inner.buffer.len() >= self.max_bytes {
            return Push::Full;
        }
        let frame = text_frame(render().as_bytes());
        self.write_or_buffer(&mut inner, &frame)
    }

    /// Writes `bytes` now if nothing is pending and the socket takes them; buffers the rest.
    fn write_or_buffer(&self, inner: &mut Inner, bytes: &[u8]) -> Push {
        let mut rest = bytes;
        if inner.buffer.is_empty() {
            let Some(io) = inner.io.as_mut() else { return Push::Gone };
            // A no-op waker: if the socket is full, the connection's task writes the rest with
            // its own waker (see the module comment).
            let mut cx = Context::from_waker(Waker::noop());
            match Pin::new(io).poll_write(&mut cx, rest) {
                Poll::Ready(Ok(n)) => rest = &rest[n.min(rest.len())..],
                Poll::Ready(Err(_)) => {
                    inner.io = None;
                    return Push::Gone;
                }
                Poll::Pending => {}
            }
            if rest.is_empty() {
                return Push::Accepted;
            }
        }
        let was_empty = inner.buffer.is_empty();
        inner.buffer.extend_from_slice(rest);
        inner.frames += 1;
        if was_empty {
            self.pending.notify_one();
        }
        Push::Accepted
    }

    /// Holds live frames back until [`Outbox::release`].
    pub fn hold(&self) {
        let mut inner = self.lock();
        inner.held.get_or_insert_with(Vec::new);
    }

    /// Sends the held frames, in order, after what was written meanwhile; `sent` moves the
    /// position past each, as for [`Outbox::push`].
    pub fn release(&self, sent: impl Fn(&Mark)) {
        let mut inner = self.lock();
        let Some(held) = inner.held.take() else { return };
        inner.frames = inner.frames.saturating_sub(held.len());
        for (frame, mark) in held {
            if self.write_or_buffer(&mut inner, &frame) == Push::Gone {
                return;
            }
            sent(&mark);
        }
    }

    /// Waits until something is pending, then writes it all; `Err` when the socket failed.
    /// Cancel-safe: what is not written stays pending.
    pub async fn flush(&self) -> io::Result<()> {
        loop {
            let notified = self.pending.notified();
            if !self.lock().buffer.is_empty() {
                break;
            }
            notified.await;
        }
        self.drain().await
    }

    /// Writes everything pending; returns at once when nothing is.
    pub async fn drain(&self) -> io::Result<()> {
        std::future::poll_fn(|cx| self.poll_drain(cx)).await
    }

    fn poll_drain(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut inner = self.lock();
        let Inner { io, buffer, frames, .. } = &mut *inner;
        let Some(socket) = io.as_mut() else {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        };
        while !buffer.is_empty() {
            match Pin::new(&mut *socket).poll_write(cx, buffer) {
                Poll::Ready(Ok(0)) => {
                    *io = None;
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                Poll::Ready(Ok(n)) => buffer.advance(n),
                Poll::Ready(Err(e)) => {
                    *io = None;
                    return Poll::Ready(Err(e));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
        *frames = 0;
        // Give the allocation back once a large backlog is written.
        if buffer.capacity() > 64 * 1024 {
            *buffer = BytesMut::new();
        }
        Poll::Ready(Ok(()))
    }

    /// Closes the write side: later pushes are `Gone`.
    pub fn shutdown(&self) {
        self.lock().io = None;
    }
}

/// The connection as tungstenite sees it: reads from the socket, writes through the outbox (so
/// replies and control frames are ordered with the hub's data frames).
pub struct Duplex {
    read: ReadHalf<Io>,
    outbox: std::sync::Arc<Outbox>,
}

impl Duplex {
    /// Splits `io`: tungstenite reads its read half; the returned outbox owns the write half.
    pub fn new(io: Io, max_frames: usize, max_bytes: usize) -> (Duplex, std::sync::Arc<Outbox>) {
        let (read, write) = tokio::io::split(io);
        let outbox = std::sync::Arc::new(Outbox::new(write, max_frames, max_bytes));
        (Duplex { read, outbox: outbox.clone() }, outbox)
    }
}

impl AsyncRead for Duplex {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.read).poll_read(cx, buf)
    }
}

impl AsyncWrite for Duplex {
    /// Takes the whole buffer (tungstenite hands over whole frames) or fails when the connection
    /// is gone or its backlog is over the byte bound.
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let outbox = &self.outbox;
        let mut inner = outbox.lock();
        if inner.buffer.len() >= outbox.max_bytes {
            return Poll::Ready(Err(io::Error::other("the client does not read its frames")));
        }
        match outbox.write_or_buffer(&mut inner, buf) {
            Push::Gone => Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
            _ => Poll::Ready(Ok(buf.len())),
        }
    }

    /// Accepted bytes are the outbox's to write; the connection's task drains it.
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_text_frame_is_unmasked_with_the_right_length() {
        let short = text_frame(b"hello");
        assert_eq!(&short[..], b"\x81\x05hello");
        let long = text_frame(&[b'x'; 300]);
        assert_eq!(&long[..4], &[0x81, 126, 0x01, 0x2c]);
        assert_eq!(long.len(), 304);
    }
}
