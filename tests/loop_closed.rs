//! Issue 18 end to end, "one opt-out, every system" (SPEC §13): an opt-out that
//! reaches consentgate by a way other than the admin API is pushed to the
//! `sync:` targets of other vendors. The real binary, the recording upstream
//! playing every vendor:
//! - a Mandrill `unsub` webhook (the vendor names the address) → SendGrid's
//!   global suppression list gets that address;
//! - a Twilio 21610 answer on the egress path → Braze's SMS subscription group
//!   unsubscribes the patient by their Braze external id;
//! - an edit of the consent snapshot file → the same Braze group, by external id.
//!
//! tests/loop_sync.rs covers each target's wire format, retries and kill -9
//! with admin-API writes; this covers the other sources of a change.

mod common;
mod loop_support;

use common::*;
use loop_support::*;
use serde_json::{json, Value};
use std::path::Path;

const BASE: &str = "https://hooks.example.org";
const MANDRILL_KEY: &str = "mandrill-webhook-key-0123";
const VENDOR_KEY: &str = "vendor-api-key-0123";
const MD_EMAIL: &str = "md.loop@example.com";
const SMS_PHONE: &str = "+14155550191";
/// In the snapshot file only (plaintext there, hashed once stored).
const SNAP_EMAIL: &str = "snap.loop@example.com";
const ANSWER_21610: &str = r#"{"code": 21610, "message": "Attempt to send to unsubscribed recipient", "more_info": "https://www.twilio.com/docs/errors/21610", "status": 400}"#;

fn patients(third_sms: &str) -> Vec<Value> {
    let granted = json!({"marketing_email": "granted", "marketing_sms": "granted",
        "appointment_reminders": "granted"});
    vec![
        json!({"patient_id": "P-LOOP-1", "identifiers": {"emails": [MD_EMAIL]},
            "categories": granted, "updated_at": "2026-11-20T10:00:00Z", "source": "crm"}),
        json!({"patient_id": "P-LOOP-2", "identifiers": {"phones": [SMS_PHONE],
            "external_ids": ["braze:braze-loop-2"]},
            "categories": granted, "updated_at": "2026-11-20T10:00:00Z", "source": "crm"}),
        json!({"patient_id": "P-LOOP-3", "identifiers": {"external_ids": ["braze:braze-loop-3"]},
            "categories": granted, "channels": {"sms": third_sms},
            "updated_at": if third_sms == "denied" { "2026-11-21T10:00:00Z" } else { "2026-11-20T10:00:00Z" },
            "source": "crm"}),
        // Denies the email channel in the same snapshot edit: SendGrid needs
        // the address, which only the snapshot carries.
        json!({"patient_id": "P-LOOP-4", "identifiers": {"emails": [SNAP_EMAIL]},
            "categories": granted, "channels": {"email": third_sms},
            "updated_at": if third_sms == "denied" { "2026-11-21T10:00:00Z" } else { "2026-11-20T10:00:00Z" },
            "source": "crm"}),
    ]
}

/// Replace the snapshot file atomically (as an operator's tooling would).
fn write_snapshot(dir: &Path, records: &[Value]) {
    let text: String = records.iter().map(|r| format!("{r}\n")).collect();
    let tmp = dir.join("consent.jsonl.tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join("consent.jsonl")).unwrap();
}

fn start(dir: &Path, up: &Upstream, ca: &TestCa) -> (Proxy, std::net::SocketAddr) {
    let consent = snapshot(dir, &patients("granted"));
    let wp = free_port();
    let extra = format!(
        concat!(
            "webhooks:\n  public_url: {BASE}\n  state_dir: {state}\n",
            "  mandrill: {{secret_file: {md}}}\n",
            "sync:\n  outbox: {outbox}\n  key_file: {key}\n  retry_initial: 200ms\n  retry_max: 2s\n",
            "  targets:\n",
            "    - {{name: sg-global, type: sendgrid_global, channels: [email], credentials_file: {creds}}}\n",
            "    - {{name: braze-sms, type: braze, host: rest.iad-01.braze.com, group_id: sub-grp-sms, ",
            "channels: [sms], credentials_file: {creds}}}\n",
        ),
        BASE = BASE,
        state = dir.join("webhooks").display(),
        md = write(dir, "mandrill.key", MANDRILL_KEY).display(),
        outbox = dir.join("sync-outbox").display(),
        key = write_key(dir, "sync.key", 0x5a).display(),
        creds = write(dir, "vendor.key", VENDOR_KEY).display(),
    );
    let opts = ProxyOpts {
        consent_file: Some(consent),
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

/// The requests the upstream got for `host`.
fn to(up: &Upstream, host: &str) -> Vec<Recorded> {
    up.requests()
        .into_iter()
        .filter(|r| r.sni.as_deref() == Some(host))
        .collect()
}

async fn wait_for(up: &Upstream, host: &str, n: usize) -> Vec<Recorded> {
    let u = up.clone();
    let h = host.to_string();
    eventually(&format!("{n} request(s) to {host}"), 20, move || {
        let (u, h) = (u.clone(), h.clone());
        async move { to(&u, &h).len() >= n }
    })
    .await;
    to(up, host)
}

fn braze_unsubscribe(r: &Recorded, external_id: &str) {
    assert_eq!(r.method, "POST");
    assert_eq!(r.path_and_query, "/subscription/status/set");
    assert_eq!(
        r.header("authorization"),
        Some(format!("Bearer {VENDOR_KEY}").as_str())
    );
    assert_eq!(
        r.json(),
        json!({"subscription_group_id": "sub-grp-sms", "subscription_state": "unsubscribed",
            "external_id": [external_id]})
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn webhook_learned_and_snapshot_opt_outs_reach_the_other_vendors() {
    let dir = test_dir("loop-closed");
    let ca = test_ca(&dir.join("upstream"), VENDOR_HOSTS);
    let up = start_upstream(&ca).await;
    let (p, hooks) = start(&dir, &up, &ca);
    // Nothing is denied at start: nothing is pushed.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(up.count(), 0, "{:?}", up.requests());

    // 1. Mandrill says P-LOOP-1 unsubscribed: SendGrid is told, with the address
    // Mandrill named (never stored by consentgate).
    let events = json!([{"event": "unsub", "_id": "md-loop-1", "ts": 1_700_000_000,
        "msg": {"email": MD_EMAIL, "state": "sent", "tags": [], "metadata": {}}}])
    .to_string();
    let fields = [("mandrill_events", events.as_str())];
    let sig = url_and_sorted_fields_sig(
        MANDRILL_KEY,
        &format!("{BASE}/v1/webhooks/mandrill"),
        &fields,
    );
    let (s, _, body) = raw(
        hooks,
        "POST",
        "/v1/webhooks/mandrill",
        &[
            ("content-type", "application/x-www-form-urlencoded"),
            ("x-mandrill-signature", &sig),
        ],
        &form(&fields),
    )
    .await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&body));
    let sg = wait_for(&up, "api.sendgrid.com", 1).await;
    assert_eq!(sg[0].method, "POST");
    assert_eq!(sg[0].path_and_query, "/v3/asm/suppressions/global");
    assert_eq!(sg[0].json(), json!({"recipient_emails": [MD_EMAIL]}));
    let pp = &p;
    eventually("the SendGrid push delivered", 10, || async {
        metric(
            pp,
            r#"consentgate_sync_deliveries_total{result="delivered",target="sg-global"}"#,
        )
        .await
            == 1.0
    })
    .await;

    // 2. Twilio answers 21610 for P-LOOP-2: Braze's SMS group unsubscribes them.
    up.push(400, ANSWER_21610, &[]);
    let sms = Req::post(
        "api.twilio.com",
        "/2010-04-01/Accounts/AC123/Messages.json",
        form(&[("To", SMS_PHONE), ("From", "+14155550000"), ("Body", "Hi")]),
    )
    .header("content-type", "application/x-www-form-urlencoded");
    let r = send(p.proxy, sms).await;
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(record(&p, "P-LOOP-2").await["channels"]["sms"], "denied");
    let braze = wait_for(&up, "rest.iad-01.braze.com", 1).await;
    braze_unsubscribe(&braze[0], "braze-loop-2");

    // 3. The snapshot file now says P-LOOP-3 denied SMS: Braze is told too.
    write_snapshot(&dir, &patients("denied"));
    let braze = wait_for(&up, "rest.iad-01.braze.com", 2).await;
    braze_unsubscribe(&braze[1], "braze-loop-3");
    // ... and the address only the snapshot carries reaches SendGrid's suppressions.
    let sg = wait_for(&up, "api.sendgrid.com", 2).await;
    assert_eq!(sg[1].path_and_query, "/v3/asm/suppressions/global");
    assert_eq!(sg[1].json(), json!({"recipient_emails": [SNAP_EMAIL]}));

    eventually("every push delivered", 10, || async {
        metric(
            pp,
            r#"consentgate_sync_deliveries_total{result="delivered",target="braze-sms"}"#,
        )
        .await
            == 2.0
    })
    .await;
    // One push per opt-out, none twice; nothing else went to those vendors.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert_eq!(to(&up, "api.sendgrid.com").len(), 2);
    assert_eq!(to(&up, "rest.iad-01.braze.com").len(), 2);
    // Each push is audited as `kind: sync`; no address in the audit or the outbox.
    let delivered = audit(&dir)
        .iter()
        .filter(|r| r["kind"] == "sync" && r["decision"] == "delivered")
        .count();
    assert_eq!(delivered, 4);
    assert_absent(
        &audit_bytes(&dir),
        &[MD_EMAIL, SMS_PHONE, SNAP_EMAIL],
        "audit",
    );
    let mut outbox = Vec::new();
    for e in std::fs::read_dir(dir.join("sync-outbox"))
        .unwrap()
        .flatten()
    {
        if e.path().is_file() {
            outbox.extend(std::fs::read(e.path()).unwrap());
        }
    }
    assert_absent(&outbox, &[MD_EMAIL, SMS_PHONE, SNAP_EMAIL], "outbox");
}
