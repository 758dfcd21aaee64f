//! Scale-out on Kafka, with the read models on the CQL node when one is configured (Cassandra in
//! `scripts/test`): one `ingest`, two `process`, two `project` and one `query` process share
//! the broker and the stores. One processor and one projector are killed with SIGKILL
//! mid-load; the survivors take their partitions over, and every acknowledged upload ends in
//! the read models exactly once.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use conveyor_config::Settings;
use conveyor_schemas::MediaStatus;
use conveyor_storage::backends::{open_log, open_views};
use conveyor_tests::helpers::{
    ALICE, caught_up, cql_views, kafka_brokers, start_process, wait_until,
};
use conveyor_tests::images;
use serde_json::Value;

const UPLOADS: u32 = 5_000;
const KILL_AFTER: usize = 1_500;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_consumers_are_replaced_and_every_upload_lands_once() {
    let Some(brokers) = kafka_brokers() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let run = uuid::Uuid::new_v4().simple().to_string();
    let mut settings = Settings::for_test(dir.path());
    settings.log.uri = Some(conveyor_config::LogUri::Kafka(brokers.clone()));
    settings.log.topic = format!("scale-{run}");
    settings.log.partitions = 8;
    settings.processor.group = format!("processor-{run}");
    settings.projector.group = format!("projector-{run}");
    let views = cql_views().await;
    let mut env = vec![
        ("CONVEYOR__LOG__URI", settings.log_uri().to_string()),
        ("CONVEYOR__LOG__TOPIC", settings.log.topic.clone()),
        ("CONVEYOR__LOG__PARTITIONS", "8".to_owned()),
        ("CONVEYOR__LOG__SESSION_TIMEOUT_MS", "6000".to_owned()),
        ("CONVEYOR__LOG__DURABILITY", "os".to_owned()),
        (
            "CONVEYOR__PROCESSOR__GROUP",
            settings.processor.group.clone(),
        ),
        (
            "CONVEYOR__PROJECTOR__GROUP",
            settings.projector.group.clone(),
        ),
        ("CONVEYOR__AUTH__API_KEYS", format!("alice:{ALICE}")),
    ];
    if let Some(views) = views {
        env.push((
            "CONVEYOR__VIEWS__URI",
            views.uri.clone().unwrap().to_string(),
        ));
        env.push(("CONVEYOR__VIEWS__REPLICATION_FACTOR", "1".to_owned()));
        settings.views = views;
    }
    // The ingest edge creates the topics; the consumers start once they exist.
    let ingest = start_process("ingest", dir.path(), &env);
    let mut processors = vec![
        start_process("process", dir.path(), &env),
        start_process("process", dir.path(), &env),
    ];
    let mut projectors = vec![
        start_process("project", dir.path(), &env),
        start_process("project", dir.path(), &env),
    ];
    let query = start_process("query", dir.path(), &env);

    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..16u32 {
        let (client, address, acked) = (client.clone(), ingest.address.clone(), acked.clone());
        tasks.push(tokio::spawn(async move {
            for i in (worker..UPLOADS).step_by(16) {
                let form = reqwest::multipart::Form::new().part(
                    "file",
                    reqwest::multipart::Part::bytes(images::jpeg(24, 16, i)).file_name("p.jpg"),
                );
                let response = client
                    .post(format!("{address}/v1/media"))
                    .bearer_auth(ALICE)
                    .multipart(form)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), 202);
                let body: Value = response.json().await.unwrap();
                acked
                    .lock()
                    .unwrap()
                    .push(body["id"].as_str().unwrap().to_owned());
            }
        }));
    }
    wait_until(Duration::from_secs(120), || async {
        (acked.lock().unwrap().len() >= KILL_AFTER).then_some(())
    })
    .await
    .expect("uploads are being acknowledged");
    drop(processors.remove(0)); // SIGKILL
    drop(projectors.remove(0)); // SIGKILL
    for t in tasks {
        t.await.unwrap();
    }
    let acked: Vec<String> = acked.lock().unwrap().clone();
    assert_eq!(acked.len(), UPLOADS as usize);
    eprintln!(
        "{UPLOADS} uploads acknowledged in {:.1?}",
        started.elapsed()
    );

    // The survivors catch up: lag returns to zero in both groups.
    let log = open_log(&settings).unwrap();
    let caught_up = wait_until(Duration::from_secs(180), || async {
        caught_up(&*log, &settings).await.then_some(())
    })
    .await;
    assert!(caught_up.is_some(), "lag returned to 0 after the kills");
    eprintln!("processed and projected in {:.1?}", started.elapsed());

    // Every acknowledged upload is processed, and counted exactly once.
    let views = open_views(&settings.views_uri(), &settings.views)
        .await
        .unwrap();
    for id in &acked {
        let row = views.media(id.parse().unwrap()).await.unwrap();
        let row = row.unwrap_or_else(|| panic!("acknowledged upload {id} is missing"));
        assert_eq!(row.status, MediaStatus::Processed, "{id}");
    }
    let stats = views.owner_stats("alice").await.unwrap();
    assert_eq!(
        stats.media_count, UPLOADS as u64,
        "each upload counted once"
    );
    let mut seen = HashSet::new();
    let mut cursor = None;
    loop {
        let page = views.owner_timeline("alice", cursor, 100).await.unwrap();
        for item in &page.items {
            assert!(seen.insert(item.id), "duplicate in the timeline");
        }
        match page.next {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    assert_eq!(seen.len(), UPLOADS as usize);

    // The standalone query edge serves them too.
    let sample = &acked[acked.len() / 2];
    let body: Value = client
        .get(format!("{}/v1/media/{sample}", query.address))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["status"], "processed");
}
