//! The SDK compatibility suite (issue 17, SPEC §7 "Refusals in the vendor's
//! shape"): the vendors' own client libraries, from PyPI and npm, send through
//! the real consentgate binary to the recording TLS upstream, routed and
//! trusting the interception CA the way each SDK needs (docs/SDKS.md).
//!
//! Each SDK runs three cases, one test each (`<sdk>::<case>`):
//! - `granted`: P-1001 only; the SDK returns normally and P-1001 arrives.
//! - `mixed`: P-1001, P-1002 (denied) and an unknown address; the SDK returns
//!   normally for the kept part, and no form of a dropped identifier arrives.
//! - `denied`: P-1002 only; nothing arrives, and the refusal surfaces as the
//!   SDK's own error type with `consentgate: blocked_by_consent_policy` in the
//!   message the SDK hands the app.
//!
//! The SDKs are installed by scripts/sdk-deps (a venv in .venv-sdk/, npm
//! packages in tests/sdk/node_modules/, every version pinned), which this test
//! runs first; a missing python3 or node fails the suite, it is never skipped.
//! The drivers are tests/sdk/sdk_py.py and tests/sdk/sdk_node.js.

mod common;
use common::*;
use serde_json::Value;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const GRANTED: &[&str] = &["jane.roe@example.com", "+14155550100"];
/// P-1002 (every category denied) and an address that names nobody.
const DROPPED: &[&str] = &[
    "deny.me@example.com",
    "+14155550102",
    "unknown.person@example.com",
    "+15555550199",
];
const BLOCKED_MSG: &str = "consentgate: blocked_by_consent_policy";

#[derive(Clone, Copy, Debug, PartialEq)]
enum Lang {
    Python,
    Node,
}

/// How the SDK is sent through the proxy.
#[derive(Clone, Copy, Debug)]
enum Route {
    /// `HTTPS_PROXY` (requests, urllib, axios).
    HttpsProxyEnv,
    /// `HTTP_PROXY` only: twilio-node reads nothing else.
    HttpProxyEnv,
    /// The SDK reads no proxy variable; the driver sets the SDK's own option
    /// from `HTTPS_PROXY` (TikTok's `Configuration.proxy`).
    OwnOption,
}

/// How the SDK is told to trust the interception CA.
#[derive(Clone, Copy, Debug)]
enum Trust {
    /// `REQUESTS_CA_BUNDLE` (requests; overrides Meta's pinned fb_ca_chain_bundle.crt).
    RequestsCaBundle,
    /// `SSL_CERT_FILE` (OpenSSL's default paths: urllib).
    SslCertFile,
    /// `NODE_EXTRA_CA_CERTS` (Node's TLS default).
    NodeExtraCaCerts,
    /// The SDK's own option (`Configuration.ssl_ca_cert`), from `CONSENTGATE_CA`.
    OwnOption,
}

#[derive(Clone, Copy, Debug)]
struct Sdk {
    lang: Lang,
    /// The driver's name for it.
    name: &'static str,
    route: Route,
    trust: Trust,
    /// The error type the SDK raises for a refusal (Python: module.Class;
    /// Node: the constructor's name).
    exc_type: &'static str,
    host: &'static str,
    /// Every request of the granted case goes to a path with this prefix.
    path_prefix: &'static str,
    /// A vendor success answer the SDK accepts.
    ok_status: u16,
    ok_body: &'static str,
}

fn meta_py() -> Sdk {
    Sdk {
        lang: Lang::Python,
        name: "meta",
        route: Route::HttpsProxyEnv,
        trust: Trust::RequestsCaBundle,
        exc_type: "facebook_business.exceptions.FacebookRequestError",
        host: "graph.facebook.com",
        path_prefix: "/v26.0/1234567890/events",
        ok_status: 200,
        ok_body: r#"{"events_received":1,"messages":[],"fbtrace_id":"AbCdEf"}"#,
    }
}

fn twilio_py() -> Sdk {
    Sdk {
        lang: Lang::Python,
        name: "twilio",
        route: Route::HttpsProxyEnv,
        trust: Trust::RequestsCaBundle,
        exc_type: "twilio.base.exceptions.TwilioRestException",
        host: "api.twilio.com",
        path_prefix: "/2010-04-01/Accounts/AC00000000000000000000000000000000/Messages.json",
        ok_status: 201,
        ok_body: r#"{"sid":"SM00000000000000000000000000000000","status":"queued"}"#,
    }
}

fn sendgrid_py() -> Sdk {
    Sdk {
        lang: Lang::Python,
        name: "sendgrid",
        route: Route::HttpsProxyEnv,
        trust: Trust::SslCertFile,
        exc_type: "python_http_client.exceptions.HTTPError",
        host: "api.sendgrid.com",
        path_prefix: "/v3/mail/send",
        ok_status: 202,
        ok_body: "",
    }
}

fn mandrill_py() -> Sdk {
    Sdk {
        lang: Lang::Python,
        name: "mandrill",
        route: Route::HttpsProxyEnv,
        trust: Trust::RequestsCaBundle,
        exc_type: "mailchimp_transactional.api_client.ApiClientError",
        host: "mandrillapp.com",
        path_prefix: "/api/1.3/messages/send.json",
        ok_status: 200,
        ok_body: r#"[{"status":"sent","_id":"0a1b2c","reject_reason":null}]"#,
    }
}

fn tiktok_py() -> Sdk {
    Sdk {
        lang: Lang::Python,
        name: "tiktok",
        route: Route::OwnOption,
        trust: Trust::OwnOption,
        // TikTok's own error, raised on HTTP 200 with a non-zero `code`: how
        // TikTok reports errors, and so how consentgate answers it.
        exc_type: "business_api_client.tiktok_business.tiktok_exceptions.TiktokSDKError",
        host: "business-api.tiktok.com",
        path_prefix: "/open_api/v1.3/pixel/",
        ok_status: 200,
        ok_body: r#"{"code":0,"message":"OK","request_id":"r-1","data":{}}"#,
    }
}

fn twilio_node() -> Sdk {
    Sdk {
        lang: Lang::Node,
        route: Route::HttpProxyEnv,
        trust: Trust::NodeExtraCaCerts,
        exc_type: "RestException",
        ..twilio_py()
    }
}

fn sendgrid_node() -> Sdk {
    Sdk {
        lang: Lang::Node,
        route: Route::HttpsProxyEnv,
        trust: Trust::NodeExtraCaCerts,
        exc_type: "ResponseError",
        ..sendgrid_py()
    }
}

fn meta_node() -> Sdk {
    Sdk {
        lang: Lang::Node,
        route: Route::HttpsProxyEnv,
        trust: Trust::NodeExtraCaCerts,
        exc_type: "FacebookRequestError",
        path_prefix: "/v24.0/1234567890/events",
        ..meta_py()
    }
}

/// Installs the SDKs once per test process (scripts/sdk-deps is idempotent).
fn deps() {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    let r = DONE.get_or_init(|| {
        let out = Command::new(repo().join("scripts/sdk-deps"))
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run scripts/sdk-deps: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "scripts/sdk-deps failed ({}):\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    });
    if let Err(e) = r {
        panic!("{e}");
    }
}

/// Variables that could route or trust anything on their own: cleared, so each
/// SDK gets only what its row in docs/SDKS.md says it needs.
const SCRUB: &[&str] = &[
    "HTTPS_PROXY",
    "https_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "ALL_PROXY",
    "all_proxy",
    "NO_PROXY",
    "no_proxy",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "NODE_EXTRA_CA_CERTS",
    "NODE_OPTIONS",
    "NODE_USE_ENV_PROXY",
    "TWILIO_CA_BUNDLE",
    "CONSENTGATE_CA",
];

/// Run the driver for `sdk` and `case`; the outcome of each API call.
fn run_driver(dir: &Path, proxy: SocketAddr, sdk: Sdk, case: &str) -> Vec<Value> {
    let ca = dir.join("certs/ca.pem");
    assert!(ca.exists(), "the proxy wrote its interception CA");
    let proxy_url = format!("http://{proxy}");
    let mut cmd = match sdk.lang {
        Lang::Python => {
            let mut c = Command::new(repo().join(".venv-sdk/bin/python"));
            c.arg(repo().join("tests/sdk/sdk_py.py"));
            c
        }
        Lang::Node => {
            let mut c = Command::new("node");
            c.arg(repo().join("tests/sdk/sdk_node.js"));
            c
        }
    };
    cmd.args([sdk.name, case])
        .current_dir(repo().join("tests/sdk"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for v in SCRUB {
        cmd.env_remove(v);
    }
    match sdk.route {
        Route::HttpsProxyEnv | Route::OwnOption => cmd.env("HTTPS_PROXY", &proxy_url),
        Route::HttpProxyEnv => cmd.env("HTTP_PROXY", &proxy_url),
    };
    match sdk.trust {
        Trust::RequestsCaBundle => cmd.env("REQUESTS_CA_BUNDLE", &ca),
        Trust::SslCertFile => cmd.env("SSL_CERT_FILE", &ca),
        Trust::NodeExtraCaCerts => cmd.env("NODE_EXTRA_CA_CERTS", &ca),
        Trust::OwnOption => cmd.env("CONSENTGATE_CA", &ca),
    };
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start the {:?} driver: {e}", sdk.lang));
    // Bounded: an SDK that hangs fails the case instead of the whole run.
    let deadline = Instant::now() + Duration::from_secs(90);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{} {case}: the driver did not finish in 90 s", sdk.name);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        status.success(),
        "{:?} {} {case}: driver exited {status}\nstdout: {stdout}\nstderr: {stderr}",
        sdk.lang,
        sdk.name
    );
    let line = stdout.lines().last().unwrap_or_default();
    let v: Value = serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("driver output is not JSON ({e}): {stdout}\nstderr: {stderr}"));
    v["calls"].as_array().cloned().expect("calls")
}

async fn driver(p: &Proxy, sdk: Sdk, case: &'static str) -> Vec<Value> {
    // The SDK blocks; the recording upstream runs on this runtime meanwhile.
    let (dir, addr) = (p.dir.clone(), p.proxy);
    tokio::task::spawn_blocking(move || run_driver(&dir, addr, sdk, case))
        .await
        .unwrap()
}

async fn setup(name: &str, sdk: Sdk, opts: ProxyOpts) -> (Proxy, Upstream) {
    deps();
    let dir = test_dir(&format!("sdk.{name}"));
    let ca = test_ca(&dir.join("upstream"), VENDOR_HOSTS);
    let up = start_upstream(&ca).await;
    up.set(Behavior::Respond {
        status: sdk.ok_status,
        body: sdk.ok_body,
    });
    let p = start_proxy(&dir, &up, &ca, opts);
    (p, up)
}

/// Everything the upstream received, as one text for leak searches.
fn wire_text(up: &Upstream) -> Vec<u8> {
    let mut all = Vec::new();
    for r in up.requests() {
        all.extend_from_slice(r.path_and_query.as_bytes());
        all.push(b'\n');
        for (k, v) in &r.headers {
            all.extend_from_slice(format!("{k}: {v}\n").as_bytes());
        }
        all.extend_from_slice(&r.body);
        all.push(b'\n');
    }
    all
}

/// Whether some form (plain, SHA-256, MD5, E.164 hash) of `id` is in `bytes`.
/// Form bodies percent-encode `@` and `+`, so those are decoded first.
fn has_form(bytes: &[u8], id: &str) -> bool {
    let text = String::from_utf8_lossy(bytes).to_lowercase();
    let decoded = text.replace("%40", "@").replace("%2b", "+");
    forms(id)
        .iter()
        .any(|f| text.contains(&f.to_lowercase()) || decoded.contains(&f.to_lowercase()))
}

fn assert_sent_to(up: &Upstream, sdk: Sdk) {
    for r in up.requests() {
        assert_eq!(r.sni.as_deref(), Some(sdk.host), "{r:?}");
        assert!(
            r.path_and_query.starts_with(sdk.path_prefix),
            "{}: {} does not start with {}",
            sdk.name,
            r.path_and_query,
            sdk.path_prefix
        );
    }
}

fn assert_ok(calls: &[Value], what: &str) {
    assert!(
        calls[0]["ok"] == true,
        "{what}: the SDK raised {}",
        calls[0]
    );
}

/// The refusal surfaced as the SDK's own error type, with consentgate's
/// message in what the SDK hands the app.
fn assert_refused(call: &Value, sdk: Sdk, what: &str) {
    assert!(call["ok"] == false, "{what}: the SDK returned normally");
    assert_eq!(
        call["exc_type"], sdk.exc_type,
        "{what}: not the SDK's own error type: {call}"
    );
    let msg = call["sdk_message"].as_str().unwrap_or_default();
    assert!(
        msg.contains(BLOCKED_MSG),
        "{what}: the SDK's message does not carry {BLOCKED_MSG:?}: {call}"
    );
}

async fn granted(sdk: Sdk, name: &str) {
    let (p, up) = setup(name, sdk, ProxyOpts::default()).await;
    let calls = driver(&p, sdk, "granted").await;
    assert_ok(&calls, name);
    assert_eq!(up.count(), 1, "{name}: one request upstream");
    assert_sent_to(&up, sdk);
    let wire = wire_text(&up);
    assert!(
        has_form(&wire, GRANTED[0]) || has_form(&wire, GRANTED[1]),
        "{name}: P-1001 did not arrive"
    );
}

async fn mixed(sdk: Sdk, name: &str) {
    let (p, up) = setup(name, sdk, ProxyOpts::default()).await;
    let calls = driver(&p, sdk, "mixed").await;
    assert_ok(&calls, name);
    // What arrived first: that holds whatever shape the refusals take.
    assert_eq!(up.count(), 1, "{name}: only the kept request went upstream");
    assert_sent_to(&up, sdk);
    let wire = wire_text(&up);
    assert!(
        has_form(&wire, GRANTED[0]) || has_form(&wire, GRANTED[1]),
        "{name}: P-1001 did not arrive"
    );
    assert_absent(&wire, DROPPED, name);
    for id in DROPPED {
        assert!(!has_form(&wire, id), "{name}: a form of {id} arrived");
    }
    // SDKs with one recipient per call (Twilio) make one call per person: the
    // later ones are refusals and must surface as such.
    for (i, c) in calls.iter().enumerate().skip(1) {
        assert_refused(c, sdk, &format!("{name} call {i}"));
    }
}

async fn denied(sdk: Sdk, name: &str) {
    let (p, up) = setup(name, sdk, ProxyOpts::default()).await;
    let calls = driver(&p, sdk, "denied").await;
    assert_eq!(up.count(), 0, "{name}: nothing may go upstream");
    for c in &calls {
        assert_refused(c, sdk, name);
    }
}

/// The three cases for one SDK, as `<sdk>::<case>` tests.
macro_rules! sdk_cases {
    ($sdk:ident) => {
        mod $sdk {
            const NAME: &str = stringify!($sdk);
            #[tokio::test(flavor = "multi_thread")]
            async fn granted() {
                super::granted(super::$sdk(), NAME).await
            }
            #[tokio::test(flavor = "multi_thread")]
            async fn mixed() {
                super::mixed(super::$sdk(), NAME).await
            }
            #[tokio::test(flavor = "multi_thread")]
            async fn denied() {
                super::denied(super::$sdk(), NAME).await
            }
        }
    };
}

sdk_cases!(meta_py);
sdk_cases!(twilio_py);
sdk_cases!(sendgrid_py);
sdk_cases!(mandrill_py);
sdk_cases!(tiktok_py);
sdk_cases!(twilio_node);
sdk_cases!(sendgrid_node);
sdk_cases!(meta_node);
