//! Mailchimp Transactional (Mandrill): `POST /api/1.{0-3}/messages/send`,
//! `/messages/send-template` and `/messages/send-mc-template`, with or without
//! the `.json` suffix (the official SDKs call `/api/1.3/....json`). `send-raw`
//! (recipients inside a MIME message) is not inspected, so it is refused.
//!
//! One decision per `message.to[]` recipient. A dropped recipient is removed
//! from `message.to[]` and its entries in `message.merge_vars[]` and
//! `message.recipient_metadata[]` (matched by `rcpt`, case-insensitively) go
//! with it, so no per-recipient data of a dropped patient leaves.

use super::common::{self, enforce_array, keep_as_is};
use super::{Adapter, BodyError, Enforced, Judge, RequestView, SyntheticOk};
use crate::identify::{self, Identifiers};
use crate::model::{Category, Channel, DestKind};
use http::Method;
use serde_json::Value;

pub(crate) struct Mandrill;

fn recipient_ids(v: &Value) -> Identifiers {
    let mut ids = Identifiers::new();
    common::collect(v, &["email"], &mut ids, Identifiers::add_email);
    ids
}

fn rcpt_key(v: &Value) -> Option<String> {
    v.as_str()
        .map(|s| identify::normalize_email(s).unwrap_or_else(|| s.trim().to_lowercase()))
}

impl Adapter for Mandrill {
    fn name(&self) -> &str {
        "mandrill"
    }
    fn display_name(&self) -> &str {
        "Mailchimp Transactional (Mandrill)"
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
        host == "mandrillapp.com"
    }
    fn inspects(&self, method: &Method, path: &str) -> bool {
        let call = |c: &str| {
            matches!(
                c.strip_suffix(".json").unwrap_or(c),
                "send" | "send-template" | "send-mc-template"
            )
        };
        *method == Method::POST
            && matches!(
                common::path_segments(path).as_slice(),
                ["api", "1.0" | "1.1" | "1.2" | "1.3", "messages", c] if call(c)
            )
    }
    fn enforce(
        &self,
        _req: &RequestView<'_>,
        body: &[u8],
        judge: &mut dyn Judge,
    ) -> Result<Enforced, BodyError> {
        let mut root = common::parse_json(body)?;
        let Some(Value::Object(msg)) = root.get_mut("message") else {
            return Err(BodyError::Unreadable(
                "`message` is missing or not an object".into(),
            ));
        };
        let Some(Value::Array(to)) = msg.get_mut("to") else {
            return Err(BodyError::Unreadable(
                "`message.to` is missing or not an array".into(),
            ));
        };
        if to.iter().any(|r| !r.is_object()) {
            return Err(BodyError::Unreadable(
                "`message.to` holds a non-object recipient".into(),
            ));
        }
        let before: Vec<Option<String>> = to.iter().map(|r| rcpt_key(&r["email"])).collect();
        let (changed, applied) = enforce_array(to, judge, &recipient_ids, &keep_as_is);
        if changed {
            let kept: Vec<Option<String>> = to.iter().map(|r| rcpt_key(&r["email"])).collect();
            let dropped: Vec<String> = before
                .into_iter()
                .flatten()
                .filter(|e| !kept.iter().flatten().any(|k| k == e))
                .collect();
            for key in ["merge_vars", "recipient_metadata"] {
                if let Some(Value::Array(list)) = msg.get_mut(key) {
                    list.retain(
                        |entry| !matches!(rcpt_key(&entry["rcpt"]), Some(r) if dropped.contains(&r)),
                    );
                }
            }
        }
        Ok(Enforced {
            body: changed.then(|| common::to_json(&root)),
            events: applied,
            query: None,
        })
    }
    fn synthetic_ok(&self) -> SyntheticOk {
        SyntheticOk {
            status: 200,
            body: "[]",
        }
    }
    fn identifier_fields(&self) -> &str {
        "message.to[].email (merge_vars[]/recipient_metadata[].rcpt follow)"
    }
    fn ldu_signal(&self) -> &str {
        "none"
    }
    fn refusal_shape(&self) -> crate::refusal::Shape {
        crate::refusal::Shape::Mandrill
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::destinations::common::testkit::*;
    use serde_json::json;

    fn run(path: &str, body: &[u8]) -> Result<Enforced, BodyError> {
        let store = store();
        let mut d = decider_for(&Mandrill, &store);
        Mandrill.enforce(&req(&Method::POST, "mandrillapp.com", path), body, &mut d)
    }

    #[test]
    fn mandrill_routes() {
        assert!(Mandrill.matches_host("mandrillapp.com"));
        for p in [
            "/api/1.0/messages/send",
            "/api/1.0/messages/send.json",
            "/api/1.0/messages/send-template",
            "/api/1.0/messages/send-template.json",
        ] {
            assert!(Mandrill.inspects(&Method::POST, p), "{p}");
        }
        assert!(!Mandrill.inspects(&Method::POST, "/api/1.0/users/ping"));
        assert!(!Mandrill.inspects(&Method::GET, "/api/1.0/messages/send"));
    }

    #[test]
    fn mandrill_send_template_mixed() {
        let body = json!({
            "key": "k",
            "template_name": "flu",
            "template_content": [],
            "message": {
                "subject": "Flu shots",
                "to": [
                    {"email": "jane.roe@example.com", "name": "Jane", "type": "to"},
                    {"email": "Deny.Me@example.com", "type": "cc"},
                    {"email": "unknown.person@example.com", "type": "bcc"},
                    {"email": "email.denied.channel@example.com"}
                ],
                "merge_vars": [
                    {"rcpt": "jane.roe@example.com", "vars": [{"name": "FNAME", "content": "Jane"}]},
                    {"rcpt": "deny.me@example.com", "vars": [{"name": "FNAME", "content": "D"}]},
                    {"rcpt": "unknown.person@example.com", "vars": []}
                ],
                "recipient_metadata": [
                    {"rcpt": "email.denied.channel@example.com", "values": {"mrn": "7"}},
                    {"rcpt": "jane.roe@example.com", "values": {"mrn": "1"}}
                ]
            }
        });
        let out = run(
            "/api/1.0/messages/send-template.json",
            &serde_json::to_vec(&body).unwrap(),
        )
        .unwrap();
        assert_eq!(drops(&out.events), vec![false, true, true, true]);
        let bytes = out.body.unwrap();
        assert_absent(
            &bytes,
            &[
                "deny.me@example.com",
                "unknown.person@example.com",
                "email.denied.channel@example.com",
            ],
        );
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["message"]["to"].as_array().unwrap().len(), 1);
        assert_eq!(v["message"]["merge_vars"].as_array().unwrap().len(), 1);
        assert_eq!(
            v["message"]["recipient_metadata"].as_array().unwrap().len(),
            1
        );
    }

    #[test]
    fn mandrill_all_kept_unchanged() {
        let body = br#"{"message":{"to":[{"email":"jane.roe@example.com"}],"html":"<p>hi</p>"}}"#;
        let out = run("/api/1.0/messages/send", body).unwrap();
        assert!(out.body.is_none());
        assert_eq!(drops(&out.events), vec![false]);
    }

    #[test]
    fn mandrill_malformed_is_unreadable() {
        for bad in [
            &b"{"[..],
            br#"{"message":[]}"#,
            br#"{"message":{"to":{}}}"#,
            br#"{"message":{"to":["a@b.c"]}}"#,
        ] {
            assert!(matches!(
                run("/api/1.0/messages/send", bad),
                Err(BodyError::Unreadable(_))
            ));
        }
    }
}
