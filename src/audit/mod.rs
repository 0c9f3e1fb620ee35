//! Audit log (SPEC §10): one JSON object a line, hash-chained, written off the
//! hot path.
//!
//! # Record format
//!
//! Each record is one line of JSON. The SPEC §10 fields are always present (null
//! or `[]` when they do not apply), in this order: `ts`, `request_id`, `kind`,
//! `destination`, `patient`, `category`, `decision`, `reason`, `rule`,
//! `fields_stripped`, `flags_set`, `actor`. Fields that only some records have are
//! omitted when they do not apply (never null), so every other record keeps its
//! shape: `trace_id` (right after `request_id`, only when the caller sent a valid
//! W3C `traceparent`), `status` and `error` (on `outcome` records), and `detail`
//! (counts and file names only). `prev_hash` comes last.
//!
//! * `kind` is `decision`, `consent_change`, `config`, `outcome` or `sync`, or one the
//!   writer writes itself: `recovery` and `checkpoint`.
//! * `outcome`: what the upstream did with a forwarded request, with the same
//!   `request_id` and `destination` as its `decision` record: `status` (the HTTP
//!   status the upstream answered) or `error` (`connect`, `tls`, `timeout`,
//!   `reset`, `protocol`: nothing or not all of it may have reached the vendor).
//! * `trace_id`: the 32-hex trace id of the caller's `traceparent` (version 00,
//!   validated strictly: see [`parse_traceparent`]), to join the audit with traces.
//! * `events` (on the `decision` record of an inspected request, omitted
//!   otherwise): one compact entry per event or recipient, in payload order:
//!   `patient` (pseudonym, absent for an unknown person), `decision`, `reason`,
//!   `rule`, `matches` (records matched), and `fields_stripped` / `flags_set` when
//!   not empty. The request record's `category` applies to each. A batch of 70,000
//!   events is one line of about 110 bytes an event, not 70,000 records of 500;
//!   `audit find` expands the entries back into one record per event.
//! * `patient` is a pseudonym ([`PseudonymKey::pseudonym`]): the first 32 lowercase
//!   hex characters (128 bits) of HMAC-SHA256(key, patient_id). Never the raw id;
//!   the writer refuses a record whose `patient` is not of that shape.
//! * `prev_hash` is the lowercase hex SHA-256 of the previous record's line (its
//!   bytes without the newline); the first record ever has 64 zeros. The chain
//!   runs on across files.
//!
//! # Files
//!
//! `audit.path` is a directory of `audit-YYYYMMDD-NNNNNN.jsonl` files: the UTC day
//! the file was opened and a sequence number that only grows, so that the order of
//! names is the order of the chain. A file is rotated when the next line would
//! take it past `max_file_bytes` (default 64 MiB) and when the UTC day changes.
//!
//! One process owns the directory: the writer takes an exclusive lock on
//! `audit.path/.lock` ([`crate::state::DirLock`]) before it reads or writes
//! anything, and a second process fails at start naming the holder (two writers
//! would fork the chain). The directory is 0700 and the files 0600; looser modes
//! found on start are tightened, with a log line.
//!
//! # Cap and checkpoints
//!
//! With `max_total_bytes` the oldest files are removed so that the audit files
//! never take more than the cap (see `writer.rs` for the arithmetic). Each removal
//! first writes a `checkpoint` record into the chain (fsync'd before any file
//! goes): `detail` names the files removed, how many records and bytes they held,
//! the `anchor` (the `prev_hash` the first remaining record continues from, i.e.
//! the hash of the last removed line), the first file kept, and a `mac`:
//! HMAC-SHA256 under a key derived from the pseudonym key
//! ([`CheckpointKey`]) over those facts, the record's `ts` and its own `prev_hash`.
//! `verify` with that key starts the chain at an authenticated anchor instead of
//! 64 zeros; without the key it refuses to call a capped trail intact. Someone
//! who can write files but does not hold the key cannot remove records and cover
//! it with a checkpoint.
//!
//! # Encryption at rest
//!
//! With an encryption key, each line is `{"v":1,"nonce":"<24 hex>","ct":"<hex>"}`:
//! AES-256-GCM of the plaintext record line under a fresh random 96-bit nonce, with
//! the associated data `consentgate-audit-v1`. The hash chain is computed over the
//! PLAINTEXT record line (what `prev_hash` of the next record covers), so `verify`
//! decrypts each line and then checks the chain; GCM authenticates each line on its
//! own. Random nonces stay safe for about 2^32 lines per key: rotate the key well
//! before that (a new key needs a new audit directory, or both keys for `verify`).
//!
//! # Crash recovery
//!
//! On start the writer reads the last line of the last file. A torn tail (bytes
//! after the last newline, or a last line that is not a valid record) is cut off
//! and a `recovery` record (`reason: "torn_tail"`, `detail: {file, bytes_cut}`)
//! continues the chain from the last complete line. After a disk error the writer
//! refuses new records (callers fail closed) and retries once a second; when the
//! disk is back it cuts any partial line and writes a `recovery` record
//! (`reason: "write_failure"`, `detail: {records_lost}`) before accepting records
//! again.
//!
//! One writer per directory: start one [`AuditWriter`] per process and share its
//! clones (a config reload keeps it). The lock is released once the last clone is
//! dropped and the writer thread has written what was queued.
//!
//! # Limits of a hash chain
//!
//! `verify` detects any altered, removed, inserted or reordered record that has a
//! successor, and a torn tail. Removing whole records from the very end, or
//! rewriting the last record, leaves a valid (shorter) chain: keep an external
//! anchor (e.g. the record count or the last hash, shipped elsewhere) if that
//! matters.

mod chain;
mod checkpoint;
mod crypto;
mod pseudonym;
mod trace;
mod verify;
mod writer;

pub(crate) use checkpoint::CheckpointKey;
pub(crate) use crypto::{load_enc_key, EncKey};
pub(crate) use pseudonym::{default_key_path, load_or_create_key, PseudonymKey, PSEUDONYM_HEX_LEN};
pub(crate) use trace::trace_id;
pub(crate) use verify::{find, verify_trail};
pub(crate) use writer::{
    AuditCounters, AuditOptions, AuditStarter, AuditUnavailable, AuditWriter, FsyncPolicy,
};

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Serialize, Serializer};
use std::path::Path;

/// What a record is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum AuditKind {
    /// A request decision, or one dropped or modified event of a request.
    Decision,
    /// A consent write through the admin API (`actor` = the admin token's name).
    ConsentChange,
    /// A config load or reload.
    Config,
    /// What the upstream did with a forwarded request (`status` or `error`).
    Outcome,
    /// A delivery attempt of the sync outbox to a vendor target (SPEC §13).
    Sync,
    /// Written by the writer itself after a torn tail or a write failure.
    Recovery,
    /// Written by the writer itself before it removes the oldest files
    /// (`max_total_bytes`): what went, and the keyed anchor the chain continues from.
    Checkpoint,
}

impl AuditKind {}

/// One audit record, before the writer chains it. Fields hold names, reasons,
/// pseudonyms and counts: never an email, phone, name, raw patient id or payload.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub(crate) struct AuditRecord {
    #[serde(serialize_with = "ser_ts")]
    pub ts: DateTime<Utc>,
    pub request_id: Option<String>,
    /// The caller's W3C trace id ([`trace_id`]); omitted when it sent none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    pub kind: AuditKind,
    pub destination: Option<String>,
    /// A pseudonym from [`PseudonymKey::pseudonym`], never the raw id.
    pub patient: Option<String>,
    pub category: Option<String>,
    pub decision: Option<String>,
    pub reason: Option<String>,
    pub rule: Option<String>,
    pub fields_stripped: Vec<String>,
    pub flags_set: Vec<String>,
    /// The admin token's name, for consent changes.
    pub actor: Option<String>,
    /// `outcome`: the HTTP status the upstream answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// `outcome`: why the upstream exchange failed (`connect`, `timeout`, `reset`…).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Extra facts (counts, file names, config digests): never patient data.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<serde_json::Value>,
    /// The events of an inspected request (see the module doc).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub events: Option<Vec<EventEntry>>,
}

/// One event or recipient of an inspected request, as its `decision` record
/// carries it: a few words in memory, about 110 bytes in the line.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct EventEntry {
    /// The pseudonym of the first matched record's patient, as bytes.
    pub patient: Option<[u8; PSEUDONYM_HEX_LEN / 2]>,
    pub decision: &'static str,
    pub reason: crate::decide::Reason,
    pub matches: u32,
    /// `fields_stripped` and `flags_set`, when the event was changed.
    pub changes: Option<Box<(Vec<String>, Vec<String>)>>,
}

impl Serialize for EventEntry {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(None)?;
        if let Some(p) = &self.patient {
            m.serialize_entry("patient", &hex::encode(p))?;
        }
        m.serialize_entry("decision", self.decision)?;
        m.serialize_entry("reason", self.reason.as_str())?;
        m.serialize_entry("rule", self.reason.rule())?;
        m.serialize_entry("matches", &self.matches)?;
        if let Some(c) = &self.changes {
            if !c.0.is_empty() {
                m.serialize_entry("fields_stripped", &c.0)?;
            }
            if !c.1.is_empty() {
                m.serialize_entry("flags_set", &c.1)?;
            }
        }
        m.end()
    }
}

fn ser_ts<S: Serializer>(ts: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&ts_text(ts))
}

/// `ts` as records carry it (RFC 3339, microseconds, `Z`).
pub(crate) fn ts_text(ts: &DateTime<Utc>) -> String {
    ts.to_rfc3339_opts(SecondsFormat::Micros, true)
}

impl AuditRecord {
    /// A record of `kind` stamped now, every other field empty.
    pub(crate) fn new(kind: AuditKind) -> AuditRecord {
        AuditRecord {
            ts: Utc::now(),
            request_id: None,
            trace_id: None,
            kind,
            destination: None,
            patient: None,
            category: None,
            decision: None,
            reason: None,
            rule: None,
            fields_stripped: Vec::new(),
            flags_set: Vec::new(),
            actor: None,
            status: None,
            error: None,
            detail: None,
            events: None,
        }
    }

    /// A request (or event) decision: `decision` is `allowed`, `modified`,
    /// `blocked`, `dropped`, `tunneled`…, `reason` as in `consentgate_events_total`.
    pub(crate) fn decision(
        request_id: &str,
        destination: &str,
        decision: &str,
        reason: &str,
    ) -> AuditRecord {
        let mut r = AuditRecord::new(AuditKind::Decision);
        r.request_id = Some(request_id.to_string());
        r.destination = Some(destination.to_string());
        r.decision = Some(decision.to_string());
        r.reason = Some(reason.to_string());
        r
    }

    /// A consent write by the admin token named `actor`; `decision` is the
    /// operation (`put`, `patch`, `delete`).
    pub(crate) fn consent_change(actor: &str, patient: String, operation: &str) -> AuditRecord {
        let mut r = AuditRecord::new(AuditKind::ConsentChange);
        r.actor = Some(actor.to_string());
        r.patient = Some(patient);
        r.decision = Some(operation.to_string());
        r
    }

    /// A config load or reload: `reason` is `load` or `reload`, `decision` is
    /// `success` or `failure`.
    pub(crate) fn config(reason: &str, decision: &str) -> AuditRecord {
        let mut r = AuditRecord::new(AuditKind::Config);
        r.reason = Some(reason.to_string());
        r.decision = Some(decision.to_string());
        r
    }

    /// The upstream answered a forwarded request with `status`.
    pub(crate) fn outcome_status(request_id: &str, destination: &str, status: u16) -> AuditRecord {
        let mut r = AuditRecord::new(AuditKind::Outcome);
        r.request_id = Some(request_id.to_string());
        r.destination = Some(destination.to_string());
        r.status = Some(status);
        r
    }

    /// The upstream exchange of a forwarded request failed; `error` is the kind
    /// (`consentgate_upstream_errors_total{kind}`), never a message with a URL.
    pub(crate) fn outcome_error(request_id: &str, destination: &str, error: &str) -> AuditRecord {
        let mut r = AuditRecord::new(AuditKind::Outcome);
        r.request_id = Some(request_id.to_string());
        r.destination = Some(destination.to_string());
        r.error = Some(error.to_string());
        r
    }

    /// A sync outbox delivery attempt: `destination` is the target's name,
    /// `decision` the result (`delivered`, `retry`, `rejected`, `parked`,
    /// `no_address`), `reason` why, `status` the vendor's HTTP status.
    pub(crate) fn sync(target: &str, patient: String, result: &str, reason: &str) -> AuditRecord {
        let mut r = AuditRecord::new(AuditKind::Sync);
        r.destination = Some(target.to_string());
        r.patient = Some(patient);
        r.decision = Some(result.to_string());
        r.reason = Some(reason.to_string());
        r
    }

    #[cfg(test)]
    /// Set `trace_id` (None leaves the record without one).
    pub(crate) fn with_trace(mut self, trace_id: Option<&str>) -> AuditRecord {
        self.trace_id = trace_id.map(str::to_string);
        self
    }

    #[cfg(test)]
    /// Set `patient` to the pseudonym of `patient_id` under `key`.
    pub(crate) fn with_patient(mut self, key: &PseudonymKey, patient_id: &str) -> AuditRecord {
        self.patient = Some(key.pseudonym(patient_id));
        self
    }
}

/// File name of the audit file opened on UTC day `day` (YYYYMMDD) with sequence
/// number `seq`.
pub(crate) fn file_name(day: u32, seq: u64) -> String {
    format!("audit-{day:08}-{seq:06}.jsonl")
}

/// (day, seq) of an audit file name, or None for any other file.
pub(crate) fn parse_file_name(path: &Path) -> Option<(u32, u64)> {
    let name = path.file_name()?.to_str()?;
    let rest = name.strip_prefix("audit-")?.strip_suffix(".jsonl")?;
    let (day, seq) = rest.split_once('-')?;
    if day.len() != 8 || seq.len() < 6 {
        return None;
    }
    if !day.bytes().all(|b| b.is_ascii_digit()) || !seq.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((day.parse().ok()?, seq.parse().ok()?))
}

/// The UTC day of `t` as YYYYMMDD.
pub(crate) fn day_of(t: DateTime<Utc>) -> u32 {
    use chrono::Datelike;
    (t.year().max(0) as u32) * 10_000 + t.month() * 100 + t.day()
}

#[cfg(test)]
mod tests;
