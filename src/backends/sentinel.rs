//! Following a Redis Sentinel failover at once.
//!
//! fred finds the primary through the sentinels whenever a client (re)connects. A failover that
//! leaves the old primary running (`SENTINEL FAILOVER`, a network partition that heals) does not
//! drop the clients' connections, though: until the sentinels turn the old primary into a replica
//! (their next `INFO`, up to 10 s later) it still accepts writes, which the resynchronisation then
//! discards (a rate-limit decision, a revocation), and its subscribers miss what is published on
//! the new primary. So every client made from a `redis-sentinel://` URL is watched: a subscriber
//! on the sentinels' `+switch-master` channel makes it reconnect, and so ask the sentinels again,
//! as soon as they announce a new primary for its service.

use std::time::Duration;

use fred::prelude::{
    ClientLike, Config as FredConfig, EventInterface, PubsubInterface, ServerConfig,
};
use fred::types::Builder;
use url::Url;

/// The sentinels' channel announcing a new primary: `<service> <old ip> <old port> <new ip>
/// <new port>`.
const SWITCH_MASTER: &str = "+switch-master";

/// Where the sentinels of a `redis-sentinel://` URL are and the service to follow; `None` for
/// any other URL.
struct Sentinels {
    hosts: Vec<(String, u16)>,
    service: String,
    password: Option<String>,
    tls: bool,
}

fn sentinels(url: &Url) -> Option<Sentinels> {
    let tls = match url.scheme() {
        "redis-sentinel" => false,
        "rediss-sentinel" => true,
        _ => return None,
    };
    let mut hosts = vec![(url.host_str()?.to_string(), url.port().unwrap_or(26379))];
    let (mut service, mut password) = (None, None);
    for (key, value) in url.query_pairs() {
        match key.as_ref() {
            "sentinelServiceName" => service = Some(value.into_owned()),
            "sentinelPassword" => password = Some(value.into_owned()),
            "node" => {
                if let Some((host, port)) = value.rsplit_once(':') {
                    if let Ok(port) = port.parse() {
                        hosts.push((host.to_string(), port));
                    }
                }
            }
            _ => {}
        }
    }
    Some(Sentinels { hosts, service: service?, password, tls })
}

/// Makes `client` reconnect whenever the sentinels of `url` announce a new primary for its
/// service (nothing for a URL that is not `redis-sentinel://`). The watcher is a task with a
/// subscriber connection of its own to the first sentinel that answers, kept for as long as the
/// process runs (fred reconnects and resubscribes it by itself).
pub fn follow<C: ClientLike + Clone + Send + Sync + 'static>(
    client: &C,
    url: &Url,
    timeout: Duration,
) {
    let Some(sentinels) = sentinels(url) else { return };
    // The sentinels are spoken to with the client's own TLS settings (`redis.ca_file`).
    let tls = client.client_config().tls;
    let client = client.clone();
    tokio::spawn(async move {
        let Some(watcher) = subscribe(&sentinels, tls, timeout).await else { return };
        let mut messages = watcher.message_rx();
        loop {
            let message = match messages.recv().await {
                Ok(message) => message,
                // Missed announcements: reconnecting costs little and is always safe.
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    let _ = client.force_reconnection().await;
                    continue;
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            };
            let text = message.value.as_string().unwrap_or_default();
            if text.split(' ').next() != Some(sentinels.service.as_str()) {
                continue;
            }
            // A client that was closed (or is reconnecting, and so asks the sentinels anyway)
            // is left alone.
            if client.state() != fred::types::ClientState::Connected {
                continue;
            }
            tracing::warn!(service = %sentinels.service, switch = %text,
                "redis sentinel announced a new primary; reconnecting");
            if let Err(e) = client.force_reconnection().await {
                tracing::warn!(error = %e, "redis: reconnecting after a failover failed; fred retries");
            }
        }
    });
}

/// A subscriber on `+switch-master` at the first sentinel that answers; `None` if none does
/// (fred's reconnection still finds the new primary, later).
async fn subscribe(
    sentinels: &Sentinels,
    tls: Option<fred::types::config::TlsConfig>,
    timeout: Duration,
) -> Option<fred::clients::SubscriberClient> {
    for (host, port) in &sentinels.hosts {
        let config = FredConfig {
            server: ServerConfig::new_centralized(host.clone(), *port),
            password: sentinels.password.clone(),
            tls: if sentinels.tls { tls.clone() } else { None },
            ..FredConfig::default()
        };
        let mut builder = Builder::from_config(config);
        builder
            .with_connection_config(|c| c.connection_timeout = timeout)
            .set_policy(fred::prelude::ReconnectPolicy::new_exponential(0, 100, 5_000, 2));
        let Ok(subscriber) = builder.build_subscriber_client() else { continue };
        let connected = tokio::time::timeout(timeout, subscriber.init()).await;
        if matches!(connected, Ok(Ok(_))) && subscriber.subscribe(SWITCH_MASTER).await.is_ok() {
            return Some(subscriber);
        }
        let _ = subscriber.quit().await;
    }
    tracing::warn!(service = %sentinels.service,
        "no redis sentinel answered; a failover is followed when the old primary drops its clients");
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentinel_urls_name_their_sentinels_and_service() {
        let url = Url::parse(
            "rediss-sentinel://:pw@s1:26380/0?sentinelServiceName=main&node=s2:26379&sentinelPassword=x",
        )
        .unwrap();
        let s = sentinels(&url).unwrap();
        assert_eq!(s.hosts, [("s1".to_string(), 26380), ("s2".to_string(), 26379)]);
        assert_eq!((s.service.as_str(), s.password.as_deref(), s.tls), ("main", Some("x"), true));
        assert!(sentinels(&Url::parse("redis://cache:6379").unwrap()).is_none());
    }
}
