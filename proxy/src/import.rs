//! `sluice import-litellm`: copies virtual keys, users, teams, team memberships, budgets and end
//! users from a LiteLLM Postgres database into Sluice's store, so a switch from LiteLLM keeps
//! every issued key working.
//!
//! LiteLLM stores keys only as SHA-256 hex (`LiteLLM_VerificationToken.token`), which is also how
//! Sluice stores them, so the hash is copied as it is and the plaintext is never needed. Field
//! names mostly match already (the record types in `sluice_filters::tenancy` use LiteLLM's
//! names); what differs is normalised here:
//!
//! - Rows are read as `row_to_json(t)`, so any LiteLLM version's columns come across without a
//!   per-column decoder; columns this version lacks are simply absent, and unknown ones are kept
//!   in the document (the management API answers them back, as LiteLLM would). SQL `NULL`s are
//!   dropped so the records' defaults apply; `password` is never copied.
//! - `spend` goes to the store's spend column ([`Store::put_with_spend`]), not the document.
//! - Prisma's `timestamp(3)` columns have no zone and hold UTC: they become RFC 3339 (`...Z`).
//! - `model_max_budget` entries in any shape LiteLLM wrote (a bare number, `budget_limit` /
//!   `time_period`, or `max_budget` / `budget_duration`, limits as numbers or numeric strings)
//!   become `{budget_limit, time_period}`; a key's `model_spend` becomes the per-key, per-model
//!   spend counters (`Kind::KeyModel`) that `model_max_budget` is enforced against.
//! - `LiteLLM_TeamMembership` rows fold into the team's `members_with_roles` and the user's
//!   `teams` where those do not list them already.
//!
//! Every document is checked by deserialising it into its typed record before it is written; a
//! row that does not fit is reported (table, id, why) and skipped, never fatal. Writes are
//! upserts keyed by LiteLLM's ids, so running the import again updates what it wrote before
//! (spend included: it is set to LiteLLM's figure again) instead of duplicating it. Entities
//! already in Sluice that LiteLLM does not have are left alone.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use chrono::{DateTime, NaiveDateTime, Utc};
use serde::Serialize;
use serde_json::{json, Map, Value};
use sluice_filters::period::Period;
use sluice_filters::tenancy::{
    BudgetRecord, CustomerRecord, KeyRecord, Kind, Store, TeamRecord, UserRecord,
};
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::Connection as _;

use crate::store::redact_url;

pub const KEY_TABLE: &str = "LiteLLM_VerificationToken";
pub const USER_TABLE: &str = "LiteLLM_UserTable";
pub const TEAM_TABLE: &str = "LiteLLM_TeamTable";
pub const MEMBERSHIP_TABLE: &str = "LiteLLM_TeamMembership";
pub const BUDGET_TABLE: &str = "LiteLLM_BudgetTable";
pub const END_USER_TABLE: &str = "LiteLLM_EndUserTable";

/// How long connecting to the LiteLLM database may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// Columns never copied: LiteLLM's UI login password hash has no use in Sluice and must not be
/// answered back by `/user/info`.
const DROPPED_COLUMNS: &[&str] = &["password"];

/// Object-valued columns that some LiteLLM versions wrote as JSON text.
const JSON_COLUMNS: &[&str] = &[
    "metadata",
    "aliases",
    "config",
    "permissions",
    "model_max_budget",
    "model_spend",
    "members_with_roles",
    "router_settings",
];

/// What one import did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ImportReport {
    pub keys: usize,
    pub users: usize,
    pub teams: usize,
    /// `LiteLLM_TeamMembership` rows read (folded into teams and users).
    pub team_memberships: usize,
    pub budgets: usize,
    /// End users (`LiteLLM_EndUserTable`).
    pub customers: usize,
    /// Per-key, per-model spend counters taken from the keys' `model_spend`.
    pub key_model_spend: usize,
    /// Optional tables the source database does not have.
    pub missing_tables: Vec<String>,
    /// Rows not imported, with the reason.
    pub skipped: Vec<RowNote>,
    /// Rows imported with something left out or not understood.
    pub warnings: Vec<RowNote>,
}

/// One row the report mentions.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RowNote {
    pub table: &'static str,
    pub id: String,
    pub reason: String,
}

impl fmt::Display for ImportReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "imported from LiteLLM:")?;
        for (what, n) in [
            ("keys", self.keys),
            ("users", self.users),
            ("teams", self.teams),
            ("team memberships", self.team_memberships),
            ("budgets", self.budgets),
            ("end users", self.customers),
            ("key model spend", self.key_model_spend),
        ] {
            writeln!(f, "  {what:<17} {n}")?;
        }
        for table in &self.missing_tables {
            writeln!(f, "table {table:?} not found: nothing imported from it")?;
        }
        if !self.skipped.is_empty() {
            writeln!(f, "skipped {} row(s):", self.skipped.len())?;
            for n in &self.skipped {
                writeln!(f, "  {} {}: {}", n.table, n.id, n.reason)?;
            }
        }
        if !self.warnings.is_empty() {
            writeln!(f, "warnings:")?;
            for n in &self.warnings {
                writeln!(f, "  {} {}: {}", n.table, n.id, n.reason)?;
            }
        }
        Ok(())
    }
}

/// Connects to the LiteLLM database. Prisma's `?schema=NAME` URL parameter (LiteLLM's way to use
/// a schema other than `public`) becomes the connection's `search_path`.
pub async fn connect_source(url: &str) -> anyhow::Result<PgConnection> {
    let fail = || {
        format!(
            "cannot connect to the LiteLLM database at {}",
            redact_url(url)
        )
    };
    let (url_without_schema, schema) = split_schema_param(url);
    let mut options: PgConnectOptions = url_without_schema.parse().with_context(fail)?;
    if let Some(schema) = schema {
        options = options.options([("search_path", schema.as_str())]);
    }
    // One connection: the import reads table after table, and a refused connection should
    // fail at once rather than be retried the way a pool would.
    match tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect_with(&options)).await {
        Ok(connected) => connected.with_context(fail),
        Err(_) => Err(anyhow::anyhow!("no answer in {CONNECT_TIMEOUT:?}")).with_context(fail),
    }
}

/// `url` without its `schema=` query parameter, and that parameter's value.
fn split_schema_param(url: &str) -> (String, Option<String>) {
    let Some((base, query)) = url.split_once('?') else {
        return (url.to_string(), None);
    };
    let mut schema = None;
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| match pair.split_once('=') {
            Some(("schema", v)) if !v.is_empty() => {
                schema = Some(v.to_string());
                false
            }
            _ => true,
        })
        .collect();
    if kept.is_empty() {
        (base.to_string(), schema)
    } else {
        (format!("{base}?{}", kept.join("&")), schema)
    }
}

/// Connects to `source_url` and imports everything (see the module docs).
pub async fn import_litellm(
    source_url: &str,
    target: Arc<dyn Store>,
) -> anyhow::Result<ImportReport> {
    let mut source = connect_source(source_url).await?;
    let report = import_from(&mut source, target).await;
    let _ = source.close().await;
    report
}

/// Tables without which the source is not a LiteLLM database.
const REQUIRED_TABLES: [&str; 3] = [KEY_TABLE, USER_TABLE, TEAM_TABLE];

/// Fails, naming the table, unless the source has LiteLLM's required tables: checked before
/// anything is written, so a wrong URL changes nothing.
pub async fn check_source(source: &mut PgConnection) -> anyhow::Result<()> {
    for table in REQUIRED_TABLES {
        let found: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(format!("\"{table}\""))
            .fetch_one(&mut *source)
            .await
            .with_context(|| format!("looking for table \"{table}\""))?;
        if !found {
            anyhow::bail!("{}", missing_required(table));
        }
    }
    Ok(())
}

fn missing_required(table: &str) -> String {
    format!(
        "table \"{table}\" not found: is this LiteLLM's database (and, for a schema other than \
         public, does the URL say ?schema=NAME)?"
    )
}

/// A row on its way in: its id, spend and document.
struct Row {
    id: String,
    /// The column `id` came from.
    id_column: &'static str,
    spend: f64,
    doc: Map<String, Value>,
}

/// Imports from an open LiteLLM database into `target`.
pub async fn import_from(
    source: &mut PgConnection,
    target: Arc<dyn Store>,
) -> anyhow::Result<ImportReport> {
    check_source(source).await?;
    let mut report = ImportReport::default();

    // Budgets.
    let budgets = read_table(source, BUDGET_TABLE, false, &mut report).await?;
    for row in prepare_all(BUDGET_TABLE, "budget_id", budgets, &mut report) {
        if let Some(row) = validate::<BudgetRecord>(BUDGET_TABLE, row, &mut report) {
            put(&*target, Kind::Budget, &row).await?;
            report.budgets += 1;
        }
    }

    // Users and teams, with memberships folded in before either is written.
    let users = read_table(source, USER_TABLE, true, &mut report).await?;
    let mut users = prepare_all(USER_TABLE, "user_id", users, &mut report);
    let teams = read_table(source, TEAM_TABLE, true, &mut report).await?;
    let mut teams = prepare_all(TEAM_TABLE, "team_id", teams, &mut report);
    for team in &mut teams {
        normalize_members(&mut team.doc);
    }
    let memberships = read_table(source, MEMBERSHIP_TABLE, false, &mut report).await?;
    report.team_memberships = fold_memberships(memberships, &mut users, &mut teams, &mut report);
    for row in users {
        if let Some(row) = validate::<UserRecord>(USER_TABLE, row, &mut report) {
            put(&*target, Kind::User, &row).await?;
            report.users += 1;
        }
    }
    for row in teams {
        if let Some(row) = validate::<TeamRecord>(TEAM_TABLE, row, &mut report) {
            put(&*target, Kind::Team, &row).await?;
            report.teams += 1;
        }
    }

    // End users.
    let end_users = read_table(source, END_USER_TABLE, false, &mut report).await?;
    for row in prepare_all(END_USER_TABLE, "user_id", end_users, &mut report) {
        if let Some(row) = validate::<CustomerRecord>(END_USER_TABLE, row, &mut report) {
            put(&*target, Kind::Customer, &row).await?;
            report.customers += 1;
        }
    }

    // Keys, and their per-model spend.
    let keys = read_table(source, KEY_TABLE, true, &mut report).await?;
    for mut row in prepare_all(KEY_TABLE, "token", keys, &mut report) {
        let model_spend = row.doc.remove("model_spend");
        let Some(row) = validate::<KeyRecord>(KEY_TABLE, row, &mut report) else {
            continue;
        };
        put(&*target, Kind::Key, &row).await?;
        report.keys += 1;
        for (model, spend) in model_spend_entries(model_spend, &row.id, &mut report) {
            let id = format!("{}/{model}", row.id);
            target
                .put_with_spend(Kind::KeyModel, &id, spend, &json!({}))
                .await
                .with_context(|| format!("writing the model spend of key {}", row.id))?;
            report.key_model_spend += 1;
        }
    }
    Ok(report)
}

async fn put(target: &dyn Store, kind: Kind, row: &Row) -> anyhow::Result<()> {
    target
        .put_with_spend(kind, &row.id, row.spend, &Value::Object(row.doc.clone()))
        .await
        .with_context(|| format!("writing {} {}", kind.as_str(), row.id))
}

/// Every row of `table` as a JSON object; an empty list for a missing optional table (noted in
/// the report), an error for a missing required one.
async fn read_table(
    source: &mut PgConnection,
    table: &'static str,
    required: bool,
    report: &mut ImportReport,
) -> anyhow::Result<Vec<(usize, Map<String, Value>)>> {
    let sql = format!("SELECT row_to_json(t)::text FROM \"{table}\" t");
    let texts: Vec<String> = match sqlx::query_scalar(&sql).fetch_all(&mut *source).await {
        Ok(rows) => rows,
        Err(e) if is_undefined_table(&e) && !required => {
            report.missing_tables.push(table.to_string());
            return Ok(vec![]);
        }
        Err(e) if is_undefined_table(&e) => anyhow::bail!("{}", missing_required(table)),
        Err(e) => return Err(e).with_context(|| format!("reading \"{table}\"")),
    };
    let mut rows = Vec::with_capacity(texts.len());
    for (n, text) in texts.into_iter().enumerate() {
        match serde_json::from_str::<Value>(&text) {
            Ok(Value::Object(m)) => rows.push((n + 1, m)),
            other => report.skipped.push(RowNote {
                table,
                id: format!("row {}", n + 1),
                reason: format!("not a JSON object: {other:?}"),
            }),
        }
    }
    Ok(rows)
}

fn is_undefined_table(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.code().as_deref() == Some("42P01"))
}

fn prepare_all(
    table: &'static str,
    id_column: &'static str,
    rows: Vec<(usize, Map<String, Value>)>,
    report: &mut ImportReport,
) -> Vec<Row> {
    let mut out = Vec::with_capacity(rows.len());
    for (n, row) in rows {
        let id_for_report = match row.get(id_column) {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            _ => format!("row {n}"),
        };
        match prepare(table, id_column, row, &id_for_report, report) {
            Ok(row) => out.push(row),
            Err(reason) => report.skipped.push(RowNote {
                table,
                id: id_for_report,
                reason,
            }),
        }
    }
    out
}

/// Normalises one row (see the module docs); `Err` says why it cannot be imported.
fn prepare(
    table: &'static str,
    id_column: &'static str,
    mut doc: Map<String, Value>,
    id_for_report: &str,
    report: &mut ImportReport,
) -> Result<Row, String> {
    doc.retain(|k, v| !v.is_null() && !DROPPED_COLUMNS.contains(&k.as_str()));
    let id = match doc.get(id_column) {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(other) => return Err(format!("{id_column} is not a non-empty string: {other}")),
        None => return Err(format!("no {id_column}")),
    };
    let spend = match doc.remove("spend") {
        None => 0.0,
        Some(Value::Number(n)) => n
            .as_f64()
            .filter(|s| s.is_finite())
            .ok_or_else(|| format!("spend is not a finite number: {n}"))?,
        Some(other) => return Err(format!("spend is not a number: {other}")),
    };
    for (column, value) in doc.iter_mut() {
        if JSON_COLUMNS.contains(&column.as_str()) {
            unwrap_json_text(value);
        }
        if is_time_column(column) {
            if let Value::String(s) = value {
                // Left as it is when unreadable: a column the records use then fails
                // validation with serde's message; any other one is kept verbatim.
                if let Some(t) = parse_time(s) {
                    *value = json!(t);
                }
            }
        }
    }
    if let Some(budgets) = doc.get_mut("model_max_budget") {
        for dropped in normalize_model_max_budget(budgets) {
            report.warnings.push(RowNote {
                table,
                id: id_for_report.to_string(),
                reason: dropped,
            });
        }
    }
    if let Some(Value::String(d)) = doc.get("budget_duration") {
        if let Err(e) = Period::parse(d) {
            report.warnings.push(RowNote {
                table,
                id: id_for_report.to_string(),
                reason: format!("budget_duration {d:?} not understood ({e}): spend will not reset"),
            });
        }
    }
    Ok(Row {
        id,
        id_column,
        spend,
        doc,
    })
}

/// Checks a document against its typed record; reports and drops the row when it does not fit.
fn validate<T: serde::de::DeserializeOwned>(
    table: &'static str,
    row: Row,
    report: &mut ImportReport,
) -> Option<Row> {
    let Err(e) = serde_json::from_value::<T>(Value::Object(row.doc.clone())) else {
        return Some(row);
    };
    // serde's message does not name a field of a flattened struct: find the column that does
    // not fit on its own.
    let culprit = row
        .doc
        .iter()
        .filter(|(column, _)| column.as_str() != row.id_column)
        .find_map(|(column, value)| {
            let mut alone = Map::new();
            alone.insert(row.id_column.to_string(), json!(row.id));
            alone.insert(column.clone(), value.clone());
            let err = serde_json::from_value::<T>(Value::Object(alone)).err()?;
            Some(format!("{column}: {err}"))
        });
    report.skipped.push(RowNote {
        table,
        id: row.id,
        reason: culprit.unwrap_or_else(|| e.to_string()),
    });
    None
}

/// `expires`, `last_active` and every `*_at` column are timestamps.
fn is_time_column(column: &str) -> bool {
    column == "expires" || column == "last_active" || column.ends_with("_at")
}

/// A Postgres timestamp as `row_to_json` writes it: with an offset (`timestamptz`) or without
/// one (`timestamp`, which Prisma fills with UTC).
fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.with_timezone(&Utc));
    }
    if let Ok(t) = DateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f%#z") {
        return Some(t.with_timezone(&Utc));
    }
    ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"]
        .iter()
        .find_map(|f| NaiveDateTime::parse_from_str(s, f).ok())
        .map(|t| t.and_utc())
}

/// A JSON column holding JSON text (`"{\"a\": 1}"`) becomes the value that text spells.
fn unwrap_json_text(value: &mut Value) {
    if let Value::String(s) = value {
        let t = s.trim_start();
        if t.starts_with('{') || t.starts_with('[') {
            if let Ok(v) = serde_json::from_str::<Value>(s) {
                *value = v;
            }
        }
    }
}

/// Rewrites `model_max_budget` entries to `{budget_limit, time_period}` (or a bare number);
/// returns a message for each entry dropped because it names no usable limit (LiteLLM ignores
/// those too).
fn normalize_model_max_budget(budgets: &mut Value) -> Vec<String> {
    let mut dropped = vec![];
    let Value::Object(map) = budgets else {
        // Not an object: left for validation to report.
        return dropped;
    };
    let entries = std::mem::take(map);
    for (model, entry) in entries {
        let limit_of = |v: Option<&Value>| match v {
            Some(Value::Number(n)) => n.as_f64(),
            Some(Value::String(s)) => s.trim().parse::<f64>().ok(),
            _ => None,
        };
        let normalized = match &entry {
            Value::Number(_) => Some(entry.clone()),
            Value::String(_) => limit_of(Some(&entry)).map(Value::from),
            Value::Object(o) => {
                let limit =
                    limit_of(o.get("budget_limit")).or_else(|| limit_of(o.get("max_budget")));
                let period = o
                    .get("time_period")
                    .or_else(|| o.get("budget_duration"))
                    .and_then(Value::as_str);
                limit.map(|l| json!({"budget_limit": l, "time_period": period}))
            }
            _ => None,
        };
        match normalized {
            Some(v) => {
                map.insert(model, v);
            }
            None => dropped.push(format!(
                "model_max_budget entry for {model:?} has no usable limit ({entry}): left out"
            )),
        }
    }
    dropped
}

/// LiteLLM's column default for `members_with_roles` is `{}`: no members. Nulls inside members
/// are dropped so the member defaults apply.
fn normalize_members(team: &mut Map<String, Value>) {
    match team.get_mut("members_with_roles") {
        Some(Value::Object(o)) if o.is_empty() => {
            team.insert("members_with_roles".into(), json!([]));
        }
        Some(Value::Array(members)) => {
            for m in members.iter_mut() {
                if let Value::Object(m) = m {
                    m.retain(|_, v| !v.is_null());
                }
            }
        }
        _ => {}
    }
}

/// Adds each membership to its team's `members_with_roles` and its user's `teams` where they
/// do not list it yet. Returns how many membership rows were read.
fn fold_memberships(
    rows: Vec<(usize, Map<String, Value>)>,
    users: &mut [Row],
    teams: &mut [Row],
    report: &mut ImportReport,
) -> usize {
    let user_index: HashMap<String, usize> = users
        .iter()
        .enumerate()
        .map(|(i, r)| (r.id.clone(), i))
        .collect();
    let team_index: HashMap<String, usize> = teams
        .iter()
        .enumerate()
        .map(|(i, r)| (r.id.clone(), i))
        .collect();
    let mut read = 0;
    for (n, row) in rows {
        let get = |k: &str| row.get(k).and_then(Value::as_str).filter(|s| !s.is_empty());
        let (Some(user_id), Some(team_id)) = (get("user_id"), get("team_id")) else {
            report.skipped.push(RowNote {
                table: MEMBERSHIP_TABLE,
                id: format!("row {n}"),
                reason: "no user_id or team_id".into(),
            });
            continue;
        };
        read += 1;
        if let Some(&t) = team_index.get(team_id) {
            let team = &mut teams[t].doc;
            let admins = team
                .get("admins")
                .and_then(Value::as_array)
                .is_some_and(|a| a.iter().any(|x| x.as_str() == Some(user_id)));
            let members = team
                .entry("members_with_roles")
                .or_insert_with(|| json!([]));
            if let Value::Array(members) = members {
                let listed = members
                    .iter()
                    .any(|m| m.get("user_id").and_then(Value::as_str) == Some(user_id));
                if !listed {
                    let mut member = json!({
                        "role": if admins { "admin" } else { "user" },
                        "user_id": user_id,
                    });
                    if let Some(b) = get("budget_id") {
                        member["budget_id"] = json!(b);
                    }
                    members.push(member);
                }
            }
        }
        if let Some(&u) = user_index.get(user_id) {
            let user = &mut users[u].doc;
            let teams = user.entry("teams").or_insert_with(|| json!([]));
            if let Value::Array(list) = teams {
                if !list.iter().any(|t| t.as_str() == Some(team_id)) {
                    list.push(json!(team_id));
                }
            }
        }
    }
    read
}

/// The `(model, spend)` pairs of a key's `model_spend` with spend above zero.
fn model_spend_entries(
    model_spend: Option<Value>,
    token: &str,
    report: &mut ImportReport,
) -> Vec<(String, f64)> {
    let mut value = match model_spend {
        None => return vec![],
        Some(v) => v,
    };
    unwrap_json_text(&mut value);
    let Value::Object(map) = value else {
        report.warnings.push(RowNote {
            table: KEY_TABLE,
            id: token.to_string(),
            reason: format!("model_spend is not an object ({value}): left out"),
        });
        return vec![];
    };
    let mut out: BTreeMap<String, f64> = BTreeMap::new();
    for (model, spend) in map {
        match spend.as_f64() {
            Some(s) if s.is_finite() && s > 0.0 => {
                out.insert(model, s);
            }
            Some(_) => {}
            None => report.warnings.push(RowNote {
                table: KEY_TABLE,
                id: token.to_string(),
                reason: format!("model_spend for {model:?} is not a number ({spend}): left out"),
            }),
        }
    }
    out.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_with_and_without_zone_become_utc() {
        let want: DateTime<Utc> = "2025-01-02T03:04:05.678Z".parse().unwrap();
        for s in [
            "2025-01-02T03:04:05.678",
            "2025-01-02T03:04:05.678+00:00",
            "2025-01-02T05:04:05.678+02:00",
            "2025-01-02T05:04:05.678+02",
            "2025-01-02 03:04:05.678",
        ] {
            assert_eq!(parse_time(s), Some(want), "{s}");
        }
        assert_eq!(parse_time("soon"), None);
    }

    #[test]
    fn model_max_budget_shapes_normalise() {
        let mut v = json!({
            "a": 1.5,
            "b": {"budget_limit": "0.25", "time_period": "1d"},
            "c": {"max_budget": 2, "budget_duration": "30d", "tpm_limit": null},
            "d": {"max_budget": null},
        });
        let dropped = normalize_model_max_budget(&mut v);
        assert_eq!(dropped.len(), 1, "{dropped:?}");
        assert_eq!(
            v,
            json!({
                "a": 1.5,
                "b": {"budget_limit": 0.25, "time_period": "1d"},
                "c": {"budget_limit": 2.0, "time_period": "30d"},
            })
        );
        let limits: BTreeMap<String, sluice_filters::tenancy::ModelBudget> =
            serde_json::from_value(v).unwrap();
        assert_eq!(limits["c"].limit(), 2.0);
    }

    #[test]
    fn prepare_moves_spend_drops_nulls_and_password() {
        let mut report = ImportReport::default();
        let row = json!({"user_id": "u", "spend": 2.5, "password": "x", "max_budget": null,
            "metadata": "{\"a\": 1}", "created_at": "2025-01-02T03:04:05.678"});
        let Value::Object(row) = row else {
            unreachable!()
        };
        let r = prepare(USER_TABLE, "user_id", row, "u", &mut report).unwrap();
        assert_eq!(r.id, "u");
        assert_eq!(r.spend, 2.5);
        assert_eq!(
            Value::Object(r.doc.clone()),
            json!({"user_id": "u", "metadata": {"a": 1}, "created_at": "2025-01-02T03:04:05.678Z"})
        );
        assert!(validate::<UserRecord>(USER_TABLE, r, &mut report).is_some());
        assert!(report.skipped.is_empty());
    }

    #[test]
    fn rows_that_do_not_fit_are_reported() {
        let mut report = ImportReport::default();
        let rows = vec![
            (
                1,
                json!({"token": "t1", "rpm_limit": -1})
                    .as_object()
                    .unwrap()
                    .clone(),
            ),
            (
                2,
                json!({"key_alias": "no token"})
                    .as_object()
                    .unwrap()
                    .clone(),
            ),
            (
                3,
                json!({"token": "t3", "spend": "lots"})
                    .as_object()
                    .unwrap()
                    .clone(),
            ),
            (
                4,
                json!({"token": "t4", "models": ["m"]})
                    .as_object()
                    .unwrap()
                    .clone(),
            ),
        ];
        let kept: Vec<Row> = prepare_all(KEY_TABLE, "token", rows, &mut report)
            .into_iter()
            .filter_map(|r| validate::<KeyRecord>(KEY_TABLE, r, &mut report))
            .collect();
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].id, "t4");
        let ids: Vec<&str> = report.skipped.iter().map(|n| n.id.as_str()).collect();
        assert_eq!(ids, ["row 2", "t3", "t1"]);
        assert!(
            report.skipped[2].reason.starts_with("rpm_limit: "),
            "{:?}",
            report.skipped
        );
    }

    #[test]
    fn memberships_fold_into_teams_and_users_once() {
        let mut report = ImportReport::default();
        let mut users = vec![Row {
            id: "u1".into(),
            id_column: "user_id",
            spend: 0.0,
            doc: json!({"user_id": "u1", "teams": ["t0"]})
                .as_object()
                .unwrap()
                .clone(),
        }];
        let mut teams = vec![Row {
            id: "t1".into(),
            id_column: "team_id",
            spend: 0.0,
            doc: json!({"team_id": "t1", "admins": ["u1"], "members_with_roles": {}})
                .as_object()
                .unwrap()
                .clone(),
        }];
        normalize_members(&mut teams[0].doc);
        let m = json!({"user_id": "u1", "team_id": "t1", "budget_id": "b"});
        let rows = vec![
            (1, m.as_object().unwrap().clone()),
            (2, m.as_object().unwrap().clone()),
        ];
        assert_eq!(
            fold_memberships(rows, &mut users, &mut teams, &mut report),
            2
        );
        assert_eq!(users[0].doc["teams"], json!(["t0", "t1"]));
        assert_eq!(
            teams[0].doc["members_with_roles"],
            json!([{"role": "admin", "user_id": "u1", "budget_id": "b"}])
        );
    }

    #[test]
    fn schema_parameter_becomes_search_path() {
        assert_eq!(
            split_schema_param("postgres://u@h/db?schema=litellm&sslmode=disable"),
            (
                "postgres://u@h/db?sslmode=disable".to_string(),
                Some("litellm".to_string())
            )
        );
        assert_eq!(
            split_schema_param("postgres://u@h/db?schema=x"),
            ("postgres://u@h/db".to_string(), Some("x".to_string()))
        );
        assert_eq!(
            split_schema_param("postgres://u@h/db"),
            ("postgres://u@h/db".to_string(), None)
        );
    }
}
