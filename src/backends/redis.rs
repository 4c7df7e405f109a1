//! Redis through fred: `redis://` and `rediss://` (TLS via native-tls), password in the URL, or
//! a primary found through Sentinel (`redis-sentinel://`, `rediss-sentinel://`): fred asks the
//! sentinels for the primary on every (re)connection, so a failover is followed without a restart.
//! Or a Redis Cluster (`redis-cluster://`, `rediss-cluster://`, more seed nodes as `node=`
//! parameters): fred discovers the slots, routes each command to the primary of its key's slot,
//! follows `MOVED`/`ASK`, and re-reads the slots after a failover. The layer's key layout keeps
//! every multi-key command and script inside one slot (`docs/contracts.md`).

use std::sync::Arc;

use fred::prelude::{ClientLike, Config as FredConfig, EventInterface, ReconnectPolicy};
use fred::types::Builder;
use futures::future::BoxFuture;

use super::breaker::{Breaker, CallError};
use super::{BackendError, CheckError};
use crate::config::{RedisConfig, SecretUrl};
use crate::role::Role;

/// A connected client. fred multiplexes commands over one connection and reconnects by itself.
pub type Client = fred::clients::Client;

/// A client for pub/sub subscriptions (a connection of its own, as Redis requires).
pub type SubscriberClient = fred::clients::SubscriberClient;

fn builder(url: &SecretUrl, config: &RedisConfig) -> Result<Builder, BackendError> {
    let err = |m: &dyn std::fmt::Display| BackendError::new("redis", url.redacted(), m);
    let mut fred_config = FredConfig::from_url(url.expose().as_str()).map_err(|e| err(&e))?;
    if let (Some(path), "rediss" | "rediss-sentinel" | "rediss-cluster") =
        (&config.ca_file, url.expose().scheme())
    {
        // The system's roots plus the configured CA.
        let pem = std::fs::read(path).map_err(|e| err(&format!("{}: {e}", path.display())))?;
        let ca = native_tls::Certificate::from_pem(&pem).map_err(|e| err(&e))?;
        let connector = native_tls::TlsConnector::builder()
            .add_root_certificate(ca)
            .build()
            .map_err(|e| err(&e))?;
        fred_config.tls = Some(connector.into());
    }
    let mut builder = Builder::from_config(fred_config);
    builder
        .with_connection_config(|c| {
            c.connection_timeout = config.timeout;
            c.internal_command_timeout = config.timeout;
        })
        .with_performance_config(|p| p.default_command_timeout = config.timeout)
        // Reconnect forever with capped backoff: an outage must heal without a restart.
        .set_policy(ReconnectPolicy::new_exponential(0, 100, 5_000, 2));
    Ok(builder)
}

/// Connects, waiting at most `config.timeout` for the first connection.
pub async fn connect(url: &SecretUrl, config: &RedisConfig) -> Result<Client, BackendError> {
    let err = |m: &dyn std::fmt::Display| BackendError::new("redis", url.redacted(), m);
    let client = builder(url, config)?.build().map_err(|e| err(&e))?;
    init(client, url, config).await
}

/// Connects a subscriber client.
pub async fn subscriber(
    url: &SecretUrl,
    config: &RedisConfig,
) -> Result<SubscriberClient, BackendError> {
    let err = |m: &dyn std::fmt::Display| BackendError::new("redis", url.redacted(), m);
    let client = builder(url, config)?.build_subscriber_client().map_err(|e| err(&e))?;
    init(client, url, config).await
}

async fn init<C: ClientLike + Clone + Send + Sync + 'static>(
    client: C,
    url: &SecretUrl,
    config: &RedisConfig,
) -> Result<C, BackendError> {
    let err = |m: &dyn std::fmt::Display| BackendError::new("redis", url.redacted(), m);
    match tokio::time::timeout(config.timeout, client.init()).await {
        Ok(Ok(_task)) => {
            super::sentinel::follow(&client, url.expose(), config.timeout);
            Ok(client)
        }
        Ok(Err(e)) => {
            let _ = client.quit().await;
            Err(err(&e))
        }
        Err(_) => {
            let _ = client.quit().await;
            Err(err(&format!("no connection within {:?}", config.timeout)))
        }
    }
}

/// A readiness check: `PING` answers.
pub fn ready_check(
    client: Client,
) -> impl Fn() -> BoxFuture<'static, Result<(), CheckError>> + Send + Sync {
    move || {
        let client = client.clone();
        Box::pin(async move {
            client
                .ping::<String>(None)
                .await
                .map(|_| ())
                .map_err(|e| CheckError::failed("redis", e))
        })
    }
}

/// The process's one subscriber connection for the layer's control channels (revocations, rules
/// versions): every listener subscribes its channels on it and receives only their messages.
/// Made once per process with the command connection (`Auth::channels`). The stream's SSE relay,
/// whose traffic grows with its clients, keeps a connection of its own so that a burst there never
/// delays (or makes lag) a revocation.
#[derive(Clone)]
pub struct Channels {
    client: SubscriberClient,
}

impl Channels {
    /// Connects the subscriber (waiting at most `config.timeout`); it re-subscribes every
    /// channel after a reconnect, and closes when `stopping` completes (the process's shutdown).
    pub async fn connect(
        url: &SecretUrl,
        config: &RedisConfig,
        stopping: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<Channels, BackendError> {
        let client = subscriber(url, config).await?;
        let _resubscribe = client.manage_subscriptions();
        let closing = client.clone();
        tokio::spawn(async move {
            stopping.await;
            let _ = closing.quit().await;
        });
        Ok(Channels { client })
    }

    /// Subscribes `channels` and returns what arrives on them (and only on them).
    pub async fn listen(&self, channels: Vec<String>) -> Result<Listener, fred::error::Error> {
        use fred::prelude::PubsubInterface;
        // Receivers first: nothing published after the subscription is missed.
        let listener = Listener {
            messages: Messages { rx: self.client.message_rx(), channels: channels.clone() },
            reconnects: self.client.reconnect_rx(),
            errors: self.client.error_rx(),
        };
        self.client.subscribe(channels).await?;
        Ok(listener)
    }
}

/// The messages of some channels of [`Channels`], and the connection's events.
pub struct Listener {
    /// The messages of the listener's channels.
    pub messages: Messages,
    /// Each reconnection (messages published meanwhile were lost: catch up).
    pub reconnects: tokio::sync::broadcast::Receiver<fred::types::config::Server>,
    /// Each connection error.
    pub errors:
        tokio::sync::broadcast::Receiver<(fred::error::Error, Option<fred::types::config::Server>)>,
}

/// The messages of some channels (the others of the shared connection are skipped).
pub struct Messages {
    rx: tokio::sync::broadcast::Receiver<fred::types::Message>,
    channels: Vec<String>,
}

impl Messages {
    /// The next message on one of the channels. `Lagged` means messages were lost (catch up);
    /// `Closed` that the connection was closed for good.
    pub async fn recv(
        &mut self,
    ) -> Result<fred::types::Message, tokio::sync::broadcast::error::RecvError> {
        loop {
            let message = self.rx.recv().await?;
            if self.channels.iter().any(|c| *c == *message.channel) {
                return Ok(message);
            }
        }
    }
}

/// A Redis connection with its breaker: every call through [`Guarded::call`] fails at once while
/// the breaker is open, so a dead or frozen Redis costs callers with a fallback nothing.
#[derive(Clone)]
pub struct Guarded {
    /// The client.
    pub client: Client,
    /// Its breaker (one per connection in the process).
    pub breaker: Arc<Breaker>,
    /// The command deadline.
    pub timeout: std::time::Duration,
}

impl Guarded {
    /// `client` with a new breaker for `role`, per `config`, labelled with what the connection
    /// is for (`user`: `commands` for the process's one command connection); while open, the
    /// breaker probes with `PING` in the background. A connection error fred reports (the server
    /// closed the connection, a reconnection failed) opens the breaker at that moment, releasing
    /// the calls in flight: a killed Redis costs no call its `trip_after`. Must be called within
    /// a Tokio runtime (it spawns the listener).
    pub fn new(client: Client, role: Role, user: &'static str, config: &RedisConfig) -> Self {
        let pinged = client.clone();
        let probe: super::breaker::Probe = Box::new(move || {
            let client = pinged.clone();
            Box::pin(async move {
                client
                    .ping::<String>(None)
                    .await
                    .map(|_| ())
                    .map_err(|e| CheckError::failed("redis", e))
            })
        });
        let breaker = Breaker::new(role, "redis", user, config.breaker.clone(), Some(probe));
        // A weak handle: the listener ends with the breaker (its error returned ends the task).
        let tripped = Arc::downgrade(&breaker);
        let _listener = client.on_error(move |(error, _server)| {
            let breaker = tripped.upgrade();
            async move {
                match breaker {
                    Some(b) => {
                        b.trip(&format!("connection error: {error}"));
                        Ok(())
                    }
                    None => Err(fred::error::Error::new_canceled()),
                }
            }
        });
        Guarded { client, breaker, timeout: config.timeout }
    }

    /// Runs a command (built from the client) under the breaker and the command deadline.
    pub async fn call<T, F>(&self, command: impl FnOnce(Client) -> F) -> Result<T, CallError>
    where
        F: std::future::Future<Output = Result<T, fred::error::Error>>,
    {
        // The client is a cheap handle; the breaker refuses before anything is sent.
        self.breaker.call(self.timeout, command(self.client.clone())).await
    }

    /// A readiness check: `PING` through the breaker. While the breaker is open the check fails
    /// at once (its background probe closes it when Redis answers again).
    pub fn ready_check(
        &self,
    ) -> impl Fn() -> BoxFuture<'static, Result<(), CheckError>> + Send + Sync {
        let this = self.clone();
        move || {
            let this = this.clone();
            Box::pin(async move {
                this.call(|c| async move { c.ping::<String>(None).await })
                    .await
                    .map(|_| ())
                    .map_err(CheckError::from)
            })
        }
    }

    /// Writes a JSON value that expires after `ttl` (at least a millisecond).
    pub async fn set_json<T: serde::Serialize>(
        &self,
        key: &str,
        value: &T,
        ttl: std::time::Duration,
    ) -> Result<(), JsonError> {
        use fred::prelude::{Expiration, KeysInterface};
        let body = serde_json::to_string(value)?;
        let px = Expiration::PX(ttl.as_millis().clamp(1, i64::MAX as u128) as i64);
        let key = key.to_string();
        self.call(|c| async move { c.set::<(), _, _>(key, body, Some(px), None, false).await })
            .await?;
        Ok(())
    }
}

/// Why [`Guarded::set_json`] wrote nothing.
#[derive(Debug, thiserror::Error)]
pub enum JsonError {
    /// The call did not succeed (breaker open, failed, unanswered).
    #[error(transparent)]
    Call(#[from] CallError),
    /// The value does not encode as JSON.
    #[error("cannot encode the value as JSON: {0}")]
    Encode(#[from] serde_json::Error),
}
