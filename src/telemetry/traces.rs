//! Traces: OpenTelemetry spans, exported over OTLP/HTTP (protobuf) when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`)
//! is set, and not at all otherwise. The exporter reads the standard
//! `OTEL_*` variables itself (endpoint, headers, timeout, `OTEL_BSP_*`);
//! `OTEL_SERVICE_NAME` names the process, by default `outbox-<subcommand>`.
//!
//! One trace follows an event across processes through W3C `traceparent`:
//! the session API's request span is the parent written into the outbox
//! row; the relay's `publish` span continues from it and its own context
//! goes into the Kafka record's `traceparent` header; the consumer's
//! `handle` span continues from that header.
//!
//! Spans on a hot path (one per event in the relay and in the consumer's
//! batches) are made only while exporting ([`exporting`]). Log lines carry
//! the trace id either way: the spans that carry it record it in their
//! `trace_id` field.

use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::{
    propagation::{Extractor, TextMapPropagator},
    trace::{TraceContextExt, TracerProvider as _},
};
use opentelemetry_sdk::{Resource, propagation::TraceContextPropagator, trace::SdkTracerProvider};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Whether spans are exported (an OTLP endpoint is configured).
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// The variables that turn exporting on (the traces-only one wins, as in
/// the OpenTelemetry specification).
const ENDPOINT_VARS: [&str; 2] = ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"];

/// The tracer provider when an endpoint is configured, `None` otherwise.
pub(super) fn provider(default_service: &str) -> Result<Option<SdkTracerProvider>, String> {
    if !ENDPOINT_VARS.iter().any(|v| std::env::var(v).is_ok_and(|s| !s.trim().is_empty())) {
        return Ok(None);
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()
        .map_err(|e| format!("the OTLP span exporter: {e}"))?;
    let mut resource = Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").map_or(true, |s| s.trim().is_empty()) {
        resource = resource.with_service_name(default_service.to_owned());
    }
    let provider = SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource.build()).build();
    EXPORTING.store(true, Ordering::Relaxed);
    Ok(Some(provider))
}

/// The `tracing` layer that turns spans into OpenTelemetry spans.
pub(super) fn layer<S>(provider: &SdkTracerProvider) -> impl tracing_subscriber::Layer<S> + use<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    tracing_opentelemetry::layer().with_tracer(provider.tracer("outbox-operator"))
}

/// The spans exported: this crate's, at `info` and above (the libraries'
/// own spans, such as each HTTP call of the Kubernetes client, are not).
pub(super) fn exported_spans() -> tracing_subscriber::filter::Targets {
    tracing_subscriber::filter::Targets::new().with_target("outbox_operator", tracing::Level::INFO)
}

/// A carrier holding one `traceparent` value.
struct Traceparent<'a>(&'a str);

impl Extractor for Traceparent<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        (key == "traceparent").then_some(self.0)
    }
    fn keys(&self) -> Vec<&str> {
        vec!["traceparent"]
    }
}

/// The trace id (32 lowercase hex digits) of a well-formed `traceparent`.
pub fn trace_id(traceparent: &str) -> Option<&str> {
    let id = traceparent.get(3..35)?;
    (traceparent.len() == 55 && traceparent.starts_with("00-") && id.bytes().all(|b| b.is_ascii_hexdigit()))
        .then_some(id)
}

/// Make `span` continue the remote span `traceparent` (its child), while
/// exporting; then record the trace id in the span's `trace_id` field (if
/// it has one), exporting or not. Call it before anything reads the span's
/// context.
pub fn continue_from(span: &Span, traceparent: Option<&str>) {
    if exporting()
        && let Some(parent) = traceparent
    {
        let _ = span.set_parent(TraceContextPropagator::new().extract(&Traceparent(parent)));
    }
    match traceparent_of(span) {
        Some(own) => record_trace_id(span, &own),
        None => {
            if let Some(parent) = traceparent {
                record_trace_id(span, parent);
            }
        }
    }
}

/// `span`'s own `traceparent` while exporting (to hand downstream, so the
/// next process's span is its child), `None` otherwise.
pub fn traceparent_of(span: &Span) -> Option<String> {
    if !exporting() {
        return None;
    }
    let cx = span.context();
    let span_ref = cx.span();
    let sc = span_ref.span_context();
    sc.is_valid().then(|| format!("00-{}-{}-{:02x}", sc.trace_id(), sc.span_id(), sc.trace_flags().to_u8()))
}

/// Mark `span` failed, with why (its `otel.status_code` and
/// `otel.status_description` fields, which it must declare).
pub fn record_error(span: &Span, description: &str) {
    span.record("otel.status_code", "error");
    span.record("otel.status_description", description);
}

/// Record `traceparent`'s trace id in `span`'s `trace_id` field.
pub fn record_trace_id(span: &Span, traceparent: &str) {
    if let Some(id) = trace_id(traceparent) {
        span.record("trace_id", tracing::field::display(id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_trace_id_is_read_from_a_well_formed_traceparent_only() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(trace_id(tp), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e47zz-00f067aa0ba902b7-01",
        ] {
            assert_eq!(trace_id(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn without_an_endpoint_nothing_is_exported_and_spans_have_no_context_to_hand_on() {
        assert!(!exporting());
        let span = tracing::info_span!("x", trace_id = tracing::field::Empty);
        continue_from(&span, Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"));
        assert_eq!(traceparent_of(&span), None);
    }
}
