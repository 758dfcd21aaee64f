//! Redelivery and disorder leave the read models as if each event was applied once.

use conveyor_schemas::{Event, MediaProcessed};
use conveyor_storage::events::{from_delivered, to_record};
conveyor_tests::on_every_log!(
    the_same_upload_delivered_twice_changes_nothing,
    an_older_event_after_a_delete_cannot_bring_the_media_back,
    a_replica_configured_with_fewer_partitions_runs_and_takes_them_all
);

use conveyor_tests::helpers::{ALICE, TestApp};
use conveyor_tests::images;
use serde_json::Value;

/// Reads every event of one media id back from the log.
async fn events_of(app: &TestApp, id: &str) -> Vec<conveyor_storage::log::Delivered> {
    let log = &app.backends.log;
    let mut out = Vec::new();
    let topic = &app.settings.log.topic;
    for p in 0..log.partitions(topic).await.unwrap() {
        for d in log.read(topic, p, 0, 10_000).await.unwrap() {
            if d.key == id.as_bytes() {
                out.push(d);
            }
        }
    }
    out
}

async fn snapshot(app: &TestApp, id: &str) -> (Value, Value, Value) {
    let media = app.media(id).await.1;
    let timeline = app.get_json("/v1/owners/alice/media").await.1;
    let stats = app
        .get_json_as(Some(ALICE), "/v1/owners/alice/stats")
        .await
        .1;
    (media, timeline, stats)
}

async fn the_same_upload_delivered_twice_changes_nothing(app: TestApp) {
    let response = app.upload(ALICE, images::jpeg(200, 100, 5), None).await;
    let id = response.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    app.wait_processed(&id).await;
    app.wait_caught_up().await;
    let before = snapshot(&app, &id).await;
    let variants_before =
        conveyor_tests::helpers::count_files(&app.settings.data_dir.join("objects/variants"));

    // Append the very same MediaUploaded record again: both groups see it a second time.
    let events = events_of(&app, &id).await;
    let uploaded = events
        .iter()
        .find(|d| d.header("event-type") == Some("MediaUploaded"))
        .unwrap();
    app.backends
        .log
        .append(&app.settings.log.topic, vec![uploaded.to_record()])
        .await
        .unwrap();
    app.wait_caught_up().await;

    assert_eq!(snapshot(&app, &id).await, before);
    assert_eq!(before.2["media_count"], 1);
    let processed: Vec<_> = events_of(&app, &id)
        .await
        .into_iter()
        .filter(|d| d.header("event-type") == Some("MediaProcessed"))
        .collect();
    assert_eq!(processed.len(), 2, "the processor ran again");
    let (a, b) = (
        from_delivered(&processed[0]).unwrap(),
        from_delivered(&processed[1]).unwrap(),
    );
    assert_eq!(a.event_id, b.event_id, "the derived event is deterministic");
    assert_eq!(a.payload, b.payload);
    let variants_after =
        conveyor_tests::helpers::count_files(&app.settings.data_dir.join("objects/variants"));
    assert_eq!(
        variants_before, variants_after,
        "content-addressed variants are rewritten, not duplicated"
    );
}

async fn an_older_event_after_a_delete_cannot_bring_the_media_back(app: TestApp) {
    let response = app.upload(ALICE, images::jpeg(200, 100, 6), None).await;
    let id = response.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    app.wait_processed(&id).await;
    let deleted = app.delete(ALICE, &id).await;
    assert_eq!(deleted.status(), 202);
    app.wait_caught_up().await;
    assert_eq!(app.media(&id).await.0, 404);

    // A late MediaProcessed, derived from the original upload (so older than the delete), and
    // the upload itself, redelivered after the tombstone.
    let events = events_of(&app, &id).await;
    let uploaded = events
        .iter()
        .find(|d| d.header("event-type") == Some("MediaUploaded"))
        .unwrap();
    let cause = from_delivered(uploaded).unwrap();
    let late = cause.derive(
        "test",
        0,
        Event::MediaProcessed(MediaProcessed {
            width: 1,
            height: 1,
            blurhash: "00".into(),
            variants: vec![],
            exif: Default::default(),
        }),
    );
    app.backends
        .log
        .append(
            &app.settings.log.topic,
            vec![to_record(&late), uploaded.to_record()],
        )
        .await
        .unwrap();
    app.wait_caught_up().await;

    assert_eq!(app.media(&id).await.0, 404);
    let (_, stats) = app.get_json_as(Some(ALICE), "/v1/owners/alice/stats").await;
    assert_eq!(stats["media_count"], 0);
    let (_, timeline) = app.get_json("/v1/owners/alice/media").await;
    assert_eq!(timeline["items"].as_array().unwrap().len(), 0);
}

conveyor_tests::on_every_log!(json_records_from_internal_producers_are_projected);

/// An internal producer writing straight to the log in JSON, as its `content-type` says.
async fn json_records_from_internal_producers_are_projected(app: TestApp) {
    let response = app.upload(ALICE, images::jpeg(80, 60, 11), None).await;
    let id = response.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    app.wait_processed(&id).await;
    let described = conveyor_schemas::Envelope::new(
        id.parse().unwrap(),
        conveyor_storage::clock::now_micros() as u64,
        "catalogue-service",
        Event::MediaDescribed(conveyor_schemas::MediaDescribed {
            title: Some("from kafka json".into()),
            description: None,
            tags: vec!["json".into()],
        }),
    );
    let record =
        conveyor_storage::events::to_record_with(&described, conveyor_schemas::Codec::Json);
    assert_eq!(record.header("content-type"), Some("application/json"));
    assert!(record.value.starts_with(b"{"));
    app.backends
        .log
        .append(&app.settings.log.topic, vec![record])
        .await
        .unwrap();
    let body = app.wait_for_title(&id, "from kafka json").await;
    assert_eq!(body["tags"], serde_json::json!(["json"]));
}

/// Reported: after the topic grew from 4 to 8 partitions, a replica started with the old
/// setting refused to start (`topic … exists with 8 partitions`), so a rolling restart became an
/// outage. A replica configured with 4 now runs on the topic's 8, and its consumers take all 8:
/// uploads keyed to every partition are processed, and every group commits on every partition.
async fn a_replica_configured_with_fewer_partitions_runs_and_takes_them_all(app: TestApp) {
    let topic = app.settings.topic().to_owned();
    assert_eq!(app.backends.log.partitions(&topic).await.unwrap(), 8);
    let app = app.restart_with(|s| s.log.partitions = 4).await;
    assert_eq!(
        app.backends
            .log
            .ensure_topic(&topic, app.settings.log.partitions)
            .await
            .unwrap(),
        8,
        "the topic keeps its 8"
    );
    let mut partitions = std::collections::HashSet::new();
    let mut ids = Vec::new();
    // Ids are random: upload until every partition has one (about 22 uploads on average; 400
    // miss one with a chance under 1e-20).
    for seed in 0..400u32 {
        let response = app.upload(ALICE, images::jpeg(24, 16, seed), None).await;
        assert_eq!(response.status(), 202);
        let id = response.json::<Value>().await.unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned();
        partitions.insert(conveyor_storage::log::partition_for(id.as_bytes(), 8));
        ids.push(id);
        if partitions.len() == 8 && ids.len() >= 8 {
            break;
        }
    }
    assert_eq!(partitions.len(), 8, "uploads on every partition");
    for id in &ids {
        app.wait_processed(id).await;
    }
    app.wait_caught_up().await;
    for group in [&app.settings.processor.group, &app.settings.projector.group] {
        let lag = app.backends.log.lag(&topic, group).await.unwrap();
        assert_eq!(lag.len(), 8, "{group}: every partition reported");
        for partition in &lag {
            assert_eq!(partition.lag(), 0, "{group}: {partition:?}");
        }
    }
}
