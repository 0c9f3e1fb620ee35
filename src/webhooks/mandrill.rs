//! Mailchimp Transactional (Mandrill) webhooks: a form POST with one field,
//! `mandrill_events`, a JSON array of events (`event`, `_id`, `ts`, `msg.email`).
//!
//! - Verified by `X-Mandrill-Signature`: base64 HMAC-SHA1 under the webhook's key
//!   of the webhook URL exactly as configured followed by every POST field,
//!   sorted by name, as name and value (the Twilio scheme). Mandrill checks a new
//!   webhook with a HEAD request, answered 200.
//! - Kinds and defaults: `unsub` (the recipient used the unsubscribe link:
//!   Mandrill rejects all later mail to the address) and `spam` →
//!   `channels.email: denied`; `reject` (a message refused because the address is
//!   on the rejection denylist) → `channels.email: denied`, unless
//!   `msg.reject.reason` / `msg.reject_reason` says bounce, invalid address or a
//!   sender problem (deliverability, not consent: kind `reject_other`, no change).
//!   Other events (`send`, `open`, `hard_bounce`...) change nothing.
//! - The person: `msg.email`. Event id: `_id` with the event and `ts`.

use super::{form_pairs, hmac_sha1_b64, Inbound, Secret, Signal};
use crate::model::Channel;
use crate::optout::ConsentChange;

pub(super) const KINDS: super::Kinds = &[
    ("unsub", || ConsentChange::deny_channel(Channel::Email)),
    ("spam", || ConsentChange::deny_channel(Channel::Email)),
    ("reject", || ConsentChange::deny_channel(Channel::Email)),
    ("reject_other", ConsentChange::default),
];

/// Reject reasons that are about deliverability, not the recipient's wish.
const NOT_CONSENT: &[&str] = &[
    "hard-bounce",
    "soft-bounce",
    "invalid",
    "invalid-sender",
    "test-mode-limit",
    "rule",
    "unsigned",
];

pub(super) fn verify(req: &Inbound<'_>, s: &Secret) -> Result<(), &'static str> {
    let sig = req
        .header("x-mandrill-signature")
        .ok_or("missing X-Mandrill-Signature")?;
    let mut pairs = form_pairs(req.body);
    pairs.sort();
    let mut data = req.url.to_string();
    for (k, v) in pairs {
        data.push_str(&k);
        data.push_str(&v);
    }
    let want = hmac_sha1_b64(&s.bytes, data.as_bytes());
    if super::ct_eq(want.as_bytes(), sig.trim().as_bytes()) {
        Ok(())
    } else {
        Err("X-Mandrill-Signature does not match")
    }
}

pub(super) fn parse(req: &Inbound<'_>, _: &Secret) -> Result<Vec<Signal>, String> {
    let pairs = form_pairs(req.body);
    let events = pairs
        .iter()
        .find(|(k, _)| k == "mandrill_events")
        .map(|(_, v)| v.as_str())
        .ok_or("mandrill_events missing")?;
    let v: serde_json::Value =
        serde_json::from_str(events).map_err(|_| "mandrill_events is not JSON".to_string())?;
    let events = v.as_array().ok_or("mandrill_events is not an array")?;
    let mut out = Vec::new();
    for (i, e) in events.iter().enumerate() {
        let Some(event) = e.get("event").and_then(|x| x.as_str()) else {
            // Sync events (denylist/allowlist changes) have `type`, not `event`.
            continue;
        };
        let msg = e.get("msg");
        let email = msg
            .and_then(|m| m.get("email"))
            .and_then(|x| x.as_str())
            .unwrap_or_default();
        let reason = msg.and_then(|m| {
            m.get("reject")
                .and_then(|r| r.get("reason"))
                .or_else(|| m.get("reject_reason"))
                .and_then(|x| x.as_str())
        });
        let kind = match (event, reason) {
            ("reject", Some(r)) if NOT_CONSENT.contains(&r) => "reject_other",
            (k, _) => k,
        };
        let id = e
            .get("_id")
            .and_then(|x| x.as_str())
            .map(|id| {
                format!(
                    "{id}:{event}:{}",
                    e.get("ts").map(|t| t.to_string()).unwrap_or_default()
                )
            })
            .ok_or(format!("mandrill_events[{i}]._id missing"))?;
        out.push(Signal {
            id: Some(id),
            kind: kind.to_string(),
            emails: vec![email.to_string()],
            ..Default::default()
        });
    }
    Ok(out)
}
