//! The consent journal: a durable, append-only log of admin-API writes
//! (`consent.journal` is a directory holding `journal.jsonl`).
//!
//! One JSON object a line:
//! `{"op":"put","record":{..stored form, no plaintext, "version":N..},"actor":"name","ts":"..."}`
//! `{"op":"delete","patient_id":"P-1","version":N,"actor":"name","ts":"..."}`
//!
//! - Every append is fsync'd before it returns. On open the journal is replayed
//!   into its live state (the last entry per patient); a torn last line (a crash
//!   mid-write) is cut off with a warning. When the log grows past its limits and
//!   at least half of it is superseded entries, it is compacted: the live state is
//!   written to a new file, fsync'd, renamed over the old one, and the directory
//!   fsync'd. The journal itself is not thread-safe; its owner serialises access.
//! - Versions: every entry carries the patient's version after the write (a
//!   delete too, so a record created again never reuses an old version and a
//!   stale `If-Match` cannot match it). Compaction keeps the last entry per
//!   patient, tombstones included, so versions survive it. Entries written
//!   before versions existed replay as one more than the version before them.
//! - State on disk (SPEC §12): the directory is locked ([`DirLock`]) before
//!   anything in it is written, so a second process fails at start naming the
//!   holder; it is 0700 and its files 0600 (looser ones are tightened, with a
//!   log line).
//! - Encryption at rest (`consent.journal_key_file`): each line is then the
//!   audit's AES-256-GCM envelope `{"v":1,"nonce":..,"ct":..}` of the entry, with
//!   the associated data `consentgate-journal-v1`, so no patient id, external id
//!   or hash is in clear in any journal file. On open, lines in clear or under
//!   `consent.journal_previous_key_file` are read and the whole journal is
//!   rewritten under the current key before anything else happens (turning
//!   encryption on, and key rotation). A line no configured key opens fails the
//!   start: it is never skipped.
//! - Read-only (`consentgate explain`): replays without the lock and never
//!   writes, truncates or rewrites anything.

use super::record::ConsentRecord;
use crate::audit::EncKey;
use crate::state::{private_file_options, tighten_file, DirLock};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

pub(crate) const JOURNAL_FILE: &str = "journal.jsonl";
const COMPACT_TMP: &str = "journal.jsonl.compact";
/// Associated data of every encrypted journal line (the audit has its own).
const AAD: &[u8] = b"consentgate-journal-v1";

/// One journal line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
pub(crate) enum Entry {
    Put {
        record: Box<ConsentRecord>,
        actor: String,
        ts: DateTime<Utc>,
    },
    Delete {
        patient_id: String,
        /// 0 only in journals written before versions existed.
        #[serde(default)]
        version: u64,
        actor: String,
        ts: DateTime<Utc>,
    },
}

impl Entry {
    pub(crate) fn patient_id(&self) -> &str {
        match self {
            Entry::Put { record, .. } => &record.patient_id,
            Entry::Delete { patient_id, .. } => patient_id,
        }
    }

    /// The patient's version after this entry.
    pub(crate) fn version(&self) -> u64 {
        match self {
            Entry::Put { record, .. } => record.version,
            Entry::Delete { version, .. } => *version,
        }
    }

    fn set_version(&mut self, v: u64) {
        match self {
            Entry::Put { record, .. } => record.version = v,
            Entry::Delete { version, .. } => *version = v,
        }
    }
}

/// When to compact.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    pub(crate) max_entries: u64,
    max_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_entries: 10_000,
            max_bytes: 16 * 1024 * 1024,
        }
    }
}

/// The journal's encryption keys.
#[derive(Clone, Debug, Default)]
pub(crate) struct Keys {
    /// `consent.journal_key_file`: every line is written under it.
    pub(crate) current: Option<EncKey>,
    /// `consent.journal_previous_key_file`: read only, during a rotation.
    pub(crate) previous: Option<EncKey>,
}

/// How to open a journal.
#[derive(Clone, Debug, Default)]
pub(crate) struct Options {
    pub(crate) limits: Limits,
    pub(crate) keys: Keys,
    /// Replay only: no lock, nothing written (`consentgate explain`).
    pub(crate) read_only: bool,
}

/// Read a journal key file (64 hex characters, as the audit's key). The file
/// is the operator's: it is never created here. `what` names the config key.
pub(crate) fn load_key(path: &Path, what: &str) -> Result<EncKey, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("{what} {}: {e}", path.display()))?;
    EncKey::from_hex(&text).map_err(|e| format!("{what} {}: {e}", path.display()))
}

pub(crate) struct Journal {
    dir: PathBuf,
    /// `None` when read-only.
    file: Option<File>,
    /// Held for as long as the journal is open (read-write only).
    lock: Option<DirLock>,
    key: Option<EncKey>,
    entries: u64,
    bytes: u64,
    limits: Limits,
    state: HashMap<String, Entry>,
}

impl Journal {
    /// Open (creating the directory and file when missing) and replay.
    pub(crate) fn open(dir: &Path, opts: &Options) -> Result<Journal, String> {
        if opts.read_only {
            return Self::open_read_only(dir, opts);
        }
        let created_dir = !dir.exists();
        // The lock comes first: nothing in the directory is touched without it.
        let lock = DirLock::acquire(dir, "consent.journal")?;
        if created_dir {
            if let Some(parent) = dir.parent() {
                sync_dir(parent);
            }
        }
        let path = dir.join(JOURNAL_FILE);
        // A compaction interrupted before its rename leaves a stale temp file.
        let _ = std::fs::remove_file(dir.join(COMPACT_TMP));
        let existed = path.exists();
        if existed {
            tighten_file(&path).map_err(|e| format!("consent journal {}: {e}", path.display()))?;
        }
        let mut file = private_file_options()
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
        let replayed = replay(&buf, &path, &opts.keys)?;
        if replayed.good_len < buf.len() as u64 {
            tracing::warn!(
                path = %path.display(),
                dropped_bytes = buf.len() as u64 - replayed.good_len,
                "consent journal: torn last line (crash mid-write) ignored and truncated"
            );
            file.set_len(replayed.good_len)
                .and_then(|_| file.sync_data())
                .map_err(|e| format!("consent journal {}: truncate: {e}", path.display()))?;
        }
        file.seek(SeekFrom::End(0))
            .map_err(|e| format!("consent journal {}: {e}", path.display()))?;
        let mut j = Journal {
            dir: dir.to_path_buf(),
            file: Some(file),
            lock: Some(lock),
            key: opts.keys.current.clone(),
            entries: replayed.entries,
            bytes: replayed.good_len,
            limits: opts.limits,
            state: replayed.state,
        };
        if replayed.rekey > 0 {
            // Lines in clear (encryption just turned on) or under the previous
            // key (rotation): rewrite all of it under the current key now, or
            // refuse to start rather than keep them.
            j.compact()
                .map_err(|e| format!("{e} (rewriting the journal under the current key)"))?;
            tracing::info!(
                lines = replayed.rekey,
                encrypted = j.key.is_some(),
                "consent journal rewritten under the configured key"
            );
        }
        Ok(j)
    }

    fn open_read_only(dir: &Path, opts: &Options) -> Result<Journal, String> {
        let path = dir.join(JOURNAL_FILE);
        let buf = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(format!("consent journal {}: {e}", path.display())),
        };
        let replayed = replay(&buf, &path, &opts.keys)?;
        Ok(Journal {
            dir: dir.to_path_buf(),
            file: None,
            lock: None,
            key: opts.keys.current.clone(),
            entries: replayed.entries,
            bytes: replayed.good_len,
            limits: opts.limits,
            state: replayed.state,
        })
    }

    pub(crate) fn path(&self) -> PathBuf {
        self.dir.join(JOURNAL_FILE)
    }

    /// Stop writing and release the directory lock now (the source is being
    /// dropped; its tasks may still hold this journal for a moment). Appends
    /// fail from here on.
    pub(crate) fn close(&mut self) {
        self.file = None;
        if self.lock.take().is_some() {
            tracing::debug!("consent journal closed");
        }
    }

    /// The live journaled state: the last entry per patient.
    pub(crate) fn state(&self) -> &HashMap<String, Entry> {
        &self.state
    }

    /// The patient's last journaled version (0: never written through the API).
    pub(crate) fn version_of(&self, patient_id: &str) -> u64 {
        self.state.get(patient_id).map_or(0, Entry::version)
    }

    #[cfg(test)]
    fn entries(&self) -> u64 {
        self.entries
    }

    /// Append a put of a record (its stored form is what is written).
    pub(crate) fn append_put(&mut self, record: ConsentRecord, actor: &str) -> Result<(), String> {
        self.append(Entry::Put {
            record: Box::new(record.into_stored()),
            actor: actor.to_string(),
            ts: Utc::now(),
        })
    }

    pub(crate) fn append_delete(
        &mut self,
        patient_id: &str,
        version: u64,
        actor: &str,
    ) -> Result<(), String> {
        self.append(Entry::Delete {
            patient_id: patient_id.to_string(),
            version,
            actor: actor.to_string(),
            ts: Utc::now(),
        })
    }

    /// One line as written: the entry's JSON, sealed when there is a key.
    fn encode(&self, entry: &Entry) -> Result<Vec<u8>, String> {
        let json =
            serde_json::to_vec(entry).map_err(|e| format!("consent journal: encode entry: {e}"))?;
        let mut line = match &self.key {
            Some(k) => k
                .seal_with(AAD, &json)
                .map_err(|e| format!("consent journal: {e}"))?,
            None => json,
        };
        line.push(b'\n');
        Ok(line)
    }

    /// Append one entry and fsync it; on failure nothing is recorded. An
    /// entry whose version is not above the patient's last one is given the
    /// next (versions only grow, as on replay).
    pub(crate) fn append(&mut self, mut entry: Entry) -> Result<(), String> {
        let prev = self.version_of(entry.patient_id());
        if entry.version() <= prev {
            entry.set_version(prev + 1);
        }
        let line = self.encode(&entry)?;
        let path = self.path();
        let Some(file) = self.file.as_mut() else {
            return Err("consent journal: not open for writing".into());
        };
        let res = file.write_all(&line).and_then(|_| file.sync_data());
        if let Err(e) = res {
            // Do not leave a partial line for the next append to follow.
            let _ = file.set_len(self.bytes);
            let _ = file.seek(SeekFrom::End(0));
            return Err(format!("consent journal {}: write: {e}", path.display()));
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

    /// Rewrite the journal as its live state (under the current key): new
    /// file (0600), fsync, atomic rename, fsync of the directory.
    pub(crate) fn compact(&mut self) -> Result<(), String> {
        if self.file.is_none() {
            return Err("consent journal: not open for writing".into());
        }
        let tmp = self.dir.join(COMPACT_TMP);
        let path = self.path();
        let err = |e: std::io::Error| format!("consent journal compaction {}: {e}", tmp.display());
        let mut entries: Vec<&Entry> = self.state.values().collect();
        entries.sort_by_key(|e| entry_ts(e));
        let mut out = Vec::new();
        for e in &entries {
            out.extend_from_slice(&self.encode(e)?);
        }
        {
            let mut f = private_file_options()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)
                .map_err(err)?;
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
        self.file = Some(file);
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

/// What a replay found.
struct Replayed {
    state: HashMap<String, Entry>,
    entries: u64,
    /// Length of the good prefix (a torn tail after it is cut).
    good_len: u64,
    /// Lines not under the current key (in clear with a key configured, or
    /// under the previous key): the journal must be rewritten.
    rekey: u64,
}

/// How a line was stored.
enum Sealed {
    Clear,
    Current,
    Previous,
}

/// Why a line did not decode.
enum LineError {
    /// Not a complete JSON line: a torn tail when it is the last one.
    Unparsable(serde_json::Error),
    /// Complete, and wrong for good: never skipped.
    Fatal(String),
}

fn decode_line(line: &[u8], keys: &Keys) -> Result<(Entry, Sealed), LineError> {
    // Encrypted lines are written by `EncKey::seal_with`, which starts them so.
    if !line.starts_with(b"{\"v\":") {
        let e = serde_json::from_slice::<Entry>(line).map_err(LineError::Unparsable)?;
        return Ok((e, Sealed::Clear));
    }
    let env: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(line).map_err(LineError::Unparsable)?;
    let (plain, sealed) = match (&keys.current, &keys.previous) {
        (None, None) => {
            return Err(LineError::Fatal(
                "is encrypted, and consent.journal_key_file is not set".into(),
            ))
        }
        (cur, prev) => {
            let opened = cur
                .as_ref()
                .and_then(|k| k.open_with(AAD, &env).ok())
                .map(|p| (p, Sealed::Current));
            match opened.or_else(|| {
                prev.as_ref()
                    .and_then(|k| k.open_with(AAD, &env).ok())
                    .map(|p| (p, Sealed::Previous))
            }) {
                Some(x) => x,
                None => {
                    return Err(LineError::Fatal(
                        "cannot be decrypted with consent.journal_key_file (or \
                         consent.journal_previous_key_file): wrong key, or the line was altered"
                            .into(),
                    ))
                }
            }
        }
    };
    let e = serde_json::from_slice::<Entry>(&plain).map_err(|e| {
        LineError::Fatal(format!(
            "corrupt entry ({})",
            super::record::describe_json_error(e)
        ))
    })?;
    Ok((e, sealed))
}

/// Parse the journal bytes. Only the last line may be unparsable (torn); a
/// bad line before it, or a line no key opens, is an error naming the line.
fn replay(buf: &[u8], path: &Path, keys: &Keys) -> Result<Replayed, String> {
    let mut out = Replayed {
        state: HashMap::new(),
        entries: 0,
        good_len: 0,
        rekey: 0,
    };
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
        match decode_line(line, keys) {
            Ok((mut e, sealed)) if terminated => {
                out.entries += 1;
                let rekey = match sealed {
                    Sealed::Clear => keys.current.is_some(),
                    Sealed::Current => false,
                    Sealed::Previous => true,
                };
                if rekey {
                    out.rekey += 1;
                }
                let prev = out.state.get(e.patient_id()).map_or(0, Entry::version);
                if e.version() <= prev {
                    // Written before versions existed: one more than the last.
                    e.set_version(prev + 1);
                }
                out.state.insert(e.patient_id().to_string(), e);
            }
            Err(LineError::Fatal(why)) if terminated => {
                return Err(format!(
                    "consent journal {} line {lineno}: {why}",
                    path.display()
                ))
            }
            Err(LineError::Unparsable(e)) if !is_last => {
                return Err(format!(
                    "consent journal {} line {lineno}: corrupt entry ({})",
                    path.display(),
                    super::record::describe_json_error(e)
                ))
            }
            // A bad last line, or a complete entry missing its newline: torn.
            _ => break,
        }
        offset = next;
    }
    out.good_len = offset as u64;
    Ok(out)
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

    fn opts(limits: Limits) -> Options {
        Options {
            limits,
            ..Default::default()
        }
    }

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
            let mut j = Journal::open(&dir, &Options::default()).unwrap();
            j.append_put(rec("P-1", "2026-01-01T00:00:00Z"), "ops")
                .unwrap();
            j.append_put(rec("P-2", "2026-01-01T00:00:00Z"), "ops")
                .unwrap();
            j.append_delete("P-2", 2, "crm").unwrap();
        }
        let text = std::fs::read_to_string(dir.join(JOURNAL_FILE)).unwrap();
        assert_eq!(text.lines().count(), 3);
        assert!(!text.contains("a.b@example.com") && !text.contains("4155550100"));
        assert!(text.contains(r#""op":"put""#) && text.contains(r#""actor":"ops""#));
        let j = Journal::open(&dir, &Options::default()).unwrap();
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
            let mut j = Journal::open(d.path(), &Options::default()).unwrap();
            j.append_put(rec("P-1", "2026-01-01T00:00:00Z"), "ops")
                .unwrap();
        }
        let path = d.path().join(JOURNAL_FILE);
        let good = std::fs::metadata(&path).unwrap().len();
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(br#"{"op":"put","record":{"patient_id":"P-2","upd"#)
            .unwrap();
        drop(f);
        let mut j = Journal::open(d.path(), &Options::default()).unwrap();
        assert_eq!(j.state().len(), 1);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), good);
        j.append_delete("P-1", 2, "ops").unwrap();
        drop(j);
        let j = Journal::open(d.path(), &Options::default()).unwrap();
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
        let e = Journal::open(d.path(), &Options::default()).err().unwrap();
        assert!(e.contains("line 1"), "{e}");
    }

    #[test]
    fn journal_compaction_keeps_state() {
        let d = tempfile::tempdir().unwrap();
        let limits = Limits {
            max_entries: 10,
            max_bytes: u64::MAX,
        };
        let mut j = Journal::open(d.path(), &opts(limits)).unwrap();
        for i in 0..25 {
            let t = format!("2026-01-01T00:00:{i:02}Z");
            j.append_put(rec(&format!("P-{}", i % 3), &t), "ops")
                .unwrap();
        }
        j.append_delete("P-2", 100, "ops").unwrap();
        assert!(j.entries() <= 10, "compacted: {}", j.entries());
        j.compact().unwrap();
        let before = j.state().clone();
        drop(j);
        let j = Journal::open(d.path(), &opts(limits)).unwrap();
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

    fn key(b: u8) -> EncKey {
        EncKey::from_hex(&hex::encode([b; 32])).unwrap()
    }

    fn keyed(current: Option<u8>, previous: Option<u8>) -> Options {
        Options {
            keys: Keys {
                current: current.map(key),
                previous: previous.map(key),
            },
            ..Default::default()
        }
    }

    fn with_ext(id: &str, ext: &str) -> ConsentRecord {
        ConsentRecord::from_json(
            format!(
                r#"{{"patient_id":"{id}","identifiers":{{"external_ids":["{ext}"]}},"updated_at":"2026-01-01T00:00:00Z"}}"#
            )
            .as_bytes(),
        )
        .unwrap()
    }

    /// Every file in the journal directory, concatenated.
    fn all_files(dir: &Path) -> String {
        let mut out = String::new();
        for e in std::fs::read_dir(dir).unwrap() {
            out.push_str(&String::from_utf8_lossy(
                &std::fs::read(e.unwrap().path()).unwrap(),
            ));
        }
        out
    }

    fn mode(p: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn versions_grow_across_deletes_compaction_and_legacy_entries() {
        let d = tempfile::tempdir().unwrap();
        let limits = Limits {
            max_entries: 4,
            max_bytes: u64::MAX,
        };
        {
            let mut j = Journal::open(d.path(), &opts(limits)).unwrap();
            let mut r = rec("P-1", "2026-01-01T00:00:00Z");
            r.version = 1;
            j.append_put(r.clone(), "ops").unwrap();
            j.append_delete("P-1", 2, "ops").unwrap();
            // A stale version is lifted above the last one.
            j.append_put(r, "ops").unwrap();
            assert_eq!(j.version_of("P-1"), 3);
            for i in 0..6 {
                j.append_put(rec("P-2", &format!("2026-01-01T00:00:0{i}Z")), "ops")
                    .unwrap();
            }
            assert!(j.entries() < 9, "compacted");
            assert_eq!(j.version_of("P-2"), 6);
        }
        let j = Journal::open(d.path(), &opts(limits)).unwrap();
        assert_eq!((j.version_of("P-1"), j.version_of("P-2")), (3, 6));
        assert_eq!(j.version_of("P-9"), 0);
        // Entries written before versions existed replay as 1, 2, ...
        let d2 = tempfile::tempdir().unwrap();
        let legacy = format!(
            "{}\n{}\n",
            r#"{"op":"put","record":{"patient_id":"P-1","updated_at":"2026-01-01T00:00:00Z"},"actor":"a","ts":"2026-01-01T00:00:00Z"}"#,
            r#"{"op":"delete","patient_id":"P-1","actor":"a","ts":"2026-01-02T00:00:00Z"}"#
        );
        std::fs::write(d2.path().join(JOURNAL_FILE), legacy).unwrap();
        let j = Journal::open(d2.path(), &Options::default()).unwrap();
        assert_eq!(j.version_of("P-1"), 2);
    }

    #[test]
    fn lock_and_modes() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("journal");
        let j = Journal::open(&dir, &Options::default()).unwrap();
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join(JOURNAL_FILE)), 0o600);
        assert_eq!(mode(&dir.join(crate::state::LOCK_FILE)), 0o600);
        let e = Journal::open(&dir, &Options::default()).err().unwrap();
        assert!(e.contains("consent.journal") && e.contains("locked"), "{e}");
        // Read-only opens beside the owner, and writes nothing.
        let ro = Options {
            read_only: true,
            ..Default::default()
        };
        let mut r = Journal::open(&dir, &ro).unwrap();
        assert!(r
            .append_put(rec("P-1", "2026-01-01T00:00:00Z"), "x")
            .is_err());
        assert_eq!(std::fs::metadata(dir.join(JOURNAL_FILE)).unwrap().len(), 0);
        drop(j);
        // Looser modes left by an older version are tightened on open.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(
            dir.join(JOURNAL_FILE),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        let _j = Journal::open(&dir, &Options::default()).unwrap();
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join(JOURNAL_FILE)), 0o600);
        // Read-only on a directory that does not exist: empty, nothing created.
        let none = d.path().join("absent");
        assert!(Journal::open(&none, &ro).unwrap().state().is_empty());
        assert!(!none.exists());
    }

    #[test]
    fn encrypted_journal_has_no_identifier_in_clear_and_replays() {
        let d = tempfile::tempdir().unwrap();
        let limits = Limits {
            max_entries: 3,
            max_bytes: u64::MAX,
        };
        let o = Options {
            limits,
            ..keyed(Some(1), None)
        };
        {
            let mut j = Journal::open(d.path(), &o).unwrap();
            for i in 0..5 {
                let mut r = with_ext("PAT-SECRET-1", &format!("MRN-SECRET-{i}"));
                r.updated_at += chrono::Duration::seconds(i);
                j.append_put(r, "ops").unwrap();
            }
            j.append_delete("PAT-SECRET-2", 1, "ops").unwrap();
        }
        let text = all_files(d.path());
        assert!(
            !text.contains("SECRET") && !text.contains("\"op\""),
            "{text}"
        );
        let journal = std::fs::read_to_string(d.path().join(JOURNAL_FILE)).unwrap();
        assert!(journal.lines().all(|l| l.starts_with("{\"v\":1,")));
        let j = Journal::open(d.path(), &o).unwrap();
        match j.state().get("PAT-SECRET-1").unwrap() {
            Entry::Put { record, .. } => {
                assert_eq!(record.identifiers.external_ids, vec!["MRN-SECRET-4"]);
                assert_eq!(record.version, 5);
            }
            e => panic!("{e:?}"),
        }
        drop(j);
        // A wrong key, or no key, refuses to open: nothing is skipped.
        let e = Journal::open(d.path(), &keyed(Some(2), None))
            .err()
            .unwrap();
        assert!(
            e.contains("line 1")
                && e.contains("consent.journal_key_file")
                && e.contains("wrong key"),
            "{e}"
        );
        let e = Journal::open(d.path(), &Options::default()).err().unwrap();
        assert!(e.contains("is encrypted"), "{e}");
        assert!(!e.contains("SECRET"));
    }

    #[test]
    fn turning_encryption_on_and_rotating_rewrite_the_journal() {
        let d = tempfile::tempdir().unwrap();
        {
            let mut j = Journal::open(d.path(), &Options::default()).unwrap();
            j.append_put(with_ext("PAT-SECRET-1", "MRN-SECRET-1"), "ops")
                .unwrap();
        }
        assert!(all_files(d.path()).contains("MRN-SECRET-1"));
        // Key on: the clear lines are rewritten under it at open.
        {
            let mut j = Journal::open(d.path(), &keyed(Some(1), None)).unwrap();
            j.append_put(with_ext("PAT-SECRET-2", "MRN-SECRET-2"), "ops")
                .unwrap();
        }
        assert!(!all_files(d.path()).contains("SECRET"));
        // Rotation: new key, old one as previous; afterwards the new key alone.
        drop(Journal::open(d.path(), &keyed(Some(2), Some(1))).unwrap());
        assert!(Journal::open(d.path(), &keyed(Some(1), None)).is_err());
        let j = Journal::open(d.path(), &keyed(Some(2), None)).unwrap();
        assert_eq!(j.state().len(), 2);
        assert!(!all_files(d.path()).contains("SECRET"));
        drop(j);
        // A torn encrypted tail is cut like a clear one.
        let path = d.path().join(JOURNAL_FILE);
        let good = std::fs::metadata(&path).unwrap().len();
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(br#"{"v":1,"nonce":"00"#).unwrap();
        drop(f);
        let j = Journal::open(d.path(), &keyed(Some(2), None)).unwrap();
        assert_eq!(j.state().len(), 2);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), good);
    }
}
