//! Listen: the proxy listener (HTTP/1.1 and h2c with prior knowledge on one
//! port; CONNECT hands off to interception), graceful draining, and the
//! `limits` every listener applies: request heads through the gate
//! ([`gate`]), bodies through [`ClientBody`].

pub(crate) mod connect;
pub(crate) mod gate;
pub(crate) mod gateway;

use crate::app::App;
use crate::body::{BodyLimits, ClientBody};
use crate::config::Limits;
use crate::enforce::{self, Refusal};
use crate::forward::ProxyBody;
use crate::pipeline;
use crate::route::Via;
use gate::{ConnState, Gate, GateCfg, OnRefused, Tracked};
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
pub(crate) struct ConnTracker {
    _tx: mpsc::Sender<()>,
}

pub(crate) struct Drain {
    rx: mpsc::Receiver<()>,
}

pub(crate) fn tracker() -> (ConnTracker, Drain) {
    let (tx, rx) = mpsc::channel(1);
    (ConnTracker { _tx: tx }, Drain { rx })
}

impl Drain {
    /// Wait (at most `grace`) until every tracked connection has finished.
    pub(crate) async fn wait(mut self, tracker: ConnTracker, grace: Duration) -> bool {
        drop(tracker);
        tokio::time::timeout(grace, async { while self.rx.recv().await.is_some() {} })
            .await
            .is_ok()
    }
}

/// hyper's default HTTP/1 buffer (8 KiB + 100 × 4 KiB); raised when a head may be bigger.
const H1_DEFAULT_BUF: usize = 8192 + 4096 * 100;

/// hyper's server settings for one connection under `limits`.
fn http_builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let head = usize::try_from(limits.max_header_bytes).unwrap_or(usize::MAX);
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(hyper_util::rt::TokioTimer::new())
        // The gate times heads (and answers 408); hyper's own timer would close
        // the connection without a word.
        .header_read_timeout(None)
        // A head the gate let through always fits.
        .max_buf_size(head.saturating_add(16 << 10).max(H1_DEFAULT_BUF));
    b.http2()
        .timer(hyper_util::rt::TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(30)))
        // Twice the limit, so a header list between the two gets the JSON 431
        // from `enforce::check_head` and only a far bigger one the HTTP/2 layer's bare 431.
        .max_header_list_size(u32::try_from(head.saturating_mul(2)).unwrap_or(u32::MAX));
    b
}

/// The gate settings for a new connection, from the current config.
pub(crate) fn gate_cfg(limits: &Limits, on_refused: Option<OnRefused>) -> GateCfg {
    GateCfg {
        header_read_timeout: limits.header_read_timeout,
        max_header_bytes: usize::try_from(limits.max_header_bytes).unwrap_or(usize::MAX),
        idle_timeout: gate::IDLE_TIMEOUT,
        on_refused,
    }
}

/// Log and audit a refusal on a listener that forwards nothing (admin,
/// metrics, webhooks): a slow or oversized head or body there is in the trail
/// like one on the proxy port (issue 14: limits answered JSON and audited).
pub(crate) fn audit_refusal(app: &App, listener: &'static str, r: &Refusal, request_id: &str) {
    tracing::info!(listener, request_id = %request_id, status = r.status, error = r.code,
        "request refused");
    let mut record = crate::audit::AuditRecord::decision(request_id, "unknown", "blocked", r.code);
    record.detail = Some(serde_json::json!({ "listener": listener }));
    if let Err(e) = app.audit.submit(vec![record]) {
        tracing::warn!(listener, request_id = %request_id, error = e.as_str(),
            "refusal not audited");
    }
}

/// Count, log and audit a head the gate refused on a data-plane listener: the
/// app was given a request id, and every request id is in the audit (SPEC §7).
/// A body timeout or an exhausted budget is audited the same way, so a slow or
/// oversized head adds nothing a slow body could not already write.
fn count_refusals(app: &Arc<App>, listener: &'static str) -> OnRefused {
    let metrics = app.metrics.clone();
    let audit = app.audit.clone();
    Arc::new(move |r: &Refusal, request_id: &str| {
        let record = crate::audit::AuditRecord::decision(request_id, "unknown", "blocked", r.code);
        if let Err(e) = audit.submit(vec![record]) {
            // Nothing was forwarded; the refusal stands either way.
            tracing::warn!(listener, request_id = %request_id, error = e.as_str(),
                "refused request head not audited");
        }
        metrics
            .requests_total
            .with_label_values(&["unknown", "blocked"])
            .inc();
        metrics
            .responses_total
            .with_label_values(&["unknown", &r.status.to_string(), r.code])
            .inc();
        tracing::info!(listener, request_id = %request_id, status = r.status, error = r.code,
            decision = "blocked", "request head refused");
    })
}

/// The body limits for a request arriving now.
pub(crate) fn body_limits(app: &App, limits: &Limits) -> BodyLimits {
    BodyLimits {
        timeout: limits.body_read_timeout,
        budget: app.body_budget.clone(),
        budget_cap: limits.inflight_body_bytes,
    }
}

/// Serve HTTP (h1 or h2 by preface) on one connection, through the head gate,
/// until it ends or `shutdown` is signalled, in which case in-flight requests
/// finish first.
pub(crate) async fn serve_http<IO, H, Fut, B>(
    io: IO,
    limits: &Limits,
    gate: GateCfg,
    shutdown: Option<watch::Receiver<bool>>,
    handler: H,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    H: Fn(hyper::Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = hyper::Response<B>> + Send + 'static,
    B: hyper::body::Body<Data = bytes::Bytes> + Unpin + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let conn_state = Arc::new(ConnState::default());
    let io = Gate::new(io, conn_state.clone(), gate);
    let svc = service_fn(move |req: hyper::Request<Incoming>| {
        // Taken before the handler runs, released when hyper drops the response
        // body: the gate's idle timer never runs while a response is under way.
        let in_flight = conn_state.begin();
        let connect = req.method() == hyper::Method::CONNECT;
        let conn_state = conn_state.clone();
        let answer = handler(req);
        async move {
            let resp = answer.await;
            if connect {
                conn_state.connect_answered(resp.status().is_success());
            }
            Ok::<_, Infallible>(resp.map(|b| Tracked::new(b, in_flight)))
        }
    });
    let builder = http_builder(limits);
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
    tokio::pin!(conn);
    let Some(mut shutdown) = shutdown else {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "connection ended with an error");
        }
        return;
    };
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

/// Serve the proxy's HTTP on one connection (the proxy port, or the TLS inside
/// an intercepted CONNECT or on the gateway listener). `peer`: the app's address,
/// for the log lines and spans of its requests.
pub(crate) async fn serve_connection<IO>(
    app: Arc<App>,
    io: IO,
    via: Via,
    shutdown: watch::Receiver<bool>,
    allow_connect: bool,
    peer: Option<std::net::SocketAddr>,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let limits = app.runtime.load().config.limits.clone();
    let listener = match via {
        Via::Plain => "proxy",
        Via::Intercepted { .. } => "tls",
    };
    let gate = gate_cfg(&limits, Some(count_refusals(&app, listener)));
    let svc_shutdown = shutdown.clone();
    let handler = move |req: hyper::Request<Incoming>| {
        let span = crate::telemetry::request_span(req.headers(), peer, &via);
        tracing::Instrument::instrument(
            proxy_request(
                app.clone(),
                req,
                via.clone(),
                svc_shutdown.clone(),
                allow_connect,
                peer,
            ),
            span,
        )
    };
    serve_http(io, &limits, gate, Some(shutdown), handler).await
}

/// One request on a proxy connection: CONNECT, a refusal of its head, or the pipeline.
async fn proxy_request(
    app: Arc<App>,
    req: hyper::Request<Incoming>,
    via: Via,
    shutdown: watch::Receiver<bool>,
    allow_connect: bool,
    peer: Option<std::net::SocketAddr>,
) -> hyper::Response<ProxyBody> {
    let limits = app.runtime.load().config.limits.clone();
    if let Some(r) = enforce::check_head(&req, limits.max_header_bytes) {
        return pipeline::refuse(&app, req.headers(), r);
    }
    if req.method() == hyper::Method::CONNECT {
        if allow_connect {
            return connect::handle_connect(app, req, shutdown, peer).await;
        }
        return pipeline::refuse(&app, req.headers(), Refusal::connect_not_allowed());
    }
    let body_limits = body_limits(&app, &limits);
    let req = req.map(|b| ClientBody::new(b, body_limits));
    pipeline::handle(app, req, via).await
}

/// Accept on `listener` until shutdown, then stop accepting at once; each
/// connection runs `on_conn` in its own task, tracked for draining.
pub(crate) async fn accept_loop<F, Fut>(
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
pub(crate) async fn run_proxy(
    app: Arc<App>,
    listener: TcpListener,
    shutdown: watch::Receiver<bool>,
    tracker: ConnTracker,
) {
    accept_loop("proxy", listener, shutdown, tracker, move |stream, sd| {
        let app = app.clone();
        async move {
            app.metrics.connections_open.inc();
            let peer = stream.peer_addr().ok();
            serve_connection(app.clone(), stream, Via::Plain, sd, true, peer).await;
            app.metrics.connections_open.dec();
        }
    })
    .await
}
