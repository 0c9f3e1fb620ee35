//! Benchmark upstream: a fast local TLS server standing in for the vendors.
//!
//! Answers every request with 200 `{"events_received":N}` (N = number of
//! `"event_name"` keys in the body, so Meta CAPI batches get Meta's answer) as
//! soon as the body is read. HTTP/1.1 and h2 by ALPN on the TLS port; an
//! optional plain-HTTP port serves the same thing (the "direct-plain" baseline).
//!
//! On start it writes, into `--dir`, a CA (`upstream-ca.pem`) and uses a leaf
//! signed by it for every vendor host consentgate knows, then prints one line
//! `READY tls=ADDR plain=ADDR` on stdout.
//!
//! ```sh
//! cargo run --release --features bench-kit --bin bench_kit -- upstream --dir /tmp/x --tls 127.0.0.1:0 --plain 127.0.0.1:0
//! ```

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;

/// Every vendor host the benchmark may send to (the leaf certificate names them all).
const HOSTS: &[&str] = &[
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
    "localhost",
];

struct Args {
    dir: PathBuf,
    tls: String,
    plain: Option<String>,
    threads: usize,
}

fn args() -> Args {
    let mut a = Args {
        dir: PathBuf::from("."),
        tls: "127.0.0.1:0".into(),
        plain: None,
        threads: 2,
    };
    let mut it = std::env::args().skip(2);
    while let Some(k) = it.next() {
        let mut v = || it.next().unwrap_or_else(|| panic!("{k} needs a value"));
        match k.as_str() {
            "--dir" => a.dir = PathBuf::from(v()),
            "--tls" => a.tls = v(),
            "--plain" => a.plain = Some(v()),
            "--threads" => a.threads = v().parse().expect("--threads N"),
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

fn server_config(dir: &std::path::Path) -> Arc<rustls::ServerConfig> {
    std::fs::create_dir_all(dir).expect("create --dir");
    let ca_key = rcgen::KeyPair::generate().expect("CA key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "consentgate bench upstream CA");
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let ca_cert = ca_params.self_signed(&ca_key).expect("CA cert");
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf_key = rcgen::KeyPair::generate().expect("leaf key");
    let mut names: Vec<String> = HOSTS.iter().map(|h| h.to_string()).collect();
    names.push("127.0.0.1".into());
    let leaf = rcgen::CertificateParams::new(names)
        .expect("leaf params")
        .signed_by(&leaf_key, &issuer)
        .expect("leaf cert");
    std::fs::write(dir.join("upstream-ca.pem"), ca_cert.pem()).expect("write CA");
    let chain = vec![leaf.der().clone(), ca_cert.der().clone()];
    let key = rustls::pki_types::PrivateKeyDer::try_from(leaf_key.serialize_der()).expect("key");
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .expect("server config");
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Arc::new(cfg)
}

fn count_events(body: &[u8]) -> usize {
    const NEEDLE: &[u8] = b"\"event_name\"";
    body.windows(NEEDLE.len()).filter(|w| *w == NEEDLE).count()
}

async fn answer(req: hyper::Request<Incoming>) -> Result<hyper::Response<Full<Bytes>>, Infallible> {
    let body = req
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let text = format!("{{\"events_received\":{}}}", count_events(&body));
    let mut r = hyper::Response::new(Full::new(Bytes::from(text)));
    r.headers_mut()
        .insert("content-type", "application/json".parse().expect("header"));
    Ok(r)
}

fn serve<IO>(io: IO)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
            .serve_connection(TokioIo::new(io), hyper::service::service_fn(answer))
            .await;
    });
}

pub(crate) fn main() {
    let a = args();
    let cfg = server_config(&a.dir);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(a.threads.max(1))
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let tls = tokio::net::TcpListener::bind(&a.tls)
            .await
            .expect("bind --tls");
        let tls_addr = tls.local_addr().expect("addr");
        let plain = match &a.plain {
            Some(p) => Some(
                tokio::net::TcpListener::bind(p)
                    .await
                    .expect("bind --plain"),
            ),
            None => None,
        };
        let plain_addr = plain
            .as_ref()
            .map(|l| l.local_addr().expect("addr").to_string())
            .unwrap_or_else(|| "-".into());
        let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = tls.accept().await else {
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    if let Ok(s) = acceptor.accept(tcp).await {
                        serve(s);
                    }
                });
            }
        });
        if let Some(plain) = plain {
            tokio::spawn(async move {
                loop {
                    let Ok((tcp, _)) = plain.accept().await else {
                        continue;
                    };
                    let _ = tcp.set_nodelay(true);
                    serve(tcp);
                }
            });
        }
        println!("READY tls={tls_addr} plain={plain_addr}");
        use std::io::Write as _;
        let _ = std::io::stdout().flush();
        std::future::pending::<()>().await;
    });
}
