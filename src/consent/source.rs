//! What feeds the consent store and what the admin API writes through.
//!
//! A source loads records into a [`ConsentStore`](super::ConsentStore) and keeps
//! it current; a [`ConsentWriter`] makes an admin-API write durable (journal
//! fsync'd, or committed in a database) and applies it to the store before it
//! answers, so the very next proxied request enforces it.

use super::record::ConsentRecord;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

/// A boxed, sendable future (no `async_trait` needed).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why a write was refused or failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteError {
    /// The store holds a record with a newer `updated_at` (last write wins).
    Superseded,
    /// The record is invalid (field path and problem; never the value).
    Invalid { field: String, detail: String },
    /// Could not make the write durable; nothing was applied.
    Storage(String),
}

impl fmt::Display for WriteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WriteError::Superseded => f.write_str("a record with a newer updated_at is stored"),
            WriteError::Invalid { field, detail } => write!(f, "{field}: {detail}"),
            WriteError::Storage(e) => write!(f, "storage: {e}"),
        }
    }
}

impl std::error::Error for WriteError {}

/// Durable writes of consent records. A file source journals them; a database
/// source commits them. Both update the in-memory store before resolving `Ok`.
pub trait ConsentWriter: Send + Sync {
    /// Store a whole record (plaintext identifiers are hashed first). Resolves to
    /// the record as stored, once durable.
    fn put(
        &self,
        rec: ConsentRecord,
        actor: &str,
    ) -> BoxFuture<'_, Result<Arc<ConsentRecord>, WriteError>>;

    /// Delete a record. `Ok(false)` when there was none.
    fn delete(&self, patient_id: &str, actor: &str) -> BoxFuture<'_, Result<bool, WriteError>>;
}

/// What changed, for the audit trail (`kind: consent_change`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeEvent {
    pub patient_id: String,
    pub op: ChangeOp,
    /// The admin token name that made the change.
    pub actor: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeOp {
    Put,
    Patch,
    Delete,
}

impl ChangeOp {
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeOp::Put => "put",
            ChangeOp::Patch => "patch",
            ChangeOp::Delete => "delete",
        }
    }
}

/// Hook called after every acknowledged write.
pub type OnChange = Arc<dyn Fn(ChangeEvent) + Send + Sync>;

/// A hook that does nothing.
pub fn no_op_on_change() -> OnChange {
    Arc::new(|_| {})
}
