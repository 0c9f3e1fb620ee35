//! Admin consent API (SPEC §8): `PUT | PATCH | GET | DELETE /v1/consent/{patient_id}`
//! on `listen.admin`, behind bearer tokens from `admin.tokens_file`.
//!
//! - No `Authorization` → 401; an unknown token → 403; nothing is written.
//!   Tokens are compared in constant time over their SHA-256 (lengths do not leak).
//! - PUT takes a whole record; `patient_id` in the body must match the path or be
//!   absent (filled from the path); `updated_at` absent → now.
//! - PATCH merges into the stored record: `categories` and `channels` key by key
//!   (a `null` value removes the key, i.e. back to the default), `identifiers`
//!   lists are appended (duplicates dropped; plaintext is hashed), other fields
//!   replaced; `updated_at` absent → now. PATCH of a missing record → 404.
//! - A write answers 200 with the stored record (emails and phones only as
//!   `email_sha256` / `phone_sha256`) once durable, and the store is already
//!   updated then. A write older than the stored record → 409 `superseded`.
//! - Writes to one patient are serialised: the writer reads the current record,
//!   checks `If-Match`, merges (PATCH) and makes the result durable as one step
//!   ([`ConsentWriter::modify`]), so concurrent PATCHes never lose each other.
//! - Every record carries a `version` (0: never written through this API), also
//!   sent as a strong `ETag: "<version>"` on GET and on every write's answer.
//!   `If-Match: "<version>"` (a list, or `*` for "exists") on PUT, PATCH and
//!   DELETE that does not hold → 412 `precondition_failed` with the current
//!   version, and nothing changes; a weak tag never matches (RFC 9110 strong
//!   comparison). A `version` in a PUT or PATCH body is the same precondition
//!   (so a GET body sent back cannot overwrite a newer record); it is never
//!   stored as given.
//! - Bad JSON, an unknown field or a bad value → 400
//!   `{"error":"invalid_record","field":..,"detail":..}`; values are never echoed.
//!   Body over 64 KiB → 413. Other methods → 405.

use super::record::{ConsentRecord, FieldError};
use super::source::{
    no_op_on_change, Change, ChangeEvent, ChangeOp, ConsentWriter, OnChange, Precondition,
    WriteError, Written,
};
use super::store::ConsentStore;
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use std::path::Path;
use std::sync::Arc;
use subtle::ConstantTimeEq;

/// Where the consent API lives on the admin listener.
pub(crate) const PATH_PREFIX: &str = "/v1/consent/";
/// Largest accepted request body.
pub(crate) const MAX_BODY_BYTES: usize = 64 * 1024;

/// Admin bearer tokens: names and the SHA-256 of each token (never the token).
#[derive(Clone, Default)]
pub(crate) struct Tokens {
    entries: Vec<(String, [u8; 32])>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens")
            .field("names", &self.names())
            .finish()
    }
}

impl Tokens {
    /// Parse `name:token` lines; `#` comments and blank lines are ignored. An
    /// error names the line (never its content, which may hold a token).
    pub(crate) fn parse(text: &str) -> Result<Tokens, String> {
        let mut entries: Vec<(String, [u8; 32])> = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let n = i + 1;
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((name, token)) = line.split_once(':') else {
                return Err(format!("line {n}: expected name:token"));
            };
            let (name, token) = (name.trim(), token.trim());
            if name.is_empty() {
                return Err(format!("line {n}: empty token name"));
            }
            if !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c))
            {
                return Err(format!(
                    "line {n}: token name may hold only letters, digits, '-', '_', '.', '@'"
                ));
            }
            if token.is_empty() {
                return Err(format!("line {n}: empty token"));
            }
            if entries.iter().any(|(have, _)| have == name) {
                return Err(format!("line {n}: duplicate token name"));
            }
            let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
            if entries.iter().any(|(_, d)| d == &digest) {
                return Err(format!("line {n}: duplicate token"));
            }
            entries.push((name.to_string(), digest));
        }
        Ok(Tokens { entries })
    }

    pub(crate) fn names(&self) -> Vec<&str> {
        self.entries.iter().map(|(n, _)| n.as_str()).collect()
    }

    /// The name of the token presented, if any matches. Every entry is
    /// compared, in constant time, whatever matches.
    fn authenticate(&self, presented: &str) -> Option<&str> {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let mut found = None;
        for (name, d) in &self.entries {
            if bool::from(d.ct_eq(&digest)) {
                found = Some(name.as_str());
            }
        }
        found
    }
}

/// Load `admin.tokens_file`; errors name the file and the line.
pub(crate) fn load_tokens(path: &Path) -> Result<Tokens, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("admin.tokens_file {}: {e}", path.display()))?;
    Tokens::parse(&text).map_err(|e| format!("admin.tokens_file {}: {e}", path.display()))
}

/// Carries the plaintext emails and phones a write names past the hashing, to
/// the sync outbox only (SPEC §13: most suppression APIs need the address):
/// held while the write runs (the outbox's store observer takes them when the
/// write denies a target), dropped with the returned guard. Never stored,
/// journaled or audited.
pub(crate) trait PlaintextCarrier: Send + Sync {
    fn hold(
        &self,
        patient_id: &str,
        emails: Vec<String>,
        phones: Vec<String>,
    ) -> Box<dyn std::any::Any + Send>;
    /// Resolves once what the write queued for the outbox is durable.
    fn flush(&self) -> super::source::BoxFuture<'_, ()>;
}

/// What the API needs: the store (reads), the writer (durable writes), the
/// tokens, and a hook told of every acknowledged write (for the audit trail).
#[derive(Clone)]
pub(crate) struct ApiContext {
    pub(crate) store: Arc<ConsentStore>,
    pub(crate) writer: Arc<dyn ConsentWriter>,
    pub(crate) tokens: Arc<Tokens>,
    on_change: OnChange,
    /// The sync outbox's plaintext carrier, when `sync:` has targets.
    pub(crate) carrier: Option<Arc<dyn PlaintextCarrier>>,
    /// Fed by this NATS bucket (SPEC §14): writes are refused with 405,
    /// naming the owner's admin API when configured.
    read_only: Option<(String, Option<String>)>,
}

impl ApiContext {
    pub(crate) fn new(
        store: Arc<ConsentStore>,
        writer: Arc<dyn ConsentWriter>,
        tokens: Tokens,
    ) -> Self {
        ApiContext {
            store,
            writer,
            tokens: Arc::new(tokens),
            on_change: no_op_on_change(),
            carrier: None,
            read_only: None,
        }
    }

    /// The store follows NATS bucket `bucket`: reads only; writes go to the
    /// owner's admin API (the instance with `consent.replicate_to: nats`).
    pub(crate) fn read_only(mut self, bucket: &str, owner_admin_url: Option<&str>) -> Self {
        self.read_only = Some((bucket.to_string(), owner_admin_url.map(str::to_string)));
        self
    }

    pub(crate) fn with_carrier(mut self, c: Arc<dyn PlaintextCarrier>) -> Self {
        self.carrier = Some(c);
        self
    }

    pub(crate) fn with_on_change(mut self, f: OnChange) -> Self {
        self.on_change = f;
        self
    }
}

type Resp = Response<Full<Bytes>>;

fn json_response(status: StatusCode, body: &Value) -> Resp {
    let bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    let mut r = Response::new(Full::new(Bytes::from(bytes)));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    h.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    r
}

fn error(status: StatusCode, code: &str, detail: &str) -> Resp {
    json_response(status, &json!({"error": code, "detail": detail}))
}

fn invalid(e: &FieldError) -> Resp {
    json_response(
        StatusCode::BAD_REQUEST,
        &json!({"error": "invalid_record", "field": e.field, "detail": e.detail}),
    )
}

/// The strong entity tag of a record version.
fn etag(version: u64) -> header::HeaderValue {
    // Digits and quotes only: always a valid header value.
    header::HeaderValue::from_str(&format!("\"{version}\""))
        .unwrap_or(header::HeaderValue::from_static("\"0\""))
}

fn record_response(rec: &ConsentRecord) -> Resp {
    match serde_json::to_value(rec) {
        Ok(v) => {
            let mut r = json_response(StatusCode::OK, &v);
            r.headers_mut().insert(header::ETAG, etag(rec.version));
            r
        }
        Err(_) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "record encoding failed",
        ),
    }
}

/// `If-Match` (every field line of it) as a precondition. `Err` when it is not
/// `*` or a list of entity tags. Weak tags and tags that are not a version can
/// never match (strong comparison), so they add nothing to the list.
fn if_match(headers: &http::HeaderMap) -> Result<Precondition, ()> {
    let (mut any, mut star, mut tags) = (false, false, 0usize);
    let mut versions = Vec::new();
    for v in headers.get_all(header::IF_MATCH) {
        let text = v.to_str().map_err(|_| ())?;
        let mut rest = text.trim_start_matches([' ', '\t', ',']);
        while !rest.is_empty() {
            any = true;
            if let Some(r) = rest.strip_prefix('*') {
                star = true;
                rest = r;
            } else {
                let (weak, r) = match rest.strip_prefix("W/") {
                    Some(r) => (true, r),
                    None => (false, rest),
                };
                let r = r.strip_prefix('"').ok_or(())?;
                let end = r.find('"').ok_or(())?;
                let tag = &r[..end];
                tags += 1;
                if tag.bytes().any(|b| b < 0x21 || b == 0x7f) {
                    return Err(());
                }
                if !weak {
                    if let Ok(n) = tag.parse::<u64>() {
                        if tag.bytes().all(|b| b.is_ascii_digit()) {
                            versions.push(n);
                        }
                    }
                }
                rest = &r[end + 1..];
            }
            let next = rest.trim_start_matches([' ', '\t']);
            rest = match next.strip_prefix(',') {
                Some(r) => r.trim_start_matches([' ', '\t', ',']),
                None if next.is_empty() => next,
                None => return Err(()),
            };
        }
    }
    Ok(match (any, star) {
        (false, _) => Precondition::None,
        // `*` is only meaningful alone; next to tags it is malformed.
        (true, true) if tags == 0 && headers.get_all(header::IF_MATCH).iter().count() == 1 => {
            Precondition::Exists
        }
        (true, true) => return Err(()),
        (true, false) => Precondition::Versions(versions),
    })
}

/// The precondition of `If-Match` and a `version` in the body together: both
/// must hold.
fn with_body_version(pre: Precondition, body: Option<u64>) -> Precondition {
    match (pre, body) {
        (pre, None) => pre,
        (Precondition::None | Precondition::Exists, Some(v)) => Precondition::Versions(vec![v]),
        (Precondition::Versions(vs), Some(v)) => {
            // No version can be both: the write can never succeed.
            Precondition::Versions(if vs.contains(&v) { vec![v] } else { Vec::new() })
        }
    }
}

/// Take `version` out of a write's body (it is a precondition, not data).
fn take_version(obj: &mut Map<String, Value>) -> Result<Option<u64>, FieldError> {
    match obj.remove("version") {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| FieldError::new("version", "expected a non-negative integer")),
    }
}

/// Decode `%XX` escapes; `None` on a bad escape or invalid UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Route one admin request under `/v1/consent/`.
pub(crate) async fn handle<B>(req: Request<B>, ctx: &ApiContext) -> Resp
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let path = req.uri().path().to_string();
    let Some(raw_id) = path.strip_prefix(PATH_PREFIX) else {
        return error(StatusCode::NOT_FOUND, "not_found", "no such endpoint");
    };

    // Authentication first: nothing below runs without a valid token.
    let actor = match req.headers().get(header::AUTHORIZATION) {
        None => {
            let mut r = error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "bearer token required",
            );
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
            return r;
        }
        Some(v) => {
            let token = v.to_str().ok().and_then(|s| {
                let (scheme, rest) = s.trim().split_once(' ')?;
                scheme
                    .eq_ignore_ascii_case("bearer")
                    .then(|| rest.trim().to_string())
            });
            let Some(token) = token else {
                let mut r = error(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "expected Authorization: Bearer <token>",
                );
                r.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    header::HeaderValue::from_static("Bearer"),
                );
                return r;
            };
            match ctx.tokens.authenticate(&token) {
                Some(name) => name.to_string(),
                None => return error(StatusCode::FORBIDDEN, "forbidden", "token not accepted"),
            }
        }
    };

    let method = req.method().clone();
    if ![Method::GET, Method::PUT, Method::PATCH, Method::DELETE].contains(&method) {
        let mut r = error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "use GET, PUT, PATCH or DELETE",
        );
        r.headers_mut().insert(
            header::ALLOW,
            header::HeaderValue::from_static("GET, PUT, PATCH, DELETE"),
        );
        return r;
    }

    let patient_id = match percent_decode(raw_id) {
        Some(id) if !id.trim().is_empty() && !id.contains('/') && id.len() <= 256 => {
            id.trim().to_string()
        }
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_patient_id",
                "the path must be /v1/consent/{patient_id}",
            )
        }
    };

    if method == Method::GET {
        return match ctx.store.get(&patient_id) {
            Some(rec) => record_response(&rec),
            None => error(StatusCode::NOT_FOUND, "not_found", "no such patient"),
        };
    }
    if let Some((bucket, owner)) = &ctx.read_only {
        let mut r = json_response(
            StatusCode::METHOD_NOT_ALLOWED,
            &json!({
                "error": "read_only_replica",
                "detail": "consent here follows a NATS bucket; write through the owner's \
                           admin API (the instance with consent.replicate_to: nats)",
                "writes_go_to": owner.as_deref().unwrap_or("the owner's admin API"),
                "bucket": bucket,
            }),
        );
        r.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET"));
        return r;
    }
    let pre = match if_match(req.headers()) {
        Ok(p) => p,
        Err(()) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_if_match",
                "If-Match must be * or a list of entity tags such as \"3\"",
            )
        }
    };

    // Plaintext addresses of this write, for the sync outbox only.
    let mut plain: (Vec<String>, Vec<String>) = (Vec::new(), Vec::new());
    let (op, pre, merge): (ChangeOp, Precondition, super::source::Merge) = match method {
        Method::DELETE => (ChangeOp::Delete, pre, Box::new(|_| Ok(Change::Delete))),
        Method::PUT => {
            let body = match read_body(req).await {
                Ok(b) => b,
                Err(r) => return r,
            };
            let (rec, version) = match build_put(&body, &patient_id) {
                Ok(x) => x,
                Err(e) => return invalid(&e),
            };
            if ctx.carrier.is_some() {
                plain = (
                    rec.identifiers.emails.clone(),
                    rec.identifiers.phones.clone(),
                );
            }
            (
                ChangeOp::Put,
                with_body_version(pre, version),
                Box::new(move |_| Ok(Change::Put(Box::new(rec)))),
            )
        }
        _ => {
            let body = match read_body(req).await {
                Ok(b) => b,
                Err(r) => return r,
            };
            let (patch, version) = match parse_patch(&body, &patient_id) {
                Ok(x) => x,
                Err(e) => return invalid(&e),
            };
            if ctx.carrier.is_some() {
                plain = (
                    patch_strings(&patch, "emails"),
                    patch_strings(&patch, "phones"),
                );
            }
            // The merge runs inside the writer, on the record as it is under
            // the patient's write lock: never on a copy read before it.
            (
                ChangeOp::Patch,
                with_body_version(pre, version),
                Box::new(move |cur| {
                    let cur = cur.ok_or(WriteError::NotFound)?;
                    merge_patch(patch, cur)
                        .map(|r| Change::Put(Box::new(r)))
                        .map_err(|e| WriteError::Invalid {
                            field: e.field,
                            detail: e.detail,
                        })
                }),
            )
        }
    };
    let held = match &ctx.carrier {
        Some(c) if !plain.0.is_empty() || !plain.1.is_empty() => {
            Some(c.hold(&patient_id, plain.0, plain.1))
        }
        _ => None,
    };
    let result = ctx.writer.modify(&patient_id, pre, merge, &actor).await;
    drop(held);
    match result {
        Ok(written) => {
            if written == Written::Absent {
                return error(StatusCode::NOT_FOUND, "not_found", "no such patient");
            }
            // A denial queued for a vendor target is durable before the answer.
            if let Some(c) = &ctx.carrier {
                c.flush().await;
            }
            tracing::info!(actor = %actor, op = op.as_str(), "consent record written via admin API");
            (ctx.on_change)(ChangeEvent {
                patient_id: patient_id.clone(),
                op,
                actor,
            });
            match written {
                Written::Stored(stored) => record_response(&stored),
                _ => json_response(StatusCode::OK, &json!({ "deleted": patient_id })),
            }
        }
        Err(e) => write_error(&e),
    }
}

fn write_error(e: &WriteError) -> Resp {
    match e {
        WriteError::Superseded => error(
            StatusCode::CONFLICT,
            "superseded",
            "a record with a newer updated_at is stored",
        ),
        WriteError::Invalid { field, detail } => invalid(&FieldError::new(field, detail)),
        WriteError::NotFound => error(StatusCode::NOT_FOUND, "not_found", "no such patient"),
        WriteError::PreconditionFailed { current } => {
            let mut r = json_response(
                StatusCode::PRECONDITION_FAILED,
                &json!({
                    "error": "precondition_failed",
                    "detail": match current {
                        Some(_) => "If-Match (or the body's version) does not match the current version; nothing was changed",
                        None => "If-Match (or the body's version) requires a record, and there is none; nothing was changed",
                    },
                    "current_version": current,
                }),
            );
            if let Some(v) = current {
                r.headers_mut().insert(header::ETAG, etag(*v));
            }
            r
        }
        WriteError::Storage(msg) => {
            tracing::error!(error = %msg, "consent write not durable");
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "not_durable",
                "the write could not be made durable; nothing was changed",
            )
        }
    }
}

async fn read_body<B>(req: Request<B>) -> Result<Bytes, Resp>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let too_large = || {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            "request body over 64 KiB",
        )
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return Err(too_large());
    }
    match Limited::new(req.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
    {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) => {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                Err(too_large())
            } else {
                Err(error(
                    StatusCode::BAD_REQUEST,
                    "unreadable_body",
                    "request body could not be read",
                ))
            }
        }
    }
}

fn parse_object(body: &[u8]) -> Result<Map<String, Value>, FieldError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        FieldError::new(
            "(json)",
            format!("invalid JSON at line {} column {}", e.line(), e.column()),
        )
    })?;
    match v {
        Value::Object(m) => Ok(m),
        _ => Err(FieldError::new("(record)", "expected a JSON object")),
    }
}

fn check_path_id(obj: &mut Map<String, Value>, patient_id: &str) -> Result<(), FieldError> {
    match obj.get("patient_id") {
        None | Some(Value::Null) => {
            obj.insert("patient_id".into(), Value::String(patient_id.to_string()));
            Ok(())
        }
        Some(Value::String(s)) if s.trim() == patient_id => Ok(()),
        Some(Value::String(_)) => Err(FieldError::new("patient_id", "does not match the path")),
        Some(_) => Err(FieldError::new("patient_id", "expected a string")),
    }
}

/// A PUT body as a record, and the body's `version` precondition:
/// `patient_id` from the path when absent, `updated_at` now when absent.
fn build_put(body: &[u8], patient_id: &str) -> Result<(ConsentRecord, Option<u64>), FieldError> {
    let mut obj = parse_object(body)?;
    check_path_id(&mut obj, patient_id)?;
    let version = take_version(&mut obj)?;
    let rec = ConsentRecord::from_value(&Value::Object(obj), Some(chrono::Utc::now()))?;
    Ok((rec, version))
}

/// The strings of a PATCH's `identifiers.<key>` list (plaintext for the outbox).
fn patch_strings(patch: &Map<String, Value>, key: &str) -> Vec<String> {
    patch
        .get("identifiers")
        .and_then(|i| i.get(key))
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// A PATCH body, checked as far as it can be without the current record, and
/// its `version` precondition.
fn parse_patch(
    body: &[u8],
    patient_id: &str,
) -> Result<(Map<String, Value>, Option<u64>), FieldError> {
    let mut patch = parse_object(body)?;
    check_path_id(&mut patch, patient_id)?;
    let version = take_version(&mut patch)?;
    Ok((patch, version))
}

/// A PATCH merged into the current record (see the module docs). `updated_at`
/// is stamped here, under the write lock, so serialised PATCHes are stamped in
/// the order they are applied.
fn merge_patch(
    patch: Map<String, Value>,
    current: &ConsentRecord,
) -> Result<ConsentRecord, FieldError> {
    let mut base = match serde_json::to_value(current) {
        Ok(Value::Object(m)) => m,
        _ => {
            return Err(FieldError::new(
                "(record)",
                "stored record could not be merged",
            ))
        }
    };
    // A PATCH is a new write: it is stamped now unless it says otherwise.
    base.remove("updated_at");
    base.remove("version");
    for (k, v) in patch {
        match k.as_str() {
            "categories" | "channels" => {
                let Value::Object(p) = v else {
                    return Err(FieldError::new(k, "expected an object"));
                };
                let slot = base.entry(k).or_insert_with(|| Value::Object(Map::new()));
                if !slot.is_object() {
                    *slot = Value::Object(Map::new());
                }
                if let Value::Object(m) = slot {
                    for (ck, cv) in p {
                        if cv.is_null() {
                            m.remove(&ck);
                        } else {
                            m.insert(ck, cv);
                        }
                    }
                }
            }
            "identifiers" => {
                let Value::Object(p) = v else {
                    return Err(FieldError::new("identifiers", "expected an object"));
                };
                let slot = base
                    .entry("identifiers")
                    .or_insert_with(|| Value::Object(Map::new()));
                if !slot.is_object() {
                    *slot = Value::Object(Map::new());
                }
                if let Value::Object(m) = slot {
                    for (ik, iv) in p {
                        let Value::Array(add) = iv else {
                            return Err(FieldError::new(
                                format!("identifiers.{ik}"),
                                "expected an array of strings",
                            ));
                        };
                        let list = m.entry(ik).or_insert_with(|| Value::Array(Vec::new()));
                        if let Value::Array(have) = list {
                            for x in add {
                                if !have.contains(&x) {
                                    have.push(x);
                                }
                            }
                        } else {
                            *list = Value::Array(add);
                        }
                    }
                }
            }
            _ => {
                base.insert(k, v);
            }
        }
    }
    ConsentRecord::from_value(&Value::Object(base), Some(chrono::Utc::now()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consent::file_source::{self, FileSourceConfig, FileSourceHandle};
    use crate::identify::Identifiers;
    use std::net::SocketAddr;
    use std::sync::Mutex;

    const TOKENS: &str = "# admin tokens\n\nops:ops-secret-token-1\ncrm : crm-secret-token-2\n";

    struct Harness {
        addr: SocketAddr,
        store: Arc<ConsentStore>,
        events: Arc<Mutex<Vec<ChangeEvent>>>,
        dir: tempfile::TempDir,
        _src: FileSourceHandle,
    }

    async fn harness() -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("consent.jsonl");
        std::fs::write(
            &file,
            r#"{"patient_id":"P-1001","identifiers":{"emails":["jane.roe@example.com"],"phones":["+14155550100"],"external_ids":["crm:1"]},"categories":{"advertising":"granted","marketing_email":"denied"},"updated_at":"2026-01-01T00:00:00Z"}"#,
        )
        .unwrap();
        let store = Arc::new(ConsentStore::new());
        let src = file_source::start(
            FileSourceConfig::new(&file, dir.path().join("journal")),
            store.clone(),
            Arc::new(|_| {}),
        )
        .await
        .unwrap();
        let events = Arc::new(Mutex::new(Vec::new()));
        let ev = events.clone();
        let ctx = Arc::new(
            ApiContext::new(store.clone(), src.writer(), Tokens::parse(TOKENS).unwrap())
                .with_on_change(Arc::new(move |e| ev.lock().unwrap().push(e))),
        );
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let ctx = ctx.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: Request<hyper::body::Incoming>| {
                            let ctx = ctx.clone();
                            async move { Ok::<_, std::convert::Infallible>(handle(req, &ctx).await) }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        Harness {
            addr,
            store,
            events,
            dir,
            _src: src,
        }
    }

    impl Harness {
        async fn call(
            &self,
            method: &str,
            path: &str,
            token: Option<&str>,
            body: Option<&str>,
        ) -> (StatusCode, Value, String) {
            let client =
                hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                    .build_http::<Full<Bytes>>();
            let mut b = Request::builder()
                .method(method)
                .uri(format!("http://{}{}", self.addr, path));
            if let Some(t) = token {
                b = b.header("authorization", format!("Bearer {t}"));
            }
            let req = b
                .body(Full::new(Bytes::from(body.unwrap_or("").to_string())))
                .unwrap();
            let resp = client.request(req).await.unwrap();
            let status = resp.status();
            let bytes = resp.into_body().collect().await.unwrap().to_bytes();
            let text = String::from_utf8(bytes.to_vec()).unwrap();
            let v = serde_json::from_str(&text).unwrap_or(Value::Null);
            (status, v, text)
        }

        /// A request with extra headers; returns the response headers too.
        async fn call_h(
            &self,
            method: &str,
            path: &str,
            headers: &[(&str, &str)],
            body: &str,
        ) -> (StatusCode, http::HeaderMap, Value) {
            let client =
                hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                    .build_http::<Full<Bytes>>();
            let mut b = Request::builder()
                .method(method)
                .uri(format!("http://{}{}", self.addr, path))
                .header("authorization", "Bearer ops-secret-token-1");
            for (k, v) in headers {
                b = b.header(*k, *v);
            }
            let resp = client
                .request(b.body(Full::new(Bytes::from(body.to_string()))).unwrap())
                .await
                .unwrap();
            let (parts, body) = resp.into_parts();
            let bytes = body.collect().await.unwrap().to_bytes();
            let v = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            (parts.status, parts.headers, v)
        }

        fn journal_lines(&self) -> usize {
            std::fs::read_to_string(
                self.dir
                    .path()
                    .join("journal")
                    .join(crate::consent::journal::JOURNAL_FILE),
            )
            .map(|t| t.lines().count())
            .unwrap_or(0)
        }
    }

    const OPS: Option<&str> = Some("ops-secret-token-1");
    const CRM: Option<&str> = Some("crm-secret-token-2");

    #[tokio::test]
    async fn api_401_and_403_write_nothing() {
        let h = harness().await;
        let body = r#"{"gpc":true}"#;
        let (s, v, _) = h.call("PUT", "/v1/consent/P-9", None, Some(body)).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        assert_eq!(v["error"], "unauthorized");
        let (s, v, _) = h
            .call("PUT", "/v1/consent/P-9", Some("wrong-token"), Some(body))
            .await;
        assert_eq!(s, StatusCode::FORBIDDEN);
        assert_eq!(v["error"], "forbidden");
        let (s, _, _) = h
            .call("DELETE", "/v1/consent/P-1001", Some("nope"), None)
            .await;
        assert_eq!(s, StatusCode::FORBIDDEN);
        let (s, _, _) = h.call("GET", "/v1/consent/P-1001", None, None).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        assert!(h.store.get("P-9").is_none() && h.store.get("P-1001").is_some());
        assert_eq!(h.journal_lines(), 0);
        assert!(h.events.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn api_put_get_delete_round_trip_without_plaintext() {
        let h = harness().await;
        let body = r#"{"identifiers":{"emails":["New.Person@Example.com"],"phones":["+1 (415) 555-0199"],"external_ids":["crm:9"]},
            "categories":{"advertising":"denied"},"jurisdiction":"US-CA"}"#;
        let (s, v, text) = h.call("PUT", "/v1/consent/P%2D9", OPS, Some(body)).await;
        assert_eq!(s, StatusCode::OK, "{text}");
        assert_eq!(v["patient_id"], "P-9");
        assert!(v["updated_at"].is_string(), "updated_at defaulted to now");
        assert_eq!(
            v["identifiers"]["email_sha256"][0],
            crate::identify::sha256_hex(b"new.person@example.com")
        );
        assert_eq!(
            v["identifiers"]["phone_sha256"].as_array().unwrap().len(),
            2
        );
        assert!(
            v["identifiers"].get("emails").is_none() && v["identifiers"].get("phones").is_none()
        );
        assert!(!text.to_lowercase().contains("new.person") && !text.contains("5550199"));
        // Enforced from now on: the store already answers.
        let mut ids = Identifiers::new();
        ids.add_email("new.person@example.com");
        assert_eq!(h.store.lookup(&ids).len(), 1);
        assert_eq!(h.journal_lines(), 1);
        assert_eq!(
            h.events.lock().unwrap().last().unwrap(),
            &ChangeEvent {
                patient_id: "P-9".into(),
                op: ChangeOp::Put,
                actor: "ops".into()
            }
        );

        let (s, v, text) = h.call("GET", "/v1/consent/P-9", CRM, None).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(v["categories"]["advertising"], "denied");
        assert!(!text.to_lowercase().contains("new.person") && !text.contains("5550199"));
        let (_, _, text) = h.call("GET", "/v1/consent/P-1001", CRM, None).await;
        assert!(
            text.contains("email_sha256")
                && !text.contains("jane.roe")
                && !text.contains("4155550100")
        );

        let (s, v, _) = h.call("DELETE", "/v1/consent/P-9", CRM, None).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(v, json!({"deleted": "P-9"}));
        assert_eq!(h.events.lock().unwrap().last().unwrap().actor, "crm");
        let (s, v, _) = h.call("GET", "/v1/consent/P-9", CRM, None).await;
        assert_eq!(
            (s, v["error"].as_str()),
            (StatusCode::NOT_FOUND, Some("not_found"))
        );
        let (s, _, _) = h.call("DELETE", "/v1/consent/P-9", CRM, None).await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        assert_eq!(h.journal_lines(), 2);
    }

    #[tokio::test]
    async fn api_rejects_bad_input_naming_the_field() {
        let h = harness().await;
        let cases: [(&str, &str); 6] = [
            (r#"{"gpc":tru"#, "(json)"),
            (r#"{"colour":"red"}"#, "colour"),
            (
                r#"{"categories":{"advertising":"maybe-secret"}}"#,
                "categories.advertising",
            ),
            (
                r#"{"identifiers":{"emails":["not-an-address-secret"]}}"#,
                "identifiers.emails[0]",
            ),
            (r#"{"patient_id":"P-other"}"#, "patient_id"),
            (r#"{"updated_at":"yesterday-secret"}"#, "updated_at"),
        ];
        for (body, field) in cases {
            let (s, v, text) = h.call("PUT", "/v1/consent/P-9", OPS, Some(body)).await;
            assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
            assert_eq!(v["error"], "invalid_record");
            assert_eq!(v["field"], field, "{text}");
            assert!(
                !text.contains("secret") && !text.contains("red\""),
                "{text}"
            );
        }
        let big = format!(r#"{{"source":"{}"}}"#, "x".repeat(70 * 1024));
        let (s, _, _) = h.call("PUT", "/v1/consent/P-9", OPS, Some(&big)).await;
        assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
        let (s, _, _) = h.call("POST", "/v1/consent/P-9", OPS, Some("{}")).await;
        assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);
        let (s, _, _) = h.call("PATCH", "/v1/consent/P-404", OPS, Some("{}")).await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        let (s, v, _) = h
            .call(
                "PUT",
                "/v1/consent/P-1001",
                OPS,
                Some(r#"{"updated_at":"2020-01-01T00:00:00Z"}"#),
            )
            .await;
        assert_eq!(
            (s, v["error"].as_str()),
            (StatusCode::CONFLICT, Some("superseded"))
        );
        assert!(h.store.get("P-9").is_none());
        assert_eq!(h.journal_lines(), 0);
    }

    #[tokio::test]
    async fn api_patch_merges_key_by_key() {
        let h = harness().await;
        let body = r#"{"categories":{"advertising":"denied","patient_surveys":"denied"},"channels":{"sms":"denied"},
            "identifiers":{"external_ids":["crm:2"],"emails":["second@example.com"]},"gpc":true}"#;
        let (s, v, text) = h.call("PATCH", "/v1/consent/P-1001", OPS, Some(body)).await;
        assert_eq!(s, StatusCode::OK, "{text}");
        assert_eq!(v["categories"]["advertising"], "denied");
        assert_eq!(
            v["categories"]["marketing_email"], "denied",
            "untouched key kept"
        );
        assert_eq!(v["categories"]["patient_surveys"], "denied");
        assert_eq!(v["channels"]["sms"], "denied");
        assert_eq!(v["identifiers"]["external_ids"], json!(["crm:1", "crm:2"]));
        assert_eq!(
            v["identifiers"]["email_sha256"].as_array().unwrap().len(),
            2
        );
        assert_eq!(
            v["identifiers"]["phone_sha256"].as_array().unwrap().len(),
            2
        );
        assert_eq!(v["gpc"], true);
        assert_ne!(v["updated_at"], "2026-01-01T00:00:00Z");
        assert!(!text.contains("second@"));
        for who in ["jane.roe@example.com", "second@example.com"] {
            let mut ids = Identifiers::new();
            ids.add_email(who);
            assert_eq!(h.store.lookup(&ids).len(), 1);
        }
        // null removes a key (back to the default).
        let (s, v, _) = h
            .call(
                "PATCH",
                "/v1/consent/P-1001",
                OPS,
                Some(r#"{"categories":{"advertising":null}}"#),
            )
            .await;
        assert_eq!(s, StatusCode::OK);
        assert!(v["categories"].get("advertising").is_none());
        assert_eq!(v["gpc"], true);
        let (s, v, _) = h
            .call(
                "PATCH",
                "/v1/consent/P-1001",
                OPS,
                Some(r#"{"categories":["x"]}"#),
            )
            .await;
        assert_eq!(
            (s, v["field"].as_str()),
            (StatusCode::BAD_REQUEST, Some("categories"))
        );
        assert_eq!(h.events.lock().unwrap().last().unwrap().op, ChangeOp::Patch);
    }

    #[test]
    fn token_file_parse() {
        let t = Tokens::parse(TOKENS).unwrap();
        assert_eq!(t.names(), vec!["ops", "crm"]);
        assert_eq!(t.authenticate("crm-secret-token-2"), Some("crm"));
        assert_eq!(t.authenticate("crm-secret-token-"), None);
        let e = Tokens::parse("# c\nops:abc\nthis-line-has-secret\n").unwrap_err();
        assert_eq!(e, "line 3: expected name:token");
        assert!(Tokens::parse("a:x\na:y\n")
            .unwrap_err()
            .starts_with("line 2"));
        assert!(Tokens::parse(":x\n").unwrap_err().contains("line 1"));
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("tokens");
        std::fs::write(&p, "ops:tok\nbad\n").unwrap();
        let e = load_tokens(&p).unwrap_err();
        assert!(e.contains("line 2") && e.contains("tokens"), "{e}");
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("P%2D1%20x").unwrap(), "P-1 x");
        assert!(percent_decode("P%2").is_none());
        assert!(percent_decode("%FF").is_none());
    }

    fn if_match_of(values: &[&str]) -> Result<Precondition, ()> {
        let mut h = http::HeaderMap::new();
        for v in values {
            h.append(header::IF_MATCH, header::HeaderValue::from_str(v).unwrap());
        }
        if_match(&h)
    }

    #[test]
    fn if_match_parsing() {
        assert_eq!(if_match_of(&[]), Ok(Precondition::None));
        assert_eq!(if_match_of(&["*"]), Ok(Precondition::Exists));
        assert_eq!(if_match_of(&["\"3\""]), Ok(Precondition::Versions(vec![3])));
        assert_eq!(
            if_match_of(&["\"3\", W/\"4\" ,\"x\"", "\"5\""]),
            Ok(Precondition::Versions(vec![3, 5])),
            "weak and foreign tags never match"
        );
        assert_eq!(
            if_match_of(&["W/\"4\""]),
            Ok(Precondition::Versions(vec![])),
            "only a weak tag: can never hold"
        );
        for bad in [
            "3",
            "\"3",
            "\"3\" \"4\"",
            "*, \"3\"",
            "*, W/\"3\"",
            "**",
            "\"+3\"x",
        ] {
            assert_eq!(if_match_of(&[bad]), Err(()), "{bad}");
        }
        assert_eq!(if_match_of(&["*", "*"]), Err(()));
        // A tag that is not all digits is not a version.
        assert_eq!(if_match_of(&["\"+3\""]), Ok(Precondition::Versions(vec![])));
    }

    #[tokio::test]
    async fn versions_etags_and_if_match() {
        let h = harness().await;
        let p = "/v1/consent/P-1001";
        let etag = |hm: &http::HeaderMap| {
            hm.get(header::ETAG)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        // Known only from the snapshot: version 0.
        let (s, hm, v) = h.call_h("GET", p, &[], "").await;
        assert_eq!((s, v["version"].as_u64()), (StatusCode::OK, Some(0)));
        assert_eq!(etag(&hm).as_deref(), Some("\"0\""));
        let (s, hm, v) = h
            .call_h("PATCH", p, &[("if-match", "\"0\"")], r#"{"gpc":true}"#)
            .await;
        assert_eq!((s, v["version"].as_u64()), (StatusCode::OK, Some(1)), "{v}");
        assert_eq!(etag(&hm).as_deref(), Some("\"1\""));
        // Stale: 412, the current version named, nothing changed.
        let (s, hm, v) = h
            .call_h(
                "PATCH",
                p,
                &[("if-match", "\"0\"")],
                r#"{"limit_sensitive":true}"#,
            )
            .await;
        assert_eq!(s, StatusCode::PRECONDITION_FAILED);
        assert_eq!(v["error"], "precondition_failed");
        assert_eq!(v["current_version"], 1);
        assert_eq!(etag(&hm).as_deref(), Some("\"1\""));
        assert!(!h.store.get("P-1001").unwrap().limit_sensitive);
        assert_eq!(h.journal_lines(), 1);
        let (s, _, v) = h
            .call_h(
                "PATCH",
                p,
                &[("if-match", "\"7\", \"1\"")],
                r#"{"limit_sensitive":true}"#,
            )
            .await;
        assert_eq!((s, v["version"].as_u64()), (StatusCode::OK, Some(2)));
        let (s, _, _) = h
            .call_h("PATCH", p, &[("if-match", "W/\"2\"")], r#"{"gpc":false}"#)
            .await;
        assert_eq!(s, StatusCode::PRECONDITION_FAILED, "weak tags never match");
        // A version in the body is the same precondition, and is not stored.
        let (s, _, v) = h.call_h("PUT", p, &[], r#"{"version":1}"#).await;
        assert_eq!(
            (s, v["current_version"].as_u64()),
            (StatusCode::PRECONDITION_FAILED, Some(2))
        );
        let (s, _, v) = h.call_h("PUT", p, &[], r#"{"version":2,"gpc":true}"#).await;
        assert_eq!((s, v["version"].as_u64()), (StatusCode::OK, Some(3)), "{v}");
        let (s, _, v) = h
            .call_h("PUT", p, &[("if-match", "\"3\"")], r#"{"version":2}"#)
            .await;
        assert_eq!(
            (s, v["current_version"].as_u64()),
            (StatusCode::PRECONDITION_FAILED, Some(3))
        );
        let (s, _, v) = h.call_h("PATCH", p, &[], r#"{"version":"x"}"#).await;
        assert_eq!(
            (s, v["field"].as_str()),
            (StatusCode::BAD_REQUEST, Some("version"))
        );
        let (s, _, v) = h.call_h("PUT", p, &[("if-match", "3")], "{}").await;
        assert_eq!(
            (s, v["error"].as_str()),
            (StatusCode::BAD_REQUEST, Some("invalid_if_match"))
        );
        // DELETE too; a record created again never reuses a version.
        let (s, _, _) = h.call_h("DELETE", p, &[("if-match", "\"2\"")], "").await;
        assert_eq!(s, StatusCode::PRECONDITION_FAILED);
        assert!(h.store.get("P-1001").is_some());
        let (s, _, _) = h.call_h("DELETE", p, &[("if-match", "\"3\"")], "").await;
        assert_eq!(s, StatusCode::OK);
        let (s, _, v) = h.call_h("PUT", p, &[("if-match", "*")], "{}").await;
        assert_eq!(s, StatusCode::PRECONDITION_FAILED);
        assert_eq!(v["current_version"], Value::Null);
        let (s, _, v) = h.call_h("PATCH", p, &[], "{}").await;
        assert_eq!(
            (s, v["error"].as_str()),
            (StatusCode::NOT_FOUND, Some("not_found"))
        );
        let (s, _, v) = h.call_h("PUT", p, &[], "{}").await;
        assert_eq!((s, v["version"].as_u64()), (StatusCode::OK, Some(5)));
        let (s, _, v) = h
            .call_h("PATCH", p, &[("if-match", "*")], r#"{"gpc":true}"#)
            .await;
        assert_eq!((s, v["version"].as_u64()), (StatusCode::OK, Some(6)));
        assert_eq!(h.store.get("P-1001").unwrap().version, 6);
    }
}
