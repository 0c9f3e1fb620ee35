//! Klaviyo system webhooks: JSON `{"data": [{"external_id", "topic",
//! "payload"}], "meta": {"klaviyo_webhook_id", ...}}`, headers
//! `Klaviyo-Webhook-Id`, `Klaviyo-Timestamp`, `Klaviyo-Signature`.
//!
//! - Verified by `Klaviyo-Signature`: hex HMAC-SHA256 under the webhook's secret
//!   of the raw body followed by the `Klaviyo-Timestamp` value; the timestamp
//!   (RFC 3339, or Unix seconds/milliseconds) must be within `max_age` of now,
//!   and `meta.klaviyo_webhook_id` must equal `Klaviyo-Webhook-Id`.
//! - Kinds (the topic without `event:klaviyo.`) and defaults:
//!   `unsubscribed_from_email_marketing` and
//!   `manually_suppressed_from_email_marketing` → `categories: {marketing_email:
//!   denied, patient_surveys: denied}`; `unsubscribed_from_sms_marketing` →
//!   `categories: {marketing_sms: denied, patient_surveys: denied}` (Klaviyo's
//!   marketing consent covers every bulk category of its channel);
//!   `marked_email_as_spam` → `channels.email: denied`; anything else changes nothing.
//! - The person: the event's profile (`payload.data.relationships.profile.data.id`)
//!   as the external id `klaviyo:<id>` (`external_id_prefix`), and any `email`,
//!   `$email`, `phone_number` or `$phone_number` the payload carries. Event id:
//!   `external_id`.

use super::{hmac_sha256, Inbound, Secret, Signal};
use crate::model::{Category, Channel};
use crate::optout::ConsentChange;

pub(super) const KINDS: super::Kinds = &[
    ("unsubscribed_from_email_marketing", || {
        ConsentChange::deny_categories(&[Category::MarketingEmail, Category::PatientSurveys])
    }),
    ("manually_suppressed_from_email_marketing", || {
        ConsentChange::deny_categories(&[Category::MarketingEmail, Category::PatientSurveys])
    }),
    ("unsubscribed_from_sms_marketing", || {
        ConsentChange::deny_categories(&[Category::MarketingSms, Category::PatientSurveys])
    }),
    ("marked_email_as_spam", || {
        ConsentChange::deny_channel(Channel::Email)
    }),
];

pub(super) const DEFAULT_PREFIX: &str = "klaviyo:";

pub(super) fn verify(req: &Inbound<'_>, s: &Secret) -> Result<(), &'static str> {
    let sig = req
        .header("klaviyo-signature")
        .ok_or("missing Klaviyo-Signature")?;
    let ts = req
        .header("klaviyo-timestamp")
        .ok_or("missing Klaviyo-Timestamp")?;
    let mut msg = req.body.to_vec();
    msg.extend_from_slice(ts.as_bytes());
    let want = hex::encode(hmac_sha256(&s.bytes, &msg));
    if !super::ct_eq(want.as_bytes(), sig.trim().to_ascii_lowercase().as_bytes()) {
        return Err("Klaviyo-Signature does not match");
    }
    super::fresh(ts.trim(), req.now, s.max_age, 1)?;
    let id = req
        .header("klaviyo-webhook-id")
        .ok_or("missing Klaviyo-Webhook-Id")?;
    let body: serde_json::Value =
        serde_json::from_slice(req.body).map_err(|_| "body is not JSON")?;
    match body
        .pointer("/meta/klaviyo_webhook_id")
        .and_then(|v| v.as_str())
    {
        Some(m) if m == id.trim() => Ok(()),
        _ => Err("meta.klaviyo_webhook_id does not match Klaviyo-Webhook-Id"),
    }
}

/// Strings under the given keys anywhere in `v` (bounded depth).
fn collect(v: &serde_json::Value, keys: &[&str], depth: usize, out: &mut Vec<String>) {
    if depth > 8 || out.len() > 16 {
        return;
    }
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                match x {
                    serde_json::Value::String(s) if keys.contains(&k.as_str()) => {
                        out.push(s.clone())
                    }
                    _ => collect(x, keys, depth + 1, out),
                }
            }
        }
        serde_json::Value::Array(a) => {
            for x in a {
                collect(x, keys, depth + 1, out);
            }
        }
        _ => {}
    }
}

pub(super) fn parse(req: &Inbound<'_>, s: &Secret) -> Result<Vec<Signal>, String> {
    let v: serde_json::Value =
        serde_json::from_slice(req.body).map_err(|_| "expected a JSON object".to_string())?;
    let data = v
        .get("data")
        .and_then(|d| d.as_array())
        .ok_or("data missing")?;
    let prefix = s.prefix.as_deref().unwrap_or(DEFAULT_PREFIX);
    let mut out = Vec::new();
    for (i, e) in data.iter().enumerate() {
        let topic = e
            .get("topic")
            .and_then(|t| t.as_str())
            .ok_or(format!("data[{i}].topic missing"))?;
        let kind = topic.strip_prefix("event:klaviyo.").unwrap_or(topic);
        let payload = e.get("payload").cloned().unwrap_or_default();
        let mut external_ids = Vec::new();
        if let Some(p) = payload
            .pointer("/data/relationships/profile/data/id")
            .and_then(|x| x.as_str())
        {
            external_ids.push(format!("{prefix}{p}"));
        }
        let mut emails = Vec::new();
        collect(&payload, &["email", "$email"], 0, &mut emails);
        let mut phones = Vec::new();
        collect(&payload, &["phone_number", "$phone_number"], 0, &mut phones);
        out.push(Signal {
            id: e
                .get("external_id")
                .and_then(|x| x.as_str())
                .map(str::to_string),
            kind: kind.to_string(),
            emails,
            phones,
            external_ids,
            ..Default::default()
        });
    }
    Ok(out)
}
