//! Online backups of the embedded mode, and restores that check what they restore.
//!
//! A backup store (a directory or an S3 prefix) holds:
//! - `objects/<key>`: the media, shared by every backup. Objects are immutable (originals are
//!   content-addressed, variants are named by their original's sha256), so each backup copies
//!   only the ones the store lacks.
//! - `backups/<id>/log.db` and `backups/<id>/views.db`: SQLite online-backup snapshots.
//! - `backups/<id>/manifest.json`, written last: a backup without one is incomplete and is
//!   never restored. It records the sha256 and size of every file and object, and what the
//!   databases hold (records per partition, group offsets, live media, stats).
//!
//! Consistency: the projector's offsets are read first, then the read models are snapshotted,
//! then the log. In the log's copy the projector's offsets are set back to those first values,
//! so a restored projector re-applies whatever the read-model snapshot may lack. Re-applying is
//! idempotent, so the restored read models converge on exactly the restored log. Objects are
//! copied last: every object an event in the snapshot names was stored before its event was
//! appended, so it is there to copy.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail, ensure};
use conveyor_config::{LogUri, Settings, ViewsUri};
use conveyor_storage::log::sqlite::{
    LogSummary, read_group_offsets, set_group_offsets_in_file, summarize_file,
};
use conveyor_storage::objects::{self, ObjectError, ObjectStore};
use conveyor_storage::views::sqlite::{ViewSummary, summarize_file as summarize_views};
use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

const MANIFEST: &str = "manifest.json";
const FORMAT: u32 = 1;

/// One stored file or object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// For a database or key file, its key in the backup store (`backups/<id>/<name>`); for a
    /// media object, its key in the media store (stored under `objects/` in the backup).
    pub key: String,
    /// Size in bytes.
    pub bytes: u64,
    /// SHA-256 of the bytes, 64 lowercase hex digits.
    pub sha256: String,
}

/// `backups/<id>/manifest.json`: what one backup holds, written last so that a backup
/// without one is incomplete. A restore checks every file and object against it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The manifest's layout version; this conveyor reads only 1.
    pub format: u32,
    /// The backup's id: its UTC start time, `YYYYMMDDTHHMMSSmmmZ`, so ids sort by age.
    pub id: String,
    /// When the manifest was written, RFC 3339 in UTC.
    pub created_at: String,
    /// The version of the `conveyor` that took the backup (its crate version).
    pub conveyor_version: String,
    /// The databases (`log.db`, `views.db`) and dev keys (`dev-api-key`, …), by name.
    pub files: BTreeMap<String, Entry>,
    /// What the log's snapshot holds: every topic's partitions and every group's commits
    /// (when the read models are in SQLite, the projector's are the offsets read before they
    /// were snapshotted).
    pub log: LogSummary,
    /// `None` when the read models are not in SQLite (rebuild them with `ops replay`).
    pub views: Option<ViewSummary>,
    /// Keys relative to the media store; stored under `objects/`.
    pub objects: Vec<Entry>,
}

/// What a backup did.
#[derive(Debug)]
pub struct BackupReport {
    /// The manifest the backup wrote.
    pub manifest: Manifest,
    /// Objects this backup copied; those the backup store already had are not counted.
    pub objects_copied: u64,
    /// Bytes of the objects this backup copied.
    pub bytes_copied: u64,
}

/// The embedded log's file, or why there is none (`how` says what to do instead).
fn log_file(settings: &Settings, how: &str) -> anyhow::Result<PathBuf> {
    match settings.log_uri() {
        LogUri::Sqlite(path) => Ok(path),
        uri => bail!("the event log is {uri}, not embedded SQLite: {how}"),
    }
}

/// The embedded read store's file, if the read store is embedded.
fn views_file(settings: &Settings) -> Option<PathBuf> {
    match settings.views_uri() {
        ViewsUri::Sqlite(path) => Some(path),
        ViewsUri::Scylla(_) => None,
    }
}

fn backup_id() -> String {
    let now = time::OffsetDateTime::now_utc();
    format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}{:03}Z",
        now.year(),
        now.month() as u8,
        now.day(),
        now.hour(),
        now.minute(),
        now.second(),
        now.millisecond()
    )
}

/// Streams a local file into `store` under `key`, returning its size and sha256.
async fn put_file(store: &dyn ObjectStore, key: &str, path: &Path) -> anyhow::Result<Entry> {
    let file = tokio::fs::File::open(path)
        .await
        .with_context(|| format!("failed to read {}", path.display()))?;
    let body = tokio_util::io::ReaderStream::with_capacity(file, 1 << 20).boxed();
    let (bytes, sha256) = objects::put_hashed(store, key, body)
        .await
        .with_context(|| format!("failed to store {key}"))?;
    Ok(Entry {
        key: key.to_owned(),
        bytes,
        sha256,
    })
}

/// Copies `from_key` in `source` to `to_key` in `target`: its size and sha256.
async fn copy_hashed(
    source: &dyn ObjectStore,
    from_key: &str,
    target: &dyn ObjectStore,
    to_key: &str,
) -> anyhow::Result<(u64, String)> {
    objects::copy_hashed(source, from_key, target, to_key)
        .await
        .with_context(|| format!("failed to copy {from_key} to {to_key}"))
}

/// The ids of the complete backups in `store`, oldest first.
pub async fn list(store: &dyn ObjectStore) -> anyhow::Result<Vec<String>> {
    let mut ids: Vec<String> = store
        .list("backups/")
        .await
        .context("failed to list backups")?
        .into_iter()
        .filter_map(|m| {
            let rest = m.key.strip_prefix("backups/")?;
            let (id, file) = rest.split_once('/')?;
            (file == MANIFEST).then(|| id.to_owned())
        })
        .collect();
    ids.sort();
    Ok(ids)
}

/// The manifest of backup `id` in `store` (`backups/<id>/manifest.json`).
///
/// # Errors
/// When the backup has no manifest (it does not exist or is incomplete), the store cannot
/// be read, the manifest is not valid JSON of a [`Manifest`], or its format is not the one
/// this conveyor reads.
pub async fn read_manifest(store: &dyn ObjectStore, id: &str) -> anyhow::Result<Manifest> {
    let key = format!("backups/{id}/{MANIFEST}");
    let bytes = match store.get_bytes(&key).await {
        Err(ObjectError::NotFound) => bail!("no backup {id} (no {key})"),
        other => other.with_context(|| format!("failed to read {key}"))?,
    };
    let manifest: Manifest = serde_json::from_slice(&bytes)
        .with_context(|| format!("backup {id} is corrupt: {key} is not a valid manifest"))?;
    ensure!(
        manifest.format == FORMAT,
        "backup {id} has manifest format {}, this conveyor reads {FORMAT}",
        manifest.format
    );
    Ok(manifest)
}

/// Takes a consistent online backup of the embedded log, the read models (if in SQLite) and
/// every object, into `target`.
pub async fn backup(
    settings: &Settings,
    target: &dyn ObjectStore,
    concurrency: usize,
    progress: bool,
) -> anyhow::Result<BackupReport> {
    let log_path = log_file(
        settings,
        "on Kafka the log is kept by `conveyor archive` instead",
    )?;
    let views_path = views_file(settings);
    let objects =
        conveyor_storage::backends::open_objects(&settings.objects_uri(), &settings.objects)
            .await?;
    let id = backup_id();
    let scratch = tempfile::tempdir().context("failed to create a scratch dir")?;
    let topic = settings.topic().to_owned();
    let projector = settings.projector.group.clone();

    // 1. The projector's offsets, before the read models are copied.
    let projector_offsets = {
        let (path, group, topic) = (log_path.clone(), projector.clone(), topic.clone());
        tokio::task::spawn_blocking(move || read_group_offsets(&path, &group, &topic)).await??
    };

    // 2. The read models, then 3. the log, each one online-backup snapshot.
    let (log_copy, views_copy) = (
        scratch.path().join("log.db"),
        scratch.path().join("views.db"),
    );
    let (views_summary, log_summary) = {
        let (log_copy, views_copy, log_path) = (log_copy.clone(), views_copy.clone(), log_path);
        let views_path = views_path.clone();
        tokio::task::spawn_blocking(move || {
            let views = match &views_path {
                Some(path) => {
                    conveyor_storage::sqlite::snapshot(path, &views_copy)
                        .with_context(|| format!("failed to snapshot {}", path.display()))?;
                    Some(summarize_views(&views_copy)?)
                }
                None => None,
            };
            conveyor_storage::sqlite::snapshot(&log_path, &log_copy)
                .with_context(|| format!("failed to snapshot {}", log_path.display()))?;
            if views.is_some() {
                // No offsets (nothing committed yet) means: start from the beginning.
                set_group_offsets_in_file(&log_copy, &projector, &topic, &projector_offsets)?;
            }
            anyhow::Ok((views, summarize_file(&log_copy)?))
        })
        .await??
    };

    // 4. The objects, skipping those the backup store already has.
    let previous: BTreeMap<String, String> = match list(target).await?.last() {
        Some(last) => read_manifest(target, last)
            .await
            .map(|m| m.objects.into_iter().map(|e| (e.key, e.sha256)).collect())
            .unwrap_or_default(),
        None => BTreeMap::new(),
    };
    let sources: Vec<_> = objects
        .list("")
        .await
        .context("failed to list the media store")?
        .into_iter()
        .filter(|m| !m.key.starts_with("incoming/"))
        .collect();
    let bar = crate::progress_bar(progress, sources.len() as u64, "objects");
    let entries: Vec<(Entry, bool)> = futures::stream::iter(sources)
        .map(|object| {
            let (objects, bar, previous) = (&objects, bar.clone(), &previous);
            async move {
                let key = format!("objects/{}", object.key);
                let existing = target.head(&key).await?;
                let entry = if existing.is_some_and(|m| m.size == object.size) {
                    let sha256 = match previous.get(&object.key) {
                        Some(sha) => sha.clone(),
                        None => objects::sha256_of(target, &key).await?,
                    };
                    (
                        Entry {
                            key: object.key,
                            bytes: object.size,
                            sha256,
                        },
                        false,
                    )
                } else {
                    let (bytes, sha256) =
                        copy_hashed(&**objects, &object.key, target, &key).await?;
                    (
                        Entry {
                            key: object.key,
                            bytes,
                            sha256,
                        },
                        true,
                    )
                };
                bar.inc(1);
                anyhow::Ok(entry)
            }
        })
        .buffer_unordered(concurrency.max(1))
        .try_collect()
        .await?;
    bar.finish_and_clear();

    // 5. The database files, then the manifest, last.
    let mut files = BTreeMap::new();
    files.insert(
        "log.db".to_owned(),
        put_file(target, &format!("backups/{id}/log.db"), &log_copy).await?,
    );
    if views_summary.is_some() {
        files.insert(
            "views.db".to_owned(),
            put_file(target, &format!("backups/{id}/views.db"), &views_copy).await?,
        );
    }
    for name in crate::dev_keys::DEV_KEY_FILES {
        let path = settings.data_dir.join(name);
        if path.exists() {
            files.insert(
                name.to_owned(),
                put_file(target, &format!("backups/{id}/{name}"), &path).await?,
            );
        }
    }
    let objects_copied = entries.iter().filter(|(_, copied)| *copied).count() as u64;
    let bytes_copied = entries
        .iter()
        .filter(|(_, copied)| *copied)
        .map(|(e, _)| e.bytes)
        .sum();
    let mut objects: Vec<Entry> = entries.into_iter().map(|(e, _)| e).collect();
    objects.sort_by(|a, b| a.key.cmp(&b.key));
    let manifest = Manifest {
        format: FORMAT,
        id: id.clone(),
        created_at: time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default(),
        conveyor_version: env!("CARGO_PKG_VERSION").to_owned(),
        files,
        log: log_summary,
        views: views_summary,
        objects,
    };
    target
        .put_bytes(
            &format!("backups/{id}/{MANIFEST}"),
            serde_json::to_vec_pretty(&manifest)?.into(),
        )
        .await
        .context("failed to store the manifest")?;
    Ok(BackupReport {
        manifest,
        objects_copied,
        bytes_copied,
    })
}

/// What a restore did.
#[derive(Debug)]
pub struct RestoreReport {
    /// The manifest of the backup restored.
    pub manifest: Manifest,
    /// Objects copied into the media store: every one the manifest lists.
    pub objects: u64,
    /// Bytes of those objects.
    pub bytes: u64,
}

/// Downloads `backups/<id>/<name>` to `dest`, refusing it unless its sha256 and size are the
/// manifest's.
async fn fetch_verified(
    source: &dyn ObjectStore,
    manifest: &Manifest,
    name: &str,
    dest: &Path,
) -> anyhow::Result<()> {
    let entry = manifest
        .files
        .get(name)
        .with_context(|| format!("backup {} has no {name}", manifest.id))?;
    use tokio::io::AsyncWriteExt;
    let mut body = source
        .get(&entry.key, None)
        .await
        .with_context(|| format!("backup {} is missing {}", manifest.id, entry.key))?
        .body;
    let mut file = tokio::fs::File::create(dest)
        .await
        .with_context(|| format!("failed to write {}", dest.display()))?;
    let (mut hasher, mut bytes) = (Sha256::new(), 0u64);
    while let Some(chunk) = body.try_next().await? {
        hasher.update(&chunk);
        bytes += chunk.len() as u64;
        file.write_all(&chunk).await?;
    }
    file.sync_all().await?;
    let sha256 = hex::encode(hasher.finalize());
    ensure!(
        sha256 == entry.sha256 && bytes == entry.bytes,
        "backup {} is corrupt: {} has sha256 {sha256} and {bytes} bytes, the manifest says {} \
         and {}; nothing was restored",
        manifest.id,
        entry.key,
        entry.sha256,
        entry.bytes
    );
    Ok(())
}

/// Restores backup `id` (default: the newest complete one) from `source` into the data dir and
/// media store `settings` name, which must be empty. Every file and object is checked against
/// the manifest; on any mismatch the restore stops, removes what it wrote, and says what was
/// wrong.
pub async fn restore(
    settings: &Settings,
    source: &dyn ObjectStore,
    id: Option<&str>,
    concurrency: usize,
    progress: bool,
) -> anyhow::Result<RestoreReport> {
    let id = match id {
        Some(id) => id.to_owned(),
        None => list(source)
            .await?
            .pop()
            .context("no complete backup (a backups/<id>/manifest.json) in that store")?,
    };
    let manifest = read_manifest(source, &id).await?;
    let log_path = log_file(settings, "restore needs the embedded log")?;
    let views_path = manifest.views.as_ref().and(views_file(settings));
    let keys: Vec<(&str, PathBuf)> = crate::dev_keys::DEV_KEY_FILES
        .into_iter()
        .filter(|name| manifest.files.contains_key(*name))
        .map(|name| (name, settings.data_dir.join(name)))
        .collect();
    let targets = std::iter::once(&log_path)
        .chain(&views_path)
        .chain(keys.iter().map(|(_, path)| path));
    for path in targets {
        ensure!(
            !path.exists(),
            "{} already exists: restore only into an empty data dir",
            path.display()
        );
    }
    let objects =
        conveyor_storage::backends::open_objects(&settings.objects_uri(), &settings.objects)
            .await?;
    ensure!(
        objects.list("").await?.is_empty(),
        "the media store {} is not empty: restore only into an empty one",
        settings.objects_uri()
    );
    if let Some(parent) = log_path.parent() {
        tokio::fs::create_dir_all(parent).await?;
    }

    // Databases to temporary names first; they take their real names only at the very end.
    let staged_log = log_path.with_extension("db.restoring");
    let staged_views = views_path
        .as_ref()
        .map(|p| p.with_extension("db.restoring"));
    let manifest = &manifest;
    let result = async {
        fetch_verified(source, manifest, "log.db", &staged_log).await?;
        let summary = summarize_file(&staged_log)?;
        ensure!(
            summary == manifest.log,
            "backup {id} is inconsistent: log.db holds {summary:?}, the manifest says {:?}",
            manifest.log
        );
        if staged_views.is_none() {
            // The read models are not restored here (they live elsewhere, or the backup has
            // none): the projector rebuilds them from the start of the log.
            set_group_offsets_in_file(
                &staged_log,
                &settings.projector.group,
                settings.topic(),
                &[],
            )?;
        }
        if let (Some(staged), Some(expected)) = (&staged_views, &manifest.views) {
            fetch_verified(source, manifest, "views.db", staged).await?;
            let summary = summarize_views(staged)?;
            ensure!(
                summary == *expected,
                "backup {id} is inconsistent: views.db holds {summary:?}, the manifest says \
                 {expected:?}"
            );
        }
        let bar = crate::progress_bar(progress, manifest.objects.len() as u64, "objects");
        futures::stream::iter(&manifest.objects)
            .map(|entry| {
                let (objects, bar) = (&objects, bar.clone());
                async move {
                    let (bytes, sha256) = copy_hashed(
                        source,
                        &format!("objects/{}", entry.key),
                        &**objects,
                        &entry.key,
                    )
                    .await?;
                    ensure!(
                        sha256 == entry.sha256 && bytes == entry.bytes,
                        "backup {} is corrupt: objects/{} has sha256 {sha256} and {bytes} \
                         bytes, the manifest says {} and {}; nothing was restored",
                        manifest.id,
                        entry.key,
                        entry.sha256,
                        entry.bytes
                    );
                    bar.inc(1);
                    anyhow::Ok(())
                }
            })
            .buffer_unordered(concurrency.max(1))
            .try_collect::<()>()
            .await?;
        bar.finish_and_clear();
        for (name, path) in &keys {
            fetch_verified(source, manifest, name, path).await?;
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                tokio::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).await?;
            }
        }
        anyhow::Ok(())
    }
    .await;
    if let Err(e) = result {
        for (_, path) in &keys {
            let _ = tokio::fs::remove_file(path).await;
        }
        let _ = tokio::fs::remove_file(&staged_log).await;
        if let Some(staged) = &staged_views {
            let _ = tokio::fs::remove_file(staged).await;
        }
        for entry in &manifest.objects {
            let _ = objects.delete(&entry.key).await;
        }
        return Err(e);
    }
    if let (Some(staged), Some(path)) = (&staged_views, &views_path) {
        tokio::fs::rename(staged, path).await?;
    }
    // The log last: a data dir without log.db is still empty.
    tokio::fs::rename(&staged_log, &log_path).await?;
    Ok(RestoreReport {
        objects: manifest.objects.len() as u64,
        bytes: manifest.objects.iter().map(|e| e.bytes).sum(),
        manifest: manifest.clone(),
    })
}

/// Keeps the newest `keep` backups: removes older ones (manifest first, so a half-removed
/// backup is never mistaken for a complete one), then every object no kept manifest names.
/// Returns the removed backup ids.
pub async fn prune(store: &dyn ObjectStore, keep: usize) -> anyhow::Result<Vec<String>> {
    let ids = list(store).await?;
    if ids.len() <= keep {
        return Ok(Vec::new());
    }
    let (old, kept) = ids.split_at(ids.len() - keep);
    for id in old {
        store.delete(&format!("backups/{id}/{MANIFEST}")).await?;
        for file in store.list(&format!("backups/{id}/")).await? {
            store.delete(&file.key).await?;
        }
    }
    let mut referenced = HashSet::new();
    for id in kept {
        for entry in read_manifest(store, id).await?.objects {
            referenced.insert(format!("objects/{}", entry.key));
        }
    }
    for object in store.list("objects/").await? {
        if !referenced.contains(&object.key) {
            store.delete(&object.key).await?;
        }
    }
    Ok(old.to_vec())
}
