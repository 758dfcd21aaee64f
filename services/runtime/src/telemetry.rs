//! Logs and traces. `RUST_LOG` sets the log filter; the log format (text or JSON) and the trace
//! export (`telemetry.zipkin_endpoint`, `telemetry.trace_sample_ratio`) come from config.
//!
//! Traces are OpenTelemetry spans made from the `tracing` spans of target [`trace::TARGET`]
//! (`crate::trace`) by `tracing-opentelemetry`, batched on a thread of their own and sent to a
//! Zipkin v2 collector ([`crate::zipkin`]). With no endpoint set, no span of that target is
//! made, so the hot path pays one check per request and per record.

use anyhow::Context;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{BatchSpanProcessor, Sampler, SdkTracerProvider};
use tracing_subscriber::filter::{EnvFilter, LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry};

use conveyor_config::{LogFormat, TelemetrySettings};

use crate::trace;

/// What [`init`] set up. Keep it for the life of the process and call
/// [`Telemetry::shutdown`] at the end, so the last batch of spans is sent.
#[must_use = "dropping it early stops nothing, but shutdown() is what sends the last spans"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Sends the spans still queued (waiting at most the SDK's shutdown timeout, 5 s) and stops
    /// the export thread. A failure is logged, never returned: it cannot change the exit.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(e) = provider.shutdown()
        {
            tracing::warn!(error = %e, "failed to send the last spans");
        }
    }
}

/// Installs the global subscriber once: log lines to stderr and, when
/// `telemetry.zipkin_endpoint` is set, spans of [`trace::TARGET`] to that collector as
/// `service` (`conveyor-serve`, `conveyor-ingest`, …). A later call changes nothing and
/// exports nothing, so tests may call it freely.
///
/// # Errors
/// The exporter's HTTP client cannot be built.
pub fn init(settings: &TelemetrySettings, service: &str) -> anyhow::Result<Telemetry> {
    // Pipeline spans are for the trace backend; log lines already say what they say.
    let logs = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info"))
        .add_directive(
            format!("{}=off", trace::TARGET)
                .parse()
                .expect("valid directive"),
        );
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = match settings.format {
        LogFormat::Json => fmt.json().flatten_event(true).boxed(),
        LogFormat::Text => fmt.compact().boxed(),
    }
    .with_filter(logs);
    let Some(endpoint) = &settings.zipkin_endpoint else {
        let _ = Registry::default().with(fmt).try_init();
        return Ok(Telemetry { provider: None });
    };
    // reqwest's blocking client may not be built, nor dropped, on a runtime's thread (debug
    // builds panic): a thread of its own for each.
    let exporter = std::thread::scope(|s| {
        s.spawn(|| crate::zipkin::ZipkinExporter::new(endpoint, service))
            .join()
            .expect("building the exporter does not panic")
    })
    .with_context(|| format!("failed to build the trace exporter for {endpoint}"))?;
    let provider = SdkTracerProvider::builder()
        .with_span_processor(BatchSpanProcessor::builder(exporter).build())
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            settings.trace_sample_ratio,
        ))))
        .with_resource(
            Resource::builder_empty()
                .with_service_name(service.to_owned())
                .build(),
        )
        .build();
    let tracer = provider.tracer("conveyor");
    // Conveyor's own spans (the pipeline's, and those inside a handler, which must be in the
    // trace for a record appended inside them to carry it on) and its events as span events;
    // other crates' warnings and errors only.
    let spans = Targets::new()
        .with_target("conveyor", LevelFilter::INFO)
        .with_default(LevelFilter::WARN);
    let otel = tracing_opentelemetry::layer()
        .with_tracer(tracer.clone())
        // Attributes a reader of the trace uses; not the source lines, threads or poll times.
        .with_location(false)
        .with_threads(false)
        .with_target(false)
        .with_tracked_inactivity(false)
        .with_filter(spans);
    if Registry::default().with(fmt).with(otel).try_init().is_err() {
        // Another subscriber came first (a test harness): nothing would reach this exporter.
        std::thread::spawn(move || provider.shutdown());
        return Ok(Telemetry { provider: None });
    }
    trace::enable(tracer, settings.trace_sample_ratio);
    // At 0 from the start, so a rate over it is 0, not absent, until the first failure.
    metrics::counter!("conveyor_trace_export_failures_total").increment(0);
    tracing::info!(%endpoint, ratio = settings.trace_sample_ratio, %service, "trace export on");
    Ok(Telemetry {
        provider: Some(provider),
    })
}

/// For tests: logs go to the test's output only when `TEST_LOG` is set.
pub fn init_for_tests() {
    if std::env::var_os("TEST_LOG").is_some() {
        let _ = init(&TelemetrySettings::default(), "conveyor-test");
    }
}
