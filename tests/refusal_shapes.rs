//! Issue 17 build item 1 through the running binary: every built-in adapter
//! whose vendor has an error body answers its refusals in that vendor's shape
//! (the SDK suite checks five of them against the SDKs themselves; this checks
//! the adapter → shape wiring of all of them on the wire), with the vendor
//! message starting `consentgate: <code>` and the contract fields under
//! `"consentgate"`; the destinations without one answer plain; and
//! `refusal_format` per destination switches between the two.

mod common;
use common::*;
use serde_json::{json, Value};

const CODE: &str = "uninspected_endpoint";
/// No adapter inspects this path on any host: a body sent to it is refused.
const PATH: &str = "/consentgate-test/not-an-endpoint";

/// One destination's expected refusal.
struct Case {
    host: &'static str,
    status: u16,
    content_type: &'static str,
    /// JSON pointer of the vendor's message field.
    message: &'static str,
    /// Other fields the SDKs read: (JSON pointer, value).
    fields: Vec<(&'static str, Value)>,
}

fn vendor_cases() -> Vec<Case> {
    let json_ct = "application/json";
    vec![
        Case {
            host: "graph.facebook.com",
            status: 451,
            content_type: json_ct,
            message: "/error/message",
            fields: vec![
                ("/error/type", json!("ConsentgateRefusal")),
                ("/error/code", json!(451)),
                ("/error/is_transient", json!(false)),
            ],
        },
        Case {
            host: "api.twilio.com",
            status: 451,
            content_type: json_ct,
            message: "/message",
            fields: vec![
                ("/code", json!(451)),
                ("/status", json!(451)),
                ("/more_info", Value::Null),
            ],
        },
        Case {
            host: "api.sendgrid.com",
            status: 451,
            content_type: json_ct,
            message: "/errors/0/message",
            fields: vec![],
        },
        Case {
            host: "us21.api.mailchimp.com",
            status: 451,
            content_type: "application/problem+json",
            message: "/detail",
            fields: vec![
                ("/title", json!(format!("consentgate: {CODE}"))),
                ("/status", json!(451)),
            ],
        },
        Case {
            host: "mandrillapp.com",
            status: 451,
            content_type: json_ct,
            message: "/message",
            fields: vec![
                ("/status", json!("error")),
                ("/name", json!("ConsentgateRefusal")),
            ],
        },
        Case {
            host: "a.klaviyo.com",
            status: 451,
            content_type: "application/vnd.api+json",
            message: "/errors/0/detail",
            fields: vec![
                ("/errors/0/code", json!(CODE)),
                ("/errors/0/status", json!(451)),
            ],
        },
        Case {
            host: "rest.iad-01.braze.com",
            status: 451,
            content_type: json_ct,
            message: "/message",
            fields: vec![],
        },
        Case {
            host: "api.hubapi.com",
            status: 451,
            content_type: json_ct,
            message: "/message",
            fields: vec![
                ("/status", json!("error")),
                ("/category", json!(CODE.to_ascii_uppercase())),
            ],
        },
        // TikTok reports errors as HTTP 200 with a non-zero code (docs/SDKS.md).
        Case {
            host: "business-api.tiktok.com",
            status: 200,
            content_type: json_ct,
            message: "/message",
            fields: vec![("/code", json!(45100))],
        },
        Case {
            host: "api.pinterest.com",
            status: 451,
            content_type: json_ct,
            message: "/message",
            fields: vec![("/code", json!(451))],
        },
        Case {
            host: "api.linkedin.com",
            status: 451,
            content_type: json_ct,
            message: "/message",
            fields: vec![
                ("/status", json!(451)),
                ("/code", json!(CODE.to_ascii_uppercase())),
            ],
        },
        Case {
            host: "tr.snapchat.com",
            status: 451,
            content_type: json_ct,
            message: "/debug_message",
            fields: vec![("/request_status", json!("ERROR"))],
        },
        Case {
            host: "googleads.googleapis.com",
            status: 451,
            content_type: json_ct,
            message: "/error/message",
            fields: vec![
                ("/error/code", json!(451)),
                ("/error/status", json!("PERMISSION_DENIED")),
                ("/error/details/0/domain", json!("consentgate")),
            ],
        },
    ]
}

fn refused(host: &str) -> Req {
    Req::post(host, PATH, r#"{"email":"jane.roe@example.com"}"#)
        .header("content-type", "application/json")
}

fn assert_plain(r: &Resp, what: &str) {
    assert_eq!(
        r.status,
        451,
        "{what}: {}",
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(r.header("content-type"), Some("application/json"), "{what}");
    let j = r.json();
    assert_eq!(j["error"], CODE, "{what}: {j}");
    assert_eq!(
        j["request_id"],
        r.header("x-consentgate-request-id").unwrap(),
        "{what}: {j}"
    );
    assert!(j.get("consentgate").is_none(), "{what}: plain, got {j}");
}

#[tokio::test(flavor = "multi_thread")]
async fn every_vendor_adapter_refuses_in_its_vendors_shape_and_refusal_format_switches_it() {
    let dir = test_dir("refusal-shapes");
    let ca = test_ca(&dir.join("upstream"), VENDOR_HOSTS);
    let up = start_upstream(&ca).await;
    let p = start_proxy(&dir, &up, &ca, ProxyOpts::default());

    for c in vendor_cases() {
        let r = send(p.proxy, refused(c.host)).await;
        let what = c.host;
        assert_eq!(
            r.status,
            c.status,
            "{what}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(r.decision(), "blocked", "{what}");
        assert_eq!(r.header("content-type"), Some(c.content_type), "{what}");
        let id = r.header("x-consentgate-request-id").unwrap().to_string();
        let j = r.json();
        // The contract fields, under "consentgate".
        assert_eq!(j["consentgate"]["error"], CODE, "{what}: {j}");
        assert_eq!(j["consentgate"]["request_id"], id.as_str(), "{what}: {j}");
        assert!(
            j["consentgate"]["detail"].is_string(),
            "{what}: the contract's detail: {j}"
        );
        // The vendor's message field, as the SDK shows it.
        let msg = j
            .pointer(c.message)
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("{what}: no message at {}: {j}", c.message));
        assert!(
            msg.starts_with(&format!("consentgate: {CODE}")) && msg.contains(&id),
            "{what}: {msg:?}"
        );
        for (ptr, want) in &c.fields {
            assert_eq!(j.pointer(ptr), Some(want), "{what} {ptr}: {j}");
        }
    }

    // Vendors without an error body of their own: plain.
    for host in ["www.google-analytics.com", "api.mypurecloud.com"] {
        assert_plain(&send(p.proxy, refused(host)).await, host);
    }
    assert_eq!(up.count(), 0, "nothing reached a vendor");
    drop(p);

    // `refusal_format: plain` on a vendor-shaped destination, `vendor` on one
    // whose vendor has no shape (it stays plain).
    let dir = test_dir("refusal-shapes-format");
    let opts = ProxyOpts {
        extra_yaml: "destinations:\n  - {name: klaviyo, refusal_format: plain}\n  \
                     - {name: tiktok_events, refusal_format: plain}\n  \
                     - {name: ga4_mp, refusal_format: vendor}\n"
            .into(),
        ..Default::default()
    };
    let p = start_proxy(&dir, &up, &ca, opts);
    for host in [
        "a.klaviyo.com",
        "business-api.tiktok.com",
        "www.google-analytics.com",
    ] {
        assert_plain(&send(p.proxy, refused(host)).await, host);
    }
    // The others keep their vendor's shape.
    let r = send(p.proxy, refused("graph.facebook.com")).await;
    assert_eq!(r.status, 451);
    assert!(r.json()["error"]["message"].is_string(), "{:?}", r.json());
    assert_eq!(up.count(), 0);
}
