//! The audit writer: a bounded tokio channel into a dedicated writer thread.
//!
//! The request path calls [`AuditWriter::submit`], which never blocks: it either
//! queues the request's records (all of them, as one message) or says the audit
//! log is unavailable, and the proxy then blocks the request (`audit_unavailable`).
//! The writer thread runs its own single-threaded tokio runtime, so its blocking
//! file I/O never stalls the proxy's workers.
//!
//! Start-up is two steps so that `consentgate run` can lock the directory first
//! and write its first record only once every listener is bound:
//! [`AuditWriter::prepare`] takes the directory lock and gives the handle (records
//! submitted now wait in the queue); [`AuditStarter::start`] recovers the chain,
//! writes the first records and starts the thread. [`AuditWriter::start`] does both.
//!
//! # The cap (`max_total_bytes`)
//!
//! With a cap, files rotate at `min(max_file_bytes, (cap - 512) / 8)` (512 bytes
//! are kept for the lock file), and at every rotation the oldest closed files are
//! removed until the closed files plus one full file fit under the cap. Since the
//! file being written never passes that size, the audit files never take more
//! than the cap at any moment, not even between two removals. (A single record
//! line larger than a whole file would still be written: records are a few
//! hundred bytes and the smallest cap gives 8 KiB files.) The file being written
//! is never removed. The `checkpoint` record is written first, as the new file's
//! first line, and fsync'd whatever the fsync policy; only then do files go, so a
//! crash in between leaves files a checkpoint already names, which `verify`
//! skips and the next removal takes.

use super::chain::{
    decode_line, file_line, sha256_hex, sha256_hex_into, write_record_line, DecodeError, ZERO_HASH,
};
use super::checkpoint::{CheckpointFacts, CheckpointKey};
use super::crypto::EncKey;
use super::pseudonym::is_pseudonym;
use super::verify::audit_files;
use super::{day_of, file_name, parse_file_name, ts_text, AuditKind, AuditRecord};
use crate::metrics::Metrics;
use crate::state::{private_file_options, tighten_file, DirLock};
use chrono::{DateTime, Utc};
use prometheus::IntCounter;
use std::collections::HashMap;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// Rotate a file before it would pass 64 MiB.
pub(super) const DEFAULT_MAX_FILE_BYTES: u64 = 64 << 20;
/// The smallest `max_total_bytes`: files of at least 8 KiB, a few dozen records.
pub(super) const MIN_MAX_TOTAL_BYTES: u64 = 64 << 10;
/// Bytes of the cap kept for the lock file (`pid N on HOST`, a host name is at
/// most 64 bytes).
const LOCK_RESERVE: u64 = 512;
/// Under a cap, a file is at most 1/8 of it, so removals go a few files at a time.
const FILES_PER_CAP: u64 = 8;
/// How long dropping the last handle waits for the writer thread to finish.
const STOP_WAIT: Duration = Duration::from_secs(10);
/// Queued messages (one per submit) before `submit` reports the log unavailable.
pub(super) const DEFAULT_CHANNEL_CAPACITY: usize = 8192;
/// Records gathered into one write.
const MAX_BATCH: usize = 4096;
/// Lines at least this long are written on their own instead of being copied
/// into the batch buffer.
const BIG_LINE: usize = 64 << 10;
/// How often the writer wakes up when idle (interval fsync, failure retry).
const TICK: Duration = Duration::from_millis(250);
/// How often a failed writer retries the disk.
const RETRY_EVERY: Duration = Duration::from_secs(1);
/// After the first records of a batch arrive, how long the writer waits for
/// more before writing: one wake-up and one write() per batch instead of per
/// request. Records reach the file at most this much later (fsync policy and
/// flush semantics are unchanged; a flush skips the wait).
const LINGER: Duration = Duration::from_millis(1);

/// When the writer fsyncs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FsyncPolicy {
    /// After every batch, before a flush is acknowledged.
    Always,
    /// When `period` has passed or `records` records were written since the last
    /// fsync, whichever comes first; and on flush, rotation and shutdown.
    Interval { period: Duration, records: u64 },
    /// Never (the OS decides); flush only hands the bytes to the OS.
    Never,
}

impl Default for FsyncPolicy {
    fn default() -> Self {
        FsyncPolicy::Interval {
            period: Duration::from_secs(1),
            records: 1000,
        }
    }
}

impl FsyncPolicy {
    #[cfg(test)]
    /// `always`, `interval` (1 s / 1000 records) or `never`.
    pub(crate) fn parse(s: &str) -> Result<FsyncPolicy, String> {
        match s {
            "always" => Ok(FsyncPolicy::Always),
            "interval" => Ok(FsyncPolicy::default()),
            "never" => Ok(FsyncPolicy::Never),
            other => Err(format!(
                "unknown fsync policy {other:?} (expected always, interval or never)"
            )),
        }
    }
}

/// The two SPEC §9 counters the writer keeps.
#[derive(Clone, Debug)]
pub(crate) struct AuditCounters {
    /// `consentgate_audit_records_total`: records written.
    pub records: IntCounter,
    /// `consentgate_audit_write_failures_total`: records refused or lost.
    pub failures: IntCounter,
}

impl AuditCounters {
    pub(crate) fn from_metrics(m: &Metrics) -> AuditCounters {
        AuditCounters {
            records: m.audit_records_total.clone(),
            failures: m.audit_write_failures_total.clone(),
        }
    }
}

type Clock = Arc<dyn Fn() -> DateTime<Utc> + Send + Sync>;

/// How to run the writer. `AuditOptions::new(dir)` gives the defaults.
#[derive(Clone)]
pub(crate) struct AuditOptions {
    /// `audit.path`: the directory of audit files (created, mode 0700, if missing).
    pub dir: PathBuf,
    pub fsync: FsyncPolicy,
    pub max_file_bytes: u64,
    /// `audit.max_total_bytes`: remove the oldest files past it (needs `checkpoint_key`).
    pub max_total_bytes: Option<u64>,
    /// Signs the checkpoint written when files are removed.
    pub checkpoint_key: Option<CheckpointKey>,
    pub channel_capacity: usize,
    /// Encrypt each line at rest (audit.encryption_key_file).
    pub encryption: Option<EncKey>,
    pub counters: Option<AuditCounters>,
    /// Tests move the day on; None is the system clock.
    pub(crate) clock: Option<Clock>,
}

impl fmt::Debug for AuditOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditOptions")
            .field("dir", &self.dir)
            .field("fsync", &self.fsync)
            .field("max_file_bytes", &self.max_file_bytes)
            .field("max_total_bytes", &self.max_total_bytes)
            .field("channel_capacity", &self.channel_capacity)
            .field("encryption", &self.encryption.is_some())
            .finish()
    }
}

impl AuditOptions {
    pub(crate) fn new(dir: impl Into<PathBuf>) -> AuditOptions {
        AuditOptions {
            dir: dir.into(),
            fsync: FsyncPolicy::default(),
            max_file_bytes: DEFAULT_MAX_FILE_BYTES,
            max_total_bytes: None,
            checkpoint_key: None,
            channel_capacity: DEFAULT_CHANNEL_CAPACITY,
            encryption: None,
            counters: None,
            clock: None,
        }
    }

    /// The size a file rotates at: `max_file_bytes`, or less under a cap.
    fn file_limit(&self) -> u64 {
        match self.max_total_bytes {
            Some(cap) => self
                .max_file_bytes
                .min(cap.saturating_sub(LOCK_RESERVE) / FILES_PER_CAP)
                .max(1),
            None => self.max_file_bytes,
        }
    }
}

/// Why records were not accepted. The proxy blocks the request with reason
/// `audit_unavailable` on any of these.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AuditUnavailable {
    /// The queue to the writer is full (the disk is not keeping up).
    Full,
    /// The writer hit a disk error and has not recovered yet.
    Failed,
    /// The writer has stopped.
    Closed,
    /// A record's `patient` is not a pseudonym (a bug: never write a raw id).
    InvalidRecord,
}

impl AuditUnavailable {
    /// The reason the proxy records for a request it blocks because of this.
    pub(crate) const REASON: &'static str = "audit_unavailable";

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            AuditUnavailable::Full => "queue_full",
            AuditUnavailable::Failed => "write_failed",
            AuditUnavailable::Closed => "writer_stopped",
            AuditUnavailable::InvalidRecord => "invalid_record",
        }
    }
}

impl fmt::Display for AuditUnavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "audit log unavailable: {}", self.as_str())
    }
}

impl std::error::Error for AuditUnavailable {}

enum Msg {
    Records(Vec<AuditRecord>),
    Flush(oneshot::Sender<Result<(), AuditUnavailable>>),
}

struct Shared {
    failed: AtomicBool,
    counters: Option<AuditCounters>,
}

impl Shared {
    fn count_failures(&self, n: usize) {
        if let Some(c) = &self.counters {
            c.failures.inc_by(n as u64);
        }
    }
    fn count_written(&self, n: usize) {
        if let Some(c) = &self.counters {
            c.records.inc_by(n as u64);
        }
    }
}

/// Handle to the writer; cheap to clone. When the last clone is dropped the
/// writer writes what is queued, fsyncs (unless `never`) and stops, and the drop
/// waits (up to 10 s) for that, so the directory lock is free once it returns.
#[derive(Clone)]
pub(crate) struct AuditWriter {
    // Field order matters: the sender goes first, so the thread sees the queue
    // closed before the last handle waits for it in `Stopped::drop`.
    tx: mpsc::Sender<Msg>,
    shared: Arc<Shared>,
    _stopped: Arc<Stopped>,
}

/// Dropped with the last handle: waits for the writer thread to finish.
struct Stopped(Mutex<Option<std::sync::mpsc::Receiver<()>>>);

impl Drop for Stopped {
    fn drop(&mut self) {
        let rx = match self.0.lock() {
            Ok(mut g) => g.take(),
            Err(p) => p.into_inner().take(),
        };
        if let Some(rx) = rx {
            // Disconnected (thread done, or never started) ends the wait at once.
            let _ = rx.recv_timeout(STOP_WAIT);
        }
    }
}

/// The second half of start-up: see [`AuditWriter::prepare`].
pub(crate) struct AuditStarter {
    opts: AuditOptions,
    shared: Arc<Shared>,
    rx: mpsc::Receiver<Msg>,
    lock: DirLock,
    done: std::sync::mpsc::Sender<()>,
}

impl fmt::Debug for AuditStarter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditStarter")
            .field("dir", &self.opts.dir)
            .finish()
    }
}

impl fmt::Debug for AuditWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditWriter")
            .field("healthy", &self.is_healthy())
            .finish()
    }
}

impl AuditWriter {
    /// Lock the audit directory (created 0700 if missing) and return the handle
    /// plus the starter. Nothing in the directory is read or written yet besides
    /// the lock file; records submitted before [`AuditStarter::start`] wait in the
    /// queue. Fails, naming the holder, when another process has the directory.
    pub(crate) fn prepare(opts: AuditOptions) -> Result<(AuditWriter, AuditStarter), String> {
        if let Some(cap) = opts.max_total_bytes {
            if cap < MIN_MAX_TOTAL_BYTES {
                return Err(format!(
                    "audit.max_total_bytes: {cap} bytes is below the minimum of {MIN_MAX_TOTAL_BYTES}"
                ));
            }
        }
        let lock = DirLock::acquire(&opts.dir, "audit.path")?;
        let shared = Arc::new(Shared {
            failed: AtomicBool::new(false),
            counters: opts.counters.clone(),
        });
        let (tx, rx) = mpsc::channel(opts.channel_capacity.max(1));
        let (done, done_rx) = std::sync::mpsc::channel();
        let writer = AuditWriter {
            tx,
            shared: shared.clone(),
            _stopped: Arc::new(Stopped(Mutex::new(Some(done_rx)))),
        };
        Ok((
            writer,
            AuditStarter {
                opts,
                shared,
                rx,
                lock,
                done,
            },
        ))
    }

    #[cfg(test)]
    /// Lock the directory, continue the chain from the last record (cutting a
    /// torn tail and recording that), and start the writer thread. Synchronous;
    /// needs no runtime. Errors name the file.
    pub(crate) fn start(opts: AuditOptions) -> Result<AuditWriter, String> {
        let (writer, starter) = AuditWriter::prepare(opts)?;
        starter.start(Vec::new())?;
        Ok(writer)
    }

    /// Queue `recs` (one request's records) without blocking. Either all are
    /// accepted or none; on Err the caller must fail closed.
    pub(crate) fn submit(&self, recs: Vec<AuditRecord>) -> Result<(), AuditUnavailable> {
        if recs.is_empty() {
            return Ok(());
        }
        let n = recs.len();
        let r = self.try_submit(recs);
        if r.is_err() {
            self.shared.count_failures(n);
        }
        r
    }

    fn try_submit(&self, recs: Vec<AuditRecord>) -> Result<(), AuditUnavailable> {
        if self.shared.failed.load(Ordering::Acquire) {
            return Err(AuditUnavailable::Failed);
        }
        if recs
            .iter()
            .any(|r| r.patient.as_deref().is_some_and(|p| !is_pseudonym(p)))
        {
            tracing::error!("audit record refused: patient is not a pseudonym");
            return Err(AuditUnavailable::InvalidRecord);
        }
        self.tx.try_send(Msg::Records(recs)).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => AuditUnavailable::Full,
            mpsc::error::TrySendError::Closed(_) => AuditUnavailable::Closed,
        })
    }

    /// Wait until every record submitted before this call is written (and
    /// fsync'd unless the policy is `never`). Err if the writer has failed.
    pub(crate) async fn flush(&self) -> Result<(), AuditUnavailable> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Msg::Flush(tx))
            .await
            .map_err(|_| AuditUnavailable::Closed)?;
        rx.await.map_err(|_| AuditUnavailable::Closed)?
    }

    /// False while the writer is failed (submits are refused).
    pub(crate) fn is_healthy(&self) -> bool {
        !self.shared.failed.load(Ordering::Acquire) && !self.tx.is_closed()
    }

    /// A handle whose queue nobody drains: submits fill it up. Tests only.
    #[cfg(test)]
    pub(crate) fn detached(capacity: usize) -> (AuditWriter, mpsc::Receiver<impl Sized>) {
        let (tx, rx) = mpsc::channel::<Msg>(capacity);
        let shared = Arc::new(Shared {
            failed: AtomicBool::new(false),
            counters: None,
        });
        let stopped = Arc::new(Stopped(Mutex::new(None)));
        (
            AuditWriter {
                tx,
                shared,
                _stopped: stopped,
            },
            rx,
        )
    }
}

impl AuditStarter {
    /// Set the key checkpoints are signed with (needed under a cap), once the
    /// key is loaded: the lock is taken before anything else, the key included.
    pub(crate) fn with_checkpoint_key(mut self, key: CheckpointKey) -> AuditStarter {
        self.opts.checkpoint_key = Some(key);
        self
    }

    /// Recover the chain (cut a torn tail, write its `recovery` record), apply
    /// the cap, write `first` (e.g. the `config load` record) ahead of anything
    /// queued, and start the writer thread. On Err nothing was started and the
    /// lock is released.
    pub(crate) fn start(self, first: Vec<AuditRecord>) -> Result<(), String> {
        let AuditStarter {
            opts,
            shared,
            rx,
            lock,
            done,
        } = self;
        if opts.max_total_bytes.is_some() && opts.checkpoint_key.is_none() {
            return Err(
                "audit.max_total_bytes needs a checkpoint key to sign what it removes".into(),
            );
        }
        let mut state = State::open(opts, shared, lock)?;
        if !first.is_empty() {
            state.write_records(&first);
            if state.failed {
                return Err("audit: cannot write the first records".into());
            }
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .map_err(|e| format!("audit writer runtime: {e}"))?;
        std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || {
                rt.block_on(state.run(rx));
                // Releases the directory lock, then tells the last handle.
                drop(state);
                drop(done);
            })
            .map_err(|e| format!("audit writer thread: {e}"))?;
        Ok(())
    }
}

/// The open file the chain is appended to.
struct Current {
    file: File,
    path: PathBuf,
    day: u32,
    seq: u64,
    /// Bytes known written (a failed write is cut back to this).
    len: u64,
    /// Records in the file, when known (None for a file reopened on start).
    records: Option<u64>,
}

struct State {
    opts: AuditOptions,
    shared: Arc<Shared>,
    /// Held for as long as the writer runs.
    _lock: DirLock,
    current: Option<Current>,
    /// Record counts of the files this process closed, for checkpoints (files
    /// from before the start are counted when they are removed).
    known_records: HashMap<String, u64>,
    /// Last sequence number in the directory (for the next file's name).
    last_seq: Option<u64>,
    last_day: u32,
    /// SHA-256 of the last record written.
    prev_hash: String,
    unsynced: u64,
    last_sync: Instant,
    failed: bool,
    lost: u64,
    last_retry: Instant,
}

impl State {
    fn now(&self) -> DateTime<Utc> {
        match &self.opts.clock {
            Some(c) => c(),
            None => Utc::now(),
        }
    }

    fn open(opts: AuditOptions, shared: Arc<Shared>, lock: DirLock) -> Result<State, String> {
        // The directory exists (0700) since the lock was taken in it.
        let dir = opts.dir.clone();
        let files =
            audit_files(&dir).map_err(|e| format!("audit directory {}: {e}", dir.display()))?;
        for f in &files {
            tighten_file(f).map_err(|e| format!("audit file {}: {e}", f.display()))?;
        }
        let key = opts.encryption.clone();
        let mut prev_hash = ZERO_HASH.to_string();
        let mut last_encrypted = None;
        let mut cut_total = 0u64;
        let mut cut_file: Option<String> = None;
        for f in files.iter().rev() {
            let (cut, last) = recover_file(f, key.as_ref())?;
            if cut > 0 {
                cut_total += cut;
                cut_file.get_or_insert_with(|| display_name(f));
            }
            if let Some((plain, encrypted)) = last {
                prev_hash = sha256_hex(&plain);
                last_encrypted = Some(encrypted);
                break;
            }
        }
        let mut state = State {
            opts,
            shared,
            _lock: lock,
            current: None,
            known_records: HashMap::new(),
            last_seq: None,
            last_day: 0,
            prev_hash,
            unsynced: 0,
            last_sync: Instant::now(),
            failed: false,
            lost: 0,
            last_retry: Instant::now(),
        };
        let today = day_of(state.now());
        if let Some(last) = files.last() {
            if let Some((day, seq)) = parse_file_name(last) {
                state.last_seq = Some(seq);
                state.last_day = day;
                let len = std::fs::metadata(last)
                    .map_err(|e| format!("audit file {}: {e}", last.display()))?
                    .len();
                let same_mode = len == 0 || last_encrypted == Some(state.opts.encryption.is_some());
                if day >= today && len < state.opts.file_limit() && same_mode {
                    let file = open_append(last)
                        .map_err(|e| format!("audit file {}: {e}", last.display()))?;
                    state.current = Some(Current {
                        file,
                        path: last.clone(),
                        day,
                        seq,
                        len,
                        records: None,
                    });
                }
            }
        }
        if cut_total > 0 {
            let name = cut_file.unwrap_or_default();
            tracing::warn!(file = %name, bytes_cut = cut_total, "audit: torn tail cut off on start; recovery record written");
            let mut rec = AuditRecord::new(AuditKind::Recovery);
            rec.ts = state.now();
            rec.reason = Some("torn_tail".into());
            rec.detail = Some(serde_json::json!({"file": name, "bytes_cut": cut_total}));
            state
                .write_batch(&[rec])
                .map_err(|(_, e)| e)
                .and_then(|_| state.sync())
                .map_err(|e| format!("audit: cannot write the recovery record: {e}"))?;
            state.shared.count_written(1);
        }
        state
            .cap_on_start()
            .map_err(|e| format!("audit: cannot apply audit.max_total_bytes on start: {e}"))?;
        Ok(state)
    }

    async fn run(&mut self, mut rx: mpsc::Receiver<Msg>) {
        loop {
            match tokio::time::timeout(TICK, rx.recv()).await {
                Ok(Some(first)) => {
                    let mut batch = Vec::new();
                    let mut flushes = Vec::new();
                    let mut push = |m: Msg, batch: &mut Vec<AuditRecord>| match m {
                        Msg::Records(r) => batch.extend(r),
                        Msg::Flush(tx) => flushes.push(tx),
                    };
                    let linger = matches!(first, Msg::Records(_));
                    push(first, &mut batch);
                    if linger {
                        tokio::time::sleep(LINGER).await;
                    }
                    while batch.len() < MAX_BATCH {
                        match rx.try_recv() {
                            Ok(m) => push(m, &mut batch),
                            Err(_) => break,
                        }
                    }
                    self.write_records(&batch);
                    if !flushes.is_empty() {
                        let r = if self.failed {
                            Err(AuditUnavailable::Failed)
                        } else if self.opts.fsync != FsyncPolicy::Never {
                            self.sync_or_fail()
                        } else {
                            Ok(())
                        };
                        for f in flushes {
                            let _ = f.send(r);
                        }
                    }
                }
                Ok(None) => {
                    if !self.failed && self.opts.fsync != FsyncPolicy::Never {
                        let _ = self.sync_or_fail();
                    }
                    return;
                }
                Err(_) => {}
            }
            self.periodic();
        }
    }

    fn write_records(&mut self, batch: &[AuditRecord]) {
        if batch.is_empty() {
            return;
        }
        if self.failed {
            self.lost += batch.len() as u64;
            self.shared.count_failures(batch.len());
            return;
        }
        match self.write_batch(batch) {
            Ok(()) => {
                self.shared.count_written(batch.len());
                self.unsynced += batch.len() as u64;
                let due = match self.opts.fsync {
                    FsyncPolicy::Always => true,
                    FsyncPolicy::Interval { records, .. } => self.unsynced >= records,
                    FsyncPolicy::Never => false,
                };
                if due {
                    let _ = self.sync_or_fail();
                }
            }
            Err((written, e)) => {
                self.shared.count_written(written);
                let lost = batch.len() - written;
                self.lost += lost as u64;
                self.shared.count_failures(lost);
                self.fail(&e);
            }
        }
    }

    fn periodic(&mut self) {
        if self.failed {
            if self.last_retry.elapsed() >= RETRY_EVERY {
                self.last_retry = Instant::now();
                self.heal();
            }
            return;
        }
        if let FsyncPolicy::Interval { period, .. } = self.opts.fsync {
            if self.unsynced > 0 && self.last_sync.elapsed() >= period {
                let _ = self.sync_or_fail();
            }
        }
    }

    fn fail(&mut self, e: &str) {
        if !self.failed {
            tracing::error!(error = %e, "audit writer failed; requests fail closed until it recovers");
        }
        self.failed = true;
        self.last_retry = Instant::now();
        self.shared.failed.store(true, Ordering::Release);
    }

    /// After a failure: cut back any partial line, write a recovery record with
    /// the count of records lost, fsync, and accept records again.
    fn heal(&mut self) {
        if let Some(cur) = &mut self.current {
            if cur.file.set_len(cur.len).is_err() {
                self.current = None;
            }
        }
        let mut rec = AuditRecord::new(AuditKind::Recovery);
        rec.ts = self.now();
        rec.reason = Some("write_failure".into());
        rec.detail = Some(serde_json::json!({"records_lost": self.lost}));
        match self
            .write_batch(&[rec])
            .map_err(|(_, e)| e)
            .and_then(|_| self.sync())
        {
            Ok(()) => {
                tracing::warn!(
                    records_lost = self.lost,
                    "audit writer recovered; recovery record written"
                );
                self.shared.count_written(1);
                self.failed = false;
                self.lost = 0;
                self.shared.failed.store(false, Ordering::Release);
            }
            Err(e) => tracing::debug!(error = %e, "audit writer still failing"),
        }
    }

    fn sync_or_fail(&mut self) -> Result<(), AuditUnavailable> {
        match self.sync() {
            Ok(()) => Ok(()),
            Err(e) => {
                self.fail(&e);
                Err(AuditUnavailable::Failed)
            }
        }
    }

    fn sync(&mut self) -> Result<(), String> {
        self.unsynced = 0;
        self.last_sync = Instant::now();
        if self.opts.fsync == FsyncPolicy::Never {
            return Ok(());
        }
        if let Some(cur) = &self.current {
            cur.file
                .sync_data()
                .map_err(|e| format!("fsync {}: {e}", display_name(&cur.path)))?;
        }
        Ok(())
    }

    /// The plaintext line of `rec` after `prev` into `plain` and its hash into
    /// `hash`; with encryption, the sealed line to write instead.
    fn encode(
        &self,
        rec: &AuditRecord,
        prev: &str,
        plain: &mut Vec<u8>,
        hash: &mut String,
    ) -> Result<Option<Vec<u8>>, String> {
        write_record_line(rec, prev, plain)?;
        sha256_hex_into(plain, hash);
        match self.opts.encryption.as_ref() {
            None => Ok(None),
            Some(k) => file_line(plain.clone(), Some(k)).map(Some),
        }
    }

    /// Chain and write `recs`, rotating as needed (and, under a cap, removing the
    /// oldest files at each rotation). On Err nothing past the last complete line
    /// stays in the file, the chain state is that of the last line written, and
    /// the error carries how many of `recs` were written.
    fn write_batch(&mut self, recs: &[AuditRecord]) -> Result<(), (usize, String)> {
        let today = day_of(self.now());
        let limit = self.opts.file_limit();
        let mut buf: Vec<u8> = Vec::with_capacity(recs.len() * 512);
        let mut in_buf = 0usize;
        let mut done = 0usize;
        let mut prev = self.prev_hash.clone();
        let mut hash = String::with_capacity(64);
        let mut plain = Vec::with_capacity(512);
        let mut len = self.current.as_ref().map_or(0, |c| c.len);
        for rec in recs {
            let mut sealed = self
                .encode(rec, &prev, &mut plain, &mut hash)
                .map_err(|e| (done, e))?;
            let need = sealed.as_ref().map_or(plain.len(), Vec::len) as u64 + 1;
            let rotate = match &self.current {
                None => true,
                Some(c) => (len > 0 && len + need > limit) || today > c.day,
            };
            if rotate {
                self.flush_batch(&mut buf, &mut in_buf, &mut done, &prev, len)?;
                self.rotate(today).map_err(|e| (done, e))?;
                if self.enforce_cap().map_err(|e| (done, e))? {
                    // The checkpoint is now the chain's head: chain this record to it.
                    prev.clone_from(&self.prev_hash);
                    sealed = self
                        .encode(rec, &prev, &mut plain, &mut hash)
                        .map_err(|e| (done, e))?;
                }
                len = self.current.as_ref().map_or(0, |c| c.len);
            }
            let line_len = sealed.as_ref().map_or(plain.len(), Vec::len);
            if line_len >= BIG_LINE {
                // A large batch's record (its events ride on it): written from
                // where it was made, not copied into the batch buffer first.
                self.flush_batch(&mut buf, &mut in_buf, &mut done, &prev, len)?;
                let mut line = sealed.take().unwrap_or_else(|| std::mem::take(&mut plain));
                line.push(b'\n');
                len += line.len() as u64;
                std::mem::swap(&mut prev, &mut hash);
                self.append(&line, 1, &prev, len).map_err(|e| (done, e))?;
                done += 1;
                continue;
            }
            let line: &[u8] = sealed.as_deref().unwrap_or(&plain);
            buf.extend_from_slice(line);
            buf.push(b'\n');
            in_buf += 1;
            len += line.len() as u64 + 1;
            std::mem::swap(&mut prev, &mut hash);
        }
        if !buf.is_empty() {
            self.append(&buf, in_buf, &prev, len)
                .map_err(|e| (done, e))?;
        }
        Ok(())
    }

    /// Write what `buf` holds (`in_buf` complete lines, the last chained to
    /// `prev`) and empty it; `done` counts the records written so far.
    fn flush_batch(
        &mut self,
        buf: &mut Vec<u8>,
        in_buf: &mut usize,
        done: &mut usize,
        prev: &str,
        len: u64,
    ) -> Result<(), (usize, String)> {
        if buf.is_empty() {
            return Ok(());
        }
        self.append(buf, *in_buf, prev, len)
            .map_err(|e| (*done, e))?;
        *done += *in_buf;
        *in_buf = 0;
        buf.clear();
        Ok(())
    }

    /// Append `buf` (`lines` complete lines) to the current file and commit the
    /// chain state; on error cut the file back to its last complete line.
    fn append(&mut self, buf: &[u8], lines: usize, prev: &str, new_len: u64) -> Result<(), String> {
        let Some(cur) = &mut self.current else {
            return Err("no audit file open".into());
        };
        if let Err(e) = cur.file.write_all(buf) {
            let _ = cur.file.set_len(cur.len);
            return Err(format!("write {}: {e}", display_name(&cur.path)));
        }
        cur.len = new_len;
        if let Some(r) = &mut cur.records {
            *r += lines as u64;
        }
        self.prev_hash.clear();
        self.prev_hash.push_str(prev);
        Ok(())
    }

    fn rotate(&mut self, today: u32) -> Result<(), String> {
        if let Some(cur) = self.current.take() {
            if self.opts.fsync != FsyncPolicy::Never {
                if let Err(e) = cur.file.sync_data() {
                    // Keep the file so a retry can fsync and cut it back.
                    let name = display_name(&cur.path);
                    self.current = Some(cur);
                    return Err(format!("fsync {name}: {e}"));
                }
            }
            if let Some(n) = cur.records {
                self.known_records.insert(display_name(&cur.path), n);
            }
            self.last_seq = Some(self.last_seq.map_or(cur.seq, |s| s.max(cur.seq)));
            self.last_day = self.last_day.max(cur.day);
        }
        let seq = self.last_seq.map_or(0, |s| s + 1);
        let day = today.max(self.last_day);
        let path = self.opts.dir.join(file_name(day, seq));
        let file = private_file_options()
            .append(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| format!("create {}: {e}", path.display()))?;
        if self.opts.fsync != FsyncPolicy::Never {
            sync_dir(&self.opts.dir);
        }
        tracing::debug!(file = %display_name(&path), "audit file opened");
        self.last_seq = Some(seq);
        self.last_day = day;
        self.current = Some(Current {
            file,
            path,
            day,
            seq,
            len: 0,
            records: Some(0),
        });
        Ok(())
    }

    /// A directory already past the cap on start (a smaller cap than before,
    /// files copied in): open a fresh file and remove what must go, as at a
    /// rotation, so the checkpoint is that file's first line.
    fn cap_on_start(&mut self) -> Result<(), String> {
        if self.opts.max_total_bytes.is_none() {
            return Ok(());
        }
        let current = self.current.as_ref().map(|c| c.path.clone());
        if self.cap_plan(current.as_deref())?.remove.is_empty() {
            return Ok(());
        }
        if self.current.as_ref().is_none_or(|c| c.len > 0) {
            let today = day_of(self.now());
            self.rotate(today)?;
        }
        self.enforce_cap().map(|_| ())
    }

    /// Which closed files go so that they plus one full file fit under the cap.
    fn cap_plan(&self, current: Option<&Path>) -> Result<CapPlan, String> {
        let mut plan = CapPlan::default();
        let Some(cap) = self.opts.max_total_bytes else {
            return Ok(plan);
        };
        let budget = cap.saturating_sub(LOCK_RESERVE);
        let limit = self.opts.file_limit();
        let dir = &self.opts.dir;
        let files =
            audit_files(dir).map_err(|e| format!("audit directory {}: {e}", dir.display()))?;
        let mut closed = Vec::new();
        for f in files {
            if Some(f.as_path()) == current {
                continue;
            }
            // A file that vanished meanwhile (an operator archiving) takes no room.
            if let Ok(m) = std::fs::metadata(&f) {
                closed.push((f, m.len()));
            }
        }
        let mut total: u64 = closed.iter().map(|(_, n)| n).sum();
        for (f, n) in closed {
            if total.saturating_add(limit) > budget {
                total -= n;
                plan.removed_bytes += n;
                plan.remove.push(f);
            } else {
                plan.kept.push((f, n));
            }
        }
        Ok(plan)
    }

    /// Under a cap, after a rotation: if the closed files plus one full file
    /// pass the cap, write a signed checkpoint as the current (empty) file's
    /// first line, fsync it, then remove the oldest files. True when a
    /// checkpoint was written. An Err is a failure to write the checkpoint (the
    /// writer fails closed); a file that cannot be removed is logged and left
    /// for the next rotation.
    fn enforce_cap(&mut self) -> Result<bool, String> {
        let Some(ckey) = self.opts.checkpoint_key.clone() else {
            return Ok(false);
        };
        let Some(cur_path) = self.current.as_ref().map(|c| c.path.clone()) else {
            return Ok(false);
        };
        let plan = self.cap_plan(Some(&cur_path))?;
        if plan.remove.is_empty() {
            return Ok(false);
        }
        // The chain continues from the first record of the first kept file that
        // has one, or (nothing kept but the new file) from the current head.
        let key = self.opts.encryption.clone();
        let mut anchor = None;
        let mut first_kept = display_name(&cur_path);
        for (f, n) in &plan.kept {
            if *n == 0 {
                continue;
            }
            match first_prev_hash(f, key.as_ref()) {
                Ok(Some(h)) => {
                    anchor = Some(h);
                    first_kept = display_name(f);
                    break;
                }
                Ok(None) => continue,
                Err(e) => {
                    // Without a trustworthy anchor a checkpoint would be a lie;
                    // keep every file and say so (the disk may then fill and the
                    // writer fail closed, which is the safe way round).
                    tracing::error!(file = %display_name(f), error = %e, "audit cap: cannot read the first kept record; nothing removed");
                    return Ok(false);
                }
            }
        }
        let anchor = match anchor {
            Some(a) => a,
            None => match self.current.as_ref().map(|c| c.len) {
                Some(0) => self.prev_hash.clone(),
                _ => match first_prev_hash(&cur_path, key.as_ref()) {
                    Ok(Some(h)) => h,
                    Ok(None) => self.prev_hash.clone(),
                    Err(e) => {
                        tracing::error!(file = %display_name(&cur_path), error = %e, "audit cap: cannot read the first kept record; nothing removed");
                        return Ok(false);
                    }
                },
            },
        };
        let mut removed_records = 0u64;
        for f in &plan.remove {
            let name = display_name(f);
            removed_records += match self.known_records.get(&name) {
                Some(n) => *n,
                None => count_lines(f).map_err(|e| format!("audit file {name}: {e}"))?,
            };
        }
        let mut rec = AuditRecord::new(AuditKind::Checkpoint);
        rec.ts = self.now();
        rec.reason = Some("max_total_bytes".into());
        let facts = CheckpointFacts {
            ts: ts_text(&rec.ts),
            anchor,
            removed_files: plan.remove.iter().map(|f| display_name(f)).collect(),
            removed_records,
            removed_bytes: plan.removed_bytes,
            first_kept,
        };
        let mac = ckey.sign(&facts, &self.prev_hash);
        rec.detail = Some(facts.detail(&mac));
        self.append_here(&rec)?;
        self.shared.count_written(1);
        // Durable before any file goes, whatever the fsync policy.
        if let Some(cur) = &self.current {
            cur.file
                .sync_data()
                .map_err(|e| format!("fsync {}: {e}", display_name(&cur.path)))?;
        }
        let mut gone = 0usize;
        for f in &plan.remove {
            match std::fs::remove_file(f) {
                Ok(()) => {
                    gone += 1;
                    self.known_records.remove(&display_name(f));
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => gone += 1,
                Err(e) => {
                    tracing::error!(file = %display_name(f), error = %e, "audit cap: cannot remove the file; the next rotation tries again")
                }
            }
        }
        sync_dir(&self.opts.dir);
        tracing::info!(
            files_removed = gone,
            records_removed = facts.removed_records,
            bytes_removed = facts.removed_bytes,
            first_kept = %facts.first_kept,
            "audit.max_total_bytes reached: oldest audit files removed; checkpoint written"
        );
        Ok(true)
    }

    /// Chain and append one record to the current file, without rotating.
    fn append_here(&mut self, rec: &AuditRecord) -> Result<(), String> {
        let mut plain = Vec::with_capacity(1024);
        let mut hash = String::with_capacity(64);
        let prev = self.prev_hash.clone();
        let sealed = self.encode(rec, &prev, &mut plain, &mut hash)?;
        let mut line = sealed.unwrap_or(plain);
        line.push(b'\n');
        let len = self.current.as_ref().map_or(0, |c| c.len) + line.len() as u64;
        self.append(&line, 1, &hash, len)
    }
}

/// What a cap enforcement removes and keeps (closed files, oldest first).
#[derive(Default)]
struct CapPlan {
    remove: Vec<PathBuf>,
    removed_bytes: u64,
    kept: Vec<(PathBuf, u64)>,
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Lines (records) in a file: its newline count.
fn count_lines(path: &Path) -> std::io::Result<u64> {
    let mut f = File::open(path)?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut n = 0u64;
    loop {
        let got = f.read(&mut buf)?;
        if got == 0 {
            return Ok(n);
        }
        n += buf[..got].iter().filter(|&&b| b == b'\n').count() as u64;
    }
}

/// The `prev_hash` of the first record of `path` (None for an empty file).
fn first_prev_hash(path: &Path, key: Option<&EncKey>) -> Result<Option<String>, String> {
    // A record line is far below this; a longer first line is not a record.
    const MAX_LINE: u64 = 1 << 20;
    let f = File::open(path).map_err(|e| e.to_string())?;
    let mut line = Vec::new();
    std::io::BufReader::new(f)
        .take(MAX_LINE)
        .read_until(b'\n', &mut line)
        .map_err(|e| e.to_string())?;
    if line.is_empty() {
        return Ok(None);
    }
    if line.pop() != Some(b'\n') {
        return Err("the first line is incomplete or too long".into());
    }
    let d = decode_line(&line, key).map_err(|e| match e {
        DecodeError::Unparseable(m) | DecodeError::Decrypt(m) => m,
    })?;
    Ok(Some(d.prev_hash().to_string()))
}

fn display_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string())
}

fn open_append(p: &Path) -> std::io::Result<File> {
    OpenOptions::new().append(true).open(p)
}

/// Position of the last `\n` before `end`, reading backwards in chunks.
fn rfind_newline(f: &mut File, end: u64) -> std::io::Result<Option<u64>> {
    const CHUNK: u64 = 64 * 1024;
    let mut hi = end;
    let mut buf = vec![0u8; CHUNK as usize];
    while hi > 0 {
        let lo = hi.saturating_sub(CHUNK);
        let n = (hi - lo) as usize;
        f.seek(SeekFrom::Start(lo))?;
        f.read_exact(&mut buf[..n])?;
        if let Some(i) = buf[..n].iter().rposition(|&b| b == b'\n') {
            return Ok(Some(lo + i as u64));
        }
        hi = lo;
    }
    Ok(None)
}

/// Cut a torn tail off `path`: bytes after the last newline and, once, a last
/// complete line that is not a record. Returns the bytes cut and the last
/// record's plaintext line (None when the file ends up empty) and whether it was
/// encrypted.
type LastLine = Option<(Vec<u8>, bool)>;

fn recover_file(path: &Path, key: Option<&EncKey>) -> Result<(u64, LastLine), String> {
    let err = |e: std::io::Error| format!("audit file {}: {e}", path.display());
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(err)?;
    let mut len = f.metadata().map_err(err)?.len();
    let mut cut = 0u64;
    let mut may_cut_line = true;
    let result = loop {
        if len == 0 {
            break None;
        }
        let mut last = [0u8; 1];
        f.seek(SeekFrom::Start(len - 1)).map_err(err)?;
        f.read_exact(&mut last).map_err(err)?;
        if last[0] != b'\n' {
            let keep = rfind_newline(&mut f, len)
                .map_err(err)?
                .map_or(0, |p| p + 1);
            cut += len - keep;
            f.set_len(keep).map_err(err)?;
            len = keep;
            continue;
        }
        let start = rfind_newline(&mut f, len - 1)
            .map_err(err)?
            .map_or(0, |p| p + 1);
        let mut line = vec![0u8; (len - 1 - start) as usize];
        f.seek(SeekFrom::Start(start)).map_err(err)?;
        f.read_exact(&mut line).map_err(err)?;
        match decode_line(&line, key) {
            Ok(d) => break Some((d.plain.into_owned(), d.encrypted)),
            Err(DecodeError::Decrypt(e)) => {
                return Err(format!(
                    "audit file {}: the last record cannot be decrypted ({e}); the chain cannot continue",
                    path.display()
                ))
            }
            Err(DecodeError::Unparseable(_)) if may_cut_line => {
                may_cut_line = false;
                cut += len - start;
                f.set_len(start).map_err(err)?;
                len = start;
            }
            Err(DecodeError::Unparseable(e)) => {
                return Err(format!(
                    "audit file {}: the last lines are not audit records ({e}); run `consentgate audit verify`",
                    path.display()
                ))
            }
        }
    };
    if cut > 0 {
        f.sync_all().map_err(err)?;
    }
    Ok((cut, result))
}
