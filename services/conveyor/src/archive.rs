//! The event archive: `conveyor archive` runs consumer group `archive` and writes the log to the
//! object store in compressed, checksummed segments, so the log outlives Kafka's retention and
//! `ops replay --from-archive` can rebuild read models from it.
//!
//! A segment is one batch of one partition, stored at
//! `archive/<topic>/<partition:05>/<first offset:020>-<last offset:020>.seg`, so a listing sorts
//! by offset. Its bytes are `CVARCH01`, the sha256 of the rest, then gzip of the bincode-encoded
//! records (offset, timestamp, key, headers, value: everything the log delivered). A segment is
//! written whole before the group commits its offsets; after a crash, a batch may be written
//! again with other boundaries, so readers skip offsets they have already seen.

use std::collections::BTreeMap;
use std::io::{Read, Write};

use anyhow::{Context, bail, ensure};
use async_trait::async_trait;
use bytes::Bytes;
use conveyor_config::Settings;
use conveyor_runtime::Stage;
use conveyor_runtime::consumer::{ConsumerConfig, HandleError, Handler};
use conveyor_storage::log::Delivered;
use conveyor_storage::objects::ObjectStore;
use conveyor_storage::views::ReadStore;
use indicatif::ProgressBar;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::sync::Arc;

const MAGIC: &[u8; 8] = b"CVARCH01";

/// One record as the archive keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchivedRecord {
    /// Its offset in its partition, from 0; the partition is in the segment's key.
    pub offset: u64,
    /// Append time, microseconds since the Unix epoch, as the log delivered it.
    pub timestamp: i64,
    /// The key it was appended with: for an event, its aggregate (media) id as UUID text.
    pub key: Vec<u8>,
    /// The headers it was appended with, in order (`content-type`, `event-type`,
    /// `schema-version` for an event).
    pub headers: Vec<(String, String)>,
    /// The payload, byte for byte; the `content-type` header names its codec.
    pub value: Vec<u8>,
}

impl ArchivedRecord {
    fn to_delivered(&self, topic: &str, partition: u32) -> Delivered {
        Delivered {
            topic: topic.to_owned(),
            partition,
            offset: self.offset,
            key: self.key.clone(),
            headers: self.headers.clone(),
            value: Bytes::from(self.value.clone()),
            timestamp: self.timestamp,
        }
    }
}

/// The object-store key of the segment holding offsets `first` to `last` (inclusive) of
/// `partition` of `topic`: `archive/<topic>/<partition:05>/<first:020>-<last:020>.seg`.
/// Zero-padded, so a listing sorts by partition, then offset.
pub fn segment_key(topic: &str, partition: u32, first: u64, last: u64) -> String {
    format!("archive/{topic}/{partition:05}/{first:020}-{last:020}.seg")
}

/// `(partition, first, last)` from a segment key.
fn parse_key(key: &str) -> Option<(u32, u64, u64)> {
    let mut parts = key.rsplit('/');
    let name = parts.next()?.strip_suffix(".seg")?;
    let partition = parts.next()?.parse().ok()?;
    let (first, last) = name.split_once('-')?;
    Some((partition, first.parse().ok()?, last.parse().ok()?))
}

/// The bytes of a segment of `records`: the magic `CVARCH01` (8 bytes), the SHA-256 of the
/// rest (32 bytes), then the gzip of the records, bincode-encoded (standard configuration).
/// [`decode_segment`] reads it back.
///
/// # Errors
/// When bincode cannot encode the records, or gzip compression (into memory) fails.
pub fn encode_segment(records: &[ArchivedRecord]) -> anyhow::Result<Vec<u8>> {
    let raw = bincode::serde::encode_to_vec(records, bincode::config::standard())?;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&raw)?;
    let body = gz.finish()?;
    let mut out = Vec::with_capacity(8 + 32 + body.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&Sha256::digest(&body));
    out.extend_from_slice(&body);
    Ok(out)
}

/// Decodes a segment, refusing it unless its checksum matches and its records are the ones its
/// key names.
pub fn decode_segment(key: &str, bytes: &[u8]) -> anyhow::Result<Vec<ArchivedRecord>> {
    ensure!(
        bytes.len() >= 40 && &bytes[..8] == MAGIC,
        "archive segment {key} is corrupt: not a Conveyor segment"
    );
    let (sum, body) = (&bytes[8..40], &bytes[40..]);
    ensure!(
        Sha256::digest(body).as_slice() == sum,
        "archive segment {key} is corrupt: its checksum does not match"
    );
    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(body)
        .read_to_end(&mut raw)
        .with_context(|| format!("archive segment {key} is corrupt: bad gzip"))?;
    let (records, _): (Vec<ArchivedRecord>, _) =
        bincode::serde::decode_from_slice(&raw, bincode::config::standard())
            .with_context(|| format!("archive segment {key} is corrupt: bad records"))?;
    if let Some((_, first, last)) = parse_key(key) {
        ensure!(
            records.first().map(|r| r.offset) == Some(first)
                && records.last().map(|r| r.offset) == Some(last),
            "archive segment {key} does not hold the offsets its name says"
        );
    }
    Ok(records)
}

/// The archive group's handler: one segment per batch, durable before the batch is committed.
pub struct Archiver {
    objects: Arc<dyn ObjectStore>,
    config: ConsumerConfig,
}

impl Archiver {
    /// An archiver writing segments to `objects`, in the group and with the segment size of
    /// `settings` (`archive.group`, `archive.batch`).
    pub fn new(objects: Arc<dyn ObjectStore>, settings: &Settings) -> Self {
        let mut config = ConsumerConfig::new(settings.topic(), &settings.archive.group);
        config.max_batch = settings.archive.batch.max(1);
        config.max_buffered = config.max_buffered.max(config.max_batch * 2);
        // Segments are written as they fill or as the log goes quiet, never more than one per
        // partition at a time, so a partition's segments never overlap (except after a crash).
        config.per_partition = 1;
        Archiver { objects, config }
    }
}

impl Stage for Archiver {
    fn name(&self) -> &'static str {
        "archive"
    }

    fn consumer_config(&self) -> ConsumerConfig {
        self.config.clone()
    }
}

#[async_trait]
impl Handler for Archiver {
    async fn handle(&self, records: &[Delivered]) -> Result<(), HandleError> {
        let (Some(first), Some(last)) = (records.first(), records.last()) else {
            return Ok(());
        };
        let archived: Vec<ArchivedRecord> = records
            .iter()
            .map(|r| ArchivedRecord {
                offset: r.offset,
                timestamp: r.timestamp,
                key: r.key.clone(),
                headers: r.headers.clone(),
                value: r.value.to_vec(),
            })
            .collect();
        let bytes = encode_segment(&archived).map_err(HandleError::Permanent)?;
        let key = segment_key(&first.topic, first.partition, first.offset, last.offset);
        self.objects
            .put_bytes(&key, bytes.into())
            .await
            .map_err(|e| HandleError::Transient(anyhow::Error::new(e).context(key)))?;
        metrics::counter!("conveyor_archived_events_total").increment(records.len() as u64);
        Ok(())
    }
}

/// The segments of `topic`, by partition, in offset order.
pub async fn segments(
    objects: &dyn ObjectStore,
    topic: &str,
) -> anyhow::Result<BTreeMap<u32, Vec<(u64, u64, String)>>> {
    let mut by_partition: BTreeMap<u32, Vec<(u64, u64, String)>> = BTreeMap::new();
    for object in objects.list(&format!("archive/{topic}/")).await? {
        match parse_key(&object.key) {
            Some((p, first, last)) => by_partition
                .entry(p)
                .or_default()
                .push((first, last, object.key)),
            None => tracing::warn!(key = %object.key, "not an archive segment; skipped"),
        }
    }
    for segs in by_partition.values_mut() {
        segs.sort();
    }
    Ok(by_partition)
}

/// Applies every archived event of `topic` to `store`, partition by partition in offset order,
/// each offset once. Returns the number of events applied. A record that does not decode as an
/// event (it went to the dead-letter topic when it was live) is skipped with a warning.
pub async fn replay_into(
    objects: &dyn ObjectStore,
    topic: &str,
    store: &dyn ReadStore,
    max_version_ahead_secs: u64,
    bar: &ProgressBar,
) -> anyhow::Result<u64> {
    let max_ahead = max_version_ahead_secs.saturating_mul(1_000_000);
    let all = segments(objects, topic).await?;
    bar.set_length(all.values().flatten().map(|(f, l, _)| l - f + 1).sum());
    let mut applied = 0u64;
    for (partition, segs) in all {
        let mut next: Option<u64> = None;
        for (first, last, key) in segs {
            if next.is_some_and(|n| last < n) {
                continue; // a batch written twice after a crash
            }
            if let Some(n) = next.filter(|n| first > *n) {
                tracing::warn!(partition, missing = ?(n..first), "gap in the archive");
            }
            let bytes = objects
                .get_bytes(&key)
                .await
                .with_context(|| format!("failed to read {key}"))?;
            let mut events = Vec::new();
            for record in decode_segment(&key, &bytes)? {
                if next.is_some_and(|n| record.offset < n) {
                    continue;
                }
                next = Some(record.offset + 1);
                // Bounded as the projector bounds them, so both build the same rows.
                let delivered = record.to_delivered(topic, partition);
                match conveyor_projector::projected_event(&delivered, max_ahead) {
                    Ok(event) => events.push(event),
                    Err(e) => tracing::warn!(
                        partition,
                        offset = record.offset,
                        error = %e,
                        "archived record is not an event; skipped"
                    ),
                }
            }
            for batch in events.chunks(512) {
                store
                    .apply(batch)
                    .await
                    .with_context(|| format!("failed to apply {key}"))?;
            }
            applied += events.len() as u64;
            bar.inc(last - first + 1);
        }
    }
    if applied == 0 {
        bail!("the archive holds no events of {topic}: is `conveyor archive` running?");
    }
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(offset: u64) -> ArchivedRecord {
        ArchivedRecord {
            offset,
            timestamp: 7,
            key: b"k".to_vec(),
            headers: vec![("content-type".into(), "application/json".into())],
            value: b"{}".to_vec(),
        }
    }

    #[test]
    fn segments_round_trip_and_refuse_any_changed_byte() {
        let records = vec![record(3), record(4)];
        let key = segment_key("media.events", 1, 3, 4);
        assert_eq!(parse_key(&key), Some((1, 3, 4)));
        let bytes = encode_segment(&records).unwrap();
        assert_eq!(decode_segment(&key, &bytes).unwrap(), records);
        for i in [0, 9, bytes.len() / 2, bytes.len() - 1] {
            let mut bad = bytes.clone();
            bad[i] ^= 1;
            let err = decode_segment(&key, &bad).unwrap_err().to_string();
            assert!(err.contains("corrupt"), "{err}");
        }
        let wrong = segment_key("media.events", 1, 3, 5);
        assert!(decode_segment(&wrong, &bytes).is_err());
    }
}
