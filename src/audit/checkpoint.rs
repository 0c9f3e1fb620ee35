//! Checkpoint records: the keyed statement the writer puts into the chain before
//! it removes the oldest audit files (`audit.max_total_bytes`).
//!
//! The MAC is HMAC-SHA256 under [`CheckpointKey`], itself HMAC-SHA256 of the
//! pseudonym key with a label no patient id can equal (see
//! [`PseudonymKey::derive`]): the process already holds that key, `audit find`
//! already needs it, and someone who can only write files has neither. The MAC
//! covers the record's own `prev_hash` as well as what was removed, so a
//! checkpoint cannot be moved to another place in the chain, and the stretch of
//! chain between the anchor and the checkpoint cannot be rewritten without
//! forging it.

use super::pseudonym::PseudonymKey;
use hmac::{Hmac, Mac};
use serde_json::{json, Map, Value};
use sha2::Sha256;
use std::fmt;

/// Label of the checkpoint key derivation (0xFF: never valid UTF-8).
const KEY_LABEL: &[u8] = b"\xffconsentgate audit checkpoint key v1";
/// First element of the MAC'd message; a new format gets a new version.
const MESSAGE_VERSION: &str = "consentgate-audit-checkpoint-v1";

/// The key checkpoint MACs are made and checked with.
#[derive(Clone)]
pub(crate) struct CheckpointKey {
    mac: Hmac<Sha256>,
}

impl fmt::Debug for CheckpointKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CheckpointKey(..)")
    }
}

impl CheckpointKey {
    /// The checkpoint key of a pseudonym key (`audit.pseudonym_key_file`).
    pub(crate) fn from_pseudonym_key(key: &PseudonymKey) -> CheckpointKey {
        let derived = key.derive(KEY_LABEL);
        // HMAC takes a key of any length: this cannot fail for 32 bytes.
        let mac = <Hmac<Sha256> as Mac>::new_from_slice(&derived)
            .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
        CheckpointKey { mac }
    }

    fn tag(&self, facts: &CheckpointFacts, prev_hash: &str) -> Hmac<Sha256> {
        let mut m = self.mac.clone();
        m.update(&facts.message(prev_hash));
        m
    }

    /// The MAC (64 hex) of `facts` for a checkpoint chained to `prev_hash`.
    pub(crate) fn sign(&self, facts: &CheckpointFacts, prev_hash: &str) -> String {
        hex::encode(self.tag(facts, prev_hash).finalize().into_bytes())
    }

    /// Constant-time check of a MAC read back from a record.
    pub(crate) fn check(&self, facts: &CheckpointFacts, prev_hash: &str, mac_hex: &str) -> bool {
        match hex::decode(mac_hex) {
            Ok(mac) => self.tag(facts, prev_hash).verify_slice(&mac).is_ok(),
            Err(_) => false,
        }
    }
}

/// What a checkpoint states (everything the MAC covers besides `prev_hash`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct CheckpointFacts {
    /// The record's `ts`, exactly as written.
    pub ts: String,
    /// The `prev_hash` the first remaining record continues from (the SHA-256
    /// of the last removed line).
    pub anchor: String,
    /// Removed file names, oldest first.
    pub removed_files: Vec<String>,
    pub removed_records: u64,
    pub removed_bytes: u64,
    /// The oldest file kept (where the chain now starts).
    pub first_kept: String,
}

fn is_hash(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl CheckpointFacts {
    /// The MAC'd bytes: a JSON array (no maps, so the encoding is canonical).
    fn message(&self, prev_hash: &str) -> Vec<u8> {
        let v = json!([
            MESSAGE_VERSION,
            prev_hash,
            self.ts,
            self.anchor,
            self.removed_files,
            self.removed_records,
            self.removed_bytes,
            self.first_kept,
        ]);
        serde_json::to_vec(&v).unwrap_or_default()
    }

    /// The record's `detail` object.
    pub(crate) fn detail(&self, mac: &str) -> Value {
        json!({
            "removed_files": self.removed_files,
            "removed_records": self.removed_records,
            "removed_bytes": self.removed_bytes,
            "anchor": self.anchor,
            "first_kept": self.first_kept,
            "mac": mac,
        })
    }

    /// The facts and MAC of a checkpoint record read back, or why it is malformed.
    pub(crate) fn from_record(
        rec: &Map<String, Value>,
    ) -> Result<(CheckpointFacts, String), String> {
        let ts = rec
            .get("ts")
            .and_then(Value::as_str)
            .ok_or("checkpoint without ts")?;
        let d = rec
            .get("detail")
            .and_then(Value::as_object)
            .ok_or("checkpoint without detail")?;
        let text = |k: &str| -> Result<String, String> {
            d.get(k)
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| format!("checkpoint detail.{k} missing or not text"))
        };
        let number = |k: &str| -> Result<u64, String> {
            d.get(k)
                .and_then(Value::as_u64)
                .ok_or_else(|| format!("checkpoint detail.{k} missing or not a count"))
        };
        let anchor = text("anchor")?;
        let mac = text("mac")?;
        if !is_hash(&anchor) || !is_hash(&mac) {
            return Err("checkpoint anchor or mac is not 64 lowercase hex characters".into());
        }
        let removed_files = d
            .get("removed_files")
            .and_then(Value::as_array)
            .ok_or("checkpoint detail.removed_files missing")?
            .iter()
            .map(|f| f.as_str().map(str::to_string))
            .collect::<Option<Vec<String>>>()
            .ok_or("checkpoint detail.removed_files holds a non-text entry")?;
        Ok((
            CheckpointFacts {
                ts: ts.to_string(),
                anchor,
                removed_files,
                removed_records: number("removed_records")?,
                removed_bytes: number("removed_bytes")?,
                first_kept: text("first_kept")?,
            },
            mac,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> CheckpointFacts {
        CheckpointFacts {
            ts: "2026-11-20T10:00:00.000000Z".into(),
            anchor: "ab".repeat(32),
            removed_files: vec!["audit-20261120-000000.jsonl".into()],
            removed_records: 12,
            removed_bytes: 6000,
            first_kept: "audit-20261120-000001.jsonl".into(),
        }
    }

    #[test]
    fn sign_check_round_trip_through_a_record() {
        let k =
            CheckpointKey::from_pseudonym_key(&PseudonymKey::from_hex(&"42".repeat(32)).unwrap());
        let prev = "cd".repeat(32);
        let mac = k.sign(&facts(), &prev);
        let mut rec = Map::new();
        rec.insert("ts".into(), json!(facts().ts));
        rec.insert("detail".into(), facts().detail(&mac));
        let (back, back_mac) = CheckpointFacts::from_record(&rec).unwrap();
        assert_eq!(back, facts());
        assert!(k.check(&back, &prev, &back_mac));
        // Another place in the chain, another fact, another key: refused.
        assert!(!k.check(&back, &"ce".repeat(32), &back_mac));
        let mut more = back.clone();
        more.removed_records = 13;
        assert!(!k.check(&more, &prev, &back_mac));
        let other =
            CheckpointKey::from_pseudonym_key(&PseudonymKey::from_hex(&"43".repeat(32)).unwrap());
        assert!(!other.check(&back, &prev, &back_mac));
        assert!(!k.check(&back, &prev, "zz"));
    }

    #[test]
    fn the_derived_key_is_not_a_pseudonym_of_anything() {
        // The label is not UTF-8, so no patient id's pseudonym can equal a prefix
        // of the derived key.
        assert_eq!(KEY_LABEL[0], 0xff);
        let pk = PseudonymKey::from_hex(&"42".repeat(32)).unwrap();
        let lossy = String::from_utf8_lossy(KEY_LABEL);
        assert_ne!(
            hex::encode(pk.derive(KEY_LABEL))[..32],
            pk.pseudonym(&lossy)
        );
    }

    #[test]
    fn malformed_checkpoints_are_reported() {
        let mut rec = Map::new();
        rec.insert("ts".into(), json!("x"));
        assert!(CheckpointFacts::from_record(&rec).is_err());
        let mut d = facts().detail(&"00".repeat(32));
        d["anchor"] = json!("short");
        rec.insert("detail".into(), d);
        assert!(CheckpointFacts::from_record(&rec).is_err());
        let mut d = facts().detail(&"00".repeat(32));
        d["removed_files"] = json!([1]);
        rec.insert("detail".into(), d);
        assert!(CheckpointFacts::from_record(&rec).is_err());
    }
}
