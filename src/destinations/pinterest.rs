//! Pinterest Conversions API: `POST api.pinterest.com/v5/ad_accounts/{id}/events`.
//! Events in `data[]`; the user in `user_data.em[]/ph[]/external_id[]` (hashed).
//! Limited data processing: `opt_out: true` and `custom_data.opt_out_type`
//! (comma-separated privacy flags) including `LDP`.

use super::adspec::{AdSpec, Endpoint, Events, Fields, Sensitive};
use super::common;
use super::{EventApplied, SyntheticOk};
use crate::decide::Ldu;
use crate::identify;
use serde_json::{json, Value};

pub(crate) static SPEC: AdSpec = AdSpec {
    name: "pinterest_capi",
    display_name: "Pinterest Conversions API",
    hosts: &["api.pinterest.com"],
    endpoints: &[Endpoint {
        path: &["v5", "ad_accounts", "*", "events"],
        events: Events::Array("data"),
        fields: &FIELDS,
    }],
    synthetic_ok: SyntheticOk {
        status: 200,
        body: r#"{"num_events_received":0,"num_events_processed":0,"events":[]}"#,
    },
    identifier_fields: "user_data.em[], user_data.ph[], user_data.external_id[]",
    ldu_signal: "opt_out: true + custom_data.opt_out_type \"LDP\"",
    refusal_shape: crate::refusal::Shape::Pinterest,
    query_params: &["test"],
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
        "user_data.external_id",
        "user_data.hashed_maids",
        "user_data.client_ip_address",
        "user_data.client_user_agent",
        "user_data.click_id",
        "user_data.partner_id",
    ],
    identity_object: None,
    urls: &["event_source_url"],
    sensitive: Sensitive::Remove(&[
        "custom_data.content_name",
        "custom_data.content_category",
        "custom_data.content_brand",
        "custom_data.contents",
        "custom_data.content_ids",
        "custom_data.search_string",
    ]),
    hashed: &[
        ("user_data.em", identify::hash_email_for_vendor),
        ("user_data.ph", identify::hash_phone_digits_for_vendor),
        ("user_data.fn", common::hash_trimmed_lowercase),
        ("user_data.ln", common::hash_trimmed_lowercase),
        ("user_data.ge", common::hash_trimmed_lowercase),
        ("user_data.db", common::hash_trimmed_lowercase),
        ("user_data.ct", common::hash_trimmed_lowercase),
        ("user_data.st", common::hash_trimmed_lowercase),
        ("user_data.zp", common::hash_trimmed_lowercase),
        ("user_data.country", common::hash_trimmed_lowercase),
        ("user_data.external_id", common::hash_trimmed_lowercase),
        ("user_data.hashed_maids", common::hash_trimmed_lowercase),
    ],
    ldu: Some(limited_data_processing),
};

/// `opt_out: true` and `LDP` added to `custom_data.opt_out_type`'s comma list.
fn limited_data_processing(ev: &mut Value, _: Ldu, a: &mut EventApplied) {
    common::set_at(ev, "opt_out", json!(true));
    let t = with_ldp(ev.pointer("/custom_data/opt_out_type"));
    common::set_at(ev, "custom_data.opt_out_type", Value::String(t));
    a.ch().flags_set.push("opt_out=true".into());
    a.ch().flags_set.push("custom_data.opt_out_type=LDP".into());
}

/// `opt_out_type` with `LDP` added to its comma list (kept if already there).
fn with_ldp(current: Option<&Value>) -> String {
    match current.and_then(Value::as_str).map(str::trim) {
        Some(s) if !s.is_empty() => {
            if s.split(',').any(|f| f.trim() == "LDP") {
                s.to_string()
            } else {
                format!("{s},LDP")
            }
        }
        _ => "LDP".to_string(),
    }
}

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

    const PINTEREST: AdPlatform = AdPlatform(&SPEC);

    fn view() -> RequestView<'static> {
        RequestView {
            method: &Method::POST,
            host: "api.pinterest.com",
            path: "/v5/ad_accounts/549755885175/events",
            query: Some("test=true"),
            content_type: Some("application/json"),
        }
    }

    fn ev(user: Value, custom: Value) -> Value {
        json!({"event_name":"lead","action_source":"web","event_time":1763630000,
               "event_id":"e1","event_source_url":"https://hospital.example/ivf/consult?ref=ad",
               "user_data": user, "custom_data": custom})
    }

    #[test]
    fn mixed_batch() {
        let c = json!({"currency":"USD","value":"10","content_name":"IVF consult",
                       "search_string":"fertility","content_ids":["ivf-1"]});
        let body = common::to_json(&json!({"data":[
            ev(json!({"em":["Jane.Roe@Example.com"],"ph":["+1 415 555 0100"],
                      "client_ip_address":"203.0.113.2"}), c.clone()),
            ev(json!({"em":[identify::sha256_hex(b"deny.me@example.com")]}), c.clone()),
            ev(json!({"em":["unknown.person@example.com"]}), c.clone()),
            ev(json!({"em":["opt.out@example.com"],"ph":["14155550103"],"click_id":"dj0y",
                      "client_user_agent":"UA"}),
               json!({"currency":"USD","opt_out_type":"CCPA"})),
            ev(json!({"em":["limited@example.com"]}), c.clone()),
        ]}));
        let mut decide = adkit::decider(DestKind::AdPlatform);
        let r = PINTEREST.enforce(&view(), &body, &mut decide).unwrap();
        let out = r.body.unwrap();
        adkit::assert_absent(
            &out,
            &[
                "deny.me@example.com",
                "unknown.person@example.com",
                "opt.out@example.com",
                "+14155550103",
            ],
        );
        adkit::assert_no_plaintext(&out, &["jane.roe@example.com", "limited@example.com"]);
        let v: Value = serde_json::from_slice(&out).unwrap();
        let d = v["data"].as_array().unwrap();
        assert_eq!(d.len(), 3);
        assert_eq!(
            d[0]["user_data"]["em"][0],
            identify::sha256_hex(b"jane.roe@example.com")
        );
        assert_eq!(
            d[0]["user_data"]["ph"][0],
            identify::sha256_hex(b"14155550100")
        );
        assert_eq!(d[1]["user_data"], json!({}));
        assert_eq!(d[1]["opt_out"], true);
        assert_eq!(d[1]["custom_data"]["opt_out_type"], "CCPA,LDP");
        assert_eq!(d[2]["event_source_url"], "https://hospital.example/");
        assert_eq!(d[2]["custom_data"], json!({"currency":"USD","value":"10"}));
        assert!(d[2].get("opt_out").is_none());
    }

    #[test]
    fn ldp_flag_is_added_once() {
        assert_eq!(with_ldp(None), "LDP");
        assert_eq!(with_ldp(Some(&json!("LDP"))), "LDP");
        assert_eq!(with_ldp(Some(&json!("CCPA, LDP"))), "CCPA, LDP");
        assert_eq!(with_ldp(Some(&json!("CCPA"))), "CCPA,LDP");
    }

    #[test]
    fn malformed_and_routing() {
        let mut decide = adkit::decider(DestKind::AdPlatform);
        for bad in [&b"{\"data\":[{]}"[..], &b"{}"[..]] {
            assert!(matches!(
                PINTEREST.enforce(&view(), bad, &mut decide),
                Err(BodyError::Unreadable(_))
            ));
        }
        assert!(PINTEREST.inspects(&Method::POST, "/v5/ad_accounts/1/events"));
        assert!(!PINTEREST.inspects(&Method::GET, "/v5/ad_accounts/1/events"));
        assert!(!PINTEREST.inspects(&Method::POST, "/v5/ad_accounts/1/audiences"));
    }
}
