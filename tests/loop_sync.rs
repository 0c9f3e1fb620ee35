//! Pushing opt-outs to vendors (SPEC §13) with the real binary and the
//! recording upstream playing each vendor. For every target: a denial reaches
//! the suppression endpoint with the right method, path, body and auth; 503 and
//! 429 (Retry-After) answers are retried; kill -9 during a delivery, restart:
//! delivered, and the outbox is empty; the outbox files never hold a plaintext
//! address. Then the same on PostgreSQL with two instances: each entry once.

mod common;
mod loop_support;

use base64::Engine as _;
use common::*;
use loop_support::*;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// What each target must send.
struct Expect {
    host: &'static str,
    method: &'static str,
    path: fn(email: &str) -> String,
    auth: fn(key: &str) -> String,
    body: fn(email: &str) -> Value,
}

fn md5_hex(s: &str) -> String {
    use md5::Digest as _;
    hex::encode(md5::Md5::digest(s.as_bytes()))
}

/// (target YAML without credentials_file, expectations).
fn target(kind: &str) -> (String, Expect) {
    let bearer: fn(&str) -> String = |k| format!("Bearer {k}");
    let sg_body: fn(&str) -> Value = |e| json!({"recipient_emails": [e]});
    match kind {
        "sendgrid_global" => (
            "{name: sg-global, type: sendgrid_global, channels: [email]".into(),
            Expect {
                host: "api.sendgrid.com",
                method: "POST",
                path: |_| "/v3/asm/suppressions/global".into(),
                auth: bearer,
                body: sg_body,
            },
        ),
        "sendgrid_group" => (
            "{name: sg-group, type: sendgrid_group, group_id: \"123\", categories: [patient_surveys]".into(),
            Expect {
                host: "api.sendgrid.com",
                method: "POST",
                path: |_| "/v3/asm/groups/123/suppressions".into(),
                auth: bearer,
                body: sg_body,
            },
        ),
        "mailchimp" => (
            "{name: mailchimp, type: mailchimp, host: us21.api.mailchimp.com, list_id: L1, categories: [marketing_email]".into(),
            Expect {
                host: "us21.api.mailchimp.com",
                method: "PATCH",
                path: |e| format!("/3.0/lists/L1/members/{}", md5_hex(e)),
                auth: |k| {
                    format!(
                        "Basic {}",
                        base64::engine::general_purpose::STANDARD.encode(format!("consentgate:{k}"))
                    )
                },
                body: |_| json!({"status": "unsubscribed"}),
            },
        ),
        "klaviyo" => (
            "{name: klaviyo, type: klaviyo, categories: [marketing_email]".into(),
            Expect {
                host: "a.klaviyo.com",
                method: "POST",
                path: |_| "/api/profile-suppression-bulk-create-jobs".into(),
                auth: |k| format!("Klaviyo-API-Key {k}"),
                body: |e| {
                    json!({"data": {"type": "profile-suppression-bulk-create-job", "attributes":
                        {"profiles": {"data": [{"type": "profile", "attributes": {"email": e}}]}}}})
                },
            },
        ),
        "braze" => (
            "{name: braze, type: braze, host: rest.iad-01.braze.com, group_id: sub-grp-1, categories: [marketing_sms]".into(),
            Expect {
                host: "rest.iad-01.braze.com",
                method: "POST",
                path: |_| "/subscription/status/set".into(),
                auth: bearer,
                // Braze users are named by their external id: no plaintext needed.
                body: |_| {
                    json!({"subscription_group_id": "sub-grp-1", "subscription_state": "unsubscribed",
                        "external_id": ["braze-user-77"]})
                },
            },
        ),
        "hubspot" => (
            "{name: hubspot, type: hubspot, group_id: \"7\", categories: [marketing_email]".into(),
            Expect {
                host: "api.hubapi.com",
                method: "POST",
                path: |_| "/communication-preferences/v3/unsubscribe".into(),
                auth: bearer,
                body: |e| json!({"emailAddress": e, "subscriptionId": "7"}),
            },
        ),
        _ => unreachable!(),
    }
}

const KEY: &str = "vendor-api-key-0123";

/// The config for one target on the file outbox (or `consent` given).
fn config(
    dir: &Path,
    up: &Upstream,
    ca: &TestCa,
    target_yaml: &str,
    consent: Option<String>,
) -> (String, PathBuf) {
    config_with(dir, up, ca, target_yaml, consent, "")
}

/// `config` with extra `sync:` keys (two-space indented lines).
fn config_with(
    dir: &Path,
    up: &Upstream,
    ca: &TestCa,
    target_yaml: &str,
    consent: Option<String>,
    sync_extra: &str,
) -> (String, PathBuf) {
    let creds = write(dir, "vendor.key", KEY);
    let key = write_key(dir, "sync.key", 0x5a);
    let extra = format!(
        concat!(
            "sync:\n  outbox: {outbox}\n  key_file: {key}\n  retry_initial: 200ms\n  retry_max: 2s\n",
            "{sync_extra}",
            "  targets:\n    - {target}, credentials_file: {creds}}}\n",
        ),
        sync_extra = sync_extra,
        outbox = dir.join("sync-outbox").display(),
        key = key.display(),
        target = target_yaml,
        creds = creds.display(),
    );
    let opts = ProxyOpts {
        consent_file: Some(snapshot(dir, &[])),
        consent_yaml: consent,
        extra_yaml: extra,
        ..Default::default()
    };
    let yaml = config_yaml(dir, up.addr, ca, &opts, 0, 0)
        .replacen("  proxy: 127.0.0.1:0\n", "  proxy: 127.0.0.1:{PP}\n", 1)
        .replacen("  admin: 127.0.0.1:0\n", "  admin: 127.0.0.1:{AP}\n", 1);
    (yaml, dir.join("consentgate.yaml"))
}

/// A PUT denying every category and channel a test target carries, with a
/// plaintext email (hashed in the store, sealed in the outbox) and a Braze id.
fn denial(email: &str) -> String {
    json!({"identifiers": {"emails": [email], "external_ids": ["braze:braze-user-77"]},
        "categories": {"marketing_email": "denied", "patient_surveys": "denied", "marketing_sms": "denied"},
        "channels": {"email": "denied"}})
    .to_string()
}

fn check_request(r: &Recorded, e: &Expect, email: &str, what: &str) {
    assert_eq!(r.method, e.method, "{what}");
    assert_eq!(r.path_and_query, (e.path)(email), "{what}");
    assert_eq!(
        r.sni.as_deref(),
        Some(e.host),
        "{what}: through upstream.resolve, by SNI"
    );
    assert_eq!(
        r.header("authorization"),
        Some((e.auth)(KEY).as_str()),
        "{what}"
    );
    assert_eq!(r.json(), (e.body)(email), "{what}");
}

/// Every byte of the outbox directory.
fn outbox_bytes(dir: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir.join("sync-outbox"))
        .unwrap()
        .flatten()
    {
        if e.path().is_file() {
            out.extend(std::fs::read(e.path()).unwrap());
        }
    }
    out
}

async fn wait_count(up: &Upstream, n: usize, secs: u64) {
    let u = up.clone();
    eventually(&format!("{n} requests upstream"), secs, move || {
        let u = u.clone();
        async move { u.count() >= n }
    })
    .await;
}

async fn one_target(kind: &str) {
    let dir = test_dir(&format!("loop-sync-{kind}"));
    let ca = test_ca(&dir.join("upstream"), VENDOR_HOSTS);
    let up = start_upstream(&ca).await;
    let (yaml, config) = config(&dir, &up, &ca, &target(kind).0, None);
    let e = target(kind).1;
    let mut p = start_with(&dir, &yaml);

    // 1. A denial: 503, then 429 with Retry-After, then accepted.
    up.push(503, r#"{"errors":[{"message":"unavailable"}]}"#, &[]);
    up.push(
        429,
        r#"{"errors":[{"message":"too many"}]}"#,
        &[("retry-after", "1")],
    );
    let first = "first.patient@example.com";
    let (s, v) = admin(&p, "PUT", "/v1/consent/P-SYNC-1", &denial(first)).await;
    assert_eq!(s, 200, "{v}");
    wait_count(&up, 2, 10).await;
    let after_429 = Instant::now();
    wait_count(&up, 3, 15).await;
    assert!(
        after_429.elapsed() >= Duration::from_millis(900),
        "{kind}: Retry-After: 1 honoured ({:?})",
        after_429.elapsed()
    );
    let reqs = up.requests();
    for (i, r) in reqs.iter().enumerate() {
        check_request(r, &e, first, &format!("{kind} attempt {i}"));
    }
    let delivered = format!(
        "consentgate_sync_deliveries_total{{result=\"delivered\",target=\"{}\"}}",
        target_name(kind)
    );
    let pp = &p;
    eventually("delivered counted", 10, || async {
        metric(pp, &delivered).await == 1.0
    })
    .await;
    let retried = format!(
        "consentgate_sync_deliveries_total{{result=\"retry\",target=\"{}\"}}",
        target_name(kind)
    );
    assert_eq!(metric(&p, &retried).await, 2.0);
    eventually("the sync audit", 10, || async {
        let results: Vec<String> = audit(&dir)
            .iter()
            .filter(|r| r["kind"] == "sync")
            .map(|r| r["decision"].as_str().unwrap_or("").to_string())
            .collect();
        results == ["retry", "retry", "delivered"]
    })
    .await;
    assert_eq!(
        std::fs::read(dir.join("sync-outbox/outbox.log")).unwrap(),
        b"",
        "{kind}: delivered entries leave the file"
    );

    // 2. kill -9 while a delivery hangs; restart: delivered, outbox empty.
    up.set(Behavior::Hang);
    let second = "second.patient@example.com";
    let (s, _) = admin(&p, "PUT", "/v1/consent/P-SYNC-2", &denial(second)).await;
    assert_eq!(s, 200);
    wait_count(&up, 4, 10).await;
    check_request(&up.last(), &e, second, &format!("{kind} hanging attempt"));
    // Pending and sealed: the outbox holds no address, no patient id.
    let pending = outbox_bytes(&dir);
    assert!(!pending.is_empty());
    assert_absent(&pending, &[first, second], "outbox");
    assert!(
        !String::from_utf8_lossy(&pending).contains("P-SYNC"),
        "no patient id in the outbox"
    );
    let (ok, out, err) = cli(&dir, &config, &["sync", "status"]);
    assert!(ok, "{err}");
    let status: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["pending"], 1, "{status}");
    kill_9(&mut p);
    up.set(Behavior::Respond {
        status: 200,
        body: r#"{"ok":true}"#,
    });
    let p = start_with(&dir, &yaml);
    wait_count(&up, 5, 15).await;
    check_request(&up.last(), &e, second, &format!("{kind} after restart"));
    eventually("the outbox is empty", 10, || async {
        std::fs::read(dir.join("sync-outbox/outbox.log"))
            .unwrap()
            .is_empty()
    })
    .await;
    let (ok, out, _) = cli(&dir, &config, &["sync", "status"]);
    assert!(ok);
    let status: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["pending"], 0, "{status}");
    let gauge = format!(
        "consentgate_sync_pending{{target=\"{}\"}}",
        target_name(kind)
    );
    let pp = &p;
    eventually("the pending gauge at 0", 10, || async {
        metric(pp, &gauge).await == 0.0
    })
    .await;
    // A restart queues nothing again (the ledger): no sixth request.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        up.count(),
        5,
        "{kind}: nothing delivered twice after the restart"
    );
    assert_absent(&outbox_bytes(&dir), &[first, second], "outbox");
    assert_absent(&audit_bytes(&dir), &[first, second], "audit");
    let journal: Vec<u8> = std::fs::read_dir(dir.join("journal"))
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_file())
        .flat_map(|e| std::fs::read(e.path()).unwrap())
        .collect();
    assert!(
        !String::from_utf8_lossy(&journal).contains(first),
        "journal holds no plaintext"
    );
    assert_absent(
        &std::fs::read(&p.log).unwrap(),
        &[first, second],
        "process log",
    );
}

fn target_name(kind: &str) -> &'static str {
    match kind {
        "sendgrid_global" => "sg-global",
        "sendgrid_group" => "sg-group",
        "mailchimp" => "mailchimp",
        "klaviyo" => "klaviyo",
        "braze" => "braze",
        _ => "hubspot",
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sendgrid_global() {
    one_target("sendgrid_global").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sendgrid_group() {
    one_target("sendgrid_group").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn mailchimp() {
    one_target("mailchimp").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn klaviyo() {
    one_target("klaviyo").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn braze() {
    one_target("braze").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn hubspot() {
    one_target("hubspot").await;
}

/// A denial without an address the target accepts is counted, not queued; a
/// re-grant before delivery drops the entry as superseded.
#[tokio::test(flavor = "multi_thread")]
async fn no_address_and_superseded() {
    let dir = test_dir("loop-sync-edges");
    let ca = test_ca(&dir.join("upstream"), VENDOR_HOSTS);
    let up = start_upstream(&ca).await;
    let (yaml, _) = config(&dir, &up, &ca, &target("sendgrid_global").0, None);
    let p = start_with(&dir, &yaml);
    // No email in the write: SendGrid cannot be told.
    let body = json!({"channels": {"email": "denied"}}).to_string();
    assert_eq!(admin(&p, "PUT", "/v1/consent/P-NOADDR", &body).await.0, 200);
    let series = r#"consentgate_sync_deliveries_total{result="no_address",target="sg-global"}"#;
    let pp = &p;
    eventually("no_address counted", 10, || async {
        metric(pp, series).await == 1.0
    })
    .await;
    // Denied, then granted again while the vendor is down: nothing is pushed.
    up.push(503, "{}", &[]);
    assert_eq!(
        admin(
            &p,
            "PUT",
            "/v1/consent/P-REGRANT",
            &denial("regrant@example.com")
        )
        .await
        .0,
        200
    );
    wait_count(&up, 1, 10).await;
    let regrant = json!({"channels": {"email": null}}).to_string();
    assert_eq!(
        admin(&p, "PATCH", "/v1/consent/P-REGRANT", &regrant)
            .await
            .0,
        200
    );
    let series = r#"consentgate_sync_deliveries_total{result="superseded",target="sg-global"}"#;
    eventually("superseded counted", 10, || async {
        metric(pp, series).await == 1.0
    })
    .await;
    assert_eq!(up.count(), 1);
}

/// Past `sync.max_age` an entry is parked: counted, audited, still in the lag
/// (so the alerts fire), and retried every `parked_retry` until it goes through.
#[tokio::test(flavor = "multi_thread")]
async fn parked_past_max_age_then_delivered() {
    let dir = test_dir("loop-sync-parked");
    let ca = test_ca(&dir.join("upstream"), VENDOR_HOSTS);
    let up = start_upstream(&ca).await;
    up.set(Behavior::Respond {
        status: 503,
        body: "{}",
    });
    let (yaml, _) = config_with(
        &dir,
        &up,
        &ca,
        &target("sendgrid_global").0,
        None,
        "  max_age: 1s\n  parked_retry: 2s\n",
    );
    let p = start_with(&dir, &yaml);
    assert_eq!(
        admin(
            &p,
            "PUT",
            "/v1/consent/P-PARK",
            &denial("park.me@example.com")
        )
        .await
        .0,
        200
    );
    let pp = &p;
    let parked = r#"consentgate_sync_deliveries_total{result="parked",target="sg-global"}"#;
    eventually("parked", 15, || async { metric(pp, parked).await == 1.0 }).await;
    eventually("the parked gauge", 5, || async {
        metric(pp, r#"consentgate_sync_parked{target="sg-global"}"#).await == 1.0
    })
    .await;
    assert!(metric(&p, r#"consentgate_sync_lag_seconds{target="sg-global"}"#).await >= 1.0);
    eventually("parked audited", 10, || async {
        audit(&dir)
            .iter()
            .any(|r| r["kind"] == "sync" && r["decision"] == "parked")
    })
    .await;
    // The vendor is back: the parked entry goes through on its next try.
    up.set(Behavior::Respond {
        status: 201,
        body: "{}",
    });
    let delivered = r#"consentgate_sync_deliveries_total{result="delivered",target="sg-global"}"#;
    eventually("delivered after parking", 15, || async {
        metric(pp, delivered).await == 1.0
    })
    .await;
    eventually("lag back to 0", 5, || async {
        metric(pp, r#"consentgate_sync_lag_seconds{target="sg-global"}"#).await == 0.0
    })
    .await;
    assert_eq!(metric(&p, parked).await, 1.0, "parked counted once");
}

/// Two instances on one PostgreSQL: each entry delivered once, whoever sees the
/// change; a delivery cut by kill -9 is finished by the other instance.
#[tokio::test(flavor = "multi_thread")]
async fn postgres_two_instances_deliver_each_entry_once() {
    let db = Db::new("sync");
    let ca_dir = test_dir("loop-sync-pg-ca");
    let ca = test_ca(&ca_dir.join("upstream"), VENDOR_HOSTS);
    let up = start_upstream(&ca).await;
    let pg = |app: &str| {
        Some(format!(
            "consent:\n  source: postgres\n  max_staleness: 5m\n  postgres:\n    url: \"{}\"\n",
            db.url(app)
        ))
    };
    let (dir_a, dir_b) = (test_dir("loop-sync-pg-a"), test_dir("loop-sync-pg-b"));
    let (yaml_a, config_a) = config(&dir_a, &up, &ca, &target("sendgrid_global").0, pg("cg-a"));
    let (yaml_b, _) = config(&dir_b, &up, &ca, &target("sendgrid_global").0, pg("cg-b"));
    // Both instances share the sync key (entries sealed by one open on the other).
    std::fs::copy(dir_a.join("sync.key"), dir_b.join("sync.key")).unwrap();
    // Ports do not matter to `db migrate`.
    std::fs::write(&config_a, yaml_a.replace("{PP}", "1").replace("{AP}", "2")).unwrap();
    let (ok, _, err) = cli(&dir_a, &config_a, &["db", "migrate"]);
    assert!(ok, "{err}");
    let a = start_with(&dir_a, &yaml_a);
    let mut b = start_with(&dir_b, &yaml_b);

    // Ten denials, written half through each instance; both see all of them.
    // The vendor's first two answers are a 503 and a 429: retried on PostgreSQL too.
    up.push(503, r#"{"errors":[{"message":"unavailable"}]}"#, &[]);
    up.push(
        429,
        r#"{"errors":[{"message":"too many"}]}"#,
        &[("retry-after", "1")],
    );
    let emails: Vec<String> = (0..10)
        .map(|i| format!("pg.patient.{i}@example.com"))
        .collect();
    for (i, e) in emails.iter().enumerate() {
        let via = if i % 2 == 0 { &a } else { &b };
        let (s, v) = admin(via, "PUT", &format!("/v1/consent/P-PG-{i}"), &denial(e)).await;
        assert_eq!(s, 200, "{v}");
    }
    wait_count(&up, 12, 30).await;
    // Both feeds have long seen every change: still twelve (ten, two of them
    // after a retry).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut got: Vec<String> = up
        .requests()
        .iter()
        .map(|r| {
            r.json()["recipient_emails"][0]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(got.len(), 12, "{got:?}");
    got.sort();
    got.dedup();
    let mut want = emails.clone();
    want.sort();
    assert_eq!(got, want, "every entry reached the vendor");
    let sum = |result: &'static str| {
        let series = format!(
            "consentgate_sync_deliveries_total{{result=\"{result}\",target=\"sg-global\"}}"
        );
        let (a, b) = (&a, &b);
        async move { metric(a, &series).await + metric(b, &series).await }
    };
    assert_eq!(sum("delivered").await, 10.0, "each entry delivered once");
    assert_eq!(sum("retry").await, 2.0, "the 503 and the 429 retried");
    let c = db.client().await;
    let left: i64 = c
        .query_one("SELECT count(*) FROM consentgate_sync_outbox", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0);

    // kill -9 of whichever instance holds a hanging delivery: the other finishes it.
    up.clear();
    up.set(Behavior::Hang);
    let (s, _) = admin(
        &a,
        "PUT",
        "/v1/consent/P-PG-X",
        &denial("pg.crash@example.com"),
    )
    .await;
    assert_eq!(s, 200);
    wait_count(&up, 1, 10).await;
    let rows = c
        .query("SELECT sealed::text FROM consentgate_sync_outbox", &[])
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    let sealed: String = rows[0].get(0);
    assert_absent(sealed.as_bytes(), &["pg.crash@example.com"], "outbox row");
    // Which one holds it: the row lock's backend is one of the two application names.
    let holder: Option<String> = c
        .query_opt(
            "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
             JOIN pg_class t ON t.oid = l.relation \
             WHERE t.relname = 'consentgate_sync_outbox' AND l.mode = 'RowShareLock' LIMIT 1",
            &[],
        )
        .await
        .unwrap()
        .map(|r| r.get(0));
    up.set(Behavior::Respond {
        status: 202,
        body: "{}",
    });
    let survivor = match holder.as_deref() {
        Some("cg-b") => {
            kill_9(&mut b);
            a
        }
        _ => {
            let mut a = a;
            kill_9(&mut a);
            b
        }
    };
    wait_count(&up, 2, 20).await;
    eventually("the row is gone", 15, || async {
        let n: i64 = c
            .query_one("SELECT count(*) FROM consentgate_sync_outbox", &[])
            .await
            .unwrap()
            .get(0);
        n == 0
    })
    .await;
    let (ok, out, err) = cli(&dir_a, &config_a, &["sync", "status"]);
    assert!(ok, "{err}");
    let status: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (status["outbox"].as_str(), status["pending"].as_i64()),
        (Some("postgres"), Some(0)),
        "{status}"
    );
    drop(survivor);
}
