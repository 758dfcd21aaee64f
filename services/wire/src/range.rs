//! `Range` requests (RFC 9110 §14) against an object of known size.

use std::ops::RangeInclusive;

/// What to send for a `Range` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RangeRequest {
    /// The whole object (200): no header, a malformed one, several ranges that do not overlap
    /// (RFC 9110 §14.2 lets a server answer with the whole representation), or a range from
    /// byte 0 of an empty object, which has no bytes to make a part of.
    Whole,
    /// One range of bytes, both ends inside the object (206).
    Part(RangeInclusive<u64>),
    /// No part can be sent (416, with `Content-Range: bytes */{size}`): a range that starts
    /// past the end or is reversed (`bytes=5-3`), a suffix longer than the object, or
    /// several ranges that overlap.
    Unsatisfiable,
}

/// What `header` asks of an object of `size` bytes.
pub fn parse(header: Option<&str>, size: u64) -> RangeRequest {
    let Some(header) = header else {
        return RangeRequest::Whole;
    };
    match http_range_header::parse_range_header(header).map(|r| r.validate(size)) {
        // An empty object has no bytes to make a part of (http-range-header would answer
        // `bytes=0-0` with 0..=0), and a server may always send the whole (§14.2).
        Ok(Ok(_)) if size == 0 => RangeRequest::Whole,
        Ok(Ok(ranges)) if ranges.len() == 1 => RangeRequest::Part(ranges[0].clone()),
        Ok(Err(_)) => RangeRequest::Unsatisfiable,
        _ => RangeRequest::Whole,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_ranges_suffixes_and_past_the_end() {
        assert_eq!(parse(None, 10), RangeRequest::Whole);
        assert_eq!(parse(Some("bytes=0-3"), 10), RangeRequest::Part(0..=3));
        assert_eq!(parse(Some("bytes=-4"), 10), RangeRequest::Part(6..=9));
        assert_eq!(parse(Some("bytes=5-"), 10), RangeRequest::Part(5..=9));
        assert_eq!(parse(Some("bytes=10-"), 10), RangeRequest::Unsatisfiable);
        assert_eq!(parse(Some("bytes=0-1,3-4"), 10), RangeRequest::Whole);
        assert_eq!(parse(Some("lines=1-2"), 10), RangeRequest::Whole);
        assert_eq!(
            parse(Some("bytes=0-0"), 0),
            RangeRequest::Whole,
            "an empty object"
        );
    }
}
