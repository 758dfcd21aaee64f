//! What every HTTP edge shares, one file per concern: the error type clients see ([`error`]),
//! JSON bodies ([`json`]), request metrics ([`requests`]), the operations routes ([`ops`]),
//! per-key rate limits ([`rate_limit`](mod@rate_limit)), CORS ([`cors`](mod@cors)), shared
//! headers ([`headers`]) and the server loop with its connection limits
//! ([`serve`](mod@serve)). Everything is re-exported here, so callers write `http::ApiError`.

pub mod cors;
pub mod error;
pub mod headers;
pub mod json;
pub mod ops;
pub mod rate_limit;
pub mod requests;
pub mod serve;

pub use cors::cors;
pub use error::{
    ApiError, ErrorBody, ErrorDetail, RETRY_AFTER_SECS, SelfLink, json_errors, not_found,
};
pub use headers::{bearer, content_length_over, etag_of, not_modified};
pub use json::{parse_json, require_json};
pub use ops::{Health, OpsApi, Readiness, ops_router};
pub use rate_limit::{RateLimit, rate_limit};
pub use requests::{method_name, track_requests};
pub use serve::{BodyTooSlow, body_read_error, serve};
