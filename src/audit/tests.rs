//! Writer + verify + find over real files.

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
