//! Look up: the consent store, its record type and the sources that feed it.

pub mod api;
pub mod file_source;
pub mod journal;
pub mod record;
pub mod source;
pub mod store;

pub use record::{ConsentRecord, FieldError};
pub use source::{ChangeEvent, ChangeOp, ConsentWriter, OnChange, WriteError};
pub use store::{ConsentStore, Upsert};
