//! Issue 4 acceptance (cross-cutting points): enforcement through the running
//! proxy to a recording TLS upstream, with real wire shapes.

mod common;
use common::*;
use serde_json::{json, Value};
use std::io::{Read, Write};

const DENIED: &[&str] = &[
    "deny.me@example.com",
    "+14155550102",
    "unknown.person@example.com",
    "+15555550199",
];

async fn setup(name: &str, opts: ProxyOpts) -> (Proxy, Upstream) {
    let dir = test_dir(name);
    let ca = test_ca(&dir.join("upstream"), VENDOR_HOSTS);
    let up = start_upstream(&ca).await;
    let p = start_proxy(&dir, &up, &ca, opts);
    (p, up)
}

fn meta_event(email: &str, phone: &str, id: &str) -> Value {
    json!({
        "event_name": "Schedule",
        "event_time": 1763600000,
        "event_id": id,
        "action_source": "website",
        "event_source_url": "https://hospital.example/oncology/book?dr=smith",
        "user_data": {
            "em": [email],
            "ph": [phone],
            "client_ip_address": "203.0.113.7",
            "client_user_agent": "Mozilla/5.0",
            "fbc": "fb.1.1554763741205.AbCdEfGhIjKlMnOpQrStUvWxYz1234567890",
            "fbp": "fb.1.1558571054389.1098115397"
        },
        "custom_data": {"content_name": "Chemotherapy consult", "content_category": "oncology", "value": 0, "currency": "USD"}
    })
}

fn mixed_meta_batch() -> Value {
    json!({"data": [
        meta_event("jane.roe@example.com", "+14155550100", "e-granted"),
        meta_event("deny.me@example.com", "+14155550102", "e-denied"),
        meta_event("unknown.person@example.com", "+15555550199", "e-unknown"),
        meta_event("opt.out@example.com", "+14155550103", "e-sso"),
        meta_event("limited@example.com", "+12065550104", "e-limited"),
    ], "test_event_code": "TEST123"})
}

fn by_id(events: &[Value], id: &str) -> Value {
    events
        .iter()
        .find(|e| e["event_id"] == id)
        .cloned()
        .unwrap_or(Value::Null)
}

fn check_meta_mixed(events: &[Value]) {
    let ids: Vec<&str> = events
        .iter()
        .filter_map(|e| e["event_id"].as_str())
        .collect();
    assert_eq!(
        ids,
        ["e-granted", "e-sso", "e-limited"],
        "denied and unknown dropped, order kept"
    );
    let g = by_id(events, "e-granted");
    assert_eq!(
        g["user_data"]["em"][0],
        sha("jane.roe@example.com"),
        "plaintext email hashed on the way out"
    );
    assert_eq!(
        g["user_data"]["ph"][0],
        sha("14155550100"),
        "phone hashed as digits with country code"
    );
    assert!(g.get("data_processing_options").is_none());
    let s = by_id(events, "e-sso");
    assert_eq!(s["data_processing_options"], json!(["LDU"]));
    assert_eq!(s["data_processing_options_country"], 1);
    assert_eq!(s["data_processing_options_state"], 1000);
    let ud = s["user_data"].as_object().cloned().unwrap_or_default();
    for k in [
        "em",
        "ph",
        "client_ip_address",
        "client_user_agent",
        "fbc",
        "fbp",
    ] {
        assert!(
            !ud.contains_key(k),
            "identity field {k} stripped for sale/share opt-out"
        );
    }
    let l = by_id(events, "e-limited");
    assert_eq!(l["event_source_url"], "https://hospital.example/");
    assert!(
        l["custom_data"].get("content_name").is_none()
            && l["custom_data"].get("content_category").is_none()
    );
}

fn sha(s: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(s.as_bytes()))
}

#[tokio::test(flavor = "multi_thread")]
async fn meta_json_and_form_mixed_batches() {
    let (p, up) = setup("meta-mixed", ProxyOpts::default()).await;
    let body = serde_json::to_vec(&mixed_meta_batch()).unwrap();
    let r = send(
        p.proxy,
        Req::post(
            "graph.facebook.com",
            "/v19.0/1234567890/events?access_token=SECRET",
            body,
        ),
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.decision(), "modified");
    let got = up.last();
    assert_eq!(
        got.path_and_query,
        "/v19.0/1234567890/events?access_token=SECRET"
    );
    assert_eq!(
        got.header("content-length")
            .map(|v| v.parse::<usize>().unwrap()),
        Some(got.body.len())
    );
    assert_absent(&got.body, DENIED, "meta json upstream bytes");
    let v = got.json();
    assert_eq!(
        v["test_event_code"], "TEST123",
        "other top-level keys preserved"
    );
    check_meta_mixed(v["data"].as_array().unwrap());

    // The Python SDK's form body: data is a JSON array of JSON-encoded event strings.
    let events: Vec<String> = mixed_meta_batch()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| serde_json::to_string(e).unwrap())
        .collect();
    let form = form_urlencoded::Serializer::new(String::new())
        .append_pair("data", &serde_json::to_string(&events).unwrap())
        .append_pair("access_token", "SECRET")
        .finish();
    let req = Req::post("graph.facebook.com", "/v19.0/1234567890/events", form)
        .header("content-type", "application/x-www-form-urlencoded");
    let r = send(p.proxy, req).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.decision(), "modified");
    let got = up.last();
    assert_absent(&got.body, DENIED, "meta form upstream bytes");
    let pairs: Vec<(String, String)> = form_urlencoded::parse(&got.body).into_owned().collect();
    assert!(pairs
        .iter()
        .any(|(k, v)| k == "access_token" && v == "SECRET"));
    let data = &pairs
        .iter()
        .find(|(k, _)| k == "data")
        .expect("data field")
        .1;
    let strings: Vec<String> = serde_json::from_str(data).expect("data stays an array of strings");
    let events: Vec<Value> = strings
        .iter()
        .map(|s| serde_json::from_str(s).unwrap())
        .collect();
    check_meta_mixed(&events);
}

#[tokio::test(flavor = "multi_thread")]
async fn sec_gpc_header_tags_every_meta_event() {
    let (p, up) = setup("gpc", ProxyOpts::default()).await;
    let body = json!({"data": [
        meta_event("jane.roe@example.com", "+14155550100", "a"),
        meta_event("Mixed.Case@Gmail.com", "+442079460108", "b"),
    ]});
    let r = send(
        p.proxy,
        Req::post(
            "graph.facebook.com",
            "/v19.0/1/events",
            serde_json::to_vec(&body).unwrap(),
        )
        .header("Sec-GPC", "1"),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.decision(), "modified");
    let got = up.last();
    assert_absent(
        &got.body,
        &[
            "jane.roe@example.com",
            "+14155550100",
            "mixed.case@gmail.com",
            "+442079460108",
        ],
        "gpc",
    );
    let v = got.json();
    let events = v["data"].as_array().unwrap();
    assert_eq!(events.len(), 2);
    for e in events {
        assert_eq!(e["data_processing_options"], json!(["LDU"]));
        // P-1001 is US-CA → 1/1000; P-1008 is GB → 0/0 (Meta geolocates).
        let expect = if e["event_id"] == "a" {
            (1, 1000)
        } else {
            (0, 0)
        };
        assert_eq!(e["data_processing_options_country"], expect.0);
        assert_eq!(e["data_processing_options_state"], expect.1);
        assert!(e["user_data"].get("em").is_none() && e["user_data"].get("ph").is_none());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn gzip_batch_is_enforced_and_reencoded_unknown_encoding_blocked() {
    let (p, up) = setup("gzip", ProxyOpts::default()).await;
    let raw = serde_json::to_vec(&mixed_meta_batch()).unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&raw).unwrap();
    let gz = gz.finish().unwrap();
    let r = send(
        p.proxy,
        Req::post("graph.facebook.com", "/v19.0/1/events", gz).header("content-encoding", "gzip"),
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let got = up.last();
    assert_eq!(got.header("content-encoding"), Some("gzip"));
    let mut plain = Vec::new();
    flate2::read::GzDecoder::new(got.body.as_slice())
        .read_to_end(&mut plain)
        .unwrap();
    assert_absent(&plain, DENIED, "gzip upstream bytes");
    let v: Value = serde_json::from_slice(&plain).unwrap();
    check_meta_mixed(v["data"].as_array().unwrap());

    let before = up.count();
    let r = send(
        p.proxy,
        Req::post("graph.facebook.com", "/v19.0/1/events", raw.clone())
            .header("content-encoding", "foo"),
    )
    .await;
    assert_eq!(r.status, 415);
    assert_eq!(r.decision(), "blocked");
    assert_eq!(r.contract()["error"], "unsupported_content_encoding");
    assert_eq!(up.count(), before, "nothing forwarded");
}

#[tokio::test(flavor = "multi_thread")]
async fn twilio_sms_denied_channel_blocked_reminder_forwarded_unchanged() {
    let (p, up) = setup("twilio", ProxyOpts::default()).await;
    let path = "/2010-04-01/Accounts/AC0123456789abcdef0123456789abcdef/Messages.json";
    let form = |to: &str| {
        form_urlencoded::Serializer::new(String::new())
            .append_pair("To", to)
            .append_pair("From", "+14155559999")
            .append_pair("Body", "Your appointment is tomorrow at 9am")
            .finish()
    };
    let sms = |to: &str| {
        Req::post("api.twilio.com", path, form(to))
            .header("content-type", "application/x-www-form-urlencoded")
    };
    let r = send(p.proxy, sms("+14155550106")).await;
    assert_eq!(r.status, 451);
    assert_eq!(r.decision(), "blocked");
    let j = r.contract();
    assert_eq!(j["error"], "blocked_by_consent_policy");
    assert_eq!(
        j["request_id"],
        r.header("x-consentgate-request-id").unwrap()
    );
    assert_eq!(up.count(), 0, "upstream receives nothing");

    let r = send(
        p.proxy,
        sms("+14155550107").header("X-Consent-Category", "appointment_reminders"),
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.decision(), "allowed");
    let got = up.last();
    assert_eq!(
        got.body,
        form("+14155550107").into_bytes(),
        "forwarded byte for byte"
    );
    assert!(got.header("x-consent-category").is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_and_oversized_bodies_are_blocked_never_forwarded() {
    let opts = ProxyOpts {
        extra_yaml: "max_body_bytes: 4KiB\n".into(),
        ..Default::default()
    };
    let (p, up) = setup("malformed", opts).await;
    let r = send(
        p.proxy,
        Req::post(
            "graph.facebook.com",
            "/v19.0/1/events",
            r#"{"data":[{"event_name":"Lead","user_data":{"em":["deny.me@example.com"]}}"#,
        ),
    )
    .await;
    assert_eq!(r.status, 422);
    assert_eq!(r.contract()["error"], "unreadable_body");
    assert!(
        !String::from_utf8_lossy(&r.body).contains("deny.me"),
        "error never echoes the payload"
    );
    let big = serde_json::to_vec(
        &json!({"data": vec![meta_event("jane.roe@example.com", "+14155550100", "x"); 20]}),
    )
    .unwrap();
    assert!(big.len() > 4096);
    let r = send(
        p.proxy,
        Req::post("graph.facebook.com", "/v19.0/1/events", big),
    )
    .await;
    assert_eq!(r.status, 413);
    assert_eq!(r.contract()["error"], "body_too_large");
    assert_eq!(up.count(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn all_dropped_answers_451_or_synthetic_ok_and_counts_events() {
    let opts = ProxyOpts {
        extra_yaml: "destinations:\n  - {name: tiktok_events, on_blocked: synthetic_ok}\n".into(),
        ..Default::default()
    };
    let (p, up) = setup("all-dropped", opts).await;
    let body = json!({"data": [meta_event("deny.me@example.com", "+14155550102", "d"), meta_event("unknown.person@example.com", "+15555550199", "u")]});
    let r = send(
        p.proxy,
        Req::post(
            "graph.facebook.com",
            "/v19.0/1/events",
            serde_json::to_vec(&body).unwrap(),
        ),
    )
    .await;
    assert_eq!(r.status, 451);
    let mut reasons: Vec<String> = r.contract()["reasons"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap().to_string())
        .collect();
    reasons.sort();
    assert_eq!(reasons, ["consent_denied", "unknown_patient"]);
    let tt = json!({"event_source": "web", "event_source_id": "PIXEL", "data": [
        {"event": "ViewContent", "event_time": 1763600000, "user": {"email": ["deny.me@example.com"]}}
    ]});
    let r = send(
        p.proxy,
        Req::post(
            "business-api.tiktok.com",
            "/open_api/v1.3/event/track/",
            serde_json::to_vec(&tt).unwrap(),
        ),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.decision(), "blocked");
    assert_eq!(r.json()["code"], 0, "TikTok's empty success");
    assert_eq!(up.count(), 0);
    let m = String::from_utf8(admin_get(&p, "/metrics").await.body).unwrap();
    assert!(m.contains(r#"consentgate_events_total{decision="dropped",destination="meta_capi",reason="consent_denied"} 1"#), "{m}");
    assert!(m.contains(r#"consentgate_events_total{decision="dropped",destination="meta_capi",reason="unknown_patient"} 1"#), "{m}");
}
