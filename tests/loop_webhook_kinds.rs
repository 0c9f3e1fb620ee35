//! Issue 18 build item 2, the signal kinds tests/loop_webhooks.rs does not
//! send, through the real binary: Twilio's other opt-out keywords without
//! `OptOutType`, HELP (nothing), START under a configured `mapping`; SendGrid
//! `spamreport`; Mandrill `reject` (a denylist reject denies, a bounce reject
//! does not); Klaviyo's timestamp window and its SMS unsubscribe.

mod common;
mod loop_support;

use common::*;
use loop_support::*;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::Path;

const BASE: &str = "https://hooks.example.org";
const TWILIO_TOKEN: &str = "twilio-auth-token-kinds";
const MANDRILL_KEY: &str = "mandrill-webhook-key-kinds";
const KLAVIYO_SECRET: &str = "klaviyo-secret-kinds-0123456789";
const PHONE: &str = "+14155550171";

fn patients() -> Vec<Value> {
    let r = |id: &str, ids: Value| {
        json!({"patient_id": id, "identifiers": ids, "updated_at": "2026-11-20T10:00:00Z",
            "categories": {"marketing_email": "granted", "marketing_sms": "granted"}, "source": "crm"})
    };
    vec![
        r("P-K-TW", json!({"phones": [PHONE]})),
        r("P-K-SG", json!({"emails": ["sg.kinds@example.com"]})),
        r("P-K-MD", json!({"emails": ["md.kinds@example.com"]})),
        r("P-K-MD2", json!({"emails": ["md2.kinds@example.com"]})),
        r(
            "P-K-KL",
            json!({"external_ids": ["klaviyo:01KINDSPROFILE"]}),
        ),
    ]
}

fn start(dir: &Path, up: &Upstream, ca: &TestCa, sendgrid_public: &str) -> (Proxy, SocketAddr) {
    let secret = |name: &str, text: &str| write(dir, name, text).display().to_string();
    let wp = free_port();
    let extra = format!(
        concat!(
            "webhooks:\n  public_url: {BASE}\n  state_dir: {state}\n",
            "  twilio:\n    secret_file: {tw}\n    mapping:\n      start: {{channels: {{sms: null}}}}\n",
            "  sendgrid: {{public_key_file: {sg}}}\n",
            "  mandrill: {{secret_file: {md}}}\n",
            "  klaviyo: {{secret_file: {kl}}}\n",
        ),
        BASE = BASE,
        state = dir.join("webhooks").display(),
        tw = secret("twilio.token", TWILIO_TOKEN),
        sg = secret("sendgrid.pub", sendgrid_public),
        md = secret("mandrill.key", MANDRILL_KEY),
        kl = secret("klaviyo.secret", KLAVIYO_SECRET),
    );
    let opts = ProxyOpts {
        consent_file: Some(snapshot(dir, &patients())),
        extra_yaml: extra,
        ..Default::default()
    };
    let (pp, ap) = (free_port(), free_port());
    let yaml = config_yaml(dir, up.addr, ca, &opts, pp, ap).replacen(
        "listen:\n",
        &format!("listen:\n  webhooks: 127.0.0.1:{wp}\n"),
        1,
    );
    let config = dir.join("consentgate.yaml");
    std::fs::write(&config, yaml).unwrap();
    (
        spawn_proxy(dir, &config, pp, ap),
        ([127, 0, 0, 1], wp).into(),
    )
}

/// A signed Twilio inbound message.
async fn twilio(hooks: SocketAddr, sid: &str, fields: &[(&str, &str)]) -> u16 {
    let mut all = vec![("From", PHONE), ("To", "+14155550000"), ("MessageSid", sid)];
    all.extend_from_slice(fields);
    let sig = url_and_sorted_fields_sig(TWILIO_TOKEN, &format!("{BASE}/v1/webhooks/twilio"), &all);
    raw(
        hooks,
        "POST",
        "/v1/webhooks/twilio",
        &[
            ("content-type", "application/x-www-form-urlencoded"),
            ("x-twilio-signature", &sig),
        ],
        &form(&all),
    )
    .await
    .0
}

/// A signed Mandrill batch of one event.
async fn mandrill(hooks: SocketAddr, event: Value) -> u16 {
    let events = json!([event]).to_string();
    let fields = [("mandrill_events", events.as_str())];
    let sig = url_and_sorted_fields_sig(
        MANDRILL_KEY,
        &format!("{BASE}/v1/webhooks/mandrill"),
        &fields,
    );
    raw(
        hooks,
        "POST",
        "/v1/webhooks/mandrill",
        &[
            ("content-type", "application/x-www-form-urlencoded"),
            ("x-mandrill-signature", &sig),
        ],
        &form(&fields),
    )
    .await
    .0
}

/// A Klaviyo system webhook for one topic, signed at `ts`.
async fn klaviyo(hooks: SocketAddr, id: &str, topic: &str, ts: &str) -> u16 {
    let body = json!({
        "data": [{"external_id": id, "topic": format!("event:klaviyo.{topic}"),
            "payload": {"data": {"type": "event", "id": id, "attributes": {"event_properties": {}},
                "relationships": {"profile": {"data": {"type": "profile", "id": "01KINDSPROFILE"}}}}}}],
        "meta": {"klaviyo_account_id": "AbC123", "klaviyo_webhook_id": "wh-1", "timestamp": ts}
    })
    .to_string()
    .into_bytes();
    let sig = klaviyo_sig(KLAVIYO_SECRET, &body, ts);
    raw(
        hooks,
        "POST",
        "/v1/webhooks/klaviyo",
        &[
            ("content-type", "application/json"),
            ("klaviyo-webhook-id", "wh-1"),
            ("klaviyo-timestamp", ts),
            ("klaviyo-signature", &sig),
        ],
        &body,
    )
    .await
    .0
}

fn sms_denied(r: &Value) -> bool {
    r["channels"]["sms"] == "denied"
}

fn email_denied(r: &Value) -> bool {
    r["channels"]["email"] == "denied"
}

async fn events(p: &Proxy, vendor: &str, kind: &str, result: &str) -> f64 {
    metric(
        p,
        &format!(
            "consentgate_webhook_events_total{{kind=\"{kind}\",result=\"{result}\",vendor=\"{vendor}\"}}"
        ),
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn keywords_spam_rejects_timestamps_and_a_configured_mapping() {
    let dir = test_dir("loop-webhook-kinds");
    let ca = test_ca(&dir.join("upstream"), VENDOR_HOSTS);
    let up = start_upstream(&ca).await;
    let (kp, public) = sendgrid_key();
    let (p, hooks) = start(&dir, &up, &ca, &public);

    // Twilio: HELP changes nothing; a bare "stopall" (no OptOutType) is a STOP;
    // START, mapped to lift the channel denial, lifts it.
    assert_eq!(twilio(hooks, "SM-k-1", &[("Body", "help")]).await, 200);
    assert!(!sms_denied(&record(&p, "P-K-TW").await));
    assert_eq!(events(&p, "twilio", "help", "ignored").await, 1.0);
    assert_eq!(twilio(hooks, "SM-k-2", &[("Body", " StopAll ")]).await, 200);
    let rec = record(&p, "P-K-TW").await;
    assert!(sms_denied(&rec), "{rec}");
    assert_eq!(rec["source"], "vendor:twilio");
    assert_eq!(
        twilio(
            hooks,
            "SM-k-3",
            &[("Body", "start"), ("OptOutType", "START")]
        )
        .await,
        200
    );
    let rec = record(&p, "P-K-TW").await;
    assert!(rec["channels"].get("sms").is_none(), "mapped START: {rec}");
    assert_eq!(events(&p, "twilio", "start", "applied").await, 1.0);

    // SendGrid: a spam report stops the channel.
    let body =
        json!([{"email": "sg.kinds@example.com", "event": "spamreport", "sg_event_id": "sg-k-1",
        "timestamp": now_s()}])
        .to_string()
        .into_bytes();
    let ts = now_s().to_string();
    let sig = sendgrid_sig(&kp, &ts, &body);
    let (s, _, _) = raw(
        hooks,
        "POST",
        "/v1/webhooks/sendgrid",
        &[
            ("content-type", "application/json"),
            ("x-twilio-email-event-webhook-signature", &sig),
            ("x-twilio-email-event-webhook-timestamp", &ts),
        ],
        &body,
    )
    .await;
    assert_eq!(s, 200);
    assert!(email_denied(&record(&p, "P-K-SG").await));

    // Mandrill: a reject for a bounce is deliverability, not consent; a denylist
    // reject (no such reason) is an opt-out.
    let reject = |id: &str, email: &str, reason: Option<&str>| {
        let mut msg = json!({"email": email, "state": "rejected"});
        if let Some(r) = reason {
            msg["reject"] = json!({"reason": r});
        }
        json!({"event": "reject", "_id": id, "ts": 1_700_000_000, "msg": msg})
    };
    assert_eq!(
        mandrill(
            hooks,
            reject("md-k-1", "md2.kinds@example.com", Some("hard-bounce"))
        )
        .await,
        200
    );
    assert!(!email_denied(&record(&p, "P-K-MD2").await));
    assert_eq!(events(&p, "mandrill", "reject_other", "ignored").await, 1.0);
    assert_eq!(
        mandrill(hooks, reject("md-k-2", "md.kinds@example.com", None)).await,
        200
    );
    assert!(email_denied(&record(&p, "P-K-MD").await));

    // Klaviyo: correctly signed but 10 minutes old → 401, nothing changes; fresh,
    // an SMS unsubscribe denies the SMS marketing categories.
    let stale = (chrono::Utc::now() - chrono::Duration::minutes(10)).to_rfc3339();
    assert_eq!(
        klaviyo(hooks, "kl-k-1", "unsubscribed_from_sms_marketing", &stale).await,
        401
    );
    let before = record(&p, "P-K-KL").await;
    assert_eq!(before["categories"]["marketing_sms"], "granted");
    let fresh = chrono::Utc::now().to_rfc3339();
    assert_eq!(
        klaviyo(hooks, "kl-k-2", "unsubscribed_from_sms_marketing", &fresh).await,
        200
    );
    let rec = record(&p, "P-K-KL").await;
    assert_eq!(rec["categories"]["marketing_sms"], "denied", "{rec}");
    assert_eq!(rec["categories"]["patient_surveys"], "denied", "{rec}");
    assert_eq!(
        rec["categories"]["marketing_email"], "granted",
        "email untouched: {rec}"
    );
}
