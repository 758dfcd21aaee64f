//! The API contract and abuse controls: the OpenAPI document served is the one checked in and
//! names only routes that exist; keys are kept as hashes and revoked ones stop working within
//! seconds; per-key rates, per-owner quotas, and CORS for browser clients.

use std::time::{Duration, Instant};

use conveyor_config::Settings;
use conveyor_runtime::keys::{self, KeyKind};
use conveyor_tests::helpers::{ALICE, BOB, TestApp, spawn_app, spawn_app_with, wait_until};
use conveyor_tests::images;
use serde_json::{Value, json};

fn checked_in_document() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../schemas/openapi.json");
    std::fs::read_to_string(path).expect("schemas/openapi.json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_served_openapi_document_is_the_checked_in_one() {
    let app = spawn_app().await;
    let response = app
        .client
        .get(app.url("/openapi.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    let served = response.text().await.unwrap();
    assert!(
        served == checked_in_document(),
        "/openapi.json differs from schemas/openapi.json; regenerate it with \
         `cargo run --release -- openapi > schemas/openapi.json`"
    );
    let document: Value = serde_json::from_str(&served).unwrap();
    assert_eq!(document["openapi"], "3.1.0");
    assert!(document["components"]["securitySchemes"]["client_key"].is_object());
}

/// Every operation the document names is a route the server has: a request to it is never
/// the router's own 404 or 405.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_operation_is_routed() {
    let app = spawn_app().await;
    let document: Value = serde_json::from_str(&checked_in_document()).unwrap();
    let paths = document["paths"].as_object().unwrap();
    assert!(paths.len() >= 12, "{:?}", paths.keys());
    for (path, item) in paths {
        let concrete = path
            .replace("{id}", "0190f0e0-0000-7000-8000-0000000000c1")
            .replace("{owner}", "alice")
            .replace("{key}", "originals/none");
        for method in item.as_object().unwrap().keys() {
            let method = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let response = app
                .client
                .request(method.clone(), app.url(&concrete))
                .bearer_auth(ALICE)
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            let body: Value = response.json().await.unwrap_or(Value::Null);
            assert_ne!(status, 405, "{method} {path}: {body}");
            assert_ne!(
                body["error"]["message"], "no such route",
                "{method} {path} is documented but not routed"
            );
            assert!(status < 500, "{method} {path}: {status} {body}");
        }
    }
}

/// Issued keys are stored as their sha256 only, work on every route once read, and stop
/// working within `auth.refresh_ms` of a revocation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issued_keys_work_and_revoked_ones_stop_within_seconds() {
    let app = spawn_app_with(|s: &mut Settings| s.auth.refresh_ms = 200).await;
    let objects = app.backends.objects.clone();
    let (record, key) = keys::issue(&*objects, KeyKind::Client, "carol")
        .await
        .unwrap();
    let (_, service_key) = keys::issue(&*objects, KeyKind::Service, "tagger")
        .await
        .unwrap();
    let started = Instant::now();
    let upload = wait_until(Duration::from_secs(5), || async {
        let response = app.upload(&key, images::jpeg(64, 48, 900), None).await;
        (response.status() == 202).then_some(response)
    })
    .await
    .expect("an issued key is accepted once read");
    let id = upload.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(started.elapsed() < Duration::from_secs(3));
    // A service key is no client key, and the other way round.
    let as_client = app
        .upload(&service_key, images::jpeg(64, 48, 901), None)
        .await;
    assert_eq!(as_client.status(), 401);
    let event = json!({"aggregate_id": id, "payload": {"MediaDescribed": {"title": "t", "description": null, "tags": []}}});
    let post = |bearer: String| {
        app.client
            .post(app.url("/v1/events"))
            .bearer_auth(bearer)
            .json(&event)
            .send()
    };
    assert_eq!(post(key.clone()).await.unwrap().status(), 401);
    assert_eq!(post(service_key.clone()).await.unwrap().status(), 202);

    // Nothing in the store holds a key, only hashes.
    for object in objects.list("auth/").await.unwrap() {
        let stored = objects.get_bytes(&object.key).await.unwrap();
        let text = String::from_utf8_lossy(&stored);
        let secret = &key[key.rfind('_').unwrap() + 1..];
        assert!(!text.contains(secret), "{} holds the key", object.key);
    }

    assert!(keys::revoke(&*objects, &record.id).await.unwrap());
    let revoked_at = Instant::now();
    wait_until(Duration::from_secs(5), || async {
        let (status, _) = app.get_json_as(Some(&key), "/v1/owners/carol/stats").await;
        (status == 401).then_some(())
    })
    .await
    .expect("a revoked key is refused");
    assert!(
        revoked_at.elapsed() < Duration::from_secs(2),
        "refused within the refresh interval and then some: {:?}",
        revoked_at.elapsed()
    );
    let refused = app.upload(&key, images::jpeg(64, 48, 902), None).await;
    assert_eq!(refused.status(), 401);
}

/// A key past its rate and burst gets 429 with `Retry-After`; other keys and anonymous
/// readers are not slowed by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_over_its_rate_gets_429_with_retry_after() {
    const ALICE_SECOND: &str = "alice-second-key";
    let app = spawn_app_with(|s: &mut Settings| {
        s.auth.rate_per_sec = 2;
        s.auth.rate_burst = 5;
        s.auth.api_keys = conveyor_config::KeyList::parse(&format!(
            "alice:{ALICE},alice:{ALICE_SECOND},bob:{BOB}"
        ))
        .unwrap();
    })
    .await;
    let mut statuses = Vec::new();
    let mut limited = None;
    for _ in 0..12 {
        let response = app
            .client
            .get(app.url("/v1/owners/alice/media"))
            .bearer_auth(ALICE)
            .send()
            .await
            .unwrap();
        statuses.push(response.status().as_u16());
        if response.status() == 429 && limited.is_none() {
            let retry_after: u64 = response.headers()["retry-after"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            let body: Value = response.json().await.unwrap();
            limited = Some((retry_after, body));
        }
    }
    // The burst of 5 passes at once; at 2/s, a slow machine may let one more through.
    let passed = statuses.iter().filter(|&&s| s == 200).count();
    assert!(
        (5..=6).contains(&passed) && statuses[..5].iter().all(|&s| s == 200),
        "the burst passes, then the rate holds: {statuses:?}"
    );
    assert!(
        statuses.iter().all(|&s| s == 200 || s == 429),
        "{statuses:?}"
    );
    let (retry_after, body) = limited.expect("a 429");
    assert!((1..=2).contains(&retry_after), "{retry_after}");
    assert_eq!(body["error"]["code"], "rate_limited", "{body}");
    let (status, _) = app.get_json_as(Some(BOB), "/v1/owners/bob/media").await;
    assert_eq!(status, 200, "another key has its own rate");
    let (status, _) = app
        .get_json_as(Some(ALICE_SECOND), "/v1/owners/alice/media")
        .await;
    assert_eq!(status, 200, "so has the same owner's other key");
    let (status, _) = app.get_json("/v1/owners/alice/media").await;
    assert_eq!(
        status, 200,
        "anonymous readers are not counted against a key"
    );
    tokio::time::sleep(Duration::from_secs(retry_after)).await;
    let (status, _) = app.get_json_as(Some(ALICE), "/v1/owners/alice/media").await;
    assert_eq!(status, 200, "after Retry-After the key works again");
}

/// An owner whose originals would pass the quota gets 413 `quota_exceeded`, through both upload
/// paths, and nothing of the refused upload is kept; other owners are not affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_over_the_quota_gets_413_and_keeps_nothing() {
    let first = images::jpeg(320, 240, 910);
    let quota = first.len() as u64 * 3 / 2;
    let app = spawn_app_with(|s: &mut Settings| s.auth.owner_quota_bytes = quota).await;
    let response = app.upload(ALICE, first.clone(), None).await;
    assert_eq!(response.status(), 202);
    let id = response.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    app.wait_processed(&id).await;
    app.wait_caught_up().await;
    let objects_before = app.backends.objects.list("").await.unwrap().len();

    let second = images::jpeg(320, 240, 911);
    let refused = app.upload(ALICE, second.clone(), None).await;
    assert_eq!(refused.status(), 413);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "quota_exceeded", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains(&quota.to_string()),
        "{body}"
    );
    let direct = app
        .client
        .post(app.url("/v1/uploads"))
        .bearer_auth(ALICE)
        .json(&json!({"content_type": "image/jpeg", "bytes": second.len()}))
        .send()
        .await
        .unwrap();
    assert_eq!(direct.status(), 413);
    assert_eq!(
        app.backends.objects.list("").await.unwrap().len(),
        objects_before,
        "nothing of the refused uploads is kept"
    );
    assert_eq!(
        app.upload(BOB, second, None).await.status(),
        202,
        "bob has his own quota"
    );
}

/// CORS is off unless configured; configured, a listed origin's preflight is answered and
/// its responses carry the header, and any other origin gets none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_is_off_by_default_and_answers_only_configured_origins() {
    let preflight = |app: &TestApp, origin: &'static str| {
        app.client
            .request(reqwest::Method::OPTIONS, app.url("/v1/media"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "authorization")
            .send()
    };
    let app = spawn_app().await;
    let response = preflight(&app, "https://app.example.com").await.unwrap();
    assert!(
        !response
            .headers()
            .contains_key("access-control-allow-origin"),
        "off by default"
    );
    let app = spawn_app_with(|s: &mut Settings| {
        s.http.cors_origins = conveyor_config::CorsOrigins::parse(
            "https://app.example.com, https://admin.example.com",
        )
        .unwrap();
    })
    .await;
    let response = preflight(&app, "https://app.example.com").await.unwrap();
    assert!(response.status().is_success(), "{}", response.status());
    assert_eq!(
        response.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    let methods = response.headers()["access-control-allow-methods"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(methods.contains("POST"), "{methods}");
    assert!(
        response.headers()["access-control-allow-headers"]
            .to_str()
            .unwrap()
            .contains("authorization")
    );
    assert!(
        !response
            .headers()
            .contains_key("access-control-allow-credentials")
    );
    let other = preflight(&app, "https://evil.example").await.unwrap();
    assert!(!other.headers().contains_key("access-control-allow-origin"));
    let read = app
        .client
        .get(app.url("/v1/owners/alice/media"))
        .header("origin", "https://admin.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(
        read.headers()["access-control-allow-origin"],
        "https://admin.example.com"
    );
    assert!(
        read.headers()["access-control-expose-headers"]
            .to_str()
            .unwrap()
            .contains("etag")
    );
}
