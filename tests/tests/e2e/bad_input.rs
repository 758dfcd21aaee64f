//! A client's mistake gets a clear 4xx with a JSON error, and nothing is stored or appended.

use std::time::{Duration, Instant};

use conveyor_tests::helpers::{ALICE, SERVICE, TestApp, count_files, spawn_app, spawn_app_with};
use conveyor_tests::images;
use serde_json::{Value, json};

/// Asserts a 400 whose message names `field`.
async fn assert_names_field(response: reqwest::Response, field: &str) {
    let (status, body) = error_of(response).await;
    assert_eq!(status, 400, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains(field), "{message:?} should name {field:?}");
}

async fn error_of(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let body: Value = response.json().await.expect("error bodies are JSON");
    assert!(
        body["error"]["code"].is_string() && body["error"]["message"].is_string(),
        "{body}"
    );
    (status, body)
}

fn stored_originals(app: &TestApp) -> usize {
    let objects = app.settings.data_dir.join("objects");
    count_files(&objects.join("originals"))
        + count_files(&objects.join("incoming"))
        + count_files(&objects.join(".tmp"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_uploads_are_refused_and_leave_nothing_behind() {
    let app = spawn_app_with(|s| s.limits.max_upload_bytes = 256 * 1024).await;

    let (status, body) = error_of(
        app.upload(ALICE, b"%PDF-1.7 definitely a pdf".to_vec(), None)
            .await,
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (415, Some("unsupported_media_type"))
    );

    let mut big = images::jpeg(16, 16, 1);
    big.resize(300 * 1024, 0);
    let (status, body) = error_of(app.upload(ALICE, big, None).await).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (413, Some("too_large"))
    );

    let (status, _) = error_of(app.upload("wrong-key", images::jpeg(8, 8, 1), None).await).await;
    assert_eq!(status, 401);
    let no_key = app.client.post(app.url("/v1/media")).send().await.unwrap();
    assert_eq!(no_key.status(), 401);
    assert_eq!(no_key.headers()["www-authenticate"], "Bearer");

    let no_file = app
        .client
        .post(app.url("/v1/media"))
        .bearer_auth(ALICE)
        .multipart(reqwest::multipart::Form::new().text("title", "only a title"))
        .send()
        .await
        .unwrap();
    let (status, body) = error_of(no_file).await;
    assert_eq!(status, 400);
    assert!(
        body["error"]["message"].as_str().unwrap().contains("file"),
        "{body}"
    );

    let not_multipart = app
        .client
        .post(app.url("/v1/media"))
        .bearer_auth(ALICE)
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(not_multipart).await.0, 400);

    assert_eq!(stored_originals(&app), 0, "nothing stored");
    assert_eq!(app.log_records().await, 0, "nothing appended");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_images_end_failed_quickly_with_a_reason() {
    let app = spawn_app().await;
    let full = images::jpeg(800, 600, 2);
    let truncated = full[..full.len() / 2].to_vec();
    let bomb = images::png_bomb_header(100_000, 100_000);

    let started = Instant::now();
    let mut ids = Vec::new();
    for file in [truncated, bomb] {
        let response = app.upload(ALICE, file, None).await;
        assert_eq!(
            response.status(),
            202,
            "sniffed as an image, so accepted for processing"
        );
        ids.push(
            response.json::<Value>().await.unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    let truncated = app.wait_processed(&ids[0]).await;
    assert_eq!(truncated["status"], "failed");
    assert!(
        truncated["failure_reason"]
            .as_str()
            .unwrap()
            .contains("decode"),
        "{truncated}"
    );
    let bomb = app.wait_processed(&ids[1]).await;
    assert_eq!(bomb["status"], "failed");
    let reason = bomb["failure_reason"].as_str().unwrap();
    assert!(reason.contains("100000x100000"), "{reason}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "refused before decoding, not after"
    );
    assert!(bomb["variants"].as_object().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_errors_have_the_right_status_and_name_the_problem() {
    let app = spawn_app().await;
    let (status, body) = app.media("0190f0e0-0000-7000-8000-000000000000").await;
    assert_eq!(
        (status.as_u16(), body["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
    assert_eq!(app.media("not-a-uuid").await.0, 400);
    assert_eq!(app.get_json("/v1/nothing/here").await.0, 404);
    assert_eq!(app.get_json("/v1/owners/alice/media?limit=0").await.0, 400);
    assert_eq!(
        app.get_json("/v1/owners/alice/media?limit=abc").await.0,
        400
    );
    assert_eq!(
        app.get_json("/v1/owners/alice/media?cursor=garbage!")
            .await
            .0,
        400
    );
    // An owner no key can name: refused before any store read (an empty one reached the CQL
    // store as an empty partition key, and came back 503).
    let long = "a".repeat(65);
    for owner in [
        "",
        "%00",
        "ali%00ce",
        "alice%2Fx",
        "%20",
        "...",
        "%F0%9F%98%80",
        &long,
    ] {
        for what in ["media", "stats"] {
            let (status, body) = app.get_json(&format!("/v1/owners/{owner}/{what}")).await;
            assert_eq!(
                (status.as_u16(), body["error"]["code"].as_str()),
                (400, Some("invalid_owner")),
                "{owner:?}/{what}: {body}"
            );
        }
    }
    assert_eq!(app.get_json("/media/../../etc/passwd").await.0, 404);
    assert_eq!(app.get_json("/media/originals/0000").await.0, 404);

    let events = |body: Value, key: &str| {
        app.client
            .post(app.url("/v1/events"))
            .bearer_auth(key)
            .json(&body)
            .send()
    };
    let id = "0190f0e0-0000-7000-8000-000000000001";
    let wrong_type = json!({"aggregate_id": id, "payload": {"MediaDescribed": {"title": 5}}});
    assert_names_field(
        events(wrong_type, SERVICE).await.unwrap(),
        "payload.MediaDescribed.title",
    )
    .await;
    let no_id = json!({"payload": {"MediaDeleted": {"deleted_by": "x"}}});
    assert_names_field(events(no_id, SERVICE).await.unwrap(), "aggregate_id").await;
    let uploaded = json!({"aggregate_id": id, "payload": {"MediaUploaded": {
        "owner": "x", "original_key": "originals/x", "sha256": "x", "bytes": 1, "content_type": "image/png", "title": null}}});
    let (status, body) = error_of(events(uploaded, SERVICE).await.unwrap()).await;
    assert_eq!(
        status, 400,
        "only MediaDescribed and MediaDeleted come over HTTP: {body}"
    );
    let (status, _) = error_of(
        events(
            json!({"aggregate_id": id, "payload": {"MediaDeleted": {"deleted_by": "x"}}}),
            ALICE,
        )
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(status, 401, "a client key is not a service key");
    let malformed = app
        .client
        .post(app.url("/v1/events"))
        .bearer_auth(SERVICE)
        .header("content-type", "application/json")
        .body("{\"aggregate_id\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(malformed).await.0, 400);
    assert_eq!(app.log_records().await, 0, "nothing appended");
}
