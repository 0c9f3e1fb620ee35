//! Entry points for the cargo-fuzz targets in `fuzz/` (feature `fuzz` only).
//!
//! Each takes arbitrary bytes, runs one reader or rewriter of the request path
//! on them, and panics only when an invariant breaks: a parser that accepts a
//! text and writes back something else, a decoder that passes its limit, or a
//! plan that forwards a form of a patient who must not be sent. A panic, a
//! hang or an out-of-memory is what the fuzzer reports (docs/FUZZING.md).

use crate::app::Runtime;
use crate::body::{self, Encoding};
use crate::consent::ConsentStore;
use crate::destinations::{common, rawjson};
use crate::enforce::{self, Gate, Head, Outgoing, Plan};
use crate::guard;
use crate::route::Via;
use std::sync::OnceLock;

/// The JSON layer: a lazy object (and the shape reader) that parses a text
/// writes back the same JSON value.
pub fn json(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(obj) = rawjson::Object::parse(text) {
        let mut out = Vec::new();
        obj.write(&mut out);
        let before = common::strict_json(data);
        let after = common::strict_json(&out);
        match (before, after) {
            (Ok(b), Ok(a)) => assert_eq!(b, a, "the lazy object changed the value"),
            (Ok(_), Err(e)) => panic!("the lazy object wrote JSON that does not parse: {e}"),
            (Err(e), Ok(_)) => panic!("the lazy object made readable what was not: {e}"),
            // Refused by the strict reader both times (a repeated key inside a
            // value the lazy object keeps unread is refused when it is read).
            (Err(_), Err(_)) => {}
        }
    }
    let _ = rawjson::Doc::parse(data, "data");
    let _ = common::parse_json(data);
}

/// Form bodies: what is parsed and written again parses to the same pairs.
pub fn form(data: &[u8]) {
    let pairs = common::parse_form(data);
    let again = common::parse_form(&common::encode_form(&pairs));
    assert_eq!(pairs, again, "form round trip changed the pairs");
}

/// The decoders: never more than the limit, and what is encoded decodes back.
pub fn decode(data: &[u8]) {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let enc = [
        Encoding::Identity,
        Encoding::Gzip,
        Encoding::Deflate,
        Encoding::Brotli,
        Encoding::Zstd,
    ][usize::from(pick) % 5];
    const LIMIT: u64 = 1 << 20;
    if let Ok(plain) = body::decode(enc, rest, LIMIT) {
        assert!(plain.len() as u64 <= LIMIT, "decoded past the limit");
    }
    if let Ok(packed) = body::encode(enc, rest) {
        match body::decode(enc, &packed, LIMIT) {
            Ok(back) => assert_eq!(&*back, rest, "{enc:?} round trip"),
            Err(e) => panic!("{enc:?} could not read its own encoding: {e:?}"),
        }
    }
}

/// The guard's scanner over one string and over a body of each type.
pub fn scan(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut found = Vec::new();
    guard::scan_text(&text, &mut found);
    for ct in [
        Some("application/json"),
        Some("application/x-www-form-urlencoded"),
        None,
    ] {
        guard::each_body_string(data, ct, &mut |s| guard::scan_text(&s, &mut found));
    }
}

/// A request to each inspected endpoint: `(method, host, path and query, content type)`.
const ENDPOINTS: &[(&str, &str, &str, &str)] = &[
    (
        "POST",
        "graph.facebook.com",
        "/v19.0/1/events",
        "application/json",
    ),
    ("POST", "graph.facebook.com", "/v19.0/1/events", FORM),
    (
        "POST",
        "business-api.tiktok.com",
        "/open_api/v1.3/event/track/",
        "application/json",
    ),
    (
        "POST",
        "business-api.tiktok.com",
        "/open_api/v1.3/pixel/batch/",
        "application/json",
    ),
    (
        "POST",
        "tr.snapchat.com",
        "/v3/1/events",
        "application/json",
    ),
    (
        "POST",
        "api.pinterest.com",
        "/v5/ad_accounts/1/events",
        "application/json",
    ),
    (
        "POST",
        "googleads.googleapis.com",
        "/v17/customers/1:uploadClickConversions",
        "application/json",
    ),
    (
        "POST",
        "api.linkedin.com",
        "/rest/conversionEvents",
        "application/json",
    ),
    (
        "POST",
        "www.google-analytics.com",
        "/mp/collect?measurement_id=G-1&api_secret=s",
        "application/json",
    ),
    (
        "POST",
        "www.google-analytics.com",
        "/g/collect?v=2&tid=G-1",
        "text/plain",
    ),
    (
        "POST",
        "api.twilio.com",
        "/2010-04-01/Accounts/AC1/Messages.json",
        FORM,
    ),
    (
        "POST",
        "api.twilio.com",
        "/2010-04-01/Accounts/AC1/Calls.json",
        FORM,
    ),
    (
        "POST",
        "api.sendgrid.com",
        "/v3/mail/send",
        "application/json",
    ),
    (
        "PUT",
        "api.sendgrid.com",
        "/v3/marketing/contacts",
        "application/json",
    ),
    (
        "POST",
        "us21.api.mailchimp.com",
        "/3.0/lists/l1/members",
        "application/json",
    ),
    (
        "POST",
        "us21.api.mailchimp.com",
        "/3.0/batches",
        "application/json",
    ),
    (
        "POST",
        "mandrillapp.com",
        "/api/1.0/messages/send.json",
        "application/json",
    ),
    (
        "POST",
        "a.klaviyo.com",
        "/api/profiles",
        "application/vnd.api+json",
    ),
    (
        "POST",
        "a.klaviyo.com",
        "/api/events",
        "application/vnd.api+json",
    ),
    (
        "POST",
        "rest.iad-01.braze.com",
        "/users/track",
        "application/json",
    ),
    (
        "POST",
        "rest.iad-01.braze.com",
        "/messages/send",
        "application/json",
    ),
    (
        "POST",
        "api.hubapi.com",
        "/crm/v3/objects/contacts",
        "application/json",
    ),
    (
        "POST",
        "api.hubapi.com",
        "/crm/v3/objects/contacts/batch/create",
        "application/json",
    ),
    (
        "POST",
        "api.mypurecloud.com",
        "/api/v2/outbound/contactlists/1/contacts",
        "application/json",
    ),
];
const FORM: &str = "application/x-www-form-urlencoded";

/// Hosts where the denied patient's advertising is refused whatever the body
/// says (no header hint is sent): nothing of theirs may leave.
const AD_HOSTS: &[&str] = &[
    "graph.facebook.com",
    "business-api.tiktok.com",
    "tr.snapchat.com",
    "api.pinterest.com",
    "googleads.googleapis.com",
    "api.linkedin.com",
    "www.google-analytics.com",
];

/// The forms of P-1002 (every category and channel denied) that must never
/// reach an ad platform.
fn denied_forms() -> &'static [String] {
    static F: OnceLock<Vec<String>> = OnceLock::new();
    F.get_or_init(|| {
        let email = "deny.me@example.com";
        vec![
            email.to_string(),
            crate::identify::sha256_hex(email.as_bytes()),
            hex::encode(crate::identify::md5(email.as_bytes())),
            crate::identify::sha256_hex(b"14155550102"),
            crate::identify::sha256_hex(b"+14155550102"),
            "crm:0031x00000den".to_string(),
            "p-1002".to_string(),
        ]
    })
}

struct World {
    rt: Runtime,
    store: ConsentStore,
}

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        // The embedded config names its files relative to the repository; the
        // fuzzer runs elsewhere (and its corpus paths are relative), so the
        // config is written out with those paths made absolute.
        let repo = env!("CARGO_MANIFEST_DIR");
        let text =
            crate::config::EMBEDDED_DEFAULT.replace(": config/", &format!(": {repo}/config/"));
        let path =
            std::env::temp_dir().join(format!("consentgate-fuzz-{}.yaml", std::process::id()));
        if let Err(e) = std::fs::write(&path, text) {
            panic!("fuzz config: {e}");
        }
        let rt = match Runtime::load(&crate::config::ConfigSource::File(path)) {
            Ok(rt) => rt,
            Err(e) => panic!("embedded runtime: {e:?}"),
        };
        let store = ConsentStore::new();
        let snapshot = include_str!("../config/consent.example.jsonl");
        for line in snapshot.lines().filter(|l| !l.trim().is_empty()) {
            match serde_json::from_str(line) {
                Ok(rec) => store.put(rec),
                Err(e) => panic!("example snapshot: {e}"),
            }
        }
        store.mark_good();
        World { rt, store }
    })
}

/// The whole plan (decode, adapter, guard, re-encode) for a request to one of
/// [`ENDPOINTS`], picked by the first byte; the second picks the encoding.
/// Nothing of the denied patient may leave for an ad platform.
pub fn plan(data: &[u8]) {
    let [pick, enc, rest @ ..] = data else {
        return;
    };
    let (method, host, pq, ct) = ENDPOINTS[usize::from(*pick) % ENDPOINTS.len()];
    plan_one(method, host, pq, ct, *enc, rest);
}

/// Meta's form body (`data` holding the events as JSON, `test_event_code`...).
pub fn meta_form(data: &[u8]) {
    let Some((enc, rest)) = data.split_first() else {
        return;
    };
    plan_one(
        "POST",
        "graph.facebook.com",
        "/v19.0/1/events",
        FORM,
        *enc,
        rest,
    );
}

fn plan_one(method: &str, host: &str, pq: &str, ct: &str, enc: u8, body: &[u8]) {
    let w = world();
    let (coding, packed) = match enc % 4 {
        0 => (None, body.to_vec()),
        1 => (
            Some("gzip"),
            body::encode(Encoding::Gzip, body).unwrap_or_default(),
        ),
        2 => (
            Some("zstd"),
            body::encode(Encoding::Zstd, body).unwrap_or_default(),
        ),
        // The bytes as given, declared gzip: the decoder reads whatever came.
        _ => (Some("gzip"), body.to_vec()),
    };
    let mut req = http::Request::builder()
        .method(method)
        .uri(pq)
        .header("content-type", ct)
        .header("content-length", packed.len());
    if let Some(c) = coding {
        req = req.header("content-encoding", c);
    }
    let Ok(req) = req.body(()) else {
        return;
    };
    let (parts, ()) = req.into_parts();
    let via = Via::Intercepted {
        host: host.to_string(),
        port: 443,
    };
    let head = Head {
        parts: &parts,
        via: &via,
        has_body: !packed.is_empty(),
    };
    let Gate::Inspect(i) = enforce::gate(&w.rt, &head) else {
        return;
    };
    let trace = enc & 4 != 0;
    let planned = enforce::plan(&w.rt, &w.store, &i, &parts, &packed, trace);
    let Plan::Forward(f) = planned.plan else {
        return;
    };
    if !AD_HOSTS.contains(&host) {
        return;
    }
    let sent = match f.body {
        Outgoing::Original => packed,
        Outgoing::Rewritten(b) => b,
    };
    let plain = match i.encoding {
        Encoding::Identity => sent,
        e => match body::decode(e, &sent, u64::MAX >> 1) {
            Ok(p) => p.into_owned(),
            Err(e) => panic!("forwarded a body that does not decode: {e:?}"),
        },
    };
    // What the vendor reads: a form's keys and values decoded, a JSON text's
    // strings unescaped, any other text as it is; each also percent-decoded.
    let mut read: Vec<String> = Vec::new();
    if ct == FORM {
        for (k, v) in form_urlencoded::parse(&plain) {
            read.push(k.into_owned());
            read.push(v.into_owned());
        }
    } else {
        read.push(String::from_utf8_lossy(&plain).into_owned());
        let _ = guard::json_strings(&plain, &mut |s| read.push(s.into_owned()));
    }
    if let Some(u) = &f.uri {
        read.push(u.to_string());
    }
    for r in &read {
        let decoded = crate::identify::percent_decode(r);
        for t in [r.to_lowercase(), decoded.to_lowercase()] {
            for form in denied_forms() {
                assert!(
                    !holds_token(&t, form),
                    "a form of the denied patient reached {host}{pq}"
                );
            }
        }
    }
}

/// Whether `form` stands in `text` as a whole identifier: not glued to more
/// characters of its kind, as a vendor matching it would read it
/// (`xdeny.me@example.com` is another address; a digest followed by more hex
/// digits is no digest; `P-1002509` is another id, while `C@crm:…` and
/// `crm:….` hold one: README "The egress guard").
fn holds_token(text: &str, form: &str) -> bool {
    let b = text.as_bytes();
    let kind = match form {
        f if f.bytes().all(|c| c.is_ascii_hexdigit()) => 0,
        f if f.contains('@') => 1,
        _ => 2,
    };
    let glued_before = |c: u8| match kind {
        0 => c.is_ascii_hexdigit(),
        1 => c.is_ascii_alphanumeric() || b"._%+-'".contains(&c),
        _ => c.is_ascii_alphanumeric() || b"-_:".contains(&c),
    };
    let glued_after = |c: u8| match kind {
        0 => c.is_ascii_hexdigit(),
        1 => c.is_ascii_alphanumeric() || c == b'-',
        _ => c.is_ascii_alphanumeric() || b"-_:".contains(&c),
    };
    text.match_indices(form).any(|(i, m)| {
        let before = i.checked_sub(1).and_then(|j| b.get(j)).copied();
        let end = i + m.len();
        let after = b.get(end).copied();
        // `deny.me@example.com.toacam` is an address at another domain; a full
        // stop that ends a sentence is not part of the address.
        let longer_domain = kind == 1
            && after == Some(b'.')
            && b.get(end + 1).is_some_and(u8::is_ascii_alphanumeric);
        !before.is_some_and(glued_before) && !after.is_some_and(glued_after) && !longer_domain
    })
}
