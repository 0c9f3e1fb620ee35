//! Issue 17 build item 5: gRPC to Google Ads is refused with a gRPC status the
//! client shows (a trailers-only answer: HTTP 200, `grpc-status` 12 UNIMPLEMENTED,
//! `grpc-message` naming the REST interface), audited like other refusals, and
//! nothing goes upstream. (A JSON 451 reaches a gRPC client only as "Received
//! http2 header with status: 451": docs/SDKS.md has the measurement with grpcio.)

mod common;
use common::*;

const METHOD: &str =
    "/google.ads.googleads.v23.services.ConversionUploadService/UploadClickConversions";

/// One length-prefixed gRPC message (not compressed).
fn grpc_frame(msg: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8];
    f.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    f.extend_from_slice(msg);
    f
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8(out).unwrap()
}

fn audit_text(dir: &std::path::Path) -> String {
    let mut all = String::new();
    for e in std::fs::read_dir(dir.join("audit")).unwrap().flatten() {
        all.push_str(&std::fs::read_to_string(e.path()).unwrap_or_default());
    }
    all
}

#[tokio::test(flavor = "multi_thread")]
async fn grpc_to_google_ads_is_refused_in_grpc_terms_naming_rest() {
    let dir = test_dir("grpc-refusal");
    let ca = test_ca(&dir.join("upstream"), VENDOR_HOSTS);
    let up = start_upstream(&ca).await;
    let p = start_proxy(&dir, &up, &ca, ProxyOpts::default());

    for ct in ["application/grpc", "application/grpc+proto"] {
        // A click conversion with a hashed email, as the library would send it.
        let body = grpc_frame(b"\x0a\x0a1234567890\x12\x20jane.roe@example.com-as-if-hashed");
        let req = Req::post("googleads.googleapis.com", METHOD, body)
            .header("content-type", ct)
            .header("te", "trailers")
            .header("x-patient-id", "P-1001");
        let r = send_h2c(p.proxy, req).await;
        assert_eq!(r.status, 200, "{ct}: gRPC errors travel as grpc-status");
        assert_eq!(r.header("content-type"), Some("application/grpc"));
        assert_eq!(r.header("grpc-status"), Some("12"), "UNIMPLEMENTED");
        let msg = percent_decode(r.header("grpc-message").unwrap());
        assert!(
            msg.starts_with("consentgate: grpc_not_inspected: "),
            "{msg}"
        );
        assert!(msg.contains("REST/JSON interface"), "{msg}");
        assert!(msg.contains(":uploadClickConversions"), "{msg}");
        assert!(msg.contains("[request_id "), "{msg}");
        assert!(r.body.is_empty(), "trailers-only: no message");
        assert_eq!(r.header("x-consentgate-decision"), Some("blocked"));
        assert!(!msg.contains("jane"), "{msg}");
    }
    assert_eq!(up.count(), 0, "nothing went upstream");

    // Audited like other refusals: the decision record names the reason (the
    // writer flushes on its interval).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let (audit, records) = loop {
        let audit = audit_text(&dir);
        let records: Vec<serde_json::Value> = audit
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .filter(|v: &serde_json::Value| v["reason"] == "grpc_not_inspected")
            .collect();
        if records.len() >= 2 || std::time::Instant::now() > deadline {
            break (audit, records);
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!(records.len(), 2, "{audit}");
    assert_eq!(records[0]["destination"], "google_ads");
    assert_eq!(records[0]["decision"], "blocked");
    assert!(!audit.contains("jane.roe"), "no identifier in the audit");

    // A body that is not gRPC on an endpoint the adapter does not read keeps its
    // JSON refusal in Google's shape.
    let r = send_h2c(
        p.proxy,
        Req::post("googleads.googleapis.com", METHOD, "{}")
            .header("content-type", "application/json"),
    )
    .await;
    assert_eq!(r.status, 451);
    assert_eq!(r.contract()["error"], "uninspected_endpoint");
}
