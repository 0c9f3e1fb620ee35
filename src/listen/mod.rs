//! Listen: the proxy listener (HTTP/1.1 and h2c with prior knowledge on one
//! port; CONNECT hands off to interception) and graceful draining.

pub mod connect;
pub mod gateway;

use crate::app::App;
use crate::enforce::Refusal;
use crate::pipeline;
use crate::route::Via;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

/// Counts live connections: each holds a sender; draining waits for all to drop.
#[derive(Clone)]
pub struct ConnTracker {
    _tx: mpsc::Sender<()>,
}

pub struct Drain {
    rx: mpsc::Receiver<()>,
}

pub fn tracker() -> (ConnTracker, Drain) {
    let (tx, rx) = mpsc::channel(1);
    (ConnTracker { _tx: tx }, Drain { rx })
}

impl Drain {
    /// Wait (at most `grace`) until every tracked connection has finished.
    pub async fn wait(mut self, tracker: ConnTracker, grace: Duration) -> bool {
        drop(tracker);
        tokio::time::timeout(grace, async { while self.rx.recv().await.is_some() {} })
            .await
            .is_ok()
    }
}

pub fn http_builder() -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30));
    b.http2()
        .timer(hyper_util::rt::TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(30)));
    b
}

/// Serve HTTP (h1 or h2 by preface) on one connection until it ends or shutdown
/// is signalled, in which case in-flight requests finish first.
pub async fn serve_connection<IO>(
    app: Arc<App>,
    io: IO,
    via: Via,
    mut shutdown: watch::Receiver<bool>,
    allow_connect: bool,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc_app = app.clone();
    let svc_shutdown = shutdown.clone();
    let svc = service_fn(move |req: hyper::Request<Incoming>| {
        let app = svc_app.clone();
        let via = via.clone();
        let shutdown = svc_shutdown.clone();
        async move {
            let resp = if req.method() == hyper::Method::CONNECT {
                if allow_connect {
                    connect::handle_connect(app, req, shutdown).await
                } else {
                    pipeline::refuse(&app, req.headers(), Refusal::connect_not_allowed())
                }
            } else {
                pipeline::handle(app, req, via).await
            };
            Ok::<_, Infallible>(resp)
        }
    });
    let builder = http_builder();
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
    tokio::pin!(conn);
    let mut draining = *shutdown.borrow();
    if draining {
        conn.as_mut().graceful_shutdown();
    }
    loop {
        tokio::select! {
            res = conn.as_mut() => {
                if let Err(e) = res {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                break;
            }
            changed = shutdown.changed(), if !draining => {
                if changed.is_err() || *shutdown.borrow() {
                    draining = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    }
}

/// Accept on `listener` until shutdown, then stop accepting at once; each
/// connection runs `on_conn` in its own task, tracked for draining.
pub async fn accept_loop<F, Fut>(
    name: &'static str,
    listener: TcpListener,
    shutdown: watch::Receiver<bool>,
    tracker: ConnTracker,
    on_conn: F,
) where
    F: Fn(tokio::net::TcpStream, watch::Receiver<bool>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut stop = shutdown.clone();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(listener = name, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let conn = on_conn(stream, shutdown.clone());
                let t = tracker.clone();
                tokio::spawn(async move {
                    conn.await;
                    drop(t);
                });
            }
            _ = stop.changed() => break,
        }
    }
    drop(listener);
    tracing::info!(
        listener = name,
        "listener closed; draining in-flight requests"
    );
}

/// The proxy port: plain HTTP/1.1, h2c and CONNECT.
pub async fn run_proxy(
    app: Arc<App>,
    listener: TcpListener,
    shutdown: watch::Receiver<bool>,
    tracker: ConnTracker,
) {
    accept_loop("proxy", listener, shutdown, tracker, move |stream, sd| {
        let app = app.clone();
        async move {
            app.metrics.connections_open.inc();
            serve_connection(app.clone(), stream, Via::Plain, sd, true).await;
            app.metrics.connections_open.dec();
        }
    })
    .await
}
