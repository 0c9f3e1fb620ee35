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
//! - Bad JSON, an unknown field or a bad value → 400
//!   `{"error":"invalid_record","field":..,"detail":..}`; values are never echoed.
//!   Body over 64 KiB → 413. Other methods → 405.

use super::record::{ConsentRecord, FieldError};
use super::source::{no_op_on_change, ChangeEvent, ChangeOp, ConsentWriter, OnChange, WriteError};
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
pub const PATH_PREFIX: &str = "/v1/consent/";
/// Largest accepted request body.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Whether a request path belongs to this API (route `/v1/consent/*` here).
pub fn is_consent_path(path: &str) -> bool {
    path.starts_with(PATH_PREFIX) || path == "/v1/consent"
}

/// Admin bearer tokens: names and the SHA-256 of each token (never the token).
#[derive(Clone, Default)]
pub struct Tokens {
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
    pub fn parse(text: &str) -> Result<Tokens, String> {
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

    pub fn names(&self) -> Vec<&str> {
        self.entries.iter().map(|(n, _)| n.as_str()).collect()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The name of the token presented, if any matches. Every entry is
    /// compared, in constant time, whatever matches.
    pub fn authenticate(&self, presented: &str) -> Option<&str> {
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
pub fn load_tokens(path: &Path) -> Result<Tokens, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("admin.tokens_file {}: {e}", path.display()))?;
    Tokens::parse(&text).map_err(|e| format!("admin.tokens_file {}: {e}", path.display()))
}

/// What the API needs: the store (reads), the writer (durable writes), the
/// tokens, and a hook told of every acknowledged write (for the audit trail).
#[derive(Clone)]
pub struct ApiContext {
    pub store: Arc<ConsentStore>,
    pub writer: Arc<dyn ConsentWriter>,
    pub tokens: Arc<Tokens>,
    pub on_change: OnChange,
}

impl ApiContext {
    pub fn new(store: Arc<ConsentStore>, writer: Arc<dyn ConsentWriter>, tokens: Tokens) -> Self {
        ApiContext {
            store,
            writer,
            tokens: Arc::new(tokens),
            on_change: no_op_on_change(),
        }
    }

    pub fn with_on_change(mut self, f: OnChange) -> Self {
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

fn record_response(rec: &ConsentRecord) -> Resp {
    match serde_json::to_value(rec) {
        Ok(v) => json_response(StatusCode::OK, &v),
        Err(_) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "record encoding failed",
        ),
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
pub async fn handle<B>(req: Request<B>, ctx: &ApiContext) -> Resp
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

    match method {
        Method::GET => match ctx.store.get(&patient_id) {
            Some(rec) => record_response(&rec),
            None => error(StatusCode::NOT_FOUND, "not_found", "no such patient"),
        },
        Method::DELETE => match ctx.writer.delete(&patient_id, &actor).await {
            Ok(true) => {
                tracing::info!(actor = %actor, op = "delete", "consent record deleted via admin API");
                (ctx.on_change)(ChangeEvent {
                    patient_id: patient_id.clone(),
                    op: ChangeOp::Delete,
                    actor,
                });
                json_response(StatusCode::OK, &json!({ "deleted": patient_id }))
            }
            Ok(false) => error(StatusCode::NOT_FOUND, "not_found", "no such patient"),
            Err(e) => write_error(&e),
        },
        _ => {
            let body = match read_body(req).await {
                Ok(b) => b,
                Err(r) => return r,
            };
            let op = if method == Method::PUT {
                ChangeOp::Put
            } else {
                ChangeOp::Patch
            };
            let rec = match op {
                ChangeOp::Put => build_put(&body, &patient_id),
                _ => match ctx.store.get(&patient_id) {
                    None => return error(StatusCode::NOT_FOUND, "not_found", "no such patient"),
                    Some(cur) => build_patch(&body, &patient_id, &cur),
                },
            };
            let rec = match rec {
                Ok(r) => r,
                Err(e) => return invalid(&e),
            };
            match ctx.writer.put(rec, &actor).await {
                Ok(stored) => {
                    tracing::info!(actor = %actor, op = op.as_str(), "consent record written via admin API");
                    (ctx.on_change)(ChangeEvent {
                        patient_id,
                        op,
                        actor,
                    });
                    record_response(&stored)
                }
                Err(e) => write_error(&e),
            }
        }
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

/// A PUT body as a record: `patient_id` from the path when absent, `updated_at`
/// now when absent.
pub fn build_put(body: &[u8], patient_id: &str) -> Result<ConsentRecord, FieldError> {
    let mut obj = parse_object(body)?;
    check_path_id(&mut obj, patient_id)?;
    ConsentRecord::from_value(&Value::Object(obj), Some(chrono::Utc::now()))
}

/// A PATCH body merged into the current record (see the module docs).
pub fn build_patch(
    body: &[u8],
    patient_id: &str,
    current: &ConsentRecord,
) -> Result<ConsentRecord, FieldError> {
    let mut patch = parse_object(body)?;
    check_path_id(&mut patch, patient_id)?;
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
