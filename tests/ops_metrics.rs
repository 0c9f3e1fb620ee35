//! Issue 20 item 4: every new metric has a series after one request of the kind
//! it counts, through the running binary: an app that does not trust the CA
//! (`side="client",reason="unknown_ca"`, and a log line naming SNI and peer),
//! a vendor whose certificate the proxy does not trust (`side="upstream"`), a
//! destination host outside the CA's name constraints (a mint failure), answers
//! by status code and error, process_* and build_info; the label sets that
//! exist before any event.

mod common;
use common::*;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// CONNECT host:443 through the proxy, then a TLS handshake trusting `roots`.
async fn connect_tls(
    proxy: SocketAddr,
    host: &str,
    roots: rustls::RootCertStore,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, std::io::Error> {
    let mut tcp = tokio::net::TcpStream::connect(proxy).await?;
    tcp.write_all(format!("CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n\r\n").as_bytes())
        .await?;
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(tcp.read(&mut b).await?, 1, "CONNECT answer cut short");
        head.push(b[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&head)
    );
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
}

fn roots_of(pem: &Path) -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(pem).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    roots
}

/// The value of one series in a scrape (`name{labels}` exactly as rendered).
fn value(scrape: &str, series: &str) -> Option<f64> {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

async fn scrape(p: &Proxy) -> String {
    String::from_utf8(admin_get(p, "/metrics").await.body).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_new_metric_has_a_series_after_one_request_of_its_kind() {
    let dir = test_dir("ops-metrics");
    let ca = test_ca(&dir.join("upstream"), VENDOR_HOSTS);
    let up = start_upstream(&ca).await;
    // A second vendor whose certificate is signed by a CA the proxy does not trust.
    let rogue_ca = test_ca(&dir.join("rogue"), VENDOR_HOSTS);
    let rogue = start_upstream(&rogue_ca).await;
    // The CA is made before the generic destination below is configured, so its
    // name constraints do not cover that destination's host.
    let init = std::process::Command::new(env!("CARGO_BIN_EXE_consentgate"))
        .args(["ca", "init", "--out"])
        .arg(dir.join("certs"))
        .current_dir(&dir)
        .output()
        .unwrap();
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let opts = ProxyOpts {
        resolve_override: vec![("api.hubapi.com", rogue.addr)],
        extra_yaml: "destinations:\n  - name: acme_crm\n    type: generic\n    \
                     hosts: [api.example-crm.test]\n    paths: [/v1/send]\n    kind: email\n    \
                     category: marketing_email\n    emails: [email]\n"
            .into(),
        ..Default::default()
    };
    let p = start_proxy(&dir, &up, &ca, opts);

    // Before any traffic: the handshake-failure and upstream-error label sets,
    // build_info and the process family.
    let s = scrape(&p).await;
    for side in ["client", "upstream"] {
        for reason in [
            "unknown_ca",
            "bad_certificate",
            "eof",
            "timeout",
            "mint_failed",
            "other",
        ] {
            let series = format!(
                "consentgate_tls_handshake_failures_total{{reason=\"{reason}\",side=\"{side}\"}}"
            );
            assert_eq!(value(&s, &series), Some(0.0), "{series}\n{s}");
        }
    }
    for kind in ["connect", "tls", "timeout", "reset", "protocol"] {
        let series = format!(
            "consentgate_upstream_errors_total{{destination=\"meta_capi\",kind=\"{kind}\"}}"
        );
        assert_eq!(value(&s, &series), Some(0.0), "{series}");
    }
    assert_eq!(value(&s, "consentgate_tls_mint_failures_total"), Some(0.0));
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        value(
            &s,
            &format!("consentgate_build_info{{version=\"{version}\"}}")
        ),
        Some(1.0)
    );
    assert!(value(&s, "process_cpu_seconds_total").is_some(), "{s}");
    assert!(value(&s, "process_resident_memory_bytes").unwrap() > 1e6);
    assert!(value(&s, "process_open_fds").unwrap() > 0.0);

    // 1. An app that does not trust the interception CA (its own roots: the
    // upstream's CA, not the proxy's) → unknown_ca on the client side.
    let Err(err) = connect_tls(p.proxy, "graph.facebook.com", roots_of(&ca.ca_pem)).await else {
        panic!("a client without the CA must refuse the handshake");
    };
    assert!(err.to_string().contains("UnknownIssuer"), "{err}");
    // And one that trusts it gets through.
    let tls = connect_tls(
        p.proxy,
        "graph.facebook.com",
        roots_of(&p.dir.join("certs/ca.pem")),
    )
    .await
    .unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let batch = r#"{"data":[{"event_name":"Lead","event_time":1763600000,"user_data":{"em":["jane.roe@example.com"]}}]}"#;
    let req = hyper::Request::post("/v19.0/1/events")
        .header("host", "graph.facebook.com")
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(batch)))
        .unwrap();
    assert_eq!(sender.send_request(req).await.unwrap().status(), 200);

    // 2. A vendor certificate the proxy does not trust → upstream side; a 502. (The
    // rogue CA has the trusted one's name, so webpki reports a bad signature.)
    let r = send(
        p.proxy,
        Req::get("api.hubapi.com", "/crm/v3/objects/contacts"),
    )
    .await;
    assert_eq!(r.status, 502, "{:?}", String::from_utf8_lossy(&r.body));

    // 3. A configured host the CA may not sign for → a mint failure, and the
    // app's handshake fails with mint_failed.
    assert!(connect_tls(
        p.proxy,
        "api.example-crm.test",
        roots_of(&p.dir.join("certs/ca.pem"))
    )
    .await
    .is_err());

    // 4. A refusal.
    let denied = r#"{"data":[{"event_name":"Lead","event_time":1763600000,"user_data":{"em":["deny.me@example.com"]}}]}"#;
    let r = send(
        p.proxy,
        Req::post("graph.facebook.com", "/v19.0/1/events", denied),
    )
    .await;
    assert_eq!(r.status, 451);

    // 5. A head the listener's gate refuses (over limits.max_header_bytes).
    let big = "x".repeat(70 << 10);
    let r = send(
        p.proxy,
        Req::get("graph.facebook.com", "/").header("x-big", &big),
    )
    .await;
    assert_eq!(r.status, 431);

    // The counts arrive on the admin listener after the handshake tasks finish.
    let mut s = String::new();
    for _ in 0..100 {
        s = scrape(&p).await;
        let done =
            "consentgate_tls_handshake_failures_total{reason=\"mint_failed\",side=\"client\"} 1";
        if s.lines().any(|l| l == done) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let hs = |side: &str, reason: &str| {
        value(
            &s,
            &format!(
                "consentgate_tls_handshake_failures_total{{reason=\"{reason}\",side=\"{side}\"}}"
            ),
        )
    };
    assert_eq!(hs("client", "unknown_ca"), Some(1.0), "{s}");
    assert_eq!(hs("upstream", "bad_certificate"), Some(1.0), "{s}");
    assert_eq!(hs("client", "mint_failed"), Some(1.0), "{s}");
    assert_eq!(value(&s, "consentgate_tls_mint_failures_total"), Some(1.0));
    assert_eq!(
        value(
            &s,
            "consentgate_responses_total{code=\"200\",destination=\"meta_capi\",error=\"\"}"
        ),
        Some(1.0),
        "{s}"
    );
    assert_eq!(
        value(
            &s,
            "consentgate_responses_total{code=\"451\",destination=\"meta_capi\",error=\"blocked_by_consent_policy\"}"
        ),
        Some(1.0),
        "{s}"
    );
    assert_eq!(
        value(
            &s,
            "consentgate_responses_total{code=\"502\",destination=\"hubspot\",error=\"upstream_unavailable\"}"
        ),
        Some(1.0),
        "{s}"
    );
    assert!(
        s.lines().any(|l| l.starts_with(
            "consentgate_responses_total{code=\"431\",destination=\"unknown\",error=\""
        ) && l.ends_with(" 1")),
        "{s}"
    );
    assert_eq!(
        value(
            &s,
            "consentgate_upstream_errors_total{destination=\"hubspot\",kind=\"tls\"}"
        ),
        Some(1.0)
    );

    // The log line of the client-side failure names the host and the app, and
    // every line is flat JSON.
    let log = std::fs::read_to_string(&p.log).unwrap();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect();
    assert!(lines.iter().all(|l| l.get("fields").is_none()), "{log}");
    let failed = lines
        .iter()
        .find(|l| l["message"] == "TLS handshake failed" && l["reason"] == "unknown_ca")
        .unwrap_or_else(|| panic!("no handshake failure line in\n{log}"));
    assert_eq!(failed["sni"], "graph.facebook.com");
    assert_eq!(failed["side"], "client");
    assert!(
        failed["peer"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{failed}"
    );
    assert!(lines
        .iter()
        .any(|l| l["message"] == "interception certificate not minted"
            && l["host"] == "api.example-crm.test"));
    let finished: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["message"] == "request finished")
        .collect();
    assert!(finished.len() >= 3);
    for l in &finished {
        assert!(l["duration_ms"].as_f64().is_some(), "{l}");
        assert!(l["request_id"].as_str().is_some(), "{l}");
        assert!(l["peer"].as_str().is_some(), "{l}");
    }
    assert!(finished
        .iter()
        .any(|l| l["sni"] == "graph.facebook.com" && l["status"] == 200));

    // `check` names the configured host the CA cannot sign for.
    let check = std::process::Command::new(env!("CARGO_BIN_EXE_consentgate"))
        .args(["check", "--config"])
        .arg(&p.config)
        .current_dir(&dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&check.stderr);
    assert!(!check.status.success());
    assert!(
        err.contains("do not permit api.example-crm.test")
            && err.contains("--permit api.example-crm.test"),
        "{err}"
    );
}
