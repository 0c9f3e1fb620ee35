//! Benchmark load generator: HTTP/1.1 keep-alive connections, one request in
//! flight per connection, prints one JSON line of results.
//!
//! Modes:
//! - open loop (`--rate R`): request k is due at `start + k/R`; whichever
//!   connection is free takes the next due request, waits for its time and
//!   sends it. Latency is measured from the request's *intended* send time
//!   (coordinated-omission correction): when the target stalls, the requests
//!   that should have gone out meanwhile count their full wait.
//! - saturation (`--saturate`): every connection sends back to back (closed
//!   loop) for `--duration` seconds; reports the achieved requests per second.
//!
//! Targets (`--target`):
//! - `plain`: plain HTTP to `--addr` with `Host: --host` (nginx, consentgate
//!   reverse proxy, the upstream's plain port).
//! - `tls`: TLS to `--addr` with SNI `--host`, trusting `--ca` (the upstream
//!   directly: "direct").
//! - `connect`: `CONNECT --host:443` to the proxy at `--addr`, then TLS inside
//!   the tunnel trusting `--ca` (consentgate's interception CA).
//!
//! Tokio's timer has 1 ms granularity, so waits for a due time sleep until
//! ~1.2 ms before it and then spin (yield) to the exact instant; the JSON
//! reports how late sends actually went out (`send_lag_*`).

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Target {
    Plain,
    Tls,
    Connect,
}

#[derive(Clone, Debug)]
struct Args {
    label: String,
    target: Target,
    addr: String,
    host: String,
    path: String,
    body: Bytes,
    content_type: String,
    ca: Option<String>,
    conns: usize,
    rate: Option<f64>,
    duration: Duration,
    warmup: Duration,
    expect: u16,
}

fn usage() -> ! {
    eprintln!(
        "bench_load --target plain|tls|connect --addr IP:PORT --host HOST --path PATH \
         [--body FILE] [--content-type CT] [--ca PEM] [--conns N] \
         (--rate RPS | --saturate) [--duration S] [--warmup S] [--expect STATUS] [--label L]"
    );
    std::process::exit(2)
}

fn args() -> Args {
    let mut a = Args {
        label: "load".into(),
        target: Target::Plain,
        addr: String::new(),
        host: "graph.facebook.com".into(),
        path: "/".into(),
        body: Bytes::new(),
        content_type: "application/json".into(),
        ca: None,
        conns: 16,
        rate: None,
        duration: Duration::from_secs(10),
        warmup: Duration::from_secs(1),
        expect: 200,
    };
    let mut saturate = false;
    let mut it = std::env::args().skip(2);
    while let Some(k) = it.next() {
        let mut v = || it.next().unwrap_or_else(|| usage());
        let secs = |s: String| Duration::from_secs_f64(s.parse().unwrap_or_else(|_| usage()));
        match k.as_str() {
            "--label" => a.label = v(),
            "--target" => {
                a.target = match v().as_str() {
                    "plain" => Target::Plain,
                    "tls" => Target::Tls,
                    "connect" => Target::Connect,
                    _ => usage(),
                }
            }
            "--addr" => a.addr = v(),
            "--host" => a.host = v(),
            "--path" => a.path = v(),
            "--body" => a.body = Bytes::from(std::fs::read(v()).expect("read --body")),
            "--content-type" => a.content_type = v(),
            "--ca" => a.ca = Some(v()),
            "--conns" => a.conns = v().parse().unwrap_or_else(|_| usage()),
            "--rate" => a.rate = Some(v().parse().unwrap_or_else(|_| usage())),
            "--saturate" => saturate = true,
            "--duration" => a.duration = secs(v()),
            "--warmup" => a.warmup = secs(v()),
            "--expect" => a.expect = v().parse().unwrap_or_else(|_| usage()),
            _ => usage(),
        }
    }
    if a.addr.is_empty() || (saturate == a.rate.is_some()) || a.conns == 0 {
        usage();
    }
    if a.target != Target::Plain && a.ca.is_none() {
        eprintln!("--target tls/connect needs --ca");
        usage();
    }
    a
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

fn tls_connector(ca: &str) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(ca).expect("read --ca");
    use rustls::pki_types::pem::PemObject;
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
        roots.add(c.expect("PEM certificate")).expect("add root");
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

type Sender = SendRequest<Full<Bytes>>;

async fn connect(a: &Args, tls: Option<&tokio_rustls::TlsConnector>) -> anyhow::Result<Sender> {
    let mut tcp = tokio::net::TcpStream::connect(&a.addr).await?;
    tcp.set_nodelay(true)?;
    let io: Box<dyn Io> = match a.target {
        Target::Plain => Box::new(tcp),
        Target::Tls | Target::Connect => {
            if a.target == Target::Connect {
                let req = format!(
                    "CONNECT {h}:443 HTTP/1.1\r\nHost: {h}:443\r\n\r\n",
                    h = a.host
                );
                tcp.write_all(req.as_bytes()).await?;
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if tcp.read(&mut b).await? == 0 || head.len() > 8192 {
                        anyhow::bail!("CONNECT: connection closed before the response head");
                    }
                    head.push(b[0]);
                }
                if !head.starts_with(b"HTTP/1.1 200") && !head.starts_with(b"HTTP/1.0 200") {
                    anyhow::bail!("CONNECT refused: {}", String::from_utf8_lossy(&head));
                }
            }
            let name = rustls::pki_types::ServerName::try_from(a.host.clone())?;
            let s = tls.expect("TLS connector").connect(name, tcp).await?;
            Box::new(s)
        }
    };
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

fn request(a: &Args) -> hyper::Request<Full<Bytes>> {
    let method = if a.body.is_empty() { "GET" } else { "POST" };
    let mut b = hyper::Request::builder()
        .method(method)
        .uri(a.path.as_str())
        .header("host", a.host.as_str());
    if !a.body.is_empty() {
        b = b.header("content-type", a.content_type.as_str());
    }
    b.body(Full::new(a.body.clone())).expect("request")
}

/// One request; `Ok(true)` when the status is the expected one.
async fn send(s: &mut Sender, a: &Args) -> anyhow::Result<bool> {
    s.ready().await?;
    let resp = s.send_request(request(a)).await?;
    let ok = resp.status().as_u16() == a.expect;
    resp.into_body().collect().await?;
    Ok(ok)
}

/// Wait until `t` precisely: tokio's timer to ~1.2 ms before, then yield-spin.
async fn wait_until(t: Instant) {
    let slack = Duration::from_micros(1200);
    let now = Instant::now();
    if t > now + slack {
        tokio::time::sleep_until((t - slack).into()).await;
    }
    while Instant::now() < t {
        tokio::task::yield_now().await;
    }
}

fn hist() -> Histogram<u64> {
    // Nanoseconds, 1 ns .. 60 s, 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("histogram")
}

#[derive(Default)]
struct Counts {
    /// Every completed request, warm-up included (for CPU per request).
    total: u64,
    ok: u64,
    bad_status: u64,
    errors: u64,
}

struct WorkerOut {
    lat: Histogram<u64>,
    lag: Histogram<u64>,
    counts: Counts,
}

async fn worker(
    a: Arc<Args>,
    tls: Option<Arc<tokio_rustls::TlsConnector>>,
    start: Instant,
    next: Arc<AtomicU64>,
) -> WorkerOut {
    let mut out = WorkerOut {
        lat: hist(),
        lag: hist(),
        counts: Counts::default(),
    };
    let rec_from = start + a.warmup;
    let end = rec_from + a.duration;
    let mut sender: Option<Sender> = None;
    loop {
        // The request's intended send time.
        let intended = match a.rate {
            Some(rate) => {
                let k = next.fetch_add(1, Ordering::Relaxed);
                let t = start + Duration::from_secs_f64(k as f64 / rate);
                if t >= end {
                    break;
                }
                wait_until(t).await;
                t
            }
            None => {
                let t = Instant::now();
                if t >= end {
                    break;
                }
                t
            }
        };
        if sender.is_none() {
            match connect(&a, tls.as_deref()).await {
                Ok(s) => sender = Some(s),
                Err(e) => {
                    eprintln!("{}: connect: {e:#}", a.label);
                    out.counts.errors += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            }
        }
        let s = sender.as_mut().expect("connected");
        let sent = Instant::now();
        let r = send(s, &a).await;
        let done = Instant::now();
        let record = intended >= rec_from;
        match r {
            Ok(ok) => {
                out.counts.total += 1;
                if record {
                    if ok {
                        out.counts.ok += 1;
                    } else {
                        out.counts.bad_status += 1;
                    }
                }
            }
            Err(e) => {
                if record {
                    out.counts.errors += 1;
                }
                if out.counts.errors <= 3 {
                    eprintln!("{}: request: {e:#}", a.label);
                }
                sender = None;
                continue;
            }
        }
        if record {
            out.lat
                .saturating_record(done.duration_since(intended).as_nanos() as u64);
            out.lag
                .saturating_record(sent.duration_since(intended).as_nanos().max(1) as u64);
        }
    }
    out
}

fn ms(ns: u64) -> f64 {
    (ns as f64 / 1e6 * 1000.0).round() / 1000.0
}

pub(crate) fn main() {
    let a = Arc::new(args());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let tls = a.ca.as_deref().map(|c| Arc::new(tls_connector(c)));
    let wall = Instant::now();
    let out = rt.block_on(async {
        // Connections are opened lazily during the warm-up (not recorded).
        let next = Arc::new(AtomicU64::new(0));
        // Start a little in the future so every worker is waiting at t0.
        let start = Instant::now() + Duration::from_millis(50);
        let mut tasks = Vec::new();
        for _ in 0..a.conns {
            tasks.push(tokio::spawn(worker(
                a.clone(),
                tls.clone(),
                start,
                next.clone(),
            )));
        }
        let mut lat = hist();
        let mut lag = hist();
        let mut c = Counts::default();
        for t in tasks {
            let w = t.await.expect("worker");
            lat.add(&w.lat).expect("merge");
            lag.add(&w.lag).expect("merge");
            c.total += w.counts.total;
            c.ok += w.counts.ok;
            c.bad_status += w.counts.bad_status;
            c.errors += w.counts.errors;
        }
        (lat, lag, c)
    });
    let (lat, lag, c) = out;
    let secs = a.duration.as_secs_f64();
    let q = |h: &Histogram<u64>, p: f64| ms(h.value_at_quantile(p));
    let j = serde_json::json!({
        "label": a.label,
        "mode": if a.rate.is_some() { "open" } else { "saturate" },
        "target": format!("{:?}", a.target).to_lowercase(),
        "conns": a.conns,
        "rate_target": a.rate,
        "duration_s": secs,
        "requests": c.ok + c.bad_status,
        "requests_incl_warmup": c.total,
        "ok": c.ok,
        "bad_status": c.bad_status,
        "errors": c.errors,
        "achieved_rps": ((c.ok + c.bad_status) as f64 / secs * 10.0).round() / 10.0,
        "p50_ms": q(&lat, 0.5),
        "p90_ms": q(&lat, 0.9),
        "p99_ms": q(&lat, 0.99),
        "p999_ms": q(&lat, 0.999),
        "max_ms": ms(lat.max()),
        "mean_ms": (lat.mean() / 1e3).round() / 1e3,
        "send_lag_p50_ms": q(&lag, 0.5),
        "send_lag_p99_ms": q(&lag, 0.99),
        "wall_s": (wall.elapsed().as_secs_f64() * 100.0).round() / 100.0,
    });
    println!("{j}");
    if c.ok == 0 {
        std::process::exit(1);
    }
}
