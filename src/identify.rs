//! Identify: the identifiers found in one event, normalised and hashed the way the
//! consent index and the vendors expect (SPEC §5). Plaintext email and phone never
//! leave this module unhashed.

use sha2::{Digest, Sha256};

/// One identity key, ready for an index lookup.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum IdKey {
    Patient(Box<str>),
    External(Box<str>),
    /// SHA-256 of a normalised email (or a 64-hex value taken as already hashed).
    EmailHash([u8; 32]),
    /// SHA-256 of a normalised phone (or a 64-hex value taken as already hashed).
    PhoneHash([u8; 32]),
}

/// Identifiers found in one event or recipient.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Identifiers {
    pub keys: Vec<IdKey>,
}

impl Identifiers {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
    fn push(&mut self, k: IdKey) {
        if !self.keys.contains(&k) {
            self.keys.push(k);
        }
    }
    pub fn add_patient(&mut self, v: &str) {
        let v = v.trim();
        if !v.is_empty() {
            self.push(IdKey::Patient(v.into()));
        }
    }
    pub fn add_external(&mut self, v: &str) {
        let v = v.trim();
        if !v.is_empty() {
            self.push(IdKey::External(v.into()));
        }
    }
    /// A plaintext email, or a 64-hex value taken as its SHA-256.
    pub fn add_email(&mut self, v: &str) {
        if let Some(h) = parse_sha256_hex(v) {
            self.push(IdKey::EmailHash(h));
        } else if let Some(n) = normalize_email(v) {
            self.push(IdKey::EmailHash(sha256(n.as_bytes())));
        }
    }
    /// A plaintext phone (any punctuation, optional `+`), or a 64-hex SHA-256.
    pub fn add_phone(&mut self, v: &str) {
        if let Some(h) = parse_sha256_hex(v) {
            self.push(IdKey::PhoneHash(h));
        } else if let Some(n) = normalize_phone(v) {
            self.push(IdKey::PhoneHash(sha256(n.as_bytes())));
        }
    }
}

pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(sha256(data))
}

/// `Some` when `v` is exactly 64 hex digits (either case).
pub fn parse_sha256_hex(v: &str) -> Option<[u8; 32]> {
    let v = v.trim();
    if v.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(v.to_ascii_lowercase(), &mut out).ok()?;
    Some(out)
}

/// Whether a value already looks hashed (64 hex: SHA-256; 32 hex: MD5).
pub fn looks_hashed(v: &str) -> bool {
    let v = v.trim();
    (v.len() == 64 || v.len() == 32) && v.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Email normalisation: trimmed, lower-cased. `None` when it is not an address.
pub fn normalize_email(v: &str) -> Option<String> {
    let n = v.trim().to_lowercase();
    if n.is_empty() || !n.contains('@') {
        return None;
    }
    Some(n)
}

/// The gmail.com / googlemail.com form without dots before the `@` (Google's
/// normalisation), when it differs from the plain normalised form.
pub fn gmail_variant(normalized: &str) -> Option<String> {
    let (local, domain) = normalized.rsplit_once('@')?;
    if (domain == "gmail.com" || domain == "googlemail.com") && local.contains('.') {
        Some(format!("{}@{}", local.replace('.', ""), domain))
    } else {
        None
    }
}

/// Phone normalisation: digits only, country code included, no `+`, no `00`
/// international prefix. `None` when fewer than 7 digits remain.
pub fn normalize_phone(v: &str) -> Option<String> {
    let v = v.trim();
    let v = v.strip_prefix("whatsapp:").unwrap_or(v);
    let mut digits: String = v.chars().filter(|c| c.is_ascii_digit()).collect();
    if !v.starts_with('+') && digits.starts_with("00") {
        digits.drain(..2);
    }
    if digits.len() < 7 {
        return None;
    }
    Some(digits)
}

/// Every hash under which the index holds an email (SPEC §5).
pub fn email_index_hashes(raw: &str) -> Vec<[u8; 32]> {
    let Some(n) = normalize_email(raw) else {
        return Vec::new();
    };
    let mut out = vec![sha256(n.as_bytes())];
    if let Some(g) = gmail_variant(&n) {
        out.push(sha256(g.as_bytes()));
    }
    out
}

/// Every hash under which the index holds a phone: digits, and `+` digits (E.164).
pub fn phone_index_hashes(raw: &str) -> Vec<[u8; 32]> {
    let Some(n) = normalize_phone(raw) else {
        return Vec::new();
    };
    vec![sha256(n.as_bytes()), sha256(format!("+{n}").as_bytes())]
}

/// Hash a plaintext email the way most ad platforms expect it (lowercase hex).
/// A value that already looks hashed is returned lower-cased as it is.
pub fn hash_email_for_vendor(v: &str) -> String {
    if looks_hashed(v) {
        return v.trim().to_ascii_lowercase();
    }
    match normalize_email(v) {
        Some(n) => sha256_hex(n.as_bytes()),
        None => sha256_hex(v.trim().to_lowercase().as_bytes()),
    }
}

/// Hash a plaintext phone as digits with country code (Meta, Pinterest, Snap).
pub fn hash_phone_digits_for_vendor(v: &str) -> String {
    if looks_hashed(v) {
        return v.trim().to_ascii_lowercase();
    }
    match normalize_phone(v) {
        Some(n) => sha256_hex(n.as_bytes()),
        None => sha256_hex(v.trim().as_bytes()),
    }
}

/// Hash a plaintext phone in E.164 form, `+` and digits (Google, TikTok).
pub fn hash_phone_e164_for_vendor(v: &str) -> String {
    if looks_hashed(v) {
        return v.trim().to_ascii_lowercase();
    }
    match normalize_phone(v) {
        Some(n) => sha256_hex(format!("+{n}").as_bytes()),
        None => sha256_hex(v.trim().as_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn email_normalises_and_hashes() {
        let mut a = Identifiers::new();
        a.add_email("  Jane@Example.com ");
        let mut b = Identifiers::new();
        b.add_email(&sha256_hex(b"jane@example.com"));
        assert_eq!(a, b);
        assert!(normalize_email("not-an-email").is_none());
    }

    #[test]
    fn phone_forms_agree() {
        assert_eq!(normalize_phone("+1 (415) 555-0100").unwrap(), "14155550100");
        assert_eq!(normalize_phone("0014155550100").unwrap(), "14155550100");
        assert_eq!(
            normalize_phone("whatsapp:+14155550100").unwrap(),
            "14155550100"
        );
        let h = phone_index_hashes("+14155550100");
        assert_eq!(h[0], sha256(b"14155550100"));
        assert_eq!(h[1], sha256(b"+14155550100"));
        assert_eq!(
            hash_phone_e164_for_vendor("415-555-0100 ext"),
            sha256_hex(b"+4155550100")
        );
    }

    #[test]
    fn gmail_variant_only_for_google_domains() {
        assert_eq!(gmail_variant("j.doe@gmail.com").unwrap(), "jdoe@gmail.com");
        assert!(gmail_variant("j.doe@example.com").is_none());
        assert_eq!(email_index_hashes("J.Doe@gmail.com").len(), 2);
    }

    #[test]
    fn hashed_values_pass_through() {
        let h = sha256_hex(b"x");
        assert_eq!(hash_email_for_vendor(&h.to_uppercase()), h);
        assert!(looks_hashed(&h));
        assert!(!looks_hashed("hello"));
    }
}
