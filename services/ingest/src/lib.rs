//! The ingest edge: streamed uploads (`POST /v1/media`), deletes (`DELETE /v1/media/{id}`) and
//! the event intake for internal producers (`POST /v1/events`).
//!
//! An upload streams into the object store while it is hashed and sniffed, so memory stays
//! flat whatever its size. Only once the original is durable under its content-addressed key
//! is `MediaUploaded` appended, and only once that append is durable does the client get 202.
#![warn(missing_docs)]

mod accepted;
pub mod direct;
pub mod events;
mod idempotency;
mod multipart_guard;
mod receipts;
mod upload;

use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::from_fn_with_state;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, post};
use conveyor_config::{Limits, Settings, UploadSettings};
use conveyor_runtime::http::{ApiError, ErrorBody, bearer, content_length_over};
use conveyor_runtime::keys::{KeyKind, Keys};
use conveyor_runtime::trace::traced;
use conveyor_schemas::{
    Envelope, Event, MediaDeleted, MediaUploaded, MediaUploadedWithVisibility, Visibility,
};
use conveyor_storage::events::to_record;
use conveyor_storage::media::MediaType;
use conveyor_storage::{Backends, VersionClock};
use uuid::Uuid;

/// What the ingest handlers share.
pub struct IngestState {
    /// The storage backends: originals and pending uploads go to the object store, events to
    /// the log, and owners' totals (for the quota) and media (for deletes) are read from the
    /// read store.
    pub backends: Backends,
    /// The keys requests present: client keys name the owner of an upload or delete,
    /// service keys the producer of `POST /v1/events`.
    pub keys: Keys,
    /// Most bytes of originals per owner (`auth.owner_quota_bytes`); 0 for none.
    pub owner_quota_bytes: u64,
    /// The upload limits (`limits.*`); `max_upload_bytes` bounds an image.
    pub limits: Limits,
    /// Direct-upload settings (`uploads.*`): URL lifetime, multipart threshold and part size,
    /// and the key the edge signs its own upload URLs with.
    pub uploads: UploadSettings,
    /// Hands out the versions of the events this edge appends: strictly increasing, close to
    /// wall-clock µs since the epoch.
    pub clock: VersionClock,
    /// The media events topic events are appended to (`log.topic`).
    pub topic: String,
    /// Largest accepted video (`video.max_bytes`).
    pub max_video_bytes: u64,
    /// Why video is refused here, naming the missing tool: set by an embedded `serve` that
    /// cannot transcode. Other ingest roles accept video for the transcoder role.
    pub video_refusal: Option<String>,
}

impl IngestState {
    /// The state of an ingest edge on `backends`, with the limits, quota, upload settings and
    /// topic of `settings`, accepting video as well as images.
    pub fn new(backends: Backends, settings: &Settings, keys: Keys) -> Arc<Self> {
        Self::refusing_video(backends, settings, keys, None)
    }

    /// [`IngestState::new`], answering video uploads with 415 and `refusal` when it is set.
    pub fn refusing_video(
        backends: Backends,
        settings: &Settings,
        keys: Keys,
        refusal: Option<String>,
    ) -> Arc<Self> {
        Arc::new(IngestState {
            max_video_bytes: settings.video.max_bytes,
            video_refusal: refusal,
            backends,
            keys,
            owner_quota_bytes: settings.auth.owner_quota_bytes,
            limits: settings.limits.clone(),
            uploads: settings.uploads.clone(),
            clock: VersionClock::new(),
            topic: settings.topic().to_owned(),
        })
    }

    fn owner(&self, headers: &HeaderMap) -> Result<String, ApiError> {
        bearer(headers)
            .and_then(|k| self.keys.lookup(k, KeyKind::Client))
            .map(|principal| principal.name)
            .ok_or_else(ApiError::unauthorized)
    }

    fn service(&self, headers: &HeaderMap) -> Result<String, ApiError> {
        bearer(headers)
            .and_then(|k| self.keys.lookup(k, KeyKind::Service))
            .map(|principal| principal.name)
            .ok_or_else(ApiError::unauthorized)
    }

    /// Refuses with 413 `quota_exceeded` when `owner`'s originals plus `adding` bytes would
    /// pass `auth.owner_quota_bytes`. The owner's total is the read model's, so uploads still
    /// in flight are not in it.
    async fn check_quota(&self, owner: &str, adding: u64) -> Result<(), ApiError> {
        let quota = self.owner_quota_bytes;
        if quota == 0 {
            return Ok(());
        }
        let used = self
            .backends
            .views
            .owner_stats(owner)
            .await
            .map_err(ApiError::backend)?
            .bytes;
        if used < quota && used.saturating_add(adding) <= quota {
            return Ok(());
        }
        let message = if adding == 0 {
            format!(
                "{owner} keeps {used} bytes of originals, which reaches the quota of {quota} \
                 bytes (auth.owner_quota_bytes); delete media to make room"
            )
        } else {
            format!(
                "{owner} keeps {used} bytes of originals, and this upload of {adding} bytes would \
                 pass the quota of {quota} bytes (auth.owner_quota_bytes); delete media to make room"
            )
        };
        Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "quota_exceeded",
            message,
        ))
    }

    /// The most bytes a file of `media` may have: `video.max_bytes` for video,
    /// `limits.max_upload_bytes` for images.
    fn max_bytes(&self, media: MediaType) -> u64 {
        if media.is_video() {
            self.max_video_bytes
        } else {
            self.limits.max_upload_bytes
        }
    }

    /// The most bytes any accepted file may have, before its type is known.
    fn max_any_bytes(&self) -> u64 {
        if self.video_refusal.is_some() {
            self.limits.max_upload_bytes
        } else {
            self.limits.max_upload_bytes.max(self.max_video_bytes)
        }
    }

    /// Refuses `media` with 415 when it is video and this process cannot take video.
    fn check_accepted(&self, media: MediaType) -> Result<(), ApiError> {
        match &self.video_refusal {
            Some(reason) if media.is_video() => Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                format!("{media} video is not accepted here: {reason}"),
            )),
            _ => Ok(()),
        }
    }

    async fn append(
        &self,
        events: &[Envelope],
    ) -> Result<Vec<conveyor_storage::log::Position>, ApiError> {
        let records = events.iter().map(|e| traced(to_record(e))).collect();
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

/// The ingest routes' part of the OpenAPI document.
#[derive(utoipa::OpenApi)]
#[openapi(paths(
    upload::upload,
    delete_media,
    events::post_events,
    direct::create,
    direct::put_data,
    direct::complete,
))]
pub struct IngestApi;

/// Bodies of the JSON routes (`/v1/events`, `/v1/uploads`, completions): axum's default.
const JSON_BODY_LIMIT: u64 = 2 << 20;

/// The ingest routes.
pub fn router(state: Arc<IngestState>) -> Router {
    // The upload handler enforces the file's own limit (by its sniffed type) while streaming;
    // this outer bound only caps the multipart envelope around the largest file accepted.
    let body_limit = state.max_any_bytes().saturating_add(1 << 20);
    let client = |limit| Gate {
        state: state.clone(),
        key: KeyKind::Client,
        limit,
    };
    let service = Gate {
        state: state.clone(),
        key: KeyKind::Service,
        limit: JSON_BODY_LIMIT,
    };
    Router::new()
        .route(
            "/v1/media",
            post(upload::upload)
                .layer(DefaultBodyLimit::max(body_limit as usize))
                .route_layer(from_fn_with_state(client(body_limit), gate)),
        )
        .route("/v1/media/{id}", delete(delete_media))
        .route(
            "/v1/events",
            post(events::post_events).route_layer(from_fn_with_state(service, gate)),
        )
        .route(
            "/v1/uploads",
            post(direct::create).route_layer(from_fn_with_state(client(JSON_BODY_LIMIT), gate)),
        )
        .route(
            "/v1/uploads/{id}/data",
            axum::routing::put(direct::put_data).layer(DefaultBodyLimit::max(body_limit as usize)),
        )
        .route(
            "/v1/uploads/{id}/complete",
            post(direct::complete).route_layer(from_fn_with_state(client(JSON_BODY_LIMIT), gate)),
        )
        .with_state(state)
}

/// What a route asks of a request before its body is read.
#[derive(Clone)]
struct Gate {
    state: Arc<IngestState>,
    key: KeyKind,
    /// Largest body, in bytes.
    limit: u64,
}

/// Refuses a request without a valid key (401) or with a declared `Content-Length` over the
/// route's limit (413) from its headers alone: no byte of its body is read, and a client that
/// sent `Expect: 100-continue` never gets the go-ahead.
async fn gate(
    State(gate): State<Gate>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let headers = request.headers();
    let authorized = match gate.key {
        KeyKind::Client => gate.state.owner(headers).is_ok(),
        KeyKind::Service => gate.state.service(headers).is_ok(),
    };
    if !authorized {
        return ApiError::unauthorized().into_response();
    }
    if let Some(too_large) = content_length_over(headers, gate.limit) {
        return too_large.into_response();
    }
    next.run(request).await
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
    pub(crate) async fn accept(
        &self,
        incoming: &str,
        upload: Upload,
        reserved: Option<idempotency::Reserved>,
    ) -> Result<Uuid, ApiError> {
        let original_key = upload.original_key();
        self.backends
            .objects
            .promote(incoming, &original_key)
            .await
            .map_err(ApiError::backend)?;
        let event = match reserved {
            // A retry with an idempotency key appends the very same event as its first try.
            Some(r) => Envelope {
                event_id: r.event_id,
                ..Envelope::new(r.id, r.version, "ingest", upload.into_event())
            },
            None => Envelope::new(
                Uuid::now_v7(),
                self.clock.next(),
                "ingest",
                upload.into_event(),
            ),
        };
        self.append(std::slice::from_ref(&event)).await?;
        Ok(event.aggregate_id)
    }
}

impl Upload {
    /// `originals/{sha256}`, or `private/originals/{sha256}` for private media.
    pub(crate) fn original_key(&self) -> String {
        let prefix = if self.visibility == Visibility::Private {
            "private/"
        } else {
            ""
        };
        format!("{prefix}originals/{}", self.sha256)
    }

    /// `MediaUploaded`, or `MediaUploadedWithVisibility` for anything but public media: public
    /// uploads keep the original event layout, which every consumer reads.
    pub(crate) fn into_event(self) -> Event {
        let original_key = self.original_key();
        let uploaded = MediaUploaded {
            owner: self.owner,
            original_key,
            sha256: self.sha256,
            bytes: self.bytes,
            content_type: self.content_type,
            title: self.title,
        };
        match self.visibility {
            Visibility::Public => Event::MediaUploaded(uploaded),
            visibility => Event::MediaUploadedWithVisibility(MediaUploadedWithVisibility {
                upload: uploaded,
                visibility,
            }),
        }
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

/// `DELETE /v1/media/{id}`'s answer.
#[derive(serde::Serialize, utoipa::ToSchema)]
struct DeleteAccepted {
    id: Uuid,
    /// Always `deleted`: `MediaDeleted` is durable; the item and its bytes go as it is applied.
    #[schema(example = "deleted")]
    status: &'static str,
}

/// Delete media (its owner only).
#[utoipa::path(delete, path = "/v1/media/{id}", tag = "media",
    params(("id" = Uuid, Path, description = "The media id")),
    responses(
        (status = 202, description = "`MediaDeleted` is appended", body = DeleteAccepted),
        (status = 400, description = "Not a media id", body = ErrorBody),
        (status = 401, description = "No valid client key", body = ErrorBody),
        (status = 403, description = "Someone else's public media", body = ErrorBody),
        (status = 404, description = "No such media (or someone else's private media)", body = ErrorBody),
    ),
    security(("client_key" = [])))]
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
    let body = DeleteAccepted {
        id,
        status: "deleted",
    };
    Ok((StatusCode::ACCEPTED, axum::Json(body)).into_response())
}
