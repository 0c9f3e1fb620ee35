//! Pinterest Conversions API: `POST api.pinterest.com/v5/ad_accounts/{id}/events`.
//! Events in `data[]`; the user in `user_data.em[]/ph[]/external_id[]` (hashed).
//! Limited data processing: `opt_out: true` and `custom_data.opt_out_type`
//! (comma-separated privacy flags) including `LDP`.

use super::common;
use super::{Adapter, BodyError, Enforced, EventApplied, RequestView, SyntheticOk};
use crate::decide::{EventVerdict, Keep};
use crate::identify::{self, Identifiers};
use crate::model::{Category, DestKind};
use http::Method;
use serde_json::{json, Value};

pub struct PinterestCapi;

const IDENTITY: &[&str] = &[
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
];

const SENSITIVE: &[&str] = &[
    "custom_data.content_name",
    "custom_data.content_category",
    "custom_data.content_brand",
    "custom_data.contents",
    "custom_data.content_ids",
    "custom_data.search_string",
];

const HASHED: &[(&str, common::Hasher)] = &[
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
];

fn identify_event(ev: &Value) -> Identifiers {
    let mut ids = Identifiers::new();
    common::collect(ev, &["user_data.em"], &mut ids, Identifiers::add_email);
    common::collect(ev, &["user_data.ph"], &mut ids, Identifiers::add_phone);
    common::collect(
        ev,
        &["user_data.external_id"],
        &mut ids,
        Identifiers::add_external,
    );
    ids
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

fn apply(ev: &mut Value, keep: &Keep, a: &mut EventApplied) {
    if keep.strip_identity {
        common::remove_all(ev, IDENTITY, &mut a.fields_stripped);
    }
    if keep.strip_identity || keep.ldu.is_some() {
        common::set_at(ev, "opt_out", json!(true));
        let t = with_ldp(ev.pointer("/custom_data/opt_out_type"));
        common::set_at(ev, "custom_data.opt_out_type", Value::String(t));
        a.flags_set.push("opt_out=true".into());
        a.flags_set.push("custom_data.opt_out_type=LDP".into());
    }
    if keep.limit_sensitive {
        common::reduce_urls(ev, &["event_source_url"], &mut a.fields_stripped);
        common::remove_all(ev, SENSITIVE, &mut a.fields_stripped);
    }
    common::hash_all(ev, HASHED, &mut a.hashed);
}

impl Adapter for PinterestCapi {
    fn name(&self) -> &str {
        "pinterest_capi"
    }
    fn display_name(&self) -> &str {
        "Pinterest Conversions API"
    }
    fn kind(&self) -> DestKind {
        DestKind::AdPlatform
    }
    fn default_category(&self) -> Category {
        Category::Advertising
    }
    fn matches_host(&self, host: &str) -> bool {
        host == "api.pinterest.com"
    }
    fn inspects(&self, method: &Method, path: &str) -> bool {
        common::post_path_matches(method, path, &|s| {
            matches!(s, ["v5", "ad_accounts", _, "events"])
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
            body: r#"{"num_events_received":0,"num_events_processed":0,"events":[]}"#,
        }
    }
    fn identifier_fields(&self) -> &str {
        "user_data.em[], user_data.ph[], user_data.external_id[]"
    }
    fn ldu_signal(&self) -> &str {
        "opt_out: true + custom_data.opt_out_type \"LDP\""
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
        let r = PinterestCapi.enforce(&view(), &body, &mut decide).unwrap();
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
                PinterestCapi.enforce(&view(), bad, &mut decide),
                Err(BodyError::Unreadable(_))
            ));
        }
        assert!(PinterestCapi.inspects(&Method::POST, "/v5/ad_accounts/1/events"));
        assert!(!PinterestCapi.inspects(&Method::GET, "/v5/ad_accounts/1/events"));
        assert!(!PinterestCapi.inspects(&Method::POST, "/v5/ad_accounts/1/audiences"));
    }
}
