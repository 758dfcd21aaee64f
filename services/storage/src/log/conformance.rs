//! The [`EventLog`] conformance suite. Every implementation runs it: SQLite always, Kafka when
//! its test broker is configured. `open` must return a handle on the same, initially empty,
//! log each time it is called, so the suite can check what survives a restart.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;

use super::{EventLog, LogError, Record, StartFrom};

fn record(key: &str, value: &str) -> Record {
    Record {
        key: key.as_bytes().to_vec(),
        headers: vec![("content-type".into(), "text/plain".into())],
        value: Bytes::from(value.to_owned()),
    }
}

/// Polls until `want` records arrived or 30 s passed.
async fn drain(sub: &mut dyn super::Subscription, want: usize) -> Vec<super::Delivered> {
    let mut got = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while got.len() < want && std::time::Instant::now() < deadline {
        got.extend(
            sub.poll(want - got.len(), Duration::from_millis(200))
                .await
                .expect("poll"),
        );
    }
    got
}

/// Runs every check against the log `open` returns: topic creation and refusals, per-key
/// placement with dense offsets, concurrent appends, group reads, commits that never move
/// back, resuming after a reopen, independent and deleted groups, tails and reads outside a
/// group. Topic and group names are unique per run, so runs against a shared broker never
/// meet.
///
/// `open` is called more than once (a second handle, a reopen after the first is dropped)
/// and must return a handle on the same, initially empty, log each time.
///
/// # Panics
/// On the first broken promise, and if `open` fails.
pub async fn run(open: &(dyn Fn() -> Result<Box<dyn EventLog>, LogError> + Sync)) {
    let log = open().expect("open log");
    // Unique names, so runs against a shared broker never meet.
    let run = uuid::Uuid::new_v4().simple().to_string();
    let topic: &'static str = Box::leak(format!("conformance-{run}").into_boxed_str());
    let (group_a, group_b, tail_group) = (
        format!("a-{run}"),
        format!("b-{run}"),
        format!("tail-{run}"),
    );

    // Topics: idempotent creation, no silent repartitioning (an existing topic keeps its count
    // and says what it is), unknown topics refused.
    assert_eq!(log.ensure_topic(topic, 4).await.expect("create topic"), 4);
    assert_eq!(
        log.ensure_topic(topic, 4)
            .await
            .expect("ensure is idempotent"),
        4
    );
    assert_eq!(
        log.ensure_topic(topic, 8)
            .await
            .expect("another count is no error"),
        4,
        "an existing topic keeps its partition count"
    );
    assert_eq!(log.ensure_topic(topic, 2).await.unwrap(), 4);
    assert_eq!(log.partitions(topic).await.unwrap(), 4);
    let unknown = format!("never-created-{run}");
    assert!(matches!(
        log.append(&unknown, vec![record("k", "v")]).await,
        Err(LogError::UnknownTopic(_))
    ));

    // Appends: positions in input order, equal keys on one partition with dense offsets.
    let batch: Vec<Record> = (0..40)
        .map(|i| record(&format!("key-{}", i % 5), &format!("v{i}")))
        .collect();
    let positions = log.append(topic, batch.clone()).await.expect("append");
    assert_eq!(positions.len(), 40);
    let mut by_partition: HashMap<u32, Vec<u64>> = HashMap::new();
    let mut key_partition: HashMap<Vec<u8>, u32> = HashMap::new();
    for (rec, pos) in batch.iter().zip(&positions) {
        assert!(pos.partition < 4);
        let p = *key_partition
            .entry(rec.key.clone())
            .or_insert(pos.partition);
        assert_eq!(p, pos.partition, "one key, one partition");
        by_partition
            .entry(pos.partition)
            .or_default()
            .push(pos.offset);
    }
    for offsets in by_partition.values() {
        let expected: Vec<u64> = (0..offsets.len() as u64).collect();
        assert_eq!(
            offsets, &expected,
            "offsets are dense from 0, in append order"
        );
    }

    // Concurrent appenders all get distinct positions (group commit must not mix replies).
    let mut tasks = Vec::new();
    let shared: std::sync::Arc<dyn EventLog> = std::sync::Arc::from(open().expect("second handle"));
    for t in 0..8 {
        let log = shared.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for i in 0..20 {
                out.extend(
                    log.append(topic, vec![record(&format!("c{t}"), &format!("{t}-{i}"))])
                        .await
                        .unwrap(),
                );
            }
            out
        }));
    }
    let mut seen = std::collections::HashSet::new();
    for t in tasks {
        for pos in t.await.unwrap() {
            assert!(seen.insert(pos), "duplicate position {pos:?}");
        }
    }
    let total = 40 + 160;

    // A group reads everything once, in order per partition.
    let mut sub = log
        .subscribe(topic, &group_a, StartFrom::Earliest)
        .await
        .expect("subscribe");
    let got = drain(sub.as_mut(), total).await;
    assert_eq!(got.len(), total);
    let mut last: HashMap<u32, u64> = HashMap::new();
    for d in &got {
        if let Some(prev) = last.insert(d.partition, d.offset) {
            assert_eq!(
                d.offset,
                prev + 1,
                "partition {} skipped or repeated",
                d.partition
            );
        }
        assert_eq!(d.header("content-type"), Some("text/plain"));
    }
    let per_key: Vec<String> = got
        .iter()
        .filter(|d| d.key == b"key-0")
        .map(|d| String::from_utf8(d.value.to_vec()).unwrap())
        .collect();
    assert_eq!(
        per_key,
        (0..8).map(|i| format!("v{}", i * 5)).collect::<Vec<_>>(),
        "per-key order"
    );
    assert!(
        sub.poll(10, Duration::from_millis(50))
            .await
            .unwrap()
            .is_empty(),
        "nothing twice"
    );

    // Commit part of the way; commits never move backwards.
    let lag = log.lag(topic, &group_a).await.unwrap();
    let first = lag
        .iter()
        .find(|l| l.end >= 2)
        .expect("a partition with records")
        .partition;
    sub.commit(&[(first, 2)]).await.unwrap();
    sub.commit(&[(first, 1)]).await.unwrap();
    drop(sub);
    let lag = log.lag(topic, &group_a).await.unwrap();
    let l = lag.iter().find(|l| l.partition == first).unwrap();
    assert_eq!(l.committed, 2);
    assert_eq!(lag.iter().map(|l| l.end).sum::<u64>(), total as u64);
    assert_eq!(l.lag(), l.end - 2);

    // After a restart, the group resumes from its commits, and another group is independent.
    drop(log);
    drop(shared);
    let log = open().expect("reopen log");
    let mut resumed = log
        .subscribe(topic, &group_a, StartFrom::Earliest)
        .await
        .unwrap();
    let again = drain(resumed.as_mut(), total - 2).await;
    assert_eq!(again.len(), total - 2);
    assert!(!again.iter().any(|d| d.partition == first && d.offset < 2));
    let mut other = log
        .subscribe(topic, &group_b, StartFrom::Earliest)
        .await
        .unwrap();
    assert_eq!(drain(other.as_mut(), total).await.len(), total);
    assert!(log.groups(topic).await.unwrap().contains(&group_a));
    // A group with no running member can be deleted: its commits are gone.
    drop(resumed);
    drop(other);
    log.delete_group(topic, &group_a).await.unwrap();
    assert!(!log.groups(topic).await.unwrap().contains(&group_a));
    assert!(
        log.lag(topic, &group_a)
            .await
            .unwrap()
            .iter()
            .all(|l| l.committed == 0),
        "a deleted group has no commits"
    );

    // A tail sees only what is appended after it subscribed, and a waiting poll wakes for it.
    let mut tail = log
        .subscribe(topic, &tail_group, StartFrom::Latest)
        .await
        .unwrap();
    let shared: std::sync::Arc<dyn EventLog> = std::sync::Arc::from(log);
    let appender = shared.clone();
    let late = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        appender
            .append(topic, vec![record("late", "after")])
            .await
            .unwrap()
    });
    let fresh = tail.poll(10, Duration::from_secs(15)).await.unwrap();
    late.await.unwrap();
    assert_eq!(fresh.len(), 1);
    assert_eq!(&fresh[0].value[..], b"after");

    // Reading outside a group.
    let pos = shared
        .append(topic, vec![record("direct", "read-me")])
        .await
        .unwrap()[0];
    let read = shared
        .read(topic, pos.partition, pos.offset, 10)
        .await
        .unwrap();
    assert_eq!(&read[0].value[..], b"read-me");
    assert_eq!(read[0].offset, pos.offset);
}
