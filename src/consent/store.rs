//! The in-memory consent cache: every record indexed by every identity it has.
//! Lookups take the identifiers of one event and return every matching record.

use super::record::ConsentRecord;
use crate::identify::{self, IdKey, Identifiers};
use dashmap::DashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Index key: a 32-byte digest, domain-separated per identity kind, so every
/// kind shares one compact map.
type Key = [u8; 32];

fn key_for(id: &IdKey) -> Key {
    match id {
        IdKey::Patient(p) => tagged(b'p', p.as_bytes()),
        IdKey::External(e) => tagged(b'x', e.as_bytes()),
        IdKey::EmailHash(h) => tagged(b'e', h),
        IdKey::PhoneHash(h) => tagged(b'm', h),
    }
}

fn tagged(tag: u8, data: &[u8]) -> Key {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update([tag]);
    h.update(data);
    h.finalize().into()
}

fn record_keys(r: &ConsentRecord) -> Vec<Key> {
    let mut keys = vec![key_for(&IdKey::Patient(r.patient_id.as_str().into()))];
    for x in &r.identifiers.external_ids {
        keys.push(key_for(&IdKey::External(x.trim().into())));
    }
    for h in &r.identifiers.email_sha256 {
        if let Some(d) = identify::parse_sha256_hex(h) {
            keys.push(key_for(&IdKey::EmailHash(d)));
        }
    }
    for h in &r.identifiers.phone_sha256 {
        if let Some(d) = identify::parse_sha256_hex(h) {
            keys.push(key_for(&IdKey::PhoneHash(d)));
        }
    }
    keys.sort_unstable();
    keys.dedup();
    keys
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
    records: DashMap<Arc<str>, Arc<ConsentRecord>>,
    index: DashMap<Key, Vec<Arc<str>>>,
    /// Unix ms of the last moment the source was known good.
    last_good_ms: AtomicU64,
    source_up: AtomicBool,
}

impl ConsentStore {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    pub fn get(&self, patient_id: &str) -> Option<Arc<ConsentRecord>> {
        self.records.get(patient_id).map(|r| r.value().clone())
    }

    /// Insert or replace by last-write-wins. Plaintext identifiers are hashed first.
    pub fn upsert(&self, rec: ConsentRecord) -> Upsert {
        let rec = rec.into_stored();
        if let Some(cur) = self.records.get(rec.patient_id.as_str()) {
            if !rec.supersedes(cur.value()) {
                return Upsert::Superseded;
            }
        }
        self.put(rec);
        Upsert::Applied
    }

    /// Insert or replace unconditionally (the source of truth said so).
    pub fn put(&self, rec: ConsentRecord) {
        let rec = rec.into_stored();
        let id: Arc<str> = rec.patient_id.as_str().into();
        let new_keys = record_keys(&rec);
        if let Some(old) = self.records.insert(id.clone(), Arc::new(rec)) {
            let old_keys = record_keys(&old);
            for k in old_keys
                .iter()
                .filter(|k| new_keys.binary_search(k).is_err())
            {
                self.unindex(k, &id);
            }
        }
        for k in new_keys {
            let mut e = self.index.entry(k).or_default();
            if !e.iter().any(|p| **p == *id) {
                e.push(id.clone());
            }
        }
    }

    /// Remove a record and every index entry pointing at it.
    pub fn delete(&self, patient_id: &str) -> Option<Arc<ConsentRecord>> {
        let (id, old) = self.records.remove(patient_id)?;
        for k in record_keys(&old) {
            self.unindex(&k, &id);
        }
        Some(old)
    }

    fn unindex(&self, k: &Key, id: &str) {
        let empty = match self.index.get_mut(k) {
            Some(mut v) => {
                v.retain(|p| **p != *id);
                v.is_empty()
            }
            None => false,
        };
        if empty {
            self.index.remove_if(k, |_, v| v.is_empty());
        }
    }

    /// Every record matching any of the identifiers (deduplicated).
    pub fn lookup(&self, ids: &Identifiers) -> Vec<Arc<ConsentRecord>> {
        let mut out: Vec<Arc<ConsentRecord>> = Vec::new();
        for id in &ids.keys {
            if let Some(pids) = self.index.get(&key_for(id)) {
                for pid in pids.iter() {
                    if out.iter().any(|r| r.patient_id.as_str() == &**pid) {
                        continue;
                    }
                    if let Some(r) = self.records.get(&**pid) {
                        out.push(r.value().clone());
                    }
                }
            }
        }
        out
    }

    /// Every patient id currently held (for snapshot reconciliation).
    pub fn patient_ids(&self) -> Vec<Arc<str>> {
        self.records.iter().map(|e| e.key().clone()).collect()
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

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

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
