//! Spend rows into a SQLite file through SQLite's C API, on a connection borrowed from sqlx.
//!
//! Through sqlx each row went through `Any`'s conversions, every value was copied into the
//! statement (`SQLITE_TRANSIENT`), and the statements ran on the connection's own thread.
//! Here values are bound in place (`SQLITE_STATIC`: SQLite reads the bytes during the step
//! and never after the statement's reset), [`ROWS_PER_STEP`] rows go in per step (a step
//! opens the table and its indexes once, whatever its rows), and SQLite's change count says
//! whether every row went in. In callgrind (`spend_write_bench`) the writer's instructions per
//! row fell from about 28k to 16k.

use std::borrow::Cow;
use std::ffi::{c_int, CStr, CString};
use std::ptr::{self, NonNull};

use libsqlite3_sys as ffi;
use sluice_filters::tenancy::SpendRow;

use super::{
    insert_logs_or_ignore_sql, insert_logs_sql, tags_json, to_i64, Backend, LOG_COLUMN_COUNT,
};

/// Rows per step of the many-row statement. Each batch prepares it anew (its connection
/// may be replaced between batches, and a statement must not outlive it); past 32 rows the
/// prepare costs more than the steps save.
const ROWS_PER_STEP: usize = 32;

/// What SQLite said when a call failed: its result code and message.
#[derive(Debug, thiserror::Error)]
#[error("sqlite: {message} (code {code})")]
pub(super) struct SqliteError {
    code: c_int,
    message: String,
}

/// Inserts `rows` in order, [`ROWS_PER_STEP`] at a time, skipping request ids already stored;
/// `Ok(false)` as soon as some row did not go in (its id was stored, or repeats in `rows`; or,
/// though it cannot happen, it broke another constraint, which `insert_each` then reports):
/// the caller then rolls back and writes the batch with [`insert_each`]. The caller holds
/// `db` locked, inside its transaction, for the whole call.
pub(super) fn insert_all_new(
    db: NonNull<ffi::sqlite3>,
    rows: &[SpendRow],
) -> Result<bool, SqliteError> {
    let db = db.as_ptr();
    let mut groups = rows.chunks_exact(ROWS_PER_STEP);
    if groups.len() > 0 {
        let many = Statement::prepare(db, &sql(insert_logs_or_ignore_sql(ROWS_PER_STEP)))?;
        for group in groups.by_ref() {
            if many.insert(db, group)? != group.len() {
                return Ok(false);
            }
        }
    }
    let rest = groups.remainder();
    if !rest.is_empty() {
        let one = Statement::prepare(db, &sql(insert_logs_or_ignore_sql(1)))?;
        for row in rest {
            if one.insert(db, std::slice::from_ref(row))? != 1 {
                return Ok(false);
            }
        }
    }
    Ok(true)
}

/// Inserts `rows` in order, one step each, and says for each whether it went in (`false`:
/// its request id was stored already, or came earlier in `rows`); a row that breaks any other
/// constraint is an error. Held as [`insert_all_new`].
pub(super) fn insert_each(
    db: NonNull<ffi::sqlite3>,
    rows: &[SpendRow],
) -> Result<Vec<bool>, SqliteError> {
    let db = db.as_ptr();
    let one = Statement::prepare(db, &sql(insert_logs_sql(Backend::Sqlite, 1, false)))?;
    rows.iter()
        .map(|row| Ok(one.insert(db, std::slice::from_ref(row))? == 1))
        .collect()
}

/// One of the store's statements, as SQLite's C API takes it.
fn sql(text: String) -> CString {
    CString::new(text).expect("the statement has no NUL inside")
}

/// A prepared statement, finalized when dropped.
struct Statement(NonNull<ffi::sqlite3_stmt>);

impl Statement {
    fn prepare(db: *mut ffi::sqlite3, sql: &CStr) -> Result<Statement, SqliteError> {
        let mut stmt = ptr::null_mut();
        // SAFETY: `db` is an open connection and `sql` is NUL-terminated.
        let rc = unsafe {
            ffi::sqlite3_prepare_v3(
                db,
                sql.as_ptr(),
                -1,
                ffi::SQLITE_PREPARE_PERSISTENT,
                &mut stmt,
                ptr::null_mut(),
            )
        };
        match NonNull::new(stmt) {
            Some(stmt) if rc == ffi::SQLITE_OK => Ok(Statement(stmt)),
            Some(stmt) => {
                drop(Statement(stmt));
                Err(SqliteError::last(db, rc))
            }
            None => Err(SqliteError::last(db, rc)),
        }
    }

    /// Binds `rows` (as many as the statement has rows) and steps once: how many went in.
    fn insert(&self, db: *mut ffi::sqlite3, rows: &[SpendRow]) -> Result<usize, SqliteError> {
        let stmt = self.0.as_ptr();
        // Bound in place: these strings must outlive the step and the reset below.
        let tags: Vec<Cow<str>> = rows.iter().map(|r| tags_json(&r.request_tags)).collect();
        let mut rc = ffi::SQLITE_OK;
        for (at, (row, tags)) in rows.iter().zip(&tags).enumerate() {
            // SAFETY: `stmt` is live, has LOG_COLUMN_COUNT parameters per row of `rows`, and
            // what is bound stays unchanged until the reset.
            rc = unsafe { bind_row(stmt, (at * LOG_COLUMN_COUNT) as c_int, row, tags) };
            if rc != ffi::SQLITE_OK {
                break;
            }
        }
        // SAFETY: `stmt` is live and `db` is its connection, held by the caller.
        unsafe {
            if rc == ffi::SQLITE_OK {
                rc = ffi::sqlite3_step(stmt);
            }
            let went_in = ffi::sqlite3_changes(db);
            let error = (rc != ffi::SQLITE_DONE).then(|| SqliteError::last(db, rc));
            ffi::sqlite3_reset(stmt);
            match error {
                Some(e) => Err(e),
                None => Ok(usize::try_from(went_in).unwrap_or(0)),
            }
        }
    }
}

impl Drop for Statement {
    fn drop(&mut self) {
        // SAFETY: prepared by `prepare` and finalized only here.
        unsafe { ffi::sqlite3_finalize(self.0.as_ptr()) };
    }
}

impl SqliteError {
    fn last(db: *mut ffi::sqlite3, code: c_int) -> SqliteError {
        // SAFETY: `db` is open, and the message is copied before any other call on it.
        let message = unsafe {
            let text = ffi::sqlite3_errmsg(db);
            if text.is_null() {
                String::new()
            } else {
                CStr::from_ptr(text).to_string_lossy().into_owned()
            }
        };
        SqliteError { code, message }
    }
}

/// Binds `r` to the parameters after `base`, in the spend log's column order; the first code
/// that is not `SQLITE_OK`, if any.
///
/// # Safety
/// `stmt` must be a live statement with parameters `base + 1 ..= base + 21`, and `r` and `tags`
/// must stay unchanged until the statement is reset.
unsafe fn bind_row(stmt: *mut ffi::sqlite3_stmt, base: c_int, r: &SpendRow, tags: &str) -> c_int {
    let texts: [(c_int, Option<&str>); 13] = [
        (1, Some(&r.request_id)),
        (2, Some(&r.call_type)),
        (3, Some(&r.api_key)),
        (11, Some(&r.model)),
        (12, Some(&r.model_id)),
        (13, Some(&r.model_group)),
        (14, Some(&r.custom_llm_provider)),
        (15, Some(&r.api_base)),
        (16, r.user.as_deref()),
        (17, r.team_id.as_deref()),
        (18, r.end_user.as_deref()),
        (19, Some(&r.status)),
        (21, Some(tags)),
    ];
    let ints: [(c_int, Option<i64>); 7] = [
        (5, Some(to_i64(r.prompt_tokens))),
        (6, Some(to_i64(r.completion_tokens))),
        (7, Some(to_i64(r.total_tokens))),
        (8, Some(r.start_time.timestamp_micros())),
        (9, Some(r.end_time.timestamp_micros())),
        (10, r.completion_start_time.map(|t| t.timestamp_micros())),
        (20, Some(i64::from(r.status_code))),
    ];
    for (at, value) in texts {
        let rc = match value {
            Some(s) => match c_int::try_from(s.len()) {
                Ok(len) => ffi::sqlite3_bind_text(
                    stmt,
                    base + at,
                    s.as_ptr().cast(),
                    len,
                    ffi::SQLITE_STATIC(),
                ),
                Err(_) => ffi::SQLITE_TOOBIG,
            },
            None => ffi::sqlite3_bind_null(stmt, base + at),
        };
        if rc != ffi::SQLITE_OK {
            return rc;
        }
    }
    for (at, value) in ints {
        let rc = match value {
            Some(v) => ffi::sqlite3_bind_int64(stmt, base + at, v),
            None => ffi::sqlite3_bind_null(stmt, base + at),
        };
        if rc != ffi::SQLITE_OK {
            return rc;
        }
    }
    ffi::sqlite3_bind_double(stmt, base + 4, r.spend)
}
