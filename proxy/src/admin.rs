//! The management API in LiteLLM's request and response shapes: keys, users, teams, end users
//! (customers), budgets and spend. Admins (the master key, an admin JWT, or a key whose user is
//! a `proxy_admin`) may call all of it; any other key may only read its own `/key/info`.

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{DateTime, NaiveDate, Utc};
use pingora::proxy::Session;
use rand::RngCore;
use serde_json::{json, Map, Value};
use sluice_filters::auth::Principal;
use sluice_filters::period::Period;
use sluice_filters::tenancy::{
    BudgetRecord, CustomerRecord, Entity, KeyRecord, Kind, SpendQuery, SpendRow, TeamMember,
    TeamRecord, UserRecord,
};
use sluice_filters::{hash_key, ApiError};

use crate::app::App;
use crate::gateway::{query_param, read_body, Ctx};
use crate::tenancy::Tenancy;

type Out = Result<Value, ApiError>;

fn forbidden(route: &str) -> ApiError {
    ApiError::new(
        403,
        "auth_error",
        format!("Only proxy admins can call {route}; this key is not an admin key."),
    )
}

fn store_error(e: sluice_filters::tenancy::StoreError) -> ApiError {
    ApiError::new(503, "service_unavailable", e.to_string())
}

fn not_found(what: &str, id: &str) -> ApiError {
    ApiError::not_found(format!("{what} not found: {id}"))
}

/// A new key: `sk-` and 32 random bytes, URL-safe (256 bits).
pub fn new_key() -> String {
    use base64::Engine;
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    format!(
        "sk-{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

fn masked(key: &str) -> String {
    let tail: String = key
        .chars()
        .rev()
        .take(4)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    format!("sk-...{tail}")
}

/// A raw key (`sk-...`) or its hash, as admin routes accept both.
fn token_of(key: &str) -> String {
    let is_hash = key.len() == 64 && key.bytes().all(|b| b.is_ascii_hexdigit());
    if is_hash {
        key.to_ascii_lowercase()
    } else {
        hash_key(key)
    }
}

fn period(v: &Value, field: &str) -> Result<Option<Period>, ApiError> {
    match v {
        Value::Null => Ok(None),
        Value::String(s) => Period::parse(s)
            .map(Some)
            .map_err(|e| ApiError::bad_request(format!("{field}: {e}")).with_param(field)),
        _ => Err(
            ApiError::bad_request(format!("{field}: expected a duration like 30d"))
                .with_param(field),
        ),
    }
}

fn body_map(raw: &[u8]) -> Result<Map<String, Value>, ApiError> {
    if raw.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match serde_json::from_slice::<Value>(raw) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ApiError::bad_request("Request body must be a JSON object")),
        Err(e) => Err(ApiError::bad_request(format!(
            "Invalid request body: malformed JSON: {e}"
        ))),
    }
}

fn typed<T: serde::de::DeserializeOwned>(
    doc: &Map<String, Value>,
    what: &str,
) -> Result<T, ApiError> {
    serde_json::from_value(Value::Object(doc.clone()))
        .map_err(|e| ApiError::bad_request(format!("Invalid {what}: {e}")))
}

/// Applies `budget_duration` (sets the first reset) and drops fields that are computed.
fn apply_budget_duration(doc: &mut Map<String, Value>, now: DateTime<Utc>) -> Result<(), ApiError> {
    if let Some(v) = doc.get("budget_duration").cloned() {
        match period(&v, "budget_duration")? {
            Some(p) => {
                doc.insert("budget_reset_at".into(), json!(p.after(now)));
            }
            None => {
                doc.insert("budget_reset_at".into(), Value::Null);
            }
        }
    }
    Ok(())
}

fn str_list(v: Option<&Value>) -> Vec<String> {
    match v {
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_str().map(str::to_string))
            .collect(),
        Some(Value::String(s)) => vec![s.clone()],
        _ => vec![],
    }
}

fn required_str(m: &Map<String, Value>, field: &str) -> Result<String, ApiError> {
    m.get(field)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .ok_or_else(|| {
            ApiError::bad_request(format!("Missing required parameter: '{field}'"))
                .with_param(field)
        })
}

pub async fn handle(
    app: &App,
    session: &mut Session,
    ctx: &mut Ctx,
    principal: &Principal,
    method: &str,
    path: &str,
    full_path: &str,
) -> Result<(), ApiError> {
    let Some(t) = app.tenancy.as_ref() else {
        return Err(ApiError::new(
            400,
            "bad_request_error",
            "Management routes need a master_key (general_settings.master_key or LITELLM_MASTER_KEY).",
        ));
    };
    let get = method.eq_ignore_ascii_case("GET");
    let raw = if get {
        bytes::Bytes::new()
    } else {
        read_body(session, app.max_request_bytes).await?
    };
    let body = body_map(&raw)?;
    let q = |name: &str| query_param(full_path, name);
    let path = path.replace("/end_user/", "/customer/");

    // Non-admins may read their own key and nothing else.
    if !principal.admin {
        let own = path == "/key/info"
            && q("key")
                .is_none_or(|k| Some(token_of(&k).as_str()) == principal.key_hash.as_deref());
        if !own {
            return Err(forbidden(&path));
        }
    }
    let out = match (get, path.as_str()) {
        (false, "/key/generate") => key_generate(t, body, None).await,
        (_, "/key/info") => {
            let token = match q("key") {
                Some(k) => token_of(&k),
                None => principal
                    .key_hash
                    .as_deref()
                    .map(str::to_string)
                    .ok_or_else(|| ApiError::bad_request("Missing required parameter: 'key'"))?,
            };
            let info = key_object(t, &token).await?;
            Ok(json!({"key": q("key").unwrap_or(token), "info": info}))
        }
        (false, "/key/update") => key_update(t, body).await,
        (false, "/key/delete") => key_delete(t, body).await,
        (_, "/key/list") => key_list(t, &q).await,
        (false, "/key/block") => key_set_blocked(t, body, true).await,
        (false, "/key/unblock") => key_set_blocked(t, body, false).await,
        (false, p)
            if p == "/key/regenerate" || (p.starts_with("/key/") && p.ends_with("/regenerate")) =>
        {
            let mut body = body;
            if let Some(k) = p
                .strip_prefix("/key/")
                .and_then(|r| r.strip_suffix("/regenerate"))
                .filter(|k| !k.is_empty())
            {
                body.insert("key".into(), json!(k));
            }
            key_regenerate(t, body).await
        }
        (false, "/user/new") => user_new(t, body).await,
        (_, "/user/info") => {
            user_info(
                t,
                &q("user_id")
                    .or_else(|| {
                        body.get("user_id")
                            .and_then(Value::as_str)
                            .map(str::to_string)
                    })
                    .ok_or_else(|| {
                        ApiError::bad_request("Missing required parameter: 'user_id'")
                    })?,
            )
            .await
        }
        (false, "/user/update") => user_update(t, body).await,
        (false, "/user/delete") => delete_many(t, Kind::User, &body, "user_ids").await,
        (_, "/user/list") => list_of(t, Kind::User, "users").await,
        (false, "/team/new") => team_new(t, body).await,
        (_, "/team/info") => {
            team_info(
                t,
                &q("team_id").ok_or_else(|| {
                    ApiError::bad_request("Missing required parameter: 'team_id'")
                })?,
            )
            .await
        }
        (false, "/team/update") => merge_update(t, Kind::Team, body, "team_id").await,
        (false, "/team/delete") => delete_many(t, Kind::Team, &body, "team_ids").await,
        (_, "/team/list") => list_plain(t, Kind::Team).await,
        (false, "/team/member_add") => team_member_add(t, body).await,
        (false, "/team/member_delete") => team_member_delete(t, body).await,
        (false, "/customer/new") => customer_new(t, body).await,
        (_, "/customer/info") => {
            let id = q("end_user_id").or_else(|| q("user_id")).ok_or_else(|| {
                ApiError::bad_request("Missing required parameter: 'end_user_id'")
            })?;
            entity_json(t, Kind::Customer, &id).await
        }
        (false, "/customer/update") => merge_update(t, Kind::Customer, body, "user_id").await,
        (false, "/customer/delete") => delete_many(t, Kind::Customer, &body, "user_ids").await,
        (false, "/customer/block") => customers_set_blocked(t, &body, true).await,
        (false, "/customer/unblock") => customers_set_blocked(t, &body, false).await,
        (_, "/customer/list") => list_plain(t, Kind::Customer).await,
        (false, "/budget/new") => budget_new(t, body).await,
        (_, "/budget/info") => {
            let ids = match q("budget_id") {
                Some(id) => vec![id],
                None => str_list(body.get("budgets")),
            };
            let mut out = vec![];
            for id in ids {
                out.push(entity_json(t, Kind::Budget, &id).await?);
            }
            Ok(Value::Array(out))
        }
        (false, "/budget/update") => merge_update(t, Kind::Budget, body, "budget_id").await,
        (false, "/budget/delete") => {
            let id = required_str(&body, "id").or_else(|_| required_str(&body, "budget_id"))?;
            delete_many(
                t,
                Kind::Budget,
                &json!({"ids": [id]})
                    .as_object()
                    .cloned()
                    .unwrap_or_default(),
                "ids",
            )
            .await
        }
        (_, "/budget/list") => list_plain(t, Kind::Budget).await,
        (_, "/spend/logs") => spend_logs(t, &q).await,
        (_, "/global/spend") => {
            let (spend, max) = t.global_spend().await;
            Ok(json!({"spend": spend, "max_budget": max}))
        }
        (_, "/global/spend/report") => spend_report(t, &q).await,
        _ => Err(ApiError::not_found(format!(
            "Route not found: {method} {path}"
        ))),
    }?;
    ctx.status = 200;
    crate::respond::send_json(
        session,
        200,
        &ctx.call_id,
        serde_json::to_vec(&out).expect("json serializes"),
        &[],
    )
    .await;
    Ok(())
}

/// Fields a key body may set; everything else in a body is ignored.
const KEY_FIELDS: &[&str] = &[
    "key_alias",
    "models",
    "aliases",
    "config",
    "max_budget",
    "soft_budget",
    "budget_duration",
    "budget_id",
    "user_id",
    "team_id",
    "tpm_limit",
    "rpm_limit",
    "max_parallel_requests",
    "model_max_budget",
    "model_rpm_limit",
    "model_tpm_limit",
    "allowed_routes",
    "allowed_cache_controls",
    "metadata",
    "tags",
    "blocked",
    "spend",
];

/// `default_key_generate_params` fill gaps; `upperbound_key_generate_params` cap numbers.
fn key_defaults_and_bounds(t: &Tenancy, body: &mut Map<String, Value>) -> Result<(), ApiError> {
    for (k, v) in &t.settings.default_key_generate_params {
        if body.get(k).is_none_or(Value::is_null) {
            body.insert(k.clone(), v.clone());
        }
    }
    check_key_bounds(t, body)
}

/// `upperbound_key_generate_params` caps what a key body may set (generate and update).
fn check_key_bounds(t: &Tenancy, body: &Map<String, Value>) -> Result<(), ApiError> {
    for (k, bound) in &t.settings.upperbound_key_generate_params {
        if let (Some(limit), Some(v)) = (bound.as_f64(), body.get(k).and_then(Value::as_f64)) {
            if v > limit {
                return Err(ApiError::bad_request(format!(
                    "{k} is over the limit set by upperbound_key_generate_params: {v} > {limit}"
                ))
                .with_param(k.clone()));
            }
        }
    }
    Ok(())
}

async fn key_generate(t: &Tenancy, mut body: Map<String, Value>, key: Option<String>) -> Out {
    key_defaults_and_bounds(t, &mut body)?;
    let now = Utc::now();
    let key = match key.or_else(|| body.get("key").and_then(Value::as_str).map(str::to_string)) {
        Some(k) if !k.starts_with("sk-") => {
            return Err(ApiError::bad_request("Custom keys must start with 'sk-'").with_param("key"))
        }
        Some(k) => k,
        None => new_key(),
    };
    let token = hash_key(&key);
    let mut doc: Map<String, Value> = body
        .iter()
        .filter(|(k, _)| KEY_FIELDS.contains(&k.as_str()) && k.as_str() != "spend")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    doc.insert("token".into(), json!(token));
    doc.insert("key_name".into(), json!(masked(&key)));
    doc.insert("created_at".into(), json!(now));
    doc.insert("updated_at".into(), json!(now));
    if let Some(d) = body.get("duration") {
        doc.insert(
            "expires".into(),
            json!(period(d, "duration")?.map(|p| p.after(now))),
        );
    }
    apply_budget_duration(&mut doc, now)?;
    let record: KeyRecord = typed(&doc, "key")?;
    check_alias_free(t, record.key_alias.as_deref(), None).await?;
    if let Some(team) = &record.team_id {
        if t.store
            .get(Kind::Team, team)
            .await
            .map_err(store_error)?
            .is_none()
        {
            return Err(
                ApiError::bad_request(format!("Team not found: team_id={team}"))
                    .with_param("team_id"),
            );
        }
    }
    if !t
        .store
        .insert(Kind::Key, &token, &Value::Object(doc))
        .await
        .map_err(store_error)?
    {
        return Err(ApiError::bad_request("This key already exists").with_param("key"));
    }
    t.invalidate(Kind::Key, &token);
    let mut out = serde_json::to_value(&record).expect("json");
    let m = out.as_object_mut().expect("object");
    m.insert("key".into(), json!(key));
    m.insert("token_id".into(), json!(token));
    m.insert(
        "duration".into(),
        body.get("duration").cloned().unwrap_or(Value::Null),
    );
    Ok(out)
}

async fn check_alias_free(
    t: &Tenancy,
    alias: Option<&str>,
    except: Option<&str>,
) -> Result<(), ApiError> {
    let Some(alias) = alias else { return Ok(()) };
    for e in t.store.list(Kind::Key).await.map_err(store_error)? {
        if e.doc.get("key_alias").and_then(Value::as_str) == Some(alias)
            && Some(e.id.as_str()) != except
        {
            return Err(ApiError::bad_request(format!(
                "Unique key aliases across all keys are required. Key alias {alias} already exists."
            ))
            .with_param("key_alias"));
        }
    }
    Ok(())
}

/// Spend as the gateway counts it now (the store may lag by a batch).
async fn live_spend(t: &Tenancy, e: &Entity) -> f64 {
    let limits = serde_json::from_value(e.doc.clone()).unwrap_or_default();
    if let Some(s) = t.shared_spend(e.kind, &e.id, &limits).await {
        return s;
    }
    t.live_spend(e.kind, &e.id).unwrap_or(e.spend)
}

async fn with_live_spend(t: &Tenancy, e: &Entity) -> Value {
    let mut doc = e.doc.clone();
    if let Value::Object(m) = &mut doc {
        m.insert("spend".into(), json!(live_spend(t, e).await));
    }
    doc
}

async fn key_object(t: &Tenancy, token: &str) -> Out {
    let e = t
        .store
        .get(Kind::Key, token)
        .await
        .map_err(store_error)?
        .ok_or_else(|| not_found("Key", token))?;
    Ok(with_live_spend(t, &e).await)
}

async fn key_token(body: &Map<String, Value>) -> Result<String, ApiError> {
    Ok(token_of(&required_str(body, "key")?))
}

async fn update_doc(
    t: &Tenancy,
    kind: Kind,
    id: &str,
    change: impl FnOnce(&mut Map<String, Value>) -> Result<(), ApiError>,
) -> Out {
    let e = t
        .store
        .get(kind, id)
        .await
        .map_err(store_error)?
        .ok_or_else(|| not_found(kind_title(kind), id))?;
    let mut doc = match e.doc.clone() {
        Value::Object(m) => m,
        _ => Map::new(),
    };
    change(&mut doc)?;
    doc.insert("updated_at".into(), json!(Utc::now()));
    validate(kind, &doc)?;
    if !t
        .store
        .update(kind, id, &Value::Object(doc))
        .await
        .map_err(store_error)?
    {
        return Err(not_found(kind_title(kind), id));
    }
    t.invalidate(kind, id);
    let e = t
        .store
        .get(kind, id)
        .await
        .map_err(store_error)?
        .ok_or_else(|| not_found(kind_title(kind), id))?;
    Ok(with_live_spend(t, &e).await)
}

fn kind_title(kind: Kind) -> &'static str {
    match kind {
        Kind::Key => "Key",
        Kind::User => "User",
        Kind::Team => "Team",
        Kind::Customer => "End user",
        Kind::Budget => "Budget",
        _ => "Entity",
    }
}

fn validate(kind: Kind, doc: &Map<String, Value>) -> Result<(), ApiError> {
    match kind {
        Kind::Key => typed::<KeyRecord>(doc, "key").map(drop),
        Kind::User => typed::<UserRecord>(doc, "user").map(drop),
        Kind::Team => typed::<TeamRecord>(doc, "team").map(drop),
        Kind::Customer => typed::<CustomerRecord>(doc, "end user").map(drop),
        Kind::Budget => typed::<BudgetRecord>(doc, "budget").map(drop),
        _ => Ok(()),
    }
}

async fn key_update(t: &Tenancy, body: Map<String, Value>) -> Out {
    let token = key_token(&body).await?;
    let mut body = body;
    check_key_bounds(t, &body)?;
    if let Some(alias) = body.get("key_alias").and_then(Value::as_str) {
        check_alias_free(t, Some(alias), Some(&token)).await?;
    }
    let now = Utc::now();
    let duration = body.remove("duration");
    update_doc(t, Kind::Key, &token, |doc| {
        for (k, v) in &body {
            if KEY_FIELDS.contains(&k.as_str()) && k != "spend" {
                doc.insert(k.clone(), v.clone());
            }
        }
        if let Some(d) = &duration {
            doc.insert(
                "expires".into(),
                json!(period(d, "duration")?.map(|p| p.after(now))),
            );
        }
        if body.contains_key("budget_duration") {
            apply_budget_duration(doc, now)?;
        }
        Ok(())
    })
    .await
}

async fn key_set_blocked(t: &Tenancy, body: Map<String, Value>, blocked: bool) -> Out {
    let token = key_token(&body).await?;
    update_doc(t, Kind::Key, &token, |doc| {
        doc.insert("blocked".into(), json!(blocked));
        Ok(())
    })
    .await
}

async fn key_delete(t: &Tenancy, body: Map<String, Value>) -> Out {
    let mut tokens: Vec<String> = str_list(body.get("keys"))
        .iter()
        .map(|k| token_of(k))
        .collect();
    let aliases = str_list(body.get("key_aliases"));
    if !aliases.is_empty() {
        for e in t.store.list(Kind::Key).await.map_err(store_error)? {
            if e.doc
                .get("key_alias")
                .and_then(Value::as_str)
                .is_some_and(|a| aliases.iter().any(|x| x == a))
            {
                tokens.push(e.id);
            }
        }
    }
    if tokens.is_empty() {
        return Err(
            ApiError::bad_request("Missing required parameter: 'keys' or 'key_aliases'")
                .with_param("keys"),
        );
    }
    let mut deleted = vec![];
    for token in &tokens {
        if t.store
            .delete(Kind::Key, token)
            .await
            .map_err(store_error)?
        {
            t.invalidate(Kind::Key, token);
            t.counters.local.forget(Kind::Key, token);
            deleted.push(token.clone());
        }
    }
    if deleted.is_empty() {
        return Err(ApiError::not_found(format!("Keys not found: {tokens:?}")));
    }
    let given: Vec<Value> = match body.get("keys") {
        Some(Value::Array(a)) if !a.is_empty() => a.clone(),
        _ => deleted.iter().map(|d| json!(d)).collect(),
    };
    Ok(json!({"deleted_keys": given}))
}

async fn key_list(t: &Tenancy, q: &(dyn Fn(&str) -> Option<String> + Sync)) -> Out {
    let page: usize = q("page").and_then(|p| p.parse().ok()).unwrap_or(1).max(1);
    let size: usize = q("size")
        .and_then(|p| p.parse().ok())
        .unwrap_or(10)
        .clamp(1, 100);
    let full = q("return_full_object").is_some_and(|v| v == "true");
    let (user, team, alias) = (q("user_id"), q("team_id"), q("key_alias"));
    let field = |e: &Entity, f: &str| e.doc.get(f).and_then(Value::as_str).map(str::to_string);
    let mut keys: Vec<Entity> = t
        .store
        .list(Kind::Key)
        .await
        .map_err(store_error)?
        .into_iter()
        .filter(|e| user.is_none() || field(e, "user_id") == user)
        .filter(|e| team.is_none() || field(e, "team_id") == team)
        .filter(|e| alias.is_none() || field(e, "key_alias") == alias)
        .collect();
    keys.sort_by_key(|e| std::cmp::Reverse(field(e, "created_at")));
    let total = keys.len();
    let mut out = vec![];
    for e in keys.iter().skip((page - 1) * size).take(size) {
        out.push(if full {
            with_live_spend(t, e).await
        } else {
            json!(e.id)
        });
    }
    Ok(json!({
        "keys": out,
        "total_count": total,
        "current_page": page,
        "total_pages": total.div_ceil(size),
    }))
}

async fn key_regenerate(t: &Tenancy, body: Map<String, Value>) -> Out {
    let old = key_token(&body).await?;
    let e = t
        .store
        .get(Kind::Key, &old)
        .await
        .map_err(store_error)?
        .ok_or_else(|| not_found("Key", &old))?;
    let mut doc = match e.doc {
        Value::Object(m) => m,
        _ => Map::new(),
    };
    for (k, v) in &body {
        if KEY_FIELDS.contains(&k.as_str()) && k != "spend" {
            doc.insert(k.clone(), v.clone());
        }
    }
    let key = match body.get("new_key").and_then(Value::as_str) {
        Some(k) if k.starts_with("sk-") => k.to_string(),
        Some(_) => return Err(ApiError::bad_request("new_key must start with 'sk-'")),
        None => new_key(),
    };
    let token = hash_key(&key);
    doc.insert("token".into(), json!(token));
    doc.insert("key_name".into(), json!(masked(&key)));
    doc.insert("updated_at".into(), json!(Utc::now()));
    validate(Kind::Key, &doc)?;
    let spend = t.live_spend(Kind::Key, &old).unwrap_or(e.spend);
    t.store
        .put_with_spend(Kind::Key, &token, spend, &Value::Object(doc.clone()))
        .await
        .map_err(store_error)?;
    t.store.delete(Kind::Key, &old).await.map_err(store_error)?;
    t.invalidate(Kind::Key, &old);
    t.counters.local.forget(Kind::Key, &old);
    doc.insert("key".into(), json!(key));
    doc.insert("token_id".into(), json!(token));
    doc.insert("spend".into(), json!(spend));
    Ok(Value::Object(doc))
}

/// Creates a user, team, end user or budget from its management body: the id (given, else a
/// new uuid when `generated` is allowed), `created_at` and the first budget reset, validated as
/// `T` before anything is stored. An existing id is a 400.
fn create<T: serde::de::DeserializeOwned>(
    kind: Kind,
    body: &mut Map<String, Value>,
    id_field: &str,
    generated: bool,
) -> Result<(String, T), ApiError> {
    let now = Utc::now();
    let id = match body.get(id_field).and_then(Value::as_str) {
        Some(id) if !id.is_empty() => id.to_string(),
        _ if generated => uuid::Uuid::new_v4().to_string(),
        _ => {
            return Err(
                ApiError::bad_request(format!("Missing required parameter: '{id_field}'"))
                    .with_param(id_field),
            )
        }
    };
    body.insert(id_field.into(), json!(id));
    body.insert("created_at".into(), json!(now));
    body.remove("spend");
    apply_budget_duration(body, now)?;
    let record: T = typed(body, kind_title(kind))?;
    Ok((id, record))
}

/// Stores what [`create`] validated.
async fn store_new(
    t: &Tenancy,
    kind: Kind,
    id: &str,
    body: Map<String, Value>,
    id_field: &str,
) -> Result<(), ApiError> {
    if !t
        .store
        .insert(kind, id, &Value::Object(body))
        .await
        .map_err(store_error)?
    {
        return Err(ApiError::bad_request(format!(
            "{} already exists: {id_field}={id}",
            kind_title(kind)
        ))
        .with_param(id_field));
    }
    t.invalidate(kind, id);
    Ok(())
}

async fn user_new(t: &Tenancy, mut body: Map<String, Value>) -> Out {
    let auto_key = body
        .remove("auto_create_key")
        .and_then(|v| v.as_bool())
        .unwrap_or(true);
    let (user_id, record): (String, UserRecord) = create(Kind::User, &mut body, "user_id", true)?;
    let key_fields: Map<String, Value> = body
        .iter()
        .filter(|(k, _)| matches!(k.as_str(), "key_alias" | "duration" | "metadata"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    store_new(t, Kind::User, &user_id, body, "user_id").await?;
    let mut out = serde_json::to_value(&record).expect("json");
    if auto_key {
        let mut kb = key_fields;
        kb.insert("user_id".into(), json!(user_id));
        if !record.models.is_empty() {
            kb.insert("models".into(), json!(record.models));
        }
        let key = key_generate(t, kb, None).await?;
        let m = out.as_object_mut().expect("object");
        m.insert("key".into(), key["key"].clone());
        m.insert("token_id".into(), key["token_id"].clone());
    }
    Ok(out)
}

async fn keys_where(t: &Tenancy, field: &str, id: &str) -> Result<Vec<Value>, ApiError> {
    let mut out = vec![];
    for e in t.store.list(Kind::Key).await.map_err(store_error)? {
        if e.doc.get(field).and_then(Value::as_str) == Some(id) {
            out.push(with_live_spend(t, &e).await);
        }
    }
    Ok(out)
}

async fn entity_json(t: &Tenancy, kind: Kind, id: &str) -> Out {
    let e = t
        .store
        .get(kind, id)
        .await
        .map_err(store_error)?
        .ok_or_else(|| not_found(kind_title(kind), id))?;
    Ok(with_live_spend(t, &e).await)
}

async fn user_info(t: &Tenancy, user_id: &str) -> Out {
    let info = entity_json(t, Kind::User, user_id).await?;
    let mut teams = vec![];
    for team in t.store.list(Kind::Team).await.map_err(store_error)? {
        let r: TeamRecord = team.record().map_err(store_error)?;
        if r.members_with_roles
            .iter()
            .any(|m| m.user_id.as_deref() == Some(user_id))
        {
            teams.push(with_live_spend(t, &team).await);
        }
    }
    Ok(json!({
        "user_id": user_id,
        "user_info": info,
        "keys": keys_where(t, "user_id", user_id).await?,
        "teams": teams,
    }))
}

async fn user_update(t: &Tenancy, body: Map<String, Value>) -> Out {
    let id = match body.get("user_id").and_then(Value::as_str) {
        Some(id) => id.to_string(),
        None => {
            let email = required_str(&body, "user_email").map_err(|_| {
                ApiError::bad_request("Missing required parameter: 'user_id' or 'user_email'")
            })?;
            t.store
                .list(Kind::User)
                .await
                .map_err(store_error)?
                .into_iter()
                .find(|e| e.doc.get("user_email").and_then(Value::as_str) == Some(&email))
                .map(|e| e.id)
                .ok_or_else(|| not_found("User", &email))?
        }
    };
    merge_fields(t, Kind::User, &id, body).await
}

async fn merge_fields(t: &Tenancy, kind: Kind, id: &str, body: Map<String, Value>) -> Out {
    let now = Utc::now();
    update_doc(t, kind, id, |doc| {
        for (k, v) in &body {
            if !matches!(k.as_str(), "spend" | "created_at") {
                doc.insert(k.clone(), v.clone());
            }
        }
        if body.contains_key("budget_duration") {
            apply_budget_duration(doc, now)?;
        }
        Ok(())
    })
    .await
}

async fn merge_update(t: &Tenancy, kind: Kind, body: Map<String, Value>, id_field: &str) -> Out {
    let id = required_str(&body, id_field)?;
    merge_fields(t, kind, &id, body).await
}

async fn delete_many(t: &Tenancy, kind: Kind, body: &Map<String, Value>, field: &str) -> Out {
    let ids = str_list(body.get(field));
    if ids.is_empty() {
        return Err(
            ApiError::bad_request(format!("Missing required parameter: '{field}'"))
                .with_param(field),
        );
    }
    let mut deleted = vec![];
    for id in &ids {
        if t.store.delete(kind, id).await.map_err(store_error)? {
            t.invalidate(kind, id);
            t.counters.local.forget(kind, id);
            deleted.push(id.clone());
        }
    }
    if deleted.is_empty() {
        return Err(ApiError::not_found(format!(
            "{} not found: {ids:?}",
            kind_title(kind)
        )));
    }
    Ok(json!({"deleted": deleted}))
}

async fn list_plain(t: &Tenancy, kind: Kind) -> Out {
    let mut out = vec![];
    for e in t.store.list(kind).await.map_err(store_error)? {
        out.push(with_live_spend(t, &e).await);
    }
    Ok(Value::Array(out))
}

async fn list_of(t: &Tenancy, kind: Kind, name: &str) -> Out {
    let Value::Array(items) = list_plain(t, kind).await? else {
        unreachable!()
    };
    let n = items.len();
    Ok(json!({name: items, "total": n, "page": 1, "page_size": n, "total_pages": 1}))
}

async fn team_new(t: &Tenancy, mut body: Map<String, Value>) -> Out {
    let (team_id, record): (String, TeamRecord) = create(Kind::Team, &mut body, "team_id", true)?;
    store_new(t, Kind::Team, &team_id, body, "team_id").await?;
    Ok(serde_json::to_value(record).expect("json"))
}

async fn team_info(t: &Tenancy, team_id: &str) -> Out {
    let info = entity_json(t, Kind::Team, team_id).await?;
    let memberships = info.get("members_with_roles").cloned().unwrap_or(json!([]));
    Ok(json!({
        "team_id": team_id,
        "team_info": info,
        "keys": keys_where(t, "team_id", team_id).await?,
        "team_memberships": memberships,
    }))
}

async fn team_member_add(t: &Tenancy, body: Map<String, Value>) -> Out {
    let team_id = required_str(&body, "team_id")?;
    let members: Vec<TeamMember> = match body.get("member") {
        Some(Value::Array(a)) => serde_json::from_value(Value::Array(a.clone())),
        Some(m @ Value::Object(_)) => serde_json::from_value(m.clone()).map(|m| vec![m]),
        _ => {
            return Err(
                ApiError::bad_request("Missing required parameter: 'member'").with_param("member"),
            )
        }
    }
    .map_err(|e| ApiError::bad_request(format!("Invalid member: {e}")).with_param("member"))?;
    if members
        .iter()
        .any(|m| m.user_id.is_none() && m.user_email.is_none())
    {
        return Err(
            ApiError::bad_request("Each member needs a user_id or user_email").with_param("member"),
        );
    }
    let mut updated_users = vec![];
    for m in &members {
        let Some(uid) = &m.user_id else { continue };
        // Members become users when they are not yet, as LiteLLM does.
        let existing = t.store.get(Kind::User, uid).await.map_err(store_error)?;
        let mut doc = match existing.map(|e| e.doc) {
            Some(Value::Object(d)) => d,
            _ => {
                let mut d = Map::new();
                d.insert("user_id".into(), json!(uid));
                d.insert("created_at".into(), json!(Utc::now()));
                d
            }
        };
        let mut teams = str_list(doc.get("teams"));
        if !teams.contains(&team_id) {
            teams.push(team_id.clone());
        }
        doc.insert("teams".into(), json!(teams));
        t.store
            .put_with_spend(
                Kind::User,
                uid,
                live_or_stored(t, Kind::User, uid).await?,
                &Value::Object(doc.clone()),
            )
            .await
            .map_err(store_error)?;
        t.invalidate(Kind::User, uid);
        updated_users.push(Value::Object(doc));
    }
    let team = update_doc(t, Kind::Team, &team_id, |doc| {
        let mut list: Vec<TeamMember> =
            serde_json::from_value(doc.get("members_with_roles").cloned().unwrap_or(json!([])))
                .unwrap_or_default();
        for m in &members {
            if !list.iter().any(|x| {
                (x.user_id.is_some() && x.user_id == m.user_id)
                    || (x.user_email.is_some() && x.user_email == m.user_email)
            }) {
                list.push(m.clone());
            }
        }
        doc.insert("members_with_roles".into(), json!(list));
        Ok(())
    })
    .await?;
    let mut out = team;
    if let Value::Object(m) = &mut out {
        m.insert("updated_users".into(), Value::Array(updated_users));
        m.insert("updated_team_memberships".into(), json!(members));
    }
    Ok(out)
}

async fn live_or_stored(t: &Tenancy, kind: Kind, id: &str) -> Result<f64, ApiError> {
    Ok(match t.store.get(kind, id).await.map_err(store_error)? {
        Some(e) => t.live_spend(kind, id).unwrap_or(e.spend),
        None => 0.0,
    })
}

async fn team_member_delete(t: &Tenancy, body: Map<String, Value>) -> Out {
    let team_id = required_str(&body, "team_id")?;
    let user_id = body
        .get("user_id")
        .and_then(Value::as_str)
        .map(str::to_string);
    let email = body
        .get("user_email")
        .and_then(Value::as_str)
        .map(str::to_string);
    if user_id.is_none() && email.is_none() {
        return Err(ApiError::bad_request(
            "Missing required parameter: 'user_id' or 'user_email'",
        ));
    }
    update_doc(t, Kind::Team, &team_id, |doc| {
        let mut list: Vec<TeamMember> =
            serde_json::from_value(doc.get("members_with_roles").cloned().unwrap_or(json!([])))
                .unwrap_or_default();
        let before = list.len();
        list.retain(|m| {
            !((user_id.is_some() && m.user_id == user_id)
                || (email.is_some() && m.user_email == email))
        });
        if list.len() == before {
            return Err(ApiError::not_found("Member not found in team"));
        }
        doc.insert("members_with_roles".into(), json!(list));
        Ok(())
    })
    .await
}

async fn customer_new(t: &Tenancy, mut body: Map<String, Value>) -> Out {
    let (id, record): (String, CustomerRecord) =
        create(Kind::Customer, &mut body, "user_id", false)?;
    if let Some(region) = &record.allowed_model_region {
        if region != "eu" && region != "us" {
            return Err(
                ApiError::bad_request("allowed_model_region must be 'eu' or 'us'")
                    .with_param("allowed_model_region"),
            );
        }
    }
    store_new(t, Kind::Customer, &id, body, "user_id").await?;
    Ok(serde_json::to_value(record).expect("json"))
}

async fn customers_set_blocked(t: &Tenancy, body: &Map<String, Value>, blocked: bool) -> Out {
    let ids = str_list(body.get("user_ids"));
    if ids.is_empty() {
        return Err(
            ApiError::bad_request("Missing required parameter: 'user_ids'").with_param("user_ids"),
        );
    }
    let mut out = vec![];
    for id in ids {
        let exists = t
            .store
            .get(Kind::Customer, &id)
            .await
            .map_err(store_error)?
            .is_some();
        if !exists {
            // Blocking an end user never seen before creates it, blocked.
            t.store
                .insert(
                    Kind::Customer,
                    &id,
                    &json!({"user_id": id, "created_at": Utc::now()}),
                )
                .await
                .map_err(store_error)?;
        }
        out.push(
            update_doc(t, Kind::Customer, &id, |doc| {
                doc.insert("blocked".into(), json!(blocked));
                Ok(())
            })
            .await?,
        );
    }
    Ok(json!({"blocked_users": out}))
}

async fn budget_new(t: &Tenancy, mut body: Map<String, Value>) -> Out {
    let (id, record): (String, BudgetRecord) = create(Kind::Budget, &mut body, "budget_id", true)?;
    store_new(t, Kind::Budget, &id, body, "budget_id").await?;
    Ok(serde_json::to_value(record).expect("json"))
}

fn date_param(
    q: &(dyn Fn(&str) -> Option<String> + Sync),
    name: &str,
    end_of_day: bool,
) -> Result<Option<DateTime<Utc>>, ApiError> {
    let Some(v) = q(name) else { return Ok(None) };
    if let Ok(t) = DateTime::parse_from_rfc3339(&v) {
        return Ok(Some(t.with_timezone(&Utc)));
    }
    let d = NaiveDate::parse_from_str(&v, "%Y-%m-%d").map_err(|_| {
        ApiError::bad_request(format!("{name}: expected YYYY-MM-DD")).with_param(name.to_string())
    })?;
    let t = if end_of_day {
        d.and_hms_opt(23, 59, 59)
    } else {
        d.and_hms_opt(0, 0, 0)
    };
    Ok(t.map(|t| t.and_utc()))
}

async fn query_rows(
    t: &Tenancy,
    q: &(dyn Fn(&str) -> Option<String> + Sync),
    limit: Option<u64>,
) -> Result<Vec<SpendRow>, ApiError> {
    let query = SpendQuery {
        api_key: q("api_key").map(|k| token_of(&k)),
        user: q("user_id"),
        team_id: q("team_id"),
        end_user: q("customer_id").or_else(|| q("end_user")),
        request_id: q("request_id"),
        start: date_param(q, "start_date", false)?,
        end: date_param(q, "end_date", true)?,
        limit,
    };
    t.store.spend_logs(&query).await.map_err(store_error)
}

async fn spend_logs(t: &Tenancy, q: &(dyn Fn(&str) -> Option<String> + Sync)) -> Out {
    let limit = q("limit").and_then(|l| l.parse().ok()).unwrap_or(1000);
    Ok(serde_json::to_value(query_rows(t, q, Some(limit)).await?).expect("json"))
}

/// Spend per day, grouped by team, customer, key, user or model, with a per-model breakdown.
async fn spend_report(t: &Tenancy, q: &(dyn Fn(&str) -> Option<String> + Sync)) -> Out {
    let group_by = q("group_by").unwrap_or_else(|| "team".into());
    let rows = query_rows(t, q, None).await?;
    let (list_name, key_name) = match group_by.as_str() {
        "team" => ("teams", "team_name"),
        "customer" => ("customers", "customer"),
        "api_key" => ("api_keys", "api_key"),
        "user" => ("users", "user"),
        "model" => ("models", "model"),
        other => {
            return Err(ApiError::bad_request(format!(
                "group_by must be team, customer, api_key, user or model; got {other}"
            ))
            .with_param("group_by"))
        }
    };
    type Models = BTreeMap<String, (f64, u64)>;
    let mut days: BTreeMap<String, BTreeMap<String, (f64, Models)>> = BTreeMap::new();
    for r in &rows {
        let group = match group_by.as_str() {
            "team" => r.team_id.clone(),
            "customer" => r.end_user.clone(),
            "api_key" => Some(r.api_key.to_string()),
            "user" => r.user.clone(),
            _ => Some(r.model_group.to_string()),
        }
        .unwrap_or_default();
        let day = r.start_time.format("%Y-%m-%d").to_string();
        let entry = days.entry(day).or_default().entry(group).or_default();
        entry.0 += r.spend;
        let m = entry.1.entry(r.model_group.to_string()).or_default();
        m.0 += r.spend;
        m.1 += r.total_tokens;
    }
    let out: Vec<Value> = days
        .into_iter()
        .map(|(day, groups)| {
            let list: Vec<Value> = groups
                .into_iter()
                .map(|(g, (total, models))| {
                    json!({
                        key_name: if g.is_empty() { Value::Null } else { json!(g) },
                        "total_spend": total,
                        "metadata": models.into_iter().map(|(m, (s, tok))| json!({"model": m, "spend": s, "total_tokens": tok})).collect::<Vec<_>>(),
                    })
                })
                .collect();
            json!({"group_by_day": day, list_name: list})
        })
        .collect();
    Ok(Value::Array(out))
}

/// Models a key may use, access groups expanded to the groups that carry them; `None` = all.
pub fn expand_models(app: &App, models: &[String]) -> Option<Vec<String>> {
    if models.is_empty() || models.iter().any(|m| m == "all-proxy-models" || m == "*") {
        return None;
    }
    let mut out: Vec<String> = models.to_vec();
    for d in app.router.all_deployments() {
        let c = &d.config;
        if c.model_info
            .access_groups
            .iter()
            .any(|g| models.contains(g))
            && !out.contains(&c.model_name)
        {
            out.push(c.model_name.clone());
        }
    }
    Some(out)
}

/// Keeps `Arc` in scope for callers holding contexts.
pub type Shared<T> = Arc<T>;
