//! `spawn_app()` and typed request helpers.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use conveyor::{App, Role};
use conveyor_config::{LogUri, ObjectsUri, ScyllaUri, Settings, ViewsUri};
use conveyor_runtime::Stage;
use conveyor_runtime::consumer::{ConsumerConfig, HandleError, Handler};
use conveyor_storage::log::Delivered;
use conveyor_storage::{Backends, testing};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

/// A running app and a client for it. Dropping it stops the app.
pub struct TestApp {
    pub address: String,
    pub client: reqwest::Client,
    pub settings: Settings,
    pub backends: Backends,
    stop: CancellationToken,
    handle: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    _dir: Option<tempfile::TempDir>,
}

pub const ALICE: &str = "alice-key";
pub const BOB: &str = "bob-key";
pub const SERVICE: &str = "service-key";

/// Spawns `serve` on port 0 in a fresh temp dir with test settings.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

/// Like [`spawn_app`], after `adjust` has changed the settings.
pub async fn spawn_app_with(adjust: impl FnOnce(&mut Settings)) -> TestApp {
    conveyor_runtime::telemetry::init_for_tests();
    let dir = tempfile::tempdir().expect("temp dir");
    let mut settings = Settings::for_test(dir.path());
    adjust(&mut settings);
    let mut app = spawn_in(settings).await;
    app._dir = Some(dir);
    app
}

/// Spawns `serve` on the Kafka broker named by `CONVEYOR_TEST_KAFKA`, with a topic and
/// consumer groups of its own. `None` (after saying so on stderr) when the variable is unset.
pub async fn spawn_app_on_kafka() -> Option<TestApp> {
    let brokers = kafka_brokers()?;
    Some(
        spawn_app_with(|s| {
            let run = uuid::Uuid::new_v4().simple().to_string();
            s.log.uri = Some(LogUri::Kafka(brokers.clone()));
            s.log.topic = format!("media-events-{run}");
            s.log.session_timeout_ms = 6_000;
            s.processor.group = format!("processor-{run}");
            s.projector.group = format!("projector-{run}");
            s.video.group = format!("transcoder-{run}");
        })
        .await,
    )
}

/// Settings for a fresh bucket, created, on the S3 API named by `CONVEYOR_TEST_S3` (moto in
/// `scripts/test`). `None`, after saying so on stderr, when it is unset.
pub async fn s3_bucket() -> Option<conveyor_config::ObjectSettings> {
    let endpoint = testing::engine(testing::S3, "an end-to-end test on S3")?;
    let bucket = format!("conveyor-e2e-{}", uuid::Uuid::new_v4().simple());
    let objects = conveyor_config::ObjectSettings {
        uri: Some(ObjectsUri::S3 {
            bucket: bucket.clone(),
            prefix: String::new(),
        }),
        endpoint: Some(endpoint),
        region: Some("us-east-1".into()),
        path_style: true,
        part_size_mib: 5,
        ..Default::default()
    };
    let store = s3_store(&objects).await;
    store
        .client()
        .0
        .create_bucket()
        .bucket(&bucket)
        .send()
        .await
        .expect("create the test bucket");
    Some(objects)
}

/// A store on the bucket `objects` names.
pub async fn s3_store(
    objects: &conveyor_config::ObjectSettings,
) -> conveyor_storage::objects::s3::S3ObjectStore {
    let Some(ObjectsUri::S3 { bucket, prefix }) = &objects.uri else {
        panic!("not an s3 store: {:?}", objects.uri)
    };
    conveyor_storage::objects::s3::S3ObjectStore::connect(bucket, prefix, objects)
        .await
        .expect("connect to the test S3 API")
}

/// Spawns `serve` with its objects in a fresh bucket ([`s3_bucket`]).
pub async fn spawn_app_on_s3() -> Option<TestApp> {
    let objects = s3_bucket().await?;
    Some(spawn_app_with(|s| s.objects = objects).await)
}

/// Read-store settings for a fresh keyspace that `ops migrate` has just created, on the CQL
/// node named by `CONVEYOR_TEST_CQL` (Apache Cassandra in `scripts/test`). `None` (after
/// saying so on stderr) when the variable is unset.
pub async fn cql_views() -> Option<conveyor_config::ViewSettings> {
    let base = testing::engine(testing::CQL, "an end-to-end test on the CQL read store")?;
    let uri: ScyllaUri = format!(
        "{base}_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
    .parse()
    .expect("a keyspace uri");
    let views = conveyor_config::ViewSettings {
        uri: Some(ViewsUri::Scylla(uri.clone())),
        replication_factor: 1,
        ..Default::default()
    };
    conveyor_storage::views::scylla::migrate(&uri, &views)
        .await
        .expect("migrate the test keyspace");
    Some(views)
}

/// Spawns `serve` with its read models on the CQL node ([`cql_views`]).
pub async fn spawn_app_on_scylla() -> Option<TestApp> {
    let views = cql_views().await?;
    Some(spawn_app_with(|s| s.views = views).await)
}

/// The test broker's address, or `None` after a loud skip notice.
pub fn kafka_brokers() -> Option<String> {
    testing::engine(testing::KAFKA, "an end-to-end test on Kafka")
}

/// Runs each named `async fn(TestApp)` four times: on the embedded backends, with the log on
/// Kafka, with the objects in S3, and with the read models in ScyllaDB.
#[macro_export]
macro_rules! on_every_log {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$name($crate::helpers::spawn_app().await).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn kafka() {
                if let Some(app) = $crate::helpers::spawn_app_on_kafka().await {
                    super::$name(app).await
                }
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn s3() {
                if let Some(app) = $crate::helpers::spawn_app_on_s3().await {
                    super::$name(app).await
                }
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn scylla() {
                if let Some(app) = $crate::helpers::spawn_app_on_scylla().await {
                    super::$name(app).await
                }
            }
        }
    )*};
}

/// Spawns `serve` with exactly these settings (the caller owns the data dir).
pub async fn spawn_in(settings: Settings) -> TestApp {
    spawn_in_wrapping(settings, |stage| stage).await
}

/// Like [`spawn_app_with`], with every consumer group's stage passed through `wrap` before it
/// starts (to slow one down with [`Slowed`], say).
pub async fn spawn_app_wrapping(
    adjust: impl FnOnce(&mut Settings),
    wrap: impl Fn(Box<dyn Stage>) -> Box<dyn Stage>,
) -> TestApp {
    conveyor_runtime::telemetry::init_for_tests();
    let dir = tempfile::tempdir().expect("temp dir");
    let mut settings = Settings::for_test(dir.path());
    adjust(&mut settings);
    let mut app = spawn_in_wrapping(settings, wrap).await;
    app._dir = Some(dir);
    app
}

/// Like [`spawn_in`], with every stage passed through `wrap`.
pub async fn spawn_in_wrapping(
    settings: Settings,
    wrap: impl Fn(Box<dyn Stage>) -> Box<dyn Stage>,
) -> TestApp {
    let app: App = conveyor::app::build_with(settings, Role::Serve, wrap)
        .await
        .expect("app builds");
    let address = format!("http://127.0.0.1:{}", app.port());
    let (settings, backends, stop) = (app.settings.clone(), app.backends.clone(), app.stop_token());
    let handle = tokio::spawn(app.run_until_stopped());
    TestApp {
        address,
        client: reqwest::Client::new(),
        settings,
        backends,
        stop,
        handle: Some(handle),
        _dir: None,
    }
}

/// A consumer group slowed on purpose: each batch waits `delay` before its work, and batches
/// take turns, so the group handles at most one batch per `delay` (plus the work). This is how
/// a test makes a group the bottleneck; the product has no such setting.
pub struct Slowed {
    inner: Box<dyn Stage>,
    delay: Duration,
    turn: tokio::sync::Mutex<()>,
}

impl Slowed {
    /// `inner`, slowed by `delay` per batch.
    pub fn new(inner: Box<dyn Stage>, delay: Duration) -> Box<dyn Stage> {
        Box::new(Slowed {
            inner,
            delay,
            turn: tokio::sync::Mutex::new(()),
        })
    }
}

#[async_trait::async_trait]
impl Handler for Slowed {
    async fn handle(&self, records: &[Delivered]) -> Result<(), HandleError> {
        let _turn = self.turn.lock().await;
        tokio::time::sleep(self.delay).await;
        self.inner.handle(records).await
    }
}

#[async_trait::async_trait]
impl Stage for Slowed {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn consumer_config(&self) -> ConsumerConfig {
        self.inner.consumer_config()
    }

    async fn prepare(&mut self, stop: &CancellationToken) -> anyhow::Result<()> {
        self.inner.prepare(stop).await
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.address)
    }

    /// Stops the app gracefully and waits for it to drain.
    pub async fn stop(mut self) {
        self.drain().await;
    }

    async fn drain(&mut self) {
        self.stop.cancel();
        if let Some(h) = self.handle.take() {
            h.await.expect("app task").expect("app ran cleanly");
        }
    }

    /// Stops the app gracefully and starts it again on the same data dir and backends, after
    /// `adjust` has changed its settings (an operator's fix and restart).
    pub async fn restart_with(mut self, adjust: impl FnOnce(&mut Settings)) -> TestApp {
        self.drain().await;
        let mut settings = self.settings.clone();
        adjust(&mut settings);
        let mut app = spawn_in(settings).await;
        app._dir = self._dir.take();
        app
    }

    pub async fn upload(&self, key: &str, file: Vec<u8>, title: Option<&str>) -> reqwest::Response {
        upload_to(&self.client, &self.address, key, file, title).await
    }

    /// GETs `path` without a key, as anyone on the internet would.
    pub async fn get_json(&self, path: &str) -> (reqwest::StatusCode, Value) {
        self.get_json_as(None, path).await
    }

    /// GETs `path` with the client key `key`, if any.
    pub async fn get_json_as(&self, key: Option<&str>, path: &str) -> (reqwest::StatusCode, Value) {
        let mut request = self.client.get(self.url(path));
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        let response = request.send().await.expect("request");
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    pub async fn media(&self, id: &str) -> (reqwest::StatusCode, Value) {
        self.get_json(&format!("/v1/media/{id}")).await
    }

    /// Waits until public media's status is not `pending`, and returns its body.
    pub async fn wait_processed(&self, id: &str) -> Value {
        self.wait_processed_as(None, id).await
    }

    /// Waits until media `key` may see is not `pending` (private media: the owner's key).
    pub async fn wait_processed_as(&self, key: Option<&str>, id: &str) -> Value {
        let path = format!("/v1/media/{id}");
        wait_until(Duration::from_secs(30), || async {
            let (status, body) = self.get_json_as(key, &path).await;
            (status == 200 && body["status"] != "pending").then_some(body)
        })
        .await
        .unwrap_or_else(|| panic!("media {id} was not processed in time"))
    }

    /// Waits until the media's title is `title`, and returns its body.
    pub async fn wait_for_title(&self, id: &str, title: &str) -> Value {
        wait_until(Duration::from_secs(20), || async {
            let (_, body) = self.media(id).await;
            (body["title"] == title).then_some(body)
        })
        .await
        .unwrap_or_else(|| panic!("media {id} never got the title {title:?}"))
    }

    /// Waits until every consumer group has committed everything in the log, for at most 30 s.
    pub async fn wait_caught_up(&self) {
        self.wait_caught_up_within(Duration::from_secs(30)).await
    }

    /// Like [`TestApp::wait_caught_up`], for at most `bound`: after an engine restarts, its
    /// start and the clients' reconnection come first, and a busy machine slows both.
    pub async fn wait_caught_up_within(&self, bound: Duration) {
        let log = self.backends.log.clone();
        // `serve` runs the transcoder too (ffmpeg is installed for the tests).
        let s = &self.settings;
        let groups = [&s.processor.group, &s.video.group, &s.projector.group];
        let done = wait_until(bound, || async {
            groups_caught_up(&*log, s, &groups).await.then_some(())
        })
        .await;
        done.expect("consumers caught up in time");
    }

    /// Records appended to the app's event topic, over all partitions.
    pub async fn log_records(&self) -> u64 {
        let lag = self
            .backends
            .log
            .lag(&self.settings.log.topic, "nobody")
            .await
            .expect("lag");
        lag.iter().map(|l| l.end).sum()
    }

    /// `DELETE /v1/media/{id}` with `key`.
    pub async fn delete(&self, key: &str, id: &str) -> reqwest::Response {
        let url = self.url(&format!("/v1/media/{id}"));
        self.client
            .delete(url)
            .bearer_auth(key)
            .send()
            .await
            .expect("delete request")
    }
}

pub async fn upload_to(
    client: &reqwest::Client,
    base: &str,
    key: &str,
    file: Vec<u8>,
    title: Option<&str>,
) -> reqwest::Response {
    let mut form = reqwest::multipart::Form::new().part(
        "file",
        reqwest::multipart::Part::bytes(file).file_name("photo.jpg"),
    );
    if let Some(t) = title {
        form = form.text("title", t.to_owned());
    }
    client
        .post(format!("{base}/v1/media"))
        .bearer_auth(key)
        .multipart(form)
        .send()
        .await
        .expect("upload request")
}

/// Whether the processor and projector groups have committed everything in the log.
pub async fn caught_up(log: &dyn conveyor_storage::EventLog, settings: &Settings) -> bool {
    groups_caught_up(
        log,
        settings,
        &[&settings.processor.group, &settings.projector.group],
    )
    .await
}

/// Whether each of `groups` has committed everything in the log.
pub async fn groups_caught_up(
    log: &dyn conveyor_storage::EventLog,
    settings: &Settings,
    groups: &[&String],
) -> bool {
    for group in groups {
        match log.lag(&settings.log.topic, group).await {
            Ok(lag) if lag.iter().all(|l| l.lag() == 0) => {}
            _ => return false,
        }
    }
    true
}

/// Polls `check` until it yields a value or `timeout` passes. Never a fixed sleep.
pub async fn wait_until<T, F, Fut>(timeout: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The `conveyor` binary built beside this test binary (`cargo test` builds it, because the
/// `conveyor` package has integration tests of its own).
pub fn conveyor_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("CONVEYOR_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/<test binary> → target/<profile>/conveyor
    let profile_dir = exe.parent().and_then(Path::parent).expect("target dir");
    let binary = profile_dir.join(format!("conveyor{}", std::env::consts::EXE_SUFFIX));
    assert!(
        binary.exists(),
        "{} is missing: run the tests through scripts/test (or `cargo build -p conveyor` first)",
        binary.display()
    );
    binary
}

/// Counts the files of transcoding jobs under a `<data_dir>/transcode` directory: everything
/// but each transcoder's own lock file (`<process id>.lock`), which lives as long as it does.
pub fn count_job_files(transcode: &Path) -> usize {
    let locks = std::fs::read_dir(transcode)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().ends_with(".lock"))
                .count()
        })
        .unwrap_or(0);
    count_files(transcode) - locks
}

/// Counts files under `dir/prefix` (for "nothing was stored" checks).
pub fn count_files(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .map(|e| {
            if e.path().is_dir() {
                count_files(&e.path())
            } else {
                1
            }
        })
        .sum()
}

/// A `conveyor` process started by a test. Killed (SIGKILL) when dropped.
pub struct Process {
    pub child: std::process::Child,
    pub address: String,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `conveyor <role>` on port 0 with `data_dir` and `env`, and waits for its address.
pub fn start_process(role: &str, data_dir: &Path, env: &[(&str, String)]) -> Process {
    start_process_at(role, data_dir, env, None)
}

/// `<root>/<any directory>/<tail>`, if one exists: a library under its multiarch directory
/// (`/usr/lib/x86_64-linux-gnu/…`).
fn glob_one(root: &str, tail: &str) -> Option<PathBuf> {
    std::fs::read_dir(root)
        .ok()?
        .filter_map(Result::ok)
        .map(|entry| entry.path().join(tail))
        .find(|path| path.exists())
}

/// How a process started by [`start_process_at`] has its wall clock offset.
#[derive(Debug, Clone, Copy)]
pub enum Skew {
    /// The whole process, through Debian's libfaketime (`"+2d"`, `"-5s"`: `faketime -f`'s
    /// syntax); only the wall clock moves, timers keep the real monotonic clock, as under NTP.
    /// Not for processes on Kafka: librdkafka's timed waits spin on a wall clock set back.
    Faketime(&'static str),
    /// Conveyor's own clock only ([`conveyor_storage::clock::SKEW_VAR`]), in milliseconds.
    Offset(i64),
}

/// Like [`start_process`], with the process's wall clock offset by `skew` when one is given.
///
/// # Panics
/// When [`Skew::Faketime`] is asked for and libfaketime is not installed (`scripts/test`
/// installs Debian's `faketime`).
pub fn start_process_at(
    role: &str,
    data_dir: &Path,
    env: &[(&str, String)],
    skew: Option<Skew>,
) -> Process {
    use std::io::{BufRead, BufReader};
    let mut command = std::process::Command::new(conveyor_binary());
    match skew {
        None => {}
        Some(Skew::Faketime(offset)) => {
            // The library itself rather than the `faketime` wrapper, which would stand between
            // the test and the process it kills.
            let library = glob_one("/usr/lib", "faketime/libfaketime.so.1")
                .expect("libfaketime is missing: apt-get install faketime");
            command
                .env("LD_PRELOAD", library)
                .env("FAKETIME", offset)
                .env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
        }
        Some(Skew::Offset(ms)) => {
            command.env(conveyor_storage::clock::SKEW_VAR, ms.to_string());
        }
    }
    command
        .args([role, "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .env(
            "RUST_LOG",
            std::env::var("TEST_LOG").map(|_| "info").unwrap_or("warn"),
        )
        // The tests drive load from one key; `env` may set a rate of its own.
        .env("CONVEYOR__AUTH__RATE_PER_SEC", "0")
        .stdout(std::process::Stdio::piped());
    if std::env::var_os("TEST_LOG").is_none() {
        command.stderr(std::process::Stdio::null());
    }
    for (k, v) in env {
        command.env(k, v);
    }
    let mut child = command
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start conveyor {role} ({skew:?}): {e}"));
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let address = loop {
        let line = match lines.next() {
            Some(Ok(line)) => line,
            _ => panic!("conveyor {role} exited before printing its address"),
        };
        if let Some(rest) = line.split("listening on ").nth(1) {
            break rest.trim().to_owned();
        }
    };
    // Keep draining stdout so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Process { child, address }
}

/// An engine of one test's own, started by `scripts/engines` in a temp dir, so the test can
/// kill it and start it again without touching the engines every other test shares. Stopped
/// when dropped.
pub struct OwnEngine {
    name: &'static str,
    dir: tempfile::TempDir,
    /// `host:port` for Kafka, a `scylla://` URI for Cassandra (as `scripts/engines` exports).
    pub address: String,
}

impl OwnEngine {
    /// Starts `name` (`kafka` or `cassandra`) and waits until it answers. `None`, after a loud
    /// skip notice, where the shared engines are not configured either (so the machine has
    /// none); with `CI` set that is a failure ([`testing::engine`]).
    pub fn start(name: &'static str, var: &str) -> Option<OwnEngine> {
        testing::engine(var, &format!("a test with its own {name}"))?;
        let dir = tempfile::tempdir().expect("temp dir");
        let out = OwnEngine::script(dir.path(), &["up", name]);
        let prefix = format!("export {var}=");
        let address = String::from_utf8_lossy(&out)
            .lines()
            .find_map(|l| l.strip_prefix(&prefix).map(str::to_owned))
            .unwrap_or_else(|| panic!("scripts/engines up {name} printed no {var}"));
        Some(OwnEngine { name, dir, address })
    }

    /// SIGKILLs the engine: an outage. Its data dir and ports are kept for [`restart`].
    ///
    /// [`restart`]: OwnEngine::restart
    pub fn kill(&self) {
        OwnEngine::script(self.dir.path(), &["kill", self.name]);
    }

    /// Starts the engine again on its ports and data, and waits until it answers.
    pub fn restart(&self) {
        OwnEngine::script(self.dir.path(), &["restart", self.name]);
    }

    fn script(dir: &Path, args: &[&str]) -> Vec<u8> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/engines");
        let out = std::process::Command::new(&script)
            .args(args)
            .env("CONVEYOR_ENGINES_DIR", dir)
            .stderr(std::process::Stdio::inherit())
            .output()
            .expect("run scripts/engines");
        assert!(out.status.success(), "scripts/engines {args:?} failed");
        out.stdout
    }
}

impl Drop for OwnEngine {
    fn drop(&mut self) {
        // No assertion here: a panic while a failing test unwinds would hide its failure.
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/engines");
        let _ = std::process::Command::new(script)
            .arg("down")
            .env("CONVEYOR_ENGINES_DIR", self.dir.path())
            .status();
    }
}

/// Every record of `topic`, decoded, in partition and offset order.
pub async fn all_events(
    log: &dyn conveyor_storage::EventLog,
    topic: &str,
) -> Vec<conveyor_schemas::Envelope> {
    let mut events = Vec::new();
    for p in log.lag(topic, "nobody").await.expect("partitions") {
        let mut offset = 0;
        while offset < p.end {
            let batch = log
                .read(topic, p.partition, offset, 1_000)
                .await
                .expect("read the log");
            assert!(!batch.is_empty(), "partition {} ends early", p.partition);
            offset = batch.last().unwrap().offset + 1;
            events.extend(
                batch
                    .iter()
                    .map(|r| conveyor_storage::events::from_delivered(r).expect("an event")),
            );
        }
    }
    events
}
