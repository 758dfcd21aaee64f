//! One shape for every consumer group: a [`Stage`] is a [`Handler`] that also knows its
//! name, its consumer settings, and what it prepares before its first record. The processor,
//! the transcoder, the projector and the archiver are stages; a role's wiring lists the stages
//! it runs, starts each with [`run`], and reports the lag of each one's group.
//!
//! A new consumer group is a crate with a type that implements `Stage`, and one line in the
//! wiring (`conveyor::app`).

use std::sync::Arc;

use async_trait::async_trait;
use conveyor_storage::EventLog;
use tokio_util::sync::CancellationToken;

use crate::consumer::{self, ConsumerConfig, Handler};

/// A consumer group's member: the work it does on each batch ([`Handler::handle`]), and what
/// the runtime needs to run it.
#[async_trait]
pub trait Stage: Handler {
    /// The worker's name, for logs and for the error that stops the process when it fails
    /// (`"processor"`).
    fn name(&self) -> &'static str;

    /// The topic and group it consumes, and its batch, concurrency and retry bounds.
    fn consumer_config(&self) -> ConsumerConfig;

    /// Runs once before the first record is fetched: checks the tools the stage needs, makes
    /// its working directories. `stop` is the token that will stop the group; a stage that
    /// must notice a shutdown mid-record keeps it. The default does nothing.
    ///
    /// # Errors
    /// Whatever keeps the stage from working at all; the process then stops, naming it, before
    /// it joins the group.
    async fn prepare(&mut self, stop: &CancellationToken) -> anyhow::Result<()> {
        let _ = stop;
        Ok(())
    }
}

/// Prepares `stage`, then runs it as a member of its group on `log` until `stop` is
/// cancelled.
///
/// # Errors
/// From [`Stage::prepare`], then as [`consumer::run`].
pub async fn run(
    log: Arc<dyn EventLog>,
    mut stage: Box<dyn Stage>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    stage.prepare(&stop).await?;
    let config = stage.consumer_config();
    let handler: Arc<dyn Handler> = Arc::<dyn Stage>::from(stage);
    consumer::run(log, config, handler, stop).await
}
