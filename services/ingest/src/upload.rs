//! `POST /v1/media`: a multipart upload, streamed to the object store.

use std::sync::Arc;

use axum::extract::multipart::{Field, MultipartError};
use axum::extract::{Multipart, State};
use axum::http::{StatusCode, header};
use axum::response::Response;
use bytes::Bytes;
use conveyor_schemas::Visibility;
use conveyor_storage::media::{ACCEPTED, MediaType, SNIFF_BYTES};
use conveyor_storage::objects::ObjectError;
use sha2::{Digest, Sha256};

use crate::accepted::Accepted;
use crate::idempotency;
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::IngestState;
use conveyor_runtime::http::{ApiError, ErrorBody};

/// Longest accepted title, in characters.
const MAX_TITLE: usize = 500;

/// The form `POST /v1/media` takes.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)] // The form is read field by field, as it streams; this only describes it.
pub(crate) struct UploadForm {
    /// The image (JPEG, PNG, GIF, WebP, HEIC or AVIF) or video (MP4, MOV, WebM or Matroska),
    /// recognised from its bytes (the part's declared type is ignored). At most
    /// `limits.max_upload_bytes` (100 MiB) for an image and `video.max_bytes` (2 GiB) for a
    /// video; large files are better sent through the direct upload (`POST /v1/uploads`).
    #[schema(value_type = String, format = Binary)]
    file: Vec<u8>,
    /// At most 500 characters.
    title: Option<String>,
    visibility: Option<Visibility>,
}

/// Upload a photo, streamed: it is stored under its sha256 and `MediaUploaded` is appended
/// before the 202.
#[utoipa::path(post, path = "/v1/media", tag = "media",
    params(("idempotency-key" = Option<String>, Header, description = "Makes a retry safe: the same key with the same file, title and visibility gets the first answer and makes no second item; with anything else, 409. 1 to 255 printable ASCII characters, per client key, remembered as long as the log keeps events")),
    request_body(content = UploadForm, content_type = "multipart/form-data"),
    responses(
        (status = 202, description = "Stored and appended; processing follows", body = Accepted,
            headers(("location" = String, description = "The media's URL"))),
        (status = 400, description = "Not a well-formed form, a missing `file`, an unknown field, a body that ended early, a malformed `Idempotency-Key`", body = ErrorBody),
        (status = 408, description = "The body arrived slower than `http.min_body_rate_bytes_per_sec` or stalled (`body_too_slow`)", body = ErrorBody),
        (status = 401, description = "No valid client key", body = ErrorBody),
        (status = 409, description = "The `Idempotency-Key` was used for another upload (`idempotency_key_reused`), or its first request still runs (`idempotency_key_in_use`)", body = ErrorBody),
        (status = 413, description = "Over `limits.max_upload_bytes`, or the owner's quota (`quota_exceeded`)", body = ErrorBody),
        (status = 415, description = "Not one of the accepted image formats", body = ErrorBody),
    ),
    security(("client_key" = [])))]
pub(crate) async fn upload(
    State(state): State<Arc<IngestState>>,
    request: axum::extract::Request,
) -> Result<Response, ApiError> {
    use axum::extract::FromRequest;
    let headers = request.headers().clone();
    let owner = state.owner(&headers)?;
    let idempotency_key = idempotency::key(&headers)?;
    // The body passes through the guard, which bounds what the parser buffers.
    let boundary = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(crate::multipart_guard::boundary)
        .ok_or_else(|| {
            ApiError::bad_request(
                "invalid_multipart",
                "expected `Content-Type: multipart/form-data; boundary=…`",
            )
        })?;
    // An owner at the quota is refused before the body is read (its size is known after);
    // with an idempotency key, only once the key is known to be new: a retry of an upload that
    // filled the quota gets its first answer.
    if idempotency_key.is_none() {
        state.check_quota(&owner, 0).await?;
    }
    let violation = Arc::new(std::sync::OnceLock::new());
    let (parts, body) = request.into_parts();
    let guarded =
        crate::multipart_guard::Guard::new(body.into_data_stream(), &boundary, violation.clone());
    let request = axum::extract::Request::from_parts(parts, axum::body::Body::from_stream(guarded));
    let mut multipart = Multipart::from_request(request, &())
        .await
        .map_err(|e| ApiError::bad_request("invalid_multipart", e.body_text()))?;
    let multipart_error = |e: MultipartError| match violation.get() {
        Some(v) => ApiError::bad_request("invalid_multipart", v.message()),
        None => multipart_error(e),
    };
    let mut stored: Option<Stored> = None;
    let mut title: Option<String> = None;
    let mut visibility = Visibility::Public;
    let result = async {
        while let Some(field) = multipart.next_field().await.map_err(multipart_error)? {
            match field.name() {
                Some("file") if stored.is_none() => stored = Some(store_file(&state, field).await?),
                Some("file") => {
                    return Err(ApiError::bad_request(
                        "invalid_multipart",
                        "more than one `file` field",
                    ));
                }
                Some("title") => title = Some(read_title(field).await?),
                Some("visibility") => {
                    visibility = crate::parse_visibility(&read_title(field).await?)?
                }
                other => {
                    return Err(ApiError::bad_request(
                        "invalid_multipart",
                        format!(
                            "unexpected field {:?}; expected `file`, and optionally `title` and `visibility`",
                            other.unwrap_or("")
                        ),
                    ));
                }
            }
        }
        stored
            .take()
            .ok_or_else(|| ApiError::bad_request("invalid_multipart", "missing field `file`"))
    }
    .await;
    let result = match result {
        Ok(s) if idempotency_key.is_some() => Ok(s),
        Ok(s) => match state.check_quota(&owner, s.size).await {
            Ok(()) => Ok(s),
            Err(e) => {
                stored = Some(s);
                Err(e)
            }
        },
        Err(e) => Err(e),
    };
    let stored = match result {
        Ok(s) => s,
        Err(e) => {
            // The file may have been stored before a later field failed; it is unreferenced
            // and content-addressed, so removing the incoming copy is all there is to undo.
            if let Some(s) = stored {
                let _ = state.backends.objects.delete(&s.incoming_key).await;
            }
            return Err(e);
        }
    };

    // With an idempotency key: the first request's answer, or this request's ids.
    let ticket = match idempotency_key {
        None => None,
        Some(key) => {
            let title_part = title.as_deref().map(|t| format!("t{t}"));
            let fingerprint = idempotency::fingerprint(&[
                b"POST /v1/media",
                stored.sha256.as_bytes(),
                title_part.as_deref().unwrap_or("-").as_bytes(),
                format!("{visibility:?}").as_bytes(),
            ]);
            let fresh = idempotency::Reserved {
                id: Uuid::now_v7(),
                event_id: Uuid::now_v7(),
                version: state.clock.next(),
            };
            match idempotency::claim(&state, &owner, &key, fingerprint, fresh).await {
                // A key taken over from a request that failed was counted, if at all, then.
                Ok(idempotency::Claim::Run(ticket)) if ticket.taken_over() => Some(ticket),
                Ok(idempotency::Claim::Run(ticket)) => {
                    if let Err(e) = state.check_quota(&owner, stored.size).await {
                        let _ = state.backends.objects.delete(&stored.incoming_key).await;
                        ticket.release(&state).await;
                        return Err(e);
                    }
                    Some(ticket)
                }
                Ok(idempotency::Claim::Replay(first)) => {
                    // The first request stored these bytes already.
                    let _ = state.backends.objects.delete(&stored.incoming_key).await;
                    return Ok(first.respond());
                }
                Err(e) => {
                    let _ = state.backends.objects.delete(&stored.incoming_key).await;
                    return Err(e);
                }
            }
        }
    };
    let reserved = ticket.as_ref().map(idempotency::Ticket::reserved);
    let accepted = state
        .accept(
            &stored.incoming_key,
            crate::Upload {
                owner,
                sha256: stored.sha256.clone(),
                bytes: stored.size,
                content_type: stored.content_type.to_owned(),
                title,
                visibility,
            },
            reserved,
        )
        .await;
    let answer = match (accepted, ticket) {
        (Ok(id), ticket) => {
            let accepted = Accepted {
                id,
                status: "pending",
                sha256: stored.sha256,
                bytes: stored.size,
                content_type: stored.content_type.to_owned(),
                links: conveyor_runtime::http::SelfLink {
                    this: format!("/v1/media/{id}"),
                },
            };
            if let Some(ticket) = ticket
                && let Err(e) = ticket.finish(&state, &accepted).await
            {
                tracing::warn!(error = %e, "could not record an idempotency key's answer");
            }
            accepted
        }
        (Err(e), ticket) => {
            if let Some(ticket) = ticket {
                ticket.release(&state).await;
            }
            return Err(e);
        }
    };
    metrics::counter!("conveyor_uploads_total").increment(1);
    metrics::counter!("conveyor_upload_bytes_total").increment(stored.size);
    Ok(answer.respond())
}

struct Stored {
    incoming_key: String,
    sha256: String,
    size: u64,
    content_type: &'static str,
}

fn multipart_error(e: MultipartError) -> ApiError {
    let status = e.status();
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        return ApiError::new(status, "too_large", "the upload is over the size limit");
    }
    // axum calls a body that could not be read (it ended before its declared length, the
    // client went away or sent too slowly) a 500. It is the client's: a 4xx, logged as one.
    if status.is_server_error() {
        return conveyor_runtime::http::body_read_error(&e);
    }
    ApiError::new(status, "invalid_multipart", e.body_text())
}

async fn read_title(mut field: Field<'_>) -> Result<String, ApiError> {
    let mut bytes = Vec::new();
    while let Some(chunk) = field.chunk().await.map_err(multipart_error)? {
        bytes.extend_from_slice(&chunk);
        if bytes.len() > MAX_TITLE * 4 {
            return Err(ApiError::bad_request(
                "invalid_title",
                format!("title: longer than {MAX_TITLE} characters"),
            ));
        }
    }
    let title = String::from_utf8(bytes)
        .map_err(|_| ApiError::bad_request("invalid_title", "title: not valid UTF-8"))?;
    if title.chars().count() > MAX_TITLE {
        return Err(ApiError::bad_request(
            "invalid_title",
            format!("title: longer than {MAX_TITLE} characters"),
        ));
    }
    Ok(title)
}

fn unsupported() -> ApiError {
    ApiError::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
        format!("the file is not of an accepted type: {ACCEPTED}"),
    )
}

/// The type of a file from its head, if this process accepts it.
fn accepted(state: &IngestState, head: &[u8]) -> Result<MediaType, ApiError> {
    let media = MediaType::sniff(head).ok_or_else(unsupported)?;
    state.check_accepted(media)?;
    Ok(media)
}

fn too_large(limit: u64) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "too_large",
        format!("the file is over the limit of {limit} bytes for its type"),
    )
}

/// Streams one file field into `incoming/{uuid}`, hashing, counting and sniffing as it goes.
/// On any error nothing is left in the store.
async fn store_file(state: &IngestState, mut field: Field<'_>) -> Result<Stored, ApiError> {
    let incoming_key = format!("incoming/{}", Uuid::now_v7());
    // A small bounded channel between the request and the store: memory stays at a few chunks.
    let (tx, rx) = mpsc::channel::<std::io::Result<Bytes>>(4);
    let objects = state.backends.objects.clone();
    let key = incoming_key.clone();
    // Set once every chunk is sent. A channel that closes without it means the handler was
    // dropped (the client went away mid-request): the body then ends in an error, so the
    // store keeps nothing.
    let finished = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let complete = finished.clone();
    let put = tokio::spawn(async move {
        let body = futures::stream::unfold(Some(rx), move |rx| {
            let complete = complete.clone();
            async move {
                let mut rx = rx?;
                match rx.recv().await {
                    Some(item) => Some((item, Some(rx))),
                    None if complete.load(std::sync::atomic::Ordering::SeqCst) => None,
                    None => Some((Err(std::io::Error::other("the request was dropped")), None)),
                }
            }
        });
        objects.put(&key, Box::pin(body)).await
    });

    // Until the type is sniffed, the largest limit of any type holds.
    let mut limit = state.max_any_bytes();
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    let mut head: Vec<u8> = Vec::with_capacity(SNIFF_BYTES);
    let mut content_type = None;
    let fed: Result<(), ApiError> = async {
        while let Some(chunk) = field.chunk().await.map_err(multipart_error)? {
            size += chunk.len() as u64;
            if size > limit {
                return Err(too_large(limit));
            }
            if content_type.is_none() {
                head.extend_from_slice(&chunk[..chunk.len().min(SNIFF_BYTES - head.len())]);
                if head.len() >= SNIFF_BYTES {
                    let media = accepted(state, &head)?;
                    limit = state.max_bytes(media);
                    content_type = Some(media.content_type());
                }
            }
            if size > limit {
                return Err(too_large(limit));
            }
            hasher.update(&chunk);
            if tx.send(Ok(chunk)).await.is_err() {
                break; // the store failed; its error is reported below
            }
        }
        if content_type.is_none() {
            let media = accepted(state, &head)?;
            if size > state.max_bytes(media) {
                return Err(too_large(state.max_bytes(media)));
            }
            content_type = Some(media.content_type());
        }
        Ok(())
    }
    .await;
    if let Err(e) = fed {
        let _ = tx.send(Err(std::io::Error::other("upload aborted"))).await;
        drop(tx);
        let _ = put.await;
        return Err(e);
    }
    finished.store(true, std::sync::atomic::Ordering::SeqCst);
    drop(tx);
    match put.await {
        Ok(Ok(_)) => {}
        Ok(Err(ObjectError::Body(e))) => {
            return Err(ApiError::bad_request("invalid_multipart", e.to_string()));
        }
        Ok(Err(e)) => return Err(ApiError::backend(e)),
        Err(e) => return Err(ApiError::internal(e)),
    }
    Ok(Stored {
        incoming_key,
        sha256: hex::encode(hasher.finalize()),
        size,
        content_type: content_type.expect("sniffed above"),
    })
}
