//! `conveyor loadtest run` against a real `serve`: the reports hold every operation's
//! percentiles, the pipeline's latency and lag, wrk's figures beside the generator's, and
//! charts that drew (in headless Chromium too); a threshold that cannot hold fails the run and
//! is named. `conveyor loadtest scale` on Kafka measures a point per instance count.

use conveyor_tests::helpers::{
    ALICE, Slowed, conveyor_binary, kafka_brokers, spawn_app_wrapping, start_process,
};
use serde_json::Value;

const SCENARIO: &str = r#"
name = "short mix"
thresholds = THRESHOLDS

[[stages]]
kind = "ramp"
from = 5
to = 30
duration = "3s"

[[stages]]
kind = "constant"
rate = 30
duration = "2s"

[mix]
upload_photo = 1
upload_direct = 1
read_item = 3
read_timeline = 1
fetch_thumbnail = 1
post_events = 1

[photos]
size = "320x240"
count = 3
"#;

/// Runs `loadtest run` with `thresholds` and `extra` arguments against `address`; returns its
/// exit status, stderr, and the report directory.
fn run(
    address: &str,
    dir: &std::path::Path,
    thresholds: &str,
    extra: &[&str],
) -> (std::process::Output, std::path::PathBuf) {
    let scenario = dir.join(format!("scenario-{}.toml", thresholds.len()));
    std::fs::write(&scenario, SCENARIO.replace("THRESHOLDS", thresholds)).unwrap();
    let out = dir.join(format!("report-{}", thresholds.len()));
    let output = std::process::Command::new(conveyor_binary())
        .args(["loadtest", "run"])
        .arg(&scenario)
        .args([
            "--target",
            address,
            "--key",
            ALICE,
            "--service-key",
            "svc-key",
            "--out",
        ])
        .arg(&out)
        .args(extra)
        .output()
        .unwrap();
    (output, out)
}

/// Runs `command` off the runtime and checks that it succeeded; returns its stdout.
async fn succeeds(mut command: std::process::Command) -> String {
    let output = tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// The `points` of every data line (plotters draws series 2 px wide) in an SVG.
fn data_lines(svg: &str) -> Vec<usize> {
    svg.split("stroke-width=\"2\" points=\"")
        .skip(1)
        .map(|rest| rest.split('"').next().unwrap().split_whitespace().count())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_scenario_reports_every_operation_and_a_broken_threshold_fails_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_process(
        "serve",
        dir.path(),
        &[
            ("CONVEYOR__AUTH__API_KEYS", format!("alice:{ALICE}")),
            ("CONVEYOR__AUTH__SERVICE_KEYS", "svc:svc-key".to_owned()),
        ],
    );
    let address = server.address.clone();
    let path = dir.path().to_owned();
    let (output, out) = tokio::task::spawn_blocking(move || {
        run(
            &address,
            &path,
            r#"["read_item p99 < 10s", "errors < 5%", "lag bounded"]"#,
            &[],
        )
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    let operations = report["operations"].as_array().unwrap();
    let names: Vec<&str> = operations
        .iter()
        .map(|o| o["op"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "upload_photo",
            "upload_direct",
            "read_item",
            "read_timeline",
            "fetch_thumbnail",
            "post_events"
        ]
    );
    for op in operations {
        assert!(op["ok"].as_u64().unwrap() > 0, "{op}");
        let latency = &op["latency_ms"];
        for p in ["p50", "p90", "p99", "p999", "max"] {
            assert!(latency[p].as_f64().unwrap() > 0.0, "{op}");
        }
        assert!(latency["p50"].as_f64() <= latency["p99"].as_f64());
    }
    assert!(report["processed_ms"]["count"].as_u64().unwrap() > 0);
    assert!(
        report["offered"].as_u64().unwrap() >= 60,
        "{}",
        report["offered"]
    );
    assert_eq!(report["dropped"], 0);
    // The server itself was found and sampled, and every group's lag was read.
    let samples = &report["samples"];
    assert_eq!(
        samples["processes"]["server"]["pid"].as_u64(),
        Some(u64::from(server.child.id())),
        "{samples}"
    );
    assert!(
        samples["rss_mib"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r.as_f64().unwrap() > 1.0)
    );
    for group in ["processor", "projector", "transcoder"] {
        assert!(
            samples["lag"][group].as_array().unwrap().len() >= 4,
            "{group}: {samples}"
        );
    }
    assert!(
        report["thresholds"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["passed"] == true)
    );
    // wrk read the same item as hard as it could, then the generator offered that rate: both
    // figures are there, from answers that succeeded. (Whether they agree is a measurement
    // of this machine, in the report, not a test.)
    let reference = &report["reference"];
    for field in [
        "reference_per_sec",
        "generator_achieved_per_sec",
        "reference_p99_ms",
    ] {
        assert!(reference[field].as_f64().unwrap() > 0.0, "{reference}");
    }
    assert_eq!(reference["reference_errors"], 0, "{reference}");
    assert_eq!(reference["generator_errors"], 0, "{reference}");
    let ratio = reference["generator_achieved_per_sec"].as_f64().unwrap()
        / reference["reference_per_sec"].as_f64().unwrap();
    assert!((reference["ratio"].as_f64().unwrap() - ratio).abs() < 1e-9);

    // Every chart drew lines with data points.
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    let charts: Vec<&str> = html.split("<svg").skip(1).collect();
    assert_eq!(charts.len(), 6);
    for (i, chart) in charts.iter().enumerate() {
        let lines = data_lines(chart);
        assert!(
            lines.iter().any(|&points| points >= 2),
            "chart {i} has no data: {lines:?}"
        );
    }
    assert!(!html.contains("<script"), "self-contained, no scripts");
    assert!(
        html.contains("the generator against wrk"),
        "the reference is shown"
    );
    rendered_in_chromium(&out.join("report.html"), 6);

    // A threshold that cannot hold fails the run, by name.
    let path = dir.path().to_owned();
    let address = server.address.clone();
    let (output, _) = tokio::task::spawn_blocking(move || {
        run(
            &address,
            &path,
            r#"["read_item p99 < 1us", "errors < 5%"]"#,
            &["--no-reference"],
        )
    })
    .await
    .unwrap();
    assert_eq!(output.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("threshold failed: read_item p99 < 1us"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("errors < 5%"),
        "only the broken one: {stderr}"
    );
}

/// Opens `page` in headless Chromium (Debian's `chromium`): the page logs nothing to the
/// console (no script errors), the DOM Chromium built has `charts` SVGs each with a data line,
/// and the screenshot is not blank.
fn rendered_in_chromium(page: &std::path::Path, charts: usize) {
    let chromium = |args: &[&str]| {
        let output = std::process::Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
            ])
            .args(["--enable-logging=stderr", "--v=0"])
            .args(args)
            .arg(format!("file://{}", page.display()))
            .output()
            .expect("chromium runs (scripts/deps --test installs Debian's chromium)");
        assert!(output.status.success(), "{output:?}");
        output
    };
    let dom = chromium(&["--dump-dom"]);
    let stderr = String::from_utf8_lossy(&dom.stderr);
    let console: Vec<&str> = stderr.lines().filter(|l| l.contains(":CONSOLE")).collect();
    assert!(console.is_empty(), "the page logged: {console:?}");
    let dom = String::from_utf8_lossy(&dom.stdout);
    let svgs: Vec<&str> = dom.split("<svg").skip(1).collect();
    assert_eq!(svgs.len(), charts, "Chromium's DOM has every chart");
    for (i, svg) in svgs.iter().enumerate() {
        assert!(
            data_lines(svg).iter().any(|&points| points >= 2),
            "chart {i} has no data in Chromium's DOM"
        );
    }
    let shot = page.with_extension("png");
    chromium(&[
        "--window-size=900,3000",
        &format!("--screenshot={}", shot.display()),
    ]);
    let image = image::open(&shot).expect("a PNG screenshot").to_rgb8();
    let drawn = image.pixels().filter(|p| p.0 != [255, 255, 255]).count();
    assert!(
        drawn > image.pixels().len() / 50,
        "the screenshot is nearly blank: {drawn} drawn pixels"
    );
}

/// `loadtest scale` at 1 and 2 processor (and projector) instances on Kafka: the report has
/// both points, each with a rate that held and every role's CPU, and its charts drew.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loadtest_scale_measures_a_point_per_instance_count_on_kafka() {
    let Some(brokers) = kafka_brokers() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let scenario = dir.path().join("mix.toml");
    std::fs::write(
        &scenario,
        "[[stages]]\nkind = \"constant\"\nrate = 1\nduration = \"1s\"\n\
         [mix]\nupload_photo = 1\nread_item = 4\npost_events = 1\n\
         [photos]\nsize = \"320x240\"\ncount = 2\n",
    )
    .unwrap();
    let out = dir.path().join("scale");
    let mut scale = std::process::Command::new(conveyor_binary());
    scale
        .args(["loadtest", "scale"])
        .arg(&scenario)
        .args([
            "--kafka",
            &brokers,
            "--instances",
            "1,2",
            "--partitions",
            "4",
        ])
        .args([
            "--from",
            "10",
            "--factor",
            "2",
            "--step",
            "4s",
            "--max-steps",
            "2",
        ])
        .arg("--out")
        .arg(&out);
    let stdout = succeeds(scale).await;
    let report: Value =
        serde_json::from_slice(&std::fs::read(out.join("scale.json")).unwrap()).unwrap();
    let points = report["points"].as_array().unwrap();
    let counts: Vec<u64> = points
        .iter()
        .map(|p| p["instances"].as_u64().unwrap())
        .collect();
    assert_eq!(counts, [1, 2], "{stdout}");
    for point in points {
        assert!(
            point["sustainable_rate"].as_f64().unwrap() >= 10.0,
            "{point}"
        );
        for role in ["ingest", "process", "project", "query"] {
            assert!(
                point["cpu_by_role_at_capacity"][role].as_f64().unwrap() > 0.0,
                "{role}: {point}"
            );
        }
    }
    // Each count's own report sampled every process it started.
    let two: Value =
        serde_json::from_slice(&std::fs::read(out.join("n2/report.json")).unwrap()).unwrap();
    let processes = two["samples"]["processes"].as_object().unwrap();
    let names: Vec<&str> = processes.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        [
            "ingest",
            "process 1",
            "process 2",
            "project 1",
            "project 2",
            "query"
        ]
    );
    let sizing = &report["sizing"];
    assert_eq!(sizing["rows"].as_array().unwrap().len(), 3, "{sizing}");
    assert!(sizing["cores_per_op"]["process"].as_f64().unwrap() > 0.0);
    assert!(!report["verdict"].as_str().unwrap().is_empty());
    rendered_in_chromium(&out.join("scale.html"), 2);
}

#[test]
fn a_remote_target_is_refused_without_allow_remote() {
    let dir = tempfile::tempdir().unwrap();
    let scenario = dir.path().join("s.toml");
    std::fs::write(&scenario, SCENARIO.replace("THRESHOLDS", "[]")).unwrap();
    let output = std::process::Command::new(conveyor_binary())
        .args(["loadtest", "run"])
        .arg(&scenario)
        .args(["--target", "http://192.0.2.1:8080", "--key", "k"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--allow-remote"), "{stderr}");
}

/// `--find-capacity` against a `serve` whose processor is slowed on purpose
/// (a [`Slowed`] stage of 250 ms a batch, one worker: about 4 images a second) names the processor group,
/// not the edge, and the highest rate that held is below where uploads outrun it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn find_capacity_names_a_slowed_processor_as_the_bottleneck() {
    let dir = tempfile::tempdir().unwrap();
    // A group name of this test's own: apps of other tests in this process publish their lag
    // to the same /metrics.
    let group = format!("processor-slowed-{}", uuid::Uuid::new_v4().simple());
    let server = spawn_app_wrapping(
        |s| {
            s.processor.workers = 1;
            s.processor.group = group.clone();
        },
        |stage| match stage.name() {
            "processor" => Slowed::new(stage, std::time::Duration::from_millis(250)),
            _ => stage,
        },
    )
    .await;
    let scenario = dir.path().join("uploads.toml");
    std::fs::write(
        &scenario,
        "[[stages]]\nkind = \"constant\"\nrate = 1\nduration = \"1s\"\n\
         [mix]\nupload_photo = 1\nread_item = 1\n[photos]\nsize = \"320x240\"\ncount = 2\n",
    )
    .unwrap();
    let out = dir.path().join("report");
    let mut run = std::process::Command::new(conveyor_binary());
    run.args(["loadtest", "run"])
        .arg(&scenario)
        .args(["--target", &server.address, "--key", ALICE, "--out"])
        .arg(&out)
        // Steps of 6 s: lag is sampled once a second, and at 16/s the backlog grows by
        // about 4 uploads a second, well past the bound of 10 within one step.
        .args([
            "--find-capacity",
            "--from",
            "2",
            "--factor",
            "2",
            "--step",
            "6s",
        ])
        .args(["--max-steps", "6", "--no-reference"]);
    let stdout = succeeds(run).await;
    let report: Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("report/report.json")).unwrap())
            .unwrap();
    let capacity = &report["capacity"];
    let bottleneck = capacity["bottleneck"].as_str().unwrap_or_default();
    assert!(
        bottleneck.starts_with("consumer group processor"),
        "{bottleneck}\n{stdout}"
    );
    // 8 operations/s offer 4 uploads/s, about what one slowed worker takes; 16 is past it.
    let sustained = capacity["sustainable_rate"].as_f64().unwrap();
    assert!((2.0..16.0).contains(&sustained), "{sustained}\n{stdout}");
    let html = std::fs::read_to_string(dir.path().join("report/report.html")).unwrap();
    assert!(
        html.contains("Bottleneck: <b>consumer group processor"),
        "the report says so"
    );
}

/// Reported: `--find-capacity` against a server killed mid-run printed a "highest sustainable
/// rate" and exited 0. A step that finds the target gone makes the search inconclusive: the
/// run says so and exits 3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn find_capacity_against_a_server_that_dies_is_inconclusive() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_process(
        "serve",
        dir.path(),
        &[("CONVEYOR__AUTH__API_KEYS", format!("alice:{ALICE}"))],
    );
    let scenario = dir.path().join("reads.toml");
    std::fs::write(
        &scenario,
        "[[stages]]\nkind = \"constant\"\nrate = 1\nduration = \"1s\"\n\
         [mix]\nupload_photo = 1\nread_item = 3\n[photos]\nsize = \"64x48\"\ncount = 1\n",
    )
    .unwrap();
    let out = dir.path().join("report");
    let mut run = std::process::Command::new(conveyor_binary());
    run.args(["loadtest", "run"])
        .arg(&scenario)
        .args(["--target", &server.address, "--key", ALICE, "--out"])
        .arg(&out)
        .args([
            "--find-capacity",
            "--from",
            "5",
            "--factor",
            "2",
            "--step",
            "3s",
        ])
        .args(["--max-steps", "4", "--no-reference"]);
    // The seed uploads and the first step (the run prints a line once a step is judged), then
    // the server is gone (SIGKILL on drop). Bounded by the run's own limits: it ends by itself.
    run.stdout(std::process::Stdio::piped());
    let stdout = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        let mut child = run.spawn().unwrap();
        let mut stdout = String::new();
        let mut server = Some(server);
        for line in std::io::BufReader::new(child.stdout.take().unwrap()).lines() {
            let line = line.unwrap();
            if line.starts_with("step 1: ") {
                drop(server.take());
            }
            stdout.push_str(&line);
            stdout.push('\n');
        }
        (child.wait().unwrap(), stdout)
    });
    let (status, stdout) = stdout.await.unwrap();
    let output = std::process::Output {
        status,
        stdout: stdout.into_bytes(),
        stderr: Vec::new(),
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(3), "{stdout}");
    assert!(
        stdout.contains("inconclusive: the target stopped answering"),
        "{stdout}"
    );
    let report: Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(
        report["capacity"]["target_lost"], true,
        "{}",
        report["capacity"]
    );
}

/// The generator runs a thread per CPU, each with a share of the rate: their shares of a stage
/// add up to the whole stage, however few operations it has. (Each thread once rounded its
/// own share down: with two threads, a stage of 3 operations offered 2, one of 1 offered none.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_of_a_short_stage_is_offered_across_the_generator_threads() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_process(
        "serve",
        dir.path(),
        &[("CONVEYOR__AUTH__API_KEYS", format!("alice:{ALICE}"))],
    );
    for (rate, seconds) in [(1, 1), (3, 1), (7, 2)] {
        let scenario = dir.path().join(format!("reads-{rate}.toml"));
        std::fs::write(
            &scenario,
            format!(
                "[[stages]]\nkind = \"constant\"\nrate = {rate}\nduration = \"{seconds}s\"\n\
                 [mix]\nread_item = 1\n[photos]\nsize = \"64x48\"\ncount = 1\n"
            ),
        )
        .unwrap();
        let out = dir.path().join(format!("report-{rate}"));
        let mut run = std::process::Command::new(conveyor_binary());
        run.args(["loadtest", "run"])
            .arg(&scenario)
            .args(["--target", &server.address, "--key", ALICE, "--out"])
            .arg(&out)
            .arg("--no-reference");
        succeeds(run).await;
        let report: Value =
            serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
        let expected = rate * seconds;
        assert_eq!(report["offered"], expected, "rate {rate} for {seconds} s");
        assert_eq!(report["dropped"], 0);
        let reads = &report["operations"][0];
        assert_eq!(reads["op"], "read_item");
        assert_eq!(reads["ok"], expected, "{reads}");
        assert_eq!(reads["errors"], serde_json::json!({}), "{reads}");
    }
}
