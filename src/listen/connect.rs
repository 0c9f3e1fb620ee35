//! CONNECT on the proxy port: intercept known destinations (TLS with a minted
//! certificate, then the same pipeline), deny or blind-tunnel unknown ones.

use crate::app::App;
use crate::config::UnknownDestinations;
use crate::forward::ProxyBody;
use crate::pipeline::{self, RequestDecision, Via};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::sync::Arc;
use tokio::sync::watch;

pub async fn handle_connect(
    app: Arc<App>,
    req: Request<Incoming>,
    shutdown: watch::Receiver<bool>,
) -> Response<ProxyBody> {
    let request_id = pipeline::new_request_id();
    let started = std::time::Instant::now();
    let Some((host, port)) = req
        .uri()
        .authority()
        .and_then(|a| pipeline::split_host_port(a.as_str()))
        .map(|(h, p)| (h, p.unwrap_or(443)))
    else {
        return pipeline::blocked(
            &app,
            "unknown",
            &request_id,
            started,
            pipeline::error_response(400, &request_id, "bad_request", "CONNECT needs host:port"),
        );
    };
    let rt = app.runtime.load_full();
    let known = rt.registry.knows_host(&host);
    if !known && rt.config.unknown_destinations == UnknownDestinations::Deny {
        return pipeline::blocked(
            &app,
            "unknown",
            &request_id,
            started,
            pipeline::error_response(
                403,
                &request_id,
                "unknown_destination",
                "destination host is not a configured destination",
            ),
        );
    }
    if !known {
        // Blind tunnel: connect first so a dead target is a 502, not a 200 then EOF.
        let upstream = match rt.upstream.connect_tcp(&host, port).await {
            Ok(s) => s,
            Err(e) => {
                app.metrics
                    .upstream_errors_total
                    .with_label_values(&["unknown", e.kind.as_str()])
                    .inc();
                return pipeline::blocked(
                    &app,
                    "unknown",
                    &request_id,
                    started,
                    pipeline::error_response(
                        e.kind.status(),
                        &request_id,
                        "upstream_unavailable",
                        e.detail,
                    ),
                );
            }
        };
        let rec = crate::audit::AuditRecord::decision(
            &request_id,
            "unknown",
            "tunneled",
            "unknown_destination_tunnel",
        );
        if let Err(e) = app.audit.submit(vec![rec]) {
            return pipeline::blocked(
                &app,
                "unknown",
                &request_id,
                started,
                pipeline::error_response(
                    503,
                    &request_id,
                    crate::audit::AuditUnavailable::REASON,
                    format!("audit trail unavailable ({}); nothing was sent", e.as_str()),
                ),
            );
        }
        app.metrics.tunnels_total.inc();
        app.metrics
            .requests_total
            .with_label_values(&["unknown", "tunneled"])
            .inc();
        tracing::info!(request_id = %request_id, decision = "tunneled", "CONNECT tunneled blind");
        tokio::spawn(async move {
            match hyper::upgrade::on(req).await {
                Ok(upgraded) => {
                    let mut client = TokioIo::new(upgraded);
                    let mut upstream = upstream;
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                }
                Err(e) => tracing::debug!(error = %e, "tunnel upgrade failed"),
            }
        });
        return ok_response(&request_id, RequestDecision::Allowed);
    }
    intercept(app, req, host, port, request_id, shutdown)
}

fn ok_response(request_id: &str, decision: RequestDecision) -> Response<ProxyBody> {
    let mut r = Response::new(pipeline::empty_body());
    *r.status_mut() = StatusCode::OK;
    let h = r.headers_mut();
    h.insert(
        pipeline::H_DECISION,
        hyper::header::HeaderValue::from_static(decision.as_str()),
    );
    if let Ok(v) = hyper::header::HeaderValue::from_str(request_id) {
        h.insert(pipeline::H_REQUEST_ID, v);
    }
    r
}

fn intercept(
    app: Arc<App>,
    req: Request<Incoming>,
    host: String,
    port: u16,
    request_id: String,
    shutdown: watch::Receiver<bool>,
) -> Response<ProxyBody> {
    let minter = app.minter.clone();
    tracing::debug!(request_id = %request_id, "CONNECT intercepted");
    tokio::spawn(async move {
        let upgraded = match hyper::upgrade::on(req).await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(error = %e, "CONNECT upgrade failed");
                return;
            }
        };
        match minter.accept(TokioIo::new(upgraded), Some(&host)).await {
            Ok((tls, sni)) => {
                if sni != host {
                    // The tunnel's destination is the CONNECT authority; a
                    // different SNI never redirects traffic elsewhere.
                    tracing::info!(
                        "SNI differs from the CONNECT authority; routing by the authority"
                    );
                }
                super::serve_connection(app, tls, Via::Intercepted { host, port }, shutdown, false)
                    .await;
            }
            Err(e) => tracing::info!(error = %e, "intercepted TLS handshake failed"),
        }
    });
    ok_response(&request_id, RequestDecision::Allowed)
}
