//! The envelope and the events it carries.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The payload layout this build writes. A reader picks its decoder by the envelope's
/// `schema_version`, so a later layout can add fields without breaking the golden bytes of
/// this one (bincode is not self-describing, so "add a field with a default" needs a new
/// version number on the wire).
pub const SCHEMA_VERSION: u16 = 1;

/// Namespace for the deterministic (UUIDv5) ids of derived events.
const DERIVED_NAMESPACE: Uuid = Uuid::from_u128(0x6a0f_5c2e_91d4_4d8e_b1a7_3f0c_9e24_d15b);

/// One fact about one media item, with the metadata every consumer needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// UUIDv7 for events from the outside world; UUIDv5 of the cause for derived events, so a
    /// redelivered cause yields the same derived event.
    pub event_id: Uuid,
    /// The media id. It is the partition key, so every event of one item is ordered.
    pub aggregate_id: Uuid,
    /// A causal timestamp in microseconds. A derived event's version is its cause's plus one,
    /// and read models keep, per column group, the write with the highest version.
    pub version: u64,
    /// Wall-clock time the fact happened, in microseconds since the Unix epoch.
    pub occurred_at: i64,
    /// The service that produced the event: `ingest`, `processor`, `transcoder`, or an
    /// internal producer's key name.
    pub producer: String,
    /// The payload layout version; see [`SCHEMA_VERSION`].
    pub schema_version: u16,
    /// The fact itself.
    pub payload: Event,
}

/// The events. New variants go at the end: bincode encodes the variant index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    /// An original was stored (public media; see `MediaUploadedWithVisibility`).
    MediaUploaded(MediaUploaded),
    /// The processor made a photo's variants and read its metadata.
    MediaProcessed(MediaProcessed),
    /// The processor or the transcoder could not read the media.
    MediaProcessingFailed(MediaProcessingFailed),
    /// An internal producer set the title, description and tags.
    MediaDescribed(MediaDescribed),
    /// The media was deleted.
    MediaDeleted(MediaDeleted),
    /// An upload with a visibility. Added after the first release, as a new variant, so the
    /// golden bytes of `MediaUploaded` still decode; ingest writes it for private media.
    MediaUploadedWithVisibility(MediaUploadedWithVisibility),
    /// How far a long job (a video's transcode) has come. Added after the first release.
    MediaProcessingProgress(MediaProcessingProgress),
    /// A video was probed, its poster rendered and its web renditions made. Added after the
    /// first release, as a new variant, so the golden bytes of `MediaProcessed` still decode.
    VideoProcessed(VideoProcessed),
}

impl Event {
    /// The stable name of the event type, as used in log headers and metrics labels.
    pub fn type_name(&self) -> &'static str {
        match self {
            Event::MediaUploaded(_) => "MediaUploaded",
            Event::MediaProcessed(_) => "MediaProcessed",
            Event::MediaProcessingFailed(_) => "MediaProcessingFailed",
            Event::MediaDescribed(_) => "MediaDescribed",
            Event::MediaDeleted(_) => "MediaDeleted",
            Event::MediaUploadedWithVisibility(_) => "MediaUploadedWithVisibility",
            Event::MediaProcessingProgress(_) => "MediaProcessingProgress",
            Event::VideoProcessed(_) => "VideoProcessed",
        }
    }

    /// The upload this event records, and its visibility, for either upload variant.
    pub fn upload(&self) -> Option<(&MediaUploaded, Visibility)> {
        match self {
            Event::MediaUploaded(u) => Some((u, Visibility::Public)),
            Event::MediaUploadedWithVisibility(u) => Some((&u.upload, u.visibility)),
            _ => None,
        }
    }
}

/// An original was stored and is waiting to be processed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MediaUploaded {
    /// The uploader: the name of the client key the upload was made with.
    pub owner: String,
    /// Content-addressed key of the original: `originals/{sha256}`.
    pub original_key: String,
    /// Hex sha256 of the original bytes.
    pub sha256: String,
    /// Size of the original, in bytes.
    pub bytes: u64,
    /// Sniffed from the bytes, never taken from the client.
    pub content_type: String,
    /// The title the uploader gave, if any.
    pub title: Option<String>,
}

/// Who may fetch a media item's bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Visibility {
    /// Anyone with the URL; served `public, immutable` and cached by the CDN.
    #[default]
    Public,
    /// Only through signed URLs that expire. Objects live under `private/`.
    Private,
}

/// `MediaUploaded` plus its visibility.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MediaUploadedWithVisibility {
    /// The upload, as `MediaUploaded` records it.
    pub upload: MediaUploaded,
    /// Who may fetch the media's bytes.
    pub visibility: Visibility,
}

/// The processor made the variants and read the metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MediaProcessed {
    /// Dimensions after the EXIF orientation was applied, in pixels.
    pub width: u32,
    /// Height in pixels, after the EXIF orientation was applied.
    pub height: u32,
    /// The BlurHash placeholder of the image (4×3 components).
    pub blurhash: String,
    /// The stored renditions (`thumb`, `small`, `large`).
    pub variants: Vec<VariantInfo>,
    /// The EXIF fields read from the original.
    pub exif: ExifSummary,
}

/// One stored rendition of an original.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VariantInfo {
    /// `thumb`, `small` or `large` for an image variant; the height, such as `720p`, for a
    /// video's web rendition.
    pub name: String,
    /// Content-addressed key: `variants/{sha256 of the original}/{name}.{ext}`.
    pub key: String,
    /// Width of the rendition, in pixels.
    pub width: u32,
    /// Height of the rendition, in pixels.
    pub height: u32,
    /// The rendition's media type, such as `image/jpeg` or `video/mp4`.
    pub content_type: String,
    /// Size of the stored rendition, in bytes.
    pub bytes: u64,
}

/// The EXIF fields Conveyor exposes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ExifSummary {
    /// EXIF `Make`: the camera's manufacturer, as written by the camera.
    pub camera_make: Option<String>,
    /// EXIF `Model`: the camera's model name, as written by the camera.
    pub camera_model: Option<String>,
    /// `DateTimeOriginal` as written by the camera (`YYYY:MM:DD HH:MM:SS`).
    pub taken_at: Option<String>,
}

/// A long job's progress. Its version is its upload's (not one past it, as an outcome's
/// is), so any outcome replaces it, in whatever order they arrive; among progress events of
/// one job the highest percentage stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MediaProcessingProgress {
    /// 0 to 100.
    pub percent: u8,
}

/// The transcoder's outcome for a video: what `MediaProcessed` says of a photo, for its poster
/// frame, plus the video's own metadata and its web renditions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VideoProcessed {
    /// Display dimensions, with the container's rotation applied, in pixels.
    pub width: u32,
    /// Display height in pixels, with the container's rotation applied.
    pub height: u32,
    /// Of the poster frame.
    pub blurhash: String,
    /// The poster frame's image variants (`thumb`, `small`, `large`), as for a photo.
    pub variants: Vec<VariantInfo>,
    /// Length of the video, in milliseconds.
    pub duration_ms: u64,
    /// ffprobe's name of the video stream's codec, such as `h264`, `hevc`, `vp9` (`unknown`
    /// when ffprobe names none).
    pub video_codec: String,
    /// ffprobe's name of the first audio stream's codec, such as `aac`; `None` for a silent
    /// video.
    pub audio_codec: Option<String>,
    /// Frames per second × 1000 (29.97 fps is 29970), from the stream's average frame rate.
    pub frame_rate_milli: u32,
    /// The original's overall bitrate, in bits per second.
    pub bitrate: u64,
    /// Clockwise rotation the container asks players to apply (0, 90, 180 or 270).
    pub rotation: u16,
    /// The web renditions (H.264 and AAC in MP4 with `faststart`), named by height (`720p`),
    /// largest first. Keys: `variants/{sha256 of the original}/{name}.mp4`.
    pub renditions: Vec<VariantInfo>,
}

/// The processor or the transcoder could not read the media; clients see `status: failed` and
/// the reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MediaProcessingFailed {
    /// Why, in words a client can show (e.g. `truncated jpeg`).
    pub reason: String,
}

/// Title, description and tags, set by internal producers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MediaDescribed {
    /// The title. The event replaces the whole description; with `None` the read models
    /// show the title given at upload, if any.
    pub title: Option<String>,
    /// The description; `None` clears it.
    pub description: Option<String>,
    /// The tags, in the producer's order; absent in JSON means none.
    #[serde(default)]
    pub tags: Vec<String>,
}

/// The media was deleted. Read models keep a tombstone at this version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MediaDeleted {
    /// Who asked for the delete: the owner, or an internal producer's name.
    pub deleted_by: String,
}

impl Envelope {
    /// A new event from the outside world: a UUIDv7 id, `version` as given (callers take it
    /// from a version clock, in microseconds since the Unix epoch), and `occurred_at` equal to
    /// that version.
    pub fn new(aggregate_id: Uuid, version: u64, producer: &str, payload: Event) -> Self {
        Envelope {
            event_id: Uuid::now_v7(),
            aggregate_id,
            version,
            occurred_at: version as i64,
            producer: producer.to_owned(),
            schema_version: SCHEMA_VERSION,
            payload,
        }
    }

    /// The progress of the job `self` (an upload) caused: its id is a function of the cause
    /// and the percentage, so a retried job repeats ids rather than adding events, and its
    /// version is the cause's own, below the outcome's ([`MediaProcessingProgress`]).
    pub fn progress(&self, producer: &str, occurred_at: i64, percent: u8) -> Self {
        let name = format!("{}/MediaProcessingProgress/{percent}", self.event_id);
        Envelope {
            event_id: Uuid::new_v5(&DERIVED_NAMESPACE, name.as_bytes()),
            aggregate_id: self.aggregate_id,
            version: self.version,
            occurred_at,
            producer: producer.to_owned(),
            schema_version: SCHEMA_VERSION,
            payload: Event::MediaProcessingProgress(MediaProcessingProgress {
                percent: percent.min(100),
            }),
        }
    }

    /// An event caused by `self`. Its id and version are functions of the cause, so handling
    /// the same cause twice produces the same event, and its version orders after the cause.
    pub fn derive(&self, producer: &str, occurred_at: i64, payload: Event) -> Self {
        let name = format!("{}/{}", self.event_id, payload.type_name());
        Envelope {
            event_id: Uuid::new_v5(&DERIVED_NAMESPACE, name.as_bytes()),
            aggregate_id: self.aggregate_id,
            version: self.version + 1,
            occurred_at,
            producer: producer.to_owned(),
            schema_version: SCHEMA_VERSION,
            payload,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_events_are_deterministic_and_ordered_after_their_cause() {
        let cause = Envelope::new(
            Uuid::now_v7(),
            1_000,
            "ingest",
            Event::MediaDeleted(MediaDeleted {
                deleted_by: "a".into(),
            }),
        );
        let failed = || {
            Event::MediaProcessingFailed(MediaProcessingFailed {
                reason: "truncated".into(),
            })
        };
        let a = cause.derive("processor", 5, failed());
        let b = cause.derive("processor", 9, failed());
        assert_eq!(a.event_id, b.event_id);
        assert_eq!(a.version, 1_001);
        assert_eq!(a.aggregate_id, cause.aggregate_id);
        assert_ne!(a.event_id, cause.event_id);
    }
}
