//! Forward: the request as it leaves (absolute URI, our own and hop-by-hop
//! headers removed) and the pooled upstream client. Always TLS (rustls, TLS
//! 1.2+), verified against the web PKI roots plus `upstream.extra_ca`;
//! `upstream.resolve` overrides where a host:port connects; HTTP/1.1 or h2 by ALPN.
//!
//! With `upstream.proxy`, every upstream connection (blind tunnels too) is a
//! CONNECT tunnel through the parent proxy, except to the hosts of its
//! `no_proxy`: the parent sees `CONNECT vendor:443` and then only TLS, which is
//! negotiated with the vendor end to end and verified as above. Like curl's
//! `--resolve`, `upstream.resolve` applies to the address actually dialled: the
//! parent proxy's `host:port` when tunnelling (the CONNECT authority stays the
//! vendor's name, resolved by the parent), the vendor's when connecting directly.

use crate::config::{ParentProxy as ParentProxyCfg, Upstream as UpstreamCfg};
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
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub(crate) type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

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
pub(crate) enum UpstreamErrorKind {
    Connect,
    Tls,
    Timeout,
    Reset,
    Protocol,
}

impl UpstreamErrorKind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            UpstreamErrorKind::Connect => "connect",
            UpstreamErrorKind::Tls => "tls",
            UpstreamErrorKind::Timeout => "timeout",
            UpstreamErrorKind::Reset => "reset",
            UpstreamErrorKind::Protocol => "protocol",
        }
    }
    /// 504 for timeouts, 502 for everything else.
    pub(crate) fn status(self) -> u16 {
        if self == UpstreamErrorKind::Timeout {
            504
        } else {
            502
        }
    }
}

#[derive(Debug)]
pub(crate) struct UpstreamError {
    pub(crate) kind: UpstreamErrorKind,
    /// Safe to show: no URL query, no payload.
    pub(crate) detail: String,
}

/// TCP connector that honours `upstream.resolve`, `upstream.proxy` and the
/// connect timeout (which bounds the whole CONNECT exchange with a parent proxy).
#[derive(Clone)]
pub(crate) struct ResolvingConnector {
    resolve: Arc<HashMap<String, SocketAddr>>,
    connect_timeout: Duration,
    parent: Option<Arc<Parent>>,
}

/// The parent proxy, ready to dial.
pub(crate) struct Parent {
    host: String,
    port: u16,
    /// The `Proxy-Authorization` value (`Basic …`), when credentials are set.
    authorization: Option<String>,
    no_proxy: Vec<String>,
}

/// Longest CONNECT answer head read from a parent proxy.
const MAX_PARENT_HEAD: usize = 16 << 10;
/// Largest `upstream.proxy.credentials_file` read.
const MAX_CREDENTIALS_BYTES: u64 = 4 << 10;

impl Parent {
    fn new(cfg: &ParentProxyCfg) -> Result<Parent, String> {
        let authorization = cfg
            .credentials_file
            .as_deref()
            .map(load_credentials)
            .transpose()?;
        Ok(Parent {
            host: cfg.host.clone(),
            port: cfg.port,
            authorization,
            no_proxy: cfg.no_proxy.clone(),
        })
    }

    /// Whether `host` is connected to directly (`no_proxy`: a name exactly, or
    /// `*.suffix` for the names under it).
    fn bypasses(&self, host: &str) -> bool {
        self.no_proxy.iter().any(|e| match e.strip_prefix("*.") {
            Some(suffix) => host
                .strip_suffix(suffix)
                .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
            None => e == host,
        })
    }

    /// Dial the parent proxy (through `resolve` when it names its `host:port`)
    /// and open a tunnel to `host:port`.
    async fn tunnel(
        &self,
        resolve: &HashMap<String, SocketAddr>,
        host: &str,
        port: u16,
    ) -> Result<TcpStream, ParentProxyError> {
        let key = if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        };
        let dialled = match resolve.get(&key) {
            Some(addr) => TcpStream::connect(*addr).await,
            None => TcpStream::connect((self.host.as_str(), self.port)).await,
        };
        let mut s = dialled.map_err(|e| ParentProxyError::io("connecting to", &e))?;
        let _ = s.set_nodelay(true);
        let authority = if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        let mut head = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n");
        if let Some(a) = &self.authorization {
            head.push_str("Proxy-Authorization: ");
            head.push_str(a);
            head.push_str("\r\n");
        }
        head.push_str("\r\n");
        s.write_all(head.as_bytes())
            .await
            .map_err(|e| ParentProxyError::io("writing CONNECT to", &e))?;
        let mut buf = Vec::with_capacity(512);
        let mut chunk = [0u8; 1024];
        loop {
            let n = s
                .read(&mut chunk)
                .await
                .map_err(|e| ParentProxyError::io("reading the CONNECT answer of", &e))?;
            if n == 0 {
                return Err(ParentProxyError::new(
                    UpstreamErrorKind::Reset,
                    "the parent proxy (upstream.proxy) closed the connection before answering CONNECT",
                ));
            }
            buf.extend_from_slice(&chunk[..n]);
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut resp = httparse::Response::new(&mut headers);
            match resp.parse(&buf) {
                Ok(httparse::Status::Complete(len)) => {
                    let code = resp.code.unwrap_or(0);
                    if !(200..300).contains(&code) {
                        return Err(self.refused(code, &authority));
                    }
                    // A TLS client speaks first: nothing may follow the answer.
                    if len != buf.len() {
                        return Err(ParentProxyError::new(
                            UpstreamErrorKind::Protocol,
                            "the parent proxy (upstream.proxy) sent data after its CONNECT answer",
                        ));
                    }
                    return Ok(s);
                }
                Ok(httparse::Status::Partial) if buf.len() <= MAX_PARENT_HEAD => {}
                _ => {
                    return Err(ParentProxyError::new(
                        UpstreamErrorKind::Protocol,
                        "the parent proxy (upstream.proxy) did not answer CONNECT with HTTP",
                    ))
                }
            }
        }
    }

    /// A non-2xx answer to CONNECT, in words the operator can act on.
    fn refused(&self, code: u16, authority: &str) -> ParentProxyError {
        let status = http::StatusCode::from_u16(code)
            .map(|s| s.to_string())
            .unwrap_or_else(|_| code.to_string());
        let (kind, detail) = match code {
            407 if self.authorization.is_some() => (
                UpstreamErrorKind::Connect,
                format!("the parent proxy (upstream.proxy) refused the credentials of upstream.proxy.credentials_file ({status})"),
            ),
            407 => (
                UpstreamErrorKind::Connect,
                format!("the parent proxy (upstream.proxy) requires credentials: set upstream.proxy.credentials_file ({status})"),
            ),
            504 => (
                UpstreamErrorKind::Timeout,
                format!("the parent proxy (upstream.proxy) timed out reaching {authority} ({status})"),
            ),
            _ => (
                UpstreamErrorKind::Connect,
                format!("the parent proxy (upstream.proxy) refused CONNECT {authority} ({status})"),
            ),
        };
        ParentProxyError::new(kind, detail)
    }
}

/// `user:password` (one line) as a `Basic` credential. The error names the file,
/// never its content.
fn load_credentials(path: &std::path::Path) -> Result<String, String> {
    let what = format!("upstream.proxy.credentials_file: {}", path.display());
    let meta = std::fs::metadata(path).map_err(|e| format!("{what}: {e}"))?;
    if meta.len() > MAX_CREDENTIALS_BYTES {
        return Err(format!("{what}: larger than {MAX_CREDENTIALS_BYTES} bytes"));
    }
    let raw = std::fs::read(path).map_err(|e| format!("{what}: {e}"))?;
    let line = raw.strip_suffix(b"\n").unwrap_or(&raw);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let well_formed = line.iter().all(|b| !b.is_ascii_control())
        && line.iter().position(|b| *b == b':').is_some_and(|i| i > 0);
    if !well_formed {
        return Err(format!(
            "{what}: expected one line user:password (a non-empty user, no control characters)"
        ));
    }
    Ok(format!("Basic {}", base64(line)))
}

/// Standard base64 with padding (RFC 4648 §4), for `Proxy-Authorization`.
fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A failure on the way through the parent proxy: its kind and what the app
/// is told (no credentials, no URL query).
#[derive(Debug)]
struct ParentProxyError {
    kind: UpstreamErrorKind,
    detail: String,
}

impl ParentProxyError {
    fn new(kind: UpstreamErrorKind, detail: impl Into<String>) -> ParentProxyError {
        ParentProxyError {
            kind,
            detail: detail.into(),
        }
    }
    fn io(doing: &str, e: &std::io::Error) -> ParentProxyError {
        let kind = match e.kind() {
            std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::BrokenPipe
            | std::io::ErrorKind::UnexpectedEof => UpstreamErrorKind::Reset,
            _ => UpstreamErrorKind::Connect,
        };
        ParentProxyError::new(
            kind,
            format!("{doing} the parent proxy (upstream.proxy): {e}"),
        )
    }
}

impl std::fmt::Display for ParentProxyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.detail)
    }
}
impl std::error::Error for ParentProxyError {}

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
        let parent = self.parent.clone();
        Box::pin(async move {
            let host = uri
                .host()
                .ok_or("request URI has no host")?
                .to_ascii_lowercase();
            let port = uri.port_u16().unwrap_or(443);
            if let Some(p) = parent.filter(|p| !p.bypasses(&host)) {
                let host = host.trim_start_matches('[').trim_end_matches(']');
                let stream = tokio::time::timeout(timeout, p.tunnel(&resolve, host, port))
                    .await
                    .map_err(|_| -> BoxError { Box::new(ConnectTimeout) })??;
                return Ok(TokioIo::new(stream));
            }
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
pub(crate) struct UpstreamClient {
    client: Client<HttpsConnector, ProxyBody>,
    response_timeout: Duration,
    resolve: Arc<HashMap<String, SocketAddr>>,
    connect_timeout: Duration,
    parent: Option<Arc<Parent>>,
}

/// Root store: the web PKI plus `extra_ca`.
fn root_store(extra_ca: Option<&std::path::Path>) -> Result<rustls::RootCertStore, String> {
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

pub(crate) fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

impl UpstreamClient {
    pub(crate) fn new(cfg: &UpstreamCfg) -> Result<UpstreamClient, String> {
        let roots = root_store(cfg.extra_ca.as_deref())?;
        let tls = rustls::ClientConfig::builder_with_provider(crypto_provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS setup: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let resolve = Arc::new(cfg.resolve.clone());
        let parent = cfg
            .proxy
            .as_ref()
            .map(Parent::new)
            .transpose()?
            .map(Arc::new);
        let inner = ResolvingConnector {
            resolve: resolve.clone(),
            connect_timeout: cfg.connect_timeout,
            parent: parent.clone(),
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
            parent,
        })
    }

    /// Send one request; its URI must be absolute `https://host[:port]/...`.
    /// Bounded by the response timeout (headers); never hangs.
    pub(crate) async fn send(
        &self,
        req: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, UpstreamError> {
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
    pub(crate) async fn connect_tcp(
        &self,
        host: &str,
        port: u16,
    ) -> Result<TcpStream, UpstreamError> {
        let mut c = ResolvingConnector {
            resolve: self.resolve.clone(),
            connect_timeout: self.connect_timeout,
            parent: self.parent.clone(),
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
            Err(e) if e.is::<ParentProxyError>() => {
                let p = e.downcast_ref::<ParentProxyError>();
                Err(UpstreamError {
                    kind: p.map_or(UpstreamErrorKind::Connect, |p| p.kind),
                    detail: e.to_string(),
                })
            }
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
        if let Some(p) = s.downcast_ref::<ParentProxyError>() {
            return UpstreamError {
                kind: p.kind,
                detail: p.detail.clone(),
            };
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parent(no_proxy: &[&str]) -> Parent {
        Parent {
            host: "proxy.corp".into(),
            port: 3128,
            authorization: None,
            no_proxy: no_proxy.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn base64_matches_rfc_4648() {
        for (plain, enc) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
            ("Aladdin:open sesame", "QWxhZGRpbjpvcGVuIHNlc2FtZQ=="),
        ] {
            assert_eq!(base64(plain.as_bytes()), enc, "{plain}");
        }
        assert_eq!(base64(&[0xff, 0xfe, 0xfd]), "//79");
    }

    #[test]
    fn no_proxy_names_and_suffixes() {
        let p = parent(&["api.twilio.com", "*.internal.example"]);
        assert!(p.bypasses("api.twilio.com"));
        assert!(!p.bypasses("xapi.twilio.com"));
        assert!(!p.bypasses("graph.facebook.com"));
        assert!(p.bypasses("a.internal.example"));
        assert!(p.bypasses("a.b.internal.example"));
        assert!(
            !p.bypasses("internal.example"),
            "the suffix form is names under it"
        );
        assert!(!p.bypasses("xinternal.example"));
        assert!(!parent(&[]).bypasses("api.twilio.com"));
    }

    #[test]
    fn credentials_file_is_one_line_and_never_shown() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("creds");
        for (content, ok) in [
            ("svc-egress:s3cr3t:with:colons\n", true),
            ("svc-egress:s3cr3t\r\n", true),
            ("svc-egress:", true),
            (":s3cr3t", false),
            ("no-colon-s3cr3t", false),
            ("svc:s3cr3t\nsecond:line", false),
            ("", false),
        ] {
            std::fs::write(&f, content).unwrap();
            match load_credentials(&f) {
                Ok(v) => {
                    assert!(ok, "{content:?} accepted");
                    let line = content.trim_end_matches(['\r', '\n']);
                    assert_eq!(v, format!("Basic {}", base64(line.as_bytes())));
                }
                Err(e) => {
                    assert!(!ok, "{content:?}: {e}");
                    assert!(e.starts_with("upstream.proxy.credentials_file: "), "{e}");
                    assert!(!e.contains("s3cr3t"), "{e}");
                }
            }
        }
        std::fs::write(&f, vec![b'a'; 5000]).unwrap();
        assert!(load_credentials(&f).unwrap_err().contains("larger than"));
        let e = load_credentials(&dir.path().join("missing")).unwrap_err();
        assert!(e.contains("upstream.proxy.credentials_file"), "{e}");
    }
}
