//! The `ProxyHttp` implementation. Every request is answered inside `request_filter`: the route is
//! classified, the caller authenticated, and the matching handler runs the upstream exchange
//! itself (Pingora's connector, pooling and TLS underneath), because routing needs the body and
//! LiteLLM's retry semantics need to look at upstream responses before the client sees anything.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use pingora::proxy::{ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorType, Result};
use sluice_filters::auth::{extract_key, Principal};
use sluice_filters::route::{classify, Route};
use sluice_filters::ApiError;

use crate::app::App;
use crate::respond;

/// Per-request state.
pub struct Ctx {
    pub call_id: String,
    pub arrived: Instant,
    pub route: &'static str,
    pub requested_model: Option<String>,
    pub status: u16,
    /// Time spent waiting on upstreams (the rest is the gateway's own overhead).
    pub upstream_wait: Duration,
    /// For Anthropic-format ingress (`/v1/messages`): the client's own request body.
    pub ingress: Option<Bytes>,
    /// Wall-clock arrival, for the spend log.
    pub started_at: chrono::DateTime<chrono::Utc>,
    /// The caller's key hash once authenticated (master or virtual key).
    pub key_hash: Option<Arc<str>>,
    /// The virtual key behind the request, when it used one.
    pub tenant: Option<Arc<crate::tenancy::KeyContext>>,
    /// Counted against the caller's limits until the logging phase settles it.
    pub admission: Option<crate::tenancy::Admission>,
    /// The OpenAI `user` field: the end user (customer) spend is charged to.
    pub end_user: Option<String>,
    /// What answered the call, with its usage and cost, once it succeeded.
    pub served: Option<Served>,
    /// An LLM call (inference or pass-through) that gets a spend-log row.
    pub llm_call: bool,
    /// Pass-through calls: the provider, and prices configured for the deployment used.
    pub pass_provider: Option<(String, Prices)>,
    _active: crate::app::ActiveRequest,
}

/// Configured (input, output) USD prices per token.
pub type Prices = (Option<f64>, Option<f64>);

/// The deployment that answered a call, and what the call used and cost.
#[derive(Debug, Clone, Default)]
pub struct Served {
    /// The model called and the deployment's names, as its spend row records them.
    pub labels: crate::router::Labels,
    pub usage: sluice_filters::usage::Usage,
    pub cost: f64,
    pub ttft: Option<Duration>,
}

impl Ctx {
    /// Milliseconds of `total` (the time since arrival), and of those the gateway's own share.
    pub fn durations_ms(&self, total: Duration) -> (f64, f64) {
        let overhead = total.saturating_sub(self.upstream_wait);
        (total.as_secs_f64() * 1e3, overhead.as_secs_f64() * 1e3)
    }
}

pub struct Gateway {
    pub app: Arc<App>,
}

impl Gateway {
    pub fn new(app: Arc<App>) -> Gateway {
        Gateway { app }
    }

    async fn authenticate(
        &self,
        session: &Session,
        ctx: &mut Ctx,
        path: &str,
    ) -> Result<Principal, ApiError> {
        let header = |name: &str| {
            session
                .req_header()
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
        };
        let key = extract_key(
            header,
            self.app.config.general.litellm_key_header_name.as_deref(),
        );
        self.authenticate_key(key, ctx, path).await
    }

    /// The master key first; then, with tenancy on, a JWT or a virtual key.
    async fn authenticate_key(
        &self,
        key: Option<&str>,
        ctx: &mut Ctx,
        path: &str,
    ) -> Result<Principal, ApiError> {
        // A key that is not the master key is looked up as a virtual key (the master's
        // refusal is only built when that fails too).
        let virtual_key = match (&self.app.tenancy, key) {
            (Some(t), Some(key)) if !self.app.auth.passes(Some(key)) => Some((t, key)),
            _ => None,
        };
        let Some((t, key)) = virtual_key else {
            let master = self.app.auth.authenticate(key);
            if let Ok(p) = &master {
                ctx.key_hash = p.key_hash.clone();
            }
            return master;
        };
        if let Some(jwt) = &self.app.jwt {
            if sluice_filters::jwt::looks_like_jwt(key) {
                let id = jwt.verify(&self.app.upstream, key).await?;
                let general_routes = self.app.config.general.allowed_routes.as_deref();
                if !id.admin {
                    if let Some(routes) = general_routes {
                        if !route_allowed(routes, path) {
                            return Err(route_refused(path));
                        }
                    }
                }
                let k = t
                    .identity(id.user_id.as_deref(), id.team_id.as_deref())
                    .await?;
                // The same refusals as for keys (a JWT caller's team may be blocked).
                t.check_key(&k)?;
                let models = k
                    .team
                    .as_ref()
                    .and_then(|t| crate::admin::expand_models(&self.app, &t.models));
                ctx.tenant = Some(k);
                if ctx.end_user.is_none() {
                    ctx.end_user = id.end_user_id.clone();
                }
                return Ok(Principal {
                    admin: id.admin,
                    models,
                    key_hash: None,
                    user_id: id.user_id,
                    team_id: id.team_id,
                });
            }
        }
        let Some(k) = t.key(sluice_filters::KeyHash::of(key).as_str()).await? else {
            return self.app.auth.authenticate(Some(key));
        };
        t.check_key(&k)?;
        if !k.key.allowed_routes.is_empty() && !route_allowed(&k.key.allowed_routes, path) {
            return Err(route_refused(path));
        }
        let own = if !k.key.models.is_empty() {
            &k.key.models
        } else if let Some(team) = k.team.as_ref().filter(|t| !t.models.is_empty()) {
            &team.models
        } else {
            &k.key.models
        };
        let principal = Principal {
            admin: k.is_admin(),
            models: crate::admin::expand_models(&self.app, own),
            key_hash: Some(k.token.clone()),
            user_id: k.key.user_id.clone(),
            team_id: k.key.team_id.clone(),
        };
        ctx.key_hash = Some(k.token.clone());
        ctx.tenant = Some(k);
        Ok(principal)
    }

    async fn dispatch(&self, session: &mut Session, ctx: &mut Ctx) -> Result<(), ApiError> {
        let method = session.req_header().method.as_str().to_string();
        let path = session
            .req_header()
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "/".into());
        let route = classify(&method, &path);
        let app = &self.app;
        match route {
            Route::Liveliness => {
                ctx.route = "/health/liveliness";
                let draining = app.draining.load(std::sync::atomic::Ordering::Relaxed);
                let (status, body) = if draining || session.is_process_shutting_down() {
                    (503, "\"draining\"")
                } else {
                    (200, "\"I'm alive!\"")
                };
                self.reply(session, ctx, status, Bytes::from_static(body.as_bytes()))
                    .await;
                Ok(())
            }
            Route::Readiness => {
                ctx.route = "/health/readiness";
                let body = crate::info::readiness(app);
                self.reply(session, ctx, 200, body).await;
                Ok(())
            }
            Route::Metrics => {
                ctx.route = "/metrics";
                let body = app.metrics.render(&app.router);
                let mut h = respond::header(200, &ctx.call_id, &[]);
                let _ = h.insert_header("content-type", "text/plain; version=0.0.4");
                ctx.status = 200;
                respond::send(session, h, body.into()).await;
                Ok(())
            }
            Route::NotFound => {
                if let Some((index, sub)) = crate::passthrough::match_custom(app, &path) {
                    ctx.route = "pass_through";
                    if app.config.general.pass_through_endpoints[index].auth {
                        self.authenticate(session, ctx, &path).await?;
                        ctx.llm_call = true;
                    }
                    return crate::passthrough::custom(app, session, ctx, index, sub).await;
                }
                ctx.route = "unknown";
                Err(ApiError::not_found(format!(
                    "Route not found: {method} {}",
                    path.split('?').next().unwrap_or("")
                )))
            }
            Route::Models => {
                ctx.route = "/models";
                let p = self.authenticate(session, ctx, &path).await?;
                let body = crate::info::models(app, &p);
                self.reply(session, ctx, 200, body).await;
                Ok(())
            }
            Route::ModelInfo => {
                ctx.route = "/model/info";
                let p = self.authenticate(session, ctx, &path).await?;
                let body = crate::info::model_info(app, &p);
                self.reply(session, ctx, 200, body).await;
                Ok(())
            }
            Route::ModelGroupInfo => {
                ctx.route = "/model_group/info";
                let p = self.authenticate(session, ctx, &path).await?;
                let body = crate::info::model_group_info(app, &p);
                self.reply(session, ctx, 200, body).await;
                Ok(())
            }
            Route::Health => {
                ctx.route = "/health";
                self.authenticate(session, ctx, &path).await?;
                let filter = query_param(&path, "model");
                let body = crate::info::health(app, filter.as_deref()).await;
                self.reply(session, ctx, 200, body).await;
                Ok(())
            }
            Route::Inference { op, path_model } => {
                ctx.route = op.openai_path();
                let principal = self.authenticate(session, ctx, &path).await?;
                ctx.llm_call = true;
                crate::inference::handle(app, session, ctx, &principal, op, path_model).await
            }
            Route::AnthropicMessages => {
                ctx.route = "/v1/messages";
                // Errors from here on are answered in Anthropic's shape.
                ctx.ingress = Some(Bytes::new());
                let principal = self.authenticate(session, ctx, &path).await?;
                ctx.llm_call = true;
                crate::inference::handle_anthropic_messages(app, session, ctx, &principal).await
            }
            Route::AnthropicCountTokens => {
                ctx.route = "/v1/messages/count_tokens";
                ctx.ingress = Some(Bytes::new());
                self.authenticate(session, ctx, &path).await?;
                crate::inference::handle_anthropic_count_tokens(app, session, ctx).await
            }
            Route::ProviderPassthrough { provider, rest } => {
                ctx.route = "pass_through";
                // Gemini clients may send the gateway key as `?key=`, as Google's SDKs do.
                let principal = match self.authenticate(session, ctx, &path).await {
                    Err(e) if provider == "gemini" => match query_param(&path, "key") {
                        Some(key) => self.authenticate_key(Some(&key), ctx, &path).await,
                        None => Err(e),
                    },
                    other => other,
                };
                principal?;
                ctx.llm_call = true;
                crate::passthrough::provider(app, session, ctx, provider, &method, &rest).await
            }
            Route::Management { path: mpath } => {
                ctx.route = "management";
                let principal = self.authenticate(session, ctx, &path).await?;
                crate::admin::handle(app, session, ctx, &principal, &method, &mpath, &path).await
            }
            Route::VllmPassthrough { rest } => {
                ctx.route = "/vllm";
                self.authenticate(session, ctx, &path).await?;
                ctx.llm_call = true;
                crate::passthrough::vllm(app, session, ctx, &method, &rest).await
            }
        }
    }

    async fn reply(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        status: u16,
        body: impl Into<Bytes>,
    ) {
        ctx.status = status;
        respond::send_json(session, status, &ctx.call_id, body, &[]).await;
    }
}

/// A query parameter's value (no percent-decoding needed for model names in practice, but `+`
/// and `%2F` are decoded).
pub fn query_param(path: &str, name: &str) -> Option<String> {
    let query = path.split_once('?')?.1;
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then(|| v.replace('+', " ").replace("%2F", "/").replace("%2f", "/"))
    })
}

/// Bodies up to this size are read and discarded before a 413 so that the client, still
/// writing, gets the answer instead of a broken pipe; larger ones get the answer and a close.
const OVERSIZE_DRAIN_LIMIT: usize = 256 * 1024 * 1024;

async fn refuse_oversize(session: &mut Session, declared_or_seen: usize) {
    // A client waiting for `100 Continue` has not sent the body and never will.
    let waits_for_continue = session.req_header().headers.contains_key("expect");
    if declared_or_seen <= OVERSIZE_DRAIN_LIMIT && !waits_for_continue {
        let _ = tokio::time::timeout(Duration::from_secs(10), session.drain_request_body()).await;
    }
    session.set_keepalive(None);
}

/// Reads the whole request body, refusing more than `cap` bytes with 413.
pub async fn read_body(session: &mut Session, cap: usize) -> Result<Bytes, ApiError> {
    if let Some(len) = session
        .req_header()
        .headers
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
    {
        if len > cap {
            refuse_oversize(session, len).await;
            return Err(ApiError::body_too_large(cap));
        }
    }
    // curl and many SDKs send `Expect: 100-continue` for large bodies and wait for the go-ahead
    // (Pingora leaves it to whoever reads the body, normally the upstream).
    let expects_continue = session
        .req_header()
        .headers
        .get("expect")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if expects_continue && !session.is_http2() {
        session
            .write_continue_response()
            .await
            .map_err(|e| ApiError::bad_request(format!("Could not answer Expect: {e}")))?;
    }
    // A body that arrives in one chunk is used as is; only multi-chunk bodies are copied.
    let mut first: Option<Bytes> = None;
    let mut rest = BytesMut::new();
    let mut total = 0usize;
    while let Some(chunk) = session
        .read_request_body()
        .await
        .map_err(|e| ApiError::bad_request(format!("Could not read the request body: {e}")))?
    {
        total += chunk.len();
        if total > cap {
            refuse_oversize(session, total).await;
            return Err(ApiError::body_too_large(cap));
        }
        match &first {
            None => first = Some(chunk),
            Some(f) => {
                if rest.is_empty() {
                    rest.extend_from_slice(f);
                }
                rest.extend_from_slice(&chunk);
            }
        }
    }
    Ok(if rest.is_empty() {
        first.unwrap_or_default()
    } else {
        rest.freeze()
    })
}

/// Resolves when the client has gone away (connection closed or stream reset).
pub async fn client_gone(session: &mut Session) {
    loop {
        match session.read_body_or_idle(true).await {
            Err(_) => return,
            // Extra bytes after a complete request (pipelining) are not a disconnect.
            Ok(Some(_)) => continue,
            Ok(None) => std::future::pending::<()>().await,
        }
    }
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx {
            // Time-ordered (v7): the call id is the spend log's primary key, and ids that grow
            // with time are appended to its index instead of landing on random pages.
            call_id: uuid::Uuid::now_v7().to_string(),
            arrived: Instant::now(),
            route: "",
            requested_model: None,
            status: 0,
            upstream_wait: Duration::ZERO,
            ingress: None,
            started_at: chrono::Utc::now(),
            key_hash: None,
            tenant: None,
            admission: None,
            end_user: None,
            served: None,
            llm_call: false,
            pass_provider: None,
            _active: crate::app::ActiveRequest::new(&self.app.active),
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        if let Err(e) = self.dispatch(session, ctx).await {
            ctx.status = e.status;
            if e.status >= 500 {
                tracing::warn!(call_id = %ctx.call_id, status = e.status, error = %e.message, "request failed");
            } else {
                tracing::debug!(call_id = %ctx.call_id, status = e.status, error = %e.message, "request refused");
            }
            respond::send_error(session, &ctx.call_id, &e, &[], ctx.ingress.is_some()).await;
        }
        Ok(true)
    }

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        // Every route is answered in request_filter; reaching here is a bug.
        Error::e_explain(
            ErrorType::InternalError,
            "no route proxies through upstream_peer",
        )
    }

    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut Ctx) {
        let total = ctx.arrived.elapsed();
        let (total_ms, overhead_ms) = ctx.durations_ms(total);
        let status = if ctx.status == 0 { 499 } else { ctx.status };
        let model = ctx.requested_model.as_deref().unwrap_or("");
        let m = &self.app.metrics;
        let status_s = status.to_string();
        m.proxy_total_requests
            .with_label_values(&[model, ctx.route, &status_s])
            .inc();
        if status >= 400 {
            let class = match status {
                400 | 413 => "BadRequestError",
                401 | 403 => "AuthenticationError",
                404 => "NotFoundError",
                408 | 504 => "Timeout",
                429 => "RateLimitError",
                499 => "ClientDisconnected",
                503 => "ServiceUnavailableError",
                _ => "InternalServerError",
            };
            m.proxy_failed_requests
                .with_label_values(&[model, ctx.route, &status_s, &status_s, class])
                .inc();
        }
        if ctx.requested_model.is_some() {
            m.request_total_latency
                .with_label_values(&[model])
                .observe(total_ms / 1e3);
            m.overhead_latency
                .with_label_values(&[model])
                .observe(overhead_ms / 1e3);
        }
        // Per-request access lines stay at debug: at info they would cost a write per request.
        tracing::debug!(
            call_id = %ctx.call_id,
            method = %session.req_header().method,
            path = %session.req_header().uri.path(),
            status,
            model,
            duration_ms = format!("{total_ms:.3}"),
            overhead_ms = format!("{overhead_ms:.3}"),
            "request"
        );
        // Last: the spend row takes the request's id and served call from `ctx`.
        if let Some(t) = &self.app.tenancy {
            let row = ctx.llm_call.then(|| spend_row(ctx, status, total));
            if let Some(r) = &row {
                if r.spend > 0.0 {
                    let alias = ctx
                        .tenant
                        .as_ref()
                        .and_then(|k| k.key.key_alias.clone())
                        .unwrap_or_default();
                    self.app
                        .metrics
                        .spend
                        .with_label_values(&[
                            r.end_user.as_deref().unwrap_or(""),
                            &r.api_key,
                            &alias,
                            &r.model_group,
                            r.team_id.as_deref().unwrap_or(""),
                            r.user.as_deref().unwrap_or(""),
                        ])
                        .inc_by(r.spend);
                }
            }
            t.finish(ctx.admission.take(), row).await;
            self.app
                .metrics
                .spend_queue_size
                .set(t.writer.queued.load(std::sync::atomic::Ordering::Relaxed));
        }
    }
}

/// The spend-log row of a finished LLM call, `total` after its arrival.
fn spend_row(ctx: &mut Ctx, status: u16, total: Duration) -> sluice_filters::tenancy::SpendRow {
    let served = ctx.served.take().unwrap_or_default();
    let u = served.usage;
    let labels = served.labels;
    let key = ctx.tenant.as_ref().map(|k| &k.key);
    sluice_filters::tenancy::SpendRow {
        // Taken: the row is the request's last use of its id (see `logging`).
        request_id: std::mem::take(&mut ctx.call_id),
        call_type: ctx.route.into(),
        // Taken: the row is the last use of the hash (spend_row runs as the request is logged).
        api_key: ctx.key_hash.take().unwrap_or_default(),
        spend: served.cost,
        prompt_tokens: u.prompt_tokens,
        completion_tokens: u.completion_tokens,
        total_tokens: u.total_tokens.max(u.prompt_tokens + u.completion_tokens),
        start_time: ctx.started_at,
        // The arrival's wall-clock time plus the monotonic time since: no second clock read,
        // and the row's duration is the one the access log and metrics report.
        end_time: ctx.started_at + chrono::Duration::from_std(total).unwrap_or_default(),
        completion_start_time: served
            .ttft
            .and_then(|t| chrono::Duration::from_std(t).ok())
            .map(|t| ctx.started_at + t),
        model: labels.model,
        model_id: labels.model_id,
        model_group: if labels.model_group.is_empty() {
            ctx.requested_model.as_deref().unwrap_or_default().into()
        } else {
            labels.model_group
        },
        custom_llm_provider: labels.provider,
        api_base: labels.api_base,
        user: key.and_then(|k| k.user_id.clone()),
        team_id: key.and_then(|k| k.team_id.clone()),
        end_user: ctx.end_user.clone(),
        status: if status < 400 { "success" } else { "failure" }.into(),
        status_code: status,
        request_tags: vec![],
    }
}

/// Whether `path` is covered by an `allowed_routes` list (exact routes, with or without `/v1`,
/// or LiteLLM's route groups).
fn route_allowed(routes: &[String], path: &str) -> bool {
    let path = path.split('?').next().unwrap_or(path);
    let bare = path.strip_prefix("/v1").unwrap_or(path);
    routes.iter().any(|r| {
        let r_bare = r.strip_prefix("/v1").unwrap_or(r);
        match r.as_str() {
            "llm_api_routes" | "openai_routes" => {
                matches!(
                    bare,
                    "/chat/completions" | "/completions" | "/embeddings" | "/messages" | "/models"
                ) || bare.starts_with("/openai/deployments/")
            }
            "info_routes" => {
                bare.starts_with("/key/info")
                    || bare.starts_with("/user/info")
                    || bare.starts_with("/team/info")
                    || bare.starts_with("/model/info")
                    || bare == "/models"
            }
            "management_routes" => ["/key/", "/user/", "/team/", "/customer/", "/budget/"]
                .iter()
                .any(|p| bare.starts_with(p)),
            "pass_through_routes" => bare.starts_with("/vllm/") || bare.starts_with("/openai/"),
            _ => {
                r_bare == bare
                    || (r_bare.ends_with('*') && bare.starts_with(r_bare.trim_end_matches('*')))
            }
        }
    })
}

fn route_refused(path: &str) -> ApiError {
    ApiError::new(
        403,
        "auth_error",
        format!(
            "Authentication Error - key not allowed to access this route. Route={}",
            path.split('?').next().unwrap_or(path)
        ),
    )
}

/// Counts a call's tokens and cost against its limits as soon as they are known, before the
/// client has the whole answer (the logging phase would be too late for its next call).
pub async fn settle_spend(app: &App, ctx: &mut Ctx) {
    if let (Some(t), Some(a), Some(s)) = (&app.tenancy, ctx.admission.as_mut(), &ctx.served) {
        let u = &s.usage;
        let tokens = u.total_tokens.max(u.prompt_tokens + u.completion_tokens);
        t.settle(a, tokens, s.cost).await;
    }
}
