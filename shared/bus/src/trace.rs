//! Trace context across the bus, in the W3C Trace Context format (`traceparent`, `tracestate`).
//!
//! A request, a broadcast or a queued job carries its sender's current span in NATS message
//! headers; the receiving mailbox or lane queue opens its own span as that span's child. Records
//! that travel through a KV bucket instead of a message (an [`Operation`], queued by a gateway
//! and picked up by the scheduler's watch) carry the same `traceparent` text as a field.
//!
//! Nothing is added when the sender has no trace (no OTLP exporter, or a span outside any
//! trace), and a receiver opens no span for a message without one: traces start where work
//! enters the platform (a gateway call, a burn), never in the bus's background chatter. Whether a
//! trace is kept was decided where it started and travels in the `traceparent` flags, so every
//! service keeps or drops the same traces.
//!
//! [`Operation`]: motorpool_messages::exec::Operation

use async_nats::HeaderMap;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use std::collections::HashMap;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The header that names the parent span.
pub const TRACEPARENT: &str = "traceparent";

struct Inject<'a>(&'a mut HeaderMap);

impl Injector for Inject<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key, value.as_str());
    }
}

struct Extract<'a>(&'a HeaderMap);

impl Extractor for Extract<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|v| v.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k.as_ref()).collect()
    }
}

/// The current span's context when it belongs to a trace.
fn current() -> Option<opentelemetry::Context> {
    let cx = tracing::Span::current().context();
    cx.span().span_context().is_valid().then_some(cx)
}

/// Adds the current span's trace context to `headers`; true when there was one to add.
pub fn inject(headers: &mut HeaderMap) -> bool {
    match current() {
        Some(cx) => {
            TraceContextPropagator::new().inject_context(&cx, &mut Inject(headers));
            true
        }
        None => false,
    }
}

/// Headers carrying the current span's trace context, or `None` outside any trace.
pub fn headers() -> Option<HeaderMap> {
    let mut h = HeaderMap::new();
    inject(&mut h).then_some(h)
}

/// The current span as a W3C `traceparent` value, or empty outside any trace: for records that
/// are not messages.
pub fn traceparent() -> String {
    let Some(cx) = current() else {
        return String::new();
    };
    let mut fields = HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut fields);
    fields.remove(TRACEPARENT).unwrap_or_default()
}

fn remote(cx: opentelemetry::Context) -> Option<opentelemetry::Context> {
    cx.span().span_context().is_valid().then_some(cx)
}

/// The trace context `headers` carry, if any.
pub fn extract(headers: Option<&HeaderMap>) -> Option<opentelemetry::Context> {
    let h = headers?;
    h.get(TRACEPARENT)?;
    remote(TraceContextPropagator::new().extract(&Extract(h)))
}

/// The trace context a `traceparent` value names, if it is a valid one.
pub fn from_traceparent(value: &str) -> Option<opentelemetry::Context> {
    if value.is_empty() {
        return None;
    }
    let fields = HashMap::from([(TRACEPARENT.to_string(), value.to_string())]);
    remote(TraceContextPropagator::new().extract(&fields))
}

/// The span to handle a message in: `make()`'s span as a child of the trace the message
/// carries, or no span at all for a message outside any trace.
pub fn follow(headers: Option<&HeaderMap>, make: impl FnOnce() -> tracing::Span) -> tracing::Span {
    child_of(extract(headers), make)
}

/// `make()`'s span as a child of the current one, or no span outside any span (work that
/// follows a message without trace context opens none either).
pub fn in_current(make: impl FnOnce() -> tracing::Span) -> tracing::Span {
    if tracing::Span::current().is_none() {
        tracing::Span::none()
    } else {
        make()
    }
}

/// `make()`'s span as a child of `parent`, or no span without a parent.
pub fn child_of(
    parent: Option<opentelemetry::Context>,
    make: impl FnOnce() -> tracing::Span,
) -> tracing::Span {
    match parent {
        Some(cx) => {
            let span = make();
            let _ = span.set_parent(cx);
            span
        }
        None => tracing::Span::none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_traceparent_round_trips_and_garbage_names_no_parent() {
        let value = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let cx = from_traceparent(value).expect("a valid traceparent");
        let sc = cx.span().span_context().clone();
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(sc.span_id().to_string(), "00f067aa0ba902b7");
        assert!(sc.is_sampled() && sc.is_remote());

        let mut h = HeaderMap::new();
        TraceContextPropagator::new().inject_context(&cx, &mut Inject(&mut h));
        assert_eq!(h.get(TRACEPARENT).unwrap().as_str(), value);
        let back = extract(Some(&h)).expect("headers carry it");
        assert_eq!(back.span().span_context().trace_id(), sc.trace_id());

        for bad in [
            "",
            "nonsense",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "zz-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(from_traceparent(bad).is_none(), "{bad:?}");
            let mut h = HeaderMap::new();
            h.insert(TRACEPARENT, bad);
            assert!(extract(Some(&h)).is_none(), "{bad:?} in a header");
        }
        assert!(extract(None).is_none());
        assert!(extract(Some(&HeaderMap::new())).is_none());
    }

    #[test]
    fn outside_any_trace_nothing_is_added() {
        let mut h = HeaderMap::new();
        assert!(!inject(&mut h));
        assert!(h.is_empty());
        assert!(headers().is_none());
        assert_eq!(traceparent(), "");
    }
}
