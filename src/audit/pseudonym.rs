//! Patient pseudonyms: HMAC-SHA256 under a key the proxy owns.
//!
//! `pseudonym(id)` is the first 32 lowercase hex characters (128 bits) of
//! HMAC-SHA256(key, id), where `key` is the 32 bytes the key file holds as 64 hex
//! characters and `id` the patient_id's UTF-8 bytes. 128 bits keep pseudonyms
//! collision-free for any realistic patient count while halving the log volume of
//! a full digest. The same key gives the same pseudonym across restarts, so
//! `audit find` and log searches work over time; without the key a pseudonym
//! cannot be linked back to a patient id.

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;
use std::fmt;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Length of a pseudonym in hex characters.
pub(crate) const PSEUDONYM_HEX_LEN: usize = 32;

/// Where the key lives when `audit.pseudonym_key_file` is null.
pub(super) const DEFAULT_KEY_PATH: &str = "var/pseudonym.key";

#[derive(Clone)]
pub(crate) struct PseudonymKey {
    /// HMAC state keyed once; cloned per pseudonym.
    mac: Hmac<Sha256>,
}

impl fmt::Debug for PseudonymKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PseudonymKey(..)")
    }
}

impl PseudonymKey {
    /// From 64 hex characters (surrounding whitespace ignored).
    pub(crate) fn from_hex(text: &str) -> Result<PseudonymKey, String> {
        let t = text.trim();
        if t.len() != 64 {
            return Err(format!(
                "pseudonym key must be 64 hex characters (32 bytes), found {} characters",
                t.len()
            ));
        }
        let bytes = hex::decode(t).map_err(|_| "pseudonym key is not hex".to_string())?;
        PseudonymKey::from_bytes(&bytes)
    }

    fn from_bytes(bytes: &[u8]) -> Result<PseudonymKey, String> {
        let mac = <Hmac<Sha256> as Mac>::new_from_slice(bytes)
            .map_err(|_| "pseudonym key: invalid HMAC key".to_string())?;
        Ok(PseudonymKey { mac })
    }

    /// A 32-byte key for another purpose: HMAC-SHA256(key, label). `label` must
    /// not be valid UTF-8 (start it with 0xFF): pseudonyms are HMACs of patient
    /// ids, which are always UTF-8, so no patient id can ever equal a label and a
    /// pseudonym can never disclose a derived key.
    pub(crate) fn derive(&self, label: &[u8]) -> [u8; 32] {
        debug_assert!(
            std::str::from_utf8(label).is_err(),
            "label must not be UTF-8"
        );
        let mut mac = self.mac.clone();
        mac.update(label);
        mac.finalize().into_bytes().into()
    }

    /// The pseudonym of `patient_id`: 32 lowercase hex characters.
    pub(crate) fn pseudonym(&self, patient_id: &str) -> String {
        hex::encode(self.pseudonym_bytes(patient_id))
    }

    /// [`PseudonymKey::pseudonym`] as bytes (its hex is the pseudonym).
    pub(crate) fn pseudonym_bytes(&self, patient_id: &str) -> [u8; PSEUDONYM_HEX_LEN / 2] {
        let mut mac = self.mac.clone();
        mac.update(patient_id.as_bytes());
        let digest = mac.finalize().into_bytes();
        let mut out = [0u8; PSEUDONYM_HEX_LEN / 2];
        out.copy_from_slice(&digest[..PSEUDONYM_HEX_LEN / 2]);
        out
    }
}

/// True when `s` has the shape of a pseudonym (32 lowercase hex characters).
pub(super) fn is_pseudonym(s: &str) -> bool {
    s.len() == PSEUDONYM_HEX_LEN && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The key file path: `audit.pseudonym_key_file`, or `var/pseudonym.key` when null.
pub(crate) fn default_key_path(configured: Option<&Path>) -> PathBuf {
    configured
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_KEY_PATH))
}

/// Load the key from `path`, or create it there (32 random bytes as 64 hex
/// characters, mode 0600 from the moment the file exists) when it is missing.
///
/// Creation writes a temporary file opened with mode 0600, syncs it, then
/// hard-links it to `path`, which fails rather than overwrite a key another
/// process created meanwhile (that key is then loaded). A key file readable by
/// group or others is loaded with a warning.
pub(crate) fn load_or_create_key(path: &Path) -> Result<PseudonymKey, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => return load_existing(path, &text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("pseudonym key {}: {e}", path.display())),
    }
    match create_key(path) {
        Ok(key) => {
            tracing::info!(path = %path.display(), "created pseudonym key (mode 0600)");
            Ok(key)
        }
        Err(CreateError::Exists) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("pseudonym key {}: {e}", path.display()))?;
            load_existing(path, &text)
        }
        Err(CreateError::Io(e)) => Err(format!(
            "pseudonym key {}: cannot create: {e}",
            path.display()
        )),
    }
}

fn load_existing(path: &Path, text: &str) -> Result<PseudonymKey, String> {
    let key = PseudonymKey::from_hex(text)
        .map_err(|e| format!("pseudonym key {}: {e}", path.display()))?;
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format!("{:o}", meta.permissions().mode() & 0o777),
                "pseudonym key file is readable by group or others; chmod 600 it"
            );
        }
    }
    Ok(key)
}

enum CreateError {
    Exists,
    Io(std::io::Error),
}

impl From<std::io::Error> for CreateError {
    fn from(e: std::io::Error) -> Self {
        CreateError::Io(e)
    }
}

fn create_key(path: &Path) -> Result<PseudonymKey, CreateError> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir)?;
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    let text = hex::encode(bytes);
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "pseudonym.key".into());
    let tmp = dir.join(format!(
        ".{file_name}.tmp-{}-{:016x}",
        std::process::id(),
        rand::random::<u64>()
    ));
    let result = (|| -> Result<(), CreateError> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.write_all(b"\n")?;
        f.sync_all()?;
        match std::fs::hard_link(&tmp, path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(CreateError::Exists),
            Err(e) => Err(CreateError::Io(e)),
        }
    })();
    let _ = std::fs::remove_file(&tmp);
    result?;
    if let Ok(d) = std::fs::File::open(&dir) {
        let _ = d.sync_all();
    }
    PseudonymKey::from_bytes(&bytes).map_err(|e| CreateError::Io(std::io::Error::other(e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pseudonym_key_created_0600_and_stable_across_loads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/pseudonym.key");
        let k1 = load_or_create_key(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.trim().len(), 64);
        assert!(hex::decode(text.trim()).is_ok());
        let k2 = load_or_create_key(&path).unwrap();
        assert_eq!(k1.pseudonym("P-1001"), k2.pseudonym("P-1001"));
        assert_ne!(k1.pseudonym("P-1001"), k1.pseudonym("P-1002"));
        // No temporary file left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path().join("sub"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[test]
    fn pseudonym_is_truncated_hmac_sha256() {
        let key = PseudonymKey::from_hex(&"0b".repeat(32)).unwrap();
        let p = key.pseudonym("P-1001");
        assert!(is_pseudonym(&p), "{p}");
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&[0x0b; 32]).unwrap();
        mac.update(b"P-1001");
        let full = hex::encode(mac.finalize().into_bytes());
        assert_eq!(p, full[..32]);
        assert!(!p.contains("1001"));
        assert!(!is_pseudonym("P-1001"));
    }

    #[test]
    fn bad_key_file_is_an_error_naming_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        std::fs::write(&path, "not hex").unwrap();
        let e = load_or_create_key(&path).unwrap_err();
        assert!(e.contains(&path.display().to_string()), "{e}");
        assert_eq!(default_key_path(None), PathBuf::from("var/pseudonym.key"));
    }
}
