//! Issue 9: every metric name the Grafana dashboard and the PrometheusRule use
//! exists in /metrics of a running instance (those still listed as waiting to
//! land in scripts/k8s_validate.py's PENDING_METRICS aside; k8s-validate fails
//! as soon as one of those exists, so it is then checked here).

mod common;
use common::*;
use std::collections::BTreeSet;
use std::process::Command;

#[tokio::test(flavor = "multi_thread")]
async fn dashboard_and_alert_metrics_exist_in_a_live_scrape() {
    let out = Command::new("python3")
        .arg(repo().join("scripts/k8s-metric-names"))
        .arg("--landed")
        .current_dir(repo())
        .output()
        .expect("python3 runs scripts/k8s-metric-names");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let used: BTreeSet<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect();
    assert!(used.len() >= 10, "{used:?}");

    let dir = test_dir("k8s-metrics");
    let ca = test_ca(&dir.join("upstream"), VENDOR_HOSTS);
    let up = start_upstream(&ca).await;
    let closed = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    // A sync target, so the per-target sync families have series (SPEC §13).
    let key = dir.join("sync.key");
    std::fs::write(&key, "5a".repeat(32)).unwrap();
    let creds = dir.join("sendgrid.key");
    std::fs::write(&creds, "k").unwrap();
    let opts = ProxyOpts {
        resolve_override: vec![("api.hubapi.com", closed)],
        extra_yaml: format!(
            "sync:\n  outbox: {}\n  key_file: {}\n  targets:\n    - {{name: sg, type: sendgrid_global, \
             channels: [email], credentials_file: {}}}\n",
            dir.join("sync-outbox").display(),
            key.display(),
            creds.display()
        ),
        ..Default::default()
    };
    let p = start_proxy(&dir, &up, &ca, opts);
    // Traffic that touches every labelled family: an enforced batch, a drop, an upstream error.
    let batch = r#"{"data":[{"event_name":"Lead","event_time":1763600000,"user_data":{"em":["jane.roe@example.com"]}},
                           {"event_name":"Lead","event_time":1763600000,"user_data":{"em":["deny.me@example.com"]}}]}"#;
    assert_eq!(
        send(
            p.proxy,
            Req::post("graph.facebook.com", "/v19.0/1/events", batch)
        )
        .await
        .status,
        200
    );
    assert_eq!(
        send(
            p.proxy,
            Req::get("api.hubapi.com", "/crm/v3/objects/contacts")
        )
        .await
        .status,
        502
    );
    let scrape = String::from_utf8(admin_get(&p, "/metrics").await.body).unwrap();
    let live: BTreeSet<String> = scrape
        .lines()
        .filter(|l| l.starts_with("consentgate_") || l.starts_with("process_"))
        .map(|l| {
            let name = l.split(['{', ' ']).next().unwrap();
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(name)
                .to_string()
        })
        .collect();
    let missing: Vec<&String> = used.difference(&live).collect();
    assert!(
        missing.is_empty(),
        "used by dashboard/alerts but not exposed: {missing:?}\nlive: {live:?}"
    );
}
