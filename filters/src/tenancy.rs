//! Tenancy records and the [`Store`] seam: virtual keys, users, teams, end users (customers),
//! budgets and the spend log, in LiteLLM's field names so management bodies and imported rows
//! map one to one.
//!
//! Every record is kept by the store as a JSON document beside a `spend` column: documents keep
//! the schema small and the same on SQLite, Postgres and memory, and spend is a column so the
//! batching writer can add to it atomically without rewriting documents.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// What a stored entity is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Key,
    User,
    Team,
    /// An end user: the OpenAI `user` field of a request.
    Customer,
    Budget,
    /// Spend of one key on one model group (`model_max_budget`); id is `{token}/{model}`.
    KeyModel,
    /// Spend per model group; id is the group name.
    Model,
    /// The proxy-wide budget (`litellm_settings.max_budget`); id is [`GLOBAL_ID`].
    Global,
}

pub const GLOBAL_ID: &str = "litellm_proxy";

impl Kind {
    pub const ALL: [Kind; 8] = [
        Kind::Key,
        Kind::User,
        Kind::Team,
        Kind::Customer,
        Kind::Budget,
        Kind::KeyModel,
        Kind::Model,
        Kind::Global,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Key => "key",
            Kind::User => "user",
            Kind::Team => "team",
            Kind::Customer => "customer",
            Kind::Budget => "budget",
            Kind::KeyModel => "key_model",
            Kind::Model => "model",
            Kind::Global => "global",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// A stored entity: its document and its accumulated spend.
#[derive(Debug, Clone, PartialEq)]
pub struct Entity {
    pub kind: Kind,
    pub id: String,
    pub spend: f64,
    pub doc: Value,
}

impl Entity {
    /// The typed record, with `spend` filled from the column.
    pub fn record<T: serde::de::DeserializeOwned>(&self) -> Result<T, StoreError> {
        let mut doc = self.doc.clone();
        if let Value::Object(m) = &mut doc {
            m.insert("spend".into(), Value::from(self.spend));
        }
        serde_json::from_value(doc)
            .map_err(|e| StoreError::Corrupt(format!("{} {}: {e}", self.kind.as_str(), self.id)))
    }
}

/// A per-model budget: LiteLLM accepts a bare number or `{budget_limit, time_period}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ModelBudget {
    Limit(f64),
    Detailed {
        budget_limit: f64,
        #[serde(default)]
        time_period: Option<String>,
    },
}

impl ModelBudget {
    pub fn limit(&self) -> f64 {
        match self {
            ModelBudget::Limit(l)
            | ModelBudget::Detailed {
                budget_limit: l, ..
            } => *l,
        }
    }
}

/// Budget and rate-limit fields shared by keys, users, teams, customers and budget rows.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    #[serde(default)]
    pub max_budget: Option<f64>,
    #[serde(default)]
    pub soft_budget: Option<f64>,
    #[serde(default)]
    pub budget_duration: Option<String>,
    #[serde(default)]
    pub budget_reset_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub tpm_limit: Option<u64>,
    #[serde(default)]
    pub rpm_limit: Option<u64>,
    #[serde(default)]
    pub max_parallel_requests: Option<u64>,
    #[serde(default)]
    pub model_max_budget: BTreeMap<String, ModelBudget>,
}

impl Limits {
    /// Fills every limit left unset here from `template` (a budget row attached by `budget_id`).
    pub fn inherit(&mut self, template: &Limits) {
        macro_rules! fill {
            ($($f:ident),*) => { $( if self.$f.is_none() { self.$f = template.$f.clone(); } )* };
        }
        fill!(
            max_budget,
            soft_budget,
            budget_duration,
            tpm_limit,
            rpm_limit,
            max_parallel_requests
        );
        if self.model_max_budget.is_empty() {
            self.model_max_budget = template.model_max_budget.clone();
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct KeyRecord {
    /// SHA-256 hex of the key: the only form in which a key is stored.
    pub token: String,
    /// `sk-...ABCD`: enough to recognise a key without revealing it.
    #[serde(default)]
    pub key_name: Option<String>,
    #[serde(default)]
    pub key_alias: Option<String>,
    #[serde(default)]
    pub spend: f64,
    #[serde(default)]
    pub expires: Option<DateTime<Utc>>,
    /// Model groups or access groups; empty means all.
    #[serde(default)]
    pub models: Vec<String>,
    #[serde(default)]
    pub aliases: Map<String, Value>,
    #[serde(default)]
    pub config: Map<String, Value>,
    #[serde(default)]
    pub user_id: Option<String>,
    #[serde(default)]
    pub team_id: Option<String>,
    #[serde(default)]
    pub budget_id: Option<String>,
    #[serde(flatten)]
    pub limits: Limits,
    #[serde(default)]
    pub allowed_routes: Vec<String>,
    #[serde(default)]
    pub metadata: Map<String, Value>,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub blocked: bool,
    #[serde(default)]
    pub created_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub updated_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UserRecord {
    pub user_id: String,
    #[serde(default)]
    pub user_email: Option<String>,
    #[serde(default)]
    pub user_alias: Option<String>,
    /// `proxy_admin`, `proxy_admin_viewer`, `internal_user`, `internal_user_viewer`.
    #[serde(default)]
    pub user_role: Option<String>,
    #[serde(default)]
    pub teams: Vec<String>,
    #[serde(default)]
    pub models: Vec<String>,
    #[serde(default)]
    pub spend: f64,
    #[serde(flatten)]
    pub limits: Limits,
    #[serde(default)]
    pub metadata: Map<String, Value>,
    #[serde(default)]
    pub created_at: Option<DateTime<Utc>>,
}

impl UserRecord {
    pub fn is_admin(&self) -> bool {
        self.user_role.as_deref() == Some("proxy_admin")
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TeamMember {
    #[serde(default = "member_role")]
    pub role: String,
    #[serde(default)]
    pub user_id: Option<String>,
    #[serde(default)]
    pub user_email: Option<String>,
}

fn member_role() -> String {
    "user".into()
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TeamRecord {
    pub team_id: String,
    #[serde(default)]
    pub team_alias: Option<String>,
    #[serde(default)]
    pub organization_id: Option<String>,
    #[serde(default)]
    pub members_with_roles: Vec<TeamMember>,
    #[serde(default)]
    pub models: Vec<String>,
    #[serde(default)]
    pub spend: f64,
    #[serde(flatten)]
    pub limits: Limits,
    #[serde(default)]
    pub budget_id: Option<String>,
    #[serde(default)]
    pub blocked: bool,
    #[serde(default)]
    pub metadata: Map<String, Value>,
    #[serde(default)]
    pub created_at: Option<DateTime<Utc>>,
}

/// An end user, named by the OpenAI `user` field of requests.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CustomerRecord {
    pub user_id: String,
    #[serde(default)]
    pub alias: Option<String>,
    #[serde(default)]
    pub spend: f64,
    #[serde(default)]
    pub blocked: bool,
    #[serde(default)]
    pub budget_id: Option<String>,
    #[serde(flatten)]
    pub limits: Limits,
    #[serde(default)]
    pub allowed_model_region: Option<String>,
    #[serde(default)]
    pub default_model: Option<String>,
    #[serde(default)]
    pub created_at: Option<DateTime<Utc>>,
}

/// A reusable set of limits, attached to keys, teams and customers by `budget_id`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BudgetRecord {
    pub budget_id: String,
    #[serde(flatten)]
    pub limits: Limits,
    #[serde(default)]
    pub created_at: Option<DateTime<Utc>>,
}

/// One request, success or failure, as the spend log keeps it (LiteLLM's SpendLogs columns).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SpendRow {
    pub request_id: String,
    /// The route called. `Cow`: the gateway's rows name a fixed route, and a row is built on
    /// every request, so those names are borrowed rather than allocated.
    pub call_type: Cow<'static, str>,
    /// Hash of the caller's key; empty when auth is off. Shared with the cached key.
    pub api_key: Arc<str>,
    pub spend: f64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    #[serde(rename = "startTime")]
    pub start_time: DateTime<Utc>,
    #[serde(rename = "endTime")]
    pub end_time: DateTime<Utc>,
    #[serde(rename = "completionStartTime")]
    pub completion_start_time: Option<DateTime<Utc>>,
    /// The upstream model.
    pub model: Arc<str>,
    /// The deployment id. This and the next three are the deployment's names, shared with
    /// it (`Arc`) rather than copied into every row: a row waits in the writer's queue until
    /// its batch is written, and fewer allocations there cost less on the request path.
    pub model_id: Arc<str>,
    pub model_group: Arc<str>,
    pub custom_llm_provider: Arc<str>,
    pub api_base: Arc<str>,
    /// The key's user.
    pub user: Option<String>,
    pub team_id: Option<String>,
    pub end_user: Option<String>,
    /// `success` or `failure`.
    pub status: Cow<'static, str>,
    pub status_code: u16,
    pub request_tags: Vec<String>,
}

impl SpendRow {
    /// The spend counters this row adds to, as (kind, id, model group): the group is set for
    /// a key's model group only, whose id is `key/group`. Borrowed, so that adding up a batch
    /// allocates per counter, not per row.
    fn counters(&self) -> impl Iterator<Item = (Kind, &str, Option<&str>)> {
        let group = Some(&*self.model_group).filter(|g| !g.is_empty());
        let key = Some(&*self.api_key).filter(|k| !k.is_empty());
        let owners = [
            (Kind::User, &self.user),
            (Kind::Team, &self.team_id),
            (Kind::Customer, &self.end_user),
        ]
        .into_iter()
        .filter_map(|(kind, id)| Some((kind, id.as_deref().filter(|i| !i.is_empty())?, None)));
        [
            Some((Kind::Global, GLOBAL_ID, None)),
            group.map(|g| (Kind::Model, g, None)),
            key.map(|k| (Kind::Key, k, None)),
            key.zip(group).map(|(k, g)| (Kind::KeyModel, k, Some(g))),
        ]
        .into_iter()
        .flatten()
        .chain(owners)
    }
}

/// Adds up the spend of many rows, one entry per counter (rows without spend add nothing).
pub fn total_increments(rows: &[SpendRow]) -> Vec<(Kind, String, f64)> {
    let mut sums: BTreeMap<(Kind, &str, Option<&str>), f64> = BTreeMap::new();
    for row in rows.iter().filter(|r| r.spend > 0.0) {
        for counter in row.counters() {
            *sums.entry(counter).or_default() += row.spend;
        }
    }
    sums.into_iter()
        .map(|((kind, id, group), s)| match group {
            Some(group) => (kind, format!("{id}/{group}"), s),
            None => (kind, id.to_string(), s),
        })
        .collect()
}

/// Filters for `/spend/logs` and the reports.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SpendQuery {
    pub api_key: Option<String>,
    pub user: Option<String>,
    pub team_id: Option<String>,
    pub end_user: Option<String>,
    pub request_id: Option<String>,
    pub start: Option<DateTime<Utc>>,
    pub end: Option<DateTime<Utc>>,
    pub limit: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database unavailable: {0}")]
    Unavailable(String),
    #[error("stored record is corrupt: {0}")]
    Corrupt(String),
}

/// Where tenancy state lives. SQLite (embedded default), Postgres and memory implement it and
/// pass one conformance suite. Nothing on the request path waits on a write through it.
#[async_trait]
pub trait Store: Send + Sync {
    async fn get(&self, kind: Kind, id: &str) -> Result<Option<Entity>, StoreError>;
    /// Creates an entity; `false` when one with this id exists (nothing is changed then).
    async fn insert(&self, kind: Kind, id: &str, doc: &Value) -> Result<bool, StoreError>;
    /// Replaces an entity's document, keeping its spend; `false` when it does not exist.
    async fn update(&self, kind: Kind, id: &str, doc: &Value) -> Result<bool, StoreError>;
    async fn delete(&self, kind: Kind, id: &str) -> Result<bool, StoreError>;
    async fn list(&self, kind: Kind) -> Result<Vec<Entity>, StoreError>;
    /// Sets spend and document at once (a budget reset, an import); creates when missing.
    async fn put_with_spend(
        &self,
        kind: Kind,
        id: &str,
        spend: f64,
        doc: &Value,
    ) -> Result<(), StoreError>;
    /// Appends spend rows and adds their increments, in one transaction. Rows whose
    /// `request_id` is already stored are skipped with their increments, so a batch whose
    /// commit was not acknowledged can be written again without counting twice.
    async fn write_spend(&self, rows: &[SpendRow]) -> Result<(), StoreError>;
    async fn spend_logs(&self, query: &SpendQuery) -> Result<Vec<SpendRow>, StoreError>;
    /// Entities changed after `seq` (insert, update, delete, reset), and the newest seq: how
    /// other instances learn that a cached key changed.
    async fn changes_since(&self, seq: i64) -> Result<(i64, Vec<(Kind, String)>), StoreError>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn key_record_reads_litellm_fields_and_spend_column() {
        let e = Entity {
            kind: Kind::Key,
            id: "ab".into(),
            spend: 1.5,
            doc: json!({"token": "ab", "max_budget": 10.0, "rpm_limit": 5,
                "model_max_budget": {"gpt-4o": 1.0, "m2": {"budget_limit": 2.0, "time_period": "1d"}},
                "models": ["gpt-4o"], "blocked": false}),
        };
        let k: KeyRecord = e.record().unwrap();
        assert_eq!(k.spend, 1.5);
        assert_eq!(k.limits.max_budget, Some(10.0));
        assert_eq!(k.limits.rpm_limit, Some(5));
        assert_eq!(k.limits.model_max_budget["gpt-4o"].limit(), 1.0);
        assert_eq!(k.limits.model_max_budget["m2"].limit(), 2.0);
    }

    #[test]
    fn increments_cover_every_level_once() {
        let row = SpendRow {
            request_id: "r".into(),
            api_key: "h".into(),
            spend: 0.25,
            model_group: "g".into(),
            user: Some("u".into()),
            team_id: Some("t".into()),
            end_user: Some("c".into()),
            ..Default::default()
        };
        let free = SpendRow {
            request_id: "f".into(),
            spend: 0.0,
            ..row.clone()
        };
        let inc = total_increments(&[row.clone(), free, row]);
        assert_eq!(inc.len(), 7);
        assert!(inc.iter().all(|(_, _, s)| *s == 0.5));
        assert!(inc.contains(&(Kind::KeyModel, "h/g".into(), 0.5)));
    }

    #[test]
    fn limits_inherit_only_unset_fields() {
        let mut own = Limits {
            rpm_limit: Some(1),
            ..Default::default()
        };
        own.inherit(&Limits {
            rpm_limit: Some(9),
            max_budget: Some(3.0),
            ..Default::default()
        });
        assert_eq!(own.rpm_limit, Some(1));
        assert_eq!(own.max_budget, Some(3.0));
    }
}
