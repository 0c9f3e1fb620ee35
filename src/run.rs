//! `consentgate run` and `consentgate check`: start-up, signals, shutdown.

use crate::app::{App, Runtime};
use crate::config::{ConfigError, ConfigSource};
use crate::consent::{
    ApiContext, ConsentStore, ConsentWriter, FileSourceConfig, FileSourceHandle, PgSourceConfig,
    PgSourceHandle,
};
use crate::metrics::Metrics;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::signal::unix::{signal, SignalKind};

pub fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let _ = tracing_subscriber::fmt()
        .json()
        .with_current_span(false)
        .with_span_list(false)
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Install aws-lc-rs as the process-wide rustls provider (a dependency may also
/// enable `ring`; without an explicit default rustls would panic).
pub fn install_crypto() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

fn print_errors(errs: &[ConfigError]) {
    for e in errs {
        eprintln!("error: {e}");
    }
}

/// Create the interception CA when both files are missing (logged), then load it.
pub fn load_interception_ca(
    i: &crate::config::Interception,
) -> Result<crate::tls::CertMinter, String> {
    match crate::tls::ensure_ca(&i.ca_cert, &i.ca_key) {
        Ok(true) => tracing::info!(
            ca_cert = %i.ca_cert.display(),
            "interception CA created (first run); apps must trust this certificate"
        ),
        Ok(false) => {}
        Err(e) => return Err(e.to_string()),
    }
    let ca = crate::tls::load_ca(&i.ca_cert, &i.ca_key).map_err(|e| e.to_string())?;
    Ok(crate::tls::CertMinter::new(ca))
}

/// `consentgate check`: every error in config, snapshot and CA; exit code.
pub fn check(explicit: Option<&Path>) -> i32 {
    install_crypto();
    let source = ConfigSource::resolve(explicit);
    let mut failed = false;
    match Runtime::load(&source) {
        Err(errs) => {
            print_errors(&errs);
            failed = true;
        }
        Ok(rt) => {
            let i = &rt.config.interception;
            if i.ca_cert.exists() || i.ca_key.exists() {
                if let Err(e) = crate::tls::load_ca(&i.ca_cert, &i.ca_key) {
                    eprintln!("error: interception: {e}");
                    failed = true;
                }
            }
            if rt.config.consent.source == crate::config::SourceKind::File {
                if let Err(e) = crate::consent::file_source::load_snapshot(&rt.config.consent.file)
                {
                    eprintln!("error: consent.file: {e}");
                    failed = true;
                }
            }
            if let Err(e) = crate::consent::api::load_tokens(&rt.config.admin.tokens_file) {
                eprintln!("error: admin.tokens_file: {e}");
                failed = true;
            }
        }
    }
    if failed {
        1
    } else {
        println!("ok: {}", source.label());
        0
    }
}

/// `consentgate run`.
pub fn run(explicit: Option<&Path>) -> i32 {
    install_crypto();
    let source = ConfigSource::resolve(explicit);
    let runtime = match Runtime::load(&source) {
        Ok(r) => r,
        Err(errs) => {
            print_errors(&errs);
            eprintln!("refusing to start: {} configuration error(s)", errs.len());
            return 1;
        }
    };
    init_logging(&runtime.config.log.level);
    if source == ConfigSource::Embedded {
        tracing::info!("no config/consentgate.yaml found; using the embedded default");
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return 1;
        }
    };
    rt.block_on(serve(runtime, source))
}

/// The running consent source (kept alive for as long as the proxy runs).
enum ConsentSource {
    File(FileSourceHandle),
    Postgres(PgSourceHandle),
}

impl ConsentSource {
    fn writer(&self) -> Arc<dyn ConsentWriter> {
        match self {
            ConsentSource::File(s) => s.writer(),
            ConsentSource::Postgres(s) => s.writer(),
        }
    }
}

async fn start_consent_source(
    cfg: &crate::config::Config,
    store: Arc<ConsentStore>,
    metrics: &Metrics,
) -> Result<ConsentSource, String> {
    match cfg.consent.source {
        crate::config::SourceKind::File => {
            let c = FileSourceConfig::new(&cfg.consent.file, &cfg.consent.journal);
            crate::consent::file_source::start(c, store)
                .await
                .map(ConsentSource::File)
        }
        crate::config::SourceKind::Postgres => {
            let hist = metrics.consent_propagation.clone();
            let c = PgSourceConfig::new(&cfg.consent.postgres);
            crate::consent::postgres::start(c, store, Arc::new(move |s| hist.observe(s)))
                .await
                .map(ConsentSource::Postgres)
        }
    }
}

/// `consentgate db migrate`: apply the shipped schema migrations to
/// `consent.postgres.url`.
pub fn db_migrate(explicit: Option<&Path>) -> i32 {
    install_crypto();
    let source = ConfigSource::resolve(explicit);
    let runtime = match Runtime::load(&source) {
        Ok(r) => r,
        Err(errs) => {
            print_errors(&errs);
            return 1;
        }
    };
    let pg = runtime.config.consent.postgres.clone();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return 1;
        }
    };
    match rt.block_on(crate::consent::postgres::migrate(
        &pg.url,
        pg.password_file.as_deref(),
    )) {
        Ok(applied) if applied.is_empty() => {
            println!("ok: schema up to date");
            0
        }
        Ok(applied) => {
            for m in applied {
                println!("applied: {m}");
            }
            0
        }
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    }
}

async fn serve(runtime: Runtime, source: ConfigSource) -> i32 {
    let metrics = Arc::new(Metrics::new());
    metrics
        .config_reloads_total
        .with_label_values(&["success"])
        .inc_by(0);
    metrics
        .config_reloads_total
        .with_label_values(&["failure"])
        .inc_by(0);
    let consent = Arc::new(ConsentStore::new());
    let cfg = runtime.config.clone();
    let tokens = match crate::consent::api::load_tokens(&cfg.admin.tokens_file) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(error = %e, "admin.tokens_file rejected");
            return 1;
        }
    };
    let consent_source = match start_consent_source(&cfg, consent.clone(), &metrics).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "consent source failed to start");
            return 1;
        }
    };
    tracing::info!(records = consent.len(), "consent loaded");
    let api_ctx = Arc::new(ApiContext::new(
        consent.clone(),
        consent_source.writer(),
        tokens,
    ));
    let api: crate::admin::ApiHandler = Arc::new(move |req| {
        let ctx = api_ctx.clone();
        Box::pin(async move { crate::consent::api::handle(req, &ctx).await })
    });
    let minter = match load_interception_ca(&cfg.interception) {
        Ok(m) => Arc::new(m),
        Err(e) => {
            tracing::error!(error = %e, "interception CA unusable");
            return 1;
        }
    };
    let app = Arc::new(App::new(runtime, consent, metrics, source, minter));
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let listener = match tokio::net::TcpListener::bind(cfg.listen.proxy).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(addr = %cfg.listen.proxy, error = %e, "cannot bind listen.proxy");
            return 1;
        }
    };
    let admin = match crate::admin::spawn(
        app.clone(),
        cfg.listen.admin,
        Some(api),
        shutdown_rx.clone(),
    ) {
        Ok(h) => h,
        Err(e) => {
            tracing::error!(addr = %cfg.listen.admin, error = %e, "cannot bind listen.admin");
            return 1;
        }
    };
    let (tracker, drain) = crate::listen::tracker();
    let gateway = match cfg.listen.gateway {
        Some(addr) => match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => Some(tokio::spawn(crate::listen::gateway::run_gateway(
                app.clone(),
                l,
                shutdown_rx.clone(),
                tracker.clone(),
            ))),
            Err(e) => {
                tracing::error!(addr = %addr, error = %e, "cannot bind listen.gateway");
                return 1;
            }
        },
        None => None,
    };
    let proxy = tokio::spawn(crate::listen::run_proxy(
        app.clone(),
        listener,
        shutdown_rx.clone(),
        tracker.clone(),
    ));
    app.serving.store(true, Ordering::Relaxed);
    tracing::info!(proxy = %cfg.listen.proxy, admin = %cfg.listen.admin, "consentgate serving");

    let (mut hup, mut term, mut int) = match (
        signal(SignalKind::hangup()),
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(a), Ok(b), Ok(c)) => (a, b, c),
        _ => {
            tracing::error!("cannot install signal handlers");
            return 1;
        }
    };
    loop {
        tokio::select! {
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading configuration");
                let _ = app.reload();
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    tracing::info!("shutting down: no new connections, draining in-flight requests");
    app.serving.store(false, Ordering::Relaxed);
    let _ = shutdown_tx.send(true);
    let _ = proxy.await;
    if let Some(g) = gateway {
        let _ = g.await;
    }
    let grace = app.runtime.load().config.shutdown_grace;
    let drained = drain.wait(tracker, grace).await;
    if !drained {
        tracing::warn!(grace = ?grace, "grace period over; closing remaining connections");
    }
    let _ = admin.join();
    drop(consent_source);
    tracing::info!("stopped");
    0
}
