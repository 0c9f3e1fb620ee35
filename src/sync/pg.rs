//! The PostgreSQL outbox (`consent.source: postgres`): the tables of
//! `migrations/0002_sync_outbox.sql`, shared by every instance on the database.
//!
//! - Queue: one transaction per offer: the ledger upsert changes the stamp (or
//!   the row is new) → the entries are inserted; otherwise another instance (or
//!   an earlier run) queued it already and nothing is inserted.
//! - Deliver: a worker per target takes the next due row `FOR UPDATE SKIP
//!   LOCKED` inside a transaction, calls the vendor, then deletes the row
//!   (delivered) or updates it (attempts, next attempt, parked, why) and commits:
//!   each row is in one instance's hands at a time; if that instance dies the
//!   lock goes with its connection and the row is tried again by someone.
//! - Cursor: per target, the consent version below which every change has been
//!   offered; a starting instance skips those when it loads the consent table.
//!
//! Errors carry SQLSTATE codes only (`consent::postgres::describe`), never row data.

use crate::consent::postgres::{connect_config, describe};
use crate::consent::PgSourceConfig;
use std::collections::HashMap;
use std::time::Duration;
use tokio_postgres::Client;

/// A connected client and the task driving its connection.
pub(crate) struct Conn {
    pub(crate) client: Client,
    driver: tokio::task::JoinHandle<()>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

impl Conn {
    pub(super) fn is_closed(&self) -> bool {
        self.client.is_closed()
    }
}

const QUERY_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) async fn connect(cfg: &PgSourceConfig) -> Result<Conn, String> {
    let (pg, tls) = connect_config(cfg)?;
    let (client, conn) = tokio::time::timeout(QUERY_TIMEOUT, pg.connect(tls))
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| describe(&e))?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(Conn { client, driver })
}

fn db(e: tokio_postgres::Error) -> String {
    let d = describe(&e);
    if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) {
        format!("{d}: the sync outbox tables are missing; run `consentgate db migrate`")
    } else {
        d
    }
}

async fn timed<T>(
    f: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, String> {
    tokio::time::timeout(QUERY_TIMEOUT, f)
        .await
        .map_err(|_| "query timed out".to_string())?
        .map_err(db)
}

/// The cursor of every target (absent: 0, so a new target is offered every
/// current denial once).
pub(crate) async fn cursors(c: &Conn) -> Result<HashMap<String, i64>, String> {
    let rows = timed(
        c.client
            .query("SELECT target, version FROM consentgate_sync_cursor", &[]),
    )
    .await?;
    let mut out = HashMap::new();
    for r in rows {
        let (t, v): (String, i64) = (r.try_get(0).map_err(db)?, r.try_get(1).map_err(db)?);
        out.insert(t, v);
    }
    Ok(out)
}

/// Advance the cursor of `targets` to `version`.
pub(crate) async fn advance(c: &Conn, targets: &[String], version: i64) -> Result<(), String> {
    timed(c.client.execute(
        "INSERT INTO consentgate_sync_cursor (target, version) SELECT t, $2 FROM unnest($1::text[]) t \
         ON CONFLICT (target) DO UPDATE SET version = greatest(consentgate_sync_cursor.version, EXCLUDED.version)",
        &[&targets, &version],
    ))
    .await
    .map(|_| ())
}

/// One new entry.
pub(crate) struct NewRow {
    pub(crate) patient: String,
    pub(crate) sealed: serde_json::Value,
}

/// Queue an offer: `Ok(true)` when this instance's ledger upsert won and the
/// rows were inserted (or there were none: no address), `Ok(false)` when the
/// same stamp was queued before. An offer with rows also wins over a row of
/// the same stamp recorded without any (another instance saw the change on its
/// feed, without the plaintext address the writing instance holds).
pub(crate) async fn offer(
    c: &mut Conn,
    target: &str,
    key: &str,
    stamp: &str,
    rows: &[NewRow],
) -> Result<bool, String> {
    let tx = timed(c.client.transaction()).await?;
    let queued = !rows.is_empty();
    let won = timed(tx.query_opt(
        "INSERT INTO consentgate_sync_ledger (key, stamp, queued) VALUES ($1, $2, $3) \
         ON CONFLICT (key) DO UPDATE SET stamp = EXCLUDED.stamp, queued = EXCLUDED.queued, \
           updated_at = now() \
         WHERE consentgate_sync_ledger.stamp IS DISTINCT FROM EXCLUDED.stamp \
            OR (NOT consentgate_sync_ledger.queued AND EXCLUDED.queued) RETURNING 1",
        &[&key, &stamp, &queued],
    ))
    .await?
    .is_some();
    if won {
        for r in rows {
            timed(tx.execute(
                "INSERT INTO consentgate_sync_outbox (target, patient, sealed) VALUES ($1, $2, $3)",
                &[&target, &r.patient, &r.sealed],
            ))
            .await?;
        }
    }
    timed(tx.commit()).await?;
    Ok(won)
}

/// A row taken for delivery.
pub(crate) struct Taken {
    pub(crate) id: i64,
    pub(crate) patient: String,
    pub(crate) created_ms: i64,
    pub(crate) attempts: u32,
    pub(crate) parked: bool,
    pub(crate) sealed: serde_json::Value,
}

/// Take the next due row of `target`, call `deliver` with it while holding its
/// row lock, and write what `deliver` decided: `None` → delete (delivered),
/// `Some(update)` → update. `Ok(false)` when nothing was due.
pub(crate) async fn take_one<F, Fut>(c: &mut Conn, target: &str, deliver: F) -> Result<bool, String>
where
    F: FnOnce(Taken) -> Fut,
    Fut: std::future::Future<Output = Option<Update>>,
{
    let tx = timed(c.client.transaction()).await?;
    let row = timed(tx.query_opt(
        "SELECT id, patient, (extract(epoch from created_at) * 1000)::bigint, attempts, parked, sealed \
         FROM consentgate_sync_outbox WHERE target = $1 AND next_attempt_at <= now() \
         ORDER BY next_attempt_at, id LIMIT 1 FOR UPDATE SKIP LOCKED",
        &[&target],
    ))
    .await?;
    let Some(row) = row else {
        timed(tx.commit()).await?;
        return Ok(false);
    };
    let taken = Taken {
        id: row.try_get(0).map_err(db)?,
        patient: row.try_get(1).map_err(db)?,
        created_ms: row.try_get(2).map_err(db)?,
        attempts: u32::try_from(row.try_get::<_, i32>(3).map_err(db)?).unwrap_or(0),
        parked: row.try_get(4).map_err(db)?,
        sealed: row.try_get(5).map_err(db)?,
    };
    let id = taken.id;
    match deliver(taken).await {
        None => {
            timed(tx.execute("DELETE FROM consentgate_sync_outbox WHERE id = $1", &[&id])).await?;
        }
        Some(u) => {
            let attempts = i32::try_from(u.attempts).unwrap_or(i32::MAX);
            timed(tx.execute(
                "UPDATE consentgate_sync_outbox SET attempts = $2, \
                 next_attempt_at = now() + make_interval(secs => $3), parked = $4, last_error = $5 \
                 WHERE id = $1",
                &[&id, &attempts, &u.delay.as_secs_f64(), &u.parked, &u.error],
            ))
            .await?;
        }
    }
    timed(tx.commit()).await?;
    Ok(true)
}

/// An attempt that did not deliver.
pub(crate) struct Update {
    pub(crate) attempts: u32,
    pub(crate) delay: Duration,
    pub(crate) parked: bool,
    pub(crate) error: Option<String>,
}

/// Per target: (pending incl. parked, parked, age in seconds of the oldest,
/// seconds until the next attempt, the last error of the oldest entry).
pub(crate) struct Summary {
    pub(crate) target: String,
    pub(crate) pending: i64,
    pub(crate) parked: i64,
    pub(crate) oldest_age: f64,
    pub(crate) next_in: f64,
    pub(crate) last_error: Option<String>,
}

pub(crate) async fn summary(c: &Conn) -> Result<Vec<Summary>, String> {
    let rows = timed(c.client.query(
        "SELECT target, count(*), count(*) FILTER (WHERE parked), \
           extract(epoch from now() - min(created_at))::float8, \
           greatest(0, extract(epoch from min(next_attempt_at) - now()))::float8, \
           (array_agg(last_error ORDER BY created_at, id))[1] \
         FROM consentgate_sync_outbox GROUP BY target ORDER BY target",
        &[],
    ))
    .await?;
    let mut out = Vec::new();
    for r in rows {
        out.push(Summary {
            target: r.try_get(0).map_err(db)?,
            pending: r.try_get(1).map_err(db)?,
            parked: r.try_get(2).map_err(db)?,
            oldest_age: r.try_get(3).map_err(db)?,
            next_in: r.try_get(4).map_err(db)?,
            last_error: r.try_get(5).map_err(db)?,
        });
    }
    Ok(out)
}
