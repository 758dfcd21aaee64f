//! `conveyor loadtest scale`: the scaling curve, measured. For each instance count it starts
//! the distributed roles as local processes on Kafka (one `ingest`, one `query`, and that many
//! `process` and `project` instances, each in its consumer group), runs `--find-capacity`
//! against them, and stops them. The report has the highest sustainable rate at each count,
//! what broke, every role's CPU at capacity, and a sizing table scaled from the measured
//! per-core figures.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;

use super::report::{self, CapacityReport, StepReport};
use super::{Op, Options, Scenario, Search};

/// The roles a scale run starts, and the consumer roles among them.
const ROLES_SCALED: [&str; 2] = ["process", "project"];

/// What `loadtest scale` was asked to do.
pub struct ScaleOptions {
    pub scenario: PathBuf,
    /// Kafka's bootstrap address, `host:port`.
    pub kafka: String,
    /// A CQL read store (`scylla://host:port/keyspace`; each count gets a keyspace of its
    /// own), or `None` for SQLite in the run's data dir, which every projector shares.
    pub views: Option<conveyor_config::ScyllaUri>,
    /// Instance counts of `process` and `project`, in order.
    pub instances: Vec<usize>,
    /// Partitions of each count's topic (it bounds the useful instances).
    pub partitions: u32,
    pub out: PathBuf,
    pub search: Search,
    pub max_in_flight: usize,
}

/// One point of the curve.
#[derive(Debug, Clone, Serialize)]
pub struct ScalePoint {
    /// `process` and `project` instances.
    pub instances: usize,
    /// The highest offered rate that held, operations of the mix per second.
    pub sustainable_rate: Option<f64>,
    pub bottleneck: Option<String>,
    /// At the last step that held: every process's CPU summed, in percent of one core.
    pub cpu_percent_at_capacity: f64,
    /// The same per role (`ingest`, `query`, `process`, `project`: its instances summed).
    pub cpu_by_role_at_capacity: BTreeMap<String, f64>,
    /// The whole machine's CPU (the generator's too) in the step that broke, in percent of
    /// one core.
    pub machine_cpu_percent_at_break: Option<f64>,
    /// Where this count's own report is, relative to the scale report.
    pub report: String,
}

/// One row of the sizing table.
#[derive(Debug, Clone, Serialize)]
pub struct SizingRow {
    pub uploads_per_sec: f64,
    pub reads_per_sec: f64,
    /// Cores each role needs at the target utilisation, by role.
    pub cores: BTreeMap<String, f64>,
    /// Replicas of 2-core pods, by role.
    pub replicas: BTreeMap<String, u64>,
}

/// The measured per-core figures and the loads they are scaled to.
#[derive(Debug, Clone, Serialize)]
pub struct Sizing {
    /// Cores one operation per second costs, by role: `ingest` and `process` per upload,
    /// `project` per upload (with the events the mix posts per upload), `query` per read.
    pub cores_per_op: BTreeMap<String, f64>,
    /// What the figures come from.
    pub measured_at: String,
    /// The CPU share a role is sized to run at (the HPAs' target).
    pub target_utilisation: f64,
    pub rows: Vec<SizingRow>,
    pub assumptions: Vec<String>,
}

/// The scale run's report.
#[derive(Debug, Clone, Serialize)]
pub struct ScaleReport {
    pub scenario: String,
    pub kafka: String,
    pub views: String,
    pub cores: usize,
    pub points: Vec<ScalePoint>,
    /// Why the curve bends, when it does.
    pub verdict: String,
    pub sizing: Option<Sizing>,
}

/// Loads to size for: uploads per second with reads per second.
const SIZING_TARGETS: [(f64, f64); 3] = [(10.0, 500.0), (100.0, 5_000.0), (1_000.0, 50_000.0)];
/// The CPU share roles are sized to: the HPAs' target in `infra/k8s`.
const TARGET_UTILISATION: f64 = 0.65;
/// Cores per pod in the sizing table: the Deployments' request in `infra/k8s`.
const CORES_PER_POD: f64 = 2.0;

/// A role started for the run; killed when dropped.
struct RoleProcess {
    name: String,
    child: Child,
    address: String,
}

impl Drop for RoleProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether util-linux's `setpriv` runs here.
fn setpriv() -> bool {
    static FOUND: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FOUND.get_or_init(|| {
        Command::new("setpriv")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

/// Starts `conveyor <role>` on a free loopback port; its log goes to `log`. Waits at most a
/// minute for it to say where it listens.
async fn start_role(
    name: String,
    role: &str,
    data_dir: &Path,
    env: &[(String, String)],
    log: &Path,
) -> anyhow::Result<RoleProcess> {
    // The product's binary, beside the lab's (where `cargo build` puts both) or on PATH.
    let exe = conveyor::cli::find_binary("conveyor").context(
        "cannot find the `conveyor` binary beside conveyor-loadtest or on PATH \
         (cargo build --release -p conveyor)",
    )?;
    let stderr =
        std::fs::File::create(log).with_context(|| format!("cannot write {}", log.display()))?;
    // Under util-linux's `setpriv --pdeathsig KILL` where it runs, so a `loadtest scale`
    // killed outright (SIGKILL, which no handler sees) leaves no role behind.
    let mut command = if setpriv() {
        let mut c = Command::new("setpriv");
        c.args(["--pdeathsig", "KILL", "--"]).arg(exe);
        c
    } else {
        Command::new(exe)
    };
    let mut child = command
        .args([role, "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .with_context(|| format!("cannot start `conveyor {role}`"))?;
    let stdout = child.stdout.take().expect("piped");
    // Read its stdout on a thread of its own, which keeps draining it after the address so
    // the child never blocks on a full pipe.
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(rest) = line.split("listening on ").nth(1)
                && let Some(tx) = tx.take()
            {
                let _ = tx.send(rest.trim().to_owned());
            }
        }
    });
    let mut process = RoleProcess {
        name,
        child,
        address: String::new(),
    };
    match tokio::time::timeout(Duration::from_secs(60), rx).await {
        Ok(Ok(address)) => {
            process.address = address;
            Ok(process)
        }
        Ok(Err(_)) => anyhow::bail!(
            "`conveyor {role}` exited before listening; its log: {}",
            log.display()
        ),
        Err(_) => anyhow::bail!(
            "`conveyor {role}` did not listen within a minute; its log: {}",
            log.display()
        ),
    }
}

/// Waits until every role answers `/readyz` (its backends reachable), at most `limit`.
async fn ready(
    client: &reqwest::Client,
    roles: &[RoleProcess],
    limit: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    for role in roles {
        loop {
            let ok = client
                .get(format!("{}/readyz", role.address))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ok {
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{} at {} was not ready within {limit:?}",
                role.name,
                role.address
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(())
}

/// `conveyor_consumer_assigned_partitions{group="…"} N` on a `/metrics` page, for any group.
fn assigned_partitions(page: &str) -> f64 {
    report::by_group(page, "conveyor_consumer_assigned_partitions")
        .values()
        .sum()
}

/// Waits until the consumer groups have settled: every member of each scaled role owns a
/// partition and together they own all of them, for two seconds running. A rebalance in
/// the middle of a step would read as lag.
async fn settled(
    client: &reqwest::Client,
    roles: &[RoleProcess],
    partitions: u32,
    limit: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    let mut stable = 0;
    loop {
        let mut all = true;
        let mut seen = String::new();
        for scaled in ROLES_SCALED {
            let mut total = 0.0;
            for role in roles.iter().filter(|r| r.name.starts_with(scaled)) {
                let page = match client.get(format!("{}/metrics", role.address)).send().await {
                    Ok(r) => r.text().await.unwrap_or_default(),
                    Err(_) => String::new(),
                };
                let owned = assigned_partitions(&page);
                all &= owned >= 1.0;
                total += owned;
                seen.push_str(&format!("{} owns {owned}; ", role.name));
            }
            all &= total == f64::from(partitions);
        }
        stable = if all { stable + 1 } else { 0 };
        if stable >= 2 {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the consumer groups did not settle within {limit:?} ({seen}of {partitions} partitions)"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Runs the curve and writes `scale.json` and `scale.html` (and each count's own report under
/// `n<count>/`).
///
/// # Errors
/// A scenario that does not parse, a role that does not start or become ready, or a count's
/// run that fails.
pub async fn run(options: ScaleOptions) -> anyhow::Result<ScaleReport> {
    let text = std::fs::read_to_string(&options.scenario)
        .with_context(|| format!("failed to read {}", options.scenario.display()))?;
    let scenario = Scenario::parse(&text)
        .map_err(|e| anyhow::anyhow!("{}: {e}", options.scenario.display()))?;
    options.search.check()?;
    anyhow::ensure!(options.partitions >= 1, "--partitions must be at least 1");
    let mut options = options;
    options.instances.sort_unstable();
    options.instances.dedup();
    anyhow::ensure!(
        !options.instances.is_empty(),
        "--instances needs at least one count"
    );
    for &n in &options.instances {
        anyhow::ensure!(
            (1..=options.partitions as usize).contains(&n),
            "--instances {n}: between 1 and the partition count ({}); instances past it sit idle",
            options.partitions
        );
    }
    std::fs::create_dir_all(&options.out)
        .with_context(|| format!("--out {}: cannot create it", options.out.display()))?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .no_proxy()
        .build()?;
    let mut points = Vec::new();
    let mut reports = Vec::new();
    for &n in &options.instances {
        println!("── {n} × process, {n} × project on Kafka ──");
        // Ctrl-C or SIGTERM drops the count's future, and with it its roles (killed, waited
        // for) and its data dir: nothing this run started is left running.
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let (point, report) = tokio::select! {
            done = one_count(&options, n, &client) => done?,
            _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted; the roles this run started are stopped"),
            _ = terminate.recv() => anyhow::bail!("terminated; the roles this run started are stopped"),
        };
        points.push(point);
        reports.push(report);
        // Written after every count, so a later count's failure keeps the earlier ones.
        write(&options, &scenario, &points, &reports, cores)?;
    }
    let report = write(&options, &scenario, &points, &reports, cores)?;
    print(&report);
    println!(
        "report: {} and {}",
        options.out.join("scale.html").display(),
        options.out.join("scale.json").display()
    );
    Ok(report)
}

/// The report of the counts so far, written to `scale.json` and `scale.html`.
fn write(
    options: &ScaleOptions,
    scenario: &Scenario,
    points: &[ScalePoint],
    reports: &[report::Report],
    cores: usize,
) -> anyhow::Result<ScaleReport> {
    let report = ScaleReport {
        scenario: scenario.name.clone(),
        kafka: options.kafka.clone(),
        views: options
            .views
            .as_ref()
            .map_or_else(|| "sqlite (shared file)".into(), ToString::to_string),
        cores,
        points: points.to_vec(),
        verdict: verdict(points, cores),
        sizing: sizing(scenario, points, reports),
    };
    let json = options.out.join("scale.json");
    let html = options.out.join("scale.html");
    std::fs::write(&json, serde_json::to_vec_pretty(&report)?)
        .and_then(|()| std::fs::write(&html, html_report(&report)))
        .with_context(|| format!("failed to write the reports in {}", options.out.display()))?;
    Ok(report)
}

/// One instance count: start the roles, find the capacity, stop them.
async fn one_count(
    options: &ScaleOptions,
    n: usize,
    client: &reqwest::Client,
) -> anyhow::Result<(ScalePoint, report::Report)> {
    let dir = tempfile::tempdir()?;
    let out = options.out.join(format!("n{n}"));
    std::fs::create_dir_all(&out)?;
    let run = uuid::Uuid::now_v7().simple().to_string();
    let key = format!("cvk_loadtest_{run}");
    let service_key = format!("cvk_loadtest_events_{run}");
    let mut env: Vec<(String, String)> = [
        ("CONVEYOR__LOG__URI", format!("kafka://{}", options.kafka)),
        ("CONVEYOR__LOG__TOPIC", format!("loadtest-scale-{run}")),
        ("CONVEYOR__LOG__PARTITIONS", options.partitions.to_string()),
        ("CONVEYOR__PROCESSOR__GROUP", format!("processor-{run}")),
        ("CONVEYOR__PROJECTOR__GROUP", format!("projector-{run}")),
        ("CONVEYOR__AUTH__API_KEYS", format!("loadtest:{key}")),
        (
            "CONVEYOR__AUTH__SERVICE_KEYS",
            format!("loadtest-events:{service_key}"),
        ),
        // One key drives it all: its rate limit is not what is measured.
        ("CONVEYOR__AUTH__RATE_PER_SEC", "0".into()),
        // The direct upload's URLs and private media URLs are signed; roles outside `serve`
        // make no key of their own.
        (
            "CONVEYOR__UPLOADS__SIGNING_KEY",
            format!("lt:{}", uuid::Uuid::new_v4().simple()),
        ),
        (
            "CONVEYOR__CDN__SIGNING_KEYS",
            format!("lt:{}", uuid::Uuid::new_v4().simple()),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    if let Some(views) = &options.views {
        let mut settings = conveyor_config::Settings::default();
        let keyspace = crate::bench::run_keyspace(views, &run)?;
        settings.views.replication_factor = 1;
        conveyor_storage::views::scylla::migrate(&keyspace, &settings.views)
            .await
            .context("failed to migrate the run's keyspace")?;
        env.push(("CONVEYOR__VIEWS__URI".into(), keyspace.to_string()));
        env.push(("CONVEYOR__VIEWS__REPLICATION_FACTOR".into(), "1".into()));
    }
    // The ingest edge creates the topic; the consumers start once it exists.
    let log = |name: &str| out.join(format!("{}.log", name.replace(' ', "-")));
    let mut roles =
        vec![start_role("ingest".into(), "ingest", dir.path(), &env, &log("ingest")).await?];
    ready(client, &roles, Duration::from_secs(60)).await?;
    roles.push(start_role("query".into(), "query", dir.path(), &env, &log("query")).await?);
    for role in ROLES_SCALED {
        for i in 1..=n {
            let name = format!("{role} {i}");
            roles.push(start_role(name.clone(), role, dir.path(), &env, &log(&name)).await?);
        }
    }
    ready(client, &roles, Duration::from_secs(60)).await?;
    settled(client, &roles, options.partitions, Duration::from_secs(120)).await?;
    let address = |name: &str| {
        roles
            .iter()
            .find(|r| r.name == name)
            .map(|r| r.address.clone())
            .expect("started")
    };
    let report = super::run(Options {
        scenario: options.scenario.clone(),
        target: address("ingest"),
        read_target: Some(address("query")),
        metrics: roles
            .iter()
            .filter(|r| ROLES_SCALED.iter().any(|s| r.name.starts_with(s)))
            .map(|r| format!("{}/metrics", r.address))
            .collect(),
        processes: roles
            .iter()
            .map(|r| (r.name.clone(), r.child.id()))
            .collect(),
        key,
        service_key: Some(service_key),
        out: out.clone(),
        allow_remote: false,
        pid: None,
        max_in_flight: options.max_in_flight,
        find_capacity: Some(options.search.clone()),
        reference: false,
    })
    .await
    .with_context(|| format!("the run with {n} × process and project failed"))?;
    for role in &mut roles {
        if let Ok(Some(status)) = role.child.try_wait() {
            anyhow::bail!(
                "{} exited during the run ({status}); its log: {}",
                role.name,
                log(&role.name).display()
            );
        }
    }
    drop(roles);
    if let Some(views) = &options.views
        && let Ok(keyspace) = crate::bench::run_keyspace(views, &run)
    {
        let settings = conveyor_config::ViewSettings::default();
        let _ = conveyor_storage::views::scylla::drop_keyspace(&keyspace, &settings).await;
    }
    let capacity = report.capacity.as_ref();
    let held = capacity.and_then(last_held);
    let point = ScalePoint {
        instances: n,
        sustainable_rate: capacity.and_then(|c| c.sustainable_rate),
        bottleneck: capacity.and_then(|c| c.bottleneck.clone()),
        cpu_percent_at_capacity: held.map_or(0.0, |s| s.cpu_percent),
        cpu_by_role_at_capacity: held.map(by_role).unwrap_or_default(),
        machine_cpu_percent_at_break: capacity
            .and_then(|c| c.steps.iter().find(|s| s.broke.is_some()))
            .map(|s| s.machine_cpu_percent),
        report: format!("n{n}/report.html"),
    };
    Ok((point, report))
}

/// The last step of a search that held.
fn last_held(capacity: &CapacityReport) -> Option<&StepReport> {
    capacity
        .steps
        .iter()
        .take_while(|s| s.broke.is_none())
        .last()
}

/// A step's CPU per role: `process 1`, `process 2` … summed as `process`.
fn by_role(step: &StepReport) -> BTreeMap<String, f64> {
    let mut roles = BTreeMap::new();
    for (name, cpu) in &step.cpu_by_process {
        let role = name.split(' ').next().unwrap_or(name).to_owned();
        *roles.entry(role).or_insert(0.0) += cpu;
    }
    roles
}

/// Why the curve has its shape: linear, or flattened by the machine's CPU, or by a stage.
fn verdict(points: &[ScalePoint], cores: usize) -> String {
    let (Some(first), Some(last)) = (points.first(), points.last()) else {
        return "no points".into();
    };
    let (Some(a), Some(b)) = (first.sustainable_rate, last.sustainable_rate) else {
        return "a count held no step, so there is no curve: lower --from".into();
    };
    if points.iter().any(|p| p.bottleneck.is_none()) {
        return "a count broke on nothing: its rate is only a lower bound, so the curve is not \
                measured; raise --max-steps or --factor"
            .into();
    }
    if points.len() < 2 {
        return format!(
            "one count ({} × process and project): {a:.1} operations/s; give --instances two counts or more \
             for a curve",
            first.instances
        );
    }
    let gain = b / a;
    let ideal = last.instances as f64 / first.instances as f64;
    let machine = cores as f64 * 100.0;
    // The machine's CPU where each count broke: the roles and the generator share the cores.
    let busiest = points
        .iter()
        .filter_map(|p| p.machine_cpu_percent_at_break)
        .fold(0.0, f64::max);
    let mut shape = format!(
        "{} → {} instances: {a:.1} → {b:.1} operations/s, {gain:.2}× for {ideal:.0}× the \
         instances",
        first.instances, last.instances
    );
    // A count between them that did better: the curve rose, then fell back.
    if let Some(peak) = points[1..points.len() - 1]
        .iter()
        .filter(|p| p.sustainable_rate.is_some_and(|r| r > a.max(b)))
        .max_by(|x, y| x.sustainable_rate.partial_cmp(&y.sustainable_rate).unwrap())
    {
        let rate = peak.sustainable_rate.unwrap_or_default();
        shape.push_str(&format!(
            " (it peaked at {} instances: {rate:.1} operations/s, {:.2}× the first, then fell \
             back)",
            peak.instances,
            rate / a
        ));
    }
    if gain >= 0.8 * ideal {
        format!("{shape}: close to linear")
    } else if busiest >= 0.8 * machine {
        format!(
            "{shape}: the curve flattened because the machine's CPU was the limit: every role \
             and the generator share its {cores} cores, and where a count broke they were \
             {busiest:.0}% of {machine:.0}% busy. \
             More instances on the same cores only share them; on more machines the processors' \
             figure scales by the per-core cost below"
        )
    } else {
        format!(
            "{shape}: the curve flattened with CPU to spare (the machine at most {busiest:.0}% \
             of {machine:.0}% busy where a count broke), so a shared stage was the limit: see \
             each count's bottleneck"
        )
    }
}

/// Per-core figures from the count with the highest sustainable rate, scaled to the targets.
fn sizing(
    scenario: &Scenario,
    points: &[ScalePoint],
    reports: &[report::Report],
) -> Option<Sizing> {
    // The fewest instances that reached the highest rate: the least oversubscribed cores.
    let mut best: Option<(&ScalePoint, &report::Report)> = None;
    for (p, r) in points.iter().zip(reports) {
        if p.sustainable_rate.unwrap_or(0.0)
            > best.map_or(0.0, |b| b.0.sustainable_rate.unwrap_or(0.0))
        {
            best = Some((p, r));
        }
    }
    let (point, report) = best?;
    let capacity = report.capacity.as_ref()?;
    let held = last_held(capacity)?;
    let first = capacity.steps.first()?;
    let share = |ops: &[Op], rate: f64| -> f64 {
        ops.iter().map(|op| op.weight(&scenario.mix)).sum::<u32>() as f64
            / scenario.total_weight().max(1) as f64
            * rate
    };
    let uploads_at = |rate| share(&[Op::UploadPhoto, Op::UploadDirect], rate);
    // The query role also answered the generator's polls that follow each upload.
    let uploaded: u64 = report
        .operations
        .iter()
        .filter(|o| o.op.starts_with("upload"))
        .map(|o| o.ok)
        .sum();
    let polls_per_upload = report.watch_requests as f64 / uploaded.max(1) as f64;
    let reads_at = |rate| {
        share(&[Op::ReadItem, Op::ReadTimeline, Op::FetchThumbnail], rate)
            + uploads_at(rate) * polls_per_upload
    };
    let (uploads, reads) = (uploads_at(held.rate), reads_at(held.rate));
    let events = share(&[Op::PostEvents], held.rate);
    let (at_first, at_held) = (by_role(first), by_role(held));
    // Each role's marginal cost per the operation that drives it (a read for `query`, an
    // upload for the rest, with the events the mix posts per upload for `ingest` and
    // `project`): the slope of its CPU between the first step and the last that held, so its
    // fixed costs (consumer polls, metrics, cache tails) are not spread over the operations.
    // With one step held, the mean at that step.
    let mut cores_per_op = BTreeMap::new();
    let mut cautions = Vec::new();
    if point.bottleneck.is_none() {
        cautions.push(
            "CAUTION: this count broke on nothing, so its steps may all be far below capacity"
                .to_owned(),
        );
    }
    for role in ["ingest", "process", "project", "query"] {
        let driver = |rate| {
            if role == "query" {
                reads_at(rate)
            } else {
                uploads_at(rate)
            }
        };
        let cpu = |roles: &BTreeMap<String, f64>| roles.get(role).copied().unwrap_or(0.0) / 100.0;
        let (d0, d1) = (driver(first.rate), driver(held.rate));
        let slope = (d1 > d0 * 1.5).then(|| (cpu(&at_held) - cpu(&at_first)) / (d1 - d0));
        let cost = match slope {
            Some(slope) if slope > 0.0 => slope,
            _ if d1 > 0.0 => {
                cautions.push(format!(
                    "CAUTION: {role}'s figure is its mean CPU per operation at the last step \
                     that held, fixed costs included (an upper bound): {}",
                    if slope.is_some() {
                        "its CPU did not rise between the steps (noise at these rates)"
                    } else {
                        "fewer than two steps held far enough apart for a slope"
                    }
                ));
                cpu(&at_held) / d1
            }
            _ => continue,
        };
        cores_per_op.insert(role.to_owned(), cost);
    }
    let rows = SIZING_TARGETS
        .iter()
        .map(|&(up, rd)| {
            let mut cores = BTreeMap::new();
            let mut replicas = BTreeMap::new();
            for (role, cost) in &cores_per_op {
                let driver = if role == "query" { rd } else { up };
                let need = cost * driver / TARGET_UTILISATION;
                cores.insert(role.clone(), need);
                replicas.insert(role.clone(), (need / CORES_PER_POD).ceil().max(1.0) as u64);
            }
            SizingRow {
                uploads_per_sec: up,
                reads_per_sec: rd,
                cores,
                replicas,
            }
        })
        .collect();
    Some(Sizing {
        cores_per_op,
        measured_at: format!(
            "{} × process and project, from the first step ({:.1} operations/s of the mix) to the last that \
             held ({:.1}/s: {uploads:.1} uploads/s, {reads:.1} reads/s with the generator's \
             polls, {events:.1} events/s)",
            point.instances, first.rate, held.rate
        ),
        target_utilisation: TARGET_UTILISATION,
        rows,
        assumptions: cautions.into_iter().chain([
            format!(
                "uploads are the scenario's photos ({} JPEGs); larger photos cost the processor \
                 more, roughly in proportion to their pixels",
                scenario.photos.size
            ),
            format!(
                "each role's cost is linear in its own operations: ingest, process and project \
                 per upload (with the mix's {:.2} posted events per upload), query per read; \
                 the query figure includes the generator's polls that follow uploads, so it \
                 is a little high",
                if uploads > 0.0 { events / uploads } else { 0.0 }
            ),
            format!(
                "measured with every role on one {}-core machine, where they share the cores: \
                 a role on cores of its own costs no more",
                std::thread::available_parallelism().map_or(1, |n| n.get())
            ),
            format!(
                "sized to run at {:.0}% CPU (the HPAs' target), in pods of {CORES_PER_POD:.0} \
                 cores; processors past the partition count sit idle",
                TARGET_UTILISATION * 100.0
            ),
            "Kafka, the object store and the read store are sized apart; their own limits are \
             not in these figures"
                .into(),
        ]).collect(),
    })
}

fn print(report: &ScaleReport) {
    let cautions = report
        .sizing
        .iter()
        .flat_map(|s| s.assumptions.iter())
        .filter(|a| a.starts_with("CAUTION"));
    println!(
        "scaling curve: {} on Kafka {}",
        report.scenario, report.kafka
    );
    for p in &report.points {
        println!(
            "  {:>2} × process and project: {:>8} operations/s, CPU at capacity {:>4.0}% ({}); broke on: {}",
            p.instances,
            p.sustainable_rate
                .map_or("none".into(), |r| format!("{r:.1}")),
            p.cpu_percent_at_capacity,
            p.cpu_by_role_at_capacity
                .iter()
                .map(|(r, c)| format!("{r} {c:.0}%"))
                .collect::<Vec<_>>()
                .join(", "),
            p.bottleneck
                .as_deref()
                .unwrap_or("nothing (raise --max-steps)")
        );
    }
    println!("  {}", report.verdict);
    if let Some(s) = &report.sizing {
        println!("  sizing, from {}:", s.measured_at);
        for row in &s.rows {
            println!(
                "    {:>6.0} uploads/s with {:>6.0} reads/s: {}",
                row.uploads_per_sec,
                row.reads_per_sec,
                row.replicas
                    .iter()
                    .map(|(r, n)| format!(
                        "{r} {n} × {CORES_PER_POD:.0} cores ({:.1})",
                        row.cores[r]
                    ))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    for caution in cautions {
        println!("  {caution}");
    }
}

fn html_report(report: &ScaleReport) -> String {
    let esc = report::escape;
    let curve = report::chart(
        "Highest sustainable rate by instances",
        "operations/s",
        "process and project instances",
        &[(
            "sustainable rate".into(),
            report
                .points
                .iter()
                .map(|p| (p.instances as f64, p.sustainable_rate.unwrap_or(0.0)))
                .collect(),
        )],
    );
    let roles: std::collections::BTreeSet<&String> = report
        .points
        .iter()
        .flat_map(|p| p.cpu_by_role_at_capacity.keys())
        .collect();
    let mut cpu_series: Vec<(String, Vec<(f64, f64)>)> = roles
        .iter()
        .map(|role| {
            (
                (*role).clone(),
                report
                    .points
                    .iter()
                    .map(|p| {
                        (
                            p.instances as f64,
                            p.cpu_by_role_at_capacity.get(*role).copied().unwrap_or(0.0),
                        )
                    })
                    .collect(),
            )
        })
        .collect();
    cpu_series.push((
        "total".into(),
        report
            .points
            .iter()
            .map(|p| (p.instances as f64, p.cpu_percent_at_capacity))
            .collect(),
    ));
    let cpu = report::chart(
        "CPU at capacity, per role",
        "% of one core",
        "process and project instances",
        &cpu_series,
    );
    let points: String = report
        .points
        .iter()
        .map(|p| {
            format!(
                "<tr><td>{}</td><td>{}</td><td>{:.0}</td><td>{}</td><td><a href=\"{}\">report</a></td></tr>\n",
                p.instances,
                p.sustainable_rate.map_or("none".into(), |r| format!("{r:.1}")),
                p.cpu_percent_at_capacity,
                esc(p.bottleneck.as_deref().unwrap_or("nothing broke")),
                esc(&p.report)
            )
        })
        .collect();
    let sizing = report.sizing.as_ref().map_or(String::new(), |s| {
        let roles: Vec<&String> = s.cores_per_op.keys().collect();
        let head: String = roles.iter().map(|r| format!("<th>{}</th>", esc(r))).collect();
        let rows: String = s
            .rows
            .iter()
            .map(|row| {
                let cells: String = roles
                    .iter()
                    .map(|r| {
                        format!(
                            "<td>{} × {CORES_PER_POD:.0} ({:.1} cores)</td>",
                            row.replicas[*r], row.cores[*r]
                        )
                    })
                    .collect();
                format!(
                    "<tr><td>{:.0} uploads/s, {:.0} reads/s</td>{cells}</tr>\n",
                    row.uploads_per_sec, row.reads_per_sec
                )
            })
            .collect();
        let costs: String = s
            .cores_per_op
            .iter()
            .map(|(r, c)| {
                let per = if r == "query" { "read" } else { "upload" };
                format!("{} {:.2} ms of CPU per {per}", esc(r), c * 1000.0)
            })
            .collect::<Vec<_>>()
            .join("; ");
        let assumptions: String = s
            .assumptions
            .iter()
            .map(|a| format!("<li>{}</li>", esc(a)))
            .collect();
        format!(
            "<h2>Sizing</h2>\n<p>Measured at {}: {costs}.</p>\n<table><tr><th>target</th>{head}</tr>\n{rows}</table>\n\
             <p>Assumptions:</p><ul>{assumptions}</ul>\n",
            esc(&s.measured_at)
        )
    });
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Conveyor scaling curve: {name}</title>\n\
         <style>{style}</style></head><body>\n<h1>Scaling curve: {name}</h1>\n\
         <p>Kafka {kafka}, read store {views}, {cores} cores. Each count ran <code>--find-capacity</code> \
         against one ingest, one query and that many process and project instances.</p>\n\
         <p><b>{verdict}</b></p>\n<table><tr><th>instances</th><th>sustainable ops/s</th><th>CPU % at capacity</th>\
         <th>what broke</th><th></th></tr>\n{points}</table>\n{sizing}<h2>Charts</h2>\n<figure>{curve}</figure>\n\
         <figure>{cpu}</figure>\n</body></html>\n",
        name = esc(&report.scenario),
        style = report::STYLE,
        kafka = esc(&report.kafka),
        views = esc(&report.views),
        cores = report.cores,
        verdict = esc(&report.verdict),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(instances: usize, rate: Option<f64>, broke: bool, machine: f64) -> ScalePoint {
        ScalePoint {
            instances,
            sustainable_rate: rate,
            bottleneck: broke.then(|| "consumer group processor".to_owned()),
            cpu_percent_at_capacity: 100.0,
            cpu_by_role_at_capacity: BTreeMap::new(),
            machine_cpu_percent_at_break: broke.then_some(machine),
            report: String::new(),
        }
    }

    #[test]
    fn the_verdict_says_why_the_curve_bends_and_when_there_is_none() {
        let flat = [
            point(1, Some(200.0), true, 190.0),
            point(4, Some(200.0), true, 195.0),
        ];
        assert!(verdict(&flat, 2).contains("the machine's CPU was the limit"));
        assert!(!verdict(&flat, 2).contains("peaked"));
        let peaked = [
            point(1, Some(200.0), true, 170.0),
            point(2, Some(300.0), true, 195.0),
            point(4, Some(200.0), true, 190.0),
        ];
        let said = verdict(&peaked, 2);
        assert!(
            said.contains("1.00× for 4× the instances (it peaked at 2 instances: 300.0 operations/s, 1.50× the first, then fell back)"),
            "{said}"
        );
        assert!(said.contains("the machine's CPU was the limit"), "{said}");
        let linear = [
            point(1, Some(100.0), true, 60.0),
            point(2, Some(195.0), true, 120.0),
        ];
        assert!(verdict(&linear, 4).contains("close to linear"));
        let idle = [
            point(1, Some(100.0), true, 50.0),
            point(2, Some(100.0), true, 60.0),
        ];
        assert!(verdict(&idle, 4).contains("with CPU to spare"));
        let unbroken = [
            point(1, Some(40.0), false, 0.0),
            point(2, Some(40.0), false, 0.0),
        ];
        assert!(verdict(&unbroken, 2).contains("lower bound"));
        assert!(verdict(&[point(1, None, true, 0.0)], 2).contains("held no step"));
        assert!(verdict(&[point(1, Some(9.0), true, 0.0)], 2).contains("two counts"));
    }

    #[test]
    fn assigned_partitions_are_summed_over_groups() {
        let page = "conveyor_consumer_assigned_partitions{group=\"processor-x\"} 3\n\
                    conveyor_consumer_lag_total{group=\"processor-x\"} 7\n";
        assert_eq!(assigned_partitions(page), 3.0);
        assert_eq!(assigned_partitions(""), 0.0);
    }
}
