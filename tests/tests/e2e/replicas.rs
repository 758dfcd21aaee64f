//! Query replicas of their own (`conveyor query`), each with its own cache. Reported: on a
//! standalone query replica a deleted item stayed readable for up to the cache TTL, while the
//! docs said a delete hides it at once: a read between the delete's append and its projection
//! put the old item back in the cache.

use std::time::{Duration, Instant};

use conveyor_tests::helpers::{ALICE, start_process, wait_until};
use conveyor_tests::images;
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_hides_the_item_on_every_query_replica_well_within_the_cache_ttl() {
    let dir = tempfile::tempdir().unwrap();
    let env = vec![
        ("CONVEYOR__AUTH__API_KEYS", format!("alice:{ALICE}")),
        ("CONVEYOR__LOG__DURABILITY", "os".to_owned()),
        // A minute: a replica that waited for the TTL would fail the bound below.
        ("CONVEYOR__QUERY__CACHE_TTL_MS", "60000".to_owned()),
    ];
    let ingest = start_process("ingest", dir.path(), &env);
    let _consumers = [
        start_process("process", dir.path(), &env),
        start_process("project", dir.path(), &env),
    ];
    let replicas = [
        start_process("query", dir.path(), &env),
        start_process("query", dir.path(), &env),
    ];
    let client = reqwest::Client::new();
    let form = reqwest::multipart::Form::new().part(
        "file",
        reqwest::multipart::Part::bytes(images::jpeg(32, 24, 80)).file_name("p.jpg"),
    );
    let response = client
        .post(format!("{}/v1/media", ingest.address))
        .bearer_auth(ALICE)
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let id = response.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let status_on = |replica: usize| {
        let url = format!("{}/v1/media/{id}", replicas[replica].address);
        let client = client.clone();
        async move {
            let response = client.get(url).send().await.unwrap();
            let status = response.status().as_u16();
            let body: Value = response.json().await.unwrap_or(Value::Null);
            (status, body["status"].as_str().map(str::to_owned))
        }
    };
    for replica in 0..2 {
        wait_until(Duration::from_secs(30), || async {
            (status_on(replica).await.1.as_deref() == Some("processed")).then_some(())
        })
        .await
        .expect("processed, and cached on the replica");
    }

    // Readers keep both caches hot through the delete, so one of them reloads the item between
    // the delete's append and its projection.
    let stop = tokio_util::sync::CancellationToken::new();
    let readers: Vec<_> = (0..2)
        .map(|replica| {
            let stop = stop.clone();
            let url = format!("{}/v1/media/{id}", replicas[replica].address);
            let client = client.clone();
            tokio::spawn(async move {
                while !stop.is_cancelled() {
                    let _ = client.get(&url).send().await;
                }
            })
        })
        .collect();
    let deleted_at = Instant::now();
    let response = client
        .delete(format!("{}/v1/media/{id}", ingest.address))
        .bearer_auth(ALICE)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    for replica in 0..2 {
        let hidden = wait_until(Duration::from_secs(10), || async {
            (status_on(replica).await.0 == 404).then_some(())
        })
        .await;
        assert!(
            hidden.is_some(),
            "replica {replica} still serves the deleted item {:?} after the delete",
            deleted_at.elapsed()
        );
    }
    eprintln!(
        "hidden on both replicas {:?} after the delete",
        deleted_at.elapsed()
    );
    stop.cancel();
    for reader in readers {
        reader.await.unwrap();
    }
}
