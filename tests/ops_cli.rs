//! Issue 20 item 8: `check` reports every error of every kind in one pass, and
//! `audit find | head` ends quietly when the reader closes the pipe early.

mod common;
use std::process::{Command, Stdio};

fn consentgate() -> Command {
    Command::new(env!("CARGO_BIN_EXE_consentgate"))
}

#[test]
fn check_reports_every_error_in_one_pass() {
    let dir = common::test_dir("check-all");
    let w = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let snapshot = w(
        "consent.jsonl",
        "{\"patient_id\": \"P-1\", \"categories\": 7}\n",
    );
    let tokens = w("tokens", "no colon here\n");
    let ca = w("ca.pem", "not a certificate\n");
    let key = w("ca-key.pem", "not a key\n");
    let config = w(
        "consentgate.yaml",
        &format!(
            "colour: blue\n\
interception:\n  ca_cert: {ca}\n  ca_key: {key}\n\
consent:\n  file: {snap}\n  journal: {d}/journal\n  max_staleness: 0s\n\
admin:\n  tokens_file: {tok}\n\
audit:\n  path: {d}/audit\n\
destinations:\n  - name: no_such_vendor\n  - name: meta_capi\n    mode: loud\n",
            ca = ca.display(),
            key = key.display(),
            snap = snapshot.display(),
            tok = tokens.display(),
            d = dir.display(),
        ),
    );
    let out = consentgate()
        .args(["check", "--config"])
        .arg(&config)
        .current_dir(&dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    for want in [
        "colour: unknown key",
        "consent.max_staleness: must be at least 1s",
        "mode: expected enforce, shadow or passthrough",
        "destinations.no_such_vendor: no built-in destination of this name",
        "interception: ",
        "consent.file: ",
        "admin.tokens_file: ",
    ] {
        assert!(err.contains(want), "{want:?} missing from:\n{err}");
    }
    assert!(err.contains("error(s) in"), "{err}");
}

#[test]
fn audit_find_ends_quietly_on_a_closed_pipe() {
    let dir = common::test_dir("find-pipe");
    let demo = dir.join("demo");
    // The demo leaves an audit trail, its pseudonym key and config.
    let out = consentgate()
        .args(["demo", "--dir"])
        .arg(&demo)
        .current_dir(&dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let find = |stdout: Stdio| {
        consentgate()
            .args(["audit", "find", "--patient", "P-1001", "--config"])
            .arg(demo.join("consentgate.yaml"))
            .current_dir(&demo)
            .stdout(stdout)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    // Read normally, there are records to print.
    let all = find(Stdio::piped()).wait_with_output().unwrap();
    assert!(all.status.success());
    assert!(String::from_utf8_lossy(&all.stdout).lines().count() >= 2);
    // `| head -0`: the reader is gone before the first line is written.
    let mut child = find(Stdio::piped());
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(
        !err.contains("panicked") && !err.contains("Broken pipe"),
        "{err}"
    );
}
