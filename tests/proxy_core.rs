//! Issue 2 acceptance: the proxy core over real sockets.

mod common;
use common::*;
use std::process::Command;
use std::time::{Duration, Instant};

async fn setup(name: &str, opts: ProxyOpts) -> (Proxy, Upstream, TestCa) {
    let dir = test_dir(name);
    let ca = test_ca(&dir.join("upstream"), VENDOR_HOSTS);
    let up = start_upstream(&ca).await;
    let p = start_proxy(&dir, &up, &ca, opts);
    (p, up, ca)
}

#[tokio::test(flavor = "multi_thread")]
async fn curl_through_the_proxy_reaches_the_tls_upstream() {
    let (p, up, _ca) = setup("curl", ProxyOpts::default()).await;
    // Forward-proxy (absolute-form) with real curl.
    let out = tokio::task::spawn_blocking({
        let proxy = p.proxy;
        move || {
            Command::new("curl")
                .args([
                    "-s",
                    "-i",
                    "--max-time",
                    "10",
                    "-x",
                    &format!("http://{proxy}"),
                ])
                // No query: a query to an endpoint no adapter inspects is refused
                // (tests/guard_query.rs).
                .arg("http://graph.facebook.com/v19.0/1234567890/events")
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("x-consentgate-decision: allowed"), "{text}");
    assert!(text.contains("x-consentgate-request-id: "), "{text}");
    assert!(text.contains(r#"{"upstream":"ok"}"#), "{text}");
    let r = up.last();
    assert_eq!(r.method, "GET");
    assert_eq!(r.path_and_query, "/v19.0/1234567890/events");
    assert_eq!(
        r.sni.as_deref(),
        Some("graph.facebook.com"),
        "upstream TLS uses the destination name"
    );

    // Reverse proxy by Host header, HTTP/1.1 and h2c.
    let resp = send(p.proxy, Req::get("graph.facebook.com", "/v19.0/me")).await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.decision(), "allowed");
    assert_eq!(resp.header("x-upstream"), Some("recorded"));
    let resp = send_h2c(p.proxy, Req::get("graph.facebook.com", "/v19.0/h2c")).await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.decision(), "allowed");
    assert_eq!(up.last().path_and_query, "/v19.0/h2c");
    // The upstream offers h2; the default client speaks HTTP/1.1 all the same.
    assert_eq!(up.last().version, "HTTP/1.1");
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_http2_true_takes_h2_when_offered() {
    let opts = ProxyOpts {
        upstream_yaml: "  http2: true\n".into(),
        ..ProxyOpts::default()
    };
    let (p, up, _ca) = setup("h2-upstream", opts).await;
    for path in ["/v19.0/a", "/v19.0/b"] {
        let resp = send(p.proxy, Req::get("graph.facebook.com", path)).await;
        assert_eq!(resp.status, 200);
        let r = up.last();
        assert_eq!(r.path_and_query, path);
        assert_eq!(r.version, "HTTP/2.0", "HTTP/1.1 client, h2 upstream");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_host_403_closed_port_502_silent_upstream_504() {
    // A port from the test range that nothing listens on.
    let closed = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let opts = ProxyOpts {
        response_timeout: "1s",
        resolve_override: vec![("api.hubapi.com", closed)],
        ..Default::default()
    };
    let (p, up, _ca) = setup("errors", opts).await;
    let r = send(p.proxy, Req::get("unknown.example", "/")).await;
    assert_eq!(r.status, 403);
    assert_eq!(r.contract()["error"], "unknown_destination");
    assert_eq!(r.decision(), "blocked");
    assert!(r.header("x-consentgate-request-id").is_some());

    let r = send(
        p.proxy,
        Req::get("api.hubapi.com", "/crm/v3/objects/contacts"),
    )
    .await;
    assert_eq!(r.status, 502, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.contract()["error"], "upstream_unavailable");

    up.set(Behavior::Hang);
    let t = Instant::now();
    let r = send(p.proxy, Req::get("graph.facebook.com", "/v19.0/hang")).await;
    let took = t.elapsed();
    assert_eq!(r.status, 504);
    assert_eq!(r.contract()["error"], "upstream_timeout");
    assert!(
        took >= Duration::from_millis(800) && took <= Duration::from_millis(1200),
        "took {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn control_headers_never_reach_upstream() {
    let (p, up, _ca) = setup("headers", ProxyOpts::default()).await;
    let req = Req::get("graph.facebook.com", "/v19.0/me")
        .header("X-Patient-Id", "P-1001")
        .header("X-Consent-Category", "advertising")
        .header("X-Consentgate-Debug", "1")
        .header("X-Consentgate-Anything", "x")
        .header("X-Keep-Me", "yes");
    let r = send(p.proxy, req.clone()).await;
    assert_eq!(r.status, 200);
    let got = up.last();
    for (k, _) in &got.headers {
        let k = k.to_ascii_lowercase();
        assert!(
            k != "x-patient-id" && k != "x-consent-category" && !k.starts_with("x-consentgate-"),
            "{k} leaked"
        );
    }
    assert_eq!(got.header("x-keep-me"), Some("yes"));
    // Same over h2c.
    let r = send_h2c(p.proxy, req).await;
    assert_eq!(r.status, 200);
    assert!(up
        .last()
        .headers
        .iter()
        .all(|(k, _)| !k.starts_with("x-consentgate-") && k != "x-patient-id"));
}

#[test]
fn check_reports_every_error_with_key_and_line() {
    let dir = test_dir("check");
    let bad = dir.join("bad.yaml");
    std::fs::write(
        &bad,
        "listen:\n  proxy: not-an-address\nunknown_destinations: sometimes\nconsent:\n  max_staleness: soon\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_consentgate"))
        .args(["check", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.yaml:2: listen.proxy:"), "{err}");
    assert!(err.contains("bad.yaml:3: unknown_destinations:"), "{err}");
    assert!(err.contains("bad.yaml:5: consent.max_staleness:"), "{err}");

    let out = Command::new(env!("CARGO_BIN_EXE_consentgate"))
        .arg("check")
        .current_dir(repo())
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // `run` refuses to start on the same errors.
    let out = Command::new(env!("CARGO_BIN_EXE_consentgate"))
        .args(["run", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("listen.proxy"));
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_and_readiness() {
    let (p, _up, _ca) = setup("metrics", ProxyOpts::default()).await;
    let r = admin_get(&p, "/readyz").await;
    assert_eq!(r.status, 200);
    assert_eq!(admin_get(&p, "/healthz").await.status, 200);
    send(p.proxy, Req::get("graph.facebook.com", "/v19.0/me")).await;
    let m = String::from_utf8(admin_get(&p, "/metrics").await.body).unwrap();
    assert!(
        m.contains(r#"consentgate_requests_total{decision="allowed",destination="meta_capi"} 1"#),
        "{m}"
    );
    assert!(
        m.contains(r#"consentgate_request_duration_seconds_count{destination="meta_capi"} 1"#),
        "{m}"
    );
    assert!(
        m.contains(r#"consentgate_upstream_duration_seconds_count{destination="meta_capi"} 1"#),
        "{m}"
    );
    assert!(m.contains("consentgate_consent_records 20"), "{m}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_in_flight_then_refuses_and_exits_zero() {
    let (mut p, up, _ca) = setup("sigterm", ProxyOpts::default()).await;
    up.set(Behavior::Delay(Duration::from_millis(1500)));
    let proxy = p.proxy;
    let slow =
        tokio::spawn(
            async move { send(proxy, Req::get("graph.facebook.com", "/v19.0/slow")).await },
        );
    tokio::time::sleep(Duration::from_millis(400)).await;
    let pid = p.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        tokio::net::TcpStream::connect(proxy).await.is_err(),
        "a new connection must be refused while draining"
    );
    let r = slow.await.unwrap();
    assert_eq!(r.status, 200, "the in-flight request completes");
    assert_eq!(r.json()["upstream"], "slow");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = p.child.try_wait().unwrap() {
            assert_eq!(status.code(), Some(0));
            break;
        }
        assert!(Instant::now() < deadline, "did not exit");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_applies_a_good_config_and_keeps_the_old_on_a_bad_one() {
    let (p, _up, _ca) = setup("sighup", ProxyOpts::default()).await;
    assert_eq!(
        send(p.proxy, Req::get("graph.facebook.com", "/v19.0/me"))
            .await
            .status,
        200
    );
    let original = std::fs::read_to_string(&p.config).unwrap();
    let pid = p.child.id().to_string();
    let hup = || {
        assert!(Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success())
    };

    // Disable the destination: the next request is refused as unknown.
    std::fs::write(
        &p.config,
        format!("{original}destinations:\n  - {{name: meta_capi, enabled: false}}\n"),
    )
    .unwrap();
    hup();
    let mut status = 0;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        status = send(p.proxy, Req::get("graph.facebook.com", "/v19.0/me"))
            .await
            .status;
        if status == 403 {
            break;
        }
    }
    assert_eq!(status, 403, "reloaded config disables meta_capi");

    // A broken config is refused and the last good one keeps serving.
    std::fs::write(
        &p.config,
        format!("{original}destinations: 7\nbogus_key: 1\n"),
    )
    .unwrap();
    hup();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        send(p.proxy, Req::get("graph.facebook.com", "/v19.0/me"))
            .await
            .status,
        403
    );
    let m = String::from_utf8(admin_get(&p, "/metrics").await.body).unwrap();
    assert!(
        m.contains(r#"consentgate_config_reloads_total{result="failure"} 1"#),
        "{m}"
    );
    assert!(
        m.contains(r#"consentgate_config_reloads_total{result="success"} 1"#),
        "{m}"
    );
    let log = std::fs::read_to_string(&p.log).unwrap();
    assert!(
        log.contains("configuration reload refused") && log.contains("bogus_key"),
        "{log}"
    );
}
