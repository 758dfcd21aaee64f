//! The embedded object store: one file per key under a root directory.
//!
//! A put writes to `<root>/.tmp/<uuid>`, fsyncs it, renames it into place and fsyncs the
//! directory, so a crash leaves either the old object or the new one. Leftover temp files
//! from a crash are removed when the store opens, once untouched for an hour (other processes
//! sharing the directory may be writing theirs).

use std::io::SeekFrom;
use std::ops::Range;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio_util::io::ReaderStream;

use super::{
    ByteStream, GetObject, ObjectError, ObjectMeta, ObjectStore, resolve_range, validate_key,
};

/// The embedded object store: each object is the file `<root>/<key>`, written under
/// `<root>/.tmp/` and renamed into place. Several processes may share one root.
pub struct FsObjectStore {
    root: PathBuf,
}

impl FsObjectStore {
    /// Opens (creating if needed) a store rooted at `root`.
    pub fn open(root: impl Into<PathBuf>) -> std::io::Result<Self> {
        let root = root.into();
        std::fs::create_dir_all(root.join(".tmp"))?;
        // Leftovers of a crash. Other processes (roles, `ops backup`) may share this directory
        // and be writing right now, so only files untouched for an hour are removed: a live
        // write keeps its file's mtime fresh.
        let stale = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        for entry in std::fs::read_dir(root.join(".tmp"))? {
            let entry = entry?;
            let modified = entry.metadata().and_then(|m| m.modified());
            if modified.is_ok_and(|m| m < stale) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(FsObjectStore { root })
    }

    fn path(&self, key: &str) -> Result<PathBuf, ObjectError> {
        validate_key(key)?;
        Ok(self.root.join(key))
    }
}

async fn sync_dir(dir: &Path) -> std::io::Result<()> {
    let dir = dir.to_owned();
    tokio::task::spawn_blocking(move || std::fs::File::open(dir)?.sync_all())
        .await
        .map_err(std::io::Error::other)?
}

async fn place(tmp: &Path, target: &Path) -> std::io::Result<()> {
    let parent = target.parent().expect("object paths have a parent");
    tokio::fs::create_dir_all(parent).await?;
    tokio::fs::rename(tmp, target).await?;
    sync_dir(parent).await
}

impl FsObjectStore {
    /// A fresh path under `.tmp/`, where objects are written before they are placed.
    fn scratch(&self) -> PathBuf {
        self.root
            .join(".tmp")
            .join(uuid::Uuid::new_v4().to_string())
    }
}

#[async_trait]
impl ObjectStore for FsObjectStore {
    async fn put(&self, key: &str, mut body: ByteStream) -> Result<ObjectMeta, ObjectError> {
        let target = self.path(key)?;
        let tmp = self.scratch();
        let result = async {
            let file = tokio::fs::File::create(&tmp).await?;
            let mut writer = tokio::io::BufWriter::with_capacity(256 * 1024, file);
            let mut size = 0u64;
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(ObjectError::Body)?;
                size += chunk.len() as u64;
                writer.write_all(&chunk).await?;
            }
            writer.flush().await?;
            writer.into_inner().sync_all().await?;
            place(&tmp, &target).await?;
            Ok(ObjectMeta {
                key: key.to_owned(),
                size,
            })
        }
        .await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        result
    }

    async fn get(&self, key: &str, range: Option<Range<u64>>) -> Result<GetObject, ObjectError> {
        let path = self.path(key)?;
        let mut file = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ObjectError::NotFound);
            }
            Err(e) => return Err(e.into()),
        };
        let size = file.metadata().await?.len();
        let range = resolve_range(range, size)?;
        file.seek(SeekFrom::Start(range.start)).await?;
        let reader = file.take(range.end - range.start);
        let body = ReaderStream::with_capacity(reader, 64 * 1024).boxed();
        Ok(GetObject { size, range, body })
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>, ObjectError> {
        let path = self.path(key)?;
        match tokio::fs::metadata(&path).await {
            Ok(m) if m.is_file() => Ok(Some(ObjectMeta {
                key: key.to_owned(),
                size: m.len(),
            })),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    async fn delete(&self, key: &str) -> Result<(), ObjectError> {
        let path = self.path(key)?;
        match tokio::fs::remove_file(&path).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    async fn promote(&self, from: &str, to: &str) -> Result<(), ObjectError> {
        let (source, target) = (self.path(from)?, self.path(to)?);
        if tokio::fs::metadata(&source).await.is_err() {
            return Err(ObjectError::NotFound);
        }
        // rename(2) replaces the target atomically.
        match place(&source, &target).await {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(ObjectError::NotFound),
            other => Ok(other?),
        }
    }

    async fn put_if_absent(&self, key: &str, bytes: Bytes) -> Result<bool, ObjectError> {
        let target = self.path(key)?;
        let tmp = self.scratch();
        // Written whole and synced first, then linked into place: link(2) fails if the target
        // exists, so the claim is exclusive and never seen half written.
        let result = async {
            let mut file = tokio::fs::File::create(&tmp).await?;
            file.write_all(&bytes).await?;
            file.sync_all().await?;
            let parent = target.parent().expect("object paths have a parent");
            tokio::fs::create_dir_all(parent).await?;
            let created = match tokio::fs::hard_link(&tmp, &target).await {
                Ok(()) => true,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
                Err(e) => return Err(e),
            };
            if created {
                sync_dir(parent).await?;
            }
            Ok(created)
        }
        .await;
        let _ = tokio::fs::remove_file(&tmp).await;
        Ok(result?)
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, ObjectError> {
        let root = self.root.clone();
        let prefix = prefix.to_owned();
        tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            let mut stack = vec![root.clone()];
            while let Some(dir) = stack.pop() {
                let entries = match std::fs::read_dir(&dir) {
                    Ok(e) => e,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e.into()),
                };
                for entry in entries {
                    let entry = entry?;
                    let path = entry.path();
                    let rel = path.strip_prefix(&root).expect("walk stays under root");
                    let key = rel.to_string_lossy().replace('\\', "/");
                    if key == ".tmp" {
                        continue;
                    }
                    let kind = entry.file_type()?;
                    if kind.is_dir() {
                        // Descend only where the prefix can still match.
                        if prefix.starts_with(&format!("{key}/"))
                            || key.starts_with(&prefix)
                            || prefix.is_empty()
                        {
                            stack.push(path);
                        }
                    } else if kind.is_file() && key.starts_with(&prefix) {
                        out.push(ObjectMeta {
                            key,
                            size: entry.metadata()?.len(),
                        });
                    }
                }
            }
            out.sort_by(|a, b| a.key.cmp(&b.key));
            Ok(out)
        })
        .await
        .map_err(|e| ObjectError::Io(std::io::Error::other(e)))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn conformance() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsObjectStore::open(dir.path()).unwrap();
        super::super::conformance::run(&store).await;
    }

    #[tokio::test]
    async fn crash_leftovers_are_cleaned_and_never_visible() {
        let dir = tempfile::tempdir().unwrap();
        FsObjectStore::open(dir.path()).unwrap();
        let stale = dir.path().join(".tmp/half-written");
        std::fs::write(&stale, b"partial").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&stale)
            .unwrap()
            .set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(7200))
            .unwrap();
        // Another process's write in progress: recent, so left alone.
        let live = dir.path().join(".tmp/being-written");
        std::fs::write(&live, b"partial").unwrap();
        let store = FsObjectStore::open(dir.path()).unwrap();
        assert!(!stale.exists(), "a crash's leftover is removed");
        assert!(live.exists(), "a live write is not");
        assert!(store.list("").await.unwrap().is_empty());
    }
}
