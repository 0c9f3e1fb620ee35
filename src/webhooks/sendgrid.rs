//! SendGrid Event Webhook: a JSON array of events (`event`, `email`,
//! `sg_event_id`, `timestamp`, `asm_group_id` on group events).
//!
//! - Verified the Signed Event Webhook way: ECDSA P-256 with SHA-256 over the
//!   `X-Twilio-Email-Event-Webhook-Timestamp` value followed by the raw body; the
//!   signature (`X-Twilio-Email-Event-Webhook-Signature`) is base64 of its ASN.1
//!   DER form; the public key is the one SendGrid shows for the webhook (base64
//!   DER SubjectPublicKeyInfo, or PEM), in `webhooks.sendgrid.public_key_file`.
//!   The timestamp must be within `max_age` of now.
//! - Kinds and defaults: `unsubscribe` (SendGrid then suppresses every mail to
//!   the address, account-wide) and `spamreport` → `channels.email: denied`;
//!   `group_unsubscribe` → `channels.email: denied` unless `scopes` maps its
//!   `asm_group_id` (an unmapped group could be any kind of mail);
//!   `group_resubscribe`, `bounce`, `dropped` and the rest change nothing
//!   (deliverability is not consent; a resubscribe is not a grant).
//! - The person: `email`. Event id: `sg_event_id`.

use super::{Inbound, Secret, Signal};
use crate::model::Channel;
use crate::optout::ConsentChange;
use base64::Engine as _;

pub(super) const KINDS: super::Kinds = &[
    ("unsubscribe", || {
        ConsentChange::deny_channel(Channel::Email)
    }),
    ("spamreport", || ConsentChange::deny_channel(Channel::Email)),
    ("group_unsubscribe", || {
        ConsentChange::deny_channel(Channel::Email)
    }),
    ("group_resubscribe", ConsentChange::default),
    ("bounce", ConsentChange::default),
    ("dropped", ConsentChange::default),
];

/// The DER prefix of a P-256 SubjectPublicKeyInfo (id-ecPublicKey, prime256v1,
/// BIT STRING of 66 bytes); the 65-byte uncompressed point follows.
const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];

/// The uncompressed point of SendGrid's verification key (base64 DER or PEM).
pub(super) fn public_key(text: &str) -> Result<Vec<u8>, String> {
    let b64: String = text
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect::<String>()
        .split_whitespace()
        .collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|_| "not base64 (expected the key SendGrid shows, or PEM)".to_string())?;
    match der.strip_prefix(&P256_SPKI_PREFIX[..]) {
        Some(point) if point.len() == 65 && point[0] == 4 => Ok(point.to_vec()),
        _ => Err("not an ECDSA P-256 public key".into()),
    }
}

pub(super) fn verify(req: &Inbound<'_>, s: &Secret) -> Result<(), &'static str> {
    let sig = req
        .header("x-twilio-email-event-webhook-signature")
        .ok_or("missing X-Twilio-Email-Event-Webhook-Signature")?;
    let ts = req
        .header("x-twilio-email-event-webhook-timestamp")
        .ok_or("missing X-Twilio-Email-Event-Webhook-Timestamp")?;
    let sig = base64::engine::general_purpose::STANDARD
        .decode(sig.trim())
        .map_err(|_| "signature is not base64")?;
    let key = s.ecdsa_point.as_deref().ok_or("no verification key")?;
    let mut msg = ts.as_bytes().to_vec();
    msg.extend_from_slice(req.body);
    let k = aws_lc_rs::signature::UnparsedPublicKey::new(
        &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1,
        key,
    );
    k.verify(&msg, &sig)
        .map_err(|_| "signature does not verify")?;
    super::fresh(ts.trim(), req.now, s.max_age, 1)
}

pub(super) fn parse(req: &Inbound<'_>, _: &Secret) -> Result<Vec<Signal>, String> {
    let v: serde_json::Value = serde_json::from_slice(req.body)
        .map_err(|_| "expected a JSON array of events".to_string())?;
    let events = v.as_array().ok_or("expected a JSON array of events")?;
    let mut out = Vec::new();
    for (i, e) in events.iter().enumerate() {
        let kind = e
            .get("event")
            .and_then(|x| x.as_str())
            .ok_or(format!("[{i}].event missing"))?;
        let email = e.get("email").and_then(|x| x.as_str()).unwrap_or_default();
        let scope = e.get("asm_group_id").and_then(|g| match g {
            serde_json::Value::Number(n) => Some(n.to_string()),
            serde_json::Value::String(s) => Some(s.clone()),
            _ => None,
        });
        out.push(Signal {
            id: e
                .get("sg_event_id")
                .and_then(|x| x.as_str())
                .map(str::to_string),
            kind: kind.to_string(),
            scope,
            emails: vec![email.to_string()],
            ..Default::default()
        });
    }
    Ok(out)
}
