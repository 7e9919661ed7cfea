//! Anthropic Messages API: OpenAI chat requests become `/v1/messages` bodies (system prompt
//! lifted to `system`, tools to `input_schema` tools, tool results to `tool_result` blocks), and
//! responses and SSE streams come back in OpenAI's shape. `response_format` is honoured the way
//! LiteLLM does it: a forced tool whose input is the JSON answer.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{json, Value};
use sluice_config::Deployment;

use super::common::{
    bad, now, object_fields, parse_field, plain_u64, read_messages, read_tools, scan_text_blocks,
    single_text, string_text, text, utf8, write_json, write_list, write_text_completion,
    CachedUsage, ChunkWriter, InContent, InImageUrl, InMessage, InPart, InTool, RawJson, Text,
    TextChoice,
};
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

/// One Anthropic content block.
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Block<'a> {
    Text {
        text: Text<'a>,
        #[serde(skip_serializing_if = "Option::is_none")]
        cache_control: Option<&'a RawValue>,
    },
    Image {
        source: ImageSource<'a>,
    },
    ToolUse {
        id: Cow<'a, str>,
        name: Cow<'a, str>,
        input: Box<RawValue>,
    },
    ToolResult {
        tool_use_id: Cow<'a, str>,
        content: ToolResultContent<'a>,
    },
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ImageSource<'a> {
    Base64 { media_type: &'a str, data: &'a str },
    Url { url: &'a str },
}

#[derive(Serialize)]
#[serde(untagged)]
enum ToolResultContent<'a> {
    Text(Text<'a>),
    Blocks(Vec<Block<'a>>),
}

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
            Block::Text {
                text,
                cache_control,
            } => {
                out.extend_from_slice(b"{\"type\":\"text\",\"text\":");
                text.write(out);
                if let Some(c) = cache_control {
                    out.extend_from_slice(b",\"cache_control\":");
                    out.extend_from_slice(c.get().as_bytes());
                }
            }
            Block::ToolUse { id, name, input } => {
                out.extend_from_slice(b"{\"type\":\"tool_use\",\"id\":");
                write_json(out, id.as_ref());
                out.extend_from_slice(b",\"name\":");
                write_json(out, name.as_ref());
                out.extend_from_slice(b",\"input\":");
                out.extend_from_slice(input.get().as_bytes());
            }
            Block::ToolResult {
                tool_use_id,
                content,
            } => {
                out.extend_from_slice(b"{\"type\":\"tool_result\",\"tool_use_id\":");
                write_json(out, tool_use_id.as_ref());
                out.extend_from_slice(b",\"content\":");
                match content {
                    ToolResultContent::Text(text) => text.write(out),
                    ToolResultContent::Blocks(blocks) => write_blocks(out, blocks),
                }
            }
            // Rare: serde's own writing.
            Block::Image { .. } => return write_json(out, self),
        }
        out.push(b'}');
    }
}

/// OpenAI message content (a string or a list of parts) as Anthropic content blocks. `src` is
/// the client's `messages` JSON the content was read from (its string tokens are copied through
/// where serde_json would write them the same, see [`text`]).
fn content_blocks<'a>(
    src: &'a str,
    content: &'a Option<InContent<'a>>,
) -> Result<Vec<Block<'a>>, ApiError> {
    match content {
        None => Ok(vec![]),
        Some(InContent::Parts(parts)) => {
            let mut blocks = Vec::with_capacity(parts.len());
            for p in parts {
                blocks.extend(part_block(src, p)?);
            }
            Ok(blocks)
        }
        Some(content) => Ok(content
            .as_text(src)
            .filter(|t| !t.is_empty())
            .map(|text| Block::Text {
                text,
                cache_control: None,
            })
            .into_iter()
            .collect()),
    }
}

fn part_block<'a>(src: &'a str, part: &'a InPart<'a>) -> Result<Option<Block<'a>>, ApiError> {
    match part.kind.as_ref() {
        "text" => {
            let s = part.text.as_deref().unwrap_or("");
            Ok((!s.is_empty()).then_some(Block::Text {
                text: text(src, s),
                cache_control: part.cache_control,
            }))
        }
        "image_url" => {
            let url = match &part.image_url {
                Some(InImageUrl::Object { url }) | Some(InImageUrl::Url(url)) => url,
                None => return Err(bad("image_url part without a url")),
            };
            Ok(Some(image_block(url)?))
        }
        other => Err(bad(format!(
            "Unsupported content part type for Anthropic: {other}"
        ))),
    }
}

fn image_block(url: &str) -> Result<Block<'_>, ApiError> {
    let source = if let Some(rest) = url.strip_prefix("data:") {
        let (meta, data) = rest
            .split_once(',')
            .ok_or_else(|| bad("Malformed data URL in image_url"))?;
        let media_type = meta
            .strip_suffix(";base64")
            .ok_or_else(|| bad("image data URLs must be base64"))?;
        ImageSource::Base64 { media_type, data }
    } else {
        ImageSource::Url { url }
    };
    Ok(Block::Image { source })
}

fn text_of<'a>(content: &'a Option<InContent<'a>>) -> Cow<'a, str> {
    match content {
        Some(InContent::Parts(parts)) => Cow::Owned(
            parts
                .iter()
                .filter_map(|p| p.text.as_deref())
                .collect::<Vec<_>>()
                .join("\n"),
        ),
        Some(content) => content.as_str().unwrap_or_default(),
        None => Cow::Borrowed(""),
    }
}

/// Appends blocks as a turn of `role`, merging with the previous turn of the same role
/// (Anthropic wants user and assistant turns to alternate).
fn push_turn<'a>(messages: &mut Vec<Turn<'a>>, role: &'static str, blocks: Vec<Block<'a>>) {
    if blocks.is_empty() {
        return;
    }
    match messages.last_mut() {
        Some(last) if last.role == role => last.content.extend(blocks),
        _ => messages.push(Turn {
            role,
            content: blocks,
        }),
    }
}

type Converted<'a> = (Vec<Cow<'a, str>>, Vec<Turn<'a>>);

/// `raw` are the messages parsed from `src`.
fn convert_messages<'a>(src: &'a str, raw: &'a [InMessage<'a>]) -> Result<Converted<'a>, ApiError> {
    let mut system = vec![];
    let mut messages: Vec<Turn> = Vec::with_capacity(raw.len());
    for m in raw {
        match m.role.as_ref() {
            "system" | "developer" => system.push(text_of(&m.content)),
            "user" => push_turn(&mut messages, "user", content_blocks(src, &m.content)?),
            "assistant" => {
                let mut blocks = vec![];
                if let Some(r) = m.reasoning_content.as_deref().filter(|r| !r.is_empty()) {
                    // Without the signature Anthropic issued, a thinking block cannot be sent
                    // back; keep it as text so the context is not lost.
                    blocks.push(Block::Text {
                        text: text(src, r),
                        cache_control: None,
                    });
                }
                blocks.extend(content_blocks(src, &m.content)?);
                for call in m.tool_calls.iter().flatten() {
                    let args = call.function.arguments.trim();
                    let input = RawValue::from_string(if args.is_empty() {
                        "{}".to_string()
                    } else {
                        args.to_string()
                    })
                    .map_err(|e| {
                        bad(format!(
                            "tool_calls arguments of {} are not JSON: {e}",
                            call.id
                        ))
                    })?;
                    blocks.push(Block::ToolUse {
                        id: Cow::Borrowed(&call.id),
                        name: Cow::Borrowed(&call.function.name),
                        input,
                    });
                }
                push_turn(&mut messages, "assistant", blocks);
            }
            "tool" | "function" => {
                let id = m.tool_call_id.as_deref().ok_or_else(|| {
                    bad("A tool message needs tool_call_id").with_param("messages")
                })?;
                let content = match m.content.as_ref().and_then(|c| c.as_text(src)) {
                    Some(text) => ToolResultContent::Text(text),
                    None => ToolResultContent::Blocks(content_blocks(src, &m.content)?),
                };
                push_turn(
                    &mut messages,
                    "user",
                    vec![Block::ToolResult {
                        tool_use_id: Cow::Borrowed(id),
                        content,
                    }],
                );
            }
            other => {
                return Err(bad(format!("Invalid message role: {other}")).with_param("messages"))
            }
        }
    }
    Ok((system, messages))
}

/// An Anthropic tool. Schemas and descriptions are copied through as raw JSON.
#[derive(Serialize)]
struct OutTool<'a> {
    name: Cow<'a, str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<RawJson<'a>>,
    input_schema: Schema<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cache_control: Option<RawJson<'a>>,
}

impl OutTool<'_> {
    /// Appends the tool as serde_json writes it.
    fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"name\":");
        write_json(out, self.name.as_ref());
        if let Some(description) = &self.description {
            out.extend_from_slice(b",\"description\":");
            description.write(out);
        }
        out.extend_from_slice(b",\"input_schema\":");
        match &self.input_schema {
            Schema::Raw(raw) => raw.write(out),
            Schema::Built(value) => write_json(out, value),
        }
        if let Some(cache_control) = &self.cache_control {
            out.extend_from_slice(b",\"cache_control\":");
            cache_control.write(out);
        }
        out.push(b'}');
    }
}

#[derive(Serialize)]
#[serde(untagged)]
enum Schema<'a> {
    Raw(RawJson<'a>),
    Built(Value),
}

fn convert_tools<'a>(tools: &'a [InTool<'a>]) -> Result<Vec<OutTool<'a>>, ApiError> {
    tools
        .iter()
        .map(|t| {
            let f = t
                .function
                .as_ref()
                .ok_or_else(|| bad("Only function tools are supported").with_param("tools"))?;
            let name = f
                .name
                .as_deref()
                .ok_or_else(|| bad("A tool has no name").with_param("tools"))?;
            Ok(OutTool {
                name: Cow::Borrowed(name),
                description: f.description,
                input_schema: match f.parameters {
                    Some(p) => Schema::Raw(p),
                    None => Schema::Built(json!({"type": "object", "properties": {}})),
                },
                cache_control: t.cache_control,
            })
        })
        .collect()
}

/// Anthropic's `tool_choice`. Fields in the sorted order the `Value` it replaced wrote them in.
#[derive(Serialize)]
struct ToolChoice {
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    disable_parallel_tool_use: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    #[serde(rename = "type")]
    kind: &'static str,
}

impl ToolChoice {
    fn of(kind: &'static str, name: Option<String>) -> Self {
        ToolChoice {
            disable_parallel_tool_use: false,
            name,
            kind,
        }
    }
}

/// The client's `tool_choice` (`raw`, its JSON) as Anthropic's; the usual `"auto"` without
/// parsing it.
fn convert_tool_choice(
    raw: Option<&str>,
    parallel: Option<bool>,
) -> Result<Option<ToolChoice>, ApiError> {
    let mut out = match raw {
        None | Some("null") => return Ok(None),
        Some("\"auto\"") => ToolChoice::of("auto", None),
        Some(raw) => match serde_json::from_str::<Value>(raw).map_err(|e| {
            bad(format!("Invalid request body: `tool_choice`: {e}")).with_param("tool_choice")
        })? {
            Value::String(s) if s == "auto" => ToolChoice::of("auto", None),
            Value::String(s) if s == "required" || s == "any" => ToolChoice::of("any", None),
            Value::String(s) if s == "none" => ToolChoice::of("none", None),
            choice @ Value::Object(_) => {
                match choice.pointer("/function/name").and_then(Value::as_str) {
                    Some(name) => ToolChoice::of("tool", Some(name.to_string())),
                    None => {
                        return Err(bad("tool_choice names no function").with_param("tool_choice"))
                    }
                }
            }
            other => {
                return Err(bad(format!("Invalid tool_choice: {other}")).with_param("tool_choice"))
            }
        },
    };
    out.disable_parallel_tool_use = parallel == Some(false);
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

    let raw_messages = body.raw("messages").unwrap_or("[]");
    let messages = read_messages(raw_messages)?;
    let (system, turns) = convert_messages(raw_messages, &messages)?;
    let system: Vec<Cow<str>> = system.into_iter().filter(|s| !s.is_empty()).collect();
    let max_tokens: Option<u64> = parse_field(body, "max_completion_tokens")?;
    let max_tokens = max_tokens
        .or(parse_field(body, "max_tokens")?)
        .unwrap_or(DEFAULT_MAX_TOKENS);
    let raw_param = |key: &'static str| -> Result<Option<&RawValue>, ApiError> {
        match body.raw(key).filter(|r| *r != "null") {
            None => Ok(None),
            Some(raw) => serde_json::from_str(raw)
                .map(Some)
                .map_err(|e| bad(format!("`{key}`: {e}")).with_param(key)),
        }
    };
    let stop_sequences = match parse_field::<Value>(body, "stop")? {
        None => None,
        Some(Value::String(s)) => Some(vec![s]),
        Some(Value::Array(a)) => Some(
            a.into_iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect(),
        ),
        Some(other) => return Err(bad(format!("Invalid stop: {other}")).with_param("stop")),
    };
    let user: Option<String> = parse_field(body, "user")?;
    let tools_len = body.raw("tools").map_or(0, str::len);
    let in_tools = read_tools(body.raw("tools"))?;
    let mut tools = convert_tools(&in_tools)?;
    let parallel: Option<bool> = parse_field(body, "parallel_tool_calls")?;
    let mut tool_choice = convert_tool_choice(body.raw("tool_choice"), parallel)?;
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
            tools.push(OutTool {
                name: Cow::Borrowed(JSON_TOOL),
                description: Some(json_tool_description()),
                input_schema: Schema::Built(schema),
                cache_control: None,
            });
            tool_choice = Some(ToolChoice::of("tool", Some(JSON_TOOL.to_string())));
        }
    }
    let out = MessagesRequest {
        model: upstream_model,
        messages: turns,
        system: match system.as_slice() {
            [] => None,
            // One system prompt (the common case): its token, copied through where it can be.
            [Cow::Borrowed(s)] => Some(text(raw_messages, s)),
            _ => Some(Text::Str(Cow::Owned(system.join("\n")))),
        },
        max_tokens,
        temperature: raw_param("temperature")?,
        top_p: raw_param("top_p")?,
        top_k: raw_param("top_k")?,
        thinking: raw_param("thinking")?,
        stop_sequences,
        stream: stream.then_some(true),
        metadata: user.map(|user_id| Metadata { user_id }),
        tools,
        tool_choice,
    };

    let mut headers = vec![("anthropic-version".to_string(), API_VERSION.to_string())];
    if let Some(key) = &d.api_key {
        headers.push(("x-api-key".to_string(), key.clone()));
    }
    headers.extend(d.extra_headers.iter().cloned());
    Ok(UpstreamRequest {
        path: "/v1/messages".into(),
        headers,
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

fn json_tool_description() -> RawJson<'static> {
    RawJson::literal("\"Respond with a JSON object.\"")
}

/// The Messages API request body.
#[derive(Serialize)]
struct MessagesRequest<'a> {
    model: &'a str,
    messages: Vec<Turn<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    system: Option<Text<'a>>,
    max_tokens: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_k: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    thinking: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stop_sequences: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    metadata: Option<Metadata>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<OutTool<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_choice: Option<ToolChoice>,
}

impl MessagesRequest<'_> {
    /// Appends the body exactly as serde_json serializes it (checked in debug builds), with
    /// the messages, most of the bytes, written directly.
    fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"model\":");
        write_json(out, self.model);
        out.extend_from_slice(b",\"messages\":[");
        for (i, t) in self.messages.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            t.write(out);
        }
        out.push(b']');
        if let Some(system) = &self.system {
            out.extend_from_slice(b",\"system\":");
            system.write(out);
        }
        out.extend_from_slice(b",\"max_tokens\":");
        write_json(out, &self.max_tokens);
        for (key, value) in [
            (&b",\"temperature\":"[..], self.temperature),
            (b",\"top_p\":", self.top_p),
            (b",\"top_k\":", self.top_k),
            (b",\"thinking\":", self.thinking),
        ] {
            if let Some(v) = value {
                out.extend_from_slice(key);
                out.extend_from_slice(v.get().as_bytes());
            }
        }
        if let Some(stop) = &self.stop_sequences {
            out.extend_from_slice(b",\"stop_sequences\":");
            write_json(out, stop);
        }
        if let Some(stream) = self.stream {
            out.extend_from_slice(b",\"stream\":");
            write_json(out, &stream);
        }
        if let Some(metadata) = &self.metadata {
            out.extend_from_slice(b",\"metadata\":");
            write_json(out, metadata);
        }
        if !self.tools.is_empty() {
            out.extend_from_slice(b",\"tools\":");
            write_list(out, &self.tools, |out, tool| tool.write(out));
        }
        if let Some(choice) = &self.tool_choice {
            out.extend_from_slice(b",\"tool_choice\":");
            write_json(out, choice);
        }
        out.push(b'}');
    }
}

#[derive(Serialize)]
struct Metadata {
    user_id: String,
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
    if let Some(translated) = text_response(body, model) {
        return Ok(translated);
    }
    value_response(body, model)
}

/// A response of text blocks only, with plain token counts, read with the body's scanner and
/// written directly, the answer's token copied through. `None` leaves the response to
/// [`value_response`]: tool use, thinking, several blocks, anything unusual.
fn text_response(body: &[u8], model: &str) -> Option<(Vec<u8>, Option<Usage>)> {
    let src = utf8(body)?;
    let (mut id, mut content, mut stop_reason, mut usage) = (None, None, None, None);
    object_fields(src, |key, value, escaped| match key {
        "id" => {
            id = Some(string_text(value, escaped)?);
            Some(1)
        }
        "content" => {
            content = Some(value);
            Some(2)
        }
        "stop_reason" if value == "null" => Some(4),
        "stop_reason" if !escaped && value.starts_with('"') => {
            stop_reason = Some(&value[1..value.len() - 1]);
            Some(4)
        }
        "stop_reason" => None,
        "usage" => {
            usage = Some(value);
            Some(8)
        }
        _ => Some(0),
    })?;
    let text = match content {
        Some(blocks) => single_text(scan_text_blocks(blocks, true)?)?,
        None => Text::Str(Cow::Borrowed("")),
    };
    let mut u = AnthropicUsage::default();
    if let Some(usage) = usage {
        object_fields(usage, |key, value, _| {
            let (slot, bit) = match key {
                "input_tokens" => (&mut u.input_tokens, 1),
                "output_tokens" => (&mut u.output_tokens, 2),
                "cache_creation_input_tokens" => (&mut u.cache_creation_input_tokens, 4),
                "cache_read_input_tokens" => (&mut u.cache_read_input_tokens, 8),
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
    let id = id.unwrap_or(Text::Str(Cow::Borrowed("")));
    let mut out = Vec::with_capacity(body.len() + 256);
    write_text_completion(&mut out, &id, model, &[choice], &u.openai());
    Some((out, Some(u.usage())))
}

/// [`translate_response`] for any response, read into `serde_json::Value`s.
fn value_response(body: &[u8], model: &str) -> Result<(Vec<u8>, Option<Usage>), ApiError> {
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
        if self.frequent_event(data, out).is_some() {
            return;
        }
        self.event_value(data, out);
    }

    /// Content deltas (most of a stream) and the events that send nothing, read with the
    /// body's scanner and written directly instead of through a `Value` per event. `None`,
    /// with nothing written, leaves the event to [`Self::event_value`]: any other event, and
    /// anything unusual (see [`object_fields`]).
    fn frequent_event(&mut self, data: &[u8], out: &mut Vec<u8>) -> Option<()> {
        let src = utf8(data)?;
        let (mut kind, mut index, mut delta) = (None, None, None);
        object_fields(src, |key, value, escaped| match key {
            "type" => {
                kind = Some(value).filter(|_| !escaped);
                Some(1)
            }
            "index" => {
                index = Some(value);
                Some(2)
            }
            "delta" => {
                delta = Some(value);
                Some(4)
            }
            _ => Some(0),
        })?;
        match kind? {
            "\"content_block_delta\"" => {}
            "\"ping\"" | "\"content_block_stop\"" => return Some(()),
            _ => return None,
        }
        let index = index.map_or(Some(0), plain_u64)?;
        let (mut delta_kind, mut text, mut thinking, mut partial) = (None, None, None, None);
        object_fields(delta?, |key, value, escaped| {
            let (slot, bit) = match key {
                "type" => (&mut delta_kind, 1),
                "text" => (&mut text, 2),
                "thinking" => (&mut thinking, 4),
                "partial_json" => (&mut partial, 8),
                _ => return Some(0),
            };
            *slot = string_text(value, escaped).map(|t| (t, value));
            Some(bit)
        })?;
        let (_, delta_kind) = delta_kind?;
        match delta_kind {
            "\"text_delta\"" => self.writer.text_delta(out, "content", &text?.0),
            "\"thinking_delta\"" => self
                .writer
                .text_delta(out, "reasoning_content", &thinking?.0),
            "\"input_json_delta\"" => {
                let (partial, token) = partial?;
                match self
                    .blocks
                    .iter()
                    .find(|(i, _)| *i == index)
                    .map(|(_, c)| *c)
                {
                    Some(Some(call)) => self.writer.arguments_delta(out, call, &partial),
                    // The JSON-answer tool: its input is the message content.
                    Some(None) if token != "\"\"" => {
                        self.writer.text_delta(out, "content", &partial)
                    }
                    _ => {}
                }
            }
            _ => return None,
        }
        Some(())
    }

    /// Any event, read into a `serde_json::Value`.
    fn event_value(&mut self, data: &[u8], out: &mut Vec<u8>) {
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
