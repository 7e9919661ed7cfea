//! Anthropic-format ingress: clients speaking Anthropic's Messages API (`POST /v1/messages`) are
//! served by any deployment. Requests become OpenAI chat requests, and OpenAI responses and SSE
//! streams become Anthropic messages and typed events. (Deployments that are themselves
//! Anthropic get the request natively; see the proxy.)

use serde_json::{json, Map, Value};

use crate::error::ApiError;
use crate::sse::{event_data, SseSplitter};
use crate::usage::Usage;

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError::bad_request(msg)
}

/// Anthropic's error body, which its SDKs parse.
pub fn anthropic_error_body(e: &ApiError) -> Vec<u8> {
    let kind = match e.status {
        400 | 413 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        429 => "rate_limit_error",
        503 | 529 => "overloaded_error",
        _ => "api_error",
    };
    serde_json::to_vec(&json!({"type": "error", "error": {"type": kind, "message": e.message}}))
        .expect("json serializes")
}

fn text_blocks(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Array(blocks) => blocks
            .iter()
            .filter_map(|b| b["text"].as_str())
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

fn image_part(block: &Value) -> Option<Value> {
    let src = &block["source"];
    let url = match src["type"].as_str()? {
        "base64" => format!(
            "data:{};base64,{}",
            src["media_type"].as_str().unwrap_or("image/png"),
            src["data"].as_str().unwrap_or("")
        ),
        "url" => src["url"].as_str()?.to_string(),
        _ => return None,
    };
    Some(json!({"type": "image_url", "image_url": {"url": url}}))
}

fn convert_message(m: &Value, out: &mut Vec<Value>) -> Result<(), ApiError> {
    let role = m["role"]
        .as_str()
        .ok_or_else(|| bad("A message has no role").with_param("messages"))?;
    let blocks = match &m["content"] {
        Value::String(s) => vec![json!({"type": "text", "text": s})],
        Value::Array(b) => b.clone(),
        _ => {
            return Err(
                bad("message content must be a string or a list of blocks").with_param("messages")
            )
        }
    };
    match role {
        "user" => {
            let mut parts = vec![];
            for b in &blocks {
                match b["type"].as_str() {
                    Some("text") => parts.push(json!({"type": "text", "text": b["text"]})),
                    Some("image") => parts.extend(image_part(b)),
                    Some("tool_result") => {
                        let mut content = text_blocks(&b["content"]);
                        if b["is_error"] == true {
                            content = format!("Error: {content}");
                        }
                        out.push(json!({"role": "tool", "tool_call_id": b["tool_use_id"], "content": content}));
                    }
                    _ => {}
                }
            }
            if !parts.is_empty() {
                let all_text = parts.iter().all(|p| p["type"] == "text");
                let content = if all_text {
                    json!(parts
                        .iter()
                        .filter_map(|p| p["text"].as_str())
                        .collect::<Vec<_>>()
                        .join("\n"))
                } else {
                    json!(parts)
                };
                out.push(json!({"role": "user", "content": content}));
            }
        }
        "assistant" => {
            let mut text = String::new();
            let mut calls = vec![];
            for b in &blocks {
                match b["type"].as_str() {
                    Some("text") => text.push_str(b["text"].as_str().unwrap_or("")),
                    Some("tool_use") => calls.push(json!({
                        "id": b["id"],
                        "type": "function",
                        "function": {"name": b["name"], "arguments": b["input"].to_string()},
                    })),
                    _ => {}
                }
            }
            let mut msg = json!({"role": "assistant", "content": if text.is_empty() { Value::Null } else { json!(text) }});
            if !calls.is_empty() {
                msg["tool_calls"] = json!(calls);
            }
            out.push(msg);
        }
        other => return Err(bad(format!("Invalid message role: {other}")).with_param("messages")),
    }
    Ok(())
}

/// An Anthropic Messages request as an OpenAI chat request; also returns whether it streams.
pub fn messages_to_openai(body: &[u8]) -> Result<(Value, bool), ApiError> {
    let req: Map<String, Value> = serde_json::from_slice(body)
        .map_err(|e| bad(format!("Invalid request body: malformed JSON: {e}")))?;
    let model = req
        .get("model")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("model: Field required").with_param("model"))?;
    let messages = req
        .get("messages")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("messages: Field required").with_param("messages"))?;
    let max_tokens = req
        .get("max_tokens")
        .and_then(Value::as_u64)
        .ok_or_else(|| bad("max_tokens: Field required").with_param("max_tokens"))?;
    let mut out_messages = vec![];
    if let Some(system) = req.get("system") {
        let text = text_blocks(system);
        if !text.is_empty() {
            out_messages.push(json!({"role": "system", "content": text}));
        }
    }
    for m in messages {
        convert_message(m, &mut out_messages)?;
    }
    let stream = req.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let mut out = json!({"model": model, "messages": out_messages, "max_tokens": max_tokens});
    for key in ["temperature", "top_p", "top_k"] {
        if let Some(v) = req.get(key) {
            out[key] = v.clone();
        }
    }
    if let Some(stop) = req.get("stop_sequences") {
        out["stop"] = stop.clone();
    }
    if stream {
        out["stream"] = json!(true);
        out["stream_options"] = json!({"include_usage": true});
    }
    if let Some(user) = req.get("metadata").and_then(|m| m.get("user_id")) {
        out["user"] = user.clone();
    }
    if let Some(tools) = req.get("tools").and_then(Value::as_array) {
        let tools: Vec<Value> = tools
            .iter()
            .map(|t| json!({"type": "function", "function": {
                "name": t["name"],
                "description": t.get("description").cloned().unwrap_or(Value::Null),
                "parameters": t.get("input_schema").cloned().unwrap_or_else(|| json!({"type": "object"})),
            }}))
            .collect();
        out["tools"] = json!(tools);
    }
    if let Some(choice) = req.get("tool_choice") {
        out["tool_choice"] = match choice["type"].as_str() {
            Some("any") => json!("required"),
            Some("none") => json!("none"),
            Some("tool") => json!({"type": "function", "function": {"name": choice["name"]}}),
            _ => json!("auto"),
        };
        if choice["disable_parallel_tool_use"] == true {
            out["parallel_tool_calls"] = json!(false);
        }
    }
    Ok((out, stream))
}

fn stop_reason(finish: Option<&str>) -> &'static str {
    match finish {
        Some("length") => "max_tokens",
        Some("tool_calls") | Some("function_call") => "tool_use",
        Some("content_filter") => "refusal",
        _ => "end_turn",
    }
}

fn message_id(id: &str) -> String {
    if id.starts_with("msg_") {
        id.to_string()
    } else {
        format!("msg_{}", id.trim_start_matches("chatcmpl-"))
    }
}

/// An OpenAI chat completion as an Anthropic message; also returns its usage.
pub fn openai_to_message(body: &[u8], model: &str) -> Result<(Vec<u8>, Option<Usage>), ApiError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            502,
            "internal_server_error",
            format!("malformed upstream response: {e}"),
        )
    })?;
    let choice = &v["choices"][0];
    let msg = &choice["message"];
    let mut content = vec![];
    if let Some(t) = msg["content"].as_str().filter(|t| !t.is_empty()) {
        content.push(json!({"type": "text", "text": t}));
    }
    for call in msg["tool_calls"].as_array().into_iter().flatten() {
        let args = call
            .pointer("/function/arguments")
            .and_then(Value::as_str)
            .unwrap_or("{}");
        let input: Value = serde_json::from_str(args).unwrap_or_else(|_| json!({}));
        content.push(json!({"type": "tool_use", "id": call["id"], "name": call.pointer("/function/name"), "input": input}));
    }
    let usage: Option<Usage> = serde_json::from_value(v["usage"].clone()).ok();
    let u = usage.unwrap_or_default();
    let out = json!({
        "id": message_id(v["id"].as_str().unwrap_or("")),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason(choice["finish_reason"].as_str()),
        "stop_sequence": null,
        "usage": {"input_tokens": u.prompt_tokens, "output_tokens": u.completion_tokens},
    });
    Ok((serde_json::to_vec(&out).expect("json serializes"), usage))
}

#[derive(PartialEq)]
enum Block {
    None,
    Text,
    Tool,
}

/// OpenAI `chat.completion.chunk` SSE → Anthropic typed events, for any chunking.
pub struct OpenAiToAnthropicStream {
    splitter: SseSplitter,
    model: String,
    started: bool,
    index: i64,
    block: Block,
    /// OpenAI tool call index → already opened as a block.
    tool_open: Option<u64>,
    stop: Option<String>,
    usage: Option<Usage>,
    finished: bool,
}

impl OpenAiToAnthropicStream {
    pub fn new(model: &str) -> Self {
        OpenAiToAnthropicStream {
            splitter: SseSplitter::default(),
            model: model.to_string(),
            started: false,
            index: -1,
            block: Block::None,
            tool_open: None,
            stop: None,
            usage: None,
            finished: false,
        }
    }

    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }

    pub fn feed(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        let mut splitter = std::mem::take(&mut self.splitter);
        splitter.feed(chunk, |e| self.event(e, out));
        self.splitter = splitter;
    }

    pub fn finish(&mut self, out: &mut Vec<u8>) {
        let mut splitter = std::mem::take(&mut self.splitter);
        splitter.finish(|e| self.event(e, out));
        self.splitter = splitter;
        self.end(out);
    }

    fn emit(out: &mut Vec<u8>, name: &str, data: Value) {
        out.extend_from_slice(format!("event: {name}\ndata: {data}\n\n").as_bytes());
    }

    fn start(&mut self, id: &str, out: &mut Vec<u8>) {
        if self.started {
            return;
        }
        self.started = true;
        Self::emit(
            out,
            "message_start",
            json!({"type": "message_start", "message": {
            "id": message_id(id), "type": "message", "role": "assistant", "model": self.model,
            "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": 0, "output_tokens": 0}}}),
        );
    }

    fn close_block(&mut self, out: &mut Vec<u8>) {
        if self.block != Block::None {
            Self::emit(
                out,
                "content_block_stop",
                json!({"type": "content_block_stop", "index": self.index}),
            );
            self.block = Block::None;
            self.tool_open = None;
        }
    }

    fn event(&mut self, event: &[u8], out: &mut Vec<u8>) {
        let Some(data) = event_data(event) else {
            return;
        };
        if data == b"[DONE]" {
            self.end(out);
            return;
        }
        let Ok(v) = serde_json::from_slice::<Value>(data) else {
            return;
        };
        if let Some(e) = v.get("error") {
            self.start("error", out);
            Self::emit(
                out,
                "error",
                json!({"type": "error", "error": {"type": "api_error", "message": e["message"]}}),
            );
            self.finished = true;
            return;
        }
        self.start(v["id"].as_str().unwrap_or(""), out);
        if let Ok(u) = serde_json::from_value::<Usage>(v["usage"].clone()) {
            self.usage = Some(u);
        }
        let Some(choice) = v["choices"].as_array().and_then(|c| c.first()) else {
            return;
        };
        let delta = &choice["delta"];
        if let Some(text) = delta["content"].as_str().filter(|t| !t.is_empty()) {
            if self.block != Block::Text {
                self.close_block(out);
                self.index += 1;
                self.block = Block::Text;
                Self::emit(
                    out,
                    "content_block_start",
                    json!({"type": "content_block_start", "index": self.index, "content_block": {"type": "text", "text": ""}}),
                );
            }
            Self::emit(
                out,
                "content_block_delta",
                json!({"type": "content_block_delta", "index": self.index, "delta": {"type": "text_delta", "text": text}}),
            );
        }
        for call in delta["tool_calls"].as_array().into_iter().flatten() {
            let call_index = call["index"].as_u64().unwrap_or(0);
            if self.tool_open != Some(call_index) {
                self.close_block(out);
                self.index += 1;
                self.block = Block::Tool;
                self.tool_open = Some(call_index);
                Self::emit(
                    out,
                    "content_block_start",
                    json!({"type": "content_block_start", "index": self.index,
                    "content_block": {"type": "tool_use", "id": call["id"], "name": call.pointer("/function/name"), "input": {}}}),
                );
            }
            if let Some(args) = call
                .pointer("/function/arguments")
                .and_then(Value::as_str)
                .filter(|a| !a.is_empty())
            {
                Self::emit(
                    out,
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": self.index, "delta": {"type": "input_json_delta", "partial_json": args}}),
                );
            }
        }
        if let Some(f) = choice["finish_reason"].as_str() {
            self.stop = Some(f.to_string());
        }
    }

    fn end(&mut self, out: &mut Vec<u8>) {
        if self.finished {
            return;
        }
        self.finished = true;
        self.start("", out);
        self.close_block(out);
        let u = self.usage.unwrap_or_default();
        Self::emit(
            out,
            "message_delta",
            json!({"type": "message_delta",
            "delta": {"stop_reason": stop_reason(self.stop.as_deref()), "stop_sequence": null},
            "usage": {"input_tokens": u.prompt_tokens, "output_tokens": u.completion_tokens}}),
        );
        Self::emit(out, "message_stop", json!({"type": "message_stop"}));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_becomes_openai_chat() {
        let body = br#"{"model":"m","max_tokens":100,"system":[{"type":"text","text":"Be brief."}],
          "messages":[{"role":"user","content":"weather?"},
            {"role":"assistant","content":[{"type":"text","text":"Checking."},{"type":"tool_use","id":"toolu_1","name":"get_weather","input":{"city":"Paris"}}]},
            {"role":"user","content":[{"type":"tool_result","tool_use_id":"toolu_1","content":"18C"},{"type":"text","text":"thanks"}]}],
          "tools":[{"name":"get_weather","description":"w","input_schema":{"type":"object"}}],
          "tool_choice":{"type":"any"},"stop_sequences":["END"],"stream":true}"#;
        let (v, stream) = messages_to_openai(body).unwrap();
        assert!(stream);
        assert_eq!(
            v["messages"][0],
            json!({"role": "system", "content": "Be brief."})
        );
        assert_eq!(
            v["messages"][2]["tool_calls"][0]["function"]["arguments"],
            "{\"city\":\"Paris\"}"
        );
        assert_eq!(
            v["messages"][3],
            json!({"role": "tool", "tool_call_id": "toolu_1", "content": "18C"})
        );
        assert_eq!(
            v["messages"][4],
            json!({"role": "user", "content": "thanks"})
        );
        assert_eq!(
            v["tools"][0]["function"]["parameters"],
            json!({"type": "object"})
        );
        assert_eq!(v["tool_choice"], "required");
        assert_eq!(v["stop"], json!(["END"]));
        assert_eq!(v["stream_options"]["include_usage"], true);
        let e = messages_to_openai(br#"{"model":"m","messages":[]}"#).unwrap_err();
        assert!(e.message.contains("max_tokens"));
    }

    #[test]
    fn response_becomes_message() {
        let body = br#"{"id":"chatcmpl-9","choices":[{"index":0,"message":{"role":"assistant","content":"Hi","tool_calls":[{"id":"c1","type":"function","function":{"name":"f","arguments":"{\"a\":1}"}}]},"finish_reason":"tool_calls"}],"usage":{"prompt_tokens":4,"completion_tokens":2,"total_tokens":6}}"#;
        let (out, usage) = openai_to_message(body, "m").unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["id"], "msg_9");
        assert_eq!(v["content"][0], json!({"type": "text", "text": "Hi"}));
        assert_eq!(v["content"][1]["input"], json!({"a": 1}));
        assert_eq!(v["stop_reason"], "tool_use");
        assert_eq!(v["usage"], json!({"input_tokens": 4, "output_tokens": 2}));
        assert_eq!(usage.unwrap().total_tokens, 6);
    }

    #[test]
    fn stream_becomes_typed_events_for_any_split() {
        let input = concat!(
            "data: {\"id\":\"chatcmpl-1\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n",
            "data: {\"id\":\"chatcmpl-1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hel\"}}]}\n\n",
            "data: {\"id\":\"chatcmpl-1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"lo\"}}]}\n\n",
            "data: {\"id\":\"chatcmpl-1\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"id\":\"c1\",\"type\":\"function\",\"function\":{\"name\":\"f\",\"arguments\":\"\"}}]}}]}\n\n",
            "data: {\"id\":\"chatcmpl-1\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"{\\\"a\\\":1}\"}}]}}]}\n\n",
            "data: {\"id\":\"chatcmpl-1\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"tool_calls\"}]}\n\n",
            "data: {\"id\":\"chatcmpl-1\",\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":7,\"total_tokens\":12}}\n\n",
            "data: [DONE]\n\n"
        );
        let mut reference = None;
        for split in 1..input.len() {
            let mut s = OpenAiToAnthropicStream::new("m");
            let mut out = vec![];
            for c in input.as_bytes().chunks(split) {
                s.feed(c, &mut out);
            }
            s.finish(&mut out);
            let text = String::from_utf8(out).unwrap();
            match &reference {
                None => reference = Some(text),
                Some(r) => assert_eq!(r, &text, "split {split}"),
            }
        }
        let text = reference.unwrap();
        let names: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("event: "))
            .collect();
        assert_eq!(
            names,
            vec![
                "message_start",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
        assert!(text.contains("\"stop_reason\":\"tool_use\""));
        assert!(text.contains("\"output_tokens\":7"));
        assert!(text.contains("\"partial_json\":\"{\\\"a\\\":1}\""));
    }
}
