//! SIGKILL mid-load: every upload answered 202 ends processed, and counts exactly once.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use conveyor_schemas::MEDIA_EVENTS;
use conveyor_tests::helpers::{ALICE, Process, start_process, wait_until};
use conveyor_tests::images;
use serde_json::Value;

fn start(data_dir: &std::path::Path) -> Process {
    let env = [
        ("CONVEYOR__AUTH__API_KEYS", format!("alice:{ALICE}")),
        ("CONVEYOR__AUTH__SERVICE_KEYS", "svc:svc-key".to_owned()),
        ("CONVEYOR__LOG__PARTITIONS", "8".to_owned()),
    ];
    start_process("serve", data_dir, &env)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_load_loses_and_duplicates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let address = server.address.clone();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();

    // 200 uploads from 8 concurrent clients; kill the server once 60 have been answered.
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let total = 200;
    let mut tasks = Vec::new();
    for worker in 0..8u32 {
        let (client, address, acked) = (client.clone(), address.clone(), acked.clone());
        tasks.push(tokio::spawn(async move {
            for i in (worker..total).step_by(8) {
                let file = images::jpeg(48, 32, 1000 + i);
                let form = reqwest::multipart::Form::new().part(
                    "file",
                    reqwest::multipart::Part::bytes(file).file_name("p.jpg"),
                );
                let sent = client
                    .post(format!("{address}/v1/media"))
                    .bearer_auth(ALICE)
                    .multipart(form)
                    .send()
                    .await;
                // After the kill, requests fail: that client stops.
                let Ok(response) = sent else { return };
                if response.status() == 202 {
                    let body: Value = response.json().await.unwrap();
                    acked
                        .lock()
                        .unwrap()
                        .push(body["id"].as_str().unwrap().to_owned());
                }
            }
        }));
    }
    wait_until(Duration::from_secs(60), || async {
        (acked.lock().unwrap().len() >= 60).then_some(())
    })
    .await
    .expect("60 uploads answered");
    drop(server); // SIGKILL
    for t in tasks {
        let _ = t.await;
    }
    let acked: Vec<String> = acked.lock().unwrap().clone();
    assert!(
        acked.len() >= 60 && acked.len() < total as usize,
        "killed partway: {} acked",
        acked.len()
    );

    // Restart on the same data dir: everything acknowledged ends processed, once.
    let server = start(dir.path());
    let address = server.address.clone();
    for id in &acked {
        let url = format!("{address}/v1/media/{id}");
        let body = wait_until(Duration::from_secs(60), || async {
            let response = client.get(&url).send().await.ok()?;
            let body: Value = response.json().await.ok()?;
            (body["status"] == "processed").then_some(body)
        })
        .await;
        assert!(
            body.is_some(),
            "acknowledged upload {id} was lost or never processed"
        );
    }

    // Stats count each upload in the log exactly once: uploads whose 202 was lost in the kill
    // may exist too, so compare with the log rather than with the acknowledged list.
    let settings = {
        let mut s = conveyor_config::Settings::for_test(dir.path());
        s.log.partitions = 8;
        s
    };
    let log = conveyor_storage::backends::open_log(&settings).unwrap();
    let mut uploaded = HashSet::new();
    let mut upload_records = 0;
    for p in 0..8 {
        for d in log.read(MEDIA_EVENTS, p, 0, 100_000).await.unwrap() {
            if d.header("event-type") == Some("MediaUploaded") {
                upload_records += 1;
                uploaded.insert(String::from_utf8(d.key.clone()).unwrap());
            }
        }
    }
    assert_eq!(
        upload_records,
        uploaded.len(),
        "no upload was appended twice"
    );
    assert!(acked.iter().all(|id| uploaded.contains(id)));
    let stats_url = format!("{address}/v1/owners/alice/stats");
    let counted = wait_until(Duration::from_secs(60), || async {
        let stats: Value = client
            .get(&stats_url)
            .bearer_auth(ALICE)
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        (stats["media_count"].as_u64() == Some(uploaded.len() as u64)).then_some(stats)
    })
    .await;
    assert!(
        counted.is_some(),
        "stats count every upload in the log exactly once ({} uploads)",
        uploaded.len()
    );

    // And the timeline holds each of them once.
    let mut seen = HashSet::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut url = format!("{address}/v1/owners/alice/media?limit=100");
        if let Some(c) = &cursor {
            url.push_str(&format!("&cursor={c}"));
        }
        let page: Value = client.get(&url).send().await.unwrap().json().await.unwrap();
        for item in page["items"].as_array().unwrap() {
            assert!(
                seen.insert(item["id"].as_str().unwrap().to_owned()),
                "duplicate in timeline"
            );
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen, uploaded);
    drop(server);
}
