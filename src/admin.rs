//! The admin listener: /metrics, /healthz, /readyz and the consent API. It runs
//! on its own OS thread with its own runtime so probes and scrapes answer while
//! the data plane is saturated.

use crate::app::App;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::sync::watch;

pub type AdminBody = Full<Bytes>;

fn text(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<AdminBody> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    r
}

pub fn json(status: StatusCode, v: serde_json::Value) -> Response<AdminBody> {
    crate::response::json(status, &v).map(Full::new)
}

/// Extra routes mounted under /v1/ (the consent API).
pub type ApiHandler = Arc<
    dyn Fn(
            Request<Incoming>,
        )
            -> std::pin::Pin<Box<dyn std::future::Future<Output = Response<AdminBody>> + Send>>
        + Send
        + Sync,
>;

async fn route(
    app: Arc<App>,
    api: Option<ApiHandler>,
    req: Request<Incoming>,
) -> Response<AdminBody> {
    let path = req.uri().path();
    match (req.method(), path) {
        (&Method::GET, "/metrics") => {
            app.refresh_gauges();
            text(
                StatusCode::OK,
                "text/plain; version=0.0.4",
                app.metrics.render(),
            )
        }
        (&Method::GET, "/healthz") => json(StatusCode::OK, serde_json::json!({"status": "ok"})),
        (&Method::GET, "/readyz") => {
            let (ready, why) = app.ready();
            let status = if ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            json(status, serde_json::json!({"ready": ready, "reason": why}))
        }
        (_, p) if p.starts_with("/v1/") => match api {
            Some(h) => h(req).await,
            None => json(
                StatusCode::NOT_FOUND,
                serde_json::json!({"error": "not_found"}),
            ),
        },
        (_, "/metrics" | "/healthz" | "/readyz") => json(
            StatusCode::METHOD_NOT_ALLOWED,
            serde_json::json!({"error": "method_not_allowed"}),
        ),
        _ => json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": "not_found", "path": path}),
        ),
    }
}

/// Start the admin server on its own thread. Returns once the socket is bound.
pub fn spawn(
    app: Arc<App>,
    addr: SocketAddr,
    api: Option<ApiHandler>,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let std_listener = std::net::TcpListener::bind(addr)?;
    std_listener.set_nonblocking(true)?;
    std::thread::Builder::new().name("admin".into()).spawn(move || {
        let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!(error = %e, "admin runtime failed to start");
                return;
            }
        };
        rt.block_on(async move {
            let listener = match tokio::net::TcpListener::from_std(std_listener) {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(error = %e, "admin listener failed");
                    return;
                }
            };
            loop {
                tokio::select! {
                    acc = listener.accept() => {
                        let Ok((stream, _)) = acc else { continue };
                        let app = app.clone();
                        let api = api.clone();
                        tokio::spawn(async move {
                            let svc = service_fn(move |req| {
                                let app = app.clone();
                                let api = api.clone();
                                async move { Ok::<_, Infallible>(route(app, api, req).await) }
                            });
                            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                                .serve_connection(TokioIo::new(stream), svc)
                                .await;
                        });
                    }
                    _ = shutdown.changed() => break,
                }
            }
        });
    })
}
