//! Opt-outs learned on the egress path (SPEC §13), with the real binary and the
//! recording upstream playing Twilio: a 21610 answer for one patient denies
//! their SMS channel, durably and audited, and the app still gets Twilio's answer.

mod common;
mod loop_support;

use common::*;
use loop_support::*;
use serde_json::json;

const ANSWER_21610: &str = r#"{"code": 21610, "message": "Attempt to send to unsubscribed recipient", "more_info": "https://www.twilio.com/docs/errors/21610", "status": 400}"#;
const PHONE: &str = "+14155550177";
const OTHER_PHONE: &str = "+14155550178";

fn sms(to: &str, category: Option<&str>) -> Req {
    let body = form(&[
        ("To", to),
        ("From", "+14155550000"),
        ("Body", "Your appointment"),
    ]);
    let mut r = Req::post(
        "api.twilio.com",
        "/2010-04-01/Accounts/AC123/Messages.json",
        body,
    )
    .header("content-type", "application/x-www-form-urlencoded");
    if let Some(c) = category {
        r = r.header("x-consent-category", c);
    }
    r
}

fn patients() -> Vec<serde_json::Value> {
    let granted = json!({"marketing_sms": "granted", "appointment_reminders": "granted"});
    vec![
        json!({"patient_id": "P-SMS-1", "identifiers": {"phones": [PHONE]}, "categories": granted,
            "updated_at": "2026-11-20T10:00:00Z", "source": "crm"}),
        json!({"patient_id": "P-SMS-2", "identifiers": {"phones": [OTHER_PHONE]}, "categories": granted,
            "updated_at": "2026-11-20T10:00:00Z", "source": "crm"}),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn twilio_21610_denies_sms_for_that_patient_durably_and_audited() {
    let dir = test_dir("loop-learned");
    let ca = test_ca(&dir.join("upstream"), VENDOR_HOSTS);
    let up = start_upstream(&ca).await;
    let consent = snapshot(&dir, &patients());
    let opts = || ProxyOpts {
        consent_file: Some(consent.clone()),
        ..Default::default()
    };
    let mut p = start_proxy(&dir, &up, &ca, opts());

    // A 400 that is not 21610 changes nothing.
    up.push(
        400,
        r#"{"code": 21211, "message": "Invalid 'To' Phone Number", "status": 400}"#,
        &[],
    );
    let r = send(p.proxy, sms(OTHER_PHONE, None)).await;
    assert_eq!(r.status, 400);
    assert!(record(&p, "P-SMS-2")
        .await
        .get("channels")
        .and_then(|c| c.get("sms"))
        .is_none());

    // Twilio answers 21610 for P-SMS-1: the app gets that answer byte for byte.
    up.push(400, ANSWER_21610, &[]);
    let r = send(p.proxy, sms(PHONE, None)).await;
    assert_eq!(r.status, 400);
    assert_eq!(
        r.body,
        ANSWER_21610.as_bytes(),
        "Twilio's answer, unchanged"
    );
    assert_eq!(r.header("content-type"), Some("application/json"));
    let learned_from = r.header("x-consentgate-request-id").unwrap().to_string();
    assert_eq!(up.count(), 2);

    // The very next SMS to them is refused without reaching Twilio; reminders too.
    for category in [None, Some("appointment_reminders")] {
        let r = send(p.proxy, sms(PHONE, category)).await;
        assert_eq!(
            r.status,
            451,
            "{category:?}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(r.decision(), "blocked");
    }
    assert_eq!(up.count(), 2, "nothing more reached Twilio");
    // The other patient is untouched.
    up.push(201, r#"{"sid": "SM1"}"#, &[]);
    assert_eq!(send(p.proxy, sms(OTHER_PHONE, None)).await.status, 201);

    // GET shows it.
    let rec = record(&p, "P-SMS-1").await;
    assert_eq!(rec["channels"]["sms"], "denied", "{rec}");
    assert_eq!(rec["source"], "vendor:twilio");
    assert_eq!(
        rec["categories"]["appointment_reminders"], "granted",
        "only the channel changed"
    );

    // The audit has it, with the vendor as actor, joined to the request it came from
    // (the audit writer works off the hot path: wait for the record to land).
    eventually("the consent_change record", 10, || async {
        audit(&dir).iter().any(|r| r["kind"] == "consent_change")
    })
    .await;
    let changes: Vec<_> = audit(&dir)
        .into_iter()
        .filter(|r| r["kind"] == "consent_change")
        .collect();
    assert_eq!(changes.len(), 1, "{changes:#?}");
    assert_eq!(changes[0]["actor"], "vendor:twilio");
    assert_eq!(changes[0]["request_id"], learned_from.as_str());
    assert_eq!(changes[0]["reason"], "21610");
    assert_ne!(
        changes[0]["patient"], "P-SMS-1",
        "a pseudonym, never the id"
    );
    let audited = audit_bytes(&dir);
    assert_absent(&audited, &[PHONE], "audit");
    assert!(!String::from_utf8_lossy(&audited).contains("P-SMS-1"));
    let log = std::fs::read(&p.log).unwrap();
    assert_absent(&log, &[PHONE, OTHER_PHONE], "process log");
    assert!(!String::from_utf8_lossy(&log).contains("P-SMS-"));
    assert_eq!(
        metric(
            &p,
            r#"consentgate_optouts_learned_total{kind="21610",vendor="twilio"}"#
        )
        .await,
        1.0
    );

    // Durable: after kill -9 and a restart the denial still holds.
    kill_9(&mut p);
    let p = start_proxy(&dir, &up, &ca, opts());
    assert_eq!(record(&p, "P-SMS-1").await["channels"]["sms"], "denied");
    let r = send(p.proxy, sms(PHONE, None)).await;
    assert_eq!(r.status, 451);
    assert_eq!(up.count(), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn other_answers_stream_through_untouched() {
    let dir = test_dir("loop-learned-pass");
    let ca = test_ca(&dir.join("upstream"), VENDOR_HOSTS);
    let up = start_upstream(&ca).await;
    let consent = snapshot(&dir, &patients());
    let p = start_proxy(
        &dir,
        &up,
        &ca,
        ProxyOpts {
            consent_file: Some(consent),
            ..Default::default()
        },
    );
    // 21610 in a body too big to be the error answer, or not JSON: not learned.
    let big = format!(r#"{{"code": 21610, "pad": "{}"}}"#, "x".repeat(20_000));
    up.push(400, &big, &[]);
    let r = send(p.proxy, sms(PHONE, None)).await;
    assert_eq!((r.status, r.body.len()), (400, big.len()));
    up.push(400, "code=21610", &[("content-type", "text/plain")]);
    let r = send(p.proxy, sms(PHONE, None)).await;
    assert_eq!(r.body, b"code=21610");
    assert!(record(&p, "P-SMS-1")
        .await
        .get("channels")
        .and_then(|c| c.get("sms"))
        .is_none());
}
