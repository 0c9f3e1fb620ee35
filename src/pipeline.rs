//! The request life cycle every listener hands its requests to, as phases:
//! gate → read → plan → audit → send → finish. What to do is decided in
//! [`crate::enforce`] (pure, shared with `explain`); this module only sequences
//! the I/O around those decisions, and every way a request ends, CONNECTs
//! included, goes through one [`Exchange::finish`] that audits, counts and logs it.

use crate::app::{App, Runtime};
use crate::audit::{AuditRecord, AuditUnavailable, EventEntry};
use crate::body::{self, ClientBody};
use crate::enforce::{self, Enforcement, Gate, Head, Inspect, Outgoing, Plan, Planned, Refusal};
use crate::forward::{self, BoxError, ProxyBody, UpstreamError};
use crate::refusal::Shape;
use crate::response;
use crate::route::Via;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::request::Parts;
use http::{Request, Response, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::Instrument;

pub(crate) use crate::enforce::RequestDecision;

/// The pipeline entry point for every proxied request.
pub(crate) async fn handle(
    app: Arc<App>,
    req: Request<ClientBody>,
    via: Via,
) -> Response<ProxyBody> {
    let rt = app.runtime.load_full();
    let mut x = Exchange::new(&app, req.headers());
    let has_body = has_body(&req);
    let (parts, body) = req.into_parts();
    let head = Head {
        parts: &parts,
        via: &via,
        has_body,
    };
    // Each phase is a child span of the request's (exported with OTLP).
    let gate = tracing::debug_span!("gate").in_scope(|| enforce::gate(&rt, &head));
    let end = match gate {
        Gate::Refuse { dest, refusal } => End::Refused { dest, refusal },
        Gate::Pass(p) => {
            let body = body.map_err(BoxError::from).boxed_unsync();
            let egress = Egress {
                dest: p.dest,
                shape: p.shape,
                decision: RequestDecision::Allowed,
                reason: p.reason,
            };
            x.send(&rt, egress, parts, p.uri, body).await
        }
        Gate::Inspect(i) => x.inspect(&rt, &i, parts, body).await,
    };
    x.finish(end)
}

/// Refuse a request before it is routed (e.g. a CONNECT inside a tunnel).
pub(crate) fn refuse(app: &App, headers: &HeaderMap, refusal: Refusal) -> Response<ProxyBody> {
    Exchange::new(app, headers).finish(End::Refused {
        dest: "unknown",
        refusal,
    })
}

fn has_body(req: &Request<ClientBody>) -> bool {
    use hyper::body::Body;
    match enforce::declared_length(req.headers()) {
        Some(n) => n != 0,
        None => !req.body().is_end_stream(),
    }
}

/// How one request ended.
pub(crate) enum End<'rt> {
    /// Nothing (more) went upstream.
    Refused { dest: &'rt str, refusal: Refusal },
    /// The upstream answered.
    Answered {
        egress: Egress<'rt>,
        resp: Response<Incoming>,
    },
    /// The upstream failed after the request was decided and audited.
    Failed {
        egress: Egress<'rt>,
        error: UpstreamError,
    },
    /// A CONNECT to an unknown host passed blind (`unknown_destinations: tunnel`).
    Tunneled,
    /// A CONNECT to a known destination: its requests come through `handle`.
    Intercepted,
}

/// What leaves, and how it is recorded.
pub(crate) struct Egress<'rt> {
    pub dest: &'rt str,
    /// How a refusal after the decision (audit, upstream) is worded.
    pub shape: Shape,
    pub decision: RequestDecision,
    /// The audit reason of the request-level record.
    pub reason: &'static str,
}

/// One request's identity and bookkeeping, from its first byte to `finish`.
pub(crate) struct Exchange<'a> {
    app: &'a App,
    pub(crate) request_id: String,
    /// The caller's W3C trace id (`traceparent`), on every record of the request.
    trace_id: Option<String>,
    started: Instant,
    /// Time spent waiting on the upstream (not counted as the proxy's own).
    upstream: Duration,
    /// The category and per-event entries of an inspected request, written
    /// with its `decision` record.
    events: Option<(String, Vec<EventEntry>)>,
    /// The patients the request named (kept events), for the Learn step.
    named: Vec<Arc<str>>,
}

impl<'a> Exchange<'a> {
    pub(crate) fn new(app: &'a App, headers: &HeaderMap) -> Exchange<'a> {
        Exchange {
            app,
            request_id: response::new_request_id(),
            trace_id: crate::audit::trace_id(headers),
            started: Instant::now(),
            upstream: Duration::ZERO,
            events: None,
            named: Vec::new(),
        }
    }

    /// Read the body (bounded), plan, and send what the plan says.
    async fn inspect<'rt>(
        &mut self,
        rt: &'rt Runtime,
        i: &Inspect<'rt>,
        mut parts: Parts,
        body: ClientBody,
    ) -> End<'rt> {
        let dest = i.route.name();
        let read = body::read_limited(body, i.limit).instrument(tracing::debug_span!("read"));
        let raw = match read.await {
            Ok(b) => b,
            Err(e) => {
                let refusal = Refusal::body(e, i.limit);
                return End::Refused { dest, refusal };
            }
        };
        let planned = tracing::debug_span!("plan")
            .in_scope(|| enforce::plan(rt, &self.app.consent, i, &parts, &raw, false));
        let Planned { plan, enforcement } = planned;
        let (decision, reason, uri, out) = match plan {
            Plan::Refuse(refusal) => {
                self.note(dest, enforcement);
                return End::Refused { dest, refusal };
            }
            Plan::Forward(f) => {
                let out = match f.body {
                    Outgoing::Original => raw,
                    // The body as it came is not held while the rewritten one
                    // is audited and sent.
                    Outgoing::Rewritten(b) => {
                        drop(raw);
                        Bytes::from(b)
                    }
                };
                (f.decision, f.reason, f.uri, out)
            }
        };
        self.note(dest, enforcement);
        parts
            .headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from(out.len()));
        let egress = Egress {
            dest,
            shape: i.route.refusal_shape,
            decision,
            reason,
        };
        let uri = uri.unwrap_or_else(|| i.uri.clone());
        self.send(rt, egress, parts, uri, response::sliced_body(out))
            .await
    }

    /// Count the events and the guard's interventions, and keep the events'
    /// audit entries for the request's record.
    fn note(&mut self, dest: &str, e: Option<Enforcement>) {
        let Some(e) = e else { return };
        let m = &self.app.metrics;
        for (ev, d) in e.events() {
            let reason = ev.verdict.reason(d.gpc_trigger).as_str();
            m.events_total
                .with_label_values(&[dest, e.event_decision(ev), reason])
                .inc();
        }
        for i in &e.interventions {
            m.guard_interventions_total
                .with_label_values(&[dest, i.reason.as_str()])
                .inc();
        }
        let category = e.context.category.as_str().to_string();
        self.events = Some((category, e.audit_events(&self.app.pseudonyms)));
        self.named = crate::learn::named(&e);
    }

    /// Record the decision (before anything leaves: no audit, no egress), then
    /// send upstream.
    async fn send<'rt>(
        &mut self,
        rt: &Runtime,
        egress: Egress<'rt>,
        parts: Parts,
        uri: Uri,
        body: ProxyBody,
    ) -> End<'rt> {
        let decision = egress.decision.as_str();
        let audited = tracing::debug_span!("audit")
            .in_scope(|| self.audit_egress(egress.dest, decision, egress.reason));
        if let Err(refusal) = audited {
            let dest = egress.dest;
            let refusal = refusal.in_shape(egress.shape);
            return End::Refused { dest, refusal };
        }
        let sent = Instant::now();
        let result = rt
            .upstream
            .send(forward::outgoing(parts, uri, body))
            .instrument(tracing::debug_span!("upstream", destination = egress.dest))
            .await;
        self.upstream = sent.elapsed();
        self.app
            .metrics
            .upstream_duration
            .with_label_values(&[egress.dest])
            .observe(self.upstream.as_secs_f64());
        match result {
            Ok(resp) => End::Answered { egress, resp },
            Err(error) => End::Failed { egress, error },
        }
    }

    /// Write the request's records; an unavailable audit trail refuses the egress.
    pub(crate) fn audit_egress(
        &mut self,
        dest: &str,
        decision: &str,
        reason: &str,
    ) -> Result<(), Refusal> {
        let mut record = AuditRecord::decision(&self.request_id, dest, decision, reason);
        if let Some((category, events)) = self.events.take() {
            record.category = Some(category);
            record.events = Some(events);
        }
        self.submit(vec![record])
            .map_err(|e| Refusal::audit_unavailable(e.as_str()))
    }

    /// Submit records, each carrying the request's trace id.
    fn submit(&self, mut records: Vec<AuditRecord>) -> Result<(), AuditUnavailable> {
        for r in &mut records {
            r.trace_id.clone_from(&self.trace_id);
        }
        self.app.audit.submit(records)
    }

    /// The upstream's answer or failure, so the trail never leaves a 502 standing
    /// as a disclosure that happened (SPEC §10).
    fn audit_outcome(&self, dest: &str, outcome: Result<u16, &str>) {
        let id = &self.request_id;
        let rec = match outcome {
            Ok(status) => AuditRecord::outcome_status(id, dest, status),
            Err(kind) => AuditRecord::outcome_error(id, dest, kind),
        };
        // The request already left: an unavailable audit can only be counted (the writer does).
        let _ = self.submit(vec![rec]);
    }

    /// The one exit: audit what is not yet audited, count, log, answer.
    pub(crate) fn finish(mut self, end: End<'_>) -> Response<ProxyBody> {
        // The refusal or upstream error code the app is answered with ("" when the
        // upstream answered): the `error` of `consentgate_responses_total`.
        let mut error_code = "";
        let (dest, decision, resp) = match end {
            End::Refused { dest, refusal } => {
                // Already refused: an unavailable audit changes nothing (the writer counts it).
                let _ = self.audit_egress(dest, "blocked", refusal.code);
                error_code = refusal.code;
                (
                    dest,
                    "blocked",
                    response::refusal(&refusal, &self.request_id),
                )
            }
            End::Answered { egress, resp } => {
                self.audit_outcome(egress.dest, Ok(resp.status().as_u16()));
                let (mut parts, body) = resp.into_parts();
                forward::remove_hop_by_hop_and_own(&mut parts.headers);
                response::stamp(&mut parts.headers, egress.decision, &self.request_id);
                // Learn: a vendor answer meaning "opted out" (SPEC §13; crate::learn).
                let learner = self.app.learner.get();
                let body = crate::learn::watch(
                    learner,
                    egress.dest,
                    &self.named,
                    &self.request_id,
                    &parts,
                    body,
                );
                let resp = Response::from_parts(parts, body);
                (egress.dest, egress.decision.as_str(), resp)
            }
            End::Failed { egress, error } => {
                self.audit_outcome(egress.dest, Err(error.kind.as_str()));
                let m = &self.app.metrics;
                m.upstream_errors_total
                    .with_label_values(&[egress.dest, error.kind.as_str()])
                    .inc();
                if error.kind == forward::UpstreamErrorKind::Tls {
                    m.handshake_failed("upstream", crate::tls::upstream_reason(&error.detail));
                }
                tracing::warn!(request_id = %self.request_id, destination = %egress.dest,
                    kind = error.kind.as_str(), detail = %error.detail, "upstream failed");
                let refusal = Refusal::upstream(error.kind, &error.detail).in_shape(egress.shape);
                error_code = refusal.code;
                let resp = response::refusal(&refusal, &self.request_id);
                (egress.dest, "blocked", resp)
            }
            End::Tunneled => {
                self.app.metrics.tunnels_total.inc();
                let resp = response::connect_established(&self.request_id);
                ("unknown", "tunneled", resp)
            }
            End::Intercepted => {
                tracing::debug!(request_id = %self.request_id, "CONNECT intercepted");
                return response::connect_established(&self.request_id);
            }
        };
        let m = &self.app.metrics;
        let status = resp.status().as_u16();
        m.requests_total.with_label_values(&[dest, decision]).inc();
        m.responses_total
            .with_label_values(&[dest, &status.to_string(), error_code])
            .inc();
        let total = self.started.elapsed();
        let inside = total.saturating_sub(self.upstream);
        m.request_duration
            .with_label_values(&[dest])
            .observe(inside.as_secs_f64());
        // The request's span carries peer, host and trace id into this line (and
        // into an exported trace); the request id is known only now.
        tracing::Span::current().record("request_id", self.request_id.as_str());
        tracing::info!(request_id = %self.request_id, destination = %dest,
            status, decision, error = error_code,
            duration_ms = total.as_micros() as f64 / 1000.0,
            upstream_ms = self.upstream.as_micros() as f64 / 1000.0,
            "request finished");
        resp
    }
}
