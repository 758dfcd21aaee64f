//! Phones' photos through the whole pipeline: HEIC and AVIF through both upload paths, on the
//! embedded store and on S3, and a JPEG whose header sits behind megabytes of metadata.

use conveyor_tests::helpers::{ALICE, TestApp, spawn_app, spawn_app_on_s3};
use conveyor_tests::images;
use serde_json::{Value, json};

async fn upload_id(response: reqwest::Response) -> String {
    assert_eq!(response.status(), 202);
    let body: Value = response.json().await.unwrap();
    body["id"].as_str().unwrap().to_owned()
}

/// Uploads `file` through `POST /v1/media` and checks what a phone user would: processed, the
/// right size, JPEG variants that decode, and the original served back byte for byte with its
/// own type.
async fn a_phone_photo_is_processed(app: &TestApp, file: Vec<u8>, content_type: &str) {
    let id = upload_id(app.upload(ALICE, file.clone(), None).await).await;
    let media = app.wait_processed(&id).await;
    assert_eq!(media["status"], "processed", "{content_type}: {media}");
    assert_eq!(media["content_type"], content_type);
    assert_eq!(
        (media["width"].as_u64(), media["height"].as_u64()),
        (Some(1200), Some(900))
    );
    let thumb = app
        .client
        .get(app.url(media["variants"]["thumb"]["url"].as_str().unwrap()))
        .send()
        .await
        .unwrap();
    assert_eq!(thumb.headers()["content-type"], "image/jpeg");
    assert_eq!(
        images::dimensions(&thumb.bytes().await.unwrap()),
        (256, 192)
    );
    let original = app
        .client
        .get(app.url(media["original"]["url"].as_str().unwrap()))
        .send()
        .await
        .unwrap();
    assert_eq!(original.headers()["content-type"], content_type);
    assert_eq!(
        original.bytes().await.unwrap().to_vec(),
        file,
        "kept as uploaded"
    );
}

/// The same through the direct path: declare, PUT, complete.
async fn a_direct_upload_is_processed(app: &TestApp, file: Vec<u8>, content_type: &str) {
    let created = app
        .client
        .post(app.url("/v1/uploads"))
        .bearer_auth(ALICE)
        .json(&json!({"content_type": content_type, "bytes": file.len()}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201, "{content_type} is accepted");
    let upload: Value = created.json().await.unwrap();
    let url = upload["url"].as_str().unwrap();
    let url = if url.starts_with('/') {
        app.url(url)
    } else {
        url.to_owned()
    };
    let put = app
        .client
        .put(url)
        .header("content-type", content_type)
        .body(file)
        .send()
        .await
        .unwrap();
    assert!(put.status().is_success(), "{}", put.status());
    let done = app
        .client
        .post(app.url(&format!(
            "/v1/uploads/{}/complete",
            upload["upload_id"].as_str().unwrap()
        )))
        .bearer_auth(ALICE)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    let media = app.wait_processed(&upload_id(done).await).await;
    assert_eq!(media["status"], "processed", "{content_type}: {media}");
    assert_eq!(media["content_type"], content_type);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heic_and_avif_are_processed_through_both_upload_paths() {
    let heic = images::heif(1200, 900, "hevc");
    let avif = images::heif(1200, 900, "av1");
    let app = spawn_app().await;
    a_phone_photo_is_processed(&app, heic.clone(), "image/heic").await;
    a_phone_photo_is_processed(&app, avif.clone(), "image/avif").await;
    a_direct_upload_is_processed(&app, images::heif(640, 480, "hevc"), "image/heic").await;
    a_direct_upload_is_processed(&app, images::heif(640, 480, "av1"), "image/avif").await;
    app.stop().await;
    if let Some(app) = spawn_app_on_s3().await {
        a_phone_photo_is_processed(&app, heic, "image/heic").await;
        a_direct_upload_is_processed(&app, avif, "image/avif").await;
        app.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_behind_megabytes_of_metadata_is_processed() {
    let app = spawn_app().await;
    let file = images::with_extended_xmp(&images::jpeg(1200, 900, 5), 3);
    assert!(file.len() > 3_000_000);
    let id = upload_id(app.upload(ALICE, file, None).await).await;
    let media = app.wait_processed(&id).await;
    assert_eq!(media["status"], "processed", "{media}");
    assert_eq!(
        (media["width"].as_u64(), media["height"].as_u64()),
        (Some(1200), Some(900))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn formats_that_stay_unsupported_are_refused_naming_the_accepted_ones() {
    let app = spawn_app().await;
    let foreign: [(&str, Vec<u8>); 4] = [
        ("TIFF", b"II*\0\x08\0\0\0".repeat(8)),
        (
            "SVG",
            b"<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"9\" height=\"9\"/>".to_vec(),
        ),
        ("PDF", b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n".to_vec()),
        // An ISO-BMFF file that is neither image nor video: AAC audio (MP4 video is the
        // transcoder's now).
        (
            "M4A",
            [&b"\0\0\0\x18ftypM4A \0\0\x02\0M4A mp42"[..], &[0; 64]].concat(),
        ),
    ];
    for (what, file) in foreign {
        let response = app.upload(ALICE, file, None).await;
        assert_eq!(response.status(), 415, "{what}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "unsupported_media_type", "{what}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("HEIC") && message.contains("AVIF"),
            "{what}: {message}"
        );
    }
    let declared = app
        .client
        .post(app.url("/v1/uploads"))
        .bearer_auth(ALICE)
        .json(&json!({"content_type": "image/tiff", "bytes": 100}))
        .send()
        .await
        .unwrap();
    assert_eq!(declared.status(), 415);
}
