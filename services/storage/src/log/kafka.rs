//! The event log on Kafka, through `rdkafka` (librdkafka, bundled and statically linked).
//!
//! - Producer: idempotent, `acks=all`, Kafka's `murmur2_random` partitioner (the same placement
//!   as [`super::partition_for`] and as Java producers), lz4, a short linger for batching.
//!   `append` returns once every record is acknowledged.
//! - Group members: `cooperative-sticky` assignment, `enable.auto.commit=false` and
//!   `enable.auto.offset.store=false`; offsets are committed synchronously by
//!   [`Subscription::commit`], which the consumer runtime calls only after the effect is durable.
//! - Each subscription owns a driver thread that keeps calling `poll` on its consumer, so a
//!   slow handler never pushes the member out of its group (`max.poll.interval.ms`). When the
//!   runtime stops taking records the driver pauses its partitions and keeps polling.
//! - Rebalances: revoked partitions are reported to the runtime through
//!   [`Subscription::take_revoked`]; records and commits of partitions this member no longer
//!   owns are dropped, and their new owner resumes from the last commit.
//! - `StartFrom::Latest` (cache-invalidation tails) assigns every partition at its end offset,
//!   read when subscribing, outside any group: every tail reads everything appended after it.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::mpsc;

use super::{
    Delivered, EventLog, LogError, PartitionLag, Position, Record, StartFrom, Subscription,
};
use crate::error::ErrorKind;
use conveyor_config::LogSettings;

/// How long metadata, watermark and offset requests may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `/readyz` waits for the brokers' metadata.
const PING_TIMEOUT: Duration = Duration::from_secs(2);
/// Records handed to the subscription without waiting.
const DRIVER_BUFFER: usize = 2048;
/// Records the driver holds beyond that before it pauses fetching.
const PAUSE_AT: usize = 8192;
/// How long a topic's partition count is trusted before the brokers are asked again: how soon
/// a group, a tail reader or a lag report sees a topic that grew.
const PARTITIONS_TTL: Duration = Duration::from_secs(10);

/// A client error, by its kind: the one place this backend maps librdkafka's error codes.
fn kafka(e: KafkaError) -> LogError {
    let kind = match e.rdkafka_error_code() {
        Some(code) => kind_of(code),
        // Errors without a code are the client's own (configuration, a closed consumer).
        None => match e {
            KafkaError::ClientConfig(..) | KafkaError::ClientCreation(_) => ErrorKind::Permanent,
            _ => ErrorKind::Transient,
        },
    };
    LogError::Storage {
        kind,
        message: format!("kafka: {e}"),
    }
}

/// Codes that no retry can fix: the request or record itself is refused. Everything else,
/// brokers down, timeouts, leader elections, throttling and full queues among it, is transient:
/// librdkafka and the brokers recover from it. So are authentication and authorisation
/// failures, which hit every record alike until an operator fixes the credentials or ACLs.
/// `UnknownTopicOrPartition` on a produce is [`LogError::UnknownTopic`] (see `append`);
/// elsewhere it is retriable while metadata propagates.
fn kind_of(code: RDKafkaErrorCode) -> ErrorKind {
    use RDKafkaErrorCode as C;
    match code {
        C::UnknownTopic
        | C::UnknownPartition
        | C::GroupIdNotFound
        | C::ResourceNotFound
        | C::UnknownTopicId => ErrorKind::NotFound,
        C::MessageSizeTooLarge
        | C::InvalidMessageSize
        | C::InvalidMessage
        | C::BadMessage
        | C::InvalidRecord
        | C::InvalidTopic
        | C::InvalidPartitions
        | C::InvalidReplicationFactor
        | C::InvalidConfig
        | C::InvalidRequest
        | C::InvalidArgument
        | C::PolicyViolation
        | C::UnsupportedVersion
        | C::UnsupportedCompressionType
        | C::UnsupportedFeature
        | C::InvalidTimestamp
        | C::OffsetMetadataTooLarge
        | C::KeySerialization
        | C::ValueSerialization
        // librdkafka's RD_KAFKA_RESP_ERR__NOT_IMPLEMENTED: the client lacks the feature asked
        // for, which no retry changes. An error code, not a stub of ours.
        | C::NotImplemented => ErrorKind::Permanent,
        _ => ErrorKind::Transient,
    }
}

/// A failure of this process's plumbing (a blocking task that panicked or was cancelled).
fn task(e: impl std::fmt::Display) -> LogError {
    LogError::transient(format!("kafka: {e}"))
}

/// The Kafka event log: one producer, one admin client and one group-less client for
/// metadata and watermarks, shared by every call; each subscription gets its own consumer and
/// driver thread. Appends never create topics: [`EventLog::ensure_topic`] does, with
/// `log.retention_ms` and `log.replication` from the settings.
pub struct KafkaLog {
    brokers: String,
    settings: LogSettings,
    producer: FutureProducer,
    admin: AdminClient<DefaultClientContext>,
    /// A group-less client for metadata and watermarks.
    meta: Arc<BaseConsumer>,
    /// Partition counts of topics seen to exist, and when: appends never create topics
    /// implicitly. Asked again after [`PARTITIONS_TTL`], so a topic that grew is seen grown.
    known: std::sync::RwLock<HashMap<String, (u32, std::time::Instant)>>,
    /// One offsets reader per group asked about ([`KafkaLog::offsets_reader`]).
    offsets_readers: Mutex<HashMap<String, Arc<BaseConsumer>>>,
}

impl KafkaLog {
    /// Connects to the bootstrap brokers `brokers` (`host:port[,host:port]`, the part of a
    /// [`LogUri::Kafka`](conveyor_config::LogUri::Kafka) after its scheme).
    ///
    /// # Errors
    /// Settings librdkafka refuses, or an append timeout of 0 (librdkafka would wait for ever),
    /// as permanent.
    pub fn connect(brokers: &str, settings: &LogSettings) -> Result<KafkaLog, LogError> {
        let brokers = brokers.to_owned();
        if settings.append_timeout_ms == 0 {
            // librdkafka reads 0 as "wait forever": an upload would hang with the brokers.
            return Err(LogError::permanent(
                "log.append_timeout_ms must be at least 1",
            ));
        }
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("partitioner", "murmur2_random")
            .set("compression.type", "lz4")
            // Long enough to batch a busy producer's records, short enough to keep an upload's
            // 202 prompt.
            .set("linger.ms", "5")
            .set("batch.size", "1000000")
            .set("message.timeout.ms", settings.append_timeout_ms.to_string())
            .set("allow.auto.create.topics", "false")
            // How soon appends see partitions added to a topic (librdkafka's default is 5 min).
            .set(
                "topic.metadata.refresh.interval.ms",
                PARTITIONS_TTL.as_millis().to_string(),
            )
            .create()
            .map_err(kafka)?;
        let admin = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .create()
            .map_err(kafka)?;
        let meta = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .create()
            .map_err(kafka)?;
        Ok(KafkaLog {
            brokers,
            settings: settings.clone(),
            producer,
            admin,
            meta: Arc::new(meta),
            known: Default::default(),
            offsets_readers: Default::default(),
        })
    }

    fn consumer_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.brokers)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false")
            .set(
                "session.timeout.ms",
                self.settings.session_timeout_ms.to_string(),
            )
            .set(
                "heartbeat.interval.ms",
                (self.settings.session_timeout_ms / 3).max(100).to_string(),
            )
            // The driver thread polls at least every 100 ms whatever the handlers do.
            .set("max.poll.interval.ms", "60000")
            // How soon a group sees partitions added to its topic, and rebalances to take
            // them (librdkafka's default is 5 minutes).
            .set(
                "topic.metadata.refresh.interval.ms",
                PARTITIONS_TTL.as_millis().to_string(),
            )
            // librdkafka refuses `assign` without a group id. Readers that assign partitions
            // themselves never join or commit, so a unique id leaves no state behind; group
            // members override it.
            .set(
                "group.id",
                format!("conveyor-reader-{}", uuid::Uuid::new_v4().simple()),
            );
        config
    }

    /// A client that reads `group`'s committed offsets without joining it, made once per group:
    /// Kafka answers `OffsetFetch` for the group named in the client's own configuration.
    /// Cached for the groups a process reports on (its own, a handful); dropped by
    /// `delete_group`.
    fn offsets_reader(&self, group: &str) -> Result<Arc<BaseConsumer>, LogError> {
        if let Some(reader) = self
            .offsets_readers
            .lock()
            .expect("offsets readers")
            .get(group)
        {
            return Ok(reader.clone());
        }
        let reader = Arc::new(self.new_offsets_reader(group)?);
        self.offsets_readers
            .lock()
            .expect("offsets readers")
            .insert(group.to_owned(), reader.clone());
        Ok(reader)
    }

    fn new_offsets_reader(&self, group: &str) -> Result<BaseConsumer, LogError> {
        let mut config = self.consumer_config();
        config.set("group.id", group);
        config.create().map_err(kafka)
    }

    /// Warns when `topic` (created before Conveyor set it) stamps records with the producer's
    /// clock (`CreateTime`): the projector's bound on versions then comes from that clock, and
    /// a producer days ahead is not bounded. Best effort: a topic whose config cannot be read
    /// is not reported.
    async fn warn_unless_log_append_time(&self, topic: &str) {
        let spec = rdkafka::admin::ResourceSpecifier::Topic(topic);
        let options = AdminOptions::new().request_timeout(Some(REQUEST_TIMEOUT));
        let Ok(results) = self.admin.describe_configs([&spec], &options).await else {
            return;
        };
        for resource in results.into_iter().flatten() {
            let kind = resource
                .get("message.timestamp.type")
                .and_then(|e| e.value.clone());
            if kind.as_deref().is_some_and(|k| k != "LogAppendTime") {
                tracing::warn!(
                    topic,
                    "the topic stamps records with the producer's clock (CreateTime): set \
                     message.timestamp.type=LogAppendTime so versions are bounded by the \
                     broker's (docs/kafka.md)"
                );
            }
        }
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&BaseConsumer) -> Result<T, LogError> + Send + 'static,
    ) -> Result<T, LogError> {
        let meta = self.meta.clone();
        tokio::task::spawn_blocking(move || f(&meta))
            .await
            .map_err(task)?
    }
}

fn partition_count(client: &BaseConsumer, topic: &str) -> Result<u32, LogError> {
    partition_count_within(client, topic, REQUEST_TIMEOUT)
}

/// The topic's partition count from the brokers' metadata (a topic the metadata does not hold,
/// or holds with an error, is unknown).
fn partition_count_within(
    client: &BaseConsumer<impl ConsumerContext>,
    topic: &str,
    timeout: Duration,
) -> Result<u32, LogError> {
    let metadata = client.fetch_metadata(Some(topic), timeout).map_err(kafka)?;
    let found = metadata.topics().iter().find(|t| t.name() == topic);
    match found {
        Some(t) if t.error().is_none() && !t.partitions().is_empty() => {
            Ok(t.partitions().len() as u32)
        }
        _ => Err(LogError::UnknownTopic(topic.to_owned())),
    }
}

/// The offset the next append to each partition gets: its high watermark. Conveyor's producer
/// is idempotent and never transactional, so no control records sit below the watermark.
fn end_offsets(
    consumer: &BaseConsumer<impl ConsumerContext>,
    topic: &str,
    partitions: &[u32],
) -> Result<HashMap<u32, u64>, LogError> {
    partitions
        .iter()
        .map(|&p| {
            let (_, high) = consumer
                .fetch_watermarks(topic, p as i32, REQUEST_TIMEOUT)
                .map_err(kafka)?;
            Ok((p, high.max(0) as u64))
        })
        .collect()
}

fn to_delivered(message: &rdkafka::message::BorrowedMessage<'_>) -> Delivered {
    let headers = message
        .headers()
        .map(|h| {
            h.iter()
                .map(|Header { key, value }| {
                    (
                        key.to_owned(),
                        String::from_utf8_lossy(value.unwrap_or_default()).into_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    Delivered {
        topic: message.topic().to_owned(),
        partition: message.partition() as u32,
        offset: message.offset() as u64,
        key: message.key().unwrap_or_default().to_vec(),
        headers,
        value: Bytes::copy_from_slice(message.payload().unwrap_or_default()),
        timestamp: message.timestamp().to_millis().unwrap_or(0) * 1000,
    }
}

#[async_trait]
impl EventLog for KafkaLog {
    async fn ensure_topic(&self, topic: &str, partitions: u32) -> Result<u32, LogError> {
        let retention = self.settings.retention_ms.to_string();
        let new = NewTopic::new(
            topic,
            partitions as i32,
            TopicReplication::Fixed(self.settings.replication as i32),
        )
        .set("retention.ms", &retention)
        // The broker stamps each record as it appends it, so no producer, skewed or forged,
        // chooses a record's time; the projector bounds versions by it (docs/data-model.md).
        .set("message.timestamp.type", "LogAppendTime");
        let results = self
            .admin
            .create_topics(
                [&new],
                &AdminOptions::new().operation_timeout(Some(REQUEST_TIMEOUT)),
            )
            .await
            .map_err(kafka)?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((name, code)) => {
                    return Err(LogError::Storage {
                        kind: kind_of(code),
                        message: format!("kafka: failed to create topic {name}: {code}"),
                    });
                }
            }
        }
        // Metadata may lag the creation by a moment.
        let topic = topic.to_owned();
        let existing = self
            .blocking(move |meta| {
                let mut last = Err(LogError::UnknownTopic(topic.clone()));
                for _ in 0..50 {
                    last = partition_count(meta, &topic);
                    if last.is_ok() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                last
            })
            .await?;
        self.known
            .write()
            .expect("topic cache")
            .insert(new.name.to_owned(), (existing, std::time::Instant::now()));
        self.warn_unless_log_append_time(new.name).await;
        Ok(existing)
    }

    async fn ping(&self, topic: &str) -> Result<(), LogError> {
        let name = topic.to_owned();
        self.blocking(move |meta| partition_count_within(meta, &name, PING_TIMEOUT).map(|_| ()))
            .await
    }

    async fn partitions(&self, topic: &str) -> Result<u32, LogError> {
        if let Some((n, _)) = self
            .known
            .read()
            .expect("topic cache")
            .get(topic)
            .filter(|(_, at)| at.elapsed() < PARTITIONS_TTL)
        {
            return Ok(*n);
        }
        let name = topic.to_owned();
        let n = self
            .blocking(move |meta| partition_count(meta, &name))
            .await?;
        self.known
            .write()
            .expect("topic cache")
            .insert(topic.to_owned(), (n, std::time::Instant::now()));
        Ok(n)
    }

    async fn append(&self, topic: &str, records: Vec<Record>) -> Result<Vec<Position>, LogError> {
        self.partitions(topic).await?;
        // All sends are queued on the first poll of `join_all`, in input order, so records with
        // one key keep their order (the producer is idempotent, so retries cannot reorder them).
        let sends = records.iter().map(|record| {
            let mut headers = OwnedHeaders::new_with_capacity(record.headers.len());
            for (key, value) in &record.headers {
                headers = headers.insert(Header {
                    key,
                    value: Some(value.as_bytes()),
                });
            }
            let message = FutureRecord::to(topic)
                .key(&record.key[..])
                .payload(&record.value[..])
                .headers(headers);
            self.producer.send(
                message,
                Duration::from_millis(self.settings.append_timeout_ms.into()),
            )
        });
        let results = futures::future::join_all(sends).await;
        results
            .into_iter()
            .map(|r| match r {
                Ok(d) => Ok(Position {
                    partition: d.partition as u32,
                    offset: d.offset as u64,
                }),
                Err((
                    KafkaError::MessageProduction(RDKafkaErrorCode::UnknownTopicOrPartition),
                    _,
                )) => Err(LogError::UnknownTopic(topic.to_owned())),
                Err((e, _)) => Err(kafka(e)),
            })
            .collect()
    }

    async fn subscribe(
        &self,
        topic: &str,
        group: &str,
        start: StartFrom,
    ) -> Result<Box<dyn Subscription>, LogError> {
        let partitions = self.partitions(topic).await?;
        let shared = Arc::new(Shared::default());
        let context = GroupContext {
            shared: shared.clone(),
            group: group.to_owned(),
        };
        let mut config = self.consumer_config();
        let consumer: BaseConsumer<GroupContext> = match start {
            StartFrom::Earliest => {
                config
                    .set("group.id", group)
                    .set("auto.offset.reset", "earliest")
                    .set("partition.assignment.strategy", "cooperative-sticky");
                let consumer: BaseConsumer<GroupContext> =
                    config.create_with_context(context).map_err(kafka)?;
                consumer.subscribe(&[topic]).map_err(kafka)?;
                consumer
            }
            StartFrom::Latest => {
                // Not a group member: every partition, from its end as of now.
                let consumer: BaseConsumer<GroupContext> =
                    config.create_with_context(context).map_err(kafka)?;
                let (topic_name, consumer) = (topic.to_owned(), Arc::new(consumer));
                let meta = self.meta.clone();
                let assigned = {
                    let consumer = consumer.clone();
                    tokio::task::spawn_blocking(move || {
                        let all: Vec<u32> = (0..partitions).collect();
                        let ends = end_offsets(&meta, &topic_name, &all)?;
                        let mut tpl = TopicPartitionList::new();
                        for p in all {
                            tpl.add_partition_offset(
                                &topic_name,
                                p as i32,
                                Offset::Offset(ends[&p] as i64),
                            )
                            .map_err(kafka)?;
                        }
                        consumer.assign(&tpl).map_err(kafka)
                    })
                };
                assigned.await.map_err(task)??;
                shared
                    .assigned
                    .lock()
                    .expect("assignment lock")
                    .extend(0..partitions);
                Arc::try_unwrap(consumer)
                    .map_err(|_| LogError::transient("kafka: consumer still shared"))?
            }
        };
        let consumer = Arc::new(consumer);
        let (tx, rx) = mpsc::channel(DRIVER_BUFFER);
        let stop = Arc::new(AtomicBool::new(false));
        let driver = {
            let (consumer, stop) = (consumer.clone(), stop.clone());
            // A group's coordinator hands it new partitions; a reader that assigned every
            // partition itself must look for them.
            let follow = (start == StartFrom::Latest).then(|| Follow {
                topic: topic.to_owned(),
                shared: shared.clone(),
                checked: std::time::Instant::now(),
            });
            std::thread::Builder::new()
                .name(format!("kafka-{group}"))
                .spawn(move || drive(consumer, tx, stop, follow))
                .map_err(task)?
        };
        Ok(Box::new(KafkaSubscription {
            topic: topic.to_owned(),
            consumer,
            shared,
            rx,
            stop,
            driver: Some(driver),
            committed: HashMap::new(),
            in_group: start == StartFrom::Earliest,
        }))
    }

    async fn read(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
        max: usize,
    ) -> Result<Vec<Delivered>, LogError> {
        let partitions = self.partitions(topic).await?;
        if partition >= partitions {
            return Err(LogError::UnknownPartition {
                topic: topic.to_owned(),
                partition,
            });
        }
        let consumer: BaseConsumer = self.consumer_config().create().map_err(kafka)?;
        let (topic, meta) = (topic.to_owned(), self.meta.clone());
        tokio::task::spawn_blocking(move || {
            let end = end_offsets(&meta, &topic, &[partition])?[&partition];
            let want = end.saturating_sub(offset).min(max as u64) as usize;
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(&topic, partition as i32, Offset::Offset(offset as i64))
                .map_err(kafka)?;
            consumer.assign(&tpl).map_err(kafka)?;
            let mut out = Vec::with_capacity(want);
            let deadline = std::time::Instant::now() + REQUEST_TIMEOUT;
            while out.len() < want && std::time::Instant::now() < deadline {
                match consumer.poll(Duration::from_millis(100)) {
                    Some(Ok(m)) => out.push(to_delivered(&m)),
                    Some(Err(e)) => return Err(kafka(e)),
                    None => {}
                }
            }
            Ok(out)
        })
        .await
        .map_err(task)?
    }

    async fn lag(&self, topic: &str, group: &str) -> Result<Vec<PartitionLag>, LogError> {
        let reader = self.offsets_reader(group)?;
        self.lag_through(topic, reader).await
    }

    async fn groups(&self, topic: &str) -> Result<Vec<String>, LogError> {
        let mut names: Vec<String> = self
            .blocking(|meta| {
                let list = meta
                    .fetch_group_list(None, REQUEST_TIMEOUT)
                    .map_err(kafka)?;
                Ok(list.groups().iter().map(|g| g.name().to_owned()).collect())
            })
            .await?;
        names.sort();
        let mut out: Vec<String> = Vec::new();
        for name in names {
            // Every group on the cluster, most of them other applications': a reader each,
            // dropped here, not cached as `lag`'s are.
            let reader = Arc::new(self.new_offsets_reader(&name)?);
            if self
                .lag_through(topic, reader)
                .await?
                .iter()
                .any(|l| l.committed > 0)
            {
                out.push(name);
            }
        }
        Ok(out)
    }

    /// Kafka groups are not per topic: this deletes the whole group.
    async fn delete_group(&self, _topic: &str, group: &str) -> Result<(), LogError> {
        self.offsets_readers
            .lock()
            .expect("offsets readers")
            .remove(group);
        self.delete_group_on_brokers(group).await
    }
}

impl KafkaLog {
    async fn lag_through(
        &self,
        topic: &str,
        consumer: Arc<BaseConsumer>,
    ) -> Result<Vec<PartitionLag>, LogError> {
        let partitions = self.partitions(topic).await?;
        let (topic, meta) = (topic.to_owned(), self.meta.clone());
        tokio::task::spawn_blocking(move || {
            let mut tpl = TopicPartitionList::new();
            for p in 0..partitions as i32 {
                tpl.add_partition(&topic, p);
            }
            let committed = consumer
                .committed_offsets(tpl, REQUEST_TIMEOUT)
                .map_err(kafka)?;
            let all: Vec<u32> = (0..partitions).collect();
            let ends = end_offsets(&meta, &topic, &all)?;
            (0..partitions)
                .map(|p| {
                    let committed = match committed
                        .find_partition(&topic, p as i32)
                        .map(|e| e.offset())
                    {
                        Some(Offset::Offset(o)) if o >= 0 => o as u64,
                        _ => 0,
                    };
                    Ok(PartitionLag {
                        partition: p,
                        committed,
                        end: ends[&p],
                    })
                })
                .collect()
        })
        .await
        .map_err(task)?
    }

    async fn delete_group_on_brokers(&self, group: &str) -> Result<(), LogError> {
        let results = self
            .admin
            .delete_groups(
                &[group],
                &AdminOptions::new().operation_timeout(Some(REQUEST_TIMEOUT)),
            )
            .await
            .map_err(kafka)?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::GroupIdNotFound)) => {}
                Err((name, code)) => {
                    return Err(LogError::Storage {
                        kind: kind_of(code),
                        message: format!("kafka: failed to delete group {name}: {code}"),
                    });
                }
            }
        }
        Ok(())
    }
}

/// What the driver thread, the rebalance callbacks and the subscription share.
#[derive(Default)]
struct Shared {
    assigned: Mutex<HashSet<u32>>,
    revoked: Mutex<Vec<u32>>,
}

struct GroupContext {
    shared: Arc<Shared>,
    group: String,
}

impl GroupContext {
    /// Publishes `conveyor_consumer_assigned_partitions{group}`: how many partitions this
    /// member owns, so an operator (or `loadtest scale`) sees a rebalance settle.
    fn publish(&self, assigned: &HashSet<u32>) {
        metrics::gauge!("conveyor_consumer_assigned_partitions", "group" => self.group.clone())
            .set(assigned.len() as f64);
    }
}

impl ClientContext for GroupContext {}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let partitions: Vec<u32> = tpl
                .elements()
                .iter()
                .map(|e| e.partition() as u32)
                .collect();
            tracing::info!(?partitions, "partitions revoked");
            let mut assigned = self.shared.assigned.lock().expect("assignment lock");
            for p in &partitions {
                assigned.remove(p);
            }
            self.publish(&assigned);
            drop(assigned);
            self.shared
                .revoked
                .lock()
                .expect("revoked lock")
                .extend(partitions);
        }
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let partitions: Vec<u32> = tpl
                .elements()
                .iter()
                .map(|e| e.partition() as u32)
                .collect();
            tracing::info!(?partitions, "partitions assigned");
            let mut assigned = self.shared.assigned.lock().expect("assignment lock");
            assigned.extend(partitions);
            self.publish(&assigned);
        }
    }
}

/// A group-less reader of every partition of `topic` (a query's cache tail), which takes
/// partitions added to the topic as they appear, from their first record: every record in them
/// was appended after the reader started.
struct Follow {
    topic: String,
    shared: Arc<Shared>,
    checked: std::time::Instant,
}

impl Follow {
    /// Every [`PARTITIONS_TTL`], asks the brokers for the topic's partition count and assigns
    /// the partitions this reader does not have yet.
    fn take_new_partitions(&mut self, consumer: &BaseConsumer<GroupContext>) {
        if self.checked.elapsed() < PARTITIONS_TTL {
            return;
        }
        self.checked = std::time::Instant::now();
        let count = match partition_count_within(consumer, &self.topic, PING_TIMEOUT) {
            Ok(count) => count,
            Err(e) => {
                tracing::debug!(error = %e, "cannot see the topic's partitions; asking again");
                return;
            }
        };
        let mut assigned = self.shared.assigned.lock().expect("assignment lock");
        let new: Vec<u32> = (0..count).filter(|p| !assigned.contains(p)).collect();
        if new.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for &p in &new {
            if let Err(e) = tpl.add_partition_offset(&self.topic, p as i32, Offset::Beginning) {
                tracing::warn!(error = %e, partition = p, "cannot add a new partition");
                return;
            }
        }
        match consumer.incremental_assign(&tpl) {
            Ok(()) => {
                tracing::info!(topic = %self.topic, partitions = ?new, "reading new partitions");
                assigned.extend(new);
            }
            Err(e) => tracing::warn!(error = %e, "cannot assign new partitions; trying again"),
        }
    }
}

/// Keeps polling `consumer` until `stop`, forwarding records. When the subscription stops
/// taking them, pauses fetching (and keeps polling, to stay in the group). A group-less
/// reader given `follow` also takes partitions added to its topic.
fn drive(
    consumer: Arc<BaseConsumer<GroupContext>>,
    tx: mpsc::Sender<Delivered>,
    stop: Arc<AtomicBool>,
    mut follow: Option<Follow>,
) {
    let mut pending: VecDeque<Delivered> = VecDeque::new();
    let mut paused = false;
    while !stop.load(Ordering::Relaxed) {
        if let Some(follow) = follow.as_mut() {
            follow.take_new_partitions(&consumer);
        }
        while let Some(record) = pending.pop_front() {
            match tx.try_send(record) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(record)) => {
                    pending.push_front(record);
                    break;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return,
            }
        }
        // Pause only once a real backlog builds, and resume once it is gone: pausing drops
        // librdkafka's prefetched records, so flapping would refetch them over and over.
        let backlogged = if paused {
            !pending.is_empty()
        } else {
            pending.len() >= PAUSE_AT
        };
        if backlogged != paused {
            if let Ok(assignment) = consumer.assignment() {
                let result = if backlogged {
                    consumer.pause(&assignment)
                } else {
                    consumer.resume(&assignment)
                };
                if let Err(e) = result {
                    tracing::warn!(error = %e, "failed to pause or resume fetching");
                }
            }
            paused = backlogged;
        }
        match consumer.poll(Duration::from_millis(if pending.is_empty() {
            100
        } else {
            5
        })) {
            Some(Ok(message)) => pending.push_back(to_delivered(&message)),
            Some(Err(e)) => tracing::warn!(error = %e, "kafka consumer error"),
            None => {}
        }
    }
    consumer.unsubscribe();
}

struct KafkaSubscription {
    topic: String,
    consumer: Arc<BaseConsumer<GroupContext>>,
    shared: Arc<Shared>,
    rx: mpsc::Receiver<Delivered>,
    stop: Arc<AtomicBool>,
    driver: Option<std::thread::JoinHandle<()>>,
    /// Highest offset committed per partition during this ownership: commits never go back.
    committed: HashMap<u32, u64>,
    in_group: bool,
}

impl KafkaSubscription {
    fn owns(&self, partition: u32) -> bool {
        self.shared
            .assigned
            .lock()
            .expect("assignment lock")
            .contains(&partition)
    }
}

#[async_trait]
impl Subscription for KafkaSubscription {
    async fn poll(&mut self, max: usize, timeout: Duration) -> Result<Vec<Delivered>, LogError> {
        let mut out = Vec::new();
        let first = match tokio::time::timeout(timeout, self.rx.recv()).await {
            Ok(Some(record)) => record,
            Ok(None) => return Err(LogError::Closed),
            Err(_) => return Ok(out),
        };
        let owned = self
            .shared
            .assigned
            .lock()
            .expect("assignment lock")
            .clone();
        // Records fetched before a revoke belong to another member now; drop them.
        let keep = |record: Delivered, out: &mut Vec<Delivered>| {
            if owned.contains(&record.partition) {
                out.push(record);
            }
        };
        keep(first, &mut out);
        while out.len() < max {
            match self.rx.try_recv() {
                Ok(record) => keep(record, &mut out),
                Err(_) => break,
            }
        }
        Ok(out)
    }

    async fn commit(&mut self, offsets: &[(u32, u64)]) -> Result<(), LogError> {
        if !self.in_group {
            return Ok(());
        }
        let mut tpl = TopicPartitionList::new();
        let mut advanced = Vec::new();
        for &(partition, next) in offsets {
            if !self.owns(partition) || self.committed.get(&partition).is_some_and(|c| *c >= next) {
                continue;
            }
            tpl.add_partition_offset(&self.topic, partition as i32, Offset::Offset(next as i64))
                .map_err(kafka)?;
            advanced.push((partition, next));
        }
        if advanced.is_empty() {
            return Ok(());
        }
        let consumer = self.consumer.clone();
        tokio::task::spawn_blocking(move || consumer.commit(&tpl, CommitMode::Sync))
            .await
            .map_err(task)?
            .map_err(kafka)?;
        self.committed.extend(advanced);
        Ok(())
    }

    fn take_revoked(&mut self) -> Vec<u32> {
        let revoked = std::mem::take(&mut *self.shared.revoked.lock().expect("revoked lock"));
        for p in &revoked {
            self.committed.remove(p);
        }
        revoked
    }
}

impl Drop for KafkaSubscription {
    fn drop(&mut self) {
        // Leave the group before returning, so a successor in the same group is not kept
        // waiting for this member's session to time out.
        self.stop.store(true, Ordering::Relaxed);
        self.rx.close();
        if let Some(driver) = self.driver.take() {
            let _ = driver.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::admin::NewPartitions;

    /// The broker named by `CONVEYOR_TEST_KAFKA` and settings for a test against it (a short
    /// session, so rebalances settle fast), or `None` after a loud skip notice for `what`.
    fn test_broker(what: &str) -> Option<(String, LogSettings)> {
        let brokers = crate::testing::engine(crate::testing::KAFKA, what)?;
        crate::testing::init_test_log();
        let settings = LogSettings {
            session_timeout_ms: 6000,
            ..LogSettings::default()
        };
        Some((brokers, settings))
    }

    /// Runs the conformance suite against the broker named by `CONVEYOR_TEST_KAFKA`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn conformance() {
        let Some((brokers, settings)) = test_broker("the Kafka conformance suite") else {
            return;
        };
        let open = move || {
            KafkaLog::connect(&brokers, &settings).map(|l| Box::new(l) as Box<dyn EventLog>)
        };
        super::super::conformance::run(&open).await;
    }

    /// Reported: after a topic grew from 4 to 8 partitions, a replica configured with 4 refused
    /// to start, and a query's cache tail never read the new partitions. Now `ensure_topic`
    /// answers the topic's own count, a group takes the new partitions within a metadata
    /// refresh, and a tail reader (`StartFrom::Latest`) reads them from their first record.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_topic_that_grows_is_followed_by_groups_and_tail_readers() {
        let Some((brokers, settings)) = test_broker("the Kafka partition-growth test") else {
            return;
        };
        let log = KafkaLog::connect(&brokers, &settings).unwrap();
        let topic = format!("grows-{}", uuid::Uuid::new_v4().simple());
        assert_eq!(log.ensure_topic(&topic, 2).await.unwrap(), 2);
        let mut group = log
            .subscribe(&topic, &format!("g-{topic}"), StartFrom::Earliest)
            .await
            .unwrap();
        let mut tail = log
            .subscribe(&topic, "tail", StartFrom::Latest)
            .await
            .unwrap();
        // The group has its two partitions before the topic grows.
        let before = Record {
            key: b"before".to_vec(),
            headers: vec![],
            value: Bytes::from_static(b"before"),
        };
        log.append(&topic, vec![before]).await.unwrap();
        assert!(
            received(&mut *group, |r| r.key == b"before").await,
            "the group reads before the growth"
        );

        let grow = NewPartitions::new(&topic, 4);
        for result in log
            .admin
            .create_partitions([&grow], &AdminOptions::new())
            .await
            .unwrap()
        {
            result.expect("the topic grows to 4 partitions");
        }
        let seen = async {
            loop {
                // A replica still configured with 2 runs on, told the topic's own count.
                if log.ensure_topic(&topic, 2).await.unwrap() == 4 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(30), seen)
            .await
            .expect("the growth shows in the metadata");

        // One record on each new partition, from a producer that knows the new count.
        let fresh = KafkaLog::connect(&brokers, &settings).unwrap();
        let keys: Vec<Vec<u8>> = [2u32, 3]
            .iter()
            .map(|&p| {
                (0u32..)
                    .map(|i| format!("key-{i}").into_bytes())
                    .find(|k| crate::log::partition_for(k, 4) == p)
                    .unwrap()
            })
            .collect();
        let records = keys
            .iter()
            .map(|k| Record {
                key: k.clone(),
                headers: vec![],
                value: Bytes::from_static(b"after"),
            })
            .collect();
        let positions = fresh.append(&topic, records).await.unwrap();
        let mut partitions: Vec<u32> = positions.iter().map(|p| p.partition).collect();
        partitions.sort();
        assert_eq!(partitions, vec![2, 3], "appended to the new partitions");
        for (name, subscription) in [("the group", &mut group), ("the tail reader", &mut tail)] {
            let mut wanted: Vec<Vec<u8>> = keys.clone();
            let all = received(&mut **subscription, |r| {
                wanted.retain(|k| *k != r.key);
                wanted.is_empty()
            })
            .await;
            assert!(all, "{name} reads both new partitions");
        }
    }

    /// Polls `subscription` for up to 60 s until `done` says so of a record.
    async fn received(
        subscription: &mut dyn Subscription,
        mut done: impl FnMut(&Delivered) -> bool,
    ) -> bool {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while std::time::Instant::now() < deadline {
            for record in subscription
                .poll(100, Duration::from_millis(500))
                .await
                .unwrap()
            {
                if done(&record) {
                    return true;
                }
            }
        }
        false
    }
}
