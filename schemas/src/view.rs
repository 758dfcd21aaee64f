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
    Processed,
    Failed,
}

/// One row of `media_by_id`, and one entry of an owner's timeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MediaRow {
    pub id: Uuid,
    pub owner: String,
    pub status: MediaStatus,
    pub content_type: String,
    pub bytes: u64,
    pub sha256: String,
    pub original_key: String,
    pub width: Option<u32>,
    pub height: Option<u32>,
    pub title: Option<String>,
    pub description: Option<String>,
    pub tags: Vec<String>,
    pub blurhash: Option<String>,
    pub variants: Vec<VariantInfo>,
    pub exif: Option<ExifSummary>,
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
    pub duration_ms: u64,
    pub video_codec: String,
    pub audio_codec: Option<String>,
    /// Frames per second × 1000.
    pub frame_rate_milli: u32,
    /// Bits per second, of the original.
    pub bitrate: u64,
    /// Clockwise degrees the original asks players to rotate by; the renditions and poster
    /// are already upright.
    pub rotation: u16,
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
    pub media_count: u64,
    pub bytes: u64,
}

/// One page of `media_by_owner`, newest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimelinePage {
    pub items: Vec<MediaRow>,
    /// Position after the last item, if there may be more: `(created_at, id)`.
    pub next: Option<(i64, Uuid)>,
}
