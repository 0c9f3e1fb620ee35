//! HubSpot app webhooks: a JSON array of `{eventId, portalId, objectId,
//! subscriptionType, propertyName, propertyValue, ...}`.
//!
//! - Verified by `X-HubSpot-Signature-v3`: base64 HMAC-SHA256 under the app's
//!   client secret of the method, the URL HubSpot called, the raw body and the
//!   `X-HubSpot-Request-Timestamp` value (Unix milliseconds), which must be
//!   within `max_age` (HubSpot says 5 minutes) of now.
//! - Kinds: `email_optout` (`hs_email_optout` set to true: "unsubscribed from
//!   all email") → `channels.email: denied`; `subscription_optout`
//!   (`hs_email_optout_<subscription id>` set to true; scope: the subscription
//!   id) → `channels.email: denied` unless `scopes` maps the subscription (an
//!   unmapped subscription type could be any kind of mail); `email_optin`,
//!   `privacy_deletion` and everything else change nothing (erasure is a
//!   separate workflow).
//! - The person: HubSpot names contacts only by id: the external id
//!   `hubspot:<portalId>:<objectId>` (`external_id_prefix` replaces `hubspot:`).
//!   Event id: `eventId`.

use super::{hmac_sha256, Inbound, Secret, Signal};
use crate::model::Channel;
use crate::optout::ConsentChange;
use base64::Engine as _;

pub(super) const KINDS: super::Kinds = &[
    ("email_optout", || {
        ConsentChange::deny_channel(Channel::Email)
    }),
    ("subscription_optout", || {
        ConsentChange::deny_channel(Channel::Email)
    }),
    ("email_optin", ConsentChange::default),
    ("privacy_deletion", ConsentChange::default),
];

pub(super) const DEFAULT_PREFIX: &str = "hubspot:";

pub(super) fn verify(req: &Inbound<'_>, s: &Secret) -> Result<(), &'static str> {
    let sig = req
        .header("x-hubspot-signature-v3")
        .ok_or("missing X-HubSpot-Signature-v3")?;
    let ts = req
        .header("x-hubspot-request-timestamp")
        .ok_or("missing X-HubSpot-Request-Timestamp")?;
    let mut msg = format!("{}{}", req.method.as_str(), req.url).into_bytes();
    msg.extend_from_slice(req.body);
    msg.extend_from_slice(ts.as_bytes());
    let want = base64::engine::general_purpose::STANDARD.encode(hmac_sha256(&s.bytes, &msg));
    if !super::ct_eq(want.as_bytes(), sig.trim().as_bytes()) {
        return Err("X-HubSpot-Signature-v3 does not match");
    }
    super::fresh(ts.trim(), req.now, s.max_age, 1000)
}

fn text(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

pub(super) fn parse(req: &Inbound<'_>, s: &Secret) -> Result<Vec<Signal>, String> {
    let v: serde_json::Value = serde_json::from_slice(req.body)
        .map_err(|_| "expected a JSON array of events".to_string())?;
    let events = v.as_array().ok_or("expected a JSON array of events")?;
    let prefix = s.prefix.as_deref().unwrap_or(DEFAULT_PREFIX);
    let mut out = Vec::new();
    for (i, e) in events.iter().enumerate() {
        let sub =
            text(e.get("subscriptionType")).ok_or(format!("[{i}].subscriptionType missing"))?;
        let prop = text(e.get("propertyName")).unwrap_or_default();
        let value = text(e.get("propertyValue"))
            .unwrap_or_default()
            .to_ascii_lowercase();
        let mut scope = None;
        let kind = if sub.ends_with("privacyDeletion") {
            "privacy_deletion".to_string()
        } else if prop == "hs_email_optout" {
            if value == "true" {
                "email_optout"
            } else {
                "email_optin"
            }
            .to_string()
        } else if let Some(id) = prop.strip_prefix("hs_email_optout_") {
            scope = Some(id.to_string());
            if value == "true" {
                "subscription_optout"
            } else {
                "email_optin"
            }
            .to_string()
        } else {
            sub.clone()
        };
        let external_ids = match (text(e.get("portalId")), text(e.get("objectId"))) {
            (Some(p), Some(o)) => vec![format!("{prefix}{p}:{o}")],
            _ => Vec::new(),
        };
        out.push(Signal {
            id: text(e.get("eventId")),
            kind,
            scope,
            external_ids,
            ..Default::default()
        });
    }
    Ok(out)
}
