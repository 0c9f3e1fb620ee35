//! TikTok Events API 2.0: `POST business-api.tiktok.com/open_api/v1.3/event/track/`.
//! Events in `data[]`; each names its user in `user{email[], phone[], external_id[]}`.

use super::adspec::{AdSpec, Endpoint, Events, Fields, Sensitive};
use super::common;
use super::{EventApplied, SyntheticOk};
use crate::decide::Ldu;
use crate::identify;
use serde_json::{json, Value};

pub(crate) static SPEC: AdSpec = AdSpec {
    name: "tiktok_events",
    display_name: "TikTok Events API",
    hosts: &["business-api.tiktok.com"],
    endpoints: &[Endpoint {
        path: &["open_api", "v1.3", "event", "track"],
        events: Events::Array("data"),
        fields: &EVENTS_2,
    }],
    synthetic_ok: SyntheticOk {
        status: 200,
        body: r#"{"code":0,"message":"OK","data":{}}"#,
    },
    identifier_fields: "user.email[], user.phone[], user.external_id[]",
    ldu_signal: "limited_data_use: true (per event)",
};

static EVENTS_2: Fields = Fields {
    email: &["user.email"],
    phone: &["user.phone"],
    external: &["user.external_id"],
    identity: &[
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
    ],
    identity_object: None,
    urls: &["page.url", "page.referrer"],
    sensitive: Sensitive::Remove(&[
        "properties.contents",
        "properties.query",
        "properties.description",
        "properties.search_string",
        "properties.content_name",
        "properties.content_category",
    ]),
    hashed: &[
        ("user.email", identify::hash_email_for_vendor),
        ("user.phone", identify::hash_phone_e164_for_vendor),
        ("user.external_id", common::hash_trimmed_lowercase),
    ],
    ldu: Some(limited_data_use),
};

fn limited_data_use(ev: &mut Value, _: Ldu, a: &mut EventApplied) {
    common::set_at(ev, "limited_data_use", json!(true));
    a.flags_set.push("limited_data_use=true".into());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::destinations::adspec::AdPlatform;
    use crate::destinations::common::adkit;
    use crate::destinations::{Adapter, BodyError, RequestView};
    use crate::model::DestKind;
    use http::Method;

    const TIKTOK: AdPlatform = AdPlatform(&SPEC);
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
        let r = TIKTOK.enforce(&view(), &body, &mut decide).unwrap();
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
                TIKTOK.enforce(&view(), bad, &mut decide),
                Err(BodyError::Unreadable(_))
            ));
        }
        assert!(TIKTOK.inspects(&Method::POST, "/open_api/v1.3/event/track"));
        assert!(TIKTOK.inspects(&Method::POST, "/open_api/v1.3/event/track/"));
        assert!(!TIKTOK.inspects(&Method::POST, "/open_api/v1.3/pixel/track/"));
    }
}
