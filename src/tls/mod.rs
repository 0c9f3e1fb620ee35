//! TLS interception: the interception CA (`consentgate ca init`, created on
//! first `run`) and the on-the-fly leaf certificates presented to apps inside
//! an intercepted `CONNECT` (SPEC §2, §3, §4 `interception`).
//!
//! The admin listener's own TLS (`admin.tls`) is in [`admin`]. The upstream
//! (client) side lives elsewhere.

pub(crate) mod admin;
pub(crate) mod ca;
pub(crate) mod handshake;
pub(crate) mod mint;
mod p12;

pub(crate) use ca::{
    ensure_ca, init_ca, load_ca, trust_instructions, CaOptions, LoadedCa, BUILTIN_PERMITTED_HOSTS,
    CA_BUNDLE_FILE, CA_CERT_FILE, CA_DEFAULT_DAYS, TRUSTSTORE_FILE, TRUSTSTORE_PASSWORD,
};
pub(crate) use handshake::upstream_reason;
pub(crate) use mint::{CertMinter, HandshakeError};
