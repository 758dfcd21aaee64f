//! The intake for internal producers (`POST /v1/events`): the events they may send, in the
//! log's JSON layout, refusing any field the log's types lack, so a misspelt `"titel"` is an
//! error rather than an event that blanks the title.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::event::{Event, MediaDeleted, MediaDescribed};

/// An event from an internal producer. Conveyor assigns the version and time; the producer
/// may give an `event_id` to make retries of its own idempotent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IncomingEvent {
    /// The media id.
    pub aggregate_id: Uuid,
    #[serde(default)]
    pub event_id: Option<Uuid>,
    pub payload: ProducerEvent,
}

/// The events producers own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub enum ProducerEvent {
    MediaDescribed(Described),
    MediaDeleted(Deleted),
}

/// Sets the title, description and tags; `null` clears one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Described {
    pub title: Option<String>,
    pub description: Option<String>,
    #[serde(default)]
    pub tags: Vec<String>,
}

/// Deletes the item on behalf of `deleted_by`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Deleted {
    pub deleted_by: String,
}

/// `POST /v1/events`'s body: one event, or an array of them appended together. (It is read by
/// its first byte, not as an untagged enum, so that errors keep their JSON path.)
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum IncomingEvents {
    One(IncomingEvent),
    Many(Vec<IncomingEvent>),
}

impl From<ProducerEvent> for Event {
    fn from(event: ProducerEvent) -> Event {
        match event {
            ProducerEvent::MediaDescribed(d) => Event::MediaDescribed(MediaDescribed {
                title: d.title,
                description: d.description,
                tags: d.tags,
            }),
            ProducerEvent::MediaDeleted(d) => Event::MediaDeleted(MediaDeleted {
                deleted_by: d.deleted_by,
            }),
        }
    }
}
