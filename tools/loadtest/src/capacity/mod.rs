//! `conveyor loadtest run`: drives a deployment with an open-model load (operations start at
//! their intended times whatever the responses do, and latency counts from the intended
//! start, so a slow server cannot hide its queueing: wrk2's and k6's constant-arrival-rate),
//! watches the pipeline behind it (each upload's 202 to `processed`, every consumer group's
//! lag from `/metrics`, the server's CPU and RSS from `/proc`), and writes a JSON and a
//! self-contained HTML report. Thresholds set the exit code.

mod connections;
mod generator;
pub mod reference;
pub mod report;
pub mod scale;
pub mod scenario;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use serde_json::Value;

pub use scenario::{Op, Scenario, Threshold};

/// Longest run allowed, and most operations: every run is bounded.
pub const MAX_DURATION: Duration = Duration::from_secs(3600);
pub const MAX_OPERATIONS: f64 = 5_000_000.0;
/// The most operations in flight `--max-in-flight` allows (each holds a connection).
pub const MAX_IN_FLIGHT: usize = 100_000;

/// What `loadtest run` was asked to do.
pub struct Options {
    pub scenario: PathBuf,
    pub target: String,
    /// Where reads go (items, timelines, thumbnails, and the polls that follow uploads), when
    /// not to `target`: a `query` role of its own.
    pub read_target: Option<String>,
    /// More `/metrics` pages to read consumer lag from, beside the target's (the consumer
    /// roles of a distributed deployment).
    pub metrics: Vec<String>,
    /// Named processes to sample CPU and RSS from, instead of `pid`.
    pub processes: Vec<(String, u32)>,
    /// A client key (uploads, reads).
    pub key: String,
    /// A service key, for `post_events`.
    pub service_key: Option<String>,
    /// Where `report.json` and `report.html` go.
    pub out: PathBuf,
    pub allow_remote: bool,
    /// The server process to sample CPU and RSS from; found from the target's port when it
    /// is local.
    pub pid: Option<u32>,
    /// Operations in flight at most; past it an operation is counted as `dropped`, and the
    /// report says the generator, not the server, was the limit.
    pub max_in_flight: usize,
    /// Instead of the scenario's stages, raise the rate step by step until the pipeline
    /// breaks, and report the highest rate it sustained and what broke.
    pub find_capacity: Option<Search>,
    /// After the load, measure the generator against wrk on an item read (when the mix reads
    /// items): [`reference`].
    pub reference: bool,
}

/// How `--find-capacity` raises the rate.
#[derive(Debug, Clone)]
pub struct Search {
    /// The first step's rate, in operations per second.
    pub from: f64,
    /// Each step's rate is the last one's times this.
    pub factor: f64,
    pub step: Duration,
    pub max_steps: usize,
    /// A step holds while the p99 of all its operations (after its first second) is under
    /// this.
    pub p99: Duration,
}

impl Search {
    /// # Errors
    /// A search that cannot run or is past the bounds every run keeps, named.
    pub fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.from.is_finite() && self.from > 0.0,
            "--from must be a rate above 0"
        );
        anyhow::ensure!(
            self.factor.is_finite() && self.factor > 1.0,
            "--factor must be above 1, or the rate never rises"
        );
        anyhow::ensure!(
            self.step >= Duration::from_secs(2),
            "--step must be 2s or more: each step is judged after its first second"
        );
        anyhow::ensure!(
            (1..=1000).contains(&self.max_steps),
            "--max-steps must be between 1 and 1000"
        );
        anyhow::ensure!(
            self.step <= MAX_DURATION,
            "--step must be at most {MAX_DURATION:?}"
        );
        anyhow::ensure!(
            !self.p99.is_zero(),
            "--p99 must be above 0: no step holds a p99 of 0"
        );
        let total = (self.step + Duration::from_secs(1)) * self.max_steps as u32;
        anyhow::ensure!(
            total <= MAX_DURATION,
            "--step × --max-steps runs up to {total:?}, over the bound of {MAX_DURATION:?}"
        );
        let last = self.from * self.factor.powi(self.max_steps as i32 - 1);
        anyhow::ensure!(
            last * self.step.as_secs_f64() <= MAX_OPERATIONS,
            "the last step would offer {last:.0}/s, over the bound of {MAX_OPERATIONS} \
             operations; lower --from, --factor or --max-steps"
        );
        Ok(())
    }
}

/// Latency histograms in microseconds, 1 µs to 1 hour, 3 significant digits.
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds")
}

/// The per-second histograms the charts and `--find-capacity` read: 2 significant digits up
/// to a minute (longer is recorded as a minute), about 20 KB each instead of 270 KB, so an
/// hour's run keeps about 150 MB of them rather than 2 GB.
fn second_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 2).expect("valid bounds")
}

/// What one second of the run saw.
#[derive(Default)]
struct Second {
    offered: u64,
    completed: u64,
    errors: u64,
    /// Of the errors, answers 429: the server's per-key rate limit, not its capacity.
    rate_limited: u64,
    /// Of the errors, other 4xx answers (a wrong key, a bad request): the client's doing.
    client_errors: u64,
    /// Of the errors, operations the generator's in-flight bound kept from starting.
    dropped: u64,
    /// Of the errors, operations that found no server: refused or broken connections.
    unreachable: u64,
    latency: Option<Histogram<u64>>,
    processed: Option<Histogram<u64>>,
}

#[derive(Default)]
struct OpStats {
    latency: Option<Histogram<u64>>,
    ok: u64,
    errors: BTreeMap<String, u64>,
}

#[derive(Default)]
struct Recorder {
    ops: BTreeMap<Op, OpStats>,
    processed: Option<Histogram<u64>>,
    seconds: Vec<Second>,
    dropped: u64,
    /// Operations the generator started more than 50 ms after their intended time, and the
    /// latest of them.
    late: u64,
    latest: Duration,
    /// Uploads that ended `failed`, and uploads still pending a minute after their 202.
    processing_failed: u64,
    unmeasured: u64,
    /// Requests the generator made to follow uploads to their outcome, outside the mix.
    watch_requests: u64,
}

impl Recorder {
    fn second(&mut self, at: Duration) -> &mut Second {
        let i = at.as_secs() as usize;
        if self.seconds.len() <= i {
            self.seconds.resize_with(i + 1, Second::default);
        }
        &mut self.seconds[i]
    }

    fn offered(&mut self, at: Duration) {
        self.second(at).offered += 1;
    }

    /// An operation that ended `latency` after its intended start, which was `at` into the
    /// run; `error` names its failure (`503`, `timeout`, `dropped`).
    fn finished(&mut self, op: Op, at: Duration, latency: Duration, error: Option<String>) {
        let us = (latency.as_micros() as u64).clamp(1, 3_600_000_000);
        let stats = self.ops.entry(op).or_default();
        match error {
            None => {
                stats.ok += 1;
                stats
                    .latency
                    .get_or_insert_with(histogram)
                    .saturating_record(us);
                let second = self.second(at + latency);
                second.completed += 1;
                second
                    .latency
                    .get_or_insert_with(second_histogram)
                    .saturating_record(us);
            }
            Some(kind) => {
                let limited = kind == "429";
                let dropped = kind == "dropped";
                let client = kind.starts_with('4') && !limited;
                let unreachable = kind == "connect" || kind == "transport";
                *stats.errors.entry(kind).or_default() += 1;
                // Counted against the second it was offered in, so a step is judged by what
                // it offered however late the failure comes (a broker lost in a step's last
                // second fails its uploads seconds later).
                let second = self.second(at);
                second.errors += 1;
                second.rate_limited += u64::from(limited);
                second.dropped += u64::from(dropped);
                second.client_errors += u64::from(client);
                second.unreachable += u64::from(unreachable);
            }
        }
    }

    fn processed(&mut self, at: Duration, latency: Duration) {
        let us = (latency.as_micros() as u64).clamp(1, 3_600_000_000);
        self.processed
            .get_or_insert_with(histogram)
            .saturating_record(us);
        self.second(at)
            .processed
            .get_or_insert_with(second_histogram)
            .saturating_record(us);
    }
}

/// What the seed uploads left to read.
struct Targets {
    ids: Vec<String>,
    thumbs: Vec<String>,
    owner: String,
    cursor: Mutex<Option<String>>,
}

struct Run {
    client: reqwest::Client,
    /// Where uploads and events go.
    base: String,
    /// Where reads go.
    read_base: String,
    key: String,
    service_key: Option<String>,
    photos: Vec<Vec<u8>>,
    targets: Targets,
    recorder: Mutex<Recorder>,
    started: Instant,
    /// The tasks following uploads to their outcome, on the runtime of `loadtest` itself (the
    /// generator's threads may stop first), as `handle` names it.
    watchers: Mutex<tokio::task::JoinSet<()>>,
    handle: tokio::runtime::Handle,
}

/// The HTTP client of the run, and of each generator thread: at most `max_in_flight`
/// connections kept, a 30 s timeout, no proxy lookup per request, and HTTP/1.1 as the edge
/// speaks it.
fn http_client(max_in_flight: usize) -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(max_in_flight)
        .no_proxy()
        .http1_only()
        .build()
}

/// Whether `url` names this machine: `localhost` or a loopback address.
fn is_local(url: &reqwest::Url) -> bool {
    url.host_str().is_some_and(|host| {
        host == "localhost"
            || host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    })
}

/// Runs the scenario and writes the reports, and returns the report; [`report::Report::passed`]
/// says whether every threshold held.
///
/// # Errors
/// A scenario that does not parse, a target that is not loopback without `allow_remote`, a
/// run past the guardrails, or a server that refuses the seed uploads.
pub async fn run(options: Options) -> anyhow::Result<report::Report> {
    let text = std::fs::read_to_string(&options.scenario)
        .with_context(|| format!("failed to read {}", options.scenario.display()))?;
    let scenario = Scenario::parse(&text)
        .map_err(|e| anyhow::anyhow!("{}: {e}", options.scenario.display()))?;
    let base = options.target.trim_end_matches('/').to_owned();
    let url = reqwest::Url::parse(&base).with_context(|| format!("--target {base:?}"))?;
    let local = is_local(&url);
    let read_base = options
        .read_target
        .as_deref()
        .map_or(base.as_str(), |r| r.trim_end_matches('/'))
        .to_owned();
    for (flag, target) in [("--target", &base), ("--read-target", &read_base)]
        .into_iter()
        .chain(options.metrics.iter().map(|m| ("--metrics", m)))
    {
        let url = reqwest::Url::parse(target).with_context(|| format!("{flag} {target:?}"))?;
        anyhow::ensure!(
            is_local(&url) || options.allow_remote,
            "{flag} {target} is not on this machine; load a remote deployment only on \
             purpose, with --allow-remote"
        );
    }
    let duration = scenario.duration();
    anyhow::ensure!(
        duration <= MAX_DURATION,
        "the scenario runs {duration:?}, over the bound of {MAX_DURATION:?}"
    );
    // Integrated at 10 ms, so a short spike is not missed between whole seconds.
    let expected: f64 = (0..(duration.as_millis() / 10).max(1) as u64)
        .map(|i| scenario.rate(Duration::from_millis(i * 10)) * 0.01)
        .sum();
    anyhow::ensure!(
        expected <= MAX_OPERATIONS,
        "the scenario offers about {expected:.0} operations, over the bound of {MAX_OPERATIONS}"
    );
    anyhow::ensure!(
        scenario.mix.post_events == 0 || options.service_key.is_some(),
        "post_events needs a service key: --service-key"
    );
    anyhow::ensure!(
        (1..=MAX_IN_FLIGHT).contains(&options.max_in_flight),
        "--max-in-flight must be between 1 and {MAX_IN_FLIGHT}"
    );
    if let Some(search) = &options.find_capacity {
        search.check()?;
    } else {
        anyhow::ensure!(
            expected >= 1.0,
            "the scenario offers no operations: its stages have no length or no rate"
        );
    }
    let reference = options.reference && scenario.mix.read_item > 0;
    anyhow::ensure!(
        !reference || reference::wrk_found(),
        "wrk is not on the PATH: the run measures the generator against it on item reads. \
         Install Debian's wrk (scripts/deps --test does), or pass --no-reference"
    );
    if let Some(pid) = options.pid {
        anyhow::ensure!(
            Path::new(&format!("/proc/{pid}")).exists(),
            "--pid {pid}: no such process"
        );
    }
    // Where the reports go is checked before the run, not after it.
    std::fs::create_dir_all(&options.out)
        .and_then(|()| std::fs::write(options.out.join(".write-check"), b""))
        .and_then(|()| std::fs::remove_file(options.out.join(".write-check")))
        .with_context(|| {
            format!(
                "--out {}: cannot write reports there",
                options.out.display()
            )
        })?;

    let scratch = tempfile::tempdir()?;
    let photos = crate::photos::make_photos(
        &scratch.path().join("photos"),
        scenario.photos.count.max(1),
        &scenario.photos.size,
    )?
    .iter()
    .map(std::fs::read)
    .collect::<Result<Vec<_>, _>>()?;
    let client = http_client(options.max_in_flight)?;
    if scenario.mix.post_events > 0 {
        // An empty event is refused for what it is (400s) by a key that may post, and for
        // the key (401, 403) by one that may not: checked before the run, not found after.
        let status = client
            .post(format!("{base}/v1/events"))
            .bearer_auth(options.service_key.as_deref().unwrap_or_default())
            .json(&serde_json::json!({}))
            .send()
            .await
            .with_context(|| format!("--target {base} did not answer"))?
            .status();
        anyhow::ensure!(
            status != 401 && status != 403,
            "--service-key was refused ({status}) by {base}/v1/events: post_events needs a \
             service key the target knows"
        );
    }
    let targets = seed(&client, &base, &read_base, &options.key, &photos)
        .await
        .with_context(|| {
            if read_base == base {
                format!("the target {base} did not take the seed uploads")
            } else {
                format!("the seed uploads to {base}, read back from {read_base}, failed")
            }
        })?;
    let processes = if options.processes.is_empty() {
        options
            .pid
            .or_else(|| {
                local
                    .then(|| url.port_or_known_default())
                    .flatten()
                    .and_then(report::pid_listening_on)
            })
            .map(|pid| ("server".to_owned(), pid))
            .into_iter()
            .collect()
    } else {
        options.processes.clone()
    };
    let mut metrics = vec![format!("{base}/metrics")];
    metrics.extend(
        options
            .metrics
            .iter()
            .map(|m| m.trim_end_matches('/').to_owned()),
    );
    let run = Arc::new(Run {
        client,
        base,
        read_base,
        key: options.key.clone(),
        service_key: options.service_key.clone(),
        photos,
        targets,
        recorder: Mutex::new(Recorder::default()),
        started: Instant::now(),
        watchers: Mutex::new(tokio::task::JoinSet::new()),
        handle: tokio::runtime::Handle::current(),
    });

    let samples = Arc::new(Mutex::new(report::Samples::default()));
    let sampling = tokio::spawn(report::sample(
        run.client.clone(),
        metrics,
        processes.clone(),
        run.started,
        samples.clone(),
    ));
    let bar = indicatif::ProgressBar::new(duration.as_secs().max(1));
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} s")
            .expect("valid template"),
    );
    // As many connections as operations in flight: the run's reads wait for none.
    let generator =
        generator::Generator::start(&run, options.max_in_flight, options.max_in_flight, || {
            http_client(options.max_in_flight)
        })?;
    let scenario = Arc::new(scenario);
    let capacity = match &options.find_capacity {
        None => {
            let stages = scenario.clone();
            let rate = Arc::new(move |at: Duration| stages.rate(at));
            generator
                .drive(&scenario, rate, Duration::ZERO, duration, &bar)
                .await?;
            None
        }
        Some(search) => {
            Some(find_capacity(&run, &generator, &scenario, search, &bar, &samples).await?)
        }
    };
    if let Some(found) = &capacity
        && found.sustainable_rate.is_none()
    {
        eprintln!(
            "find-capacity: not even the first step held ({}); lower --from",
            found.bottleneck.as_deref().unwrap_or("?")
        );
    }
    // The load offered ran for the schedule's length, whenever its last operation started.
    let driven = match (&options.find_capacity, &capacity) {
        (Some(search), Some(found)) => {
            (search.step + Duration::from_secs(1)) * found.steps.len() as u32
        }
        _ => duration,
    };
    bar.set_message("draining");
    generator.drain(Duration::from_secs(60)).await;
    drop(generator);
    // Every upload is followed to its outcome (at most a minute after its 202); one still
    // pending then is counted as unmeasured, and fails a `processed` threshold.
    bar.set_message("waiting for uploads to be processed");
    let mut watchers = std::mem::take(&mut *run.watchers.lock().unwrap());
    while watchers.join_next().await.is_some() {}
    bar.finish_and_clear();
    // A few seconds more of lag and CPU, to see the pipeline settle.
    tokio::time::sleep(Duration::from_secs(3)).await;
    sampling.abort();
    let reference = if reference {
        let bar = indicatif::ProgressBar::new_spinner();
        bar.set_message(format!(
            "the generator against wrk on an item read, {} s each",
            reference::SECONDS
        ));
        bar.enable_steady_tick(Duration::from_millis(200));
        // The reference loads the read target: that is the server its CPUs are split with.
        let server = if run.read_base == run.base {
            match processes.as_slice() {
                [(_, pid)] => Some(*pid),
                _ => None,
            }
        } else {
            reqwest::Url::parse(&run.read_base)
                .ok()
                .filter(is_local)
                .and_then(|url| url.port_or_known_default())
                .and_then(report::pid_listening_on)
        };
        let compared = reference::compare(&run, options.max_in_flight, server).await;
        bar.finish_and_clear();
        // A reference that fails costs the reference, not the run's report.
        compared
            .inspect_err(|e| eprintln!("warning: the reference run (wrk) failed: {e:#}"))
            .ok()
    } else {
        None
    };

    let samples = samples.lock().unwrap().clone();
    let recorder = run.recorder.lock().unwrap();
    let mut report = report::Report::new(&scenario, driven, &run.base, &recorder, samples);
    if capacity.is_some() && !report.thresholds.is_empty() {
        // The search runs until a step breaks them, so over the whole run they would fail by
        // design: each step is judged instead.
        println!(
            "the scenario's thresholds are not judged under --find-capacity: each step is \
             judged instead (--p99, errors, achieved rate, lag)"
        );
        report.thresholds.clear();
    }
    report.capacity = capacity;
    report.reference = reference.map(|mut r| {
        r.against_run(report.seconds.iter().map(|s| s.offered).max().unwrap_or(0) as f64);
        r
    });
    let json = options.out.join("report.json");
    let html = options.out.join("report.html");
    // Made again if it went away during the run: the run's results are worth keeping.
    std::fs::create_dir_all(&options.out)
        .and_then(|()| std::fs::write(&json, serde_json::to_vec_pretty(&report)?))
        .and_then(|()| std::fs::write(&html, report::html(&report)))
        .with_context(|| format!("failed to write the reports in {}", options.out.display()))?;
    report.print();
    println!("report: {} and {}", html.display(), json.display());
    for f in report.thresholds.iter().filter(|t| !t.passed) {
        eprintln!("threshold failed: {} ({})", f.rule, f.observed);
    }
    drop(recorder);
    Ok(report)
}

/// Raises the rate step by step (the scenario's mix, constant within a step) until a step
/// breaks: an operation's p99 over the bound, 1 % or more errors, under 90 % of the offered
/// rate achieved, or a consumer group's lag growing through the step. Returns every step and
/// the verdict.
///
/// # Errors
/// A generator thread that died.
async fn find_capacity(
    run: &Arc<Run>,
    generator: &generator::Generator,
    scenario: &Arc<Scenario>,
    search: &Search,
    bar: &indicatif::ProgressBar,
    samples: &Arc<Mutex<report::Samples>>,
) -> anyhow::Result<report::CapacityReport> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut steps = Vec::new();
    let mut rate = search.from.max(0.1);
    let mut offset = Duration::ZERO;
    for _ in 0..search.max_steps.max(1) {
        let constant = Arc::new(move |_: Duration| rate);
        generator
            .drive(scenario, constant, offset, search.step, bar)
            .await?;
        // One more second for the step's last operations and the samplers.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let step = {
            let recorder = run.recorder.lock().unwrap();
            let samples = samples.lock().unwrap();
            report::judge_step(rate, offset, search, &recorder, &samples, cores)
        };
        // A line per step as it is judged: progress for whoever watches, and the event a
        // script (or a test) waits for.
        bar.suspend(|| match &step.broke {
            None => println!("step {}: {rate:.1} operations/s held", steps.len() + 1),
            Some(why) => println!(
                "step {}: {rate:.1} operations/s broke: {why}",
                steps.len() + 1
            ),
        });
        let broke = step.broke.is_some();
        steps.push(step);
        if broke {
            break;
        }
        offset += search.step + Duration::from_secs(1);
        rate *= search.factor.max(1.01);
    }
    Ok(report::CapacityReport::new(steps, cores))
}

/// Uploads the photos once and waits for them, so that reads have items, a timeline and
/// thumbnails to fetch.
async fn seed(
    client: &reqwest::Client,
    base: &str,
    read_base: &str,
    key: &str,
    photos: &[Vec<u8>],
) -> anyhow::Result<Targets> {
    let mut ids = Vec::new();
    for photo in photos {
        let (status, body) = upload(client, base, key, photo.clone()).await?;
        anyhow::ensure!(
            status == 202,
            "the seed upload was refused ({status}): {body}"
        );
        ids.push(body["id"].as_str().unwrap_or_default().to_owned());
    }
    let (mut thumbs, mut owner) = (Vec::new(), String::new());
    for id in &ids {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let response = client
                .get(format!("{read_base}/v1/media/{id}"))
                .bearer_auth(key)
                .send()
                .await?;
            let status = response.status();
            // A Conveyor query edge answers JSON, a 404 too (the item not projected yet).
            let body: Value = response.json().await.map_err(|_| {
                anyhow::anyhow!(
                    "{read_base} answered {status} to GET /v1/media/{id}, not JSON: is it a \
                     Conveyor query edge (--read-target, or --target)?"
                )
            })?;
            if body["status"] == "processed" {
                owner = body["owner"].as_str().unwrap_or_default().to_owned();
                if let Some(url) = body["variants"]["thumb"]["url"].as_str() {
                    thumbs.push(url.to_owned());
                }
                break;
            }
            anyhow::ensure!(
                body["status"] != "failed" && Instant::now() < deadline,
                "a seed photo was not processed: {body}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(Targets {
        ids,
        thumbs,
        owner,
        cursor: Mutex::new(None),
    })
}

/// Bytes after a JPEG's end are ignored by decoders, and make each upload its own item.
fn made_unique(mut photo: Vec<u8>) -> Vec<u8> {
    photo.extend_from_slice(&rand::random::<u64>().to_le_bytes());
    photo
}

/// The direct upload: create it, send the bytes to the URL it names with the headers it
/// names, complete it. Returns the first status that is not a success (with its body), or the
/// completion's 202 and body, which has the media `id` like the streamed upload's.
async fn upload_direct(
    client: &reqwest::Client,
    base: &str,
    key: &str,
    photo: Vec<u8>,
) -> anyhow::Result<(u16, Value)> {
    let photo = made_unique(photo);
    let response = client
        .post(format!("{base}/v1/uploads"))
        .bearer_auth(key)
        .json(&serde_json::json!({"content_type": "image/jpeg", "bytes": photo.len()}))
        .send()
        .await?;
    let status = response.status().as_u16();
    let created: Value = response.json().await.unwrap_or_default();
    if status != 201 && status != 200 {
        return Ok((status, created));
    }
    let url = created["url"].as_str().unwrap_or_default();
    let url = if url.starts_with('/') {
        format!("{base}{url}")
    } else {
        url.to_owned()
    };
    let mut put = client.put(url).body(photo);
    if let Some(headers) = created["headers"].as_object() {
        for (name, value) in headers {
            put = put.header(name.as_str(), value.as_str().unwrap_or_default());
        }
    }
    let response = put.send().await?;
    let status = response.status().as_u16();
    if !response.status().is_success() {
        return Ok((status, response.json().await.unwrap_or_default()));
    }
    let complete = created["complete"].as_str().unwrap_or_default();
    let response = client
        .post(format!("{base}{complete}"))
        .bearer_auth(key)
        .send()
        .await?;
    let status = response.status().as_u16();
    Ok((status, response.json().await.unwrap_or_default()))
}

async fn upload(
    client: &reqwest::Client,
    base: &str,
    key: &str,
    photo: Vec<u8>,
) -> anyhow::Result<(u16, Value)> {
    let photo = made_unique(photo);
    let form = reqwest::multipart::Form::new().part(
        "file",
        reqwest::multipart::Part::bytes(photo).file_name("photo.jpg"),
    );
    let response = client
        .post(format!("{base}/v1/media"))
        .bearer_auth(key)
        .multipart(form)
        .send()
        .await?;
    let status = response.status().as_u16();
    Ok((status, response.json().await.unwrap_or_default()))
}

/// How one generator thread makes its requests: reqwest for uploads, events and any URL off
/// the read target, and its own connections for reads from the read target, where the rates
/// are high.
struct Http {
    client: reqwest::Client,
    reads: Option<connections::Connections>,
}

/// How a reqwest request failed, as the report names it.
fn failure(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timeout".to_owned()
    } else if e.is_connect() {
        "connect".to_owned()
    } else {
        "transport".to_owned()
    }
}

impl Run {
    fn pick<'a>(&self, from: &'a [String]) -> Option<&'a String> {
        (!from.is_empty()).then(|| &from[rand::random_range(0..from.len())])
    }

    fn url(&self, path: &str) -> String {
        if path.starts_with('/') {
            format!("{}{path}", self.read_base)
        } else {
            path.to_owned()
        }
    }

    /// GETs `path` (a path on the read target, or a whole URL), with the run's client key when
    /// `keyed` and the run has one, and reads the whole body. `Err` names how it failed.
    async fn read(&self, http: &Http, path: &str, keyed: bool) -> Result<bytes::Bytes, String> {
        let key = if keyed { self.key.as_str() } else { "" };
        let Some(reads) = http.reads.as_ref().filter(|_| path.starts_with('/')) else {
            return self.fetch(http, &self.url(path), key).await;
        };
        match reads.get(path, key).await? {
            connections::Answer::Body(body) => Ok(body),
            // Followed through reqwest, which follows any further redirect; the key goes only
            // to the read target itself, as reqwest's own policy would have it.
            connections::Answer::Redirect(location) => {
                let asked = reqwest::Url::parse(&self.url(path)).map_err(|_| "transport")?;
                let url = asked
                    .join(&location)
                    .map_err(|_| "invalid redirect".to_owned())?;
                let key = if url.origin() == asked.origin() {
                    key
                } else {
                    ""
                };
                self.fetch(http, url.as_str(), key).await
            }
        }
    }

    /// GETs `url` through reqwest (which follows redirects), with `key` unless it is empty,
    /// and reads the whole body.
    async fn fetch(&self, http: &Http, url: &str, key: &str) -> Result<bytes::Bytes, String> {
        let mut request = http.client.get(url);
        if !key.is_empty() {
            request = request.bearer_auth(key);
        }
        let response = request.send().await.map_err(|e| failure(&e))?;
        let status = response.status();
        if !status.is_success() {
            return Err(status.as_u16().to_string());
        }
        response.bytes().await.map_err(|e| failure(&e))
    }

    /// One operation; `Err` names how it failed (the status, or `timeout`, `connect`,
    /// `transport`, `invalid JSON`).
    async fn operation(self: &Arc<Self>, http: &Http, op: Op) -> Result<(), String> {
        match op {
            Op::UploadPhoto | Op::UploadDirect => {
                let photo = self.photos[rand::random_range(0..self.photos.len())].clone();
                let sent = if op == Op::UploadDirect {
                    upload_direct(&http.client, &self.base, &self.key, photo).await
                } else {
                    upload(&http.client, &self.base, &self.key, photo).await
                };
                let (status, body) = sent.map_err(|e| match e.downcast::<reqwest::Error>() {
                    Ok(e) => failure(&e),
                    Err(_) => "transport".to_owned(),
                })?;
                if status != 202 {
                    return Err(status.to_string());
                }
                let accepted = self.started.elapsed();
                let id = body["id"].as_str().unwrap_or_default().to_owned();
                let run = self.clone();
                self.watchers.lock().unwrap().spawn_on(
                    async move { run.watch_processed(id, accepted).await },
                    &self.handle,
                );
                Ok(())
            }
            Op::ReadItem => {
                let id = self.pick(&self.targets.ids).ok_or("no items")?;
                self.read(http, &format!("/v1/media/{id}"), true)
                    .await
                    .map(drop)
            }
            Op::ReadTimeline => {
                let cursor = self.targets.cursor.lock().unwrap().take();
                let mut path = format!("/v1/owners/{}/media?limit=20", self.targets.owner);
                if let Some(cursor) = &cursor {
                    path.push_str(&format!("&cursor={cursor}"));
                }
                let page: Value = serde_json::from_slice(&self.read(http, &path, true).await?)
                    .map_err(|_| "invalid JSON".to_owned())?;
                // The next timeline read follows this page's cursor; the one after starts over.
                if cursor.is_none()
                    && let Some(next) = page["next_cursor"].as_str()
                {
                    *self.targets.cursor.lock().unwrap() = Some(next.to_owned());
                }
                Ok(())
            }
            Op::FetchThumbnail => {
                let url = self.pick(&self.targets.thumbs).ok_or("no thumbnails")?;
                self.read(http, url, false).await.map(drop)
            }
            Op::PostEvents => {
                let id = self.pick(&self.targets.ids).ok_or("no items")?;
                let key = self.service_key.as_deref().unwrap_or_default();
                let event = serde_json::json!({
                    "aggregate_id": id,
                    "payload": {"MediaDescribed": {
                        "title": format!("load {}", rand::random::<u32>()),
                        "description": null,
                        "tags": ["loadtest"],
                    }},
                });
                let status = http
                    .client
                    .post(format!("{}/v1/events", self.base))
                    .bearer_auth(key)
                    .json(&event)
                    .send()
                    .await
                    .map_err(|e| failure(&e))?
                    .status();
                if status.is_success() {
                    Ok(())
                } else {
                    Err(status.as_u16().to_string())
                }
            }
        }
    }

    /// Polls an upload until it is processed (at most a minute), and records the time from
    /// its 202. Polls start 20 ms apart and back off to 500 ms, so a backlog of uploads does
    /// not become a flood of reads; every poll is counted in the report.
    async fn watch_processed(self: Arc<Self>, id: String, accepted: Duration) {
        let url = format!("{}/v1/media/{id}", self.read_base);
        let deadline = accepted + Duration::from_secs(60);
        let mut pause = Duration::from_millis(20);
        while self.started.elapsed() < deadline {
            self.recorder.lock().unwrap().watch_requests += 1;
            // Without the key: uploads are public, and a keyless read is not counted against
            // the key's rate limit, which the generator's own polling would otherwise spend.
            let body: Value = match self.client.get(&url).send().await {
                Ok(r) => r.json().await.unwrap_or_default(),
                Err(_) => Value::Null,
            };
            if body["status"] == "processed" {
                let latency = self.started.elapsed().saturating_sub(accepted);
                self.recorder.lock().unwrap().processed(accepted, latency);
                return;
            }
            if body["status"] == "failed" {
                self.recorder.lock().unwrap().processing_failed += 1;
                return;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(500));
        }
        self.recorder.lock().unwrap().unmeasured += 1;
    }
}
