//! Fleet fan-out over NATS JetStream KV (issue 19): one owner replicating
//! into a bucket, N watchers following it, all real consentgate processes.
//!
//! ```sh
//! bench_kit fanout --bin target/release/consentgate --work DIR \
//!     [--nats 127.0.0.1:4222] [--watchers 100] [--patients 100000] [--changes 200] [--big 1000000]
//! ```
//!
//! 1. Writes `--patients` synthetic records to a file, makes a bucket (its
//!    stream, history 1, as docs/FLEET.md asks) and starts the owner
//!    (`source: file`, `replicate_to: nats`); times its first replication.
//! 2. Starts `--watchers` watchers (`source: nats`) at once and times until
//!    every one answers `/readyz` 200; then one more, alone: a new watcher's
//!    bootstrap beside a running fleet.
//! 3. `--changes` PATCHes on the owner, 100 ms apart. The time a PATCH is sent
//!    is its start; each watcher logs (debug) the revision it applied, with a
//!    microsecond timestamp; the bench learns each change's revision from its
//!    own watch of the bucket. Propagation = applied - sent, for the last of
//!    the watchers (the fleet) and for every (watcher, change).
//! 4. NATS server CPU (utime+stime from /proc) over the bootstrap and the
//!    changes, and its RSS.
//! 5. With `--big M`: a bucket of M patients (replicated by an owner), then a
//!    watcher's bootstrap time and RSS (VmRSS, VmHWM) alone.
//!
//! Prints the results as lines `scripts/fanout-bench` copies into docs.

use async_nats::jetstream::{self, kv, stream};
use futures_util::StreamExt;
use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const TOKEN: &str = "example-ops-token";

struct Args {
    bin: PathBuf,
    work: PathBuf,
    nats: String,
    watchers: usize,
    patients: usize,
    changes: usize,
    big: usize,
}

fn args() -> Args {
    let mut a = Args {
        bin: PathBuf::new(),
        work: PathBuf::new(),
        nats: "127.0.0.1:4222".into(),
        watchers: 100,
        patients: 100_000,
        changes: 200,
        big: 0,
    };
    let mut it = std::env::args().skip(2);
    while let Some(k) = it.next() {
        let v = it.next().unwrap_or_else(|| panic!("{k} needs a value"));
        let n = || {
            v.parse::<usize>()
                .unwrap_or_else(|_| panic!("{k}: a number"))
        };
        match k.as_str() {
            "--bin" => a.bin = PathBuf::from(&v),
            "--work" => a.work = PathBuf::from(&v),
            "--nats" => a.nats = v.clone(),
            "--watchers" => a.watchers = n(),
            "--patients" => a.patients = n(),
            "--changes" => a.changes = n(),
            "--big" => a.big = n(),
            _ => panic!("unknown argument {k}"),
        }
    }
    assert!(
        a.bin.is_file() && !a.work.as_os_str().is_empty(),
        "--bin (a consentgate binary) and --work are required"
    );
    a
}

// ---------------------------------------------------------------- processes

/// A consentgate process, killed when dropped.
struct Proc {
    child: Child,
    admin: String,
    log: PathBuf,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free port below the kernel's ephemeral range (32768 and up): a port the
/// kernel picked for us could be given again, to one of the hundreds of
/// outgoing NATS connections, before the watcher binds it.
fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let base = 20_000 + (std::process::id() % 20) as u16 * 500;
    loop {
        let p = base + NEXT.fetch_add(1, Ordering::Relaxed) % 500;
        if std::net::TcpListener::bind(("127.0.0.1", p)).is_ok() {
            return p;
        }
    }
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Start one consentgate with `consent` as its `consent:` section.
fn spawn(a: &Args, name: &str, consent: &str, rust_log: &str) -> Proc {
    let dir = a.work.join(name);
    std::fs::create_dir_all(&dir).expect("mkdir");
    let (pp, ap) = (free_port(), free_port());
    let cfg = format!(
        "listen: {{ proxy: \"127.0.0.1:{pp}\", admin: \"127.0.0.1:{ap}\" }}\n\
         interception: {{ ca_cert: {d}/ca.pem, ca_key: {d}/ca-key.pem }}\n\
         {consent}\
         admin: {{ tokens_file: {tokens} }}\n\
         audit: {{ path: {d}/audit }}\n\
         log: {{ level: warn }}\n",
        d = dir.display(),
        tokens = repo().join("config/admin-tokens.example").display(),
    );
    std::fs::write(dir.join("consentgate.yaml"), cfg).expect("config");
    let log = dir.join("log");
    let child = Command::new(&a.bin)
        .args(["run", "--config"])
        .arg(dir.join("consentgate.yaml"))
        .env("RUST_LOG", rust_log)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("spawn consentgate");
    Proc {
        child,
        admin: format!("127.0.0.1:{ap}"),
        log,
    }
}

fn owner_consent(a: &Args, file: &Path, dir: &str, bucket: &str) -> String {
    format!(
        "consent:\n  source: file\n  file: {}\n  journal: {}/{dir}/journal\n  max_staleness: 5m\n  \
         replicate_to: nats\n  nats:\n    url: nats://{}\n    bucket: {bucket}\n",
        file.display(),
        a.work.display(),
        a.nats
    )
}

fn watcher_consent(a: &Args, bucket: &str) -> String {
    format!(
        "consent:\n  source: nats\n  max_staleness: 5m\n  nats:\n    url: nats://{}\n    bucket: {bucket}\n",
        a.nats
    )
}

/// One HTTP/1.1 request to an admin port; the status (0: no answer).
async fn http(addr: &str, method: &str, path: &str, body: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return 0;
    };
    let _ = s.set_nodelay(true);
    let req = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {TOKEN}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    if s.write_all(req.as_bytes()).await.is_err() {
        return 0;
    }
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    std::str::from_utf8(&out)
        .ok()
        .and_then(|t| t.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// Wait until every process answers `/readyz` 200; the time each took.
async fn all_ready(procs: &[&Proc], limit: Duration) -> Vec<Duration> {
    let t = Instant::now();
    let mut ready: Vec<Option<Duration>> = vec![None; procs.len()];
    while ready.iter().any(Option::is_none) {
        assert!(
            t.elapsed() < limit,
            "{} of {} not ready after {limit:?}",
            ready.iter().filter(|r| r.is_none()).count(),
            procs.len()
        );
        for (i, p) in procs.iter().enumerate() {
            if ready[i].is_none() && http(&p.admin, "GET", "/readyz", "").await == 200 {
                ready[i] = Some(t.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ready.into_iter().flatten().collect()
}

/// (VmRSS, VmHWM) in MiB.
fn rss_mib(pid: u32) -> (f64, f64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// utime + stime of a process, in seconds (clock ticks of 1/100 s).
fn cpu_s(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = s.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (tick(11) + tick(12)) / 100.0
}

fn nats_server_pid() -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
        (comm.trim() == "nats-server").then_some(pid)
    })
}

// ---------------------------------------------------------------- data

fn write_patients(path: &Path, n: usize) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).expect("patients file"));
    for i in 0..n {
        writeln!(
            f,
            "{{\"patient_id\":\"P-{i:08}\",\"identifiers\":{{\"emails\":[\"patient.{i}@example.org\"],\
             \"phones\":[\"+1 (415) {:03}-{:04}\"],\"external_ids\":[\"crm:{i:010}\"]}},\
             \"jurisdiction\":\"US-CA\",\"categories\":{{\"advertising\":\"granted\",\
             \"marketing_email\":\"granted\",\"marketing_sms\":\"granted\",\"phone_outreach\":\"granted\",\
             \"appointment_reminders\":\"granted\"}},\"updated_at\":\"2026-11-20T10:00:00Z\",\
             \"source\":\"fanout-bench\"}}",
            (i / 10_000) % 1000,
            i % 10_000
        )
        .expect("write");
    }
    f.flush().expect("flush");
}

/// A fresh bucket, made as its stream (nats-server 2.9 lacks what
/// `create_key_value` asks first).
async fn make_bucket(js: &jetstream::Context, name: &str) -> kv::Store {
    let _ = js.delete_stream(format!("KV_{name}")).await;
    js.create_stream(stream::Config {
        name: format!("KV_{name}"),
        subjects: vec![format!("$KV.{name}.>")],
        max_messages_per_subject: 1,
        max_message_size: 64 * 1024,
        discard: stream::DiscardPolicy::New,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .expect("create the bucket's stream");
    js.get_key_value(name).await.expect("bucket")
}

async fn bucket_messages(js: &jetstream::Context, name: &str) -> u64 {
    match js.get_stream(format!("KV_{name}")).await {
        Ok(mut s) => s.info().await.map(|i| i.state.messages).unwrap_or(0),
        Err(_) => 0,
    }
}

/// Start an owner over `n` patients and wait until the bucket holds them all.
async fn owner(a: &Args, js: &jetstream::Context, name: &str, bucket: &str, n: usize) -> Proc {
    let file = a.work.join(format!("{name}.jsonl"));
    write_patients(&file, n);
    let t = Instant::now();
    let p = spawn(a, name, &owner_consent(a, &file, name, bucket), "warn");
    all_ready(&[&p], Duration::from_secs(300)).await;
    let ready = t.elapsed();
    while bucket_messages(js, bucket).await < n as u64 {
        assert!(
            t.elapsed() < Duration::from_secs(900),
            "owner replication stalled"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "{name}: {n} patients from a file, ready {:.2} s, bucket holds them all after {:.2} s",
        ready.as_secs_f64(),
        t.elapsed().as_secs_f64()
    );
    p
}

fn quantile(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1]
}

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// (revision → applied at, µs since the epoch) from one watcher's log.
fn applied(log: &Path) -> HashMap<u64, i64> {
    let mut out = HashMap::new();
    let Ok(f) = std::fs::File::open(log) else {
        return out;
    };
    for line in std::io::BufReader::new(f).lines().map_while(Result::ok) {
        if !line.contains("consent change applied") {
            continue;
        }
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        let rev = v.get("revision").and_then(serde_json::Value::as_u64);
        let ts = v
            .get("timestamp")
            .and_then(|t| t.as_str())
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.timestamp_micros());
        if let (Some(r), Some(t)) = (rev, ts) {
            out.insert(r, t);
        }
    }
    out
}

fn key_of(id: &str) -> String {
    use base64::Engine as _;
    format!(
        "p.{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(id)
    )
}

// ---------------------------------------------------------------- phases

/// The changes: (revision, sent at µs) for each PATCH.
async fn changes(a: &Args, own: &Proc, store: &kv::Store) -> Vec<(u64, i64)> {
    let mut watch = store.watch_all().await.expect("bench watch");
    let mut out = Vec::with_capacity(a.changes);
    for i in 0..a.changes {
        let id = format!("P-{:08}", (i * 7919) % a.patients);
        let value = if (i / a.patients).is_multiple_of(2) {
            "denied"
        } else {
            "granted"
        };
        let sent = now_us();
        let status = http(
            &own.admin,
            "PATCH",
            &format!("/v1/consent/{id}"),
            &format!("{{\"categories\":{{\"marketing_sms\":\"{value}\"}}}}"),
        )
        .await;
        assert_eq!(status, 200, "PATCH {id} on the owner");
        let key = key_of(&id);
        let rev = loop {
            let e = tokio::time::timeout(Duration::from_secs(10), watch.next())
                .await
                .expect("the owner replicated the change within 10 s")
                .expect("bench watch ended")
                .expect("bench watch");
            if e.key == key {
                break e.revision;
            }
        };
        out.push((rev, sent));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    out
}

fn report_propagation(sent: &[(u64, i64)], logs: &[HashMap<u64, i64>]) {
    let mut fleet = Vec::new();
    let mut each = Vec::new();
    let mut missing = 0usize;
    for (rev, t0) in sent {
        let mut last = f64::NAN;
        for l in logs {
            match l.get(rev) {
                Some(t) => {
                    let ms = (t - t0) as f64 / 1000.0;
                    each.push(ms);
                    last = if last.is_nan() { ms } else { last.max(ms) };
                }
                None => missing += 1,
            }
        }
        fleet.push(last);
    }
    let n = fleet.len();
    println!(
        "propagation PATCH on the owner -> applied by the last of {} watchers, over {n} changes: \
         p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        logs.len(),
        quantile(&mut fleet.clone(), 0.5),
        quantile(&mut fleet.clone(), 0.99),
        quantile(&mut fleet, 1.0),
    );
    println!(
        "propagation per watcher ({} samples): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; \
         (watcher, change) pairs not applied: {missing}",
        each.len(),
        quantile(&mut each.clone(), 0.5),
        quantile(&mut each.clone(), 0.99),
        quantile(&mut each, 1.0),
    );
}

async fn fleet(a: &Args, js: &jetstream::Context, nats_pid: Option<u32>) {
    let bucket = format!("fanout_{}", std::process::id());
    let store = make_bucket(js, &bucket).await;
    let own = owner(a, js, "owner", &bucket, a.patients).await;
    let cpu = || nats_pid.map(cpu_s).unwrap_or(f64::NAN);

    let (c0, t) = (cpu(), Instant::now());
    let log = "warn,consentgate::consent::nats=debug";
    let watchers: Vec<Proc> = (0..a.watchers)
        .map(|i| spawn(a, &format!("w{i:03}"), &watcher_consent(a, &bucket), log))
        .collect();
    let mut ready = all_ready(
        &watchers.iter().collect::<Vec<_>>(),
        Duration::from_secs(600),
    )
    .await
    .into_iter()
    .map(|d| d.as_secs_f64())
    .collect::<Vec<_>>();
    let wall = t.elapsed().as_secs_f64();
    let nats_boot = cpu() - c0;
    println!(
        "{} watchers started at once over {} patients: all ready in {wall:.2} s \
         (per watcher p50 {:.2} s, max {:.2} s); nats-server CPU {nats_boot:.1} s",
        a.watchers,
        a.patients,
        quantile(&mut ready.clone(), 0.5),
        quantile(&mut ready, 1.0),
    );
    let rss: Vec<f64> = watchers.iter().map(|w| rss_mib(w.child.id()).0).collect();
    println!(
        "watcher RSS over {} patients: mean {:.1} MiB",
        a.patients,
        rss.iter().sum::<f64>() / rss.len().max(1) as f64
    );

    let mut boots = Vec::new();
    for i in 0..3 {
        let t = Instant::now();
        let p = spawn(a, &format!("late{i}"), &watcher_consent(a, &bucket), "warn");
        all_ready(&[&p], Duration::from_secs(120)).await;
        boots.push(t.elapsed().as_secs_f64());
    }
    println!(
        "a new watcher beside the running fleet, over {} patients: process start to /readyz 200 \
         {:.2} s (median of 3; {:.2}-{:.2})",
        a.patients,
        quantile(&mut boots.clone(), 0.5),
        quantile(&mut boots.clone(), 0.0),
        quantile(&mut boots, 1.0),
    );

    let (c0, t) = (cpu(), Instant::now());
    let sent = changes(a, &own, &store).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let nats_changes = cpu() - c0;
    let secs = t.elapsed().as_secs_f64();
    let logs: Vec<_> = watchers.iter().map(|w| applied(&w.log)).collect();
    report_propagation(&sent, &logs);
    let (rss, hwm) = nats_pid.map(rss_mib).unwrap_or((f64::NAN, f64::NAN));
    println!(
        "nats-server: CPU {:.1} % of one core during the changes ({nats_changes:.2} s over {secs:.1} s, \
         {} watch consumers idle-heartbeating); RSS {rss:.0} MiB (peak {hwm:.0} MiB)",
        100.0 * nats_changes / secs,
        a.watchers
    );
    drop(watchers);
    drop(own);
    let _ = js.delete_stream(format!("KV_{bucket}")).await;
}

async fn big(a: &Args, js: &jetstream::Context) {
    let bucket = format!("fanout_big_{}", std::process::id());
    make_bucket(js, &bucket).await;
    let own = owner(a, js, "owner-big", &bucket, a.big).await;
    drop(own);
    let t = Instant::now();
    let p = spawn(a, "big-watcher", &watcher_consent(a, &bucket), "warn");
    all_ready(&[&p], Duration::from_secs(300)).await;
    let secs = t.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (rss, hwm) = rss_mib(p.child.id());
    println!(
        "one watcher over {} patients: process start to /readyz 200 {secs:.2} s; \
         RSS {rss:.0} MiB (peak {hwm:.0} MiB)",
        a.big
    );
    drop(p);
    let _ = js.delete_stream(format!("KV_{bucket}")).await;
}

pub(crate) fn main() {
    let a = args();
    std::fs::create_dir_all(&a.work).expect("work directory");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let c = async_nats::connect(&a.nats)
            .await
            .expect("nats-server -js on --nats");
        let js = jetstream::new(c);
        let pid = nats_server_pid();
        if a.watchers > 0 {
            fleet(&a, &js, pid).await;
        }
        if a.big > 0 {
            big(&a, &js).await;
        }
    });
}
