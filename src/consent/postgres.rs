//! The PostgreSQL consent source (`consent.source: postgres`).
//!
//! The table (`migrations/0001_consent.sql`, applied by `consentgate db
//! migrate`) holds one row per patient: the record in stored form, a `version`
//! drawn from a sequence on every write (writers are serialised until commit
//! by an advisory lock, so versions become visible in order), `changed_at`
//! (clock_timestamp() of the write) and a `deleted` tombstone flag. Every write
//! NOTIFYs channel `consentgate_consent`.
//!
//! - Start: LISTEN, then stream the whole table into the cache through a portal
//!   in batches of `batch` rows (never one giant result), then mark the store
//!   good: the proxy is ready.
//! - Live: on a notification, and on every `tick` (the heartbeat that also
//!   catches anything a lost notification missed), fetch the rows with
//!   `version > last applied` in version order, in pages; a tombstone deletes.
//!   Each successful round marks the store good.
//! - Disconnected: the store is marked down and no longer marked good, so past
//!   `max_staleness` marketing decisions fail closed and /readyz says not
//!   ready. Reconnects back off from 100 ms doubling to 5 s; after reconnecting
//!   everything with `version > last applied` is applied (tombstones included)
//!   before the store is marked good again.
//! - Admin-API writes ([`ConsentWriter::modify`]) are one transaction each on
//!   a small pool of writer connections: the row is read `FOR UPDATE`, the
//!   `If-Match` precondition checked and the merge run on it, the result
//!   written (last write wins by `updated_at`, a tie to the more restrictive
//!   record) and committed; the answer comes after COMMIT, and the write is
//!   applied to the local store at once. Other instances see it through the
//!   feed. The row lock makes concurrent writes to one patient, from any
//!   number of instances, take turns: none merges into a stale record.
//! - A record's `version` is the row's `version` column (the record JSON in
//!   the table never carries one).
//! - TLS (`consent.postgres.sslmode`, `ca_file`): see [`super::pg_tls`].
//!
//! Logs carry counts, versions and SQLSTATE codes only: never patient ids,
//! never database error details (which can quote row values).

use super::pg_tls::{PgSslMode, PgTls};
use super::record::ConsentRecord;
use super::source::{
    prepare_put, BoxFuture, Change, ConsentWriter, Merge, Precondition, PropagationObserver,
    WriteError, Written,
};
use super::store::ConsentStore;
use crate::config::PostgresCfg;
use chrono::{DateTime, Utc};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_postgres::config::SslMode;
use tokio_postgres::error::SqlState;
use tokio_postgres::{AsyncMessage, Client, Row, Statement};

/// The environment variable holding the database password (when no
/// `consent.postgres.password_file` is configured).
const PASSWORD_ENV: &str = "CONSENTGATE_PG_PASSWORD";
/// The NOTIFY channel the triggers announce changes on.
const CHANNEL: &str = "consentgate_consent";
/// Migrations shipped in the repository, applied in order by `db migrate`.
const MIGRATIONS: &[(&str, &str)] = &[
    (
        "0001_consent",
        include_str!("../../migrations/0001_consent.sql"),
    ),
    // The sync outbox (SPEC §13; src/sync/pg.rs).
    (
        "0002_sync_outbox",
        include_str!("../../migrations/0002_sync_outbox.sql"),
    ),
];

#[derive(Clone, Debug)]
pub(crate) struct PgSourceConfig {
    /// `consent.postgres.url` (no password in it).
    pub(crate) url: String,
    /// `consent.postgres.password_file`; else `CONSENTGATE_PG_PASSWORD`.
    pub(crate) password_file: Option<PathBuf>,
    /// `consent.postgres.sslmode`; `None`: the URL's `sslmode=`, else disable.
    ssl_mode: Option<PgSslMode>,
    /// `consent.postgres.ca_file`; `None`: the URL's `sslrootcert=`, if any.
    pub(crate) ca_file: Option<PathBuf>,
    /// Rows per portal fetch / page.
    pub(crate) batch: i32,
    /// Heartbeat: catch-up query and mark-good interval while connected.
    pub(crate) tick: Duration,
    backoff_min: Duration,
    backoff_max: Duration,
    /// Bound on one query round trip (a dead peer without RST must not hang).
    query_timeout: Duration,
    /// Connections for admin-API write transactions (beyond the feed's one).
    writer_connections: usize,
}

impl PgSourceConfig {
    pub(crate) fn new(pg: &PostgresCfg) -> Self {
        PgSourceConfig {
            url: pg.url.clone(),
            password_file: pg.password_file.clone(),
            ssl_mode: pg.sslmode,
            ca_file: pg.ca_file.clone(),
            batch: 10_000,
            tick: Duration::from_secs(1),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            query_timeout: Duration::from_secs(10),
            writer_connections: 4,
        }
    }
}

/// The TLS parameters of a connection string: the string without them, and
/// the values of `sslmode` and `sslrootcert` (tokio-postgres parses neither
/// `verify-full` nor `sslrootcert`, so consentgate reads them itself).
fn split_tls_params(url: &str) -> (String, Option<String>, Option<String>) {
    let (mut mode, mut root) = (None, None);
    if url.contains("://") {
        let Some((base, query)) = url.split_once('?') else {
            return (url.to_string(), None, None);
        };
        let mut kept = Vec::new();
        for pair in query.split('&') {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = form_urlencoded::parse(format!("v={v}").as_bytes())
                .next()
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default();
            match k {
                "sslmode" => mode = Some(v),
                "sslrootcert" => root = Some(v),
                _ => kept.push(pair),
            }
        }
        let rest = if kept.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        (rest, mode, root)
    } else {
        let mut kept = Vec::new();
        for tok in url.split_whitespace() {
            if let Some(v) = tok.strip_prefix("sslmode=") {
                mode = Some(v.to_string());
            } else if let Some(v) = tok.strip_prefix("sslrootcert=") {
                root = Some(v.to_string());
            } else {
                kept.push(tok);
            }
        }
        (kept.join(" "), mode, root)
    }
}

/// Validate a `consent.postgres.url` without connecting (config check): a
/// parseable URL, no password in it, and a supported `sslmode` if it has one.
fn check_url(url: &str) -> Result<(), String> {
    let (rest, mode, _) = split_tls_params(url);
    let cfg: tokio_postgres::Config = rest
        .parse()
        .map_err(|e: tokio_postgres::Error| e.to_string())?;
    if cfg.get_password().is_some() {
        return Err(format!(
            "the password must not be in the URL; use {PASSWORD_ENV} or consent.postgres.password_file"
        ));
    }
    if let Some(m) = mode {
        PgSslMode::parse(&m)?;
    }
    Ok(())
}

/// The TLS mode and CA file in force: `consent.postgres.sslmode` /
/// `ca_file`, else the URL's `sslmode=` / `sslrootcert=`, else disable. The
/// two disagreeing, or a CA file without `verify-full` (it would not be
/// used, and the operator who set it expects verification), is an error.
pub(crate) fn resolve_tls(
    url: &str,
    mode: Option<PgSslMode>,
    ca_file: Option<&Path>,
) -> Result<(PgSslMode, Option<PathBuf>), String> {
    let (_, url_mode, url_root) = split_tls_params(url);
    let url_mode = url_mode.map(|m| PgSslMode::parse(&m)).transpose()?;
    let mode = match (mode, url_mode) {
        (Some(k), Some(u)) if k != u => {
            return Err(format!(
                "consent.postgres.sslmode is {} but the URL says sslmode={}; keep one",
                k.as_str(),
                u.as_str()
            ))
        }
        (Some(m), _) | (None, Some(m)) => m,
        (None, None) => PgSslMode::Disable,
    };
    let ca = ca_file
        .map(Path::to_path_buf)
        .or(url_root.map(PathBuf::from));
    if ca.is_some() && mode != PgSslMode::VerifyFull {
        return Err(format!(
            "consent.postgres.ca_file (or sslrootcert) is only used with sslmode verify-full, \
             and sslmode is {}",
            mode.as_str()
        ));
    }
    Ok((mode, ca))
}

/// The connection config and its TLS connector: URL, password from the file
/// or the environment, TLS as [`resolve_tls`] says, `application_name`
/// defaulting to `consentgate`.
pub(crate) fn connect_config(
    cfg: &PgSourceConfig,
) -> Result<(tokio_postgres::Config, PgTls), String> {
    check_url(&cfg.url).map_err(|e| format!("consent.postgres.url: {e}"))?;
    let (mode, ca) = resolve_tls(&cfg.url, cfg.ssl_mode, cfg.ca_file.as_deref())?;
    let (rest, _, _) = split_tls_params(&cfg.url);
    let mut pg: tokio_postgres::Config = rest
        .parse()
        .map_err(|e: tokio_postgres::Error| format!("consent.postgres.url: {e}"))?;
    pg.ssl_mode(match mode {
        PgSslMode::Disable => SslMode::Disable,
        PgSslMode::Require | PgSslMode::VerifyFull => SslMode::Require,
    });
    let tls = PgTls::new(mode, ca.as_deref())?;
    let password = match &cfg.password_file {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .map_err(|e| format!("consent.postgres.password_file {}: {e}", p.display()))?,
        ),
        None => std::env::var(PASSWORD_ENV).ok(),
    };
    if let Some(pw) = password {
        let pw = pw.trim_end_matches(['\r', '\n']);
        if !pw.is_empty() {
            pg.password(pw);
        }
    }
    if pg.get_application_name().is_none() {
        pg.application_name("consentgate");
    }
    if pg.get_connect_timeout().is_none() {
        pg.connect_timeout(Duration::from_secs(5));
    }
    Ok((pg, tls))
}

/// Why a round against the database failed.
#[derive(Debug)]
enum PgError {
    Db(tokio_postgres::Error),
    Timeout,
}

impl PgError {
    fn is_missing_table(&self) -> bool {
        matches!(self, PgError::Db(e) if e.code() == Some(&SqlState::UNDEFINED_TABLE))
    }
}

impl From<tokio_postgres::Error> for PgError {
    fn from(e: tokio_postgres::Error) -> Self {
        PgError::Db(e)
    }
}

impl std::fmt::Display for PgError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PgError::Db(e) => f.write_str(&describe(e)),
            PgError::Timeout => f.write_str("query timed out"),
        }
    }
}

/// A database error without anything that could quote row data: SQLSTATE
/// and the constraint or table name for server errors; the client-side
/// error text (I/O, protocol) otherwise.
pub(crate) fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut s = format!("database error {}", db.code().code());
            if let Some(c) = db.constraint() {
                s.push_str(&format!(" (constraint {c})"));
            } else if let Some(t) = db.table() {
                s.push_str(&format!(" (table {t})"));
            }
            if db.code() == &SqlState::UNDEFINED_TABLE {
                s.push_str(": consentgate_consent missing; run `consentgate db migrate`");
            }
            s
        }
        None => {
            // Client-side errors (I/O, TLS, protocol): the cause is the useful
            // part ("invalid peer certificate: UnknownIssuer"), and holds no
            // row data.
            let mut s = e.to_string();
            let mut cause = std::error::Error::source(e);
            while let Some(c) = cause {
                let text = c.to_string();
                if !s.contains(&text) {
                    s.push_str(": ");
                    s.push_str(&text);
                }
                cause = c.source();
            }
            s
        }
    }
}

async fn timed<T, F>(d: Duration, f: F) -> Result<T, PgError>
where
    F: std::future::Future<Output = Result<T, tokio_postgres::Error>>,
{
    match tokio::time::timeout(d, f).await {
        Ok(r) => r.map_err(PgError::Db),
        Err(_) => Err(PgError::Timeout),
    }
}

/// What the feed and the writer share. `apply` serialises every change to
/// the store made on behalf of the database.
struct Shared {
    cfg: PgSourceConfig,
    pg: tokio_postgres::Config,
    tls: PgTls,
    store: Arc<ConsentStore>,
    observer: PropagationObserver,
    apply: Mutex<ApplyState>,
    connected: AtomicBool,
    reconnects: AtomicU64,
    /// Whether the initial full load has completed.
    loaded: AtomicBool,
    writers: WriterPool,
}

#[derive(Default)]
struct ApplyState {
    /// Every version <= this has been applied (or superseded locally).
    last: i64,
    /// Local writes applied ahead of the feed: patient id → version.
    ahead: HashMap<String, i64>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn seconds_since(t: DateTime<Utc>) -> f64 {
    (Utc::now() - t)
        .to_std()
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// One row of `consentgate_consent` as the feed reads it.
struct FeedRow {
    patient_id: String,
    record: serde_json::Value,
    deleted: bool,
    version: i64,
    changed_at: DateTime<Utc>,
}

const COLUMNS: &str = "patient_id, record, deleted, version, changed_at";

fn feed_row(r: &Row) -> Result<FeedRow, tokio_postgres::Error> {
    Ok(FeedRow {
        patient_id: r.try_get(0)?,
        record: r.try_get(1)?,
        deleted: r.try_get(2)?,
        version: r.try_get(3)?,
        changed_at: r.try_get(4)?,
    })
}

/// Counts of one apply round.
#[derive(Default, Debug, Clone, Copy)]
struct Applied {
    rows: usize,
    changed: usize,
    rejected: usize,
    max_version: i64,
}

impl Shared {
    /// Apply rows (in version order) on top of the store. `observe`: count
    /// propagation for rows that changed the cache (not for the initial load).
    fn apply_rows(&self, rows: &[Row], observe: bool, initial: bool) -> Result<Applied, PgError> {
        let mut st = lock(&self.apply);
        let mut out = Applied::default();
        for r in rows {
            let row = feed_row(r)?;
            out.rows += 1;
            out.max_version = out.max_version.max(row.version);
            if !initial && row.version <= st.last {
                continue;
            }
            if st
                .ahead
                .get(&row.patient_id)
                .is_some_and(|v| *v >= row.version)
            {
                continue;
            }
            let changed = if row.deleted {
                !initial && self.store.delete(&row.patient_id)
            } else {
                match ConsentRecord::from_value(&row.record, None) {
                    Ok(mut rec) => {
                        // The key and version columns are authoritative.
                        rec.patient_id = row.patient_id;
                        rec.version = u64::try_from(row.version).unwrap_or(0);
                        if initial {
                            self.store.put(rec);
                            true
                        } else {
                            self.store.put_if_changed(rec)
                        }
                    }
                    Err(e) => {
                        out.rejected += 1;
                        tracing::warn!(version = row.version, field = %e.field,
                            "consent row rejected (invalid record); skipped");
                        false
                    }
                }
            };
            if changed {
                out.changed += 1;
                if observe {
                    (self.observer)(seconds_since(row.changed_at));
                }
            }
        }
        if !initial {
            st.last = st.last.max(out.max_version);
            let last = st.last;
            st.ahead.retain(|_, v| *v > last);
        }
        Ok(out)
    }

    /// Full load through a portal, `batch` rows per fetch. Returns the
    /// highest version seen (tombstones included).
    async fn full_load(&self, client: &mut Client) -> Result<Applied, PgError> {
        let q = self.cfg.query_timeout;
        let tx = timed(q, client.transaction()).await?;
        let sql = format!("SELECT {COLUMNS} FROM consentgate_consent");
        let portal = timed(q, tx.bind(sql.as_str(), &[])).await?;
        let mut total = Applied::default();
        loop {
            let rows = timed(q, tx.query_portal(&portal, self.cfg.batch)).await?;
            let a = self.apply_rows(&rows, false, true)?;
            total.rows += a.rows;
            total.changed += a.changed;
            total.rejected += a.rejected;
            total.max_version = total.max_version.max(a.max_version);
            if rows.len() < self.cfg.batch as usize {
                break;
            }
        }
        timed(q, tx.commit()).await?;
        let mut st = lock(&self.apply);
        st.last = st.last.max(total.max_version);
        Ok(total)
    }

    /// The catch-up query, prepared once per connection.
    async fn prepare_catch_up(&self, client: &Client) -> Result<Statement, PgError> {
        let sql = format!(
            "SELECT {COLUMNS} FROM consentgate_consent WHERE version > $1 \
             ORDER BY version LIMIT {}",
            self.cfg.batch
        );
        timed(self.cfg.query_timeout, client.prepare(&sql)).await
    }

    /// Apply everything with `version > last`, in version order, one page of
    /// `batch` rows at a time (keyset pagination on the version index).
    async fn catch_up(&self, client: &Client, stmt: &Statement) -> Result<Applied, PgError> {
        let q = self.cfg.query_timeout;
        let mut total = Applied::default();
        loop {
            let since = lock(&self.apply).last;
            let rows = timed(q, client.query(stmt, &[&since])).await?;
            let a = self.apply_rows(&rows, true, false)?;
            total.rows += a.rows;
            total.changed += a.changed;
            total.rejected += a.rejected;
            total.max_version = total.max_version.max(a.max_version);
            if rows.len() < self.cfg.batch as usize {
                return Ok(total);
            }
        }
    }
}

/// A connected, synced session: the client and the task driving the
/// connection (it ends when the connection does).
struct Session {
    client: Client,
    catch_up: Statement,
    conn: JoinHandle<()>,
    wake: mpsc::Receiver<()>,
}

/// Connect, LISTEN, and bring the store up to date (a full load the first
/// time, `version > last` after a reconnect).
async fn connect_and_sync(sh: &Shared) -> Result<Session, PgError> {
    let (mut client, mut conn) = timed(sh.cfg.query_timeout, sh.pg.connect(sh.tls.clone())).await?;
    let (tx, wake) = mpsc::channel::<()>(1);
    let conn = tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| conn.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(_))) => {
                    // Full: a catch-up is already pending, which covers this one.
                    let _ = tx.try_send(());
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    tracing::warn!(error = %describe(&e), "consent database connection lost");
                    return;
                }
                None => return,
            }
        }
    });
    let result = async {
        timed(
            sh.cfg.query_timeout,
            client.batch_execute(&format!("LISTEN {CHANNEL}")),
        )
        .await?;
        let stmt = sh.prepare_catch_up(&client).await?;
        if sh.loaded.load(Ordering::Relaxed) {
            let a = sh.catch_up(&client, &stmt).await?;
            tracing::info!(
                rows = a.rows,
                changed = a.changed,
                rejected = a.rejected,
                version = lock(&sh.apply).last,
                "consent resynced after reconnect"
            );
        } else {
            let started = std::time::Instant::now();
            let a = sh.full_load(&mut client).await?;
            sh.loaded.store(true, Ordering::Relaxed);
            tracing::info!(
                rows = a.rows,
                records = sh.store.len(),
                rejected = a.rejected,
                version = a.max_version,
                millis = started.elapsed().as_millis() as u64,
                "consent table loaded"
            );
        }
        Ok::<Statement, PgError>(stmt)
    }
    .await;
    match result {
        Ok(catch_up) => {
            // Synced: current as of now.
            sh.store.mark_good();
            Ok(Session {
                client,
                catch_up,
                conn,
                wake,
            })
        }
        Err(e) => {
            conn.abort();
            Err(e)
        }
    }
}

/// Serve one session until the connection fails.
async fn serve(sh: &Shared, s: Session) {
    let Session {
        client,
        catch_up,
        mut conn,
        mut wake,
    } = s;
    sh.connected.store(true, Ordering::Relaxed);
    sh.store.mark_good();
    let mut tick = tokio::time::interval(sh.cfg.tick);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = &mut conn => break,
            w = wake.recv() => {
                if w.is_none() {
                    break;
                }
                match sh.catch_up(&client, &catch_up).await {
                    Ok(_) => sh.store.mark_good(),
                    Err(e) => {
                        tracing::warn!(error = %e, "consent catch-up failed");
                        break;
                    }
                }
            }
            _ = tick.tick() => {
                match sh.catch_up(&client, &catch_up).await {
                    Ok(_) => sh.store.mark_good(),
                    Err(e) => {
                        tracing::warn!(error = %e, "consent heartbeat failed");
                        break;
                    }
                }
            }
        }
    }
    sh.connected.store(false, Ordering::Relaxed);
    sh.store.mark_down();
    conn.abort();
    tracing::warn!(
        version = lock(&sh.apply).last,
        "consent database disconnected; reconnecting (decisions use the cache until max_staleness)"
    );
}

async fn run(sh: Arc<Shared>, mut first: Option<Session>) {
    let mut backoff = sh.cfg.backoff_min;
    loop {
        let session = match first.take() {
            Some(s) => Some(s),
            None => match connect_and_sync(&sh).await {
                Ok(s) => {
                    sh.reconnects.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(
                        version = lock(&sh.apply).last,
                        "consent database reconnected"
                    );
                    Some(s)
                }
                Err(e) => {
                    sh.store.mark_down();
                    tracing::warn!(error = %e, retry_ms = backoff.as_millis() as u64,
                        "consent database unavailable");
                    None
                }
            },
        };
        if let Some(s) = session {
            backoff = sh.cfg.backoff_min;
            serve(&sh, s).await;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(sh.cfg.backoff_max);
    }
}

/// A running Postgres source. Dropping it stops the feed and closes the
/// connection.
pub(crate) struct PgSourceHandle {
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Drop for PgSourceHandle {
    fn drop(&mut self) {
        self.task.abort();
        // Idle writer connections close now, not when the last writer goes.
        lock(&self.shared.writers.idle).clear();
    }
}

impl PgSourceHandle {
    /// The writer the admin API writes through.
    pub(crate) fn writer(&self) -> Arc<dyn ConsentWriter> {
        Arc::new(PgWriter {
            shared: self.shared.clone(),
        })
    }

    /// Whether the feed is connected and synced.
    #[cfg(test)]
    pub(crate) fn connected(&self) -> bool {
        self.shared.connected.load(Ordering::Relaxed)
    }

    /// Every version up to this one is in the cache.
    #[cfg(test)]
    pub(crate) fn applied_version(&self) -> i64 {
        lock(&self.shared.apply).last
    }

    /// The last version applied (every version up to it is in the cache), read
    /// by someone who outlives no handle (the sync outbox's cursor, SPEC §13).
    pub(crate) fn applied_version_source(&self) -> Arc<dyn Fn() -> i64 + Send + Sync> {
        let shared = self.shared.clone();
        Arc::new(move || lock(&shared.apply).last)
    }

    /// Reconnections since start.
    #[cfg(test)]
    fn reconnects(&self) -> u64 {
        self.shared.reconnects.load(Ordering::Relaxed)
    }
}

/// Start the source: connect and load the whole table before returning, so
/// the proxy is ready with data. A configuration error or a missing table
/// refuses to start; an unreachable database does not: the source keeps
/// retrying in the background and the proxy stays not ready (stale) until it
/// has loaded. Must be called inside a tokio runtime.
pub(crate) async fn start(
    cfg: PgSourceConfig,
    store: Arc<ConsentStore>,
    observer: PropagationObserver,
) -> Result<PgSourceHandle, String> {
    let (pg, tls) = connect_config(&cfg)?;
    let writers = WriterPool::new(cfg.writer_connections);
    let shared = Arc::new(Shared {
        cfg,
        pg,
        tls,
        store,
        observer,
        apply: Mutex::new(ApplyState::default()),
        connected: AtomicBool::new(false),
        reconnects: AtomicU64::new(0),
        loaded: AtomicBool::new(false),
        writers,
    });
    let first = match connect_and_sync(&shared).await {
        Ok(s) => Some(s),
        Err(e) if e.is_missing_table() => return Err(e.to_string()),
        Err(e) => {
            tracing::warn!(error = %e,
                "consent database unavailable at start; retrying (not ready until loaded)");
            None
        }
    };
    let task = tokio::spawn(run(shared.clone(), first));
    Ok(PgSourceHandle { shared, task })
}

/// Admin-API writes. Each is one transaction on a connection of the writer
/// pool (not the feed's: a transaction needs a connection of its own): the
/// row is read `FOR UPDATE`, the precondition checked and the merge run on it,
/// the result written and committed; only then is it applied to the local
/// store. The row lock serialises writers to one patient across every
/// consentgate instance on the database, so none merges into a record another
/// is replacing. A patient with no row yet is inserted with `ON CONFLICT`
/// (last write wins), as a PUT without a precondition is the only write that
/// can create one.
struct PgWriter {
    shared: Arc<Shared>,
}

/// Idle writer connections and the bound on how many exist.
struct WriterPool {
    idle: Mutex<Vec<Client>>,
    slots: tokio::sync::Semaphore,
}

impl WriterPool {
    fn new(size: usize) -> WriterPool {
        WriterPool {
            idle: Mutex::new(Vec::new()),
            slots: tokio::sync::Semaphore::new(size.max(1)),
        }
    }
}

const SELECT_FOR_UPDATE_SQL: &str = "SELECT record, deleted, version FROM consentgate_consent \
    WHERE patient_id = $1 FOR UPDATE";

const INSERT_SQL: &str = "INSERT INTO consentgate_consent AS c \
    (patient_id, record, updated_at, restrictiveness, deleted) \
    VALUES ($1, $2, $3, $4, false) \
    ON CONFLICT (patient_id) DO UPDATE SET record = EXCLUDED.record, \
      updated_at = EXCLUDED.updated_at, restrictiveness = EXCLUDED.restrictiveness, \
      deleted = false \
    WHERE c.deleted OR EXCLUDED.updated_at > c.updated_at \
      OR (EXCLUDED.updated_at = c.updated_at AND EXCLUDED.restrictiveness >= c.restrictiveness) \
    RETURNING version, changed_at";

const UPDATE_SQL: &str = "UPDATE consentgate_consent SET record = $2, updated_at = $3, \
    restrictiveness = $4, deleted = false WHERE patient_id = $1 RETURNING version, changed_at";

const DELETE_SQL: &str = "UPDATE consentgate_consent SET deleted = true, \
    record = '{}'::jsonb, updated_at = clock_timestamp(), restrictiveness = 0 \
    WHERE patient_id = $1 RETURNING version, changed_at";

fn storage(e: PgError) -> WriteError {
    WriteError::Storage(format!("consent database: {e}"))
}

/// What a committed transaction did.
enum Committed {
    Put(Box<ConsentRecord>, i64, DateTime<Utc>),
    Deleted(i64, DateTime<Utc>),
    Absent,
}

impl PgWriter {
    /// An idle pooled connection, or a new one.
    async fn connection(&self) -> Result<Client, WriteError> {
        let sh = &self.shared;
        if let Some(c) = lock(&sh.writers.idle).pop().filter(|c| !c.is_closed()) {
            return Ok(c);
        }
        let q = sh.cfg.query_timeout;
        let (client, conn) = timed(q, sh.pg.connect(sh.tls.clone()))
            .await
            .map_err(storage)?;
        // The connection task ends when the client is dropped.
        tokio::spawn(async move { drop(conn.await) });
        // A writer that vanishes mid-transaction must not hold a row lock for
        // long, and a lock wait must not outlast the client's own timeout.
        let ms = q.as_millis().max(1);
        timed(
            q,
            client.batch_execute(&format!(
                "SET idle_in_transaction_session_timeout = {ms}; SET lock_timeout = {ms}"
            )),
        )
        .await
        .map_err(storage)?;
        Ok(client)
    }

    async fn modify_async(
        &self,
        patient_id: String,
        pre: Precondition,
        merge: Merge,
    ) -> Result<Written, WriteError> {
        let sh = &self.shared;
        let _slot = sh
            .writers
            .slots
            .acquire()
            .await
            .map_err(|_| WriteError::Storage("consent database writer closed".into()))?;
        let mut client = self.connection().await?;
        let result = self.transaction(&mut client, &patient_id, pre, merge).await;
        // A connection that failed mid-transaction is dropped (the server rolls
        // back); one that answered, whatever the answer, is reused.
        if !matches!(result, Err(WriteError::Storage(_))) && !client.is_closed() {
            lock(&sh.writers.idle).push(client);
        }
        let (version, changed_at, out) = match result? {
            Committed::Absent => return Ok(Written::Absent),
            Committed::Put(mut stored, version, changed_at) => {
                stored.version = u64::try_from(version).unwrap_or(0);
                let mut st = lock(&sh.apply);
                let out = if st.last >= version {
                    // The feed already applied this version (or a later one).
                    Arc::new(*stored)
                } else {
                    st.ahead.insert(patient_id.clone(), version);
                    sh.store.put_arc(*stored)
                };
                (version, changed_at, Written::Stored(out))
            }
            Committed::Deleted(version, changed_at) => {
                let mut st = lock(&sh.apply);
                if st.last < version {
                    st.ahead.insert(patient_id.clone(), version);
                    sh.store.delete(&patient_id);
                }
                (version, changed_at, Written::Deleted)
            }
        };
        tracing::debug!(version, "consent write committed");
        (sh.observer)(seconds_since(changed_at));
        Ok(out)
    }

    /// Read-check-merge-write-commit. A `Storage` error leaves the connection
    /// unusable; any other error has rolled back.
    async fn transaction(
        &self,
        client: &mut Client,
        patient_id: &str,
        pre: Precondition,
        merge: Merge,
    ) -> Result<Committed, WriteError> {
        let q = self.shared.cfg.query_timeout;
        let tx = timed(q, client.transaction()).await.map_err(storage)?;
        let row = timed(q, tx.query_opt(SELECT_FOR_UPDATE_SQL, &[&patient_id]))
            .await
            .map_err(storage)?;
        let (current, exists) = match &row {
            None => (None, false),
            Some(r) => {
                let deleted: bool = r.try_get(1).map_err(|e| storage(e.into()))?;
                let version: i64 = r.try_get(2).map_err(|e| storage(e.into()))?;
                if deleted {
                    (None, true)
                } else {
                    let json: serde_json::Value = r.try_get(0).map_err(|e| storage(e.into()))?;
                    let mut rec = ConsentRecord::from_value(&json, None).map_err(|e| {
                        WriteError::Storage(format!(
                            "consent database: the stored record is invalid ({})",
                            e.field
                        ))
                    })?;
                    rec.patient_id = patient_id.to_string();
                    rec.version = u64::try_from(version).unwrap_or(0);
                    (Some(rec), true)
                }
            }
        };
        let decided = pre
            .check(current.as_ref())
            .and_then(|()| merge(current.as_ref()));
        let change = match decided {
            Ok(c) => c,
            Err(e) => {
                timed(q, tx.rollback()).await.map_err(storage)?;
                return Err(e);
            }
        };
        let done = match change {
            Change::Put(rec) => {
                let stored = match prepare_put(rec, patient_id, current.as_ref(), 0) {
                    Ok(s) => s,
                    Err(e) => {
                        timed(q, tx.rollback()).await.map_err(storage)?;
                        return Err(e);
                    }
                };
                let mut json = serde_json::to_value(&stored)
                    .map_err(|e| WriteError::Storage(format!("encode record: {e}")))?;
                // The column is the version; the JSON never carries a copy.
                if let Some(m) = json.as_object_mut() {
                    m.remove("version");
                }
                let restrictiveness = i32::try_from(stored.restrictiveness()).unwrap_or(i32::MAX);
                let sql = if exists { UPDATE_SQL } else { INSERT_SQL };
                let params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] = [
                    &stored.patient_id,
                    &json,
                    &stored.updated_at,
                    &restrictiveness,
                ];
                let rows = timed(q, tx.query(sql, &params)).await.map_err(storage)?;
                let Some(row) = rows.first() else {
                    // Inserted meanwhile by another writer, with a newer record.
                    timed(q, tx.rollback()).await.map_err(storage)?;
                    return Err(WriteError::Superseded);
                };
                let version: i64 = row.try_get(0).map_err(|e| storage(e.into()))?;
                let changed_at: DateTime<Utc> = row.try_get(1).map_err(|e| storage(e.into()))?;
                Committed::Put(Box::new(stored), version, changed_at)
            }
            Change::Delete => {
                if current.is_none() {
                    timed(q, tx.rollback()).await.map_err(storage)?;
                    return Ok(Committed::Absent);
                }
                let row = timed(q, tx.query_one(DELETE_SQL, &[&patient_id]))
                    .await
                    .map_err(storage)?;
                let version: i64 = row.try_get(0).map_err(|e| storage(e.into()))?;
                let changed_at: DateTime<Utc> = row.try_get(1).map_err(|e| storage(e.into()))?;
                Committed::Deleted(version, changed_at)
            }
        };
        timed(q, tx.commit()).await.map_err(storage)?;
        Ok(done)
    }
}

impl ConsentWriter for PgWriter {
    fn modify(
        &self,
        patient_id: &str,
        pre: Precondition,
        merge: Merge,
        _actor: &str,
    ) -> BoxFuture<'_, Result<Written, WriteError>> {
        let id = patient_id.trim().to_string();
        Box::pin(self.modify_async(id, pre, merge))
    }
}

/// `consentgate db migrate`: apply every shipped migration not yet recorded
/// in `consentgate_schema_migrations`, each in its own transaction, under an
/// advisory lock (concurrent runs wait). Returns the names applied now.
pub(crate) async fn migrate(cfg: &PgSourceConfig) -> Result<Vec<&'static str>, String> {
    let (pg, tls) = connect_config(cfg)?;
    let (mut client, conn) = pg
        .connect(tls)
        .await
        .map_err(|e| format!("connect: {}", describe(&e)))?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let result = async {
        let mut applied = Vec::new();
        for (name, sql) in MIGRATIONS {
            let tx = client.transaction().await?;
            tx.batch_execute(
                "SELECT pg_advisory_xact_lock(hashtext('consentgate_schema_migrations')::bigint);\
                 CREATE TABLE IF NOT EXISTS consentgate_schema_migrations (\
                   version text PRIMARY KEY, \
                   applied_at timestamptz NOT NULL DEFAULT now())",
            )
            .await?;
            let done = tx
                .query_opt(
                    "SELECT 1 FROM consentgate_schema_migrations WHERE version = $1",
                    &[name],
                )
                .await?
                .is_some();
            if !done {
                tx.batch_execute(sql).await?;
                tx.execute(
                    "INSERT INTO consentgate_schema_migrations (version) VALUES ($1)",
                    &[name],
                )
                .await?;
                applied.push(*name);
            }
            tx.commit().await?;
        }
        Ok::<_, tokio_postgres::Error>(applied)
    }
    .await
    .map_err(|e| format!("migrate: {}", describe(&e)));
    drop(client);
    let _ = driver.await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identify::Identifiers;
    use tokio_postgres::NoTls;

    #[test]
    fn url_checks() {
        assert!(check_url("postgres://u@127.0.0.1:5432/db").is_ok());
        assert!(check_url("postgres://u@127.0.0.1/db?sslmode=disable").is_ok());
        let e = check_url("postgres://u:secret@127.0.0.1/db").unwrap_err();
        assert!(e.contains(PASSWORD_ENV) && !e.contains("secret"), "{e}");
        assert!(check_url("postgres://u@127.0.0.1/db?sslmode=require").is_ok());
        assert!(
            check_url("postgres://u@127.0.0.1/db?sslmode=verify-full&sslrootcert=ca.pem").is_ok()
        );
        let e = check_url("postgres://u@127.0.0.1/db?sslmode=prefer").unwrap_err();
        assert!(e.contains("verify-full"), "{e}");
        assert!(check_url("postgres://u@127.0.0.1/db?sslmode=bogus").is_err());
    }

    #[test]
    fn tls_params_come_from_the_keys_or_the_url() {
        let (rest, m, r) = split_tls_params(
            "postgres://u@h/db?application_name=x&sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem",
        );
        assert_eq!(rest, "postgres://u@h/db?application_name=x");
        assert_eq!(m.as_deref(), Some("verify-full"));
        assert_eq!(r.as_deref(), Some("/etc/ca.pem"));
        let (rest, m, _) = split_tls_params("host=h user=u sslmode=require");
        assert_eq!(
            (rest.as_str(), m.as_deref()),
            ("host=h user=u", Some("require"))
        );
        let url = "postgres://u@h/db?sslmode=verify-full&sslrootcert=/ca.pem";
        assert_eq!(
            resolve_tls(url, None, None).unwrap(),
            (PgSslMode::VerifyFull, Some(PathBuf::from("/ca.pem")))
        );
        assert_eq!(
            resolve_tls("postgres://u@h/db", None, None).unwrap(),
            (PgSslMode::Disable, None)
        );
        assert!(resolve_tls(url, Some(PgSslMode::Require), None)
            .unwrap_err()
            .contains("keep one"));
        assert!(resolve_tls(
            "postgres://u@h/db",
            Some(PgSslMode::Require),
            Some(Path::new("/ca"))
        )
        .unwrap_err()
        .contains("verify-full"));
        let mut c = pgcfg(url);
        c.ca_file = Some("/nonexistent/ca.pem".into());
        let e = connect_config(&c).unwrap_err();
        assert!(e.contains("consent.postgres.ca_file"), "{e}");
    }

    fn pgcfg(url: &str) -> PgSourceConfig {
        PgSourceConfig::new(&PostgresCfg {
            url: url.into(),
            line: 0,
            password_file: None,
            sslmode: None,
            ca_file: None,
        })
    }

    #[test]
    fn password_file_and_application_name() {
        let d = tempfile::tempdir().unwrap();
        let pw = d.path().join("pw");
        std::fs::write(&pw, "s3cret\n").unwrap();
        let with_pw = |url: &str, pw: &Path| {
            let mut c = pgcfg(url);
            c.password_file = Some(pw.to_path_buf());
            connect_config(&c)
        };
        let (c, tls) = with_pw("postgres://u@127.0.0.1/db", &pw).unwrap();
        assert_eq!(c.get_password(), Some(&b"s3cret"[..]));
        assert_eq!(c.get_application_name(), Some("consentgate"));
        assert_eq!(c.get_ssl_mode(), SslMode::Disable);
        assert!(!tls.enabled());
        let (c, _) = with_pw("postgres://u@127.0.0.1/db?application_name=x", &pw).unwrap();
        assert_eq!(c.get_application_name(), Some("x"));
        let (c, tls) = with_pw("postgres://u@127.0.0.1/db?sslmode=require", &pw).unwrap();
        assert_eq!(c.get_ssl_mode(), SslMode::Require);
        assert!(tls.enabled());
        assert!(with_pw("postgres://u@127.0.0.1/db", &d.path().join("no")).is_err());
    }

    /// A schema of its own in database `test`, dropped at the end.
    struct Schema {
        name: String,
    }

    impl Schema {
        async fn new(tag: &str) -> Schema {
            let name = format!("cgu_{tag}_{}_{}", std::process::id(), rand::random::<u32>());
            admin_exec(&format!("CREATE SCHEMA {name}")).await;
            let s = Schema { name };
            migrate(&pgcfg(&s.url("u"))).await.unwrap();
            s
        }
        fn url(&self, app: &str) -> String {
            format!(
                "postgres://postgres@127.0.0.1:5432/test?application_name={app}&options=-c%20search_path%3D{}",
                self.name
            )
        }
        async fn client(&self) -> Client {
            let (c, conn) = tokio_postgres::connect(&self.url("t"), NoTls)
                .await
                .unwrap();
            tokio::spawn(conn);
            c
        }
        async fn drop_it(self) {
            admin_exec(&format!("DROP SCHEMA {} CASCADE", self.name)).await;
        }
    }

    async fn admin_exec(sql: &str) {
        let (c, conn) = tokio_postgres::connect("postgres://postgres@127.0.0.1:5432/test", NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        c.batch_execute(sql).await.unwrap();
    }

    fn cfg(s: &Schema, app: &str) -> PgSourceConfig {
        PgSourceConfig {
            batch: 1000,
            tick: Duration::from_millis(200),
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_millis(400),
            query_timeout: Duration::from_secs(5),
            ..pgcfg(&s.url(app))
        }
    }

    fn rec(id: &str, ts: &str, extra: &str) -> ConsentRecord {
        ConsentRecord::from_json(
            format!(r#"{{"patient_id":"{id}","updated_at":"{ts}"{extra}}}"#).as_bytes(),
        )
        .unwrap()
    }

    async fn wait_for(what: &str, f: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(std::time::Instant::now() < deadline, "timed out: {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn migrate_is_idempotent() {
        let s = Schema::new("mig").await;
        assert!(migrate(&pgcfg(&s.url("u"))).await.unwrap().is_empty());
        s.drop_it().await;
    }

    #[tokio::test]
    async fn load_in_batches_feed_writer_and_tombstones() {
        let s = Schema::new("feed").await;
        let c = s.client().await;
        // 2,500 rows: three portal fetches of 1,000.
        c.batch_execute(
            "INSERT INTO consentgate_consent (patient_id, record, updated_at) \
             SELECT 'P-' || i, jsonb_build_object('patient_id', 'P-' || i, \
               'updated_at', '2026-01-01T00:00:00Z', \
               'identifiers', jsonb_build_object('external_ids', jsonb_build_array('crm:' || i))), \
               '2026-01-01T00:00:00Z' FROM generate_series(1, 2500) i",
        )
        .await
        .unwrap();
        let store = Arc::new(ConsentStore::new());
        let seen = Arc::new(AtomicU64::new(0));
        let seen2 = seen.clone();
        let h = start(
            cfg(&s, "cgu_feed"),
            store.clone(),
            Arc::new(move |_| {
                seen2.fetch_add(1, Ordering::Relaxed);
            }),
        )
        .await
        .unwrap();
        assert_eq!(store.len(), 2500);
        assert!(store.source_up() && !store.is_stale(Duration::from_secs(5)));
        let mut ids = Identifiers::new();
        ids.add_external("crm:2500");
        assert_eq!(store.lookup(&ids).len(), 1);
        assert_eq!(seen.load(Ordering::Relaxed), 0, "initial load not observed");

        // A change from another client arrives through NOTIFY.
        c.batch_execute(
            "UPDATE consentgate_consent SET record = record || '{\"gpc\":true}' WHERE patient_id = 'P-7'",
        )
        .await
        .unwrap();
        wait_for("update", || store.get("P-7").is_some_and(|r| r.gpc)).await;
        assert!(seen.load(Ordering::Relaxed) >= 1);
        // A plain SQL DELETE becomes a tombstone and propagates.
        c.batch_execute("DELETE FROM consentgate_consent WHERE patient_id = 'P-8'")
            .await
            .unwrap();
        wait_for("delete", || store.get("P-8").is_none()).await;

        // The writer: committed, applied locally before it answers.
        let w = h.writer();
        let stored = w
            .put(
                rec(
                    "P-9",
                    "2026-02-01T00:00:00Z",
                    r#","identifiers":{"emails":["a@example.com"]}"#,
                ),
                "t",
            )
            .await
            .unwrap();
        assert!(stored.is_stored_form());
        assert_eq!(store.get("P-9").unwrap().updated_at, stored.updated_at);
        let db: serde_json::Value = c
            .query_one(
                "SELECT record FROM consentgate_consent WHERE patient_id = 'P-9'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert!(!db.to_string().contains("a@example.com"));
        // Last write wins by updated_at; a tie goes to the more restrictive.
        assert_eq!(
            w.put(rec("P-9", "2026-01-15T00:00:00Z", ""), "t")
                .await
                .unwrap_err(),
            WriteError::Superseded
        );
        w.put(rec("P-9", "2026-02-01T00:00:00Z", r#","gpc":true"#), "t")
            .await
            .unwrap();
        assert_eq!(
            w.put(rec("P-9", "2026-02-01T00:00:00Z", ""), "t")
                .await
                .unwrap_err(),
            WriteError::Superseded
        );
        assert!(store.get("P-9").unwrap().gpc);
        assert!(w.delete("P-9", "t").await.unwrap());
        assert!(store.get("P-9").is_none());
        assert!(!w.delete("P-9", "t").await.unwrap());
        // After a delete, a put is accepted again.
        w.put(rec("P-9", "2026-01-01T00:00:00Z", ""), "t")
            .await
            .unwrap();
        let v: i64 = c
            .query_one("SELECT max(version) FROM consentgate_consent", &[])
            .await
            .unwrap()
            .get(0);
        wait_for("feed caught up", || h.applied_version() >= v).await;
        assert_eq!(store.len(), 2499);

        // Connection killed: marked down, reconnects, resyncs what it missed.
        let app = "cgu_feed";
        let (c2, conn2) = tokio_postgres::connect("postgres://postgres@127.0.0.1:5432/test", NoTls)
            .await
            .unwrap();
        tokio::spawn(conn2);
        c2.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
            &[&app],
        )
        .await
        .unwrap();
        c.batch_execute(
            "UPDATE consentgate_consent SET record = record || '{\"limit_sensitive\":true}' WHERE patient_id = 'P-10'",
        )
        .await
        .unwrap();
        wait_for("resync", || {
            store.get("P-10").is_some_and(|r| r.limit_sensitive)
        })
        .await;
        wait_for("reconnected", || h.reconnects() >= 1 && h.connected()).await;
        drop(h);
        s.drop_it().await;
    }

    #[tokio::test]
    async fn missing_table_refuses_to_start() {
        let name = format!("cgu_empty_{}_{}", std::process::id(), rand::random::<u32>());
        admin_exec(&format!("CREATE SCHEMA {name}")).await;
        let mut c = PgSourceConfig::new(&PostgresCfg {
            url: format!(
                "postgres://postgres@127.0.0.1:5432/test?options=-c%20search_path%3D{name}"
            ),
            line: 0,
            password_file: None,
            sslmode: None,
            ca_file: None,
        });
        c.query_timeout = Duration::from_secs(5);
        let e = start(c, Arc::new(ConsentStore::new()), Arc::new(|_| {}))
            .await
            .err()
            .unwrap();
        assert!(e.contains("db migrate"), "{e}");
        admin_exec(&format!("DROP SCHEMA {name} CASCADE")).await;
    }

    #[tokio::test]
    async fn unreachable_database_retries_and_stays_stale() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut c = PgSourceConfig::new(&PostgresCfg {
            url: format!("postgres://postgres@127.0.0.1:{port}/test"),
            line: 0,
            password_file: None,
            sslmode: None,
            ca_file: None,
        });
        c.backoff_max = Duration::from_millis(200);
        let store = Arc::new(ConsentStore::new());
        let h = start(c, store.clone(), Arc::new(|_| {})).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!h.connected());
        assert!(store.is_stale(Duration::from_secs(300)));
        assert!(!store.source_up());
    }
}
