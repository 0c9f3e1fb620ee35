//! The admin listener (`listen.admin`): the consent API, and /metrics,
//! /healthz, /readyz unless `listen.metrics` gives those their own plain-HTTP
//! port (so probes and scrapes never share a port with the write API). Both
//! run on their own OS thread with their own runtime so probes and scrapes
//! answer while the data plane is saturated. With `admin.tls` the admin
//! listener speaks TLS 1.2+ only (mutual TLS with `client_ca`). Every
//! connection gets the same `limits` as the proxy's.

use crate::app::App;
use crate::body::{self, BodyReadError, ClientBody};
use crate::listen::{self, gate};
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::sync::watch;

pub(crate) type AdminBody = Full<Bytes>;

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

pub(crate) fn json(status: StatusCode, v: serde_json::Value) -> Response<AdminBody> {
    crate::response::json(status, &v).map(Full::new)
}

/// A refusal on the admin listener (a `limits` refusal, a bad head), in the
/// same JSON and with the same decision headers as on the proxy's listeners.
fn refused(app: &App, r: &crate::enforce::Refusal) -> Response<AdminBody> {
    let id = crate::response::new_request_id();
    listen::audit_refusal(app, "admin", r, &id);
    crate::response::plain(r, &id).map(Full::new)
}

/// Extra routes mounted under /v1/ (the consent API). The body is already read
/// (bounded in size, time and memory) when the handler is called.
pub(crate) type ApiHandler = Arc<
    dyn Fn(
            Request<AdminBody>,
        )
            -> std::pin::Pin<Box<dyn std::future::Future<Output = Response<AdminBody>> + Send>>
        + Send
        + Sync,
>;

/// What one listener on the admin thread serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// `listen.admin`; `probes` unless `listen.metrics` is set.
    Admin { probes: bool },
    /// `listen.metrics`: /metrics, /healthz, /readyz only.
    Metrics,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Admin { .. } => "admin",
            Role::Metrics => "metrics",
        }
    }
}

fn probes(app: &App, req: &Request<Incoming>) -> Option<Response<AdminBody>> {
    let resp = match (req.method(), req.uri().path()) {
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
        (_, "/metrics" | "/healthz" | "/readyz") => json(
            StatusCode::METHOD_NOT_ALLOWED,
            serde_json::json!({"error": "method_not_allowed"}),
        ),
        _ => return None,
    };
    Some(resp)
}

async fn route(
    app: Arc<App>,
    api: Option<ApiHandler>,
    role: Role,
    req: Request<Incoming>,
) -> Response<AdminBody> {
    let path = req.uri().path().to_string();
    let is_probe = matches!(path.as_str(), "/metrics" | "/healthz" | "/readyz");
    match role {
        Role::Metrics | Role::Admin { probes: true } => {
            if let Some(r) = probes(&app, &req) {
                return r;
            }
        }
        Role::Admin { probes: false } if is_probe => {
            return json(
                StatusCode::NOT_FOUND,
                serde_json::json!({"error": "not_found", "path": path,
                    "detail": "served on listen.metrics"}),
            );
        }
        Role::Admin { probes: false } => {}
    }
    match (role, api) {
        (Role::Admin { .. }, Some(api)) if path.starts_with("/v1/") => {
            let limits = app.runtime.load().config.limits.clone();
            if let Some(r) = crate::enforce::check_head(&req, limits.max_header_bytes) {
                return refused(&app, &r);
            }
            let (parts, incoming) = req.into_parts();
            let body = ClientBody::new(incoming, listen::body_limits(&app, &limits));
            match body::read_limited(body, crate::consent::api::MAX_BODY_BYTES as u64).await {
                Ok(b) => api(Request::from_parts(parts, Full::new(b))).await,
                // The consent API's own answers for these two.
                Err(BodyReadError::TooLarge) => json(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    serde_json::json!({"error": "body_too_large",
                        "detail": "request body over 64 KiB"}),
                ),
                Err(BodyReadError::Unreadable(_) | BodyReadError::UnknownEncoding(_)) => json(
                    StatusCode::BAD_REQUEST,
                    serde_json::json!({"error": "unreadable_body",
                        "detail": "request body could not be read"}),
                ),
                Err(e) => refused(
                    &app,
                    &crate::enforce::Refusal::body(e, crate::consent::api::MAX_BODY_BYTES as u64),
                ),
            }
        }
        _ => json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": "not_found", "path": path}),
        ),
    }
}

/// Serve one accepted admin-thread connection (after TLS, if any).
async fn serve<IO>(app: Arc<App>, api: Option<ApiHandler>, role: Role, io: IO)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let limits = app.runtime.load().config.limits.clone();
    let listener = role.name();
    let audited = app.clone();
    let on_refused: gate::OnRefused = Arc::new(move |r: &crate::enforce::Refusal, id: &str| {
        listen::audit_refusal(&audited, listener, r, id);
    });
    let gate = listen::gate_cfg(&limits, Some(on_refused));
    let handler = move |req: Request<Incoming>| route(app.clone(), api.clone(), role, req);
    listen::serve_http(io, &limits, gate, None, handler).await
}

async fn accept_loop(
    app: Arc<App>,
    listener: tokio::net::TcpListener,
    role: Role,
    tls: Option<tokio_rustls::TlsAcceptor>,
    api: Option<ApiHandler>,
) {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(listener = role.name(), error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let app = app.clone();
        let api = api.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let Some(acceptor) = tls else {
                return serve(app, api, role, stream).await;
            };
            // The handshake counts against the head's time: a client that
            // stalls in it is dropped like one that stalls in its head.
            let limit = app.runtime.load().config.limits.header_read_timeout;
            match tokio::time::timeout(limit, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => serve(app, api, role, tls).await,
                Ok(Err(e)) => {
                    tracing::info!(listener = role.name(), error = %e, "admin TLS handshake failed")
                }
                Err(_) => {
                    tracing::info!(listener = role.name(), "admin TLS handshake timed out")
                }
            }
        });
    }
}

fn bind(key: &str, addr: SocketAddr) -> Result<std::net::TcpListener, String> {
    let l =
        std::net::TcpListener::bind(addr).map_err(|e| format!("cannot bind {key} {addr}: {e}"))?;
    l.set_nonblocking(true)
        .map_err(|e| format!("{key} {addr}: {e}"))?;
    Ok(l)
}

/// Where the admin thread listens, and how.
pub(crate) struct AdminListen {
    pub(crate) admin: SocketAddr,
    pub(crate) metrics: Option<SocketAddr>,
    /// `admin.tls`, already loaded ([`crate::tls::admin::server_config`]).
    pub(crate) tls: Option<Arc<rustls::ServerConfig>>,
}

/// Start the admin thread (admin listener, and the metrics listener when
/// configured). Returns once the sockets are bound; the error names the key.
pub(crate) fn spawn(
    app: Arc<App>,
    listen: AdminListen,
    api: Option<ApiHandler>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<std::thread::JoinHandle<()>, String> {
    let admin = bind("listen.admin", listen.admin)?;
    let metrics = listen
        .metrics
        .map(|a| bind("listen.metrics", a))
        .transpose()?;
    let tls = listen.tls.map(tokio_rustls::TlsAcceptor::from);
    let probes_on_admin = metrics.is_none();
    std::thread::Builder::new()
        .name("admin".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, "admin runtime failed to start");
                    return;
                }
            };
            rt.block_on(async move {
                let admin = match tokio::net::TcpListener::from_std(admin) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!(error = %e, "admin listener failed");
                        return;
                    }
                };
                let role = Role::Admin {
                    probes: probes_on_admin,
                };
                let admin_loop = accept_loop(app.clone(), admin, role, tls, api);
                let metrics_loop = async {
                    match metrics.map(tokio::net::TcpListener::from_std) {
                        Some(Ok(l)) => accept_loop(app.clone(), l, Role::Metrics, None, None).await,
                        Some(Err(e)) => {
                            tracing::error!(error = %e, "metrics listener failed");
                            std::future::pending().await
                        }
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = admin_loop => {}
                    _ = metrics_loop => {}
                    _ = shutdown.changed() => {}
                }
            });
        })
        .map_err(|e| format!("cannot start the admin thread: {e}"))
}
