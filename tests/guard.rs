//! Issue 16: the egress guard, through the running proxy to the recording
//! upstream. Every case asserts that nothing of a patient who must not be sent
//! arrives, in any form (plain, lower-case, digits, SHA-256, MD5).

mod common;
use common::*;
use serde_json::{json, Value};
use std::io::{Read, Write};

const META: &str = "graph.facebook.com";
const EVENTS: &str = "/v19.0/1/events";
/// P-1002: every category denied.
const DENIED: &[&str] = &["deny.me@example.com", "+14155550102", "crm:0031x00000den"];

fn event(email: &str, extra: Value) -> Value {
    let mut ev = json!({"event_name": "Lead", "event_time": 1763600000, "action_source": "website",
                        "event_source_url": "https://hospital.example/visit",
                        "user_data": {"em": [email]}});
    if let (Some(m), Value::Object(x)) = (ev.as_object_mut(), extra) {
        m.extend(x);
    }
    ev
}

async fn setup(name: &str, extra_yaml: &str) -> (Proxy, Upstream) {
    let dir = test_dir(name);
    let ca = test_ca(&dir.join("upstream"), VENDOR_HOSTS);
    let up = start_upstream(&ca).await;
    let opts = ProxyOpts {
        extra_yaml: extra_yaml.into(),
        ..Default::default()
    };
    (start_proxy(&dir, &up, &ca, opts), up)
}

fn metric(text: &str, reason: &str) -> u64 {
    text.lines()
        .filter(|l| {
            l.starts_with("consentgate_guard_interventions_total{")
                && l.contains(&format!("reason=\"{reason}\""))
        })
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn foreign_identifiers_in_free_fields_drop_the_event() {
    let (p, up) = setup("guard-free-fields", "").await;
    let body = json!({"data": [
        event("jane.roe@example.com", json!({})),
        event("jane.roe@example.com", json!({"custom_data": {"note": "cc Deny.Me@Example.com"}})),
        event("jane.roe@example.com", json!({"event_source_url": "https://h.example/?e=deny.me%40example.com"})),
        event("jane.roe@example.com", json!({"custom_data": {"crm": "crm:0031x00000den"}})),
        event("jane.roe@example.com", json!({"custom_data": {"callback": "(415) 555-0102"}})),
    ]});
    let r = send(p.proxy, Req::post(META, EVENTS, body.to_string())).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.decision(), "modified");
    let got = up.last();
    assert_absent(&got.body, DENIED, "meta upstream bytes");
    assert_eq!(
        got.json()["data"].as_array().unwrap().len(),
        1,
        "four events carried P-1002"
    );
    let m = String::from_utf8(admin_get(&p, "/metrics").await.body).unwrap();
    assert_eq!(metric(&m, "foreign_identifier"), 4, "{m}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_foreign_identifier_outside_every_event_refuses_the_request() {
    let (p, up) = setup("guard-outside", "").await;
    let granted = json!({"data": [event("jane.roe@example.com", json!({}))]});
    let mut root = granted.clone();
    root["partner_agent"] = json!("for deny.me@example.com");
    let cases = [
        ("root field", Req::post(META, EVENTS, root.to_string())),
        (
            "query",
            Req::post(
                META,
                // A parameter Graph reads there (others are refused unread).
                "/v19.0/1/events?access_token=deny.me%40example.com",
                granted.to_string(),
            ),
        ),
        (
            "header",
            Req::post(META, EVENTS, granted.to_string()).header("x-debug", "+1 415 555 0102"),
        ),
    ];
    for (what, req) in cases {
        let before = up.count();
        let r = send(p.proxy, req).await;
        assert_eq!(
            r.status,
            451,
            "{what}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(r.contract()["error"], "foreign_identifier", "{what}");
        assert_eq!(up.count(), before, "{what}: nothing went upstream");
    }
    // SendGrid: a denied patient as reply_to of a mail to a granted one.
    let mail = json!({"personalizations": [{"to": [{"email": "jane.roe@example.com"}]}],
                      "from": {"email": "news@hospital.example"}, "reply_to": {"email": "deny.me@example.com"},
                      "subject": "x", "content": [{"type": "text/plain", "value": "x"}]});
    let before = up.count();
    let r = send(
        p.proxy,
        Req::post("api.sendgrid.com", "/v3/mail/send", mail.to_string()),
    )
    .await;
    assert_eq!(r.status, 451, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(up.count(), before);
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_contacts_outside_identity_fields_are_removed_on_ad_platforms() {
    let (p, up) = setup("guard-unknown", "").await;
    let body = json!({"data": [event("jane.roe@example.com",
        json!({"custom_data": {"value": 1, "referrer_email": "someone.else@example.org", "phone": "+1 212 555 0199"}}))]});
    let r = send(p.proxy, Req::post(META, EVENTS, body.to_string())).await;
    assert_eq!(r.status, 200);
    let got = up.last();
    assert_absent(
        &got.body,
        &["someone.else@example.org", "+12125550199"],
        "unknown contacts",
    );
    assert_eq!(got.json()["data"][0]["custom_data"], json!({"value": 1}));
    // A messaging vendor keeps an unknown sender address: it is the hospital's own.
    let mail = json!({"personalizations": [{"to": [{"email": "jane.roe@example.com"}]}],
                      "from": {"email": "news@hospital.example"},
                      "subject": "x", "content": [{"type": "text/plain", "value": "x"}]});
    let r = send(
        p.proxy,
        Req::post("api.sendgrid.com", "/v3/mail/send", mail.to_string()),
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(String::from_utf8_lossy(&up.last().body).contains("news@hospital.example"));
}

#[tokio::test(flavor = "multi_thread")]
async fn compressed_bodies_leave_re_encoded_without_hidden_bytes() {
    let (p, up) = setup("guard-gzip", "").await;
    // Granted and already hashed: the content needs no change.
    let jane = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
        b"jane.roe@example.com",
    ));
    let body = json!({"data": [event(&jane, json!({}))]}).to_string();
    // A gzip member whose header comment names a denied patient.
    let mut w = flate2::GzBuilder::new()
        .comment("deny.me@example.com")
        .write(Vec::new(), flate2::Compression::default());
    w.write_all(body.as_bytes()).unwrap();
    let gz = w.finish().unwrap();
    assert!(String::from_utf8_lossy(&gz).contains("deny.me@example.com"));
    let mut req = Req::post(META, EVENTS, gz);
    req = req.header("content-encoding", "gzip");
    let r = send(p.proxy, req).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.decision(), "allowed", "the content went up unchanged");
    let got = up.last();
    assert_absent(&got.body, DENIED, "gzip bytes upstream");
    let mut plain = String::new();
    flate2::read::GzDecoder::new(got.body.as_slice())
        .read_to_string(&mut plain)
        .unwrap();
    assert_eq!(plain, body, "the content is what was decided, re-encoded");
    // zstd: a skippable frame before the content.
    let mut zs = vec![0x50, 0x2a, 0x4d, 0x18];
    let hidden = b"deny.me@example.com";
    zs.extend_from_slice(&(hidden.len() as u32).to_le_bytes());
    zs.extend_from_slice(hidden);
    zs.extend(zstd::stream::encode_all(body.as_bytes(), 3).unwrap());
    let r = send(
        p.proxy,
        Req::post(META, EVENTS, zs).header("content-encoding", "zstd"),
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_absent(&up.last().body, DENIED, "zstd bytes upstream");
}

#[tokio::test(flavor = "multi_thread")]
async fn shadow_mode_counts_what_the_guard_would_do_and_forwards_the_original() {
    let (p, up) = setup(
        "guard-shadow",
        "destinations:\n  - {name: meta_capi, mode: shadow}\n",
    )
    .await;
    let body = json!({"data": [event("jane.roe@example.com", json!({"custom_data": {"n": "deny.me@example.com"}}))]});
    let r = send(p.proxy, Req::post(META, EVENTS, body.to_string())).await;
    assert_eq!(r.decision(), "allowed");
    assert_eq!(
        up.last().body,
        body.to_string().as_bytes(),
        "shadow forwards the original"
    );
    let m = String::from_utf8(admin_get(&p, "/metrics").await.body).unwrap();
    assert_eq!(metric(&m, "foreign_identifier"), 1, "{m}");
}

/// The guard reads kept events only once every event is decided: an event may
/// name a patient whose own (kept) event comes later in the batch. Meta (its own
/// lazy path) and TikTok (the generic one-event-at-a-time batch) alike.
#[tokio::test(flavor = "multi_thread")]
async fn an_event_naming_a_patient_kept_later_in_the_batch_is_kept() {
    let (p, up) = setup("guard-later", "").await;
    // P-1009: advertising granted.
    let later = "email.denied.channel@example.com";
    let body = json!({"data": [
        event("jane.roe@example.com", json!({"custom_data": {"referred_by": later}})),
        event(later, json!({})),
        event("jane.roe@example.com", json!({"custom_data": {"referred_by": "deny.me@example.com"}})),
    ]});
    let r = send(p.proxy, Req::post(META, EVENTS, body.to_string())).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let got = up.last();
    assert_absent(&got.body, DENIED, "meta upstream bytes");
    assert_eq!(
        got.json()["data"].as_array().unwrap().len(),
        2,
        "{}",
        got.json()
    );

    let tiktok = |email: &str, extra: Value| {
        let mut ev = json!({"event": "ViewContent", "event_time": 1763600000,
                            "user": {"email": [email]}});
        if let (Some(m), Value::Object(x)) = (ev.as_object_mut(), extra) {
            m.extend(x);
        }
        ev
    };
    let body = json!({"event_source": "web", "event_source_id": "PX", "data": [
        tiktok("jane.roe@example.com", json!({"properties": {"referred_by": later}})),
        tiktok(later, json!({})),
        tiktok("jane.roe@example.com", json!({"properties": {"referred_by": "deny.me@example.com"}})),
    ]});
    let r = send(
        p.proxy,
        Req::post(
            "business-api.tiktok.com",
            "/open_api/v1.3/event/track/",
            body.to_string(),
        ),
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let got = up.last();
    assert_absent(&got.body, DENIED, "tiktok upstream bytes");
    assert_eq!(
        got.json()["data"].as_array().unwrap().len(),
        2,
        "{}",
        got.json()
    );
}

/// SPEC §5: the index holds the MD5 of each normalised email (Mailchimp's
/// subscriber hash), so the MD5 of a denied patient's email is recognised
/// wherever it stands: in a granted event's free field it drops the event, and
/// as Meta's `em` it is the denied patient's own event.
#[tokio::test(flavor = "multi_thread")]
async fn the_md5_of_a_denied_email_is_recognised() {
    let (p, up) = setup("guard-md5", "").await;
    let md5 = |e: &str| {
        use md5::Digest as _;
        hex::encode(md5::Md5::digest(e.as_bytes()))
    };
    let body = json!({"data": [
        event("jane.roe@example.com", json!({})),
        event("jane.roe@example.com", json!({"custom_data": {"ref": md5("deny.me@example.com")}})),
        event(&md5("deny.me@example.com").to_uppercase(), json!({})),
    ]});
    let r = send(p.proxy, Req::post(META, EVENTS, body.to_string())).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let got = up.last();
    assert_absent(&got.body, DENIED, "meta upstream bytes");
    assert_eq!(got.json()["data"].as_array().unwrap().len(), 1);
    let m = String::from_utf8(admin_get(&p, "/metrics").await.body).unwrap();
    assert_eq!(metric(&m, "foreign_identifier"), 1, "{m}");

    // The MD5 of an address nobody holds names nobody: the event is kept.
    let unknown = md5("nobody.here@example.com");
    let body =
        json!({"data": [event("jane.roe@example.com", json!({"custom_data": {"ref": unknown}}))]});
    let r = send(p.proxy, Req::post(META, EVENTS, body.to_string())).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert!(String::from_utf8_lossy(&up.last().body).contains(&unknown));
}

/// Found by fuzzing (docs/FUZZING.md): an external id glued to characters no
/// id is written with (NUL bytes, `%`, `*`) was read as part of a longer token
/// and not looked up.
#[tokio::test(flavor = "multi_thread")]
async fn an_id_glued_to_other_characters_is_still_read() {
    let (p, up) = setup("guard-glued", "").await;
    let body = json!({"data": [
        event("jane.roe@example.com", json!({})),
        event("jane.roe@example.com", json!({"custom_data": {"ref": "\u{0}\u{0}crm:0031x00000den\u{0}"}})),
        event("jane.roe@example.com", json!({"custom_data": {"ref": "id=crm:0031x00000den%L"}})),
        event("jane.roe@example.com", json!({"custom_data": {"ref": "*crm:0031x00000den!"}})),
        event("jane.roe@example.com", json!({"custom_data": {"ref": "C@crm:0031x00000den"}})),
        event("jane.roe@example.com", json!({"custom_data": {"ref": "see crm:0031x00000den."}})),
    ]});
    let r = send(p.proxy, Req::post(META, EVENTS, body.to_string())).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let got = up.last();
    assert_absent(&got.body, DENIED, "meta upstream bytes");
    assert_eq!(got.json()["data"].as_array().unwrap().len(), 1);
}

/// Found by fuzzing: an address with text glued after it by a full stop
/// (`deny.me@example.com.n3`) was not read as an address at all.
#[tokio::test(flavor = "multi_thread")]
async fn an_address_with_text_glued_after_it_is_still_read() {
    let (p, up) = setup("guard-glued-address", "").await;
    let body = json!({"data": [
        event("jane.roe@example.com", json!({})),
        event("jane.roe@example.com", json!({"custom_data": {"note": "cc deny.me@example.com.n3"}})),
    ]});
    let r = send(p.proxy, Req::post(META, EVENTS, body.to_string())).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let got = up.last();
    assert_absent(&got.body, DENIED, "meta upstream bytes");
    assert_eq!(got.json()["data"].as_array().unwrap().len(), 1);
}
