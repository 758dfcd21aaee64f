//! The generator's own ceiling, measured beside every run that reads: wrk (Debian's `wrk`, a
//! load tool in C) drives one item read as hard as it can, then the generator offers the same
//! read at the rate wrk reached. When the generator achieves what wrk did (within 10 %), the
//! figures of the run were not limited by the generator; when it does not, the report says so.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;

use super::generator::Generator;
use super::{Recorder, Run, Scenario, Targets};

/// How long each side of the comparison drives the endpoint.
pub const SECONDS: u64 = 5;
/// wrk's connections (`-c`), as `scripts/bench-reads` runs it; its threads (`-t`) are the
/// generator's, one per CPU the load tools may use.
const CONNECTIONS: usize = 64;
/// The generator agrees with wrk when it achieves at least this share of wrk's rate.
pub const AGREEMENT: f64 = 0.9;

/// The comparison, as it goes into the report.
#[derive(Debug, Clone, Serialize)]
pub struct ReferenceReport {
    /// The command wrk ran (without the key).
    pub tool: String,
    /// What both drove: `GET /v1/media/{id}` of one seed item, without a key (the item is
    /// public, and a key's rate limit would be all both measured).
    pub endpoint: String,
    /// wrk's successful requests per second (2xx and 3xx; its other answers are
    /// `reference_errors`, and are left out).
    pub reference_per_sec: f64,
    /// wrk's latency percentiles, in ms. wrk is a closed loop: each connection waits for its
    /// answer, so these leave out queueing the generator's open model counts.
    pub reference_p50_ms: f64,
    pub reference_p99_ms: f64,
    pub reference_errors: u64,
    /// wrk's threads (`-t`), and the generator's: one per CPU the tools were given.
    pub reference_threads: usize,
    pub generator_threads: usize,
    /// The generator, offering the same read at `reference_per_sec` for as long.
    pub generator_offered_per_sec: f64,
    /// Completed without error per second, after the first second.
    pub generator_achieved_per_sec: f64,
    pub generator_p50_ms: f64,
    pub generator_p99_ms: f64,
    /// Failed answers (status, timeout, connection), not counting `generator_dropped`.
    pub generator_errors: u64,
    /// Reads not started because `--max-in-flight` were already waiting: the server (or the
    /// generator) fell behind the offered rate.
    pub generator_dropped: u64,
    /// `generator_achieved_per_sec / reference_per_sec`.
    pub ratio: f64,
    /// Whether the ratio is 0.9 or more.
    pub agree: bool,
    /// How the CPUs were shared, when they were split: the server on some, the load tool
    /// (wrk, then the generator) on the others, so neither tool's cost is taken from the
    /// server and the comparison is of the tools alone.
    pub pinned: Option<String>,
    /// The most operations the run itself offered in one second (all operations of its mix).
    pub run_peak_offered_per_sec: f64,
    /// Whether the generator may have limited the run: it fell short of wrk, and the run
    /// offered 90 % or more of what the generator achieved here.
    pub generator_was_limit: bool,
}

impl ReferenceReport {
    /// Sets what the run offered at its peak, and whether the generator may have limited it.
    pub fn against_run(&mut self, peak_offered_per_sec: f64) {
        self.run_peak_offered_per_sec = peak_offered_per_sec;
        self.generator_was_limit =
            !self.agree && peak_offered_per_sec >= AGREEMENT * self.generator_achieved_per_sec;
    }

    /// One line: both rates, the ratio, and what it means for the run.
    pub fn summary(&self) -> String {
        let verdict = if self.agree {
            "they agree within 10 %: the generator is not the limit up to that rate".to_owned()
        } else {
            format!(
                "the generator fell more than 10 % short of wrk ({}), so about {:.0}/s is its \
                 own ceiling here",
                if self.pinned.is_some() {
                    "on the same CPU, its requests cost more than wrk's"
                } else {
                    "its requests cost more CPU than wrk's, on the cores the server uses too"
                },
                self.generator_achieved_per_sec
            )
        };
        let run = if self.generator_was_limit {
            format!(
                "; the run offered up to {:.0}/s, close to that ceiling: the generator may have \
                 been the limit, so read its highest rates as a floor of the server's",
                self.run_peak_offered_per_sec
            )
        } else {
            format!(
                "; the run offered at most {:.0}/s, well under the generator's ceiling",
                self.run_peak_offered_per_sec
            )
        };
        format!(
            "reference on {}: wrk {:.0}/s, this generator {:.0}/s when offered that rate \
             ({:.0} %): {verdict}{run}",
            self.endpoint,
            self.reference_per_sec,
            self.generator_achieved_per_sec,
            self.ratio * 100.0,
        )
    }
}

/// Processes pinned to CPUs with util-linux's `taskset` for the comparison; their masks
/// before are restored when this is dropped.
struct Pinned {
    saved: Vec<(u32, String)>,
}

impl Pinned {
    /// Pins every thread of `pid` to `cpus` (a `taskset -c` list), keeping its mask.
    fn pin(&mut self, pid: u32, cpus: &str) -> bool {
        let taskset = |args: &[&str]| {
            std::process::Command::new("taskset")
                .args(args)
                .arg(pid.to_string())
                .stderr(std::process::Stdio::null())
                .output()
                .ok()
                .filter(|o| o.status.success())
        };
        // `pid 123's current affinity mask: 3`
        let Some(mask) = taskset(&["-p"]).and_then(|o| {
            Some(
                String::from_utf8_lossy(&o.stdout)
                    .rsplit(':')
                    .next()?
                    .trim()
                    .to_owned(),
            )
        }) else {
            return false;
        };
        if taskset(&["-a", "-p", "-c", cpus]).is_none() {
            return false;
        }
        self.saved.push((pid, mask));
        true
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        for (pid, mask) in self.saved.drain(..) {
            let _ = std::process::Command::new("taskset")
                .args(["-a", "-p", &mask, &pid.to_string()])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

/// Whether wrk can be run here, for a check before the load starts.
pub fn wrk_found() -> bool {
    std::process::Command::new("wrk")
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok()
}

/// What wrk printed: requests per second, latency percentiles in ms, and answers other than
/// 2xx/3xx.
#[derive(Debug, Clone, PartialEq)]
pub struct WrkOutput {
    /// Successful (2xx and 3xx) requests per second.
    pub per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub non_2xx: u64,
}

/// Reads wrk 4's `--latency` output (its `Latency Distribution`, `N requests in Ts`, and
/// `Non-2xx or 3xx responses` lines). `None` when a line it needs is missing.
pub fn parse_wrk(output: &str) -> Option<WrkOutput> {
    let ms = |text: &str| -> Option<f64> {
        let text = text.trim();
        let split = text.find(|c: char| c.is_ascii_alphabetic())?;
        let (value, unit) = text.split_at(split);
        let value: f64 = value.parse().ok()?;
        Some(match unit {
            "us" => value / 1000.0,
            "ms" => value,
            "s" => value * 1000.0,
            "m" => value * 60_000.0,
            _ => return None,
        })
    };
    let field = |prefix: &str| {
        output
            .lines()
            .find_map(|line| line.trim().strip_prefix(prefix).map(str::trim))
    };
    let (requests, secs) = output.lines().find_map(|line| {
        let (requests, rest) = line.trim().split_once(" requests in ")?;
        let secs = ms(rest.split(',').next()?)? / 1000.0;
        Some((requests.parse::<u64>().ok()?, secs))
    })?;
    let non_2xx = field("Non-2xx or 3xx responses:").map_or(Some(0), |n| n.parse().ok())?;
    Some(WrkOutput {
        per_sec: requests.saturating_sub(non_2xx) as f64 / secs.max(1e-9),
        p50_ms: ms(field("50%")?)?,
        p99_ms: ms(field("99%")?)?,
        non_2xx,
    })
}

/// Runs the comparison against `run`'s target, on its first seed item.
///
/// # Errors
/// wrk that does not run or prints nothing readable, or no seed item to read.
///
/// With the server's `server_pid` known and two CPUs or more, the server is pinned to all but
/// the first CPU and the load tools (this process, and wrk) to the first, for the comparison
/// only: on a shared machine each tool would otherwise take its own cost from the server, and
/// the comparison would measure how much CPU each tool leaves the server rather than whether
/// the generator keeps up.
pub(super) async fn compare(
    run: &Arc<Run>,
    max_in_flight: usize,
    server_pid: Option<u32>,
) -> anyhow::Result<ReferenceReport> {
    let id = run
        .targets
        .ids
        .first()
        .context("no seed item to read")?
        .clone();
    let url = format!("{}/v1/media/{id}", run.read_base);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut pinned = Pinned { saved: Vec::new() };
    let split = match server_pid {
        Some(server) if cpus >= 2 => {
            let server_cpus = if cpus == 2 {
                "1".to_owned()
            } else {
                format!("1-{}", cpus - 1)
            };
            (pinned.pin(server, &server_cpus) && pinned.pin(std::process::id(), "0")).then(|| {
                format!(
                    "the server on CPU {server_cpus}, wrk and then this generator on CPU 0 \
                     (taskset), restored after"
                )
            })
        }
        _ => None,
    };
    if split.is_none() {
        // Half pinned is worse than not at all.
        drop(pinned);
        pinned = Pinned { saved: Vec::new() };
    }
    // As many threads as the generator will have: one per CPU the tools may use.
    let threads = if split.is_some() { 1 } else { cpus };
    let connections = CONNECTIONS.max(threads);
    let args = [
        format!("-t{threads}"),
        format!("-c{connections}"),
        format!("-d{SECONDS}s"),
        "--latency".to_owned(),
    ];
    let mut wrk_command = if split.is_some() {
        let mut c = tokio::process::Command::new("taskset");
        c.args(["-c", "0", "wrk"]);
        c
    } else {
        tokio::process::Command::new("wrk")
    };
    let out = wrk_command
        .args(&args)
        .arg(&url)
        .kill_on_drop(true)
        .output()
        .await
        .context("wrk did not run (Debian's `wrk`: scripts/deps --test)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let wrk = parse_wrk(&text).with_context(|| {
        format!(
            "wrk's output was not readable ({}): {}{}",
            out.status,
            text.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        )
    })?;
    anyhow::ensure!(wrk.per_sec > 0.0, "wrk completed no requests:\n{text}");

    // The generator: the same read of the same item, offered at wrk's rate, open model.
    let generator = Arc::new(Run {
        client: run.client.clone(),
        base: run.base.clone(),
        read_base: run.read_base.clone(),
        key: String::new(),
        service_key: None,
        photos: Vec::new(),
        targets: Targets {
            ids: vec![id],
            thumbs: Vec::new(),
            owner: String::new(),
            cursor: Mutex::new(None),
        },
        recorder: Mutex::new(Recorder::default()),
        started: Instant::now(),
        watchers: Mutex::new(tokio::task::JoinSet::new()),
        handle: tokio::runtime::Handle::current(),
    });
    let reads = Arc::new(
        Scenario::parse(
            "[[stages]]\nkind = \"constant\"\nrate = 1\nduration = \"1s\"\n[mix]\nread_item = 1\n",
        )
        .expect("a valid scenario"),
    );
    // Started after the pinning, so its threads are as many as wrk's, one per CPU the tools
    // have, and with wrk's connections: the tools differ only in how they schedule requests.
    let engine = Generator::start(&generator, max_in_flight, connections, || {
        super::http_client(max_in_flight)
    })?;
    let generator_threads = engine.workers();
    let per_sec = wrk.per_sec;
    engine
        .drive(
            &reads,
            Arc::new(move |_: Duration| per_sec),
            Duration::ZERO,
            Duration::from_secs(SECONDS),
            &indicatif::ProgressBar::hidden(),
        )
        .await?;
    engine.drain(Duration::from_secs(30)).await;
    drop(engine);

    drop(pinned);
    let recorder = generator.recorder.lock().unwrap();
    // As `--find-capacity` judges a step: what finished after the first second, within the
    // window, so a backlog finishing late does not count as achieved.
    let window = recorder
        .seconds
        .get(1..(SECONDS as usize).min(recorder.seconds.len()))
        .unwrap_or(&[]);
    let completed: u64 = window.iter().map(|s| s.completed).sum();
    let achieved = completed as f64 / window.len().max(1) as f64;
    let stats = recorder.ops.get(&super::Op::ReadItem);
    let q = |p: f64| {
        stats
            .and_then(|s| s.latency.as_ref())
            .map_or(0.0, |h| h.value_at_quantile(p) as f64 / 1000.0)
    };
    let ratio = achieved / wrk.per_sec;
    Ok(ReferenceReport {
        tool: format!("wrk {} {url}", args.join(" ")),
        endpoint: "GET /v1/media/{id} (one public seed item, without a key)".to_owned(),
        reference_per_sec: wrk.per_sec,
        reference_p50_ms: wrk.p50_ms,
        reference_p99_ms: wrk.p99_ms,
        reference_errors: wrk.non_2xx,
        reference_threads: threads,
        generator_threads,
        generator_offered_per_sec: wrk.per_sec,
        generator_achieved_per_sec: achieved,
        generator_p50_ms: q(0.5),
        generator_p99_ms: q(0.99),
        generator_errors: stats.map_or(0, |s| {
            s.errors
                .iter()
                .filter(|(kind, _)| kind.as_str() != "dropped")
                .map(|(_, n)| n)
                .sum()
        }),
        generator_dropped: stats.map_or(0, |s| s.errors.get("dropped").copied().unwrap_or(0)),
        ratio,
        agree: ratio >= AGREEMENT,
        pinned: split,
        run_peak_offered_per_sec: 0.0,
        generator_was_limit: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_latency_output_is_read() {
        let out = "Running 5s test @ http://127.0.0.1:8080/v1/media/x
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     5.43ms    1.20ms  30.01ms   90.00%
    Req/Sec    11.80k     0.50k   12.40k    80.00%
  Latency Distribution
     50%  850.00us
     75%    5.60ms
     90%    6.30ms
     99%    1.02s
  58712 requests in 5.00s, 40.11MB read
  Non-2xx or 3xx responses: 12
Requests/sec:  11742.40
Transfer/sec:      8.02MB
";
        assert_eq!(
            parse_wrk(out),
            Some(WrkOutput {
                per_sec: (58712.0 - 12.0) / 5.0,
                p50_ms: 0.85,
                p99_ms: 1020.0,
                non_2xx: 12,
            })
        );
        let clean = out.replace("  Non-2xx or 3xx responses: 12\n", "");
        assert_eq!(parse_wrk(&clean).map(|w| w.non_2xx), Some(0));
        assert_eq!(
            parse_wrk("unable to connect to 127.0.0.1:1 Connection refused"),
            None
        );
    }
}
