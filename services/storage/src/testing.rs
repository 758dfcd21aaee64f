//! Where the tests find the real engines. `scripts/engines up` (which `scripts/test` runs)
//! starts Apache Kafka, Apache Cassandra and moto's S3 API on loopback and exports their
//! addresses; every engine test reads them through [`engine`].
//!
//! Not behind a `testsuite` feature: the end-to-end crate would then build this crate a second
//! time with other features, and this is two small functions.

/// The name of the variable that holds the Kafka bootstrap address, `host:port`.
pub const KAFKA: &str = "CONVEYOR_TEST_KAFKA";
/// The name of the variable that holds a CQL node, as a read-store URI:
/// `scylla://host:port/keyspace_prefix`.
pub const CQL: &str = "CONVEYOR_TEST_CQL";
/// The name of the variable that holds the S3 API endpoint, `http://host:port`.
pub const S3: &str = "CONVEYOR_TEST_S3";

/// The value of the engine variable `var`, or `None` after a loud `SKIPPED` line on stderr.
///
/// # Panics
/// When `var` is unset and `CI` is set: on CI every engine test runs, and a missing engine
/// fails the run instead of skipping quietly.
pub fn engine(var: &str, what: &str) -> Option<String> {
    if let Some(value) = std::env::var(var).ok().filter(|v| !v.is_empty()) {
        return Some(value);
    }
    let message = format!(
        "{what} did not run: {var} is not set (scripts/test starts the engines and sets it; \
         `eval \"$(scripts/engines up)\"` does it for a shell)"
    );
    if on_ci() {
        panic!("{message}, and CI is set, so a missing engine is a failure");
    }
    eprintln!("SKIPPED: {message}");
    None
}

/// Whether this is a CI run: `CI` set to anything but empty, `0` or `false` (as `scripts/test`
/// reads it too).
pub fn on_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !matches!(v.as_str(), "" | "0" | "false"))
}

/// For tests: logs go to the test's output, and only when `TEST_LOG` is set. Later calls are
/// no-ops.
#[cfg(test)]
pub(crate) fn init_test_log() {
    if std::env::var_os("TEST_LOG").is_some() {
        let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    }
}
