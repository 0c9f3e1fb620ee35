//! The egress guard's shape rule (SPEC §6): an identity field in a shape the
//! adapter does not know (an object where a string or a list of strings is
//! expected), or a key that differs only in case or separators from a known
//! identity or container key (`EM`, `User_Data`), makes the request
//! `unreadable_body` naming the field path. A vendor may read what the adapter
//! would skip, so such a field is never passed unread.

use super::BodyError;
use serde_json::Value;

/// A key as compared for look-alikes: lower case, without `_`, `-`, `.` or spaces.
fn folded(k: &str) -> impl Iterator<Item = char> + '_ {
    k.chars()
        .filter(|c| !matches!(c, '_' | '-' | '.' | ' '))
        .flat_map(char::to_lowercase)
}

/// The known keys of one object level: the object's dotted path ("" for the
/// event) and the keys an identity path names there.
struct Level<'p> {
    at: String,
    keys: Vec<&'p str>,
}

fn levels<'p>(paths: &[&'p str]) -> Vec<Level<'p>> {
    let mut out: Vec<Level<'p>> = Vec::new();
    for p in paths {
        let segs: Vec<&str> = p.split('.').collect();
        for i in 0..segs.len() {
            let at = segs[..i].join(".");
            let key = segs[i];
            match out.iter_mut().find(|l| l.at == at) {
                Some(l) if !l.keys.contains(&key) => l.keys.push(key),
                Some(_) => {}
                None => out.push(Level {
                    at,
                    keys: vec![key],
                }),
            }
        }
    }
    out
}

fn joined(at: &str, key: &str) -> String {
    match at {
        "" => key.to_string(),
        _ => format!("{at}.{key}"),
    }
}

/// Refuse `key` (at `at`) when it is a look-alike of one of `known`.
pub(crate) fn check_key(at: &str, key: &str, known: &[&str]) -> Result<(), BodyError> {
    if known.contains(&key) {
        return Ok(());
    }
    // Compared as they fold, without building a string: this runs on every
    // key of every event.
    match known.iter().find(|k| folded(k).eq(folded(key))) {
        Some(k) => Err(BodyError::Unreadable(format!(
            "field `{}` differs from `{}` only in case or separators: ambiguous identity \
             fields are not forwarded",
            joined(at, key),
            joined(at, k)
        ))),
        None => Ok(()),
    }
}

/// Refuse an identity value that is not a string, a number or a list of them.
pub(crate) fn check_leaf(path: &str, v: &Value) -> Result<(), BodyError> {
    let scalar = |v: &Value| !matches!(v, Value::Object(_) | Value::Array(_));
    let ok = match v {
        Value::Array(a) => a.iter().all(scalar),
        v => scalar(v),
    };
    match ok {
        true => Ok(()),
        false => Err(BodyError::Unreadable(format!(
            "field `{path}` is not a string or a list of strings: an identity field in an \
             unknown shape is not forwarded"
        ))),
    }
}

/// Every object at dotted path `at` of `v` (arrays on the way walked).
fn objects_at<'v>(v: &'v Value, at: &str, out: &mut Vec<&'v serde_json::Map<String, Value>>) {
    match v {
        Value::Array(a) => a.iter().for_each(|x| objects_at(x, at, out)),
        Value::Object(m) => match at.split_once('.') {
            _ if at.is_empty() => out.push(m),
            Some((head, rest)) => {
                if let Some(x) = m.get(head) {
                    objects_at(x, rest, out);
                }
            }
            None => {
                if let Some(x) = m.get(at) {
                    objects_at(x, "", out);
                }
            }
        },
        _ => {}
    }
}

/// The shape rule for one adapter's identity paths (dotted, inside an event),
/// prepared once per body.
pub(crate) struct Shapes<'p> {
    paths: Vec<&'p str>,
    levels: Vec<Level<'p>>,
}

impl<'p> Shapes<'p> {
    pub(crate) fn new(paths: Vec<&'p str>) -> Shapes<'p> {
        let levels = levels(&paths);
        Shapes { paths, levels }
    }

    /// The rule over one event given as a value tree.
    pub(crate) fn check(&self, ev: &Value) -> Result<(), BodyError> {
        for level in &self.levels {
            let mut objs = Vec::new();
            objects_at(ev, &level.at, &mut objs);
            for m in objs {
                for (k, x) in m {
                    check_key(&level.at, k, &level.keys)?;
                    let path = joined(&level.at, k);
                    let is_leaf = self.paths.contains(&path.as_str());
                    let is_container = !is_leaf && level.keys.contains(&k.as_str());
                    if is_leaf {
                        check_leaf(&path, x)?;
                    } else if is_container && !matches!(x, Value::Object(_) | Value::Null) {
                        return Err(not_an_object(&path));
                    }
                }
            }
        }
        Ok(())
    }
}

/// The refusal for an identity container that is not an object.
pub(crate) fn not_an_object(path: &str) -> BodyError {
    BodyError::Unreadable(format!(
        "field `{path}` is not an object: an identity container in an unknown shape is not \
         forwarded"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const PATHS: &[&str] = &["user_data.em", "user_data.ph", "user_data.external_id"];

    fn refused(ev: Value) -> String {
        match Shapes::new(PATHS.to_vec()).check(&ev) {
            Err(BodyError::Unreadable(d)) => d,
            other => panic!("{ev}: {other:?}"),
        }
    }

    #[test]
    fn look_alike_keys_and_odd_shapes_are_refused_with_their_path() {
        let shapes = Shapes::new(PATHS.to_vec());
        assert!(shapes
            .check(&json!({"user_data": {"em": ["a@b.c"], "ph": "1", "fbp": "x"}}))
            .is_ok());
        assert!(shapes.check(&json!({"event_name": "x"})).is_ok());
        assert!(refused(json!({"user_data": {"EM": ["a@b.c"]}})).contains("`user_data.EM`"));
        assert!(refused(json!({"User_Data": {"em": "a@b.c"}})).contains("`User_Data`"));
        assert!(refused(json!({"userdata": {}})).contains("`userdata`"));
        assert!(refused(json!({"user_data": {"external-id": "1"}})).contains("external-id"));
        assert!(refused(json!({"user_data": {"em": {"v": "a@b.c"}}})).contains("`user_data.em`"));
        assert!(refused(json!({"user_data": {"em": [{"v": "a@b.c"}]}})).contains("`user_data.em`"));
        assert!(refused(json!({"user_data": ["a@b.c"]})).contains("`user_data`"));
        // The value is never echoed.
        assert!(!refused(json!({"user_data": {"em": {"v": "a@b.c"}}})).contains("a@b.c"));
    }
}
