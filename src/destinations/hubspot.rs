//! HubSpot CRM contacts (`api.hubapi.com`).
//!
//! - `POST /crm/v3/objects/contacts` (and the dated `/crm/objects/{YYYY-MM}/contacts`):
//!   one contact, `properties.*`.
//! - `PATCH /crm/v3/objects/contacts/{id}`: one contact update.
//! - `POST …/contacts/batch/create|update|upsert`: one decision per `inputs[]`.
//!
//! Identifiers: `properties.email`, `properties.phone`, `properties.mobilephone`,
//! and the input's `id` (or the path's `{id}`): an email when it holds an `@`
//! (the `idProperty=email` form), otherwise an external id.

use super::common::{self, keep_as_is};
use super::{Adapter, BodyError, Enforced, Judge, RequestView, SyntheticOk};
use crate::identify::Identifiers;
use crate::model::{Category, DestKind};
use http::Method;
use serde_json::Value;

pub(crate) struct HubSpot;

fn add_id(ids: &mut Identifiers, id: &str) {
    if id.contains('@') {
        ids.add_email(id);
    } else {
        ids.add_external(id);
    }
}

fn contact_ids(v: &Value) -> Identifiers {
    let mut ids = Identifiers::new();
    common::collect(v, &["properties.email"], &mut ids, Identifiers::add_email);
    common::collect(
        v,
        &["properties.phone", "properties.mobilephone"],
        &mut ids,
        Identifiers::add_phone,
    );
    for id in common::strings_at(v, "id") {
        add_id(&mut ids, &id);
    }
    ids
}

enum Route<'a> {
    Single(Option<&'a str>),
    Batch,
}

/// The contacts path after the API version: `crm/v3/objects/contacts/...` or
/// `crm/objects/2026-03/contacts/...`.
fn route<'a>(method: &Method, path: &'a str) -> Option<Route<'a>> {
    let segs = common::path_segments(path);
    let rest: &[&str] = match segs.as_slice() {
        ["crm", "v3", "objects", "contacts", rest @ ..] => rest,
        ["crm", "objects", v, "contacts", rest @ ..] if is_dated_version(v) => rest,
        _ => return None,
    };
    match (method, rest) {
        (&Method::POST, []) => Some(Route::Single(None)),
        (&Method::PATCH, [id]) if !["batch", "search", "merge", "gdpr-delete"].contains(id) => {
            Some(Route::Single(Some(*id)))
        }
        (&Method::POST, ["batch", "create" | "update" | "upsert"]) => Some(Route::Batch),
        _ => None,
    }
}

/// `YYYY-MM`, HubSpot's dated API versions.
fn is_dated_version(v: &str) -> bool {
    let b = v.as_bytes();
    b.len() == 7
        && b[4] == b'-'
        && b.iter()
            .enumerate()
            .all(|(i, c)| i == 4 || c.is_ascii_digit())
}

impl Adapter for HubSpot {
    fn name(&self) -> &str {
        "hubspot"
    }
    fn display_name(&self) -> &str {
        "HubSpot CRM"
    }
    fn kind(&self) -> DestKind {
        DestKind::Crm
    }
    fn default_category(&self) -> Category {
        Category::MarketingEmail
    }
    fn matches_host(&self, host: &str) -> bool {
        host == "api.hubapi.com"
    }
    fn inspects(&self, method: &Method, path: &str) -> bool {
        route(method, path).is_some()
    }
    fn enforce(
        &self,
        req: &RequestView<'_>,
        body: &[u8],
        judge: &mut dyn Judge,
    ) -> Result<Enforced, BodyError> {
        match route(req.method, req.path) {
            Some(Route::Batch) => {
                common::enforce_json_batch(body, "inputs", judge, &contact_ids, &keep_as_is)
            }
            Some(Route::Single(path_id)) => {
                let root = common::parse_json(body)?;
                if !root.get("properties").is_some_and(Value::is_object) {
                    return Err(BodyError::Unreadable(
                        "`properties` is missing or not an object".into(),
                    ));
                }
                let mut ids = contact_ids(&root);
                if let Some(id) = path_id {
                    add_id(&mut ids, &common::percent_decode(id));
                }
                Ok(common::enforce_single(&ids, judge))
            }
            None => Err(BodyError::Unreadable(
                "not a HubSpot contacts write this destination inspects".into(),
            )),
        }
    }
    fn synthetic_ok(&self) -> SyntheticOk {
        SyntheticOk {
            status: 200,
            body: r#"{"status":"COMPLETE","results":[]}"#,
        }
    }
    fn identifier_fields(&self) -> &str {
        "properties.email/phone/mobilephone, id; inputs[]"
    }
    fn ldu_signal(&self) -> &str {
        "none"
    }
    fn refusal_shape(&self) -> crate::refusal::Shape {
        crate::refusal::Shape::HubSpot
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::destinations::common::testkit::*;
    use serde_json::json;

    fn run(method: Method, path: &str, body: &Value) -> Result<Enforced, BodyError> {
        let store = store();
        let mut d = decider_for(&HubSpot, &store);
        let bytes = serde_json::to_vec(body).unwrap();
        HubSpot.enforce(&req(&method, "api.hubapi.com", path), &bytes, &mut d)
    }

    #[test]
    fn hubspot_routes() {
        assert!(HubSpot.matches_host("api.hubapi.com"));
        assert!(!HubSpot.matches_host("app.hubspot.com"));
        for p in [
            "/crm/v3/objects/contacts",
            "/crm/v3/objects/contacts/batch/create",
            "/crm/v3/objects/contacts/batch/update",
            "/crm/v3/objects/contacts/batch/upsert",
            "/crm/objects/2026-03/contacts",
            "/crm/objects/2026-03/contacts/batch/upsert",
        ] {
            assert!(HubSpot.inspects(&Method::POST, p), "{p}");
        }
        assert!(HubSpot.inspects(&Method::PATCH, "/crm/v3/objects/contacts/123"));
        assert!(!HubSpot.inspects(&Method::POST, "/crm/v3/objects/contacts/search"));
        assert!(!HubSpot.inspects(&Method::POST, "/crm/v3/objects/contacts/batch/read"));
        assert!(!HubSpot.inspects(&Method::POST, "/crm/objects/latest/contacts"));
        assert!(!HubSpot.inspects(&Method::GET, "/crm/v3/objects/contacts"));
    }

    #[test]
    fn hubspot_single_contact() {
        let c = json!({"properties": {"email": "jane.roe@example.com", "firstname": "Jane"}});
        let out = run(Method::POST, "/crm/v3/objects/contacts", &c).unwrap();
        assert!(out.body.is_none());
        assert_eq!(drops(&out.events), vec![false]);
        let c = json!({"properties": {"mobilephone": "(415) 555-0102", "phone": "+14155550102"}});
        let out = run(Method::POST, "/crm/objects/2026-03/contacts", &c).unwrap();
        assert_eq!(drops(&out.events), vec![true]);
        let upd = json!({"properties": {"lifecyclestage": "lead"}});
        let out = run(
            Method::PATCH,
            "/crm/v3/objects/contacts/deny.me%40example.com",
            &upd,
        )
        .unwrap();
        assert_eq!(drops(&out.events), vec![true]);
    }

    #[test]
    fn hubspot_batch_upsert_mixed() {
        let body = json!({"inputs": [
            {"id": "jane.roe@example.com", "idProperty": "email", "properties": {"firstname": "Jane"}},
            {"id": "deny.me@example.com", "idProperty": "email", "properties": {"phone": "+14155550102"}},
            {"properties": {"email": "unknown.person@example.com"}},
            {"id": "crm:0031x00000abc", "idProperty": "crm_id", "properties": {"email": "email.denied.channel@example.com"}},
            {"properties": {"email": "care.only@example.com"}}
        ]});
        let out = run(Method::POST, "/crm/v3/objects/contacts/batch/upsert", &body).unwrap();
        // P-1009 has the email channel denied, but a CRM has no channel: kept.
        // P-1014 denies marketing_email: dropped.
        assert_eq!(drops(&out.events), vec![false, true, true, false, true]);
        let bytes = out.body.unwrap();
        assert_absent(
            &bytes,
            &[
                "deny.me@example.com",
                "+14155550102",
                "unknown.person@example.com",
                "care.only@example.com",
            ],
        );
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["inputs"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn hubspot_malformed_is_unreadable() {
        assert!(matches!(
            run(
                Method::POST,
                "/crm/v3/objects/contacts/batch/create",
                &json!({"inputs": {}})
            ),
            Err(BodyError::Unreadable(_))
        ));
        assert!(matches!(
            run(
                Method::POST,
                "/crm/v3/objects/contacts",
                &json!({"email": "a@b.c"})
            ),
            Err(BodyError::Unreadable(_))
        ));
        let store = store();
        let mut d = decider_for(&HubSpot, &store);
        let r = req(&Method::POST, "api.hubapi.com", "/crm/v3/objects/contacts");
        assert!(matches!(
            HubSpot.enforce(&r, b"\xff", &mut d),
            Err(BodyError::Unreadable(_))
        ));
    }
}
