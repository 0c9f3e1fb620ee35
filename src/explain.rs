//! `consentgate explain`: run the whole pipeline on a raw HTTP/1.1 request
//! without forwarding, and print the decision trace as JSON. The trace names
//! patients only by pseudonym and identifiers only by kind and pseudonym.

use crate::app::Runtime;
use crate::body::{self, Encoding};
use crate::consent::ConsentStore;
use crate::destinations::RequestView;
use crate::identify::IdKey;
use crate::pipeline::{self, RequestHints};
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use serde_json::{json, Value};

/// A parsed raw request.
pub struct RawRequest {
    pub method: Method,
    pub target: String,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

/// Parse a raw HTTP/1.1 request (CRLF or LF line endings; Content-Length or
/// chunked bodies; without either, the rest of the file is the body).
pub fn parse_raw(bytes: &[u8]) -> Result<RawRequest, String> {
    let (head_end, sep) = find_head_end(bytes).ok_or("no blank line after the request headers")?;
    let head = std::str::from_utf8(&bytes[..head_end]).map_err(|_| "request head is not UTF-8")?;
    let rest = &bytes[head_end + sep..];
    let mut lines = head.lines();
    let start = lines.next().ok_or("empty request")?;
    let mut parts = start.split_whitespace();
    let method = parts.next().ok_or("no method")?;
    let target = parts.next().ok_or("no request target")?;
    match parts.next() {
        Some(v) if v.starts_with("HTTP/1.") => {}
        _ => {
            return Err(format!(
                "request line must be `METHOD target HTTP/1.1`, got {start:?}"
            ))
        }
    }
    let method = Method::from_bytes(method.as_bytes()).map_err(|_| "invalid method")?;
    let mut headers = HeaderMap::new();
    for (i, l) in lines.enumerate() {
        let (k, v) = l
            .split_once(':')
            .ok_or_else(|| format!("header line {} has no `:`", i + 2))?;
        let name = HeaderName::from_bytes(k.trim().as_bytes())
            .map_err(|_| format!("header line {}: invalid name", i + 2))?;
        let value = HeaderValue::from_str(v.trim())
            .map_err(|_| format!("header line {}: invalid value", i + 2))?;
        headers.append(name, value);
    }
    let chunked = headers
        .get(http::header::TRANSFER_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    let body = if chunked {
        dechunk(rest)?
    } else if let Some(len) = headers.get(http::header::CONTENT_LENGTH) {
        let n: usize = len
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or("invalid Content-Length")?;
        if rest.len() < n {
            return Err(format!(
                "body shorter than Content-Length ({} < {n})",
                rest.len()
            ));
        }
        rest[..n].to_vec()
    } else {
        rest.to_vec()
    };
    Ok(RawRequest {
        method,
        target: target.to_string(),
        headers,
        body,
    })
}

fn find_head_end(b: &[u8]) -> Option<(usize, usize)> {
    let crlf = b.windows(4).position(|w| w == b"\r\n\r\n").map(|p| (p, 4));
    let lf = b.windows(2).position(|w| w == b"\n\n").map(|p| (p, 2));
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

fn dechunk(mut b: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let nl = b
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("truncated chunk size")?;
        let size_str = std::str::from_utf8(&b[..nl]).map_err(|_| "bad chunk size")?;
        let size = usize::from_str_radix(size_str.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| "bad chunk size")?;
        b = &b[nl + 2..];
        if size == 0 {
            return Ok(out);
        }
        if b.len() < size + 2 {
            return Err("truncated chunk".into());
        }
        out.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
    }
}

/// The decision trace for one request. `pseudonym` maps a patient id (or an
/// identifier's bytes) to its audit pseudonym. With `show_body` the rewritten
/// body is included (it may hold hashed identifiers of kept events).
pub fn explain(
    rt: &Runtime,
    consent: &ConsentStore,
    raw: &RawRequest,
    pseudonym: &dyn Fn(&str) -> String,
    show_body: bool,
) -> Value {
    let (host, path, query) = match target_parts(raw) {
        Ok(t) => t,
        Err(e) => return json!({"error": "bad_request", "detail": e}),
    };
    let Some(route) = rt.registry.route(&host, &raw.method, &path) else {
        return json!({"destination": null, "decision": "blocked", "status": 403, "error": "unknown_destination"});
    };
    let mut out = json!({
        "destination": route.name(),
        "display_name": route.adapter.display_name(),
        "mode": format!("{:?}", route.mode).to_lowercase(),
        "method": raw.method.as_str(),
        "path": path,
    });
    let hints = match RequestHints::from_headers(&raw.headers, route) {
        Ok(h) => h,
        Err(e) => {
            return merge(
                out,
                json!({"decision": "blocked", "status": 400, "error": "bad_request", "detail": e}),
            )
        }
    };
    out["category"] = json!(hints.category.as_str());
    out["sec_gpc"] = json!(hints.header_gpc);
    if route.mode == crate::config::Mode::Passthrough || !route.adapter.inspects(&raw.method, &path)
    {
        let decision = if route.mode == crate::config::Mode::Passthrough || raw.body.is_empty() {
            json!({"decision": "allowed", "inspected": false})
        } else {
            json!({"decision": "blocked", "status": 451, "error": "uninspected_endpoint"})
        };
        return merge(out, decision);
    }
    let enc = match Encoding::parse(
        raw.headers
            .get(http::header::CONTENT_ENCODING)
            .and_then(|v| v.to_str().ok()),
    ) {
        Ok(e) => e,
        Err(_) => {
            return merge(
                out,
                json!({"decision": "blocked", "status": 415, "error": "unsupported_content_encoding"}),
            )
        }
    };
    if raw.body.len() as u64 > rt.config.max_body_bytes {
        return merge(
            out,
            json!({"decision": "blocked", "status": 413, "error": "body_too_large"}),
        );
    }
    let plain = match body::decode(enc, &raw.body, rt.config.max_body_bytes) {
        Ok(p) => p,
        Err(body::BodyReadError::TooLarge) => {
            return merge(
                out,
                json!({"decision": "blocked", "status": 413, "error": "body_too_large"}),
            )
        }
        Err(_) => {
            return merge(
                out,
                json!({"decision": "blocked", "status": 422, "error": "unreadable_body"}),
            )
        }
    };
    let ct = raw
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        });
    let view = RequestView {
        method: &raw.method,
        host: &host,
        path: &path,
        query: query.as_deref(),
        content_type: ct.as_deref(),
    };
    let o = match pipeline::enforce(rt, consent, route, &view, &hints, &plain, true) {
        Ok(o) => o,
        Err(crate::destinations::BodyError::Unreadable(d)) => {
            return merge(
                out,
                json!({"decision": "blocked", "status": 422, "error": "unreadable_body", "detail": d}),
            )
        }
        Err(crate::destinations::BodyError::Forbidden { code, detail }) => {
            return merge(
                out,
                json!({"decision": "blocked", "status": 451, "error": code, "detail": detail}),
            )
        }
    };
    out["consent_stale"] = json!(o.context.stale);
    let events: Vec<Value> = o
        .enforced
        .events
        .iter()
        .zip(&o.decisions)
        .enumerate()
        .map(|(i, (e, d))| {
            let decision = match (e.verdict.is_drop(), e.changed()) {
                (true, _) => "dropped",
                (false, true) => "modified",
                (false, false) => "allowed",
            };
            json!({
                "index": i,
                "decision": decision,
                "reason": e.verdict.reason(d.gpc_trigger).as_str(),
                "identifiers": d.identifiers.iter().map(|k| id_json(k, pseudonym)).collect::<Vec<_>>(),
                "records": d.records.iter().map(|r| json!({
                    "patient": pseudonym(&r.patient_id),
                    "updated_at": r.updated_at.to_rfc3339(),
                    "source": r.source,
                })).collect::<Vec<_>>(),
                "steps": d.steps.iter().map(|(s, o)| json!({"step": s, "outcome": o})).collect::<Vec<_>>(),
                "fields_stripped": e.fields_stripped,
                "flags_set": e.flags_set,
                "hashed": e.hashed,
            })
        })
        .collect();
    let (decision, status) = if o.all_dropped() {
        (
            "blocked",
            if route.on_blocked == crate::config::OnBlocked::SyntheticOk {
                route.adapter.synthetic_ok().status
            } else {
                451
            },
        )
    } else if route.mode == crate::config::Mode::Shadow {
        ("allowed", 0)
    } else if o.changed() {
        ("modified", 0)
    } else {
        ("allowed", 0)
    };
    out["decision"] = json!(decision);
    if status != 0 {
        out["status"] = json!(status);
        out["reasons"] = json!(o.drop_reasons());
    }
    out["events"] = Value::Array(events);
    out["body_diff"] = body_diff(&plain, o.enforced.body.as_deref(), ct.as_deref());
    if show_body && !o.all_dropped() {
        let after = o.enforced.body.clone().unwrap_or(plain);
        out["body_after"] = json!(String::from_utf8_lossy(&after));
    }
    out
}

fn merge(mut a: Value, b: Value) -> Value {
    if let (Some(a), Value::Object(b)) = (a.as_object_mut(), b) {
        a.extend(b);
    }
    a
}

fn id_json(k: &IdKey, pseudonym: &dyn Fn(&str) -> String) -> Value {
    match k {
        IdKey::Patient(p) => json!({"kind": "patient_id", "pseudonym": pseudonym(p)}),
        IdKey::External(x) => json!({"kind": "external_id", "pseudonym": pseudonym(x)}),
        IdKey::EmailHash(h) => json!({"kind": "email", "pseudonym": pseudonym(&hex::encode(h))}),
        IdKey::PhoneHash(h) => json!({"kind": "phone", "pseudonym": pseudonym(&hex::encode(h))}),
    }
}

fn target_parts(raw: &RawRequest) -> Result<(String, String, Option<String>), String> {
    let uri: http::Uri = raw
        .target
        .parse()
        .map_err(|_| "invalid request target".to_string())?;
    let authority = match uri.authority() {
        Some(a) => a.as_str().to_string(),
        None => raw
            .headers
            .get(http::header::HOST)
            .and_then(|v| v.to_str().ok())
            .ok_or("no Host header and no absolute URI")?
            .to_string(),
    };
    let (host, _) = pipeline::split_host_port(&authority).ok_or("invalid host")?;
    Ok((
        host,
        uri.path().to_string(),
        uri.query().map(str::to_string),
    ))
}

/// Which top-level paths changed between the bodies (names only, no values).
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

fn diff_paths(prefix: &str, a: &Value, b: &Value, out: &mut Vec<Value>) {
    if out.len() >= 500 {
        return;
    }
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for (k, va) in x {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                match y.get(k) {
                    None => out.push(json!({"path": p, "change": "removed"})),
                    Some(vb) => diff_paths(&p, va, vb, out),
                }
            }
            for k in y.keys().filter(|k| !x.contains_key(*k)) {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                out.push(json!({"path": p, "change": "added"}));
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
        let r = parse_raw(b"POST /v19.0/1/events HTTP/1.1\r\nHost: graph.facebook.com\r\nContent-Length: 2\r\n\r\n{}extra").unwrap();
        assert_eq!(r.body, b"{}");
        let r = parse_raw(
            b"POST / HTTP/1.1\nHost: x\nTransfer-Encoding: chunked\n\n2\r\n{}\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!(r.body, b"{}");
        assert!(parse_raw(b"garbage").is_err());
        assert!(parse_raw(b"GET /\r\n\r\n").is_err());
    }
}
