//! `loadtest deletes`: what an owner's deletes cost their timeline and stats reads as the deletes
//! grow, beside references in the same store and run:
//! - the floor: an owner with the same live items and no deletes;
//! - on CQL, the layout before the owner ledger (migration 0001's `media_by_owner`, one partition
//!   per owner and month, and `owner_stats` read by `count(*)`), written with the same items and
//!   deletes and read with that release's queries.
//!
//! The heavy owner keeps 10 items uploaded before the deletes and 10 after, so the first page of
//! 20 lies on both sides of every deleted row: the worst place for them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use conveyor_config::{Settings, ViewsUri};
use conveyor_schemas::{Envelope, Event, MediaDeleted, MediaUploaded};
use conveyor_storage::views::ReadStore;
use conveyor_storage::views::scylla::{ScyllaReadStore, drop_keyspace, migrate};
use conveyor_storage::views::sqlite::SqliteReadStore;
use futures::{StreamExt, TryStreamExt};
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::statement::prepared::PreparedStatement;
use uuid::Uuid;

use crate::bench::{BenchViews, run_keyspace};
use crate::stats::median;

/// 2026-03-01T00:00:00Z in µs: every item of the benchmark is uploaded in March 2026, one
/// month bucket.
const MARCH: u64 = 1_772_323_200_000_000;
/// The kept items uploaded after the deleted ones: 20 days into the month.
const LATER: u64 = MARCH + 20 * 86_400_000_000;
/// Items each side of the deletes, and the page size read: 20 items, 10 each side.
const KEPT_EACH_SIDE: u64 = 10;
/// Events per `apply`, as a projector's batch.
const BATCH: usize = 1_000;
/// Statements in flight against the CQL node, for the old layout's writes.
const IN_FLIGHT: usize = 64;

/// The owners: the heavy deleter and the floor, in the store under test; and on CQL the same
/// two in the old layout.
const HEAVY: &str = "heavy";
const FLOOR: &str = "floor";

fn uploaded(id: Uuid, version: u64, owner: &str) -> Envelope {
    Envelope::new(
        id,
        version,
        "loadtest",
        Event::MediaUploaded(MediaUploaded {
            owner: owner.into(),
            original_key: format!("originals/{id}"),
            sha256: id.simple().to_string(),
            bytes: 1_000,
            content_type: "image/jpeg".into(),
            title: None,
        }),
    )
}

fn deleted(id: Uuid, version: u64) -> Envelope {
    Envelope::new(
        id,
        version,
        "loadtest",
        Event::MediaDeleted(MediaDeleted {
            deleted_by: HEAVY.into(),
        }),
    )
}

/// The kept items of one owner: 10 early in the month, 10 late, as `(id, created_at)`.
fn kept() -> Vec<(Uuid, u64)> {
    (0..KEPT_EACH_SIDE)
        .map(|i| (Uuid::now_v7(), MARCH + i))
        .chain((0..KEPT_EACH_SIDE).map(|i| (Uuid::now_v7(), LATER + i)))
        .collect()
}

/// Runs the benchmark on `views` for each cumulative delete count in `steps`, with `reads`
/// timed reads of each kind per step. Prints one line per step and reference.
pub async fn deletes(views: &BenchViews, steps: &[u64], reads: usize) -> anyhow::Result<()> {
    let dir = tempfile::tempdir().context("failed to create a temp dir")?;
    let mut settings = Settings::default();
    let (store, old): (Arc<dyn ReadStore>, Option<OldLayout>) = match views {
        BenchViews::Sqlite => {
            let store = SqliteReadStore::open(dir.path().join("views.db"))?;
            (Arc::new(store), None)
        }
        BenchViews::Scylla(cluster) => {
            let keyspace = run_keyspace(cluster, &Uuid::now_v7().simple().to_string())?;
            settings.views.uri = Some(ViewsUri::Scylla(keyspace.clone()));
            settings.views.replication_factor = 1;
            migrate(&keyspace, &settings.views)
                .await
                .context("failed to migrate the benchmark keyspace")?;
            let store = ScyllaReadStore::connect(&keyspace, &settings.views).await?;
            let old = OldLayout::connect(&keyspace).await?;
            (Arc::new(store), Some(old))
        }
    };
    let result = run(store.as_ref(), old.as_ref(), steps, reads).await;
    if let BenchViews::Scylla(_) = views
        && let Some(ViewsUri::Scylla(keyspace)) = &settings.views.uri
    {
        drop_keyspace(keyspace, &settings.views)
            .await
            .context("failed to drop the benchmark keyspace")?;
    }
    result
}

async fn run(
    store: &dyn ReadStore,
    old: Option<&OldLayout>,
    steps: &[u64],
    reads: usize,
) -> anyhow::Result<()> {
    let (heavy_kept, floor_kept) = (kept(), kept());
    let mut first: Vec<Envelope> = Vec::new();
    for (owner, items) in [(HEAVY, &heavy_kept), (FLOOR, &floor_kept)] {
        first.extend(items.iter().map(|(id, v)| uploaded(*id, *v, owner)));
        if let Some(old) = old {
            old.upload(owner, items).await?;
        }
    }
    store.apply(&first).await?;
    println!(
        "{:>8} {:<34} {:>12} {:>8} {:>12} {:>8}",
        "deletes", "layout", "page p50", "× floor", "stats p50", "× floor"
    );
    let mut done = 0u64;
    for &target in steps {
        let bulk: Vec<(Uuid, u64)> = (done..target)
            .map(|j| (Uuid::now_v7(), MARCH + 1_000 + j))
            .collect();
        let progress = indicatif::ProgressBar::new(bulk.len() as u64 * 2).with_style(
            indicatif::ProgressStyle::with_template("{msg:>10} [{bar:40}] {pos}/{len} {elapsed}")
                .expect("a valid template"),
        );
        progress.set_message(format!("to {target}"));
        let mut applying = Duration::ZERO;
        for chunk in bulk.chunks(BATCH) {
            let ups: Vec<Envelope> = chunk
                .iter()
                .map(|(id, v)| uploaded(*id, *v, HEAVY))
                .collect();
            let started = Instant::now();
            store.apply(&ups).await?;
            applying += started.elapsed();
            if let Some(old) = old {
                old.upload(HEAVY, chunk).await?;
            }
            progress.inc(chunk.len() as u64);
        }
        for chunk in bulk.chunks(BATCH) {
            let downs: Vec<Envelope> = chunk.iter().map(|(id, v)| deleted(*id, v + 1)).collect();
            let started = Instant::now();
            store.apply(&downs).await?;
            applying += started.elapsed();
            if let Some(old) = old {
                old.delete(HEAVY, chunk).await?;
            }
            progress.inc(chunk.len() as u64);
        }
        progress.finish_and_clear();
        if !bulk.is_empty() {
            eprintln!(
                "{target:>8} applied {} uploads and their deletes, one owner, batches of {BATCH}: \
                 {:.0} events/s",
                bulk.len(),
                (2 * bulk.len()) as f64 / applying.as_secs_f64()
            );
        }
        done = target;

        let page = (2 * KEPT_EACH_SIDE) as usize;
        let timed = timed_pair(reads, |owner| async move {
            let got = store.owner_timeline(owner, None, page).await?;
            anyhow::ensure!(
                got.items.len() == page,
                "{owner}: {} items",
                got.items.len()
            );
            Ok(())
        })
        .await;
        let stats = timed_pair(reads, |owner| async move {
            let got = store.owner_stats(owner).await?;
            anyhow::ensure!(got.media_count == page as u64, "{owner}: {got:?}");
            Ok(())
        })
        .await;
        print_line(done, "this release", &timed, &stats);
        if let Some(old) = old {
            let timed = timed_pair(reads, |owner| old.page(owner, page)).await;
            let stats = timed_pair(reads, |owner| old.stats(owner)).await;
            print_line(done, "before the ledger (migration 0001)", &timed, &stats);
        }
    }
    Ok(())
}

/// Medians of the heavy owner's and the floor's reads, or the first error of the heavy one.
type Pair = Result<(Duration, Duration), String>;

/// Times `reads` reads of the heavy owner and of the floor, interleaved, and returns the
/// medians (the heavy owner's first error instead, if its reads fail).
async fn timed_pair<F, Fut>(reads: usize, read: F) -> Pair
where
    F: Fn(&'static str) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let (mut heavy, mut floor) = (Vec::new(), Vec::new());
    for _ in 0..reads.max(1) {
        for (owner, samples) in [(HEAVY, &mut heavy), (FLOOR, &mut floor)] {
            let started = Instant::now();
            read(owner).await.map_err(|e| format!("{e:#}"))?;
            samples.push(started.elapsed());
        }
    }
    Ok((median(heavy), median(floor)))
}

fn print_line(deletes: u64, layout: &str, page: &Pair, stats: &Pair) {
    let cells = |pair: &Pair| match pair {
        Ok((heavy, floor)) => (
            format!("{:.2} ms", heavy.as_secs_f64() * 1e3),
            format!("{:.1}", heavy.as_secs_f64() / floor.as_secs_f64()),
        ),
        Err(e) => (
            "fails".to_owned(),
            e.split(':')
                .next_back()
                .unwrap_or(e)
                .trim()
                .chars()
                .take(28)
                .collect(),
        ),
    };
    let (page_ms, page_x) = cells(page);
    let (stats_ms, stats_x) = cells(stats);
    println!("{deletes:>8} {layout:<34} {page_ms:>12} {page_x:>8} {stats_ms:>12} {stats_x:>8}");
}

/// The tables of migration 0001 that the release before the owner ledger wrote and read, with
/// its statements: a month partition per owner for the timeline, and `count(*)` for the stats.
struct OldLayout {
    session: Session,
    insert_row: PreparedStatement,
    insert_stat: PreparedStatement,
    delete_row: PreparedStatement,
    delete_stat: PreparedStatement,
    page: PreparedStatement,
    stats: PreparedStatement,
}

/// The month bucket of every benchmark item: March 2026.
const BUCKET: i32 = 202603;

impl OldLayout {
    async fn connect(keyspace: &conveyor_config::ScyllaUri) -> anyhow::Result<Self> {
        let session = SessionBuilder::new()
            .known_nodes(&keyspace.hosts)
            .use_keyspace(&keyspace.keyspace, false)
            .build()
            .await
            .context("failed to connect to the CQL node")?;
        let prepare = |cql: &'static str| session.prepare(cql);
        let insert_row = prepare(
            "INSERT INTO media_by_owner (owner, bucket, created_at, id, upload_v, content_type, \
             bytes, sha256, original_key, private) VALUES (?, ?, ?, ?, ?, 'image/jpeg', 1000, \
             'ab', 'originals/ab', false)",
        )
        .await?;
        let insert_stat =
            prepare("INSERT INTO owner_stats (owner, bucket, id, bytes) VALUES (?, ?, ?, 1000)")
                .await?;
        let delete_row = prepare(
            "DELETE FROM media_by_owner WHERE owner = ? AND bucket = ? AND created_at = ? AND id = ?",
        )
        .await?;
        let delete_stat =
            prepare("DELETE FROM owner_stats WHERE owner = ? AND bucket = ? AND id = ?").await?;
        // The release before's timeline read of one month: every item column, 101 rows a page.
        let mut page = prepare(
            "SELECT id, upload_v, owner, content_type, bytes, sha256, original_key, upload_title, \
             private, describe_v, title, description, tags, process_v, processed, failure_reason, \
             described FROM media_by_owner WHERE owner = ? AND bucket = ?",
        )
        .await?;
        page.set_page_size(101);
        let stats =
            prepare("SELECT count(*), sum(bytes) FROM owner_stats WHERE owner = ? AND bucket = ?")
                .await?;
        Ok(OldLayout {
            session,
            insert_row,
            insert_stat,
            delete_row,
            delete_stat,
            page,
            stats,
        })
    }

    async fn upload(&self, owner: &str, items: &[(Uuid, u64)]) -> anyhow::Result<()> {
        futures::stream::iter(items)
            .map(|(id, v)| async move {
                let v = *v as i64;
                self.session
                    .execute_unpaged(&self.insert_row, (owner, BUCKET, v, id, v))
                    .await?;
                self.session
                    .execute_unpaged(&self.insert_stat, (owner, BUCKET, id))
                    .await?;
                anyhow::Ok(())
            })
            .buffer_unordered(IN_FLIGHT)
            .try_collect()
            .await
    }

    async fn delete(&self, owner: &str, items: &[(Uuid, u64)]) -> anyhow::Result<()> {
        futures::stream::iter(items)
            .map(|(id, v)| async move {
                self.session
                    .execute_unpaged(&self.delete_row, (owner, BUCKET, *v as i64, id))
                    .await?;
                self.session
                    .execute_unpaged(&self.delete_stat, (owner, BUCKET, id))
                    .await?;
                anyhow::Ok(())
            })
            .buffer_unordered(IN_FLIGHT)
            .try_collect()
            .await
    }

    /// The first page of `limit` items plus one, as the release before read it.
    async fn page(&self, owner: &'static str, limit: usize) -> anyhow::Result<()> {
        let mut rows = self
            .session
            .execute_iter(self.page.clone(), (owner, BUCKET))
            .await?
            .rows_stream::<scylla::value::Row>()?;
        let mut seen = 0;
        while seen <= limit && rows.try_next().await?.is_some() {
            seen += 1;
        }
        anyhow::ensure!(seen == limit, "{owner}: {seen} rows");
        Ok(())
    }

    async fn stats(&self, owner: &'static str) -> anyhow::Result<()> {
        let (count, _) = self
            .session
            .execute_unpaged(&self.stats, (owner, BUCKET))
            .await?
            .into_rows_result()?
            .single_row::<(i64, Option<i64>)>()?;
        anyhow::ensure!(count == 2 * KEPT_EACH_SIDE as i64, "{owner}: {count}");
        Ok(())
    }
}
