//! The report of a `loadtest run`: what was measured, as JSON, and as one HTML file with
//! inline SVG charts (drawn with `plotters`) that needs no network to view.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

use super::{Recorder, Scenario, Threshold};

/// What the samplers saw, once a second.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Samples {
    /// Seconds into the run.
    pub at: Vec<f64>,
    /// Per consumer group: its total lag (records) at each sample, from
    /// `conveyor_consumer_lag_total` on the target's `/metrics`.
    pub lag: BTreeMap<String, Vec<f64>>,
    /// The server's CPU, in percent of one core, over the second before each sample: the sum
    /// over every sampled process.
    pub cpu_percent: Vec<f64>,
    /// The server's resident memory, in MiB: the sum over every sampled process.
    pub rss_mib: Vec<f64>,
    /// The same, per sampled process, by its name (`server`, or a role such as `process 2`).
    pub processes: BTreeMap<String, ProcessSeries>,
    /// The whole machine's CPU busy (every process, the generator's too), in percent of one
    /// core, from `/proc/stat`: on a shared machine, what says the cores ran out.
    pub machine_cpu_percent: Vec<f64>,
}

/// The machine's busy and total CPU time since boot, in clock ticks (`/proc/stat`'s `cpu`
/// line: idle and iowait are not busy).
fn machine_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = stat
        .lines()
        .next()?
        .strip_prefix("cpu ")?
        .split_whitespace()
        .filter_map(|f| f.parse().ok())
        .collect();
    let total: u64 = fields.iter().take(8).sum();
    let idle = fields.get(3)? + fields.get(4)?;
    Some((total - idle, total))
}

/// One process's CPU (percent of one core) and RSS (MiB) at each sample.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ProcessSeries {
    pub pid: u32,
    pub cpu_percent: Vec<f64>,
    pub rss_mib: Vec<f64>,
}

/// Samples, every second until aborted, each consumer group's lag from the `/metrics` pages
/// at `metrics` (a group's largest figure among them: each consumer reports its whole
/// group's lag), and the CPU and RSS of each named process in `processes`.
pub async fn sample(
    client: reqwest::Client,
    metrics: Vec<String>,
    processes: Vec<(String, u32)>,
    started: Instant,
    into: Arc<Mutex<Samples>>,
) {
    let ticks = clock_ticks();
    let mut last_cpu: Vec<Option<u64>> = processes.iter().map(|(_, pid)| cpu_ticks(*pid)).collect();
    let mut last_at = Instant::now();
    let mut last_machine = machine_ticks();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let machine = machine_ticks();
        let machine_percent = match (machine, last_machine) {
            (Some((busy, total)), Some((busy0, total0))) if total > total0 => {
                busy.saturating_sub(busy0) as f64 / (total - total0) as f64 * cores * 100.0
            }
            _ => 0.0,
        };
        last_machine = machine;
        let mut lag = BTreeMap::<String, f64>::new();
        for url in &metrics {
            let page = match client
                .get(url)
                .timeout(Duration::from_millis(900))
                .send()
                .await
            {
                Ok(r) => r.text().await.unwrap_or_default(),
                Err(_) => String::new(),
            };
            for (group, value) in lag_totals(&page) {
                let entry = lag.entry(group).or_insert(value);
                *entry = entry.max(value);
            }
        }
        let elapsed = last_at.elapsed().as_secs_f64();
        last_at = Instant::now();
        let mut measured = Vec::with_capacity(processes.len());
        for ((_, pid), last) in processes.iter().zip(last_cpu.iter_mut()) {
            let cpu = cpu_ticks(*pid);
            let percent = match (cpu, *last) {
                (Some(now), Some(before)) => {
                    now.saturating_sub(before) as f64 / ticks / elapsed * 100.0
                }
                _ => 0.0,
            };
            *last = cpu;
            measured.push((percent, rss_mib(*pid).unwrap_or(0.0)));
        }
        let mut samples = into.lock().unwrap();
        let n = samples.at.len();
        samples.at.push(started.elapsed().as_secs_f64());
        samples.machine_cpu_percent.push(machine_percent);
        for (group, value) in lag {
            let series = samples.lag.entry(group).or_insert_with(|| vec![0.0; n]);
            series.resize(n, 0.0);
            series.push(value);
        }
        for series in samples.lag.values_mut() {
            series.resize(n + 1, *series.last().unwrap_or(&0.0));
        }
        // Without a server process, CPU and RSS stay empty rather than read as zero.
        if !processes.is_empty() {
            samples.cpu_percent.push(measured.iter().map(|m| m.0).sum());
            samples.rss_mib.push(measured.iter().map(|m| m.1).sum());
        }
        for ((name, pid), (cpu, rss)) in processes.iter().zip(measured) {
            let series = samples.processes.entry(name.clone()).or_default();
            series.pid = *pid;
            series.cpu_percent.push(cpu);
            series.rss_mib.push(rss);
        }
    }
}

/// The `metric{group="…"} N` lines of a Prometheus text page, by group.
pub(super) fn by_group(text: &str, metric: &str) -> BTreeMap<String, f64> {
    let prefix = format!("{metric}{{");
    text.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(&prefix)?;
            let (labels, value) = rest.split_once('}')?;
            let group = labels
                .split(',')
                .find_map(|l| l.strip_prefix("group=\""))?
                .trim_end_matches('"');
            Some((group.to_owned(), value.trim().parse().ok()?))
        })
        .collect()
}

/// Each group's total lag on a `/metrics` page (`conveyor_consumer_lag_total`).
fn lag_totals(text: &str) -> BTreeMap<String, f64> {
    by_group(text, "conveyor_consumer_lag_total")
}

fn clock_ticks() -> f64 {
    // Linux's USER_HZ, which /proc reports CPU time in, is 100 on every architecture it
    // runs on (sysconf(_SC_CLK_TCK)).
    100.0
}

/// utime + stime of `pid`, in clock ticks (proc(5), `/proc/PID/stat` fields 14 and 15).
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: count from after it.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .strip_suffix(" kB")?
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}

/// The process listening on local TCP `port`: its socket's inode from `/proc/net/tcp` (and
/// `tcp6`), then the process holding that inode among its descriptors.
pub fn pid_listening_on(port: u16) -> Option<u32> {
    let inode = ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .find_map(|table| {
            std::fs::read_to_string(table)
                .ok()?
                .lines()
                .skip(1)
                .find_map(|line| {
                    let fields: Vec<&str> = line.split_whitespace().collect();
                    let local_port =
                        u16::from_str_radix(fields.get(1)?.rsplit(':').next()?, 16).ok()?;
                    // State 0A is LISTEN.
                    (local_port == port && *fields.get(3)? == "0A")
                        .then(|| fields.get(9).map(|s| s.to_string()))?
                })
        })?;
    let needle = format!("socket:[{inode}]");
    std::fs::read_dir("/proc")
        .ok()?
        .filter_map(Result::ok)
        .find_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            std::fs::read_dir(entry.path().join("fd"))
                .ok()?
                .filter_map(Result::ok)
                .any(|fd| {
                    std::fs::read_link(fd.path()).is_ok_and(|l| l.to_string_lossy() == needle)
                })
                .then_some(pid)
        })
}

/// Latency percentiles, in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Percentiles {
    fn of(h: &Histogram<u64>) -> Percentiles {
        let ms = |us: u64| us as f64 / 1000.0;
        Percentiles {
            count: h.len(),
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
        }
    }
}

/// One operation's figures.
#[derive(Debug, Clone, Serialize)]
pub struct OpReport {
    pub op: &'static str,
    pub ok: u64,
    /// Completed per second over the run.
    pub achieved_per_sec: f64,
    pub latency_ms: Option<Percentiles>,
    /// By status code, or `timeout`, `connect`, `dropped` (not started: the generator's
    /// in-flight bound was full).
    pub errors: BTreeMap<String, u64>,
}

/// One second of the run.
#[derive(Debug, Clone, Serialize)]
pub struct SecondReport {
    pub at: u64,
    pub offered: u64,
    pub completed: u64,
    pub errors: u64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub processed_p50_ms: Option<f64>,
    pub processed_p99_ms: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    pub rule: String,
    pub passed: bool,
    pub observed: String,
}

/// Everything a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub scenario: String,
    pub target: String,
    pub duration_secs: f64,
    pub offered: u64,
    pub completed: u64,
    pub offered_per_sec: f64,
    pub achieved_per_sec: f64,
    /// Operations the generator could not start (its in-flight bound was full): when not 0,
    /// the generator was a limit, and the figures understate what was offered.
    pub dropped: u64,
    pub operations: Vec<OpReport>,
    /// From each upload's 202 to `processed`.
    pub processed_ms: Option<Percentiles>,
    pub seconds: Vec<SecondReport>,
    /// Lag, CPU and RSS over time; the processes sampled are `samples.processes`.
    pub samples: Samples,
    pub thresholds: Vec<Verdict>,
    /// What `--find-capacity` found.
    pub capacity: Option<CapacityReport>,
    /// The generator against wrk on an item read, after the load.
    pub reference: Option<super::reference::ReferenceReport>,
    /// Operations the generator started more than 50 ms late, and the latest: when not 0,
    /// the generator fell behind its schedule and the latencies understate the server's.
    pub late_starts: u64,
    pub latest_start_ms: f64,
    /// Uploads that ended `failed`, and uploads not processed within a minute of their 202
    /// (left out of `processed_ms`).
    pub processing_failed: u64,
    pub unmeasured_uploads: u64,
    /// Reads the generator made to follow uploads to their outcome, outside the mix.
    pub watch_requests: u64,
}

/// One step of `--find-capacity`.
#[derive(Debug, Clone, Serialize)]
pub struct StepReport {
    /// Offered, operations per second.
    pub rate: f64,
    /// Completed without error per second, over the step after its first second.
    pub achieved: f64,
    pub p99_ms: f64,
    pub errors_percent: f64,
    /// Each group's lag at the step's end minus at its start, in records.
    pub lag_growth: BTreeMap<String, f64>,
    /// The server's mean CPU over the step, in percent of one core (every sampled process).
    pub cpu_percent: f64,
    /// The same, per sampled process.
    pub cpu_by_process: BTreeMap<String, f64>,
    /// The whole machine's mean CPU over the step (the generator's included).
    pub machine_cpu_percent: f64,
    /// What broke, with the evidence; `None` when the step held.
    pub broke: Option<String>,
    /// Whether it broke because the target stopped answering (most errors refused or broken
    /// connections): then the search measured an outage, not a capacity.
    pub target_lost: bool,
}

/// The verdict of `--find-capacity`.
#[derive(Debug, Clone, Serialize)]
pub struct CapacityReport {
    pub steps: Vec<StepReport>,
    /// The highest offered rate that held, operations per second; `None` if the first step
    /// broke.
    pub sustainable_rate: Option<f64>,
    /// The stage that saturated first, with its evidence; `None` if no step broke.
    pub bottleneck: Option<String>,
    /// Cores on the machine the generator ran on (the server's, for a local target).
    pub cores: usize,
    /// The step that broke found the target gone: the search is inconclusive, and the run
    /// fails (exit 3).
    pub target_lost: bool,
}

impl CapacityReport {
    pub(super) fn new(steps: Vec<StepReport>, cores: usize) -> Self {
        CapacityReport {
            sustainable_rate: steps
                .iter()
                .take_while(|s| s.broke.is_none())
                .map(|s| s.rate)
                .last(),
            bottleneck: steps.iter().find_map(|s| s.broke.clone()),
            target_lost: steps.iter().any(|s| s.target_lost),
            steps,
            cores,
        }
    }
}

/// Judges the step offered at `rate` from `offset` for `search.step`: the first check that
/// fails names the stage that saturated. A consumer group whose lag grew through the step is
/// named first, since a pipeline that falls behind breaks even while the edge answers fast;
/// then the edge, by latency, errors or throughput, with the server's CPU as the evidence of
/// whether the machine was the limit.
pub(super) fn judge_step(
    rate: f64,
    offset: Duration,
    search: &super::Search,
    recorder: &Recorder,
    samples: &Samples,
    cores: usize,
) -> StepReport {
    let first = offset.as_secs() as usize + 1;
    let last = (offset + search.step).as_secs() as usize;
    let window = recorder
        .seconds
        .get(first..last.min(recorder.seconds.len()))
        .unwrap_or(&[]);
    let mut latency = super::histogram();
    let (mut completed, mut errors, mut rate_limited) = (0u64, 0u64, 0u64);
    let (mut dropped, mut client_errors, mut unreachable) = (0u64, 0u64, 0u64);
    for second in window {
        if let Some(h) = &second.latency {
            let _ = latency.add(h);
        }
        completed += second.completed;
        errors += second.errors;
        rate_limited += second.rate_limited;
        dropped += second.dropped;
        client_errors += second.client_errors;
        unreachable += second.unreachable;
    }
    let secs = window.len().max(1) as f64;
    let achieved = completed as f64 / secs;
    let p99_ms = latency.value_at_quantile(0.99) as f64 / 1000.0;
    let errors_percent = errors as f64 * 100.0 / (completed + errors).max(1) as f64;
    let (from, to) = (
        offset.as_secs_f64(),
        (offset + search.step).as_secs_f64() + 1.0,
    );
    let in_step: Vec<usize> = samples
        .at
        .iter()
        .enumerate()
        .filter(|(_, at)| **at >= from && **at <= to)
        .map(|(i, _)| i)
        .collect();
    let lag_growth: BTreeMap<String, f64> = samples
        .lag
        .iter()
        .filter_map(|(group, series)| {
            let (a, b) = (*in_step.first()?, *in_step.last()?);
            Some((group.clone(), series.get(b)? - series.get(a)?))
        })
        .collect();
    let mean = |series: &[f64]| {
        in_step.iter().filter_map(|&i| series.get(i)).sum::<f64>() / in_step.len().max(1) as f64
    };
    let cpu_percent = mean(&samples.cpu_percent);
    let machine_cpu_percent = mean(&samples.machine_cpu_percent);
    let cpu_by_process = samples
        .processes
        .iter()
        .map(|(name, p)| (name.clone(), mean(&p.cpu_percent)))
        .collect();
    let lag_bound = (0.05 * rate * search.step.as_secs_f64()).max(10.0);
    let cpu = format!(
        "server CPU {cpu_percent:.0}% of {}, the machine's {machine_cpu_percent:.0}%",
        cores * 100
    );
    // For a local target the machine's CPU counts: the generator shares its cores.
    let saturated = cpu_percent.max(machine_cpu_percent) >= 85.0 * cores as f64;
    let target_lost = errors > 0 && unreachable * 2 > errors;
    let broke = if let Some((group, grew)) = lag_growth
        .iter()
        .filter(|(_, grew)| **grew > lag_bound)
        .max_by(|a, b| a.1.total_cmp(b.1))
    {
        Some(format!(
            "consumer group {group}: its lag grew by {grew:.0} records in the step (more than \
             {lag_bound:.0}); {cpu}"
        ))
    } else if p99_ms > search.p99.as_secs_f64() * 1000.0
        || errors_percent >= 1.0
        || achieved < 0.9 * rate
    {
        let what = if target_lost {
            "the target stopped answering, not capacity: most errors were refused or broken \
             connections (is it still running?)"
        } else if dropped > 0 {
            "the generator, not the server: operations were dropped at its in-flight bound \
             (raise --max-in-flight, or run more generators)"
        } else if client_errors * 2 > errors {
            "the client, not capacity: most errors were 4xx other than 429 (check --key and \
             --service-key)"
        } else if rate_limited * 2 > errors {
            "the per-key rate limit, not capacity (most errors were 429: raise \
             auth.rate_per_sec on the server, or drive it with more keys)"
        } else if saturated {
            "the server's CPU"
        } else {
            "the HTTP edge"
        };
        Some(format!(
            "{what}: p99 {p99_ms:.1} ms (bound {:.0} ms), {errors_percent:.1}% errors, \
             {achieved:.1}/s achieved of {rate:.1}/s offered; {cpu}",
            search.p99.as_secs_f64() * 1000.0
        ))
    } else {
        None
    };
    StepReport {
        rate,
        achieved,
        p99_ms,
        errors_percent,
        lag_growth,
        cpu_percent,
        cpu_by_process,
        machine_cpu_percent,
        target_lost: target_lost && broke.is_some(),
        broke,
    }
}

impl Report {
    /// The report of a run that offered load for `driven`.
    pub(super) fn new(
        scenario: &Scenario,
        driven: Duration,
        target: &str,
        recorder: &Recorder,
        samples: Samples,
    ) -> Report {
        let duration = driven.as_secs_f64().max(1e-9);
        let operations: Vec<OpReport> = recorder
            .ops
            .iter()
            .map(|(op, stats)| OpReport {
                op: op.name(),
                ok: stats.ok,
                achieved_per_sec: stats.ok as f64 / duration,
                latency_ms: stats.latency.as_ref().map(Percentiles::of),
                errors: stats.errors.clone(),
            })
            .collect();
        let seconds: Vec<SecondReport> = recorder
            .seconds
            .iter()
            .enumerate()
            .map(|(at, s)| {
                let q = |h: &Option<Histogram<u64>>, p: f64| {
                    h.as_ref().map(|h| h.value_at_quantile(p) as f64 / 1000.0)
                };
                SecondReport {
                    at: at as u64,
                    offered: s.offered,
                    completed: s.completed,
                    errors: s.errors,
                    p50_ms: q(&s.latency, 0.5),
                    p99_ms: q(&s.latency, 0.99),
                    processed_p50_ms: q(&s.processed, 0.5),
                    processed_p99_ms: q(&s.processed, 0.99),
                }
            })
            .collect();
        let offered: u64 = seconds.iter().map(|s| s.offered).sum();
        let completed: u64 = seconds.iter().map(|s| s.completed).sum();
        let mut report = Report {
            scenario: scenario.name.clone(),
            target: target.to_owned(),
            duration_secs: duration,
            offered,
            completed,
            offered_per_sec: offered as f64 / duration,
            achieved_per_sec: completed as f64 / duration,
            dropped: recorder.dropped,
            operations,
            processed_ms: recorder.processed.as_ref().map(Percentiles::of),
            seconds,
            samples,
            thresholds: Vec::new(),
            capacity: None,
            reference: None,
            late_starts: recorder.late,
            latest_start_ms: recorder.latest.as_secs_f64() * 1000.0,
            processing_failed: recorder.processing_failed,
            unmeasured_uploads: recorder.unmeasured,
            watch_requests: recorder.watch_requests,
        };
        report.thresholds = scenario
            .thresholds()
            .into_iter()
            .map(|(rule, t)| report.judge(rule, &t, recorder))
            .collect();
        report
    }

    fn judge(&self, rule: String, threshold: &Threshold, recorder: &Recorder) -> Verdict {
        let (passed, observed) = match threshold {
            Threshold::Latency {
                op,
                percentile,
                below,
            } => {
                let h = match op {
                    Some(op) => recorder.ops.get(op).and_then(|s| s.latency.as_ref()),
                    None => recorder.processed.as_ref(),
                };
                match h {
                    _ if op.is_none() && recorder.unmeasured > 0 => (
                        false,
                        format!(
                            "{} uploads were not processed within a minute of their 202",
                            recorder.unmeasured
                        ),
                    ),
                    Some(h) => {
                        let us = h.value_at_quantile(percentile / 100.0);
                        (
                            Duration::from_micros(us) < *below,
                            format!("p{percentile} was {:.1} ms", us as f64 / 1000.0),
                        )
                    }
                    None => (false, "nothing was measured".to_owned()),
                }
            }
            Threshold::Errors { below_percent } => {
                let errors: u64 = self.operations.iter().flat_map(|o| o.errors.values()).sum();
                let all = errors + self.operations.iter().map(|o| o.ok).sum::<u64>();
                let percent = errors as f64 * 100.0 / all.max(1) as f64;
                (
                    percent < *below_percent,
                    format!("{percent:.2}% of {all} failed"),
                )
            }
            Threshold::LagBounded => {
                let mut worst = Vec::new();
                let mut passed = true;
                for (group, series) in &self.samples.lag {
                    let half = &series[..series.len() / 2];
                    let early = half.iter().copied().fold(0.0, f64::max);
                    let last = series.last().copied().unwrap_or(0.0);
                    if last > early + 10.0 {
                        passed = false;
                    }
                    worst.push(format!(
                        "{group}: {last:.0} at the end, {early:.0} at most in the first half"
                    ));
                }
                if self.samples.lag.is_empty() {
                    (false, "no lag was read from /metrics".to_owned())
                } else {
                    (passed, worst.join("; "))
                }
            }
        };
        Verdict {
            rule,
            passed,
            observed,
        }
    }

    /// The sampled processes, as `name (pid), …`.
    fn processes_named(&self) -> String {
        self.samples
            .processes
            .iter()
            .map(|(name, s)| format!("{name} ({})", s.pid))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Whether every threshold held and, for `--find-capacity`, at least its first step.
    pub fn passed(&self) -> bool {
        self.thresholds.iter().all(|t| t.passed)
            && self
                .capacity
                .as_ref()
                .is_none_or(|c| c.sustainable_rate.is_some() && !c.target_lost)
    }

    /// The summary, for the terminal.
    pub fn print(&self) {
        println!(
            "{} against {}: {:.0} s, offered {:.1}/s, completed {:.1}/s{}",
            self.scenario,
            self.target,
            self.duration_secs,
            self.offered_per_sec,
            self.achieved_per_sec,
            if self.dropped > 0 {
                format!(
                    " ({} dropped by the generator's in-flight bound)",
                    self.dropped
                )
            } else {
                String::new()
            }
        );
        println!(
            "  {:<16} {:>9} {:>9} {:>9} {:>9} {:>9}  errors",
            "operation", "ok/s", "p50 ms", "p90 ms", "p99 ms", "max ms"
        );
        for op in &self.operations {
            let p = op.latency_ms.as_ref();
            let f = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.1}"));
            println!(
                "  {:<16} {:>9.1} {:>9} {:>9} {:>9} {:>9}  {}",
                op.op,
                op.achieved_per_sec,
                f(p.map(|p| p.p50)),
                f(p.map(|p| p.p90)),
                f(p.map(|p| p.p99)),
                f(p.map(|p| p.max)),
                errors_text(&op.errors)
            );
        }
        if let Some(p) = &self.processed_ms {
            println!(
                "  upload → processed: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} uploads; \
                 {} failed, {} not processed within a minute; {} polls to follow them)",
                p.p50,
                p.p99,
                p.max,
                p.count,
                self.processing_failed,
                self.unmeasured_uploads,
                self.watch_requests
            );
        }
        if let (Some(cpu), Some(rss)) = (
            self.samples.cpu_percent.iter().copied().reduce(f64::max),
            self.samples.rss_mib.iter().copied().reduce(f64::max),
        ) {
            println!(
                "  sampled {}: CPU at most {cpu:.0}% of one core, RSS at most {rss:.0} MiB (summed)",
                self.processes_named()
            );
        }
        if self.late_starts > 0 {
            println!(
                "  the generator started {} operations late (up to {:.0} ms): it was a limit \
                 too, and those latencies are understated",
                self.late_starts, self.latest_start_ms
            );
        }
        if let Some(c) = &self.capacity {
            for s in &c.steps {
                println!(
                    "  step {:>8.1}/s: achieved {:>8.1}/s, p99 {:>8.1} ms, CPU {:>4.0}%{}",
                    s.rate,
                    s.achieved,
                    s.p99_ms,
                    s.cpu_percent,
                    s.broke
                        .as_ref()
                        .map_or(String::new(), |b| format!("  BROKE: {b}"))
                );
            }
            match (c.sustainable_rate, &c.bottleneck) {
                (Some(rate), Some(_)) if c.target_lost => println!(
                    "  inconclusive: the target stopped answering; {rate:.1} operations/s held \
                     before that, which says nothing of its capacity"
                ),
                (Some(rate), Some(_)) => {
                    println!("  highest sustainable rate: {rate:.1} operations/s")
                }
                (Some(rate), None) => println!(
                    "  every step held: at least {rate:.1} operations/s (raise --max-steps)"
                ),
                (None, _) => println!("  not even the first step held"),
            }
            println!(
                "  bottleneck: {}",
                c.bottleneck
                    .as_deref()
                    .unwrap_or("none found: every step held; raise --max-steps")
            );
        }
        if let Some(r) = &self.reference {
            println!("  {}", r.summary());
        }
        for v in &self.thresholds {
            println!(
                "  {} {} ({})",
                if v.passed { "PASS" } else { "FAIL" },
                v.rule,
                v.observed
            );
        }
    }
}

/// One line of a chart: its name and its points.
type Series = (String, Vec<(f64, f64)>);

/// An SVG line chart of `series`, with `y` as its unit and `x` as the x axis's.
pub(super) fn chart(title: &str, y: &str, x: &str, series: &[Series]) -> String {
    use plotters::prelude::*;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (760, 300)).into_drawing_area();
        let _ = root.fill(&WHITE);
        let x_max = series
            .iter()
            .flat_map(|(_, p)| p.iter().map(|(x, _)| *x))
            .fold(1.0, f64::max);
        let y_max = series
            .iter()
            .flat_map(|(_, p)| p.iter().map(|(_, y)| *y))
            .fold(0.0, f64::max)
            .max(1e-9)
            * 1.1;
        // A chart that cannot be drawn leaves its area blank rather than failing the report.
        let _ = (|| -> Option<()> {
            let mut chart = ChartBuilder::on(&root)
                .caption(title, ("sans-serif", 18))
                .margin(10)
                .x_label_area_size(35)
                .y_label_area_size(60)
                .build_cartesian_2d(0.0..x_max, 0.0..y_max)
                .ok()?;
            chart.configure_mesh().x_desc(x).y_desc(y).draw().ok()?;
            for (i, (name, points)) in series.iter().enumerate() {
                let color = Palette99::pick(i).to_rgba();
                chart
                    .draw_series(LineSeries::new(
                        points.iter().copied(),
                        color.stroke_width(2),
                    ))
                    .ok()?
                    .label(name.as_str())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()
                .ok()?;
            root.present().ok()
        })();
    }
    svg
}

/// Errors by kind, as `429: 3, timeout: 1`, or `none`.
fn errors_text(errors: &BTreeMap<String, u64>) -> String {
    if errors.is_empty() {
        return "none".to_owned();
    }
    errors
        .iter()
        .map(|(kind, n)| format!("{kind}: {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The reports' stylesheet.
pub(super) const STYLE: &str = "body{font-family:sans-serif;max-width:820px;margin:2em auto}\
    table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}\
    td:first-child{text-align:left}.pass{color:#070}.fail{color:#b00;font-weight:bold}\
    figure{margin:1em 0}";

/// `text` safe inside HTML elements and attributes.
pub(super) fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The report as one HTML page: the summary, the thresholds, and the charts inline.
pub fn html(report: &Report) -> String {
    let per_second = |f: &dyn Fn(&SecondReport) -> Option<f64>| -> Vec<(f64, f64)> {
        report
            .seconds
            .iter()
            .filter_map(|s| Some((s.at as f64, f(s)?)))
            .collect()
    };
    let samples = &report.samples;
    let over_samples = |values: &[f64]| -> Vec<(f64, f64)> {
        samples
            .at
            .iter()
            .copied()
            .zip(values.iter().copied())
            .collect()
    };
    // One line per process, and their total when there are several.
    let per_process = |f: &dyn Fn(&ProcessSeries) -> &Vec<f64>, total: &[f64]| -> Vec<Series> {
        let mut series: Vec<Series> = samples
            .processes
            .iter()
            .map(|(name, p)| (name.clone(), over_samples(f(p))))
            .collect();
        if series.len() > 1 {
            series.push(("total".into(), over_samples(total)));
        }
        series
    };
    let mut cpu = per_process(&|p| &p.cpu_percent, &samples.cpu_percent);
    cpu.push((
        "machine (every process)".into(),
        over_samples(&samples.machine_cpu_percent),
    ));
    let charts = [
        chart(
            "Offered and achieved rate",
            "operations/s",
            "seconds",
            &[
                ("offered".into(), per_second(&|s| Some(s.offered as f64))),
                ("achieved".into(), per_second(&|s| Some(s.completed as f64))),
                ("errors".into(), per_second(&|s| Some(s.errors as f64))),
            ],
        ),
        chart(
            "Latency, every operation, from its intended start",
            "ms",
            "seconds",
            &[
                ("p50".into(), per_second(&|s| s.p50_ms)),
                ("p99".into(), per_second(&|s| s.p99_ms)),
            ],
        ),
        chart(
            "Upload 202 → processed",
            "ms",
            "seconds",
            &[
                ("p50".into(), per_second(&|s| s.processed_p50_ms)),
                ("p99".into(), per_second(&|s| s.processed_p99_ms)),
            ],
        ),
        chart(
            "Consumer lag per group",
            "records",
            "seconds",
            &samples
                .lag
                .iter()
                .map(|(group, values)| (group.clone(), over_samples(values)))
                .collect::<Vec<_>>(),
        ),
        chart("Server CPU, per process", "% of one core", "seconds", &cpu),
        chart(
            "Server memory, per process",
            "RSS MiB",
            "seconds",
            &per_process(&|p| &p.rss_mib, &samples.rss_mib),
        ),
    ];
    let mut rows = String::new();
    for op in &report.operations {
        let p = op.latency_ms.as_ref();
        let f = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.1}"));
        rows.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{:.1}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>\n",
            op.op,
            op.ok,
            op.achieved_per_sec,
            f(p.map(|p| p.p50)),
            f(p.map(|p| p.p90)),
            f(p.map(|p| p.p99)),
            f(p.map(|p| p.max)),
            escape(&errors_text(&op.errors)),
        ));
    }
    let mut verdicts = String::new();
    if report.thresholds.is_empty() {
        verdicts.push_str("<li>none in the scenario</li>\n");
    }
    for v in &report.thresholds {
        verdicts.push_str(&format!(
            "<li class=\"{}\">{} {} ({})</li>\n",
            if v.passed { "pass" } else { "fail" },
            if v.passed { "PASS" } else { "FAIL" },
            escape(&v.rule),
            escape(&v.observed)
        ));
    }
    let capacity = report.capacity.as_ref().map_or(String::new(), |c| {
        let rows: String = c
            .steps
            .iter()
            .map(|s| {
                format!(
                    "<tr><td>{:.1}</td><td>{:.1}</td><td>{:.1}</td><td>{:.1}</td><td>{:.0}</td><td>{}</td></tr>\n",
                    s.rate,
                    s.achieved,
                    s.p99_ms,
                    s.errors_percent,
                    s.cpu_percent,
                    escape(s.broke.as_deref().unwrap_or("held"))
                )
            })
            .collect();
        format!(
            "<h2>Capacity</h2>\n<p>Highest sustainable rate: <b>{}</b>. Bottleneck: <b>{}</b>.</p>\n\
             <table><tr><th>offered/s</th><th>achieved/s</th><th>p99 ms</th><th>errors %</th>\
             <th>CPU %</th><th>verdict</th></tr>\n{rows}</table>\n",
            c.sustainable_rate.map_or("none".to_owned(), |r| format!("{r:.1} operations/s")),
            escape(c.bottleneck.as_deref().unwrap_or("none found"))
        )
    });
    let reference = report.reference.as_ref().map_or(String::new(), |r| {
        format!(
            "<h2>Reference: the generator against wrk</h2>\n<p>{}</p>\n<table><tr><th></th>\
             <th>achieved/s</th><th>p50 ms</th><th>p99 ms</th><th>errors (dropped)</th></tr>\n\
             <tr><td>wrk (closed loop)</td><td>{:.0}</td><td>{:.2}</td><td>{:.2}</td><td>{}</td></tr>\n\
             <tr><td>this generator (open model, offered {:.0}/s)</td><td>{:.0}</td><td>{:.2}</td>\
             <td>{:.2}</td><td>{} ({})</td></tr>\n</table>\n<p>Command: <code>{}</code>. CPUs: {}. \
             Threads: wrk {}, this generator {}, on as many connections.</p>\n",
            escape(&r.summary()),
            r.reference_per_sec,
            r.reference_p50_ms,
            r.reference_p99_ms,
            r.reference_errors,
            r.generator_offered_per_sec,
            r.generator_achieved_per_sec,
            r.generator_p50_ms,
            r.generator_p99_ms,
            r.generator_errors,
            r.generator_dropped,
            escape(&r.tool),
            escape(
                r.pinned
                    .as_deref()
                    .unwrap_or("shared by the server and the tools, as in the run")
            ),
            r.reference_threads,
            r.generator_threads,
        )
    });
    let processed = report
        .processed_ms
        .as_ref()
        .map_or("nothing uploaded".to_owned(), |p| {
            format!(
                "p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms over {} uploads",
                p.p50, p.p99, p.max, p.count
            )
        });
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Conveyor load report: {name}</title>\n\
         <style>{style}</style></head><body>\n\
         <h1>Load report: {name}</h1>\n<p>Target {target}, {duration:.0} s: offered {offered:.1} operations/s, \
         completed {achieved:.1}/s; {dropped} dropped by the generator's in-flight bound. Latency counts from \
         each operation's intended start (open model). Server process: {pid}.</p>\n\
         <h2>Operations</h2>\n<table><tr><th>operation</th><th>ok</th><th>ok/s</th><th>p50 ms</th><th>p90 ms</th>\
         <th>p99 ms</th><th>max ms</th><th>errors</th></tr>\n{rows}</table>\n\
         <p>Upload 202 → processed: {processed}.</p>\n<p>{generator}</p>\n{capacity}{reference}<h2>Thresholds</h2>\n<ul>{verdicts}</ul>\n\
         <h2>Charts</h2>\n{charts}\n</body></html>\n",
        name = escape(&report.scenario),
        generator = escape(&format!(
            "The generator: {} operations started more than 50 ms late (the latest {:.0} ms); \
             {} uploads ended failed and {} were not processed within a minute of their 202; \
             {} polls followed uploads to their outcome, outside the mix.",
            report.late_starts,
            report.latest_start_ms,
            report.processing_failed,
            report.unmeasured_uploads,
            report.watch_requests
        )),
        style = STYLE,
        target = escape(&report.target),
        duration = report.duration_secs,
        offered = report.offered_per_sec,
        achieved = report.achieved_per_sec,
        dropped = report.dropped,
        pid = if report.samples.processes.is_empty() {
            "not found (CPU and RSS not sampled)".to_owned()
        } else {
            escape(&report.processes_named())
        },
        charts = charts
            .iter()
            .map(|svg| format!("<figure>{svg}</figure>"))
            .collect::<Vec<_>>()
            .join("\n"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_totals_come_from_the_prometheus_page() {
        let page = "# TYPE conveyor_consumer_lag_total gauge\n\
                    conveyor_consumer_lag_total{role=\"process\",group=\"processor\"} 12\n\
                    conveyor_consumer_lag_total{group=\"projector\"} 0\n\
                    conveyor_consumer_lag{group=\"processor\",partition=\"3\"} 12\n";
        let lag = lag_totals(page);
        assert_eq!(lag.get("processor"), Some(&12.0));
        assert_eq!(lag.get("projector"), Some(&0.0));
        assert_eq!(lag.len(), 2);
    }

    #[test]
    fn this_process_is_found_by_its_listening_port() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        assert_eq!(pid_listening_on(port), Some(std::process::id()));
        assert!(cpu_ticks(std::process::id()).is_some());
        assert!(rss_mib(std::process::id()).unwrap() > 0.0);
    }
}
