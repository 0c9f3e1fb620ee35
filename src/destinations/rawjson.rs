//! Lazy JSON objects for the hot adapters: an object is parsed into its
//! ordered `(key, raw value)` pairs, values stay borrowed slices of the input
//! ([`RawValue`]) until an adapter needs one, and writing an object copies the
//! untouched slices as they came.
//!
//! An object with a repeated key is refused (a syntax-level error naming
//! [`common::DUPLICATE_KEY`]): what an adapter inspects must be exactly what a
//! vendor reads, whichever of two values the vendor would keep.

use super::common;
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::Value;
use std::borrow::Cow;
use std::fmt;

/// An object key, borrowed from the input unless it had escapes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Key<'a>(pub Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string key")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_string())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

/// A value of a lazy object: as it came, parsed, or an object of its own.
#[derive(Debug)]
pub(crate) enum Node<'a> {
    Raw(&'a RawValue),
    Val(Value),
    Obj(Object<'a>),
}

impl<'a> Node<'a> {
    /// The first byte of the JSON text (`{`, `[`, `"`, digit, `t`, `f`, `n`).
    pub(crate) fn lead(&self) -> u8 {
        match self {
            Node::Raw(r) => r.get().as_bytes().first().copied().unwrap_or(b' '),
            Node::Val(Value::Object(_)) | Node::Obj(_) => b'{',
            Node::Val(Value::Array(_)) => b'[',
            Node::Val(Value::String(_)) => b'"',
            Node::Val(_) => b'0',
        }
    }

    /// The value as a `serde_json::Value` (parsed from the raw text if need be).
    pub(crate) fn to_value(&self) -> Result<Value, serde_json::Error> {
        match self {
            Node::Raw(r) => common::strict_json_str(r.get()),
            Node::Val(v) => Ok(v.clone()),
            Node::Obj(o) => o.to_value(),
        }
    }

    /// Move the value out as a `serde_json::Value` (parsed if need be),
    /// leaving `null` behind.
    pub(crate) fn take_value(&mut self) -> Result<Value, serde_json::Error> {
        match std::mem::replace(self, Node::Val(Value::Null)) {
            Node::Raw(r) => common::strict_json_str(r.get()),
            Node::Val(v) => Ok(v),
            Node::Obj(o) => o.to_value(),
        }
    }

    pub(crate) fn write(&self, out: &mut Vec<u8>) {
        match self {
            Node::Raw(r) => out.extend_from_slice(r.get().as_bytes()),
            // Writing a Value to a Vec cannot fail (keys are strings).
            Node::Val(v) => {
                let _ = serde_json::to_writer(&mut *out, v);
            }
            Node::Obj(o) => o.write(out),
        }
    }
}

/// The writer [`Object::write`] passes: it names no key, so it never runs.
type WriteNothing = fn(&mut Vec<u8>) -> Result<(), ()>;

/// A JSON object as ordered entries, duplicate keys merged (see the module doc).
#[derive(Debug, Default)]
pub(crate) struct Object<'a> {
    pub entries: Vec<(Key<'a>, Node<'a>)>,
}

impl<'a> Object<'a> {
    /// Parse `text`, which must be one JSON object.
    pub(crate) fn parse(text: &'a str) -> Result<Object<'a>, serde_json::Error> {
        serde_json::from_str(text)
    }

    pub(crate) fn position(&self, key: &str) -> Option<usize> {
        self.entries.iter().position(|(k, _)| k.0 == key)
    }

    pub(crate) fn get(&self, key: &str) -> Option<&Node<'a>> {
        self.entries
            .iter()
            .find(|(k, _)| k.0 == key)
            .map(|(_, v)| v)
    }

    pub(crate) fn get_mut(&mut self, key: &str) -> Option<&mut Node<'a>> {
        self.entries
            .iter_mut()
            .find(|(k, _)| k.0 == key)
            .map(|(_, v)| v)
    }

    /// Replace the value of `key` in place, or append it (`Map::insert`).
    pub(crate) fn insert(&mut self, key: &'static str, value: Node<'a>) {
        match self.get_mut(key) {
            Some(v) => *v = value,
            None => self.entries.push((Key(Cow::Borrowed(key)), value)),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// An object from a parsed one (values kept parsed).
    pub(crate) fn from_value(v: Value) -> Object<'a> {
        let entries = match v {
            Value::Object(m) => m
                .into_iter()
                .map(|(k, v)| (Key(Cow::Owned(k)), Node::Val(v)))
                .collect(),
            _ => Vec::new(),
        };
        Object { entries }
    }

    /// Write as compact JSON (raw values as they came).
    pub(crate) fn write(&self, out: &mut Vec<u8>) {
        let _ = self.write_entries(out, None::<(&str, WriteNothing)>);
    }

    /// [`Object::write`], with the value of `key` written by `f` (called once,
    /// when `key` is reached; `None` when the object has no such key).
    pub(crate) fn write_with<R, E>(
        &self,
        out: &mut Vec<u8>,
        key: &str,
        f: impl FnOnce(&mut Vec<u8>) -> Result<R, E>,
    ) -> Result<Option<R>, E> {
        self.write_entries(out, Some((key, f)))
    }

    /// Write the entries, the value of the named key (if any) by its writer.
    fn write_entries<R, E>(
        &self,
        out: &mut Vec<u8>,
        replace: Option<(&str, impl FnOnce(&mut Vec<u8>) -> Result<R, E>)>,
    ) -> Result<Option<R>, E> {
        let mut replace = replace;
        let mut result = None;
        out.push(b'{');
        for (i, (k, v)) in self.entries.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            write_str(out, &k.0);
            out.push(b':');
            match replace.take_if(|(key, _)| k.0 == *key) {
                Some((_, f)) => result = Some(f(out)?),
                None => v.write(out),
            }
        }
        out.push(b'}');
        Ok(result)
    }

    /// The whole object as a `serde_json::Value`.
    pub(crate) fn to_value(&self) -> Result<Value, serde_json::Error> {
        let mut m = serde_json::Map::with_capacity(self.entries.len());
        for (k, v) in &self.entries {
            m.insert(k.0.to_string(), v.to_value()?);
        }
        Ok(Value::Object(m))
    }

    /// Whether a key occurs twice. Such a body is refused (see
    /// [`common::DUPLICATE_KEY`]): a vendor that keeps the first value would
    /// read something the proxy never decided on.
    fn has_duplicates(&self) -> bool {
        let n = self.entries.len();
        if n <= 16 {
            (1..n).any(|i| (0..i).any(|j| self.entries[j].0 == self.entries[i].0))
        } else {
            let mut seen = std::collections::HashSet::with_capacity(n);
            !self.entries.iter().all(|(k, _)| seen.insert(k.0.as_ref()))
        }
    }
}

impl<'de> Deserialize<'de> for Object<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Object<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Object<'de>, A::Error> {
                let mut o = Object {
                    entries: Vec::with_capacity(map.size_hint().unwrap_or(8)),
                };
                while let Some(k) = map.next_key::<Key<'de>>()? {
                    let v: &'de RawValue = map.next_value()?;
                    o.entries.push((k, Node::Raw(v)));
                }
                if o.has_duplicates() {
                    return Err(de::Error::custom(common::DUPLICATE_KEY));
                }
                Ok(o)
            }
        }
        d.deserialize_map(V)
    }
}

/// Any JSON value, sorted by what an adapter does with it: an object (lazy),
/// an array (its elements sorted the same way), a string, or something else
/// (syntax checked, not kept).
#[derive(Debug)]
pub(crate) enum Shape<'a> {
    Object(Object<'a>),
    /// An array's elements as they came (each sorted when it is read).
    Array(Vec<&'a RawValue>),
    Str(Cow<'a, str>),
    Other,
}

/// A document whose top level is sorted as a [`Shape`]; when it is an object,
/// the value of `key` is sorted as a [`Shape`] too (in `special`; its entry in
/// the object holds `null`).
#[derive(Debug)]
pub(crate) struct Doc<'a> {
    pub root: Shape<'a>,
    pub special: Option<Shape<'a>>,
}

struct ShapeVisitor<'s, 'a> {
    special_key: Option<&'static str>,
    special: &'s mut Option<Shape<'a>>,
}

impl<'de> Visitor<'de> for ShapeVisitor<'_, 'de> {
    type Value = Shape<'de>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Shape<'de>, A::Error> {
        let mut o = Object {
            entries: Vec::with_capacity(map.size_hint().unwrap_or(8)),
        };
        while let Some(k) = map.next_key::<Key<'de>>()? {
            if Some(k.0.as_ref()) == self.special_key {
                *self.special = Some(map.next_value::<Shape<'de>>()?);
                o.entries.push((k, Node::Val(Value::Null)));
            } else {
                let v: &'de RawValue = map.next_value()?;
                o.entries.push((k, Node::Raw(v)));
            }
        }
        if o.has_duplicates() {
            return Err(de::Error::custom(common::DUPLICATE_KEY));
        }
        Ok(Shape::Object(o))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Shape<'de>, A::Error> {
        let mut v = Vec::with_capacity(seq.size_hint().unwrap_or(16));
        while let Some(el) = seq.next_element::<&'de RawValue>()? {
            v.push(el);
        }
        Ok(Shape::Array(v))
    }
    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Shape<'de>, E> {
        Ok(Shape::Str(Cow::Borrowed(v)))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Shape<'de>, E> {
        Ok(Shape::Str(Cow::Owned(v.to_string())))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Shape<'de>, E> {
        Ok(Shape::Str(Cow::Owned(v)))
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Shape<'de>, E> {
        Ok(Shape::Other)
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Shape<'de>, E> {
        Ok(Shape::Other)
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Shape<'de>, E> {
        Ok(Shape::Other)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Shape<'de>, E> {
        Ok(Shape::Other)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Shape<'de>, E> {
        Ok(Shape::Other)
    }
}

impl<'de> Deserialize<'de> for Shape<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut none = None;
        d.deserialize_any(ShapeVisitor {
            special_key: None,
            special: &mut none,
        })
    }
}

impl<'a> Shape<'a> {
    /// Parse `text` as one JSON value.
    pub(crate) fn parse(text: &'a str) -> Result<Shape<'a>, serde_json::Error> {
        serde_json::from_str(text)
    }
}

impl<'a> Doc<'a> {
    /// Parse `bytes` (UTF-8 JSON) as one value, sorting `key` of a top-level
    /// object as a shape of its own.
    pub(crate) fn parse(bytes: &'a [u8], key: &'static str) -> Result<Doc<'a>, serde_json::Error> {
        let mut de = serde_json::Deserializer::from_slice(bytes);
        let mut special = None;
        let root = serde::Deserializer::deserialize_any(
            &mut de,
            ShapeVisitor {
                special_key: Some(key),
                special: &mut special,
            },
        )?;
        de.end()?;
        Ok(Doc { root, special })
    }
}

/// Append `s` as a JSON string, escaped the way serde_json writes strings.
pub(crate) fn write_str(out: &mut Vec<u8>, s: &str) {
    // Writing a str to a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_values_survive_and_duplicate_keys_are_refused() {
        let text = r#"{"a":1,"b":{"x" : [1, 2]},"c\u0041":true}"#;
        let o = Object::parse(text).unwrap();
        let keys: Vec<&str> = o.entries.iter().map(|(k, _)| k.0.as_ref()).collect();
        assert_eq!(keys, ["a", "b", "cA"]);
        let mut out = Vec::new();
        o.write(&mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"a":1,"b":{"x" : [1, 2]},"cA":true}"#
        );
        for dup in [r#"{"a":1,"b":2,"a":"last"}"#, r#"{"a":1,"\u0061":2}"#] {
            let e = Object::parse(dup).unwrap_err();
            assert!(e.to_string().contains(common::DUPLICATE_KEY), "{e}");
        }
        let mut many = String::from("{");
        for i in 0..40 {
            many.push_str(&format!("\"k{}\":{i},", i % 20));
        }
        many.push_str("\"end\":0}");
        assert!(Object::parse(&many).is_err());
        // Inside a raw value the strict parse applies when it is taken.
        let o = Object::parse(r#"{"u":{"em":"a","em":"b"}}"#).unwrap();
        let mut n = o.entries.into_iter().next().unwrap().1;
        assert!(n.take_value().is_err());
    }

    #[test]
    fn shapes() {
        assert!(matches!(Shape::parse("[1,{}]"), Ok(Shape::Array(a)) if a.len() == 2));
        let d = Doc::parse(br#"{"a":1,"data":[{"x":1},"s"]}"#, "data").unwrap();
        assert!(matches!(d.special, Some(Shape::Array(a)) if a.len() == 2));
        assert!(matches!(d.root, Shape::Object(o) if o.len() == 2));
        assert!(Doc::parse(br#"{"a":1,"data":[{"x":1},"s"],"data":[{}]}"#, "data").is_err());
        assert!(matches!(Shape::parse(r#""a\"b""#), Ok(Shape::Str(s)) if s == "a\"b"));
        assert!(matches!(Shape::parse("1e5"), Ok(Shape::Other)));
        assert!(matches!(Shape::parse("null"), Ok(Shape::Other)));
        assert!(Shape::parse("[1,").is_err());
        assert!(Shape::parse("{} x").is_err());
        assert!(Object::parse("[]").is_err());
        let mut n = Node::Raw(serde_json::from_str::<&RawValue>("[\"x\"]").unwrap());
        assert_eq!(n.lead(), b'[');
        assert_eq!(n.take_value().unwrap(), serde_json::json!(["x"]));
    }
}
