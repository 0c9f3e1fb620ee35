//! The hash chain and the on-disk line format (plaintext or encrypted envelope).

use super::crypto::EncKey;
use super::AuditRecord;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use std::borrow::Cow;

/// `prev_hash` of the first record ever.
pub(super) const ZERO_HASH: &str =
    "0000000000000000000000000000000000000000000000000000000000000000";

/// Lowercase hex SHA-256 of `bytes`.
pub(super) fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The plaintext line of `rec` chained to `prev_hash` (no newline).
#[cfg(test)]
pub(crate) fn record_line(rec: &AuditRecord, prev_hash: &str) -> Result<Vec<u8>, String> {
    let mut line = Vec::new();
    write_record_line(rec, prev_hash, &mut line)?;
    Ok(line)
}

/// [`record_line`] into `line` (cleared first), reusing its allocation.
pub(crate) fn write_record_line(
    rec: &AuditRecord,
    prev_hash: &str,
    line: &mut Vec<u8>,
) -> Result<(), String> {
    line.clear();
    serde_json::to_writer(&mut *line, rec).map_err(|e| format!("serialise audit record: {e}"))?;
    // A struct always serialises to a non-empty object: splice prev_hash in last.
    if line.last() != Some(&b'}') || line.len() < 2 {
        return Err("serialise audit record: not a JSON object".into());
    }
    line.pop();
    line.extend_from_slice(b",\"prev_hash\":\"");
    line.extend_from_slice(prev_hash.as_bytes());
    line.extend_from_slice(b"\"}");
    Ok(())
}

/// Lowercase hex SHA-256 of `bytes` into `out` (cleared first).
pub(crate) fn sha256_hex_into(bytes: &[u8], out: &mut String) {
    let mut buf = [0u8; 64];
    out.clear();
    // 32 bytes always fit 64 hex digits, and hex digits are ASCII.
    if hex::encode_to_slice(Sha256::digest(bytes), &mut buf).is_ok() {
        out.push_str(std::str::from_utf8(&buf).unwrap_or_default());
    }
}

/// The bytes that go into the file for a plaintext line (no newline).
pub(crate) fn file_line(plain: Vec<u8>, key: Option<&EncKey>) -> Result<Vec<u8>, String> {
    match key {
        None => Ok(plain),
        Some(k) => k.seal(&plain),
    }
}

/// Why a file line could not be read as a record.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum DecodeError {
    Unparseable(String),
    /// An encrypted line and no key, a wrong key, or a tampered ciphertext.
    Decrypt(String),
}

/// A file line read back: the plaintext line (what the chain hashes) and the record.
pub(crate) struct Decoded<'a> {
    pub plain: Cow<'a, [u8]>,
    pub record: Map<String, Value>,
    pub encrypted: bool,
}

impl Decoded<'_> {
    pub(super) fn prev_hash(&self) -> &str {
        self.record
            .get("prev_hash")
            .and_then(Value::as_str)
            .unwrap_or("")
    }
}

fn is_envelope(m: &Map<String, Value>) -> bool {
    m.contains_key("v")
        && m.contains_key("nonce")
        && m.contains_key("ct")
        && !m.contains_key("kind")
}

fn parse_record(bytes: &[u8]) -> Result<Map<String, Value>, DecodeError> {
    let m = match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(m)) => m,
        Ok(_) => return Err(DecodeError::Unparseable("not a JSON object".into())),
        Err(e) => return Err(DecodeError::Unparseable(format!("invalid JSON: {e}"))),
    };
    Ok(m)
}

fn check_record(m: &Map<String, Value>) -> Result<(), DecodeError> {
    match m.get("prev_hash").and_then(Value::as_str) {
        Some(h) if h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) => {
            Ok(())
        }
        Some(_) => Err(DecodeError::Unparseable(
            "prev_hash is not 64 lowercase hex characters".into(),
        )),
        None => Err(DecodeError::Unparseable("no prev_hash".into())),
    }
}

/// Read one file line (without its newline).
pub(crate) fn decode_line<'a>(
    line: &'a [u8],
    key: Option<&EncKey>,
) -> Result<Decoded<'a>, DecodeError> {
    let m = parse_record(line)?;
    if !is_envelope(&m) {
        check_record(&m)?;
        return Ok(Decoded {
            plain: Cow::Borrowed(line),
            record: m,
            encrypted: false,
        });
    }
    let Some(key) = key else {
        return Err(DecodeError::Decrypt(
            "the record is encrypted and no encryption key was given".into(),
        ));
    };
    let plain = key.open(&m).map_err(DecodeError::Decrypt)?;
    let record = parse_record(&plain).map_err(|e| match e {
        DecodeError::Unparseable(d) => DecodeError::Unparseable(format!("decrypted record: {d}")),
        other => other,
    })?;
    if is_envelope(&record) {
        return Err(DecodeError::Unparseable(
            "decrypted record is an envelope".into(),
        ));
    }
    check_record(&record)?;
    Ok(Decoded {
        plain: Cow::Owned(plain),
        record,
        encrypted: true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_line_ends_with_prev_hash_and_hashes_stably() {
        let rec = AuditRecord::config("load", "success");
        let line = record_line(&rec, ZERO_HASH).unwrap();
        let s = String::from_utf8(line.clone()).unwrap();
        assert!(s.starts_with("{\"ts\":\""), "{s}");
        assert!(
            s.ends_with(&format!(",\"prev_hash\":\"{ZERO_HASH}\"}}")),
            "{s}"
        );
        let d = decode_line(&line, None).unwrap();
        assert_eq!(d.prev_hash(), ZERO_HASH);
        assert_eq!(d.record["kind"], "config");
        assert_eq!(d.record["fields_stripped"], serde_json::json!([]));
        assert_eq!(sha256_hex(&d.plain), sha256_hex(&line));
        assert_eq!(sha256_hex(b"").len(), 64);
        let mut h = String::from("junk");
        sha256_hex_into(&line, &mut h);
        assert_eq!(h, sha256_hex(&line));
    }

    #[test]
    fn decode_rejects_non_records() {
        assert!(matches!(
            decode_line(b"{\"a\":1}", None),
            Err(DecodeError::Unparseable(_))
        ));
        assert!(matches!(
            decode_line(b"[1]", None),
            Err(DecodeError::Unparseable(_))
        ));
        assert!(matches!(
            decode_line(b"{\"prev_hash\":\"AB\"}", None),
            Err(DecodeError::Unparseable(_))
        ));
        assert!(matches!(
            decode_line(b"{\"v\":1,\"nonce\":\"00\",\"ct\":\"00\"}", None),
            Err(DecodeError::Decrypt(_))
        ));
    }
}
