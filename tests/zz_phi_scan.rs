//! No fixture email, phone, name or raw patient id appears in any log line or
//! audit record the suite produced (every spawned proxy logs into one directory). Named `zz_` so
//! `cargo test` runs it after the other integration binaries; it also makes its
//! own mixed traffic first, so it never scans nothing.

mod common;
use common::*;

fn fixture_identifiers() -> Vec<String> {
    let text = std::fs::read_to_string(repo().join("config/consent.example.jsonl")).unwrap();
    let mut out = vec![
        "unknown.person@example.com".to_string(),
        "15555550199".to_string(),
        "Jane Roe".into(),
    ];
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        out.push(v["patient_id"].as_str().unwrap().to_string());
        for e in v["identifiers"]["emails"].as_array().unwrap() {
            out.push(e.as_str().unwrap().to_lowercase());
        }
        for p in v["identifiers"]["phones"].as_array().unwrap() {
            let digits: String = p
                .as_str()
                .unwrap()
                .chars()
                .filter(|c| c.is_ascii_digit())
                .collect();
            out.push(digits);
        }
        for x in v["identifiers"]["external_ids"].as_array().unwrap() {
            out.push(x.as_str().unwrap().to_string());
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn no_phi_in_any_log() {
    let dir = test_dir("phi-scan");
    let ca = test_ca(&dir.join("upstream"), VENDOR_HOSTS);
    let up = start_upstream(&ca).await;
    let p = start_proxy(&dir, &up, &ca, ProxyOpts::default());
    let batch = r#"{"data":[{"event_name":"Lead","event_time":1763600000,"user_data":{"em":["jane.roe@example.com"],"ph":["+14155550100"],"fn":["Jane"],"ln":["Roe"]}},
        {"event_name":"Lead","event_time":1763600000,"user_data":{"em":["deny.me@example.com"]}},
        {"event_name":"Lead","event_time":1763600000,"user_data":{"em":["unknown.person@example.com"]}}]}"#;
    send(
        p.proxy,
        Req::post("graph.facebook.com", "/v19.0/1/events", batch).header("X-Patient-Id", "P-1001"),
    )
    .await;
    send(
        p.proxy,
        Req::post(
            "graph.facebook.com",
            "/v19.0/1/events",
            "{bad json jane.roe@example.com",
        ),
    )
    .await;
    let tok = "Bearer example-ops-token";
    let mut put = Req::post(
        "admin",
        "/v1/consent/P-1002",
        r#"{"identifiers":{"emails":["deny.me@example.com"]},"updated_at":"2026-11-22T10:00:00Z"}"#,
    )
    .header("authorization", tok);
    put.method = "PUT";
    send(p.admin, put).await;
    let mut bad = Req::post(
        "admin",
        "/v1/consent/P-1003",
        r#"{"identifiers":{"emails":["opt.out@example.com"]},"colour":"x"}"#,
    )
    .header("authorization", tok);
    bad.method = "PUT";
    send(p.admin, bad).await;
    drop(p);

    let ids = fixture_identifiers();
    let mut scanned = 0;
    for entry in std::fs::read_dir(log_dir()).unwrap().flatten() {
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        scanned += text.lines().count();
        let lower = text.to_lowercase();
        for id in &ids {
            assert!(
                !lower.contains(&id.to_lowercase()),
                "{} contains fixture identifier {id:?}",
                entry.path().display()
            );
        }
    }
    assert!(scanned > 5, "scanned {scanned} log lines");

    // Every audit file any test's proxy wrote.
    let mut audit_lines = 0;
    let it = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("it");
    for test_dir in std::fs::read_dir(&it).unwrap().flatten() {
        let Ok(files) = std::fs::read_dir(test_dir.path().join("audit")) else {
            continue;
        };
        for f in files.flatten() {
            let text = std::fs::read_to_string(f.path())
                .unwrap_or_default()
                .to_lowercase();
            audit_lines += text.lines().count();
            for id in &ids {
                assert!(
                    !text.contains(&id.to_lowercase()),
                    "{} contains fixture identifier {id:?}",
                    f.path().display()
                );
            }
        }
    }
    assert!(audit_lines > 5, "scanned {audit_lines} audit lines");
}
