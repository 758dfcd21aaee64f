//! The ingest edge: streamed uploads (`POST /v1/media`), deletes (`DELETE /v1/media/{id}`) and
//! the event intake for internal producers (`POST /v1/events`).
//!
//! An upload streams into the object store while it is hashed and sniffed, so memory stays
//! flat whatever its size. Only once the original is durable under its content-addressed key
//! is `MediaUploaded` appended, and only once that append is durable does the client get 202.

pub mod direct;
mod upload;

use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, post};
use conveyor_platform::config::{AuthSettings, Limits, Settings, UploadSettings};
use conveyor_platform::events::to_record;
use conveyor_platform::http::{ApiError, bearer, parse_json, require_json};
use conveyor_platform::{Backends, VersionClock};
use conveyor_schemas::{
    Envelope, Event, MediaDeleted, MediaUploaded, MediaUploadedWithVisibility, Visibility,
};
use serde::Deserialize;
use uuid::Uuid;

/// What the ingest handlers share.
pub struct IngestState {
    pub backends: Backends,
    pub auth: AuthSettings,
    pub limits: Limits,
    pub uploads: UploadSettings,
    pub clock: VersionClock,
    pub topic: String,
}

impl IngestState {
    pub fn new(backends: Backends, settings: &Settings) -> Arc<Self> {
        Arc::new(IngestState {
            backends,
            auth: settings.auth.clone(),
            limits: settings.limits.clone(),
            uploads: settings.uploads.clone(),
            clock: VersionClock::new(),
            topic: settings.topic().to_owned(),
        })
    }

    fn owner(&self, headers: &HeaderMap) -> Result<String, ApiError> {
        bearer(headers)
            .and_then(|k| self.auth.api_keys.lookup(k))
            .map(str::to_owned)
            .ok_or_else(ApiError::unauthorized)
    }

    fn service(&self, headers: &HeaderMap) -> Result<String, ApiError> {
        bearer(headers)
            .and_then(|k| self.auth.service_keys.lookup(k))
            .map(str::to_owned)
            .ok_or_else(ApiError::unauthorized)
    }

    async fn append(
        &self,
        events: &[Envelope],
    ) -> Result<Vec<conveyor_platform::log::Position>, ApiError> {
        let records = events.iter().map(to_record).collect();
        self.backends
            .log
            .append(&self.topic, records)
            .await
            .map_err(ApiError::backend)
    }
}

/// `DELETE /v1/media/{id}` alone. Query replicas serve it too, because path-based ingress
/// cannot send a DELETE and a GET of one path to different services.
pub fn delete_router(state: Arc<IngestState>) -> Router {
    Router::new()
        .route("/v1/media/{id}", delete(delete_media))
        .with_state(state)
}

/// The ingest routes.
pub fn router(state: Arc<IngestState>) -> Router {
    // The upload handler enforces `max_upload_bytes` on the file itself while streaming; this
    // outer bound only caps the multipart envelope around it.
    let body_limit = state.limits.max_upload_bytes.saturating_add(1 << 20) as usize;
    Router::new()
        .route(
            "/v1/media",
            post(upload::upload).layer(DefaultBodyLimit::max(body_limit)),
        )
        .route("/v1/media/{id}", delete(delete_media))
        .route("/v1/events", post(post_events))
        .route("/v1/uploads", post(direct::create))
        .route(
            "/v1/uploads/{id}/data",
            axum::routing::put(direct::put_data).layer(DefaultBodyLimit::max(body_limit)),
        )
        .route("/v1/uploads/{id}/complete", post(direct::complete))
        .with_state(state)
}

/// A stored upload, ready to become `MediaUploaded`.
pub(crate) struct Upload {
    pub owner: String,
    pub sha256: String,
    pub bytes: u64,
    pub content_type: String,
    pub title: Option<String>,
    pub visibility: Visibility,
}

impl IngestState {
    /// Moves a checked upload from `incoming` to its content-addressed key (under `private/`
    /// for private media, which is served only through signed URLs) and appends the event.
    /// Returns the new media id once the event is durable.
    pub(crate) async fn accept(&self, incoming: &str, upload: Upload) -> Result<Uuid, ApiError> {
        let prefix = if upload.visibility == Visibility::Private {
            "private/"
        } else {
            ""
        };
        let original_key = format!("{prefix}originals/{}", upload.sha256);
        self.backends
            .objects
            .promote(incoming, &original_key)
            .await
            .map_err(ApiError::backend)?;
        let uploaded = MediaUploaded {
            owner: upload.owner,
            original_key,
            sha256: upload.sha256,
            bytes: upload.bytes,
            content_type: upload.content_type,
            title: upload.title,
        };
        // Public uploads keep the original event layout, which every consumer reads.
        let payload = match upload.visibility {
            Visibility::Public => Event::MediaUploaded(uploaded),
            visibility => Event::MediaUploadedWithVisibility(MediaUploadedWithVisibility {
                upload: uploaded,
                visibility,
            }),
        };
        let id = Uuid::now_v7();
        let event = Envelope::new(id, self.clock.next(), "ingest", payload);
        self.append(std::slice::from_ref(&event)).await?;
        Ok(id)
    }
}

/// `public` or `private`.
pub(crate) fn parse_visibility(text: &str) -> Result<Visibility, ApiError> {
    match text.trim() {
        "public" => Ok(Visibility::Public),
        "private" => Ok(Visibility::Private),
        other => Err(ApiError::bad_request(
            "invalid_visibility",
            format!("visibility: expected `public` or `private`, not {other:?}"),
        )),
    }
}

pub(crate) fn parse_id(id: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(id)
        .map_err(|_| ApiError::bad_request("invalid_id", format!("{id:?} is not a media id")))
}

async fn delete_media(
    State(state): State<Arc<IngestState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let owner = state.owner(&headers)?;
    let id = parse_id(&id)?;
    let media = state
        .backends
        .views
        .media(id)
        .await
        .map_err(ApiError::backend)?;
    let media = media.ok_or_else(|| ApiError::not_found("no such media"))?;
    if media.owner != owner && media.private {
        // Someone else's private media does not exist for this caller (the read routes agree).
        return Err(ApiError::not_found("no such media"));
    }
    if media.owner != owner {
        return Err(ApiError::forbidden("only the owner may delete this media"));
    }
    let event = Envelope::new(
        id,
        state.clock.next(),
        "ingest",
        Event::MediaDeleted(MediaDeleted { deleted_by: owner }),
    );
    state.append(std::slice::from_ref(&event)).await?;
    let body = serde_json::json!({ "id": id, "status": "deleted" });
    Ok((StatusCode::ACCEPTED, axum::Json(body)).into_response())
}

/// An event from an internal producer. Conveyor assigns the version and time; the producer
/// may give an `event_id` to make retries of its own idempotent.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct IncomingEvent {
    aggregate_id: Uuid,
    #[serde(default)]
    event_id: Option<Uuid>,
    payload: Event,
}

async fn post_events(
    State(state): State<Arc<IngestState>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let service = state.service(&headers)?;
    require_json(&headers)?;
    // One event, or an array of them appended together.
    let incoming: Vec<IncomingEvent> = match body.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'[') => parse_json(&body)?,
        _ => vec![parse_json(&body)?],
    };
    if incoming.is_empty() {
        return Err(ApiError::bad_request("invalid_json", "no events given"));
    }
    let mut events = Vec::with_capacity(incoming.len());
    for (i, e) in incoming.into_iter().enumerate() {
        if !matches!(e.payload, Event::MediaDescribed(_) | Event::MediaDeleted(_)) {
            return Err(ApiError::bad_request(
                "invalid_event",
                format!(
                    "[{i}].payload: internal producers may send MediaDescribed or MediaDeleted, not {}",
                    e.payload.type_name()
                ),
            ));
        }
        let mut envelope = Envelope::new(e.aggregate_id, state.clock.next(), &service, e.payload);
        if let Some(id) = e.event_id {
            envelope.event_id = id;
        }
        events.push(envelope);
    }
    let positions = state.append(&events).await?;
    let accepted: Vec<serde_json::Value> = events
        .iter()
        .zip(positions)
        .map(|(e, p)| serde_json::json!({ "event_id": e.event_id, "aggregate_id": e.aggregate_id, "partition": p.partition, "offset": p.offset }))
        .collect();
    Ok((
        StatusCode::ACCEPTED,
        axum::Json(serde_json::json!({ "accepted": accepted })),
    )
        .into_response())
}
