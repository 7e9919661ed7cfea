//! A process-local [`Store`] for tests and throwaway runs (`memory:`), with the semantics of
//! the SQL store: the same conformance suite runs against both.
//!
//! Documents are kept as JSON text and times at microsecond precision, as in SQL, so that what
//! comes back is exactly what the SQL store would return.

use std::collections::{BTreeMap, HashSet};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use parking_lot::Mutex;
use serde_json::Value;
use sluice_filters::tenancy::{
    total_increments, Entity, Kind, SpendQuery, SpendRow, Store, StoreError,
};

use super::distinct_changes;

#[derive(Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// `(spend, document as JSON text)`, ordered by kind then id.
    entities: BTreeMap<(Kind, String), (f64, String)>,
    /// `(seq, kind, id)`, seq increasing from 1.
    changes: Vec<(i64, Kind, String)>,
    spend_logs: Vec<SpendRow>,
    request_ids: HashSet<String>,
}

impl MemoryStore {
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }
}

impl Inner {
    fn log_change(&mut self, kind: Kind, id: &str) {
        let seq = self.changes.last().map_or(0, |c| c.0) + 1;
        self.changes.push((seq, kind, id.to_string()));
    }
}

fn entity(kind: Kind, id: &str, spend: f64, doc: &str) -> Result<Entity, StoreError> {
    Ok(Entity {
        kind,
        id: id.to_string(),
        spend,
        doc: serde_json::from_str(doc)
            .map_err(|e| StoreError::Corrupt(format!("{} {id}: {e}", kind.as_str())))?,
    })
}

/// `t` at the microsecond precision the SQL store keeps.
fn micros(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(t.timestamp_micros()).unwrap_or(t)
}

#[async_trait]
impl Store for MemoryStore {
    async fn get(&self, kind: Kind, id: &str) -> Result<Option<Entity>, StoreError> {
        let inner = self.inner.lock();
        inner
            .entities
            .get(&(kind, id.to_string()))
            .map(|(spend, doc)| entity(kind, id, *spend, doc))
            .transpose()
    }

    async fn insert(&self, kind: Kind, id: &str, doc: &Value) -> Result<bool, StoreError> {
        let mut inner = self.inner.lock();
        let key = (kind, id.to_string());
        if inner.entities.contains_key(&key) {
            return Ok(false);
        }
        inner.entities.insert(key, (0.0, doc.to_string()));
        inner.log_change(kind, id);
        Ok(true)
    }

    async fn update(&self, kind: Kind, id: &str, doc: &Value) -> Result<bool, StoreError> {
        let mut inner = self.inner.lock();
        match inner.entities.get_mut(&(kind, id.to_string())) {
            Some((_, stored)) => *stored = doc.to_string(),
            None => return Ok(false),
        }
        inner.log_change(kind, id);
        Ok(true)
    }

    async fn delete(&self, kind: Kind, id: &str) -> Result<bool, StoreError> {
        let mut inner = self.inner.lock();
        if inner.entities.remove(&(kind, id.to_string())).is_none() {
            return Ok(false);
        }
        inner.log_change(kind, id);
        Ok(true)
    }

    async fn list(&self, kind: Kind) -> Result<Vec<Entity>, StoreError> {
        let inner = self.inner.lock();
        inner
            .entities
            .range((kind, String::new())..)
            .take_while(|((k, _), _)| *k == kind)
            .map(|((_, id), (spend, doc))| entity(kind, id, *spend, doc))
            .collect()
    }

    async fn put_with_spend(
        &self,
        kind: Kind,
        id: &str,
        spend: f64,
        doc: &Value,
    ) -> Result<(), StoreError> {
        let mut inner = self.inner.lock();
        inner
            .entities
            .insert((kind, id.to_string()), (spend, doc.to_string()));
        inner.log_change(kind, id);
        Ok(())
    }

    async fn write_spend(&self, rows: &[SpendRow]) -> Result<(), StoreError> {
        let mut inner = self.inner.lock();
        let mut fresh = Vec::with_capacity(rows.len());
        for row in rows {
            if inner.request_ids.insert(row.request_id.clone()) {
                let mut row = row.clone();
                row.start_time = micros(row.start_time);
                row.end_time = micros(row.end_time);
                row.completion_start_time = row.completion_start_time.map(micros);
                fresh.push(row);
            }
        }
        for (kind, id, amount) in total_increments(&fresh) {
            match kind {
                Kind::Model | Kind::KeyModel | Kind::Global => {
                    inner
                        .entities
                        .entry((kind, id))
                        .or_insert_with(|| (0.0, "{}".to_string()))
                        .0 += amount;
                }
                _ => {
                    if let Some((spend, _)) = inner.entities.get_mut(&(kind, id)) {
                        *spend += amount;
                    }
                }
            }
        }
        inner.spend_logs.extend(fresh);
        Ok(())
    }

    async fn spend_logs(&self, query: &SpendQuery) -> Result<Vec<SpendRow>, StoreError> {
        let inner = self.inner.lock();
        let matches = |want: &Option<String>, have: Option<&str>| {
            want.as_deref().is_none_or(|w| have == Some(w))
        };
        let start = query.start.map(micros);
        let end = query.end.map(micros);
        let mut rows: Vec<SpendRow> = inner
            .spend_logs
            .iter()
            .filter(|r| {
                matches(&query.api_key, Some(&r.api_key))
                    && matches(&query.user, r.user.as_deref())
                    && matches(&query.team_id, r.team_id.as_deref())
                    && matches(&query.end_user, r.end_user.as_deref())
                    && matches(&query.request_id, Some(&r.request_id))
                    && start.is_none_or(|s| r.start_time >= s)
                    && end.is_none_or(|e| r.start_time <= e)
            })
            .cloned()
            .collect();
        rows.sort_by(|a, b| (b.start_time, &b.request_id).cmp(&(a.start_time, &a.request_id)));
        if let Some(limit) = query.limit {
            rows.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
        }
        Ok(rows)
    }

    async fn changes_since(&self, seq: i64) -> Result<(i64, Vec<(Kind, String)>), StoreError> {
        let inner = self.inner.lock();
        let start = inner.changes.partition_point(|c| c.0 <= seq);
        let newer = &inner.changes[start..];
        let newest = newer.last().map_or(seq, |c| c.0.max(seq));
        Ok((
            newest,
            distinct_changes(newer.iter().map(|(_, k, id)| (*k, id.clone()))),
        ))
    }
}
