//! The SQL [`Store`]: one implementation for SQLite and Postgres on `sqlx::AnyPool`.
//!
//! Both databases run the same SQL text (`$N` placeholders and `INSERT .. ON CONFLICT` work on
//! both), except for the placeholders of multi-row `VALUES` lists (see `values_list`) and the
//! usual spend-log write, which on Postgres goes through `COPY` on a small native pool beside
//! the `Any` one (see `PG_COPY_LOGS`).
//! What else differs is confined to [`Backend`]: the migration files, how a write transaction
//! begins (`BEGIN IMMEDIATE` on SQLite, so that a transaction never has to upgrade a read lock
//! and fail with `SQLITE_BUSY`), and the Postgres advisory locks that serialise migrations and
//! change-log writes across processes.
//!
//! Schema (see `proxy/migrations/{sqlite,postgres}`): `sluice_entities(kind, id, spend, doc,
//! updated_at)` keeps every tenancy record as JSON text beside its spend; `sluice_changes(seq,
//! kind, id, at)` gets a row in the same transaction as every document write, never for spend
//! increments; `sluice_spend_logs` has one column per [`SpendRow`] field. Times are BIGINT
//! microseconds since the Unix epoch.

use std::borrow::Cow;
use std::collections::HashSet;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::Value;
use sluice_filters::tenancy::{
    total_increments, Entity, Kind, SpendQuery, SpendRow, Store, StoreError,
};
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{Any, AnyPool, ConnectOptions as _, Executor, Row, Transaction};

use super::distinct_changes;

/// Which database an [`SqlStore`] talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A migration embedded in the binary: `proxy/migrations/<backend>/NNNN_name.sql`.
struct Migration {
    version: i64,
    name: &'static str,
    sql: &'static str,
}

/// Applied in order; a version is never edited once released, only followed by a new one.
const SQLITE_MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "tenancy",
        sql: include_str!("../../migrations/sqlite/0001_tenancy.sql"),
    },
    Migration {
        version: 2,
        name: "spend_log_partial_indexes",
        sql: include_str!("../../migrations/sqlite/0002_spend_log_partial_indexes.sql"),
    },
];

const POSTGRES_MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "tenancy",
        sql: include_str!("../../migrations/postgres/0001_tenancy.sql"),
    },
    Migration {
        version: 2,
        name: "spend_log_partial_indexes",
        sql: include_str!("../../migrations/postgres/0002_spend_log_partial_indexes.sql"),
    },
];

/// `pg_advisory_xact_lock` keys ("sluice" in ASCII, then a discriminator).
const MIGRATION_LOCK: i64 = 0x736c_7569_6365_0001;
const CHANGES_LOCK: i64 = 0x736c_7569_6365_0002;

/// Set on every SQLite file connection: wait up to 5 s for a lock held by another connection
/// or process; in WAL mode, fsync at checkpoints rather than at every commit (a power loss
/// may lose the last commits, never corrupt the file).
///
/// A new file gets 32 KiB pages (the page size only takes effect before the file's first
/// write; an existing file keeps its own). The spend log is append-heavy: with 4 KiB pages
/// each row cost 2.8 µs of the writer's CPU in `spend_write_bench`, with 32 KiB 1.9 µs (fewer
/// page splits, WAL frames and write calls). The checkpoint then runs every 500 pages, so the
/// WAL grows to about 16 MiB between checkpoints, as it would with 16 KiB pages.
const SQLITE_PRAGMAS: &str = "PRAGMA busy_timeout = 5000; PRAGMA synchronous = NORMAL; \
                              PRAGMA page_size = 32768; PRAGMA wal_autocheckpoint = 500;";

/// Spend rows per INSERT statement: 21 parameters each, under SQLite's 32,766 and Postgres's
/// 65,535 bound parameters. Batches are cut into power-of-two chunks so that each connection
/// caches at most a dozen distinct prepared statements, whatever the batch sizes.
const MAX_ROWS_PER_INSERT: usize = 512;

/// The spend log's columns, in [`SpendRow`]'s order (a macro, so that `concat!` can build
/// statements from it).
macro_rules! log_columns {
    () => {
        "request_id, call_type, api_key, spend, prompt_tokens, completion_tokens, total_tokens, \
         start_time, end_time, completion_start_time, model, model_id, model_group, \
         custom_llm_provider, api_base, user_id, team_id, end_user, status, status_code, \
         request_tags"
    };
}
const LOG_COLUMNS: &str = log_columns!();
const LOG_COLUMN_COUNT: usize = 21;
const _: () = assert!(MAX_ROWS_PER_INSERT * LOG_COLUMN_COUNT <= 32_766);

mod sqlite_rows;

/// Postgres takes spend rows through `COPY ... FROM STDIN`: the server parses plain
/// tab-separated lines and inserts them in multi-row heap batches. In `spend_write_bench` its
/// CPU per row was about 16 µs with a 512-row `VALUES` list and about 13 µs with one array
/// per column unnested; `COPY` halves that again. COPY has no `ON CONFLICT`: a request id
/// already stored fails it with a unique violation, and the batch is redone the careful way.
const PG_COPY_LOGS: &str = concat!("COPY sluice_spend_logs (", log_columns!(), ") FROM STDIN");

/// Spend rows per `COPY` data message: bounds the buffer built before each send.
const PG_ROWS_PER_COPY_CHUNK: usize = 1024;

#[derive(Debug)]
pub struct SqlStore {
    pool: AnyPool,
    backend: Backend,
    /// A small native pool beside the `Any` one, for what `Any` cannot do (`COPY`).
    pg: Option<sqlx::PgPool>,
    /// For a SQLite file, one native connection beside the `Any` pool, whose raw handle the
    /// spend rows are written through (SQLite has one writer at a time anyway).
    sqlite: Option<sqlx::SqlitePool>,
}

impl SqlStore {
    /// Connects to a `sqlite:` or `postgres(ql)://` URL and applies pending migrations.
    ///
    /// A SQLite file URL without a `mode=` parameter gets `mode=rwc` (create when missing) and
    /// is switched to WAL. `sqlite::memory:` (or `mode=memory`) is held on one connection,
    /// never recycled, since every SQLite connection to `:memory:` is a database of its own.
    pub async fn connect(
        url: &str,
        pool_limit: u32,
        connect_timeout: Duration,
    ) -> anyhow::Result<SqlStore> {
        sqlx::any::install_default_drivers();
        let target = Target::parse(url)?;
        let mut options = AnyPoolOptions::new()
            .max_connections(pool_limit.max(1))
            .acquire_timeout(connect_timeout);
        match target {
            Target::SqliteMemory(_) => {
                options = options
                    .max_connections(1)
                    .min_connections(1)
                    .idle_timeout(None)
                    .max_lifetime(None);
            }
            Target::SqliteFile(_) => {
                options = options.after_connect(|conn, _| {
                    Box::pin(async move {
                        conn.execute(SQLITE_PRAGMAS).await?;
                        Ok(())
                    })
                });
            }
            Target::Postgres(_) => {}
        }
        // Statements are logged at debug only: a slow batch insert would otherwise put the
        // whole statement into the logs at WARN.
        let connect_options = target
            .url()
            .parse::<sqlx::any::AnyConnectOptions>()?
            .log_statements(log::LevelFilter::Debug)
            .log_slow_statements(log::LevelFilter::Debug, Duration::from_secs(1));
        let pool = tokio::time::timeout(connect_timeout, options.connect_with(connect_options))
            .await
            .map_err(|_| anyhow!("no connection within {connect_timeout:?}"))??;
        let pg = match &target {
            Target::Postgres(url) => Some(
                sqlx::postgres::PgPoolOptions::new()
                    .max_connections(2)
                    .acquire_timeout(connect_timeout)
                    .connect_lazy_with(
                        url.parse::<sqlx::postgres::PgConnectOptions>()?
                            .log_statements(log::LevelFilter::Debug)
                            .log_slow_statements(log::LevelFilter::Debug, Duration::from_secs(1)),
                    ),
            ),
            _ => None,
        };
        let sqlite = match &target {
            Target::SqliteFile(url) => Some(
                sqlx::sqlite::SqlitePoolOptions::new()
                    .max_connections(1)
                    .acquire_timeout(connect_timeout)
                    .after_connect(|conn, _| {
                        Box::pin(async move {
                            conn.execute(SQLITE_PRAGMAS).await?;
                            Ok(())
                        })
                    })
                    .connect_lazy_with(
                        url.parse::<sqlx::sqlite::SqliteConnectOptions>()?
                            .log_statements(log::LevelFilter::Debug)
                            .log_slow_statements(log::LevelFilter::Debug, Duration::from_secs(1)),
                    ),
            ),
            _ => None,
        };
        let store = SqlStore {
            pool,
            backend: target.backend(),
            pg,
            sqlite,
        };
        if matches!(target, Target::SqliteFile(_)) {
            store.enable_wal().await.context("switching to WAL")?;
        }
        store.migrate().await.context("applying migrations")?;
        Ok(store)
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The pool, for callers that need more than the [`Store`] trait (reports, health).
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// WAL lets readers run beside the writer. The mode is stored in the file, so this only
    /// does work the first time; switching needs an exclusive lock that the busy timeout does
    /// not wait for, so a second process opening a new file at the same moment is retried.
    async fn enable_wal(&self) -> anyhow::Result<()> {
        let mut attempt = 0;
        loop {
            match sqlx::query("PRAGMA journal_mode = WAL")
                .fetch_one(&self.pool)
                .await
            {
                Ok(row) => {
                    let mode: String = row.try_get(0)?;
                    if !mode.eq_ignore_ascii_case("wal") {
                        tracing::warn!(mode, "SQLite did not switch to WAL; writers block readers");
                    }
                    return Ok(());
                }
                Err(e) if is_sqlite_busy(&e) && attempt < 100 => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Applies the embedded migrations not yet recorded in `sluice_migrations`, in order, in
    /// one transaction. On Postgres the transaction first takes an advisory lock, so instances
    /// starting together migrate one after the other and the later ones find nothing to do; on
    /// SQLite `BEGIN IMMEDIATE` does the same.
    async fn migrate(&self) -> anyhow::Result<()> {
        let migrations = match self.backend {
            Backend::Sqlite => SQLITE_MIGRATIONS,
            Backend::Postgres => POSTGRES_MIGRATIONS,
        };
        let mut tx = self.begin_write().await?;
        if self.backend == Backend::Postgres {
            sqlx::query("SELECT pg_advisory_xact_lock($1)")
                .bind(MIGRATION_LOCK)
                .execute(&mut *tx)
                .await?;
        }
        // `Executor::execute` with bare text rather than `sqlx::raw_sql`: the latter's future
        // is not provably `Send` here, which would make `open` unusable in `tokio::spawn`.
        tx.execute(
            "CREATE TABLE IF NOT EXISTS sluice_migrations (\
                 version BIGINT NOT NULL PRIMARY KEY, \
                 name TEXT NOT NULL, \
                 applied_at BIGINT NOT NULL)",
        )
        .await?;
        let applied = sqlx::query("SELECT version FROM sluice_migrations")
            .fetch_all(&mut *tx)
            .await?
            .iter()
            .map(|r| r.try_get::<i64, _>(0))
            .collect::<Result<HashSet<i64>, _>>()?;
        for m in migrations {
            if applied.contains(&m.version) {
                continue;
            }
            tx.execute(m.sql)
                .await
                .with_context(|| format!("migration {:04}_{}", m.version, m.name))?;
            sqlx::query(
                "INSERT INTO sluice_migrations (version, name, applied_at) VALUES ($1, $2, $3)",
            )
            .bind(m.version)
            .bind(m.name)
            .bind(now_micros())
            .execute(&mut *tx)
            .await?;
            tracing::info!(version = m.version, name = m.name, "applied migration");
        }
        let known = migrations.last().map_or(0, |m| m.version);
        if let Some(newest) = applied.iter().max().filter(|v| **v > known) {
            tracing::warn!(
                newest,
                known,
                "the database was migrated by a newer Sluice; continuing with this schema"
            );
        }
        tx.commit().await?;
        Ok(())
    }

    async fn begin_write(&self) -> Result<Transaction<'static, Any>, sqlx::Error> {
        match self.backend {
            Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await,
            Backend::Postgres => self.pool.begin().await,
        }
    }

    /// Begins a transaction that will append to the change log. On Postgres it is serialised
    /// with every other such transaction, so that change sequence numbers become visible in
    /// order: without it a poller could read seq 7, move its cursor past it, and then never
    /// see seq 6 committing late. SQLite has one writer at a time anyway.
    async fn begin_logged(&self) -> Result<Transaction<'static, Any>, sqlx::Error> {
        let mut tx = self.begin_write().await?;
        if self.backend == Backend::Postgres {
            sqlx::query("SELECT pg_advisory_xact_lock($1)")
                .bind(CHANGES_LOCK)
                .execute(&mut *tx)
                .await?;
        }
        Ok(tx)
    }

    async fn log_change(
        tx: &mut Transaction<'static, Any>,
        kind: Kind,
        id: &str,
        at: i64,
    ) -> Result<(), sqlx::Error> {
        sqlx::query("INSERT INTO sluice_changes (kind, id, at) VALUES ($1, $2, $3)")
            .bind(kind.as_str())
            .bind(id)
            .bind(at)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    /// Inserts one chunk of spend rows, skipping request ids already stored. With `returning`
    /// the ids actually inserted come back; without, only how many were (`None` for the ids),
    /// which spares decoding a row per inserted row.
    async fn insert_logs(
        &self,
        tx: &mut Transaction<'static, Any>,
        rows: &[SpendRow],
        returning: bool,
    ) -> Result<(u64, Option<Vec<String>>), StoreError> {
        let sql = insert_logs_sql(self.backend, rows.len(), returning);
        let mut query = sqlx::query(&sql);
        for r in rows {
            query = query
                .bind(r.request_id.as_str())
                .bind(&*r.call_type)
                .bind(&*r.api_key)
                .bind(r.spend)
                .bind(to_i64(r.prompt_tokens))
                .bind(to_i64(r.completion_tokens))
                .bind(to_i64(r.total_tokens))
                .bind(r.start_time.timestamp_micros())
                .bind(r.end_time.timestamp_micros())
                .bind(r.completion_start_time.map(|t| t.timestamp_micros()))
                .bind(&*r.model)
                .bind(&*r.model_id)
                .bind(&*r.model_group)
                .bind(&*r.custom_llm_provider)
                .bind(&*r.api_base)
                .bind(r.user.as_deref())
                .bind(r.team_id.as_deref())
                .bind(r.end_user.as_deref())
                .bind(&*r.status)
                .bind(i32::from(r.status_code))
                .bind(tags_json(&r.request_tags).into_owned());
        }
        if !returning {
            let done = query.execute(&mut **tx).await.map_err(db_err)?;
            return Ok((done.rows_affected(), None));
        }
        let ids = query
            .fetch_all(&mut **tx)
            .await
            .map_err(db_err)?
            .iter()
            .map(|row| row.try_get::<String, _>(0).map_err(db_err))
            .collect::<Result<Vec<String>, _>>()?;
        Ok((ids.len() as u64, Some(ids)))
    }

    /// Writes spend rows on Postgres with `COPY` and adds their increments, in one
    /// transaction on the native pool; `Ok(false)` (nothing written) when a request id was
    /// already stored or repeats in `rows`.
    async fn write_spend_copy(pg: &sqlx::PgPool, rows: &[SpendRow]) -> Result<bool, StoreError> {
        let mut tx = pg.begin().await.map_err(db_err)?;
        let mut copy = tx.copy_in_raw(PG_COPY_LOGS).await.map_err(db_err)?;
        let mut buf = String::new();
        for chunk in rows.chunks(PG_ROWS_PER_COPY_CHUNK) {
            buf.clear();
            for r in chunk {
                copy_line(&mut buf, r);
            }
            if let Err(e) = copy.send(buf.as_bytes()).await {
                // The server ends the COPY at its first error (a duplicate id in an earlier
                // chunk, say); end our side too.
                let _ = copy.abort("spend batch not sent").await;
                return if is_unique_violation(&e) {
                    Ok(false)
                } else {
                    Err(db_err(e))
                };
            }
        }
        match copy.finish().await {
            Ok(n) if n == rows.len() as u64 => {}
            Ok(_) => return Ok(false),
            Err(e) if is_unique_violation(&e) => return Ok(false),
            Err(e) => return Err(db_err(e)),
        }
        apply_increments::<sqlx::Postgres>(&mut tx, Backend::Postgres, split_increments(rows))
            .await
            .map_err(db_err)?;
        tx.commit().await.map_err(db_err)?;
        Ok(true)
    }

    /// Writes spend rows into a SQLite file through the native connection's raw handle
    /// ([`sqlite_rows`]) and adds their increments, in one transaction. When some request id
    /// was stored already or repeats, the batch is rolled back and written again row by row,
    /// so that increments come only from the rows that went in.
    async fn write_spend_sqlite(
        pool: &sqlx::SqlitePool,
        rows: &[SpendRow],
    ) -> Result<(), StoreError> {
        let mut tx = pool.begin_with("BEGIN IMMEDIATE").await.map_err(db_err)?;
        let all_new = on_raw_handle(&mut tx, |db| sqlite_rows::insert_all_new(db, rows)).await?;
        let increments = if all_new {
            split_increments(rows)
        } else {
            tx.rollback().await.map_err(db_err)?;
            tx = pool.begin_with("BEGIN IMMEDIATE").await.map_err(db_err)?;
            let went_in = on_raw_handle(&mut tx, |db| sqlite_rows::insert_each(db, rows)).await?;
            let fresh: Vec<SpendRow> = rows
                .iter()
                .zip(went_in)
                .filter(|(_, went_in)| *went_in)
                .map(|(r, _)| r.clone())
                .collect();
            split_increments(&fresh)
        };
        apply_increments::<sqlx::Sqlite>(&mut tx, Backend::Sqlite, increments)
            .await
            .map_err(db_err)?;
        tx.commit().await.map_err(db_err)
    }

    /// Writes spend rows learning which ones went in (`RETURNING`), so that increments come
    /// only from rows this transaction inserted; of several rows with one request id, the
    /// first is the one inserted.
    async fn write_spend_careful(&self, rows: &[SpendRow]) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await.map_err(db_err)?;
        let mut inserted = HashSet::with_capacity(rows.len());
        for chunk in chunks(rows) {
            let (_, ids) = self.insert_logs(&mut tx, chunk, true).await?;
            inserted.extend(ids.unwrap_or_default());
        }
        let increments = if inserted.len() == rows.len() {
            split_increments(rows)
        } else {
            let fresh: Vec<SpendRow> = rows
                .iter()
                .filter(|r| inserted.remove(&r.request_id))
                .cloned()
                .collect();
            split_increments(&fresh)
        };
        apply_increments::<Any>(&mut tx, self.backend, increments)
            .await
            .map_err(db_err)?;
        tx.commit().await.map_err(db_err)
    }
}

/// Adds `$3` to the spend of entity (`$1`, `$2`), if it exists: keys, users, teams and
/// customers are created by management calls only, so spend on one that does not exist
/// (deleted, or never made) is dropped, not resurrected.
const UPDATE_RECORD_SPEND: &str =
    "UPDATE sluice_entities SET spend = spend + $3 WHERE kind = $1 AND id = $2";

/// Upserts `rows` counters (kind, id, spend, doc, updated_at), adding to the spend of those
/// that exist.
fn add_to_counters_sql(backend: Backend, rows: usize) -> String {
    format!(
        "INSERT INTO sluice_entities (kind, id, spend, doc, updated_at) VALUES {} \
         ON CONFLICT (kind, id) DO UPDATE SET spend = sluice_entities.spend + excluded.spend",
        values_list(backend, rows, 5)
    )
}

/// Applies [`split_increments`]' records, then its counters, inside the caller's transaction
/// on `conn`: an `Any` connection, or the native Postgres one the `COPY` path writes on.
async fn apply_increments<DB>(
    conn: &mut DB::Connection,
    backend: Backend,
    (records, counters): (Vec<Increment>, Vec<Increment>),
) -> Result<(), sqlx::Error>
where
    DB: sqlx::Database,
    for<'e> &'e mut DB::Connection: Executor<'e, Database = DB>,
    for<'q> &'q str: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> f64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> DB::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
{
    for (kind, id, amount) in &records {
        sqlx::query::<DB>(UPDATE_RECORD_SPEND)
            .bind(kind.as_str())
            .bind(id.as_str())
            .bind(*amount)
            .execute(&mut *conn)
            .await?;
    }
    let now = now_micros();
    for chunk in chunks(&counters) {
        let sql = add_to_counters_sql(backend, chunk.len());
        let mut query = sqlx::query::<DB>(&sql);
        for (kind, id, amount) in chunk {
            query = query
                .bind(kind.as_str())
                .bind(id.as_str())
                .bind(*amount)
                .bind("{}")
                .bind(now);
        }
        query.execute(&mut *conn).await?;
    }
    Ok(())
}

type Increment = (Kind, String, f64);

/// The increments of `rows` (all of them inserted), split into records (keys, users, teams,
/// customers: updated only if they exist) and counters (model groups, per-key model groups,
/// the global budget: created on first use). Both keep `total_increments`' order by kind and
/// id, and callers apply records before counters, so concurrent writers on Postgres take row
/// locks in one order instead of deadlocking.
fn split_increments(rows: &[SpendRow]) -> (Vec<Increment>, Vec<Increment>) {
    let (counters, records) = total_increments(rows)
        .into_iter()
        .partition(|(kind, _, _)| matches!(kind, Kind::Model | Kind::KeyModel | Kind::Global));
    (records, counters)
}

/// One spend row as a line of `COPY`'s text format, in [`LOG_COLUMNS`] order.
fn copy_line(out: &mut String, r: &SpendRow) {
    copy_text(out, Some(&r.request_id));
    copy_text(out, Some(&r.call_type));
    copy_text(out, Some(&r.api_key));
    copy_float(out, r.spend);
    copy_int(out, Some(to_i64(r.prompt_tokens)));
    copy_int(out, Some(to_i64(r.completion_tokens)));
    copy_int(out, Some(to_i64(r.total_tokens)));
    copy_int(out, Some(r.start_time.timestamp_micros()));
    copy_int(out, Some(r.end_time.timestamp_micros()));
    copy_int(out, r.completion_start_time.map(|t| t.timestamp_micros()));
    copy_text(out, Some(&r.model));
    copy_text(out, Some(&r.model_id));
    copy_text(out, Some(&r.model_group));
    copy_text(out, Some(&r.custom_llm_provider));
    copy_text(out, Some(&r.api_base));
    copy_text(out, r.user.as_deref());
    copy_text(out, r.team_id.as_deref());
    copy_text(out, r.end_user.as_deref());
    copy_text(out, Some(&r.status));
    copy_int(out, Some(i64::from(r.status_code)));
    copy_text(out, Some(&tags_json(&r.request_tags)));
    // Every value ended with a tab; the row's last one ends the line instead.
    out.pop();
    out.push('\n');
}

/// A text value and a tab. In `COPY`'s text format a backslash starts an escape and tab,
/// newline and carriage return end fields and lines, so those four are escaped; `\N` is NULL.
fn copy_text(out: &mut String, value: Option<&str>) {
    let Some(value) = value else {
        out.push_str("\\N\t");
        return;
    };
    // A byte scan: a `find` over a set of chars decoded every char, about 370 instructions
    // per value. The four are ASCII, so every cut falls on a char boundary.
    let mut start = 0;
    for (at, byte) in value.bytes().enumerate() {
        let escaped = match byte {
            b'\\' => "\\\\",
            b'\t' => "\\t",
            b'\n' => "\\n",
            b'\r' => "\\r",
            _ => continue,
        };
        out.push_str(&value[start..at]);
        out.push_str(escaped);
        start = at + 1;
    }
    out.push_str(&value[start..]);
    out.push('\t');
}

fn copy_int(out: &mut String, value: Option<i64>) {
    match value {
        Some(v) => {
            out.push_str(itoa::Buffer::new().format(v));
            out.push('\t');
        }
        None => out.push_str("\\N\t"),
    }
}

/// A float Postgres's `float8` input reads back as the same `f64`: the shortest round-trip
/// digits in exponent form, or its words for NaN and the infinities.
fn copy_float(out: &mut String, value: f64) {
    use std::fmt::Write as _;
    if value.is_nan() {
        out.push_str("NaN\t");
    } else if value.is_infinite() {
        out.push_str(if value > 0.0 {
            "Infinity\t"
        } else {
            "-Infinity\t"
        });
    } else {
        write!(out, "{value:e}\t").expect("writing to a String");
    }
}

/// What a database URL points at, with the URL as handed to sqlx.
enum Target {
    SqliteFile(String),
    SqliteMemory(String),
    Postgres(String),
}

impl Target {
    fn parse(url: &str) -> anyhow::Result<Target> {
        let lower = url.to_ascii_lowercase();
        if lower.starts_with("postgres://") || lower.starts_with("postgresql://") {
            return Ok(Target::Postgres(url.to_string()));
        }
        if !lower.starts_with("sqlite:") {
            bail!(
                "unsupported database URL: expected sqlite:, postgres://, postgresql:// or memory:"
            );
        }
        let (path, query) = match url.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (url, None),
        };
        let params: Vec<(&str, &str)> = query
            .into_iter()
            .flat_map(|q| q.split('&'))
            .map(|kv| kv.split_once('=').unwrap_or((kv, "")))
            .collect();
        let memory = path.trim_start_matches("sqlite:").trim_start_matches("//") == ":memory:"
            || params.iter().any(|(k, v)| *k == "mode" && *v == "memory");
        if memory {
            return Ok(Target::SqliteMemory(url.to_string()));
        }
        if params.iter().any(|(k, _)| *k == "mode") {
            return Ok(Target::SqliteFile(url.to_string()));
        }
        let sep = if query.is_some() { '&' } else { '?' };
        Ok(Target::SqliteFile(format!("{url}{sep}mode=rwc")))
    }

    fn url(&self) -> &str {
        match self {
            Target::SqliteFile(u) | Target::SqliteMemory(u) | Target::Postgres(u) => u,
        }
    }

    fn backend(&self) -> Backend {
        match self {
            Target::Postgres(_) => Backend::Postgres,
            _ => Backend::Sqlite,
        }
    }
}

#[async_trait]
impl Store for SqlStore {
    async fn get(&self, kind: Kind, id: &str) -> Result<Option<Entity>, StoreError> {
        let row = sqlx::query("SELECT spend, doc FROM sluice_entities WHERE kind = $1 AND id = $2")
            .bind(kind.as_str())
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(db_err)?;
        row.map(|row| entity_from_row(kind, id.to_string(), &row))
            .transpose()
    }

    async fn insert(&self, kind: Kind, id: &str, doc: &Value) -> Result<bool, StoreError> {
        let now = now_micros();
        let mut tx = self.begin_logged().await.map_err(db_err)?;
        let inserted = sqlx::query(
            "INSERT INTO sluice_entities (kind, id, spend, doc, updated_at) \
             VALUES ($1, $2, 0.0, $3, $4) ON CONFLICT (kind, id) DO NOTHING",
        )
        .bind(kind.as_str())
        .bind(id)
        .bind(doc.to_string())
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?
        .rows_affected()
            == 1;
        finish_logged(tx, inserted, kind, id, now).await?;
        Ok(inserted)
    }

    async fn update(&self, kind: Kind, id: &str, doc: &Value) -> Result<bool, StoreError> {
        let now = now_micros();
        let mut tx = self.begin_logged().await.map_err(db_err)?;
        let updated = sqlx::query(
            "UPDATE sluice_entities SET doc = $3, updated_at = $4 WHERE kind = $1 AND id = $2",
        )
        .bind(kind.as_str())
        .bind(id)
        .bind(doc.to_string())
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?
        .rows_affected()
            > 0;
        finish_logged(tx, updated, kind, id, now).await?;
        Ok(updated)
    }

    async fn delete(&self, kind: Kind, id: &str) -> Result<bool, StoreError> {
        let now = now_micros();
        let mut tx = self.begin_logged().await.map_err(db_err)?;
        let deleted = sqlx::query("DELETE FROM sluice_entities WHERE kind = $1 AND id = $2")
            .bind(kind.as_str())
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?
            .rows_affected()
            > 0;
        finish_logged(tx, deleted, kind, id, now).await?;
        Ok(deleted)
    }

    async fn list(&self, kind: Kind) -> Result<Vec<Entity>, StoreError> {
        sqlx::query("SELECT id, spend, doc FROM sluice_entities WHERE kind = $1 ORDER BY id")
            .bind(kind.as_str())
            .fetch_all(&self.pool)
            .await
            .map_err(db_err)?
            .iter()
            .map(|row| {
                let id: String = row.try_get("id").map_err(db_err)?;
                entity_from_row(kind, id, row)
            })
            .collect()
    }

    async fn put_with_spend(
        &self,
        kind: Kind,
        id: &str,
        spend: f64,
        doc: &Value,
    ) -> Result<(), StoreError> {
        let now = now_micros();
        let mut tx = self.begin_logged().await.map_err(db_err)?;
        sqlx::query(
            "INSERT INTO sluice_entities (kind, id, spend, doc, updated_at) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (kind, id) DO UPDATE SET \
             spend = excluded.spend, doc = excluded.doc, updated_at = excluded.updated_at",
        )
        .bind(kind.as_str())
        .bind(id)
        .bind(spend)
        .bind(doc.to_string())
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        finish_logged(tx, true, kind, id, now).await
    }

    async fn write_spend(&self, rows: &[SpendRow]) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        // Nearly always every row is new: insert without RETURNING and check the counts (on
        // Postgres with COPY, which fails on a stored id; into a SQLite file through SQLite's
        // C API; a `sqlite::memory:` database through `Any`). Only when some request id was
        // already stored (a batch retried after a commit whose answer was lost) or repeats in
        // the batch is it written again the careful way.
        if let Some(pg) = &self.pg {
            if Self::write_spend_copy(pg, rows).await? {
                return Ok(());
            }
            return self.write_spend_careful(rows).await;
        }
        if let Some(sqlite) = &self.sqlite {
            return Self::write_spend_sqlite(sqlite, rows).await;
        }
        let mut tx = self.begin_write().await.map_err(db_err)?;
        for chunk in chunks(rows) {
            let (count, _) = self.insert_logs(&mut tx, chunk, false).await?;
            if count != chunk.len() as u64 {
                tx.rollback().await.map_err(db_err)?;
                return self.write_spend_careful(rows).await;
            }
        }
        apply_increments::<Any>(&mut tx, self.backend, split_increments(rows))
            .await
            .map_err(db_err)?;
        tx.commit().await.map_err(db_err)
    }

    async fn spend_logs(&self, query: &SpendQuery) -> Result<Vec<SpendRow>, StoreError> {
        enum Arg<'a> {
            Text(&'a str),
            Int(i64),
        }
        let mut clauses = Vec::new();
        let mut args = Vec::new();
        for (column, value) in [
            ("api_key", &query.api_key),
            ("user_id", &query.user),
            ("team_id", &query.team_id),
            ("end_user", &query.end_user),
            ("request_id", &query.request_id),
        ] {
            if let Some(v) = value {
                args.push(Arg::Text(v));
                clauses.push(format!("{column} = ${}", args.len()));
            }
        }
        if let Some(start) = query.start {
            args.push(Arg::Int(start.timestamp_micros()));
            clauses.push(format!("start_time >= ${}", args.len()));
        }
        if let Some(end) = query.end {
            args.push(Arg::Int(end.timestamp_micros()));
            clauses.push(format!("start_time <= ${}", args.len()));
        }
        let mut sql = format!("SELECT {LOG_COLUMNS} FROM sluice_spend_logs");
        if !clauses.is_empty() {
            sql.push_str(" WHERE ");
            sql.push_str(&clauses.join(" AND "));
        }
        sql.push_str(" ORDER BY start_time DESC, request_id DESC");
        if let Some(limit) = query.limit {
            args.push(Arg::Int(to_i64(limit)));
            sql.push_str(&format!(" LIMIT ${}", args.len()));
        }
        let mut q = sqlx::query(&sql);
        for arg in args {
            q = match arg {
                Arg::Text(s) => q.bind(s),
                Arg::Int(i) => q.bind(i),
            };
        }
        q.fetch_all(&self.pool)
            .await
            .map_err(db_err)?
            .iter()
            .map(spend_row_from_row)
            .collect()
    }

    async fn changes_since(&self, seq: i64) -> Result<(i64, Vec<(Kind, String)>), StoreError> {
        let rows =
            sqlx::query("SELECT seq, kind, id FROM sluice_changes WHERE seq > $1 ORDER BY seq")
                .bind(seq)
                .fetch_all(&self.pool)
                .await
                .map_err(db_err)?;
        let mut newest = seq;
        let mut changes = Vec::with_capacity(rows.len());
        for row in &rows {
            newest = newest.max(row.try_get::<i64, _>("seq").map_err(db_err)?);
            let kind: String = row.try_get("kind").map_err(db_err)?;
            let kind = Kind::parse(&kind)
                .ok_or_else(|| StoreError::Corrupt(format!("change log names kind {kind:?}")))?;
            changes.push((kind, row.try_get::<String, _>("id").map_err(db_err)?));
        }
        Ok((newest, distinct_changes(changes)))
    }
}

/// Logs the change and commits when `changed`, else rolls back (nothing was written).
async fn finish_logged(
    mut tx: Transaction<'static, Any>,
    changed: bool,
    kind: Kind,
    id: &str,
    at: i64,
) -> Result<(), StoreError> {
    if changed {
        SqlStore::log_change(&mut tx, kind, id, at)
            .await
            .map_err(db_err)?;
        tx.commit().await.map_err(db_err)
    } else {
        tx.rollback().await.map_err(db_err)
    }
}

/// An insert of `rows` spend rows that skips request ids already stored; with `returning`,
/// the ids inserted come back.
fn insert_logs_sql(backend: Backend, rows: usize, returning: bool) -> String {
    format!(
        "INSERT INTO sluice_spend_logs ({LOG_COLUMNS}) VALUES {} \
         ON CONFLICT (request_id) DO NOTHING{}",
        values_list(backend, rows, LOG_COLUMN_COUNT),
        if returning {
            " RETURNING request_id"
        } else {
            ""
        }
    )
}

/// A SQLite insert of `rows` spend rows that skips any row breaking a constraint: SQLite then
/// needs no statement journal, as no constraint can abort the statement halfway. The only
/// constraints besides the request id's are NOT NULL ones, and the raw writer binds those
/// columns from fields that cannot be empty; a row skipped for whatever reason shows in the
/// change count and sends the batch down the strict path ([`insert_logs_sql`]).
fn insert_logs_or_ignore_sql(rows: usize) -> String {
    format!(
        "INSERT OR IGNORE INTO sluice_spend_logs ({LOG_COLUMNS}) VALUES {}",
        values_list(Backend::Sqlite, rows, LOG_COLUMN_COUNT),
    )
}

/// `rows` parenthesised lists of `columns` placeholders each: `($1, $2), ($3, $4)` on
/// Postgres, `(?, ?), (?, ?)` on SQLite. SQLite looks up every `$N` name in a linear list
/// while preparing and binding, which made a 512-row spend insert take ~800 ms instead of
/// ~9 ms; anonymous `?` parameters skip that list.
fn values_list(backend: Backend, rows: usize, columns: usize) -> String {
    let mut sql = String::with_capacity(rows * columns * 6);
    let mut n = 0;
    for r in 0..rows {
        sql.push_str(if r == 0 { "(" } else { ", (" });
        for c in 0..columns {
            if c > 0 {
                sql.push_str(", ");
            }
            n += 1;
            match backend {
                Backend::Sqlite => sql.push('?'),
                Backend::Postgres => {
                    sql.push('$');
                    sql.push_str(&n.to_string());
                }
            }
        }
        sql.push(')');
    }
    sql
}

/// Runs `work` on the raw handle of `conn`, held locked meanwhile. The work blocks, so on a
/// multi-threaded runtime the thread's other tasks move to another thread while it runs
/// (Redis replies the request path waits for are driven on the background runtime, and must
/// not wait behind a batch of inserts).
async fn on_raw_handle<R>(
    conn: &mut sqlx::SqliteConnection,
    work: impl FnOnce(std::ptr::NonNull<libsqlite3_sys::sqlite3>) -> Result<R, sqlite_rows::SqliteError>,
) -> Result<R, StoreError> {
    use tokio::runtime::{Handle, RuntimeFlavor};
    let mut handle = conn.lock_handle().await.map_err(db_err)?;
    let db = handle.as_raw_handle();
    let result = match Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(|| work(db)),
        _ => work(db),
    };
    result.map_err(|e| StoreError::Unavailable(e.to_string()))
}

/// Whether a statement failed on a unique constraint (a request id already stored).
fn is_unique_violation(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .is_some_and(|d| d.is_unique_violation())
}

/// The JSON text of a tag list; the usual empty list without serialising.
fn tags_json(tags: &[String]) -> Cow<'static, str> {
    if tags.is_empty() {
        // Most rows: no allocation for them.
        return Cow::Borrowed("[]");
    }
    Cow::Owned(serde_json::to_string(tags).unwrap_or_else(|_| "[]".into()))
}

/// `items` cut into chunks of power-of-two lengths, largest first, of at most
/// [`MAX_ROWS_PER_INSERT`]: few distinct statement texts, so few cached prepared statements.
fn chunks<T>(mut items: &[T]) -> impl Iterator<Item = &[T]> {
    std::iter::from_fn(move || {
        if items.is_empty() {
            return None;
        }
        let (chunk, rest) = items.split_at(chunk_len(items.len()));
        items = rest;
        Some(chunk)
    })
}

/// The largest power of two no greater than `remaining`, capped at [`MAX_ROWS_PER_INSERT`].
fn chunk_len(remaining: usize) -> usize {
    if remaining >= MAX_ROWS_PER_INSERT {
        MAX_ROWS_PER_INSERT
    } else {
        1 << (usize::BITS - 1 - remaining.leading_zeros())
    }
}

fn entity_from_row(kind: Kind, id: String, row: &AnyRow) -> Result<Entity, StoreError> {
    let spend: f64 = row.try_get("spend").map_err(db_err)?;
    let doc: String = row.try_get("doc").map_err(db_err)?;
    let doc = serde_json::from_str(&doc)
        .map_err(|e| StoreError::Corrupt(format!("{} {id}: {e}", kind.as_str())))?;
    Ok(Entity {
        kind,
        id,
        spend,
        doc,
    })
}

fn spend_row_from_row(row: &AnyRow) -> Result<SpendRow, StoreError> {
    let request_id: String = row.try_get("request_id").map_err(db_err)?;
    let corrupt = |what: &str| StoreError::Corrupt(format!("spend log {request_id}: {what}"));
    let text = |c: &str| row.try_get::<String, _>(c).map_err(db_err);
    let opt_text = |c: &str| row.try_get::<Option<String>, _>(c).map_err(db_err);
    let count = |c: &str| -> Result<u64, StoreError> {
        let v: i64 = row.try_get(c).map_err(db_err)?;
        u64::try_from(v).map_err(|_| corrupt(&format!("{c} is {v}")))
    };
    let time = |v: i64| DateTime::<Utc>::from_timestamp_micros(v).ok_or_else(|| corrupt("time"));
    let status_code: i64 = row.try_get("status_code").map_err(db_err)?;
    let tags = text("request_tags")?;
    Ok(SpendRow {
        call_type: text("call_type")?.into(),
        api_key: text("api_key")?.into(),
        spend: row.try_get("spend").map_err(db_err)?,
        prompt_tokens: count("prompt_tokens")?,
        completion_tokens: count("completion_tokens")?,
        total_tokens: count("total_tokens")?,
        start_time: time(row.try_get("start_time").map_err(db_err)?)?,
        end_time: time(row.try_get("end_time").map_err(db_err)?)?,
        completion_start_time: row
            .try_get::<Option<i64>, _>("completion_start_time")
            .map_err(db_err)?
            .map(time)
            .transpose()?,
        model: text("model")?.into(),
        model_id: text("model_id")?.into(),
        model_group: text("model_group")?.into(),
        custom_llm_provider: text("custom_llm_provider")?.into(),
        api_base: text("api_base")?.into(),
        user: opt_text("user_id")?,
        team_id: opt_text("team_id")?,
        end_user: opt_text("end_user")?,
        status: text("status")?.into(),
        status_code: u16::try_from(status_code)
            .map_err(|_| corrupt(&format!("status_code is {status_code}")))?,
        request_tags: serde_json::from_str(&tags)
            .map_err(|e| corrupt(&format!("request_tags: {e}")))?,
        request_id,
    })
}

/// Decoding problems mean the stored data is not what this build wrote; everything else
/// (refused connections, pool timeouts, I/O, constraint or SQL errors) is reported as the
/// database being unavailable, which callers retry or surface as 503.
fn db_err(e: sqlx::Error) -> StoreError {
    match e {
        sqlx::Error::ColumnDecode { .. }
        | sqlx::Error::Decode(_)
        | sqlx::Error::ColumnNotFound(_)
        | sqlx::Error::ColumnIndexOutOfBounds { .. } => StoreError::Corrupt(e.to_string()),
        other => StoreError::Unavailable(other.to_string()),
    }
}

fn is_sqlite_busy(e: &sqlx::Error) -> bool {
    e.as_database_error().is_some_and(|d| {
        matches!(d.code().as_deref(), Some("5" | "6")) || d.message().contains("database is locked")
    })
}

fn now_micros() -> i64 {
    Utc::now().timestamp_micros()
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The migration lists of both backends, for the test that checks them against the files.
#[cfg(test)]
pub(super) fn embedded_migrations(
) -> std::collections::BTreeMap<&'static str, Vec<(i64, &'static str)>> {
    let list = |ms: &[Migration]| ms.iter().map(|m| (m.version, m.name)).collect();
    std::collections::BTreeMap::from([
        ("sqlite", list(SQLITE_MIGRATIONS)),
        ("postgres", list(POSTGRES_MIGRATIONS)),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_file_urls_create_the_file_unless_a_mode_is_given() {
        assert_eq!(
            Target::parse("sqlite://sluice.db").unwrap().url(),
            "sqlite://sluice.db?mode=rwc"
        );
        assert_eq!(
            Target::parse("sqlite:/tmp/x.db?cache=private")
                .unwrap()
                .url(),
            "sqlite:/tmp/x.db?cache=private&mode=rwc"
        );
        assert_eq!(
            Target::parse("sqlite://ro.db?mode=ro").unwrap().url(),
            "sqlite://ro.db?mode=ro"
        );
        assert!(matches!(
            Target::parse("sqlite::memory:").unwrap(),
            Target::SqliteMemory(_)
        ));
        assert!(matches!(
            Target::parse("sqlite://x?mode=memory").unwrap(),
            Target::SqliteMemory(_)
        ));
        assert!(matches!(
            Target::parse("postgresql://u@h/db").unwrap(),
            Target::Postgres(_)
        ));
        assert!(Target::parse("mysql://u@h/db").is_err());
        assert!(matches!(
            Target::parse(super::super::DEFAULT_SQLITE_URL).unwrap(),
            Target::SqliteFile(u) if u == "sqlite://sluice.db?mode=rwc"
        ));
    }

    #[test]
    fn chunks_are_powers_of_two_within_the_parameter_limits() {
        let lens: Vec<usize> = chunks(&[0; 1000]).map(<[i32]>::len).collect();
        assert_eq!(lens, [512, 256, 128, 64, 32, 8]);
        assert_eq!(chunks(&[0; 1]).count(), 1);
        assert_eq!(chunks::<i32>(&[]).count(), 0);
        assert_eq!(LOG_COLUMNS.split(',').count(), LOG_COLUMN_COUNT);
        assert_eq!(values_list(Backend::Postgres, 2, 2), "($1, $2), ($3, $4)");
        assert_eq!(values_list(Backend::Sqlite, 2, 3), "(?, ?, ?), (?, ?, ?)");
    }

    /// Every file under `migrations/<backend>/` is embedded, numbered from 1 without gaps.
    #[test]
    fn every_migration_file_is_embedded() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
        for (backend, embedded) in embedded_migrations() {
            let mut files: Vec<String> = std::fs::read_dir(root.join(backend))
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|f| f.ends_with(".sql"))
                .collect();
            files.sort();
            let expected: Vec<String> = embedded
                .iter()
                .map(|(v, name)| format!("{v:04}_{name}.sql"))
                .collect();
            assert_eq!(files, expected, "{backend}");
            for (i, (v, _)) in embedded.iter().enumerate() {
                assert_eq!(*v, i as i64 + 1, "{backend}");
            }
        }
    }
}
