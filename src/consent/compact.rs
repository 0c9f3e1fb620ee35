//! The compact in-memory form of a stored consent record, and the small view
//! of it that the request path decides on.
//!
//! A stored record is one boxed byte blob (one heap allocation per patient):
//!
//! ```text
//! u32 LE   bits: 7 categories x 2 bits, 4 channels x 2 bits (0 unset,
//!          1 granted, 2 denied), sale_share_opt_out, limit_sensitive, gpc,
//!          "nanos present", jurisdiction mode (2 bits), source mode (2 bits),
//!          "version present"
//! varint   updated_at seconds (zigzag)          [u32 LE nanos, when present]
//! [varint  version, when not 0]
//! jurisdiction, source: interned id (varint) or inline (varint len + UTF-8)
//! varint len + patient_id
//! varint n, n x (varint len + external id)
//! varint n, n x 32-byte email SHA-256
//! varint n, n x 32-byte phone SHA-256
//! varint n, n x 16-byte email MD5
//! ```
//!
//! The encoding is canonical (equal records give equal bytes) and round-trips
//! exactly to the stored `ConsentRecord` (`decode(encode(r)) == r`), which GET
//! (SPEC §8) relies on. Decoding never panics: a blob that does not parse
//! yields `None` and matches nothing.

use super::record::{ConsentRecord, HexDigest, RecordIdentifiers};
use crate::model::{Category, Channel, Grant};
use arc_swap::ArcSwap;
use chrono::{DateTime, Utc};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

const CHANNELS: [Channel; 4] = [Channel::Email, Channel::Sms, Channel::Voice, Channel::Mail];

const CH_SHIFT: u32 = 14;
const SSO: u32 = 1 << 22;
const LIMIT_SENSITIVE: u32 = 1 << 23;
const GPC: u32 = 1 << 24;
const HAS_NANOS: u32 = 1 << 25;
const JUR_SHIFT: u32 = 26;
const SRC_SHIFT: u32 = 28;
/// A record never written through the admin API (version 0) spends no byte on it.
const HAS_VERSION: u32 = 1 << 30;
/// Modes of an optional string (2 bits).
const STR_NONE: u32 = 0;
const STR_INTERNED: u32 = 1;
const STR_INLINE: u32 = 2;
/// The bits of the header that are grants and flags.
const GRANTS_MASK: u32 = (1 << 25) - 1;

fn grant_bits(g: Grant) -> u32 {
    match g {
        Grant::Granted => 1,
        Grant::Denied => 2,
    }
}

fn bits_grant(b: u32) -> Option<Grant> {
    match b & 3 {
        1 => Some(Grant::Granted),
        2 => Some(Grant::Denied),
        _ => None,
    }
}

fn category_index(c: Category) -> u32 {
    match c {
        Category::Advertising => 0,
        Category::MarketingEmail => 1,
        Category::MarketingSms => 2,
        Category::PhoneOutreach => 3,
        Category::AppointmentReminders => 4,
        Category::PatientSurveys => 5,
        Category::CareFollowups => 6,
    }
}

fn channel_index(c: Channel) -> u32 {
    match c {
        Channel::Email => 0,
        Channel::Sms => 1,
        Channel::Voice => 2,
        Channel::Mail => 3,
    }
}

/// Grants and flags of one record, packed (the low 25 bits of the blob header).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Grants(u32);

impl Grants {
    fn of(r: &ConsentRecord) -> Grants {
        let mut b = 0u32;
        for (c, g) in &r.categories {
            b |= grant_bits(*g) << (2 * category_index(*c));
        }
        for (c, g) in &r.channels {
            b |= grant_bits(*g) << (CH_SHIFT + 2 * channel_index(*c));
        }
        if r.sale_share_opt_out {
            b |= SSO;
        }
        if r.limit_sensitive {
            b |= LIMIT_SENSITIVE;
        }
        if r.gpc {
            b |= GPC;
        }
        Grants(b)
    }

    /// The record's own grant for a category (`None`: not set by the record).
    pub(crate) fn category(self, c: Category) -> Option<Grant> {
        bits_grant(self.0 >> (2 * category_index(c)))
    }

    /// The record's own grant for a channel (`None`: not set by the record).
    pub(crate) fn channel(self, c: Channel) -> Option<Grant> {
        bits_grant(self.0 >> (CH_SHIFT + 2 * channel_index(c)))
    }

    pub(crate) fn sale_share_opt_out(self) -> bool {
        self.0 & SSO != 0
    }
    pub(crate) fn limit_sensitive(self) -> bool {
        self.0 & LIMIT_SENSITIVE != 0
    }
    pub(crate) fn gpc(self) -> bool {
        self.0 & GPC != 0
    }

    /// Same ranking as [`ConsentRecord::restrictiveness`].
    #[cfg(test)]
    pub(crate) fn restrictiveness(self) -> usize {
        let denied = Category::ALL
            .iter()
            .filter(|c| self.category(**c).unwrap_or(c.shipped_default()) == Grant::Denied)
            .count();
        let ch = CHANNELS
            .iter()
            .filter(|c| self.channel(**c) == Some(Grant::Denied))
            .count();
        denied * 4
            + ch * 4
            + usize::from(self.sale_share_opt_out())
            + usize::from(self.limit_sensitive())
            + usize::from(self.gpc())
    }
}

/// `jurisdiction` / `source` strings shared by every record: each distinct
/// short value is stored once, for the life of the process, and records hold
/// its id. Bounded: beyond the cap values are stored inline in the record.
pub(crate) struct Interner {
    /// id → string; readers load it without locking.
    names: ArcSwap<Vec<&'static str>>,
    /// string → id; writers only.
    ids: Mutex<HashMap<&'static str, u32>>,
}

const MAX_INTERNED: usize = 4096;
const MAX_INTERNED_LEN: usize = 64;

impl Default for Interner {
    fn default() -> Self {
        Interner {
            names: ArcSwap::from_pointee(Vec::new()),
            ids: Mutex::new(HashMap::new()),
        }
    }
}

impl Interner {
    /// The id of `s`, interning it if there is room.
    fn id(&self, s: &str) -> Option<u32> {
        let mut ids = self.ids.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(id) = ids.get(s) {
            return Some(*id);
        }
        if ids.len() >= MAX_INTERNED || s.len() > MAX_INTERNED_LEN {
            return None;
        }
        // Bounded (MAX_INTERNED values of at most MAX_INTERNED_LEN bytes), so
        // leaking them for the life of the process is a fixed, small cost, and
        // lets lookups hand out `&'static str` without touching a refcount.
        let leaked: &'static str = Box::leak(Box::from(s));
        let id = u32::try_from(ids.len()).ok()?;
        let mut names = Vec::clone(&self.names.load());
        names.push(leaked);
        self.names.store(Arc::new(names));
        ids.insert(leaked, id);
        Some(id)
    }

    fn name(&self, id: u64) -> Option<&'static str> {
        let names = self.names.load();
        usize::try_from(id).ok().and_then(|i| names.get(i).copied())
    }
}

fn put_var(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_var(out, b.len() as u64);
    out.extend_from_slice(b);
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

/// A cursor over a blob; every read is bounds-checked.
#[derive(Clone, Copy)]
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn var(&mut self) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&b, rest) = self.0.split_first()?;
            self.0 = rest;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.0.len() {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn len_prefixed(&mut self) -> Option<&'a [u8]> {
        let n = usize::try_from(self.var()?).ok()?;
        self.take(n)
    }
    fn u32(&mut self) -> Option<u32> {
        let b = self.take(4)?;
        Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn count(&mut self) -> Option<usize> {
        usize::try_from(self.var()?).ok()
    }
    fn digests<const N: usize>(&mut self) -> Option<Digests<'a, N>> {
        let n = self.count()?;
        let bytes = self.take(n.checked_mul(N)?)?;
        Some(Digests(bytes))
    }
}

/// A run of `N`-byte digests inside a blob.
#[derive(Clone, Copy)]
pub(crate) struct Digests<'a, const N: usize>(&'a [u8]);

impl<'a, const N: usize> Digests<'a, N> {
    pub(crate) fn iter(self) -> impl Iterator<Item = &'a [u8]> {
        self.0.chunks_exact(N)
    }
    fn contains(self, d: &[u8; N]) -> bool {
        self.iter().any(|x| x == d.as_slice())
    }
    fn to_vec(self) -> Option<Vec<HexDigest<N>>> {
        self.iter()
            .map(|x| <[u8; N]>::try_from(x).ok().map(HexDigest))
            .collect()
    }
}

/// An optional string field as stored.
#[derive(Clone, Copy)]
enum StoredStr<'a> {
    None,
    Interned(u64),
    Inline(&'a [u8]),
}

impl<'a> StoredStr<'a> {
    fn read(mode: u32, c: &mut Cursor<'a>) -> Option<StoredStr<'a>> {
        match mode & 3 {
            STR_NONE => Some(StoredStr::None),
            STR_INTERNED => Some(StoredStr::Interned(c.var()?)),
            STR_INLINE => Some(StoredStr::Inline(c.len_prefixed()?)),
            _ => None,
        }
    }
    fn resolve(self, interner: &Interner) -> Option<Cow<'static, str>> {
        match self {
            StoredStr::None => None,
            StoredStr::Interned(id) => interner.name(id).map(Cow::Borrowed),
            StoredStr::Inline(b) => Some(Cow::Owned(String::from_utf8_lossy(b).into_owned())),
        }
    }
}

/// A parsed blob (borrowing it).
pub(crate) struct Parsed<'a> {
    grants: Grants,
    secs: i64,
    nanos: u32,
    version: u64,
    jurisdiction: StoredStr<'a>,
    source: StoredStr<'a>,
    pub(crate) patient_id: &'a [u8],
    /// External ids onward.
    rest: Cursor<'a>,
}

/// The identifiers sections of a blob.
pub(crate) struct Sections<'a> {
    external: Cursor<'a>,
    n_external: usize,
    pub(crate) emails: Digests<'a, 32>,
    pub(crate) phones: Digests<'a, 32>,
    pub(crate) md5s: Digests<'a, 16>,
}

impl<'a> Sections<'a> {
    /// External ids as stored (not trimmed).
    pub(crate) fn external_ids(&self) -> impl Iterator<Item = &'a [u8]> {
        let mut c = self.external;
        (0..self.n_external).map_while(move |_| c.len_prefixed())
    }
}

impl<'a> Parsed<'a> {
    pub(crate) fn new(blob: &'a [u8]) -> Option<Parsed<'a>> {
        let mut c = Cursor(blob);
        let bits = c.u32()?;
        let secs = unzigzag(c.var()?);
        let nanos = if bits & HAS_NANOS != 0 { c.u32()? } else { 0 };
        let version = if bits & HAS_VERSION != 0 { c.var()? } else { 0 };
        let jurisdiction = StoredStr::read(bits >> JUR_SHIFT, &mut c)?;
        let source = StoredStr::read(bits >> SRC_SHIFT, &mut c)?;
        let patient_id = c.len_prefixed()?;
        Some(Parsed {
            grants: Grants(bits & GRANTS_MASK),
            secs,
            nanos,
            version,
            jurisdiction,
            source,
            patient_id,
            rest: c,
        })
    }

    pub(crate) fn sections(&self) -> Option<Sections<'a>> {
        let mut c = self.rest;
        let n_external = c.count()?;
        let external = c;
        for _ in 0..n_external {
            c.len_prefixed()?;
        }
        let emails = c.digests()?;
        let phones = c.digests()?;
        let md5s = c.digests()?;
        Some(Sections {
            external,
            n_external,
            emails,
            phones,
            md5s,
        })
    }

    /// `(seconds, nanoseconds)` of `updated_at`; orders like the timestamp.
    #[cfg(test)]
    pub(crate) fn updated(&self) -> (i64, u32) {
        (self.secs, self.nanos)
    }

    /// Whether this record should replace `current` (same rule as
    /// [`ConsentRecord::supersedes`]).
    #[cfg(test)]
    pub(crate) fn supersedes(&self, current: &Parsed<'_>) -> bool {
        match self.updated().cmp(&current.updated()) {
            std::cmp::Ordering::Greater => true,
            std::cmp::Ordering::Less => false,
            std::cmp::Ordering::Equal => {
                self.grants.restrictiveness() >= current.grants.restrictiveness()
            }
        }
    }

    pub(crate) fn has_external(&self, x: &[u8]) -> bool {
        self.sections().is_some_and(|s| {
            s.external_ids()
                .any(|e| std::str::from_utf8(e).is_ok_and(|e| e.trim().as_bytes() == x))
        })
    }
    pub(crate) fn has_email(&self, d: &[u8; 32]) -> bool {
        self.sections().is_some_and(|s| s.emails.contains(d))
    }
    pub(crate) fn has_phone(&self, d: &[u8; 32]) -> bool {
        self.sections().is_some_and(|s| s.phones.contains(d))
    }
    pub(crate) fn has_email_md5(&self, d: &[u8; 16]) -> bool {
        self.sections().is_some_and(|s| s.md5s.contains(d))
    }

    fn updated_at(&self) -> Option<DateTime<Utc>> {
        DateTime::from_timestamp(self.secs, self.nanos)
    }

    /// The small view the policy decides on.
    pub(crate) fn view(&self, interner: &Interner) -> Option<ConsentView> {
        Some(ConsentView {
            patient_id: std::str::from_utf8(self.patient_id).ok()?.into(),
            updated_at: self.updated_at()?,
            jurisdiction: self.jurisdiction.resolve(interner),
            source: self.source.resolve(interner),
            grants: self.grants,
        })
    }

    /// The full stored record (GET, PATCH, supersede checks of the writers).
    pub(crate) fn record(&self, interner: &Interner) -> Option<ConsentRecord> {
        let s = self.sections()?;
        let g = self.grants;
        let external_ids = s
            .external_ids()
            .map(|b| std::str::from_utf8(b).ok().map(str::to_string))
            .collect::<Option<Vec<_>>>()?;
        Some(ConsentRecord {
            patient_id: std::str::from_utf8(self.patient_id).ok()?.to_string(),
            identifiers: RecordIdentifiers {
                emails: Vec::new(),
                phones: Vec::new(),
                external_ids,
                email_sha256: s.emails.to_vec()?,
                phone_sha256: s.phones.to_vec()?,
                email_md5: s.md5s.to_vec()?,
            },
            jurisdiction: self.jurisdiction.resolve(interner).map(Arc::from),
            categories: Category::ALL
                .iter()
                .filter_map(|c| g.category(*c).map(|v| (*c, v)))
                .collect::<BTreeMap<_, _>>(),
            channels: CHANNELS
                .iter()
                .filter_map(|c| g.channel(*c).map(|v| (*c, v)))
                .collect::<BTreeMap<_, _>>(),
            sale_share_opt_out: g.sale_share_opt_out(),
            limit_sensitive: g.limit_sensitive(),
            gpc: g.gpc(),
            updated_at: self.updated_at()?,
            source: self.source.resolve(interner).map(Arc::from),
            version: self.version,
        })
    }
}

fn put_str(out: &mut Vec<u8>, bits: &mut u32, shift: u32, s: Option<&str>, interner: &Interner) {
    match s {
        None => {}
        Some(s) => match interner.id(s) {
            Some(id) => {
                *bits |= STR_INTERNED << shift;
                put_var(out, u64::from(id));
            }
            None => {
                *bits |= STR_INLINE << shift;
                put_bytes(out, s.as_bytes());
            }
        },
    }
}

/// Encode a record in stored form (no plaintext emails or phones: the caller
/// has applied [`ConsentRecord::into_stored`]; any left are not kept).
pub(crate) fn encode(r: &ConsentRecord, interner: &Interner) -> Box<[u8]> {
    let ids = &r.identifiers;
    let mut out = Vec::with_capacity(
        24 + r.patient_id.len()
            + ids.external_ids.iter().map(|x| x.len() + 2).sum::<usize>()
            + 32 * (ids.email_sha256.len() + ids.phone_sha256.len())
            + 16 * ids.email_md5.len(),
    );
    let mut bits = Grants::of(r).0;
    let secs = r.updated_at.timestamp();
    let nanos = r.updated_at.timestamp_subsec_nanos();
    if nanos != 0 {
        bits |= HAS_NANOS;
    }
    if r.version != 0 {
        bits |= HAS_VERSION;
    }
    out.extend_from_slice(&[0; 4]);
    put_var(&mut out, zigzag(secs));
    if nanos != 0 {
        out.extend_from_slice(&nanos.to_le_bytes());
    }
    if r.version != 0 {
        put_var(&mut out, r.version);
    }
    put_str(
        &mut out,
        &mut bits,
        JUR_SHIFT,
        r.jurisdiction.as_deref(),
        interner,
    );
    put_str(
        &mut out,
        &mut bits,
        SRC_SHIFT,
        r.source.as_deref(),
        interner,
    );
    out[..4].copy_from_slice(&bits.to_le_bytes());
    put_bytes(&mut out, r.patient_id.as_bytes());
    put_var(&mut out, ids.external_ids.len() as u64);
    for x in &ids.external_ids {
        put_bytes(&mut out, x.as_bytes());
    }
    put_var(&mut out, ids.email_sha256.len() as u64);
    for h in &ids.email_sha256 {
        out.extend_from_slice(&h.0);
    }
    put_var(&mut out, ids.phone_sha256.len() as u64);
    for h in &ids.phone_sha256 {
        out.extend_from_slice(&h.0);
    }
    put_var(&mut out, ids.email_md5.len() as u64);
    for h in &ids.email_md5 {
        out.extend_from_slice(&h.0);
    }
    out.into_boxed_slice()
}

/// What the policy needs of one matched record (SPEC §6), plus what `explain`
/// and the audit show. Built per lookup from the compact stored form; the full
/// record is only materialised by [`ConsentStore::get`](super::ConsentStore::get).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsentView {
    pub(crate) patient_id: Box<str>,
    pub(crate) updated_at: DateTime<Utc>,
    pub(crate) jurisdiction: Option<Cow<'static, str>>,
    pub(crate) source: Option<Cow<'static, str>>,
    grants: Grants,
}

impl ConsentView {
    /// The record's own grant for a category (`None`: the policy default applies).
    pub(crate) fn category(&self, c: Category) -> Option<Grant> {
        self.grants.category(c)
    }
    /// The record's own grant for a channel.
    pub(crate) fn channel(&self, c: Channel) -> Option<Grant> {
        self.grants.channel(c)
    }
    pub(crate) fn sale_share_opt_out(&self) -> bool {
        self.grants.sale_share_opt_out()
    }
    pub(crate) fn limit_sensitive(&self) -> bool {
        self.grants.limit_sensitive()
    }
    pub(crate) fn gpc(&self) -> bool {
        self.grants.gpc()
    }
}

impl From<&ConsentRecord> for ConsentView {
    fn from(r: &ConsentRecord) -> ConsentView {
        ConsentView {
            patient_id: r.patient_id.trim().into(),
            updated_at: r.updated_at,
            jurisdiction: r.jurisdiction.as_deref().map(|s| Cow::Owned(s.to_string())),
            source: r.source.as_deref().map(|s| Cow::Owned(s.to_string())),
            grants: Grants::of(r),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(json: &str) -> ConsentRecord {
        ConsentRecord::from_json(json.as_bytes())
            .unwrap()
            .into_stored()
    }

    #[test]
    fn round_trips_exactly() {
        let i = Interner::default();
        for json in [
            r#"{"patient_id":"P-1","updated_at":"2026-11-20T10:00:00Z"}"#,
            r#"{"patient_id":"P-2","identifiers":{"emails":["J.Doe@gmail.com","b@x.org"],"phones":["+1 415 555 0100"],"external_ids":["crm:1"," crm:2 "],"email_sha256":["aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"]},
               "jurisdiction":"US-CA","source":"preference-center",
               "categories":{"advertising":"granted","care_followups":"denied","marketing_sms":"granted"},
               "channels":{"email":"denied","mail":"granted"},
               "sale_share_opt_out":true,"limit_sensitive":true,"gpc":true,
               "updated_at":"1969-07-20T20:17:40.123456789+02:00"}"#,
            r#"{"patient_id":"P-3","updated_at":"9999-12-31T23:59:59.999999999Z","source":"x"}"#,
            r#"{"patient_id":"P-4","updated_at":"0001-01-01T00:00:00.000001Z"}"#,
            r#"{"patient_id":"P-5","updated_at":"2026-11-20T10:00:00Z","version":1}"#,
            r#"{"patient_id":"P-6","updated_at":"2026-11-20T10:00:00Z","version":18446744073709551615,"source":"s"}"#,
        ] {
            let r = rec(json);
            let blob = encode(&r, &i);
            let p = Parsed::new(&blob).unwrap();
            assert_eq!(p.record(&i).unwrap(), r, "{json}");
            assert_eq!(p.grants.restrictiveness(), r.restrictiveness());
            let v = p.view(&i).unwrap();
            assert_eq!(v, ConsentView::from(&r));
            for c in Category::ALL {
                assert_eq!(v.category(c), r.categories.get(&c).copied());
            }
            for c in CHANNELS {
                assert_eq!(v.channel(c), r.channels.get(&c).copied());
            }
            // Canonical: the same record encodes to the same bytes.
            assert_eq!(encode(&r, &i), blob);
        }
    }

    #[test]
    fn long_and_many_strings_are_stored_inline() {
        let i = Interner::default();
        let long = "j".repeat(300);
        let mut r = rec(r#"{"patient_id":"P-1","updated_at":"2026-11-20T10:00:00Z"}"#);
        r.jurisdiction = Some(long.as_str().into());
        let blob = encode(&r, &i);
        let p = Parsed::new(&blob).unwrap();
        assert_eq!(p.record(&i).unwrap(), r);
        assert_eq!(p.view(&i).unwrap().jurisdiction.as_deref(), Some(&*long));
        for k in 0..MAX_INTERNED + 10 {
            let mut r = r.clone();
            r.source = Some(format!("s{k}").into());
            let blob = encode(&r, &i);
            assert_eq!(Parsed::new(&blob).unwrap().record(&i).unwrap(), r);
        }
    }

    #[test]
    fn truncated_blobs_parse_to_none_not_panic() {
        let i = Interner::default();
        let r = rec(
            r#"{"patient_id":"P-1","identifiers":{"emails":["a@b.c"],"external_ids":["x"]},"updated_at":"2026-11-20T10:00:00Z"}"#,
        );
        let blob = encode(&r, &i);
        for n in 0..blob.len() {
            let cut = &blob[..n];
            if let Some(p) = Parsed::new(cut) {
                assert!(p.record(&i).is_none());
            }
        }
    }
}
