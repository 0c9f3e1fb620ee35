//! The in-memory consent cache: every record indexed by every identity it has.
//! Lookups take the identifiers of one event and return every matching record.
//!
//! Layout (memory per patient matters at millions of patients):
//! - `records`: patient key (32 bytes) → `Arc<ConsentRecord>`;
//! - `index`: external-id / email-hash / phone-hash key (32 bytes) → the record
//!   itself (one `Arc`, no second map probe, no copy of the patient id);
//! - records hold digests as 32 raw bytes, and `jurisdiction` / `source` are
//!   interned so a million records share a handful of strings.
//!
//! Writers are serialised by a mutex so concurrent writes to one patient can
//! never leave the index pointing at a superseded record; readers never take it.

use super::record::ConsentRecord;
use crate::identify::{IdKey, Identifiers};
use dashmap::DashMap;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Index key: a 32-byte digest, domain-separated per identity kind, so every
/// kind shares one compact map.
type Key = [u8; 32];

fn key_for(id: &IdKey) -> Key {
    match id {
        IdKey::Patient(p) => tagged(b'p', p.as_bytes()),
        IdKey::External(e) => tagged(b'x', e.as_bytes()),
        IdKey::EmailHash(h) => hash_key(b'e', h),
        IdKey::PhoneHash(h) => hash_key(b'm', h),
    }
}

fn patient_key(patient_id: &str) -> Key {
    tagged(b'p', patient_id.trim().as_bytes())
}

/// An email or phone SHA-256 is already a uniform 32-byte key: no second hash,
/// just a per-kind tag folded into the first byte (a bijection per kind, so
/// distinct hashes stay distinct, and the same hash as email and as phone
/// gives two keys).
fn hash_key(tag: u8, h: &[u8; 32]) -> Key {
    let mut k = *h;
    k[0] ^= tag;
    k
}

fn tagged(tag: u8, data: &[u8]) -> Key {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update([tag]);
    h.update(data);
    h.finalize().into()
}

/// Every secondary (non patient-id) key of a record, sorted and deduplicated.
fn record_keys(r: &ConsentRecord) -> Vec<Key> {
    let ids = &r.identifiers;
    let mut keys = Vec::with_capacity(
        ids.external_ids.len() + ids.email_sha256.len() + ids.phone_sha256.len(),
    );
    for x in &ids.external_ids {
        keys.push(tagged(b'x', x.trim().as_bytes()));
    }
    for h in &ids.email_sha256 {
        keys.push(hash_key(b'e', &h.0));
    }
    for h in &ids.phone_sha256 {
        keys.push(hash_key(b'm', &h.0));
    }
    keys.sort_unstable();
    keys.dedup();
    keys
}

/// The records one secondary key names; almost always exactly one.
enum Hits {
    One(Arc<ConsentRecord>),
    // Boxed on purpose: keeps `Hits` at 16 bytes for the common single hit.
    #[allow(clippy::box_collection)]
    Many(Box<Vec<Arc<ConsentRecord>>>),
}

impl Hits {
    fn as_slice(&self) -> &[Arc<ConsentRecord>] {
        match self {
            Hits::One(r) => std::slice::from_ref(r),
            Hits::Many(v) => v.as_slice(),
        }
    }

    /// Insert or replace the entry for `rec.patient_id`.
    fn set(&mut self, rec: &Arc<ConsentRecord>) {
        match self {
            Hits::One(r) if r.patient_id == rec.patient_id => *r = rec.clone(),
            Hits::One(r) => *self = Hits::Many(Box::new(vec![r.clone(), rec.clone()])),
            Hits::Many(v) => match v.iter_mut().find(|r| r.patient_id == rec.patient_id) {
                Some(r) => *r = rec.clone(),
                None => v.push(rec.clone()),
            },
        }
    }

    /// Remove the entry for `patient_id`; `true` when nothing is left.
    fn remove(&mut self, patient_id: &str) -> bool {
        match self {
            Hits::One(r) => r.patient_id == patient_id,
            Hits::Many(v) => {
                v.retain(|r| r.patient_id != patient_id);
                if v.len() == 1 {
                    let only = v[0].clone();
                    *self = Hits::One(only);
                }
                v_is_empty(self)
            }
        }
    }
}

fn v_is_empty(h: &Hits) -> bool {
    matches!(h, Hits::Many(v) if v.is_empty())
}

/// Outcome of an upsert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upsert {
    Applied,
    /// The store already held a newer (or equally new, more restrictive) record.
    Superseded,
}

#[derive(Default)]
pub struct ConsentStore {
    records: DashMap<Key, Arc<ConsentRecord>>,
    index: DashMap<Key, Hits>,
    /// Interned `jurisdiction` / `source` strings.
    interned: Mutex<HashSet<Arc<str>>>,
    /// Serialises writers (readers never take it).
    write: Mutex<()>,
    /// Unix ms of the last moment the source was known good.
    last_good_ms: AtomicU64,
    source_up: AtomicBool,
}

impl ConsentStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of records held (the `consentgate_consent_records` gauge).
    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    pub fn get(&self, patient_id: &str) -> Option<Arc<ConsentRecord>> {
        self.records
            .get(&patient_key(patient_id))
            .map(|r| r.value().clone())
    }

    /// Insert or replace by last-write-wins. Plaintext identifiers are hashed first.
    pub fn upsert(&self, rec: ConsentRecord) -> Upsert {
        let rec = self.prepare(rec);
        let _w = lock(&self.write);
        if let Some(cur) = self.records.get(&patient_key(&rec.patient_id)) {
            if !rec.supersedes(cur.value()) {
                return Upsert::Superseded;
            }
        }
        self.put_locked(rec);
        Upsert::Applied
    }

    /// Insert or replace unconditionally (the source of truth said so).
    pub fn put(&self, rec: ConsentRecord) {
        let rec = self.prepare(rec);
        let _w = lock(&self.write);
        self.put_locked(rec);
    }

    /// Like `put`, returning the record as stored.
    pub fn put_arc(&self, rec: ConsentRecord) -> Arc<ConsentRecord> {
        let rec = self.prepare(rec);
        let _w = lock(&self.write);
        self.put_locked(rec)
    }

    /// Put unless the store already holds exactly this record (snapshot
    /// reloads touch only what changed). `true` when something changed.
    pub fn put_if_changed(&self, rec: ConsentRecord) -> bool {
        let rec = self.prepare(rec);
        let _w = lock(&self.write);
        if let Some(cur) = self.records.get(&patient_key(&rec.patient_id)) {
            if **cur.value() == rec {
                return false;
            }
        }
        self.put_locked(rec);
        true
    }

    fn prepare(&self, rec: ConsentRecord) -> ConsentRecord {
        let mut rec = rec.into_stored();
        rec.patient_id = rec.patient_id.trim().to_string();
        rec.jurisdiction = rec.jurisdiction.map(|s| self.intern(s));
        rec.source = rec.source.map(|s| self.intern(s));
        rec
    }

    fn intern(&self, s: Arc<str>) -> Arc<str> {
        let mut set = lock(&self.interned);
        if let Some(have) = set.get(&s) {
            return have.clone();
        }
        // Bounded: free-form values beyond this are simply not shared.
        if set.len() < 4096 {
            set.insert(s.clone());
        }
        s
    }

    fn put_locked(&self, rec: ConsentRecord) -> Arc<ConsentRecord> {
        let pk = patient_key(&rec.patient_id);
        let new_keys = record_keys(&rec);
        let rec = Arc::new(rec);
        if let Some(old) = self.records.insert(pk, rec.clone()) {
            for k in record_keys(&old)
                .iter()
                .filter(|k| new_keys.binary_search(k).is_err())
            {
                self.unindex(k, &old.patient_id);
            }
        }
        for k in new_keys {
            match self.index.entry(k) {
                dashmap::Entry::Occupied(mut e) => e.get_mut().set(&rec),
                dashmap::Entry::Vacant(e) => {
                    e.insert(Hits::One(rec.clone()));
                }
            }
        }
        rec
    }

    /// Remove a record and every index entry pointing at it.
    pub fn delete(&self, patient_id: &str) -> Option<Arc<ConsentRecord>> {
        let _w = lock(&self.write);
        let (_, old) = self.records.remove(&patient_key(patient_id))?;
        for k in record_keys(&old) {
            self.unindex(&k, &old.patient_id);
        }
        Some(old)
    }

    fn unindex(&self, k: &Key, patient_id: &str) {
        self.index
            .remove_if_mut(k, |_, hits| hits.remove(patient_id));
    }

    /// Every record matching any of the identifiers (deduplicated).
    pub fn lookup(&self, ids: &Identifiers) -> Vec<Arc<ConsentRecord>> {
        let mut out: Vec<Arc<ConsentRecord>> = Vec::new();
        let push = |r: &Arc<ConsentRecord>, out: &mut Vec<Arc<ConsentRecord>>| {
            if !out
                .iter()
                .any(|o| Arc::ptr_eq(o, r) || o.patient_id == r.patient_id)
            {
                out.push(r.clone());
            }
        };
        for id in &ids.keys {
            if let IdKey::Patient(p) = id {
                if let Some(r) = self.records.get(&patient_key(p)) {
                    push(r.value(), &mut out);
                }
                continue;
            }
            if let Some(hits) = self.index.get(&key_for(id)) {
                for r in hits.as_slice() {
                    push(r, &mut out);
                }
            }
        }
        out
    }

    /// Every patient id currently held (for snapshot reconciliation).
    pub fn patient_ids(&self) -> Vec<Arc<str>> {
        self.records
            .iter()
            .map(|e| Arc::from(e.value().patient_id.as_str()))
            .collect()
    }

    /// Number of secondary index keys (external ids and hashes).
    pub fn index_len(&self) -> usize {
        self.index.len()
    }

    /// The source reports itself healthy and current as of now.
    pub fn mark_good(&self) {
        self.last_good_ms.store(now_ms(), Ordering::Relaxed);
        self.source_up.store(true, Ordering::Relaxed);
    }

    pub fn mark_down(&self) {
        self.source_up.store(false, Ordering::Relaxed);
    }

    pub fn source_up(&self) -> bool {
        self.source_up.load(Ordering::Relaxed)
    }

    /// Time since the source was last known good; `None` if it never was.
    pub fn staleness(&self) -> Option<Duration> {
        let t = self.last_good_ms.load(Ordering::Relaxed);
        if t == 0 {
            return None;
        }
        Some(Duration::from_millis(now_ms().saturating_sub(t)))
    }

    /// Whether the consent data is older than `max` (or was never loaded).
    pub fn is_stale(&self, max: Duration) -> bool {
        self.staleness().is_none_or(|s| s > max)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identify;

    fn rec(json: &str) -> ConsentRecord {
        ConsentRecord::from_json(json.as_bytes()).unwrap()
    }

    #[test]
    fn lookup_by_every_identity_and_delete() {
        let s = ConsentStore::new();
        s.upsert(rec(r#"{"patient_id":"P-1","identifiers":{"emails":["J.Doe@gmail.com"],"phones":["+1 415 555 0100"],"external_ids":["crm:1"]},"updated_at":"2026-11-20T10:00:00Z"}"#));
        for add in [
            |i: &mut Identifiers| i.add_patient("P-1"),
            |i: &mut Identifiers| i.add_external("crm:1"),
            |i: &mut Identifiers| i.add_email("j.doe@gmail.com"),
            |i: &mut Identifiers| i.add_email(&identify::sha256_hex(b"jdoe@gmail.com")),
            |i: &mut Identifiers| i.add_phone("14155550100"),
            |i: &mut Identifiers| i.add_phone(&identify::sha256_hex(b"+14155550100")),
        ] {
            let mut ids = Identifiers::new();
            add(&mut ids);
            assert_eq!(s.lookup(&ids).len(), 1, "{ids:?}");
        }
        s.delete("P-1");
        let mut ids = Identifiers::new();
        ids.add_external("crm:1");
        assert!(s.lookup(&ids).is_empty());
        assert!(s.index.is_empty());
    }

    #[test]
    fn shared_identifiers_and_reindex_on_update() {
        let s = ConsentStore::new();
        s.put(rec(r#"{"patient_id":"A","identifiers":{"emails":["family@example.com"],"external_ids":["x:1"]},"updated_at":"2026-11-20T10:00:00Z"}"#));
        s.put(rec(r#"{"patient_id":"B","identifiers":{"emails":["family@example.com"]},"updated_at":"2026-11-20T10:00:00Z"}"#));
        let mut fam = Identifiers::new();
        fam.add_email("family@example.com");
        assert_eq!(s.lookup(&fam).len(), 2);
        // A drops the shared email and its external id changes.
        s.put(rec(r#"{"patient_id":"A","identifiers":{"external_ids":["x:2"]},"updated_at":"2026-11-21T10:00:00Z"}"#));
        let hits = s.lookup(&fam);
        assert_eq!(hits.len(), 1);
        assert_eq!(hits[0].patient_id, "B");
        let mut old = Identifiers::new();
        old.add_external("x:1");
        assert!(s.lookup(&old).is_empty());
        let mut new = Identifiers::new();
        new.add_external("x:2");
        new.add_patient("B");
        assert_eq!(s.lookup(&new).len(), 2);
        // The index points at the current record, not a superseded one.
        s.put(rec(r#"{"patient_id":"B","gpc":true,"identifiers":{"emails":["family@example.com"]},"updated_at":"2026-11-22T10:00:00Z"}"#));
        assert!(s.lookup(&fam)[0].gpc);
        s.delete("B");
        assert!(s.lookup(&fam).is_empty());
        assert_eq!(s.index_len(), 1);
        assert_eq!(s.len(), 1);
        assert!(!s.put_if_changed(rec(r#"{"patient_id":"A","identifiers":{"external_ids":["x:2"]},"updated_at":"2026-11-21T10:00:00Z"}"#)));
    }

    #[test]
    fn older_write_loses() {
        let s = ConsentStore::new();
        s.upsert(rec(
            r#"{"patient_id":"P-1","gpc":true,"updated_at":"2026-11-20T10:00:00Z"}"#,
        ));
        let r = s.upsert(rec(
            r#"{"patient_id":"P-1","updated_at":"2026-11-19T10:00:00Z"}"#,
        ));
        assert_eq!(r, Upsert::Superseded);
        assert!(s.get("P-1").unwrap().gpc);
    }
}
