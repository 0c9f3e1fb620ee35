//! consentgate: a consent-enforcing egress proxy.
//!
//! Modules follow the data path: listen → route → identify → look up (consent)
//! → decide → rewrite (destinations) → audit → forward (upstream).
#![forbid(unsafe_code)]

pub mod consent;
pub mod decide;
pub mod destinations;
pub mod identify;
pub mod model;
pub mod tls;
