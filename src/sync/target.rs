//! A sync target (SPEC §13): which denials it carries, what an outbox entry for
//! it holds, and the one vendor call that delivers an entry. Vendors are data:
//! each `sync.targets[i].type` is a row of [`Target::call`] and
//! [`Target::payloads`].
//!
//! A record denies a target when it explicitly denies one of the categories or
//! channels the target carries (`denied` in `categories` / `channels`); a
//! category that is denied only by its default is not an opt-out and is never
//! pushed (a vendor list would otherwise fill with every patient who never
//! opted in).

use crate::config::{SyncKind, SyncTargetCfg};
use crate::consent::ConsentRecord;
use crate::model::{Category, Channel, Grant};
use base64::Engine as _;
use md5::{Digest as _, Md5};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// What one outbox entry carries to its vendor (sealed at rest: it may hold
/// plaintext addresses).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Payload {
    pub(crate) patient_id: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) emails: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) phones: Vec<String>,
    /// The vendor's own ids (Braze `external_id`), prefix removed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) ids: Vec<String>,
    /// Mailchimp subscriber hashes (MD5 of the lower-cased email).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) md5: Vec<String>,
}

/// Plaintext addresses a write or a webhook named (never stored elsewhere).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Addresses {
    pub(crate) emails: Vec<String>,
    pub(crate) phones: Vec<String>,
}

/// One HTTP call to the vendor.
#[derive(Debug)]
pub(crate) struct Call {
    pub(crate) method: http::Method,
    /// Path and query, from `/`.
    pub(crate) path: String,
    pub(crate) headers: Vec<(&'static str, String)>,
    pub(crate) body: Vec<u8>,
}

#[derive(Clone, Debug)]
pub(crate) struct Target {
    pub(crate) cfg: SyncTargetCfg,
}

/// Klaviyo's API revision when the target names none.
const KLAVIYO_REVISION: &str = "2024-10-15";
/// Braze users named by `identifiers.external_ids` with this prefix need no plaintext.
const BRAZE_PREFIX: &str = "braze:";
/// SendGrid takes up to 1000 addresses a call, Klaviyo 100, Braze 50: a patient
/// has far fewer, but a bound keeps a pathological record from building a huge call.
const MAX_ADDRESSES: usize = 50;

impl Target {
    pub(crate) fn new(cfg: SyncTargetCfg) -> Target {
        Target { cfg }
    }

    pub(crate) fn name(&self) -> &str {
        &self.cfg.name
    }

    /// Whether `rec` explicitly denies a category or channel this target carries.
    pub(crate) fn denies(&self, rec: &ConsentRecord) -> bool {
        self.denied_categories(rec).next().is_some() || self.denied_channels(rec).next().is_some()
    }

    fn denied_categories<'a>(
        &'a self,
        rec: &'a ConsentRecord,
    ) -> impl Iterator<Item = Category> + 'a {
        self.cfg
            .categories
            .iter()
            .copied()
            .filter(|c| rec.categories.get(c) == Some(&Grant::Denied))
    }

    fn denied_channels<'a>(&'a self, rec: &'a ConsentRecord) -> impl Iterator<Item = Channel> + 'a {
        self.cfg
            .channels
            .iter()
            .copied()
            .filter(|c| rec.channels.get(c) == Some(&Grant::Denied))
    }

    /// What a push of `rec` would say: its time, the carried denials and the
    /// identifiers this target can be reached by. Equal stamps need no second
    /// push (a reload, a restart, a second instance seeing the same change);
    /// any new write to a denied patient is pushed again (idempotent at the vendor).
    pub(crate) fn stamp(&self, rec: &ConsentRecord) -> String {
        let mut h = Sha256::new();
        h.update(self.cfg.name.as_bytes());
        h.update([0]);
        h.update(rec.updated_at.timestamp_micros().to_be_bytes());
        for c in self.denied_categories(rec) {
            h.update(c.as_str().as_bytes());
            h.update([1]);
        }
        for c in self.denied_channels(rec) {
            h.update(c.as_str().as_bytes());
            h.update([2]);
        }
        for e in &rec.identifiers.email_sha256 {
            h.update(e.0);
        }
        for p in &rec.identifiers.phone_sha256 {
            h.update(p.0);
        }
        for x in &rec.identifiers.external_ids {
            h.update(x.as_bytes());
            h.update([3]);
        }
        hex::encode(&h.finalize()[..16])
    }

    /// The entries a denial of `rec` becomes: one per vendor call. Empty when the
    /// target cannot be reached without a plaintext address nobody gave.
    pub(crate) fn payloads(&self, rec: &ConsentRecord, addrs: &Addresses) -> Vec<Payload> {
        let base = || Payload {
            patient_id: rec.patient_id.clone(),
            ..Default::default()
        };
        let emails = || normalized_emails(&addrs.emails);
        match self.cfg.kind {
            SyncKind::SendgridGlobal | SyncKind::SendgridGroup | SyncKind::Klaviyo => {
                let e = emails();
                if e.is_empty() {
                    return Vec::new();
                }
                vec![Payload {
                    emails: e,
                    ..base()
                }]
            }
            SyncKind::Hubspot => emails()
                .into_iter()
                .map(|e| Payload {
                    emails: vec![e],
                    ..base()
                })
                .collect(),
            // The member path is MD5(lower-cased email): the hash is all the entry keeps.
            SyncKind::Mailchimp => emails()
                .into_iter()
                .map(|e| Payload {
                    md5: vec![hex::encode(Md5::digest(e.as_bytes()))],
                    ..base()
                })
                .collect(),
            SyncKind::Braze => {
                let prefix = self
                    .cfg
                    .external_id_prefix
                    .as_deref()
                    .unwrap_or(BRAZE_PREFIX);
                let ids: Vec<String> = rec
                    .identifiers
                    .external_ids
                    .iter()
                    .filter_map(|x| x.trim().strip_prefix(prefix))
                    .filter(|x| !x.is_empty())
                    .map(str::to_string)
                    .take(MAX_ADDRESSES)
                    .collect();
                if !ids.is_empty() {
                    return vec![Payload { ids, ..base() }];
                }
                let e = emails();
                let phones: Vec<String> = addrs
                    .phones
                    .iter()
                    .filter_map(|p| crate::identify::normalize_phone(p))
                    .map(|d| format!("+{d}"))
                    .take(MAX_ADDRESSES)
                    .collect();
                // Without a subscription group only the global email state can be set.
                let phones = if self.cfg.group_id.is_some() {
                    phones
                } else {
                    Vec::new()
                };
                if e.is_empty() && phones.is_empty() {
                    return Vec::new();
                }
                vec![Payload {
                    emails: e,
                    phones,
                    ..base()
                }]
            }
        }
    }

    /// The vendor call for one entry, with the credential from `credentials_file`.
    pub(crate) fn call(&self, p: &Payload, credential: &str) -> Call {
        let c = &self.cfg;
        let bearer = format!("Bearer {credential}");
        let json = |v: serde_json::Value| serde_json::to_vec(&v).unwrap_or_default();
        let group = c.group_id.as_deref().unwrap_or("");
        match c.kind {
            SyncKind::SendgridGlobal | SyncKind::SendgridGroup => {
                let path = match c.kind {
                    SyncKind::SendgridGroup => {
                        format!("/v3/asm/groups/{}/suppressions", path_segment(group))
                    }
                    _ => "/v3/asm/suppressions/global".to_string(),
                };
                let mut headers = vec![("authorization", bearer)];
                if let Some(sub) = &c.on_behalf_of {
                    headers.push(("on-behalf-of", sub.clone()));
                }
                Call {
                    method: http::Method::POST,
                    path,
                    headers,
                    body: json(serde_json::json!({ "recipient_emails": p.emails })),
                }
            }
            SyncKind::Mailchimp => {
                let basic = base64::engine::general_purpose::STANDARD
                    .encode(format!("consentgate:{credential}"));
                let list = c.list_id.as_deref().unwrap_or("");
                let hash = p.md5.first().map(String::as_str).unwrap_or("");
                Call {
                    method: http::Method::PATCH,
                    path: format!(
                        "/3.0/lists/{}/members/{}",
                        path_segment(list),
                        path_segment(hash)
                    ),
                    headers: vec![("authorization", format!("Basic {basic}"))],
                    body: json(serde_json::json!({ "status": "unsubscribed" })),
                }
            }
            SyncKind::Klaviyo => {
                let profiles: Vec<serde_json::Value> = p
                    .emails
                    .iter()
                    .map(|e| serde_json::json!({"type": "profile", "attributes": {"email": e}}))
                    .collect();
                Call {
                    method: http::Method::POST,
                    path: "/api/profile-suppression-bulk-create-jobs".into(),
                    headers: vec![
                        ("authorization", format!("Klaviyo-API-Key {credential}")),
                        (
                            "revision",
                            c.revision
                                .clone()
                                .unwrap_or_else(|| KLAVIYO_REVISION.into()),
                        ),
                        ("accept", "application/vnd.api+json".into()),
                        ("content-type", "application/vnd.api+json".into()),
                    ],
                    body: json(serde_json::json!({"data": {
                        "type": "profile-suppression-bulk-create-job",
                        "attributes": {"profiles": {"data": profiles}}
                    }})),
                }
            }
            SyncKind::Braze => {
                let headers = vec![("authorization", bearer)];
                let body = match (&c.group_id, p.ids.is_empty()) {
                    (Some(g), false) => serde_json::json!({
                        "subscription_group_id": g, "subscription_state": "unsubscribed",
                        "external_id": p.ids}),
                    (Some(g), true) => {
                        let mut v = serde_json::json!({
                            "subscription_group_id": g, "subscription_state": "unsubscribed"});
                        if !p.emails.is_empty() {
                            v["email"] = serde_json::json!(p.emails);
                        }
                        if !p.phones.is_empty() {
                            v["phone"] = serde_json::json!(p.phones);
                        }
                        v
                    }
                    (None, false) => {
                        let attrs: Vec<serde_json::Value> = p
                            .ids
                            .iter()
                            .map(|id| {
                                serde_json::json!({"external_id": id, "email_subscribe": "unsubscribed"})
                            })
                            .collect();
                        return Call {
                            method: http::Method::POST,
                            path: "/users/track".into(),
                            headers,
                            body: json(serde_json::json!({ "attributes": attrs })),
                        };
                    }
                    (None, true) => {
                        return Call {
                            method: http::Method::POST,
                            path: "/email/status".into(),
                            headers,
                            body: json(serde_json::json!({
                                "email": p.emails, "subscription_state": "unsubscribed"})),
                        }
                    }
                };
                Call {
                    method: http::Method::POST,
                    path: "/subscription/status/set".into(),
                    headers,
                    body: json(body),
                }
            }
            SyncKind::Hubspot => {
                let mut body = serde_json::json!({
                    "emailAddress": p.emails.first().cloned().unwrap_or_default(),
                    "subscriptionId": group,
                });
                if let Some(b) = &c.legal_basis {
                    body["legalBasis"] = serde_json::json!(b);
                    body["legalBasisExplanation"] =
                        serde_json::json!("opt-out recorded by consentgate");
                }
                Call {
                    method: http::Method::POST,
                    path: "/communication-preferences/v3/unsubscribe".into(),
                    headers: vec![("authorization", bearer)],
                    body: json(body),
                }
            }
        }
    }

    /// A vendor answer that means "already done" although it is not a 2xx: the
    /// entry is delivered. Mailchimp: the address is not a member of the audience
    /// (nothing to unsubscribe); HubSpot: the address is already unsubscribed.
    pub(crate) fn already_done(&self, status: u16, body: &[u8]) -> Option<&'static str> {
        match (self.cfg.kind, status) {
            (SyncKind::Mailchimp, 404) => Some("not_a_member"),
            (SyncKind::Hubspot, 400) => {
                let text = String::from_utf8_lossy(body).to_ascii_lowercase();
                text.contains("already").then_some("already_unsubscribed")
            }
            _ => None,
        }
    }
}

/// Trimmed, lower-cased, deduplicated addresses (at most [`MAX_ADDRESSES`]).
fn normalized_emails(raw: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for e in raw {
        if let Some(n) = crate::identify::normalize_email(e) {
            if !out.contains(&n) && out.len() < MAX_ADDRESSES {
                out.push(n);
            }
        }
    }
    out
}

/// A path segment with everything but unreserved characters percent-encoded.
fn path_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(kind: SyncKind, extra: impl FnOnce(&mut SyncTargetCfg)) -> Target {
        let mut cfg = SyncTargetCfg {
            name: "t".into(),
            line: 1,
            kind,
            categories: vec![Category::MarketingEmail],
            channels: vec![Channel::Email],
            credentials_file: "k".into(),
            rate: 10.0,
            host: "h".into(),
            group_id: None,
            list_id: None,
            on_behalf_of: None,
            external_id_prefix: None,
            revision: None,
            legal_basis: None,
        };
        extra(&mut cfg);
        Target::new(cfg)
    }

    fn rec(json: &str) -> ConsentRecord {
        ConsentRecord::from_json(json.as_bytes())
            .unwrap()
            .into_stored()
    }

    #[test]
    fn only_explicit_denials_of_carried_keys_deny() {
        let t = target(SyncKind::SendgridGlobal, |_| {});
        assert!(!t.denies(&rec(
            r#"{"patient_id":"P","updated_at":"2026-01-01T00:00:00Z"}"#
        )));
        assert!(!t.denies(&rec(
            r#"{"patient_id":"P","categories":{"advertising":"denied"},"updated_at":"2026-01-01T00:00:00Z"}"#
        )));
        assert!(t.denies(&rec(
            r#"{"patient_id":"P","channels":{"email":"denied"},"updated_at":"2026-01-01T00:00:00Z"}"#
        )));
        let a = rec(
            r#"{"patient_id":"P","categories":{"marketing_email":"denied"},"updated_at":"2026-01-01T00:00:00Z"}"#,
        );
        let mut b = a.clone();
        assert_eq!(t.stamp(&a), t.stamp(&b));
        b.updated_at = "2026-01-02T00:00:00Z".parse().unwrap();
        assert_ne!(t.stamp(&a), t.stamp(&b));
    }

    #[test]
    fn calls_per_vendor() {
        let r = rec(
            r#"{"patient_id":"P","identifiers":{"external_ids":["braze:u-1"]},"updated_at":"2026-01-01T00:00:00Z"}"#,
        );
        let addrs = Addresses {
            emails: vec![" Jane@Example.com ".into()],
            phones: vec!["+1 415 555 0100".into()],
        };
        let mc = target(SyncKind::Mailchimp, |c| c.list_id = Some("L1".into()));
        let p = mc.payloads(&r, &addrs);
        assert_eq!(p.len(), 1);
        assert!(p[0].emails.is_empty(), "only the hash is kept");
        let call = mc.call(&p[0], "key");
        assert_eq!(call.method, http::Method::PATCH);
        assert_eq!(
            call.path,
            format!(
                "/3.0/lists/L1/members/{}",
                hex::encode(Md5::digest(b"jane@example.com"))
            )
        );
        let braze = target(SyncKind::Braze, |c| c.group_id = Some("g-1".into()));
        let p = braze.payloads(&r, &Addresses::default());
        assert_eq!(p[0].ids, ["u-1"], "braze ids need no plaintext");
        let call = braze.call(&p[0], "key");
        let body: serde_json::Value = serde_json::from_slice(&call.body).unwrap();
        assert_eq!(body["external_id"][0], "u-1");
        assert!(target(SyncKind::SendgridGlobal, |_| {})
            .payloads(&r, &Addresses::default())
            .is_empty());
        assert_eq!(path_segment("a/b c"), "a%2Fb%20c");
    }
}
