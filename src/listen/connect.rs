//! CONNECT on the proxy port: intercept known destinations (TLS with a minted
//! certificate, then the same pipeline), deny or blind-tunnel unknown ones.

use crate::app::{App, Runtime};
use crate::enforce::{self, ConnectGate, Refusal};
use crate::forward::ProxyBody;
use crate::pipeline::{End, Exchange};
use crate::route::{Target, Via};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use std::sync::Arc;
use tokio::sync::watch;

pub(crate) async fn handle_connect(
    app: Arc<App>,
    req: Request<Incoming>,
    shutdown: watch::Receiver<bool>,
) -> Response<ProxyBody> {
    let rt = app.runtime.load_full();
    let mut x = Exchange::new(&app, req.headers());
    let authority = req.uri().authority().map(|a| a.as_str().to_string());
    let end = match enforce::gate_connect(&rt, authority.as_deref()) {
        ConnectGate::Refuse(refusal) => End::Refused {
            dest: "unknown",
            refusal,
        },
        ConnectGate::Tunnel(t) => tunnel(&app, &rt, &mut x, req, t).await,
        ConnectGate::Intercept(t) => {
            intercept(app.clone(), req, t, shutdown);
            End::Intercepted
        }
    };
    x.finish(end)
}

/// A blind tunnel: connect first (a dead target is a 502, not a 200 then EOF),
/// audit, then copy bytes both ways once the client's connection is upgraded.
async fn tunnel<'rt>(
    app: &App,
    rt: &'rt Runtime,
    x: &mut Exchange<'_>,
    req: Request<Incoming>,
    t: Target,
) -> End<'rt> {
    let dest = "unknown";
    let upstream = match rt.upstream.connect_tcp(&t.host, t.port).await {
        Ok(s) => s,
        Err(e) => {
            app.metrics
                .upstream_errors_total
                .with_label_values(&[dest, e.kind.as_str()])
                .inc();
            let refusal = Refusal::upstream(e.kind, &e.detail);
            return End::Refused { dest, refusal };
        }
    };
    if let Err(refusal) = x.audit_egress(dest, "tunneled", "unknown_destination_tunnel") {
        return End::Refused { dest, refusal };
    }
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
    End::Tunneled
}

/// Terminate TLS with a minted certificate and serve the tunnel's requests.
fn intercept(app: Arc<App>, req: Request<Incoming>, t: Target, shutdown: watch::Receiver<bool>) {
    let Target { host, port } = t;
    let minter = app.minter.clone();
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
}
