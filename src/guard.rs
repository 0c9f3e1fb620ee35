//! The egress guard (SPEC §6, "Everything that leaves is inspected"): consent is
//! decided on what the vendor will read, not on the fields an adapter expects.
//!
//! After the adapter has decided and rewritten every event, the guard reads every
//! string the vendor would receive and looks for identifiers: email addresses,
//! phone numbers, 64- and 32-hex digests, and tokens that are patient or external
//! ids of the consent index. Each is looked up:
//!
//! - A kept event carrying an identifier of a patient other than one this request
//!   may send for (a dropped, denied, stale or tagged patient; on a messaging
//!   destination anyone but the kept recipients) is dropped (`foreign_identifier`).
//! - A match outside every event (the rest of the body, the query, a header)
//!   refuses the request (451 `foreign_identifier`).
//! - On ad platforms and analytics an email or phone that names no patient and
//!   stands outside the identity fields is removed (`fields_stripped`).
//!
//! The scan is pure: it reads strings, and the store is only asked who an
//! identifier names. What it finds is recorded as [`Intervention`]s for the audit,
//! the metric and `explain`.

use crate::consent::ConsentStore;
use crate::identify::{self, Identifiers};
use serde_json::Value;
use std::borrow::Cow;

/// One identifier found in a string.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Found {
    /// A normalised email address.
    Email(String),
    /// A phone number; `formatted` when written with a `+` or separators (a bare
    /// digit run could as well be an id or a timestamp).
    Phone { digits: String, formatted: bool },
    /// 64 hex digits: a SHA-256 of an email or phone.
    Sha256([u8; 32]),
    /// 32 hex digits: an MD5 of an email (Mailchimp's subscriber hash).
    Md5(String),
    /// A token that may be a patient or external id.
    Token(String),
}

impl Found {
    /// An email or phone, the kinds that are removed when they name nobody.
    fn is_contact(&self) -> bool {
        matches!(
            self,
            Found::Email(_)
                | Found::Phone {
                    formatted: true,
                    ..
                }
        )
    }

    fn identifiers(&self) -> Identifiers {
        let mut ids = Identifiers::new();
        match self {
            Found::Email(e) => ids.add_email(e),
            Found::Phone { digits, .. } => ids.add_phone(digits),
            Found::Sha256(h) => {
                let hex = hex::encode(h);
                ids.add_email(&hex);
                ids.add_phone(&hex);
            }
            Found::Md5(h) => ids.add_email(h),
            Found::Token(t) => {
                ids.add_patient(t);
                ids.add_external(t);
            }
        }
        ids
    }
}

/// Shortest token looked up as a patient or external id: shorter ones are
/// words and numbers, and an index id that short would match everything.
const MIN_TOKEN: usize = 4;
/// Longest token looked up (an id is short; a long run is text or a digest).
const MAX_TOKEN: usize = 128;
/// Most tokens looked up in one string (a long text is still bounded).
const MAX_TOKENS: usize = 4096;

/// Every identifier in `s`, in order. A string with percent escapes is also
/// read decoded (an address hidden as `jane%40example.com` in a URL).
pub(crate) fn scan_text(s: &str, out: &mut Vec<Found>) {
    scan_plain(s, out);
    if s.contains('%') {
        let decoded = crate::identify::percent_decode(s);
        if decoded != s {
            scan_plain(&decoded, out);
        }
    }
}

fn scan_plain(s: &str, out: &mut Vec<Found>) {
    emails(s, out);
    // Phones, digests and ids all hold a digit (a 32- or 64-hex digest without
    // one is not a digest of anything real): most strings have none.
    if !s.bytes().any(|b| b.is_ascii_digit()) {
        return;
    }
    phones(s, out);
    hex_runs(s, out);
    tokens(s, out);
}

/// The ASCII characters an id is written with: letters, digits and `-_.:+@~`.
/// Everything else separates tokens (control characters, `%`, quotes,
/// brackets, other punctuation): an id glued to any of them is still read.
/// A table: this runs on every character the vendor would receive.
const TOKEN_CHARS: [bool; 128] = {
    let mut t = [false; 128];
    let mut i = 0;
    while i < 128 {
        let c = i as u8;
        t[i] = c.is_ascii_alphanumeric();
        i += 1;
    }
    let extra = b"-_.:+@~";
    let mut i = 0;
    while i < extra.len() {
        t[extra[i] as usize] = true;
        i += 1;
    }
    t
};

fn is_token_separator(c: char) -> bool {
    match c.is_ascii() {
        true => !TOKEN_CHARS[c as usize],
        false => !c.is_alphanumeric(),
    }
}

/// The local part's characters as addresses are written in practice (RFC 5322
/// allows more, but `=`, `?`, `&`, `/` and `#` around an `@` are URL syntax).
fn is_local(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"._%+-'".contains(&c)
}

fn is_domain(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'.' || c == b'-'
}

/// `local@domain.tld` around every `@`.
fn emails(s: &str, out: &mut Vec<Found>) {
    let b = s.as_bytes();
    for (at, _) in s.match_indices('@') {
        let mut start = at;
        while start > 0 && is_local(b[start - 1]) {
            start -= 1;
        }
        let mut end = at + 1;
        while end < b.len() && is_domain(b[end]) {
            end += 1;
        }
        let local = &s[start..at];
        let mut domain = s[at + 1..end].trim_end_matches(['.', '-']);
        let tld_ok = |d: &str| {
            d.rsplit_once('.').is_some_and(|(_, tld)| {
                tld.len() >= 2 && tld.bytes().all(|c| c.is_ascii_alphabetic())
            })
        };
        // `jane@example.com.n3`: labels after the address that no address ends
        // with are text glued to it, not part of it.
        while !tld_ok(domain) {
            match domain.rsplit_once('.') {
                Some((head, _)) => domain = head,
                None => break,
            }
        }
        if !local.is_empty() && tld_ok(domain) {
            out.push(Found::Email(format!("{local}@{domain}").to_lowercase()));
        }
    }
}

/// Runs of digits with phone punctuation holding 7 to 15 digits.
fn phones(s: &str, out: &mut Vec<Found>) {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let starts = b[i].is_ascii_digit() || b[i] == b'+' || b[i] == b'(';
        let after_word = i > 0 && (b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'.');
        if !starts || after_word {
            i += 1;
            continue;
        }
        let mut j = i;
        // Just after the last digit: separators after it belong to the text
        // around the number ("call 14155550102 today").
        let mut end = i;
        let (mut digits, mut separators) = (String::new(), false);
        while j < b.len() {
            match b[j] {
                c if c.is_ascii_digit() => {
                    digits.push(c as char);
                    end = j + 1;
                }
                b' ' | b'-' | b'.' | b'(' | b')' | b'/' => separators = true,
                b'+' if j == i => {}
                _ => break,
            }
            j += 1;
        }
        let (j, separators) = match end {
            e if e < j => (e, s[i..e].bytes().any(|c| !c.is_ascii_digit() && c != b'+')),
            _ => (j, separators),
        };
        let ends_in_word = j < b.len() && (b[j].is_ascii_alphabetic() || b[j] == b':');
        if (7..=15).contains(&digits.len()) && !ends_in_word && !is_ipv4(&s[i..j]) {
            let formatted = b[i] == b'+' || (separators && looks_national(&s[i..j]));
            // A national number is read in `identify.default_region`
            // (libphonenumber rules), so it names the same person as its E.164 form.
            if let Some(d) = identify::normalize_phone(&s[i..j]) {
                out.push(Found::Phone {
                    digits: d,
                    formatted,
                });
            }
        }
        i = j.max(i + 1);
    }
}

/// A dotted IPv4 address (`203.0.113.10`: four groups of one to three digits,
/// each at most 255), which no phone number is written as; every ad event
/// carries one, and reading it as a phone costs a libphonenumber parse.
fn is_ipv4(run: &str) -> bool {
    let mut groups = 0;
    for g in run.split('.') {
        groups += 1;
        let ok = (1..=3).contains(&g.len())
            && g.bytes().all(|c| c.is_ascii_digit())
            && g.parse::<u16>().is_ok_and(|n| n <= 255);
        if !ok || groups > 4 {
            return false;
        }
    }
    groups == 4
}

/// Whether a run of digits and separators is written like a national phone
/// number (`(415) 555-0100`, `415.555.0100`, `020 7946 0958`) rather than a
/// date, a time or a version: at least ten digits, in groups of two to four
/// digits with the last of three or more, and not an ISO date (a four-digit
/// group first).
fn looks_national(run: &str) -> bool {
    let groups: Vec<&str> = run
        .split(|c: char| !c.is_ascii_digit())
        .filter(|g| !g.is_empty())
        .collect();
    let digits: usize = groups.iter().map(|g| g.len()).sum();
    let (Some(first), Some(last)) = (groups.first(), groups.last()) else {
        return false;
    };
    digits >= 10
        && groups.len() >= 2
        && last.len() >= 3
        && groups.iter().all(|g| g.len() <= 4)
        && !(first.len() == 4 && groups.get(1).is_some_and(|g| g.len() <= 2))
}

/// Runs of exactly 64 or 32 hex digits.
fn hex_runs(s: &str, out: &mut Vec<Found>) {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if !b[i].is_ascii_hexdigit() {
            i += 1;
            continue;
        }
        let mut j = i;
        while j < b.len() && b[j].is_ascii_hexdigit() {
            j += 1;
        }
        let run = &s[i..j];
        match run.len() {
            64 => {
                if let Some(h) = identify::parse_sha256_hex(run) {
                    out.push(Found::Sha256(h));
                }
            }
            32 => out.push(Found::Md5(run.to_ascii_lowercase())),
            _ => {}
        }
        i = j;
    }
}

/// The whole string and its separator-delimited tokens, as possible patient
/// or external ids. Only tokens with a digit: ids are numbered, words are not,
/// and a lookup per word would cost more than the rest of the scan. Digests are
/// looked up as digests.
fn tokens(s: &str, out: &mut Vec<Found>) {
    let id_like = |t: &str| {
        (MIN_TOKEN..=MAX_TOKEN).contains(&t.len())
            && t.bytes().any(|b| b.is_ascii_digit())
            && !(matches!(t.len(), 32 | 64) && t.bytes().all(|b| b.is_ascii_hexdigit()))
    };
    let whole = s.trim();
    if id_like(whole) {
        out.push(Found::Token(whole.to_string()));
    }
    let mut n = 0;
    for t in s.split(is_token_separator).filter(|t| !t.is_empty()) {
        // The token, and each part of it between `.`, `@`, `+` and `~` (an id
        // glued to a word by one of them, or ending a sentence, is still read).
        let parts = t.split(['.', '@', '+', '~']).filter(|p| *p != t);
        for c in std::iter::once(t).chain(parts) {
            if c != whole && id_like(c) {
                if n == MAX_TOKENS {
                    return;
                }
                n += 1;
                out.push(Found::Token(c.to_string()));
            }
        }
    }
}

/// Every string in a JSON document (keys too), decoded, without building a
/// value tree. `None` when the text is not JSON the scanner can walk.
pub(crate) fn json_strings<'a>(text: &'a [u8], f: &mut dyn FnMut(Cow<'a, str>)) -> Option<()> {
    let mut i = 0;
    while i < text.len() {
        if text[i] != b'"' {
            i += 1;
            continue;
        }
        let start = i;
        let mut escaped = false;
        i += 1;
        while i < text.len() && text[i] != b'"' {
            if text[i] == b'\\' {
                escaped = true;
                i += 1;
            }
            i += 1;
        }
        let lit = text.get(start..=i)?;
        i += 1;
        if escaped {
            f(Cow::Owned(serde_json::from_slice::<String>(lit).ok()?));
        } else {
            f(Cow::Borrowed(
                std::str::from_utf8(&lit[1..lit.len() - 1]).ok()?,
            ));
        }
    }
    Some(())
}

/// Headers the last pass does not read: authentication (a secret, not about
/// a person), the framing, and the host.
pub(crate) const SKIPPED_HEADERS: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "host",
    "content-length",
    "content-type",
    "content-encoding",
    "transfer-encoding",
    "connection",
];

/// Every string of a body as the vendor reads it: JSON strings (keys too),
/// form keys and values (a value holding JSON is read as JSON too), or the
/// whole text. Text that cannot be walked as its type is read as one string.
pub(crate) fn each_body_string<'a>(
    body: &'a [u8],
    ct: Option<&str>,
    f: &mut dyn FnMut(Cow<'a, str>),
) {
    if body.is_empty() {
        return;
    }
    let json = ct == Some("application/json")
        || body
            .iter()
            .find(|b| !b.is_ascii_whitespace())
            .is_some_and(|b| *b == b'{' || *b == b'[');
    if json {
        // One string at a time: an 8 MiB batch is never held as a list of its strings.
        if json_strings(body, f).is_some() {
            return;
        }
    } else if ct == Some("application/x-www-form-urlencoded") {
        for (k, v) in form_urlencoded::parse(body) {
            let looks_json = v.trim_start().starts_with(['[', '{']);
            if looks_json {
                let mut inner = |s: Cow<'_, str>| f(Cow::Owned(s.into_owned()));
                let _ = json_strings(v.as_bytes(), &mut inner);
            }
            f(Cow::Owned(k.into_owned()));
            f(Cow::Owned(v.into_owned()));
        }
        return;
    }
    // Not readable as JSON strings: the whole text is read as it would leave.
    f(String::from_utf8_lossy(body));
}

/// Why the guard stepped in (`consentgate_guard_interventions_total{reason}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// A kept event named someone this request may not send for: dropped.
    ForeignIdentifier,
    /// Someone this request may not send for, outside every event: refused.
    ForeignOutsideEvents,
    /// An email or phone naming nobody, outside the identity fields: removed.
    UnknownContactRemoved,
}

impl Reason {
    pub(crate) const ALL: [Reason; 3] = [
        Reason::ForeignIdentifier,
        Reason::ForeignOutsideEvents,
        Reason::UnknownContactRemoved,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Reason::ForeignIdentifier => "foreign_identifier",
            Reason::ForeignOutsideEvents => "foreign_identifier_outside_events",
            Reason::UnknownContactRemoved => "unknown_contact_removed",
        }
    }
}

/// One thing the guard did: the reason, where (a field path or a place such
/// as `query` or `header:referer`, never a value), and the event if any.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Intervention {
    pub reason: Reason,
    pub place: String,
    pub event: Option<usize>,
}

/// The guard for one request: whom it may send for, and what it found.
pub(crate) struct Guard<'a> {
    store: &'a ConsentStore,
    /// Patient ids of the kept, untagged events (messaging: the kept recipients).
    allowed: std::collections::HashSet<Box<str>>,
    /// Ad platforms and analytics: unknown contacts outside identity fields go.
    remove_unknown: bool,
    pub(crate) interventions: Vec<Intervention>,
    /// Who each identifier already looked up names (the same address is read in
    /// its event and again in the last pass; a batch repeats its patients).
    named: std::collections::HashMap<Found, Box<[Box<str>]>>,
    /// Keyed hashes of strings already read and found clean (naming nobody this
    /// request may not send for, no unknown contact). Whom a request may send
    /// for only grows while it is guarded, so a clean string stays clean: the
    /// last pass does not read again what the events' pass read.
    clean: std::collections::HashSet<u64>,
    seed: std::hash::RandomState,
}

/// Most identifiers one request remembers the lookup of.
const MAX_REMEMBERED: usize = 4096;
/// Most clean strings one request remembers (8 bytes each, about 1 MiB with
/// the table: a 70,000-event batch is read once, not twice).
const MAX_CLEAN: usize = 1 << 16;

/// What scanning one place concluded.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Scan {
    /// Someone this request may not send for is named here.
    pub foreign: bool,
    /// An email or phone naming nobody is here.
    pub unknown_contact: bool,
}

impl<'a> Guard<'a> {
    pub(crate) fn new(store: &'a ConsentStore, remove_unknown: bool) -> Guard<'a> {
        Guard {
            store,
            allowed: std::collections::HashSet::new(),
            remove_unknown,
            interventions: Vec::new(),
            named: std::collections::HashMap::new(),
            clean: std::collections::HashSet::new(),
            seed: std::hash::RandomState::new(),
        }
    }

    /// Add the patients of a kept, untagged event to those the request may send for.
    pub(crate) fn allow(&mut self, patient_id: &str) {
        if !self.allowed.contains(patient_id) {
            self.allowed.insert(patient_id.into());
        }
    }

    /// Look up what a string holds.
    pub(crate) fn scan_str(&mut self, s: &str) -> Scan {
        // Without a digit or an `@` a string holds no identifier (percent
        // escapes are digits): nothing to read or remember.
        if !s.bytes().any(|b| b.is_ascii_digit() || b == b'@') {
            return Scan::default();
        }
        use std::hash::BuildHasher as _;
        let key = self.seed.hash_one(s);
        if self.clean.contains(&key) {
            return Scan::default();
        }
        let scan = self.read_str(s);
        if scan == Scan::default() && self.clean.len() < MAX_CLEAN {
            self.clean.insert(key);
        }
        scan
    }

    fn read_str(&mut self, s: &str) -> Scan {
        let mut found = Vec::new();
        scan_text(s, &mut found);
        let mut scan = Scan::default();
        for f in found {
            let foreign = match self.named.get(&f) {
                Some(ids) if ids.is_empty() => None,
                Some(ids) => Some(ids.iter().any(|p| !self.allowed.contains(p))),
                None => {
                    let ids: Box<[Box<str>]> = self
                        .store
                        .lookup(&f.identifiers())
                        .into_iter()
                        .map(|r| r.patient_id)
                        .collect();
                    let foreign = match ids.is_empty() {
                        true => None,
                        false => Some(ids.iter().any(|p| !self.allowed.contains(p))),
                    };
                    if self.named.len() < MAX_REMEMBERED {
                        self.named.insert(f.clone(), ids);
                    }
                    foreign
                }
            };
            match foreign {
                None => scan.unknown_contact |= f.is_contact(),
                Some(x) => scan.foreign |= x,
            }
        }
        scan
    }

    /// A kept event as a value tree, after the adapter rewrote it: `Err` when it
    /// must be dropped; otherwise unknown contacts are removed (on ad platforms
    /// and analytics) and their paths returned. The identity fields of a kept
    /// event are hashed by then, so a plaintext address still in it stands
    /// outside them.
    pub(crate) fn event(&mut self, index: usize, ev: &mut Value) -> Result<Vec<String>, Reason> {
        let mut removed = Vec::new();
        let mut foreign = None;
        self.walk(ev, &mut String::new(), &mut foreign, &mut removed);
        if let Some(place) = foreign {
            self.note(Reason::ForeignIdentifier, place, Some(index));
            return Err(Reason::ForeignIdentifier);
        }
        for p in &removed {
            self.note(Reason::UnknownContactRemoved, p.clone(), Some(index));
        }
        Ok(removed)
    }

    fn walk(
        &mut self,
        v: &mut Value,
        path: &mut String,
        foreign: &mut Option<String>,
        removed: &mut Vec<String>,
    ) {
        match v {
            Value::Object(m) => {
                let mut drop_keys = Vec::new();
                for (k, x) in m.iter_mut() {
                    let len = path.len();
                    if !path.is_empty() {
                        path.push('.');
                    }
                    path.push_str(k);
                    let key_scan = self.scan_str(k);
                    if key_scan.foreign && foreign.is_none() {
                        *foreign = Some(path.clone());
                    }
                    if let Value::String(s) = x {
                        let scan = self.scan_str(s);
                        if scan.foreign && foreign.is_none() {
                            *foreign = Some(path.clone());
                        }
                        if scan.unknown_contact && self.remove_unknown {
                            drop_keys.push(k.clone());
                            removed.push(path.clone());
                        }
                    } else {
                        self.walk(x, path, foreign, removed);
                    }
                    path.truncate(len);
                }
                for k in drop_keys {
                    m.shift_remove(&k);
                }
            }
            Value::Array(a) => {
                let mut keep = Vec::with_capacity(a.len());
                for x in a.iter_mut() {
                    if let Value::String(s) = x {
                        let scan = self.scan_str(s);
                        if scan.foreign && foreign.is_none() {
                            *foreign = Some(path.clone());
                        }
                        let go = scan.unknown_contact && self.remove_unknown;
                        if go {
                            removed.push(format!("{path}[]"));
                        }
                        keep.push(!go);
                    } else {
                        self.walk(x, path, foreign, removed);
                        keep.push(true);
                    }
                }
                let mut i = 0;
                a.retain(|_| {
                    i += 1;
                    keep[i - 1]
                });
            }
            Value::String(s) if foreign.is_none() && self.scan_str(s).foreign => {
                *foreign = Some(path.clone());
            }
            _ => {}
        }
    }

    /// A kept event as JSON text (an adapter's lazy path): whether it names
    /// someone this request may not send for, and whether an unknown contact is
    /// in it (the caller then rewalks it as a value tree to remove it).
    pub(crate) fn event_text(&mut self, index: usize, json: &[u8]) -> Scan {
        let mut scan = Scan::default();
        let walked = json_strings(json, &mut |s| {
            let one = self.scan_str(&s);
            scan.foreign |= one.foreign;
            scan.unknown_contact |= one.unknown_contact;
        });
        // Text the scanner cannot walk is no proof of absence.
        scan.foreign |= walked.is_none();
        if scan.foreign {
            self.note(Reason::ForeignIdentifier, "event".into(), Some(index));
        }
        scan
    }

    /// The last pass over what leaves, outside the events: `place` names it for
    /// the audit (`body`, `query`, `header:<name>`). True: refuse the request.
    pub(crate) fn outside(&mut self, place: &str, strings: &[Cow<'_, str>]) -> bool {
        let foreign = strings.iter().any(|s| self.scan_str(s).foreign);
        self.noted_outside(place, foreign)
    }

    /// [`Guard::outside`] over every string of a body, read one at a time.
    pub(crate) fn outside_body(&mut self, body: &[u8], ct: Option<&str>) -> bool {
        let mut foreign = false;
        each_body_string(body, ct, &mut |s| {
            foreign = foreign || self.scan_str(&s).foreign;
        });
        self.noted_outside("body", foreign)
    }

    fn noted_outside(&mut self, place: &str, foreign: bool) -> bool {
        if foreign {
            self.note(Reason::ForeignOutsideEvents, place.to_string(), None);
        }
        foreign
    }

    fn note(&mut self, reason: Reason, place: String, event: Option<usize>) {
        self.interventions.push(Intervention {
            reason,
            place,
            event,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(s: &str) -> Vec<Found> {
        let mut v = Vec::new();
        scan_text(s, &mut v);
        v
    }

    #[test]
    fn finds_emails_phones_digests_and_tokens() {
        let f = found("Contact Jane.Roe@Example.com or (415) 555-0100, ref crm:0031x00000abc");
        assert!(f.contains(&Found::Email("jane.roe@example.com".into())));
        assert!(f.contains(&Found::Phone {
            digits: "14155550100".into(),
            formatted: true
        }));
        assert!(f.contains(&Found::Token("crm:0031x00000abc".into())));
        // A number followed by a space and a word is still a number.
        assert!(found("re: call 14155550102 today")
            .iter()
            .any(|x| matches!(x, Found::Phone { digits, .. } if digits == "14155550102")));
        assert!(found("call (415) 555-0102 today").iter().any(
            |x| matches!(x, Found::Phone { digits, formatted: true } if digits == "14155550102")
        ));
        let h = identify::sha256_hex(b"jane.roe@example.com");
        assert!(found(&h).contains(&Found::Sha256(identify::sha256(b"jane.roe@example.com"))));
        // An IPv4 address is not a phone; dotted phone numbers still are.
        assert!(!found("ip 203.0.113.10 seen")
            .iter()
            .any(|x| matches!(x, Found::Phone { .. })));
        assert!(found("call 415.555.0102")
            .iter()
            .any(|x| matches!(x, Found::Phone { digits, .. } if digits == "14155550102")));
        // An id glued to characters no id is written with is still read
        // (found by fuzzing: NUL bytes, `%` and quotes around an external id).
        for glued in [
            "\0\0crm:0031x00000den\0",
            "\"crm:0031x00000den%L\"",
            "x*crm:0031x00000den!",
            "«crm:0031x00000den»",
            "C@crm:0031x00000den",
            "see crm:0031x00000den.",
            "x.crm:0031x00000den+y",
        ] {
            assert!(
                found(glued).contains(&Found::Token("crm:0031x00000den".into())),
                "{glued:?}"
            );
        }
        // An address with text glued after it by a full stop (found by fuzzing).
        for glued in ["deny.me@example.com.n3", "Deny.Me@Example.com.2&e"] {
            assert!(
                found(glued).contains(&Found::Email("deny.me@example.com".into())),
                "{glued:?}"
            );
        }
        let md5 = "0123456789abcdef0123456789ABCDEF";
        assert!(found(md5).contains(&Found::Md5(md5.to_lowercase())));
        assert!(found("https://h.example/?e=jane%40example.com")
            .contains(&Found::Email("jane@example.com".into())));
    }

    #[test]
    fn bare_numbers_are_looked_up_but_not_contacts() {
        let f = found("4155550100");
        assert!(f.iter().any(|x| matches!(
            x,
            Found::Phone {
                formatted: false,
                ..
            }
        )));
        assert!(!f.iter().any(Found::is_contact));
        assert!(found("+14155550100").iter().any(Found::is_contact));
        assert!(found("v19.0")
            .iter()
            .all(|x| !matches!(x, Found::Phone { .. })));
    }

    #[test]
    fn json_strings_are_decoded_keys_included() {
        let mut got = Vec::new();
        let text = br#"{"a\u0040b":"x\u0040example.com","n":[1,"y"]}"#;
        json_strings(text, &mut |s| got.push(s.into_owned())).unwrap();
        assert_eq!(
            got,
            ["a@b", "x@example.com", "n", "y"]
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
        );
        assert!(json_strings(br#"{"open"#, &mut |_| {}).is_none());
    }
}
