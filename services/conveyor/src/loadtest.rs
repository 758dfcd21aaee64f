//! Benchmarks behind `conveyor loadtest`. They print numbers and compare against a reference
//! in the same run where one exists; they never pass or fail on speed.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use conveyor_platform::changes::Changes;
use conveyor_platform::config::{Durability, Limits, Settings};
use conveyor_platform::events::to_record;
use conveyor_platform::{Backends, VersionClock};
use conveyor_schemas::{Envelope, Event, MediaDescribed};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::cli::LoadtestCommand;

pub async fn run(command: LoadtestCommand) -> anyhow::Result<()> {
    match command {
        LoadtestCommand::Events {
            count,
            batch,
            producers,
            media,
            logs,
            views,
            recovery,
        } => {
            for log in &logs {
                for views in &views {
                    events(log, views, count, batch, producers, media, recovery).await?;
                }
            }
            Ok(())
        }
        LoadtestCommand::Produce {
            count,
            size,
            batch,
            logs,
            kafka_tools,
            runs,
        } => {
            for log in logs {
                let reference = kafka_tools
                    .as_deref()
                    .filter(|_| log.starts_with("kafka://"));
                let (mut ours, mut theirs) = (Vec::new(), Vec::new());
                for _ in 0..runs.max(1) {
                    ours.push(produce(&log, count, size, batch).await?);
                    if let Some(tools) = reference {
                        theirs.push(producer_performance(tools, &log, count, size).await?);
                    }
                }
                if runs > 1 || reference.is_some() {
                    let ours = median_of(ours);
                    print!("produce on {log}: median {ours:.0} records/s over {runs} run(s)");
                    if !theirs.is_empty() {
                        let theirs = median_of(theirs);
                        print!(
                            "; Kafka's ProducerPerformance: median {theirs:.0} records/s; ratio {:.2}",
                            ours / theirs
                        );
                    }
                    println!();
                }
            }
            Ok(())
        }
        LoadtestCommand::Thumbnail { file, size, runs } => thumbnail(&file, size, runs),
        LoadtestCommand::Run {
            scenario,
            target,
            key,
            service_key,
            out,
            allow_remote,
            pid,
            max_in_flight,
            find_capacity,
            from,
            factor,
            step,
            max_steps,
            p99,
            no_reference,
            read_target,
            metrics,
        } => {
            let dev_key = |name: &str| {
                std::fs::read_to_string(Path::new("data").join(name))
                    .ok()
                    .map(|k| k.trim().to_owned())
            };
            let key = key.or_else(|| dev_key("dev-api-key")).context(
                "no client key: pass --key (or run against a `serve` whose data dir is ./data)",
            )?;
            let report = crate::capacity::run(crate::capacity::Options {
                scenario,
                target,
                read_target,
                metrics,
                processes: Vec::new(),
                key,
                service_key: service_key.or_else(|| dev_key("dev-service-key")),
                out,
                allow_remote,
                pid,
                max_in_flight,
                find_capacity: find_capacity.then_some(crate::capacity::Search {
                    from,
                    factor,
                    step,
                    max_steps,
                    p99,
                }),
                reference: !no_reference,
            })
            .await?;
            // 3, not 1 (an error) or 2 (clap's usage errors): a threshold broke, or no step of
            // --find-capacity held.
            if !report.passed() {
                std::process::exit(3);
            }
            Ok(())
        }
        LoadtestCommand::Scale {
            scenario,
            kafka,
            views,
            instances,
            partitions,
            out,
            from,
            factor,
            step,
            max_steps,
            p99,
            max_in_flight,
        } => {
            let report = crate::capacity::scale::run(crate::capacity::scale::ScaleOptions {
                scenario,
                kafka,
                views,
                instances,
                partitions,
                out,
                search: crate::capacity::Search {
                    from,
                    factor,
                    step,
                    max_steps,
                    p99,
                },
                max_in_flight,
            })
            .await?;
            if report.points.iter().any(|p| p.sustainable_rate.is_none()) {
                std::process::exit(3);
            }
            Ok(())
        }
        LoadtestCommand::Video {
            file,
            size,
            seconds,
            runs,
            photos,
            backlog,
        } => {
            crate::loadtest_video::run(crate::loadtest_video::Options {
                file,
                size,
                seconds,
                runs,
                photos,
                backlog,
            })
            .await
        }
        LoadtestCommand::Photos {
            dir,
            count,
            size,
            concurrency,
        } => photos(dir.as_deref(), count, &size, concurrency).await,
    }
}

/// Settings for a benchmark on `log` (`sqlite`, or a Kafka URI) in a fresh temp dir, with
/// fsync durability and a topic and groups of the run's own.
fn bench_settings(log: &str, dir: &Path) -> anyhow::Result<Settings> {
    let mut settings = Settings {
        data_dir: dir.to_owned(),
        ..Settings::default()
    };
    settings.log.durability = Durability::Fsync;
    if log.starts_with("kafka://") {
        let run = Uuid::now_v7().simple().to_string();
        settings.log.uri = Some(log.to_owned());
        settings.log.topic = format!("loadtest-{run}");
        settings.projector.group = format!("loadtest-projector-{run}");
    } else if log != "sqlite" {
        anyhow::bail!("--log takes `sqlite` or `kafka://host:port`, not {log:?}");
    }
    Ok(settings)
}

/// Log + projector throughput on `MediaDescribed`: durable appends, SQLite read models.
async fn events(
    log: &str,
    views: &str,
    count: usize,
    batch: usize,
    producers: usize,
    media: usize,
    recovery: bool,
) -> anyhow::Result<()> {
    let dir = tempfile::tempdir().context("failed to create a temp dir")?;
    let mut settings = bench_settings(log, dir.path())?;
    if views.starts_with("scylla://") {
        settings.views.uri = Some(format!(
            "{views}_{}",
            &Uuid::now_v7().simple().to_string()[20..]
        ));
        settings.views.replication_factor = 1;
        conveyor_platform::views::scylla::migrate(&settings.views_uri(), &settings.views)
            .await
            .context("failed to migrate the benchmark keyspace")?;
    } else if views != "sqlite" {
        anyhow::bail!("--views takes `sqlite` or `scylla://host:port/keyspace`, not {views:?}");
    }
    let backends = Backends::open(&settings).await?;
    let ids: Arc<Vec<Uuid>> = Arc::new((0..media.max(1)).map(|_| Uuid::now_v7()).collect());
    let clock = Arc::new(VersionClock::new());

    let stop = CancellationToken::new();
    let projector = conveyor_projector::Projector::new(backends.views.clone(), Changes::new());
    let projecting = {
        let (log, settings, stop) = (backends.log.clone(), settings.clone(), stop.clone());
        tokio::spawn(async move { projector.run(log, &settings, stop).await })
    };

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

    let bar = crate::progress_bar(true, count as u64, "appending");
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
    let bar = crate::progress_bar(true, total, "projecting");
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
    if log == "sqlite" {
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
    if views.starts_with("scylla://") {
        conveyor_platform::views::scylla::drop_keyspace(&settings.views_uri(), &settings.views)
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
    sample: &conveyor_platform::log::Record,
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
    let bar = crate::progress_bar(true, count as u64, "plain SQLite");
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
        crate::replay::replay(settings, backends.log.clone(), "media", false, None, false).await?;
    let replay = started.elapsed();
    println!(
        "  ops replay:              {:>10.0} events/s  ({:.2?}, {} events, switch included)",
        report.log_events as f64 / replay.as_secs_f64(),
        replay,
        report.log_events
    );

    let target = tempfile::tempdir()?;
    let store = conveyor_platform::objects::fs::FsObjectStore::open(target.path())?;
    let started = Instant::now();
    let backup = crate::backup::backup(settings, &store, 8, false).await?;
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
async fn produce(log: &str, count: usize, size: usize, batch: usize) -> anyhow::Result<f64> {
    let dir = tempfile::tempdir().context("failed to create a temp dir")?;
    let settings = bench_settings(log, dir.path())?;
    let backends = Backends::open(&settings).await?;
    let payload = bytes::Bytes::from((0..size).map(|i| (i * 31 % 251) as u8).collect::<Vec<u8>>());
    let bar = crate::progress_bar(true, count as u64, "producing");
    let started = Instant::now();
    let mut sent = 0;
    while sent < count {
        let n = batch.min(count - sent);
        let records = (0..n)
            .map(|i| conveyor_platform::log::Record {
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
async fn producer_performance(
    tools: &Path,
    log: &str,
    count: usize,
    size: usize,
) -> anyhow::Result<f64> {
    let dir = tempfile::tempdir().context("failed to create a temp dir")?;
    let settings = bench_settings(log, dir.path())?;
    let backends = Backends::open(&settings).await?;
    let brokers = log.trim_start_matches("kafka://");
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

fn median_of(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

pub(crate) fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

/// Our thumbnail path against `vipsthumbnail`, on the same file, same size, same run.
fn thumbnail(file: &Path, size: u32, runs: usize) -> anyhow::Result<()> {
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
async fn photos(
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
        conveyor_platform::config::KeyList::parse("bench:bench-key").map_err(anyhow::Error::msg)?;
    // One key drives all the load: the per-key rate limit would measure itself.
    settings.auth.rate_per_sec = 0;
    let app = crate::app::build(settings, crate::app::Role::Serve).await?;
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

/// The files directly inside `dir`, sorted.
fn photo_files(dir: &Path) -> anyhow::Result<Vec<std::path::PathBuf>> {
    let mut files = Vec::new();
    for entry in
        std::fs::read_dir(dir).with_context(|| format!("failed to read {}", dir.display()))?
    {
        let path = entry?.path();
        if path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// `count` distinct noise JPEGs of `size` (`WIDTHxHEIGHT`) in `dir`, made with libvips.
pub(crate) fn make_photos(
    dir: &Path,
    count: usize,
    size: &str,
) -> anyhow::Result<Vec<std::path::PathBuf>> {
    use rs_vips::voption::{Setter, VOption};
    let (width, height) = size
        .split_once('x')
        .and_then(|(w, h)| Some((w.parse::<i32>().ok()?, h.parse::<i32>().ok()?)))
        .filter(|&(w, h)| w > 0 && h > 0)
        .with_context(|| format!("--size takes WIDTHxHEIGHT, not {size:?}"))?;
    conveyor_processor::render::init()?;
    std::fs::create_dir_all(dir)?;
    let progress = indicatif::ProgressBar::new(count as u64).with_message("making photos");
    let mut files = Vec::with_capacity(count);
    for i in 0..count {
        let noise = rs_vips::VipsImage::gaussnoise_with_opts(
            width,
            height,
            VOption::new().set("mean", 128.0).set("sigma", 40.0),
        )?;
        let photo = rs_vips::VipsImage::bandjoin(&[
            noise.linear(&[1.0], &[-20.0])?,
            noise.linear(&[0.8], &[10.0])?,
            noise.linear(&[0.6], &[30.0])?,
        ])?
        .cast(rs_vips::enums::BandFormat::Uchar)?;
        let path = dir.join(format!("photo-{i:04}.jpg"));
        std::fs::write(
            &path,
            photo.jpegsave_buffer_with_opts(VOption::new().set("Q", 85))?,
        )?;
        files.push(path);
        progress.inc(1);
    }
    progress.finish_and_clear();
    Ok(files)
}
