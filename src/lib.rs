//! consentgate: a consent-enforcing egress proxy.
//!
//! Modules follow the data path: listen → route → gate → read → plan (identify,
//! look up, decide, rewrite, guard) → audit → forward; README.md "Code layout"
//! gives each one's role. All are private to the crate.
#![forbid(unsafe_code)]

mod admin;
mod app;
mod audit;
mod body;
mod cli;
mod config;
mod consent;
mod decide;
mod demo;
mod destinations;
mod enforce;
mod explain;
mod forward;
#[cfg(feature = "fuzz")]
pub mod fuzz;
mod guard;
mod identify;
mod learn;
mod listen;
mod metrics;
mod model;
mod optout;
mod pipeline;
mod refusal;
mod response;
mod route;
mod run;
mod state;
mod sync;
mod telemetry;
mod tls;
mod webhooks;

// The crate's only public surface: what `src/main.rs`, the criterion benches
// (`benches/`) and `bench_kit` (`src/bin/bench_kit/`) use. Items are
// `pub(crate)` otherwise; `pub` marks only these, the members the callers use
// and the types their signatures name (e.g. `Adapter::enforce`'s `Enforced`).

// `consentgate <command>` (src/main.rs).
pub use cli::{AuditCommand, CaCommand, Cli, Command, DbCommand, SyncCommand};
pub use demo::run as demo;
pub use run::{
    audit_find, audit_verify, ca_init, check, db_migrate, explain, run, sync_status, CaInit,
};

// The criterion benches.
pub use consent::file_source::load_snapshot;
pub use consent::record::{ConsentRecord, RecordIdentifiers};
pub use consent::store::ConsentStore;
pub use decide::{Context, EventVerdict, Policy};
pub use destinations::{builtins, Adapter, RequestView};
pub use identify::{
    email_index_hashes, hash_email_for_vendor, hash_phone_digits_for_vendor, normalize_email,
    normalize_phone, sha256_hex, Identifiers,
};
pub use model::{Category, Grant};

// bench_kit's TLS handshake bench.
pub use tls::ca::{init_ca, load_ca, CaOptions};
pub use tls::mint::CertMinter;
