//! Identify: the identifiers found in one event, normalised and hashed the way the
//! consent index and the vendors expect (SPEC §5). Plaintext email and phone never
//! leave this module unhashed.
//!
//! Phones are read with libphonenumber's rules (the `phonenumber` crate): a number
//! without a country code is read in `identify.default_region`, so `(415) 555-0100`,
//! `415.555.0100` and `+1 415 555 0100` are one number, +14155550100, on records and
//! in payloads alike.

use phonenumber::country;
use phonenumber::metadata::DATABASE;
use sha2::{Digest, Sha256};
use std::str::FromStr;
use std::sync::OnceLock;

/// One identity key, ready for an index lookup.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum IdKey {
    Patient(Box<str>),
    External(Box<str>),
    /// SHA-256 of a normalised email (or a 64-hex value taken as already hashed).
    EmailHash([u8; 32]),
    /// SHA-256 of a normalised phone (or a 64-hex value taken as already hashed).
    PhoneHash([u8; 32]),
    /// A 32-hex value where an email stands: the MD5 of a normalised email
    /// (Mailchimp's subscriber hash).
    EmailMd5([u8; 16]),
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
    pub(crate) fn is_empty(&self) -> bool {
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
        } else if let Some(h) = parse_md5_hex(v) {
            self.push(IdKey::EmailMd5(h));
        } else if let Some(n) = normalize_email(v) {
            self.push(IdKey::EmailHash(sha256(n.as_bytes())));
        }
    }
    /// A plaintext phone (international, or national in the default region),
    /// or a 64-hex SHA-256.
    pub fn add_phone(&mut self, v: &str) {
        self.add_phone_in(v, default_region());
    }
    /// [`Identifiers::add_phone`] with the region named.
    fn add_phone_in(&mut self, v: &str, region: Region) {
        if let Some(h) = parse_sha256_hex(v) {
            self.push(IdKey::PhoneHash(h));
        } else if let Some(e) = parse_phone(v, region) {
            self.push(IdKey::PhoneHash(sha256(e.digits().as_bytes())));
        }
    }
}

pub(crate) fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

pub(crate) fn md5(data: &[u8]) -> [u8; 16] {
    use md5::Digest as _;
    md5::Md5::digest(data).into()
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(sha256(data))
}

/// `Some` when `v` is exactly 64 hex digits (either case).
pub(crate) fn parse_sha256_hex(v: &str) -> Option<[u8; 32]> {
    let v = v.trim();
    if v.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(v.to_ascii_lowercase(), &mut out).ok()?;
    Some(out)
}

/// `Some` when `v` is exactly 32 hex digits (either case).
pub(crate) fn parse_md5_hex(v: &str) -> Option<[u8; 16]> {
    let v = v.trim();
    if v.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    hex::decode_to_slice(v.to_ascii_lowercase(), &mut out).ok()?;
    Some(out)
}

/// Whether a value already looks hashed (64 hex: SHA-256; 32 hex: MD5).
pub(crate) fn looks_hashed(v: &str) -> bool {
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
pub(crate) fn gmail_variant(normalized: &str) -> Option<String> {
    let (local, domain) = normalized.rsplit_once('@')?;
    if (domain == "gmail.com" || domain == "googlemail.com") && local.contains('.') {
        Some(format!("{}@{}", local.replace('.', ""), domain))
    } else {
        None
    }
}

/// Phone normalisation: the E.164 digits (country code and national number, no
/// `+`), read in the process's default region. `None` when it is not a phone.
pub fn normalize_phone(v: &str) -> Option<String> {
    parse_phone(v, default_region()).map(|e| e.digits().to_string())
}

/// A region whose national phone numbers libphonenumber knows how to read
/// (ISO 3166 alpha-2, `identify.default_region`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Region(country::Id);

impl Region {
    /// The shipped default (SPEC §4).
    pub(crate) const US: Region = Region(country::Id::US);

    /// Two letters naming a region with phone metadata (case-insensitive).
    pub(crate) fn parse(v: &str) -> Result<Region, String> {
        let up = v.trim().to_ascii_uppercase();
        if up.len() != 2 || !up.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(format!(
                "expected an ISO 3166 alpha-2 region code such as US, GB or DE, got {v:?}"
            ));
        }
        match country::Id::from_str(&up) {
            Ok(id) if DATABASE.by_id(up.as_str()).is_some() => Ok(Region(id)),
            _ => Err(format!(
                "{up} is not a region with telephone numbering metadata (ISO 3166 alpha-2, e.g. US, GB, DE)"
            )),
        }
    }

    pub(crate) fn as_str(&self) -> &str {
        self.0.as_ref()
    }
}

impl std::fmt::Display for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The region of the running process. A process-wide setting rather than an
/// argument because the vendor adapters read phones through plain
/// `fn(&str)` hooks (tables, STYLE 6) and because the consent index holds only
/// hashes: every record and payload of one process must be read in one region,
/// so it is fixed once, when the first runtime is built, and changes on restart.
static DEFAULT_REGION: OnceLock<Region> = OnceLock::new();

/// The region national-format phones are read in (US until one is installed).
pub(crate) fn default_region() -> Region {
    DEFAULT_REGION.get().copied().unwrap_or(Region::US)
}

/// Install the process's region. The first call wins; `Err(current)` when a
/// different one is already installed (a reload cannot re-read the records
/// already hashed, so the change waits for a restart).
pub(crate) fn install_default_region(r: Region) -> Result<(), Region> {
    let current = *DEFAULT_REGION.get_or_init(|| r);
    // Load the numbering metadata now rather than on the first request.
    let _ = parse_phone("+14155550100", current);
    if current == r {
        Ok(())
    } else {
        Err(current)
    }
}

/// A phone number in E.164 form: `+`, country code, national number. Its
/// `Debug` does not show the number (it is PHI).
#[derive(Clone, PartialEq, Eq, Hash)]
pub(crate) struct E164 {
    text: String,
    code: u16,
}

impl E164 {
    /// `+` and digits, e.g. `+14155550100` (Google's and TikTok's form).
    pub(crate) fn as_str(&self) -> &str {
        &self.text
    }
    /// The digits without `+`, e.g. `14155550100` (Meta's form, the index's).
    pub(crate) fn digits(&self) -> &str {
        self.text.get(1..).unwrap_or_default()
    }
}

impl std::fmt::Debug for E164 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("E164(..)")
    }
}

/// Longest text read as a phone: a number with punctuation and an extension
/// fits; anything longer is not a phone field (and the parser's cost is bounded).
const MAX_PHONE_TEXT: usize = 64;

/// Read `raw` as a phone number, libphonenumber's way: with a `+` or an
/// international prefix (`00`, or the region's own such as `011`) it carries its
/// country code; otherwise it is read in `region` (a leading national prefix such
/// as the US `1` or the UK `0` is dropped). Punctuation, spaces and an extension
/// (`ext. 12`, `x12`) are ignored. Digits that are not a national number of
/// `region` but are one with a country code in front (`442079460958`: how Meta's
/// `ph` field carries numbers) are read as international. `None` when the
/// result is not a possible number for its country (wrong length, unknown country
/// code, a 7-digit local number without its area code, fewer than 7 or more than
/// 15 digits) or the text is not a phone.
fn parse_phone(raw: &str, region: Region) -> Option<E164> {
    let text = phone_text(raw)?;
    // Number and extension together; the parser's own bounds are checked on
    // the result.
    let digits = text.bytes().filter(u8::is_ascii_digit).count();
    if !(3..=24).contains(&digits) {
        return None;
    }
    plain_nanp(&text, region).or_else(|| parsed(&text, region))
}

/// `text` (see [`phone_text`]) read by libphonenumber.
fn parsed(text: &str, region: Region) -> Option<E164> {
    // The port reads a number's national prefix with the rules of the region it
    // is given, even when the number names another country (`+33 1 …` read in
    // US loses its `1`): a number that carries its country code is therefore
    // parsed without a region, and only national numbers in the region.
    if let Some(intl) = international(text, region) {
        return parse_in(&intl, None);
    }
    let own = DATABASE.by_id(region.as_str()).map(|m| m.country_code());
    if let Some(e) = parse_in(text, Some(region.0)) {
        if Some(e.code) == own {
            return Some(e);
        }
    }
    // Not a national number of the region: the digits may carry a country code
    // without the `+` (or after `00`, the international prefix of most regions).
    let rest = text.trim_start_matches(|c: char| !c.is_ascii_digit());
    let rest = rest.strip_prefix("00").unwrap_or(rest);
    parse_in(&format!("+{rest}"), None)
}

/// A North American number written plainly, read without the parser: `+1`
/// (or, in the US, `1` or nothing), then the area code (its first digit 2-9,
/// perhaps in brackets), the exchange and the line, 3, 3 and 4 digits, with at
/// most one space, dash or dot between the parts. The parser reads no other
/// number in these shapes (no other country code, prefix or extension can be
/// read in them; it gives up on a few odd groupings, `+1216-837-1284`, which
/// this reads); it costs several microseconds a number (its regex
/// cache hashes every pattern it looks up), which was half of loading a
/// million patients. Anything else (`None`) goes to the parser.
fn plain_nanp(text: &str, region: Region) -> Option<E164> {
    let (intl, rest) = match text.strip_prefix('+') {
        Some(r) => (true, r),
        None if region == Region::US => (false, text),
        None => return None,
    };
    let mut t = Nanp(rest.as_bytes());
    let one = t.eat(b'1');
    if intl && !one {
        return None;
    }
    if one {
        t.sep();
    }
    let area = if t.eat(b'(') {
        let a = t.digits(3)?;
        t.eat(b')').then_some(())?;
        if !t.eat(b' ') {
            t.sep();
        }
        a
    } else {
        let a = t.digits(3)?;
        t.sep();
        a
    };
    let exchange = t.digits(3)?;
    t.sep();
    let line = t.digits(4)?;
    if !t.0.is_empty() || !(b'2'..=b'9').contains(&area[0]) {
        return None;
    }
    let mut text = String::with_capacity(12);
    text.push_str("+1");
    for part in [area, exchange, line] {
        text.push_str(std::str::from_utf8(part).ok()?);
    }
    Some(E164 { text, code: 1 })
}

/// A cursor over the bytes of [`plain_nanp`]'s text.
struct Nanp<'a>(&'a [u8]);

impl<'a> Nanp<'a> {
    /// The next `n` bytes, when all are digits.
    fn digits(&mut self, n: usize) -> Option<&'a [u8]> {
        let d = self
            .0
            .get(..n)
            .filter(|d| d.iter().all(u8::is_ascii_digit))?;
        self.0 = &self.0[n..];
        Some(d)
    }
    fn eat(&mut self, b: u8) -> bool {
        let hit = self.0.first() == Some(&b);
        if hit {
            self.0 = &self.0[1..];
        }
        hit
    }
    /// One optional separator: a space, dash or dot.
    fn sep(&mut self) {
        let _ = self.eat(b' ') || self.eat(b'-') || self.eat(b'.');
    }
}

/// The text as `+` and what follows the country code's start, when it carries
/// one: a leading `+`, or the region's international prefix (`011` in the US,
/// `00` in most of the world) followed by a digit other than 0.
fn international(text: &str, region: Region) -> Option<String> {
    if text.starts_with('+') {
        return Some(text.to_string());
    }
    let lead: String = text
        .chars()
        .take_while(|c| c.is_ascii_digit() || matches!(c, ' ' | '\t' | '-' | '.' | '(' | ')' | '/'))
        .filter(char::is_ascii_digit)
        .collect();
    let idd = DATABASE.by_id(region.as_str())?.international_prefix()?;
    let end = idd.find(&lead).filter(|m| m.start() == 0)?.end();
    if end == 0 || !lead[end..].starts_with(|c: char| ('1'..='9').contains(&c)) {
        return None;
    }
    let mut seen = 0;
    for (i, c) in text.char_indices() {
        if c.is_ascii_digit() {
            seen += 1;
            if seen == end {
                return Some(format!("+{}", &text[i + 1..]));
            }
        }
    }
    None
}

/// The text as handed to the parser: trimmed, `whatsapp:` / `tel:` dropped,
/// typographic dashes and spaces made ASCII. `None` for anything else that is
/// not ASCII, or carries characters no written phone number has: the parser is
/// never given RFC 3966 parameters (`;`, `=`), the inputs of its past panics.
fn phone_text(raw: &str) -> Option<String> {
    let t = raw.trim();
    if t.len() > MAX_PHONE_TEXT {
        return None;
    }
    let t = t.strip_prefix("whatsapp:").unwrap_or(t);
    let t = t.strip_prefix("tel:").unwrap_or(t);
    let mut out = String::with_capacity(t.len());
    for c in t.chars() {
        let c = match c {
            '\u{2010}'..='\u{2015}' | '\u{2212}' | '\u{FE63}' | '\u{FF0D}' => '-',
            '\u{00A0}' | '\u{2007}' | '\u{2009}' | '\u{202F}' | '\u{3000}' => ' ',
            c => c,
        };
        let ok = c.is_ascii_alphanumeric()
            || matches!(
                c,
                ' ' | '\t' | '+' | '-' | '.' | '(' | ')' | '/' | '#' | ','
            );
        if !ok {
            return None;
        }
        out.push(c);
    }
    Some(out)
}

/// Per country code, the national-number lengths of its numbers of any type (a
/// bit per length), from its main country for a code shared by several regions
/// (+1, +44, +7): the lengths of minor members (Canada's 7-digit service
/// numbers) would make a local number without its area code look whole. The
/// crate leaves the general descriptors' lengths empty, so they are gathered
/// from the type descriptors, once.
fn possible_lengths(code: u16) -> Option<u32> {
    static LENGTHS: OnceLock<std::collections::HashMap<u16, u32>> = OnceLock::new();
    LENGTHS
        .get_or_init(|| {
            let mut out = std::collections::HashMap::new();
            for m in DATABASE.iter() {
                let code = m.country_code();
                let metas = DATABASE.by_code(&code).unwrap_or_default();
                let main = metas
                    .iter()
                    .find(|x| x.is_main_country_for_code())
                    .or_else(|| metas.first());
                if main.is_none_or(|x| x.id() != m.id()) {
                    continue;
                }
                let d = m.descriptors();
                let types = [
                    Some(d.general()),
                    d.fixed_line(),
                    d.mobile(),
                    d.toll_free(),
                    d.premium_rate(),
                    d.shared_cost(),
                    d.personal_number(),
                    d.voip(),
                    d.pager(),
                    d.uan(),
                    d.voicemail(),
                ];
                let lengths = types
                    .into_iter()
                    .flatten()
                    .flat_map(|t| t.possible_length())
                    .filter(|l| **l < 32)
                    .fold(0u32, |acc, l| acc | 1 << l);
                out.insert(code, lengths);
            }
            out
        })
        .get(&code)
        .copied()
}

/// `+` code national, when the national number has a possible length.
fn e164_if_possible(code: u16, national: &str) -> Option<E164> {
    let lengths = possible_lengths(code)?;
    if national.len() >= 32 || lengths & (1 << national.len()) == 0 {
        return None;
    }
    let e = E164 {
        text: format!("+{code}{national}"),
        code,
    };
    // E.164 allows 15 digits; fewer than 7 were never taken as a phone here.
    (7..=15).contains(&e.digits().len()).then_some(e)
}

/// The parser, guarded: it has had panics on crafted input (fixed upstream,
/// and `phone_text` keeps their inputs out); one more would cost this value
/// its status as a phone, never the request.
fn guarded_parse(region: Option<country::Id>, text: &str) -> Option<phonenumber::PhoneNumber> {
    std::panic::catch_unwind(|| phonenumber::parse(region, text))
        .ok()?
        .ok()
}

/// One libphonenumber parse, kept only when its national number has a possible
/// length for its country (the national prefix written after a country code,
/// `+44 (0)20 …`, is dropped by the parser when it is given no region).
fn parse_in(text: &str, region: Option<country::Id>) -> Option<E164> {
    let n = guarded_parse(region, text)?;
    let code = n.code().value();
    e164_if_possible(code, &n.national().to_string())
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
pub(crate) fn phone_index_hashes(raw: &str) -> Vec<[u8; 32]> {
    phone_index_hashes_in(raw, default_region())
}

/// [`phone_index_hashes`] with the region named.
fn phone_index_hashes_in(raw: &str, region: Region) -> Vec<[u8; 32]> {
    let Some(e) = parse_phone(raw, region) else {
        return Vec::new();
    };
    vec![sha256(e.digits().as_bytes()), sha256(e.as_str().as_bytes())]
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
    match parse_phone(v, default_region()) {
        Some(e) => sha256_hex(e.digits().as_bytes()),
        None => sha256_hex(v.trim().as_bytes()),
    }
}

/// Hash a plaintext phone in E.164 form, `+` and digits (Google, TikTok).
pub(crate) fn hash_phone_e164_for_vendor(v: &str) -> String {
    if looks_hashed(v) {
        return v.trim().to_ascii_lowercase();
    }
    match parse_phone(v, default_region()) {
        Some(e) => sha256_hex(e.as_str().as_bytes()),
        None => sha256_hex(v.trim().as_bytes()),
    }
}

/// Percent-decode a URL path segment (`%40` → `@`; `+` stays `+`). Invalid
/// escapes are kept as they are; invalid UTF-8 is replaced.
pub(crate) fn percent_decode(s: &str) -> String {
    fn hex(c: u8) -> Option<u8> {
        (c as char).to_digit(16).map(|d| d as u8)
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            if let (Some(h), Some(l)) = (
                b.get(i + 1).copied().and_then(hex),
                b.get(i + 2).copied().and_then(hex),
            ) {
                out.push(h * 16 + l);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
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
        assert_eq!(phone_index_hashes("(415) 555-0100"), h);
        assert_eq!(
            hash_phone_e164_for_vendor("415-555-0100 ext"),
            sha256_hex(b"+14155550100")
        );
        assert_eq!(
            hash_phone_digits_for_vendor("(415) 555-0100"),
            sha256_hex(b"14155550100")
        );
        // Not a phone: hashed as written, as before.
        assert_eq!(hash_phone_digits_for_vendor(" n/a "), sha256_hex(b"n/a"));
    }

    fn e164(raw: &str, region: &str) -> Option<String> {
        parse_phone(raw, Region::parse(region).unwrap()).map(|e| e.as_str().to_string())
    }

    #[test]
    fn national_forms_are_read_in_the_region() {
        for raw in [
            "(415) 555-0100",
            "415-555-0100",
            "415.555.0100",
            "415 555 0100",
            "4155550100",
            "1-415-555-0100",
            "1 (415) 555-0100",
            "14155550100",
            "+1 415 555 0100",
            "+1-415-555-0100",
            "+14155550100",
            " +1 (415) 555-0100 ",
            "415-555-0100 ext. 12",
            "415-555-0100 x12",
            "(415) 555-0100 #12",
            "0014155550100",
            "011 1 415 555 0100",
            "whatsapp:+14155550100",
            "tel:+1-415-555-0100",
            "415\u{2011}555\u{2011}0100",
            "415\u{00A0}555\u{00A0}0100",
        ] {
            assert_eq!(e164(raw, "US").as_deref(), Some("+14155550100"), "{raw:?}");
        }
        // Numbers that are possible but not assigned still count: the records
        // and payloads of one deployment agree either way.
        assert_eq!(e164("415-000-0001", "us").as_deref(), Some("+14150000001"));
        assert_eq!(
            e164("+1 555 555 0199", "US").as_deref(),
            Some("+15555550199")
        );
    }

    #[test]
    fn other_countries_with_and_without_a_region() {
        let london = Some("+442079460958");
        for raw in [
            "+44 20 7946 0958",
            "+44 (0)20 7946 0958",
            "0044 20 7946 0958",
            "011 44 20 7946 0958",
            // Digits with the country code, no `+` (Meta's `ph` form).
            "442079460958",
        ] {
            assert_eq!(e164(raw, "US").as_deref(), london, "{raw:?}");
        }
        assert_eq!(e164("020 7946 0958", "GB").as_deref(), london);
        assert_eq!(e164("07700 900123", "GB").as_deref(), Some("+447700900123"));
        assert_eq!(
            e164("+1 415 555 0100", "GB").as_deref(),
            Some("+14155550100")
        );
        assert_eq!(e164("14155550100", "GB").as_deref(), Some("+14155550100"));
        assert_eq!(e164("030 123456", "DE").as_deref(), Some("+4930123456"));
        assert_eq!(
            e164("01 42 68 53 00", "FR").as_deref(),
            Some("+33142685300")
        );
        assert_eq!(
            e164("+33 1 42 68 53 00", "US").as_deref(),
            Some("+33142685300")
        );
        assert_eq!(e164("02 1234 5678", "AU").as_deref(), Some("+61212345678"));
        assert_eq!(
            e164("+33 (0)1 42 68 53 00", "US").as_deref(),
            Some("+33142685300")
        );
        assert_eq!(
            e164("011 33 1 42 68 53 00", "US").as_deref(),
            Some("+33142685300")
        );
        assert_eq!(
            e164("00 33 1 42 68 53 00", "GB").as_deref(),
            Some("+33142685300")
        );
        // Italy keeps its leading 0 after the country code.
        assert_eq!(
            e164("+39 06 1234 5678", "US").as_deref(),
            Some("+390612345678")
        );
        assert_eq!(e164("06 1234 5678", "IT").as_deref(), Some("+390612345678"));
        // A UK national number is not a US one.
        assert_eq!(e164("020 7946 0958", "US"), None);
    }

    #[test]
    fn plain_north_american_numbers_read_as_the_parser_reads_them() {
        // Every shape the shortcut takes, and its neighbours it must leave to
        // the parser, give what the parser alone gives.
        let seps = ["", " ", "-", ".", "(", ")", "  ", "\t"];
        let mut rng = 0x2545f4914f6cdd1du64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut taken = 0;
        for _ in 0..20_000 {
            let len = 8 + (next() % 6) as usize;
            let mut digits: String = (0..len)
                .map(|_| char::from(b'0' + (next() % 10) as u8))
                .collect();
            if next() % 2 == 0 {
                digits.replace_range(0..1, "1");
            }
            let mut t = String::new();
            if next() % 3 == 0 {
                t.push('+');
            }
            for (i, c) in digits.chars().enumerate() {
                if i > 0 && next() % 3 == 0 {
                    t.push_str(seps[(next() % seps.len() as u64) as usize]);
                }
                t.push(c);
            }
            for region in [Region::US, Region::parse("GB").unwrap()] {
                let fast = plain_nanp(&t, region);
                if fast.is_some() {
                    taken += 1;
                }
                let slow = parsed(&phone_text(&t).unwrap(), region);
                // Never another number than the parser's. (The parser gives
                // up on a few groupings, `+1216-837-1284`; the shortcut reads
                // them, a phone more recognised, never one misread.)
                if let (Some(f), Some(sl)) = (&fast, &slow) {
                    assert_eq!(f, sl, "{t:?} in {region}");
                }
            }
        }
        assert!(taken > 100, "the shortcut took only {taken}");
        // The common written forms, each taken and each as the parser reads it.
        for _ in 0..2_000 {
            let ten: String = (0..10)
                .map(|i| {
                    let lo = if i == 0 || i == 3 { 2 } else { 0 };
                    char::from(b'0' + lo + (next() % (10 - lo as u64)) as u8)
                })
                .collect();
            let (a, b, c) = (&ten[..3], &ten[3..6], &ten[6..]);
            for t in [
                format!("({a}) {b}-{c}"),
                format!("+1 ({a}) {b}-{c}"),
                format!("1 ({a}) {b} {c}"),
                format!("{a}.{b}.{c}"),
                format!("+1-{a}-{b}-{c}"),
                format!("1{ten}"),
                ten.clone(),
            ] {
                let fast = plain_nanp(&t, Region::US);
                assert!(fast.is_some(), "{t:?} not taken");
                assert_eq!(fast, parsed(&t, Region::US), "{t:?}");
            }
        }
        assert_eq!(
            normalize_phone("(415) 555-0100").as_deref(),
            Some("14155550100")
        );
        assert_eq!(
            normalize_phone("+1 415.555.0100").as_deref(),
            Some("14155550100")
        );
        assert_eq!(
            normalize_phone("1-415-555-0100").as_deref(),
            Some("14155550100")
        );
    }

    #[test]
    fn not_phones() {
        for raw in [
            "",
            "   ",
            "555-0100",
            "12345",
            "+1",
            "+999 123 4567",
            "not a phone",
            "jane@example.com",
            "415-555-0100; DROP TABLE",
            "+1 415 555 0100 0100 0100 0100 0100",
            "tel:+1;phone-context=\u{e9}",
            ".;phone-context=",
            "+dwPAA;phone-context=AA",
            "\u{1F4A9}4155550100",
            &"4".repeat(65),
        ] {
            assert_eq!(e164(raw, "US"), None, "{raw:?}");
            assert!(normalize_phone(raw).is_none(), "{raw:?}");
            let mut ids = Identifiers::new();
            ids.add_phone(raw);
            assert!(ids.is_empty(), "{raw:?}");
        }
    }

    #[test]
    fn arbitrary_text_never_panics() {
        use rand::{Rng, SeedableRng};
        let alphabet: Vec<char> = "0123456789+-.() /#,;=extTEL:wasp\u{e9}\u{2011}\u{1F4A9}"
            .chars()
            .collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(17);
        for _ in 0..20_000 {
            let n = rng.gen_range(0..30);
            let s: String = (0..n)
                .map(|_| alphabet[rng.gen_range(0..alphabet.len())])
                .collect();
            for r in ["US", "GB", "NZ", "DE"] {
                let _ = e164(&s, r);
            }
        }
    }

    #[test]
    fn regions() {
        assert_eq!(Region::parse("US").unwrap(), Region::US);
        assert_eq!(Region::parse("gb").unwrap().as_str(), "GB");
        for bad in ["USA", "", "U1", "ZZ", "\u{e9}\u{e9}"] {
            assert!(Region::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(default_region(), Region::US);
        let e = parse_phone("+14155550100", Region::US).unwrap();
        assert_eq!(e.digits(), "14155550100");
        assert!(!format!("{e:?}").contains("4155550100"));
    }

    #[test]
    fn add_phone_in_a_region() {
        let mut gb = Identifiers::new();
        gb.add_phone_in("020 7946 0958", Region::parse("GB").unwrap());
        let mut intl = Identifiers::new();
        intl.add_phone("+44 20 7946 0958");
        assert_eq!(gb, intl);
        assert!(!gb.is_empty());
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
