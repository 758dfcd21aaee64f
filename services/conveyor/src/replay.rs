//! `conveyor ops replay`: rebuilds a read model from the log without downtime.
//!
//! 1. A fresh generation of the projection's tables is created beside the live one
//!    ([`begin_generation`]), and a consumer group of its own (`<projector>-replay-g<n>`)
//!    projects the log into it from the start, optionally after the archive's segments.
//! 2. Once that group is within a few hundred events of the log's end (it chases fixed targets,
//!    so a steady stream of appends cannot keep it from finishing), reads switch to the new
//!    generation in one transaction ([`switch_generation`]). From then on the live projector
//!    writes there too.
//! 3. The replay group catches up once more, to the log's end as it was at the switch: events
//!    the live projector applied to the old generation just before the switch land in the new
//!    one too (applying twice is a no-op).
//! 4. The old generation's tables and the replay group are dropped.
//!
//! Queries keep answering from the old generation until the switch, and from the new one after.
//! An interrupted replay resumes (same generation, same group) unless `--from-start` is given.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use conveyor_config::{Settings, ViewsUri};
use conveyor_projector::Projector;
use conveyor_runtime::changes::Changes;
use conveyor_storage::log::EventLog;
use conveyor_storage::objects::ObjectStore;
use conveyor_storage::views::ReadStore;
use conveyor_storage::views::sqlite::{
    PROJECTION, SqliteReadStore, begin_generation, drop_generation, switch_generation,
};
use indicatif::{ProgressBar, ProgressStyle};
use tokio_util::sync::CancellationToken;

/// What a replay did.
#[derive(Debug)]
pub struct ReplayReport {
    /// The generation of the projection's tables this replay built, which reads now use.
    pub generation: u32,
    /// The generation reads used before the switch; its tables are dropped.
    pub replaced: u32,
    /// Events applied from the archive before the log.
    pub archived_events: u64,
    /// Offsets the replay group consumed from the log.
    pub log_events: u64,
    /// Wall-clock time of the whole replay, up to the old generation's drop.
    pub elapsed: Duration,
}

/// The projections `--projection` accepts.
pub const PROJECTIONS: &[&str] = &[PROJECTION];

/// The group's committed offset and the end offset of every partition, by partition.
async fn position(
    log: &dyn EventLog,
    topic: &str,
    group: &str,
) -> anyhow::Result<HashMap<u32, (u64, u64)>> {
    Ok(log
        .lag(topic, group)
        .await?
        .into_iter()
        .map(|l| (l.partition, (l.committed, l.end)))
        .collect())
}

/// The end offset of every partition, as of now.
async fn ends(log: &dyn EventLog, topic: &str, group: &str) -> anyhow::Result<HashMap<u32, u64>> {
    Ok(position(log, topic, group)
        .await?
        .into_iter()
        .map(|(p, (_, end))| (p, end))
        .collect())
}

/// Waits until `group` has committed at least `target` on every partition, moving `bar`
/// along. Returns the group's position then.
async fn reach(
    log: &dyn EventLog,
    topic: &str,
    group: &str,
    target: &HashMap<u32, u64>,
    bar: &ProgressBar,
    consumer: &tokio::task::JoinHandle<anyhow::Result<()>>,
) -> anyhow::Result<HashMap<u32, (u64, u64)>> {
    loop {
        let now = position(log, topic, group).await?;
        let committed: u64 = now.values().map(|(c, _)| c).sum();
        let end: u64 = now.values().map(|(_, e)| e).sum();
        bar.set_length(end.max(committed));
        bar.set_position(committed);
        let done = now
            .iter()
            .all(|(p, (c, _))| *c >= target.get(p).copied().unwrap_or(0));
        if done {
            return Ok(now);
        }
        if consumer.is_finished() {
            bail!("the replay's consumer stopped before catching up");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How close to the log's end the replay must be before reads switch to it. Under a steady
/// stream of appends the end moves on while the replay chases it, so the replay chases fixed
/// targets (the ends as of each lap's start) until a lap leaves at most this many events, then
/// switches. The last lap, after the switch, brings in what is left.
const SWITCH_WITHIN: u64 = 256;

/// Rebuilds `projection` from the log (after `archive`'s segments, if given) and switches reads
/// to it. See the module docs for the steps.
pub async fn replay(
    settings: &Settings,
    log: Arc<dyn EventLog>,
    projection: &str,
    from_start: bool,
    archive: Option<&dyn ObjectStore>,
    progress: bool,
) -> anyhow::Result<ReplayReport> {
    if !PROJECTIONS.contains(&projection) {
        bail!(
            "unknown projection {projection:?}: the projections are {}",
            PROJECTIONS.join(", ")
        );
    }
    let uri = settings.views_uri();
    let ViewsUri::Sqlite(path) = &uri else {
        bail!(
            "the read store is {uri}: replay switches SQLite table generations. On ScyllaDB, \
             migrate a new keyspace, run a projector group into it with \
             CONVEYOR__VIEWS__URI and CONVEYOR__PROJECTOR__GROUP set to new values, and \
             switch the query edge's CONVEYOR__VIEWS__URI once its lag is 0 (docs/operations.md)"
        );
    };
    let path = path.clone();
    let started = Instant::now();
    let topic = settings.topic().to_owned();
    let building = {
        let path = path.clone();
        tokio::task::spawn_blocking(move || begin_generation(&path, from_start)).await??
    };
    let generation = building.generation;
    let group_of = |g: u32| format!("{}-replay-g{g}", settings.projector.group);
    let group = group_of(generation);
    if let Some(abandoned) = building.abandoned {
        log.delete_group(&topic, &group_of(abandoned)).await?;
    }
    let store: Arc<dyn ReadStore> = Arc::new(SqliteReadStore::open_generation(&path, generation)?);
    let style =
        ProgressStyle::with_template("{msg:>10} {bar:40} {pos}/{len} events {per_sec} eta {eta}")
            .expect("valid template");
    let bar = if progress {
        ProgressBar::new(0)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(style);

    let archived_events = match archive {
        Some(objects) => {
            bar.set_message("archive");
            crate::archive::replay_into(
                objects,
                &topic,
                &*store,
                settings.views.max_version_ahead_secs,
                &bar,
            )
            .await?
        }
        None => 0,
    };

    bar.set_message("log");
    bar.reset();
    let mut config = Projector::consumer_config(settings);
    config.group = group.clone();
    let stop = CancellationToken::new();
    let consumer = tokio::spawn(conveyor_runtime::consumer::run(
        log.clone(),
        config,
        Arc::new(Projector::new(store, Changes::new(), settings)),
        stop.clone(),
    ));
    let result = async {
        loop {
            let target = ends(&*log, &topic, &group).await?;
            let now = reach(&*log, &topic, &group, &target, &bar, &consumer).await?;
            let behind: u64 = now.values().map(|(c, e)| e.saturating_sub(*c)).sum();
            if behind <= SWITCH_WITHIN {
                break;
            }
        }
        let replaced = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || switch_generation(&path, generation)).await??
        };
        // Whatever the live projector wrote to the old generation came before the switch, so
        // it is below the ends as they are now.
        let target = ends(&*log, &topic, &group).await?;
        let done = reach(&*log, &topic, &group, &target, &bar, &consumer).await?;
        anyhow::Ok((replaced, done.values().map(|(c, _)| c).sum::<u64>()))
    }
    .await;
    stop.cancel();
    consumer.await.context("replay consumer panicked")??;
    let (replaced, log_events) = result?;
    bar.finish_and_clear();
    // Reads that looked the old generation up just before the switch retry on the new one if
    // its tables vanish under them; a moment's grace makes even that rare.
    tokio::time::sleep(Duration::from_millis(500)).await;
    tokio::task::spawn_blocking(move || drop_generation(&path, replaced)).await??;
    if let Err(e) = log.delete_group(&topic, &group).await {
        tracing::warn!(group, error = %e, "failed to delete the finished replay's group");
    }
    Ok(ReplayReport {
        generation,
        replaced,
        archived_events,
        log_events,
        elapsed: started.elapsed(),
    })
}
