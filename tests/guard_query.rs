//! Issue 16, Build 1: query strings are read like bodies. Through the running
//! proxy to the recording upstream: a query that carries data to an endpoint no
//! adapter inspects is refused (451 `uninspected_endpoint`), a query parameter an
//! inspected endpoint's adapter does not read is refused (422 `unreadable_body`),
//! and nothing of the denied patient arrives in any form.

mod common;
use common::*;
use serde_json::json;

const META: &str = "graph.facebook.com";
const TWILIO: &str = "api.twilio.com";
const MESSAGES: &str = "/2010-04-01/Accounts/AC0123456789abcdef0123456789abcdef/Messages.json";
/// P-1002: every category denied.
const DENIED: &[&str] = &["deny.me@example.com", "+14155550102", "crm:0031x00000den"];

fn meta_data(email: &str) -> String {
    json!([{"event_name": "Lead", "event_time": 1763600000, "action_source": "website",
            "user_data": {"em": [email]}}])
    .to_string()
}

fn q(pairs: &[(&str, &str)]) -> String {
    form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish()
}

async fn setup(name: &str) -> (Proxy, Upstream) {
    let dir = test_dir(name);
    let ca = test_ca(&dir.join("upstream"), VENDOR_HOSTS);
    let up = start_upstream(&ca).await;
    (start_proxy(&dir, &up, &ca, ProxyOpts::default()), up)
}

fn refused(r: &Resp, status: u16, code: &str, what: &str) {
    assert_eq!(
        r.status,
        status,
        "{what}: {}",
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(r.contract()["error"], code, "{what}");
    assert_eq!(r.decision(), "blocked", "{what}");
    assert_absent(&r.body, DENIED, what);
}

#[tokio::test(flavor = "multi_thread")]
async fn graph_queries_with_data_are_refused_and_credentials_pass() {
    let (p, up) = setup("query-graph").await;
    let denied = meta_data("deny.me@example.com");
    // Graph reads query parameters, `method=post` included: a GET is a POST to it.
    let cases = [
        (
            "GET ?data=",
            Req::get(META, &format!("/v19.0/1/events?{}", q(&[("data", &denied)]))),
            451,
            "uninspected_endpoint",
        ),
        (
            "GET ?method=post&data=",
            Req::get(
                META,
                &format!(
                    "/v19.0/1/events?{}",
                    q(&[("method", "post"), ("data", &denied), ("access_token", "t")])
                ),
            ),
            451,
            "uninspected_endpoint",
        ),
        (
            "GET of another Graph endpoint with a query",
            Req::get(META, "/v19.0/me?fields=email&access_token=t"),
            451,
            "uninspected_endpoint",
        ),
        (
            "?data= beside a granted body",
            Req::post(
                META,
                &format!("/v19.0/1/events?{}", q(&[("data", &denied)])),
                json!({"data": serde_json::from_str::<serde_json::Value>(&meta_data("jane.roe@example.com")).unwrap()}).to_string(),
            ),
            422,
            "unreadable_body",
        ),
        (
            "?DATA= (another case) beside a granted body",
            Req::post(
                META,
                &format!("/v19.0/1/events?{}", q(&[("DATA", &denied)])),
                json!({"data": []}).to_string(),
            ),
            422,
            "unreadable_body",
        ),
    ];
    for (what, req, status, code) in cases {
        let r = send(p.proxy, req).await;
        refused(&r, status, code, what);
        if code == "unreadable_body" {
            // The parameter is named (its name is not anyone's data); the value is not echoed.
            assert!(
                r.contract()["detail"]
                    .as_str()
                    .unwrap()
                    .contains("query parameter `"),
                "{what}"
            );
        }
    }
    assert_eq!(up.count(), 0, "nothing of those requests went upstream");

    // A parameter that carries a person's data in its *name* is not echoed back.
    let r = send(
        p.proxy,
        Req::post(
            META,
            "/v19.0/1/events?deny.me%40example.com=1",
            json!({"data": []}).to_string(),
        ),
    )
    .await;
    refused(&r, 422, "unreadable_body", "a name that is an address");
    assert!(r.contract()["detail"]
        .as_str()
        .unwrap()
        .contains("a query parameter"));

    // Credentials in the query are what Graph reads there: the request passes.
    let body = json!({"data": serde_json::from_str::<serde_json::Value>(&meta_data("jane.roe@example.com")).unwrap()});
    let path = "/v19.0/1/events?access_token=EAAB123&appsecret_proof=abc";
    let r = send(p.proxy, Req::post(META, path, body.to_string())).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(up.count(), 1);
    assert_eq!(up.last().path_and_query, path);
    // A body-less request without a query still passes (nothing to read).
    let r = send(p.proxy, Req::get(META, "/v19.0/1")).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(up.count(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn twilio_query_fields_and_legacy_paths_are_read() {
    let (p, up) = setup("query-twilio").await;
    let form = |to: &str| {
        form_urlencoded::Serializer::new(String::new())
            .append_pair("To", to)
            .append_pair("From", "+14155559999")
            .append_pair("Body", "Your appointment is tomorrow")
            .finish()
    };
    let sms = |path: &str, to: &str| {
        Req::post(TWILIO, path, form(to))
            .header("content-type", "application/x-www-form-urlencoded")
            .header("x-consent-category", "appointment_reminders")
    };
    // `To=` in the query beside a granted body: Twilio reads query fields too.
    let r = send(
        p.proxy,
        sms(
            &format!("{MESSAGES}?{}", q(&[("To", "+14155550102")])),
            "+14155550100",
        ),
    )
    .await;
    refused(&r, 422, "unreadable_body", "To in the query");
    assert_eq!(up.count(), 0);
    // The legacy paths are the same resource, inspected the same way.
    let base = "/2010-04-01/Accounts/AC0123456789abcdef0123456789abcdef";
    for path in [
        format!("{base}/Messages"),
        format!("{base}/Messages.xml"),
        format!("{base}/SMS/Messages"),
        format!("{base}/SMS/Messages.json"),
    ] {
        let r = send(p.proxy, sms(&path, "+14155550102")).await;
        refused(&r, 451, "blocked_by_consent_policy", &path);
        let n = up.count();
        let r = send(p.proxy, sms(&path, "+14155550100")).await;
        assert_eq!(
            r.status,
            200,
            "{path}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(up.count(), n + 1, "{path}");
    }
    for got in up.requests() {
        assert_absent(&got.body, DENIED, "twilio upstream body");
        assert_absent(
            got.path_and_query.as_bytes(),
            DENIED,
            "twilio upstream query",
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn ga4_reads_its_credentials_and_refuses_other_hits() {
    let (p, up) = setup("query-ga4").await;
    let body = json!({"client_id": "123.456", "user_id": "P-1001",
                      "events": [{"name": "page_view", "params": {}}]});
    let ok = "/mp/collect?measurement_id=G-TEST&api_secret=s3cret";
    let r = send(
        p.proxy,
        Req::post("www.google-analytics.com", ok, body.to_string()),
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(up.count(), 1);
    // A gtag/server-side GTM hit carries the user in the query: not inspected, refused.
    let hit = format!(
        "/g/collect?{}",
        q(&[
            ("v", "2"),
            ("tid", "G-TEST"),
            ("uid", "P-1002"),
            ("em", "deny.me@example.com")
        ])
    );
    let r = send(p.proxy, Req::get("www.google-analytics.com", &hit)).await;
    refused(&r, 451, "uninspected_endpoint", "/g/collect");
    // A user id in an /mp/collect query is not what GA4 reads there.
    let bad = format!("{ok}&{}", q(&[("uid", "P-1002")]));
    let r = send(
        p.proxy,
        Req::post("www.google-analytics.com", &bad, body.to_string()),
    )
    .await;
    refused(&r, 422, "unreadable_body", "uid in the mp query");
    assert_eq!(up.count(), 1);
}
