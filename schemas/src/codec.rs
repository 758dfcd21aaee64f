//! The two wire formats of an [`Envelope`]: bincode between services, JSON for internal
//! producers. A log record says which one it uses in its `content-type` header.

use crate::event::{Envelope, SCHEMA_VERSION};

/// How an envelope is encoded on the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// `application/x-bincode`: serde through bincode's standard (varint) configuration.
    Bincode,
    /// `application/json`: serde_json, with enums externally tagged (`{"MediaDeleted": {...}}`).
    Json,
}

/// Why a record could not be decoded. A decode error is permanent: retrying cannot fix it.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The bytes are not one bincode envelope: malformed, followed by trailing bytes, or
    /// claiming more than [`MAX_DECODED_BYTES`]. Holds bincode's message (or the count of
    /// trailing bytes).
    #[error("malformed bincode envelope: {0}")]
    Bincode(String),
    /// The bytes are not a JSON envelope (serde_json's error).
    #[error("malformed json envelope: {0}")]
    Json(#[from] serde_json::Error),
    /// The record's `content-type` names neither codec; holds the media type as read, without
    /// its parameters.
    #[error("unsupported content type {0:?}")]
    ContentType(String),
    /// The envelope decoded but its `schema_version` is 0 or newer than this build's
    /// [`SCHEMA_VERSION`]; holds the version read.
    #[error("unsupported schema version {0}")]
    SchemaVersion(u16),
}

/// Most bytes one decode may claim for its strings and sequences. bincode otherwise allocates
/// whatever a length prefix says before reading the bytes, so a 40-byte record could ask for
/// exabytes (found by the `event_codec` fuzz target). Log records are far smaller: Kafka's
/// `message.max.bytes` is 1 MiB by default, and an envelope's strings are names and keys.
pub const MAX_DECODED_BYTES: usize = 8 << 20;

const BINCODE: bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<MAX_DECODED_BYTES>,
> = bincode::config::standard().with_limit::<MAX_DECODED_BYTES>();

impl Codec {
    /// The `content-type` header value that names this codec on a log record:
    /// `application/x-bincode` or `application/json`.
    pub fn content_type(self) -> &'static str {
        match self {
            Codec::Bincode => "application/x-bincode",
            Codec::Json => "application/json",
        }
    }

    /// The codec named by a `content-type` header. A missing header means bincode.
    pub fn from_content_type(value: Option<&str>) -> Result<Codec, DecodeError> {
        match value.map(|v| v.split(';').next().unwrap_or("").trim()) {
            None | Some("application/x-bincode") => Ok(Codec::Bincode),
            Some("application/json") => Ok(Codec::Json),
            Some(other) => Err(DecodeError::ContentType(other.to_owned())),
        }
    }

    /// The envelope's bytes in this codec. Infallible: every envelope type encodes in both.
    pub fn encode(self, envelope: &Envelope) -> Vec<u8> {
        match self {
            Codec::Bincode => bincode::serde::encode_to_vec(envelope, BINCODE)
                .expect("envelopes contain only bincode-encodable types"),
            Codec::Json => serde_json::to_vec(envelope).expect("envelopes serialize to json"),
        }
    }

    /// The envelope in `bytes`, which must hold exactly one envelope in this codec.
    ///
    /// # Errors
    ///
    /// [`DecodeError::Bincode`] when bincode bytes are malformed, have trailing bytes, or
    /// claim more than [`MAX_DECODED_BYTES`]; [`DecodeError::Json`] when JSON bytes are not an
    /// envelope; [`DecodeError::SchemaVersion`] when the envelope's `schema_version` is 0 or
    /// greater than [`SCHEMA_VERSION`].
    pub fn decode(self, bytes: &[u8]) -> Result<Envelope, DecodeError> {
        let envelope: Envelope = match self {
            Codec::Bincode => {
                let (envelope, read) = bincode::serde::decode_from_slice(bytes, BINCODE)
                    .map_err(|e| DecodeError::Bincode(e.to_string()))?;
                if read != bytes.len() {
                    return Err(DecodeError::Bincode(format!(
                        "{} trailing bytes",
                        bytes.len() - read
                    )));
                }
                envelope
            }
            Codec::Json => serde_json::from_slice(bytes)?,
        };
        if envelope.schema_version == 0 || envelope.schema_version > SCHEMA_VERSION {
            return Err(DecodeError::SchemaVersion(envelope.schema_version));
        }
        Ok(envelope)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::*;
    use std::path::PathBuf;
    use uuid::Uuid;

    /// One example of every event, with fixed ids so the fixture bytes are stable.
    fn examples() -> Vec<(&'static str, Envelope)> {
        let id = Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0001);
        let at = |n: u128| Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0100 + n);
        let envelope = |n, payload| Envelope {
            event_id: at(n),
            aggregate_id: id,
            version: 1_764_300_000_000_000 + n as u64,
            occurred_at: 1_764_300_000_000_000 + n as i64,
            producer: "fixture".into(),
            schema_version: 1,
            payload,
        };
        let sha = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
        vec![
            (
                "media_uploaded",
                envelope(
                    1,
                    Event::MediaUploaded(MediaUploaded {
                        owner: "alice".into(),
                        original_key: format!("originals/{sha}"),
                        sha256: sha.into(),
                        bytes: 123_456,
                        content_type: "image/jpeg".into(),
                        title: Some("harbour at dawn".into()),
                    }),
                ),
            ),
            (
                "media_processed",
                envelope(
                    2,
                    Event::MediaProcessed(MediaProcessed {
                        width: 2000,
                        height: 3000,
                        blurhash: "LEHV6nWB2yk8pyo0adR*.7kCMdnj".into(),
                        variants: vec![VariantInfo {
                            name: "thumb".into(),
                            key: format!("variants/{sha}/thumb.jpg"),
                            width: 171,
                            height: 256,
                            content_type: "image/jpeg".into(),
                            bytes: 9_000,
                        }],
                        exif: ExifSummary {
                            camera_make: Some("Canon".into()),
                            camera_model: Some("EOS R5".into()),
                            taken_at: Some("2026:11:28 07:00:00".into()),
                        },
                    }),
                ),
            ),
            (
                "media_processing_failed",
                envelope(
                    3,
                    Event::MediaProcessingFailed(MediaProcessingFailed {
                        reason: "truncated jpeg".into(),
                    }),
                ),
            ),
            (
                "media_described",
                envelope(
                    4,
                    Event::MediaDescribed(MediaDescribed {
                        title: Some("harbour".into()),
                        description: Some("boats before sunrise".into()),
                        tags: vec!["sea".into(), "boats".into()],
                    }),
                ),
            ),
            (
                "media_deleted",
                envelope(
                    5,
                    Event::MediaDeleted(MediaDeleted {
                        deleted_by: "alice".into(),
                    }),
                ),
            ),
            (
                "media_uploaded_with_visibility",
                envelope(
                    6,
                    Event::MediaUploadedWithVisibility(MediaUploadedWithVisibility {
                        upload: MediaUploaded {
                            owner: "alice".into(),
                            original_key: format!("private/originals/{sha}"),
                            sha256: sha.into(),
                            bytes: 4_096,
                            content_type: "image/png".into(),
                            title: None,
                        },
                        visibility: Visibility::Private,
                    }),
                ),
            ),
            (
                "media_processing_progress",
                envelope(
                    7,
                    Event::MediaProcessingProgress(MediaProcessingProgress { percent: 40 }),
                ),
            ),
            (
                "video_processed",
                envelope(
                    8,
                    Event::VideoProcessed(VideoProcessed {
                        width: 1080,
                        height: 1920,
                        blurhash: "LEHV6nWB2yk8pyo0adR*.7kCMdnj".into(),
                        variants: vec![VariantInfo {
                            name: "thumb".into(),
                            key: format!("variants/{sha}/thumb.jpg"),
                            width: 144,
                            height: 256,
                            content_type: "image/jpeg".into(),
                            bytes: 7_000,
                        }],
                        duration_ms: 12_480,
                        video_codec: "hevc".into(),
                        audio_codec: Some("aac".into()),
                        frame_rate_milli: 29_970,
                        bitrate: 8_000_000,
                        rotation: 90,
                        renditions: vec![VariantInfo {
                            name: "720p".into(),
                            key: format!("variants/{sha}/720p.mp4"),
                            width: 720,
                            height: 1280,
                            content_type: "video/mp4".into(),
                            bytes: 2_500_000,
                        }],
                    }),
                ),
            ),
        ]
    }

    fn fixtures_dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/v1")
    }

    /// The golden bytes of every released event must decode forever. Run with
    /// `UPDATE_FIXTURES=1` only when adding a new fixture, never to make a failure go away.
    #[test]
    fn golden_fixtures_decode() {
        let dir = fixtures_dir();
        for (name, expected) in examples() {
            for (codec, ext) in [(Codec::Bincode, "bin"), (Codec::Json, "json")] {
                let path = dir.join(format!("{name}.{ext}"));
                if std::env::var_os("UPDATE_FIXTURES").is_some() && !path.exists() {
                    std::fs::create_dir_all(&dir).unwrap();
                    std::fs::write(&path, codec.encode(&expected)).unwrap();
                }
                let bytes = std::fs::read(&path)
                    .unwrap_or_else(|e| panic!("missing fixture {}: {e}", path.display()));
                let decoded = codec.decode(&bytes).unwrap_or_else(|e| {
                    panic!("fixture {} no longer decodes: {e}", path.display())
                });
                assert_eq!(decoded, expected, "fixture {}", path.display());
                assert_eq!(
                    codec.encode(&decoded),
                    bytes,
                    "re-encoding {}",
                    path.display()
                );
            }
        }
    }

    #[test]
    fn both_codecs_round_trip() {
        for (_, envelope) in examples() {
            for codec in [Codec::Bincode, Codec::Json] {
                assert_eq!(codec.decode(&codec.encode(&envelope)).unwrap(), envelope);
            }
        }
    }

    #[test]
    fn garbage_and_trailing_bytes_are_decode_errors() {
        let (_, envelope) = examples().remove(0);
        let mut bytes = Codec::Bincode.encode(&envelope);
        bytes.push(0);
        assert!(matches!(
            Codec::Bincode.decode(&bytes),
            Err(DecodeError::Bincode(_))
        ));
        assert!(Codec::Bincode.decode(&[0xff; 7]).is_err());
        // A string whose length prefix says 1 TiB is refused before anything is allocated:
        // the producer's length is at byte 52, after two uuids and two varint u64s.
        let mut huge = bytes[..52].to_vec();
        huge.extend([0xfd, 0, 0, 0, 0, 0, 1, 0, 0]);
        assert!(matches!(
            Codec::Bincode.decode(&huge),
            Err(DecodeError::Bincode(_))
        ));
        assert!(matches!(
            Codec::Json.decode(b"{\"event_id\": 1}"),
            Err(DecodeError::Json(_))
        ));
    }

    #[test]
    fn a_future_schema_version_is_refused() {
        let (_, mut envelope) = examples().remove(0);
        envelope.schema_version = SCHEMA_VERSION + 1;
        let bytes = Codec::Json.encode(&envelope);
        assert!(matches!(
            Codec::Json.decode(&bytes),
            Err(DecodeError::SchemaVersion(_))
        ));
    }

    #[test]
    fn content_type_header_picks_the_codec() {
        assert_eq!(Codec::from_content_type(None).unwrap(), Codec::Bincode);
        assert_eq!(
            Codec::from_content_type(Some("application/json; charset=utf-8")).unwrap(),
            Codec::Json
        );
        assert!(Codec::from_content_type(Some("text/plain")).is_err());
    }
}
