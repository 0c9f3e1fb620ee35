//! Snap Conversions API v3: `POST tr.snapchat.com/v3/{pixel_or_app_id}/events`.
//! Events in `data[]`; the user in `user_data.em[]/ph[]/external_id`.
//!
//! Snap's limited-data-use field names are unconfirmed, so no wire field is
//! invented: a sale/share opt-out strips the identity only.

use super::adspec::{AdSpec, Endpoint, Events, Fields, Sensitive};
use super::common;
use super::SyntheticOk;
use crate::identify;

pub(crate) static SPEC: AdSpec = AdSpec {
    name: "snap_capi",
    display_name: "Snap Conversions API",
    hosts: &["tr.snapchat.com"],
    endpoints: &[Endpoint {
        path: &["v3", "*", "events"],
        events: Events::Array("data"),
        fields: &FIELDS,
    }],
    synthetic_ok: SyntheticOk {
        status: 200,
        body: r#"{"status":"VALID","reason":"","data":[]}"#,
    },
    identifier_fields: "user_data.em[], user_data.ph[], user_data.external_id",
    ldu_signal: "none confirmed (identity stripped)",
    refusal_shape: crate::refusal::Shape::Snap,
    query_params: &["access_token"],
};

static FIELDS: Fields = Fields {
    email: &["user_data.em"],
    phone: &["user_data.ph"],
    external: &["user_data.external_id"],
    identity: &[
        "user_data.em",
        "user_data.ph",
        "user_data.fn",
        "user_data.ln",
        "user_data.ge",
        "user_data.db",
        "user_data.ct",
        "user_data.st",
        "user_data.zp",
        "user_data.country",
        "user_data.client_ip_address",
        "user_data.client_user_agent",
        "user_data.sc_click_id",
        "user_data.sc_cookie1",
        "user_data.madid",
        "user_data.external_id",
    ],
    identity_object: None,
    urls: &["event_source_url"],
    sensitive: Sensitive::Remove(&[
        "custom_data.contents",
        "custom_data.content_ids",
        "custom_data.content_category",
        "custom_data.content_name",
        "custom_data.search_string",
    ]),
    hashed: &[
        ("user_data.em", identify::hash_email_for_vendor),
        ("user_data.ph", identify::hash_phone_digits_for_vendor),
        ("user_data.fn", common::hash_trimmed_lowercase),
        ("user_data.ln", common::hash_trimmed_lowercase),
    ],
    ldu: None,
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::destinations::adspec::AdPlatform;
    use crate::destinations::common::adkit;
    use crate::destinations::{Adapter, BodyError, RequestView};
    use crate::identify;
    use crate::model::DestKind;
    use http::Method;
    use serde_json::{json, Value};

    const SNAP: AdPlatform = AdPlatform(&SPEC);

    fn view() -> RequestView<'static> {
        RequestView {
            method: &Method::POST,
            host: "tr.snapchat.com",
            path: "/v3/PIXEL-1/events",
            query: Some("access_token=t"),
            content_type: Some("application/json"),
        }
    }

    fn ev(user: Value) -> Value {
        json!({"event_name":"SIGN_UP","action_source":"WEB","event_time":1763630000,
               "event_source_url":"https://hospital.example/mental-health/intake?step=2",
               "user_data": user,
               "custom_data":{"currency":"USD","value":5,"content_category":"psychiatry",
                              "content_ids":["p-1"],"search_string":"anxiety"}})
    }

    #[test]
    fn mixed_batch() {
        let body = common::to_json(&json!({"test_event_code":"T1","data":[
            ev(json!({"em":["Jane.Roe@Example.com"],"ph":["+1 415 555 0100"],"fn":["Jane"]})),
            ev(json!({"em":["deny.me@example.com"]})),
            ev(json!({"ph":["+15555550199"]})),
            ev(json!({"em":["opt.out@example.com"],"sc_click_id":"sc1","sc_cookie1":"c1",
                      "client_ip_address":"203.0.113.8"})),
            ev(json!({"em":["limited@example.com"]})),
        ]}));
        let mut decide = adkit::decider(DestKind::AdPlatform);
        let r = SNAP.enforce(&view(), &body, &mut decide).unwrap();
        let out = r.body.unwrap();
        adkit::assert_absent(
            &out,
            &[
                "deny.me@example.com",
                "+15555550199",
                "opt.out@example.com",
                "203.0.113.8",
            ],
        );
        adkit::assert_no_plaintext(&out, &["jane.roe@example.com", "limited@example.com"]);
        let v: Value = serde_json::from_slice(&out).unwrap();
        let d = v["data"].as_array().unwrap();
        assert_eq!(d.len(), 3);
        assert_eq!(
            d[0]["user_data"]["ph"][0],
            identify::sha256_hex(b"14155550100")
        );
        assert_eq!(d[0]["user_data"]["fn"][0], identify::sha256_hex(b"jane"));
        assert_eq!(d[1]["user_data"], json!({}));
        assert!(r.events[3].flags_set().is_empty());
        assert_eq!(d[2]["event_source_url"], "https://hospital.example/");
        assert_eq!(d[2]["custom_data"], json!({"currency":"USD","value":5}));
    }

    #[test]
    fn malformed_and_routing() {
        let mut decide = adkit::decider(DestKind::AdPlatform);
        for bad in [&b"not json"[..], &b"{\"data\":\"x\"}"[..]] {
            assert!(matches!(
                SNAP.enforce(&view(), bad, &mut decide),
                Err(BodyError::Unreadable(_))
            ));
        }
        assert!(SNAP.inspects(&Method::POST, "/v3/PIXEL-1/events"));
        assert!(!SNAP.inspects(&Method::POST, "/v2/conversion"));
    }
}
