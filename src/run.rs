//! `consentgate run` and `consentgate check`: start-up, signals, shutdown; and
//! the small commands (`explain`, `audit`, `db migrate`, `ca init`).

use crate::app::{App, Runtime};
use crate::config::{ConfigError, ConfigSource};
use crate::consent::source::PropagationObserver;
use crate::consent::{
    ApiContext, ConsentStore, ConsentWriter, FileSourceConfig, FileSourceHandle, PgSourceConfig,
    PgSourceHandle,
};
use crate::metrics::Metrics;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::signal::unix::{signal, SignalKind};

/// The JSON log (and the OTLP exporter when `telemetry.otlp` is set).
fn init_telemetry(cfg: &crate::config::Config) -> Result<crate::telemetry::Telemetry, String> {
    let otlp = cfg
        .telemetry
        .otlp
        .as_ref()
        .map(|o| crate::telemetry::OtlpCfg {
            endpoint: o.endpoint.clone(),
            service_name: o.service_name.clone(),
            timeout: o.timeout,
        });
    crate::telemetry::init(&cfg.log.level, otlp.as_ref())
}

/// The hosts of the configured destinations (`destinations[].hosts`, and a
/// generic destination's `hosts`), for the interception CA's name constraints.
fn configured_hosts(cfg: &crate::config::Config) -> Vec<String> {
    let mut out = Vec::new();
    for d in &cfg.destinations {
        out.extend(d.hosts.iter().cloned());
        if let Some(hosts) = d
            .generic
            .as_ref()
            .and_then(|g| g.get("hosts"))
            .and_then(|h| h.as_array())
        {
            out.extend(
                hosts
                    .iter()
                    .filter_map(|h| h.as_str())
                    .map(str::to_ascii_lowercase),
            );
        }
    }
    out.sort();
    out.dedup();
    out
}

/// How `run` makes the interception CA on first start: the defaults, also
/// permitting the configured destinations' hosts.
fn ca_options(cfg: &crate::config::Config) -> crate::tls::CaOptions {
    crate::tls::CaOptions::default().permit(configured_hosts(cfg))
}

/// Install aws-lc-rs as the process-wide rustls provider (a dependency may also
/// enable `ring`; without an explicit default rustls would panic).
pub(crate) fn install_crypto() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

fn print_errors(errs: &[ConfigError]) {
    for e in errs {
        eprintln!("error: {e}");
    }
}

/// Create the interception CA when both files are missing (logged), then load
/// it. A configured destination host the CA may not sign for is logged: its
/// connections fail until the CA is rotated.
fn load_interception_ca(cfg: &crate::config::Config) -> Result<crate::tls::CertMinter, String> {
    let i = &cfg.interception;
    match crate::tls::ensure_ca(&i.ca_cert, &i.ca_key, &ca_options(cfg)) {
        Ok(Some(files)) => {
            tracing::info!(
                ca_cert = %i.ca_cert.display(),
                truststore = %files.truststore.display(),
                bundle = %files.bundle.as_ref().map(|b| b.display().to_string()).unwrap_or_default(),
                "interception CA created (first run); apps must trust this certificate"
            );
            for n in &files.notes {
                tracing::warn!("{n}");
            }
        }
        Ok(None) => {}
        Err(e) => return Err(e.to_string()),
    }
    let ca = crate::tls::load_ca(&i.ca_cert, &i.ca_key).map_err(|e| e.to_string())?;
    for problem in ca_host_problems(cfg, &ca) {
        tracing::warn!("{problem}");
    }
    Ok(crate::tls::CertMinter::new(ca))
}

/// Destination hosts (built-in and configured) outside the CA's name constraints.
fn ca_host_problems(cfg: &crate::config::Config, ca: &crate::tls::LoadedCa) -> Vec<String> {
    let mut out = Vec::new();
    let builtin = crate::tls::BUILTIN_PERMITTED_HOSTS
        .iter()
        .map(|h| h.to_string());
    for host in builtin.chain(configured_hosts(cfg)) {
        let h = host.strip_prefix("*.").unwrap_or(&host);
        if !ca.permits_dns(h) {
            out.push(format!(
                "interception: {}: the CA's name constraints do not permit {host}: \
                 intercepted connections to it will fail; make a new CA that permits it \
                 (consentgate ca init --force --permit {h}; see the CA rotation procedure \
                 in docs/RUNBOOK.md)",
                cfg.interception.ca_cert.display()
            ));
        }
    }
    out
}

/// Lock `audit.path`, load the pseudonym key (created 0600 on first run) and
/// prepare the audit writer. Nothing is written to the audit trail until the
/// returned starter runs: `run` starts it once every listener is bound.
fn prepare_audit(
    a: &crate::config::AuditCfg,
    metrics: &crate::metrics::Metrics,
) -> Result<
    (
        Arc<crate::audit::AuditWriter>,
        crate::audit::AuditStarter,
        Arc<crate::audit::PseudonymKey>,
    ),
    String,
> {
    use crate::audit::{AuditCounters, AuditOptions, CheckpointKey, FsyncPolicy};
    let mut opts = AuditOptions::new(&a.path);
    opts.fsync = match a.fsync {
        crate::config::AuditFsync::Always => FsyncPolicy::Always,
        crate::config::AuditFsync::Interval => FsyncPolicy::default(),
        crate::config::AuditFsync::Never => FsyncPolicy::Never,
    };
    opts.max_file_bytes = a.max_file_bytes;
    opts.max_total_bytes = a.max_total_bytes;
    opts.counters = Some(AuditCounters::from_metrics(metrics));
    if let Some(k) = &a.encryption_key_file {
        opts.encryption = Some(crate::audit::load_enc_key(k)?);
    }
    // The lock first: a second process sharing the directory stops here, before
    // it creates or writes anything.
    let (writer, starter) = crate::audit::AuditWriter::prepare(opts)?;
    let key_path = crate::audit::default_key_path(a.pseudonym_key_file.as_deref());
    let key = crate::audit::load_or_create_key(&key_path)?;
    let starter = starter.with_checkpoint_key(CheckpointKey::from_pseudonym_key(&key));
    Ok((Arc::new(writer), starter, Arc::new(key)))
}

/// `consentgate check`: every error in the config and in every file it names
/// (destinations, upstream CA, PostgreSQL TLS, interception CA, consent
/// snapshot, admin tokens, admin TLS), found in one pass; exit 0 or 1.
pub fn check(explicit: Option<&Path>) -> i32 {
    install_crypto();
    let source = ConfigSource::resolve(explicit);
    let errors = check_all(&source);
    for e in &errors {
        eprintln!("error: {e}");
    }
    if errors.is_empty() {
        println!("ok: {}", source.label());
        0
    } else {
        eprintln!("{} error(s) in {}", errors.len(), source.label());
        1
    }
}

/// What `check` and `run` verify of the loop (SPEC §13): webhook secrets,
/// mappings and TLS, and the sync key.
fn loop_check(cfg: &crate::config::Config) -> Vec<String> {
    let mut errs = Vec::new();
    if cfg.listen.webhooks.is_some() {
        errs.extend(crate::webhooks::check(&cfg.webhooks));
    }
    if let Some(k) = &cfg.sync.key_file {
        if let Err(e) = crate::audit::load_enc_key(k) {
            errs.push(format!("sync.key_file: {e}"));
        }
    }
    errs
}

/// Every problem `check` reports, in order: the config's own, then each
/// subsystem's over the config as read (a bad key does not hide a bad file).
fn check_all(source: &ConfigSource) -> Vec<String> {
    let (cfg, config_errors) = source.load_all();
    let mut errors: Vec<String> = config_errors.iter().map(ToString::to_string).collect();
    let Some(cfg) = cfg else { return errors };
    let file = source.label();
    // The runtime's own builders, each on its own so that one failing does not
    // hide the next.
    if let Err(errs) = crate::route::Registry::build(&cfg, &file) {
        errors.extend(errs.iter().map(ToString::to_string));
    }
    if cfg.upstream.extra_ca.as_deref().is_none_or(Path::is_file) {
        if let Err(e) = crate::forward::UpstreamClient::new(&cfg.upstream) {
            errors.push(e);
        }
    }
    let pg = &cfg.consent.postgres;
    if cfg.consent.source == crate::config::SourceKind::Postgres
        && pg.ca_file.as_deref().is_none_or(Path::is_file)
    {
        if let Err(e) =
            crate::consent::postgres::resolve_tls(&pg.url, pg.sslmode, pg.ca_file.as_deref())
        {
            errors.push(format!("{file}:{}: consent.postgres: {e}", pg.line));
        }
    }
    let i = &cfg.interception;
    if i.ca_cert.exists() || i.ca_key.exists() {
        match crate::tls::load_ca(&i.ca_cert, &i.ca_key) {
            Ok(ca) => errors.extend(ca_host_problems(&cfg, &ca)),
            Err(e) => errors.push(format!("interception: {e}")),
        }
    }
    if cfg.consent.source == crate::config::SourceKind::File && cfg.consent.file.is_file() {
        if let Err(e) = crate::consent::file_source::load_snapshot(&cfg.consent.file) {
            errors.push(format!("consent.file: {e}"));
        }
    }
    if cfg.admin.tokens_file.is_file() {
        if let Err(e) = crate::consent::api::load_tokens(&cfg.admin.tokens_file) {
            errors.push(format!("admin.tokens_file: {e}"));
        }
    }
    if let Some(t) = &cfg.admin.tls {
        let files = [Some(&t.cert), Some(&t.key), t.client_ca.as_ref()];
        if files.iter().flatten().all(|p| p.is_file()) {
            if let Err(e) = crate::tls::admin::server_config(t) {
                errors.push(e);
            }
        }
    }
    let id = &cfg.identify;
    if let Err(e) = crate::identify::Region::parse(&id.default_region) {
        errors.push(format!("{file}:{}: identify.default_region: {e}", id.line));
    }
    errors.extend(loop_check(&cfg));
    errors
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
    let telemetry = match init_telemetry(&runtime.config) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(error = %e, "telemetry.otlp unusable");
            eprintln!("error: {e}");
            return 1;
        }
    };
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
    let code = rt.block_on(serve(runtime, source));
    // Outside the runtime: the exporter flushes from its own thread.
    telemetry.shutdown();
    code
}

/// The running consent source (kept alive for as long as the proxy runs).
enum ConsentSource {
    File(FileSourceHandle),
    Postgres(PgSourceHandle),
    Nats(crate::consent::nats::NatsSourceHandle),
}

impl ConsentSource {
    fn writer(&self) -> Arc<dyn ConsentWriter> {
        match self {
            ConsentSource::File(s) => s.writer(),
            ConsentSource::Postgres(s) => s.writer(),
            ConsentSource::Nats(s) => s.writer(),
        }
    }

    /// The consent version applied so far (PostgreSQL only): the sync cursor.
    fn applied_version(&self) -> Option<crate::sync::AppliedVersion> {
        match self {
            ConsentSource::File(_) | ConsentSource::Nats(_) => None,
            ConsentSource::Postgres(s) => Some(s.applied_version_source()),
        }
    }
}

/// Whether the consent source may be written (`run`) or is only read (`explain`,
/// which may run next to the proxy that owns the journal).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Access {
    ReadWrite,
    ReadOnly,
}

async fn start_consent_source(
    cfg: &crate::config::Config,
    store: Arc<ConsentStore>,
    metrics: &Metrics,
    access: Access,
) -> Result<ConsentSource, String> {
    let hist = metrics.consent_propagation.clone();
    let observer: PropagationObserver = Arc::new(move |s| hist.observe(s));
    match cfg.consent.source {
        crate::config::SourceKind::File => {
            let c = file_source_config(&cfg.consent, access == Access::ReadOnly)?;
            crate::consent::file_source::start(c, store, observer)
                .await
                .map(ConsentSource::File)
        }
        crate::config::SourceKind::Postgres => {
            let c = PgSourceConfig::new(&cfg.consent.postgres);
            crate::consent::postgres::start(c, store, observer)
                .await
                .map(ConsentSource::Postgres)
        }
        crate::config::SourceKind::Nats => crate::consent::nats::start(
            cfg.consent.nats.clone(),
            cfg.consent.max_staleness,
            store,
            observer,
        )
        .await
        .map(ConsentSource::Nats),
    }
}

/// The file source's config: snapshot, journal directory and journal keys
/// (loaded here, so a missing or malformed key refuses to start, naming it).
/// `read_only`: replay the journal without locking or writing it (`explain`).
fn file_source_config(
    consent: &crate::config::ConsentCfg,
    read_only: bool,
) -> Result<FileSourceConfig, String> {
    use crate::consent::journal;
    let mut c = FileSourceConfig::new(&consent.file, &consent.journal);
    c.read_only = read_only;
    c.journal_keys = journal::Keys {
        current: consent
            .journal_key_file
            .as_deref()
            .map(|p| journal::load_key(p, "consent.journal_key_file"))
            .transpose()?,
        previous: consent
            .journal_previous_key_file
            .as_deref()
            .map(|p| journal::load_key(p, "consent.journal_previous_key_file"))
            .transpose()?,
    };
    Ok(c)
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
    let pg = PgSourceConfig::new(&runtime.config.consent.postgres);
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
    match rt.block_on(crate::consent::postgres::migrate(&pg)) {
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
    // Built before anything is written, so a bad file leaves no trace but the error.
    let admin_tls = match cfg.admin.tls.as_ref().map(crate::tls::admin::server_config) {
        None => None,
        Some(Ok(c)) => Some(c),
        Some(Err(e)) => {
            tracing::error!(error = %e, "admin.tls unusable");
            return 1;
        }
    };
    // Start order (SPEC §12): lock audit.path first, so a second process sharing
    // it stops here; build everything; bind every listener; only then write the
    // first audit record. A process that cannot bind leaves the trail untouched.
    let (audit, audit_starter, pseudonyms) = match prepare_audit(&cfg.audit, &metrics) {
        Ok(x) => x,
        Err(e) => {
            tracing::error!(error = %e, "audit trail unusable");
            eprintln!("error: {e}");
            return 1;
        }
    };
    let tokens = match crate::consent::api::load_tokens(&cfg.admin.tokens_file) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(error = %e, "admin.tokens_file rejected");
            return 1;
        }
    };
    let loop_errors = loop_check(&cfg);
    if !loop_errors.is_empty() {
        for e in &loop_errors {
            tracing::error!(error = %e, "webhooks/sync configuration unusable");
            eprintln!("error: {e}");
        }
        return 1;
    }
    let webhooks_tls = match cfg
        .webhooks
        .tls
        .as_ref()
        .filter(|_| cfg.listen.webhooks.is_some())
    {
        None => None,
        Some(t) => match crate::webhooks::tls_config(t) {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::error!(error = %e, "webhooks.tls unusable");
                return 1;
            }
        },
    };
    // The sync outbox observes the consent store from its first load (SPEC §13).
    let sync = match crate::sync::SyncOutbox::open(
        &cfg,
        consent.clone(),
        metrics.clone(),
        audit.clone(),
        pseudonyms.clone(),
    )
    .await
    {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "sync outbox unusable");
            eprintln!("error: {e}");
            return 1;
        }
    };
    let carrier = sync.as_ref().map(crate::sync::SyncOutbox::carrier);
    // `consent.replicate_to: nats` observes the store from its first load too (SPEC §14).
    let replica = cfg.consent.replicate_to.map(|_| {
        let (r, observer) = crate::consent::nats::Replica::new(consent.clone());
        consent.set_replica_observer(observer);
        r
    });
    let consent_source =
        match start_consent_source(&cfg, consent.clone(), &metrics, Access::ReadWrite).await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "consent source failed to start");
                return 1;
            }
        };
    tracing::info!(records = consent.len(), "consent loaded");
    let _replica = match replica {
        None => None,
        Some(r) => match crate::consent::nats::start_replica(&cfg.consent.nats, r).await {
            Ok(h) => Some(h),
            Err(e) => {
                tracing::error!(error = %e, "consent replication to NATS failed to start");
                return 1;
            }
        },
    };
    let mut api_ctx = ApiContext::new(consent.clone(), consent_source.writer(), tokens);
    if cfg.consent.source == crate::config::SourceKind::Nats {
        api_ctx = api_ctx.read_only(
            &cfg.consent.nats.bucket,
            cfg.consent.nats.owner_admin_url.as_deref(),
        );
    }
    if let Some(c) = &carrier {
        api_ctx = api_ctx.with_carrier(c.clone());
    }
    let api_ctx = Arc::new(api_ctx.with_on_change({
        let audit = audit.clone();
        let pseudonyms = pseudonyms.clone();
        Arc::new(move |ev: crate::consent::ChangeEvent| {
            let rec = crate::audit::AuditRecord::consent_change(
                &ev.actor,
                pseudonyms.pseudonym(&ev.patient_id),
                ev.op.as_str(),
            );
            if audit.submit(vec![rec]).is_err() {
                tracing::error!("consent change could not be audited");
            }
        })
    }));
    let api: crate::admin::ApiHandler = Arc::new(move |req| {
        let ctx = api_ctx.clone();
        Box::pin(async move { crate::consent::api::handle(req, &ctx).await })
    });
    let minter = match load_interception_ca(&cfg) {
        Ok(m) => Arc::new(m),
        Err(e) => {
            tracing::error!(error = %e, "interception CA unusable");
            return 1;
        }
    };
    minter.set_failure_observer({
        let m = metrics.clone();
        Arc::new(move |_| m.tls_mint_failures_total.inc())
    });
    metrics.init_destinations(runtime.registry.routes().iter().map(|r| r.name()));
    let app = Arc::new(App::new(
        runtime, consent, metrics, source, minter, audit, pseudonyms,
    ));
    // Opt-outs learned from vendors: on the egress path, and by webhook (SPEC §13).
    let optouts = || crate::optout::OptOuts {
        writer: consent_source.writer(),
        store: app.consent.clone(),
        audit: app.audit.clone(),
        pseudonyms: app.pseudonyms.clone(),
        metrics: app.metrics.clone(),
        carrier: carrier.clone(),
    };
    let _ = app
        .learner
        .set(Arc::new(crate::learn::Learner { optouts: optouts() }));
    let webhooks = match cfg.listen.webhooks {
        None => None,
        Some(addr) => {
            let w = match crate::webhooks::Webhooks::new(app.clone(), &cfg.webhooks, optouts()) {
                Ok(w) => Arc::new(w),
                Err(e) => {
                    tracing::error!(error = %e, "webhooks unusable");
                    eprintln!("error: {e}");
                    return 1;
                }
            };
            match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => Some((w, l)),
                Err(e) => {
                    tracing::error!(addr = %addr, error = %e, "cannot bind listen.webhooks");
                    return 1;
                }
            }
        }
    };
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let listener = match tokio::net::TcpListener::bind(cfg.listen.proxy).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(addr = %cfg.listen.proxy, error = %e, "cannot bind listen.proxy");
            return 1;
        }
    };
    let admin_listen = crate::admin::AdminListen {
        admin: cfg.listen.admin,
        metrics: cfg.listen.metrics,
        tls: admin_tls,
    };
    let admin = match crate::admin::spawn(app.clone(), admin_listen, Some(api), shutdown_rx.clone())
    {
        Ok(h) => h,
        Err(e) => {
            tracing::error!(error = %e, "admin listener not started");
            return 1;
        }
    };
    let gateway_listener = match cfg.listen.gateway {
        Some(addr) => match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::error!(addr = %addr, error = %e, "cannot bind listen.gateway");
                return 1;
            }
        },
        None => None,
    };
    // Every listener is bound: the trail starts (recovery, then `config load`,
    // then whatever the admin API queued meanwhile).
    if let Err(e) = audit_starter.start(vec![crate::audit::AuditRecord::config("load", "success")])
    {
        tracing::error!(error = %e, "audit trail unusable");
        eprintln!("error: {e}");
        let _ = shutdown_tx.send(true);
        return 1;
    }
    let (tracker, drain) = crate::listen::tracker();
    let gateway = gateway_listener.map(|l| {
        tokio::spawn(crate::listen::gateway::run_gateway(
            app.clone(),
            l,
            shutdown_rx.clone(),
            tracker.clone(),
        ))
    });
    let proxy = tokio::spawn(crate::listen::run_proxy(
        app.clone(),
        listener,
        shutdown_rx.clone(),
        tracker.clone(),
    ));
    let webhooks = webhooks.map(|(w, l)| {
        tokio::spawn(crate::webhooks::serve(
            w,
            l,
            webhooks_tls,
            shutdown_rx.clone(),
        ))
    });
    if let Some(s) = &sync {
        let a = app.clone();
        s.start(
            Arc::new(move || a.runtime.load().upstream.clone()),
            consent_source.applied_version(),
        );
    }
    app.serving.store(true, Ordering::Relaxed);
    tracing::info!(proxy = %cfg.listen.proxy, admin = %cfg.listen.admin,
        admin_tls = cfg.admin.tls.is_some(),
        webhooks = %cfg.listen.webhooks.map(|a| a.to_string()).unwrap_or_else(|| "off".into()),
        sync_targets = cfg.sync.targets.len(),
        metrics = %cfg.listen.metrics.map(|a| a.to_string()).unwrap_or_else(|| "on admin".into()),
        "consentgate serving");

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
                if app.reload().is_ok() {
                    let rt = app.runtime.load();
                    app.metrics.init_destinations(rt.registry.routes().iter().map(|r| r.name()));
                }
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
    if let Some(w) = webhooks {
        let _ = w.await;
    }
    let grace = app.runtime.load().config.shutdown_grace;
    let drained = drain.wait(tracker, grace).await;
    if !drained {
        tracing::warn!(grace = ?grace, "grace period over; closing remaining connections");
    }
    let _ = admin.join();
    drop(consent_source);
    // Everything queued for the audit trail is written and fsync'd before exit.
    match tokio::time::timeout(std::time::Duration::from_secs(10), app.audit.flush()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "audit trail not flushed at shutdown"),
        Err(_) => tracing::error!("audit trail not flushed within 10s of shutdown"),
    }
    tracing::info!("stopped");
    0
}

/// `consentgate ca init`'s flags.
pub struct CaInit {
    pub out: std::path::PathBuf,
    pub force: bool,
    pub days: u32,
    pub config: Option<std::path::PathBuf>,
    pub permit: Vec<String>,
    pub no_name_constraints: bool,
    pub system_roots: Option<std::path::PathBuf>,
}

/// `consentgate ca init`: the CA, its bundle and truststore, and how to trust it.
pub fn ca_init(a: &CaInit) -> i32 {
    install_crypto();
    let mut opts = crate::tls::CaOptions {
        days: a.days,
        system_roots: a.system_roots.clone(),
        ..Default::default()
    };
    if a.no_name_constraints {
        opts.permitted_dns = None;
    } else {
        // The configured destinations' hosts: from --config, or the default
        // config file when there is one (never the embedded default: it adds none).
        let source = match &a.config {
            Some(p) => Some(ConfigSource::File(p.clone())),
            None => match ConfigSource::resolve(None) {
                ConfigSource::Embedded => None,
                s => Some(s),
            },
        };
        if let Some(source) = source {
            // Only the destinations matter here: a config made for the cluster
            // (files that exist only there) still gives its hosts.
            let (cfg, errs) = source.load_all();
            let bad: Vec<_> = errs
                .into_iter()
                .filter(|e| e.key.starts_with("destinations") || e.key.starts_with('('))
                .collect();
            match cfg {
                Some(cfg) if bad.is_empty() => opts = opts.permit(configured_hosts(&cfg)),
                _ => {
                    print_errors(&bad);
                    eprintln!(
                        "error: the CA's permitted hosts come from {}: fix its destinations, \
                         or name hosts with --permit",
                        source.label()
                    );
                    return 1;
                }
            }
        }
        opts = opts.permit(&a.permit);
    }
    match crate::tls::init_ca(&a.out, a.force, &opts) {
        Ok(files) => {
            println!("wrote {}", files.cert.display());
            println!("wrote {} (secret: mode 0600)", files.key.display());
            if let Some(b) = &files.bundle {
                println!("wrote {} (system roots + this CA)", b.display());
            }
            println!(
                "wrote {} (PKCS#12 truststore, password {:?})",
                files.truststore.display(),
                crate::tls::TRUSTSTORE_PASSWORD
            );
            match &opts.permitted_dns {
                Some(hosts) => println!(
                    "valid {} days; may sign only for: {}",
                    opts.days,
                    hosts.join(", ")
                ),
                None => println!(
                    "valid {} days; no name constraints (may sign for any host)",
                    opts.days
                ),
            }
            for n in &files.notes {
                println!("note: {n}");
            }
            println!();
            println!("{}", crate::tls::trust_instructions(&files.cert));
            0
        }
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    }
}

fn load_enc(key_file: Option<&Path>) -> Result<Option<crate::audit::EncKey>, i32> {
    match key_file {
        None => Ok(None),
        Some(p) => crate::audit::load_enc_key(p).map(Some).map_err(|e| {
            eprintln!("error: {e}");
            1
        }),
    }
}

/// `consentgate audit verify PATH...`: exit 0 with the record count, or 1
/// naming the first broken record (or saying why the trail cannot be verified).
pub fn audit_verify(
    paths: &[std::path::PathBuf],
    key_file: Option<&Path>,
    pseudonym_key_file: Option<&Path>,
) -> i32 {
    let key = match load_enc(key_file) {
        Ok(k) => k,
        Err(c) => return c,
    };
    let checkpoint_key = match pseudonym_key_file {
        None => None,
        // Never created here: a verifier must hold the writer's key, not a new one.
        Some(p) => match std::fs::read_to_string(p)
            .map_err(|e| e.to_string())
            .and_then(|t| crate::audit::PseudonymKey::from_hex(&t))
        {
            Ok(k) => Some(crate::audit::CheckpointKey::from_pseudonym_key(&k)),
            Err(e) => {
                eprintln!("error: pseudonym key {}: {e}", p.display());
                return 1;
            }
        },
    };
    match crate::audit::verify_trail(paths, key.as_ref(), checkpoint_key.as_ref()) {
        Ok(r) => {
            let c = &r.chain;
            match &r.capped {
                None => println!(
                    "ok: {} records in {} files, chain intact from the first record",
                    c.records, c.files
                ),
                Some(cap) => {
                    println!(
                        "ok: {} records in {} files, chain intact from the anchor of the \
                         authenticated checkpoint at {} line {} ({} earlier records in {} files \
                         removed by audit.max_total_bytes)",
                        c.records,
                        c.files,
                        cap.file.display(),
                        cap.line,
                        cap.removed_records,
                        cap.removed_files
                    );
                    if cap.leftover_records > 0 {
                        println!(
                            "note: {} records in files that checkpoint names as removed are still \
                             present (removal interrupted); they are chained but not counted",
                            cap.leftover_records
                        );
                    }
                }
            }
            if r.checkpoints_authenticated > 0 {
                println!("checkpoints authenticated: {}", r.checkpoints_authenticated);
            }
            if r.checkpoints_unchecked > 0 {
                println!(
                    "note: {} checkpoint(s) not authenticated (no --pseudonym-key-file); the \
                     chain from the first record covers them",
                    r.checkpoints_unchecked
                );
            }
            0
        }
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    }
}

/// `consentgate audit find --patient P [--since T]`.
pub fn audit_find(
    patient: &str,
    since: Option<&str>,
    config: Option<&Path>,
    key_file: Option<&Path>,
    paths: &[std::path::PathBuf],
) -> i32 {
    let source = ConfigSource::resolve(config);
    let cfg = match source.load() {
        Ok(c) => c,
        Err(errs) => {
            print_errors(&errs);
            return 1;
        }
    };
    let since = match since.map(chrono::DateTime::parse_from_rfc3339).transpose() {
        Ok(s) => s.map(|t| t.with_timezone(&chrono::Utc)),
        Err(_) => {
            eprintln!("error: --since: expected an RFC 3339 time like 2026-11-20T00:00:00Z");
            return 1;
        }
    };
    let key_path = crate::audit::default_key_path(cfg.audit.pseudonym_key_file.as_deref());
    if !key_path.exists() {
        eprintln!("error: pseudonym key {} not found", key_path.display());
        return 1;
    }
    let pkey = match crate::audit::load_or_create_key(&key_path) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("error: {e}");
            return 1;
        }
    };
    let enc = match load_enc(key_file.or(cfg.audit.encryption_key_file.as_deref())) {
        Ok(k) => k,
        Err(c) => return c,
    };
    let paths = if paths.is_empty() {
        vec![cfg.audit.path.clone()]
    } else {
        paths.to_vec()
    };
    match crate::audit::find(&paths, enc.as_ref(), patient, since, &pkey) {
        Ok(recs) => {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            for r in &recs {
                // `audit find | head`: a reader that has seen enough closes the
                // pipe; that ends the listing quietly, not with a panic.
                if let Err(e) = writeln!(out, "{r}") {
                    if e.kind() == std::io::ErrorKind::BrokenPipe {
                        return 0;
                    }
                    eprintln!("error: writing the records: {e}");
                    return 1;
                }
            }
            if let Err(e) = out.flush() {
                if e.kind() == std::io::ErrorKind::BrokenPipe {
                    return 0;
                }
                eprintln!("error: writing the records: {e}");
                return 1;
            }
            eprintln!("{} record(s)", recs.len());
            0
        }
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    }
}

/// `consentgate sync status`: what waits in the sync outbox, per target (JSON).
pub fn sync_status(explicit: Option<&Path>) -> i32 {
    install_crypto();
    let source = ConfigSource::resolve(explicit);
    let cfg = match source.load() {
        Ok(c) => c,
        Err(errs) => {
            print_errors(&errs);
            return 1;
        }
    };
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
    match rt.block_on(crate::sync::status(&cfg)) {
        Ok(v) => {
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            0
        }
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    }
}

/// `consentgate explain --request FILE`: the decision trace, nothing forwarded.
pub fn explain(config: Option<&Path>, request: &Path, show_body: bool) -> i32 {
    install_crypto();
    let source = ConfigSource::resolve(config);
    let rt = match Runtime::load(&source) {
        Ok(r) => r,
        Err(errs) => {
            print_errors(&errs);
            return 1;
        }
    };
    let raw = match std::fs::read(request) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("error: {}: {e}", request.display());
            return 1;
        }
    };
    let key_path = crate::audit::default_key_path(rt.config.audit.pseudonym_key_file.as_deref());
    let pkey = match crate::audit::load_or_create_key(&key_path) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("error: {e}");
            return 1;
        }
    };
    // The same consent the proxy would use: the configured source, loaded once.
    let store = Arc::new(ConsentStore::new());
    let tokio_rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return 1;
        }
    };
    let cfg = &rt.config;
    let metrics = Metrics::new();
    let _source = match tokio_rt.block_on(start_consent_source(
        cfg,
        store.clone(),
        &metrics,
        Access::ReadOnly,
    )) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: consent: {e}");
            return 1;
        }
    };
    if !store.source_up() {
        eprintln!("warning: the consent source is not loaded; the trace shows what a proxy without consent data would do");
    }
    let x = crate::explain::Explainer {
        rt: &rt,
        consent: &store,
        pseudonym: &|id| pkey.pseudonym(id),
        show_body,
    };
    match x.explain(&raw) {
        Ok(trace) => {
            println!(
                "{}",
                serde_json::to_string_pretty(&trace).unwrap_or_default()
            );
            0
        }
        Err(e) => {
            eprintln!("error: {}: {e}", request.display());
            1
        }
    }
}
