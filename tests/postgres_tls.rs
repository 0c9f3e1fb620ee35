//! Issue 14 acceptance 7: the PostgreSQL consent source over TLS, against a
//! PostgreSQL cluster this test creates and starts on a port of its own, with
//! a certificate the test makes (rcgen). The cluster takes only TLS (plain TCP
//! is rejected by pg_hba) and SCRAM passwords, so a success is encrypted and
//! authenticated with channel binding. It needs only the PostgreSQL server
//! binaries (/usr/lib/postgresql/*/bin), as on a Debian machine with the
//! `postgresql` package: nothing set up by hand.

mod common;
use common::*;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const TOKEN: &str = "example-preference-center-token";
const PASSWORD: &str = "tls-test-password";

/// The newest installed PostgreSQL server binaries.
fn pg_bin(name: &str) -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL server binaries under /usr/lib/postgresql")
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("initdb").exists())
        .collect();
    dirs.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    dirs.last().expect("an initdb").join(name)
}

fn is_root() -> bool {
    let out = Command::new("id").arg("-u").output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim() == "0"
}

/// A command run as the `postgres` user (initdb refuses root).
fn as_postgres(bin: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin);
        c
    } else {
        Command::new(bin)
    }
}

fn chown_postgres(p: &Path) {
    if is_root() {
        let ok = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(p)
            .status()
            .unwrap()
            .success();
        assert!(ok, "chown {}", p.display());
    }
}

fn run_ok(mut c: Command, what: &str) {
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The certificates of the test: a CA, the server's certificate for
/// `localhost` only, and an unrelated CA.
struct Certs {
    ca_pem: PathBuf,
    other_ca_pem: PathBuf,
}

fn make_ca(cn: &str) -> (rcgen::Certificate, rcgen::Issuer<'static, rcgen::KeyPair>) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let cert = params.self_signed(&key).unwrap();
    (cert, rcgen::Issuer::new(params, key))
}

fn make_certs(dir: &Path, server_dir: &Path) -> Certs {
    let (ca, issuer) = make_ca("consentgate test database CA");
    let (other, _) = make_ca("some other CA");
    let key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    std::fs::write(server_dir.join("server.crt"), leaf.pem()).unwrap();
    std::fs::write(server_dir.join("server.key"), key.serialize_pem()).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        server_dir.join("server.key"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let ca_pem = dir.join("db-ca.pem");
    std::fs::write(&ca_pem, ca.pem()).unwrap();
    let other_ca_pem = dir.join("other-ca.pem");
    std::fs::write(&other_ca_pem, other.pem()).unwrap();
    Certs {
        ca_pem,
        other_ca_pem,
    }
}

/// A PostgreSQL cluster of the test's own: TLS only, SCRAM passwords.
struct Cluster {
    root: tempfile::TempDir,
    port: u16,
}

impl Cluster {
    fn data(&self) -> PathBuf {
        self.root.path().join("data")
    }

    fn start(certs_dir: &Path) -> (Cluster, Certs) {
        // Under /tmp: the postgres user must be able to reach it.
        let root = tempfile::Builder::new()
            .prefix("cg-pgtls.")
            .tempdir_in("/tmp")
            .unwrap();
        let server_dir = root.path().join("server");
        std::fs::create_dir_all(&server_dir).unwrap();
        std::fs::create_dir_all(root.path().join("sock")).unwrap();
        let certs = make_certs(certs_dir, &server_dir);
        chown_postgres(root.path());
        let port = free_port();
        let c = Cluster { root, port };
        let mut initdb = as_postgres(&pg_bin("initdb"));
        initdb
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
            .arg(c.data());
        run_ok(initdb, "initdb");
        let server = c.root.path().join("server");
        let conf = format!(
            "\nlisten_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{sock}'\n\
             ssl = on\nssl_cert_file = '{server}/server.crt'\nssl_key_file = '{server}/server.key'\n\
             password_encryption = 'scram-sha-256'\nfsync = off\n",
            sock = c.root.path().join("sock").display(),
            server = server.display(),
        );
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(c.data().join("postgresql.conf"))
            .unwrap();
        std::io::Write::write_all(&mut f, conf.as_bytes()).unwrap();
        std::fs::write(
            c.data().join("pg_hba.conf"),
            "local all all trust\n\
             hostssl all all 127.0.0.1/32 scram-sha-256\n\
             host all all 127.0.0.1/32 reject\n",
        )
        .unwrap();
        chown_postgres(&c.data());
        let mut start = as_postgres(&pg_bin("pg_ctl"));
        start
            .args(["-w", "-t", "60", "-D"])
            .arg(c.data())
            .arg("-l")
            .arg(c.root.path().join("server.log"))
            .arg("start");
        let out = start.output().unwrap();
        assert!(
            out.status.success(),
            "pg_ctl start: {}{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(c.root.path().join("server.log")).unwrap_or_default()
        );
        (c, certs)
    }

    /// SQL as the superuser over the Unix socket (trust).
    async fn sql(&self, sql: &str) -> Vec<tokio_postgres::Row> {
        let (client, conn) = tokio_postgres::Config::new()
            .host_path(self.root.path().join("sock"))
            .port(self.port)
            .user("postgres")
            .dbname("postgres")
            .connect(tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        let mut rows = Vec::new();
        for stmt in sql.split(';').filter(|s| !s.trim().is_empty()) {
            rows = client.query(stmt, &[]).await.unwrap();
        }
        rows
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let mut stop = as_postgres(&pg_bin("pg_ctl"));
        stop.args(["-m", "immediate", "-D"])
            .arg(self.data())
            .arg("stop");
        let _ = stop.output();
    }
}

fn consent_yaml(url: &str, tls_lines: &str, password_file: &Path) -> String {
    format!(
        "consent:\n  source: postgres\n  max_staleness: 5m\n  postgres:\n    url: \"{url}\"\n    password_file: {}\n{tls_lines}",
        password_file.display()
    )
}

/// Write a config; run `db migrate` on it. Returns the config path, the ports
/// and the migrate result (exit code, stderr).
fn configure(
    dir: &Path,
    up: &Upstream,
    ca: &TestCa,
    consent: String,
) -> (PathBuf, u16, u16, Option<i32>, String) {
    let (pp, ap) = (free_port(), free_port());
    let opts = ProxyOpts {
        consent_yaml: Some(consent),
        ..Default::default()
    };
    let config = dir.join("consentgate.yaml");
    std::fs::write(&config, config_yaml(dir, up.addr, ca, &opts, pp, ap)).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_consentgate"))
        .args(["db", "migrate", "--config"])
        .arg(&config)
        .current_dir(dir)
        .output()
        .unwrap();
    (
        config,
        pp,
        ap,
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

fn admin(method: &'static str, path: &str, body: &str) -> Req {
    let mut r = Req::post("admin", path, body.to_string());
    r.method = method;
    r.header("authorization", &format!("Bearer {TOKEN}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_source_over_tls_verifies_the_server_and_refuses_a_wrong_ca() {
    let dir = test_dir("pg-tls");
    let ca = test_ca(&dir.join("upstream"), VENDOR_HOSTS);
    let up = start_upstream(&ca).await;
    let (cluster, certs) = Cluster::start(&dir);
    cluster
        .sql(&format!(
            "CREATE ROLE cg LOGIN PASSWORD '{PASSWORD}'; CREATE DATABASE cg OWNER cg"
        ))
        .await;
    let pw = dir.join("pg-password");
    std::fs::write(&pw, format!("{PASSWORD}\n")).unwrap();
    let port = cluster.port;

    // verify-full with the right CA, by host name; channel binding required,
    // so SCRAM must bind to the certificate the server presented.
    let url = format!(
        "postgres://cg@localhost:{port}/cg?application_name=cg-tls-verify&channel_binding=require"
    );
    let tls = format!(
        "    sslmode: verify-full\n    ca_file: {}\n",
        certs.ca_pem.display()
    );
    let (config, pp, ap, code, err) = configure(&dir, &up, &ca, consent_yaml(&url, &tls, &pw));
    assert_eq!(code, Some(0), "db migrate over verify-full: {err}");
    let p = spawn_proxy(&dir, &config, pp, ap);
    let r = send(
        p.admin,
        admin(
            "PUT",
            "/v1/consent/TLS-1",
            &json!({"categories": {"advertising": "denied"}}).to_string(),
        ),
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    // Every connection of consentgate to the database is encrypted.
    let rows = cluster
        .sql(
            "SELECT s.ssl, count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.application_name = 'cg-tls-verify' GROUP BY s.ssl",
        )
        .await;
    let seen: Vec<(bool, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert!(
        seen.len() == 1 && seen[0].0 && seen[0].1 >= 2,
        "feed and writer connections over TLS: {seen:?}"
    );
    // The feed (over TLS) sees a change made in the database.
    let (c, conn) = tokio_postgres::Config::new()
        .host_path(cluster.root.path().join("sock"))
        .port(port)
        .user("cg")
        .dbname("cg")
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    c.batch_execute(
        "UPDATE consentgate_consent SET record = record || '{\"gpc\":true}' WHERE patient_id = 'TLS-1'",
    )
    .await
    .unwrap();
    let t = Instant::now();
    loop {
        let g = send(p.admin, admin("GET", "/v1/consent/TLS-1", "")).await;
        if g.status == 200 && g.json()["gpc"] == true {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "feed over TLS");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(p);

    // A CA that did not sign the server's certificate: refused.
    let tls_wrong = format!(
        "    sslmode: verify-full\n    ca_file: {}\n",
        certs.other_ca_pem.display()
    );
    let (config, _, _, code, err) = configure(&dir, &up, &ca, consent_yaml(&url, &tls_wrong, &pw));
    assert_eq!(code, Some(1), "db migrate with a wrong CA must fail");
    assert!(err.to_lowercase().contains("certificate"), "{err}");
    // `run` starts (the database may come back) but never loads nor gets ready.
    let log = dir.join("wrong-ca.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_consentgate"))
        .args(["run", "--config"])
        .arg(&config)
        .current_dir(&dir)
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let t = Instant::now();
    let mut refused = false;
    while t.elapsed() < Duration::from_secs(10) {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("consent database unavailable")
            && text.to_lowercase().contains("certificate")
        {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        refused,
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );

    // verify-full checks the host name: the certificate names localhost, not 127.0.0.1.
    let by_ip = format!("postgres://cg@127.0.0.1:{port}/cg?application_name=cg-tls-ip");
    let (_, _, _, code, err) = configure(&dir, &up, &ca, consent_yaml(&by_ip, &tls, &pw));
    assert_eq!(code, Some(1), "host name mismatch must fail");
    assert!(err.to_lowercase().contains("certificate"), "{err}");

    // require: encrypted without verifying (any CA, any name), as libpq.
    let req_url = format!(
        "postgres://cg@127.0.0.1:{port}/cg?application_name=cg-tls-require&sslmode=require"
    );
    let (config, pp, ap, code, err) = configure(&dir, &up, &ca, consent_yaml(&req_url, "", &pw));
    assert_eq!(code, Some(0), "db migrate over require: {err}");
    let p = spawn_proxy(&dir, &config, pp, ap);
    let g = send(p.admin, admin("GET", "/v1/consent/TLS-1", "")).await;
    assert_eq!(g.status, 200);
    let rows = cluster
        .sql(
            "SELECT bool_and(s.ssl) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.application_name = 'cg-tls-require'",
        )
        .await;
    assert_eq!(rows[0].get::<_, Option<bool>>(0), Some(true));

    // And disable is refused by this server (no plain TCP): TLS was real above.
    let plain = format!("postgres://cg@127.0.0.1:{port}/cg?sslmode=disable");
    let (_, _, _, code, _) = configure(&dir, &up, &ca, consent_yaml(&plain, "", &pw));
    assert_eq!(code, Some(1));
}
