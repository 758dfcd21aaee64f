//! What the SQLite log and the SQLite read store share: connection setup and a pool of read
//! connections used off the async runtime.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use rusqlite::Connection;

/// Opens a connection in WAL mode with a generous busy timeout, since several processes may
/// share one file.
pub fn open_connection(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(10))?;
    conn.set_prepared_statement_cache_capacity(512);
    conn.pragma_update(None, "journal_mode", "WAL")?;
    Ok(conn)
}

/// Read connections, opened on demand and reused.
pub struct ReaderPool {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
}

impl ReaderPool {
    /// A pool for the database file at `path`. No connection is opened yet: each is opened
    /// on first need (with [`open_connection`]) and kept for reuse.
    pub fn new(path: PathBuf) -> Self {
        ReaderPool {
            path,
            idle: Mutex::new(Vec::new()),
        }
    }

    /// Runs `f` on a pooled connection in a blocking task. `E` must be able to describe a
    /// failure to open the connection or to run the task.
    pub async fn with<T, E>(
        self: &std::sync::Arc<Self>,
        f: impl FnOnce(&Connection) -> Result<T, E> + Send + 'static,
    ) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<PoolError> + Send + 'static,
    {
        let pool = self.clone();
        tokio::task::spawn_blocking(move || {
            let idle = pool.idle.lock().expect("reader pool lock").pop();
            let conn = match idle {
                Some(c) => c,
                None => open_connection(&pool.path).map_err(|e| PoolError(e.to_string()))?,
            };
            let result = f(&conn);
            pool.idle.lock().expect("reader pool lock").push(conn);
            result
        })
        .await
        .map_err(|e| E::from(PoolError(e.to_string())))?
    }
}

/// A read connection could not be opened, or its task died.
#[derive(Debug, thiserror::Error)]
#[error("sqlite reader: {0}")]
pub struct PoolError(pub String);

/// Copies the database at `src` into a new file `dst` with SQLite's online backup API, in one
/// step, so the copy is a single consistent snapshot even while other connections (and other
/// processes) write to `src`. The copy is a plain rollback-journal database: one file.
pub fn snapshot(src: &Path, dst: &Path) -> rusqlite::Result<()> {
    use rusqlite::backup::{Backup, StepResult};
    let source = Connection::open_with_flags(src, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    source.busy_timeout(Duration::from_secs(10))?;
    let mut target = Connection::open(dst)?;
    {
        let backup = Backup::new(&source, &mut target)?;
        loop {
            match backup.step(-1)? {
                StepResult::Done => break,
                StepResult::More => {}
                // Another connection holds a lock the step needs: wait, as SQLite suggests.
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
    target.pragma_update(None, "journal_mode", "DELETE")?;
    Ok(())
}

/// A SQLite or file failure with its kind, on its way into the log's or the read store's error.
pub struct SqliteFailure(pub crate::error::ErrorKind, pub String);

impl From<rusqlite::Error> for SqliteFailure {
    fn from(e: rusqlite::Error) -> Self {
        SqliteFailure(crate::error::sqlite_kind(&e), e.to_string())
    }
}

impl From<std::io::Error> for SqliteFailure {
    fn from(e: std::io::Error) -> Self {
        SqliteFailure(crate::error::io_kind(&e), e.to_string())
    }
}

impl From<serde_json::Error> for SqliteFailure {
    /// A stored document that does not parse: retrying reads the same bytes.
    fn from(e: serde_json::Error) -> Self {
        SqliteFailure(crate::error::ErrorKind::Permanent, e.to_string())
    }
}

impl From<tokio::task::JoinError> for SqliteFailure {
    /// A blocking task that panicked panics again on the same records (permanent); one that
    /// was cancelled is the process stopping (transient).
    fn from(e: tokio::task::JoinError) -> Self {
        let kind = if e.is_panic() {
            crate::error::ErrorKind::Permanent
        } else {
            crate::error::ErrorKind::Transient
        };
        SqliteFailure(kind, e.to_string())
    }
}
