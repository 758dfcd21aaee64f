//! Direct uploads: the client sends the bytes straight to object storage, and the API only
//! issues URLs and checks what arrived.
//!
//! 1. `POST /v1/uploads {content_type, bytes, sha256?, visibility?}` records a pending upload
//!    (`uploads/{id}.json` in the object store, so any edge replica can complete it) and
//!    returns a presigned `PUT` URL for `incoming/{id}`, or presigned part URLs when the file
//!    is large. The embedded store cannot presign, so the edge signs its own URL (HMAC-SHA256
//!    over method, path and expiry, with a key id for rotation) and takes the bytes itself at
//!    `PUT /v1/uploads/{id}/data`.
//! 2. `POST /v1/uploads/{id}/complete {parts?}` completes a multipart upload, then checks the
//!    size against the declared one, sniffs the type, and streams the object to compare its
//!    sha256. A mismatch is 422: the object is removed and nothing is appended. Otherwise the
//!    object moves to `originals/{sha256}` (`private/originals/{sha256}` for private media)
//!    and `MediaUploaded` is appended, with the upload id as the media id. A completion that
//!    failed transiently (503) can be retried: what it verified is kept
//!    (`uploads/{id}.verified`), and the retry appends the same event.
//!
//! Uploads never completed expire: `conveyor ops sweep-uploads` removes them (ids are UUIDv7,
//! so their age is in their name).

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use conveyor_runtime::http::{ApiError, ErrorBody, SelfLink, parse_json, require_json};
use conveyor_runtime::signing;
use conveyor_schemas::Visibility;
use conveyor_storage::clock::now_micros;
use conveyor_storage::media::{MediaType, SNIFF_BYTES};
use conveyor_storage::objects::ObjectError;
use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::accepted::Accepted;
use crate::{IngestState, idempotency, parse_id};

/// `POST /v1/uploads`'s body: what the client promises to send.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct NewUpload {
    /// One of the accepted image or video types; the bytes must turn out to be this type.
    #[schema(example = "image/jpeg")]
    content_type: String,
    /// The exact size, in bytes: at least 1, at most `limits.max_upload_bytes` for an image
    /// and `video.max_bytes` for a video.
    #[schema(minimum = 1)]
    bytes: u64,
    /// The bytes' sha256, as 64 lowercase hex digits; the completion checks it when given.
    #[serde(default)]
    #[schema(pattern = "^[0-9a-f]{64}$")]
    sha256: Option<String>,
    #[serde(default)]
    visibility: Visibility,
}

/// `POST /v1/uploads`'s answer: where to send the bytes, and how to complete.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct UploadCreated {
    upload_id: Uuid,
    /// Always `PUT`.
    method: &'static str,
    /// The URL to `PUT` the whole file to (absent when `parts` is given). Presigned on S3;
    /// an edge-signed `/v1/uploads/{id}/data?…` on the embedded store.
    #[serde(skip_serializing_if = "Option::is_none")]
    url: Option<String>,
    /// Size of each part but the last, in bytes, for a multipart upload.
    #[serde(skip_serializing_if = "Option::is_none")]
    part_size: Option<u64>,
    /// One presigned URL per part, for files from `uploads.multipart_threshold_mib` up.
    #[serde(skip_serializing_if = "Option::is_none")]
    parts: Option<Vec<PartUrl>>,
    /// When the URLs and the upload expire (RFC 3339).
    expires_at: String,
    /// Headers to send with each `PUT`.
    headers: PutHeaders,
    /// Where to `POST` once the bytes are sent.
    complete: String,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct PartUrl {
    part_number: u32,
    url: String,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct PutHeaders {
    #[serde(rename = "content-type")]
    content_type: String,
}

/// `PUT /v1/uploads/{id}/data`'s answer.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct Received {
    /// How many bytes were stored.
    bytes: u64,
}

/// What `POST /v1/uploads` promised, kept until completion.
#[derive(Debug, Serialize, Deserialize)]
pub struct PendingUpload {
    /// The client key's owner who created the upload; only they may complete it.
    pub owner: String,
    /// The declared type, by its canonical name (`video/MP4; codecs=…` is kept as
    /// `video/mp4`); the bytes must sniff as it or its sibling container.
    pub content_type: String,
    /// The declared size in bytes, at least 1; what arrives must be exactly this.
    pub bytes: u64,
    /// The declared sha256, 64 lowercase hex digits, checked at completion; `None` when the
    /// client gave none.
    pub sha256: Option<String>,
    /// Unix seconds.
    pub expires_at: i64,
    /// The store's multipart upload id, when the client uploads parts.
    pub multipart: Option<String>,
    /// Who may see the media once completed; public when a record does not say.
    #[serde(default)]
    pub visibility: Visibility,
}

/// The object-store key of upload `id`'s [`PendingUpload`] record: `uploads/{id}.json`. It
/// lives there from `POST /v1/uploads` until the upload is completed, refused as not what was
/// declared, or swept.
pub fn pending_key(id: Uuid) -> String {
    format!("uploads/{id}.json")
}

/// The object-store key the client's bytes for upload `id` are `PUT` to: `incoming/{id}`.
/// Never served: a completion moves them to [`claimed_key`] before checking them.
pub fn incoming_key(id: Uuid) -> String {
    format!("incoming/{id}")
}

/// The completion's claim on an upload: created exclusively ([`ObjectStore::put_if_absent`]),
/// so one completion runs at a time on every replica, and PUTs are refused while it stands.
///
/// [`ObjectStore::put_if_absent`]: conveyor_storage::ObjectStore::put_if_absent
pub fn claim_key(id: Uuid) -> String {
    format!("uploads/{id}.claim")
}

/// What a completion verified, written before it promotes the bytes and appends: a retry
/// after a transient failure (the log down during the append) finds the bytes where this
/// attempt promoted them and appends the very same event, so a client that retries gets one
/// media item, whichever attempt's append landed.
pub fn verified_key(id: Uuid) -> String {
    format!("uploads/{id}.verified")
}

/// The record at [`verified_key`].
#[derive(Debug, Serialize, Deserialize)]
struct Verified {
    sha256: String,
    /// What the bytes are, sniffed; `None` in records written before it was kept (then the
    /// declared type, which had to be the same).
    #[serde(default)]
    content_type: Option<String>,
    /// `MediaUploaded`'s event id and version, fixed on the first attempt.
    event_id: Uuid,
    version: u64,
}

/// The bytes a completion works on: moved out of `incoming/{id}` once claimed, where no PUT
/// writes, so the bytes hashed are exactly the bytes promoted.
pub fn claimed_key(id: Uuid) -> String {
    format!("incoming/{id}.claimed")
}

fn completing() -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "upload_completing",
        "this upload is being completed; its bytes can no longer change (read the media once the completion answers)",
    )
}

fn unprocessable(code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, code, message)
}

/// What an edge-signed upload URL signs.
fn upload_message(id: Uuid, expires: i64) -> String {
    format!("PUT\n/v1/uploads/{id}/data\n{expires}")
}

fn rfc3339(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// Start a direct upload: the client sends the bytes straight to storage.
#[utoipa::path(post, path = "/v1/uploads", tag = "uploads",
    request_body = NewUpload,
    responses(
        (status = 201, description = "Where to send the bytes", body = UploadCreated),
        (status = 400, description = "A malformed body; the message names the field", body = ErrorBody),
        (status = 401, description = "No valid client key", body = ErrorBody),
        (status = 413, description = "`bytes` is over `limits.max_upload_bytes` (images) or `video.max_bytes` (video), or would pass the owner's quota (`quota_exceeded`)", body = ErrorBody),
        (status = 415, description = "Not JSON, or `content_type` is not an accepted image type", body = ErrorBody),
    ),
    security(("client_key" = [])))]
pub(crate) async fn create(
    State(state): State<Arc<IngestState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let owner = state.owner(&headers)?;
    require_json(&headers)?;
    let request: NewUpload = parse_json(&body)?;
    let Some(media) = MediaType::from_declared(&request.content_type) else {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!(
                "content_type: {:?} is not one of {}",
                request.content_type,
                MediaType::ALL.map(MediaType::content_type).join(", ")
            ),
        ));
    };
    state.check_accepted(media)?;
    if request.bytes == 0 {
        return Err(ApiError::bad_request(
            "invalid_json",
            "bytes: must be at least 1",
        ));
    }
    if request.bytes > state.max_bytes(media) {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!(
                "bytes: over the limit of {} bytes for {media}",
                state.max_bytes(media)
            ),
        ));
    }
    let is_hex =
        |sha: &str| sha.len() == 64 && sha.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if request.sha256.as_deref().is_some_and(|sha| !is_hex(sha)) {
        return Err(ApiError::bad_request(
            "invalid_json",
            "sha256: expected 64 lowercase hex digits",
        ));
    }
    state.check_quota(&owner, request.bytes).await?;
    let id = Uuid::now_v7();
    let ttl = Duration::from_secs(state.uploads.ttl_secs.max(1));
    let expires_at = now_micros() / 1_000_000 + ttl.as_secs() as i64;
    let objects = &state.backends.objects;
    let incoming = incoming_key(id);
    let part_size = state.uploads.part_size_mib.max(5) * 1024 * 1024;
    let mut multipart = None;
    let mut answer = UploadCreated {
        upload_id: id,
        method: "PUT",
        url: None,
        part_size: None,
        parts: None,
        expires_at: rfc3339(expires_at),
        headers: PutHeaders {
            content_type: request.content_type.clone(),
        },
        complete: format!("/v1/uploads/{id}/complete"),
    };
    let large = request.bytes >= state.uploads.multipart_threshold_mib * 1024 * 1024;
    let parts = request.bytes.div_ceil(part_size) as u32;
    let presigned_parts = if large && parts > 1 {
        objects
            .presigned_multipart(&incoming, parts, ttl, media.content_type())
            .await
            .map_err(ApiError::backend)?
    } else {
        None
    };
    if let Some((upload_id, urls)) = presigned_parts {
        multipart = Some(upload_id);
        answer.part_size = Some(part_size);
        answer.parts = Some(
            urls.into_iter()
                .enumerate()
                .map(|(i, url)| PartUrl {
                    part_number: i as u32 + 1,
                    url,
                })
                .collect(),
        );
    } else if let Some(url) = objects
        .presigned_put(&incoming, ttl, media.content_type())
        .await
        .map_err(ApiError::backend)?
    {
        answer.url = Some(url);
    } else {
        // The embedded store: this edge takes the bytes, at a URL it signs itself.
        let message = upload_message(id, expires_at);
        let (kid, sig) = signing::sign(&state.uploads.signing_key, &message).ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_IMPLEMENTED,
                "direct_uploads_disabled",
                "direct uploads to the embedded store need CONVEYOR__UPLOADS__SIGNING_KEY",
            )
        })?;
        answer.url = Some(format!(
            "/v1/uploads/{id}/data?expires={expires_at}&kid={kid}&sig={sig}"
        ));
    }
    let pending = PendingUpload {
        owner,
        // The canonical name of what was declared (`video/MP4; codecs=…` is `video/mp4`).
        content_type: media.content_type().to_owned(),
        bytes: request.bytes,
        sha256: request.sha256,
        expires_at,
        multipart,
        visibility: request.visibility,
    };
    let record = serde_json::to_vec(&pending).map_err(ApiError::internal)?;
    objects
        .put_bytes(&pending_key(id), record.into())
        .await
        .map_err(ApiError::backend)?;
    Ok((StatusCode::CREATED, axum::Json(answer)).into_response())
}

/// The signature of an edge-signed upload URL, as `POST /v1/uploads` gave it.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct Signed {
    /// Unix seconds.
    expires: i64,
    /// The signing key's id.
    kid: String,
    /// HMAC-SHA256 over the method, path and expiry.
    sig: String,
}

async fn load_pending(state: &IngestState, id: Uuid) -> Result<PendingUpload, ApiError> {
    let bytes = match state.backends.objects.get_bytes(&pending_key(id)).await {
        Ok(b) => b,
        Err(ObjectError::NotFound) => {
            return Err(ApiError::not_found(
                "no such upload (completed, expired or never created)",
            ));
        }
        Err(e) => return Err(ApiError::backend(e)),
    };
    serde_json::from_slice(&bytes).map_err(ApiError::internal)
}

/// Most of a refused body read and dropped before answering. A client still sending would
/// otherwise see its connection reset instead of the status; past this, a reset it is.
const REFUSED_BODY_DRAIN: u64 = 256 << 10;

/// Answers `error` without reading the body when the client waits for the go-ahead
/// (`Expect: 100-continue`), and after draining at most [`REFUSED_BODY_DRAIN`] otherwise.
async fn refuse(
    data: &mut axum::body::BodyDataStream,
    expects_continue: bool,
    error: ApiError,
) -> ApiError {
    if expects_continue {
        return error;
    }
    let mut read = 0u64;
    while let Some(Ok(chunk)) = data.next().await {
        read += chunk.len() as u64;
        if read > REFUSED_BODY_DRAIN {
            break;
        }
    }
    error
}

fn too_large(declared: u64) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "too_large",
        format!("the body is larger than the declared {declared} bytes"),
    )
}

/// The embedded store's upload URL, as `POST /v1/uploads` gave it: the signature is the
/// credential, so no key is needed.
#[utoipa::path(put, path = "/v1/uploads/{id}/data", tag = "uploads",
    params(("id" = Uuid, Path, description = "The upload id"), Signed),
    request_body(content = Vec<u8>, content_type = "application/octet-stream",
        description = "The file's bytes, exactly as many as declared"),
    responses(
        (status = 200, description = "The bytes are stored; complete the upload next", body = Received),
        (status = 400, description = "A malformed id, or a body that ended early", body = ErrorBody),
        (status = 408, description = "The body arrived slower than `http.min_body_rate_bytes_per_sec` or stalled (`body_too_slow`)", body = ErrorBody),
        (status = 403, description = "A forged, altered or expired signature", body = ErrorBody),
        (status = 404, description = "No such upload (completed, expired or never created)", body = ErrorBody),
        (status = 409, description = "The upload is being completed or was completed; its bytes can no longer change", body = ErrorBody),
        (status = 413, description = "More bytes than declared", body = ErrorBody),
        (status = 415, description = "A `Content-Type` other than the one the upload was declared with (`unsupported_media_type`): the URL pins it, as S3's signature does", body = ErrorBody),
    ))]
pub(crate) async fn put_data(
    State(state): State<Arc<IngestState>>,
    Path(id): Path<String>,
    signed: Result<Query<Signed>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let mut data = body.into_data_stream();
    let expects_continue = headers
        .get(axum::http::header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let forbidden = || ApiError::forbidden("the upload URL's signature is invalid or has expired");
    let Ok(Query(signed)) = signed else {
        return Err(refuse(&mut data, expects_continue, forbidden()).await);
    };
    let message = upload_message(id, signed.expires);
    if !signing::verify(
        &state.uploads.signing_key,
        &signed.kid,
        &message,
        &signed.sig,
        signed.expires,
    ) {
        return Err(refuse(&mut data, expects_continue, forbidden()).await);
    }
    let pending = match load_pending(&state, id).await {
        Ok(p) => p,
        Err(e) => return Err(refuse(&mut data, expects_continue, e).await),
    };
    if is_claimed(&state, id).await? {
        return Err(refuse(&mut data, expects_continue, completing()).await);
    }
    // The URL pins the type the upload was declared with, as S3's signature does: a PUT that
    // says another is refused (the stored bytes are typed by sniffing either way).
    let claimed_type = headers
        .get(axum::http::header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap_or("(not text)"));
    if let Some(claimed) = claimed_type.filter(|c| {
        MediaType::from_declared(c).is_none_or(|m| m.content_type() != pending.content_type)
    }) {
        let refused = ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!(
                "Content-Type: {claimed:?} is not the type this upload was declared with ({}); \
                 send the headers POST /v1/uploads answered",
                pending.content_type
            ),
        );
        return Err(refuse(&mut data, expects_continue, refused).await);
    }
    let declared_too_small = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        .is_some_and(|length| length > pending.bytes);
    if declared_too_small {
        return Err(refuse(&mut data, expects_continue, too_large(pending.bytes)).await);
    }
    let limit = pending.bytes;
    let mut seen = 0u64;
    let stream = data
        .map_err(std::io::Error::other)
        .map(move |chunk| {
            let chunk = chunk?;
            seen += chunk.len() as u64;
            if seen > limit {
                return Err(std::io::Error::other(LargerThanDeclared));
            }
            Ok(chunk)
        })
        .boxed();
    match state.backends.objects.put(&incoming_key(id), stream).await {
        // A completion claimed the upload while these bytes arrived: they may or may not be
        // the ones it took, so the client is not told they were.
        Ok(_) if is_claimed(&state, id).await? => Err(completing()),
        // The upload was completed while these bytes arrived: they go nowhere.
        Ok(_) if load_pending(&state, id).await.is_err() => {
            let _ = state.backends.objects.delete(&incoming_key(id)).await;
            Err(ApiError::new(
                StatusCode::CONFLICT,
                "upload_completed",
                "the upload was completed while these bytes arrived; they were not used",
            ))
        }
        Ok(meta) => Ok((StatusCode::OK, axum::Json(Received { bytes: meta.size })).into_response()),
        Err(ObjectError::Body(e))
            if e.get_ref()
                .is_some_and(|inner| inner.is::<LargerThanDeclared>()) =>
        {
            Err(too_large(limit))
        }
        Err(ObjectError::Body(e)) => Err(conveyor_runtime::http::body_read_error(&e)),
        Err(e) => Err(ApiError::backend(e)),
    }
}

/// Whether a completion holds the upload or has verified its bytes: either way, no PUT may
/// change them.
async fn is_claimed(state: &IngestState, id: Uuid) -> Result<bool, ApiError> {
    for key in [claim_key(id), verified_key(id)] {
        let held = state.backends.objects.head(&key).await;
        if held.map_err(ApiError::backend)?.is_some() {
            return Ok(true);
        }
    }
    Ok(false)
}

/// A direct upload's body ran past the size its upload was created with.
#[derive(Debug, thiserror::Error)]
#[error("body larger than the declared size")]
struct LargerThanDeclared;

/// `POST /v1/uploads/{id}/complete`'s body; an empty body means no parts.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct Completion {
    /// Every part of a multipart upload, with the `ETag` its `PUT` answered.
    #[serde(default)]
    parts: Vec<CompletedPart>,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CompletedPart {
    #[schema(minimum = 1)]
    part_number: u32,
    etag: String,
}

/// Complete a direct upload: check what arrived, then store and append it as `POST /v1/media`
/// does. Safe to retry after a 503.
#[utoipa::path(post, path = "/v1/uploads/{id}/complete", tag = "uploads",
    params(("id" = Uuid, Path, description = "The upload id"),
        ("idempotency-key" = Option<String>, Header, description = "A retry with the same key and body gets the first answer, also after the upload completed (without a key, 404 then); the same key for another request is 409")),
    request_body(content = Option<Completion>, description = "Only for multipart uploads"),
    responses(
        (status = 202, description = "Verified, stored and appended; the media id is the upload id", body = Accepted,
            headers(("location" = String, description = "The media's URL"))),
        (status = 400, description = "A malformed id, body or `Idempotency-Key`", body = ErrorBody),
        (status = 401, description = "No valid client key", body = ErrorBody),
        (status = 403, description = "Someone else's upload", body = ErrorBody),
        (status = 404, description = "No such upload (completed, expired or never created)", body = ErrorBody),
        (status = 409, description = "Another request is completing it, or has; or the `Idempotency-Key` was used for another request", body = ErrorBody),
        (status = 410, description = "The upload expired", body = ErrorBody),
        (status = 413, description = "It would pass the owner's quota (`quota_exceeded`); the upload stays, for after a delete", body = ErrorBody),
        (status = 422, description = "What arrived is not what was declared (size, type, sha256, parts); nothing is kept", body = ErrorBody),
    ),
    security(("client_key" = [])))]
pub(crate) async fn complete(
    State(state): State<Arc<IngestState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let owner = state.owner(&headers)?;
    let id = parse_id(&id)?;
    let key = idempotency::key(&headers)?;
    let completion: Completion = if body.iter().all(u8::is_ascii_whitespace) {
        Completion::default()
    } else {
        parse_json(&body)?
    };
    // With a key, a retry after the upload completed gets the first 202 (without one, 404:
    // the upload is gone), and the key is this upload's alone.
    let ticket = match key {
        None => None,
        Some(key) => {
            // Someone else's upload leaves no receipt behind.
            if let Ok(pending) = load_pending(&state, id).await
                && pending.owner != owner
            {
                return Err(ApiError::forbidden(
                    "only the uploader may complete this upload",
                ));
            }
            // An empty body and one of whitespace are the same completion.
            let body: &[u8] = if body.iter().all(u8::is_ascii_whitespace) {
                &[]
            } else {
                &body
            };
            let fingerprint = idempotency::fingerprint(&[b"complete", id.as_bytes(), body]);
            let reserved = idempotency::Reserved {
                id,
                event_id: Uuid::nil(),
                version: 0,
            };
            match idempotency::claim(&state, &owner, &key, fingerprint, reserved).await? {
                idempotency::Claim::Replay(first) => return Ok(first.respond()),
                idempotency::Claim::Run(ticket) => Some(ticket),
            }
        }
    };
    let outcome = complete_owned(&state, id, owner, completion).await;
    match (ticket, &outcome) {
        (Some(ticket), Ok(accepted)) => {
            if let Err(e) = ticket.finish(&state, accepted).await {
                tracing::warn!(error = %e, "could not record an idempotency key's answer");
            }
        }
        // A completion appends the same event however often it is retried (its ids are the
        // upload's), so a failed one needs no takeover: its key is forgotten.
        (Some(ticket), Err(_)) => ticket.forget(&state).await,
        (None, _) => {}
    }
    outcome.map(Accepted::respond)
}

/// The completion of upload `id` by `owner`: checks, claim, verification, append.
async fn complete_owned(
    state: &Arc<IngestState>,
    id: Uuid,
    owner: String,
    completion: Completion,
) -> Result<Accepted, ApiError> {
    let pending = load_pending(state, id).await?;
    if pending.owner != owner {
        return Err(ApiError::forbidden(
            "only the uploader may complete this upload",
        ));
    }
    if pending.expires_at < now_micros() / 1_000_000 {
        return Err(ApiError::new(
            StatusCode::GONE,
            "expired",
            "the upload expired; start a new one",
        ));
    }
    let objects = &state.backends.objects;
    // One completion at a time: the others get 409 until this one answers, and 404 after.
    let claimed = objects
        .put_if_absent(&claim_key(id), Bytes::from(now_micros().to_string()))
        .await
        .map_err(ApiError::backend)?;
    if !claimed {
        return Err(completing());
    }
    // A completion that finished between our read of the pending record and our claim.
    if let Err(e) = load_pending(state, id).await {
        let _ = objects.delete(&claim_key(id)).await;
        return Err(if e.status == StatusCode::NOT_FOUND {
            ApiError::new(
                StatusCode::CONFLICT,
                "upload_completed",
                "another request completed this upload",
            )
        } else {
            e
        });
    }
    let outcome = complete_claimed(state, id, &pending, owner, completion).await;
    match &outcome {
        Ok(_) => {
            // The pending record goes first: from then on a completion finds no upload (404).
            let _ = objects.delete(&pending_key(id)).await;
            let _ = objects.delete(&verified_key(id)).await;
        }
        Err(e) if e.status == StatusCode::UNPROCESSABLE_ENTITY => {
            // Nothing half written: the bad bytes and the pending record go.
            let _ = objects.delete(&claimed_key(id)).await;
            let _ = objects.delete(&incoming_key(id)).await;
            let _ = objects.delete(&verified_key(id)).await;
            let _ = objects.delete(&pending_key(id)).await;
        }
        // A transient failure: the claimed (or verified and promoted) bytes stay for the
        // retry, which takes them again.
        Err(_) => {}
    }
    let _ = objects.delete(&claim_key(id)).await;
    outcome
}

/// The completion, under its claim: verify the bytes (or find what an earlier attempt
/// verified), promote them and append `MediaUploaded`. The media id is the upload id, so one
/// upload is one media item however often its completion is retried.
async fn complete_claimed(
    state: &IngestState,
    id: Uuid,
    pending: &PendingUpload,
    owner: String,
    completion: Completion,
) -> Result<Accepted, ApiError> {
    let objects = &state.backends.objects;
    let verified = match objects.get_bytes(&verified_key(id)).await {
        Ok(record) => serde_json::from_slice(&record).map_err(ApiError::internal)?,
        Err(ObjectError::NotFound) => {
            // Only a first completion counts against the quota: a retry of one that got this
            // far answers as it would have, though its media may be counted by now.
            state.check_quota(&owner, pending.bytes).await?;
            let (sha256, content_type) = take_and_verify(state, id, pending, completion).await?;
            let verified = Verified {
                sha256,
                content_type: Some(content_type.to_owned()),
                event_id: Uuid::now_v7(),
                version: state.clock.next(),
            };
            let record = serde_json::to_vec(&verified).map_err(ApiError::internal)?;
            objects
                .put_bytes(&verified_key(id), record.into())
                .await
                .map_err(ApiError::backend)?;
            verified
        }
        Err(e) => return Err(ApiError::backend(e)),
    };
    let content_type = verified
        .content_type
        .clone()
        .unwrap_or_else(|| pending.content_type.clone());
    let upload = crate::Upload {
        owner,
        sha256: verified.sha256.clone(),
        bytes: pending.bytes,
        content_type: content_type.clone(),
        title: None,
        visibility: pending.visibility,
    };
    let original_key = upload.original_key();
    match objects.promote(&claimed_key(id), &original_key).await {
        Ok(()) => {}
        // An earlier attempt promoted them before its append failed.
        Err(ObjectError::NotFound)
            if objects
                .head(&original_key)
                .await
                .map_err(ApiError::backend)?
                .is_some() => {}
        Err(ObjectError::NotFound) => {
            return Err(unprocessable(
                "nothing_uploaded",
                "the verified bytes are gone; start a new upload",
            ));
        }
        Err(e) => return Err(ApiError::backend(e)),
    }
    let event = conveyor_schemas::Envelope {
        event_id: verified.event_id,
        ..conveyor_schemas::Envelope::new(id, verified.version, "ingest", upload.into_event())
    };
    state.append(std::slice::from_ref(&event)).await?;
    Ok(Accepted {
        id,
        status: "pending",
        sha256: verified.sha256,
        bytes: pending.bytes,
        content_type,
        links: SelfLink {
            this: format!("/v1/media/{id}"),
        },
    })
}

/// Assembles the parts, takes the bytes out of PUTs' reach (to `incoming/{id}.claimed`) and
/// verifies them; returns their sha256 and their sniffed type.
async fn take_and_verify(
    state: &IngestState,
    id: Uuid,
    pending: &PendingUpload,
    completion: Completion,
) -> Result<(String, &'static str), ApiError> {
    let objects = &state.backends.objects;
    let (incoming, claimed) = (incoming_key(id), claimed_key(id));
    let taken_before = objects
        .head(&claimed)
        .await
        .map_err(ApiError::backend)?
        .is_some();
    if let (Some(upload_id), false) = (&pending.multipart, taken_before) {
        let mut parts = completion.parts;
        if parts.is_empty() {
            return Err(ApiError::bad_request(
                "invalid_json",
                "parts: a multipart upload needs its parts' ETags",
            ));
        }
        parts.sort_by_key(|p| p.part_number);
        if parts
            .iter()
            .enumerate()
            .any(|(i, p)| p.part_number as usize != i + 1)
        {
            return Err(ApiError::bad_request(
                "invalid_json",
                "parts: part numbers must run 1, 2, 3… without gaps",
            ));
        }
        let etags: Vec<String> = parts.into_iter().map(|p| p.etag).collect();
        objects
            .complete_multipart(&incoming, upload_id, &etags)
            .await
            .map_err(|e| {
                unprocessable(
                    "parts_mismatch",
                    format!("the parts could not be assembled: {e}"),
                )
            })?;
    }
    // Take the bytes out of PUTs' reach. An earlier attempt that failed transiently may have
    // taken them already; bytes PUT since then replace those.
    match objects.promote(&incoming, &claimed).await {
        Ok(()) => {}
        Err(ObjectError::NotFound) if taken_before => {}
        Err(ObjectError::NotFound) => {
            return Err(unprocessable(
                "nothing_uploaded",
                "nothing was uploaded for this upload id",
            ));
        }
        Err(e) => return Err(ApiError::backend(e)),
    }
    verify(state, pending, &claimed).await
}

/// Checks what arrived against what was declared; returns its sha256 and its sniffed type.
async fn verify(
    state: &IngestState,
    pending: &PendingUpload,
    key: &str,
) -> Result<(String, &'static str), ApiError> {
    let objects = &state.backends.objects;
    let meta = objects.head(key).await.map_err(ApiError::backend)?;
    let meta = meta.ok_or_else(|| {
        unprocessable(
            "nothing_uploaded",
            "nothing was uploaded for this upload id",
        )
    })?;
    if meta.size != pending.bytes {
        return Err(unprocessable(
            "size_mismatch",
            format!(
                "{} bytes arrived, {} were declared",
                meta.size, pending.bytes
            ),
        ));
    }
    let mut body = objects
        .get(key, None)
        .await
        .map_err(ApiError::backend)?
        .body;
    let mut hasher = Sha256::new();
    let mut head = Vec::with_capacity(SNIFF_BYTES);
    while let Some(chunk) = body.try_next().await.map_err(ApiError::unavailable)? {
        if head.len() < SNIFF_BYTES {
            head.extend_from_slice(&chunk[..chunk.len().min(SNIFF_BYTES - head.len())]);
        }
        hasher.update(&chunk);
    }
    // The bytes must be what was declared, or its sibling container (an MP4 declared as
    // QuickTime); the item records what they are.
    let sniffed = MediaType::sniff(&head);
    let media = match (sniffed, MediaType::from_declared(&pending.content_type)) {
        (Some(sniffed), Some(declared)) if sniffed.same_container(declared) => sniffed,
        _ => {
            return Err(unprocessable(
                "type_mismatch",
                format!(
                    "the bytes are {}, not the declared {}",
                    sniffed.map_or("not of an accepted type", MediaType::content_type),
                    pending.content_type
                ),
            ));
        }
    };
    let sha256 = hex::encode(hasher.finalize());
    if pending
        .sha256
        .as_ref()
        .is_some_and(|declared| declared != &sha256)
    {
        return Err(unprocessable(
            "sha256_mismatch",
            "the bytes' sha256 differs from the declared one",
        ));
    }
    Ok((sha256, media.content_type()))
}

/// Removes uploads never completed: `incoming/{id}` objects (and their claimed copies) and
/// `uploads/{id}.json` records (and their claims and verified records) whose UUIDv7 id is
/// older than `ttl`, after aborting the multipart upload a record names (see
/// [`ObjectStore::abort_multipart`](conveyor_storage::ObjectStore::abort_multipart)). Works on
/// every store. Returns how many objects it removed.
///
/// # Errors
/// The store's, when a listing or a delete fails; objects removed before it stay removed. A
/// failed abort keeps its record for the next sweep, and is logged.
pub async fn sweep(
    objects: &dyn conveyor_storage::ObjectStore,
    ttl: Duration,
) -> Result<usize, ObjectError> {
    let now_ms = (now_micros() / 1000) as u64;
    let cutoff = now_ms.saturating_sub(ttl.as_millis() as u64);
    let mut removed = 0;
    for prefix in ["incoming/", "uploads/"] {
        for object in objects.list(prefix).await? {
            // `{id}`, `{id}.json`, `{id}.claim`, `{id}.verified`, `{id}.claimed`.
            let name = object.key[prefix.len()..]
                .split('.')
                .next()
                .unwrap_or_default();
            let Ok(id) = Uuid::parse_str(name) else {
                continue;
            };
            let created_ms = id.get_timestamp().map(|t| {
                let (secs, nanos) = t.to_unix();
                secs * 1000 + u64::from(nanos) / 1_000_000
            });
            if created_ms.is_none_or(|ms| ms >= cutoff) {
                continue;
            }
            // An abandoned multipart upload's parts are reachable only through the id its
            // record holds: abort it before the record goes, or they stay (and are billed) for
            // ever. If the abort fails, the record stays for the next sweep to try again.
            if object.key == pending_key(id)
                && let Err(e) = abort_abandoned_multipart(objects, id).await
            {
                tracing::warn!(upload = %id, error = %e, "failed to abort an abandoned multipart upload; the next sweep retries");
                continue;
            }
            objects.delete(&object.key).await?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Aborts the multipart upload that upload `id`'s record names, if it names one. A record that
/// is gone or cannot be read names none.
async fn abort_abandoned_multipart(
    objects: &dyn conveyor_storage::ObjectStore,
    id: Uuid,
) -> Result<(), ObjectError> {
    let record = match objects.get_bytes(&pending_key(id)).await {
        Ok(record) => record,
        Err(ObjectError::NotFound) => return Ok(()),
        Err(e) => return Err(e),
    };
    match serde_json::from_slice::<PendingUpload>(&record) {
        Ok(PendingUpload {
            multipart: Some(upload_id),
            ..
        }) => objects.abort_multipart(&incoming_key(id), &upload_id).await,
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use conveyor_storage::ObjectStore;
    use conveyor_storage::objects::fs::FsObjectStore;

    #[tokio::test]
    async fn the_sweeper_removes_only_expired_uploads() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsObjectStore::open(dir.path()).unwrap();
        let old = Uuid::new_v7(uuid::Timestamp::from_unix(
            uuid::NoContext,
            1_600_000_000,
            0,
        ));
        let fresh = Uuid::now_v7();
        for id in [old, fresh] {
            store
                .put_bytes(&incoming_key(id), Bytes::from_static(b"partial"))
                .await
                .unwrap();
            store
                .put_bytes(&pending_key(id), Bytes::from_static(b"{}"))
                .await
                .unwrap();
        }
        store
            .put_bytes("originals/abc", Bytes::from_static(b"kept"))
            .await
            .unwrap();
        assert_eq!(sweep(&store, Duration::from_secs(3600)).await.unwrap(), 2);
        let left: Vec<String> = store
            .list("")
            .await
            .unwrap()
            .into_iter()
            .map(|m| m.key)
            .collect();
        assert_eq!(
            left,
            vec![
                "incoming/".to_owned() + &fresh.to_string(),
                "originals/abc".into(),
                pending_key(fresh)
            ]
        );
    }
}
