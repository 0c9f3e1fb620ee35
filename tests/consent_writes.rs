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
