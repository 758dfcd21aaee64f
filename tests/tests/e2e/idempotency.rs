//! `Idempotency-Key` on uploads (issue 24, item 5). Reported: an upload answered 503 during a
//! broker hang had been appended anyway, and the client's retry made a second media item. A
//! retry with the same key and the same bytes now gets the first answer and makes no second
//! item, whichever attempt's append landed; the same key with other bytes is 409.

use bytes::Bytes;
use conveyor_storage::log::Delivered;
use conveyor_tests::helpers::{ALICE, BOB, TestApp, wait_until};
use conveyor_tests::images;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

conveyor_tests::on_every_log!(
    a_retried_upload_with_its_key_is_one_item,
    a_completion_retried_with_its_key_gets_its_first_answer
);

async fn upload_with_key(
    app: &TestApp,
    who: &str,
    key: Option<&str>,
    file: Vec<u8>,
) -> reqwest::Response {
    let form = reqwest::multipart::Form::new()
        .part(
            "file",
            reqwest::multipart::Part::bytes(file).file_name("photo.jpg"),
        )
        .text("title", "holiday");
    let mut request = app
        .client
        .post(app.url("/v1/media"))
        .bearer_auth(who)
        .multipart(form);
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    request.send().await.unwrap()
}

/// Where the edge keeps `owner`'s `key` (`services/ingest/src/idempotency.rs`).
fn receipt_key(owner: &str, key: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(owner.as_bytes());
    hasher.update([0]);
    hasher.update(key.as_bytes());
    format!("events/idempotency/{}.json", hex::encode(hasher.finalize()))
}

async fn uploaded_records(app: &TestApp, id: &str) -> Vec<Delivered> {
    let (log, topic) = (&app.backends.log, app.settings.topic());
    let mut out = Vec::new();
    for p in 0..log.partitions(topic).await.unwrap() {
        for d in log.read(topic, p, 0, 10_000).await.unwrap() {
            if d.key == id.as_bytes() && d.header("event-type") == Some("MediaUploaded") {
                out.push(d);
            }
        }
    }
    out
}

async fn a_retried_upload_with_its_key_is_one_item(app: TestApp) {
    let file = images::jpeg(48, 32, 70);
    let key = "8e03978e-40d5-43e8-bc93-6894a57f9324";
    let first = upload_with_key(&app, ALICE, Some(key), file.clone()).await;
    assert_eq!(first.status(), 202);
    let first: Value = first.json().await.unwrap();
    let id = first["id"].as_str().unwrap().to_owned();

    // A retry gets the first answer.
    let again = upload_with_key(&app, ALICE, Some(key), file.clone()).await;
    assert_eq!(again.status(), 202);
    assert_eq!(again.headers()["location"], format!("/v1/media/{id}"));
    assert_eq!(again.json::<Value>().await.unwrap(), first);

    // The same key with other bytes, or with a malformed key: refused, nothing appended.
    let other = upload_with_key(&app, ALICE, Some(key), images::jpeg(48, 32, 71)).await;
    assert_eq!(other.status(), 409);
    let body: Value = other.json().await.unwrap();
    assert_eq!(body["error"]["code"], "idempotency_key_reused", "{body}");
    let bad = upload_with_key(&app, ALICE, Some(""), file.clone()).await;
    assert_eq!(bad.status(), 400);
    assert_eq!(
        bad.json::<Value>().await.unwrap()["error"]["code"],
        "invalid_idempotency_key"
    );
    // Keys are per owner: Bob's same key is Bob's own upload.
    let bobs = upload_with_key(&app, BOB, Some(key), file.clone()).await;
    assert_eq!(bobs.status(), 202);
    assert_ne!(bobs.json::<Value>().await.unwrap()["id"], first["id"]);

    // The race of the report: the first append landed but its answer was a 503, so the key's
    // receipt says "released, no answer". The retry appends the very same event again.
    let objects = &app.backends.objects;
    let receipt_at = receipt_key("alice", key);
    let mut receipt: Value =
        serde_json::from_slice(&objects.get_bytes(&receipt_at).await.unwrap()).unwrap();
    receipt["answer"] = Value::Null;
    receipt["released"] = json!(true);
    objects
        .put_bytes(
            &receipt_at,
            Bytes::from(serde_json::to_vec(&receipt).unwrap()),
        )
        .await
        .unwrap();
    let retried = upload_with_key(&app, ALICE, Some(key), file.clone()).await;
    assert_eq!(retried.status(), 202);
    assert_eq!(
        retried.json::<Value>().await.unwrap(),
        first,
        "the same item"
    );
    let records = uploaded_records(&app, &id).await;
    assert_eq!(records.len(), 2, "the event is in the log twice");
    assert_eq!(
        records[0].value, records[1].value,
        "the very same event, byte for byte"
    );

    app.wait_processed(&id).await;
    app.wait_caught_up().await;
    let (_, stats) = app.get_json_as(Some(ALICE), "/v1/owners/alice/stats").await;
    assert_eq!(stats["media_count"], 1, "one item: {stats}");
    let (_, timeline) = app.get_json("/v1/owners/alice/media").await;
    assert_eq!(timeline["items"].as_array().unwrap().len(), 1, "{timeline}");
    assert_eq!(timeline["items"][0]["id"], id.as_str());
}

async fn a_completion_retried_with_its_key_gets_its_first_answer(app: TestApp) {
    let file = images::jpeg(48, 32, 72);
    let upload: Value = app
        .client
        .post(app.url("/v1/uploads"))
        .bearer_auth(ALICE)
        .json(&json!({"content_type": "image/jpeg", "bytes": file.len()}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let url = upload["url"].as_str().unwrap();
    let url = if url.starts_with('/') {
        app.url(url)
    } else {
        url.to_owned()
    };
    let put = app
        .client
        .put(url)
        .header("content-type", "image/jpeg")
        .body(file)
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 200);
    let complete = |key: Option<&'static str>| {
        let mut request = app
            .client
            .post(app.url(&format!(
                "/v1/uploads/{}/complete",
                upload["upload_id"].as_str().unwrap()
            )))
            .bearer_auth(ALICE);
        if let Some(key) = key {
            request = request.header("idempotency-key", key);
        }
        request.send()
    };
    let first = complete(Some("complete-1")).await.unwrap();
    assert_eq!(first.status(), 202);
    let first: Value = first.json().await.unwrap();
    let again = complete(Some("complete-1")).await.unwrap();
    assert_eq!(again.status(), 202, "the first answer, not 404");
    assert_eq!(again.json::<Value>().await.unwrap(), first);
    assert_eq!(
        complete(None).await.unwrap().status(),
        404,
        "without the key, the upload is gone"
    );
    let id = first["id"].as_str().unwrap();
    assert_eq!(uploaded_records(&app, id).await.len(), 1);
    let processed = wait_until(std::time::Duration::from_secs(20), || async {
        let (status, body) = app.media(id).await;
        (status == 200 && body["status"] == "processed").then_some(())
    })
    .await;
    assert!(processed.is_some(), "{id} was processed");
}

/// A retry of an upload that filled the owner's quota gets its first answer, not 413 (review
/// finding: the quota was checked before the key was looked up), while a new upload is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_retry_at_the_quota_gets_its_first_answer() {
    let file = images::jpeg(48, 32, 73);
    let quota = file.len() as u64 + 10;
    let app = conveyor_tests::helpers::spawn_app_with(|s| s.auth.owner_quota_bytes = quota).await;
    let first = upload_with_key(&app, ALICE, Some("fills-the-quota"), file.clone()).await;
    assert_eq!(first.status(), 202);
    let first: Value = first.json().await.unwrap();
    app.wait_processed(first["id"].as_str().unwrap()).await;
    let again = upload_with_key(&app, ALICE, Some("fills-the-quota"), file.clone()).await;
    assert_eq!(again.status(), 202, "the first answer, not 413");
    assert_eq!(again.json::<Value>().await.unwrap(), first);
    let new = upload_with_key(&app, ALICE, Some("a-new-one"), images::jpeg(48, 32, 74)).await;
    assert_eq!(new.status(), 413, "a new upload is over the quota");
    let unkeyed = upload_with_key(&app, ALICE, None, images::jpeg(48, 32, 75)).await;
    assert_eq!(unkeyed.status(), 413);

    // Someone else's completion with a key is refused and leaves no receipt behind.
    let before = app
        .backends
        .objects
        .list("events/idempotency/")
        .await
        .unwrap()
        .len();
    let upload: Value = app
        .client
        .post(app.url("/v1/uploads"))
        .bearer_auth(BOB)
        .json(&json!({"content_type": "image/jpeg", "bytes": 100}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let stranger = app
        .client
        .post(app.url(&format!(
            "/v1/uploads/{}/complete",
            upload["upload_id"].as_str().unwrap()
        )))
        .bearer_auth(ALICE)
        .header("idempotency-key", "not-mine")
        .send()
        .await
        .unwrap();
    assert_eq!(stranger.status(), 403);
    assert_eq!(
        app.backends
            .objects
            .list("events/idempotency/")
            .await
            .unwrap()
            .len(),
        before,
        "no receipt left behind"
    );
}
