//! The embedded read store on SQLite: one `media` table (`media_by_id`), a partial index
//! serving `media_by_owner`, and an `owner_stats` table kept in the same transaction as the
//! rows it counts.
//!
//! `apply` loads each affected row, folds the events in with [`MediaState::apply`], and writes
//! the row back, all in one transaction per call; a projector calls it once per batch.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use conveyor_schemas::{Envelope, MediaProcessed, MediaRow, OwnerStats, TimelinePage};
use rusqlite::{Connection, OptionalExtension, params};
use uuid::Uuid;

use super::{
    DescribeGroup, MediaState, ProcessGroup, ProcessOutcome, ReadStore, UploadGroup, ViewError,
};
use crate::sqlite::{PoolError, ReaderPool, open_connection};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS media (
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
    private INTEGER
) WITHOUT ROWID;
-- media_by_owner: live items, newest first.
CREATE INDEX IF NOT EXISTS media_by_owner ON media (owner, upload_v DESC, id DESC)
    WHERE upload_v IS NOT NULL AND deleted_v IS NULL;
CREATE TABLE IF NOT EXISTS owner_stats (
    owner TEXT PRIMARY KEY,
    media_count INTEGER NOT NULL,
    bytes INTEGER NOT NULL
) WITHOUT ROWID;
";

fn storage(e: impl std::fmt::Display) -> ViewError {
    ViewError::Storage(e.to_string())
}

impl From<PoolError> for ViewError {
    fn from(e: PoolError) -> Self {
        ViewError::Storage(e.0)
    }
}

pub struct SqliteReadStore {
    writer: Arc<Mutex<Connection>>,
    readers: Arc<ReaderPool>,
}

impl SqliteReadStore {
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
        conn.execute_batch(SCHEMA).map_err(storage)?;
        // Stores created before `private` existed get the column (NULL reads as public).
        let has_private: bool = conn
            .query_row(
                "SELECT count(*) FROM pragma_table_info('media') WHERE name = 'private'",
                [],
                |r| r.get(0),
            )
            .map_err(storage)?;
        if !has_private {
            conn.execute_batch("ALTER TABLE media ADD COLUMN private INTEGER")
                .map_err(storage)?;
        }
        Ok(SqliteReadStore {
            writer: Arc::new(Mutex::new(conn)),
            readers: Arc::new(ReaderPool::new(path)),
        })
    }
}

const COLUMNS: &str = "id, upload_v, owner, content_type, bytes, sha256, original_key, upload_title, \
     describe_v, title, description, tags, process_v, processed, failure_reason, deleted_v, private";

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
        }),
    };
    let process = match r.get::<_, Option<i64>>(12)? {
        None => None,
        Some(v) => {
            let processed: Option<String> = r.get(13)?;
            let outcome = match processed {
                Some(json) => ProcessOutcome::Processed(
                    serde_json::from_str::<MediaProcessed>(&json).map_err(json_err)?,
                ),
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

fn load(conn: &Connection, id: Uuid) -> rusqlite::Result<Option<MediaState>> {
    conn.prepare_cached(&format!("SELECT {COLUMNS} FROM media WHERE id = ?1"))?
        .query_row([&id.as_bytes()[..]], state_from_row)
        .optional()
}

fn save(conn: &Connection, s: &MediaState) -> rusqlite::Result<()> {
    let u = s.upload.as_ref();
    let d = s.describe.as_ref();
    let p = s.process.as_ref();
    let tags = d
        .map(|d| serde_json::to_string(&d.tags))
        .transpose()
        .map_err(json_err)?;
    let (processed, failure) = match p.map(|p| &p.outcome) {
        Some(ProcessOutcome::Processed(m)) => {
            (Some(serde_json::to_string(m).map_err(json_err)?), None)
        }
        Some(ProcessOutcome::Failed(reason)) => (None, Some(reason.as_str())),
        None => (None, None),
    };
    conn.prepare_cached(&format!(
        "INSERT OR REPLACE INTO media ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)"
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
    ])?;
    Ok(())
}

fn add_stats(conn: &Connection, owner: &str, count: i64, bytes: i64) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO owner_stats (owner, media_count, bytes) VALUES (?1, ?2, ?3)
         ON CONFLICT (owner) DO UPDATE SET media_count = media_count + excluded.media_count,
                                           bytes = bytes + excluded.bytes",
    )?
    .execute(params![owner, count, bytes])?;
    Ok(())
}

/// One item as a batch folds it: its state, and its stats contribution before the batch.
struct Touched {
    state: MediaState,
    before: Option<(String, u64)>,
    changed: bool,
}

fn apply_all(conn: &mut Connection, events: &[Envelope]) -> rusqlite::Result<()> {
    // IMMEDIATE: take the write lock up front. Two projector processes sharing the file would
    // otherwise both read, then deadlock upgrading to write (SQLITE_BUSY without waiting).
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    // Fold the whole batch in memory first, so an item touched by many events in one batch is
    // read and written once.
    let mut touched: HashMap<Uuid, Touched> = HashMap::new();
    for event in events {
        let id = event.aggregate_id;
        let entry = match touched.entry(id) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let state = load(&tx, id)?.unwrap_or_else(|| MediaState::new(id));
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
        save(&tx, state)?;
        let after = state.counted().map(|(o, b)| (o.to_owned(), b));
        if *before != after {
            if let Some((owner, bytes)) = before {
                add_stats(&tx, owner, -1, -(*bytes as i64))?;
            }
            if let Some((owner, bytes)) = &after {
                add_stats(&tx, owner, 1, *bytes as i64)?;
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
        let writer = self.writer.clone();
        let events = events.to_vec();
        tokio::task::spawn_blocking(move || {
            let mut conn = writer.lock().expect("read store writer lock");
            apply_all(&mut conn, &events).map_err(storage)
        })
        .await
        .map_err(storage)?
    }

    async fn media(&self, id: Uuid) -> Result<Option<MediaRow>, ViewError> {
        self.readers
            .with(move |conn| Ok(load(conn, id).map_err(storage)?.and_then(|s| s.to_row())))
            .await
    }

    async fn owner_timeline(
        &self,
        owner: &str,
        after: Option<(i64, Uuid)>,
        limit: usize,
    ) -> Result<TimelinePage, ViewError> {
        let owner = owner.to_owned();
        self.readers
            .with(move |conn| {
                // Ask for one more than the page, to know whether there is a next page.
                let (v, id) = after.unwrap_or((i64::MAX, Uuid::max()));
                let mut stmt = conn
                    .prepare_cached(&format!(
                        "SELECT {COLUMNS} FROM media
                         WHERE owner = ?1 AND upload_v IS NOT NULL AND deleted_v IS NULL
                           AND (upload_v, id) < (?2, ?3)
                         ORDER BY upload_v DESC, id DESC LIMIT ?4"
                    ))
                    .map_err(storage)?;
                let rows = stmt
                    .query_map(
                        params![owner, v, &id.as_bytes()[..], (limit + 1) as i64],
                        state_from_row,
                    )
                    .map_err(storage)?;
                let mut items: Vec<MediaRow> = Vec::with_capacity(limit + 1);
                for row in rows {
                    if let Some(item) = row.map_err(storage)?.to_row() {
                        items.push(item);
                    }
                }
                let next = if items.len() > limit {
                    items.truncate(limit);
                    items.last().map(|m| (m.created_at, m.id))
                } else {
                    None
                };
                Ok(TimelinePage { items, next })
            })
            .await
    }

    async fn owner_stats(&self, owner: &str) -> Result<OwnerStats, ViewError> {
        let owner = owner.to_owned();
        self.readers
            .with(move |conn| {
                let stats = conn
                    .prepare_cached("SELECT media_count, bytes FROM owner_stats WHERE owner = ?1")
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
}
