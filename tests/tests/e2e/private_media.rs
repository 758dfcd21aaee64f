//! Private media: stored under `private/`, served only through HMAC-signed URLs that expire,
//! with key ids so signing keys rotate, and shown to its owner only.

use conveyor_config::KeyList;
use conveyor_tests::helpers::{ALICE, BOB, spawn_app};
use conveyor_tests::images;
use serde_json::Value;

/// Uploads `file` as Alice's private media; returns its id.
async fn upload_private(app: &conveyor_tests::helpers::TestApp, file: Vec<u8>) -> String {
    let form = reqwest::multipart::Form::new()
        .part(
            "file",
            reqwest::multipart::Part::bytes(file).file_name("p.jpg"),
        )
        .text("visibility", "private");
    let response = app
        .client
        .post(app.url("/v1/media"))
        .bearer_auth(ALICE)
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    response.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_media_is_served_only_through_valid_signed_urls() {
    let app = spawn_app().await;
    let id = upload_private(&app, images::jpeg(500, 400, 41)).await;
    let media = app.wait_processed_as(Some(ALICE), &id).await;
    assert_eq!(media["status"], "processed", "{media}");

    let url = media["variants"]["thumb"]["url"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        url.starts_with("/media/private/variants/")
            && url.contains("sig=")
            && url.contains("kid=m2"),
        "{url}"
    );
    assert!(
        media["original"]["url"]
            .as_str()
            .unwrap()
            .starts_with("/media/private/originals/")
    );

    // The signed URL serves the bytes, for private caches only.
    let ok = app.client.get(app.url(&url)).send().await.unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(
        ok.headers()["cache-control"],
        "private, max-age=3600, immutable"
    );
    assert_eq!(images::dimensions(&ok.bytes().await.unwrap()), (256, 205));

    // Unsigned, forged, altered or expired: 403, with the usual JSON error.
    let (path, query) = url.split_once('?').unwrap();
    let expires: i64 = query
        .split('&')
        .find_map(|p| p.strip_prefix("expires="))
        .unwrap()
        .parse()
        .unwrap();
    let forged = url.replace("sig=", "sig=0");
    let stretched = url.replace(
        &format!("expires={expires}"),
        &format!("expires={}", expires + 3600),
    );
    let elsewhere = url.replace("thumb.jpg", "large.jpg");
    let key = path.trim_start_matches("/media/");
    let sign = |keys: &str, expires: i64| {
        let keys = KeyList::parse(keys).unwrap();
        let (kid, sig) =
            conveyor_runtime::signing::sign(&keys, &conveyor_query::media_message(key, expires))
                .unwrap();
        format!("{path}?expires={expires}&kid={kid}&sig={sig}")
    };
    let expired = sign("m2:new-media-key", expires - 100_000);
    let unknown_key = sign("m9:some-other-key", expires);
    for bad in [
        path.to_owned(),
        forged,
        stretched,
        elsewhere,
        expired,
        unknown_key,
    ] {
        let response = app.client.get(app.url(&bad)).send().await.unwrap();
        assert_eq!(response.status(), 403, "{bad}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "forbidden");
    }

    // Rotation: a URL signed with the older key still verifies while that key is listed.
    let by_old_key = sign("m1:old-media-key", expires);
    assert_eq!(
        app.client
            .get(app.url(&by_old_key))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    // The same bytes are not reachable by their public path.
    let public_path = path.replacen("/media/private/", "/media/", 1);
    assert_eq!(
        app.client
            .get(app.url(&public_path))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );

    // A public upload's URLs carry no signature.
    let public = app.upload(ALICE, images::jpeg(120, 90, 42), None).await;
    let public_id = public.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let public_media = app.wait_processed(&public_id).await;
    assert!(
        !public_media["variants"]["thumb"]["url"]
            .as_str()
            .unwrap()
            .contains('?')
    );
    assert_eq!(
        app.get_json_as(Some(ALICE), "/v1/owners/alice/stats")
            .await
            .1["media_count"],
        2
    );

    // Bad visibility values are a 400 naming the field.
    let form = reqwest::multipart::Form::new()
        .part(
            "file",
            reqwest::multipart::Part::bytes(images::jpeg(8, 8, 43)).file_name("p.jpg"),
        )
        .text("visibility", "secret");
    let response = app
        .client
        .post(app.url("/v1/media"))
        .bearer_auth(ALICE)
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    assert!(response.text().await.unwrap().contains("visibility"));
}

/// Reported: with no key at all, `GET /v1/media/{id}` and the owner's timeline returned
/// private items with freshly signed URLs, and those URLs served the bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_media_is_absent_for_everyone_but_its_owner() {
    let app = spawn_app().await;
    let id = upload_private(&app, images::jpeg(300, 200, 44)).await;
    let public = app.upload(ALICE, images::jpeg(120, 90, 45), None).await;
    let public_id = public.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let own = app.wait_processed_as(Some(ALICE), &id).await;
    assert_eq!(own["status"], "processed", "{own}");
    app.wait_processed(&public_id).await;

    // Item: anyone else gets exactly what an id that never existed gets.
    let absent = app
        .get_json(&format!("/v1/media/{}", uuid::Uuid::now_v7()))
        .await;
    assert_eq!(absent.0, 404);
    for key in [None, Some(BOB)] {
        let seen = app.get_json_as(key, &format!("/v1/media/{id}")).await;
        assert_eq!(seen, absent, "as {key:?}");
    }
    let bobs_delete = app
        .client
        .delete(app.url(&format!("/v1/media/{id}")))
        .bearer_auth(BOB)
        .send()
        .await
        .unwrap();
    assert_eq!(
        bobs_delete.status(),
        404,
        "not 403: that would say it exists"
    );
    // A key that is not a key is refused, not read as anonymous.
    let (status, body) = app
        .get_json_as(Some("not-a-key"), &format!("/v1/media/{id}"))
        .await;
    assert_eq!(
        (status.as_u16(), body["error"]["code"].as_str()),
        (401, Some("unauthorized"))
    );

    // Timeline: others see the public item only; the owner sees both.
    let ids_in = |page: &Value| -> Vec<String> {
        page["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["id"].as_str().unwrap().to_owned())
            .collect()
    };
    for key in [None, Some(BOB)] {
        let (status, page) = app.get_json_as(key, "/v1/owners/alice/media").await;
        assert_eq!(status, 200);
        assert_eq!(ids_in(&page), vec![public_id.clone()], "as {key:?}");
        assert!(!page.to_string().contains("/media/private/"), "as {key:?}");
    }
    let (_, page) = app.get_json_as(Some(ALICE), "/v1/owners/alice/media").await;
    assert_eq!(ids_in(&page), vec![public_id.clone(), id.clone()]);

    // A cursor never points at a private item: walking the timeline a page of one at a time
    // past a newer private item shows nothing of it.
    let newest_private = upload_private(&app, images::jpeg(64, 48, 46)).await;
    app.wait_processed_as(Some(ALICE), &newest_private).await;
    let mut cursors = Vec::new();
    let mut path = "/v1/owners/alice/media?limit=1".to_owned();
    loop {
        let (status, page) = app.get_json(&path).await;
        assert_eq!(status, 200);
        let Some(cursor) = page["next_cursor"].as_str().map(str::to_owned) else {
            break;
        };
        path = format!("/v1/owners/alice/media?limit=1&cursor={cursor}");
        cursors.push(cursor);
    }
    for cursor in cursors {
        use base64::Engine;
        let decoded = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(&cursor)
            .unwrap();
        let decoded = String::from_utf8(decoded).unwrap();
        assert!(
            !decoded.contains(&id) && !decoded.contains(&newest_private),
            "a cursor names a private item: {decoded}"
        );
    }

    // Stats count private items, so they are the owner's alone.
    for key in [None, Some(BOB)] {
        let (status, body) = app.get_json_as(key, "/v1/owners/alice/stats").await;
        assert_eq!(
            (status.as_u16(), body["error"]["code"].as_str()),
            (404, Some("not_found"))
        );
    }
    let (status, stats) = app.get_json_as(Some(ALICE), "/v1/owners/alice/stats").await;
    assert_eq!(
        (status.as_u16(), stats["media_count"].as_u64()),
        (200, Some(3))
    );

    // The bytes: the unsigned private path is refused, and so is the public path of the
    // same bytes.
    let thumb = own["variants"]["thumb"]["url"].as_str().unwrap();
    let (path, _) = thumb.split_once('?').unwrap();
    for bare in [
        path.to_owned(),
        path.replacen("/media/private/", "/media/", 1),
    ] {
        let status = app
            .client
            .get(app.url(&bare))
            .send()
            .await
            .unwrap()
            .status();
        assert!(status == 403 || status == 404, "{bare}: {status}");
    }
}
