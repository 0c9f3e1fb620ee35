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
async fn ga4_reads_its_credentials_and_decides_g_collect_hits() {
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
    // A gtag/server-side GTM hit carries the user in the query: each hit is
    // decided with the GA4 policy (issue 16.1, issue 17.2).
    let ga = "www.google-analytics.com";
    let hit = |uid: &str, extra: &[(&str, &str)]| {
        let mut pairs = vec![
            ("v", "2"),
            ("tid", "G-TEST"),
            ("cid", "111.222"),
            ("uid", uid),
            ("en", "page_view"),
            ("dl", "https://hospital.example/oncology/appointments?id=7"),
        ];
        pairs.extend_from_slice(extra);
        format!("/g/collect?{}", q(&pairs))
    };
    let r = send(p.proxy, Req::get(ga, &hit("P-1002", &[]))).await;
    refused(
        &r,
        451,
        "blocked_by_consent_policy",
        "/g/collect, denied uid",
    );
    assert_eq!(
        up.count(),
        1,
        "nothing of the denied patient's hit was sent"
    );
    // Granted: the hit leaves as it came.
    let granted = hit("P-1001", &[("ep.note", "x")]);
    let r = send(p.proxy, Req::get(ga, &granted)).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.decision(), "allowed");
    assert_eq!(up.last().path_and_query, granted);
    // Sale/share opt-out (P-1003): uid gone, cid replaced, npa=1.
    let r = send(p.proxy, Req::get(ga, &hit("P-1003", &[]))).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.decision(), "modified");
    let got = up.last().path_and_query;
    let pairs: Vec<(String, String)> =
        form_urlencoded::parse(got.split_once('?').unwrap().1.as_bytes())
            .into_owned()
            .collect();
    assert!(!pairs.iter().any(|(k, _)| k == "uid"), "{got}");
    assert!(
        pairs.iter().any(|(k, v)| k == "cid" && v != "111.222"),
        "{got}"
    );
    assert!(pairs.iter().any(|(k, v)| k == "npa" && v == "1"), "{got}");
    // limit_sensitive (P-1004): the page URL reduced, custom parameters gone.
    let r = send(
        p.proxy,
        Req::get(
            ga,
            &hit("P-1004", &[("ep.search_term", "chemo"), ("dt", "Oncology")]),
        ),
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let got = up.last().path_and_query;
    assert!(
        !got.contains("oncology") && !got.contains("chemo") && !got.contains("Oncology"),
        "{got}"
    );
    // POST: shared parameters in the query, one hit per body line.
    let post = format!(
        "/g/collect?{}",
        q(&[
            ("v", "2"),
            ("tid", "G-TEST"),
            ("cid", "1.2"),
            ("uid", "P-1002")
        ])
    );
    let lines = "en=page_view&dl=https%3A%2F%2Fh.example%2F\nen=scroll";
    let n = up.count();
    let r = send(p.proxy, Req::post(ga, &post, lines)).await;
    refused(
        &r,
        451,
        "blocked_by_consent_policy",
        "/g/collect POST, denied uid",
    );
    // A denied patient's address in a granted hit: the guard's last pass.
    let r = send(
        p.proxy,
        Req::get(ga, &hit("P-1001", &[("ep.cc", "deny.me@example.com")])),
    )
    .await;
    refused(
        &r,
        451,
        "foreign_identifier",
        "/g/collect, denied address in a granted hit",
    );
    // Two users in one request cannot be decided as one.
    let two = format!("{post}&{}", q(&[("uid", "P-1001")]));
    let r = send(p.proxy, Req::post(ga, &two, lines)).await;
    refused(&r, 422, "unreadable_body", "/g/collect, two uids");
    assert_eq!(up.count(), n);
    for g in up.requests() {
        assert_absent(g.path_and_query.as_bytes(), DENIED, "ga4 upstream query");
        assert_absent(&g.body, DENIED, "ga4 upstream body");
    }
    // A user id in an /mp/collect query is not what GA4 reads there.
    let bad = format!("{ok}&{}", q(&[("uid", "P-1002")]));
    let r = send(
        p.proxy,
        Req::post("www.google-analytics.com", &bad, body.to_string()),
    )
    .await;
    refused(&r, 422, "unreadable_body", "uid in the mp query");
    assert_eq!(up.count(), n);
}
