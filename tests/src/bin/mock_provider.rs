//! `mock-provider`: a real HTTP mock of an OpenAI-compatible / vLLM provider, used by the
//! black-box tests in `sluice-tests`.
//!
//! Run as `mock-provider [--port N] [--host H] [--name NAME] [--socket PATH]`. On start it prints
//! exactly one line, `LISTENING <port>` (or `LISTENING <socket path>`), and flushes stdout.
//!
//! Behaviour is scripted by substrings of the request's `model` field, so one mock can play a
//! healthy, slow, failing or streaming deployment at once:
//!
//! | substring | effect |
//! |---|---|
//! | `slow-<ms>` | sleep before answering (before the headers) |
//! | `stream-<K>` | `K` content chunks when streaming (default 5) |
//! | `delay-<ms>` | sleep before each streamed content chunk (default 0) |
//! | `error-<status>` | answer that status (4xx/5xx) with an OpenAI error body; 429 adds `retry-after: 1` |
//! | `context-window` | 400 `context_length_exceeded` |
//! | `content-policy` | 400 `content_filter` |
//! | `drop-mid-stream` | send 2 content chunks, then abort the connection (no `[DONE]`) |
//! | `bad-json` | 200 with a body that is not JSON |
//!
//! Control endpoints (never scripted, never counted): `POST /__mock/fail` `{"status": 503 | null,
//! "count": n?}`, `POST /__mock/reset`, `GET /__mock/stats`, `GET /__mock/requests`.

use std::collections::{BTreeMap, VecDeque};
use std::io::{self, Write as _};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::Response;
use axum::Router;
use clap::Parser;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

#[derive(Parser, Debug)]
#[command(
    name = "mock-provider",
    about = "Scriptable mock LLM provider for sluice tests"
)]
struct Args {
    /// TCP port; 0 picks a free one (printed on the LISTENING line).
    #[arg(long, default_value_t = 0)]
    port: u16,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Name echoed in ids, `system_fingerprint`, content and `x-mock-name`.
    #[arg(long, default_value = "mock")]
    name: String,
    /// Listen on this unix socket instead of TCP.
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Exit when stdin reaches EOF. The test harness holds our stdin open, so a test process
    /// that dies without running destructors (abort, SIGKILL) does not leak mock processes.
    #[arg(long)]
    exit_on_stdin_eof: bool,
    /// Serve HTTPS with this PEM certificate chain (needs `--tls-key`).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for `--tls-cert`.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

/// Pause before a scripted abort so the bytes before it reach the client.
const ABORT_FLUSH_PAUSE: Duration = Duration::from_millis(50);

/// How many recent requests `/__mock/requests` keeps.
const REQUEST_LOG_CAP: usize = 100;

#[derive(Default)]
struct Stats {
    total_calls: u64,
    calls_by_model: BTreeMap<String, u64>,
    calls_by_path: BTreeMap<String, u64>,
    // Gauges: they describe live work, so `reset` leaves them alone (zeroing them would make
    // the guards that decrement them go negative).
    open_streams: i64,
    in_flight: i64,
    completed_streams: u64,
    cancelled_streams: u64,
    aborted_streams: u64,
    cancelled_requests: u64,
    last_request: Option<Value>,
    requests: VecDeque<Value>,
}

struct FailRule {
    status: u16,
    /// `None`: until cleared; `Some(n)`: only the next `n` inference calls.
    remaining: Option<u64>,
}

struct Mock {
    name: String,
    next_id: Mutex<u64>,
    stats: Mutex<Stats>,
    fail: Mutex<Option<FailRule>>,
}

/// Poison-tolerant lock: a panicking handler must not wedge the mock for the rest of a test.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Mock {
    fn next_id(&self) -> u64 {
        let mut n = lock(&self.next_id);
        *n += 1;
        *n
    }

    fn stats(&self) -> MutexGuard<'_, Stats> {
        lock(&self.stats)
    }

    fn stats_json(&self) -> Value {
        let s = self.stats();
        let fail = lock(&self.fail)
            .as_ref()
            .map(|f| json!({"status": f.status, "remaining": f.remaining}));
        json!({
            "name": self.name,
            "total_calls": s.total_calls,
            "calls_by_model": s.calls_by_model,
            "calls_by_path": s.calls_by_path,
            "open_streams": s.open_streams,
            "completed_streams": s.completed_streams,
            "cancelled_streams": s.cancelled_streams,
            "aborted_streams": s.aborted_streams,
            "cancelled_requests": s.cancelled_requests,
            "in_flight": s.in_flight,
            "fail": fail,
            "last_request": s.last_request,
        })
    }

    fn reset(&self) {
        let mut s = self.stats();
        *s = Stats {
            open_streams: s.open_streams,
            in_flight: s.in_flight,
            ..Stats::default()
        };
    }

    /// Consumes one use of the fail switch, if set.
    fn take_fail(&self) -> Option<u16> {
        let mut fail = lock(&self.fail);
        let rule = fail.as_mut()?;
        let status = rule.status;
        if let Some(n) = rule.remaining.as_mut() {
            *n = n.saturating_sub(1);
            if *n == 0 {
                *fail = None;
            }
        }
        Some(status)
    }

    fn record(&self, req: &RequestInfo<'_>) {
        let headers: BTreeMap<String, String> = {
            let mut m: BTreeMap<String, String> = BTreeMap::new();
            for (k, v) in req.headers {
                let v = String::from_utf8_lossy(v.as_bytes()).into_owned();
                m.entry(k.as_str().to_owned())
                    .and_modify(|e| {
                        e.push_str(", ");
                        e.push_str(&v);
                    })
                    .or_insert(v);
            }
            m
        };
        let entry = json!({
            "path": req.path,
            "query": req.query,
            "method": req.method.as_str(),
            "headers": headers,
            "body_len": req.body.len(),
            "body_sha256": req.sha256,
            "json": req.json,
        });
        let mut s = self.stats();
        s.total_calls += 1;
        *s.calls_by_path.entry(req.path.to_owned()).or_default() += 1;
        if let Some(model) = req.model {
            *s.calls_by_model.entry(model.to_owned()).or_default() += 1;
        }
        if s.requests.len() == REQUEST_LOG_CAP {
            s.requests.pop_front();
        }
        s.requests.push_back(entry.clone());
        s.last_request = Some(entry);
    }
}

/// What a handler knows about the request it is answering.
struct RequestInfo<'a> {
    method: &'a Method,
    path: &'a str,
    query: Option<&'a str>,
    headers: &'a HeaderMap,
    body: &'a Bytes,
    sha256: String,
    json: Option<Value>,
    model: Option<&'a str>,
}

impl RequestInfo<'_> {
    /// The usage rule every endpoint shares: a quarter of the raw body, at least 1.
    fn prompt_tokens(&self) -> u64 {
        (self.body.len() as u64 / 4).max(1)
    }

    fn json_field(&self, key: &str) -> Option<&Value> {
        self.json.as_ref()?.get(key)
    }
}

/// Counts a request as in flight until dropped. Moved into streaming bodies so that open
/// streams stay counted until they end.
struct InFlight(Arc<Mock>);

impl InFlight {
    fn new(mock: &Arc<Mock>) -> Self {
        mock.stats().in_flight += 1;
        InFlight(mock.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.stats().in_flight -= 1;
    }
}

/// Detects a handler future dropped before it produced a response: hyper drops it when the
/// client hangs up during a `slow-` sleep.
struct Pending {
    mock: Arc<Mock>,
    armed: bool,
}

impl Drop for Pending {
    fn drop(&mut self) {
        if self.armed {
            self.mock.stats().cancelled_requests += 1;
        }
    }
}

/// Lives inside a streaming body. If the body is dropped before the last chunk was produced,
/// the client (or gateway) hung up: that is a cancelled stream.
struct StreamGuard {
    mock: Arc<Mock>,
    open: bool,
    in_flight: Option<InFlight>,
}

impl StreamGuard {
    fn new(mock: &Arc<Mock>, in_flight: InFlight) -> Self {
        mock.stats().open_streams += 1;
        StreamGuard {
            mock: mock.clone(),
            open: true,
            in_flight: Some(in_flight),
        }
    }

    /// Settles the accounting when the stream ends on its own. Done as the last chunk is
    /// produced (not when hyper drops the body later) so a client that has read `[DONE]` sees
    /// consistent stats.
    fn finish(&mut self, aborted: bool) {
        if !self.open {
            return;
        }
        self.open = false;
        {
            let mut s = self.mock.stats();
            s.open_streams -= 1;
            if aborted {
                s.aborted_streams += 1;
            } else {
                s.completed_streams += 1;
            }
        }
        self.in_flight.take();
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if self.open {
            let mut s = self.mock.stats();
            s.open_streams -= 1;
            s.cancelled_streams += 1;
        }
    }
}

/// The scripted behaviour parsed from a model name.
#[derive(Debug, Default)]
struct Script {
    slow_ms: Option<u64>,
    delay_ms: u64,
    chunks: usize,
    error: Option<u16>,
    context_window: bool,
    content_policy: bool,
    drop_mid_stream: bool,
    bad_json: bool,
}

/// The number right after the first occurrence of `key` that is followed by digits:
/// `num_after("drop-mid-stream-stream-7", "stream-") == Some(7)`.
fn num_after(model: &str, key: &str) -> Option<u64> {
    model.match_indices(key).find_map(|(i, _)| {
        let rest = &model[i + key.len()..];
        let end = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        rest[..end].parse().ok()
    })
}

impl Script {
    fn parse(model: &str) -> Script {
        Script {
            slow_ms: num_after(model, "slow-"),
            delay_ms: num_after(model, "delay-").unwrap_or(0),
            chunks: num_after(model, "stream-").map_or(5, |k| k.min(100_000) as usize),
            error: num_after(model, "error-")
                .and_then(|s| u16::try_from(s).ok())
                .filter(|s| (400..=599).contains(s)),
            context_window: model.contains("context-window"),
            content_policy: model.contains("content-policy"),
            drop_mid_stream: model.contains("drop-mid-stream"),
            bad_json: model.contains("bad-json"),
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn status_of(code: u16) -> StatusCode {
    StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

fn json_response(status: StatusCode, body: &Value) -> Response {
    let mut resp = Response::new(Body::from(body.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// An OpenAI-shaped error body; `type`/`code` follow what OpenAI sends for each status.
fn error_body(status: u16, message: &str, param: Option<&str>, code: Option<&str>) -> Value {
    let (ty, default_code) = match status {
        400 => ("invalid_request_error", "invalid_request"),
        401 => ("invalid_request_error", "invalid_api_key"),
        403 => ("permission_error", "permission_denied"),
        404 => ("invalid_request_error", "model_not_found"),
        408 => ("timeout_error", "timeout"),
        429 => ("requests", "rate_limit_exceeded"),
        500 => ("server_error", "internal_error"),
        502 => ("server_error", "bad_gateway"),
        503 => ("server_error", "service_unavailable"),
        504 => ("server_error", "gateway_timeout"),
        _ => ("api_error", "mock_error"),
    };
    json!({"error": {
        "message": message,
        "type": ty,
        "param": param,
        "code": code.unwrap_or(default_code),
    }})
}

fn scripted_error(status: u16) -> Response {
    let mut resp = json_response(
        status_of(status),
        &error_body(status, &format!("mock {status}"), None, None),
    );
    if status == 429 {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    resp
}

fn not_found(method: &Method, path: &str) -> Response {
    json_response(
        StatusCode::NOT_FOUND,
        &json!({"error": {
            "message": format!("mock: no route for {method} {path}"),
            "type": "invalid_request_error",
            "param": null,
            "code": "not_found",
        }}),
    )
}

/// Routes the mock serves; each exists with and without the `/v1` prefix.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Chat,
    Completions,
    Embeddings,
    Score,
    Rerank,
    Tokenize,
    /// Anthropic's Messages API (`/v1/messages`).
    Messages,
    /// Ollama's `/api/chat` and `/api/embed`.
    OllamaChat,
    OllamaEmbed,
    /// Cohere's `/v2/chat` and `/v2/embed`.
    CohereChat,
    CohereEmbed,
    /// Anthropic's `/v1/messages/count_tokens`.
    CountTokens,
    /// Gemini / Vertex `models/{m}:generateContent`, `:streamGenerateContent`, `:batchEmbedContents`.
    GeminiGenerate,
    GeminiStream,
    GeminiEmbed,
    /// Bedrock `/model/{id}/converse` and `/converse-stream`.
    BedrockConverse,
    BedrockStream,
    /// Bedrock `/model/{id}/invoke` (Titan and Cohere embeddings) and Vertex `:predict`.
    BedrockInvoke,
    VertexPredict,
}

impl Endpoint {
    fn from_path(path: &str) -> Option<Endpoint> {
        Some(match path {
            "/chat/completions" => Endpoint::Chat,
            "/completions" => Endpoint::Completions,
            "/embeddings" => Endpoint::Embeddings,
            "/score" => Endpoint::Score,
            "/rerank" => Endpoint::Rerank,
            "/tokenize" => Endpoint::Tokenize,
            "/messages" => Endpoint::Messages,
            _ => return None,
        })
    }
}

async fn handle(State(mock): State<Arc<Mock>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    // No size limit: the gateway tests send multi-MiB prompts.
    let body = match axum::body::to_bytes(body, usize::MAX).await {
        Ok(b) => b,
        Err(e) => {
            return json_response(
                StatusCode::BAD_REQUEST,
                &error_body(400, &format!("mock: reading body: {e}"), None, None),
            )
        }
    };
    let path = parts.uri.path();
    if let Some(action) = path.strip_prefix("/__mock/") {
        return control(&mock, &parts.method, action, &body);
    }

    let json: Option<Value> = serde_json::from_slice(&body).ok();
    let model = json
        .as_ref()
        .and_then(|j| j.get("model"))
        .and_then(Value::as_str)
        .map(str::to_owned);
    let info = RequestInfo {
        method: &parts.method,
        path,
        query: parts.uri.query(),
        headers: &parts.headers,
        sha256: sha256_hex(&body),
        body: &body,
        json,
        model: model.as_deref(),
    };
    mock.record(&info);

    let in_flight = InFlight::new(&mock);
    let mut pending = Pending {
        mock: mock.clone(),
        armed: true,
    };
    let mut resp = route(&mock, &info, in_flight).await;
    pending.armed = false;

    let h = resp.headers_mut();
    h.insert(
        HeaderName::from_static("x-mock-name"),
        HeaderValue::from_str(&mock.name).unwrap_or(HeaderValue::from_static("invalid")),
    );
    h.insert(
        HeaderName::from_static("x-mock-body-len"),
        HeaderValue::from(body.len()),
    );
    h.insert(
        HeaderName::from_static("x-mock-body-sha256"),
        HeaderValue::from_str(&info.sha256).expect("hex is a valid header value"),
    );
    resp
}

/// Provider-specific paths that do not follow the OpenAI layout.
fn provider_endpoint(path: &str) -> Option<Endpoint> {
    // Azure: /openai/deployments/{deployment}/chat/completions?api-version=...
    if let Some(rest) = path.strip_prefix("/openai/deployments/") {
        let (_, tail) = rest.split_once('/')?;
        return Endpoint::from_path(&format!("/{tail}"));
    }
    if path.starts_with("/v1beta/models/") || path.starts_with("/v1/projects/") {
        return Some(match path.rsplit_once(':')?.1 {
            "generateContent" => Endpoint::GeminiGenerate,
            "streamGenerateContent" => Endpoint::GeminiStream,
            "batchEmbedContents" => Endpoint::GeminiEmbed,
            "predict" => Endpoint::VertexPredict,
            _ => return None,
        });
    }
    if let Some(rest) = path.strip_prefix("/model/") {
        return Some(match rest.rsplit_once('/')?.1 {
            "converse" => Endpoint::BedrockConverse,
            "converse-stream" => Endpoint::BedrockStream,
            "invoke" => Endpoint::BedrockInvoke,
            _ => return None,
        });
    }
    Some(match path {
        "/api/chat" => Endpoint::OllamaChat,
        "/api/embed" => Endpoint::OllamaEmbed,
        "/v2/chat" => Endpoint::CohereChat,
        "/v2/embed" => Endpoint::CohereEmbed,
        "/v1/messages/count_tokens" => Endpoint::CountTokens,
        _ => return None,
    })
}

async fn route(mock: &Arc<Mock>, req: &RequestInfo<'_>, in_flight: InFlight) -> Response {
    // Google's OAuth token endpoint (form-encoded jwt-bearer grant).
    if req.method == Method::POST && req.path == "/token" {
        let form = String::from_utf8_lossy(req.body);
        let ok = form.contains("grant-type%3Ajwt-bearer") && form.contains("assertion=ey");
        return if ok {
            json_response(
                StatusCode::OK,
                &json!({"access_token": format!("ya29.mock-{}", mock.name),
                "expires_in": 3600, "token_type": "Bearer"}),
            )
        } else {
            json_response(StatusCode::BAD_REQUEST, &json!({"error": "invalid_grant"}))
        };
    }
    if req.method == Method::POST {
        if let Some(ep) = provider_endpoint(req.path) {
            return inference(mock, req, ep, in_flight).await;
        }
    }
    // `/v1/x` and `/x` are the same route; vLLM's reranker also answers on `/v2/rerank`.
    let path = req
        .path
        .strip_prefix("/v1")
        .or_else(|| req.path.strip_prefix("/v2"))
        .filter(|p| p.starts_with('/'))
        .unwrap_or(req.path);
    match (req.method, path) {
        (&Method::GET, "/health") => Response::new(Body::empty()),
        (&Method::GET, "/metrics") => metrics(mock),
        (&Method::GET, "/models") => json_response(
            StatusCode::OK,
            &json!({"object": "list", "data": [{
                "id": "mock-model",
                "object": "model",
                "created": 0,
                "owned_by": mock.name,
                "max_model_len": 4096,
            }]}),
        ),
        (&Method::POST, p) => match Endpoint::from_path(p) {
            Some(ep) => inference(mock, req, ep, in_flight).await,
            None => not_found(req.method, req.path),
        },
        _ => not_found(req.method, req.path),
    }
}

fn metrics(mock: &Mock) -> Response {
    let s = mock.stats();
    let text = format!(
        "# HELP vllm:num_requests_running Number of requests currently running on GPU.\n\
         # TYPE vllm:num_requests_running gauge\n\
         vllm:num_requests_running 0\n\
         # HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n\
         # TYPE vllm:num_requests_waiting gauge\n\
         vllm:num_requests_waiting 0\n\
         # HELP mock_in_flight Requests the mock is handling now.\n\
         # TYPE mock_in_flight gauge\n\
         mock_in_flight {}\n\
         # HELP mock_calls_total Calls the mock received since the last reset.\n\
         # TYPE mock_calls_total counter\n\
         mock_calls_total {}\n",
        s.in_flight, s.total_calls
    );
    let mut resp = Response::new(Body::from(text));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    resp
}

async fn inference(
    mock: &Arc<Mock>,
    req: &RequestInfo<'_>,
    ep: Endpoint,
    in_flight: InFlight,
) -> Response {
    if let Some(status) = mock.take_fail() {
        return scripted_error(status);
    }
    // Gemini, Vertex and Bedrock name the model in the path, not the body.
    let script = Script::parse(req.model.unwrap_or(req.path));
    if let Some(ms) = script.slow_ms {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if let Some(status) = script.error {
        return scripted_error(status);
    }
    if script.context_window {
        return json_response(
            StatusCode::BAD_REQUEST,
            &error_body(
                400,
                "This model's maximum context length is 4096 tokens. However, your messages \
                 resulted in 9000 tokens.",
                Some("messages"),
                Some("context_length_exceeded"),
            ),
        );
    }
    if script.content_policy {
        return json_response(
            StatusCode::BAD_REQUEST,
            &error_body(
                400,
                "The response was filtered due to the prompt triggering the mock's content \
                 management policy.",
                Some("prompt"),
                Some("content_filter"),
            ),
        );
    }
    if script.bad_json {
        let mut resp = Response::new(Body::from("<html>this is not json"));
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        return resp;
    }
    if req.json.is_none() {
        return json_response(
            StatusCode::BAD_REQUEST,
            &error_body(400, "mock: request body is not JSON", None, None),
        );
    }

    let streaming = req.json_field("stream").and_then(Value::as_bool) == Some(true);
    let model = req.model.unwrap_or("");
    match ep {
        Endpoint::Messages if streaming => anthropic_sse(mock, req, &script, in_flight),
        Endpoint::Messages => json_response(StatusCode::OK, &anthropic_message(mock, req)),
        Endpoint::BedrockInvoke => match req.json_field("texts").and_then(Value::as_array) {
            Some(texts) => json_response(
                StatusCode::OK,
                &json!({"id": "e", "texts": texts,
                "embeddings": (0..texts.len()).map(|i| vec![i as f64, 0.25]).collect::<Vec<_>>()}),
            ),
            None => json_response(
                StatusCode::OK,
                &json!({"embedding": [0.5, 0.25, 0.125], "inputTextTokenCount": 3}),
            ),
        },
        Endpoint::VertexPredict => {
            let n = req
                .json_field("instances")
                .and_then(Value::as_array)
                .map_or(0, Vec::len);
            json_response(
                StatusCode::OK,
                &json!({"predictions": (0..n).map(|i| json!({"embeddings": {"values": [i as f64, 0.75], "statistics": {"token_count": 2, "truncated": false}}})).collect::<Vec<_>>()}),
            )
        }
        Endpoint::GeminiGenerate if wants_tool(req) => {
            let name = req
                .json_field("tools")
                .and_then(|t| t.pointer("/0/functionDeclarations/0/name"))
                .cloned()
                .unwrap_or(json!("tool"));
            json_response(
                StatusCode::OK,
                &json!({
                "candidates": [{"content": {"role": "model", "parts": [{"functionCall": {"name": name, "args": {"location": "Paris"}}}]},
                                "finishReason": "STOP", "index": 0}],
                "usageMetadata": {"promptTokenCount": 7, "candidatesTokenCount": 4, "totalTokenCount": 11}}),
            )
        }
        Endpoint::BedrockConverse if wants_tool(req) => {
            let name = req
                .json_field("toolConfig")
                .and_then(|t| t.pointer("/tools/0/toolSpec/name"))
                .cloned()
                .unwrap_or(json!("tool"));
            json_response(
                StatusCode::OK,
                &json!({
                "output": {"message": {"role": "assistant", "content": [{"text": "Checking."}, {"toolUse": {"toolUseId": "tooluse_1", "name": name, "input": {"location": "Paris"}}}]}},
                "stopReason": "tool_use",
                "usage": {"inputTokens": 7, "outputTokens": 4, "totalTokens": 11}}),
            )
        }
        Endpoint::BedrockStream if wants_tool(req) => {
            let name = req
                .json_field("toolConfig")
                .and_then(|t| t.pointer("/tools/0/toolSpec/name"))
                .cloned()
                .unwrap_or(json!("tool"));
            let frames = [
                event_frame("messageStart", &json!({"role": "assistant"})),
                event_frame(
                    "contentBlockStart",
                    &json!({"contentBlockIndex": 0, "start": {"toolUse": {"toolUseId": "tooluse_1", "name": name}}}),
                ),
                event_frame(
                    "contentBlockDelta",
                    &json!({"contentBlockIndex": 0, "delta": {"toolUse": {"input": "{\"location\":"}}}),
                ),
                event_frame(
                    "contentBlockDelta",
                    &json!({"contentBlockIndex": 0, "delta": {"toolUse": {"input": " \"Paris\"}"}}}),
                ),
                event_frame("contentBlockStop", &json!({"contentBlockIndex": 0})),
                event_frame("messageStop", &json!({"stopReason": "tool_use"})),
                event_frame(
                    "metadata",
                    &json!({"usage": {"inputTokens": 7, "outputTokens": 4, "totalTokens": 11}, "metrics": {"latencyMs": 1}}),
                ),
            ];
            let steps = frames
                .into_iter()
                .map(|f| (Duration::ZERO, Step::Chunk(f)))
                .collect();
            let guard = StreamGuard::new(mock, in_flight);
            let mut resp = Response::new(step_body(steps, guard));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/vnd.amazon.eventstream"),
            );
            resp
        }
        Endpoint::GeminiGenerate => json_response(
            StatusCode::OK,
            &json!({
            "candidates": [{"content": {"role": "model", "parts": [{"text": format!("{} received {} bytes", mock.name, req.body.len())}]},
                            "finishReason": "STOP", "index": 0}],
            "usageMetadata": {"promptTokenCount": req.prompt_tokens(), "candidatesTokenCount": 5, "totalTokenCount": req.prompt_tokens() + 5},
            "modelVersion": "gemini-mock"}),
        ),
        Endpoint::GeminiStream => {
            let delay = Duration::from_millis(script.delay_ms);
            let k = script.chunks;
            let steps: Vec<(Duration, Step)> = (0..k)
                .map(|i| {
                    let mut ev = json!({"candidates": [{"content": {"role": "model", "parts": [{"text": format!("tok{i} ")}]}, "index": 0}],
                                        "modelVersion": "gemini-mock"});
                    if i + 1 == k {
                        ev["candidates"][0]["finishReason"] = json!("STOP");
                        ev["usageMetadata"] = json!({"promptTokenCount": req.prompt_tokens(), "candidatesTokenCount": k, "totalTokenCount": req.prompt_tokens() + k as u64});
                    }
                    (delay, Step::Chunk(Bytes::from(format!("data: {ev}\r\n\r\n"))))
                })
                .collect();
            let guard = StreamGuard::new(mock, in_flight);
            let mut resp = Response::new(step_body(steps, guard));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream"),
            );
            resp
        }
        Endpoint::GeminiEmbed => {
            let n = req
                .json_field("requests")
                .and_then(Value::as_array)
                .map_or(0, Vec::len);
            json_response(
                StatusCode::OK,
                &json!({"embeddings": (0..n).map(|i| json!({"values": [i as f64, 0.5]})).collect::<Vec<_>>()}),
            )
        }
        Endpoint::BedrockConverse => json_response(
            StatusCode::OK,
            &json!({
            "output": {"message": {"role": "assistant", "content": [{"text": format!("{} received {} bytes", mock.name, req.body.len())}]}},
            "stopReason": "end_turn",
            "usage": {"inputTokens": req.prompt_tokens(), "outputTokens": 5, "totalTokens": req.prompt_tokens() + 5},
            "metrics": {"latencyMs": 1}}),
        ),
        Endpoint::BedrockStream => {
            let delay = Duration::from_millis(script.delay_ms);
            let k = script.chunks;
            let mut steps = vec![(
                Duration::ZERO,
                Step::Chunk(event_frame("messageStart", &json!({"role": "assistant"}))),
            )];
            for i in 0..k {
                steps.push((
                    delay,
                    Step::Chunk(event_frame(
                        "contentBlockDelta",
                        &json!({"contentBlockIndex": 0, "delta": {"text": format!("tok{i} ")}}),
                    )),
                ));
            }
            steps.push((
                Duration::ZERO,
                Step::Chunk(event_frame(
                    "contentBlockStop",
                    &json!({"contentBlockIndex": 0}),
                )),
            ));
            steps.push((
                Duration::ZERO,
                Step::Chunk(event_frame(
                    "messageStop",
                    &json!({"stopReason": "end_turn"}),
                )),
            ));
            steps.push((Duration::ZERO, Step::Chunk(event_frame("metadata", &json!({"usage": {"inputTokens": req.prompt_tokens(), "outputTokens": k, "totalTokens": req.prompt_tokens() + k as u64}, "metrics": {"latencyMs": 1}})))));
            let guard = StreamGuard::new(mock, in_flight);
            let mut resp = Response::new(step_body(steps, guard));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/vnd.amazon.eventstream"),
            );
            resp
        }
        Endpoint::CountTokens => json_response(
            StatusCode::OK,
            &json!({"input_tokens": req.prompt_tokens()}),
        ),
        Endpoint::OllamaChat => ollama_chat(mock, req, &script, streaming, in_flight),
        Endpoint::OllamaEmbed => {
            let n = req
                .json_field("input")
                .and_then(Value::as_array)
                .map_or(1, Vec::len);
            json_response(
                StatusCode::OK,
                &json!({"model": model,
                "embeddings": (0..n).map(|i| vec![i as f64, 0.5, 0.25]).collect::<Vec<_>>(),
                "prompt_eval_count": req.prompt_tokens()}),
            )
        }
        Endpoint::CohereChat => json_response(
            StatusCode::OK,
            &json!({
                "id": format!("cohere-{}-{}", mock.name, mock.next_id()),
                "finish_reason": "COMPLETE",
                "message": {"role": "assistant", "content": [{"type": "text",
                    "text": format!("{} received {} bytes", mock.name, req.body.len())}]},
                "usage": {"billed_units": {"input_tokens": 3, "output_tokens": 5},
                          "tokens": {"input_tokens": req.prompt_tokens(), "output_tokens": 5}},
            }),
        ),
        Endpoint::CohereEmbed => {
            let n = req
                .json_field("texts")
                .and_then(Value::as_array)
                .map_or(0, Vec::len);
            json_response(
                StatusCode::OK,
                &json!({"id": "e", "texts": req.json_field("texts"),
                "embeddings": {"float": (0..n).map(|i| vec![i as f64, 1.0]).collect::<Vec<_>>()},
                "meta": {"billed_units": {"input_tokens": 7}}}),
            )
        }
        Endpoint::Chat | Endpoint::Completions if streaming => {
            sse(mock, req, ep, &script, in_flight)
        }
        Endpoint::Chat | Endpoint::Completions if script.drop_mid_stream => {
            // Non-streaming variant: half a JSON body, then the connection drops.
            let full = completion_json(mock, req, ep).to_string();
            let half = Bytes::from(full[..full.len() / 2].to_owned());
            let guard = StreamGuard::new(mock, in_flight);
            let steps = vec![
                (Duration::ZERO, Step::Chunk(half)),
                (Duration::ZERO, Step::Abort),
            ];
            let mut resp = Response::new(step_body(steps, guard));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            resp
        }
        Endpoint::Chat | Endpoint::Completions => {
            json_response(StatusCode::OK, &completion_json(mock, req, ep))
        }
        Endpoint::Embeddings => {
            let n = match req.json_field("input") {
                // A list of strings is a batch; a list of numbers is one tokenized input.
                Some(Value::Array(items)) if items.iter().all(|i| !i.is_number()) => items.len(),
                _ => 1,
            };
            let p = req.prompt_tokens();
            let data: Vec<Value> = (0..n)
                .map(|i| {
                    let v: Vec<f64> = (0..8).map(|j| ((i * 8 + j) as f64 * 0.125).sin()).collect();
                    json!({"object": "embedding", "index": i, "embedding": v})
                })
                .collect();
            json_response(
                StatusCode::OK,
                &json!({
                    "object": "list",
                    "data": data,
                    "model": model,
                    "usage": {"prompt_tokens": p, "total_tokens": p},
                }),
            )
        }
        Endpoint::Score => {
            let count = |k: &str| match req.json_field(k) {
                Some(Value::Array(a)) => a.len(),
                _ => 1,
            };
            let n = count("text_1").max(count("text_2"));
            let p = req.prompt_tokens();
            let data: Vec<Value> = (0..n)
                .map(|i| json!({"index": i, "object": "score", "score": 1.0 / (i as f64 + 2.0)}))
                .collect();
            json_response(
                StatusCode::OK,
                &json!({
                    "id": format!("score-{}-{}", mock.name, mock.next_id()),
                    "object": "list",
                    "created": unix_now(),
                    "model": model,
                    "data": data,
                    "usage": {"prompt_tokens": p, "total_tokens": p, "completion_tokens": 0,
                              "prompt_tokens_details": null},
                }),
            )
        }
        Endpoint::Rerank => {
            let docs: Vec<Value> = match req.json_field("documents") {
                Some(Value::Array(a)) => a.clone(),
                _ => Vec::new(),
            };
            let top_n = req
                .json_field("top_n")
                .and_then(Value::as_u64)
                .map_or(docs.len(), |n| n as usize);
            // Scores fall with the index, so the ranking is the input order.
            let results: Vec<Value> = docs
                .iter()
                .enumerate()
                .take(top_n)
                .map(|(i, d)| {
                    let text = d.as_str().or_else(|| d.get("text").and_then(Value::as_str));
                    json!({"index": i, "document": {"text": text},
                           "relevance_score": 1.0 / (i as f64 + 2.0)})
                })
                .collect();
            json_response(
                StatusCode::OK,
                &json!({
                    "id": format!("rerank-{}-{}", mock.name, mock.next_id()),
                    "model": model,
                    "usage": {"total_tokens": req.prompt_tokens()},
                    "results": results,
                }),
            )
        }
        Endpoint::Tokenize => {
            let n = req.prompt_tokens();
            json_response(
                StatusCode::OK,
                &json!({
                    "count": n,
                    "max_model_len": 4096,
                    "tokens": (0..n).collect::<Vec<u64>>(),
                    "token_strs": null,
                }),
            )
        }
    }
}

/// The non-streaming `chat.completion` / `text_completion` object.
fn completion_json(mock: &Mock, req: &RequestInfo<'_>, ep: Endpoint) -> Value {
    let p = req.prompt_tokens();
    let content = format!("{} received {} bytes", mock.name, req.body.len());
    let usage = json!({"prompt_tokens": p, "completion_tokens": 5, "total_tokens": p + 5});
    let id = mock.next_id();
    if ep == Endpoint::Chat {
        json!({
            "id": format!("chatcmpl-{}-{id}", mock.name),
            "object": "chat.completion",
            "created": unix_now(),
            "model": req.model,
            "system_fingerprint": mock.name,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "logprobs": null,
                "finish_reason": "stop",
            }],
            "usage": usage,
        })
    } else {
        json!({
            "id": format!("cmpl-{}-{id}", mock.name),
            "object": "text_completion",
            "created": unix_now(),
            "model": req.model,
            "system_fingerprint": mock.name,
            "choices": [{"text": content, "index": 0, "logprobs": null, "finish_reason": "stop"}],
            "usage": usage,
        })
    }
}

enum Step {
    Chunk(Bytes),
    /// Fail the body stream: hyper then drops the connection mid-response.
    Abort,
}

/// A body that yields `steps` one at a time, each after its delay, so every chunk reaches the
/// socket separately. The guard rides inside the stream so its `Drop` sees a hang-up.
fn step_body(steps: Vec<(Duration, Step)>, guard: StreamGuard) -> Body {
    let state = (steps.into_iter(), guard);
    let stream = futures_util::stream::unfold(state, |(mut steps, mut guard)| async move {
        let (delay, step) = steps.next()?;
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let item = match step {
            Step::Chunk(bytes) => {
                if steps.len() == 0 {
                    guard.finish(false);
                }
                Ok(bytes)
            }
            Step::Abort => {
                // hyper only flushes when the body stalls; without this pause it would drop
                // the connection before the headers and earlier chunks left its write buffer.
                tokio::time::sleep(ABORT_FLUSH_PAUSE).await;
                guard.finish(true);
                Err(io::Error::other("mock: drop-mid-stream"))
            }
        };
        Some((item, (steps, guard)))
    });
    Body::from_stream(stream)
}

fn sse_event(v: &Value) -> Step {
    Step::Chunk(Bytes::from(format!("data: {v}\n\n")))
}

fn sse(
    mock: &Arc<Mock>,
    req: &RequestInfo<'_>,
    ep: Endpoint,
    script: &Script,
    in_flight: InFlight,
) -> Response {
    let chat = ep == Endpoint::Chat;
    let (id, object) = if chat {
        (
            format!("chatcmpl-{}-{}", mock.name, mock.next_id()),
            "chat.completion.chunk",
        )
    } else {
        (
            format!("cmpl-{}-{}", mock.name, mock.next_id()),
            "text_completion",
        )
    };
    let include_usage = req
        .json_field("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        == Some(true);
    let created = unix_now();
    let chunk = |choices: Value| {
        let mut v = json!({
            "id": id,
            "object": object,
            "created": created,
            "model": req.model,
            "system_fingerprint": mock.name,
            "choices": choices,
        });
        if include_usage {
            // OpenAI sends `usage: null` on every chunk but the last when usage is requested.
            v["usage"] = Value::Null;
        }
        v
    };

    let k = script.chunks;
    let delay = Duration::from_millis(script.delay_ms);
    let mut steps = Vec::with_capacity(k + 3);
    if chat {
        steps.push((
            Duration::ZERO,
            sse_event(&chunk(json!([{
                "index": 0,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": null,
                "finish_reason": null,
            }]))),
        ));
    }
    for i in 0..k {
        if script.drop_mid_stream && i == 2 {
            steps.push((delay, Step::Abort));
            break;
        }
        let finish = if i + 1 == k {
            json!("stop")
        } else {
            Value::Null
        };
        let text = format!("tok{i} ");
        let choice = if chat {
            json!({"index": 0, "delta": {"content": text}, "logprobs": null,
                   "finish_reason": finish})
        } else {
            json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish})
        };
        steps.push((delay, sse_event(&chunk(json!([choice])))));
    }
    if script.drop_mid_stream && k <= 2 {
        steps.push((delay, Step::Abort));
    }
    if !script.drop_mid_stream {
        if include_usage {
            let p = req.prompt_tokens();
            let mut last = chunk(json!([]));
            last["usage"] = json!({
                "prompt_tokens": p,
                "completion_tokens": k,
                "total_tokens": p + k as u64,
            });
            steps.push((Duration::ZERO, sse_event(&last)));
        }
        steps.push((
            Duration::ZERO,
            Step::Chunk(Bytes::from_static(b"data: [DONE]\n\n")),
        ));
    }

    let guard = StreamGuard::new(mock, in_flight);
    let mut resp = Response::new(step_body(steps, guard));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

/// Ollama's `/api/chat`: one JSON object, or NDJSON lines when `stream` is not false (Ollama
/// streams by default).
fn ollama_chat(
    mock: &Arc<Mock>,
    req: &RequestInfo<'_>,
    script: &Script,
    streaming_flag: bool,
    in_flight: InFlight,
) -> Response {
    let streaming = streaming_flag || req.json_field("stream").is_none();
    let p = req.prompt_tokens();
    let model = req.model.unwrap_or("");
    if !streaming {
        return json_response(
            StatusCode::OK,
            &json!({"model": model, "created_at": "2024-01-01T00:00:00Z",
            "message": {"role": "assistant", "content": format!("{} received {} bytes", mock.name, req.body.len())},
            "done": true, "done_reason": "stop", "prompt_eval_count": p, "eval_count": 5}),
        );
    }
    let delay = Duration::from_millis(script.delay_ms);
    let mut steps: Vec<(Duration, Step)> = (0..script.chunks)
        .map(|i| {
            (
                delay,
                Step::Chunk(Bytes::from(format!(
                    "{}\n",
                    json!({"model": model,
            "message": {"role": "assistant", "content": format!("tok{i} ")}, "done": false})
                ))),
            )
        })
        .collect();
    steps.push((
        Duration::ZERO,
        Step::Chunk(Bytes::from(format!(
            "{}\n",
            json!({"model": model,
        "message": {"role": "assistant", "content": ""}, "done": true, "done_reason": "stop",
        "prompt_eval_count": p, "eval_count": script.chunks})
        ))),
    ));
    let guard = StreamGuard::new(mock, in_flight);
    let mut resp = Response::new(step_body(steps, guard));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    resp
}

/// Gemini and Bedrock name the model in the path: a `tool` model with tools offered calls one.
fn wants_tool(req: &RequestInfo<'_>) -> bool {
    req.path.contains("tool")
        && (req.json_field("tools").is_some() || req.json_field("toolConfig").is_some())
}

/// One AWS event-stream frame: prelude (lengths + CRC), string headers, JSON payload, CRC.
fn event_frame(event_type: &str, payload: &Value) -> Bytes {
    let mut headers = Vec::new();
    for (name, value) in [
        (":event-type", event_type),
        (":content-type", "application/json"),
        (":message-type", "event"),
    ] {
        headers.push(name.len() as u8);
        headers.extend_from_slice(name.as_bytes());
        headers.push(7); // string
        headers.extend_from_slice(&(value.len() as u16).to_be_bytes());
        headers.extend_from_slice(value.as_bytes());
    }
    let payload = payload.to_string().into_bytes();
    let total = 12 + headers.len() + payload.len() + 4;
    let mut frame = Vec::with_capacity(total);
    frame.extend_from_slice(&(total as u32).to_be_bytes());
    frame.extend_from_slice(&(headers.len() as u32).to_be_bytes());
    let prelude_crc = crc32fast::hash(&frame);
    frame.extend_from_slice(&prelude_crc.to_be_bytes());
    frame.extend_from_slice(&headers);
    frame.extend_from_slice(&payload);
    let crc = crc32fast::hash(&frame);
    frame.extend_from_slice(&crc.to_be_bytes());
    Bytes::from(frame)
}

/// What an Anthropic answer holds: text, and a tool call when the request offers tools and the
/// model name says `tool` (or forces a tool with `tool_choice`).
fn anthropic_plan(mock: &Mock, req: &RequestInfo<'_>) -> (String, Option<(String, Value)>) {
    let text = format!("{} received {} bytes", mock.name, req.body.len());
    let forced = req
        .json_field("tool_choice")
        .filter(|c| c["type"] == "tool")
        .and_then(|c| c["name"].as_str().map(str::to_owned));
    let first_tool = req
        .json_field("tools")
        .and_then(|t| t.get(0))
        .and_then(|t| t["name"].as_str().map(str::to_owned));
    let tool = forced.or(first_tool.filter(|_| req.model.unwrap_or("").contains("tool")));
    let call = tool.map(|name| {
        let input = if name == "json_tool_call" {
            json!({"answer": 42})
        } else {
            json!({"location": "Paris", "unit": "celsius"})
        };
        (name, input)
    });
    (text, call)
}

fn anthropic_usage(req: &RequestInfo<'_>, output: u64) -> Value {
    let cached = if req.model.unwrap_or("").contains("cache") {
        3
    } else {
        0
    };
    json!({"input_tokens": req.prompt_tokens(), "output_tokens": output,
           "cache_creation_input_tokens": 0, "cache_read_input_tokens": cached})
}

fn anthropic_message(mock: &Mock, req: &RequestInfo<'_>) -> Value {
    let (text, call) = anthropic_plan(mock, req);
    let mut content = vec![json!({"type": "text", "text": text})];
    if let Some((name, input)) = &call {
        content
            .push(json!({"type": "tool_use", "id": "toolu_mock_1", "name": name, "input": input}));
    }
    json!({
        "id": format!("msg_{}_{}", mock.name, mock.next_id()),
        "type": "message",
        "role": "assistant",
        "model": req.model,
        "content": content,
        "stop_reason": if call.is_some() { "tool_use" } else { "end_turn" },
        "stop_sequence": null,
        "usage": anthropic_usage(req, 5),
    })
}

/// Anthropic's typed SSE: message_start, content blocks with deltas, message_delta, message_stop.
fn anthropic_sse(
    mock: &Arc<Mock>,
    req: &RequestInfo<'_>,
    script: &Script,
    in_flight: InFlight,
) -> Response {
    let (_, call) = anthropic_plan(mock, req);
    let delay = Duration::from_millis(script.delay_ms);
    let event =
        |name: &str, v: Value| Step::Chunk(Bytes::from(format!("event: {name}\ndata: {v}\n\n")));
    let mut usage = anthropic_usage(req, 1);
    let mut steps = vec![(
        Duration::ZERO,
        event(
            "message_start",
            json!({"type": "message_start", "message": {
            "id": format!("msg_{}_{}", mock.name, mock.next_id()), "type": "message", "role": "assistant",
            "model": req.model, "content": [], "stop_reason": null, "stop_sequence": null, "usage": usage}}),
        ),
    )];
    steps.push((Duration::ZERO, event("content_block_start", json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}))));
    steps.push((Duration::ZERO, event("ping", json!({"type": "ping"}))));
    for i in 0..script.chunks {
        if script.drop_mid_stream && i == 2 {
            steps.push((delay, Step::Abort));
            break;
        }
        steps.push((delay, event("content_block_delta", json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": format!("tok{i} ")}}))));
    }
    steps.push((
        Duration::ZERO,
        event(
            "content_block_stop",
            json!({"type": "content_block_stop", "index": 0}),
        ),
    ));
    if let Some((name, input)) = &call {
        steps.push((Duration::ZERO, event("content_block_start", json!({"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "toolu_mock_1", "name": name, "input": {}}}))));
        let json = input.to_string();
        let (a, b) = json.split_at(json.len() / 2);
        for part in [a, b] {
            steps.push((delay, event("content_block_delta", json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": part}}))));
        }
        steps.push((
            Duration::ZERO,
            event(
                "content_block_stop",
                json!({"type": "content_block_stop", "index": 1}),
            ),
        ));
    }
    usage["output_tokens"] = json!(script.chunks);
    steps.push((Duration::ZERO, event("message_delta", json!({"type": "message_delta",
        "delta": {"stop_reason": if call.is_some() { "tool_use" } else { "end_turn" }, "stop_sequence": null},
        "usage": {"output_tokens": script.chunks}}))));
    steps.push((
        Duration::ZERO,
        event("message_stop", json!({"type": "message_stop"})),
    ));
    let guard = StreamGuard::new(mock, in_flight);
    let mut resp = Response::new(step_body(steps, guard));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    resp
}

fn control(mock: &Mock, method: &Method, action: &str, body: &Bytes) -> Response {
    match (method, action) {
        (&Method::GET, "stats") => json_response(StatusCode::OK, &mock.stats_json()),
        (&Method::GET, "requests") => {
            let reqs: Vec<Value> = mock.stats().requests.iter().cloned().collect();
            json_response(StatusCode::OK, &Value::Array(reqs))
        }
        (&Method::POST, "reset") => {
            mock.reset();
            json_response(StatusCode::OK, &json!({"ok": true}))
        }
        (&Method::POST, "fail") => {
            let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
            let status = v.get("status").and_then(Value::as_u64);
            let rule = match status {
                None => None,
                Some(s @ 100..=599) => Some(FailRule {
                    status: s as u16,
                    remaining: v.get("count").and_then(Value::as_u64),
                }),
                Some(s) => {
                    return json_response(
                        StatusCode::BAD_REQUEST,
                        &error_body(400, &format!("mock: bad status {s}"), None, None),
                    )
                }
            };
            *lock(&mock.fail) = rule;
            json_response(StatusCode::OK, &json!({"ok": true}))
        }
        _ => not_found(method, &format!("/__mock/{action}")),
    }
}

fn announce(what: &str) -> io::Result<()> {
    let mut out = io::stdout().lock();
    writeln!(out, "LISTENING {what}")?;
    out.flush()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mock = Arc::new(Mock {
        name: args.name,
        next_id: Mutex::new(0),
        stats: Mutex::new(Stats::default()),
        fail: Mutex::new(None),
    });
    let app = Router::new().fallback(handle).with_state(mock);

    if args.exit_on_stdin_eof {
        tokio::spawn(async {
            use tokio::io::AsyncReadExt as _;
            let mut stdin = tokio::io::stdin();
            let mut buf = [0u8; 64];
            while let Ok(n) = stdin.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
            std::process::exit(0);
        });
    }

    if let Some(path) = args.socket {
        // A stale socket file from an earlier run would make bind fail.
        let _ = std::fs::remove_file(&path);
        let listener = tokio::net::UnixListener::bind(&path)?;
        announce(&path.display().to_string())?;
        axum::serve(listener, app).await?;
    } else {
        use axum::serve::ListenerExt as _;
        let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port)).await?;
        announce(&listener.local_addr()?.port().to_string())?;
        if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
            return serve_tls(listener, app, cert, key).await;
        }
        // Without TCP_NODELAY, small SSE chunks on a kept-alive connection wait ~40 ms for
        // delayed ACKs, which would distort every streaming measurement.
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        axum::serve(listener, app).await?;
    }
    Ok(())
}

/// HTTPS: rustls over each accepted connection, then the same router (HTTP/1.1 and h2 by ALPN).
async fn serve_tls(
    listener: tokio::net::TcpListener,
    app: Router,
    cert: &std::path::Path,
    key: &std::path::Path,
) -> anyhow::Result<()> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    let certs = CertificateDer::pem_file_iter(cert)?.collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(key)?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    loop {
        let (tcp, _) = listener.accept().await?;
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let app = app.clone();
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let service = hyper_util::service::TowerToHyperService::new(app);
            let _ =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
        });
    }
}
