//! OpenAI inference calls: pick a deployment, call it, and on a failure that reached no client
//! byte retry within the group (`num_retries`, `retry_policy`) and then walk the fallbacks
//! (`fallbacks`, `context_window_fallbacks`, `content_policy_fallbacks`, `default_fallbacks`).
//! Success is streamed (SSE chunk by chunk, usage captured) or forwarded whole.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use sluice_config::{split_model, Deployment};
use sluice_filters::auth::Principal;
use sluice_filters::body::RequestBody;
use sluice_filters::classify::FailureKind;
use sluice_filters::ingress::{anthropic_error_body, openai_to_message, OpenAiToAnthropicStream};
use sluice_filters::provider::{
    anthropic, bedrock, CallOptions, Operation, Provider, StreamDecoder,
};
use sluice_filters::usage::Usage;
use sluice_filters::ApiError;

use crate::app::{App, MAX_ERROR_BODY_BYTES};
use crate::gateway::{client_gone, read_body, Ctx};
use crate::metrics::{deployment_labels, deployment_labels_with_status};
use crate::respond::{self, names};
use crate::router::{DeploymentState, FallbackKind, Group, Picked};
use crate::target::Target;
use crate::upstream::{Call, CallError, OpenResponse};

/// A failed attempt that reached no client byte.
#[derive(Debug, Clone)]
struct Failure {
    kind: FailureKind,
    /// The upstream's status, when it answered.
    status: Option<u16>,
    message: String,
    retry_after: Option<u64>,
    provider: String,
    /// No deployment could be picked at all (group cooling down or at its limits).
    no_deployment: bool,
    /// An answer decided by Sluice itself (unsupported provider, bad api_base).
    fixed: Option<ApiError>,
}

impl Failure {
    fn plain(kind: FailureKind, provider: String) -> Failure {
        Failure {
            kind,
            status: None,
            message: String::new(),
            retry_after: None,
            provider,
            no_deployment: false,
            fixed: None,
        }
    }

    fn fallback_kind(&self) -> Option<FallbackKind> {
        if self.fixed.is_some() {
            return Some(FallbackKind::General);
        }
        match self.kind {
            FailureKind::ContextWindowExceeded => Some(FallbackKind::ContextWindow),
            FailureKind::ContentPolicy => Some(FallbackKind::ContentPolicy),
            FailureKind::BadRequest => None,
            _ => Some(FallbackKind::General),
        }
    }

    /// The error the client finally sees, in LiteLLM's wording.
    fn into_api_error(self) -> ApiError {
        if let Some(e) = self.fixed {
            return e;
        }
        let provider = provider_title(&self.provider);
        let (status, kind, class) = match (self.kind, self.status) {
            (_, _) if self.no_deployment => (429, "rate_limit_error", "RateLimitError"),
            (FailureKind::Timeout, _) => (408, "timeout", "Timeout"),
            (FailureKind::Connect, _) => (502, "internal_server_error", "APIConnectionError"),
            (FailureKind::ContextWindowExceeded, _) => {
                (400, "bad_request_error", "ContextWindowExceededError")
            }
            (FailureKind::ContentPolicy, _) => {
                (400, "bad_request_error", "ContentPolicyViolationError")
            }
            (FailureKind::RateLimit, s) => (s.unwrap_or(429), "rate_limit_error", "RateLimitError"),
            (FailureKind::Auth, s) => (s.unwrap_or(401), "auth_error", "AuthenticationError"),
            (FailureKind::NotFound, _) => (404, "not_found_error", "NotFoundError"),
            (FailureKind::BadRequest, s) => {
                (s.unwrap_or(400), "bad_request_error", "BadRequestError")
            }
            (FailureKind::Server, Some(503)) => {
                (503, "service_unavailable", "ServiceUnavailableError")
            }
            (FailureKind::Server, s) => (
                s.unwrap_or(500),
                "internal_server_error",
                "InternalServerError",
            ),
        };
        let message = if self.no_deployment {
            self.message
        } else {
            format!("litellm.{class}: {provider}Exception - {}", self.message)
        };
        let mut e = ApiError::new(status, kind, message);
        e.retry_after = self.retry_after.or((status == 429).then_some(1));
        e
    }
}

fn provider_title(p: &str) -> String {
    match p {
        "openai" | "text-completion-openai" => "OpenAI".into(),
        "hosted_vllm" | "vllm" => "Hosted_vllm".into(),
        other => {
            let mut c = other.chars();
            c.next()
                .map(|f| f.to_uppercase().collect::<String>() + c.as_str())
                .unwrap_or_default()
        }
    }
}

/// Removes upstream secrets from a message before it can reach a client or a log.
fn redact_secrets(message: &str, d: &Deployment) -> String {
    let mut out = message.to_string();
    if let Some(k) = d.api_key.as_deref().filter(|k| k.len() >= 4) {
        out = out.replace(k, "****");
    }
    // Key-like tokens (`sk-...`) are shortened to their last four characters.
    out.split_inclusive(|c: char| c.is_whitespace() || c == '"' || c == '\'')
        .map(|tok| {
            let trimmed =
                tok.trim_end_matches(|c: char| c.is_whitespace() || c == '"' || c == '\'');
            if trimmed.starts_with("sk-") && trimmed.len() > 12 {
                let tail = &trimmed[trimmed.len() - 4..];
                tok.replacen(trimmed, &format!("sk-...{tail}"), 1)
            } else {
                tok.to_string()
            }
        })
        .collect()
}

/// The upstream error's message: `error.message` of an OpenAI-shaped body, else the text.
fn upstream_message(body: &[u8]) -> String {
    let from_json = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            v.pointer("/error/message")
                .or_else(|| v.get("message"))
                .or_else(|| v.get("detail"))
                .and_then(|m| m.as_str().map(str::to_string))
        });
    from_json.unwrap_or_else(|| {
        let text = String::from_utf8_lossy(body);
        text.chars().take(500).collect()
    })
}

/// Tags from the body's `tags` or `metadata.tags` (LiteLLM accepts both).
fn request_tags(body: &RequestBody<'_>) -> Vec<String> {
    let parse = |raw: Option<&str>| -> Option<Vec<String>> {
        serde_json::from_str::<Vec<String>>(raw?).ok()
    };
    parse(body.raw("tags"))
        .or_else(|| {
            let meta: serde_json::Value = serde_json::from_str(body.raw("metadata")?).ok()?;
            serde_json::from_value(meta.get("tags")?.clone()).ok()
        })
        .unwrap_or_default()
}

/// Retries and fallbacks made for one client request (reported in headers).
#[derive(Default)]
struct Attempts {
    retries: u32,
    fallbacks: u32,
}

enum Outcome {
    Served,
    ClientGone,
    Failed(Failure),
}

/// Everything needed to call one deployment for this request.
struct Plan<'a> {
    provider: Provider,
    target: Target,
    upstream_model: String,
    deployment: std::borrow::Cow<'a, Deployment>,
}

/// Resolves wildcards: `model: "*"` infers the provider from the requested name.
fn plan<'a>(d: &'a DeploymentState, requested: &str) -> Result<Plan<'a>, ApiError> {
    let c = &d.config;
    if c.upstream_model == "*" && c.model_name.contains('*') {
        let captured = c.wildcard_capture(requested).unwrap_or(requested);
        let (provider, model) = split_model(captured).ok_or_else(|| {
            ApiError::bad_request(format!(
                "Could not infer a provider for model={requested}. Use <provider>/<model>, e.g. openai/gpt-4o."
            ))
            .with_param("model")
        })?;
        let mut concrete = c.clone();
        concrete.api_base = c
            .api_base
            .clone()
            .filter(|_| provider == c.provider)
            .or_else(|| provider.default_api_base());
        concrete.api_key = c
            .api_key
            .clone()
            .filter(|_| provider == c.provider)
            .or_else(|| provider.default_api_key());
        concrete.provider = provider;
        concrete.upstream_model = model.clone();
        let target = match &concrete.api_base {
            Some(b) => {
                Target::parse(b).map_err(|e| ApiError::new(500, "internal_server_error", e))?
            }
            None => {
                return Err(ApiError::bad_request(format!(
                "No api_base known for provider {}; configure a deployment for model={requested}",
                concrete.provider
            )))
            }
        };
        return Ok(Plan {
            provider: Provider::for_deployment(&concrete)?,
            target,
            upstream_model: model,
            deployment: std::borrow::Cow::Owned(concrete),
        });
    }
    let provider = d.provider.clone()?;
    let target = d.target.clone().map_err(|e| {
        ApiError::new(
            500,
            "internal_server_error",
            format!("deployment {} is misconfigured: {e}", c.id),
        )
    })?;
    Ok(Plan {
        provider,
        target,
        upstream_model: c.upstream_model_for(requested),
        deployment: std::borrow::Cow::Borrowed(c),
    })
}

pub async fn handle(
    app: &App,
    session: &mut Session,
    ctx: &mut Ctx,
    principal: &Principal,
    op: Operation,
    path_model: Option<String>,
) -> Result<(), ApiError> {
    let raw = read_body(session, app.max_request_bytes).await?;
    serve(app, session, ctx, principal, op, path_model, &raw).await
}

/// `POST /v1/messages` in Anthropic's format, served by any deployment.
pub async fn handle_anthropic_messages(
    app: &App,
    session: &mut Session,
    ctx: &mut Ctx,
    principal: &Principal,
) -> Result<(), ApiError> {
    let raw = read_body(session, app.max_request_bytes).await?;
    let (openai, _) = sluice_filters::ingress::messages_to_openai(&raw)?;
    ctx.ingress = Some(raw);
    let openai = serde_json::to_vec(&openai).expect("json serializes");
    serve(
        app,
        session,
        ctx,
        principal,
        Operation::ChatCompletions,
        None,
        &openai,
    )
    .await
}

/// `POST /v1/messages/count_tokens`: asked of the deployment itself when it is Anthropic,
/// else counted here with the cl100k tokenizer (what LiteLLM's counter falls back to).
pub async fn handle_anthropic_count_tokens(
    app: &App,
    session: &mut Session,
    ctx: &mut Ctx,
) -> Result<(), ApiError> {
    let raw = read_body(session, app.max_request_bytes).await?;
    let req: serde_json::Value = serde_json::from_slice(&raw)
        .map_err(|e| ApiError::bad_request(format!("Invalid request body: malformed JSON: {e}")))?;
    let model = req["model"]
        .as_str()
        .ok_or_else(|| ApiError::bad_request("model: Field required").with_param("model"))?
        .to_string();
    ctx.requested_model = Some(model.clone());
    let group = app.router.resolve(&model).ok_or_else(|| ApiError {
        status: 404,
        kind: "not_found_error",
        ..ApiError::unknown_model(&model)
    })?;
    let anthropic_deployment = group
        .deployments
        .iter()
        .find(|d| d.provider == Ok(Provider::Anthropic) && d.target.is_ok());
    if let Some(d) = anthropic_deployment {
        let p = plan(d, &model)?;
        let mut native = native_anthropic_request(&raw, &p, session)?;
        native.path = "/v1/messages/count_tokens".into();
        let path = join_path(&p.target.path_prefix, &native.path);
        let call = Call {
            target: &p.target,
            method: "POST",
            path: &path,
            headers: &native.headers,
            body: Bytes::from(native.body),
            timeout: p.deployment.call_timeout(false, &app.router.settings),
        };
        let sent = Instant::now();
        let mut resp = app.upstream.send(&call).await.map_err(|e| {
            ApiError::new(
                502,
                "internal_server_error",
                format!("litellm.APIConnectionError: AnthropicException - {e}"),
            )
        })?;
        let body = app
            .upstream
            .read_all(&mut resp, MAX_ERROR_BODY_BYTES)
            .await
            .map_err(|e| ApiError::new(502, "internal_server_error", e.to_string()))?;
        ctx.upstream_wait += sent.elapsed();
        let status = resp.header.status.as_u16();
        app.upstream.release(resp).await;
        ctx.status = status;
        respond::send_json(session, status, &ctx.call_id, body, &[]).await;
        return Ok(());
    }
    let tokens = count_message_tokens(&req);
    ctx.status = 200;
    respond::send_json(
        session,
        200,
        &ctx.call_id,
        serde_json::to_vec(&serde_json::json!({"input_tokens": tokens})).expect("json serializes"),
        &[],
    )
    .await;
    Ok(())
}

/// Tokens of the text an Anthropic request carries (system, messages, tool definitions).
fn count_message_tokens(req: &serde_json::Value) -> usize {
    fn texts<'a>(v: &'a serde_json::Value, out: &mut Vec<std::borrow::Cow<'a, str>>) {
        match v {
            serde_json::Value::String(s) => out.push(std::borrow::Cow::Borrowed(s)),
            serde_json::Value::Array(items) => items.iter().for_each(|i| texts(i, out)),
            serde_json::Value::Object(o) => {
                for (k, v) in o {
                    match k.as_str() {
                        "text" | "content" | "thinking" => texts(v, out),
                        "input" | "input_schema" => {
                            out.push(std::borrow::Cow::Owned(v.to_string()))
                        }
                        "name" | "description" => texts(v, out),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    let mut parts = vec![];
    texts(&req["system"], &mut parts);
    texts(&req["messages"], &mut parts);
    texts(&req["tools"], &mut parts);
    let bpe = tiktoken_rs::cl100k_base_singleton();
    let per_message = req["messages"].as_array().map_or(0, Vec::len) * 3;
    parts
        .iter()
        .map(|p| bpe.encode_with_special_tokens(p).len())
        .sum::<usize>()
        + per_message
}

async fn serve(
    app: &App,
    session: &mut Session,
    ctx: &mut Ctx,
    principal: &Principal,
    op: Operation,
    path_model: Option<String>,
    raw: &[u8],
) -> Result<(), ApiError> {
    let body = RequestBody::parse(raw)?;
    let model = match path_model {
        Some(m) => m,
        None => body
            .str_field("model")?
            .ok_or_else(|| {
                ApiError::bad_request("Missing required parameter: 'model'").with_param("model")
            })?
            .into_owned(),
    };
    // A key's `aliases` rename the model it asks for.
    let model = match ctx
        .tenant
        .as_ref()
        .and_then(|k| k.key.aliases.get(&model))
        .and_then(|v| v.as_str())
    {
        Some(target) => target.to_string(),
        None => model,
    };
    ctx.requested_model = Some(model.clone());
    let required = op.required_field();
    if !body.contains(required) {
        return Err(
            ApiError::bad_request(format!("Missing required parameter: '{required}'"))
                .with_param(required),
        );
    }
    let stream = op != Operation::Embeddings && body.bool_field("stream")?.unwrap_or(false);
    let tags = if app.router.settings.enable_tag_filtering {
        request_tags(&body)
    } else {
        vec![]
    };
    if !principal.may_use(&model) {
        return Err(ApiError::new(
            401,
            "key_model_access_denied",
            format!("key not allowed to access model. This key can only access models={:?}. Tried to access {model}", principal.models.clone().unwrap_or_default()),
        ));
    }
    // The issue asks for 404 on an unknown model; the message keeps LiteLLM's wording.
    let group = app.router.resolve(&model).ok_or_else(|| ApiError {
        status: 404,
        kind: "not_found_error",
        ..ApiError::unknown_model(&model)
    })?;

    if let Some(max) = app.config.general.global_max_parallel_requests {
        if app.in_flight.load(Ordering::Relaxed) >= max {
            return Err(ApiError::new(
                429,
                "rate_limit_error",
                format!("Max parallel request limit reached: global_max_parallel_requests={max}"),
            )
            .with_retry_after(1));
        }
    }
    if let Some(t) = &app.tenancy {
        // Budgets and limits are checked (and the call counted) before any upstream call.
        let end_user = body
            .str_field("user")?
            .map(|u| u.into_owned())
            .or_else(|| ctx.end_user.clone());
        let group_name = app.router.dealias(&model).to_string();
        let allowed = |models: &[String]| {
            crate::admin::expand_models(app, models)
                .is_none_or(|m| m.iter().any(|x| *x == group_name || *x == model))
        };
        ctx.admission = Some(
            t.admit(
                ctx.tenant.as_ref(),
                &group_name,
                allowed,
                end_user.as_deref(),
                ctx.started_at,
            )
            .await?,
        );
        ctx.end_user = end_user;
    }
    app.in_flight.fetch_add(1, Ordering::Relaxed);
    let _global = GlobalInFlight(app);
    session.set_abort_on_close(true);

    let mut attempts = Attempts::default();
    let first_name = app.router.dealias(&model).to_string();
    let mut current = group;
    let mut current_name = first_name.clone();
    let mut fallbacks: Option<Vec<String>> = None;
    let mut next_fallback = 0usize;
    loop {
        match try_group(
            app,
            session,
            ctx,
            &current,
            &current_name,
            op,
            &body,
            stream,
            &tags,
            &mut attempts,
        )
        .await
        {
            Outcome::Served => {
                if attempts.fallbacks > 0 {
                    app.metrics
                        .successful_fallbacks
                        .with_label_values(&[&model, &current_name])
                        .inc();
                }
                return Ok(());
            }
            Outcome::ClientGone => {
                ctx.status = 499;
                return Ok(());
            }
            Outcome::Failed(f) => {
                if attempts.fallbacks > 0 {
                    app.metrics
                        .failed_fallbacks
                        .with_label_values(&[&model, &current_name])
                        .inc();
                }
                if fallbacks.is_none() {
                    fallbacks = Some(
                        f.fallback_kind()
                            .map(|k| app.router.fallbacks_for(&first_name, k))
                            .unwrap_or_default(),
                    );
                }
                let list = fallbacks.as_deref().unwrap_or_default();
                let mut next = None;
                while next.is_none()
                    && next_fallback < list.len()
                    && attempts.fallbacks < app.router.settings.max_fallbacks
                {
                    let name = &list[next_fallback];
                    next_fallback += 1;
                    if let Some(g) = app.router.resolve(name) {
                        next = Some((g, app.router.dealias(name).to_string()));
                    }
                }
                match next {
                    Some((g, name)) => {
                        tracing::debug!(call_id = %ctx.call_id, from = %current_name, to = %name, "falling back");
                        attempts.fallbacks += 1;
                        current = g;
                        current_name = name;
                    }
                    None => {
                        let e = f.into_api_error();
                        let extra = attempt_headers(&attempts, app);
                        ctx.status = e.status;
                        respond::send_error(
                            session,
                            &ctx.call_id,
                            &e,
                            &extra,
                            ctx.ingress.is_some(),
                        )
                        .await;
                        return Ok(());
                    }
                }
            }
        }
    }
}

struct GlobalInFlight<'a>(&'a App);

impl Drop for GlobalInFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

fn attempt_headers(a: &Attempts, app: &App) -> Vec<(&'static str, String)> {
    vec![
        ("x-litellm-attempted-retries", a.retries.to_string()),
        ("x-litellm-attempted-fallbacks", a.fallbacks.to_string()),
        (
            "x-litellm-max-fallbacks",
            app.router.settings.max_fallbacks.to_string(),
        ),
    ]
}

#[allow(clippy::too_many_arguments)]
async fn try_group(
    app: &App,
    session: &mut Session,
    ctx: &mut Ctx,
    group: &Group,
    requested: &str,
    op: Operation,
    body: &RequestBody<'_>,
    stream: bool,
    tags: &[String],
    attempts: &mut Attempts,
) -> Outcome {
    let mut tried: Vec<usize> = vec![];
    let mut retries_used = 0u32;
    let mut last: Option<Failure> = None;
    loop {
        let picked = match app.router.select_tagged(group, &tried, stream, tags) {
            Ok(p) => p,
            Err(nd) if nd.no_tag_match => {
                return Outcome::Failed(Failure {
                    fixed: Some(ApiError::bad_request(format!(
                        "No deployment of model={requested} matches the request tags {tags:?} (enable_tag_filtering is on)"
                    ))),
                    ..Failure::plain(FailureKind::BadRequest, String::new())
                })
            }
            Err(nd) => {
                return Outcome::Failed(last.unwrap_or_else(|| Failure {
                    kind: FailureKind::RateLimit,
                    status: Some(429),
                    message: format!(
                        "No deployments available for selected model, Try again in {} seconds. Passed model={requested}. There are cooldown or rate-limited deployments for this model group.",
                        nd.retry_after
                    ),
                    retry_after: Some(nd.retry_after),
                    provider: String::new(),
                    no_deployment: true,
                    fixed: None,
                }))
            }
        };
        tried.push(picked.index);
        let result = attempt(
            app, session, ctx, &picked, requested, op, body, stream, attempts,
        )
        .await;
        let failure = match result {
            Outcome::Failed(f) => f,
            other => return other,
        };
        let d = picked.deployment.clone();
        drop(picked);
        if failure.fixed.is_none() {
            record_failure(app, &d, &failure);
        }
        let allowed = app.router.retries_for(failure.kind, &d.config);
        if failure.fixed.is_some() || !failure.kind.retryable() || retries_used >= allowed {
            return Outcome::Failed(failure);
        }
        retries_used += 1;
        attempts.retries += 1;
        // Wait only when the retry must go back to a deployment that just failed.
        let others_left = group.deployments.len() > tried.len();
        let wait = if others_left {
            app.router.settings.retry_after
        } else {
            app.router.settings.retry_after.max(Duration::from_secs(
                failure.retry_after.unwrap_or(0).min(10),
            ))
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        tracing::debug!(call_id = %ctx.call_id, deployment = d.id(), kind = ?failure.kind, "retrying");
        last = Some(failure);
    }
}

fn record_failure(app: &App, d: &DeploymentState, f: &Failure) {
    let c = &d.config;
    let status = f
        .status
        .map_or_else(|| "None".to_string(), |s| s.to_string());
    app.metrics
        .deployment_failure
        .with_label_values(&deployment_labels_with_status(c, &status))
        .inc();
    app.metrics
        .llm_api_failed_legacy
        .with_label_values(&[&c.model_name])
        .inc();
    if app.router.observe_failure(d, f.kind) {
        app.metrics
            .deployment_cooled_down
            .with_label_values(&deployment_labels_with_status(c, &status))
            .inc();
    }
}

#[allow(clippy::too_many_arguments)]
async fn attempt(
    app: &App,
    session: &mut Session,
    ctx: &mut Ctx,
    picked: &Picked,
    requested: &str,
    op: Operation,
    body: &RequestBody<'_>,
    stream: bool,
    attempts: &Attempts,
) -> Outcome {
    let d = &picked.deployment;
    let fixed = |e: ApiError| {
        Outcome::Failed(Failure {
            kind: FailureKind::BadRequest,
            status: Some(e.status),
            message: e.message.clone(),
            retry_after: None,
            provider: d.config.provider.to_string(),
            no_deployment: false,
            fixed: Some(e),
        })
    };
    let plan = match plan(d, requested) {
        Ok(p) => p,
        Err(e) => return fixed(e),
    };
    // Anthropic-format ingress to an Anthropic deployment: the client's own body goes upstream.
    let native = ctx.ingress.is_some() && plan.provider == Provider::Anthropic;
    let mut upstream_body = body.clone();
    let built = if native {
        native_anthropic_request(ctx.ingress.as_deref().unwrap_or_default(), &plan, session)
    } else {
        plan.provider.build_request(
            op,
            &mut upstream_body,
            &plan.deployment,
            &plan.upstream_model,
            stream,
            &CallOptions {
                drop_params: plan
                    .deployment
                    .drop_params
                    .unwrap_or(app.router.settings.drop_params),
            },
        )
    };
    let req = match built {
        Ok(r) => r,
        Err(e) => return fixed(e),
    };
    let mut headers = req.headers;
    if app.config.general.forward_client_headers_to_llm_api {
        forward_client_headers(session, &mut headers);
    }
    let path = join_path(&plan.target.path_prefix, &req.path);
    if plan.provider == Provider::VertexAi {
        match app
            .google_tokens
            .bearer(&app.upstream, &plan.deployment)
            .await
        {
            Ok(token) => headers.push(("authorization".into(), format!("Bearer {token}"))),
            Err(e) => return fixed(e),
        }
    }
    // Bedrock without an API key: SigV4 over the final method, host, path, headers and body.
    if plan.provider == Provider::Bedrock && plan.deployment.api_key.is_none() {
        let Some((creds, region)) = bedrock::credentials_from(&plan.deployment) else {
            return fixed(ApiError::new(
                401,
                "auth_error",
                format!(
                    "No AWS credentials for deployment {}: set aws_access_key_id/aws_secret_access_key or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY",
                    plan.deployment.id
                ),
            ));
        };
        let signed = bedrock::sign_request(
            "POST",
            &plan.target.authority,
            &path,
            &headers,
            &req.body,
            &creds,
            &region,
            bedrock::SERVICE,
            std::time::SystemTime::now(),
        );
        headers.extend(signed);
    }
    let timeout = plan.deployment.call_timeout(stream, &app.router.settings);
    let call = Call {
        target: &plan.target,
        method: "POST",
        path: &path,
        headers: &headers,
        body: Bytes::from(req.body),
        timeout,
    };
    let c = &d.config;
    app.metrics
        .deployment_total
        .with_label_values(&deployment_labels(c))
        .inc();
    app.metrics
        .requests_legacy
        .with_label_values(&[&c.model_name])
        .inc();

    let sent = Instant::now();
    let response = tokio::select! {
        r = app.upstream.send(&call) => r,
        _ = client_gone(session) => return Outcome::ClientGone,
    };
    ctx.upstream_wait += sent.elapsed();
    let failure =
        |kind: FailureKind, status: Option<u16>, message: String, retry_after: Option<u64>| {
            Outcome::Failed(Failure {
                kind,
                status,
                message: redact_secrets(&message, &plan.deployment),
                retry_after,
                provider: plan.deployment.provider.to_string(),
                no_deployment: false,
                fixed: None,
            })
        };
    let mut resp = match response {
        Ok(r) => r,
        Err(CallError::Timeout) => {
            return failure(
                FailureKind::Timeout,
                None,
                format!(
                    "Request timed out after {:.1} seconds",
                    timeout.as_secs_f64()
                ),
                None,
            )
        }
        Err(e) => return failure(FailureKind::Connect, None, e.to_string(), None),
    };
    let status = resp.header.status.as_u16();
    if status >= 400 {
        let retry_after = resp
            .header
            .headers
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map(|v| v.ceil() as u64);
        let err_body = app
            .upstream
            .read_all(&mut resp, MAX_ERROR_BODY_BYTES)
            .await
            .unwrap_or_default();
        app.upstream.release(resp).await;
        let kind = plan.provider.classify_error(status, &err_body);
        return failure(kind, Some(status), upstream_message(&err_body), retry_after);
    }

    // A stream comes as SSE, NDJSON (Ollama) or AWS event-stream frames (Bedrock); a server
    // that ignored `stream: true` answers plain JSON, which is forwarded whole.
    let streamed = !resp
        .header
        .headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let mut extra = attempt_headers(attempts, app);
    extra.push(("x-litellm-model-id", c.id.clone()));
    extra.push(("x-litellm-model-api-base", plan.target.display_base()));
    extra.push(("x-litellm-model-group", c.model_name.clone()));
    let client_model = ctx
        .requested_model
        .clone()
        .unwrap_or_else(|| requested.to_string());
    let client_stream = ClientStream {
        decoder: plan.provider.stream_decoder(
            op,
            req.injected_stream_usage,
            body.wants_stream_usage(),
            &plan.upstream_model,
        ),
        to_anthropic: (ctx.ingress.is_some() && !native)
            .then(|| OpenAiToAnthropicStream::new(&client_model)),
        passthrough: native,
        scratch: Vec::new(),
    };
    let served = if stream && streamed {
        stream_response(
            app,
            session,
            ctx,
            picked,
            &plan,
            resp,
            client_stream,
            sent,
            extra,
        )
        .await
    } else {
        whole_response(
            app, session, ctx, picked, &plan, op, native, resp, sent, extra,
        )
        .await
    };
    match served {
        Ok(o) => o,
        Err(e) => failure(FailureKind::Connect, None, e.to_string(), None),
    }
}

/// Turns upstream stream bytes into what the client receives, in the client's format.
struct ClientStream {
    decoder: StreamDecoder,
    /// Anthropic-format ingress: the OpenAI chunks are re-encoded as Anthropic events.
    to_anthropic: Option<OpenAiToAnthropicStream>,
    /// Native Anthropic ingress: upstream bytes go out unchanged; the decoder only reads usage.
    passthrough: bool,
    scratch: Vec<u8>,
}

impl ClientStream {
    fn feed(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        self.scratch.clear();
        if self.passthrough {
            self.decoder.feed(chunk, &mut self.scratch);
            out.extend_from_slice(chunk);
        } else if let Some(a) = &mut self.to_anthropic {
            self.decoder.feed(chunk, &mut self.scratch);
            a.feed(&self.scratch, out);
        } else {
            self.decoder.feed(chunk, out);
        }
    }

    fn finish(&mut self, out: &mut Vec<u8>) {
        self.scratch.clear();
        if self.passthrough {
            self.decoder.finish(&mut self.scratch);
        } else if let Some(a) = &mut self.to_anthropic {
            self.decoder.finish(&mut self.scratch);
            a.feed(&self.scratch, out);
            a.finish(out);
        } else {
            self.decoder.finish(out);
        }
    }

    fn usage(&self) -> Option<Usage> {
        self.decoder.usage()
    }

    /// A mid-stream failure, reported in-band in the client's format.
    fn error_event(&mut self, err: &ApiError, out: &mut Vec<u8>) {
        if self.passthrough || self.to_anthropic.is_some() {
            let body = String::from_utf8_lossy(&anthropic_error_body(err)).into_owned();
            out.extend_from_slice(format!("event: error\ndata: {body}\n\n").as_bytes());
        } else {
            out.extend_from_slice(
                format!("data: {}\n\n", String::from_utf8_lossy(&err.body())).as_bytes(),
            );
        }
    }
}

/// The client's Anthropic body for an Anthropic deployment: only `model` changes; the client's
/// `anthropic-version` and `anthropic-beta` are kept.
fn native_anthropic_request(
    raw: &[u8],
    plan: &Plan<'_>,
    session: &Session,
) -> Result<sluice_filters::provider::UpstreamRequest, ApiError> {
    let mut body: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(raw)
        .map_err(|e| ApiError::bad_request(format!("Invalid request body: malformed JSON: {e}")))?;
    body.insert(
        "model".into(),
        serde_json::Value::String(plan.upstream_model.clone()),
    );
    let client = |name: &str| {
        session
            .req_header()
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let d = &plan.deployment;
    let mut headers = vec![(
        "anthropic-version".to_string(),
        client("anthropic-version").unwrap_or_else(|| anthropic::API_VERSION.to_string()),
    )];
    if let Some(beta) = client("anthropic-beta") {
        headers.push(("anthropic-beta".into(), beta));
    }
    if let Some(k) = &d.api_key {
        headers.push(("x-api-key".into(), k.clone()));
    }
    headers.extend(d.extra_headers.iter().cloned());
    Ok(sluice_filters::provider::UpstreamRequest {
        path: "/v1/messages".into(),
        headers,
        body: serde_json::to_vec(&body).expect("json serializes"),
        injected_stream_usage: false,
    })
}

/// Joins a base path prefix and a provider path, without doubling a `/v1` that both carry
/// (`https://api.anthropic.com/v1` + `/v1/messages`).
fn join_path(prefix: &str, path: &str) -> String {
    match (prefix.strip_suffix("/v1"), path.strip_prefix("/v1/")) {
        (Some(_), Some(rest)) => format!("{prefix}/{rest}"),
        _ => format!("{prefix}{path}"),
    }
}

/// Client headers forwarded with `forward_client_headers_to_llm_api`: `x-*` (not keys) and
/// `anthropic-beta`.
fn forward_client_headers(session: &Session, headers: &mut Vec<(String, String)>) {
    for (name, value) in session.req_header().headers.iter() {
        let n = name.as_str();
        let forward = (n.starts_with("x-") && n != "x-api-key" && !n.starts_with("x-litellm"))
            || n == "anthropic-beta";
        if forward {
            if let Ok(v) = value.to_str() {
                headers.push((n.to_string(), v.to_string()));
            }
        }
    }
}

/// The client's response header: the upstream's own headers (hop-by-hop ones dropped) re-sent
/// as `llm_provider-*`, plus Sluice's.
fn client_header(
    ctx: &mut Ctx,
    upstream: &ResponseHeader,
    extra: &[(&'static str, String)],
    content_type: Option<&str>,
) -> ResponseHeader {
    let (total_ms, overhead_ms) = ctx.durations_ms(ctx.arrived.elapsed());
    let admission = ctx.admission.as_ref().map_or(0, |a| a.headers.len());
    // Cost, two durations, content type and length, and what the upstream sent.
    let more = admission + 5 + upstream.headers.len();
    let mut h = respond::standard_headers(&ctx.call_id, extra, more);
    // Taken, not cloned: this is the one response they go on, and a clone of a `HeaderValue`
    // made from a number allocates.
    if let Some(a) = ctx.admission.as_mut() {
        for (k, v) in std::mem::take(&mut a.headers) {
            h.insert(k, v);
        }
    }
    let mut put = |name, value: String| {
        if let Ok(v) = HeaderValue::try_from(value) {
            h.insert(name, v);
        }
    };
    if let Some(s) = &ctx.served {
        put(names::RESPONSE_COST, s.cost.to_string());
    }
    put(names::RESPONSE_DURATION_MS, format!("{total_ms:.3}"));
    put(names::OVERHEAD_DURATION_MS, format!("{overhead_ms:.3}"));
    for (name, value) in upstream.headers.iter() {
        let n = name.as_str();
        if respond::is_hop_header(n) || n == "content-type" || n == "date" || n == "server" {
            continue;
        }
        if let Ok(name) = HeaderName::try_from(format!("llm_provider-{n}")) {
            h.append(name, value.clone());
        }
    }
    let ct = match content_type {
        Some(ct) => HeaderValue::from_str(ct).ok(),
        None => upstream.headers.get(CONTENT_TYPE).cloned(),
    };
    h.insert(
        CONTENT_TYPE,
        ct.unwrap_or(HeaderValue::from_static("application/json")),
    );
    respond::response_header(upstream.status.as_u16(), h)
}

fn record_success(
    app: &App,
    picked: &Picked,
    total: Duration,
    ttft: Option<Duration>,
    usage: Option<Usage>,
    model: &str,
) {
    let d = &picked.deployment;
    let c = &d.config;
    let tokens = usage.map_or(0, |u| {
        u.total_tokens.max(u.prompt_tokens + u.completion_tokens)
    });
    app.router.observe_success(d, total, ttft, tokens);
    let m = &app.metrics;
    m.deployment_success
        .with_label_values(&deployment_labels(c))
        .inc();
    m.llm_api_latency
        .with_label_values(&[model])
        .observe(total.as_secs_f64());
    if let Some(t) = ttft {
        m.time_to_first_token
            .with_label_values(&[model])
            .observe(t.as_secs_f64());
    }
    if let Some(u) = usage {
        m.total_tokens.with_label_values(&[model]).inc_by(tokens);
        m.input_tokens
            .with_label_values(&[model])
            .inc_by(u.prompt_tokens);
        m.output_tokens
            .with_label_values(&[model])
            .inc_by(u.completion_tokens);
        if u.completion_tokens > 0 {
            m.latency_per_output_token
                .with_label_values(&deployment_labels(c))
                .observe(total.as_secs_f64() / u.completion_tokens as f64);
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn whole_response(
    app: &App,
    session: &mut Session,
    ctx: &mut Ctx,
    picked: &Picked,
    plan: &Plan<'_>,
    op: Operation,
    native: bool,
    mut resp: OpenResponse,
    sent: Instant,
    extra: Vec<(&'static str, String)>,
) -> Result<Outcome, CallError> {
    let read_start = Instant::now();
    let body = app
        .upstream
        .read_all(&mut resp, app.max_response_bytes)
        .await?;
    ctx.upstream_wait += read_start.elapsed();
    let total = sent.elapsed();
    let upstream_header = resp.header.clone();
    app.upstream.release(resp).await;
    let (translated, usage) = plan
        .provider
        .translate_response(op, &body, &plan.upstream_model)
        .map_err(|e| CallError::Protocol(e.message))?;
    let body = if native {
        // The client speaks Anthropic and so does the upstream: its bytes go out unchanged.
        body
    } else if ctx.ingress.is_some() {
        let openai = translated.map_or(body, Bytes::from);
        let model = ctx.requested_model.clone().unwrap_or_default();
        Bytes::from(
            openai_to_message(&openai, &model)
                .map_err(|e| CallError::Protocol(e.message))?
                .0,
        )
    } else {
        translated.map_or(body, Bytes::from)
    };
    record_success(
        app,
        picked,
        total,
        None,
        usage,
        &picked.deployment.config.model_name,
    );
    ctx.served = Some(served(ctx, picked, plan, usage, None));
    crate::gateway::settle_spend(app, ctx).await;
    let content_type =
        (!plan.provider.is_openai_native() || ctx.ingress.is_some()).then_some("application/json");
    let h = client_header(ctx, &upstream_header, &extra, content_type);
    ctx.status = upstream_header.status.as_u16();
    if !respond::send(session, h, body).await {
        return Ok(Outcome::ClientGone);
    }
    Ok(Outcome::Served)
}

#[allow(clippy::too_many_arguments)]
async fn stream_response(
    app: &App,
    session: &mut Session,
    ctx: &mut Ctx,
    picked: &Picked,
    plan: &Plan<'_>,
    mut resp: OpenResponse,
    mut decoder: ClientStream,
    sent: Instant,
    extra: Vec<(&'static str, String)>,
) -> Result<Outcome, CallError> {
    let mut h = client_header(ctx, &resp.header, &extra, Some("text/event-stream"));
    let _ = h.insert_header("cache-control", "no-cache");
    if !session.is_http2() {
        let _ = h.insert_header("transfer-encoding", "chunked");
    }
    ctx.status = resp.header.status.as_u16();
    if session
        .write_response_header(Box::new(h), false)
        .await
        .is_err()
    {
        return Ok(Outcome::ClientGone);
    }
    let mut out = Vec::with_capacity(4096);
    let mut ttft = None;
    loop {
        let waited = Instant::now();
        let next = tokio::select! {
            c = app.upstream.next_chunk(&mut resp) => c,
            _ = client_gone(session) => {
                // Dropping the open response closes the upstream connection: the upstream
                // sees the cancellation.
                tracing::debug!(call_id = %ctx.call_id, "client disconnected mid-stream");
                return Ok(Outcome::ClientGone);
            }
        };
        ctx.upstream_wait += waited.elapsed();
        out.clear();
        match next {
            Ok(Some(chunk)) => {
                if ttft.is_none() {
                    ttft = Some(sent.elapsed());
                }
                decoder.feed(&chunk, &mut out);
                if !out.is_empty()
                    && session
                        .write_response_body(Some(Bytes::copy_from_slice(&out)), false)
                        .await
                        .is_err()
                {
                    return Ok(Outcome::ClientGone);
                }
            }
            Ok(None) => {
                decoder.finish(&mut out);
                // Spend counts before the client sees the end, so its next call is checked
                // against it.
                ctx.served = Some(served(ctx, picked, plan, decoder.usage(), ttft));
                crate::gateway::settle_spend(app, ctx).await;
                let tail = (!out.is_empty()).then(|| Bytes::copy_from_slice(&out));
                let _ = session.write_response_body(tail, true).await;
                let total = sent.elapsed();
                app.upstream.release(resp).await;
                record_success(
                    app,
                    picked,
                    total,
                    ttft,
                    decoder.usage(),
                    &picked.deployment.config.model_name,
                );
                return Ok(Outcome::Served);
            }
            Err(e) => {
                // Bytes already reached the client: nothing can be retried. Tell it in-band.
                tracing::warn!(call_id = %ctx.call_id, deployment = picked.deployment.id(), error = %e, "upstream stream broke off");
                let err = ApiError::new(
                    502,
                    "internal_server_error",
                    format!("litellm.APIConnectionError: upstream stream ended early: {e}"),
                );
                let mut event = Vec::new();
                decoder.error_event(&err, &mut event);
                let _ = session
                    .write_response_body(Some(Bytes::from(event)), true)
                    .await;
                record_failure(
                    app,
                    &picked.deployment,
                    &Failure {
                        kind: FailureKind::Connect,
                        status: None,
                        message: e.to_string(),
                        retry_after: None,
                        provider: plan.deployment.provider.to_string(),
                        no_deployment: false,
                        fixed: None,
                    },
                );
                return Ok(Outcome::Served);
            }
        }
    }
}

/// What answered a call and what it cost, for the spend log and the cost header.
/// Priced by the model actually called: for a wildcard deployment that is the one resolved
/// from the request, not the `*` pattern.
fn served(
    ctx: &Ctx,
    picked: &Picked,
    plan: &Plan<'_>,
    usage: Option<Usage>,
    ttft: Option<Duration>,
) -> crate::gateway::Served {
    let group = &picked.deployment.config;
    let c = &*plan.deployment;
    let usage = usage.unwrap_or_default();
    // A wildcard's concrete deployment is made per request; the others share their names.
    let mut labels = match &plan.deployment {
        std::borrow::Cow::Borrowed(_) => picked.deployment.labels.clone(),
        std::borrow::Cow::Owned(concrete) => crate::router::Labels::of(concrete),
    };
    if group.is_wildcard() {
        labels.model_group = ctx.requested_model.as_deref().unwrap_or_default().into();
    }
    if *labels.model != plan.upstream_model {
        labels.model = plan.upstream_model.as_str().into();
    }
    crate::gateway::Served {
        cost: crate::tenancy::cost_for(
            c.provider.name(),
            &plan.upstream_model,
            c.model_info.base_model.as_deref(),
            (c.input_cost_per_token, c.output_cost_per_token),
            usage.prompt_tokens,
            usage.completion_tokens,
        ),
        labels,
        usage,
        ttft,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_keys_in_upstream_messages() {
        let c = sluice_config::parse_config(
            "model_list: [{model_name: g, litellm_params: {model: openai/x, api_key: sk-supersecretvalue}}]",
            std::path::Path::new("t.yaml"),
        )
        .unwrap();
        let d = &c.deployments[0];
        let m = redact_secrets(
            "Incorrect API key provided: sk-supersecretvalue. Also sk-anotherlongkey123",
            d,
        );
        assert!(!m.contains("supersecret"), "{m}");
        assert!(!m.contains("anotherlong"), "{m}");
        assert!(m.contains("sk-...y123"), "{m}");
    }
}
