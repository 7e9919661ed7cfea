//! Google Gemini (`generativelanguage.googleapis.com/v1beta`) and Vertex AI (the same bodies
//! under `/v1/projects/{p}/locations/{l}/publishers/google/models/{m}`): OpenAI chat requests
//! become `generateContent` bodies (system prompt lifted to `systemInstruction`, tools to
//! `functionDeclarations`, tool results to `functionResponse` parts), embeddings become
//! `batchEmbedContents` (Gemini) or `predict` (Vertex) calls, and responses and SSE streams come
//! back in OpenAI's shape.
//!
//! Gemini attaches a `thoughtSignature` to function calls of thinking models and rejects a later
//! turn that sends the call back without it. The signature travels inside the OpenAI tool call
//! id (`call_0__thought__<signature>`), as LiteLLM does, and is restored on the next request.

use std::collections::HashMap;

use serde::Deserialize;
use serde_json::{json, Map, Value};
use sluice_config::Deployment;

use super::common::{bad, now, parse_field, ChunkWriter, OpenAiMessage};
use super::{unsupported_params, CallOptions, Operation, UpstreamRequest};
use crate::body::RequestBody;
use crate::classify::{classify_status, FailureKind};
use crate::error::ApiError;
use crate::sse::{event_data, SseSplitter};
use crate::usage::Usage;

/// LiteLLM's Vertex region when a deployment names none.
pub const DEFAULT_VERTEX_LOCATION: &str = "us-central1";
/// Separates a tool call id from the thought signature Gemini gave the call.
const THOUGHT_SEP: &str = "__thought__";

/// OpenAI parameters Gemini has no equivalent for (besides `parallel_tool_calls: false`,
/// `logprobs: true` and non-text `modalities`, checked by value).
const UNSUPPORTED: &[&str] = &[
    "logit_bias",
    "top_logprobs",
    "service_tier",
    "prediction",
    "audio",
];

/// Keys of Gemini's `Schema` (an OpenAPI subset); anything else is an "Unknown name" 400.
const SCHEMA_KEYS: &[&str] = &[
    "type",
    "format",
    "title",
    "description",
    "nullable",
    "enum",
    "maxItems",
    "minItems",
    "required",
    "minProperties",
    "maxProperties",
    "minLength",
    "maxLength",
    "pattern",
    "example",
    "propertyOrdering",
    "default",
    "minimum",
    "maximum",
];

/// Gemini's own tools, passed through when a client sends them (`{"googleSearch": {}}`).
const NATIVE_TOOLS: &[&str] = &[
    "googleSearch",
    "googleSearchRetrieval",
    "codeExecution",
    "urlContext",
];

/// OpenAI message content (a string or a list of parts) as Gemini parts.
fn content_parts(content: &Value) -> Result<Vec<Value>, ApiError> {
    match content {
        Value::Null => Ok(vec![]),
        Value::String(s) if s.is_empty() => Ok(vec![]),
        Value::String(s) => Ok(vec![json!({"text": s})]),
        Value::Array(parts) => {
            let mut out = Vec::with_capacity(parts.len());
            for p in parts {
                out.extend(part(p)?);
            }
            Ok(out)
        }
        other => Err(bad(format!("Invalid message content: {other}"))),
    }
}

fn part(p: &Value) -> Result<Option<Value>, ApiError> {
    match p.get("type").and_then(Value::as_str) {
        Some("text") => {
            let text = p.get("text").and_then(Value::as_str).unwrap_or("");
            Ok((!text.is_empty()).then(|| json!({"text": text})))
        }
        Some("image_url") => {
            let url = p
                .pointer("/image_url/url")
                .or_else(|| p.get("image_url"))
                .and_then(Value::as_str)
                .ok_or_else(|| bad("image_url part without a url"))?;
            let format = p.pointer("/image_url/format").and_then(Value::as_str);
            Ok(Some(media_part(url, format)?))
        }
        Some("input_audio") => {
            let data = p
                .pointer("/input_audio/data")
                .and_then(Value::as_str)
                .ok_or_else(|| bad("input_audio part without data"))?;
            let format = p
                .pointer("/input_audio/format")
                .and_then(Value::as_str)
                .unwrap_or("wav");
            Ok(Some(
                json!({"inlineData": {"mimeType": format!("audio/{format}"), "data": data}}),
            ))
        }
        Some("file") => {
            let file = p.get("file").unwrap_or(&Value::Null);
            let format = file.get("format").and_then(Value::as_str);
            let url = file
                .get("file_data")
                .or_else(|| file.get("file_id"))
                .and_then(Value::as_str)
                .ok_or_else(|| bad("file part without file_data or file_id"))?;
            Ok(Some(media_part(url, format)?))
        }
        Some(other) => Err(bad(format!(
            "Unsupported content part type for Gemini: {other}"
        ))),
        None => Err(bad("A content part has no `type`")),
    }
}

/// A data URL becomes `inlineData`; any other URL (`https://`, `gs://`, a Files API URI)
/// becomes `fileData`, which needs a MIME type: the one given, else one guessed from the path.
fn media_part(url: &str, mime: Option<&str>) -> Result<Value, ApiError> {
    if let Some(rest) = url.strip_prefix("data:") {
        let (meta, data) = rest
            .split_once(',')
            .ok_or_else(|| bad("Malformed data URL in image_url"))?;
        let media_type = meta
            .strip_suffix(";base64")
            .ok_or_else(|| bad("image data URLs must be base64"))?;
        Ok(json!({"inlineData": {"mimeType": mime.unwrap_or(media_type), "data": data}}))
    } else {
        let mime = mime.unwrap_or_else(|| guess_mime(url));
        Ok(json!({"fileData": {"mimeType": mime, "fileUri": url}}))
    }
}

fn guess_mime(url: &str) -> &'static str {
    let path = url.split(['?', '#']).next().unwrap_or(url);
    let ext = path
        .rsplit_once('.')
        .map(|(_, e)| e.to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "png" => "image/png",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "heic" => "image/heic",
        "heif" => "image/heif",
        "pdf" => "application/pdf",
        "txt" => "text/plain",
        "mp3" => "audio/mp3",
        "wav" => "audio/wav",
        "flac" => "audio/flac",
        "mp4" => "video/mp4",
        "mov" => "video/mov",
        "webm" => "video/webm",
        _ => "image/jpeg",
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

fn is_function_responses(parts: &[Value]) -> bool {
    parts.iter().all(|p| p.get("functionResponse").is_some())
}

/// Appends parts as a turn of `role`, merging with the previous turn of the same role, but
/// keeping a turn of function responses apart from ordinary user text (Gemini matches function
/// responses to the calls of the turn before).
fn push_turn(contents: &mut Vec<Value>, role: &str, parts: Vec<Value>) {
    if parts.is_empty() {
        return;
    }
    if let Some(last) = contents.last_mut() {
        if last["role"] == role {
            if let Some(existing) = last["parts"].as_array_mut() {
                if is_function_responses(existing) == is_function_responses(&parts) {
                    existing.extend(parts);
                    return;
                }
            }
        }
    }
    contents.push(json!({"role": role, "parts": parts}));
}

/// Splits a tool call id into the id and the thought signature carried inside it.
fn split_call_id(id: &str) -> (&str, Option<&str>) {
    match id.split_once(THOUGHT_SEP) {
        Some((id, sig)) if !sig.is_empty() => (id, Some(sig)),
        _ => (id, None),
    }
}

fn convert_messages(raw: Vec<OpenAiMessage>) -> Result<(Vec<Value>, Vec<Value>), ApiError> {
    let mut system = vec![];
    let mut contents: Vec<Value> = vec![];
    // Tool call id → function name, for the `functionResponse` parts of tool messages.
    let mut names: HashMap<String, String> = HashMap::new();
    for m in raw {
        match m.role.as_str() {
            "system" | "developer" => {
                let text = text_of(&m.content);
                if !text.is_empty() {
                    system.push(json!({"text": text}));
                }
            }
            "user" => push_turn(&mut contents, "user", content_parts(&m.content)?),
            "assistant" => {
                let mut parts = content_parts(&m.content)?;
                for call in m.tool_calls.unwrap_or_default() {
                    let args: Value = if call.function.arguments.trim().is_empty() {
                        json!({})
                    } else {
                        serde_json::from_str(&call.function.arguments).map_err(|e| {
                            bad(format!(
                                "tool_calls arguments of {} are not JSON: {e}",
                                call.id
                            ))
                        })?
                    };
                    let (_, signature) = split_call_id(&call.id);
                    let mut p = json!({"functionCall": {"name": call.function.name, "args": args}});
                    if let Some(sig) = signature {
                        p["thoughtSignature"] = json!(sig);
                    }
                    parts.push(p);
                    names.insert(call.id, call.function.name);
                }
                push_turn(&mut contents, "model", parts);
            }
            "tool" | "function" => {
                let name = m
                    .tool_call_id
                    .as_deref()
                    .and_then(|id| names.get(id).cloned())
                    .or(m.name)
                    .ok_or_else(|| {
                        bad(format!(
                            "A tool message's tool_call_id ({}) matches no earlier assistant tool call",
                            m.tool_call_id.as_deref().unwrap_or("missing")
                        ))
                        .with_param("messages")
                    })?;
                push_turn(
                    &mut contents,
                    "user",
                    vec![
                        json!({"functionResponse": {"name": name, "response": {"content": text_of(&m.content)}}}),
                    ],
                );
            }
            other => {
                return Err(bad(format!("Invalid message role: {other}")).with_param("messages"))
            }
        }
    }
    if contents.is_empty() && !system.is_empty() {
        // Gemini needs at least one content; a system-only conversation is sent as the user's.
        contents.push(json!({"role": "user", "parts": std::mem::take(&mut system)}));
    }
    Ok((system, contents))
}

/// A JSON Schema as Gemini's `Schema`: `$ref`s into `$defs` inlined, `type: [T, "null"]` as
/// `nullable`, `const` as a one-value `enum`, `oneOf` as `anyOf`, unknown keywords dropped.
fn clean_schema(schema: &Value) -> Value {
    let defs = schema
        .get("$defs")
        .or_else(|| schema.get("definitions"))
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    clean_schema_in(schema, &defs, 0)
}

fn clean_schema_in(schema: &Value, defs: &Map<String, Value>, depth: usize) -> Value {
    let Value::Object(obj) = schema else {
        return schema.clone();
    };
    if depth > 16 {
        // A recursive `$ref`: Gemini cannot express it; stop with an open object.
        return json!({"type": "object"});
    }
    if let Some(target) = obj
        .get("$ref")
        .and_then(Value::as_str)
        .and_then(|r| r.rsplit('/').next())
        .and_then(|name| defs.get(name))
    {
        return clean_schema_in(target, defs, depth + 1);
    }
    let mut out = Map::new();
    for (k, v) in obj {
        match k.as_str() {
            "properties" => {
                if let Value::Object(props) = v {
                    let props = props
                        .iter()
                        .map(|(name, s)| (name.clone(), clean_schema_in(s, defs, depth + 1)))
                        .collect();
                    out.insert(k.clone(), Value::Object(props));
                }
            }
            "items" => {
                out.insert(k.clone(), clean_schema_in(v, defs, depth + 1));
            }
            "anyOf" | "oneOf" => {
                if let Value::Array(list) = v {
                    let list = list
                        .iter()
                        .map(|s| clean_schema_in(s, defs, depth + 1))
                        .collect();
                    out.insert("anyOf".into(), Value::Array(list));
                }
            }
            "type" => match v {
                Value::Array(types) => {
                    let kept: Vec<&Value> = types.iter().filter(|t| *t != "null").collect();
                    if kept.len() < types.len() {
                        out.insert("nullable".into(), json!(true));
                    }
                    match kept.as_slice() {
                        [one] => {
                            out.insert("type".into(), (*one).clone());
                        }
                        [] => {}
                        many => {
                            let any: Vec<Value> = many.iter().map(|t| json!({"type": t})).collect();
                            out.insert("anyOf".into(), Value::Array(any));
                        }
                    }
                }
                other => {
                    out.insert(k.clone(), other.clone());
                }
            },
            "const" => {
                out.insert("enum".into(), json!([v]));
            }
            key if SCHEMA_KEYS.contains(&key) => {
                out.insert(k.clone(), v.clone());
            }
            _ => {}
        }
    }
    Value::Object(out)
}

/// One OpenAI function (the `function` of a tool, or a legacy `functions` entry) as a Gemini
/// function declaration.
fn function_declaration(f: &Value) -> Result<Value, ApiError> {
    let name = f
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("A tool has no name").with_param("tools"))?;
    let mut out = json!({"name": name});
    if let Some(d) = f.get("description") {
        out["description"] = d.clone();
    }
    if let Some(params) = f.get("parameters") {
        let params = clean_schema(params);
        // Gemini rejects an OBJECT schema without properties: a function without arguments
        // simply has no `parameters`.
        let empty_object = params.get("type").and_then(Value::as_str) == Some("object")
            && params
                .get("properties")
                .and_then(Value::as_object)
                .is_none_or(Map::is_empty);
        if !empty_object {
            out["parameters"] = params;
        }
    }
    Ok(out)
}

fn convert_tools(tools: Vec<Value>, functions: Vec<Value>) -> Result<Vec<Value>, ApiError> {
    let mut declarations = vec![];
    let mut native = vec![];
    for t in tools {
        if let Some(f) = t.get("function") {
            declarations.push(function_declaration(f)?);
        } else if t
            .as_object()
            .is_some_and(|o| o.keys().any(|k| NATIVE_TOOLS.contains(&k.as_str())))
        {
            native.push(t);
        } else {
            return Err(bad("Only function tools are supported").with_param("tools"));
        }
    }
    for f in &functions {
        declarations.push(function_declaration(f)?);
    }
    let mut out = vec![];
    if !declarations.is_empty() {
        out.push(json!({"functionDeclarations": declarations}));
    }
    out.extend(native);
    Ok(out)
}

fn convert_tool_choice(choice: &Value) -> Result<Option<Value>, ApiError> {
    let config = match choice {
        Value::String(s) if s == "auto" => json!({"mode": "AUTO"}),
        Value::String(s) if s == "none" => json!({"mode": "NONE"}),
        Value::String(s) if s == "required" || s == "any" => json!({"mode": "ANY"}),
        Value::Object(_) => match choice
            .pointer("/function/name")
            .or_else(|| choice.get("name"))
            .and_then(Value::as_str)
        {
            Some(name) => json!({"mode": "ANY", "allowedFunctionNames": [name]}),
            None => return Err(bad("tool_choice names no function").with_param("tool_choice")),
        },
        Value::Null => return Ok(None),
        other => return Err(bad(format!("Invalid tool_choice: {other}")).with_param("tool_choice")),
    };
    Ok(Some(json!({"functionCallingConfig": config})))
}

/// `reasoning_effort` (LiteLLM's budgets) or an Anthropic-style `thinking` as `thinkingConfig`.
fn thinking_config(body: &RequestBody<'_>) -> Result<Option<Value>, ApiError> {
    if let Some(effort) = parse_field::<String>(body, "reasoning_effort")? {
        let budget = match effort.as_str() {
            "none" | "disable" => return Ok(Some(json!({"thinkingBudget": 0}))),
            "minimal" => 128,
            "low" => 1024,
            "medium" => 2048,
            "high" => 4096,
            other => {
                return Err(bad(format!("Invalid reasoning_effort: {other}"))
                    .with_param("reasoning_effort"))
            }
        };
        return Ok(Some(
            json!({"thinkingBudget": budget, "includeThoughts": true}),
        ));
    }
    if let Some(thinking) = parse_field::<Value>(body, "thinking")? {
        if thinking.get("type").and_then(Value::as_str) == Some("disabled") {
            return Ok(Some(json!({"thinkingBudget": 0})));
        }
        let mut config = json!({"includeThoughts": true});
        if let Some(budget) = thinking.get("budget_tokens").and_then(Value::as_u64) {
            config["thinkingBudget"] = json!(budget);
        }
        return Ok(Some(config));
    }
    Ok(None)
}

/// Characters a model, project or location may hold: anything else could change the path.
fn path_safe(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-@".contains(&b))
}

fn provider_param<'a>(d: &'a Deployment, key: &str) -> Option<&'a str> {
    d.provider_params
        .get(key)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

/// The Vertex project: `vertex_project`, else the `project_id` of inline service-account
/// credentials.
fn vertex_project(d: &Deployment) -> Option<String> {
    if let Some(p) = provider_param(d, "vertex_project") {
        return Some(p.to_string());
    }
    let creds = match d.provider_params.get("vertex_credentials")? {
        Value::String(s) => serde_json::from_str::<Value>(s).ok()?,
        other => other.clone(),
    };
    creds
        .get("project_id")
        .and_then(Value::as_str)
        .map(str::to_string)
}

fn vertex_location(d: &Deployment) -> &str {
    provider_param(d, "vertex_location").unwrap_or(DEFAULT_VERTEX_LOCATION)
}

/// The host a Vertex deployment talks to: its `api_base`, else the regional endpoint of its
/// `vertex_location` (`aiplatform.googleapis.com` for `global`).
pub fn vertex_api_base(d: &Deployment) -> String {
    if let Some(base) = &d.api_base {
        return base.clone();
    }
    match vertex_location(d) {
        "global" => "https://aiplatform.googleapis.com".to_string(),
        loc => format!("https://{loc}-aiplatform.googleapis.com"),
    }
}

/// The path of `method` for a model, below the deployment's base.
fn model_path(d: &Deployment, model: &str, vertex: bool, method: &str) -> Result<String, ApiError> {
    let model = model.strip_prefix("models/").unwrap_or(model);
    if !path_safe(model) {
        return Err(bad(format!("Invalid Gemini model name: {model}")).with_param("model"));
    }
    if !vertex {
        return Ok(format!("/v1beta/models/{model}:{method}"));
    }
    let config_error = |msg: String| ApiError::new(500, "internal_server_error", msg);
    let project = vertex_project(d).ok_or_else(|| {
        config_error(format!(
            "vertex_ai deployment {} has no vertex_project",
            d.model_name
        ))
    })?;
    let location = vertex_location(d);
    if !path_safe(&project) || !path_safe(location) {
        return Err(config_error(format!(
            "vertex_ai deployment {} has an invalid vertex_project or vertex_location",
            d.model_name
        )));
    }
    Ok(format!(
        "/v1/projects/{project}/locations/{location}/publishers/google/models/{model}:{method}"
    ))
}

fn headers(d: &Deployment, vertex: bool) -> Vec<(String, String)> {
    let mut headers = Vec::with_capacity(1 + d.extra_headers.len());
    if !vertex {
        if let Some(key) = &d.api_key {
            headers.push(("x-goog-api-key".to_string(), key.clone()));
        }
    }
    headers.extend(d.extra_headers.iter().cloned());
    headers
}

fn check_unsupported(found: Vec<&str>, model: &str, opts: &CallOptions) -> Result<(), ApiError> {
    if !found.is_empty() && !opts.drop_params {
        return Err(unsupported_params("gemini", model, &found));
    }
    Ok(())
}

pub(super) fn build_request(
    op: Operation,
    body: &mut RequestBody<'_>,
    d: &Deployment,
    upstream_model: &str,
    stream: bool,
    opts: &CallOptions,
    vertex: bool,
) -> Result<UpstreamRequest, ApiError> {
    for (k, v) in &d.default_params {
        body.set_default(k, v.to_string());
    }
    match op {
        Operation::ChatCompletions => chat_request(body, d, upstream_model, stream, opts, vertex),
        Operation::Embeddings => embeddings_request(body, d, upstream_model, opts, vertex),
        Operation::Completions => Err(ApiError::new(
            400,
            "bad_request_error",
            format!(
                "gemini does not support {} (only chat completions and embeddings)",
                op.openai_path()
            ),
        )),
    }
}

fn chat_request(
    body: &mut RequestBody<'_>,
    d: &Deployment,
    upstream_model: &str,
    stream: bool,
    opts: &CallOptions,
    vertex: bool,
) -> Result<UpstreamRequest, ApiError> {
    let mut unsupported: Vec<&str> = UNSUPPORTED
        .iter()
        .copied()
        .filter(|p| body.contains(p))
        .collect();
    if body
        .raw("logprobs")
        .is_some_and(|r| r != "null" && r != "false")
    {
        unsupported.push("logprobs");
    }
    if parse_field::<bool>(body, "parallel_tool_calls")? == Some(false) {
        unsupported.push("parallel_tool_calls");
    }
    if let Some(modalities) = parse_field::<Vec<String>>(body, "modalities")? {
        if modalities.iter().any(|m| m != "text") {
            unsupported.push("modalities");
        }
    }
    check_unsupported(unsupported, upstream_model, opts)?;

    let messages: Vec<OpenAiMessage> = parse_field(body, "messages")?.unwrap_or_default();
    let (system, contents) = convert_messages(messages)?;
    let mut out = Map::new();
    out.insert("contents".into(), json!(contents));
    if !system.is_empty() {
        out.insert("systemInstruction".into(), json!({"parts": system}));
    }

    let mut config = Map::new();
    for (key, gemini) in [
        ("temperature", "temperature"),
        ("top_p", "topP"),
        ("top_k", "topK"),
        ("n", "candidateCount"),
        ("presence_penalty", "presencePenalty"),
        ("frequency_penalty", "frequencyPenalty"),
        ("seed", "seed"),
    ] {
        if let Some(v) = parse_field::<Value>(body, key)? {
            config.insert(gemini.into(), v);
        }
    }
    let max_tokens: Option<u64> = parse_field(body, "max_completion_tokens")?;
    if let Some(max) = max_tokens.or(parse_field(body, "max_tokens")?) {
        config.insert("maxOutputTokens".into(), json!(max));
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
        config.insert("stopSequences".into(), json!(list));
    }
    if let Some(format) = parse_field::<Value>(body, "response_format")? {
        match format.get("type").and_then(Value::as_str) {
            Some("json_object") => {
                config.insert("responseMimeType".into(), json!("application/json"));
            }
            Some("json_schema") => {
                config.insert("responseMimeType".into(), json!("application/json"));
                if let Some(schema) = format.pointer("/json_schema/schema") {
                    config.insert("responseSchema".into(), clean_schema(schema));
                }
            }
            Some("text") | None => {}
            Some(other) => {
                return Err(bad(format!("Unsupported response_format type: {other}"))
                    .with_param("response_format"))
            }
        }
    }
    if let Some(thinking) = thinking_config(body)? {
        config.insert("thinkingConfig".into(), thinking);
    }
    if !config.is_empty() {
        out.insert("generationConfig".into(), Value::Object(config));
    }

    let tools = convert_tools(
        parse_field(body, "tools")?.unwrap_or_default(),
        parse_field(body, "functions")?.unwrap_or_default(),
    )?;
    if !tools.is_empty() {
        out.insert("tools".into(), json!(tools));
    }
    if let Some(choice) = parse_field::<Value>(body, "tool_choice")? {
        if let Some(c) = convert_tool_choice(&choice)? {
            out.insert("toolConfig".into(), c);
        }
    }
    if let Some(safety) = parse_field::<Value>(body, "safety_settings")? {
        out.insert("safetySettings".into(), safety);
    }

    let method = if stream {
        "streamGenerateContent?alt=sse"
    } else {
        "generateContent"
    };
    Ok(UpstreamRequest {
        path: model_path(d, upstream_model, vertex, method)?,
        headers: headers(d, vertex),
        body: serde_json::to_vec(&Value::Object(out)).expect("json serializes"),
        injected_stream_usage: false,
    })
}

fn embeddings_request(
    body: &mut RequestBody<'_>,
    d: &Deployment,
    upstream_model: &str,
    opts: &CallOptions,
    vertex: bool,
) -> Result<UpstreamRequest, ApiError> {
    let encoding: Option<String> = parse_field(body, "encoding_format")?;
    let unsupported = if encoding.as_deref().is_some_and(|e| e != "float") {
        vec!["encoding_format"]
    } else {
        vec![]
    };
    check_unsupported(unsupported, upstream_model, opts)?;
    let input_error = || {
        bad("gemini embeddings take `input` as a string or a list of strings").with_param("input")
    };
    let texts: Vec<String> = match parse_field::<Value>(body, "input")? {
        Some(Value::String(s)) => vec![s],
        Some(Value::Array(items)) => items
            .into_iter()
            .map(|v| match v {
                Value::String(s) => Ok(s),
                _ => Err(input_error()),
            })
            .collect::<Result<_, _>>()?,
        _ => return Err(input_error()),
    };
    let dimensions: Option<u64> = parse_field(body, "dimensions")?;
    let model = upstream_model
        .strip_prefix("models/")
        .unwrap_or(upstream_model);
    let (method, out) = if vertex {
        let instances: Vec<Value> = texts.iter().map(|t| json!({"content": t})).collect();
        let mut out = json!({"instances": instances});
        if let Some(dims) = dimensions {
            out["parameters"] = json!({"outputDimensionality": dims});
        }
        ("predict", out)
    } else {
        let requests: Vec<Value> = texts
            .iter()
            .map(|t| {
                let mut r =
                    json!({"model": format!("models/{model}"), "content": {"parts": [{"text": t}]}});
                if let Some(dims) = dimensions {
                    r["outputDimensionality"] = json!(dims);
                }
                r
            })
            .collect();
        ("batchEmbedContents", json!({"requests": requests}))
    };
    Ok(UpstreamRequest {
        path: model_path(d, model, vertex, method)?,
        headers: headers(d, vertex),
        body: serde_json::to_vec(&out).expect("json serializes"),
        injected_stream_usage: false,
    })
}

/// Gemini's finish reason as OpenAI's; a stop after function calls is `tool_calls`.
fn finish_reason(reason: Option<&str>, has_tool_calls: bool) -> &'static str {
    match reason {
        Some("MAX_TOKENS") => "length",
        Some(
            "SAFETY" | "RECITATION" | "BLOCKLIST" | "PROHIBITED_CONTENT" | "SPII" | "IMAGE_SAFETY",
        ) => "content_filter",
        _ if has_tool_calls => "tool_calls",
        _ => "stop",
    }
}

#[derive(Deserialize, Default, Clone, Copy)]
#[serde(rename_all = "camelCase")]
struct GeminiUsage {
    #[serde(default)]
    prompt_token_count: u64,
    #[serde(default)]
    candidates_token_count: u64,
    #[serde(default)]
    total_token_count: Option<u64>,
    #[serde(default)]
    thoughts_token_count: u64,
    #[serde(default)]
    cached_content_token_count: u64,
}

impl GeminiUsage {
    fn from_response(v: &Value) -> Option<Self> {
        // Deserialized from the borrowed value: no copy of the tree per event.
        let u = GeminiUsage::deserialize(v.get("usageMetadata")?).ok()?;
        (u.total() > 0).then_some(u)
    }

    fn completion(&self) -> u64 {
        self.candidates_token_count + self.thoughts_token_count
    }

    fn total(&self) -> u64 {
        self.total_token_count
            .unwrap_or(self.prompt_token_count + self.completion())
    }

    fn openai(&self) -> Value {
        json!({
            "prompt_tokens": self.prompt_token_count,
            "completion_tokens": self.completion(),
            "total_tokens": self.total(),
            "prompt_tokens_details": {"cached_tokens": self.cached_content_token_count},
            "completion_tokens_details": {"reasoning_tokens": self.thoughts_token_count},
        })
    }

    fn usage(&self) -> Usage {
        Usage {
            prompt_tokens: self.prompt_token_count,
            completion_tokens: self.completion(),
            total_tokens: self.total(),
        }
    }
}

/// An id for a response that carries no `responseId` (Vertex before 2025, some proxies).
fn fallback_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("chatcmpl-{nanos:x}")
}

fn response_id(v: &Value) -> Option<String> {
    v.get("responseId")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

/// OpenAI tool call `n` of a choice for a Gemini `functionCall` part.
fn tool_call_id(n: usize, part: &Value) -> String {
    match part.get("thoughtSignature").and_then(Value::as_str) {
        Some(sig) if !sig.is_empty() => format!("call_{n}{THOUGHT_SEP}{sig}"),
        _ => format!("call_{n}"),
    }
}

fn function_call(part: &Value) -> Option<(&str, String)> {
    let call = part.get("functionCall")?;
    let name = call.get("name").and_then(Value::as_str).unwrap_or("");
    let args = call
        .get("args")
        .filter(|a| !a.is_null())
        .map(Value::to_string)
        .unwrap_or_else(|| "{}".to_string());
    Some((name, args))
}

fn is_thought(part: &Value) -> bool {
    part.get("thought").and_then(Value::as_bool) == Some(true)
}

fn malformed(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(
        502,
        "internal_server_error",
        format!("litellm.APIError: GeminiException - malformed response: {e}"),
    )
}

/// A whole `generateContent` (or embeddings) response in OpenAI's shape.
pub(super) fn translate_response(
    op: Operation,
    body: &[u8],
    model: &str,
) -> Result<(Vec<u8>, Option<Usage>), ApiError> {
    let v: Value = serde_json::from_slice(body).map_err(malformed)?;
    if op == Operation::Embeddings {
        return translate_embeddings(&v, model);
    }
    let usage = GeminiUsage::from_response(&v);
    let candidates = v
        .get("candidates")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let mut choices = Vec::with_capacity(candidates.len().max(1));
    for (pos, c) in candidates.iter().enumerate() {
        let mut text = String::new();
        let mut reasoning = String::new();
        let mut tool_calls = vec![];
        let parts = c
            .pointer("/content/parts")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default();
        for p in parts {
            if let Some((name, args)) = function_call(p) {
                tool_calls.push(json!({
                    "id": tool_call_id(tool_calls.len(), p),
                    "type": "function",
                    "function": {"name": name, "arguments": args},
                }));
            } else if let Some(t) = p.get("text").and_then(Value::as_str) {
                if is_thought(p) {
                    reasoning.push_str(t);
                } else {
                    text.push_str(t);
                }
            }
        }
        let finish = finish_reason(
            c.get("finishReason").and_then(Value::as_str),
            !tool_calls.is_empty(),
        );
        let mut message = json!({
            "role": "assistant",
            "content": if text.is_empty() && !tool_calls.is_empty() { Value::Null } else { json!(text) },
        });
        if !tool_calls.is_empty() {
            message["tool_calls"] = json!(tool_calls);
        }
        if !reasoning.is_empty() {
            message["reasoning_content"] = json!(reasoning);
        }
        choices.push(json!({
            "index": c.get("index").and_then(Value::as_u64).unwrap_or(pos as u64),
            "message": message,
            "finish_reason": finish,
        }));
    }
    if choices.is_empty() {
        // No candidates: the prompt itself was blocked (`promptFeedback.blockReason`).
        let blocked = v.pointer("/promptFeedback/blockReason").is_some();
        choices.push(json!({
            "index": 0,
            "message": {"role": "assistant", "content": ""},
            "finish_reason": if blocked { "content_filter" } else { "stop" },
        }));
    }
    let out = json!({
        "id": response_id(&v).unwrap_or_else(fallback_id),
        "object": "chat.completion",
        "created": now(),
        "model": model,
        "choices": choices,
        "usage": usage.unwrap_or_default().openai(),
    });
    Ok((
        serde_json::to_vec(&out).expect("json serializes"),
        usage.map(|u| u.usage()),
    ))
}

/// `batchEmbedContents` (`embeddings[].values`) or Vertex `predict`
/// (`predictions[].embeddings.values` with token statistics) as an OpenAI embedding list.
fn translate_embeddings(v: &Value, model: &str) -> Result<(Vec<u8>, Option<Usage>), ApiError> {
    let mut data = vec![];
    let mut tokens: Option<u64> = None;
    if let Some(list) = v.get("embeddings").and_then(Value::as_array) {
        for (i, e) in list.iter().enumerate() {
            let values = e
                .get("values")
                .ok_or_else(|| malformed("embedding without values"))?;
            data.push(json!({"object": "embedding", "index": i, "embedding": values}));
        }
        tokens = v
            .pointer("/usageMetadata/promptTokenCount")
            .and_then(Value::as_u64);
    } else if let Some(list) = v.get("predictions").and_then(Value::as_array) {
        for (i, p) in list.iter().enumerate() {
            let values = p
                .pointer("/embeddings/values")
                .ok_or_else(|| malformed("prediction without embeddings.values"))?;
            data.push(json!({"object": "embedding", "index": i, "embedding": values}));
            if let Some(n) = p
                .pointer("/embeddings/statistics/token_count")
                .and_then(Value::as_f64)
            {
                *tokens.get_or_insert(0) += n as u64;
            }
        }
    } else {
        return Err(malformed("no embeddings or predictions"));
    }
    let prompt = tokens.unwrap_or(0);
    let out = json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": prompt, "total_tokens": prompt},
    });
    Ok((
        serde_json::to_vec(&out).expect("json serializes"),
        tokens.map(|t| Usage {
            prompt_tokens: t,
            completion_tokens: 0,
            total_tokens: t,
        }),
    ))
}

/// Turns Gemini's SSE stream (`data: {GenerateContentResponse}` per event, no terminator) into
/// OpenAI `chat.completion.chunk` events, for any chunking of the input.
#[derive(Default)]
pub struct GeminiStream {
    splitter: SseSplitter,
    id: String,
    model: String,
    created: u64,
    /// The fixed chunk envelope, rebuilt once the response id is known.
    writer: ChunkWriter,
    usage: Option<GeminiUsage>,
    /// Candidates seen so far: (choice index, tool calls sent for it).
    choices: Vec<(u64, usize)>,
    include_usage: bool,
    started: bool,
    finished: bool,
}

impl GeminiStream {
    pub fn new(model: &str, include_usage: bool) -> Self {
        let (id, created) = (fallback_id(), now());
        GeminiStream {
            writer: ChunkWriter::new(&id, created, model),
            id,
            model: model.to_string(),
            created,
            include_usage,
            ..Default::default()
        }
    }

    pub fn usage(&self) -> Option<Usage> {
        self.usage.map(|u| u.usage())
    }

    pub fn feed(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        let mut splitter = std::mem::take(&mut self.splitter);
        splitter.feed(chunk, |event| self.event(event, out));
        self.splitter = splitter;
    }

    /// Flushes the end of the stream: Gemini sends no terminator, so this is where the usage
    /// chunk and `[DONE]` go out.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        let mut splitter = std::mem::take(&mut self.splitter);
        splitter.finish(|event| self.event(event, out));
        self.splitter = splitter;
        self.end(out);
    }

    fn chunk(&self, index: u64, delta: Value, finish: Option<&str>, out: &mut Vec<u8>) {
        self.writer.delta(out, index, &delta, finish);
    }

    /// The slot of a candidate, sending its role chunk the first time it is seen.
    fn choice(&mut self, index: u64, out: &mut Vec<u8>) -> usize {
        if let Some(slot) = self.choices.iter().position(|(i, _)| *i == index) {
            return slot;
        }
        self.chunk(
            index,
            json!({"role": "assistant", "content": ""}),
            None,
            out,
        );
        self.choices.push((index, 0));
        self.choices.len() - 1
    }

    fn event(&mut self, event: &[u8], out: &mut Vec<u8>) {
        if self.finished {
            return;
        }
        let Some(data) = event_data(event) else {
            return;
        };
        let Ok(v) = serde_json::from_slice::<Value>(data) else {
            return;
        };
        if let Some(e) = v.get("error") {
            let err = json!({"error": {
                "message": format!("litellm.APIError: GeminiException - {}", e["message"].as_str().unwrap_or("stream error")),
                "type": e["status"].as_str().unwrap_or("api_error"),
                "param": null,
                "code": e["code"].as_u64().map_or_else(|| "500".to_string(), |c| c.to_string()),
            }});
            out.extend_from_slice(format!("data: {err}\n\n").as_bytes());
            self.end(out);
            return;
        }
        if !self.started {
            self.started = true;
            if let Some(id) = response_id(&v) {
                self.id = id;
                self.writer = ChunkWriter::new(&self.id, self.created, &self.model);
            }
        }
        if let Some(u) = GeminiUsage::from_response(&v) {
            self.usage = Some(u);
        }
        let candidates = v
            .get("candidates")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default();
        for (pos, c) in candidates.iter().enumerate() {
            let index = c.get("index").and_then(Value::as_u64).unwrap_or(pos as u64);
            let slot = self.choice(index, out);
            let parts = c
                .pointer("/content/parts")
                .and_then(Value::as_array)
                .map(Vec::as_slice)
                .unwrap_or_default();
            for p in parts {
                if let Some((name, args)) = function_call(p) {
                    let n = self.choices[slot].1;
                    self.choices[slot].1 += 1;
                    self.chunk(
                        index,
                        json!({"tool_calls": [{
                            "index": n,
                            "id": tool_call_id(n, p),
                            "type": "function",
                            "function": {"name": name, "arguments": args},
                        }]}),
                        None,
                        out,
                    );
                } else if let Some(t) = p.get("text").and_then(Value::as_str) {
                    if t.is_empty() {
                        continue;
                    }
                    let key = if is_thought(p) {
                        "reasoning_content"
                    } else {
                        "content"
                    };
                    self.chunk(index, json!({ key: t }), None, out);
                }
            }
            if let Some(reason) = c.get("finishReason").and_then(Value::as_str) {
                let finish = finish_reason(Some(reason), self.choices[slot].1 > 0);
                self.chunk(index, json!({}), Some(finish), out);
            }
        }
        if candidates.is_empty() && v.pointer("/promptFeedback/blockReason").is_some() {
            self.choice(0, out);
            self.chunk(0, json!({}), Some("content_filter"), out);
        }
    }

    fn end(&mut self, out: &mut Vec<u8>) {
        if self.finished {
            return;
        }
        self.finished = true;
        if self.include_usage {
            self.writer
                .usage(out, &self.usage.unwrap_or_default().openai());
        }
        out.extend_from_slice(b"data: [DONE]\n\n");
    }
}

fn contains_ci(hay: &[u8], needle: &str) -> bool {
    let needle = needle.as_bytes();
    hay.windows(needle.len())
        .any(|w| w.eq_ignore_ascii_case(needle))
}

fn contains(hay: &[u8], needle: &str) -> bool {
    memchr::memmem::find(hay, needle.as_bytes()).is_some()
}

/// What a Gemini or Vertex error response means for routing. Google answers a bad API key
/// with a 400 (`API_KEY_INVALID`), quota errors carry `RESOURCE_EXHAUSTED`, and an oversized
/// prompt says "exceeds the maximum number of tokens" (Gemini) or "input token count"
/// (Vertex).
pub(super) fn classify_error(status: u16, body: &[u8]) -> FailureKind {
    let scan = &body[..body.len().min(16 * 1024)];
    if contains(scan, "RESOURCE_EXHAUSTED") {
        return FailureKind::RateLimit;
    }
    if (400..500).contains(&status) && status != 429 {
        if contains(scan, "API_KEY_INVALID") || contains_ci(scan, "API key not valid") {
            return FailureKind::Auth;
        }
        if contains_ci(scan, "exceeds the maximum number of tokens")
            || contains_ci(scan, "input token count")
        {
            return FailureKind::ContextWindowExceeded;
        }
        if contains(scan, "\"SAFETY\"")
            || contains(scan, "PROHIBITED_CONTENT")
            || contains(scan, "blockReason")
            || contains_ci(scan, "blocked due to safety")
        {
            return FailureKind::ContentPolicy;
        }
    }
    classify_status(status, body)
}

#[cfg(test)]
mod tests;
