//! `consentgate explain`: the decision trace of a raw HTTP/1.1 request, nothing
//! forwarded. It runs the proxy's own phases ([`enforce::gate`] and
//! [`enforce::plan`], with the policy trace on) and renders what they return, so
//! it cannot say something the proxy would not do. The trace names patients only
//! by pseudonym and identifiers only by kind and pseudonym.

use crate::app::Runtime;
use crate::body::{self, BodyReadError};
use crate::consent::ConsentStore;
use crate::enforce::{self, Detail, Enforcement, Gate, Head, Inspect, Outgoing, Plan, Refusal};
use crate::identify::IdKey;
use crate::route::Via;
use http::request::Parts;
use serde_json::{json, Value};

/// Most header lines a request file may have.
const MAX_HEADERS: usize = 128;

/// Parse a raw HTTP/1.1 request: the head with `httparse` (CRLF or LF line
/// endings), then a Content-Length or chunked body; with neither, the rest of
/// the file is the body.
pub(crate) fn parse_raw(bytes: &[u8]) -> Result<(Parts, Vec<u8>), String> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(bytes) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            return Err("incomplete request head (no blank line after the headers)".into())
        }
        Err(e) => return Err(format!("invalid request head: {e}")),
    };
    let mut b = http::Request::builder()
        .method(req.method.unwrap_or("GET"))
        .uri(req.path.unwrap_or("/"));
    for h in req.headers.iter() {
        b = b.header(h.name, h.value);
    }
    let (parts, ()) = b
        .body(())
        .map_err(|e| format!("invalid request: {e}"))?
        .into_parts();
    let rest = &bytes[head_len..];
    let chunked = parts
        .headers
        .get(http::header::TRANSFER_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    let body = if chunked {
        dechunk(rest)?
    } else if parts.headers.contains_key(http::header::CONTENT_LENGTH) {
        let n = enforce::declared_length(&parts.headers).ok_or("invalid Content-Length")?;
        let n = usize::try_from(n).map_err(|_| "invalid Content-Length")?;
        rest.get(..n)
            .ok_or_else(|| format!("body shorter than Content-Length ({} < {n})", rest.len()))?
            .to_vec()
    } else {
        rest.to_vec()
    };
    Ok((parts, body))
}

fn dechunk(mut b: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let (used, size) = match httparse::parse_chunk_size(b) {
            Ok(httparse::Status::Complete(x)) => x,
            _ => return Err("bad or truncated chunk size".into()),
        };
        b = &b[used..];
        if size == 0 {
            return Ok(out);
        }
        let size = usize::try_from(size).map_err(|_| "chunk too large")?;
        let chunk = b.get(..size).ok_or("truncated chunk")?;
        out.extend_from_slice(chunk);
        b = b
            .get(size..)
            .and_then(|r| r.strip_prefix(b"\r\n").or_else(|| r.strip_prefix(b"\n")))
            .ok_or("truncated chunk")?;
    }
}

/// What a trace is made with: the proxy's runtime and consent, the audit's
/// pseudonyms, and whether the body is shown.
pub(crate) struct Explainer<'a> {
    pub rt: &'a Runtime,
    pub consent: &'a ConsentStore,
    pub pseudonym: &'a dyn Fn(&str) -> String,
    /// Include the body as it would go upstream, decoded (it may hold hashed
    /// identifiers of kept events).
    pub show_body: bool,
}

impl Explainer<'_> {
    /// The decision trace for one raw request.
    pub(crate) fn explain(&self, raw: &[u8]) -> Result<Value, String> {
        let (parts, body) = parse_raw(raw)?;
        let via = Via::Plain;
        let head = Head {
            parts: &parts,
            via: &via,
            has_body: !body.is_empty(),
        };
        let mut out = json!({"method": parts.method.as_str(), "path": parts.uri.path()});
        match enforce::gate(self.rt, &head) {
            Gate::Refuse { dest, refusal } => {
                out["destination"] = destination(dest);
                refused(&mut out, &refusal);
            }
            Gate::Pass(p) => {
                out["destination"] = destination(p.dest);
                out["decision"] = json!("allowed");
                out["inspected"] = json!(false);
                out["reason"] = json!(p.reason);
                out["upstream_body"] = upstream_body(&body);
            }
            Gate::Inspect(i) => self.inspected(&mut out, &i, &parts, &body),
        }
        Ok(out)
    }

    fn inspected(&self, out: &mut Value, i: &Inspect<'_>, parts: &Parts, body: &[u8]) {
        let route = i.route;
        out["destination"] = json!(route.name());
        out["display_name"] = json!(route.adapter.display_name());
        out["mode"] = json!(format!("{:?}", route.mode).to_lowercase());
        out["category"] = json!(i.hints.category.as_str());
        out["sec_gpc"] = json!(i.hints.header_gpc);
        // The proxy reads at most `limit` bytes before it plans.
        if body.len() as u64 > i.limit {
            return refused(out, &Refusal::body(BodyReadError::TooLarge, i.limit));
        }
        let planned = enforce::plan(self.rt, self.consent, i, parts, body, true);
        if let Some(e) = &planned.enforcement {
            out["consent_stale"] = json!(e.context.stale);
            out["events"] = events(e, self.pseudonym);
            out["guard"] = e
                .interventions
                .iter()
                .map(|i| json!({"reason": i.reason.as_str(), "place": i.place, "event": i.event}))
                .collect();
        }
        let f = match planned.plan {
            Plan::Refuse(r) => return refused(out, &r),
            Plan::Forward(f) => f,
        };
        out["decision"] = json!(f.decision.as_str());
        let upstream = match &f.body {
            Outgoing::Original => body,
            Outgoing::Rewritten(b) => b.as_slice(),
        };
        out["upstream_body"] = upstream_body(upstream);
        let before = body::decode(i.encoding, body, i.limit)
            .map(|c| c.into_owned())
            .unwrap_or_default();
        let after = match &f.body {
            Outgoing::Original => None,
            Outgoing::Rewritten(b) => Some(
                body::decode(i.encoding, b, i.limit)
                    .map(|c| c.into_owned())
                    .unwrap_or_default(),
            ),
        };
        out["body_diff"] = body_diff(&before, after.as_deref(), i.content_type.as_deref());
        if self.show_body {
            let shown = after.unwrap_or(before);
            out["body_after"] = json!(String::from_utf8_lossy(&shown));
        }
    }
}

/// The exact bytes that go upstream, by length and digest (never the content).
fn upstream_body(b: &[u8]) -> Value {
    json!({"bytes": b.len(), "sha256": crate::identify::sha256_hex(b)})
}

fn destination(dest: &str) -> Value {
    if dest == "unknown" {
        Value::Null
    } else {
        json!(dest)
    }
}

fn refused(out: &mut Value, r: &Refusal) {
    out["decision"] = json!("blocked");
    // The status the app is answered with (a vendor shape may need another).
    out["status"] = json!(crate::response::refusal(r, "explain").status().as_u16());
    out["error"] = json!(r.code);
    match &r.detail {
        Detail::Text(d) => out["detail"] = json!(d),
        Detail::Reasons(v) => out["reasons"] = json!(v),
    }
}

fn events(e: &Enforcement, pseudonym: &dyn Fn(&str) -> String) -> Value {
    e.events()
        .enumerate()
        .map(|(i, (ev, decided))| {
            // explain always plans with tracing: every decision is whole.
            let (ids, records, steps) = match decided.trace.as_deref() {
                Some(d) => (&d.identifiers[..], &d.records[..], &d.steps[..]),
                None => (&[][..], &[][..], &[][..]),
            };
            json!({
                "index": i,
                "decision": e.event_decision(ev),
                "reason": ev.verdict.reason(decided.gpc_trigger).as_str(),
                "identifiers": ids.iter().map(|k| id_json(k, pseudonym)).collect::<Vec<_>>(),
                "records": records.iter().map(|r| json!({
                    "patient": pseudonym(&r.patient_id),
                    "updated_at": r.updated_at.to_rfc3339(),
                    "source": r.source,
                })).collect::<Vec<_>>(),
                "steps": steps.iter().map(|(s, o)| json!({"step": s, "outcome": o})).collect::<Vec<_>>(),
                "fields_stripped": ev.fields_stripped(),
                "flags_set": ev.flags_set(),
                "hashed": ev.hashed(),
            })
        })
        .collect()
}

fn id_json(k: &IdKey, pseudonym: &dyn Fn(&str) -> String) -> Value {
    match k {
        IdKey::Patient(p) => json!({"kind": "patient_id", "pseudonym": pseudonym(p)}),
        IdKey::External(x) => json!({"kind": "external_id", "pseudonym": pseudonym(x)}),
        IdKey::EmailHash(h) => json!({"kind": "email", "pseudonym": pseudonym(&hex::encode(h))}),
        IdKey::PhoneHash(h) => json!({"kind": "phone", "pseudonym": pseudonym(&hex::encode(h))}),
        IdKey::EmailMd5(h) => json!({"kind": "email_md5", "pseudonym": pseudonym(&hex::encode(h))}),
    }
}

/// Which paths changed between the bodies (names only, no values).
fn body_diff(before: &[u8], after: Option<&[u8]>, ct: Option<&str>) -> Value {
    let Some(after) = after else {
        return json!({"changed": false});
    };
    let parse = |b: &[u8]| -> Value {
        if ct == Some("application/x-www-form-urlencoded") {
            Value::Object(
                form_urlencoded::parse(b)
                    .into_owned()
                    .map(|(k, v)| (k, Value::String(v)))
                    .collect(),
            )
        } else {
            serde_json::from_slice(b).unwrap_or(Value::Null)
        }
    };
    let (a, b) = (parse(before), parse(after));
    let mut changes = Vec::new();
    diff_paths("", &a, &b, &mut changes);
    json!({"changed": true, "bytes_before": before.len(), "bytes_after": after.len(), "paths": changes})
}

fn join(prefix: &str, k: &str) -> String {
    if prefix.is_empty() {
        k.to_string()
    } else {
        format!("{prefix}.{k}")
    }
}

fn diff_paths(prefix: &str, a: &Value, b: &Value, out: &mut Vec<Value>) {
    if out.len() >= 500 {
        return;
    }
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for (k, va) in x {
                match y.get(k) {
                    None => out.push(json!({"path": join(prefix, k), "change": "removed"})),
                    Some(vb) => diff_paths(&join(prefix, k), va, vb, out),
                }
            }
            for k in y.keys().filter(|k| !x.contains_key(*k)) {
                out.push(json!({"path": join(prefix, k), "change": "added"}));
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (va, vb)) in x.iter().zip(y).enumerate() {
                diff_paths(&format!("{prefix}[{i}]"), va, vb, out);
            }
        }
        (Value::Array(x), Value::Array(y)) => out
            .push(json!({"path": prefix, "change": "length", "before": x.len(), "after": y.len()})),
        (Value::String(x), Value::String(y)) if x.starts_with('[') && y.starts_with('[') => {
            // Meta's form `data` is JSON inside a string.
            match (
                serde_json::from_str::<Value>(x),
                serde_json::from_str::<Value>(y),
            ) {
                (Ok(va), Ok(vb)) => diff_paths(prefix, &va, &vb, out),
                _ => out.push(json!({"path": prefix, "change": "changed"})),
            }
        }
        (x, y) if x != y => out.push(json!({"path": prefix, "change": "changed"})),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_requests_parse() {
        let (p, b) = parse_raw(b"POST /v19.0/1/events HTTP/1.1\r\nHost: graph.facebook.com\r\nContent-Length: 2\r\n\r\n{}extra").unwrap();
        assert_eq!(b, b"{}");
        assert_eq!(p.uri.path(), "/v19.0/1/events");
        let (_, b) = parse_raw(
            b"POST / HTTP/1.1\nHost: x\nTransfer-Encoding: chunked\n\n2\r\n{}\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!(b, b"{}");
        assert!(parse_raw(b"garbage").is_err());
        assert!(parse_raw(b"GET /\r\n\r\n").is_err());
        assert!(parse_raw(b"POST / HTTP/1.1\r\nContent-Length: 9\r\n\r\n{}").is_err());
    }
}
