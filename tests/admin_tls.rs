//! Issue 14 acceptance 8 and issue 20's separate probe port: the admin API
//! over TLS (`admin.tls`), mutual TLS with `client_ca`, config errors naming
//! the key, and `listen.metrics` serving /metrics, /healthz and /readyz apart
//! from the consent write API. The real binary, real sockets.

mod common;

use common::*;
use http_body_util::{BodyExt, Empty};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TOKEN: &str = "example-ops-token";

/// A CA, and leaves signed by it, written as PEM files.
struct Pki {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
    rogue_cert: PathBuf,
    rogue_key: PathBuf,
}

fn new_ca(name: &str) -> (rcgen::Certificate, rcgen::Issuer<'static, rcgen::KeyPair>) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.distinguished_name.push(rcgen::DnType::CommonName, name);
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let cert = p.self_signed(&key).unwrap();
    (cert, rcgen::Issuer::new(p, key))
}

fn leaf(
    issuer: &rcgen::Issuer<'static, rcgen::KeyPair>,
    names: &[&str],
    usage: rcgen::ExtendedKeyUsagePurpose,
    dir: &Path,
    stem: &str,
) -> (PathBuf, PathBuf) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p =
        rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap();
    p.distinguished_name.push(rcgen::DnType::CommonName, stem);
    p.extended_key_usages = vec![usage];
    let cert = p.signed_by(&key, issuer).unwrap();
    let (c, k) = (
        dir.join(format!("{stem}.pem")),
        dir.join(format!("{stem}-key.pem")),
    );
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (c, k)
}

fn pki(dir: &Path) -> Pki {
    install_crypto();
    let dir = dir.join("admin-pki");
    std::fs::create_dir_all(&dir).unwrap();
    let (ca_cert, issuer) = new_ca("admin test CA");
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, ca_cert.pem()).unwrap();
    let server = rcgen::ExtendedKeyUsagePurpose::ServerAuth;
    let client = rcgen::ExtendedKeyUsagePurpose::ClientAuth;
    let (server_cert, server_key) = leaf(&issuer, &["localhost"], server, &dir, "server");
    let (client_cert, client_key) = leaf(
        &issuer,
        &["preference-center"],
        client.clone(),
        &dir,
        "client",
    );
    let (_, rogue_issuer) = new_ca("someone else's CA");
    let (rogue_cert, rogue_key) = leaf(&rogue_issuer, &["intruder"], client, &dir, "rogue");
    Pki {
        ca,
        server_cert,
        server_key,
        client_cert,
        client_key,
        rogue_cert,
        rogue_key,
    }
}

struct AdminEnv {
    p: Proxy,
    admin: SocketAddr,
    metrics: SocketAddr,
    _up: Upstream,
}

/// Start the proxy with `admin_tls` (YAML lines under `admin:`) and a metrics
/// port; readiness is polled on the metrics port (the admin port speaks TLS).
async fn start(name: &str, admin_tls: &str) -> (AdminEnv, PathBuf) {
    let dir = test_dir(name);
    let ca = test_ca(&dir.join("upstream"), VENDOR_HOSTS);
    let up = start_upstream(&ca).await;
    let (pp, ap, mp) = (free_port(), free_port(), free_port());
    let cfg = config_yaml(&dir, up.addr, &ca, &ProxyOpts::default(), pp, ap)
        .replace(
            &format!("  admin: 127.0.0.1:{ap}\n"),
            &format!("  admin: 127.0.0.1:{ap}\n  metrics: 127.0.0.1:{mp}\n"),
        )
        .replace(
            "admin:\n  tokens_file:",
            &format!("admin:\n{admin_tls}  tokens_file:"),
        );
    let config = dir.join("consentgate.yaml");
    std::fs::write(&config, cfg).unwrap();
    let p = spawn_proxy(&dir, &config, pp, mp);
    let env = AdminEnv {
        metrics: p.admin,
        admin: SocketAddr::from(([127, 0, 0, 1], ap)),
        p,
        _up: up,
    };
    (env, dir)
}

fn client_config(
    ca: &Path,
    identity: Option<(&Path, &Path)>,
    tls12_only: bool,
) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(ca).unwrap())
        .unwrap();
    let versions: &[&rustls::SupportedProtocolVersion] = if tls12_only {
        &[&rustls::version::TLS12]
    } else {
        &[&rustls::version::TLS13, &rustls::version::TLS12]
    };
    let b = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_protocol_versions(versions)
    .unwrap()
    .with_root_certificates(roots);
    let mut cfg = match identity {
        None => b.with_no_client_auth(),
        Some((cert, key)) => b
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_file(cert).unwrap()],
                PrivateKeyDer::from_pem_file(key).unwrap(),
            )
            .unwrap(),
    };
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(cfg)
}

/// GET `path` over TLS: the status and body, or why there is none.
async fn tls_get(
    addr: SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
    path: &str,
) -> Result<(u16, String, String), String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let version = format!("{:?}", tls.get_ref().1.protocol_version());
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = hyper::Request::get(path)
        .header("host", "localhost")
        .header("authorization", format!("Bearer {TOKEN}"))
        .body(Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("request: {e}"))?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).to_string(), version))
}

fn tls_yaml(pki: &Pki, client_ca: bool) -> String {
    let mut s = format!(
        "  tls:\n    cert: {}\n    key: {}\n",
        pki.server_cert.display(),
        pki.server_key.display()
    );
    if client_ca {
        s.push_str(&format!("    client_ca: {}\n", pki.ca.display()));
    }
    s
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_over_tls_and_probes_on_their_own_port() {
    let dir = test_dir("admin-tls-pki");
    let pki = pki(&dir);
    let (env, _) = start("admin-tls", &tls_yaml(&pki, false)).await;

    // TLS 1.3 by default, 1.2 still accepted; the consent API answers.
    for tls12 in [false, true] {
        let (status, body, version) = tls_get(
            env.admin,
            client_config(&pki.ca, None, tls12),
            "/v1/consent/P-1001",
        )
        .await
        .unwrap();
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("P-1001"), "{body}");
        let want = if tls12 { "TLSv1_2" } else { "TLSv1_3" };
        assert_eq!(version, format!("Some({want})"));
    }

    // Plain HTTP on the TLS port gets no HTTP answer.
    let mut tcp = tokio::net::TcpStream::connect(env.admin).await.unwrap();
    tcp.write_all(b"GET /v1/consent/P-1001 HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), tcp.read_to_end(&mut got))
        .await
        .expect("the server closes");
    assert!(
        !got.starts_with(b"HTTP/"),
        "{:?}",
        String::from_utf8_lossy(&got)
    );

    // Probes and metrics: on listen.metrics, plain HTTP, no token; not on admin.
    for path in ["/metrics", "/healthz", "/readyz"] {
        let r = send(env.metrics, Req::get("probe", path)).await;
        assert_eq!(r.status, 200, "{path}");
    }
    let m = String::from_utf8(send(env.metrics, Req::get("probe", "/metrics")).await.body).unwrap();
    assert!(m.contains("consentgate_consent_records"), "{m}");
    let (status, body, _) = tls_get(env.admin, client_config(&pki.ca, None, false), "/metrics")
        .await
        .unwrap();
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("listen.metrics"), "{body}");
    let r = send(
        env.metrics,
        Req::get("probe", "/v1/consent/P-1001").header("authorization", &format!("Bearer {TOKEN}")),
    )
    .await;
    assert_eq!(r.status, 404, "the write API is not on the metrics port");
    drop(env.p);
}

#[tokio::test(flavor = "multi_thread")]
async fn mutual_tls_refuses_a_client_without_a_certificate_from_client_ca() {
    let dir = test_dir("admin-mtls-pki");
    let pki = pki(&dir);
    let (env, _) = start("admin-mtls", &tls_yaml(&pki, true)).await;
    let path = "/v1/consent/P-1001";

    let none = tls_get(env.admin, client_config(&pki.ca, None, false), path).await;
    assert!(none.is_err(), "no client certificate: {none:?}");
    let rogue = tls_get(
        env.admin,
        client_config(&pki.ca, Some((&pki.rogue_cert, &pki.rogue_key)), false),
        path,
    )
    .await;
    assert!(rogue.is_err(), "certificate from another CA: {rogue:?}");
    let (status, body, _) = tls_get(
        env.admin,
        client_config(&pki.ca, Some((&pki.client_cert, &pki.client_key)), false),
        path,
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");
    let log = std::fs::read_to_string(&env.p.log).unwrap();
    assert!(log.contains("admin TLS handshake failed"), "{log}");
}

#[test]
fn bad_admin_tls_files_are_config_errors_naming_the_key() {
    let dir = test_dir("admin-tls-check");
    let pki = pki(&dir);
    let garbage = dir.join("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").unwrap();
    let base = format!(
        "listen:\n  proxy: 127.0.0.1:{}\n  admin: 127.0.0.1:{}\n\
         interception:\n  ca_cert: {d}/certs/ca.pem\n  ca_key: {d}/certs/ca-key.pem\n\
         consent:\n  file: {c}\n  journal: {d}/journal\naudit:\n  path: {d}/audit\n",
        free_port(),
        free_port(),
        d = dir.display(),
        c = repo().join("config/consent.example.jsonl").display()
    );
    let cases = [
        (
            format!(
                "  tls:\n    cert: {}\n    key: {}\n",
                garbage.display(),
                pki.server_key.display()
            ),
            "admin.tls.cert",
        ),
        (
            format!(
                "  tls:\n    cert: {}\n    key: {}\n",
                pki.server_cert.display(),
                garbage.display()
            ),
            "admin.tls.key",
        ),
        (
            // A key that is not the certificate's.
            format!(
                "  tls:\n    cert: {}\n    key: {}\n",
                pki.server_cert.display(),
                pki.client_key.display()
            ),
            "admin.tls.key",
        ),
        (
            format!(
                "  tls:\n    cert: {}\n    key: {}\n    client_ca: {}\n",
                pki.server_cert.display(),
                pki.server_key.display(),
                garbage.display()
            ),
            "admin.tls.client_ca",
        ),
        (
            format!("  tls:\n    key: {}\n", pki.server_key.display()),
            "admin.tls.cert",
        ),
        (
            format!(
                "  tls:\n    cert: {}/nope.pem\n    key: {}\n",
                dir.display(),
                pki.server_key.display()
            ),
            "admin.tls.cert",
        ),
    ];
    for (i, (tls, key)) in cases.iter().enumerate() {
        let config = dir.join(format!("c{i}.yaml"));
        let tokens = repo().join("config/admin-tokens.example");
        std::fs::write(
            &config,
            format!("{base}admin:\n  tokens_file: {}\n{tls}", tokens.display()),
        )
        .unwrap();
        for cmd in ["check", "run"] {
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_consentgate"))
                .args([cmd, "--config"])
                .arg(&config)
                .current_dir(&dir)
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{cmd} case {i}: {err}");
            assert!(err.contains(key), "{cmd} case {i} names {key}: {err}");
        }
    }
}
