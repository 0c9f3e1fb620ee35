//! Look up: the consent store, its record type and the sources that feed it.

pub mod record;
pub mod store;

pub use record::ConsentRecord;
pub use store::{ConsentStore, Upsert};
