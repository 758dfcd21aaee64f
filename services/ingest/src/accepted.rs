//! The answer to an upload that is stored and appended: `POST /v1/media`'s and a completed
//! direct upload's 202, which an `Idempotency-Key` retry gets again.

use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use uuid::Uuid;

/// An upload that is stored and whose `MediaUploaded` is durable; processing follows.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub(crate) struct Accepted {
    /// The media id.
    pub id: Uuid,
    /// Always `pending`: watch `links.self` until it is `processed` or `failed`.
    #[schema(example = "pending")]
    pub status: &'static str,
    /// Hex sha256 of the bytes, which is also their content address.
    pub sha256: String,
    /// Size of the original, in bytes.
    pub bytes: u64,
    /// The sniffed type, such as `image/jpeg`.
    pub content_type: String,
    pub links: conveyor_runtime::http::SelfLink,
}

impl Accepted {
    /// The 202 with its `Location`.
    pub(crate) fn respond(self) -> Response {
        let location = format!("/v1/media/{}", self.id);
        (
            StatusCode::ACCEPTED,
            [(header::LOCATION, location)],
            axum::Json(self),
        )
            .into_response()
    }
}
