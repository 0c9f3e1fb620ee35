//! Issue 5 acceptance: TLS interception over CONNECT and the SNI gateway, with
//! real clients (curl and a rustls/hyper client).

mod common;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const DENIED: &[&str] = &[
    "deny.me@example.com",
    "+14155550102",
    "unknown.person@example.com",
    "+15555550199",
];

async fn setup(name: &str, opts: ProxyOpts) -> (Proxy, Upstream) {
    let dir = test_dir(name);
    let ca = test_ca(&dir.join("upstream"), VENDOR_HOSTS);
    let up = start_upstream(&ca).await;
    let p = start_proxy(&dir, &up, &ca, opts);
    (p, up)
}

fn proxy_ca(p: &Proxy) -> std::path::PathBuf {
    p.dir.join("certs/ca.pem")
}

fn mixed_batch() -> Vec<u8> {
    let ev = |email: &str, id: &str| {
        json!({"event_name": "Lead", "event_time": 1763600000, "event_id": id, "action_source": "website",
               "event_source_url": "https://hospital.example/cardiology?x=1",
               "user_data": {"em": [email], "client_ip_address": "203.0.113.9"},
               "custom_data": {"content_name": "Heart failure clinic"}})
    };
    serde_json::to_vec(&json!({"data": [
        ev("jane.roe@example.com", "g"), ev("deny.me@example.com", "d"), ev("unknown.person@example.com", "u"),
        ev("opt.out@example.com", "s"), ev("limited@example.com", "l")
    ]}))
    .unwrap()
}

fn check_mixed(v: &Value) {
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["g", "s", "l"]);
    let s = &v["data"][1];
    assert_eq!(s["data_processing_options"], json!(["LDU"]));
    assert_eq!(s["data_processing_options_state"], 1000);
    assert!(s["user_data"].get("em").is_none());
    assert_eq!(
        v["data"][2]["event_source_url"],
        "https://hospital.example/"
    );
}

fn curl(args: &[&str], body: &Path) -> String {
    let out = Command::new("curl")
        .args([
            "-s",
            "-i",
            "--max-time",
            "15",
            "-H",
            "Content-Type: application/json",
            "--data-binary",
        ])
        .arg(format!("@{}", body.display()))
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn curl_over_connect_is_enforced_like_plain_on_h1_and_h2() {
    let (p, up) = setup("curl-connect", ProxyOpts::default()).await;
    let body = p.dir.join("batch.json");
    std::fs::write(&body, mixed_batch()).unwrap();
    for version in ["--http1.1", "--http2"] {
        let args = [
            version,
            "--proxy",
            &format!("http://{}", p.proxy),
            "--cacert",
            &proxy_ca(&p).display().to_string(),
            "https://graph.facebook.com/v19.0/1234567890/events",
        ];
        let text = tokio::task::spawn_blocking({
            let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
            let body = body.clone();
            move || curl(&args.iter().map(|s| s.as_str()).collect::<Vec<_>>(), &body)
        })
        .await
        .unwrap();
        let expect_line = if version == "--http2" {
            "HTTP/2 200"
        } else {
            "HTTP/1.1 200"
        };
        assert!(text.contains(expect_line), "{version}: {text}");
        assert!(
            text.contains("x-consentgate-decision: modified"),
            "{version}: {text}"
        );
        let got = up.last();
        assert_eq!(got.path_and_query, "/v19.0/1234567890/events");
        assert_eq!(got.sni.as_deref(), Some("graph.facebook.com"));
        assert_absent(&got.body, DENIED, "intercepted upstream bytes");
        check_mixed(&got.json());
    }
}

/// CONNECT through the proxy and complete TLS trusting only the proxy's CA.
async fn connect_tls(
    proxy: SocketAddr,
    host: &str,
    ca_pem: &Path,
    alpn: &[&[u8]],
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
    let mut tcp = tokio::net::TcpStream::connect(proxy)
        .await
        .map_err(|e| e.to_string())?;
    tcp.write_all(format!("CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n\r\n").as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tcp.read(&mut b).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("proxy closed".into());
        }
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head).to_string();
    if !head.starts_with("HTTP/1.1 200") {
        return Err(head);
    }
    tls_client(tcp, host, ca_pem, alpn).await
}

async fn tls_client(
    tcp: tokio::net::TcpStream,
    host: &str,
    ca_pem: &Path,
    alpn: &[&[u8]],
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(ca_pem).unwrap();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
        roots.add(c.unwrap()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    let name = rustls::pki_types::ServerName::try_from(host.to_string()).unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())
}

async fn post_over<IO>(
    io: IO,
    h2: bool,
    host: &str,
    path: &str,
    body: Vec<u8>,
    extra: &[(&str, &str)],
) -> Resp
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let mut b = hyper::Request::builder()
        .method("POST")
        .header("content-type", "application/json");
    for (k, v) in extra {
        b = b.header(*k, *v);
    }
    let resp = if h2 {
        let req = b
            .uri(format!("https://{host}{path}"))
            .body(Full::new(bytes::Bytes::from(body)))
            .unwrap();
        let (mut s, c) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
                .await
                .unwrap();
        tokio::spawn(c);
        s.send_request(req).await.unwrap()
    } else {
        let req = b
            .uri(path)
            .header("host", host)
            .body(Full::new(bytes::Bytes::from(body)))
            .unwrap();
        let (mut s, c) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .unwrap();
        tokio::spawn(c);
        s.send_request(req).await.unwrap()
    };
    let (parts, body) = resp.into_parts();
    Resp {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes().to_vec(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn rustls_client_over_connect_h2_gpc_and_leaf_checks() {
    let (p, up) = setup("rustls-connect", ProxyOpts::default()).await;
    let tls = connect_tls(p.proxy, "graph.facebook.com", &proxy_ca(&p), &[b"h2"])
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    // The minted leaf: names the host, is signed by the CA, has its own key.
    let certs = tls.get_ref().1.peer_certificates().unwrap().to_vec();
    let (_, leaf) = x509_parser::parse_x509_certificate(certs[0].as_ref()).unwrap();
    let ca_pem = std::fs::read(proxy_ca(&p)).unwrap();
    let ca_der = rustls::pki_types::CertificateDer::pem_slice_iter(&ca_pem)
        .next()
        .unwrap()
        .unwrap();
    let (_, ca) = x509_parser::parse_x509_certificate(ca_der.as_ref()).unwrap();
    assert_ne!(
        leaf.public_key().raw,
        ca.public_key().raw,
        "leaf key differs from the CA key"
    );
    assert!(
        leaf.verify_signature(Some(ca.public_key())).is_ok(),
        "leaf verifies against the CA"
    );
    let san = leaf.subject_alternative_name().unwrap().unwrap();
    assert!(format!("{:?}", san.value).contains("graph.facebook.com"));
    assert!(!leaf.is_ca());

    let body = serde_json::to_vec(
        &json!({"data": [{"event_name": "Lead", "event_time": 1763600000, "event_id": "a",
        "action_source": "website", "user_data": {"em": ["jane.roe@example.com"]}}]}),
    )
    .unwrap();
    let r = post_over(
        tls,
        true,
        "graph.facebook.com",
        "/v19.0/1/events",
        body,
        &[("sec-gpc", "1")],
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.decision(), "modified");
    let v = up.last().json();
    assert_eq!(v["data"][0]["data_processing_options"], json!(["LDU"]));
    assert!(v["data"][0]["user_data"].get("em").is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn hundred_concurrent_connects_mint_one_certificate() {
    let (p, _up) = setup("mint-once", ProxyOpts::default()).await;
    let ca = proxy_ca(&p);
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let ca = ca.clone();
        let proxy = p.proxy;
        tasks.push(tokio::spawn(async move {
            connect_tls(proxy, "api.pinterest.com", &ca, &[b"http/1.1"])
                .await
                .map(|_| ())
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let m = String::from_utf8(admin_get(&p, "/metrics").await.body).unwrap();
    assert!(
        m.contains("consentgate_tls_certificates_minted_total 1\n"),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn untrusted_or_wrong_name_upstream_certificates_are_502() {
    // Upstream whose certificate names only graph.facebook.com.
    let dir = test_dir("bad-upstream");
    let ca = test_ca(&dir.join("upstream"), &["graph.facebook.com"]);
    let up = start_upstream(&ca).await;
    let p = start_proxy(&dir, &up, &ca, ProxyOpts::default());
    let r = send(p.proxy, Req::get("api.pinterest.com", "/v5/user_account")).await;
    assert_eq!(r.status, 502, "wrong name");
    assert_eq!(r.contract()["error"], "upstream_unavailable");
    assert!(
        r.contract()["detail"].as_str().unwrap().starts_with("tls"),
        "{:?}",
        r.json()
    );
    drop(p);

    // Same upstream, but its CA is not trusted (no extra_ca): untrusted issuer.
    let dir2 = test_dir("untrusted-upstream");
    let other = test_ca(&dir2.join("other"), &["graph.facebook.com"]);
    let p = start_proxy(&dir2, &up, &other, ProxyOpts::default());
    let r = send(p.proxy, Req::get("graph.facebook.com", "/v19.0/me")).await;
    assert_eq!(r.status, 502);
    assert!(
        r.contract()["detail"].as_str().unwrap().contains("tls"),
        "{:?}",
        r.json()
    );
    assert_eq!(up.count(), 0, "nothing reached the untrusted upstream");
    let m = String::from_utf8(admin_get(&p, "/metrics").await.body).unwrap();
    assert!(
        m.contains(r#"consentgate_upstream_errors_total{destination="meta_capi",kind="tls"} 1"#),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_hosts_denied_or_tunneled_blind() {
    let (p, _up) = setup("connect-deny", ProxyOpts::default()).await;
    let e = connect_tls(p.proxy, "unknown.example", &proxy_ca(&p), &[b"http/1.1"])
        .await
        .unwrap_err();
    assert!(e.starts_with("HTTP/1.1 403"), "{e}");
    assert!(e.contains("x-consentgate-decision: blocked"), "{e}");
    drop(p);

    // Tunnel mode: a plain TCP echo server stands in for the unknown host.
    let echo = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let echo_addr = echo.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = echo.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let opts = ProxyOpts {
        unknown_destinations: "tunnel",
        resolve_override: vec![("unknown.example", echo_addr)],
        ..Default::default()
    };
    let (p, _up) = setup("connect-tunnel", opts).await;
    let mut tcp = tokio::net::TcpStream::connect(p.proxy).await.unwrap();
    tcp.write_all(b"CONNECT unknown.example:443 HTTP/1.1\r\nHost: unknown.example:443\r\n\r\n")
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        tcp.read_exact(&mut b).await.unwrap();
        head.push(b[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    let payload: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    tcp.write_all(&payload).await.unwrap();
    let mut back = vec![0u8; payload.len()];
    tcp.read_exact(&mut back).await.unwrap();
    assert_eq!(back, payload, "bytes pass unchanged both ways");
    let m = String::from_utf8(admin_get(&p, "/metrics").await.body).unwrap();
    assert!(m.contains("consentgate_tunnels_total 1"), "{m}");
}

#[tokio::test(flavor = "multi_thread")]
async fn gateway_listener_enforces_by_sni() {
    let gw = free_port();
    let opts = ProxyOpts {
        extra_yaml: String::new(),
        ..Default::default()
    };
    let dir = test_dir("gateway");
    let ca = test_ca(&dir.join("upstream"), VENDOR_HOSTS);
    let up = start_upstream(&ca).await;
    let (pp, ap) = (free_port(), free_port());
    let cfg = config_yaml(&dir, up.addr, &ca, &opts, pp, ap).replace(
        &format!("  admin: 127.0.0.1:{ap}\n"),
        &format!("  admin: 127.0.0.1:{ap}\n  gateway: 127.0.0.1:{gw}\n"),
    );
    let config = dir.join("consentgate.yaml");
    std::fs::write(&config, cfg).unwrap();
    let p = spawn_proxy(&dir, &config, pp, ap);
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", gw))
        .await
        .unwrap();
    let tls = tls_client(tcp, "graph.facebook.com", &proxy_ca(&p), &[b"http/1.1"])
        .await
        .unwrap();
    let r = post_over(
        tls,
        false,
        "graph.facebook.com",
        "/v19.0/1/events",
        mixed_batch(),
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.decision(), "modified");
    let got = up.last();
    assert_absent(&got.body, DENIED, "gateway upstream bytes");
    check_mixed(&got.json());
}
