//! Backups taken while uploads run, restored into a new data dir, served; and a corrupt backup
//! refused.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use conveyor_config::Settings;
use conveyor_storage::objects::fs::FsObjectStore;
use conveyor_tests::helpers::{ALICE, conveyor_binary, spawn_app, spawn_in, upload_to};
use conveyor_tests::images;

async fn upload_id(response: reqwest::Response) -> String {
    assert_eq!(response.status(), 202);
    let body: serde_json::Value = response.json().await.unwrap();
    body["id"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_during_uploads_restores_everything_processed_before_it() {
    let app = spawn_app().await;
    let mut before = Vec::new();
    for seed in 0..12 {
        before.push(
            upload_id(
                app.upload(ALICE, images::jpeg(96, 64, seed), Some("before"))
                    .await,
            )
            .await,
        );
    }
    for id in &before {
        app.wait_processed(id).await;
    }

    // A load of uploads runs for the whole backup.
    let (stop, uploaded) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
    );
    let load = {
        let (stop, uploaded) = (stop.clone(), uploaded.clone());
        let (client, address) = (app.client.clone(), app.address.clone());
        tokio::spawn(async move {
            let mut seed = 1_000;
            while !stop.load(Ordering::Relaxed) {
                let response =
                    upload_to(&client, &address, ALICE, images::jpeg(64, 48, seed), None).await;
                assert_eq!(
                    response.status(),
                    202,
                    "uploads keep working during a backup"
                );
                uploaded.fetch_add(1, Ordering::Relaxed);
                seed += 1;
            }
        })
    };
    let writing = conveyor_tests::helpers::wait_until(std::time::Duration::from_secs(60), || {
        let uploaded = uploaded.clone();
        async move { (uploaded.load(Ordering::Relaxed) >= 5).then_some(()) }
    })
    .await;
    assert!(writing.is_some(), "5 uploads answered within a minute");
    // A data dir's dev key travels with it.
    std::fs::write(app.settings.data_dir.join("dev-api-key"), "cvk_kept\n").unwrap();
    let backups = tempfile::tempdir().unwrap();
    let store = FsObjectStore::open(backups.path()).unwrap();
    let first = conveyor::backup::backup(&app.settings, &store, 4, false)
        .await
        .expect("backup while serving");
    let during_backup = uploaded.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    assert!(during_backup > 5, "uploads ran during the backup");
    let manifest = &first.manifest;
    assert!(manifest.views.as_ref().unwrap().live >= before.len() as u64);
    assert_eq!(first.objects_copied as usize, manifest.objects.len());

    // Incremental: a second backup copies only objects the first did not have.
    app.wait_caught_up().await;
    let second = conveyor::backup::backup(&app.settings, &store, 4, false)
        .await
        .unwrap();
    assert_eq!(
        second.objects_copied as usize,
        second.manifest.objects.len() - manifest.objects.len(),
        "objects already backed up are not copied again"
    );

    // Restore the first into an empty data dir, and serve it.
    let restored_dir = tempfile::tempdir().unwrap();
    let settings = Settings::for_test(restored_dir.path());
    let report = conveyor::backup::restore(&settings, &store, Some(&manifest.id), 4, false)
        .await
        .expect("restore");
    assert_eq!(report.objects as usize, manifest.objects.len());
    assert_eq!(
        std::fs::read_to_string(restored_dir.path().join("dev-api-key")).unwrap(),
        "cvk_kept\n"
    );
    let restored = spawn_in(settings).await;
    for id in &before {
        let (status, media) = restored.media(id).await;
        assert_eq!(status, 200, "{id} survives the restore");
        assert_eq!(media["status"], "processed");
        let thumb = media["variants"]["thumb"]["url"].as_str().unwrap();
        let bytes = restored
            .client
            .get(restored.url(thumb))
            .send()
            .await
            .unwrap();
        assert_eq!(bytes.status(), 200, "its thumbnail was restored too");
        assert!(!bytes.bytes().await.unwrap().is_empty());
    }
    // The restored projector re-applies what the read-model snapshot may lack, and the restored
    // models then agree with the restored log: stats count exactly the timeline's items.
    restored.wait_caught_up().await;
    let (_, stats) = restored
        .get_json_as(Some(ALICE), "/v1/owners/alice/stats")
        .await;
    let mut items = 0;
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/owners/alice/media?limit=100&cursor={c}"),
            None => "/v1/owners/alice/media?limit=100".to_owned(),
        };
        let (status, page) = restored.get_json(&path).await;
        assert_eq!(status, 200);
        items += page["items"].as_array().unwrap().len();
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(stats["media_count"], items as u64);
    assert!(items >= before.len());
    restored.stop().await;

    // A corrupted file is detected, and the restore refuses it, leaving the data dir empty.
    let views = backups
        .path()
        .join(format!("backups/{}/views.db", manifest.id));
    let mut bytes = std::fs::read(&views).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x5a;
    std::fs::write(&views, bytes).unwrap();
    let target = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(conveyor_binary())
        .args(["ops", "restore", "--from"])
        .arg(backups.path())
        .args(["--id", &manifest.id, "--data-dir"])
        .arg(target.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "a corrupt backup is refused");
    assert!(
        stderr.contains("is corrupt") && stderr.contains("views.db"),
        "the error says what is wrong: {stderr}"
    );
    assert!(!target.path().join("log.db").exists());
    assert!(!target.path().join("views.db").exists());
    assert_eq!(
        conveyor_tests::helpers::count_files(&target.path().join("objects")),
        0
    );

    // The newer, intact backup still restores; pruning to one keeps it.
    let pruned = conveyor::backup::prune(&store, 1).await.unwrap();
    assert_eq!(pruned, std::slice::from_ref(&manifest.id));
    let again = tempfile::tempdir().unwrap();
    conveyor::backup::restore(&Settings::for_test(again.path()), &store, None, 4, false)
        .await
        .expect("the newest backup restores after pruning");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_takes_scheduled_backups_and_keeps_the_newest() {
    let backups = tempfile::tempdir().unwrap();
    let to = backups.path().to_str().unwrap().to_owned();
    let app = conveyor_tests::helpers::spawn_app_with(|s| {
        s.backup.every = Some(conveyor_config::Interval(std::time::Duration::from_millis(
            300,
        )));
        s.backup.keep = 2;
        s.backup.to = Some(to);
    })
    .await;
    let id = upload_id(app.upload(ALICE, images::jpeg(64, 48, 1), None).await).await;
    app.wait_processed(&id).await;
    let store = FsObjectStore::open(backups.path()).unwrap();
    let wait = std::time::Duration::from_secs(30);
    let first = conveyor_tests::helpers::wait_until(wait, || async {
        conveyor::backup::list(&store).await.ok()?.first().cloned()
    })
    .await
    .expect("a scheduled backup ran");
    // Later ones replace it: two are kept, and the first is pruned.
    let newest = conveyor_tests::helpers::wait_until(wait, || async {
        let ids = conveyor::backup::list(&store).await.ok()?;
        let newest = ids.last()?.clone();
        let manifest = conveyor::backup::read_manifest(&store, &newest)
            .await
            .ok()?;
        // Keep 2: a third exists only between its manifest and the prune that follows it.
        assert!(ids.len() <= 3, "{ids:?}");
        (!ids.contains(&first) && manifest.views.as_ref()?.live == 1).then_some(newest)
    })
    .await
    .expect("older scheduled backups are pruned");
    let restored = tempfile::tempdir().unwrap();
    conveyor::backup::restore(
        &Settings::for_test(restored.path()),
        &store,
        Some(&newest),
        4,
        false,
    )
    .await
    .expect("a scheduled backup restores");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn media_in_s3_backs_up_to_s3_and_restores_from_it() {
    use conveyor_tests::helpers::{s3_bucket, s3_store, spawn_app_on_s3};
    let Some(app) = spawn_app_on_s3().await else {
        return;
    };
    let mut ids = Vec::new();
    for seed in 0..3 {
        ids.push(upload_id(app.upload(ALICE, images::jpeg(64, 48, seed), None).await).await);
    }
    for id in &ids {
        app.wait_processed(id).await;
    }
    let target = s3_store(&s3_bucket().await.unwrap()).await;
    let report = conveyor::backup::backup(&app.settings, &target, 4, false)
        .await
        .expect("backup into S3");
    assert!(
        report.objects_copied >= 3 * 4,
        "originals and their variants"
    );

    let dir = tempfile::tempdir().unwrap();
    let mut settings = Settings::for_test(dir.path());
    settings.objects = s3_bucket().await.unwrap();
    conveyor::backup::restore(&settings, &target, None, 4, false)
        .await
        .expect("restore from S3 into an empty bucket");
    let restored = spawn_in(settings).await;
    for id in &ids {
        let (status, media) = restored.media(id).await;
        assert_eq!(
            (status.as_u16(), media["status"].as_str()),
            (200, Some("processed"))
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_on_kafka_is_refused_with_the_way_out() {
    let Some(app) = conveyor_tests::helpers::spawn_app_on_kafka().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let store = FsObjectStore::open(dir.path()).unwrap();
    let err = conveyor::backup::backup(&app.settings, &store, 4, false)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("conveyor archive"), "{err}");
    assert_eq!(conveyor_tests::helpers::count_files(dir.path()), 0);
}
