//! The audit writer: a bounded tokio channel into a dedicated writer thread.
//!
//! The request path calls [`AuditWriter::submit`], which never blocks: it either
//! queues the request's records (all of them, as one message) or says the audit
//! log is unavailable, and the proxy then blocks the request (`audit_unavailable`).
//! The writer thread runs its own single-threaded tokio runtime, so its blocking
//! file I/O never stalls the proxy's workers.

use super::chain::{
    decode_line, file_line, sha256_hex, sha256_hex_into, write_record_line, DecodeError, ZERO_HASH,
};
use super::crypto::EncKey;
use super::pseudonym::is_pseudonym;
use super::verify::audit_files;
use super::{day_of, file_name, parse_file_name, AuditKind, AuditRecord};
use crate::metrics::Metrics;
use chrono::{DateTime, Utc};
use prometheus::IntCounter;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// Rotate a file before it would pass 64 MiB.
pub const DEFAULT_MAX_FILE_BYTES: u64 = 64 << 20;
/// Queued messages (one per submit) before `submit` reports the log unavailable.
pub const DEFAULT_CHANNEL_CAPACITY: usize = 8192;
/// Records gathered into one write.
const MAX_BATCH: usize = 4096;
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
pub enum FsyncPolicy {
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
    /// `always`, `interval` (1 s / 1000 records) or `never`.
    pub fn parse(s: &str) -> Result<FsyncPolicy, String> {
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
pub struct AuditCounters {
    /// `consentgate_audit_records_total`: records written.
    pub records: IntCounter,
    /// `consentgate_audit_write_failures_total`: records refused or lost.
    pub failures: IntCounter,
}

impl AuditCounters {
    pub fn from_metrics(m: &Metrics) -> AuditCounters {
        AuditCounters {
            records: m.audit_records_total.clone(),
            failures: m.audit_write_failures_total.clone(),
        }
    }
}

type Clock = Arc<dyn Fn() -> DateTime<Utc> + Send + Sync>;

/// How to run the writer. `AuditOptions::new(dir)` gives the defaults.
#[derive(Clone)]
pub struct AuditOptions {
    /// `audit.path`: the directory of audit files (created, mode 0750, if missing).
    pub dir: PathBuf,
    pub fsync: FsyncPolicy,
    pub max_file_bytes: u64,
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
            .field("channel_capacity", &self.channel_capacity)
            .field("encryption", &self.encryption.is_some())
            .finish()
    }
}

impl AuditOptions {
    pub fn new(dir: impl Into<PathBuf>) -> AuditOptions {
        AuditOptions {
            dir: dir.into(),
            fsync: FsyncPolicy::default(),
            max_file_bytes: DEFAULT_MAX_FILE_BYTES,
            channel_capacity: DEFAULT_CHANNEL_CAPACITY,
            encryption: None,
            counters: None,
            clock: None,
        }
    }
}

/// Why records were not accepted. The proxy blocks the request with reason
/// `audit_unavailable` on any of these.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuditUnavailable {
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
    pub const REASON: &'static str = "audit_unavailable";

    pub fn as_str(self) -> &'static str {
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
/// writer writes what is queued, fsyncs (unless `never`) and stops.
#[derive(Clone)]
pub struct AuditWriter {
    tx: mpsc::Sender<Msg>,
    shared: Arc<Shared>,
}

impl fmt::Debug for AuditWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditWriter")
            .field("healthy", &self.is_healthy())
            .finish()
    }
}

impl AuditWriter {
    /// Open (or create) the audit directory, continue the chain from the last
    /// record (cutting a torn tail and recording that), and start the writer
    /// thread. Synchronous; needs no runtime. Errors name the file.
    pub fn start(opts: AuditOptions) -> Result<AuditWriter, String> {
        let shared = Arc::new(Shared {
            failed: AtomicBool::new(false),
            counters: opts.counters.clone(),
        });
        let mut state = State::open(opts, shared.clone())?;
        let (tx, rx) = mpsc::channel(state.opts.channel_capacity.max(1));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .map_err(|e| format!("audit writer runtime: {e}"))?;
        std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || rt.block_on(state.run(rx)))
            .map_err(|e| format!("audit writer thread: {e}"))?;
        Ok(AuditWriter { tx, shared })
    }

    /// Queue `recs` (one request's records) without blocking. Either all are
    /// accepted or none; on Err the caller must fail closed.
    pub fn submit(&self, recs: Vec<AuditRecord>) -> Result<(), AuditUnavailable> {
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
    pub async fn flush(&self) -> Result<(), AuditUnavailable> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Msg::Flush(tx))
            .await
            .map_err(|_| AuditUnavailable::Closed)?;
        rx.await.map_err(|_| AuditUnavailable::Closed)?
    }

    /// False while the writer is failed (submits are refused).
    pub fn is_healthy(&self) -> bool {
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
        (AuditWriter { tx, shared }, rx)
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
}

struct State {
    opts: AuditOptions,
    shared: Arc<Shared>,
    current: Option<Current>,
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

    fn open(opts: AuditOptions, shared: Arc<Shared>) -> Result<State, String> {
        let dir = opts.dir.clone();
        if !dir.is_dir() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o750)
                .create(&dir)
                .map_err(|e| format!("audit directory {}: {e}", dir.display()))?;
            tracing::info!(path = %dir.display(), "created audit directory");
        }
        let files =
            audit_files(&dir).map_err(|e| format!("audit directory {}: {e}", dir.display()))?;
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
            current: None,
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
                if day >= today && len < state.opts.max_file_bytes && same_mode {
                    let file = open_append(last)
                        .map_err(|e| format!("audit file {}: {e}", last.display()))?;
                    state.current = Some(Current {
                        file,
                        path: last.clone(),
                        day,
                        seq,
                        len,
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

    /// Chain and write `recs`, rotating as needed. On Err nothing past the last
    /// complete line stays in the file, the chain state is that of the last line
    /// written, and the error carries how many of `recs` were written.
    fn write_batch(&mut self, recs: &[AuditRecord]) -> Result<(), (usize, String)> {
        let today = day_of(self.now());
        let mut buf: Vec<u8> = Vec::with_capacity(recs.len() * 512);
        let mut in_buf = 0usize;
        let mut done = 0usize;
        let mut prev = self.prev_hash.clone();
        let mut hash = String::with_capacity(64);
        let mut plain = Vec::with_capacity(512);
        let mut len = self.current.as_ref().map_or(0, |c| c.len);
        for rec in recs {
            write_record_line(rec, &prev, &mut plain).map_err(|e| (done, e))?;
            sha256_hex_into(&plain, &mut hash);
            let sealed = match self.opts.encryption.as_ref() {
                None => None,
                Some(k) => Some(file_line(plain.clone(), Some(k)).map_err(|e| (done, e))?),
            };
            let line: &[u8] = sealed.as_deref().unwrap_or(&plain);
            let need = line.len() as u64 + 1;
            let rotate = match &self.current {
                None => true,
                Some(c) => (len > 0 && len + need > self.opts.max_file_bytes) || today > c.day,
            };
            if rotate {
                if !buf.is_empty() {
                    self.append(&buf, &prev, len).map_err(|e| (done, e))?;
                    done += in_buf;
                    in_buf = 0;
                    buf.clear();
                }
                self.rotate(today).map_err(|e| (done, e))?;
                len = 0;
            }
            buf.extend_from_slice(line);
            buf.push(b'\n');
            in_buf += 1;
            std::mem::swap(&mut prev, &mut hash);
            len += need;
        }
        if !buf.is_empty() {
            self.append(&buf, &prev, len).map_err(|e| (done, e))?;
        }
        Ok(())
    }

    /// Append `buf` (complete lines) to the current file and commit the chain
    /// state; on error cut the file back to its last complete line.
    fn append(&mut self, buf: &[u8], prev: &str, new_len: u64) -> Result<(), String> {
        let Some(cur) = &mut self.current else {
            return Err("no audit file open".into());
        };
        if let Err(e) = cur.file.write_all(buf) {
            let _ = cur.file.set_len(cur.len);
            return Err(format!("write {}: {e}", display_name(&cur.path)));
        }
        cur.len = new_len;
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
            self.last_seq = Some(self.last_seq.map_or(cur.seq, |s| s.max(cur.seq)));
            self.last_day = self.last_day.max(cur.day);
        }
        let seq = self.last_seq.map_or(0, |s| s + 1);
        let day = today.max(self.last_day);
        let path = self.opts.dir.join(file_name(day, seq));
        let file = OpenOptions::new()
            .append(true)
            .create_new(true)
            .mode(0o640)
            .open(&path)
            .map_err(|e| format!("create {}: {e}", path.display()))?;
        if self.opts.fsync != FsyncPolicy::Never {
            if let Ok(d) = File::open(&self.opts.dir) {
                let _ = d.sync_all();
            }
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
        });
        Ok(())
    }
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
