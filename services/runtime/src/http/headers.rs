//! Request and response headers the edges share: body length limits, bearer keys, ETags and
//! conditional requests.

use axum::http::{HeaderMap, StatusCode, header};

use super::ApiError;

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

/// The key presented in `Authorization: Bearer <key>` (the scheme in any case, the key
/// trimmed), or `None` when there is none. Who the key belongs to, and whether it is valid,
/// is [`crate::keys::Keys::lookup`]'s to say.
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

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

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
}
