//! Writer + verify + find over real files.

use super::chain::{sha256_hex, ZERO_HASH};
use super::verify::{audit_files, verify, TrailReport, VerifyError, VerifyErrorKind, VerifyReport};
use super::*;
use crate::metrics::Metrics;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

fn pkey() -> PseudonymKey {
    PseudonymKey::from_hex(&"42".repeat(32)).unwrap()
}

fn rec(i: usize) -> AuditRecord {
    let mut r = AuditRecord::decision(&format!("req-{i:04}"), "meta_capi", "modified", "gpc")
        .with_patient(&pkey(), &format!("P-{}", 1000 + i % 3));
    r.category = Some("advertising".into());
    r.rule = Some("gpc_strip_identity".into());
    r.fields_stripped = vec!["user_data.em".into()];
    r.flags_set = vec!["data_processing_options".into()];
    r
}

async fn write_n(opts: AuditOptions, n: usize) -> AuditWriter {
    let w = AuditWriter::start(opts).unwrap();
    for i in 0..n {
        w.submit(vec![rec(i)]).unwrap();
    }
    w.flush().await.unwrap();
    w
}

fn only_file(dir: &Path) -> PathBuf {
    let files = audit_files(dir).unwrap();
    assert_eq!(files.len(), 1, "{files:?}");
    files[0].clone()
}

fn read_lines(p: &Path) -> Vec<String> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

fn write_lines(p: &Path, lines: &[String]) {
    let mut s = lines.join("\n");
    s.push('\n');
    std::fs::write(p, s).unwrap();
}

fn verify_dir(dir: &Path) -> Result<VerifyReport, VerifyError> {
    verify(&[dir.to_path_buf()], None)
}

#[tokio::test]
async fn writes_n_records_and_verify_counts_them() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = Metrics::new();
    let mut opts = AuditOptions::new(dir.path().join("audit"));
    opts.counters = Some(AuditCounters::from_metrics(&metrics));
    let w = write_n(opts, 25).await;
    // Several records for one request go in as one submission.
    w.submit(vec![
        AuditRecord::config("reload", "success"),
        AuditRecord::consent_change("ops-admin", pkey().pseudonym("P-1000"), "patch"),
    ])
    .unwrap();
    w.flush().await.unwrap();
    assert_eq!(metrics.audit_records_total.get(), 27);
    assert_eq!(metrics.audit_write_failures_total.get(), 0);

    let report = verify_dir(&dir.path().join("audit")).unwrap();
    assert_eq!(
        report,
        VerifyReport {
            records: 27,
            files: 1
        }
    );

    let file = only_file(&dir.path().join("audit"));
    let name = file.file_name().unwrap().to_str().unwrap().to_string();
    assert!(parse_file_name(&file).is_some(), "{name}");
    let lines = read_lines(&file);
    let first: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(first["prev_hash"], ZERO_HASH);
    let second: serde_json::Value = serde_json::from_str(&lines[1]).unwrap();
    assert_eq!(second["prev_hash"], sha256_hex(lines[0].as_bytes()));
    let keys: Vec<&str> = first
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        [
            "ts",
            "request_id",
            "kind",
            "destination",
            "patient",
            "category",
            "decision",
            "reason",
            "rule",
            "fields_stripped",
            "flags_set",
            "actor",
            "prev_hash"
        ]
    );
    assert_eq!(first["kind"], "decision");
    assert_eq!(first["patient"], pkey().pseudonym("P-1000"));
    let last: serde_json::Value = serde_json::from_str(&lines[26]).unwrap();
    assert_eq!(last["kind"], "consent_change");
    assert_eq!(last["actor"], "ops-admin");
    // No raw patient id anywhere.
    let all = std::fs::read_to_string(&file).unwrap();
    assert!(!all.contains("P-100"), "raw patient id written");
}

#[tokio::test]
async fn flipped_byte_fails_naming_the_record() {
    let dir = tempfile::tempdir().unwrap();
    write_n(AuditOptions::new(dir.path()), 10).await;
    let file = only_file(dir.path());
    let orig = read_lines(&file);

    // A flipped byte inside a value keeps the JSON valid: the next record's
    // prev_hash no longer matches.
    let mut lines = orig.clone();
    lines[4] = lines[4].replacen("meta_capi", "meta_capj", 1);
    write_lines(&file, &lines);
    let e = verify_dir(dir.path()).unwrap_err();
    assert_eq!(e.kind, VerifyErrorKind::HashMismatch, "{e}");
    assert_eq!((e.line, e.record_index), (6, 5), "{e}");
    assert_eq!(e.file, file);
    assert!(e.to_string().contains("line 6"), "{e}");

    // A flipped byte in a record's own prev_hash names that record.
    let mut lines = orig.clone();
    let pos = lines[3].find("\"prev_hash\":\"").unwrap() + 13;
    let mut bytes = lines[3].clone().into_bytes();
    bytes[pos] = if bytes[pos] == b'a' { b'b' } else { b'a' };
    lines[3] = String::from_utf8(bytes).unwrap();
    write_lines(&file, &lines);
    let e = verify_dir(dir.path()).unwrap_err();
    assert_eq!((e.kind, e.line), (VerifyErrorKind::HashMismatch, 4), "{e}");

    // A flipped structural byte makes the line unparseable.
    let mut lines = orig.clone();
    lines[2] = lines[2].replacen('{', "[", 1);
    write_lines(&file, &lines);
    let e = verify_dir(dir.path()).unwrap_err();
    assert_eq!((e.kind, e.line), (VerifyErrorKind::Unparseable, 3), "{e}");

    // A flipped byte in the first record's prev_hash.
    let mut lines = orig;
    lines[0] = lines[0].replacen(ZERO_HASH, &"1".repeat(64), 1);
    write_lines(&file, &lines);
    let e = verify_dir(dir.path()).unwrap_err();
    assert_eq!((e.kind, e.line), (VerifyErrorKind::FirstNotZero, 1), "{e}");
}

#[tokio::test]
async fn deleted_line_fails_naming_the_record_after_the_gap() {
    let dir = tempfile::tempdir().unwrap();
    write_n(AuditOptions::new(dir.path()), 10).await;
    let file = only_file(dir.path());
    let mut lines = read_lines(&file);
    lines.remove(6);
    write_lines(&file, &lines);
    let e = verify_dir(dir.path()).unwrap_err();
    assert_eq!(e.kind, VerifyErrorKind::HashMismatch, "{e}");
    assert_eq!((e.line, e.record_index), (7, 6), "{e}");
}

#[tokio::test]
async fn swapped_lines_fail() {
    let dir = tempfile::tempdir().unwrap();
    write_n(AuditOptions::new(dir.path()), 10).await;
    let file = only_file(dir.path());
    let mut lines = read_lines(&file);
    lines.swap(3, 7);
    write_lines(&file, &lines);
    let e = verify_dir(dir.path()).unwrap_err();
    assert_eq!((e.kind, e.line), (VerifyErrorKind::HashMismatch, 4), "{e}");
}

#[tokio::test]
async fn truncated_mid_line_is_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    write_n(AuditOptions::new(dir.path()), 10).await;
    let file = only_file(dir.path());
    let data = std::fs::read(&file).unwrap();
    // Cut in the middle of line 8.
    let line8_start = data
        .iter()
        .enumerate()
        .filter(|(_, b)| **b == b'\n')
        .nth(6)
        .unwrap()
        .0
        + 1;
    std::fs::write(&file, &data[..line8_start + 40]).unwrap();
    let e = verify_dir(dir.path()).unwrap_err();
    assert_eq!(e.kind, VerifyErrorKind::TornTail, "{e}");
    assert_eq!((e.line, e.record_index), (8, 7), "{e}");
    assert!(e.to_string().contains("torn tail"), "{e}");
}

#[tokio::test]
async fn rotation_by_size_carries_the_chain_into_the_next_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = AuditOptions::new(dir.path());
    opts.max_file_bytes = 2000;
    opts.fsync = FsyncPolicy::Always;
    write_n(opts, 30).await;
    let files = audit_files(dir.path()).unwrap();
    assert!(files.len() >= 5, "{files:?}");
    let mut names: Vec<String> = files
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    let in_order = names.clone();
    names.sort();
    assert_eq!(names, in_order, "lexical order is chain order");
    for pair in files.windows(2) {
        let prev = read_lines(&pair[0]);
        assert!(std::fs::metadata(&pair[0]).unwrap().len() <= 2000);
        let next = read_lines(&pair[1]);
        let first: serde_json::Value = serde_json::from_str(&next[0]).unwrap();
        assert_eq!(
            first["prev_hash"],
            sha256_hex(prev.last().unwrap().as_bytes())
        );
    }
    let report = verify_dir(dir.path()).unwrap();
    assert_eq!(report.records, 30);
    assert_eq!(report.files, files.len());
    // Files given one by one, in order, verify the same.
    assert_eq!(verify(&files, None).unwrap().records, 30);
    // Without the first file the chain does not start at zero.
    let e = verify(&files[1..], None).unwrap_err();
    assert_eq!(e.kind, VerifyErrorKind::FirstNotZero);
    // A missing middle file breaks the chain at the next file's first record.
    let mut gap = files.clone();
    gap.remove(2);
    let e = verify(&gap, None).unwrap_err();
    assert_eq!((e.kind, e.line), (VerifyErrorKind::HashMismatch, 1), "{e}");
    assert_eq!(e.file, files[3]);
}

#[tokio::test]
async fn rotation_by_utc_day() {
    let dir = tempfile::tempdir().unwrap();
    let t0 = chrono::DateTime::parse_from_rfc3339("2026-11-20T23:59:59Z")
        .unwrap()
        .timestamp();
    let now = Arc::new(AtomicI64::new(t0));
    let clock_now = now.clone();
    let mut opts = AuditOptions::new(dir.path());
    opts.clock = Some(Arc::new(move || {
        chrono::DateTime::from_timestamp(clock_now.load(Ordering::SeqCst), 0).unwrap()
    }));
    let w = write_n(opts.clone(), 3).await;
    now.store(t0 + 2, Ordering::SeqCst);
    for i in 0..3 {
        w.submit(vec![rec(i)]).unwrap();
    }
    w.flush().await.unwrap();
    drop(w);
    let names: Vec<String> = audit_files(dir.path())
        .unwrap()
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        ["audit-20261120-000000.jsonl", "audit-20261121-000001.jsonl"]
    );
    // The clock going back a day never reorders the files.
    now.store(t0 - 86_400, Ordering::SeqCst);
    write_n(opts, 2).await;
    let files = audit_files(dir.path()).unwrap();
    assert_eq!(files.len(), 2);
    assert_eq!(verify_dir(dir.path()).unwrap().records, 8);
}

#[tokio::test]
async fn restart_continues_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    drop(write_n(AuditOptions::new(dir.path()), 5).await);
    drop(write_n(AuditOptions::new(dir.path()), 5).await);
    let file = only_file(dir.path());
    assert_eq!(read_lines(&file).len(), 10);
    assert!(!std::fs::read_to_string(&file).unwrap().contains("recovery"));
    assert_eq!(verify_dir(dir.path()).unwrap().records, 10);
}

#[tokio::test]
async fn restart_after_a_torn_tail_cuts_it_and_records_recovery() {
    let dir = tempfile::tempdir().unwrap();
    drop(write_n(AuditOptions::new(dir.path()), 5).await);
    let file = only_file(dir.path());
    let good = std::fs::read(&file).unwrap();
    let torn = b"{\"ts\":\"2026-11-20T10:00:00.000000Z\",\"request_id\":\"req-";
    let mut data = good.clone();
    data.extend_from_slice(torn);
    std::fs::write(&file, &data).unwrap();
    assert_eq!(
        verify_dir(dir.path()).unwrap_err().kind,
        VerifyErrorKind::TornTail
    );

    let w = write_n(AuditOptions::new(dir.path()), 3).await;
    drop(w);
    assert_eq!(verify_dir(dir.path()).unwrap().records, 5 + 1 + 3);
    let lines = read_lines(&only_file(dir.path()));
    let recovery: serde_json::Value = serde_json::from_str(&lines[5]).unwrap();
    assert_eq!(recovery["kind"], "recovery");
    assert_eq!(recovery["reason"], "torn_tail");
    assert_eq!(recovery["detail"]["bytes_cut"], torn.len());
    assert_eq!(
        recovery["detail"]["file"],
        file.file_name().unwrap().to_str().unwrap()
    );
    assert_eq!(
        recovery["prev_hash"],
        sha256_hex(
            &good[..good.len() - 1][good[..good.len() - 1]
                .iter()
                .rposition(|&b| b == b'\n')
                .unwrap()
                + 1..]
        )
    );
}

#[tokio::test]
async fn restart_after_a_garbage_last_line_and_an_empty_last_file() {
    let dir = tempfile::tempdir().unwrap();
    drop(write_n(AuditOptions::new(dir.path()), 4).await);
    let file = only_file(dir.path());
    let mut data = std::fs::read(&file).unwrap();
    data.extend_from_slice(b"\0\0\0\0garbage\n\0\0\0");
    std::fs::write(&file, &data).unwrap();
    // An empty newer file (crash right after rotation).
    let (day, seq) = parse_file_name(&file).unwrap();
    std::fs::write(dir.path().join(file_name(day, seq + 1)), b"").unwrap();
    drop(write_n(AuditOptions::new(dir.path()), 2).await);
    assert_eq!(verify_dir(dir.path()).unwrap().records, 4 + 1 + 2);
    let files = audit_files(dir.path()).unwrap();
    assert_eq!(files.len(), 2);
    let newer = read_lines(&files[1]);
    let recovery: serde_json::Value = serde_json::from_str(&newer[0]).unwrap();
    assert_eq!(recovery["kind"], "recovery");
    assert_eq!(recovery["detail"]["bytes_cut"], 15);
}

#[tokio::test]
async fn encryption_at_rest() {
    let dir = tempfile::tempdir().unwrap();
    let key_path = dir.path().join("audit.key");
    std::fs::write(&key_path, format!("{}\n", "5a".repeat(32))).unwrap();
    let key = load_enc_key(&key_path).unwrap();
    let audit = dir.path().join("audit");
    let mut opts = AuditOptions::new(&audit);
    opts.encryption = Some(key.clone());
    drop(write_n(opts.clone(), 12).await);
    // Restart with encryption continues the chain through the decrypted last line.
    drop(write_n(opts, 3).await);

    let file = only_file(&audit);
    let lines = read_lines(&file);
    assert_eq!(lines.len(), 15);
    for l in &lines {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys, ["v", "nonce", "ct"], "{l}");
        assert!(!l.contains("\"patient\""), "{l}");
        assert!(!l.contains("prev_hash") && !l.contains("meta_capi"), "{l}");
    }
    let paths = [audit.clone()];
    assert_eq!(verify(&paths, Some(&key)).unwrap().records, 15);

    let e = verify(&paths, None).unwrap_err();
    assert_eq!((e.kind, e.line), (VerifyErrorKind::Decrypt, 1), "{e}");
    assert!(e.to_string().contains("no encryption key"), "{e}");
    let wrong = EncKey::from_hex(&"5b".repeat(32)).unwrap();
    let e = verify(&paths, Some(&wrong)).unwrap_err();
    assert_eq!(e.kind, VerifyErrorKind::Decrypt, "{e}");

    // Chain checks still apply to decrypted records.
    let mut swapped = lines.clone();
    swapped.swap(2, 5);
    write_lines(&file, &swapped);
    let e = verify(&paths, Some(&key)).unwrap_err();
    assert_eq!((e.kind, e.line), (VerifyErrorKind::HashMismatch, 3), "{e}");
    write_lines(&file, &lines);

    let found = find(&paths, Some(&key), "P-1001", None, &pkey()).unwrap();
    assert_eq!(found.len(), 5);
    // Starting without the key on an encrypted log is refused, not silently forked.
    let e = AuditWriter::start(AuditOptions::new(&audit)).unwrap_err();
    assert!(e.contains("cannot be decrypted"), "{e}");
}

#[tokio::test]
async fn find_returns_only_that_patients_records() {
    let dir = tempfile::tempdir().unwrap();
    let w = write_n(AuditOptions::new(dir.path()), 9).await;
    let mut late = rec(1);
    late.ts = chrono::Utc::now() + chrono::Duration::hours(1);
    late.request_id = Some("req-late".into());
    w.submit(vec![late]).unwrap();
    w.flush().await.unwrap();
    let paths = [dir.path().to_path_buf()];
    let found = find(&paths, None, "P-1001", None, &pkey()).unwrap();
    let ids: Vec<&str> = found
        .iter()
        .map(|v| v["request_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["req-0001", "req-0004", "req-0007", "req-late"]);
    let p = pkey().pseudonym("P-1001");
    assert!(found.iter().all(|v| v["patient"] == p.as_str()));
    let since = chrono::Utc::now() + chrono::Duration::minutes(30);
    let found = find(&paths, None, "P-1001", Some(since), &pkey()).unwrap();
    assert_eq!(found.len(), 1);
    assert!(find(&paths, None, "P-9999", None, &pkey())
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn full_channel_returns_audit_unavailable() {
    let (w, _rx) = AuditWriter::detached(2);
    w.submit(vec![rec(0)]).unwrap();
    w.submit(vec![rec(1), rec(2)]).unwrap();
    let started = std::time::Instant::now();
    assert_eq!(w.submit(vec![rec(3)]), Err(AuditUnavailable::Full));
    assert!(started.elapsed() < Duration::from_millis(100));
    assert_eq!(AuditUnavailable::REASON, "audit_unavailable");
    drop(_rx);
    assert_eq!(w.submit(vec![rec(4)]), Err(AuditUnavailable::Closed));
    assert!(!w.is_healthy());
}

#[tokio::test]
async fn raw_patient_id_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = Metrics::new();
    let mut opts = AuditOptions::new(dir.path());
    opts.counters = Some(AuditCounters::from_metrics(&metrics));
    let w = AuditWriter::start(opts).unwrap();
    let mut r = rec(0);
    r.patient = Some("P-1000".into());
    assert_eq!(
        w.submit(vec![rec(1), r]),
        Err(AuditUnavailable::InvalidRecord)
    );
    assert_eq!(metrics.audit_write_failures_total.get(), 2);
    w.flush().await.unwrap();
    assert_eq!(
        verify_dir(dir.path()).unwrap_err().kind,
        VerifyErrorKind::NoFiles
    );
}

#[tokio::test]
async fn disk_failure_fails_closed_then_recovers_with_a_record() {
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit");
    let metrics = Metrics::new();
    let mut opts = AuditOptions::new(&audit);
    opts.max_file_bytes = 1; // every record opens a new file
    opts.counters = Some(AuditCounters::from_metrics(&metrics));
    let w = write_n(opts, 1).await;
    std::fs::remove_dir_all(&audit).unwrap();
    w.submit(vec![rec(1)]).unwrap();
    assert_eq!(w.flush().await, Err(AuditUnavailable::Failed));
    assert!(!w.is_healthy());
    assert_eq!(w.submit(vec![rec(2)]), Err(AuditUnavailable::Failed));
    assert_eq!(metrics.audit_write_failures_total.get(), 2);

    std::fs::create_dir_all(&audit).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !w.is_healthy() {
        assert!(
            std::time::Instant::now() < deadline,
            "writer never recovered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    w.submit(vec![rec(3)]).unwrap();
    w.flush().await.unwrap();
    let files = audit_files(&audit).unwrap();
    let first: serde_json::Value = serde_json::from_str(&read_lines(&files[0])[0]).unwrap();
    assert_eq!(first["kind"], "recovery");
    assert_eq!(first["reason"], "write_failure");
    assert_eq!(first["detail"]["records_lost"], 1);
    // The chain runs on from the lost directory's last record.
    assert_ne!(first["prev_hash"], ZERO_HASH);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_submitters_form_one_chain() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = AuditOptions::new(dir.path());
    opts.fsync = FsyncPolicy::Never;
    opts.max_file_bytes = 50_000;
    let w = AuditWriter::start(opts).unwrap();
    let mut tasks = Vec::new();
    for t in 0..4 {
        let w = w.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..200 {
                w.submit(vec![rec(t * 1000 + i), rec(t * 1000 + i + 500)])
                    .unwrap();
                if i.is_multiple_of(16) {
                    tokio::task::yield_now().await;
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    w.flush().await.unwrap();
    let report = verify_dir(dir.path()).unwrap();
    assert_eq!(report.records, 1600);
    assert!(report.files > 1);
}

#[test]
fn fsync_policy_parses() {
    assert_eq!(FsyncPolicy::parse("always"), Ok(FsyncPolicy::Always));
    assert_eq!(FsyncPolicy::parse("never"), Ok(FsyncPolicy::Never));
    assert_eq!(FsyncPolicy::parse("interval"), Ok(FsyncPolicy::default()));
    assert!(FsyncPolicy::parse("sometimes").is_err());
}

#[test]
fn file_names_sort_in_chain_order() {
    assert_eq!(file_name(20261120, 7), "audit-20261120-000007.jsonl");
    assert_eq!(
        parse_file_name(Path::new("/x/audit-20261120-000007.jsonl")),
        Some((20261120, 7))
    );
    assert_eq!(
        parse_file_name(Path::new("audit-2026112-000007.jsonl")),
        None
    );
    assert_eq!(parse_file_name(Path::new("audit-20261120-7.jsonl")), None);
    assert_eq!(parse_file_name(Path::new("other.jsonl")), None);
}

// ---- Issue 14: lock, modes, outcome / trace_id fields, the cap and checkpoints.

fn ckey() -> CheckpointKey {
    CheckpointKey::from_pseudonym_key(&pkey())
}

fn capped(dir: &Path, cap: u64) -> AuditOptions {
    let mut o = AuditOptions::new(dir);
    o.max_total_bytes = Some(cap);
    o.checkpoint_key = Some(ckey());
    o.fsync = FsyncPolicy::Never;
    o
}

/// Bytes of every file in `dir` (audit files and the lock file).
fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

fn verify_capped(dir: &Path) -> Result<TrailReport, VerifyError> {
    verify_trail(&[dir.to_path_buf()], None, Some(&ckey()))
}

fn all_lines(dir: &Path) -> Vec<(PathBuf, usize, serde_json::Value)> {
    let mut out = Vec::new();
    for f in audit_files(dir).unwrap() {
        for (i, l) in read_lines(&f).iter().enumerate() {
            out.push((f.clone(), i, serde_json::from_str(l).unwrap()));
        }
    }
    out
}

#[tokio::test]
async fn a_second_writer_on_the_directory_fails_naming_the_holder() {
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit");
    let w = write_n(AuditOptions::new(&audit), 3).await;
    let before = std::fs::read(only_file(&audit)).unwrap();
    let e = AuditWriter::start(AuditOptions::new(&audit)).unwrap_err();
    assert!(
        e.contains("audit.path") && e.contains("locked by pid"),
        "{e}"
    );
    assert!(e.contains(&format!("pid {}", std::process::id())), "{e}");
    // The refused writer touched nothing: no recovery, no new file.
    assert_eq!(std::fs::read(only_file(&audit)).unwrap(), before);
    // Dropping the last handle waits for the thread, so the lock is free at once.
    drop(w);
    write_n(AuditOptions::new(&audit), 1).await;
    assert_eq!(verify_dir(&audit).unwrap().records, 4);
}

#[tokio::test]
async fn records_submitted_before_start_wait_behind_the_first_records() {
    let dir = tempfile::tempdir().unwrap();
    let (w, starter) = AuditWriter::prepare(AuditOptions::new(dir.path())).unwrap();
    w.submit(vec![rec(0)]).unwrap();
    assert!(
        audit_files(dir.path()).unwrap().is_empty(),
        "nothing written before start"
    );
    starter
        .start(vec![AuditRecord::config("load", "success")])
        .unwrap();
    w.flush().await.unwrap();
    let lines = read_lines(&only_file(dir.path()));
    assert!(lines[0].contains("\"kind\":\"config\""), "{}", lines[0]);
    assert!(lines[1].contains("req-0000"), "{}", lines[1]);
}

#[tokio::test]
async fn files_are_0600_in_a_0700_directory_and_loose_ones_are_tightened() {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit");
    drop(write_n(AuditOptions::new(&audit), 2).await);
    let file = only_file(&audit);
    assert_eq!(mode(&audit), 0o700);
    assert_eq!(mode(&file), 0o600);
    std::fs::set_permissions(&audit, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    drop(write_n(AuditOptions::new(&audit), 1).await);
    assert_eq!(mode(&audit), 0o700);
    assert_eq!(mode(&file), 0o600);
}

#[tokio::test]
async fn outcome_and_trace_fields_appear_only_when_set() {
    let dir = tempfile::tempdir().unwrap();
    let w = AuditWriter::start(AuditOptions::new(dir.path())).unwrap();
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    w.submit(vec![
        AuditRecord::outcome_status("req-1", "meta_capi", 200).with_trace(Some(trace)),
        AuditRecord::outcome_error("req-2", "meta_capi", "connect"),
        AuditRecord::config("load", "success"),
    ])
    .unwrap();
    w.flush().await.unwrap();
    let lines = read_lines(&only_file(dir.path()));
    let keys = |l: &str| -> Vec<String> {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        v.as_object().unwrap().keys().cloned().collect()
    };
    let ok: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(ok["kind"], "outcome");
    assert_eq!(ok["status"], 200);
    assert_eq!(ok["trace_id"], trace);
    assert_eq!(ok["destination"], "meta_capi");
    assert!(!keys(&lines[0]).contains(&"error".to_string()));
    assert_eq!(
        keys(&lines[0])[2],
        "trace_id",
        "trace_id follows request_id"
    );
    let failed: serde_json::Value = serde_json::from_str(&lines[1]).unwrap();
    assert_eq!(failed["error"], "connect");
    for k in ["status", "trace_id"] {
        assert!(!keys(&lines[1]).contains(&k.to_string()), "{k}");
    }
    for k in ["status", "error", "trace_id", "detail"] {
        assert!(!keys(&lines[2]).contains(&k.to_string()), "{k}");
    }
    assert_eq!(verify_dir(dir.path()).unwrap().records, 3);
}

#[tokio::test]
async fn the_cap_removes_the_oldest_files_and_stays_verifiable() {
    let dir = tempfile::tempdir().unwrap();
    let cap = 64 << 10;
    let w = AuditWriter::start(capped(dir.path(), cap)).unwrap();
    let mut peak = 0;
    for i in 0..2000 {
        w.submit(vec![rec(i)]).unwrap();
        if i % 50 == 0 {
            w.flush().await.unwrap();
            peak = peak.max(dir_bytes(dir.path()));
        }
    }
    w.flush().await.unwrap();
    peak = peak.max(dir_bytes(dir.path()));
    assert!(peak <= cap, "directory reached {peak} bytes, cap {cap}");
    drop(w);
    let files = audit_files(dir.path()).unwrap();
    let first: serde_json::Value = serde_json::from_str(&read_lines(&files[0])[0]).unwrap();
    assert_ne!(first["prev_hash"], ZERO_HASH, "the oldest records are gone");
    let r = verify_capped(dir.path()).unwrap();
    let cap_report = r.capped.clone().expect("a capped trail");
    assert!(r.checkpoints_authenticated >= 1);
    assert_eq!(cap_report.leftover_records, 0);
    // Every record written is either still there or counted by a checkpoint.
    let lines = all_lines(dir.path());
    let checkpoints: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|(_, _, v)| v["kind"] == "checkpoint")
        .map(|(_, _, v)| v)
        .collect();
    assert!(!checkpoints.is_empty());
    let kept_decisions = lines
        .iter()
        .filter(|(_, _, v)| v["kind"] == "decision")
        .count();
    assert!(kept_decisions > 0 && kept_decisions < 2000);
    let anchor_cp = checkpoints
        .iter()
        .find(|c| c["detail"]["anchor"] == first["prev_hash"])
        .expect("the anchoring checkpoint is kept");
    assert_eq!(
        anchor_cp["detail"]["first_kept"],
        files[0].file_name().unwrap().to_str().unwrap()
    );
    assert_eq!(anchor_cp["reason"], "max_total_bytes");
    // Without the key a capped trail is not passed.
    let e = verify_dir(dir.path()).unwrap_err();
    assert_eq!(e.kind, VerifyErrorKind::CheckpointKeyNeeded, "{e}");
    assert!(e.to_string().contains("--pseudonym-key-file"), "{e}");
    // With another key, every checkpoint is refused.
    let other =
        CheckpointKey::from_pseudonym_key(&PseudonymKey::from_hex(&"43".repeat(32)).unwrap());
    let e = verify_trail(&[dir.path().to_path_buf()], None, Some(&other)).unwrap_err();
    assert_eq!(e.kind, VerifyErrorKind::BadCheckpoint, "{e}");
    // Restart continues the capped chain.
    write_n(capped(dir.path(), cap), 300).await;
    assert!(dir_bytes(dir.path()) <= cap);
    verify_capped(dir.path()).unwrap();
}

#[tokio::test]
async fn tampering_with_a_kept_file_is_still_caught() {
    let dir = tempfile::tempdir().unwrap();
    write_n(capped(dir.path(), 64 << 10), 1500).await;
    verify_capped(dir.path()).unwrap();
    let files = audit_files(dir.path()).unwrap();
    assert!(files.len() >= 3);
    let target = &files[1];
    let orig = read_lines(target);
    let mut lines = orig.clone();
    lines[3] = lines[3].replacen("meta_capi", "meta_capj", 1);
    write_lines(target, &lines);
    let e = verify_capped(dir.path()).unwrap_err();
    assert_eq!((e.kind, e.line), (VerifyErrorKind::HashMismatch, 5), "{e}");
    assert_eq!(&e.file, target);
    // The first kept record altered: its successor no longer matches.
    write_lines(target, &orig);
    let first = files[0].clone();
    let orig_first = read_lines(&first);
    let mut lines = orig_first.clone();
    // Under a steady cap every file opens with a checkpoint; its `reason` is
    // outside the MAC, so only the chain can catch this.
    lines[0] = lines[0].replacen("meta_capi", "meta_capj", 1).replacen(
        "max_total_bytes",
        "max_total_bytez",
        1,
    );
    assert_ne!(lines[0], orig_first[0]);
    write_lines(&first, &lines);
    let e = verify_capped(dir.path()).unwrap_err();
    assert_eq!((e.kind, e.line), (VerifyErrorKind::HashMismatch, 2), "{e}");
    write_lines(&first, &orig_first);
    // Removing the oldest kept file without a checkpoint is caught.
    std::fs::remove_file(&first).unwrap();
    let e = verify_capped(dir.path()).unwrap_err();
    assert_eq!(e.kind, VerifyErrorKind::FirstNotZero, "{e}");
    assert!(e.to_string().contains("authenticated checkpoint"), "{e}");
}

/// Append a checkpoint record at the end of the chain, as someone who can
/// write files but lacks the key would.
fn append_forged_checkpoint(dir: &Path, detail: serde_json::Value) {
    let files = audit_files(dir).unwrap();
    let last = files.last().unwrap();
    let mut lines = read_lines(last);
    let prev = sha256_hex(lines.last().unwrap().as_bytes());
    let mut r = AuditRecord::new(AuditKind::Checkpoint);
    r.reason = Some("max_total_bytes".into());
    r.detail = Some(detail);
    let line = String::from_utf8(super::chain::record_line(&r, &prev).unwrap()).unwrap();
    lines.push(line);
    write_lines(last, &lines);
}

#[tokio::test]
async fn a_checkpoint_forged_without_the_key_is_caught() {
    let dir = tempfile::tempdir().unwrap();
    write_n(capped(dir.path(), 64 << 10), 1500).await;
    let files = audit_files(dir.path()).unwrap();
    // Delete the two oldest kept files and cover it with a checkpoint whose MAC
    // is made under a key of the attacker's own.
    let removed: Vec<String> = files[..2]
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    let new_first: serde_json::Value = serde_json::from_str(&read_lines(&files[2])[0]).unwrap();
    for f in &files[..2] {
        std::fs::remove_file(f).unwrap();
    }
    let attacker =
        CheckpointKey::from_pseudonym_key(&PseudonymKey::from_hex(&"66".repeat(32)).unwrap());
    let last = audit_files(dir.path()).unwrap().pop().unwrap();
    let prev = sha256_hex(read_lines(&last).last().unwrap().as_bytes());
    let ts = chrono::Utc::now();
    let facts = super::checkpoint::CheckpointFacts {
        ts: ts_text(&ts),
        anchor: new_first["prev_hash"].as_str().unwrap().to_string(),
        removed_files: removed,
        removed_records: 10,
        removed_bytes: 5000,
        first_kept: files[2].file_name().unwrap().to_string_lossy().into_owned(),
    };
    let mac = attacker.sign(&facts, &prev);
    {
        let mut lines = read_lines(&last);
        let mut r = AuditRecord::new(AuditKind::Checkpoint);
        r.ts = ts;
        r.reason = Some("max_total_bytes".into());
        r.detail = Some(facts.detail(&mac));
        lines.push(String::from_utf8(super::chain::record_line(&r, &prev).unwrap()).unwrap());
        write_lines(&last, &lines);
    }
    let e = verify_capped(dir.path()).unwrap_err();
    assert_eq!(e.kind, VerifyErrorKind::BadCheckpoint, "{e}");
    assert_eq!(e.file, last);

    // Replaying a genuine checkpoint's detail elsewhere in the chain fails too:
    // the MAC covers the record's own prev_hash.
    let dir = tempfile::tempdir().unwrap();
    write_n(capped(dir.path(), 64 << 10), 1500).await;
    let genuine = all_lines(dir.path())
        .into_iter()
        .find(|(_, _, v)| v["kind"] == "checkpoint")
        .unwrap()
        .2;
    append_forged_checkpoint(dir.path(), genuine["detail"].clone());
    let e = verify_capped(dir.path()).unwrap_err();
    assert_eq!(e.kind, VerifyErrorKind::BadCheckpoint, "{e}");
}

#[tokio::test]
async fn an_interrupted_removal_leaves_files_that_verify_skips() {
    let dir = tempfile::tempdir().unwrap();
    let cap = 64 << 10;
    // Fill up to just before the first removal and keep a copy of every file.
    let w = AuditWriter::start(capped(dir.path(), cap)).unwrap();
    let snapshot = tempfile::tempdir().unwrap();
    let mut i = 0;
    loop {
        for f in audit_files(dir.path()).unwrap() {
            std::fs::copy(&f, snapshot.path().join(f.file_name().unwrap())).unwrap();
        }
        w.submit(vec![rec(i)]).unwrap();
        w.flush().await.unwrap();
        i += 1;
        let text: String = audit_files(dir.path())
            .unwrap()
            .iter()
            .map(|f| std::fs::read_to_string(f).unwrap())
            .collect();
        if text.contains("\"kind\":\"checkpoint\"") {
            break;
        }
        assert!(i < 5000, "no checkpoint written");
    }
    drop(w);
    // A crash after the checkpoint but before the files went: put them back.
    let mut restored = 0;
    for f in std::fs::read_dir(snapshot.path()).unwrap().flatten() {
        let target = dir.path().join(f.file_name());
        if !target.exists() {
            std::fs::copy(f.path(), &target).unwrap();
            restored += 1;
        }
    }
    assert!(restored >= 1);
    // All files present: the chain runs from 64 zeros, the checkpoint checks out.
    let r = verify_capped(dir.path()).unwrap();
    assert!(
        r.capped.is_none() && r.checkpoints_authenticated == 1,
        "{r:?}"
    );
    // Without the key it passes too (nothing is missing), saying the checkpoint was not checked.
    let r = verify_trail(&[dir.path().to_path_buf()], None, None).unwrap();
    assert_eq!(r.checkpoints_unchecked, 1);
    // Only the first of the removed files went: the rest are leftovers.
    if restored >= 2 {
        std::fs::remove_file(&audit_files(dir.path()).unwrap()[0]).unwrap();
        let r = verify_capped(dir.path()).unwrap();
        let c = r.capped.expect("capped");
        assert!(c.leftover_records > 0, "{c:?}");
    }
    // The next start removes them and the trail verifies from the anchor.
    write_n(capped(dir.path(), cap), 5).await;
    assert!(dir_bytes(dir.path()) <= cap);
    let r = verify_capped(dir.path()).unwrap();
    assert_eq!(r.capped.unwrap().leftover_records, 0);
}

#[tokio::test]
async fn a_smaller_cap_on_start_removes_at_once_but_never_the_current_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut big = capped(dir.path(), 1 << 20);
    big.max_file_bytes = 8 << 10;
    write_n(big, 1500).await;
    assert!(dir_bytes(dir.path()) > 64 << 10);
    let before = audit_files(dir.path()).unwrap();
    let w = AuditWriter::start(capped(dir.path(), 64 << 10)).unwrap();
    assert!(dir_bytes(dir.path()) <= 64 << 10);
    let after = audit_files(dir.path()).unwrap();
    // The new current file holds the checkpoint as its first line.
    let current = after.last().unwrap();
    assert!(!before.contains(current));
    let first: serde_json::Value = serde_json::from_str(&read_lines(current)[0]).unwrap();
    assert_eq!(first["kind"], "checkpoint");
    w.submit(vec![rec(1)]).unwrap();
    w.flush().await.unwrap();
    drop(w);
    verify_capped(dir.path()).unwrap();

    // A checkpoint never names the file it is written into (the file being
    // written), and never a file newer than it.
    let dir = tempfile::tempdir().unwrap();
    write_n(capped(dir.path(), 64 << 10), 3000).await;
    let mut seen = 0;
    for (f, line, v) in all_lines(dir.path()) {
        if v["kind"] != "checkpoint" {
            continue;
        }
        seen += 1;
        assert_eq!(line, 0, "a checkpoint opens the file it is written into");
        let own = f.file_name().unwrap().to_str().unwrap().to_string();
        for r in v["detail"]["removed_files"].as_array().unwrap() {
            assert!(r.as_str().unwrap() < own.as_str(), "{v}");
        }
        assert!(v["detail"]["first_kept"].as_str().unwrap() <= own.as_str());
    }
    assert!(seen >= 2, "{seen} checkpoints");
    verify_capped(dir.path()).unwrap();
}

#[tokio::test]
async fn an_encrypted_capped_trail_needs_both_keys() {
    let dir = tempfile::tempdir().unwrap();
    let key = EncKey::from_hex(&"5a".repeat(32)).unwrap();
    let mut o = capped(dir.path(), 64 << 10);
    o.encryption = Some(key.clone());
    write_n(o, 800).await;
    let paths = [dir.path().to_path_buf()];
    let r = verify_trail(&paths, Some(&key), Some(&ckey())).unwrap();
    assert!(r.capped.is_some());
    let e = verify_trail(&paths, Some(&key), None).unwrap_err();
    assert_eq!(e.kind, VerifyErrorKind::CheckpointKeyNeeded, "{e}");
    assert!(verify_trail(&paths, None, Some(&ckey())).is_err());
}

#[test]
fn a_cap_without_a_checkpoint_key_or_below_the_minimum_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = capped(dir.path(), 64 << 10);
    o.checkpoint_key = None;
    let e = AuditWriter::start(o).unwrap_err();
    assert!(e.contains("checkpoint key"), "{e}");
    let e = AuditWriter::start(capped(dir.path(), 1000)).unwrap_err();
    assert!(e.contains("minimum"), "{e}");
}
