//! SendGrid v3: `POST /v3/mail/send` (one decision per recipient) and
//! `PUT /v3/marketing/contacts` (one decision per contact).
//!
//! Mail send: every `personalizations[].to[]`, `cc[]` and `bcc[]` entry is one
//! recipient, decided in payload order (personalization by personalization,
//! `to` then `cc` then `bcc`). Dropped recipients are removed; a `cc`/`bcc`
//! list left empty is removed; a personalization left with no `to` is removed
//! (SendGrid requires one), and its remaining `cc`/`bcc` recipients are then
//! reported dropped with the reason of its first dropped `to`, since they no
//! longer receive anything. Every `mail_settings.bypass_*_management`
//! (`list`, `unsubscribe`, `spam`, `bounce`) that is on is refused outright
//! (451 naming it): each skips a suppression list, and so opt-outs. `enable`
//! is read as SendGrid may read it: `true`, `"true"` (any case), `1`, `"1"`
//! are on; anything but a clear true or false is unreadable (422).

use super::common::{self, enforce_array, enforce_json_batch, keep_as_is};
use super::{Adapter, BodyError, Enforced, EventApplied, Judge, RequestView, SyntheticOk};
use crate::decide::EventVerdict;
use crate::identify::Identifiers;
use crate::model::{Category, Channel, DestKind};
use http::Method;
use serde_json::Value;

pub(crate) struct SendGrid;

const HOSTS: [&str; 2] = ["api.sendgrid.com", "api.eu.sendgrid.com"];

fn recipient_ids(v: &Value) -> Identifiers {
    let mut ids = Identifiers::new();
    common::collect(v, &["email"], &mut ids, Identifiers::add_email);
    ids
}

fn contact_ids(v: &Value) -> Identifiers {
    let mut ids = Identifiers::new();
    common::collect(v, &["email"], &mut ids, Identifiers::add_email);
    common::collect(
        v,
        &["phone_number_id", "phone_number"],
        &mut ids,
        Identifiers::add_phone,
    );
    common::collect(v, &["external_id"], &mut ids, Identifiers::add_external);
    ids
}

/// The `mail_settings` that skip suppression lists, with what each skips.
const BYPASS: [(&str, &str); 4] = [
    (
        "bypass_list_management",
        "every unsubscribe group and suppression list",
    ),
    (
        "bypass_unsubscribe_management",
        "the global unsubscribe list",
    ),
    ("bypass_spam_management", "the spam report list"),
    ("bypass_bounce_management", "the bounce list"),
];

/// A key as a lenient decoder may match it: without case, `_` or `-`
/// (Go's `encoding/json` matches field names without case).
fn folded(k: &str) -> String {
    k.chars()
        .filter(|c| *c != '_' && *c != '-')
        .flat_map(char::to_lowercase)
        .collect()
}

/// A flag as SendGrid may read it: `Some(true)` on (`true`, `"true"` in any
/// case, `1`, `"1"`), `Some(false)` off (the same forms of false), `None`
/// for anything else (`"yes"`, `2`, an object, `null`).
fn flag(v: &Value) -> Option<bool> {
    match v {
        Value::Bool(b) => Some(*b),
        Value::Number(n) => match n.as_u64() {
            Some(1) => Some(true),
            Some(0) => Some(false),
            _ => None,
        },
        Value::String(s) if s.eq_ignore_ascii_case("true") || s == "1" => Some(true),
        Value::String(s) if s.eq_ignore_ascii_case("false") || s == "0" => Some(false),
        _ => None,
    }
}

/// Every `mail_settings.bypass_*_management` that is on refuses the request
/// (451 naming the setting); one whose `enable` is neither a clear true nor a
/// clear false is unreadable (422). Keys are matched as a lenient decoder
/// would, so `Bypass_List_Management` or `Enable` count too.
fn check_bypass(root: &Value) -> Result<(), BodyError> {
    let Value::Object(top) = root else {
        return Ok(());
    };
    for (k, settings) in top {
        if folded(k) != "mailsettings" || settings.is_null() {
            continue;
        }
        let Value::Object(settings) = settings else {
            return Err(BodyError::Unreadable(
                "`mail_settings` is not an object".into(),
            ));
        };
        for (name, setting) in settings {
            let name = folded(name);
            let Some(&(code, skips)) = BYPASS.iter().find(|(c, _)| folded(c) == name) else {
                continue;
            };
            let unclear = || {
                BodyError::Unreadable(format!(
                    "mail_settings.{code}.enable is neither true nor false"
                ))
            };
            let state = match setting {
                Value::Null => Some(false),
                Value::Object(s) => {
                    let mut enables = s.iter().filter(|(k, _)| folded(k) == "enable").peekable();
                    if enables.peek().is_none() {
                        return Err(unclear());
                    }
                    let mut on = false;
                    for (_, v) in enables {
                        on |= flag(v).ok_or_else(unclear)?;
                    }
                    Some(on)
                }
                _ => None,
            };
            match state {
                None => return Err(unclear()),
                Some(true) => {
                    return Err(BodyError::Forbidden {
                        code,
                        detail: format!(
                            "mail_settings.{code}.enable would skip {skips}, and so opt-outs"
                        ),
                    })
                }
                Some(false) => {}
            }
        }
    }
    Ok(())
}

fn enforce_mail_send(body: &[u8], judge: &mut dyn Judge) -> Result<Enforced, BodyError> {
    let mut root = common::parse_json(body)?;
    if !root.is_object() {
        return Err(BodyError::Unreadable("body is not a JSON object".into()));
    }
    check_bypass(&root)?;
    let Some(Value::Array(perss)) = root.get_mut("personalizations") else {
        return Err(BodyError::Unreadable(
            "`personalizations` is missing or not an array".into(),
        ));
    };
    let mut all = Vec::new();
    let mut changed = false;
    let mut keep_pers = Vec::with_capacity(perss.len());
    for (i, p) in perss.iter_mut().enumerate() {
        let Value::Object(obj) = p else {
            return Err(BodyError::Unreadable(format!(
                "personalizations[{i}] is not an object"
            )));
        };
        let had_to = obj
            .get("to")
            .and_then(Value::as_array)
            .is_some_and(|a| !a.is_empty());
        let mut per: Vec<EventApplied> = Vec::new();
        let mut to_drop_reason = None;
        for key in ["to", "cc", "bcc"] {
            let Some(list) = obj.get_mut(key) else {
                continue;
            };
            let Value::Array(list) = list else {
                return Err(BodyError::Unreadable(format!(
                    "personalizations[{i}].{key} is not an array"
                )));
            };
            if list.iter().any(|r| !r.is_object()) {
                return Err(BodyError::Unreadable(format!(
                    "personalizations[{i}].{key} holds a non-object recipient"
                )));
            }
            let (c, applied) = enforce_array(list, judge, &recipient_ids, &keep_as_is);
            changed |= c;
            if key == "to" {
                to_drop_reason = applied.iter().find_map(|a| match a.verdict {
                    EventVerdict::Drop(r) => Some(r),
                    EventVerdict::Keep(_) => None,
                });
            }
            if key != "to" && list.is_empty() && c {
                obj.shift_remove(key);
            }
            per.extend(applied);
        }
        let to_left = obj
            .get("to")
            .and_then(Value::as_array)
            .is_some_and(|a| !a.is_empty());
        let gone = had_to && !to_left;
        if gone {
            // The personalization goes: nobody in it receives the message.
            let reason = to_drop_reason.unwrap_or(crate::decide::Reason::UnknownPatient);
            for a in per.iter_mut().filter(|a| !a.verdict.is_drop()) {
                *a = EventApplied::new(EventVerdict::Drop(reason));
            }
        }
        keep_pers.push(!gone);
        all.extend(per);
    }
    let mut i = 0;
    perss.retain(|_| {
        let k = keep_pers[i];
        i += 1;
        k
    });
    Ok(Enforced {
        body: changed.then(|| common::to_json(&root)),
        events: all,
        query: None,
    })
}

impl Adapter for SendGrid {
    fn name(&self) -> &str {
        "sendgrid"
    }
    fn display_name(&self) -> &str {
        "SendGrid"
    }
    fn kind(&self) -> DestKind {
        DestKind::Email
    }
    fn default_category(&self) -> Category {
        Category::MarketingEmail
    }
    fn channel(&self) -> Option<Channel> {
        Some(Channel::Email)
    }
    fn matches_host(&self, host: &str) -> bool {
        HOSTS.contains(&host)
    }
    fn inspects(&self, method: &Method, path: &str) -> bool {
        let segs = common::path_segments(path);
        (*method == Method::POST && segs == ["v3", "mail", "send"])
            || (*method == Method::PUT && segs == ["v3", "marketing", "contacts"])
    }
    fn enforce(
        &self,
        req: &RequestView<'_>,
        body: &[u8],
        judge: &mut dyn Judge,
    ) -> Result<Enforced, BodyError> {
        match common::path_segments(req.path).as_slice() {
            ["v3", "marketing", "contacts"] => {
                enforce_json_batch(body, "contacts", judge, &contact_ids, &keep_as_is)
            }
            _ => enforce_mail_send(body, judge),
        }
    }
    fn synthetic_ok(&self) -> SyntheticOk {
        SyntheticOk {
            status: 202,
            body: "",
        }
    }
    fn identifier_fields(&self) -> &str {
        "personalizations[].to/cc/bcc[].email; contacts[].email/phone_number_id/external_id"
    }
    fn ldu_signal(&self) -> &str {
        "none (bypass_*_management refused)"
    }
    fn refusal_shape(&self) -> crate::refusal::Shape {
        crate::refusal::Shape::SendGrid
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::destinations::common::testkit::*;
    use serde_json::json;

    fn run(path: &str, method: Method, body: &Value) -> Result<Enforced, BodyError> {
        let store = store();
        let mut d = decider_for(&SendGrid, &store);
        let bytes = serde_json::to_vec(body).unwrap();
        SendGrid.enforce(&req(&method, "api.sendgrid.com", path), &bytes, &mut d)
    }

    #[test]
    fn sendgrid_routes() {
        assert!(SendGrid.matches_host("api.sendgrid.com"));
        assert!(!SendGrid.matches_host("sendgrid.com"));
        assert!(SendGrid.inspects(&Method::POST, "/v3/mail/send"));
        assert!(SendGrid.inspects(&Method::PUT, "/v3/marketing/contacts"));
        assert!(!SendGrid.inspects(&Method::GET, "/v3/marketing/contacts"));
        assert!(!SendGrid.inspects(&Method::POST, "/v3/templates"));
    }

    #[test]
    fn sendgrid_mail_send_mixed_batch() {
        let body = json!({
            "personalizations": [
                {"to": [{"email": "jane.roe@example.com", "name": "Jane"},
                        {"email": "deny.me@example.com"}],
                 "cc": [{"email": "unknown.person@example.com"}],
                 "dynamic_template_data": {"first": "Jane"}},
                {"to": [{"email": "email.denied.channel@example.com"}],
                 "bcc": [{"email": "Mixed.Case@Gmail.com"}]},
                {"to": [{"email": "MixedCase@gmail.com"}]}
            ],
            "from": {"email": "news@hospital.example"},
            "subject": "Flu clinic",
            "content": [{"type": "text/plain", "value": "hello"}]
        });
        let out = run("/v3/mail/send", Method::POST, &body).unwrap();
        assert_eq!(
            drops(&out.events),
            vec![false, true, true, true, true, false]
        );
        let bytes = out.body.expect("rewritten");
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        let p = v["personalizations"].as_array().unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(
            p[0]["to"],
            json!([{"email": "jane.roe@example.com", "name": "Jane"}])
        );
        assert!(p[0].get("cc").is_none());
        assert_eq!(p[1]["to"][0]["email"], "MixedCase@gmail.com");
        assert_absent(
            &bytes,
            &[
                "deny.me@example.com",
                "unknown.person@example.com",
                "email.denied.channel@example.com",
            ],
        );
    }

    #[test]
    fn sendgrid_all_granted_is_unchanged() {
        let body = json!({"personalizations": [{"to": [{"email": "jane.roe@example.com"}]}]});
        let out = run("/v3/mail/send", Method::POST, &body).unwrap();
        assert!(out.body.is_none());
        assert_eq!(drops(&out.events), vec![false]);
    }

    #[test]
    fn sendgrid_bypass_list_management_forbidden() {
        let body = json!({
            "personalizations": [{"to": [{"email": "jane.roe@example.com"}]}],
            "mail_settings": {"bypass_list_management": {"enable": true}}
        });
        match run("/v3/mail/send", Method::POST, &body) {
            Err(BodyError::Forbidden { code, .. }) => assert_eq!(code, "bypass_list_management"),
            other => panic!("expected Forbidden, got {other:?}"),
        }
        let off = json!({
            "personalizations": [{"to": [{"email": "jane.roe@example.com"}]}],
            "mail_settings": {"bypass_list_management": {"enable": false}}
        });
        assert!(run("/v3/mail/send", Method::POST, &off).is_ok());
    }

    #[test]
    fn sendgrid_bypass_flags_read_as_sendgrid_reads_them() {
        let with = |settings: Value| {
            let body = json!({
                "personalizations": [{"to": [{"email": "jane.roe@example.com"}]}],
                "mail_settings": settings
            });
            run("/v3/mail/send", Method::POST, &body)
        };
        for (code, _) in BYPASS {
            for on in [
                json!(true),
                json!("true"),
                json!("TRUE"),
                json!(1),
                json!("1"),
            ] {
                match with(json!({code: {"enable": on}})) {
                    Err(BodyError::Forbidden { code: c, .. }) => assert_eq!(c, code),
                    other => panic!("{code} = {on}: expected Forbidden, got {other:?}"),
                }
            }
            for off in [
                json!(false),
                json!("False"),
                json!(0),
                json!("0"),
                json!(null),
            ] {
                let settings = match off.is_null() {
                    true => json!({code: null}),
                    false => json!({code: {"enable": off}}),
                };
                assert!(with(settings).is_ok(), "{code} = {off}");
            }
            for unclear in [
                json!({"enable": "yes"}),
                json!({"enable": 2}),
                json!({"enable": {}}),
                json!({"enable": null}),
                json!({}),
                json!("true"),
            ] {
                assert!(
                    matches!(with(json!({code: unclear})), Err(BodyError::Unreadable(_))),
                    "{code} = {unclear}"
                );
            }
            // Keys as a case-insensitive decoder reads them.
            let upper = code.to_uppercase();
            let body = json!({"personalizations": [{"to": [{"email": "jane.roe@example.com"}]}],
                              "MAIL_SETTINGS": {upper: {"Enable": true}}});
            assert!(matches!(
                run("/v3/mail/send", Method::POST, &body),
                Err(BodyError::Forbidden { .. })
            ));
            // Two `enable` keys: on if either is.
            assert!(matches!(
                with(json!({code: {"enable": false, "ENABLE": "1"}})),
                Err(BodyError::Forbidden { .. })
            ));
        }
        assert!(matches!(
            with(json!(["bypass_list_management"])),
            Err(BodyError::Unreadable(_))
        ));
        assert!(with(json!({"sandbox_mode": {"enable": true}})).is_ok());
    }

    #[test]
    fn sendgrid_contacts_per_contact() {
        let body = json!({"list_ids": ["l1"], "contacts": [
            {"email": "jane.roe@example.com", "first_name": "Jane"},
            {"email": "deny.me@example.com", "phone_number_id": "+14155550102"},
            {"external_id": "crm:0031x00000abc"},
            {"phone_number_id": "+15555550199"}
        ]});
        let out = run("/v3/marketing/contacts", Method::PUT, &body).unwrap();
        assert_eq!(drops(&out.events), vec![false, true, false, true]);
        let bytes = out.body.unwrap();
        assert_absent(
            &bytes,
            &["deny.me@example.com", "+14155550102", "+15555550199"],
        );
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["contacts"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn sendgrid_malformed_is_unreadable() {
        let store = store();
        let mut d = decider_for(&SendGrid, &store);
        let r = req(&Method::POST, "api.sendgrid.com", "/v3/mail/send");
        for bad in [
            &b"{not json"[..],
            br#"{"personalizations": {}}"#,
            br#"{"personalizations": [{"to": "a@b.c"}]}"#,
            br#"[]"#,
        ] {
            assert!(matches!(
                SendGrid.enforce(&r, bad, &mut d),
                Err(BodyError::Unreadable(_))
            ));
        }
        let e = SendGrid.enforce(
            &r,
            br#"{"personalizations": [{"to": "secret@x.com"}]}"#,
            &mut d,
        );
        let Err(BodyError::Unreadable(msg)) = e else {
            panic!()
        };
        assert!(!msg.contains("secret"));
    }
}
