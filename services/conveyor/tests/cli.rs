//! The binary's command line: every role has `--help`, bad configuration is refused clearly.

use std::process::Command;

fn conveyor() -> Command {
    Command::new(env!("CARGO_BIN_EXE_conveyor"))
}

#[test]
fn every_role_has_help() {
    for role in [
        "serve",
        "ingest",
        "process",
        "transcode",
        "project",
        "query",
        "archive",
        "ops",
        "loadtest",
    ] {
        let out = conveyor().args([role, "--help"]).output().unwrap();
        assert!(out.status.success(), "{role} --help failed");
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(text.contains("Usage: conveyor"), "{role}: {text}");
    }
}

#[test]
fn an_unknown_config_key_stops_startup_with_its_name() {
    let dir = tempfile::tempdir().unwrap();
    let out = conveyor()
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .env("CONVEYOR__LOG__PARTITONS", "8")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("partitons"), "{stderr}");
}

/// The transcoder cannot work without ffmpeg: it refuses to start, naming the tool and how to
/// install it, rather than taking videos it would fail.
#[test]
fn the_transcoder_without_ffmpeg_refuses_to_start_and_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = conveyor()
        .args(["transcode", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .env("CONVEYOR__VIDEO__FFMPEG", "/nonexistent/ffmpeg")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains("ffmpeg cannot run (/nonexistent/ffmpeg") && stderr.contains("Debian"),
        "{stderr}"
    );
}

/// Each role starts on embedded backends, as its container runs it, and answers `/healthz`;
/// `conveyor healthcheck` (the image's HEALTHCHECK) agrees.
#[test]
fn every_role_starts_and_answers_healthz() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    for role in [
        "serve",
        "ingest",
        "process",
        "transcode",
        "project",
        "query",
        "archive",
    ] {
        let mut child = conveyor()
            .args([role, "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path())
            .env("CONVEYOR__AUTH__API_KEYS", "ops:ops-key")
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let address = loop {
            let line = lines.next().expect("role printed its address").unwrap();
            if let Some(rest) = line.split("listening on ").nth(1) {
                break rest.trim().to_owned();
            }
        };
        let check = conveyor()
            .args(["healthcheck", "--url", &format!("{address}/healthz")])
            .output()
            .unwrap();
        let ready = conveyor()
            .args(["healthcheck", "--url", &format!("{address}/readyz")])
            .output()
            .unwrap();
        let missing = conveyor()
            .args(["healthcheck", "--url", &format!("{address}/no-such-route")])
            .output()
            .unwrap();
        let delete = raw_status(
            &address,
            "DELETE /v1/media/0190f0e0-0000-7000-8000-000000000001",
        );
        child.kill().unwrap();
        child.wait().unwrap();
        if matches!(role, "serve" | "ingest" | "query") {
            // Query replicas take deletes too (path-based ingress cannot split by method).
            assert_eq!(delete, 401, "{role}: DELETE without a key");
        }
        assert!(
            check.status.success(),
            "{role} /healthz: {}",
            String::from_utf8_lossy(&check.stderr)
        );
        assert!(
            ready.status.success(),
            "{role} /readyz: {}",
            String::from_utf8_lossy(&ready.stderr)
        );
        assert!(!missing.status.success(), "healthcheck must fail on a 404");
    }
}

/// The status code of one bare HTTP/1.1 request.
fn raw_status(address: &str, request_line: &str) -> u16 {
    use std::io::{Read, Write};
    let host = address.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(host).unwrap();
    write!(
        stream,
        "{request_line} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

#[test]
fn ops_status_reports_every_backend_and_group_as_json() {
    let dir = tempfile::tempdir().unwrap();
    let out = conveyor()
        .args(["ops", "status", "--json", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for backend in ["log", "objects", "views"] {
        assert_eq!(status["backends"][backend]["ok"], true, "{status}");
    }
    assert_eq!(status["topic"], "media.events");
    assert_eq!(status["topic_exists"], false, "nothing has created it yet");
    assert_eq!(status["dead_letters"], 0);
    assert!(status["groups"].as_array().unwrap().is_empty());
    assert_eq!(status["access"]["rate_per_sec"], 100, "{status}");
    assert_eq!(status["access"]["owner_quota_bytes"], 0, "{status}");
    // A mistyped data dir is refused, not reported on as a fresh, empty deployment.
    refuses_a_missing_data_dir(&["ops", "status"]);
    refuses_a_missing_data_dir(&["ops", "sweep-uploads"]);
    assert_eq!(status["access"]["issued_keys"], 0, "{status}");

    // A backend that does not answer is reported, not fatal.
    let out = conveyor()
        .args(["ops", "status", "--json", "--data-dir"])
        .arg(dir.path())
        .env("CONVEYOR__VIEWS__URI", "scylla://127.0.0.1:1/nowhere")
        .output()
        .unwrap();
    assert!(out.status.success());
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["backends"]["views"]["ok"], false);
    assert!(
        status["backends"]["views"]["error"]
            .as_str()
            .unwrap()
            .contains("cannot connect to the CQL nodes")
    );
}

#[test]
fn a_backup_interval_that_is_not_a_duration_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = conveyor()
        .args(["ops", "config"])
        .current_dir(dir.path())
        .env("CONVEYOR__BACKUP__EVERY", "often")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains("often") && stderr.contains("duration"),
        "{stderr}"
    );
    let ok = conveyor()
        .args(["ops", "config"])
        .env("CONVEYOR__BACKUP__EVERY", "6h")
        .env("CONVEYOR__BACKUP__KEEP", "3")
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
}

#[test]
fn replay_names_the_projections_it_knows() {
    let dir = tempfile::tempdir().unwrap();
    let out = conveyor()
        .args(["ops", "replay", "--projection", "nope", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains("unknown projection") && stderr.contains("media"),
        "{stderr}"
    );
}

/// `ops keys create` prints a key once, `list` shows it without the key, and `revoke` marks it;
/// a bad id is refused with a message that says what an id is.
#[test]
fn ops_keys_create_list_and_revoke() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let out = conveyor()
            .args(["ops", "keys"])
            .args(args)
            .arg("--data-dir")
            .arg(dir.path())
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, key, err) = run(&["create", "carol"]);
    assert!(ok, "{err}");
    let key = key.trim().to_owned();
    assert!(
        key.starts_with("cvk_") && key.len() == 4 + 16 + 1 + 64,
        "{key}"
    );
    let id = &key[4..20];
    let (ok, listed, err) = run(&["list", "--json"]);
    assert!(ok, "{err}");
    assert!(!listed.contains(&key[21..]), "the list never shows a key");
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(listed[0]["id"], id);
    assert_eq!(listed[0]["name"], "carol");
    assert_eq!(listed[0]["kind"], "client");
    assert_eq!(listed[0]["revoked"], false);
    let (ok, _, err) = run(&["revoke", id]);
    assert!(ok, "{err}");
    let (_, table, _) = run(&["list"]);
    assert!(table.contains(id) && table.contains("revoked"), "{table}");
    let (ok, _, err) = run(&["revoke", "nope"]);
    assert!(!ok);
    assert!(err.contains("not a key id"), "{err}");
    let (ok, _, err) = run(&["revoke", "0123456789abcdef"]);
    assert!(!ok);
    assert!(err.contains("no issued key"), "{err}");
    let (ok, _, err) = run(&["revoke", &key]);
    assert!(!ok && err.contains("not a key id"), "{err}");
    assert!(
        !err.contains(&key[21..]),
        "a key given by mistake is never echoed"
    );
    let (ok, _, err) = run(&["create", "../carol"]);
    assert!(!ok && err.contains("not a key name"), "{err}");
    // A mistyped data dir is refused, not made into an empty store no server reads.
    refuses_a_missing_data_dir(&["ops", "keys", "create", "dave"]);
}

/// `args` with a `--data-dir` that does not exist fail, say so, and create nothing.
fn refuses_a_missing_data_dir(args: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("typo");
    let out = conveyor()
        .args(args)
        .arg("--data-dir")
        .arg(&missing)
        .output()
        .unwrap();
    assert!(!out.status.success(), "{args:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("does not exist"), "{args:?}: {stderr}");
    assert!(!missing.exists(), "{args:?}");
}
