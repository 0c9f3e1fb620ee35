//! The file outbox (`sync.outbox`, used with `consent.source: file`): a
//! directory one process owns (locked like `audit.path` and `consent.journal`),
//! 0700 with 0600 files.
//!
//! - `outbox.log`: one JSON object a line. `add` (a new entry: target, patient
//!   pseudonym, creation time, the sealed payload), `try` (an attempt that did
//!   not deliver: attempts, next attempt, parked, why) and `done` (delivered, or
//!   no longer owed). Replayed on start; appended and fsync'd as things happen.
//!   Once nothing is pending (or dead lines outnumber live ones) the file is
//!   rewritten with only the live entries (temporary file, fsync, rename, fsync
//!   of the directory), so a delivered entry's sealed payload leaves the disk.
//! - `ledger.log`: `<key> <stamp>` lines: for each (target, patient), the stamp
//!   of the last denial queued (see `Target::stamp`), so reloads and restarts
//!   queue nothing twice; `<key> -` forgets a deleted patient. Keys are keyed
//!   HMACs of target and patient id, stamps digests: neither names anyone.
//!   Rewritten on start.
//!
//! A torn last line (a crash mid-append) is cut off with a log line; any other
//! bad line refuses to start, naming the file and line.

use crate::state::{self, DirLock};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

pub(crate) const LOG_FILE: &str = "outbox.log";
const LEDGER_FILE: &str = "ledger.log";

/// One undelivered entry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Entry {
    pub(crate) id: u64,
    pub(crate) target: String,
    /// The patient's pseudonym (audit, status); the id itself is in the sealed payload.
    pub(crate) patient: String,
    /// Unix ms.
    pub(crate) created: i64,
    #[serde(default)]
    pub(crate) attempts: u32,
    /// Unix ms of the next attempt.
    #[serde(default)]
    pub(crate) next: i64,
    #[serde(default)]
    pub(crate) parked: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) error: Option<String>,
    /// The sealed payload envelope (`{"v":1,"nonce","ct"}`).
    pub(crate) sealed: serde_json::Value,
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Line {
    Add(Entry),
    Try {
        id: u64,
        attempts: u32,
        next: i64,
        parked: bool,
        #[serde(default)]
        error: Option<String>,
    },
    Done {
        id: u64,
    },
}

/// What replaying the log gives.
#[derive(Default)]
pub(crate) struct Replayed {
    pub(crate) entries: BTreeMap<u64, Entry>,
    pub(crate) lines: usize,
}

/// Read `outbox.log` (read-only: also used by `consentgate sync status` next to
/// a running proxy). A torn last line is ignored and reported in `torn`.
pub(crate) fn replay(path: &Path) -> Result<(Replayed, Option<u64>), String> {
    let mut out = Replayed::default();
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((out, None)),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let mut good_len = 0u64;
    let mut torn = None;
    let mut offset = 0usize;
    let lines: Vec<&[u8]> = bytes.split_inclusive(|b| *b == b'\n').collect();
    let n = lines.len();
    for (i, raw) in lines.into_iter().enumerate() {
        let complete = raw.ends_with(b"\n");
        let text = raw.strip_suffix(b"\n").unwrap_or(raw);
        offset += raw.len();
        if text.iter().all(u8::is_ascii_whitespace) {
            if complete {
                good_len = offset as u64;
            }
            continue;
        }
        match serde_json::from_slice::<Line>(text) {
            Ok(line) if complete => {
                out.lines += 1;
                good_len = offset as u64;
                match line {
                    Line::Add(e) => {
                        out.entries.insert(e.id, e);
                    }
                    Line::Try {
                        id,
                        attempts,
                        next,
                        parked,
                        error,
                    } => {
                        if let Some(e) = out.entries.get_mut(&id) {
                            e.attempts = attempts;
                            e.next = next;
                            e.parked = parked;
                            e.error = error;
                        }
                    }
                    Line::Done { id } => {
                        out.entries.remove(&id);
                    }
                }
            }
            _ if i + 1 == n => torn = Some(good_len),
            _ => {
                return Err(format!(
                "{} line {}: not an outbox record (the file was altered; move it aside to start \
                     with an empty outbox)",
                path.display(),
                i + 1
            ))
            }
        }
    }
    Ok((out, torn))
}

/// Read `ledger.log` into key → stamp.
fn read_ledger(path: &Path) -> Result<HashMap<String, String>, String> {
    let mut map = HashMap::new();
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(map),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    for line in std::io::BufReader::new(f).split(b'\n') {
        let line = line.map_err(|e| format!("{}: {e}", path.display()))?;
        let text = String::from_utf8_lossy(&line);
        // A torn or foreign line is skipped: the worst case is one denial queued again.
        let Some((k, s)) = text.trim().split_once(' ') else {
            continue;
        };
        if s == "-" {
            map.remove(k);
        } else if k.len() == 32 && s.len() == 32 {
            map.insert(k.to_string(), s.to_string());
        }
    }
    Ok(map)
}

/// The open outbox files. Not shared across processes (the directory lock).
pub(crate) struct FileOutbox {
    dir: PathBuf,
    _lock: DirLock,
    log: File,
    ledger: File,
    pub(crate) entries: BTreeMap<u64, Entry>,
    next_id: u64,
    /// Lines in `outbox.log` that no longer describe a live entry.
    dead: usize,
}

fn append_options() -> std::fs::OpenOptions {
    let mut o = state::private_file_options();
    o.create(true).append(true);
    o
}

impl FileOutbox {
    /// Lock and open `dir`, replay the log, compact both files. Returns the
    /// outbox and the ledger.
    pub(super) fn open(dir: &Path) -> Result<(FileOutbox, HashMap<String, String>), String> {
        let lock = DirLock::acquire(dir, "sync.outbox")?;
        let log_path = dir.join(LOG_FILE);
        let (replayed, torn) = replay(&log_path)?;
        if let Some(len) = torn {
            tracing::warn!(path = %log_path.display(), "torn last line of the sync outbox cut off");
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&log_path)
                .map_err(|e| format!("{}: {e}", log_path.display()))?;
            f.set_len(len)
                .and_then(|_| f.sync_all())
                .map_err(|e| format!("{}: {e}", log_path.display()))?;
        }
        let ledger = read_ledger(&dir.join(LEDGER_FILE))?;
        for p in [log_path.clone(), dir.join(LEDGER_FILE)] {
            if p.exists() {
                state::tighten_file(&p).map_err(|e| format!("{}: {e}", p.display()))?;
            }
        }
        let next_id = replayed.entries.keys().next_back().map_or(1, |k| k + 1);
        let open = |p: PathBuf| {
            append_options()
                .open(&p)
                .map_err(|e| format!("{}: {e}", p.display()))
        };
        let mut ob = FileOutbox {
            log: open(log_path)?,
            ledger: open(dir.join(LEDGER_FILE))?,
            dir: dir.to_path_buf(),
            _lock: lock,
            entries: replayed.entries,
            next_id,
            dead: replayed.lines,
        };
        ob.compact()?;
        ob.rewrite_ledger(&ledger)?;
        Ok((ob, ledger))
    }

    fn write_line(f: &mut File, line: &Line) -> Result<(), String> {
        let mut text = serde_json::to_vec(line).map_err(|e| e.to_string())?;
        text.push(b'\n');
        f.write_all(&text)
            .map_err(|e| format!("sync outbox write: {e}"))
    }

    /// Queue a new entry (durable after [`FileOutbox::sync`]).
    pub(super) fn add(
        &mut self,
        target: &str,
        patient: String,
        now_ms: i64,
        sealed: serde_json::Value,
    ) -> Result<u64, String> {
        let id = self.next_id;
        self.next_id += 1;
        let e = Entry {
            id,
            target: target.to_string(),
            patient,
            created: now_ms,
            attempts: 0,
            next: now_ms,
            parked: false,
            error: None,
            sealed,
        };
        let written = Self::write_line(&mut self.log, &Line::Add(e.clone()));
        // Kept in memory either way: delivery goes on, and a restart offers it again.
        self.entries.insert(id, e);
        written.map(|()| id)
    }

    pub(super) fn ledger_set(&mut self, key: &str, stamp: &str) -> Result<(), String> {
        self.ledger
            .write_all(format!("{key} {stamp}\n").as_bytes())
            .map_err(|e| format!("sync ledger write: {e}"))
    }

    pub(super) fn ledger_forget(&mut self, key: &str) -> Result<(), String> {
        self.ledger_set(key, "-")
    }

    /// An attempt that did not deliver.
    pub(super) fn record_try(
        &mut self,
        id: u64,
        attempts: u32,
        next: i64,
        parked: bool,
        error: Option<String>,
    ) -> Result<(), String> {
        let Some(e) = self.entries.get_mut(&id) else {
            return Ok(());
        };
        e.attempts = attempts;
        e.next = next;
        e.parked = parked;
        e.error = error.clone();
        self.dead += 1;
        Self::write_line(
            &mut self.log,
            &Line::Try {
                id,
                attempts,
                next,
                parked,
                error,
            },
        )?;
        self.sync()
    }

    /// The entry is delivered (or no longer owed): gone, and its payload leaves
    /// the disk at the next compaction (at once when nothing else is pending).
    pub(super) fn record_done(&mut self, id: u64) -> Result<(), String> {
        if self.entries.remove(&id).is_none() {
            return Ok(());
        }
        self.dead += 2;
        Self::write_line(&mut self.log, &Line::Done { id })?;
        self.sync()?;
        if self.entries.is_empty() || self.dead > 4 * self.entries.len() + 256 {
            self.compact()?;
        }
        Ok(())
    }

    /// fsync both files.
    pub(super) fn sync(&mut self) -> Result<(), String> {
        self.log
            .sync_data()
            .and_then(|_| self.ledger.sync_data())
            .map_err(|e| format!("sync outbox fsync: {e}"))
    }

    /// Rewrite `outbox.log` with only the live entries.
    pub(super) fn compact(&mut self) -> Result<(), String> {
        if self.dead == 0 {
            return Ok(());
        }
        let mut text = Vec::new();
        for e in self.entries.values() {
            let mut l = serde_json::to_vec(&Line::Add(e.clone())).map_err(|e| e.to_string())?;
            l.push(b'\n');
            text.extend_from_slice(&l);
        }
        self.log = self.replace(LOG_FILE, &text)?;
        self.dead = 0;
        Ok(())
    }

    fn rewrite_ledger(&mut self, ledger: &HashMap<String, String>) -> Result<(), String> {
        let mut text = Vec::with_capacity(ledger.len() * 66);
        for (k, s) in ledger {
            text.extend_from_slice(format!("{k} {s}\n").as_bytes());
        }
        self.ledger = self.replace(LEDGER_FILE, &text)?;
        Ok(())
    }

    /// Atomically replace `name` with `text`; returns the new file open for appends.
    fn replace(&self, name: &str, text: &[u8]) -> Result<File, String> {
        let path = self.dir.join(name);
        let tmp = self.dir.join(format!("{name}.tmp"));
        let err = |e: std::io::Error| format!("{}: {e}", tmp.display());
        let mut f = state::private_file_options()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(err)?;
        f.write_all(text).and_then(|_| f.sync_all()).map_err(err)?;
        std::fs::rename(&tmp, &path).map_err(|e| format!("{}: {e}", path.display()))?;
        if let Ok(d) = File::open(&self.dir) {
            let _ = d.sync_all();
        }
        append_options()
            .open(&path)
            .map_err(|e| format!("{}: {e}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_survive_reopen_and_delivered_ones_leave_the_file() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("ob");
        {
            let (mut ob, ledger) = FileOutbox::open(&dir).unwrap();
            assert!(ledger.is_empty());
            let a = ob
                .add("t", "p1".into(), 1, serde_json::json!({"ct": "aa"}))
                .unwrap();
            let b = ob
                .add("t", "p2".into(), 2, serde_json::json!({"ct": "bb"}))
                .unwrap();
            ob.ledger_set(&"a".repeat(32), &"b".repeat(32)).unwrap();
            ob.sync().unwrap();
            ob.record_try(a, 1, 99, false, Some("http 503".into()))
                .unwrap();
            ob.record_done(b).unwrap();
        }
        {
            let (mut ob, ledger) = FileOutbox::open(&dir).unwrap();
            assert_eq!(ledger.get(&"a".repeat(32)).unwrap(), &"b".repeat(32));
            assert_eq!(ob.entries.len(), 1);
            let e = ob.entries.values().next().unwrap().clone();
            assert_eq!(
                (e.attempts, e.next, e.error.as_deref()),
                (1, 99, Some("http 503"))
            );
            ob.record_done(e.id).unwrap();
            assert!(ob.entries.is_empty());
        }
        assert_eq!(std::fs::read(dir.join(LOG_FILE)).unwrap(), b"");
        // A torn tail is cut, not fatal.
        std::fs::write(
            dir.join(LOG_FILE),
            b"{\"op\":\"done\",\"id\":1}\n{\"op\":\"ad",
        )
        .unwrap();
        let (ob, _) = FileOutbox::open(&dir).unwrap();
        assert!(ob.entries.is_empty());
        drop(ob);
        std::fs::write(dir.join(LOG_FILE), b"garbage\n{\"op\":\"done\",\"id\":1}\n").unwrap();
        let err = FileOutbox::open(&dir).err().unwrap();
        assert!(err.contains("line 1"), "{err}");
    }
}
