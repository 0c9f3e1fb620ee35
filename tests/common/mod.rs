//! Shared integration-test harness: a test CA, a recording TLS upstream that
//! speaks HTTP/1.1 and h2, the real consentgate binary as a child process, and
//! a raw hyper client that sends exactly what a test says (Host header,
//! absolute-form, or h2c with prior knowledge).
#![allow(dead_code)]

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Every vendor host the tests send to; the upstream's certificate names them all.
pub const VENDOR_HOSTS: &[&str] = &[
    "graph.facebook.com",
    "www.google-analytics.com",
    "region1.google-analytics.com",
    "googleads.googleapis.com",
    "business-api.tiktok.com",
    "api.linkedin.com",
    "api.pinterest.com",
    "tr.snapchat.com",
    "api.sendgrid.com",
    "us21.api.mailchimp.com",
    "mandrillapp.com",
    "a.klaviyo.com",
    "rest.iad-01.braze.com",
    "api.twilio.com",
    "api.hubapi.com",
    "api.mypurecloud.com",
    "unknown.example",
    // A made-up vendor configured as a `type: generic` destination.
    "api.example-crm.test",
];

pub fn install_crypto() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

pub struct TestCa {
    pub dir: PathBuf,
    pub ca_pem: PathBuf,
    pub server: Arc<rustls::ServerConfig>,
}

/// A CA of the test's own and a server certificate for `hosts`, signed by it.
pub fn test_ca(dir: &Path, hosts: &[&str]) -> TestCa {
    install_crypto();
    std::fs::create_dir_all(dir).unwrap();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "consentgate test upstream CA");
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let names: Vec<String> = hosts.iter().map(|h| h.to_string()).collect();
    let leaf_params = rcgen::CertificateParams::new(names).unwrap();
    let leaf = leaf_params.signed_by(&leaf_key, &issuer).unwrap();
    let ca_pem = dir.join("upstream-ca.pem");
    std::fs::write(&ca_pem, ca_cert.pem()).unwrap();
    let chain = vec![leaf.der().clone(), ca_cert.der().clone()];
    let key = rustls::pki_types::PrivateKeyDer::try_from(leaf_key.serialize_der()).unwrap();
    let mut server = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    TestCa {
        dir: dir.to_path_buf(),
        ca_pem,
        server: Arc::new(server),
    }
}

/// One request exactly as the upstream received it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    pub path_and_query: String,
    pub version: String,
    pub sni: Option<String>,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("upstream body is JSON")
    }
}

#[derive(Clone, Debug)]
pub enum Behavior {
    Respond {
        status: u16,
        body: &'static str,
    },
    /// Accept the request and never answer.
    Hang,
    /// Answer after a delay.
    Delay(Duration),
}

/// One scripted answer (status, body, extra headers), used once before `behavior`.
#[derive(Clone, Debug)]
pub struct Scripted {
    pub status: u16,
    pub body: String,
    pub headers: Vec<(String, String)>,
}

#[derive(Clone)]
pub struct Upstream {
    pub addr: SocketAddr,
    pub log: Arc<Mutex<Vec<Recorded>>>,
    pub behavior: Arc<Mutex<Behavior>>,
    /// Answers given in order, one per request, before `behavior` applies again.
    pub script: Arc<Mutex<std::collections::VecDeque<Scripted>>>,
}

impl Upstream {
    pub fn requests(&self) -> Vec<Recorded> {
        self.log.lock().unwrap().clone()
    }
    pub fn count(&self) -> usize {
        self.log.lock().unwrap().len()
    }
    pub fn last(&self) -> Recorded {
        self.log
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("upstream received a request")
    }
    pub fn clear(&self) {
        self.log.lock().unwrap().clear();
    }
    pub fn set(&self, b: Behavior) {
        *self.behavior.lock().unwrap() = b;
    }
    /// Queue one answer for the next request (after those already queued).
    pub fn push(&self, status: u16, body: &str, headers: &[(&str, &str)]) {
        self.script.lock().unwrap().push_back(Scripted {
            status,
            body: body.to_string(),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        });
    }
}

/// A TLS upstream on 127.0.0.1 that records every request and answers per `behavior`.
pub async fn start_upstream(ca: &TestCa) -> Upstream {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let up = Upstream {
        addr,
        log: Arc::new(Mutex::new(Vec::new())),
        behavior: Arc::new(Mutex::new(Behavior::Respond {
            status: 200,
            body: r#"{"upstream":"ok"}"#,
        })),
        script: Arc::new(Mutex::new(std::collections::VecDeque::new())),
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(ca.server.clone());
    let u = up.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            let u = u.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let sni = tls.get_ref().1.server_name().map(str::to_string);
                let svc = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                    let u = u.clone();
                    let sni = sni.clone();
                    async move {
                        let (parts, body) = req.into_parts();
                        let body = body
                            .collect()
                            .await
                            .map(|c| c.to_bytes())
                            .unwrap_or_default();
                        u.log.lock().unwrap().push(Recorded {
                            method: parts.method.to_string(),
                            path_and_query: parts
                                .uri
                                .path_and_query()
                                .map(|p| p.to_string())
                                .unwrap_or_default(),
                            version: format!("{:?}", parts.version),
                            sni,
                            headers: parts
                                .headers
                                .iter()
                                .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
                                .collect(),
                            body: body.to_vec(),
                        });
                        let scripted = u.script.lock().unwrap().pop_front();
                        if let Some(sc) = scripted {
                            let mut r = hyper::Response::new(Full::new(Bytes::from(sc.body)));
                            *r.status_mut() = hyper::StatusCode::from_u16(sc.status).unwrap();
                            r.headers_mut()
                                .insert("content-type", "application/json".parse().unwrap());
                            for (k, v) in sc.headers {
                                r.headers_mut().insert(
                                    hyper::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                                    v.parse().unwrap(),
                                );
                            }
                            return Ok::<_, std::convert::Infallible>(r);
                        }
                        let b = u.behavior.lock().unwrap().clone();
                        let (status, text) = match b {
                            Behavior::Respond { status, body } => (status, body),
                            Behavior::Hang => {
                                tokio::time::sleep(Duration::from_secs(3600)).await;
                                (200, "")
                            }
                            Behavior::Delay(d) => {
                                tokio::time::sleep(d).await;
                                (200, r#"{"upstream":"slow"}"#)
                            }
                        };
                        let mut r =
                            hyper::Response::new(Full::new(Bytes::from_static(text.as_bytes())));
                        *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
                        r.headers_mut()
                            .insert("content-type", "application/json".parse().unwrap());
                        r.headers_mut()
                            .insert("x-upstream", "recorded".parse().unwrap());
                        Ok::<_, std::convert::Infallible>(r)
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    up
}

/// A port for a listener the test will start. Taken from a per-process counter
/// in 20000-32767, below the kernel's ephemeral range (32768+), so no socket
/// bound to :0 and no outgoing connection of a parallel test can grab it between
/// this check and the proxy's bind.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let base = 20_000 + (std::process::id() % 40) * 300;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (base + n % 12_000).min(32_767) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Where every spawned proxy's log goes, so a test can scan them all for PHI.
pub fn log_dir() -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("proxy-logs");
    std::fs::create_dir_all(&d).unwrap();
    d
}

pub struct ProxyOpts {
    /// Extra YAML appended to the generated config (top-level keys).
    pub extra_yaml: String,
    /// Consent snapshot to use (default: the shipped example).
    pub consent_file: Option<PathBuf>,
    pub response_timeout: &'static str,
    pub unknown_destinations: &'static str,
    pub shutdown_grace: &'static str,
    /// Hosts resolved somewhere other than the recording upstream.
    pub resolve_override: Vec<(&'static str, SocketAddr)>,
    /// Replaces the generated `consent:` block (full YAML, `consent:` line
    /// included), e.g. for `source: postgres`.
    pub consent_yaml: Option<String>,
    /// Extra lines for the generated `upstream:` block (two-space indented).
    pub upstream_yaml: String,
}

impl Default for ProxyOpts {
    fn default() -> Self {
        ProxyOpts {
            extra_yaml: String::new(),
            consent_file: None,
            response_timeout: "5s",
            unknown_destinations: "deny",
            shutdown_grace: "10s",
            resolve_override: Vec::new(),
            consent_yaml: None,
            upstream_yaml: String::new(),
        }
    }
}

pub struct Proxy {
    pub child: Child,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub log: PathBuf,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn test_dir(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("it")
        .join(format!("{name}.{}.{}", std::process::id(), rand_suffix()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    t ^ N.fetch_add(1, Ordering::Relaxed)
}

/// The config YAML the harness generates for `upstream`.
pub fn config_yaml(
    dir: &Path,
    up_addr: SocketAddr,
    ca: &TestCa,
    opts: &ProxyOpts,
    proxy: u16,
    admin: u16,
) -> String {
    let resolve: String = VENDOR_HOSTS
        .iter()
        .map(|h| {
            let to = opts
                .resolve_override
                .iter()
                .find(|(o, _)| o == h)
                .map(|(_, a)| *a)
                .unwrap_or(up_addr);
            format!("    \"{h}:443\": \"{to}\"\n")
        })
        .collect();
    let consent = opts
        .consent_file
        .clone()
        .unwrap_or_else(|| repo().join("config/consent.example.jsonl"));
    let consent_block = opts.consent_yaml.clone().unwrap_or_else(|| {
        format!(
            "consent:\n  source: file\n  file: {consent}\n  journal: {dir}/journal\n  max_staleness: 5m\n",
            consent = consent.display(),
            dir = dir.display(),
        )
    });
    format!(
        "listen:\n  proxy: 127.0.0.1:{proxy}\n  admin: 127.0.0.1:{admin}\n\
unknown_destinations: {unknown}\n\
interception:\n  ca_cert: {dir}/certs/ca.pem\n  ca_key: {dir}/certs/ca-key.pem\n\
upstream:\n  extra_ca: {ca}\n  connect_timeout: 2s\n  response_timeout: {rt}\n{upx}  resolve:\n{resolve}\
{consent_block}\
admin:\n  tokens_file: {tokens}\n\
audit:\n  path: {dir}/audit\n\
shutdown_grace: {grace}\n{extra}\n",
        unknown = opts.unknown_destinations,
        dir = dir.display(),
        ca = ca.ca_pem.display(),
        rt = opts.response_timeout,
        upx = opts.upstream_yaml,
        tokens = repo().join("config/admin-tokens.example").display(),
        grace = opts.shutdown_grace,
        extra = opts.extra_yaml,
    )
}

/// Write a config for `upstream` and start the real binary; waits until /readyz is 200.
pub fn start_proxy(dir: &Path, up: &Upstream, ca: &TestCa, opts: ProxyOpts) -> Proxy {
    let (pp, ap) = (free_port(), free_port());
    let config = dir.join("consentgate.yaml");
    std::fs::write(&config, config_yaml(dir, up.addr, ca, &opts, pp, ap)).unwrap();
    spawn_proxy(dir, &config, pp, ap)
}

pub fn spawn_proxy(dir: &Path, config: &Path, pp: u16, ap: u16) -> Proxy {
    // `.` separators: a pid next to a `-` could read like a patient id (P-1004).
    let log = log_dir().join(format!(
        "{}.{}.log",
        dir.file_name().unwrap().to_string_lossy(),
        rand_suffix()
    ));
    let logf = std::fs::File::create(&log).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_consentgate"))
        .args(["run", "--config"])
        .arg(config)
        .current_dir(dir)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::from(logf))
        .spawn()
        .expect("spawn consentgate");
    let p = Proxy {
        child,
        proxy: SocketAddr::from(([127, 0, 0, 1], pp)),
        admin: SocketAddr::from(([127, 0, 0, 1], ap)),
        dir: dir.to_path_buf(),
        config: config.to_path_buf(),
        log,
    };
    wait_ready(&p);
    p
}

pub fn wait_ready(p: &Proxy) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(mut s) = std::net::TcpStream::connect(p.admin) {
            let _ = s.write_all(b"GET /readyz HTTP/1.0\r\n\r\n");
            let mut buf = String::new();
            use std::io::Read;
            let _ = s.read_to_string(&mut buf);
            if buf.starts_with("HTTP/1.0 200") || buf.starts_with("HTTP/1.1 200") {
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!(
        "proxy did not become ready; log:\n{}",
        std::fs::read_to_string(&p.log).unwrap_or_default()
    );
}

/// A request as the test wants it sent.
#[derive(Clone, Debug)]
pub struct Req {
    pub method: &'static str,
    pub host: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Send absolute-form `http://host/path` (forward proxy) instead of origin-form + Host.
    pub absolute: bool,
}

impl Req {
    pub fn post(host: &str, path: &str, body: impl Into<Vec<u8>>) -> Req {
        Req {
            method: "POST",
            host: host.into(),
            path: path.into(),
            headers: vec![("content-type".into(), "application/json".into())],
            body: body.into(),
            absolute: false,
        }
    }
    pub fn get(host: &str, path: &str) -> Req {
        Req {
            method: "GET",
            host: host.into(),
            path: path.into(),
            headers: vec![],
            body: vec![],
            absolute: false,
        }
    }
    pub fn header(mut self, k: &str, v: &str) -> Req {
        self.headers.retain(|(n, _)| !n.eq_ignore_ascii_case(k));
        self.headers.push((k.into(), v.into()));
        self
    }
}

#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn header(&self, k: &str) -> Option<&str> {
        self.headers.get(k).and_then(|v| v.to_str().ok())
    }
    pub fn decision(&self) -> &str {
        self.header("x-consentgate-decision").unwrap_or("<none>")
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|_| panic!("JSON body, got {:?}", String::from_utf8_lossy(&self.body)))
    }
    /// A refusal's contract fields (`error`, `request_id`, `reasons` | `detail`):
    /// under `"consentgate"` in a vendor-shaped body, at the top of a plain one.
    pub fn contract(&self) -> serde_json::Value {
        let j = self.json();
        match j.get("consentgate") {
            Some(c) => c.clone(),
            None => j,
        }
    }
}

fn build(req: &Req, h2: bool) -> hyper::Request<Full<Bytes>> {
    let uri = if req.absolute || h2 {
        format!("http://{}{}", req.host, req.path)
    } else {
        req.path.clone()
    };
    let mut b = hyper::Request::builder().method(req.method).uri(uri);
    if h2 {
        b = b.version(hyper::Version::HTTP_2);
    } else {
        b = b.header("host", &req.host);
    }
    for (k, v) in &req.headers {
        b = b.header(k.as_str(), v.as_str());
    }
    b.body(Full::new(Bytes::from(req.body.clone()))).unwrap()
}

async fn read(resp: hyper::Response<Incoming>) -> Resp {
    let (parts, body) = resp.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes().to_vec())
        .unwrap_or_default();
    Resp {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body,
    }
}

/// Send one request over a new HTTP/1.1 connection to the proxy.
pub async fn send(proxy: SocketAddr, req: Req) -> Resp {
    let tcp = tokio::net::TcpStream::connect(proxy).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    read(sender.send_request(build(&req, false)).await.unwrap()).await
}

/// Send one request over h2c with prior knowledge.
pub async fn send_h2c(proxy: SocketAddr, req: Req) -> Resp {
    let tcp = tokio::net::TcpStream::connect(proxy).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    read(sender.send_request(build(&req, true)).await.unwrap()).await
}

/// GET a path on the admin listener.
pub async fn admin_get(p: &Proxy, path: &str) -> Resp {
    send(p.admin, Req::get("admin", path)).await
}

/// The plain, SHA-256 and MD5 forms of an identifier, for leak searches.
pub fn forms(plain: &str) -> Vec<String> {
    use md5::Digest as _;
    let mut out = vec![plain.to_string()];
    let norms = [
        plain.to_string(),
        plain.trim().to_lowercase(),
        plain
            .chars()
            .filter(|c| c.is_ascii_digit())
            .collect::<String>(),
    ];
    for n in norms.iter().filter(|n| !n.is_empty()) {
        out.push(hex::encode(sha2::Sha256::digest(n.as_bytes())));
        out.push(hex::encode(md5::Md5::digest(n.as_bytes())));
        if n.chars().all(|c| c.is_ascii_digit()) {
            let e164 = format!("+{n}");
            out.push(hex::encode(sha2::Sha256::digest(e164.as_bytes())));
            out.push(n.clone());
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Panic if any form of any identifier occurs in `bytes`.
pub fn assert_absent(bytes: &[u8], identifiers: &[&str], what: &str) {
    let text = String::from_utf8_lossy(bytes).to_lowercase();
    for id in identifiers {
        for f in forms(id) {
            assert!(
                !text.contains(&f.to_lowercase()),
                "{what}: found a form of {id:?} ({f})"
            );
        }
    }
}
