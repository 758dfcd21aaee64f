//! Operator commands. Each works on every log backend: it goes through the `EventLog` trait.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use conveyor_config::{ObjectsUri, Settings, ViewsUri};
use conveyor_storage::backends::{open_log, open_objects};
use conveyor_storage::log::{Delivered, EventLog, StartFrom};
use conveyor_storage::objects::{self, ObjectStore};
use indicatif::ProgressBar;

use crate::cli::{DlqCommand, KeysCommand, OpsCommand, RoleArgs, TopicsCommand};

/// The group whose committed offsets on the dead-letter topic mark what has been redriven.
pub const REDRIVE_GROUP: &str = "dlq-redrive";

fn settings(config: &Option<PathBuf>, target: RoleArgs) -> anyhow::Result<Settings> {
    let mut settings = Settings::load(config.as_deref())?;
    if let Some(dir) = target.data_dir {
        settings.data_dir = dir;
    }
    Ok(settings)
}

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
        OpsCommand::Keys(command) => keys(config, command).await,
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
                log.ensure_topic(&topic, settings.log.partitions)
                    .await
                    .with_context(|| format!("failed to ensure topic {topic}"))?;
                println!("topic {topic}: {} partitions", settings.log.partitions);
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

/// What a migration did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MigrationReport {
    pub copied: u64,
    pub skipped: u64,
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

fn letter_json(d: &Delivered) -> serde_json::Value {
    serde_json::json!({
        "dlq_partition": d.partition, "dlq_offset": d.offset,
        "key": String::from_utf8_lossy(&d.key),
        "headers": d.headers.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
        "bytes": d.value.len(),
    })
}

/// Dead letters past the redrive group's committed offsets.
pub async fn dead_letters(log: &dyn EventLog, dlq: &str) -> anyhow::Result<Vec<Delivered>> {
    let mut out = Vec::new();
    for p in log.lag(dlq, REDRIVE_GROUP).await? {
        if p.lag() > 0 {
            out.extend(
                log.read(dlq, p.partition, p.committed, p.lag() as usize)
                    .await?,
            );
        }
    }
    Ok(out)
}

/// Appends each waiting dead letter back to its original topic (once per original record,
/// however many groups dead-lettered it), then commits the redrive group past it.
pub async fn redrive(log: &dyn EventLog, settings: &Settings) -> anyhow::Result<usize> {
    let dlq = settings.dlq_topic();
    let ends: Vec<(u32, u64)> = log
        .lag(&dlq, REDRIVE_GROUP)
        .await?
        .iter()
        .map(|l| (l.partition, l.end))
        .collect();
    let total: u64 = log
        .lag(&dlq, REDRIVE_GROUP)
        .await?
        .iter()
        .map(|l| l.lag())
        .sum();
    if total == 0 {
        return Ok(0);
    }
    let bar = ProgressBar::new(total);
    let mut sub = log
        .subscribe(&dlq, REDRIVE_GROUP, StartFrom::Earliest)
        .await?;
    let mut seen = HashSet::new();
    let mut redriven = 0;
    let mut done = 0u64;
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while done < total {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "redrive timed out with {} of {total} done",
            done
        );
        let batch = sub.poll(500, Duration::from_millis(500)).await?;
        let mut commits = Vec::new();
        for letter in batch {
            let end = ends
                .iter()
                .find(|(p, _)| *p == letter.partition)
                .map(|(_, e)| *e)
                .unwrap_or(0);
            if letter.offset >= end {
                continue; // dead-lettered after this redrive started: next time
            }
            let origin = (
                letter
                    .header("dlq-topic")
                    .unwrap_or(settings.topic())
                    .to_owned(),
                letter.header("dlq-partition").unwrap_or("").to_owned(),
                letter.header("dlq-offset").unwrap_or("").to_owned(),
            );
            if seen.insert(origin.clone()) {
                let mut record = letter.to_record();
                record.headers.retain(|(k, _)| !k.starts_with("dlq-"));
                record.headers.push((
                    "redriven-from".into(),
                    format!("{}/{}", letter.partition, letter.offset),
                ));
                log.append(&origin.0, vec![record]).await?;
                redriven += 1;
            }
            commits.push((letter.partition, letter.offset + 1));
            done += 1;
            bar.inc(1);
        }
        sub.commit(&commits).await?;
    }
    bar.finish_and_clear();
    Ok(redriven)
}

async fn lag(settings: &Settings, group: Option<String>, json: bool) -> anyhow::Result<()> {
    let log = open_log(settings)?;
    let topic = settings.topic();
    let groups = match group {
        Some(g) => vec![g],
        None => log.groups(topic).await?,
    };
    let mut rows = Vec::new();
    for group in &groups {
        for p in log.lag(topic, group).await? {
            rows.push(serde_json::json!({
                "group": group, "topic": topic, "partition": p.partition,
                "committed": p.committed, "end": p.end, "lag": p.lag(),
            }));
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    if rows.is_empty() {
        println!("no consumer group has committed on {topic} yet");
        return Ok(());
    }
    println!(
        "{:<24} {:>9} {:>12} {:>12} {:>10}",
        "GROUP", "PARTITION", "COMMITTED", "END", "LAG"
    );
    for r in &rows {
        println!(
            "{:<24} {:>9} {:>12} {:>12} {:>10}",
            r["group"].as_str().unwrap_or(""),
            r["partition"],
            r["committed"],
            r["end"],
            r["lag"]
        );
    }
    Ok(())
}

/// One backend's health, as `ops status` reports it.
#[derive(Debug, serde::Serialize)]
pub struct Health {
    pub uri: String,
    pub ok: bool,
    pub latency_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

async fn health<F: std::future::Future<Output = anyhow::Result<()>>>(
    uri: String,
    check: F,
) -> Health {
    let started = std::time::Instant::now();
    let outcome = tokio::time::timeout(Duration::from_secs(10), check).await;
    let error = match outcome {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(format!("{e:#}")),
        Err(_) => Some("no answer in 10 s".to_owned()),
    };
    Health {
        uri,
        ok: error.is_none(),
        latency_ms: started.elapsed().as_secs_f64() * 1e3,
        error,
    }
}

#[derive(Debug, serde::Serialize)]
pub struct GroupStatus {
    pub group: String,
    pub lag: u64,
    /// `(partition, committed, end, lag)`.
    pub partitions: Vec<serde_json::Value>,
}

/// Everything `ops status` shows.
#[derive(Debug, serde::Serialize)]
pub struct Status {
    pub topic: String,
    /// False until a role or `ops topics ensure` creates it.
    pub topic_exists: bool,
    pub records: u64,
    pub events_per_sec: f64,
    pub groups: Vec<GroupStatus>,
    pub dead_letters: u64,
    pub backends: std::collections::BTreeMap<&'static str, Health>,
    pub access: Access,
}

/// Who may call the API, and how much, as this command's configuration sets it: run it with
/// the servers' configuration (the manifests share one ConfigMap) to see what they enforce.
/// The issued keys are read from the shared object store, so those are every replica's.
#[derive(Debug, serde::Serialize)]
pub struct Access {
    /// Requests per second per key, per replica (`auth.rate_per_sec`); 0 is unlimited.
    pub rate_per_sec: u32,
    /// `auth.rate_burst`, as the limiter applies it: never below the rate.
    pub rate_burst: u32,
    /// Bytes of originals per owner (`auth.owner_quota_bytes`); 0 is unlimited.
    pub owner_quota_bytes: u64,
    /// Keys in the configuration (client and service).
    pub configured_keys: usize,
    /// Keys issued with `ops keys create` and not revoked, or `None` when the store is down.
    pub issued_keys: Option<usize>,
    pub revoked_keys: Option<usize>,
}

/// Gathers lag, throughput (end offsets sampled one second apart), dead letters waiting, and
/// each backend's health. Never fails on an unhealthy backend: it reports it.
pub async fn status(settings: &Settings) -> anyhow::Result<Status> {
    let topic = settings.topic().to_owned();
    let mut backends = std::collections::BTreeMap::new();
    let objects_uri = settings.objects_uri();
    backends.insert(
        "objects",
        health(objects_uri.to_string(), async {
            let store = open_objects(&objects_uri, &settings.objects).await?;
            store.head("conveyor-status-probe").await?;
            Ok(())
        })
        .await,
    );
    let views_uri = settings.views_uri();
    backends.insert(
        "views",
        health(views_uri.to_string(), async {
            let views = conveyor_storage::backends::open_views(&views_uri, &settings.views).await?;
            views.ping().await?;
            Ok(())
        })
        .await,
    );
    let log = open_log(settings);
    let mut topic_exists = true;
    let log_health = health(settings.log_uri().to_string(), async {
        let log = log.as_ref().map_err(|e| anyhow::anyhow!("{e:#}"))?;
        match log.partitions(&topic).await {
            // The log answers; the topic is simply not created yet.
            Err(conveyor_storage::log::LogError::UnknownTopic(_)) => topic_exists = false,
            other => {
                other?;
            }
        }
        Ok(())
    })
    .await;
    let log_ok = log_health.ok;
    backends.insert("log", log_health);
    let issued = match open_objects(&objects_uri, &settings.objects).await {
        Ok(store) => conveyor_runtime::keys::list(&*store).await.ok(),
        Err(_) => None,
    };
    let access = Access {
        rate_per_sec: settings.auth.rate_per_sec,
        // As the limiter applies it: never below the rate.
        rate_burst: settings.auth.rate_burst.max(settings.auth.rate_per_sec),
        owner_quota_bytes: settings.auth.owner_quota_bytes,
        configured_keys: settings.auth.api_keys.entries().count()
            + settings.auth.service_keys.entries().count(),
        issued_keys: issued
            .as_ref()
            .map(|keys| keys.iter().filter(|k| !k.revoked).count()),
        revoked_keys: issued.map(|keys| keys.iter().filter(|k| k.revoked).count()),
    };
    let mut status = Status {
        topic: topic.clone(),
        topic_exists,
        records: 0,
        events_per_sec: 0.0,
        groups: Vec::new(),
        dead_letters: 0,
        backends,
        access,
    };
    let (Ok(log), true, true) = (log, log_ok, topic_exists) else {
        return Ok(status);
    };
    let ends = |log: std::sync::Arc<dyn EventLog>, topic: String| async move {
        anyhow::Ok(
            log.lag(&topic, "conveyor-status")
                .await?
                .iter()
                .map(|l| l.end)
                .sum::<u64>(),
        )
    };
    let started = std::time::Instant::now();
    let before = ends(log.clone(), topic.clone()).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = ends(log.clone(), topic.clone()).await?;
    status.records = after;
    status.events_per_sec = (after - before) as f64 / started.elapsed().as_secs_f64();
    for group in log.groups(&topic).await? {
        let lag = log.lag(&topic, &group).await?;
        status.groups.push(GroupStatus {
            lag: lag.iter().map(|l| l.lag()).sum(),
            partitions: lag
                .iter()
                .map(|l| {
                    serde_json::json!({
                        "partition": l.partition, "committed": l.committed,
                        "end": l.end, "lag": l.lag(),
                    })
                })
                .collect(),
            group,
        });
    }
    // Dead letters waiting: the DLQ's end past what redrive has taken.
    if let Ok(lag) = log.lag(&settings.dlq_topic(), REDRIVE_GROUP).await {
        status.dead_letters = lag.iter().map(|l| l.lag()).sum();
    }
    Ok(status)
}

fn print_status(status: &Status) {
    let a = &status.access;
    let or_unlimited = |n: u64, unit: &str| {
        if n == 0 {
            "unlimited".to_owned()
        } else {
            format!("{n} {unit}")
        }
    };
    let count = |n: Option<usize>| n.map_or("?".to_owned(), |n| n.to_string());
    println!(
        "ACCESS\n  rate per key {} (burst {}), quota per owner {}\n  keys: {} configured, {} issued, {} revoked\n",
        or_unlimited(a.rate_per_sec.into(), "req/s"),
        a.rate_burst,
        or_unlimited(a.owner_quota_bytes, "bytes"),
        a.configured_keys,
        count(a.issued_keys),
        count(a.revoked_keys),
    );
    println!("BACKENDS");
    for (name, h) in &status.backends {
        let state = if h.ok { "ok" } else { "DOWN" };
        println!(
            "  {name:<8} {state:<5} {:>8.1} ms  {}{}",
            h.latency_ms,
            h.uri,
            h.error
                .as_deref()
                .map(|e| format!("  ({e})"))
                .unwrap_or_default()
        );
    }
    if !status.topic_exists {
        println!(
            "\nLOG {}: the topic does not exist yet (start a role or run `conveyor ops topics ensure`)",
            status.topic
        );
        return;
    }
    println!(
        "\nLOG {}: {} records, {:.0} events/s, {} dead letters waiting",
        status.topic, status.records, status.events_per_sec, status.dead_letters
    );
    if status.groups.is_empty() {
        println!("\nno consumer group has committed yet");
        return;
    }
    println!("\n{:<28} {:>10}  LAG PER PARTITION", "GROUP", "LAG");
    for g in &status.groups {
        let per: Vec<String> = g
            .partitions
            .iter()
            .map(|p| format!("{}:{}", p["partition"], p["lag"]))
            .collect();
        println!("{:<28} {:>10}  {}", g.group, g.lag, per.join(" "));
    }
}

/// Refuses a data dir that does not exist when an embedded backend would live in it: a
/// mistyped `--data-dir` would otherwise make empty stores, and report on them (or issue keys
/// into them) as if they were the servers'.
fn require_data_dir(settings: &Settings) -> anyhow::Result<()> {
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

async fn keys(config: &Option<PathBuf>, command: KeysCommand) -> anyhow::Result<()> {
    use conveyor_runtime::keys::{self, KeyKind};
    let target = match &command {
        KeysCommand::Create { target, .. }
        | KeysCommand::List { target, .. }
        | KeysCommand::Revoke { target, .. } => target.clone(),
    };
    let settings = settings(config, target)?;
    require_data_dir(&settings)?;
    let objects = open_objects(&settings.objects_uri(), &settings.objects).await?;
    match command {
        KeysCommand::Create { name, service, .. } => {
            conveyor_config::check_key_name(&name).map_err(anyhow::Error::msg)?;
            let kind = if service {
                KeyKind::Service
            } else {
                KeyKind::Client
            };
            let (record, key) = keys::issue(&*objects, kind, &name).await?;
            let kind = if service { "service" } else { "client" };
            eprintln!(
                "issued {kind} key {} for {name}; it is shown only now, keep it secret:",
                record.id
            );
            println!("{key}");
        }
        KeysCommand::List { json, .. } => {
            let listed = keys::list(&*objects).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&listed)?);
            } else {
                println!(
                    "{:<18} {:<8} {:<24} {:<22} STATE",
                    "ID", "KIND", "NAME", "CREATED"
                );
                for k in listed {
                    let created = time::OffsetDateTime::from_unix_timestamp(k.record.created_at)
                        .ok()
                        .and_then(|t| {
                            t.format(&time::format_description::well_known::Rfc3339)
                                .ok()
                        })
                        .unwrap_or_default();
                    println!(
                        "{:<18} {:<8} {:<24} {:<22} {}",
                        k.record.id,
                        format!("{:?}", k.record.kind).to_lowercase(),
                        k.record.name,
                        created,
                        if k.revoked { "revoked" } else { "active" }
                    );
                }
            }
        }
        KeysCommand::Revoke { id, .. } => {
            // Never echo what was given: it may be the key itself.
            anyhow::ensure!(
                id.len() == 16 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')),
                "that is not a key id: an id is the 16 lowercase hex digits after `cvk_` \
                 (see `conveyor ops keys list`)"
            );
            anyhow::ensure!(
                keys::revoke(&*objects, &id).await?,
                "no issued key has the id {id}"
            );
            println!(
                "revoked {id}; every replica refuses it within {} ms",
                settings.auth.refresh_ms
            );
        }
    }
    Ok(())
}
