//! Upload → log → processor → projector → read API, on the embedded log and on Kafka.

conveyor_tests::on_every_log!(
    an_upload_with_exif_orientation_ends_processed_with_rotated_variants,
    internal_producers_describe_media_and_the_cache_follows,
    owners_delete_their_media_and_it_disappears_everywhere
);

use conveyor_tests::helpers::{ALICE, SERVICE, TestApp};
use conveyor_tests::images;
use serde_json::json;

async fn an_upload_with_exif_orientation_ends_processed_with_rotated_variants(app: TestApp) {
    // Stored 3000×2000, orientation 6 (rotate 90° clockwise): displayed 2000×3000.
    let file = images::jpeg_with_orientation(3000, 2000, 6);
    let response = app.upload(ALICE, file.clone(), Some("harbour")).await;
    assert_eq!(response.status(), 202);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let body: serde_json::Value = response.json().await.unwrap();
    let id = body["id"].as_str().unwrap().to_owned();
    assert_eq!(body["status"], "pending");
    assert_eq!(body["links"]["self"], format!("/v1/media/{id}"));
    assert_eq!(location, format!("/v1/media/{id}"));

    let media = app.wait_processed(&id).await;
    assert_eq!(media["status"], "processed", "{media}");
    assert_eq!(
        (media["width"].as_u64(), media["height"].as_u64()),
        (Some(2000), Some(3000))
    );
    assert_eq!(media["owner"], "alice");
    assert_eq!(media["title"], "harbour");
    assert_eq!(media["content_type"], "image/jpeg");
    assert_eq!(media["bytes"].as_u64(), Some(file.len() as u64));
    assert_eq!(media["exif"]["camera_model"], "TestCam 1");
    assert!(media["blurhash"].as_str().is_some_and(|h| h.len() >= 6));
    let expected = [
        ("thumb", 171, 256),
        ("small", 427, 640),
        ("large", 1067, 1600),
    ];
    for (name, w, h) in expected {
        let v = &media["variants"][name];
        assert_eq!(
            (v["width"].as_u64(), v["height"].as_u64()),
            (Some(w), Some(h)),
            "{name}: {v}"
        );
    }

    // The thumbnail's bytes decode, at the advertised (rotated) size, with immutable caching.
    let thumb_url = media["variants"]["thumb"]["url"].as_str().unwrap();
    let thumb = app.client.get(app.url(thumb_url)).send().await.unwrap();
    assert_eq!(thumb.status(), 200);
    assert_eq!(
        thumb.headers()["cache-control"],
        "public, max-age=31536000, immutable"
    );
    assert_eq!(thumb.headers()["content-type"], "image/jpeg");
    let etag = thumb.headers()["etag"].clone();
    let bytes = thumb.bytes().await.unwrap();
    assert_eq!(images::dimensions(&bytes), (171, 256));

    // ETag revalidation and ranges on media bytes.
    let again = app
        .client
        .get(app.url(thumb_url))
        .header("if-none-match", etag)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 304);
    let ranged = app
        .client
        .get(app.url(thumb_url))
        .header("range", "bytes=0-9")
        .send()
        .await
        .unwrap();
    assert_eq!(ranged.status(), 206);
    assert_eq!(
        ranged.headers()["content-range"],
        format!("bytes 0-9/{}", bytes.len())
    );
    assert_eq!(&ranged.bytes().await.unwrap()[..], &bytes[..10]);
    let past = app
        .client
        .get(app.url(thumb_url))
        .header("range", format!("bytes={}-", bytes.len() + 5))
        .send()
        .await
        .unwrap();
    assert_eq!(past.status(), 416);
    let original = app
        .client
        .get(app.url(media["original"]["url"].as_str().unwrap()))
        .send()
        .await
        .unwrap();
    assert_eq!(original.headers()["content-type"], "image/jpeg");
    assert_eq!(original.bytes().await.unwrap().to_vec(), file);

    // The owner's timeline lists it first; stats count it.
    let other = app.upload(ALICE, images::jpeg(64, 64, 1), None).await;
    let other_id = other.json::<serde_json::Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    app.wait_processed(&other_id).await;
    let (status, timeline) = app.get_json("/v1/owners/alice/media?limit=1").await;
    assert_eq!(status, 200);
    assert_eq!(timeline["items"][0]["id"], other_id, "newest first");
    let cursor = timeline["next_cursor"]
        .as_str()
        .expect("a second page")
        .to_owned();
    let (_, page2) = app
        .get_json(&format!("/v1/owners/alice/media?limit=1&cursor={cursor}"))
        .await;
    assert_eq!(page2["items"][0]["id"], id);
    assert!(page2["next_cursor"].is_null());
    let (_, stats) = app.get_json_as(Some(ALICE), "/v1/owners/alice/stats").await;
    assert_eq!(stats["media_count"], 2);

    // Read-model responses revalidate with their ETag.
    let first = app
        .client
        .get(app.url(&format!("/v1/media/{id}")))
        .send()
        .await
        .unwrap();
    let etag = first.headers()["etag"].clone();
    let cached = app
        .client
        .get(app.url(&format!("/v1/media/{id}")))
        .header("if-none-match", etag)
        .send()
        .await
        .unwrap();
    assert_eq!(cached.status(), 304);
}

async fn internal_producers_describe_media_and_the_cache_follows(app: TestApp) {
    let response = app
        .upload(ALICE, images::jpeg(120, 80, 3), Some("before"))
        .await;
    let id = response.json::<serde_json::Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let media = app.wait_processed(&id).await;
    assert_eq!(media["title"], "before");

    let described = app
        .client
        .post(app.url("/v1/events"))
        .bearer_auth(SERVICE)
        .json(&json!({
            "aggregate_id": id,
            "payload": { "MediaDescribed": { "title": "after", "description": "a field", "tags": ["green"] } }
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(described.status(), 202);
    let accepted: serde_json::Value = described.json().await.unwrap();
    assert!(accepted["accepted"][0]["offset"].is_u64());

    // The cached response is invalidated by the projector's write, not by waiting out a TTL.
    let updated = app.wait_for_title(&id, "after").await;
    assert_eq!(updated["tags"], json!(["green"]));
    assert_eq!(updated["description"], "a field");
    assert_eq!(
        updated["status"], "processed",
        "a description leaves processing alone"
    );
}

async fn owners_delete_their_media_and_it_disappears_everywhere(app: TestApp) {
    let response = app.upload(ALICE, images::jpeg(90, 90, 4), None).await;
    let id = response.json::<serde_json::Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    app.wait_processed(&id).await;

    let by_bob = app.delete(conveyor_tests::helpers::BOB, &id).await;
    assert_eq!(by_bob.status(), 403);
    let err: serde_json::Value = by_bob.json().await.unwrap();
    assert_eq!(err["error"]["code"], "forbidden");

    let by_alice = app.delete(ALICE, &id).await;
    assert_eq!(by_alice.status(), 202);
    let gone = conveyor_tests::helpers::wait_until(std::time::Duration::from_secs(10), || async {
        (app.media(&id).await.0 == 404).then_some(())
    })
    .await;
    assert!(gone.is_some(), "deleted media answers 404");
    let (_, stats) = app.get_json_as(Some(ALICE), "/v1/owners/alice/stats").await;
    assert_eq!(stats["media_count"], 0);
    let (_, timeline) = app.get_json("/v1/owners/alice/media").await;
    assert_eq!(timeline["items"], json!([]));
}
