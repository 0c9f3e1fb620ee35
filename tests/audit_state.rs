//! Issue 14 acceptance (the audit half), through the real binary: one process
//! owns `audit.path` and binds every listener before its first audit record;
//! files 0600 in a 0700 directory; an `outcome` record for every forwarded
//! request and `trace_id` from `traceparent`; `audit.max_total_bytes` with keyed
//! checkpoints that `audit verify` checks.

mod common;
use common::*;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_consentgate"))
}

fn verify(args: &[&Path], pseudonym_key: Option<&Path>) -> (bool, String) {
    let mut c = bin();
    c.args(["audit", "verify"]).args(args);
    if let Some(k) = pseudonym_key {
        c.arg("--pseudonym-key-file").arg(k);
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

/// The audit files of `dir` in chain order.
fn audit_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    v.retain(|p| {
        let n = p.file_name().unwrap().to_string_lossy();
        n.starts_with("audit-") && n.ends_with(".jsonl")
    });
    v.sort();
    v
}

fn records(dir: &Path) -> Vec<Value> {
    audit_files(dir)
        .iter()
        .flat_map(|f| {
            std::fs::read_to_string(f)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str::<Value>(l).unwrap())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Every file of `dir` and its bytes.
fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

fn meta_batch(emails: &[&str]) -> String {
    let events: Vec<Value> = emails
        .iter()
        .enumerate()
        .map(|(i, e)| {
            json!({"event_name": "Lead", "event_time": 1763600000, "event_id": format!("e{i}"),
                             "action_source": "website", "user_data": {"em": [e]}})
        })
        .collect();
    json!({"data": events}).to_string()
}

fn meta(emails: &[&str]) -> Req {
    Req::post("graph.facebook.com", "/v19.0/1/events", meta_batch(emails))
}

/// Stop the proxy cleanly so the writer flushes everything.
fn stop(mut p: Proxy) -> PathBuf {
    Command::new("kill")
        .args(["-TERM", &p.child.id().to_string()])
        .status()
        .unwrap();
    let _ = p.child.wait();
    p.dir.join("audit")
}

/// Run `consentgate run --config CONFIG` expecting it to fail at start:
/// its exit code (None if it was still running after 20 s and was killed) and stderr.
fn run_expecting_failure(dir: &Path, config: &Path) -> (Option<i32>, String) {
    static RUN: AtomicU64 = AtomicU64::new(0);
    let err_path = dir.join(format!(
        "second-{}.stderr",
        RUN.fetch_add(1, Ordering::Relaxed)
    ));
    let mut child = bin()
        .args(["run", "--config"])
        .arg(config)
        .current_dir(dir)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(&err_path).unwrap()))
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (code, std::fs::read_to_string(&err_path).unwrap_or_default())
}

fn with_ports(config: &str, from: &Proxy, proxy: u16, admin: u16) -> String {
    config
        .replace(
            &format!("proxy: {}", from.proxy),
            &format!("proxy: 127.0.0.1:{proxy}"),
        )
        .replace(
            &format!("admin: {}", from.admin),
            &format!("admin: 127.0.0.1:{admin}"),
        )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_run_on_the_same_audit_path_exits_1_naming_the_holder_and_writes_nothing() {
    let dir = test_dir("audit-lock");
    let ca = test_ca(&dir.join("upstream"), VENDOR_HOSTS);
    let up = start_upstream(&ca).await;
    let p = start_proxy(&dir, &up, &ca, ProxyOpts::default());
    send(p.proxy, meta(&["jane.roe@example.com"])).await;
    let audit = dir.join("audit");
    // Let the writer put the request's records down (it lingers 1 ms per batch).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = snapshot(&audit);
    assert!(before.keys().any(|k| k.starts_with("audit-")), "{before:?}");
    let holder = format!("pid {}", p.child.id());

    // The same config: same audit.path, and its ports collide too.
    let (code, err) = run_expecting_failure(&dir, &p.config);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("audit.path") && err.contains(&holder),
        "names the lock and its holder: {err}"
    );
    // A copy of the config with ports of its own: the lock still stops it.
    let own_ports = dir.join("second.yaml");
    let text = std::fs::read_to_string(&p.config).unwrap();
    std::fs::write(&own_ports, with_ports(&text, &p, free_port(), free_port())).unwrap();
    let (code, err) = run_expecting_failure(&dir, &own_ports);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("audit.path") && err.contains(&holder), "{err}");

    assert_eq!(
        before,
        snapshot(&audit),
        "the refused processes wrote nothing"
    );
    // The first instance still works, and its trail verifies.
    let r = send(p.proxy, meta(&["jane.roe@example.com"])).await;
    assert_eq!(r.status, 200);
    let audit = stop(p);
    let (ok, out) = verify(&[&audit], None);
    assert!(ok, "{out}");
    let recs = records(&audit);
    assert_eq!(
        recs.iter().filter(|r| r["kind"] == "config").count(),
        1,
        "one config load: the first instance's"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_run_that_cannot_bind_writes_no_audit_record() {
    let dir = test_dir("audit-bind-first");
    let ca = test_ca(&dir.join("upstream"), VENDOR_HOSTS);
    let up = start_upstream(&ca).await;
    for which in ["proxy", "admin", "gateway"] {
        let d = dir.join(which);
        std::fs::create_dir_all(&d).unwrap();
        let (pp, ap, gp) = (free_port(), free_port(), free_port());
        // Someone else holds this one listener's port.
        let taken = match which {
            "proxy" => pp,
            "admin" => ap,
            _ => gp,
        };
        let _holder = std::net::TcpListener::bind(("127.0.0.1", taken)).unwrap();
        let cfg = config_yaml(&d, up.addr, &ca, &ProxyOpts::default(), pp, ap).replace(
            &format!("  admin: 127.0.0.1:{ap}\n"),
            &format!("  admin: 127.0.0.1:{ap}\n  gateway: 127.0.0.1:{gp}\n"),
        );
        let config = d.join("consentgate.yaml");
        std::fs::write(&config, cfg).unwrap();
        let (code, err) = run_expecting_failure(&d, &config);
        assert_eq!(code, Some(1), "{which}: {err}");
        assert!(err.contains(&format!("listen.{which}")), "{which}: {err}");
        let written: u64 = audit_files(&d.join("audit"))
            .iter()
            .map(|f| std::fs::metadata(f).unwrap().len())
            .sum();
        assert_eq!(
            written, 0,
            "{which}: an audit record was written before every listener was bound"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn audit_files_are_0600_in_a_0700_directory_and_looser_ones_are_tightened() {
    let dir = test_dir("audit-modes");
    let ca = test_ca(&dir.join("upstream"), VENDOR_HOSTS);
    let up = start_upstream(&ca).await;
    // An audit directory and file left readable by others (an old version, a copy).
    let audit = dir.join("audit");
    std::fs::create_dir_all(&audit).unwrap();
    std::fs::set_permissions(&audit, std::fs::Permissions::from_mode(0o755)).unwrap();
    let old = audit.join("audit-20200101-000000.jsonl");
    std::fs::write(&old, b"").unwrap();
    std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o644)).unwrap();
    let p = start_proxy(&dir, &up, &ca, ProxyOpts::default());
    send(p.proxy, meta(&["jane.roe@example.com"])).await;
    let log = p.log.clone();
    let audit = stop(p);
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&audit), 0o700);
    let files: Vec<PathBuf> = std::fs::read_dir(&audit)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(files.len() >= 3, "{files:?}");
    for f in &files {
        assert_eq!(mode(f), 0o600, "{}", f.display());
    }
    let log = std::fs::read_to_string(log).unwrap();
    assert!(log.contains("permissions tightened"), "{log}");
    let (ok, out) = verify(&[&audit], None);
    assert!(ok, "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn every_forwarded_request_has_an_outcome_and_trace_ids_are_kept() {
    let dir = test_dir("audit-outcome");
    let ca = test_ca(&dir.join("upstream"), VENDOR_HOSTS);
    let up = start_upstream(&ca).await;
    // Meta's upstream is down: nothing listens on its port.
    let down = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let opts = ProxyOpts {
        resolve_override: vec![("graph.facebook.com", down)],
        ..Default::default()
    };
    let p = start_proxy(&dir, &up, &ca, opts);
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let traceparent = format!("00-{trace}-00f067aa0ba902b7-01");

    let failed = send(
        p.proxy,
        meta(&["jane.roe@example.com"]).header("traceparent", &traceparent),
    )
    .await;
    assert_eq!(failed.status, 502);
    let tiktok = json!({"event_source": "web", "event_source_id": "PX", "data": [
        {"event": "ViewContent", "event_time": 1763600000, "event_id": "t1", "user": {"email": ["jane.roe@example.com"]}}]});
    let ok = send(
        p.proxy,
        Req::post(
            "business-api.tiktok.com",
            "/open_api/v1.3/event/track/",
            tiktok.to_string(),
        )
        .header(
            "traceparent",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        ),
    )
    .await;
    assert_eq!(ok.status, 200);
    let refused = send(
        p.proxy,
        Req::post("graph.facebook.com", "/v19.0/1/events", "{broken")
            .header("traceparent", &traceparent),
    )
    .await;
    assert_eq!(refused.status, 422);
    let audit = stop(p);
    let (good, out) = verify(&[&audit], None);
    assert!(good, "{out}");
    let recs = records(&audit);
    let of = |resp: &Resp| -> Vec<Value> {
        let id = resp.header("x-consentgate-request-id").unwrap().to_string();
        recs.iter()
            .filter(|r| r["request_id"] == id.as_str())
            .cloned()
            .collect()
    };

    // The 502: decided `modified`, then the outcome says it never got there.
    let f = of(&failed);
    let outcome: Vec<&Value> = f.iter().filter(|r| r["kind"] == "outcome").collect();
    assert_eq!(outcome.len(), 1, "{f:#?}");
    assert_eq!(outcome[0]["error"], "connect");
    assert_eq!(outcome[0]["destination"], "meta_capi");
    assert!(outcome[0].get("status").is_none());
    assert!(f.iter().any(|r| r["kind"] == "decision"));
    assert!(
        f.iter().all(|r| r["trace_id"] == trace),
        "every record of the request carries its trace id: {f:#?}"
    );

    // The 200: the outcome has the status; an upper-case traceparent is invalid
    // in version 00, so no trace id.
    let o = of(&ok);
    let outcome: Vec<&Value> = o.iter().filter(|r| r["kind"] == "outcome").collect();
    assert_eq!(outcome.len(), 1, "{o:#?}");
    assert_eq!(outcome[0]["status"], 200);
    assert_eq!(outcome[0]["destination"], "tiktok_events");
    assert!(outcome[0].get("error").is_none());
    assert!(o.iter().all(|r| r.get("trace_id").is_none()), "{o:#?}");

    // A refusal sent nothing upstream: no outcome, but its trace id.
    let r = of(&refused);
    assert!(!r.is_empty());
    assert!(r.iter().all(|x| x["kind"] != "outcome"), "{r:#?}");
    assert!(r.iter().all(|x| x["trace_id"] == trace), "{r:#?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_capped_audit_stays_under_the_cap_under_traffic_and_verifies_with_the_key() {
    const CAP: u64 = 128 << 10;
    let dir = test_dir("audit-cap");
    let ca = test_ca(&dir.join("upstream"), VENDOR_HOSTS);
    let up = start_upstream(&ca).await;
    let (pp, ap) = (free_port(), free_port());
    let cfg = config_yaml(&dir, up.addr, &ca, &ProxyOpts::default(), pp, ap)
        .replace("audit:\n", "audit:\n  max_total_bytes: 128KiB\n");
    let config = dir.join("consentgate.yaml");
    std::fs::write(&config, cfg).unwrap();
    let p = spawn_proxy(&dir, &config, pp, ap);
    let audit = dir.join("audit");

    // Sample the directory's size (every file in it) while traffic runs.
    let stop_sampling = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (stop, peak, audit) = (stop_sampling.clone(), peak.clone(), audit.clone());
        std::thread::spawn(move || {
            let mut samples = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let total: u64 = std::fs::read_dir(&audit)
                    .map(|d| {
                        d.flatten()
                            .filter_map(|e| e.metadata().ok())
                            .map(|m| m.len())
                            .sum()
                    })
                    .unwrap_or(0);
                peak.fetch_max(total, Ordering::Relaxed);
                samples += 1;
                std::thread::sleep(Duration::from_millis(2));
            }
            samples
        })
    };
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let proxy = p.proxy;
        tasks.push(tokio::spawn(async move {
            let mut statuses = Vec::new();
            for _ in 0..150 {
                let r = send(
                    proxy,
                    meta(&[
                        "jane.roe@example.com",
                        "deny.me@example.com",
                        "opt.out@example.com",
                    ]),
                )
                .await;
                statuses.push(r.status);
            }
            statuses
        }));
    }
    for t in tasks {
        let statuses = t.await.unwrap();
        assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    }
    stop_sampling.store(true, Ordering::Relaxed);
    let samples = sampler.join().unwrap();
    let peak = peak.load(Ordering::Relaxed);
    eprintln!("audit cap: peak {peak} bytes over {samples} samples (cap {CAP})");
    assert!(samples > 10, "{samples} samples");
    assert!(
        peak <= CAP,
        "the audit directory reached {peak} bytes; cap {CAP}"
    );
    let audit = stop(p);
    assert!(
        std::fs::read_dir(&audit)
            .unwrap()
            .flatten()
            .map(|e| e.metadata().unwrap().len())
            .sum::<u64>()
            <= CAP
    );

    let recs = records(&audit);
    assert_ne!(
        recs[0]["prev_hash"],
        "0".repeat(64),
        "the oldest records were removed"
    );
    assert!(recs.iter().any(|r| r["kind"] == "checkpoint"));
    // 1200 requests of 5 records each (3 events, decision, outcome): most are gone.
    assert!(recs.len() < 1200 * 5 / 2, "{} records", recs.len());

    let key = dir.join("var/pseudonym.key");
    let (ok, out) = verify(&[&audit], Some(&key));
    assert!(ok, "{out}");
    assert!(out.contains("authenticated checkpoint"), "{out}");
    // Without the key it says it cannot verify a capped trail.
    let (ok, out) = verify(&[&audit], None);
    assert!(!ok, "{out}");
    assert!(out.contains("cannot verify a capped trail"), "{out}");
    // The wrong key fails too.
    let wrong = dir.join("wrong.key");
    std::fs::write(&wrong, "11".repeat(32)).unwrap();
    let (ok, out) = verify(&[&audit], Some(&wrong));
    assert!(!ok && out.contains("checkpoint not authentic"), "{out}");

    let copy = |name: &str| -> PathBuf {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        for f in audit_files(&audit) {
            std::fs::copy(&f, d.join(f.file_name().unwrap())).unwrap();
        }
        d
    };
    // Tampering with a remaining file is still caught.
    let t = copy("tampered");
    let files = audit_files(&t);
    assert!(files.len() >= 4, "{files:?}");
    let text = std::fs::read_to_string(&files[2]).unwrap();
    let altered = text.replacen("\"dropped\"", "\"allowed\"", 1);
    assert_ne!(text, altered);
    std::fs::write(&files[2], altered).unwrap();
    let (ok, out) = verify(&[&t], Some(&key));
    assert!(!ok && out.contains("hash mismatch"), "{out}");

    // Deleting the oldest remaining files is caught, and so is covering it with
    // a checkpoint forged without the key.
    let f = copy("forged");
    let files = audit_files(&f);
    for old in &files[..2] {
        std::fs::remove_file(old).unwrap();
    }
    let (ok, out) = verify(&[&f], Some(&key));
    assert!(!ok, "{out}");
    let new_first: Value = serde_json::from_str(
        std::fs::read_to_string(&files[2])
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    let last = files.last().unwrap();
    let text = std::fs::read_to_string(last).unwrap();
    let prev = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(
            text.lines().last().unwrap().as_bytes(),
        ))
    };
    let names: Vec<String> = files[..2]
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    let forged = json!({
        "ts": "2026-11-22T10:00:00.000000Z", "request_id": null, "kind": "checkpoint",
        "destination": null, "patient": null, "category": null, "decision": null,
        "reason": "max_total_bytes", "rule": null, "fields_stripped": [], "flags_set": [],
        "actor": null,
        "detail": {"removed_files": names, "removed_records": 40, "removed_bytes": 20000,
                   "anchor": new_first["prev_hash"], "first_kept": files[2].file_name().unwrap().to_string_lossy(),
                   "mac": "ab".repeat(32)},
        "prev_hash": prev,
    });
    std::fs::write(last, format!("{text}{forged}\n")).unwrap();
    let (ok, out) = verify(&[&f], Some(&key));
    assert!(!ok && out.contains("checkpoint not authentic"), "{out}");
}
