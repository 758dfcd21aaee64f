//! Timeline cursors: the position after which the next page starts, opaque to clients.
//!
//! A cursor is URL-safe base64 (RFC 4648 §5, no padding) of `{created_at}:{id}`, the
//! timeline's sort key: creation time in microseconds, then the media id.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use uuid::Uuid;

/// The cursor for the position `(created_at, id)`.
pub fn encode((created_at, id): (i64, Uuid)) -> String {
    URL_SAFE_NO_PAD.encode(format!("{created_at}:{id}"))
}

/// The position a cursor names, or `None` for anything [`encode`] did not make.
pub fn decode(cursor: &str) -> Option<(i64, Uuid)> {
    let text = String::from_utf8(URL_SAFE_NO_PAD.decode(cursor).ok()?).ok()?;
    let (at, id) = text.split_once(':')?;
    Some((at.parse().ok()?, Uuid::parse_str(id).ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_garbage_is_refused() {
        let at = (1_764_300_000_000_000, Uuid::now_v7());
        assert_eq!(decode(&encode(at)), Some(at));
        assert_eq!(decode("not-a-cursor"), None);
        assert_eq!(decode(&URL_SAFE_NO_PAD.encode("12:nope")), None);
    }
}
