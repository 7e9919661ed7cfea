//! Where tenancy state lives: the [`Store`] implementations and [`open`], which picks one from
//! the configured database URL.
//!
//! - no URL: the embedded default, a SQLite file `sluice.db` in the current directory (created
//!   when missing, WAL journal, busy timeout), so a single instance needs no database server;
//! - `sqlite:PATH`, `sqlite://PATH`, `sqlite::memory:`: SQLite ([`sql::SqlStore`]);
//! - `postgres://...`, `postgresql://...`: Postgres ([`sql::SqlStore`]), for several instances;
//! - `memory:`: a process-local store ([`memory::MemoryStore`]) for tests and throwaway runs.
//!
//! Both SQL backends share one implementation on `sqlx::AnyPool` and migrate themselves on open
//! from SQL files embedded in the binary. All of them pass one conformance suite
//! (`conformance.rs`), which is what "same semantics" means here.

pub mod memory;
pub mod sql;

#[cfg(test)]
mod conformance;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use sluice_filters::tenancy::{Kind, Store};

pub use memory::MemoryStore;
pub use sql::SqlStore;

/// The URL used when none is configured: `sluice.db` in the current directory, created when
/// missing.
pub const DEFAULT_SQLITE_URL: &str = "sqlite://sluice.db?mode=rwc";

/// Opens the store named by `database_url` (see the module docs), connecting and migrating
/// SQL databases before returning. `pool_limit` bounds the connection pool; `connect_timeout`
/// bounds the first connection and every later wait for a pooled one.
///
/// Errors name the URL with any password replaced by `***`.
pub async fn open(
    database_url: Option<&str>,
    pool_limit: u32,
    connect_timeout: Duration,
) -> anyhow::Result<Arc<dyn Store>> {
    let url = database_url
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .unwrap_or(DEFAULT_SQLITE_URL);
    if is_memory_url(url) {
        return Ok(Arc::new(MemoryStore::new()));
    }
    let store = SqlStore::connect(url, pool_limit, connect_timeout)
        .await
        .with_context(|| format!("cannot open the database at {}", redact_url(url)))?;
    Ok(Arc::new(store))
}

fn is_memory_url(url: &str) -> bool {
    let lower = url.to_ascii_lowercase();
    lower == "memory" || lower.starts_with("memory:")
}

/// `url` with its password (the userinfo after `user:`, and `password=` query parameters)
/// replaced by `***`. Errs on the side of hiding too much when the URL is malformed, e.g. a
/// password with a raw `/`, `?` or `@` in it.
pub fn redact_url(url: &str) -> String {
    let mut out = String::with_capacity(url.len());
    let mut rest = url;
    if let Some(scheme_end) = url.find("://").map(|i| i + 3) {
        out.push_str(&url[..scheme_end]);
        rest = &url[scheme_end..];
        // The userinfo ends at the last `@`; anything between the first `:` and it is secret.
        if let Some(at) = rest.rfind('@') {
            if let Some(colon) = rest[..at].find(':') {
                out.push_str(&rest[..colon]);
                out.push_str(":***");
                rest = &rest[at..];
            }
        }
    }
    match rest.split_once('?') {
        None => out.push_str(rest),
        Some((before, query)) => {
            out.push_str(before);
            out.push('?');
            for (i, pair) in query.split('&').enumerate() {
                if i > 0 {
                    out.push('&');
                }
                match pair.split_once('=') {
                    Some((k, _)) if k.to_ascii_lowercase().contains("password") => {
                        out.push_str(k);
                        out.push_str("=***");
                    }
                    _ => out.push_str(pair),
                }
            }
        }
    }
    out
}

/// The distinct entities of a change log, in order of their first change after the cursor.
fn distinct_changes(changes: impl IntoIterator<Item = (Kind, String)>) -> Vec<(Kind, String)> {
    let mut seen = std::collections::HashSet::new();
    changes
        .into_iter()
        .filter(|c| seen.insert(c.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords_in_userinfo_and_query() {
        assert_eq!(
            redact_url("postgres://sluice:s3cret@db.internal:5432/sluice"),
            "postgres://sluice:***@db.internal:5432/sluice"
        );
        assert_eq!(
            redact_url("postgresql://db/sluice?user=a&password=s3cret&sslmode=require"),
            "postgresql://db/sluice?user=a&password=***&sslmode=require"
        );
        // A raw `/`, `?` or `@` in the password still hides all of it.
        let odd = redact_url("postgres://u:pa/s?s@w@host/db");
        assert!(!odd.contains("pa/s") && !odd.contains("s@w"), "{odd}");
        assert_eq!(odd, "postgres://u:***@host/db");
        // Nothing to hide.
        assert_eq!(
            redact_url("postgres://u@host:5432/db"),
            "postgres://u@host:5432/db"
        );
        assert_eq!(redact_url("sqlite::memory:"), "sqlite::memory:");
        assert_eq!(
            redact_url("sqlite:///var/lib/sluice.db?mode=rwc"),
            "sqlite:///var/lib/sluice.db?mode=rwc"
        );
    }

    #[test]
    fn distinct_changes_keeps_first_occurrence_order() {
        let got = distinct_changes([
            (Kind::Key, "a".to_string()),
            (Kind::Team, "a".to_string()),
            (Kind::Key, "a".to_string()),
            (Kind::Key, "b".to_string()),
        ]);
        assert_eq!(
            got,
            vec![
                (Kind::Key, "a".to_string()),
                (Kind::Team, "a".to_string()),
                (Kind::Key, "b".to_string())
            ]
        );
    }

    #[tokio::test]
    async fn memory_urls_open_the_memory_store() {
        for url in ["memory:", "memory://", "MEMORY:"] {
            let store = open(Some(url), 1, Duration::from_secs(1)).await.unwrap();
            assert!(store.list(Kind::Key).await.unwrap().is_empty());
        }
    }

    #[tokio::test]
    async fn errors_name_the_url_without_its_password() {
        let err = open(Some("mysql://root:hunter2@db/x"), 1, Duration::from_secs(1))
            .await
            .err()
            .expect("mysql is not supported");
        let msg = format!("{err:#}");
        assert!(msg.contains("mysql://root:***@db/x"), "{msg}");
        assert!(!msg.contains("hunter2"), "{msg}");

        // Nothing listens on port 1: the connection is refused (or times out) quickly.
        let err = open(
            Some("postgres://sluice:hunter2@127.0.0.1:1/sluice"),
            1,
            Duration::from_secs(2),
        )
        .await
        .err()
        .expect("nothing listens on port 1");
        let msg = format!("{err:#}");
        assert!(
            msg.contains("postgres://sluice:***@127.0.0.1:1/sluice"),
            "{msg}"
        );
        assert!(!msg.contains("hunter2"), "{msg}");
    }
}
