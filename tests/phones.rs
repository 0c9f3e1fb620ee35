//! Issue 17 acceptance: a national-format phone on a record matches an E.164 payload
//! and the reverse (libphonenumber rules in `identify.default_region`), through the
//! real binary: Twilio SMS and Meta events, records from the snapshot and from the
//! admin API (journal replayed on restart), another region, and bad config.

mod common;
use common::*;
use serde_json::json;
use std::path::Path;

const TOKEN: &str = "example-preference-center-token";

fn twilio_sms(to: &str, category: Option<&str>) -> Req {
    let form = form_urlencoded::Serializer::new(String::new())
        .append_pair("To", to)
        .append_pair("From", "+14155559999")
        .append_pair("Body", "Your visit")
        .finish();
    let r = Req::post(
        "api.twilio.com",
        "/2010-04-01/Accounts/AC1/Messages.json",
        form,
    )
    .header("content-type", "application/x-www-form-urlencoded");
    match category {
        Some(c) => r.header("x-consent-category", c),
        None => r,
    }
}

fn meta_event(ph: &str) -> Req {
    let body = json!({"data": [{"event_name": "Lead", "event_time": 1763600000, "event_id": "e1",
        "action_source": "website", "user_data": {"ph": [ph]}}]});
    Req::post("graph.facebook.com", "/v19.0/1/events", body.to_string())
        .header("content-type", "application/json")
}

fn admin_put(id: &str, body: &serde_json::Value) -> Req {
    let mut r = Req::post("admin", &format!("/v1/consent/{id}"), body.to_string());
    r.method = "PUT";
    r.header("authorization", &format!("Bearer {TOKEN}"))
}

/// The shipped example snapshot plus `extra` records.
fn snapshot(dir: &Path, extra: &[serde_json::Value]) -> std::path::PathBuf {
    let mut text = std::fs::read_to_string(repo().join("config/consent.example.jsonl")).unwrap();
    for r in extra {
        text.push_str(&r.to_string());
        text.push('\n');
    }
    let p = dir.join("consent.jsonl");
    std::fs::write(&p, text).unwrap();
    p
}

fn rec(
    id: &str,
    phone: &str,
    categories: serde_json::Value,
    channels: serde_json::Value,
) -> serde_json::Value {
    json!({"patient_id": id, "identifiers": {"phones": [phone]}, "categories": categories,
           "channels": channels, "updated_at": "2026-11-20T10:00:00Z"})
}

fn sha256_hex(v: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(v.as_bytes()))
}

fn form_value(r: &Recorded, key: &str) -> Option<String> {
    form_urlencoded::parse(&r.body)
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
}

fn body(r: &Resp) -> String {
    String::from_utf8_lossy(&r.body).to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn national_records_match_e164_payloads_and_the_reverse() {
    let dir = test_dir("phones-us");
    let ca = test_ca(&dir.join("upstream"), VENDOR_HOSTS);
    let up = start_upstream(&ca).await;
    let consent = snapshot(
        &dir,
        &[
            rec(
                "P-2001",
                "(415) 555-0121",
                json!({"marketing_sms": "granted"}),
                json!({}),
            ),
            // An opt-out of SMS written in national form.
            rec(
                "P-2002",
                "415.555.0122",
                json!({"appointment_reminders": "granted"}),
                json!({"sms": "denied"}),
            ),
        ],
    );
    let p = start_proxy(
        &dir,
        &up,
        &ca,
        ProxyOpts {
            consent_file: Some(consent),
            ..Default::default()
        },
    );

    // Record national, payload E.164: the consented message goes...
    let r = send(p.proxy, twilio_sms("+14155550121", None)).await;
    assert_eq!(r.status, 200, "{}", body(&r));
    assert_eq!(
        form_value(&up.last(), "To").as_deref(),
        Some("+14155550121")
    );
    // ...and the opt-out holds, even for a category granted by default.
    let r = send(
        p.proxy,
        twilio_sms("+1 415 555 0122", Some("appointment_reminders")),
    )
    .await;
    assert_eq!(r.status, 451, "{}", body(&r));
    assert_eq!(
        r.contract()["reasons"],
        json!(["channel_denied"]),
        "{}",
        body(&r)
    );

    // Record E.164 (the example snapshot), payload national.
    // P-1020 +14155550120 granted marketing_sms.
    let before = up.count();
    let r = send(p.proxy, twilio_sms("(415) 555-0120", None)).await;
    assert_eq!(r.status, 200, "{}", body(&r));
    assert_eq!(up.count(), before + 1);
    // P-1006 +14155550106 denied the sms channel.
    let r = send(
        p.proxy,
        twilio_sms("415-555-0106", Some("appointment_reminders")),
    )
    .await;
    assert_eq!(r.status, 451, "{}", body(&r));
    // A number nobody has stays unknown (marketing_sms is denied by default).
    let r = send(p.proxy, twilio_sms("(415) 555-0199", None)).await;
    assert_eq!(r.status, 451);
    assert_eq!(r.contract()["reasons"], json!(["unknown_patient"]));
    // A 7-digit number without its area code is not a phone.
    let before = up.count();
    let r = send(p.proxy, twilio_sms("555-0100", None)).await;
    assert_eq!(r.contract()["error"], "unreadable_body", "{}", body(&r));
    assert_eq!(up.count(), before);

    // Meta: P-1001 (+14155550100, advertising granted) written nationally; Meta gets
    // the hash of the digits with the country code, as its docs require.
    let before = up.count();
    let r = send(p.proxy, meta_event("(415) 555-0100")).await;
    assert_eq!(r.status, 200, "{}", body(&r));
    assert_eq!(up.count(), before + 1);
    let got = up.last().json();
    assert_eq!(
        got["data"][0]["user_data"]["ph"],
        json!([sha256_hex("14155550100")])
    );
    assert_absent(
        &up.last().body,
        &["(415) 555-0100", "4155550100"],
        "meta upstream",
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_api_records_are_stored_in_e164_and_survive_a_restart() {
    let dir = test_dir("phones-admin");
    let ca = test_ca(&dir.join("upstream"), VENDOR_HOSTS);
    let up = start_upstream(&ca).await;
    let opts = || ProxyOpts::default();
    let p = start_proxy(&dir, &up, &ca, opts());
    let r = send(
        p.admin,
        admin_put(
            "P-2003",
            &rec(
                "P-2003",
                "(415) 555-0123",
                json!({"marketing_sms": "granted"}),
                json!({}),
            ),
        ),
    )
    .await;
    assert_eq!(r.status, 200, "{}", body(&r));
    let hashes = r.json()["identifiers"]["phone_sha256"].clone();
    assert_eq!(
        hashes,
        json!([sha256_hex("14155550123"), sha256_hex("+14155550123")]),
        "stored as the E.164 number's hashes"
    );
    let r = send(
        p.admin,
        admin_put(
            "P-2004",
            &rec(
                "P-2004",
                "+14155550124",
                json!({"appointment_reminders": "granted"}),
                json!({"sms": "denied"}),
            ),
        ),
    )
    .await;
    assert_eq!(r.status, 200, "{}", body(&r));
    // A record with something that is no phone is refused, naming the field only.
    let r = send(
        p.admin,
        admin_put("P-2005", &rec("P-2005", "555-0100", json!({}), json!({}))),
    )
    .await;
    assert_eq!(r.status, 400, "{}", body(&r));
    assert!(body(&r).contains("identifiers.phones[0]"), "{}", body(&r));
    assert!(!body(&r).contains("555-0100"), "{}", body(&r));

    let check = |p: Proxy| async move {
        let r = send(p.proxy, twilio_sms("+14155550123", None)).await;
        assert_eq!(r.status, 200, "{}", body(&r));
        let r = send(p.proxy, twilio_sms("415 555 0123", None)).await;
        assert_eq!(r.status, 200, "{}", body(&r));
        let r = send(
            p.proxy,
            twilio_sms("(415) 555-0124", Some("appointment_reminders")),
        )
        .await;
        assert_eq!(r.status, 451, "{}", body(&r));
        p
    };
    let p = check(p).await;
    // Restart on the same journal: the records are replayed and indexed alike.
    let config = p.config.clone();
    drop(p);
    let (pp, ap) = (free_port(), free_port());
    let text = std::fs::read_to_string(&config).unwrap();
    let text = text
        .lines()
        .map(|l| {
            if l.starts_with("  proxy: ") {
                format!("  proxy: 127.0.0.1:{pp}")
            } else if l.starts_with("  admin: ") {
                format!("  admin: 127.0.0.1:{ap}")
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&config, text).unwrap();
    let p = spawn_proxy(&dir, &config, pp, ap);
    check(p).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn another_region_reads_its_own_national_numbers() {
    let dir = test_dir("phones-gb");
    let ca = test_ca(&dir.join("upstream"), VENDOR_HOSTS);
    let up = start_upstream(&ca).await;
    let consent = snapshot(
        &dir,
        &[rec(
            "P-3001",
            "020 7946 0131",
            json!({"marketing_sms": "granted"}),
            json!({}),
        )],
    );
    let p = start_proxy(
        &dir,
        &up,
        &ca,
        ProxyOpts {
            consent_file: Some(consent.clone()),
            extra_yaml: "identify:\n  default_region: gb\n".into(),
            ..Default::default()
        },
    );
    for to in [
        "+44 20 7946 0131",
        "020 7946 0131",
        "+442079460131",
        "0044 20 7946 0131",
    ] {
        let r = send(p.proxy, twilio_sms(to, None)).await;
        assert_eq!(r.status, 200, "{to}: {}", body(&r));
    }
    // US numbers with their country code still match US records.
    let r = send(p.proxy, twilio_sms("+1 (415) 555-0120", None)).await;
    assert_eq!(r.status, 200, "{}", body(&r));
    drop(p);

    // The same snapshot read in the US: a UK national number is not a phone there,
    // and the record is refused naming its line and field.
    let cfg = std::fs::read_to_string(dir.join("consentgate.yaml")).unwrap();
    let us = dir.join("us.yaml");
    std::fs::write(&us, cfg.replace("default_region: gb", "default_region: US")).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_consentgate"))
        .args(["check", "--config"])
        .arg(&us)
        .current_dir(&dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("identifiers.phones[0]: not a phone number"),
        "{err}"
    );
    assert!(!err.contains("7946"), "no phone in the error: {err}");
}

#[test]
fn a_region_without_numbering_data_is_a_config_error() {
    let dir = test_dir("phones-badregion");
    for (value, line_text) in [("ZZ", "ZZ is not a region"), ("USA", "ISO 3166 alpha-2")] {
        let config = dir.join(format!("{value}.yaml"));
        std::fs::write(
            &config,
            format!(
                "admin:\n  tokens_file: {}\nconsent:\n  file: {}\nidentify:\n  default_region: {value}\n",
                repo().join("config/admin-tokens.example").display(),
                repo().join("config/consent.example.jsonl").display()
            ),
        )
        .unwrap();
        for cmd in ["check", "run"] {
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_consentgate"))
                .args([cmd, "--config"])
                .arg(&config)
                .current_dir(&dir)
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{cmd} {value}: {err}");
            assert!(
                err.contains(":6: identify.default_region:") && err.contains(line_text),
                "{cmd} {value}: {err}"
            );
        }
    }
}
