//! Klaviyo (`a.klaviyo.com`, JSON:API bodies; trailing `/` optional):
//!
//! - `POST /api/events`: one event; the profile is
//!   `data.attributes.profile.data.attributes` (or the older
//!   `data.attributes.profile.{email,phone_number,external_id}` shape).
//! - `POST /api/event-bulk-create-jobs`: one decision per
//!   `data.attributes["events-bulk-create"].data[]` entry (a profile and its
//!   events; profile at `attributes.profile.data.attributes`).
//! - `POST /api/profiles`, `/api/profile-import`: one profile, `data.attributes`.
//! - `POST /api/profile-bulk-import-jobs`: one decision per
//!   `data.attributes.profiles.data[]` profile.
//!
//! Identifiers: `email`, `phone_number`, `external_id` (plaintext; Klaviyo
//! does not hash). Klaviyo's own profile ids are not consent identifiers.

use super::common::{self, keep_as_is};
use super::{Adapter, BodyError, Enforced, Judge, RequestView, SyntheticOk};
use crate::identify::Identifiers;
use crate::model::{Category, Channel, DestKind};
use http::Method;
use serde_json::Value;

pub(crate) struct Klaviyo;

type AddFn = fn(&mut Identifiers, &str);

/// Identifiers of a profile attributes object found at `prefix` of `v`.
fn profile_ids(v: &Value, prefixes: &[&str]) -> Identifiers {
    let mut ids = Identifiers::new();
    for p in prefixes {
        let at = |f: &str| format!("{p}.{f}");
        let fields: [(&str, AddFn); 6] = [
            ("email", Identifiers::add_email),
            ("$email", Identifiers::add_email),
            ("phone_number", Identifiers::add_phone),
            ("$phone_number", Identifiers::add_phone),
            ("external_id", Identifiers::add_external),
            ("$id", Identifiers::add_external),
        ];
        for (f, add) in fields {
            common::collect(v, &[at(f).as_str()], &mut ids, add);
        }
    }
    ids
}

#[derive(Clone, Copy)]
enum Route {
    Event,
    EventBulk,
    Profile,
    ProfileBulk,
}

fn route(method: &Method, path: &str) -> Option<Route> {
    if *method != Method::POST {
        return None;
    }
    match common::path_segments(path).as_slice() {
        ["api", "events"] => Some(Route::Event),
        ["api", "event-bulk-create-jobs"] => Some(Route::EventBulk),
        ["api", "profiles" | "profile-import"] => Some(Route::Profile),
        ["api", "profile-bulk-import-jobs"] => Some(Route::ProfileBulk),
        _ => None,
    }
}

fn single(body: &[u8], prefixes: &[&str], judge: &mut dyn Judge) -> Result<Enforced, BodyError> {
    let root = common::parse_json(body)?;
    if !root.get("data").is_some_and(Value::is_object) {
        return Err(BodyError::Unreadable(
            "`data` is missing or not an object".into(),
        ));
    }
    Ok(common::enforce_single(&profile_ids(&root, prefixes), judge))
}

impl Adapter for Klaviyo {
    fn name(&self) -> &str {
        "klaviyo"
    }
    fn display_name(&self) -> &str {
        "Klaviyo"
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
        host == "a.klaviyo.com"
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
        match route(req.method, req.path).unwrap_or(Route::Event) {
            Route::Event => single(
                body,
                &[
                    "data.attributes.profile.data.attributes",
                    "data.attributes.profile",
                ],
                judge,
            ),
            Route::Profile => single(body, &["data.attributes"], judge),
            Route::EventBulk => common::enforce_json_batch_at(
                body,
                "data.attributes.events-bulk-create.data",
                judge,
                &|e: &Value| profile_ids(e, &["attributes.profile.data.attributes"]),
                &keep_as_is,
            ),
            Route::ProfileBulk => common::enforce_json_batch_at(
                body,
                "data.attributes.profiles.data",
                judge,
                &|p: &Value| profile_ids(p, &["attributes"]),
                &keep_as_is,
            ),
        }
    }
    fn synthetic_ok(&self) -> SyntheticOk {
        SyntheticOk {
            status: 202,
            body: "",
        }
    }
    fn identifier_fields(&self) -> &str {
        "profile attributes email/phone_number/external_id"
    }
    fn ldu_signal(&self) -> &str {
        "none"
    }
    fn refusal_shape(&self) -> crate::refusal::Shape {
        crate::refusal::Shape::Klaviyo
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::destinations::common::testkit::*;
    use serde_json::json;

    fn run(path: &str, body: &Value) -> Result<Enforced, BodyError> {
        let store = store();
        let mut d = decider_for(&Klaviyo, &store);
        let bytes = serde_json::to_vec(body).unwrap();
        Klaviyo.enforce(&req(&Method::POST, "a.klaviyo.com", path), &bytes, &mut d)
    }

    fn event(profile: Value) -> Value {
        json!({"data": {"type": "event", "attributes": {
            "properties": {"clinic": "oncology"},
            "metric": {"data": {"type": "metric", "attributes": {"name": "Viewed Page"}}},
            "profile": {"data": {"type": "profile", "attributes": profile}}
        }}})
    }

    #[test]
    fn klaviyo_routes() {
        assert!(Klaviyo.matches_host("a.klaviyo.com"));
        assert!(!Klaviyo.matches_host("klaviyo.com"));
        for p in [
            "/api/events",
            "/api/events/",
            "/api/event-bulk-create-jobs/",
            "/api/profiles/",
            "/api/profile-import",
            "/api/profile-bulk-import-jobs/",
        ] {
            assert!(Klaviyo.inspects(&Method::POST, p), "{p}");
        }
        assert!(!Klaviyo.inspects(&Method::GET, "/api/events/"));
        assert!(!Klaviyo.inspects(&Method::POST, "/api/lists/"));
    }

    #[test]
    fn klaviyo_single_event_and_profile() {
        let out = run(
            "/api/events/",
            &event(json!({"email": "jane.roe@example.com"})),
        )
        .unwrap();
        assert!(out.body.is_none());
        assert_eq!(drops(&out.events), vec![false]);
        let out = run(
            "/api/events/",
            &event(json!({"phone_number": "+14155550102"})),
        )
        .unwrap();
        assert_eq!(drops(&out.events), vec![true]);
        let old = json!({"data": {"type": "event", "attributes": {
            "profile": {"email": "email.denied.channel@example.com"}, "properties": {}}}});
        assert_eq!(drops(&run("/api/events", &old).unwrap().events), vec![true]);
        let prof = json!({"data": {"type": "profile", "attributes": {
            "external_id": "crm:0031x00000abc", "first_name": "Jane"}}});
        let out = run("/api/profile-import/", &prof).unwrap();
        assert_eq!(drops(&out.events), vec![false]);
        assert!(out.body.is_none());
    }

    #[test]
    fn klaviyo_event_bulk_mixed() {
        let entry = |email: &str| {
            json!({"type": "event-bulk-create", "attributes": {
                "profile": {"data": {"type": "profile", "attributes": {"email": email}}},
                "events": {"data": [{"type": "event", "attributes": {"properties": {}}}]}}})
        };
        let body = json!({"data": {"type": "event-bulk-create-job", "attributes": {
        "events-bulk-create": {"data": [
            entry("jane.roe@example.com"),
            entry("deny.me@example.com"),
            entry("unknown.person@example.com"),
            entry("email.denied.channel@example.com")
        ]}}}});
        let out = run("/api/event-bulk-create-jobs/", &body).unwrap();
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
    }

    #[test]
    fn klaviyo_profile_bulk_mixed() {
        let body = json!({"data": {"type": "profile-bulk-import-job", "attributes": {
            "profiles": {"data": [
                {"type": "profile", "attributes": {"email": "jane.roe@example.com"}},
                {"type": "profile", "attributes": {"phone_number": "+14155550102", "email": "x@y.org"}},
                {"type": "profile", "attributes": {"email": "MIXED.CASE@gmail.com"}}
            ]}},
            "relationships": {"lists": {"data": [{"type": "list", "id": "L1"}]}}}});
        let out = run("/api/profile-bulk-import-jobs/", &body).unwrap();
        assert_eq!(drops(&out.events), vec![false, true, false]);
        let bytes = out.body.unwrap();
        assert_absent(&bytes, &["+14155550102", "x@y.org"]);
    }

    #[test]
    fn klaviyo_malformed_is_unreadable() {
        let store = store();
        let mut d = decider_for(&Klaviyo, &store);
        for (path, bad) in [
            ("/api/events/", &b"{\"data\":"[..]),
            ("/api/events/", br#"{"data":[]}"#),
            (
                "/api/profile-bulk-import-jobs/",
                br#"{"data":{"attributes":{}}}"#,
            ),
            ("/api/event-bulk-create-jobs/", br#"[]"#),
        ] {
            let r = req(&Method::POST, "a.klaviyo.com", path);
            assert!(matches!(
                Klaviyo.enforce(&r, bad, &mut d),
                Err(BodyError::Unreadable(_))
            ));
        }
    }
}
