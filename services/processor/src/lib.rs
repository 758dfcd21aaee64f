//! The processor: Conveyor's task queue for heavy media work. It runs as consumer group
//! `processor` on `media.events`; for each `MediaUploaded` it renders the variants, stores
//! them content-addressed, and appends `MediaProcessed`, or `MediaProcessingFailed` with a
//! reason when the media cannot be read.
//!
//! [`render`] is the pure image pipeline; [`Processor`] is the consumer-group handler around it.

pub mod render;

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use conveyor_platform::clock::now_micros;
use conveyor_platform::config::{Limits, Settings};
use conveyor_platform::consumer::{
    self, ConsumerConfig, HandleError, Handler, JobResult, KindedJobResult,
};
use conveyor_platform::events::{from_delivered, to_record};
use conveyor_platform::log::Delivered;
use conveyor_platform::objects::ObjectError;
use conveyor_platform::{Backends, EventLog, ObjectStore};
use conveyor_schemas::{
    Envelope, Event, MediaProcessed, MediaProcessingFailed, MediaUploaded, VariantInfo, Visibility,
};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

pub use render::{MediaError, Rendered, render, thumbnail};

/// Handles `MediaUploaded`; every other event is acknowledged untouched.
pub struct Processor {
    objects: Arc<dyn ObjectStore>,
    log: Arc<dyn EventLog>,
    limits: Limits,
    topic: String,
    /// Bounds the images decoded at once: decoding is CPU- and memory-heavy.
    cpu: Arc<Semaphore>,
}

impl Processor {
    pub fn new(backends: &Backends, settings: &Settings) -> Self {
        let workers = match settings.processor.workers {
            0 => std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2),
            n => n,
        };
        Processor {
            objects: backends.objects.clone(),
            log: backends.log.clone(),
            limits: settings.limits.clone(),
            topic: settings.topic().to_owned(),
            cpu: Arc::new(Semaphore::new(workers)),
        }
    }

    /// The consumer settings a processor runs with.
    pub fn consumer_config(settings: &Settings) -> ConsumerConfig {
        let mut config = ConsumerConfig::new(settings.topic(), &settings.processor.group);
        config.per_partition = settings.processor.per_partition.max(1);
        config.max_batch = 1;
        config.max_attempts = settings.log.max_attempts;
        // Each record is a whole image; do not buffer thousands of them.
        config.max_buffered = 256;
        config
    }

    /// Runs the processor group until `stop` is cancelled.
    pub async fn run(self, settings: &Settings, stop: CancellationToken) -> anyhow::Result<()> {
        let log = self.log.clone();
        consumer::run(log, Self::consumer_config(settings), Arc::new(self), stop).await
    }

    #[tracing::instrument(skip_all, fields(media_id = %cause.aggregate_id))]
    async fn process(
        &self,
        cause: &Envelope,
        upload: &MediaUploaded,
        visibility: Visibility,
    ) -> Result<(), HandleError> {
        let started = std::time::Instant::now();
        let outcome = match self.render(upload, visibility).await? {
            Ok((rendered, variants)) => Event::MediaProcessed(MediaProcessed {
                width: rendered.width,
                height: rendered.height,
                blurhash: rendered.blurhash,
                variants,
                exif: rendered.exif,
            }),
            Err(error) => {
                tracing::info!(reason = %error, "media could not be processed");
                Event::MediaProcessingFailed(MediaProcessingFailed {
                    reason: error.to_string(),
                })
            }
        };
        let kind = outcome.type_name();
        let derived = cause.derive("processor", now_micros(), outcome);
        self.log
            .append(&self.topic, vec![to_record(&derived)])
            .await
            .by_kind("failed to append the outcome")?;
        metrics::counter!("conveyor_processed_total", "outcome" => kind).increment(1);
        metrics::histogram!("conveyor_process_seconds").record(started.elapsed().as_secs_f64());
        Ok(())
    }

    /// Renders and stores the variants. The outer error is the infrastructure's (retry); the
    /// inner one is the media's (report it as failed).
    async fn render(
        &self,
        upload: &MediaUploaded,
        visibility: Visibility,
    ) -> Result<Result<(Rendered, Vec<VariantInfo>), MediaError>, HandleError> {
        if upload.bytes > self.limits.max_upload_bytes {
            return Ok(Err(MediaError::TooLarge(upload.bytes)));
        }
        // Check the header against the limits from the first bytes only, so an oversized or
        // bogus original is refused without being read into memory.
        let head = match self.read_head(&upload.original_key).await? {
            Some(head) => head,
            None => return Ok(Err(MediaError::Missing)),
        };
        if let Err(e) = render::probe(&head, &self.limits) {
            return Ok(Err(e));
        }
        let original = match self.objects.get_bytes(&upload.original_key).await {
            Ok(bytes) => bytes,
            Err(ObjectError::NotFound) => return Ok(Err(MediaError::Missing)),
            Err(e) => return Err(e).by_kind("failed to read the original"),
        };
        let permit = self
            .cpu
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore is never closed");
        let limits = self.limits.clone();
        let rendered = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            render(&original, &limits)
        })
        .await;
        // A decoder that panics on these bytes panics on them again.
        let rendered = match rendered {
            Err(e) if e.is_panic() => return Err(e).abort("the renderer panicked"),
            other => other.retry("the render task was cancelled")?,
        };
        let rendered = match rendered {
            Ok(r) => r,
            Err(e) => return Ok(Err(e)),
        };
        let mut variants = Vec::with_capacity(rendered.variants.len());
        for v in &rendered.variants {
            // Private media's variants are private too: under `private/`, signed URLs only.
            let prefix = if visibility == Visibility::Private {
                "private/"
            } else {
                ""
            };
            let key = format!(
                "{prefix}variants/{}/{}.{}",
                upload.sha256, v.name, v.extension
            );
            // Content-addressed: a redelivered upload rewrites the same bytes under the same key.
            self.objects
                .put_bytes(&key, Bytes::clone(&v.bytes))
                .await
                .by_kind("failed to store a variant")?;
            variants.push(VariantInfo {
                name: v.name.to_owned(),
                key,
                width: v.width,
                height: v.height,
                content_type: v.content_type.to_owned(),
                bytes: v.bytes.len() as u64,
            });
        }
        Ok(Ok((rendered, variants)))
    }
}

/// Bytes read to check an original's header before reading all of it. Every accepted format
/// puts its dimensions well inside this (JPEG after its metadata segments, which are at most
/// a few hundred KiB in practice).
const PROBE_BYTES: u64 = 1 << 20;

impl Processor {
    async fn read_head(&self, key: &str) -> Result<Option<Bytes>, HandleError> {
        use futures::TryStreamExt;
        let object = match self.objects.get(key, Some(0..PROBE_BYTES)).await {
            Ok(o) => o,
            Err(ObjectError::NotFound) => return Ok(None),
            // An empty object has no satisfiable range; its header check fails below.
            Err(ObjectError::RangeNotSatisfiable { .. }) => return Ok(Some(Bytes::new())),
            Err(e) => return Err(e).by_kind("failed to read the original's header"),
        };
        let chunks: Vec<Bytes> = object
            .body
            .try_collect()
            .await
            .retry("failed to read the original's header")?;
        Ok(Some(Bytes::from(chunks.concat())))
    }
}

#[async_trait]
impl Handler for Processor {
    async fn handle(&self, records: &[Delivered]) -> Result<(), HandleError> {
        for record in records {
            let envelope = from_delivered(record).abort("undecodable record")?;
            if let Some((upload, visibility)) = envelope.payload.upload() {
                self.process(&envelope, upload, visibility).await?;
            }
        }
        Ok(())
    }
}
