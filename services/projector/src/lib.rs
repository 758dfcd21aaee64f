//! The projector: folds `media.events` into the read models, as consumer group `projector`.
//!
//! One partition's records are applied in offset order, in batches: each batch is one write
//! to the read store, and its offsets are committed only after that write returns. The store's
//! fold is idempotent and order-insensitive, so redelivery after a crash changes nothing.

use std::sync::Arc;

use async_trait::async_trait;
use conveyor_platform::changes::Changes;
use conveyor_platform::config::Settings;
use conveyor_platform::consumer::{
    self, ConsumerConfig, HandleError, Handler, JobResult, KindedJobResult,
};
use conveyor_platform::events::from_delivered;
use conveyor_platform::log::Delivered;
use conveyor_platform::{EventLog, ReadStore};
use conveyor_schemas::Envelope;
use tokio_util::sync::CancellationToken;

pub struct Projector {
    views: Arc<dyn ReadStore>,
    changes: Changes,
}

impl Projector {
    /// A projector writing to `views`, announcing what it wrote on `changes`.
    pub fn new(views: Arc<dyn ReadStore>, changes: Changes) -> Self {
        Projector { views, changes }
    }

    pub fn consumer_config(settings: &Settings) -> ConsumerConfig {
        let mut config = ConsumerConfig::new(settings.topic(), &settings.projector.group);
        // One batch per partition at a time: read models are written in log order.
        config.per_partition = 1;
        config.max_batch = settings.projector.batch.max(1);
        config.max_attempts = settings.log.max_attempts;
        config
    }

    /// Runs the projector group until `stop` is cancelled.
    pub async fn run(
        self,
        log: Arc<dyn EventLog>,
        settings: &Settings,
        stop: CancellationToken,
    ) -> anyhow::Result<()> {
        consumer::run(log, Self::consumer_config(settings), Arc::new(self), stop).await
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
