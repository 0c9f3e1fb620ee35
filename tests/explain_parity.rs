//! Issue 15 acceptance 1: `explain` and the running proxy render one enforcement
//! plan. Each case goes through the real proxy to the recording upstream and
//! through `consentgate explain` with the same config; decision, status, error
//! code and the exact bytes the upstream received (length and SHA-256) must agree.
//! The cases include the three disagreements issue 15 names (shadow with every
//! event dropped, an oversized body with an unknown Content-Encoding, the
//! PostgreSQL consent source), every refusal of README's table that is decided
//! before anything is sent, and `on_blocked: synthetic_ok`. The others are
//! conditions of the moment, not of the request, so `explain` cannot be asked
//! them: 408 `request_timeout` and 431 `headers_too_large` (how the head or body
//! arrived, refused by the listener before a request exists), 503 `overloaded`
//! and `audit_unavailable` (the process's load and disk), 502
//! `upstream_unavailable` and 504 `upstream_timeout` (the vendor); tests/limits.rs
//! and tests/audit_state.rs cover them against the running binary.

mod common;
use common::*;
use serde_json::{json, Value};
use sha2::Digest;
use std::io::Write;
use std::path::Path;

/// One request as both sides get it.
struct Case {
    name: &'static str,
    method: &'static str,
    host: &'static str,
    path: &'static str,
    headers: Vec<(&'static str, &'static str)>,
    body: Vec<u8>,
}

impl Case {
    fn post(name: &'static str, host: &'static str, path: &'static str, body: Value) -> Case {
        Case {
            name,
            method: "POST",
            host,
            path,
            headers: vec![("content-type", "application/json")],
            body: body.to_string().into_bytes(),
        }
    }
    fn header(mut self, k: &'static str, v: &'static str) -> Case {
        self.headers.retain(|(n, _)| !n.eq_ignore_ascii_case(k));
        self.headers.push((k, v));
        self
    }
    fn body(mut self, b: Vec<u8>) -> Case {
        self.body = b;
        self
    }
    fn raw(&self) -> Vec<u8> {
        let mut out = format!(
            "{} {} HTTP/1.1\r\nHost: {}\r\n",
            self.method, self.path, self.host
        );
        for (k, v) in &self.headers {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
        if !self.body.is_empty() {
            out.push_str(&format!("Content-Length: {}\r\n", self.body.len()));
        }
        out.push_str("\r\n");
        let mut b = out.into_bytes();
        b.extend_from_slice(&self.body);
        b
    }
    fn req(&self) -> Req {
        let mut r = Req::get(self.host, self.path);
        r.method = self.method;
        r.body = self.body.clone();
        r.headers = self
            .headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        r
    }
}

fn meta_events(emails: &[&str]) -> Value {
    let data: Vec<Value> = emails
        .iter()
        .enumerate()
        .map(|(i, e)| {
            json!({"event_name": "Lead", "event_time": 1763600000, "event_id": format!("e{i}"),
                   "action_source": "website", "event_source_url": "https://hospital.example/oncology",
                   "user_data": {"em": [e]}, "custom_data": {"content_name": "Oncology"}})
        })
        .collect();
    json!({ "data": data })
}

fn gzip(b: &[u8]) -> Vec<u8> {
    let mut w = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    w.write_all(b).unwrap();
    w.finish().unwrap()
}

fn explain(p: &Proxy, case: &Case) -> Value {
    let file = p.dir.join(format!("{}.http", case.name));
    std::fs::write(&file, case.raw()).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_consentgate"))
        .args(["explain", "--config"])
        .arg(&p.config)
        .arg("--request")
        .arg(&file)
        .current_dir(&p.dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}: explain failed: {}",
        case.name,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Run every case through the proxy and `explain` and compare.
async fn compare(p: &Proxy, up: &Upstream, cases: &[Case]) -> Vec<(String, Value)> {
    let mut seen = Vec::new();
    for case in cases {
        let trace = explain(p, case);
        let before = up.count();
        let resp = send(p.proxy, case.req()).await;
        let n = case.name;
        assert_eq!(
            trace["decision"],
            resp.decision(),
            "{n}: decision; {trace:#}"
        );
        if resp.decision() == "blocked" {
            assert_eq!(up.count(), before, "{n}: nothing went upstream");
            assert_eq!(trace["status"], resp.status, "{n}: status; {trace:#}");
            if let Ok(body) = serde_json::from_slice::<Value>(&resp.body) {
                let contract = body.get("consentgate").unwrap_or(&body);
                if let Some(code) = contract.get("error") {
                    assert_eq!(&trace["error"], code, "{n}: error code");
                }
            }
        } else {
            assert_eq!(up.count(), before + 1, "{n}: one request upstream");
            let got = up.last().body;
            assert_eq!(trace["upstream_body"]["bytes"], got.len(), "{n}: length");
            assert_eq!(
                trace["upstream_body"]["sha256"],
                hex::encode(sha2::Sha256::digest(&got)),
                "{n}: explain's upstream bytes are the bytes the upstream received"
            );
        }
        seen.push((n.to_string(), trace));
    }
    seen
}

fn codes(seen: &[(String, Value)]) -> Vec<String> {
    seen.iter()
        .filter_map(|(_, t)| t["error"].as_str().map(str::to_string))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn explain_agrees_with_the_proxy_on_every_case() {
    let dir = test_dir("parity");
    let ca = test_ca(&dir.join("upstream"), VENDOR_HOSTS);
    let up = start_upstream(&ca).await;
    let p = start_proxy(&dir, &up, &ca, ProxyOpts::default());
    let mixed = meta_events(&[
        "jane.roe@example.com",
        "deny.me@example.com",
        "unknown.person@example.com",
        "opt.out@example.com",
        "limited@example.com",
    ]);
    let hashed_jane = hex::encode(sha2::Sha256::digest(b"jane.roe@example.com"));
    let events = "/v19.0/1/events";
    let meta = "graph.facebook.com";
    let cases = vec![
        Case::post("meta_mixed", meta, events, mixed.clone()),
        Case::post(
            "meta_granted_prehashed",
            meta,
            events,
            json!({"data": [{"event_name": "Lead", "event_time": 1763600000, "action_source": "website",
                             "user_data": {"em": [hashed_jane]}}]}),
        ),
        Case::post(
            "meta_all_denied",
            meta,
            events,
            meta_events(&["deny.me@example.com"]),
        ),
        Case::post("meta_gzip_mixed", meta, events, json!(null))
            .header("content-encoding", "gzip")
            .body(gzip(mixed.to_string().as_bytes())),
        Case::post("unreadable", meta, events, json!(null)).body(b"{\"data\": [".to_vec()),
        Case::post("unknown_encoding", meta, events, mixed.clone())
            .header("content-encoding", "snappy"),
        Case::post(
            "bypass_list_management",
            "api.sendgrid.com",
            "/v3/mail/send",
            json!({"personalizations": [{"to": [{"email": "jane.roe@example.com"}]}],
                   "from": {"email": "news@hospital.example"}, "subject": "x",
                   "content": [{"type": "text/plain", "value": "x"}],
                   "mail_settings": {"bypass_list_management": {"enable": true}}}),
        ),
        Case::post(
            "uninspected_endpoint",
            meta,
            "/v19.0/me/adaccounts",
            json!({"name": "x"}),
        ),
        Case::post("bad_category", meta, events, mixed.clone())
            .header("x-consent-category", "astrology"),
        Case::post(
            "unknown_destination",
            "unknown.example",
            "/collect",
            json!({"a": 1}),
        ),
        Case {
            name: "bodiless_get",
            method: "GET",
            host: meta,
            path: "/v19.0/me",
            headers: vec![],
            body: vec![],
        },
        Case::post(
            "tiktok_mixed",
            "business-api.tiktok.com",
            "/open_api/v1.3/event/track/",
            json!({"event_source": "web", "event_source_id": "PX", "data": [
                {"event": "ViewContent", "event_time": 1763600000, "event_id": "t1", "user": {"email": ["jane.roe@example.com"]}},
                {"event": "ViewContent", "event_time": 1763600000, "event_id": "t2", "user": {"email": ["deny.me@example.com"]}},
                {"event": "ViewContent", "event_time": 1763600000, "event_id": "t3", "user": {"email": ["gpc.user@example.com"]}}]}),
        ),
        Case::post(
            "sendgrid_mixed",
            "api.sendgrid.com",
            "/v3/mail/send",
            json!({"personalizations": [{"to": [{"email": "jane.roe@example.com"}]}, {"to": [{"email": "deny.me@example.com"}]}],
                   "from": {"email": "news@hospital.example"}, "subject": "Newsletter",
                   "content": [{"type": "text/plain", "value": "Hello"}]}),
        ),
        // The egress guard (issue 16): a denied patient outside every event, a query
        // parameter the adapter does not read, a query to an uninspected endpoint,
        // a look-alike identity key; SendGrid's other bypass flags; gRPC.
        Case::post("foreign_identifier", meta, events, {
            let mut m = meta_events(&["jane.roe@example.com"]);
            m["partner_agent"] = json!("for deny.me@example.com");
            m
        }),
        Case::post(
            "unread_query_param",
            meta,
            "/v19.0/1/events?data=%5B%5D",
            meta_events(&["jane.roe@example.com"]),
        ),
        Case {
            name: "query_to_uninspected_endpoint",
            method: "GET",
            host: meta,
            path: "/v19.0/1/events?method=post&data=%5B%5D",
            headers: vec![],
            body: vec![],
        },
        Case::post(
            "look_alike_key",
            meta,
            events,
            json!({"data": [{"event_name": "Lead", "event_time": 1763600000, "action_source": "website",
                             "user_data": {"em": ["jane.roe@example.com"], "EM": ["deny.me@example.com"]}}]}),
        ),
        Case::post(
            "bypass_spam_management",
            "api.sendgrid.com",
            "/v3/mail/send",
            json!({"personalizations": [{"to": [{"email": "jane.roe@example.com"}]}],
                   "from": {"email": "news@hospital.example"}, "subject": "x",
                   "content": [{"type": "text/plain", "value": "x"}],
                   "mail_settings": {"bypass_spam_management": {"enable": "true"}}}),
        ),
        Case::post(
            "grpc_not_inspected",
            "googleads.googleapis.com",
            "/google.ads.googleads.v17.services.ConversionUploadService/UploadClickConversions",
            json!(null),
        )
        .header("content-type", "application/grpc")
        .body(vec![0, 0, 0, 0, 2, 8, 1]),
    ];
    let seen = compare(&p, &up, &cases).await;
    let found = codes(&seen);
    for code in [
        "blocked_by_consent_policy",
        "unreadable_body",
        "unsupported_content_encoding",
        "bypass_list_management",
        "uninspected_endpoint",
        "bad_request",
        "unknown_destination",
        "foreign_identifier",
        "bypass_spam_management",
        "grpc_not_inspected",
    ] {
        assert!(
            found.iter().any(|c| c == code),
            "no case for {code}: {found:?}"
        );
    }
}

/// Issue 15's first two disagreements: a shadow destination whose events are all
/// dropped (the proxy forwards the original bytes), and an oversized body with an
/// unknown Content-Encoding (413 on both sides); plus synthetic_ok.
#[tokio::test(flavor = "multi_thread")]
async fn shadow_oversized_and_synthetic_ok_agree() {
    let dir = test_dir("parity-shadow");
    let ca = test_ca(&dir.join("upstream"), VENDOR_HOSTS);
    let up = start_upstream(&ca).await;
    let opts = ProxyOpts {
        extra_yaml: "max_body_bytes: 2KiB\ndestinations:\n  - {name: meta_capi, mode: shadow}\n  - {name: tiktok_events, on_blocked: synthetic_ok}\n".into(),
        ..Default::default()
    };
    let p = start_proxy(&dir, &up, &ca, opts);
    let big = meta_events(&["deny.me@example.com"; 40]);
    assert!(big.to_string().len() > 2048);
    let cases = vec![
        Case::post(
            "shadow_all_dropped",
            "graph.facebook.com",
            "/v19.0/1/events",
            meta_events(&["deny.me@example.com", "unknown.person@example.com"]),
        ),
        Case::post(
            "oversized_unknown_encoding",
            "graph.facebook.com",
            "/v19.0/1/events",
            big,
        )
        .header("content-encoding", "snappy"),
        Case::post(
            "synthetic_ok",
            "business-api.tiktok.com",
            "/open_api/v1.3/event/track/",
            json!({"event_source": "web", "event_source_id": "PX", "data": [
                {"event": "ViewContent", "event_time": 1763600000, "user": {"email": ["deny.me@example.com"]}}]}),
        ),
    ];
    let seen = compare(&p, &up, &cases).await;
    assert_eq!(seen[0].1["decision"], "allowed");
    assert_eq!(seen[1].1["status"], 413);
    assert_eq!(seen[2].1["status"], 200);
}

/// Issue 15's third disagreement: explain reads the configured PostgreSQL source
/// (a patient who is only in the database is found, as the proxy finds them).
#[tokio::test(flavor = "multi_thread")]
async fn explain_reads_the_postgres_source() {
    let dir = test_dir("parity-pg");
    let ca = test_ca(&dir.join("upstream"), VENDOR_HOSTS);
    let up = start_upstream(&ca).await;
    let schema = format!("cgt_parity_{}", std::process::id());
    psql(&format!(
        "DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}"
    ));
    let url = format!(
        "postgres://postgres@127.0.0.1:5432/test?application_name=cgt-parity&options=-c%20search_path%3D{schema}"
    );
    let opts = ProxyOpts {
        consent_yaml: Some(format!(
            "consent:\n  source: postgres\n  max_staleness: 5m\n  postgres:\n    url: \"{url}\"\n"
        )),
        ..Default::default()
    };
    let (pp, ap) = (free_port(), free_port());
    let config = dir.join("consentgate.yaml");
    std::fs::write(&config, config_yaml(&dir, up.addr, &ca, &opts, pp, ap)).unwrap();
    migrate(&dir, &config);
    let p = spawn_proxy(&dir, &config, pp, ap);
    let put = |id: &str, email: &str, ads: &str| {
        let body = json!({"identifiers": {"emails": [email]}, "categories": {"advertising": ads},
                          "updated_at": "2026-11-21T10:00:00Z", "source": "test"});
        Req {
            method: "PUT",
            host: "admin".into(),
            path: format!("/v1/consent/{id}"),
            headers: vec![
                (
                    "authorization".into(),
                    "Bearer example-preference-center-token".into(),
                ),
                ("content-type".into(), "application/json".into()),
            ],
            body: body.to_string().into_bytes(),
            absolute: false,
        }
    };
    for (id, email, ads) in [
        ("PG-1", "only.in.pg@example.com", "granted"),
        ("PG-2", "denied.in.pg@example.com", "denied"),
    ] {
        let r = send(p.admin, put(id, email, ads)).await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    }
    let cases = vec![
        Case::post(
            "pg_granted",
            "graph.facebook.com",
            "/v19.0/1/events",
            meta_events(&["only.in.pg@example.com", "denied.in.pg@example.com"]),
        ),
        Case::post(
            "pg_denied",
            "graph.facebook.com",
            "/v19.0/1/events",
            meta_events(&["denied.in.pg@example.com"]),
        ),
    ];
    let seen = compare(&p, &up, &cases).await;
    assert_eq!(seen[0].1["decision"], "modified", "{:#}", seen[0].1);
    assert_eq!(seen[0].1["events"][0]["reason"], "granted");
    drop(p);
    psql(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"));
}

fn psql(sql: &str) {
    let out = std::process::Command::new("psql")
        .args([
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-d",
            "test",
            "-v",
            "ON_ERROR_STOP=1",
            "-q",
            "-c",
            sql,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "psql: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn migrate(dir: &Path, config: &Path) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_consentgate"))
        .args(["db", "migrate", "--config"])
        .arg(config)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "db migrate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
