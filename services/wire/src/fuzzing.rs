//! The properties each fuzz target checks (`fuzz/fuzz_targets/`), kept here so that the
//! regression test (`tests/regressions.rs`) replays every input a fuzzer ever kept
//! (`fuzz/regressions/{target}/`) through exactly the same checks on every `cargo test`.
//!
//! Each function panics when its property fails; on any other input it returns quietly.

use conveyor_schemas::intake::IncomingEvent;
use conveyor_schemas::{Codec, Envelope};

use crate::media::{MediaType, SNIFF_BYTES};
use crate::range::RangeRequest;

/// A fuzz target: its name, and the function that takes the fuzzer's bytes.
pub type Target = (&'static str, fn(&[u8]));

/// Every target, by the name its fuzz target and regression folder have.
pub const TARGETS: [Target; 6] = [
    ("event_codec", event_codec),
    ("event_intake", event_intake),
    ("sniff", sniff),
    ("range", range),
    ("cursor", cursor),
    ("image_headers", image_headers),
];

/// A log record's value, in either codec: decoding never panics, and what decodes encodes and
/// decodes back to the same envelope.
pub fn event_codec(data: &[u8]) {
    for codec in [Codec::Bincode, Codec::Json] {
        if let Ok(envelope) = codec.decode(data) {
            let again: Envelope = codec
                .decode(&codec.encode(&envelope))
                .expect("an envelope that decoded encodes to one that decodes");
            assert_eq!(again, envelope, "{codec:?} round trip");
        }
    }
}

/// `POST /v1/events`'s body: parsing never panics, and what parses is what it says when
/// written back and parsed again.
pub fn event_intake(data: &[u8]) {
    if let Ok(events) = crate::intake::parse(data) {
        let text = serde_json::to_vec(&events).expect("intake events serialize");
        let again: Vec<IncomingEvent> =
            crate::intake::parse(&text).expect("written-back events parse");
        assert_eq!(again, events);
    }
}

/// Format sniffing: never panics, sees only the first [`SNIFF_BYTES`], and names a type its
/// own MIME type maps back to.
pub fn sniff(data: &[u8]) {
    let found = MediaType::sniff(data);
    let head = &data[..data.len().min(SNIFF_BYTES)];
    assert_eq!(MediaType::sniff(head), found, "decided within the head");
    if let Some(t) = found {
        assert_eq!(MediaType::from_content_type(t.content_type()), Some(t));
        assert_eq!(MediaType::from_extension(t.extension()), Some(t));
    }
}

/// `Range` headers: the first 8 bytes are the object's size, the rest the header. Never
/// panics, and a part lies inside the object.
pub fn range(data: &[u8]) {
    let Some((size, header)) = data.split_first_chunk::<8>() else {
        return;
    };
    let size = u64::from_le_bytes(*size);
    let Ok(header) = std::str::from_utf8(header) else {
        return;
    };
    if let RangeRequest::Part(part) = crate::range::parse(Some(header), size) {
        assert!(
            part.start() <= part.end() && *part.end() < size,
            "{part:?} is outside an object of {size} bytes ({header:?})"
        );
    }
}

/// Timeline cursors: decoding never panics, and a position a cursor names encodes to a cursor
/// that names it again.
pub fn cursor(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(position) = crate::cursor::decode(text) {
        assert_eq!(
            crate::cursor::decode(&crate::cursor::encode(position)),
            Some(position)
        );
    }
}

/// The image header walks the processor runs before any decoder: never panic, and what they
/// count is bounded by the bytes (a scan takes at least its 4-byte header, a frame its 10-byte
/// descriptor), so no file claims more work than its size allows.
pub fn image_headers(data: &[u8]) {
    use crate::headers;
    let jpeg = headers::jpeg_markers(data);
    assert!(jpeg.scans <= data.len() as u64 / 4, "{jpeg:?}");
    if let Ok((_, frames)) = headers::gif_frames(data) {
        let count = frames.count();
        assert!(count <= data.len() / 10 + 1, "{count} frames");
    }
    let _ = headers::png_metadata_bytes(data);
    let _ = headers::heif_grid_tiles(data);
    for (_, payload) in headers::boxes(data) {
        assert!(payload.len() <= data.len());
    }
}
