//! The binary's command line: every role has `--help`, bad configuration is refused clearly.

use std::process::Command;

fn conveyor() -> Command {
    Command::new(env!("CARGO_BIN_EXE_conveyor"))
}

#[test]
fn every_role_has_help() {
    for role in [
        "serve", "ingest", "process", "project", "query", "ops", "loadtest",
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
