//! The event log: partitioned, append-only topics with consumer groups. The embedded
//! implementation is SQLite ([`sqlite::SqliteLog`]); the distributed one is Kafka
//! ([`kafka::KafkaLog`]), behind the same trait.

#[cfg(any(test, feature = "testsuite"))]
pub mod conformance;
#[cfg(feature = "kafka")]
pub mod kafka;
pub mod sqlite;

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::{ErrorKind, Kinded};

/// A record to append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Picks the partition; records with equal keys stay in order.
    pub key: Vec<u8>,
    /// Small string headers (`content-type`, `event-type`, `schema-version`, DLQ details).
    pub headers: Vec<(String, String)>,
    /// The payload, opaque to the log: on the media topics, an encoded envelope
    /// ([`crate::events`]).
    pub value: Bytes,
}

impl Record {
    /// The value of the first header named `name`, if there is one.
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }
}

/// Where an appended record landed.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct Position {
    /// The partition, from 0: [`partition_for`] of the record's key.
    pub partition: u32,
    /// The record's offset in its partition, from 0.
    pub offset: u64,
}

/// A record read back from the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivered {
    /// The topic it was read from.
    pub topic: String,
    /// The partition it is in, from 0.
    pub partition: u32,
    /// Its offset in that partition, from 0.
    pub offset: u64,
    /// The key it was appended with.
    pub key: Vec<u8>,
    /// The headers it was appended with, in order.
    pub headers: Vec<(String, String)>,
    /// The payload it was appended with.
    pub value: Bytes,
    /// Append time, microseconds since the Unix epoch.
    pub timestamp: i64,
}

impl Delivered {
    /// The value of the first header named `name`, if there is one.
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }

    /// The same record, ready to append elsewhere (a dead-letter topic, a redrive).
    pub fn to_record(&self) -> Record {
        Record {
            key: self.key.clone(),
            headers: self.headers.clone(),
            value: self.value.clone(),
        }
    }
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// Where a group with no committed offset starts reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartFrom {
    /// The first retained record (a new processor or projector group).
    Earliest,
    /// Only records appended after subscribing (cache invalidation tails).
    Latest,
}

/// One partition's progress for one group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionLag {
    /// The partition, from 0.
    pub partition: u32,
    /// The next offset the group will read (0 if it never committed).
    pub committed: u64,
    /// The offset the next append to this partition will get.
    pub end: u64,
}

impl PartitionLag {
    /// How many records the group has yet to commit on this partition: `end - committed`,
    /// or 0 if the commit is at or past the end.
    pub fn lag(&self) -> u64 {
        self.end.saturating_sub(self.committed)
    }
}

/// Why an event log call failed. Every variant has a kind ([`Kinded`]), which is what callers
/// decide on.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The topic (named here) does not exist; appends never create one, only
    /// [`EventLog::ensure_topic`] does. Not found.
    #[error("unknown topic {0:?}")]
    UnknownTopic(String),
    /// A partition number at or past the topic's partition count. Not found.
    #[error("partition {partition} out of range for topic {topic:?}")]
    UnknownPartition {
        /// The topic's name.
        topic: String,
        /// The partition asked for.
        partition: u32,
    },
    /// The log, or a subscription's driver, has shut down in this process. Permanent: a
    /// worker that sees it stops, and the process exits for its orchestrator to restart.
    #[error("event log is shut down")]
    Closed,
    /// The backend failed; `kind` says whether retrying can help.
    #[error("event log storage ({kind}): {message}")]
    Storage {
        /// Transient, permanent or not found, as the backend's mapping decided.
        kind: ErrorKind,
        /// The backend's description of the failure.
        message: String,
    },
}

impl LogError {
    /// A [`LogError::Storage`] of kind [`ErrorKind::Transient`], saying `message`.
    pub fn transient(message: impl std::fmt::Display) -> LogError {
        LogError::Storage {
            kind: ErrorKind::Transient,
            message: message.to_string(),
        }
    }

    /// A [`LogError::Storage`] of kind [`ErrorKind::Permanent`], saying `message`.
    pub fn permanent(message: impl std::fmt::Display) -> LogError {
        LogError::Storage {
            kind: ErrorKind::Permanent,
            message: message.to_string(),
        }
    }
}

impl Kinded for LogError {
    fn kind(&self) -> ErrorKind {
        match self {
            LogError::UnknownTopic(_) | LogError::UnknownPartition { .. } => ErrorKind::NotFound,
            // The log (or a subscription's driver) is gone for good in this process: a worker
            // that sees it stops, and the process exits for its orchestrator to restart.
            LogError::Closed => ErrorKind::Permanent,
            LogError::Storage { kind, .. } => *kind,
        }
    }
}

/// The contract every event log keeps.
#[async_trait]
pub trait EventLog: Send + Sync + 'static {
    /// Creates `topic` with `partitions` partitions if it does not exist, and returns the
    /// partition count the topic has. An existing topic keeps its own count, whatever
    /// `partitions` says: repartitioning is a migration, never done in place, and a replica
    /// configured with another count (a rolling restart after the topic grew) must still run;
    /// callers warn when the two differ ([`warn_if_partitions_differ`]). Idempotent.
    async fn ensure_topic(&self, topic: &str, partitions: u32) -> Result<u32, LogError>;

    /// The partition count of `topic`. May be answered from a cache.
    async fn partitions(&self, topic: &str) -> Result<u32, LogError>;

    /// Whether the log answers for `topic` now, for `/readyz`, within a couple of seconds. A
    /// remote log must ask its servers (never a cache), so a broker that is down shows as down;
    /// the default, [`partitions`](EventLog::partitions), suits a log in a local file.
    async fn ping(&self, topic: &str) -> Result<(), LogError> {
        self.partitions(topic).await.map(|_| ())
    }

    /// Appends `records` and returns their positions, in the same order, only once every one
    /// of them is durable. Each record's partition is [`partition_for`] its key, so equal keys
    /// keep their order. Within a partition, offsets are dense and increase by one.
    async fn append(&self, topic: &str, records: Vec<Record>) -> Result<Vec<Position>, LogError>;

    /// Joins consumer `group` on `topic`. A group reads each partition from its committed
    /// offset, or from `start` if it never committed. Groups are independent of each other.
    async fn subscribe(
        &self,
        topic: &str,
        group: &str,
        start: StartFrom,
    ) -> Result<Box<dyn Subscription>, LogError>;

    /// Reads up to `max` records of one partition from `offset`, outside any group.
    async fn read(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
        max: usize,
    ) -> Result<Vec<Delivered>, LogError>;

    /// The group's committed offset and the end offset of every partition of `topic`.
    async fn lag(&self, topic: &str, group: &str) -> Result<Vec<PartitionLag>, LogError>;

    /// The groups that have committed offsets on `topic`.
    async fn groups(&self, topic: &str) -> Result<Vec<String>, LogError>;

    /// Forgets `group`'s committed offsets on `topic`, so it no longer shows in [`groups`] or
    /// lag reports (a finished replay's group). The group must have no running members.
    ///
    /// [`groups`]: EventLog::groups
    async fn delete_group(&self, topic: &str, group: &str) -> Result<(), LogError>;
}

/// A group member's view of its partitions.
#[async_trait]
pub trait Subscription: Send {
    /// Waits up to `timeout` for records, and returns at most `max`. Records of one partition
    /// arrive in offset order, each once per subscription; an empty result means none arrived.
    async fn poll(&mut self, max: usize, timeout: Duration) -> Result<Vec<Delivered>, LogError>;

    /// Durably records, per partition, the next offset the group should read. Committing an
    /// offset lower than the group's current one is ignored: commits never move backwards.
    async fn commit(&mut self, offsets: &[(u32, u64)]) -> Result<(), LogError>;

    /// Partitions taken from this member by a rebalance since the last call. Their records
    /// already handed out may be handled (effects are idempotent), but their offsets are now
    /// another member's to commit. Logs whose groups have a single member never revoke.
    fn take_revoked(&mut self) -> Vec<u32> {
        Vec::new()
    }
}

/// Warns, once per call, when `topic` has another partition count than the `configured` one
/// (`log.partitions`): the process runs on with the topic's own count, since every consumer
/// takes whatever partitions the topic has. Returns whether they differ.
pub fn warn_if_partitions_differ(topic: &str, existing: u32, configured: u32) -> bool {
    if existing == configured {
        return false;
    }
    tracing::warn!(
        topic,
        partitions = existing,
        configured,
        "the topic has {existing} partitions and log.partitions says {configured}: running with \
         the topic's {existing}. Set log.partitions to match; changing a topic's partition count \
         is a migration (docs/kafka.md)"
    );
    true
}

/// The partition of `key` among `partitions`: Kafka's murmur2 partitioner, so an embedded log,
/// Kafka, and producers in other languages agree on where a key lives.
pub fn partition_for(key: &[u8], partitions: u32) -> u32 {
    (murmur2(key) & 0x7fff_ffff) % partitions
}

/// Kafka's `Utils.murmur2` (seed 0x9747b28c), bit for bit.
pub fn murmur2(data: &[u8]) -> u32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let length = data.len() as u32;
    let mut h = SEED ^ length;
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if rest.len() >= 3 {
        h ^= (rest[2] as u32) << 16;
    }
    if rest.len() >= 2 {
        h ^= (rest[1] as u32) << 8;
    }
    if !rest.is_empty() {
        h ^= rest[0] as u32;
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Vectors from Kafka's `UtilsTest.testMurmur2`.
    #[test]
    fn murmur2_matches_kafka() {
        let cases: [(&[u8], i32); 6] = [
            (b"21", -973_932_308),
            (b"foobar", -790_332_482),
            (b"a-little-bit-long-string", -985_981_536),
            (b"a-little-bit-longer-string", -1_486_304_829),
            (
                b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            (b"abc", 479_470_107),
        ];
        for (input, expected) in cases {
            assert_eq!(
                murmur2(input) as i32,
                expected,
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn partitions_are_stable_and_in_range() {
        for n in [1, 8, 32] {
            for i in 0..1000u32 {
                let key = i.to_be_bytes();
                let p = partition_for(&key, n);
                assert!(p < n);
                assert_eq!(p, partition_for(&key, n));
            }
        }
    }
}
