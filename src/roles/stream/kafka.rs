//! Kafka through rskafka: the consumer that feeds the hub, the publisher of `POST /publish`, and
//! the history reader of resumes.
//!
//! Every replica reads every partition of every registry topic (replicas serve their own clients,
//! so they must not split partitions), starting at the high watermark. Each partition has its own
//! task and its own broker connection: a broker answers the requests of one connection in order,
//! so a waiting fetch would otherwise hold up every other partition (and produces, which use a
//! client of their own). A partition task reconnects with backoff and continues from the next
//! offset it has not delivered; when the broker's offsets went backwards (the topic was
//! recreated) it logs it and starts the partition over from its earliest record.
//!
//! Every Kafka request has a deadline, `fetch_wait` plus `stream.kafka_request_margin`: a broker
//! whose connections go silent (packets dropped, no reset) answers nothing, and rskafka waits for
//! an answer forever. A request that misses its deadline drops its connection; the partition
//! reconnects with backoff and reads on from the next undelivered offset, so the records produced
//! during the silence arrive, in order and once, as soon as the broker answers again.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use rskafka::client::error::{Error as KafkaError, ProtocolError};
use rskafka::client::partition::{Compression, OffsetAt, PartitionClient, UnknownTopicHandling};
use rskafka::client::Client;
use serde::Serialize;
use serde_json::Value;

use super::hub::{Hub, Record};
use super::names;
use super::source::{parse_value, History, Position, Publisher, SourceError};
use crate::backends::{BackendError, CheckError};
use crate::config::KafkaConfig;
use crate::server::Shutdown;

/// A Kafka record as the hub sees it: the key when it is UTF-8, the value parsed.
fn from_kafka(topic: &Arc<str>, partition: i32, r: rskafka::record::RecordAndOffset) -> Record {
    Record {
        topic: topic.clone(),
        partition,
        offset: r.offset,
        timestamp_ms: r.record.timestamp.timestamp_millis(),
        key: r.record.key.and_then(|k| String::from_utf8(k).ok()),
        data: parse_value(r.record.value.as_deref()),
    }
}

/// How the stream talks to Kafka.
#[derive(Debug, Clone)]
pub struct KafkaSettings {
    /// Bootstrap brokers.
    pub bootstrap: Vec<String>,
    /// TLS, SASL, client id.
    pub client: KafkaConfig,
    /// How long a fetch waits for data (delivery latency is about this on brokers that do not
    /// answer a waiting fetch early).
    pub fetch_wait: Duration,
    /// The most bytes one fetch returns.
    pub fetch_max_bytes: i32,
    /// How often topic metadata is re-read (new partitions, topics created late).
    pub metadata_refresh: Duration,
    /// Bounds one connection attempt.
    pub connect_timeout: Duration,
    /// Added to `fetch_wait` for the deadline of every request (metadata, fetch, produce, list
    /// offsets) and of each reconnection.
    pub request_margin: Duration,
    /// A partition not read for this long tells its subscribers (`delayed`), and again when it
    /// reads again (`delay_ended`).
    pub delay_notice: Duration,
}

impl KafkaSettings {
    /// The deadline of one Kafka request.
    pub fn deadline(&self) -> Duration {
        self.fetch_wait + self.request_margin
    }
}

/// Runs one Kafka request under `deadline`; a miss is an error like any other (the caller drops
/// the connection).
async fn within<T>(
    deadline: Duration,
    request: impl std::future::Future<Output = Result<T, KafkaError>>,
) -> Result<T, SourceError> {
    match tokio::time::timeout(deadline, request).await {
        Ok(outcome) => Ok(outcome?),
        Err(_) => Err(SourceError::Deadline(deadline)),
    }
}

/// One partition as `GET /stats` lists it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PartitionStats {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: i32,
    /// Records behind the high watermark (unknown before the first fetch).
    pub lag: Option<i64>,
    /// Its progress.
    pub state: PartitionState,
}

/// One partition's progress, for `/stats`.
#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
pub struct PartitionState {
    /// The next offset to deliver.
    pub next_offset: Option<i64>,
    /// The broker's high watermark at the last fetch.
    pub high_watermark: Option<i64>,
    /// Whether the last fetch succeeded.
    pub connected: bool,
    /// Times the partition was started over (offsets went backwards).
    pub restarts: u64,
    /// The last successful fetch.
    #[serde(skip)]
    pub last_read: Option<std::time::Instant>,
    /// Subscribers were told the partition is delayed.
    pub delayed: bool,
}

/// The consumer: partition tasks and their progress.
pub struct Consumer {
    /// (topic, partition) -> progress. A std mutex held for one update.
    partitions: Mutex<BTreeMap<(String, i32), PartitionState>>,
    records: AtomicU64,
}

impl Consumer {
    /// Every partition's progress.
    pub fn partitions(&self) -> Vec<PartitionStats> {
        let partitions = self.partitions.lock().unwrap_or_else(|p| p.into_inner());
        partitions
            .iter()
            .map(|((topic, partition), s)| {
                let lag = s.high_watermark.zip(s.next_offset).map(|(hw, next)| (hw - next).max(0));
                PartitionStats {
                    topic: topic.clone(),
                    partition: *partition,
                    lag,
                    state: s.clone(),
                }
            })
            .collect()
    }

    /// Records read from Kafka.
    pub fn records(&self) -> u64 {
        self.records.load(Ordering::Relaxed)
    }

    fn update(&self, topic: &str, partition: i32, f: impl FnOnce(&mut PartitionState)) {
        let mut partitions = self.partitions.lock().unwrap_or_else(|p| p.into_inner());
        f(partitions.entry((topic.to_string(), partition)).or_default());
    }
}

/// A client for metadata requests, replaced by a new connection when a request misses its
/// deadline (a silent broker leaves the old connection waiting for an answer that never comes).
pub struct Metadata {
    settings: KafkaSettings,
    /// The current client, and whether it missed a deadline. A tokio mutex, held across the
    /// reconnection, so concurrent callers wait for one new connection instead of each making
    /// their own.
    client: tokio::sync::Mutex<(Arc<Client>, bool)>,
}

impl Metadata {
    /// Connects (start-up: bounded by `connect_timeout`).
    pub async fn connect(settings: &KafkaSettings) -> Result<Arc<Self>, BackendError> {
        let client = connect(settings).await?;
        Ok(Arc::new(Metadata {
            settings: settings.clone(),
            client: tokio::sync::Mutex::new((client, false)),
        }))
    }

    async fn current(&self) -> Result<Arc<Client>, SourceError> {
        let mut slot = self.client.lock().await;
        if slot.1 {
            let deadline = self.settings.deadline();
            let fresh = crate::backends::kafka::connect(
                &self.settings.bootstrap,
                &self.settings.client,
                deadline,
            )
            .await?;
            *slot = (fresh, false);
        }
        Ok(slot.0.clone())
    }

    /// Runs one request on the current client under the deadline; a miss marks the client for
    /// replacement.
    async fn request<T, F>(&self, call: impl FnOnce(Arc<Client>) -> F) -> Result<T, SourceError>
    where
        F: std::future::Future<Output = Result<T, KafkaError>>,
    {
        let client = self.current().await?;
        let deadline = self.settings.deadline();
        match tokio::time::timeout(deadline, call(client.clone())).await {
            Ok(outcome) => Ok(outcome?),
            Err(_) => {
                let mut slot = self.client.lock().await;
                if Arc::ptr_eq(&slot.0, &client) {
                    slot.1 = true;
                }
                Err(SourceError::Deadline(deadline))
            }
        }
    }

    /// The topics and their partitions.
    pub async fn list_topics(&self) -> Result<Vec<rskafka::topic::Topic>, SourceError> {
        self.request(|c| async move { c.list_topics().await }).await
    }

    /// A partition's client (a metadata request finds its leader).
    async fn partition_client(
        &self,
        topic: &str,
        partition: i32,
    ) -> Result<PartitionClient, SourceError> {
        let topic = topic.to_string();
        self.request(|c| async move {
            c.partition_client(topic, partition, UnknownTopicHandling::Error).await
        })
        .await
    }

    /// A readiness check: the broker answers a metadata request within the deadline, and, at
    /// start-up, every partition it lists of `topics` is being read (its head is known to
    /// `hub`): until then a subscription would be answered with a position that lacks the
    /// partition, and a resume from it could not tell what was missed. Once they all were, that
    /// part is not asked again (a topic created later must not take every replica out of
    /// service while its partitions start).
    pub fn ready_check(
        self: &Arc<Self>,
        topics: Vec<String>,
        hub: Arc<Hub>,
    ) -> impl Fn() -> BoxFuture<'static, Result<(), CheckError>> + Send + Sync {
        let this = self.clone();
        let topics: Arc<[String]> = topics.into();
        let started = Arc::new(std::sync::atomic::AtomicBool::new(false));
        move || {
            let (this, topics, hub) = (this.clone(), topics.clone(), hub.clone());
            let started = started.clone();
            Box::pin(async move {
                let listed =
                    this.list_topics().await.map_err(|e| CheckError::failed("kafka", e))?;
                if started.load(Ordering::Relaxed) {
                    return Ok(());
                }
                let unread: Vec<String> = listed
                    .iter()
                    .filter(|t| topics.iter().any(|name| *name == *t.name))
                    .flat_map(|t| t.partitions.iter().map(move |p| (t.name.clone(), *p)))
                    .filter(|(topic, partition)| !hub.has_head(topic, *partition))
                    .map(|(topic, partition)| format!("{topic}/{partition}"))
                    .collect();
                if !unread.is_empty() {
                    let message = format!("partitions not read yet: {}", unread.join(", "));
                    return Err(CheckError::failed("kafka", message));
                }
                started.store(true, Ordering::Relaxed);
                Ok(())
            })
        }
    }
}

/// Connects the metadata client (failing start-up when no broker answers) and starts reading
/// every partition of `topics` into `hub` until shutdown.
pub async fn start_consumer(
    settings: KafkaSettings,
    topics: Vec<String>,
    hub: Arc<Hub>,
    shutdown: Shutdown,
) -> Result<(Arc<Metadata>, Arc<Consumer>), BackendError> {
    let metadata = Metadata::connect(&settings).await?;
    let consumer = Arc::new(Consumer { partitions: Mutex::default(), records: AtomicU64::new(0) });
    tokio::spawn(watch_delays(
        consumer.clone(),
        hub.clone(),
        settings.delay_notice,
        shutdown.clone(),
    ));
    for topic in topics {
        let (settings, metadata, hub, shutdown, consumer) =
            (settings.clone(), metadata.clone(), hub.clone(), shutdown.clone(), consumer.clone());
        tokio::spawn(watch_topic(settings, metadata, topic, hub, consumer, shutdown));
    }
    Ok((metadata, consumer))
}

async fn connect(settings: &KafkaSettings) -> Result<Arc<Client>, BackendError> {
    crate::backends::kafka::connect(&settings.bootstrap, &settings.client, settings.connect_timeout)
        .await
}

/// Starts a task for each partition of `topic` as the metadata shows it (re-read every
/// `metadata_refresh`, so partitions added later and topics created late are picked up).
async fn watch_topic(
    settings: KafkaSettings,
    metadata: Arc<Metadata>,
    topic: String,
    hub: Arc<Hub>,
    consumer: Arc<Consumer>,
    shutdown: Shutdown,
) {
    let topic: Arc<str> = topic.into();
    let mut started: HashSet<i32> = HashSet::new();
    let mut warned = false;
    loop {
        match metadata.list_topics().await {
            Ok(list) => match list.iter().find(|t| *t.name == *topic) {
                Some(t) => {
                    for &partition in &t.partitions {
                        if !started.insert(partition) {
                            continue;
                        }
                        tracing::info!(role = "stream", topic = %topic, partition, "reading partition");
                        tokio::spawn(consume_partition(
                            settings.clone(),
                            topic.clone(),
                            partition,
                            hub.clone(),
                            consumer.clone(),
                            shutdown.clone(),
                        ));
                    }
                }
                None if !warned => {
                    warned = true;
                    tracing::warn!(role = "stream", topic = %topic, "topic does not exist in Kafka yet; watching for it");
                }
                None => {}
            },
            Err(e) => {
                tracing::debug!(role = "stream", topic = %topic, error = %e, "metadata refresh failed")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(settings.metadata_refresh) => {}
            _ = shutdown.stopping() => return,
        }
    }
}

/// Exponential backoff between reconnects: 100 ms doubling to 500 ms. The cap bounds how long
/// after a broker heals its partitions read again (with the request deadline, under 2 s); while
/// it is down that is two cheap connection attempts a second per partition.
struct Backoff(Duration);

impl Backoff {
    const FIRST: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_millis(500);

    fn next(&mut self) -> Duration {
        let wait = self.0;
        self.0 = (self.0 * 2).min(Self::MAX);
        wait
    }

    fn reset(&mut self) {
        self.0 = Self::FIRST;
    }
}

async fn consume_partition(
    settings: KafkaSettings,
    topic: Arc<str>,
    partition: i32,
    hub: Arc<Hub>,
    consumer: Arc<Consumer>,
    shutdown: Shutdown,
) {
    let label = || topic.to_string();
    let lag = metrics::gauge!(names::KAFKA_LAG, "role" => "stream", "topic" => label(), "partition" => partition.to_string());
    let records_read =
        metrics::counter!(names::KAFKA_RECORDS, "role" => "stream", "topic" => label());
    let errors = metrics::counter!(names::KAFKA_ERRORS, "role" => "stream", "topic" => label());
    let wait_ms = i32::try_from(settings.fetch_wait.as_millis()).unwrap_or(i32::MAX);
    let deadline = settings.deadline();
    let mut next: Option<i64> = None;
    let mut backoff = Backoff(Backoff::FIRST);
    loop {
        let client = tokio::select! {
            c = partition_client(&settings, &topic, partition) => c,
            _ = shutdown.stopping() => return,
        };
        let client = match client {
            Ok(c) => c,
            Err(e) => {
                errors.increment(1);
                consumer.update(&topic, partition, |s| s.connected = false);
                let wait = backoff.next();
                tracing::warn!(role = "stream", topic = %topic, partition, error = %e, retry_in = ?wait, "cannot reach the partition's broker");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => continue,
                    _ = shutdown.stopping() => return,
                }
            }
        };
        loop {
            let from = match next {
                Some(n) => n,
                None => match within(deadline, high_watermark(&client)).await {
                    Ok(hw) => {
                        hub.set_head(&topic, partition, hw);
                        *next.insert(hw)
                    }
                    Err(e) => {
                        tracing::warn!(role = "stream", topic = %topic, partition, error = %e, "cannot read the high watermark");
                        break;
                    }
                },
            };
            let fetch = client.fetch_records(from, 1..settings.fetch_max_bytes, wait_ms);
            let fetched = tokio::select! {
                r = tokio::time::timeout(deadline, fetch) => match r {
                    Ok(r) => r.map_err(SourceError::Broker),
                    Err(_) => Err(SourceError::Deadline(deadline)),
                },
                _ = shutdown.stopping() => return,
            };
            match fetched {
                Ok((batch, hw)) => {
                    backoff.reset();
                    if hw < from {
                        next = Some(
                            start_over(&client, &topic, partition, from, hw, &consumer, deadline)
                                .await,
                        );
                        continue;
                    }
                    for r in batch.into_iter().filter(|r| r.offset >= from) {
                        let offset = r.offset;
                        let record = from_kafka(&topic, partition, r);
                        hub.dispatch(&record);
                        next = Some(offset + 1);
                        records_read.increment(1);
                        consumer.records.fetch_add(1, Ordering::Relaxed);
                    }
                    let next_offset = next.unwrap_or(hw);
                    lag.set((hw - next_offset).max(0) as f64);
                    consumer.update(&topic, partition, |s| {
                        s.next_offset = Some(next_offset);
                        s.high_watermark = Some(hw);
                        s.connected = true;
                        s.last_read = Some(std::time::Instant::now());
                    });
                }
                Err(SourceError::Broker(KafkaError::ServerError {
                    protocol_error: ProtocolError::OffsetOutOfRange,
                    ..
                })) => {
                    let Ok(hw) = within(deadline, high_watermark(&client)).await else { break };
                    if from > hw {
                        next = Some(
                            start_over(&client, &topic, partition, from, hw, &consumer, deadline)
                                .await,
                        );
                    } else {
                        // Retention removed records before we read them: they are gone.
                        let earliest = within(deadline, client.get_offset(OffsetAt::Earliest))
                            .await
                            .unwrap_or(hw);
                        tracing::warn!(role = "stream", topic = %topic, partition, from, earliest, "records expired before they were read; skipping ahead");
                        metrics::counter!(names::PARTITION_RESTARTS, "role" => "stream", "topic" => label(), "cause" => "expired").increment(1);
                        next = Some(earliest.max(from));
                    }
                }
                Err(e) => {
                    errors.increment(1);
                    consumer.update(&topic, partition, |s| s.connected = false);
                    let wait = backoff.next();
                    tracing::warn!(role = "stream", topic = %topic, partition, error = %e, next = from, retry_in = ?wait, "fetch failed; reconnecting");
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => break,
                        _ = shutdown.stopping() => return,
                    }
                }
            }
        }
    }
}

/// Tells the subscribers of a topic when one of its partitions has not been read for `after`
/// (`{"type":"delayed","topic","partition","since"}`, `since` the last read in unix ms), and
/// when it is read again (`{"type":"delay_ended","topic","partition"}`), so a front-end can show
/// it or move to another replica. Checked four times per `after`, at least once a second.
async fn watch_delays(consumer: Arc<Consumer>, hub: Arc<Hub>, after: Duration, shutdown: Shutdown) {
    let mut tick = tokio::time::interval((after / 4).min(Duration::from_secs(1)));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.stopping() => return,
        }
        let mut notices = Vec::new();
        {
            let mut partitions = consumer.partitions.lock().unwrap_or_else(|p| p.into_inner());
            for ((topic, partition), state) in partitions.iter_mut() {
                let Some(last) = state.last_read else { continue };
                let late = last.elapsed() > after;
                if late != state.delayed {
                    state.delayed = late;
                    let since = chrono::Utc::now().timestamp_millis()
                        - i64::try_from(last.elapsed().as_millis()).unwrap_or(i64::MAX);
                    notices.push((topic.clone(), *partition, late, since));
                }
            }
        }
        for (topic, partition, late, since) in notices {
            let (event, frame) = if late {
                tracing::warn!(role = "stream", topic = %topic, partition, "partition delayed; telling its subscribers");
                (
                    "delayed",
                    serde_json::json!({"type": "delayed", "topic": topic, "partition": partition, "since": since}),
                )
            } else {
                tracing::info!(role = "stream", topic = %topic, partition, "partition reads again");
                (
                    "delay_ended",
                    serde_json::json!({"type": "delay_ended", "topic": topic, "partition": partition}),
                )
            };
            hub.notify(&topic, event, frame.to_string());
        }
    }
}

/// The offsets went backwards (the topic was deleted and created again): start the partition
/// over from its earliest record, so nothing of the new topic is missed.
async fn start_over(
    client: &PartitionClient,
    topic: &str,
    partition: i32,
    from: i64,
    hw: i64,
    consumer: &Consumer,
    deadline: Duration,
) -> i64 {
    let earliest =
        within(deadline, client.get_offset(OffsetAt::Earliest)).await.unwrap_or(0).max(0);
    tracing::warn!(
        role = "stream",
        topic,
        partition,
        expected = from,
        high_watermark = hw,
        restart_at = earliest,
        "partition offsets went backwards (topic recreated?); starting the partition over"
    );
    metrics::counter!(names::PARTITION_RESTARTS, "role" => "stream", "topic" => topic.to_string(), "cause" => "offsets_went_backwards").increment(1);
    consumer.update(topic, partition, |s| s.restarts += 1);
    earliest
}

/// A new connection for one partition (the old one, if any, is dropped with its client). Both
/// the connection and the metadata request behind it are bounded by the request deadline.
async fn partition_client(
    settings: &KafkaSettings,
    topic: &str,
    partition: i32,
) -> Result<PartitionClient, SourceError> {
    let deadline = settings.deadline();
    let client =
        crate::backends::kafka::connect(&settings.bootstrap, &settings.client, deadline).await?;
    within(deadline, client.partition_client(topic, partition, UnknownTopicHandling::Error)).await
}

/// The partition's high watermark (the next offset to be written). ListOffsets(latest) is not
/// used: brokers disagree on it (tansu answers the last record's offset, Kafka the next one);
/// every broker agrees on a fetch's high watermark.
async fn high_watermark(client: &PartitionClient) -> Result<i64, KafkaError> {
    let earliest = client.get_offset(OffsetAt::Earliest).await?.max(0);
    let (_, hw) = client.fetch_records(earliest, 1..2, 0).await?;
    Ok(hw)
}

/// One Kafka client's partition clients, made on first use and dropped after a failure (the
/// partition's leader may have moved).
struct PartitionClients {
    client: Arc<Metadata>,
    /// By (topic, partition); a std mutex held for one lookup or insert, never across I/O.
    cache: Mutex<HashMap<(String, i32), Arc<PartitionClient>>>,
    /// Of every request.
    deadline: Duration,
}

impl PartitionClients {
    fn new(client: Arc<Metadata>, deadline: Duration) -> Self {
        PartitionClients { client, cache: Mutex::default(), deadline }
    }

    async fn get(&self, topic: &str, partition: i32) -> Result<Arc<PartitionClient>, SourceError> {
        let key = (topic.to_string(), partition);
        if let Some(c) = self.cache.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
            return Ok(c.clone());
        }
        let client = Arc::new(self.client.partition_client(topic, partition).await?);
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).insert(key, client.clone());
        Ok(client)
    }

    fn forget(&self, topic: &str, partition: i32) {
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(topic.to_string(), partition));
    }
}

/// Reads past records from Kafka for resumes, through a client of its own (a long read must
/// not hold up the live fetches or produces).
pub struct KafkaHistory {
    partitions: PartitionClients,
    max_bytes: i32,
}

impl KafkaHistory {
    /// Connects the history client.
    pub async fn connect(settings: &KafkaSettings) -> Result<Arc<Self>, BackendError> {
        Ok(Arc::new(KafkaHistory {
            partitions: PartitionClients::new(
                Metadata::connect(settings).await?,
                settings.deadline(),
            ),
            max_bytes: settings.fetch_max_bytes,
        }))
    }
}

impl History for KafkaHistory {
    fn read<'a>(
        &'a self,
        topic: &'a str,
        partition: i32,
        from: i64,
        until: i64,
    ) -> BoxFuture<'a, Result<Vec<Record>, SourceError>> {
        Box::pin(async move {
            let client = self.partitions.get(topic, partition).await?;
            let topic_name: Arc<str> = topic.into();
            let mut out = Vec::new();
            let mut next = from;
            while next < until {
                let fetch = client.fetch_records(next, 1..self.max_bytes, 0);
                let (batch, _) = match tokio::time::timeout(self.partitions.deadline, fetch).await {
                    Ok(Ok(b)) => b,
                    // Expired by retention: what was read is what is kept.
                    Ok(Err(KafkaError::ServerError {
                        protocol_error: ProtocolError::OffsetOutOfRange,
                        ..
                    })) => break,
                    Ok(Err(e)) => {
                        self.partitions.forget(topic, partition);
                        return Err(e.into());
                    }
                    Err(_) => {
                        self.partitions.forget(topic, partition);
                        return Err(SourceError::Deadline(self.partitions.deadline));
                    }
                };
                let before = next;
                for r in batch.into_iter().filter(|r| r.offset >= before && r.offset < until) {
                    next = r.offset + 1;
                    out.push(from_kafka(&topic_name, partition, r));
                }
                if next == before {
                    break;
                }
            }
            Ok(out)
        })
    }
}

/// Publishes to Kafka through a client of its own (a produce must not queue behind a fetch).
pub struct KafkaPublisher {
    partitions: PartitionClients,
    /// Partition counts by topic with when they were read (re-read after `metadata_refresh`, so
    /// partitions added later are produced to); a std mutex held for one lookup, never across I/O.
    counts: Mutex<HashMap<String, (i32, std::time::Instant)>>,
    refresh: Duration,
    round_robin: AtomicU64,
}

impl KafkaPublisher {
    /// Connects the publishing client.
    pub async fn connect(settings: &KafkaSettings) -> Result<Arc<Self>, BackendError> {
        Ok(Arc::new(KafkaPublisher {
            partitions: PartitionClients::new(
                Metadata::connect(settings).await?,
                settings.deadline(),
            ),
            counts: Mutex::default(),
            refresh: settings.metadata_refresh,
            round_robin: AtomicU64::new(0),
        }))
    }

    async fn partition_count(&self, topic: &str) -> Result<i32, SourceError> {
        if let Some((n, at)) = self.counts.lock().unwrap_or_else(|p| p.into_inner()).get(topic) {
            if at.elapsed() < self.refresh {
                return Ok(*n);
            }
        }
        let topics = self.partitions.client.list_topics().await?;
        let n = topics
            .iter()
            .find(|t| t.name == topic)
            .map(|t| t.partitions.len() as i32)
            .filter(|n| *n > 0)
            .ok_or_else(|| SourceError::UnknownTopic(topic.to_string()))?;
        self.counts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(topic.to_string(), (n, std::time::Instant::now()));
        Ok(n)
    }
}

/// The partition for a key: a stable hash (FNV-1a) of the key, so one instrument's records stay
/// in order on one partition; keyless records go round-robin.
pub fn partition_for(key: Option<&str>, partitions: i32, round_robin: u64) -> i32 {
    let n = partitions.max(1) as u64;
    let slot = match key {
        Some(key) => {
            key.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
            }) % n
        }
        None => round_robin % n,
    };
    slot as i32
}

impl Publisher for KafkaPublisher {
    fn publish<'a>(
        &'a self,
        topic: &'a str,
        key: Option<String>,
        data: Value,
    ) -> BoxFuture<'a, Result<Position, SourceError>> {
        Box::pin(async move {
            let count = self.partition_count(topic).await?;
            let partition = partition_for(
                key.as_deref(),
                count,
                self.round_robin.fetch_add(1, Ordering::Relaxed),
            );
            let client = self.partitions.get(topic, partition).await?;
            let record = rskafka::record::Record {
                key: key.map(String::into_bytes),
                value: Some(data.to_string().into_bytes()),
                headers: BTreeMap::new(),
                timestamp: chrono::Utc::now(),
            };
            let produce = client.produce(vec![record], Compression::NoCompression);
            let offsets = within(self.partitions.deadline, produce).await.inspect_err(|_| {
                self.partitions.forget(topic, partition);
            })?;
            let offset = offsets.first().copied().ok_or(SourceError::NoOffset)?;
            Ok(Position { topic: topic.into(), partition, offset })
        })
    }

    fn kind(&self) -> &'static str {
        "kafka"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_keep_their_partition_and_keyless_records_spread() {
        let p = partition_for(Some("NG-H27"), 6, 0);
        assert!((0..6).contains(&p));
        assert_eq!(partition_for(Some("NG-H27"), 6, 99), p, "the same key, the same partition");
        let spread: HashSet<i32> = (0..6).map(|i| partition_for(None, 6, i)).collect();
        assert_eq!(spread.len(), 6);
        assert_eq!(partition_for(Some("x"), 0, 0), 0);
    }
}
