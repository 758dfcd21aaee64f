//! `conveyor loadtest video`: what the transcoder costs over plain ffmpeg, and whether a video
//! backlog delays photos. Each figure has its reference in the same run: the bare `ffmpeg`
//! command with the transcoder's own output options on the same file, and photo latency
//! before the backlog was queued.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use conveyor_config::Settings;
use serde_json::Value;

/// What `loadtest video` measures; see `conveyor loadtest video --help`.
pub struct Options {
    pub file: Option<PathBuf>,
    pub size: String,
    pub seconds: u32,
    pub runs: usize,
    pub photos: usize,
    pub backlog: usize,
}

const KEY: &str = "bench-key";

/// Runs the benchmark on an embedded `serve` in a temp dir and prints the figures.
///
/// # Errors
/// ffmpeg missing or failing, the server refusing an upload, or a media item that fails.
pub async fn run(options: Options) -> anyhow::Result<()> {
    let scratch = tempfile::tempdir().context("failed to create a temp dir")?;
    let clip = match &options.file {
        Some(file) => file.clone(),
        None => make_clip(scratch.path(), &options.size, options.seconds)?,
    };
    let bytes = tokio::fs::read(&clip)
        .await
        .with_context(|| format!("failed to read {}", clip.display()))?;

    let mut settings = Settings {
        data_dir: scratch.path().join("data"),
        listen: "127.0.0.1:0".parse().expect("a valid address"),
        ..Settings::default()
    };
    settings.auth.api_keys =
        conveyor_config::KeyList::parse(&format!("bench:{KEY}")).map_err(anyhow::Error::msg)?;
    settings.auth.rate_per_sec = 0;
    let video = settings.video.clone();
    let rungs = video.rungs().map_err(anyhow::Error::msg)?;
    // Missing ffmpeg is said before anything starts.
    conveyor_transcoder::Tools::find(&video)?;
    let app = conveyor::app::build(settings, conveyor::app::Role::Serve).await?;
    let base = format!("http://127.0.0.1:{}", app.port());
    let stop = app.stop_token();
    let serving = tokio::spawn(app.run_until_stopped());
    let client = reqwest::Client::new();

    // Overhead: the same file, the same outputs and settings, interleaved.
    let (width, height) = display_size(&clip)?;
    let (mut plain, mut ours) = (Vec::new(), Vec::new());
    let bar = conveyor::progress_bar(true, options.runs.max(1) as u64 * 2, "renditions");
    for _ in 0..options.runs.max(1) {
        let out = tempfile::tempdir_in(scratch.path())?;
        let (args, _) =
            conveyor_transcoder::rendition_outputs(&video, &rungs, width, height, out.path());
        let started = Instant::now();
        let status = std::process::Command::new(&video.ffmpeg)
            .args([
                "-nostdin",
                "-hide_banner",
                "-nostats",
                "-loglevel",
                "error",
                "-i",
            ])
            .arg(&clip)
            .args(args)
            .status()
            .context("failed to run ffmpeg")?;
        anyhow::ensure!(status.success(), "plain ffmpeg failed: {status}");
        plain.push(started.elapsed());
        bar.inc(1);

        let started = Instant::now();
        let id = upload(&client, &base, bytes.clone(), "clip").await?;
        let body = wait_outcome(&client, &base, &id).await?;
        anyhow::ensure!(body["status"] == "processed", "the clip failed: {body}");
        ours.push(started.elapsed());
        bar.inc(1);
    }
    bar.finish_and_clear();
    let (plain, ours) = (crate::stats::median(plain), crate::stats::median(ours));
    println!(
        "video {} ({:.1} MB, {width}x{height}); renditions {:?}, libx264 preset {} crf {}:",
        clip.display(),
        bytes.len() as f64 / 1e6,
        conveyor_transcoder::ladder(&rungs, width, height),
        video.preset,
        video.crf
    );
    println!(
        "  plain ffmpeg, same outputs:        median {:>7.2} s over {} run(s)",
        plain.as_secs_f64(),
        options.runs.max(1)
    );
    println!(
        "  conveyor upload → processed:       median {:>7.2} s (probe, poster, encode, store, append, project)",
        ours.as_secs_f64()
    );
    println!(
        "  ratio conveyor / ffmpeg:           {:>7.2}",
        ours.as_secs_f64() / plain.as_secs_f64()
    );

    // Isolation: photo latency idle, then behind a video backlog.
    let photos = crate::photos::make_photos(
        &scratch.path().join("photos"),
        options.photos.max(1),
        "1600x1200",
    )?;
    let idle = photo_latencies(&client, &base, &photos).await?;
    let mut queued = Vec::new();
    for _ in 0..options.backlog.max(1) {
        queued.push(upload(&client, &base, bytes.clone(), "backlog").await?);
    }
    let busy = photo_latencies(&client, &base, &photos).await?;
    let mut waiting = 0;
    for id in &queued {
        let body = media(&client, &base, id).await?;
        if body["status"] == "pending" || body["status"] == "processing" {
            waiting += 1;
        }
    }
    println!(
        "photo upload → processed, {} photos of 1600x1200 one at a time:",
        photos.len()
    );
    let line = |name: &str, samples: &[Duration]| {
        println!(
            "  {name:<32} p50 {:>7.1} ms  p99 {:>7.1} ms",
            percentile(samples, 0.50).as_secs_f64() * 1e3,
            percentile(samples, 0.99).as_secs_f64() * 1e3
        );
    };
    line("idle (reference):", &idle);
    line(&format!("{} videos queued behind:", queued.len()), &busy);
    println!(
        "  ratio p50 busy / idle:             {:>7.2}  ({waiting} of {} videos still queued or running when the photos were done)",
        percentile(&busy, 0.5).as_secs_f64() / percentile(&idle, 0.5).as_secs_f64(),
        queued.len()
    );
    stop.cancel();
    serving.await??;
    Ok(())
}

/// A clip of `size` (`WIDTHxHEIGHT`) and `seconds`: ffmpeg's `testsrc2` with a tone, H.264
/// and AAC in MP4.
fn make_clip(dir: &Path, size: &str, seconds: u32) -> anyhow::Result<PathBuf> {
    let path = dir.join("clip.mp4");
    let status = std::process::Command::new("ffmpeg")
        .args(["-nostdin", "-v", "error", "-f", "lavfi", "-i"])
        .arg(format!("testsrc2=size={size}:rate=30"))
        .args([
            "-f",
            "lavfi",
            "-i",
            "sine=frequency=440:sample_rate=48000",
            "-t",
        ])
        .arg(seconds.to_string())
        .args([
            "-c:v", "libx264", "-preset", "fast", "-pix_fmt", "yuv420p", "-c:a", "aac",
        ])
        .args(["-shortest", "-y"])
        .arg(&path)
        .status()
        .context("failed to run ffmpeg (Debian's `ffmpeg` package)")?;
    anyhow::ensure!(status.success(), "ffmpeg could not make the clip: {status}");
    Ok(path)
}

/// The display size ffprobe reads, with the rotation applied.
fn display_size(clip: &Path) -> anyhow::Result<(u32, u32)> {
    let out = std::process::Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-print_format",
            "json",
            "-show_format",
            "-show_streams",
        ])
        .arg(clip)
        .output()
        .context("failed to run ffprobe")?;
    anyhow::ensure!(
        out.status.success(),
        "ffprobe cannot read {}",
        clip.display()
    );
    let output: conveyor_transcoder::probe::Output = serde_json::from_slice(&out.stdout)?;
    let limits = conveyor_transcoder::probe::Limits {
        max_duration_secs: u64::MAX,
        max_side: u32::MAX,
        max_streams: u32::MAX,
    };
    let probe = conveyor_transcoder::probe::Probe::from_output(&output, limits)?;
    Ok((probe.width, probe.height))
}

async fn upload(
    client: &reqwest::Client,
    base: &str,
    bytes: Vec<u8>,
    name: &str,
) -> anyhow::Result<String> {
    let form = reqwest::multipart::Form::new().part(
        "file",
        reqwest::multipart::Part::bytes(bytes).file_name(name.to_owned()),
    );
    let response = client
        .post(format!("{base}/v1/media"))
        .bearer_auth(KEY)
        .multipart(form)
        .send()
        .await?;
    anyhow::ensure!(
        response.status() == reqwest::StatusCode::ACCEPTED,
        "the upload was refused: {}",
        response.text().await.unwrap_or_default()
    );
    let body: Value = response.json().await?;
    Ok(body["id"].as_str().unwrap_or_default().to_owned())
}

async fn media(client: &reqwest::Client, base: &str, id: &str) -> anyhow::Result<Value> {
    Ok(client
        .get(format!("{base}/v1/media/{id}"))
        .bearer_auth(KEY)
        .send()
        .await?
        .json()
        .await
        .unwrap_or_default())
}

async fn wait_outcome(client: &reqwest::Client, base: &str, id: &str) -> anyhow::Result<Value> {
    loop {
        let body = media(client, base, id).await?;
        if body["status"] == "processed" || body["status"] == "failed" {
            return Ok(body);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Each photo uploaded in turn, timed from the request to `processed`.
async fn photo_latencies(
    client: &reqwest::Client,
    base: &str,
    photos: &[PathBuf],
) -> anyhow::Result<Vec<Duration>> {
    let mut samples = Vec::with_capacity(photos.len());
    for photo in photos {
        let bytes = tokio::fs::read(photo).await?;
        let started = Instant::now();
        let id = upload(client, base, bytes, "photo").await?;
        let body = wait_outcome(client, base, &id).await?;
        anyhow::ensure!(body["status"] == "processed", "a photo failed: {body}");
        samples.push(started.elapsed());
    }
    Ok(samples)
}

/// The `p` quantile (nearest rank) of `samples`.
fn percentile(samples: &[Duration], p: f64) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort();
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len().max(1));
    sorted.get(rank - 1).copied().unwrap_or_default()
}
