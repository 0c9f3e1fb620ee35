//! LinkedIn Conversions API: `POST api.linkedin.com/rest/conversionEvents`.
//! The body is one conversion event, or `{"elements":[…]}` for a batch
//! (`X-RestLi-Method: BATCH_CREATE`). The user is named in
//! `user.userIds[]{idType,idValue}` and `user.externalIds[]`.
//!
//! LinkedIn has no limited-data-use flag: a sale/share opt-out strips the
//! identity (`userIds` emptied, being required; `userInfo`, `externalIds` gone).

use super::common;
use super::{Adapter, BodyError, Enforced, EventApplied, Judge, RequestView, SyntheticOk};
use crate::decide::Keep;
use crate::identify::{self, Identifiers};
use crate::model::{Category, DestKind};
use http::Method;
use serde_json::Value;

pub(crate) struct LinkedinCapi;

const SHA256_EMAIL: &str = "SHA256_EMAIL";

fn user_ids(ev: &Value) -> impl Iterator<Item = &serde_json::Map<String, Value>> {
    ev.pointer("/user/userIds")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_object)
}

fn identify_event(ev: &Value) -> Identifiers {
    let mut ids = Identifiers::new();
    for id in user_ids(ev) {
        if id.get("idType").and_then(Value::as_str) == Some(SHA256_EMAIL) {
            if let Some(v) = id.get("idValue").and_then(Value::as_str) {
                ids.add_email(v);
            }
        }
    }
    common::collect(
        ev,
        &["user.externalIds"],
        &mut ids,
        Identifiers::add_external,
    );
    ids
}

fn apply(ev: &mut Value, keep: &Keep, a: &mut EventApplied) {
    if keep.strip_identity {
        if let Some(Value::Object(user)) = ev.get_mut("user") {
            let had_ids = user
                .get("userIds")
                .and_then(Value::as_array)
                .is_some_and(|a| !a.is_empty());
            if had_ids {
                user.insert("userIds".into(), Value::Array(vec![]));
                a.ch().fields_stripped.push("user.userIds".into());
            }
        }
        a.strip_with(|s| common::remove_all(ev, &["user.userInfo", "user.externalIds"], s));
    }
    if keep.limit_sensitive {
        a.strip_with(|s| common::remove_all(ev, &["user.userInfo.title"], s));
    }
    // Hash plaintext SHA256_EMAIL values that remain.
    let mut hashed = false;
    if let Some(Value::Array(list)) = ev.pointer_mut("/user/userIds") {
        for id in list.iter_mut().filter_map(Value::as_object_mut) {
            if id.get("idType").and_then(Value::as_str) != Some(SHA256_EMAIL) {
                continue;
            }
            if let Some(Value::String(s)) = id.get_mut("idValue") {
                if !s.is_empty() && !identify::looks_hashed(s) {
                    *s = identify::hash_email_for_vendor(s);
                    hashed = true;
                }
            }
        }
    }
    if hashed {
        a.hash("user.userIds.idValue");
    }
}

impl Adapter for LinkedinCapi {
    fn name(&self) -> &str {
        "linkedin_capi"
    }
    fn display_name(&self) -> &str {
        "LinkedIn Conversions API"
    }
    fn kind(&self) -> DestKind {
        DestKind::AdPlatform
    }
    fn default_category(&self) -> Category {
        Category::Advertising
    }
    fn matches_host(&self, host: &str) -> bool {
        host == "api.linkedin.com"
    }
    fn inspects(&self, method: &Method, path: &str) -> bool {
        common::post_path_matches(method, path, &|s| s == ["rest", "conversionEvents"])
    }
    fn enforce(
        &self,
        _req: &RequestView<'_>,
        body: &[u8],
        judge: &mut dyn Judge,
    ) -> Result<Enforced, BodyError> {
        let mut root = common::parse_json(body)?;
        match root.get_mut("elements") {
            Some(Value::Array(events)) => {
                let (changed, applied) =
                    common::enforce_array(events, judge, &identify_event, &apply);
                Ok(Enforced {
                    body: changed.then(|| common::to_json(&root)),
                    events: applied,
                    query: None,
                })
            }
            Some(_) => Err(BodyError::Unreadable("`elements` is not an array".into())),
            None => common::enforce_single_value(root, judge, &identify_event, &apply),
        }
    }
    fn synthetic_ok(&self) -> SyntheticOk {
        SyntheticOk {
            status: 201,
            body: "{}",
        }
    }
    fn identifier_fields(&self) -> &str {
        "user.userIds[] (SHA256_EMAIL), user.externalIds[]"
    }
    fn ldu_signal(&self) -> &str {
        "none (identity stripped)"
    }
    fn refusal_shape(&self) -> crate::refusal::Shape {
        crate::refusal::Shape::LinkedIn
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::destinations::common::adkit;
    use serde_json::json;

    fn view() -> RequestView<'static> {
        RequestView {
            method: &Method::POST,
            host: "api.linkedin.com",
            path: "/rest/conversionEvents",
            query: None,
            content_type: Some("application/json"),
        }
    }

    fn ev(email: &str, extra: Value) -> Value {
        let mut e = json!({"conversion":"urn:lla:llaPartnerConversion:123",
            "conversionHappenedAt":1763630000000u64,
            "conversionValue":{"currencyCode":"USD","amount":"10.0"},
            "eventId":"e1",
            "user":{"userIds":[{"idType":"SHA256_EMAIL","idValue":email},
                               {"idType":"LINKEDIN_FIRST_PARTY_ADS_TRACKING_UUID","idValue":"li-fat-1"}],
                    "userInfo":{"firstName":"Pat","lastName":"Doe","title":"Oncology nurse",
                                "companyName":"Acme","countryCode":"US"}}});
        if let (Value::Object(u), Value::Object(x)) = (&mut e["user"], extra) {
            u.extend(x);
        }
        e
    }

    #[test]
    fn batch_mixed() {
        let body = common::to_json(&json!({"elements":[
            ev("Jane.Roe@Example.com", json!({})),
            ev("deny.me@example.com", json!({})),
            ev(&identify::sha256_hex(b"unknown.person@example.com"), json!({})),
            ev("opt.out@example.com", json!({"externalIds":["crm:0031x00000sso"]})),
            ev("limited@example.com", json!({})),
        ]}));
        let mut decide = adkit::decider(DestKind::AdPlatform);
        let r = LinkedinCapi.enforce(&view(), &body, &mut decide).unwrap();
        let out = r.body.unwrap();
        adkit::assert_absent(
            &out,
            &[
                "deny.me@example.com",
                "unknown.person@example.com",
                "opt.out@example.com",
                "crm:0031x00000sso",
            ],
        );
        adkit::assert_no_plaintext(&out, &["jane.roe@example.com", "limited@example.com"]);
        let v: Value = serde_json::from_slice(&out).unwrap();
        let e = v["elements"].as_array().unwrap();
        assert_eq!(e.len(), 3);
        assert_eq!(
            e[0]["user"]["userIds"][0]["idValue"],
            identify::sha256_hex(b"jane.roe@example.com")
        );
        assert_eq!(e[0]["user"]["userInfo"]["title"], "Oncology nurse");
        assert_eq!(e[1]["user"], json!({"userIds":[]}));
        assert!(r.events[3].flags_set().is_empty());
        assert!(e[2]["user"]["userInfo"].get("title").is_none());
        assert_eq!(e[2]["user"]["userInfo"]["firstName"], "Pat");
    }

    #[test]
    fn single_event_drop_and_keep() {
        let mut decide = adkit::decider(DestKind::AdPlatform);
        let denied = common::to_json(&ev("deny.me@example.com", json!({})));
        let r = LinkedinCapi.enforce(&view(), &denied, &mut decide).unwrap();
        assert!(r.events[0].verdict.is_drop());
        adkit::assert_absent(&r.body.unwrap(), &["deny.me@example.com"]);
        let h = identify::sha256_hex(b"jane.roe@example.com");
        let granted = common::to_json(&ev(&h, json!({})));
        let r = LinkedinCapi
            .enforce(&view(), &granted, &mut decide)
            .unwrap();
        assert_eq!(r.body, None);
    }

    #[test]
    fn malformed_and_routing() {
        let mut decide = adkit::decider(DestKind::AdPlatform);
        for bad in [
            &b"{\"elements\":[,]}"[..],
            &b"\"x\""[..],
            &b"{\"elements\":3}"[..],
        ] {
            assert!(matches!(
                LinkedinCapi.enforce(&view(), bad, &mut decide),
                Err(BodyError::Unreadable(_))
            ));
        }
        assert!(LinkedinCapi.inspects(&Method::POST, "/rest/conversionEvents"));
        assert!(!LinkedinCapi.inspects(&Method::POST, "/rest/conversions"));
    }
}
