//! Issue 19: a fleet follows one source through a NATS JetStream KV bucket
//! (SPEC §14). Against the real server on 127.0.0.1:4222 (`nats-server -js`,
//! started by scripts/ensure-services); each test has a bucket of its own.

mod common;
use async_nats::jetstream::kv;
use base64::Engine as _;
use common::*;
use futures_util::StreamExt;
use serde_json::json;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

const NATS: &str = "127.0.0.1:4222";
const TOKEN: &str = "example-preference-center-token";

fn key_of(id: &str) -> String {
    format!(
        "p.{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(id)
    )
}

/// A fresh bucket (history 1, as docs/FLEET.md asks) named for this test run.
/// Made as its stream (what `nats kv add` makes): `create_key_value` first
/// queries account fields this server (2.9) does not send.
async fn bucket(tag: &str) -> (String, kv::Store) {
    use async_nats::jetstream::stream;
    let name = format!("cgt_{tag}_{}_{}", std::process::id(), rand::random::<u32>());
    let c = async_nats::connect(NATS)
        .await
        .expect("nats-server -js on 4222");
    let js = async_nats::jetstream::new(c);
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
    .unwrap();
    let store = js.get_key_value(&name).await.unwrap();
    (name, store)
}

async fn drop_bucket(name: &str) {
    if let Ok(c) = async_nats::connect(NATS).await {
        let _ = async_nats::jetstream::new(c).delete_key_value(name).await;
    }
}

/// Current values by key (deleted keys left out).
async fn contents(s: &kv::Store) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut keys = s.keys().await.unwrap();
    while let Some(k) = keys.next().await {
        let k = k.unwrap();
        if let Some(v) = s.get(&k).await.unwrap() {
            out.insert(k, v.to_vec());
        }
    }
    out
}

fn owner_yaml(dir: &Path, bucket: &str) -> String {
    format!(
        "consent:\n  source: file\n  file: {file}\n  journal: {dir}/journal\n  max_staleness: 5m\n  \
         replicate_to: nats\n  nats:\n    url: nats://{NATS}\n    bucket: {bucket}\n",
        file = repo().join("config/consent.example.jsonl").display(),
        dir = dir.display(),
    )
}

fn watcher_yaml(url: &str, bucket: &str, max_staleness: &str) -> String {
    format!(
        "consent:\n  source: nats\n  max_staleness: {max_staleness}\n  nats:\n    url: {url}\n    bucket: {bucket}\n"
    )
}

fn start(up: &Upstream, ca: &TestCa, name: &str, consent: impl Fn(&Path) -> String) -> Proxy {
    let dir = test_dir(name);
    start_proxy(
        &dir,
        up,
        ca,
        ProxyOpts {
            consent_yaml: Some(consent(&dir)),
            ..Default::default()
        },
    )
}

fn admin(method: &'static str, path: &str, body: &str) -> Req {
    let mut r = Req::post("admin", path, body.to_string());
    r.method = method;
    r.header("authorization", &format!("Bearer {TOKEN}"))
}

/// A marketing SMS for patient `id` (named by `X-Patient-Id`, sent to `phone`).
fn sms(id: &str, phone: &str) -> Req {
    let form = form_urlencoded::Serializer::new(String::new())
        .append_pair("To", phone)
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

/// Every fixture patient and a phone to text (their own where they have one).
fn fixture() -> Vec<(String, String)> {
    std::fs::read_to_string(repo().join("config/consent.example.jsonl"))
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let id = v["patient_id"].as_str().unwrap().to_string();
            let phone = v["identifiers"]["phones"]
                .get(0)
                .and_then(|p| p.as_str())
                .unwrap_or("+14155559000")
                .to_string();
            (id, phone)
        })
        .collect()
}

/// Status, decision, body (its per-request id left out) and what reached the
/// upstream (if anything) for one request.
async fn outcome(p: &Proxy, up: &Upstream, req: Req) -> (u16, String, String, Option<Vec<u8>>) {
    up.clear();
    let r = send(p.proxy, req).await;
    let body = match serde_json::from_slice::<serde_json::Value>(&r.body) {
        Ok(mut v) => {
            strip_ids(&mut v);
            v.to_string()
        }
        Err(_) => String::from_utf8_lossy(&r.body).to_string(),
    };
    let body = without_request_id(&body);
    let sent = (up.count() > 0).then(|| up.last().body.clone());
    (r.status, r.decision().to_string(), body, sent)
}

/// `[request_id <hex>]` inside a message, which differs per request.
fn without_request_id(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find("[request_id ") {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        rest = rest.find(']').map_or("", |j| &rest[j + 1..]);
    }
    out.push_str(rest);
    out
}

fn strip_ids(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(m) => {
            for k in ["request_id", "id", "more_info"] {
                m.remove(k);
            }
            m.values_mut().for_each(strip_ids);
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(strip_ids),
        _ => {}
    }
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

async fn has_record(p: &Proxy, id: &str) -> bool {
    let r = send(p.admin, admin("GET", &format!("/v1/consent/{id}"), "")).await;
    match r.status {
        200 => true,
        404 => false,
        s => panic!("GET {id}: {s}"),
    }
}

/// Wait until the owner has replicated the whole fixture.
async fn wait_replicated(s: &kv::Store) {
    let n = fixture().len();
    wait_until("the owner's reconciliation", 15, || async {
        contents(s).await.len() == n
    })
    .await;
}

fn grant_sms(phone: &str) -> String {
    json!({"identifiers": {"phones": [phone]},
        "categories": {"marketing_sms": "granted", "appointment_reminders": "granted"},
        "updated_at": "2026-11-22T10:00:00Z", "source": "test"})
    .to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn a1_watchers_decide_as_the_owner_follow_writes_catch_up_and_deletes() {
    let (name, store) = bucket("a1").await;
    let dir = test_dir("fleet-a1");
    let ca = test_ca(&dir.join("upstream"), VENDOR_HOSTS);
    let up = start_upstream(&ca).await;
    let owner = start(&up, &ca, "fleet-a1-owner", |d| owner_yaml(d, &name));
    wait_replicated(&store).await;
    // Values are the stored records: hashes only, never a plaintext phone or email.
    for v in contents(&store).await.values() {
        let text = String::from_utf8_lossy(v);
        assert!(
            !text.contains("@example.com") && !text.contains("+1415"),
            "{text}"
        );
    }
    let url = format!("nats://{NATS}");
    let w1 = start(&up, &ca, "fleet-a1-w1", |_| watcher_yaml(&url, &name, "5m"));
    let w2 = start(&up, &ca, "fleet-a1-w2", |_| watcher_yaml(&url, &name, "5m"));

    // Every fixture patient is decided by both watchers as by the owner.
    let mut allowed = 0;
    for (id, phone) in fixture() {
        let o = outcome(&owner, &up, sms(&id, &phone)).await;
        allowed += usize::from(o.3.is_some());
        assert_eq!(
            outcome(&w1, &up, sms(&id, &phone)).await,
            o,
            "{id} on watcher 1"
        );
        assert_eq!(
            outcome(&w2, &up, sms(&id, &phone)).await,
            o,
            "{id} on watcher 2"
        );
    }
    assert!(
        allowed > 0 && allowed < fixture().len(),
        "a mix of decisions"
    );

    // A PUT on the owner's admin API is enforced by both watchers within 1 s.
    let (id, phone) = ("P-1007", "+14155550107");
    assert_eq!(send(w1.proxy, sms(id, phone)).await.status, 451);
    let r = send(
        owner.admin,
        admin("PUT", "/v1/consent/P-1007", &grant_sms(phone)),
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let t0 = Instant::now();
    wait_until("both watchers allow P-1007", 5, || async {
        send(w1.proxy, sms(id, phone)).await.status == 200
            && send(w2.proxy, sms(id, phone)).await.status == 200
    })
    .await;
    let took = t0.elapsed();
    assert!(took <= Duration::from_secs(1), "took {took:?}");
    assert!(metric(&w1, "consentgate_consent_propagation_seconds_count").await >= 1.0);

    // Many changes, then a watcher started afterwards catches up.
    for n in 0..150 {
        let phone = format!("+1415600{n:04}");
        let id = format!("F-{n}");
        let r = send(
            owner.admin,
            admin("PUT", &format!("/v1/consent/{id}"), &grant_sms(&phone)),
        )
        .await;
        assert_eq!(r.status, 200);
    }
    let w3 = start(&up, &ca, "fleet-a1-w3", |_| watcher_yaml(&url, &name, "5m"));
    for n in [0, 77, 149] {
        let (id, phone) = (format!("F-{n}"), format!("+1415600{n:04}"));
        assert!(has_record(&w3, &id).await, "{id} on the late watcher");
        assert_eq!(send(w3.proxy, sms(&id, &phone)).await.status, 200);
    }
    assert_eq!(
        metric(&w3, "consentgate_consent_records").await,
        (fixture().len() + 150) as f64
    );

    // A delete reaches every watcher.
    assert_eq!(
        send(owner.admin, admin("DELETE", "/v1/consent/P-1007", ""))
            .await
            .status,
        200
    );
    wait_until("the delete on every watcher", 5, || async {
        !has_record(&w1, "P-1007").await
            && !has_record(&w2, "P-1007").await
            && !has_record(&w3, "P-1007").await
    })
    .await;
    let o = outcome(&owner, &up, sms(id, phone)).await;
    assert_eq!(o.0, 451);
    for w in [&w1, &w2, &w3] {
        assert_eq!(outcome(w, &up, sms(id, phone)).await, o);
    }
    drop((owner, w1, w2, w3));
    drop_bucket(&name).await;
}

/// A TCP relay to NATS that the test can cut and restore.
struct Relay {
    addr: SocketAddr,
    up: tokio::sync::watch::Sender<bool>,
}

impl Relay {
    async fn start() -> Relay {
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
                    let Ok(mut nats) = tokio::net::TcpStream::connect(NATS).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut sock, &mut nats) => {}
                        _ = rx.wait_for(|up| !*up) => {}
                    }
                });
            }
        });
        Relay { addr, up }
    }

    fn set(&self, up: bool) {
        self.up.send_replace(up);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a2_cut_off_watcher_goes_down_fails_closed_then_applies_what_it_missed() {
    let (name, store) = bucket("a2").await;
    let dir = test_dir("fleet-a2");
    let ca = test_ca(&dir.join("upstream"), VENDOR_HOSTS);
    let up = start_upstream(&ca).await;
    let owner = start(&up, &ca, "fleet-a2-owner", |d| owner_yaml(d, &name));
    wait_replicated(&store).await;
    let relay = Relay::start().await;
    let url = format!("nats://{}", relay.addr);
    let w = start(&up, &ca, "fleet-a2-w", |_| watcher_yaml(&url, &name, "1s"));
    let (granted, gphone) = ("P-1001", "+14155550100");
    assert_eq!(send(w.proxy, sms(granted, gphone)).await.status, 200);
    assert_eq!(metric(&w, "consentgate_consent_source_up").await, 1.0);

    relay.set(false);
    wait_until("source down", 10, || async {
        metric(&w, "consentgate_consent_source_up").await == 0.0
    })
    .await;
    wait_until("stale: marketing fails closed", 10, || async {
        let r = send(w.proxy, sms(granted, gphone)).await;
        r.status == 451 && String::from_utf8_lossy(&r.body).contains("consent_stale")
    })
    .await;
    assert_eq!(admin_get(&w, "/readyz").await.status, 503);

    // Changes while the watcher is cut off.
    for n in 0..20 {
        let phone = format!("+1415700{n:04}");
        let r = send(
            owner.admin,
            admin("PUT", &format!("/v1/consent/G-{n}"), &grant_sms(&phone)),
        )
        .await;
        assert_eq!(r.status, 200);
    }
    assert_eq!(
        send(owner.admin, admin("DELETE", "/v1/consent/P-1003", ""))
            .await
            .status,
        200
    );
    let r = send(
        owner.admin,
        admin("PUT", "/v1/consent/P-1007", &grant_sms("+14155550107")),
    )
    .await;
    assert_eq!(r.status, 200);

    relay.set(true);
    wait_until("ready again", 30, || async {
        admin_get(&w, "/readyz").await.status == 200
    })
    .await;
    assert_eq!(metric(&w, "consentgate_consent_source_up").await, 1.0);
    for n in 0..20 {
        assert!(has_record(&w, &format!("G-{n}")).await, "G-{n}");
    }
    assert!(
        !has_record(&w, "P-1003").await,
        "the delete made while cut off"
    );
    assert_eq!(
        send(w.proxy, sms("P-1007", "+14155550107")).await.status,
        200
    );
    assert_eq!(send(w.proxy, sms("G-5", "+14157000005")).await.status, 200);
    assert_eq!(send(w.proxy, sms(granted, gphone)).await.status, 200);
    drop((owner, w));
    drop_bucket(&name).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a3_a_bucket_edited_behind_the_owners_back_is_repaired_on_restart() {
    let (name, store) = bucket("a3").await;
    let dir = test_dir("fleet-a3");
    let ca = test_ca(&dir.join("upstream"), VENDOR_HOSTS);
    let up = start_upstream(&ca).await;
    let owner = start(&up, &ca, "fleet-a3-owner", |d| owner_yaml(d, &name));
    wait_replicated(&store).await;
    let good = contents(&store).await;
    drop(owner);

    // Behind its back: a wrong value, a deleted key, a purged key, stray keys.
    let wrong = json!({"patient_id": "P-1002", "categories": {"marketing_sms": "granted",
        "advertising": "granted"}, "identifiers": {}, "updated_at": "2030-01-01T00:00:00Z"});
    store
        .put(key_of("P-1002"), wrong.to_string().into())
        .await
        .unwrap();
    store.delete(key_of("P-1001")).await.unwrap();
    store.purge(key_of("P-1004")).await.unwrap();
    store
        .put(key_of("Z-STRAY"), b"{}".to_vec().into())
        .await
        .unwrap();
    store.put("stray", b"x".to_vec().into()).await.unwrap();
    assert_ne!(contents(&store).await, good);

    // A watcher would follow the drift until the owner repairs it.
    let owner = start(&up, &ca, "fleet-a3-owner2", |d| owner_yaml(d, &name));
    wait_until("the bucket repaired", 15, || async {
        contents(&store).await == good
    })
    .await;
    let url = format!("nats://{NATS}");
    let w = start(&up, &ca, "fleet-a3-w", |_| watcher_yaml(&url, &name, "5m"));
    for (id, phone) in fixture() {
        let o = outcome(&owner, &up, sms(&id, &phone)).await;
        assert_eq!(outcome(&w, &up, sms(&id, &phone)).await, o, "{id}");
    }
    assert!(!has_record(&w, "Z-STRAY").await);
    drop((owner, w));
    drop_bucket(&name).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_writes_to_a_watcher_are_refused_with_405_reads_work() {
    let (name, store) = bucket("ro").await;
    let dir = test_dir("fleet-ro");
    let ca = test_ca(&dir.join("upstream"), VENDOR_HOSTS);
    let up = start_upstream(&ca).await;
    let owner = start(&up, &ca, "fleet-ro-owner", |d| owner_yaml(d, &name));
    wait_replicated(&store).await;
    let url = format!("nats://{NATS}");
    let w = start(&up, &ca, "fleet-ro-w", |_| {
        watcher_yaml(&url, &name, "5m")
            + "    owner_admin_url: https://consentgate-gateway.egress.svc:15000\n"
    });
    for (method, body) in [
        ("PUT", grant_sms("+14155550107")),
        (
            "PATCH",
            json!({"categories": {"marketing_sms": "granted"}}).to_string(),
        ),
        ("DELETE", String::new()),
    ] {
        let r = send(w.admin, admin(method, "/v1/consent/P-1007", &body)).await;
        assert_eq!(r.status, 405, "{method}");
        assert_eq!(r.header("allow"), Some("GET"));
        let j = r.json();
        assert_eq!(j["error"], "read_only_replica", "{j}");
        assert!(
            j["detail"].as_str().unwrap().contains("owner's admin API"),
            "{j}"
        );
        assert_eq!(j["bucket"], name.as_str());
        assert_eq!(
            j["writes_go_to"],
            "https://consentgate-gateway.egress.svc:15000"
        );
    }
    // Nothing changed; reads work.
    assert!(has_record(&w, "P-1007").await);
    assert_eq!(
        send(w.proxy, sms("P-1007", "+14155550107")).await.status,
        451
    );
    assert_eq!(
        send(owner.admin, admin("GET", "/v1/consent/P-1007", ""))
            .await
            .status,
        200
    );
    drop((owner, w));
    drop_bucket(&name).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_watcher_of_an_empty_bucket_is_ready_at_once_and_follows_the_owner_when_it_starts() {
    let (name, store) = bucket("empty").await;
    let dir = test_dir("fleet-empty");
    let ca = test_ca(&dir.join("upstream"), VENDOR_HOSTS);
    let up = start_upstream(&ca).await;
    let url = format!("nats://{NATS}");
    // start_proxy waits for /readyz 200: an empty bucket sends nothing, yet it is loaded.
    let w = start(&up, &ca, "fleet-empty-w", |_| {
        watcher_yaml(&url, &name, "5m")
    });
    assert_eq!(metric(&w, "consentgate_consent_records").await, 0.0);
    assert_eq!(metric(&w, "consentgate_consent_source_up").await, 1.0);
    let owner = start(&up, &ca, "fleet-empty-owner", |d| owner_yaml(d, &name));
    wait_replicated(&store).await;
    let n = fixture().len() as f64;
    wait_until("the watcher holds the fixture", 5, || async {
        metric(&w, "consentgate_consent_records").await == n
    })
    .await;
    for (id, phone) in fixture() {
        let o = outcome(&owner, &up, sms(&id, &phone)).await;
        assert_eq!(outcome(&w, &up, sms(&id, &phone)).await, o, "{id}");
    }
    drop((owner, w));
    drop_bucket(&name).await;
}
