//! Ollama's native API: `/api/chat` for chat (both `ollama/` and `ollama_chat/`), `/api/generate`
//! for text completions, `/api/embed` for embeddings. Sampling parameters go under `options`;
//! streams are NDJSON, one object per line, the last with `done: true` and the token counts.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};
use sluice_config::Deployment;

use super::common::{
    bearer_request, now, object_fields, plain_u64, raw_value, read_messages, string_text,
    usage_json, utf8, write_json, write_text_completion, ChunkWriter, InContent, InImageUrl,
    InMessage, Text, TextChoice,
};
use super::{unsupported_params, CallOptions, Operation, UpstreamRequest};
use crate::body::RequestBody;
use crate::error::ApiError;
use crate::usage::Usage;

const UNSUPPORTED: &[&str] = &[
    "logit_bias",
    "logprobs",
    "top_logprobs",
    "n",
    "parallel_tool_calls",
];

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
    let mut out = Map::new();
    out.insert("model".into(), json!(upstream_model));
    if op == Operation::Embeddings {
        let input = raw_value(body, "input")?.unwrap_or(Value::Null);
        out.insert("input".into(), input);
        return Ok(finish(d, "/api/embed", out));
    }
    let unsupported: Vec<&str> = UNSUPPORTED
        .iter()
        .copied()
        .filter(|p| body.contains(p) && !(*p == "n" && body.raw("n") == Some("1")))
        .collect();
    if !unsupported.is_empty() && !opts.drop_params {
        return Err(unsupported_params("ollama", upstream_model, &unsupported));
    }
    // Ollama streams unless told otherwise.
    out.insert("stream".into(), json!(stream));
    let mut options = Map::new();
    for (from, to) in [
        ("temperature", "temperature"),
        ("top_p", "top_p"),
        ("top_k", "top_k"),
        ("seed", "seed"),
        ("frequency_penalty", "frequency_penalty"),
        ("presence_penalty", "presence_penalty"),
        ("repetition_penalty", "repeat_penalty"),
        ("max_tokens", "num_predict"),
        ("max_completion_tokens", "num_predict"),
        ("num_ctx", "num_ctx"),
    ] {
        if let Some(v) = raw_value(body, from)? {
            options.insert(to.into(), v);
        }
    }
    if let Some(stop) = raw_value(body, "stop")? {
        options.insert(
            "stop".into(),
            if stop.is_string() {
                json!([stop])
            } else {
                stop
            },
        );
    }
    if !options.is_empty() {
        out.insert("options".into(), Value::Object(options));
    }
    if let Some(f) = raw_value(body, "response_format")? {
        match f["type"].as_str() {
            Some("json_object") => {
                out.insert("format".into(), json!("json"));
            }
            Some("json_schema") => {
                out.insert(
                    "format".into(),
                    f.pointer("/json_schema/schema")
                        .cloned()
                        .unwrap_or(json!("json")),
                );
            }
            _ => {}
        }
    }
    let path = if op == Operation::Completions {
        let prompt = match raw_value(body, "prompt")? {
            Some(Value::String(s)) => s,
            Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
                a[0].as_str().unwrap_or("").to_string()
            }
            other => {
                return Err(ApiError::bad_request(format!(
                    "ollama takes one string prompt, got {}",
                    other.unwrap_or(Value::Null)
                ))
                .with_param("prompt"))
            }
        };
        out.insert("prompt".into(), json!(prompt));
        "/api/generate"
    } else {
        let raw_messages = body.raw("messages").unwrap_or("[]");
        let messages = read_messages(raw_messages)?;
        let mut converted = Vec::with_capacity(messages.len());
        for m in &messages {
            converted.push(ollama_message(raw_messages, m)?);
        }
        let tools = body.raw("tools").filter(|t| *t != "null");
        // One pass into one buffer: the small fields (`out`, never empty: it has the model),
        // then the messages, written directly, and the client's tools as they came.
        let mut bytes = Vec::with_capacity(raw_messages.len() + tools.map_or(0, str::len) + 256);
        bytes.push(b'{');
        for (k, v) in &out {
            write_json(&mut bytes, k);
            bytes.push(b':');
            write_json(&mut bytes, v);
            bytes.push(b',');
        }
        bytes.extend_from_slice(b"\"messages\":");
        let at = bytes.len();
        bytes.push(b'[');
        for (i, m) in converted.iter().enumerate() {
            if i > 0 {
                bytes.push(b',');
            }
            m.write(&mut bytes);
        }
        bytes.push(b']');
        debug_assert_eq!(
            String::from_utf8_lossy(&bytes[at..]),
            serde_json::to_string(&converted).expect("json serializes"),
            "the hand-written messages are serde_json's"
        );
        if let Some(tools) = tools {
            bytes.extend_from_slice(b",\"tools\":");
            bytes.extend_from_slice(tools.as_bytes());
        }
        bytes.push(b'}');
        return Ok(bearer_request(d, "/api/chat", bytes));
    };
    Ok(finish(d, path, out))
}

/// One OpenAI message as Ollama's: text content, base64 images, tool calls with object arguments.
#[derive(Serialize)]
struct OllamaMessage<'a> {
    role: &'a str,
    content: Text<'a>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    images: Vec<&'a str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tool_calls: Vec<OllamaToolCall<'a>>,
}

impl OllamaMessage<'_> {
    /// Appends the message as serde_json writes it (the content token copied where it can be).
    fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"role\":");
        write_json(out, self.role);
        out.extend_from_slice(b",\"content\":");
        self.content.write(out);
        if !self.images.is_empty() {
            out.extend_from_slice(b",\"images\":");
            write_json(out, &self.images);
        }
        if !self.tool_calls.is_empty() {
            out.extend_from_slice(b",\"tool_calls\":");
            write_json(out, &self.tool_calls);
        }
        out.push(b'}');
    }
}

#[derive(Serialize)]
struct OllamaToolCall<'a> {
    function: OllamaFunction<'a>,
}

#[derive(Serialize)]
struct OllamaFunction<'a> {
    name: &'a str,
    arguments: Box<RawValue>,
}

/// `m` was read from `src`, the client's `messages` JSON (whose string tokens are copied through
/// where serde_json would write them the same, see [`text`]).
fn ollama_message<'a>(src: &'a str, m: &'a InMessage<'a>) -> Result<OllamaMessage<'a>, ApiError> {
    let (content, images) = match &m.content {
        None => (Text::Str(Cow::Borrowed("")), vec![]),
        Some(InContent::Parts(parts)) => {
            let mut text = String::new();
            let mut images = vec![];
            for p in parts {
                match p.kind.as_ref() {
                    "text" => text.push_str(p.text.as_deref().unwrap_or("")),
                    "image_url" => {
                        let url = match &p.image_url {
                            Some(InImageUrl::Object { url }) | Some(InImageUrl::Url(url)) => url,
                            None => continue,
                        };
                        if let Some((_, data)) = url.split_once(";base64,") {
                            images.push(data);
                        }
                    }
                    _ => {}
                }
            }
            (Text::Str(Cow::Owned(text)), images)
        }
        Some(content) => (
            content.as_text(src).unwrap_or(Text::Str(Cow::Borrowed(""))),
            vec![],
        ),
    };
    let mut tool_calls = vec![];
    for c in m.tool_calls.iter().flatten() {
        // Ollama takes arguments as an object, not a JSON string.
        let args = c.function.arguments.trim();
        let arguments = RawValue::from_string(if args.is_empty() {
            "{}".into()
        } else {
            args.to_string()
        })
        .unwrap_or_else(|_| RawValue::from_string("{}".into()).expect("valid JSON"));
        tool_calls.push(OllamaToolCall {
            function: OllamaFunction {
                name: &c.function.name,
                arguments,
            },
        });
    }
    Ok(OllamaMessage {
        role: &m.role,
        content,
        images,
        tool_calls,
    })
}

fn finish(d: &Deployment, path: &str, body: Map<String, Value>) -> UpstreamRequest {
    bearer_request(
        d,
        path,
        serde_json::to_vec(&Value::Object(body)).expect("json serializes"),
    )
}

#[derive(Deserialize, Default)]
struct OllamaReply {
    #[serde(default)]
    message: Option<Value>,
    #[serde(default)]
    response: Option<String>,
    #[serde(default)]
    done: bool,
    #[serde(default)]
    done_reason: Option<String>,
    #[serde(default)]
    prompt_eval_count: u64,
    #[serde(default)]
    eval_count: u64,
    #[serde(default)]
    embeddings: Option<Vec<Vec<f64>>>,
    #[serde(default)]
    error: Option<String>,
}

fn usage_of(r: &OllamaReply) -> Usage {
    Usage {
        prompt_tokens: r.prompt_eval_count,
        completion_tokens: r.eval_count,
        total_tokens: r.prompt_eval_count + r.eval_count,
    }
}

fn tool_calls(message: &Value) -> Vec<Value> {
    message["tool_calls"]
        .as_array()
        .map(|calls| {
            calls
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    json!({
                        "id": format!("call_{i}"),
                        "type": "function",
                        "function": {
                            "name": c.pointer("/function/name"),
                            "arguments": c.pointer("/function/arguments").map(|a| if a.is_string() { a.as_str().unwrap_or("").to_string() } else { a.to_string() }).unwrap_or_default(),
                        },
                    })
                })
                .collect()
        })
        .unwrap_or_default()
}

fn finish_reason(r: &OllamaReply, has_tools: bool) -> &'static str {
    if has_tools {
        return "tool_calls";
    }
    match r.done_reason.as_deref() {
        Some("length") => "length",
        _ => "stop",
    }
}

pub(super) fn translate_response(
    op: Operation,
    body: &[u8],
    model: &str,
) -> Result<(Vec<u8>, Option<Usage>), ApiError> {
    if op == Operation::ChatCompletions {
        if let Some(translated) = text_chat(body, model) {
            return Ok(translated);
        }
    }
    reply_response(op, body, model)
}

/// A chat reply without tool calls read with the body's scanner and written directly, its
/// content token copied through. `None` leaves the reply to [`reply_response`]: tool calls,
/// and anything unusual (any field [`OllamaReply`] reads but does not expect in a chat reply).
fn text_chat(body: &[u8], model: &str) -> Option<(Vec<u8>, Option<Usage>)> {
    let src = utf8(body)?;
    let (mut message, mut length, mut usage) = (None, false, Usage::default());
    object_fields(src, |key, value, escaped| match key {
        "message" => {
            message = Some(value);
            Some(1)
        }
        "done" if value == "true" || value == "false" => Some(2),
        "done_reason" if value == "null" => Some(4),
        "done_reason" if !escaped && value.starts_with('"') => {
            length = value == "\"length\"";
            Some(4)
        }
        "prompt_eval_count" => {
            usage.prompt_tokens = plain_u64(value)?;
            Some(8)
        }
        "eval_count" => {
            usage.completion_tokens = plain_u64(value)?;
            Some(16)
        }
        "done" | "done_reason" | "response" | "embeddings" | "error" => None,
        _ => Some(0),
    })?;
    usage.total_tokens = usage.prompt_tokens + usage.completion_tokens;
    let mut content = Text::Str(Cow::Borrowed(""));
    object_fields(message?, |key, value, escaped| match key {
        "content" if value.starts_with('"') => {
            content = string_text(value, escaped)?;
            Some(1)
        }
        // What the reply path writes for content that is not a string.
        "content" => Some(1),
        "tool_calls" => None,
        _ => Some(0),
    })?;
    let choice = TextChoice {
        index: 0,
        content,
        finish_reason: if length { "length" } else { "stop" },
    };
    let id = Text::Str(Cow::Owned(format!("chatcmpl-{}", now())));
    let mut out = Vec::with_capacity(body.len() + 256);
    write_text_completion(&mut out, &id, model, &[choice], &usage_json(&usage));
    Some((out, Some(usage)))
}

/// [`translate_response`] for any reply, read as an [`OllamaReply`].
fn reply_response(
    op: Operation,
    body: &[u8],
    model: &str,
) -> Result<(Vec<u8>, Option<Usage>), ApiError> {
    let r: OllamaReply = serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            502,
            "internal_server_error",
            format!("litellm.APIError: OllamaException - malformed response: {e}"),
        )
    })?;
    let usage = usage_of(&r);
    let out = match op {
        Operation::Embeddings => {
            let data: Vec<Value> = r
                .embeddings
                .unwrap_or_default()
                .into_iter()
                .enumerate()
                .map(|(i, e)| json!({"object": "embedding", "index": i, "embedding": e}))
                .collect();
            json!({"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": usage.prompt_tokens, "total_tokens": usage.prompt_tokens}})
        }
        Operation::Completions => json!({
            "id": format!("cmpl-{}", now()),
            "object": "text_completion",
            "created": now(),
            "model": model,
            "choices": [{"index": 0, "text": r.response.clone().unwrap_or_default(), "logprobs": null, "finish_reason": finish_reason(&r, false)}],
            "usage": usage_json(&usage),
        }),
        Operation::ChatCompletions => {
            let message = r.message.clone().unwrap_or_else(|| json!({}));
            let calls = tool_calls(&message);
            let mut m =
                json!({"role": "assistant", "content": message["content"].as_str().unwrap_or("")});
            if !calls.is_empty() {
                m["tool_calls"] = json!(calls);
            }
            json!({
                "id": format!("chatcmpl-{}", now()),
                "object": "chat.completion",
                "created": now(),
                "model": model,
                "choices": [{"index": 0, "message": m, "finish_reason": finish_reason(&r, !calls.is_empty())}],
                "usage": usage_json(&usage),
            })
        }
    };
    Ok((
        serde_json::to_vec(&out).expect("json serializes"),
        Some(usage),
    ))
}

/// NDJSON → OpenAI chunks, for any chunking of the input.
#[derive(Default)]
pub struct OllamaStream {
    pending: Vec<u8>,
    /// The stream's fixed chunk envelope (id, object, created, model).
    writer: ChunkWriter,
    chat: bool,
    include_usage: bool,
    started: bool,
    usage: Option<Usage>,
    finished: bool,
}

impl OllamaStream {
    pub fn new(model: &str, include_usage: bool, chat: bool) -> Self {
        let created = now();
        let id = format!("chatcmpl-ollama-{created}");
        let object = if chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        OllamaStream {
            writer: ChunkWriter::with_object(&id, created, model, object),
            chat,
            include_usage,
            ..Default::default()
        }
    }

    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }

    pub fn feed(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        // Whole lines are read where they lie; only a partial line is kept for the next chunk.
        if self.pending.is_empty() {
            let used = self.lines(chunk, out);
            self.pending.extend_from_slice(&chunk[used..]);
        } else {
            let mut data = std::mem::take(&mut self.pending);
            data.extend_from_slice(chunk);
            let used = self.lines(&data, out);
            data.drain(..used);
            self.pending = data;
        }
    }

    /// Handles every complete line (newline included) of `data`; the bytes used.
    fn lines(&mut self, data: &[u8], out: &mut Vec<u8>) -> usize {
        let mut start = 0;
        while let Some(at) = memchr::memchr(b'\n', &data[start..]) {
            self.line(&data[start..=start + at], out);
            start += at + 1;
        }
        start
    }

    pub fn finish(&mut self, out: &mut Vec<u8>) {
        let rest = std::mem::take(&mut self.pending);
        self.line(&rest, out);
        self.end(out);
    }

    fn emit(&self, choice: Value, out: &mut Vec<u8>) {
        self.writer.choice(out, &choice);
    }

    fn line(&mut self, line: &[u8], out: &mut Vec<u8>) {
        if line.iter().all(u8::is_ascii_whitespace) || self.finished {
            return;
        }
        if self.chat && self.started && self.content_line(line, out).is_some() {
            return;
        }
        self.reply_line(line, out);
    }

    /// A chat line that only carries content (all but the last, as a rule), read with the
    /// body's scanner and written directly. `None`, with nothing written, leaves the line to
    /// [`Self::reply_line`]: the last line, tool calls, errors, and anything unusual (any
    /// field that [`OllamaReply`] reads other than `message` and `done: false`).
    fn content_line(&mut self, line: &[u8], out: &mut Vec<u8>) -> Option<()> {
        let src = utf8(line)?;
        let mut message = None;
        object_fields(src, |key, value, _| match key {
            "message" => {
                message = Some(value);
                Some(1)
            }
            "done" if value == "false" => Some(2),
            "response" | "done" | "done_reason" | "prompt_eval_count" | "eval_count"
            | "embeddings" | "error" => None,
            _ => Some(0),
        })?;
        let mut content = None;
        object_fields(message?, |key, value, escaped| match key {
            "content" => {
                content = Some((value, escaped));
                Some(1)
            }
            "tool_calls" => None,
            _ => Some(0),
        })?;
        let (content, escaped) = content?;
        if content == "\"\"" {
            return Some(());
        }
        let content = string_text(content, escaped)?;
        // As `emit` writes the choice: serde_json sorts an object's keys.
        self.writer.open_choice(out);
        out.extend_from_slice(b"{\"delta\":{\"content\":");
        content.write(out);
        out.extend_from_slice(b"},\"finish_reason\":null,\"index\":0}");
        ChunkWriter::close_choice(out);
        Some(())
    }

    /// Any line, read as an [`OllamaReply`].
    fn reply_line(&mut self, line: &[u8], out: &mut Vec<u8>) {
        let Ok(r) = serde_json::from_slice::<OllamaReply>(line) else {
            return;
        };
        if let Some(e) = &r.error {
            let err = json!({"error": {"message": format!("litellm.APIError: OllamaException - {e}"), "type": "api_error", "param": null, "code": "500"}});
            out.extend_from_slice(format!("data: {err}\n\n").as_bytes());
            self.end(out);
            return;
        }
        if self.chat {
            if !self.started {
                self.started = true;
                self.emit(json!({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}), out);
            }
            let message = r.message.clone().unwrap_or_else(|| json!({}));
            if let Some(text) = message["content"].as_str().filter(|t| !t.is_empty()) {
                self.emit(
                    json!({"index": 0, "delta": {"content": text}, "finish_reason": null}),
                    out,
                );
            }
            let calls = tool_calls(&message);
            if !calls.is_empty() {
                let indexed: Vec<Value> = calls
                    .into_iter()
                    .enumerate()
                    .map(|(i, mut c)| {
                        c["index"] = json!(i);
                        c
                    })
                    .collect();
                self.emit(
                    json!({"index": 0, "delta": {"tool_calls": indexed}, "finish_reason": null}),
                    out,
                );
            }
            if r.done {
                let has_tools = message["tool_calls"].is_array();
                self.emit(
                    json!({"index": 0, "delta": {}, "finish_reason": finish_reason(&r, has_tools)}),
                    out,
                );
            }
        } else {
            let text = r.response.clone().unwrap_or_default();
            let finish = r.done.then(|| finish_reason(&r, false));
            if !text.is_empty() || finish.is_some() {
                self.emit(
                    json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish}),
                    out,
                );
            }
        }
        if r.done {
            self.usage = Some(usage_of(&r));
            self.end(out);
        }
    }

    fn end(&mut self, out: &mut Vec<u8>) {
        if self.finished {
            return;
        }
        self.finished = true;
        if self.include_usage {
            if let Some(u) = self.usage {
                self.writer.usage(out, &usage_json(&u));
            }
        }
        out.extend_from_slice(b"data: [DONE]\n\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn deployment() -> Deployment {
        sluice_config::parse_config(
            "model_list: [{model_name: g, litellm_params: {model: ollama_chat/llama3}}]",
            Path::new("t.yaml"),
        )
        .unwrap()
        .deployments[0]
            .clone()
    }

    #[test]
    fn chat_request_puts_sampling_under_options() {
        let mut body = RequestBody::parse(br#"{"model":"g","messages":[{"role":"user","content":"hi"}],"temperature":0.1,"max_tokens":9,"stop":"x","response_format":{"type":"json_object"}}"#).unwrap();
        let req = build_request(
            Operation::ChatCompletions,
            &mut body,
            &deployment(),
            "llama3",
            false,
            &CallOptions::default(),
        )
        .unwrap();
        assert_eq!(req.path, "/api/chat");
        let v: Value = serde_json::from_slice(&req.body).unwrap();
        assert_eq!(v["stream"], false);
        assert_eq!(
            v["options"],
            json!({"temperature": 0.1, "num_predict": 9, "stop": ["x"]})
        );
        assert_eq!(v["format"], "json");
        assert_eq!(v["messages"][0], json!({"role": "user", "content": "hi"}));
    }

    #[test]
    fn response_and_ndjson_stream() {
        let body = br#"{"model":"llama3","created_at":"2024-01-01T00:00:00Z","message":{"role":"assistant","content":"Hello!"},"done":true,"done_reason":"stop","prompt_eval_count":26,"eval_count":3}"#;
        let (out, usage) = translate_response(Operation::ChatCompletions, body, "llama3").unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["choices"][0]["message"]["content"], "Hello!");
        assert_eq!(usage.unwrap().total_tokens, 29);

        let stream = b"{\"message\":{\"role\":\"assistant\",\"content\":\"He\"},\"done\":false}\n{\"message\":{\"role\":\"assistant\",\"content\":\"llo\"},\"done\":false}\n{\"message\":{\"role\":\"assistant\",\"content\":\"\"},\"done\":true,\"done_reason\":\"stop\",\"prompt_eval_count\":4,\"eval_count\":2}\n";
        let mut reference: Option<String> = None;
        for split in 1..stream.len() {
            let mut s = OllamaStream::new("llama3", true, true);
            let mut out = vec![];
            for c in stream.chunks(split) {
                s.feed(c, &mut out);
            }
            s.finish(&mut out);
            let text = String::from_utf8(out).unwrap();
            let deltas: String = text
                .split("\n\n")
                .filter_map(|e| e.strip_prefix("data: "))
                .filter(|d| *d != "[DONE]")
                .filter_map(|d| serde_json::from_str::<Value>(d).ok())
                .filter_map(|v| {
                    v["choices"][0]["delta"]["content"]
                        .as_str()
                        .map(str::to_string)
                })
                .collect();
            assert_eq!(deltas, "Hello");
            assert!(text.ends_with("data: [DONE]\n\n"));
            assert!(text.contains("\"total_tokens\":6"));
            // Splits may straddle a second; compare without the timestamps.
            let strip_after = |text: &str, marker: &str| -> String {
                text.split(marker)
                    .map(|part| part.trim_start_matches(|c: char| c.is_ascii_digit()))
                    .collect::<Vec<_>>()
                    .join(marker)
            };
            let normalized = strip_after(&strip_after(&text, "\"created\":"), "chatcmpl-ollama-");
            match &reference {
                None => reference = Some(normalized),
                Some(r) => assert_eq!(r, &normalized, "split {split}"),
            }
        }
    }

    #[test]
    fn content_lines_are_written_as_the_reply_path_writes_them() {
        let input = br#"{"model":"m","message":{"role":"assistant","content":"first"},"done":false}
{"model":"m","created_at":"2025-06-05T14:22:07Z","message":{"role":"assistant","content":"a \"b\" \\ \n\u00e9\/"},"done":false}
{"message":{"role":"assistant","content":""},"done":false}
{"message":{"content":"no done"}}
{"message":{"content":5},"done":false}
{"message":null,"done":false}
{"message":{"content":"x","content":"y"},"done":false}
{"message":{"content":"x"},"done":false,"done":false}
{"message":{"content":"x"},"done":"no"}
{"message":{"content":"x"},"done":false,"eval_count":null}
{"message":{"content":"x"},"done":false} junk
{"message":{"content":"t","tool_calls":[{"function":{"name":"f","arguments":{"a":1}}}]},"done":false}
{"message":{"content":""},"done":true,"done_reason":"stop","prompt_eval_count":4,"eval_count":2}
"#;
        let mut fast = OllamaStream::new("m", true, true);
        let mut value = OllamaStream::new("m", true, true);
        value.writer = fast.writer.clone();
        for line in input.split_inclusive(|b| *b == b'\n') {
            let (mut a, mut b) = (vec![], vec![]);
            fast.line(line, &mut a);
            if value.finished {
                continue;
            }
            value.reply_line(line, &mut b);
            assert_eq!(
                String::from_utf8_lossy(&a),
                String::from_utf8_lossy(&b),
                "{}",
                String::from_utf8_lossy(line)
            );
        }
        assert!(fast.finished && value.finished);
    }

    #[test]
    fn text_responses_are_written_as_the_value_path_writes_them() {
        let bodies: Vec<&[u8]> = vec![
            br#"{"model":"llama3","message":{"role":"assistant","content":"He said \"hi\"\n\u00e9\/"},"done":true,"done_reason":"length","prompt_eval_count":4,"eval_count":3}"#,
            br#"{"message":{"role":"assistant","content":5},"done":false}"#,
            br#"{"message":{"content":"x"},"done_reason":null}"#,
            br#"{"message":{"content":"x"},"done_reason":"le\u006egth"}"#,
            br#"{"message":{"content":"x","tool_calls":[{"function":{"name":"f","arguments":{"a":1}}}]},"done":true}"#,
            br#"{"message":{"content":"x"},"eval_count":null}"#,
            br#"{"message":{"content":"\ud800"}}"#,
            br#"{"message":null}"#,
        ];
        for body in bodies {
            let generated = !body.starts_with(b"{\"id\"");
            let fast = translate_response(Operation::ChatCompletions, body, "m")
                .map(|(b, u)| (crate::provider::common::comparable(&b, generated), u));
            let value = reply_response(Operation::ChatCompletions, body, "m")
                .map(|(b, u)| (crate::provider::common::comparable(&b, generated), u));
            assert_eq!(fast.ok(), value.ok(), "{}", String::from_utf8_lossy(body));
        }
    }
}
