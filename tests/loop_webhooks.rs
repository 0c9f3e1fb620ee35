//! Vendor opt-out webhooks (SPEC §13) with the real binary, for every vendor:
//! a correctly signed event changes the patient's consent; a bad or missing
//! signature is 401 and changes nothing; a replay changes nothing twice; an
//! unknown person is acknowledged and only counted.

mod common;
mod loop_support;

use common::*;
use loop_support::*;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::Path;

const BASE: &str = "https://hooks.example.org";
const TWILIO_TOKEN: &str = "twilio-auth-token-0123";
const MANDRILL_KEY: &str = "mandrill-webhook-key-0123";
const KLAVIYO_SECRET: &str = "klaviyo-secret-0123456789";
const HUBSPOT_SECRET: &str = "hubspot-client-secret-0123";
const MAILCHIMP_TOKEN: &str = "mc-path-token-0123456789";

#[derive(Clone, Copy, PartialEq, Debug)]
enum Sign {
    Good,
    Bad,
    Missing,
}

/// A webhook request: path, headers, body.
type Built = (String, Vec<(String, String)>, Vec<u8>);
/// Builds a vendor's request for (event id, who, signing).
type Builder = Box<dyn Fn(&str, &str, Sign) -> Built>;

struct Vendor {
    name: &'static str,
    patient: &'static str,
    /// The identity the vendor names the patient by, and one nobody has.
    who: &'static str,
    nobody: &'static str,
    /// The record shows the vendor's change.
    changed: fn(&Value) -> bool,
    /// An admin PATCH that undoes it (to see that a replay does not redo it).
    undo: &'static str,
    /// The `kind` label the event is counted under.
    kind: &'static str,
    build: Builder,
}

fn header(name: &str, v: String) -> (String, String) {
    (name.to_string(), v)
}

fn vendors(sendgrid: aws_lc_rs::signature::EcdsaKeyPair) -> Vec<Vendor> {
    let sendgrid = std::sync::Arc::new(sendgrid);
    vec![
        Vendor {
            name: "twilio",
            patient: "P-WH-TW",
            who: "+14155550181",
            nobody: "+14155550999",
            changed: |r| r["channels"]["sms"] == "denied",
            undo: r#"{"channels": {"sms": null}}"#,
            kind: "stop",
            build: Box::new(|id, who, sign| {
                let fields = [
                    ("From", who),
                    ("To", "+14155550000"),
                    ("Body", "Stop"),
                    ("MessageSid", id),
                    ("OptOutType", "STOP"),
                ];
                let url = format!("{BASE}/v1/webhooks/twilio");
                let key = if sign == Sign::Bad {
                    "wrong-token"
                } else {
                    TWILIO_TOKEN
                };
                let mut h = vec![header(
                    "content-type",
                    "application/x-www-form-urlencoded".into(),
                )];
                if sign != Sign::Missing {
                    h.push(header(
                        "x-twilio-signature",
                        url_and_sorted_fields_sig(key, &url, &fields),
                    ));
                }
                ("/v1/webhooks/twilio".into(), h, form(&fields))
            }),
        },
        Vendor {
            name: "sendgrid",
            patient: "P-WH-SG",
            who: "sg.patient@example.com",
            nobody: "nobody.sg@example.com",
            changed: |r| r["channels"]["email"] == "denied",
            undo: r#"{"channels": {"email": null}}"#,
            kind: "unsubscribe",
            build: Box::new(move |id, who, sign| {
                let body = json!([
                    {"email": who, "timestamp": now_s(), "event": "unsubscribe", "sg_event_id": id,
                     "sg_message_id": "m1"}
                ])
                .to_string()
                .into_bytes();
                let ts = now_s().to_string();
                let mut h = vec![header("content-type", "application/json".into())];
                if sign != Sign::Missing {
                    let signed_ts = if sign == Sign::Bad {
                        "1".to_string()
                    } else {
                        ts.clone()
                    };
                    h.push(header(
                        "x-twilio-email-event-webhook-signature",
                        sendgrid_sig(&sendgrid, &signed_ts, &body),
                    ));
                    h.push(header("x-twilio-email-event-webhook-timestamp", ts));
                }
                ("/v1/webhooks/sendgrid".into(), h, body)
            }),
        },
        Vendor {
            name: "mailchimp",
            patient: "P-WH-MC",
            who: "mc.patient@example.com",
            nobody: "nobody.mc@example.com",
            changed: |r| {
                r["categories"]["marketing_email"] == "denied"
                    && r["categories"]["patient_surveys"] == "denied"
            },
            undo: r#"{"categories": {"marketing_email": null, "patient_surveys": null}}"#,
            kind: "unsubscribe",
            build: Box::new(|id, who, sign| {
                let fields = [
                    ("type", "unsubscribe"),
                    ("fired_at", id),
                    ("data[action]", "unsub"),
                    ("data[reason]", "manual"),
                    ("data[id]", "8a25ff1d98"),
                    ("data[list_id]", "a6b5da1054"),
                    ("data[email]", who),
                    ("data[email_type]", "html"),
                ];
                let path = match sign {
                    Sign::Good => format!("/v1/webhooks/mailchimp/{MAILCHIMP_TOKEN}"),
                    Sign::Bad => "/v1/webhooks/mailchimp/guessed-token-0000000".to_string(),
                    Sign::Missing => "/v1/webhooks/mailchimp".to_string(),
                };
                let h = vec![header(
                    "content-type",
                    "application/x-www-form-urlencoded".into(),
                )];
                (path, h, form(&fields))
            }),
        },
        Vendor {
            name: "mandrill",
            patient: "P-WH-MD",
            who: "md.patient@example.com",
            nobody: "nobody.md@example.com",
            changed: |r| r["channels"]["email"] == "denied",
            undo: r#"{"channels": {"email": null}}"#,
            kind: "unsub",
            build: Box::new(|id, who, sign| {
                let events = json!([
                    {"event": "unsub", "_id": id, "ts": 1_700_000_000,
                     "msg": {"email": who, "state": "sent", "tags": [], "metadata": {}}}
                ])
                .to_string();
                let fields = [("mandrill_events", events.as_str())];
                let url = format!("{BASE}/v1/webhooks/mandrill");
                let key = if sign == Sign::Bad {
                    "wrong-key"
                } else {
                    MANDRILL_KEY
                };
                let mut h = vec![header(
                    "content-type",
                    "application/x-www-form-urlencoded".into(),
                )];
                if sign != Sign::Missing {
                    h.push(header(
                        "x-mandrill-signature",
                        url_and_sorted_fields_sig(key, &url, &fields),
                    ));
                }
                ("/v1/webhooks/mandrill".into(), h, form(&fields))
            }),
        },
        Vendor {
            name: "klaviyo",
            patient: "P-WH-KL",
            who: "01KLAVIYOPROFILE",
            nobody: "01NOBODYPROFILE",
            changed: |r| {
                r["categories"]["marketing_email"] == "denied"
                    && r["categories"]["patient_surveys"] == "denied"
            },
            undo: r#"{"categories": {"marketing_email": null, "patient_surveys": null}}"#,
            kind: "unsubscribed_from_email_marketing",
            build: Box::new(|id, who, sign| {
                let body = json!({
                    "data": [{"external_id": id, "topic": "event:klaviyo.unsubscribed_from_email_marketing",
                        "payload": {"data": {"type": "event", "id": id,
                            "attributes": {"event_properties": {"List": "Newsletter"}},
                            "relationships": {"profile": {"data": {"type": "profile", "id": who}}}}}}],
                    "meta": {"klaviyo_account_id": "AbC123", "klaviyo_webhook_id": "wh-1", "timestamp": "now"}
                })
                .to_string()
                .into_bytes();
                let ts = chrono::Utc::now().to_rfc3339();
                let secret = if sign == Sign::Bad {
                    "wrong-secret-0123456789"
                } else {
                    KLAVIYO_SECRET
                };
                let mut h = vec![
                    header("content-type", "application/json".into()),
                    header("klaviyo-webhook-id", "wh-1".into()),
                    header("klaviyo-timestamp", ts.clone()),
                ];
                if sign != Sign::Missing {
                    h.push(header("klaviyo-signature", klaviyo_sig(secret, &body, &ts)));
                }
                ("/v1/webhooks/klaviyo".into(), h, body)
            }),
        },
        Vendor {
            name: "hubspot",
            patient: "P-WH-HS",
            who: "901",
            nobody: "999999",
            changed: |r| r["channels"]["email"] == "denied",
            undo: r#"{"channels": {"email": null}}"#,
            kind: "email_optout",
            build: Box::new(|id, who, sign| {
                let body = json!([
                    {"eventId": id.parse::<u64>().unwrap_or(1), "subscriptionId": 4, "portalId": 62515,
                     "appId": 7, "occurredAt": 1_700_000_000_000u64, "subscriptionType": "contact.propertyChange",
                     "attemptNumber": 0, "objectId": who.parse::<u64>().unwrap(), "propertyName": "hs_email_optout",
                     "propertyValue": "true", "changeSource": "EMAIL"}
                ])
                .to_string()
                .into_bytes();
                let ts = (now_s() * 1000).to_string();
                let url = format!("{BASE}/v1/webhooks/hubspot");
                let secret = if sign == Sign::Bad {
                    "wrong"
                } else {
                    HUBSPOT_SECRET
                };
                let mut h = vec![
                    header("content-type", "application/json".into()),
                    header("x-hubspot-request-timestamp", ts.clone()),
                ];
                if sign != Sign::Missing {
                    h.push(header(
                        "x-hubspot-signature-v3",
                        hubspot_sig(secret, &url, &body, &ts),
                    ));
                }
                ("/v1/webhooks/hubspot".into(), h, body)
            }),
        },
    ]
}

fn patients() -> Vec<Value> {
    let r = |id: &str, ids: Value| {
        json!({"patient_id": id, "identifiers": ids, "updated_at": "2026-11-20T10:00:00Z",
            "categories": {"marketing_email": "granted", "marketing_sms": "granted"}, "source": "crm"})
    };
    vec![
        r("P-WH-TW", json!({"phones": ["+14155550181"]})),
        r("P-WH-SG", json!({"emails": ["SG.Patient@example.com"]})),
        r("P-WH-MC", json!({"emails": ["mc.patient@example.com"]})),
        r("P-WH-MD", json!({"emails": ["md.patient@example.com"]})),
        r(
            "P-WH-KL",
            json!({"external_ids": ["klaviyo:01KLAVIYOPROFILE"]}),
        ),
        r("P-WH-HS", json!({"external_ids": ["hubspot:62515:901"]})),
    ]
}

/// Write the secrets and start the binary with `listen.webhooks`.
fn start(dir: &Path, up: &Upstream, ca: &TestCa, sendgrid_public: &str) -> (Proxy, SocketAddr) {
    let secret = |name: &str, text: &str| write(dir, name, text).display().to_string();
    let consent = snapshot(dir, &patients());
    let wp = free_port();
    let extra = format!(
        concat!(
            "webhooks:\n  public_url: {BASE}\n  state_dir: {state}\n",
            "  twilio: {{secret_file: {tw}}}\n",
            "  sendgrid: {{public_key_file: {sg}}}\n",
            "  mailchimp: {{secret_file: {mc}}}\n",
            "  mandrill: {{secret_file: {md}}}\n",
            "  klaviyo: {{secret_file: {kl}}}\n",
            "  hubspot: {{secret_file: {hs}}}\n",
        ),
        BASE = BASE,
        state = dir.join("webhooks").display(),
        tw = secret("twilio.token", TWILIO_TOKEN),
        sg = secret("sendgrid.pub", sendgrid_public),
        mc = secret("mailchimp.token", MAILCHIMP_TOKEN),
        md = secret("mandrill.key", MANDRILL_KEY),
        kl = secret("klaviyo.secret", KLAVIYO_SECRET),
        hs = secret("hubspot.secret", HUBSPOT_SECRET),
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

async fn post(addr: SocketAddr, b: &Built) -> (u16, Vec<u8>) {
    let headers: Vec<(&str, &str)> = b.1.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let (s, _, body) = raw(addr, "POST", &b.0, &headers, &b.2).await;
    (s, body)
}

#[tokio::test(flavor = "multi_thread")]
async fn every_vendor_verified_applied_once_and_unknown_people_only_counted() {
    let dir = test_dir("loop-webhooks");
    let ca = test_ca(&dir.join("upstream"), VENDOR_HOSTS);
    let up = start_upstream(&ca).await;
    let (kp, public) = sendgrid_key();
    let (p, hooks) = start(&dir, &up, &ca, &public);
    let records_before = metric(&p, "consentgate_consent_records").await;

    for (n, v) in vendors(kp).iter().enumerate() {
        // HubSpot event ids are numbers.
        let id = if v.name == "hubspot" {
            format!("{}", 77_000 + n)
        } else {
            format!("evt-{}-{n}", v.name)
        };
        let before = record(&p, v.patient).await;
        assert!(!(v.changed)(&before), "{}: starts unchanged", v.name);

        // Bad and missing signatures: 401, nothing changes.
        for sign in [Sign::Bad, Sign::Missing] {
            let (s, body) = post(hooks, &(v.build)(&id, v.who, sign)).await;
            assert_eq!(
                s,
                401,
                "{} {sign:?}: {}",
                v.name,
                String::from_utf8_lossy(&body)
            );
            assert_eq!(
                record(&p, v.patient).await,
                before,
                "{} {sign:?} changed nothing",
                v.name
            );
        }

        // Correctly signed: the change is there, by the vendor.
        let good = (v.build)(&id, v.who, Sign::Good);
        let (s, body) = post(hooks, &good).await;
        assert_eq!(s, 200, "{}: {}", v.name, String::from_utf8_lossy(&body));
        let after = record(&p, v.patient).await;
        assert!((v.changed)(&after), "{}: {after}", v.name);
        assert_eq!(after["source"], format!("vendor:{}", v.name));

        // Undo it by hand, then replay the same event: nothing happens twice.
        let (s, undone) = admin(&p, "PATCH", &format!("/v1/consent/{}", v.patient), v.undo).await;
        assert_eq!(s, 200, "{undone}");
        assert!(!(v.changed)(&undone), "{}: {undone}", v.name);
        let (s, _) = post(hooks, &good).await;
        assert_eq!(s, 200, "{}: a replay is acknowledged", v.name);
        assert_eq!(
            record(&p, v.patient).await,
            undone,
            "{}: the replay changed nothing",
            v.name
        );

        // Someone nobody knows: acknowledged, counted, nothing stored.
        let (s, _) = post(
            hooks,
            &(v.build)(&format!("{}", 2000 + n), v.nobody, Sign::Good),
        )
        .await;
        assert_eq!(s, 200, "{}", v.name);
        let kind = v.kind;
        let vendor = v.name;
        for (result, want) in [
            ("applied", 1.0),
            ("duplicate", 1.0),
            ("unknown_person", 1.0),
        ] {
            let series = format!(
                "consentgate_webhook_events_total{{kind=\"{kind}\",result=\"{result}\",vendor=\"{vendor}\"}}"
            );
            assert_eq!(metric(&p, &series).await, want, "{series}");
        }
        let bad = format!(
            "consentgate_webhook_requests_total{{result=\"bad_signature\",vendor=\"{vendor}\"}}"
        );
        assert_eq!(metric(&p, &bad).await, 2.0, "{bad}");
    }
    assert_eq!(
        metric(&p, "consentgate_consent_records").await,
        records_before,
        "unknown people left no record"
    );

    // The audit: one vendor change per vendor, actors vendor:<name>, no addresses.
    eventually("six vendor changes audited", 10, || async {
        audit(&dir)
            .iter()
            .filter(|r| {
                r["kind"] == "consent_change"
                    && r["actor"]
                        .as_str()
                        .is_some_and(|a| a.starts_with("vendor:"))
            })
            .count()
            == 6
    })
    .await;
    let leaks = [
        "+14155550181",
        "+14155550999",
        "sg.patient@example.com",
        "nobody.sg@example.com",
        "mc.patient@example.com",
        "md.patient@example.com",
        "nobody.md@example.com",
    ];
    assert_absent(&audit_bytes(&dir), &leaks, "audit");
    assert_absent(&std::fs::read(&p.log).unwrap(), &leaks, "process log");
    let log = String::from_utf8_lossy(&std::fs::read(&p.log).unwrap()).to_string();
    assert!(
        !log.contains("01KLAVIYOPROFILE") && !log.contains("62515"),
        "vendor ids stay out of logs"
    );
    // The replay cache names no vendor id either.
    let replay = std::fs::read_to_string(dir.join("webhooks/replay.log")).unwrap();
    assert!(!replay.contains("evt-"), "{replay}");
}

#[tokio::test(flavor = "multi_thread")]
async fn stale_timestamps_wrong_methods_and_replays_across_a_restart() {
    let dir = test_dir("loop-webhooks-edges");
    let ca = test_ca(&dir.join("upstream"), VENDOR_HOSTS);
    let up = start_upstream(&ca).await;
    let (kp, public) = sendgrid_key();
    let (mut p, hooks) = start(&dir, &up, &ca, &public);

    // HubSpot: correctly signed, but 10 minutes old → 401.
    let body = json!([{"eventId": 7, "portalId": 62515, "objectId": 901, "subscriptionType": "contact.propertyChange",
        "propertyName": "hs_email_optout", "propertyValue": "true"}])
    .to_string();
    let ts = ((now_s() - 600) * 1000).to_string();
    let sig = hubspot_sig(
        HUBSPOT_SECRET,
        &format!("{BASE}/v1/webhooks/hubspot"),
        body.as_bytes(),
        &ts,
    );
    let (s, _, _) = raw(
        hooks,
        "POST",
        "/v1/webhooks/hubspot",
        &[
            ("x-hubspot-signature-v3", &sig),
            ("x-hubspot-request-timestamp", &ts),
        ],
        body.as_bytes(),
    )
    .await;
    assert_eq!(s, 401);
    assert!(record(&p, "P-WH-HS").await["channels"]
        .get("email")
        .is_none());

    // Other methods and vendors.
    assert_eq!(
        raw(hooks, "GET", "/v1/webhooks/twilio", &[], b"").await.0,
        405
    );
    assert_eq!(
        raw(hooks, "POST", "/v1/webhooks/acme", &[], b"{}").await.0,
        404
    );
    // Mailchimp's URL check (GET) answers with the right token only.
    let ok = format!("/v1/webhooks/mailchimp/{MAILCHIMP_TOKEN}");
    assert_eq!(raw(hooks, "GET", &ok, &[], b"").await.0, 200);
    assert_eq!(
        raw(hooks, "GET", "/v1/webhooks/mailchimp/nope", &[], b"")
            .await
            .0,
        401
    );

    // A SendGrid group unsubscribe of an unmapped group: the most restrictive reading.
    let body = json!([{"email": "sg.patient@example.com", "event": "group_unsubscribe", "asm_group_id": 42,
        "sg_event_id": "sg-group-1", "timestamp": now_s()}])
    .to_string()
    .into_bytes();
    let ts = now_s().to_string();
    let sig = sendgrid_sig(&kp, &ts, &body);
    let headers = [
        ("x-twilio-email-event-webhook-signature", sig.as_str()),
        ("x-twilio-email-event-webhook-timestamp", ts.as_str()),
    ];
    assert_eq!(
        raw(hooks, "POST", "/v1/webhooks/sendgrid", &headers, &body)
            .await
            .0,
        200
    );
    assert_eq!(record(&p, "P-WH-SG").await["channels"]["email"], "denied");
    let (s, _) = admin(
        &p,
        "PATCH",
        "/v1/consent/P-WH-SG",
        r#"{"channels": {"email": null}}"#,
    )
    .await;
    assert_eq!(s, 200);

    // The replay cache survives kill -9: the same event after a restart changes nothing.
    kill_9(&mut p);
    let (p2, hooks2) = start(&dir, &up, &ca, &public);
    let _ = p;
    assert_eq!(
        raw(hooks2, "POST", "/v1/webhooks/sendgrid", &headers, &body)
            .await
            .0,
        200
    );
    assert!(
        record(&p2, "P-WH-SG").await["channels"]
            .get("email")
            .is_none(),
        "not applied twice"
    );
    assert_eq!(
        metric(&p2, r#"consentgate_webhook_events_total{kind="group_unsubscribe",result="duplicate",vendor="sendgrid"}"#).await,
        1.0
    );
}

/// `webhooks.tls` (the `admin.tls` shape) and the `limits:` of every listener.
#[tokio::test(flavor = "multi_thread")]
async fn tls_and_limits_on_the_webhooks_listener() {
    let dir = test_dir("loop-webhooks-tls");
    let ca = test_ca(&dir.join("upstream"), VENDOR_HOSTS);
    let up = start_upstream(&ca).await;
    let rcgen::CertifiedKey { cert, signing_key } =
        rcgen::generate_simple_self_signed(vec!["hooks.example.org".to_string()]).unwrap();
    let cert_pem = write(&dir, "hooks.pem", &cert.pem());
    let key_pem = write(&dir, "hooks-key.pem", &signing_key.serialize_pem());
    let token = write(&dir, "twilio.token", TWILIO_TOKEN);
    let wp = free_port();
    let extra = format!(
        "limits:\n  header_read_timeout: 1s\nwebhooks:\n  public_url: {BASE}\n  state_dir: {}\n  \
         tls: {{cert: {}, key: {}}}\n  twilio: {{secret_file: {}}}\n",
        dir.join("webhooks").display(),
        cert_pem.display(),
        key_pem.display(),
        token.display()
    );
    let opts = ProxyOpts {
        consent_file: Some(snapshot(&dir, &patients())),
        extra_yaml: extra,
        ..Default::default()
    };
    let (pp, ap) = (free_port(), free_port());
    let yaml = config_yaml(&dir, up.addr, &ca, &opts, pp, ap).replacen(
        "listen:\n",
        &format!("listen:\n  webhooks: 127.0.0.1:{wp}\n"),
        1,
    );
    let config = dir.join("consentgate.yaml");
    std::fs::write(&config, yaml).unwrap();
    let p = spawn_proxy(&dir, &config, pp, ap);
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], wp).into();

    // A signed STOP over TLS.
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(cert.pem().as_bytes()).unwrap())
        .resolve("hooks.example.org", addr)
        .build()
        .unwrap();
    let fields = [
        ("From", "+14155550181"),
        ("Body", "STOP"),
        ("MessageSid", "SM-tls-1"),
    ];
    let sig =
        url_and_sorted_fields_sig(TWILIO_TOKEN, &format!("{BASE}/v1/webhooks/twilio"), &fields);
    let resp = client
        .post(format!("https://hooks.example.org:{wp}/v1/webhooks/twilio"))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-twilio-signature", sig)
        .body(form(&fields))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/xml");
    assert_eq!(record(&p, "P-WH-TW").await["channels"]["sms"], "denied");

    // Plain HTTP to the TLS port gets no HTTP answer.
    let plain = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        tokio::net::TcpStream::connect(addr),
    )
    .await
    .unwrap()
    .unwrap();
    let (mut r, mut w) = plain.into_split();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    w.write_all(b"POST /v1/webhooks/twilio HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), r.read_to_end(&mut buf)).await;
    assert!(
        !String::from_utf8_lossy(&buf).starts_with("HTTP/"),
        "{:?}",
        String::from_utf8_lossy(&buf)
    );

    // A head that never completes: 408 within the header timeout (+1 s), over TLS.
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new({
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.der().clone()).unwrap();
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth()
    }));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("hooks.example.org").unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    let t0 = std::time::Instant::now();
    tls.write_all(b"POST /v1/webhooks/twilio HTTP/1.1\r\nHost: hooks.example.org\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ =
        tokio::time::timeout(std::time::Duration::from_secs(5), tls.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(
        t0.elapsed() < std::time::Duration::from_secs(2),
        "{:?}",
        t0.elapsed()
    );
}
