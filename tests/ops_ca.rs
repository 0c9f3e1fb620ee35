//! Issue 20 item 9 with a real client: curl (OpenSSL) trusting a CA made by
//! `consentgate ca init` accepts a leaf it signed for a permitted host, and
//! refuses one it signed for any other host (the name constraints), even though
//! the CA's own key signed both.

mod common;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

/// A TLS server on loopback presenting `leaf` (signed by the CA at `dir`) for one connection.
async fn serve_leaf(dir: &Path, host: &str) -> u16 {
    let ca_pem = std::fs::read_to_string(dir.join("ca.pem")).unwrap();
    let key_pem = std::fs::read_to_string(dir.join("ca-key.pem")).unwrap();
    let ca_key = rcgen::KeyPair::from_pem(&key_pem).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec![host.to_string()])
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    let key = rustls::pki_types::PrivateKeyDer::try_from(leaf_key.serialize_der()).unwrap();
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![leaf.der().clone()], key)
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            if let Ok(mut tls) = acceptor.accept(tcp).await {
                use tokio::io::AsyncWriteExt;
                let _ = tls
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                    )
                    .await;
                let _ = tls.shutdown().await;
            }
        }
    });
    port
}

fn curl(ca: &Path, host: &str, port: u16) -> (bool, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "--cacert"])
        .arg(ca)
        .arg("--resolve")
        .arg(format!("{host}:{port}:127.0.0.1"))
        .arg(format!("https://{host}:{port}/"))
        .output()
        .expect("curl is installed (scripts/test needs it)");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn curl_accepts_permitted_hosts_and_refuses_the_rest() {
    common::install_crypto();
    let dir = common::test_dir("ca-constraints");
    let out = Command::new(env!("CARGO_BIN_EXE_consentgate"))
        .args(["ca", "init", "--out"])
        .arg(&dir)
        .args(["--permit", "api.example-crm.test"])
        .current_dir(&dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ca = dir.join("ca.pem");
    for host in [
        "graph.facebook.com",
        "us21.api.mailchimp.com",
        "api.example-crm.test",
    ] {
        let port = serve_leaf(&dir, host).await;
        let (ok, text) = tokio::task::spawn_blocking({
            let (ca, host) = (ca.clone(), host.to_string());
            move || curl(&ca, &host, port)
        })
        .await
        .unwrap();
        assert!(ok && text == "ok", "{host}: {text}");
    }
    for host in [
        "www.example.com",
        "login.microsoftonline.com",
        "facebook.com",
    ] {
        let port = serve_leaf(&dir, host).await;
        let (ok, text) = tokio::task::spawn_blocking({
            let (ca, host) = (ca.clone(), host.to_string());
            move || curl(&ca, &host, port)
        })
        .await
        .unwrap();
        assert!(
            !ok,
            "{host}: curl accepted a leaf outside the name constraints"
        );
        assert!(
            text.contains("subtree") || text.contains("name constraint"),
            "{host}: {text}"
        );
    }
    // The unconstrained CA (`--no-name-constraints`) is accepted for any host.
    let free = dir.join("free");
    let out = Command::new(env!("CARGO_BIN_EXE_consentgate"))
        .args(["ca", "init", "--no-name-constraints", "--out"])
        .arg(&free)
        .current_dir(&dir)
        .output()
        .unwrap();
    assert!(out.status.success());
    let port = serve_leaf(&free, "www.example.com").await;
    let ca = free.join("ca.pem");
    let (ok, text) = tokio::task::spawn_blocking(move || curl(&ca, "www.example.com", port))
        .await
        .unwrap();
    assert!(ok, "{text}");
}
