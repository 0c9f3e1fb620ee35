//! Issue 7 acceptance: `consent.source: postgres` against the real PostgreSQL
//! on 127.0.0.1:5432 (database `test`), through the real binary. Every test
//! has a schema of its own (search_path set in the URL), dropped at the end.

mod common;
use common::*;
use serde_json::json;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_postgres::NoTls;

const TOKEN: &str = "example-preference-center-token";
const PG: &str = "127.0.0.1:5432";

/// A schema of the test's own; dropped on drop.
struct Db {
    schema: String,
}

impl Db {
    fn new(tag: &str) -> Db {
        let schema = format!(
            "cgt_{tag}_{}_{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos()
        );
        sql_blocking(&format!("CREATE SCHEMA {schema}"));
        Db { schema }
    }

    /// The URL consentgate uses, via `addr` (the server or a forwarder).
    fn url(&self, addr: &str, app: &str) -> String {
        format!(
            "postgres://postgres@{addr}/test?application_name={app}&options=-c%20search_path%3D{}",
            self.schema
        )
    }

    async fn client(&self) -> tokio_postgres::Client {
        let (c, conn) = tokio_postgres::connect(&self.url(PG, "cgt-writer"), NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        c
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        sql_blocking(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.schema));
    }
}

/// Run SQL on database `test` from a thread of its own (usable in Drop).
fn sql_blocking(sql: &str) {
    let sql = sql.to_string();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (c, conn) =
                tokio_postgres::connect(&format!("postgres://postgres@{PG}/test"), NoTls)
                    .await
                    .unwrap();
            tokio::spawn(conn);
            c.batch_execute(&sql).await.unwrap();
        })
    })
    .join()
    .unwrap();
}

fn consent_yaml(url: &str, max_staleness: &str) -> String {
    format!(
        "consent:\n  source: postgres\n  max_staleness: {max_staleness}\n  postgres:\n    url: \"{url}\"\n"
    )
}

/// Write the config, run `consentgate db migrate` on it, start the proxy.
fn start_pg_proxy(dir: &Path, up: &Upstream, ca: &TestCa, url: &str, max_staleness: &str) -> Proxy {
    let (pp, ap) = (free_port(), free_port());
    let opts = ProxyOpts {
        consent_yaml: Some(consent_yaml(url, max_staleness)),
        ..Default::default()
    };
    let config = dir.join("consentgate.yaml");
    std::fs::write(&config, config_yaml(dir, up.addr, ca, &opts, pp, ap)).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_consentgate"))
        .args(["db", "migrate", "--config"])
        .arg(&config)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "db migrate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    spawn_proxy(dir, &config, pp, ap)
}

async fn setup(name: &str) -> (std::path::PathBuf, Upstream, TestCa) {
    let dir = test_dir(name);
    let ca = test_ca(&dir.join("upstream"), VENDOR_HOSTS);
    let up = start_upstream(&ca).await;
    (dir, up, ca)
}

fn admin(method: &'static str, path: &str, body: &str) -> Req {
    let mut r = Req::post("admin", path, body.to_string());
    r.method = method;
    r.header("authorization", &format!("Bearer {TOKEN}"))
}

async fn get_record(p: &Proxy, id: &str) -> Option<serde_json::Value> {
    let r = send(p.admin, admin("GET", &format!("/v1/consent/{id}"), "")).await;
    match r.status {
        200 => Some(r.json()),
        404 => None,
        s => panic!("GET {id}: {s}"),
    }
}

/// Test patients `X-<n>` have the phone +1415 and n in 7 digits.
fn phone_digits(id: &str) -> String {
    let n: u64 = id.rsplit('-').next().unwrap().parse().unwrap();
    format!("1415{n:07}")
}

fn phone_hash(id: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(phone_digits(id).as_bytes()))
}

/// A marketing SMS to patient `id`'s phone (category marketing_sms).
fn sms(id: &str) -> Req {
    let form = form_urlencoded::Serializer::new(String::new())
        .append_pair("To", &format!("+{}", phone_digits(id)))
        .append_pair("From", "+14155559999")
        .append_pair("Body", "Spring wellness offer")
        .finish();
    Req::post(
        "api.twilio.com",
        "/2010-04-01/Accounts/AC1/Messages.json",
        form,
    )
    .header("content-type", "application/x-www-form-urlencoded")
    .header("X-Patient-Id", id)
}

/// Send `sms(id)` through the proxy and expect `status`.
async fn expect(proxy: SocketAddr, id: &str, status: u16) {
    let r = send(proxy, sms(id)).await;
    assert_eq!(
        r.status,
        status,
        "{id}: {}",
        String::from_utf8_lossy(&r.body)
    );
}

fn record(id: &str, sms: &str, ts: &str) -> serde_json::Value {
    json!({"patient_id": id, "categories": {"marketing_sms": sms},
           "identifiers": {"phone_sha256": [phone_hash(id)]}, "updated_at": ts})
}

async fn insert(c: &tokio_postgres::Client, rec: &serde_json::Value) {
    let id = rec["patient_id"].as_str().unwrap();
    let ts = chrono::DateTime::parse_from_rfc3339(rec["updated_at"].as_str().unwrap())
        .unwrap()
        .with_timezone(&chrono::Utc);
    c.execute(
        "INSERT INTO consentgate_consent (patient_id, record, updated_at) VALUES ($1, $2, $3) \
         ON CONFLICT (patient_id) DO UPDATE SET record = EXCLUDED.record, updated_at = EXCLUDED.updated_at, deleted = false",
        &[&id, rec, &ts],
    )
    .await
    .unwrap();
}

async fn wait_until<F, Fut>(what: &str, secs: u64, f: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn metric(p: &Proxy, name: &str) -> f64 {
    let m = admin_get(p, "/metrics").await;
    let text = String::from_utf8_lossy(&m.body).to_string();
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("metric {name} missing"))
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * q).round() as usize]
}

#[tokio::test(flavor = "multi_thread")]
async fn cursor_load_20k_rows_then_sql_update_is_enforced_on_next_request() {
    let db = Db::new("load");
    let c = db.client().await;
    // Apply the schema first (the proxy run below re-applies idempotently).
    let (dir, up, ca) = setup("pg-load").await;
    let (pp, ap) = (free_port(), free_port());
    let url = db.url(PG, "cgt-load");
    let opts = ProxyOpts {
        consent_yaml: Some(consent_yaml(&url, "5m")),
        ..Default::default()
    };
    let config = dir.join("consentgate.yaml");
    std::fs::write(&config, config_yaml(&dir, up.addr, &ca, &opts, pp, ap)).unwrap();
    for expect in ["applied: 0001_consent", "ok: schema up to date"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_consentgate"))
            .args(["db", "migrate", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        assert!(out.status.success());
        assert!(String::from_utf8_lossy(&out.stdout).contains(expect));
    }
    c.batch_execute(
        "INSERT INTO consentgate_consent (patient_id, record, updated_at) \
         SELECT 'S-' || i, jsonb_build_object('patient_id', 'S-' || i, \
           'updated_at', '2026-01-01T00:00:00Z', \
           'categories', jsonb_build_object('marketing_sms', 'granted'), \
           'identifiers', jsonb_build_object('external_ids', jsonb_build_array('crm:' || i), \
             'phone_sha256', jsonb_build_array(encode(sha256(convert_to('1415' || lpad(i::text, 7, '0'), 'UTF8')), 'hex')))), \
           '2026-01-01T00:00:00Z' FROM generate_series(1, 20000) i",
    )
    .await
    .unwrap();
    let t = Instant::now();
    let p = spawn_proxy(&dir, &config, pp, ap);
    eprintln!("20,000 rows: ready in {:?}", t.elapsed());
    assert_eq!(metric(&p, "consentgate_consent_records").await, 20000.0);
    assert_eq!(metric(&p, "consentgate_consent_source_up").await, 1.0);
    assert!(get_record(&p, "S-1").await.is_some());
    assert!(get_record(&p, "S-20000").await.is_some());
    assert!(get_record(&p, "S-20001").await.is_none());

    // Granted: forwarded.
    expect(p.proxy, "S-42", 200).await;
    // An UPDATE from another client: enforced on the next request.
    c.batch_execute(
        "UPDATE consentgate_consent SET record = jsonb_set(record, '{categories,marketing_sms}', '\"denied\"') \
         WHERE patient_id = 'S-42'",
    )
    .await
    .unwrap();
    wait_until("update visible", 5, || async {
        get_record(&p, "S-42").await.unwrap()["categories"]["marketing_sms"] == "denied"
    })
    .await;
    let r = send(p.proxy, sms("S-42")).await;
    assert_eq!(r.status, 451, "{}", String::from_utf8_lossy(&r.body));
    assert!(String::from_utf8_lossy(&r.body).contains("consent_denied"));
    // A plain SQL DELETE is a tombstone: propagated.
    c.batch_execute("DELETE FROM consentgate_consent WHERE patient_id = 'S-43'")
        .await
        .unwrap();
    wait_until("delete visible", 5, || async {
        get_record(&p, "S-43").await.is_none()
    })
    .await;
    expect(p.proxy, "S-43", 451).await;
    assert!(metric(&p, "consentgate_consent_propagation_seconds_count").await >= 2.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn propagation_of_1000_sql_updates_p50_p99() {
    let db = Db::new("prop");
    let (dir, up, ca) = setup("pg-prop").await;
    let p = start_pg_proxy(&dir, &up, &ca, &db.url(PG, "cgt-prop"), "5m");
    let c = db.client().await;
    insert(&c, &record("Q-1", "granted", "2026-01-01T00:00:00Z")).await;
    wait_until("seed", 5, || async {
        get_record(&p, "Q-1").await.is_some()
    })
    .await;
    let stmt = c
        .prepare(
            "UPDATE consentgate_consent SET record = jsonb_set(record, '{source}', to_jsonb($1::text)) \
             WHERE patient_id = 'Q-1'",
        )
        .await
        .unwrap();
    let mut lat = Vec::with_capacity(1000);
    for i in 0..1000 {
        let tag = format!("u{i}");
        c.execute(&stmt, &[&tag]).await.unwrap();
        let t = Instant::now();
        loop {
            if get_record(&p, "Q-1").await.unwrap()["source"] == tag.as_str() {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "update {i} not visible"
            );
        }
        lat.push(t.elapsed());
    }
    lat.sort();
    let (p50, p99) = (percentile(&lat, 0.50), percentile(&lat, 0.99));
    eprintln!(
        "propagation over 1000 SQL updates (commit -> visible via admin GET): p50 {p50:?} p99 {p99:?} max {:?}",
        lat[lat.len() - 1]
    );
    // Goal p99 <= 50 ms; bounded loosely here (debug build, shared CPUs).
    assert!(p99 < Duration::from_millis(250), "p99 {p99:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn two_processes_put_on_one_is_enforced_by_the_other() {
    let db = Db::new("two");
    let (dir_a, up, ca) = setup("pg-two-a").await;
    let dir_b = test_dir("pg-two-b");
    let a = start_pg_proxy(&dir_a, &up, &ca, &db.url(PG, "cgt-two-a"), "5m");
    let b = start_pg_proxy(&dir_b, &up, &ca, &db.url(PG, "cgt-two-b"), "5m");
    let put = |ts: &str, v: &str| {
        admin(
            "PUT",
            "/v1/consent/T-1",
            &json!({"categories": {"marketing_sms": v},
                    "identifiers": {"phones": [format!("+{}", phone_digits("T-1"))]},
                    "updated_at": ts})
            .to_string(),
        )
    };
    let r = send(a.admin, put("2026-03-01T00:00:00Z", "granted")).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert!(!String::from_utf8_lossy(&r.body).contains("14150000001"));
    // A enforces at once (applied before it answered).
    expect(a.proxy, "T-1", 200).await;
    wait_until("B sees the PUT", 5, || async {
        get_record(&b, "T-1").await.is_some()
    })
    .await;
    expect(b.proxy, "T-1", 200).await;
    // Opt-out on B: enforced by A.
    let r = send(b.admin, put("2026-03-02T00:00:00Z", "denied")).await;
    assert_eq!(r.status, 200);
    wait_until("A sees the opt-out", 5, || async {
        get_record(&a, "T-1").await.unwrap()["categories"]["marketing_sms"] == "denied"
    })
    .await;
    expect(a.proxy, "T-1", 451).await;
    // An older write on A loses (last write wins, across processes).
    let r = send(a.admin, put("2026-03-01T12:00:00Z", "granted")).await;
    assert_eq!(r.status, 409);
    // DELETE on A: gone on B.
    let r = send(a.admin, admin("DELETE", "/v1/consent/T-1", "")).await;
    assert_eq!(r.status, 200);
    wait_until("B sees the delete", 5, || async {
        get_record(&b, "T-1").await.is_none()
    })
    .await;
    // The plaintext phone never reached the database.
    let c = db.client().await;
    let n: i64 = c
        .query_one(
            "SELECT count(*) FROM consentgate_consent WHERE record::text LIKE '%14150000001%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
}

/// Writes W-0..W-{n-1} (and rewrites every fifth) from its own connection.
async fn writer(c: tokio_postgres::Client, n: usize, done: Arc<AtomicUsize>) {
    for i in 0..n {
        insert(
            &c,
            &record(&format!("W-{i}"), "granted", "2026-01-01T00:00:00Z"),
        )
        .await;
        if i.is_multiple_of(5) {
            insert(
                &c,
                &record(&format!("W-{}", i / 2), "denied", "2026-01-02T00:00:00Z"),
            )
            .await;
        }
        done.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Every W-i is in the proxy with the state the writer left in the database.
async fn assert_all_written(p: &Proxy, db: &Db, n: usize) {
    let c = db.client().await;
    let want: std::collections::HashMap<String, String> = c
        .query(
            "SELECT patient_id, record->'categories'->>'marketing_sms' FROM consentgate_consent \
             WHERE patient_id LIKE 'W-%'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(want.len(), n);
    let max: i64 = c
        .query_one("SELECT max(version) FROM consentgate_consent", &[])
        .await
        .unwrap()
        .get(0);
    // Give the feed a moment to apply the last writes, then compare all.
    wait_until("last write visible", 10, || async {
        let last = format!("W-{}", n - 1);
        get_record(p, &last).await.is_some()
    })
    .await;
    let mut missing = Vec::new();
    for (id, v) in &want {
        let ok = match get_record(p, id).await {
            Some(r) => r["categories"]["marketing_sms"] == v.as_str(),
            None => false,
        };
        if !ok {
            missing.push(id.clone());
        }
    }
    assert!(
        missing.is_empty(),
        "{} of {n} writes missing or stale (max version {max}): {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn backends_terminated_repeatedly_while_writing_no_write_missed() {
    let db = Db::new("term");
    let (dir, up, ca) = setup("pg-term").await;
    let app = format!("cgt-term-{}", std::process::id());
    let p = start_pg_proxy(&dir, &up, &ca, &db.url(PG, &app), "5m");
    let n = 400;
    let done = Arc::new(AtomicUsize::new(0));
    let w = tokio::spawn(writer(db.client().await, n, done.clone()));
    let killer_c = db.client().await;
    let mut kills = 0;
    while done.load(Ordering::Relaxed) < n {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let r = killer_c
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1",
                &[&app],
            )
            .await
            .unwrap();
        let k: i64 = r.get(0);
        kills += k;
    }
    w.await.unwrap();
    assert!(kills >= 3, "terminated {kills} backends");
    assert_all_written(&p, &db, n).await;
    let log = std::fs::read_to_string(&p.log).unwrap();
    assert!(log.contains("consent database reconnected"));
    assert!(!log.contains("W-1"), "patient ids must not be logged");
    wait_until("source up", 10, || async {
        metric(&p, "consentgate_consent_source_up").await == 1.0
    })
    .await;
}

/// A TCP forwarder to PostgreSQL that the test can cut ("database stopped")
/// and restore.
struct Forwarder {
    addr: SocketAddr,
    up: tokio::sync::watch::Sender<bool>,
}

impl Forwarder {
    async fn start() -> Forwarder {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (up, rx) = tokio::sync::watch::channel(true);
        tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    continue;
                };
                if !*rx.borrow() {
                    drop(sock);
                    continue;
                }
                let mut rx = rx.clone();
                tokio::spawn(async move {
                    let Ok(mut pg) = tokio::net::TcpStream::connect(PG).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut sock, &mut pg) => {}
                        _ = rx.wait_for(|up| !*up) => {}
                    }
                });
            }
        });
        Forwarder { addr, up }
    }

    fn set(&self, up: bool) {
        self.up.send_replace(up);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn database_cut_via_tcp_forwarder_then_restored_no_write_missed() {
    let db = Db::new("cut");
    let fwd = Forwarder::start().await;
    let (dir, up, ca) = setup("pg-cut").await;
    let p = start_pg_proxy(
        &dir,
        &up,
        &ca,
        &db.url(&fwd.addr.to_string(), "cgt-cut"),
        "5m",
    );
    let n = 200;
    let done = Arc::new(AtomicUsize::new(0));
    let w = tokio::spawn(writer(db.client().await, n, done.clone()));
    let cutting = Arc::new(AtomicBool::new(true));
    // Cut and restore a few times while the writer writes.
    while done.load(Ordering::Relaxed) < n {
        fwd.set(false);
        tokio::time::sleep(Duration::from_millis(300)).await;
        // While cut: source down, admin writes refused (not durable).
        if cutting.swap(false, Ordering::Relaxed) {
            wait_until("source down", 5, || async {
                metric(&p, "consentgate_consent_source_up").await == 0.0
            })
            .await;
            let r = send(
                p.admin,
                admin(
                    "PUT",
                    "/v1/consent/X-1",
                    &json!({"updated_at": "2026-01-01T00:00:00Z"}).to_string(),
                ),
            )
            .await;
            assert_eq!(r.status, 503);
        }
        fwd.set(true);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    w.await.unwrap();
    fwd.set(true);
    assert_all_written(&p, &db, n).await;
    assert!(get_record(&p, "X-1").await.is_none());
    wait_until("source up", 10, || async {
        metric(&p, "consentgate_consent_source_up").await == 1.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn database_down_past_max_staleness_fails_closed_then_recovers_without_restart() {
    let db = Db::new("stale");
    let fwd = Forwarder::start().await;
    let (dir, up, ca) = setup("pg-stale").await;
    let c = db.client().await;
    let p = start_pg_proxy(
        &dir,
        &up,
        &ca,
        &db.url(&fwd.addr.to_string(), "cgt-stale"),
        "1s",
    );
    insert(&c, &record("R-1", "granted", "2026-01-01T00:00:00Z")).await;
    wait_until("seed", 5, || async {
        get_record(&p, "R-1").await.is_some()
    })
    .await;
    expect(p.proxy, "R-1", 200).await;

    fwd.set(false);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    wait_until("stale: marketing fails closed", 5, || async {
        let r = send(p.proxy, sms("R-1")).await;
        r.status == 451 && String::from_utf8_lossy(&r.body).contains("consent_stale")
    })
    .await;
    assert_eq!(admin_get(&p, "/readyz").await.status, 503);
    assert_eq!(metric(&p, "consentgate_consent_source_up").await, 0.0);
    assert!(metric(&p, "consentgate_consent_staleness_seconds").await >= 1.0);
    // A change made while the proxy cannot see the database...
    insert(&c, &record("R-2", "granted", "2026-01-01T00:00:00Z")).await;

    fwd.set(true);
    wait_until("ready again", 15, || async {
        admin_get(&p, "/readyz").await.status == 200
    })
    .await;
    // ...is there after the resync, and decisions are fresh again.
    assert!(get_record(&p, "R-2").await.is_some());
    expect(p.proxy, "R-1", 200).await;
    expect(p.proxy, "R-2", 200).await;
    assert_eq!(metric(&p, "consentgate_consent_source_up").await, 1.0);
}
