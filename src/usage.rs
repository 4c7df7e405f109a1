//! Pushing usage to the metrics role (`POST /metrics/track/batch` with a service token), as the
//! gateway and the stream do: every interval, and once more at shutdown. A push that fails is
//! dropped and counted, never retried without bound.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tracing::Instrument as _;
use url::Url;

use crate::auth::token_source::TokenSource;
use crate::role::Role;
use crate::server::Shutdown;

/// What to push: the points, and how many events they stand for (counted as dropped if the push
/// fails).
pub type Batch = (Vec<Value>, u64);

/// Every `every` until shutdown, pushes what `collect` returns to the metrics role at `url`;
/// failures add to the counter `dropped` (labels `role`, `cause`).
pub fn spawn(
    role: Role,
    url: Url,
    tokens: Arc<TokenSource>,
    every: Duration,
    shutdown: Shutdown,
    dropped: &'static str,
    collect: impl Fn() -> Batch + Send + 'static,
) {
    tokio::spawn(async move {
        let http =
            reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap_or_default();
        let target = match url.join("metrics/track/batch") {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(role = %role, error = %e, "bad metrics service URL; usage is not pushed");
                return;
            }
        };
        loop {
            let last = tokio::select! {
                _ = tokio::time::sleep(every) => false,
                _ = shutdown.stopping() => true,
            };
            let (points, events) = collect();
            if !points.is_empty() {
                let sent = async {
                    let token = tokens.token().await?;
                    let r = http
                        .post(target.clone())
                        .headers(crate::telemetry::trace_headers())
                        .bearer_auth(token)
                        .json(&points)
                        .send()
                        .await
                        .map_err(|e| e.to_string())?;
                    if r.status().is_success() {
                        Ok(())
                    } else {
                        Err(format!("HTTP {}", r.status()))
                    }
                }
                // A span per push, whose context the metrics role receives.
                .instrument(tracing::info_span!("usage_push", role = %role))
                .await;
                if let Err(e) = sent {
                    metrics::counter!(dropped, "role" => role.as_str(), "cause" => "push_failed")
                        .increment(events);
                    tracing::warn!(role = %role, error = %e, dropped = events, "usage push failed; dropped");
                }
            }
            if last {
                return;
            }
        }
    });
}
