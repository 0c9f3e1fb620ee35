//! TikTok Events API 2.0: `POST business-api.tiktok.com/open_api/v1.3/event/track/`.
//! Events in `data[]`; each names its user in `user{email[], phone[], external_id[]}`.

use super::common;
use super::{Adapter, BodyError, Enforced, EventApplied, RequestView, SyntheticOk};
use crate::decide::{EventVerdict, Keep};
use crate::identify::{self, Identifiers};
use crate::model::{Category, DestKind};
use http::Method;
use serde_json::{json, Value};

pub struct TiktokEvents;

const IDENTITY: &[&str] = &[
    "user.email",
    "user.phone",
    "user.external_id",
    "user.ttclid",
    "user.ttp",
    "user.ip",
    "user.user_agent",
    "user.first_name",
    "user.last_name",
    "user.city",
    "user.state",
    "user.country",
    "user.zip_code",
    "user.locale",
    "lead.lead_id",
];

const URLS: &[&str] = &["page.url", "page.referrer"];

const SENSITIVE: &[&str] = &[
    "properties.contents",
    "properties.query",
    "properties.description",
    "properties.search_string",
    "properties.content_name",
    "properties.content_category",
];

const HASHED: &[(&str, common::Hasher)] = &[
    ("user.email", identify::hash_email_for_vendor),
    ("user.phone", identify::hash_phone_e164_for_vendor),
    ("user.external_id", common::hash_trimmed_lowercase),
];

fn identify_event(ev: &Value) -> Identifiers {
    let mut ids = Identifiers::new();
    common::collect(ev, &["user.email"], &mut ids, Identifiers::add_email);
    common::collect(ev, &["user.phone"], &mut ids, Identifiers::add_phone);
    common::collect(
        ev,
        &["user.external_id"],
        &mut ids,
        Identifiers::add_external,
    );
    ids
}

fn apply(ev: &mut Value, keep: &Keep, a: &mut EventApplied) {
    if keep.strip_identity {
        common::remove_all(ev, IDENTITY, &mut a.fields_stripped);
    }
    if keep.strip_identity || keep.ldu.is_some() {
        common::set_at(ev, "limited_data_use", json!(true));
        a.flags_set.push("limited_data_use=true".into());
    }
    if keep.limit_sensitive {
        common::reduce_urls(ev, URLS, &mut a.fields_stripped);
        common::remove_all(ev, SENSITIVE, &mut a.fields_stripped);
    }
    common::hash_all(ev, HASHED, &mut a.hashed);
}

impl Adapter for TiktokEvents {
    fn name(&self) -> &str {
        "tiktok_events"
    }
    fn display_name(&self) -> &str {
        "TikTok Events API"
    }
    fn kind(&self) -> DestKind {
        DestKind::AdPlatform
    }
    fn default_category(&self) -> Category {
        Category::Advertising
    }
    fn matches_host(&self, host: &str) -> bool {
        host == "business-api.tiktok.com"
    }
    fn inspects(&self, method: &Method, path: &str) -> bool {
        common::post_path_matches(method, path, &|s| {
            s == ["open_api", "v1.3", "event", "track"]
        })
    }
    fn enforce(
        &self,
        _req: &RequestView<'_>,
        body: &[u8],
        decide: &mut dyn FnMut(&Identifiers) -> EventVerdict,
    ) -> Result<Enforced, BodyError> {
        common::enforce_json_batch(body, "data", decide, &identify_event, &apply)
    }
    fn synthetic_ok(&self) -> SyntheticOk {
        SyntheticOk {
            status: 200,
            body: r#"{"code":0,"message":"OK","data":{}}"#,
        }
    }
    fn identifier_fields(&self) -> &str {
        "user.email[], user.phone[], user.external_id[]"
    }
    fn ldu_signal(&self) -> &str {
        "limited_data_use: true (per event)"
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
            host: "business-api.tiktok.com",
            path: "/open_api/v1.3/event/track/",
            query: None,
            content_type: Some("application/json"),
        }
    }

    fn ev(user: Value) -> Value {
        json!({"event":"SubmitForm","event_time":1763630000,"event_id":"e1",
               "user": user,
               "page":{"url":"https://hospital.example/oncology?x=1","referrer":"https://hospital.example/search?q=chemo"},
               "properties":{"currency":"USD","value":1,"query":"chemo",
                             "contents":[{"content_id":"c1","content_name":"Chemo"}]}})
    }

    #[test]
    fn mixed_batch() {
        let body = common::to_json(
            &json!({"event_source":"web","event_source_id":"PIXEL","data":[
                ev(json!({"email":["Jane.Roe@Example.com"],"phone":["+1 (415) 555-0100"],
                          "external_id":["CRM:0031x00000abc"],"ip":"203.0.113.4"})),
                ev(json!({"email":["deny.me@example.com"],"phone":["+14155550102"]})),
                ev(json!({"email":["unknown.person@example.com"]})),
                ev(json!({"email":[identify::sha256_hex(b"opt.out@example.com")],
                          "phone":["+14155550103"],"ttclid":"E.C.P.x","ttp":"abc","user_agent":"UA"})),
                ev(json!({"email":["limited@example.com"]})),
            ]}),
        );
        let mut decide = adkit::decider(DestKind::AdPlatform);
        let r = TiktokEvents.enforce(&view(), &body, &mut decide).unwrap();
        let out = r.body.unwrap();
        adkit::assert_absent(
            &out,
            &[
                "deny.me@example.com",
                "+14155550102",
                "unknown.person@example.com",
                "opt.out@example.com",
                "+14155550103",
            ],
        );
        adkit::assert_no_plaintext(&out, &["jane.roe@example.com", "limited@example.com"]);
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["event_source_id"], "PIXEL");
        let d = v["data"].as_array().unwrap();
        assert_eq!(d.len(), 3);
        let u = &d[0]["user"];
        assert_eq!(u["email"][0], identify::sha256_hex(b"jane.roe@example.com"));
        assert_eq!(u["phone"][0], identify::sha256_hex(b"+14155550100"));
        assert_eq!(
            u["external_id"][0],
            identify::sha256_hex(b"crm:0031x00000abc")
        );
        assert!(d[0].get("limited_data_use").is_none());
        assert_eq!(d[1]["user"], json!({}));
        assert_eq!(d[1]["limited_data_use"], true);
        assert_eq!(d[1]["page"]["url"], "https://hospital.example/oncology?x=1");
        assert_eq!(d[2]["page"]["url"], "https://hospital.example/");
        assert_eq!(d[2]["page"]["referrer"], "https://hospital.example/");
        assert_eq!(d[2]["properties"], json!({"currency":"USD","value":1}));
    }

    #[test]
    fn malformed_and_routing() {
        let mut decide = adkit::decider(DestKind::AdPlatform);
        for bad in [&b"{\"data\":[}"[..], &b"{\"data\":null}"[..]] {
            assert!(matches!(
                TiktokEvents.enforce(&view(), bad, &mut decide),
                Err(BodyError::Unreadable(_))
            ));
        }
        assert!(TiktokEvents.inspects(&Method::POST, "/open_api/v1.3/event/track"));
        assert!(TiktokEvents.inspects(&Method::POST, "/open_api/v1.3/event/track/"));
        assert!(!TiktokEvents.inspects(&Method::POST, "/open_api/v1.3/pixel/track/"));
    }
}
