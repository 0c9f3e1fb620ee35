//! TikTok Events API. 2.0: `POST business-api.tiktok.com/open_api/v1.3/event/track/`,
//! events in `data[]`, each naming its user in `user{email[], phone[], external_id[]}`.
//! 1.0 (what TikTok's official SDKs send): `/open_api/v1.3/pixel/track/` (one
//! event) and `/pixel/batch/` (events in `batch[]`), the user in
//! `context.user{email, phone_number, external_id, ttp}`. The 1.0 schema has no
//! limited-data-use field, so a sale/share opt-out there strips the identity only.

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
    endpoints: &[
        Endpoint {
            path: &["open_api", "v1.3", "event", "track"],
            events: Events::Array("data"),
            fields: &EVENTS_2,
        },
        Endpoint {
            path: &["open_api", "v1.3", "pixel", "track"],
            events: Events::Single,
            fields: &EVENTS_1,
        },
        Endpoint {
            path: &["open_api", "v1.3", "pixel", "batch"],
            events: Events::Array("batch"),
            fields: &EVENTS_1,
        },
    ],
    synthetic_ok: SyntheticOk {
        status: 200,
        body: r#"{"code":0,"message":"OK","data":{}}"#,
    },
    identifier_fields: "user.email[], user.phone[], user.external_id[] (1.0: context.user.email, phone_number, external_id)",
    ldu_signal: "limited_data_use: true (per event; 1.0: identity stripped)",
    refusal_shape: crate::refusal::Shape::TikTok,
    query_params: &[],
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

static EVENTS_1: Fields = Fields {
    email: &["context.user.email"],
    phone: &["context.user.phone_number"],
    external: &["context.user.external_id"],
    identity: &[
        "context.user.email",
        "context.user.phone_number",
        "context.user.external_id",
        "context.user.ttp",
        "context.ad.callback",
        "context.ip",
        "context.user_agent",
    ],
    identity_object: Some("context.user"),
    urls: &["context.page.url", "context.page.referrer"],
    sensitive: Sensitive::Remove(&[
        "properties.contents",
        "properties.query",
        "properties.description",
    ]),
    hashed: &[
        ("context.user.email", identify::hash_email_for_vendor),
        (
            "context.user.phone_number",
            identify::hash_phone_e164_for_vendor,
        ),
        ("context.user.external_id", common::hash_trimmed_lowercase),
    ],
    ldu: None,
};

fn limited_data_use(ev: &mut Value, _: Ldu, a: &mut EventApplied) {
    common::set_at(ev, "limited_data_use", json!(true));
    a.ch().flags_set.push("limited_data_use=true".into());
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
        assert!(TIKTOK.inspects(&Method::POST, "/open_api/v1.3/pixel/track/"));
        assert!(TIKTOK.inspects(&Method::POST, "/open_api/v1.3/pixel/batch/"));
        assert!(!TIKTOK.inspects(&Method::POST, "/open_api/v1.3/pixel/list/"));
    }

    fn ev1(email: &str, phone: &str) -> Value {
        json!({"type": "track", "event": "SubmitForm", "event_id": "e1", "timestamp": "2026-11-20T10:00:00Z",
               "context": {"user": {"email": email, "phone_number": phone, "ttp": "cookie"},
                           "ip": "203.0.113.4", "user_agent": "UA",
                           "page": {"url": "https://hospital.example/oncology?x=1"}},
               "properties": {"query": "chemo", "value": 1}})
    }

    /// Events 1.0, as TikTok's official SDKs send them: one event on
    /// `pixel/track`, several in `batch[]` on `pixel/batch`.
    #[test]
    fn events_1_track_and_batch() {
        let mut decide = adkit::decider(DestKind::AdPlatform);
        let path = "/open_api/v1.3/pixel/batch/";
        let view = RequestView { path, ..view() };
        let body = common::to_json(&json!({"pixel_code": "PX", "batch": [
            ev1("Jane.Roe@Example.com", "+1 415 555 0100"),
            ev1("deny.me@example.com", "+14155550102"),
            ev1("opt.out@example.com", "+14155550103"),
            ev1("limited@example.com", "+12065550104"),
        ]}));
        let r = TIKTOK.enforce(&view, &body, &mut decide).unwrap();
        let out = r.body.unwrap();
        adkit::assert_absent(
            &out,
            &[
                "deny.me@example.com",
                "+14155550102",
                "opt.out@example.com",
                "+14155550103",
            ],
        );
        adkit::assert_no_plaintext(&out, &["jane.roe@example.com", "limited@example.com"]);
        let v: Value = serde_json::from_slice(&out).unwrap();
        let b = v["batch"].as_array().unwrap();
        assert_eq!(b.len(), 3);
        assert_eq!(
            b[0]["context"]["user"]["email"],
            identify::sha256_hex(b"jane.roe@example.com")
        );
        assert_eq!(
            b[0]["context"]["user"]["phone_number"],
            identify::sha256_hex(b"+14155550100")
        );
        assert_eq!(
            b[1]["context"]["user"],
            json!({}),
            "opted out: identity stripped"
        );
        assert!(b[1]["context"].get("ip").is_none());
        assert_eq!(b[2]["context"]["page"]["url"], "https://hospital.example/");
        assert!(b[2]["properties"].get("query").is_none());
        let one = common::to_json(&ev1("deny.me@example.com", "+14155550102"));
        let view = RequestView {
            path: "/open_api/v1.3/pixel/track/",
            ..view
        };
        let r = TIKTOK.enforce(&view, &one, &mut decide).unwrap();
        assert!(r.events[0].verdict.is_drop());
    }
}
