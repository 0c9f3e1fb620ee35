//! Issue 20 item 7: `consentgate demo` on its own, as on a fresh clone: a
//! working directory of its own, no network (a fake vendor on loopback), exit 0,
//! and the walk through allowed, modified and blocked, `explain` and `audit verify`.

mod common;
use std::process::Command;

#[test]
fn demo_walks_allowed_modified_blocked_explain_and_verify() {
    let dir = common::test_dir("demo");
    // An empty working directory: nothing of the repository's config is used.
    let cwd = dir.join("cwd");
    std::fs::create_dir_all(&cwd).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_consentgate"))
        .args(["demo", "--dir"])
        .arg(dir.join("demo"))
        .current_dir(&cwd)
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "exit {:?}\n{text}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        "x-consentgate-decision: allowed. The vendor got the body byte for byte.",
        "x-consentgate-decision: modified.",
        "P-1002's event was dropped (consent_denied)",
        "451 blocked_by_consent_policy (reasons: consent_denied), x-consentgate-decision: blocked. Nothing reached the vendor.",
        "event 1: dropped (consent_denied)",
        "request: modified (destination meta_capi, category advertising)",
        "chain intact from the first record",
        "HTTPS_PROXY=http://",
    ] {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }
    // What it made is usable afterwards: the CA and its trust files, the trail.
    let demo = dir.join("demo");
    for f in [
        "certs/ca.pem",
        "certs/ca-key.pem",
        "certs/truststore.p12",
        "consentgate.yaml",
    ] {
        assert!(demo.join(f).is_file(), "{f}");
    }
    assert!(std::fs::read_dir(demo.join("audit")).unwrap().count() > 0);
    // No patient data in the demo's own output or the proxy's log.
    let log = std::fs::read(demo.join("proxy.log")).unwrap();
    for bytes in [text.as_bytes(), &log[..]] {
        common::assert_absent(
            bytes,
            &["jane.roe@example.com", "deny.me@example.com"],
            "demo output / proxy log",
        );
    }
    // Run again in the same directory: the CA is reused, the trail goes on.
    let again = Command::new(env!("CARGO_BIN_EXE_consentgate"))
        .args(["demo", "--dir"])
        .arg(&demo)
        .current_dir(&cwd)
        .output()
        .unwrap();
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
}
