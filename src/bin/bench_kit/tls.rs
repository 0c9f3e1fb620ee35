//! P5: intercepted-TLS cost, using the library directly.
//!
//! - First mint: `CertMinter::certified_key` for hosts never seen before.
//! - Handshakes over loopback TCP, full (client resumption disabled), TLS 1.3,
//!   ALPN h2/http1.1, against (a) `CertMinter::accept` with the host already
//!   cached and (b) a static `rustls::ServerConfig` holding one certificate of
//!   the same kind (an ECDSA P-256 leaf minted by the same minter, chain
//!   [leaf, CA], same provider, ALPN and session store size). Iterations
//!   alternate between the two so machine noise hits both alike.
//!   Client-side time = TCP connect + handshake + reading one byte the server
//!   writes once its side is done; server-side time = accept → handshake done.
//!
//! Prints one JSON line. `--iters N` (default 2000), `--mints M` (default 200).

use consentgate::{init_ca, load_ca, CaOptions, CertMinter};
use hdrhistogram::Histogram;
use rustls::server::ServerSessionMemoryCache;
use rustls::sign::SingleCertAndKey;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

const HOST: &str = "graph.facebook.com";

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("histogram")
}

fn us(ns: u64) -> f64 {
    (ns as f64 / 10.0).round() / 100.0
}

fn arg(name: &str, default: usize) -> usize {
    let mut it = std::env::args().skip(2);
    while let Some(k) = it.next() {
        if k == name {
            return it
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{name} N"));
        }
    }
    default
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn client_config(ca: &rustls::pki_types::CertificateDer<'static>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).expect("root");
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    cfg.resumption = rustls::client::Resumption::disabled();
    Arc::new(cfg)
}

/// Serve handshakes forever; report server-side handshake durations.
async fn serve_static(
    l: TcpListener,
    cfg: Arc<rustls::ServerConfig>,
    tx: mpsc::UnboundedSender<u64>,
) {
    let acc = tokio_rustls::TlsAcceptor::from(cfg);
    loop {
        let Ok((tcp, _)) = l.accept().await else {
            continue;
        };
        let t = Instant::now();
        let acc = acc.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            if let Ok(mut s) = acc.accept(tcp).await {
                let _ = tx.send(t.elapsed().as_nanos() as u64);
                let _ = s.write_all(b"x").await;
                let _ = s.shutdown().await;
            }
        });
    }
}

async fn serve_minted(l: TcpListener, m: Arc<CertMinter>, tx: mpsc::UnboundedSender<u64>) {
    loop {
        let Ok((tcp, _)) = l.accept().await else {
            continue;
        };
        let t = Instant::now();
        let m = m.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            if let Ok((mut s, _host)) = m.accept(tcp, Some(HOST)).await {
                let _ = tx.send(t.elapsed().as_nanos() as u64);
                let _ = s.write_all(b"x").await;
                let _ = s.shutdown().await;
            }
        });
    }
}

async fn handshake(
    addr: std::net::SocketAddr,
    conn: &tokio_rustls::TlsConnector,
    host: &str,
) -> Duration {
    let t = Instant::now();
    let tcp = TcpStream::connect(addr).await.expect("connect");
    tcp.set_nodelay(true).expect("nodelay");
    let name = rustls::pki_types::ServerName::try_from(host.to_string()).expect("name");
    let mut s = conn.connect(name, tcp).await.expect("handshake");
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await.expect("server byte");
    t.elapsed()
}

pub(crate) fn main() {
    let iters = arg("--iters", 2000);
    let mints = arg("--mints", 200).max(1);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let dir = tempfile::tempdir().expect("tempdir");
        // Made-up hosts: a CA without name constraints.
        let files = init_ca(dir.path(), false, &CaOptions::unconstrained()).expect("init_ca");
        let ca = load_ca(&files.cert, &files.key).expect("load_ca");
        let minter = Arc::new(CertMinter::new(ca));

        // First mint, fresh hosts (mint only, then mint inside a handshake).
        let mut mint = hist();
        for i in 0..mints {
            let t = Instant::now();
            minter
                .certified_key(&format!("fresh-{i}.mint.example"))
                .await
                .expect("mint");
            mint.saturating_record(t.elapsed().as_nanos() as u64);
        }

        // Static config: one certificate of the same kind, same CA.
        let ck = minter.certified_key("static.example").await.expect("mint");
        let mut stat = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .expect("versions")
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(SingleCertAndKey::from(ck)));
        stat.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        stat.session_storage = ServerSessionMemoryCache::new(4096);

        let ls = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let lm = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let (sa, ma) = (ls.local_addr().expect("a"), lm.local_addr().expect("a"));
        let (stx, mut srx) = mpsc::unbounded_channel();
        let (mtx, mut mrx) = mpsc::unbounded_channel();
        tokio::spawn(serve_static(ls, Arc::new(stat), stx));
        tokio::spawn(serve_minted(lm, minter.clone(), mtx));
        let conn = tokio_rustls::TlsConnector::from(client_config(minter.ca_cert_der()));

        // First handshake for a fresh host (mint inside accept).
        let mut first_hs = hist();
        for i in 0..mints.min(50) {
            let d = handshake(ma, &conn, &format!("fresh-hs-{i}.mint.example")).await;
            first_hs.saturating_record(d.as_nanos() as u64);
        }

        // Warm up both paths (and cache HOST in the minter).
        for _ in 0..50 {
            handshake(sa, &conn, "static.example").await;
            handshake(ma, &conn, HOST).await;
        }
        while srx.try_recv().is_ok() {}
        while mrx.try_recv().is_ok() {}

        let (mut cs, mut cm) = (hist(), hist());
        for i in 0..iters {
            let order = if i.is_multiple_of(2) {
                [true, false]
            } else {
                [false, true]
            };
            for is_static in order {
                if is_static {
                    let d = handshake(sa, &conn, "static.example").await;
                    cs.saturating_record(d.as_nanos() as u64);
                } else {
                    let d = handshake(ma, &conn, HOST).await;
                    cm.saturating_record(d.as_nanos() as u64);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (mut ss, mut sm) = (hist(), hist());
        while let Ok(v) = srx.try_recv() {
            ss.saturating_record(v);
        }
        while let Ok(v) = mrx.try_recv() {
            sm.saturating_record(v);
        }
        let p = |h: &Histogram<u64>, q: f64| us(h.value_at_quantile(q));
        let ratio = |a: f64, b: f64| (a / b * 1000.0).round() / 1000.0;
        let j = serde_json::json!({
            "iterations": iters,
            "mints": mints,
            "first_mint_p50_ms": p(&mint, 0.5) / 1000.0,
            "first_mint_p99_ms": p(&mint, 0.99) / 1000.0,
            "first_mint_max_ms": us(mint.max()) / 1000.0,
            "first_handshake_with_mint_p50_ms": p(&first_hs, 0.5) / 1000.0,
            "static_client_p50_us": p(&cs, 0.5),
            "static_client_p99_us": p(&cs, 0.99),
            "cached_client_p50_us": p(&cm, 0.5),
            "cached_client_p99_us": p(&cm, 0.99),
            "static_server_p50_us": p(&ss, 0.5),
            "cached_server_p50_us": p(&sm, 0.5),
            "ratio_client_p50": ratio(p(&cm, 0.5), p(&cs, 0.5)),
            "ratio_client_mean": ratio(cm.mean(), cs.mean()),
            "ratio_server_p50": ratio(p(&sm, 0.5), p(&ss, 0.5)),
            "minted_total": minter.minted_total(),
        });
        println!("{j}");
    });
}
