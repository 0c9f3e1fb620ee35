//! Helpers shared by the vendor adapters: dotted-path access on JSON, URL
//! reduction, vendor hashing, form bodies and a per-event batch driver.
//!
//! Paths are dotted keys; an array met on the way is walked element by element,
//! so `user.email` reaches `user.email[0..]` and `contents.item_name` reaches
//! every content's `item_name`.

use super::{BodyError, EventApplied, Judge};
use crate::decide::EventVerdict;
use crate::identify::{self, Identifiers};
use serde_json::{Map, Value};

pub(crate) fn parse_json(body: &[u8]) -> Result<Value, BodyError> {
    strict_json(body).map_err(|e| {
        BodyError::Unreadable(if e.to_string().contains(DUPLICATE_KEY) {
            format!(
                "{} (line {} column {})",
                DUPLICATE_KEY,
                e.line(),
                e.column()
            )
        } else {
            format!("invalid JSON at line {} column {}", e.line(), e.column())
        })
    })
}

/// Why a body with a repeated object key is refused: the proxy would decide on
/// one value while a vendor that keeps the first one would read another, so
/// such a body is never forwarded (fail closed).
pub(crate) const DUPLICATE_KEY: &str = "duplicate object key: ambiguous JSON is not forwarded";

/// Parse JSON into a `Value`, refusing any object with a repeated key (serde_json
/// would silently keep the last value); the error's text then holds
/// [`DUPLICATE_KEY`].
pub(crate) fn strict_json(text: &[u8]) -> Result<Value, serde_json::Error> {
    use serde::de::DeserializeSeed;
    let mut de = serde_json::Deserializer::from_slice(text);
    let v = StrictValue.deserialize(&mut de)?;
    de.end()?;
    Ok(v)
}

/// `strict_json` on a string (an event or document JSON-encoded inside a field).
pub(crate) fn strict_json_str(text: &str) -> Result<Value, serde_json::Error> {
    strict_json(text.as_bytes())
}

#[derive(Clone, Copy)]
struct StrictValue;

impl<'de> serde::de::DeserializeSeed<'de> for StrictValue {
    type Value = Value;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for StrictValue {
    type Value = Value;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> Result<Value, A::Error> {
        let mut v = Vec::with_capacity(a.size_hint().unwrap_or(0).min(4096));
        while let Some(el) = a.next_element_seed(StrictValue)? {
            v.push(el);
        }
        Ok(Value::Array(v))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut a: A) -> Result<Value, A::Error> {
        let mut m = Map::new();
        while let Some(k) = a.next_key::<String>()? {
            if m.contains_key(&k) {
                return Err(serde::de::Error::custom(DUPLICATE_KEY));
            }
            let v = a.next_value_seed(StrictValue)?;
            m.insert(k, v);
        }
        Ok(Value::Object(m))
    }
}

pub(crate) fn to_json(v: &Value) -> Vec<u8> {
    // Serialising a Value cannot fail (all keys are strings).
    serde_json::to_vec(v).unwrap_or_default()
}

/// Every string (or number, as text) found at `path`.
pub(crate) fn strings_at<'a>(v: &'a Value, path: &str) -> Vec<std::borrow::Cow<'a, str>> {
    let mut out = Vec::new();
    walk(v, path, &mut |x| collect_strings(x, &mut out));
    out
}

/// Every string (or number, as text) in `v`, walking arrays.
pub(crate) fn collect_strings<'a>(v: &'a Value, out: &mut Vec<std::borrow::Cow<'a, str>>) {
    match v {
        Value::String(s) => out.push(std::borrow::Cow::Borrowed(s.as_str())),
        Value::Number(n) => out.push(std::borrow::Cow::Owned(n.to_string())),
        Value::Array(a) => a.iter().for_each(|x| collect_strings(x, out)),
        _ => {}
    }
}

fn walk<'a>(v: &'a Value, path: &str, f: &mut dyn FnMut(&'a Value)) {
    match v {
        Value::Array(a) => a.iter().for_each(|x| walk(x, path, f)),
        Value::Object(m) => {
            let (head, rest) = split(path);
            if let Some(x) = m.get(head) {
                match rest {
                    None => f(x),
                    Some(r) => walk(x, r, f),
                }
            }
        }
        _ => {}
    }
}

fn split(path: &str) -> (&str, Option<&str>) {
    match path.split_once('.') {
        Some((h, r)) => (h, Some(r)),
        None => (path, None),
    }
}

/// Apply `f` to every value at `path` (mutable walk). Returns whether `f` said
/// it changed anything.
pub(crate) fn modify_at(v: &mut Value, path: &str, f: &mut dyn FnMut(&mut Value) -> bool) -> bool {
    match v {
        Value::Array(a) => a
            .iter_mut()
            .fold(false, |acc, x| modify_at(x, path, f) | acc),
        Value::Object(m) => {
            let (head, rest) = split(path);
            match (m.get_mut(head), rest) {
                (Some(x), None) => f(x),
                (Some(x), Some(r)) => modify_at(x, r, f),
                (None, _) => false,
            }
        }
        _ => false,
    }
}

/// Remove the key at `path` wherever it occurs. Returns whether anything went.
pub(crate) fn remove_at(v: &mut Value, path: &str) -> bool {
    match v {
        Value::Array(a) => a.iter_mut().fold(false, |acc, x| remove_at(x, path) | acc),
        Value::Object(m) => match split(path) {
            (head, None) => m.shift_remove(head).is_some(),
            (head, Some(r)) => m.get_mut(head).is_some_and(|x| remove_at(x, r)),
        },
        _ => false,
    }
}

/// Remove every path in `paths`; push the names of those removed to `stripped`.
pub(crate) fn remove_all(v: &mut Value, paths: &[&str], stripped: &mut Vec<String>) {
    for p in paths {
        if remove_at(v, p) {
            stripped.push((*p).to_string());
        }
    }
}

/// Set `path` to `value`, creating objects on the way (no array walking).
pub(crate) fn set_at(v: &mut Value, path: &str, value: Value) {
    let mut cur = v;
    let mut parts = path.split('.').peekable();
    while let Some(p) = parts.next() {
        if !cur.is_object() {
            *cur = Value::Object(Map::new());
        }
        let Value::Object(m) = cur else { return };
        if parts.peek().is_none() {
            m.insert(p.to_string(), value);
            return;
        }
        cur = m
            .entry(p.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
    }
}

/// `https://host/path?q` → `https://host/`. Unparseable values become "".
pub(crate) fn reduce_url(s: &str) -> String {
    match url::Url::parse(s) {
        Ok(u) => match u.host_str() {
            Some(h) => match u.port() {
                Some(p) => format!("{}://{}:{}/", u.scheme(), h, p),
                None => format!("{}://{}/", u.scheme(), h),
            },
            None => String::new(),
        },
        Err(_) => String::new(),
    }
}

/// Reduce every URL string at each path; push the names of those changed.
pub(crate) fn reduce_urls(v: &mut Value, paths: &[&str], stripped: &mut Vec<String>) {
    for p in paths {
        let changed = modify_at(v, p, &mut |x| match x {
            Value::String(s) => {
                let r = reduce_url(s);
                if r != *s {
                    *s = r;
                    true
                } else {
                    false
                }
            }
            _ => false,
        });
        if changed {
            stripped.push((*p).to_string());
        }
    }
}

/// Hash every plaintext string at `path` with `hash` (values that already look
/// hashed are left alone). Returns whether anything changed.
pub(crate) fn hash_at(v: &mut Value, path: &str, hash: fn(&str) -> String) -> bool {
    modify_at(v, path, &mut |x| hash_value(x, hash))
}

/// Hash the plaintext strings (and numbers) in `x`, walking arrays; values that
/// already look hashed are left alone. Returns whether anything changed.
pub(crate) fn hash_value(x: &mut Value, hash: fn(&str) -> String) -> bool {
    match x {
        Value::String(s) if !s.is_empty() && !identify::looks_hashed(s) => {
            *s = hash(s);
            true
        }
        Value::Number(n) => {
            let h = hash(&n.to_string());
            *x = Value::String(h);
            true
        }
        Value::Array(a) => a.iter_mut().fold(false, |acc, y| hash_value(y, hash) | acc),
        _ => false,
    }
}

/// A vendor hashing function (see `identify::hash_*_for_vendor`).
pub(crate) type Hasher = fn(&str) -> String;

/// Hash each (path, hasher) pair; push the names of those changed to `hashed`.
pub(crate) fn hash_all(
    v: &mut Value,
    spec: &[(&'static str, Hasher)],
    hashed: &mut Vec<&'static str>,
) {
    for (p, h) in spec {
        if hash_at(v, p, *h) {
            hashed.push(p);
        }
    }
}

/// Add every string at each path to `ids` with `add`.
pub(crate) fn collect(
    v: &Value,
    paths: &[&str],
    ids: &mut Identifiers,
    add: fn(&mut Identifiers, &str),
) {
    for p in paths {
        for s in strings_at(v, p) {
            add(ids, &s);
        }
    }
}

/// The events of a batch, one verdict each. Kept ones are passed to `apply`;
/// once every event is decided, the guard reads each kept event as it will
/// leave (it may drop it, or remove unknown contacts from it). Dropped events
/// are removed. Returns whether anything changed, and what was done per event
/// (payload order).
pub(crate) fn enforce_array(
    events: &mut Vec<Value>,
    judge: &mut dyn Judge,
    identify: &dyn Fn(&Value) -> Identifiers,
    apply: &dyn Fn(&mut Value, &crate::decide::Keep, &mut EventApplied),
) -> (bool, Vec<EventApplied>) {
    let mut applied = Vec::with_capacity(events.len());
    let mut keep_mask = Vec::with_capacity(events.len());
    for ev in events.iter_mut() {
        let ids = identify(ev);
        let verdict = judge.decide(&ids);
        let mut a = EventApplied::new(verdict);
        match verdict {
            EventVerdict::Drop(_) => keep_mask.push(false),
            EventVerdict::Keep(k) => {
                apply(ev, &k, &mut a);
                keep_mask.push(true);
            }
        }
        applied.push(a);
    }
    for (i, ev) in events.iter_mut().enumerate() {
        if !keep_mask[i] {
            continue;
        }
        match judge.guard(i, ev) {
            Ok(removed) if removed.is_empty() => {}
            Ok(removed) => applied[i].ch().fields_stripped.extend(removed),
            Err(_) => {
                applied[i].verdict = EventVerdict::Drop(crate::decide::Reason::ForeignIdentifier);
                keep_mask[i] = false;
            }
        }
    }
    let changed = applied.iter().any(EventApplied::changed);
    let mut i = 0;
    events.retain(|_| {
        let k = keep_mask[i];
        i += 1;
        k
    });
    (changed, applied)
}

pub(crate) use super::batch::enforce_json_batch;

/// Like [`enforce_json_batch`], for an array at a dotted path of nested
/// objects (`data.attributes.profiles.data`; `""` or `"$"`: a top-level array).
pub(crate) fn enforce_json_batch_at(
    body: &[u8],
    path: &str,
    judge: &mut dyn Judge,
    identify: &dyn Fn(&Value) -> Identifiers,
    apply: &dyn Fn(&mut Value, &crate::decide::Keep, &mut EventApplied),
) -> Result<super::Enforced, BodyError> {
    let mut root = parse_json(body)?;
    let Some(events) = array_at_mut(&mut root, path) else {
        return Err(BodyError::Unreadable(if path.is_empty() || path == "$" {
            "body is not a JSON array".to_string()
        } else {
            format!("`{path}` is missing or not an array")
        }));
    };
    let (changed, applied) = enforce_array(events, judge, identify, apply);
    Ok(super::Enforced {
        body: changed.then(|| to_json(&root)),
        events: applied,
        query: None,
    })
}

/// Enforce a body that is one event as a whole (one user per request: GA4,
/// a single LinkedIn conversion). The top level must be a JSON object. When
/// the event is dropped the body becomes `{}` (the request is blocked anyway,
/// and nothing of the original survives in it).
pub(crate) fn enforce_json_single(
    body: &[u8],
    judge: &mut dyn Judge,
    identify: &dyn Fn(&Value) -> Identifiers,
    apply: &dyn Fn(&mut Value, &crate::decide::Keep, &mut EventApplied),
) -> Result<super::Enforced, BodyError> {
    enforce_single_value(parse_json(body)?, judge, identify, apply)
}

/// [`enforce_json_single`] on a body already parsed.
pub(crate) fn enforce_single_value(
    root: Value,
    judge: &mut dyn Judge,
    identify: &dyn Fn(&Value) -> Identifiers,
    apply: &dyn Fn(&mut Value, &crate::decide::Keep, &mut EventApplied),
) -> Result<super::Enforced, BodyError> {
    if !root.is_object() {
        return Err(BodyError::Unreadable(
            "top level is not a JSON object".into(),
        ));
    }
    let mut one = vec![root];
    let (changed, applied) = enforce_array(&mut one, judge, identify, apply);
    let body = match one.first() {
        Some(v) => changed.then(|| to_json(v)),
        None => Some(b"{}".to_vec()),
    };
    Ok(super::Enforced {
        body,
        events: applied,
        query: None,
    })
}

/// SHA-256 hex of the trimmed, lower-cased value (names, cities, external
/// ids). A value that already looks hashed is returned lower-cased as it is.
pub(crate) fn hash_trimmed_lowercase(v: &str) -> String {
    if identify::looks_hashed(v) {
        return v.trim().to_ascii_lowercase();
    }
    identify::sha256_hex(v.trim().to_lowercase().as_bytes())
}

/// Google's email hashing (GA4 `user_data`, Google Ads `hashedEmail`): trimmed,
/// lower-cased, and for gmail.com / googlemail.com without dots before the `@`.
pub(crate) fn hash_email_google(v: &str) -> String {
    if identify::looks_hashed(v) {
        return v.trim().to_ascii_lowercase();
    }
    match identify::normalize_email(v) {
        Some(n) => {
            let n = identify::gmail_variant(&n).unwrap_or(n);
            identify::sha256_hex(n.as_bytes())
        }
        None => identify::hash_email_for_vendor(v),
    }
}

/// Whether `method` is POST and `path` (trailing `/` ignored) splits into
/// segments accepted by `shape`.
pub(crate) fn post_path_matches(
    method: &http::Method,
    path: &str,
    shape: &dyn Fn(&[&str]) -> bool,
) -> bool {
    if method != http::Method::POST {
        return false;
    }
    let p = path.strip_prefix('/').unwrap_or(path);
    let p = p.strip_suffix('/').unwrap_or(p);
    let segs: Vec<&str> = p.split('/').collect();
    !segs.iter().any(|s| s.is_empty()) && shape(&segs)
}

/// Form body as ordered pairs.
pub(crate) fn parse_form(body: &[u8]) -> Vec<(String, String)> {
    form_urlencoded::parse(body).into_owned().collect()
}

pub(crate) fn encode_form(pairs: &[(String, String)]) -> Vec<u8> {
    form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs.iter())
        .finish()
        .into_bytes()
}

/// Whether `host` (lower-case, no port) matches `pattern`: an exact host, or
/// `*.suffix` for any host with at least one label before `.suffix` (the bare
/// suffix itself does not match).
pub(crate) fn host_matches(pattern: &str, host: &str) -> bool {
    let pattern = pattern.trim().trim_end_matches('.');
    let host = host.trim_end_matches('.');
    match pattern.strip_prefix("*.") {
        Some(suffix) => host
            .strip_suffix(suffix)
            .and_then(|h| h.strip_suffix('.'))
            .is_some_and(|label| !label.is_empty()),
        None => host.eq_ignore_ascii_case(pattern),
    }
}

/// The non-empty segments of a URL path (`/a//b/` → `["a", "b"]`).
pub(crate) fn path_segments(path: &str) -> Vec<&str> {
    path.split('/').filter(|s| !s.is_empty()).collect()
}

/// The array at a dotted path of nested objects (no array walking); `""` or
/// `"$"` is the root itself.
pub(crate) fn array_at_mut<'a>(root: &'a mut Value, path: &str) -> Option<&'a mut Vec<Value>> {
    let mut cur = root;
    if !(path.is_empty() || path == "$") {
        for part in path.split('.') {
            cur = cur.as_object_mut()?.get_mut(part)?;
        }
    }
    cur.as_array_mut()
}

pub(crate) use crate::identify::percent_decode;

/// Enforce a request that carries exactly one event: one decision, and the
/// original bytes unchanged (a dropped single event blocks the request).
pub(crate) fn enforce_single(ids: &Identifiers, judge: &mut dyn Judge) -> super::Enforced {
    super::Enforced {
        body: None,
        events: vec![EventApplied::new(judge.decide(ids))],
        query: None,
    }
}

/// For a request that cannot leave without any one of the people it names (a
/// search, a merge, recipients inside raw MIME headers): once one of `applied`
/// is dropped, every kept one is dropped too, as `foreign_identifier` (the
/// request names someone it may not send for), so the whole request is refused
/// (`blocked_by_consent_policy`). Returns whether it did.
pub(crate) fn all_or_nothing(applied: &mut [EventApplied]) -> bool {
    if !applied.iter().any(|a| a.verdict.is_drop()) {
        return false;
    }
    for a in applied.iter_mut().filter(|a| !a.verdict.is_drop()) {
        a.verdict = EventVerdict::Drop(crate::decide::Reason::ForeignIdentifier);
    }
    true
}

/// A kept event that needs no rewriting (messaging and CRM vendors: no LDU).
pub(crate) fn keep_as_is(_: &mut Value, _: &crate::decide::Keep, _: &mut EventApplied) {}

/// Test support shared by the adapters: the fixture consent store, a decide
/// closure built from the default policy, and a leak check on output bytes.
#[cfg(test)]
pub(crate) mod testkit {
    use super::super::{Adapter, RequestView};
    use crate::consent::{ConsentRecord, ConsentStore};
    use crate::decide::{Context, EventVerdict, Policy};
    use crate::identify::Identifiers;
    use crate::model::{Category, Channel, DestKind};
    use md5::{Digest, Md5};

    pub(crate) fn store() -> ConsentStore {
        let store = ConsentStore::new();
        for line in include_str!("../../config/consent.example.jsonl").lines() {
            if line.trim().is_empty() {
                continue;
            }
            let rec = ConsentRecord::from_json(line.as_bytes()).expect("fixture record");
            store.upsert(rec);
        }
        store
    }

    pub(crate) fn decider(
        store: &ConsentStore,
        category: Category,
        channel: Option<Channel>,
        kind: DestKind,
    ) -> impl FnMut(&Identifiers) -> EventVerdict + '_ {
        let policy = Policy::default();
        let ctx = Context {
            category,
            channel,
            kind,
            header_gpc: false,
            stale: false,
        };
        move |ids: &Identifiers| policy.decide(&ctx, store.lookup(ids)).verdict
    }

    /// The adapter's own defaults: category, channel and kind.
    pub(crate) fn decider_for<'a>(
        a: &dyn Adapter,
        store: &'a ConsentStore,
    ) -> impl FnMut(&Identifiers) -> EventVerdict + 'a {
        decider(store, a.default_category(), a.channel(), a.kind())
    }

    pub(crate) fn req<'a>(
        method: &'a http::Method,
        host: &'a str,
        path: &'a str,
    ) -> RequestView<'a> {
        RequestView {
            method,
            host,
            path,
            query: None,
            content_type: Some("application/json"),
        }
    }

    pub(crate) fn md5_hex(s: &str) -> String {
        hex::encode(Md5::digest(s.as_bytes()))
    }

    /// Assert no trace of each email / phone in `out` (every form, see
    /// [`super::adkit::forms`]).
    pub(crate) fn assert_absent(out: &[u8], values: &[&str]) {
        super::adkit::assert_absent(out, values)
    }

    /// The verdicts' drop flags, in order.
    pub(crate) fn drops(events: &[super::EventApplied]) -> Vec<bool> {
        events.iter().map(|e| e.verdict.is_drop()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn paths_walk_arrays() {
        let mut v =
            json!({"user":{"email":["a@x.com","b@x.com"]},"contents":[{"n":"x","k":1},{"n":"y"}]});
        assert_eq!(strings_at(&v, "user.email").len(), 2);
        assert!(remove_at(&mut v, "contents.n"));
        assert_eq!(v["contents"], json!([{"k":1},{}]));
        set_at(&mut v, "consent.ad_user_data", json!("DENIED"));
        assert_eq!(v["consent"]["ad_user_data"], "DENIED");
    }

    #[test]
    fn urls_reduce_and_hashes_apply_once() {
        assert_eq!(reduce_url("https://h.org/oncology?q=1"), "https://h.org/");
        assert_eq!(reduce_url("not a url"), "");
        let mut v = json!({"em":["Jane@X.com", identify::sha256_hex(b"a@x.com")]});
        assert!(hash_at(&mut v, "em", identify::hash_email_for_vendor));
        assert_eq!(v["em"][0], identify::sha256_hex(b"jane@x.com"));
        assert!(!hash_at(&mut v, "em", identify::hash_email_for_vendor));
    }

    #[test]
    fn builtins_are_named_once_and_described() {
        let all = super::super::builtins();
        let mut names: Vec<&str> = all.iter().map(|a| a.name()).collect();
        names.sort_unstable();
        let n = names.len();
        names.dedup();
        assert_eq!(names.len(), n, "duplicate adapter name");
        for a in &all {
            assert!(!a.identifier_fields().is_empty(), "{}", a.name());
            assert!(!a.display_name().is_empty(), "{}", a.name());
        }
    }

    #[test]
    fn hosts_and_nested_arrays() {
        assert!(host_matches("*.api.mailchimp.com", "us6.api.mailchimp.com"));
        assert!(!host_matches("*.api.mailchimp.com", "api.mailchimp.com"));
        assert!(!host_matches(
            "*.api.mailchimp.com",
            "evilapi.mailchimp.com"
        ));
        assert!(host_matches("API.example.com", "api.example.com"));
        assert_eq!(path_segments("/a//b/"), vec!["a", "b"]);
        assert_eq!(percent_decode("j+x%40ex.com%2"), "j+x@ex.com%2");
        assert_eq!(percent_decode("%zz%é"), "%zz%é");
        let mut v = json!({"a":{"b":[1,2]}});
        assert_eq!(array_at_mut(&mut v, "a.b").map(|a| a.len()), Some(2));
        assert!(array_at_mut(&mut v, "a").is_none());
        let mut top = json!([1]);
        assert!(array_at_mut(&mut top, "$").is_some());
    }
}

/// Fixture-backed helpers for adapter tests: a store loaded with
/// `config/consent.example.jsonl`, the default policy, and a leak check.
#[cfg(test)]
pub(crate) mod adkit {
    use crate::decide::{Context, EventVerdict, Policy};
    use crate::identify::{self, Identifiers};
    use crate::model::{Category, DestKind};

    pub(crate) use super::testkit::store;

    /// The default policy for `advertising` on a destination of `kind`.
    pub(crate) fn decider(kind: DestKind) -> impl FnMut(&Identifiers) -> EventVerdict {
        let store = store();
        let policy = Policy::default();
        move |ids: &Identifiers| {
            let ctx = Context {
                category: Category::Advertising,
                channel: None,
                kind,
                header_gpc: false,
                stale: false,
            };
            policy.decide(&ctx, store.lookup(ids)).verdict
        }
    }

    use super::testkit::md5_hex;

    /// Every form an identifier could leave in: plain, lower-cased, phone
    /// digits and E.164, each also as SHA-256 hex and MD5 hex.
    pub(crate) fn forms(v: &str) -> Vec<String> {
        let mut base = vec![v.to_string(), v.trim().to_lowercase()];
        if let Some(d) = identify::normalize_phone(v) {
            if v.chars().filter(|c| c.is_ascii_digit()).count() >= 7 && !v.contains('@') {
                base.push(format!("+{d}"));
                base.push(d);
            }
        }
        if let Some(g) = identify::normalize_email(v).and_then(|n| identify::gmail_variant(&n)) {
            base.push(g);
        }
        let mut out = Vec::new();
        for b in base {
            out.push(identify::sha256_hex(b.as_bytes()));
            out.push(md5_hex(&b));
            out.push(b.to_lowercase());
        }
        out
    }

    /// Panics (naming the fixture, not the output) when any form of any of
    /// `values` occurs in `out`, raw or form-decoded.
    pub(crate) fn assert_absent(out: &[u8], values: &[&str]) {
        let raw = String::from_utf8_lossy(out).to_lowercase();
        let decoded = form_urlencoded::parse(out)
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("&")
            .to_lowercase();
        for v in values {
            for f in forms(v) {
                assert!(
                    !raw.contains(&f) && !decoded.contains(&f),
                    "a form of fixture identifier {v:?} leaked"
                );
            }
        }
    }

    /// Panics when any of `values` occurs in plain text in `out`, raw or
    /// form-decoded (kept events: their identifiers must leave hashed).
    pub(crate) fn assert_no_plaintext(out: &[u8], values: &[&str]) {
        let raw = String::from_utf8_lossy(out).to_lowercase();
        let decoded = form_urlencoded::parse(out)
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("&")
            .to_lowercase();
        for v in values {
            let v = v.to_lowercase();
            assert!(
                !raw.contains(&v) && !decoded.contains(&v),
                "fixture identifier {v:?} left in plain text"
            );
        }
    }
}
