//! Replaying a read model from the log while reads run, and rebuilding one from the archive.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use conveyor::Role;
use conveyor_schemas::{MediaRow, OwnerStats};
use conveyor_storage::views::ReadStore;
use conveyor_storage::views::sqlite::SqliteReadStore;
use conveyor_tests::helpers::{ALICE, BOB, TestApp, wait_until};
use conveyor_tests::images;
use conveyor_tests::on_every_log;

on_every_log!(
    a_replay_under_read_load_rebuilds_the_same_model,
    the_archive_rebuilds_the_same_model
);

/// Uploads for two owners, processes them, deletes a few; returns every id.
async fn some_history(app: &TestApp) -> Vec<String> {
    let mut ids = Vec::new();
    for seed in 0..16 {
        let key = if seed % 4 == 0 { BOB } else { ALICE };
        let response = app.upload(key, images::jpeg(80, 60, seed), Some("t")).await;
        assert_eq!(response.status(), 202);
        let body: serde_json::Value = response.json().await.unwrap();
        ids.push(body["id"].as_str().unwrap().to_owned());
    }
    for id in &ids {
        app.wait_processed(id).await;
    }
    for id in &ids[1..4] {
        assert_eq!(app.delete(ALICE, id).await.status(), 202);
    }
    app.wait_caught_up().await;
    ids
}

/// Everything a read store shows for these ids and owners.
async fn model(
    views: &dyn ReadStore,
    ids: &[String],
) -> (Vec<Option<MediaRow>>, Vec<OwnerStats>, Vec<Vec<MediaRow>>) {
    let mut rows = Vec::new();
    for id in ids {
        rows.push(views.media(id.parse().unwrap()).await.unwrap());
    }
    let mut stats = Vec::new();
    let mut timelines = Vec::new();
    for owner in ["alice", "bob"] {
        stats.push(views.owner_stats(owner).await.unwrap());
        timelines.push(views.owner_timeline(owner, None, 100).await.unwrap().items);
    }
    (rows, stats, timelines)
}

/// `ops replay --projection <projection>`, from the log alone.
async fn replay_log(
    app: &TestApp,
    projection: &str,
) -> anyhow::Result<conveyor::replay::ReplayReport> {
    conveyor::replay::replay(
        &app.settings,
        app.backends.log.clone(),
        projection,
        false,
        None,
        false,
    )
    .await
}

/// On ScyllaDB, replay is a documented procedure, and the command says so.
fn on_scylla(app: &TestApp) -> bool {
    matches!(
        app.settings.views_uri(),
        conveyor_config::ViewsUri::Scylla(_)
    )
}

async fn a_replay_under_read_load_rebuilds_the_same_model(app: TestApp) {
    let ids = some_history(&app).await;
    if on_scylla(&app) {
        let err = replay_log(&app, "media").await.unwrap_err();
        assert!(err.to_string().contains("migrate a new keyspace"), "{err}");
        return;
    }
    let before = model(&*app.backends.views, &ids).await;
    assert_eq!(before.1[0].media_count, 12 - 3);

    // Reads run for the whole replay, and every one must succeed.
    let (stop, reads) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
    );
    let readers = {
        let (stop, reads) = (stop.clone(), reads.clone());
        let (client, base, id) = (app.client.clone(), app.address.clone(), ids[5].clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                for path in [
                    format!("/v1/media/{id}"),
                    "/v1/owners/alice/media?limit=5".to_owned(),
                    "/v1/owners/alice/stats".to_owned(),
                ] {
                    // Alice's key: her stats are hers alone.
                    let response = client
                        .get(format!("{base}{path}"))
                        .bearer_auth(ALICE)
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(response.status(), 200, "{path} answers during the replay");
                    reads.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    // Uploads run too: events the live projector applies around the switch must all land in the
    // new generation.
    let writers = {
        let stop = stop.clone();
        let (client, base) = (app.client.clone(), app.address.clone());
        tokio::spawn(async move {
            let mut ids = Vec::new();
            let mut seed = 500;
            while !stop.load(Ordering::Relaxed) {
                let response = conveyor_tests::helpers::upload_to(
                    &client,
                    &base,
                    BOB,
                    images::jpeg(48, 32, seed),
                    None,
                )
                .await;
                assert_eq!(response.status(), 202);
                let body: serde_json::Value = response.json().await.unwrap();
                ids.push(body["id"].as_str().unwrap().to_owned());
                seed += 1;
            }
            ids
        })
    };
    let report = replay_log(&app, "media").await.expect("replay");
    stop.store(true, Ordering::Relaxed);
    readers.await.unwrap();
    let during = writers.await.unwrap();
    assert!(!during.is_empty());
    for id in &during {
        app.wait_processed(id).await;
    }
    app.wait_caught_up().await;
    assert!(reads.load(Ordering::Relaxed) > 0);
    assert_eq!((report.generation, report.replaced), (1, 0));
    assert!(report.log_events >= ids.len() as u64);

    let after = model(&*app.backends.views, &ids).await;
    assert_eq!(after.0, before.0, "the rebuilt rows equal the ones before");
    assert_eq!(
        after.1[0], before.1[0],
        "alice, untouched during the replay, is the same"
    );
    assert_eq!(
        after.1[1].media_count,
        before.1[1].media_count + during.len() as u64,
        "bob's stats count the uploads made during the replay, once each"
    );
    let groups = app.backends.log.groups(app.settings.topic()).await.unwrap();
    assert!(
        !groups.iter().any(|g| g.contains("-replay-")),
        "the replay's group is gone: {groups:?}"
    );

    // The live projector now writes to the new generation.
    let response = app.upload(ALICE, images::jpeg(80, 60, 99), None).await;
    let id: serde_json::Value = response.json().await.unwrap();
    app.wait_processed(id["id"].as_str().unwrap()).await;

    // An unknown projection is a clear error.
    let err = replay_log(&app, "nope").await.unwrap_err();
    assert!(err.to_string().contains("unknown projection"), "{err}");
}

async fn the_archive_rebuilds_the_same_model(app: TestApp) {
    let mut settings = app.settings.clone();
    settings.listen = "127.0.0.1:0".parse().unwrap();
    settings.archive.group = format!("archive-{}", uuid::Uuid::new_v4().simple());
    settings.archive.batch = 7; // several segments per partition
    let archiver = conveyor::build(settings.clone(), Role::Archive)
        .await
        .expect("archive role builds");
    let stop_archiver = archiver.stop_token();
    let archiving = tokio::spawn(archiver.run_until_stopped());

    let ids = some_history(&app).await;
    let log = app.backends.log.clone();
    let (topic, group) = (settings.topic().to_owned(), settings.archive.group.clone());
    wait_until(Duration::from_secs(60), || async {
        let lag = log.lag(&topic, &group).await.ok()?;
        (!lag.is_empty() && lag.iter().all(|l| l.lag() == 0)).then_some(())
    })
    .await
    .expect("the archive caught up");
    stop_archiver.cancel();
    archiving.await.unwrap().unwrap();
    let segments = conveyor::archive::segments(&*app.backends.objects, &topic)
        .await
        .unwrap();
    assert!(segments.values().map(Vec::len).sum::<usize>() > 1);

    // Segments alone, into an empty read store.
    let dir = tempfile::tempdir().unwrap();
    let rebuilt = SqliteReadStore::open(dir.path().join("views.db")).unwrap();
    let applied = conveyor::archive::replay_into(
        &*app.backends.objects,
        &topic,
        &rebuilt,
        app.settings.views.max_version_ahead_secs,
        &indicatif::ProgressBar::hidden(),
    )
    .await
    .unwrap();
    assert!(applied >= ids.len() as u64);
    let live = model(&*app.backends.views, &ids).await;
    assert_eq!(
        model(&rebuilt, &ids).await,
        live,
        "the archive rebuilds the same model"
    );

    // And `ops replay --from-archive`: the archive, then the log, into a new generation.
    if on_scylla(&app) {
        return;
    }
    let report = conveyor::replay::replay(
        &app.settings,
        app.backends.log.clone(),
        "media",
        false,
        Some(&*app.backends.objects),
        false,
    )
    .await
    .unwrap();
    assert_eq!(report.archived_events, applied);
    assert_eq!(model(&*app.backends.views, &ids).await, live);
}
