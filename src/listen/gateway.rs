//! The egress-gateway listener (`listen.gateway`): TLS accepted directly, the
//! destination taken from SNI, a certificate minted the same way as for
//! CONNECT, then the same pipeline. A host that is not a configured
//! destination gets a 403 JSON answer inside TLS (`unknown_destination`).

use super::{accept_loop, serve_connection, ConnTracker};
use crate::app::App;
use crate::route::Via;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub(crate) async fn run_gateway(
    app: Arc<App>,
    listener: TcpListener,
    shutdown: watch::Receiver<bool>,
    tracker: ConnTracker,
) {
    accept_loop("gateway", listener, shutdown, tracker, move |stream, sd| {
        let app = app.clone();
        async move {
            let peer = stream.peer_addr().ok();
            match app.minter.accept(stream, None).await {
                Ok((tls, sni)) => {
                    app.metrics.connections_open.inc();
                    let via = Via::Intercepted {
                        host: sni,
                        port: 443,
                    };
                    serve_connection(app.clone(), tls, via, sd, false, peer).await;
                    app.metrics.connections_open.dec();
                }
                Err(e) => super::connect::handshake_failed(&app, "gateway", &e, None, peer),
            }
        }
    })
    .await
}
