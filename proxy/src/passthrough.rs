//! Pass-through routes: `/vllm/{path}` and `general_settings.pass_through_endpoints`. The body and
//! the response go through unchanged (streams included, chunk by chunk); the client's key is
//! checked by the gateway and never forwarded, the backend's own credential is sent instead.

use std::time::{Duration, Instant};

use bytes::Bytes;
use pingora::proxy::Session;
use sluice_config::WireFormat;
use sluice_filters::auth::KEY_HEADERS;
use sluice_filters::body::RequestBody;
use sluice_filters::provider::{anthropic, bedrock};
use sluice_filters::usage::{PassthroughUsage, Usage};
use sluice_filters::ApiError;

use crate::app::App;
use crate::gateway::{client_gone, read_body, Ctx};
use crate::respond;
use crate::router::Picked;
use crate::target::Target;
use crate::upstream::{Call, CallError};

/// Pass-through calls are not bounded by the LLM timeouts' 6000 s default alone; vLLM's native
/// routes (metrics, tokenize, score) answer quickly, streams may run long.
const PASSTHROUGH_TIMEOUT: Duration = Duration::from_secs(600);

/// The custom endpoint matching a path, with the sub-path (and query) to append to its target.
pub fn match_custom(app: &App, path_and_query: &str) -> Option<(usize, String)> {
    let (path, query) = match path_and_query.split_once('?') {
        Some((p, q)) => (p, format!("?{q}")),
        None => (path_and_query, String::new()),
    };
    let path = path.trim_end_matches('/');
    app.config
        .general
        .pass_through_endpoints
        .iter()
        .enumerate()
        .find_map(|(i, e)| {
            if path == e.path {
                Some((i, query.clone()))
            } else if e.include_subpath {
                path.strip_prefix(&e.path)
                    .filter(|rest| rest.starts_with('/'))
                    .map(|rest| (i, format!("{rest}{query}")))
            } else {
                None
            }
        })
}

/// Client headers worth forwarding: not keys, not hop-by-hop.
fn client_headers(session: &Session, app: &App) -> Vec<(String, String)> {
    let custom_key = app.config.general.litellm_key_header_name.as_deref();
    session
        .req_header()
        .headers
        .iter()
        .filter(|(n, _)| {
            let n = n.as_str();
            !respond::is_hop_header(n)
                && !KEY_HEADERS.contains(&n)
                && Some(n) != custom_key
                && n != "x-litellm-api-key"
        })
        .filter_map(|(n, v)| Some((n.as_str().to_string(), v.to_str().ok()?.to_string())))
        .collect()
}

pub async fn custom(
    app: &App,
    session: &mut Session,
    ctx: &mut Ctx,
    index: usize,
    sub: String,
) -> Result<(), ApiError> {
    let endpoint = &app.config.general.pass_through_endpoints[index];
    let target = Target::parse(&endpoint.target)
        .map_err(|e| ApiError::new(500, "internal_server_error", e))?;
    let body = read_body(session, app.max_request_bytes).await?;
    let mut headers = if endpoint.forward_headers {
        client_headers(session, app)
    } else {
        session
            .req_header()
            .headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .map(|v| vec![("content-type".to_string(), v.to_string())])
            .unwrap_or_default()
    };
    for (k, v) in &endpoint.headers {
        headers.retain(|(n, _)| !n.eq_ignore_ascii_case(k));
        headers.push((k.to_ascii_lowercase(), v.clone()));
    }
    let method = session.req_header().method.as_str().to_string();
    let path = format!("{}{}", target.path_prefix, sub);
    forward(app, session, ctx, &target, &method, &path, &headers, body).await
}

pub async fn vllm(
    app: &App,
    session: &mut Session,
    ctx: &mut Ctx,
    method: &str,
    rest: &str,
) -> Result<(), ApiError> {
    let raw = read_body(session, app.max_request_bytes).await?;
    let mut body = raw.clone();
    let mut key: Option<String> = std::env::var("HOSTED_VLLM_API_KEY").ok();
    let mut extra_headers = vec![];
    let mut picked: Option<Picked> = None;

    // 1. The model group named by the body's `model`, balanced like any group.
    let named = RequestBody::parse(&raw)
        .ok()
        .and_then(|b| b.str_field("model").ok().flatten().map(|m| m.into_owned()));
    let mut target = None;
    if let Some(model) = &named {
        ctx.requested_model = Some(model.clone());
        if let Some(group) = app.router.resolve(model) {
            let p = app.router.select(&group, &[], false).map_err(|nd| {
                ApiError::new(
                    429,
                    "rate_limit_error",
                    format!("No deployments available for selected model, Try again in {} seconds. Passed model={model}", nd.retry_after),
                )
                .with_retry_after(nd.retry_after)
            })?;
            let d = &p.deployment.config;
            if d.provider.wire_format() != WireFormat::OpenAi {
                return Err(ApiError::bad_request(format!(
                    "model={model} is served by {}, not by a vLLM / OpenAI-compatible backend",
                    d.provider
                )));
            }
            ctx.pass_provider = Some((
                d.provider.name().to_string(),
                (d.input_cost_per_token, d.output_cost_per_token),
            ));
            let t = p
                .deployment
                .target
                .clone()
                .map_err(|e| ApiError::new(500, "internal_server_error", e))?;
            let mut b = RequestBody::parse(&raw).expect("parsed above");
            b.set_str("model", &d.upstream_model_for(model));
            body = Bytes::from(b.to_bytes());
            key = d.api_key.clone().or(key);
            extra_headers = d.extra_headers.clone();
            target = Some(root_of(&t));
            picked = Some(p);
        }
    }
    // 2. HOSTED_VLLM_API_BASE, 3. the only hosted_vllm deployment.
    if target.is_none() {
        if let Some(base) = std::env::var("HOSTED_VLLM_API_BASE")
            .ok()
            .filter(|b| !b.is_empty())
        {
            let t = Target::parse(&base).map_err(|e| {
                ApiError::new(
                    500,
                    "internal_server_error",
                    format!("HOSTED_VLLM_API_BASE: {e}"),
                )
            })?;
            target = Some(root_of(&t));
        } else {
            let vllm: Vec<_> = app
                .router
                .all_deployments()
                .filter(|d| d.config.provider.is_hosted_vllm() && d.target.is_ok())
                .collect();
            if vllm.len() == 1 {
                let d = vllm[0];
                target = Some(root_of(d.target.as_ref().expect("filtered")));
                key = d.config.api_key.clone().or(key);
                extra_headers = d.config.extra_headers.clone();
            }
        }
    }
    let Some(target) = target else {
        return Err(ApiError::bad_request(match named {
            Some(m) => format!("Invalid model name passed in model={m}: no vLLM deployment serves it, HOSTED_VLLM_API_BASE is unset and there is not exactly one hosted_vllm deployment"),
            None => "No vLLM backend for /vllm: name a model group in the body's `model`, set HOSTED_VLLM_API_BASE, or configure exactly one hosted_vllm deployment".into(),
        }));
    };
    let mut headers = client_headers(session, app);
    if let Some(k) = key.filter(|k| !k.is_empty()) {
        headers.push(("authorization".into(), format!("Bearer {k}")));
    }
    headers.extend(extra_headers);
    let path = format!("{}{}", target.path_prefix, rest);
    let result = forward(app, session, ctx, &target, method, &path, &headers, body).await;
    drop(picked);
    result
}

/// `/{provider}/{rest}`: the provider's own API with the configured credentials in place of
/// the client's key (Bedrock requests are signed anew with SigV4).
pub async fn provider(
    app: &App,
    session: &mut Session,
    ctx: &mut Ctx,
    provider: &str,
    method: &str,
    rest: &str,
) -> Result<(), ApiError> {
    let d = app.passthrough.get(provider).cloned().ok_or_else(|| {
        ApiError::bad_request(format!(
            "No credentials for the {provider} pass-through route"
        ))
    })?;
    let c = &d.config;
    let target = root_of(&d.target.clone().map_err(|e| {
        ApiError::new(
            500,
            "internal_server_error",
            format!("{provider} pass-through: {e}"),
        )
    })?);
    let body = read_body(session, app.max_request_bytes).await?;
    let mut headers: Vec<(String, String)> = client_headers(session, app)
        .into_iter()
        .filter(|(k, _)| !k.starts_with("x-amz-"))
        .collect();
    let set = |headers: &mut Vec<(String, String)>, k: &str, v: String| {
        headers.retain(|(n, _)| n != k);
        headers.push((k.to_string(), v));
    };
    let mut rest = rest.to_string();
    let key = c.api_key.clone().filter(|k| !k.is_empty());
    match provider {
        "anthropic" => {
            if !headers.iter().any(|(k, _)| k == "anthropic-version") {
                headers.push(("anthropic-version".into(), anthropic::API_VERSION.into()));
            }
            if let Some(k) = key {
                set(&mut headers, "x-api-key", k);
            }
        }
        "gemini" => {
            rest = without_query_param(&rest, "key");
            if let Some(k) = key {
                set(&mut headers, "x-goog-api-key", k);
            }
        }
        "azure" => {
            if let Some(k) = key {
                set(&mut headers, "api-key", k);
            }
        }
        "vertex_ai" => {
            let token = app.google_tokens.bearer(&app.upstream, c).await?;
            set(&mut headers, "authorization", format!("Bearer {token}"));
        }
        "bedrock" => {}
        _ => {
            if let Some(k) = key {
                set(&mut headers, "authorization", format!("Bearer {k}"));
            }
            if let Some(org) = &c.organization {
                set(&mut headers, "openai-organization", org.clone());
            }
        }
    }
    headers.extend(c.extra_headers.iter().cloned());
    let path = format!("{}{}", target.path_prefix, rest);
    if provider == "bedrock" {
        let (creds, region) = bedrock::credentials_from(c).ok_or_else(|| {
            ApiError::new(
                401,
                "auth_error",
                "No AWS credentials for the bedrock pass-through route: configure a bedrock deployment or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY",
            )
        })?;
        let signed = bedrock::sign_request(
            method,
            &target.authority,
            &path,
            &headers,
            &body,
            &creds,
            &region,
            bedrock::SERVICE,
            std::time::SystemTime::now(),
        );
        headers.extend(signed);
    }
    ctx.requested_model
        .get_or_insert_with(|| provider.to_string());
    ctx.pass_provider = Some((
        provider.to_string(),
        (c.input_cost_per_token, c.output_cost_per_token),
    ));
    forward(app, session, ctx, &target, method, &path, &headers, body).await
}

/// `rest` (path and query) without the query parameter `name`.
fn without_query_param(rest: &str, name: &str) -> String {
    let Some((path, query)) = rest.split_once('?') else {
        return rest.to_string();
    };
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| pair.split('=').next() != Some(name))
        .collect();
    if kept.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{}", kept.join("&"))
    }
}

/// Usage seen on a pass-through response, counted like any call's (LiteLLM counts none on
/// `/vllm/*`; Sluice does).
fn record_usage(app: &App, ctx: &mut Ctx, u: Usage) {
    let model = ctx.requested_model.as_deref().unwrap_or(ctx.route);
    // Recorded for the spend log like any call: priced as configured or from the table.
    let (provider, prices) = ctx
        .pass_provider
        .clone()
        .unwrap_or_else(|| ("hosted_vllm".into(), (None, None)));
    ctx.served = Some(crate::gateway::Served {
        labels: crate::router::Labels {
            model: model.into(),
            model_group: model.into(),
            provider: provider.as_str().into(),
            ..Default::default()
        },
        cost: crate::tenancy::cost_for(
            &provider,
            model,
            None,
            prices,
            u.prompt_tokens,
            u.completion_tokens,
        ),
        usage: u,
        ..Default::default()
    });
    let model = ctx.requested_model.as_deref().unwrap_or(ctx.route);
    let m = &app.metrics;
    m.input_tokens
        .with_label_values(&[model])
        .inc_by(u.prompt_tokens);
    m.output_tokens
        .with_label_values(&[model])
        .inc_by(u.completion_tokens);
    m.total_tokens
        .with_label_values(&[model])
        .inc_by(u.total_tokens);
    tracing::debug!(call_id = %ctx.call_id, prompt_tokens = u.prompt_tokens, completion_tokens = u.completion_tokens, "pass-through usage");
}

/// The server root of a target: vLLM's native routes live beside `/v1`, not under it.
fn root_of(t: &Target) -> Target {
    let prefix = t.path_prefix.strip_suffix("/v1").unwrap_or(&t.path_prefix);
    t.with_prefix(prefix)
}

#[allow(clippy::too_many_arguments)]
async fn forward(
    app: &App,
    session: &mut Session,
    ctx: &mut Ctx,
    target: &Target,
    method: &str,
    path: &str,
    headers: &[(String, String)],
    body: Bytes,
) -> Result<(), ApiError> {
    session.set_abort_on_close(true);
    let call = Call {
        target,
        method,
        path,
        headers,
        body,
        timeout: PASSTHROUGH_TIMEOUT.min(app.router.settings.timeout),
    };
    let sent = Instant::now();
    let response = tokio::select! {
        r = app.upstream.send(&call) => r,
        _ = client_gone(session) => { ctx.status = 499; return Ok(()) }
    };
    ctx.upstream_wait += sent.elapsed();
    let mut resp = response.map_err(|e| match e {
        CallError::Timeout => ApiError::new(
            408,
            "timeout",
            "litellm.Timeout: pass-through request timed out",
        ),
        e => ApiError::new(
            502,
            "internal_server_error",
            format!("litellm.APIConnectionError: pass-through target unreachable: {e}"),
        ),
    })?;
    let status = resp.header.status.as_u16();
    let mut h = respond::header(
        status,
        &ctx.call_id,
        &[("x-litellm-model-api-base", target.display_base())],
    );
    let mut has_length = false;
    for (name, value) in resp.header.headers.iter() {
        let n = name.as_str();
        if n == "content-length" {
            has_length = true;
            let _ = h.insert_header("content-length", value.clone());
        }
        if respond::is_hop_header(n) || n.starts_with("x-litellm") {
            continue;
        }
        let _ = h.append_header(n.to_string(), value.clone());
    }
    if !has_length && !session.is_http2() {
        let _ = h.insert_header("transfer-encoding", "chunked");
    }
    ctx.status = status;
    let head_only = method.eq_ignore_ascii_case("HEAD") || status == 204 || status == 304;
    if session
        .write_response_header(Box::new(h), head_only)
        .await
        .is_err()
    {
        return Ok(());
    }
    if head_only {
        app.upstream.release(resp).await;
        return Ok(());
    }
    let content_type = resp
        .header
        .headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let mut usage = (status < 400).then(|| PassthroughUsage::new(&content_type));
    loop {
        let waited = Instant::now();
        let next = tokio::select! {
            c = app.upstream.next_chunk(&mut resp) => c,
            _ = client_gone(session) => { ctx.status = 499; return Ok(()) }
        };
        ctx.upstream_wait += waited.elapsed();
        match next {
            Ok(Some(chunk)) => {
                if let Some(u) = &mut usage {
                    u.feed(&chunk);
                }
                if session
                    .write_response_body(Some(chunk), false)
                    .await
                    .is_err()
                {
                    return Ok(());
                }
            }
            Ok(None) => {
                let _ = session.write_response_body(None, true).await;
                app.upstream.release(resp).await;
                if let Some(u) = usage.and_then(PassthroughUsage::finish) {
                    record_usage(app, ctx, u);
                }
                return Ok(());
            }
            Err(e) => {
                // Part of the body is already out: leave the response unterminated so the client
                // sees the break instead of a short but seemingly complete body.
                tracing::warn!(call_id = %ctx.call_id, error = %e, "pass-through response broke off");
                session.set_keepalive(None);
                return Ok(());
            }
        }
    }
}
