//! `consentgate demo`.
use std::path::Path;
pub fn run(_dir: Option<&Path>) -> i32 {
    1
}
