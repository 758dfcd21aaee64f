//! JSON request bodies: the content type they must declare, and strict parsing whose errors
//! name the field.

use axum::http::{HeaderMap, StatusCode, header};
use serde::de::DeserializeOwned;

use super::ApiError;

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
