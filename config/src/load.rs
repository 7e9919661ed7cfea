//! Reading a config file: YAML → JSON value → `environment_variables` exported → `os.environ/`
//! resolved → typed sections deserialized one by one so that every problem is reported with its
//! key path, not just the first.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::lenient;
use crate::model::*;
use crate::provider::{split_model, ProviderKind};
use crate::resolve::resolve_env_refs;
use crate::{ConfigError, Problem};

/// Default request parameters that may sit in `litellm_params` and are sent upstream.
const REQUEST_PARAMS: &[&str] = &[
    "temperature",
    "max_tokens",
    "max_completion_tokens",
    "top_p",
    "n",
    "stop",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "response_format",
    "top_k",
    "min_p",
    "repetition_penalty",
    "user",
    "logprobs",
    "top_logprobs",
    "reasoning_effort",
    "tool_choice",
    "parallel_tool_calls",
    "stream_options",
    "dimensions",
    "encoding_format",
    "extra_body",
];

/// Provider credential keys carried for providers with their own auth (later translators).
const PROVIDER_PARAMS: &[&str] = &[
    "aws_access_key_id",
    "aws_secret_access_key",
    "aws_session_token",
    "aws_region_name",
    "aws_role_name",
    "aws_session_name",
    "aws_profile_name",
    "aws_bedrock_runtime_endpoint",
    "vertex_project",
    "vertex_location",
    "vertex_credentials",
    "azure_ad_token",
    "region_name",
];

#[derive(Deserialize, Default)]
struct RawRoot {
    #[serde(default)]
    model_list: Option<Vec<Value>>,
    #[serde(default)]
    router_settings: Option<Map<String, Value>>,
    #[serde(default)]
    litellm_settings: Option<Map<String, Value>>,
    #[serde(default)]
    general_settings: Option<Map<String, Value>>,
    /// Applied before deserialization (it must precede `os.environ/` resolution).
    #[serde(default)]
    #[allow(dead_code)]
    environment_variables: Option<Map<String, Value>>,
    #[serde(default)]
    credential_list: Option<Vec<Value>>,
    /// Sluice's section for colocated engines (see `local.rs`).
    #[serde(default)]
    local_models: Option<Vec<Value>>,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

#[derive(Deserialize)]
struct RawEntry {
    model_name: String,
    litellm_params: Map<String, Value>,
    #[serde(default)]
    model_info: Option<Map<String, Value>>,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

#[derive(Deserialize)]
struct RawParams {
    model: String,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    api_base: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    base_url: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    api_key: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    api_version: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_string_list")]
    organization: Option<Vec<String>>,
    #[serde(default)]
    extra_headers: Option<BTreeMap<String, String>>,
    #[serde(default, deserialize_with = "lenient::opt_u64")]
    rpm: Option<u64>,
    #[serde(default, deserialize_with = "lenient::opt_u64")]
    tpm: Option<u64>,
    #[serde(default, deserialize_with = "lenient::opt_f64")]
    weight: Option<f64>,
    #[serde(default, deserialize_with = "lenient::opt_i64")]
    order: Option<i64>,
    #[serde(default, deserialize_with = "lenient::opt_f64")]
    timeout: Option<f64>,
    #[serde(default, deserialize_with = "lenient::opt_f64")]
    stream_timeout: Option<f64>,
    #[serde(default, deserialize_with = "lenient::opt_u64")]
    max_retries: Option<u64>,
    #[serde(default, deserialize_with = "lenient::opt_u64")]
    max_parallel_requests: Option<u64>,
    #[serde(default, deserialize_with = "lenient::opt_f64")]
    cooldown_time: Option<f64>,
    #[serde(default, deserialize_with = "lenient::opt_string_list")]
    tags: Option<Vec<String>>,
    #[serde(default, deserialize_with = "lenient::opt_f64")]
    input_cost_per_token: Option<f64>,
    #[serde(default, deserialize_with = "lenient::opt_f64")]
    output_cost_per_token: Option<f64>,
    /// Applied before deserialization; kept so it is not reported as unknown.
    #[serde(default, deserialize_with = "lenient::opt_string")]
    #[allow(dead_code)]
    litellm_credential_name: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    custom_llm_provider: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_bool")]
    drop_params: Option<bool>,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

#[derive(Deserialize, Default)]
struct RawModelInfo {
    #[serde(default, deserialize_with = "lenient::opt_string")]
    id: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    mode: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    base_model: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_string_list")]
    supported_environments: Option<Vec<String>>,
    #[serde(default, deserialize_with = "lenient::opt_string_list")]
    access_groups: Option<Vec<String>>,
    #[serde(default, deserialize_with = "lenient::opt_f64")]
    input_cost_per_token: Option<f64>,
    #[serde(default, deserialize_with = "lenient::opt_f64")]
    output_cost_per_token: Option<f64>,
    #[serde(default, deserialize_with = "lenient::opt_u64")]
    max_tokens: Option<u64>,
    #[serde(default, deserialize_with = "lenient::opt_u64")]
    max_input_tokens: Option<u64>,
    #[serde(default, deserialize_with = "lenient::opt_u64")]
    max_output_tokens: Option<u64>,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    health_check_model: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_f64")]
    health_check_timeout: Option<f64>,
    #[serde(flatten)]
    _rest: Map<String, Value>,
}

/// Routing keys that may appear in `litellm_settings` and `router_settings` (the latter wins).
#[derive(Deserialize, Default)]
struct RawRouting {
    #[serde(default, deserialize_with = "lenient::opt_string")]
    routing_strategy: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_u64")]
    num_retries: Option<u64>,
    #[serde(default)]
    retry_policy: Option<BTreeMap<String, Value>>,
    #[serde(default, deserialize_with = "lenient::opt_f64")]
    timeout: Option<f64>,
    #[serde(default, deserialize_with = "lenient::opt_f64")]
    request_timeout: Option<f64>,
    #[serde(default, deserialize_with = "lenient::opt_f64")]
    stream_timeout: Option<f64>,
    #[serde(default, deserialize_with = "lenient::opt_f64")]
    retry_after: Option<f64>,
    #[serde(default, deserialize_with = "lenient::opt_u64")]
    allowed_fails: Option<u64>,
    #[serde(default)]
    allowed_fails_policy: Option<BTreeMap<String, Value>>,
    #[serde(default, deserialize_with = "lenient::opt_f64")]
    cooldown_time: Option<f64>,
    #[serde(default, deserialize_with = "lenient::opt_bool")]
    disable_cooldowns: Option<bool>,
    #[serde(default)]
    fallbacks: Option<Vec<Map<String, Value>>>,
    #[serde(default)]
    context_window_fallbacks: Option<Vec<Map<String, Value>>>,
    #[serde(default)]
    content_policy_fallbacks: Option<Vec<Map<String, Value>>>,
    #[serde(default, deserialize_with = "lenient::opt_string_list")]
    default_fallbacks: Option<Vec<String>>,
    #[serde(default, deserialize_with = "lenient::opt_u64")]
    max_fallbacks: Option<u64>,
    #[serde(default, deserialize_with = "lenient::opt_bool")]
    enable_pre_call_checks: Option<bool>,
    #[serde(default, deserialize_with = "lenient::opt_bool")]
    enable_tag_filtering: Option<bool>,
    #[serde(default, deserialize_with = "lenient::opt_bool")]
    tag_filtering_match_any: Option<bool>,
    #[serde(default)]
    model_group_alias: Option<Map<String, Value>>,
    #[serde(default, deserialize_with = "lenient::opt_bool")]
    drop_params: Option<bool>,
    #[serde(default, deserialize_with = "lenient::opt_f64")]
    max_budget: Option<f64>,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    budget_duration: Option<String>,
    #[serde(default)]
    default_key_generate_params: Option<Map<String, Value>>,
    #[serde(default)]
    upperbound_key_generate_params: Option<Map<String, Value>>,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    redis_host: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_u64")]
    redis_port: Option<u64>,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    redis_password: Option<String>,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

#[derive(Deserialize, Default)]
struct RawGeneral {
    #[serde(default, deserialize_with = "lenient::opt_string")]
    master_key: Option<String>,
    #[serde(default)]
    pass_through_endpoints: Option<Vec<Value>>,
    #[serde(default, deserialize_with = "lenient::opt_f64")]
    max_request_size_mb: Option<f64>,
    #[serde(default, deserialize_with = "lenient::opt_f64")]
    max_response_size_mb: Option<f64>,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    litellm_key_header_name: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_bool")]
    forward_client_headers_to_llm_api: Option<bool>,
    #[serde(default, deserialize_with = "lenient::opt_string_list")]
    allowed_routes: Option<Vec<String>>,
    #[serde(default, deserialize_with = "lenient::opt_bool")]
    health_check_details: Option<bool>,
    #[serde(default, deserialize_with = "lenient::opt_bool")]
    background_health_checks: Option<bool>,
    #[serde(default, deserialize_with = "lenient::opt_f64")]
    health_check_interval: Option<f64>,
    #[serde(default, deserialize_with = "lenient::opt_u64")]
    global_max_parallel_requests: Option<u64>,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    database_url: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_u64")]
    database_connection_pool_limit: Option<u64>,
    #[serde(default, deserialize_with = "lenient::opt_f64")]
    database_connection_timeout: Option<f64>,
    #[serde(default, deserialize_with = "lenient::opt_bool")]
    disable_spend_logs: Option<bool>,
    #[serde(default, deserialize_with = "lenient::opt_bool")]
    disable_spend_updates: Option<bool>,
    #[serde(default, deserialize_with = "lenient::opt_f64")]
    proxy_batch_write_at: Option<f64>,
    #[serde(default, deserialize_with = "lenient::opt_bool")]
    enable_jwt_auth: Option<bool>,
    #[serde(default)]
    litellm_jwtauth: Option<Map<String, Value>>,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

#[derive(Deserialize)]
struct RawPassThrough {
    path: String,
    target: String,
    #[serde(default)]
    headers: Option<BTreeMap<String, String>>,
    #[serde(default, deserialize_with = "lenient::opt_bool")]
    forward_headers: Option<bool>,
    #[serde(default, deserialize_with = "lenient::opt_bool")]
    auth: Option<bool>,
    #[serde(default, deserialize_with = "lenient::opt_bool")]
    include_subpath: Option<bool>,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

#[derive(Deserialize)]
struct RawCredential {
    credential_name: String,
    credential_values: Map<String, Value>,
    #[allow(dead_code)]
    credential_info: Map<String, Value>,
}

/// Collects problems and ignored keys while the sections are read.
struct Loader {
    problems: Vec<Problem>,
    ignored: Vec<String>,
}

impl Loader {
    fn parse<T: DeserializeOwned>(&mut self, value: Value, path: &str) -> Option<T> {
        match serde_path_to_error::deserialize::<_, T>(value) {
            Ok(v) => Some(v),
            Err(e) => {
                let inner = e.path().to_string();
                let full = match (path.is_empty(), inner == ".") {
                    (true, _) => inner,
                    (false, true) => path.to_string(),
                    (false, false) => format!("{path}.{inner}"),
                };
                self.problems.push(Problem {
                    path: full,
                    expected: e.into_inner().to_string(),
                });
                None
            }
        }
    }

    fn problem(&mut self, path: impl Into<String>, expected: impl Into<String>) {
        self.problems.push(Problem {
            path: path.into(),
            expected: expected.into(),
        });
    }

    fn ignore_rest(&mut self, section: &str, rest: &Map<String, Value>) {
        for k in rest.keys() {
            self.ignored.push(format!("{section}.{k}"));
        }
    }
}

fn secs(v: Option<f64>) -> Option<Duration> {
    v.map(Duration::from_secs_f64)
}

fn env_number(name: &str) -> Option<f64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

/// Parses and validates config text. `source` is only used in messages.
pub fn parse_config(text: &str, source: &Path) -> Result<Config, ConfigError> {
    parse_config_with_local_models(text, source, &[])
}

/// As [`parse_config`], with `(model_name, model path)` pairs appended to `local_models` (the
/// gateway's `--local-model NAME=PATH`).
pub fn parse_config_with_local_models(
    text: &str,
    source: &Path,
    extra_local_models: &[(String, PathBuf)],
) -> Result<Config, ConfigError> {
    let err = |problems| ConfigError {
        file: source.to_path_buf(),
        problems,
    };
    let mut doc: Value = if text.trim().is_empty() {
        Value::Object(Map::new())
    } else {
        serde_yaml_ng::from_str(text).map_err(|e| {
            err(vec![Problem {
                path: "(document)".into(),
                expected: format!("valid YAML: {e}"),
            }])
        })?
    };
    if doc.is_null() {
        doc = Value::Object(Map::new());
    }
    if !doc.is_object() {
        return Err(err(vec![Problem {
            path: "(document)".into(),
            expected: "a mapping with model_list, router_settings, ... at the top level".into(),
        }]));
    }
    if !extra_local_models.is_empty() {
        let list = doc
            .as_object_mut()
            .expect("checked above")
            .entry("local_models")
            .or_insert_with(|| Value::Array(vec![]));
        if let Value::Array(list) = list {
            for (name, model) in extra_local_models {
                list.push(serde_json::json!({
                    "model_name": name,
                    "model": model.to_string_lossy(),
                }));
            }
        }
    }

    // environment_variables are exported before any reference is resolved, as LiteLLM does.
    if let Some(Value::Object(vars)) = doc.get("environment_variables") {
        for (k, v) in vars {
            let v = match v {
                Value::String(s) => s.clone(),
                Value::Null => continue,
                other => other.to_string(),
            };
            if !v.starts_with("os.environ/") {
                std::env::set_var(k, v);
            }
        }
    }
    let mut missing = vec![];
    resolve_env_refs(&mut doc, "", &mut missing);
    let mut loader = Loader {
        problems: missing
            .into_iter()
            .map(|(path, name)| Problem {
                path,
                expected: format!("environment variable {name} to be set (os.environ/{name})"),
            })
            .collect(),
        ignored: vec![],
    };

    let root: RawRoot = loader.parse(doc, "").unwrap_or_default();
    for k in root.rest.keys() {
        loader.ignored.push(k.clone());
    }

    let credentials = read_credentials(&mut loader, root.credential_list.unwrap_or_default());

    // Routing: litellm_settings first, router_settings on top.
    let litellm = root.litellm_settings.unwrap_or_default();
    let router_map = root.router_settings.unwrap_or_default();
    let from_litellm: RawRouting = loader
        .parse(Value::Object(litellm.clone()), "litellm_settings")
        .unwrap_or_default();
    let from_router: RawRouting = loader
        .parse(Value::Object(router_map.clone()), "router_settings")
        .unwrap_or_default();
    for (section, raw) in [
        ("litellm_settings", &from_litellm),
        ("router_settings", &from_router),
    ] {
        loader.ignore_rest(section, &raw.rest);
    }
    let tenancy_routing = tenancy_from_routing(&mut loader, &from_litellm, &from_router);
    let (router, model_group_alias) = build_router(&mut loader, from_litellm, from_router);

    let general_raw: RawGeneral = loader
        .parse(
            Value::Object(root.general_settings.unwrap_or_default()),
            "general_settings",
        )
        .unwrap_or_default();
    let tenancy = build_tenancy(&mut loader, &general_raw, tenancy_routing);
    let general = build_general(&mut loader, general_raw);

    let environment = std::env::var("LITELLM_ENVIRONMENT").ok();
    let mut deployments = vec![];
    let mut model_list = root.model_list.unwrap_or_default();
    let mut local_models = vec![];
    for (i, entry) in root
        .local_models
        .unwrap_or_default()
        .into_iter()
        .enumerate()
    {
        let path = format!("local_models[{i}]");
        let Some(raw) = loader.parse::<crate::local::RawLocalModel>(entry, &path) else {
            continue;
        };
        loader.ignore_rest(&path, &raw.rest);
        match crate::local::build_local_model(raw, &path) {
            Ok((local, entry)) => {
                // Local models route before the file's own entries of the same name.
                model_list.insert(local_models.len(), entry);
                local_models.push(local);
            }
            Err(problems) => {
                for (path, expected) in problems {
                    loader.problem(path, expected);
                }
            }
        }
    }
    for (i, entry) in model_list.into_iter().enumerate() {
        let path = match i.checked_sub(local_models.len()) {
            None => format!("local_models[{i}]"),
            Some(j) => format!("model_list[{j}]"),
        };
        if let Some(raw) = loader.parse::<RawEntry>(entry, &path) {
            deployments.extend(build_deployments(
                &mut loader,
                raw,
                &path,
                &credentials,
                environment.as_deref(),
            ));
        }
    }

    check_unique_ids(&mut loader, &deployments);
    check_fallback_targets(&mut loader, &router, &deployments, &model_group_alias);

    if !loader.problems.is_empty() {
        return Err(err(loader.problems));
    }
    let mut ignored_keys = loader.ignored;
    ignored_keys.sort();
    ignored_keys.dedup();
    Ok(Config {
        source: source.to_path_buf(),
        deployments,
        model_group_alias,
        router,
        general,
        tenancy,
        local_models,
        ignored_keys,
    })
}

/// The tenancy keys of `litellm_settings` / `router_settings` (the latter wins), checked.
fn tenancy_from_routing(
    loader: &mut Loader,
    litellm: &RawRouting,
    router: &RawRouting,
) -> TenancySettings {
    let mut t = TenancySettings {
        max_budget: router.max_budget.or(litellm.max_budget),
        budget_duration: router
            .budget_duration
            .clone()
            .or_else(|| litellm.budget_duration.clone()),
        default_key_generate_params: litellm
            .default_key_generate_params
            .clone()
            .unwrap_or_default(),
        upperbound_key_generate_params: litellm
            .upperbound_key_generate_params
            .clone()
            .unwrap_or_default(),
        ..TenancySettings::default()
    };
    if let Some(d) = &t.budget_duration {
        if !is_duration(d) {
            loader.problem(
                "litellm_settings.budget_duration",
                format!("a duration like 30s, 30m, 30h, 30d or 1mo; got \"{d}\""),
            );
        }
    }
    if t.max_budget.is_some_and(|b| b < 0.0) {
        loader.problem("litellm_settings.max_budget", "a budget of 0 or more (USD)");
    }
    let host = router
        .redis_host
        .clone()
        .or_else(|| litellm.redis_host.clone())
        .or_else(|| std::env::var("REDIS_HOST").ok())
        .filter(|h| !h.is_empty());
    if let Some(host) = host {
        let port = router
            .redis_port
            .or(litellm.redis_port)
            .or_else(|| env_number("REDIS_PORT").map(|p| p as u64))
            .unwrap_or(6379);
        if port == 0 || port > u16::MAX as u64 {
            loader.problem("router_settings.redis_port", "a TCP port (1-65535)");
        }
        t.redis = Some(RedisSettings {
            host,
            port: port as u16,
            password: router
                .redis_password
                .clone()
                .or_else(|| litellm.redis_password.clone())
                .or_else(|| std::env::var("REDIS_PASSWORD").ok())
                .filter(|p| !p.is_empty()),
        });
    }
    t
}

fn build_tenancy(loader: &mut Loader, g: &RawGeneral, mut t: TenancySettings) -> TenancySettings {
    t.database_url = g
        .database_url
        .clone()
        .or_else(|| std::env::var("DATABASE_URL").ok())
        .filter(|u| !u.is_empty());
    if let Some(n) = g.database_connection_pool_limit {
        if n == 0 {
            loader.problem(
                "general_settings.database_connection_pool_limit",
                "a pool size of at least 1",
            );
        }
        t.pool_limit = n.max(1) as u32;
    }
    if let Some(s) = secs(g.database_connection_timeout) {
        t.connect_timeout = s;
    }
    t.disable_spend_logs = g.disable_spend_logs.unwrap_or(false);
    t.disable_spend_updates = g.disable_spend_updates.unwrap_or(false);
    if let Some(s) = secs(g.proxy_batch_write_at) {
        t.batch_write_interval = s.max(std::time::Duration::from_millis(10));
    }
    t.enable_jwt_auth = g.enable_jwt_auth.unwrap_or(false);
    t.jwt = g.litellm_jwtauth.clone().unwrap_or_default();
    t
}

fn read_credentials(loader: &mut Loader, list: Vec<Value>) -> BTreeMap<String, Map<String, Value>> {
    let mut out = BTreeMap::new();
    for (i, item) in list.into_iter().enumerate() {
        let path = format!("credential_list[{i}]");
        if let Some(c) = loader.parse::<RawCredential>(item, &path) {
            if out.contains_key(&c.credential_name) {
                loader.problem(
                    format!("{path}.credential_name"),
                    format!("a unique name; \"{}\" is used twice", c.credential_name),
                );
            }
            out.insert(c.credential_name, c.credential_values);
        }
    }
    out
}

fn parse_fallbacks(
    loader: &mut Loader,
    list: Option<Vec<Map<String, Value>>>,
    path: &str,
) -> Vec<(String, Vec<String>)> {
    let mut out = vec![];
    for (i, item) in list.unwrap_or_default().into_iter().enumerate() {
        for (group, targets) in item {
            let targets = match targets {
                Value::String(s) => vec![s],
                Value::Array(a) if a.iter().all(Value::is_string) => a
                    .into_iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect(),
                _ => {
                    loader.problem(
                        format!("{path}[{i}].{group}"),
                        "a list of model group names",
                    );
                    continue;
                }
            };
            out.push((group, targets));
        }
    }
    out
}

fn parse_policy(
    loader: &mut Loader,
    raw: Option<BTreeMap<String, Value>>,
    path: &str,
    suffix: &str,
) -> BTreeMap<ErrorClass, u32> {
    let mut out = BTreeMap::new();
    for (k, v) in raw.unwrap_or_default() {
        let class = ErrorClass::ALL
            .iter()
            .find(|c| format!("{}{suffix}", c.policy_name()) == k);
        let count = match &v {
            Value::Number(n) => n.as_u64(),
            Value::String(s) => s.trim().parse().ok(),
            _ => None,
        };
        match (class, count) {
            (Some(c), Some(n)) => {
                out.insert(*c, n as u32);
            }
            (None, _) => loader.problem(
                format!("{path}.{k}"),
                format!(
                    "one of {}",
                    ErrorClass::ALL
                        .iter()
                        .map(|c| format!("{}{suffix}", c.policy_name()))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ),
            (_, None) => loader.problem(format!("{path}.{k}"), "a non-negative integer"),
        }
    }
    out
}

fn build_router(
    loader: &mut Loader,
    l: RawRouting,
    r: RawRouting,
) -> (RouterSettings, BTreeMap<String, GroupAlias>) {
    // Source of each key: router_settings when it has the key, else litellm_settings.
    macro_rules! pick {
        ($f:ident) => {
            r.$f.clone().or(l.$f.clone())
        };
    }
    let section = |has_router: bool| {
        if has_router {
            "router_settings"
        } else {
            "litellm_settings"
        }
    };

    let strategy = match pick!(routing_strategy).as_deref() {
        None | Some("simple-shuffle") => RoutingStrategy::SimpleShuffle,
        Some("least-busy") => RoutingStrategy::LeastBusy,
        Some("latency-based-routing") => RoutingStrategy::LatencyBased,
        Some("usage-based-routing-v2") => RoutingStrategy::UsageBased,
        Some("usage-based-routing") => {
            loader
                .ignored
                .push("router_settings.routing_strategy=usage-based-routing (runs as usage-based-routing-v2)".into());
            RoutingStrategy::UsageBased
        }
        Some("cost-based-routing") => RoutingStrategy::CostBased,
        Some(other) => {
            loader.problem(
                format!("{}.routing_strategy", section(r.routing_strategy.is_some())),
                format!("one of simple-shuffle, least-busy, latency-based-routing, usage-based-routing-v2, usage-based-routing, cost-based-routing; got \"{other}\""),
            );
            RoutingStrategy::SimpleShuffle
        }
    };

    let fb_path = |name: &str, has: bool| format!("{}.{name}", section(has));
    let fallbacks = parse_fallbacks(
        loader,
        pick!(fallbacks),
        &fb_path("fallbacks", r.fallbacks.is_some()),
    );
    let context_window_fallbacks = parse_fallbacks(
        loader,
        pick!(context_window_fallbacks),
        &fb_path(
            "context_window_fallbacks",
            r.context_window_fallbacks.is_some(),
        ),
    );
    let content_policy_fallbacks = parse_fallbacks(
        loader,
        pick!(content_policy_fallbacks),
        &fb_path(
            "content_policy_fallbacks",
            r.content_policy_fallbacks.is_some(),
        ),
    );
    let retry_policy = parse_policy(
        loader,
        pick!(retry_policy),
        &fb_path("retry_policy", r.retry_policy.is_some()),
        "Retries",
    );
    let allowed_fails_policy = parse_policy(
        loader,
        pick!(allowed_fails_policy),
        &fb_path("allowed_fails_policy", r.allowed_fails_policy.is_some()),
        "AllowedFails",
    );

    let mut aliases = BTreeMap::new();
    for (alias, v) in pick!(model_group_alias).unwrap_or_default() {
        let path = format!("router_settings.model_group_alias.{alias}");
        match v {
            Value::String(target) => {
                aliases.insert(
                    alias,
                    GroupAlias {
                        target,
                        hidden: false,
                    },
                );
            }
            Value::Object(m) => match m.get("model").and_then(Value::as_str) {
                Some(target) => {
                    let hidden = m.get("hidden").and_then(Value::as_bool).unwrap_or(false);
                    aliases.insert(
                        alias,
                        GroupAlias {
                            target: target.to_string(),
                            hidden,
                        },
                    );
                }
                None => loader.problem(path, "a model group name or {model: NAME, hidden: BOOL}"),
            },
            _ => loader.problem(path, "a model group name or {model: NAME, hidden: BOOL}"),
        }
    }

    if pick!(enable_pre_call_checks) == Some(true) {
        // Needs a tokenizer per model to count prompt tokens; not wired in yet.
        loader
            .ignored
            .push("router_settings.enable_pre_call_checks".into());
    }
    let timeout = pick!(timeout).or(pick!(request_timeout)).unwrap_or(6000.0);
    let settings = RouterSettings {
        routing_strategy: strategy,
        num_retries: pick!(num_retries)
            .or_else(|| env_number("DEFAULT_MAX_RETRIES").map(|v| v as u64))
            .unwrap_or(2) as u32,
        retry_policy,
        timeout: Duration::from_secs_f64(timeout),
        stream_timeout: secs(pick!(stream_timeout)),
        retry_after: secs(pick!(retry_after)).unwrap_or(Duration::ZERO),
        allowed_fails: pick!(allowed_fails)
            .or_else(|| env_number("DEFAULT_ALLOWED_FAILS").map(|v| v as u64))
            .unwrap_or(3) as u32,
        allowed_fails_policy,
        cooldown_time: secs(pick!(cooldown_time))
            .or_else(|| secs(env_number("DEFAULT_COOLDOWN_TIME_SECONDS")))
            .unwrap_or(Duration::from_secs(5)),
        disable_cooldowns: pick!(disable_cooldowns).unwrap_or(false),
        fallbacks,
        context_window_fallbacks,
        content_policy_fallbacks,
        default_fallbacks: pick!(default_fallbacks).unwrap_or_default(),
        max_fallbacks: pick!(max_fallbacks)
            .or_else(|| env_number("ROUTER_MAX_FALLBACKS").map(|v| v as u64))
            .unwrap_or(5) as u32,
        enable_pre_call_checks: pick!(enable_pre_call_checks).unwrap_or(false),
        enable_tag_filtering: pick!(enable_tag_filtering).unwrap_or(false),
        tag_filtering_match_any: pick!(tag_filtering_match_any).unwrap_or(true),
        drop_params: pick!(drop_params).unwrap_or(false),
        failure_threshold_percent: env_number("DEFAULT_FAILURE_THRESHOLD_PERCENT").unwrap_or(0.5),
        failure_threshold_minimum_requests: env_number("DEFAULT_FAILURE_THRESHOLD_MINIMUM_REQUESTS")
            .unwrap_or(5.0) as u64,
        single_deployment_failure_threshold: env_number(
            "SINGLE_DEPLOYMENT_TRAFFIC_FAILURE_THRESHOLD",
        )
        .unwrap_or(1000.0) as u64,
    };
    (settings, aliases)
}

fn build_general(loader: &mut Loader, g: RawGeneral) -> GeneralSettings {
    loader.ignore_rest("general_settings", &g.rest);
    let mut endpoints = vec![];
    for (i, v) in g
        .pass_through_endpoints
        .unwrap_or_default()
        .into_iter()
        .enumerate()
    {
        let path = format!("general_settings.pass_through_endpoints[{i}]");
        let Some(p) = loader.parse::<RawPassThrough>(v, &path) else {
            continue;
        };
        loader.ignore_rest(&path, &p.rest);
        if !p.path.starts_with('/') {
            loader.problem(format!("{path}.path"), "a path starting with '/'");
        }
        if !(p.target.starts_with("http://") || p.target.starts_with("https://")) {
            loader.problem(format!("{path}.target"), "an http:// or https:// URL");
        }
        endpoints.push(PassThroughEndpoint {
            path: p.path.trim_end_matches('/').to_string(),
            target: p.target,
            headers: p.headers.unwrap_or_default().into_iter().collect(),
            forward_headers: p.forward_headers.unwrap_or(false),
            auth: p.auth.unwrap_or(false),
            include_subpath: p.include_subpath.unwrap_or(false),
        });
    }
    let mb = |v: Option<f64>| v.map(|mb| (mb * 1024.0 * 1024.0) as usize);
    GeneralSettings {
        master_key: g
            .master_key
            .or_else(|| std::env::var("LITELLM_MASTER_KEY").ok())
            .filter(|k| !k.is_empty()),
        pass_through_endpoints: endpoints,
        max_request_bytes: mb(g.max_request_size_mb),
        max_response_bytes: mb(g.max_response_size_mb),
        litellm_key_header_name: g.litellm_key_header_name,
        forward_client_headers_to_llm_api: g.forward_client_headers_to_llm_api.unwrap_or(false),
        allowed_routes: g.allowed_routes,
        health_check_details: g.health_check_details.unwrap_or(true),
        background_health_checks: g.background_health_checks.unwrap_or(false),
        health_check_interval: secs(g.health_check_interval).unwrap_or(Duration::from_secs(300)),
        global_max_parallel_requests: g.global_max_parallel_requests,
        database_url: g
            .database_url
            .or_else(|| std::env::var("DATABASE_URL").ok()),
    }
}

fn build_deployments(
    loader: &mut Loader,
    raw: RawEntry,
    path: &str,
    credentials: &BTreeMap<String, Map<String, Value>>,
    environment: Option<&str>,
) -> Vec<Deployment> {
    loader.ignore_rest(path, &raw.rest);
    let mut params_map = raw.litellm_params.clone();
    let params_path = format!("{path}.litellm_params");

    // A named credential fills every param the entry leaves unset.
    if let Some(Value::String(name)) = params_map.get("litellm_credential_name").cloned() {
        match credentials.get(&name) {
            Some(values) => {
                for (k, v) in values {
                    params_map.entry(k.clone()).or_insert_with(|| v.clone());
                }
            }
            None => loader.problem(
                format!("{params_path}.litellm_credential_name"),
                format!("the name of a credential_list entry; \"{name}\" is not defined"),
            ),
        }
    }
    let Some(params) = loader.parse::<RawParams>(Value::Object(params_map.clone()), &params_path)
    else {
        return vec![];
    };
    let info_map = raw.model_info.unwrap_or_default();
    let info: RawModelInfo = loader
        .parse(
            Value::Object(info_map.clone()),
            &format!("{path}.model_info"),
        )
        .unwrap_or_default();

    if let Some(envs) = &info.supported_environments {
        let env_path = format!("{path}.model_info.supported_environments");
        for e in envs {
            if !["production", "staging", "development"].contains(&e.as_str()) {
                loader.problem(
                    &env_path,
                    format!("a list of production, staging, development; got \"{e}\""),
                );
            }
        }
        match environment {
            None => {
                loader.problem(
                    &env_path,
                    "LITELLM_ENVIRONMENT to be set when supported_environments is used",
                );
                return vec![];
            }
            Some(env) if !envs.iter().any(|e| e == env) => return vec![],
            _ => {}
        }
    }

    let model = match params.custom_llm_provider.as_deref() {
        Some(p) if !params.model.starts_with(&format!("{p}/")) => format!("{p}/{}", params.model),
        _ => params.model.clone(),
    };
    let (provider, upstream_model) = if model == "*" {
        // `model: "*"`: the provider is inferred per request from the requested name.
        (
            ProviderKind::from_prefix("openai").expect("known"),
            "*".to_string(),
        )
    } else {
        match split_model(&model) {
            Some(split) => split,
            None => {
                loader.problem(
                    format!("{params_path}.model"),
                    format!("\"<provider>/<model>\" with a known provider prefix (openai/, hosted_vllm/, groq/, ...) or a well-known model name; got \"{model}\""),
                );
                return vec![];
            }
        }
    };
    if raw.model_name.matches('*').count() > 1 {
        loader.problem(format!("{path}.model_name"), "at most one '*' wildcard");
    }

    let mut default_params = Map::new();
    let mut provider_params = Map::new();
    for (k, v) in &params.rest {
        if REQUEST_PARAMS.contains(&k.as_str()) {
            default_params.insert(k.clone(), v.clone());
        } else if PROVIDER_PARAMS.contains(&k.as_str()) {
            provider_params.insert(k.clone(), v.clone());
        } else {
            loader.ignored.push(format!("{params_path}.{k}"));
        }
    }

    let api_base = params
        .api_base
        .or(params.base_url)
        .map(|b| b.trim_end_matches('/').to_string())
        .or_else(|| provider.default_api_base());
    if let Some(base) = &api_base {
        if !(base.starts_with("http://")
            || base.starts_with("https://")
            || base.starts_with("unix:"))
        {
            loader.problem(
                format!("{params_path}.api_base"),
                format!("an http://, https:// or unix:/path URL; got \"{base}\""),
            );
        }
    }
    let api_key = params.api_key.or_else(|| provider.default_api_key());

    let base_id = info.id.clone().unwrap_or_else(|| {
        // LiteLLM derives ids from the entry's params; a hash keeps them stable across restarts.
        let mut h = Sha256::new();
        h.update(raw.model_name.as_bytes());
        h.update(serde_json::to_vec(&raw.litellm_params).unwrap_or_default());
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    });

    let orgs: Vec<Option<String>> = match params.organization {
        Some(list) if list.len() > 1 => list.into_iter().map(Some).collect(),
        Some(list) => vec![list.into_iter().next()],
        None => vec![None],
    };
    let many = orgs.len() > 1;
    orgs.into_iter()
        .map(|organization| Deployment {
            id: match (&organization, many) {
                (Some(org), true) => format!("{base_id}-{org}"),
                _ => base_id.clone(),
            },
            model_name: raw.model_name.clone(),
            provider: provider.clone(),
            upstream_model: upstream_model.clone(),
            api_base: api_base.clone(),
            api_key: api_key.clone(),
            api_version: params.api_version.clone(),
            organization,
            extra_headers: params
                .extra_headers
                .clone()
                .unwrap_or_default()
                .into_iter()
                .collect(),
            rpm: params.rpm,
            tpm: params.tpm,
            weight: params.weight,
            order: params.order,
            timeout: secs(params.timeout),
            stream_timeout: secs(params.stream_timeout),
            max_retries: params.max_retries.map(|v| v as u32),
            max_parallel_requests: params.max_parallel_requests,
            cooldown_time: secs(params.cooldown_time),
            tags: params.tags.clone().unwrap_or_default(),
            drop_params: params.drop_params,
            input_cost_per_token: params.input_cost_per_token.or(info.input_cost_per_token),
            output_cost_per_token: params.output_cost_per_token.or(info.output_cost_per_token),
            default_params: default_params.clone(),
            provider_params: provider_params.clone(),
            model_info: ModelInfo {
                mode: info.mode.clone(),
                base_model: info.base_model.clone(),
                access_groups: info.access_groups.clone().unwrap_or_default(),
                max_tokens: info.max_tokens,
                max_input_tokens: info.max_input_tokens,
                max_output_tokens: info.max_output_tokens,
                health_check_model: info.health_check_model.clone(),
                health_check_timeout: secs(info.health_check_timeout),
                raw: info_map.clone(),
            },
        })
        .collect()
}

fn check_unique_ids(loader: &mut Loader, deployments: &[Deployment]) {
    let mut seen = BTreeMap::new();
    for (i, d) in deployments.iter().enumerate() {
        if let Some(prev) = seen.insert(d.id.clone(), i) {
            loader.problem(
                "model_list",
                format!(
                    "unique model_info.id values; \"{}\" is used by two entries (#{prev} and #{i})",
                    d.id
                ),
            );
        }
    }
}

fn check_fallback_targets(
    loader: &mut Loader,
    router: &RouterSettings,
    deployments: &[Deployment],
    aliases: &BTreeMap<String, GroupAlias>,
) {
    let known = |name: &str| {
        aliases.contains_key(name)
            || deployments
                .iter()
                .any(|d| d.model_name == name || d.wildcard_capture(name).is_some())
    };
    for (alias, target) in aliases {
        if !known(&target.target) {
            loader.problem(
                format!("router_settings.model_group_alias.{alias}"),
                format!(
                    "a model_name from model_list; \"{}\" is not one",
                    target.target
                ),
            );
        }
    }
    let lists = [
        ("fallbacks", &router.fallbacks),
        ("context_window_fallbacks", &router.context_window_fallbacks),
        ("content_policy_fallbacks", &router.content_policy_fallbacks),
    ];
    for (name, list) in lists {
        for (group, targets) in list {
            for t in targets {
                if !known(t) {
                    loader.problem(
                        format!("router_settings.{name}.{group}"),
                        format!("model_name values from model_list; \"{t}\" is not one"),
                    );
                }
            }
        }
    }
}
