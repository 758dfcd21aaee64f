//! Operator commands (`conveyor ops …`), one file per concern: moving objects between stores
//! ([`objects`]), dead letters ([`dlq`]), lag and status ([`status`]), and API keys
//! ([`keys`]); backups, replay and the archive are the crate's own modules. Each works on every
//! backend: it goes through the storage traits.

use std::path::PathBuf;

use anyhow::Context;
use conveyor_config::{ObjectsUri, Settings, ViewsUri};
use conveyor_storage::backends::{open_log, open_objects};

use crate::cli::{DlqCommand, OpsCommand, RoleArgs, TopicsCommand};

pub mod dlq;
pub mod keys;
pub mod objects;
pub mod status;

pub use dlq::{REDRIVE_GROUP, dead_letters, redrive};
pub use objects::{MigrationReport, migrate_objects};
pub use status::{Access, GroupStatus, Health, Status, status};

use dlq::letter_json;
use status::{lag, print_status};

pub(crate) fn settings(config: &Option<PathBuf>, target: RoleArgs) -> anyhow::Result<Settings> {
    let mut settings = Settings::load(config.as_deref())?;
    if let Some(dir) = target.data_dir {
        settings.data_dir = dir;
    }
    Ok(settings)
}

/// Runs one `conveyor ops` command on the configuration `config` names (the global
/// `--config`, or defaults and the environment), printing its outcome to stdout.
///
/// # Errors
/// When the configuration does not load, a backend cannot be opened, or the command itself
/// fails (a missing data dir, a corrupt backup, an unknown projection…), with the cause in
/// the message.
pub async fn run(config: &Option<PathBuf>, command: OpsCommand) -> anyhow::Result<()> {
    match command {
        OpsCommand::Lag {
            target,
            group,
            json,
        } => {
            let settings = settings(config, target)?;
            lag(&settings, group, json).await
        }
        OpsCommand::Config => {
            let settings = Settings::load(config.as_deref())?;
            println!("{settings:#?}");
            Ok(())
        }
        OpsCommand::MigrateObjects {
            from,
            to,
            concurrency,
            prefix,
        } => {
            let settings = Settings::load(config.as_deref())?;
            let source = open_objects(&from, &settings.objects).await?;
            let target = open_objects(&to, &settings.objects).await?;
            let report = migrate_objects(&*source, &*target, &prefix, concurrency, true).await?;
            println!(
                "copied {} objects ({} bytes), {} already there, all verified by sha256",
                report.copied, report.bytes, report.skipped
            );
            Ok(())
        }
        OpsCommand::SweepUploads {
            target,
            install_lifecycle_days,
        } => {
            let settings = settings(config, target)?;
            require_data_dir(&settings)?;
            let uri = settings.objects_uri();
            let receipt_retention = settings.receipt_retention();
            if let Some(days) = install_lifecycle_days {
                let ObjectsUri::S3 { bucket, prefix } = &uri else {
                    anyhow::bail!("lifecycle rules are for S3 stores, not {uri}");
                };
                let store = conveyor_storage::objects::s3::S3ObjectStore::connect(
                    bucket,
                    prefix,
                    &settings.objects,
                )
                .await?;
                // Receipts live as long as the log keeps events; a log kept forever keeps them.
                let receipt_days = receipt_retention.map(|retention| {
                    retention.as_secs().div_ceil(86_400).min(i32::MAX as u64) as i32
                });
                store.install_upload_lifecycle(days, receipt_days).await?;
                println!("lifecycle rule installed: incoming/ expires after {days} days");
                if let Some(receipt_days) = receipt_days {
                    println!(
                        "lifecycle rule installed: event receipts (events/) expire after \
                         {receipt_days} days (log.retention_ms)"
                    );
                }
            }
            let objects = open_objects(&uri, &settings.objects).await?;
            let ttl = std::time::Duration::from_secs(settings.uploads.ttl_secs);
            let removed = conveyor_ingest::direct::sweep(&*objects, ttl).await?;
            println!("removed {removed} expired upload objects");
            match receipt_retention {
                Some(retention) if !uri.has_lifecycle_rules() => {
                    let removed =
                        conveyor_ingest::events::sweep_receipts(&*objects, retention).await?;
                    println!("removed {removed} event receipts older than log.retention_ms");
                }
                Some(_) => println!("event receipts on S3 expire by the lifecycle rule"),
                None => println!(
                    "event receipts are kept: the log keeps its events (embedded log, or \
                     log.retention_ms -1)"
                ),
            }
            Ok(())
        }
        OpsCommand::Replay {
            target,
            projection,
            from_start,
            from_archive,
        } => {
            let settings = settings(config, target)?;
            let log = open_log(&settings)?;
            let archive = match from_archive {
                true => Some(open_objects(&settings.archive_uri()?, &settings.objects).await?),
                false => None,
            };
            let report = crate::replay::replay(
                &settings,
                log,
                &projection,
                from_start,
                archive.as_deref(),
                true,
            )
            .await?;
            println!(
                "replayed {projection}: generation {} replaces {} ({} events from the archive, \
                 {} from the log, {:.1} s); reads switched atomically",
                report.generation,
                report.replaced,
                report.archived_events,
                report.log_events,
                report.elapsed.as_secs_f64()
            );
            Ok(())
        }
        OpsCommand::Keys(command) => keys::keys(config, command).await,
        OpsCommand::Status { target, json } => {
            let settings = settings(config, target)?;
            require_data_dir(&settings)?;
            let status = status(&settings).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print_status(&status);
            }
            Ok(())
        }
        OpsCommand::Backup {
            target,
            to,
            concurrency,
            keep,
        } => {
            let settings = settings(config, target)?;
            let uri = match to.as_deref() {
                Some(to) => ObjectsUri::from_target(to)?,
                None => settings.backup_uri()?,
            };
            let store = open_objects(&uri, &settings.objects).await?;
            let report = crate::backup::backup(&settings, &*store, concurrency, true).await?;
            let m = &report.manifest;
            println!(
                "backup {} in {uri}: {} log records, {} live media, {} objects ({} new, {} bytes copied)",
                m.id,
                m.log
                    .topics
                    .values()
                    .flatten()
                    .map(|p| p.records)
                    .sum::<u64>(),
                m.views.as_ref().map_or(0, |v| v.live),
                m.objects.len(),
                report.objects_copied,
                report.bytes_copied
            );
            if let Some(keep) = keep {
                let pruned = crate::backup::prune(&*store, keep.max(1)).await?;
                println!("removed {} older backups", pruned.len());
            }
            Ok(())
        }
        OpsCommand::Restore {
            target,
            from,
            id,
            list,
            concurrency,
        } => {
            let settings = settings(config, target)?;
            let uri = ObjectsUri::from_target(&from)?;
            let store = open_objects(&uri, &settings.objects).await?;
            if list {
                for id in crate::backup::list(&*store).await? {
                    let m = crate::backup::read_manifest(&*store, &id).await?;
                    println!("{id}  {}  {} objects", m.created_at, m.objects.len());
                }
                return Ok(());
            }
            let report =
                crate::backup::restore(&settings, &*store, id.as_deref(), concurrency, true)
                    .await?;
            println!(
                "restored backup {} into {}: log, read models and {} objects ({} bytes), all \
                 matching the manifest",
                report.manifest.id,
                settings.data_dir.display(),
                report.objects,
                report.bytes
            );
            Ok(())
        }
        OpsCommand::Migrate { target } => {
            let settings = settings(config, target)?;
            let uri = settings.views_uri();
            let ViewsUri::Scylla(cluster) = &uri else {
                println!("{uri}: the embedded read store migrates itself when it opens");
                return Ok(());
            };
            let report = conveyor_storage::views::scylla::migrate(cluster, &settings.views)
                .await
                .with_context(|| format!("failed to migrate {uri}"))?;
            for name in &report.already {
                println!("{name}: already applied");
            }
            for name in &report.applied {
                println!("{name}: applied");
            }
            Ok(())
        }
        OpsCommand::Topics(TopicsCommand::Ensure { target }) => {
            let settings = settings(config, target)?;
            let log = open_log(&settings)?;
            for topic in [settings.topic().to_owned(), settings.dlq_topic()] {
                let existing = log
                    .ensure_topic(&topic, settings.log.partitions)
                    .await
                    .with_context(|| format!("failed to ensure topic {topic}"))?;
                if existing == settings.log.partitions {
                    println!("topic {topic}: {existing} partitions");
                } else {
                    println!(
                        "topic {topic}: {existing} partitions (log.partitions says {}; an \
                         existing topic keeps its count)",
                        settings.log.partitions
                    );
                }
            }
            Ok(())
        }
        OpsCommand::Dlq(DlqCommand::List { target, json }) => {
            let settings = settings(config, target)?;
            let log = open_log(&settings)?;
            let letters = dead_letters(&*log, &settings.dlq_topic()).await?;
            if json {
                for d in &letters {
                    println!("{}", serde_json::to_string(&letter_json(d))?);
                }
            } else if letters.is_empty() {
                println!("no dead letters waiting on {}", settings.dlq_topic());
            } else {
                println!(
                    "{:<20} {:>5} {:>9} {:<12} {:<40} ERROR",
                    "ORIGIN", "PART", "OFFSET", "GROUP", "KEY"
                );
                for d in &letters {
                    println!(
                        "{:<20} {:>5} {:>9} {:<12} {:<40} {}",
                        d.header("dlq-topic").unwrap_or("?"),
                        d.header("dlq-partition").unwrap_or("?"),
                        d.header("dlq-offset").unwrap_or("?"),
                        d.header("dlq-group").unwrap_or("?"),
                        String::from_utf8_lossy(&d.key),
                        d.header("dlq-error").unwrap_or(""),
                    );
                }
            }
            Ok(())
        }
        OpsCommand::Dlq(DlqCommand::Redrive { target }) => {
            let settings = settings(config, target)?;
            let log = open_log(&settings)?;
            let redriven = redrive(&*log, &settings).await?;
            println!("redrove {redriven} dead letters");
            Ok(())
        }
    }
}

/// Refuses a data dir that does not exist when an embedded backend would live in it: a
/// mistyped `--data-dir` would otherwise make empty stores, and report on them (or issue keys
/// into them) as if they were the servers'.
pub(crate) fn require_data_dir(settings: &Settings) -> anyhow::Result<()> {
    let embedded = settings.log_uri().is_embedded()
        || settings.views_uri().is_embedded()
        || settings.objects_uri().is_embedded();
    anyhow::ensure!(
        !embedded || settings.data_dir.is_dir(),
        "the data dir {} does not exist (or is not a directory); pass the one `serve` uses \
         (--data-dir, or CONVEYOR__DATA_DIR)",
        settings.data_dir.display()
    );
    Ok(())
}
