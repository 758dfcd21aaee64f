//! The embedded read store on SQLite: one `media` table (`media_by_id`), a partial index
//! serving `media_by_owner`, and an `owner_stats` table kept in the same transaction as the
//! rows it counts.
//!
//! `apply` loads each affected row, folds the events in with [`MediaState::apply`], and writes
//! the row back, all in one transaction per call; a projector calls it once per batch.
//!
//! **Generations.** The tables exist in numbered generations (0 is `media` and `owner_stats`;
//! `n` is `media_gn` and `owner_stats_gn`), and the `projections` table names the current one.
//! `conveyor ops replay` builds generation `n + 1` from the log beside the live one, then
//! switches `current` in one transaction and drops the old tables. Readers and the live
//! projector look the current generation up in the same transaction as their query or write,
//! so each sees one generation whole, and queries keep answering throughout.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use conveyor_schemas::{Envelope, MediaRow, OwnerStats, TimelinePage};
use rusqlite::{Connection, OptionalExtension, params};
use uuid::Uuid;

use super::{
    DescribeGroup, MediaState, ProcessGroup, ProcessOutcome, ReadStore, UploadGroup, ViewError,
};
use crate::sqlite::{PoolError, ReaderPool, SqliteFailure, open_connection};

/// The projection these tables hold, as `ops replay --projection` names it.
pub const PROJECTION: &str = "media";

const META: &str = "
CREATE TABLE IF NOT EXISTS projections (
    name TEXT PRIMARY KEY,
    current INTEGER NOT NULL,
    -- a generation `ops replay` is building, if any
    building INTEGER
) WITHOUT ROWID;
INSERT OR IGNORE INTO projections (name, current) VALUES ('media', 0);
";

/// The tables of one generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tables {
    /// The generation's number; 0 is the first.
    pub generation: u32,
    /// Its `media` table: `media` for generation 0, `media_g<n>` after.
    pub media: String,
    /// Its `owner_stats` table: `owner_stats` for generation 0, `owner_stats_g<n>` after.
    pub stats: String,
    index: String,
}

impl Tables {
    /// The table names of `generation`. Names only: nothing is created.
    pub fn of(generation: u32) -> Tables {
        let suffix = match generation {
            0 => String::new(),
            g => format!("_g{g}"),
        };
        Tables {
            generation,
            media: format!("media{suffix}"),
            stats: format!("owner_stats{suffix}"),
            index: format!("media_by_owner{suffix}"),
        }
    }

    fn schema(&self) -> String {
        SCHEMA
            .replace("{media}", &self.media)
            .replace("{stats}", &self.stats)
            .replace("{index}", &self.index)
    }
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS {media} (
    id BLOB PRIMARY KEY,
    -- upload group
    upload_v INTEGER,
    owner TEXT,
    content_type TEXT,
    bytes INTEGER,
    sha256 TEXT,
    original_key TEXT,
    upload_title TEXT,
    -- description group
    describe_v INTEGER,
    title TEXT,
    description TEXT,
    tags TEXT,
    -- processing group: `processed` (JSON of MediaProcessed) or `failure_reason`
    process_v INTEGER,
    processed TEXT,
    failure_reason TEXT,
    -- tombstone
    deleted_v INTEGER,
    -- upload group, added later: 1 for private media
    private INTEGER,
    -- description group, added later: event ids of the last descriptions applied (JSON)
    describe_applied TEXT
) WITHOUT ROWID;
-- media_by_owner: live items, newest first.
CREATE INDEX IF NOT EXISTS {index} ON {media} (owner, upload_v DESC, id DESC)
    WHERE upload_v IS NOT NULL AND deleted_v IS NULL;
CREATE TABLE IF NOT EXISTS {stats} (
    owner TEXT PRIMARY KEY,
    media_count INTEGER NOT NULL,
    bytes INTEGER NOT NULL
) WITHOUT ROWID;
";

/// SQLite and file errors, by their kind: the one place this backend maps them.
fn storage(e: impl Into<SqliteFailure>) -> ViewError {
    let SqliteFailure(kind, message) = e.into();
    ViewError::Storage { kind, message }
}

impl From<PoolError> for ViewError {
    fn from(e: PoolError) -> Self {
        ViewError::transient(e.0)
    }
}

/// The SQLite read store. Writes go through one connection, one transaction per `apply`;
/// reads use pooled connections beside it (WAL). It follows the current generation, or
/// keeps to one ([`SqliteReadStore::open_generation`]).
pub struct SqliteReadStore {
    writer: Arc<Mutex<Connection>>,
    readers: Arc<ReaderPool>,
    /// `Some` for a store writing one generation (a replay building it); `None` follows the
    /// current generation.
    pinned: Option<u32>,
}

/// A read against one generation's tables.
type ReadFn<T> = dyn Fn(&Connection, &Tables) -> Result<T, ViewError> + Send + Sync;

/// The generation reads and writes go to, unless pinned.
fn current_generation(conn: &Connection) -> rusqlite::Result<u32> {
    conn.prepare_cached("SELECT current FROM projections WHERE name = ?1")?
        .query_row([PROJECTION], |r| r.get(0))
}

impl SqliteReadStore {
    /// Opens (creating if needed) the read store at `path`, with the current generation's
    /// tables, following the current generation.
    ///
    /// # Errors
    /// [`ViewError::Storage`] when the directory, the file or its tables cannot be created or
    /// opened, with the kind of the file or SQLite error ([`sqlite_kind`]): transient for a
    /// busy, locked, read-only or full database, for an operator or a moment to fix.
    ///
    /// [`sqlite_kind`]: crate::error::sqlite_kind
    pub fn open(path: impl Into<PathBuf>) -> Result<Self, ViewError> {
        let path = path.into();
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(storage)?;
        }
        let conn = open_connection(&path).map_err(storage)?;
        // Read models can be rebuilt from the log, and the projector commits its offsets only
        // after this write returns; NORMAL survives a process crash, which is what that needs.
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(storage)?;
        conn.execute_batch(META).map_err(storage)?;
        let current = current_generation(&conn).map_err(storage)?;
        create_tables(&conn, &Tables::of(current)).map_err(storage)?;
        Ok(SqliteReadStore {
            writer: Arc::new(Mutex::new(conn)),
            readers: Arc::new(ReaderPool::new(path)),
            pinned: None,
        })
    }

    /// A store that reads and writes generation `generation` only, creating its tables: what
    /// a replay builds into while the current generation keeps serving.
    pub fn open_generation(path: impl Into<PathBuf>, generation: u32) -> Result<Self, ViewError> {
        let mut store = Self::open(path)?;
        {
            let conn = store.writer.lock().expect("read store writer lock");
            create_tables(&conn, &Tables::of(generation)).map_err(storage)?;
        }
        store.pinned = Some(generation);
        Ok(store)
    }

    /// Runs a read on the generation that is current when it starts. A switch can drop that
    /// generation between the lookup and the query; the read then runs once more on the new one.
    async fn read<T: Send + 'static>(
        &self,
        f: impl Fn(&Connection, &Tables) -> Result<T, ViewError> + Send + Sync + 'static,
    ) -> Result<T, ViewError> {
        let f = Arc::new(f);
        let pinned = self.pinned;
        let attempt = |f: Arc<ReadFn<T>>| {
            self.readers.with(move |conn| {
                let generation = match pinned {
                    Some(g) => g,
                    None => current_generation(conn).map_err(storage)?,
                };
                Ok::<_, ViewError>((generation, f(conn, &Tables::of(generation))))
            })
        };
        let (generation, result) = attempt(f.clone()).await?;
        if result.is_ok() || pinned.is_some() {
            return result;
        }
        let (now, again) = attempt(f).await?;
        if now != generation { again } else { result }
    }
}

fn create_tables(conn: &Connection, tables: &Tables) -> rusqlite::Result<()> {
    conn.execute_batch(&tables.schema())?;
    // Stores created before `private` existed get the column (NULL reads as public).
    let has_private: bool = conn.query_row(
        "SELECT count(*) FROM pragma_table_info(?1) WHERE name = 'private'",
        [&tables.media],
        |r| r.get(0),
    )?;
    if !has_private {
        conn.execute_batch(&format!(
            "ALTER TABLE {} ADD COLUMN private INTEGER",
            tables.media
        ))?;
    }
    let has_applied: bool = conn.query_row(
        "SELECT count(*) FROM pragma_table_info(?1) WHERE name = 'describe_applied'",
        [&tables.media],
        |r| r.get(0),
    )?;
    if !has_applied {
        conn.execute_batch(&format!(
            "ALTER TABLE {} ADD COLUMN describe_applied TEXT",
            tables.media
        ))?;
    }
    Ok(())
}

/// A generation for a replay to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Building {
    /// The generation to build, its tables created (write it with
    /// [`SqliteReadStore::open_generation`]).
    pub generation: u32,
    /// A half-built generation this one replaces (its tables are dropped already).
    pub abandoned: Option<u32>,
}

/// The generation a replay of this file should build: the one already being built (to resume
/// it), or a new one. `fresh` abandons a half-built generation and starts another.
pub fn begin_generation(path: &Path, fresh: bool) -> Result<Building, ViewError> {
    let mut conn = open_connection(path).map_err(storage)?;
    conn.execute_batch(META).map_err(storage)?;
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(storage)?;
    let (current, building): (u32, Option<u32>) = tx
        .query_row(
            "SELECT current, building FROM projections WHERE name = ?1",
            [PROJECTION],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .map_err(storage)?;
    let (generation, abandoned) = match building {
        Some(g) if !fresh => (g, None),
        abandoned => {
            if let Some(g) = abandoned {
                drop_tables(&tx, &Tables::of(g)).map_err(storage)?;
            }
            (current.max(abandoned.unwrap_or(0)) + 1, abandoned)
        }
    };
    create_tables(&tx, &Tables::of(generation)).map_err(storage)?;
    tx.execute(
        "UPDATE projections SET building = ?2 WHERE name = ?1",
        params![PROJECTION, generation],
    )
    .map_err(storage)?;
    tx.commit().map_err(storage)?;
    Ok(Building {
        generation,
        abandoned,
    })
}

/// Makes `generation` the one every reader and the live projector use, atomically, and returns
/// the generation it replaced.
pub fn switch_generation(path: &Path, generation: u32) -> Result<u32, ViewError> {
    let mut conn = open_connection(path).map_err(storage)?;
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(storage)?;
    let old = current_generation(&tx).map_err(storage)?;
    tx.execute(
        "UPDATE projections SET current = ?2, building = NULL WHERE name = ?1",
        params![PROJECTION, generation],
    )
    .map_err(storage)?;
    tx.commit().map_err(storage)?;
    Ok(old)
}

/// Drops a generation's tables. Never the current one.
pub fn drop_generation(path: &Path, generation: u32) -> Result<(), ViewError> {
    let mut conn = open_connection(path).map_err(storage)?;
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(storage)?;
    if current_generation(&tx).map_err(storage)? == generation {
        return Err(ViewError::permanent(format!(
            "generation {generation} is current; it cannot be dropped"
        )));
    }
    drop_tables(&tx, &Tables::of(generation)).map_err(storage)?;
    tx.commit().map_err(storage)
}

fn drop_tables(conn: &Connection, tables: &Tables) -> rusqlite::Result<()> {
    conn.execute_batch(&format!(
        "DROP TABLE IF EXISTS {}; DROP TABLE IF EXISTS {};",
        tables.media, tables.stats
    ))
}

/// What a read-model file holds, as a backup manifest records it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ViewSummary {
    /// The current generation, the one summarized.
    pub generation: u32,
    /// Rows in `media`, live or not.
    pub rows: u64,
    /// Live media, and the sums over `owner_stats`, which must agree.
    pub live: u64,
    /// Owners with at least one counted item in `owner_stats`.
    pub owners: u64,
    /// The sum of `owner_stats.media_count`: equal to `live` in a consistent file.
    pub stats_count: u64,
    /// The sum of `owner_stats.bytes`, in bytes.
    pub stats_bytes: u64,
}

/// Summarizes a read-model file no process is writing (a backup copy).
pub fn summarize_file(path: &Path) -> Result<ViewSummary, ViewError> {
    let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(storage)?;
    let t = Tables::of(current_generation(&conn).map_err(storage)?);
    let one = |sql: String| -> Result<u64, ViewError> {
        conn.query_row(&sql, [], |r| r.get::<_, i64>(0))
            .map(|n| n.max(0) as u64)
            .map_err(storage)
    };
    Ok(ViewSummary {
        generation: t.generation,
        rows: one(format!("SELECT count(*) FROM {}", t.media))?,
        live: one(format!(
            "SELECT count(*) FROM {} WHERE upload_v IS NOT NULL AND deleted_v IS NULL",
            t.media
        ))?,
        owners: one(format!(
            "SELECT count(*) FROM {} WHERE media_count > 0",
            t.stats
        ))?,
        stats_count: one(format!(
            "SELECT coalesce(sum(media_count), 0) FROM {}",
            t.stats
        ))?,
        stats_bytes: one(format!("SELECT coalesce(sum(bytes), 0) FROM {}", t.stats))?,
    })
}

const COLUMNS: &str = "id, upload_v, owner, content_type, bytes, sha256, original_key, upload_title, \
     describe_v, title, description, tags, process_v, processed, failure_reason, deleted_v, private, \
     describe_applied";

fn json_err(e: serde_json::Error) -> rusqlite::Error {
    rusqlite::Error::ToSqlConversionFailure(Box::new(e))
}

fn state_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<MediaState> {
    let id: Vec<u8> = r.get(0)?;
    let id =
        Uuid::from_slice(&id).map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
    let upload = match r.get::<_, Option<i64>>(1)? {
        None => None,
        Some(v) => Some(UploadGroup {
            version: v as u64,
            owner: r.get(2)?,
            content_type: r.get(3)?,
            bytes: r.get::<_, i64>(4)? as u64,
            sha256: r.get(5)?,
            original_key: r.get(6)?,
            title: r.get(7)?,
            private: r.get::<_, Option<bool>>(16)?.unwrap_or(false),
        }),
    };
    let describe = match r.get::<_, Option<i64>>(8)? {
        None => None,
        Some(v) => Some(DescribeGroup {
            version: v as u64,
            title: r.get(9)?,
            description: r.get(10)?,
            tags: serde_json::from_str(&r.get::<_, String>(11)?).map_err(json_err)?,
            applied: match r.get::<_, Option<String>>(17)? {
                Some(json) => serde_json::from_str(&json).map_err(json_err)?,
                None => Vec::new(),
            },
        }),
    };
    let process = match r.get::<_, Option<i64>>(12)? {
        None => None,
        Some(v) => {
            let processed: Option<String> = r.get(13)?;
            let outcome = match processed {
                Some(json) => ProcessOutcome::decode(&json).map_err(json_err)?,
                None => ProcessOutcome::Failed(r.get::<_, Option<String>>(14)?.unwrap_or_default()),
            };
            Some(ProcessGroup {
                version: v as u64,
                outcome,
            })
        }
    };
    Ok(MediaState {
        id,
        upload,
        describe,
        process,
        deleted: r.get::<_, Option<i64>>(15)?.map(|v| v as u64),
    })
}

fn load(conn: &Connection, t: &Tables, id: Uuid) -> rusqlite::Result<Option<MediaState>> {
    conn.prepare_cached(&format!("SELECT {COLUMNS} FROM {} WHERE id = ?1", t.media))?
        .query_row([&id.as_bytes()[..]], state_from_row)
        .optional()
}

fn save(conn: &Connection, t: &Tables, s: &MediaState) -> rusqlite::Result<()> {
    let u = s.upload.as_ref();
    let d = s.describe.as_ref();
    let p = s.process.as_ref();
    let tags = d
        .map(|d| serde_json::to_string(&d.tags))
        .transpose()
        .map_err(json_err)?;
    let applied = d
        .filter(|d| !d.applied.is_empty())
        .map(|d| serde_json::to_string(&d.applied))
        .transpose()
        .map_err(json_err)?;
    let (processed, failure) = match p.map(|p| &p.outcome) {
        Some(ProcessOutcome::Failed(reason)) => (None, Some(reason.as_str())),
        Some(outcome) => (Some(outcome.encode()), None),
        None => (None, None),
    };
    conn.prepare_cached(&format!(
        "INSERT OR REPLACE INTO {} ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18)",
        t.media
    ))?
    .execute(params![
        &s.id.as_bytes()[..],
        u.map(|u| u.version as i64),
        u.map(|u| &u.owner),
        u.map(|u| &u.content_type),
        u.map(|u| u.bytes as i64),
        u.map(|u| &u.sha256),
        u.map(|u| &u.original_key),
        u.and_then(|u| u.title.as_ref()),
        d.map(|d| d.version as i64),
        d.and_then(|d| d.title.as_ref()),
        d.and_then(|d| d.description.as_ref()),
        tags,
        p.map(|p| p.version as i64),
        processed,
        failure,
        s.deleted.map(|v| v as i64),
        u.map(|u| u.private),
        applied,
    ])?;
    Ok(())
}

fn add_stats(
    conn: &Connection,
    t: &Tables,
    owner: &str,
    count: i64,
    bytes: i64,
) -> rusqlite::Result<()> {
    conn.prepare_cached(&format!(
        "INSERT INTO {} (owner, media_count, bytes) VALUES (?1, ?2, ?3)
         ON CONFLICT (owner) DO UPDATE SET media_count = media_count + excluded.media_count,
                                           bytes = bytes + excluded.bytes",
        t.stats
    ))?
    .execute(params![owner, count, bytes])?;
    Ok(())
}

/// One item as a batch folds it: its state, and its stats contribution before the batch.
struct Touched {
    state: MediaState,
    before: Option<(String, u64)>,
    changed: bool,
}

fn apply_all(
    conn: &mut Connection,
    pinned: Option<u32>,
    events: &[Envelope],
) -> rusqlite::Result<()> {
    // IMMEDIATE: take the write lock up front. Two projector processes sharing the file would
    // otherwise both read, then deadlock upgrading to write (SQLITE_BUSY without waiting).
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    // Looked up under the write lock, so a switch is wholly before or after this batch.
    let t = &Tables::of(match pinned {
        Some(g) => g,
        None => current_generation(&tx)?,
    });
    // Fold the whole batch in memory first, so an item touched by many events in one batch is
    // read and written once.
    let mut touched: HashMap<Uuid, Touched> = HashMap::new();
    for event in events {
        let id = event.aggregate_id;
        let entry = match touched.entry(id) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let state = load(&tx, t, id)?.unwrap_or_else(|| MediaState::new(id));
                let before = state.counted().map(|(o, b)| (o.to_owned(), b));
                e.insert(Touched {
                    state,
                    before,
                    changed: false,
                })
            }
        };
        entry.changed |= entry.state.apply(event);
    }
    for Touched {
        state,
        before,
        changed,
    } in touched.values()
    {
        if !changed {
            continue;
        }
        save(&tx, t, state)?;
        let after = state.counted().map(|(o, b)| (o.to_owned(), b));
        if *before != after {
            if let Some((owner, bytes)) = before {
                add_stats(&tx, t, owner, -1, -(*bytes as i64))?;
            }
            if let Some((owner, bytes)) = &after {
                add_stats(&tx, t, owner, 1, *bytes as i64)?;
            }
        }
    }
    tx.commit()
}

#[async_trait]
impl ReadStore for SqliteReadStore {
    async fn apply(&self, events: &[Envelope]) -> Result<(), ViewError> {
        if events.is_empty() {
            return Ok(());
        }
        super::validate(events)?;
        let writer = self.writer.clone();
        let events = events.to_vec();
        let pinned = self.pinned;
        tokio::task::spawn_blocking(move || {
            let mut conn = writer.lock().expect("read store writer lock");
            apply_all(&mut conn, pinned, &events).map_err(storage)
        })
        .await
        .map_err(storage)?
    }

    async fn media(&self, id: Uuid) -> Result<Option<MediaRow>, ViewError> {
        self.read(move |conn, t| Ok(load(conn, t, id).map_err(storage)?.and_then(|s| s.to_row())))
            .await
    }

    async fn is_deleted(&self, id: Uuid) -> Result<bool, ViewError> {
        self.read(move |conn, t| {
            Ok(load(conn, t, id)
                .map_err(storage)?
                .is_some_and(|s| s.deleted.is_some()))
        })
        .await
    }

    async fn owner_timeline(
        &self,
        owner: &str,
        after: Option<(i64, Uuid)>,
        limit: usize,
    ) -> Result<TimelinePage, ViewError> {
        let owner = owner.to_owned();
        self.read(move |conn, t| {
            // Ask for one more than the page, to know whether there is a next page.
            let (v, id) = after.unwrap_or((i64::MAX, Uuid::max()));
            let mut stmt = conn
                .prepare_cached(&format!(
                    "SELECT {COLUMNS} FROM {}
                         WHERE owner = ?1 AND upload_v IS NOT NULL AND deleted_v IS NULL
                           AND (upload_v, id) < (?2, ?3)
                         ORDER BY upload_v DESC, id DESC LIMIT ?4",
                    t.media
                ))
                .map_err(storage)?;
            let rows = stmt
                .query_map(
                    params![&owner, v, &id.as_bytes()[..], (limit + 1) as i64],
                    state_from_row,
                )
                .map_err(storage)?;
            let mut items: Vec<MediaRow> = Vec::with_capacity(limit + 1);
            for row in rows {
                if let Some(item) = row.map_err(storage)?.to_row() {
                    items.push(item);
                }
            }
            Ok(super::page_of(items, limit))
        })
        .await
    }

    async fn owner_stats(&self, owner: &str) -> Result<OwnerStats, ViewError> {
        let owner = owner.to_owned();
        self.read(move |conn, t| {
            let stats = conn
                .prepare_cached(&format!(
                    "SELECT media_count, bytes FROM {} WHERE owner = ?1",
                    t.stats
                ))
                .and_then(|mut s| {
                    s.query_row([&owner], |r| {
                        Ok(OwnerStats {
                            media_count: r.get::<_, i64>(0)?.max(0) as u64,
                            bytes: r.get::<_, i64>(1)?.max(0) as u64,
                        })
                    })
                    .optional()
                })
                .map_err(storage)?;
            Ok(stats.unwrap_or_default())
        })
        .await
    }

    async fn ping(&self) -> Result<(), ViewError> {
        self.readers
            .with(|conn| conn.query_row("SELECT 1", [], |_| Ok(())).map_err(storage))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn conformance() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteReadStore::open(dir.path().join("views.db")).unwrap();
        super::super::conformance::run(&store).await;
    }

    #[tokio::test]
    async fn a_generation_builds_beside_the_current_one_and_switches_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("views.db");
        let live = SqliteReadStore::open(&path).unwrap();
        let id = Uuid::now_v7();
        let up = Envelope::new(
            id,
            1_000,
            "test",
            conveyor_schemas::Event::MediaUploaded(conveyor_schemas::MediaUploaded {
                owner: "alice".into(),
                original_key: "originals/x".into(),
                sha256: "x".into(),
                bytes: 5,
                content_type: "image/png".into(),
                title: None,
            }),
        );
        live.apply(std::slice::from_ref(&up)).await.unwrap();

        let next = begin_generation(&path, false).unwrap().generation;
        assert_eq!(next, 1);
        assert_eq!(
            begin_generation(&path, false).unwrap().generation,
            1,
            "a rerun resumes it"
        );
        let building = SqliteReadStore::open_generation(&path, next).unwrap();
        assert_eq!(building.media(id).await.unwrap(), None, "starts empty");
        assert!(
            live.media(id).await.unwrap().is_some(),
            "readers keep the old one"
        );
        building.apply(std::slice::from_ref(&up)).await.unwrap();

        assert_eq!(switch_generation(&path, next).unwrap(), 0);
        drop_generation(&path, 0).unwrap();
        // The live store follows the switch, for reads and writes alike.
        assert_eq!(live.owner_stats("alice").await.unwrap().media_count, 1);
        let other = Uuid::now_v7();
        let mut up2 = up.clone();
        up2.aggregate_id = other;
        live.apply(&[up2]).await.unwrap();
        assert!(building.media(other).await.unwrap().is_some());
        assert_eq!(summarize_file(&path).unwrap().generation, 1);
        assert!(drop_generation(&path, 1).is_err(), "the current one stays");
        // A fresh start abandons a half-built generation.
        assert_eq!(begin_generation(&path, false).unwrap().generation, 2);
        assert_eq!(
            begin_generation(&path, true).unwrap(),
            Building {
                generation: 3,
                abandoned: Some(2)
            }
        );
    }
}
