//! The projector: folds `media.events` into the read models, as consumer group `projector`.
//!
//! One partition's records are applied in offset order, in batches: each batch is one write
//! to the read store, and its offsets are committed only after that write returns. Offset order
//! is what orders an item's descriptions (the fold in `conveyor_storage::views`), and a
//! redelivered suffix ends where it ended, so redelivery after a crash changes nothing.
//!
//! No clock of this process takes part: each event's version is bounded by its own record's
//! append time ([`clamp_to_log_time`]), never refused for being ahead of this clock.
#![warn(missing_docs)]

use std::sync::Arc;

use async_trait::async_trait;
use conveyor_config::Settings;
use conveyor_runtime::Stage;
use conveyor_runtime::changes::Changes;
use conveyor_runtime::consumer::{
    ConsumerConfig, HandleError, Handler, JobResult, KindedJobResult,
};
use conveyor_schemas::{DecodeError, Envelope};
use conveyor_storage::ReadStore;
use conveyor_storage::events::from_delivered;
use conveyor_storage::log::Delivered;
use conveyor_storage::views::clamp_to_log_time;

/// Folds events into the read store, announcing each item it wrote.
pub struct Projector {
    views: Arc<dyn ReadStore>,
    changes: Changes,
    config: ConsumerConfig,
    /// `views.max_version_ahead_secs`, in µs.
    max_ahead: u64,
}

impl Projector {
    /// A projector writing to `views`, announcing what it wrote on `changes`, in the group and
    /// with the batch size of `settings`.
    pub fn new(views: Arc<dyn ReadStore>, changes: Changes, settings: &Settings) -> Self {
        Projector {
            views,
            changes,
            config: Self::consumer_config(settings),
            max_ahead: settings
                .views
                .max_version_ahead_secs
                .saturating_mul(1_000_000),
        }
    }

    /// The consumer settings a projector runs with: one batch per partition at a time, of up
    /// to `projector.batch` events.
    pub fn consumer_config(settings: &Settings) -> ConsumerConfig {
        let mut config = ConsumerConfig::new(settings.topic(), &settings.projector.group);
        // One batch per partition at a time: read models are written in log order.
        config.per_partition = 1;
        config.max_batch = settings.projector.batch.max(1);
        config
    }
}

impl Stage for Projector {
    fn name(&self) -> &'static str {
        "projector"
    }

    fn consumer_config(&self) -> ConsumerConfig {
        self.config.clone()
    }
}

/// The event `record` holds, as projected: its version lowered to `max_ahead` µs past the
/// record's append time if it is further ahead ([`clamp_to_log_time`]; counted in
/// `conveyor_versions_clamped_total`). A record without an append time (0 or less) is not
/// clamped. Every path into the read models decodes with this: the projector, and a replay
/// from the archive, so both build the same rows.
///
/// # Errors
/// A record that is not an event.
pub fn projected_event(record: &Delivered, max_ahead: u64) -> Result<Envelope, DecodeError> {
    let mut event = from_delivered(record)?;
    if record.timestamp <= 0 {
        return Ok(event);
    }
    let bounded = clamp_to_log_time(event.version, record.timestamp, max_ahead);
    if bounded < event.version {
        metrics::counter!("conveyor_versions_clamped_total").increment(1);
        tracing::warn!(
            event_id = %event.event_id,
            producer = %event.producer,
            version = event.version,
            appended_at = record.timestamp,
            "an event's version is further ahead of its record's append time than \
             views.max_version_ahead_secs; lowered to that bound"
        );
        event.version = bounded;
    }
    Ok(event)
}

#[async_trait]
impl Handler for Projector {
    async fn handle(&self, records: &[Delivered]) -> Result<(), HandleError> {
        let events: Vec<Envelope> = records
            .iter()
            .map(|record| projected_event(record, self.max_ahead))
            .collect::<Result<_, _>>()
            .abort("undecodable record")?;
        self.views
            .apply(&events)
            .await
            .by_kind("failed to write read models")?;
        metrics::counter!("conveyor_projected_events_total").increment(events.len() as u64);
        for event in &events {
            self.changes.publish(event.aggregate_id);
        }
        Ok(())
    }
}
