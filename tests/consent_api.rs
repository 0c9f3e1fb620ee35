//! Issue 3 acceptance: the consent store through the running proxy: admin API,
//! durable journal, live snapshot reload.

mod common;
use common::*;
use serde_json::json;
use std::time::{Duration, Instant};

const TOKEN: &str = "example-preference-center-token";

async fn setup(name: &str, consent_file: Option<std::path::PathBuf>) -> (Proxy, Upstream, TestCa) {
    let dir = test_dir(name);
    let ca = test_ca(&dir.join("upstream"), VENDOR_HOSTS);
    let up = start_upstream(&ca).await;
    let p = start_proxy(
        &dir,
        &up,
        &ca,
        ProxyOpts {
            consent_file,
            ..Default::default()
        },
    );
    (p, up, ca)
}

fn admin(method: &'static str, path: &str, token: Option<&str>, body: &str) -> Req {
    let mut r = Req::post("admin", path, body.to_string());
    r.method = method;
    if let Some(t) = token {
        r = r.header("authorization", &format!("Bearer {t}"));
    }
    r
}

fn twilio_sms(to: &str) -> Req {
    let form = form_urlencoded::Serializer::new(String::new())
        .append_pair("To", to)
        .append_pair("From", "+14155559999")
        .append_pair("Body", "Spring wellness offer")
        .finish();
    Req::post(
        "api.twilio.com",
        "/2010-04-01/Accounts/AC1/Messages.json",
        form,
    )
    .header("content-type", "application/x-www-form-urlencoded")
}

#[tokio::test(flavor = "multi_thread")]
async fn put_get_and_the_next_request_is_decided_by_it() {
    let (p, up, _ca) = setup("consent-put", None).await;
    // P-1007 has marketing_sms at its default (denied): blocked.
    assert_eq!(send(p.proxy, twilio_sms("+14155550107")).await.status, 451);
    let rec = json!({"identifiers": {"phones": ["+14155550107"], "emails": ["reminders.only@example.com"]},
        "categories": {"marketing_sms": "granted", "appointment_reminders": "granted"},
        "updated_at": "2026-11-22T10:00:00Z", "source": "test"});
    let r = send(
        p.admin,
        admin("PUT", "/v1/consent/P-1007", Some(TOKEN), &rec.to_string()),
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let stored = r.json();
    assert_eq!(stored["patient_id"], "P-1007");
    let text = String::from_utf8_lossy(&r.body).to_string();
    assert!(
        !text.contains("reminders.only@example.com") && !text.contains("4155550107"),
        "no plaintext in stored record: {text}"
    );
    let g = send(p.admin, admin("GET", "/v1/consent/P-1007", Some(TOKEN), "")).await;
    assert_eq!(g.status, 200);
    assert_eq!(g.json()["categories"]["marketing_sms"], "granted");
    // The very next request through the proxy is decided by it.
    let r = send(p.proxy, twilio_sms("+14155550107")).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(up.count(), 1);
    // PATCH merges; DELETE removes; GET of an unknown id is 404.
    let r = send(
        p.admin,
        admin(
            "PATCH",
            "/v1/consent/P-1007",
            Some(TOKEN),
            r#"{"categories":{"marketing_sms":"denied"},"updated_at":"2026-11-22T11:00:00Z"}"#,
        ),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["categories"]["appointment_reminders"], "granted");
    assert_eq!(send(p.proxy, twilio_sms("+14155550107")).await.status, 451);
    assert_eq!(
        send(
            p.admin,
            admin("DELETE", "/v1/consent/P-1007", Some(TOKEN), "")
        )
        .await
        .status,
        200
    );
    assert_eq!(
        send(p.admin, admin("GET", "/v1/consent/P-1007", Some(TOKEN), ""))
            .await
            .status,
        404
    );
    let r = send(p.proxy, twilio_sms("+14155550107")).await;
    assert_eq!(r.status, 451);
    assert_eq!(r.contract()["reasons"], json!(["unknown_patient"]));
}

#[tokio::test(flavor = "multi_thread")]
async fn auth_and_bad_json_write_nothing() {
    let (p, _up, _ca) = setup("consent-auth", None).await;
    let good = r#"{"categories":{"advertising":"granted"},"updated_at":"2026-11-22T10:00:00Z"}"#;
    let r = send(p.admin, admin("PUT", "/v1/consent/P-9001", None, good)).await;
    assert_eq!(r.status, 401);
    let r = send(
        p.admin,
        admin("PUT", "/v1/consent/P-9001", Some("wrong-token"), good),
    )
    .await;
    assert_eq!(r.status, 403);
    let r = send(p.admin, admin("GET", "/v1/consent/P-9001", Some(TOKEN), "")).await;
    assert_eq!(r.status, 404, "nothing was written");
    let journal = p.dir.join("journal");
    let journaled: String = std::fs::read_dir(&journal)
        .map(|d| {
            d.flatten()
                .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
                .collect()
        })
        .unwrap_or_default();
    assert!(!journaled.contains("P-9001"), "journal untouched");
    let r = send(
        p.admin,
        admin(
            "PUT",
            "/v1/consent/P-9001",
            Some(TOKEN),
            r#"{"categories":{"advertising":"perhaps"},"updated_at":"2026-11-22T10:00:00Z"}"#,
        ),
    )
    .await;
    assert_eq!(r.status, 400);
    assert!(
        r.json()["field"]
            .as_str()
            .unwrap_or("")
            .contains("categories"),
        "{:?}",
        r.json()
    );
    let r = send(
        p.admin,
        admin(
            "PUT",
            "/v1/consent/P-9001",
            Some(TOKEN),
            r#"{"colour":"blue","updated_at":"2026-11-22T10:00:00Z"}"#,
        ),
    )
    .await;
    assert_eq!(r.status, 400);
    assert!(String::from_utf8_lossy(&r.body).contains("colour"));
    let r = send(
        p.admin,
        admin("PUT", "/v1/consent/P-9001", Some(TOKEN), "{not json"),
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(
        send(p.admin, admin("GET", "/v1/consent/P-9001", Some(TOKEN), ""))
            .await
            .status,
        404
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_after_put_keeps_the_record() {
    let (mut p, up, ca) = setup("consent-kill9", None).await;
    let rec = r#"{"identifiers":{"emails":["durable.patient@example.com"]},"categories":{"advertising":"granted"},"updated_at":"2026-11-22T10:00:00Z"}"#;
    let r = send(
        p.admin,
        admin("PUT", "/v1/consent/P-7777", Some(TOKEN), rec),
    )
    .await;
    assert_eq!(r.status, 200);
    let pid = p.child.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-9", &pid])
        .status()
        .unwrap()
        .success());
    let _ = p.child.wait();
    // Restart on the same directory and config.
    let (pp, ap) = (free_port(), free_port());
    let config = std::fs::read_to_string(&p.config)
        .unwrap()
        .replace(
            &format!("proxy: {}", p.proxy),
            &format!("proxy: 127.0.0.1:{pp}"),
        )
        .replace(
            &format!("admin: {}", p.admin),
            &format!("admin: 127.0.0.1:{ap}"),
        );
    std::fs::write(&p.config, config).unwrap();
    let p2 = spawn_proxy(&p.dir, &p.config, pp, ap);
    let g = send(
        p2.admin,
        admin("GET", "/v1/consent/P-7777", Some(TOKEN), ""),
    )
    .await;
    assert_eq!(g.status, 200, "the acknowledged write survived kill -9");
    let ev = r#"{"data":[{"event_name":"Lead","event_time":1763600000,"user_data":{"em":["durable.patient@example.com"]}}]}"#;
    let r = send(
        p2.proxy,
        Req::post("graph.facebook.com", "/v19.0/1/events", ev),
    )
    .await;
    assert_eq!(r.status, 200, "enforced from the replayed journal");
    assert_eq!(up.count(), 1);
    let _ = ca;
}

#[tokio::test(flavor = "multi_thread")]
async fn editing_the_snapshot_changes_decisions_and_a_corrupt_line_keeps_the_old_data() {
    let dir = test_dir("consent-snapshot");
    let snap = dir.join("consent.jsonl");
    let original = std::fs::read_to_string(repo().join("config/consent.example.jsonl")).unwrap();
    std::fs::write(&snap, &original).unwrap();
    let ca = test_ca(&dir.join("upstream"), VENDOR_HOSTS);
    let up = start_upstream(&ca).await;
    let p = start_proxy(
        &dir,
        &up,
        &ca,
        ProxyOpts {
            consent_file: Some(snap.clone()),
            ..Default::default()
        },
    );
    let ev = r#"{"data":[{"event_name":"Lead","event_time":1763600000,"user_data":{"em":["jane.roe@example.com"]}}]}"#;
    let meta = || Req::post("graph.facebook.com", "/v19.0/1/events", ev);
    assert_eq!(send(p.proxy, meta()).await.status, 200);
    // P-1001 now denies advertising.
    let edited = original.replacen(r#""advertising":"granted""#, r#""advertising":"denied""#, 1);
    assert!(edited.starts_with(r#"{"patient_id":"P-1001""#));
    let tmp = dir.join("consent.jsonl.tmp");
    std::fs::write(&tmp, &edited).unwrap();
    std::fs::rename(&tmp, &snap).unwrap();
    let t = Instant::now();
    loop {
        if send(p.proxy, meta()).await.status == 451 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "snapshot edit not applied within 2 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A corrupt line: old data stays, the line number is logged.
    let mut lines: Vec<&str> = edited.lines().collect();
    lines[4] = r#"{"patient_id":"P-1005","categories":{"advertising":"sometimes"},"updated_at":"2026-11-20T10:00:00Z"}"#;
    std::fs::write(&snap, lines.join("\n") + "\n").unwrap();
    let t = Instant::now();
    loop {
        let log = std::fs::read_to_string(&p.log).unwrap();
        if log.contains("line 5") {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "corrupt line not reported: {log}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        send(p.proxy, meta()).await.status,
        451,
        "previous data still in force"
    );
    let gpc = r#"{"data":[{"event_name":"Lead","event_time":1763600000,"user_data":{"em":["gpc.user@example.com"]}}]}"#;
    let r = send(
        p.proxy,
        Req::post("graph.facebook.com", "/v19.0/1/events", gpc),
    )
    .await;
    assert_eq!(r.status, 200, "P-1005 still known with its old record");
    assert_eq!(
        up.last().json()["data"][0]["data_processing_options"],
        json!(["LDU"])
    );
}

fn propagation_count(metrics: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("consentgate_consent_propagation_seconds_count "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no propagation count in:\n{metrics}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn editing_the_snapshot_feeds_the_propagation_histogram() {
    let dir = test_dir("consent-propagation");
    let snap = dir.join("consent.jsonl");
    let original = std::fs::read_to_string(repo().join("config/consent.example.jsonl")).unwrap();
    std::fs::write(&snap, &original).unwrap();
    let ca = test_ca(&dir.join("upstream"), VENDOR_HOSTS);
    let up = start_upstream(&ca).await;
    let p = start_proxy(
        &dir,
        &up,
        &ca,
        ProxyOpts {
            consent_file: Some(snap.clone()),
            ..Default::default()
        },
    );
    let pr = &p;
    let metrics =
        || async move { String::from_utf8(admin_get(pr, "/metrics").await.body).unwrap() };
    let before = propagation_count(&metrics().await);
    assert_eq!(before, 0, "the initial load is not a propagation");
    let edited = original.replacen(r#""advertising":"granted""#, r#""advertising":"denied""#, 1);
    assert_ne!(edited, original);
    let tmp = dir.join("consent.jsonl.tmp");
    std::fs::write(&tmp, &edited).unwrap();
    std::fs::rename(&tmp, &snap).unwrap();
    let t = Instant::now();
    loop {
        let m = metrics().await;
        if propagation_count(&m) > before {
            let sum: f64 = m
                .lines()
                .find_map(|l| l.strip_prefix("consentgate_consent_propagation_seconds_sum "))
                .and_then(|v| v.trim().parse().ok())
                .unwrap();
            assert!((0.0..10.0).contains(&sum), "{sum}");
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "snapshot edit not observed within 3 s:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
