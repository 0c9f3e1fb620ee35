//! SendGrid v3: `POST /v3/mail/send` (one decision per recipient) and
//! `PUT /v3/marketing/contacts` (one decision per contact).
//!
//! Mail send: every `personalizations[].to[]`, `cc[]` and `bcc[]` entry is one
//! recipient, decided in payload order (personalization by personalization,
//! `to` then `cc` then `bcc`). Dropped recipients are removed; a `cc`/`bcc`
//! list left empty is removed; a personalization left with no `to` is removed
//! (SendGrid requires one), and its remaining `cc`/`bcc` recipients are then
//! reported dropped with the reason of its first dropped `to`, since they no
//! longer receive anything. `mail_settings.bypass_list_management.enable: true`
//! (and `bypass_unsubscribe_management`, which skips the same unsubscribe
//! suppressions) is refused outright: it would defeat opt-outs.

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

fn check_bypass(root: &Value) -> Result<(), BodyError> {
    // Mail settings that skip unsubscribe / list suppressions.
    for code in ["bypass_list_management", "bypass_unsubscribe_management"] {
        let on = root
            .get("mail_settings")
            .and_then(|m| m.get(code))
            .and_then(|s| s.get("enable"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        if on {
            return Err(BodyError::Forbidden {
                code,
                detail: format!("mail_settings.{code}.enable would skip unsubscribe suppressions"),
            });
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
        "none (bypass_list_management refused)"
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
