//! The read-model endpoints.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use conveyor_runtime::http::{ApiError, ErrorBody, SelfLink, etag_of, not_modified};
use conveyor_schemas::MediaRow;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{Cached, OwnerKey, OwnerView, QueryState, Rendered};

/// One rendered size of the media.
#[derive(Serialize, utoipa::ToSchema)]
struct VariantView {
    /// Where its bytes are: relative to this API, or on the CDN (`cdn.base_url`).
    url: String,
    width: u32,
    height: u32,
    content_type: String,
}

/// A media item as clients see it.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct MediaView<'a> {
    id: Uuid,
    owner: &'a str,
    status: conveyor_schemas::MediaStatus,
    content_type: &'a str,
    bytes: u64,
    sha256: &'a str,
    width: Option<u32>,
    height: Option<u32>,
    title: Option<&'a str>,
    description: Option<&'a str>,
    tags: &'a [String],
    /// A BlurHash placeholder (blurha.sh), once processed.
    blurhash: Option<&'a str>,
    /// By name (`thumb`, `small`, `large`), once processed.
    #[schema(value_type = BTreeMap<String, VariantView>)]
    variants: BTreeMap<&'a str, VariantView>,
    original: VariantLink,
    #[serde(skip_serializing_if = "Option::is_none")]
    exif: Option<&'a conveyor_schemas::ExifSummary>,
    #[serde(skip_serializing_if = "Option::is_none")]
    failure_reason: Option<&'a str>,
    /// How far the transcode has come, 0–100, while `status` is `processing`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0, maximum = 100)]
    progress: Option<u8>,
    /// A video's metadata, poster and web renditions, once processed.
    #[serde(skip_serializing_if = "Option::is_none")]
    video: Option<VideoView<'a>>,
    /// RFC 3339.
    created_at: String,
    links: SelfLink,
}

/// A processed video.
#[derive(Serialize, utoipa::ToSchema)]
struct VideoView<'a> {
    /// Milliseconds.
    duration_ms: u64,
    /// ffprobe's codec name, such as `h264`, `hevc`, `vp9`.
    video_codec: &'a str,
    /// `null` for a silent video.
    audio_codec: Option<&'a str>,
    /// Frames per second.
    frame_rate: f64,
    /// The original's bitrate, in bits per second.
    bitrate: u64,
    /// The rotation the original's container applies, in degrees counter-clockwise; the poster
    /// and renditions are already upright.
    rotation: u16,
    /// The poster frame, at the `large` variant's size (`variants` has every size).
    poster: Option<VariantLink>,
    /// H.264 and AAC in MP4 with `faststart`, by name (`720p`, `360p`: the short side), each
    /// served with byte ranges so players can seek.
    #[schema(value_type = BTreeMap<String, VariantView>)]
    renditions: BTreeMap<&'a str, VariantView>,
}

/// Where the original's bytes are.
#[derive(Serialize, utoipa::ToSchema)]
struct VariantLink {
    url: String,
}

/// One page of an owner's timeline, newest first.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct TimelinePage<'a> {
    items: Vec<MediaView<'a>>,
    /// Pass as `cursor` for the next page; `null` on the last one.
    next_cursor: Option<String>,
}

/// An owner's totals, private media included.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct StatsView<'a> {
    owner: &'a str,
    media_count: u64,
    /// Bytes of originals.
    bytes: u64,
}

fn rfc3339(micros: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(micros as i128 * 1000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

fn variant_view(state: &QueryState, v: &conveyor_schemas::VariantInfo) -> VariantView {
    VariantView {
        url: state.media_url(&v.key),
        width: v.width,
        height: v.height,
        content_type: v.content_type.clone(),
    }
}

fn view<'a>(state: &QueryState, row: &'a MediaRow) -> MediaView<'a> {
    MediaView {
        id: row.id,
        owner: &row.owner,
        status: row.status,
        content_type: &row.content_type,
        bytes: row.bytes,
        sha256: &row.sha256,
        width: row.width,
        height: row.height,
        title: row.title.as_deref(),
        description: row.description.as_deref(),
        tags: &row.tags,
        blurhash: row.blurhash.as_deref(),
        variants: row
            .variants
            .iter()
            .map(|v| (v.name.as_str(), variant_view(state, v)))
            .collect(),
        original: VariantLink {
            url: state.media_url(&row.original_key),
        },
        exif: row.exif.as_ref(),
        failure_reason: row.failure_reason.as_deref(),
        progress: row.progress,
        video: row.video.as_ref().map(|v| VideoView {
            duration_ms: v.duration_ms,
            video_codec: &v.video_codec,
            audio_codec: v.audio_codec.as_deref(),
            frame_rate: f64::from(v.frame_rate_milli) / 1000.0,
            bitrate: v.bitrate,
            rotation: v.rotation,
            poster: row
                .variants
                .iter()
                .find(|p| p.name == "large")
                .map(|p| VariantLink {
                    url: state.media_url(&p.key),
                }),
            renditions: v
                .renditions
                .iter()
                .map(|r| (r.name.as_str(), variant_view(state, r)))
                .collect(),
        }),
        created_at: rfc3339(row.created_at),
        links: SelfLink {
            this: format!("/v1/media/{}", row.id),
        },
    }
}

/// Sends a JSON body with its ETag, or 304 if the client has it.
fn respond(headers: &HeaderMap, body: Bytes, etag: &str) -> Response {
    let etag_value = HeaderValue::from_str(etag).expect("etags are hex");
    let cache_control = HeaderValue::from_static("no-cache");
    if not_modified(headers, etag) {
        return (
            StatusCode::NOT_MODIFIED,
            [
                (header::ETAG, etag_value),
                (header::CACHE_CONTROL, cache_control),
            ],
        )
            .into_response();
    }
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ),
            (header::ETAG, etag_value),
            (header::CACHE_CONTROL, cache_control),
        ],
        body,
    )
        .into_response()
}

fn json_bytes(value: &impl Serialize) -> Result<Bytes, ApiError> {
    serde_json::to_vec(value)
        .map(Bytes::from)
        .map_err(ApiError::internal)
}

/// Read a media item: its status, metadata and variant URLs. Private media is its owner's
/// alone: for anyone else it is a 404, as if absent.
#[utoipa::path(get, path = "/v1/media/{id}", tag = "media",
    params(("id" = Uuid, Path, description = "The media id"),
        ("if-none-match" = Option<String>, Header, description = "An `ETag` this API sent")),
    responses(
        (status = 200, description = "The item", body = MediaView,
            headers(("etag" = String), ("cache-control" = String))),
        (status = 304, description = "The client's copy is current"),
        (status = 400, description = "Not a media id", body = ErrorBody),
        (status = 401, description = "A key was given and is not valid", body = ErrorBody),
        (status = 404, description = "No such media, or someone else's private media", body = ErrorBody),
    ),
    security((), ("client_key" = [])))]
pub(crate) async fn get_media(
    State(state): State<Arc<QueryState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = Uuid::parse_str(&id)
        .map_err(|_| ApiError::bad_request("invalid_id", format!("{id:?} is not a media id")))?;
    let viewer = state.viewer(&headers)?;
    let loader = {
        let state = state.clone();
        async move {
            cache_miss("media");
            let row = state
                .backends
                .views
                .media(id)
                .await
                .map_err(ApiError::backend)?;
            // Unknown (or not yet projected): a negative entry, dropped like any other when
            // the id's events are announced.
            let Some(row) = row else {
                return Ok::<_, ApiError>(None);
            };
            state.owner_of.insert(id, row.owner.clone()).await;
            let body = json_bytes(&view(&state, &row))?;
            let etag = etag_of(&body);
            Ok(Some(Arc::new(Cached {
                body,
                etag,
                owner: row.owner,
                private: row.private,
            })))
        }
    };
    cache_lookup("media");
    let cached = state
        .cache
        .try_get_with(id, loader)
        .await
        .map_err(unshare)?
        .ok_or_else(no_such_media)?;
    if !visible_to(viewer.as_deref(), &cached.owner, cached.private) {
        return Err(no_such_media());
    }
    Ok(respond(&headers, cached.body.clone(), &cached.etag))
}

/// Counts a read of the response cache `cache` (`media` or `owner`):
/// `conveyor_query_cache_lookups_total{cache}`. With [`cache_miss`], the hit ratio.
fn cache_lookup(cache: &'static str) {
    metrics::counter!("conveyor_query_cache_lookups_total", "cache" => cache).increment(1);
}

/// Counts a lookup the cache could not answer, so the store was read:
/// `conveyor_query_cache_misses_total{cache}`. Requests that miss together count once, as they
/// read the store once.
fn cache_miss(cache: &'static str) {
    metrics::counter!("conveyor_query_cache_misses_total", "cache" => cache).increment(1);
}

fn no_such_media() -> ApiError {
    ApiError::not_found("no such media")
}

/// Coalesced callers share one error; rebuild it for this response.
fn unshare(e: Arc<ApiError>) -> ApiError {
    match Arc::try_unwrap(e) {
        Ok(e) => e,
        Err(shared) => ApiError::new(shared.status, shared.code, shared.message.clone()),
    }
}

/// The owner-level response `key` from the cache, or rendered by `render` (once for all the
/// requests that miss at once).
async fn owner_response<F>(
    state: &Arc<QueryState>,
    headers: &HeaderMap,
    key: OwnerKey,
    render: F,
) -> Result<Response, ApiError>
where
    F: std::future::Future<Output = Result<Bytes, ApiError>>,
{
    state.note_owner_view(&key).await;
    cache_lookup("owner");
    let rendered = state
        .owners
        .try_get_with(key, async move {
            cache_miss("owner");
            let body = render.await?;
            let etag = etag_of(&body);
            Ok::<_, ApiError>(Arc::new(Rendered { body, etag }))
        })
        .await
        .map_err(unshare)?;
    Ok(respond(headers, rendered.body.clone(), &rendered.etag))
}

/// Whether `viewer` may see an item of `owner`'s: public items are anyone's to read, private
/// ones their owner's only. Everyone else is answered exactly as if the item did not exist.
fn visible_to(viewer: Option<&str>, owner: &str, private: bool) -> bool {
    !private || viewer == Some(owner)
}

/// A timeline page's position and size.
#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct PageParams {
    /// Items per page, 1 to 100 (default 20).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 100)]
    limit: Option<String>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
}

const MAX_LIMIT: usize = 100;

/// Refuses an `{owner}` that no key can name (`conveyor_config::check_key_name`: 1 to 64 of
/// `A-Z a-z 0-9 . _ @ -`, not only dots) with 400 `invalid_owner`, before any store read: it
/// can have no media, and an empty one is not even a key a store can look up.
fn check_owner(owner: &str) -> Result<(), ApiError> {
    conveyor_config::check_key_name(owner)
        .map_err(|rule| ApiError::bad_request("invalid_owner", format!("owner: {rule}")))
}

/// An owner's media, newest first, in pages. Their private items are in it only for the
/// owner's own key.
#[utoipa::path(get, path = "/v1/owners/{owner}/media", tag = "media",
    params(("owner" = String, Path, description = "The owner, as their key names them"),
        PageParams,
        ("if-none-match" = Option<String>, Header, description = "An `ETag` this API sent")),
    responses(
        (status = 200, description = "A page", body = TimelinePage,
            headers(("etag" = String), ("cache-control" = String))),
        (status = 304, description = "The client's copy is current"),
        (status = 400, description = "An owner no key can name (`invalid_owner`), a bad `limit` or `cursor`, or an unknown parameter", body = ErrorBody),
        (status = 401, description = "A key was given and is not valid", body = ErrorBody),
    ),
    security((), ("client_key" = [])))]
pub(crate) async fn owner_timeline(
    State(state): State<Arc<QueryState>>,
    Path(owner): Path<String>,
    params: Result<Query<PageParams>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    check_owner(&owner)?;
    let Query(params) =
        params.map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))?;
    let viewer = state.viewer(&headers)?;
    let limit = match params.limit.as_deref() {
        None => 20,
        Some(text) => text
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_LIMIT).contains(n))
            .ok_or_else(|| {
                ApiError::bad_request(
                    "invalid_query",
                    format!("limit: expected a number from 1 to {MAX_LIMIT}"),
                )
            })?,
    };
    let after = match params.cursor.as_deref() {
        None | Some("") => None,
        Some(c) => Some(conveyor_wire::cursor::decode(c).ok_or_else(|| {
            ApiError::bad_request("invalid_query", "cursor: not a cursor from this API")
        })?),
    };
    let as_owner = viewer.as_deref() == Some(owner.as_str());
    let render = {
        let (state, owner) = (state.clone(), owner.clone());
        async move {
            let (rows, next) =
                visible_page(&state, &owner, viewer.as_deref(), after, limit).await?;
            for row in &rows {
                state.owner_of.insert(row.id, row.owner.clone()).await;
            }
            json_bytes(&TimelinePage {
                items: rows.iter().map(|row| view(&state, row)).collect(),
                next_cursor: next.map(conveyor_wire::cursor::encode),
            })
        }
    };
    if after.is_some() {
        // Later pages are read once each, by one reader walking on: not cached.
        let body = render.await?;
        let etag = etag_of(&body);
        return Ok(respond(&headers, body, &etag));
    }
    let key = OwnerKey {
        owner,
        view: OwnerView::FirstPage { limit, as_owner },
    };
    owner_response(&state, &headers, key, render).await
}

/// Most rows one timeline request reads past for someone who is not the owner, hidden private
/// items included.
const MAX_SCANNED: usize = 1_000;

/// Up to `limit` of `owner`'s items that `viewer` may see, after `after`, and the cursor for
/// the next page. For anyone but the owner, private items are skipped (reading on until the
/// page is full), and the cursor is always a visible item's position: a cursor taken from a
/// private item would tell its id and time. Past [`MAX_SCANNED`] rows without filling the page,
/// the page ends at the last visible item, and with none, there is no next page: a wall of
/// over a thousand private items hides what lies behind it.
async fn visible_page(
    state: &QueryState,
    owner: &str,
    viewer: Option<&str>,
    mut after: Option<(i64, Uuid)>,
    limit: usize,
) -> Result<(Vec<MediaRow>, Option<(i64, Uuid)>), ApiError> {
    let views = &state.backends.views;
    if viewer == Some(owner) {
        let page = views
            .owner_timeline(owner, after, limit)
            .await
            .map_err(ApiError::backend)?;
        return Ok((page.items, page.next));
    }
    let mut rows = Vec::with_capacity(limit);
    let mut scanned = 0;
    loop {
        let page = views
            .owner_timeline(owner, after, limit - rows.len())
            .await
            .map_err(ApiError::backend)?;
        scanned += page.items.len();
        rows.extend(
            page.items
                .into_iter()
                .filter(|row| visible_to(viewer, &row.owner, row.private)),
        );
        let more = page.next.is_some();
        if rows.len() == limit || !more || scanned >= MAX_SCANNED {
            let next = (more && !rows.is_empty())
                .then(|| rows.last().map(|r| (r.created_at, r.id)))
                .flatten();
            return Ok((rows, next));
        }
        after = page.next;
    }
}

/// An owner's totals; their own key only.
#[utoipa::path(get, path = "/v1/owners/{owner}/stats", tag = "media",
    params(("owner" = String, Path, description = "The owner, as their key names them"),
        ("if-none-match" = Option<String>, Header, description = "An `ETag` this API sent")),
    responses(
        (status = 200, description = "The totals", body = StatsView,
            headers(("etag" = String), ("cache-control" = String))),
        (status = 304, description = "The client's copy is current"),
        (status = 400, description = "An owner no key can name (`invalid_owner`)", body = ErrorBody),
        (status = 401, description = "A key was given and is not valid", body = ErrorBody),
        (status = 404, description = "Not the owner's own key: stats are shown to their owner only", body = ErrorBody),
    ),
    security((), ("client_key" = [])))]
pub(crate) async fn owner_stats(
    State(state): State<Arc<QueryState>>,
    Path(owner): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    check_owner(&owner)?;
    // The counts include private media, so they are the owner's alone; anyone else gets the
    // 404 of an owner without media, whatever the owner has.
    if state.viewer(&headers)?.as_deref() != Some(owner.as_str()) {
        return Err(ApiError::not_found(
            "no stats for this owner (stats are shown to their owner, with the owner's key)",
        ));
    }
    let render = {
        let (state, owner) = (state.clone(), owner.clone());
        async move {
            let stats = state
                .backends
                .views
                .owner_stats(&owner)
                .await
                .map_err(ApiError::backend)?;
            json_bytes(&StatsView {
                owner: &owner,
                media_count: stats.media_count,
                bytes: stats.bytes,
            })
        }
    };
    let key = OwnerKey {
        owner,
        view: OwnerView::Stats,
    };
    owner_response(&state, &headers, key, render).await
}
