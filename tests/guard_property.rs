//! Issue 16, Build 10: a property test of the egress guard. Generated batches mix
//! granted, denied, opted-out and unknown people, their identifiers placed in the
//! identity fields and in free fields, written plain, upper-case, as national or
//! international phones, bare digits or SHA-256, in look-alike keys and odd shapes,
//! in root fields and query strings, with bodies gzip-compressed at random. Every
//! request goes through the running proxy to the recording upstream; whatever the
//! answer, the bytes that reach the upstream never hold any form (plain,
//! lower-case, digits, SHA-256, MD5) of an identifier of a patient who must not be
//! sent: the denied patient anywhere, and the sale/share-opted-out patient on ad
//! platforms and analytics (their identity is stripped there).
//!
//! Adapters: Meta (JSON and form), TikTok, Snap, Pinterest, GA4, Google Ads,
//! LinkedIn, SendGrid, Mandrill, Mailchimp, Klaviyo, HubSpot, Braze, Twilio SMS
//! and Voice, and Genesys. Identifiers are also written as the MD5 of an address
//! (Mailchimp's subscriber hash). It found one leak when written: a bare
//! number followed by a space and a word ("call 14155550102 today") was not read
//! as a phone. `GUARD_PROPERTY_REQUESTS` (default 10,000) and
//! `GUARD_PROPERTY_SEED` change the run; a failure prints the seed and the case.

mod common;
use common::*;
use serde_json::{json, Value};
use std::io::Write;

/// P-1002: every category denied.
const DENIED: (&str, &str) = ("deny.me@example.com", "+14155550102");
/// P-1003: sale/share opt-out (identity stripped on ad platforms and analytics).
const OPTED_OUT: (&str, &str) = ("opt.out@example.com", "+14155550103");
/// P-1001: every category granted.
const GRANTED: (&str, &str) = ("jane.roe@example.com", "+14155550100");

/// A small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, pct: u64) -> bool {
        self.below(100) < pct
    }
    fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len() as u64) as usize]
    }
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Who {
    Granted,
    Denied,
    OptedOut,
    Unknown(u64),
}

impl Who {
    fn email(self) -> String {
        match self {
            Who::Granted => GRANTED.0.into(),
            Who::Denied => DENIED.0.into(),
            Who::OptedOut => OPTED_OUT.0.into(),
            Who::Unknown(n) => format!("stranger{n}@example.org"),
        }
    }
    fn phone(self) -> String {
        match self {
            Who::Granted => GRANTED.1.into(),
            Who::Denied => DENIED.1.into(),
            Who::OptedOut => OPTED_OUT.1.into(),
            Who::Unknown(n) => format!("+1312555{:04}", 100 + n % 9000),
        }
    }
}

fn who(r: &mut Rng) -> Who {
    match r.below(4) {
        0 => Who::Granted,
        1 => Who::Denied,
        2 => Who::OptedOut,
        _ => Who::Unknown(r.below(1000)),
    }
}

fn sha256(s: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(s.as_bytes()))
}

fn md5(s: &str) -> String {
    use md5::Digest;
    hex::encode(md5::Md5::digest(s.as_bytes()))
}

/// One of the person's identifiers in one of the forms an app writes it.
fn written(r: &mut Rng, w: Who) -> String {
    let (email, phone) = (w.email(), w.phone());
    let national = format!("({}) {}-{}", &phone[2..5], &phone[5..8], &phone[8..]);
    match r.below(9) {
        8 => md5(&email),
        0 => email,
        1 => email.to_uppercase(),
        2 => format!(" {email} "),
        3 => sha256(&email),
        4 => phone,
        5 => national,
        6 => format!("call {} today", &phone[1..]),
        _ => format!(
            "https://hospital.example/visit?e={}",
            email.replace('@', "%40")
        ),
    }
}

/// A free-text mention of someone, as it might sit in a note.
fn mention(r: &mut Rng, w: Who) -> String {
    format!("re: {} (ticket {})", written(r, w), r.below(100_000))
}

#[derive(Clone, Copy, Debug)]
enum Vendor {
    MetaJson,
    MetaForm,
    TikTok,
    Snap,
    Pinterest,
    Ga4,
    SendGrid,
    Twilio,
    Braze,
    GoogleAds,
    LinkedIn,
    HubSpot,
    Klaviyo,
    Mailchimp,
    Mandrill,
    Genesys,
    TwilioVoice,
}

/// Destinations that decide per recipient: a sale/share opt-out does not stop them.
const MESSAGING: &[&str] = &[
    "api.sendgrid.com",
    "api.twilio.com",
    "rest.iad-01.braze.com",
    "api.hubapi.com",
    "a.klaviyo.com",
    "us21.api.mailchimp.com",
    "mandrillapp.com",
    "api.mypurecloud.com",
];

const VENDORS: &[Vendor] = &[
    Vendor::GoogleAds,
    Vendor::LinkedIn,
    Vendor::HubSpot,
    Vendor::Klaviyo,
    Vendor::Mailchimp,
    Vendor::Mandrill,
    Vendor::Genesys,
    Vendor::TwilioVoice,
    Vendor::MetaJson,
    Vendor::MetaForm,
    Vendor::TikTok,
    Vendor::Snap,
    Vendor::Pinterest,
    Vendor::Ga4,
    Vendor::SendGrid,
    Vendor::Twilio,
    Vendor::Braze,
];

/// Set `v` at a JSON pointer, making objects on the way.
fn put(root: &mut Value, pointer: &str, v: Value) {
    let mut cur = root;
    let parts: Vec<&str> = pointer.trim_start_matches('/').split('/').collect();
    for (i, p) in parts.iter().enumerate() {
        if !cur.is_object() {
            *cur = json!({});
        }
        let m = cur.as_object_mut().unwrap();
        if i + 1 == parts.len() {
            m.insert((*p).to_string(), v);
            return;
        }
        cur = m.entry((*p).to_string()).or_insert_with(|| json!({}));
    }
}

/// One ad-platform event: identity at `id` (email list), free text at `free`.
fn ad_event(r: &mut Rng, base: Value, id: &str, free: &str) -> Value {
    let mut ev = base;
    let w = who(r);
    let value = match r.below(10) {
        0 => json!({"value": w.email()}),
        1 => json!([{"v": w.email()}]),
        _ => json!([written(r, w)]),
    };
    put(&mut ev, id, value);
    if r.chance(30) {
        let m = who(r);
        put(&mut ev, free, json!(mention(r, m)));
    }
    if r.chance(5) {
        // A look-alike of the identity key.
        let (parent, leaf) = id.rsplit_once('/').unwrap();
        let w2 = who(r);
        put(
            &mut ev,
            &format!("{parent}/{}", leaf.to_uppercase()),
            json!([w2.email()]),
        );
    }
    ev
}

/// (host, path with query, content type, body) of one generated request.
fn request(r: &mut Rng, v: Vendor) -> (&'static str, String, &'static str, Vec<u8>) {
    let n = 1 + r.below(6);
    let json_ct = "application/json";
    let (host, mut path, ct, body): (&str, String, &str, Value) = match v {
        Vendor::MetaJson | Vendor::MetaForm => {
            let data: Vec<Value> = (0..n)
                .map(|i| {
                    let base = json!({"event_name": "Lead", "event_time": 1763600000 + i,
                                      "action_source": "website"});
                    ad_event(r, base, "/user_data/em", "/custom_data/note")
                })
                .collect();
            (
                "graph.facebook.com",
                "/v19.0/1/events".into(),
                json_ct,
                json!({"data": data}),
            )
        }
        Vendor::TikTok => {
            let data: Vec<Value> = (0..n)
                .map(|i| {
                    let base = json!({"event": "ViewContent", "event_time": 1763600000 + i});
                    ad_event(r, base, "/user/email", "/properties/description")
                })
                .collect();
            (
                "business-api.tiktok.com",
                "/open_api/v1.3/event/track/".into(),
                json_ct,
                json!({"event_source": "web", "event_source_id": "PX", "data": data}),
            )
        }
        Vendor::Snap | Vendor::Pinterest => {
            let data: Vec<Value> = (0..n)
                .map(|i| {
                    let base = json!({"event_name": "PURCHASE", "event_time": 1763600000 + i,
                                      "action_source": "web"});
                    ad_event(r, base, "/user_data/em", "/custom_data/note")
                })
                .collect();
            match v {
                Vendor::Snap => (
                    "tr.snapchat.com",
                    "/v3/PIXEL/events?access_token=t".into(),
                    json_ct,
                    json!({"data": data}),
                ),
                _ => (
                    "api.pinterest.com",
                    "/v5/ad_accounts/1/events".into(),
                    json_ct,
                    json!({"data": data}),
                ),
            }
        }
        Vendor::Ga4 => {
            let w = who(r);
            let mut b = json!({"client_id": "123.456",
                               "user_data": {"sha256_email_address": [written(r, w)]},
                               "events": [{"name": "page_view", "params": {}}]});
            if r.chance(30) {
                let m = who(r);
                put(&mut b, "/events/0/params/note", json!(mention(r, m)));
            }
            (
                "www.google-analytics.com",
                "/mp/collect?measurement_id=G-T&api_secret=s".into(),
                json_ct,
                b,
            )
        }
        Vendor::SendGrid => {
            let pers: Vec<Value> = (0..n)
                .map(|_| {
                    let w = who(r);
                    let mut p = json!({"to": [{"email": w.email()}]});
                    if r.chance(30) {
                        let m = who(r);
                        put(&mut p, "/custom_args/note", json!(mention(r, m)));
                    }
                    p
                })
                .collect();
            let mut b = json!({"personalizations": pers, "from": {"email": "news@hospital.example"},
                               "subject": "Newsletter", "content": [{"type": "text/plain", "value": "Hello"}]});
            if r.chance(10) {
                let m = who(r);
                put(&mut b, "/reply_to/email", json!(m.email()));
            }
            ("api.sendgrid.com", "/v3/mail/send".into(), json_ct, b)
        }
        Vendor::Braze => {
            let attrs: Vec<Value> = (0..n)
                .map(|_| {
                    let w = who(r);
                    let mut a = json!({"email": w.email()});
                    if r.chance(30) {
                        let m = who(r);
                        put(&mut a, "/note", json!(mention(r, m)));
                    }
                    a
                })
                .collect();
            (
                "rest.iad-01.braze.com",
                "/users/track".into(),
                json_ct,
                json!({"attributes": attrs}),
            )
        }
        Vendor::GoogleAds => {
            let convs: Vec<Value> = (0..n)
                .map(|_| {
                    let w = who(r);
                    let mut c = json!({"conversionAction": "customers/123/conversionActions/9",
                        "conversionDateTime": "2026-11-20 10:00:00+00:00", "gclid": "Cj0-gclid",
                        "userIdentifiers": [{"hashedEmail": written(r, w)}]});
                    if r.chance(30) {
                        let m = who(r);
                        put(&mut c, "/orderId", json!(mention(r, m)));
                    }
                    c
                })
                .collect();
            (
                "googleads.googleapis.com",
                "/v17/customers/123:uploadClickConversions".into(),
                json_ct,
                json!({"partialFailure": true, "conversions": convs}),
            )
        }
        Vendor::LinkedIn => {
            let els: Vec<Value> = (0..n)
                .map(|i| {
                    let w = who(r);
                    let mut e = json!({"conversion": "urn:lla:llaPartnerConversion:123",
                        "conversionHappenedAt": 1763630000000u64 + i, "eventId": format!("e{i}"),
                        "user": {"userIds": [{"idType": "SHA256_EMAIL", "idValue": written(r, w)}]}});
                    if r.chance(30) {
                        let m = who(r);
                        put(&mut e, "/user/userInfo/title", json!(mention(r, m)));
                    }
                    e
                })
                .collect();
            (
                "api.linkedin.com",
                "/rest/conversionEvents".into(),
                json_ct,
                json!({"elements": els}),
            )
        }
        Vendor::HubSpot => {
            let inputs: Vec<Value> = (0..n)
                .map(|_| {
                    let w = who(r);
                    let mut c = json!({"properties": {"email": w.email(), "firstname": "Pat"}});
                    if r.chance(30) {
                        let m = who(r);
                        put(&mut c, "/properties/notes", json!(mention(r, m)));
                    }
                    c
                })
                .collect();
            (
                "api.hubapi.com",
                "/crm/v3/objects/contacts/batch/create".into(),
                json_ct,
                json!({"inputs": inputs}),
            )
        }
        Vendor::Klaviyo => {
            let w = who(r);
            let mut attrs = json!({"email": w.email(), "first_name": "Pat"});
            if r.chance(30) {
                let m = who(r);
                put(&mut attrs, "/properties/note", json!(mention(r, m)));
            }
            (
                "a.klaviyo.com",
                "/api/profiles".into(),
                "application/vnd.api+json",
                json!({"data": {"type": "profile", "attributes": attrs}}),
            )
        }
        Vendor::Mailchimp => {
            let members: Vec<Value> = (0..n)
                .map(|_| {
                    let w = who(r);
                    let mut m = json!({"email_address": w.email(), "status": "subscribed"});
                    if r.chance(30) {
                        let x = who(r);
                        put(&mut m, "/merge_fields/NOTE", json!(mention(r, x)));
                    }
                    m
                })
                .collect();
            (
                "us21.api.mailchimp.com",
                "/3.0/lists/l1".into(),
                json_ct,
                json!({"members": members, "update_existing": true}),
            )
        }
        Vendor::Mandrill => {
            let to: Vec<Value> = (0..n)
                .map(|_| json!({"email": who(r).email(), "type": "to"}))
                .collect();
            let html = match r.chance(30) {
                true => {
                    let m = who(r);
                    mention(r, m)
                }
                false => "<p>See you tomorrow</p>".to_string(),
            };
            (
                "mandrillapp.com",
                "/api/1.0/messages/send.json".into(),
                json_ct,
                json!({"key": "k", "message": {"to": to, "subject": "Clinic news", "html": html,
                                                "from_email": "news@hospital.example"}}),
            )
        }
        Vendor::Genesys => {
            let contacts: Vec<Value> = (0..n)
                .map(|i| {
                    let w = who(r);
                    let mut c = json!({"id": format!("c{i}"), "contactListId": "cl-1",
                                       "data": {"HomePhone": w.phone(), "First": "Pat"}, "callable": true});
                    if r.chance(30) {
                        let m = who(r);
                        put(&mut c, "/data/Note", json!(mention(r, m)));
                    }
                    c
                })
                .collect();
            return (
                "api.mypurecloud.com",
                "/api/v2/outbound/contactlists/cl-1/contacts".into(),
                json_ct,
                Value::Array(contacts).to_string().into_bytes(),
            );
        }
        Vendor::TwilioVoice => {
            let w = who(r);
            let m = who(r);
            let url = match r.chance(30) {
                true => format!("https://hospital.example/twiml?note={}", written(r, m)),
                false => "https://hospital.example/twiml".to_string(),
            };
            let form = form_urlencoded::Serializer::new(String::new())
                .append_pair("To", &w.phone())
                .append_pair("From", "+14155559999")
                .append_pair("Url", &url)
                .finish();
            return (
                "api.twilio.com",
                "/2010-04-01/Accounts/AC0123456789abcdef0123456789abcdef/Calls.json".into(),
                "application/x-www-form-urlencoded",
                form.into_bytes(),
            );
        }
        Vendor::Twilio => {
            let w = who(r);
            let m = who(r);
            let text = match r.chance(30) {
                true => mention(r, m),
                false => "Your appointment is tomorrow".to_string(),
            };
            let form = form_urlencoded::Serializer::new(String::new())
                .append_pair("To", &w.phone())
                .append_pair("From", "+14155559999")
                .append_pair("Body", &text)
                .finish();
            return (
                "api.twilio.com",
                "/2010-04-01/Accounts/AC0123456789abcdef0123456789abcdef/Messages.json".into(),
                "application/x-www-form-urlencoded",
                form.into_bytes(),
            );
        }
    };
    let mut body = body;
    if r.chance(5) {
        let m = who(r);
        put(&mut body, "/partner_note", json!(mention(r, m)));
    }
    if r.chance(5) {
        let m = who(r);
        let sep = if path.contains('?') { '&' } else { '?' };
        let q = form_urlencoded::Serializer::new(String::new())
            .append_pair("note", &written(r, m))
            .finish();
        path = format!("{path}{sep}{q}");
    }
    if let Vendor::MetaForm = v {
        let form = form_urlencoded::Serializer::new(String::new())
            .append_pair("data", &body["data"].to_string())
            .append_pair("access_token", "t")
            .finish();
        return (
            host,
            path,
            "application/x-www-form-urlencoded",
            form.into_bytes(),
        );
    }
    (host, path, ct, body.to_string().into_bytes())
}

fn gzip(b: &[u8]) -> Vec<u8> {
    let mut w = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    w.write_all(b).unwrap();
    w.finish().unwrap()
}

fn gunzip(b: &[u8]) -> Vec<u8> {
    use std::io::Read;
    let mut out = Vec::new();
    match flate2::read::MultiGzDecoder::new(b).read_to_end(&mut out) {
        Ok(_) => out,
        Err(_) => b.to_vec(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_generated_request_leaks_a_patient_who_must_not_be_sent() {
    let total: u64 = std::env::var("GUARD_PROPERTY_REQUESTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000);
    let seed: u64 = std::env::var("GUARD_PROPERTY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_c0de_2026_1205);
    let dir = test_dir("guard-property");
    let ca = test_ca(&dir.join("upstream"), VENDOR_HOSTS);
    let up = start_upstream(&ca).await;
    let p = start_proxy(&dir, &up, &ca, ProxyOpts::default());
    let workers = 8u64;
    let mut tasks = Vec::new();
    for wkr in 0..workers {
        let proxy = p.proxy;
        tasks.push(tokio::spawn(async move {
            let mut r = Rng(seed ^ (wkr + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let mut statuses = std::collections::BTreeMap::new();
            for i in 0..total / workers {
                let v = *r.pick(VENDORS);
                let (host, path, ct, body) = request(&mut r, v);
                let zipped = r.chance(15);
                let mut req = Req::post(host, &path, if zipped { gzip(&body) } else { body.clone() })
                    .header("content-type", ct);
                if zipped {
                    req = req.header("content-encoding", "gzip");
                }
                if matches!(
                    v,
                    Vendor::Braze
                        | Vendor::SendGrid
                        | Vendor::HubSpot
                        | Vendor::Klaviyo
                        | Vendor::Mailchimp
                        | Vendor::Mandrill
                ) {
                    req = req.header("x-consent-category", "marketing_email");
                }
                let resp = send(proxy, req).await;
                assert!(
                    matches!(resp.status, 200 | 422 | 451),
                    "seed {seed} worker {wkr} request {i} {v:?} {host}{path} gzip={zipped}: {} -> {} {}",
                    String::from_utf8_lossy(&body),
                    resp.status,
                    String::from_utf8_lossy(&resp.body)
                );
                *statuses.entry(resp.status).or_insert(0u64) += 1;
            }
            statuses
        }));
    }
    let mut statuses = std::collections::BTreeMap::new();
    for t in tasks {
        for (k, n) in t.await.unwrap() {
            *statuses.entry(k).or_insert(0u64) += n;
        }
    }
    // Everything that reached the upstream, read once the run is over.
    let got = up.requests();
    for g in &got {
        let bytes = gunzip(&g.body);
        let mut ids = vec![DENIED.0, DENIED.1];
        if !MESSAGING.contains(&g.sni.as_deref().unwrap_or_default()) {
            ids.extend([OPTED_OUT.0, OPTED_OUT.1]);
        }
        let what = format!(
            "seed {seed}: upstream {} {}: {}",
            g.path_and_query,
            g.sni.as_deref().unwrap_or_default(),
            String::from_utf8_lossy(&bytes)
        );
        assert_absent(&bytes, &ids, &what);
        assert_absent(g.path_and_query.as_bytes(), &ids, &what);
    }
    eprintln!(
        "guard property: {} requests, answers {statuses:?}, {} reached the upstream",
        total / workers * workers,
        got.len()
    );
    // Some of each outcome, or the generator tests less than it says.
    assert!(
        statuses.get(&200).copied().unwrap_or(0) > total / 20,
        "{statuses:?}"
    );
    assert!(statuses.get(&422).copied().unwrap_or(0) > 0, "{statuses:?}");
    assert!(statuses.get(&451).copied().unwrap_or(0) > 0, "{statuses:?}");
    let health = admin_get(&p, "/healthz").await;
    assert_eq!(health.status, 200, "the proxy is still up");
}
