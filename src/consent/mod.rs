//! Look up: the consent store, its record type and the sources that feed it.
//!
//! `run` wires them (`start_consent_source` in src/run.rs): one [`ConsentStore`],
//! fed by the configured source (`file_source::start` or `postgres::start`, each
//! given an observer for `consentgate_consent_propagation_seconds`), and an
//! [`ApiContext`] that writes through that source's [`ConsentWriter`]. Keep the
//! source's handle alive for as long as the proxy runs.

pub(crate) mod api;
pub(crate) mod compact;
pub(crate) mod file_source;
pub(crate) mod journal;
pub(crate) mod nats;
pub(crate) mod pg_tls;
pub(crate) mod postgres;
pub(crate) mod record;
pub(crate) mod source;
pub(crate) mod store;

pub(crate) use api::{ApiContext, PlaintextCarrier};
pub(crate) use compact::ConsentView;
pub(crate) use file_source::{FileSourceConfig, FileSourceHandle};
pub(crate) use postgres::{PgSourceConfig, PgSourceHandle};
pub(crate) use record::ConsentRecord;
pub(crate) use source::{ChangeEvent, ConsentWriter};
pub(crate) use store::{ConsentStore, Plaintext, StoreObserver};
