//! Issue 17 acceptance: `upstream.proxy`. The real binary reaches the vendor (the
//! recording TLS upstream) through a parent CONNECT proxy the test runs on
//! loopback, which counts CONNECTs, checks credentials and sees only TLS; hosts in
//! `no_proxy` go direct; wrong or missing credentials, a parent that is down or
//! silent, are JSON 502/504 answers (never a hang); blind tunnels go through it too.

mod common;
use common::*;
use serde_json::json;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CREDS: &str = "svc-egress:Corp3gress!";

/// One CONNECT the parent proxy received.
#[derive(Clone, Debug)]
struct Seen {
    authority: String,
    authorization: Option<String>,
    /// The first byte the client sent inside the tunnel (0x16: a TLS handshake).
    first_byte: Option<u8>,
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Relay,
    /// Read the CONNECT and never answer.
    Silent,
}

struct Parent {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Parent {
    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

fn basic(creds: &str) -> String {
    use std::fmt::Write;
    // A test-side encoder, independent of the product's.
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bits: String = creds.bytes().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:08b}");
        s
    });
    let mut out = String::new();
    for c in bits.as_bytes().chunks(6) {
        let mut v = String::from_utf8(c.to_vec()).unwrap();
        while v.len() < 6 {
            v.push('0');
        }
        out.push(A[usize::from_str_radix(&v, 2).unwrap()] as char);
    }
    while !out.len().is_multiple_of(4) {
        out.push('=');
    }
    format!("Basic {out}")
}

/// A parent HTTP proxy: CONNECT only; `routes` maps an authority to where it
/// really connects (like its own DNS), anything else goes to `default`.
async fn start_parent(
    required_auth: Option<String>,
    routes: HashMap<String, SocketAddr>,
    default: SocketAddr,
    mode: Mode,
) -> Parent {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut c, _)) = listener.accept().await else {
                continue;
            };
            let (s, routes, required_auth) = (s.clone(), routes.clone(), required_auth.clone());
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && head.len() < 8192 {
                    if c.read_exact(&mut b).await.is_err() {
                        return;
                    }
                    head.push(b[0]);
                }
                let mut h = [httparse::EMPTY_HEADER; 32];
                let mut req = httparse::Request::new(&mut h);
                assert!(req.parse(&head).unwrap().is_complete());
                assert_eq!(req.method, Some("CONNECT"));
                let authority = req.path.unwrap().to_string();
                let authorization = req
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("proxy-authorization"))
                    .map(|h| String::from_utf8_lossy(h.value).to_string());
                let idx = {
                    let mut v = s.lock().unwrap();
                    v.push(Seen {
                        authority: authority.clone(),
                        authorization: authorization.clone(),
                        first_byte: None,
                    });
                    v.len() - 1
                };
                if mode == Mode::Silent {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    return;
                }
                if required_auth.is_some() && authorization != required_auth {
                    let _ = c
                        .write_all(b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"corp\"\r\nContent-Length: 0\r\n\r\n")
                        .await;
                    return;
                }
                let target = routes.get(&authority).copied().unwrap_or(default);
                let Ok(mut up) = tokio::net::TcpStream::connect(target).await else {
                    let _ = c.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n").await;
                    return;
                };
                c.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    .await
                    .unwrap();
                let mut first = [0u8; 1];
                if c.read_exact(&mut first).await.is_err() {
                    return;
                }
                s.lock().unwrap()[idx].first_byte = Some(first[0]);
                if up.write_all(&first).await.is_err() {
                    return;
                }
                let _ = tokio::io::copy_bidirectional(&mut c, &mut up).await;
            });
        }
    });
    Parent { addr, seen }
}

fn proxy_yaml(parent: SocketAddr, creds_file: Option<&std::path::Path>, no_proxy: &str) -> String {
    let mut y = format!("  proxy:\n    url: http://{parent}\n    no_proxy: {no_proxy}\n");
    if let Some(f) = creds_file {
        y.push_str(&format!("    credentials_file: {}\n", f.display()));
    }
    y
}

fn meta_event() -> Req {
    // P-1001 granted advertising.
    let body = json!({"data": [{"event_name": "Lead", "event_time": 1763600000, "event_id": "e1",
        "action_source": "website", "user_data": {"em": [ "jane.roe@example.com" ]}}]});
    Req::post("graph.facebook.com", "/v19.0/1/events", body.to_string())
        .header("content-type", "application/json")
}

fn twilio_sms() -> Req {
    // P-1020 granted marketing_sms.
    let form = "To=%2B14155550120&From=%2B14155559999&Body=Hello";
    Req::post(
        "api.twilio.com",
        "/2010-04-01/Accounts/AC1/Messages.json",
        form,
    )
    .header("content-type", "application/x-www-form-urlencoded")
}

fn text(r: &Resp) -> String {
    String::from_utf8_lossy(&r.body).to_string()
}

struct Setup {
    p: Proxy,
    up: Upstream,
    parent: Parent,
}

async fn setup(name: &str, creds: Option<&str>, required: Option<&str>, mode: Mode) -> Setup {
    let dir = test_dir(name);
    let ca = test_ca(&dir.join("upstream"), VENDOR_HOSTS);
    let up = start_upstream(&ca).await;
    let parent = start_parent(required.map(basic), HashMap::new(), up.addr, mode).await;
    let creds_file = creds.map(|c| {
        let f = dir.join("proxy-credentials");
        std::fs::write(&f, format!("{c}\n")).unwrap();
        f
    });
    let p = start_proxy(
        &dir,
        &up,
        &ca,
        ProxyOpts {
            upstream_yaml: proxy_yaml(parent.addr, creds_file.as_deref(), "[api.twilio.com]"),
            ..Default::default()
        },
    );
    Setup { p, up, parent }
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_reach_the_vendor_through_the_parent_proxy() {
    let Setup { p, up, parent } = setup("uproxy-ok", Some(CREDS), Some(CREDS), Mode::Relay).await;
    let r = send(p.proxy, meta_event()).await;
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(up.count(), 1);
    let got = up.last();
    assert_eq!(
        got.sni.as_deref(),
        Some("graph.facebook.com"),
        "TLS end to end with the vendor name"
    );
    assert_eq!(got.path_and_query, "/v19.0/1/events");
    let seen = parent.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(
        seen[0].authority, "graph.facebook.com:443",
        "the parent sees only CONNECT host:443"
    );
    assert_eq!(
        seen[0].authorization.as_deref(),
        Some(basic(CREDS).as_str())
    );
    assert_eq!(
        seen[0].first_byte,
        Some(0x16),
        "a TLS handshake, not plaintext HTTP"
    );

    // A host in no_proxy goes direct (upstream.resolve), the parent sees nothing.
    let r = send(p.proxy, twilio_sms()).await;
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(up.count(), 2);
    assert_eq!(up.last().sni.as_deref(), Some("api.twilio.com"));
    assert!(
        parent
            .seen()
            .iter()
            .all(|s| !s.authority.starts_with("api.twilio.com")),
        "{:?}",
        parent.seen()
    );

    // The same tunnel or a new one: either way every CONNECT was to the vendor.
    let r = send(p.proxy, meta_event()).await;
    assert_eq!(r.status, 200, "{}", text(&r));
    assert!(parent
        .seen()
        .iter()
        .all(|s| s.authority == "graph.facebook.com:443"));
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_or_missing_credentials_are_a_clear_502() {
    for (name, creds, says) in [
        (
            "uproxy-wrong",
            Some("svc-egress:not-it"),
            "refused the credentials of upstream.proxy.credentials_file",
        ),
        (
            "uproxy-none",
            None,
            "requires credentials: set upstream.proxy.credentials_file",
        ),
    ] {
        let Setup { p, up, parent } = setup(name, creds, Some(CREDS), Mode::Relay).await;
        let r = send(p.proxy, meta_event()).await;
        assert_eq!(r.status, 502, "{name}: {}", text(&r));
        let c = r.contract();
        assert_eq!(c["error"], "upstream_unavailable", "{name}: {}", text(&r));
        let detail = c["detail"].as_str().unwrap_or_default();
        assert!(detail.contains(says), "{name}: {detail}");
        assert!(
            !text(&r).contains("not-it") && !text(&r).contains("Corp3gress"),
            "{}",
            text(&r)
        );
        assert_eq!(up.count(), 0, "nothing reached the vendor");
        assert_eq!(parent.seen().len(), 1);
        let m = String::from_utf8(admin_get(&p, "/metrics").await.body).unwrap();
        assert!(
            m.contains(
                "consentgate_upstream_errors_total{destination=\"meta_capi\",kind=\"connect\"} 1"
            ),
            "{m}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_parent_that_is_down_or_silent_never_hangs_the_request() {
    // Silent: accepts and reads CONNECT, never answers → 504 within the connect
    // timeout (2 s in the harness).
    let Setup { p, up, parent } = setup("uproxy-silent", None, None, Mode::Silent).await;
    let t = Instant::now();
    let r = send(p.proxy, meta_event()).await;
    assert_eq!(r.status, 504, "{}", text(&r));
    assert_eq!(r.contract()["error"], "upstream_timeout");
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "ended within timeout + 1 s: {:?}",
        t.elapsed()
    );
    assert_eq!(parent.seen().len(), 1);
    assert_eq!(up.count(), 0);
    drop(p);

    // Down: nothing listens on the parent's port → 502 naming the parent proxy.
    let dir = test_dir("uproxy-down");
    let ca = test_ca(&dir.join("upstream"), VENDOR_HOSTS);
    let up = start_upstream(&ca).await;
    let closed: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let p = start_proxy(
        &dir,
        &up,
        &ca,
        ProxyOpts {
            upstream_yaml: proxy_yaml(closed, None, "[]"),
            ..Default::default()
        },
    );
    let r = send(p.proxy, meta_event()).await;
    assert_eq!(r.status, 502, "{}", text(&r));
    let detail = r.contract()["detail"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(detail.contains("parent proxy (upstream.proxy)"), "{detail}");
    assert_eq!(up.count(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn blind_tunnels_go_through_the_parent_too() {
    let echo = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let echo_addr = echo.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = echo.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let dir = test_dir("uproxy-tunnel");
    let ca = test_ca(&dir.join("upstream"), VENDOR_HOSTS);
    let up = start_upstream(&ca).await;
    let routes = HashMap::from([("unknown.example:443".to_string(), echo_addr)]);
    let parent = start_parent(Some(basic(CREDS)), routes, up.addr, Mode::Relay).await;
    let creds = dir.join("creds");
    std::fs::write(&creds, CREDS).unwrap();
    let p = start_proxy(
        &dir,
        &up,
        &ca,
        ProxyOpts {
            unknown_destinations: "tunnel",
            upstream_yaml: proxy_yaml(parent.addr, Some(&creds), "[]"),
            ..Default::default()
        },
    );
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
    tcp.write_all(b"\x16ping through two tunnels")
        .await
        .unwrap();
    let mut back = [0u8; 25];
    tcp.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"\x16ping through two tunnels");
    let seen = parent.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].authority, "unknown.example:443");
    assert_eq!(
        seen[0].authorization.as_deref(),
        Some(basic(CREDS).as_str())
    );
}

#[test]
fn credentials_never_in_the_url_and_the_file_must_hold_user_password() {
    let dir = test_dir("uproxy-config");
    let bad_creds = dir.join("bad-creds");
    std::fs::write(&bad_creds, "only-a-token-Corp3gress\n").unwrap();
    let base = format!(
        "admin:\n  tokens_file: {}\nconsent:\n  file: {}\n",
        repo().join("config/admin-tokens.example").display(),
        repo().join("config/consent.example.jsonl").display()
    );
    for (upstream, says) in [
        (
            "upstream:\n  proxy:\n    url: http://svc:Corp3gress@127.0.0.1:3128\n".to_string(),
            "upstream.proxy.url: credentials do not belong in the URL",
        ),
        (
            format!(
                "upstream:\n  proxy:\n    url: http://127.0.0.1:3128\n    credentials_file: {}\n",
                bad_creds.display()
            ),
            "upstream.proxy.credentials_file",
        ),
    ] {
        let config = dir.join("c.yaml");
        std::fs::write(&config, format!("{base}{upstream}")).unwrap();
        for cmd in ["check", "run"] {
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_consentgate"))
                .args([cmd, "--config"])
                .arg(&config)
                .current_dir(&dir)
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{cmd}: {err}");
            assert!(err.contains(says), "{cmd}: {err}");
            assert!(
                !err.contains("Corp3gress"),
                "{cmd}: the secret is never shown: {err}"
            );
        }
    }
}
