//! Issue 16 (Build 6 and 7): vendor flags read as the vendor reads them, and
//! Braze message kinds decided with their channel, through the running proxy to
//! the recording upstream. Every case asserts that nothing of a patient who
//! must not be sent arrives, in any form (plain, lower-case, digits, SHA-256,
//! MD5), and the status and error code the app sees.

mod common;
use common::*;
use serde_json::{json, Value};

const SENDGRID: &str = "api.sendgrid.com";
const BRAZE: &str = "rest.iad-01.braze.com";
/// P-1002: every category and channel denied.
const DENIED: &[&str] = &["deny.me@example.com", "+14155550102", "crm:0031x00000den"];
/// P-1009: email channel denied, marketing SMS granted.
const EMAIL_DENIED: &[&str] = &["P-1009", "email.denied.channel@example.com", "+14155550109"];
/// P-1006: SMS channel denied; only appointment reminders granted.
const SMS_DENIED: &[&str] = &[
    "P-1006",
    "sms.denied@example.com",
    "+14155550106",
    "crm:0031x00000smd",
];

async fn setup(name: &str) -> (Proxy, Upstream) {
    let dir = test_dir(name);
    let ca = test_ca(&dir.join("upstream"), VENDOR_HOSTS);
    let up = start_upstream(&ca).await;
    (start_proxy(&dir, &up, &ca, ProxyOpts::default()), up)
}

/// A mail to a granted patient (P-1001) and a denied one (P-1002) with
/// `mail_settings.{flag}` set to `setting`.
fn mail(flag: &str, setting: Value) -> Value {
    json!({
        "personalizations": [{"to": [{"email": "jane.roe@example.com"}, {"email": "deny.me@example.com"}]}],
        "from": {"email": "news@hospital.example"},
        "subject": "Flu clinic",
        "content": [{"type": "text/plain", "value": "hello"}],
        "mail_settings": {flag: setting}
    })
}

/// Send and assert it was refused with `status` / `code`, nothing upstream.
async fn refused(p: &Proxy, up: &Upstream, req: Req, status: u16, code: &str, what: &str) {
    let before = up.count();
    let r = send(p.proxy, req).await;
    assert_eq!(
        r.status,
        status,
        "{what}: {}",
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(r.decision(), "blocked", "{what}");
    assert_eq!(r.contract()["error"], code, "{what}");
    assert_eq!(up.count(), before, "{what}: nothing went upstream");
}

const FLAGS: [&str; 4] = [
    "bypass_list_management",
    "bypass_unsubscribe_management",
    "bypass_spam_management",
    "bypass_bounce_management",
];

#[tokio::test(flavor = "multi_thread")]
async fn sendgrid_bypass_flags_on_in_any_form_refuse_the_mail() {
    let (p, up) = setup("vendors-sendgrid-on").await;
    for flag in FLAGS {
        for on in [
            json!(true),
            json!("true"),
            json!("TRUE"),
            json!("True"),
            json!(1),
            json!("1"),
        ] {
            let body = mail(flag, json!({ "enable": on }));
            let what = format!("{flag} = {on}");
            refused(
                &p,
                &up,
                Req::post(SENDGRID, "/v3/mail/send", body.to_string()),
                451,
                flag,
                &what,
            )
            .await;
        }
        // Keys a case-insensitive decoder reads as the same setting.
        let body = json!({
            "personalizations": [{"to": [{"email": "jane.roe@example.com"}]}],
            "from": {"email": "news@hospital.example"}, "subject": "x",
            "content": [{"type": "text/plain", "value": "x"}],
            "Mail_Settings": {flag.to_uppercase(): {"Enable": "true"}}
        });
        refused(
            &p,
            &up,
            Req::post(SENDGRID, "/v3/mail/send", body.to_string()),
            451,
            flag,
            &format!("{flag} upper-case"),
        )
        .await;
    }
    assert_eq!(up.count(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn sendgrid_bypass_flags_only_a_clear_false_passes() {
    let (p, up) = setup("vendors-sendgrid-unclear").await;
    for flag in FLAGS {
        for unclear in [
            json!({"enable": "yes"}),
            json!({"enable": "on"}),
            json!({"enable": 2}),
            json!({"enable": {"value": true}}),
            json!({"enable": [true]}),
            json!({"enable": null}),
            json!({}),
            json!(true),
        ] {
            let body = mail(flag, unclear.clone());
            refused(
                &p,
                &up,
                Req::post(SENDGRID, "/v3/mail/send", body.to_string()),
                422,
                "unreadable_body",
                &format!("{flag} = {unclear}"),
            )
            .await;
        }
    }
    assert_eq!(up.count(), 0);
    // A clear false passes, the denied recipient removed.
    for flag in FLAGS {
        for off in [
            json!(false),
            json!("false"),
            json!("False"),
            json!(0),
            json!("0"),
        ] {
            let body = mail(flag, json!({ "enable": off }));
            let what = format!("{flag} = {off}");
            let before = up.count();
            let r = send(
                p.proxy,
                Req::post(SENDGRID, "/v3/mail/send", body.to_string()),
            )
            .await;
            assert_eq!(
                r.status,
                200,
                "{what}: {}",
                String::from_utf8_lossy(&r.body)
            );
            assert_eq!(r.decision(), "modified", "{what}");
            assert_eq!(up.count(), before + 1, "{what}");
            let got = up.last();
            assert_absent(&got.body, DENIED, &what);
            assert_eq!(
                got.json()["personalizations"][0]["to"],
                json!([{"email": "jane.roe@example.com"}]),
                "{what}"
            );
        }
    }
}

fn braze_send(ids: &[&str], messages: Value) -> Req {
    let body = json!({"external_user_ids": ids, "messages": messages});
    Req::post(BRAZE, "/messages/send", body.to_string()).header("authorization", "Bearer BRAZE")
}

fn email() -> Value {
    json!({"app_id": "app-1", "subject": "Flu clinic", "from": "Clinic <news@hospital.example>",
           "body": "<p>Book your flu shot</p>"})
}

fn sms() -> Value {
    json!({"subscription_group_id": "grp-1", "body": "Book your flu shot"})
}

/// Forwarded and modified: the upstream body.
async fn forwarded(p: &Proxy, up: &Upstream, req: Req, what: &str) -> Value {
    let before = up.count();
    let r = send(p.proxy, req).await;
    assert_eq!(
        r.status,
        200,
        "{what}: {}",
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(r.decision(), "modified", "{what}");
    assert_eq!(up.count(), before + 1, "{what}");
    up.last().json()
}

#[tokio::test(flavor = "multi_thread")]
async fn braze_email_is_decided_with_the_email_channel() {
    let (p, up) = setup("vendors-braze-email").await;
    // P-1009's email channel is denied: the email does not go to them.
    let v = forwarded(
        &p,
        &up,
        braze_send(&["P-1001", "P-1009"], json!({"email": email()})),
        "email to P-1001 and P-1009",
    )
    .await;
    assert_absent(
        up.last().body.as_slice(),
        EMAIL_DENIED,
        "braze email upstream bytes",
    );
    assert_eq!(v["external_user_ids"], json!(["P-1001"]));
    assert_eq!(v["messages"]["email"], email());
    // Only P-1009: nothing to send.
    let r = send(p.proxy, braze_send(&["P-1009"], json!({"email": email()}))).await;
    assert_eq!(r.status, 451, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.contract()["error"], "blocked_by_consent_policy");
    assert_eq!(r.contract()["reasons"], json!(["channel_denied"]));
    assert_eq!(up.count(), 1, "nothing more went upstream");
}

#[tokio::test(flavor = "multi_thread")]
async fn braze_sms_is_decided_as_marketing_sms_with_the_sms_channel() {
    let (p, up) = setup("vendors-braze-sms").await;
    // Marketing by SMS is `marketing_sms`: P-1006 never granted it (P-1020 did).
    let v = forwarded(
        &p,
        &up,
        braze_send(&["braze:1020", "P-1006"], json!({"sms": sms()})),
        "marketing sms",
    )
    .await;
    assert_absent(
        up.last().body.as_slice(),
        SMS_DENIED,
        "braze sms upstream bytes",
    );
    assert_eq!(v["external_user_ids"], json!(["braze:1020"]));
    // An appointment reminder by SMS: P-1006 granted the category but denied
    // the SMS channel.
    let v = forwarded(
        &p,
        &up,
        braze_send(&["braze:1020", "P-1006"], json!({"sms": sms()}))
            .header("x-consent-category", "appointment_reminders"),
        "reminder sms",
    )
    .await;
    assert_absent(
        up.last().body.as_slice(),
        SMS_DENIED,
        "braze reminder upstream bytes",
    );
    assert_eq!(v["external_user_ids"], json!(["braze:1020"]));
    // WhatsApp reaches the phone like SMS.
    let r = send(
        p.proxy,
        braze_send(&["P-1006"], json!({"whats_app": {"body": "x"}}))
            .header("x-consent-category", "appointment_reminders"),
    )
    .await;
    assert_eq!(r.status, 451, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.contract()["reasons"], json!(["channel_denied"]));
    assert_eq!(up.count(), 2, "nothing more went upstream");
}

#[tokio::test(flavor = "multi_thread")]
async fn braze_every_kind_must_reach_each_recipient() {
    let (p, up) = setup("vendors-braze-kinds").await;
    // Email and SMS together: P-1009 may get the SMS but not the email, and
    // Braze sends both to everyone listed, so P-1009 is dropped.
    let v = forwarded(
        &p,
        &up,
        braze_send(
            &["P-1001", "P-1009"],
            json!({"email": email(), "sms": sms()}),
        ),
        "email+sms",
    )
    .await;
    assert_absent(
        up.last().body.as_slice(),
        EMAIL_DENIED,
        "email+sms upstream bytes",
    );
    assert_eq!(v["external_user_ids"], json!(["P-1001"]));
    assert!(v["messages"].get("email").is_some() && v["messages"].get("sms").is_some());
    // A kind nobody listed may receive is removed: P-1009 gets the SMS only.
    let v = forwarded(
        &p,
        &up,
        braze_send(&["P-1009"], json!({"email": email(), "sms": sms()})),
        "kind removed",
    )
    .await;
    assert_eq!(v["external_user_ids"], json!(["P-1009"]));
    assert!(v["messages"].get("email").is_none(), "{v}");
    assert_eq!(v["messages"]["sms"], sms());
    let t = String::from_utf8_lossy(&up.last().body).to_string();
    assert!(
        !t.contains("Flu clinic"),
        "the email's content is gone: {t}"
    );
    // P-1002 (everything denied) beside the others: never sent.
    let v = forwarded(
        &p,
        &up,
        braze_send(
            &["P-1002", "P-1001", "crm:0031x00000den"],
            json!({"email": email(), "sms": sms(), "apple_push": {"alert": "x"}}),
        ),
        "denied patient",
    )
    .await;
    assert_absent(up.last().body.as_slice(), DENIED, "denied upstream bytes");
    assert_absent(
        up.last().body.as_slice(),
        &["P-1002"],
        "denied upstream bytes",
    );
    assert_eq!(v["external_user_ids"], json!(["P-1001"]));
    // A kind consentgate does not know cannot be decided: unreadable.
    let before = up.count();
    let r = send(
        p.proxy,
        braze_send(
            &["P-1001", "P-1009"],
            json!({"carrier_pigeon": {"body": "x"}}),
        ),
    )
    .await;
    assert_eq!(r.status, 422, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.contract()["error"], "unreadable_body");
    assert_eq!(up.count(), before, "nothing went upstream");
}
