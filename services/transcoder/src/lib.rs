//! The transcoder: Conveyor's task queue for video. It runs as consumer group `transcoder`
//! (`video.group`) on the same topic as the processor, with offsets of its own, so a backlog
//! of videos never delays a photo, and each group scales on its own lag. For each upload of a
//! video (the image processor skips those) it:
//!
//! 1. copies the original to a job directory and runs ffprobe on it ([`ffmpeg`] hardens every
//!    run), refusing, before anything is decoded, a file with no video stream or over the
//!    duration, size or stream-count limits;
//! 2. takes a poster frame and renders it as a photo is rendered (thumb, small, large,
//!    blurhash), upright: ffmpeg applies the container's rotation;
//! 3. encodes the web renditions in one ffmpeg run: H.264 and AAC in MP4 with `faststart`,
//!    8-bit 4:2:0, one per rung of `video.ladder` that is no taller than the source;
//! 4. stores them content-addressed beside the poster's variants and appends `VideoProcessed`,
//!    or `MediaProcessingFailed` with a reason a person can read.
//!
//! While it runs it appends `MediaProcessingProgress` at every 10 % and at least every 10 s.
//! A job is killed, and nothing is published for it, when its media is deleted (the read model
//! is checked every [`CANCEL_POLL`]), when its partition is revoked, or when a shutdown's
//! drain ends first; it then runs again, from the start, wherever its record is redelivered.
//! Outputs live in the job directory until every one is finished, and the directory is removed
//! whatever happens (and, after a crash, at the next start).
#![warn(missing_docs)]

pub mod ffmpeg;
pub mod probe;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use conveyor_config::{Limits, Settings, VideoSettings};
use conveyor_runtime::Stage;
use conveyor_runtime::consumer::{
    ConsumerConfig, HandleError, Handler, JobResult, KindedJobResult,
};
use conveyor_runtime::trace::traced;
use conveyor_schemas::{
    Envelope, Event, MediaProcessingFailed, MediaUploaded, VariantInfo, VideoProcessed, Visibility,
};
use conveyor_storage::clock::now_micros;
use conveyor_storage::events::{from_delivered, to_record};
use conveyor_storage::log::Delivered;
use conveyor_storage::media::MediaType;
use conveyor_storage::objects::ObjectError;
use conveyor_storage::views::ReadStore;
use conveyor_storage::{Backends, EventLog, ObjectStore};
use futures::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use ffmpeg::file_arg;
pub use ffmpeg::{MissingTool, Tools};

/// How often a running job checks whether its media was deleted.
pub const CANCEL_POLL: Duration = Duration::from_secs(2);

/// Longest an ffprobe run may take: it reads headers and an index, not frames.
const PROBE_TIMEOUT: Duration = Duration::from_secs(60);

/// Most bytes of ffprobe JSON read: a few KB per stream, and streams are capped.
const MAX_PROBE_JSON: usize = 1 << 20;

/// Progress is appended at every this many percent, and when this long has passed since the
/// last report.
const PROGRESS_STEP: u8 = 10;
const PROGRESS_EVERY: Duration = Duration::from_secs(10);

/// Why a job did not produce renditions.
enum JobError {
    /// The file's fault, for good: published as `MediaProcessingFailed` with this reason.
    Media(String),
    /// The media was deleted, or the process is stopping: nothing is published, and a
    /// redelivery (after a restart) runs the job again.
    Aborted(Abort),
    /// Worth another try: a backend or the machine failed.
    Retry(HandleError),
    /// Ran past the job's time limit; worded with the limit by [`Transcoder::job`].
    TimedOut,
}

impl From<HandleError> for JobError {
    fn from(e: HandleError) -> Self {
        JobError::Retry(e)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Abort {
    Deleted,
    Stopping,
}

/// Handles uploads of video; every other event is acknowledged untouched.
pub struct Transcoder {
    objects: Arc<dyn ObjectStore>,
    log: Arc<dyn EventLog>,
    views: Arc<dyn ReadStore>,
    topic: String,
    video: VideoSettings,
    /// The image limits, for the poster frame's render.
    limits: Limits,
    rungs: Vec<u32>,
    tools: Tools,
    /// Bounds the jobs run at once (`video.jobs`).
    jobs: Arc<Semaphore>,
    /// Where this process's job directories go: `<data_dir>/transcode/<process id>`, its own
    /// ([`JobDirs`]), made in [`Stage::prepare`].
    work_dir: PathBuf,
    /// The lock that says `work_dir` belongs to a live process, held for the process's life.
    work_lock: Option<std::fs::File>,
    /// How long a shutdown lets running jobs finish before killing them.
    drain: Duration,
    /// The group's stop token, given in [`Stage::prepare`]: a shutdown gives running jobs the
    /// drain timeout, then kills them.
    stop: CancellationToken,
    /// The group's consumer settings ([`Transcoder::consumer_config`]).
    config: ConsumerConfig,
}

impl Transcoder {
    /// # Errors
    /// An invalid `video.ladder` (also refused when settings load).
    pub fn new(backends: &Backends, settings: &Settings, tools: Tools) -> anyhow::Result<Self> {
        Ok(Transcoder {
            objects: backends.objects.clone(),
            log: backends.log.clone(),
            views: backends.views.clone(),
            topic: settings.topic().to_owned(),
            video: settings.video.clone(),
            limits: settings.limits.clone(),
            rungs: settings.video.rungs().map_err(anyhow::Error::msg)?,
            tools,
            jobs: Arc::new(Semaphore::new(settings.video.jobs.max(1))),
            work_dir: settings
                .data_dir
                .join("transcode")
                .join(uuid::Uuid::now_v7().simple().to_string()),
            work_lock: None,
            drain: Duration::from_millis(settings.http.drain_timeout_ms),
            stop: CancellationToken::new(),
            config: Self::consumer_config(settings),
        })
    }

    /// The consumer settings a transcoder runs with: one record at a time per partition, few
    /// buffered (each is minutes of work).
    pub fn consumer_config(settings: &Settings) -> ConsumerConfig {
        let mut config = ConsumerConfig::new(settings.topic(), &settings.video.group);
        config.per_partition = 1;
        config.max_batch = 1;
        config.max_buffered = 64;
        config
    }

    #[tracing::instrument(skip_all, fields(media_id = %cause.aggregate_id))]
    async fn transcode(
        &self,
        cause: &Envelope,
        upload: &MediaUploaded,
        visibility: Visibility,
        media: MediaType,
    ) -> Result<(), HandleError> {
        let _permit = self.jobs.acquire().await.expect("never closed");
        let started = Instant::now();
        let abort = self.watch(cause.aggregate_id);
        let result = self
            .job(cause, upload, visibility, media, &abort.token)
            .await;
        abort.token.cancel();
        let outcome = match result {
            Ok(processed) => Event::VideoProcessed(processed),
            Err(JobError::Media(reason)) => {
                tracing::info!(%reason, "video could not be processed");
                Event::MediaProcessingFailed(MediaProcessingFailed { reason })
            }
            Err(JobError::Aborted(Abort::Deleted)) => {
                tracing::info!("video deleted while it was transcoded; job stopped");
                metrics::counter!("conveyor_transcodes_total", "outcome" => "cancelled")
                    .increment(1);
                return Ok(());
            }
            Err(JobError::Aborted(Abort::Stopping)) => {
                // Uncommitted: the job runs again, from the start, after the restart.
                return Err(HandleError::Transient(anyhow::anyhow!(
                    "the transcoder stopped before the job finished"
                )));
            }
            Err(JobError::Retry(e)) => return Err(e),
            // The encode's timeouts are worded with the job's limit by `job`; what is left is
            // ffprobe past its own minute.
            Err(JobError::TimedOut) => {
                let reason = format!(
                    "reading the file took longer than {} s",
                    PROBE_TIMEOUT.as_secs()
                );
                tracing::info!(%reason, "video could not be processed");
                Event::MediaProcessingFailed(MediaProcessingFailed { reason })
            }
        };
        // A delete that came while the outputs were stored still wins.
        if abort.reason() == Some(Abort::Deleted) {
            tracing::info!("video deleted while it was transcoded; nothing published");
            return Ok(());
        }
        let kind = outcome.type_name();
        let derived = cause.derive("transcoder", now_micros(), outcome);
        self.log
            .append(&self.topic, vec![traced(to_record(&derived))])
            .await
            .by_kind("failed to append the outcome")?;
        // By the two processes' clocks: the ingest replica's and this one's.
        metrics::histogram!("conveyor_upload_to_processed_seconds", "stage" => "transcoder")
            .record(derived.occurred_at.saturating_sub(cause.occurred_at).max(0) as f64 / 1e6);
        metrics::counter!("conveyor_transcodes_total", "outcome" => kind).increment(1);
        metrics::histogram!("conveyor_transcode_seconds").record(started.elapsed().as_secs_f64());
        Ok(())
    }

    /// A token cancelled when the media is deleted (its tombstone is in the read model) or
    /// when a shutdown's drain runs out.
    fn watch(&self, id: uuid::Uuid) -> Watch {
        let token = CancellationToken::new();
        let reason = Arc::new(std::sync::OnceLock::new());
        let (views, stop, drain) = (self.views.clone(), self.stop.clone(), self.drain);
        let (job, why) = (token.clone(), reason.clone());
        tokio::spawn(async move {
            let draining = async {
                stop.cancelled().await;
                tokio::time::sleep(drain).await;
            };
            tokio::pin!(draining);
            loop {
                tokio::select! {
                    _ = job.cancelled() => return,
                    _ = &mut draining => {
                        let _ = why.set(Abort::Stopping);
                        break;
                    }
                    _ = tokio::time::sleep(CANCEL_POLL) => {}
                }
                match views.is_deleted(id).await {
                    Ok(true) => {
                        let _ = why.set(Abort::Deleted);
                        break;
                    }
                    Ok(false) => {}
                    Err(e) => {
                        tracing::debug!(error = %e, "could not check for a delete; trying again")
                    }
                }
            }
            job.cancel();
        });
        Watch { token, reason }
    }

    async fn job(
        &self,
        cause: &Envelope,
        upload: &MediaUploaded,
        visibility: Visibility,
        media: MediaType,
        abort: &CancellationToken,
    ) -> Result<VideoProcessed, JobError> {
        if upload.bytes > self.video.max_bytes {
            return Err(JobError::Media(format!(
                "the video is {} bytes, over the limit of {} bytes",
                upload.bytes, self.video.max_bytes
            )));
        }
        let dir = tempfile::Builder::new()
            .prefix(&format!("{}-", cause.aggregate_id))
            .tempdir_in(&self.work_dir)
            .retry("failed to create a job directory")?;
        let original = dir.path().join("original");
        self.fetch(&upload.original_key, &original).await?;

        let probed = ffmpeg::run(
            self.tools.probe(media, &original),
            tokio::time::Instant::now() + PROBE_TIMEOUT,
            abort,
            None,
            MAX_PROBE_JSON,
        )
        .await
        .map_err(|e| self.failed(e, abort, &format!("not a readable {media} file")))?;
        let output: probe::Output = serde_json::from_slice(&probed)
            .map_err(|_| JobError::Media(format!("not a readable {media} file")))?;
        let video = probe::Probe::from_output(&output, self.probe_limits())
            .map_err(|refused| JobError::Media(refused.to_string()))?;
        let limit = Duration::from_secs(self.video.job_timeout_base_secs)
            + Duration::from_secs_f64(video.seconds() * f64::from(self.video.job_timeout_factor));
        let deadline = tokio::time::Instant::now() + limit;
        let timed_out = |e| match e {
            JobError::TimedOut => JobError::Media(format!(
                "transcoding took longer than its limit of {} s",
                limit.as_secs()
            )),
            other => other,
        };
        let mut progress = Progress::new(self, cause);
        progress.report(0).await;

        let poster = self
            .poster(media, &original, &video, dir.path(), deadline, abort)
            .await
            .map_err(timed_out)?;
        let (encoded, measured) = self
            .renditions(
                media,
                &original,
                &video,
                dir.path(),
                deadline,
                abort,
                &mut progress,
            )
            .await
            .map_err(timed_out)?;

        let variants = conveyor_processor::store_variants(
            &*self.objects,
            &upload.sha256,
            visibility,
            &poster.variants,
        )
        .await?;
        let mut renditions = Vec::with_capacity(encoded.len());
        for (name, path, width, height) in encoded {
            let key = conveyor_processor::variant_key(&upload.sha256, visibility, &name, "mp4");
            let file = tokio::fs::File::open(&path)
                .await
                .retry("failed to open a rendition")?;
            let body = tokio_util::io::ReaderStream::new(file).boxed();
            let stored = self
                .objects
                .put(&key, body)
                .await
                .by_kind("failed to store a rendition")?;
            renditions.push(VariantInfo {
                name,
                key,
                width,
                height,
                content_type: "video/mp4".into(),
                bytes: stored.size,
            });
        }
        progress.report(100).await;
        Ok(VideoProcessed {
            width: video.width,
            height: video.height,
            blurhash: poster.blurhash,
            variants,
            // The file's own duration, unless what was encoded ran a second longer than it.
            duration_ms: if measured > video.seconds() + 1.0 {
                (measured * 1000.0).round() as u64
            } else {
                video.duration_ms
            },
            video_codec: video.video_codec,
            audio_codec: video.audio_codec,
            frame_rate_milli: video.frame_rate_milli,
            bitrate: video.bitrate,
            rotation: video.rotation,
            renditions,
        })
    }

    fn probe_limits(&self) -> probe::Limits {
        probe::Limits {
            max_duration_secs: self.video.max_duration_secs,
            max_side: self.video.max_side,
            max_streams: self.video.max_streams,
        }
    }

    /// What a failed run means for the job; `reason` is what a client reads when the file is
    /// to blame.
    fn failed(&self, error: ffmpeg::RunError, abort: &CancellationToken, reason: &str) -> JobError {
        use ffmpeg::RunError;
        match error {
            RunError::Aborted => JobError::Aborted(if self.stop.is_cancelled() {
                Abort::Stopping
            } else {
                Abort::Deleted
            }),
            RunError::TimedOut => JobError::TimedOut,
            _ if abort.is_cancelled() => JobError::Aborted(Abort::Stopping),
            e if e.is_transient() => JobError::Retry(HandleError::Transient(
                anyhow::Error::new(e).context("ffmpeg or ffprobe did not run"),
            )),
            RunError::Failed { stderr, .. } | RunError::Killed { stderr, .. } => {
                tracing::debug!(%stderr, "ffmpeg failed");
                JobError::Media(reason.to_owned())
            }
            other => JobError::Media(format!("{reason}: {other}")),
        }
    }

    /// Streams the original into `path`.
    async fn fetch(&self, key: &str, path: &Path) -> Result<(), JobError> {
        let mut body = match self.objects.get(key, None).await {
            Ok(object) => object.body,
            Err(ObjectError::NotFound) => {
                return Err(JobError::Media("the original is missing".into()));
            }
            Err(e) => {
                return Err(e)
                    .by_kind("failed to read the original")
                    .map_err(JobError::Retry);
            }
        };
        let mut file = tokio::fs::File::create(path)
            .await
            .retry("failed to create the job's copy")?;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.retry("failed to read the original")?;
            file.write_all(&chunk)
                .await
                .retry("failed to write the job's copy")?;
        }
        file.flush().await.retry("failed to write the job's copy")?;
        Ok(())
    }

    /// The poster: a frame a second in (or halfway, for shorter videos), upright, rendered as
    /// a photo is.
    async fn poster(
        &self,
        media: MediaType,
        original: &Path,
        video: &probe::Probe,
        dir: &Path,
        deadline: tokio::time::Instant,
        abort: &CancellationToken,
    ) -> Result<conveyor_processor::Rendered, JobError> {
        let path = dir.join("poster.png");
        let unreadable = || format!("no frame could be read from the {media} file");
        // A second in, or halfway; a clip of one frame has none there, so then the first.
        let at = Duration::from_secs_f64((video.seconds() / 2.0).min(1.0));
        for seek in [Some(at), None] {
            let mut command = self.tools.ffmpeg(media, original, seek);
            command
                .args(["-map", "0:v:0", "-frames:v", "1"])
                // Square pixels: an anamorphic frame is stretched to its display width.
                .args(["-vf", "scale=iw*sar:ih,setsar=1", "-pix_fmt", "rgb24"])
                .args(["-f", "image2", "-c:v", "png", "-y"])
                .arg(file_arg(&path));
            ffmpeg::run(command, deadline, abort, None, 0)
                .await
                .map_err(|e| self.failed(e, abort, &unreadable()))?;
            if tokio::fs::metadata(&path).await.is_ok_and(|m| m.len() > 0) {
                break;
            }
        }
        let png = tokio::fs::read(&path)
            .await
            .map_err(|_| JobError::Media(unreadable()))?;
        let limits = self.limits.clone();
        let rendered =
            tokio::task::spawn_blocking(move || conveyor_processor::render(&png, &limits))
                .await
                .retry("the poster's render task failed")?;
        rendered.map_err(|e| JobError::Media(format!("the poster frame: {e}")))
    }

    /// Encodes every rendition in one ffmpeg run (the source is decoded once), reporting
    /// progress as it goes. Returns each one's name, file and size, largest first, and the
    /// longest one's duration in seconds, as measured.
    #[allow(clippy::too_many_arguments)]
    async fn renditions(
        &self,
        media: MediaType,
        original: &Path,
        video: &probe::Probe,
        dir: &Path,
        deadline: tokio::time::Instant,
        abort: &CancellationToken,
        progress: &mut Progress<'_>,
    ) -> Result<(Vec<(String, PathBuf, u32, u32)>, f64), JobError> {
        let mut command = self.tools.ffmpeg(media, original, None);
        command.args(["-progress", "pipe:1"]);
        let (args, outputs) =
            rendition_outputs(&self.video, &self.rungs, video.width, video.height, dir);
        command.args(args);
        let (sender, mut done) = tokio::sync::watch::channel(Duration::ZERO);
        let encode = ffmpeg::run(command, deadline, abort, Some(sender), 0);
        tokio::pin!(encode);
        let total = video.seconds().max(0.001);
        let result = loop {
            tokio::select! {
                result = &mut encode => break result,
                Ok(()) = done.changed() => {
                    let seconds = done.borrow_and_update().as_secs_f64();
                    // 99 at most until the outputs are stored.
                    let percent = (seconds / total * 100.0).clamp(0.0, 99.0) as u8;
                    progress.report(percent).await;
                }
            }
        };
        result.map_err(|e| {
            self.failed(e, abort, &format!("the {media} file could not be decoded"))
        })?;
        let mut encoded = Vec::with_capacity(outputs.len());
        let mut seconds: f64 = 0.0;
        for (name, path) in outputs {
            let (width, height, length) = self.read_back(&path, abort).await?;
            seconds = seconds.max(length);
            encoded.push((name, path, width, height));
        }
        // A file may claim a shorter duration than it has; what was encoded is measured.
        if seconds > self.video.max_duration_secs as f64 {
            return Err(JobError::Media(
                probe::Refused::TooLong {
                    seconds: seconds.ceil() as u64,
                    limit: self.video.max_duration_secs,
                }
                .to_string(),
            ));
        }
        Ok((encoded, seconds))
    }

    /// The display size and duration (seconds) of a rendition, as ffprobe reads it back.
    async fn read_back(
        &self,
        path: &Path,
        abort: &CancellationToken,
    ) -> Result<(u32, u32, f64), JobError> {
        let json = ffmpeg::run(
            self.tools.probe(MediaType::Mp4, path),
            tokio::time::Instant::now() + PROBE_TIMEOUT,
            abort,
            None,
            MAX_PROBE_JSON,
        )
        .await
        .map_err(|e| self.failed(e, abort, "a rendition could not be read back"))?;
        let output: probe::Output = serde_json::from_slice(&json)
            .map_err(|_| JobError::Media("a rendition could not be read back".into()))?;
        let seconds = output
            .format
            .as_ref()
            .and_then(|f| f.duration.as_deref()?.parse::<f64>().ok())
            .unwrap_or(0.0);
        output
            .streams
            .iter()
            .find(|s| s.codec_type.as_deref() == Some("video"))
            .and_then(|s| Some((s.width?, s.height?, seconds)))
            .ok_or_else(|| JobError::Media("a rendition has no video stream".into()))
    }
}

/// ffmpeg's output options for the web renditions of a `width`×`height` (display size)
/// video, each ending in its output file in `dir`, and each rendition's name and file. The
/// rung is the short side, so portrait video keeps its width at it: H.264 High profile at
/// `video.crf` and `video.preset`, 8-bit 4:2:0 whatever the source's depth, AAC stereo at
/// 128 kb/s when there is sound, no subtitles, data or metadata, and `moov` before `mdat`
/// (`+faststart`) so that a player can start before the download ends; square pixels, at
/// most 60 frames a second, and at most `video.max_duration_secs` + 1 s long.
pub fn rendition_outputs(
    settings: &VideoSettings,
    rungs: &[u32],
    width: u32,
    height: u32,
    dir: &Path,
) -> (Vec<std::ffi::OsString>, Vec<(String, PathBuf)>) {
    let mut args: Vec<std::ffi::OsString> = Vec::new();
    let mut outputs = Vec::new();
    for short in ladder(rungs, width, height) {
        let name = format!("{short}p");
        let path = dir.join(format!("{name}.mp4"));
        // The rung is the short side; the long side keeps the display aspect ratio, so
        // anamorphic sources come out with square pixels.
        let even = |n: f64| ((n / 2.0).round() as u32 * 2).max(2);
        let (out_width, out_height) = if width >= height {
            (
                even(f64::from(width) * f64::from(short) / f64::from(height)),
                short,
            )
        } else {
            (
                short,
                even(f64::from(height) * f64::from(short) / f64::from(width)),
            )
        };
        let scale = format!("scale={out_width}:{out_height},setsar=1,format=yuv420p");
        let (crf, threads) = (settings.crf.to_string(), settings.threads.to_string());
        // Never more than the duration limit, whatever the file's metadata claims: a file
        // that says 1 s and runs for hours is cut, and then refused by its measured length.
        let cap = (settings.max_duration_secs + 1).to_string();
        let mut words = vec![
            "-map",
            "0:v:0",
            "-map",
            "0:a:0?",
            "-sn",
            "-dn",
            "-map_metadata",
            "-1",
            "-t",
            &cap,
            "-fpsmax",
            "60",
            "-vf",
            &scale,
            "-c:v",
            "libx264",
            "-profile:v",
            "high",
            "-preset",
            &settings.preset,
            "-crf",
            &crf,
        ];
        if settings.threads > 0 {
            words.extend(["-threads", &threads]);
        }
        words.extend(["-c:a", "aac", "-b:a", "128k", "-ac", "2"]);
        words.extend(["-movflags", "+faststart", "-f", "mp4", "-y"]);
        args.extend(words.into_iter().map(std::ffi::OsString::from));
        args.push(file_arg(&path));
        outputs.push((name, path));
    }
    (args, outputs)
}

/// The rungs of `rungs` (short sides, largest first) that a `width`×`height` video gets:
/// those no taller than its short side, never upscaled; a video smaller than every rung gets
/// one rendition at its own short side (rounded down to even, as H.264 in 4:2:0 needs).
pub fn ladder(rungs: &[u32], width: u32, height: u32) -> Vec<u32> {
    let short = width.min(height);
    let fitting: Vec<u32> = rungs.iter().copied().filter(|r| *r <= short).collect();
    if fitting.is_empty() {
        vec![(short & !1).max(2)]
    } else {
        fitting
    }
}

struct Watch {
    token: CancellationToken,
    reason: Arc<std::sync::OnceLock<Abort>>,
}

impl Watch {
    fn reason(&self) -> Option<Abort> {
        self.reason.get().copied()
    }
}

impl Drop for Watch {
    /// Ends the watching task with its job, however the job ends: finished, failed, or dropped
    /// mid-way by a revoke (which would otherwise leave it polling the read store for good).
    fn drop(&mut self) {
        self.token.cancel();
    }
}

/// Appends a job's progress at every [`PROGRESS_STEP`] percent and at least every
/// [`PROGRESS_EVERY`]. Progress is best effort: an append that fails is logged and skipped,
/// never a reason to fail the job.
struct Progress<'a> {
    transcoder: &'a Transcoder,
    cause: &'a Envelope,
    last: Option<(u8, Instant)>,
}

impl<'a> Progress<'a> {
    fn new(transcoder: &'a Transcoder, cause: &'a Envelope) -> Self {
        Progress {
            transcoder,
            cause,
            last: None,
        }
    }

    async fn report(&mut self, percent: u8) {
        let due = match self.last {
            None => true,
            Some((last, at)) => {
                percent / PROGRESS_STEP > last / PROGRESS_STEP
                    || (percent > last && at.elapsed() >= PROGRESS_EVERY)
            }
        };
        if !due {
            return;
        }
        self.last = Some((percent, Instant::now()));
        let event = self.cause.progress("transcoder", now_micros(), percent);
        if let Err(e) = self
            .transcoder
            .log
            .append(&self.transcoder.topic, vec![traced(to_record(&event))])
            .await
        {
            tracing::warn!(error = %e, percent, "failed to append progress; carrying on");
        }
    }
}

/// Makes `dir` (`<data_dir>/transcode/<process id>`) and locks `<dir>.lock` for as long as the
/// returned file lives, then removes every sibling whose lock no live process holds: the job
/// directories of a transcoder that died. Several transcoders may share a data directory (the
/// docs allow it); each removes only what is nobody's. Directories left by releases that kept
/// jobs straight under `transcode/` (`.tmp…`) are removed once a day old.
///
/// The locks are `flock`s (`File::try_lock`): the kernel drops them with their process,
/// however it ends.
///
/// # Errors
/// The directory or its lock cannot be made.
fn claim_work_dir(dir: &std::path::Path) -> anyhow::Result<std::fs::File> {
    let base = dir.parent().expect("a work dir has a parent");
    std::fs::create_dir_all(base)
        .map_err(|e| anyhow::anyhow!("failed to create {}: {e}", base.display()))?;
    // Locked under another name first and then renamed: a sibling's sweep only ever sees this
    // lock file held.
    let lock_path = dir.with_extension("lock");
    let fresh = dir.with_extension("lock.new");
    let lock = std::fs::File::create(&fresh)
        .map_err(|e| anyhow::anyhow!("failed to create {}: {e}", fresh.display()))?;
    lock.try_lock()
        .map_err(|e| anyhow::anyhow!("failed to lock {}: {e}", fresh.display()))?;
    std::fs::rename(&fresh, &lock_path)
        .map_err(|e| anyhow::anyhow!("failed to create {}: {e}", lock_path.display()))?;
    std::fs::create_dir_all(dir)
        .map_err(|e| anyhow::anyhow!("failed to create {}: {e}", dir.display()))?;
    for entry in std::fs::read_dir(base)?.filter_map(Result::ok) {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if path == dir || path == lock_path {
            continue;
        }
        let stale = if let Some(owner) = name.strip_suffix(".lock") {
            // A lock nobody holds: its process is gone.
            let free = std::fs::File::open(&path).is_ok_and(|f| f.try_lock().is_ok());
            if free {
                let _ = std::fs::remove_dir_all(base.join(owner));
            }
            free
        } else if name.ends_with(".lock.new") {
            // A process that died between creating its lock and taking it.
            older_than(&path, Duration::from_secs(60))
        } else if name.starts_with(".tmp") {
            // A job of a release that kept jobs straight under `transcode/`: one still running
            // during a rolling upgrade is younger than a day.
            older_than(&path, Duration::from_secs(24 * 3600))
        } else {
            // A directory whose lock file is being created this moment, or is held.
            false
        };
        if stale {
            let removed = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            if let Err(e) = removed {
                tracing::debug!(path = %path.display(), error = %e, "cannot remove a stale job directory");
            }
        }
    }
    Ok(lock)
}

/// Whether `path` was last modified more than `age` ago (false when that cannot be told).
fn older_than(path: &std::path::Path, age: Duration) -> bool {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|at| at.elapsed().ok())
        .is_some_and(|elapsed| elapsed > age)
}

#[async_trait]
impl Stage for Transcoder {
    fn name(&self) -> &'static str {
        "transcoder"
    }

    fn consumer_config(&self) -> ConsumerConfig {
        self.config.clone()
    }

    /// Starts libvips (for posters), takes a work directory of this process's own, and removes
    /// those of processes that died ([`claim_work_dir`]). Once `stop` is cancelled, running jobs
    /// get the drain timeout (`http.drain_timeout_ms`) to finish and commit, and are killed
    /// after it.
    async fn prepare(&mut self, stop: &CancellationToken) -> anyhow::Result<()> {
        conveyor_processor::render::init()?;
        let dir = self.work_dir.clone();
        let lock = tokio::task::spawn_blocking(move || claim_work_dir(&dir)).await??;
        self.work_lock = Some(lock);
        self.stop = stop.clone();
        Ok(())
    }
}

#[async_trait]
impl Handler for Transcoder {
    async fn handle(&self, records: &[Delivered]) -> Result<(), HandleError> {
        for record in records {
            let envelope = from_delivered(record).abort("undecodable record")?;
            let Some((upload, visibility)) = envelope.payload.upload() else {
                continue;
            };
            let media = MediaType::from_content_type(&upload.content_type);
            if let Some(media) = media.filter(|m| m.is_video()) {
                self.transcode(&envelope, upload, visibility, media).await?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reported: a transcoder emptied `<data_dir>/transcode` when it started, so a second one on
    /// the same data directory failed the first one's running job for good. Each now works in a
    /// directory of its own and removes only those whose owner is gone.
    #[test]
    fn transcoders_sharing_a_data_dir_remove_only_the_dead_ones_job_dirs() {
        let base = tempfile::tempdir().unwrap();
        let dir = |name: &str| base.path().join("transcode").join(name);
        let first = claim_work_dir(&dir("a")).unwrap();
        std::fs::write(dir("a").join("job"), b"running").unwrap();
        let legacy = base.path().join("transcode").join(".tmpOLD");
        std::fs::create_dir_all(&legacy).unwrap();

        let second = claim_work_dir(&dir("b")).unwrap();
        assert!(
            dir("a").join("job").exists(),
            "a live transcoder's job is left alone"
        );
        assert!(
            legacy.exists(),
            "a job directory of the old layout younger than a day may still be running"
        );

        drop(first); // the first transcoder dies: the kernel drops its lock
        let _third = claim_work_dir(&dir("c")).unwrap();
        assert!(
            !dir("a").exists(),
            "the dead one's job directory is removed"
        );
        assert!(!dir("a").with_extension("lock").exists());
        assert!(dir("b").exists(), "the live one's is not");
        drop(second);
    }

    #[test]
    fn the_ladder_never_upscales() {
        assert_eq!(ladder(&[720, 360], 1920, 1080), vec![720, 360]);
        assert_eq!(ladder(&[720, 360], 1080, 1920), vec![720, 360]);
        assert_eq!(ladder(&[720, 360], 640, 360), vec![360]);
        assert_eq!(ladder(&[720, 360], 320, 241), vec![240]);
        assert_eq!(ladder(&[720, 360], 1, 1), vec![2]);
    }
}
