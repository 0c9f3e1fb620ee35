//! Look up: the consent store, its record type and the sources that feed it.
//!
//! `run` wires them (`start_consent_source` in src/run.rs): one [`ConsentStore`],
//! fed by the configured source (`file_source::start` or `postgres::start`, each
//! given an observer for `consentgate_consent_propagation_seconds`), and an
//! [`ApiContext`] that writes through that source's [`ConsentWriter`]. Keep the
//! source's handle alive for as long as the proxy runs.

pub mod api;
pub mod compact;
pub mod file_source;
pub mod journal;
pub mod pg_tls;
pub mod postgres;
pub mod record;
pub mod source;
pub mod store;

pub use api::{ApiContext, PlaintextCarrier, Tokens};
pub use compact::ConsentView;
pub use file_source::{FileSourceConfig, FileSourceHandle};
pub use postgres::{PgSourceConfig, PgSourceHandle};
pub use record::{ConsentRecord, FieldError};
pub use source::{
    Change, ChangeEvent, ChangeOp, ConsentWriter, OnChange, Precondition, WriteError, Written,
};
pub use store::{ConsentStore, StoreObserver, Upsert};
