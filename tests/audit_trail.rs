//! Issue 6 acceptance: the hash-chained audit trail, explain and shadow mode,
//! through the real binary.

mod common;
use common::*;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_consentgate"))
}

fn verify(paths: &[&Path], key: Option<&Path>) -> (bool, String) {
    let mut c = bin();
    c.args(["audit", "verify"]).args(paths);
    if let Some(k) = key {
        c.arg("--key-file").arg(k);
    }
    let out = c.output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The audit files of `dir` in chain order (not the `.lock` file beside them).
fn audit_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            name.starts_with("audit-") && name.ends_with(".jsonl")
        })
        .collect();
    v.sort();
    v
}

fn meta_batch(emails: &[&str]) -> String {
    let events: Vec<Value> = emails
        .iter()
        .enumerate()
        .map(|(i, e)| json!({"event_name": "Lead", "event_time": 1763600000, "event_id": format!("e{i}"),
                             "action_source": "website", "event_source_url": "https://hospital.example/oncology",
                             "user_data": {"em": [e]}, "custom_data": {"content_name": "Oncology"}}))
        .collect();
    json!({"data": events}).to_string()
}

async fn mixed_traffic(p: &Proxy) {
    let all = [
        "jane.roe@example.com",
        "deny.me@example.com",
        "unknown.person@example.com",
        "opt.out@example.com",
        "limited@example.com",
    ];
    for _ in 0..3 {
        send(
            p.proxy,
            Req::post("graph.facebook.com", "/v19.0/1/events", meta_batch(&all)),
        )
        .await;
    }
    send(
        p.proxy,
        Req::post(
            "graph.facebook.com",
            "/v19.0/1/events",
            meta_batch(&["deny.me@example.com"]),
        ),
    )
    .await;
    send(
        p.proxy,
        Req::post("graph.facebook.com", "/v19.0/1/events", "{broken"),
    )
    .await;
    send(p.proxy, Req::get("unknown.example", "/")).await;
    let mut put = Req::post(
        "admin",
        "/v1/consent/P-1016",
        r#"{"categories":{"advertising":"granted"}}"#,
    )
    .header("authorization", "Bearer example-ops-token");
    put.method = "PUT";
    assert_eq!(send(p.admin, put).await.status, 200);
}

/// Stop the proxy cleanly so the writer flushes everything.
fn stop(mut p: Proxy) -> PathBuf {
    let pid = p.child.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let _ = p.child.wait();
    p.dir.join("audit")
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_passes_after_traffic_and_names_every_kind_of_tampering() {
    let dir = test_dir("audit-verify");
    let ca = test_ca(&dir.join("upstream"), VENDOR_HOSTS);
    let up = start_upstream(&ca).await;
    let p = start_proxy(&dir, &up, &ca, ProxyOpts::default());
    mixed_traffic(&p).await;
    let audit = stop(p);
    let (ok, out) = verify(&[&audit], None);
    assert!(ok, "{out}");
    let files = audit_files(&audit);
    let text: String = files
        .iter()
        .map(|f| std::fs::read_to_string(f).unwrap())
        .collect();
    let records: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(records.len() >= 10, "{} records", records.len());
    assert_eq!(records[0]["prev_hash"], "0".repeat(64));
    // Each event rides on its request's `decision` record (`events`, in payload
    // order, with the request's category): read them as records of their own.
    let mut lines = records.clone();
    for r in &records {
        for ev in r["events"].as_array().into_iter().flatten() {
            assert!(ev["rule"].is_string() && ev["reason"].is_string(), "{ev}");
            let mut e = ev.clone();
            e["kind"] = r["kind"].clone();
            e["category"] = r["category"].clone();
            e["request_id"] = r["request_id"].clone();
            lines.push(e);
        }
    }
    assert!(lines.iter().any(|l| l["kind"] == "config"));
    let change = lines
        .iter()
        .find(|l| l["kind"] == "consent_change")
        .expect("consent change audited");
    assert_eq!(change["actor"], "ops");
    assert_ne!(change["patient"], "P-1016");
    let dropped = lines.iter().filter(|l| l["decision"] == "dropped").count();
    assert_eq!(
        dropped,
        3 * 2 + 1,
        "denied + unknown per mixed batch, plus the lone denied event"
    );
    let tagged = lines
        .iter()
        .find(|l| l["reason"] == "sale_share_opt_out")
        .unwrap();
    assert_eq!(tagged["rule"], "policy.3_sale_share");
    assert!(
        tagged["flags_set"]
            .as_array()
            .is_some_and(|f| !f.is_empty()),
        "{tagged}"
    );
    assert!(lines
        .iter()
        .any(|l| l["reason"] == "unreadable_body" && l["decision"] == "blocked"));
    assert!(lines.iter().any(|l| l["reason"] == "unknown_destination"));

    // Each kind of tampering, on a copy, fails naming the record.
    let original = std::fs::read(&files[0]).unwrap();
    let tamper = |name: &str, f: &dyn Fn(&[u8]) -> Vec<u8>| -> String {
        let d = dir.join(format!("tamper-{name}"));
        std::fs::create_dir_all(&d).unwrap();
        let target = d.join(files[0].file_name().unwrap());
        std::fs::write(&target, f(&original)).unwrap();
        let (ok, out) = verify(&[&target], None);
        assert!(!ok, "{name}: tampering not detected: {out}");
        out
    };
    let out = tamper("flip", &|b| {
        let mut v = b.to_vec();
        let i = v.iter().position(|c| *c == b'"').unwrap() + 300.min(v.len() / 2);
        v[i] ^= 0x01;
        v
    });
    assert!(out.contains("line"), "{out}");
    let out = tamper("delete", &|b| {
        let lines: Vec<&[u8]> = b.split(|c| *c == b'\n').collect();
        let mut v: Vec<&[u8]> = lines.clone();
        v.remove(3);
        v.join(&b'\n')
    });
    assert!(out.contains("line 4"), "{out}");
    let out = tamper("swap", &|b| {
        let mut lines: Vec<&[u8]> = b.split(|c| *c == b'\n').collect();
        lines.swap(2, 3);
        lines.join(&b'\n')
    });
    assert!(out.contains("line 3"), "{out}");
    let out = tamper("truncate", &|b| b[..b.len() - 25].to_vec());
    assert!(out.to_lowercase().contains("torn"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_then_restart_keeps_the_chain_verifiable() {
    let dir = test_dir("audit-kill9");
    let ca = test_ca(&dir.join("upstream"), VENDOR_HOSTS);
    let up = start_upstream(&ca).await;
    let mut p = start_proxy(&dir, &up, &ca, ProxyOpts::default());
    let proxy = p.proxy;
    let load = tokio::spawn(async move {
        for _ in 0..200 {
            send(
                proxy,
                Req::post(
                    "graph.facebook.com",
                    "/v19.0/1/events",
                    meta_batch(&["jane.roe@example.com", "deny.me@example.com"]),
                ),
            )
            .await;
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    Command::new("kill")
        .args(["-9", &p.child.id().to_string()])
        .status()
        .unwrap();
    let _ = p.child.wait();
    let _ = load.await;
    let audit = p.dir.join("audit");
    // Simulate a write torn by the crash: a partial last line.
    let last = audit_files(&audit).pop().unwrap();
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&last)
        .unwrap();
    std::io::Write::write_all(
        &mut f,
        br#"{"ts":"2026-11-22T10:00:00Z","request_id":"torn"#,
    )
    .unwrap();
    drop(f);
    let (ok, out) = verify(&[&audit], None);
    assert!(
        !ok && out.to_lowercase().contains("torn"),
        "a torn tail is reported, not accepted: {out}"
    );
    // Restart: the tail is cut and a recovery record continues the chain.
    let (pp, ap) = (free_port(), free_port());
    let cfg = std::fs::read_to_string(&p.config)
        .unwrap()
        .replace(
            &format!("proxy: {}", p.proxy),
            &format!("proxy: 127.0.0.1:{pp}"),
        )
        .replace(
            &format!("admin: {}", p.admin),
            &format!("admin: 127.0.0.1:{ap}"),
        );
    std::fs::write(&p.config, cfg).unwrap();
    let p2 = spawn_proxy(&p.dir, &p.config, pp, ap);
    send(
        p2.proxy,
        Req::post(
            "graph.facebook.com",
            "/v19.0/1/events",
            meta_batch(&["jane.roe@example.com"]),
        ),
    )
    .await;
    let audit = stop(p2);
    let (ok, out) = verify(&[&audit], None);
    assert!(ok, "{out}");
    let all: String = audit_files(&audit)
        .iter()
        .map(|f| std::fs::read_to_string(f).unwrap())
        .collect();
    assert!(
        all.contains(r#""kind":"recovery""#),
        "recovery record written"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn encrypted_audit_has_no_plaintext_and_verifies_with_the_key() {
    let dir = test_dir("audit-enc");
    let key = dir.join("audit.key");
    std::fs::write(&key, "7f".repeat(32)).unwrap();
    let ca = test_ca(&dir.join("upstream"), VENDOR_HOSTS);
    let up = start_upstream(&ca).await;
    let opts = ProxyOpts {
        extra_yaml: String::new(),
        ..Default::default()
    };
    let (pp, ap) = (free_port(), free_port());
    let cfg = config_yaml(&dir, up.addr, &ca, &opts, pp, ap).replace(
        "audit:\n",
        &format!("audit:\n  encryption_key_file: {}\n", key.display()),
    );
    let config = dir.join("consentgate.yaml");
    std::fs::write(&config, cfg).unwrap();
    let p = spawn_proxy(&dir, &config, pp, ap);
    mixed_traffic(&p).await;
    let audit = stop(p);
    for f in audit_files(&audit) {
        let text = std::fs::read_to_string(&f).unwrap();
        assert!(!text.is_empty());
        for line in text.lines() {
            let v: Value = serde_json::from_str(line).unwrap();
            assert!(
                v.get("kind").is_none()
                    && v.get("decision").is_none()
                    && v.get("patient").is_none(),
                "plaintext record: {line}"
            );
        }
        assert!(!text.contains("meta_capi") && !text.contains("dropped"));
    }
    let (ok, out) = verify(&[&audit], Some(&key));
    assert!(ok, "{out}");
    let (ok, _) = verify(&[&audit], None);
    assert!(!ok, "without the key it cannot verify");
}

#[tokio::test(flavor = "multi_thread")]
async fn audit_find_lists_one_patients_records() {
    let dir = test_dir("audit-find");
    let ca = test_ca(&dir.join("upstream"), VENDOR_HOSTS);
    let up = start_upstream(&ca).await;
    let p = start_proxy(&dir, &up, &ca, ProxyOpts::default());
    mixed_traffic(&p).await;
    let config = p.config.clone();
    let audit = stop(p);
    let out = bin()
        .args(["audit", "find", "--patient", "P-1002", "--config"])
        .arg(&config)
        .arg(&audit)
        .current_dir(&dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let recs: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        recs.len(),
        4,
        "P-1002: dropped in three mixed batches and alone once"
    );
    assert!(recs.iter().all(|r| r["reason"] == "consent_denied"));
    let p1 = &recs[0]["patient"];
    assert!(recs.iter().all(|r| &r["patient"] == p1));
}

#[tokio::test(flavor = "multi_thread")]
async fn explain_matches_the_running_proxy_for_three_vendors() {
    let dir = test_dir("explain");
    let ca = test_ca(&dir.join("upstream"), VENDOR_HOSTS);
    let up = start_upstream(&ca).await;
    let p = start_proxy(&dir, &up, &ca, ProxyOpts::default());
    let cases: Vec<(&str, &str, String, &str)> = vec![
        ("graph.facebook.com", "/v19.0/1/events",
         meta_batch(&["jane.roe@example.com", "deny.me@example.com", "unknown.person@example.com", "opt.out@example.com", "limited@example.com"]),
         "application/json"),
        ("business-api.tiktok.com", "/open_api/v1.3/event/track/",
         json!({"event_source": "web", "event_source_id": "PX", "data": [
             {"event": "ViewContent", "event_time": 1763600000, "event_id": "t1", "user": {"email": ["jane.roe@example.com"]}},
             {"event": "ViewContent", "event_time": 1763600000, "event_id": "t2", "user": {"email": ["deny.me@example.com"]}},
             {"event": "ViewContent", "event_time": 1763600000, "event_id": "t3", "user": {"email": ["gpc.user@example.com"]}}]}).to_string(),
         "application/json"),
        ("api.sendgrid.com", "/v3/mail/send",
         json!({"personalizations": [{"to": [{"email": "jane.roe@example.com"}]}, {"to": [{"email": "deny.me@example.com"}]},
                                     {"to": [{"email": "email.denied.channel@example.com"}]}],
                "from": {"email": "news@hospital.example"}, "subject": "Newsletter",
                "content": [{"type": "text/plain", "value": "Hello"}]}).to_string(),
         "application/json"),
    ];
    for (i, (host, path, body, ct)) in cases.iter().enumerate() {
        let raw = format!("POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {ct}\r\nContent-Length: {}\r\n\r\n{body}", body.len());
        let file = dir.join(format!("req{i}.http"));
        std::fs::write(&file, raw).unwrap();
        let out = bin()
            .args(["explain", "--show-body", "--config"])
            .arg(&p.config)
            .arg("--request")
            .arg(&file)
            .current_dir(&dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let trace: Value = serde_json::from_slice(&out.stdout).unwrap();
        let before = up.count();
        let resp = send(
            p.proxy,
            Req::post(host, path, body.clone()).header("content-type", ct),
        )
        .await;
        assert_eq!(trace["decision"], resp.decision(), "{host}: {trace:#}");
        let events = trace["events"].as_array().unwrap();
        assert!(!events.is_empty());
        for e in events {
            let ids = e["identifiers"].as_array().unwrap();
            assert!(
                ids.iter()
                    .all(|x| x["pseudonym"].as_str().unwrap().len() == 32),
                "{e}"
            );
            assert!(e["steps"].as_array().is_some_and(|s| !s.is_empty()));
        }
        if trace["decision"] == "blocked" {
            assert_eq!(up.count(), before);
        } else {
            let got = up.last();
            assert_eq!(
                trace["body_after"].as_str().unwrap().as_bytes(),
                got.body.as_slice(),
                "{host}: explain's body equals what the upstream received"
            );
        }
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        if trace["decision"] != "allowed" {
            let without_body = text.split("\"body_after\"").next().unwrap().to_string();
            assert!(
                !without_body.contains("deny.me@example.com") && !without_body.contains("P-1002"),
                "no PHI in the trace"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn shadow_mode_forwards_original_bytes_and_counts_would_block() {
    let batch = meta_batch(&[
        "jane.roe@example.com",
        "deny.me@example.com",
        "unknown.person@example.com",
        "opt.out@example.com",
    ]);
    // Enforce mode: count what is dropped.
    let dir = test_dir("shadow-enforce");
    let ca = test_ca(&dir.join("upstream"), VENDOR_HOSTS);
    let up = start_upstream(&ca).await;
    let p = start_proxy(&dir, &up, &ca, ProxyOpts::default());
    let r = send(
        p.proxy,
        Req::post("graph.facebook.com", "/v19.0/1/events", batch.clone()),
    )
    .await;
    assert_eq!(r.decision(), "modified");
    let m = String::from_utf8(admin_get(&p, "/metrics").await.body).unwrap();
    let count = |m: &str, decision: &str| -> u64 {
        m.lines()
            .filter(|l| {
                l.starts_with("consentgate_events_total{")
                    && l.contains(&format!("decision=\"{decision}\""))
            })
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum()
    };
    let dropped = count(&m, "dropped");
    assert_eq!(dropped, 2);
    drop(p);
    // Shadow mode: the original bytes go out; would_block equals dropped.
    let dir = test_dir("shadow");
    let opts = ProxyOpts {
        extra_yaml: "destinations:\n  - {name: meta_capi, mode: shadow}\n".into(),
        ..Default::default()
    };
    let p = start_proxy(&dir, &up, &ca, opts);
    up.clear();
    let r = send(
        p.proxy,
        Req::post("graph.facebook.com", "/v19.0/1/events", batch.clone()),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.decision(), "allowed");
    assert_eq!(
        up.last().body,
        batch.as_bytes(),
        "upstream receives the original bytes"
    );
    let m = String::from_utf8(admin_get(&p, "/metrics").await.body).unwrap();
    assert_eq!(count(&m, "would_block"), dropped, "{m}");
    assert_eq!(
        count(&m, "would_modify"),
        2,
        "{m}: the granted event is hashed, the opted-out one tagged"
    );
    assert_eq!(count(&m, "dropped"), 0);
    let audit = stop(p);
    let all: String = audit_files(&audit)
        .iter()
        .map(|f| std::fs::read_to_string(f).unwrap())
        .collect();
    assert_eq!(
        all.matches(r#""decision":"would_block""#).count() as u64,
        dropped
    );
}
