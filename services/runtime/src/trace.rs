//! One trace per upload, across processes: the W3C trace context (`traceparent`) travels in
//! HTTP headers and in the headers of every record Conveyor appends, on Kafka and on the
//! embedded log alike.
//!
//! - An HTTP request gets a server span ([`request_span`]), the child of the caller's
//!   `traceparent` when it sends one.
//! - A record appended inside a span carries that span's context ([`inject`]).
//! - A record handled by a consumer group gets a consumer span, the child of the context the
//!   record carries, and beside it a span from the record's append time to the moment the group
//!   took it: the wait in the log ([`record_span`]).
//!
//! All of this is off until [`crate::telemetry::init`] turns export on; until then the
//! functions here return [`Span::none`] and write no header.

use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use conveyor_storage::log::{Delivered, Record};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{
    Span as _, SpanContext, SpanId, SpanKind, TraceContextExt, TraceFlags, TraceId, TraceState,
    Tracer as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracer;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The `tracing` target of the pipeline's spans. Only the trace export listens to it; log
/// lines never show these spans.
pub const TARGET: &str = "conveyor_trace";

/// The tracer the wait spans are made with, and `telemetry.trace_sample_ratio`.
static TRACER: OnceLock<(SdkTracer, f64)> = OnceLock::new();

/// Turns propagation on, with the tracer the wait spans are made with and the share of traces
/// kept. Called once by [`crate::telemetry::init`] after the export is installed.
pub(crate) fn enable(tracer: SdkTracer, ratio: f64) {
    let _ = TRACER.set((tracer, ratio));
}

/// Whether traces are exported by this process.
pub fn enabled() -> bool {
    TRACER.get().is_some()
}

/// Whether the trace `trace_id` is kept at `ratio`: OpenTelemetry's own `TraceIdRatioBased`
/// decision, so every process decides alike for one trace id.
fn keep(trace_id: TraceId, ratio: f64) -> bool {
    use opentelemetry_sdk::trace::{Sampler, ShouldSample};
    let result = Sampler::TraceIdRatioBased(ratio).should_sample(
        None,
        trace_id,
        "",
        &SpanKind::Internal,
        &[],
        &[],
    );
    result.decision == opentelemetry::trace::SamplingDecision::RecordAndSample
}

/// Adds the current span's `traceparent` to `headers`, so whoever handles the record continues
/// this trace. Never `tracestate`: Conveyor sets none of its own, and a caller's would be copied
/// into every record its request causes (up to the 400 KB a header may take). Does nothing
/// when export is off or no span is current.
pub fn inject(headers: &mut Vec<(String, String)>) {
    if !enabled() {
        return;
    }
    let cx = Span::current().context();
    if !cx.span().span_context().is_valid() {
        return;
    }
    headers.retain(|(name, _)| name != "traceparent" && name != "tracestate");
    TraceContextPropagator::new().inject_context(&cx, &mut RecordHeaders(headers));
}

/// `record` with the current span's context in its headers ([`inject`]).
pub fn traced(mut record: Record) -> Record {
    inject(&mut record.headers);
    record
}

/// The server span of one HTTP request, named `{METHOD} {route}` (the route as matched, such
/// as `/v1/media/{id}`, and a method outside the standard ones as `OTHER`, so names stay few).
/// An error answer puts its code (`unsupported_media_type`, `incomplete_body`, …) in the
/// span's `error.type`.
/// A caller's `traceparent` gives the trace id and the parent, so a client's or an internal
/// service's trace goes on through Conveyor; its `sampled` flag does not decide: this edge keeps
/// `telemetry.trace_sample_ratio` of the traces whatever callers ask, and ignores `tracestate`.
/// The probes and the scrape (`/healthz`, `/readyz`, `/metrics`) get no span. With traces
/// off, the DEBUG `request` span logs always had. Record the response's status with
/// [`record_status`].
pub fn request_span<B>(request: &axum::http::Request<B>) -> Span {
    let Some((_, ratio)) = TRACER.get() else {
        // With traces off, the span tower-http's `DefaultMakeSpan` made for logs (DEBUG, so
        // free unless `RUST_LOG` asks for it).
        return tracing::debug_span!(
            "request",
            method = %request.method(),
            uri = %request.uri(),
            version = ?request.version(),
        );
    };
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or("unmatched", |p| p.as_str());
    if matches!(route, "/healthz" | "/readyz" | "/metrics") {
        return Span::none();
    }
    let method = crate::http::method_name(request.method());
    let span = tracing::info_span!(
        target: TARGET,
        "request",
        otel.name = %format!("{method} {route}"),
        otel.kind = "server",
        http.request.method = %method,
        http.route = %route,
        http.response.status_code = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
        error.type = tracing::field::Empty,
    );
    let parent = TraceContextPropagator::new().extract(&HttpHeaders(request.headers()));
    let caller = parent.span().span_context().clone();
    if caller.is_valid() {
        // A draw of this edge's own: a decision by the trace id would be the caller's to make,
        // since the caller picks the id. Later processes follow the flag this sets.
        let flags = if rand::random::<f64>() < *ratio {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        };
        let decided = SpanContext::new(
            caller.trace_id(),
            caller.span_id(),
            flags,
            true,
            TraceState::default(),
        );
        let _ = span.set_parent(Context::new().with_remote_span_context(decided));
    }
    span
}

/// Puts the response's status on a span of [`request_span`]; a 5xx marks it an error.
pub fn record_status(span: &Span, status: axum::http::StatusCode) {
    span.record("http.response.status_code", status.as_u16());
    if status.is_server_error() {
        span.record("otel.status_code", "error");
    }
}

/// The consumer span of `record` handled by `group`, named `{group} {event-type}` (such as
/// `processor MediaUploaded`), the child of the context the record carries. Its siblings: a
/// span named `{event-type} waits in {topic}`, from the record's append time to now, ended at
/// once. Every span gets the topic, partition, offset and group as attributes.
///
/// A record that carries no context (appended by a producer that does not trace, or by a
/// process with traces off) gets one made from its position ([`record_context`]): every group
/// that handles it joins the same trace, and keeps it or not alike.
pub fn record_span(group: &str, record: &Delivered) -> Span {
    let Some((tracer, ratio)) = TRACER.get() else {
        return Span::none();
    };
    let event = record.header("event-type").unwrap_or("record");
    let now = SystemTime::UNIX_EPOCH
        + Duration::from_micros(conveyor_storage::clock::now_micros().max(0) as u64);
    let appended = SystemTime::UNIX_EPOCH + Duration::from_micros(record.timestamp.max(0) as u64);
    // The producer's clock may run ahead of this one: a wait is never negative.
    let appended = appended.min(now);
    let waited = now.duration_since(appended).unwrap_or_default();
    let span = tracing::info_span!(
        target: TARGET,
        "handle",
        otel.name = %format!("{group} {event}"),
        otel.kind = "consumer",
        messaging.destination.name = %record.topic,
        messaging.destination.partition.id = record.partition,
        messaging.kafka.offset = record.offset,
        messaging.consumer.group.name = %group,
        conveyor.log_wait_ms = waited.as_millis() as u64,
    );
    let mut parent = TraceContextPropagator::new().extract(&ReadHeaders(&record.headers));
    if !parent.span().span_context().is_valid() {
        parent = Context::new().with_remote_span_context(record_context(record, *ratio));
    }
    let mut wait = tracer
        .span_builder(format!("{event} waits in {}", record.topic))
        .with_kind(SpanKind::Internal)
        .with_start_time(appended)
        .with_attributes([
            KeyValue::new("messaging.destination.name", record.topic.clone()),
            KeyValue::new(
                "messaging.destination.partition.id",
                record.partition.to_string(),
            ),
            KeyValue::new("messaging.kafka.offset", record.offset as i64),
            KeyValue::new("messaging.consumer.group.name", group.to_owned()),
        ])
        .start_with_context(tracer, &parent);
    wait.end_with_timestamp(now);
    let _ = span.set_parent(parent);
    span
}

/// The context a record without `traceparent` is handled in: a remote parent whose trace and
/// span ids are hashes (SHA-256) of the record's topic, partition, offset and append time (so a
/// topic made again, whose offsets start over, gives new ids), so every group,
/// in every process, puts its spans for that record in one trace, kept by the sampling ratio
/// alike. The parent itself is never exported: the trace shows a missing root.
fn record_context(record: &Delivered, ratio: f64) -> SpanContext {
    use sha2::Digest;
    let digest = sha2::Sha256::new()
        .chain_update(record.topic.as_bytes())
        .chain_update(record.partition.to_be_bytes())
        .chain_update(record.offset.to_be_bytes())
        .chain_update(record.timestamp.to_be_bytes())
        .finalize();
    let trace_id = TraceId::from_bytes(digest[..16].try_into().expect("16 bytes"));
    let span_id = SpanId::from_bytes(digest[16..24].try_into().expect("8 bytes"));
    let flags = if keep(trace_id, ratio) {
        TraceFlags::SAMPLED
    } else {
        TraceFlags::default()
    };
    SpanContext::new(trace_id, span_id, flags, true, TraceState::default())
}

/// A record's headers, written to.
struct RecordHeaders<'a>(&'a mut Vec<(String, String)>);

impl Injector for RecordHeaders<'_> {
    /// Writes `traceparent` only (see [`inject`]).
    fn set(&mut self, key: &str, value: String) {
        if key == "traceparent" {
            self.0.push((key.to_owned(), value));
        }
    }
}

/// A record's headers, read from.
struct ReadHeaders<'a>(&'a [(String, String)]);

impl Extractor for ReadHeaders<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(key))
            .map(|(_, value)| value.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(name, _)| name.as_str()).collect()
    }
}

/// A request's headers, read from.
struct HttpHeaders<'a>(&'a axum::http::HeaderMap);

impl Extractor for HttpHeaders<'_> {
    /// Never `tracestate`: a caller's vendor state is not Conveyor's to carry.
    fn get(&self, key: &str) -> Option<&str> {
        if key.eq_ignore_ascii_case("tracestate") {
            return None;
        }
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `traceparent` written into record headers is read back as the same remote context,
    /// and written again without the `tracestate` beside it.
    #[test]
    fn record_headers_carry_the_w3c_context() {
        let sent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let headers = vec![
            ("event-type".to_owned(), "media.uploaded".to_owned()),
            ("traceparent".to_owned(), sent.to_owned()),
            ("tracestate".to_owned(), "vendor=opaque".to_owned()),
        ];
        let cx = TraceContextPropagator::new().extract(&ReadHeaders(&headers));
        let span = cx.span();
        let got = span.span_context();
        assert!(got.is_valid() && got.is_remote() && got.is_sampled());
        assert_eq!(
            got.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        // Written back: the `traceparent` alone, never the `tracestate` that came with it.
        let mut out = Vec::new();
        TraceContextPropagator::new().inject_context(&cx, &mut RecordHeaders(&mut out));
        assert_eq!(out, vec![("traceparent".to_owned(), sent.to_owned())]);
    }

    /// A record without context gets the same one in every group and process (its position
    /// and append time decide the ids), and the ratio decides alike for it everywhere.
    #[test]
    fn a_record_without_context_gets_one_from_its_position() {
        let record = |offset: u64, timestamp: i64| Delivered {
            topic: "media.events".into(),
            partition: 3,
            offset,
            key: Vec::new(),
            headers: Vec::new(),
            value: bytes::Bytes::new(),
            timestamp,
        };
        let cx = record_context(&record(7, 1_000), 1.0);
        assert!(cx.is_valid() && cx.is_remote() && cx.is_sampled());
        assert_eq!(cx, record_context(&record(7, 1_000), 1.0));
        let later_topic = record_context(&record(7, 2_000), 1.0);
        assert_ne!(cx.trace_id(), later_topic.trace_id(), "a topic made again");
        assert_ne!(
            cx.trace_id(),
            record_context(&record(8, 1_000), 1.0).trace_id()
        );
        assert!(!record_context(&record(7, 1_000), 0.0).is_sampled());
        let kept = (0..1_000u64)
            .filter(|&offset| record_context(&record(offset, 1_000), 0.25).is_sampled())
            .count();
        assert!((150..350).contains(&kept), "{kept} of 1000 kept at 0.25");
    }
}
