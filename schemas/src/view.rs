//! Read-model rows: what projectors write and the query edge reads.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::event::{ExifSummary, VariantInfo};

/// Where a media item is in the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MediaStatus {
    Pending,
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
    /// Private media is served only through signed URLs.
    #[serde(default)]
    pub private: bool,
    /// Microseconds since the Unix epoch: the `MediaUploaded` version.
    pub created_at: i64,
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
