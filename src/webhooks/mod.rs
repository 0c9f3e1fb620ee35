//! Vendor opt-out webhooks (SPEC §13) on `listen.webhooks`: `POST
//! /v1/webhooks/{vendor}` (Mailchimp: `/v1/webhooks/mailchimp/{token}`).
//!
//! Every request: the listener's limits (the head gate, body timeout and the
//! in-flight body budget, as on every listener), a body of at most
//! `webhooks.max_body_bytes`, then the vendor's own verification on the raw
//! bytes. A missing or bad signature (or a stale signed timestamp) is 401 and
//! changes nothing. A verified request is split into signals; each signal:
//! 1. an event id applied before (the replay cache, see `replay.rs`) changes
//!    nothing (`duplicate`);
//! 2. its kind is mapped to a consent change: `scopes` (group, audience,
//!    Messaging Service) over `mapping` over the vendor's default (the most
//!    restrictive plausible reading, in each vendor file and docs/LOOP.md); no
//!    change → `ignored`;
//! 3. the person is found the way the proxy finds patients (emails, phones and
//!    external ids through the consent index); nobody → acknowledged, counted as
//!    `unknown_person`, nothing stored;
//! 4. each matching patient's record is changed like an admin write
//!    ([`crate::optout`], `actor: vendor:<name>`), the address the vendor named
//!    going to the sync outbox only.
//!
//! The answer is 200 once every change is durable (a storage failure is 503,
//! so the vendor retries). Logs, metrics and the audit never carry an address,
//! a phone or a vendor's person id; vendor labels and kinds are fixed sets.

mod hubspot;
mod klaviyo;
mod mailchimp;
mod mandrill;
pub(crate) mod replay;
mod sendgrid;
mod twilio;

use crate::app::App;
use crate::body::{self, BodyReadError, ClientBody};
use crate::config::{WebhookVendor, WebhookVendorCfg, WebhooksCfg};
use crate::consent::source::WriteError;
use crate::identify::Identifiers;
use crate::listen::{self, gate};
use crate::optout::{Applied, ConsentChange, OptOuts};
use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use replay::ReplayCache;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

pub(crate) const PATH_PREFIX: &str = "/v1/webhooks/";

/// A request as the verifiers see it.
pub(super) struct Inbound<'a> {
    pub(crate) method: &'a Method,
    /// The URL the vendor called: `webhooks.public_url`, the path and the query.
    pub(crate) url: &'a str,
    /// The path segment after the vendor (Mailchimp's token).
    pub(crate) token: Option<&'a str>,
    pub(crate) headers: &'a HeaderMap,
    pub(crate) body: &'a [u8],
    /// Unix seconds.
    pub(crate) now: i64,
}

impl Inbound<'_> {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// A vendor's verification material.
pub(super) struct Secret {
    pub(crate) bytes: Vec<u8>,
    /// SendGrid: the verification key's point.
    pub(crate) ecdsa_point: Option<Vec<u8>>,
    pub(crate) max_age: Duration,
    pub(crate) prefix: Option<String>,
}

/// One vendor event.
#[derive(Clone, Debug, Default)]
pub(super) struct Signal {
    pub(crate) id: Option<String>,
    pub(crate) kind: String,
    pub(crate) scope: Option<String>,
    pub(crate) emails: Vec<String>,
    pub(crate) phones: Vec<String>,
    pub(crate) external_ids: Vec<String>,
}

pub(super) type Kinds = &'static [(&'static str, fn() -> ConsentChange)];
type Verify = fn(&Inbound<'_>, &Secret) -> Result<(), &'static str>;
type Parse = fn(&Inbound<'_>, &Secret) -> Result<Vec<Signal>, String>;

/// Vendors are data: their kinds with defaults, verifier and parser.
fn spec(v: WebhookVendor) -> (Kinds, Verify, Parse) {
    match v {
        WebhookVendor::Twilio => (twilio::KINDS, twilio::verify, twilio::parse),
        WebhookVendor::Sendgrid => (sendgrid::KINDS, sendgrid::verify, sendgrid::parse),
        WebhookVendor::Mailchimp => (mailchimp::KINDS, mailchimp::verify, mailchimp::parse),
        WebhookVendor::Mandrill => (mandrill::KINDS, mandrill::verify, mandrill::parse),
        WebhookVendor::Klaviyo => (klaviyo::KINDS, klaviyo::verify, klaviyo::parse),
        WebhookVendor::Hubspot => (hubspot::KINDS, hubspot::verify, hubspot::parse),
    }
}

/// One configured vendor, ready.
struct Vendor {
    vendor: WebhookVendor,
    secret: Secret,
    /// Kind → change (defaults with `mapping` over them).
    mapping: HashMap<String, ConsentChange>,
    scopes: HashMap<String, ConsentChange>,
}

impl Vendor {
    fn build(c: &WebhookVendorCfg) -> Result<Vendor, String> {
        let name = c.vendor.as_str();
        let key = if c.vendor == WebhookVendor::Sendgrid {
            "public_key_file"
        } else {
            "secret_file"
        };
        let text = std::fs::read_to_string(&c.secret_file)
            .map_err(|e| format!("webhooks.{name}.{key} {}: {e}", c.secret_file.display()))?;
        let text = text.trim();
        if text.is_empty() {
            return Err(format!("webhooks.{name}.{key}: the file is empty"));
        }
        let ecdsa_point = match c.vendor {
            WebhookVendor::Sendgrid => Some(
                sendgrid::public_key(text).map_err(|e| format!("webhooks.{name}.{key}: {e}"))?,
            ),
            _ => None,
        };
        if c.vendor == WebhookVendor::Klaviyo && text.len() < 16 {
            return Err(format!(
                "webhooks.{name}.{key}: Klaviyo secrets are at least 16 characters"
            ));
        }
        let (kinds, _, _) = spec(c.vendor);
        let mut mapping: HashMap<String, ConsentChange> =
            kinds.iter().map(|(k, f)| ((*k).to_string(), f())).collect();
        for (kind, ch) in &c.mapping {
            if !mapping.contains_key(kind) {
                let known: Vec<&str> = kinds.iter().map(|(k, _)| *k).collect();
                return Err(format!(
                    "webhooks.{name}.mapping.{kind} (line {}): unknown signal (expected one of: {})",
                    ch.line,
                    known.join(", ")
                ));
            }
            mapping.insert(kind.clone(), ConsentChange::from(ch));
        }
        let scopes = c
            .scopes
            .iter()
            .map(|(s, ch)| (s.clone(), ConsentChange::from(ch)))
            .collect();
        Ok(Vendor {
            vendor: c.vendor,
            secret: Secret {
                bytes: text.as_bytes().to_vec(),
                ecdsa_point,
                max_age: c.max_age,
                prefix: c.external_id_prefix.clone(),
            },
            mapping,
            scopes,
        })
    }

    /// The change a signal means: its scope's, else its kind's. `None`: a kind
    /// this vendor file does not know (ignored).
    fn change(&self, kind: &str, scope: Option<&str>) -> Option<&ConsentChange> {
        let by_kind = self.mapping.get(kind)?;
        // Scopes refine signals that change something; they never turn a
        // neutral one (a resubscribe, a bounce) into a change.
        if by_kind.is_empty() {
            return Some(by_kind);
        }
        Some(scope.and_then(|s| self.scopes.get(s)).unwrap_or(by_kind))
    }

    /// The `kind` label: a kind this vendor knows, else `other` (vendors name
    /// events freely; labels stay a fixed set).
    fn label<'a>(&self, kind: &'a str) -> &'a str {
        if self.mapping.contains_key(kind) {
            kind
        } else {
            "other"
        }
    }
}

/// Check every vendor's secret and mapping (for `consentgate check` and start).
pub(crate) fn check(cfg: &WebhooksCfg) -> Vec<String> {
    let mut errs: Vec<String> = cfg
        .vendors
        .iter()
        .filter_map(|v| Vendor::build(v).err())
        .collect();
    if let Some(t) = &cfg.tls {
        if let Err(e) = tls_config(t) {
            errs.push(e);
        }
    }
    errs
}

/// `webhooks.tls` (the `admin.tls` loader, errors naming this key).
pub(crate) fn tls_config(t: &crate::config::AdminTls) -> Result<Arc<rustls::ServerConfig>, String> {
    crate::tls::admin::server_config(t).map_err(|e| e.replace("admin.tls", "webhooks.tls"))
}

/// The running receiver.
pub(crate) struct Webhooks {
    app: Arc<App>,
    vendors: Vec<Vendor>,
    replay: Arc<Mutex<ReplayCache>>,
    optouts: OptOuts,
    public_url: String,
    max_body: u64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Webhooks {
    /// Load every vendor and open the replay cache (locked: one process).
    pub(crate) fn new(
        app: Arc<App>,
        cfg: &WebhooksCfg,
        optouts: OptOuts,
    ) -> Result<Webhooks, String> {
        let vendors = cfg
            .vendors
            .iter()
            .map(Vendor::build)
            .collect::<Result<Vec<_>, _>>()?;
        let replay =
            ReplayCache::open(&cfg.state_dir, cfg.replay_retention, cfg.replay_max_entries)?;
        Ok(Webhooks {
            app,
            vendors,
            replay: Arc::new(Mutex::new(replay)),
            optouts,
            public_url: cfg.public_url.clone().unwrap_or_default(),
            max_body: cfg.max_body_bytes,
        })
    }
}

type Resp = Response<Full<Bytes>>;

fn json(status: StatusCode, v: serde_json::Value) -> Resp {
    crate::response::json(status, &v).map(Full::new)
}

fn refused(app: &crate::app::App, r: &crate::enforce::Refusal) -> Resp {
    let id = crate::response::new_request_id();
    listen::audit_refusal(app, "webhooks", r, &id);
    crate::response::plain(r, &id).map(Full::new)
}

/// What one request's signals came to.
#[derive(Default, Debug)]
struct Counts {
    applied: usize,
    unchanged: usize,
    duplicate: usize,
    unknown_person: usize,
    ignored: usize,
}

impl Webhooks {
    fn count_request(&self, vendor: &str, result: &str) {
        self.app
            .metrics
            .webhook_requests_total
            .with_label_values(&[vendor, result])
            .inc();
    }

    fn count_event(&self, vendor: &str, kind: &str, result: &str) {
        self.app
            .metrics
            .webhook_events_total
            .with_label_values(&[vendor, kind, result])
            .inc();
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Resp {
        let limits = self.app.runtime.load().config.limits.clone();
        if let Some(r) = crate::enforce::check_head(&req, limits.max_header_bytes) {
            return refused(&self.app, &r);
        }
        let path = req.uri().path().to_string();
        let not_found = || {
            json(
                StatusCode::NOT_FOUND,
                serde_json::json!({"error": "not_found"}),
            )
        };
        let Some(rest) = path.strip_prefix(PATH_PREFIX) else {
            return not_found();
        };
        let (name, token) = match rest.split_once('/') {
            Some((n, t)) => (n, Some(t)),
            None => (rest, None),
        };
        let Some(v) = WebhookVendor::parse(name)
            .and_then(|w| self.vendors.iter().position(|x| x.vendor == w))
        else {
            self.count_request("unknown", "not_found");
            return not_found();
        };
        let vendor = &self.vendors[v];
        let vname = vendor.vendor.as_str();
        if token.is_some() && vendor.vendor != WebhookVendor::Mailchimp {
            return not_found();
        }
        let method = req.method().clone();
        // Mandrill checks a new webhook with HEAD, Mailchimp with GET (token checked below).
        let probe = (method == Method::HEAD && vendor.vendor == WebhookVendor::Mandrill)
            || (method == Method::GET && vendor.vendor == WebhookVendor::Mailchimp);
        if method != Method::POST && !probe {
            let mut r = json(
                StatusCode::METHOD_NOT_ALLOWED,
                serde_json::json!({"error": "method_not_allowed", "detail": "use POST"}),
            );
            r.headers_mut()
                .insert(http::header::ALLOW, http::HeaderValue::from_static("POST"));
            return r;
        }
        let query = req
            .uri()
            .query()
            .map(|q| format!("?{q}"))
            .unwrap_or_default();
        let url = format!("{}{path}{query}", self.public_url);
        let (parts, incoming) = req.into_parts();
        let body = ClientBody::new(incoming, listen::body_limits(&self.app, &limits));
        let body = match body::read_limited(body, self.max_body).await {
            Ok(b) => b,
            Err(BodyReadError::Unreadable(_) | BodyReadError::UnknownEncoding(_)) => {
                self.count_request(vname, "bad_request");
                return json(
                    StatusCode::BAD_REQUEST,
                    serde_json::json!({"error": "unreadable_body"}),
                );
            }
            Err(e) => {
                self.count_request(vname, "bad_request");
                return refused(&self.app, &crate::enforce::Refusal::body(e, self.max_body));
            }
        };
        let inbound = Inbound {
            method: &parts.method,
            url: &url,
            token,
            headers: &parts.headers,
            body: &body,
            now: chrono::Utc::now().timestamp(),
        };
        let (_, verify, parse) = spec(vendor.vendor);
        if probe {
            if vendor.vendor == WebhookVendor::Mailchimp
                && verify(&inbound, &vendor.secret).is_err()
            {
                self.count_request(vname, "bad_signature");
                return json(
                    StatusCode::UNAUTHORIZED,
                    serde_json::json!({"error": "bad_signature"}),
                );
            }
            return json(StatusCode::OK, serde_json::json!({"ok": true}));
        }
        if let Err(why) = verify(&inbound, &vendor.secret) {
            self.count_request(vname, "bad_signature");
            tracing::warn!(
                vendor = vname,
                reason = why,
                "webhook refused: not verified"
            );
            return json(
                StatusCode::UNAUTHORIZED,
                serde_json::json!({"error": "bad_signature", "detail": why}),
            );
        }
        let signals = match parse(&inbound, &vendor.secret) {
            Ok(s) => s,
            Err(e) => {
                self.count_request(vname, "bad_request");
                // Parse errors name fields and positions, never values.
                return json(
                    StatusCode::BAD_REQUEST,
                    serde_json::json!({"error": "bad_request", "detail": e}),
                );
            }
        };
        let mut counts = Counts::default();
        let mut done: Vec<String> = Vec::new();
        let result = self.apply(v, signals, &mut counts, &mut done).await;
        // What was applied is remembered even if a later signal failed.
        let replay = self.replay.clone();
        let recorded = tokio::task::spawn_blocking(move || lock(&replay).record(&done))
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
        if let Err(e) = &recorded {
            tracing::error!(error = %e, "webhook replay cache not written");
        }
        if let Err(e) = result {
            self.count_request(vname, "error");
            tracing::error!(vendor = vname, error = %e, "webhook opt-out not written");
            return json(
                StatusCode::SERVICE_UNAVAILABLE,
                serde_json::json!({"error": "not_durable",
                    "detail": "the change could not be made durable; retry"}),
            );
        }
        self.count_request(vname, "ok");
        tracing::info!(
            vendor = vname,
            applied = counts.applied,
            unchanged = counts.unchanged,
            duplicate = counts.duplicate,
            unknown_person = counts.unknown_person,
            ignored = counts.ignored,
            "webhook processed"
        );
        if vendor.vendor == WebhookVendor::Twilio {
            // Twilio reads the answer as TwiML: an empty Response sends no reply SMS.
            let mut r = Response::new(Full::new(Bytes::from_static(
                b"<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response></Response>",
            )));
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/xml"),
            );
            return r;
        }
        json(
            StatusCode::OK,
            serde_json::json!({
                "applied": counts.applied,
                "unchanged": counts.unchanged,
                "duplicate": counts.duplicate,
                "unknown_person": counts.unknown_person,
                "ignored": counts.ignored,
            }),
        )
    }

    async fn apply(
        &self,
        v: usize,
        signals: Vec<Signal>,
        counts: &mut Counts,
        done: &mut Vec<String>,
    ) -> Result<(), WriteError> {
        let vendor = &self.vendors[v];
        let vname = vendor.vendor.as_str();
        for s in signals {
            let kind = vendor.label(&s.kind).to_string();
            let rkey = s.id.as_deref().map(|id| replay::key(vname, id));
            if let Some(k) = &rkey {
                if done.contains(k) || lock(&self.replay).seen(k) {
                    counts.duplicate += 1;
                    self.count_event(vname, &kind, "duplicate");
                    continue;
                }
            }
            let change = match vendor.change(&s.kind, s.scope.as_deref()) {
                Some(c) if !c.is_empty() => c.clone(),
                _ => {
                    counts.ignored += 1;
                    self.count_event(vname, &kind, "ignored");
                    done.extend(rkey);
                    continue;
                }
            };
            let mut ids = Identifiers::new();
            for e in &s.emails {
                ids.add_email(e);
            }
            for p in &s.phones {
                ids.add_phone(p);
            }
            for x in &s.external_ids {
                ids.add_external(x);
            }
            let hits = if ids.is_empty() {
                Vec::new()
            } else {
                self.app.consent.lookup(&ids)
            };
            if hits.is_empty() {
                counts.unknown_person += 1;
                self.count_event(vname, &kind, "unknown_person");
                done.extend(rkey);
                continue;
            }
            let emails: Vec<String> = s
                .emails
                .iter()
                .filter(|e| !e.trim().is_empty())
                .cloned()
                .collect();
            for h in hits {
                let r = self
                    .optouts
                    .apply(
                        vname,
                        &kind,
                        &h.patient_id,
                        &change,
                        &emails,
                        &s.phones,
                        None,
                    )
                    .await;
                match r {
                    Ok(Applied::Changed) => {
                        counts.applied += 1;
                        self.count_event(vname, &kind, "applied");
                    }
                    Ok(Applied::Unchanged) => {
                        counts.unchanged += 1;
                        self.count_event(vname, &kind, "unchanged");
                    }
                    // Deleted meanwhile: nobody to change.
                    Err(WriteError::NotFound) => {
                        counts.unknown_person += 1;
                        self.count_event(vname, &kind, "unknown_person");
                    }
                    Err(e) => return Err(e),
                }
            }
            done.extend(rkey);
        }
        Ok(())
    }
}

/// Serve `listen.webhooks` until `shutdown`. The listener is bound by the caller.
pub(crate) async fn serve(
    w: Arc<Webhooks>,
    listener: tokio::net::TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(listener = "webhooks", error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let w = w.clone();
        let acceptor = acceptor.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let limits = w.app.runtime.load().config.limits.clone();
            let audited = w.app.clone();
            let on_refused: gate::OnRefused =
                Arc::new(move |r: &crate::enforce::Refusal, id: &str| {
                    listen::audit_refusal(&audited, "webhooks", r, id);
                });
            let gate = listen::gate_cfg(&limits, Some(on_refused));
            let handler = move |req: Request<Incoming>| w.clone().handle(req);
            match acceptor {
                None => listen::serve_http(stream, &limits, gate, Some(shutdown), handler).await,
                Some(a) => {
                    // The handshake counts against the head's time, as on the admin listener.
                    match tokio::time::timeout(limits.header_read_timeout, a.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            listen::serve_http(tls, &limits, gate, Some(shutdown), handler).await
                        }
                        Ok(Err(e)) => {
                            tracing::info!(listener = "webhooks", error = %e, "TLS handshake failed")
                        }
                        Err(_) => tracing::info!(listener = "webhooks", "TLS handshake timed out"),
                    }
                }
            }
        });
    }
}

// ---- shared by the vendor files ----

/// Decoded form fields, in order.
pub(super) fn form_pairs(body: &[u8]) -> Vec<(String, String)> {
    form_urlencoded::parse(body)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// Constant-time equality (lengths may leak; signatures have fixed lengths).
pub(super) fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

pub(super) fn hmac_sha1_b64(key: &[u8], data: &[u8]) -> String {
    use base64::Engine as _;
    let k = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, key);
    base64::engine::general_purpose::STANDARD.encode(aws_lc_rs::hmac::sign(&k, data).as_ref())
}

pub(super) fn hmac_sha256(key: &[u8], data: &[u8]) -> Vec<u8> {
    let k = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, key);
    aws_lc_rs::hmac::sign(&k, data).as_ref().to_vec()
}

/// A signed timestamp within `max_age` of `now` (either way): Unix time in
/// `unit_ms` units (1: seconds, 1000: milliseconds; a value too large for
/// seconds is taken as milliseconds), or RFC 3339.
pub(super) fn fresh(
    ts: &str,
    now: i64,
    max_age: Duration,
    unit_ms: i64,
) -> Result<(), &'static str> {
    let secs = match ts.parse::<i64>() {
        Ok(n) if unit_ms == 1000 || n > 100_000_000_000 => n / 1000,
        Ok(n) => n,
        Err(_) => chrono::DateTime::parse_from_rfc3339(ts)
            .map_err(|_| "timestamp is not a time")?
            .timestamp(),
    };
    if (now - secs).unsigned_abs() > max_age.as_secs() {
        return Err("timestamp outside the allowed window (max_age)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_and_mapping() {
        let m = Duration::from_secs(300);
        assert!(fresh("1000", 1100, m, 1).is_ok());
        assert!(fresh("1000", 1400, m, 1).is_err());
        assert!(fresh("1000000", 1100, m, 1000).is_ok());
        assert!(fresh("1970-01-01T00:16:40Z", 1000, m, 1).is_ok());
        assert!(fresh("yesterday", 1000, m, 1).is_err());
        let v = Vendor {
            vendor: WebhookVendor::Sendgrid,
            secret: Secret {
                bytes: vec![],
                ecdsa_point: None,
                max_age: m,
                prefix: None,
            },
            mapping: sendgrid::KINDS
                .iter()
                .map(|(k, f)| (k.to_string(), f()))
                .collect(),
            scopes: [(
                "10".to_string(),
                ConsentChange::deny_categories(&[crate::model::Category::PatientSurveys]),
            )]
            .into_iter()
            .collect(),
        };
        assert_eq!(
            v.change("group_unsubscribe", Some("10")),
            Some(&ConsentChange::deny_categories(&[
                crate::model::Category::PatientSurveys
            ]))
        );
        assert_eq!(
            v.change("group_unsubscribe", Some("11")),
            Some(&ConsentChange::deny_channel(crate::model::Channel::Email))
        );
        assert!(v
            .change("group_resubscribe", Some("10"))
            .unwrap()
            .is_empty());
        assert!(v.change("processed", None).is_none());
        assert_eq!(v.label("processed"), "other");
    }

    #[test]
    fn twilio_keywords_and_signature() {
        let s = Secret {
            bytes: b"12345".to_vec(),
            ecdsa_point: None,
            max_age: Duration::from_secs(300),
            prefix: None,
        };
        let body = b"Body=stop&From=%2B14155550100&MessageSid=SM1";
        let url = "https://hooks.example.org/v1/webhooks/twilio";
        let data = format!("{url}Bodystop From+14155550100MessageSidSM1").replace(' ', "");
        let sig = hmac_sha1_b64(b"12345", data.as_bytes());
        let mut headers = HeaderMap::new();
        headers.insert("x-twilio-signature", sig.parse().unwrap());
        let req = Inbound {
            method: &Method::POST,
            url,
            token: None,
            headers: &headers,
            body,
            now: 0,
        };
        twilio::verify(&req, &s).unwrap();
        let sig = twilio::parse(&req, &s).unwrap();
        assert_eq!(
            (sig[0].kind.as_str(), sig[0].id.as_deref()),
            ("stop", Some("SM1"))
        );
        let bad = Inbound {
            body: b"Body=stop&From=%2B14155550199&MessageSid=SM1",
            ..req
        };
        assert!(twilio::verify(&bad, &s).is_err());
    }
}
