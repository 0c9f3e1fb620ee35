//! `consentgate audit verify` and `audit find`: read audit files back.
//!
//! # A capped trail
//!
//! Under `audit.max_total_bytes` the oldest files are gone and the first record
//! left does not have 64 zeros as `prev_hash`. [`verify_trail`] accepts that start
//! only when a `checkpoint` record further on, authenticated with the checkpoint
//! key, names it as its `anchor`; every record from there on is chained as usual,
//! and every checkpoint met is authenticated. Files a checkpoint names as removed
//! but that are still there (a crash between the checkpoint and the removal) are
//! chained but reported apart. Without the key a capped trail is refused as
//! "cannot verify" rather than passed: its start could be anywhere.

use super::chain::{decode_line, sha256_hex, DecodeError, ZERO_HASH};
use super::checkpoint::{CheckpointFacts, CheckpointKey};
use super::crypto::EncKey;
use super::parse_file_name;
use super::pseudonym::PseudonymKey;
use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use std::fmt;
use std::path::{Path, PathBuf};

/// The audit files of `dir` in chain order (by day, then sequence number).
/// Other files are ignored.
pub(super) fn audit_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<((u32, u64), PathBuf)> = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        if !entry.file_type()?.is_file() {
            continue;
        }
        if let Some(k) = parse_file_name(&path) {
            files.push((k, path));
        }
    }
    files.sort();
    Ok(files.into_iter().map(|(_, p)| p).collect())
}

/// A chain that verified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct VerifyReport {
    pub records: u64,
    pub files: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum VerifyErrorKind {
    /// `prev_hash` is not the SHA-256 of the previous record: that record was
    /// altered or removed, records were reordered, or this one was altered.
    HashMismatch,
    /// The line is not a JSON record with a `prev_hash`.
    Unparseable,
    /// The file ends in a partial line (no newline): a crash or a truncation.
    TornTail,
    /// The first record does not have 64 zeros as `prev_hash`.
    FirstNotZero,
    /// An encrypted line with no key, the wrong key, or an altered ciphertext.
    Decrypt,
    /// A checkpoint whose MAC does not check out with the key given (forged,
    /// altered, moved, or another key), or that is malformed.
    BadCheckpoint,
    /// The trail was capped (its start is a checkpoint's anchor) and no
    /// checkpoint key was given, so it cannot be verified.
    CheckpointKeyNeeded,
    /// A file could not be read.
    Io,
    /// No audit files in the paths given.
    NoFiles,
}

impl VerifyErrorKind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            VerifyErrorKind::HashMismatch => "hash mismatch",
            VerifyErrorKind::Unparseable => "unparseable record",
            VerifyErrorKind::TornTail => "torn tail",
            VerifyErrorKind::FirstNotZero => "first record's prev_hash is not 64 zeros",
            VerifyErrorKind::Decrypt => "cannot decrypt",
            VerifyErrorKind::BadCheckpoint => "checkpoint not authentic",
            VerifyErrorKind::CheckpointKeyNeeded => {
                "cannot verify a capped trail without the checkpoint key"
            }
            VerifyErrorKind::Io => "cannot read",
            VerifyErrorKind::NoFiles => "no audit files",
        }
    }
}

/// The first bad record: its file, its 1-based line in that file and its 0-based
/// index in the whole chain (line 0 for Io and NoFiles).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct VerifyError {
    pub file: PathBuf,
    pub line: usize,
    pub record_index: u64,
    pub kind: VerifyErrorKind,
    pub detail: String,
}

impl fmt::Display for VerifyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            VerifyErrorKind::Io | VerifyErrorKind::NoFiles => write!(
                f,
                "{}: {}: {}",
                self.file.display(),
                self.kind.as_str(),
                self.detail
            ),
            _ => write!(
                f,
                "{} line {} (record index {}): {}: {}",
                self.file.display(),
                self.line,
                self.record_index,
                self.kind.as_str(),
                self.detail
            ),
        }
    }
}

impl std::error::Error for VerifyError {}

fn expand(paths: &[PathBuf]) -> Result<Vec<PathBuf>, VerifyError> {
    let io = |p: &Path, e: std::io::Error| VerifyError {
        file: p.to_path_buf(),
        line: 0,
        record_index: 0,
        kind: VerifyErrorKind::Io,
        detail: e.to_string(),
    };
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            out.extend(audit_files(p).map_err(|e| io(p, e))?);
        } else {
            out.push(p.clone());
        }
    }
    if out.is_empty() {
        return Err(VerifyError {
            file: paths.first().cloned().unwrap_or_default(),
            line: 0,
            record_index: 0,
            kind: VerifyErrorKind::NoFiles,
            detail: "no audit-YYYYMMDD-NNNNNN.jsonl files found".into(),
        });
    }
    Ok(out)
}

/// One line of a file: its 1-based number and bytes, or a torn tail.
enum Line<'a> {
    Complete(usize, &'a [u8]),
    Torn(usize, usize),
}

fn lines(data: &[u8]) -> impl Iterator<Item = Line<'_>> {
    let mut pos = 0usize;
    let mut n = 0usize;
    std::iter::from_fn(move || {
        if pos >= data.len() {
            return None;
        }
        n += 1;
        match data[pos..].iter().position(|&b| b == b'\n') {
            Some(i) => {
                let line = &data[pos..pos + i];
                pos += i + 1;
                Some(Line::Complete(n, line))
            }
            None => {
                let torn = data.len() - pos;
                pos = data.len();
                Some(Line::Torn(n, torn))
            }
        }
    })
}

#[cfg(test)]
/// Verify the hash chain over `paths` (files in the order given; a directory
/// stands for its audit files in chain order). The chain must start at 64 zeros
/// and run on across files. With encrypted files, `key` is needed. A capped trail
/// is refused (see [`verify_trail`], which takes the checkpoint key).
pub(super) fn verify(paths: &[PathBuf], key: Option<&EncKey>) -> Result<VerifyReport, VerifyError> {
    verify_trail(paths, key, None).map(|r| r.chain)
}

/// What [`verify_trail`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct TrailReport {
    pub chain: VerifyReport,
    /// Checkpoints authenticated with the key.
    pub checkpoints_authenticated: u64,
    /// Checkpoints met in a trail that starts at 64 zeros, checked without a key:
    /// the chain covers them, but their MAC was not checked.
    pub checkpoints_unchecked: u64,
    /// Set when the trail was capped.
    pub capped: Option<CapReport>,
}

/// The checkpoint a capped trail starts from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct CapReport {
    /// Where that checkpoint is.
    pub file: PathBuf,
    pub line: usize,
    /// What it says was removed.
    pub removed_files: usize,
    pub removed_records: u64,
    /// Records still present in files it names as removed (chained, not counted
    /// in `chain.records`).
    pub leftover_records: u64,
}

/// A checkpoint met in the walk, and whether it justifies the start.
struct Start {
    /// `prev_hash` of the first record (64 zeros for an uncapped trail).
    hash: String,
    file: PathBuf,
    /// Set once the start is justified (zeros, or an authenticated anchor).
    anchored: Option<Option<CapReport>>,
    /// Checkpoints seen before a key was needed (to say so at the end).
    checkpoint_seen: bool,
}

/// [`verify`] for a trail that may have been capped: `checkpoint_key`
/// authenticates every checkpoint met, and lets the trail start at the anchor of
/// one of them instead of 64 zeros.
pub(crate) fn verify_trail(
    paths: &[PathBuf],
    key: Option<&EncKey>,
    checkpoint_key: Option<&CheckpointKey>,
) -> Result<TrailReport, VerifyError> {
    let files = expand(paths)?;
    let mut prev = ZERO_HASH.to_string();
    // Where the previous record was, for the mismatch message.
    let mut prev_at: Option<(PathBuf, usize)> = None;
    let mut index = 0u64;
    let mut start: Option<Start> = None;
    // Per file: its name, records, and the hash of its last line (files before
    // an anchor may be left over from an interrupted removal).
    let mut ends: Vec<(String, u64, String)> = Vec::new();
    let mut authenticated = 0u64;
    let mut unchecked = 0u64;
    for file in &files {
        let data = std::fs::read(file).map_err(|e| VerifyError {
            file: file.clone(),
            line: 0,
            record_index: index,
            kind: VerifyErrorKind::Io,
            detail: e.to_string(),
        })?;
        let err = |line: usize, index: u64, kind, detail: String| VerifyError {
            file: file.clone(),
            line,
            record_index: index,
            kind,
            detail,
        };
        let mut in_file = 0u64;
        for l in lines(&data) {
            let (n, bytes) = match l {
                Line::Complete(n, b) => (n, b),
                Line::Torn(n, len) => {
                    return Err(err(
                        n,
                        index,
                        VerifyErrorKind::TornTail,
                        format!(
                            "the file ends in a partial line of {len} bytes (crash or truncation)"
                        ),
                    ))
                }
            };
            let d = decode_line(bytes, key).map_err(|e| match e {
                DecodeError::Unparseable(m) => err(n, index, VerifyErrorKind::Unparseable, m),
                DecodeError::Decrypt(m) => err(n, index, VerifyErrorKind::Decrypt, m),
            })?;
            match &prev_at {
                None => {
                    let zero = d.prev_hash() == ZERO_HASH;
                    if !zero && checkpoint_key.is_none() {
                        // Without the key this start can never be accepted: say
                        // why at once (a capped trail, or files missing).
                        return Err(match first_checkpoint(&files, key) {
                            Some((f, n, i)) => VerifyError {
                                file: f,
                                line: n,
                                record_index: i,
                                kind: VerifyErrorKind::CheckpointKeyNeeded,
                                detail: KEY_NEEDED.into(),
                            },
                            None => err(
                                n,
                                index,
                                VerifyErrorKind::FirstNotZero,
                                FIRST_NOT_ZERO.into(),
                            ),
                        });
                    }
                    start = Some(Start {
                        hash: d.prev_hash().to_string(),
                        file: file.clone(),
                        anchored: zero.then_some(None),
                        checkpoint_seen: false,
                    });
                }
                Some((pf, pl)) => {
                    if d.prev_hash() != prev {
                        return Err(err(
                            n,
                            index,
                            VerifyErrorKind::HashMismatch,
                            format!(
                                "prev_hash does not match the SHA-256 of the record before it ({} line {}): that record was altered or removed, records were reordered, or this record was altered",
                                pf.display(),
                                pl
                            ),
                        ));
                    }
                }
            }
            let is_checkpoint = d.record.get("kind").and_then(Value::as_str) == Some("checkpoint");
            // `start` is set at the first record, so this always matches.
            if let (true, Some(st)) = (is_checkpoint, start.as_mut()) {
                st.checkpoint_seen = true;
                match checkpoint_key {
                    // Only reached for a trail that starts at 64 zeros.
                    None => unchecked += 1,
                    Some(ck) => {
                        let (facts, mac) = CheckpointFacts::from_record(&d.record)
                            .map_err(|m| err(n, index, VerifyErrorKind::BadCheckpoint, m))?;
                        if !ck.check(&facts, d.prev_hash(), &mac) {
                            return Err(err(
                                n,
                                index,
                                VerifyErrorKind::BadCheckpoint,
                                "its MAC does not match: the checkpoint was forged or altered, \
                                 or it was signed with another key"
                                    .into(),
                            ));
                        }
                        authenticated += 1;
                        if st.anchored.is_none() {
                            st.anchored = anchor_start(&st.hash, &facts, &ends, file, n);
                        }
                    }
                }
            }
            prev = sha256_hex(&d.plain);
            prev_at = Some((file.clone(), n));
            index += 1;
            in_file += 1;
        }
        if in_file > 0 {
            ends.push((display_name(file), in_file, prev.clone()));
        }
    }
    let Some(st) = start else {
        // Only empty files: nothing to verify, nothing wrong.
        return Ok(TrailReport {
            chain: VerifyReport {
                records: 0,
                files: files.len(),
            },
            checkpoints_authenticated: 0,
            checkpoints_unchecked: 0,
            capped: None,
        });
    };
    match st.anchored {
        Some(capped) => {
            let leftover = capped.as_ref().map_or(0, |c| c.leftover_records);
            Ok(TrailReport {
                chain: VerifyReport {
                    records: index - leftover,
                    files: files.len(),
                },
                checkpoints_authenticated: authenticated,
                checkpoints_unchecked: unchecked,
                capped,
            })
        }
        None => {
            let detail = if st.checkpoint_seen {
                "the first record's prev_hash is neither 64 zeros nor the anchor of an \
                 authenticated checkpoint: records before it were removed without one"
            } else {
                FIRST_NOT_ZERO
            };
            Err(VerifyError {
                file: st.file,
                line: 1,
                record_index: 0,
                kind: VerifyErrorKind::FirstNotZero,
                detail: detail.into(),
            })
        }
    }
}

const FIRST_NOT_ZERO: &str =
    "the first record must have prev_hash of 64 zeros (are earlier files missing?)";
const KEY_NEEDED: &str = "the trail starts after removed records (audit.max_total_bytes) and this \
     is one of its checkpoints: give the key that signs them (--pseudonym-key-file) to verify it";

/// The first checkpoint record in `files` (file, line, record index), read
/// without checking the chain: only to tell a capped trail from missing files.
fn first_checkpoint(files: &[PathBuf], key: Option<&EncKey>) -> Option<(PathBuf, usize, u64)> {
    let mut index = 0u64;
    for file in files {
        let data = std::fs::read(file).ok()?;
        for l in lines(&data) {
            let Line::Complete(n, bytes) = l else {
                continue;
            };
            if let Ok(d) = decode_line(bytes, key) {
                if d.record.get("kind").and_then(Value::as_str) == Some("checkpoint") {
                    return Some((file.clone(), n, index));
                }
            }
            index += 1;
        }
    }
    None
}

/// Whether an authenticated checkpoint justifies a trail that starts at
/// `start_hash`: its anchor is that hash, or the end of a file it names as
/// removed, every file before which it names as removed too (left over from an
/// interrupted removal).
fn anchor_start(
    start_hash: &str,
    facts: &CheckpointFacts,
    ends: &[(String, u64, String)],
    file: &Path,
    line: usize,
) -> Option<Option<CapReport>> {
    let report = |leftover_records| {
        Some(Some(CapReport {
            file: file.to_path_buf(),
            line,
            removed_files: facts.removed_files.len(),
            removed_records: facts.removed_records,
            leftover_records,
        }))
    };
    if facts.anchor == start_hash {
        return report(0);
    }
    let mut leftover = 0;
    for (name, records, last) in ends {
        if !facts.removed_files.contains(name) {
            return None;
        }
        leftover += records;
        if *last == facts.anchor {
            return report(leftover);
        }
    }
    None
}

fn display_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string())
}

/// The records of one patient (by pseudonym under `pseudonym_key`), oldest
/// first, optionally only those at or after `since`. Does not check the chain
/// (run `verify` for that); a torn tail is skipped, any other unreadable line is
/// an error.
pub(crate) fn find(
    paths: &[PathBuf],
    key: Option<&EncKey>,
    patient_id: &str,
    since: Option<DateTime<Utc>>,
    pseudonym_key: &PseudonymKey,
) -> Result<Vec<Value>, VerifyError> {
    let files = expand(paths)?;
    let wanted = pseudonym_key.pseudonym(patient_id);
    let mut out = Vec::new();
    let mut index = 0u64;
    for file in &files {
        let data = std::fs::read(file).map_err(|e| VerifyError {
            file: file.clone(),
            line: 0,
            record_index: index,
            kind: VerifyErrorKind::Io,
            detail: e.to_string(),
        })?;
        for l in lines(&data) {
            let Line::Complete(n, bytes) = l else {
                continue;
            };
            let d = decode_line(bytes, key).map_err(|e| {
                let (kind, detail) = match e {
                    DecodeError::Unparseable(m) => (VerifyErrorKind::Unparseable, m),
                    DecodeError::Decrypt(m) => (VerifyErrorKind::Decrypt, m),
                };
                VerifyError {
                    file: file.clone(),
                    line: n,
                    record_index: index,
                    kind,
                    detail,
                }
            })?;
            index += 1;
            if let Some(since) = since {
                let ts = d
                    .record
                    .get("ts")
                    .and_then(Value::as_str)
                    .and_then(|s| DateTime::parse_from_rfc3339(s).ok());
                match ts {
                    Some(t) if t.with_timezone(&Utc) >= since => {}
                    _ => continue,
                }
            }
            let matching = for_patient(d.record, &wanted);
            out.extend(matching.map(Value::Object));
        }
    }
    Ok(out)
}

/// The record if it is about the patient whose pseudonym is `wanted`; for a
/// request `decision` record with `events`, one record per entry about them,
/// shaped as a record of its own (`detail.event` is the entry's index).
fn for_patient(
    record: Map<String, Value>,
    wanted: &str,
) -> Box<dyn Iterator<Item = Map<String, Value>>> {
    let about = |r: &Map<String, Value>| r.get("patient").and_then(Value::as_str) == Some(wanted);
    let mut record = record;
    let Some(Value::Array(events)) = record.remove("events") else {
        return Box::new(about(&record).then_some(record).into_iter());
    };
    let wanted = wanted.to_string();
    Box::new(events.into_iter().enumerate().filter_map(move |(i, ev)| {
        let Value::Object(ev) = ev else { return None };
        if ev.get("patient").and_then(Value::as_str) != Some(wanted.as_str()) {
            return None;
        }
        let mut r = record.clone();
        for k in ["patient", "decision", "reason", "rule"] {
            r.insert(k.into(), ev.get(k).cloned().unwrap_or(Value::Null));
        }
        for k in ["fields_stripped", "flags_set"] {
            let v = ev.get(k).cloned().unwrap_or_else(|| Value::Array(vec![]));
            r.insert(k.into(), v);
        }
        let matches = ev.get("matches").cloned().unwrap_or(Value::Null);
        r.insert(
            "detail".into(),
            serde_json::json!({"event": i, "matches": matches}),
        );
        Some(r)
    }))
}
