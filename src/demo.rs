//! `consentgate demo`: a first run that shows everything with no network. It
//! starts a fake Meta Conversions API on loopback (TLS, its own test CA, answers
//! like Graph), starts the real proxy (this binary's `run`) with a config that
//! points `graph.facebook.com:443` at it, and sends three requests the way an
//! app does with `HTTPS_PROXY` and the interception CA trusted: CONNECT, TLS to
//! a minted certificate, then a POST that is allowed, one that is modified and
//! one that is blocked. It then runs `explain` on the modified one and
//! `audit verify` on the trail, and says in plain words what happened. It
//! checks every outcome and exits 1 if anything is not as described, so it is
//! also a smoke test of an install.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The consent snapshot and admin tokens of the repository's examples, so the
/// demo needs no checkout (config/FIXTURES.md describes the patients).
const SNAPSHOT: &str = include_str!("../config/consent.example.jsonl");
const TOKENS: &str = include_str!("../config/admin-tokens.example");
const VENDOR_HOST: &str = "graph.facebook.com";
const EVENTS_PATH: &str = "/v19.0/1234567890/events";
/// P-1001: every category granted. P-1002: advertising denied.
const GRANTED_EMAIL: &str = "jane.roe@example.com";
const DENIED_EMAIL: &str = "deny.me@example.com";

type Fail = String;

/// `consentgate demo [--dir DIR]`; exit code.
pub fn run(dir: Option<&Path>) -> i32 {
    crate::run::install_crypto();
    let dir = match dir {
        Some(d) => d.to_path_buf(),
        None => {
            let d = std::env::temp_dir().join(format!("consentgate-demo-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&d);
            d
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return 1;
        }
    };
    match rt.block_on(demo(&dir)) {
        Ok(()) => {
            println!(
                "\nThe demo's files stay in {} (config, CA, audit trail, proxy.log).",
                dir.display()
            );
            0
        }
        Err(e) => {
            eprintln!("\ndemo failed: {e}");
            eprintln!(
                "(files, including the proxy's log, are in {})",
                dir.display()
            );
            1
        }
    }
}

async fn demo(dir: &Path) -> Result<(), Fail> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let dir = std::fs::canonicalize(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    println!("consentgate demo: a first run, nothing leaves this machine");
    println!("  working directory: {}\n", dir.display());

    let vendor = FakeVendor::start(&dir).await?;
    println!(
        "1. A fake Meta Conversions API ({VENDOR_HOST}) listens on {} with a test certificate of its own.",
        vendor.addr
    );

    let ca = dir.join("certs").join(crate::tls::CA_CERT_FILE);
    let had_ca = ca.is_file();
    let proxy = ProxyProcess::start(&dir, &vendor)?;
    println!(
        "2. The proxy runs (`consentgate run --config {}`): proxy {}, admin {}.",
        proxy.config.display(),
        proxy.proxy,
        proxy.admin
    );
    println!(
        "   {} its interception CA: {} (apps trust this one;\n   {} and {} beside it are for apps that take a bundle or a Java truststore).",
        if had_ca { "It reuses" } else { "On first start it created" },
        ca.display(),
        crate::tls::CA_BUNDLE_FILE,
        crate::tls::TRUSTSTORE_FILE
    );
    println!(
        "   upstream.resolve sends {VENDOR_HOST}:443 to the fake vendor instead of the internet.\n"
    );

    println!(
        "3. An app sends to {VENDOR_HOST} as it would with HTTPS_PROXY=http://{} and the CA trusted:",
        proxy.proxy
    );
    println!("   CONNECT {VENDOR_HOST}:443, then TLS to a certificate the proxy mints for {VENDOR_HOST}, then the POST.\n");
    let result = walk(&proxy, &vendor, &ca, &dir).await;
    let stopped = proxy.stop();
    result?;
    stopped?;
    audit_verify(&dir)?;
    println!("\nTry it with your own app:");
    println!(
        "  consentgate run                      # listens on 127.0.0.1:15001, creates certs/ca.pem"
    );
    println!("  export HTTPS_PROXY=http://127.0.0.1:15001");
    println!("  export SSL_CERT_FILE=$PWD/certs/ca-bundle.pem   # or NODE_EXTRA_CA_CERTS=$PWD/certs/ca.pem, ...");
    Ok(())
}

/// The three requests, then `explain`.
async fn walk(
    proxy: &ProxyProcess,
    vendor: &FakeVendor,
    ca: &Path,
    dir: &Path,
) -> Result<(), Fail> {
    let hashed = hex::encode(Sha256::digest(GRANTED_EMAIL.as_bytes()));
    let event = |id: &str, em: &str| {
        json!({"event_name": "Lead", "event_time": 1763600000, "event_id": id,
               "action_source": "website", "user_data": {"em": [em]}})
    };

    // a) allowed
    let body = json!({"data": [event("a1", &hashed)]}).to_string();
    println!(
        "   a) One Lead event for patient P-1001 (consented to advertising), email already hashed."
    );
    let r = send_via_connect(proxy.proxy, ca, body.as_bytes()).await?;
    expect(&r, 200, "allowed")?;
    let got = vendor.take();
    if got.len() != 1 || got[0] != body.as_bytes() {
        return Err("allowed: the vendor did not receive the body byte for byte".into());
    }
    println!(
        "      → {} {}, x-consentgate-decision: allowed. The vendor got the body byte for byte.",
        r.status,
        r.vendor_summary()
    );

    // b) modified
    let body = json!({"data": [event("b1", GRANTED_EMAIL), event("b2", DENIED_EMAIL)]}).to_string();
    println!("   b) Two Lead events: P-1001 (consented) and P-1002 (denied advertising), emails in plain text.");
    let r = send_via_connect(proxy.proxy, ca, body.as_bytes()).await?;
    expect(&r, 200, "modified")?;
    let got = vendor.take();
    let sent: Value = got
        .first()
        .and_then(|b| serde_json::from_slice(b).ok())
        .ok_or("modified: the vendor received nothing")?;
    let events = sent["data"].as_array().map_or(0, Vec::len);
    let text = String::from_utf8_lossy(got.first().map_or(&[][..], |b| b));
    if events != 1 || text.contains(DENIED_EMAIL) || text.contains(GRANTED_EMAIL) {
        return Err(format!("modified: unexpected body at the vendor: {text}"));
    }
    if sent["data"][0]["user_data"]["em"][0] != json!(hashed) {
        return Err("modified: the kept email was not hashed".into());
    }
    println!(
        "      → {} {}, x-consentgate-decision: modified.",
        r.status,
        r.vendor_summary()
    );
    println!("        P-1002's event was dropped (consent_denied); P-1001's email left as SHA-256, as Meta expects.");

    // c) blocked
    let body = json!({"data": [event("c1", DENIED_EMAIL)]}).to_string();
    println!("   c) One Lead event for P-1002 only.");
    let r = send_via_connect(proxy.proxy, ca, body.as_bytes()).await?;
    expect(&r, 451, "blocked")?;
    if !vendor.take().is_empty() {
        return Err("blocked: the request reached the vendor".into());
    }
    let j: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
    let c = j.get("consentgate").unwrap_or(&j);
    println!(
        "      → 451 {} (reasons: {}), x-consentgate-decision: blocked. Nothing reached the vendor.",
        c["error"].as_str().unwrap_or("?"),
        c["reasons"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(", "))
            .unwrap_or_default()
    );

    // explain
    let request = dir.join("modified.http");
    let raw = format!(
        "POST {EVENTS_PATH} HTTP/1.1\r\nHost: {VENDOR_HOST}\r\nContent-Type: application/json\r\n\r\n{}",
        json!({"data": [event("b1", GRANTED_EMAIL), event("b2", DENIED_EMAIL)]})
    );
    std::fs::write(&request, raw).map_err(|e| format!("{}: {e}", request.display()))?;
    println!(
        "\n4. explain: the same decision, sent nowhere (`consentgate explain --config {} --request {}`):",
        proxy.config.display(),
        request.display()
    );
    let out = consentgate(dir)
        .arg("explain")
        .arg("--config")
        .arg(&proxy.config)
        .arg("--request")
        .arg(&request)
        .output()
        .map_err(|e| format!("explain: {e}"))?;
    if !out.status.success() {
        return Err(format!("explain: {}", String::from_utf8_lossy(&out.stderr)));
    }
    let trace: Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("explain output: {e}"))?;
    for ev in trace["events"].as_array().into_iter().flatten() {
        let hashed = ev["hashed"]
            .as_array()
            .filter(|a| !a.is_empty())
            .map(|a| {
                let f: Vec<&str> = a.iter().filter_map(Value::as_str).collect();
                format!("; hashed {}", f.join(", "))
            })
            .unwrap_or_default();
        println!(
            "      event {}: {} ({}){hashed}",
            ev["index"],
            ev["decision"].as_str().unwrap_or("?"),
            ev["reason"].as_str().unwrap_or("?"),
        );
    }
    println!(
        "      request: {} (destination {}, category {})",
        trace["decision"].as_str().unwrap_or("?"),
        trace["destination"].as_str().unwrap_or("?"),
        trace["category"].as_str().unwrap_or("?")
    );
    if trace["decision"] != "modified" {
        return Err("explain disagrees with the proxy on the modified request".into());
    }
    Ok(())
}

/// `audit verify` on the trail the proxy wrote (after it stopped and flushed).
fn audit_verify(dir: &Path) -> Result<(), Fail> {
    let audit = dir.join("audit");
    println!(
        "\n5. audit verify: the hash-chained trail of all of it (`consentgate audit verify {}`):",
        audit.display()
    );
    let out = consentgate(dir)
        .args(["audit", "verify"])
        .arg(&audit)
        .output()
        .map_err(|e| format!("audit verify: {e}"))?;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        println!("      {line}");
    }
    if !out.status.success() {
        return Err(format!(
            "audit verify: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    println!(
        "      Every request is recorded with patient pseudonyms, never an email or a patient id."
    );
    Ok(())
}

fn consentgate(dir: &Path) -> Command {
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("consentgate"));
    let mut c = Command::new(exe);
    c.current_dir(dir).stdin(Stdio::null());
    c
}

fn expect(r: &Answer, status: u16, decision: &str) -> Result<(), Fail> {
    if r.status != status || r.decision.as_deref() != Some(decision) {
        return Err(format!(
            "expected {status} {decision}, got {} {} {}",
            r.status,
            r.decision.as_deref().unwrap_or("(no decision header)"),
            String::from_utf8_lossy(&r.body)
        ));
    }
    Ok(())
}

struct Answer {
    status: u16,
    decision: Option<String>,
    body: Vec<u8>,
}

impl Answer {
    /// What the fake vendor said, as Graph would (`events_received`).
    fn vendor_summary(&self) -> String {
        let j: Value = serde_json::from_slice(&self.body).unwrap_or(Value::Null);
        match j.get("events_received") {
            Some(n) => format!("{{\"events_received\":{n}}}"),
            None => String::new(),
        }
    }
}

/// What an app behind `HTTPS_PROXY` does: CONNECT, TLS trusting the CA, POST.
async fn send_via_connect(proxy: SocketAddr, ca: &Path, body: &[u8]) -> Result<Answer, Fail> {
    let step = |what: &str, e: &dyn std::fmt::Display| format!("{what}: {e}");
    let io = async {
        let mut tcp = TcpStream::connect(proxy)
            .await
            .map_err(|e| step("connect to the proxy", &e))?;
        let connect =
            format!("CONNECT {VENDOR_HOST}:443 HTTP/1.1\r\nHost: {VENDOR_HOST}:443\r\n\r\n");
        tcp.write_all(connect.as_bytes())
            .await
            .map_err(|e| step("CONNECT", &e))?;
        let head = read_head(&mut tcp).await?;
        if !head.starts_with("HTTP/1.1 200") {
            return Err(format!(
                "CONNECT refused: {}",
                head.lines().next().unwrap_or("")
            ));
        }
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(ca).map_err(|e| step("the CA", &e))? {
            roots
                .add(c.map_err(|e| step("the CA", &e))?)
                .map_err(|e| step("the CA", &e))?;
        }
        let mut cfg =
            rustls::ClientConfig::builder_with_provider(crate::forward::crypto_provider())
                .with_safe_default_protocol_versions()
                .map_err(|e| step("TLS", &e))?
                .with_root_certificates(roots)
                .with_no_client_auth();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        let name = ServerName::try_from(VENDOR_HOST).map_err(|e| step("TLS", &e))?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(name, tcp)
            .await
            .map_err(|e| step("TLS with the proxy (is the CA trusted?)", &e))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| step("HTTP", &e))?;
        tokio::spawn(conn);
        let req = hyper::Request::post(EVENTS_PATH)
            .header("host", VENDOR_HOST)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::copy_from_slice(body)))
            .map_err(|e| step("request", &e))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| step("request", &e))?;
        let status = resp.status().as_u16();
        let decision = resp
            .headers()
            .get("x-consentgate-decision")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| step("response", &e))?
            .to_bytes()
            .to_vec();
        Ok(Answer {
            status,
            decision,
            body,
        })
    };
    tokio::time::timeout(Duration::from_secs(20), io)
        .await
        .map_err(|_| "no answer from the proxy within 20s".to_string())?
}

/// Read a response head (the CONNECT answer), at most 16 KiB.
async fn read_head(tcp: &mut TcpStream) -> Result<String, Fail> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if buf.len() > 16 << 10 {
            return Err("CONNECT answer too long".into());
        }
        match tcp.read(&mut byte).await {
            Ok(0) => return Err("the proxy closed the connection".into()),
            Ok(_) => buf.push(byte[0]),
            Err(e) => return Err(format!("CONNECT answer: {e}")),
        }
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// A TLS server answering like Graph's Conversions API, recording what arrives.
struct FakeVendor {
    addr: SocketAddr,
    ca_pem: PathBuf,
    received: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl FakeVendor {
    async fn start(dir: &Path) -> Result<FakeVendor, Fail> {
        let fail = |e: &dyn std::fmt::Display| format!("fake vendor: {e}");
        // Its own CA (the proxy trusts it through upstream.extra_ca), then a leaf.
        let ca_key = rcgen::KeyPair::generate().map_err(|e| fail(&e))?;
        let mut ca_params =
            rcgen::CertificateParams::new(Vec::<String>::new()).map_err(|e| fail(&e))?;
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "consentgate demo fake vendor CA");
        let ca_cert = ca_params.self_signed(&ca_key).map_err(|e| fail(&e))?;
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let leaf_key = rcgen::KeyPair::generate().map_err(|e| fail(&e))?;
        let leaf = rcgen::CertificateParams::new(vec![VENDOR_HOST.to_string()])
            .map_err(|e| fail(&e))?
            .signed_by(&leaf_key, &issuer)
            .map_err(|e| fail(&e))?;
        let ca_pem = dir.join("fake-vendor-ca.pem");
        std::fs::write(&ca_pem, ca_cert.pem()).map_err(|e| fail(&e))?;
        let key = PrivateKeyDer::from_pem_slice(leaf_key.serialize_pem().as_bytes())
            .map_err(|e| fail(&e))?;
        let mut server =
            rustls::ServerConfig::builder_with_provider(crate::forward::crypto_provider())
                .with_safe_default_protocol_versions()
                .map_err(|e| fail(&e))?
                .with_no_client_auth()
                .with_single_cert(vec![leaf.der().clone(), ca_cert.der().clone()], key)
                .map_err(|e| fail(&e))?;
        server.alpn_protocols = vec![b"http/1.1".to_vec()];
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| fail(&e))?;
        let addr = listener.local_addr().map_err(|e| fail(&e))?;
        let received = Arc::new(Mutex::new(Vec::new()));
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let rec = received.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let rec = rec.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(move |req| graph_answer(req, rec.clone()));
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        Ok(FakeVendor {
            addr,
            ca_pem,
            received,
        })
    }

    /// The bodies received since the last call.
    fn take(&self) -> Vec<Vec<u8>> {
        std::mem::take(&mut *self.received.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// Graph's answer to a Conversions API post: `events_received` and a trace id.
async fn graph_answer(
    req: hyper::Request<Incoming>,
    received: Arc<Mutex<Vec<Vec<u8>>>>,
) -> Result<hyper::Response<Full<Bytes>>, std::convert::Infallible> {
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes().to_vec(),
        Err(_) => Vec::new(),
    };
    let events = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|j| j["data"].as_array().map(Vec::len))
        .unwrap_or(0);
    received
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(body);
    let answer = json!({"events_received": events, "messages": [], "fbtrace_id": "AdemoTrace0001"});
    let mut resp = hyper::Response::new(Full::new(Bytes::from(answer.to_string())));
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    Ok(resp)
}

/// The proxy, as a child process running `consentgate run` on the demo's config.
struct ProxyProcess {
    child: Child,
    proxy: SocketAddr,
    admin: SocketAddr,
    config: PathBuf,
    log: PathBuf,
}

impl ProxyProcess {
    fn start(dir: &Path, vendor: &FakeVendor) -> Result<ProxyProcess, Fail> {
        let write = |name: &str, text: &str| -> Result<PathBuf, Fail> {
            let p = dir.join(name);
            std::fs::write(&p, text).map_err(|e| format!("{}: {e}", p.display()))?;
            Ok(p)
        };
        let snapshot = write("consent.jsonl", SNAPSHOT)?;
        let tokens = write("admin-tokens", TOKENS)?;
        let (proxy, admin) = (free_port()?, free_port()?);
        let d = dir.display();
        let config = write(
            "consentgate.yaml",
            &format!(
                "# Written by `consentgate demo`: the shipped defaults, with the fake vendor.\n\
listen:\n  proxy: {proxy}\n  admin: {admin}\n\
interception:\n  ca_cert: {d}/certs/ca.pem\n  ca_key: {d}/certs/ca-key.pem\n\
upstream:\n  extra_ca: {vca}\n  resolve:\n    \"{VENDOR_HOST}:443\": \"{vaddr}\"\n\
consent:\n  source: file\n  file: {snap}\n  journal: {d}/journal\n\
admin:\n  tokens_file: {tok}\n\
audit:\n  path: {d}/audit\n  pseudonym_key_file: {d}/pseudonym.key\n\
shutdown_grace: 5s\n",
                vca = vendor.ca_pem.display(),
                vaddr = vendor.addr,
                snap = snapshot.display(),
                tok = tokens.display(),
            ),
        )?;
        let log = dir.join("proxy.log");
        let logf = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let child = consentgate(dir)
            .arg("run")
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::from(logf))
            .spawn()
            .map_err(|e| format!("starting the proxy: {e}"))?;
        let mut p = ProxyProcess {
            child,
            proxy,
            admin,
            config,
            log,
        };
        p.wait_ready()?;
        Ok(p)
    }

    fn wait_ready(&mut self) -> Result<(), Fail> {
        use std::io::{Read, Write};
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "the proxy exited ({status}); its log:\n{}",
                    self.log_tail()
                ));
            }
            if let Ok(mut s) = std::net::TcpStream::connect(self.admin) {
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let _ = s.write_all(b"GET /readyz HTTP/1.0\r\n\r\n");
                let mut buf = String::new();
                let _ = s.read_to_string(&mut buf);
                if buf.starts_with("HTTP/1.0 200") || buf.starts_with("HTTP/1.1 200") {
                    return Ok(());
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!(
            "the proxy did not become ready within 30s; its log:\n{}",
            self.log_tail()
        ))
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Stop it as an orchestrator would (SIGTERM: drain, flush the audit).
    fn stop(mut self) -> Result<(), Fail> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        Err("the proxy did not stop within 15s of SIGTERM".into())
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A loopback address with a port free right now (the proxy binds it next).
fn free_port() -> Result<SocketAddr, Fail> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| format!("no free port: {e}"))?;
    l.local_addr().map_err(|e| format!("no free port: {e}"))
}
