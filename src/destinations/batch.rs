//! A batch of events enforced one event at a time, so that a large batch is
//! never held as a tree of parsed events (issue 14: the memory of one request
//! stays within a few times its body).
//!
//! Each event is parsed, decided and rewritten on its own and its kept form is
//! written straight into the output array. Once every event is decided, the
//! egress guard reads each kept event as written (an event may name a patient
//! whose own event comes later in the batch, so the guard cannot run before
//! the last decision), and the array is compacted in place: dropped events are
//! cut out, events the guard changed are written over their old text.

use super::common::{self, DUPLICATE_KEY};
use super::rawjson::{self, Node, Shape};
use super::{BodyError, Enforced, EventApplied, Judge};
use crate::decide::{EventVerdict, Keep};
use crate::identify::Identifiers;
use serde::de::{DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::Value;
use std::borrow::Cow;
use std::collections::HashSet;

/// Where one kept event stands in the output (16 bytes: a batch keeps one per
/// kept event).
struct Span {
    start: u32,
    len: u32,
    index: u32,
    /// The event leaves as a JSON string holding its JSON text.
    encoded: bool,
}

/// The output array of one batch, written event by event.
pub(crate) struct Batch<'o> {
    out: &'o mut Vec<u8>,
    /// Just after the array's `[`.
    start: usize,
    spans: Vec<Span>,
    applied: Vec<EventApplied>,
    scratch: Vec<u8>,
}

/// What the guard made of one kept event.
enum Guarded {
    Keep,
    /// Unknown contacts removed: this text leaves instead.
    Replace(Vec<u8>),
    /// It names someone this request may not send for.
    Drop,
}

impl<'o> Batch<'o> {
    pub(crate) fn new(out: &'o mut Vec<u8>, events: usize) -> Batch<'o> {
        out.push(b'[');
        let start = out.len();
        Batch {
            out,
            start,
            spans: Vec::with_capacity(events),
            applied: Vec::with_capacity(events),
            scratch: Vec::new(),
        }
    }

    /// An event that does not leave.
    pub(crate) fn dropped(&mut self, a: EventApplied) {
        self.applied.push(a);
    }

    /// An event that leaves as `write` writes it (as a JSON string of that text
    /// when `encoded`).
    pub(crate) fn kept(
        &mut self,
        a: EventApplied,
        encoded: bool,
        write: impl FnOnce(&mut Vec<u8>),
    ) -> Result<(), BodyError> {
        let index = self.applied.len();
        self.applied.push(a);
        if !self.spans.is_empty() {
            self.out.push(b',');
        }
        let start = self.out.len();
        if encoded {
            self.scratch.clear();
            write(&mut self.scratch);
            rawjson::write_str(self.out, &String::from_utf8_lossy(&self.scratch));
        } else {
            write(self.out);
        }
        let too_large = || BodyError::Unreadable("batch over 4 GiB".into());
        self.spans.push(Span {
            start: u32::try_from(start).map_err(|_| too_large())?,
            len: u32::try_from(self.out.len() - start).map_err(|_| too_large())?,
            index: u32::try_from(index).map_err(|_| too_large())?,
            encoded,
        });
        Ok(())
    }

    /// The guard over every kept event as written, the array closed, and
    /// whether anything changed with what was done per event (payload order).
    pub(crate) fn finish(
        self,
        judge: &mut dyn Judge,
    ) -> Result<(bool, Vec<EventApplied>), BodyError> {
        let Batch {
            out,
            start,
            spans,
            mut applied,
            ..
        } = self;
        let (mut w, mut shift, mut wrote) = (start, 0isize, false);
        for sp in spans {
            let (len, index) = (sp.len as usize, sp.index as usize);
            let s = (sp.start as usize).saturating_add_signed(shift);
            let e = s + len;
            let guarded = {
                let text: Cow<'_, [u8]> = match sp.encoded {
                    false => Cow::Borrowed(&out[s..e]),
                    true => Cow::Owned(unquote(&out[s..e])?),
                };
                let Some(a) = applied.get_mut(index) else {
                    continue;
                };
                guard_written(judge, index, &text, a)?
            };
            let replacement = match guarded {
                Guarded::Drop => continue,
                Guarded::Keep => None,
                Guarded::Replace(v) if sp.encoded => {
                    let mut q = Vec::with_capacity(v.len() + 16);
                    rawjson::write_str(&mut q, &String::from_utf8_lossy(&v));
                    Some(q)
                }
                Guarded::Replace(v) => Some(v),
            };
            if wrote {
                out[w] = b',';
                w += 1;
            }
            wrote = true;
            match replacement {
                None => {
                    out.copy_within(s..e, w);
                    w += len;
                }
                Some(v) if w + v.len() <= e => {
                    out[w..w + v.len()].copy_from_slice(&v);
                    w += v.len();
                }
                // Longer than the text it replaces (rare: numbers written
                // differently): the rest of the array moves along.
                Some(v) => {
                    let n = v.len();
                    out.splice(w..e, v);
                    shift += (w + n) as isize - e as isize;
                    w += n;
                }
            }
        }
        out.truncate(w);
        out.push(b']');
        let changed = applied.iter().any(EventApplied::changed);
        Ok((changed, applied))
    }
}

/// A kept event's text as it leaves, under the guard; rewalked as a value
/// tree only when an unknown contact must be removed.
fn guard_written(
    judge: &mut dyn Judge,
    index: usize,
    written: &[u8],
    a: &mut EventApplied,
) -> Result<Guarded, BodyError> {
    let scan = judge.guard_text(index, written);
    let foreign = || EventVerdict::Drop(crate::decide::Reason::ForeignIdentifier);
    if scan.foreign {
        a.verdict = foreign();
        return Ok(Guarded::Drop);
    }
    if !scan.unknown_contact {
        return Ok(Guarded::Keep);
    }
    let mut v: Value = serde_json::from_slice(written).map_err(|e| json_error(&e))?;
    match judge.guard(index, &mut v) {
        Ok(removed) => {
            if !removed.is_empty() {
                a.ch().fields_stripped.extend(removed);
            }
            Ok(Guarded::Replace(common::to_json(&v)))
        }
        Err(_) => {
            a.verdict = foreign();
            Ok(Guarded::Drop)
        }
    }
}

/// The text inside a JSON string literal.
fn unquote(lit: &[u8]) -> Result<Vec<u8>, BodyError> {
    serde_json::from_slice::<String>(lit)
        .map(String::into_bytes)
        .map_err(|e| json_error(&e))
}

/// The answer for JSON that does not parse, or repeats a key.
pub(crate) fn json_error(e: &serde_json::Error) -> BodyError {
    let what = if e.to_string().contains(DUPLICATE_KEY) {
        DUPLICATE_KEY
    } else {
        "invalid JSON"
    };
    BodyError::Unreadable(format!("{what} at line {} column {}", e.line(), e.column()))
}

/// Enforce the array at `key` of a top-level JSON object (`{"data":[...]}`),
/// one event at a time. An absent or non-array `key` is unreadable for the
/// destination; so is a repeated key anywhere in the body.
pub(crate) fn enforce_json_batch(
    body: &[u8],
    key: &'static str,
    judge: &mut dyn Judge,
    identify: &dyn Fn(&Value) -> Identifiers,
    apply: &dyn Fn(&mut Value, &Keep, &mut EventApplied),
) -> Result<Enforced, BodyError> {
    enforce_json_batch_checked(body, key, judge, &|_| Ok(()), identify, apply)
}

/// [`enforce_json_batch`], each event first passed through `check` (the
/// shape rule: see `shapes.rs`).
pub(crate) fn enforce_json_batch_checked(
    body: &[u8],
    key: &'static str,
    judge: &mut dyn Judge,
    check: &dyn Fn(&Value) -> Result<(), BodyError>,
    identify: &dyn Fn(&Value) -> Identifiers,
    apply: &dyn Fn(&mut Value, &Keep, &mut EventApplied),
) -> Result<Enforced, BodyError> {
    let doc = rawjson::Doc::parse(body, key).map_err(|e| json_error(&e))?;
    let missing = || BodyError::Unreadable(format!("`{key}` is missing or not an array"));
    let (Shape::Object(root), Some(Shape::Array(events))) = (doc.root, doc.special) else {
        return Err(missing());
    };
    // The fields beside the events leave as they came: no key may repeat in them.
    for (_, node) in &root.entries {
        if let Node::Raw(r) = node {
            check_unique_keys(r.get()).map_err(|e| json_error(&e))?;
        }
    }
    let mut out = Vec::with_capacity(body.len() + body.len() / 2);
    let written = root.write_with(&mut out, key, |out| {
        let mut batch = Batch::new(out, events.len());
        for raw in events {
            let mut ev = common::strict_json_str(raw.get()).map_err(|e| json_error(&e))?;
            check(&ev)?;
            let verdict = judge.decide(&identify(&ev));
            let mut a = EventApplied::new(verdict);
            match verdict {
                EventVerdict::Drop(_) => batch.dropped(a),
                EventVerdict::Keep(k) => {
                    apply(&mut ev, &k, &mut a);
                    // Writing a Value to a Vec cannot fail (keys are strings).
                    batch.kept(a, false, |o| {
                        let _ = serde_json::to_writer(o, &ev);
                    })?;
                }
            }
        }
        batch.finish(judge)
    })?;
    let Some((changed, applied)) = written else {
        return Err(missing());
    };
    Ok(Enforced {
        body: changed.then_some(out),
        events: applied,
        query: None,
    })
}

/// Refuse JSON text in which an object repeats a key, without building it.
fn check_unique_keys(text: &str) -> Result<(), serde_json::Error> {
    let mut de = serde_json::Deserializer::from_str(text);
    Unique.deserialize(&mut de)?;
    de.end()
}

#[derive(Clone, Copy)]
struct Unique;

impl<'de> DeserializeSeed<'de> for Unique {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Unique {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<(), A::Error> {
        while a.next_element_seed(Unique)?.is_some() {}
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<(), A::Error> {
        let mut seen: HashSet<Cow<'de, str>> = HashSet::new();
        while let Some(k) = a.next_key::<rawjson::Key<'de>>()? {
            if !seen.insert(k.0) {
                return Err(serde::de::Error::custom(DUPLICATE_KEY));
            }
            a.next_value_seed(Unique)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_keys_are_found_at_any_depth_without_a_tree() {
        assert!(check_unique_keys(r#"{"a":1,"b":{"c":[{"d":1}]}}"#).is_ok());
        for bad in [
            r#"{"a":1,"a":2}"#,
            r#"{"b":{"c":[{"d":1,"d":2}]}}"#,
            r#"[{"x":{"y":1,"y":1}}]"#,
        ] {
            let e = check_unique_keys(bad).unwrap_err();
            assert!(e.to_string().contains(DUPLICATE_KEY), "{bad}: {e}");
        }
        assert!(check_unique_keys("{").is_err());
    }
}
