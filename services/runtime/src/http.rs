//! What every HTTP edge shares: the one error type clients see, the JSON body extractor, the
//! request metrics middleware, and the health and metrics routes.

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::de::DeserializeOwned;

use conveyor_config::CorsOrigins;
use conveyor_storage::Backends;

/// The error every endpoint returns. Clients get a stable `{"error": {"code", "message"}}`
/// body with the right status; internal causes are logged, never sent.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    source: Option<anyhow::Error>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            source: None,
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid `Authorization: Bearer <key>` header is required",
        )
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    /// A failure of Conveyor's own (a backend is down, a bug): 503 for backends, logged.
    pub fn unavailable(source: impl Into<anyhow::Error>) -> Self {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: "unavailable",
            message: "a backend is unavailable; retry later".into(),
            source: Some(source.into()),
        }
    }

    /// A backend's failure, by its kind: a transient one is 503 with `Retry-After` (the client
    /// should retry), and any other is 500 (retrying will not help; an operator must look).
    pub fn backend<E>(error: E) -> Self
    where
        E: conveyor_storage::error::Kinded + std::error::Error + Send + Sync + 'static,
    {
        if error.is_transient() {
            Self::unavailable(error)
        } else {
            Self::internal(error)
        }
    }

    pub fn internal(source: impl Into<anyhow::Error>) -> Self {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            code: "internal",
            message: "internal error".into(),
            source: Some(source.into()),
        }
    }
}

/// The body of every response that is not a success, whatever answered it: a handler, an
/// extractor, the router (404, 405) or a body limit (413).
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
#[schema(example = json!({"error": {"code": "not_found", "message": "no such media"}}))]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// What went wrong.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// Stable and machine-readable (`not_found`, `invalid_json`, `too_large`, …): match on
    /// this, never on the message.
    pub code: String,
    /// For people: what was wrong, naming the JSON path or parameter when there is one.
    pub message: String,
}

impl ErrorBody {
    pub fn new(code: &str, message: impl Into<String>) -> Self {
        ErrorBody {
            error: ErrorDetail {
                code: code.to_owned(),
                message: message.into(),
            },
        }
    }
}

/// `links.self`: where a resource is read.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct SelfLink {
    /// A path on this API, such as `/v1/media/{id}`.
    #[serde(rename = "self")]
    pub this: String,
}

/// What a 503 asks clients to wait before retrying, in seconds.
pub const RETRY_AFTER_SECS: &str = "5";

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status, self.code, self.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let Some(source) = &self.source {
            // A backend that is down is an operator's to watch (WARN, and /readyz); a 500 is a
            // fault to fix (ERROR).
            if self.status == StatusCode::SERVICE_UNAVAILABLE {
                tracing::warn!(
                    status = self.status.as_u16(),
                    code = self.code,
                    error = format!("{source:#}"),
                    "request failed"
                );
            } else {
                tracing::error!(
                    status = self.status.as_u16(),
                    code = self.code,
                    error = format!("{source:#}"),
                    "request failed"
                );
            }
        }
        let body = ErrorBody::new(self.code, self.message);
        let mut response = (self.status, axum::Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            // A backend that is down (a broker restarting, a node failing over) is usually back
            // within seconds; RFC 9110 §10.2.3.
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from_static(RETRY_AFTER_SECS),
            );
        }
        response
    }
}

/// Refuses a body that is not declared as JSON with 415.
pub fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if json {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "expected `Content-Type: application/json`",
        ))
    }
}

/// Parses JSON, turning errors into 400s that name the field, e.g.
/// `payload.MediaDescribed.tags: invalid type: string "x", expected a sequence`.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    conveyor_wire::json::parse_strict(bytes)
        .map_err(|message| ApiError::bad_request("invalid_json", message))
}

/// Records request count and latency per route and status class.
pub async fn track_requests(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let method = req.method().as_str().to_owned();
    let started = Instant::now();
    let response = next.run(req).await;
    let status = match response.status().as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    };
    metrics::counter!("conveyor_http_requests_total", "route" => route.clone(), "method" => method.clone(), "status" => status).increment(1);
    metrics::histogram!("conveyor_http_request_seconds", "route" => route, "method" => method)
        .record(started.elapsed().as_secs_f64());
    response
}

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

/// Unknown routes get the same JSON error shape as everything else.
pub async fn not_found() -> ApiError {
    ApiError::not_found("no such route")
}

/// Makes every error response JSON. The framework answers some requests before any handler
/// runs (a path segment that is not UTF-8, a body over its route's limit, a wrong method), in
/// plain text or with no body at all; this rewrites those as `{"error": {"code", "message"}}`
/// with the same status and headers (`Allow` on a 405 among them). Responses that are JSON
/// already pass untouched.
pub async fn json_errors(req: Request, next: Next) -> Response {
    let response = next.run(req).await;
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/json"));
    if is_json {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    // The framework's rejection texts are one line; a longer body is replaced, not buffered.
    let text = axum::body::to_bytes(body, 4096)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
        .unwrap_or_default();
    let code = match status {
        StatusCode::BAD_REQUEST => "bad_request",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::REQUEST_TIMEOUT => "timeout",
        StatusCode::PAYLOAD_TOO_LARGE => "too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::UNPROCESSABLE_ENTITY => "unprocessable",
        StatusCode::RANGE_NOT_SATISFIABLE => "range_not_satisfiable",
        s if s.is_server_error() => "internal",
        _ => "error",
    };
    let allow = parts
        .headers
        .get(header::ALLOW)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let message = match (text.is_empty(), allow) {
        (false, _) => text,
        (true, Some(allow)) => format!("this route takes {allow}"),
        (true, None) => status
            .canonical_reason()
            .unwrap_or("request failed")
            .to_lowercase(),
    };
    let body = serde_json::to_string(&ErrorBody::new(code, message)).expect("errors serialize");
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Response::from_parts(parts, axum::body::Body::from(body))
}

/// Per-key request rates (`auth.rate_per_sec`, `auth.rate_burst`): every request that
/// presents a valid key is counted against it, on this replica; past the rate and its burst
/// it gets 429 with `Retry-After`. Requests without a valid key are not counted here (they
/// get their 401 from the route, or read public media, which the CDN fronts).
pub struct RateLimit {
    keys: crate::keys::Keys,
    /// Keyed by the presented key's fingerprint: each key has its own rate, so one noisy
    /// key cannot starve its owner's others.
    limiter: Option<governor::DefaultKeyedRateLimiter<[u8; 32]>>,
}

impl RateLimit {
    pub fn new(keys: crate::keys::Keys, per_sec: u32, burst: u32) -> Arc<RateLimit> {
        let limiter = std::num::NonZeroU32::new(per_sec).map(|rate| {
            let burst = std::num::NonZeroU32::new(burst.max(per_sec)).unwrap_or(rate);
            governor::RateLimiter::keyed(governor::Quota::per_second(rate).allow_burst(burst))
        });
        Arc::new(RateLimit { keys, limiter })
    }
}

/// The middleware for [`RateLimit`].
pub async fn rate_limit(State(limit): State<Arc<RateLimit>>, req: Request, next: Next) -> Response {
    use governor::clock::{Clock, DefaultClock};
    let Some(limiter) = &limit.limiter else {
        return next.run(req).await;
    };
    let verdict = bearer(req.headers())
        .filter(|key| limit.keys.identify(key).is_some())
        .map(|key| limiter.check_key(&crate::keys::fingerprint(key)));
    if let Some(Err(not_until)) = verdict {
        let wait = not_until.wait_time_from(DefaultClock::default().now());
        let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        metrics::counter!("conveyor_rate_limited_total").increment(1);
        let mut response = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!(
                "this key is over its request rate; retry in {} s",
                seconds.max(1)
            ),
        )
        .into_response();
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
        return response;
    }
    next.run(req).await
}

/// The CORS layer `origins` asks for (`http.cors_origins`, parsed and normalized when the
/// settings loaded), or `None` when it names none. Preflights are answered for a day; the
/// headers clients send and read are the API's own.
pub fn cors(origins: &CorsOrigins) -> Option<tower_http::cors::CorsLayer> {
    use tower_http::cors::{AllowOrigin, CorsLayer};
    let allow = match origins {
        CorsOrigins::None => return None,
        CorsOrigins::Any => AllowOrigin::any(),
        CorsOrigins::List(list) => AllowOrigin::list(list.iter().cloned()),
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([
                axum::http::Method::GET,
                axum::http::Method::HEAD,
                axum::http::Method::POST,
                axum::http::Method::PUT,
                axum::http::Method::DELETE,
            ])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                header::IF_NONE_MATCH,
                header::RANGE,
            ])
            .expose_headers([
                header::ETAG,
                header::LOCATION,
                header::RETRY_AFTER,
                header::CONTENT_RANGE,
            ])
            .max_age(std::time::Duration::from_secs(86_400)),
    )
}

/// Refuses a request whose declared `Content-Length` is over `limit` bytes with 413, before
/// any of its body is read (and before a client that sent `Expect: 100-continue` is told to
/// go on). A body without a length is still cut at `limit` while it streams.
pub fn content_length_over(headers: &HeaderMap, limit: u64) -> Option<ApiError> {
    let length = headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse::<u64>()
        .ok()?;
    (length > limit).then(|| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("the body of {length} bytes is over this route's limit of {limit} bytes"),
        )
    })
}

/// The owner a client key belongs to, from `Authorization: Bearer <key>`.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .split_once(' ')
        // The scheme is case-insensitive (RFC 9110 §11.1).
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, key)| key.trim())
        .filter(|k| !k.is_empty())
}

/// A quoted strong ETag for a response body.
pub fn etag_of(body: &[u8]) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(body);
    format!("\"{}\"", hex::encode(&digest[..12]))
}

/// Whether `If-None-Match` names `etag` (or `*`).
pub fn not_modified(headers: &HeaderMap, etag: &str) -> bool {
    headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .map(str::trim)
                .any(|t| t == etag || t == "*" || t.strip_prefix("W/") == Some(etag))
        })
}

/// Serves `router` on `listener` until `stop`, then drains: open requests get
/// `drain_timeout_ms` to finish. Unlike `axum::serve`, connections are held to `settings`:
/// a deadline on every request head (which also closes idle keep-alive connections), a
/// deadline between body chunks, and a cap on open connections.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    settings: &conveyor_config::HttpSettings,
    stop: tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use tower::ServiceExt;

    let min_rate = MinBodyRate {
        bytes_per_sec: settings.min_body_rate_bytes_per_sec,
        grace: std::time::Duration::from_millis(settings.body_rate_grace_ms),
    };
    let router = router
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
            std::time::Duration::from_millis(settings.body_idle_timeout_ms.max(1)),
        ))
        .layer(axum::middleware::map_request(move |request: Request| {
            std::future::ready(min_rate.apply(request))
        }));
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(std::time::Duration::from_millis(
            settings.header_read_timeout_ms.max(1),
        ));
    // A client may close its sending side once its request is out and still read the answer.
    builder.http1().half_close(true);
    builder.http2().timer(TokioTimer::new());
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(settings.max_connections.max(1)));
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, or a connection reset before it was accepted:
                    // wait a moment rather than spin.
                    tracing::warn!(error = %e, "failed to accept a connection");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics::counter!("conveyor_connections_refused_total").increment(1);
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let write_stall = std::time::Duration::from_millis(settings.write_stall_timeout_ms.max(1));
        let header_read_timeout =
            std::time::Duration::from_millis(settings.header_read_timeout_ms.max(1));
        let service =
            hyper_util::service::TowerToHyperService::new(router.clone().map_request(
                |r: hyper::Request<hyper::body::Incoming>| r.map(axum::body::Body::new),
            ));
        let builder = builder.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let _slot = slot;
            // hyper's head deadline starts once it reads; a connection that never sends its
            // first byte (while the HTTP/1 or HTTP/2 preface is sniffed) is held to it here.
            let mut first = [0u8; 1];
            match tokio::time::timeout(header_read_timeout, stream.peek(&mut first)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return,
            }
            let io = TokioIo::new(WriteDeadline::new(stream, write_stall));
            let connection = builder
                .serve_connection_with_upgrades(io, service)
                .into_owned();
            let _ = watcher.watch(connection).await;
        });
    }
    drop(listener);
    let drain = std::time::Duration::from_millis(settings.drain_timeout_ms);
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("requests still open after the drain timeout; closing their connections");
    }
    Ok(())
}

/// The error a request body ends with when the client sends it too slowly or stops
/// sending: it arrived slower than `http.min_body_rate_bytes_per_sec` on average once the
/// grace was over, or paused longer than `http.body_idle_timeout_ms`.
#[derive(Debug, thiserror::Error)]
#[error("the request body arrived slower than {bytes_per_sec} bytes/s on average")]
pub struct BodyTooSlow {
    bytes_per_sec: u64,
}

/// What a failed read of a request body means for the client, from the error's cause
/// (its source chain, never its text): 408 `body_too_slow` when the client sent too slowly
/// or stopped ([`BodyTooSlow`], tower-http's idle [`TimeoutError`]), and otherwise 400
/// `incomplete_body`, since a body that ends before its declared length or a client that
/// goes away is the client's doing. Both are logged at INFO, as client errors.
///
/// [`TimeoutError`]: tower_http::timeout::TimeoutError
pub fn body_read_error(error: &(dyn std::error::Error + 'static)) -> ApiError {
    let mut cause = Some(error);
    while let Some(e) = cause {
        if let Some(slow) = e.downcast_ref::<BodyTooSlow>() {
            return ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "body_too_slow",
                slow.to_string(),
            );
        }
        if e.is::<tower_http::timeout::TimeoutError>() {
            return ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "body_too_slow",
                "the request body stopped arriving for longer than the idle timeout",
            );
        }
        cause = e.source();
    }
    ApiError::bad_request(
        "incomplete_body",
        "the request body ended early or broke off before it was complete",
    )
}

/// The minimum average rate a request body must arrive at (`http.min_body_rate_*`).
#[derive(Debug, Clone, Copy)]
struct MinBodyRate {
    bytes_per_sec: u64,
    grace: std::time::Duration,
}

impl MinBodyRate {
    fn apply(self, request: Request) -> Request {
        if self.bytes_per_sec == 0 {
            return request;
        }
        request.map(|body| {
            axum::body::Body::new(RateBody {
                inner: body,
                rate: self,
                received: 0,
                waited: std::time::Duration::ZERO,
                waiting: None,
            })
        })
    }

    /// How long the client may have kept the server waiting, in all, once `received` bytes
    /// have arrived: every byte earns `1 / bytes_per_sec` seconds, and the grace is free.
    fn allowance(self, received: u64) -> std::time::Duration {
        let earned =
            std::time::Duration::from_secs_f64(received as f64 / self.bytes_per_sec as f64);
        self.grace.max(earned)
    }
}

/// A request body held to [`MinBodyRate`]. Only the time the server spends waiting on the
/// client counts, from a poll that found nothing until the next chunk; time the handler
/// spends elsewhere (storing the last chunk, say) does not. The body fails with
/// [`BodyTooSlow`] once the wait passes the allowance.
struct RateBody {
    inner: axum::body::Body,
    rate: MinBodyRate,
    received: u64,
    /// Waited on the client so far, not counting the wait under way.
    waited: std::time::Duration,
    /// The wait under way: when it began, and its deadline.
    waiting: Option<(tokio::time::Instant, std::pin::Pin<Box<tokio::time::Sleep>>)>,
}

impl http_body::Body for RateBody {
    type Data = bytes::Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        use std::future::Future;
        use std::task::Poll;
        let this = self.get_mut();
        match std::pin::Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Pending => {
                let (received, rate, waited) = (this.received, this.rate, this.waited);
                let (_, deadline) = this.waiting.get_or_insert_with(|| {
                    let now = tokio::time::Instant::now();
                    let left = rate.allowance(received).saturating_sub(waited);
                    (now, Box::pin(tokio::time::sleep_until(now + left)))
                });
                match deadline.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyTooSlow {
                        bytes_per_sec: rate.bytes_per_sec,
                    })))),
                    Poll::Pending => Poll::Pending,
                }
            }
            Poll::Ready(frame) => {
                if let Some((since, _)) = this.waiting.take() {
                    this.waited += since.elapsed();
                }
                if let Some(data) = frame.as_ref().and_then(|f| f.as_ref().ok()?.data_ref()) {
                    this.received += data.len() as u64;
                }
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A connection whose writes may not stall: a client that stops reading makes every write
/// wait, holding its connection, and a slot under the cap, for as long as it likes. A write or
/// flush that makes no progress for `limit` fails with `TimedOut`, and hyper drops the
/// connection.
struct WriteDeadline<IO> {
    io: IO,
    limit: std::time::Duration,
    stalled: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl<IO> WriteDeadline<IO> {
    fn new(io: IO, limit: std::time::Duration) -> Self {
        WriteDeadline {
            io,
            limit,
            stalled: None,
        }
    }

    /// After the inner write returned `Pending`: pending still, or timed out.
    fn waiting<T>(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<T>> {
        use std::future::Future;
        let limit = self.limit;
        let deadline = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match deadline.as_mut().poll(cx) {
            std::task::Poll::Ready(()) => std::task::Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client stopped reading the response",
            ))),
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    }

    fn progressed<T>(&mut self, ready: std::io::Result<T>) -> std::task::Poll<std::io::Result<T>> {
        self.stalled = None;
        std::task::Poll::Ready(ready)
    }
}

impl<IO: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for WriteDeadline<IO> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<IO: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for WriteDeadline<IO> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        match std::pin::Pin::new(&mut this.io).poll_write(cx, buf) {
            std::task::Poll::Ready(r) => this.progressed(r),
            std::task::Poll::Pending => this.waiting(cx),
        }
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        match std::pin::Pin::new(&mut this.io).poll_write_vectored(cx, bufs) {
            std::task::Poll::Ready(r) => this.progressed(r),
            std::task::Poll::Pending => this.waiting(cx),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        match std::pin::Pin::new(&mut this.io).poll_flush(cx) {
            std::task::Poll::Ready(r) => this.progressed(r),
            std::task::Poll::Pending => this.waiting(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        let with = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
            bearer(&headers).map(str::to_owned)
        };
        assert_eq!(with("Bearer k1").as_deref(), Some("k1"));
        assert_eq!(with("bearer k1").as_deref(), Some("k1"));
        assert_eq!(with("BEARER  k1 ").as_deref(), Some("k1"));
        assert_eq!(with("Basic k1"), None);
        assert_eq!(with("Bearer "), None);
        assert_eq!(with("Bearerk1"), None);
    }

    #[tokio::test]
    async fn an_unavailable_backend_is_a_json_503_with_retry_after() {
        let response = ApiError::unavailable(anyhow::anyhow!("broker down")).into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[header::RETRY_AFTER], RETRY_AFTER_SECS);
        let body = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["error"]["code"], "unavailable");
        assert!(
            !body.to_string().contains("broker down"),
            "the cause is logged, never sent"
        );
    }
}
