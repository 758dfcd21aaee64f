//! A span exporter to a Zipkin v2 collector (`POST /api/v2/spans`, a JSON list of spans; the
//! format is Zipkin's `zipkin2-api.yaml`), which Zipkin, Jaeger and Grafana Tempo all take.
//!
//! Not `opentelemetry-zipkin`: that crate is deprecated upstream (its 0.33 README), and the
//! 0.31 line that matches this workspace's reqwest drops the service name from every span
//! (its `localEndpoint` has no `serviceName`), so no span could be found by service.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use anyhow::Context;

use opentelemetry::trace::{SpanKind, Status};
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{SpanData, SpanExporter};
use serde::Serialize;

/// How long one batch may take to reach the collector before it is dropped.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Sends batches of spans to a Zipkin v2 collector as service `service`. A failed batch is
/// dropped and counted (`conveyor_trace_export_failures_total`); the first failure of a streak
/// is logged at WARN, and the recovery after it at INFO, so a collector that is down says so
/// once, not once per batch.
#[derive(Debug)]
pub struct ZipkinExporter {
    client: reqwest::blocking::Client,
    endpoint: reqwest::Url,
    service: String,
    failing: AtomicBool,
}

impl ZipkinExporter {
    /// An exporter to `endpoint` (`http://host:9411/api/v2/spans`).
    ///
    /// # Errors
    /// `endpoint` is not a URL, or the HTTP client cannot be built.
    pub fn new(endpoint: &str, service: &str) -> anyhow::Result<ZipkinExporter> {
        let endpoint = reqwest::Url::parse(endpoint)
            .with_context(|| format!("telemetry.zipkin_endpoint: {endpoint:?} is not a URL"))?;
        Ok(ZipkinExporter {
            client: reqwest::blocking::Client::builder()
                .timeout(TIMEOUT)
                .build()?,
            endpoint,
            service: service.to_owned(),
            failing: AtomicBool::new(false),
        })
    }

    /// Counts and logs a failed batch (see the type's docs).
    fn failed(&self, error: String) -> OTelSdkResult {
        metrics::counter!("conveyor_trace_export_failures_total").increment(1);
        if !self.failing.swap(true, Ordering::Relaxed) {
            tracing::warn!(endpoint = %self.endpoint, %error, "failed to send spans to the trace collector; dropping them until it answers (counted in conveyor_trace_export_failures_total)");
        }
        Err(OTelSdkError::InternalFailure(error))
    }
}

/// One span in Zipkin's v2 JSON.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ZipkinSpan<'a> {
    trace_id: String,
    id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    parent_id: Option<String>,
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    kind: Option<&'static str>,
    /// Microseconds since the Unix epoch.
    timestamp: u64,
    /// Microseconds; at least 1, as Zipkin reads 0 as "unknown".
    duration: u64,
    local_endpoint: Endpoint<'a>,
    tags: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    annotations: Vec<Annotation>,
}

/// A timed note on a span: an event logged inside it.
#[derive(Serialize)]
struct Annotation {
    /// Microseconds since the Unix epoch.
    timestamp: u64,
    value: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Endpoint<'a> {
    service_name: &'a str,
}

fn micros(at: SystemTime) -> u64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

fn to_zipkin<'a>(span: &'a SpanData, service: &'a str) -> ZipkinSpan<'a> {
    let mut tags: BTreeMap<String, String> = span
        .attributes
        .iter()
        .map(|kv| (kv.key.to_string(), kv.value.to_string()))
        .collect();
    // Events logged inside the span (its warnings and errors): `message field=value …`.
    let annotations: Vec<Annotation> = span
        .events
        .iter()
        .map(|event| {
            let mut value = event.name.to_string();
            for kv in &event.attributes {
                value.push_str(&format!(" {}={}", kv.key, kv.value));
            }
            Annotation {
                timestamp: micros(event.timestamp),
                value,
            }
        })
        .collect();
    if let Status::Error { description } = &span.status {
        // Zipkin's UI marks a span red by its `error` tag, whose value is shown as the cause:
        // the status's description, or else the last event logged in the span.
        let cause = match description.as_ref() {
            "" => annotations.last().map_or("error", |a| a.value.as_str()),
            given => given,
        };
        tags.insert("error".into(), cause.to_owned());
    }
    let parent = span.parent_span_id;
    ZipkinSpan {
        trace_id: span.span_context.trace_id().to_string(),
        id: span.span_context.span_id().to_string(),
        parent_id: (parent != opentelemetry::trace::SpanId::INVALID).then(|| parent.to_string()),
        name: &span.name,
        kind: match span.span_kind {
            SpanKind::Server => Some("SERVER"),
            SpanKind::Client => Some("CLIENT"),
            SpanKind::Producer => Some("PRODUCER"),
            SpanKind::Consumer => Some("CONSUMER"),
            SpanKind::Internal => None,
        },
        timestamp: micros(span.start_time),
        duration: micros(span.end_time)
            .saturating_sub(micros(span.start_time))
            .max(1),
        local_endpoint: Endpoint {
            service_name: service,
        },
        tags,
        annotations,
    }
}

impl SpanExporter for ZipkinExporter {
    /// Posts the batch, blocking the processor's own thread (never a runtime's).
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let spans: Vec<ZipkinSpan<'_>> =
            batch.iter().map(|s| to_zipkin(s, &self.service)).collect();
        let response = self.client.post(self.endpoint.clone()).json(&spans).send();
        match response {
            Err(e) => self.failed(format!("{e}")),
            Ok(r) if !r.status().is_success() => {
                self.failed(format!("the collector answered {}", r.status()))
            }
            Ok(_) => {
                if self.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!(endpoint = %self.endpoint, "the trace collector answers again");
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::KeyValue;
    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};

    /// The JSON Zipkin reads: ids in hex, times in microseconds, the service named.
    #[test]
    fn a_span_becomes_zipkin_v2_json() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_micros(1_700_000_000_000_000);
        let span = SpanData {
            span_context: SpanContext::new(
                TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
                SpanId::from_hex("00f067aa0ba902b7").unwrap(),
                TraceFlags::SAMPLED,
                false,
                TraceState::default(),
            ),
            parent_span_id: SpanId::from_hex("0000000000000001").unwrap(),
            parent_span_is_remote: false,
            span_kind: SpanKind::Consumer,
            name: "processor MediaUploaded".into(),
            start_time: start,
            end_time: start + Duration::from_millis(38),
            attributes: vec![KeyValue::new("messaging.kafka.offset", 7)],
            dropped_attributes_count: 0,
            events: Default::default(),
            links: Default::default(),
            status: Status::error("boom"),
            instrumentation_scope: Default::default(),
        };
        let json = serde_json::to_value(to_zipkin(&span, "conveyor-process")).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "traceId": "4bf92f3577b34da6a3ce929d0e0e4736",
                "id": "00f067aa0ba902b7",
                "parentId": "0000000000000001",
                "name": "processor MediaUploaded",
                "kind": "CONSUMER",
                "timestamp": 1_700_000_000_000_000u64,
                "duration": 38_000,
                "localEndpoint": {"serviceName": "conveyor-process"},
                "tags": {"messaging.kafka.offset": "7", "error": "boom"},
            })
        );
    }
}
