//! WebSocket clients (`/ws/stream`, `/ws/`): the upgrade (tokio-tungstenite over hyper's upgraded
//! connection), authentication, and one task per connection that serves the protocol of
//! [`super::protocol`] and writes the hub's deliveries.
//!
//! The token comes from the `token` query parameter (never logged), the `Authorization` header,
//! or a first `{"action":"auth"}` frame within `stream.auth_timeout`. A token given with the
//! upgrade request is checked before the upgrade, so a bad one gets an HTTP 401 with the JSON
//! error body; after the upgrade, errors are frames and closes carry a stable code.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State as AxumState};
use axum::response::{IntoResponse, Response};
use futures::{SinkExt, StreamExt};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role as WsRole, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::control;
use super::hub::{Conn, Record, Registration};
use super::outbox::{Duplex, Mark, Outbox, Push};
use super::protocol::{self, Action, Close};
use super::resume;
use super::{names, State};
use crate::auth::unix_now;
use crate::error::ApiError;

type Socket = WebSocketStream<Duplex>;

/// The upgrade handler.
pub async fn upgrade(
    AxumState(state): AxumState<State>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    mut req: Request,
) -> Result<Response, ApiError> {
    let headers = req.headers();
    let is_upgrade = header_has(headers, http::header::UPGRADE, "websocket")
        && header_has(headers, http::header::CONNECTION, "upgrade");
    let key = headers.get(http::header::SEC_WEBSOCKET_KEY).cloned();
    let (true, Some(key)) = (is_upgrade, key) else {
        return Err(ApiError::invalid_request(
            "this is a WebSocket endpoint: send a WebSocket upgrade (Upgrade: websocket)",
        ));
    };
    if headers.get(http::header::SEC_WEBSOCKET_VERSION).is_none_or(|v| v != "13") {
        return Err(ApiError::invalid_request("only WebSocket version 13 is supported"));
    }
    super::check_origin(&state, req.headers())?;
    super::check_admission(&state)?;
    let credential = match super::token_from(&req) {
        Some(token) => Some(super::verify(&state, &token).await?),
        None => None,
    };
    let registration = match credential {
        Some(c) => Some(super::admit(&state, "ws", c)?),
        None => None,
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    let config = ws_config(&state.config);
    let (max_frames, max_bytes) =
        (state.config.limits.send_queue, state.config.max_write_buffer_bytes);
    // The connection's task lives as long as the connection: what it holds across its awaits
    // is memory per connection (2,704 bytes measured with the handshake and request handling
    // boxed below; 3,768 before).
    let fut = async move {
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(role = "stream", peer = %peer, error = %e, "upgrade failed");
                return;
            }
        };
        let (duplex, outbox) = Duplex::new(TokioIo::new(upgraded), max_frames, max_bytes);
        let socket = WebSocketStream::from_raw_socket(duplex, WsRole::Server, Some(config)).await;
        serve(socket, &outbox, state, registration).await;
        // Whatever the hub still holds for this connection, the socket is closed now.
        outbox.shutdown();
    };
    tokio::spawn(fut);
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    Ok(Response::builder()
        .status(http::StatusCode::SWITCHING_PROTOCOLS)
        .header(http::header::UPGRADE, "websocket")
        .header(http::header::CONNECTION, "Upgrade")
        .header(http::header::SEC_WEBSOCKET_ACCEPT, accept)
        .body(Body::empty())
        .map_err(ApiError::internal)?
        .into_response())
}

fn header_has(headers: &http::HeaderMap, name: http::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str().is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

/// Buffers sized for many mostly idle connections: tungstenite's defaults (128 KiB read buffer)
/// would cost more per connection than the rest of it.
fn ws_config(config: &super::Config) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(config.read_buffer_bytes)
        .write_buffer_size(config.write_buffer_bytes)
        .max_write_buffer_size(config.max_write_buffer_bytes)
        .max_message_size(Some(config.max_message_bytes))
        .max_frame_size(Some(config.max_message_bytes))
}

/// Serves one connection to its end.
async fn serve(
    socket: Socket,
    outbox: &Arc<Outbox>,
    state: State,
    registration: Option<Registration>,
) {
    let (mut sink, mut stream) = socket.split();
    let registration = match registration {
        Some(r) => r,
        // Boxed: the handshake's state (a token verification, perhaps a key fetch) is freed once
        // it is done instead of sizing the connection's task for its whole life.
        None => match Box::pin(first_frame_auth(&mut sink, &mut stream, &state, outbox)).await {
            Some(r) => r,
            None => return,
        },
    };
    // From here on the hub writes this connection's data frames itself.
    registration.conn.attach(outbox.clone());
    let mut session = Session::new(state, registration, outbox.clone());
    let why = session.run(&mut sink, &mut stream).await;
    metrics::counter!(names::CLOSES, "role" => "stream", "transport" => "ws", "reason" => why)
        .increment(1);
}

/// Waits for `{"action":"auth"}` as the first frame; closes with `unauthenticated` otherwise.
async fn first_frame_auth(
    sink: &mut futures::stream::SplitSink<Socket, Message>,
    stream: &mut futures::stream::SplitStream<Socket>,
    state: &State,
    outbox: &Outbox,
) -> Option<Registration> {
    let deadline = tokio::time::Instant::now() + state.config.auth_timeout;
    loop {
        let frame = tokio::select! {
            f = stream.next() => f,
            _ = tokio::time::sleep_until(deadline) => {
                close(sink, stream, outbox, Close::Unauthenticated).await;
                return None;
            }
            _ = state.shutdown.stopping() => {
                close(sink, stream, outbox, Close::GoingAway).await;
                return None;
            }
        };
        let text = match frame {
            Some(Ok(Message::Text(t))) => t,
            Some(Err(e)) => {
                if let Some(why) = Close::for_read_error(&e) {
                    close(sink, stream, outbox, why).await;
                }
                return None;
            }
            Some(Ok(Message::Close(_))) | None => return None,
            Some(Ok(_)) => continue,
        };
        let (token, id) = match protocol::parse(&text) {
            Ok(Action::Auth { token, id }) => (token, id),
            Ok(_) => {
                let e = protocol::error(
                    "unauthenticated",
                    "authenticate first: {\"action\":\"auth\",\"token\":\"...\"}",
                    None,
                );
                if sink.send(Message::text(e)).await.is_err() {
                    return None;
                }
                continue;
            }
            Err(r) => {
                let e = protocol::error(r.code, &r.message, r.id.as_ref());
                if sink.send(Message::text(e)).await.is_err() {
                    return None;
                }
                continue;
            }
        };
        let verified = match super::verify(state, &token).await {
            Ok(c) => c,
            Err(e) => {
                let reason = e.reason().unwrap_or("unauthenticated");
                let frame = json!({"type": "error", "code": e.code().as_str(), "reason": reason,
                    "message": e.public_message(), "id": id});
                let _ = sink.send(Message::text(frame.to_string())).await;
                let why = if e.code() == crate::error::ErrorCode::DependencyUnavailable {
                    Close::TryAgainLater
                } else {
                    Close::Unauthenticated
                };
                close(sink, stream, outbox, why).await;
                return None;
            }
        };
        return match super::admit(state, "ws", verified) {
            Ok(r) => Some(r),
            Err(e) => {
                let _ = sink
                    .send(Message::text(protocol::error(
                        "too_many_connections",
                        e.public_message(),
                        id.as_ref(),
                    )))
                    .await;
                close(sink, stream, outbox, Close::TooManyConnections).await;
                None
            }
        };
    }
}

/// Sends a close frame after what is pending, then completes the closing handshake (RFC 6455
/// 7.1.1): reads, and drops, what the client still sends until its own close frame or the end.
/// Dropping the TCP connection at once would answer a client's late frame (a pong) with a reset,
/// which can destroy our close frame unread. Bounded: a client that does not read or answer has
/// its TCP connection dropped after a second.
async fn close(
    sink: &mut futures::stream::SplitSink<Socket, Message>,
    stream: &mut futures::stream::SplitStream<Socket>,
    outbox: &Outbox,
    why: Close,
) {
    let frame = CloseFrame { code: CloseCode::from(why.code()), reason: why.as_str().into() };
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = sink.send(Message::Close(Some(frame))).await;
        let _ = outbox.drain().await;
        while let Some(Ok(message)) = stream.next().await {
            if matches!(message, Message::Close(_)) {
                break;
            }
        }
        let _ = outbox.drain().await;
    })
    .await;
}

struct Session {
    state: State,
    registration: Registration,
    /// The socket's outgoing side, which the hub writes data frames to directly.
    outbox: Arc<Outbox>,
    opened: Instant,
    expires_at: u64,
    /// Frames recovered by resumes and written by this task (live frames are the hub's).
    sent: u64,
    /// Records recovered by the last `subscribe` with a position, to send after its answer.
    catch_up: Vec<Record>,
    /// Where live delivery starts on the partitions the last `subscribe` added.
    live: Vec<(String, i32, i64)>,
}

impl Session {
    fn new(state: State, registration: Registration, outbox: Arc<Outbox>) -> Self {
        let expires_at = registration.conn.credential().verified.identity.expires_at;
        Session {
            state,
            registration,
            outbox,
            opened: Instant::now(),
            expires_at,
            sent: 0,
            catch_up: Vec::new(),
            live: Vec::new(),
        }
    }

    fn conn(&self) -> &Arc<Conn> {
        &self.registration.conn
    }

    /// Serves until the connection ends; returns why (a close reason or `client`).
    async fn run(
        &mut self,
        sink: &mut futures::stream::SplitSink<Socket, Message>,
        stream: &mut futures::stream::SplitStream<Socket>,
    ) -> &'static str {
        let conn = self.conn().clone();
        let outbox = self.outbox.clone();
        let outbox = &*outbox;
        let identity = conn.credential().verified.identity.clone();
        let hello = json!({
            "type": "connection_established",
            "connection_id": conn.public_id,
            "user_id": identity.subject,
            "tenant_id": identity.tenant,
            "expires_at": self.expires_at,
            "heartbeat_interval_seconds": self.state.config.ping_interval.as_secs(),
        });
        if sink.send(Message::text(hello.to_string())).await.is_err() {
            return "client";
        }
        let interval = self.state.config.ping_interval;
        let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        let mut last_heard = Instant::now();
        let leeway = self.state.verifier.rules().leeway;
        // The long-lived futures are made once: re-creating them on every pass of the loop (one
        // pass per delivery) registered a waker with the cancellation tokens and a timer each
        // time, which showed up in profiles at ten thousand connections.
        let closer = conn.closer.clone();
        let closed = closer.closed();
        tokio::pin!(closed);
        let shutdown = self.state.shutdown.clone();
        let stopping = shutdown.stopping();
        tokio::pin!(stopping);
        let mut expires_at = self.expires_at;
        let expiry = tokio::time::sleep_until(expiry_instant(expires_at + leeway));
        tokio::pin!(expiry);
        loop {
            if self.expires_at != expires_at {
                expires_at = self.expires_at;
                expiry.as_mut().reset(expiry_instant(expires_at + leeway));
            }
            tokio::select! {
                biased;
                why = &mut closed => {
                    close(sink, stream, outbox, why).await;
                    return why.as_str();
                }
                _ = &mut stopping => {
                    close(sink, stream, outbox, Close::GoingAway).await;
                    return Close::GoingAway.as_str();
                }
                _ = &mut expiry => {
                    let frame = protocol::error("token_expired", "the token expired; reconnect with a fresh one", None);
                    let _ = tokio::time::timeout(Duration::from_secs(1), sink.send(Message::text(frame))).await;
                    close(sink, stream, outbox, Close::TokenExpired).await;
                    return Close::TokenExpired.as_str();
                }
                incoming = stream.next() => {
                    last_heard = Instant::now();
                    let text = match incoming {
                        Some(Ok(Message::Text(t))) => t,
                        Some(Ok(Message::Binary(_))) => {
                            let e = protocol::error("invalid_request", "binary frames are not supported; send JSON text", None);
                            if self.write(sink, Message::text(e), &conn).await.is_err() { return "client"; }
                            continue;
                        }
                        // A message too big or not UTF-8 is told why (RFC 6455 7.4.1).
                        Some(Err(e)) => match Close::for_read_error(&e) {
                            Some(why) => {
                                close(sink, stream, outbox, why).await;
                                return why.as_str();
                            }
                            None => return "client",
                        },
                        Some(Ok(Message::Close(_))) | None => return "client",
                        Some(Ok(_)) => continue,
                    };
                    // Boxed: a request's state (entitlement calls, a verification) lives only
                    // while it is handled, not in every idle connection's task.
                    let written = match Box::pin(self.handle(&text)).await {
                        Answer::Text(reply) => self.write(sink, Message::text(reply), &conn).await,
                        // Rendered as it joins the socket's stream, after every frame before it.
                        Answer::Positioned(mut reply) => match outbox.reply(|| {
                            reply["position"] = json!(conn.position());
                            reply.to_string()
                        }) {
                            Push::Accepted => Ok(()),
                            Push::Full | Push::Gone => Err(()),
                        },
                    };
                    if written.is_err() { return "client"; }
                    for record in std::mem::take(&mut self.catch_up) {
                        conn.sent(&record.topic, record.partition, record.offset);
                        if self.write(sink, Message::text(record.frame()), &conn).await.is_err() { return "client"; }
                        self.sent += 1;
                    }
                    for (topic, partition, head) in std::mem::take(&mut self.live) {
                        conn.advance(&topic, partition, head);
                    }
                    // Live frames held back while a subscription was answered follow its answer and
                    // what a resume recovered.
                    outbox.release(|m: &Mark| conn.sent(&m.topic, m.partition, m.offset));
                }
                // The hub writes data frames itself; what the socket did not take at once is
                // written here, when it can take more.
                flushed = outbox.flush() => {
                    if flushed.is_err() { return "client"; }
                }
                _ = ping.tick() => {
                    if last_heard.elapsed() > interval + self.state.config.pong_timeout {
                        close(sink, stream, outbox, Close::HeartbeatTimeout).await;
                        return Close::HeartbeatTimeout.as_str();
                    }
                    if self.write(sink, Message::Ping(Default::default()), &conn).await.is_err() { return "client"; }
                }
            }
        }
    }

    /// Writes one frame, giving up when the connection is asked to close meanwhile (a client
    /// that does not read must not hold the task).
    async fn write(
        &mut self,
        sink: &mut futures::stream::SplitSink<Socket, Message>,
        message: Message,
        conn: &Conn,
    ) -> Result<(), ()> {
        tokio::select! {
            r = sink.send(message) => r.map_err(|_| ()),
            _ = conn.closer.closed() => Err(()),
        }
    }

    /// Answers one client frame.
    async fn handle(&mut self, text: &str) -> Answer {
        let action = match protocol::parse(text) {
            Ok(a) => a,
            Err(r) => return Answer::Text(protocol::error(r.code, &r.message, r.id.as_ref())),
        };
        let conn = self.conn().clone();
        match action {
            Action::Subscribe { topics, filters, position, id } => {
                // The answer, and the records a resume recovers, go before the live frames of
                // what this adds (released by `run` once they are written).
                self.outbox.hold();
                let (ok, failed, live) =
                    control::subscribe(&self.state, &conn, &topics, &filters).await;
                let mut reply = json!({"type": "subscribed", "topics": ok, "failed": failed});
                if let Some(position) = position {
                    match super::position::decode(&position, &self.state.config.topics) {
                        Ok(wanted) => {
                            let bound = super::sse::bound(&self.state);
                            let state = &self.state;
                            let r = resume::recover(&*state.history, &state.hub, &conn, &wanted, &live, bound).await;
                            reply["recovered"] = json!(r.recovered);
                            self.catch_up = r.records;
                        }
                        Err(e) => {
                            reply["recovered"] = json!(false);
                            reply["position_error"] = json!(e);
                        }
                    }
                }
                self.live = live;
                Answer::positioned(reply, id.as_ref())
            }
            Action::Unsubscribe { topics, id } => {
                let removed: Vec<&String> =
                    topics.iter().filter(|t| self.state.hub.unsubscribe(&conn, t)).collect();
                Answer::Text(protocol::reply(
                    json!({"type": "unsubscribed", "topics": removed}),
                    id.as_ref(),
                ))
            }
            Action::Ping { id } => Answer::Text(protocol::reply(
                json!({"type": "pong", "timestamp": chrono::Utc::now().timestamp_millis()}),
                id.as_ref(),
            )),
            Action::ListTopics { id } => {
                let mine = self.state.hub.subscriptions(&conn);
                let topics: Vec<Value> = self
                    .state
                    .hub
                    .topics()
                    .map(|t| {
                        json!({"name": t.name, "resource": t.resource, "action": t.action,
                            "record_resource": t.record_resource, "record_action": t.record_action,
                            "description": t.description, "subscribed": mine.contains(&t.name)})
                    })
                    .collect();
                Answer::Text(protocol::reply(
                    json!({"type": "topics", "topics": topics}),
                    id.as_ref(),
                ))
            }
            Action::GetStats { id } => Answer::positioned(
                json!({
                    "type": "stats",
                    "connection_id": conn.public_id,
                    "subscriptions": self.state.hub.subscriptions(&conn),
                    "messages_queued": conn.delivered.load(Ordering::Relaxed),
                    // Live frames are handed to the socket by the hub (queued and sent are one
                    // step); recovered ones by this task.
                    "messages_sent": conn.delivered.load(Ordering::Relaxed) + self.sent,
                    "connected_seconds": self.opened.elapsed().as_secs(),
                    "expires_at": self.expires_at,
                }),
                id.as_ref(),
            ),
            Action::Auth { token, id } => Answer::Text(match super::verify(&self.state, &token).await {
                Err(e) => json!({"type": "error", "code": e.code().as_str(),
                    "reason": e.reason().unwrap_or("unauthenticated"), "message": e.public_message(), "id": id})
                .to_string(),
                Ok(fresh) => {
                    let (new, old) = (&fresh.verified.identity, conn.credential());
                    let old = &old.verified.identity;
                    if new.subject != old.subject || new.tenant != old.tenant {
                        return Answer::Text(protocol::error(
                            "identity_mismatch",
                            "a fresh token must be for the same user and tenant; open a new connection instead",
                            id.as_ref(),
                        ));
                    }
                    self.expires_at = new.expires_at;
                    conn.renew(fresh);
                    protocol::reply(
                        json!({"type": "authenticated", "expires_at": self.expires_at}),
                        id.as_ref(),
                    )
                }
            }),
        }
    }
}

/// The answer to a client frame.
enum Answer {
    /// A finished frame.
    Text(String),
    /// A frame that states the connection's position: its `position` is filled in by
    /// [`Outbox::reply`], as the frame joins the socket's stream, so it describes exactly the data
    /// frames sent before it (computed earlier, a live frame written meanwhile would come before
    /// an answer that says it was not sent).
    Positioned(Value),
}

impl Answer {
    fn positioned(mut frame: Value, id: Option<&Value>) -> Answer {
        if let Some(id) = id {
            frame["id"] = id.clone();
        }
        Answer::Positioned(frame)
    }
}

fn expiry_instant(unix_seconds: u64) -> tokio::time::Instant {
    let left = unix_seconds.saturating_sub(unix_now());
    tokio::time::Instant::now() + Duration::from_secs(left.min(365 * 24 * 3600))
}
