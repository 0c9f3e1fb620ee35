//! Issue 16 (Acceptance 1): keys written in another case, beside or instead of
//! the one the messaging adapters read, for SendGrid, Twilio and Braze (Meta and
//! TikTok: tests/guard_shapes.rs). Through the running proxy to the recording
//! upstream: a granted patient in the expected key and the denied one in the
//! look-alike never lets the denied one through, in any form.

mod common;
use common::*;
use serde_json::{json, Value};

/// P-1002: every category and channel denied.
const DENIED: &[&str] = &["deny.me@example.com", "+14155550102", "crm:0031x00000den"];
const TWILIO: &str = "api.twilio.com";
const MESSAGES: &str = "/2010-04-01/Accounts/AC0123456789abcdef0123456789abcdef/Messages.json";

async fn setup(name: &str) -> (Proxy, Upstream) {
    let dir = test_dir(name);
    let ca = test_ca(&dir.join("upstream"), VENDOR_HOSTS);
    let up = start_upstream(&ca).await;
    (start_proxy(&dir, &up, &ca, ProxyOpts::default()), up)
}

fn sendgrid(body: Value) -> Req {
    Req::post("api.sendgrid.com", "/v3/mail/send", body.to_string())
        .header("content-type", "application/json")
        .header("x-consent-category", "appointment_reminders")
}

fn braze(path: &str, body: Value) -> Req {
    Req::post("rest.iad-01.braze.com", path, body.to_string())
        .header("content-type", "application/json")
        .header("x-consent-category", "appointment_reminders")
}

fn twilio(pairs: &[(&str, &str)]) -> Req {
    let mut f = form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        f.append_pair(k, v);
    }
    Req::post(TWILIO, MESSAGES, f.finish())
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-consent-category", "appointment_reminders")
}

fn mail(personalization: Value, extra: Value) -> Value {
    let mut m = json!({
        "personalizations": [personalization],
        "from": {"email": "clinic@hospital.example"},
        "subject": "Your appointment",
        "content": [{"type": "text/plain", "value": "See you tomorrow"}]
    });
    if let (Some(o), Value::Object(x)) = (m.as_object_mut(), extra) {
        o.extend(x);
    }
    m
}

#[tokio::test(flavor = "multi_thread")]
async fn look_alike_keys_of_messaging_adapters_never_let_the_denied_patient_through() {
    let (p, up) = setup("guard-cases").await;
    let granted = json!({"email": "jane.roe@example.com"});
    let denied = json!({"email": "deny.me@example.com"});
    let cases: Vec<(&str, Req)> = vec![
        (
            "SendGrid To beside to",
            sendgrid(mail(json!({"to": [granted], "To": [denied]}), json!({}))),
        ),
        (
            "SendGrid Email in a recipient",
            sendgrid(mail(
                json!({"to": [{"email": "jane.roe@example.com", "Email": "deny.me@example.com"}]}),
                json!({}),
            )),
        ),
        (
            "SendGrid Personalizations beside personalizations",
            sendgrid(mail(
                json!({"to": [granted]}),
                json!({"Personalizations": [{"to": [denied]}]}),
            )),
        ),
        (
            "SendGrid CC beside cc",
            sendgrid(mail(json!({"to": [granted], "CC": [denied]}), json!({}))),
        ),
        (
            "Twilio to beside To",
            twilio(&[
                ("To", "+14155550100"),
                ("to", "+14155550102"),
                ("From", "+14155559999"),
                ("Body", "See you tomorrow"),
            ]),
        ),
        (
            "Twilio TO beside To",
            twilio(&[
                ("To", "+14155550100"),
                ("TO", "+14155550102"),
                ("From", "+14155559999"),
                ("Body", "See you tomorrow"),
            ]),
        ),
        (
            "Braze Email beside email in an attribute",
            braze(
                "/users/track",
                json!({"attributes": [{"external_id": "P-1001", "email": "jane.roe@example.com",
                                       "Email": "deny.me@example.com"}]}),
            ),
        ),
        (
            "Braze External_Id in a recipient",
            braze(
                "/messages/send",
                json!({"recipients": [{"external_user_id": "P-1001", "External_User_Id": "P-1002"}],
                       "messages": {"email": {"app_id": "a", "subject": "s", "from": "c <c@hospital.example>",
                                              "body": "See you tomorrow"}}}),
            ),
        ),
        (
            "Braze External_User_Ids beside external_user_ids",
            braze(
                "/messages/send",
                json!({"external_user_ids": ["P-1001"], "External_User_Ids": ["P-1002"],
                       "messages": {"email": {"app_id": "a", "subject": "s", "from": "c <c@hospital.example>",
                                              "body": "See you tomorrow"}}}),
            ),
        ),
    ];
    for (what, req) in cases {
        let r = send(p.proxy, req).await;
        let body = String::from_utf8_lossy(&r.body).to_string();
        assert_eq!(r.decision(), "blocked", "{what}: {} {body}", r.status);
        assert!(
            [422, 451].contains(&r.status),
            "{what}: {} {body}",
            r.status
        );
        assert_absent(&r.body, DENIED, what);
    }
    for got in up.requests() {
        assert_absent(&got.body, DENIED, "upstream body");
        assert_absent(got.path_and_query.as_bytes(), DENIED, "upstream query");
    }
    assert_eq!(up.count(), 0, "none of those went upstream");
}

/// Issue 16: a denied patient named in a field no adapter reads, inside a
/// granted recipient's message, for SendGrid, Twilio and Braze (Meta and
/// TikTok: tests/guard.rs). The recipient's entry goes (so the request is
/// refused when it was the only one) and nothing of the denied patient arrives.
#[tokio::test(flavor = "multi_thread")]
async fn denied_patients_in_free_fields_of_messaging_never_arrive() {
    let (p, up) = setup("guard-cases-free").await;
    let cases: Vec<(&str, Req, u16)> = vec![
        (
            "SendGrid recipient name",
            sendgrid(mail(
                json!({"to": [{"email": "jane.roe@example.com", "name": "deny.me@example.com"}]}),
                json!({}),
            )),
            451,
        ),
        (
            "SendGrid custom_args",
            sendgrid(mail(
                json!({"to": [{"email": "jane.roe@example.com"}], "custom_args": {"ref": "crm:0031x00000den"}}),
                json!({}),
            )),
            451,
        ),
        (
            "Twilio Body",
            twilio(&[
                ("To", "+14155550100"),
                ("From", "+14155559999"),
                ("Body", "Your partner (415) 555-0102 is booked too"),
            ]),
            451,
        ),
        (
            "Twilio StatusCallback",
            twilio(&[
                ("To", "+14155550100"),
                ("From", "+14155559999"),
                ("Body", "See you tomorrow"),
                (
                    "StatusCallback",
                    "https://hospital.example/cb?who=deny.me%40example.com",
                ),
            ]),
            451,
        ),
        (
            "Braze attribute note",
            braze(
                "/users/track",
                json!({"attributes": [
                    {"external_id": "P-1001", "email": "jane.roe@example.com", "note": "family: P-1002"},
                    {"external_id": "P-1001", "first_name": "Jane"}
                ]}),
            ),
            200,
        ),
    ];
    for (what, req, status) in cases {
        let r = send(p.proxy, req).await;
        let body = String::from_utf8_lossy(&r.body).to_string();
        assert_eq!(r.status, status, "{what}: {body}");
        assert_absent(&r.body, DENIED, what);
    }
    for got in up.requests() {
        assert_absent(&got.body, DENIED, "upstream body");
        assert_absent(got.path_and_query.as_bytes(), DENIED, "upstream query");
        assert_absent(got.body.as_slice(), &["P-1002"], "upstream body");
    }
    // Only the Braze request went, without the attribute that named P-1002.
    assert_eq!(up.count(), 1);
    let got = up.last().json();
    assert_eq!(got["attributes"].as_array().map(Vec::len), Some(1), "{got}");
}
