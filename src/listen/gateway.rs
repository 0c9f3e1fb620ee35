//! The egress-gateway listener (`listen.gateway`): TLS accepted directly, the
//! destination taken from SNI, a certificate minted the same way as for
//! CONNECT, then the same pipeline. A host that is not a configured
//! destination gets a 403 JSON answer inside TLS (`unknown_destination`).

use super::{serve_connection, ConnTracker};
use crate::app::App;
use crate::pipeline::Via;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub async fn run_gateway(
    app: Arc<App>,
    listener: TcpListener,
    shutdown: watch::Receiver<bool>,
    tracker: ConnTracker,
) {
    let mut stop = shutdown.clone();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "gateway accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let app = app.clone();
                let shutdown = shutdown.clone();
                let t = tracker.clone();
                tokio::spawn(async move {
                    let minter = app.minter.clone();
                    match minter.accept(stream, None).await {
                        Ok((tls, sni)) => {
                            app.metrics.connections_open.inc();
                            serve_connection(app.clone(), tls, Via::Intercepted { host: sni, port: 443 }, shutdown, false).await;
                            app.metrics.connections_open.dec();
                        }
                        Err(e) => tracing::info!(error = %e, "gateway TLS handshake failed"),
                    }
                    drop(t);
                });
            }
            _ = stop.changed() => break,
        }
    }
    tracing::info!("gateway listener closed");
}
