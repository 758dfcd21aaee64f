//! Media in S3 (moto's server on loopback): the pipeline stores originals and variants in the
//! bucket, `/media/{key}` redirects to a presigned URL, and `ops migrate-objects` moves an
//! embedded store into a bucket, resumably and verified.

use conveyor::ops::migrate_objects;
use conveyor_storage::objects::ObjectStore;
use conveyor_tests::helpers::{ALICE, s3_bucket, s3_store, spawn_app, spawn_app_with};
use conveyor_tests::images;
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_land_in_s3_and_media_redirects_to_it() {
    let Some(objects) = s3_bucket().await else {
        return;
    };
    let store = s3_store(&objects).await;
    let app = spawn_app_with(|s| s.objects = objects.clone()).await;
    let file = images::jpeg(900, 600, 21);
    let response = app.upload(ALICE, file.clone(), None).await;
    assert_eq!(response.status(), 202);
    let body: Value = response.json().await.unwrap();
    let media = app.wait_processed(body["id"].as_str().unwrap()).await;
    assert_eq!(media["status"], "processed", "{media}");

    // The bytes are in the bucket, content-addressed; nothing is left under incoming/.
    let sha = body["sha256"].as_str().unwrap();
    assert_eq!(
        store
            .get_bytes(&format!("originals/{sha}"))
            .await
            .unwrap()
            .to_vec(),
        file
    );
    assert!(
        store
            .head(&format!("variants/{sha}/thumb.jpg"))
            .await
            .unwrap()
            .is_some()
    );
    assert!(store.list("incoming/").await.unwrap().is_empty());

    // The edge redirects to a presigned URL; the bytes come from S3, not through Conveyor.
    let thumb = media["variants"]["thumb"]["url"].as_str().unwrap();
    let no_follow = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let redirect = no_follow.get(app.url(thumb)).send().await.unwrap();
    assert_eq!(redirect.status(), 302);
    let location = redirect.headers()["location"].to_str().unwrap().to_owned();
    assert!(
        location.starts_with(&std::env::var("CONVEYOR_TEST_S3").unwrap()),
        "{location}"
    );
    assert!(location.contains("X-Amz-Signature"), "{location}");
    let bytes = reqwest::get(&location)
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(images::dimensions(&bytes), (256, 171));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_objects_copies_an_embedded_store_into_s3_resumably() {
    let Some(objects) = s3_bucket().await else {
        return;
    };
    // Fill an embedded store through the real pipeline.
    let app = spawn_app().await;
    for seed in 0..3 {
        let response = app
            .upload(ALICE, images::jpeg(300, 200, 100 + seed), None)
            .await;
        let body: Value = response.json().await.unwrap();
        app.wait_processed(body["id"].as_str().unwrap()).await;
    }
    let source = app.backends.objects.clone();
    let expected = source.list("").await.unwrap();
    assert_eq!(
        expected.len(),
        3 * 4,
        "three originals and their three variants each"
    );

    let target = s3_store(&objects).await;
    let first = migrate_objects(&*source, &target, "", 4, false)
        .await
        .unwrap();
    assert_eq!((first.copied, first.skipped), (12, 0));
    let copied = target.list("").await.unwrap();
    assert_eq!(copied, expected, "same keys and sizes");
    for meta in &expected {
        assert_eq!(
            target.get_bytes(&meta.key).await.unwrap(),
            source.get_bytes(&meta.key).await.unwrap()
        );
    }

    // A second run copies nothing.
    let again = migrate_objects(&*source, &target, "", 4, false)
        .await
        .unwrap();
    assert_eq!((again.copied, again.skipped), (0, 12));

    // Interrupted half-way: the rest is copied, nothing twice.
    for meta in expected.iter().step_by(2) {
        target.delete(&meta.key).await.unwrap();
    }
    let resumed = migrate_objects(&*source, &target, "", 4, false)
        .await
        .unwrap();
    assert_eq!((resumed.copied, resumed.skipped), (6, 6));
    assert_eq!(target.list("").await.unwrap(), expected);
}
