//! Read-model rows: what projectors write and the query edge reads.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::event::{ExifSummary, VariantInfo, VideoProcessed};

/// Where a media item is in the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MediaStatus {
    /// Waiting for its processor (or transcoder).
    Pending,
    /// A long job is under way; `progress` says how far.
    Processing,
    /// Done: its variants (and, for a video, its renditions) are stored.
    Processed,
    /// Its processor or transcoder could not read it; `failure_reason` says why.
    Failed,
}

/// One row of `media_by_id`, and one entry of an owner's timeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MediaRow {
    /// The media id (its events' `aggregate_id`).
    pub id: Uuid,
    /// The uploader's key name.
    pub owner: String,
    /// Where the item is in the pipeline.
    pub status: MediaStatus,
    /// The original's media type, sniffed from its bytes at upload.
    pub content_type: String,
    /// Size of the original, in bytes.
    pub bytes: u64,
    /// Hex sha256 of the original bytes.
    pub sha256: String,
    /// Object key of the original (`originals/{sha256}`, under `private/` for private media).
    pub original_key: String,
    /// Width in pixels, upright (EXIF orientation or container rotation applied); `None`
    /// until processed.
    pub width: Option<u32>,
    /// Height in pixels, upright; `None` until processed.
    pub height: Option<u32>,
    /// The described title, or else the title given at upload.
    pub title: Option<String>,
    /// The described description, if any.
    pub description: Option<String>,
    /// The described tags; empty when there are none.
    pub tags: Vec<String>,
    /// The BlurHash placeholder (of the poster frame, for a video); `None` until processed.
    pub blurhash: Option<String>,
    /// The image variants (a video's are of its poster frame); empty until processed.
    pub variants: Vec<VariantInfo>,
    /// A processed photo's EXIF fields; `None` otherwise (also for videos).
    pub exif: Option<ExifSummary>,
    /// Why processing failed, while `status` is `failed`.
    pub failure_reason: Option<String>,
    /// How far the transcode has come, 0–100, while `status` is `processing`.
    #[serde(default)]
    pub progress: Option<u8>,
    /// A video's metadata and renditions, once transcoded.
    #[serde(default)]
    pub video: Option<VideoSummary>,
    /// Private media is served only through signed URLs.
    #[serde(default)]
    pub private: bool,
    /// Microseconds since the Unix epoch: the `MediaUploaded` version.
    pub created_at: i64,
}

/// What a transcoded video adds to its row ([`VideoProcessed`] without what every processed
/// item has).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VideoSummary {
    /// Length of the video, in milliseconds.
    pub duration_ms: u64,
    /// ffprobe's name of the video codec, such as `h264` or `hevc`.
    pub video_codec: String,
    /// ffprobe's name of the audio codec, such as `aac`; `None` for a silent video.
    pub audio_codec: Option<String>,
    /// Frames per second × 1000.
    pub frame_rate_milli: u32,
    /// Bits per second, of the original.
    pub bitrate: u64,
    /// Clockwise degrees the original asks players to rotate by; the renditions and poster
    /// are already upright.
    pub rotation: u16,
    /// The web renditions (MP4), named by height (`720p`), largest first.
    pub renditions: Vec<VariantInfo>,
}

impl From<&VideoProcessed> for VideoSummary {
    fn from(v: &VideoProcessed) -> Self {
        VideoSummary {
            duration_ms: v.duration_ms,
            video_codec: v.video_codec.clone(),
            audio_codec: v.audio_codec.clone(),
            frame_rate_milli: v.frame_rate_milli,
            bitrate: v.bitrate,
            rotation: v.rotation,
            renditions: v.renditions.clone(),
        }
    }
}

/// `owner_stats`: live (not deleted) media of one owner.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerStats {
    /// How many live media items the owner has.
    pub media_count: u64,
    /// The sum of their originals' sizes, in bytes (variants not counted).
    pub bytes: u64,
}

/// One page of `media_by_owner`, newest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimelinePage {
    /// The page's rows, newest first.
    pub items: Vec<MediaRow>,
    /// Position after the last item, if there may be more: `(created_at, id)`.
    pub next: Option<(i64, Uuid)>,
}
