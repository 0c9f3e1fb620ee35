//! The consent record (SPEC §5). Strict: unknown fields and bad values are errors
//! that name the field.

use crate::identify;
use crate::model::{Category, Channel, Grant};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;

/// A digest of `N` bytes, held raw and written as `2N` lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HexDigest<const N: usize>(pub [u8; N]);

/// A SHA-256 digest (64 hex digits).
pub type Sha256Hex = HexDigest<32>;
/// An MD5 digest (32 hex digits): Mailchimp's subscriber hash of an email.
pub type Md5Hex = HexDigest<16>;

impl<const N: usize> HexDigest<N> {
    /// `Some` when `v` is exactly `2N` hex digits (either case).
    pub(crate) fn parse(v: &str) -> Option<HexDigest<N>> {
        let v = v.trim();
        if v.len() != 2 * N {
            return None;
        }
        let mut out = [0u8; N];
        hex::decode_to_slice(v.to_ascii_lowercase(), &mut out).ok()?;
        Some(HexDigest(out))
    }
    fn to_hex(self) -> String {
        hex::encode(self.0)
    }
}

impl<const N: usize> std::fmt::Debug for HexDigest<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl<const N: usize> Serialize for HexDigest<N> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de, const N: usize> Deserialize<'de> for HexDigest<N> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        HexDigest::parse(&s)
            .ok_or_else(|| serde::de::Error::custom(format!("not {} hex digits", 2 * N)))
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordIdentifiers {
    /// Plaintext, accepted on input only: replaced by `email_sha256` when stored.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub emails: Vec<String>,
    /// Plaintext, accepted on input only: replaced by `phone_sha256` when stored.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub phones: Vec<String>,
    #[serde(default)]
    pub external_ids: Vec<String>,
    #[serde(default)]
    pub email_sha256: Vec<Sha256Hex>,
    #[serde(default)]
    pub phone_sha256: Vec<Sha256Hex>,
    /// MD5 of each normalised email (Mailchimp's subscriber hash), so a 32-hex
    /// value in a payload is matched too (SPEC §5). Filled from plaintext
    /// emails when stored; a source may also give it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub email_md5: Vec<Md5Hex>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsentRecord {
    pub patient_id: String,
    #[serde(default)]
    pub identifiers: RecordIdentifiers,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jurisdiction: Option<Arc<str>>,
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
    pub source: Option<Arc<str>>,
    /// Assigned by the consent source, never by the writer of the record: it
    /// changes on every admin-API write (SPEC §8) and is the API's `ETag`.
    /// 0: never written through the API (a record only in `consent.file`).
    #[serde(default)]
    pub version: u64,
}

/// A record that does not parse or validate: the field (a dotted path) and
/// what is wrong with it. Never carries the offending value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct FieldError {
    pub(crate) field: String,
    pub(crate) detail: String,
}

impl FieldError {
    pub(crate) fn new(field: impl Into<String>, detail: impl Into<String>) -> FieldError {
        FieldError {
            field: field.into(),
            detail: detail.into(),
        }
    }
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.detail)
    }
}

impl std::error::Error for FieldError {}

impl ConsentRecord {
    /// Parse one JSON record; the error names the offending field (never its value).
    #[cfg(test)]
    pub(crate) fn from_json(bytes: &[u8]) -> Result<ConsentRecord, String> {
        Self::parse_json(bytes, None).map_err(|e| e.to_string())
    }

    /// Parse one JSON record strictly. `default_updated_at` fills a missing
    /// `updated_at` (the admin API uses "now"); without it the field is required.
    pub(crate) fn parse_json(
        bytes: &[u8],
        default_updated_at: Option<DateTime<Utc>>,
    ) -> Result<ConsentRecord, FieldError> {
        let v: serde_json::Value = serde_json::from_slice(bytes).map_err(json_syntax_error)?;
        Self::from_value(&v, default_updated_at)
    }

    /// Build a record from parsed JSON, walking every field so that an error
    /// names the field path (`categories.advertising`, `identifiers.emails[0]`).
    pub(crate) fn from_value(
        v: &serde_json::Value,
        default_updated_at: Option<DateTime<Utc>>,
    ) -> Result<ConsentRecord, FieldError> {
        let obj = v
            .as_object()
            .ok_or_else(|| FieldError::new("(record)", "expected a JSON object"))?;
        let mut patient_id = None;
        let mut identifiers = RecordIdentifiers::default();
        let mut jurisdiction = None;
        let mut categories = BTreeMap::new();
        let mut channels = BTreeMap::new();
        let (mut sso, mut ls, mut gpc) = (false, false, false);
        let mut updated_at = None;
        let mut source = None;
        let mut version = 0;
        for (k, val) in obj {
            match k.as_str() {
                "patient_id" => patient_id = Some(req_str(k, val)?.to_string()),
                "identifiers" => identifiers = parse_identifiers(val)?,
                "jurisdiction" => jurisdiction = opt_str(k, val)?.map(Arc::from),
                "categories" => categories = parse_grants(k, val, Category::parse, "category")?,
                "channels" => channels = parse_grants(k, val, Channel::parse, "channel")?,
                "sale_share_opt_out" => sso = req_bool(k, val)?,
                "limit_sensitive" => ls = req_bool(k, val)?,
                "gpc" => gpc = req_bool(k, val)?,
                "updated_at" => {
                    let s = req_str(k, val)?;
                    let t = DateTime::parse_from_rfc3339(s).map_err(|_| {
                        FieldError::new(
                            k,
                            "expected an RFC 3339 timestamp, e.g. 2026-11-20T10:00:00Z",
                        )
                    })?;
                    updated_at = Some(t.with_timezone(&Utc));
                }
                "source" => source = opt_str(k, val)?.map(Arc::from),
                "version" => {
                    version = val
                        .as_u64()
                        .ok_or_else(|| FieldError::new(k, "expected a non-negative integer"))?
                }
                other => return Err(FieldError::new(field_name(other), "unknown field")),
            }
        }
        let patient_id =
            patient_id.ok_or_else(|| FieldError::new("patient_id", "missing field"))?;
        let updated_at = updated_at
            .or(default_updated_at)
            .ok_or_else(|| FieldError::new("updated_at", "missing field"))?;
        let rec = ConsentRecord {
            patient_id,
            identifiers,
            jurisdiction,
            categories,
            channels,
            sale_share_opt_out: sso,
            limit_sensitive: ls,
            gpc,
            updated_at,
            source,
            version,
        };
        rec.check()?;
        Ok(rec)
    }

    /// Semantic checks beyond the JSON shape.
    pub(crate) fn check(&self) -> Result<(), FieldError> {
        if self.patient_id.trim().is_empty() {
            return Err(FieldError::new("patient_id", "must not be empty"));
        }
        if self.patient_id.len() > 256 {
            return Err(FieldError::new("patient_id", "longer than 256 characters"));
        }
        if self.patient_id.chars().any(char::is_control) {
            return Err(FieldError::new(
                "patient_id",
                "control characters not allowed",
            ));
        }
        for (i, e) in self.identifiers.emails.iter().enumerate() {
            if identify::normalize_email(e).is_none() {
                return Err(FieldError::new(
                    format!("identifiers.emails[{i}]"),
                    "not an email address",
                ));
            }
        }
        for (i, p) in self.identifiers.phones.iter().enumerate() {
            if identify::normalize_phone(p).is_none() {
                return Err(FieldError::new(
                    format!("identifiers.phones[{i}]"),
                    format!(
                        "not a phone number (international with +, or national in identify.default_region {})",
                        identify::default_region()
                    ),
                ));
            }
        }
        for (i, x) in self.identifiers.external_ids.iter().enumerate() {
            if x.trim().is_empty() {
                return Err(FieldError::new(
                    format!("identifiers.external_ids[{i}]"),
                    "must not be empty",
                ));
            }
        }
        Ok(())
    }

    /// The stored form: plaintext emails and phones replaced by their hashes
    /// (every index variant), so no plaintext is kept in memory (SPEC §5). A
    /// phone is read in `identify.default_region` and hashed in E.164 form, so
    /// `(415) 555-0100` and `+14155550100` are stored alike.
    pub(crate) fn into_stored(mut self) -> ConsentRecord {
        let ids = &mut self.identifiers;
        for e in std::mem::take(&mut ids.emails) {
            for h in identify::email_index_hashes(&e) {
                push_unique(&mut ids.email_sha256, HexDigest(h));
            }
            if let Some(n) = identify::normalize_email(&e) {
                push_unique(&mut ids.email_md5, HexDigest(identify::md5(n.as_bytes())));
            }
        }
        for p in std::mem::take(&mut ids.phones) {
            for h in identify::phone_index_hashes(&p) {
                push_unique(&mut ids.phone_sha256, HexDigest(h));
            }
        }
        ids.emails.shrink_to_fit();
        ids.phones.shrink_to_fit();
        ids.email_sha256.shrink_to_fit();
        ids.phone_sha256.shrink_to_fit();
        ids.email_md5.shrink_to_fit();
        ids.external_ids.shrink_to_fit();
        self.patient_id.shrink_to_fit();
        self
    }

    /// Whether the record holds no plaintext email or phone.
    #[cfg(test)]
    pub(crate) fn is_stored_form(&self) -> bool {
        self.identifiers.emails.is_empty() && self.identifiers.phones.is_empty()
    }

    /// How restrictive a record is, for tie-breaking equal `updated_at`
    /// (more denials and more opt-out flags rank higher).
    pub(crate) fn restrictiveness(&self) -> usize {
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
    pub(crate) fn supersedes(&self, current: &ConsentRecord) -> bool {
        match self.updated_at.cmp(&current.updated_at) {
            std::cmp::Ordering::Greater => true,
            std::cmp::Ordering::Less => false,
            std::cmp::Ordering::Equal => self.restrictiveness() >= current.restrictiveness(),
        }
    }
}

fn push_unique<T: PartialEq>(v: &mut Vec<T>, s: T) {
    if !v.contains(&s) {
        v.push(s);
    }
}

/// A JSON syntax error: position only, never the text around it.
fn json_syntax_error(e: serde_json::Error) -> FieldError {
    FieldError::new(
        "(json)",
        format!("invalid JSON at line {} column {}", e.line(), e.column()),
    )
}

/// serde_json errors may quote input values ("unknown variant `x`"); keep only
/// the category of the problem and its position.
pub(crate) fn describe_json_error(e: serde_json::Error) -> String {
    json_syntax_error(e).to_string()
}

/// An unknown key is named when it looks like a field name; anything else
/// (it could be data pasted into the wrong place) is not repeated.
fn field_name(k: &str) -> String {
    let plain = !k.is_empty()
        && k.len() <= 64
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if plain {
        k.to_string()
    } else {
        "(unnamed field)".to_string()
    }
}

fn type_name(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

fn req_str<'v>(field: &str, v: &'v serde_json::Value) -> Result<&'v str, FieldError> {
    v.as_str()
        .ok_or_else(|| FieldError::new(field, format!("expected a string, got {}", type_name(v))))
}

fn opt_str<'v>(field: &str, v: &'v serde_json::Value) -> Result<Option<&'v str>, FieldError> {
    if v.is_null() {
        return Ok(None);
    }
    req_str(field, v).map(Some)
}

fn req_bool(field: &str, v: &serde_json::Value) -> Result<bool, FieldError> {
    v.as_bool().ok_or_else(|| {
        FieldError::new(
            field,
            format!("expected true or false, got {}", type_name(v)),
        )
    })
}

fn parse_grants<K: Ord>(
    field: &str,
    v: &serde_json::Value,
    parse_key: impl Fn(&str) -> Option<K>,
    what: &str,
) -> Result<BTreeMap<K, Grant>, FieldError> {
    let obj = v.as_object().ok_or_else(|| {
        FieldError::new(field, format!("expected an object, got {}", type_name(v)))
    })?;
    let mut out = BTreeMap::new();
    for (k, g) in obj {
        let path = format!("{field}.{}", field_name(k));
        let key = parse_key(k).ok_or_else(|| FieldError::new(&path, format!("unknown {what}")))?;
        let grant = match g.as_str() {
            Some("granted") => Grant::Granted,
            Some("denied") => Grant::Denied,
            _ => return Err(FieldError::new(&path, "expected \"granted\" or \"denied\"")),
        };
        out.insert(key, grant);
    }
    Ok(out)
}

fn str_list<'v>(field: &str, v: &'v serde_json::Value) -> Result<Vec<&'v str>, FieldError> {
    let arr = v.as_array().ok_or_else(|| {
        FieldError::new(
            field,
            format!("expected an array of strings, got {}", type_name(v)),
        )
    })?;
    arr.iter()
        .enumerate()
        .map(|(i, x)| req_str(&format!("{field}[{i}]"), x))
        .collect()
}

fn hash_list<const N: usize>(
    field: &str,
    v: &serde_json::Value,
) -> Result<Vec<HexDigest<N>>, FieldError> {
    let mut out = Vec::new();
    for (i, s) in str_list(field, v)?.into_iter().enumerate() {
        let h = HexDigest::parse(s).ok_or_else(|| {
            FieldError::new(format!("{field}[{i}]"), format!("not {} hex digits", 2 * N))
        })?;
        push_unique(&mut out, h);
    }
    Ok(out)
}

fn parse_identifiers(v: &serde_json::Value) -> Result<RecordIdentifiers, FieldError> {
    let obj = v.as_object().ok_or_else(|| {
        FieldError::new(
            "identifiers",
            format!("expected an object, got {}", type_name(v)),
        )
    })?;
    let mut ids = RecordIdentifiers::default();
    for (k, val) in obj {
        let path = format!("identifiers.{}", field_name(k));
        let owned = |l: Vec<&str>| l.into_iter().map(str::to_string).collect::<Vec<_>>();
        match k.as_str() {
            "emails" => ids.emails = owned(str_list(&path, val)?),
            "phones" => ids.phones = owned(str_list(&path, val)?),
            "external_ids" => {
                ids.external_ids = Vec::new();
                for x in str_list(&path, val)? {
                    push_unique(&mut ids.external_ids, x.trim().to_string());
                }
            }
            "email_sha256" => ids.email_sha256 = hash_list(&path, val)?,
            "phone_sha256" => ids.phone_sha256 = hash_list(&path, val)?,
            "email_md5" => ids.email_md5 = hash_list(&path, val)?,
            _ => return Err(FieldError::new(path, "unknown field")),
        }
    }
    Ok(ids)
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
    fn national_and_international_phones_are_stored_alike() {
        let stored = |phone: &str| {
            let j = format!(
                r#"{{"patient_id":"P","identifiers":{{"phones":["{phone}"]}},"updated_at":"2026-11-20T10:00:00Z"}}"#
            );
            ConsentRecord::from_json(j.as_bytes())
                .unwrap()
                .into_stored()
                .identifiers
                .phone_sha256
        };
        let e164 = stored("+14155550100");
        for p in [
            "(415) 555-0100",
            "415-555-0100",
            "1.415.555.0100",
            "415 555 0100 ext. 9",
        ] {
            assert_eq!(stored(p), e164, "{p}");
        }
        assert!(e164.contains(&HexDigest(identify::sha256(b"14155550100"))));
        assert!(e164.contains(&HexDigest(identify::sha256(b"+14155550100"))));
        let e = ConsentRecord::from_json(
            br#"{"patient_id":"P","identifiers":{"phones":["555-0100"]},"updated_at":"2026-11-20T10:00:00Z"}"#,
        )
        .unwrap_err();
        assert!(
            e.starts_with("identifiers.phones[0]: not a phone number"),
            "{e}"
        );
        assert!(!e.contains("555"), "{e}");
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
        assert!(e.contains("categories.advertising"), "{e}");
        assert!(!e.contains("maybe"), "{e}");
    }

    #[test]
    fn odd_keys_are_not_repeated() {
        let e = ConsentRecord::from_json(
            br#"{"patient_id":"P","updated_at":"2026-01-01T00:00:00Z","jane@example.com":1}"#,
        )
        .unwrap_err();
        assert!(!e.contains("jane") && e.contains("unknown field"), "{e}");
        let e = ConsentRecord::from_json(br#"{"patient_id":"P","updated_at":"2026-01-01T00:00:00Z","categories":{"+14155550100":"denied"}}"#)
            .unwrap_err();
        assert!(
            !e.contains("4155550100") && e.contains("categories."),
            "{e}"
        );
        let e = ConsentRecord::from_json(br#"{"patient_id":"P","updated_at":"2026-01-01T00:00:00Z","identifiers":{"phone_sha256":["abc"]}}"#)
            .unwrap_err();
        assert_eq!(e, "identifiers.phone_sha256[0]: not 64 hex digits");
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
