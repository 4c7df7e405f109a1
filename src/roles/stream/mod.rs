//! The stream role (port 8001): Kafka topics fanned out to WebSocket clients, every subscription
//! guarded by an entitlement. The protocol is documented in `docs/stream-protocol.md`.
//!
//! - [`topics`]: the topic registry and subscription filters.
//! - [`protocol`]: client actions, server frames, close codes.
//! - [`hub`]: open connections, subscriptions, choosing a record's recipients, revocation.
//! - `fanout`: one record framed once and handed to each recipient, within bounds.
//! - [`gate`]: per-record and per-subscription entitlement decisions, made in-process.
//! - [`outbox`]: a WebSocket connection's socket, written by the hub directly.
//! - [`conn`]: one connection as the hub holds it, and what an SSE connection's queue carries.
//! - [`position`]: the position vector clients resume from.
//! - [`source`]: the publisher and history seams, and the in-process bus.
//! - [`kafka`]: the Kafka consumer, publisher and history reader (rskafka).
//! - [`ws`]: the WebSocket endpoint and its per-connection task.
//! - [`sse`]: the SSE endpoint, and changing an open stream's topics.
//! - [`control`]: entitled subscribe, and the `sse-control` relay between replicas.
//! - [`resume`]: the records missed while away, read back from Kafka up to a bound.
//!
//! Endpoints: `GET /ws/stream` (and `/ws`, `/ws/`), `GET /sse/stream` (and `/sse`, `/sse/`),
//! `POST`/`DELETE /sse/subscribe`, `GET /stats`, `GET /stats/users/{id}` (a user's open connections), `POST /publish` (service or admin role).

pub mod conn;
pub mod control;
mod fanout;
pub mod gate;
pub mod hub;
pub mod kafka;
pub mod outbox;
pub mod position;
pub mod protocol;
pub mod resume;
pub mod source;
mod sse;
pub mod topics;
mod ws;

use crate::server::openapi::{self, Errors};
use std::sync::Arc;
use std::time::Duration;
use utoipa_axum::{router::OpenApiRouter, routes};

use axum::extract::State as AxumState;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::common::{Deps, RunError, Service};
use crate::auth::{Caller, Verifier};
use crate::config::Problem;
use crate::error::{ApiError, ApiResult, ErrorCode};
use crate::policy::mirror::Mirror;
use crate::role::Role;
use crate::server::{Context, Shutdown};
use hub::{Credential, Hub, Limits, Refusal, Registration};
use kafka::Consumer;
use source::{History, Publisher};
use topics::TopicSpec;

/// Metric names.
pub mod names {
    /// Open connections by transport.
    pub const CONNECTIONS: &str = "access_stream_connections";
    /// Subscriptions by topic.
    pub const SUBSCRIPTIONS: &str = "access_stream_subscriptions";
    /// Frames queued for connections, by topic.
    pub const MESSAGES_QUEUED: &str = "access_stream_messages_queued_total";
    /// Frames written to sockets, by topic and transport.
    pub const MESSAGES_DELIVERED: &str = "access_stream_messages_delivered_total";
    /// Records or frames not delivered, by topic and reason: `slow_consumer`, `invalid_tenant`
    /// (a `tenant_id` that is not a string), `no_record_resource` (a record lacking a field of
    /// its topic's `record_resource`: it reaches no subscriber).
    pub const MESSAGES_DROPPED: &str = "access_stream_messages_dropped_total";
    /// Connections closed because their queue was full.
    pub const SLOW_CONSUMER_CLOSES: &str = "access_stream_slow_consumer_closes_total";
    /// Connections ended, by transport and reason.
    pub const CLOSES: &str = "access_stream_closes_total";
    /// Connections refused, by reason.
    pub const REJECTED: &str = "access_stream_connections_rejected_total";
    /// From the record's Kafka timestamp to the socket write.
    pub const DELIVERY_LATENCY: &str = "access_stream_delivery_latency_seconds";
    /// Records behind the high watermark, per partition.
    pub const KAFKA_LAG: &str = "access_stream_kafka_lag";
    /// Records read from Kafka, by topic.
    pub const KAFKA_RECORDS: &str = "access_stream_kafka_records_total";
    /// Failed connections and fetches, by topic.
    pub const KAFKA_ERRORS: &str = "access_stream_kafka_errors_total";
    /// Partitions started over, by topic and cause.
    pub const PARTITION_RESTARTS: &str = "access_stream_partition_restarts_total";
    /// Records published through `POST /publish`, by topic and outcome.
    pub const PUBLISHED: &str = "access_stream_published_total";
    /// Usage counts dropped because the metrics role could not take them.
    pub const USAGE_DROPPED: &str = "access_stream_usage_dropped_total";

    /// Registers the descriptions.
    pub fn describe() {
        use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
        describe_gauge!(CONNECTIONS, "Open stream connections by transport");
        describe_gauge!(SUBSCRIPTIONS, "Stream subscriptions by topic");
        describe_counter!(MESSAGES_QUEUED, "Data frames queued for connections by topic");
        describe_counter!(
            MESSAGES_DELIVERED,
            "Data frames written to sockets (or buffered in order for them) by topic and transport"
        );
        describe_counter!(MESSAGES_DROPPED, "Data frames not delivered by topic and reason");
        describe_counter!(SLOW_CONSUMER_CLOSES, "Connections closed because they did not keep up");
        describe_counter!(CLOSES, "Stream connections ended, by transport and reason");
        describe_counter!(REJECTED, "Stream connections refused, by reason");
        describe_histogram!(
            DELIVERY_LATENCY,
            Unit::Seconds,
            "From a record's Kafka timestamp to its write on the socket"
        );
        describe_gauge!(KAFKA_LAG, "Records behind the partition's high watermark");
        describe_counter!(KAFKA_RECORDS, "Records read from Kafka by topic");
        describe_counter!(KAFKA_ERRORS, "Failed Kafka connections and fetches by topic");
        describe_counter!(PARTITION_RESTARTS, "Partitions started over, by topic and cause");
        describe_counter!(
            PUBLISHED,
            "Records published through POST /publish, by topic and outcome"
        );
        describe_counter!(USAGE_DROPPED, "Usage counts not pushed to the metrics role, by cause");
    }
}

/// The `stream` config section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The role's port.
    pub port: u16,
    /// The topic registry: topic -> entitlement resource and action.
    pub topics: Vec<TopicSpec>,
    /// Browser origins allowed to connect (exact, or `*`); requests without `Origin` (non-browser
    /// clients) are always allowed.
    pub allowed_origins: Vec<String>,
    /// Connection limits and the per-connection queue.
    pub limits: Limits,
    /// How often the server pings each WebSocket.
    #[serde(with = "humantime_serde")]
    pub ping_interval: Duration,
    /// How long after a ping a silent connection is closed.
    #[serde(with = "humantime_serde")]
    pub pong_timeout: Duration,
    /// How long a connection opened without a token has to send `{"action":"auth"}`.
    #[serde(with = "humantime_serde")]
    pub auth_timeout: Duration,
    /// How long a Kafka fetch waits for data. Brokers that do not answer a waiting fetch early
    /// (tansu) deliver about this late; Kafka answers as soon as data arrives.
    #[serde(with = "humantime_serde")]
    pub fetch_wait: Duration,
    /// The most bytes one fetch returns.
    pub fetch_max_bytes: i32,
    /// Added to `fetch_wait` for the deadline of every Kafka request; a connection that misses
    /// it is dropped and made again (a broker gone silent answers nothing).
    #[serde(with = "humantime_serde")]
    pub kafka_request_margin: Duration,
    /// A partition not read for this long sends its subscribers a `delayed` frame (SSE event),
    /// and a `delay_ended` one when it reads again.
    #[serde(with = "humantime_serde")]
    pub delay_notice: Duration,
    /// How often topic metadata is re-read (partitions added, topics created late).
    #[serde(with = "humantime_serde")]
    pub metadata_refresh: Duration,
    /// Records per topic the in-process bus keeps.
    pub bus_retain: usize,
    /// The largest client frame accepted.
    pub max_message_bytes: usize,
    /// tungstenite's read buffer per connection (held for the connection's life: most of an
    /// idle connection's memory after its task).
    pub read_buffer_bytes: usize,
    /// tungstenite's write buffer target per connection.
    pub write_buffer_bytes: usize,
    /// The most a WebSocket connection's unsent bytes may grow to before it is closed as a slow
    /// consumer.
    pub max_write_buffer_bytes: usize,
    /// Subscribe when the entitlements role cannot answer (default: refuse the topic).
    pub entitlements_fail_open: bool,
    /// The longest the local copy of the rules goes without a refetch from the entitlements
    /// role (a new rules version is announced, and fetched, well before).
    #[serde(with = "humantime_serde")]
    pub decision_cache_ttl: Duration,
    /// A resume reads at most this many missed records per partition.
    pub resume_max_records: i64,
    /// A resume reads no record older than this.
    #[serde(with = "humantime_serde")]
    pub resume_max_age: Duration,
    /// How often an idle SSE stream gets a comment line.
    #[serde(with = "humantime_serde")]
    pub sse_heartbeat: Duration,
    /// How long a replica waits for the one holding an SSE connection to answer a relayed
    /// subscribe.
    #[serde(with = "humantime_serde")]
    pub relay_timeout: Duration,
    /// How often per-tenant message counts are pushed to the metrics role.
    #[serde(with = "humantime_serde")]
    pub usage_interval: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            port: Role::Stream.default_port(),
            topics: topics::default_registry(),
            allowed_origins: vec!["*".into()],
            limits: Limits::default(),
            ping_interval: Duration::from_secs(25),
            pong_timeout: Duration::from_secs(10),
            auth_timeout: Duration::from_secs(10),
            fetch_wait: Duration::from_millis(20),
            fetch_max_bytes: 1024 * 1024,
            kafka_request_margin: Duration::from_secs(1),
            delay_notice: Duration::from_secs(5),
            metadata_refresh: Duration::from_secs(30),
            bus_retain: 10_000,
            max_message_bytes: 64 * 1024,
            // Clients send a few small frames (auth, subscribe); a bigger one is read in several
            // reads. 2 KB here cost 1.4 KB more per idle connection (`make bench-stream` idle).
            read_buffer_bytes: 512,
            write_buffer_bytes: 8 * 1024,
            max_write_buffer_bytes: 4 * 1024 * 1024,
            entitlements_fail_open: false,
            decision_cache_ttl: Duration::from_secs(30),
            resume_max_records: 1000,
            resume_max_age: Duration::from_secs(600),
            sse_heartbeat: Duration::from_secs(15),
            relay_timeout: Duration::from_secs(2),
            usage_interval: Duration::from_secs(5),
        }
    }
}

impl Config {
    /// Checks the section.
    pub fn validate(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        if self.topics.is_empty() {
            problems.push(Problem::new("stream.topics", "the registry needs at least one topic"));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, t) in self.topics.iter().enumerate() {
            let at = format!("stream.topics[{i}]");
            if t.name.is_empty() || t.resource.is_empty() {
                problems.push(Problem::new(&at, "name and resource must not be empty"));
            }
            if !seen.insert(&t.name) {
                problems.push(Problem::new(&at, format!("{} is listed twice", t.name)));
            }
            if !crate::policy::rules::ACTIONS.contains(&t.action.as_str()) {
                problems.push(Problem::new(
                    format!("{at}.action"),
                    format!("unknown action {:?}", t.action),
                ));
            }
            if let Some(Err(e)) = t.record_resource.as_deref().map(topics::Template::parse) {
                problems.push(Problem::new(format!("{at}.record_resource"), e));
            }
            if !crate::policy::rules::ACTIONS.contains(&t.record_action.as_str()) {
                problems.push(Problem::new(
                    format!("{at}.record_action"),
                    format!("unknown action {:?}", t.record_action),
                ));
            }
        }
        let l = &self.limits;
        if l.max_connections == 0
            || l.max_connections_per_user == 0
            || l.max_connections_per_tenant == 0
            || l.send_queue == 0
        {
            problems.push(Problem::new(
                "stream.limits",
                "connection limits and send_queue must be greater than 0",
            ));
        }
        let r = &l.connect_rate;
        if r.rate == 0 || r.burst == 0 || r.period.is_zero() {
            problems.push(Problem::new(
                "stream.limits.connect_rate",
                "rate, burst and period must be greater than 0",
            ));
        }
        for (key, d) in [
            ("stream.ping_interval", self.ping_interval),
            ("stream.pong_timeout", self.pong_timeout),
            ("stream.auth_timeout", self.auth_timeout),
            ("stream.metadata_refresh", self.metadata_refresh),
            ("stream.sse_heartbeat", self.sse_heartbeat),
            ("stream.relay_timeout", self.relay_timeout),
            ("stream.usage_interval", self.usage_interval),
            ("stream.kafka_request_margin", self.kafka_request_margin),
            ("stream.delay_notice", self.delay_notice),
        ] {
            if d.is_zero() {
                problems.push(Problem::new(key, "must be greater than 0"));
            }
        }
        if self.resume_max_records < 0 {
            problems.push(Problem::new("stream.resume_max_records", "must not be negative"));
        }
        let hashes: std::collections::HashSet<u32> =
            self.topics.iter().map(|t| position::topic_hash(&t.name)).collect();
        if hashes.len() != seen.len() {
            problems.push(Problem::new(
                "stream.topics",
                "two topic names share a position hash; rename one",
            ));
        }
        if self.fetch_wait > Duration::from_secs(30) {
            problems.push(Problem::new("stream.fetch_wait", "at most 30s"));
        }
        if self.fetch_max_bytes < 1024 {
            problems.push(Problem::new("stream.fetch_max_bytes", "at least 1024"));
        }
        if self.read_buffer_bytes < 256 || self.max_message_bytes < 256 {
            problems.push(Problem::new(
                "stream.read_buffer_bytes",
                "read_buffer_bytes and max_message_bytes must be at least 256",
            ));
        }
        if self.max_write_buffer_bytes <= self.write_buffer_bytes {
            problems.push(Problem::new(
                "stream.max_write_buffer_bytes",
                "must be greater than write_buffer_bytes",
            ));
        }
        problems
    }
}

/// The role's state.
#[derive(Clone)]
pub struct State {
    config: Arc<Config>,
    hub: Arc<Hub>,
    verifier: Arc<Verifier>,
    rules: Arc<Mirror>,
    publisher: Arc<dyn Publisher>,
    history: Arc<dyn History>,
    relay: Option<Arc<control::Relay>>,
    consumer: Option<Arc<Consumer>>,
    shutdown: Shutdown,
    admin_role: Arc<str>,
    service_role: Arc<str>,
}

impl axum::extract::FromRef<State> for Arc<Verifier> {
    fn from_ref(state: &State) -> Self {
        state.verifier.clone()
    }
}

/// Builds the state: the hub, the rules mirror, and Kafka (consumer and publisher) or
/// the in-process bus.
pub async fn build(config: &Config, deps: &Deps) -> Result<State, RunError> {
    let (ctx, auth) = (&deps.ctx, deps.auth.clone());
    let config = Arc::new(config.clone());
    let hub = Hub::new(&config.topics, config.limits.clone());
    let tokens = crate::auth::token_source::for_role(ctx, &auth)?;
    if let Some(url) = &ctx.config.metrics_service_url {
        let hub = hub.clone();
        crate::usage::spawn(
            Role::Stream,
            url.clone(),
            tokens.clone(),
            config.usage_interval,
            ctx.shutdown.clone(),
            names::USAGE_DROPPED,
            move || hub.take_usage(),
        );
    }
    let rules = Mirror::for_role(
        ctx,
        tokens,
        config.entitlements_fail_open,
        config.decision_cache_ttl,
        auth.channels.as_ref(),
    )
    .await?;
    hub.set_rules(rules.clone());
    hub.follow_rules(ctx.shutdown.clone());
    Arc::new(crate::policy::board::Board::for_context(ctx, auth.redis.as_ref())).spawn_reporter(
        "stream",
        hub.replica().to_string(),
        rules.applied(),
        ctx.shutdown.clone(),
    );
    type Sources = (Arc<dyn Publisher>, Arc<dyn History>, Option<Arc<Consumer>>);
    let (publisher, history, consumer): Sources = if ctx.config.kafka_bootstrap.is_empty() {
        tracing::warn!(
            role = "stream",
            "no ACCESS_KAFKA_BOOTSTRAP: records come from the in-process bus (POST /publish) only"
        );
        let bus = source::MemoryBus::new(hub.clone(), config.bus_retain);
        (bus.clone(), bus, None)
    } else {
        let settings = kafka::KafkaSettings {
            bootstrap: ctx.config.kafka_bootstrap.clone(),
            client: ctx.config.kafka.clone(),
            fetch_wait: config.fetch_wait,
            fetch_max_bytes: config.fetch_max_bytes,
            metadata_refresh: config.metadata_refresh,
            connect_timeout: Duration::from_secs(5),
            request_margin: config.kafka_request_margin,
            delay_notice: config.delay_notice,
        };
        let topics: Vec<String> = config.topics.iter().map(|t| t.name.clone()).collect();
        let (metadata, consumer) = kafka::start_consumer(
            settings.clone(),
            topics.clone(),
            hub.clone(),
            ctx.shutdown.clone(),
        )
        .await?;
        // Hard: without the broker no record reaches any client. The check has the request
        // deadline, so readiness follows a silent broker and comes back when it heals; and it
        // waits for every existing partition of the topics to be read.
        ctx.readiness.add_check("kafka", metadata.ready_check(topics, hub.clone()));
        (
            kafka::KafkaPublisher::connect(&settings).await?,
            kafka::KafkaHistory::connect(&settings).await?,
            Some(consumer),
        )
    };
    let relay = match (&ctx.config.redis_url, &auth.redis) {
        (Some(url), Some(redis)) => {
            let client = redis.clone();
            let subscriber = crate::backends::redis::subscriber(url, &ctx.config.redis).await?;
            let prefix = ctx.config.redis_prefix();
            let relay = control::Relay::new(client, &prefix, hub.replica(), config.relay_timeout);
            Some((relay, subscriber))
        }
        _ => None,
    };
    hub.follow_revocations(
        auth.revocations.subscribe(),
        auth.verifier.clone(),
        ctx.shutdown.clone(),
    );
    let state = State {
        config,
        hub,
        verifier: auth.verifier,
        rules,
        publisher,
        history,
        relay: relay.as_ref().map(|(r, _)| r.clone()),
        consumer,
        shutdown: ctx.shutdown.clone(),
        admin_role: ctx.config.auth.admin_role.as_str().into(),
        service_role: ctx.config.auth.service_role.as_str().into(),
    };
    if let Some((relay, subscriber)) = relay {
        relay.listen(state.clone(), subscriber).await.map_err(|e| anyhow::anyhow!(e))?;
    }
    Ok(state)
}

/// The role's routes.
pub fn router(state: State) -> Router {
    // The WebSocket and SSE streams are described in docs/stream-protocol.md; OpenAPI covers the
    // JSON endpoints.
    openapi::finish(api().with_state(state))
}

/// The role's API document (`/openapi.json`), built without a state.
pub fn openapi() -> utoipa::openapi::OpenApi {
    api().into_openapi()
}

/// The role's documented routes.
fn api() -> OpenApiRouter<State> {
    OpenApiRouter::with_openapi(openapi::base(Role::Stream))
        .route("/ws", get(ws::upgrade))
        .route("/ws/", get(ws::upgrade))
        .route("/ws/stream", get(ws::upgrade))
        .route("/sse", get(sse::connect))
        .route("/sse/", get(sse::connect))
        .route("/sse/stream", get(sse::connect))
        .routes(routes!(sse::add, sse::remove))
        .routes(routes!(stats))
        .routes(routes!(user_connections))
        .routes(routes!(rules_version))
        .routes(routes!(publish))
}

/// What `common::run` serves: at shutdown open streams get a "going away" close, and the drain
/// waits (up to `server.drain_timeout`) for them to end.
pub fn service(state: State, _ctx: &Context) -> Service {
    let hub = state.hub.clone();
    Service { drained: Some(Arc::new(move || hub.open())), ..Service::new(router(state)) }
}

/// Refuses a browser origin that is not on the allow-list.
fn check_origin(state: &State, headers: &http::HeaderMap) -> ApiResult<()> {
    let Some(origin) = headers.get(http::header::ORIGIN) else { return Ok(()) };
    let allowed = &state.config.allowed_origins;
    if allowed.iter().any(|o| o == "*" || origin.as_bytes() == o.as_bytes()) {
        return Ok(());
    }
    reject("origin");
    Err(ApiError::new(ErrorCode::Forbidden, "this origin may not open streams")
        .with_reason("origin_not_allowed"))
}

/// Refuses new connections while shutting down or above the replica's connection rate.
fn check_admission(state: &State) -> ApiResult<()> {
    if state.shutdown.is_draining() {
        reject("draining");
        return Err(ApiError::new(
            ErrorCode::DependencyUnavailable,
            "this replica is shutting down; reconnect",
        ));
    }
    state.hub.connect_allowed().map_err(|retry| {
        reject("connect_rate");
        ApiError::new(ErrorCode::RateLimited, "too many new connections; retry shortly")
            .with_retry_after(retry)
    })
}

fn reject(reason: &'static str) {
    metrics::counter!(names::REJECTED, "role" => "stream", "reason" => reason).increment(1);
}

/// The token of an upgrade or SSE request: the `token` query parameter or `Authorization`.
fn token_from<B>(req: &http::Request<B>) -> Option<String> {
    let from_query = req.uri().query().and_then(|q| {
        url::form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "token")
            .map(|(_, v)| v.into_owned())
    });
    from_query.or_else(|| {
        req.headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .map(|v| crate::auth::strip_bearer(v).to_string())
    })
}

/// Verifies a token into a connection credential.
async fn verify(state: &State, token: &str) -> ApiResult<Credential> {
    let verified = state.verifier.verify(token).await.inspect_err(|_| reject("unauthenticated"))?;
    Ok(Credential { token: crate::auth::strip_bearer(token).to_string(), verified })
}

/// Admits a connection within the hub's limits.
fn admit(
    state: &State,
    transport: &'static str,
    credential: Credential,
) -> ApiResult<Registration> {
    state.hub.admit(transport, credential).map_err(|refusal| {
        reject(refusal.as_str());
        let message = match refusal {
            Refusal::Replica => {
                "this replica holds its maximum of connections; try another or later"
            }
            Refusal::User => "too many open connections for this user",
            Refusal::Tenant => "too many open connections for this tenant",
        };
        let code = if refusal == Refusal::Replica {
            ErrorCode::DependencyUnavailable
        } else {
            ErrorCode::RateLimited
        };
        // A connection limit frees when a connection closes: worth retrying in a second.
        ApiError::new(code, message).with_reason(refusal.as_str()).with_retry_after(1)
    })
}

/// The body of `GET /stats`.
#[derive(Serialize, utoipa::ToSchema)]
struct Stats {
    /// The hub's counters and subscriptions.
    #[serde(flatten)]
    hub: hub::HubStats,
    /// Where records come from: `kafka` or `memory` (the in-process bus).
    #[schema(example = "kafka")]
    source: &'static str,
    /// The Kafka consumer (absent without Kafka).
    #[serde(skip_serializing_if = "Option::is_none")]
    kafka: Option<KafkaStats>,
}

/// The Kafka consumer's progress.
#[derive(Serialize, utoipa::ToSchema)]
struct KafkaStats {
    /// Records read since start.
    records: u64,
    /// Every partition's progress.
    partitions: Vec<kafka::PartitionStats>,
}

#[utoipa::path(get, path = "/stats", tag = "stream", summary = "Connections, subscriptions, queues, Kafka partitions and lag (admin or service role)", security(("bearer" = [])), responses((status = 200, description = "The replica's counters", body = Stats), Errors))]
async fn stats(AxumState(state): AxumState<State>, caller: Caller) -> ApiResult<Response> {
    caller.require_any_role(&[&state.admin_role, &state.service_role])?;
    let stats = Stats {
        hub: state.hub.stats(),
        source: state.publisher.kind(),
        kafka: state.consumer.as_ref().map(|consumer| KafkaStats {
            records: consumer.records(),
            partitions: consumer.partitions(),
        }),
    };
    Ok(axum::Json(stats).into_response())
}

/// One open connection, as `GET /stats/users/{id}` lists it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
struct ConnectionInfo {
    /// The connection's id (`<replica>-<number>`).
    id: String,
    /// `ws` or `sse`.
    transport: String,
    /// The tenant its records are scoped to.
    tenant_id: String,
    /// Its subscribed topics.
    topics: Vec<String>,
    /// Frames queued for it so far.
    delivered: u64,
}

/// The answer of `GET /stats/users/{id}`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
struct UserConnections {
    /// The user.
    user_id: String,
    /// This replica's id (each replica answers for its own connections).
    replica: String,
    /// The user's open connections on this replica.
    connections: Vec<ConnectionInfo>,
}

#[utoipa::path(get, path = "/stats/users/{id}", tag = "stream", summary = "A user's open WebSocket and SSE connections on this replica (admin or service role)", params(("id" = String, Path, description = "The user (token subject, or apikey:<id>)")), security(("bearer" = [])), responses((status = 200, description = "OK", body = UserConnections), Errors))]
async fn user_connections(
    AxumState(state): AxumState<State>,
    caller: Caller,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> ApiResult<Response> {
    caller.require_any_role(&[&state.admin_role, &state.service_role])?;
    let connections = state
        .hub
        .connections_of(&id)
        .iter()
        .map(|c| ConnectionInfo {
            id: c.public_id.clone(),
            transport: c.transport.to_string(),
            tenant_id: c.tenant.to_string(),
            topics: state.hub.subscriptions(c),
            delivered: c.delivered.load(std::sync::atomic::Ordering::Relaxed),
        })
        .collect();
    let body =
        UserConnections { user_id: id, replica: state.hub.replica().to_string(), connections };
    Ok(axum::Json(body).into_response())
}

#[utoipa::path(get, path = "/entitlements/version", tag = "stream", summary = "The rules version this stream replica decides at", security(("bearer" = [])), responses((status = 200, description = "Where this replica stands", body = crate::policy::mirror::Standing), Errors))]
async fn rules_version(AxumState(state): AxumState<State>, _caller: Caller) -> ApiResult<Response> {
    Ok(axum::Json(state.rules.standing("stream", state.hub.replica())).into_response())
}

/// The body of `POST /publish`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct PublishRequest {
    /// A registry topic.
    #[schema(example = "served.market.latest_prices.v1")]
    topic: String,
    /// The record key (the instrument or entity id).
    #[serde(default)]
    key: Option<String>,
    /// The record: a JSON object, free-form; a `tenant_id` field restricts it to that tenant.
    #[schema(value_type = Object)]
    data: Value,
}

#[utoipa::path(post, path = "/publish", tag = "stream", summary = "Publish a JSON record to a registry topic (service or admin role)",
    request_body(content = PublishRequest, example = json!({"topic": "served.market.latest_prices.v1", "key": "NG-H27", "data": {"instrument_id": "NG-H27", "price": 71.5}})),
    security(("bearer" = [])), responses((status = 200, description = "Where the record landed", body = source::Position), Errors))]
async fn publish(
    AxumState(state): AxumState<State>,
    caller: Caller,
    crate::error::Json(body): crate::error::Json<PublishRequest>,
) -> ApiResult<Response> {
    let identity = &caller.0.identity;
    if !identity.has_role(&state.admin_role) && !identity.has_role(&state.service_role) {
        return Err(ApiError::new(
            ErrorCode::Forbidden,
            format!("publishing needs the {} or {} role", state.service_role, state.admin_role),
        ));
    }
    if state.hub.topic(&body.topic).is_none() {
        return Err(ApiError::validation(
            "topic",
            format!("{} is not a registry topic", body.topic),
        ));
    }
    if !body.data.is_object() {
        return Err(ApiError::validation("data", "data must be a JSON object"));
    }
    match state.publisher.publish(&body.topic, body.key, body.data).await {
        Ok(position) => {
            metrics::counter!(names::PUBLISHED, "role" => "stream", "topic" => body.topic, "outcome" => "ok").increment(1);
            Ok(axum::Json(position).into_response())
        }
        Err(e) => {
            metrics::counter!(names::PUBLISHED, "role" => "stream", "topic" => body.topic, "outcome" => "error").increment(1);
            Err(e.into())
        }
    }
}
