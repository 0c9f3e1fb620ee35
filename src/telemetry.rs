//! The process log and traces: one JSON object per line on stderr with flat
//! fields (the fields of the spans a line is in, then its own: `request_id`,
//! `trace_id`, `peer`, `sni` reach every line of a request), and, when
//! `telemetry.otlp.endpoint` is set, OpenTelemetry traces exported over OTLP
//! (HTTP/protobuf): a `request` span per proxied request that continues the
//! caller's W3C `traceparent`, with a child span per phase (`gate`, `read`,
//! `plan`, `audit`, `upstream`).
//!
//! Nothing here may put patient data in a field: spans carry ids, hosts,
//! addresses of the apps (not of patients) and codes only.

use crate::route::Via;
use http::HeaderMap;
use serde_json::{Map, Value};
use std::fmt;
use std::net::SocketAddr;
#[cfg(feature = "otlp")]
use std::sync::atomic::{AtomicBool, Ordering};
use tracing::field::{Field, Visit};
use tracing::{Event, Span, Subscriber};
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

#[cfg(feature = "otlp")]
mod otlp;

/// `telemetry.otlp` (SPEC is silent; README "Logs and traces").
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct OtlpCfg {
    /// The collector's OTLP/HTTP traces URL; a URL with no path gets `/v1/traces`.
    pub(crate) endpoint: String,
    /// `service.name` of the exported resource.
    pub(crate) service_name: String,
    /// Bound on one export request.
    pub(crate) timeout: std::time::Duration,
}

/// Whether spans are exported: a request span then reads its (possibly new)
/// trace id back from OpenTelemetry for the log line.
#[cfg(feature = "otlp")]
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Keeps the exporter alive; [`Telemetry::shutdown`] flushes what is queued.
#[derive(Default)]
pub(crate) struct Telemetry {
    #[cfg(feature = "otlp")]
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Telemetry {
    /// Export what is still queued (bounded by the exporter's timeout).
    pub(crate) fn shutdown(self) {
        #[cfg(feature = "otlp")]
        if let Some(p) = self.provider {
            if let Err(e) = p.shutdown() {
                tracing::warn!(error = %e, "OTLP exporter shutdown");
            }
        }
    }
}

/// Install the process-wide subscriber: the flat JSON log on stderr at `level`
/// (or `RUST_LOG`), and the OTLP exporter when configured. Returns an error
/// only when the exporter cannot be built; logging is then installed anyway.
pub(crate) fn init(level: &str, otlp: Option<&OtlpCfg>) -> Result<Telemetry, String> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let log = tracing_subscriber::fmt::layer()
        .fmt_fields(JsonFields::new())
        .event_format(FlatJson)
        .with_writer(std::io::stderr)
        .with_filter(filter);
    let registry = tracing_subscriber::registry().with(log);
    match otlp {
        None => {
            let _ = registry.try_init();
            Ok(Telemetry::default())
        }
        #[cfg(feature = "otlp")]
        Some(cfg) => match otlp::layer(cfg) {
            Ok((layer, provider)) => {
                let _ = registry.with(layer).try_init();
                EXPORTING.store(true, Ordering::Relaxed);
                tracing::info!(endpoint = %cfg.endpoint, service_name = %cfg.service_name,
                    "exporting traces over OTLP");
                Ok(Telemetry {
                    provider: Some(provider),
                })
            }
            Err(e) => {
                let _ = registry.try_init();
                Err(e)
            }
        },
        #[cfg(not(feature = "otlp"))]
        Some(_) => {
            let _ = registry.try_init();
            Err("telemetry.otlp: this build has no OTLP exporter (cargo feature `otlp`)".into())
        }
    }
}

/// The span of one request on a proxy connection. Its fields reach every log
/// line of the request: `peer` (the app), `sni` (the TLS server name; for a
/// CONNECT, the tunnel's host), `trace_id` and, once known, `request_id`.
/// It is a root span: a keep-alive connection is not one trace. With OTLP on it
/// continues the caller's `traceparent`; the logged `trace_id` is the caller's,
/// or the new trace's when the caller sent none and spans are exported.
pub(crate) fn request_span(headers: &HeaderMap, peer: Option<SocketAddr>, via: &Via) -> Span {
    // Values given at creation: each later `record` re-serializes the span's
    // JSON fields, so only what is learnt later (the request id) is recorded.
    let caller = crate::audit::trace_id(headers);
    let sni = match via {
        Via::Intercepted { host, .. } => Some(host.as_str()),
        Via::Plain => None,
    };
    let span = tracing::info_span!(
        parent: None,
        "request",
        request_id = tracing::field::Empty,
        trace_id = caller.as_deref(),
        peer = peer.map(tracing::field::display),
        sni,
    );
    // Always continue the trace when exporting (even when the caller's id is
    // already known), so the span joins the caller's trace; a new trace's id is
    // logged when the caller sent none.
    #[cfg(feature = "otlp")]
    if EXPORTING.load(Ordering::Relaxed) && !span.is_disabled() {
        let exported = otlp::continue_trace(&span, headers);
        if let (None, Some(t)) = (&caller, exported) {
            span.record("trace_id", t.as_str());
        }
    }
    span
}

/// The log line format: a flat JSON object, span fields (outermost first)
/// then the event's own, with `timestamp`, `level`, `target` and `message`.
struct FlatJson;

impl<S, N> FormatEvent<S, N> for FlatJson
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let mut map = Map::new();
        map.insert(
            "timestamp".into(),
            Value::String(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)),
        );
        map.insert("level".into(), Value::String(meta.level().to_string()));
        map.insert("target".into(), Value::String(meta.target().to_string()));
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                let ext = span.extensions();
                let Some(fields) = ext.get::<FormattedFields<N>>() else {
                    continue;
                };
                if let Ok(Value::Object(o)) = serde_json::from_str::<Value>(fields) {
                    map.extend(o);
                }
            }
        }
        event.record(&mut JsonVisitor(&mut map));
        let line = serde_json::to_string(&Value::Object(map)).map_err(|_| fmt::Error)?;
        writeln!(writer, "{line}")
    }
}

struct JsonVisitor<'a>(&'a mut Map<String, Value>);

impl Visit for JsonVisitor<'_> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        let v = serde_json::Number::from_f64(value).map_or(Value::Null, Value::Number);
        self.0.insert(field.name().into(), v);
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), Value::from(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), Value::from(value));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), Value::from(value));
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.0
            .insert(field.name().into(), Value::from(value.to_string()));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().into(), Value::from(format!("{value:?}")));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_are_flat_json_with_span_fields() {
        let buf = Buf::default();
        let w = buf.clone();
        let layer = tracing_subscriber::fmt::layer()
            .fmt_fields(JsonFields::new())
            .event_format(FlatJson)
            .with_writer(move || w.clone());
        let sub = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(sub, || {
            let mut h = HeaderMap::new();
            h.insert(
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                    .parse()
                    .unwrap(),
            );
            let via = Via::Intercepted {
                host: "graph.facebook.com".into(),
                port: 443,
            };
            let span = request_span(&h, Some(([10, 0, 0, 7], 40000).into()), &via);
            let _g = span.enter();
            span.record("request_id", "r-1");
            tracing::info!(
                status = 200u64,
                decision = "allowed",
                duration_ms = 1.5,
                "request finished"
            );
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let v: Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(v["message"], "request finished");
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(v["peer"], "10.0.0.7:40000");
        assert_eq!(v["sni"], "graph.facebook.com");
        assert_eq!(v["request_id"], "r-1");
        assert_eq!(v["status"], 200);
        assert_eq!(v["duration_ms"], 1.5);
        assert!(v.get("fields").is_none() && v.get("span").is_none(), "{v}");
    }
}
