//! Braze REST API (`rest.{instance}.braze.com`, `*.braze.eu`).
//!
//! - `POST /users/track`: every `attributes[]`, `events[]` and `purchases[]`
//!   object is one event (decided in that order). Identifiers: `external_id`
//!   (taken both as an external id and as a patient id), `email`, `phone`;
//!   `braze_id` and `user_alias` name no patient we can check, so an object
//!   carrying only those is an unknown patient and is dropped. An array left
//!   empty is removed.
//! - `POST /messages/send`: every `external_user_ids[]` entry is one recipient
//!   (external id and patient id). `user_aliases[]` entries are recipients
//!   with no checkable identity (dropped as unknown). A send addressed to a
//!   `segment_id`, an `audience` or a `broadcast` cannot be enforced per
//!   recipient and is refused (`unenforceable_audience`, 451).
//!
//! Category: `marketing_email` by default for both endpoints, with no channel
//! (Braze sends email, SMS and push alike); an app sending SMS through Braze
//! names `X-Consent-Category: marketing_sms` per request.

use super::common::{self, enforce_array, keep_as_is};
use super::{Adapter, BodyError, Enforced, EventApplied, Judge, RequestView, SyntheticOk};
use crate::identify::Identifiers;
use crate::model::{Category, DestKind};
use http::Method;
use serde_json::Value;

pub(crate) struct Braze;

fn user_ids(v: &Value) -> Identifiers {
    let mut ids = Identifiers::new();
    for x in common::strings_at(v, "external_id") {
        ids.add_external(&x);
        ids.add_patient(&x);
    }
    common::collect(v, &["email"], &mut ids, Identifiers::add_email);
    common::collect(v, &["phone"], &mut ids, Identifiers::add_phone);
    ids
}

fn recipient_ids(v: &Value) -> Identifiers {
    let mut ids = Identifiers::new();
    if let Some(x) = v.as_str() {
        ids.add_external(x);
        ids.add_patient(x);
    }
    ids
}

fn enforce_track(body: &[u8], judge: &mut dyn Judge) -> Result<Enforced, BodyError> {
    let mut root = common::parse_json(body)?;
    let Value::Object(obj) = &mut root else {
        return Err(BodyError::Unreadable("body is not a JSON object".into()));
    };
    let mut events: Vec<EventApplied> = Vec::new();
    let mut changed = false;
    let mut any = false;
    for key in ["attributes", "events", "purchases"] {
        let Some(list) = obj.get_mut(key) else {
            continue;
        };
        let Value::Array(list) = list else {
            return Err(BodyError::Unreadable(format!("`{key}` is not an array")));
        };
        if list.iter().any(|x| !x.is_object()) {
            return Err(BodyError::Unreadable(format!(
                "`{key}` holds a non-object entry"
            )));
        }
        any = true;
        let (c, applied) = enforce_array(list, judge, &user_ids, &keep_as_is);
        if c && list.is_empty() {
            obj.shift_remove(key);
        }
        changed |= c;
        events.extend(applied);
    }
    if !any {
        return Err(BodyError::Unreadable(
            "none of `attributes`, `events`, `purchases` present".into(),
        ));
    }
    Ok(Enforced {
        body: changed.then(|| common::to_json(&root)),
        events,
    })
}

fn enforce_send(body: &[u8], judge: &mut dyn Judge) -> Result<Enforced, BodyError> {
    let mut root = common::parse_json(body)?;
    let Value::Object(obj) = &mut root else {
        return Err(BodyError::Unreadable("body is not a JSON object".into()));
    };
    for key in ["segment_id", "audience", "broadcast"] {
        let set = match obj.get(key) {
            None | Some(Value::Null) | Some(Value::Bool(false)) => false,
            Some(Value::String(s)) => !s.is_empty(),
            Some(_) => true,
        };
        if set {
            return Err(BodyError::Forbidden {
                code: "unenforceable_audience",
                detail: format!("`{key}` addresses recipients that cannot be checked one by one"),
            });
        }
    }
    let mut events = Vec::new();
    let mut changed = false;
    let mut any = false;
    for key in ["external_user_ids", "user_aliases"] {
        let Some(list) = obj.get_mut(key) else {
            continue;
        };
        let Value::Array(list) = list else {
            return Err(BodyError::Unreadable(format!("`{key}` is not an array")));
        };
        if key == "external_user_ids" && list.iter().any(|x| !x.is_string()) {
            return Err(BodyError::Unreadable(
                "`external_user_ids` holds a non-string entry".into(),
            ));
        }
        any = true;
        let (c, applied) = enforce_array(list, judge, &recipient_ids, &keep_as_is);
        if c && list.is_empty() {
            obj.shift_remove(key);
        }
        changed |= c;
        events.extend(applied);
    }
    if !any {
        return Err(BodyError::Unreadable(
            "no `external_user_ids` or `user_aliases` recipients".into(),
        ));
    }
    Ok(Enforced {
        body: changed.then(|| common::to_json(&root)),
        events,
    })
}

impl Adapter for Braze {
    fn name(&self) -> &str {
        "braze"
    }
    fn display_name(&self) -> &str {
        "Braze"
    }
    fn kind(&self) -> DestKind {
        DestKind::Email
    }
    fn default_category(&self) -> Category {
        Category::MarketingEmail
    }
    fn matches_host(&self, host: &str) -> bool {
        host.strip_prefix("rest.")
            .is_some_and(|rest| common::host_matches("*.braze.com", rest))
            || common::host_matches("*.braze.eu", host)
    }
    fn inspects(&self, method: &Method, path: &str) -> bool {
        *method == Method::POST
            && matches!(
                common::path_segments(path).as_slice(),
                ["users", "track"] | ["messages", "send"]
            )
    }
    fn enforce(
        &self,
        req: &RequestView<'_>,
        body: &[u8],
        judge: &mut dyn Judge,
    ) -> Result<Enforced, BodyError> {
        match common::path_segments(req.path).as_slice() {
            ["messages", "send"] => enforce_send(body, judge),
            _ => enforce_track(body, judge),
        }
    }
    fn synthetic_ok(&self) -> SyntheticOk {
        SyntheticOk {
            status: 200,
            body: r#"{"message":"success"}"#,
        }
    }
    fn identifier_fields(&self) -> &str {
        "external_id, email, phone; external_user_ids[]"
    }
    fn ldu_signal(&self) -> &str {
        "none (segment/audience/broadcast sends refused)"
    }
    fn refusal_shape(&self) -> crate::refusal::Shape {
        crate::refusal::Shape::Braze
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::destinations::common::testkit::*;
    use serde_json::json;

    const HOST: &str = "rest.iad-01.braze.com";

    fn run(path: &str, body: &Value) -> Result<Enforced, BodyError> {
        let store = store();
        let mut d = decider_for(&Braze, &store);
        let bytes = serde_json::to_vec(body).unwrap();
        Braze.enforce(&req(&Method::POST, HOST, path), &bytes, &mut d)
    }

    #[test]
    fn braze_routes() {
        assert!(Braze.matches_host("rest.iad-01.braze.com"));
        assert!(Braze.matches_host("rest.fra-01.braze.eu"));
        assert!(!Braze.matches_host("rest.braze.com"));
        assert!(!Braze.matches_host("dashboard-01.braze.com"));
        assert!(!Braze.matches_host("braze.eu"));
        assert!(Braze.inspects(&Method::POST, "/users/track"));
        assert!(Braze.inspects(&Method::POST, "/messages/send"));
        assert!(!Braze.inspects(&Method::GET, "/users/track"));
        assert!(!Braze.inspects(&Method::POST, "/users/export/ids"));
    }

    #[test]
    fn braze_users_track_mixed() {
        let body = json!({
            "attributes": [
                {"external_id": "braze:1020", "first_name": "S"},
                {"email": "deny.me@example.com", "phone": "+14155550102", "home_city": "SF"},
                {"user_alias": {"alias_name": "a1", "alias_label": "crm"}, "email": "unknown.person@example.com"}
            ],
            "events": [
                {"external_id": "P-1001", "name": "booked_consult", "time": "2026-11-20T10:00:00Z"},
                {"email": "email.denied.channel@example.com", "name": "viewed", "time": "2026-11-20T10:00:00Z"}
            ],
            "purchases": [
                {"braze_id": "b-1", "product_id": "x", "currency": "USD", "price": 1, "time": "2026-11-20T10:00:00Z"}
            ]
        });
        let out = run("/users/track", &body).unwrap();
        // P-1009: email channel denied, but Braze sets no channel → kept.
        assert_eq!(
            drops(&out.events),
            vec![false, true, true, false, false, true]
        );
        let bytes = out.body.unwrap();
        assert_absent(
            &bytes,
            &[
                "deny.me@example.com",
                "+14155550102",
                "unknown.person@example.com",
            ],
        );
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["attributes"].as_array().unwrap().len(), 1);
        assert_eq!(v["events"].as_array().unwrap().len(), 2);
        assert!(v.get("purchases").is_none());
    }

    #[test]
    fn braze_messages_send() {
        let body = json!({
            "external_user_ids": ["P-1001", "crm:0031x00000den", "nobody-1"],
            "messages": {"email": {"app_id": "a", "subject": "Hi", "body": "<p>x</p>"}}
        });
        let out = run("/messages/send", &body).unwrap();
        assert_eq!(drops(&out.events), vec![false, true, true]);
        let v: Value = serde_json::from_slice(&out.body.unwrap()).unwrap();
        assert_eq!(v["external_user_ids"], json!(["P-1001"]));
        let seg = json!({"segment_id": "seg", "messages": {"email": {}}});
        assert!(matches!(
            run("/messages/send", &seg),
            Err(BodyError::Forbidden {
                code: "unenforceable_audience",
                ..
            })
        ));
        let all_ok = json!({"external_user_ids": ["crm:0031x00000abc"], "broadcast": false});
        let out = run("/messages/send", &all_ok).unwrap();
        assert!(out.body.is_none());
    }

    #[test]
    fn braze_malformed_is_unreadable() {
        for (path, bad) in [
            ("/users/track", json!({"attributes": {}})),
            ("/users/track", json!({"attributes": ["x"]})),
            ("/users/track", json!({})),
            ("/messages/send", json!({"external_user_ids": [1]})),
            ("/messages/send", json!([])),
        ] {
            assert!(matches!(run(path, &bad), Err(BodyError::Unreadable(_))));
        }
        let store = store();
        let mut d = decider_for(&Braze, &store);
        assert!(matches!(
            Braze.enforce(&req(&Method::POST, HOST, "/users/track"), b"{x", &mut d),
            Err(BodyError::Unreadable(_))
        ));
    }
}
