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
    /// The producer's own id for the event. A retry with the same id and event is replayed
    /// rather than appended again; absent, Conveyor assigns one (a UUIDv7).
    #[serde(default)]
    pub event_id: Option<Uuid>,
    /// The event itself.
    pub payload: ProducerEvent,
}

/// The events producers own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub enum ProducerEvent {
    /// Describes the item: appended as a `MediaDescribed` event.
    MediaDescribed(Described),
    /// Deletes the item: appended as a `MediaDeleted` event.
    MediaDeleted(Deleted),
}

/// Sets the title, description and tags, replacing any earlier description; `null` clears
/// one (a `null` title shows the title given at upload again, if there was one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Described {
    /// The title; `null` or absent falls back to the upload's title.
    pub title: Option<String>,
    /// The description; `null` or absent means none.
    pub description: Option<String>,
    /// The tags; absent means none.
    #[serde(default)]
    pub tags: Vec<String>,
}

/// Deletes the item on behalf of `deleted_by`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Deleted {
    /// Who asked for the delete, as the producer names them; kept in the `MediaDeleted`
    /// event.
    pub deleted_by: String,
}

/// `POST /v1/events`'s body: one event, or an array of them appended together. (It is read by
/// its first byte, not as an untagged enum, so that errors keep their JSON path.)
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum IncomingEvents {
    /// A JSON object: one event.
    One(IncomingEvent),
    /// A JSON array: events appended together, in order.
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
