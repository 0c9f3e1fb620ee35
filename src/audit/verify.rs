//! `consentgate audit verify` and `audit find`: read audit files back.

use super::chain::{decode_line, sha256_hex, DecodeError, ZERO_HASH};
use super::crypto::EncKey;
use super::parse_file_name;
use super::pseudonym::PseudonymKey;
use chrono::{DateTime, Utc};
use serde_json::Value;
use std::fmt;
use std::path::{Path, PathBuf};

/// The audit files of `dir` in chain order (by day, then sequence number).
/// Other files are ignored.
pub fn audit_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
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
pub struct VerifyReport {
    pub records: u64,
    pub files: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VerifyErrorKind {
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
    /// A file could not be read.
    Io,
    /// No audit files in the paths given.
    NoFiles,
}

impl VerifyErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            VerifyErrorKind::HashMismatch => "hash mismatch",
            VerifyErrorKind::Unparseable => "unparseable record",
            VerifyErrorKind::TornTail => "torn tail",
            VerifyErrorKind::FirstNotZero => "first record's prev_hash is not 64 zeros",
            VerifyErrorKind::Decrypt => "cannot decrypt",
            VerifyErrorKind::Io => "cannot read",
            VerifyErrorKind::NoFiles => "no audit files",
        }
    }
}

/// The first bad record: its file, its 1-based line in that file and its 0-based
/// index in the whole chain (line 0 for Io and NoFiles).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyError {
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

/// Verify the hash chain over `paths` (files in the order given; a directory
/// stands for its audit files in chain order). The chain must start at 64 zeros
/// and run on across files. With encrypted files, `key` is needed.
pub fn verify(paths: &[PathBuf], key: Option<&EncKey>) -> Result<VerifyReport, VerifyError> {
    let files = expand(paths)?;
    let mut prev = ZERO_HASH.to_string();
    // Where the previous record was, for the mismatch message.
    let mut prev_at: Option<(PathBuf, usize)> = None;
    let mut index = 0u64;
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
            if d.prev_hash() != prev {
                let (kind, detail) = match &prev_at {
                    None => (
                        VerifyErrorKind::FirstNotZero,
                        "the first record must have prev_hash of 64 zeros (are earlier files missing?)".to_string(),
                    ),
                    Some((pf, pl)) => (
                        VerifyErrorKind::HashMismatch,
                        format!(
                            "prev_hash does not match the SHA-256 of the record before it ({} line {}): that record was altered or removed, records were reordered, or this record was altered",
                            pf.display(),
                            pl
                        ),
                    ),
                };
                return Err(err(n, index, kind, detail));
            }
            prev = sha256_hex(&d.plain);
            prev_at = Some((file.clone(), n));
            index += 1;
        }
    }
    Ok(VerifyReport {
        records: index,
        files: files.len(),
    })
}

/// The records of one patient (by pseudonym under `pseudonym_key`), oldest
/// first, optionally only those at or after `since`. Does not check the chain
/// (run `verify` for that); a torn tail is skipped, any other unreadable line is
/// an error.
pub fn find(
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
            if d.record.get("patient").and_then(Value::as_str) != Some(wanted.as_str()) {
                continue;
            }
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
            out.push(Value::Object(d.record));
        }
    }
    Ok(out)
}
