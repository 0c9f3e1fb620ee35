//! Issue 14 acceptance (consent writes): concurrent PATCHes to one patient lose
//! nothing, in file mode and across two instances on one PostgreSQL database;
//! versions, ETag and If-Match; the journal directory's lock, modes and
//! encryption at rest. All against the real binary (and the real PostgreSQL on
//! 127.0.0.1:5432, database `test`, one schema per test).

mod common;
use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use tokio_postgres::NoTls;

const TOKEN: &str = "example-preference-center-token";
const PG: &str = "127.0.0.1:5432";
/// Concurrent PATCHes per round, over this many keep-alive connections.
const PATCHES: usize = 50;
const CONNECTIONS: usize = 8;
const ROUNDS: usize = 20;

/// One keep-alive HTTP/1.1 connection to an admin listener.
struct AdminConn {
    sender: SendRequest<Full<Bytes>>,
}

impl AdminConn {
    async fn open(addr: SocketAddr) -> AdminConn {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(conn);
        AdminConn { sender }
    }

    async fn call(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> (u16, hyper::HeaderMap, Value) {
        self.sender.ready().await.unwrap();
        let mut b = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "admin")
            .header("authorization", format!("Bearer {TOKEN}"))
            .header("content-type", "application/json");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let req = b.body(Full::new(Bytes::from(body.to_string()))).unwrap();
        let resp = self.sender.send_request(req).await.unwrap();
        let (parts, body) = resp.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        let v = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (parts.status.as_u16(), parts.headers, v)
    }
}

/// One request on a fresh connection.
async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, hyper::HeaderMap, Value) {
    AdminConn::open(addr)
        .await
        .call(method, path, headers, body)
        .await
}

/// The external id PATCH `i` of round `round` adds.
fn ext(round: usize, i: usize) -> String {
    format!("crm:r{round}-p{i}")
}

/// PATCHes `0..PATCHES` to `patient`, each appending its own external id, over
/// `CONNECTIONS` keep-alive connections spread round-robin over `admins`, all at
/// once. Returns the external ids of the acknowledged (200) PATCHes; a 409
/// (`superseded`) is left out (the caller checks the count after checking that
/// nothing acknowledged was lost); any other answer fails the test.
async fn patch_storm(admins: &[SocketAddr], patient: &str, round: usize) -> BTreeSet<String> {
    let mut tasks = Vec::new();
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(CONNECTIONS));
    for c in 0..CONNECTIONS {
        let addr = admins[c % admins.len()];
        let patient = patient.to_string();
        let start = start.clone();
        tasks.push(tokio::spawn(async move {
            let mut conn = AdminConn::open(addr).await;
            start.wait().await;
            let mut acked = Vec::new();
            for i in (c..PATCHES).step_by(CONNECTIONS) {
                let body = json!({"identifiers": {"external_ids": [ext(round, i)]}}).to_string();
                let (s, _, v) = conn
                    .call("PATCH", &format!("/v1/consent/{patient}"), &[], &body)
                    .await;
                match s {
                    200 => acked.push(ext(round, i)),
                    409 => {}
                    _ => panic!("PATCH {i} of round {round}: {s} {v}"),
                }
            }
            acked
        }));
    }
    let mut all = BTreeSet::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

fn external_ids(rec: &Value) -> BTreeSet<String> {
    rec["identifiers"]["external_ids"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn assert_holds_all(rec: &Value, acked: &BTreeSet<String>, what: &str) {
    let have = external_ids(rec);
    let lost: Vec<&String> = acked.difference(&have).collect();
    assert!(
        lost.is_empty(),
        "{what}: {} of {} acknowledged PATCHes lost: {:?}",
        lost.len(),
        acked.len(),
        &lost[..lost.len().min(8)]
    );
}

async fn put_fresh(admin: SocketAddr, patient: &str) {
    let body = json!({"categories": {"advertising": "granted"}, "source": "test"}).to_string();
    let (s, _, v) = call(admin, "PUT", &format!("/v1/consent/{patient}"), &[], &body).await;
    assert_eq!(s, 200, "PUT {patient}: {v}");
}

#[tokio::test(flavor = "multi_thread")]
async fn file_mode_50_concurrent_patches_lose_nothing_20_rounds() {
    let dir = test_dir("writes-file-storm");
    let ca = test_ca(&dir.join("upstream"), VENDOR_HOSTS);
    let up = start_upstream(&ca).await;
    let p = start_proxy(&dir, &up, &ca, ProxyOpts::default());
    for round in 0..ROUNDS {
        let patient = format!("C-{round}");
        put_fresh(p.admin, &patient).await;
        let acked = patch_storm(&[p.admin], &patient, round).await;
        let (s, _, rec) = call(p.admin, "GET", &format!("/v1/consent/{patient}"), &[], "").await;
        assert_eq!(s, 200);
        assert_holds_all(&rec, &acked, &format!("round {round}"));
        // Serialised, each PATCH merges into the one before it: none is refused.
        assert_eq!(acked.len(), PATCHES, "round {round}: PATCHes refused");
    }
}

/// A schema of the test's own in database `test`; dropped on drop.
struct Db {
    schema: String,
}

impl Db {
    fn new(tag: &str) -> Db {
        let schema = format!(
            "cgw_{tag}_{}_{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos()
        );
        sql_blocking(&format!("CREATE SCHEMA {schema}"));
        Db { schema }
    }

    fn url(&self, app: &str) -> String {
        format!(
            "postgres://postgres@{PG}/test?application_name={app}&options=-c%20search_path%3D{}",
            self.schema
        )
    }

    async fn client(&self) -> tokio_postgres::Client {
        let (c, conn) = tokio_postgres::connect(&self.url("cgw-check"), NoTls)
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

/// Write a config for `consent.source: postgres`, migrate, start the binary.
fn start_pg_proxy(dir: &Path, up: &Upstream, ca: &TestCa, url: &str) -> Proxy {
    let (pp, ap) = (free_port(), free_port());
    let opts = ProxyOpts {
        consent_yaml: Some(format!(
            "consent:\n  source: postgres\n  max_staleness: 5m\n  postgres:\n    url: \"{url}\"\n"
        )),
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

#[tokio::test(flavor = "multi_thread")]
async fn postgres_50_concurrent_patches_across_two_instances_lose_nothing_20_rounds() {
    let db = Db::new("storm");
    let dir_a = test_dir("writes-pg-storm-a");
    let dir_b = test_dir("writes-pg-storm-b");
    let ca = test_ca(&dir_a.join("upstream"), VENDOR_HOSTS);
    let up = start_upstream(&ca).await;
    let a = start_pg_proxy(&dir_a, &up, &ca, &db.url("cgw-storm-a"));
    let b = start_pg_proxy(&dir_b, &up, &ca, &db.url("cgw-storm-b"));
    let c = db.client().await;
    for round in 0..ROUNDS {
        let patient = format!("C-{round}");
        put_fresh(a.admin, &patient).await;
        // B must know the record before it can PATCH it.
        let t = std::time::Instant::now();
        while call(b.admin, "GET", &format!("/v1/consent/{patient}"), &[], "")
            .await
            .0
            != 200
        {
            assert!(t.elapsed().as_secs() < 10, "B never saw {patient}");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let acked = patch_storm(&[a.admin, b.admin], &patient, round).await;
        let row: Value = c
            .query_one(
                "SELECT record FROM consentgate_consent WHERE patient_id = $1",
                &[&patient],
            )
            .await
            .unwrap()
            .get(0);
        assert_holds_all(&row, &acked, &format!("round {round}, database row"));
        assert_eq!(acked.len(), PATCHES, "round {round}: PATCHes refused");
        // Both caches converge on the row.
        for (name, p) in [("A", &a), ("B", &b)] {
            let t = std::time::Instant::now();
            loop {
                let (s, _, rec) =
                    call(p.admin, "GET", &format!("/v1/consent/{patient}"), &[], "").await;
                assert_eq!(s, 200);
                if external_ids(&rec).is_superset(&acked) {
                    break;
                }
                assert!(
                    t.elapsed().as_secs() < 10,
                    "round {round}: instance {name} never showed every acknowledged PATCH"
                );
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_stale_if_match_across_instances_is_412_and_changes_nothing() {
    let db = Db::new("ifmatch");
    let dir_a = test_dir("writes-pg-ifmatch-a");
    let dir_b = test_dir("writes-pg-ifmatch-b");
    let ca = test_ca(&dir_a.join("upstream"), VENDOR_HOSTS);
    let up = start_upstream(&ca).await;
    let a = start_pg_proxy(&dir_a, &up, &ca, &db.url("cgw-ifm-a"));
    let b = start_pg_proxy(&dir_b, &up, &ca, &db.url("cgw-ifm-b"));
    let path = "/v1/consent/V-1";
    let (s, h, v) = call(a.admin, "PUT", path, &[], r#"{"gpc":false}"#).await;
    assert_eq!(s, 200, "{v}");
    let v1 = v["version"].as_u64().unwrap();
    assert!(v1 > 0);
    assert_eq!(h["etag"], format!("\"{v1}\"").as_str());
    let tag1 = format!("\"{v1}\"");
    // B writes on top of v1 (B reads the row in its transaction, whatever its
    // cache holds).
    let (s, _, v) = call(
        b.admin,
        "PATCH",
        path,
        &[("if-match", &tag1)],
        r#"{"gpc":true}"#,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let v2 = v["version"].as_u64().unwrap();
    assert!(v2 > v1);
    // A still holds v1 as the version it last saw: its write is refused.
    let (s, h, v) = call(
        a.admin,
        "PATCH",
        path,
        &[("if-match", &tag1)],
        r#"{"categories":{"advertising":"granted"}}"#,
    )
    .await;
    assert_eq!(s, 412, "{v}");
    assert_eq!(v["error"], "precondition_failed");
    assert_eq!(v["current_version"].as_u64(), Some(v2));
    assert_eq!(h["etag"], format!("\"{v2}\"").as_str());
    let c = db.client().await;
    let row = c
        .query_one(
            "SELECT record, version FROM consentgate_consent WHERE patient_id = 'V-1'",
            &[],
        )
        .await
        .unwrap();
    let (rec, version): (Value, i64) = (row.get(0), row.get(1));
    assert_eq!(version as u64, v2, "nothing written");
    assert!(rec["categories"].get("advertising").is_none());
    assert!(rec.get("version").is_none(), "the column is the version");
    // DELETE with the stale tag: refused too; with the current one: done.
    let (s, _, _) = call(a.admin, "DELETE", path, &[("if-match", &tag1)], "").await;
    assert_eq!(s, 412);
    let (s, _, _) = call(
        a.admin,
        "DELETE",
        path,
        &[("if-match", &format!("\"{v2}\""))],
        "",
    )
    .await;
    assert_eq!(s, 200);
    let (s, _, v) = call(a.admin, "PUT", path, &[("if-match", "*")], "{}").await;
    assert_eq!((s, v["current_version"].clone()), (412, Value::Null));
}

#[tokio::test(flavor = "multi_thread")]
async fn file_mode_stale_if_match_is_412_and_changes_nothing() {
    let dir = test_dir("writes-file-ifmatch");
    let ca = test_ca(&dir.join("upstream"), VENDOR_HOSTS);
    let up = start_upstream(&ca).await;
    let p = start_proxy(&dir, &up, &ca, ProxyOpts::default());
    let path = "/v1/consent/P-1001";
    let (s, h, v) = call(p.admin, "GET", path, &[], "").await;
    assert_eq!((s, v["version"].as_u64()), (200, Some(0)));
    assert_eq!(h["etag"], "\"0\"");
    let (s, h, v) = call(
        p.admin,
        "PATCH",
        path,
        &[("if-match", "\"0\"")],
        r#"{"gpc":true}"#,
    )
    .await;
    assert_eq!((s, v["version"].as_u64()), (200, Some(1)), "{v}");
    assert_eq!(h["etag"], "\"1\"");
    let journal = dir.join("journal").join("journal.jsonl");
    let before = std::fs::read(&journal).unwrap();
    let (s, _, v) = call(
        p.admin,
        "PATCH",
        path,
        &[("if-match", "\"0\"")],
        r#"{"categories":{"advertising":"denied"}}"#,
    )
    .await;
    assert_eq!((s, v["current_version"].as_u64()), (412, Some(1)));
    assert_eq!(
        std::fs::read(&journal).unwrap(),
        before,
        "nothing journaled"
    );
    let (_, _, v) = call(p.admin, "GET", path, &[], "").await;
    assert_eq!(v["categories"]["advertising"], "granted", "nothing changed");
}

/// The generated file-source `consent:` block, with extra lines (2-space
/// indented) such as a journal key.
fn file_consent_yaml(dir: &Path, extra: &str) -> String {
    format!(
        "consent:\n  source: file\n  file: {}\n  journal: {}/journal\n  max_staleness: 5m\n{extra}",
        repo().join("config/consent.example.jsonl").display(),
        dir.display()
    )
}

/// Start the binary on a config that is expected to refuse to start: returns
/// its exit code and its log.
fn run_expecting_failure(dir: &Path, config: &Path) -> (Option<i32>, String) {
    let log = dir.join(format!("failed-start-{}.log", free_port()));
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_consentgate"))
        .args(["run", "--config"])
        .arg(config)
        .current_dir(dir)
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut child = child;
    let t = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t.elapsed().as_secs() > 20 {
            let _ = child.kill();
            panic!(
                "consentgate did not exit: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    (status.code(), std::fs::read_to_string(&log).unwrap())
}

/// (name, size, mtime) of every file in `dir`, sorted.
fn listing(dir: &Path) -> Vec<(String, u64, std::time::SystemTime)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let m = e.metadata().unwrap();
            (
                e.file_name().to_string_lossy().to_string(),
                m.len(),
                m.modified().unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread")]
async fn second_process_on_the_same_journal_exits_1_naming_the_lock_and_writes_nothing() {
    let dir = test_dir("writes-journal-lock");
    let ca = test_ca(&dir.join("upstream"), VENDOR_HOSTS);
    let up = start_upstream(&ca).await;
    let a = start_proxy(&dir, &up, &ca, ProxyOpts::default());
    let (s, _, _) = call(a.admin, "PUT", "/v1/consent/L-1", &[], "{}").await;
    assert_eq!(s, 200);
    let journal = dir.join("journal");
    let before = listing(&journal);
    let journal_bytes = std::fs::read(journal.join("journal.jsonl")).unwrap();
    // A copied config: the same journal, its own ports and audit directory.
    let dir_b = test_dir("writes-journal-lock-b");
    let opts = ProxyOpts {
        consent_yaml: Some(file_consent_yaml(&dir, "")),
        ..Default::default()
    };
    let config_b = dir_b.join("consentgate.yaml");
    std::fs::write(
        &config_b,
        config_yaml(&dir_b, up.addr, &ca, &opts, free_port(), free_port()),
    )
    .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    let (code, log) = run_expecting_failure(&dir_b, &config_b);
    assert_eq!(code, Some(1), "{log}");
    assert!(
        log.contains("consent.journal")
            && log.contains("is locked by pid")
            && log.contains(&a.child.id().to_string()),
        "the error names the lock and its holder: {log}"
    );
    assert_eq!(
        listing(&journal),
        before,
        "nothing in the journal directory touched"
    );
    assert_eq!(
        std::fs::read(journal.join("journal.jsonl")).unwrap(),
        journal_bytes
    );
    // The owner carries on.
    let (s, _, v) = call(a.admin, "PATCH", "/v1/consent/L-1", &[], r#"{"gpc":true}"#).await;
    assert_eq!((s, v["version"].as_u64()), (200, Some(2)));
}

#[tokio::test(flavor = "multi_thread")]
async fn journal_directory_is_0700_files_0600_and_looser_ones_are_tightened() {
    use std::os::unix::fs::PermissionsExt;
    let dir = test_dir("writes-journal-modes");
    let ca = test_ca(&dir.join("upstream"), VENDOR_HOSTS);
    let up = start_upstream(&ca).await;
    {
        let p = start_proxy(&dir, &up, &ca, ProxyOpts::default());
        let (s, _, _) = call(p.admin, "PUT", "/v1/consent/M-1", &[], "{}").await;
        assert_eq!(s, 200);
        let j = dir.join("journal");
        assert_eq!(mode(&j), 0o700);
        for (name, _, _) in listing(&j) {
            assert_eq!(mode(&j.join(&name)), 0o600, "{name}");
        }
    }
    // As an older version left them (0755 / 0644): tightened on start, logged.
    let j = dir.join("journal");
    std::fs::set_permissions(&j, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(
        j.join("journal.jsonl"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let p = start_proxy(&dir, &up, &ca, ProxyOpts::default());
    assert_eq!(mode(&j), 0o700);
    assert_eq!(mode(&j.join("journal.jsonl")), 0o600);
    let log = std::fs::read_to_string(&p.log).unwrap();
    assert_eq!(
        log.matches("permissions tightened").count(),
        2,
        "one log line each: {log}"
    );
    let (s, _, _) = call(p.admin, "GET", "/v1/consent/M-1", &[], "").await;
    assert_eq!(s, 200, "replayed");
}

/// Every byte of every file in the journal directory, as text.
fn journal_text(dir: &Path) -> String {
    let j = dir.join("journal");
    listing(&j)
        .iter()
        .map(|(n, _, _)| String::from_utf8_lossy(&std::fs::read(j.join(n)).unwrap()).to_string())
        .collect()
}

fn sha256_hex(s: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(s.as_bytes()))
}

fn write_key(dir: &Path, name: &str, byte: u8) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, format!("{}\n", hex::encode([byte; 32]))).unwrap();
    p
}

/// Rewrite the config's `consent:` block (and ports) and start again.
fn restart(dir: &Path, up: &Upstream, ca: &TestCa, consent: String) -> Proxy {
    let (pp, ap) = (free_port(), free_port());
    let opts = ProxyOpts {
        consent_yaml: Some(consent),
        ..Default::default()
    };
    let config = dir.join("consentgate.yaml");
    std::fs::write(&config, config_yaml(dir, up.addr, ca, &opts, pp, ap)).unwrap();
    spawn_proxy(dir, &config, pp, ap)
}

fn kill_9(p: &mut Proxy) {
    assert!(std::process::Command::new("kill")
        .args(["-9", &p.child.id().to_string()])
        .status()
        .unwrap()
        .success());
    let _ = p.child.wait();
}

#[tokio::test(flavor = "multi_thread")]
async fn journal_key_keeps_identifiers_out_of_every_journal_file_and_rotates() {
    let dir = test_dir("writes-journal-key");
    let ca = test_ca(&dir.join("upstream"), VENDOR_HOSTS);
    let up = start_upstream(&ca).await;
    let k1 = write_key(&dir, "journal-k1.hex", 0x11);
    let k2 = write_key(&dir, "journal-k2.hex", 0x22);
    let with_key = |k: &Path| format!("  journal_key_file: {}\n", k.display());
    // First without a key: the journal holds ids in clear.
    let mut p = restart(&dir, &up, &ca, file_consent_yaml(&dir, ""));
    let body = json!({"identifiers": {"external_ids": ["MRN-SECRET-1"], "emails": ["secret.person@example.com"]},
        "categories": {"advertising": "granted"}})
    .to_string();
    assert_eq!(
        call(p.admin, "PUT", "/v1/consent/PT-SECRET-1", &[], &body)
            .await
            .0,
        200
    );
    assert!(journal_text(&dir).contains("MRN-SECRET-1"));
    kill_9(&mut p);
    // Key on: the journal is rewritten under it at start.
    let mut p = restart(&dir, &up, &ca, file_consent_yaml(&dir, &with_key(&k1)));
    let log = std::fs::read_to_string(&p.log).unwrap();
    assert!(log.contains("rewritten under the configured key"), "{log}");
    let patch = json!({"identifiers": {"external_ids": ["MRN-SECRET-2"]}}).to_string();
    assert_eq!(
        call(p.admin, "PATCH", "/v1/consent/PT-SECRET-1", &[], &patch)
            .await
            .0,
        200
    );
    assert_eq!(
        call(p.admin, "PUT", "/v1/consent/PT-SECRET-2", &[], "{}")
            .await
            .0,
        200
    );
    assert_eq!(
        call(p.admin, "DELETE", "/v1/consent/PT-SECRET-2", &[], "")
            .await
            .0,
        200
    );
    let text = journal_text(&dir);
    assert!(!text.contains("SECRET"), "identifiers in clear: {text}");
    assert!(!text.contains(&sha256_hex("secret.person@example.com")));
    // kill -9 and restart with the key: replayed, and enforced.
    kill_9(&mut p);
    let mut p = restart(&dir, &up, &ca, file_consent_yaml(&dir, &with_key(&k1)));
    let (s, _, v) = call(p.admin, "GET", "/v1/consent/PT-SECRET-1", &[], "").await;
    assert_eq!(s, 200);
    assert_eq!(
        external_ids(&v),
        ["MRN-SECRET-1", "MRN-SECRET-2"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    );
    assert_eq!(v["version"].as_u64(), Some(2));
    let ev = r#"{"data":[{"event_name":"Lead","event_time":1763600000,"user_data":{"em":["secret.person@example.com"]}}]}"#;
    let r = send(
        p.proxy,
        Req::post("graph.facebook.com", "/v19.0/1/events", ev),
    )
    .await;
    assert_eq!(r.status, 200, "enforced from the encrypted journal");
    assert_eq!(
        call(p.admin, "GET", "/v1/consent/PT-SECRET-2", &[], "")
            .await
            .0,
        404
    );
    kill_9(&mut p);
    // A wrong key refuses to start, names the key, and changes nothing.
    let before = listing(&dir.join("journal"));
    let config = dir.join("consentgate.yaml");
    let opts = ProxyOpts {
        consent_yaml: Some(file_consent_yaml(&dir, &with_key(&k2))),
        ..Default::default()
    };
    std::fs::write(
        &config,
        config_yaml(&dir, up.addr, &ca, &opts, free_port(), free_port()),
    )
    .unwrap();
    let (code, log) = run_expecting_failure(&dir, &config);
    assert_eq!(code, Some(1), "{log}");
    assert!(
        log.contains("consent.journal_key_file") && log.contains("wrong key"),
        "{log}"
    );
    assert!(!log.contains("SECRET"));
    let after = listing(&dir.join("journal"));
    assert_eq!(
        after.iter().find(|e| e.0 == "journal.jsonl"),
        before.iter().find(|e| e.0 == "journal.jsonl"),
        "journal untouched"
    );
    // Rotation: new key, the old one as previous; then the new key alone.
    let rotate = format!(
        "{}  journal_previous_key_file: {}\n",
        with_key(&k2),
        k1.display()
    );
    let mut p = restart(&dir, &up, &ca, file_consent_yaml(&dir, &rotate));
    assert!(std::fs::read_to_string(&p.log)
        .unwrap()
        .contains("rewritten under the configured key"));
    kill_9(&mut p);
    let p = restart(&dir, &up, &ca, file_consent_yaml(&dir, &with_key(&k2)));
    let (s, _, v) = call(p.admin, "GET", "/v1/consent/PT-SECRET-1", &[], "").await;
    assert_eq!((s, v["version"].as_u64()), (200, Some(2)));
    assert!(!journal_text(&dir).contains("SECRET"));
}
