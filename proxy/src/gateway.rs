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
    _active: crate::app::ActiveRequest,
}

impl Ctx {
    /// Milliseconds since arrival, and of those the gateway's own share.
    pub fn durations_ms(&self) -> (f64, f64) {
        let total = self.arrived.elapsed();
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

    fn authenticate(&self, session: &Session) -> Result<Principal, ApiError> {
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
        self.app.auth.authenticate(key)
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
                        self.authenticate(session)?;
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
                let p = self.authenticate(session)?;
                let body = crate::info::models(app, &p);
                self.reply(session, ctx, 200, body).await;
                Ok(())
            }
            Route::ModelInfo => {
                ctx.route = "/model/info";
                let p = self.authenticate(session)?;
                let body = crate::info::model_info(app, &p);
                self.reply(session, ctx, 200, body).await;
                Ok(())
            }
            Route::ModelGroupInfo => {
                ctx.route = "/model_group/info";
                let p = self.authenticate(session)?;
                let body = crate::info::model_group_info(app, &p);
                self.reply(session, ctx, 200, body).await;
                Ok(())
            }
            Route::Health => {
                ctx.route = "/health";
                self.authenticate(session)?;
                let filter = query_param(&path, "model");
                let body = crate::info::health(app, filter.as_deref()).await;
                self.reply(session, ctx, 200, body).await;
                Ok(())
            }
            Route::Inference { op, path_model } => {
                ctx.route = op.openai_path();
                let principal = self.authenticate(session)?;
                crate::inference::handle(app, session, ctx, &principal, op, path_model).await
            }
            Route::AnthropicMessages => {
                ctx.route = "/v1/messages";
                // Errors from here on are answered in Anthropic's shape.
                ctx.ingress = Some(Bytes::new());
                let principal = self.authenticate(session)?;
                crate::inference::handle_anthropic_messages(app, session, ctx, &principal).await
            }
            Route::AnthropicCountTokens => {
                ctx.route = "/v1/messages/count_tokens";
                ctx.ingress = Some(Bytes::new());
                self.authenticate(session)?;
                crate::inference::handle_anthropic_count_tokens(app, session, ctx).await
            }
            Route::ProviderPassthrough { provider, rest } => {
                ctx.route = "pass_through";
                // Gemini clients may send the gateway key as `?key=`, as Google's SDKs do.
                let principal = match self.authenticate(session) {
                    Err(e) if provider == "gemini" => match query_param(&path, "key") {
                        Some(key) => self.app.auth.authenticate(Some(&key)),
                        None => Err(e),
                    },
                    other => other,
                };
                principal?;
                crate::passthrough::provider(app, session, ctx, provider, &method, &rest).await
            }
            Route::VllmPassthrough { rest } => {
                ctx.route = "/vllm";
                self.authenticate(session)?;
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
            call_id: uuid::Uuid::new_v4().to_string(),
            arrived: Instant::now(),
            route: "",
            requested_model: None,
            status: 0,
            upstream_wait: Duration::ZERO,
            ingress: None,
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
        let (total_ms, overhead_ms) = ctx.durations_ms();
        let model = ctx.requested_model.as_deref().unwrap_or("");
        let status = if ctx.status == 0 { 499 } else { ctx.status };
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
    }
}
