//! Anthropic Messages API: OpenAI chat requests become `/v1/messages` bodies (system prompt
//! lifted to `system`, tools to `input_schema` tools, tool results to `tool_result` blocks), and
//! responses and SSE streams come back in OpenAI's shape. `response_format` is honoured the way
//! LiteLLM does it: a forced tool whose input is the JSON answer.

use serde::Deserialize;
use serde_json::{json, Map, Value};
use sluice_config::Deployment;

use super::common::{bad, now, parse_field, CachedUsage, ChunkWriter, OpenAiMessage};
use super::{unsupported_params, CallOptions, Operation, UpstreamRequest};
use crate::body::RequestBody;
use crate::error::ApiError;
use crate::sse::{event_data, SseSplitter};
use crate::usage::Usage;

pub const API_VERSION: &str = "2023-06-01";
/// LiteLLM's default when the client gives no `max_tokens` (Anthropic requires one).
pub const DEFAULT_MAX_TOKENS: u64 = 4096;
/// The tool that carries a `response_format` answer.
const JSON_TOOL: &str = "json_tool_call";

/// OpenAI parameters Anthropic has no equivalent for.
const UNSUPPORTED: &[&str] = &[
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "logprobs",
    "top_logprobs",
    "seed",
    "service_tier",
    "prediction",
    "audio",
    "modalities",
];

/// OpenAI message content (a string or a list of parts) as Anthropic content blocks.
fn content_blocks(content: &Value) -> Result<Vec<Value>, ApiError> {
    match content {
        Value::Null => Ok(vec![]),
        Value::String(s) if s.is_empty() => Ok(vec![]),
        Value::String(s) => Ok(vec![json!({"type": "text", "text": s})]),
        Value::Array(parts) => {
            let mut blocks = Vec::with_capacity(parts.len());
            for p in parts {
                blocks.extend(part_block(p)?);
            }
            Ok(blocks)
        }
        other => Err(bad(format!("Invalid message content: {other}"))),
    }
}

fn part_block(part: &Value) -> Result<Option<Value>, ApiError> {
    match part.get("type").and_then(Value::as_str) {
        Some("text") => {
            let text = part.get("text").and_then(Value::as_str).unwrap_or("");
            Ok((!text.is_empty()).then(|| {
                let mut b = json!({"type": "text", "text": text});
                if let Some(cc) = part.get("cache_control") {
                    b["cache_control"] = cc.clone();
                }
                b
            }))
        }
        Some("image_url") => {
            let url = part
                .pointer("/image_url/url")
                .or_else(|| part.get("image_url"))
                .and_then(Value::as_str)
                .ok_or_else(|| bad("image_url part without a url"))?;
            Ok(Some(image_block(url)?))
        }
        Some(other) => Err(bad(format!(
            "Unsupported content part type for Anthropic: {other}"
        ))),
        None => Err(bad("A content part has no `type`")),
    }
}

fn image_block(url: &str) -> Result<Value, ApiError> {
    if let Some(rest) = url.strip_prefix("data:") {
        let (meta, data) = rest
            .split_once(',')
            .ok_or_else(|| bad("Malformed data URL in image_url"))?;
        let media_type = meta
            .strip_suffix(";base64")
            .ok_or_else(|| bad("image data URLs must be base64"))?;
        Ok(
            json!({"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}),
        )
    } else {
        Ok(json!({"type": "image", "source": {"type": "url", "url": url}}))
    }
}

fn text_of(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

/// Appends blocks as a turn of `role`, merging with the previous turn of the same role
/// (Anthropic wants user and assistant turns to alternate).
fn push_turn(messages: &mut Vec<Value>, role: &str, blocks: Vec<Value>) {
    if blocks.is_empty() {
        return;
    }
    if let Some(last) = messages.last_mut() {
        if last["role"] == role {
            if let Some(content) = last["content"].as_array_mut() {
                content.extend(blocks);
                return;
            }
        }
    }
    messages.push(json!({"role": role, "content": blocks}));
}

fn convert_messages(raw: Vec<OpenAiMessage>) -> Result<(Vec<String>, Vec<Value>), ApiError> {
    let mut system = vec![];
    let mut messages: Vec<Value> = vec![];
    for m in raw {
        match m.role.as_str() {
            "system" | "developer" => system.push(text_of(&m.content)),
            "user" => push_turn(&mut messages, "user", content_blocks(&m.content)?),
            "assistant" => {
                let mut blocks = vec![];
                if let Some(r) = m.reasoning_content.filter(|r| !r.is_empty()) {
                    // Without the signature Anthropic issued, a thinking block cannot be sent
                    // back; keep it as text so the context is not lost.
                    blocks.push(json!({"type": "text", "text": r}));
                }
                blocks.extend(content_blocks(&m.content)?);
                for call in m.tool_calls.unwrap_or_default() {
                    let input: Value = if call.function.arguments.trim().is_empty() {
                        json!({})
                    } else {
                        serde_json::from_str(&call.function.arguments).map_err(|e| {
                            bad(format!(
                                "tool_calls arguments of {} are not JSON: {e}",
                                call.id
                            ))
                        })?
                    };
                    blocks.push(json!({"type": "tool_use", "id": call.id, "name": call.function.name, "input": input}));
                }
                push_turn(&mut messages, "assistant", blocks);
            }
            "tool" | "function" => {
                let id = m.tool_call_id.ok_or_else(|| {
                    bad("A tool message needs tool_call_id").with_param("messages")
                })?;
                let content = match &m.content {
                    Value::String(s) => json!(s),
                    other => json!(content_blocks(other)?),
                };
                push_turn(
                    &mut messages,
                    "user",
                    vec![json!({"type": "tool_result", "tool_use_id": id, "content": content})],
                );
            }
            other => {
                return Err(bad(format!("Invalid message role: {other}")).with_param("messages"))
            }
        }
    }
    Ok((system, messages))
}

fn convert_tools(tools: Vec<Value>) -> Result<Vec<Value>, ApiError> {
    tools
        .into_iter()
        .map(|t| {
            let f = t.get("function").ok_or_else(|| bad("Only function tools are supported").with_param("tools"))?;
            let name = f.get("name").and_then(Value::as_str).ok_or_else(|| bad("A tool has no name").with_param("tools"))?;
            let mut out = json!({
                "name": name,
                "input_schema": f.get("parameters").cloned().unwrap_or_else(|| json!({"type": "object", "properties": {}})),
            });
            if let Some(d) = f.get("description") {
                out["description"] = d.clone();
            }
            if let Some(cc) = t.get("cache_control") {
                out["cache_control"] = cc.clone();
            }
            Ok(out)
        })
        .collect()
}

fn convert_tool_choice(choice: &Value, parallel: Option<bool>) -> Result<Option<Value>, ApiError> {
    let mut out = match choice {
        Value::String(s) if s == "auto" => json!({"type": "auto"}),
        Value::String(s) if s == "required" || s == "any" => json!({"type": "any"}),
        Value::String(s) if s == "none" => json!({"type": "none"}),
        Value::Object(_) => match choice.pointer("/function/name").and_then(Value::as_str) {
            Some(name) => json!({"type": "tool", "name": name}),
            None => return Err(bad("tool_choice names no function").with_param("tool_choice")),
        },
        Value::Null => return Ok(None),
        other => return Err(bad(format!("Invalid tool_choice: {other}")).with_param("tool_choice")),
    };
    if parallel == Some(false) {
        out["disable_parallel_tool_use"] = json!(true);
    }
    Ok(Some(out))
}

pub(super) fn build_request(
    op: Operation,
    body: &mut RequestBody<'_>,
    d: &Deployment,
    upstream_model: &str,
    stream: bool,
    opts: &CallOptions,
) -> Result<UpstreamRequest, ApiError> {
    if op != Operation::ChatCompletions {
        return Err(ApiError::new(
            400,
            "bad_request_error",
            format!(
                "anthropic does not support {} (only chat completions)",
                op.openai_path()
            ),
        ));
    }
    for (k, v) in &d.default_params {
        body.set_default(k, v.to_string());
    }
    let n: Option<u64> = parse_field(body, "n")?;
    let mut unsupported: Vec<&str> = UNSUPPORTED
        .iter()
        .copied()
        .filter(|p| body.contains(p))
        .collect();
    if n.is_some_and(|n| n > 1) {
        unsupported.push("n");
    }
    if !unsupported.is_empty() && !opts.drop_params {
        return Err(unsupported_params(
            "anthropic",
            upstream_model,
            &unsupported,
        ));
    }

    let messages: Vec<OpenAiMessage> = parse_field(body, "messages")?.unwrap_or_default();
    let (system, messages) = convert_messages(messages)?;
    let mut out = Map::new();
    out.insert("model".into(), json!(upstream_model));
    out.insert("messages".into(), json!(messages));
    let system: Vec<String> = system.into_iter().filter(|s| !s.is_empty()).collect();
    if !system.is_empty() {
        out.insert("system".into(), json!(system.join("\n")));
    }
    let max_tokens: Option<u64> = parse_field(body, "max_completion_tokens")?;
    let max_tokens = max_tokens
        .or(parse_field(body, "max_tokens")?)
        .unwrap_or(DEFAULT_MAX_TOKENS);
    out.insert("max_tokens".into(), json!(max_tokens));
    for key in ["temperature", "top_p", "top_k", "thinking"] {
        if let Some(raw) = body.raw(key).filter(|r| *r != "null") {
            out.insert(
                key.into(),
                serde_json::from_str(raw).map_err(|e| bad(format!("`{key}`: {e}")))?,
            );
        }
    }
    if let Some(stop) = parse_field::<Value>(body, "stop")? {
        let list = match stop {
            Value::String(s) => vec![s],
            Value::Array(a) => a
                .into_iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect(),
            other => return Err(bad(format!("Invalid stop: {other}")).with_param("stop")),
        };
        out.insert("stop_sequences".into(), json!(list));
    }
    if stream {
        out.insert("stream".into(), json!(true));
    }
    if let Some(user) = parse_field::<String>(body, "user")? {
        out.insert("metadata".into(), json!({"user_id": user}));
    }
    let mut tools = convert_tools(parse_field(body, "tools")?.unwrap_or_default())?;
    let parallel: Option<bool> = parse_field(body, "parallel_tool_calls")?;
    let mut tool_choice = match parse_field::<Value>(body, "tool_choice")? {
        Some(c) => convert_tool_choice(&c, parallel)?,
        None => None,
    };
    if let Some(format) = parse_field::<Value>(body, "response_format")? {
        let schema = match format.get("type").and_then(Value::as_str) {
            Some("json_schema") => Some(
                format
                    .pointer("/json_schema/schema")
                    .cloned()
                    .unwrap_or_else(|| json!({"type": "object"})),
            ),
            Some("json_object") => Some(json!({"type": "object"})),
            Some("text") | None => None,
            Some(other) => {
                return Err(bad(format!("Unsupported response_format type: {other}"))
                    .with_param("response_format"))
            }
        };
        if let Some(schema) = schema {
            tools.push(json!({"name": JSON_TOOL, "description": "Respond with a JSON object.", "input_schema": schema}));
            tool_choice = Some(json!({"type": "tool", "name": JSON_TOOL}));
        }
    }
    if !tools.is_empty() {
        out.insert("tools".into(), json!(tools));
    }
    if let Some(c) = tool_choice {
        out.insert("tool_choice".into(), c);
    }

    let mut headers = vec![("anthropic-version".to_string(), API_VERSION.to_string())];
    if let Some(key) = &d.api_key {
        headers.push(("x-api-key".to_string(), key.clone()));
    }
    headers.extend(d.extra_headers.iter().cloned());
    Ok(UpstreamRequest {
        path: "/v1/messages".into(),
        headers,
        body: serde_json::to_vec(&Value::Object(out)).expect("json serializes"),
        injected_stream_usage: false,
    })
}

fn finish_reason(stop_reason: Option<&str>, json_mode: bool) -> &'static str {
    match stop_reason {
        Some("max_tokens") => "length",
        Some("tool_use") if !json_mode => "tool_calls",
        Some("refusal") => "content_filter",
        _ => "stop",
    }
}

#[derive(Deserialize, Default, Clone, Copy)]
struct AnthropicUsage {
    #[serde(default)]
    input_tokens: u64,
    #[serde(default)]
    output_tokens: u64,
    #[serde(default)]
    cache_creation_input_tokens: u64,
    #[serde(default)]
    cache_read_input_tokens: u64,
}

impl AnthropicUsage {
    fn cached(&self) -> CachedUsage {
        CachedUsage {
            input: self.input_tokens,
            output: self.output_tokens,
            cache_read: self.cache_read_input_tokens,
            cache_write: self.cache_creation_input_tokens,
        }
    }

    fn prompt(&self) -> u64 {
        self.cached().prompt()
    }

    fn openai(&self) -> Value {
        self.cached().openai()
    }

    fn usage(&self) -> Usage {
        self.cached().usage()
    }
}

/// A whole Messages response as an OpenAI chat completion.
pub(super) fn translate_response(
    body: &[u8],
    model: &str,
) -> Result<(Vec<u8>, Option<Usage>), ApiError> {
    #[derive(Deserialize)]
    struct Message {
        #[serde(default)]
        id: String,
        #[serde(default)]
        content: Vec<Value>,
        #[serde(default)]
        stop_reason: Option<String>,
        #[serde(default)]
        usage: AnthropicUsage,
    }
    let m: Message = serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            502,
            "internal_server_error",
            format!("litellm.APIError: AnthropicException - malformed response: {e}"),
        )
    })?;
    let mut text = String::new();
    let mut reasoning = String::new();
    let mut tool_calls = vec![];
    let mut json_mode = false;
    for block in &m.content {
        match block.get("type").and_then(Value::as_str) {
            Some("text") => text.push_str(block.get("text").and_then(Value::as_str).unwrap_or("")),
            Some("thinking") => {
                reasoning.push_str(block.get("thinking").and_then(Value::as_str).unwrap_or(""))
            }
            Some("tool_use") => {
                let name = block.get("name").and_then(Value::as_str).unwrap_or("");
                let input = block.get("input").cloned().unwrap_or_else(|| json!({}));
                if name == JSON_TOOL {
                    json_mode = true;
                    text.push_str(&input.to_string());
                } else {
                    tool_calls.push(json!({
                        "id": block.get("id").cloned().unwrap_or(Value::Null),
                        "type": "function",
                        "function": {"name": name, "arguments": input.to_string()},
                    }));
                }
            }
            _ => {}
        }
    }
    let mut message = json!({"role": "assistant", "content": if text.is_empty() && !tool_calls.is_empty() { Value::Null } else { json!(text) }});
    if !tool_calls.is_empty() {
        message["tool_calls"] = json!(tool_calls);
    }
    if !reasoning.is_empty() {
        message["reasoning_content"] = json!(reasoning);
    }
    let out = json!({
        "id": m.id,
        "object": "chat.completion",
        "created": now(),
        "model": model,
        "choices": [{
            "index": 0,
            "message": message,
            "finish_reason": finish_reason(m.stop_reason.as_deref(), json_mode),
        }],
        "usage": m.usage.openai(),
    });
    Ok((
        serde_json::to_vec(&out).expect("json serializes"),
        Some(m.usage.usage()),
    ))
}

/// Turns Anthropic's typed SSE events into OpenAI `chat.completion.chunk` events, for any
/// chunking of the input.
#[derive(Default)]
pub struct AnthropicStream {
    splitter: SseSplitter,
    id: String,
    model: String,
    created: u64,
    writer: ChunkWriter,
    usage: AnthropicUsage,
    /// Content block index → OpenAI tool call index (`None` for the JSON-answer tool).
    blocks: Vec<(u64, Option<usize>)>,
    tool_calls: usize,
    json_mode: bool,
    include_usage: bool,
    finished: bool,
}

impl AnthropicStream {
    pub fn new(model: &str, include_usage: bool) -> Self {
        let created = now();
        AnthropicStream {
            model: model.to_string(),
            created,
            writer: ChunkWriter::new("", created, model),
            include_usage,
            ..Default::default()
        }
    }

    pub fn usage(&self) -> Option<Usage> {
        (self.usage.prompt() + self.usage.output_tokens > 0).then(|| self.usage.usage())
    }

    pub fn feed(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        let mut splitter = std::mem::take(&mut self.splitter);
        splitter.feed(chunk, |event| self.event(event, out));
        self.splitter = splitter;
    }

    pub fn finish(&mut self, out: &mut Vec<u8>) {
        let mut splitter = std::mem::take(&mut self.splitter);
        splitter.finish(|event| self.event(event, out));
        self.splitter = splitter;
    }

    fn chunk(&self, delta: Value, finish: Option<&str>, out: &mut Vec<u8>) {
        self.writer.delta(out, 0, &delta, finish);
    }

    fn event(&mut self, event: &[u8], out: &mut Vec<u8>) {
        let Some(data) = event_data(event) else {
            return;
        };
        let Ok(v) = serde_json::from_slice::<Value>(data) else {
            return;
        };
        match v.get("type").and_then(Value::as_str) {
            Some("message_start") => {
                let m = &v["message"];
                self.id = m["id"].as_str().unwrap_or_default().to_string();
                self.writer = ChunkWriter::new(&self.id, self.created, &self.model);
                if let Ok(u) = serde_json::from_value::<AnthropicUsage>(m["usage"].clone()) {
                    self.usage = u;
                }
                self.chunk(json!({"role": "assistant", "content": ""}), None, out);
            }
            Some("content_block_start") => {
                let index = v["index"].as_u64().unwrap_or(0);
                let block = &v["content_block"];
                if block["type"] == "tool_use" {
                    let name = block["name"].as_str().unwrap_or_default();
                    if name == JSON_TOOL {
                        self.json_mode = true;
                        self.blocks.push((index, None));
                    } else {
                        let call = self.tool_calls;
                        self.tool_calls += 1;
                        self.blocks.push((index, Some(call)));
                        self.chunk(
                            json!({"tool_calls": [{"index": call, "id": block["id"], "type": "function", "function": {"name": name, "arguments": ""}}]}),
                            None,
                            out,
                        );
                    }
                } else if block["type"] == "text" {
                    if let Some(t) = block["text"].as_str().filter(|t| !t.is_empty()) {
                        self.chunk(json!({"content": t}), None, out);
                    }
                }
            }
            Some("content_block_delta") => {
                let index = v["index"].as_u64().unwrap_or(0);
                let d = &v["delta"];
                match d["type"].as_str() {
                    Some("text_delta") => self.chunk(json!({"content": d["text"]}), None, out),
                    Some("thinking_delta") => {
                        self.chunk(json!({"reasoning_content": d["thinking"]}), None, out)
                    }
                    Some("input_json_delta") => {
                        let partial = d["partial_json"].as_str().unwrap_or_default();
                        match self.blocks.iter().find(|(i, _)| *i == index).map(|(_, c)| *c) {
                            Some(Some(call)) => self.chunk(
                                json!({"tool_calls": [{"index": call, "function": {"arguments": partial}}]}),
                                None,
                                out,
                            ),
                            // The JSON-answer tool: its input is the message content.
                            Some(None) if !partial.is_empty() => {
                                self.chunk(json!({"content": partial}), None, out)
                            }
                            _ => {}
                        }
                    }
                    _ => {}
                }
            }
            Some("message_delta") => {
                if let Some(o) = v.pointer("/usage/output_tokens").and_then(Value::as_u64) {
                    self.usage.output_tokens = o;
                }
                let reason = finish_reason(
                    v.pointer("/delta/stop_reason").and_then(Value::as_str),
                    self.json_mode,
                );
                self.chunk(json!({}), Some(reason), out);
            }
            Some("message_stop") => self.end(out),
            Some("error") => {
                let e = &v["error"];
                let err = json!({"error": {
                    "message": format!("litellm.APIError: AnthropicException - {}", e["message"].as_str().unwrap_or("stream error")),
                    "type": e["type"].as_str().unwrap_or("api_error"),
                    "param": null,
                    "code": "500",
                }});
                out.extend_from_slice(format!("data: {err}\n\n").as_bytes());
                self.end(out);
            }
            _ => {}
        }
    }

    fn end(&mut self, out: &mut Vec<u8>) {
        if self.finished {
            return;
        }
        self.finished = true;
        if self.include_usage {
            self.writer.usage(out, &self.usage.openai());
        }
        out.extend_from_slice(b"data: [DONE]\n\n");
    }
}

#[cfg(test)]
mod tests;
