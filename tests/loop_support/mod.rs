//! Helpers shared by the loop tests (SPEC §13: tests/loop_*.rs): the admin
//! API, the audit trail, metrics, signed webhook requests, keys.
#![allow(dead_code)]

use crate::common::*;
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub const TOKEN: &str = "example-ops-token";

/// One request on a fresh HTTP/1.1 connection: (status, headers, body bytes).
pub async fn raw(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, hyper::HeaderMap, Vec<u8>) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut b = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "hooks.example.org");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let req = b.body(Full::new(Bytes::from(body.to_vec()))).unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes().to_vec();
    (parts.status.as_u16(), parts.headers, bytes)
}

/// An admin-API call with the ops token: (status, JSON body).
pub async fn admin(p: &Proxy, method: &str, path: &str, body: &str) -> (u16, Value) {
    let (s, _, b) = raw(
        p.admin,
        method,
        path,
        &[
            ("authorization", &format!("Bearer {TOKEN}")),
            ("content-type", "application/json"),
        ],
        body.as_bytes(),
    )
    .await;
    (s, serde_json::from_slice(&b).unwrap_or(Value::Null))
}

pub async fn record(p: &Proxy, patient: &str) -> Value {
    let (s, v) = admin(p, "GET", &format!("/v1/consent/{patient}"), "").await;
    assert_eq!(s, 200, "GET {patient}: {v}");
    v
}

/// Every audit record of `dir`/audit, in order.
pub fn audit(dir: &Path) -> Vec<Value> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir.join("audit"))
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .collect();
    files.sort();
    files
        .iter()
        .flat_map(|f| {
            std::fs::read_to_string(f)
                .unwrap()
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Every audit file's bytes, for leak searches.
pub fn audit_bytes(dir: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir.join("audit")).unwrap().flatten() {
        if e.path().is_file() {
            out.extend(std::fs::read(e.path()).unwrap());
        }
    }
    out
}

/// The value of one metric series (`name{labels}` exactly as rendered), 0 if absent.
pub async fn metric(p: &Proxy, series: &str) -> f64 {
    let m = admin_get(p, "/metrics").await;
    let text = String::from_utf8_lossy(&m.body).to_string();
    text.lines()
        .find_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            (k == series).then(|| v.parse::<f64>().ok()).flatten()
        })
        .unwrap_or(0.0)
}

/// Poll `f` until it holds, up to `secs` seconds.
pub async fn eventually<F, Fut>(what: &str, secs: u64, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("not within {secs} s: {what}");
}

/// A 64-hex key file (AES-256-GCM keys, mode 0600).
pub fn write_key(dir: &Path, name: &str, byte: u8) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, hex::encode([byte; 32])).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// A consent snapshot of the given records (JSON lines).
pub fn snapshot(dir: &Path, records: &[Value]) -> PathBuf {
    let text: String = records.iter().map(|r| format!("{r}\n")).collect();
    write(dir, "consent.jsonl", &text)
}

/// Kill the process with SIGKILL (no shutdown path runs).
pub fn kill_9(p: &mut Proxy) {
    assert!(std::process::Command::new("kill")
        .args(["-9", &p.child.id().to_string()])
        .status()
        .unwrap()
        .success());
    let _ = p.child.wait();
}

/// Start the binary on a config text (`{PP}`/`{AP}` replaced by fresh ports)
/// and wait for ready.
pub fn start_with(dir: &Path, yaml: &str) -> Proxy {
    let (pp, ap) = (free_port(), free_port());
    let text = yaml
        .replace("{PP}", &pp.to_string())
        .replace("{AP}", &ap.to_string());
    let config = dir.join("consentgate.yaml");
    std::fs::write(&config, text).unwrap();
    spawn_proxy(dir, &config, pp, ap)
}

// ---- vendor signatures, computed the way each vendor documents them ----

fn hmac(alg: aws_lc_rs::hmac::Algorithm, key: &[u8], data: &[u8]) -> Vec<u8> {
    let k = aws_lc_rs::hmac::Key::new(alg, key);
    aws_lc_rs::hmac::sign(&k, data).as_ref().to_vec()
}

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// Twilio and Mandrill: base64 HMAC-SHA1 of the URL and the sorted fields.
pub fn url_and_sorted_fields_sig(key: &str, url: &str, fields: &[(&str, &str)]) -> String {
    let mut f = fields.to_vec();
    f.sort();
    let mut data = url.to_string();
    for (k, v) in f {
        data.push_str(k);
        data.push_str(v);
    }
    b64(&hmac(
        aws_lc_rs::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY,
        key.as_bytes(),
        data.as_bytes(),
    ))
}

pub fn form(fields: &[(&str, &str)]) -> Vec<u8> {
    form_urlencoded::Serializer::new(String::new())
        .extend_pairs(fields)
        .finish()
        .into_bytes()
}

/// HubSpot v3: base64 HMAC-SHA256 of method, URL, body and timestamp.
pub fn hubspot_sig(secret: &str, url: &str, body: &[u8], ts: &str) -> String {
    let mut m = format!("POST{url}").into_bytes();
    m.extend_from_slice(body);
    m.extend_from_slice(ts.as_bytes());
    b64(&hmac(aws_lc_rs::hmac::HMAC_SHA256, secret.as_bytes(), &m))
}

/// Klaviyo: hex HMAC-SHA256 of the body followed by the timestamp.
pub fn klaviyo_sig(secret: &str, body: &[u8], ts: &str) -> String {
    let mut m = body.to_vec();
    m.extend_from_slice(ts.as_bytes());
    hex::encode(hmac(aws_lc_rs::hmac::HMAC_SHA256, secret.as_bytes(), &m))
}

/// A SendGrid-style ECDSA P-256 key: (signer, base64 DER SubjectPublicKeyInfo).
pub fn sendgrid_key() -> (aws_lc_rs::signature::EcdsaKeyPair, String) {
    use aws_lc_rs::signature::KeyPair;
    let kp = aws_lc_rs::signature::EcdsaKeyPair::generate(
        &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
    )
    .unwrap();
    let mut spki = vec![
        0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08,
        0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
    ];
    spki.extend_from_slice(kp.public_key().as_ref());
    (kp, b64(&spki))
}

/// SendGrid: base64 DER ECDSA signature of timestamp + body.
pub fn sendgrid_sig(kp: &aws_lc_rs::signature::EcdsaKeyPair, ts: &str, body: &[u8]) -> String {
    let mut m = ts.as_bytes().to_vec();
    m.extend_from_slice(body);
    let sig = kp.sign(&aws_lc_rs::rand::SystemRandom::new(), &m).unwrap();
    b64(sig.as_ref())
}

pub fn now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

// ---- PostgreSQL: a schema of the test's own in database `test` ----

pub const PG: &str = "127.0.0.1:5432";

pub struct Db {
    pub schema: String,
}

impl Db {
    pub fn new(tag: &str) -> Db {
        let schema = format!(
            "cgl_{tag}_{}_{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos()
        );
        sql_blocking(&format!("CREATE SCHEMA {schema}"));
        Db { schema }
    }

    pub fn url(&self, app: &str) -> String {
        format!(
            "postgres://postgres@{PG}/test?application_name={app}&options=-c%20search_path%3D{}",
            self.schema
        )
    }

    pub async fn client(&self) -> tokio_postgres::Client {
        let (c, conn) = tokio_postgres::connect(&self.url("cgl-check"), tokio_postgres::NoTls)
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
pub fn sql_blocking(sql: &str) {
    let sql = sql.to_string();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (c, conn) = tokio_postgres::connect(
                &format!("postgres://postgres@{PG}/test"),
                tokio_postgres::NoTls,
            )
            .await
            .unwrap();
            tokio::spawn(conn);
            c.batch_execute(&sql).await.unwrap();
        })
    })
    .join()
    .unwrap();
}

/// `consentgate <args> --config CONFIG`: (success, stdout, stderr).
pub fn cli(dir: &Path, config: &Path, args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_consentgate"))
        .args(args)
        .arg("--config")
        .arg(config)
        .current_dir(dir)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}
