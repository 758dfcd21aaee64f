//! A hostile but realistic client, as reported against this API: events that lie about their
//! fields or come twice, bodies that are too big or never meant to be read, and the requests
//! the framework answers before any handler runs. Each test is one reported fault.

use std::time::Duration;

use conveyor_tests::helpers::{ALICE, SERVICE, TestApp, spawn_app};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn post_events(app: &TestApp, body: impl Into<reqwest::Body>) -> (u16, Value) {
    let response = app
        .client
        .post(app.url("/v1/events"))
        .bearer_auth(SERVICE)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

fn described(id: &str, title: &str) -> Value {
    json!({"aggregate_id": id, "payload": {"MediaDescribed": {"title": title, "description": null, "tags": []}}})
}

/// Reported: `"titel"` was ignored, and the event wiped the title, description and tags;
/// trailing bytes after the document were accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_fields_and_trailing_input_are_400s_that_name_them() {
    let app = spawn_app().await;
    let id = "0190f0e0-0000-7000-8000-0000000000a1";
    let before = app.log_records().await;
    let misspelt = json!({"aggregate_id": id, "payload": {"MediaDescribed": {"titel": "harbour"}}});
    let (status, body) = post_events(&app, misspelt.to_string()).await;
    assert_eq!(status, 400, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("payload.MediaDescribed") && message.contains("titel"),
        "{message}"
    );
    let extra_top = json!({"aggregate_id": id, "payload": {"MediaDeleted": {"deleted_by": "x"}}, "priority": 1});
    let (status, body) = post_events(&app, extra_top.to_string()).await;
    assert_eq!(status, 400);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("priority"),
        "{body}"
    );
    let in_array = json!([described(id, "a"), {"aggregate_id": id, "payload": {"MediaDeleted": {"deleted_by": "x", "why": "y"}}}]);
    let (status, body) = post_events(&app, in_array.to_string()).await;
    assert_eq!(status, 400);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("[1].payload.MediaDeleted"),
        "{body}"
    );
    let trailing = format!("{} {{\"more\": true}}", described(id, "a"));
    let (status, body) = post_events(&app, trailing).await;
    assert_eq!(status, 400);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("trailing"),
        "{body}"
    );
    assert_eq!(app.log_records().await, before, "nothing appended");
}

/// Reported: a repeated `event_id` was appended again, and an older event sent again
/// overwrote a newer one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_id_is_appended_once_and_a_different_event_under_it_is_409() {
    let app = spawn_app().await;
    let media = app
        .upload(ALICE, conveyor_tests::images::jpeg(64, 64, 90), None)
        .await;
    let id = media.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    app.wait_processed(&id).await;
    let first_id = "0190f0e0-0000-7000-8000-0000000000b1";
    let mut first = described(&id, "older");
    first["event_id"] = json!(first_id);
    let mut second = described(&id, "newer");
    second["event_id"] = json!("0190f0e0-0000-7000-8000-0000000000b2");

    let (status, original) = post_events(&app, first.to_string()).await;
    assert_eq!(status, 202, "{original}");
    assert_eq!(original["accepted"][0]["replayed"], false);
    assert_eq!(post_events(&app, second.to_string()).await.0, 202);
    app.wait_for_title(&id, "newer").await;
    let records = app.log_records().await;

    // The older event again: the first append's answer, nothing appended, nothing changed.
    let (status, again) = post_events(&app, first.to_string()).await;
    assert_eq!(status, 202, "{again}");
    assert_eq!(again["accepted"][0]["replayed"], true);
    for field in ["event_id", "partition", "offset"] {
        assert_eq!(
            again["accepted"][0][field], original["accepted"][0][field],
            "{field}"
        );
    }
    app.wait_caught_up().await;
    assert_eq!(app.log_records().await, records);
    assert_eq!(app.media(&id).await.1["title"], "newer");

    // The same id for another event.
    let mut forged = described(&id, "something else");
    forged["event_id"] = json!(first_id);
    let (status, body) = post_events(&app, forged.to_string()).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("event_id_conflict"))
    );
    // Twice in one request.
    let (status, _) = post_events(&app, json!([first.clone(), first]).to_string()).await;
    assert_eq!(status, 400);
}

/// Reported: when an event's append landed but its receipt never learnt where (the store
/// failed, or the process died, in between), a retry after the claim was abandoned appended it
/// again with a fresh version, and the older title overwrote a newer one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_that_takes_over_an_abandoned_claim_appends_the_first_version() {
    let app = spawn_app().await;
    let media = app
        .upload(ALICE, conveyor_tests::images::jpeg(64, 64, 91), None)
        .await;
    let id = media.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    app.wait_processed(&id).await;
    let event_id = "0190f0e0-0000-7000-8000-0000000000c1";
    let mut older = described(&id, "older");
    older["event_id"] = json!(event_id);
    assert_eq!(post_events(&app, older.to_string()).await.0, 202);
    // The receipt as a request that died after its append leaves it: no position, and
    // claimed long ago.
    let key = format!("events/{event_id}.json");
    let objects = &app.backends.objects;
    let mut receipt: Value =
        serde_json::from_slice(&objects.get_bytes(&key).await.unwrap()).unwrap();
    receipt["position"] = Value::Null;
    receipt["claimed_at"] = json!(0);
    objects
        .put_bytes(&key, serde_json::to_vec(&receipt).unwrap().into())
        .await
        .unwrap();
    assert_eq!(
        post_events(&app, described(&id, "newer").to_string())
            .await
            .0,
        202
    );
    app.wait_for_title(&id, "newer").await;

    let (status, retried) = post_events(&app, older.to_string()).await;
    assert_eq!(status, 202, "{retried}");
    app.wait_caught_up().await;
    assert_eq!(
        app.media(&id).await.1["title"],
        "newer",
        "the older event, appended again, is still the older one"
    );
}

/// Reported: a `%ff` in a path got 400 in text/plain, an over-limit event body 413 in
/// text/plain, and a wrong method 405 with an empty body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_is_json_with_the_right_status() {
    let app = spawn_app().await;
    let check = |response: reqwest::Response, status: u16, code: &'static str| async move {
        assert_eq!(response.status().as_u16(), status);
        assert_eq!(response.headers()["content-type"], "application/json");
        let allow = response.headers().get("allow").cloned();
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], code, "{body}");
        assert!(!body["error"]["message"].as_str().unwrap().is_empty());
        allow
    };
    let bad_path = app
        .client
        .get(app.url("/v1/media/%ff"))
        .send()
        .await
        .unwrap();
    check(bad_path, 400, "bad_request").await;
    let unknown = app.client.get(app.url("/v1/nothing")).send().await.unwrap();
    check(unknown, 404, "not_found").await;
    let wrong_method = app
        .client
        .patch(app.url("/v1/media/0190f0e0-0000-7000-8000-000000000001"))
        .send()
        .await
        .unwrap();
    let allow = check(wrong_method, 405, "method_not_allowed").await;
    assert!(allow.is_some_and(|a| a.to_str().unwrap().contains("GET")));
    // A 3 MB event body, refused from its head alone; the client waits for the go-ahead, as
    // curl does for bodies over 1 MB.
    for (key, status, code) in [
        (None, 401, "unauthorized"),
        (Some(SERVICE), 413, "too_large"),
    ] {
        let auth = key
            .map(|k| format!("Authorization: Bearer {k}\r\n"))
            .unwrap_or_default();
        let head = format!(
            "POST /v1/events HTTP/1.1\r\nHost: test\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
            3 << 20
        );
        let answer = answer_before_body(&app, &head).await;
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}")),
            "{answer}"
        );
        assert!(
            answer
                .to_lowercase()
                .contains("content-type: application/json"),
            "{answer}"
        );
        assert!(answer.contains(&format!("\"code\":\"{code}\"")), "{answer}");
    }
}

/// Sends only a request's head, as a client that waits for `100 Continue` does, and returns
/// the status line the server answers with.
async fn status_before_body(app: &TestApp, head: &str) -> String {
    let answer = answer_before_body(app, head).await;
    answer.lines().next().unwrap_or_default().to_owned()
}

/// The whole first answer (up to 4 KiB) to a request's head sent alone.
async fn answer_before_body(app: &TestApp, head: &str) -> String {
    let address = app.address.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let mut buffer = vec![0u8; 4096];
    // Read until the head and a JSON body (if any) are in: the answer is one short response.
    while answer.len() < 4096 {
        let read = tokio::time::timeout(Duration::from_millis(500), stream.read(&mut buffer)).await;
        match read {
            Ok(Ok(n)) if n > 0 => answer.extend_from_slice(&buffer[..n]),
            _ if answer.is_empty() => panic!("no answer without the body"),
            _ => break,
        }
    }
    String::from_utf8_lossy(&answer).into_owned()
}

/// Reported: over-limit bodies were read before they were refused, even from clients without
/// a key and even with `Expect: 100-continue`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_and_declared_lengths_are_checked_before_the_body() {
    let app = spawn_app_with_small_uploads().await;
    let head = |key: Option<&str>, length: u64| {
        let auth = key
            .map(|k| format!("Authorization: Bearer {k}\r\n"))
            .unwrap_or_default();
        format!(
            "POST /v1/media HTTP/1.1\r\nHost: test\r\n{auth}Content-Type: multipart/form-data; boundary=b\r\nContent-Length: {length}\r\nExpect: 100-continue\r\n\r\n"
        )
    };
    let no_key = status_before_body(&app, &head(None, 200 << 20)).await;
    assert!(no_key.starts_with("HTTP/1.1 401"), "{no_key}");
    // Over the largest file of any type (a video's 2 GiB): refused from the head. (A body
    // under it is read, since only its bytes say whether it is an image, held to 100 MiB.)
    let over = status_before_body(&app, &head(Some(ALICE), 3 << 30)).await;
    assert!(over.starts_with("HTTP/1.1 413"), "{over}");
    let fine = status_before_body(&app, &head(Some(ALICE), 1000)).await;
    assert!(
        fine.starts_with("HTTP/1.1 100"),
        "a body within the limit is asked for: {fine}"
    );
}

async fn spawn_app_with_small_uploads() -> TestApp {
    conveyor_tests::helpers::spawn_app_with(|s| s.limits.max_upload_bytes = 1 << 20).await
}

/// Connects to `address` (`host:port`), sends `head`, then up to `body_bytes` of `fill`
/// (stopping quietly if the server closes), and returns the status line it answered with.
async fn send_raw(address: &str, head: String, fill: u8, body_bytes: usize) -> String {
    let address = address.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    let chunk = vec![fill; 64 << 10];
    let mut sent = 0;
    while sent < body_bytes {
        if stream.write_all(&chunk).await.is_err() {
            break;
        }
        sent += chunk.len();
    }
    let mut answer = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut answer))
        .await
        .map(|r| r.unwrap_or(0))
        .unwrap_or(0);
    let answer = String::from_utf8_lossy(&answer[..n]).into_owned();
    answer.lines().next().unwrap_or_default().to_owned()
}

fn upload_head(length: usize) -> String {
    format!(
        "POST /v1/media HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {ALICE}\r\nContent-Type: multipart/form-data; boundary=never\r\nContent-Length: {length}\r\n\r\n"
    )
}

/// Reported: a body that ended early, or a client that went away mid-upload, got a 500 and an
/// ERROR log line for every such client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_ends_early_is_a_400_and_stores_nothing() {
    let app = spawn_app().await;
    let address = app.address.trim_start_matches("http://").to_owned();
    let part =
        "--never\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jpg\"\r\n\r\n";
    let head = format!(
        "POST /v1/media HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {ALICE}\r\nContent-Type: multipart/form-data; boundary=never\r\nContent-Length: 1000000\r\n\r\n{part}"
    );
    let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&[0xff, 0xd8, 0xff, 0xe0]).await.unwrap();
    stream.write_all(&vec![7u8; 100_000]).await.unwrap();
    // The client stops sending: its side of the body ends 900 KB short.
    stream.shutdown().await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut answer))
        .await
        .expect("answered")
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("\"incomplete_body\""), "{answer}");
    assert_eq!(app.log_records().await, 0, "nothing appended");
    let objects = app.settings.data_dir.join("objects");
    let stored = ["originals", "incoming"]
        .iter()
        .map(|d| conveyor_tests::helpers::count_files(&objects.join(d)))
        .sum::<usize>();
    assert_eq!(stored, 0, "nothing stored");
}

/// Reported: a multipart body whose boundary never appears was buffered whole and rescanned:
/// four parallel 95 MB bodies took the RSS from 94 to 368 MB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_whose_boundary_never_comes_are_cut_off_with_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let server = conveyor_tests::helpers::start_process(
        "serve",
        dir.path(),
        &[("CONVEYOR__AUTH__API_KEYS", format!("alice:{ALICE}"))],
    );
    let status = |field: &str| -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", server.child.id()))
            .unwrap()
            .lines()
            .find_map(|l| {
                l.strip_prefix(field)?
                    .trim()
                    .strip_suffix(" kB")?
                    .parse()
                    .ok()
            })
            .unwrap()
    };
    let before = status("VmRSS:");
    let body = 24 << 20;
    let answers = futures::future::join_all(
        (0..8).map(|_| send_raw(&server.address, upload_head(body), b'x', body)),
    )
    .await;
    for answer in &answers {
        assert!(
            answer.is_empty() || answer.starts_with("HTTP/1.1 400"),
            "{answer}"
        );
    }
    assert!(
        answers.iter().any(|a| a.starts_with("HTTP/1.1 400")),
        "{answers:?}"
    );
    let growth_mib = status("VmHWM:").saturating_sub(before) / 1024;
    assert!(
        growth_mib < 48,
        "8 × 24 MB without a boundary grew the RSS by {growth_mib} MiB"
    );
}

/// Whether the server closed `stream` within `within`: a read that ends (0 bytes) or fails.
async fn closed_within(stream: &mut tokio::net::TcpStream, within: Duration) -> bool {
    let mut buffer = [0u8; 256];
    loop {
        match tokio::time::timeout(within, stream.read(&mut buffer)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            // A 408 or similar before the close: keep reading to the end.
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

/// Reported: no header-read timeout, no idle timeout and no cap on connections; 2,000 idle
/// connections and 500 half-sent headers stayed open for as long as the client wanted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_half_sent_connections_are_closed_while_clients_are_served() {
    let app = conveyor_tests::helpers::spawn_app_with(|s| {
        s.http.header_read_timeout_ms = 1_000;
    })
    .await;
    let address = app.address.trim_start_matches("http://").to_owned();
    let mut idle = Vec::new();
    for i in 0..20 {
        let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
        if i % 2 == 1 {
            stream
                .write_all(b"GET /healthz HTTP/1.1\r\nHost: slow\r\n")
                .await
                .unwrap();
        }
        idle.push(stream);
    }
    // A keep-alive connection that went quiet after a request.
    let mut kept = tokio::net::TcpStream::connect(&address).await.unwrap();
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: kept\r\n\r\n")
        .await
        .unwrap();
    let mut first = [0u8; 512];
    let n = kept.read(&mut first).await.unwrap();
    assert!(String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"));
    idle.push(kept);
    // A normal client is served throughout.
    for _ in 0..5 {
        let (status, _) = app.get_json("/healthz").await;
        assert_eq!(status, 200);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (i, stream) in idle.iter_mut().enumerate() {
        assert!(
            closed_within(stream, Duration::from_secs(5)).await,
            "connection {i} ({}) still open",
            match i {
                20 => "keep-alive, quiet",
                i if i % 2 == 1 => "half a head",
                _ => "idle",
            }
        );
    }
    assert_eq!(app.get_json("/healthz").await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_cap_are_closed_at_once() {
    let app = conveyor_tests::helpers::spawn_app_with(|s| {
        s.http.max_connections = 8;
        s.http.header_read_timeout_ms = 10_000;
    })
    .await;
    let address = app.address.trim_start_matches("http://").to_owned();
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(tokio::net::TcpStream::connect(&address).await.unwrap());
    }
    // No wait needed: the kernel hands connections to the accept loop in the order they came,
    // and the loop takes each one's slot before it accepts the next.
    let mut ninth = tokio::net::TcpStream::connect(&address).await.unwrap();
    assert!(
        closed_within(&mut ninth, Duration::from_secs(2)).await,
        "the ninth connection is closed long before the 10 s head deadline"
    );
    drop(held);
    // The slots free up as their connections close.
    let served = conveyor_tests::helpers::wait_until(Duration::from_secs(5), || async {
        let response = app.client.get(app.url("/healthz")).send().await.ok()?;
        (response.status() == 200).then_some(())
    })
    .await;
    assert!(served.is_some());
}

/// Reported: a client that asks for a large object and never reads the response held its
/// connection, and a slot under the cap, for as long as it liked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_dropped() {
    let app = conveyor_tests::helpers::spawn_app_with(|s| {
        s.http.write_stall_timeout_ms = 1_000;
    })
    .await;
    // 24 MB that sniffs as a JPEG: more than the kernel buffers on both sides hold.
    let mut original = vec![0xff, 0xd8, 0xff, 0xe0];
    original.extend((0..24_000_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8));
    let response = app.upload(ALICE, original.clone(), None).await;
    assert_eq!(response.status(), 202);
    let sha: String = {
        use sha2::{Digest, Sha256};
        hex::encode(Sha256::digest(&original))
    };
    let address: std::net::SocketAddr = app.address.trim_start_matches("http://").parse().unwrap();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(address).await.unwrap();
    stream
        .write_all(format!("GET /media/originals/{sha} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())
        .await
        .unwrap();
    // The server gives up on the write once it has stalled for the limit (1 s); wait for that
    // before reading anything, or the reads would unstall it. Only this test stalls a write.
    let gave_up = conveyor_tests::helpers::wait_until(Duration::from_secs(30), || async {
        let metrics = app.client.get(app.url("/metrics")).send().await.ok()?;
        let text = metrics.text().await.ok()?;
        text.lines()
            .any(|l| {
                // `conveyor_write_stalls_total{role="serve"} 1`, or without labels.
                let name = l.split(['{', ' ']).next();
                name == Some("conveyor_write_stalls_total") && !l.ends_with(" 0")
            })
            .then_some(())
    })
    .await;
    assert!(
        gave_up.is_some(),
        "the stalled write was given up within 30 s"
    );
    // Reading now gets what was buffered, then the end: the server gave up on this client.
    let mut received = 0usize;
    let mut buffer = vec![0u8; 1 << 16];
    let ended = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => received += n,
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the connection is still open");
    assert!(
        received < original.len(),
        "all {received} bytes came: it never stalled"
    );
}

/// Sends `head`, then `chunk` every `every` until `total` body bytes are out or the server
/// answers, and returns the answer (status line, headers and body) and how long it took.
async fn trickle(
    address: &str,
    head: &[u8],
    chunk: &[u8],
    every: Duration,
    total: usize,
) -> (String, Duration) {
    let started = std::time::Instant::now();
    let mut stream = tokio::net::TcpStream::connect(address.trim_start_matches("http://"))
        .await
        .unwrap();
    stream.write_all(head).await.unwrap();
    let mut answer = vec![0u8; 4096];
    let mut sent = 0;
    while sent < total {
        let n = chunk.len().min(total - sent);
        if stream.write_all(&chunk[..n]).await.is_err() {
            break;
        }
        sent += n;
        if let Ok(read) = tokio::time::timeout(every, stream.read(&mut answer)).await {
            let n = read.unwrap_or(0);
            return (
                String::from_utf8_lossy(&answer[..n]).into_owned(),
                started.elapsed(),
            );
        }
    }
    let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut answer))
        .await
        .map(|r| r.unwrap_or(0))
        .unwrap_or(0);
    (
        String::from_utf8_lossy(&answer[..n]).into_owned(),
        started.elapsed(),
    )
}

/// Reported: a body sent a byte every 29 s held its upload, and a slot under the connection
/// cap, for as long as the client liked; the signed PUT needs no key, so anyone could.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickled_bodies_are_cut_off_while_clients_are_served() {
    let app = conveyor_tests::helpers::spawn_app_with(|s| {
        s.http.min_body_rate_bytes_per_sec = 2_000;
        s.http.body_rate_grace_ms = 1_000;
    })
    .await;
    let signed_put = |bytes: usize| {
        let app = &app;
        async move {
            let created: Value = app
                .client
                .post(app.url("/v1/uploads"))
                .bearer_auth(ALICE)
                .json(&json!({"content_type": "image/jpeg", "bytes": bytes, "sha256": "ab".repeat(32)}))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let url = created["url"].as_str().unwrap().to_owned();
            format!(
                "PUT {url} HTTP/1.1\r\nHost: test\r\nContent-Type: image/jpeg\r\nContent-Length: {bytes}\r\n\r\n"
            )
        }
    };
    let part =
        "--never\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jpg\"\r\n\r\n";
    let mut multipart = format!("{}{part}", upload_head(100_000)).into_bytes();
    multipart.extend_from_slice(&[0xff, 0xd8, 0xff, 0xe0]);
    let slow_put = signed_put(100_000).await;
    // 500 bytes/s, a quarter of the minimum: both are cut off soon after the 1 s grace, while a
    // normal client uploads and reads throughout.
    let slow = futures::future::join3(
        trickle(
            &app.address,
            slow_put.as_bytes(),
            &[0xff; 50],
            Duration::from_millis(100),
            100_000,
        ),
        trickle(
            &app.address,
            &multipart,
            &[0xd8; 50],
            Duration::from_millis(100),
            100_000,
        ),
        async {
            let mut served = 0;
            for seed in 0..3 {
                let response = app
                    .upload(ALICE, conveyor_tests::images::jpeg(64, 64, seed), None)
                    .await;
                assert_eq!(response.status(), 202);
                assert_eq!(app.get_json("/healthz").await.0, 200);
                served += 1;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            served
        },
    )
    .await;
    for (route, (answer, took)) in [("signed PUT", &slow.0), ("multipart", &slow.1)] {
        assert!(answer.starts_with("HTTP/1.1 408"), "{route}: {answer}");
        assert!(answer.contains("application/json"), "{route}: {answer}");
        assert!(answer.contains("\"body_too_slow\""), "{route}: {answer}");
        assert!(
            *took < Duration::from_secs(6),
            "{route} cut off after {took:?}"
        );
    }
    assert_eq!(slow.2, 3);
    // A client above the minimum (4,000 bytes/s for 3 s) is not cut off, grace or no grace.
    let steady_put = signed_put(12_000).await;
    let (answer, _) = trickle(
        &app.address,
        steady_put.as_bytes(),
        &[0xff; 400],
        Duration::from_millis(100),
        12_000,
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"bytes\":12000"), "{answer}");
}
