//! Meta Conversions API: `POST graph.facebook.com/{version}/{pixel}/events`.
//!
//! The body is JSON `{"data":[…]}` or form-encoded with a `data` field holding
//! a JSON array; the Python SDK puts each event in that array as a JSON-encoded
//! string (double encoding). Events are re-encoded the way they arrived, and
//! other form fields (`access_token`, `test_event_code`, …) are kept as they are.

use super::common;
use super::{Adapter, BodyError, Enforced, EventApplied, RequestView, SyntheticOk};
use crate::decide::{EventVerdict, Keep, Ldu};
use crate::identify::{self, Identifiers};
use crate::model::{Category, DestKind};
use http::Method;
use serde_json::{json, Value};

pub struct MetaCapi;

/// Every identity field of `user_data` (SPEC §6 step 3).
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
    "user_data.client_ip_address",
    "user_data.client_user_agent",
    "user_data.fbc",
    "user_data.fbp",
    "user_data.lead_id",
    "user_data.anon_id",
    "user_data.madid",
    "user_data.fb_login_id",
    "user_data.ctwa_clid",
    "user_data.subscription_id",
    "user_data.page_id",
    "user_data.page_scoped_user_id",
    "user_data.ig_account_id",
    "user_data.ig_sid",
];

/// `custom_data` keys kept under limit_sensitive; every other key (content
/// fields, search strings, arbitrary custom keys) goes.
const CUSTOM_DATA_KEEP: &[&str] = &["value", "currency", "order_id", "num_items"];

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
        // Anything else left in user_data is identity too (new platform ids).
        if let Some(Value::Object(ud)) = ev.get_mut("user_data") {
            if !ud.is_empty() {
                ud.clear();
                a.fields_stripped.push("user_data.*".into());
            }
        }
    }
    let ldu = keep.ldu.or(keep.strip_identity.then_some(Ldu {
        country: 0,
        state: 0,
    }));
    if let Some(l) = ldu {
        common::set_at(ev, "data_processing_options", json!(["LDU"]));
        common::set_at(ev, "data_processing_options_country", json!(l.country));
        common::set_at(ev, "data_processing_options_state", json!(l.state));
        a.flags_set.push("data_processing_options=LDU".into());
        a.flags_set
            .push(format!("data_processing_options_country={}", l.country));
        a.flags_set
            .push(format!("data_processing_options_state={}", l.state));
    }
    if keep.limit_sensitive {
        common::reduce_urls(
            ev,
            &["event_source_url", "referrer_url"],
            &mut a.fields_stripped,
        );
        if let Some(Value::Object(cd)) = ev.get_mut("custom_data") {
            let before = cd.len();
            cd.retain(|k, _| CUSTOM_DATA_KEEP.contains(&k.as_str()));
            if cd.len() != before {
                a.fields_stripped.push("custom_data.*".into());
            }
        }
    }
    common::hash_all(ev, HASHED, &mut a.hashed);
}

/// Enforce a `data` array whose elements are event objects or JSON-encoded
/// event strings; each kept event leaves in the form it came in.
fn enforce_data(
    data: &mut Vec<Value>,
    decide: &mut dyn FnMut(&Identifiers) -> EventVerdict,
) -> Result<(bool, Vec<EventApplied>), BodyError> {
    let mut encoded = Vec::with_capacity(data.len());
    let mut events = Vec::with_capacity(data.len());
    for (i, el) in data.drain(..).enumerate() {
        match el {
            Value::Object(_) => {
                encoded.push(false);
                events.push(el);
            }
            Value::String(s) => match serde_json::from_str::<Value>(&s) {
                Ok(v @ Value::Object(_)) => {
                    encoded.push(true);
                    events.push(v);
                }
                _ => {
                    return Err(BodyError::Unreadable(format!(
                        "`data[{i}]` is a string but not a JSON-encoded event object"
                    )))
                }
            },
            _ => {
                return Err(BodyError::Unreadable(format!(
                    "`data[{i}]` is not an event object"
                )))
            }
        }
    }
    let (changed, applied) = common::enforce_array(&mut events, decide, &identify_event, &apply);
    let kept_encoded = encoded
        .iter()
        .zip(&applied)
        .filter(|(_, a)| !a.verdict.is_drop())
        .map(|(e, _)| *e);
    *data = events
        .into_iter()
        .zip(kept_encoded)
        .map(|(ev, enc)| {
            if enc {
                Value::String(String::from_utf8_lossy(&common::to_json(&ev)).into_owned())
            } else {
                ev
            }
        })
        .collect();
    Ok((changed, applied))
}

fn enforce_json(
    body: &[u8],
    decide: &mut dyn FnMut(&Identifiers) -> EventVerdict,
) -> Result<Enforced, BodyError> {
    let mut root = common::parse_json(body)?;
    let (changed, applied) = match root.get_mut("data") {
        Some(Value::Array(data)) => enforce_data(data, decide)?,
        // `data` itself JSON-encoded inside the JSON body.
        Some(Value::String(s)) => {
            let mut inner = parse_data_string(s)?;
            let r = enforce_data(&mut inner, decide)?;
            *s = String::from_utf8_lossy(&common::to_json(&Value::Array(inner))).into_owned();
            r
        }
        _ => {
            return Err(BodyError::Unreadable(
                "`data` is missing or not an array".into(),
            ))
        }
    };
    Ok(Enforced {
        body: changed.then(|| common::to_json(&root)),
        events: applied,
    })
}

fn parse_data_string(s: &str) -> Result<Vec<Value>, BodyError> {
    match serde_json::from_str::<Value>(s) {
        Ok(Value::Array(a)) => Ok(a),
        Ok(_) => Err(BodyError::Unreadable("`data` is not a JSON array".into())),
        Err(e) => Err(BodyError::Unreadable(format!(
            "`data` is not valid JSON (line {} column {})",
            e.line(),
            e.column()
        ))),
    }
}

fn enforce_form(
    body: &[u8],
    decide: &mut dyn FnMut(&Identifiers) -> EventVerdict,
) -> Result<Enforced, BodyError> {
    if std::str::from_utf8(body).is_err() {
        return Err(BodyError::Unreadable("form body is not UTF-8".into()));
    }
    let mut pairs = common::parse_form(body);
    let mut idx = pairs.iter().enumerate().filter(|(_, (k, _))| k == "data");
    let i = match (idx.next(), idx.next()) {
        (Some((i, _)), None) => i,
        (None, _) => return Err(BodyError::Unreadable("form field `data` is missing".into())),
        (Some(_), Some(_)) => {
            return Err(BodyError::Unreadable(
                "form field `data` occurs more than once".into(),
            ))
        }
    };
    let mut data = parse_data_string(&pairs[i].1)?;
    let (changed, applied) = enforce_data(&mut data, decide)?;
    if !changed {
        return Ok(Enforced {
            body: None,
            events: applied,
        });
    }
    pairs[i].1 = String::from_utf8_lossy(&common::to_json(&Value::Array(data))).into_owned();
    Ok(Enforced {
        body: Some(common::encode_form(&pairs)),
        events: applied,
    })
}

impl Adapter for MetaCapi {
    fn name(&self) -> &str {
        "meta_capi"
    }
    fn display_name(&self) -> &str {
        "Meta Conversions API"
    }
    fn kind(&self) -> DestKind {
        DestKind::AdPlatform
    }
    fn default_category(&self) -> Category {
        Category::Advertising
    }
    fn matches_host(&self, host: &str) -> bool {
        host == "graph.facebook.com"
    }
    fn inspects(&self, method: &Method, path: &str) -> bool {
        common::post_path_matches(method, path, &|s| match s {
            [v, _pixel, "events"] => v.starts_with('v'),
            [_pixel, "events"] => true,
            _ => false,
        })
    }
    fn enforce(
        &self,
        req: &RequestView<'_>,
        body: &[u8],
        decide: &mut dyn FnMut(&Identifiers) -> EventVerdict,
    ) -> Result<Enforced, BodyError> {
        match req.content_type {
            Some("application/json") => enforce_json(body, decide),
            Some("application/x-www-form-urlencoded") => enforce_form(body, decide),
            Some("multipart/form-data") => Err(BodyError::Unreadable(
                "multipart bodies are not supported for Meta; send JSON or form-encoded".into(),
            )),
            _ => {
                // No or another content type: sniff.
                match body.iter().find(|b| !b.is_ascii_whitespace()) {
                    Some(b'{') => enforce_json(body, decide),
                    _ => enforce_form(body, decide),
                }
            }
        }
    }
    fn synthetic_ok(&self) -> SyntheticOk {
        SyntheticOk {
            status: 200,
            body: r#"{"events_received":0,"messages":[],"fbtrace_id":"consentgate"}"#,
        }
    }
    fn identifier_fields(&self) -> &str {
        "user_data.em, user_data.ph, user_data.external_id"
    }
    fn ldu_signal(&self) -> &str {
        "data_processing_options [\"LDU\"] + _country/_state (1/1000 US-CA, else 0/0)"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::destinations::common::adkit;
    use serde_json::json;

    fn view(ct: &'static str) -> RequestView<'static> {
        RequestView {
            method: &Method::POST,
            host: "graph.facebook.com",
            path: "/v21.0/1234567890/events",
            query: None,
            content_type: Some(ct),
        }
    }

    fn mixed_events() -> Vec<Value> {
        vec![
            json!({"event_name":"Lead","event_time":1763630000,"action_source":"website",
                   "event_source_url":"https://hospital.example/oncology/book?dr=7",
                   "user_data":{"em":["Jane.Roe@Example.com"],"ph":["+1 415 555 0100"],
                                "fn":"Jane","external_id":"crm:0031x00000abc",
                                "client_ip_address":"203.0.113.9"},
                   "custom_data":{"value":10,"currency":"USD","content_name":"Chemo consult"}}),
            json!({"event_name":"Lead","event_time":1763630000,"action_source":"website",
                   "user_data":{"em":"deny.me@example.com","ph":"+14155550102"}}),
            json!({"event_name":"Lead","event_time":1763630000,"action_source":"website",
                   "user_data":{"em":[identify::sha256_hex(b"unknown.person@example.com")]}}),
            json!({"event_name":"Purchase","event_time":1763630000,"action_source":"website",
                   "event_source_url":"https://hospital.example/checkup",
                   "user_data":{"em":"opt.out@example.com","ph":"14155550103",
                                "client_user_agent":"Mozilla/5.0","fbc":"fb.1.1.abc","fbp":"fb.1.2.3"}}),
            json!({"event_name":"ViewContent","event_time":1763630000,"action_source":"website",
                   "event_source_url":"https://hospital.example/hiv/clinic?q=prep",
                   "user_data":{"em":"limited@example.com"},
                   "custom_data":{"value":1,"currency":"USD","content_category":"hiv",
                                  "search_string":"prep clinic","diagnosis":"x"}}),
        ]
    }

    fn check_mixed(events: &[Value], applied: &[EventApplied], out: &[u8]) {
        assert_eq!(events.len(), 3);
        assert_eq!(applied.len(), 5);
        assert!(applied[1].verdict.is_drop() && applied[2].verdict.is_drop());
        adkit::assert_absent(
            out,
            &[
                "deny.me@example.com",
                "+14155550102",
                "unknown.person@example.com",
                "opt.out@example.com",
                "+14155550103",
                "crm:0031x00000sso",
            ],
        );
        adkit::assert_no_plaintext(
            out,
            &["jane.roe@example.com", "14155550100", "limited@example.com"],
        );
        // P-1001: plaintext hashed the way Meta expects.
        let ud = &events[0]["user_data"];
        assert_eq!(ud["em"][0], identify::sha256_hex(b"jane.roe@example.com"));
        assert_eq!(ud["ph"][0], identify::sha256_hex(b"14155550100"));
        assert_eq!(ud["fn"], identify::sha256_hex(b"jane"));
        assert_eq!(
            ud["external_id"],
            identify::sha256_hex(b"crm:0031x00000abc")
        );
        assert_eq!(ud["client_ip_address"], "203.0.113.9");
        assert_eq!(events[0]["custom_data"]["content_name"], "Chemo consult");
        // P-1003: identity gone, LDU 1/1000, URL untouched.
        let e = &events[1];
        assert_eq!(e["user_data"], json!({}));
        assert_eq!(e["data_processing_options"], json!(["LDU"]));
        assert_eq!(e["data_processing_options_country"], json!(1));
        assert_eq!(e["data_processing_options_state"], json!(1000));
        assert_eq!(e["event_source_url"], "https://hospital.example/checkup");
        // P-1004: URL reduced, custom data limited, email hashed.
        let e = &events[2];
        assert_eq!(e["event_source_url"], "https://hospital.example/");
        assert_eq!(e["custom_data"], json!({"value":1,"currency":"USD"}));
        assert!(e.get("data_processing_options").is_none());
        assert_eq!(
            e["user_data"]["em"],
            identify::sha256_hex(b"limited@example.com")
        );
    }

    #[test]
    fn json_mixed_batch() {
        let body = common::to_json(&json!({"data": mixed_events(), "test_event_code":"TEST1"}));
        let mut decide = adkit::decider(DestKind::AdPlatform);
        let r = MetaCapi
            .enforce(&view("application/json"), &body, &mut decide)
            .unwrap();
        let out = r.body.unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["test_event_code"], "TEST1");
        check_mixed(v["data"].as_array().unwrap(), &r.events, &out);
    }

    #[test]
    fn form_double_encoded_round_trips_as_form() {
        let data: Vec<Value> = mixed_events()
            .iter()
            .map(|e| Value::String(serde_json::to_string(e).unwrap()))
            .collect();
        let data = serde_json::to_string(&data).unwrap();
        let body = form_urlencoded::Serializer::new(String::new())
            .append_pair("access_token", "EAAB-token")
            .append_pair("data", &data)
            .append_pair("test_event_code", "TEST1")
            .finish();
        let mut decide = adkit::decider(DestKind::AdPlatform);
        let r = MetaCapi
            .enforce(
                &view("application/x-www-form-urlencoded"),
                body.as_bytes(),
                &mut decide,
            )
            .unwrap();
        let out = r.body.unwrap();
        let pairs = common::parse_form(&out);
        let keys: Vec<&str> = pairs.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["access_token", "data", "test_event_code"]);
        assert_eq!(pairs[0].1, "EAAB-token");
        assert_eq!(pairs[2].1, "TEST1");
        let arr: Vec<Value> = serde_json::from_str(&pairs[1].1).unwrap();
        let events: Vec<Value> = arr
            .iter()
            .map(|s| serde_json::from_str(s.as_str().expect("still a string")).unwrap())
            .collect();
        check_mixed(&events, &r.events, &out);
    }

    #[test]
    fn ldu_geolocates_outside_california() {
        // P-1015: sale/share opt-out in US-OR; P-1005: GPC in US-CO.
        let body = common::to_json(&json!({"data":[
            {"event_name":"Lead","user_data":{"em":"oregon@example.com"}},
            {"event_name":"Lead","user_data":{"ph":"+1 720 555 0105"}}]}));
        let mut decide = adkit::decider(DestKind::AdPlatform);
        let r = MetaCapi
            .enforce(&view("application/json"), &body, &mut decide)
            .unwrap();
        let out = r.body.unwrap();
        adkit::assert_absent(&out, &["oregon@example.com", "+17205550105"]);
        let v: Value = serde_json::from_slice(&out).unwrap();
        for e in v["data"].as_array().unwrap() {
            assert_eq!(e["data_processing_options"], json!(["LDU"]));
            assert_eq!(e["data_processing_options_country"], json!(0));
            assert_eq!(e["data_processing_options_state"], json!(0));
            assert_eq!(e["user_data"], json!({}));
        }
    }

    #[test]
    fn unchanged_body_goes_out_as_is() {
        let h = identify::sha256_hex(b"jane.roe@example.com");
        let body = common::to_json(&json!({"data":[{"event_name":"Lead","user_data":{"em":[h]}}]}));
        let mut decide = adkit::decider(DestKind::AdPlatform);
        let r = MetaCapi
            .enforce(&view("application/json"), &body, &mut decide)
            .unwrap();
        assert_eq!(r.body, None);
        assert!(!r.events[0].changed());
    }

    #[test]
    fn malformed_bodies_are_unreadable() {
        let mut decide = adkit::decider(DestKind::AdPlatform);
        for (ct, body) in [
            ("application/json", &b"{\"data\":[{"[..]),
            ("application/json", &b"{\"events\":[]}"[..]),
            ("application/x-www-form-urlencoded", &b"access_token=x"[..]),
            (
                "application/x-www-form-urlencoded",
                &b"data=%5B%22nope%22%5D"[..],
            ),
            ("multipart/form-data", &b"--x"[..]),
        ] {
            assert!(matches!(
                MetaCapi.enforce(&view(ct), body, &mut decide),
                Err(BodyError::Unreadable(_))
            ));
        }
    }

    #[test]
    fn inspects_events_posts_only() {
        assert!(MetaCapi.inspects(&Method::POST, "/v21.0/123/events"));
        assert!(MetaCapi.inspects(&Method::POST, "/123/events/"));
        assert!(!MetaCapi.inspects(&Method::GET, "/v21.0/123/events"));
        assert!(!MetaCapi.inspects(&Method::POST, "/v21.0/123/adcreatives"));
    }
}
