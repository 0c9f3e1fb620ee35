//! Issue 20 items 5 and 6: OTLP trace export and the request log line. A tiny
//! OTLP/HTTP receiver on loopback collects what the running proxy exports: a
//! `request` span that continues the caller's `traceparent` (same trace id, the
//! caller's span as parent) with a child span per phase, and the request's log
//! line carries that trace id. A request without `traceparent` starts a trace
//! of its own, and its log line names that one.
#![cfg(feature = "otlp")]

mod common;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";

/// An OTLP/HTTP receiver: every POST body to /v1/traces, decoded.
async fn receiver() -> (std::net::SocketAddr, Arc<Mutex<Vec<Span>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let spans = Arc::new(Mutex::new(Vec::new()));
    let s = spans.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let s = s.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let s = s.clone();
                        async move {
                            assert_eq!(req.uri().path(), "/v1/traces");
                            assert_eq!(req.headers()["content-type"], "application/x-protobuf");
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let export = ExportTraceServiceRequest::decode(body).unwrap();
                            let mut got = s.lock().unwrap();
                            for rs in export.resource_spans {
                                let service = rs
                                    .resource
                                    .iter()
                                    .flat_map(|r| r.attributes.iter())
                                    .find(|a| a.key == "service.name")
                                    .map(|a| format!("{:?}", a.value));
                                assert!(
                                    service.is_some_and(|v| v.contains("egress-test")),
                                    "service.name"
                                );
                                for ss in rs.scope_spans {
                                    got.extend(ss.spans);
                                }
                            }
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                                bytes::Bytes::new(),
                            )))
                        }
                    },
                );
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    (addr, spans)
}

#[tokio::test(flavor = "multi_thread")]
async fn spans_continue_the_callers_trace_with_a_child_per_phase() {
    let (otlp, spans) = receiver().await;
    let dir = test_dir("otlp");
    let ca = test_ca(&dir.join("upstream"), VENDOR_HOSTS);
    let up = start_upstream(&ca).await;
    let opts = ProxyOpts {
        extra_yaml: format!(
            "telemetry:\n  otlp:\n    endpoint: http://{otlp}\n    service_name: egress-test\n    timeout: 5s\n"
        ),
        ..Default::default()
    };
    let mut p = start_proxy(&dir, &up, &ca, opts);

    let batch = r#"{"data":[{"event_name":"Lead","event_time":1763600000,"user_data":{"em":["jane.roe@example.com"]}}]}"#;
    let r = send(
        p.proxy,
        Req::post("graph.facebook.com", "/v19.0/1/events", batch)
            .header("traceparent", &format!("00-{TRACE}-{PARENT}-01")),
    )
    .await;
    assert_eq!(r.status, 200);
    let r = send(
        p.proxy,
        Req::post("graph.facebook.com", "/v19.0/1/events", batch),
    )
    .await;
    assert_eq!(r.status, 200);

    // A graceful stop flushes the exporter.
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &p.child.id().to_string()])
        .status();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while p.child.try_wait().unwrap().is_none() {
        assert!(std::time::Instant::now() < deadline, "proxy did not stop");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let spans = spans.lock().unwrap().clone();
    let requests: Vec<&Span> = spans.iter().filter(|s| s.name == "request").collect();
    assert_eq!(
        requests.len(),
        2,
        "{:?}",
        spans.iter().map(|s| &s.name).collect::<Vec<_>>()
    );
    let continued = requests
        .iter()
        .find(|s| hex::encode(&s.trace_id) == TRACE)
        .expect("a request span in the caller's trace");
    assert_eq!(hex::encode(&continued.parent_span_id), PARENT);
    let own = requests
        .iter()
        .find(|s| hex::encode(&s.trace_id) != TRACE)
        .unwrap();
    assert!(own.parent_span_id.is_empty(), "no traceparent: a root span");

    for req in [continued, own] {
        let children: Vec<&str> = spans
            .iter()
            .filter(|s| s.parent_span_id == req.span_id && s.trace_id == req.trace_id)
            .map(|s| s.name.as_str())
            .collect();
        for phase in ["gate", "read", "plan", "audit", "upstream"] {
            assert!(
                children.contains(&phase),
                "{phase} missing from {children:?}"
            );
        }
    }

    // The request log lines name the trace: the caller's, and the new one.
    let log = std::fs::read_to_string(&p.log).unwrap();
    let finished: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l["message"] == "request finished")
        .collect();
    assert_eq!(finished.len(), 2, "{log}");
    assert_eq!(finished[0]["trace_id"], TRACE);
    assert_eq!(finished[1]["trace_id"], hex::encode(&own.trace_id));
}
