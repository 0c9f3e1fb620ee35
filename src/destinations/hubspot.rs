//! HubSpot CRM contacts (`api.hubapi.com`).
//!
//! - `POST /crm/v3/objects/contacts` (and the dated `/crm/objects/{YYYY-MM}/contacts`):
//!   one contact, `properties.*`.
//! - `PATCH /crm/v3/objects/contacts/{id}`: one contact update.
//! - `POST …/contacts/batch/create|update|upsert`: one decision per `inputs[]`.
//! - `POST …/contacts/search`: reads contacts back. One decision per person a
//!   filter names: each `value`, `values[]` and `highValue` of a filter on
//!   `email` or `hs_additional_emails` (an email), `phone` or `mobilephone` (a
//!   phone) or `hs_object_id` (an external id), and the free-text `query` (read
//!   as an email and as a phone). A search naming nobody is one decision with
//!   no identifiers (the app's `X-Patient-Id`, else an unknown patient).
//! - `POST …/contacts/batch/read`: reads contacts back; one decision per
//!   `inputs[].id` (an email under `idProperty: email`, otherwise as `id` above).
//!
//! Identifiers: `properties.email`, `properties.phone`, `properties.mobilephone`,
//! and the input's `id` (or the path's `{id}`): an email when it holds an `@`
//! (the `idProperty=email` form), otherwise an external id.
//!
//! A search or batch read with someone who must not be sent is refused whole,
//! not rewritten: a search without one of its filters matches other contacts
//! (a wider read, or none of what was asked), and a batch read that silently
//! leaves a contact out reads to the app as "not in HubSpot" (an app that then
//! creates the contact would send them after all). So one dropped person drops
//! every other one of the request as `foreign_identifier`, and the app gets
//! `blocked_by_consent_policy`.

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
    Search,
    BatchRead,
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
        (&Method::POST, ["search"]) => Some(Route::Search),
        (&Method::POST, ["batch", "read"]) => Some(Route::BatchRead),
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

/// The identifier kind of a search filter's `propertyName` (compared without case).
fn filter_kind(property: &str) -> Option<fn(&mut Identifiers, &str)> {
    match property.to_ascii_lowercase().as_str() {
        "email" | "hs_additional_emails" => Some(Identifiers::add_email),
        "phone" | "mobilephone" => Some(Identifiers::add_phone),
        "hs_object_id" => Some(Identifiers::add_external),
        _ => None,
    }
}

/// One set of identifiers per person a search names, in payload order.
fn search_people(root: &Value) -> Result<Vec<Identifiers>, BodyError> {
    let bad = |what: &str| BodyError::Unreadable(format!("search: {what}"));
    let Value::Object(obj) = root else {
        return Err(bad("body is not a JSON object"));
    };
    let mut people = Vec::new();
    let one = |add: fn(&mut Identifiers, &str), v: &str| {
        let mut ids = Identifiers::new();
        add(&mut ids, v);
        ids
    };
    match obj.get("filterGroups") {
        None | Some(Value::Null) => {}
        Some(Value::Array(groups)) => {
            for g in groups {
                let filters = match g.get("filters") {
                    None | Some(Value::Null) => continue,
                    Some(Value::Array(f)) => f,
                    Some(_) => return Err(bad("`filterGroups[].filters` is not an array")),
                };
                for f in filters {
                    let Some(prop) = f.get("propertyName").and_then(Value::as_str) else {
                        return Err(bad("a filter has no string `propertyName`"));
                    };
                    let Some(add) = filter_kind(prop) else {
                        continue;
                    };
                    let mut vals = Vec::new();
                    for key in ["value", "highValue", "values"] {
                        match f.get(key) {
                            None | Some(Value::Null) => {}
                            Some(v @ (Value::String(_) | Value::Number(_))) => vals.push(v),
                            Some(Value::Array(a)) if key == "values" => vals.extend(a.iter()),
                            Some(_) => return Err(bad("a filter value is not a string or number")),
                        }
                    }
                    for v in vals {
                        let text = match v {
                            Value::String(s) => s.clone(),
                            Value::Number(n) => n.to_string(),
                            _ => return Err(bad("a filter value is not a string or number")),
                        };
                        people.push(one(add, &text));
                    }
                }
            }
        }
        Some(_) => return Err(bad("`filterGroups` is not an array")),
    }
    match obj.get("query") {
        None | Some(Value::Null) => {}
        Some(Value::String(q)) => {
            let mut ids = one(Identifiers::add_email, q);
            ids.add_phone(q);
            if !ids.is_empty() {
                people.push(ids);
            }
        }
        Some(_) => return Err(bad("`query` is not a string")),
    }
    if people.is_empty() {
        people.push(Identifiers::new());
    }
    Ok(people)
}

/// One set of identifiers per `inputs[]` entry of a batch read.
fn batch_read_people(root: &Value) -> Result<Vec<Identifiers>, BodyError> {
    let bad = |what: &str| BodyError::Unreadable(format!("batch read: {what}"));
    let email = match root.get("idProperty") {
        None | Some(Value::Null) => false,
        Some(Value::String(p)) => p.eq_ignore_ascii_case("email"),
        Some(_) => return Err(bad("`idProperty` is not a string")),
    };
    let Some(Value::Array(inputs)) = root.get("inputs") else {
        return Err(bad("`inputs` is missing or not an array"));
    };
    inputs
        .iter()
        .map(|i| {
            let id = match i.get("id") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Number(n)) => n.to_string(),
                _ => return Err(bad("an input has no string `id`")),
            };
            let mut ids = Identifiers::new();
            match email {
                true => ids.add_email(&id),
                false => add_id(&mut ids, &id),
            }
            Ok(ids)
        })
        .collect()
}

/// Decide every person a read names; one dropped refuses the request.
fn read_back(people: Vec<Identifiers>, judge: &mut dyn Judge) -> Enforced {
    let mut applied: Vec<super::EventApplied> = people
        .iter()
        .map(|ids| super::EventApplied::new(judge.decide(ids)))
        .collect();
    common::all_or_nothing(&mut applied);
    Enforced {
        body: None,
        events: applied,
        query: None,
    }
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
            Some(Route::Search) => {
                let root = common::parse_json(body)?;
                Ok(read_back(search_people(&root)?, judge))
            }
            Some(Route::BatchRead) => {
                let root = common::parse_json(body)?;
                Ok(read_back(batch_read_people(&root)?, judge))
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
        "properties.email/phone/mobilephone, id; inputs[]; search filters on email/phone"
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
        assert!(HubSpot.inspects(&Method::POST, "/crm/v3/objects/contacts/search"));
        assert!(HubSpot.inspects(&Method::POST, "/crm/v3/objects/contacts/batch/read"));
        assert!(HubSpot.inspects(&Method::POST, "/crm/objects/2026-03/contacts/search"));
        assert!(!HubSpot.inspects(&Method::GET, "/crm/v3/objects/contacts/search"));
        assert!(!HubSpot.inspects(&Method::PATCH, "/crm/v3/objects/contacts/search"));
        assert!(!HubSpot.inspects(&Method::POST, "/crm/v3/objects/contacts/batch/archive"));
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

    fn search(filters: Value) -> Value {
        json!({"filterGroups": [{"filters": filters}], "properties": ["email", "firstname"], "limit": 10})
    }

    #[test]
    fn hubspot_search_decides_each_named_person_and_refuses_whole() {
        let p = "/crm/v3/objects/contacts/search";
        let d = |b: &Value| drops(&run(Method::POST, p, b).unwrap().events);
        let eq = |prop: &str, v: &str| json!({"propertyName": prop, "operator": "EQ", "value": v});
        assert_eq!(
            d(&search(json!([eq("email", "jane.roe@example.com")]))),
            vec![false]
        );
        assert_eq!(
            d(&search(json!([eq("EMAIL", "deny.me@example.com")]))),
            vec![true]
        );
        assert_eq!(
            d(&search(json!([eq("mobilephone", "(415) 555-0102")]))),
            vec![true]
        );
        // One denied among granted: every one dropped (the search is refused).
        let out = run(
            Method::POST,
            p,
            &json!({"filterGroups": [
                {"filters": [eq("email", "jane.roe@example.com")]},
                {"filters": [{"propertyName": "email", "operator": "IN",
                              "values": ["Mixed.Case@Gmail.com", "deny.me@example.com"]}]}
            ]}),
        )
        .unwrap();
        assert_eq!(drops(&out.events), vec![true, true, true]);
        assert_eq!(
            out.events[0].verdict,
            crate::decide::EventVerdict::Drop(crate::decide::Reason::ForeignIdentifier)
        );
        // Free text is read as an address or a phone.
        assert_eq!(
            d(&json!({"query": "deny.me@example.com", "properties": ["email"]})),
            vec![true]
        );
        // Filters on other properties name nobody: one decision without
        // identifiers (an unknown patient unless the app names one).
        let out = run(
            Method::POST,
            p,
            &search(json!([eq("lifecyclestage", "lead")])),
        )
        .unwrap();
        assert_eq!(drops(&out.events), vec![true]);
        for bad in [
            json!({"filterGroups": {}}),
            json!({"filterGroups": [{"filters": [{"operator": "EQ", "value": "x"}]}]}),
            json!({"filterGroups": [{"filters": [{"propertyName": "email", "value": {"a": 1}}]}]}),
            json!({"query": ["deny.me@example.com"]}),
            json!([]),
        ] {
            assert!(
                matches!(run(Method::POST, p, &bad), Err(BodyError::Unreadable(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn hubspot_batch_read_refuses_whole() {
        let p = "/crm/v3/objects/contacts/batch/read";
        let read = |prop: Option<&str>, ids: &[&str]| {
            let mut b = json!({"inputs": ids.iter().map(|i| json!({"id": i})).collect::<Vec<_>>(),
                               "properties": ["email"], "archived": false});
            if let Some(p) = prop {
                b["idProperty"] = json!(p);
            }
            b
        };
        let out = run(
            Method::POST,
            p,
            &read(Some("email"), &["jane.roe@example.com"]),
        )
        .unwrap();
        assert_eq!(drops(&out.events), vec![false]);
        assert!(out.body.is_none());
        let out = run(
            Method::POST,
            p,
            &read(
                Some("email"),
                &["jane.roe@example.com", "deny.me@example.com"],
            ),
        )
        .unwrap();
        assert_eq!(drops(&out.events), vec![true, true]);
        // Without idProperty the ids are HubSpot's (external ids).
        let out = run(Method::POST, p, &read(None, &["crm:0031x00000den"])).unwrap();
        assert_eq!(drops(&out.events), vec![true]);
        for bad in [
            json!({"inputs": {}}),
            json!({"inputs": [{"id": {}}]}),
            json!({"idProperty": 5, "inputs": []}),
        ] {
            assert!(matches!(
                run(Method::POST, p, &bad),
                Err(BodyError::Unreadable(_))
            ));
        }
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
