//! A configurable destination for vendors without a built-in adapter: JSON or
//! form bodies, with the events, the identifiers and the fields to strip named
//! by path in the config (`destinations:` entries with `type: generic`).

use super::common;
use super::{Adapter, BodyError, Enforced, EventApplied, Judge, RequestView};
use crate::decide::{EventVerdict, Keep};
use crate::identify::Identifiers;
use crate::model::{Category, Channel, DestKind};
use http::Method;
use serde::Deserialize;
use serde_json::Value;

/// How a generic destination's body is encoded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum BodyFormat {
    #[default]
    Json,
    /// `application/x-www-form-urlencoded`; the whole body is one event.
    Form,
}

/// The description of a generic destination. The config layer builds it from a
/// `destinations:` entry with `type: generic` (the shared keys of every
/// destination, such as `type`, `mode` and `on_blocked`, are its own and are
/// not part of this struct). Example:
///
/// ```yaml
/// - name: acme_sms
///   type: generic
///   hosts: [api.acme-sms.example, "*.acme-sms.example"]
///   paths: [/v2/messages]
///   kind: sms
///   category: marketing_sms
///   channel: sms
///   events: messages          # the array of events in the body
///   phones: [to]              # paths inside each event
///   external_ids: [patient_ref]
/// ```
///
/// Fields:
/// - `name`: config name, used in metrics and audit records.
/// - `hosts`: exact hosts, or `*.suffix` for any subdomain of `suffix`
///   (lower-case; the bare suffix does not match).
/// - `paths`: path prefixes, matched on whole segments (`/v2/messages` matches
///   `/v2/messages` and `/v2/messages/x`, not `/v2/messages-x`; `/` matches all).
/// - `methods`: the inspected methods; default `POST`, `PUT`, `PATCH`.
/// - `kind`: `ad_platform | analytics | email | sms | voice | crm`; ad
///   platforms and analytics get the sale/share, GPC and limit_sensitive steps.
/// - `category`: the default consent category (`X-Consent-Category` overrides).
/// - `channel`: `email | sms | voice | mail`, or absent for none.
/// - `format`: `json` (default) or `form`.
/// - `events`: dotted path (through objects) to the array of events; absent:
///   the whole body is one event; `""` or `"$"`: the body is a top-level array.
///   Not allowed with `format: form`.
/// - `patient_id`, `emails`, `phones`, `external_ids`: dotted paths inside an
///   event (arrays met on the way are walked); for `form`, field names.
/// - `strip_identity`: removed when sale/share opt-out or GPC applies (ad
///   platforms and analytics), together with every identifier path above.
/// - `strip_sensitive`: removed when the patient limits sensitive data.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct GenericSpec {
    pub(crate) name: String,
    pub(crate) hosts: Vec<String>,
    pub(crate) paths: Vec<String>,
    #[serde(default = "default_methods")]
    methods: Vec<String>,
    pub(crate) kind: DestKind,
    pub(crate) category: Category,
    #[serde(default)]
    pub(crate) channel: Option<Channel>,
    #[serde(default)]
    pub(crate) format: BodyFormat,
    #[serde(default)]
    pub(crate) events: Option<String>,
    #[serde(default)]
    pub(crate) patient_id: Vec<String>,
    #[serde(default)]
    pub(crate) emails: Vec<String>,
    #[serde(default)]
    pub(crate) phones: Vec<String>,
    #[serde(default)]
    pub(crate) external_ids: Vec<String>,
    #[serde(default)]
    pub(crate) strip_identity: Vec<String>,
    #[serde(default)]
    pub(crate) strip_sensitive: Vec<String>,
}

fn paths(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn default_methods() -> Vec<String> {
    vec!["POST".into(), "PUT".into(), "PATCH".into()]
}

/// A destination built from a [`GenericSpec`].
#[derive(Debug)]
pub(crate) struct GenericAdapter {
    spec: GenericSpec,
    methods: Vec<Method>,
    /// Identity fields to strip: `strip_identity` plus every identifier path.
    identity: Vec<String>,
    identifier_fields: String,
}

impl GenericAdapter {
    /// Validate the spec; the error names the offending field.
    pub(crate) fn new(mut spec: GenericSpec) -> Result<GenericAdapter, String> {
        if spec.name.trim().is_empty() {
            return Err("name: must not be empty".into());
        }
        if spec.hosts.is_empty() {
            return Err("hosts: at least one host is required".into());
        }
        for (i, h) in spec.hosts.iter_mut().enumerate() {
            *h = h.trim().to_ascii_lowercase();
            let bare = h.strip_prefix("*.").unwrap_or(h.as_str());
            if bare.is_empty() || bare.contains(['*', '/', ':', ' ']) {
                return Err(format!(
                    "hosts[{i}]: expected a host name or `*.suffix`, without scheme or port"
                ));
            }
        }
        if spec.paths.is_empty() {
            return Err("paths: at least one path prefix is required (`/` for all)".into());
        }
        for (i, p) in spec.paths.iter().enumerate() {
            if !p.starts_with('/') {
                return Err(format!("paths[{i}]: must start with `/`"));
            }
        }
        let mut methods = Vec::new();
        for (i, m) in spec.methods.iter().enumerate() {
            let m = Method::from_bytes(m.trim().to_ascii_uppercase().as_bytes())
                .map_err(|_| format!("methods[{i}]: not an HTTP method"))?;
            methods.push(m);
        }
        if methods.is_empty() {
            return Err("methods: at least one method is required".into());
        }
        if spec.format == BodyFormat::Form && spec.events.is_some() {
            return Err("events: not allowed with `format: form` (a form is one event)".into());
        }
        let ident: Vec<String> = spec
            .patient_id
            .iter()
            .chain(&spec.emails)
            .chain(&spec.phones)
            .chain(&spec.external_ids)
            .cloned()
            .collect();
        let mut identity = spec.strip_identity.clone();
        for p in &ident {
            if !identity.contains(p) {
                identity.push(p.clone());
            }
        }
        let identifier_fields = ident.join(", ");
        Ok(GenericAdapter {
            spec,
            methods,
            identity,
            identifier_fields,
        })
    }

    fn json_ids(&self, v: &Value) -> Identifiers {
        let s = &self.spec;
        let mut ids = Identifiers::new();
        common::collect(v, &paths(&s.patient_id), &mut ids, Identifiers::add_patient);
        common::collect(
            v,
            &paths(&s.external_ids),
            &mut ids,
            Identifiers::add_external,
        );
        common::collect(v, &paths(&s.emails), &mut ids, Identifiers::add_email);
        common::collect(v, &paths(&s.phones), &mut ids, Identifiers::add_phone);
        ids
    }

    fn json_apply(&self, ev: &mut Value, k: &Keep, a: &mut EventApplied) {
        if k.strip_identity {
            a.strip_with(|s| common::remove_all(ev, &paths(&self.identity), s));
        }
        if k.limit_sensitive {
            let p: Vec<&str> = self
                .spec
                .strip_sensitive
                .iter()
                .map(String::as_str)
                .collect();
            a.strip_with(|s| common::remove_all(ev, &p, s));
        }
    }

    fn enforce_json(&self, body: &[u8], judge: &mut dyn Judge) -> Result<Enforced, BodyError> {
        let identify = |v: &Value| self.json_ids(v);
        let apply = |v: &mut Value, k: &Keep, a: &mut EventApplied| self.json_apply(v, k, a);
        if let Some(path) = &self.spec.events {
            return common::enforce_json_batch_at(body, path, judge, &identify, &apply);
        }
        let mut root = common::parse_json(body)?;
        let verdict = judge.decide(&identify(&root));
        let mut a = EventApplied::new(verdict);
        if let EventVerdict::Keep(k) = verdict {
            apply(&mut root, &k, &mut a);
        }
        let changed = !a.verdict.is_drop() && a.changed();
        Ok(Enforced {
            body: changed.then(|| common::to_json(&root)),
            events: vec![a],
            query: None,
        })
    }

    fn enforce_form(&self, body: &[u8], judge: &mut dyn Judge) -> Result<Enforced, BodyError> {
        if std::str::from_utf8(body).is_err() {
            return Err(BodyError::Unreadable("form body is not valid UTF-8".into()));
        }
        let pairs = common::parse_form(body);
        let s = &self.spec;
        let mut ids = Identifiers::new();
        for (k, v) in &pairs {
            if s.patient_id.contains(k) {
                ids.add_patient(v);
            }
            if s.external_ids.contains(k) {
                ids.add_external(v);
            }
            if s.emails.contains(k) {
                ids.add_email(v);
            }
            if s.phones.contains(k) {
                ids.add_phone(v);
            }
        }
        let verdict = judge.decide(&ids);
        let mut a = EventApplied::new(verdict);
        let EventVerdict::Keep(k) = verdict else {
            return Ok(Enforced {
                body: None,
                events: vec![a],
                query: None,
            });
        };
        let mut strip: Vec<&String> = Vec::new();
        if k.strip_identity {
            strip.extend(&self.identity);
        }
        if k.limit_sensitive {
            strip.extend(&s.strip_sensitive);
        }
        let kept: Vec<(String, String)> = pairs
            .iter()
            .filter(|(name, _)| !strip.contains(&name))
            .cloned()
            .collect();
        for name in strip {
            if pairs.iter().any(|(n, _)| n == name) && !a.fields_stripped().contains(name) {
                a.ch().fields_stripped.push(name.clone());
            }
        }
        let changed = kept.len() != pairs.len();
        Ok(Enforced {
            body: changed.then(|| common::encode_form(&kept)),
            events: vec![a],
            query: None,
        })
    }
}

/// Whether `path` lies under `prefix`, on whole segments.
fn under(prefix: &str, path: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    prefix.is_empty()
        || path
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

impl Adapter for GenericAdapter {
    fn name(&self) -> &str {
        &self.spec.name
    }
    fn display_name(&self) -> &str {
        &self.spec.name
    }
    fn kind(&self) -> DestKind {
        self.spec.kind
    }
    fn default_category(&self) -> Category {
        self.spec.category
    }
    fn channel(&self) -> Option<Channel> {
        self.spec.channel
    }
    fn matches_host(&self, host: &str) -> bool {
        self.spec
            .hosts
            .iter()
            .any(|h| common::host_matches(h, host))
    }
    fn inspects(&self, method: &Method, path: &str) -> bool {
        self.methods.contains(method) && self.spec.paths.iter().any(|p| under(p, path))
    }
    fn enforce(
        &self,
        _req: &RequestView<'_>,
        body: &[u8],
        judge: &mut dyn Judge,
    ) -> Result<Enforced, BodyError> {
        match self.spec.format {
            BodyFormat::Json => self.enforce_json(body, judge),
            BodyFormat::Form => self.enforce_form(body, judge),
        }
    }
    fn identifier_fields(&self) -> &str {
        &self.identifier_fields
    }
    fn ldu_signal(&self) -> &str {
        "none (strip_identity fields removed)"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::destinations::common::testkit::*;
    use serde_json::json;

    fn spec(v: Value) -> GenericSpec {
        serde_json::from_value(v).unwrap()
    }

    fn sms_spec() -> GenericSpec {
        spec(json!({
            "name": "acme_sms",
            "hosts": ["api.acme-sms.example", "*.eu.acme-sms.example"],
            "paths": ["/v2/messages"],
            "kind": "sms",
            "category": "marketing_sms",
            "channel": "sms",
            "events": "batch.messages",
            "phones": ["to"],
            "external_ids": ["patient.ref"]
        }))
    }

    #[test]
    fn generic_spec_parses_and_validates() {
        let a = GenericAdapter::new(sms_spec()).unwrap();
        assert_eq!(a.name(), "acme_sms");
        assert!(a.matches_host("api.acme-sms.example"));
        assert!(a.matches_host("x.eu.acme-sms.example"));
        assert!(!a.matches_host("eu.acme-sms.example"));
        assert!(a.inspects(&Method::POST, "/v2/messages"));
        assert!(a.inspects(&Method::PATCH, "/v2/messages/123"));
        assert!(!a.inspects(&Method::POST, "/v2/messages-x"));
        assert!(!a.inspects(&Method::GET, "/v2/messages"));
        assert_eq!(a.identifier_fields(), "to, patient.ref");
        let unknown: Result<GenericSpec, _> = serde_json::from_value(json!({
            "name": "x", "hosts": ["h"], "paths": ["/"], "kind": "sms",
            "category": "marketing_sms", "colour": "red"}));
        assert!(unknown.unwrap_err().to_string().contains("colour"));
        let mut bad = sms_spec();
        bad.format = BodyFormat::Form;
        assert!(GenericAdapter::new(bad).unwrap_err().starts_with("events"));
        let mut bad = sms_spec();
        bad.hosts = vec!["https://x.example".into()];
        assert!(GenericAdapter::new(bad)
            .unwrap_err()
            .starts_with("hosts[0]"));
        let mut bad = sms_spec();
        bad.methods = vec!["NOT A METHOD".into()];
        assert!(GenericAdapter::new(bad)
            .unwrap_err()
            .starts_with("methods[0]"));
    }

    #[test]
    fn generic_json_batch_mixed() {
        let a = GenericAdapter::new(sms_spec()).unwrap();
        let store = store();
        let mut d = decider_for(&a, &store);
        let body = json!({"batch": {"sender": "HOSP", "messages": [
            {"to": "+14155550120", "text": "Sale!"},
            {"to": "+14155550106", "text": "Sale!"},
            {"to": "+15555550199", "text": "Sale!"},
            {"patient": {"ref": "crm:0031x00000den"}, "to": "+1 415 555 0102"}
        ]}});
        let bytes = serde_json::to_vec(&body).unwrap();
        let out = a
            .enforce(
                &req(&Method::POST, "api.acme-sms.example", "/v2/messages"),
                &bytes,
                &mut d,
            )
            .unwrap();
        assert_eq!(drops(&out.events), vec![false, true, true, true]);
        let out_bytes = out.body.unwrap();
        assert_absent(
            &out_bytes,
            &["+14155550106", "+15555550199", "+14155550102"],
        );
        let v: Value = serde_json::from_slice(&out_bytes).unwrap();
        assert_eq!(v["batch"]["messages"].as_array().unwrap().len(), 1);
        assert_eq!(v["batch"]["sender"], "HOSP");
        // Missing events array → unreadable.
        assert!(matches!(
            a.enforce(
                &req(&Method::POST, "api.acme-sms.example", "/v2/messages"),
                b"{}",
                &mut d
            ),
            Err(BodyError::Unreadable(_))
        ));
    }

    #[test]
    fn generic_single_event_strips_for_ads() {
        let a = GenericAdapter::new(spec(json!({
            "name": "acme_ads",
            "hosts": ["t.acme-ads.example"],
            "paths": ["/collect"],
            "kind": "ad_platform",
            "category": "advertising",
            "emails": ["user.email"],
            "strip_identity": ["user.ip"],
            "strip_sensitive": ["page.url"]
        })))
        .unwrap();
        let store = store();
        let mut d = decider_for(&a, &store);
        let r = req(&Method::POST, "t.acme-ads.example", "/collect");
        // P-1012: sale/share opt-out, gpc and limit_sensitive.
        let body = br#"{"event":"lead","user":{"email":"all.flags@example.com","ip":"10.0.0.1"},"page":{"url":"https://h.example/oncology"}}"#;
        let out = a.enforce(&r, body, &mut d).unwrap();
        assert_eq!(drops(&out.events), vec![false]);
        let bytes = out.body.unwrap();
        assert_absent(&bytes, &["all.flags@example.com"]);
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v, json!({"event":"lead","user":{},"page":{}}));
        // P-1001: granted, untouched.
        let body = br#"{"event":"lead","user":{"email":"jane.roe@example.com"}}"#;
        let out = a.enforce(&r, body, &mut d).unwrap();
        assert!(out.body.is_none());
        assert!(matches!(
            a.enforce(&r, b"{", &mut d),
            Err(BodyError::Unreadable(_))
        ));
    }

    #[test]
    fn generic_top_level_array_and_form() {
        let arr = GenericAdapter::new(spec(json!({
            "name": "dialer", "hosts": ["dial.example"], "paths": ["/"],
            "kind": "voice", "category": "phone_outreach", "channel": "voice",
            "events": "$", "phones": ["numbers"]
        })))
        .unwrap();
        let store = store();
        let mut d = decider_for(&arr, &store);
        let r = req(&Method::PUT, "dial.example", "/lists/1");
        assert!(arr.inspects(&Method::PUT, "/lists/1"));
        let out = arr
            .enforce(
                &r,
                br#"[{"numbers":["+13125550110"]},{"numbers":["+13125550111","+13125550110"]}]"#,
                &mut d,
            )
            .unwrap();
        // Several matches: the most restrictive (voice denied) wins.
        assert_eq!(drops(&out.events), vec![false, true]);
        assert!(matches!(
            arr.enforce(&r, br#"{"a":1}"#, &mut d),
            Err(BodyError::Unreadable(_))
        ));

        let form = GenericAdapter::new(spec(json!({
            "name": "acme_mail", "hosts": ["mail.example"], "paths": ["/send"],
            "kind": "email", "category": "marketing_email", "channel": "email",
            "format": "form", "emails": ["rcpt"], "patient_id": ["pid"]
        })))
        .unwrap();
        let mut d = decider_for(&form, &store);
        let r = req(&Method::POST, "mail.example", "/send");
        let out = form
            .enforce(&r, b"rcpt=jane.roe%40example.com&subject=hi", &mut d)
            .unwrap();
        assert_eq!(drops(&out.events), vec![false]);
        assert!(out.body.is_none());
        let out = form.enforce(&r, b"pid=P-1009&subject=hi", &mut d).unwrap();
        assert_eq!(drops(&out.events), vec![true]);
        assert!(matches!(
            form.enforce(&r, b"rcpt=\xff", &mut d),
            Err(BodyError::Unreadable(_))
        ));
    }
}
