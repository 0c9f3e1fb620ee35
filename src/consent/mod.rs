//! Look up: the consent store, its record type and the sources that feed it.
//!
//! Wiring (in the proxy's `run`):
//! ```text
//! let store = Arc::new(ConsentStore::new());
//! let src = consent::file_source::start(
//!     FileSourceConfig::new(&cfg.consent.file, &cfg.consent.journal), store.clone()).await?;
//! let tokens = consent::api::load_tokens(&cfg.admin.tokens_file)?;
//! let api = Arc::new(ApiContext::new(store.clone(), src.writer(), tokens)
//!     .with_on_change(Arc::new(move |ev| audit.consent_change(ev))));
//! // admin listener: if consent::api::is_consent_path(req.uri().path()) {
//! //     return consent::api::handle(req, &api).await; }
//! // metrics: store.len(), store.source_up(), store.staleness(),
//! //          src.last_propagation_seconds(); decide: store.is_stale(max_staleness)
//! ```
//! Keep `src` (the `FileSourceHandle`) alive for as long as the proxy runs.

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
