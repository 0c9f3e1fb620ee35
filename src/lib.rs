//! consentgate: a consent-enforcing egress proxy.
//!
//! Modules follow the data path: listen → route → identify → look up (consent)
//! → decide → rewrite (destinations) → audit → forward (upstream). `app`, `run`
//! and `admin` hold the process together; `config`, `model` and `metrics` are
//! shared vocabulary.
#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod audit;
pub mod body;
pub mod cli;
pub mod config;
pub mod consent;
pub mod decide;
pub mod demo;
pub mod destinations;
pub(crate) mod enforce;
pub mod explain;
pub mod forward;
pub(crate) mod guard;
pub mod identify;
pub(crate) mod learn;
pub mod listen;
pub mod metrics;
pub mod model;
pub(crate) mod optout;
pub mod pipeline;
pub(crate) mod refusal;
pub(crate) mod response;
pub mod route;
pub mod run;
pub mod state;
pub(crate) mod sync;
pub mod telemetry;
pub mod tls;
pub(crate) mod webhooks;
