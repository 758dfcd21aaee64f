//! The processor: Conveyor's task queue for image work. It runs as consumer group
//! `processor` on `media.events`; for each `MediaUploaded` of an image (video is the
//! transcoder's, in a group of its own) it renders the variants, stores
//! them content-addressed, and appends `MediaProcessed`, or `MediaProcessingFailed` with a
//! reason when the media cannot be read.
//!
//! [`render`] is the pure image pipeline; [`Processor`] is the consumer-group handler around it.
#![warn(missing_docs)]

pub mod render;

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use conveyor_config::{Limits, Settings};
use conveyor_runtime::Stage;
use conveyor_runtime::consumer::{
    ConsumerConfig, HandleError, Handler, JobResult, KindedJobResult,
};
use conveyor_runtime::trace::traced;
use conveyor_schemas::{
    Envelope, Event, MediaProcessed, MediaProcessingFailed, MediaUploaded, VariantInfo, Visibility,
};
use conveyor_storage::clock::now_micros;
use conveyor_storage::events::{from_delivered, to_record};
use conveyor_storage::log::Delivered;
use conveyor_storage::objects::ObjectError;
use conveyor_storage::{Backends, EventLog, ObjectStore};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

pub use render::{Header, MediaError, Rendered, probe, render, thumbnail};

/// Handles `MediaUploaded`; every other event is acknowledged untouched.
pub struct Processor {
    objects: Arc<dyn ObjectStore>,
    log: Arc<dyn EventLog>,
    limits: Limits,
    topic: String,
    /// Bounds the images decoded at once: decoding is CPU- and memory-heavy.
    cpu: Arc<Semaphore>,
    /// The group's consumer settings ([`Processor::consumer_config`]).
    config: ConsumerConfig,
}

impl Processor {
    /// A processor on `backends`, with the limits, worker count and group of `settings`.
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
            config: Self::consumer_config(settings),
        }
    }

    /// The consumer settings a processor runs with.
    pub fn consumer_config(settings: &Settings) -> ConsumerConfig {
        let mut config = ConsumerConfig::new(settings.topic(), &settings.processor.group);
        config.per_partition = settings.processor.per_partition.max(1);
        config.max_batch = 1;
        // Each record is a whole image; do not buffer thousands of them.
        config.max_buffered = 256;
        config
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
            .append(&self.topic, vec![traced(to_record(&derived))])
            .await
            .by_kind("failed to append the outcome")?;
        // By the two processes' clocks: the ingest replica's and this one's.
        metrics::histogram!("conveyor_upload_to_processed_seconds", "stage" => "processor")
            .record(derived.occurred_at.saturating_sub(cause.occurred_at).max(0) as f64 / 1e6);
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
        // The whole original, at most `max_upload_bytes`: headers may sit behind megabytes of
        // metadata (phones' depth maps in extended XMP), and libvips reads from memory.
        let original = match self.objects.get_bytes(&upload.original_key).await {
            Ok(bytes) => bytes,
            Err(ObjectError::NotFound) => return Ok(Err(MediaError::Missing)),
            Err(e) => return Err(e).by_kind("failed to read the original"),
        };
        if original.len() as u64 > self.limits.max_upload_bytes {
            return Ok(Err(MediaError::TooLarge(original.len() as u64)));
        }
        let permit = self
            .cpu
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore is never closed");
        let limits = self.limits.clone();
        let limit_ms = limits.max_render_ms;
        // The header checks run here too, off the async threads: a PNG's chunks or a GIF's
        // frames are walked before anything is decoded, and that is CPU work.
        let rendering = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            render(&original, &limits)
        });
        // The render's own watchdog stops libvips between tiles; a decoder inside one long
        // call (libheif decoding a grid) is not stopped by it. The job still ends at the
        // limit, with a grace second: its thread finishes in the background, holding its
        // worker slot until then, so renders at once stay bounded.
        let grace = std::time::Duration::from_millis(limit_ms.saturating_add(1_000));
        let rendered = match tokio::time::timeout(grace, rendering).await {
            Ok(joined) => joined,
            Err(_) => return Ok(Err(MediaError::TimedOut { limit_ms })),
        };
        // A decoder that panics on these bytes panics on them again.
        let rendered = match rendered {
            Err(e) if e.is_panic() => return Err(e).abort("the renderer panicked"),
            other => other.retry("the render task was cancelled")?,
        };
        let rendered = match rendered {
            Ok(r) => r,
            Err(e) if e.is_permanent() => return Ok(Err(e)),
            Err(e) => return Err(e).retry("the image engine failed"),
        };
        let variants = store_variants(
            &*self.objects,
            &upload.sha256,
            visibility,
            &rendered.variants,
        )
        .await?;
        Ok(Ok((rendered, variants)))
    }
}

/// The key of an original's derived file `name.extension`:
/// `variants/{sha256 of the original}/{name}.{extension}`, under `private/` for private media
/// (served only through signed URLs). Content-addressed: a redelivered upload rewrites the
/// same bytes under the same key.
pub fn variant_key(sha256: &str, visibility: Visibility, name: &str, extension: &str) -> String {
    let prefix = match visibility {
        Visibility::Private => "private/",
        Visibility::Public => "",
    };
    format!("{prefix}variants/{sha256}/{name}.{extension}")
}

/// Stores rendered variants of the original `sha256` under [`variant_key`]s.
///
/// # Errors
/// The store's, by kind: transient ones are retried by the consumer.
pub async fn store_variants(
    objects: &dyn ObjectStore,
    sha256: &str,
    visibility: Visibility,
    rendered: &[render::Variant],
) -> Result<Vec<VariantInfo>, HandleError> {
    let mut variants = Vec::with_capacity(rendered.len());
    for v in rendered {
        let key = variant_key(sha256, visibility, v.name, v.extension);
        objects
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
    Ok(variants)
}

/// Whether an upload's sniffed type is a video container.
pub fn is_video(content_type: &str) -> bool {
    conveyor_storage::media::MediaType::from_content_type(content_type)
        .is_some_and(|media| media.is_video())
}

#[async_trait]
impl Stage for Processor {
    fn name(&self) -> &'static str {
        "processor"
    }

    fn consumer_config(&self) -> ConsumerConfig {
        self.config.clone()
    }

    /// Starts libvips ([`render::init`]).
    async fn prepare(&mut self, _stop: &CancellationToken) -> anyhow::Result<()> {
        Ok(render::init()?)
    }
}

#[async_trait]
impl Handler for Processor {
    async fn handle(&self, records: &[Delivered]) -> Result<(), HandleError> {
        for record in records {
            let envelope = from_delivered(record).abort("undecodable record")?;
            // Video is the transcoder group's (`conveyor transcode`).
            if let Some((upload, visibility)) = envelope.payload.upload()
                && !is_video(&upload.content_type)
            {
                self.process(&envelope, upload, visibility).await?;
            }
        }
        Ok(())
    }
}
