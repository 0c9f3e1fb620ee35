//! CONNECT on the proxy port: intercept known destinations (TLS with a minted
//! certificate, then the same pipeline), deny or blind-tunnel unknown ones.

use crate::app::{App, Runtime};
use crate::enforce::{self, ConnectGate, Refusal};
use crate::forward::ProxyBody;
use crate::pipeline::{End, Exchange};
use crate::route::{Target, Via};
use crate::tls::HandshakeError;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::sync::watch;

pub(crate) async fn handle_connect(
    app: Arc<App>,
    req: Request<Incoming>,
    shutdown: watch::Receiver<bool>,
    peer: Option<SocketAddr>,
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
            intercept(app.clone(), req, t, shutdown, peer);
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
fn intercept(
    app: Arc<App>,
    req: Request<Incoming>,
    t: Target,
    shutdown: watch::Receiver<bool>,
    peer: Option<SocketAddr>,
) {
    let Target { host, port } = t;
    let minter = app.minter.clone();
    // Spawned outside the CONNECT's request span: the tunnel outlives it, and
    // each request inside gets its own.
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
                let via = Via::Intercepted { host, port };
                super::serve_connection(app, tls, via, shutdown, false, peer).await;
            }
            Err(e) => handshake_failed(&app, "connect", &e, Some(&host), peer),
        }
    });
}

/// Count and log an app's failed TLS handshake with the proxy (CONNECT
/// interception or the gateway). The line names the host the app asked for and
/// the app's address, never anything from inside the connection: this is the
/// first thing to look at when a rollout's apps do not trust the CA.
pub(crate) fn handshake_failed(
    app: &App,
    listener: &'static str,
    e: &HandshakeError,
    connect_host: Option<&str>,
    peer: Option<SocketAddr>,
) {
    let reason = e.reason();
    app.metrics.handshake_failed("client", reason);
    let peer = peer.map(|p| p.to_string());
    let (sni, peer) = (
        e.sni.as_deref().unwrap_or(""),
        peer.as_deref().unwrap_or(""),
    );
    let connect_host = connect_host.unwrap_or("");
    // A client that closes before a handshake (a TCP health check, a port scan)
    // is counted, but is no reason for a warning.
    if reason == "eof" {
        tracing::info!(listener, side = "client", reason, sni, connect_host, peer,
            error = %e, "TLS handshake failed");
    } else {
        tracing::warn!(listener, side = "client", reason, sni, connect_host, peer,
            error = %e, "TLS handshake failed");
    }
}
