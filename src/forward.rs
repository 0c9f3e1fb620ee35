//! Forward: the request as it leaves (absolute URI, our own and hop-by-hop
//! headers removed) and the pooled upstream client. Always TLS (rustls, TLS
//! 1.2+), verified against the web PKI roots plus `upstream.extra_ca`;
//! `upstream.resolve` overrides where a host:port connects; HTTP/1.1 or h2 by ALPN.

use crate::config::Upstream as UpstreamCfg;
use crate::model::{H_CATEGORY, H_PATIENT, OWN_HEADER_PREFIX};
use crate::route::Target;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName};
use http::uri::PathAndQuery;
use http::{Request, Response, Uri};
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::TcpStream;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

/// The upstream URI: `https://host[:port]` and the request's path and query.
pub(crate) fn upstream_uri(t: &Target, pq: Option<&PathAndQuery>) -> Option<Uri> {
    let pq = pq.map_or("/", PathAndQuery::as_str);
    let s = if t.port == 443 {
        format!("https://{}{pq}", t.host)
    } else {
        format!("https://{}:{}{pq}", t.host, t.port)
    };
    Uri::try_from(s).ok()
}

/// The request as it goes upstream: the absolute URI, HTTP/1.1 semantics (the
/// pool picks h2 by ALPN), without our control headers or hop-by-hop ones.
pub(crate) fn outgoing(
    mut parts: http::request::Parts,
    uri: Uri,
    body: ProxyBody,
) -> Request<ProxyBody> {
    parts.uri = uri;
    parts.version = http::Version::HTTP_11;
    let h = &mut parts.headers;
    let listed: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in listed {
        h.remove(n);
    }
    for n in ["proxy-authorization", "te", "host", H_PATIENT, H_CATEGORY] {
        h.remove(n);
    }
    remove_hop_by_hop_and_own(h);
    Request::from_parts(parts, body)
}

/// Hop-by-hop headers and ours go in both directions.
pub(crate) fn remove_hop_by_hop_and_own(h: &mut HeaderMap) {
    for n in [
        "connection",
        "proxy-connection",
        "keep-alive",
        "transfer-encoding",
        "upgrade",
        "trailer",
    ] {
        h.remove(n);
    }
    let ours: Vec<HeaderName> = h
        .keys()
        .filter(|k| k.as_str().starts_with(OWN_HEADER_PREFIX))
        .cloned()
        .collect();
    for k in ours {
        h.remove(k);
    }
}

/// Why an upstream exchange failed; label of `consentgate_upstream_errors_total{kind}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpstreamErrorKind {
    Connect,
    Tls,
    Timeout,
    Reset,
    Protocol,
}

impl UpstreamErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamErrorKind::Connect => "connect",
            UpstreamErrorKind::Tls => "tls",
            UpstreamErrorKind::Timeout => "timeout",
            UpstreamErrorKind::Reset => "reset",
            UpstreamErrorKind::Protocol => "protocol",
        }
    }
    /// 504 for timeouts, 502 for everything else.
    pub fn status(self) -> u16 {
        if self == UpstreamErrorKind::Timeout {
            504
        } else {
            502
        }
    }
}

#[derive(Debug)]
pub struct UpstreamError {
    pub kind: UpstreamErrorKind,
    /// Safe to show: no URL query, no payload.
    pub detail: String,
}

/// TCP connector that honours `upstream.resolve` and the connect timeout.
#[derive(Clone)]
pub struct ResolvingConnector {
    resolve: Arc<HashMap<String, SocketAddr>>,
    connect_timeout: Duration,
}

impl tower::Service<Uri> for ResolvingConnector {
    type Response = TokioIo<TcpStream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let resolve = self.resolve.clone();
        let timeout = self.connect_timeout;
        Box::pin(async move {
            let host = uri
                .host()
                .ok_or("request URI has no host")?
                .to_ascii_lowercase();
            let port = uri.port_u16().unwrap_or(443);
            let key = format!("{host}:{port}");
            let fut = async {
                match resolve.get(&key) {
                    Some(addr) => TcpStream::connect(*addr).await,
                    None => TcpStream::connect((host.as_str(), port)).await,
                }
            };
            let stream = tokio::time::timeout(timeout, fut)
                .await
                .map_err(|_| -> BoxError { Box::new(ConnectTimeout) })??;
            let _ = stream.set_nodelay(true);
            Ok(TokioIo::new(stream))
        })
    }
}

#[derive(Debug)]
struct ConnectTimeout;
impl std::fmt::Display for ConnectTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connect timed out")
    }
}
impl std::error::Error for ConnectTimeout {}

type HttpsConnector = hyper_rustls::HttpsConnector<ResolvingConnector>;

/// The upstream client; cheap to clone (shares its pool).
#[derive(Clone)]
pub struct UpstreamClient {
    client: Client<HttpsConnector, ProxyBody>,
    response_timeout: Duration,
    resolve: Arc<HashMap<String, SocketAddr>>,
    connect_timeout: Duration,
}

/// Root store: the web PKI plus `extra_ca`.
pub fn root_store(extra_ca: Option<&std::path::Path>) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = extra_ca {
        let pem = std::fs::read(path)
            .map_err(|e| format!("upstream.extra_ca: {}: {e}", path.display()))?;
        let mut n = 0;
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| format!("upstream.extra_ca: {}: {e}", path.display()))?;
            roots
                .add(cert)
                .map_err(|e| format!("upstream.extra_ca: {}: {e}", path.display()))?;
            n += 1;
        }
        if n == 0 {
            return Err(format!(
                "upstream.extra_ca: {}: no certificates found",
                path.display()
            ));
        }
    }
    Ok(roots)
}

pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

impl UpstreamClient {
    pub fn new(cfg: &UpstreamCfg) -> Result<UpstreamClient, String> {
        let roots = root_store(cfg.extra_ca.as_deref())?;
        let tls = rustls::ClientConfig::builder_with_provider(crypto_provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS setup: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let resolve = Arc::new(cfg.resolve.clone());
        let inner = ResolvingConnector {
            resolve: resolve.clone(),
            connect_timeout: cfg.connect_timeout,
        };
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http1();
        let https = if cfg.http2 {
            https.enable_http2().wrap_connector(inner)
        } else {
            https.wrap_connector(inner)
        };
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(cfg.pool_idle_timeout)
            .pool_max_idle_per_host(256)
            .build(https);
        Ok(UpstreamClient {
            client,
            response_timeout: cfg.response_timeout,
            resolve,
            connect_timeout: cfg.connect_timeout,
        })
    }

    /// Send one request; its URI must be absolute `https://host[:port]/...`.
    /// Bounded by the response timeout (headers); never hangs.
    pub async fn send(&self, req: Request<ProxyBody>) -> Result<Response<Incoming>, UpstreamError> {
        match tokio::time::timeout(self.response_timeout, self.client.request(req)).await {
            Err(_) => Err(UpstreamError {
                kind: UpstreamErrorKind::Timeout,
                detail: format!("no response within {:?}", self.response_timeout),
            }),
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => Err(classify(&e)),
        }
    }

    /// A raw TCP connection for a blind tunnel (honours `resolve`).
    pub async fn connect_tcp(&self, host: &str, port: u16) -> Result<TcpStream, UpstreamError> {
        let mut c = ResolvingConnector {
            resolve: self.resolve.clone(),
            connect_timeout: self.connect_timeout,
        };
        let uri: Uri = format!("https://{host}:{port}/")
            .parse()
            .map_err(|_| UpstreamError {
                kind: UpstreamErrorKind::Connect,
                detail: "invalid tunnel target".into(),
            })?;
        use tower::Service;
        match c.call(uri).await {
            Ok(io) => Ok(io.into_inner()),
            Err(e) => Err(UpstreamError {
                kind: if e.is::<ConnectTimeout>() {
                    UpstreamErrorKind::Timeout
                } else {
                    UpstreamErrorKind::Connect
                },
                detail: e.to_string(),
            }),
        }
    }
}

/// The rustls error inside an error chain, looking through io::Error wrappers.
fn find_rustls<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    if let Some(t) = e.downcast_ref::<rustls::Error>() {
        return Some(t);
    }
    if let Some(io) = e.downcast_ref::<std::io::Error>() {
        if let Some(inner) = io.get_ref() {
            if let Some(t) = find_rustls(inner) {
                return Some(t);
            }
        }
    }
    e.source().and_then(find_rustls)
}

fn classify(e: &hyper_util::client::legacy::Error) -> UpstreamError {
    use std::error::Error as _;
    if let Some(t) = e.source().and_then(find_rustls) {
        return UpstreamError {
            kind: UpstreamErrorKind::Tls,
            detail: format!("upstream TLS: {t}"),
        };
    }
    let mut src: Option<&(dyn std::error::Error + 'static)> = e.source();
    let mut kind = if e.is_connect() {
        UpstreamErrorKind::Connect
    } else {
        UpstreamErrorKind::Protocol
    };
    let mut detail = e.to_string();
    while let Some(s) = src {
        if s.downcast_ref::<ConnectTimeout>().is_some() {
            kind = UpstreamErrorKind::Timeout;
            detail = "connect timed out".into();
            break;
        }
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            match io.kind() {
                std::io::ErrorKind::ConnectionRefused => {
                    kind = UpstreamErrorKind::Connect;
                    detail = "connection refused".into();
                }
                std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::BrokenPipe
                | std::io::ErrorKind::UnexpectedEof => {
                    kind = UpstreamErrorKind::Reset;
                    detail = "connection reset by upstream".into();
                }
                _ => detail = format!("upstream I/O: {io}"),
            }
        }
        if let Some(h) = s.downcast_ref::<hyper::Error>() {
            if h.is_incomplete_message() || h.is_canceled() {
                kind = UpstreamErrorKind::Reset;
                detail = "upstream closed the connection before answering".into();
            }
        }
        src = s.source();
    }
    UpstreamError { kind, detail }
}
