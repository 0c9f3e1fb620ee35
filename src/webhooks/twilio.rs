//! Twilio inbound messages (the number's or Messaging Service's "A message
//! comes in" webhook): form-encoded `From`, `Body`, `MessageSid`,
//! `MessagingServiceSid` and, with Advanced Opt-Out, `OptOutType` (`STOP`,
//! `START`, `HELP`).
//!
//! - Verified by `X-Twilio-Signature`: base64 HMAC-SHA1 under the account's auth
//!   token of the URL Twilio called followed by every POST parameter, sorted by
//!   name, as name and value with nothing between. A JSON body is signed through
//!   the URL's `bodySHA256` parameter (SHA-256 of the body, hex) instead.
//! - Kinds: `stop` (`OptOutType=STOP`, or without it a whole-body, case-
//!   insensitive STOP, STOPALL, UNSUBSCRIBE, CANCEL, END, QUIT, REVOKE, OPTOUT),
//!   `start` (START, YES, UNSTOP), `help` (HELP, INFO), `message` (anything else).
//! - Defaults: `stop` → `channels.sms: denied` (Twilio itself then blocks every
//!   message from that sender, reminders included); `start` changes nothing (a
//!   re-opt-in to Twilio's sender is not consent to every category: map it, e.g.
//!   `start: {channels: {sms: null}}`, to lift the channel denial); the rest is ignored.
//! - The person: `From` (a phone). Event id: `MessageSid`. Scope: `MessagingServiceSid`.

use super::{form_pairs, hmac_sha1_b64, Inbound, Secret, Signal};
use crate::model::Channel;
use crate::optout::ConsentChange;

pub(super) const KINDS: super::Kinds = &[
    ("stop", || ConsentChange::deny_channel(Channel::Sms)),
    ("start", ConsentChange::default),
    ("help", ConsentChange::default),
    ("message", ConsentChange::default),
];

const STOP: &[&str] = &[
    "STOP",
    "STOPALL",
    "UNSUBSCRIBE",
    "CANCEL",
    "END",
    "QUIT",
    "REVOKE",
    "OPTOUT",
];
const START: &[&str] = &["START", "YES", "UNSTOP"];
const HELP: &[&str] = &["HELP", "INFO"];

pub(super) fn verify(req: &Inbound<'_>, s: &Secret) -> Result<(), &'static str> {
    let sig = req
        .header("x-twilio-signature")
        .ok_or("missing X-Twilio-Signature")?;
    let json = req
        .header("content-type")
        .is_some_and(|c| c.to_ascii_lowercase().starts_with("application/json"));
    let mut data = req.url.to_string();
    if json {
        let want = url::Url::parse(req.url)
            .ok()
            .and_then(|u| {
                u.query_pairs()
                    .find(|(k, _)| k == "bodySHA256")
                    .map(|(_, v)| v.into_owned())
            })
            .ok_or("a JSON body needs the bodySHA256 URL parameter")?;
        let got = crate::identify::sha256_hex(req.body);
        if !super::ct_eq(want.to_ascii_lowercase().as_bytes(), got.as_bytes()) {
            return Err("bodySHA256 does not match the body");
        }
    } else {
        let mut pairs = form_pairs(req.body);
        pairs.sort();
        for (k, v) in pairs {
            data.push_str(&k);
            data.push_str(&v);
        }
    }
    let want = hmac_sha1_b64(&s.bytes, data.as_bytes());
    if super::ct_eq(want.as_bytes(), sig.trim().as_bytes()) {
        Ok(())
    } else {
        Err("X-Twilio-Signature does not match")
    }
}

pub(super) fn parse(req: &Inbound<'_>, _: &Secret) -> Result<Vec<Signal>, String> {
    let pairs = form_pairs(req.body);
    let get = |k: &str| {
        pairs
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.trim().to_string())
    };
    let from = get("From").ok_or("From missing")?;
    let kind = match get("OptOutType").map(|t| t.to_ascii_uppercase()).as_deref() {
        Some("STOP") => "stop",
        Some("START") => "start",
        Some("HELP") => "help",
        _ => {
            let body = get("Body").unwrap_or_default().to_ascii_uppercase();
            if STOP.contains(&body.as_str()) {
                "stop"
            } else if START.contains(&body.as_str()) {
                "start"
            } else if HELP.contains(&body.as_str()) {
                "help"
            } else {
                "message"
            }
        }
    };
    Ok(vec![Signal {
        id: get("MessageSid").or_else(|| get("SmsSid")),
        kind: kind.to_string(),
        scope: get("MessagingServiceSid"),
        phones: vec![from],
        ..Default::default()
    }])
}
