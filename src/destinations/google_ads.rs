//! Google Ads API conversion upload (REST):
//! `POST googleads.googleapis.com/v{N}/customers/{id}:uploadClickConversions`,
//! `:uploadCallConversions` (events in `conversions[]`) and
//! `:uploadConversionAdjustments` (events in `conversionAdjustments[]`).
//! `partialFailure: true` is mandatory, so dropping single conversions is safe.

use super::common;
use super::{Adapter, BodyError, Enforced, EventApplied, Judge, RequestView, SyntheticOk};
use crate::decide::Keep;
use crate::identify::{self, Identifiers};
use crate::model::{Category, DestKind};
use http::Method;
use serde_json::{json, Value};

pub(crate) struct GoogleAds;

const METHODS: &[&str] = &[
    "uploadClickConversions",
    "uploadCallConversions",
    "uploadConversionAdjustments",
];

/// Identity fields. `callerId` goes too: the call conversion then carries no
/// caller, but the event itself is kept (consent allowed it).
const IDENTITY: &[&str] = &[
    "userIdentifiers",
    "gclid",
    "gbraid",
    "wbraid",
    "gclidDateTimePair.gclid",
    "userIpAddress",
    "callerId",
    "userAgent",
    "sessionAttributesEncoded",
    "sessionAttributesKeyValuePairs",
];

const SENSITIVE: &[&str] = &["customVariables", "cartData"];

const HASHED: &[(&str, common::Hasher)] = &[
    ("userIdentifiers.hashedEmail", common::hash_email_google),
    (
        "userIdentifiers.hashedPhoneNumber",
        identify::hash_phone_e164_for_vendor,
    ),
    (
        "userIdentifiers.addressInfo.hashedFirstName",
        common::hash_trimmed_lowercase,
    ),
    (
        "userIdentifiers.addressInfo.hashedLastName",
        common::hash_trimmed_lowercase,
    ),
    (
        "userIdentifiers.addressInfo.hashedStreetAddress",
        common::hash_trimmed_lowercase,
    ),
];

fn identify_event(ev: &Value) -> Identifiers {
    let mut ids = Identifiers::new();
    common::collect(
        ev,
        &["userIdentifiers.hashedEmail"],
        &mut ids,
        Identifiers::add_email,
    );
    common::collect(
        ev,
        &["userIdentifiers.hashedPhoneNumber", "callerId"],
        &mut ids,
        Identifiers::add_phone,
    );
    ids
}

/// Click and call conversions carry `consent.adUserData`.
fn apply(ev: &mut Value, keep: &Keep, a: &mut EventApplied) {
    apply_with(ev, keep, a, true);
}

/// `ConversionAdjustment` has no `consent` field (an unknown field would fail
/// the whole upload): identity is stripped, no signal is set.
fn apply_adjustment(ev: &mut Value, keep: &Keep, a: &mut EventApplied) {
    apply_with(ev, keep, a, false);
}

fn apply_with(ev: &mut Value, keep: &Keep, a: &mut EventApplied, consent_field: bool) {
    if keep.strip_identity {
        a.strip_with(|s| common::remove_all(ev, IDENTITY, s));
    }
    if consent_field && (keep.strip_identity || keep.ldu.is_some()) {
        common::set_at(ev, "consent.adUserData", json!("DENIED"));
        a.ch().flags_set.push("consent.adUserData=DENIED".into());
    }
    if keep.limit_sensitive {
        a.strip_with(|s| common::remove_all(ev, SENSITIVE, s));
    }
    a.hash_with(|h| common::hash_all(ev, HASHED, h));
}

/// The upload method named after the `:` of the last path segment.
fn upload_method(path: &str) -> Option<&str> {
    let last = path.trim_end_matches('/').rsplit('/').next()?;
    let (_, m) = last.split_once(':')?;
    METHODS.iter().find(|x| **x == m).copied()
}

impl Adapter for GoogleAds {
    fn name(&self) -> &str {
        "google_ads"
    }
    fn display_name(&self) -> &str {
        "Google Ads API conversion upload"
    }
    fn kind(&self) -> DestKind {
        DestKind::AdPlatform
    }
    fn default_category(&self) -> Category {
        Category::Advertising
    }
    fn matches_host(&self, host: &str) -> bool {
        host == "googleads.googleapis.com"
    }
    fn inspects(&self, method: &Method, path: &str) -> bool {
        common::post_path_matches(method, path, &|s| match s {
            [v, "customers", last] => {
                v.len() > 1
                    && v.starts_with('v')
                    && v[1..].bytes().all(|b| b.is_ascii_digit())
                    && last
                        .split_once(':')
                        .is_some_and(|(id, m)| !id.is_empty() && METHODS.contains(&m))
            }
            _ => false,
        })
    }
    fn enforce(
        &self,
        req: &RequestView<'_>,
        body: &[u8],
        judge: &mut dyn Judge,
    ) -> Result<Enforced, BodyError> {
        match upload_method(req.path) {
            Some("uploadConversionAdjustments") => common::enforce_json_batch(
                body,
                "conversionAdjustments",
                judge,
                &identify_event,
                &apply_adjustment,
            ),
            _ => common::enforce_json_batch(body, "conversions", judge, &identify_event, &apply),
        }
    }
    fn synthetic_ok(&self) -> SyntheticOk {
        SyntheticOk {
            status: 200,
            body: r#"{"results":[],"partialFailureError":null}"#,
        }
    }
    fn identifier_fields(&self) -> &str {
        "userIdentifiers[].hashedEmail, userIdentifiers[].hashedPhoneNumber, callerId"
    }
    fn ldu_signal(&self) -> &str {
        "consent.adUserData DENIED (click/call conversions; adjustments: identity stripped)"
    }
    fn refusal_shape(&self) -> crate::refusal::Shape {
        crate::refusal::Shape::Google
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::destinations::common::adkit;
    use serde_json::json;

    fn view(path: &'static str) -> RequestView<'static> {
        RequestView {
            method: &Method::POST,
            host: "googleads.googleapis.com",
            path,
            query: None,
            content_type: Some("application/json"),
        }
    }

    fn conv(ids: Value) -> Value {
        json!({"conversionAction":"customers/123/conversionActions/9",
               "conversionDateTime":"2026-11-20 10:00:00+00:00",
               "conversionValue":10,"currencyCode":"USD","orderId":"ord-1",
               "gclid":"Cj0KCQ-gclid","userIpAddress":"203.0.113.5",
               "customVariables":[{"conversionCustomVariable":"customers/123/conversionCustomVariables/1","value":"oncology"}],
               "cartData":{"items":[{"productId":"chemo-1"}]},
               "userIdentifiers": ids})
    }

    #[test]
    fn click_conversions_mixed_batch() {
        let body = common::to_json(&json!({"partialFailure":true,"conversions":[
            conv(json!([{"hashedEmail":"Jane.Roe@Example.com","userIdentifierSource":"FIRST_PARTY"},
                        {"hashedPhoneNumber":"+1 415-555-0100"}])),
            conv(json!([{"hashedEmail": identify::sha256_hex(b"deny.me@example.com")}])),
            conv(json!([{"hashedEmail":"unknown.person@example.com"}])),
            conv(json!([{"hashedEmail":"opt.out@example.com"},{"hashedPhoneNumber":"+14155550103"}])),
            conv(json!([{"hashedEmail":"limited@example.com"}])),
        ]}));
        let mut decide = adkit::decider(DestKind::AdPlatform);
        let r = GoogleAds
            .enforce(
                &view("/v21/customers/1234567890:uploadClickConversions"),
                &body,
                &mut decide,
            )
            .unwrap();
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
        assert_eq!(v["partialFailure"], true);
        let c = v["conversions"].as_array().unwrap();
        assert_eq!(c.len(), 3);
        assert_eq!(
            c[0]["userIdentifiers"][0]["hashedEmail"],
            identify::sha256_hex(b"jane.roe@example.com")
        );
        assert_eq!(
            c[0]["userIdentifiers"][1]["hashedPhoneNumber"],
            identify::sha256_hex(b"+14155550100")
        );
        assert_eq!(c[0]["gclid"], "Cj0KCQ-gclid");
        // P-1003: identity stripped, consent denied, order id kept.
        for k in ["userIdentifiers", "gclid", "userIpAddress"] {
            assert!(c[1].get(k).is_none(), "{k} left");
        }
        assert_eq!(c[1]["consent"], json!({"adUserData":"DENIED"}));
        assert_eq!(c[1]["orderId"], "ord-1");
        assert!(c[1].get("customVariables").is_some());
        // P-1004: custom variables and cart data gone.
        assert!(c[2].get("customVariables").is_none() && c[2].get("cartData").is_none());
        assert!(c[2].get("consent").is_none());
    }

    #[test]
    fn call_conversions_strip_caller_but_keep_event() {
        let body = common::to_json(&json!({"partialFailure":true,"conversions":[
            {"callerId":"+14155550103","callStartDateTime":"2026-11-20 10:00:00+00:00",
             "conversionAction":"customers/1/conversionActions/2"},
            {"callerId":"+14155550102","callStartDateTime":"2026-11-20 10:00:00+00:00"},
            {"callerId":"+14155550100","callStartDateTime":"2026-11-20 10:00:00+00:00"}]}));
        let mut decide = adkit::decider(DestKind::AdPlatform);
        let r = GoogleAds
            .enforce(
                &view("/v21/customers/1:uploadCallConversions"),
                &body,
                &mut decide,
            )
            .unwrap();
        let out = r.body.unwrap();
        adkit::assert_absent(&out, &["+14155550103", "+14155550102"]);
        let v: Value = serde_json::from_slice(&out).unwrap();
        let c = v["conversions"].as_array().unwrap();
        assert_eq!(c.len(), 2);
        assert!(c[0].get("callerId").is_none());
        assert_eq!(c[0]["consent"]["adUserData"], "DENIED");
        // Google expects the raw E.164 caller id.
        assert_eq!(c[1]["callerId"], "+14155550100");
    }

    #[test]
    fn adjustments_use_their_own_array() {
        let body = common::to_json(&json!({"partialFailure":true,"conversionAdjustments":[
            {"adjustmentType":"ENHANCEMENT","orderId":"o1",
             "userIdentifiers":[{"hashedEmail":"deny.me@example.com"}]}]}));
        let mut decide = adkit::decider(DestKind::AdPlatform);
        let r = GoogleAds
            .enforce(
                &view("/v21/customers/1:uploadConversionAdjustments"),
                &body,
                &mut decide,
            )
            .unwrap();
        assert!(r.events[0].verdict.is_drop());
        adkit::assert_absent(&r.body.unwrap(), &["deny.me@example.com"]);
    }

    #[test]
    fn malformed_and_routing() {
        let mut decide = adkit::decider(DestKind::AdPlatform);
        let v = view("/v21/customers/1:uploadClickConversions");
        for bad in [&b"{\"conversions\":"[..], &b"{\"conversions\":{}}"[..]] {
            assert!(matches!(
                GoogleAds.enforce(&v, bad, &mut decide),
                Err(BodyError::Unreadable(_))
            ));
        }
        assert!(GoogleAds.inspects(&Method::POST, "/v21/customers/123:uploadClickConversions"));
        assert!(!GoogleAds.inspects(&Method::POST, "/v21/customers/123:mutate"));
        assert!(!GoogleAds.inspects(&Method::GET, "/v21/customers/123:uploadCallConversions"));
    }
}
