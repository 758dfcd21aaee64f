//! The projector: folds `media.events` into the read models, as consumer group `projector`.
//!
//! One partition's records are applied in offset order, in batches: each batch is one write
//! to the read store, and its offsets are committed only after that write returns. The store's
//! fold is idempotent and order-insensitive, so redelivery after a crash changes nothing.
#![warn(missing_docs)]

use std::sync::Arc;

use async_trait::async_trait;
use conveyor_config::Settings;
use conveyor_runtime::Stage;
use conveyor_runtime::changes::Changes;
use conveyor_runtime::consumer::{
    ConsumerConfig, HandleError, Handler, JobResult, KindedJobResult,
};
use conveyor_schemas::Envelope;
use conveyor_storage::ReadStore;
use conveyor_storage::events::from_delivered;
use conveyor_storage::log::Delivered;

/// Folds events into the read store, announcing each item it wrote.
pub struct Projector {
    views: Arc<dyn ReadStore>,
    changes: Changes,
    config: ConsumerConfig,
}

impl Projector {
    /// A projector writing to `views`, announcing what it wrote on `changes`, in the group and
    /// with the batch size of `settings`.
    pub fn new(views: Arc<dyn ReadStore>, changes: Changes, settings: &Settings) -> Self {
        Projector {
            views,
            changes,
            config: Self::consumer_config(settings),
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

#[async_trait]
impl Handler for Projector {
    async fn handle(&self, records: &[Delivered]) -> Result<(), HandleError> {
        let events: Vec<Envelope> = records
            .iter()
            .map(from_delivered)
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
