//! Benchmarks behind `conveyor loadtest`. They print numbers and compare against a reference
//! in the same run where one exists; they never pass or fail on speed.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use conveyor_config::{Durability, Limits, LogUri, ScyllaUri, Settings, ViewsUri};
use conveyor_runtime::changes::Changes;
use conveyor_schemas::{Envelope, Event, MediaDescribed};
use conveyor_storage::events::to_record;
use conveyor_storage::{Backends, VersionClock};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::photos::{make_photos, photo_files};
use crate::stats::median;

/// A log to benchmark (`--log`): `sqlite`, the embedded log in a temp dir, or a Kafka URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BenchLog {
    /// The embedded log, in the run's temp dir.
    Sqlite,
    /// Kafka, on a topic of the run's own.
    Kafka(LogUri),
}

impl std::str::FromStr for BenchLog {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "sqlite" => Ok(BenchLog::Sqlite),
            _ => match text.parse::<LogUri>() {
                Ok(uri @ LogUri::Kafka(_)) => Ok(BenchLog::Kafka(uri)),
                _ => Err(format!(
                    "takes `sqlite` or `kafka://host:port`, not {text:?}"
                )),
            },
        }
    }
}

impl std::fmt::Display for BenchLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BenchLog::Sqlite => f.write_str("sqlite"),
            BenchLog::Kafka(uri) => uri.fmt(f),
        }
    }
}

/// A read store to benchmark (`--views`): `sqlite`, the embedded store in a temp dir, or a
/// CQL cluster, where each run migrates a keyspace of its own (the given name, `_`, a suffix).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BenchViews {
    /// The embedded read store, in the run's temp dir.
    Sqlite,
    /// A CQL cluster; the keyspace is the prefix of each run's own.
    Scylla(ScyllaUri),
}

impl std::str::FromStr for BenchViews {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "sqlite" => Ok(BenchViews::Sqlite),
            _ => text
                .parse()
                .map(BenchViews::Scylla)
                .map_err(|e| format!("takes `sqlite` or `scylla://host:port/keyspace`: {e}")),
        }
    }
}

impl std::fmt::Display for BenchViews {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BenchViews::Sqlite => f.write_str("sqlite"),
            BenchViews::Scylla(uri) => uri.fmt(f),
        }
    }
}

/// `uri` with a keyspace of the run's own: its keyspace, `_`, and the last 12 hex digits of
/// `run`.
pub fn run_keyspace(uri: &ScyllaUri, run: &str) -> anyhow::Result<ScyllaUri> {
    let suffix = &run[run.len().saturating_sub(12)..];
    Ok(uri.with_keyspace(&format!("{}_{suffix}", uri.keyspace))?)
}

/// Settings for a benchmark on `log` in a fresh temp dir, with fsync durability and a topic
/// and groups of the run's own.
fn bench_settings(log: &BenchLog, dir: &Path) -> Settings {
    let mut settings = Settings {
        data_dir: dir.to_owned(),
        ..Settings::default()
    };
    settings.log.durability = Durability::Fsync;
    if let BenchLog::Kafka(uri) = log {
        let run = Uuid::now_v7().simple().to_string();
        settings.log.uri = Some(uri.clone());
        settings.log.topic = format!("loadtest-{run}");
        settings.projector.group = format!("loadtest-projector-{run}");
    }
    settings
}

/// Log + projector throughput on `MediaDescribed`: durable appends, SQLite read models.
pub async fn events(
    log: &BenchLog,
    views: &BenchViews,
    count: usize,
    batch: usize,
    producers: usize,
    media: usize,
    recovery: bool,
) -> anyhow::Result<()> {
    let dir = tempfile::tempdir().context("failed to create a temp dir")?;
    let mut settings = bench_settings(log, dir.path());
    let keyspace = match views {
        BenchViews::Sqlite => None,
        BenchViews::Scylla(cluster) => {
            let keyspace = run_keyspace(cluster, &Uuid::now_v7().simple().to_string())?;
            settings.views.uri = Some(ViewsUri::Scylla(keyspace.clone()));
            settings.views.replication_factor = 1;
            conveyor_storage::views::scylla::migrate(&keyspace, &settings.views)
                .await
                .context("failed to migrate the benchmark keyspace")?;
            Some(keyspace)
        }
    };
    let backends = Backends::open(&settings).await?;
    let ids: Arc<Vec<Uuid>> = Arc::new((0..media.max(1)).map(|_| Uuid::now_v7()).collect());
    let clock = Arc::new(VersionClock::new());

    let stop = CancellationToken::new();
    let projector =
        conveyor_projector::Projector::new(backends.views.clone(), Changes::new(), &settings);
    let projecting = tokio::spawn(conveyor_runtime::stage::run(
        backends.log.clone(),
        Box::new(projector),
        stop.clone(),
    ));

    // Start the clock only once the projector is in its group and working: a Kafka group
    // join takes seconds, which is start-up, not throughput.
    let warm_up = Envelope::new(
        Uuid::now_v7(),
        clock.next(),
        "loadtest",
        Event::MediaDescribed(MediaDescribed {
            title: None,
            description: None,
            tags: vec![],
        }),
    );
    backends
        .log
        .append(settings.topic(), vec![to_record(&warm_up)])
        .await?;
    let joined = Instant::now();
    loop {
        let lag = backends
            .log
            .lag(settings.topic(), &settings.projector.group)
            .await?;
        if lag.iter().map(|l| l.committed).sum::<u64>() >= 1 {
            break;
        }
        anyhow::ensure!(
            joined.elapsed() < Duration::from_secs(60),
            "the projector did not start in 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "projector ready after {:.2?} (group join; not counted)",
        joined.elapsed()
    );

    let bar = conveyor::progress_bar(true, count as u64, "appending");
    let started = Instant::now();
    let per_producer = count / producers.max(1);
    let mut tasks = Vec::new();
    for p in 0..producers.max(1) {
        let (log, ids, clock, bar) = (
            backends.log.clone(),
            ids.clone(),
            clock.clone(),
            bar.clone(),
        );
        let topic = settings.topic().to_owned();
        tasks.push(tokio::spawn(async move {
            let mut sent = 0;
            while sent < per_producer {
                let n = batch.min(per_producer - sent);
                let records = (0..n)
                    .map(|i| {
                        let id = ids[(p * per_producer + sent + i) % ids.len()];
                        to_record(&Envelope::new(
                            id,
                            clock.next(),
                            "loadtest",
                            Event::MediaDescribed(MediaDescribed {
                                title: Some(format!("title {sent}")),
                                description: None,
                                tags: vec!["load".into()],
                            }),
                        ))
                    })
                    .collect();
                log.append(&topic, records).await?;
                sent += n;
                bar.inc(n as u64);
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let appended = started.elapsed();
    bar.finish_and_clear();
    let total = (per_producer * producers.max(1)) as u64;

    // Wait for the projector to commit everything.
    let bar = conveyor::progress_bar(true, total, "projecting");
    loop {
        let lag = backends
            .log
            .lag(settings.topic(), &settings.projector.group)
            .await?;
        let done: u64 = lag
            .iter()
            .map(|l| l.committed)
            .sum::<u64>()
            .saturating_sub(1);
        bar.set_position(done);
        if done >= total {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let projected = started.elapsed();
    bar.finish_and_clear();
    stop.cancel();
    projecting.await??;

    println!(
        "events on {log}, views on {views}: {total} MediaDescribed on {} media ids, {producers} producers × batches of {batch}",
        ids.len()
    );
    println!(
        "  appended (durable):      {:>10.0} events/s  ({:.2?})",
        total as f64 / appended.as_secs_f64(),
        appended
    );
    println!(
        "  appended and projected:  {:>10.0} events/s  ({:.2?})",
        total as f64 / projected.as_secs_f64(),
        projected
    );
    if *log == BenchLog::Sqlite {
        // A record like those appended above, which carry a title and a tag.
        let sample = to_record(&Envelope::new(
            ids[0],
            clock.next(),
            "loadtest",
            Event::MediaDescribed(MediaDescribed {
                title: Some(format!("title {total}")),
                description: None,
                tags: vec!["load".into()],
            }),
        ));
        let ceiling = sqlite_ceiling(
            &dir.path().join("ceiling.db"),
            total as usize,
            batch,
            &sample,
            settings.log.durability,
        )
        .context("the plain SQLite ceiling failed")?;
        println!(
            "  plain SQLite, same disk: {ceiling:>10.0} inserts/s  (one writer, WAL, synchronous={}, \
             transactions of {batch}, rows of the same size, no Conveyor code)",
            sqlite_sync(settings.log.durability)
        );
        println!(
            "  Conveyor's durable appends ran at {:.2} of that ceiling, append and projection at {:.2}",
            total as f64 / appended.as_secs_f64() / ceiling,
            total as f64 / projected.as_secs_f64() / ceiling
        );
    }
    if recovery {
        recovery_ops(&settings, &backends).await?;
    }
    if let Some(keyspace) = &keyspace {
        conveyor_storage::views::scylla::drop_keyspace(keyspace, &settings.views)
            .await
            .context("failed to drop the benchmark keyspace")?;
    }
    Ok(())
}

/// The `synchronous` pragma the embedded log sets for `durability` (`log::sqlite`).
fn sqlite_sync(durability: Durability) -> &'static str {
    match durability {
        Durability::Fsync => "FULL",
        Durability::Os => "NORMAL",
    }
}

/// The embedded log's reference: plain SQLite inserting `count` rows shaped like `sample`
/// (its key, headers and value, into the same table layout as a log partition) at `path`, in
/// transactions of `batch`, one writer, WAL, the `synchronous` setting `durability` gives.
/// Returns rows per second. No Conveyor code runs: no appender thread, no partitioning, no
/// positions, no wake-ups.
fn sqlite_ceiling(
    path: &Path,
    count: usize,
    batch: usize,
    sample: &conveyor_storage::log::Record,
    durability: Durability,
) -> rusqlite::Result<f64> {
    let mut conn = rusqlite::Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", sqlite_sync(durability))?;
    conn.execute_batch(
        "CREATE TABLE p (off INTEGER PRIMARY KEY, key BLOB NOT NULL, headers TEXT NOT NULL, \
         value BLOB NOT NULL, ts INTEGER NOT NULL)",
    )?;
    let headers = serde_json::to_string(&sample.headers).unwrap_or_default();
    let bar = conveyor::progress_bar(true, count as u64, "plain SQLite");
    let started = Instant::now();
    let mut done = 0;
    while done < count {
        let n = batch.max(1).min(count - done);
        let tx = conn.transaction()?;
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO p (key, headers, value, ts) VALUES (?1, ?2, ?3, ?4)",
            )?;
            for i in 0..n {
                insert.execute(rusqlite::params![
                    &sample.key,
                    &headers,
                    &sample.value[..],
                    (done + i) as i64
                ])?;
            }
        }
        tx.commit()?;
        done += n;
        bar.inc(n as u64);
    }
    bar.finish_and_clear();
    Ok(count as f64 / started.elapsed().as_secs_f64())
}

/// Times `ops replay` against the live projection of the same events, and `ops backup`
/// against `dd` copying the same database bytes with fdatasync.
async fn recovery_ops(settings: &Settings, backends: &Backends) -> anyhow::Result<()> {
    let started = Instant::now();
    let report =
        conveyor::replay::replay(settings, backends.log.clone(), "media", false, None, false)
            .await?;
    let replay = started.elapsed();
    println!(
        "  ops replay:              {:>10.0} events/s  ({:.2?}, {} events, switch included)",
        report.log_events as f64 / replay.as_secs_f64(),
        replay,
        report.log_events
    );

    let target = tempfile::tempdir()?;
    let store = conveyor_storage::objects::fs::FsObjectStore::open(target.path())?;
    let started = Instant::now();
    let backup = conveyor::backup::backup(settings, &store, 8, false).await?;
    let took = started.elapsed();
    let bytes: u64 = backup.manifest.files.values().map(|f| f.bytes).sum();
    println!(
        "  ops backup:              {:>10.1} MB/s      ({:.2?}, {} MB of databases, manifest and hashes included)",
        bytes as f64 / 1e6 / took.as_secs_f64(),
        took,
        bytes / 1_000_000
    );
    // The reference: dd copying the same files, durably.
    let started = Instant::now();
    for name in ["log.db", "views.db"] {
        let out = std::process::Command::new("dd")
            .arg(format!("if={}", settings.data_dir.join(name).display()))
            .arg(format!(
                "of={}",
                target.path().join(format!("dd-{name}")).display()
            ))
            .args(["bs=1M", "conv=fdatasync", "status=none"])
            .status()
            .context("failed to run dd")?;
        anyhow::ensure!(out.success(), "dd failed");
    }
    let dd = started.elapsed();
    println!(
        "  dd (reference):          {:>10.1} MB/s      ({:.2?}); backup/dd time ratio {:.2}",
        bytes as f64 / 1e6 / dd.as_secs_f64(),
        dd,
        took.as_secs_f64() / dd.as_secs_f64()
    );
    Ok(())
}

/// Appends `count` records of `size` random-ish bytes and reports acknowledged records/s.
pub async fn produce(
    log: &BenchLog,
    count: usize,
    size: usize,
    batch: usize,
) -> anyhow::Result<f64> {
    let dir = tempfile::tempdir().context("failed to create a temp dir")?;
    let settings = bench_settings(log, dir.path());
    let backends = Backends::open(&settings).await?;
    let payload = bytes::Bytes::from((0..size).map(|i| (i * 31 % 251) as u8).collect::<Vec<u8>>());
    let bar = conveyor::progress_bar(true, count as u64, "producing");
    let started = Instant::now();
    let mut sent = 0;
    while sent < count {
        let n = batch.min(count - sent);
        let records = (0..n)
            .map(|i| conveyor_storage::log::Record {
                key: format!("key-{}", (sent + i) % 10_000).into_bytes(),
                headers: vec![],
                value: payload.clone(),
            })
            .collect();
        backends.log.append(settings.topic(), records).await?;
        sent += n;
        bar.inc(n as u64);
    }
    let elapsed = started.elapsed();
    bar.finish_and_clear();
    let rate = count as f64 / elapsed.as_secs_f64();
    println!(
        "produce on {log}: {count} records of {size} bytes in batches of {batch}: {rate:.0} records/s acknowledged ({elapsed:.2?})"
    );
    Ok(rate)
}

/// The reference producer: Kafka's own `org.apache.kafka.tools.ProducerPerformance` from the
/// jars in `tools`, run with `java` on a fresh topic of the same partition count, with the
/// producer settings `KafkaLog` uses. Returns the records/s it reports.
pub async fn producer_performance(
    tools: &Path,
    brokers: &LogUri,
    count: usize,
    size: usize,
) -> anyhow::Result<f64> {
    let LogUri::Kafka(brokers) = brokers else {
        anyhow::bail!("Kafka's ProducerPerformance needs a Kafka log, not {brokers}");
    };
    let dir = tempfile::tempdir().context("failed to create a temp dir")?;
    let settings = bench_settings(&BenchLog::Kafka(LogUri::Kafka(brokers.clone())), dir.path());
    let backends = Backends::open(&settings).await?;
    let classpath = format!("{}/*", tools.display());
    let output = tokio::process::Command::new(std::env::var("JAVA").unwrap_or("java".into()))
        .args(["-Xmx512m", "-cp", &classpath])
        .arg("org.apache.kafka.tools.ProducerPerformance")
        .args(["--topic", settings.topic()])
        .args(["--num-records", &count.to_string()])
        .args(["--record-size", &size.to_string()])
        .args(["--throughput", "-1", "--producer-props"])
        .arg(format!("bootstrap.servers={brokers}"))
        .args([
            "acks=all",
            "enable.idempotence=true",
            "compression.type=lz4",
        ])
        .args(["linger.ms=5", "batch.size=1000000"])
        .output()
        .await
        .context("failed to run java (set JAVA to a Java 17 binary)")?;
    drop(backends);
    let stdout = String::from_utf8_lossy(&output.stdout);
    anyhow::ensure!(
        output.status.success(),
        "ProducerPerformance failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    // Its last line: `200000 records sent, 207039.3 records/sec (19.74 MB/sec), …`.
    let rate = stdout
        .lines()
        .rev()
        .find_map(|l| {
            l.split(" records/sec")
                .next()?
                .rsplit(", ")
                .next()?
                .parse::<f64>()
                .ok()
        })
        .with_context(|| format!("no rate in ProducerPerformance's output: {stdout}"))?;
    println!("  Kafka's ProducerPerformance on the same broker: {rate:.0} records/s");
    Ok(rate)
}

/// Our thumbnail path against `vipsthumbnail`, on the same file, same size, same run.
pub fn thumbnail(file: &Path, size: u32, runs: usize) -> anyhow::Result<()> {
    let bytes =
        std::fs::read(file).with_context(|| format!("failed to read {}", file.display()))?;
    let limits = Limits::default();
    let runs = runs.max(1);
    let mut ours = Vec::with_capacity(runs);
    let mut last = None;
    for _ in 0..runs {
        let started = Instant::now();
        last = Some(conveyor_processor::thumbnail(&bytes, &limits, size)?);
        ours.push(started.elapsed());
    }
    let thumb = last.expect("at least one run");
    let mut full = Vec::with_capacity(runs);
    for _ in 0..runs {
        let started = Instant::now();
        conveyor_processor::render(&bytes, &limits)?;
        full.push(started.elapsed());
    }
    let ours = median(ours);
    println!(
        "thumbnail of {} to {size} px, median of {runs}:",
        file.display()
    );
    println!(
        "  conveyor thumbnail:        {:>8.1} ms  ({}x{})",
        ours.as_secs_f64() * 1e3,
        thumb.width,
        thumb.height
    );
    println!(
        "  conveyor all 3 variants:   {:>8.1} ms  (plus blurhash and EXIF)",
        median(full).as_secs_f64() * 1e3
    );

    let out = tempfile::Builder::new().suffix(".jpg").tempfile()?;
    let mut vips = Vec::with_capacity(runs);
    for _ in 0..runs {
        let started = Instant::now();
        let status = std::process::Command::new("vipsthumbnail")
            .arg(file)
            .args(["-s", &size.to_string(), "-o"])
            .arg(out.path())
            .status();
        match status {
            Ok(s) if s.success() => vips.push(started.elapsed()),
            Ok(s) => anyhow::bail!("vipsthumbnail failed: {s}"),
            Err(_) => {
                println!(
                    "  vipsthumbnail:             not installed (apt-get install libvips-tools)"
                );
                return Ok(());
            }
        }
    }
    let vips = median(vips);
    println!(
        "  vipsthumbnail (process):   {:>8.1} ms",
        vips.as_secs_f64() * 1e3
    );
    println!(
        "  ratio conveyor / vips:     {:>8.2}",
        ours.as_secs_f64() / vips.as_secs_f64()
    );
    Ok(())
}

/// Photos through the whole embedded pipeline, against `vipsthumbnail` over the same files.
pub async fn photos(
    dir: Option<&Path>,
    count: usize,
    size: &str,
    concurrency: usize,
) -> anyhow::Result<()> {
    use futures::StreamExt;

    let scratch = tempfile::tempdir().context("failed to create a temp dir")?;
    let files = match dir {
        Some(dir) => photo_files(dir)?,
        None => make_photos(&scratch.path().join("photos"), count, size)?,
    };
    anyhow::ensure!(!files.is_empty(), "no photos to upload");
    let bytes: u64 = files
        .iter()
        .map(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0))
        .sum();

    let mut settings = Settings {
        data_dir: scratch.path().join("data"),
        listen: "127.0.0.1:0".parse().expect("a valid address"),
        ..Settings::default()
    };
    settings.auth.api_keys =
        conveyor_config::KeyList::parse("bench:bench-key").map_err(anyhow::Error::msg)?;
    // One key drives all the load: the per-key rate limit would measure itself.
    settings.auth.rate_per_sec = 0;
    let app = conveyor::app::build(settings, conveyor::app::Role::Serve).await?;
    let base = format!("http://127.0.0.1:{}", app.port());
    let stop = app.stop_token();
    let serving = tokio::spawn(app.run_until_stopped());
    let client = reqwest::Client::new();

    let progress = indicatif::ProgressBar::new(files.len() as u64 * 2).with_style(
        indicatif::ProgressStyle::with_template("{msg:>10} [{bar:40}] {pos}/{len} {elapsed}")
            .expect("a valid template"),
    );
    progress.set_message("uploaded");
    let started = Instant::now();
    let ids: Vec<String> = futures::stream::iter(files.iter().cloned())
        .map(|file| {
            let (client, base, progress) = (client.clone(), base.clone(), progress.clone());
            async move {
                let body = tokio::fs::read(&file).await?;
                let form = reqwest::multipart::Form::new().part(
                    "file",
                    reqwest::multipart::Part::bytes(body).file_name("photo"),
                );
                let response = client
                    .post(format!("{base}/v1/media"))
                    .bearer_auth("bench-key")
                    .multipart(form)
                    .send()
                    .await?;
                anyhow::ensure!(
                    response.status() == reqwest::StatusCode::ACCEPTED,
                    "{} was refused: {}",
                    file.display(),
                    response.text().await.unwrap_or_default()
                );
                let body: serde_json::Value = response.json().await?;
                progress.inc(1);
                Ok(body["id"].as_str().unwrap_or_default().to_owned())
            }
        })
        .buffer_unordered(concurrency.max(1))
        .collect::<Vec<anyhow::Result<String>>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<_>>()?;
    let uploaded = started.elapsed();
    progress.set_message("processed");
    let mut failed = 0;
    for id in &ids {
        loop {
            let media: serde_json::Value = client
                .get(format!("{base}/v1/media/{id}"))
                .bearer_auth("bench-key")
                .send()
                .await?
                .json()
                .await
                .unwrap_or_default();
            match media["status"].as_str() {
                Some("processed") => break,
                Some("failed") => {
                    failed += 1;
                    break;
                }
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
        progress.inc(1);
    }
    let elapsed = started.elapsed();
    progress.finish_and_clear();
    stop.cancel();
    serving.await??;

    let n = files.len();
    println!(
        "{n} photos ({:.1} MB) through upload, process (3 variants, blurhash, EXIF) and project:",
        bytes as f64 / 1e6
    );
    println!(
        "  conveyor pipeline:                  {:>8.2} photos/s  ({:.1} s; all uploaded after {:.1} s; {failed} failed)",
        n as f64 / elapsed.as_secs_f64(),
        elapsed.as_secs_f64(),
        uploaded.as_secs_f64()
    );
    let out = scratch.path().join("vipsthumbnail");
    std::fs::create_dir_all(&out)?;
    let started = Instant::now();
    let status = std::process::Command::new("vipsthumbnail")
        .args(["-s", "1600", "-o"])
        .arg(out.join("%s.jpg"))
        .args(&files)
        .status();
    match status {
        Ok(s) if s.success() => {
            let theirs = n as f64 / started.elapsed().as_secs_f64();
            println!(
                "  vipsthumbnail -s 1600, one process: {theirs:>8.2} photos/s (one variant, no store)"
            );
            println!(
                "  ratio conveyor / vipsthumbnail:     {:>8.2}",
                n as f64 / elapsed.as_secs_f64() / theirs
            );
        }
        Ok(s) => anyhow::bail!("vipsthumbnail failed: {s}"),
        Err(_) => println!("  vipsthumbnail: not installed (apt-get install libvips-tools)"),
    }
    Ok(())
}
