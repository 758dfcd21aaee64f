//! What operators see, against the real backends: one upload's trace in Zipkin (from
//! `scripts/engines`), across one `serve` process and across separate `ingest`, `process` and
//! `project` processes on Kafka; and the Grafana dashboard's every query answered with data by
//! a real Prometheus (Debian's) scraping a `serve` under a short load.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use conveyor_storage::testing;
use conveyor_tests::helpers::{ALICE, Process, kafka_brokers, start_process, wait_until};
use conveyor_tests::images;
use serde_json::Value;

/// The Zipkin server `scripts/test` started, or `None` after a loud skip (a failure on CI).
fn zipkin() -> Option<String> {
    testing::engine("CONVEYOR_TEST_ZIPKIN", "a trace test")
}

/// A W3C `traceparent` with a trace id of this test's own, so the trace can be fetched by id,
/// and the parent span id the request span must name.
fn traceparent() -> (String, String, String) {
    let trace_id = uuid::Uuid::new_v4().simple().to_string();
    let parent = uuid::Uuid::new_v4().simple().to_string()[..16].to_owned();
    (format!("00-{trace_id}-{parent}-01"), trace_id, parent)
}

/// Uploads `jpeg` as alice with `headers` on the request, and returns its id (after a 202).
async fn upload(address: &str, jpeg: Vec<u8>, headers: &[(&str, &str)]) -> String {
    let form = reqwest::multipart::Form::new().part(
        "file",
        reqwest::multipart::Part::bytes(jpeg).file_name("p.jpg"),
    );
    let mut request = reqwest::Client::new()
        .post(format!("{address}/v1/media"))
        .bearer_auth(ALICE)
        .multipart(form);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), 202);
    let body: Value = response.json().await.unwrap();
    body["id"].as_str().unwrap().to_owned()
}

/// One span as Zipkin's API returns it.
#[derive(Debug, Clone)]
struct Span {
    id: String,
    parent: Option<String>,
    name: String,
    service: String,
    kind: Option<String>,
    /// Microseconds since the epoch.
    start: i64,
    duration: i64,
    tags: HashMap<String, String>,
}

impl Span {
    fn end(&self) -> i64 {
        self.start + self.duration
    }
}

async fn spans_of(zipkin: &str, trace_id: &str) -> Vec<Span> {
    let response = reqwest::get(format!("{zipkin}/api/v2/trace/{trace_id}"))
        .await
        .unwrap();
    if !response.status().is_success() {
        return Vec::new();
    }
    let spans: Vec<Value> = response.json().await.unwrap();
    spans
        .into_iter()
        .map(|s| Span {
            id: s["id"].as_str().unwrap().to_owned(),
            parent: s["parentId"].as_str().map(str::to_owned),
            name: s["name"].as_str().unwrap_or_default().to_owned(),
            service: s["localEndpoint"]["serviceName"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            kind: s["kind"].as_str().map(str::to_owned),
            start: s["timestamp"].as_i64().unwrap_or_default(),
            duration: s["duration"].as_i64().unwrap_or_default(),
            tags: serde_json::from_value(s["tags"].clone()).unwrap_or_default(),
        })
        .collect()
}

/// Whether `ancestor` is `span`'s parent, or its parent's, and so on.
fn descends_from(spans: &[Span], span: &Span, ancestor: &Span) -> bool {
    let mut parent = span.parent.clone();
    while let Some(id) = parent {
        if id == ancestor.id {
            return true;
        }
        parent = spans
            .iter()
            .find(|s| s.id == id)
            .and_then(|s| s.parent.clone());
    }
    false
}

/// Where to find one upload's trace, and what its spans must be named.
struct Trace<'a> {
    zipkin: &'a str,
    id: &'a str,
    /// The span id of the `traceparent` the upload was sent with.
    client_span: &'a str,
    topic: &'a str,
    /// The processor's and the projector's consumer groups.
    groups: [&'a str; 2],
    /// The services of the ingest edge, the processor and the projector.
    services: [&'a str; 3],
}

/// Waits (bounded: the exporter sends every 5 s) for the trace to hold the upload request, the
/// processor's span, the projector's span of the outcome and the wait in the log between them,
/// and checks how they hang together.
async fn assert_one_trace(trace: Trace<'_>) {
    let Trace {
        zipkin,
        id: trace_id,
        client_span,
        topic,
        groups: [processor_group, projector_group],
        services: [ingest, process, project],
    } = trace;
    let processing = format!("{processor_group} mediauploaded");
    let projecting = format!("{projector_group} mediaprocessed");
    let deadline = Instant::now() + Duration::from_secs(90);
    let spans = loop {
        let spans = spans_of(zipkin, trace_id).await;
        let has = |name: &str| spans.iter().any(|s| s.name == name);
        if has("post /v1/media") && has(&processing) && has(&projecting) {
            break spans;
        }
        assert!(
            Instant::now() < deadline,
            "after 90 s the trace still lacks the request, the processing or the projection: \
             {spans:#?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let named = |name: &str| {
        spans
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no span {name:?} in {spans:#?}"))
            .clone()
    };
    // The request: a server span, the child of the caller's own span, with its status.
    let request = named("post /v1/media");
    assert_eq!(request.parent.as_deref(), Some(client_span), "{request:?}");
    assert_eq!(request.service, ingest);
    assert_eq!(request.kind.as_deref(), Some("SERVER"));
    assert_eq!(request.tags["http.response.status_code"], "202");
    assert_eq!(request.tags["http.route"], "/v1/media");

    // The processor's span is the request's child, in the processor's process.
    let processor = named(&processing);
    assert_eq!(
        processor.parent.as_ref(),
        Some(&request.id),
        "{processor:?}"
    );
    assert_eq!(processor.service, process);
    assert_eq!(processor.kind.as_deref(), Some("CONSUMER"));
    assert_eq!(processor.tags["messaging.destination.name"], topic);

    // The wait in the log sits between the append (in the request) and the processing. Kafka
    // stamps records in milliseconds, so the append may read up to 1 ms before the request.
    let wait_name = format!("mediauploaded waits in {topic}");
    let wait = spans
        .iter()
        .find(|s| s.name == wait_name && s.tags["messaging.consumer.group.name"] == processor_group)
        .unwrap_or_else(|| panic!("no wait span {wait_name:?} for the processor in {spans:#?}"));
    assert_eq!(wait.parent.as_ref(), Some(&request.id), "{wait:?}");
    assert_eq!(wait.service, process, "the consumer measures the wait");
    assert!(
        wait.start + 1_000 >= request.start,
        "{wait:?} starts before {request:?}"
    );
    assert!(
        wait.start <= request.end(),
        "{wait:?} starts after {request:?} ended"
    );
    if ingest == process {
        // One clock: the wait ends where the processing begins.
        assert!(
            wait.end() <= processor.start + 1_000,
            "{wait:?} ends after {processor:?} began"
        );
    }

    // The projection of the outcome follows from the processing: the processor appended the
    // outcome inside its span, and the projector's span of it descends from that span.
    let projection = named(&projecting);
    assert_eq!(projection.service, project);
    assert!(
        descends_from(&spans, &projection, &processor),
        "{projection:?} is not under {processor:?} in {spans:#?}"
    );
    let outcome_wait = format!("mediaprocessed waits in {topic}");
    assert!(
        spans.iter().any(|s| s.name == outcome_wait
            && s.tags["messaging.consumer.group.name"] == projector_group
            && descends_from(&spans, s, &processor)),
        "no wait of the outcome for the projector in {spans:#?}"
    );
}

async fn wait_processed(query: &str, id: &str) {
    let client = reqwest::Client::new();
    wait_until(Duration::from_secs(60), || async {
        let response = client
            .get(format!("{query}/v1/media/{id}"))
            .bearer_auth(ALICE)
            .send()
            .await
            .ok()?;
        let body: Value = response.json().await.ok()?;
        (body["status"] == "processed").then_some(())
    })
    .await
    .unwrap_or_else(|| panic!("{id} was never processed"));
}

fn traced_env(zipkin: &str) -> Vec<(&'static str, String)> {
    vec![
        ("CONVEYOR__AUTH__API_KEYS", format!("alice:{ALICE}")),
        (
            "CONVEYOR__TELEMETRY__ZIPKIN_ENDPOINT",
            format!("{zipkin}/api/v2/spans"),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_holds_an_upload_its_processing_and_its_projection_in_serve() {
    let Some(zipkin) = zipkin() else { return };
    let dir = tempfile::tempdir().unwrap();
    let serve = start_process("serve", dir.path(), &traced_env(&zipkin));
    let (traceparent, trace_id, client_span) = traceparent();
    let id = upload(
        &serve.address,
        images::jpeg(320, 240, 7),
        &[("traceparent", &traceparent)],
    )
    .await;
    wait_processed(&serve.address, &id).await;
    let trace = Trace {
        zipkin: &zipkin,
        id: &trace_id,
        client_span: &client_span,
        topic: "media.events",
        groups: ["processor", "projector"],
        services: ["conveyor-serve"; 3],
    };
    assert_one_trace(trace).await;

    // Reported: a refused upload's span did not say why. Bytes that are no image, sent as one:
    // the span carries the 415 and its error code.
    let (refused_parent, refused_trace, _) = self::traceparent();
    let form = reqwest::multipart::Form::new().part(
        "file",
        reqwest::multipart::Part::bytes(vec![7u8; 4096])
            .file_name("p.jpg")
            .mime_str("image/jpeg")
            .unwrap(),
    );
    let response = reqwest::Client::new()
        .post(format!("{}/v1/media", serve.address))
        .bearer_auth(ALICE)
        .header("traceparent", &refused_parent)
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 415);
    let deadline = Instant::now() + Duration::from_secs(90);
    let refused = loop {
        let spans = spans_of(&zipkin, &refused_trace).await;
        if let Some(span) = spans.into_iter().find(|s| s.name == "post /v1/media") {
            break span;
        }
        assert!(
            Instant::now() < deadline,
            "the refused upload's span never arrived"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(refused.tags["http.response.status_code"], "415");
    assert_eq!(refused.tags["error.type"], "unsupported_media_type");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_crosses_the_ingest_process_and_project_processes_on_kafka() {
    let (Some(zipkin), Some(brokers)) = (zipkin(), kafka_brokers()) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let run = uuid::Uuid::new_v4().simple().to_string();
    let topic = format!("traces-{run}");
    let mut env = traced_env(&zipkin);
    env.extend([
        ("CONVEYOR__LOG__URI", format!("kafka://{brokers}")),
        ("CONVEYOR__LOG__TOPIC", topic.clone()),
        ("CONVEYOR__LOG__PARTITIONS", "4".to_owned()),
        ("CONVEYOR__LOG__DURABILITY", "os".to_owned()),
        ("CONVEYOR__PROCESSOR__GROUP", format!("processor-{run}")),
        ("CONVEYOR__PROJECTOR__GROUP", format!("projector-{run}")),
        ("CONVEYOR__VIDEO__GROUP", format!("transcoder-{run}")),
    ]);
    // The ingest edge creates the topic; the consumers join once it exists.
    let ingest = start_process("ingest", dir.path(), &env);
    let _consumers: Vec<Process> = ["process", "project"]
        .iter()
        .map(|role| start_process(role, dir.path(), &env))
        .collect();
    let query = start_process("query", dir.path(), &env);
    let (traceparent, trace_id, client_span) = traceparent();
    let id = upload(
        &ingest.address,
        images::jpeg(320, 240, 7),
        &[("traceparent", &traceparent)],
    )
    .await;
    wait_processed(&query.address, &id).await;
    let trace = Trace {
        zipkin: &zipkin,
        id: &trace_id,
        client_span: &client_span,
        topic: &topic,
        groups: [&format!("processor-{run}"), &format!("projector-{run}")],
        services: ["conveyor-ingest", "conveyor-process", "conveyor-project"],
    };
    assert_one_trace(trace).await;
}

/// Every record's headers on `topic` of the embedded log in `data_dir`.
async fn record_headers(data_dir: &Path, topic: &str) -> Vec<Vec<(String, String)>> {
    let settings = conveyor_config::Settings::for_test(data_dir);
    let log = conveyor_storage::backends::open_log(&settings).unwrap();
    let mut headers = Vec::new();
    for p in log.lag(topic, "nobody").await.unwrap() {
        for record in log.read(topic, p.partition, 0, 1_000).await.unwrap() {
            headers.push(record.headers);
        }
    }
    headers
}

/// Reported: a caller decided what was traced (`sampled` in its `traceparent`, even on a
/// server keeping no trace), and its `tracestate`, up to 400 KB, was copied into every record
/// its request caused. Now the edge keeps `trace_sample_ratio` of the traces whatever the
/// caller asks, continues the caller's trace id, and drops its `tracestate`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_neither_forces_sampling_nor_fills_the_log_with_its_tracestate() {
    let Some(zipkin) = zipkin() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut env = traced_env(&zipkin);
    env.push(("CONVEYOR__TELEMETRY__TRACE_SAMPLE_RATIO", "0".to_owned()));
    let serve = start_process("serve", dir.path(), &env);
    let (traceparent, trace_id, _) = traceparent();
    let state = (0..32)
        .map(|i| format!("vendor{i}={}", "x".repeat(200)))
        .collect::<Vec<_>>()
        .join(",");
    let headers = [
        ("traceparent", traceparent.as_str()),
        ("tracestate", &state),
    ];
    let id = upload(&serve.address, images::jpeg(64, 48, 3), &headers).await;
    wait_processed(&serve.address, &id).await;
    drop(serve);
    let records = record_headers(dir.path(), "media.events").await;
    assert_eq!(records.len(), 2, "the upload and its outcome: {records:?}");
    for headers in &records {
        let names: Vec<&str> = headers.iter().map(|(name, _)| name.as_str()).collect();
        assert!(!names.contains(&"tracestate"), "{headers:?}");
        let parent = headers
            .iter()
            .find(|(name, _)| name == "traceparent")
            .map(|(_, value)| value.as_str())
            .unwrap_or_else(|| panic!("no traceparent in {headers:?}"));
        // The caller's trace, not sampled: the ratio is 0, whatever the caller's flag said.
        assert!(parent.starts_with(&format!("00-{trace_id}-")), "{parent}");
        assert!(parent.ends_with("-00"), "{parent}");
        assert!(
            headers
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
                < 300,
            "{headers:?}"
        );
    }
}

/// A free loopback port, for a server that must be told its port (Prometheus).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Debian's Prometheus, scraping `target` (`host:port`) every second, with its data in `dir`.
/// Killed when dropped.
struct Prometheus(Process);

impl Prometheus {
    /// `None`, after a loud skip, when Prometheus is not installed (a failure on CI, where
    /// `scripts/deps --test` installs it).
    fn start(dir: &Path, target: &str) -> Option<Prometheus> {
        let binary = ["/usr/bin/prometheus", "/usr/local/bin/prometheus"]
            .into_iter()
            .find(|p| Path::new(p).exists());
        let Some(binary) = binary else {
            let message = "the dashboard test did not run: prometheus is not installed \
                           (scripts/deps --test installs Debian's)";
            assert!(!testing::on_ci(), "{message}, and CI is set");
            eprintln!("SKIPPED: {message}");
            return None;
        };
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
                 scrape_configs:\n  - job_name: conveyor-serve\n    \
                 static_configs: [{{targets: ['{target}']}}]\n"
            ),
        )
        .unwrap();
        let port = free_port();
        let child = std::process::Command::new(binary)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("prometheus starts");
        Some(Prometheus(Process {
            child,
            address: format!("http://127.0.0.1:{port}"),
        }))
    }

    /// The instant query's result vector, or `None` while Prometheus does not answer.
    async fn query(&self, expr: &str) -> Option<Vec<Value>> {
        let body: Value = reqwest::Client::new()
            .get(format!("{}/api/v1/query", self.0.address))
            .query(&[("query", expr)])
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        assert_eq!(body["status"], "success", "{expr}: {body}");
        Some(
            body["data"]["result"]
                .as_array()
                .cloned()
                .unwrap_or_default(),
        )
    }
}

/// Every query of infra/grafana/conveyor.json, by panel title, with `$__rate_interval` as 30s.
fn dashboard_queries() -> Vec<(String, String)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../infra/grafana/conveyor.json");
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        if panel["type"] == "row" {
            continue;
        }
        let title = panel["title"].as_str().unwrap().to_owned();
        let targets = panel["targets"].as_array().expect("a panel has queries");
        assert!(!targets.is_empty(), "panel {title:?} has no query");
        for target in targets {
            let expr = target["expr"].as_str().unwrap();
            queries.push((title.clone(), expr.replace("$__rate_interval", "30s")));
        }
    }
    queries
}

/// Whether a result vector holds at least one sample that is a number (a quantile over no
/// events is NaN: no data to show).
fn has_a_number(result: &[Value]) -> bool {
    result.iter().any(|series| {
        series["value"][1]
            .as_str()
            .and_then(|v| v.parse::<f64>().ok())
            .is_some_and(f64::is_finite)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_panel_has_data_from_a_real_prometheus() {
    let dir = tempfile::tempdir().unwrap();
    let serve = start_process(
        "serve",
        &dir.path().join("serve"),
        &[("CONVEYOR__AUTH__API_KEYS", format!("alice:{ALICE}"))],
    );
    let target = serve.address.trim_start_matches("http://").to_owned();
    let Some(prometheus) = Prometheus::start(dir.path(), &target) else {
        return;
    };
    let queries = dashboard_queries();
    // A short load, kept up until every panel shows it: uploads, their processing, and reads
    // of each (the second read of an item is a cache hit).
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut round = 0u32;
    loop {
        let mut ids = Vec::new();
        for i in 0..5 {
            let jpeg = images::jpeg(64, 48, round * 5 + i);
            ids.push(upload(&serve.address, jpeg, &[]).await);
        }
        for id in &ids {
            wait_processed(&serve.address, id).await;
            for _ in 0..3 {
                let status = client
                    .get(format!("{}/v1/media/{id}", serve.address))
                    .send()
                    .await
                    .unwrap()
                    .status();
                assert_eq!(status, 200);
            }
        }
        let mut empty = Vec::new();
        for (title, expr) in &queries {
            match prometheus.query(expr).await {
                Some(result) if has_a_number(&result) => {}
                _ => empty.push(format!("{title}: {expr}")),
            }
        }
        if empty.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after 120 s of load these panels still have no data:\n{}",
            empty.join("\n")
        );
        round += 1;
    }
}
