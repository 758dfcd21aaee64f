//! The operations routes every role serves: `/healthz`, `/readyz` and `/metrics`.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use conveyor_storage::Backends;

use super::RETRY_AFTER_SECS;

/// `/healthz` (the process runs), `/readyz` (its backends answer) and `/metrics`.
pub fn ops_router(backends: Backends, topic: &str) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(Arc::new((backends, topic.to_owned())))
}

/// The operations routes' part of the OpenAPI document.
#[derive(utoipa::OpenApi)]
#[openapi(paths(healthz, readyz, metrics))]
pub struct OpsApi;

/// `/healthz`'s body.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct Health {
    /// Always `ok`: the process serves requests.
    pub status: String,
}

/// `/readyz`'s body: `ok`, or what each backend answered.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct Readiness {
    /// `ready` or `unavailable`.
    pub status: String,
    /// The event log: `ok`, or its error.
    pub log: String,
    /// The read-model store: `ok`, or its error.
    pub views: String,
    /// The object store: `ok`, or its error.
    pub objects: String,
}

/// Liveness: the process runs.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "The process serves requests", body = Health)))]
async fn healthz() -> axum::Json<Health> {
    axum::Json(Health {
        status: "ok".into(),
    })
}

/// Prometheus metrics, in the text exposition format 0.0.4.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Every metric of this process",
        body = String, content_type = "text/plain")))]
async fn metrics() -> impl IntoResponse {
    static PROCESS: std::sync::LazyLock<metrics_process::Collector> =
        std::sync::LazyLock::new(|| {
            let collector = metrics_process::Collector::default();
            collector.describe();
            collector
        });
    // CPU seconds, resident memory, threads and open files, read from /proc at each scrape.
    PROCESS.collect();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::metrics::render(),
    )
}

/// Readiness: the log, the read-model store and the object store answer.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "Every backend answers", body = Readiness),
        (status = 503, description = "A backend does not answer; each one's state is given",
            body = Readiness, headers(("retry-after" = String, description = "Seconds to wait"))),
    ))]
async fn readyz(State(state): State<Arc<(Backends, String)>>) -> Response {
    let (backends, topic) = &*state;
    let (body, ready) = readiness(backends, topic).await;
    if ready {
        (StatusCode::OK, axum::Json(body)).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, RETRY_AFTER_SECS)],
            axum::Json(body),
        )
            .into_response()
    }
}

/// Asks each backend whether it answers, as `/readyz` does; `true` when all three do.
async fn readiness(backends: &Backends, topic: &str) -> (Readiness, bool) {
    let log = backends.log.ping(topic).await.map_err(|e| e.to_string());
    let views = backends.views.ping().await.map_err(|e| e.to_string());
    let objects = backends
        .objects
        .head("readyz-probe")
        .await
        .map(|_| ())
        .map_err(|e| e.to_string());
    let status = |r: &Result<(), String>| match r {
        Ok(()) => "ok".to_owned(),
        Err(e) => e.clone(),
    };
    let ready = log.is_ok() && views.is_ok() && objects.is_ok();
    let body = Readiness {
        status: if ready { "ready" } else { "unavailable" }.into(),
        log: status(&log),
        views: status(&views),
        objects: status(&objects),
    };
    (body, ready)
}

/// Publishes, every `every` until `stop`, what the alert rules watch without asking `/readyz`:
/// `conveyor_backend_ready{backend}` (1 when the `log`, `views` or `objects` backend answers,
/// else 0), and the free and total bytes of the file system holding `data_dir`
/// (`conveyor_data_dir_free_bytes`, `conveyor_data_dir_capacity_bytes`), where the embedded
/// log, read models and media live.
pub async fn report_health(
    backends: Backends,
    topic: String,
    data_dir: std::path::PathBuf,
    every: std::time::Duration,
    stop: tokio_util::sync::CancellationToken,
) {
    loop {
        let (body, _) = readiness(&backends, &topic).await;
        for (backend, answer) in [
            ("log", &body.log),
            ("views", &body.views),
            ("objects", &body.objects),
        ] {
            metrics::gauge!("conveyor_backend_ready", "backend" => backend)
                .set(if answer == "ok" { 1.0 } else { 0.0 });
        }
        match rustix::fs::statvfs(&data_dir) {
            Ok(fs) => {
                let unit = fs.f_frsize as f64;
                metrics::gauge!("conveyor_data_dir_free_bytes").set(fs.f_bavail as f64 * unit);
                metrics::gauge!("conveyor_data_dir_capacity_bytes").set(fs.f_blocks as f64 * unit);
            }
            Err(e) => {
                tracing::warn!(error = %e, dir = %data_dir.display(), "failed to read the data dir's free space")
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}
