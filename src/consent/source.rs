//! What feeds the consent store and what the admin API writes through.
//!
//! A source loads records into a [`ConsentStore`](super::ConsentStore) and keeps
//! it current; a [`ConsentWriter`] makes an admin-API write durable (journal
//! fsync'd, or committed in a database) and applies it to the store before it
//! answers, so the very next proxied request enforces it.
//!
//! Every write is one [`ConsentWriter::modify`]: the writer reads the current
//! record, checks the precondition (`If-Match`), runs the caller's merge and
//! makes the result durable as one step, under a lock per patient (the file
//! source's journal lock; in PostgreSQL a transaction holding the row lock), so
//! two writes to one patient never both merge into the same old record.

use super::record::ConsentRecord;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

/// A boxed, sendable future (no `async_trait` needed).
pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Called with the seconds from a change at the source (a PostgreSQL row's
/// commit, the snapshot file's mtime) to its application in the store
/// (`consentgate_consent_propagation_seconds`).
pub(crate) type PropagationObserver = Arc<dyn Fn(f64) + Send + Sync>;

/// Why a write was refused or failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum WriteError {
    /// The store holds a record with a newer `updated_at` (last write wins).
    Superseded,
    /// The record is invalid (field path and problem; never the value).
    Invalid { field: String, detail: String },
    /// Could not make the write durable; nothing was applied.
    Storage(String),
    /// There is no record to merge into (PATCH of an unknown patient).
    NotFound,
    /// `If-Match` does not hold: the current version (`None`: no record).
    PreconditionFailed { current: Option<u64> },
}

impl fmt::Display for WriteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WriteError::Superseded => f.write_str("a record with a newer updated_at is stored"),
            WriteError::Invalid { field, detail } => write!(f, "{field}: {detail}"),
            WriteError::Storage(e) => write!(f, "storage: {e}"),
            WriteError::NotFound => f.write_str("no such record"),
            WriteError::PreconditionFailed { current: Some(v) } => {
                write!(f, "precondition failed: the current version is {v}")
            }
            WriteError::PreconditionFailed { current: None } => {
                f.write_str("precondition failed: there is no record")
            }
        }
    }
}

impl std::error::Error for WriteError {}

/// What a write requires of the current record (`If-Match`, RFC 9110 §13.1.1).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) enum Precondition {
    #[default]
    None,
    /// `If-Match: *`: a record exists.
    Exists,
    /// `If-Match: "3", "4"`: the current version is one of these.
    Versions(Vec<u64>),
}

impl Precondition {
    /// `Ok` when the precondition holds for `current`.
    pub(crate) fn check(&self, current: Option<&ConsentRecord>) -> Result<(), WriteError> {
        let holds = match (self, current) {
            (Precondition::None, _) => true,
            (Precondition::Exists, Some(_)) => true,
            (Precondition::Versions(v), Some(c)) => v.contains(&c.version),
            (_, None) => false,
        };
        if holds {
            Ok(())
        } else {
            Err(WriteError::PreconditionFailed {
                current: current.map(|c| c.version),
            })
        }
    }
}

/// What a write does, decided by its merge from the current record.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Change {
    /// Store this record (its `version` is assigned by the writer).
    Put(Box<ConsentRecord>),
    /// Delete the record (nothing is written when there is none).
    Delete,
}

/// The merge of one write: from the current record (`None`: there is none)
/// to the change. Runs under the patient's write lock, so it must be quick
/// and must not block; an `Err` ends the write with nothing changed.
pub(crate) type Merge =
    Box<dyn FnOnce(Option<&ConsentRecord>) -> Result<Change, WriteError> + Send + 'static>;

/// The outcome of a durable write.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Written {
    /// The record as stored (hashed identifiers, new version).
    Stored(Arc<ConsentRecord>),
    Deleted,
    /// A delete found no record; nothing was written.
    Absent,
}

/// Durable writes of consent records. A file source journals them; a database
/// source commits them. Both update the in-memory store before resolving `Ok`.
pub(crate) trait ConsentWriter: Send + Sync {
    /// Read the current record of `patient_id`, check `pre`, run `merge` on it
    /// and make the change durable, all under the patient's write lock (see the
    /// module docs). A stored record must keep `patient_id`; it is refused as
    /// [`WriteError::Superseded`] when the current record is newer (last write
    /// wins by `updated_at`). Resolves once durable and applied to the store.
    fn modify(
        &self,
        patient_id: &str,
        pre: Precondition,
        merge: Merge,
        actor: &str,
    ) -> BoxFuture<'_, Result<Written, WriteError>>;

    /// Store a whole record (plaintext identifiers are hashed first). Resolves to
    /// the record as stored, once durable.
    #[cfg(test)]
    fn put(
        &self,
        rec: ConsentRecord,
        actor: &str,
    ) -> BoxFuture<'_, Result<Arc<ConsentRecord>, WriteError>> {
        let id = rec.patient_id.clone();
        let write = self.modify(
            &id,
            Precondition::None,
            Box::new(move |_| Ok(Change::Put(Box::new(rec)))),
            actor,
        );
        Box::pin(async move {
            match write.await? {
                Written::Stored(r) => Ok(r),
                _ => Err(WriteError::Storage("put stored no record".into())),
            }
        })
    }

    /// Delete a record. `Ok(false)` when there was none.
    #[cfg(test)]
    fn delete(&self, patient_id: &str, actor: &str) -> BoxFuture<'_, Result<bool, WriteError>> {
        let write = self.modify(
            patient_id,
            Precondition::None,
            Box::new(|_| Ok(Change::Delete)),
            actor,
        );
        Box::pin(async move { Ok(write.await? == Written::Deleted) })
    }
}

/// The record a [`Change::Put`] stores, checked against the current record:
/// valid, for this patient, not older than the current record (last write
/// wins), in stored form (hashes only), with the patient id trimmed and the
/// given `version`. Shared by the writers so both apply the same rules.
pub(crate) fn prepare_put(
    rec: Box<ConsentRecord>,
    patient_id: &str,
    current: Option<&ConsentRecord>,
    version: u64,
) -> Result<ConsentRecord, WriteError> {
    rec.check().map_err(|e| WriteError::Invalid {
        field: e.field,
        detail: e.detail,
    })?;
    if rec.patient_id.trim() != patient_id.trim() {
        return Err(WriteError::Invalid {
            field: "patient_id".into(),
            detail: "does not match the path".into(),
        });
    }
    if let Some(cur) = current {
        if !rec.supersedes(cur) {
            return Err(WriteError::Superseded);
        }
    }
    let mut stored = rec.into_stored();
    stored.patient_id = patient_id.trim().to_string();
    stored.version = version;
    Ok(stored)
}

/// What changed, for the audit trail (`kind: consent_change`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ChangeEvent {
    pub(crate) patient_id: String,
    pub(crate) op: ChangeOp,
    /// The admin token name that made the change.
    pub(crate) actor: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ChangeOp {
    Put,
    Patch,
    Delete,
}

impl ChangeOp {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            ChangeOp::Put => "put",
            ChangeOp::Patch => "patch",
            ChangeOp::Delete => "delete",
        }
    }
}

/// Hook called after every acknowledged write.
pub(crate) type OnChange = Arc<dyn Fn(ChangeEvent) + Send + Sync>;

/// A hook that does nothing.
pub(crate) fn no_op_on_change() -> OnChange {
    Arc::new(|_| {})
}
