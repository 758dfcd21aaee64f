//! The embedded event log on SQLite.
//!
//! Layout: one table per topic partition, `t{topic_id}_p{partition}`, keyed by an
//! `INTEGER PRIMARY KEY` so every append lands at the end of its B-tree (about 3× the append
//! rate of a composite `(partition, offset)` key, measured when the layout was chosen; see
//! `docs/architecture.md`). A record's
//! offset is its rowid minus one, so offsets are dense and start at 0.
//!
//! Writes go through one writer thread that owns the write connection. It drains every append
//! and commit waiting in its queue into one transaction, commits, and only then answers each
//! caller: group commit, with one fsync per batch under `durability = fsync`. Reads use their
//! own connections (WAL lets them run beside the writer), and several processes may share one
//! file; an in-process watch channel wakes local consumers at once, and other processes'
//! appends are seen within [`CROSS_PROCESS_POLL`].

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use tokio::sync::{oneshot, watch};

use super::{
    Delivered, EventLog, LogError, PartitionLag, Position, Record, StartFrom, Subscription,
    partition_for,
};
use crate::clock::now_micros;
use crate::error::Kinded;
use crate::sqlite::{PoolError, ReaderPool, SqliteFailure, open_connection};
use conveyor_config::Durability;

/// How often a waiting consumer re-reads the file, to see appends made by other processes.
const CROSS_PROCESS_POLL: Duration = Duration::from_millis(100);
/// Most operations folded into one group commit.
const MAX_GROUP: usize = 4096;

#[derive(Debug, Clone, Copy)]
struct Topic {
    id: i64,
    partitions: u32,
}

enum WriteOp {
    EnsureTopic {
        name: String,
        partitions: u32,
        reply: oneshot::Sender<Result<Topic, LogError>>,
    },
    Append {
        topic: Topic,
        records: Vec<Record>,
        reply: oneshot::Sender<Result<Vec<Position>, LogError>>,
    },
    Commit {
        group: String,
        topic: String,
        offsets: Vec<(u32, u64)>,
        reply: oneshot::Sender<Result<(), LogError>>,
    },
    DeleteGroup {
        group: String,
        topic: String,
        reply: oneshot::Sender<Result<(), LogError>>,
    },
}

struct Inner {
    path: PathBuf,
    writer: std::sync::mpsc::Sender<WriteOp>,
    topics: RwLock<HashMap<String, Topic>>,
    appended: watch::Receiver<u64>,
    readers: Arc<ReaderPool>,
}

/// The SQLite event log. Cheap to clone; every clone shares one writer.
#[derive(Clone)]
pub struct SqliteLog {
    inner: Arc<Inner>,
}

/// SQLite and file errors, by their kind: the one place this backend maps them.
fn storage(e: impl Into<SqliteFailure>) -> LogError {
    let SqliteFailure(kind, message) = e.into();
    LogError::Storage { kind, message }
}

fn table(topic_id: i64, partition: u32) -> String {
    format!("t{topic_id}_p{partition}")
}

impl From<PoolError> for LogError {
    fn from(e: PoolError) -> Self {
        LogError::transient(e.0)
    }
}

impl SqliteLog {
    /// Opens (creating if needed) the log at `path`.
    pub fn open(path: impl Into<PathBuf>, durability: Durability) -> Result<SqliteLog, LogError> {
        let path = path.into();
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(storage)?;
        }
        let conn = open_connection(&path).map_err(storage)?;
        let sync = match durability {
            Durability::Fsync => "FULL",
            Durability::Os => "NORMAL",
        };
        conn.pragma_update(None, "synchronous", sync)
            .map_err(storage)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS topics (
                 name TEXT PRIMARY KEY,
                 id INTEGER NOT NULL UNIQUE,
                 partitions INTEGER NOT NULL
             );
             CREATE TABLE IF NOT EXISTS group_offsets (
                 grp TEXT NOT NULL,
                 topic TEXT NOT NULL,
                 part INTEGER NOT NULL,
                 next_offset INTEGER NOT NULL,
                 PRIMARY KEY (grp, topic, part)
             ) WITHOUT ROWID;",
        )
        .map_err(storage)?;
        let (tx, rx) = std::sync::mpsc::channel();
        let (appended_tx, appended_rx) = watch::channel(0u64);
        std::thread::Builder::new()
            .name("sqlite-log-writer".into())
            .spawn(move || writer_loop(conn, rx, appended_tx))
            .map_err(storage)?;
        let log = SqliteLog {
            inner: Arc::new(Inner {
                path: path.clone(),
                writer: tx,
                topics: RwLock::new(HashMap::new()),
                appended: appended_rx,
                readers: Arc::new(ReaderPool::new(path.clone())),
            }),
        };
        Ok(log)
    }

    async fn send<T>(
        &self,
        op: impl FnOnce(oneshot::Sender<Result<T, LogError>>) -> WriteOp,
    ) -> Result<T, LogError> {
        let (reply, rx) = oneshot::channel();
        self.inner
            .writer
            .send(op(reply))
            .map_err(|_| LogError::Closed)?;
        rx.await.map_err(|_| LogError::Closed)?
    }

    async fn read_with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, LogError> + Send + 'static,
    ) -> Result<T, LogError> {
        self.inner.readers.with(f).await
    }

    async fn topic(&self, name: &str) -> Result<Topic, LogError> {
        if let Some(t) = self.inner.topics.read().expect("topic cache").get(name) {
            return Ok(*t);
        }
        // Another process may have created it since this one looked.
        let owned = name.to_owned();
        let found = self
            .read_with(move |conn| {
                conn.query_row(
                    "SELECT id, partitions FROM topics WHERE name = ?1",
                    [&owned],
                    |r| {
                        Ok(Topic {
                            id: r.get(0)?,
                            partitions: r.get(1)?,
                        })
                    },
                )
                .optional()
                .map_err(storage)
            })
            .await?;
        let topic = found.ok_or_else(|| LogError::UnknownTopic(name.to_owned()))?;
        self.inner
            .topics
            .write()
            .expect("topic cache")
            .insert(name.to_owned(), topic);
        Ok(topic)
    }
}

/// Answers one caller once the group's commit outcome is known.
type Reply = Box<dyn FnOnce(Option<&LogError>)>;

fn writer_loop(
    mut conn: Connection,
    rx: std::sync::mpsc::Receiver<WriteOp>,
    appended: watch::Sender<u64>,
) {
    while let Ok(first) = rx.recv() {
        let mut ops = vec![first];
        while ops.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(op) => ops.push(op),
                Err(_) => break,
            }
        }
        let mut replies: Vec<Reply> = Vec::with_capacity(ops.len());
        // Every op is answered, whatever fails: an op dropped unanswered would tell its caller
        // the log is closed (a permanent error) when the database was only busy.
        let mut pending: std::collections::VecDeque<WriteOp> = ops.drain(..).collect();
        let outcome = (|| -> Result<(), LogError> {
            let mut tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(storage)?;
            let now = now_micros();
            while let Some(op) = pending.pop_front() {
                match op {
                    WriteOp::EnsureTopic {
                        name,
                        partitions,
                        reply,
                    } => {
                        let (result, reply) =
                            run_isolated(&mut tx, reply, |c| ensure_topic(c, &name, partitions))?;
                        replies.push(Box::new(move |err| {
                            let _ = reply.send(match err {
                                Some(e) => Err(copy(e)),
                                None => result,
                            });
                        }));
                    }
                    WriteOp::Append {
                        topic,
                        records,
                        reply,
                    } => {
                        let (result, reply) =
                            run_isolated(&mut tx, reply, |c| append(c, topic, records, now))?;
                        replies.push(Box::new(move |err| {
                            let _ = reply.send(match err {
                                Some(e) => Err(copy(e)),
                                None => result,
                            });
                        }));
                    }
                    WriteOp::Commit {
                        group,
                        topic,
                        offsets,
                        reply,
                    } => {
                        let (result, reply) =
                            run_isolated(&mut tx, reply, |c| commit(c, &group, &topic, &offsets))?;
                        replies.push(Box::new(move |err| {
                            let _ = reply.send(match err {
                                Some(e) => Err(copy(e)),
                                None => result,
                            });
                        }));
                    }
                    WriteOp::DeleteGroup {
                        group,
                        topic,
                        reply,
                    } => {
                        let (result, reply) = run_isolated(&mut tx, reply, |c| {
                            c.execute(
                                "DELETE FROM group_offsets WHERE grp = ?1 AND topic = ?2",
                                params![group, topic],
                            )
                            .map(|_| ())
                            .map_err(storage)
                        })?;
                        replies.push(Box::new(move |err| {
                            let _ = reply.send(match err {
                                Some(e) => Err(copy(e)),
                                None => result,
                            });
                        }));
                    }
                }
            }
            tx.commit().map_err(storage)
        })();
        let err = outcome.err();
        if let Some(e) = &err {
            tracing::warn!(error = %e, kind = %e.kind(), "event log group commit failed");
        }
        for reply in replies {
            reply(err.as_ref());
        }
        if let Some(e) = &err {
            for op in pending {
                op.fail(e);
            }
        }
        appended.send_modify(|g| *g += 1);
    }
}

/// The same failure again, for a second caller.
fn copy(e: &LogError) -> LogError {
    let message = match e {
        LogError::Storage { message, .. } => message.clone(),
        other => other.to_string(),
    };
    LogError::Storage {
        kind: e.kind(),
        message,
    }
}

/// [`isolated`], answering `reply` with the failure when the savepoint itself fails (and the
/// group with it); otherwise `reply` is handed back for the group's outcome.
#[allow(clippy::type_complexity)]
fn run_isolated<T, U>(
    tx: &mut rusqlite::Transaction<'_>,
    reply: oneshot::Sender<Result<U, LogError>>,
    op: impl FnOnce(&Connection) -> Result<T, LogError>,
) -> Result<(Result<T, LogError>, oneshot::Sender<Result<U, LogError>>), LogError> {
    match isolated(tx, op) {
        Ok(result) => Ok((result, reply)),
        Err(e) => {
            let _ = reply.send(Err(copy(&e)));
            Err(e)
        }
    }
}

impl WriteOp {
    /// Answers the op's caller with `e`.
    fn fail(self, e: &LogError) {
        match self {
            WriteOp::EnsureTopic { reply, .. } => drop(reply.send(Err(copy(e)))),
            WriteOp::Append { reply, .. } => drop(reply.send(Err(copy(e)))),
            WriteOp::Commit { reply, .. } | WriteOp::DeleteGroup { reply, .. } => {
                drop(reply.send(Err(copy(e))))
            }
        }
    }
}

/// Runs one operation inside a savepoint, so a failed operation leaves nothing behind while
/// the rest of the group still commits.
fn isolated<T>(
    tx: &mut rusqlite::Transaction<'_>,
    op: impl FnOnce(&Connection) -> Result<T, LogError>,
) -> Result<Result<T, LogError>, LogError> {
    let sp = tx.savepoint().map_err(storage)?;
    let result = op(&sp);
    if result.is_ok() {
        sp.commit().map_err(storage)?;
    }
    Ok(result)
}

fn ensure_topic(conn: &Connection, name: &str, partitions: u32) -> Result<Topic, LogError> {
    if partitions == 0 {
        return Err(LogError::permanent("a topic needs at least one partition"));
    }
    let existing = conn
        .query_row(
            "SELECT id, partitions FROM topics WHERE name = ?1",
            [name],
            |r| {
                Ok(Topic {
                    id: r.get(0)?,
                    partitions: r.get(1)?,
                })
            },
        )
        .optional()
        .map_err(storage)?;
    if let Some(topic) = existing {
        return Ok(topic);
    }
    let id: i64 = conn
        .query_row("SELECT coalesce(max(id), 0) + 1 FROM topics", [], |r| {
            r.get(0)
        })
        .map_err(storage)?;
    conn.execute(
        "INSERT INTO topics (name, id, partitions) VALUES (?1, ?2, ?3)",
        params![name, id, partitions],
    )
    .map_err(storage)?;
    for p in 0..partitions {
        conn.execute_batch(&format!(
            "CREATE TABLE {} (off INTEGER PRIMARY KEY, key BLOB NOT NULL, headers TEXT NOT NULL, value BLOB NOT NULL, ts INTEGER NOT NULL)",
            table(id, p)
        ))
        .map_err(storage)?;
    }
    Ok(Topic { id, partitions })
}

fn append(
    conn: &Connection,
    topic: Topic,
    records: Vec<Record>,
    now: i64,
) -> Result<Vec<Position>, LogError> {
    let mut positions = Vec::with_capacity(records.len());
    for record in records {
        let partition = partition_for(&record.key, topic.partitions);
        let headers = serde_json::to_string(&record.headers).map_err(storage)?;
        let mut stmt = conn
            .prepare_cached(&format!(
                "INSERT INTO {} (key, headers, value, ts) VALUES (?1, ?2, ?3, ?4)",
                table(topic.id, partition)
            ))
            .map_err(storage)?;
        stmt.execute(params![record.key, headers, &record.value[..], now])
            .map_err(storage)?;
        let rowid = conn.last_insert_rowid();
        positions.push(Position {
            partition,
            offset: (rowid - 1) as u64,
        });
    }
    Ok(positions)
}

fn commit(
    conn: &Connection,
    group: &str,
    topic: &str,
    offsets: &[(u32, u64)],
) -> Result<(), LogError> {
    let mut stmt = conn
        .prepare_cached(
            "INSERT INTO group_offsets (grp, topic, part, next_offset) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (grp, topic, part) DO UPDATE SET next_offset = excluded.next_offset
             WHERE excluded.next_offset > next_offset",
        )
        .map_err(storage)?;
    for (partition, next) in offsets {
        stmt.execute(params![group, topic, partition, *next as i64])
            .map_err(storage)?;
    }
    Ok(())
}

fn end_offset(conn: &Connection, topic: Topic, partition: u32) -> Result<u64, LogError> {
    let sql = format!(
        "SELECT coalesce(max(off), 0) FROM {}",
        table(topic.id, partition)
    );
    let end: i64 = conn
        .prepare_cached(&sql)
        .and_then(|mut s| s.query_row([], |r| r.get(0)))
        .map_err(storage)?;
    Ok(end as u64)
}

fn committed(conn: &Connection, group: &str, topic: &str) -> Result<HashMap<u32, u64>, LogError> {
    let mut stmt = conn
        .prepare_cached("SELECT part, next_offset FROM group_offsets WHERE grp = ?1 AND topic = ?2")
        .map_err(storage)?;
    let rows = stmt
        .query_map(params![group, topic], |r| {
            Ok((r.get::<_, u32>(0)?, r.get::<_, i64>(1)? as u64))
        })
        .map_err(storage)?;
    rows.collect::<Result<_, _>>().map_err(storage)
}

fn read_partition(
    conn: &Connection,
    topic_name: &str,
    topic: Topic,
    partition: u32,
    offset: u64,
    max: usize,
) -> Result<Vec<Delivered>, LogError> {
    let sql = format!(
        "SELECT off, key, headers, value, ts FROM {} WHERE off > ?1 ORDER BY off LIMIT ?2",
        table(topic.id, partition)
    );
    let mut stmt = conn.prepare_cached(&sql).map_err(storage)?;
    let rows = stmt
        .query_map(params![offset as i64, max as i64], |r| {
            let headers: String = r.get(2)?;
            Ok(Delivered {
                topic: topic_name.to_owned(),
                partition,
                offset: (r.get::<_, i64>(0)? - 1) as u64,
                key: r.get(1)?,
                headers: serde_json::from_str(&headers).unwrap_or_default(),
                value: Bytes::from(r.get::<_, Vec<u8>>(3)?),
                timestamp: r.get(4)?,
            })
        })
        .map_err(storage)?;
    rows.collect::<Result<_, _>>().map_err(storage)
}

#[async_trait]
impl EventLog for SqliteLog {
    async fn ensure_topic(&self, topic: &str, partitions: u32) -> Result<u32, LogError> {
        let name = topic.to_owned();
        let created = self
            .send(|reply| WriteOp::EnsureTopic {
                name,
                partitions,
                reply,
            })
            .await?;
        self.inner
            .topics
            .write()
            .expect("topic cache")
            .insert(topic.to_owned(), created);
        Ok(created.partitions)
    }

    async fn partitions(&self, topic: &str) -> Result<u32, LogError> {
        Ok(self.topic(topic).await?.partitions)
    }

    async fn append(&self, topic: &str, records: Vec<Record>) -> Result<Vec<Position>, LogError> {
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let topic = self.topic(topic).await?;
        self.send(|reply| WriteOp::Append {
            topic,
            records,
            reply,
        })
        .await
    }

    async fn subscribe(
        &self,
        topic: &str,
        group: &str,
        start: StartFrom,
    ) -> Result<Box<dyn Subscription>, LogError> {
        let info = self.topic(topic).await?;
        let conn = open_connection(&self.inner.path).map_err(storage)?;
        let (group_name, topic_name) = (group.to_owned(), topic.to_owned());
        let (conn, positions) = tokio::task::spawn_blocking(move || {
            let committed = committed(&conn, &group_name, &topic_name)?;
            let mut positions = Vec::with_capacity(info.partitions as usize);
            for p in 0..info.partitions {
                positions.push(match (committed.get(&p), start) {
                    (Some(next), _) => *next,
                    (None, StartFrom::Earliest) => 0,
                    (None, StartFrom::Latest) => end_offset(&conn, info, p)?,
                });
            }
            Ok::<_, LogError>((conn, positions))
        })
        .await
        .map_err(storage)??;
        // The embedded log's groups have one member, which owns every partition. Not for the
        // tails that start at the end (a query edge's cache invalidation, named per process).
        if start == StartFrom::Earliest {
            metrics::gauge!("conveyor_consumer_assigned_partitions", "group" => group.to_owned())
                .set(info.partitions as f64);
        }
        Ok(Box::new(SqliteSubscription {
            log: self.clone(),
            topic: topic.to_owned(),
            group: group.to_owned(),
            info,
            positions,
            conn: Arc::new(Mutex::new(conn)),
            appended: self.inner.appended.clone(),
            rotate: 0,
        }))
    }

    async fn read(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
        max: usize,
    ) -> Result<Vec<Delivered>, LogError> {
        let info = self.topic(topic).await?;
        if partition >= info.partitions {
            return Err(LogError::UnknownPartition {
                topic: topic.to_owned(),
                partition,
            });
        }
        let name = topic.to_owned();
        self.read_with(move |conn| read_partition(conn, &name, info, partition, offset, max))
            .await
    }

    async fn lag(&self, topic: &str, group: &str) -> Result<Vec<PartitionLag>, LogError> {
        let info = self.topic(topic).await?;
        let (topic, group) = (topic.to_owned(), group.to_owned());
        self.read_with(move |conn| {
            let committed = committed(conn, &group, &topic)?;
            (0..info.partitions)
                .map(|p| {
                    Ok(PartitionLag {
                        partition: p,
                        committed: committed.get(&p).copied().unwrap_or(0),
                        end: end_offset(conn, info, p)?,
                    })
                })
                .collect()
        })
        .await
    }

    async fn groups(&self, topic: &str) -> Result<Vec<String>, LogError> {
        let topic = topic.to_owned();
        self.read_with(move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT DISTINCT grp FROM group_offsets WHERE topic = ?1 ORDER BY grp",
                )
                .map_err(storage)?;
            let rows = stmt.query_map([&topic], |r| r.get(0)).map_err(storage)?;
            rows.collect::<Result<_, _>>().map_err(storage)
        })
        .await
    }

    async fn delete_group(&self, topic: &str, group: &str) -> Result<(), LogError> {
        let (group, topic) = (group.to_owned(), topic.to_owned());
        self.send(|reply| WriteOp::DeleteGroup {
            group,
            topic,
            reply,
        })
        .await
    }
}

struct SqliteSubscription {
    log: SqliteLog,
    topic: String,
    group: String,
    info: Topic,
    /// Next offset to read, per partition.
    positions: Vec<u64>,
    conn: Arc<Mutex<Connection>>,
    appended: watch::Receiver<u64>,
    /// Partition the next fetch starts at, so a deep backlog in one cannot starve the others.
    rotate: u32,
}

impl SqliteSubscription {
    async fn fetch(&mut self, max: usize) -> Result<Vec<Delivered>, LogError> {
        // Cancel-safe: if this future is dropped mid-read, the connection stays shared and the
        // positions untouched, so the next poll reads the same records again.
        let conn = self.conn.clone();
        let (topic, info, positions, start) = (
            self.topic.clone(),
            self.info,
            self.positions.clone(),
            self.rotate,
        );
        let result = tokio::task::spawn_blocking(move || -> Result<Vec<Delivered>, LogError> {
            let conn = conn.lock().expect("subscription connection lock");
            let mut out = Vec::new();
            for i in 0..info.partitions {
                let p = (start + i) % info.partitions;
                if out.len() >= max {
                    break;
                }
                out.extend(read_partition(
                    &conn,
                    &topic,
                    info,
                    p,
                    positions[p as usize],
                    max - out.len(),
                )?);
            }
            Ok(out)
        })
        .await
        .map_err(storage)?;
        self.rotate = (self.rotate + 1) % self.info.partitions;
        let records = result?;
        for r in &records {
            self.positions[r.partition as usize] = r.offset + 1;
        }
        Ok(records)
    }
}

#[async_trait]
impl Subscription for SqliteSubscription {
    async fn poll(&mut self, max: usize, timeout: Duration) -> Result<Vec<Delivered>, LogError> {
        let deadline = Instant::now() + timeout;
        loop {
            self.appended.borrow_and_update();
            let records = self.fetch(max.max(1)).await?;
            let now = Instant::now();
            if !records.is_empty() || now >= deadline {
                return Ok(records);
            }
            let wait = (deadline - now).min(CROSS_PROCESS_POLL);
            let _ = tokio::time::timeout(wait, self.appended.changed()).await;
        }
    }

    async fn commit(&mut self, offsets: &[(u32, u64)]) -> Result<(), LogError> {
        if offsets.is_empty() {
            return Ok(());
        }
        for (p, _) in offsets {
            if *p >= self.info.partitions {
                return Err(LogError::UnknownPartition {
                    topic: self.topic.clone(),
                    partition: *p,
                });
            }
        }
        let (group, topic, offsets) = (self.group.clone(), self.topic.clone(), offsets.to_vec());
        self.log
            .send(|reply| WriteOp::Commit {
                group,
                topic,
                offsets,
                reply,
            })
            .await
    }
}

/// One partition of a log file, as a backup manifest records it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PartitionSummary {
    /// The partition, from 0.
    pub partition: u32,
    /// How many records the partition holds.
    pub records: u64,
    /// The offset the next append to it would get: its last offset plus one, 0 when empty.
    pub end: u64,
}

/// One group's committed offsets on one topic.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GroupSummary {
    /// The consumer group's name.
    pub group: String,
    /// The topic it committed on.
    pub topic: String,
    /// `(partition, next offset)`.
    pub offsets: Vec<(u32, u64)>,
}

/// What a log file holds: every topic's partitions and every group's commits.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LogSummary {
    /// Every topic, by name, with its partitions in partition order.
    pub topics: std::collections::BTreeMap<String, Vec<PartitionSummary>>,
    /// Every group's commits, one entry per group and topic, sorted by group, then topic.
    pub groups: Vec<GroupSummary>,
}

/// Summarizes a log file that no process is writing (a backup copy).
pub fn summarize_file(path: &std::path::Path) -> Result<LogSummary, LogError> {
    let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(storage)?;
    let topics: Vec<(String, Topic)> = conn
        .prepare("SELECT name, id, partitions FROM topics ORDER BY name")
        .and_then(|mut s| {
            s.query_map([], |r| {
                Ok((
                    r.get(0)?,
                    Topic {
                        id: r.get(1)?,
                        partitions: r.get(2)?,
                    },
                ))
            })?
            .collect()
        })
        .map_err(storage)?;
    let mut summary = LogSummary::default();
    for (name, topic) in topics {
        let mut partitions = Vec::new();
        for p in 0..topic.partitions {
            let records: i64 = conn
                .query_row(
                    &format!("SELECT count(*) FROM {}", table(topic.id, p)),
                    [],
                    |r| r.get(0),
                )
                .map_err(storage)?;
            partitions.push(PartitionSummary {
                partition: p,
                records: records as u64,
                end: end_offset(&conn, topic, p)?,
            });
        }
        summary.topics.insert(name, partitions);
    }
    let mut stmt = conn
        .prepare(
            "SELECT grp, topic, part, next_offset FROM group_offsets ORDER BY grp, topic, part",
        )
        .map_err(storage)?;
    let rows = stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, u32>(2)?,
                r.get::<_, i64>(3)? as u64,
            ))
        })
        .map_err(storage)?;
    for row in rows {
        let (group, topic, part, next) = row.map_err(storage)?;
        match summary.groups.last_mut() {
            Some(g) if g.group == group && g.topic == topic => g.offsets.push((part, next)),
            _ => summary.groups.push(GroupSummary {
                group,
                topic,
                offsets: vec![(part, next)],
            }),
        }
    }
    Ok(summary)
}

/// `group`'s committed offsets on `topic`, read from a log file other processes may be
/// writing (a read transaction sees one consistent state).
pub fn read_group_offsets(
    path: &std::path::Path,
    group: &str,
    topic: &str,
) -> Result<Vec<(u32, u64)>, LogError> {
    let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(storage)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))
        .map_err(storage)?;
    let mut offsets: Vec<(u32, u64)> = committed(&conn, group, topic)?.into_iter().collect();
    offsets.sort();
    Ok(offsets)
}

/// Sets `group`'s committed offsets on `topic` in a log file no process is writing (a backup
/// copy), moving them backwards if need be: the one place commits may go back, so that a
/// restored projector re-applies what a read-model snapshot may lack.
pub fn set_group_offsets_in_file(
    path: &std::path::Path,
    group: &str,
    topic: &str,
    offsets: &[(u32, u64)],
) -> Result<(), LogError> {
    let mut conn = Connection::open(path).map_err(storage)?;
    let tx = conn.transaction().map_err(storage)?;
    tx.execute(
        "DELETE FROM group_offsets WHERE grp = ?1 AND topic = ?2",
        params![group, topic],
    )
    .map_err(storage)?;
    for (part, next) in offsets {
        tx.execute(
            "INSERT INTO group_offsets (grp, topic, part, next_offset) VALUES (?1, ?2, ?3, ?4)",
            params![group, topic, part, *next as i64],
        )
        .map_err(storage)?;
    }
    tx.commit().map_err(storage)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn conformance() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.db");
        let open = move || {
            SqliteLog::open(&path, Durability::Os).map(|l| Box::new(l) as Box<dyn EventLog>)
        };
        super::super::conformance::run(&open).await;
    }

    /// Found by a hostile review: a group whose transaction could not start dropped its ops,
    /// so their callers read "event log is shut down", a permanent error that became a 500.
    #[tokio::test]
    async fn a_busy_database_is_a_transient_failure_for_every_caller() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.db");
        let log = SqliteLog::open(&path, Durability::Os).unwrap();
        log.ensure_topic("t", 1).await.unwrap();
        let record = || Record {
            key: b"k".to_vec(),
            headers: Vec::new(),
            value: Bytes::from_static(b"v"),
        };
        let holder = Connection::open(&path).unwrap();
        holder.execute_batch("BEGIN EXCLUSIVE").unwrap();
        let appends = (0..3).map(|_| log.append("t", vec![record()]));
        for outcome in futures::future::join_all(appends).await {
            let e = outcome.expect_err("the database is locked");
            assert!(!matches!(e, LogError::Closed), "{e}");
            assert_eq!(e.kind(), crate::ErrorKind::Transient, "{e}");
        }
        holder.execute_batch("COMMIT").unwrap();
        let positions = log.append("t", vec![record()]).await.unwrap();
        assert_eq!(positions[0].offset, 0, "nothing was half written");
    }
}
