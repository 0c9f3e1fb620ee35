//! The consent journal: a durable, append-only log of admin-API writes
//! (`consent.journal` is a directory holding `journal.jsonl`).
//!
//! One JSON object a line:
//! `{"op":"put","record":{..stored form, no plaintext..},"actor":"name","ts":"..."}`
//! `{"op":"delete","patient_id":"P-1","actor":"name","ts":"..."}`
//!
//! Every append is fsync'd before it returns. On open the journal is replayed
//! into its live state (the last entry per patient); a torn last line (a crash
//! mid-write) is cut off with a warning. When the log grows past its limits and
//! at least half of it is superseded entries, it is compacted: the live state is
//! written to a new file, fsync'd, renamed over the old one, and the directory
//! fsync'd. The journal itself is not thread-safe; its owner serialises access.

use super::record::ConsentRecord;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

pub const JOURNAL_FILE: &str = "journal.jsonl";
const COMPACT_TMP: &str = "journal.jsonl.compact";

/// One journal line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
pub enum Entry {
    Put {
        record: Box<ConsentRecord>,
        actor: String,
        ts: DateTime<Utc>,
    },
    Delete {
        patient_id: String,
        actor: String,
        ts: DateTime<Utc>,
    },
}

impl Entry {
    pub fn patient_id(&self) -> &str {
        match self {
            Entry::Put { record, .. } => &record.patient_id,
            Entry::Delete { patient_id, .. } => patient_id,
        }
    }
}

/// When to compact.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_entries: u64,
    pub max_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_entries: 10_000,
            max_bytes: 16 * 1024 * 1024,
        }
    }
}

pub struct Journal {
    dir: PathBuf,
    file: File,
    entries: u64,
    bytes: u64,
    limits: Limits,
    state: HashMap<String, Entry>,
}

impl Journal {
    /// Open (creating the directory and file when missing) and replay.
    pub fn open(dir: &Path, limits: Limits) -> Result<Journal, String> {
        let created_dir = !dir.exists();
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("consent journal {}: {e}", dir.display()))?;
        if created_dir {
            tracing::info!(path = %dir.display(), "created consent journal directory");
            if let Some(parent) = dir.parent() {
                sync_dir(parent);
            }
        }
        let path = dir.join(JOURNAL_FILE);
        // A compaction interrupted before its rename leaves a stale temp file.
        let _ = std::fs::remove_file(dir.join(COMPACT_TMP));
        let existed = path.exists();
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(|e| format!("consent journal {}: {e}", path.display()))?;
        if !existed {
            sync_dir(dir);
        }
        let mut buf = Vec::new();
        file.read_to_end(&mut buf)
            .map_err(|e| format!("consent journal {}: {e}", path.display()))?;
        let (state, entries, good_len) = replay(&buf, &path)?;
        if good_len < buf.len() as u64 {
            tracing::warn!(
                path = %path.display(),
                dropped_bytes = buf.len() as u64 - good_len,
                "consent journal: torn last line (crash mid-write) ignored and truncated"
            );
            file.set_len(good_len)
                .and_then(|_| file.sync_data())
                .map_err(|e| format!("consent journal {}: truncate: {e}", path.display()))?;
        }
        file.seek(SeekFrom::End(0))
            .map_err(|e| format!("consent journal {}: {e}", path.display()))?;
        Ok(Journal {
            dir: dir.to_path_buf(),
            file,
            entries,
            bytes: good_len,
            limits,
            state,
        })
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(JOURNAL_FILE)
    }

    /// The live journaled state: the last entry per patient.
    pub fn state(&self) -> &HashMap<String, Entry> {
        &self.state
    }

    pub fn entries(&self) -> u64 {
        self.entries
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Append a put of a record (its stored form is what is written).
    pub fn append_put(&mut self, record: ConsentRecord, actor: &str) -> Result<(), String> {
        self.append(Entry::Put {
            record: Box::new(record.into_stored()),
            actor: actor.to_string(),
            ts: Utc::now(),
        })
    }

    pub fn append_delete(&mut self, patient_id: &str, actor: &str) -> Result<(), String> {
        self.append(Entry::Delete {
            patient_id: patient_id.to_string(),
            actor: actor.to_string(),
            ts: Utc::now(),
        })
    }

    /// Append one entry and fsync it; on failure nothing is recorded.
    pub fn append(&mut self, entry: Entry) -> Result<(), String> {
        let mut line = serde_json::to_vec(&entry)
            .map_err(|e| format!("consent journal: encode entry: {e}"))?;
        line.push(b'\n');
        let res = self
            .file
            .write_all(&line)
            .and_then(|_| self.file.sync_data());
        if let Err(e) = res {
            // Do not leave a partial line for the next append to follow.
            let _ = self.file.set_len(self.bytes);
            let _ = self.file.seek(SeekFrom::End(0));
            return Err(format!(
                "consent journal {}: write: {e}",
                self.path().display()
            ));
        }
        self.entries += 1;
        self.bytes += line.len() as u64;
        self.state.insert(entry.patient_id().to_string(), entry);
        if self.should_compact() {
            if let Err(e) = self.compact() {
                // The entry itself is durable; compaction is retried next time.
                tracing::warn!(error = %e, "consent journal compaction failed");
            }
        }
        Ok(())
    }

    fn should_compact(&self) -> bool {
        let live = self.state.len() as u64;
        (self.entries > self.limits.max_entries || self.bytes > self.limits.max_bytes)
            && self.entries >= live.saturating_mul(2).max(1)
    }

    /// Rewrite the journal as its live state: new file, fsync, atomic rename,
    /// fsync of the directory.
    pub fn compact(&mut self) -> Result<(), String> {
        let tmp = self.dir.join(COMPACT_TMP);
        let path = self.path();
        let err = |e: std::io::Error| format!("consent journal compaction {}: {e}", tmp.display());
        let mut entries: Vec<&Entry> = self.state.values().collect();
        entries.sort_by_key(|e| entry_ts(e));
        let mut out = Vec::new();
        for e in &entries {
            serde_json::to_writer(&mut out, e)
                .map_err(|e| format!("consent journal compaction: encode: {e}"))?;
            out.push(b'\n');
        }
        {
            let mut f = File::create(&tmp).map_err(err)?;
            f.write_all(&out).map_err(err)?;
            f.sync_all().map_err(err)?;
        }
        std::fs::rename(&tmp, &path).map_err(err)?;
        sync_dir(&self.dir);
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .open(&path)
            .map_err(err)?;
        file.seek(SeekFrom::End(0)).map_err(err)?;
        let before = self.entries;
        self.file = file;
        self.entries = entries.len() as u64;
        self.bytes = out.len() as u64;
        tracing::info!(
            entries_before = before,
            entries_after = self.entries,
            "consent journal compacted"
        );
        Ok(())
    }
}

fn entry_ts(e: &Entry) -> DateTime<Utc> {
    match e {
        Entry::Put { ts, .. } | Entry::Delete { ts, .. } => *ts,
    }
}

/// Parse the journal bytes. Returns the state, the number of entries and the
/// length of the good prefix. Only the last line may be bad (torn); a bad line
/// before it is corruption, an error naming the line.
fn replay(buf: &[u8], path: &Path) -> Result<(HashMap<String, Entry>, u64, u64), String> {
    let mut state = HashMap::new();
    let mut entries = 0u64;
    let mut offset = 0usize;
    let mut lineno = 0usize;
    while offset < buf.len() {
        lineno += 1;
        let rest = &buf[offset..];
        let (line, next, terminated) = match rest.iter().position(|b| *b == b'\n') {
            Some(i) => (&rest[..i], offset + i + 1, true),
            None => (rest, buf.len(), false),
        };
        let is_last = next >= buf.len();
        if line.iter().all(|b| b.is_ascii_whitespace()) && terminated {
            offset = next;
            continue;
        }
        match serde_json::from_slice::<Entry>(line) {
            Ok(e) if terminated => {
                entries += 1;
                state.insert(e.patient_id().to_string(), e);
            }
            Err(e) if !is_last => {
                return Err(format!(
                    "consent journal {} line {lineno}: corrupt entry ({})",
                    path.display(),
                    super::record::describe_json_error(e)
                ))
            }
            // A bad last line, or a complete entry missing its newline: torn.
            _ => return Ok((state, entries, offset as u64)),
        }
        offset = next;
    }
    Ok((state, entries, offset as u64))
}

/// fsync a directory so a created or renamed entry in it is durable.
pub(crate) fn sync_dir(dir: &Path) {
    #[cfg(unix)]
    {
        if let Ok(d) = File::open(dir) {
            if let Err(e) = d.sync_all() {
                tracing::warn!(path = %dir.display(), error = %e, "fsync of directory failed");
            }
        }
    }
    #[cfg(not(unix))]
    let _ = dir;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str, t: &str) -> ConsentRecord {
        ConsentRecord::from_json(
            format!(
                r#"{{"patient_id":"{id}","identifiers":{{"emails":["a.b@example.com"],"phones":["+14155550100"]}},"gpc":true,"updated_at":"{t}"}}"#
            )
            .as_bytes(),
        )
        .unwrap()
    }

    #[test]
    fn journal_put_replay_round_trip() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("nested/consent-journal");
        {
            let mut j = Journal::open(&dir, Limits::default()).unwrap();
            j.append_put(rec("P-1", "2026-01-01T00:00:00Z"), "ops")
                .unwrap();
            j.append_put(rec("P-2", "2026-01-01T00:00:00Z"), "ops")
                .unwrap();
            j.append_delete("P-2", "crm").unwrap();
        }
        let text = std::fs::read_to_string(dir.join(JOURNAL_FILE)).unwrap();
        assert_eq!(text.lines().count(), 3);
        assert!(!text.contains("a.b@example.com") && !text.contains("4155550100"));
        assert!(text.contains(r#""op":"put""#) && text.contains(r#""actor":"ops""#));
        let j = Journal::open(&dir, Limits::default()).unwrap();
        assert_eq!(j.entries(), 3);
        match j.state().get("P-1").unwrap() {
            Entry::Put { record, actor, .. } => {
                assert!(record.gpc && actor == "ops");
                assert_eq!(record.identifiers.phone_sha256.len(), 2);
                assert!(record.is_stored_form());
            }
            e => panic!("{e:?}"),
        }
        assert!(matches!(j.state().get("P-2"), Some(Entry::Delete { .. })));
    }

    #[test]
    fn journal_torn_tail_ignored_and_truncated() {
        let d = tempfile::tempdir().unwrap();
        {
            let mut j = Journal::open(d.path(), Limits::default()).unwrap();
            j.append_put(rec("P-1", "2026-01-01T00:00:00Z"), "ops")
                .unwrap();
        }
        let path = d.path().join(JOURNAL_FILE);
        let good = std::fs::metadata(&path).unwrap().len();
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(br#"{"op":"put","record":{"patient_id":"P-2","upd"#)
            .unwrap();
        drop(f);
        let mut j = Journal::open(d.path(), Limits::default()).unwrap();
        assert_eq!(j.state().len(), 1);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), good);
        j.append_delete("P-1", "ops").unwrap();
        drop(j);
        let j = Journal::open(d.path(), Limits::default()).unwrap();
        assert_eq!(j.entries(), 2);
        assert!(matches!(j.state().get("P-1"), Some(Entry::Delete { .. })));
    }

    #[test]
    fn journal_corrupt_middle_line_is_an_error_naming_the_line() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join(JOURNAL_FILE),
            "{\"op\":\"bogus\"}\n{\"op\":\"delete\",\"patient_id\":\"P\",\"actor\":\"a\",\"ts\":\"2026-01-01T00:00:00Z\"}\n",
        )
        .unwrap();
        let e = Journal::open(d.path(), Limits::default()).err().unwrap();
        assert!(e.contains("line 1"), "{e}");
    }

    #[test]
    fn journal_compaction_keeps_state() {
        let d = tempfile::tempdir().unwrap();
        let limits = Limits {
            max_entries: 10,
            max_bytes: u64::MAX,
        };
        let mut j = Journal::open(d.path(), limits).unwrap();
        for i in 0..25 {
            let t = format!("2026-01-01T00:00:{i:02}Z");
            j.append_put(rec(&format!("P-{}", i % 3), &t), "ops")
                .unwrap();
        }
        j.append_delete("P-2", "ops").unwrap();
        assert!(j.entries() <= 10, "compacted: {}", j.entries());
        j.compact().unwrap();
        let before = j.state().clone();
        drop(j);
        let j = Journal::open(d.path(), limits).unwrap();
        assert_eq!(j.state(), &before);
        assert_eq!(j.entries(), 3);
        match j.state().get("P-0").unwrap() {
            Entry::Put { record, .. } => {
                assert_eq!(record.updated_at.to_rfc3339(), "2026-01-01T00:00:24+00:00")
            }
            e => panic!("{e:?}"),
        }
        assert!(!d.path().join(COMPACT_TMP).exists());
    }
}
