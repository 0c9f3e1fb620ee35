//! The enforcement plan, pure: no I/O, no server types. Two phases decide
//! everything the proxy does with a request, and `explain` renders the very same
//! values, so the two cannot disagree:
//!
//! - [`gate`] reads the request head: where it goes, which destination, the
//!   request-level hints, whether it is inspected, its size and encoding. It
//!   answers [`Gate::Refuse`], [`Gate::Pass`] (forward unread) or
//!   [`Gate::Inspect`] (read the body, then plan).
//! - [`plan`] reads the body: decode, run the destination's adapter with the
//!   consent policy per event, re-encode. It answers [`Plan::Refuse`] or
//!   [`Plan::Forward`] with the [`Enforcement`] behind it.
//!
//! Every status and error code the proxy answers with is made here, by a
//! [`Refusal`] constructor; README's table of refusals lists them.

use crate::app::Runtime;
use crate::audit::{EventEntry, PseudonymKey};
use crate::body::{self, BodyReadError, Encoding};
use crate::config::{Mode, OnBlocked, UnknownDestinations};
use crate::consent::ConsentStore;
use crate::decide::{Context, Decision, EventVerdict};
use crate::destinations::{BodyError, Enforced, EventApplied, Judge, RequestView, SyntheticOk};
use crate::forward::{self, UpstreamErrorKind};
use crate::guard::{self, Guard, Intervention, Reason as GuardReason, Scan};
use crate::identify::Identifiers;
use crate::model::{Category, Channel, H_CATEGORY, H_PATIENT};
use crate::refusal::Shape;
use crate::route::{self, Route, Target, Via};
use http::header::{self, HeaderMap};
use http::request::Parts;
use http::Uri;
use std::borrow::Cow;

/// The request-level decision, as in `x-consentgate-decision`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RequestDecision {
    Allowed,
    Modified,
    Blocked,
}

impl RequestDecision {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            RequestDecision::Allowed => "allowed",
            RequestDecision::Modified => "modified",
            RequestDecision::Blocked => "blocked",
        }
    }
}

/// What a refusal says besides its code.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Detail {
    Text(String),
    /// The distinct reasons of the dropped events (`blocked_by_consent_policy`).
    Reasons(Vec<&'static str>),
}

/// The body a refusal is answered with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Answer {
    /// The product's JSON error, in the destination's vendor shape or plain.
    Json(Shape),
    /// The vendor's empty success (`on_blocked: synthetic_ok`).
    Synthetic(SyntheticOk),
    /// A gRPC trailers-only answer with this `grpc-status` (a gRPC client shows
    /// `grpc-message`, and would show only "HTTP status 415" of a JSON body).
    Grpc(u8),
}

/// Why nothing (more) goes upstream: the status, the JSON `error` code (also the
/// audit reason) and what the app is told.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub status: u16,
    pub code: &'static str,
    pub detail: Detail,
    pub answer: Answer,
}

impl Refusal {
    fn new(status: u16, code: &'static str, detail: impl Into<String>) -> Refusal {
        Refusal {
            status,
            code,
            detail: Detail::Text(detail.into()),
            answer: Answer::Json(Shape::Plain),
        }
    }
    /// Worded in `shape` (a destination's), unless answered with a synthetic success.
    pub(crate) fn in_shape(mut self, shape: Shape) -> Refusal {
        if let Answer::Json(_) = self.answer {
            self.answer = Answer::Json(shape);
        }
        self
    }
    pub(crate) fn bad_request(detail: impl Into<String>) -> Refusal {
        Refusal::new(400, "bad_request", detail)
    }
    pub(crate) fn unknown_destination() -> Refusal {
        Refusal::new(
            403,
            "unknown_destination",
            "destination host is not a configured destination",
        )
    }
    pub(crate) fn connect_not_allowed() -> Refusal {
        Refusal::new(
            405,
            "connect_not_allowed",
            "CONNECT is not accepted inside an intercepted connection",
        )
    }
    fn uninspected_endpoint() -> Refusal {
        Refusal::new(
            451,
            "uninspected_endpoint",
            "this destination endpoint is not inspected; requests with a body or a query \
             string are refused (set the destination's mode to passthrough to allow)",
        )
    }
    /// gRPC to a destination whose REST/JSON interface is the one inspected
    /// (Google Ads' libraries default to gRPC): refused, naming the fix.
    /// `grpc-status` 12 UNIMPLEMENTED: this transport is not supported here.
    fn grpc_not_inspected() -> Refusal {
        Refusal {
            answer: Answer::Grpc(12),
            ..Refusal::new(
                415,
                "grpc_not_inspected",
                "gRPC requests are not inspected, so they are refused: send this call over the \
                 destination's REST/JSON interface (Google Ads: POST \
                 https://googleads.googleapis.com/vNN/customers/{id}:uploadClickConversions and \
                 the other REST endpoints, e.g. the PHP library's transport=rest, or HTTP/JSON \
                 from any client; docs/SDKS.md)",
            )
        }
    }
    fn too_large(limit: u64) -> Refusal {
        Refusal::new(
            413,
            "body_too_large",
            format!("body over max_body_bytes ({limit})"),
        )
    }
    fn unsupported_encoding(name: &str) -> Refusal {
        Refusal::new(
            415,
            "unsupported_content_encoding",
            format!("Content-Encoding {name:?} is not supported (gzip, deflate, br, zstd)"),
        )
    }
    /// A request head or body not complete within its `limits` timeout.
    pub(crate) fn request_timeout(detail: impl Into<String>) -> Refusal {
        Refusal::new(408, "request_timeout", detail)
    }
    /// A request head over `limits.max_header_bytes` (or too many fields).
    pub(crate) fn headers_too_large(detail: impl Into<String>) -> Refusal {
        Refusal::new(431, "headers_too_large", detail)
    }
    fn overloaded() -> Refusal {
        Refusal::new(
            503,
            "overloaded",
            "too many request bodies in memory (limits.inflight_body_bytes); nothing was \
             sent, retry later",
        )
    }
    fn unreadable(detail: impl Into<String>) -> Refusal {
        Refusal::new(422, "unreadable_body", detail)
    }
    fn forbidden(code: &'static str, detail: String) -> Refusal {
        Refusal::new(451, code, detail)
    }
    /// The guard found someone this request may not send for outside every event.
    fn foreign_identifier() -> Refusal {
        Refusal::new(
            451,
            "foreign_identifier",
            "the request names a patient it may not send for outside its events \
             (in the body, the query or a header); nothing was sent",
        )
    }
    fn encode_failed(detail: String) -> Refusal {
        Refusal::new(500, "encode_failed", detail)
    }
    fn blocked_by_policy(route: &Route, reasons: Vec<&'static str>) -> Refusal {
        let (status, answer) = match route.on_blocked {
            OnBlocked::SyntheticOk => {
                let s = route.adapter.synthetic_ok();
                (s.status, Answer::Synthetic(s))
            }
            OnBlocked::Error => (451, Answer::Json(route.refusal_shape)),
        };
        Refusal {
            status,
            code: "blocked_by_consent_policy",
            detail: Detail::Reasons(reasons),
            answer,
        }
    }
    /// The audit trail could not take the request's records: nothing leaves.
    pub(crate) fn audit_unavailable(why: &str) -> Refusal {
        Refusal::new(
            503,
            crate::audit::AuditUnavailable::REASON,
            format!("audit trail unavailable ({why}); nothing was sent"),
        )
    }
    /// The upstream failed after the request was decided and audited.
    pub(crate) fn upstream(kind: UpstreamErrorKind, detail: &str) -> Refusal {
        let code = match kind.status() {
            504 => "upstream_timeout",
            _ => "upstream_unavailable",
        };
        Refusal::new(kind.status(), code, format!("{}: {detail}", kind.as_str()))
    }
    /// A body that could not be read or decoded.
    pub(crate) fn body(e: BodyReadError, limit: u64) -> Refusal {
        match e {
            BodyReadError::TooLarge => Refusal::too_large(limit),
            BodyReadError::UnknownEncoding(name) => Refusal::unsupported_encoding(&name),
            BodyReadError::Unreadable(d) => Refusal::unreadable(d),
            BodyReadError::TimedOut(t) => Refusal::request_timeout(format!(
                "request body not complete within limits.body_read_timeout ({}); nothing was sent",
                humantime::format_duration(t)
            )),
            BodyReadError::Overloaded => Refusal::overloaded(),
        }
    }
}

/// The request head as the gate sees it.
pub(crate) struct Head<'a> {
    pub parts: &'a Parts,
    pub via: &'a Via,
    /// Whether a body follows (a declared non-zero length, or a stream that is not
    /// already at its end).
    pub has_body: bool,
}

/// What is wrong with a request head that got past the listener's gate (which
/// sees HTTP/1 only): several Host headers (RFC 9110 §7.2: 400), and on HTTP/2 a
/// Host that differs from `:authority` (RFC 9113 §8.3.1) or a header list over
/// `limits.max_header_bytes` (counted as HTTP/2 does: name + value + 32 per field).
/// On HTTP/1 an absolute-form target wins over the Host header (RFC 9112 §3.2.2).
pub(crate) fn check_head<B>(req: &http::Request<B>, max_header_bytes: u64) -> Option<Refusal> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Some(Refusal::bad_request("more than one Host header"));
    }
    if req.version() != http::Version::HTTP_2 {
        return None;
    }
    if let (Some(h), Some(a)) = (host, req.uri().authority()) {
        if !h.as_bytes().eq_ignore_ascii_case(a.as_str().as_bytes()) {
            return Some(Refusal::bad_request(
                "the Host header differs from :authority",
            ));
        }
    }
    let pseudo = [
        req.method().as_str().len() + ":method".len(),
        req.uri().path_and_query().map_or(0, |p| p.as_str().len()) + ":path".len(),
        req.uri().scheme_str().map_or(0, str::len) + ":scheme".len(),
        req.uri().authority().map_or(0, |a| a.as_str().len()) + ":authority".len(),
    ];
    let size: usize = pseudo.iter().map(|n| n + 32).sum::<usize>()
        + req
            .headers()
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 32)
            .sum::<usize>();
    (size as u64 > max_header_bytes).then(|| {
        Refusal::headers_too_large(format!(
            "request header list over limits.max_header_bytes ({max_header_bytes} bytes)"
        ))
    })
}

/// The request-level inputs to enforcement that come from headers.
#[derive(Clone, Debug)]
pub(crate) struct RequestHints {
    pub category: Category,
    pub patient: Option<String>,
    pub header_gpc: bool,
}

impl RequestHints {
    fn from_headers(h: &HeaderMap, route: &Route) -> Result<RequestHints, String> {
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

/// A request forwarded without reading its body.
pub(crate) struct Pass<'rt> {
    pub dest: &'rt str,
    pub uri: Uri,
    /// How a refusal after this point (audit or upstream failure) is worded.
    pub shape: Shape,
    /// The audit reason (`not_inspected`, `unknown_destination_tunnel`).
    pub reason: &'static str,
}

/// A request whose body is read and planned.
pub(crate) struct Inspect<'rt> {
    pub route: &'rt Route,
    pub target: Target,
    pub uri: Uri,
    pub hints: RequestHints,
    pub encoding: Encoding,
    /// `max_body_bytes`, raw and decoded.
    pub limit: u64,
    pub content_type: Option<String>,
}

/// What the head decides.
pub(crate) enum Gate<'rt> {
    Refuse { dest: &'rt str, refusal: Refusal },
    Pass(Pass<'rt>),
    Inspect(Inspect<'rt>),
}

/// Decide on the request head (the route, the hints, whether it is inspected,
/// its declared size and its encoding).
pub(crate) fn gate<'rt>(rt: &'rt Runtime, head: &Head<'_>) -> Gate<'rt> {
    let refuse = |dest, refusal| Gate::Refuse { dest, refusal };
    let parts = head.parts;
    let target = match head.via {
        Via::Intercepted { host, port } => Target {
            host: host.clone(),
            port: *port,
        },
        Via::Plain => match route::plain_target(parts) {
            Ok(t) => t,
            Err(e) => return refuse("unknown", Refusal::bad_request(e)),
        },
    };
    let route = rt
        .registry
        .route(&target.host, &parts.method, parts.uri.path());
    let dest = route.map_or("unknown", Route::name);
    let Some(uri) = forward::upstream_uri(&target, parts.uri.path_and_query()) else {
        return refuse(
            dest,
            Refusal::bad_request("request target is not a valid URI"),
        );
    };
    let Some(route) = route else {
        return match rt.config.unknown_destinations {
            UnknownDestinations::Tunnel => Gate::Pass(Pass {
                dest,
                uri,
                shape: Shape::Plain,
                reason: "unknown_destination_tunnel",
            }),
            UnknownDestinations::Deny => refuse(dest, Refusal::unknown_destination()),
        };
    };
    // From here on, refusals are worded in the destination's shape.
    let refuse = |dest, r: Refusal| refuse(dest, r.in_shape(route.refusal_shape));
    let hints = match RequestHints::from_headers(&parts.headers, route) {
        Ok(h) => h,
        Err(e) => return refuse(dest, Refusal::bad_request(e)),
    };
    let query = parts.uri.query().filter(|q| !q.is_empty());
    if route.mode == Mode::Passthrough || !route.adapter.inspects(&parts.method, parts.uri.path()) {
        return match uninspected(route, head, query.is_some()) {
            None => Gate::Pass(Pass {
                dest,
                uri,
                shape: route.refusal_shape,
                reason: "not_inspected",
            }),
            Some(r) => refuse(dest, r),
        };
    }
    if let Some(r) = query.and_then(|q| query_refusal(route, parts, q)) {
        return refuse(dest, r);
    }
    let limit = rt.config.max_body_bytes;
    if declared_length(&parts.headers).is_some_and(|n| n > limit) {
        return refuse(dest, Refusal::too_large(limit));
    }
    let encoding = match request_encoding(&parts.headers) {
        Ok(e) => e,
        Err(e) => return refuse(dest, Refusal::body(e, limit)),
    };
    Gate::Inspect(Inspect {
        route,
        target,
        uri,
        hints,
        encoding,
        limit,
        content_type: media_type(&parts.headers),
    })
}

/// A query parameter of an inspected endpoint that its adapter does not read
/// (unless the query is the endpoint's data, as GA4 `/g/collect`'s hits are).
fn query_refusal(route: &Route, parts: &Parts, query: &str) -> Option<Refusal> {
    let adapter = &route.adapter;
    if adapter.reads_query(&parts.method, parts.uri.path()) {
        return None;
    }
    unread_query_param(query, adapter.query_params())
}

/// The request's one Content-Encoding.
fn request_encoding(h: &HeaderMap) -> Result<Encoding, BodyReadError> {
    Encoding::parse(
        h.get(header::CONTENT_ENCODING)
            .map(|v| v.to_str().unwrap_or("(not text)")),
    )
}

/// A request to an endpoint no adapter inspects: it passes unread only in
/// `mode: passthrough` or when it carries neither a body nor a query (a query
/// carries data as a body does: Graph reads `?data=` and `?method=post`).
fn uninspected(route: &Route, head: &Head<'_>, has_query: bool) -> Option<Refusal> {
    if route.mode == Mode::Passthrough || (!head.has_body && !has_query) {
        return None;
    }
    let grpc = media_type(&head.parts.headers).is_some_and(|t| t.starts_with("application/grpc"));
    Some(match grpc {
        true => Refusal::grpc_not_inspected(),
        false => Refusal::uninspected_endpoint(),
    })
}

/// The refusal for a query parameter of an inspected endpoint that the adapter
/// does not read (the vendor would: `?data=` beside a body, `To=` on Twilio).
/// The parameter is named only when its name cannot be someone's data.
fn unread_query_param(query: &str, read: &[&str]) -> Option<Refusal> {
    let (name, _) = form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| !read.iter().any(|r| r.eq_ignore_ascii_case(k)))?;
    let plain = name.len() <= 40
        && name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '[' | ']'))
        && name.chars().filter(char::is_ascii_digit).count() < 4;
    let shown = if plain {
        format!("query parameter `{name}`")
    } else {
        "a query parameter".to_string()
    };
    let reads = match read {
        [] => "none".to_string(),
        r => r.join(", "),
    };
    Some(Refusal::unreadable(format!(
        "{shown} is not read by consentgate for this endpoint, so it is not sent: send the \
         data in the body (query parameters read here: {reads})"
    )))
}

/// The declared Content-Length, when there is one that parses.
pub(crate) fn declared_length(h: &HeaderMap) -> Option<u64> {
    h.get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.trim().parse().ok())
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

/// What goes upstream as the body.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Outgoing {
    /// The bytes as they arrived.
    Original,
    /// A re-encoded body (Content-Length is set from it).
    Rewritten(Vec<u8>),
}

/// A body that goes upstream.
pub(crate) struct Forward {
    pub body: Outgoing,
    pub decision: RequestDecision,
    /// The audit reason of the request-level record (`enforced`, `shadow`).
    pub reason: &'static str,
    /// The upstream URI, when the adapter rewrote the query (GA4 `/g/collect`).
    pub uri: Option<Uri>,
}

/// What the body decides.
pub(crate) enum Plan {
    Refuse(Refusal),
    Forward(Forward),
}

/// The plan and what enforcement concluded on the way (absent when the body
/// was refused before any event was decided).
pub(crate) struct Planned {
    pub plan: Plan,
    pub enforcement: Option<Enforcement>,
}

/// Decode, enforce and re-encode an inspected body, then the guard's last
/// pass over everything that leaves. With `trace`, each decision keeps the
/// identifiers and policy steps it was reached by (for `explain`).
pub(crate) fn plan(
    rt: &Runtime,
    consent: &ConsentStore,
    inspect: &Inspect<'_>,
    parts: &Parts,
    raw: &[u8],
    trace: bool,
) -> Planned {
    let shape = inspect.route.refusal_shape;
    let refused = |r: Refusal, enforcement| Planned {
        plan: Plan::Refuse(r.in_shape(shape)),
        enforcement,
    };
    let plain = match body::decode(inspect.encoding, raw, inspect.limit) {
        Ok(p) => p,
        Err(e) => return refused(Refusal::body(e, inspect.limit), None),
    };
    let view = RequestView {
        method: &parts.method,
        host: &inspect.target.host,
        path: parts.uri.path(),
        query: parts.uri.query(),
        content_type: inspect.content_type.as_deref(),
    };
    let (mut e, mut guard) = match enforce(rt, consent, inspect, &view, &plain, trace) {
        Ok(x) => x,
        Err(BodyError::Unreadable(d)) => return refused(Refusal::unreadable(d), None),
        Err(BodyError::Forbidden { code, detail }) => {
            return refused(Refusal::forbidden(code, detail), None)
        }
    };
    let route = inspect.route;
    // When every event is dropped nothing leaves: no last pass is needed.
    let query = e.enforced.query.take();
    let foreign = !e.all_dropped() && {
        let out_plain = e.enforced.body.as_deref().unwrap_or(&plain);
        let out_query = query.as_deref().or(parts.uri.query());
        last_pass(&mut guard, inspect, parts, out_plain, out_query)
    };
    e.interventions = guard.interventions;
    if route.mode == Mode::Shadow {
        let shadow = Forward {
            body: reencoded(inspect, &plain, raw),
            decision: RequestDecision::Allowed,
            reason: "shadow",
            uri: None,
        };
        return Planned {
            plan: Plan::Forward(shadow),
            enforcement: Some(e),
        };
    }
    if e.all_dropped() {
        let r = Refusal::blocked_by_policy(route, e.drop_reasons());
        return refused(r, Some(e));
    }
    if foreign {
        return refused(Refusal::foreign_identifier(), Some(e));
    }
    match forwarded(inspect, &mut e, query, &plain, raw) {
        Ok(f) => Planned {
            plan: Plan::Forward(f),
            enforcement: Some(e),
        },
        Err(r) => refused(r, Some(e)),
    }
}

/// What leaves once everything is decided: the rewritten body (moved, not
/// copied) or the original re-encoded, and the rewritten query if any.
fn forwarded(
    inspect: &Inspect<'_>,
    e: &mut Enforcement,
    query: Option<String>,
    plain: &[u8],
    raw: &[u8],
) -> Result<Forward, Refusal> {
    let decision = match e.changed() || query.is_some() {
        true => RequestDecision::Modified,
        false => RequestDecision::Allowed,
    };
    let body = match e.enforced.body.take() {
        Some(new_plain) if inspect.encoding == Encoding::Identity => Outgoing::Rewritten(new_plain),
        Some(new_plain) => Outgoing::Rewritten(
            body::encode(inspect.encoding, &new_plain).map_err(Refusal::encode_failed)?,
        ),
        None => reencoded(inspect, plain, raw),
    };
    let uri = match query {
        None => None,
        Some(q) => Some(with_query(&inspect.uri, &q).ok_or_else(|| {
            Refusal::encode_failed("the rewritten query string is not a valid URI".into())
        })?),
    };
    Ok(Forward {
        body,
        decision,
        reason: "enforced",
        uri,
    })
}

/// `uri` with its query string replaced (removed when `q` is empty).
fn with_query(uri: &Uri, q: &str) -> Option<Uri> {
    let pq = match q {
        "" => uri.path().to_string(),
        q => format!("{}?{q}", uri.path()),
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(pq.parse().ok()?);
    Uri::from_parts(parts).ok()
}

/// The body as it leaves when its content is unchanged: the original bytes when
/// they were not encoded; otherwise the decoded content encoded again, so no
/// gzip header field, trailing member or zstd skippable frame passes unread.
fn reencoded(inspect: &Inspect<'_>, plain: &[u8], raw: &[u8]) -> Outgoing {
    if inspect.encoding == Encoding::Identity {
        return Outgoing::Original;
    }
    match body::encode(inspect.encoding, plain) {
        Ok(b) if b == raw => Outgoing::Original,
        Ok(b) => Outgoing::Rewritten(b),
        // Encoding what was just decoded does not fail; if it did, nothing unread leaves.
        Err(_) => Outgoing::Rewritten(plain.to_vec()),
    }
}

/// The guard's last pass: every string the vendor would receive outside the
/// events already guarded (the whole body again, the query, the header values
/// but authentication). True: someone this request may not send for is named.
fn last_pass(
    g: &mut Guard<'_>,
    inspect: &Inspect<'_>,
    parts: &Parts,
    body: &[u8],
    query: Option<&str>,
) -> bool {
    let mut foreign = g.outside_body(body, inspect.content_type.as_deref());
    if let Some(q) = query {
        let pairs: Vec<Cow<'_, str>> = form_urlencoded::parse(q.as_bytes())
            .flat_map(|(k, v)| [k, v])
            .collect();
        foreign |= g.outside("query", &pairs);
    }
    for (name, value) in &parts.headers {
        if guard::SKIPPED_HEADERS.contains(&name.as_str()) {
            continue;
        }
        let v = String::from_utf8_lossy(value.as_bytes());
        foreign |= g.outside(&format!("header:{name}"), &[v]);
    }
    foreign
}

/// One event's decision as the plan keeps it: what the audit, the metrics and
/// Learn need, in a few words (a batch of 70,000 events keeps one each). The
/// patients are indexes into [`Enforcement::patients`]; the full [`Decision`]
/// (identifiers, records, policy steps) is kept only when tracing.
pub(crate) struct Decided {
    pub gpc_trigger: bool,
    /// How many consent records the event matched.
    pub matches: u32,
    /// The first matched record's patient.
    pub patient: Option<u32>,
    /// The other matched records' patients (rare: identifiers of two people).
    pub more: Option<Box<[u32]>>,
    /// The whole decision, for `explain`.
    pub trace: Option<Box<Decision>>,
}

impl Decided {
    /// Every matched patient, first match first.
    pub(crate) fn patients(&self) -> impl Iterator<Item = u32> + '_ {
        self.patient
            .into_iter()
            .chain(self.more.iter().flat_map(|m| m.iter().copied()))
    }
}

/// The distinct patients of one body's events, each once.
#[derive(Default)]
pub(crate) struct Patients {
    ids: Vec<Box<str>>,
    index: std::collections::HashMap<Box<str>, u32>,
}

impl Patients {
    fn intern(&mut self, id: Box<str>) -> u32 {
        if let Some(i) = self.index.get(&id) {
            return *i;
        }
        let i = self.ids.len() as u32;
        self.ids.push(id.clone());
        self.index.insert(id, i);
        i
    }
    pub(crate) fn get(&self, i: u32) -> Option<&str> {
        self.ids.get(i as usize).map(|b| &**b)
    }
}

/// What enforcement concluded for one body.
pub(crate) struct Enforcement {
    pub enforced: Enforced,
    pub decisions: Vec<Decided>,
    pub patients: Patients,
    pub context: Context,
    /// What the egress guard did, in order.
    pub interventions: Vec<Intervention>,
    /// The destination was in `mode: shadow`: the events' outcomes are what
    /// would have happened.
    pub shadow: bool,
}

impl Enforcement {
    pub(crate) fn all_dropped(&self) -> bool {
        !self.enforced.events.is_empty() && self.enforced.events.iter().all(|e| e.verdict.is_drop())
    }
    pub(crate) fn changed(&self) -> bool {
        self.enforced.body.is_some() || self.enforced.events.iter().any(|e| e.changed())
    }
    /// Distinct reasons of dropped events, for the 451 answer.
    pub(crate) fn drop_reasons(&self) -> Vec<&'static str> {
        let mut v: Vec<&'static str> = Vec::new();
        for (e, d) in self.events() {
            if let EventVerdict::Drop(_) = e.verdict {
                let r = e.verdict.reason(d.gpc_trigger).as_str();
                if !v.contains(&r) {
                    v.push(r);
                }
            }
        }
        v
    }
    /// Each event with the decision behind it, in payload order.
    pub(crate) fn events(&self) -> impl Iterator<Item = (&EventApplied, &Decided)> {
        self.enforced.events.iter().zip(&self.decisions)
    }
    /// The event's decision as counted and audited (`would_*` in shadow mode).
    pub(crate) fn event_decision(&self, e: &EventApplied) -> &'static str {
        match (e.verdict.is_drop(), e.changed(), self.shadow) {
            (true, _, false) => "dropped",
            (true, _, true) => "would_block",
            (false, true, false) => "modified",
            (false, true, true) => "would_modify",
            (false, false, _) => "allowed",
        }
    }
    /// One audit entry per event or recipient: decision, reason (and so the
    /// rule), what was stripped or set, and the patient's pseudonym (never the
    /// raw id). They ride on the request's `decision` record.
    pub(crate) fn audit_events(&self, pseudonyms: &PseudonymKey) -> Vec<EventEntry> {
        self.events()
            .map(|(e, d)| {
                let (stripped, flags) = (e.fields_stripped(), e.flags_set());
                let changes = (!stripped.is_empty() || !flags.is_empty())
                    .then(|| Box::new((stripped.to_vec(), flags.to_vec())));
                EventEntry {
                    patient: d
                        .patient
                        .and_then(|i| self.patients.get(i))
                        .map(|p| pseudonyms.pseudonym_bytes(p)),
                    decision: self.event_decision(e),
                    reason: e.verdict.reason(d.gpc_trigger),
                    matches: d.matches,
                    changes,
                }
            })
            .collect()
    }
}

/// Run the adapter over a decoded body with the policy, one decision per
/// event, and the guard on each kept event.
fn enforce<'a>(
    rt: &'a Runtime,
    consent: &'a ConsentStore,
    inspect: &'a Inspect<'_>,
    view: &RequestView<'_>,
    body: &[u8],
    trace: bool,
) -> Result<(Enforcement, Guard<'a>), BodyError> {
    let route = inspect.route;
    let context = Context {
        category: inspect.hints.category,
        channel: route.adapter.channel(),
        kind: route.adapter.kind(),
        header_gpc: inspect.hints.header_gpc,
        stale: consent.is_stale(rt.config.consent.max_staleness),
    };
    let mut judging = Judging {
        rt,
        consent,
        context,
        patient: inspect.hints.patient.as_deref(),
        trace,
        decisions: Vec::new(),
        patients: Patients::default(),
        guard: Guard::new(consent, context.kind.is_ads_or_analytics()),
    };
    let enforced = route.adapter.enforce(view, body, &mut judging)?;
    let e = Enforcement {
        enforced,
        decisions: judging.decisions,
        patients: judging.patients,
        context,
        shadow: route.mode == Mode::Shadow,
        interventions: Vec::new(),
    };
    Ok((e, judging.guard))
}

/// The policy and the guard, as the adapters ask them.
struct Judging<'a> {
    rt: &'a Runtime,
    consent: &'a ConsentStore,
    context: Context,
    /// The patient the app named (`X-Patient-Id`), for events that name nobody.
    patient: Option<&'a str>,
    trace: bool,
    decisions: Vec<Decided>,
    patients: Patients,
    guard: Guard<'a>,
}

impl Judging<'_> {
    /// The verdict in each of `contexts` (none: the request's), the first drop
    /// winning; recorded as the event's decision when `record`.
    fn decide_in(&mut self, ids: &Identifiers, contexts: &[Context], record: bool) -> EventVerdict {
        let from_header;
        let ids = match (self.patient, ids.is_empty()) {
            (Some(p), true) => {
                let mut h = Identifiers::new();
                h.add_patient(p);
                from_header = h;
                &from_header
            }
            _ => ids,
        };
        let mut records = Some(self.consent.lookup(ids));
        let own = [self.context];
        let contexts = if contexts.is_empty() {
            &own[..]
        } else {
            contexts
        };
        let mut chosen: Option<Decision> = None;
        for (i, ctx) in contexts.iter().enumerate() {
            let recs = match i + 1 == contexts.len() {
                true => records.take().unwrap_or_default(),
                false => records.clone().unwrap_or_default(),
            };
            let d = match self.trace && record {
                true => self.rt.policy.decide_traced(ctx, recs),
                false => self.rt.policy.decide(ctx, recs),
            };
            let drop = d.verdict.is_drop();
            if drop || chosen.is_none() {
                chosen = Some(d);
            }
            if drop {
                break;
            }
        }
        let Some(mut d) = chosen else {
            return EventVerdict::Drop(crate::decide::Reason::UnknownPatient);
        };
        if !record {
            return d.verdict;
        }
        if self.trace {
            d.identifiers = ids.keys.clone();
        }
        // Whom the request may send for: kept events whose identity leaves.
        if let EventVerdict::Keep(k) = d.verdict {
            if !k.strip_identity {
                for r in &d.records {
                    self.guard.allow(&r.patient_id);
                }
            }
        }
        let v = d.verdict;
        let mut ids = Vec::with_capacity(d.records.len());
        let (gpc_trigger, matches) = (d.gpc_trigger, d.records.len() as u32);
        let trace = match self.trace {
            true => {
                for r in &d.records {
                    ids.push(self.patients.intern(r.patient_id.clone()));
                }
                Some(Box::new(d))
            }
            false => {
                for r in d.records {
                    ids.push(self.patients.intern(r.patient_id));
                }
                None
            }
        };
        let decided = Decided {
            gpc_trigger,
            matches,
            patient: ids.first().copied(),
            more: (ids.len() > 1).then(|| ids[1..].into()),
            trace,
        };
        self.decisions.push(decided);
        v
    }
}

impl Judge for Judging<'_> {
    fn decide(&mut self, ids: &Identifiers) -> EventVerdict {
        self.decide_in(ids, &[], true)
    }
    fn decide_on(
        &mut self,
        ids: &Identifiers,
        channels: &[Option<Channel>],
        record: bool,
    ) -> EventVerdict {
        let contexts: Vec<Context> = channels
            .iter()
            .map(|ch| Context {
                category: match ch {
                    Some(c) => self.context.category.on_channel(*c),
                    None => self.context.category,
                },
                channel: *ch,
                ..self.context
            })
            .collect();
        self.decide_in(ids, &contexts, record)
    }
    fn guard(
        &mut self,
        index: usize,
        ev: &mut serde_json::Value,
    ) -> Result<Vec<String>, GuardReason> {
        self.guard.event(index, ev)
    }
    fn guard_text(&mut self, index: usize, json: &[u8]) -> Scan {
        self.guard.event_text(index, json)
    }
}

/// What a CONNECT decides.
pub(crate) enum ConnectGate {
    Refuse(Refusal),
    /// An unknown host in `unknown_destinations: tunnel`: bytes pass blind.
    Tunnel(Target),
    /// A known destination: terminate TLS and run every request through the pipeline.
    Intercept(Target),
}

/// Decide on a CONNECT by its authority.
pub(crate) fn gate_connect(rt: &Runtime, authority: Option<&str>) -> ConnectGate {
    let Some((host, port)) = authority.and_then(route::split_host_port) else {
        return ConnectGate::Refuse(Refusal::bad_request("CONNECT needs host:port"));
    };
    let target = Target {
        host,
        port: port.unwrap_or(443),
    };
    if rt.registry.knows_host(&target.host) {
        ConnectGate::Intercept(target)
    } else if rt.config.unknown_destinations == UnknownDestinations::Tunnel {
        ConnectGate::Tunnel(target)
    } else {
        ConnectGate::Refuse(Refusal::unknown_destination())
    }
}
