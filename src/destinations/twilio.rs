//! Twilio Programmable Messaging and Voice (`api.twilio.com`, form-encoded):
//! two destinations sharing one parser.
//!
//! - `twilio_sms`: `POST /2010-04-01/Accounts/{sid}/Messages.json`
//!   (category `marketing_sms`, channel `sms`).
//! - `twilio_voice`: `POST /2010-04-01/Accounts/{sid}/Calls.json`
//!   (category `phone_outreach`, channel `voice`).
//!
//! Exactly one event per request: the `To` recipient (E.164, or
//! `whatsapp:+…`). Kept: the body goes out byte for byte. Dropped: the request
//! is blocked by the caller. A missing, repeated or non-phone `To` is
//! unreadable (a `client:`/`sip:` target names no patient we can check).
//!
//! Both share the host: a router must choose between them by `inspects`
//! (host alone is ambiguous).

use super::common;
use super::{Adapter, BodyError, Enforced, Judge, RequestView, SyntheticOk};
use crate::identify::{self, Identifiers};
use crate::model::{Category, Channel, DestKind};
use http::Method;

const HOST: &str = "api.twilio.com";

/// Whether `path` is `/2010-04-01/Accounts/{sid}/{resource}`, with or without
/// the `.json` (or `.xml`) Twilio also answers to, and for messages the legacy
/// `/SMS/Messages` form: every path Twilio creates the resource at.
fn is_resource(path: &str, resource: &str) -> bool {
    let base = resource.trim_end_matches(".json");
    let named = |r: &str| {
        let r = r
            .strip_suffix(".json")
            .or_else(|| r.strip_suffix(".xml"))
            .unwrap_or(r);
        r == base
    };
    match common::path_segments(path).as_slice() {
        ["2010-04-01", "Accounts", sid, r] => !sid.is_empty() && named(r),
        ["2010-04-01", "Accounts", sid, "SMS", r] => {
            !sid.is_empty() && base == "Messages" && named(r)
        }
        _ => false,
    }
}

/// The one recipient of a Messages/Calls create request.
fn enforce_to(
    req: &RequestView<'_>,
    body: &[u8],
    judge: &mut dyn Judge,
) -> Result<Enforced, BodyError> {
    if let Some(ct) = req.content_type {
        if ct != "application/x-www-form-urlencoded" {
            return Err(BodyError::Unreadable(
                "expected an application/x-www-form-urlencoded body".into(),
            ));
        }
    }
    let pairs = common::parse_form(body);
    let mut to = pairs.iter().filter(|(k, _)| k == "To").map(|(_, v)| v);
    let (Some(first), None) = (to.next(), to.next()) else {
        return Err(BodyError::Unreadable(
            "`To` missing (or given more than once)".into(),
        ));
    };
    if identify::normalize_phone(first).is_none() {
        return Err(BodyError::Unreadable("`To` is not a phone number".into()));
    }
    let mut ids = Identifiers::new();
    ids.add_phone(first);
    Ok(common::enforce_single(&ids, judge))
}

const SYNTHETIC: SyntheticOk = SyntheticOk {
    status: 201,
    body: r#"{"sid":null,"status":"queued"}"#,
};

/// A Twilio REST resource that creates one message or call per request. The
/// two built-ins differ only in resource, category and channel.
pub(crate) struct Twilio {
    name: &'static str,
    display_name: &'static str,
    kind: DestKind,
    category: Category,
    channel: Channel,
    resource: &'static str,
}

/// `twilio_sms`: Programmable Messaging (SMS, MMS, WhatsApp).
pub(crate) const SMS: Twilio = Twilio {
    name: "twilio_sms",
    display_name: "Twilio Messaging",
    kind: DestKind::Sms,
    category: Category::MarketingSms,
    channel: Channel::Sms,
    resource: "Messages.json",
};

/// `twilio_voice`: Programmable Voice outbound calls.
pub(crate) const VOICE: Twilio = Twilio {
    name: "twilio_voice",
    display_name: "Twilio Voice",
    kind: DestKind::Voice,
    category: Category::PhoneOutreach,
    channel: Channel::Voice,
    resource: "Calls.json",
};

impl Adapter for Twilio {
    fn name(&self) -> &str {
        self.name
    }
    fn display_name(&self) -> &str {
        self.display_name
    }
    fn kind(&self) -> DestKind {
        self.kind
    }
    fn default_category(&self) -> Category {
        self.category
    }
    fn channel(&self) -> Option<Channel> {
        Some(self.channel)
    }
    fn matches_host(&self, host: &str) -> bool {
        host == HOST
    }
    fn inspects(&self, method: &Method, path: &str) -> bool {
        *method == Method::POST && is_resource(path, self.resource)
    }
    fn enforce(
        &self,
        req: &RequestView<'_>,
        body: &[u8],
        judge: &mut dyn Judge,
    ) -> Result<Enforced, BodyError> {
        enforce_to(req, body, judge)
    }
    fn synthetic_ok(&self) -> SyntheticOk {
        SYNTHETIC
    }
    fn identifier_fields(&self) -> &str {
        "To (form field)"
    }
    fn ldu_signal(&self) -> &str {
        "none"
    }
    fn refusal_shape(&self) -> crate::refusal::Shape {
        crate::refusal::Shape::Twilio
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::{EventVerdict, Reason};
    use crate::destinations::common::testkit::*;

    const SMS_PATH: &str = "/2010-04-01/Accounts/AC0123456789abcdef/Messages.json";
    const CALL_PATH: &str = "/2010-04-01/Accounts/AC0123456789abcdef/Calls.json";

    fn form_req<'a>(m: &'a Method, path: &'a str) -> RequestView<'a> {
        RequestView {
            content_type: Some("application/x-www-form-urlencoded"),
            ..req(m, HOST, path)
        }
    }

    fn sms_body(to: &str) -> Vec<u8> {
        common::encode_form(&[
            ("To".into(), to.into()),
            ("From".into(), "+15005550006".into()),
            ("Body".into(), "Your flu shot is due".into()),
        ])
    }

    #[test]
    fn twilio_routes() {
        assert!(SMS.matches_host("api.twilio.com"));
        assert!(SMS.inspects(&Method::POST, SMS_PATH));
        assert!(!SMS.inspects(&Method::POST, CALL_PATH));
        assert!(!SMS.inspects(&Method::GET, SMS_PATH));
        assert!(VOICE.inspects(&Method::POST, CALL_PATH));
        assert!(!VOICE.inspects(&Method::POST, SMS_PATH));
        assert!(!SMS.inspects(&Method::POST, "/2010-04-01/Accounts/AC1/Messages/SM1.json"));
        assert_eq!(SMS.synthetic_ok().status, 201);
    }

    /// Two destinations share `api.twilio.com`: the router must pick the one
    /// whose `inspects` accepts the path; exactly one does for each resource.
    #[test]
    fn twilio_shared_host_is_split_by_path() {
        let all = crate::destinations::builtins();
        for path in [SMS_PATH, CALL_PATH] {
            let hits: Vec<&str> = all
                .iter()
                .filter(|a| a.matches_host(HOST) && a.inspects(&Method::POST, path))
                .map(|a| a.name())
                .collect();
            assert_eq!(hits.len(), 1, "{path}: {hits:?}");
        }
    }

    #[test]
    fn twilio_sms_channel_denied_drops() {
        let store = store();
        let mut d = decider_for(&SMS, &store);
        let m = Method::POST;
        let out = SMS
            .enforce(&form_req(&m, SMS_PATH), &sms_body("+14155550106"), &mut d)
            .unwrap();
        assert_eq!(out.events.len(), 1);
        assert!(out.events[0].verdict.is_drop());
        assert!(out.body.is_none());
        // Even a granted category (reminders) cannot use the denied channel.
        let mut rem = decider(
            &store,
            Category::AppointmentReminders,
            SMS.channel(),
            SMS.kind(),
        );
        let out = SMS
            .enforce(&form_req(&m, SMS_PATH), &sms_body("+14155550106"), &mut rem)
            .unwrap();
        assert_eq!(
            out.events[0].verdict,
            EventVerdict::Drop(Reason::ChannelDenied)
        );
        // marketing_sms granted (P-1020) → kept; WhatsApp form accepted.
        let out = SMS
            .enforce(
                &form_req(&m, SMS_PATH),
                &sms_body("whatsapp:+14155550120"),
                &mut d,
            )
            .unwrap();
        assert_eq!(drops(&out.events), vec![false]);
        // unknown number
        let out = SMS
            .enforce(&form_req(&m, SMS_PATH), &sms_body("+15555550199"), &mut d)
            .unwrap();
        assert_eq!(
            out.events[0].verdict,
            EventVerdict::Drop(Reason::UnknownPatient)
        );
    }

    #[test]
    fn twilio_sms_reminder_category_keeps_unchanged() {
        let store = store();
        let mut d = decider(
            &store,
            Category::AppointmentReminders,
            SMS.channel(),
            SMS.kind(),
        );
        let m = Method::POST;
        let out = SMS
            .enforce(
                &form_req(&m, SMS_PATH),
                &sms_body("+1 (415) 555-0107"),
                &mut d,
            )
            .unwrap();
        assert_eq!(drops(&out.events), vec![false]);
        assert!(out.body.is_none());
        // ...but marketing_sms (default for P-1007: denied) drops.
        let mut d = decider_for(&SMS, &store);
        let out = SMS
            .enforce(&form_req(&m, SMS_PATH), &sms_body("+14155550107"), &mut d)
            .unwrap();
        assert_eq!(
            out.events[0].verdict,
            EventVerdict::Drop(Reason::ConsentDenied)
        );
    }

    #[test]
    fn twilio_voice_channel() {
        let store = store();
        let mut d = decider_for(&VOICE, &store);
        let m = Method::POST;
        let call = |to: &str| {
            common::encode_form(&[
                ("To".into(), to.into()),
                ("From".into(), "+15005550006".into()),
                (
                    "Twiml".into(),
                    "<Response><Say>Hello</Say></Response>".into(),
                ),
            ])
        };
        let ok = VOICE
            .enforce(&form_req(&m, CALL_PATH), &call("+13125550110"), &mut d)
            .unwrap();
        assert_eq!(drops(&ok.events), vec![false]);
        assert!(ok.body.is_none());
        let no = VOICE
            .enforce(&form_req(&m, CALL_PATH), &call("+13125550111"), &mut d)
            .unwrap();
        assert_eq!(
            no.events[0].verdict,
            EventVerdict::Drop(Reason::ChannelDenied)
        );
    }

    #[test]
    fn twilio_malformed_is_unreadable() {
        let store = store();
        let mut d = decider_for(&SMS, &store);
        let m = Method::POST;
        for bad in [
            &b"From=%2B15005550006&Body=hi"[..],
            b"To=&Body=hi",
            b"To=client%3Ajane&Body=hi",
            b"To=%2B14155550100&To=%2B14155550102",
        ] {
            let Err(BodyError::Unreadable(msg)) = SMS.enforce(&form_req(&m, SMS_PATH), bad, &mut d)
            else {
                panic!("expected Unreadable")
            };
            assert!(!msg.contains("jane") && !msg.contains("415"));
        }
        let json = RequestView {
            content_type: Some("application/json"),
            ..form_req(&m, SMS_PATH)
        };
        assert!(matches!(
            SMS.enforce(&json, br#"{"To":"+14155550100"}"#, &mut d),
            Err(BodyError::Unreadable(_))
        ));
    }
}
