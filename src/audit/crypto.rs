//! Encryption at rest: AES-256-GCM, one envelope per line.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use rand::RngCore;
use serde_json::{Map, Value};
use std::fmt;
use std::path::Path;

/// Associated data bound into every line's tag.
const AAD: &[u8] = b"consentgate-audit-v1";
const NONCE_LEN: usize = 12;

/// The audit encryption key (audit.encryption_key_file: 64 hex characters).
#[derive(Clone)]
pub(crate) struct EncKey {
    cipher: Aes256Gcm,
}

impl fmt::Debug for EncKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("EncKey(..)")
    }
}

impl EncKey {
    /// From 64 hex characters (surrounding whitespace ignored).
    pub(crate) fn from_hex(text: &str) -> Result<EncKey, String> {
        let t = text.trim();
        if t.len() != 64 {
            return Err(format!(
                "encryption key must be 64 hex characters (32 bytes), found {} characters",
                t.len()
            ));
        }
        let bytes = hex::decode(t).map_err(|_| "encryption key is not hex".to_string())?;
        let cipher = Aes256Gcm::new_from_slice(&bytes)
            .map_err(|_| "encryption key must be 32 bytes".to_string())?;
        Ok(EncKey { cipher })
    }

    /// The envelope line `{"v":1,"nonce":"<hex>","ct":"<hex>"}` for `plain`.
    pub(crate) fn seal(&self, plain: &[u8]) -> Result<Vec<u8>, String> {
        self.seal_with(AAD, plain)
    }

    /// Like [`EncKey::seal`], with other associated data: each kind of file
    /// (audit, consent journal) has its own, so a line of one never opens as
    /// a line of the other.
    pub(crate) fn seal_with(&self, aad: &[u8], plain: &[u8]) -> Result<Vec<u8>, String> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let ct = self
            .cipher
            .encrypt(Nonce::from_slice(&nonce), Payload { msg: plain, aad })
            .map_err(|_| "encryption failed".to_string())?;
        let line = format!(
            "{{\"v\":1,\"nonce\":\"{}\",\"ct\":\"{}\"}}",
            hex::encode(nonce),
            hex::encode(ct)
        );
        Ok(line.into_bytes())
    }

    /// Decrypt an envelope object.
    pub(crate) fn open(&self, env: &Map<String, Value>) -> Result<Vec<u8>, String> {
        self.open_with(AAD, env)
    }

    /// Like [`EncKey::open`], with the associated data of [`EncKey::seal_with`].
    pub(crate) fn open_with(
        &self,
        aad: &[u8],
        env: &Map<String, Value>,
    ) -> Result<Vec<u8>, String> {
        if env.get("v").and_then(Value::as_u64) != Some(1) {
            return Err("unsupported envelope version".into());
        }
        let nonce = env
            .get("nonce")
            .and_then(Value::as_str)
            .and_then(|s| hex::decode(s).ok())
            .filter(|n| n.len() == NONCE_LEN)
            .ok_or_else(|| "envelope nonce is not 24 hex characters".to_string())?;
        let ct = env
            .get("ct")
            .and_then(Value::as_str)
            .and_then(|s| hex::decode(s).ok())
            .ok_or_else(|| "envelope ct is not hex".to_string())?;
        self.cipher
            .decrypt(Nonce::from_slice(&nonce), Payload { msg: &ct, aad })
            .map_err(|_| "decryption failed (wrong key or altered ciphertext)".to_string())
    }
}

/// Read the encryption key file (64 hex characters). The file is the operator's:
/// it is never created here.
pub(crate) fn load_enc_key(path: &Path) -> Result<EncKey, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("audit encryption key {}: {e}", path.display()))?;
    EncKey::from_hex(&text).map_err(|e| format!("audit encryption key {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> EncKey {
        EncKey::from_hex(&hex::encode([b; 32])).unwrap()
    }

    fn env_of(line: &[u8]) -> Map<String, Value> {
        match serde_json::from_slice(line).unwrap() {
            Value::Object(m) => m,
            _ => panic!("not an object"),
        }
    }

    #[test]
    fn seal_open_round_trip_and_wrong_key_fails() {
        let k = key(7);
        let line = k.seal(b"{\"kind\":\"config\"}").unwrap();
        let env = env_of(&line);
        assert_eq!(env["v"], 1);
        assert_eq!(env["nonce"].as_str().unwrap().len(), 24);
        assert_eq!(k.open(&env).unwrap(), b"{\"kind\":\"config\"}");
        assert!(key(8).open(&env).is_err());
        // Fresh nonce each time.
        assert_ne!(k.seal(b"x").unwrap(), k.seal(b"x").unwrap());
    }

    #[test]
    fn key_text_is_validated() {
        assert!(EncKey::from_hex("abc").is_err());
        assert!(EncKey::from_hex(&"zz".repeat(32)).is_err());
        assert!(EncKey::from_hex(&format!("{}\n", "ab".repeat(32))).is_ok());
        assert!(format!("{:?}", key(1)) == "EncKey(..)");
    }
}
