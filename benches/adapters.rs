//! Parse → identify → look up → decide → rewrite for a realistic body of each
//! major adapter, exactly as the pipeline calls it (`Adapter::enforce` with a
//! decide closure that looks the identifiers up in a `ConsentStore` loaded
//! from config/consent.example.jsonl and applies `Policy::default()`).
//!
//! Bodies: Meta CAPI 10-event batch (benches/fixtures/meta_batch10.json, the
//! same bytes scripts/bench sends through the proxy), GA4 Measurement
//! Protocol, TikTok Events (5 events), SendGrid mail/send (10 recipients),
//! Twilio Messages (form).

use consentgate::{
    builtins, load_snapshot, Adapter, ConsentStore, Context, EventVerdict, Identifiers, Policy,
    RequestView,
};
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use http::Method;
use serde_json::json;
use std::path::Path;
use std::sync::Arc;

fn store() -> ConsentStore {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let s = ConsentStore::new();
    for r in load_snapshot(&root.join("config/consent.example.jsonl")).expect("snapshot") {
        s.put(r);
    }
    s.mark_good();
    s
}

struct Case {
    name: &'static str,
    host: &'static str,
    path: &'static str,
    content_type: &'static str,
    body: Vec<u8>,
}

fn cases() -> Vec<Case> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let meta = std::fs::read(root.join("benches/fixtures/meta_batch10.json")).expect("fixture");
    let ga4 = json!({
        "client_id": "1234567890.1763600000",
        "user_id": "P-1001",
        "timestamp_micros": 1763600000000000u64,
        "user_data": {
            "sha256_email_address": "jane.roe@example.com",
            "sha256_phone_number": "+14155550100",
            "address": {"sha256_first_name": "Jane", "sha256_last_name": "Roe", "city": "San Francisco", "region": "CA", "country": "US"}
        },
        "events": [
            {"name": "page_view", "params": {"page_location": "https://clinic.example.org/appointments/cardiology?x=1", "page_title": "Cardiology", "engagement_time_msec": 100}},
            {"name": "generate_lead", "params": {"value": 120.5, "currency": "USD", "page_location": "https://clinic.example.org/book"}}
        ]
    });
    let tiktok_people = [
        "jane.roe@example.com",
        "deny.me@example.com",
        "opt.out@example.com",
        "limited@example.com",
        "unknown.person@example.com",
    ];
    let tiktok = json!({
        "event_source": "web",
        "event_source_id": "PIXEL123",
        "data": tiktok_people.iter().enumerate().map(|(i, e)| json!({
            "event": "CompletePayment",
            "event_time": 1763600000 + i,
            "event_id": format!("tt-{i}"),
            "user": {"email": [e], "phone": ["+14155550100"], "ip": "203.0.113.7", "user_agent": "Mozilla/5.0"},
            "page": {"url": "https://clinic.example.org/checkout", "referrer": "https://clinic.example.org/"},
            "properties": {"value": 99.0, "currency": "USD", "contents": [{"content_id": "visit", "quantity": 1}]}
        })).collect::<Vec<_>>()
    });
    let sg_people = [
        "jane.roe@example.com",
        "deny.me@example.com",
        "opt.out@example.com",
        "limited@example.com",
        "gpc.user@example.com",
        "sms.denied@example.com",
        "Mixed.Case@Gmail.com",
        "email.denied.channel@example.com",
        "care.only@example.com",
        "unknown.person@example.com",
    ];
    let sendgrid = json!({
        "from": {"email": "news@clinic.example.org", "name": "Clinic"},
        "subject": "Your monthly health newsletter",
        "personalizations": sg_people.iter().map(|e| json!({
            "to": [{"email": e, "name": "Patient"}],
            "dynamic_template_data": {"first_name": "Pat", "clinic": "Cardiology"}
        })).collect::<Vec<_>>(),
        "template_id": "d-0123456789abcdef0123456789abcdef",
        "content": [{"type": "text/plain", "value": "Hello from the clinic"}]
    });
    let twilio = form_urlencoded::Serializer::new(String::new())
        .append_pair("To", "+14155550100")
        .append_pair("From", "+14155559999")
        .append_pair("Body", "Reminder: your appointment is tomorrow at 9am")
        .finish();
    vec![
        Case {
            name: "meta_capi_10_events",
            host: "graph.facebook.com",
            path: "/v19.0/123456789/events",
            content_type: "application/json",
            body: meta,
        },
        Case {
            name: "ga4_mp",
            host: "www.google-analytics.com",
            path: "/mp/collect",
            content_type: "application/json",
            body: serde_json::to_vec(&ga4).expect("json"),
        },
        Case {
            name: "tiktok_5_events",
            host: "business-api.tiktok.com",
            path: "/open_api/v1.3/event/track/",
            content_type: "application/json",
            body: serde_json::to_vec(&tiktok).expect("json"),
        },
        Case {
            name: "sendgrid_10_recipients",
            host: "api.sendgrid.com",
            path: "/v3/mail/send",
            content_type: "application/json",
            body: serde_json::to_vec(&sendgrid).expect("json"),
        },
        Case {
            name: "twilio_sms",
            host: "api.twilio.com",
            path: "/2010-04-01/Accounts/AC0123456789abcdef0123456789abcdef/Messages.json",
            content_type: "application/x-www-form-urlencoded",
            body: twilio.into_bytes(),
        },
    ]
}

fn adapter_for(all: &[Arc<dyn Adapter>], host: &str, path: &str) -> Arc<dyn Adapter> {
    all.iter()
        .find(|a| a.matches_host(host) && a.inspects(&Method::POST, path))
        .cloned()
        .unwrap_or_else(|| panic!("no adapter inspects POST {host}{path}"))
}

/// One enforcement, as `pipeline::enforce` runs it (no I/O).
fn run(
    adapter: &dyn Adapter,
    store: &ConsentStore,
    policy: &Policy,
    view: &RequestView<'_>,
    body: &[u8],
) -> (usize, usize, usize) {
    let ctx = Context {
        category: adapter.default_category(),
        channel: adapter.channel(),
        kind: adapter.kind(),
        header_gpc: false,
        stale: false,
    };
    let mut decisions = Vec::new();
    let mut decide = |ids: &Identifiers| {
        let mut d = policy.decide(&ctx, store.lookup(ids));
        d.identifiers = ids.keys.clone();
        let v: EventVerdict = d.verdict;
        decisions.push(d);
        v
    };
    let out = adapter.enforce(view, body, &mut decide).expect("enforce");
    let dropped = out.events.iter().filter(|e| e.verdict.is_drop()).count();
    (
        out.events.len(),
        dropped,
        out.body.map(|b| b.len()).unwrap_or(0),
    )
}

pub(crate) fn bench(c: &mut Criterion) {
    let store = store();
    let policy = Policy::default();
    let all = builtins();
    let mut g = c.benchmark_group("enforce");
    for case in cases() {
        let adapter = adapter_for(&all, case.host, case.path);
        let method = Method::POST;
        let view = RequestView {
            method: &method,
            host: case.host,
            path: case.path,
            query: None,
            content_type: Some(case.content_type),
        };
        let (events, dropped, out_len) = run(&*adapter, &store, &policy, &view, &case.body);
        println!(
            "enforce/{}: {} bytes in, {events} events/recipients, {dropped} dropped, {} bytes out",
            case.name,
            case.body.len(),
            if out_len == 0 {
                "unchanged".to_string()
            } else {
                out_len.to_string()
            }
        );
        g.throughput(Throughput::Bytes(case.body.len() as u64));
        g.bench_function(case.name, |b| {
            b.iter(|| run(&*adapter, &store, &policy, &view, black_box(&case.body)))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
