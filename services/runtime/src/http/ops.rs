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
