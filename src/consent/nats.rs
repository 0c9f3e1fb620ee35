//! A fleet follows one source through a NATS JetStream key-value bucket
//! (SPEC §14; docs/FLEET.md).
//!
//! * [`start`] (`consent.source: nats`): a watcher. Loads the whole bucket
//!   (a last-per-subject watch), then applies every change as it comes; ready
//!   once caught up (an empty bucket included). The async-nats ordered consumer
//!   re-creates itself after a reconnect from the last sequence it delivered; a
//!   watch that ends (a terminal error) is re-created here from the last applied
//!   revision + 1, after a jittered backoff. Every second (more often under a
//!   short `max_staleness`) it asks the server for
//!   the stream's last sequence: answered and applied up to it ⇒ `mark_good`;
//!   cut off ⇒ `mark_down`, so staleness grows and `max_staleness` fails closed.
//! * [`start_replica`] (`consent.replicate_to: nats`): an owner (file or
//!   PostgreSQL source) mirrors every change applied to its store into the
//!   bucket: first a reconciliation with the whole store (missing or different
//!   keys written, stray keys deleted), then each changed patient, written with
//!   compare-and-set on the key's revision, last write wins by `updated_at`.
//!
//! Keys: `p.` + base64url (no padding) of the patient id (KV keys allow only
//! `[-/_=.a-zA-Z0-9]`). Values: the stored record's JSON (hashes only).

use super::record::ConsentRecord;
use super::source::{BoxFuture, ConsentWriter, Merge, Precondition, PropagationObserver};
use super::source::{WriteError, Written};
use super::store::{ConsentStore, Plaintext, StoreObserver};
use crate::config::NatsCfg;
use async_nats::jetstream::kv::{Entry, Operation, Store};
use base64::Engine as _;
use bytes::Bytes;
use futures_util::StreamExt;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// How often a watcher checks that it is connected and caught up: every
/// second, more often when `max_staleness` is short (a quarter of it, at
/// least every 100 ms), so a healthy watcher is never stale between checks.
fn tick_for(max_staleness: Duration) -> Duration {
    (max_staleness / 4).clamp(Duration::from_millis(100), Duration::from_secs(1))
}
/// A request to the server that takes longer counts as a failure.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// Opening the bucket and starting a watch. Longer than a request's: when a
/// fleet restarts at once, the server answers hundreds of consumer creations
/// while it streams their snapshots (2-3 s each was seen with 100 watchers on
/// 2 cores), and a timed-out attempt only adds to the herd.
const SETUP_TIMEOUT: Duration = Duration::from_secs(15);
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
const KEY_PREFIX: &str = "p.";
/// Writes in flight while reconciling the bucket with the store.
const RECONCILE_IN_FLIGHT: usize = 64;

/// The bucket key of a patient id.
pub(crate) fn key_of(patient_id: &str) -> String {
    let b = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(patient_id.trim());
    format!("{KEY_PREFIX}{b}")
}

/// The patient id of a bucket key (`None`: not one of ours).
pub(crate) fn patient_of(key: &str) -> Option<String> {
    let b = key.strip_prefix(KEY_PREFIX)?;
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(b)
        .ok()?;
    String::from_utf8(raw).ok().filter(|s| !s.trim().is_empty())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Exponential backoff with ±25 % jitter, so a fleet does not retry in step.
fn jittered(d: Duration) -> Duration {
    let f = 0.75 + rand::random::<f64>() * 0.5;
    d.mul_f64(f)
}

/// Connect (in the background: an unreachable server at start is retried,
/// the source stays not ready meanwhile).
async fn connect(cfg: &NatsCfg) -> Result<async_nats::Client, String> {
    let mut opts = match &cfg.credentials_file {
        Some(p) => async_nats::ConnectOptions::with_credentials_file(p)
            .await
            .map_err(|e| format!("consent.nats.credentials_file: {e}"))?,
        None => async_nats::ConnectOptions::new(),
    };
    if let Some(ca) = &cfg.ca_file {
        opts = opts.add_root_certificates(ca.clone());
    }
    if cfg.url.split(',').any(|u| u.trim().starts_with("tls://")) {
        opts = opts.require_tls(true);
    }
    opts = opts
        .name("consentgate")
        .retry_on_initial_connect()
        .connection_timeout(REQUEST_TIMEOUT)
        .reconnect_delay_callback(|attempts| {
            let exp = BACKOFF_MIN.saturating_mul(1u32 << attempts.min(8) as u32);
            jittered(exp.min(Duration::from_secs(5)))
        });
    let urls: Vec<async_nats::ServerAddr> = cfg
        .url
        .split(',')
        .map(|u| u.trim().parse::<async_nats::ServerAddr>())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("consent.nats.url: {e}"))?;
    opts.connect(urls)
        .await
        .map_err(|e| format!("consent.nats: cannot connect: {e}"))
}

async fn bucket(client: &async_nats::Client, name: &str) -> Result<Store, String> {
    let mut js = async_nats::jetstream::new(client.clone());
    js.set_timeout(SETUP_TIMEOUT);
    match tokio::time::timeout(SETUP_TIMEOUT, js.get_key_value(name)).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(format!("bucket {name}: {e}")),
        Err(_) => Err(format!("bucket {name}: timed out")),
    }
}

/// The stream's last sequence (a round trip to the server); 0 when it holds
/// no message at all (empty, or purged as a whole: nothing will be sent).
async fn last_sequence(kv: &Store, limit: Duration) -> Result<u64, String> {
    match tokio::time::timeout(limit, kv.stream.get_info()).await {
        Ok(Ok(i)) if i.state.messages == 0 => Ok(0),
        Ok(Ok(i)) => Ok(i.state.last_sequence),
        Ok(Err(e)) => Err(format!("stream info: {e}")),
        Err(_) => Err("stream info: timed out".into()),
    }
}

fn seconds_since(t: &async_nats::jetstream::kv::Entry) -> f64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0);
    ((now - t.created.unix_timestamp_nanos()).max(0) as f64) / 1e9
}

// ---------------------------------------------------------------- watcher

struct Watcher {
    cfg: NatsCfg,
    store: Arc<ConsentStore>,
    observer: PropagationObserver,
    client: async_nats::Client,
    /// The last revision applied (every revision up to it is in the store).
    last: AtomicU64,
    /// A stream sequence the heartbeat saw that is not applied yet (0: none).
    target: AtomicU64,
    /// The whole bucket has been loaded once.
    loaded: tokio::sync::watch::Sender<bool>,
    tick: Duration,
}

impl Watcher {
    /// Apply one entry. `observe`: count propagation (not for the initial load).
    fn apply(&self, e: &Entry, observe: bool) {
        self.last.fetch_max(e.revision, Ordering::Relaxed);
        let Some(pid) = patient_of(&e.key) else {
            tracing::warn!(
                revision = e.revision,
                "consent bucket key not ours; skipped"
            );
            return;
        };
        let changed = match e.operation {
            Operation::Delete | Operation::Purge => self.store.delete(&pid),
            Operation::Put => match ConsentRecord::parse_json(&e.value, None) {
                Ok(mut rec) if rec.patient_id.trim() == pid.trim() => {
                    rec.patient_id = pid;
                    self.store.put_if_changed(rec)
                }
                Ok(_) => {
                    tracing::warn!(
                        revision = e.revision,
                        "consent bucket value's patient_id does not match its key; skipped"
                    );
                    false
                }
                Err(err) => {
                    tracing::warn!(revision = e.revision, field = %err.field,
                        "consent bucket value is not a valid record; skipped");
                    false
                }
            },
        };
        if changed && observe {
            (self.observer)(seconds_since(e));
            tracing::debug!(revision = e.revision, "consent change applied");
        }
    }

    /// Everything up to the server's last sequence is applied: current now.
    fn caught_up(&self) {
        self.target.store(0, Ordering::Relaxed);
        self.store.mark_good();
        self.loaded.send_replace(true);
    }

    /// After an entry: current if it was the last pending one or the
    /// heartbeat's target is reached.
    fn after_entry(&self, delta: u64) {
        let t = self.target.load(Ordering::Relaxed);
        if delta == 0 || (t != 0 && self.last.load(Ordering::Relaxed) >= t) {
            self.caught_up();
        }
    }

    /// One watch, from the bucket's start (first) or from the last applied
    /// revision + 1, until it ends with an error.
    async fn session(&self, kv: &Store) -> Result<(), String> {
        let from = self.last.load(Ordering::Relaxed);
        let seq = last_sequence(kv, SETUP_TIMEOUT).await?;
        let watch = if from == 0 {
            kv.watch_with_history(">").await
        } else {
            kv.watch_all_from_revision(from + 1).await
        };
        let mut watch = watch.map_err(|e| format!("watch: {e}"))?;
        // An empty bucket sends nothing at all (no end-of-initial-data marker).
        if seq <= from {
            self.caught_up();
        } else {
            self.target.store(seq, Ordering::Relaxed);
        }
        let mut initial = from == 0;
        // The ordered consumer re-creates itself after a reconnect or missed
        // heartbeats (reporting each as an error, then going on): only the end
        // of the stream, or errors without end, are terminal.
        let mut errors = 0u32;
        while let Some(e) = watch.next().await {
            let e = match e {
                Ok(e) => e,
                Err(err) => {
                    errors += 1;
                    tracing::warn!(error = %err, "consent bucket watch interrupted; resuming");
                    if errors >= 20 {
                        return Err(format!("watch: {err}"));
                    }
                    continue;
                }
            };
            errors = 0;
            self.apply(&e, !initial);
            if e.delta == 0 {
                initial = false;
            }
            self.after_entry(e.delta);
        }
        Err("watch ended".into())
    }

    /// Watch until dropped: re-create the watch only after it ends, from the
    /// last applied revision, with a jittered exponential backoff.
    async fn run(self: Arc<Self>) {
        let mut backoff = BACKOFF_MIN;
        loop {
            let started = tokio::time::Instant::now();
            let r = match bucket(&self.client, &self.cfg.bucket).await {
                Ok(kv) => self.session(&kv).await,
                Err(e) => Err(e),
            };
            if let Err(e) = r {
                self.store.mark_down();
                tracing::warn!(error = %e, revision = self.last.load(Ordering::Relaxed),
                    retry_ms = backoff.as_millis() as u64,
                    "consent bucket watch failed; re-creating it (decisions use the cache until max_staleness)");
            }
            if started.elapsed() > BACKOFF_MAX {
                backoff = BACKOFF_MIN;
            }
            tokio::time::sleep(jittered(backoff)).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// Every second: connected and applied up to the stream's last sequence ⇒
    /// good; cut off or unanswered ⇒ down (staleness grows).
    async fn heartbeat(self: Arc<Self>) {
        let mut kv: Option<Store> = None;
        let mut tick = tokio::time::interval(self.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if !*self.loaded.borrow() {
                continue;
            }
            if self.client.connection_state() != async_nats::connection::State::Connected {
                self.store.mark_down();
                continue;
            }
            if kv.is_none() {
                kv = tokio::time::timeout(REQUEST_TIMEOUT, bucket(&self.client, &self.cfg.bucket))
                    .await
                    .ok()
                    .and_then(Result::ok);
            }
            let Some(k) = &kv else {
                self.store.mark_down();
                continue;
            };
            match last_sequence(k, REQUEST_TIMEOUT).await {
                Ok(seq) if self.last.load(Ordering::Relaxed) >= seq => self.caught_up(),
                Ok(seq) => {
                    self.target.store(seq, Ordering::Relaxed);
                }
                Err(e) => {
                    self.store.mark_down();
                    tracing::debug!(error = %e, "consent bucket heartbeat failed");
                }
            }
        }
    }
}

/// A running NATS source. Dropping it stops the watch.
pub(crate) struct NatsSourceHandle {
    tasks: Vec<JoinHandle<()>>,
    bucket: String,
}

impl Drop for NatsSourceHandle {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl NatsSourceHandle {
    /// Admin-API writes are refused (api.rs answers 405 before calling it).
    pub(crate) fn writer(&self) -> Arc<dyn ConsentWriter> {
        Arc::new(ReadOnlyWriter {
            bucket: self.bucket.clone(),
        })
    }
}

/// Start the watcher; waits (a few seconds at most) for the initial load, so
/// a reachable bucket makes the proxy ready with data. An unreachable server
/// is retried in the background (not ready until loaded).
pub(crate) async fn start(
    cfg: NatsCfg,
    max_staleness: Duration,
    store: Arc<ConsentStore>,
    observer: PropagationObserver,
) -> Result<NatsSourceHandle, String> {
    let client = connect(&cfg).await?;
    let (loaded, mut rx) = tokio::sync::watch::channel(false);
    let bucket = cfg.bucket.clone();
    let w = Arc::new(Watcher {
        cfg,
        store,
        observer,
        client,
        last: AtomicU64::new(0),
        target: AtomicU64::new(0),
        loaded,
        tick: tick_for(max_staleness),
    });
    let tasks = vec![
        tokio::spawn(w.clone().run()),
        tokio::spawn(w.clone().heartbeat()),
    ];
    if tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|l| *l))
        .await
        .is_err()
    {
        tracing::warn!(
            bucket = %bucket,
            "consent bucket not loaded yet; retrying (not ready until loaded)"
        );
    }
    Ok(NatsSourceHandle { tasks, bucket })
}

/// The writer of a NATS-fed instance: every write is refused.
struct ReadOnlyWriter {
    bucket: String,
}

impl ConsentWriter for ReadOnlyWriter {
    fn modify(
        &self,
        _patient_id: &str,
        _pre: Precondition,
        _merge: Merge,
        _actor: &str,
    ) -> BoxFuture<'_, Result<Written, WriteError>> {
        let msg = format!(
            "consent here follows NATS bucket {}; write through the owner's admin API",
            self.bucket
        );
        Box::pin(async move { Err(WriteError::Storage(msg)) })
    }
}

// ---------------------------------------------------------------- replica

/// The patients changed in the store and not yet written to the bucket.
pub(crate) struct Replica {
    store: Arc<ConsentStore>,
    dirty: Mutex<HashSet<Arc<str>>>,
    wake: Notify,
}

struct ReplicaObserver(Arc<Replica>);

impl StoreObserver for ReplicaObserver {
    fn stored(&self, rec: &ConsentRecord, _plain: &Plaintext) {
        self.0.mark(&rec.patient_id);
    }
    fn deleted(&self, patient_id: &str) {
        self.0.mark(patient_id);
    }
}

impl Replica {
    /// A replica of `store` and the observer to install on it (before the
    /// source loads).
    pub(crate) fn new(store: Arc<ConsentStore>) -> (Arc<Replica>, Arc<dyn StoreObserver>) {
        let r = Arc::new(Replica {
            store,
            dirty: Mutex::new(HashSet::new()),
            wake: Notify::new(),
        });
        (r.clone(), Arc::new(ReplicaObserver(r)))
    }

    fn mark(&self, patient_id: &str) {
        lock(&self.dirty).insert(Arc::from(patient_id.trim()));
        self.wake.notify_one();
    }

    fn take(&self) -> Vec<Arc<str>> {
        lock(&self.dirty).drain().collect()
    }

    /// The bucket's current entries (deleted keys left out), by key.
    async fn read_bucket(kv: &Store) -> Result<HashMap<String, Entry>, String> {
        let mut out = HashMap::new();
        if last_sequence(kv, SETUP_TIMEOUT).await? == 0 {
            return Ok(out);
        }
        let mut w = kv
            .watch_with_history(">")
            .await
            .map_err(|e| format!("watch: {e}"))?;
        loop {
            let e = match tokio::time::timeout(REQUEST_TIMEOUT, w.next()).await {
                Ok(Some(Ok(e))) => e,
                Ok(Some(Err(e))) => return Err(format!("watch: {e}")),
                Ok(None) => return Err("watch ended".into()),
                // The stream holds messages, so they come: a slow server.
                Err(_) => return Err("reading the bucket timed out".into()),
            };
            let done = e.delta == 0;
            if e.operation == Operation::Put {
                out.insert(e.key.clone(), e);
            } else {
                out.remove(&e.key);
            }
            if done {
                return Ok(out);
            }
        }
    }

    /// Make the bucket hold exactly the store: keys missing or different are
    /// written, keys the store does not hold are deleted.
    async fn reconcile(&self, kv: &Store) -> Result<(usize, usize), String> {
        // Changes from here on are in `dirty` again; reading the store below
        // sees at least everything before.
        drop(self.take());
        let mut bucket = Self::read_bucket(kv).await?;
        // The snapshot says each key's state (absent included), so no key is
        // read again; writes are compare-and-set, so a key changed since the
        // snapshot is read and retried. Up to RECONCILE_IN_FLIGHT at once: a
        // million patients are a million round trips.
        let work: Vec<(Arc<str>, Option<Entry>)> = self
            .store
            .patient_ids()
            .into_iter()
            .map(|id| {
                let cur = bucket.remove(&key_of(&id));
                (id, cur)
            })
            .collect();
        let mut writes = futures_util::stream::iter(work)
            .map(|(id, cur)| async move { self.write_one(kv, &id, Some(cur), true).await })
            .buffer_unordered(RECONCILE_IN_FLIGHT);
        let mut written = 0;
        while let Some(r) = writes.next().await {
            if r? {
                written += 1;
            }
        }
        drop(writes);
        let mut deleted = 0;
        for (key, e) in bucket {
            match kv.delete_expect_revision(&key, Some(e.revision)).await {
                Ok(()) => deleted += 1,
                Err(err) => return Err(format!("delete: {err}")),
            }
        }
        Ok((written, deleted))
    }

    /// Write the store's state of one patient. `cur`: the bucket's entry
    /// (`Some(None)`: absent) if already read. `force`: the store wins
    /// (reconciliation); else last write wins by `updated_at`. `true` when
    /// the bucket changed.
    async fn write_one(
        &self,
        kv: &Store,
        patient_id: &str,
        mut cur: Option<Option<Entry>>,
        force: bool,
    ) -> Result<bool, String> {
        let key = key_of(patient_id);
        let want = self.store.get(patient_id);
        let value = match &want {
            Some(r) => Some(Bytes::from(
                serde_json::to_vec(&**r).map_err(|e| format!("encode: {e}"))?,
            )),
            None => None,
        };
        for _ in 0..8 {
            let entry = match cur.take() {
                Some(known) => known,
                None => match tokio::time::timeout(REQUEST_TIMEOUT, kv.entry(key.clone())).await {
                    Ok(Ok(e)) => e,
                    Ok(Err(e)) => return Err(format!("get: {e}")),
                    Err(_) => return Err("get: timed out".into()),
                },
            };
            let live = entry.filter(|e| e.operation == Operation::Put);
            let res = match (&value, &live) {
                (Some(v), Some(e)) if e.value == *v => return Ok(false),
                (Some(_), Some(e))
                    if !force
                        && want.as_ref().is_some_and(|w| {
                            ConsentRecord::parse_json(&e.value, None)
                                .is_ok_and(|b| !w.supersedes(&b))
                        }) =>
                {
                    // The bucket holds a newer record (another owner wrote it).
                    return Ok(false);
                }
                (Some(v), Some(e)) => kv
                    .update(&key, v.clone(), e.revision)
                    .await
                    .map(|_| ())
                    .map_err(|e| {
                        (
                            e.kind()
                                == async_nats::jetstream::kv::UpdateErrorKind::WrongLastRevision,
                            e.to_string(),
                        )
                    }),
                (Some(v), None) => kv.create(&key, v.clone()).await.map(|_| ()).map_err(|e| {
                    (
                        e.kind() == async_nats::jetstream::kv::CreateErrorKind::AlreadyExists,
                        e.to_string(),
                    )
                }),
                (None, Some(e)) => kv
                    .delete_expect_revision(&key, Some(e.revision))
                    .await
                    .map_err(|e| (true, e.to_string())),
                (None, None) => return Ok(false),
            };
            match res {
                Ok(()) => return Ok(true),
                // Someone wrote in between: read again and retry.
                Err((true, _)) => continue,
                Err((false, e)) => return Err(e),
            }
        }
        Err("the key kept changing; retried".into())
    }

    async fn run(self: Arc<Self>, client: async_nats::Client, bucket_name: String) {
        let mut backoff = BACKOFF_MIN;
        loop {
            let r: Result<(), String> = async {
                let kv = bucket(&client, &bucket_name).await?;
                let (w, d) = self.reconcile(&kv).await?;
                tracing::info!(bucket = %bucket_name, written = w, deleted = d,
                    "consent bucket reconciled with the store");
                backoff = BACKOFF_MIN;
                loop {
                    let ids = self.take();
                    if ids.is_empty() {
                        self.wake.notified().await;
                        continue;
                    }
                    for (i, id) in ids.iter().enumerate() {
                        if let Err(e) = self.write_one(&kv, id, None, false).await {
                            let mut d = lock(&self.dirty);
                            d.extend(ids.iter().skip(i).cloned());
                            return Err(e);
                        }
                    }
                }
            }
            .await;
            if let Err(e) = r {
                tracing::warn!(bucket = %bucket_name, error = %e,
                    retry_ms = backoff.as_millis() as u64,
                    "consent replication to NATS failed; retrying (then reconciling)");
            }
            tokio::time::sleep(jittered(backoff)).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }
}

/// A running replication. Dropping it stops it.
pub(crate) struct ReplicaHandle {
    task: JoinHandle<()>,
}

impl Drop for ReplicaHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Start mirroring `replica`'s store into the bucket (reconciliation first).
pub(crate) async fn start_replica(
    cfg: &NatsCfg,
    replica: Arc<Replica>,
) -> Result<ReplicaHandle, String> {
    let client = connect(cfg).await?;
    let task = tokio::spawn(replica.run(client, cfg.bucket.clone()));
    Ok(ReplicaHandle { task })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_valid_and_round_trip() {
        for id in ["P-1001", "a b/c.d", "é", "_kv", "x".repeat(200).as_str()] {
            let k = key_of(id);
            assert!(k
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-/_=.".contains(&b)));
            assert!(!k.ends_with('.'));
            assert_eq!(patient_of(&k).as_deref(), Some(id));
        }
        assert_eq!(patient_of("hb"), None);
        assert_eq!(patient_of("p.!!"), None);
    }
}
