//! Issue 17, Build 2: the endpoints the vendors' official SDKs call with person
//! data, inspected (they were refused as `uninspected_endpoint`), through the
//! running proxy to the recording upstream. Per endpoint: a granted request
//! arrives (the bytes upstream are checked), a denied patient (P-1002) never
//! arrives in any form (plain, lower-case, digits, SHA-256, MD5; in a form or
//! batch body also after decoding each layer), and the status and error code
//! the app sees.

mod common;
use common::*;
use md5::Digest as _;
use serde_json::{json, Value};

/// P-1002: every category and channel denied.
const DENIED: &[&str] = &[
    "P-1002",
    "deny.me@example.com",
    "+14155550102",
    "crm:0031x00000den",
];
const JANE: &str = "jane.roe@example.com";
const DENY: &str = "deny.me@example.com";

async fn setup(name: &str) -> (Proxy, Upstream) {
    let dir = test_dir(name);
    let ca = test_ca(&dir.join("upstream"), VENDOR_HOSTS);
    let up = start_upstream(&ca).await;
    (start_proxy(&dir, &up, &ca, ProxyOpts::default()), up)
}

fn sha(s: &str) -> String {
    hex::encode(sha2::Sha256::digest(s.as_bytes()))
}

fn md5(s: &str) -> String {
    hex::encode(md5::Md5::digest(s.as_bytes()))
}

/// Every layer of a body a vendor decodes: as sent, form-decoded, and
/// form-decoded again (a Graph batch call's body inside the `batch` field).
fn layers(bytes: &[u8]) -> Vec<Vec<u8>> {
    let once: String = form_urlencoded::parse(bytes)
        .map(|(k, v)| format!("{k}={v}\n"))
        .collect();
    let mut out = vec![bytes.to_vec(), once.clone().into_bytes()];
    // Inside the decoded text, JSON strings hold further form bodies.
    let twice: String = form_urlencoded::parse(once.as_bytes())
        .map(|(k, v)| format!("{k}={v}\n"))
        .collect();
    out.push(twice.clone().into_bytes());
    out.push(
        twice
            .replace("\\\"", "\"")
            .replace("\\\\", "\\")
            .into_bytes(),
    );
    out
}

/// No form of the denied patient in `bytes`, at any layer.
fn absent(bytes: &[u8], what: &str) {
    for l in layers(bytes) {
        assert_absent(&l, DENIED, what);
    }
}

/// Sent and forwarded: the request as the upstream received it.
async fn forwarded(p: &Proxy, up: &Upstream, req: Req, decision: &str, what: &str) -> Recorded {
    let before = up.count();
    let r = send(p.proxy, req).await;
    assert_eq!(
        r.status,
        200,
        "{what}: {}",
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(r.decision(), decision, "{what}");
    assert_eq!(up.count(), before + 1, "{what}: one request upstream");
    let got = up.last();
    absent(&got.body, what);
    absent(got.path_and_query.as_bytes(), what);
    got
}

/// Sent as it came: the upstream body is the request's, byte for byte.
async fn unchanged(p: &Proxy, up: &Upstream, req: Req, what: &str) -> Recorded {
    let body = req.body.clone();
    let path = req.path.clone();
    let got = forwarded(p, up, req, "allowed", what).await;
    assert_eq!(got.body, body, "{what}: forwarded byte for byte");
    assert_eq!(got.path_and_query, path, "{what}");
    got
}

/// Refused with `status` / `code`; nothing upstream, no trace of the denied
/// patient in the answer either.
async fn refused(p: &Proxy, up: &Upstream, req: Req, status: u16, code: &str, what: &str) -> Resp {
    let before = up.count();
    let r = send(p.proxy, req).await;
    assert_eq!(
        r.status,
        status,
        "{what}: {}",
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(r.decision(), "blocked", "{what}");
    assert_eq!(r.contract()["error"], code, "{what}");
    assert_eq!(up.count(), before, "{what}: nothing went upstream");
    assert_absent(&r.body, DENIED, what);
    r
}

fn json_post(host: &str, path: &str, body: &Value) -> Req {
    Req::post(host, path, body.to_string())
}

// ------------------------------------------------------------ Mandrill send-raw

const MANDRILL: &str = "mandrillapp.com";
const SEND_RAW: &str = "/api/1.3/messages/send-raw.json";

/// A `send-raw` body as the Mailchimp Transactional SDKs send it.
fn send_raw(to: Option<&[&str]>, headers: &str) -> Value {
    let raw = format!(
        "From: Clinic <news@hospital.example>\r\n{headers}\r\nSubject: Flu shots\r\n\
         MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n\
         Flu shots are available this week.\r\n"
    );
    let mut b = json!({"key": "MANDRILL-KEY", "raw_message": raw,
                       "from_email": "news@hospital.example", "async": false});
    if let Some(t) = to {
        b["to"] = json!(t);
    }
    b
}

#[tokio::test(flavor = "multi_thread")]
async fn mandrill_send_raw() {
    let (p, up) = setup("sdk-mandrill-raw").await;
    let req = |b: &Value| json_post(MANDRILL, SEND_RAW, b);
    // Granted: to[] and the To header name P-1001 only.
    unchanged(
        &p,
        &up,
        req(&send_raw(
            Some(&[JANE]),
            "To: Jane Roe <jane.roe@example.com>",
        )),
        "send-raw granted",
    )
    .await;
    // Headers only (no envelope): every header recipient is decided.
    unchanged(
        &p,
        &up,
        req(&send_raw(
            None,
            "To: jane.roe@example.com,\r\n Mixed.Case@Gmail.com",
        )),
        "send-raw headers only",
    )
    .await;
    // A denied envelope-only recipient is removed from to[].
    let got = forwarded(
        &p,
        &up,
        req(&send_raw(
            Some(&[JANE, "Deny.Me@Example.com"]),
            "To: jane.roe@example.com",
        )),
        "modified",
        "send-raw envelope recipient denied",
    )
    .await;
    let v = got.json();
    assert_eq!(v["to"], json!([JANE]));
    assert!(v["raw_message"]
        .as_str()
        .unwrap()
        .contains("To: jane.roe@example.com"));
    // A denied recipient in the MIME headers: the headers are not rewritten, so
    // the request is refused (Mandrill's shape), whatever the envelope says.
    for (to, headers, what) in [
        (
            Some(&[JANE][..]),
            "To: jane.roe@example.com\r\nCc: Deny Me <deny.me@example.com>",
            "Cc denied",
        ),
        (
            Some(&[JANE, DENY][..]),
            "To: jane.roe@example.com, deny.me@example.com",
            "To denied",
        ),
        (
            None,
            "To: jane.roe@example.com\r\nBcc: deny.me@example.com",
            "Bcc denied, no envelope",
        ),
        (
            Some(&[DENY][..]),
            "To: jane.roe@example.com",
            "every envelope recipient denied",
        ),
        (
            Some(&[DENY][..]),
            "To: deny.me@example.com",
            "only the denied patient",
        ),
    ] {
        let r = refused(
            &p,
            &up,
            req(&send_raw(to, headers)),
            451,
            "blocked_by_consent_policy",
            what,
        )
        .await;
        let m = r.json()["message"].as_str().unwrap_or_default().to_string();
        assert!(
            m.starts_with("consentgate: blocked_by_consent_policy"),
            "{what}: {m}"
        );
    }
    // Headers that cannot be read: 422.
    for (raw, what) in [
        ("no header section here\r\n\r\nhello", "no headers"),
        (
            "To: Roe, Jane <jane.roe@example.com>\r\n\r\nhello",
            "unquoted comma",
        ),
    ] {
        let b = json!({"key": "k", "raw_message": raw, "to": [JANE]});
        refused(&p, &up, req(&b), 422, "unreadable_body", what).await;
    }
    assert_eq!(up.count(), 3);
}

// ------------------------------------------------------------ Meta Graph batch

const GRAPH: &str = "graph.facebook.com";
const BATCH: &str = "/v26.0/?access_token=EAAB-token";

fn meta_event(email: &str, custom: Value) -> Value {
    json!({"event_name": "Lead", "event_time": 1763630000, "action_source": "website",
           "user_data": {"em": [email], "client_user_agent": "Mozilla/5.0"},
           "custom_data": custom})
}

/// `urllib.parse.quote` as the Python SDK applies it to each call's params.
fn quote(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'.' | b'-' | b'~' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// An events call as `FacebookAdsApiBatch.add` writes it.
fn events_call(pixel: &str, events: &[Value]) -> Value {
    let data = serde_json::to_string(events).unwrap();
    json!({"method": "POST", "relative_url": format!("{pixel}/events"),
           "body": format!("data={}", quote(&data))})
}

/// The batch body as `FacebookAdsApiBatch.execute` posts it (a form).
fn batch_form(calls: &[Value]) -> Req {
    let body = form_urlencoded::Serializer::new(String::new())
        .append_pair("batch", &serde_json::to_string(calls).unwrap())
        .finish();
    Req::post(GRAPH, BATCH, body).header("content-type", "application/x-www-form-urlencoded")
}

/// The calls of a batch form body as the upstream received it.
fn calls_of(got: &Recorded) -> Vec<Value> {
    let pairs: Vec<(String, String)> = form_urlencoded::parse(&got.body).into_owned().collect();
    let batch = pairs
        .iter()
        .find(|(k, _)| k == "batch")
        .expect("batch field");
    serde_json::from_str(&batch.1).unwrap()
}

/// The events of one call.
fn events_of(call: &Value) -> Vec<Value> {
    let body = call["body"].as_str().unwrap();
    let data = form_urlencoded::parse(body.as_bytes())
        .find(|(k, _)| k == "data")
        .expect("data field")
        .1;
    serde_json::from_str(&data).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn meta_graph_batch() {
    let (p, up) = setup("sdk-meta-batch").await;
    let usd = json!({"value": 10, "currency": "USD"});
    // Granted, already hashed: byte for byte.
    unchanged(
        &p,
        &up,
        batch_form(&[events_call("1234", &[meta_event(&sha(JANE), usd.clone())])]),
        "batch granted",
    )
    .await;
    // Mixed: a denied event goes, a call whose events all go stays with none
    // (Graph's answers stay in the SDK's order), a bodiless GET passes.
    let calls = [
        events_call(
            "1234",
            &[meta_event(JANE, usd.clone()), meta_event(DENY, usd.clone())],
        ),
        json!({"method": "GET", "relative_url": "1234?fields=name"}),
        events_call("v26.0/5678", &[meta_event("+14155550102", usd.clone())]),
    ];
    // The GET carries a query: refused like the call on its own would be.
    refused(
        &p,
        &up,
        batch_form(&calls),
        451,
        "uninspected_endpoint",
        "batch GET with a query",
    )
    .await;
    let calls = [
        calls[0].clone(),
        json!({"method": "GET", "relative_url": "1234"}),
        events_call("v26.0/5678", &[meta_event(DENY, usd.clone())]),
    ];
    let got = forwarded(&p, &up, batch_form(&calls), "modified", "batch mixed").await;
    assert_eq!(got.path_and_query, BATCH);
    let out = calls_of(&got);
    assert_eq!(out.len(), 3, "every call stays, in order");
    assert_eq!(out[1], calls[1]);
    assert_eq!(out[2]["relative_url"], "v26.0/5678/events");
    let first = events_of(&out[0]);
    assert_eq!(first.len(), 1);
    assert_eq!(
        first[0]["user_data"]["em"],
        json!([sha(JANE)]),
        "hashed on the way out"
    );
    assert_eq!(events_of(&out[2]), Vec::<Value>::new());
    // Every event is decided before the guard reads any: an event naming the
    // patient of a later call's kept event (P-1008) is kept; one naming the
    // denied patient is dropped.
    let calls = [
        events_call(
            "1234",
            &[
                meta_event(
                    JANE,
                    json!({"value": 1, "currency": "USD", "referred_by": "Mixed.Case@Gmail.com"}),
                ),
                meta_event(
                    JANE,
                    json!({"value": 2, "currency": "USD", "referred_by": DENY}),
                ),
            ],
        ),
        events_call("5678", &[meta_event("Mixed.Case@Gmail.com", usd.clone())]),
    ];
    let got = forwarded(&p, &up, batch_form(&calls), "modified", "batch guard").await;
    let out = calls_of(&got);
    let first = events_of(&out[0]);
    assert_eq!(
        first.len(),
        1,
        "the event naming the denied patient is dropped"
    );
    assert_eq!(
        first[0]["custom_data"]["referred_by"],
        "Mixed.Case@Gmail.com"
    );
    assert_eq!(events_of(&out[1]).len(), 1);
    // Node's shape: a JSON body, `batch` an array, each call's body raw.
    let data =
        serde_json::to_string(&[meta_event(JANE, usd.clone()), meta_event(DENY, usd.clone())])
            .unwrap();
    let node = json!({"batch": [{"method": "POST", "relative_url": "1234/events", "body": format!("data={data}")}]});
    let got = forwarded(
        &p,
        &up,
        json_post(GRAPH, BATCH, &node),
        "modified",
        "batch JSON",
    )
    .await;
    let v = got.json();
    let ev = events_of(&v["batch"][0]);
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0]["user_data"]["em"], json!([sha(JANE)]));
    // Only the denied patient: refused in Graph's shape.
    let r = refused(
        &p,
        &up,
        batch_form(&[events_call("1234", &[meta_event(DENY, usd.clone())])]),
        451,
        "blocked_by_consent_policy",
        "batch denied",
    )
    .await;
    let m = r.json()["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        m.starts_with("consentgate: blocked_by_consent_policy"),
        "{m}"
    );
    // A call to an endpoint no adapter inspects, with a body: refused.
    refused(
        &p,
        &up,
        batch_form(&[
            events_call("1234", &[meta_event(JANE, usd.clone())]),
            json!({"method": "POST", "relative_url": "me/feed", "body": "message=hello"}),
        ]),
        451,
        "uninspected_endpoint",
        "batch call to me/feed",
    )
    .await;
    // An events call with data in its query: unreadable.
    refused(
        &p,
        &up,
        batch_form(&[json!({"method": "POST", "relative_url": format!("1234/events?data={}", quote("[]")), "body": "data=[]"})]),
        422,
        "unreadable_body",
        "batch events call with ?data=",
    )
    .await;
    assert_eq!(up.count(), 4);
}

// ------------------------------------------------------------ Klaviyo

const KLAVIYO: &str = "a.klaviyo.com";

fn klaviyo(method: &'static str, path: &str, body: &Value) -> Req {
    let mut r = json_post(KLAVIYO, path, body)
        .header("content-type", "application/vnd.api+json")
        .header("revision", "2025-10-15")
        .header("authorization", "Klaviyo-API-Key pk_test");
    r.method = method;
    r
}

fn profile(id: &str, attrs: Value) -> Value {
    json!({"data": {"type": "profile", "id": id, "attributes": attrs}})
}

fn subscriber(email: &str, channels: &[&str]) -> Value {
    let subs: serde_json::Map<String, Value> = channels
        .iter()
        .map(|c| {
            (
                c.to_string(),
                json!({"marketing": {"consent": "SUBSCRIBED"}}),
            )
        })
        .collect();
    json!({"type": "profile", "attributes": {"email": email, "subscriptions": subs}})
}

fn subscription_job(profiles: Vec<Value>) -> Value {
    json!({"data": {"type": "profile-subscription-bulk-create-job",
        "attributes": {"custom_source": "Clinic signup", "profiles": {"data": profiles}, "historical_import": false},
        "relationships": {"list": {"data": {"type": "list", "id": "Y6nRLr"}}}}})
}

#[tokio::test(flavor = "multi_thread")]
async fn klaviyo_resource_endpoints() {
    let (p, up) = setup("sdk-klaviyo").await;
    let subs = "/api/profile-subscription-bulk-create-jobs";
    unchanged(
        &p,
        &up,
        klaviyo(
            "POST",
            subs,
            &subscription_job(vec![subscriber(JANE, &["email"])]),
        ),
        "subscriptions granted",
    )
    .await;
    // P-1009 (email channel denied, marketing SMS granted) may be subscribed by SMS.
    let got = forwarded(
        &p,
        &up,
        klaviyo(
            "POST",
            subs,
            &subscription_job(vec![
                subscriber(JANE, &["email"]),
                subscriber(DENY, &["email", "sms"]),
                subscriber("email.denied.channel@example.com", &["sms"]),
                subscriber("email.denied.channel@example.com", &["email"]),
            ]),
        ),
        "modified",
        "subscriptions mixed",
    )
    .await;
    let v = got.json();
    let kept: Vec<&Value> = v["data"]["attributes"]["profiles"]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| &p["attributes"]["email"])
        .collect();
    assert_eq!(
        kept,
        [&json!(JANE), &json!("email.denied.channel@example.com")]
    );
    assert_eq!(
        v["data"]["attributes"]["profiles"]["data"][1]["attributes"]["subscriptions"],
        json!({"sms": {"marketing": {"consent": "SUBSCRIBED"}}})
    );
    let r = refused(
        &p,
        &up,
        klaviyo(
            "POST",
            subs,
            &subscription_job(vec![subscriber(DENY, &["email"])]),
        ),
        451,
        "blocked_by_consent_policy",
        "subscriptions denied",
    )
    .await;
    assert_eq!(r.json()["errors"][0]["code"], "blocked_by_consent_policy");
    refused(
        &p,
        &up,
        klaviyo(
            "POST",
            subs,
            &subscription_job(vec![subscriber(JANE, &["whatsapp"])]),
        ),
        422,
        "unreadable_body",
        "subscription on a channel consentgate does not decide",
    )
    .await;

    let push = |attrs: Value| {
        json!({"data": {"type": "push-token", "attributes": {
            "token": "a1b2c3d4", "platform": "ios", "vendor": "apns",
            "enablement_status": "AUTHORIZED", "background": "AVAILABLE",
            "profile": profile("01GDDKASAP8TKDDA2GRZDSVP4H", attrs)}}})
    };
    unchanged(
        &p,
        &up,
        klaviyo("POST", "/api/push-tokens", &push(json!({"email": JANE}))),
        "push token granted",
    )
    .await;
    refused(
        &p,
        &up,
        klaviyo(
            "POST",
            "/api/push-tokens",
            &push(json!({"phone_number": "+14155550102"})),
        ),
        451,
        "blocked_by_consent_policy",
        "push token denied",
    )
    .await;

    let bis = |email: &str| {
        json!({"data": {"type": "back-in-stock-subscription", "attributes": {
            "channels": ["EMAIL"], "profile": profile("01GDDKASAP8TKDDA2GRZDSVP4H", json!({"email": email}))},
            "relationships": {"variant": {"data": {"type": "catalog-variant", "id": "$custom:::$default:::SKU-1"}}}}})
    };
    let path = "/api/back-in-stock-subscriptions";
    unchanged(
        &p,
        &up,
        klaviyo("POST", path, &bis(JANE)),
        "back in stock granted",
    )
    .await;
    refused(
        &p,
        &up,
        klaviyo("POST", path, &bis(DENY)),
        451,
        "blocked_by_consent_policy",
        "back in stock denied",
    )
    .await;

    // A merge names profiles by id (an index that synced them as external ids);
    // one that must not be sent refuses the merge.
    let merge = |from: &str| {
        json!({"data": {"type": "profile-merge", "id": "crm:0031x00000abc",
            "relationships": {"profiles": {"data": [{"type": "profile", "id": from}]}}}})
    };
    unchanged(
        &p,
        &up,
        klaviyo("POST", "/api/profile-merge", &merge("crm:0031x00000sso")),
        "merge granted",
    )
    .await;
    refused(
        &p,
        &up,
        klaviyo("POST", "/api/profile-merge", &merge("crm:0031x00000den")),
        451,
        "blocked_by_consent_policy",
        "merge naming the denied patient",
    )
    .await;

    let id = "01GDDKASAP8TKDDA2GRZDSVP4H";
    let got = unchanged(
        &p,
        &up,
        klaviyo(
            "PATCH",
            &format!("/api/profiles/{id}"),
            &profile(id, json!({"email": JANE, "first_name": "Jane"})),
        ),
        "PATCH profile granted",
    )
    .await;
    assert_eq!(got.method, "PATCH");
    refused(
        &p,
        &up,
        klaviyo(
            "PATCH",
            &format!("/api/profiles/{id}"),
            &profile(
                id,
                json!({"external_id": "crm:0031x00000den", "first_name": "D"}),
            ),
        ),
        451,
        "blocked_by_consent_policy",
        "PATCH profile denied",
    )
    .await;
    assert_eq!(up.count(), 6);
}

// ------------------------------------------------------------ HubSpot

const HUBSPOT: &str = "api.hubapi.com";

fn eq(prop: &str, v: &str) -> Value {
    json!({"propertyName": prop, "operator": "EQ", "value": v})
}

fn search(groups: Vec<Vec<Value>>) -> Value {
    let groups: Vec<Value> = groups.into_iter().map(|f| json!({"filters": f})).collect();
    json!({"filterGroups": groups, "properties": ["email", "firstname", "lastname"], "limit": 10, "after": "0"})
}

#[tokio::test(flavor = "multi_thread")]
async fn hubspot_search_and_batch_read() {
    let (p, up) = setup("sdk-hubspot").await;
    let s = "/crm/v3/objects/contacts/search";
    let req = |path: &str, b: &Value| {
        json_post(HUBSPOT, path, b).header("authorization", "Bearer pat-na1")
    };
    unchanged(
        &p,
        &up,
        req(s, &search(vec![vec![eq("email", JANE)]])),
        "search granted",
    )
    .await;
    unchanged(
        &p,
        &up,
        req(
            s,
            &search(vec![
                vec![eq("email", JANE)],
                vec![eq("phone", "+14155550100")],
            ]),
        ),
        "search, two groups granted",
    )
    .await;
    // One denied person among granted ones: the search cannot be narrowed
    // safely, so it is refused whole.
    for (body, what) in [
        (search(vec![vec![eq("email", DENY)]]), "search denied"),
        (
            search(vec![
                vec![eq("email", JANE)],
                vec![eq("mobilephone", "(415) 555-0102")],
            ]),
            "search, denied phone",
        ),
        (
            search(vec![vec![
                json!({"propertyName": "email", "operator": "IN", "values": [JANE, DENY]}),
            ]]),
            "search IN",
        ),
        (
            json!({"query": DENY, "properties": ["email"]}),
            "free-text search",
        ),
        (
            search(vec![vec![eq("lifecyclestage", "lead")]]),
            "search naming nobody",
        ),
    ] {
        let r = refused(
            &p,
            &up,
            req(s, &body),
            451,
            "blocked_by_consent_policy",
            what,
        )
        .await;
        assert_eq!(r.json()["category"], "BLOCKED_BY_CONSENT_POLICY", "{what}");
    }
    let read = "/crm/v3/objects/contacts/batch/read";
    let batch = |ids: &[&str]| {
        json!({"idProperty": "email", "inputs": ids.iter().map(|i| json!({"id": i})).collect::<Vec<_>>(),
               "properties": ["email", "firstname"], "propertiesWithHistory": [], "archived": false})
    };
    unchanged(
        &p,
        &up,
        req(read, &batch(&[JANE, "Mixed.Case@Gmail.com"])),
        "batch read granted",
    )
    .await;
    refused(
        &p,
        &up,
        req(read, &batch(&[JANE, DENY])),
        451,
        "blocked_by_consent_policy",
        "batch read denied",
    )
    .await;
    refused(
        &p,
        &up,
        req(
            read,
            &json!({"inputs": [{"id": "crm:0031x00000den"}], "properties": ["email"]}),
        ),
        451,
        "blocked_by_consent_policy",
        "batch read by id, denied",
    )
    .await;
    refused(
        &p,
        &up,
        req(s, &json!({"filterGroups": {}})),
        422,
        "unreadable_body",
        "search shape",
    )
    .await;
    assert_eq!(up.count(), 3);
}

// ------------------------------------------------------------ Mailchimp

const MAILCHIMP: &str = "us21.api.mailchimp.com";

fn mc(method: &'static str, path: &str, body: &Value) -> Req {
    let mut r =
        json_post(MAILCHIMP, path, body).header("authorization", "Basic YW55c3RyaW5nOmtleS11czIx");
    r.method = method;
    r
}

#[tokio::test(flavor = "multi_thread")]
async fn mailchimp_member_actions_customers_and_journeys() {
    let (p, up) = setup("sdk-mailchimp").await;
    let member =
        |email: &str, action: &str| format!("/3.0/lists/a1b2c3/members/{}/{action}", md5(email));
    let event = |email: Option<&str>| {
        let mut b = json!({"name": "appointment_booked", "properties": {"clinic": "north"}, "is_syncing": false});
        if let Some(e) = email {
            b["email_address"] = json!(e);
        }
        b
    };
    unchanged(
        &p,
        &up,
        mc("POST", &member(JANE, "events"), &event(Some(JANE))),
        "member event granted",
    )
    .await;
    unchanged(
        &p,
        &up,
        mc(
            "POST",
            &member(JANE, "tags"),
            &json!({"tags": [{"name": "flu-2026", "status": "active"}], "email_address": JANE}),
        ),
        "member tags granted",
    )
    .await;
    let r = refused(
        &p,
        &up,
        mc("POST", &member(DENY, "events"), &event(Some(DENY))),
        451,
        "blocked_by_consent_policy",
        "member event denied",
    )
    .await;
    assert_eq!(r.header("content-type"), Some("application/problem+json"));
    // The subscriber hash alone: the denied patient's hash never leaves.
    for action in ["events", "tags", "notes"] {
        refused(
            &p,
            &up,
            mc(
                "POST",
                &member(DENY, action),
                &json!({"note": "called", "tags": []}),
            ),
            451,
            "blocked_by_consent_policy",
            &format!("member {action} by hash, denied"),
        )
        .await;
    }
    // The address in place of the hash (Mailchimp accepts it).
    refused(
        &p,
        &up,
        mc(
            "POST",
            "/3.0/lists/a1b2c3/members/deny.me%40example.com/notes",
            &json!({"note": "called"}),
        ),
        451,
        "blocked_by_consent_policy",
        "member note by address, denied",
    )
    .await;

    let customer = |email: &str| {
        json!({"id": "cust-7", "email_address": email, "opt_in_status": true,
               "first_name": "Pat", "address": {"city": "Oakland", "country_code": "US"}})
    };
    let c = "/3.0/ecommerce/stores/store-1/customers";
    unchanged(
        &p,
        &up,
        mc("POST", c, &customer(JANE)),
        "store customer granted",
    )
    .await;
    unchanged(
        &p,
        &up,
        mc("PUT", &format!("{c}/cust-7"), &customer(JANE)),
        "store customer PUT granted",
    )
    .await;
    refused(
        &p,
        &up,
        mc("PATCH", &format!("{c}/cust-7"), &customer(DENY)),
        451,
        "blocked_by_consent_policy",
        "store customer denied",
    )
    .await;
    refused(
        &p,
        &up,
        mc(
            "PATCH",
            &format!("{c}/cust-7"),
            &json!({"first_name": "Pat"}),
        ),
        451,
        "blocked_by_consent_policy",
        "store customer naming nobody",
    )
    .await;

    let t = "/3.0/customer-journeys/journeys/12/steps/34/actions/trigger";
    unchanged(
        &p,
        &up,
        mc("POST", t, &json!({"email_address": JANE})),
        "journey trigger granted",
    )
    .await;
    refused(
        &p,
        &up,
        mc("POST", t, &json!({"email_address": DENY})),
        451,
        "blocked_by_consent_policy",
        "journey trigger denied",
    )
    .await;
    refused(
        &p,
        &up,
        mc("POST", t, &json!(["x"])),
        422,
        "unreadable_body",
        "journey trigger shape",
    )
    .await;
    assert_eq!(up.count(), 5);
}

/// The subscriber hash alone names the member once the consent index keeps the
/// MD5 of each normalised address (`IdKey::EmailMd5`).
#[tokio::test(flavor = "multi_thread")]
async fn mailchimp_member_action_by_hash_only() {
    let (p, up) = setup("sdk-mailchimp-md5").await;
    let path = format!("/3.0/lists/a1b2c3/members/{}/events", md5(JANE));
    unchanged(
        &p,
        &up,
        mc(
            "POST",
            &path,
            &json!({"name": "appointment_booked", "properties": {"clinic": "north"}}),
        ),
        "member event by hash, granted",
    )
    .await;
    unchanged(
        &p,
        &up,
        mc(
            "POST",
            &format!("/3.0/lists/a1b2c3/members/{}/notes", md5(JANE)),
            &json!({"note": "called back"}),
        ),
        "member note by hash, granted",
    )
    .await;
    refused(
        &p,
        &up,
        mc(
            "POST",
            &format!("/3.0/lists/a1b2c3/members/{}/events", md5(DENY)),
            &json!({"name": "x"}),
        ),
        451,
        "blocked_by_consent_policy",
        "member event by hash, denied",
    )
    .await;
    assert_eq!(up.count(), 2);
}

// ------------------------------------------------------------ GA4 on gtag's regional hosts

const GA_REGION: &str = "region1.analytics.google.com";

/// A proxy whose upstream also answers for gtag's regional host.
async fn setup_region(name: &str) -> (Proxy, Upstream) {
    let dir = test_dir(name);
    let mut hosts = VENDOR_HOSTS.to_vec();
    hosts.push(GA_REGION);
    let ca = test_ca(&dir.join("upstream"), &hosts);
    let up = start_upstream(&ca).await;
    let (pp, ap) = (free_port(), free_port());
    let yaml = config_yaml(&dir, up.addr, &ca, &ProxyOpts::default(), pp, ap).replacen(
        "  resolve:\n",
        &format!("  resolve:\n    \"{GA_REGION}:443\": \"{}\"\n", up.addr),
        1,
    );
    let config = dir.join("consentgate.yaml");
    std::fs::write(&config, yaml).unwrap();
    (spawn_proxy(&dir, &config, pp, ap), up)
}

fn hit(uid: &str) -> String {
    let pairs = [
        ("v", "2"),
        ("tid", "G-TEST123"),
        ("cid", "555123.1763600000"),
        ("uid", uid),
        ("en", "page_view"),
        ("dl", "https://hospital.example/appointments"),
    ];
    let q = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish();
    format!("/g/collect?{q}")
}

#[tokio::test(flavor = "multi_thread")]
async fn ga4_on_gtag_regional_host() {
    let (p, up) = setup_region("sdk-ga4-region").await;
    let mp = "/mp/collect?measurement_id=G-TEST123&api_secret=SECRET";
    let body = |uid: &str, email: &str| {
        json!({"client_id": "555123.1763600000", "user_id": uid,
               "user_data": {"sha256_email_address": [sha(email)]},
               "events": [{"name": "page_view", "params": {"engagement_time_msec": 100}}]})
    };
    let got = unchanged(
        &p,
        &up,
        json_post(GA_REGION, mp, &body("P-1001", JANE)),
        "mp/collect granted",
    )
    .await;
    assert_eq!(got.sni.as_deref(), Some(GA_REGION));
    unchanged(
        &p,
        &up,
        json_post(GA_REGION, &format!("/debug{mp}"), &body("P-1001", JANE)),
        "debug/mp/collect granted",
    )
    .await;
    refused(
        &p,
        &up,
        json_post(GA_REGION, mp, &body("P-1002", DENY)),
        451,
        "blocked_by_consent_policy",
        "mp/collect denied",
    )
    .await;
    unchanged(
        &p,
        &up,
        Req::get(GA_REGION, &hit("P-1001")),
        "g/collect granted",
    )
    .await;
    refused(
        &p,
        &up,
        Req::get(GA_REGION, &hit("P-1002")),
        451,
        "blocked_by_consent_policy",
        "g/collect denied",
    )
    .await;
    // Still fail closed off the inspected paths.
    refused(
        &p,
        &up,
        json_post(GA_REGION, "/collect", &json!({"uid": "P-1001"})),
        451,
        "uninspected_endpoint",
        "another path on the regional host",
    )
    .await;
    assert_eq!(up.count(), 3);
}
