//! The consent record (SPEC §5). Strict: unknown fields and bad values are errors
//! that name the field.

use crate::identify;
use crate::model::{Category, Channel, Grant};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordIdentifiers {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub emails: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub phones: Vec<String>,
    #[serde(default)]
    pub external_ids: Vec<String>,
    #[serde(default)]
    pub email_sha256: Vec<String>,
    #[serde(default)]
    pub phone_sha256: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsentRecord {
    pub patient_id: String,
    #[serde(default)]
    pub identifiers: RecordIdentifiers,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jurisdiction: Option<String>,
    #[serde(default)]
    pub categories: BTreeMap<Category, Grant>,
    #[serde(default)]
    pub channels: BTreeMap<Channel, Grant>,
    #[serde(default)]
    pub sale_share_opt_out: bool,
    #[serde(default)]
    pub limit_sensitive: bool,
    #[serde(default)]
    pub gpc: bool,
    pub updated_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

impl ConsentRecord {
    /// Parse one JSON record; the error names the offending field.
    pub fn from_json(bytes: &[u8]) -> Result<ConsentRecord, String> {
        let rec: ConsentRecord = serde_json::from_slice(bytes).map_err(describe_json_error)?;
        rec.validate()?;
        Ok(rec)
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.patient_id.trim().is_empty() {
            return Err("patient_id: must not be empty".into());
        }
        if self.patient_id.len() > 256 {
            return Err("patient_id: longer than 256 characters".into());
        }
        for (i, h) in self.identifiers.email_sha256.iter().enumerate() {
            if identify::parse_sha256_hex(h).is_none() {
                return Err(format!("identifiers.email_sha256[{i}]: not 64 hex digits"));
            }
        }
        for (i, h) in self.identifiers.phone_sha256.iter().enumerate() {
            if identify::parse_sha256_hex(h).is_none() {
                return Err(format!("identifiers.phone_sha256[{i}]: not 64 hex digits"));
            }
        }
        for (i, e) in self.identifiers.emails.iter().enumerate() {
            if identify::normalize_email(e).is_none() {
                return Err(format!("identifiers.emails[{i}]: not an email address"));
            }
        }
        for (i, p) in self.identifiers.phones.iter().enumerate() {
            if identify::normalize_phone(p).is_none() {
                return Err(format!("identifiers.phones[{i}]: not a phone number"));
            }
        }
        Ok(())
    }

    /// The stored form: plaintext emails and phones replaced by their hashes
    /// (every index variant), so no plaintext is kept in memory (SPEC §5).
    pub fn into_stored(mut self) -> ConsentRecord {
        let ids = &mut self.identifiers;
        for e in std::mem::take(&mut ids.emails) {
            for h in identify::email_index_hashes(&e) {
                push_unique(&mut ids.email_sha256, hex::encode(h));
            }
        }
        for p in std::mem::take(&mut ids.phones) {
            for h in identify::phone_index_hashes(&p) {
                push_unique(&mut ids.phone_sha256, hex::encode(h));
            }
        }
        for v in ids
            .email_sha256
            .iter_mut()
            .chain(ids.phone_sha256.iter_mut())
        {
            *v = v.to_ascii_lowercase();
        }
        self
    }

    /// How restrictive a record is, for tie-breaking equal `updated_at`
    /// (more denials and more opt-out flags rank higher).
    pub fn restrictiveness(&self) -> usize {
        let denied = Category::ALL
            .iter()
            .filter(|c| {
                self.categories
                    .get(c)
                    .copied()
                    .unwrap_or(c.shipped_default())
                    == Grant::Denied
            })
            .count();
        let ch = self
            .channels
            .values()
            .filter(|g| **g == Grant::Denied)
            .count();
        denied * 4
            + ch * 4
            + usize::from(self.sale_share_opt_out)
            + usize::from(self.limit_sensitive)
            + usize::from(self.gpc)
    }

    /// Whether `self` should replace `current` (last write wins; a tie goes to
    /// the more restrictive record).
    pub fn supersedes(&self, current: &ConsentRecord) -> bool {
        match self.updated_at.cmp(&current.updated_at) {
            std::cmp::Ordering::Greater => true,
            std::cmp::Ordering::Less => false,
            std::cmp::Ordering::Equal => self.restrictiveness() >= current.restrictiveness(),
        }
    }
}

fn push_unique(v: &mut Vec<String>, s: String) {
    if !v.contains(&s) {
        v.push(s);
    }
}

/// serde_json errors carry the field in their message ("unknown field `x`",
/// "missing field `y`", "unknown variant `z`"); keep that, drop nothing else.
pub fn describe_json_error(e: serde_json::Error) -> String {
    format!("{e}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const REC: &str = r#"{"patient_id":"P-1","identifiers":{"emails":["Jane@Example.com"],"phones":["+14155550100"]},
        "categories":{"advertising":"granted"},"updated_at":"2026-11-20T10:00:00Z"}"#;

    #[test]
    fn stored_form_has_no_plaintext() {
        let r = ConsentRecord::from_json(REC.as_bytes())
            .unwrap()
            .into_stored();
        let s = serde_json::to_string(&r).unwrap();
        assert!(!s.contains("Jane") && !s.contains("jane") && !s.contains("4155550100"));
        assert_eq!(r.identifiers.phone_sha256.len(), 2);
    }

    #[test]
    fn unknown_field_is_named() {
        let e = ConsentRecord::from_json(
            br#"{"patient_id":"P","updated_at":"2026-01-01T00:00:00Z","colour":1}"#,
        )
        .unwrap_err();
        assert!(e.contains("colour"), "{e}");
        let e = ConsentRecord::from_json(br#"{"patient_id":"P","updated_at":"2026-01-01T00:00:00Z","categories":{"advertising":"maybe"}}"#)
            .unwrap_err();
        assert!(e.contains("maybe"), "{e}");
    }

    #[test]
    fn tie_goes_to_more_restrictive() {
        let a = ConsentRecord::from_json(REC.as_bytes()).unwrap();
        let mut b = a.clone();
        b.sale_share_opt_out = true;
        assert!(b.supersedes(&a));
        assert!(!a.supersedes(&b));
    }
}
