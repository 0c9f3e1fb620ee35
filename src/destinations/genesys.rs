//! Genesys Cloud outbound dialer contact lists:
//! `POST /api/v2/outbound/contactlists/{id}/contacts` on `api.mypurecloud.com`,
//! `api.{region}.pure.cloud` or `api.mypurecloud.{tld}`.
//!
//! The body is a top-level JSON array of contacts
//! `{id, contactListId, data{<column>: value}, callable}`; one decision per
//! contact. Identifiers: every `data` value whose column name contains
//! "phone" (any case) is a phone, "email" an email; the contact `id` is an
//! external id.

use super::common::{self, keep_as_is};
use super::{Adapter, BodyError, Enforced, Judge, RequestView, SyntheticOk};
use crate::identify::Identifiers;
use crate::model::{Category, Channel, DestKind};
use http::Method;
use serde_json::Value;

pub(crate) struct GenesysOutbound;

fn contact_ids(v: &Value) -> Identifiers {
    let mut ids = Identifiers::new();
    if let Some(Value::Object(data)) = v.get("data") {
        for (col, val) in data {
            let col = col.to_ascii_lowercase();
            let text = match val {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                _ => continue,
            };
            if col.contains("phone") {
                ids.add_phone(&text);
            } else if col.contains("email") {
                ids.add_email(&text);
            }
        }
    }
    common::collect(v, &["id"], &mut ids, Identifiers::add_external);
    ids
}

impl Adapter for GenesysOutbound {
    fn name(&self) -> &str {
        "genesys_outbound"
    }
    fn display_name(&self) -> &str {
        "Genesys Cloud Outbound"
    }
    fn kind(&self) -> DestKind {
        DestKind::Voice
    }
    fn default_category(&self) -> Category {
        Category::PhoneOutreach
    }
    fn channel(&self) -> Option<Channel> {
        Some(Channel::Voice)
    }
    fn matches_host(&self, host: &str) -> bool {
        host == "api.mypurecloud.com"
            || host
                .strip_prefix("api.")
                .is_some_and(|rest| common::host_matches("*.pure.cloud", rest))
            || host
                .strip_prefix("api.mypurecloud.")
                .is_some_and(|tld| !tld.is_empty() && !tld.starts_with('.'))
    }
    fn query_params(&self) -> &'static [&'static str] {
        &["priority", "clearSystemData", "doNotQueue"]
    }
    fn inspects(&self, method: &Method, path: &str) -> bool {
        *method == Method::POST
            && matches!(
                common::path_segments(path).as_slice(),
                ["api", "v2", "outbound", "contactlists", _, "contacts"]
            )
    }
    fn enforce(
        &self,
        _req: &RequestView<'_>,
        body: &[u8],
        judge: &mut dyn Judge,
    ) -> Result<Enforced, BodyError> {
        let root = common::parse_json(body)?;
        if let Some(items) = root.as_array() {
            if items.iter().any(|c| !c.is_object()) {
                return Err(BodyError::Unreadable(
                    "contact array holds a non-object entry".into(),
                ));
            }
        }
        common::enforce_json_batch_at(body, "$", judge, &contact_ids, &keep_as_is)
    }
    fn synthetic_ok(&self) -> SyntheticOk {
        SyntheticOk {
            status: 200,
            body: "[]",
        }
    }
    fn identifier_fields(&self) -> &str {
        "data.*phone*, data.*email* columns; contact id"
    }
    fn ldu_signal(&self) -> &str {
        "none"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::destinations::common::testkit::*;
    use serde_json::json;

    const PATH: &str = "/api/v2/outbound/contactlists/cl-1/contacts";

    fn run(body: &[u8]) -> Result<Enforced, BodyError> {
        let store = store();
        let mut d = decider_for(&GenesysOutbound, &store);
        GenesysOutbound.enforce(
            &req(&Method::POST, "api.mypurecloud.com", PATH),
            body,
            &mut d,
        )
    }

    #[test]
    fn genesys_routes() {
        for h in [
            "api.mypurecloud.com",
            "api.mypurecloud.ie",
            "api.mypurecloud.com.au",
            "api.usw2.pure.cloud",
        ] {
            assert!(GenesysOutbound.matches_host(h), "{h}");
        }
        for h in [
            "api.pure.cloud",
            "mypurecloud.com",
            "login.mypurecloud.com",
            "api.mypurecloud.",
        ] {
            assert!(!GenesysOutbound.matches_host(h), "{h}");
        }
        assert!(GenesysOutbound.inspects(&Method::POST, PATH));
        assert!(!GenesysOutbound.inspects(&Method::GET, PATH));
        assert!(!GenesysOutbound.inspects(&Method::POST, "/api/v2/outbound/campaigns"));
    }

    #[test]
    fn genesys_contacts_mixed() {
        let c = |id: &str, data: Value| json!({"id": id, "contactListId": "cl-1", "data": data, "callable": true});
        let body = json!([
            c("c1", json!({"First": "V", "HomePhone": "+1 312 555 0110"})),
            c("c2", json!({"CellPhone": "+13125550111", "Last": "D"})),
            c("c3", json!({"phone": "+15555550199"})),
            c("dialer:10", json!({"Notes": "x"})),
            c(
                "c5",
                json!({"WorkPhone": "+14155550102", "Email": "deny.me@example.com"})
            )
        ]);
        let out = run(&serde_json::to_vec(&body).unwrap()).unwrap();
        assert_eq!(drops(&out.events), vec![false, true, true, false, true]);
        let bytes = out.body.unwrap();
        assert_absent(
            &bytes,
            &[
                "+13125550111",
                "+15555550199",
                "+14155550102",
                "deny.me@example.com",
            ],
        );
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v.as_array().unwrap().len(), 2);
    }

    #[test]
    fn genesys_malformed_is_unreadable() {
        for bad in [&b"["[..], br#"{"contacts":[]}"#, br#"["+14155550100"]"#] {
            assert!(matches!(run(bad), Err(BodyError::Unreadable(_))));
        }
    }
}
