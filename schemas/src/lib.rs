//! Conveyor's contracts: the event envelope, the events, their codecs, and the read-model rows.
//!
//! Everything that crosses a process boundary is defined here, so that producers, processors,
//! projectors and the query edge agree on one set of types. Events are facts and are never
//! edited: see [`codec`] for how the wire format evolves.
#![warn(missing_docs)]

pub mod codec;
pub mod cql;
pub mod event;
pub mod intake;
pub mod view;

pub use codec::{Codec, DecodeError};
pub use event::{
    Envelope, Event, ExifSummary, MediaDeleted, MediaDescribed, MediaProcessed,
    MediaProcessingFailed, MediaProcessingProgress, MediaUploaded, MediaUploadedWithVisibility,
    SCHEMA_VERSION, VariantInfo, VideoProcessed, Visibility,
};
pub use view::{MediaRow, MediaStatus, OwnerStats, TimelinePage, VideoSummary};

/// The topic every media event is appended to, keyed by media id.
pub const MEDIA_EVENTS: &str = "media.events";
