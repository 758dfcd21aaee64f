//! Envelopes on the log: how an [`Envelope`] becomes a [`Record`] and back.

use conveyor_schemas::{Codec, DecodeError, Envelope};

use crate::log::{Delivered, Record};

/// Encodes an envelope as a bincode record keyed by its aggregate id, with the headers every
/// consumer (and Kafka tooling) can read without decoding the value.
pub fn to_record(envelope: &Envelope) -> Record {
    to_record_with(envelope, Codec::Bincode)
}

/// Encodes an envelope in `codec` as a record keyed by its aggregate id (the UUID as text,
/// so one item's events share a partition), with the `content-type` (the codec's),
/// `event-type` and `schema-version` headers. [`to_record`] is this with bincode.
pub fn to_record_with(envelope: &Envelope, codec: Codec) -> Record {
    Record {
        key: envelope.aggregate_id.to_string().into_bytes(),
        headers: vec![
            ("content-type".to_owned(), codec.content_type().to_owned()),
            (
                "event-type".to_owned(),
                envelope.payload.type_name().to_owned(),
            ),
            (
                "schema-version".to_owned(),
                envelope.schema_version.to_string(),
            ),
        ],
        value: codec.encode(envelope).into(),
    }
}

/// Decodes a record with the codec its `content-type` header names.
pub fn from_delivered(record: &Delivered) -> Result<Envelope, DecodeError> {
    Codec::from_content_type(record.header("content-type"))?.decode(&record.value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use conveyor_schemas::{Event, MediaDeleted};

    #[test]
    fn records_round_trip_in_both_codecs() {
        let envelope = Envelope::new(
            uuid::Uuid::now_v7(),
            7,
            "test",
            Event::MediaDeleted(MediaDeleted {
                deleted_by: "alice".into(),
            }),
        );
        for codec in [Codec::Bincode, Codec::Json] {
            let record = to_record_with(&envelope, codec);
            assert_eq!(record.key, envelope.aggregate_id.to_string().into_bytes());
            assert_eq!(record.header("event-type"), Some("MediaDeleted"));
            let delivered = Delivered {
                topic: "t".into(),
                partition: 0,
                offset: 0,
                key: record.key.clone(),
                headers: record.headers.clone(),
                value: record.value.clone(),
                timestamp: 0,
            };
            assert_eq!(from_delivered(&delivered).unwrap(), envelope);
        }
    }
}
