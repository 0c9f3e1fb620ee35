//! Snap Conversions API v3: `POST tr.snapchat.com/v3/{pixel_or_app_id}/events`.
//! Events in `data[]`; the user in `user_data.em[]/ph[]/external_id`.
//!
//! Snap's limited-data-use field names are unconfirmed, so no wire field is
//! invented: a sale/share opt-out strips the identity only.

use super::common;
use super::{Adapter, BodyError, Enforced, EventApplied, RequestView, SyntheticOk};
use crate::decide::{EventVerdict, Keep};
use crate::identify::{self, Identifiers};
use crate::model::{Category, DestKind};
use http::Method;
use serde_json::Value;

pub struct SnapCapi;

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
    "user_data.client_ip_address",
    "user_data.client_user_agent",
    "user_data.sc_click_id",
    "user_data.sc_cookie1",
    "user_data.madid",
    "user_data.external_id",
];

const SENSITIVE: &[&str] = &[
    "custom_data.contents",
    "custom_data.content_ids",
    "custom_data.content_category",
    "custom_data.content_name",
    "custom_data.search_string",
];

const HASHED: &[(&str, common::Hasher)] = &[
    ("user_data.em", identify::hash_email_for_vendor),
    ("user_data.ph", identify::hash_phone_digits_for_vendor),
    ("user_data.fn", common::hash_trimmed_lowercase),
    ("user_data.ln", common::hash_trimmed_lowercase),
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

fn apply(ev: &mut Value, keep: &Keep, a: &mut EventApplied) {
    if keep.strip_identity {
        common::remove_all(ev, IDENTITY, &mut a.fields_stripped);
    }
    if keep.limit_sensitive {
        common::reduce_urls(ev, &["event_source_url"], &mut a.fields_stripped);
        common::remove_all(ev, SENSITIVE, &mut a.fields_stripped);
    }
    common::hash_all(ev, HASHED, &mut a.hashed);
}

impl Adapter for SnapCapi {
    fn name(&self) -> &str {
        "snap_capi"
    }
    fn display_name(&self) -> &str {
        "Snap Conversions API"
    }
    fn kind(&self) -> DestKind {
        DestKind::AdPlatform
    }
    fn default_category(&self) -> Category {
        Category::Advertising
    }
    fn matches_host(&self, host: &str) -> bool {
        host == "tr.snapchat.com"
    }
    fn inspects(&self, method: &Method, path: &str) -> bool {
        common::post_path_matches(method, path, &|s| matches!(s, ["v3", _, "events"]))
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
            body: r#"{"status":"VALID","reason":"","data":[]}"#,
        }
    }
    fn identifier_fields(&self) -> &str {
        "user_data.em[], user_data.ph[], user_data.external_id"
    }
    fn ldu_signal(&self) -> &str {
        "none confirmed (identity stripped)"
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
        let r = SnapCapi.enforce(&view(), &body, &mut decide).unwrap();
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
        assert!(r.events[3].flags_set.is_empty());
        assert_eq!(d[2]["event_source_url"], "https://hospital.example/");
        assert_eq!(d[2]["custom_data"], json!({"currency":"USD","value":5}));
    }

    #[test]
    fn malformed_and_routing() {
        let mut decide = adkit::decider(DestKind::AdPlatform);
        for bad in [&b"not json"[..], &b"{\"data\":\"x\"}"[..]] {
            assert!(matches!(
                SnapCapi.enforce(&view(), bad, &mut decide),
                Err(BodyError::Unreadable(_))
            ));
        }
        assert!(SnapCapi.inspects(&Method::POST, "/v3/PIXEL-1/events"));
        assert!(!SnapCapi.inspects(&Method::POST, "/v2/conversion"));
    }
}
