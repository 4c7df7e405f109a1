//! Per-tenant usage, pushed to the metrics role in batches as counter deltas
//! (`access_usage_requests_total{tenant_id,route,status_class}` and
//! `access_usage_bytes_total{tenant_id,route,direction}`), so tenant ids never become labels of the
//! gateway's own metrics. Bounded: beyond `usage_max_keys` distinct keys between flushes, new keys
//! are dropped and counted; a failed push is dropped and counted, never retried without bound.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use url::Url;

use crate::auth::token_source::TokenSource;
use crate::server::Shutdown;

/// Metric names.
pub mod names {
    /// Usage increments dropped (too many keys, or the metrics role unreachable).
    pub const DROPPED: &str = "access_gateway_usage_dropped_total";
}

#[derive(Default, Clone, Copy)]
struct Counts {
    requests: u64,
    bytes_in: u64,
    bytes_out: u64,
}

/// The usage accumulator.
pub struct Usage {
    /// (tenant, route, status class) -> counts since the last flush. A std mutex held for one
    /// map update; the flush swaps the map out.
    counts: Mutex<HashMap<(String, String, &'static str), Counts>>,
    max_keys: usize,
}

impl Usage {
    /// An empty accumulator.
    pub fn new(max_keys: usize) -> Arc<Self> {
        Arc::new(Usage { counts: Mutex::default(), max_keys })
    }

    /// Counts one request.
    pub fn record(
        &self,
        tenant: &str,
        route: &str,
        status_class: &'static str,
        bytes_in: u64,
        bytes_out: u64,
    ) {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let key = (tenant.to_string(), route.to_string(), status_class);
        if !counts.contains_key(&key) && counts.len() >= self.max_keys {
            metrics::counter!(names::DROPPED, "role" => "gateway", "cause" => "too_many_keys")
                .increment(1);
            return;
        }
        let c = counts.entry(key).or_default();
        c.requests += 1;
        c.bytes_in += bytes_in;
        c.bytes_out += bytes_out;
    }

    fn take(&self) -> HashMap<(String, String, &'static str), Counts> {
        std::mem::take(&mut *self.counts.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Pushes every `every` to the metrics role at `url` until shutdown (one last push then).
    pub fn spawn_push(
        self: &Arc<Self>,
        url: Url,
        tokens: Arc<TokenSource>,
        every: Duration,
        shutdown: Shutdown,
    ) {
        let usage = self.clone();
        crate::usage::spawn(
            crate::role::Role::Gateway,
            url,
            tokens,
            every,
            shutdown,
            names::DROPPED,
            move || {
                let batch = usage.take();
                let mut points = Vec::with_capacity(batch.len() * 3);
                for ((tenant, route, class), c) in &batch {
                    points.push(json!({"name": "access_usage_requests_total", "type": "counter", "value": c.requests,
                        "tenant_id": tenant, "labels": {"route": route, "status_class": class}}));
                    points.push(json!({"name": "access_usage_bytes_total", "type": "counter", "value": c.bytes_in,
                        "tenant_id": tenant, "labels": {"route": route, "direction": "in"}}));
                    points.push(json!({"name": "access_usage_bytes_total", "type": "counter", "value": c.bytes_out,
                        "tenant_id": tenant, "labels": {"route": route, "direction": "out"}}));
                }
                (points, batch.values().map(|c| c.requests).sum())
            },
        );
    }
}
