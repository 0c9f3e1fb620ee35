//! The file consent source (`consent.source: file`): a JSON Lines snapshot
//! (`consent.file`) plus the journal of admin-API writes (`consent.journal`).
//!
//! Apply = every snapshot record, the journal re-applied on top (last write
//! wins by `updated_at`; a journaled delete removes a snapshot record unless the
//! snapshot's record is newer than the delete), and every other record removed.
//! A snapshot is parsed whole before anything is applied: one bad line leaves
//! the store exactly as it was, and the error names the line and the field
//! (never the content). The first load into an empty store is streamed
//! instead ([`Inner::load_first`]): a bad line there fails the start.
//!
//! The file is watched (its parent directory, so editors that replace the file
//! by rename are seen), changes are debounced, and a one-second poll of the
//! file's size, mtime and inode catches anything the watcher misses (e.g. a
//! Kubernetes ConfigMap symlink swap). While the last load was good the store is
//! marked good every second: the file is the source of truth and is current.
//! While it is bad (unparsable or unreadable) the source is marked down, the old
//! data stays in force, and staleness grows until the file is fixed.

use super::journal::{self, Entry, Journal};
use super::record::ConsentRecord;
use super::source::{
    prepare_put, BoxFuture, Change, ConsentWriter, Merge, Precondition, PropagationObserver,
    WriteError, Written,
};
use super::store::ConsentStore;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

#[derive(Clone, Debug)]
pub(crate) struct FileSourceConfig {
    /// `consent.file`: the JSONL snapshot.
    pub(crate) file: PathBuf,
    /// `consent.journal`: the journal directory (created when missing).
    journal_dir: PathBuf,
    journal_limits: journal::Limits,
    /// `consent.journal_key_file` / `consent.journal_previous_key_file`.
    pub(crate) journal_keys: journal::Keys,
    /// Replay the journal without locking or writing it (`consentgate explain`
    /// next to a running proxy); writes through this source fail.
    pub(crate) read_only: bool,
    /// Quiet time after a change before reloading.
    debounce: Duration,
    /// How often the store is marked good while healthy (and the file polled).
    pub(crate) tick: Duration,
}

impl FileSourceConfig {
    pub(crate) fn new(file: impl Into<PathBuf>, journal_dir: impl Into<PathBuf>) -> Self {
        FileSourceConfig {
            file: file.into(),
            journal_dir: journal_dir.into(),
            journal_limits: journal::Limits::default(),
            journal_keys: journal::Keys::default(),
            read_only: false,
            debounce: Duration::from_millis(200),
            tick: Duration::from_secs(1),
        }
    }
}

/// Parse a whole snapshot. Blank lines are skipped; the first bad line is an
/// error `line N: <field>: <problem>`. Used by `consentgate check` too.
fn parse_snapshot(bytes: &[u8]) -> Result<Vec<ConsentRecord>, String> {
    let mut out = Vec::new();
    for (i, line) in bytes.split(|b| *b == b'\n').enumerate() {
        if line.iter().all(|b| b.is_ascii_whitespace()) {
            continue;
        }
        let rec =
            ConsentRecord::parse_json(line, None).map_err(|e| format!("line {}: {e}", i + 1))?;
        out.push(rec);
    }
    Ok(out)
}

/// What a journal entry does to the snapshot's record of its patient.
enum Overlay<'j> {
    Keep,
    Put(&'j ConsentRecord),
    Delete,
}

/// The journal on top of a snapshot (last write wins by `updated_at`): a
/// journaled record replaces the snapshot's unless that one is newer; a
/// journaled delete removes it unless it is newer than the delete.
fn over_snapshot<'j>(entry: &'j Entry, snapshot: Option<&ConsentRecord>) -> Overlay<'j> {
    match entry {
        Entry::Put { record, .. } => match snapshot {
            Some(cur) if !record.supersedes(cur) => Overlay::Keep,
            _ => Overlay::Put(record),
        },
        Entry::Delete { ts, .. } if snapshot.is_some_and(|s| s.updated_at <= *ts) => {
            Overlay::Delete
        }
        Entry::Delete { .. } => Overlay::Keep,
    }
}

/// Read and parse a snapshot file; errors name the file and the line.
pub fn load_snapshot(path: &Path) -> Result<Vec<ConsentRecord>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("consent.file {}: {e}", path.display()))?;
    parse_snapshot(&bytes).map_err(|e| format!("consent.file {}: {e}", path.display()))
}

/// Size, mtime and inode: enough to notice a changed or replaced file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Fingerprint {
    len: u64,
    mtime: Option<SystemTime>,
    ino: u64,
}

fn fingerprint(path: &Path) -> std::io::Result<Fingerprint> {
    let m = std::fs::metadata(path)?;
    #[cfg(unix)]
    let ino = std::os::unix::fs::MetadataExt::ino(&m);
    #[cfg(not(unix))]
    let ino = 0;
    Ok(Fingerprint {
        len: m.len(),
        mtime: m.modified().ok(),
        ino,
    })
}

struct Inner {
    cfg: FileSourceConfig,
    store: Arc<ConsentStore>,
    /// Held for every write (read, merge, append, apply) and every snapshot
    /// apply, so they never interleave: the per-patient write lock of
    /// [`ConsentWriter::modify`] (one lock for all patients: each write is one
    /// fsync'd append anyway).
    journal: Mutex<Journal>,
    healthy: AtomicBool,
    seen: Mutex<Option<Fingerprint>>,
    /// Called with the seconds from the snapshot file's mtime to the end of a
    /// reload that changed the store (`consentgate_consent_propagation_seconds`).
    observer: PropagationObserver,
}

/// What one snapshot apply did: records held, and whether any was put or removed.
struct Applied {
    records: usize,
    changed: bool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Inner {
    /// Load the snapshot and apply it with the journal on top. On error the
    /// store is untouched. Returns the number of records held. `observe`: a
    /// reload that changed the store feeds the propagation observer (not the
    /// initial load, as with PostgreSQL).
    fn reload(&self, observe: bool) -> Result<usize, String> {
        let fp = fingerprint(&self.cfg.file).ok();
        *lock(&self.seen) = fp;
        let result = load_snapshot(&self.cfg.file).map(|recs| self.apply(recs));
        match result {
            Ok(applied) => {
                self.healthy.store(true, Ordering::Relaxed);
                self.store.mark_good();
                if observe && applied.changed {
                    if let Some(mtime) = fp.and_then(|f| f.mtime) {
                        let d = SystemTime::now()
                            .duration_since(mtime)
                            .unwrap_or(Duration::ZERO);
                        (self.observer)(d.as_secs_f64());
                    }
                }
                Ok(applied.records)
            }
            Err(e) => {
                self.healthy.store(false, Ordering::Relaxed);
                self.store.mark_down();
                Err(e)
            }
        }
    }

    /// The first load, into the empty store: the file is read line by line
    /// and each record stored as it is parsed, then the journal is laid on
    /// top, with the rules of [`Inner::apply`]. Neither the file nor its
    /// parsed records are ever held whole: a million patients loaded through
    /// `apply` peaked at 2.3 times the memory they then kept, and took twice
    /// as long, most of it in malloc. A bad line empties the store again and
    /// fails the start. Not used when sync targets observe the store: their
    /// outbox queues a push for every state it is shown, and streaming shows
    /// a patient's earlier lines (and a failed start's records) before the
    /// final state, on every start.
    fn load_first(&self) -> Result<usize, String> {
        *lock(&self.seen) = fingerprint(&self.cfg.file).ok();
        match self.stream_in() {
            Ok(n) => {
                self.healthy.store(true, Ordering::Relaxed);
                self.store.mark_good();
                Ok(n)
            }
            Err(e) => {
                for id in self.store.patient_ids() {
                    self.store.delete(&id);
                }
                self.healthy.store(false, Ordering::Relaxed);
                self.store.mark_down();
                Err(e)
            }
        }
    }

    fn stream_in(&self) -> Result<usize, String> {
        use std::io::BufRead;
        let path = &self.cfg.file;
        let err = |e: String| format!("consent.file {}: {e}", path.display());
        let f = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
        let mut lines = std::io::BufReader::with_capacity(1 << 20, f);
        let journal = lock(&self.journal);
        let mut line = Vec::new();
        let mut n = 0usize;
        loop {
            line.clear();
            if lines
                .read_until(b'\n', &mut line)
                .map_err(|e| err(e.to_string()))?
                == 0
            {
                break;
            }
            n += 1;
            if line.iter().all(|b| b.is_ascii_whitespace()) {
                continue;
            }
            let mut rec = ConsentRecord::parse_json(&line, None)
                .map_err(|e| err(format!("line {n}: {e}")))?;
            let id = rec.patient_id.trim();
            // A patient written twice: the later by `updated_at` wins.
            if self.store.get(id).is_some_and(|cur| !rec.supersedes(&cur)) {
                continue;
            }
            rec.version = journal.version_of(id);
            self.store.put(rec);
        }
        for (id, entry) in journal.state() {
            let id = id.trim();
            match over_snapshot(entry, self.store.get(id).as_deref()) {
                Overlay::Keep => {}
                Overlay::Put(r) => {
                    let mut rec = r.clone();
                    rec.version = journal.version_of(id);
                    self.store.put(rec);
                }
                Overlay::Delete => {
                    self.store.delete(id);
                }
            }
        }
        drop(journal);
        tracing::info!(records = self.store.len(), "consent snapshot applied");
        Ok(self.store.len())
    }

    fn apply(&self, snapshot: Vec<ConsentRecord>) -> Applied {
        let journal = lock(&self.journal);
        let mut winners: HashMap<String, ConsentRecord> = HashMap::with_capacity(snapshot.len());
        for rec in snapshot {
            let id = rec.patient_id.trim().to_string();
            match winners.get(&id) {
                Some(cur) if !rec.supersedes(cur) => {}
                _ => {
                    winners.insert(id, rec);
                }
            }
        }
        for (id, entry) in journal.state() {
            let id = id.trim();
            match over_snapshot(entry, winners.get(id)) {
                Overlay::Keep => {}
                Overlay::Put(r) => {
                    winners.insert(id.to_string(), r.clone());
                }
                Overlay::Delete => {
                    winners.remove(id);
                }
            }
        }
        // Versions count admin-API writes (journal); a record known only from
        // the snapshot carries the patient's last journaled version (0: none).
        for (id, rec) in winners.iter_mut() {
            rec.version = journal.version_of(id);
        }
        // Removals first, so the winners can then be moved into the store
        // (no copy of each record).
        let mut removed = 0usize;
        for id in self.store.patient_ids() {
            if !winners.contains_key(&*id) {
                self.store.delete(&id);
                removed += 1;
            }
        }
        let mut changed = 0usize;
        for rec in winners.into_values() {
            if self.store.put_if_changed(rec) {
                changed += 1;
            }
        }
        drop(journal);
        tracing::info!(
            records = self.store.len(),
            changed,
            removed,
            "consent snapshot applied"
        );
        Applied {
            records: self.store.len(),
            changed: changed + removed > 0,
        }
    }

    /// One tick: reload when the file changed, else keep the store marked good.
    fn tick(&self) {
        let fp = match fingerprint(&self.cfg.file) {
            Ok(fp) => Some(fp),
            Err(e) => {
                if self.healthy.swap(false, Ordering::Relaxed) {
                    tracing::warn!(path = %self.cfg.file.display(), error = %e,
                        "consent file unreadable; keeping last good data, source down");
                    self.store.mark_down();
                }
                *lock(&self.seen) = None;
                return;
            }
        };
        if fp != *lock(&self.seen) {
            self.reload_logged("poll");
        } else if self.healthy.load(Ordering::Relaxed) {
            self.store.mark_good();
        }
    }

    fn reload_logged(&self, why: &'static str) {
        match self.reload(true) {
            Ok(n) => tracing::info!(records = n, trigger = why, "consent file reloaded"),
            Err(e) => tracing::warn!(error = %e, trigger = why,
                "consent file rejected; keeping last good data, source down"),
        }
    }
}

/// A running file source. Dropping it stops the watcher and the tick.
pub(crate) struct FileSourceHandle {
    inner: Arc<Inner>,
    tasks: Vec<JoinHandle<()>>,
    _watcher: Option<notify::RecommendedWatcher>,
}

impl Drop for FileSourceHandle {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        // An aborted task lets go of the journal only when the runtime next
        // polls it: release the directory lock now, so a source started
        // right after this one (tests; an in-process restart) can take it.
        lock(&self.inner.journal).close();
    }
}

impl FileSourceHandle {
    /// The writer the admin API writes through.
    pub(crate) fn writer(&self) -> Arc<dyn ConsentWriter> {
        Arc::new(FileWriter {
            inner: self.inner.clone(),
        })
    }

    /// Whether the last load of the file succeeded and the file is readable.
    #[cfg(test)]
    fn healthy(&self) -> bool {
        self.inner.healthy.load(Ordering::Relaxed)
    }

    /// Reload now. On error the store keeps its data.
    #[cfg(test)]
    async fn reload(&self) -> Result<usize, String> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || inner.reload(true))
            .await
            .map_err(|e| format!("consent reload task: {e}"))?
    }
}

/// Start the file source: open (or create) the journal, load the snapshot with
/// the journal on top (an error refuses to start and names the line), then
/// watch the file. `observer` is fed the propagation of every later reload
/// that changes the store. Must be called inside a tokio runtime.
pub(crate) async fn start(
    cfg: FileSourceConfig,
    store: Arc<ConsentStore>,
    observer: PropagationObserver,
) -> Result<FileSourceHandle, String> {
    let jcfg = cfg.clone();
    let journal = tokio::task::spawn_blocking(move || {
        let opts = journal::Options {
            limits: jcfg.journal_limits,
            keys: jcfg.journal_keys,
            read_only: jcfg.read_only,
        };
        Journal::open(&jcfg.journal_dir, &opts)
    })
    .await
    .map_err(|e| format!("consent journal task: {e}"))??;
    let inner = Arc::new(Inner {
        cfg,
        store,
        journal: Mutex::new(journal),
        healthy: AtomicBool::new(false),
        seen: Mutex::new(None),
        observer,
    });
    let first = inner.clone();
    let n = tokio::task::spawn_blocking(move || {
        if first.store.is_empty() && !first.store.feeds_sync() {
            first.load_first()
        } else {
            first.reload(false)
        }
    })
    .await
    .map_err(|e| format!("consent load task: {e}"))??;
    tracing::info!(records = n, path = %inner.cfg.file.display(), "consent snapshot loaded");

    let (tx, rx) = mpsc::channel::<()>(1);
    let watcher = match make_watcher(&inner.cfg.file, tx) {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(error = %e, "consent file watcher unavailable; polling every tick");
            None
        }
    };
    let task = tokio::spawn(run(inner.clone(), rx));
    Ok(FileSourceHandle {
        inner,
        tasks: vec![task],
        _watcher: watcher,
    })
}

fn make_watcher(file: &Path, tx: mpsc::Sender<()>) -> Result<notify::RecommendedWatcher, String> {
    use notify::{RecursiveMode, Watcher};
    let name = file.file_name().map(|n| n.to_os_string());
    let parent = match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut w = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(ev) = res {
            if ev.kind.is_access() {
                return;
            }
            let ours = ev
                .paths
                .iter()
                .any(|p| p.file_name().map(|n| n.to_os_string()) == name);
            if ours {
                // Full channel: a reload is already pending, which is enough.
                let _ = tx.try_send(());
            }
        }
    })
    .map_err(|e| e.to_string())?;
    w.watch(&parent, RecursiveMode::NonRecursive)
        .map_err(|e| format!("{}: {e}", parent.display()))?;
    Ok(w)
}

async fn run(inner: Arc<Inner>, mut rx: mpsc::Receiver<()>) {
    let mut tick = tokio::time::interval(inner.cfg.tick);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut watching = true;
    loop {
        tokio::select! {
            ev = rx.recv(), if watching => {
                if ev.is_none() {
                    watching = false;
                    continue;
                }
                // Debounce: wait for quiet, then swallow what queued meanwhile.
                tokio::time::sleep(inner.cfg.debounce).await;
                while rx.try_recv().is_ok() {}
                let i = inner.clone();
                let _ = tokio::task::spawn_blocking(move || i.reload_logged("watch")).await;
            }
            _ = tick.tick() => {
                let i = inner.clone();
                let _ = tokio::task::spawn_blocking(move || i.tick()).await;
            }
        }
    }
}

/// Admin-API writes for the file source: under the journal lock, read the
/// current record, check, merge, append + fsync, then apply to the store.
struct FileWriter {
    inner: Arc<Inner>,
}

impl FileWriter {
    fn modify_blocking(
        inner: &Inner,
        patient_id: &str,
        pre: Precondition,
        merge: Merge,
        actor: &str,
    ) -> Result<Written, WriteError> {
        let id = patient_id.trim();
        let mut journal = lock(&inner.journal);
        let current = inner.store.get(id);
        pre.check(current.as_deref())?;
        let change = merge(current.as_deref())?;
        // Above every version this patient ever had, deleted ones included.
        let next = journal
            .version_of(id)
            .max(current.as_ref().map_or(0, |c| c.version))
            + 1;
        match change {
            Change::Put(rec) => {
                let stored = prepare_put(rec, id, current.as_deref(), next)?;
                journal
                    .append_put(stored.clone(), actor)
                    .map_err(WriteError::Storage)?;
                Ok(Written::Stored(inner.store.put_arc(stored)))
            }
            Change::Delete => {
                if current.is_none() {
                    return Ok(Written::Absent);
                }
                journal
                    .append_delete(id, next, actor)
                    .map_err(WriteError::Storage)?;
                inner.store.delete(id);
                Ok(Written::Deleted)
            }
        }
    }
}

impl ConsentWriter for FileWriter {
    fn modify(
        &self,
        patient_id: &str,
        pre: Precondition,
        merge: Merge,
        actor: &str,
    ) -> BoxFuture<'_, Result<Written, WriteError>> {
        let inner = self.inner.clone();
        let actor = actor.to_string();
        let id = patient_id.to_string();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                Self::modify_blocking(&inner, &id, pre, merge, &actor)
            })
            .await
            .map_err(|e| WriteError::Storage(format!("write task: {e}")))?
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identify::Identifiers;

    const A: &str = r#"{"patient_id":"P-1","identifiers":{"emails":["jane.roe@example.com"],"external_ids":["crm:1"]},"updated_at":"2026-01-01T00:00:00Z"}"#;
    const B: &str = r#"{"patient_id":"P-2","categories":{"advertising":"denied"},"updated_at":"2026-01-01T00:00:00Z"}"#;

    fn write_atomic(path: &Path, text: &str) {
        let tmp = path.with_extension("swp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }

    fn cfg(d: &Path) -> FileSourceConfig {
        FileSourceConfig::new(d.join("consent.jsonl"), d.join("journal"))
    }

    fn quiet() -> PropagationObserver {
        Arc::new(|_| {})
    }

    fn rec(json: &str) -> ConsentRecord {
        ConsentRecord::from_json(json.as_bytes()).unwrap()
    }

    #[tokio::test]
    async fn snapshot_bad_line_leaves_store_unchanged_and_names_line() {
        let d = tempfile::tempdir().unwrap();
        let c = cfg(d.path());
        std::fs::write(&c.file, format!("{A}\n{B}\n")).unwrap();
        let store = Arc::new(ConsentStore::new());
        let h = start(c.clone(), store.clone(), quiet()).await.unwrap();
        assert_eq!(store.len(), 2);
        assert!(store.source_up());
        let before = store.get("P-1").unwrap();

        let bad = r#"{"patient_id":"P-3","identifiers":{"emails":["secret.person@example.com"]},"colour":"red","updated_at":"2026-01-01T00:00:00Z"}"#;
        std::fs::write(&c.file, format!("{A}\n\n{bad}\n")).unwrap();
        let e = h.reload().await.unwrap_err();
        assert!(e.contains("line 3") && e.contains("colour"), "{e}");
        assert!(!e.contains("secret.person") && !e.contains("red"), "{e}");
        assert_eq!(store.len(), 2, "nothing applied");
        assert!(store.get("P-2").is_some());
        assert_eq!(store.get("P-1").unwrap(), before);
        assert!(!store.source_up());
        assert!(!h.healthy());

        std::fs::write(&c.file, format!("{A}\n")).unwrap();
        assert_eq!(h.reload().await.unwrap(), 1);
        assert!(store.source_up() && h.healthy());
    }

    #[tokio::test]
    async fn a_reload_that_changes_the_store_feeds_the_propagation_observer() {
        let d = tempfile::tempdir().unwrap();
        let c = cfg(d.path());
        std::fs::write(&c.file, format!("{A}\n")).unwrap();
        let seen = Arc::new(Mutex::new(Vec::<f64>::new()));
        let s2 = seen.clone();
        let obs: PropagationObserver = Arc::new(move |v| lock(&s2).push(v));
        let store = Arc::new(ConsentStore::new());
        let h = start(c.clone(), store, obs).await.unwrap();
        assert!(lock(&seen).is_empty(), "initial load not observed");
        h.reload().await.unwrap();
        assert!(
            lock(&seen).is_empty(),
            "an unchanged snapshot is not observed"
        );
        std::fs::write(&c.file, format!("{A}\n{B}\n")).unwrap();
        h.reload().await.unwrap();
        let v = lock(&seen).clone();
        assert_eq!(v.len(), 1, "{v:?}");
        assert!((0.0..60.0).contains(&v[0]), "{v:?}");
    }

    #[tokio::test]
    async fn a_patient_written_twice_in_the_file_keeps_the_newer_line_whichever_comes_first() {
        let d = tempfile::tempdir().unwrap();
        let c = cfg(d.path());
        let old = |id: &str, v: &str| {
            format!(
                r#"{{"patient_id":"{id}","categories":{{"advertising":"{v}"}},"updated_at":"2026-01-01T00:00:00Z"}}"#
            )
        };
        let new = |id: &str, v: &str| {
            format!(
                r#"{{"patient_id":"{id}","categories":{{"advertising":"{v}"}},"updated_at":"2026-02-01T00:00:00Z"}}"#
            )
        };
        let text = [
            new("P-1", "denied"),
            old("P-1", "granted"),
            old("P-2", "granted"),
            new(" P-2", "denied"),
        ]
        .join("\n");
        std::fs::write(&c.file, text).unwrap();
        let store = Arc::new(ConsentStore::new());
        let h = start(c.clone(), store.clone(), quiet()).await.unwrap();
        assert_eq!(store.len(), 2);
        for id in ["P-1", "P-2"] {
            let r = store.get(id).unwrap();
            assert_eq!(
                r.updated_at.to_rfc3339(),
                "2026-02-01T00:00:00+00:00",
                "{id}"
            );
        }
        // A reload of the same file (the other path) changes nothing.
        h.reload().await.unwrap();
        assert_eq!(
            store.get("P-1").unwrap().updated_at.to_rfc3339(),
            "2026-02-01T00:00:00+00:00"
        );
    }

    /// Records every `stored` and `deleted` call, by patient.
    #[derive(Default)]
    struct Seen(Mutex<Vec<String>>);

    impl crate::consent::store::StoreObserver for Seen {
        fn stored(&self, rec: &ConsentRecord, _: &crate::consent::store::Plaintext) {
            lock(&self.0).push(format!("stored {}", rec.patient_id));
        }
        fn deleted(&self, patient_id: &str) {
            lock(&self.0).push(format!("deleted {patient_id}"));
        }
    }

    #[tokio::test]
    async fn sync_targets_see_only_each_patients_final_record_on_start() {
        // The sync outbox queues a push for every state it is shown: a
        // patient's older line, or a record the journal replaces, must not be
        // shown on the way to the final one (as the streamed load would).
        let d = tempfile::tempdir().unwrap();
        let c = cfg(d.path());
        let line = |v: &str, day: u32| {
            format!(
                r#"{{"patient_id":"P-1","categories":{{"advertising":"{v}"}},"updated_at":"2026-01-{day:02}T00:00:00Z"}}"#
            )
        };
        std::fs::write(
            &c.file,
            [line("denied", 1), line("denied", 2), B.to_string()].join("\n"),
        )
        .unwrap();
        let store = Arc::new(ConsentStore::new());
        let seen = Arc::new(Seen::default());
        store.set_sync_observer(seen.clone());
        let _h = start(c, store.clone(), quiet()).await.unwrap();
        let mut calls = lock(&seen.0).clone();
        calls.sort();
        assert_eq!(calls, ["stored P-1", "stored P-2"]);
    }

    #[tokio::test]
    async fn start_refuses_a_bad_snapshot() {
        let d = tempfile::tempdir().unwrap();
        let c = cfg(d.path());
        std::fs::write(&c.file, format!("{A}\n{{\"patient_id\":\"P-9\"}}\n")).unwrap();
        let store = Arc::new(ConsentStore::new());
        let e = start(c, store.clone(), quiet()).await.err().unwrap();
        assert!(e.contains("line 2") && e.contains("updated_at"), "{e}");
        assert!(store.is_empty());
    }

    #[tokio::test]
    async fn editing_the_snapshot_changes_the_store_within_2s() {
        let d = tempfile::tempdir().unwrap();
        let mut c = cfg(d.path());
        // A long tick so only the notify watcher can deliver the change.
        c.tick = Duration::from_secs(3600);
        std::fs::write(&c.file, format!("{A}\n")).unwrap();
        let store = Arc::new(ConsentStore::new());
        let _h = start(c.clone(), store.clone(), quiet()).await.unwrap();
        assert!(store.get("P-2").is_none());
        // Editor style: write a temp file and rename it over the snapshot.
        write_atomic(&c.file, &format!("{A}\n{B}\n"));
        let t0 = std::time::Instant::now();
        while store.get("P-2").is_none() {
            assert!(
                t0.elapsed() < Duration::from_secs(2),
                "change not seen in 2 s"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        // In-place edit too.
        std::fs::write(&c.file, format!("{B}\n")).unwrap();
        let t0 = std::time::Instant::now();
        while store.get("P-1").is_some() {
            assert!(
                t0.elapsed() < Duration::from_secs(2),
                "in-place edit not seen in 2 s"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        assert_eq!(store.len(), 1);
    }

    #[tokio::test]
    async fn journal_write_survives_restart_and_overrides_snapshot() {
        let d = tempfile::tempdir().unwrap();
        let c = cfg(d.path());
        std::fs::write(&c.file, format!("{A}\n{B}\n")).unwrap();
        {
            let store = Arc::new(ConsentStore::new());
            let h = start(c.clone(), store.clone(), quiet()).await.unwrap();
            let w = h.writer();
            let mut r = rec(A);
            r.gpc = true;
            r.updated_at = "2026-02-01T00:00:00Z".parse().unwrap();
            let stored = w.put(r, "ops").await.unwrap();
            assert!(stored.gpc && stored.is_stored_form());
            assert!(store.get("P-1").unwrap().gpc, "store updated before Ok");
            assert!(w.delete("P-2", "ops").await.unwrap());
            assert!(!w.delete("P-2", "ops").await.unwrap());
            let new = rec(r#"{"patient_id":"P-7","updated_at":"2026-01-01T00:00:00Z"}"#);
            w.put(new, "crm").await.unwrap();
            // An older write loses (last write wins).
            let old = rec(A);
            assert_eq!(w.put(old, "ops").await.unwrap_err(), WriteError::Superseded);
        }
        let store = Arc::new(ConsentStore::new());
        let _h = start(c.clone(), store.clone(), quiet()).await.unwrap();
        assert!(store.get("P-1").unwrap().gpc);
        assert!(
            store.get("P-2").is_none(),
            "journaled delete beats the snapshot"
        );
        assert!(store.get("P-7").is_some(), "journal-only record kept");
        let mut ids = Identifiers::new();
        ids.add_email("Jane.Roe@example.com");
        assert_eq!(store.lookup(&ids).len(), 1);
        let journal = std::fs::read_to_string(c.journal_dir.join(journal::JOURNAL_FILE)).unwrap();
        assert!(!journal.contains("jane.roe"));
    }

    #[tokio::test]
    async fn newer_snapshot_record_beats_older_delete_and_strays_are_removed() {
        let d = tempfile::tempdir().unwrap();
        let c = cfg(d.path());
        std::fs::write(&c.file, format!("{A}\n{B}\n")).unwrap();
        let store = Arc::new(ConsentStore::new());
        let h = start(c.clone(), store.clone(), quiet()).await.unwrap();
        h.writer().delete("P-2", "ops").await.unwrap();
        let b2 = B.replace("2026-01-01", "2099-01-01");
        std::fs::write(&c.file, format!("{b2}\n")).unwrap();
        h.reload().await.unwrap();
        assert!(
            store.get("P-2").is_some(),
            "snapshot record newer than the delete"
        );
        assert!(
            store.get("P-1").is_none(),
            "no longer in snapshot or journal"
        );
        assert_eq!(store.len(), 1);
    }

    #[tokio::test]
    async fn versions_survive_snapshot_reloads_restarts_and_deletes() {
        let d = tempfile::tempdir().unwrap();
        let c = cfg(d.path());
        std::fs::write(&c.file, format!("{A}\n{B}\n")).unwrap();
        {
            let store = Arc::new(ConsentStore::new());
            let h = start(c.clone(), store.clone(), quiet()).await.unwrap();
            assert_eq!(store.get("P-1").unwrap().version, 0, "snapshot only");
            let mut r = rec(A);
            r.updated_at = "2026-02-01T00:00:00Z".parse().unwrap();
            assert_eq!(h.writer().put(r, "ops").await.unwrap().version, 1);
            // A newer snapshot record wins, and shows the patient's version.
            std::fs::write(
                &c.file,
                format!("{}\n{B}\n", A.replace("2026-01-01", "2026-03-01")),
            )
            .unwrap();
            h.reload().await.unwrap();
            let cur = store.get("P-1").unwrap();
            assert_eq!(
                (cur.updated_at.to_rfc3339().as_str(), cur.version),
                ("2026-03-01T00:00:00+00:00", 1)
            );
            assert!(h.writer().delete("P-2", "ops").await.unwrap());
        }
        let store = Arc::new(ConsentStore::new());
        let h = start(c.clone(), store.clone(), quiet()).await.unwrap();
        assert_eq!(store.get("P-1").unwrap().version, 1);
        let again = rec(r#"{"patient_id":"P-2","updated_at":"2026-05-01T00:00:00Z"}"#);
        assert_eq!(
            h.writer().put(again, "ops").await.unwrap().version,
            2,
            "above the delete's version"
        );
    }
}
