//! Wiring: which routers and consumer groups a role runs, on which backends.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::response::IntoResponse;
use conveyor_platform::Backends;
use conveyor_platform::changes::Changes;
use conveyor_platform::config::{KeyList, Settings};
use conveyor_platform::consumer::report_lag;
use conveyor_platform::http::{ApiError, json_errors, not_found, ops_router, track_requests};
use conveyor_platform::shutdown::Shutdown;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::classify::ServerErrorsFailureClass;
use tower_http::trace::TraceLayer;

/// What one process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Every role in one process: ingest, processor, transcoder (when ffmpeg is installed),
    /// projector and query.
    Serve,
    Ingest,
    Process,
    /// The transcoder group: video (needs ffmpeg and ffprobe).
    Transcode,
    Project,
    Query,
    /// The archive group: the log, copied to the object store (see `archive`).
    Archive,
}

impl Role {
    fn ingests(self) -> bool {
        matches!(self, Role::Serve | Role::Ingest)
    }
    fn queries(self) -> bool {
        matches!(self, Role::Serve | Role::Query)
    }
    fn processes(self) -> bool {
        matches!(self, Role::Serve | Role::Process)
    }
    fn transcodes(self) -> bool {
        matches!(self, Role::Serve | Role::Transcode)
    }
    fn projects(self) -> bool {
        matches!(self, Role::Serve | Role::Project)
    }
}

/// A named task the process cannot run without: a consumer group, a cache tail.
type Worker = (&'static str, tokio::task::JoinHandle<anyhow::Result<()>>);

/// A built role, bound to its port and ready to run.
pub struct App {
    listener: TcpListener,
    router: Router,
    shutdown: Shutdown,
    workers: Vec<Worker>,
    pub settings: Settings,
    /// The backends this app runs on, for tests and operator tooling in the same process.
    pub backends: Backends,
}

/// Takes a backup every `every` and keeps the newest `backup.keep`, until `stop`. A failed
/// backup is logged and retried at the next tick; it never stops the server.
async fn scheduled_backups(settings: Settings, every: Duration, stop: CancellationToken) {
    let uri = settings.backup_uri();
    tracing::info!(every = ?every, to = %uri, keep = settings.backup.keep, "scheduled backups on");
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let run = async {
            let target = conveyor_platform::backends::open_objects(&uri, &settings.objects).await?;
            let report = crate::backup::backup(&settings, &*target, 4, false).await?;
            let pruned = crate::backup::prune(&*target, settings.backup.keep.max(1)).await?;
            anyhow::Ok((report, pruned))
        };
        match run.await {
            Ok((report, pruned)) => {
                metrics::counter!("conveyor_backups_total").increment(1);
                tracing::info!(
                    id = %report.manifest.id,
                    objects_copied = report.objects_copied,
                    bytes_copied = report.bytes_copied,
                    pruned = pruned.len(),
                    "backup taken"
                )
            }
            Err(e) => {
                metrics::counter!("conveyor_backup_failures_total").increment(1);
                tracing::error!(error = format!("{e:#}"), "scheduled backup failed")
            }
        }
    }
}

/// Opens the backends, binds the listener and starts the role's consumers.
pub async fn build(mut settings: Settings, role: Role) -> anyhow::Result<App> {
    std::fs::create_dir_all(&settings.data_dir)
        .with_context(|| format!("failed to create data dir {}", settings.data_dir.display()))?;
    if role == Role::Serve {
        ensure_dev_keys(&mut settings)?;
    } else if role.ingests() && settings.auth.api_keys.is_empty() {
        tracing::warn!(
            "no CONVEYOR__AUTH__API_KEYS configured: every upload will be refused with 401"
        );
    }
    conveyor_platform::metrics::handle();
    let backends = Backends::open(&settings).await?;
    let shutdown = Shutdown::new();
    let changes = Changes::new();
    let keys = conveyor_platform::keys::Keys::with_issued(&settings.auth, backends.objects.clone());
    if role.ingests() || role.queries() {
        // The first read is awaited, so issued keys work from the first request.
        if let Err(e) = keys.refresh().await {
            tracing::warn!(error = %e, "could not read the issued API keys; retrying in the background");
        }
        shutdown.tracker.spawn(keys.clone().follow(
            Duration::from_millis(settings.auth.refresh_ms.max(100)),
            shutdown.token.clone(),
        ));
    }
    let mut workers = Vec::new();
    let mut video_refusal = None;
    // ffmpeg and ffprobe: the transcoder role cannot start without them; `serve` runs without
    // video instead, and its ingest says why to every video upload.
    let tools = if role.transcodes() {
        match conveyor_transcoder::Tools::find(&settings.video) {
            Ok(tools) => Some(tools),
            Err(missing) if role == Role::Serve => {
                tracing::warn!(%missing, "video uploads will be refused with 415");
                // Clients learn which tool is missing; the path and the fix are for the log.
                video_refusal = Some(format!(
                    "this server cannot transcode video: {} is not installed",
                    missing.tool
                ));
                None
            }
            Err(missing) => return Err(missing.into()),
        }
    } else {
        None
    };

    let mut router = ops_router(backends.clone(), settings.topic()).route(
        "/openapi.json",
        axum::routing::get(|| async {
            static DOCUMENT: std::sync::LazyLock<String> =
                std::sync::LazyLock::new(crate::openapi::to_json);
            (
                [(axum::http::header::CONTENT_TYPE, "application/json")],
                DOCUMENT.as_str(),
            )
        }),
    );
    if role.ingests() {
        router = router.merge(conveyor_ingest::router(
            conveyor_ingest::IngestState::refusing_video(
                backends.clone(),
                &settings,
                keys.clone(),
                video_refusal,
            ),
        ));
        let (objects, stop) = (backends.objects.clone(), shutdown.token.clone());
        let ttl = Duration::from_secs(settings.uploads.ttl_secs.max(1));
        // Event receipts are swept here only off S3: there the lifecycle rule of
        // `ops sweep-uploads --install-lifecycle-days` expires them without reading each one.
        let receipts = settings
            .receipt_retention()
            .filter(|_| !settings.objects_uri().starts_with("s3://"));
        shutdown.tracker.spawn(async move {
            // Every replica sweeps; deletes are idempotent, so overlapping sweeps are harmless.
            let every = (ttl / 4).clamp(Duration::from_secs(30), Duration::from_secs(900));
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(every) => {}
                }
                match conveyor_ingest::direct::sweep(&*objects, ttl).await {
                    Ok(0) => {}
                    Ok(removed) => tracing::info!(removed, "swept expired uploads"),
                    Err(e) => tracing::warn!(error = %e, "failed to sweep expired uploads"),
                }
                let Some(retention) = receipts else { continue };
                match conveyor_ingest::events::sweep_receipts(&*objects, retention).await {
                    Ok(0) => {}
                    Ok(removed) => tracing::info!(removed, "swept expired event receipts"),
                    Err(e) => tracing::warn!(error = %e, "failed to sweep event receipts"),
                }
            }
        });
    }
    if role.queries() {
        let state = conveyor_query::QueryState::new(backends.clone(), &settings, keys.clone());
        if role.projects() {
            state.follow(&changes, shutdown.token.clone());
        } else {
            let (state, log, stop) = (state.clone(), backends.log.clone(), shutdown.token.clone());
            let topic = settings.topic().to_owned();
            workers.push((
                "query cache invalidation",
                shutdown
                    .tracker
                    .spawn(conveyor_query::tail_invalidations(state, log, topic, stop)),
            ));
        }
        router = router.merge(conveyor_query::router(state));
        if !role.ingests() {
            let ingest =
                conveyor_ingest::IngestState::new(backends.clone(), &settings, keys.clone());
            router = router.merge(conveyor_ingest::delete_router(ingest));
        }
    }
    let mut groups = Vec::new();
    if role.processes() {
        let processor = conveyor_processor::Processor::new(&backends, &settings);
        groups.push(settings.processor.group.clone());
        let (settings, stop) = (settings.clone(), shutdown.token.clone());
        workers.push((
            "processor",
            shutdown
                .tracker
                .spawn(async move { processor.run(&settings, stop).await }),
        ));
    }
    if let Some(tools) = tools {
        let transcoder = conveyor_transcoder::Transcoder::new(&backends, &settings, tools)?;
        groups.push(settings.video.group.clone());
        let (settings, stop) = (settings.clone(), shutdown.token.clone());
        workers.push((
            "transcoder",
            shutdown
                .tracker
                .spawn(async move { transcoder.run(&settings, stop).await }),
        ));
    }
    if role.projects() {
        let projector = conveyor_projector::Projector::new(backends.views.clone(), changes.clone());
        groups.push(settings.projector.group.clone());
        let (settings, log, stop) = (
            settings.clone(),
            backends.log.clone(),
            shutdown.token.clone(),
        );
        workers.push((
            "projector",
            shutdown
                .tracker
                .spawn(async move { projector.run(log, &settings, stop).await }),
        ));
    }
    if role == Role::Archive {
        // The media store, already open, unless the archive has a store of its own.
        let objects = match &settings.archive.to {
            None => backends.objects.clone(),
            Some(_) => {
                conveyor_platform::backends::open_objects(
                    &settings.archive_uri(),
                    &settings.objects,
                )
                .await?
            }
        };
        let mut config = conveyor_platform::consumer::ConsumerConfig::new(
            settings.topic(),
            &settings.archive.group,
        );
        config.max_batch = settings.archive.batch.max(1);
        config.max_buffered = config.max_buffered.max(config.max_batch * 2);
        config.max_attempts = settings.log.max_attempts;
        // Segments are written as they fill or as the log goes quiet, never more than one per
        // partition at a time, so a partition's segments never overlap (except after a crash).
        config.per_partition = 1;
        groups.push(settings.archive.group.clone());
        let (log, stop) = (backends.log.clone(), shutdown.token.clone());
        let archiver = Arc::new(crate::archive::Archiver::new(objects));
        workers.push((
            "archive",
            shutdown.tracker.spawn(conveyor_platform::consumer::run(
                log, config, archiver, stop,
            )),
        ));
    }
    if let (Role::Serve, Some(every)) = (role, settings.backup.every) {
        let (settings, stop) = (settings.clone(), shutdown.token.clone());
        shutdown
            .tracker
            .spawn(scheduled_backups(settings, every.0, stop));
    }
    if !groups.is_empty() {
        shutdown.tracker.spawn(report_lag(
            backends.log.clone(),
            settings.topic().to_owned(),
            groups,
            // Every second: `loadtest run` reads lag from /metrics to see a group fall behind.
            Duration::from_secs(1),
            shutdown.token.clone(),
        ));
    }
    let router = router
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(
            conveyor_platform::http::RateLimit::new(
                keys,
                settings.auth.rate_per_sec,
                settings.auth.rate_burst,
            ),
            conveyor_platform::http::rate_limit,
        ))
        .layer(axum::middleware::from_fn(json_errors))
        .layer(axum::middleware::from_fn(track_requests))
        .layer(CatchPanicLayer::custom(|_| {
            ApiError::internal(anyhow::anyhow!("handler panicked")).into_response()
        }))
        .layer(TraceLayer::new_for_http().on_failure(
            |failure: ServerErrorsFailureClass, latency: Duration, _: &tracing::Span| {
                // A backend that is down (503) is an operator's to watch (WARN, and /readyz);
                // any other 5xx is a fault to fix (ERROR).
                let latency_ms = latency.as_millis() as u64;
                match failure {
                    ServerErrorsFailureClass::StatusCode(
                        axum::http::StatusCode::SERVICE_UNAVAILABLE,
                    ) => {
                        tracing::warn!(%failure, latency_ms, "response failed")
                    }
                    _ => tracing::error!(%failure, latency_ms, "response failed"),
                }
            },
        ));
    let router = match conveyor_platform::http::cors(&settings.http.cors_origins)
        .map_err(anyhow::Error::msg)?
    {
        Some(cors) => router.layer(cors),
        None => router,
    };
    let listener = TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("failed to listen on {}", settings.listen))?;
    Ok(App {
        listener,
        router,
        shutdown,
        workers,
        settings,
        backends,
    })
}

impl App {
    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// The token that stops this app; cancel it to shut down gracefully.
    pub fn stop_token(&self) -> tokio_util::sync::CancellationToken {
        self.shutdown.token.clone()
    }

    /// Serves until the stop token is cancelled or a worker fails, then drains: in-flight
    /// requests finish, consumers finish their batches and commit.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let App {
            listener,
            router,
            shutdown,
            workers,
            settings,
            ..
        } = self;
        let self_settings_http = settings.http.clone();
        let token = shutdown.token.clone();
        let http = self_settings_http;
        let server = {
            let token = token.clone();
            tokio::spawn(async move {
                conveyor_platform::http::serve(listener, router, &http, token).await
            })
        };
        let mut failure = None;
        tokio::select! {
            _ = token.cancelled() => {}
            err = first_failure(workers, token.clone()) => match err {
                Some(e) => {
                    tracing::error!(error = format!("{e:#}"), "worker failed, shutting down");
                    failure = Some(e);
                }
                // No workers (an edge-only role): serve until told.
                None => token.cancelled().await,
            }
        }
        shutdown.drain().await;
        server
            .await
            .context("server task panicked")?
            .context("server failed")?;
        match failure {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// Watches every worker at once and returns the first to fail, named: an error, a panic, or a
/// return before `stop` was cancelled (a consumer group only returns when told to). `None`
/// once every worker returned after `stop`, or at once if there are none.
async fn first_failure(workers: Vec<Worker>, stop: CancellationToken) -> Option<anyhow::Error> {
    use futures::StreamExt;
    let mut running: futures::stream::FuturesUnordered<_> = workers
        .into_iter()
        .map(|(name, handle)| async move { (name, handle.await) })
        .collect();
    while let Some((name, joined)) = running.next().await {
        match joined {
            Ok(Ok(())) if stop.is_cancelled() => {}
            Ok(Ok(())) => return Some(anyhow::anyhow!("{name} stopped on its own")),
            Ok(Err(e)) => return Some(e.context(format!("{name} failed"))),
            Err(e) => return Some(anyhow::anyhow!("{name} panicked: {e}")),
        }
    }
    None
}

/// With no keys configured, `serve` uses (creating on first start) a `dev` client key and a
/// `dev` service key kept in the data dir, so restarts keep working with the same keys.
/// The keys `serve` creates in the data dir when none are configured. Backups carry them, so a
/// restored data dir answers to the same keys.
pub const DEV_KEY_FILES: [&str; 4] = [
    "dev-api-key",
    "dev-media-key",
    "dev-signing-key",
    "dev-service-key",
];

fn ensure_dev_keys(settings: &mut Settings) -> anyhow::Result<()> {
    if settings.auth.api_keys.is_empty() {
        let key = dev_key(&settings.data_dir.join("dev-api-key"))?;
        println!(
            "dev api key for owner `dev`: {key}  (saved in {})",
            settings.data_dir.join("dev-api-key").display()
        );
        settings.auth.api_keys =
            KeyList::parse(&format!("dev:{key}")).map_err(anyhow::Error::msg)?;
    }
    if settings.cdn.signing_keys.is_empty() {
        let key = dev_key(&settings.data_dir.join("dev-media-key"))?;
        settings.cdn.signing_keys =
            KeyList::parse(&format!("dev:{key}")).map_err(anyhow::Error::msg)?;
    }
    if settings.uploads.signing_key.is_empty() {
        let key = dev_key(&settings.data_dir.join("dev-signing-key"))?;
        settings.uploads.signing_key =
            KeyList::parse(&format!("dev:{key}")).map_err(anyhow::Error::msg)?;
    }
    if settings.auth.service_keys.is_empty() {
        let key = dev_key(&settings.data_dir.join("dev-service-key"))?;
        println!(
            "dev service key for `dev`: {key}  (saved in {})",
            settings.data_dir.join("dev-service-key").display()
        );
        settings.auth.service_keys =
            KeyList::parse(&format!("dev:{key}")).map_err(anyhow::Error::msg)?;
    }
    Ok(())
}

fn dev_key(path: &Path) -> anyhow::Result<String> {
    if let Ok(existing) = std::fs::read_to_string(path) {
        let existing = existing.trim();
        if !existing.is_empty() {
            return Ok(existing.to_owned());
        }
    }
    let key = format!("cvk_{}", uuid::Uuid::new_v4().simple());
    std::fs::write(path, format!("{key}\n"))
        .with_context(|| format!("failed to write {}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A worker that fails while the others run stops the whole process at once, named.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_first_failing_worker_stops_the_process() {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = Settings::for_test(dir.path());
        settings.listen = "127.0.0.1:0".parse().unwrap();
        let mut app = build(settings, Role::Serve).await.unwrap();
        app.workers.push((
            "doomed worker",
            tokio::spawn(async {
                tokio::time::sleep(Duration::from_millis(200)).await;
                anyhow::bail!("the backend went away")
            }),
        ));
        let started = std::time::Instant::now();
        let result = tokio::time::timeout(Duration::from_secs(10), app.run_until_stopped())
            .await
            .expect("the app stopped by itself");
        let error = format!("{:#}", result.expect_err("the app reports the failure"));
        assert!(error.contains("doomed worker failed"), "{error}");
        assert!(error.contains("the backend went away"), "{error}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "stopped {:?} after the start, with the processor and projector still running",
            started.elapsed()
        );
    }
}
