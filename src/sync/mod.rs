//! Pushing opt-outs to vendors (SPEC §13 "Pushed"): every consent change that
//! denies a `sync:` target, from any source, is queued in a durable outbox and
//! delivered to the vendor's suppression API until acknowledged.
//!
//! How a change gets there:
//! 1. The consent store tells the outbox's [`StoreObserver`] of every record it
//!    applies (snapshot, journal, admin API, PostgreSQL feed, webhooks, learned
//!    opt-outs all end there). For each target the record denies, a stamp of what
//!    the push would say is compared with the ledger (file) or the per-target
//!    consent-version cursor (PostgreSQL); only something new is offered.
//! 2. The intake task makes offers durable: the ledger records the stamp and the
//!    entries are appended (file) or inserted in the same transaction as the
//!    ledger upsert (PostgreSQL, so N instances queue one entry). An entry's
//!    payload (patient id, plaintext addresses or vendor ids) is sealed with
//!    `sync.key_file` (AES-256-GCM). A denial no address or id can carry to the
//!    target is counted and audited as `no_address`, not queued.
//! 3. A worker per target delivers due entries: rate-limited, retried with
//!    exponential backoff and jitter (`Retry-After` honoured), parked (counted,
//!    audited, alerted through `consentgate_sync_lag_seconds`, retried every
//!    `sync.parked_retry`) past `sync.max_age`. An entry whose patient no longer
//!    denies the target is dropped as `superseded`. Every attempt is audited
//!    (`kind: sync`).
//!
//! Plaintext: the admin API, webhooks and the egress learner hand the addresses
//! a write names to [`PlaintextCarrier::hold`] for the time of the write; the
//! observer copies them into the sealed payload of a denying write's entries.
//! They are never stored, journaled or audited, and leave the outbox (and, for
//! the file outbox, the disk) once delivered.

mod deliver;
mod outbox;
mod pg;
pub(crate) mod target;

use crate::audit::{AuditRecord, AuditWriter, EncKey, PseudonymKey};
use crate::config::{Config, SourceKind, SyncCfg};
use crate::consent::source::BoxFuture;
use crate::consent::{
    ConsentRecord, ConsentStore, PgSourceConfig, Plaintext, PlaintextCarrier, StoreObserver,
};
use crate::forward::UpstreamClient;
use crate::metrics::Metrics;
use deliver::{Outcome, RateLimit};
use hmac::{Hmac, Mac};
use outbox::FileOutbox;
use sha2::Sha256;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use target::{Addresses, Payload, Target};
use tokio::sync::{watch, Notify};

/// Associated data of a sealed payload (no other file's line opens as one).
const AAD: &[u8] = b"consentgate-sync-v1";
/// How long an admin write waits for its outbox entries to be durable.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(10);
/// PostgreSQL: how long an offer without an address waits before it is
/// judged, so that the instance that took the write (and holds the address)
/// queues the entry first, and `no_address` is not counted for a change that
/// another instance could deliver.
const ADDRESSLESS_DELAY: Duration = Duration::from_secs(2);

/// Gets the current upstream client (it changes with config reloads).
pub(crate) type UpstreamSource = Arc<dyn Fn() -> UpstreamClient + Send + Sync>;
/// The consent version applied so far (`consent.source: postgres`).
pub(crate) type AppliedVersion = Arc<dyn Fn() -> i64 + Send + Sync>;

/// Something new for the outbox.
#[derive(Clone)]
struct Offer {
    target: usize,
    key: String,
    stamp: String,
    patient_id: String,
    payloads: Vec<Payload>,
    /// The patient was deleted: forget the ledger entry.
    forget: bool,
}

struct FileBackend {
    /// key → stamp of the last denial queued (see outbox.rs).
    ledger: Mutex<HashMap<String, String>>,
    outbox: Mutex<FileOutbox>,
}

struct PgBackend {
    cfg: PgSourceConfig,
    /// Per target: changes at or below this consent version were offered before.
    cursors: HashMap<String, i64>,
}

enum Backend {
    File(FileBackend),
    Pg(PgBackend),
}

struct Inner {
    targets: Vec<Target>,
    cfg: SyncCfg,
    seal: EncKey,
    /// Keys the ledger's HMAC of (target, patient id).
    ledger_key: [u8; 32],
    store: Arc<ConsentStore>,
    metrics: Arc<Metrics>,
    audit: Arc<AuditWriter>,
    pseudonyms: Arc<PseudonymKey>,
    /// Plaintext addresses of writes under way, by patient id.
    held: Mutex<HashMap<String, Vec<(u64, Addresses)>>>,
    held_seq: AtomicU64,
    offers: Mutex<VecDeque<Offer>>,
    /// PostgreSQL: address-less offers waiting for [`ADDRESSLESS_DELAY`].
    deferred: Mutex<VecDeque<(tokio::time::Instant, Offer)>>,
    /// Offers counted so far, and how many of them are durable.
    queued: AtomicU64,
    done: watch::Sender<u64>,
    intake_wake: Notify,
    work_wake: Vec<Notify>,
    backend: Backend,
    upstream: OnceLock<UpstreamSource>,
    applied: OnceLock<AppliedVersion>,
}

/// The running sync outbox. Cheap to clone.
#[derive(Clone)]
pub(crate) struct SyncOutbox {
    inner: Arc<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Read `sync.key_file`: 64 hex characters (the same format as the journal and audit keys).
fn load_key(path: &std::path::Path) -> Result<(EncKey, [u8; 32]), String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("sync.key_file {}: {e}", path.display()))?;
    let seal =
        EncKey::from_hex(&text).map_err(|e| format!("sync.key_file {}: {e}", path.display()))?;
    let mut raw = [0u8; 32];
    hex::decode_to_slice(text.trim(), &mut raw)
        .map_err(|_| format!("sync.key_file {}: not hex", path.display()))?;
    // A separate key for the ledger's HMAC, derived so the one file is enough.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&raw)
        .map_err(|_| "sync.key_file: bad key length".to_string())?;
    mac.update(b"consentgate-sync-ledger-v1");
    let ledger_key: [u8; 32] = mac.finalize().into_bytes().into();
    Ok((seal, ledger_key))
}

impl SyncOutbox {
    /// Open the outbox (`sync.targets` empty: `None`) and start taking offers.
    /// Call before the consent source loads, so its first load is observed.
    pub(crate) async fn open(
        cfg: &Config,
        store: Arc<ConsentStore>,
        metrics: Arc<Metrics>,
        audit: Arc<AuditWriter>,
        pseudonyms: Arc<PseudonymKey>,
    ) -> Result<Option<SyncOutbox>, String> {
        let sc = &cfg.sync;
        if sc.targets.is_empty() {
            return Ok(None);
        }
        let key_file = sc
            .key_file
            .as_deref()
            .ok_or_else(|| "sync.key_file: required with sync targets".to_string())?;
        let (seal, ledger_key) = load_key(key_file)?;
        let targets: Vec<Target> = sc.targets.iter().cloned().map(Target::new).collect();
        let backend = match cfg.consent.source {
            SourceKind::File => {
                let dir = sc.outbox.clone();
                let (ob, ledger) = tokio::task::spawn_blocking(move || FileOutbox::open(&dir))
                    .await
                    .map_err(|e| format!("sync outbox task: {e}"))??;
                let known: Vec<&str> = targets.iter().map(Target::name).collect();
                let orphans = ob
                    .entries
                    .values()
                    .filter(|e| !known.contains(&e.target.as_str()))
                    .count();
                let b = FileBackend {
                    ledger: Mutex::new(ledger),
                    outbox: Mutex::new(ob),
                };
                if orphans > 0 {
                    tracing::warn!(
                        entries = orphans,
                        "sync outbox entries of targets no longer configured are dropped"
                    );
                }
                Backend::File(b)
            }
            SourceKind::Postgres => {
                let pgc = PgSourceConfig::new(&cfg.consent.postgres);
                let conn = pg::connect(&pgc)
                    .await
                    .map_err(|e| format!("sync outbox (postgres): {e}"))?;
                let cursors = pg::cursors(&conn)
                    .await
                    .map_err(|e| format!("sync outbox (postgres): {e}"))?;
                Backend::Pg(PgBackend { cfg: pgc, cursors })
            }
            SourceKind::Nats => {
                return Err(
                    "sync: targets run on the instance that owns the consent source \
                     (file or postgres), not on one that follows a NATS bucket"
                        .into(),
                )
            }
        };
        let (done, _) = watch::channel(0u64);
        let inner = Arc::new(Inner {
            work_wake: targets.iter().map(|_| Notify::new()).collect(),
            targets,
            cfg: sc.clone(),
            seal,
            ledger_key,
            store: store.clone(),
            metrics,
            audit,
            pseudonyms,
            held: Mutex::new(HashMap::new()),
            held_seq: AtomicU64::new(0),
            offers: Mutex::new(VecDeque::new()),
            deferred: Mutex::new(VecDeque::new()),
            queued: AtomicU64::new(0),
            done,
            intake_wake: Notify::new(),
            backend,
            upstream: OnceLock::new(),
            applied: OnceLock::new(),
        });
        inner.drop_orphans();
        for t in &inner.targets {
            for r in [
                "delivered",
                "retry",
                "rejected",
                "parked",
                "no_address",
                "superseded",
            ] {
                inner
                    .metrics
                    .sync_deliveries_total
                    .with_label_values(&[t.name(), r])
                    .inc_by(0);
            }
        }
        inner.refresh_gauges_file();
        store.set_sync_observer(Arc::new(Observer(inner.clone())));
        tokio::spawn(inner.clone().intake());
        Ok(Some(SyncOutbox { inner }))
    }

    /// Start delivering (once the upstream client exists), and keep the gauges fresh.
    pub(crate) fn start(&self, upstream: UpstreamSource, applied: Option<AppliedVersion>) {
        let _ = self.inner.upstream.set(upstream);
        if let Some(a) = applied {
            let _ = self.inner.applied.set(a);
            self.inner.intake_wake.notify_one();
        }
        for i in 0..self.inner.targets.len() {
            tokio::spawn(self.inner.clone().worker(i));
        }
        tokio::spawn(self.inner.clone().gauges());
    }

    /// The plaintext carrier for the admin API, webhooks and the learner.
    pub(crate) fn carrier(&self) -> Arc<dyn PlaintextCarrier> {
        Arc::new(Carrier(self.inner.clone()))
    }
}

/// The store's observer (see the module docs).
struct Observer(Arc<Inner>);

impl StoreObserver for Observer {
    fn stored(&self, rec: &ConsentRecord, plain: &Plaintext) {
        self.0.observe(rec, plain);
    }
    fn deleted(&self, patient_id: &str) {
        let Backend::File(f) = &self.0.backend else {
            return;
        };
        let mut forget = Vec::new();
        {
            let ledger = lock(&f.ledger);
            for (i, _) in self.0.targets.iter().enumerate() {
                let key = self.0.key_of(i, patient_id);
                if ledger.contains_key(&key) {
                    forget.push(Offer {
                        target: i,
                        key,
                        stamp: String::new(),
                        patient_id: String::new(),
                        payloads: Vec::new(),
                        forget: true,
                    });
                }
            }
        }
        self.0.push_offers(forget);
    }
}

struct Carrier(Arc<Inner>);

/// Removes its addresses from the held map when dropped.
struct Held {
    inner: Arc<Inner>,
    patient_id: String,
    token: u64,
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut held = lock(&self.inner.held);
        if let Some(v) = held.get_mut(&self.patient_id) {
            v.retain(|(t, _)| *t != self.token);
            if v.is_empty() {
                held.remove(&self.patient_id);
            }
        }
    }
}

impl PlaintextCarrier for Carrier {
    fn hold(
        &self,
        patient_id: &str,
        emails: Vec<String>,
        phones: Vec<String>,
    ) -> Box<dyn std::any::Any + Send> {
        let token = self.0.held_seq.fetch_add(1, Ordering::Relaxed);
        let id = patient_id.trim().to_string();
        lock(&self.0.held)
            .entry(id.clone())
            .or_default()
            .push((token, Addresses { emails, phones }));
        Box::new(Held {
            inner: self.0.clone(),
            patient_id: id,
            token,
        })
    }

    fn flush(&self) -> BoxFuture<'_, ()> {
        let want = self.0.queued.load(Ordering::SeqCst);
        let mut rx = self.0.done.subscribe();
        Box::pin(async move {
            if *rx.borrow() >= want {
                return;
            }
            if tokio::time::timeout(FLUSH_TIMEOUT, rx.wait_for(|d| *d >= want))
                .await
                .is_err()
            {
                tracing::error!("sync outbox did not make a write's entries durable in time");
            }
        })
    }
}

impl Inner {
    /// The ledger key of (target, patient): 128 bits of a keyed HMAC, hex.
    fn key_of(&self, target: usize, patient_id: &str) -> String {
        let Ok(mut mac) = <Hmac<Sha256> as Mac>::new_from_slice(&self.ledger_key) else {
            return String::new();
        };
        mac.update(self.targets[target].name().as_bytes());
        mac.update(&[0]);
        mac.update(patient_id.trim().as_bytes());
        hex::encode(&mac.finalize().into_bytes()[..16])
    }

    fn held_for(&self, patient_id: &str) -> Addresses {
        let held = lock(&self.held);
        let mut out = Addresses::default();
        for (_, a) in held.get(patient_id.trim()).into_iter().flatten() {
            out.emails.extend(a.emails.iter().cloned());
            out.phones.extend(a.phones.iter().cloned());
        }
        out
    }

    /// Called by the store, under its writer lock: quick, no I/O.
    fn observe(&self, rec: &ConsentRecord, plain: &Plaintext) {
        let mut new = Vec::new();
        let version = i64::try_from(rec.version).unwrap_or(i64::MAX);
        for (i, t) in self.targets.iter().enumerate() {
            if !t.denies(rec) {
                continue;
            }
            // PostgreSQL: a change at or below the cursor was offered before (the
            // cheap test first: a start loads the whole table through here).
            if let Backend::Pg(p) = &self.backend {
                if version <= p.cursors.get(t.name()).copied().unwrap_or(0) {
                    continue;
                }
            }
            let key = self.key_of(i, &rec.patient_id);
            let stamp = t.stamp(rec);
            if let Backend::File(f) = &self.backend {
                if lock(&f.ledger).get(&key) == Some(&stamp) {
                    continue;
                }
            }
            let mut addrs = self.held_for(&rec.patient_id);
            // A snapshot's record names its addresses itself (SPEC §13: from any source).
            for e in &plain.emails {
                if !addrs.emails.contains(e) {
                    addrs.emails.push(e.clone());
                }
            }
            for ph in &plain.phones {
                if !addrs.phones.contains(ph) {
                    addrs.phones.push(ph.clone());
                }
            }
            new.push(Offer {
                target: i,
                key,
                stamp,
                patient_id: rec.patient_id.clone(),
                payloads: t.payloads(rec, &addrs),
                forget: false,
            });
        }
        self.push_offers(new);
    }

    fn push_offers(&self, new: Vec<Offer>) {
        if new.is_empty() {
            return;
        }
        let n = new.len() as u64;
        lock(&self.offers).extend(new);
        // Counted after the push: whoever reads `queued` then drains gets them all.
        self.queued.fetch_add(n, Ordering::SeqCst);
        self.intake_wake.notify_one();
    }

    fn seal(&self, p: &Payload) -> Result<serde_json::Value, String> {
        let plain = serde_json::to_vec(p).map_err(|e| e.to_string())?;
        let env = self.seal.seal_with(AAD, &plain)?;
        serde_json::from_slice(&env).map_err(|e| e.to_string())
    }

    fn open_sealed(&self, v: &serde_json::Value) -> Result<Payload, String> {
        let env = v.as_object().ok_or("sealed payload is not an envelope")?;
        let plain = self.seal.open_with(AAD, env)?;
        serde_json::from_slice(&plain).map_err(|_| "sealed payload does not parse".to_string())
    }

    fn audit(&self, rec: AuditRecord) {
        if self.audit.submit(vec![rec]).is_err() {
            tracing::error!("sync delivery could not be audited");
        }
    }

    fn no_address(&self, target: usize, patient: String) {
        let name = self.targets[target].name();
        self.metrics
            .sync_deliveries_total
            .with_label_values(&[name, "no_address"])
            .inc();
        self.audit(AuditRecord::sync(
            name,
            patient,
            "no_address",
            "no_plaintext_address",
        ));
        tracing::warn!(target = name,
            "a denial for a sync target came without an address or id the vendor accepts; not queued");
    }

    /// Entries of targets no longer configured leave the outbox (audited).
    fn drop_orphans(&self) {
        let Backend::File(f) = &self.backend else {
            return;
        };
        let mut ob = lock(&f.outbox);
        let orphans: Vec<(u64, String, String)> = ob
            .entries
            .values()
            .filter(|e| !self.targets.iter().any(|t| t.name() == e.target))
            .map(|e| (e.id, e.target.clone(), e.patient.clone()))
            .collect();
        for (id, target, patient) in orphans {
            if let Err(e) = ob.record_done(id) {
                tracing::error!(error = %e, "sync outbox");
            }
            self.audit(AuditRecord::sync(
                &target,
                patient,
                "dropped",
                "target_removed",
            ));
        }
    }

    /// Make offers durable, forever.
    async fn intake(self: Arc<Self>) {
        let mut conn: Option<pg::Conn> = None;
        // The cursor is written only when it moves (not on every idle round).
        let mut advanced = i64::MIN;
        loop {
            tokio::select! {
                _ = self.intake_wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            loop {
                let upto = self.queued.load(Ordering::SeqCst);
                let applied = self.applied.get().map(|f| f());
                let mut batch: Vec<Offer> = lock(&self.offers).drain(..).collect();
                if let Backend::Pg(_) = &self.backend {
                    batch = self.defer_addressless(batch);
                }
                let empty = batch.is_empty();
                let result = match &self.backend {
                    Backend::File(_) if empty => Ok(()),
                    Backend::File(_) => {
                        let me = self.clone();
                        tokio::task::spawn_blocking(move || me.intake_file(batch))
                            .await
                            .unwrap_or(Ok(()))
                    }
                    Backend::Pg(p) => self.intake_pg(p, &mut conn, batch).await,
                };
                match result {
                    Ok(()) => {
                        self.done.send_replace(upto);
                    }
                    Err(rest) => {
                        // Back in front, in order; tried again in a second.
                        let mut q = lock(&self.offers);
                        for o in rest.into_iter().rev() {
                            q.push_front(o);
                        }
                        break;
                    }
                }
                if empty {
                    let settled = lock(&self.deferred).is_empty();
                    if let (Backend::Pg(p), Some(v), true) = (&self.backend, applied, settled) {
                        if v > advanced && self.advance_cursor(p, &mut conn, v).await {
                            advanced = v;
                        }
                    }
                    break;
                }
            }
        }
    }

    /// PostgreSQL: hold back offers without an address for
    /// [`ADDRESSLESS_DELAY`]; return the rest with those now due.
    fn defer_addressless(&self, batch: Vec<Offer>) -> Vec<Offer> {
        let now = tokio::time::Instant::now();
        let mut deferred = lock(&self.deferred);
        let mut out = Vec::with_capacity(batch.len());
        for o in batch {
            if o.payloads.is_empty() && !o.forget {
                deferred.push_back((now + ADDRESSLESS_DELAY, o));
            } else {
                out.push(o);
            }
        }
        while deferred.front().is_some_and(|(t, _)| *t <= now) {
            if let Some((_, o)) = deferred.pop_front() {
                out.push(o);
            }
        }
        out
    }

    fn intake_file(&self, batch: Vec<Offer>) -> Result<(), Vec<Offer>> {
        let Backend::File(f) = &self.backend else {
            return Ok(());
        };
        let mut ob = lock(&f.outbox);
        let now = now_ms();
        let mut woken = vec![false; self.targets.len()];
        for o in batch {
            if o.forget {
                lock(&f.ledger).remove(&o.key);
                if let Err(e) = ob.ledger_forget(&o.key) {
                    tracing::error!(error = %e, "sync outbox");
                }
                continue;
            }
            {
                let mut ledger = lock(&f.ledger);
                if ledger.get(&o.key) == Some(&o.stamp) {
                    continue;
                }
                ledger.insert(o.key.clone(), o.stamp.clone());
            }
            if let Err(e) = ob.ledger_set(&o.key, &o.stamp) {
                tracing::error!(error = %e, "sync outbox");
            }
            let patient = self.pseudonyms.pseudonym(&o.patient_id);
            if o.payloads.is_empty() {
                self.no_address(o.target, patient);
                continue;
            }
            let name = self.targets[o.target].name();
            for p in &o.payloads {
                match self.seal(p) {
                    Ok(sealed) => {
                        if let Err(e) = ob.add(name, patient.clone(), now, sealed) {
                            tracing::error!(error = %e, "sync outbox entry not durable");
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "sync outbox entry not sealed"),
                }
            }
            woken[o.target] = true;
        }
        if let Err(e) = ob.sync() {
            tracing::error!(error = %e, "sync outbox");
        }
        drop(ob);
        for (i, w) in woken.into_iter().enumerate() {
            if w {
                self.work_wake[i].notify_one();
            }
        }
        Ok(())
    }

    async fn pg_conn<'a>(
        &self,
        p: &PgBackend,
        conn: &'a mut Option<pg::Conn>,
    ) -> Result<&'a mut pg::Conn, String> {
        if conn.as_ref().is_none_or(pg::Conn::is_closed) {
            *conn = Some(pg::connect(&p.cfg).await?);
        }
        conn.as_mut().ok_or_else(|| "no connection".to_string())
    }

    async fn intake_pg(
        &self,
        p: &PgBackend,
        conn: &mut Option<pg::Conn>,
        batch: Vec<Offer>,
    ) -> Result<(), Vec<Offer>> {
        for (n, o) in batch.iter().enumerate() {
            if o.forget {
                continue;
            }
            let patient = self.pseudonyms.pseudonym(&o.patient_id);
            let rows: Vec<pg::NewRow> = o
                .payloads
                .iter()
                .filter_map(|pl| match self.seal(pl) {
                    Ok(sealed) => Some(pg::NewRow {
                        patient: patient.clone(),
                        sealed,
                    }),
                    Err(e) => {
                        tracing::error!(error = %e, "sync outbox entry not sealed");
                        None
                    }
                })
                .collect();
            let name = self.targets[o.target].name();
            let result = match self.pg_conn(p, conn).await {
                Ok(c) => pg::offer(c, name, &o.key, &o.stamp, &rows).await,
                Err(e) => Err(e),
            };
            match result {
                Ok(true) if rows.is_empty() => self.no_address(o.target, patient),
                Ok(true) => self.work_wake[o.target].notify_one(),
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "sync outbox (postgres) unavailable; offers kept in memory");
                    *conn = None;
                    return Err(batch[n..].to_vec());
                }
            }
        }
        Ok(())
    }

    /// `true` once written.
    async fn advance_cursor(
        &self,
        p: &PgBackend,
        conn: &mut Option<pg::Conn>,
        version: i64,
    ) -> bool {
        let names: Vec<String> = self.targets.iter().map(|t| t.name().to_string()).collect();
        let result = match self.pg_conn(p, conn).await {
            Ok(c) => pg::advance(c, &names, version).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!(error = %e, "sync cursor not advanced");
                *conn = None;
                false
            }
        }
    }

    /// Deliver target `i`'s entries, forever.
    async fn worker(self: Arc<Self>, i: usize) {
        let mut rate = RateLimit::new(self.targets[i].cfg.rate);
        let mut conn: Option<pg::Conn> = None;
        loop {
            let wait = match &self.backend {
                Backend::File(_) => self.step_file(i, &mut rate).await,
                Backend::Pg(p) => self.step_pg(p, i, &mut rate, &mut conn).await,
            };
            if let Some(d) = wait {
                tokio::select! {
                    _ = self.work_wake[i].notified() => {}
                    _ = tokio::time::sleep(d) => {}
                }
            }
        }
    }

    /// One file-outbox step: `None` when something was attempted (go on at
    /// once), else how long to wait.
    async fn step_file(self: &Arc<Self>, i: usize, rate: &mut RateLimit) -> Option<Duration> {
        let Backend::File(f) = &self.backend else {
            return Some(Duration::from_secs(60));
        };
        let name = self.targets[i].name();
        let next = lock(&f.outbox)
            .entries
            .values()
            .filter(|e| e.target == name)
            .min_by_key(|e| (e.next, e.id))
            .cloned();
        let Some(e) = next else {
            return Some(Duration::from_secs(5));
        };
        let now = now_ms();
        if e.next > now {
            return Some(Duration::from_millis((e.next - now).min(5_000) as u64));
        }
        rate.acquire().await;
        let update = self
            .attempt(
                i, &e.patient, &e.sealed, e.created, e.attempts, e.parked, e.id,
            )
            .await;
        let me = self.clone();
        let _ = tokio::task::spawn_blocking(move || {
            let Backend::File(f) = &me.backend else {
                return;
            };
            let mut ob = lock(&f.outbox);
            let r = match update {
                None => ob.record_done(e.id),
                Some(u) => ob.record_try(
                    e.id,
                    u.attempts,
                    now_ms() + u.delay.as_millis() as i64,
                    u.parked,
                    u.error,
                ),
            };
            if let Err(err) = r {
                tracing::error!(error = %err, "sync outbox");
            }
        })
        .await;
        None
    }

    async fn step_pg(
        self: &Arc<Self>,
        p: &PgBackend,
        i: usize,
        rate: &mut RateLimit,
        conn: &mut Option<pg::Conn>,
    ) -> Option<Duration> {
        let c = match self.pg_conn(p, conn).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "sync outbox (postgres) unavailable");
                return Some(Duration::from_secs(2));
            }
        };
        let name = self.targets[i].name().to_string();
        rate.acquire().await;
        let me = self.clone();
        let r = pg::take_one(c, &name, |t| async move {
            me.attempt(
                i,
                &t.patient,
                &t.sealed,
                t.created_ms,
                t.attempts,
                t.parked,
                t.id as u64,
            )
            .await
        })
        .await;
        match r {
            Ok(true) => None,
            Ok(false) => Some(Duration::from_secs(1)),
            Err(e) => {
                tracing::warn!(error = %e, "sync outbox (postgres) step failed");
                *conn = None;
                Some(Duration::from_secs(2))
            }
        }
    }

    /// One attempt at an entry; `None` when it is finished, else what to record.
    #[allow(clippy::too_many_arguments)]
    async fn attempt(
        &self,
        i: usize,
        patient: &str,
        sealed: &serde_json::Value,
        created_ms: i64,
        attempts: u32,
        was_parked: bool,
        entry: u64,
    ) -> Option<pg::Update> {
        let t = &self.targets[i];
        let outcome = match self.open_sealed(sealed) {
            Err(e) => Outcome::Rejected {
                status: 0,
                reason: format!("unsealable: {e}"),
            },
            Ok(p) => {
                let still = self.store.get(&p.patient_id).is_some_and(|r| t.denies(&r));
                if !still {
                    Outcome::Superseded
                } else {
                    match self.upstream.get() {
                        Some(up) => deliver::attempt(&up(), t, &p).await,
                        None => Outcome::Retry {
                            status: None,
                            reason: "not_started".into(),
                            retry_after: None,
                        },
                    }
                }
            }
        };
        let attempts = attempts.saturating_add(1);
        let result = outcome.result();
        self.metrics
            .sync_deliveries_total
            .with_label_values(&[t.name(), result])
            .inc();
        let mut rec = AuditRecord::sync(t.name(), patient.to_string(), result, &outcome.reason());
        rec.status = outcome.status();
        rec.detail = Some(serde_json::json!({"entry": entry, "attempt": attempts}));
        self.audit(rec);
        if outcome.finished() {
            tracing::info!(target = t.name(), result, attempts, "sync entry finished");
            return None;
        }
        let retry_after = match &outcome {
            Outcome::Retry { retry_after, .. } => *retry_after,
            _ => None,
        };
        let age = Duration::from_millis(now_ms().saturating_sub(created_ms).max(0) as u64);
        let parked = age > self.cfg.max_age;
        if parked && !was_parked {
            self.metrics
                .sync_deliveries_total
                .with_label_values(&[t.name(), "parked"])
                .inc();
            let mut rec = AuditRecord::sync(t.name(), patient.to_string(), "parked", "max_age");
            rec.detail = Some(serde_json::json!({"entry": entry, "attempt": attempts}));
            self.audit(rec);
            tracing::error!(
                target = t.name(),
                attempts,
                "sync entry parked: older than sync.max_age; retried every sync.parked_retry"
            );
        }
        let delay = if parked {
            self.cfg.parked_retry.max(retry_after.unwrap_or_default())
        } else {
            deliver::backoff(
                attempts,
                self.cfg.retry_initial,
                self.cfg.retry_max,
                retry_after,
            )
        };
        tracing::info!(target = t.name(), result, attempts, delay_ms = delay.as_millis() as u64,
            reason = %outcome.reason(), "sync attempt not delivered; retrying");
        Some(pg::Update {
            attempts,
            delay,
            parked,
            error: Some(outcome.reason()),
        })
    }

    fn set_gauges(&self, rows: &[(String, i64, i64, f64)]) {
        let m = &self.metrics;
        for t in &self.targets {
            let (pending, parked, lag) = rows
                .iter()
                .find(|r| r.0 == t.name())
                .map_or((0, 0, 0.0), |r| (r.1, r.2, r.3));
            m.sync_pending.with_label_values(&[t.name()]).set(pending);
            m.sync_parked.with_label_values(&[t.name()]).set(parked);
            m.sync_lag_seconds.with_label_values(&[t.name()]).set(lag);
        }
    }

    fn refresh_gauges_file(&self) {
        let Backend::File(f) = &self.backend else {
            self.set_gauges(&[]);
            return;
        };
        let now = now_ms();
        let mut rows: Vec<(String, i64, i64, f64)> = Vec::new();
        for e in lock(&f.outbox).entries.values() {
            let age = (now - e.created).max(0) as f64 / 1000.0;
            match rows.iter_mut().find(|r| r.0 == e.target) {
                Some(r) => {
                    r.1 += 1;
                    r.2 += i64::from(e.parked);
                    r.3 = r.3.max(age);
                }
                None => rows.push((e.target.clone(), 1, i64::from(e.parked), age)),
            }
        }
        self.set_gauges(&rows);
    }

    async fn gauges(self: Arc<Self>) {
        let mut conn: Option<pg::Conn> = None;
        loop {
            match &self.backend {
                Backend::File(_) => self.refresh_gauges_file(),
                Backend::Pg(p) => {
                    let r = match self.pg_conn(p, &mut conn).await {
                        Ok(c) => pg::summary(c).await,
                        Err(e) => Err(e),
                    };
                    match r {
                        Ok(s) => self.set_gauges(
                            &s.into_iter()
                                .map(|s| (s.target, s.pending, s.parked, s.oldest_age))
                                .collect::<Vec<_>>(),
                        ),
                        Err(_) => conn = None,
                    }
                }
            }
            let every = match self.backend {
                Backend::File(_) => Duration::from_secs(1),
                Backend::Pg(_) => Duration::from_secs(5),
            };
            tokio::time::sleep(every).await;
        }
    }
}

/// `consentgate sync status`: per target, what waits in the outbox. Reads the
/// file outbox without locking it (a running proxy owns it) or queries the table.
pub(crate) async fn status(cfg: &Config) -> Result<serde_json::Value, String> {
    let mut targets = Vec::new();
    let backend = match cfg.consent.source {
        SourceKind::File => {
            let (r, _) = outbox::replay(&cfg.sync.outbox.join(outbox::LOG_FILE))?;
            let now = now_ms();
            let mut by: std::collections::BTreeMap<String, serde_json::Value> = Default::default();
            for t in &cfg.sync.targets {
                by.insert(t.name.clone(), summary_json(&t.name, 0, 0, 0.0, 0.0, None));
            }
            let mut seen: HashMap<String, (i64, i64, f64, f64, Option<String>)> = HashMap::new();
            for e in r.entries.values() {
                let age = (now - e.created).max(0) as f64 / 1000.0;
                let next_in = (e.next - now).max(0) as f64 / 1000.0;
                let s = seen
                    .entry(e.target.clone())
                    .or_insert((0, 0, 0.0, f64::MAX, None));
                s.0 += 1;
                s.1 += i64::from(e.parked);
                if age >= s.2 {
                    s.2 = age;
                    s.4.clone_from(&e.error);
                }
                s.3 = s.3.min(next_in);
            }
            for (t, s) in seen {
                by.insert(t.clone(), summary_json(&t, s.0, s.1, s.2, s.3, s.4));
            }
            targets.extend(by.into_values());
            "file"
        }
        SourceKind::Postgres => {
            let c = pg::connect(&PgSourceConfig::new(&cfg.consent.postgres)).await?;
            let mut by: std::collections::BTreeMap<String, serde_json::Value> = Default::default();
            for t in &cfg.sync.targets {
                by.insert(t.name.clone(), summary_json(&t.name, 0, 0, 0.0, 0.0, None));
            }
            for s in pg::summary(&c).await? {
                by.insert(
                    s.target.clone(),
                    summary_json(
                        &s.target,
                        s.pending,
                        s.parked,
                        s.oldest_age,
                        s.next_in,
                        s.last_error,
                    ),
                );
            }
            targets.extend(by.into_values());
            "postgres"
        }
        SourceKind::Nats => "none",
    };
    let pending: i64 = targets
        .iter()
        .filter_map(|t| t.get("pending").and_then(serde_json::Value::as_i64))
        .sum();
    Ok(serde_json::json!({"outbox": backend, "pending": pending, "targets": targets}))
}

fn summary_json(
    target: &str,
    pending: i64,
    parked: i64,
    oldest_age: f64,
    next_in: f64,
    last_error: Option<String>,
) -> serde_json::Value {
    serde_json::json!({
        "target": target,
        "pending": pending,
        "parked": parked,
        "oldest_age_seconds": (oldest_age * 1000.0).round() / 1000.0,
        "next_attempt_in_seconds": if pending == 0 { 0.0 } else { (next_in * 1000.0).round() / 1000.0 },
        "last_error": last_error,
    })
}
