//! Mailchimp Marketing API (`{dc}.api.mailchimp.com/3.0`): list members,
//! one decision per member.
//!
//! - `POST /3.0/lists/{id}/members`: one member (`email_address`).
//! - `PUT|PATCH /3.0/lists/{id}/members/{hash}`: one member; the identifiers
//!   are the body's `email_address` and the path's subscriber hash (or the
//!   address itself, which Mailchimp accepts in its place).
//! - `POST /3.0/lists/{id}/members/{hash}/{events,tags,notes}`: one member,
//!   named by the path's subscriber hash (and the body's `email_address`, when
//!   there is one); the body (an event's properties, tags, a note) is about them.
//! - `POST /3.0/ecommerce/stores/{id}/customers`, `PUT|PATCH …/customers/{id}`:
//!   one store customer (`email_address`; the store's customer id is not a
//!   consent identifier).
//! - `POST /3.0/customer-journeys/journeys/{j}/steps/{s}/actions/trigger`: one
//!   contact (`email_address`).
//! - `POST /3.0/lists/{id}`: batch `members[]`, one decision each.
//! - `POST /3.0/batches`: `operations[]`, one decision per operation; its
//!   `body` is a JSON string holding a member (or a `members[]` batch).
//!
//! The subscriber hash in a `…/members/{hash}` path is Mailchimp's MD5 of the
//! lower-cased address: it is looked up with `Identifiers::add_email`, which
//! reads 32 hex digits as that MD5 where the consent index keeps them (and an
//! address with an `@` as itself). `merge_fields.PHONE` is a phone identifier.
//! A member with no identifier the index knows is an unknown patient and is
//! dropped (a single-member request is then refused); `X-Patient-Id` names the
//! patient of a request that names nobody.

use super::common::{self, keep_as_is};
use super::{Adapter, BodyError, Enforced, Judge, RequestView, SyntheticOk};
use crate::identify::Identifiers;
use crate::model::{Category, Channel, DestKind};
use http::Method;
use serde_json::Value;

pub(crate) struct Mailchimp;

/// Identifiers of a member object (or of a `members[]` batch inside one).
fn member_ids(v: &Value, ids: &mut Identifiers) {
    common::collect(
        v,
        &["email_address", "members.email_address"],
        ids,
        Identifiers::add_email,
    );
    common::collect(
        v,
        &["merge_fields.PHONE", "members.merge_fields.PHONE"],
        ids,
        Identifiers::add_phone,
    );
}

/// The subscriber of a `.../members/{subscriber}` path: an email address, or
/// its MD5 subscriber hash (read as such by `add_email` where the index keeps
/// MD5s; anything else adds nothing).
fn path_ids(segs: &[&str], ids: &mut Identifiers) {
    if let Some(pos) = segs.iter().position(|s| *s == "members") {
        if let Some(sub) = segs.get(pos + 1) {
            ids.add_email(&common::percent_decode(sub));
        }
    }
}

fn single_ids(v: &Value) -> Identifiers {
    let mut ids = Identifiers::new();
    member_ids(v, &mut ids);
    ids
}

/// The identifiers of one `/batches` operation.
fn operation_ids(i: usize, op: &Value) -> Result<Identifiers, BodyError> {
    let Value::Object(o) = op else {
        return Err(BodyError::Unreadable(format!(
            "operations[{i}] is not an object"
        )));
    };
    let mut ids = Identifiers::new();
    if let Some(p) = o.get("path").and_then(Value::as_str) {
        path_ids(&common::path_segments(p), &mut ids);
    }
    match o.get("body") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => {
            let inner: Value = common::strict_json_str(s).map_err(|_| {
                BodyError::Unreadable(format!("operations[{i}].body is not a JSON document"))
            })?;
            member_ids(&inner, &mut ids);
        }
        Some(inner @ Value::Object(_)) => member_ids(inner, &mut ids),
        Some(_) => {
            return Err(BodyError::Unreadable(format!(
                "operations[{i}].body is not a JSON string"
            )))
        }
    }
    Ok(ids)
}

enum Route {
    Member,
    ListBatch,
    Batches,
}

fn route(method: &Method, path: &str) -> Option<Route> {
    match (method, common::path_segments(path).as_slice()) {
        (&Method::POST, ["3.0", "lists", _, "members"]) => Some(Route::Member),
        (&Method::PUT | &Method::PATCH, ["3.0", "lists", _, "members", _]) => Some(Route::Member),
        (&Method::POST, ["3.0", "lists", _, "members", _, "events" | "tags" | "notes"]) => {
            Some(Route::Member)
        }
        (&Method::POST, ["3.0", "ecommerce", "stores", _, "customers"]) => Some(Route::Member),
        (&Method::PUT | &Method::PATCH, ["3.0", "ecommerce", "stores", _, "customers", _]) => {
            Some(Route::Member)
        }
        (
            &Method::POST,
            ["3.0", "customer-journeys", "journeys", _, "steps", _, "actions", "trigger"],
        ) => Some(Route::Member),
        (&Method::POST, ["3.0", "lists", _]) => Some(Route::ListBatch),
        (&Method::POST, ["3.0", "batches"]) => Some(Route::Batches),
        _ => None,
    }
}

impl Adapter for Mailchimp {
    fn name(&self) -> &str {
        "mailchimp"
    }
    fn display_name(&self) -> &str {
        "Mailchimp Marketing API"
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
        common::host_matches("*.api.mailchimp.com", host)
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
            Some(Route::ListBatch) => {
                common::enforce_json_batch(body, "members", judge, &single_ids, &keep_as_is)
            }
            Some(Route::Batches) => {
                let root = common::parse_json(body)?;
                let Some(Value::Array(ops)) = root.get("operations") else {
                    return Err(BodyError::Unreadable(
                        "`operations` is missing or not an array".into(),
                    ));
                };
                for (i, op) in ops.iter().enumerate() {
                    operation_ids(i, op)?;
                }
                // Every operation parsed above; the closure cannot fail now.
                let ids = |op: &Value| operation_ids(0, op).unwrap_or_default();
                common::enforce_json_batch(body, "operations", judge, &ids, &keep_as_is)
            }
            // A single member, customer or contact (and anything else routed
            // here by the proxy).
            _ => {
                let root = common::parse_json(body)?;
                if !root.is_object() {
                    return Err(BodyError::Unreadable("body is not a JSON object".into()));
                }
                let mut ids = single_ids(&root);
                path_ids(&common::path_segments(req.path), &mut ids);
                Ok(common::enforce_single(&ids, judge))
            }
        }
    }
    fn synthetic_ok(&self) -> SyntheticOk {
        SyntheticOk {
            status: 200,
            body: "{}",
        }
    }
    fn identifier_fields(&self) -> &str {
        "email_address, merge_fields.PHONE (members[], operations[].body); members/{hash} path"
    }
    fn ldu_signal(&self) -> &str {
        "none (status as sent)"
    }
    fn refusal_shape(&self) -> crate::refusal::Shape {
        crate::refusal::Shape::Mailchimp
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::destinations::common::testkit::*;
    use serde_json::json;

    const HOST: &str = "us6.api.mailchimp.com";

    fn run(method: Method, path: &str, body: &[u8]) -> Result<Enforced, BodyError> {
        let store = store();
        let mut d = decider_for(&Mailchimp, &store);
        Mailchimp.enforce(&req(&method, HOST, path), body, &mut d)
    }

    #[test]
    fn mailchimp_routes() {
        assert!(Mailchimp.matches_host(HOST));
        assert!(!Mailchimp.matches_host("api.mailchimp.com"));
        assert!(!Mailchimp.matches_host("mandrillapp.com"));
        assert!(Mailchimp.inspects(&Method::POST, "/3.0/lists/abc/members"));
        assert!(Mailchimp.inspects(&Method::PUT, "/3.0/lists/abc/members/0a1b"));
        assert!(Mailchimp.inspects(&Method::PATCH, "/3.0/lists/abc/members/0a1b"));
        assert!(Mailchimp.inspects(&Method::POST, "/3.0/lists/abc"));
        assert!(Mailchimp.inspects(&Method::POST, "/3.0/batches"));
        assert!(!Mailchimp.inspects(&Method::GET, "/3.0/lists/abc/members"));
        assert!(!Mailchimp.inspects(&Method::DELETE, "/3.0/lists/abc/members/0a1b"));
        for p in [
            "/3.0/lists/abc/members/0a1b/events",
            "/3.0/lists/abc/members/0a1b/tags",
            "/3.0/lists/abc/members/0a1b/notes",
            "/3.0/ecommerce/stores/s1/customers",
            "/3.0/customer-journeys/journeys/7/steps/9/actions/trigger",
        ] {
            assert!(Mailchimp.inspects(&Method::POST, p), "{p}");
        }
        for m in [Method::PUT, Method::PATCH] {
            assert!(Mailchimp.inspects(&m, "/3.0/ecommerce/stores/s1/customers/c1"));
        }
        assert!(!Mailchimp.inspects(&Method::PUT, "/3.0/ecommerce/stores/s1/customers"));
        assert!(!Mailchimp.inspects(&Method::POST, "/3.0/lists/abc/members/0a1b/goals"));
        assert!(!Mailchimp.inspects(&Method::GET, "/3.0/lists/abc/members/0a1b/events"));
    }

    #[test]
    fn mailchimp_member_actions_customers_and_journeys() {
        let hash = |e: &str| md5_hex(e);
        // A member event naming its member by hash and by address.
        let ev = json!({"name": "appointment_booked", "properties": {"clinic": "north"},
                        "email_address": "jane.roe@example.com"});
        let out = run(
            Method::POST,
            &format!(
                "/3.0/lists/l1/members/{}/events",
                hash("jane.roe@example.com")
            ),
            &serde_json::to_vec(&ev).unwrap(),
        )
        .unwrap();
        assert_eq!(drops(&out.events), vec![false]);
        assert!(out.body.is_none());
        // Tags for a denied member (address in the path).
        let out = run(
            Method::POST,
            "/3.0/lists/l1/members/deny.me%40example.com/tags",
            br#"{"tags":[{"name":"oncology","status":"active"}]}"#,
        )
        .unwrap();
        assert_eq!(drops(&out.events), vec![true]);
        // A note naming nobody the index knows (a hash of an unknown address).
        let out = run(
            Method::POST,
            &format!(
                "/3.0/lists/l1/members/{}/notes",
                hash("unknown.person@example.com")
            ),
            br#"{"note":"called"}"#,
        )
        .unwrap();
        assert_eq!(drops(&out.events), vec![true]);
        for (method, path) in [
            (Method::POST, "/3.0/ecommerce/stores/s1/customers"),
            (Method::PUT, "/3.0/ecommerce/stores/s1/customers/c9"),
            (Method::PATCH, "/3.0/ecommerce/stores/s1/customers/c9"),
            (
                Method::POST,
                "/3.0/customer-journeys/journeys/7/steps/9/actions/trigger",
            ),
        ] {
            let keep =
                json!({"id": "c9", "email_address": "jane.roe@example.com", "opt_in_status": true});
            let out = run(method.clone(), path, &serde_json::to_vec(&keep).unwrap()).unwrap();
            assert_eq!(drops(&out.events), vec![false], "{path}");
            let deny =
                json!({"id": "c9", "email_address": "Deny.Me@example.com", "opt_in_status": true});
            let out = run(method.clone(), path, &serde_json::to_vec(&deny).unwrap()).unwrap();
            assert_eq!(drops(&out.events), vec![true], "{path}");
            assert!(matches!(
                run(method, path, b"[]"),
                Err(BodyError::Unreadable(_))
            ));
        }
    }

    #[test]
    fn mailchimp_single_member() {
        let keep = json!({"email_address": "jane.roe@example.com", "status": "subscribed"});
        let out = run(
            Method::PUT,
            &format!("/3.0/lists/l1/members/{}", md5_hex("jane.roe@example.com")),
            &serde_json::to_vec(&keep).unwrap(),
        )
        .unwrap();
        assert!(out.body.is_none());
        assert_eq!(drops(&out.events), vec![false]);
        let deny = json!({"email_address": "deny.me@example.com", "status_if_new": "subscribed"});
        let out = run(
            Method::POST,
            "/3.0/lists/l1/members",
            &serde_json::to_vec(&deny).unwrap(),
        )
        .unwrap();
        assert_eq!(drops(&out.events), vec![true]);
        // Email in the path (Mailchimp accepts it in place of the hash).
        let out = run(
            Method::PATCH,
            "/3.0/lists/l1/members/deny.me%40example.com",
            br#"{"merge_fields":{"FNAME":"D"}}"#,
        )
        .unwrap();
        assert_eq!(drops(&out.events), vec![true]);
    }

    #[test]
    fn mailchimp_list_batch_mixed() {
        let body = json!({"members": [
            {"email_address": "jane.roe@example.com", "status": "subscribed"},
            {"email_address": "deny.me@example.com", "status": "subscribed",
             "merge_fields": {"PHONE": "+14155550102"}},
            {"email_address": "unknown.person@example.com", "status": "subscribed"},
            {"email_address": "email.denied.channel@example.com", "status": "subscribed"},
            {"email_address": "x@x.org", "merge_fields": {"PHONE": "+1 415 555 0100"}}
        ], "update_existing": true});
        let out = run(
            Method::POST,
            "/3.0/lists/l1",
            &serde_json::to_vec(&body).unwrap(),
        )
        .unwrap();
        assert_eq!(drops(&out.events), vec![false, true, true, true, false]);
        let bytes = out.body.unwrap();
        assert_absent(
            &bytes,
            &[
                "deny.me@example.com",
                "+14155550102",
                "unknown.person@example.com",
                "email.denied.channel@example.com",
            ],
        );
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["members"].as_array().unwrap().len(), 2);
        assert_eq!(v["update_existing"], true);
    }

    #[test]
    fn mailchimp_batches_operations() {
        let op = |email: &str| {
            json!({"method": "PUT",
                   "path": format!("/lists/l1/members/{}", md5_hex(email)),
                   "body": json!({"email_address": email, "status_if_new": "subscribed"}).to_string()})
        };
        let body = json!({"operations": [
            op("jane.roe@example.com"),
            op("deny.me@example.com"),
            op("Mixed.Case@Gmail.com"),
            op("unknown.person@example.com")
        ]});
        let out = run(
            Method::POST,
            "/3.0/batches",
            &serde_json::to_vec(&body).unwrap(),
        )
        .unwrap();
        assert_eq!(drops(&out.events), vec![false, true, false, true]);
        let bytes = out.body.unwrap();
        assert_absent(
            &bytes,
            &["deny.me@example.com", "unknown.person@example.com"],
        );
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["operations"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn mailchimp_malformed_is_unreadable() {
        let bad_op = br#"{"operations":[{"method":"POST","path":"/lists/l1/members","body":"{\"email_address\": \"secret@x.com\""}]}"#;
        let Err(BodyError::Unreadable(msg)) = run(Method::POST, "/3.0/batches", bad_op) else {
            panic!("expected Unreadable")
        };
        assert!(!msg.contains("secret"));
        assert!(matches!(
            run(
                Method::POST,
                "/3.0/batches",
                br#"{"operations":[{"body":5}]}"#
            ),
            Err(BodyError::Unreadable(_))
        ));
        assert!(matches!(
            run(Method::POST, "/3.0/lists/l1", br#"{"members":{}}"#),
            Err(BodyError::Unreadable(_))
        ));
        assert!(matches!(
            run(Method::POST, "/3.0/lists/l1/members", b"nope"),
            Err(BodyError::Unreadable(_))
        ));
    }
}
