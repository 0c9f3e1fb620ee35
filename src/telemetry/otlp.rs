//! OTLP trace export (cargo feature `otlp`): HTTP/protobuf to
//! `telemetry.otlp.endpoint` from the batch span processor's own thread, sent
//! with the crate's hyper + rustls (aws-lc-rs, web PKI roots) stack on a small
//! runtime of its own, so exporting never competes with the proxy's runtime
//! and the build gains no second TLS stack (no reqwest, ring or OpenSSL).

use super::OtlpCfg;
use bytes::Bytes;
use http::HeaderMap;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_http::{HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// A collector's answer is a small protobuf; anything bigger is not read.
const MAX_RESPONSE_BYTES: usize = 1 << 20;

/// The layer that turns spans into OpenTelemetry spans, and the provider to
/// flush at exit.
pub(super) fn layer<S>(
    cfg: &OtlpCfg,
) -> Result<(impl tracing_subscriber::Layer<S>, SdkTracerProvider), String>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    let endpoint = traces_url(&cfg.endpoint)?;
    let client = ExportClient::new(cfg.timeout)?;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(client)
        .with_endpoint(endpoint)
        .with_timeout(cfg.timeout)
        .build()
        .map_err(|e| format!("telemetry.otlp: {e}"))?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            Resource::builder()
                .with_service_name(cfg.service_name.clone())
                .build(),
        )
        .build();
    let tracer = provider.tracer("consentgate");
    // Spans of this crate at every level (the phases are DEBUG spans), events
    // at INFO and above only (they become span events).
    let filter = tracing_subscriber::filter::filter_fn(|m| {
        m.target().starts_with("consentgate") && (m.is_span() || *m.level() <= tracing::Level::INFO)
    });
    let layer = tracing_subscriber::Layer::with_filter(
        tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_threads(false),
        filter,
    );
    Ok((layer, provider))
}

/// `endpoint` as given when it has a path, else with the OTLP/HTTP traces path.
fn traces_url(endpoint: &str) -> Result<String, String> {
    let u = url::Url::parse(endpoint)
        .map_err(|e| format!("telemetry.otlp.endpoint: not a URL: {e}"))?;
    if !matches!(u.scheme(), "http" | "https") {
        return Err("telemetry.otlp.endpoint: expected an http:// or https:// URL".into());
    }
    if u.path() == "/" || u.path().is_empty() {
        Ok(format!("{}/v1/traces", endpoint.trim_end_matches('/')))
    } else {
        Ok(endpoint.to_string())
    }
}

/// Make `span` a child of the caller's `traceparent` (when valid) and return
/// the trace id it now belongs to (the caller's, or a new one).
pub(super) fn continue_trace(span: &Span, headers: &HeaderMap) -> Option<String> {
    let cx = TraceContextPropagator::new().extract(&opentelemetry_http::HeaderExtractor(headers));
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
    let sc = span.context().span().span_context().clone();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

/// The exporter's HTTP client: requests run on a one-thread runtime owned by
/// the client (the batch processor calls from a plain thread).
struct ExportClient {
    /// Taken on drop, to shut it down without blocking.
    rt: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
    timeout: Duration,
}

impl std::fmt::Debug for ExportClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExportClient").finish_non_exhaustive()
    }
}

impl ExportClient {
    fn new(timeout: Duration) -> Result<ExportClient, String> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("otlp-export")
            .enable_all()
            .build()
            .map_err(|e| format!("telemetry.otlp: runtime: {e}"))?;
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        let tls = rustls::ClientConfig::builder_with_provider(crate::forward::crypto_provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("telemetry.otlp: TLS setup: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(timeout));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(https);
        Ok(ExportClient {
            handle: rt.handle().clone(),
            rt: Some(rt),
            client,
            timeout,
        })
    }
}

impl HttpClient for ExportClient {
    fn send_bytes<'a, 'b>(
        &'a self,
        request: Request<Bytes>,
    ) -> Pin<Box<dyn Future<Output = Result<Response<Bytes>, HttpError>> + Send + 'b>>
    where
        'a: 'b,
        Self: 'b,
    {
        let client = self.client.clone();
        let timeout = self.timeout;
        let task = self.handle.spawn(async move {
            let req = request.map(Full::new);
            let resp = tokio::time::timeout(timeout, client.request(req))
                .await
                .map_err(|_| -> HttpError { "OTLP export timed out".into() })??;
            let (parts, body) = resp.into_parts();
            let body =
                tokio::time::timeout(timeout, Limited::new(body, MAX_RESPONSE_BYTES).collect())
                    .await
                    .map_err(|_| -> HttpError { "OTLP export timed out".into() })??
                    .to_bytes();
            Ok::<_, HttpError>(Response::from_parts(parts, body))
        });
        Box::pin(async move { task.await.map_err(|e| -> HttpError { Box::new(e) })? })
    }
}

impl Drop for ExportClient {
    fn drop(&mut self) {
        // Dropping a runtime blocks until its tasks stop, which panics in async
        // code: shut it down in the background instead.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_gets_the_traces_path_when_it_has_none() {
        assert_eq!(
            traces_url("http://otel:4318").unwrap(),
            "http://otel:4318/v1/traces"
        );
        assert_eq!(
            traces_url("http://otel:4318/").unwrap(),
            "http://otel:4318/v1/traces"
        );
        assert_eq!(
            traces_url("https://otel.example/custom/traces").unwrap(),
            "https://otel.example/custom/traces"
        );
        assert!(traces_url("otel:4318").is_err());
        assert!(traces_url("ftp://otel/").is_err());
    }
}
