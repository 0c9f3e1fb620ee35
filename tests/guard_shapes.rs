//! Issue 16, Build 2: identity fields in an unknown shape, and keys that differ
//! only in case or separators from a known identity or container key, make the
//! request 422 `unreadable_body` naming the field path. Through the running proxy
//! to the recording upstream: nothing of the denied patient arrives, in any form.

mod common;
use common::*;
use serde_json::{json, Value};

/// P-1002: every category denied.
const DENIED: &[&str] = &["deny.me@example.com", "+14155550102", "crm:0031x00000den"];

async fn setup(name: &str) -> (Proxy, Upstream) {
    let dir = test_dir(name);
    let ca = test_ca(&dir.join("upstream"), VENDOR_HOSTS);
    let up = start_upstream(&ca).await;
    (start_proxy(&dir, &up, &ca, ProxyOpts::default()), up)
}

fn meta(ev: Value) -> Req {
    let mut e = json!({"event_name": "Lead", "event_time": 1763600000, "action_source": "website"});
    if let (Some(m), Value::Object(x)) = (e.as_object_mut(), ev) {
        m.extend(x);
    }
    Req::post(
        "graph.facebook.com",
        "/v19.0/1/events",
        json!({"data": [e]}).to_string(),
    )
}

fn tiktok(ev: Value) -> Req {
    let mut e = json!({"event": "ViewContent", "event_time": 1763600000});
    if let (Some(m), Value::Object(x)) = (e.as_object_mut(), ev) {
        m.extend(x);
    }
    let body = json!({"event_source": "web", "event_source_id": "PX", "data": [e]});
    Req::post(
        "business-api.tiktok.com",
        "/open_api/v1.3/event/track/",
        body.to_string(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn look_alike_keys_and_odd_shapes_are_unreadable() {
    let (p, up) = setup("guard-shapes").await;
    let cases = [
        (
            "Meta EM beside em",
            meta(
                json!({"user_data": {"em": ["jane.roe@example.com"], "EM": ["deny.me@example.com"]}}),
            ),
            "user_data.EM",
        ),
        (
            "Meta User_Data beside user_data",
            meta(
                json!({"user_data": {"em": ["jane.roe@example.com"]}, "User_Data": {"em": ["deny.me@example.com"]}}),
            ),
            "User_Data",
        ),
        (
            "Meta em as an object",
            meta(
                json!({"user_data": {"em": {"value": "deny.me@example.com"}, "ph": ["+14155550100"]}}),
            ),
            "user_data.em",
        ),
        (
            "Meta em as a list of objects",
            meta(
                json!({"user_data": {"em": [{"v": "deny.me@example.com"}], "external_id": ["P-1001"]}}),
            ),
            "user_data.em",
        ),
        (
            "Meta external-id",
            meta(
                json!({"user_data": {"em": ["jane.roe@example.com"], "external-id": ["crm:0031x00000den"]}}),
            ),
            "user_data.external-id",
        ),
        (
            "Meta user_data as a list",
            meta(json!({"user_data": [{"em": "deny.me@example.com"}]})),
            "user_data",
        ),
        (
            "TikTok Email beside email",
            tiktok(
                json!({"user": {"email": ["jane.roe@example.com"], "Email": ["deny.me@example.com"]}}),
            ),
            "user.Email",
        ),
        (
            "TikTok User beside user",
            tiktok(
                json!({"user": {"email": ["jane.roe@example.com"]}, "User": {"email": ["deny.me@example.com"]}}),
            ),
            "User",
        ),
        (
            "TikTok email as an object",
            tiktok(
                json!({"user": {"email": {"x": "deny.me@example.com"}, "phone": ["+14155550100"]}}),
            ),
            "user.email",
        ),
    ];
    for (what, req, path) in cases {
        let r = send(p.proxy, req).await;
        // TikTok's SDKs read refusals as TikTok answers them: 200 with a code.
        let status = if what.starts_with("TikTok") { 200 } else { 422 };
        assert_eq!(
            r.status,
            status,
            "{what}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(r.decision(), "blocked", "{what}");
        let c = r.contract();
        assert_eq!(c["error"], "unreadable_body", "{what}");
        let detail = c["detail"].as_str().unwrap_or_default();
        assert!(detail.contains(&format!("`{path}`")), "{what}: {detail}");
        assert_absent(&r.body, DENIED, what);
    }
    assert_eq!(up.count(), 0, "nothing of those requests went upstream");
    // The expected shapes still pass.
    let r = send(
        p.proxy,
        meta(json!({"user_data": {"em": ["jane.roe@example.com"], "ph": "+14155550100"}})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let r = send(
        p.proxy,
        tiktok(json!({"user": {"email": ["jane.roe@example.com"]}})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(up.count(), 2);
}
