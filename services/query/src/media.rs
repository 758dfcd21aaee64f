//! `GET /media/{key}`: stored objects, served the way a CDN origin should serve immutable,
//! content-addressed bytes: long-lived `Cache-Control`, a strong `ETag`, `304`, and single
//! byte ranges (`206`/`416`).

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use conveyor_runtime::http::{ApiError, ErrorBody, etag_of, not_modified};
use conveyor_storage::media::{MediaType, SNIFF_BYTES};
use conveyor_storage::objects::{ObjectError, validate_key};
use conveyor_wire::range::RangeRequest;
use futures::TryStreamExt;

use crate::QueryState;

const IMMUTABLE: &str = "public, max-age=31536000, immutable";
/// Private media: the bytes never change, but only the holder of a signed URL may keep them.
const PRIVATE: &str = "private, max-age=3600, immutable";
/// Lifetime of the presigned URLs `/media/{key}` redirects to in S3 mode.
const PRESIGN_TTL: std::time::Duration = std::time::Duration::from_secs(300);

fn content_type_by_extension(key: &str) -> Option<&'static str> {
    let (_, extension) = key.rsplit_once('.')?;
    MediaType::from_extension(extension).map(MediaType::content_type)
}

async fn content_type(state: &QueryState, key: &str) -> Result<&'static str, ApiError> {
    if let Some(ct) = content_type_by_extension(key) {
        return Ok(ct);
    }
    // Keys are content addresses, so a key's type never changes: sniffed once per edge.
    if let Some(ct) = state.sniffed.get(key).await {
        return Ok(ct);
    }
    // Originals carry no extension: sniff their first bytes.
    let head = state
        .backends
        .objects
        .get(key, Some(0..SNIFF_BYTES as u64))
        .await
        .map_err(object_error)?;
    let bytes: Vec<bytes::Bytes> = head
        .body
        .try_collect()
        .await
        .map_err(ApiError::unavailable)?;
    let head = bytes.concat();
    let sniffed =
        MediaType::sniff(&head).map_or("application/octet-stream", MediaType::content_type);
    state.sniffed.insert(key.to_owned(), sniffed).await;
    Ok(sniffed)
}

fn object_error(e: ObjectError) -> ApiError {
    match e {
        ObjectError::NotFound | ObjectError::InvalidKey(_) => ApiError::not_found("no such object"),
        other => ApiError::backend(other),
    }
}

/// A stored object's bytes: an original or a variant, at the URL the read models give. Keys
/// are content-addressed, so one path is one set of bytes forever. Private media (`private/…`)
/// needs the signed URL its owner's read gave.
#[utoipa::path(get, path = "/media/{key}", tag = "media",
    params(("key" = String, Path, description = "`originals/{sha256}`, `variants/{sha256}/{name}.{ext}`, or either under `private/`"),
        ("expires" = Option<i64>, Query, description = "Private media: the signed URL's expiry, in Unix seconds"),
        ("kid" = Option<String>, Query, description = "Private media: the signing key's id"),
        ("sig" = Option<String>, Query, description = "Private media: the signature"),
        ("range" = Option<String>, Header, description = "One byte range (RFC 9110 §14.2)"),
        ("if-none-match" = Option<String>, Header, description = "An `ETag` this API sent")),
    responses(
        (status = 200, description = "The bytes", content(
            (Vec<u8> = "image/jpeg"), (Vec<u8> = "image/png"), (Vec<u8> = "image/gif"),
            (Vec<u8> = "image/webp"), (Vec<u8> = "image/heic"), (Vec<u8> = "image/avif"),
            (Vec<u8> = "application/octet-stream")),
            headers(("etag" = String), ("cache-control" = String), ("accept-ranges" = String))),
        (status = 206, description = "The requested range", content(
            (Vec<u8> = "image/jpeg"), (Vec<u8> = "image/png"), (Vec<u8> = "image/gif"),
            (Vec<u8> = "image/webp"), (Vec<u8> = "image/heic"), (Vec<u8> = "image/avif"),
            (Vec<u8> = "application/octet-stream")),
            headers(("content-range" = String))),
        (status = 302, description = "S3: a presigned URL that serves the bytes",
            headers(("location" = String))),
        (status = 304, description = "The client's copy is current"),
        (status = 403, description = "Private media without a valid, unexpired signature", body = ErrorBody),
        (status = 404, description = "No such object", body = ErrorBody),
        (status = 416, description = "The range lies past the end", body = ErrorBody),
    ))]
pub(crate) async fn get_object(
    State(state): State<Arc<QueryState>>,
    Path(key): Path<String>,
    Query(params): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    // Only finished media is served: not `incoming/` uploads still being checked, nor
    // pending-upload records. Private media needs a valid, unexpired signature.
    let private = key.starts_with("private/");
    let media = key.trim_start_matches("private/");
    let finished = media.starts_with("originals/") || media.starts_with("variants/");
    if !finished || validate_key(&key).is_err() {
        return Err(ApiError::not_found("no such object"));
    }
    if private {
        let signed = || -> Option<bool> {
            let expires: i64 = params.get("expires")?.parse().ok()?;
            let message = crate::media_message(&key, expires);
            Some(conveyor_runtime::signing::verify(
                &state.signing_keys,
                params.get("kid")?,
                &message,
                params.get("sig")?,
                expires,
            ))
        };
        if signed() != Some(true) {
            return Err(ApiError::forbidden(
                "private media needs a valid, unexpired signed URL",
            ));
        }
    }
    let cache_control = HeaderValue::from_static(if private { PRIVATE } else { IMMUTABLE });
    // The type is always Conveyor's own: from the key's extension, or sniffed from the bytes,
    // never what an uploader's PUT said.
    let content_type = content_type(&state, &key).await?;
    // A store that can hand out its own URLs (S3) serves the bytes itself: redirect there, so
    // media never passes through this edge, with the type pinned in the URL (S3's response
    // header overrides). The redirect is short-lived; the CDN in front of the store caches by
    // path.
    if let Some(url) = state
        .backends
        .objects
        .presigned_get(&key, PRESIGN_TTL, content_type)
        .await
        .map_err(object_error)?
    {
        let location = HeaderValue::from_str(&url).map_err(ApiError::internal)?;
        return Ok((
            StatusCode::FOUND,
            [
                (header::LOCATION, location),
                (
                    header::CACHE_CONTROL,
                    HeaderValue::from_static("private, max-age=240"),
                ),
                (
                    header::X_CONTENT_TYPE_OPTIONS,
                    HeaderValue::from_static("nosniff"),
                ),
            ],
        )
            .into_response());
    }
    // Keys are content-addressed and never rewritten, so the key itself identifies the bytes.
    let etag = etag_of(key.as_bytes());
    let etag_value = HeaderValue::from_str(&etag).expect("etags are hex");
    let immutable = cache_control;
    if not_modified(&headers, &etag) {
        if state
            .backends
            .objects
            .head(&key)
            .await
            .map_err(object_error)?
            .is_none()
        {
            return Err(ApiError::not_found("no such object"));
        }
        return Ok((
            StatusCode::NOT_MODIFIED,
            [
                (header::ETAG, etag_value),
                (header::CACHE_CONTROL, immutable),
            ],
        )
            .into_response());
    }
    let meta = state
        .backends
        .objects
        .head(&key)
        .await
        .map_err(object_error)?;
    let size = meta
        .ok_or_else(|| ApiError::not_found("no such object"))?
        .size;

    // One range is served as 206; several, or a malformed header, fall back to the whole body
    // (RFC 9110 lets a server ignore Range); a range past the end is 416.
    let header = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    let range = match conveyor_wire::range::parse(header, size) {
        RangeRequest::Whole => None,
        RangeRequest::Part(part) => Some(part),
        RangeRequest::Unsatisfiable => {
            return Ok((
                StatusCode::RANGE_NOT_SATISFIABLE,
                [(
                    header::CONTENT_RANGE,
                    HeaderValue::from_str(&format!("bytes */{size}")).expect("ascii"),
                )],
            )
                .into_response());
        }
    };
    let requested = range.as_ref().map(|r| *r.start()..*r.end() + 1);
    let object = state
        .backends
        .objects
        .get(&key, requested)
        .await
        .map_err(object_error)?;
    let length = object.range.end - object.range.start;
    let mut response = Response::new(Body::from_stream(object.body));
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    h.insert(header::ETAG, etag_value);
    h.insert(header::CACHE_CONTROL, immutable);
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if range.is_some() {
        let value = format!(
            "bytes {}-{}/{}",
            object.range.start,
            object.range.end - 1,
            object.size
        );
        h.insert(
            header::CONTENT_RANGE,
            HeaderValue::from_str(&value).expect("ascii"),
        );
        *response.status_mut() = StatusCode::PARTIAL_CONTENT;
    }
    Ok(response)
}
