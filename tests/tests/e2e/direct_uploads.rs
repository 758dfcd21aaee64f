//! Direct uploads: the API issues URLs, the client sends bytes straight to storage, and the
//! completion checks what arrived before anything is appended.

use conveyor_tests::helpers::{
    ALICE, BOB, TestApp, s3_bucket, s3_store, spawn_app, spawn_app_with, wait_until,
};
use conveyor_tests::images;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

async fn start_upload(app: &TestApp, body: Value) -> reqwest::Response {
    app.client
        .post(app.url("/v1/uploads"))
        .bearer_auth(ALICE)
        .json(&body)
        .send()
        .await
        .unwrap()
}

async fn complete(app: &TestApp, key: &str, id: &str, body: Value) -> reqwest::Response {
    let url = app.url(&format!("/v1/uploads/{id}/complete"));
    app.client
        .post(url)
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .unwrap()
}

/// PUTs `bytes` to a URL the API issued (relative ones go to the app).
async fn put(app: &TestApp, url: &str, bytes: Vec<u8>, content_type: &str) -> reqwest::Response {
    let url = if url.starts_with('/') {
        app.url(url)
    } else {
        url.to_owned()
    };
    app.client
        .put(url)
        .header("content-type", content_type)
        .body(bytes)
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_direct_uploads_are_signed_checked_and_processed() {
    let app = spawn_app().await;
    let file = images::jpeg(640, 480, 31);
    let sha = hex::encode(Sha256::digest(&file));
    let created = start_upload(
        &app,
        json!({"content_type": "image/jpeg", "bytes": file.len(), "sha256": sha}),
    )
    .await;
    assert_eq!(created.status(), 201);
    let upload: Value = created.json().await.unwrap();
    let (id, url) = (
        upload["upload_id"].as_str().unwrap(),
        upload["url"].as_str().unwrap(),
    );
    assert!(
        url.contains("kid=k2"),
        "signed with the first (newest) key: {url}"
    );

    // A forged or stretched signature is refused, and so is a stranger's completion.
    let forged = url.replace("sig=", "sig=00");
    assert_eq!(
        put(&app, &forged, file.clone(), "image/jpeg")
            .await
            .status(),
        403
    );
    let stretched = url.replace("expires=", "expires=9");
    assert_eq!(
        put(&app, &stretched, file.clone(), "image/jpeg")
            .await
            .status(),
        403
    );
    // A correctly signed URL whose time is up.
    let past = conveyor_storage::clock::now_micros() / 1_000_000 - 5;
    let keys = conveyor_config::KeyList::parse("k2:new-signing-key").unwrap();
    let (kid, sig) =
        conveyor_runtime::signing::sign(&keys, &format!("PUT\n/v1/uploads/{id}/data\n{past}"))
            .unwrap();
    let expired = format!("/v1/uploads/{id}/data?expires={past}&kid={kid}&sig={sig}");
    assert_eq!(
        put(&app, &expired, file.clone(), "image/jpeg")
            .await
            .status(),
        403
    );
    let too_big = [file.clone(), vec![0; 10]].concat();
    assert_eq!(put(&app, url, too_big, "image/jpeg").await.status(), 413);

    assert_eq!(
        put(&app, url, file.clone(), "image/jpeg").await.status(),
        200
    );
    assert_eq!(complete(&app, BOB, id, json!({})).await.status(), 403);
    let done = complete(&app, ALICE, id, json!({})).await;
    assert_eq!(done.status(), 202);
    let body: Value = done.json().await.unwrap();
    assert_eq!(body["sha256"], sha);
    let media = app.wait_processed(body["id"].as_str().unwrap()).await;
    assert_eq!(media["status"], "processed");
    assert_eq!(
        (media["width"].as_u64(), media["height"].as_u64()),
        (Some(640), Some(480))
    );
    assert_eq!(
        complete(&app, ALICE, id, json!({})).await.status(),
        404,
        "completed once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mismatches_are_422_and_append_nothing() {
    let app = spawn_app().await;
    let file = images::jpeg(64, 64, 32);
    let cases: [(Value, Vec<u8>, &str); 3] = [
        // Declared one size, sent another.
        (
            json!({"content_type": "image/jpeg", "bytes": file.len() + 5}),
            file.clone(),
            "size_mismatch",
        ),
        // Declared PNG, sent JPEG.
        (
            json!({"content_type": "image/png", "bytes": file.len()}),
            file.clone(),
            "type_mismatch",
        ),
        // Declared another hash.
        (
            json!({"content_type": "image/jpeg", "bytes": file.len(), "sha256": "0".repeat(64)}),
            file.clone(),
            "sha256_mismatch",
        ),
    ];
    for (declared, bytes, code) in cases {
        let upload: Value = start_upload(&app, declared).await.json().await.unwrap();
        let id = upload["upload_id"].as_str().unwrap();
        let declared = upload["headers"]["content-type"].as_str().unwrap();
        assert_eq!(
            put(&app, upload["url"].as_str().unwrap(), bytes, declared)
                .await
                .status(),
            200
        );
        let response = complete(&app, ALICE, id, json!({})).await;
        assert_eq!(response.status(), 422, "{code}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], code);
        assert!(
            app.backends
                .objects
                .head(&format!("incoming/{id}"))
                .await
                .unwrap()
                .is_none(),
            "removed"
        );
    }
    // Nothing uploaded at all.
    let upload: Value = start_upload(&app, json!({"content_type": "image/gif", "bytes": 10}))
        .await
        .json()
        .await
        .unwrap();
    let response = complete(
        &app,
        ALICE,
        upload["upload_id"].as_str().unwrap(),
        json!({}),
    )
    .await;
    assert_eq!(response.status(), 422);
    // Bad requests.
    assert_eq!(
        start_upload(
            &app,
            json!({"content_type": "application/pdf", "bytes": 10})
        )
        .await
        .status(),
        415
    );
    assert_eq!(
        start_upload(
            &app,
            json!({"content_type": "image/png", "bytes": 1u64 << 40})
        )
        .await
        .status(),
        413
    );
    assert_eq!(
        start_upload(
            &app,
            json!({"content_type": "image/png", "bytes": 10, "sha256": "xyz"})
        )
        .await
        .status(),
        400
    );
    assert_eq!(start_upload(&app, json!({"bytes": 10})).await.status(), 400);
    assert_eq!(app.log_records().await, 0, "nothing appended");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_direct_uploads_use_presigned_puts_and_parts() {
    let Some(objects) = s3_bucket().await else {
        return;
    };
    let endpoint = objects.endpoint.clone().unwrap();
    let app = spawn_app_with(|s| {
        s.objects = objects.clone();
        s.uploads.multipart_threshold_mib = 16;
        s.uploads.part_size_mib = 5;
    })
    .await;

    // Small: one presigned PUT straight to S3.
    let small = images::jpeg(320, 240, 33);
    let upload: Value = start_upload(
        &app,
        json!({"content_type": "image/jpeg", "bytes": small.len()}),
    )
    .await
    .json()
    .await
    .unwrap();
    let url = upload["url"].as_str().unwrap();
    assert!(
        url.starts_with(&endpoint) && url.contains("X-Amz-Signature"),
        "{url}"
    );
    assert_eq!(
        put(&app, url, small.clone(), "image/jpeg").await.status(),
        200
    );
    let done = complete(
        &app,
        ALICE,
        upload["upload_id"].as_str().unwrap(),
        json!({}),
    )
    .await;
    assert_eq!(done.status(), 202);
    let body: Value = done.json().await.unwrap();
    assert_eq!(
        app.wait_processed(body["id"].as_str().unwrap()).await["status"],
        "processed"
    );

    // Large: presigned parts of the size the API names, completed with their ETags.
    let mut large = images::jpeg(800, 600, 34);
    large.resize(30 * 1024 * 1024, 0); // trailing bytes after the JPEG's end: still a JPEG
    let upload: Value = start_upload(
        &app,
        json!({"content_type": "image/jpeg", "bytes": large.len()}),
    )
    .await
    .json()
    .await
    .unwrap();
    let part_size = upload["part_size"].as_u64().unwrap() as usize;
    let parts = upload["parts"].as_array().unwrap();
    assert_eq!(parts.len(), large.len().div_ceil(part_size));
    let mut etags = Vec::new();
    for (i, part) in parts.iter().enumerate() {
        let chunk = large[i * part_size..((i + 1) * part_size).min(large.len())].to_vec();
        let sent = put(
            &app,
            part["url"].as_str().unwrap(),
            chunk,
            "application/octet-stream",
        )
        .await;
        assert_eq!(sent.status(), 200);
        etags.push(json!({"part_number": i + 1, "etag": sent.headers()["etag"].to_str().unwrap()}));
    }
    let id = upload["upload_id"].as_str().unwrap();
    assert_eq!(
        complete(&app, ALICE, id, json!({})).await.status(),
        400,
        "parts are required"
    );
    let done = complete(&app, ALICE, id, json!({ "parts": etags })).await;
    assert_eq!(done.status(), 202);
    let body: Value = done.json().await.unwrap();
    assert_eq!(body["bytes"].as_u64(), Some(large.len() as u64));
    assert_eq!(
        app.wait_processed(body["id"].as_str().unwrap()).await["status"],
        "processed"
    );
}

/// Reported: the sweep removed an abandoned multipart upload's record but never aborted the
/// upload, so its parts stayed (and were billed) for ever, out of anyone's reach. The sweep
/// now aborts it first: S3 lists no multipart upload afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swept_multipart_upload_leaves_no_parts_behind() {
    let Some(objects) = s3_bucket().await else {
        return;
    };
    let app = spawn_app_with(|s| {
        s.objects = objects.clone();
        s.uploads.multipart_threshold_mib = 5;
        s.uploads.part_size_mib = 5;
    })
    .await;
    let upload: Value = start_upload(
        &app,
        json!({"content_type": "image/jpeg", "bytes": 12 * 1024 * 1024}),
    )
    .await
    .json()
    .await
    .unwrap();
    let parts = upload["parts"].as_array().unwrap();
    assert_eq!(parts.len(), 3);
    // One part arrives, then the client goes away for good.
    let sent = put(
        &app,
        parts[0]["url"].as_str().unwrap(),
        vec![0xab; 5 * 1024 * 1024],
        "application/octet-stream",
    )
    .await;
    assert_eq!(sent.status(), 200);
    let store = s3_store(&objects).await;
    let (client, bucket) = store.client();
    let open = || async {
        let listed = client
            .list_multipart_uploads()
            .bucket(bucket)
            .send()
            .await
            .unwrap();
        listed
            .uploads()
            .iter()
            .map(|u| {
                let key = u.key().unwrap_or_default().to_owned();
                (key, u.upload_id().unwrap_or_default().to_owned())
            })
            .collect::<Vec<_>>()
    };
    let abandoned = open().await;
    assert_eq!(abandoned.len(), 1, "the abandoned upload is open");

    // A sweep with no time to live (every upload made before this millisecond has expired).
    let record = conveyor_ingest::direct::pending_key(
        upload["upload_id"].as_str().unwrap().parse().unwrap(),
    );
    let swept = wait_until(std::time::Duration::from_secs(10), || async {
        conveyor_ingest::direct::sweep(&store, std::time::Duration::ZERO)
            .await
            .unwrap();
        conveyor_storage::ObjectStore::head(&store, &record)
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    assert!(swept.is_some(), "the upload's record was swept");
    assert_eq!(open().await, vec![], "no multipart upload is left behind");
    // Aborting an upload that is gone already (aborted, or expired by a lifecycle rule) is not
    // an error: a sweep that failed after its abort can run again.
    let (key, upload_id) = &abandoned[0];
    conveyor_storage::ObjectStore::abort_multipart(&store, key, upload_id)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_presigned_s3_urls_and_uploads_are_refused() {
    let Some(objects) = s3_bucket().await else {
        return;
    };
    let app = spawn_app_with(|s| {
        s.objects = objects.clone();
        s.uploads.ttl_secs = 1;
    })
    .await;
    let file = images::jpeg(64, 64, 35);
    let upload: Value = start_upload(
        &app,
        json!({"content_type": "image/jpeg", "bytes": file.len()}),
    )
    .await
    .json()
    .await
    .unwrap();
    let url = upload["url"].as_str().unwrap().to_owned();
    assert!(url.contains("X-Amz-Expires=1"), "{url}");
    // S3 refuses the URL itself once it expires. moto 5.1 does not check `X-Amz-Expires`
    // (seen here), so the PUT still lands; Conveyor's own check at completion is what this
    // test can show: an upload past its time cannot be completed, and nothing is appended.
    assert_eq!(put(&app, &url, file, "image/jpeg").await.status(), 200);
    let id = upload["upload_id"].as_str().unwrap().to_owned();
    // The upload's second (ttl_secs = 1) must be over before completing.
    let now = || conveyor_storage::clock::now_micros() / 1_000_000;
    let past = now() + 2;
    conveyor_tests::helpers::wait_until(std::time::Duration::from_secs(5), || async {
        (now() > past).then_some(())
    })
    .await
    .expect("the clock moves");
    let gone = conveyor_tests::helpers::wait_until(std::time::Duration::from_secs(10), || {
        let (app, id) = (&app, id.clone());
        async move { (complete(app, ALICE, &id, json!({})).await.status() == 410).then_some(()) }
    })
    .await;
    assert!(gone.is_some(), "an expired upload cannot be completed");
    assert_eq!(app.log_records().await, 0);
}

/// Starts an embedded direct upload of `file` and PUTs it; returns the upload id and URL.
async fn uploaded(app: &TestApp, file: &[u8]) -> (String, String) {
    let created = start_upload(
        app,
        json!({"content_type": "image/jpeg", "bytes": file.len()}),
    )
    .await;
    assert_eq!(created.status(), 201);
    let upload: Value = created.json().await.unwrap();
    let url = upload["url"].as_str().unwrap();
    assert_eq!(
        put(app, url, file.to_vec(), "image/jpeg").await.status(),
        200
    );
    (
        upload["upload_id"].as_str().unwrap().to_owned(),
        url.to_owned(),
    )
}

/// Reported: a second PUT racing a completion left other bytes under the first file's
/// sha256, and promotion kept whatever sat at the target, so every later upload of the first
/// file deduped onto the other bytes. The race's outcome is planted here directly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_content_address_always_holds_the_bytes_it_names() {
    let app = spawn_app().await;
    let (file, other) = (images::jpeg(320, 240, 51), images::jpeg(320, 240, 52));
    let sha = hex::encode(Sha256::digest(&file));
    app.backends
        .objects
        .put_bytes(&format!("originals/{sha}"), other.into())
        .await
        .unwrap();
    let (id, _) = uploaded(&app, &file).await;
    let done = complete(&app, ALICE, &id, json!({})).await;
    assert_eq!(done.status(), 202);
    let body: Value = done.json().await.unwrap();
    assert_eq!(body["sha256"], sha);
    let stored = app
        .client
        .get(app.url(&format!("/media/originals/{sha}")))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(
        hex::encode(Sha256::digest(&stored)),
        sha,
        "the name holds its bytes"
    );
}

/// Reported: concurrent completions of one upload gave one 202 and several 503s logged at
/// ERROR, or, when the bytes already existed, two media items from one upload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_completions_make_one_media_item_and_no_5xx() {
    let app = spawn_app().await;
    let mut items = 0;
    for (round, bytes_exist) in [(0u32, false), (1, true)] {
        let file = images::jpeg(400, 300, 60 + round);
        if bytes_exist {
            assert_eq!(app.upload(ALICE, file.clone(), None).await.status(), 202);
            items += 1;
        }
        let (id, _) = uploaded(&app, &file).await;
        let answers =
            futures::future::join_all((0..8).map(|_| complete(&app, ALICE, &id, json!({})))).await;
        let statuses: Vec<u16> = answers.iter().map(|r| r.status().as_u16()).collect();
        assert_eq!(
            statuses.iter().filter(|&&s| s == 202).count(),
            1,
            "one winner: {statuses:?}"
        );
        assert!(
            statuses.iter().all(|s| [202, 409, 404].contains(s)),
            "only the winner, 409 or 404: {statuses:?}"
        );
        items += 1;
        app.wait_caught_up().await;
        let (_, page) = app
            .get_json_as(Some(ALICE), "/v1/owners/alice/media?limit=100")
            .await;
        assert_eq!(
            page["items"].as_array().unwrap().len(),
            items,
            "one media item per upload, round {round}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claimed_upload_refuses_puts_and_other_completions_with_409() {
    let app = spawn_app().await;
    let file = images::jpeg(200, 150, 70);
    let (id, url) = uploaded(&app, &file).await;
    let uuid = uuid::Uuid::parse_str(&id).unwrap();
    // A completion in progress elsewhere holds the claim.
    let claim = conveyor_ingest::direct::claim_key(uuid);
    assert!(
        app.backends
            .objects
            .put_if_absent(&claim, bytes::Bytes::from_static(b"0"))
            .await
            .unwrap()
    );
    let late_put = put(&app, &url, images::jpeg(200, 150, 71), "image/jpeg").await;
    assert_eq!(late_put.status(), 409, "the bytes can no longer change");
    let again = complete(&app, ALICE, &id, json!({})).await;
    assert_eq!(again.status(), 409);
    let body: Value = again.json().await.unwrap();
    assert_eq!(body["error"]["code"], "upload_completing");
    app.backends.objects.delete(&claim).await.unwrap();
    let done = complete(&app, ALICE, &id, json!({})).await;
    assert_eq!(done.status(), 202, "the claim released, it completes");
}

/// Reported: a direct upload whose PUT said `Content-Type: text/html` was completed with 202, and
/// S3 then served that content address as `text/html` through the redirect, also for an earlier
/// uploader's item with the same bytes. The type is Conveyor's own everywhere: the signed URL
/// pins the declared type (the embedded edge answers 415, S3 refuses the signature), bytes that
/// reach `incoming/` with a forged type anyway are stored typed by their sniffed bytes, and the
/// redirect pins the sniffed type in the presigned GET.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_claiming_html_is_refused_on_the_embedded_store() {
    let app = spawn_app().await;
    let file = images::jpeg(64, 48, 90);
    let upload: Value = start_upload(
        &app,
        json!({"content_type": "image/jpeg", "bytes": file.len()}),
    )
    .await
    .json()
    .await
    .unwrap();
    let url = upload["url"].as_str().unwrap();
    assert_eq!(upload["headers"]["content-type"], "image/jpeg");
    let refused = put(&app, url, file.clone(), "text/html").await;
    assert_eq!(refused.status(), 415);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unsupported_media_type", "{body}");
    assert_eq!(put(&app, url, file, "image/jpeg").await.status(), 200);
    let done = complete(
        &app,
        ALICE,
        upload["upload_id"].as_str().unwrap(),
        json!({}),
    )
    .await;
    assert_eq!(done.status(), 202);
    let id = done.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let item = app.wait_processed(&id).await;
    let original = app
        .client
        .get(app.url(item["original"]["url"].as_str().unwrap()))
        .send()
        .await
        .unwrap();
    assert_eq!(original.status(), 200);
    assert_eq!(original.headers()["content-type"], "image/jpeg");
    assert_eq!(original.headers()["x-content-type-options"], "nosniff");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_put_as_html_are_stored_and_served_as_what_they_are_on_s3() {
    let Some(objects) = s3_bucket().await else {
        return;
    };
    let app = spawn_app_with(|s| s.objects = objects.clone()).await;
    let store = s3_store(&objects).await;
    let (client, bucket) = store.client();
    let file = images::jpeg(64, 48, 91);

    // An earlier uploader's item with the same bytes.
    let earlier = app.upload(BOB, file.clone(), None).await;
    assert_eq!(earlier.status(), 202);
    let earlier = earlier.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    app.wait_processed(&earlier).await;

    let upload: Value = start_upload(
        &app,
        json!({"content_type": "image/jpeg", "bytes": file.len()}),
    )
    .await
    .json()
    .await
    .unwrap();
    let upload_id = upload["upload_id"].as_str().unwrap();
    let url = upload["url"].as_str().unwrap();
    // The presigned PUT's signature covers its Content-Type, so S3 refuses another one
    // (`SignatureDoesNotMatch`). moto does not check signed headers, so that refusal is not
    // shown here: the URL is checked to sign the header instead.
    let signed_headers = url
        .split(['?', '&'])
        .find_map(|p| p.strip_prefix("X-Amz-SignedHeaders="))
        .unwrap_or_default()
        .to_owned();
    assert!(
        signed_headers.split("%3B").any(|h| h == "content-type"),
        "the PUT URL signs its Content-Type: {url}"
    );
    // Bytes that reach `incoming/` typed text/html anyway (a URL issued before the pin).
    client
        .put_object()
        .bucket(bucket)
        .key(format!("incoming/{upload_id}"))
        .content_type("text/html")
        .body(file.clone().into())
        .send()
        .await
        .unwrap();
    let done = complete(&app, ALICE, upload_id, json!({})).await;
    assert_eq!(done.status(), 202);
    let id = done.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    app.wait_processed(&id).await;

    let no_redirects = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    for item in [&earlier, &id] {
        let (_, row) = app.media(item).await;
        let path = row["original"]["url"].as_str().unwrap().to_owned();
        let key = path.trim_start_matches("/media/");
        let stored = client
            .head_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await
            .unwrap();
        assert_eq!(stored.content_type(), Some("image/jpeg"), "{item}: in S3");
        let redirect = no_redirects.get(app.url(&path)).send().await.unwrap();
        assert_eq!(redirect.status(), 302);
        assert_eq!(redirect.headers()["x-content-type-options"], "nosniff");
        let location = redirect.headers()["location"].to_str().unwrap().to_owned();
        assert!(
            location.contains("response-content-type=image%2Fjpeg"),
            "the type is pinned in the URL (moto ignores it; S3 serves it): {location}"
        );
        let served = reqwest::get(&location).await.unwrap();
        assert_eq!(served.status(), 200);
        assert_eq!(
            served.headers()["content-type"],
            "image/jpeg",
            "{item}: served"
        );
        assert_eq!(served.bytes().await.unwrap(), file, "{item}: the bytes");
    }
}
