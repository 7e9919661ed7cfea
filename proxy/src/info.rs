//! Discovery and health routes: `/models`, `/model/info`, `/model_group/info`,
//! `/health/readiness` and `/health` (a real call to each deployment).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde_json::{json, Map, Value};
use sluice_filters::auth::Principal;

use crate::app::App;
use crate::router::DeploymentState;
use crate::upstream::Call;

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn to_bytes(v: Value) -> Bytes {
    Bytes::from(serde_json::to_vec(&v).expect("json serializes"))
}

pub fn models(app: &App, p: &Principal) -> Bytes {
    let created = now_secs();
    let data: Vec<Value> = app
        .router
        .public_names()
        .into_iter()
        .filter(|n| p.may_use(n))
        .map(|id| json!({"id": id, "object": "model", "created": created, "owned_by": "openai"}))
        .collect();
    to_bytes(json!({"object": "list", "data": data}))
}

/// `litellm_params` as LiteLLM shows them: secrets removed.
fn public_params(d: &DeploymentState) -> Value {
    let c = &d.config;
    let mut m = Map::new();
    m.insert(
        "model".into(),
        json!(format!("{}/{}", c.provider, c.upstream_model)),
    );
    if let Some(b) = &c.api_base {
        m.insert("api_base".into(), json!(b));
    }
    for (k, v) in [
        ("rpm", c.rpm.map(|v| json!(v))),
        ("tpm", c.tpm.map(|v| json!(v))),
        ("weight", c.weight.map(|v| json!(v))),
        ("order", c.order.map(|v| json!(v))),
        ("api_version", c.api_version.as_ref().map(|v| json!(v))),
        ("timeout", c.timeout.map(|v| json!(v.as_secs_f64()))),
        (
            "stream_timeout",
            c.stream_timeout.map(|v| json!(v.as_secs_f64())),
        ),
        ("max_retries", c.max_retries.map(|v| json!(v))),
        (
            "input_cost_per_token",
            c.input_cost_per_token.map(|v| json!(v)),
        ),
        (
            "output_cost_per_token",
            c.output_cost_per_token.map(|v| json!(v)),
        ),
    ] {
        if let Some(v) = v {
            m.insert(k.into(), v);
        }
    }
    if !c.tags.is_empty() {
        m.insert("tags".into(), json!(c.tags));
    }
    for (k, v) in &c.default_params {
        m.insert(k.clone(), v.clone());
    }
    Value::Object(m)
}

fn info_of(d: &DeploymentState) -> Value {
    let c = &d.config;
    let mut info = c.model_info.raw.clone();
    info.insert("id".into(), json!(c.id));
    info.insert("mode".into(), json!(c.mode()));
    info.insert("litellm_provider".into(), json!(c.provider.name()));
    info.entry("input_cost_per_token")
        .or_insert(json!(c.input_cost_per_token));
    info.entry("output_cost_per_token")
        .or_insert(json!(c.output_cost_per_token));
    info.entry("max_input_tokens")
        .or_insert(json!(c.model_info.max_input_tokens));
    info.entry("max_output_tokens")
        .or_insert(json!(c.model_info.max_output_tokens));
    info.entry("max_tokens")
        .or_insert(json!(c.model_info.max_tokens));
    info.remove("supported_environments");
    Value::Object(info)
}

pub fn model_info(app: &App, p: &Principal) -> Bytes {
    let data: Vec<Value> = app
        .router
        .groups_in_order()
        .filter(|g| p.may_use(&g.name))
        .flat_map(|g| g.deployments.iter())
        .map(|d| json!({"model_name": d.config.model_name, "litellm_params": public_params(d), "model_info": info_of(d)}))
        .collect();
    to_bytes(json!({"data": data}))
}

pub fn model_group_info(app: &App, p: &Principal) -> Bytes {
    let data: Vec<Value> = app
        .router
        .groups_in_order()
        .filter(|g| p.may_use(&g.name))
        .map(|g| {
            let deps = || g.deployments.iter().map(|d| &d.config);
            let mut providers: Vec<&str> = deps().map(|c| c.provider.name()).collect();
            providers.dedup();
            let sum = |f: fn(&sluice_config::Deployment) -> Option<u64>| {
                let v: Vec<u64> = deps().filter_map(f).collect();
                (!v.is_empty()).then(|| v.iter().sum::<u64>())
            };
            let max = |f: fn(&sluice_config::Deployment) -> Option<u64>| deps().filter_map(f).max();
            let first_f = |f: fn(&sluice_config::Deployment) -> Option<f64>| deps().find_map(f);
            json!({
                "model_group": g.name,
                "providers": providers,
                "max_input_tokens": max(|c| c.model_info.max_input_tokens),
                "max_output_tokens": max(|c| c.model_info.max_output_tokens),
                "input_cost_per_token": first_f(|c| c.input_cost_per_token),
                "output_cost_per_token": first_f(|c| c.output_cost_per_token),
                "mode": g.deployments[0].config.mode(),
                "tpm": sum(|c| c.tpm),
                "rpm": sum(|c| c.rpm),
                "supports_function_calling": true,
                "supports_vision": false,
                "supported_openai_params": ["frequency_penalty", "logit_bias", "logprobs", "top_logprobs", "max_tokens", "max_completion_tokens", "n", "presence_penalty", "seed", "stop", "stream", "stream_options", "temperature", "top_p", "tools", "tool_choice", "parallel_tool_calls", "response_format", "user"],
            })
        })
        .collect();
    to_bytes(json!({"data": data}))
}

pub fn readiness(_app: &App) -> Bytes {
    to_bytes(json!({
        "status": "healthy",
        "db": "Not connected",
        "cache": null,
        "litellm_version": crate::respond::VERSION,
        "success_callbacks": [],
        "last_updated": humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
    }))
}

/// Health results by deployment id.
pub type HealthResults = Vec<(String, Result<(), String>)>;

/// One real call per deployment, by its mode; concurrently, each bounded by its health timeout.
pub async fn check_all(app: &App) -> HealthResults {
    let deps: Vec<_> = app
        .router
        .all_deployments()
        .filter(|d| !d.config.is_wildcard() || d.config.model_info.health_check_model.is_some())
        .cloned()
        .collect();
    let results = futures_util::future::join_all(deps.iter().map(|d| check_one(app, d))).await;
    deps.iter()
        .map(|d| d.id().to_string())
        .zip(results)
        .collect()
}

/// `/health`: fresh checks, or the background checker's latest round when it runs.
pub async fn health(app: &App, model: Option<&str>) -> Bytes {
    let cached = if app.config.general.background_health_checks {
        app.health_cache.lock().clone()
    } else {
        None
    };
    let results = match cached {
        Some(r) => r,
        None => check_all(app).await,
    };
    let mut healthy = vec![];
    let mut unhealthy = vec![];
    for d in app.router.all_deployments() {
        if model.is_some_and(|m| d.config.model_name != m) {
            continue;
        }
        let Some((_, r)) = results.iter().find(|(id, _)| id == d.id()) else {
            continue;
        };
        let mut entry = public_params(d);
        entry["model_id"] = json!(d.config.id);
        entry["model_name"] = json!(d.config.model_name);
        match r {
            Ok(()) => healthy.push(entry),
            Err(e) => {
                if app.config.general.health_check_details {
                    entry["error"] = json!(e);
                }
                unhealthy.push(entry)
            }
        }
    }
    to_bytes(json!({
        "healthy_endpoints": healthy,
        "unhealthy_endpoints": unhealthy,
        "healthy_count": healthy.len(),
        "unhealthy_count": unhealthy.len(),
    }))
}

/// `general_settings.background_health_checks`: re-checks every `health_check_interval` and
/// keeps the latest round for `/health`.
pub struct BackgroundHealth {
    pub app: std::sync::Arc<App>,
}

#[async_trait::async_trait]
impl pingora::services::background::BackgroundService for BackgroundHealth {
    async fn start(&self, mut shutdown: pingora::server::ShutdownWatch) {
        loop {
            let results = check_all(&self.app).await;
            *self.app.health_cache.lock() = Some(results);
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(self.app.config.general.health_check_interval) => {}
            }
        }
    }
}

async fn check_one(app: &App, d: &DeploymentState) -> Result<(), String> {
    let c = &d.config;
    let target = d.target.clone()?;
    let model = c
        .model_info
        .health_check_model
        .clone()
        .map(|m| {
            m.split_once('/')
                .map_or(m.clone(), |(_, rest)| rest.to_string())
        })
        .unwrap_or_else(|| c.upstream_model.clone());
    let (path, body) = match c.mode() {
        "embedding" => ("/embeddings", json!({"model": model, "input": "ping"})),
        "completion" => (
            "/completions",
            json!({"model": model, "prompt": "ping", "max_tokens": 1}),
        ),
        _ => (
            "/chat/completions",
            json!({"model": model, "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1}),
        ),
    };
    let mut headers = vec![];
    if let Some(k) = &c.api_key {
        headers.push(("authorization".to_string(), format!("Bearer {k}")));
    }
    headers.extend(c.extra_headers.iter().cloned());
    let path = format!("{}{}", target.path_prefix, path);
    let timeout = c
        .model_info
        .health_check_timeout
        .unwrap_or(Duration::from_secs(60));
    let call = Call {
        target: &target,
        method: "POST",
        path: &path,
        headers: &headers,
        body: Bytes::from(body.to_string()),
        timeout,
    };
    let mut resp = app.upstream.send(&call).await.map_err(|e| e.to_string())?;
    let status = resp.header.status.as_u16();
    let body = app
        .upstream
        .read_all(&mut resp, crate::app::MAX_ERROR_BODY_BYTES)
        .await
        .map_err(|e| e.to_string())?;
    app.upstream.release(resp).await;
    if status >= 400 {
        let msg = String::from_utf8_lossy(&body[..body.len().min(300)]).to_string();
        return Err(format!("status {status}: {msg}"));
    }
    Ok(())
}
