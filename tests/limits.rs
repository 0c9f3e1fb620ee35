//! Issue 14 acceptance 4: `limits` on every listener. Against the real binary
//! with 1 s timeouts, a slow head, a slow body, a body shorter than its
//! Content-Length, a 100 KB header line and a budget exhausted by concurrent
//! slow bodies each end within the timeout + 1 s with 408 / 431 / 503 and the
//! product's JSON error, on the proxy port (plain, and inside an intercepted
//! CONNECT), the gateway listener, the admin listener and the webhooks
//! listener (SPEC §13); the recording upstream receives nothing. Also: the same limits on h2c, duplicate Host,
//! and the absolute-form target winning over Host.

mod common;

use common::*;
use serde_json::Value;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const LIMITS: &str = "limits:\n  header_read_timeout: 1s\n  body_read_timeout: 1s\n  \
max_header_bytes: 8KiB\n  inflight_body_bytes: 64KiB\nmax_body_bytes: 64KiB\n";
const TIMEOUT: Duration = Duration::from_secs(1);
/// "ends within its timeout + 1 s".
const WITHIN: Duration = Duration::from_secs(2);
const META_PATH: &str = "/v19.0/1234567890/events";
const ADMIN_TOKEN: &str = "example-ops-token";

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Listener {
    Plain,
    Connect,
    Gateway,
    Admin,
    Webhooks,
}

struct Env {
    p: Proxy,
    up: Upstream,
    gateway: SocketAddr,
    webhooks: SocketAddr,
    ca: PathBuf,
}

async fn start(name: &str, extra: &str) -> Env {
    let dir = test_dir(name);
    let ca = test_ca(&dir.join("upstream"), VENDOR_HOSTS);
    let up = start_upstream(&ca).await;
    let (pp, ap, gw, wh) = (free_port(), free_port(), free_port(), free_port());
    let twilio_token = dir.join("twilio.token");
    std::fs::write(&twilio_token, "twilio-auth-token-limits").unwrap();
    let webhooks = format!(
        "webhooks:\n  public_url: https://hooks.example.org\n  state_dir: {}\n  \
         twilio: {{secret_file: {}}}\n",
        dir.join("webhooks").display(),
        twilio_token.display()
    );
    let opts = ProxyOpts {
        extra_yaml: format!("{LIMITS}{webhooks}{extra}"),
        ..Default::default()
    };
    let cfg = config_yaml(&dir, up.addr, &ca, &opts, pp, ap).replace(
        &format!("  admin: 127.0.0.1:{ap}\n"),
        &format!(
            "  admin: 127.0.0.1:{ap}\n  gateway: 127.0.0.1:{gw}\n  webhooks: 127.0.0.1:{wh}\n"
        ),
    );
    let config = dir.join("consentgate.yaml");
    std::fs::write(&config, cfg).unwrap();
    let p = spawn_proxy(&dir, &config, pp, ap);
    let ca = p.dir.join("certs/ca.pem");
    Env {
        p,
        up,
        gateway: SocketAddr::from(([127, 0, 0, 1], gw)),
        webhooks: SocketAddr::from(([127, 0, 0, 1], wh)),
        ca,
    }
}

async fn tls_client(
    tcp: tokio::net::TcpStream,
    host: &str,
    ca_pem: &Path,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(ca_pem).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let name = rustls::pki_types::ServerName::try_from(host.to_string()).unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .unwrap()
}

/// A connection to `l`, ready for a request to Meta (or the consent API).
async fn open(env: &Env, l: Listener) -> Box<dyn Io> {
    let host = "graph.facebook.com";
    match l {
        Listener::Plain => Box::new(tokio::net::TcpStream::connect(env.p.proxy).await.unwrap()),
        Listener::Admin => Box::new(tokio::net::TcpStream::connect(env.p.admin).await.unwrap()),
        Listener::Webhooks => Box::new(tokio::net::TcpStream::connect(env.webhooks).await.unwrap()),
        Listener::Gateway => {
            let tcp = tokio::net::TcpStream::connect(env.gateway).await.unwrap();
            Box::new(tls_client(tcp, host, &env.ca).await)
        }
        Listener::Connect => {
            let mut tcp = tokio::net::TcpStream::connect(env.p.proxy).await.unwrap();
            tcp.write_all(
                format!("CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n\r\n").as_bytes(),
            )
            .await
            .unwrap();
            let mut head = Vec::new();
            let mut b = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                assert_eq!(tcp.read(&mut b).await.unwrap(), 1, "CONNECT answered");
                head.push(b[0]);
            }
            assert!(
                head.starts_with(b"HTTP/1.1 200"),
                "{}",
                String::from_utf8_lossy(&head)
            );
            Box::new(tls_client(tcp, host, &env.ca).await)
        }
    }
}

/// The request line and headers for `l`, without the empty line.
fn head_start(l: Listener) -> String {
    match l {
        Listener::Admin => format!(
            "PUT /v1/consent/P-LIMITS HTTP/1.1\r\nHost: admin\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\n\
             Content-Type: application/json\r\n"
        ),
        Listener::Webhooks => "POST /v1/webhooks/twilio HTTP/1.1\r\nHost: hooks.example.org\r\n\
             Content-Type: application/x-www-form-urlencoded\r\n"
            .to_string(),
        _ => format!(
            "POST {META_PATH} HTTP/1.1\r\nHost: graph.facebook.com\r\nContent-Type: application/json\r\n"
        ),
    }
}

fn head(l: Listener, content_length: usize) -> Vec<u8> {
    format!("{}Content-Length: {content_length}\r\n\r\n", head_start(l)).into_bytes()
}

#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    elapsed: Duration,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|_| panic!("JSON body, got {:?}", String::from_utf8_lossy(&self.body)))
    }
    /// The product's JSON refusal: code, request id in body and header, `blocked`.
    fn refusal(&self, status: u16, code: &str) -> String {
        assert_eq!(self.status, status, "{self:?}");
        let j = self.json();
        assert_eq!(j["error"], code, "{j}");
        assert_eq!(self.header("x-consentgate-decision"), Some("blocked"));
        let id = self
            .header("x-consentgate-request-id")
            .expect("request id header");
        assert_eq!(j["request_id"], id, "{j}");
        id.to_string()
    }
}

/// Read one response (head, then Content-Length bytes).
async fn read_answer<R: AsyncRead + Unpin>(r: &mut R, started: Instant) -> Answer {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 4096];
    let read = async {
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut resp = httparse::Response::new(&mut headers);
            if let Ok(httparse::Status::Complete(n)) = resp.parse(&buf) {
                let headers: Vec<(String, String)> = resp
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_string(),
                            String::from_utf8_lossy(h.value).to_string(),
                        )
                    })
                    .collect();
                let len: usize = headers
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                    .map(|(_, v)| v.parse().unwrap())
                    .unwrap_or(0);
                if buf.len() >= n + len {
                    return Answer {
                        status: resp.code.unwrap(),
                        headers,
                        body: buf[n..n + len].to_vec(),
                        elapsed: started.elapsed(),
                    };
                }
            }
            let k = r.read(&mut tmp).await.unwrap_or(0);
            assert!(
                k > 0,
                "connection closed without a full answer: {:?}",
                String::from_utf8_lossy(&buf)
            );
            buf.extend_from_slice(&tmp[..k]);
        }
    };
    tokio::time::timeout(Duration::from_secs(15), read)
        .await
        .expect("an answer within 15 s")
}

/// Send `first`, then (optionally) `n` more bytes every `every`, and read the
/// answer; the time counts from when `first` was written.
async fn exchange(io: Box<dyn Io>, first: Vec<u8>, trickle: Option<(usize, Duration)>) -> Answer {
    let (mut rd, mut wr) = tokio::io::split(io);
    let started = Instant::now();
    let writer = tokio::spawn(async move {
        if wr.write_all(&first).await.is_err() {
            return;
        }
        let _ = wr.flush().await;
        if let Some((n, every)) = trickle {
            for _ in 0..50 {
                tokio::time::sleep(every).await;
                if wr.write_all(&vec![b'x'; n]).await.is_err() {
                    return;
                }
                let _ = wr.flush().await;
            }
        }
        // Keep our side open: the proxy must not wait for us to close it.
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(wr);
    });
    let a = read_answer(&mut rd, started).await;
    writer.abort();
    a
}

/// The four limits (budget apart), on one listener. Returns the request ids
/// of the refusals, heads refused before a request existed included (to find
/// them in the audit: every request id the app is given is in the trail).
async fn four_limits(env: &Env, l: Listener) -> Vec<(String, &'static str)> {
    let mut audited = Vec::new();

    // Slow head: the empty line never comes.
    let a = exchange(open(env, l).await, head_start(l).into_bytes(), None).await;
    let id = a.refusal(408, "request_timeout");
    assert!(a.elapsed <= WITHIN, "{l:?} slow head took {:?}", a.elapsed);
    assert!(
        a.elapsed >= TIMEOUT / 2,
        "{l:?} slow head refused early: {:?}",
        a.elapsed
    );
    assert_eq!(a.header("connection"), Some("close"));
    audited.push((id, "request_timeout"));

    // Slow body: 10 bytes every 300 ms of a 200-byte body.
    let mut first = head(l, 200);
    first.extend_from_slice(b"{\"data\":[");
    let a = exchange(
        open(env, l).await,
        first,
        Some((10, Duration::from_millis(300))),
    )
    .await;
    let id = a.refusal(408, "request_timeout");
    assert!(a.elapsed <= WITHIN, "{l:?} slow body took {:?}", a.elapsed);
    assert!(
        a.elapsed >= TIMEOUT / 2,
        "{l:?} slow body refused early: {:?}",
        a.elapsed
    );
    audited.push((id, "request_timeout"));

    // Short body: 50 of the 200 declared bytes, then nothing.
    let mut first = head(l, 200);
    first.extend_from_slice(&[b' '; 50]);
    let a = exchange(open(env, l).await, first, None).await;
    let id = a.refusal(408, "request_timeout");
    assert!(a.elapsed <= WITHIN, "{l:?} short body took {:?}", a.elapsed);
    audited.push((id, "request_timeout"));

    // Big head: one 100 KB header line.
    let mut first = head_start(l).into_bytes();
    first.extend_from_slice(b"X-Big: ");
    first.extend_from_slice(&vec![b'a'; 100_000]);
    first.extend_from_slice(b"\r\nContent-Length: 0\r\n\r\n");
    let a = exchange(open(env, l).await, first, None).await;
    let id = a.refusal(431, "headers_too_large");
    assert!(a.elapsed <= WITHIN, "{l:?} big head took {:?}", a.elapsed);
    audited.push((id, "headers_too_large"));

    // More header fields than any parser here accepts.
    let mut first = head_start(l);
    for i in 0..120 {
        first.push_str(&format!("X-H{i}: v\r\n"));
    }
    first.push_str("Content-Length: 0\r\n\r\n");
    let a = exchange(open(env, l).await, first.into_bytes(), None).await;
    let id = a.refusal(431, "headers_too_large");
    audited.push((id, "headers_too_large"));

    // The admin API's and the webhooks' refusals are in the trail too.
    audited
}

/// Two slow 30 000-byte bodies hold most of a 64 KiB budget: a third is
/// refused at once with 503 `overloaded`; the two end with 408; then the
/// budget is whole again (a 60 000-byte body is read, not refused).
async fn budget(env: &Env, l: Listener) -> Vec<(String, &'static str)> {
    let mut audited = Vec::new();
    let started = Instant::now();
    let mut slow = Vec::new();
    for _ in 0..2 {
        let io = open(env, l).await;
        let mut first = head(l, 30_000);
        first.extend_from_slice(&[b' '; 1000]);
        slow.push(tokio::spawn(exchange(io, first, None)));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut first = head(l, 30_000);
    first.extend_from_slice(&[b' '; 1000]);
    let a = exchange(open(env, l).await, first, None).await;
    let id = a.refusal(503, "overloaded");
    assert!(a.elapsed < TIMEOUT, "{l:?} overloaded took {:?}", a.elapsed);
    audited.push((id, "overloaded"));
    for h in slow {
        let a = h.await.unwrap();
        let id = a.refusal(408, "request_timeout");
        audited.push((id, "request_timeout"));
    }
    assert!(
        started.elapsed() <= WITHIN + Duration::from_millis(500),
        "{l:?} budget scenario took {:?}",
        started.elapsed()
    );
    let mut first = head(l, 60_000);
    first.extend_from_slice(&vec![b'x'; 60_000]);
    let a = exchange(open(env, l).await, first, None).await;
    // Read and judged: bad JSON for the consent API, no signature for Twilio's
    // webhook, unreadable for Meta.
    let expected = match l {
        Listener::Admin => 400,
        Listener::Webhooks => 401,
        _ => 422,
    };
    assert_eq!(a.status, expected, "the budget was given back: {a:?}");
    audited
}

fn stop(mut p: Proxy) -> PathBuf {
    let pid = p.child.id().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    let _ = p.child.wait();
    p.dir.join("audit")
}

/// Every (request id, reason) has a `blocked` decision record.
fn assert_audited(audit: &Path, expected: &[(String, &'static str)]) {
    let mut records = Vec::new();
    for f in std::fs::read_dir(audit).unwrap().flatten() {
        if f.path().extension().is_some_and(|e| e == "jsonl") {
            for line in std::fs::read_to_string(f.path()).unwrap().lines() {
                if let Ok(v) = serde_json::from_str::<Value>(line) {
                    records.push(v);
                }
            }
        }
    }
    assert!(!records.is_empty(), "audit records in {}", audit.display());
    for (id, reason) in expected {
        assert!(
            records.iter().any(|r| r["request_id"] == id.as_str()
                && r["reason"] == *reason
                && r["decision"] == "blocked"),
            "request {id} audited as blocked / {reason}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_listener_bounds_slow_and_oversized_clients() {
    let env = start("limits", "").await;
    let listeners = [
        Listener::Plain,
        Listener::Connect,
        Listener::Gateway,
        Listener::Admin,
        Listener::Webhooks,
    ];
    let mut audited = Vec::new();
    let runs = listeners.iter().map(|l| four_limits(&env, *l));
    for ids in futures_join_all(runs).await {
        audited.extend(ids);
    }
    // One budget for the whole process: one listener at a time.
    for l in listeners {
        audited.extend(budget(&env, l).await);
    }
    assert_eq!(
        env.up.count(),
        0,
        "the upstream received {:?}",
        env.up.requests()
    );
    let audit = stop(env.p);
    assert_audited(&audit, &audited);
}

/// Run futures concurrently (no `futures` crate in the dev-dependencies).
async fn futures_join_all<F: std::future::Future>(fs: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut set = Vec::new();
    for f in fs {
        set.push(Box::pin(f));
    }
    let mut out: Vec<Option<F::Output>> = set.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut done = true;
        for (i, f) in set.iter_mut().enumerate() {
            if out[i].is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => out[i] = Some(v),
                    std::task::Poll::Pending => done = false,
                }
            }
        }
        if done {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    out.into_iter().map(|o| o.unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn h2c_bounds_a_slow_body_and_a_big_header_list() {
    use http_body_util::BodyExt;
    let env = start("limits-h2", "").await;
    let tcp = tokio::net::TcpStream::connect(env.p.proxy).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(conn);

    // A body that starts and never ends.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(bytes::Bytes::from_static(b"{\"data\":["))
        .await
        .unwrap();
    let body = ChanBody(rx);
    let req = hyper::Request::post(format!("http://graph.facebook.com{META_PATH}"))
        .header("content-type", "application/json")
        .body(body)
        .unwrap();
    let started = Instant::now();
    let resp = sender.send_request(req).await.unwrap();
    let elapsed = started.elapsed();
    assert_eq!(resp.status(), 408);
    assert!(elapsed <= WITHIN, "h2 slow body took {elapsed:?}");
    let j: Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(j["error"], "request_timeout");
    drop(tx);

    // A 10 KB header: over the 8 KiB limit, under what HTTP/2 itself refuses.
    let req = hyper::Request::get(format!("http://graph.facebook.com{}", "/v19.0/me"))
        .header("x-big", "a".repeat(10_000))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let (mut sender2, conn2) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tokio::net::TcpStream::connect(env.p.proxy).await.unwrap()),
    )
    .await
    .unwrap();
    tokio::spawn(conn2);
    let resp = sender2.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 431);
    assert_eq!(
        resp.headers().get("x-consentgate-decision").unwrap(),
        "blocked"
    );
    let j: Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(j["error"], "headers_too_large");
    assert_eq!(env.up.count(), 0, "{:?}", env.up.requests());
}

/// A request body fed from a channel: it ends only when the sender is dropped.
struct ChanBody(tokio::sync::mpsc::Receiver<bytes::Bytes>);

impl hyper::body::Body for ChanBody {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;
    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, Self::Error>>> {
        self.get_mut()
            .0
            .poll_recv(cx)
            .map(|o| o.map(|b| Ok(hyper::body::Frame::data(b))))
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn duplicate_host_is_400_and_the_absolute_form_wins() {
    let env = start("limits-host", "").await;
    let req = "GET /v19.0/me HTTP/1.1\r\nHost: graph.facebook.com\r\nHost: unknown.example\r\n\r\n";
    let io: Box<dyn Io> = Box::new(tokio::net::TcpStream::connect(env.p.proxy).await.unwrap());
    let a = exchange(io, req.as_bytes().to_vec(), None).await;
    let dup = a.refusal(400, "bad_request");
    assert!(
        a.json()["detail"].as_str().unwrap().contains("Host"),
        "{a:?}"
    );
    assert_eq!(env.up.count(), 0);

    // RFC 9112 §3.2.2: the absolute-form target decides, the Host header does not.
    let req = "GET http://graph.facebook.com/v19.0/me HTTP/1.1\r\nHost: unknown.example\r\n\r\n";
    let io: Box<dyn Io> = Box::new(tokio::net::TcpStream::connect(env.p.proxy).await.unwrap());
    let a = exchange(io, req.as_bytes().to_vec(), None).await;
    assert_eq!(a.status, 200, "{a:?}");
    let got = env.up.last();
    assert_eq!(got.sni.as_deref(), Some("graph.facebook.com"));
    assert_eq!(got.header("host"), Some("graph.facebook.com"));
    let audit = stop(env.p);
    assert_audited(&audit, &[(dup, "bad_request")]);
}

/// A streamed body (a destination in `mode: passthrough` is not inspected, so
/// its body is not held) that stalls is cut at the body timeout too: the
/// connection is not held, and the app is told the request failed.
#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_streamed_body_is_cut_at_the_body_timeout() {
    let env = start(
        "limits-stream",
        "destinations:\n  - {name: meta_capi, mode: passthrough}\n",
    )
    .await;
    let io: Box<dyn Io> = Box::new(tokio::net::TcpStream::connect(env.p.proxy).await.unwrap());
    let mut first = head(Listener::Plain, 200);
    first.extend_from_slice(b"{\"data\":[");
    let a = exchange(io, first, None).await;
    assert!(a.elapsed <= WITHIN, "took {:?}", a.elapsed);
    assert_eq!(a.status, 502, "{a:?}");
    // Whatever reached the upstream is an incomplete body it cannot act on.
    for r in env.up.requests() {
        assert!(r.body.len() < 200, "{r:?}");
    }
}
