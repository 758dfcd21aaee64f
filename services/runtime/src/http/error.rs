//! The one error type clients see ([`ApiError`]), its JSON body, and the middleware that makes
//! every other error response (the router's 404 and 405, a body limit's 413) that same JSON.

use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

/// The error every endpoint returns. Clients get a stable `{"error": {"code", "message"}}`
/// body with the right status; internal causes are logged, never sent.
#[derive(Debug)]
pub struct ApiError {
    /// The response's status.
    pub status: StatusCode,
    /// The body's `error.code`: stable and machine-readable, such as `not_found`.
    pub code: &'static str,
    /// The body's `error.message`, for people.
    pub message: String,
    source: Option<anyhow::Error>,
}

impl ApiError {
    /// An error with this status, code and message, and no internal cause to log.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            source: None,
        }
    }

    /// 400 with `code`: the request is malformed or breaks a rule the message names.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// 404 `not_found`.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// 401 `unauthorized`, with `WWW-Authenticate: Bearer`: no key, or not a valid one of
    /// the kind the route takes.
    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid `Authorization: Bearer <key>` header is required",
        )
    }

    /// 403 `forbidden`: the key is valid but may not do this.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    /// A backend that is down or timed out: 503 `unavailable` with `Retry-After`
    /// ([`RETRY_AFTER_SECS`]); the cause is logged at WARN, never sent.
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

    /// A failure of Conveyor's own that retrying will not fix (a bug, a permanent backend
    /// error): 500 `internal`; the cause is logged at ERROR, never sent.
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
    /// What went wrong.
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
    /// `{"error": {"code": code, "message": message}}`.
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
        // On the request's span, when traces are on: which error a 4xx or 5xx was.
        tracing::Span::current().record("error.type", self.code);
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

#[cfg(test)]
mod tests {
    use super::*;

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
