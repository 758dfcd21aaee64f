//! Objects moved between stores: `ops migrate-objects`.

use anyhow::Context;
use conveyor_storage::objects::{self, ObjectStore};

/// What a migration did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MigrationReport {
    /// Objects copied, each verified by its sha256.
    pub copied: u64,
    /// Objects left alone because the target already had one of the same size at the key.
    pub skipped: u64,
    /// Bytes of the copied objects (skipped ones are not counted).
    pub bytes: u64,
}

/// Copies every object under `prefix` from `source` to `target`, `concurrency` at a time.
/// Objects already in the target with the same size are skipped, so an interrupted migration
/// resumes where it stopped. Each copy is read back and its sha256 compared with the source's.
pub async fn migrate_objects(
    source: &dyn ObjectStore,
    target: &dyn ObjectStore,
    prefix: &str,
    concurrency: usize,
    progress: bool,
) -> anyhow::Result<MigrationReport> {
    use futures::{StreamExt, TryStreamExt};

    let objects = source
        .list(prefix)
        .await
        .context("failed to list the source")?;
    let bar = crate::progress_bar(progress, objects.len() as u64, "migrating objects");
    let results: Vec<(bool, u64)> = futures::stream::iter(objects)
        .map(|object| {
            let bar = bar.clone();
            async move {
                let existing = target.head(&object.key).await?;
                if existing.is_some_and(|m| m.size == object.size) {
                    bar.inc(1);
                    return anyhow::Ok((false, 0));
                }
                // Hash while streaming the copy, then hash what landed.
                let (_, sent) = objects::copy_hashed(source, &object.key, target, &object.key)
                    .await
                    .with_context(|| format!("failed to copy {}", object.key))?;
                let landed = objects::sha256_of(target, &object.key).await?;
                anyhow::ensure!(
                    landed == sent,
                    "{}: the copy's sha256 differs from the source's",
                    object.key
                );
                bar.inc(1);
                Ok((true, object.size))
            }
        })
        .buffer_unordered(concurrency.max(1))
        .try_collect()
        .await?;
    bar.finish_and_clear();
    let mut report = MigrationReport::default();
    for (copied, bytes) in results {
        if copied {
            report.copied += 1;
            report.bytes += bytes;
        } else {
            report.skipped += 1;
        }
    }
    Ok(report)
}
