//! Video: sniffed at upload, transcoded by the `transcoder` group in its own consumer group
//! (probe, poster, web renditions), with progress, limits and cancellation. The test videos are
//! made here with ffmpeg.

use std::time::Duration;

use conveyor_tests::helpers::{
    ALICE, Process, TestApp, all_events, spawn_app_with, start_process, upload_to, wait_until,
};
use conveyor_tests::{images, videos};
use serde_json::Value;

conveyor_tests::on_every_log!(an_mp4_with_audio_ends_processed_with_playable_renditions);

/// Uploads `file` as `name` and returns the media id.
async fn upload_video(app: &TestApp, file: Vec<u8>, name: &str) -> String {
    let form = reqwest::multipart::Form::new().part(
        "file",
        reqwest::multipart::Part::bytes(file).file_name(name.to_owned()),
    );
    let response = app
        .client
        .post(app.url("/v1/media"))
        .bearer_auth(ALICE)
        .multipart(form)
        .send()
        .await
        .unwrap();
    let status = response.status();
    let body: Value = response.json().await.unwrap();
    assert_eq!(status, 202, "{body}");
    body["id"].as_str().unwrap().to_owned()
}

/// Waits for an outcome (`processed` or `failed`), however long the transcode takes.
async fn wait_outcome(app: &TestApp, id: &str, within: Duration) -> Value {
    let path = format!("/v1/media/{id}");
    wait_until(within, || async {
        let (status, body) = app.get_json(&path).await;
        (status == 200 && (body["status"] == "processed" || body["status"] == "failed"))
            .then_some(body)
    })
    .await
    .unwrap_or_else(|| panic!("media {id} had no outcome within {within:?}"))
}

/// The bytes at a URL the API gave (relative ones go to the app).
async fn fetch(app: &TestApp, url: &str) -> Vec<u8> {
    let url = if url.starts_with('/') {
        app.url(url)
    } else {
        url.to_owned()
    };
    let response = app.client.get(url).send().await.unwrap();
    assert_eq!(response.status(), 200);
    response.bytes().await.unwrap().to_vec()
}

/// What a browser's `<video>` needs of a rendition: H.264 (and AAC when there is sound) in
/// MP4, `moov` before `mdat` so it plays while it downloads, the right size and duration, and
/// byte ranges so it can seek.
async fn check_rendition(
    app: &TestApp,
    rendition: &Value,
    size: (u64, u64),
    audio: bool,
) -> Vec<u8> {
    let url = rendition["url"].as_str().unwrap();
    let bytes = fetch(app, url).await;
    let boxes = videos::top_level_boxes(&bytes);
    let (moov, mdat) = (
        boxes.iter().position(|b| b == "moov"),
        boxes.iter().position(|b| b == "mdat"),
    );
    assert!(moov.is_some() && moov < mdat, "faststart: {boxes:?}");
    let probe = videos::probe(&bytes);
    let streams = probe["streams"].as_array().unwrap();
    let video = streams.iter().find(|s| s["codec_type"] == "video").unwrap();
    assert_eq!(video["codec_name"], "h264");
    assert_eq!(video["pix_fmt"], "yuv420p", "8-bit 4:2:0");
    assert_eq!(
        (
            video["width"].as_u64().unwrap(),
            video["height"].as_u64().unwrap()
        ),
        size
    );
    assert_eq!(
        (
            rendition["width"].as_u64().unwrap(),
            rendition["height"].as_u64().unwrap()
        ),
        size
    );
    assert_eq!(rendition["content_type"], "video/mp4");
    let sound = streams.iter().find(|s| s["codec_type"] == "audio");
    assert_eq!(sound.is_some(), audio, "{streams:?}");
    if audio {
        assert_eq!(sound.unwrap()["codec_name"], "aac");
    }
    // Seeking: a range is answered 206 with exactly those bytes.
    let url = if url.starts_with('/') {
        app.url(url)
    } else {
        url.to_owned()
    };
    let ranged = app
        .client
        .get(url)
        .header("range", "bytes=100-199")
        .send()
        .await
        .unwrap();
    assert_eq!(ranged.status(), 206);
    assert_eq!(ranged.bytes().await.unwrap().as_ref(), &bytes[100..200]);
    bytes
}

fn duration_secs(probe: &Value) -> f64 {
    probe["format"]["duration"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap()
}

async fn an_mp4_with_audio_ends_processed_with_playable_renditions(app: TestApp) {
    let id = upload_video(&app, videos::mp4(640, 360, 3), "clip.mp4").await;
    let body = wait_outcome(&app, &id, Duration::from_secs(90)).await;
    assert_eq!(body["status"], "processed", "{body}");
    assert_eq!(body["content_type"], "video/mp4");
    assert_eq!(
        (body["width"].as_u64(), body["height"].as_u64()),
        (Some(640), Some(360))
    );
    let video = &body["video"];
    assert!(
        (video["duration_ms"].as_u64().unwrap() as i64 - 3000).abs() <= 500,
        "{video}"
    );
    assert_eq!(video["video_codec"], "h264");
    assert_eq!(video["audio_codec"], "aac");
    assert_eq!(video["frame_rate"], 25.0);
    // The poster is a photo's variants, at the video's shape.
    let large = &body["variants"]["large"];
    assert_eq!(
        (large["width"].as_u64(), large["height"].as_u64()),
        (Some(640), Some(360))
    );
    assert_eq!(video["poster"]["url"], large["url"]);
    assert!(body["blurhash"].as_str().is_some_and(|b| !b.is_empty()));
    let poster = fetch(&app, large["url"].as_str().unwrap()).await;
    assert_eq!(images::dimensions(&poster), (640, 360));
    // 720p would be an upscale: only 360p.
    let renditions = video["renditions"].as_object().unwrap();
    assert_eq!(renditions.keys().collect::<Vec<_>>(), ["360p"]);
    let bytes = check_rendition(&app, &renditions["360p"], (640, 360), true).await;
    assert!((duration_secs(&videos::probe(&bytes)) - 3.0).abs() <= 0.5);
    assert!(
        body.get("progress").is_none(),
        "no progress once processed: {body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_mov_gets_a_portrait_poster_and_renditions() {
    let app = spawn_app_with(|_| {}).await;
    let id = upload_video(&app, videos::rotated_mov(640, 360), "phone.mov").await;
    let body = wait_outcome(&app, &id, Duration::from_secs(60)).await;
    assert_eq!(body["status"], "processed", "{body}");
    assert_eq!(body["content_type"], "video/quicktime");
    assert_eq!(
        (body["width"].as_u64(), body["height"].as_u64()),
        (Some(360), Some(640))
    );
    assert_eq!(body["video"]["rotation"].as_u64().unwrap() % 180, 90);
    let large = &body["variants"]["large"];
    let poster = fetch(&app, large["url"].as_str().unwrap()).await;
    assert_eq!(
        images::dimensions(&poster),
        (360, 640),
        "the poster is upright"
    );
    check_rendition(
        &app,
        &body["video"]["renditions"]["360p"],
        (360, 640),
        false,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_webm_and_a_ten_bit_source_play_as_eight_bit_h264() {
    let app = spawn_app_with(|_| {}).await;
    let webm = upload_video(&app, videos::webm(320, 240), "clip.webm").await;
    let ten = upload_video(&app, videos::ten_bit(480, 360), "hdr.mp4").await;
    let body = wait_outcome(&app, &webm, Duration::from_secs(60)).await;
    assert_eq!(body["status"], "processed", "{body}");
    assert_eq!(body["content_type"], "video/webm");
    assert_eq!(body["video"]["video_codec"], "vp9");
    assert_eq!(body["video"]["audio_codec"], Value::Null);
    // Smaller than every rung: one rendition at its own size.
    let renditions = body["video"]["renditions"].as_object().unwrap();
    assert_eq!(renditions.keys().collect::<Vec<_>>(), ["240p"]);
    check_rendition(&app, &renditions["240p"], (320, 240), false).await;

    let body = wait_outcome(&app, &ten, Duration::from_secs(60)).await;
    assert_eq!(body["status"], "processed", "{body}");
    check_rendition(
        &app,
        &body["video"]["renditions"]["360p"],
        (480, 360),
        false,
    )
    .await;
}

/// Reported: an anamorphic source was reported, postered and encoded at its coded width (a
/// squeezed picture), and a one-frame clip failed for want of a frame at its poster's time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anamorphic_and_one_frame_videos_come_out_at_their_display_shape() {
    let app = spawn_app_with(|_| {}).await;
    let wide = upload_video(&app, videos::anamorphic(320, 180), "hdv.mp4").await;
    let single = upload_video(&app, videos::one_frame(320, 180), "one.mp4").await;
    let body = wait_outcome(&app, &wide, Duration::from_secs(60)).await;
    assert_eq!(body["status"], "processed", "{body}");
    assert_eq!(
        (body["width"].as_u64(), body["height"].as_u64()),
        (Some(640), Some(180))
    );
    let poster = fetch(&app, body["variants"]["large"]["url"].as_str().unwrap()).await;
    assert_eq!(images::dimensions(&poster), (640, 180));
    let bytes = check_rendition(
        &app,
        &body["video"]["renditions"]["180p"],
        (640, 180),
        false,
    )
    .await;
    let probe = videos::probe(&bytes);
    assert_eq!(
        probe["streams"][0]["sample_aspect_ratio"], "1:1",
        "square pixels"
    );

    let body = wait_outcome(&app, &single, Duration::from_secs(60)).await;
    assert_eq!(body["status"], "processed", "{body}");
    check_rendition(
        &app,
        &body["video"]["renditions"]["180p"],
        (320, 180),
        false,
    )
    .await;
}

/// Reported: a direct upload declared `video/quicktime` whose bytes are an MP4 (what many
/// apps write as `.mov`) was refused after all its bytes were sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_direct_upload_may_name_the_sibling_container_and_any_case() {
    let app = spawn_app_with(|_| {}).await;
    let clip = videos::mp4(320, 240, 1);
    let created = app
        .client
        .post(app.url("/v1/uploads"))
        .bearer_auth(ALICE)
        .json(&serde_json::json!({"content_type": "Video/QuickTime; codecs=avc1", "bytes": clip.len()}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let created: Value = created.json().await.unwrap();
    let put = app
        .client
        .put(app.url(created["url"].as_str().unwrap()))
        .body(clip)
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 200);
    let completed = app
        .client
        .post(app.url(created["complete"].as_str().unwrap()))
        .bearer_auth(ALICE)
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(completed.status(), 202);
    let completed: Value = completed.json().await.unwrap();
    assert_eq!(completed["content_type"], "video/mp4", "what the bytes are");
    let id = completed["id"].as_str().unwrap();
    let body = wait_outcome(&app, id, Duration::from_secs(60)).await;
    assert_eq!(body["status"], "processed", "{body}");
    assert_eq!(body["content_type"], "video/mp4");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_long_and_disguised_files_fail_with_a_reason_or_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    // A real video a playlist points at: were the playlist ever followed, it would be read.
    let target = dir.path().join("target.mp4");
    std::fs::write(&target, videos::mp4(320, 240, 1)).unwrap();
    let app = spawn_app_with(|s| s.video.max_duration_secs = 2).await;

    // A playlist as text is not a video at all: refused at the door.
    for playlist in [
        format!(
            "#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\nfile://{}\n#EXT-X-ENDLIST\n",
            target.display()
        ),
        format!("ffconcat version 1.0\nfile '{}'\n", target.display()),
    ] {
        let response = upload_to(
            &app.client,
            &app.address,
            ALICE,
            playlist.into_bytes(),
            None,
        )
        .await;
        assert_eq!(response.status(), 415);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "unsupported_media_type");
    }
    // A playlist behind an MP4 signature passes the sniff, and is read as MP4 only: it fails,
    // and reads nothing it names.
    let mut disguised = b"\0\0\0\x18ftypisom\0\0\x02\0isomiso2".to_vec();
    disguised.extend_from_slice(
        format!(
            "\n#EXTM3U\n#EXTINF:1,\nfile://{}\n#EXT-X-ENDLIST\n",
            target.display()
        )
        .as_bytes(),
    );
    let disguised = upload_video(&app, disguised, "playlist.mp4").await;
    // Cut short: the second half of a real file is gone.
    let whole = videos::mp4(320, 240, 2);
    let truncated = upload_video(&app, whole[..whole.len() / 2].to_vec(), "cut.mp4").await;
    // Three seconds, over the limit of two.
    let long = upload_video(&app, videos::mp4(320, 240, 3), "long.mp4").await;

    for (id, reason) in [
        (&disguised, "not a readable MP4 file"),
        (&long, "the video is 3 s long, over the limit of 2 s"),
    ] {
        let body = wait_outcome(&app, id, Duration::from_secs(60)).await;
        assert_eq!(body["status"], "failed", "{body}");
        assert_eq!(body["failure_reason"], reason, "{body}");
        assert!(body.get("video").is_none());
    }
    // A cut file has no index (`moov` comes last without faststart), or stops mid-stream: it
    // fails either way, with a reason that says what the file is.
    let body = wait_outcome(&app, &truncated, Duration::from_secs(60)).await;
    assert_eq!(body["status"], "failed", "{body}");
    assert!(
        body["failure_reason"].as_str().unwrap().contains("MP4"),
        "{body}"
    );
    // Nothing was stored for them but their originals.
    let renditions =
        conveyor_tests::helpers::count_files(&app.settings.data_dir.join("objects/variants"));
    assert_eq!(renditions, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_ffmpeg_serve_refuses_video_naming_the_tool_and_takes_photos() {
    let app = spawn_app_with(|s| s.video.ffprobe = "/nonexistent/ffprobe".into()).await;
    let response = upload_to(
        &app.client,
        &app.address,
        ALICE,
        videos::mp4(160, 120, 1),
        None,
    )
    .await;
    assert_eq!(response.status(), 415);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unsupported_media_type");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("ffprobe is not installed"), "{message}");
    assert!(
        !message.contains("/nonexistent"),
        "no server paths: {message}"
    );
    // Direct uploads too, before any bytes are sent.
    let created = app
        .client
        .post(app.url("/v1/uploads"))
        .bearer_auth(ALICE)
        .json(&serde_json::json!({"content_type": "video/mp4", "bytes": 1000}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 415);
    let photo = app.upload(ALICE, images::jpeg(64, 48, 1), None).await;
    assert_eq!(photo.status(), 202);
}

/// Settings under which a transcode takes a while on one core (libx264's slowest preset on a
/// 30 s clip), for the tests that act while one runs.
fn slow(s: &mut conveyor_config::Settings) {
    s.video.preset = "veryslow".into();
    s.video.threads = 1;
}

/// Waits until the media is `processing`, and returns its progress.
async fn wait_processing(app: &TestApp, id: &str) -> u64 {
    let path = format!("/v1/media/{id}");
    wait_until(Duration::from_secs(60), || async {
        let (_, body) = app.get_json(&path).await;
        (body["status"] == "processing").then(|| body["progress"].as_u64().unwrap())
    })
    .await
    .expect("the transcode started")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_during_a_transcode_stops_it_and_publishes_nothing() {
    let app = spawn_app_with(slow).await;
    let id = upload_video(&app, videos::mp4(640, 360, 30), "long.mp4").await;
    let progress = wait_processing(&app, &id).await;
    assert!(progress <= 100);
    let jobs = app.settings.data_dir.join("transcode");
    let needle = jobs.to_string_lossy().into_owned();
    assert!(
        wait_until(Duration::from_secs(10), || async {
            (videos::processes_mentioning(&needle) > 0).then_some(())
        })
        .await
        .is_some(),
        "ffmpeg runs on the job"
    );
    assert_eq!(app.delete(ALICE, &id).await.status(), 202);
    // Stopped within seconds: ffmpeg gone, its job directory gone.
    let stopped = wait_until(Duration::from_secs(10), || async {
        (videos::processes_mentioning(&needle) == 0
            && conveyor_tests::helpers::count_job_files(&jobs) == 0)
            .then_some(())
    })
    .await;
    assert!(
        stopped.is_some(),
        "the job still runs after its media was deleted"
    );
    app.wait_caught_up().await;
    let uuid = uuid::Uuid::parse_str(&id).unwrap();
    let outcomes = all_events(&*app.backends.log, app.settings.topic())
        .await
        .into_iter()
        .filter(|e| e.aggregate_id == uuid)
        .filter(|e| {
            matches!(
                e.payload,
                conveyor_schemas::Event::VideoProcessed(_)
                    | conveyor_schemas::Event::MediaProcessingFailed(_)
            )
        })
        .count();
    assert_eq!(outcomes, 0, "nothing is published for a deleted video");
    let renditions =
        conveyor_tests::helpers::count_files(&app.settings.data_dir.join("objects/variants"));
    assert_eq!(renditions, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn photos_are_processed_while_a_video_backlog_waits() {
    let app = spawn_app_with(slow).await;
    let mut videos_queued = Vec::new();
    for seed in 0..2 {
        let clip = videos::make(
            &[
                "-f",
                "lavfi",
                "-i",
                &format!("testsrc2=size=640x360:rate=25,hue=h={seed}0"),
                "-t",
                "30",
                "-c:v",
                "libx264",
                "-preset",
                "ultrafast",
                "-pix_fmt",
                "yuv420p",
            ],
            "mp4",
        );
        videos_queued.push(upload_video(&app, clip, "backlog.mp4").await);
    }
    wait_processing(&app, &videos_queued[0]).await;
    let mut photos = Vec::new();
    for seed in 0..5 {
        let response = app
            .upload(ALICE, images::jpeg(800, 600, 70 + seed), None)
            .await;
        let body: Value = response.json().await.unwrap();
        photos.push(body["id"].as_str().unwrap().to_owned());
    }
    for photo in &photos {
        assert_eq!(app.wait_processed(photo).await["status"], "processed");
    }
    // Every photo is done, and the videos are still queued or under way.
    for video in &videos_queued {
        let (_, body) = app.media(video).await;
        assert!(
            body["status"] == "pending" || body["status"] == "processing",
            "{body}"
        );
    }
}

fn serve(dir: &std::path::Path, preset: &str) -> Process {
    start_process(
        "serve",
        dir,
        &[
            ("CONVEYOR__AUTH__API_KEYS", format!("alice:{ALICE}")),
            ("CONVEYOR__LOG__PARTITIONS", "4".to_owned()),
            ("CONVEYOR__VIDEO__PRESET", preset.to_owned()),
            ("CONVEYOR__VIDEO__THREADS", "1".to_owned()),
            ("CONVEYOR__HTTP__DRAIN_TIMEOUT_MS", "1000".to_owned()),
        ],
    )
}

/// Uploads a 30 s clip to `server`, waits until its transcode runs, and returns the media id
/// and the clip's sha256.
async fn start_long_job(client: &reqwest::Client, server: &Process) -> (String, String) {
    let clip = videos::mp4(640, 360, 30);
    let sha = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&clip))
    };
    let response = upload_to(client, &server.address, ALICE, clip, None).await;
    assert_eq!(response.status(), 202);
    let id = response.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let media = format!("{}/v1/media/{id}", server.address);
    wait_until(Duration::from_secs(60), || async {
        let body: Value = client.get(&media).send().await.ok()?.json().await.ok()?;
        (body["status"] == "processing").then_some(())
    })
    .await
    .expect("the transcode started");
    (id, sha)
}

/// After a restart on `dir`: the media ends processed, with exactly one set of renditions
/// (the poster's three variants and one rendition), one outcome event, and no job directory.
async fn processed_once_after_restart(dir: &std::path::Path, id: &str, sha: &str) {
    let client = reqwest::Client::new();
    let server = serve(dir, "ultrafast");
    let media = format!("{}/v1/media/{id}", server.address);
    let body = wait_until(Duration::from_secs(120), || async {
        let body: Value = client.get(&media).send().await.ok()?.json().await.ok()?;
        (body["status"] == "processed").then_some(body)
    })
    .await
    .expect("processed after the restart");
    assert_eq!(
        body["video"]["renditions"]
            .as_object()
            .unwrap()
            .keys()
            .collect::<Vec<_>>(),
        ["360p"]
    );
    let mut stored: Vec<String> = std::fs::read_dir(dir.join(format!("objects/variants/{sha}")))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    stored.sort();
    assert_eq!(stored, ["360p.mp4", "large.jpg", "small.jpg", "thumb.jpg"]);
    assert_eq!(
        conveyor_tests::helpers::count_job_files(&dir.join("transcode")),
        0,
        "no job directory left"
    );
    drop(server);
    let mut settings = conveyor_config::Settings {
        data_dir: dir.to_owned(),
        ..conveyor_config::Settings::default()
    };
    settings.log.partitions = 4;
    let backends = conveyor_storage::Backends::open(&settings).await.unwrap();
    let uuid = uuid::Uuid::parse_str(id).unwrap();
    let outcomes: Vec<_> = all_events(&*backends.log, settings.topic())
        .await
        .into_iter()
        .filter(|e| e.aggregate_id == uuid && e.payload.type_name() == "VideoProcessed")
        .collect();
    assert_eq!(outcomes.len(), 1, "{outcomes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_kills_a_job_past_the_drain_and_the_restart_runs_it_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = serve(dir.path(), "veryslow");
    let client = reqwest::Client::new();
    let (id, sha) = start_long_job(&client, &server).await;
    let needle = dir.path().join("transcode").to_string_lossy().into_owned();
    let term = std::process::Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    // The drain (1 s) runs out long before the encode would end: the job is killed and left
    // uncommitted, and the process exits cleanly.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let exited = loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "serve still runs 15 s after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(exited.success(), "{exited}");
    assert_eq!(
        videos::processes_mentioning(&needle),
        0,
        "ffmpeg was killed"
    );
    drop(server);
    processed_once_after_restart(dir.path(), &id, &sha).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkill_mid_job_leaves_one_set_of_renditions_after_the_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve(dir.path(), "veryslow");
    let client = reqwest::Client::new();
    let (id, sha) = start_long_job(&client, &server).await;
    let needle = dir.path().join("transcode").to_string_lossy().into_owned();
    // `processing` is announced before the first ffmpeg (the poster's) starts, and there is a
    // moment between the poster's and the rendition's: wait for one to run.
    let running = wait_until(Duration::from_secs(30), || async {
        (videos::processes_mentioning(&needle) > 0).then_some(())
    })
    .await;
    assert!(running.is_some(), "ffmpeg runs");
    drop(server); // SIGKILL
    // ffmpeg dies with its transcoder rather than running on, orphaned.
    let orphans = wait_until(Duration::from_secs(5), || async {
        (videos::processes_mentioning(&needle) == 0).then_some(())
    })
    .await;
    assert!(orphans.is_some(), "ffmpeg outlived the transcoder");
    processed_once_after_restart(dir.path(), &id, &sha).await;
}

/// A job past its time limit (`video.job_timeout_base_secs` + factor × duration) is killed,
/// ends `failed` with the limit in its reason, and leaves no ffmpeg and no job directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_past_its_time_limit_is_killed_and_fails_saying_so() {
    let app = spawn_app_with(|s| {
        slow(s);
        s.video.job_timeout_base_secs = 2;
        s.video.job_timeout_factor = 0;
    })
    .await;
    let id = upload_video(&app, videos::mp4(640, 360, 30), "long.mp4").await;
    let body = wait_outcome(&app, &id, Duration::from_secs(60)).await;
    assert_eq!(body["status"], "failed", "{body}");
    assert_eq!(
        body["failure_reason"],
        "transcoding took longer than its limit of 2 s"
    );
    let jobs = app.settings.data_dir.join("transcode");
    let needle = jobs.to_string_lossy().into_owned();
    let cleared = wait_until(Duration::from_secs(5), || async {
        (videos::processes_mentioning(&needle) == 0
            && conveyor_tests::helpers::count_job_files(&jobs) == 0)
            .then_some(())
    })
    .await;
    assert!(
        cleared.is_some(),
        "ffmpeg or its job directory outlived the job"
    );
}
