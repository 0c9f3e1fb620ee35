//! The request pipeline every listener hands its requests to:
//! route → identify → look up → decide → rewrite → forward, then the decision
//! headers on the way back. CONNECT interception and the gateway listener call
//! [`handle`] with the destination they learnt from the tunnel or SNI.

use crate::app::{App, Runtime};
use crate::audit::AuditRecord;
use crate::body::{self, BodyReadError, ClientBody, Encoding};
use crate::config::{Mode, OnBlocked, UnknownDestinations};
use crate::consent::ConsentStore;
use crate::decide::{Context, Decision, EventVerdict};
use crate::destinations::{BodyError, Enforced, RequestView};
use crate::forward::{BoxError, ProxyBody};
use crate::identify::Identifiers;
use crate::model::Category;
use crate::route::Route;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Full};
use std::sync::Arc;
use std::time::Instant;

pub const H_DECISION: &str = "x-consentgate-decision";
pub const H_REQUEST_ID: &str = "x-consentgate-request-id";
const H_PATIENT: &str = "x-patient-id";
const H_CATEGORY: &str = "x-consent-category";

/// How the request reached us.
#[derive(Clone, Debug)]
pub enum Via {
    /// Plain HTTP on the proxy port: absolute-form or Host header.
    Plain,
    /// Inside an intercepted CONNECT tunnel or on the gateway listener.
    Intercepted { host: String, port: u16 },
}

/// The request-level decision, as in `x-consentgate-decision`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestDecision {
    Allowed,
    Modified,
    Blocked,
}

impl RequestDecision {
    pub fn as_str(self) -> &'static str {
        match self {
            RequestDecision::Allowed => "allowed",
            RequestDecision::Modified => "modified",
            RequestDecision::Blocked => "blocked",
        }
    }
}

pub fn new_request_id() -> String {
    let id: u128 = rand::random();
    format!("{:032x}", id)
}

pub fn empty_body() -> ProxyBody {
    Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub fn full_body(data: impl Into<Bytes>) -> ProxyBody {
    Full::new(data.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A JSON error answer with the decision headers.
pub fn json_response(
    status: u16,
    decision: RequestDecision,
    request_id: &str,
    body: serde_json::Value,
) -> Response<ProxyBody> {
    let bytes = serde_json::to_vec(&body).unwrap_or_default();
    let mut resp = Response::new(full_body(bytes));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    stamp(h, decision, request_id);
    resp
}

pub fn error_response(
    status: u16,
    request_id: &str,
    code: &str,
    detail: impl Into<String>,
) -> Response<ProxyBody> {
    let mut r = json_response(
        status,
        RequestDecision::Blocked,
        request_id,
        serde_json::json!({"error": code, "request_id": request_id, "detail": detail.into()}),
    );
    r.extensions_mut().insert(AuditReason(code.to_string()));
    r
}

/// The reason a refusal is audited under (its JSON `error` code).
#[derive(Clone, Debug)]
pub struct AuditReason(pub String);

fn stamp(h: &mut HeaderMap, decision: RequestDecision, request_id: &str) {
    h.insert(
        HeaderName::from_static(H_DECISION),
        HeaderValue::from_static(decision.as_str()),
    );
    if let Ok(v) = HeaderValue::from_str(request_id) {
        h.insert(HeaderName::from_static(H_REQUEST_ID), v);
    }
}

/// Where a plain request is going: absolute-form URI, else Host / :authority.
/// Always upstream over TLS, to 443 unless the authority names a port and
/// the scheme is https.
pub fn plain_target<B>(req: &Request<B>) -> Option<(String, u16)> {
    let authority = match req.uri().authority() {
        Some(a) => a.as_str().to_string(),
        None => req.headers().get(header::HOST)?.to_str().ok()?.to_string(),
    };
    let (host, port) = split_host_port(&authority)?;
    let port = if req.uri().scheme_str() == Some("https") {
        port.unwrap_or(443)
    } else {
        443
    };
    Some((host, port))
}

/// "Host:port" → ("host", Some(port)); IPv6 literals in brackets are kept.
pub fn split_host_port(authority: &str) -> Option<(String, Option<u16>)> {
    let a = authority.trim();
    if a.is_empty() {
        return None;
    }
    let (host, port) = if let Some(rest) = a.strip_prefix('[') {
        let (h, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p.parse().ok()?),
            None if after.is_empty() => None,
            None => return None,
        };
        (format!("[{h}]"), port)
    } else {
        match a.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p.parse().ok()?)),
            None => (a.to_string(), None),
        }
    };
    if host.is_empty()
        || host
            .chars()
            .any(|c| c.is_whitespace() || c == '/' || c == '@')
    {
        return None;
    }
    Some((host.to_ascii_lowercase(), port))
}

/// Headers never forwarded upstream: our control headers and hop-by-hop ones.
fn scrub_request_headers(h: &mut HeaderMap) {
    let listed: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in listed {
        h.remove(n);
    }
    for n in [
        "connection",
        "proxy-connection",
        "keep-alive",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authorization",
        "host",
        H_PATIENT,
        H_CATEGORY,
    ] {
        h.remove(n);
    }
    let ours: Vec<HeaderName> = h
        .keys()
        .filter(|k| k.as_str().starts_with("x-consentgate-"))
        .cloned()
        .collect();
    for k in ours {
        h.remove(k);
    }
}

fn scrub_response_headers(h: &mut HeaderMap) {
    for n in [
        "connection",
        "proxy-connection",
        "keep-alive",
        "transfer-encoding",
        "upgrade",
        "trailer",
    ] {
        h.remove(n);
    }
    let ours: Vec<HeaderName> = h
        .keys()
        .filter(|k| k.as_str().starts_with("x-consentgate-"))
        .cloned()
        .collect();
    for k in ours {
        h.remove(k);
    }
}

/// The request-level inputs to enforcement that come from headers.
#[derive(Clone, Debug)]
pub struct RequestHints {
    pub category: Category,
    pub patient: Option<String>,
    pub header_gpc: bool,
}

impl RequestHints {
    pub fn from_headers(h: &HeaderMap, route: &Route) -> Result<RequestHints, String> {
        let category = match h.get(H_CATEGORY) {
            None => route.category,
            Some(v) => {
                let s = v
                    .to_str()
                    .map_err(|_| "X-Consent-Category is not text".to_string())?;
                Category::parse(s.trim()).ok_or_else(|| {
                    "X-Consent-Category names no known category (expected one of: advertising, \
                     marketing_email, marketing_sms, phone_outreach, appointment_reminders, \
                     patient_surveys, care_followups)"
                        .to_string()
                })?
            }
        };
        let patient = h
            .get(H_PATIENT)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty());
        let header_gpc = h
            .get("sec-gpc")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim() == "1");
        Ok(RequestHints {
            category,
            patient,
            header_gpc,
        })
    }
}

/// What enforcement concluded for one body.
pub struct Enforcement {
    pub enforced: Enforced,
    pub decisions: Vec<Decision>,
    pub context: Context,
}

impl Enforcement {
    pub fn all_dropped(&self) -> bool {
        !self.enforced.events.is_empty() && self.enforced.events.iter().all(|e| e.verdict.is_drop())
    }
    pub fn changed(&self) -> bool {
        self.enforced.body.is_some() || self.enforced.events.iter().any(|e| e.changed())
    }
    /// Distinct reasons of dropped events, for the 451 answer.
    pub fn drop_reasons(&self) -> Vec<&'static str> {
        let mut v: Vec<&'static str> = Vec::new();
        for (e, d) in self.enforced.events.iter().zip(&self.decisions) {
            if let EventVerdict::Drop(_) = e.verdict {
                let r = e.verdict.reason(d.gpc_trigger).as_str();
                if !v.contains(&r) {
                    v.push(r);
                }
            }
        }
        v
    }
}

/// Run the adapter over a decoded body with the policy (no I/O). Shared by the
/// proxy and `explain`; with `trace` each decision keeps the identifiers it was
/// looked up by (only `explain` prints them).
pub fn enforce(
    rt: &Runtime,
    consent: &ConsentStore,
    route: &Route,
    view: &RequestView<'_>,
    hints: &RequestHints,
    body: &[u8],
    trace: bool,
) -> Result<Enforcement, BodyError> {
    let context = Context {
        category: hints.category,
        channel: route.adapter.channel(),
        kind: route.adapter.kind(),
        header_gpc: hints.header_gpc,
        stale: consent.is_stale(rt.config.consent.max_staleness),
    };
    let mut decisions = Vec::new();
    let mut decide = |ids: &Identifiers| {
        let mut lookup_ids;
        let ids = if ids.is_empty() {
            lookup_ids = Identifiers::new();
            if let Some(p) = &hints.patient {
                lookup_ids.add_patient(p);
            }
            &lookup_ids
        } else {
            ids
        };
        let d = if trace {
            let mut d = rt.policy.decide_traced(&context, consent.lookup(ids));
            d.identifiers = ids.keys.clone();
            d
        } else {
            rt.policy.decide(&context, consent.lookup(ids))
        };
        let v = d.verdict;
        decisions.push(d);
        v
    };
    let enforced = route.adapter.enforce(view, body, &mut decide)?;
    Ok(Enforcement {
        enforced,
        decisions,
        context,
    })
}

fn media_type(h: &HeaderMap) -> Option<String> {
    h.get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
}

fn has_body<B: hyper::body::Body>(req: &Request<B>) -> bool {
    match req.headers().get(header::CONTENT_LENGTH) {
        Some(v) => v.to_str().ok().and_then(|s| s.parse::<u64>().ok()) != Some(0),
        None => !req.body().is_end_stream(),
    }
}

fn upstream_uri(host: &str, port: u16, pq: Option<&str>) -> Result<Uri, http::Error> {
    let pq = pq.unwrap_or("/");
    let s = if port == 443 {
        format!("https://{host}{pq}")
    } else {
        format!("https://{host}:{port}{pq}")
    };
    Uri::try_from(s).map_err(http::Error::from)
}

/// The pipeline entry point for every proxied request.
pub async fn handle(app: Arc<App>, req: Request<ClientBody>, via: Via) -> Response<ProxyBody> {
    let started = Instant::now();
    let request_id = new_request_id();
    let rt = app.runtime.load_full();
    let (host, port) = match &via {
        Via::Intercepted { host, port } => (host.clone(), *port),
        Via::Plain => match plain_target(&req) {
            Some(t) => t,
            None => {
                return blocked(
                    &app,
                    "unknown",
                    &request_id,
                    started,
                    error_response(
                        400,
                        &request_id,
                        "bad_request",
                        "no destination host (absolute URI or Host header)",
                    ),
                )
            }
        },
    };
    let Some(route) = rt
        .registry
        .route(&host, req.method(), req.uri().path())
        .cloned()
    else {
        if rt.config.unknown_destinations == UnknownDestinations::Tunnel {
            tracing::info!(request_id = %request_id, "unknown destination passed through (tunnel mode)");
            return forward(
                &app,
                &rt,
                req,
                &host,
                port,
                "unknown",
                RequestDecision::Allowed,
                &request_id,
                started,
                Audit::request("unknown_destination_tunnel"),
            )
            .await;
        }
        return blocked(
            &app,
            "unknown",
            &request_id,
            started,
            error_response(
                403,
                &request_id,
                "unknown_destination",
                "destination host is not a configured destination",
            ),
        );
    };
    let name = route.name().to_string();
    let refuse = |resp| blocked(&app, &name, &request_id, started, resp);
    let hints = match RequestHints::from_headers(req.headers(), &route) {
        Ok(h) => h,
        Err(e) => return refuse(error_response(400, &request_id, "bad_request", e)),
    };
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let inspect = route.mode != Mode::Passthrough && route.adapter.inspects(&method, &path);
    if !inspect {
        if route.mode == Mode::Passthrough || !has_body(&req) {
            return forward(
                &app,
                &rt,
                req,
                &host,
                port,
                &name,
                RequestDecision::Allowed,
                &request_id,
                started,
                Audit::request("not_inspected"),
            )
            .await;
        }
        return refuse(
            error_response(451, &request_id, "uninspected_endpoint", "this destination endpoint is not inspected; requests with a body are refused (set the destination's mode to passthrough to allow)"),
        );
    }
    // Inspected: read the whole body (bounded), decode, enforce.
    let limit = rt.config.max_body_bytes;
    if let Some(len) = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.parse::<u64>().ok())
    {
        if len > limit {
            return refuse(error_response(
                413,
                &request_id,
                "body_too_large",
                format!("body over max_body_bytes ({limit})"),
            ));
        }
    }
    let encoding = match Encoding::parse(
        req.headers()
            .get(header::CONTENT_ENCODING)
            .and_then(|v| v.to_str().ok()),
    ) {
        Ok(e) => e,
        Err(BodyReadError::UnknownEncoding(e)) => {
            return refuse(error_response(
                415,
                &request_id,
                "unsupported_content_encoding",
                format!("Content-Encoding {e:?} is not supported (gzip, deflate, br, zstd)"),
            ))
        }
        Err(_) => {
            return refuse(error_response(
                415,
                &request_id,
                "unsupported_content_encoding",
                "unsupported Content-Encoding",
            ))
        }
    };
    let (parts, incoming) = req.into_parts();
    let raw = match body::read_limited(incoming, limit).await {
        Ok(b) => b,
        Err(e) => return refuse(body_error_response(&request_id, e, limit)),
    };
    let plain = match body::decode(encoding, &raw, limit) {
        Ok(p) => p,
        Err(e) => return refuse(body_error_response(&request_id, e, limit)),
    };
    let ct = media_type(&parts.headers);
    let view = RequestView {
        method: &parts.method,
        host: &host,
        path: parts.uri.path(),
        query: parts.uri.query(),
        content_type: ct.as_deref(),
    };
    let outcome = match enforce(&rt, &app.consent, &route, &view, &hints, &plain, false) {
        Ok(o) => o,
        Err(BodyError::Unreadable(detail)) => {
            return refuse(error_response(422, &request_id, "unreadable_body", detail))
        }
        Err(BodyError::Forbidden { code, detail }) => {
            return refuse(error_response(451, &request_id, code, detail))
        }
    };
    count_events(&app, &name, &outcome, route.mode == Mode::Shadow);
    let log_events = outcome.enforced.events.len();
    if route.mode == Mode::Shadow {
        tracing::info!(request_id = %request_id, destination = %name, events = log_events, "shadow: original bytes forwarded");
        let req = Request::from_parts(parts, full_body(raw));
        return forward(
            &app,
            &rt,
            req,
            &host,
            port,
            &name,
            RequestDecision::Allowed,
            &request_id,
            started,
            Audit {
                events: event_records(&app, &request_id, &name, &outcome, true),
                reason: "shadow",
            },
        )
        .await;
    }
    if outcome.all_dropped() {
        let reasons = outcome.drop_reasons();
        tracing::info!(request_id = %request_id, destination = %name, events = log_events, "all events dropped; upstream not contacted");
        let resp = if route.on_blocked == OnBlocked::SyntheticOk {
            let s = route.adapter.synthetic_ok();
            let mut r = Response::new(full_body(Bytes::from_static(s.body.as_bytes())));
            *r.status_mut() = StatusCode::from_u16(s.status).unwrap_or(StatusCode::OK);
            if !s.body.is_empty() {
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
            }
            stamp(r.headers_mut(), RequestDecision::Blocked, &request_id);
            r
        } else {
            json_response(
                451,
                RequestDecision::Blocked,
                &request_id,
                serde_json::json!({"error": "blocked_by_consent_policy", "request_id": request_id, "reasons": reasons}),
            )
        };
        let mut resp = resp;
        resp.extensions_mut()
            .insert(AuditReason("blocked_by_consent_policy".into()));
        let events = event_records(&app, &request_id, &name, &outcome, false);
        return blocked_with(&app, &name, &request_id, started, resp, events);
    }
    let changed = outcome.changed();
    let events = event_records(&app, &request_id, &name, &outcome, false);
    let (decision, out_body) = match outcome.enforced.body {
        Some(new_plain) => match body::encode(encoding, &new_plain) {
            Ok(b) => (RequestDecision::Modified, Bytes::from(b)),
            Err(e) => return refuse(error_response(500, &request_id, "encode_failed", e)),
        },
        None if changed => (RequestDecision::Modified, raw),
        None => (RequestDecision::Allowed, raw),
    };
    let mut parts = parts;
    parts.headers.remove(header::CONTENT_LENGTH);
    parts
        .headers
        .insert(header::CONTENT_LENGTH, HeaderValue::from(out_body.len()));
    let req = Request::from_parts(parts, full_body(out_body));
    forward(
        &app,
        &rt,
        req,
        &host,
        port,
        &name,
        decision,
        &request_id,
        started,
        Audit {
            events,
            reason: "enforced",
        },
    )
    .await
}

fn body_error_response(request_id: &str, e: BodyReadError, limit: u64) -> Response<ProxyBody> {
    match e {
        BodyReadError::TooLarge => error_response(
            413,
            request_id,
            "body_too_large",
            format!("body over max_body_bytes ({limit})"),
        ),
        BodyReadError::UnknownEncoding(enc) => error_response(
            415,
            request_id,
            "unsupported_content_encoding",
            format!("Content-Encoding {enc:?} is not supported"),
        ),
        BodyReadError::Unreadable(d) => error_response(422, request_id, "unreadable_body", d),
        BodyReadError::TimedOut(t) => error_response(
            408,
            request_id,
            "request_timeout",
            format!(
                "request body not complete within limits.body_read_timeout ({}); nothing was forwarded",
                humantime::format_duration(t)
            ),
        ),
        BodyReadError::Overloaded => error_response(
            503,
            request_id,
            "overloaded",
            "too many request bodies in memory (limits.inflight_body_bytes); nothing was forwarded, retry later",
        ),
    }
}

/// What a forwarded request adds to the audit trail.
struct Audit {
    events: Vec<AuditRecord>,
    reason: &'static str,
}

impl Audit {
    fn request(reason: &'static str) -> Audit {
        Audit {
            events: Vec::new(),
            reason,
        }
    }
}

/// One audit record per event or recipient: decision, reason, rule, what was
/// stripped or set, and the patient's pseudonym (never the raw id).
fn event_records(
    app: &App,
    request_id: &str,
    dest: &str,
    o: &Enforcement,
    shadow: bool,
) -> Vec<AuditRecord> {
    o.enforced
        .events
        .iter()
        .zip(&o.decisions)
        .enumerate()
        .map(|(i, (e, d))| {
            let reason = e.verdict.reason(d.gpc_trigger);
            let mut r =
                AuditRecord::decision(request_id, dest, event_decision(e, shadow), reason.as_str());
            r.category = Some(o.context.category.as_str().to_string());
            r.rule = Some(reason.rule().to_string());
            r.fields_stripped = e.fields_stripped.clone();
            r.flags_set = e.flags_set.clone();
            if let Some(rec) = d.records.first() {
                r.patient = Some(app.pseudonyms.pseudonym(&rec.patient_id));
            }
            r.detail = Some(serde_json::json!({"event": i, "matches": d.records.len()}));
            r
        })
        .collect()
}

fn event_decision(e: &crate::destinations::EventApplied, shadow: bool) -> &'static str {
    match (e.verdict.is_drop(), e.changed(), shadow) {
        (true, _, false) => "dropped",
        (true, _, true) => "would_block",
        (false, true, false) => "modified",
        (false, true, true) => "would_modify",
        (false, false, _) => "allowed",
    }
}

fn count_events(app: &App, dest: &str, o: &Enforcement, shadow: bool) {
    for (e, d) in o.enforced.events.iter().zip(&o.decisions) {
        let reason = e.verdict.reason(d.gpc_trigger).as_str();
        let decision = event_decision(e, shadow);
        app.metrics
            .events_total
            .with_label_values(&[dest, decision, reason])
            .inc();
    }
}

pub fn blocked(
    app: &App,
    dest: &str,
    request_id: &str,
    started: Instant,
    resp: Response<ProxyBody>,
) -> Response<ProxyBody> {
    blocked_with(app, dest, request_id, started, resp, Vec::new())
}

/// Count, audit (with the per-event records, if any) and log a refusal.
pub fn blocked_with(
    app: &App,
    dest: &str,
    request_id: &str,
    started: Instant,
    resp: Response<ProxyBody>,
    mut records: Vec<AuditRecord>,
) -> Response<ProxyBody> {
    let reason = resp
        .extensions()
        .get::<AuditReason>()
        .map(|r| r.0.clone())
        .unwrap_or_else(|| "blocked".into());
    records.push(AuditRecord::decision(request_id, dest, "blocked", &reason));
    // Already blocked: an unavailable audit changes nothing here (the writer counts it).
    let _ = app.audit.submit(records);
    let m = &app.metrics;
    m.requests_total.with_label_values(&[dest, "blocked"]).inc();
    m.request_duration
        .with_label_values(&[dest])
        .observe(started.elapsed().as_secs_f64());
    tracing::info!(request_id = %request_id, destination = %dest, status = resp.status().as_u16(), decision = "blocked", "request blocked");
    resp
}

/// Send upstream and stream the answer back with the decision headers.
#[allow(clippy::too_many_arguments)]
async fn forward<B>(
    app: &App,
    rt: &Runtime,
    req: Request<B>,
    host: &str,
    port: u16,
    dest: &str,
    decision: RequestDecision,
    request_id: &str,
    started: Instant,
    audit: Audit,
) -> Response<ProxyBody>
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    // Recorded before anything leaves: no audit, no egress (fail closed).
    let mut records = audit.events;
    records.push(AuditRecord::decision(
        request_id,
        dest,
        decision.as_str(),
        audit.reason,
    ));
    if let Err(e) = app.audit.submit(records) {
        return blocked(
            app,
            dest,
            request_id,
            started,
            error_response(
                503,
                request_id,
                crate::audit::AuditUnavailable::REASON,
                format!("audit trail unavailable ({}); nothing was sent", e.as_str()),
            ),
        );
    }
    let (mut parts, body) = req.into_parts();
    let uri = match upstream_uri(host, port, parts.uri.path_and_query().map(|p| p.as_str())) {
        Ok(u) => u,
        Err(_) => {
            return blocked(
                app,
                dest,
                request_id,
                started,
                error_response(
                    400,
                    request_id,
                    "bad_request",
                    "request target is not a valid URI",
                ),
            )
        }
    };
    parts.uri = uri;
    parts.version = http::Version::HTTP_11;
    scrub_request_headers(&mut parts.headers);
    let req = Request::from_parts(parts, body.map_err(Into::into).boxed_unsync());
    let m = &app.metrics;
    let inside = started.elapsed();
    let up_start = Instant::now();
    let result = rt.upstream.send(req).await;
    m.upstream_duration
        .with_label_values(&[dest])
        .observe(up_start.elapsed().as_secs_f64());
    let t_after = Instant::now();
    match result {
        Ok(resp) => {
            let (mut parts, body) = resp.into_parts();
            scrub_response_headers(&mut parts.headers);
            stamp(&mut parts.headers, decision, request_id);
            m.requests_total
                .with_label_values(&[dest, decision.as_str()])
                .inc();
            m.request_duration
                .with_label_values(&[dest])
                .observe((inside + t_after.elapsed()).as_secs_f64());
            tracing::info!(request_id = %request_id, destination = %dest, status = parts.status.as_u16(), decision = decision.as_str(), "forwarded");
            Response::from_parts(
                parts,
                body.map_err(|e| -> BoxError { Box::new(e) }).boxed_unsync(),
            )
        }
        Err(e) => {
            m.upstream_errors_total
                .with_label_values(&[dest, e.kind.as_str()])
                .inc();
            tracing::warn!(request_id = %request_id, destination = %dest, kind = e.kind.as_str(), detail = %e.detail, "upstream failed");
            let code = match e.kind.status() {
                504 => "upstream_timeout",
                _ => "upstream_unavailable",
            };
            let resp = error_response(
                e.kind.status(),
                request_id,
                code,
                format!("{}: {}", e.kind.as_str(), e.detail),
            );
            m.requests_total.with_label_values(&[dest, "blocked"]).inc();
            resp
        }
    }
}

/// Methods that carry no body by convention (used for uninspected endpoints).
pub fn is_bodiless(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::DELETE
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authority_parsing() {
        assert_eq!(
            split_host_port("Graph.Facebook.com:443"),
            Some(("graph.facebook.com".into(), Some(443)))
        );
        assert_eq!(
            split_host_port("[::1]:8443"),
            Some(("[::1]".into(), Some(8443)))
        );
        assert_eq!(split_host_port("a b"), None);
        assert_eq!(split_host_port("host:notaport"), None);
    }
}
