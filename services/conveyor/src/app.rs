//! Wiring: which routers and consumer groups (stages) a role runs, on which backends.
//!
//! A role is a set of [`Part`]s ([`Role::parts`]). [`build`] opens the backends once, then
//! makes the routes of the parts that serve HTTP (`routes`) and the stages of the parts that
//! are consumer groups (`stages`), and starts each stage under one supervisor. A new consumer
//! group is its crate, a `Part`, and one line in `stages`.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::response::IntoResponse;
use conveyor_config::Settings;
use conveyor_runtime::Stage;
use conveyor_runtime::changes::Changes;
use conveyor_runtime::consumer::{LagOf, report_lag};
use conveyor_runtime::http::ops::report_health;
use conveyor_runtime::http::{ApiError, json_errors, not_found, ops_router, track_requests};
use conveyor_runtime::keys::Keys;
use conveyor_runtime::shutdown::Shutdown;
use conveyor_storage::Backends;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::classify::ServerErrorsFailureClass;
use tower_http::trace::TraceLayer;

/// What one process runs: `conveyor serve` runs every part, each other role one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Every role in one process: ingest, processor, transcoder (when ffmpeg is installed),
    /// projector and query.
    Serve,
    /// The upload and event-intake edge.
    Ingest,
    /// The processor group: image variants and metadata.
    Process,
    /// The transcoder group: video (needs ffmpeg and ffprobe).
    Transcode,
    /// The projector group: read models.
    Project,
    /// The read API (and, on embedded backends, the media bytes).
    Query,
    /// The archive group: the log, copied to the object store (see `archive`).
    Archive,
}

/// A part of Conveyor that a role may run: an HTTP edge or a consumer group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// Uploads and the event intake (`conveyor_ingest`).
    Ingest,
    /// The read API (`conveyor_query`).
    Query,
    /// Consumer group `processor` (`conveyor_processor`).
    Processor,
    /// Consumer group `transcoder` (`conveyor_transcoder`).
    Transcoder,
    /// Consumer group `projector` (`conveyor_projector`).
    Projector,
    /// Consumer group `archive` ([`crate::archive`]).
    Archiver,
}

impl Role {
    /// The parts this role runs.
    pub fn parts(self) -> &'static [Part] {
        match self {
            Role::Serve => &[
                Part::Ingest,
                Part::Query,
                Part::Processor,
                Part::Transcoder,
                Part::Projector,
            ],
            Role::Ingest => &[Part::Ingest],
            Role::Process => &[Part::Processor],
            Role::Transcode => &[Part::Transcoder],
            Role::Project => &[Part::Projector],
            Role::Query => &[Part::Query],
            Role::Archive => &[Part::Archiver],
        }
    }

    /// The subcommand that runs it: `serve`, `ingest`, `process`, `transcode`, `project`,
    /// `query` or `archive`. Its metrics carry it as the label `role`.
    pub fn name(self) -> &'static str {
        self.service_name().trim_start_matches("conveyor-")
    }

    /// The service name its traces carry: `conveyor-` and [`Role::name`].
    pub fn service_name(self) -> &'static str {
        match self {
            Role::Serve => "conveyor-serve",
            Role::Ingest => "conveyor-ingest",
            Role::Process => "conveyor-process",
            Role::Transcode => "conveyor-transcode",
            Role::Project => "conveyor-project",
            Role::Query => "conveyor-query",
            Role::Archive => "conveyor-archive",
        }
    }

    /// Whether this role runs `part`.
    pub fn runs(self, part: Part) -> bool {
        self.parts().contains(&part)
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
    /// The settings the app runs with: those given to [`build`], with the dev keys `serve`
    /// fills in when none are configured ([`DEV_KEY_FILES`]).
    pub settings: Settings,
    /// The backends this app runs on, for tests and operator tooling in the same process.
    pub backends: Backends,
}

/// Takes a backup every `every` and keeps the newest `backup.keep`, until `stop`. A failed
/// backup is logged and retried at the next tick; it never stops the server.
async fn scheduled_backups(settings: Settings, every: Duration, stop: CancellationToken) {
    let uri = match settings.backup_uri() {
        Ok(uri) => uri,
        // Refused when the settings load; a `Settings` changed in code since is a bug there.
        Err(e) => return tracing::error!(error = %e, "scheduled backups off"),
    };
    tracing::info!(every = ?every, to = %uri, keep = settings.backup.keep, "scheduled backups on");
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let run = async {
            let target = conveyor_storage::backends::open_objects(&uri, &settings.objects).await?;
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

/// Opens the backends, binds the listener and starts the role's stages.
///
/// # Errors
/// A data dir that cannot be made, a backend that cannot be opened, a stage that cannot be
/// made (the transcoder without ffmpeg, outside `serve`), or a port that cannot be bound.
pub async fn build(settings: Settings, role: Role) -> anyhow::Result<App> {
    build_with(settings, role, |stage| stage).await
}

/// Like [`build`], with each stage passed through `wrap` before it starts, so a caller can
/// put a stage of its own around one of Conveyor's (the tests slow the processor this way).
///
/// # Errors
/// As [`build`].
pub async fn build_with(
    mut settings: Settings,
    role: Role,
    wrap: impl Fn(Box<dyn Stage>) -> Box<dyn Stage>,
) -> anyhow::Result<App> {
    std::fs::create_dir_all(&settings.data_dir)
        .with_context(|| format!("failed to create data dir {}", settings.data_dir.display()))?;
    if role == Role::Serve {
        crate::dev_keys::ensure(&mut settings)?;
    } else if role.runs(Part::Ingest) && settings.auth.api_keys.is_empty() {
        tracing::warn!(
            "no CONVEYOR__AUTH__API_KEYS configured: every upload will be refused with 401"
        );
    }
    if settings.log.max_attempts != conveyor_config::LogSettings::default().max_attempts {
        tracing::warn!(
            "log.max_attempts is no longer used: permanent failures go to the dead-letter \
             topic at once, and transient ones are retried until they succeed"
        );
    }
    conveyor_runtime::metrics::set_role(role.name());
    conveyor_runtime::metrics::handle();
    let backends = Backends::open(&settings).await?;
    let shutdown = Shutdown::new();
    let changes = Changes::new();
    let keys = Keys::with_issued(&settings.auth, backends.objects.clone());
    if role.runs(Part::Ingest) || role.runs(Part::Query) {
        // The first read is awaited, so issued keys work from the first request.
        if let Err(e) = keys.refresh().await {
            tracing::warn!(error = %e, "could not read the issued API keys; retrying in the background");
        }
        shutdown.tracker.spawn(keys.clone().follow(
            Duration::from_millis(settings.auth.refresh_ms.max(100)),
            shutdown.token.clone(),
        ));
    }
    let video = video_tools(&settings, role)?;
    let mut workers = Vec::new();
    let router = routes(
        &settings,
        role,
        &backends,
        &keys,
        &changes,
        &video,
        &shutdown,
        &mut workers,
    );
    let stages = stages(&settings, role, &backends, &changes, video.tools).await?;
    let groups: Vec<String> = stages.iter().map(|s| s.consumer_config().group).collect();
    for stage in stages {
        let stage = wrap(stage);
        let (log, stop) = (backends.log.clone(), shutdown.token.clone());
        workers.push((
            stage.name(),
            shutdown
                .tracker
                .spawn(conveyor_runtime::stage::run(log, stage, stop)),
        ));
    }
    if !groups.is_empty() {
        shutdown.tracker.spawn(report_lag(
            backends.log.clone(),
            settings.topic().to_owned(),
            groups,
            // Every second: a load run reads lag from /metrics to see a group fall behind.
            Duration::from_secs(1),
            LagOf::Always,
            shutdown.token.clone(),
        ));
    } else if role.runs(Part::Ingest) {
        // The producer watches the pipeline's groups from outside, so a group whose members
        // are all gone, or never came, still shows its lag (the "no members" alert). Every
        // deployment runs a processor and a projector; the transcoder group only counts once
        // it has committed, since a deployment without video never runs one.
        for (groups, of) in [
            (
                vec![
                    settings.processor.group.clone(),
                    settings.projector.group.clone(),
                ],
                LagOf::Always,
            ),
            (vec![settings.video.group.clone()], LagOf::OnceStarted),
        ] {
            shutdown.tracker.spawn(report_lag(
                backends.log.clone(),
                settings.topic().to_owned(),
                groups,
                Duration::from_secs(15),
                of,
                shutdown.token.clone(),
            ));
        }
    }
    shutdown.tracker.spawn(report_health(
        backends.clone(),
        settings.topic().to_owned(),
        settings.data_dir.clone(),
        Duration::from_secs(5),
        shutdown.token.clone(),
    ));
    if let (Role::Serve, Some(every)) = (role, settings.backup.every) {
        let (settings, stop) = (settings.clone(), shutdown.token.clone());
        shutdown
            .tracker
            .spawn(scheduled_backups(settings, every.0, stop));
    }
    let router = layers(router, &settings, keys);
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

/// What a role knows of video: the tools its transcoder runs, or why `serve` refuses video.
struct Video {
    /// ffmpeg and ffprobe, when the role transcodes and they run.
    tools: Option<conveyor_transcoder::Tools>,
    /// What ingest tells a video upload when this `serve` cannot transcode.
    refusal: Option<String>,
}

/// ffmpeg and ffprobe: the transcoder role cannot start without them; `serve` runs without
/// video instead, and its ingest says why to every video upload.
fn video_tools(settings: &Settings, role: Role) -> anyhow::Result<Video> {
    if !role.runs(Part::Transcoder) {
        return Ok(Video {
            tools: None,
            refusal: None,
        });
    }
    match conveyor_transcoder::Tools::find(&settings.video) {
        Ok(tools) => Ok(Video {
            tools: Some(tools),
            refusal: None,
        }),
        Err(missing) if role == Role::Serve => {
            tracing::warn!(%missing, "video uploads will be refused with 415");
            // Clients learn which tool is missing; the path and the fix are for the log.
            Ok(Video {
                tools: None,
                refusal: Some(format!(
                    "this server cannot transcode video: {} is not installed",
                    missing.tool
                )),
            })
        }
        Err(missing) => Err(missing.into()),
    }
}

/// The consumer groups `role` runs, made and ready to start.
async fn stages(
    settings: &Settings,
    role: Role,
    backends: &Backends,
    changes: &Changes,
    transcoder_tools: Option<conveyor_transcoder::Tools>,
) -> anyhow::Result<Vec<Box<dyn Stage>>> {
    let mut stages: Vec<Box<dyn Stage>> = Vec::new();
    for part in role.parts() {
        match part {
            Part::Ingest | Part::Query => {}
            Part::Processor => stages.push(Box::new(conveyor_processor::Processor::new(
                backends, settings,
            ))),
            // Absent without ffmpeg in `serve` (see `video_tools`).
            Part::Transcoder => {
                if let Some(tools) = transcoder_tools.clone() {
                    stages.push(Box::new(conveyor_transcoder::Transcoder::new(
                        backends, settings, tools,
                    )?))
                }
            }
            Part::Projector => stages.push(Box::new(conveyor_projector::Projector::new(
                backends.views.clone(),
                changes.clone(),
                settings,
            ))),
            Part::Archiver => stages.push(Box::new(crate::archive::Archiver::new(
                archive_store(settings, backends).await?,
                settings,
            ))),
        }
    }
    Ok(stages)
}

/// Where the archive writes: the media store, already open, unless it has a store of its own.
async fn archive_store(
    settings: &Settings,
    backends: &Backends,
) -> anyhow::Result<Arc<dyn conveyor_storage::ObjectStore>> {
    match &settings.archive.to {
        None => Ok(backends.objects.clone()),
        Some(_) => {
            conveyor_storage::backends::open_objects(&settings.archive_uri()?, &settings.objects)
                .await
        }
    }
}

/// The routes `role` serves: health, metrics and the OpenAPI document always; uploads and the
/// event intake with ingest; the read API with query. Background work that belongs to a route
/// starts here too: upload sweeps beside ingest, and the cache's invalidation tail beside a
/// query edge without a projector in its process (a worker the process cannot run without).
#[allow(clippy::too_many_arguments)]
fn routes(
    settings: &Settings,
    role: Role,
    backends: &Backends,
    keys: &Keys,
    changes: &Changes,
    video: &Video,
    shutdown: &Shutdown,
    workers: &mut Vec<Worker>,
) -> Router {
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
    if role.runs(Part::Ingest) {
        router = router.merge(conveyor_ingest::router(
            conveyor_ingest::IngestState::refusing_video(
                backends.clone(),
                settings,
                keys.clone(),
                video.refusal.clone(),
            ),
        ));
        shutdown
            .tracker
            .spawn(sweep_uploads(settings, backends, shutdown.token.clone()));
    }
    if role.runs(Part::Query) {
        let state = conveyor_query::QueryState::new(backends.clone(), settings, keys.clone());
        if role.runs(Part::Projector) {
            state.follow(changes, shutdown.token.clone());
        } else {
            let (state, log, stop) = (state.clone(), backends.log.clone(), shutdown.token.clone());
            let topic = settings.topic().to_owned();
            let projectors = settings.projector.group.clone();
            workers.push((
                "query cache invalidation",
                shutdown.tracker.spawn(conveyor_query::tail_invalidations(
                    state, log, topic, projectors, stop,
                )),
            ));
        }
        router = router.merge(conveyor_query::router(state));
        if !role.runs(Part::Ingest) {
            let ingest =
                conveyor_ingest::IngestState::new(backends.clone(), settings, keys.clone());
            router = router.merge(conveyor_ingest::delete_router(ingest));
        }
    }
    router
}

/// Removes direct uploads never completed, and (off S3) expired event receipts, every quarter
/// of `uploads.ttl_secs` (30 s to 15 min), until `stop`. Every replica sweeps; deletes are
/// idempotent, so overlapping sweeps are harmless.
fn sweep_uploads(
    settings: &Settings,
    backends: &Backends,
    stop: CancellationToken,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let objects = backends.objects.clone();
    let ttl = Duration::from_secs(settings.uploads.ttl_secs.max(1));
    // On S3 the lifecycle rule of `ops sweep-uploads --install-lifecycle-days` expires
    // receipts without reading each one.
    let receipts = settings
        .receipt_retention()
        .filter(|_| !settings.objects_uri().has_lifecycle_rules());
    async move {
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
    }
}

/// The layers every route sits under, outermost last: per-key rate limits, JSON error bodies,
/// request metrics, a panic turned into a 500, the request's span (in its caller's trace when
/// export is on), and CORS when configured.
fn layers(router: Router, settings: &Settings, keys: Keys) -> Router {
    let router = router
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(
            conveyor_runtime::http::RateLimit::new(
                keys,
                settings.auth.rate_per_sec,
                settings.auth.rate_burst,
            ),
            conveyor_runtime::http::rate_limit,
        ))
        .layer(axum::middleware::from_fn(json_errors))
        .layer(axum::middleware::from_fn(track_requests))
        .layer(CatchPanicLayer::custom(|_| {
            ApiError::internal(anyhow::anyhow!("handler panicked")).into_response()
        }))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(conveyor_runtime::trace::request_span)
                .on_response(
                    |response: &axum::http::Response<_>,
                     latency: Duration,
                     span: &tracing::Span| {
                        conveyor_runtime::trace::record_status(span, response.status());
                        // The DEBUG line tower-http writes by default.
                        tower_http::trace::OnResponse::on_response(
                            tower_http::trace::DefaultOnResponse::new(),
                            response,
                            latency,
                            span,
                        );
                    },
                )
                .on_failure(
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
                ),
        );
    match conveyor_runtime::http::cors(&settings.http.cors_origins) {
        Some(cors) => router.layer(cors),
        None => router,
    }
}

impl App {
    /// The TCP port the app is bound to: `listen`'s, or the one the OS chose when `listen`
    /// asks for port 0 (as tests do); 0 if the socket's address cannot be read.
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
                conveyor_runtime::http::serve(listener, router, &http, token).await
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
