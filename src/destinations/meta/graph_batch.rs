//! Meta's Graph batch call: `POST graph.facebook.com/v{N}/` (or `/`, the path
//! empty after the version) with a `batch` field, a JSON array of calls
//! `{method, relative_url, body}`. The official SDKs build it this way
//! (`FacebookAdsApiBatch.execute` in Python: a form body, `batch` as JSON;
//! Node: a JSON body, `batch` an array): each call's `relative_url` names the
//! endpoint (`{pixel}/events`, with or without a version) and its `body` is a
//! form-encoded string (`data=[…]`, percent-encoded by Python, raw JSON by Node).
//!
//! - A `POST` call to `…/{pixel}/events` is enforced as the events endpoint is
//!   (its `body` read as the form body of a single call, event by event), and its
//!   rewritten body replaces the old one. Its `relative_url` query may carry only
//!   `access_token` / `appsecret_proof`; other fields in its body are kept.
//! - Any other call with a body or a query string is refused as
//!   `uninspected_endpoint` (451), as the same call on its own would be; one with
//!   neither (a `GET` of a node) leaves as it came.
//! - A call whose events are all dropped stays in the batch with `data=[]`, so
//!   Graph's answers stay in the order the SDK matches them to its calls (Graph
//!   answers that call alone with an error). When every event of the batch is
//!   dropped the request is refused (`blocked_by_consent_policy`).
//! - Every event is decided before the guard reads any kept one (an event may
//!   name a patient whose own event is in a later call): the calls are read
//!   twice, first for the decisions, then with those decisions to rewrite them.
//!
//! A call that is not an object, lacks a string `method` or `relative_url`, has a
//! non-string `body` or a key Graph's batch format does not have, and a `batch`
//! that is missing, repeated or not a JSON array, are unreadable (422).

use super::{enforce_form, MetaCapi};
use crate::decide::EventVerdict;
use crate::destinations::{common, Adapter, BodyError, Enforced, EventApplied, Judge, RequestView};
use crate::identify::Identifiers;
use crate::model::Channel;
use http::Method;
use serde_json::Value;

/// The keys of one batch call (Graph's, and the Node SDK's `attachedFiles`).
const CALL_KEYS: &[&str] = &[
    "method",
    "relative_url",
    "body",
    "name",
    "depends_on",
    "omit_response_on_success",
    "headers",
    "attached_files",
    "attachedFiles",
];

/// Whether `path` is the Graph root a batch is posted to: `/`, `/v{N}`, `/v{N}/`.
pub(super) fn is_batch_path(method: &Method, path: &str) -> bool {
    if *method != Method::POST {
        return false;
    }
    let Some(rest) = path.strip_prefix('/') else {
        return false;
    };
    rest.is_empty() || is_version(rest.strip_suffix('/').unwrap_or(rest))
}

/// `v21.0`, `v3`: Graph's version segment.
fn is_version(s: &str) -> bool {
    let Some(n) = s.strip_prefix('v') else {
        return false;
    };
    let (major, minor) = n.split_once('.').unwrap_or((n, "0"));
    !major.is_empty()
        && !minor.is_empty()
        && major.bytes().all(|b| b.is_ascii_digit())
        && minor.bytes().all(|b| b.is_ascii_digit())
}

/// A batch body (form or JSON, as [`MetaCapi`] reads a body).
pub(super) fn enforce(
    req: &RequestView<'_>,
    body: &[u8],
    judge: &mut dyn Judge,
) -> Result<Enforced, BodyError> {
    let json = match req.content_type {
        Some("application/json") => true,
        Some("application/x-www-form-urlencoded") => false,
        Some("multipart/form-data") => {
            return Err(BodyError::Unreadable(
                "multipart bodies are not supported for Meta; send JSON or form-encoded".into(),
            ))
        }
        _ => body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{'),
    };
    if json {
        enforce_json(body, judge)
    } else {
        enforce_form_body(body, judge)
    }
}

fn missing_batch() -> BodyError {
    BodyError::Unreadable("a POST to the Graph root is a batch call: `batch` is missing".into())
}

/// The calls of a `batch` given as JSON text.
fn parse_calls(text: &str) -> Result<Vec<Value>, BodyError> {
    match common::strict_json_str(text) {
        Ok(Value::Array(a)) => Ok(a),
        Ok(_) => Err(BodyError::Unreadable("`batch` is not a JSON array".into())),
        Err(e) => Err(super::invalid_json(&e)),
    }
}

fn enforce_json(body: &[u8], judge: &mut dyn Judge) -> Result<Enforced, BodyError> {
    let mut root = common::parse_json(body)?;
    let Value::Object(obj) = &mut root else {
        return Err(missing_batch());
    };
    let (mut calls, as_text) = match obj.get("batch") {
        Some(Value::Array(a)) => (a.clone(), false),
        Some(Value::String(s)) => (parse_calls(s)?, true),
        Some(_) => return Err(BodyError::Unreadable("`batch` is not a JSON array".into())),
        None => return Err(missing_batch()),
    };
    let (changed, events) = enforce_calls(&mut calls, judge)?;
    if changed {
        let batch = match as_text {
            true => Value::String(
                String::from_utf8_lossy(&common::to_json(&Value::Array(calls))).into(),
            ),
            false => Value::Array(calls),
        };
        obj.insert("batch".into(), batch);
    }
    Ok(rewritten(changed, events, || common::to_json(&root)))
}

/// The body as enforced: written again only when a call changed.
fn rewritten(
    changed: bool,
    events: Vec<EventApplied>,
    write: impl FnOnce() -> Vec<u8>,
) -> Enforced {
    Enforced {
        body: changed.then(write),
        events,
        query: None,
    }
}

fn enforce_form_body(body: &[u8], judge: &mut dyn Judge) -> Result<Enforced, BodyError> {
    if std::str::from_utf8(body).is_err() {
        return Err(BodyError::Unreadable("form body is not UTF-8".into()));
    }
    let mut pairs = common::parse_form(body);
    let mut at = pairs.iter().enumerate().filter(|(_, (k, _))| k == "batch");
    let i = match (at.next(), at.next()) {
        (Some((i, _)), None) => i,
        (None, _) => return Err(missing_batch()),
        (Some(_), Some(_)) => {
            return Err(BodyError::Unreadable(
                "form field `batch` occurs more than once".into(),
            ))
        }
    };
    let mut calls = parse_calls(&pairs[i].1)?;
    let (changed, events) = enforce_calls(&mut calls, judge)?;
    Ok(rewritten(changed, events, || {
        pairs[i].1 = String::from_utf8_lossy(&common::to_json(&Value::Array(calls))).into_owned();
        common::encode_form(&pairs)
    }))
}

/// What one call is: an events call (its body), or another call that carries
/// nothing (it leaves as it came). Any other call is an error.
fn classify(i: usize, call: &Value) -> Result<Option<String>, BodyError> {
    let bad = |what: &str| BodyError::Unreadable(format!("`batch[{i}]` {what}"));
    let Value::Object(m) = call else {
        return Err(bad("is not an object"));
    };
    if m.keys().any(|k| !CALL_KEYS.contains(&k.as_str())) {
        return Err(bad("has a key that is not part of a Graph batch call"));
    }
    let Some(method) = m.get("method").and_then(Value::as_str) else {
        return Err(bad("has no string `method`"));
    };
    let Some(url) = m.get("relative_url").and_then(Value::as_str) else {
        return Err(bad("has no string `relative_url`"));
    };
    let body = match m.get("body") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.as_str()),
        Some(_) => return Err(bad("has a `body` that is not a form-encoded string")),
    };
    let (path, query) = match url.split_once('?') {
        Some((p, q)) => (p, Some(q).filter(|q| !q.is_empty())),
        None => (url, None),
    };
    let events = method.eq_ignore_ascii_case("POST")
        && MetaCapi.inspects(
            &Method::POST,
            &format!("/{}", path.strip_prefix('/').unwrap_or(path)),
        );
    if !events {
        if body.is_some_and(|b| !b.trim().is_empty()) || query.is_some() {
            return Err(BodyError::Forbidden {
                code: "uninspected_endpoint",
                detail: format!(
                    "`batch[{i}]` calls a Graph endpoint consentgate does not inspect with a \
                     body or a query string, so the batch is refused (in a batch only POST \
                     `{{pixel}}/events` calls are inspected; calls with neither pass)"
                ),
            });
        }
        return Ok(None);
    }
    if let Some(q) = query {
        let read = MetaCapi.query_params();
        if form_urlencoded::parse(q.as_bytes())
            .any(|(k, _)| !read.iter().any(|r| r.eq_ignore_ascii_case(&k)))
        {
            return Err(bad(
                "has a query parameter on its events call that consentgate does not read, so \
                 it is not sent: send the data in the call's body",
            ));
        }
    }
    match body {
        Some(b) => Ok(Some(b.to_string())),
        None => Err(bad("posts to an events endpoint without a `body`")),
    }
}

/// Every events call enforced in place; whether anything changed and what was
/// done per event (batch order).
fn enforce_calls(
    calls: &mut [Value],
    judge: &mut dyn Judge,
) -> Result<(bool, Vec<EventApplied>), BodyError> {
    let bodies: Vec<Option<String>> = calls
        .iter()
        .enumerate()
        .map(|(i, c)| classify(i, c))
        .collect::<Result<_, _>>()?;
    // First every decision, then the rewrite under the guard with them.
    let mut record = Record {
        judge: &mut *judge,
        verdicts: Vec::new(),
    };
    for b in bodies.iter().flatten() {
        enforce_form(b.as_bytes(), &mut record)?;
    }
    let mut replay = Replay {
        verdicts: std::mem::take(&mut record.verdicts).into_iter(),
        judge,
        base: 0,
    };
    let (mut changed, mut events) = (false, Vec::new());
    for (call, body) in calls.iter_mut().zip(&bodies) {
        let Some(b) = body else { continue };
        let out = enforce_form(b.as_bytes(), &mut replay)?;
        replay.base += out.events.len();
        events.extend(out.events);
        if let (Some(new), Value::Object(m)) = (out.body, call) {
            m.insert(
                "body".into(),
                Value::String(String::from_utf8_lossy(&new).into_owned()),
            );
            changed = true;
        }
    }
    Ok((changed, events))
}

/// The first read: each decision asked of the judge (and so recorded) and kept;
/// no guard yet.
struct Record<'j> {
    judge: &'j mut dyn Judge,
    verdicts: Vec<EventVerdict>,
}

impl Judge for Record<'_> {
    fn decide(&mut self, ids: &Identifiers) -> EventVerdict {
        let v = self.judge.decide(ids);
        self.verdicts.push(v);
        v
    }
    fn decide_on(
        &mut self,
        ids: &Identifiers,
        channels: &[Option<Channel>],
        record: bool,
    ) -> EventVerdict {
        let v = self.judge.decide_on(ids, channels, record);
        self.verdicts.push(v);
        v
    }
    fn guard(&mut self, _: usize, _: &mut Value) -> Result<Vec<String>, crate::guard::Reason> {
        Ok(Vec::new())
    }
    fn guard_text(&mut self, _: usize, _: &[u8]) -> crate::guard::Scan {
        crate::guard::Scan::default()
    }
}

/// The second read: the recorded decisions in the same order, and the guard of
/// the judge at the event's index in the whole batch.
struct Replay<'j> {
    judge: &'j mut dyn Judge,
    verdicts: std::vec::IntoIter<EventVerdict>,
    /// Events of the calls before this one.
    base: usize,
}

impl Replay<'_> {
    fn next(&mut self) -> EventVerdict {
        // The same bodies read the same way ask as often; should they not,
        // nothing more is sent.
        self.verdicts
            .next()
            .unwrap_or(EventVerdict::Drop(crate::decide::Reason::UnknownPatient))
    }
}

impl Judge for Replay<'_> {
    fn decide(&mut self, _: &Identifiers) -> EventVerdict {
        self.next()
    }
    fn decide_on(&mut self, _: &Identifiers, _: &[Option<Channel>], _: bool) -> EventVerdict {
        self.next()
    }
    fn guard(
        &mut self,
        index: usize,
        event: &mut Value,
    ) -> Result<Vec<String>, crate::guard::Reason> {
        self.judge.guard(self.base + index, event)
    }
    fn guard_text(&mut self, index: usize, json: &[u8]) -> crate::guard::Scan {
        self.judge.guard_text(self.base + index, json)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::destinations::common::adkit;
    use crate::model::DestKind;
    use serde_json::json;

    fn view(ct: &'static str) -> RequestView<'static> {
        RequestView {
            method: &Method::POST,
            host: "graph.facebook.com",
            path: "/v26.0/",
            query: Some("access_token=t"),
            content_type: Some(ct),
        }
    }

    fn event(email: &str) -> Value {
        json!({"event_name": "Lead", "event_time": 1763630000, "action_source": "website",
               "user_data": {"em": [email]}, "custom_data": {"value": 1, "currency": "USD"}})
    }

    /// An events call as the Python SDK writes it: `data` JSON-encoded (compact,
    /// sorted keys) and percent-encoded with `quote`.
    fn py_call(pixel: &str, emails: &[&str]) -> Value {
        let data: Vec<Value> = emails.iter().map(|e| event(e)).collect();
        let data = serde_json::to_string(&data).unwrap();
        let quoted: String = data
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'.' | b'-' | b'~' | b'/' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        json!({"method": "POST", "relative_url": format!("{pixel}/events"), "body": format!("data={quoted}")})
    }

    fn form(calls: &[Value]) -> Vec<u8> {
        form_urlencoded::Serializer::new(String::new())
            .append_pair("batch", &serde_json::to_string(calls).unwrap())
            .finish()
            .into_bytes()
    }

    fn run(ct: &'static str, body: &[u8]) -> Result<Enforced, BodyError> {
        let mut d = adkit::decider(DestKind::AdPlatform);
        MetaCapi.enforce(&view(ct), body, &mut d)
    }

    /// The calls of a rewritten form body.
    fn calls_of(out: &[u8]) -> Vec<Value> {
        let pairs = common::parse_form(out);
        assert_eq!(pairs.len(), 1);
        serde_json::from_str(&pairs[0].1).unwrap()
    }

    /// The events of one call's form body.
    fn events_of(call: &Value) -> Vec<Value> {
        let pairs = common::parse_form(call["body"].as_str().unwrap().as_bytes());
        let data = pairs.iter().find(|(k, _)| k == "data").unwrap();
        serde_json::from_str(&data.1).unwrap()
    }

    #[test]
    fn batch_paths() {
        for p in ["/", "/v26.0/", "/v26.0", "/v3/"] {
            assert!(MetaCapi.inspects(&Method::POST, p), "{p}");
        }
        for p in ["/v26.0/me", "/me", "/v26.0//", "//", "/vx/", "/v26./", ""] {
            assert!(!is_batch_path(&Method::POST, p), "{p}");
        }
        assert!(!MetaCapi.inspects(&Method::GET, "/v26.0/"));
    }

    #[test]
    fn python_form_batch_is_enforced_per_event() {
        let calls = [
            py_call("111", &["jane.roe@example.com", "deny.me@example.com"]),
            json!({"method": "GET", "relative_url": "111"}),
            py_call("222", &["unknown.person@example.com"]),
            py_call("v26.0/333", &["Mixed.Case@Gmail.com"]),
        ];
        let r = run("application/x-www-form-urlencoded", &form(&calls)).unwrap();
        assert_eq!(
            r.events
                .iter()
                .map(|e| e.verdict.is_drop())
                .collect::<Vec<_>>(),
            [false, true, true, false]
        );
        let out = r.body.unwrap();
        let got = calls_of(&out);
        assert_eq!(got.len(), 4, "every call stays, in order");
        assert_eq!(got[1], calls[1]);
        assert_eq!(got[0]["relative_url"], "111/events");
        let e0 = events_of(&got[0]);
        assert_eq!(e0.len(), 1);
        assert_eq!(
            e0[0]["user_data"]["em"][0],
            crate::identify::sha256_hex(b"jane.roe@example.com")
        );
        // Every event of the third call dropped: it stays, with no events.
        assert_eq!(events_of(&got[2]), Vec::<Value>::new());
        assert_eq!(events_of(&got[3]).len(), 1);
        for text in [
            String::from_utf8_lossy(&out).into_owned(),
            serde_json::to_string(&got).unwrap(),
            got.iter()
                .filter(|c| c.get("body").is_some())
                .map(|c| serde_json::to_string(&events_of(c)).unwrap())
                .collect::<String>(),
        ] {
            adkit::assert_absent(
                text.as_bytes(),
                &["deny.me@example.com", "unknown.person@example.com"],
            );
        }
    }

    #[test]
    fn node_json_batch_and_unchanged() {
        // Node writes the body raw (`data=[...]`, not percent-encoded), batch as an array.
        let h = crate::identify::sha256_hex(b"jane.roe@example.com");
        let data =
            serde_json::to_string(&[json!({"event_name": "Lead", "user_data": {"em": [h]}})])
                .unwrap();
        let body = json!({"batch": [{"method": "POST", "relative_url": "v24.0/1/events",
                                      "body": format!("data={data}")}]});
        let r = run("application/json", &common::to_json(&body)).unwrap();
        assert_eq!(r.events.len(), 1);
        assert!(
            r.body.is_none(),
            "nothing to change: the bytes leave as they came"
        );
        let data =
            serde_json::to_string(&[event("deny.me@example.com"), event("jane.roe@example.com")])
                .unwrap();
        let body = json!({"batch": serde_json::to_string(&[json!({"method": "POST", "relative_url": "/1/events?access_token=t",
                                      "body": format!("data={data}&test_event_code=T1")})]).unwrap()});
        let r = run("application/json", &common::to_json(&body)).unwrap();
        let out = r.body.unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        let calls: Vec<Value> = serde_json::from_str(v["batch"].as_str().unwrap()).unwrap();
        let pairs = common::parse_form(calls[0]["body"].as_str().unwrap().as_bytes());
        assert_eq!(pairs[1], ("test_event_code".to_string(), "T1".to_string()));
        let text = serde_json::to_string(&calls).unwrap() + &pairs[0].1;
        adkit::assert_absent(text.as_bytes(), &["deny.me@example.com"]);
    }

    #[test]
    fn other_calls_with_data_are_refused_and_shapes_unreadable() {
        let form_ct = "application/x-www-form-urlencoded";
        for other in [
            json!({"method": "POST", "relative_url": "me/feed", "body": "message=deny.me@example.com"}),
            json!({"method": "GET", "relative_url": "me?fields=email"}),
            json!({"method": "GET", "relative_url": "1/events?method=post&data=%5B%5D"}),
            json!({"method": "POST", "relative_url": "1/Events", "body": "data=[]"}),
            json!({"method": "DELETE", "relative_url": "1/events", "body": "data=[]"}),
        ] {
            let calls = [py_call("1", &["jane.roe@example.com"]), other.clone()];
            let r = run(form_ct, &form(&calls));
            assert!(
                matches!(r, Err(BodyError::Forbidden { code: "uninspected_endpoint", ref detail }) if !detail.contains("deny")),
                "{other}: {r:?}"
            );
        }
        for bad in [
            form(&[
                json!({"method": "POST", "relative_url": "1/events?data=%5B%5D", "body": "data=[]"}),
            ]),
            form(&[json!({"method": "POST", "relative_url": "1/events"})]),
            form(&[json!({"method": "POST", "relative_url": "1/events", "body": {"data": []}})]),
            form(&[
                json!({"method": "POST", "relative_url": "1/events", "body": "data=[]", "extra": 1}),
            ]),
            form(&[json!({"relative_url": "1/events", "body": "data=[]"})]),
            form(&[json!("1/events")]),
            form(&[json!({"method": "POST", "relative_url": "1/events", "body": "nodata=1"})]),
            b"access_token=t".to_vec(),
            b"batch=%7B%7D".to_vec(),
            b"batch=%5B%5D&batch=%5B%5D".to_vec(),
        ] {
            let r = run(form_ct, &bad);
            assert!(
                matches!(r, Err(BodyError::Unreadable(_))),
                "{}: {r:?}",
                String::from_utf8_lossy(&bad)
            );
        }
        assert!(matches!(
            run("application/json", br#"{"batch": {"a": 1}}"#),
            Err(BodyError::Unreadable(_))
        ));
        // Calls that carry nothing pass as they are.
        let r = run(
            form_ct,
            &form(&[
                json!({"method": "GET", "relative_url": "me"}),
                json!({"method": "DELETE", "relative_url": "42"}),
            ]),
        )
        .unwrap();
        assert!(r.body.is_none() && r.events.is_empty());
    }
}
