//! The process-wide Prometheus recorder. Metric names and label sets are bounded: routes,
//! status classes, groups and partitions, never ids.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Buckets of the histograms that measure time spent waiting, in seconds: 10 ms to an hour.
const LONG_WAIT_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
    3600.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
static ROLE: OnceLock<&'static str> = OnceLock::new();

/// Puts the label `role="<role>"` (`serve`, `ingest`, `process`, …) on every series this
/// process exports, so the dashboard and the alert rules can tell the roles apart under any
/// scrape configuration. Takes effect only before the first [`handle`]; the first call wins.
pub fn set_role(role: &'static str) {
    let _ = ROLE.set(role);
}

/// Installs the recorder on first use and returns the handle `/metrics` renders.
pub fn handle() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let mut builder = PrometheusBuilder::new();
        if let Some(role) = ROLE.get() {
            builder = builder.add_global_label("role", *role);
        }
        let recorder = builder
            .set_buckets(&[
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ])
            .expect("static buckets are valid")
            // Waits measured in minutes as well as milliseconds: a backlog, a long video.
            .set_buckets_for_metric(Matcher::Suffix("_wait_seconds".into()), LONG_WAIT_BUCKETS)
            .expect("static buckets are valid")
            .set_buckets_for_metric(
                Matcher::Full("conveyor_upload_to_processed_seconds".into()),
                LONG_WAIT_BUCKETS,
            )
            .expect("static buckets are valid")
            .build_recorder();
        let handle = recorder.handle();
        // Another recorder may already be installed (e.g. by a test harness); then metrics go
        // there and this handle renders an empty page, which is still valid exposition format.
        let _ = metrics::set_global_recorder(recorder);
        handle
    })
}

/// Renders the Prometheus text exposition.
pub fn render() -> String {
    handle().render()
}
