//! Route + rewrite: the destination catalog. Each vendor is one small file
//! implementing [`Adapter`]; the registry below is the only other place that
//! names it. The proxy never names a vendor.

pub(crate) mod adspec;
mod batch;
pub(crate) mod braze;
pub(crate) mod common;
pub(crate) mod ga4;
pub(crate) mod generic;
pub(crate) mod genesys;
pub(crate) mod google_ads;
pub(crate) mod hubspot;
pub(crate) mod klaviyo;
pub(crate) mod linkedin;
pub(crate) mod mailchimp;
pub(crate) mod mandrill;
pub(crate) mod meta;
pub(crate) mod pinterest;
pub(crate) mod rawjson;
pub(crate) mod sendgrid;
mod shapes;
pub(crate) mod snap;
pub(crate) mod tiktok;
pub(crate) mod twilio;

use crate::decide::EventVerdict;
use crate::identify::Identifiers;
use crate::model::{Category, Channel, DestKind};
use crate::refusal::Shape;
use adspec::AdPlatform;
use http::Method;
use std::sync::Arc;

/// What an adapter sees of the request (never the headers that carry secrets).
#[derive(Clone, Copy, Debug)]
pub struct RequestView<'a> {
    pub method: &'a Method,
    pub host: &'a str,
    pub path: &'a str,
    pub query: Option<&'a str>,
    /// Lower-cased media type without parameters, e.g. `application/json`.
    pub content_type: Option<&'a str>,
}

/// What the adapter did to one event, in payload order. Small (two words) when
/// nothing was changed: a batch of 70,000 events keeps one of these per event.
#[derive(Clone, Debug, PartialEq)]
pub struct EventApplied {
    pub verdict: EventVerdict,
    /// The first field path hashed (most events hash one, e.g. `user_data.em`).
    hashed_first: Option<&'static str>,
    changes: Option<Box<Changes>>,
}

/// What was changed in one event (allocated only when something was).
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Changes {
    /// Dotted field paths removed or reduced (names only, never values).
    pub(crate) fields_stripped: Vec<String>,
    /// Signals set, e.g. `data_processing_options=LDU`.
    pub(crate) flags_set: Vec<String>,
    /// Field paths whose plaintext was hashed on the way out, after the first.
    hashed: Vec<&'static str>,
}

impl EventApplied {
    pub(crate) fn new(verdict: EventVerdict) -> Self {
        EventApplied {
            verdict,
            hashed_first: None,
            changes: None,
        }
    }
    /// What was changed, to add to.
    pub(crate) fn ch(&mut self) -> &mut Changes {
        self.changes.get_or_insert_with(Box::default)
    }
    /// Run `f` on a list of stripped paths; anything it adds is recorded.
    pub(crate) fn strip_with(&mut self, f: impl FnOnce(&mut Vec<String>)) {
        let mut v = Vec::new();
        f(&mut v);
        if !v.is_empty() {
            self.ch().fields_stripped.append(&mut v);
        }
    }
    /// Record that the plaintext at `path` was hashed.
    pub(crate) fn hash(&mut self, path: &'static str) {
        match self.hashed_first {
            None => self.hashed_first = Some(path),
            Some(_) => self.ch().hashed.push(path),
        }
    }
    /// Run `f` on a list of hashed paths; anything it adds is recorded.
    pub(crate) fn hash_with(&mut self, f: impl FnOnce(&mut Vec<&'static str>)) {
        let mut v = Vec::new();
        f(&mut v);
        for p in v {
            self.hash(p);
        }
    }
    pub(crate) fn fields_stripped(&self) -> &[String] {
        self.changes.as_ref().map_or(&[], |c| &c.fields_stripped)
    }
    pub(crate) fn flags_set(&self) -> &[String] {
        self.changes.as_ref().map_or(&[], |c| &c.flags_set)
    }
    /// The field paths hashed, in order.
    pub(crate) fn hashed(&self) -> Vec<&'static str> {
        let more = self.changes.as_ref().map_or(&[][..], |c| &c.hashed[..]);
        self.hashed_first
            .into_iter()
            .chain(more.iter().copied())
            .collect()
    }
    /// Whether the event leaves in a different form than it arrived.
    pub(crate) fn changed(&self) -> bool {
        self.verdict.is_drop()
            || !self.fields_stripped().is_empty()
            || !self.flags_set().is_empty()
            || self.hashed_first.is_some()
    }
}

/// The result of enforcing one body.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Enforced {
    /// The rewritten body; `None` when the original bytes go out unchanged.
    pub body: Option<Vec<u8>>,
    pub events: Vec<EventApplied>,
    /// The rewritten query string, for an endpoint whose query is its data
    /// ([`Adapter::reads_query`]); `None` when the query goes out unchanged.
    pub query: Option<String>,
}

/// A body the adapter refuses. Each maps to a status and a JSON error code.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BodyError {
    /// Not parseable as the destination's format (422 `unreadable_body`).
    Unreadable(String),
    /// Parseable, but the request itself breaks policy, e.g. SendGrid
    /// `bypass_list_management` (451 with the given code).
    Forbidden { code: &'static str, detail: String },
}

/// The vendor's empty-success answer for `on_blocked: synthetic_ok`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyntheticOk {
    pub(crate) status: u16,
    pub(crate) body: &'static str,
}

/// What an adapter asks while it enforces a body: the policy's verdict for
/// each event or recipient, then (after every event is decided, so whom the
/// request may send for is known) the egress guard's word on each kept event as
/// it will leave. `crate::enforce` implements it; a plain closure is a judge
/// with no guard (adapter unit tests).
pub trait Judge {
    /// The verdict for one event or recipient, in payload order.
    fn decide(&mut self, ids: &Identifiers) -> EventVerdict;
    /// [`Judge::decide`] for a recipient a message reaches over each of
    /// `channels` rather than over the destination's own (Braze: one request,
    /// several message kinds). Each channel is decided with the request's
    /// category as it reads on that channel ([`Category::on_channel`]); the
    /// most restrictive verdict (the first drop) is the recipient's. With
    /// `record`, that is the recipient's decision, like `decide`; without, it
    /// is only asked (no decision recorded, nobody allowed for the guard).
    /// An empty `channels` is `decide`. A plain closure ignores the channels.
    fn decide_on(
        &mut self,
        ids: &Identifiers,
        channels: &[Option<Channel>],
        record: bool,
    ) -> EventVerdict {
        let _ = (channels, record);
        self.decide(ids)
    }
    /// A kept event (its payload index) as a value tree, as it will leave.
    /// `Err`: drop it, it names someone this request may not send for; `Ok`:
    /// the paths of unknown contacts removed from it (ad platforms and analytics).
    fn guard(
        &mut self,
        index: usize,
        event: &mut serde_json::Value,
    ) -> Result<Vec<String>, crate::guard::Reason>;
    /// A kept event as JSON text (a lazy adapter path), read without a tree.
    fn guard_text(&mut self, index: usize, json: &[u8]) -> crate::guard::Scan;
}

impl<F: FnMut(&Identifiers) -> EventVerdict> Judge for F {
    fn decide(&mut self, ids: &Identifiers) -> EventVerdict {
        self(ids)
    }
    fn guard(
        &mut self,
        _: usize,
        _: &mut serde_json::Value,
    ) -> Result<Vec<String>, crate::guard::Reason> {
        Ok(Vec::new())
    }
    fn guard_text(&mut self, _: usize, _: &[u8]) -> crate::guard::Scan {
        crate::guard::Scan::default()
    }
}

/// One destination: how to recognise its traffic and enforce consent on it.
pub trait Adapter: Send + Sync + 'static {
    /// Config name, e.g. `meta_capi` (used in `destinations:` and metric labels).
    fn name(&self) -> &str;
    /// Human-readable name for docs and `explain`.
    fn display_name(&self) -> &str;
    fn kind(&self) -> DestKind;
    fn default_category(&self) -> Category;
    /// The channel the destination delivers over, if any (email, sms, voice).
    fn channel(&self) -> Option<Channel> {
        None
    }
    /// Whether a request to `host` (lower-case, no port) belongs to this destination.
    fn matches_host(&self, host: &str) -> bool;
    /// Whether this request carries patient data that must be inspected.
    /// Requests on a known host that return false are governed by the
    /// destination's `uninspected` setting (default: bodiless methods pass,
    /// anything with a body is blocked).
    fn inspects(&self, method: &Method, path: &str) -> bool;
    /// Parse the body, call `decide` once per event/recipient in payload order,
    /// apply each verdict, serialise back.
    fn enforce(
        &self,
        req: &RequestView<'_>,
        body: &[u8],
        judge: &mut dyn Judge,
    ) -> Result<Enforced, BodyError>;
    fn synthetic_ok(&self) -> SyntheticOk {
        SyntheticOk {
            status: 200,
            body: "{}",
        }
    }
    /// Identifier fields, for the README table and `explain`.
    fn identifier_fields(&self) -> &str {
        ""
    }
    /// The limited-data-use / consent signal it sets, for the README table.
    fn ldu_signal(&self) -> &str {
        "none"
    }
    /// The vendor's own error shape, so its SDK raises its own error type on a
    /// refusal (docs/SDKS.md); `Plain` where the vendor has none.
    fn refusal_shape(&self) -> Shape {
        Shape::Plain
    }
    /// The query parameters the vendor reads on an inspected endpoint that carry
    /// no one's data (credentials, ids, switches), compared without case. Any
    /// other parameter makes the request unreadable (SPEC §6, the egress guard:
    /// the query is read like the body, and a field nobody reads is not sent).
    /// Whether the endpoint's query string is data the adapter reads and
    /// rewrites itself (GA4's `/g/collect` hits): then [`Adapter::query_params`]
    /// does not apply, and the adapter may answer a new query in
    /// [`Enforced::query`].
    fn reads_query(&self, _method: &Method, _path: &str) -> bool {
        false
    }
    fn query_params(&self) -> &'static [&'static str] {
        &[]
    }
}

/// Every built-in adapter, in match order. Adding a vendor: its file, and one line here.
pub fn builtins() -> Vec<Arc<dyn Adapter>> {
    vec![
        Arc::new(meta::MetaCapi),
        Arc::new(ga4::Ga4Mp),
        Arc::new(google_ads::GoogleAds),
        Arc::new(AdPlatform(&tiktok::SPEC)),
        Arc::new(linkedin::LinkedinCapi),
        Arc::new(AdPlatform(&pinterest::SPEC)),
        Arc::new(AdPlatform(&snap::SPEC)),
        Arc::new(sendgrid::SendGrid),
        Arc::new(mailchimp::Mailchimp),
        Arc::new(mandrill::Mandrill),
        Arc::new(klaviyo::Klaviyo),
        Arc::new(twilio::SMS),
        Arc::new(twilio::VOICE),
        Arc::new(braze::Braze),
        Arc::new(hubspot::HubSpot),
        Arc::new(genesys::GenesysOutbound),
    ]
}

/// A `type: generic` destination from its config entry (as JSON). Keys every
/// destination entry shares (`type`, `mode`, `on_blocked`, `enabled`, ...) are
/// removed before the rest is read as a [`generic::GenericSpec`].
pub(crate) fn generic(entry: &serde_json::Value) -> Result<Arc<dyn Adapter>, String> {
    let mut v = entry.clone();
    if let Some(m) = v.as_object_mut() {
        for k in ["type", "mode", "on_blocked", "refusal_format", "enabled"] {
            m.remove(k);
        }
    }
    let spec: generic::GenericSpec = serde_json::from_value(v).map_err(|e| e.to_string())?;
    Ok(Arc::new(generic::GenericAdapter::new(spec)?))
}

/// The README's destination table, rendered from the built-in adapters (a test
/// keeps README.md equal to it).
#[cfg(test)]
fn readme_table() -> String {
    let mut out = String::from(
        "| destination | name | kind | default category | channel | identifier fields | limited-data-use / consent signal |\n|---|---|---|---|---|---|---|\n",
    );
    for a in builtins() {
        out.push_str(&format!(
            "| {} | `{}` | {} | `{}` | {} | {} | {} |\n",
            a.display_name(),
            a.name(),
            a.kind().as_str(),
            a.default_category().as_str(),
            a.channel().map(|c| c.as_str()).unwrap_or("-"),
            a.identifier_fields().replace('|', "\\|"),
            a.ldu_signal().replace('|', "\\|"),
        ));
    }
    out
}

#[cfg(test)]
mod readme_tests {
    #[test]
    fn readme_destination_table_is_current() {
        let readme = include_str!("../../README.md");
        let table = super::readme_table();
        assert!(
            readme.contains(&table),
            "README.md's destination table is out of date; replace it with:\n{table}"
        );
    }
}
