//! Amazon Bedrock: OpenAI chat requests become Converse / ConverseStream bodies (system prompt
//! lifted to `system`, tools to `toolSpec`s, tool results to `toolResult` blocks, sampling
//! parameters to `inferenceConfig`), embeddings go to the Titan or Cohere `invoke` bodies, and
//! responses and `application/vnd.amazon.eventstream` streams come back in OpenAI's shape.
//! Requests are signed with AWS Signature Version 4 ([`sign_request`]); the proxy does the I/O.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use sluice_config::Deployment;

use super::common::{
    bad, now, object_fields, parse_field, plain_u64, read_messages, read_tools, scan_path,
    scan_text_blocks, single_text, string_text, text, utf8, write_json, write_list,
    write_text_completion, CachedUsage, ChunkWriter, InContent, InImageUrl, InMessage, InPart,
    InTool, RawJson, Text, TextChoice,
};
use super::{unsupported_params, CallOptions, Operation, UpstreamRequest};
use crate::body::RequestBody;
use crate::classify::FailureKind;
use crate::error::ApiError;
use crate::usage::Usage;

/// The SigV4 service name of the Bedrock runtime.
pub const SERVICE: &str = "bedrock";
/// The region used when neither the deployment nor the environment names one (LiteLLM's default).
pub const DEFAULT_REGION: &str = "us-west-2";
/// The tool that carries a `response_format` answer.
const JSON_TOOL: &str = "json_tool_call";
/// Titan embedding models take exactly one text per request.
const TITAN_MAX_INPUTS: usize = 1;
/// Cohere embedding models on Bedrock take at most 96 texts per request.
const COHERE_MAX_INPUTS: usize = 96;
/// Largest event-stream message accepted (AWS caps payloads at 16 MiB and headers at 128 KiB).
const MAX_MESSAGE_LEN: usize = 16 * 1024 * 1024 + 128 * 1024 + 16;

/// OpenAI parameters the Converse API has no equivalent for.
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
    "reasoning_effort",
];

/// RFC 3986 unreserved characters stay as they are; everything else is percent-encoded.
const UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');
/// The same, keeping `/` (SigV4 canonical URIs).
const UNRESERVED_AND_SLASH: &AsciiSet = &UNRESERVED.remove(b'/');

/// One Converse content block (externally tagged: `{"text": …}`, `{"toolUse": {…}}`, …).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
enum Block<'a> {
    Text(Text<'a>),
    Image(Image<'a>),
    ToolUse(ToolUse<'a>),
    ToolResult(ToolResult<'a>),
    CachePoint(CachePoint),
}

#[derive(Serialize)]
struct Image<'a> {
    format: &'static str,
    source: ImageSource<'a>,
}

#[derive(Serialize)]
struct ImageSource<'a> {
    bytes: &'a str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ToolUse<'a> {
    tool_use_id: &'a str,
    name: &'a str,
    input: &'a RawValue,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ToolResult<'a> {
    tool_use_id: &'a str,
    content: Vec<Block<'a>>,
}

/// `{"type": "default"}`: the `cachePoint` that follows content the client marked with
/// `cache_control`.
#[derive(Serialize)]
struct CachePoint {
    #[serde(rename = "type")]
    kind: &'static str,
}

const CACHE_POINT: CachePoint = CachePoint { kind: "default" };

#[derive(Serialize)]
struct Turn<'a> {
    role: &'static str,
    content: Vec<Block<'a>>,
}

impl Turn<'_> {
    /// Appends the turn as serde_json writes it (field names as literals, text tokens copied).
    fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"role\":");
        write_json(out, self.role);
        out.extend_from_slice(b",\"content\":");
        write_blocks(out, &self.content);
        out.push(b'}');
    }
}

fn write_blocks(out: &mut Vec<u8>, blocks: &[Block]) {
    write_list(out, blocks, |out, b| b.write(out));
}

impl Block<'_> {
    /// Appends the block as serde_json writes it.
    fn write(&self, out: &mut Vec<u8>) {
        match self {
            Block::Text(text) => {
                out.extend_from_slice(b"{\"text\":");
                text.write(out);
            }
            Block::ToolUse(t) => {
                out.extend_from_slice(b"{\"toolUse\":{\"toolUseId\":");
                write_json(out, t.tool_use_id);
                out.extend_from_slice(b",\"name\":");
                write_json(out, t.name);
                out.extend_from_slice(b",\"input\":");
                out.extend_from_slice(t.input.get().as_bytes());
                out.push(b'}');
            }
            Block::ToolResult(t) => {
                out.extend_from_slice(b"{\"toolResult\":{\"toolUseId\":");
                write_json(out, t.tool_use_id);
                out.extend_from_slice(b",\"content\":");
                write_blocks(out, &t.content);
                out.push(b'}');
            }
            // Rare: serde's own writing.
            Block::Image(_) | Block::CachePoint(_) => return write_json(out, self),
        }
        out.push(b'}');
    }
}

/// OpenAI message content (a string or a list of parts) appended to `out` as Converse content
/// blocks.
fn content_blocks<'a>(
    src: &'a str,
    content: &'a Option<InContent<'a>>,
    out: &mut Vec<Block<'a>>,
) -> Result<(), ApiError> {
    match content {
        None => {}
        Some(InContent::Parts(parts)) => {
            let start = out.len();
            for p in parts {
                part_block(src, p, start, out)?;
            }
        }
        Some(content) => out.extend(
            content
                .as_text(src)
                .filter(|t| !t.is_empty())
                .map(Block::Text),
        ),
    }
    Ok(())
}

/// One content part; `start` is where this message's blocks begin in `out` (a `cachePoint`
/// only follows some content of the same message).
fn part_block<'a>(
    src: &'a str,
    part: &'a InPart<'a>,
    start: usize,
    out: &mut Vec<Block<'a>>,
) -> Result<(), ApiError> {
    match part.kind.as_ref() {
        "text" => {
            let s = part.text.as_deref().unwrap_or("");
            if !s.is_empty() {
                out.push(Block::Text(text(src, s)));
            }
        }
        "image_url" => {
            let url = match &part.image_url {
                Some(InImageUrl::Object { url }) | Some(InImageUrl::Url(url)) => url,
                None => return Err(bad("image_url part without a url")),
            };
            out.push(image_block(url)?);
        }
        other => {
            return Err(bad(format!(
                "Unsupported content part type for Bedrock: {other}"
            )))
        }
    }
    if part.cache_control.is_some() && out.len() > start {
        out.push(Block::CachePoint(CACHE_POINT));
    }
    Ok(())
}

/// A data URL as a Converse `image` block. Bedrock takes image bytes only (or S3 locations), and
/// this translator does no I/O, so remote URLs are refused.
fn image_block(url: &str) -> Result<Block<'_>, ApiError> {
    let rest = url.strip_prefix("data:").ok_or_else(|| {
        bad("Bedrock takes images as base64 data URLs (data:image/png;base64,...); Sluice does not fetch image URLs")
    })?;
    let (meta, data) = rest
        .split_once(',')
        .ok_or_else(|| bad("Malformed data URL in image_url"))?;
    let media_type = meta
        .strip_suffix(";base64")
        .ok_or_else(|| bad("image data URLs must be base64"))?;
    let format = match media_type {
        "image/png" => "png",
        "image/jpeg" | "image/jpg" => "jpeg",
        "image/gif" => "gif",
        "image/webp" => "webp",
        other => {
            return Err(bad(format!(
                "Bedrock supports png, jpeg, gif and webp images, not {other}"
            )))
        }
    };
    Ok(Block::Image(Image {
        format,
        source: ImageSource { bytes: data },
    }))
}

/// The content of the turn that blocks of `role` go into: the last turn when it has that role
/// (Converse wants user and assistant turns to alternate), else a new one. A turn left empty is
/// dropped by [`convert_messages`].
fn turn<'a, 'm>(messages: &'m mut Vec<Turn<'a>>, role: &'static str) -> &'m mut Vec<Block<'a>> {
    if messages.last().is_none_or(|t| t.role != role) {
        messages.push(Turn {
            role,
            content: Vec::new(),
        });
    }
    &mut messages.last_mut().expect("just pushed").content
}

/// `{}`, the input of a tool call sent without arguments.
fn empty_object() -> &'static RawValue {
    serde_json::from_str("{}").expect("valid JSON")
}

type Converted<'a> = (Vec<Block<'a>>, Vec<Turn<'a>>);

/// `raw` are the messages parsed from `src`.
fn convert_messages<'a>(src: &'a str, raw: &'a [InMessage<'a>]) -> Result<Converted<'a>, ApiError> {
    let mut system = vec![];
    let mut messages: Vec<Turn> = Vec::with_capacity(raw.len());
    for m in raw {
        match m.role.as_ref() {
            "system" | "developer" => {
                let start = system.len();
                content_blocks(src, &m.content, &mut system)?;
                if system[start..].iter().any(|b| matches!(b, Block::Image(_))) {
                    return Err(bad("System messages cannot hold images").with_param("messages"));
                }
            }
            "user" => content_blocks(src, &m.content, turn(&mut messages, "user"))?,
            "assistant" => {
                let blocks = turn(&mut messages, "assistant");
                if let Some(r) = m.reasoning_content.as_deref().filter(|r| !r.is_empty()) {
                    // Without the signature Bedrock issued, a reasoning block cannot be sent
                    // back; keep it as text so the context is not lost.
                    blocks.push(Block::Text(text(src, r)));
                }
                content_blocks(src, &m.content, blocks)?;
                for call in m.tool_calls.iter().flatten() {
                    let args = call.function.arguments.trim();
                    let input = if args.is_empty() {
                        empty_object()
                    } else {
                        serde_json::from_str(args).map_err(|e| {
                            bad(format!(
                                "tool_calls arguments of {} are not JSON: {e}",
                                call.id
                            ))
                        })?
                    };
                    blocks.push(Block::ToolUse(ToolUse {
                        tool_use_id: &call.id,
                        name: &call.function.name,
                        input,
                    }));
                }
            }
            "tool" | "function" => {
                let id = m.tool_call_id.as_deref().ok_or_else(|| {
                    bad("A tool message needs tool_call_id").with_param("messages")
                })?;
                let content = match m.content.as_ref().and_then(|c| c.as_text(src)) {
                    Some(text) => vec![Block::Text(text)],
                    None => {
                        let mut content = vec![];
                        content_blocks(src, &m.content, &mut content)?;
                        content.retain(|b| !matches!(b, Block::CachePoint(_)));
                        content
                    }
                };
                turn(&mut messages, "user").push(Block::ToolResult(ToolResult {
                    tool_use_id: id,
                    content,
                }));
            }
            other => {
                return Err(bad(format!("Invalid message role: {other}")).with_param("messages"))
            }
        }
        if messages.last().is_some_and(|t| t.content.is_empty()) {
            messages.pop();
        }
    }
    Ok((system, messages))
}

/// An entry of `toolConfig.tools`.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
enum ToolEntry<'a> {
    ToolSpec(ToolSpec<'a>),
    CachePoint(CachePoint),
}

/// A Converse tool. Schemas and descriptions are copied through as raw JSON.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ToolSpec<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<RawJson<'a>>,
    input_schema: InputSchema<'a>,
}

impl ToolEntry<'_> {
    /// Appends the entry as serde_json writes it.
    fn write(&self, out: &mut Vec<u8>) {
        match self {
            ToolEntry::ToolSpec(spec) => {
                out.extend_from_slice(b"{\"toolSpec\":{\"name\":");
                write_json(out, spec.name);
                if let Some(description) = &spec.description {
                    out.extend_from_slice(b",\"description\":");
                    description.write(out);
                }
                out.extend_from_slice(b",\"inputSchema\":{\"json\":");
                match &spec.input_schema.json {
                    Schema::Raw(raw) => raw.write(out),
                    Schema::Built(value) => write_json(out, value),
                }
                out.extend_from_slice(b"}}}");
            }
            ToolEntry::CachePoint(point) => {
                out.extend_from_slice(b"{\"cachePoint\":");
                write_json(out, point);
                out.push(b'}');
            }
        }
    }
}

#[derive(Serialize)]
struct InputSchema<'a> {
    json: Schema<'a>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum Schema<'a> {
    Raw(RawJson<'a>),
    Built(Value),
}

fn convert_tools<'a>(tools: &'a [InTool<'a>]) -> Result<Vec<ToolEntry<'a>>, ApiError> {
    let mut out = Vec::with_capacity(tools.len() + 1);
    for t in tools {
        let f = t
            .function
            .as_ref()
            .ok_or_else(|| bad("Only function tools are supported").with_param("tools"))?;
        let name = f
            .name
            .as_deref()
            .ok_or_else(|| bad("A tool has no name").with_param("tools"))?;
        out.push(ToolEntry::ToolSpec(ToolSpec {
            name,
            description: f.description,
            input_schema: InputSchema {
                json: match f.parameters {
                    Some(p) => Schema::Raw(p),
                    None => Schema::Built(json!({"type": "object", "properties": {}})),
                },
            },
        }));
        if t.cache_control.is_some() {
            out.push(ToolEntry::CachePoint(CACHE_POINT));
        }
    }
    Ok(out)
}

/// A Converse `toolChoice`.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
enum ToolChoice {
    Auto(Empty),
    Any(Empty),
    Tool(Named),
}

#[derive(Serialize)]
struct Empty {}

#[derive(Serialize)]
struct Named {
    name: String,
}

/// OpenAI `tool_choice` as a Converse `toolChoice` (`None` for "none", which Converse cannot
/// express: the tools stay declared, since earlier turns may use them).
fn convert_tool_choice(choice: Value) -> Result<Option<ToolChoice>, ApiError> {
    Ok(match choice {
        Value::String(s) if s == "auto" => Some(ToolChoice::Auto(Empty {})),
        Value::String(s) if s == "required" || s == "any" => Some(ToolChoice::Any(Empty {})),
        Value::String(s) if s == "none" => None,
        Value::Object(_) => match choice.pointer("/function/name").and_then(Value::as_str) {
            Some(name) => Some(ToolChoice::Tool(Named {
                name: name.to_string(),
            })),
            None => return Err(bad("tool_choice names no function").with_param("tool_choice")),
        },
        Value::Null => None,
        other => return Err(bad(format!("Invalid tool_choice: {other}")).with_param("tool_choice")),
    })
}

/// The Converse / ConverseStream request body.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ConverseRequest<'a> {
    messages: Vec<Turn<'a>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    system: Vec<Block<'a>>,
    #[serde(skip_serializing_if = "InferenceConfig::is_empty")]
    inference_config: InferenceConfig<'a>,
    #[serde(skip_serializing_if = "Additional::is_empty")]
    additional_model_request_fields: Additional<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_config: Option<ToolConfig<'a>>,
}

impl ConverseRequest<'_> {
    /// Appends the body exactly as serde_json serializes it (checked in debug builds), with
    /// the messages and system blocks, most of the bytes, written directly.
    fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"messages\":[");
        for (i, t) in self.messages.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            t.write(out);
        }
        out.push(b']');
        if !self.system.is_empty() {
            out.extend_from_slice(b",\"system\":");
            write_blocks(out, &self.system);
        }
        if !self.inference_config.is_empty() {
            out.extend_from_slice(b",\"inferenceConfig\":");
            write_json(out, &self.inference_config);
        }
        if !self.additional_model_request_fields.is_empty() {
            out.extend_from_slice(b",\"additionalModelRequestFields\":");
            write_json(out, &self.additional_model_request_fields);
        }
        if let Some(config) = &self.tool_config {
            out.extend_from_slice(b",\"toolConfig\":{\"tools\":");
            write_list(out, &config.tools, |out, entry| entry.write(out));
            if let Some(choice) = &config.tool_choice {
                out.extend_from_slice(b",\"toolChoice\":");
                write_json(out, choice);
            }
            out.push(b'}');
        }
        out.push(b'}');
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct InferenceConfig<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stop_sequences: Option<Vec<String>>,
}

impl InferenceConfig<'_> {
    fn is_empty(&self) -> bool {
        self.max_tokens.is_none()
            && self.temperature.is_none()
            && self.top_p.is_none()
            && self.stop_sequences.is_none()
    }
}

/// `additionalModelRequestFields`: what the model family reads beyond the Converse fields.
#[derive(Serialize)]
struct Additional<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    top_k: Option<&'a RawValue>,
    /// Nova reads `top_k` as `inferenceConfig.topK`.
    #[serde(rename = "inferenceConfig", skip_serializing_if = "Option::is_none")]
    nova: Option<NovaInference<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    thinking: Option<&'a RawValue>,
}

impl Additional<'_> {
    fn is_empty(&self) -> bool {
        self.top_k.is_none() && self.nova.is_none() && self.thinking.is_none()
    }
}

#[derive(Serialize)]
struct NovaInference<'a> {
    #[serde(rename = "topK")]
    top_k: &'a RawValue,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ToolConfig<'a> {
    tools: Vec<ToolEntry<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_choice: Option<ToolChoice>,
}

/// A body field as raw JSON; absent or `null` is `None`.
fn raw_param<'b>(body: &'b RequestBody<'_>, key: &str) -> Result<Option<&'b RawValue>, ApiError> {
    match body.raw(key).filter(|r| *r != "null") {
        None => Ok(None),
        Some(raw) => serde_json::from_str(raw)
            .map(Some)
            .map_err(|e| bad(format!("Invalid request body: `{key}`: {e}")).with_param(key)),
    }
}

/// The model id as sent: LiteLLM's `converse/` and `invoke/` route prefixes are dropped (every
/// chat model is called through Converse here).
fn model_id(upstream_model: &str) -> &str {
    upstream_model
        .strip_prefix("converse/")
        .or_else(|| upstream_model.strip_prefix("invoke/"))
        .unwrap_or(upstream_model)
}

/// `/model/{modelId}/{action}` with the id percent-encoded as the AWS SDKs do (`:` → `%3A`, and
/// `/` in ARNs → `%2F`).
pub fn model_path(model: &str, action: &str) -> String {
    format!(
        "/model/{}/{action}",
        utf8_percent_encode(model_id(model), UNRESERVED)
    )
}

fn headers_for(d: &Deployment) -> Vec<(String, String)> {
    let mut headers = vec![("content-type".to_string(), "application/json".to_string())];
    if let Some(key) = &d.api_key {
        // A Bedrock API key: bearer auth instead of SigV4.
        headers.push(("authorization".to_string(), format!("Bearer {key}")));
    }
    headers.extend(d.extra_headers.iter().cloned());
    headers
}

pub(super) fn build_request(
    op: Operation,
    body: &mut RequestBody<'_>,
    d: &Deployment,
    upstream_model: &str,
    stream: bool,
    opts: &CallOptions,
) -> Result<UpstreamRequest, ApiError> {
    for (k, v) in &d.default_params {
        body.set_default(k, v.to_string());
    }
    match op {
        Operation::ChatCompletions => build_chat(body, d, upstream_model, stream, opts),
        Operation::Embeddings => build_embeddings(body, d, upstream_model, opts),
        Operation::Completions => Err(ApiError::new(
            400,
            "bad_request_error",
            format!(
                "bedrock does not support {} (only chat completions and embeddings)",
                op.openai_path()
            ),
        )),
    }
}

fn build_chat(
    body: &RequestBody<'_>,
    d: &Deployment,
    upstream_model: &str,
    stream: bool,
    opts: &CallOptions,
) -> Result<UpstreamRequest, ApiError> {
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
        return Err(unsupported_params("bedrock", upstream_model, &unsupported));
    }

    let raw_messages = body
        .raw("messages")
        .filter(|r| *r != "null")
        .unwrap_or("[]");
    let messages = read_messages(raw_messages)?;
    let (system, messages) = convert_messages(raw_messages, &messages)?;

    let max_tokens: Option<u64> = parse_field(body, "max_completion_tokens")?;
    let stop_sequences = match parse_field::<Value>(body, "stop")? {
        None => None,
        Some(Value::String(s)) => Some(vec![s]),
        Some(Value::Array(a)) => Some(
            a.into_iter()
                .filter_map(|v| match v {
                    Value::String(s) => Some(s),
                    _ => None,
                })
                .collect(),
        ),
        Some(other) => return Err(bad(format!("Invalid stop: {other}")).with_param("stop")),
    };
    let inference_config = InferenceConfig {
        max_tokens: max_tokens.or(parse_field(body, "max_tokens")?),
        temperature: raw_param(body, "temperature")?,
        top_p: raw_param(body, "top_p")?,
        stop_sequences,
    };

    let top_k = raw_param(body, "top_k")?;
    let nova = model_id(upstream_model).contains("amazon.nova");
    let additional = Additional {
        top_k: top_k.filter(|_| !nova),
        nova: top_k.filter(|_| nova).map(|top_k| NovaInference { top_k }),
        thinking: raw_param(body, "thinking")?,
    };

    let tools_len = body.raw("tools").map_or(0, str::len);
    let in_tools = read_tools(body.raw("tools"))?;
    let mut tools = convert_tools(&in_tools)?;
    let mut tool_choice = match parse_field::<Value>(body, "tool_choice")? {
        Some(c) => convert_tool_choice(c)?,
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
            tools.push(ToolEntry::ToolSpec(ToolSpec {
                name: JSON_TOOL,
                description: Some(
                    serde_json::from_str("\"Respond with a JSON object.\"").expect("valid JSON"),
                ),
                input_schema: InputSchema {
                    json: Schema::Built(schema),
                },
            }));
            tool_choice = Some(ToolChoice::Tool(Named {
                name: JSON_TOOL.to_string(),
            }));
        }
    }
    let out = ConverseRequest {
        messages,
        system,
        inference_config,
        additional_model_request_fields: additional,
        tool_config: (!tools.is_empty()).then_some(ToolConfig { tools, tool_choice }),
    };

    let action = if stream {
        "converse-stream"
    } else {
        "converse"
    };
    Ok(UpstreamRequest {
        path: model_path(upstream_model, action),
        headers: headers_for(d),
        body: {
            // Sized once: the output is about as long as the client's messages and tools.
            let mut bytes = Vec::with_capacity(raw_messages.len() + tools_len + 256);
            out.write(&mut bytes);
            debug_assert_eq!(
                String::from_utf8_lossy(&bytes),
                serde_json::to_string(&out).expect("json serializes"),
                "the hand-written body is serde_json's"
            );
            bytes
        },
        injected_stream_usage: false,
    })
}

/// The embedding model families Bedrock serves through `invoke`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EmbedFamily {
    TitanText,
    TitanTextV2,
    TitanImage,
    Cohere,
}

fn embed_family(model: &str) -> Option<EmbedFamily> {
    if model.contains("amazon.titan-embed-text-v2") {
        Some(EmbedFamily::TitanTextV2)
    } else if model.contains("amazon.titan-embed-image") {
        Some(EmbedFamily::TitanImage)
    } else if model.contains("amazon.titan-embed") {
        Some(EmbedFamily::TitanText)
    } else if model.contains("cohere.embed") {
        Some(EmbedFamily::Cohere)
    } else {
        None
    }
}

/// The embeddings `input`: a string or a list of strings, borrowed where unescaped.
fn embed_texts<'b>(body: &'b RequestBody<'_>) -> Result<Vec<Cow<'b, str>>, ApiError> {
    let invalid = || bad("`input` must be a string or a list of strings").with_param("input");
    #[derive(Deserialize)]
    struct Text<'a>(#[serde(borrow)] Cow<'a, str>);
    let text = |raw: &'b str| -> Result<Cow<'b, str>, ApiError> {
        serde_json::from_str(raw)
            .map(|Text(t)| t)
            .map_err(|e| bad(format!("Invalid request body: `input`: {e}")).with_param("input"))
    };
    let raw = body.raw("input").map(str::trim_start).ok_or_else(invalid)?;
    match raw.as_bytes().first() {
        Some(b'"') => Ok(vec![text(raw)?]),
        Some(b'[') => {
            let items: Vec<&RawValue> = serde_json::from_str(raw).map_err(|_| invalid())?;
            items
                .into_iter()
                .map(|item| match item.get().as_bytes().first() {
                    Some(b'"') => text(item.get()),
                    _ => Err(bad("bedrock embeddings take text input, not token arrays")
                        .with_param("input")),
                })
                .collect()
        }
        _ => Err(invalid()),
    }
}

/// The Titan `invoke` body.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct TitanEmbed<'a> {
    input_text: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    dimensions: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    embedding_config: Option<EmbeddingConfig>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct EmbeddingConfig {
    output_embedding_length: u64,
}

/// The Cohere `invoke` body.
#[derive(Serialize)]
struct CohereEmbed<'a> {
    texts: &'a [Cow<'a, str>],
    input_type: Cow<'a, str>,
}

fn build_embeddings(
    body: &RequestBody<'_>,
    d: &Deployment,
    upstream_model: &str,
    opts: &CallOptions,
) -> Result<UpstreamRequest, ApiError> {
    let model = model_id(upstream_model);
    let family = embed_family(model).ok_or_else(|| {
        bad(format!(
            "bedrock embeddings support amazon.titan-embed-* and cohere.embed-* models, not {model}"
        ))
        .with_param("model")
    })?;
    let texts = embed_texts(body)?;
    if texts.is_empty() {
        return Err(bad("`input` is empty").with_param("input"));
    }
    let dimensions: Option<u64> = parse_field(body, "dimensions")?;
    let capacity = texts.iter().map(|t| t.len() + 4).sum::<usize>() + 64;
    let mut out = Vec::with_capacity(capacity);

    match family {
        EmbedFamily::TitanText | EmbedFamily::TitanTextV2 | EmbedFamily::TitanImage => {
            if texts.len() > TITAN_MAX_INPUTS {
                return Err(bad(format!(
                    "{model} embeds one input per request (the limit is {TITAN_MAX_INPUTS}); got {} inputs. Send them in separate requests.",
                    texts.len()
                ))
                .with_param("input"));
            }
            let mut titan = TitanEmbed {
                input_text: &texts[0],
                dimensions: None,
                embedding_config: None,
            };
            match (family, dimensions) {
                (_, None) => {}
                (EmbedFamily::TitanTextV2, Some(dim)) => titan.dimensions = Some(dim),
                (EmbedFamily::TitanImage, Some(dim)) => {
                    titan.embedding_config = Some(EmbeddingConfig {
                        output_embedding_length: dim,
                    })
                }
                (_, Some(_)) if opts.drop_params => {}
                (_, Some(_)) => {
                    return Err(unsupported_params(
                        "bedrock",
                        upstream_model,
                        &["dimensions"],
                    ))
                }
            }
            serde_json::to_writer(&mut out, &titan).expect("json serializes");
        }
        EmbedFamily::Cohere => {
            if texts.len() > COHERE_MAX_INPUTS {
                return Err(bad(format!(
                    "{model} embeds at most {COHERE_MAX_INPUTS} inputs per request; got {}",
                    texts.len()
                ))
                .with_param("input"));
            }
            if dimensions.is_some() && !opts.drop_params {
                return Err(unsupported_params(
                    "bedrock",
                    upstream_model,
                    &["dimensions"],
                ));
            }
            let input_type = parse_field::<String>(body, "input_type")?
                .map_or(Cow::Borrowed("search_document"), Cow::Owned);
            let cohere = CohereEmbed {
                texts: &texts,
                input_type,
            };
            serde_json::to_writer(&mut out, &cohere).expect("json serializes");
        }
    }
    Ok(UpstreamRequest {
        path: model_path(upstream_model, "invoke"),
        headers: headers_for(d),
        body: out,
        injected_stream_usage: false,
    })
}

fn finish_reason(stop_reason: Option<&str>, json_mode: bool) -> &'static str {
    match stop_reason {
        Some("max_tokens") | Some("model_context_window_exceeded") => "length",
        Some("tool_use") if !json_mode => "tool_calls",
        Some("guardrail_intervened") | Some("content_filtered") => "content_filter",
        _ => "stop",
    }
}

#[derive(Deserialize, Default, Clone, Copy)]
#[serde(rename_all = "camelCase")]
struct BedrockUsage {
    #[serde(default)]
    input_tokens: u64,
    #[serde(default)]
    output_tokens: u64,
    #[serde(default)]
    cache_read_input_tokens: u64,
    #[serde(default)]
    cache_write_input_tokens: u64,
}

impl BedrockUsage {
    fn cached(&self) -> CachedUsage {
        CachedUsage {
            input: self.input_tokens,
            output: self.output_tokens,
            cache_read: self.cache_read_input_tokens,
            cache_write: self.cache_write_input_tokens,
        }
    }

    fn openai(&self) -> Value {
        self.cached().openai()
    }

    fn usage(&self) -> Usage {
        self.cached().usage()
    }
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// Converse responses carry no id; make one in OpenAI's style.
fn completion_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let digest = Sha256::digest(format!("{nanos}:{n}:{}", std::process::id()).as_bytes());
    format!("chatcmpl-{}", hex(&digest[..12]))
}

fn malformed(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(
        502,
        "internal_server_error",
        format!("litellm.APIError: BedrockException - malformed response: {e}"),
    )
}

/// A whole Converse (chat) or `invoke` (embeddings) response in OpenAI's shape. `model` is the
/// name the client asked for.
pub(super) fn translate_response(
    op: Operation,
    body: &[u8],
    model: &str,
) -> Result<(Vec<u8>, Option<Usage>), ApiError> {
    match op {
        Operation::Embeddings => translate_embeddings(body, model),
        _ => translate_chat(body, model),
    }
}

fn translate_chat(body: &[u8], model: &str) -> Result<(Vec<u8>, Option<Usage>), ApiError> {
    if let Some(translated) = text_chat(body, model) {
        return Ok(translated);
    }
    value_chat(body, model)
}

/// A Converse response of text blocks only, with plain token counts, read with the body's
/// scanner and written directly, the answer's token copied through. `None` leaves the response
/// to [`value_chat`]: tool use, reasoning, several blocks, anything unusual.
fn text_chat(body: &[u8], model: &str) -> Option<(Vec<u8>, Option<Usage>)> {
    let src = utf8(body)?;
    let (mut output, mut stop_reason, mut usage) = (None, None, None);
    object_fields(src, |key, value, escaped| match key {
        "output" => {
            output = Some(value);
            Some(1)
        }
        "stopReason" if value == "null" => Some(2),
        "stopReason" if !escaped && value.starts_with('"') => {
            stop_reason = Some(&value[1..value.len() - 1]);
            Some(2)
        }
        "stopReason" => None,
        "usage" => {
            usage = Some(value);
            Some(4)
        }
        _ => Some(0),
    })?;
    let (content, _) = scan_path(output?, &["message", "content"])?;
    let text = single_text(scan_text_blocks(content, false)?)?;
    let mut u = BedrockUsage::default();
    if let Some(usage) = usage {
        object_fields(usage, |key, value, _| {
            let (slot, bit) = match key {
                "inputTokens" => (&mut u.input_tokens, 1),
                "outputTokens" => (&mut u.output_tokens, 2),
                "cacheReadInputTokens" => (&mut u.cache_read_input_tokens, 4),
                "cacheWriteInputTokens" => (&mut u.cache_write_input_tokens, 8),
                _ => return Some(0),
            };
            *slot = plain_u64(value)?;
            Some(bit)
        })?;
    }
    let choice = TextChoice {
        index: 0,
        content: text,
        finish_reason: finish_reason(stop_reason, false),
    };
    let id = Text::Str(Cow::Owned(completion_id()));
    let mut out = Vec::with_capacity(body.len() + 256);
    write_text_completion(&mut out, &id, model, &[choice], &u.openai());
    Some((out, Some(u.usage())))
}

/// [`translate_chat`] for any response, its blocks read into `serde_json::Value`s.
fn value_chat(body: &[u8], model: &str) -> Result<(Vec<u8>, Option<Usage>), ApiError> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Response {
        output: Output,
        #[serde(default)]
        stop_reason: Option<String>,
        #[serde(default)]
        usage: BedrockUsage,
    }
    #[derive(Deserialize)]
    struct Output {
        message: Message,
    }
    #[derive(Deserialize)]
    struct Message {
        #[serde(default)]
        content: Vec<Value>,
    }
    let r: Response = serde_json::from_slice(body).map_err(malformed)?;
    let mut text = String::new();
    let mut reasoning = String::new();
    let mut tool_calls = vec![];
    let mut json_mode = false;
    for block in &r.output.message.content {
        if let Some(t) = block.get("text").and_then(Value::as_str) {
            text.push_str(t);
        } else if let Some(t) = block
            .pointer("/reasoningContent/reasoningText/text")
            .and_then(Value::as_str)
        {
            reasoning.push_str(t);
        } else if let Some(call) = block.get("toolUse") {
            let name = call.get("name").and_then(Value::as_str).unwrap_or("");
            let input = call.get("input").cloned().unwrap_or_else(|| json!({}));
            if name == JSON_TOOL {
                json_mode = true;
                text.push_str(&input.to_string());
            } else {
                tool_calls.push(json!({
                    "id": call.get("toolUseId").cloned().unwrap_or(Value::Null),
                    "type": "function",
                    "function": {"name": name, "arguments": input.to_string()},
                }));
            }
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
        "id": completion_id(),
        "object": "chat.completion",
        "created": now(),
        "model": model,
        "choices": [{
            "index": 0,
            "message": message,
            "finish_reason": finish_reason(r.stop_reason.as_deref(), json_mode),
        }],
        "usage": r.usage.openai(),
    });
    Ok((
        serde_json::to_vec(&out).expect("json serializes"),
        Some(r.usage.usage()),
    ))
}

fn translate_embeddings(body: &[u8], model: &str) -> Result<(Vec<u8>, Option<Usage>), ApiError> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Response {
        /// Titan.
        #[serde(default)]
        embedding: Option<Vec<f64>>,
        #[serde(default)]
        input_text_token_count: Option<u64>,
        /// Cohere: a list, or `{"float": [...]}` when embedding types were asked for.
        #[serde(default)]
        embeddings: Option<Value>,
    }
    let r: Response = serde_json::from_slice(body).map_err(malformed)?;
    let (vectors, tokens): (Vec<Value>, Option<u64>) = match (r.embedding, r.embeddings) {
        (Some(e), _) => (vec![json!(e)], r.input_text_token_count),
        (None, Some(Value::Array(list))) => (list, None),
        (None, Some(Value::Object(mut by_type))) => match by_type.remove("float") {
            Some(Value::Array(list)) => (list, None),
            _ => return Err(malformed("no float embeddings")),
        },
        _ => return Err(malformed("no embedding in the response")),
    };
    let data: Vec<Value> = vectors
        .into_iter()
        .enumerate()
        .map(|(i, v)| json!({"object": "embedding", "index": i, "embedding": v}))
        .collect();
    let tokens_or_zero = tokens.unwrap_or(0);
    let out = json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens_or_zero, "total_tokens": tokens_or_zero},
    });
    let usage = tokens.map(|t| Usage {
        prompt_tokens: t,
        completion_tokens: 0,
        total_tokens: t,
    });
    Ok((serde_json::to_vec(&out).expect("json serializes"), usage))
}

fn contains_ci(hay: &[u8], needle: &str) -> bool {
    let needle = needle.as_bytes();
    hay.len() >= needle.len()
        && hay
            .windows(needle.len())
            .any(|w| w.eq_ignore_ascii_case(needle))
}

/// What a Bedrock error response means for routing. Bedrock names the exception in the
/// `x-amzn-errortype` header and often only a message in the body, so the message text counts.
pub(super) fn classify_error(status: u16, body: &[u8]) -> FailureKind {
    let head = &body[..body.len().min(16 * 1024)];
    const THROTTLED: &[&str] = &[
        "throttlingexception",
        "servicequotaexceeded",
        "too many requests",
    ];
    const CONTEXT: &[&str] = &[
        "input is too long",
        "too many input tokens",
        "prompt is too long",
        "context window",
        "input length exceeds",
    ];
    if THROTTLED.iter().any(|n| contains_ci(head, n)) {
        return FailureKind::RateLimit;
    }
    if (400..500).contains(&status) && status != 429 {
        let validation = status == 400 || contains_ci(head, "validationexception");
        let token_limit = contains_ci(head, "token")
            && ["limit", "maximum", "exceed"]
                .iter()
                .any(|n| contains_ci(head, n))
            // "maxTokens exceeds the model's limit" is a bad request, not a long prompt.
            && !["max_tokens", "maxtokens", "maximum tokens you requested"]
                .iter()
                .any(|n| contains_ci(head, n));
        if CONTEXT.iter().any(|n| contains_ci(head, n)) || (validation && token_limit) {
            return FailureKind::ContextWindowExceeded;
        }
    }
    if status == 424 {
        // ModelErrorException: the model failed while answering.
        return FailureKind::Server;
    }
    crate::classify::classify_status(status, body)
}

// ---------------------------------------------------------------------------------------------
// AWS Signature Version 4

/// AWS credentials for SigV4.
#[derive(Clone, PartialEq, Eq)]
pub struct AwsCredentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
}

impl std::fmt::Debug for AwsCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwsCredentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field(
                "session_token",
                &self.session_token.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// The credentials and region of a deployment. Keys: `aws_access_key_id`,
/// `aws_secret_access_key` and optionally `aws_session_token` from `litellm_params`, else
/// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and `AWS_SESSION_TOKEN` from the environment. Region:
/// `aws_region_name`, else the region of an ARN model id, else `AWS_REGION_NAME`, `AWS_REGION`,
/// `AWS_DEFAULT_REGION`, else [`DEFAULT_REGION`]. `None` when no access key pair is configured
/// (or only half of one in `litellm_params`).
pub fn credentials_from(d: &Deployment) -> Option<(AwsCredentials, String)> {
    credentials_with(d, |name| std::env::var(name).ok())
}

fn credentials_with(
    d: &Deployment,
    env: impl Fn(&str) -> Option<String>,
) -> Option<(AwsCredentials, String)> {
    let param = |key: &str| {
        d.provider_params
            .get(key)
            .and_then(Value::as_str)
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    };
    let env = |key: &str| env(key).filter(|s| !s.trim().is_empty());
    let creds = match (param("aws_access_key_id"), param("aws_secret_access_key")) {
        (Some(id), Some(secret)) => AwsCredentials {
            access_key_id: id,
            secret_access_key: secret,
            session_token: param("aws_session_token"),
        },
        (None, None) => AwsCredentials {
            access_key_id: env("AWS_ACCESS_KEY_ID")?,
            secret_access_key: env("AWS_SECRET_ACCESS_KEY")?,
            session_token: param("aws_session_token").or_else(|| env("AWS_SESSION_TOKEN")),
        },
        // Half a pair in the config is a mistake; do not mix it with the environment's.
        _ => return None,
    };
    let region = param("aws_region_name")
        .or_else(|| param("region_name"))
        .or_else(|| region_from_arn(model_id(&d.upstream_model)))
        .or_else(|| env("AWS_REGION_NAME"))
        .or_else(|| env("AWS_REGION"))
        .or_else(|| env("AWS_DEFAULT_REGION"))
        .unwrap_or_else(|| DEFAULT_REGION.to_string());
    Some((creds, region))
}

/// The region field of an ARN model id (`arn:aws:bedrock:us-east-1:...`).
fn region_from_arn(model: &str) -> Option<String> {
    let mut parts = model.strip_prefix("arn:")?.split(':');
    let region = parts.nth(2)?;
    (!region.is_empty()).then(|| region.to_string())
}

/// The base URL to send a deployment's requests to: its `api_base`, else
/// `aws_bedrock_runtime_endpoint`, else `https://bedrock-runtime.{region}.amazonaws.com`.
pub fn api_base(d: &Deployment, region: &str) -> String {
    d.api_base
        .clone()
        .or_else(|| {
            d.provider_params
                .get("aws_bedrock_runtime_endpoint")
                .and_then(Value::as_str)
                .map(|s| s.trim_end_matches('/').to_string())
        })
        .unwrap_or_else(|| format!("https://bedrock-runtime.{region}.amazonaws.com"))
}

type HmacSha256 = Hmac<Sha256>;

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// The SigV4 signing key for a secret, date (`YYYYMMDD`), region and service: four HMACs,
/// the same for every request of a day, so each thread keeps the last one it derived.
fn signing_key(secret: &str, date: &str, region: &str, service: &str) -> [u8; 32] {
    /// (secret, date, region, service) and their key.
    type Derived = (String, String, String, String, [u8; 32]);
    thread_local! {
        static LAST: std::cell::RefCell<Option<Derived>> = const { std::cell::RefCell::new(None) };
    }
    LAST.with_borrow_mut(|last| {
        if let Some((s, d, r, v, key)) = last.as_ref() {
            if (s.as_str(), d.as_str(), r.as_str(), v.as_str()) == (secret, date, region, service) {
                return *key;
            }
        }
        let k_date = hmac(["AWS4", secret].concat().as_bytes(), date.as_bytes());
        let k_region = hmac(&k_date, region.as_bytes());
        let k_service = hmac(&k_region, service.as_bytes());
        let key = hmac(&k_service, b"aws4_request");
        *last = Some((
            secret.into(),
            date.into(),
            region.into(),
            service.into(),
            key,
        ));
        key
    })
}

/// `YYYYMMDDTHHMMSSZ` in UTC.
fn amz_date(now: SystemTime) -> String {
    let secs = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// RFC 3986 dot-segment removal, also dropping empty segments (AWS's path normalization for
/// every service but S3).
fn normalize_path(path: &str) -> String {
    if path.is_empty() {
        return "/".to_string();
    }
    let mut out: Vec<&str> = vec![];
    for seg in path.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    let mut s = String::with_capacity(path.len());
    s.push('/');
    s.push_str(&out.join("/"));
    if path.ends_with('/') && !out.is_empty() {
        s.push('/');
    }
    s
}

fn canonical_query(query: &str) -> String {
    let enc = |s: &str| {
        let raw: Vec<u8> = percent_decode_str(s).collect();
        percent_encoding::percent_encode(&raw, UNRESERVED).to_string()
    };
    let mut pairs: Vec<(String, String)> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (enc(k), enc(v))
        })
        .collect();
    pairs.sort();
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

/// Headers that a proxy may change after signing, so they are never signed.
const UNSIGNED_HEADERS: &[&str] = &[
    "user-agent",
    "expect",
    "x-amzn-trace-id",
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "upgrade",
    "proxy-authorization",
];
/// Headers the signer sets itself.
const SIGNER_HEADERS: &[&str] = &[
    "host",
    "authorization",
    "x-amz-date",
    "x-amz-content-sha256",
    "x-amz-security-token",
];

/// One request to sign.
struct Signable<'a> {
    method: &'a str,
    host: &'a str,
    path_and_query: &'a str,
    headers: &'a [(String, String)],
    body: &'a [u8],
}

/// SigV4 for non-S3 services. `sign_body`: also send and sign `x-amz-content-sha256`.
fn sign_v4(
    req: &Signable<'_>,
    creds: &AwsCredentials,
    region: &str,
    service: &str,
    amz_date: &str,
    sign_body: bool,
) -> Vec<(String, String)> {
    let payload_hash = hex(&Sha256::digest(req.body));
    let mut added = vec![("x-amz-date".to_string(), amz_date.to_string())];
    if sign_body {
        added.push(("x-amz-content-sha256".to_string(), payload_hash.clone()));
    }
    if let Some(token) = &creds.session_token {
        added.push(("x-amz-security-token".to_string(), token.clone()));
    }

    let mut canonical: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut add = |name: &str, value: &str| {
        canonical
            .entry(name.to_ascii_lowercase())
            .or_default()
            .push(value.split_whitespace().collect::<Vec<_>>().join(" "));
    };
    add("host", req.host);
    for (name, value) in req.headers {
        let lower = name.to_ascii_lowercase();
        if !UNSIGNED_HEADERS.contains(&lower.as_str()) && !SIGNER_HEADERS.contains(&lower.as_str())
        {
            add(&lower, value);
        }
    }
    for (name, value) in &added {
        add(name, value);
    }
    let signed_headers = canonical.keys().cloned().collect::<Vec<_>>().join(";");
    let mut canonical_headers = String::new();
    for (name, values) in &canonical {
        canonical_headers.push_str(name);
        canonical_headers.push(':');
        canonical_headers.push_str(&values.join(","));
        canonical_headers.push('\n');
    }

    let (path, query) = req
        .path_and_query
        .split_once('?')
        .unwrap_or((req.path_and_query, ""));
    // The path as sent is already encoded once; non-S3 services encode it again here.
    let canonical_uri =
        utf8_percent_encode(&normalize_path(path), UNRESERVED_AND_SLASH).to_string();
    // The canonical request is hashed as it is written, never held as one string.
    let mut canonical_request = Sha256::new();
    for part in [
        req.method.to_ascii_uppercase().as_str(),
        "\n",
        &canonical_uri,
        "\n",
        &canonical_query(query),
        "\n",
        &canonical_headers,
        "\n",
        &signed_headers,
        "\n",
        &payload_hash,
    ] {
        canonical_request.update(part.as_bytes());
    }

    let date = &amz_date[..8];
    let scope = format!("{date}/{region}/{service}/aws4_request");
    let string_to_sign = format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
        hex(&canonical_request.finalize())
    );
    let k_signing = signing_key(&creds.secret_access_key, date, region, service);
    let signature = hex(&hmac(&k_signing, string_to_sign.as_bytes()));

    added.push((
        "authorization".to_string(),
        format!(
            "AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={signed_headers}, Signature={signature}",
            creds.access_key_id
        ),
    ));
    added
}

/// Signs a request with AWS Signature Version 4 and returns the headers to add to it:
/// `x-amz-date`, `x-amz-content-sha256`, `x-amz-security-token` (with a session token) and
/// `authorization`.
///
/// `host` is the `Host` header value exactly as sent (with `:port` when not the default);
/// `path_and_query` is the request target exactly as sent (already percent-encoded, as
/// [`model_path`] makes it); `headers` are the other headers that will be sent unchanged (they are
/// all signed, except hop-by-hop ones and `user-agent`); `body` is the exact body.
#[allow(clippy::too_many_arguments)]
pub fn sign_request(
    method: &str,
    host: &str,
    path_and_query: &str,
    headers: &[(String, String)],
    body: &[u8],
    creds: &AwsCredentials,
    region: &str,
    service: &str,
    now: SystemTime,
) -> Vec<(String, String)> {
    let req = Signable {
        method,
        host,
        path_and_query,
        headers,
        body,
    };
    sign_v4(&req, creds, region, service, &amz_date(now), true)
}

// ---------------------------------------------------------------------------------------------
// application/vnd.amazon.eventstream

/// One decoded event-stream message: its string headers (other header types are skipped) and
/// its payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventMessage {
    pub headers: Vec<(String, String)>,
    pub payload: Vec<u8>,
}

impl EventMessage {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Why an event stream could not be decoded. The stream cannot be resynchronised after one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventStreamError {
    BadLength(u32),
    PreludeCrc,
    MessageCrc,
    BadHeader(&'static str),
    Truncated(usize),
}

impl std::fmt::Display for EventStreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::BadLength(n) => write!(f, "invalid message length {n}"),
            Self::PreludeCrc => f.write_str("prelude CRC mismatch"),
            Self::MessageCrc => f.write_str("message CRC mismatch"),
            Self::BadHeader(why) => write!(f, "invalid header: {why}"),
            Self::Truncated(n) => write!(f, "stream ended inside a message ({n} bytes left)"),
        }
    }
}

impl std::error::Error for EventStreamError {}

/// Incremental decoder of AWS event-stream framing: `u32` total length, `u32` headers length,
/// `u32` prelude CRC32, headers, payload, `u32` message CRC32 (all big-endian). Accepts any
/// chunking of the input.
#[derive(Debug, Default)]
pub struct EventStreamDecoder {
    buf: Vec<u8>,
    failed: bool,
}

fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

impl EventStreamDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Buffers more input; call [`next_message`](Self::next_message) until it returns `None`.
    pub fn feed(&mut self, chunk: &[u8]) {
        if !self.failed {
            self.buf.extend_from_slice(chunk);
        }
    }

    /// Bytes held back as part of an incomplete message.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next complete message, an error (after which the decoder yields nothing more), or
    /// `None` when more input is needed.
    pub fn next_message(&mut self) -> Option<Result<EventMessage, EventStreamError>> {
        let at = match self.next_frame()? {
            Ok(at) => at,
            Err(e) => return Some(Err(e)),
        };
        let frame = self.frame(&at);
        let message = EventMessage {
            headers: parse_headers(frame.headers).expect("headers checked when decoded"),
            payload: frame.payload.to_vec(),
        };
        self.consume(&at);
        Some(Ok(message))
    }

    /// Where the next complete message lies in the buffer ([`Self::frame`] reads it,
    /// [`Self::consume`] drops it), as [`Self::next_message`] finds it, without copying it.
    fn next_frame(&mut self) -> Option<Result<FrameAt, EventStreamError>> {
        if self.failed || self.buf.len() < 12 {
            return None;
        }
        let r = self.decode();
        if let Some(Err(_)) = &r {
            self.failed = true;
            self.buf.clear();
        }
        r
    }

    fn frame(&self, at: &FrameAt) -> Frame<'_> {
        Frame {
            headers: &self.buf[at.headers.clone()],
            payload: &self.buf[at.payload.clone()],
        }
    }

    fn consume(&mut self, at: &FrameAt) {
        self.buf.drain(..at.len);
    }

    /// Checks that the stream did not end inside a message.
    pub fn finish(&self) -> Result<(), EventStreamError> {
        match self.buf.len() {
            0 => Ok(()),
            n => Err(EventStreamError::Truncated(n)),
        }
    }

    fn decode(&self) -> Option<Result<FrameAt, EventStreamError>> {
        let b = &self.buf;
        let total = be_u32(&b[0..4]);
        let headers_len = be_u32(&b[4..8]) as usize;
        // The prelude is checked as soon as it is here, so a corrupt length never stalls.
        if crc32fast::hash(&b[0..8]) != be_u32(&b[8..12]) {
            return Some(Err(EventStreamError::PreludeCrc));
        }
        let len = total as usize;
        if !(16..=MAX_MESSAGE_LEN).contains(&len) || headers_len > len - 16 {
            return Some(Err(EventStreamError::BadLength(total)));
        }
        if b.len() < len {
            return None;
        }
        if crc32fast::hash(&b[..len - 4]) != be_u32(&b[len - 4..len]) {
            return Some(Err(EventStreamError::MessageCrc));
        }
        let headers = 12..12 + headers_len;
        if let Err(e) = for_each_header(&b[headers.clone()], |_, _| {}) {
            return Some(Err(e));
        }
        Some(Ok(FrameAt {
            headers,
            payload: 12 + headers_len..len - 4,
            len,
        }))
    }
}

/// A decoded message's place in the decoder's buffer.
struct FrameAt {
    headers: std::ops::Range<usize>,
    payload: std::ops::Range<usize>,
    len: usize,
}

/// A decoded message borrowed from the decoder's buffer: its header block (checked) and its
/// payload.
struct Frame<'a> {
    headers: &'a [u8],
    payload: &'a [u8],
}

impl<'a> Frame<'a> {
    /// The first string header called `name`, as [`EventMessage::header`] finds it.
    fn header(&self, name: &str) -> Option<&'a str> {
        let mut found = None;
        // The block was checked when the message was decoded: this walk cannot fail.
        let _ = for_each_header(self.headers, |n, value| {
            if found.is_none() && n == name {
                found = Some(value);
            }
        });
        found
    }
}

fn parse_headers(b: &[u8]) -> Result<Vec<(String, String)>, EventStreamError> {
    let mut out = vec![];
    for_each_header(b, |name, value| {
        out.push((name.to_string(), value.to_string()))
    })?;
    Ok(out)
}

/// Walks a header block, handing each string header (name, value) to `string`; other value
/// types are checked and skipped.
fn for_each_header<'a>(
    mut b: &'a [u8],
    mut string: impl FnMut(&'a str, &'a str),
) -> Result<(), EventStreamError> {
    fn take<'a>(b: &mut &'a [u8], n: usize) -> Result<&'a [u8], EventStreamError> {
        if b.len() < n {
            return Err(EventStreamError::BadHeader("runs past the header block"));
        }
        let (head, rest) = b.split_at(n);
        *b = rest;
        Ok(head)
    }
    while !b.is_empty() {
        let name_len = take(&mut b, 1)?[0] as usize;
        if name_len == 0 {
            return Err(EventStreamError::BadHeader("empty name"));
        }
        let name = std::str::from_utf8(take(&mut b, name_len)?)
            .map_err(|_| EventStreamError::BadHeader("name is not UTF-8"))?;
        let kind = take(&mut b, 1)?[0];
        match kind {
            // bool true, bool false: no value.
            0 | 1 => {}
            2 => {
                take(&mut b, 1)?;
            }
            3 => {
                take(&mut b, 2)?;
            }
            4 => {
                take(&mut b, 4)?;
            }
            // long, timestamp
            5 | 8 => {
                take(&mut b, 8)?;
            }
            // uuid
            9 => {
                take(&mut b, 16)?;
            }
            // byte array, string
            6 | 7 => {
                let len = take(&mut b, 2)?;
                let len = u16::from_be_bytes([len[0], len[1]]) as usize;
                let value = take(&mut b, len)?;
                if kind == 7 {
                    let value = std::str::from_utf8(value)
                        .map_err(|_| EventStreamError::BadHeader("string is not UTF-8"))?;
                    string(name, value);
                }
            }
            _ => return Err(EventStreamError::BadHeader("unknown value type")),
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// ConverseStream → OpenAI chat.completion.chunk

/// Turns ConverseStream events into OpenAI `chat.completion.chunk` SSE events, for any chunking
/// of the input.
pub struct BedrockStream {
    decoder: EventStreamDecoder,
    /// The stream's fixed chunk envelope (id, created, model).
    writer: ChunkWriter,
    usage: Option<BedrockUsage>,
    /// Content block index → OpenAI tool call index (`None` for the JSON-answer tool).
    blocks: Vec<(u64, Option<usize>)>,
    tool_calls: usize,
    json_mode: bool,
    include_usage: bool,
    stopped: bool,
    finished: bool,
}

impl BedrockStream {
    pub fn new(model: &str, include_usage: bool) -> Self {
        BedrockStream {
            decoder: EventStreamDecoder::new(),
            writer: ChunkWriter::new(&completion_id(), now(), model),
            usage: None,
            blocks: vec![],
            tool_calls: 0,
            json_mode: false,
            include_usage,
            stopped: false,
            finished: false,
        }
    }

    pub fn usage(&self) -> Option<Usage> {
        self.usage.map(|u| u.usage())
    }

    pub fn feed(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        if self.finished {
            return;
        }
        // The decoder is moved out while its messages, borrowed from its buffer, are handled.
        let mut decoder = std::mem::take(&mut self.decoder);
        decoder.feed(chunk);
        while let Some(frame) = decoder.next_frame() {
            match frame {
                Ok(at) => {
                    self.message(&decoder.frame(&at), out);
                    decoder.consume(&at);
                }
                Err(e) => {
                    self.decoder = decoder;
                    self.error(
                        "internal_server_error",
                        "502",
                        &format!("malformed event stream: {e}"),
                        out,
                    );
                    return;
                }
            }
        }
        self.decoder = decoder;
    }

    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if self.finished {
            return;
        }
        if let Err(e) = self.decoder.finish() {
            self.error(
                "internal_server_error",
                "502",
                &format!("malformed event stream: {e}"),
                out,
            );
        } else if !self.stopped {
            self.error(
                "internal_server_error",
                "502",
                "the stream ended before messageStop",
                out,
            );
        } else {
            self.end(out);
        }
    }

    fn chunk(&self, delta: Value, finish: Option<&str>, out: &mut Vec<u8>) {
        self.writer.delta(out, 0, &delta, finish);
    }

    fn message(&mut self, m: &Frame, out: &mut Vec<u8>) {
        if self.frequent_message(m, out).is_some() {
            return;
        }
        self.message_value(m, out);
    }

    /// Content deltas (most of a stream) read with the body's scanner and written directly
    /// instead of through a `Value` per event, and the events that send nothing (their payload
    /// unread). `None`, with nothing written, leaves the message to [`Self::message_value`]:
    /// exceptions, errors, the other events and anything unusual (see [`object_fields`]).
    fn frequent_message(&mut self, m: &Frame, out: &mut Vec<u8>) -> Option<()> {
        if let Some("exception" | "error") = m.header(":message-type") {
            return None;
        }
        match m.header(":event-type") {
            Some("contentBlockDelta") => {}
            Some("messageStart" | "contentBlockStart" | "messageStop" | "metadata") => return None,
            _ => return Some(()),
        }
        let src = utf8(m.payload)?;
        let (mut index, mut delta) = (None, None);
        object_fields(src, |key, value, _| match key {
            "contentBlockIndex" => {
                index = Some(value);
                Some(1)
            }
            "delta" => {
                delta = Some(value);
                Some(2)
            }
            _ => Some(0),
        })?;
        let index = index.map_or(Some(0), plain_u64)?;
        let (mut text, mut reasoning, mut tool_use) = (None, None, None);
        object_fields(delta?, |key, value, escaped| match key {
            "text" => {
                text = Some((value, escaped));
                Some(1)
            }
            "reasoningContent" => {
                reasoning = Some(value);
                Some(2)
            }
            "toolUse" => {
                tool_use = Some(value);
                Some(4)
            }
            _ => Some(0),
        })?;
        if let Some((text, escaped)) = text {
            self.writer
                .text_delta(out, "content", &string_text(text, escaped)?);
        } else if reasoning.is_some() {
            return None;
        } else if let Some(tool_use) = tool_use {
            let (token, escaped) = scan_path(tool_use, &["input"])?;
            let partial = string_text(token, escaped)?;
            match self
                .blocks
                .iter()
                .find(|(i, _)| *i == index)
                .map(|(_, c)| *c)
            {
                Some(Some(call)) => self.writer.arguments_delta(out, call, &partial),
                // The JSON-answer tool: its input is the message content.
                Some(None) if token != "\"\"" => self.writer.text_delta(out, "content", &partial),
                _ => {}
            }
        }
        Some(())
    }

    /// Any message, its payload read into a `serde_json::Value`.
    fn message_value(&mut self, m: &Frame, out: &mut Vec<u8>) {
        let payload: Value = serde_json::from_slice(m.payload).unwrap_or(Value::Null);
        match m.header(":message-type") {
            Some("exception") => {
                let kind = m.header(":exception-type").unwrap_or("exception");
                let (error_type, code) = exception_kind(kind);
                let text = payload
                    .get("message")
                    .or_else(|| payload.get("Message"))
                    .and_then(Value::as_str)
                    .unwrap_or("stream error");
                self.error(error_type, code, &format!("{kind}: {text}"), out);
                return;
            }
            Some("error") => {
                let code = m.header(":error-code").unwrap_or("error");
                let text = m.header(":error-message").unwrap_or("stream error");
                self.error(
                    "internal_server_error",
                    "500",
                    &format!("{code}: {text}"),
                    out,
                );
                return;
            }
            _ => {}
        }
        match m.header(":event-type") {
            Some("messageStart") => {
                self.chunk(json!({"role": "assistant", "content": ""}), None, out);
            }
            Some("contentBlockStart") => {
                let index = payload["contentBlockIndex"].as_u64().unwrap_or(0);
                let Some(tool) = payload.pointer("/start/toolUse") else {
                    return;
                };
                let name = tool["name"].as_str().unwrap_or_default();
                if name == JSON_TOOL {
                    self.json_mode = true;
                    self.blocks.push((index, None));
                } else {
                    let call = self.tool_calls;
                    self.tool_calls += 1;
                    self.blocks.push((index, Some(call)));
                    self.chunk(
                        json!({"tool_calls": [{"index": call, "id": tool["toolUseId"], "type": "function", "function": {"name": name, "arguments": ""}}]}),
                        None,
                        out,
                    );
                }
            }
            Some("contentBlockDelta") => {
                let index = payload["contentBlockIndex"].as_u64().unwrap_or(0);
                let d = &payload["delta"];
                if let Some(t) = d.get("text").and_then(Value::as_str) {
                    self.chunk(json!({"content": t}), None, out);
                } else if let Some(t) = d.pointer("/reasoningContent/text").and_then(Value::as_str)
                {
                    self.chunk(json!({"reasoning_content": t}), None, out);
                } else if let Some(partial) = d.pointer("/toolUse/input").and_then(Value::as_str) {
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
            }
            Some("messageStop") => {
                self.stopped = true;
                let reason = finish_reason(payload["stopReason"].as_str(), self.json_mode);
                self.chunk(json!({}), Some(reason), out);
                if self.usage.is_some() {
                    self.end(out);
                }
            }
            Some("metadata") => {
                if let Ok(u) = serde_json::from_value::<BedrockUsage>(payload["usage"].clone()) {
                    self.usage = Some(u);
                }
                if self.stopped {
                    self.end(out);
                }
            }
            _ => {}
        }
    }

    /// An in-band OpenAI error event, then the end of the stream.
    fn error(&mut self, error_type: &str, code: &str, message: &str, out: &mut Vec<u8>) {
        let err = json!({"error": {
            "message": format!("litellm.APIError: BedrockException - {message}"),
            "type": error_type,
            "param": null,
            "code": code,
        }});
        out.extend_from_slice(format!("data: {err}\n\n").as_bytes());
        self.end(out);
    }

    fn end(&mut self, out: &mut Vec<u8>) {
        if self.finished {
            return;
        }
        self.finished = true;
        if let (true, Some(u)) = (self.include_usage, self.usage) {
            self.writer.usage(out, &u.openai());
        }
        out.extend_from_slice(b"data: [DONE]\n\n");
    }
}

/// The OpenAI error type and status code for a ConverseStream exception.
fn exception_kind(exception_type: &str) -> (&'static str, &'static str) {
    match exception_type {
        "throttlingException" | "serviceQuotaExceededException" => ("rate_limit_error", "429"),
        "validationException" => ("bad_request_error", "400"),
        "modelTimeoutException" => ("timeout_error", "408"),
        "serviceUnavailableException" => ("internal_server_error", "503"),
        "modelStreamErrorException" => ("internal_server_error", "424"),
        _ => ("internal_server_error", "500"),
    }
}

#[cfg(test)]
mod tests;
