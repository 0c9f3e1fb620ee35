//! TLS interception: the interception CA (`consentgate ca init`, created on
//! first `run`) and the on-the-fly leaf certificates presented to apps inside
//! an intercepted `CONNECT` (SPEC §2, §3, §4 `interception`).
//!
//! The admin listener's own TLS (`admin.tls`) is in [`admin`]. The upstream
//! (client) side lives elsewhere.

pub mod admin;
pub mod ca;
pub mod mint;

pub use ca::{
    ensure_ca, init_ca, load_ca, trust_instructions, CaError, CaFiles, LoadedCa, CA_CERT_FILE,
    CA_KEY_FILE,
};
pub use mint::{AcceptError, CertMinter, MintError, MintObserver, DEFAULT_CACHE_CAPACITY};
