//! The consumer runtime every consumer group runs on (processors, transcoders, projectors, the
//! archive): at-least-once delivery with effects made idempotent by the handlers.
//!
//! - Records of a partition are handed to the handler in batches of up to `max_batch`, with up
//!   to `per_partition` batches of one partition in flight at once (1 keeps strict order, as
//!   projectors need; more lets a CPU-heavy processor use more cores than partitions).
//! - A partition's offset is committed only up to its lowest unfinished record, and only after
//!   the handler returned, i.e. after the effect is durable.
//! - A transient failure is retried with backoff until it succeeds or the process stops. A
//!   permanent one is not retried: nothing about the record will change, and every retry would
//!   hold its partition (100 undecodable records once held one for 78 s of backoff). A batch
//!   that fails permanently is split at once into single records; a record that fails
//!   permanently on its own is appended to the dead-letter topic at once, with its origin and
//!   error in headers, and the group moves on. `conveyor ops dlq redrive` sends it back once
//!   its cause is fixed.
//! - On shutdown the runtime stops fetching, lets in-flight work finish, commits it, and
//!   returns.
//! - Each record handled gets a consumer span in its upload's trace ([`crate::trace`]), and two
//!   metrics say how far behind the group is in time: `conveyor_record_wait_seconds{group}`,
//!   how long each record waited in the log before the group took it, and
//!   `conveyor_consumer_oldest_waiting_seconds{group}`, the age of the oldest record this
//!   member has fetched and not yet taken (what a person means by "the queue is behind").

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use conveyor_storage::error::Kinded;
use conveyor_storage::log::{Delivered, EventLog, StartFrom};

/// Why a handler could not finish a batch.
#[derive(Debug)]
pub enum HandleError {
    /// Worth retrying as is: a backend timed out or is unavailable.
    Transient(anyhow::Error),
    /// Retrying will not help: the record is malformed or breaks an invariant.
    Permanent(anyhow::Error),
}

impl std::fmt::Display for HandleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HandleError::Transient(e) => write!(f, "transient: {e:#}"),
            HandleError::Permanent(e) => write!(f, "permanent: {e:#}"),
        }
    }
}

/// Turns any error into the queue's decision, at the point where a handler knows it
/// (pict-rs's `JobError::{Retry, Abort}`):
///
/// ```ignore
/// let events = decode(records).abort("undecodable record")?;      // never worth retrying
/// store.write(&events).await.by_kind("failed to write")?;          // as the backend says
/// ```
pub trait JobResult<T> {
    /// Transient: retried with backoff until it succeeds or the process stops.
    fn retry(self, what: &'static str) -> Result<T, HandleError>;
    /// Permanent: never retried; a batch is split into records at once, and a record that still
    /// fails goes to the dead-letter topic at once.
    fn abort(self, what: &'static str) -> Result<T, HandleError>;
}

impl<T, E: std::error::Error + Send + Sync + 'static> JobResult<T> for Result<T, E> {
    fn retry(self, what: &'static str) -> Result<T, HandleError> {
        self.map_err(|e| HandleError::Transient(anyhow::Error::new(e).context(what)))
    }

    fn abort(self, what: &'static str) -> Result<T, HandleError> {
        self.map_err(|e| HandleError::Permanent(anyhow::Error::new(e).context(what)))
    }
}

/// [`JobResult`] for backend errors, which know their [`ErrorKind`](conveyor_storage::ErrorKind): transient errors are
/// retried, and the rest (permanent, not found) are permanent for the job.
pub trait KindedJobResult<T> {
    /// Transient if the backend says so ([`JobResult::retry`]), permanent otherwise
    /// ([`JobResult::abort`]); `what` is the context the error is wrapped in.
    fn by_kind(self, what: &'static str) -> Result<T, HandleError>;
}

impl<T, E: Kinded + std::error::Error + Send + Sync + 'static> KindedJobResult<T> for Result<T, E> {
    fn by_kind(self, what: &'static str) -> Result<T, HandleError> {
        match self {
            Err(e) if e.is_transient() => Err(e).retry(what),
            other => other.abort(what),
        }
    }
}

/// A stage's work on a batch of records from one partition, in offset order.
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Does the work and returns once its effect is durable. Must be idempotent: after a crash
    /// the same records are handled again.
    async fn handle(&self, records: &[Delivered]) -> Result<(), HandleError>;
}

/// How [`run`] consumes: which topic and group, how records are batched, retried and
/// committed. [`ConsumerConfig::new`] gives the defaults; each stage sets its own from the
/// settings.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    /// The topic consumed.
    pub topic: String,
    /// The consumer group joined; its committed offsets are this consumer's progress.
    pub group: String,
    /// Where records that keep failing go.
    pub dlq_topic: String,
    /// Batches of one partition handled at once: 1 keeps strict order within a partition.
    pub per_partition: usize,
    /// Most records in one batch handed to the handler (0 is taken as 1).
    pub max_batch: usize,
    /// Most records fetched but not yet finished, across partitions.
    pub max_buffered: usize,
    /// First retry delay; doubles up to `max_backoff`.
    pub backoff: Duration,
    /// Longest retry delay. Once an outage ends, a partition waits at most this long for its
    /// next try, so catching up costs at most this much on top of the outage; while the
    /// outage lasts, each stalled partition tries once per this interval.
    pub max_backoff: Duration,
    /// Finished work is committed at most this often (and always on shutdown), so a busy
    /// group makes one commit round trip per interval rather than one per batch.
    pub commit_interval: Duration,
}

impl ConsumerConfig {
    /// `topic` as a member of `group`, dead letters to `{topic}.dlq`, one record at a time per
    /// partition, 4096 records buffered, transient retries from 50 ms doubling up to 5 s, and
    /// commits at most every 50 ms.
    pub fn new(topic: &str, group: &str) -> Self {
        ConsumerConfig {
            topic: topic.to_owned(),
            group: group.to_owned(),
            dlq_topic: format!("{topic}.dlq"),
            per_partition: 1,
            max_batch: 1,
            max_buffered: 4096,
            backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(5),
            commit_interval: Duration::from_millis(50),
        }
    }
}

#[derive(Default)]
struct PartitionState {
    epoch: u64,
    waiting: VecDeque<Delivered>,
    /// Batches of this partition being handled now (at most `per_partition`).
    in_flight: usize,
    unfinished: BTreeSet<u64>,
    /// One past the highest offset fetched.
    fetched_end: u64,
    committed: Option<u64>,
    /// Cancelled when the partition is revoked: its batches in flight are dropped mid-work
    /// (a transcoder's ffmpeg is killed with them), as a crash would drop them.
    revoked: CancellationToken,
}

impl PartitionState {
    /// The offset everything below which is finished.
    fn low_watermark(&self) -> u64 {
        self.unfinished.first().copied().unwrap_or(self.fetched_end)
    }
}

/// Runs `handler` over `config.topic` as a member of `config.group` until `stop` is cancelled.
pub async fn run(
    log: Arc<dyn EventLog>,
    config: ConsumerConfig,
    handler: Arc<dyn Handler>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let mut sub = log
        .subscribe(&config.topic, &config.group, StartFrom::Earliest)
        .await
        .with_context(|| format!("failed to join group {} on {}", config.group, config.topic))?;
    tracing::info!(group = %config.group, topic = %config.topic, "consumer started");
    // At 0 from the start, so a rate over them is 0, not absent, until the first one.
    for counter in [
        "conveyor_dead_letters_total",
        "conveyor_handler_retries_total",
    ] {
        metrics::counter!(counter, "group" => config.group.clone()).increment(0);
    }
    let mut partitions: HashMap<u32, PartitionState> = HashMap::new();
    let mut tasks: JoinSet<((u32, u64), Vec<u64>, bool)> = JoinSet::new();
    // Handlers see a child token: cancelling it abandons retries, whose records stay
    // uncommitted and are redelivered after a restart.
    let work_stop = stop.child_token();
    let mut buffered = 0usize;
    let mut stopping = false;
    let mut last_commit = tokio::time::Instant::now();
    // Each ownership of a partition gets a new epoch, so a batch that outlives a revoke cannot
    // touch the state of a later ownership.
    let mut epochs = 0u64;

    // Revokes are looked for on every turn of the loop, which turns at least every
    // REVOKE_CHECK whatever else it waits on: an idle poll returns by then, and while the
    // buffer is full (no poll) this tick turns it. They were once looked for only when a poll
    // returned records, so an idle member never saw them.
    let mut revoke_check = tokio::time::interval(REVOKE_CHECK);
    revoke_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let record_wait =
        metrics::histogram!("conveyor_record_wait_seconds", "group" => config.group.clone());
    let oldest = metrics::gauge!("conveyor_consumer_oldest_waiting_seconds", "group" => config.group.clone());
    let mut oldest_at = tokio::time::Instant::now();

    loop {
        // The loop turns at least every REVOKE_CHECK, so the age is at most a second stale.
        if oldest_at.elapsed() >= Duration::from_secs(1) {
            oldest.set(oldest_waiting_secs(&partitions, now_micros()));
            oldest_at = tokio::time::Instant::now();
        }
        // Partitions another member owns now: forget what is waiting for them, and drop the
        // batches in flight uncommitted (their new owner redoes them; a transcoder's ffmpeg is
        // killed with its future), so nothing more is published for them.
        for partition in sub.take_revoked() {
            if let Some(state) = partitions.remove(&partition) {
                tracing::info!(group = %config.group, partition, in_flight = state.in_flight, "partition revoked; its work in flight is dropped");
                state.revoked.cancel();
                buffered -= state.unfinished.len();
            }
        }
        // Hand waiting records to the handler, up to the in-flight bound of each partition.
        if !stopping {
            for (&partition, state) in partitions.iter_mut() {
                while state.in_flight < config.per_partition && !state.waiting.is_empty() {
                    let n = state.waiting.len().min(config.max_batch.max(1));
                    let batch: Vec<Delivered> = state.waiting.drain(..n).collect();
                    state.in_flight += 1;
                    let (handler, log, config, token) = (
                        handler.clone(),
                        log.clone(),
                        config.clone(),
                        work_stop.clone(),
                    );
                    let epoch = state.epoch;
                    let revoked = state.revoked.clone();
                    let taken = now_micros();
                    for record in &batch {
                        record_wait
                            .record(taken.saturating_sub(record.timestamp).max(0) as f64 / 1e6);
                    }
                    // The batch runs in its first record's span; the others' spans, in their
                    // own traces, cover the same time. At most TRACED_PER_BATCH of them, so a
                    // projector's or the archive's batch of thousands does not flood the
                    // export's queue (2,048 spans).
                    let spans: Vec<tracing::Span> = batch
                        .iter()
                        .take(TRACED_PER_BATCH)
                        .map(|record| crate::trace::record_span(&config.group, record))
                        .collect();
                    tasks.spawn(async move {
                        let offsets: Vec<u64> = batch.iter().map(|r| r.offset).collect();
                        let handled = handle_with_retries(&*handler, &*log, &config, batch, &token)
                            .instrument(spans[0].clone());
                        let done = tokio::select! {
                            done = handled => done,
                            // Another member owns the partition now and redoes this batch.
                            _ = revoked.cancelled() => false,
                        };
                        drop(spans);
                        ((partition, epoch), offsets, done)
                    });
                }
            }
        }
        if stopping && tasks.is_empty() {
            break;
        }

        tokio::select! {
            biased;
            _ = stop.cancelled(), if !stopping => {
                tracing::info!(group = %config.group, in_flight = tasks.len(), "consumer draining");
                stopping = true;
            }
            Some(joined) = tasks.join_next(), if !tasks.is_empty() => {
                // Take whatever else already finished too, so one commit covers it all.
                let mut next = Some(joined);
                while let Some(joined) = next {
                    let (partition, offsets, done) = joined.context("consumer task panicked")?;
                    let (partition, epoch) = partition;
                    let Some(state) = partitions.get_mut(&partition).filter(|s| s.epoch == epoch) else {
                        // A batch of a partition revoked while it ran: already uncounted.
                        next = tasks.try_join_next();
                        continue;
                    };
                    state.in_flight -= 1;
                    if done {
                        for offset in &offsets {
                            state.unfinished.remove(offset);
                        }
                        buffered -= offsets.len();
                    }
                    next = tasks.try_join_next();
                }
                if last_commit.elapsed() >= config.commit_interval {
                    commit_finished(sub.as_mut(), &mut partitions, &config).await?;
                    last_commit = tokio::time::Instant::now();
                }
            }
            _ = tokio::time::sleep_until(last_commit + config.commit_interval),
                if !stopping && has_uncommitted(&partitions) => {
                commit_finished(sub.as_mut(), &mut partitions, &config).await?;
                last_commit = tokio::time::Instant::now();
            }
            // Only while the poll below is off: a tick beside it would cancel every poll that
            // takes longer than the tick.
            _ = revoke_check.tick(), if stopping || buffered >= config.max_buffered => {}
            // Returns within REVOKE_CHECK when idle, so the loop turns and looks for revokes.
            polled = sub.poll(config.max_buffered.saturating_sub(buffered).max(1), REVOKE_CHECK),
                if !stopping && buffered < config.max_buffered => {
                let records = match polled {
                    Ok(records) => records,
                    // A broker that is down or electing a leader: wait and poll again. The
                    // lag report shows the stall.
                    Err(e) if e.is_transient() => {
                        tracing::warn!(group = %config.group, error = %e, "failed to poll the event log, retrying");
                        tokio::select! {
                            _ = stop.cancelled() => {}
                            _ = tokio::time::sleep(config.backoff.max(Duration::from_millis(500))) => {}
                        }
                        Vec::new()
                    }
                    Err(e) => return Err(anyhow::Error::new(e).context("failed to poll the event log")),
                };
                for record in records {
                    let state = partitions.entry(record.partition).or_insert_with(|| {
                        epochs += 1;
                        PartitionState { epoch: epochs, ..PartitionState::default() }
                    });
                    state.unfinished.insert(record.offset);
                    state.fetched_end = record.offset + 1;
                    state.waiting.push_back(record);
                    buffered += 1;
                }
            }
        }
    }
    commit_finished(sub.as_mut(), &mut partitions, &config).await?;
    tracing::info!(group = %config.group, "consumer stopped");
    Ok(())
}

/// Most records of one batch that get spans of their own (each gets two: its handling and its
/// wait); the rest of a larger batch is handled untraced.
const TRACED_PER_BATCH: usize = 16;

/// How often a member looks for partitions revoked from it when nothing else wakes it: a
/// revoke takes effect within this (plus the log's own notice: Kafka's rebalance callback runs
/// on the driver thread, which polls at least every 100 ms).
const REVOKE_CHECK: Duration = Duration::from_millis(100);

/// The age in seconds of the oldest record fetched and not yet handed to the handler, on any
/// partition, by its append time and the clock `now` (microseconds); 0 when none waits.
/// Records not fetched yet are newer than those waiting on their partition. A record being
/// handled does not count (a long video is work, not a queue), but the records behind it on
/// its partition do.
fn oldest_waiting_secs(partitions: &HashMap<u32, PartitionState>, now: i64) -> f64 {
    partitions
        .values()
        .filter_map(|state| state.waiting.front().map(|record| record.timestamp))
        .min()
        .map_or(0.0, |at| now.saturating_sub(at).max(0) as f64 / 1e6)
}

/// This process's clock in microseconds since the Unix epoch, the unit of
/// [`Delivered::timestamp`] (`conveyor_storage::clock`, which tests may skew).
fn now_micros() -> i64 {
    conveyor_storage::clock::now_micros()
}

/// Whether some partition has finished work above its committed offset.
fn has_uncommitted(partitions: &HashMap<u32, PartitionState>) -> bool {
    partitions.values().any(|state| {
        state.fetched_end > 0 && state.committed.is_none_or(|c| c < state.low_watermark())
    })
}

/// Commits every partition's low watermark that moved. A transient failure (the broker is
/// down) is logged and left for the next interval: the offsets stay where they were, so at
/// worst finished records are redelivered, which effects tolerate. Any other failure stops the
/// consumer.
async fn commit_finished(
    sub: &mut dyn conveyor_storage::log::Subscription,
    partitions: &mut HashMap<u32, PartitionState>,
    config: &ConsumerConfig,
) -> anyhow::Result<()> {
    let mut offsets = Vec::new();
    for (&partition, state) in partitions.iter() {
        let mark = state.low_watermark();
        if state.committed.is_none_or(|c| c < mark) && state.fetched_end > 0 {
            offsets.push((partition, mark));
        }
    }
    if offsets.is_empty() {
        return Ok(());
    }
    match sub.commit(&offsets).await {
        Ok(()) => {}
        Err(e) if e.is_transient() => {
            tracing::warn!(group = %config.group, error = %e, "failed to commit offsets, retrying at the next interval");
            return Ok(());
        }
        Err(e) => return Err(anyhow::Error::new(e).context("failed to commit offsets")),
    }
    for (partition, mark) in offsets {
        partitions
            .get_mut(&partition)
            .expect("committed partition")
            .committed = Some(mark);
    }
    Ok(())
}

/// Returns whether the batch is finished (handled or dead-lettered). `false` means the runtime
/// is stopping and the batch must be redelivered later.
async fn handle_with_retries(
    handler: &dyn Handler,
    log: &dyn EventLog,
    config: &ConsumerConfig,
    batch: Vec<Delivered>,
    stop: &CancellationToken,
) -> bool {
    match attempt(handler, config, &batch, stop).await {
        Outcome::Done => true,
        Outcome::Stopped => false,
        Outcome::GaveUp(error) if batch.len() > 1 => {
            tracing::warn!(group = %config.group, error = %error, size = batch.len(), "batch failed, retrying records one by one");
            for record in batch {
                // In the record's own trace, so its retry and dead letter show there, not in
                // the batch's first record's.
                let alone = async {
                    let single = std::slice::from_ref(&record);
                    match attempt(handler, config, single, stop).await {
                        Outcome::Done => true,
                        Outcome::Stopped => false,
                        Outcome::GaveUp(error) => {
                            dead_letter(log, config, &record, &error, stop).await
                        }
                    }
                };
                let span = crate::trace::record_span(&config.group, &record);
                if !alone.instrument(span).await {
                    return false;
                }
            }
            true
        }
        Outcome::GaveUp(error) => dead_letter(log, config, &batch[0], &error, stop).await,
    }
}

enum Outcome {
    Done,
    Stopped,
    GaveUp(String),
}

async fn attempt(
    handler: &dyn Handler,
    config: &ConsumerConfig,
    batch: &[Delivered],
    stop: &CancellationToken,
) -> Outcome {
    let mut delay = config.backoff;
    loop {
        let error = match handler.handle(batch).await {
            Ok(()) => return Outcome::Done,
            Err(e) => e,
        };
        // Permanent means now: no retry, and no backoff before the split or the dead letter.
        if let HandleError::Permanent(_) = error {
            return Outcome::GaveUp(error.to_string());
        }
        metrics::counter!("conveyor_handler_retries_total", "group" => config.group.clone())
            .increment(1);
        tracing::warn!(group = %config.group, partition = batch[0].partition, offset = batch[0].offset, error = %error, "handler failed, retrying");
        tokio::select! {
            _ = stop.cancelled() => return Outcome::Stopped,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(config.max_backoff);
    }
}

/// Appends the record to the dead-letter topic with where it came from and why it failed.
/// Retries the append until it succeeds: a dead letter must not be lost.
async fn dead_letter(
    log: &dyn EventLog,
    config: &ConsumerConfig,
    record: &Delivered,
    error: &str,
    stop: &CancellationToken,
) -> bool {
    let mut dead = record.to_record();
    dead.headers.retain(|(k, _)| !k.starts_with("dlq-"));
    dead.headers.extend([
        ("dlq-topic".to_owned(), record.topic.clone()),
        ("dlq-partition".to_owned(), record.partition.to_string()),
        ("dlq-offset".to_owned(), record.offset.to_string()),
        ("dlq-group".to_owned(), config.group.clone()),
        ("dlq-error".to_owned(), error.chars().take(1000).collect()),
        // Tries of the record on its own: a permanent failure is never retried.
        ("dlq-attempts".to_owned(), "1".to_owned()),
    ]);
    let mut delay = config.backoff;
    loop {
        match log.append(&config.dlq_topic, vec![dead.clone()]).await {
            Ok(_) => {
                metrics::counter!("conveyor_dead_letters_total", "group" => config.group.clone())
                    .increment(1);
                tracing::error!(group = %config.group, partition = record.partition, offset = record.offset, error, "record sent to the dead-letter topic");
                return true;
            }
            Err(e) => tracing::error!(error = %e, "failed to append a dead letter, retrying"),
        }
        tokio::select! {
            _ = stop.cancelled() => return false,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(config.max_backoff);
    }
}

/// Which groups' lag [`report_lag`] publishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LagOf {
    /// Every group it is given, from the first report: a group that never committed shows
    /// its whole backlog.
    Always,
    /// A group only once it has committed an offset, so one this deployment never runs (a
    /// transcoder where there is no video) does not show as stalled.
    OnceStarted,
}

/// Publishes `conveyor_consumer_lag{group, partition}` and `conveyor_consumer_lag_total{group}`
/// for `groups` every `every`, until `stop`. Labels are bounded by groups × partitions. An
/// autoscaler (KEDA) and the alert rules read these.
pub async fn report_lag(
    log: Arc<dyn EventLog>,
    topic: String,
    groups: Vec<String>,
    every: Duration,
    of: LagOf,
    stop: CancellationToken,
) {
    loop {
        for group in &groups {
            match log.lag(&topic, group).await {
                Ok(partitions)
                    if of == LagOf::OnceStarted && partitions.iter().all(|p| p.committed == 0) => {}
                Ok(partitions) => {
                    let mut total = 0;
                    for p in partitions {
                        total += p.lag();
                        metrics::gauge!("conveyor_consumer_lag", "group" => group.clone(), "partition" => p.partition.to_string())
                            .set(p.lag() as f64);
                    }
                    metrics::gauge!("conveyor_consumer_lag_total", "group" => group.clone())
                        .set(total as f64);
                }
                Err(e) => tracing::warn!(group = %group, error = %e, "failed to read consumer lag"),
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use conveyor_config::Durability;
    use conveyor_storage::log::Record;
    use conveyor_storage::log::sqlite::SqliteLog;
    use std::sync::Mutex;

    /// Fails permanently on `poison`, transiently on `stuck` (for as long as it is told to),
    /// and records every value it finishes.
    struct Scripted {
        done: Mutex<Vec<String>>,
        stuck_fails: bool,
        in_flight: std::sync::atomic::AtomicUsize,
        max_in_flight: std::sync::atomic::AtomicUsize,
    }

    impl Scripted {
        fn new(stuck_fails: bool) -> Arc<Self> {
            Arc::new(Scripted {
                done: Mutex::default(),
                stuck_fails,
                in_flight: Default::default(),
                max_in_flight: Default::default(),
            })
        }
    }

    #[async_trait]
    impl Handler for Scripted {
        async fn handle(&self, records: &[Delivered]) -> Result<(), HandleError> {
            use std::sync::atomic::Ordering::SeqCst;
            let now = self.in_flight.fetch_add(1, SeqCst) + 1;
            self.max_in_flight.fetch_max(now, SeqCst);
            tokio::time::sleep(Duration::from_millis(5)).await;
            self.in_flight.fetch_sub(1, SeqCst);
            for r in records {
                match &r.value[..] {
                    b"poison" => {
                        return Err(HandleError::Permanent(anyhow::anyhow!("cannot parse")));
                    }
                    b"stuck" if self.stuck_fails => {
                        return Err(HandleError::Transient(anyhow::anyhow!("backend down")));
                    }
                    _ => {}
                }
            }
            let mut done = self.done.lock().unwrap();
            done.extend(
                records
                    .iter()
                    .map(|r| String::from_utf8_lossy(&r.value).into_owned()),
            );
            Ok(())
        }
    }

    async fn one_partition_log(values: &[&str]) -> (tempfile::TempDir, Arc<dyn EventLog>) {
        let dir = tempfile::tempdir().unwrap();
        let log: Arc<dyn EventLog> =
            Arc::new(SqliteLog::open(dir.path().join("log.db"), Durability::Os).unwrap());
        log.ensure_topic("t", 1).await.unwrap();
        log.ensure_topic("t.dlq", 1).await.unwrap();
        let records = values
            .iter()
            .map(|v| Record {
                key: b"k".to_vec(),
                headers: vec![],
                value: bytes::Bytes::from(v.to_string()),
            })
            .collect();
        log.append("t", records).await.unwrap();
        (dir, log)
    }

    fn config(per_partition: usize, max_batch: usize) -> ConsumerConfig {
        let mut c = ConsumerConfig::new("t", "g");
        c.per_partition = per_partition;
        c.max_batch = max_batch;
        c.backoff = Duration::from_millis(1);
        c
    }

    async fn committed(log: &Arc<dyn EventLog>) -> u64 {
        log.lag("t", "g").await.unwrap()[0].committed
    }

    async fn wait_committed(log: &Arc<dyn EventLog>, want: u64) {
        for _ in 0..400 {
            if committed(log).await >= want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!(
            "offset {want} was never committed (at {})",
            committed(log).await
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_poison_record_is_dead_lettered_and_the_group_moves_on() {
        let (_dir, log) = one_partition_log(&["a", "b", "poison", "c", "d"]).await;
        let handler = Scripted::new(false);
        let stop = CancellationToken::new();
        // Batches of 4: the batch holding the poison is split, so its neighbours still land.
        let run = tokio::spawn(run(
            log.clone(),
            config(1, 4),
            handler.clone(),
            stop.clone(),
        ));
        wait_committed(&log, 5).await;
        stop.cancel();
        run.await.unwrap().unwrap();

        assert_eq!(*handler.done.lock().unwrap(), vec!["a", "b", "c", "d"]);
        let dead = log.read("t.dlq", 0, 0, 10).await.unwrap();
        assert_eq!(dead.len(), 1);
        assert_eq!(&dead[0].value[..], b"poison");
        assert_eq!(dead[0].header("dlq-topic"), Some("t"));
        assert_eq!(dead[0].header("dlq-offset"), Some("2"));
        assert_eq!(dead[0].header("dlq-attempts"), Some("1"));
        assert!(
            dead[0]
                .header("dlq-error")
                .unwrap()
                .contains("cannot parse")
        );
    }

    /// Permanent means now: with a minute of backoff before any retry, a hundred poison records
    /// (in batches, and one by one) are dead-lettered and the good record behind them is
    /// handled within the few seconds `wait_committed` allows. One backoff would miss it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flood_of_poison_is_dead_lettered_without_backoff() {
        let mut values = vec!["poison"; 100];
        values.push("good");
        let (_dir, log) = one_partition_log(&values).await;
        for (per_partition, max_batch) in [(1, 1), (1, 16)] {
            let handler = Scripted::new(false);
            let stop = CancellationToken::new();
            let mut config = config(per_partition, max_batch);
            config.group = format!("g{max_batch}");
            config.backoff = Duration::from_secs(60);
            config.max_backoff = Duration::from_secs(60);
            let group = config.group.clone();
            let run = tokio::spawn(run(log.clone(), config, handler.clone(), stop.clone()));
            let done = async {
                loop {
                    if log.lag("t", &group).await.unwrap()[0].committed >= 101 {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            };
            tokio::time::timeout(Duration::from_secs(20), done)
                .await
                .expect("every poison record dead-lettered and the good one handled");
            stop.cancel();
            run.await.unwrap().unwrap();
            assert_eq!(*handler.done.lock().unwrap(), vec!["good"]);
        }
        let dead = log.read("t.dlq", 0, 0, 1000).await.unwrap();
        assert_eq!(
            dead.len(),
            200,
            "each group dead-lettered each poison record once"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn commits_stop_below_an_unfinished_record_and_it_is_redelivered() {
        let values = ["0", "1", "2", "stuck", "4", "5", "6", "7"];
        let (_dir, log) = one_partition_log(&values).await;

        // Four in flight per partition: records after the stuck one finish, but the commit
        // must stay at the stuck one's offset.
        let handler = Scripted::new(true);
        let stop = CancellationToken::new();
        let run_once = tokio::spawn(run(
            log.clone(),
            config(4, 1),
            handler.clone(),
            stop.clone(),
        ));
        for _ in 0..400 {
            if handler.done.lock().unwrap().len() == 7 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            handler.done.lock().unwrap().len(),
            7,
            "everything but the stuck record finished"
        );
        assert!(
            handler
                .max_in_flight
                .load(std::sync::atomic::Ordering::SeqCst)
                > 1,
            "records ran concurrently"
        );
        wait_committed(&log, 3).await;
        stop.cancel();
        run_once.await.unwrap().unwrap();
        assert_eq!(
            committed(&log).await,
            3,
            "never past the lowest unfinished offset"
        );

        // After a restart the backend is back: the stuck record and everything after it are
        // redelivered (at least once), and the group reaches the end.
        let healthy = Scripted::new(false);
        let stop = CancellationToken::new();
        let run_twice = tokio::spawn(run(
            log.clone(),
            config(4, 1),
            healthy.clone(),
            stop.clone(),
        ));
        wait_committed(&log, 8).await;
        stop.cancel();
        run_twice.await.unwrap().unwrap();
        let mut redelivered = healthy.done.lock().unwrap().clone();
        redelivered.sort();
        assert_eq!(redelivered, vec!["4", "5", "6", "7", "stuck"]);
    }

    /// Holds every batch until it is dropped, noting when each partition's work started and
    /// when it was dropped.
    #[derive(Default)]
    struct Hold {
        started: Mutex<HashMap<u32, std::time::Instant>>,
        dropped: Mutex<HashMap<u32, std::time::Instant>>,
    }

    /// Notes, when dropped, that the work of `partition` was dropped.
    struct DropNote(Arc<Hold>, u32);

    impl Drop for DropNote {
        fn drop(&mut self) {
            let at = std::time::Instant::now();
            self.0.dropped.lock().unwrap().insert(self.1, at);
        }
    }

    struct Holding(Arc<Hold>);

    #[async_trait]
    impl Handler for Holding {
        async fn handle(&self, records: &[Delivered]) -> Result<(), HandleError> {
            let partition = records[0].partition;
            self.0
                .started
                .lock()
                .unwrap()
                .insert(partition, std::time::Instant::now());
            let _note = DropNote(self.0.clone(), partition);
            // A long job: only a revoke (or a shutdown) ends it.
            std::future::pending::<()>().await;
            Ok(())
        }
    }

    /// Reported: a transcoder whose partition moved to a member that had just joined ran its
    /// job on for 77 s, because it had no new records to read: the revoke was only looked at
    /// when a poll returned, and its 50 ms commit timer kept cancelling the idle poll. Now the
    /// member drops the revoked partition's work in flight before its new owner starts it,
    /// although nothing else arrives.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_revoke_drops_the_work_in_flight_at_once_on_an_idle_member() {
        use conveyor_storage::log::kafka::KafkaLog;
        let Some(brokers) =
            conveyor_storage::testing::engine(conveyor_storage::testing::KAFKA, "the revoke test")
        else {
            return;
        };
        let settings = conveyor_config::LogSettings {
            session_timeout_ms: 6000,
            ..Default::default()
        };
        let log: Arc<dyn EventLog> = Arc::new(KafkaLog::connect(&brokers, &settings).unwrap());
        let topic = format!("revoke-{}", uuid::Uuid::new_v4().simple());
        log.ensure_topic(&topic, 2).await.unwrap();
        log.ensure_topic(&format!("{topic}.dlq"), 2).await.unwrap();
        // One long job on each partition.
        let records = [0u32, 1]
            .iter()
            .map(|&p| {
                let key = (0u32..)
                    .map(|i| format!("k{i}").into_bytes())
                    .find(|k| conveyor_storage::log::partition_for(k, 2) == p)
                    .unwrap();
                Record {
                    key,
                    headers: vec![],
                    value: bytes::Bytes::from_static(b"long job"),
                }
            })
            .collect();
        log.append(&topic, records).await.unwrap();
        let mut config = ConsumerConfig::new(&topic, &format!("g-{topic}"));
        config.backoff = Duration::from_millis(1);

        let (first, second) = (Arc::new(Hold::default()), Arc::new(Hold::default()));
        let (stop_first, stop_second) = (CancellationToken::new(), CancellationToken::new());
        let first_member = tokio::spawn(run(
            log.clone(),
            config.clone(),
            Arc::new(Holding(first.clone())),
            stop_first.clone(),
        ));
        let both = wait_for(Duration::from_secs(60), || {
            first.started.lock().unwrap().len() == 2
        })
        .await;
        assert!(both, "the first member started both jobs");

        let second_member = tokio::spawn(run(
            log.clone(),
            config.clone(),
            Arc::new(Holding(second.clone())),
            stop_second.clone(),
        ));
        let moved = wait_for(Duration::from_secs(60), || {
            !second.started.lock().unwrap().is_empty()
        })
        .await;
        assert!(
            moved,
            "the member that joined took a partition and started its job"
        );
        let (&partition, &taken_at) = second
            .started
            .lock()
            .unwrap()
            .iter()
            .next()
            .map(|(p, t)| (p, t))
            .unwrap();
        // The old owner dropped it (at the latest a moment after the new owner started it: the
        // cooperative protocol revokes before it assigns, and the check runs every 100 ms).
        let dropped = wait_for(Duration::from_secs(10), || {
            first.dropped.lock().unwrap().contains_key(&partition)
        })
        .await;
        assert!(
            dropped,
            "the old owner still runs partition {partition}'s job"
        );
        let dropped_at = first.dropped.lock().unwrap()[&partition];
        assert!(
            dropped_at <= taken_at + Duration::from_secs(2),
            "dropped {:?} after the new owner started",
            dropped_at.duration_since(taken_at)
        );
        let other = 1 - partition;
        assert!(
            !first.dropped.lock().unwrap().contains_key(&other),
            "the partition it kept runs on"
        );

        // Held jobs never finish: the members are dropped, and leave the group.
        first_member.abort();
        second_member.abort();
        let _ = first_member.await;
        let _ = second_member.await;
    }

    /// The age is the oldest waiting record's, over every partition; records being handled
    /// (no longer waiting) do not count.
    #[test]
    fn the_oldest_waiting_record_gives_the_age() {
        let record = |partition: u32, offset: u64, timestamp: i64| Delivered {
            topic: "t".into(),
            partition,
            offset,
            key: Vec::new(),
            headers: Vec::new(),
            value: bytes::Bytes::new(),
            timestamp,
        };
        let mut partitions: HashMap<u32, PartitionState> = HashMap::new();
        assert_eq!(oldest_waiting_secs(&partitions, 10_000_000), 0.0);
        let busy = partitions.entry(0).or_default();
        busy.unfinished.insert(0);
        busy.in_flight = 1;
        assert_eq!(
            oldest_waiting_secs(&partitions, 10_000_000),
            0.0,
            "in flight is not waiting"
        );
        partitions
            .get_mut(&0)
            .unwrap()
            .waiting
            .push_back(record(0, 1, 4_000_000));
        let other = partitions.entry(1).or_default();
        other.waiting.push_back(record(1, 0, 7_000_000));
        other.waiting.push_back(record(1, 1, 8_000_000));
        assert_eq!(oldest_waiting_secs(&partitions, 10_000_000), 6.0);
        // A clock behind the producer's reads 0, never a negative age.
        assert_eq!(oldest_waiting_secs(&partitions, 1_000_000), 0.0);
    }

    async fn wait_for(bound: Duration, check: impl Fn() -> bool) -> bool {
        let deadline = std::time::Instant::now() + bound;
        while std::time::Instant::now() < deadline {
            if check() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        check()
    }
}
