//! Request bodies of the OpenAI routes with vLLM's extra fields, and their conversion into
//! [`SamplingParams`].
//!
//! A body is parsed once into a JSON value; each route then reads the field groups it needs from
//! that value ([`SamplingFields`] for every generating route, plus its own), so no group has to
//! know about the others and unknown fields are ignored, as vLLM does.

use std::collections::HashMap;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;

use super::errors::ApiError;
use crate::engine::{EngineHandle, Task};
use crate::sampling::SamplingParams;

/// vLLM's default `max_logprobs`: the most alternatives one token may ask for.
pub const MAX_LOGPROBS: usize = 20;

/// Parse a request body: malformed JSON and non-object bodies are 400s.
pub fn parse_body(bytes: &[u8]) -> Result<Value, ApiError> {
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|err| ApiError::bad_request(format!("Invalid JSON body: {err}")))?;
    if !value.is_object() {
        return Err(ApiError::bad_request(
            "The request body must be a JSON object.",
        ));
    }
    Ok(value)
}

/// Read one field group out of a parsed body; type errors name the field.
pub fn fields<T: DeserializeOwned>(body: &Value) -> Result<T, ApiError> {
    Ok(serde_path_to_error::deserialize(body)?)
}

/// `model` must be absent or the served name (vLLM answers 404 otherwise).
pub fn check_model(handle: &EngineHandle, model: Option<&str>) -> Result<(), ApiError> {
    check_model_name(&handle.info().served_model_name, model)
}

fn check_model_name(served: &str, requested: Option<&str>) -> Result<(), ApiError> {
    match requested {
        Some(name) if name != served => Err(ApiError::not_found(format!(
            "The model `{name}` does not exist."
        ))),
        _ => Ok(()),
    }
}

/// Routes serve one kind of model: generation routes refuse an embedding model and vice versa.
pub fn check_task(handle: &EngineHandle, wanted: Task, api: &str) -> Result<(), ApiError> {
    if handle.info().task == wanted {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "The model does not support {api} API"
        )))
    }
}

/// A string or a list of strings (`stop`, score and rerank inputs).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(text) => vec![text],
            OneOrMany::Many(texts) => texts,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct StreamOptions {
    /// vLLM: true once `stream_options` is sent at all.
    pub include_usage: Option<bool>,
    pub continuous_usage_stats: Option<bool>,
}

/// What the stream adds besides content: a usage chunk at the end, usage on every chunk.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct UsageReporting {
    pub final_chunk: bool,
    pub every_chunk: bool,
}

impl StreamOptions {
    pub fn usage_reporting(options: Option<&StreamOptions>) -> UsageReporting {
        match options {
            None => UsageReporting::default(),
            Some(options) => {
                let final_chunk = options.include_usage.unwrap_or(true);
                UsageReporting {
                    final_chunk,
                    // vLLM only honours continuous stats together with include_usage.
                    every_chunk: final_chunk && options.continuous_usage_stats.unwrap_or(false),
                }
            }
        }
    }
}

/// The fields chat and completions share: sampling, stopping, scheduling, streaming.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct SamplingFields {
    pub model: Option<String>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i32>,
    pub min_p: Option<f32>,
    pub seed: Option<i64>,
    pub repetition_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    /// OpenAI sends token ids as JSON object keys, so as strings.
    pub logit_bias: Option<HashMap<String, f32>>,
    pub allowed_token_ids: Option<Vec<u32>>,
    pub max_tokens: Option<u64>,
    pub max_completion_tokens: Option<u64>,
    pub min_tokens: Option<u64>,
    pub ignore_eos: Option<bool>,
    pub stop: Option<OneOrMany>,
    pub stop_token_ids: Option<Vec<u32>>,
    pub include_stop_str_in_output: Option<bool>,
    pub n: Option<u64>,
    pub best_of: Option<u64>,
    pub skip_special_tokens: Option<bool>,
    pub spaces_between_special_tokens: Option<bool>,
    pub truncate_prompt_tokens: Option<i64>,
    pub cache_salt: Option<String>,
    pub priority: Option<i32>,
    pub request_id: Option<String>,
    pub return_token_ids: Option<bool>,
    pub return_tokens_as_token_ids: Option<bool>,
    pub prompt_logprobs: Option<i64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub use_beam_search: Option<bool>,
    pub bad_words: Option<Vec<String>>,
    pub guided_json: Option<Value>,
    pub guided_regex: Option<Value>,
    pub guided_choice: Option<Value>,
    pub guided_grammar: Option<Value>,
    pub structured_outputs: Option<Value>,
    pub response_format: Option<Value>,
}

impl SamplingFields {
    /// Refuse what this engine cannot honour, rather than silently generating something else.
    pub fn reject_unsupported(&self) -> Result<(), ApiError> {
        if self.prompt_logprobs.is_some() {
            return Err(ApiError::unsupported("prompt_logprobs", "Prompt logprobs"));
        }
        let guided = [
            ("guided_json", &self.guided_json),
            ("guided_regex", &self.guided_regex),
            ("guided_choice", &self.guided_choice),
            ("guided_grammar", &self.guided_grammar),
            ("structured_outputs", &self.structured_outputs),
        ];
        for (name, value) in guided {
            if value.as_ref().is_some_and(|v| !v.is_null()) {
                return Err(ApiError::unsupported(
                    name,
                    "Structured outputs (guided decoding)",
                ));
            }
        }
        if let Some(format) = &self.response_format {
            let kind = format.get("type").and_then(Value::as_str);
            match kind {
                None if format.is_null() => {}
                Some("text") => {}
                Some(other) => {
                    return Err(ApiError::bad_param(
                        "response_format",
                        format!(
                            "response_format type `{other}` is not supported by this engine \
                             (structured outputs are not supported); only `text` is."
                        ),
                    ))
                }
                None => {
                    return Err(ApiError::bad_param(
                        "response_format",
                        "response_format must be an object with a `type`.",
                    ))
                }
            }
        }
        if self.use_beam_search == Some(true) {
            return Err(ApiError::unsupported("use_beam_search", "Beam search"));
        }
        if self
            .bad_words
            .as_ref()
            .is_some_and(|words| !words.is_empty())
        {
            return Err(ApiError::unsupported("bad_words", "bad_words"));
        }
        if let Some(best_of) = self.best_of {
            if best_of != self.n.unwrap_or(1) {
                return Err(ApiError::unsupported("best_of", "best_of other than n"));
            }
        }
        Ok(())
    }

    pub fn wants_stream(&self) -> bool {
        self.stream.unwrap_or(false)
    }

    pub fn usage_reporting(&self) -> UsageReporting {
        StreamOptions::usage_reporting(self.stream_options.as_ref())
    }

    /// Keep the last N prompt tokens (`-1`: up to max_model_len), as vLLM truncates from the left.
    pub fn truncate_prompt(
        &self,
        tokens: Vec<u32>,
        max_model_len: usize,
    ) -> Result<Vec<u32>, ApiError> {
        truncate_prompt(tokens, self.truncate_prompt_tokens, max_model_len)
    }
}

pub fn truncate_prompt(
    mut tokens: Vec<u32>,
    keep: Option<i64>,
    max_model_len: usize,
) -> Result<Vec<u32>, ApiError> {
    let keep = match keep {
        None => return Ok(tokens),
        Some(-1) => max_model_len,
        Some(n) if n >= 1 => n as usize,
        Some(n) => {
            return Err(ApiError::bad_param(
                "truncate_prompt_tokens",
                format!("truncate_prompt_tokens must be -1 or at least 1, got {n}."),
            ))
        }
    };
    if keep > max_model_len {
        return Err(ApiError::bad_param(
            "truncate_prompt_tokens",
            format!(
                "truncate_prompt_tokens value ({keep}) is greater than max_model_len \
                 ({max_model_len}). Please, select a smaller truncation size."
            ),
        ));
    }
    if tokens.len() > keep {
        tokens.drain(..tokens.len() - keep);
    }
    Ok(tokens)
}

/// What the conversion needs to know about the prompt and the model.
#[derive(Debug, Clone, Copy)]
pub struct PromptLimits {
    pub prompt_len: usize,
    pub max_model_len: usize,
    pub vocab_size: usize,
}

/// vLLM's context-window error texts.
pub fn check_context(
    prompt_len: usize,
    max_tokens: Option<usize>,
    max_model_len: usize,
) -> Result<(), ApiError> {
    match max_tokens {
        Some(max_tokens) if prompt_len + max_tokens > max_model_len => {
            Err(ApiError::bad_request(format!(
                "This model's maximum context length is {max_model_len} tokens. However, you \
                 requested {} tokens ({prompt_len} in the messages, {max_tokens} in the \
                 completion). Please reduce the length of the messages or completion.",
                prompt_len + max_tokens
            )))
        }
        None if prompt_len >= max_model_len => Err(ApiError::bad_request(format!(
            "This model's maximum context length is {max_model_len} tokens. However, you \
             requested {prompt_len} tokens in the messages, Please reduce the length of the \
             messages."
        ))),
        _ => Ok(()),
    }
}

/// Turn the request's fields into sampling parameters. `defaults` carries the values used when
/// a field is absent (vLLM's, or the model's generation_config); `logprobs` is already resolved
/// from the route's own spelling (chat: `logprobs` + `top_logprobs`; completions: int
/// `logprobs`). Also checks prompt + max_tokens against the context window.
pub fn sampling_params(
    fields: &SamplingFields,
    logprobs: Option<usize>,
    limits: PromptLimits,
    defaults: &SamplingParams,
) -> Result<SamplingParams, ApiError> {
    let requested_max = fields.max_completion_tokens.or(fields.max_tokens);
    let requested_max = requested_max.map(|m| m as usize);
    if requested_max == Some(0) {
        return Err(ApiError::bad_param(
            "max_tokens",
            "max_tokens must be at least 1, got 0.",
        ));
    }
    check_context(limits.prompt_len, requested_max, limits.max_model_len)?;
    let max_tokens = requested_max.unwrap_or(limits.max_model_len - limits.prompt_len);

    let mut params = defaults.clone();
    params.max_tokens = max_tokens;
    if let Some(v) = fields.temperature {
        if v < 0.0 {
            return Err(ApiError::bad_param(
                "temperature",
                format!("temperature must be non-negative, got {v}."),
            ));
        }
        params.temperature = v;
    }
    if let Some(v) = fields.top_p {
        if !(v > 0.0 && v <= 1.0) {
            return Err(ApiError::bad_param(
                "top_p",
                format!("top_p must be in (0, 1], got {v}."),
            ));
        }
        params.top_p = v;
    }
    if let Some(v) = fields.top_k {
        if v < -1 {
            return Err(ApiError::bad_param(
                "top_k",
                format!("top_k must be 0 (disable), or at least 1, got {v}."),
            ));
        }
        // -1 is the older spelling of "disabled".
        params.top_k = v.max(0);
    }
    if let Some(v) = fields.min_p {
        if !(0.0..=1.0).contains(&v) {
            return Err(ApiError::bad_param(
                "min_p",
                format!("min_p must be in [0, 1], got {v}."),
            ));
        }
        params.min_p = v;
    }
    if let Some(v) = fields.repetition_penalty {
        if v <= 0.0 {
            return Err(ApiError::bad_param(
                "repetition_penalty",
                format!("repetition_penalty must be greater than zero, got {v}."),
            ));
        }
        params.repetition_penalty = v;
    }
    if let Some(v) = fields.presence_penalty {
        params.presence_penalty = penalty_in_range("presence_penalty", v)?;
    }
    if let Some(v) = fields.frequency_penalty {
        params.frequency_penalty = penalty_in_range("frequency_penalty", v)?;
    }
    if let Some(seed) = fields.seed {
        // Negative seeds are valid Python ints; keep their bits.
        params.seed = Some(seed as u64);
    }
    if let Some(bias) = &fields.logit_bias {
        params.logit_bias = parse_logit_bias(bias, limits.vocab_size)?;
    }
    if let Some(ids) = &fields.allowed_token_ids {
        if ids.is_empty() {
            return Err(ApiError::bad_param(
                "allowed_token_ids",
                "allowed_token_ids is not allowed to be empty.",
            ));
        }
        check_vocab("allowed_token_ids", ids, limits.vocab_size)?;
        params.allowed_token_ids = Some(ids.clone());
    }
    if let Some(v) = fields.min_tokens {
        let v = v as usize;
        if v > params.max_tokens {
            return Err(ApiError::bad_param(
                "min_tokens",
                format!(
                    "min_tokens must be less than or equal to max_tokens={}, got {v}.",
                    params.max_tokens
                ),
            ));
        }
        params.min_tokens = v;
    }
    if let Some(v) = fields.ignore_eos {
        params.ignore_eos = v;
    }
    if let Some(stop) = &fields.stop {
        params.stop = stop.clone().into_vec();
        if params.stop.iter().any(String::is_empty) {
            return Err(ApiError::bad_param(
                "stop",
                "stop cannot contain an empty string.",
            ));
        }
    }
    if let Some(ids) = &fields.stop_token_ids {
        check_vocab("stop_token_ids", ids, limits.vocab_size)?;
        params.stop_token_ids = ids.clone();
    }
    if let Some(v) = fields.include_stop_str_in_output {
        params.include_stop_str_in_output = v;
    }
    if let Some(n) = fields.n {
        if n < 1 {
            return Err(ApiError::bad_param(
                "n",
                format!("n must be at least 1, got {n}."),
            ));
        }
        params.n = n as usize;
    }
    if let Some(v) = fields.skip_special_tokens {
        params.skip_special_tokens = v;
    }
    if let Some(v) = fields.spaces_between_special_tokens {
        params.spaces_between_special_tokens = v;
    }
    if let Some(k) = logprobs {
        if k > MAX_LOGPROBS {
            return Err(ApiError::bad_param(
                "logprobs",
                format!(
                    "Requested sample logprobs of {k}, which is greater than max allowed: \
                     {MAX_LOGPROBS}"
                ),
            ));
        }
    }
    params.logprobs = logprobs;
    Ok(params)
}

fn penalty_in_range(name: &str, value: f32) -> Result<f32, ApiError> {
    if (-2.0..=2.0).contains(&value) {
        Ok(value)
    } else {
        Err(ApiError::bad_param(
            name,
            format!("{name} must be in [-2, 2], got {value}."),
        ))
    }
}

fn check_vocab(name: &str, ids: &[u32], vocab_size: usize) -> Result<(), ApiError> {
    match ids.iter().find(|&&id| id as usize >= vocab_size) {
        Some(id) => Err(ApiError::bad_param(
            name,
            format!("{name} contains out-of-vocab token id {id} (vocabulary size {vocab_size})."),
        )),
        None => Ok(()),
    }
}

/// `{"50256": -100}` → `[(50256, -100.0)]`, sorted by id so equal requests give equal params;
/// biases are clamped to ±100 as vLLM does.
fn parse_logit_bias(
    bias: &HashMap<String, f32>,
    vocab_size: usize,
) -> Result<Vec<(u32, f32)>, ApiError> {
    let mut parsed = Vec::with_capacity(bias.len());
    for (key, &value) in bias {
        let id: u32 = key.trim().parse().map_err(|_| {
            ApiError::bad_param(
                "logit_bias",
                format!("logit_bias keys must be token ids, got {key:?}."),
            )
        })?;
        parsed.push((id, value.clamp(-100.0, 100.0)));
    }
    parsed.sort_by_key(|&(id, _)| id);
    let ids: Vec<u32> = parsed.iter().map(|&(id, _)| id).collect();
    check_vocab("logit_bias", &ids, vocab_size)?;
    Ok(parsed)
}

/// `/v1/chat/completions`'s own fields.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatFields {
    pub messages: Value,
    #[serde(default)]
    pub logprobs: Option<bool>,
    #[serde(default)]
    pub top_logprobs: Option<u64>,
    #[serde(default)]
    pub add_generation_prompt: Option<bool>,
    #[serde(default)]
    pub continue_final_message: Option<bool>,
    #[serde(default)]
    pub echo: Option<bool>,
    #[serde(default)]
    pub add_special_tokens: Option<bool>,
    #[serde(default)]
    pub chat_template: Option<String>,
    #[serde(default)]
    pub chat_template_kwargs: Option<serde_json::Map<String, Value>>,
    #[serde(default)]
    pub documents: Option<Value>,
    #[serde(default)]
    pub tools: Option<Value>,
    #[serde(default)]
    pub tool_choice: Option<Value>,
}

impl ChatFields {
    /// Chat spells logprobs as a flag plus a count.
    pub fn logprobs(&self) -> Result<Option<usize>, ApiError> {
        match (self.logprobs.unwrap_or(false), self.top_logprobs) {
            (true, top) => Ok(Some(top.unwrap_or(0) as usize)),
            (false, Some(top)) if top > 0 => Err(ApiError::bad_param(
                "top_logprobs",
                "when using `top_logprobs`, `logprobs` must be set to true.",
            )),
            (false, _) => Ok(None),
        }
    }

    pub fn reject_unsupported(&self) -> Result<(), ApiError> {
        match &self.tool_choice {
            None | Some(Value::Null) => Ok(()),
            Some(Value::String(choice)) if choice == "auto" || choice == "none" => Ok(()),
            // Forcing a tool call needs constrained decoding.
            Some(_) => Err(ApiError::unsupported(
                "tool_choice",
                "tool_choice other than `auto` or `none`",
            )),
        }
    }
}

/// `/v1/completions`'s own fields.
#[derive(Debug, Clone, Deserialize)]
pub struct CompletionFields {
    pub prompt: Value,
    #[serde(default)]
    pub logprobs: Option<u64>,
    #[serde(default)]
    pub echo: Option<bool>,
    #[serde(default)]
    pub suffix: Option<String>,
    #[serde(default)]
    pub add_special_tokens: Option<bool>,
}

/// One prompt of a request: text to encode or token ids as given.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptInput {
    Text(String),
    Tokens(Vec<u32>),
}

/// `prompt` / `input`: a string, a list of strings, token ids, or a list of token-id lists.
pub fn parse_prompts(value: &Value, field: &str) -> Result<Vec<PromptInput>, ApiError> {
    let invalid = || {
        ApiError::bad_param(
            field,
            format!(
                "{field} must be a string, a list of strings, a list of token ids or a list of \
                 lists of token ids."
            ),
        )
    };
    let token = |v: &Value| v.as_u64().and_then(|id| u32::try_from(id).ok());
    let token_list = |v: &Value| -> Option<Vec<u32>> {
        v.as_array()?
            .iter()
            .map(token)
            .collect::<Option<Vec<u32>>>()
    };
    let prompts = match value {
        Value::String(text) => vec![PromptInput::Text(text.clone())],
        Value::Array(items) if items.is_empty() => {
            return Err(ApiError::bad_param(
                field,
                format!("{field} cannot be empty."),
            ))
        }
        Value::Array(items) if items[0].is_string() => items
            .iter()
            .map(|item| item.as_str().map(|s| PromptInput::Text(s.to_owned())))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(invalid)?,
        Value::Array(items) if items[0].is_number() => {
            vec![PromptInput::Tokens(token_list(value).ok_or_else(invalid)?)]
        }
        Value::Array(items) => items
            .iter()
            .map(|item| token_list(item).map(PromptInput::Tokens))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(invalid)?,
        _ => return Err(invalid()),
    };
    if prompts
        .iter()
        .any(|p| matches!(p, PromptInput::Tokens(ids) if ids.is_empty()))
    {
        return Err(ApiError::bad_param(
            field,
            format!("{field} cannot be empty."),
        ));
    }
    Ok(prompts)
}

/// Chat messages as templates expect them: vLLM's "string" content format joins text parts with
/// newlines; non-text parts (images, audio) are refused since no model here reads them.
pub fn normalize_messages(messages: &Value) -> Result<Value, ApiError> {
    let list = messages.as_array().ok_or_else(|| {
        ApiError::bad_param("messages", "messages must be a list of message objects.")
    })?;
    if list.is_empty() {
        return Err(ApiError::bad_param("messages", "messages cannot be empty."));
    }
    let mut out = Vec::with_capacity(list.len());
    for (i, message) in list.iter().enumerate() {
        let mut message = message.as_object().cloned().ok_or_else(|| {
            ApiError::bad_param(format!("messages[{i}]"), "each message must be an object.")
        })?;
        if !message.get("role").is_some_and(Value::is_string) {
            return Err(ApiError::bad_param(
                format!("messages[{i}].role"),
                format!("messages[{i}] needs a string `role`."),
            ));
        }
        if let Some(Value::Array(parts)) = message.get("content") {
            let mut texts = Vec::with_capacity(parts.len());
            for part in parts {
                match (
                    part.get("type").and_then(Value::as_str),
                    part.get("text").and_then(Value::as_str),
                ) {
                    (Some("text"), Some(text)) => texts.push(text),
                    (kind, _) => {
                        return Err(ApiError::bad_param(
                            format!("messages[{i}].content"),
                            format!(
                                "content part type {} is not supported by this model; only \
                                 `text` parts are.",
                                kind.unwrap_or("(missing)")
                            ),
                        ))
                    }
                }
            }
            let joined = texts.join("\n");
            message.insert("content".into(), Value::String(joined));
        }
        out.push(Value::Object(message));
    }
    Ok(Value::Array(out))
}

/// The text of the last message when it has `role` (chat `echo` repeats it).
pub fn last_message_content(messages: &Value, role: &str) -> Option<String> {
    let last = messages.as_array()?.last()?;
    if last.get("role")?.as_str()? != role {
        return None;
    }
    last.get("content")?.as_str().map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const LIMITS: PromptLimits = PromptLimits {
        prompt_len: 10,
        max_model_len: 100,
        vocab_size: 1000,
    };

    fn convert(body: Value) -> Result<SamplingParams, ApiError> {
        let fields: SamplingFields = fields(&body)?;
        sampling_params(&fields, None, LIMITS, &SamplingParams::default())
    }

    #[test]
    fn defaults_when_fields_absent() {
        let params = convert(json!({"model": "m"})).unwrap();
        let expected = SamplingParams {
            // Absent max_tokens: the rest of the context window.
            max_tokens: 90,
            ..SamplingParams::default()
        };
        assert_eq!(params, expected);
        assert_eq!(params.temperature, 1.0);
        assert_eq!(params.top_p, 1.0);
        assert_eq!(params.top_k, 0);
        assert_eq!(params.min_p, 0.0);
        assert_eq!(params.repetition_penalty, 1.0);
    }

    #[test]
    fn defaults_come_from_the_given_params() {
        let body = json!({"top_p": 0.5});
        let fields: SamplingFields = fields(&body).unwrap();
        let defaults = SamplingParams {
            temperature: 0.6,
            top_p: 0.9,
            top_k: 20,
            ..SamplingParams::default()
        };
        let params = sampling_params(&fields, None, LIMITS, &defaults).unwrap();
        assert_eq!(params.temperature, 0.6);
        assert_eq!(params.top_k, 20);
        assert_eq!(params.top_p, 0.5);
    }

    #[test]
    fn every_field_is_carried() {
        let params = convert(json!({
            "temperature": 0.5, "top_p": 0.8, "top_k": 40, "min_p": 0.05, "seed": 7,
            "repetition_penalty": 1.1, "presence_penalty": 0.5, "frequency_penalty": -0.5,
            "logit_bias": {"42": 5.0, "7": -200.0}, "allowed_token_ids": [1, 2, 3],
            "max_tokens": 20, "min_tokens": 3, "ignore_eos": true, "stop": ["END", "##"],
            "stop_token_ids": [9], "include_stop_str_in_output": true, "n": 3,
            "skip_special_tokens": false, "spaces_between_special_tokens": false,
            "user": "ignored", "some_future_field": {"x": 1}, "cache_salt": "s",
            "priority": -1, "request_id": "r", "return_token_ids": true
        }))
        .unwrap();
        let expected = SamplingParams {
            temperature: 0.5,
            top_p: 0.8,
            top_k: 40,
            min_p: 0.05,
            seed: Some(7),
            repetition_penalty: 1.1,
            presence_penalty: 0.5,
            frequency_penalty: -0.5,
            logit_bias: vec![(7, -100.0), (42, 5.0)],
            allowed_token_ids: Some(vec![1, 2, 3]),
            max_tokens: 20,
            min_tokens: 3,
            ignore_eos: true,
            stop: vec!["END".into(), "##".into()],
            stop_token_ids: vec![9],
            include_stop_str_in_output: true,
            logprobs: None,
            n: 3,
            skip_special_tokens: false,
            spaces_between_special_tokens: false,
        };
        assert_eq!(params, expected);
    }

    #[test]
    fn single_stop_string_and_minus_one_top_k() {
        let params = convert(json!({"stop": "\n", "top_k": -1})).unwrap();
        assert_eq!(params.stop, vec!["\n".to_string()]);
        assert_eq!(params.top_k, 0);
    }

    #[test]
    fn max_completion_tokens_wins_over_max_tokens() {
        let params = convert(json!({"max_tokens": 5, "max_completion_tokens": 7})).unwrap();
        assert_eq!(params.max_tokens, 7);
    }

    #[test]
    fn logprobs_are_passed_and_capped() {
        let fields = SamplingFields::default();
        let params = sampling_params(&fields, Some(5), LIMITS, &SamplingParams::default()).unwrap();
        assert_eq!(params.logprobs, Some(5));
        let err =
            sampling_params(&fields, Some(21), LIMITS, &SamplingParams::default()).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("logprobs"));
    }

    #[test]
    fn bad_types_name_the_field() {
        for (body, field) in [
            (json!({"temperature": "hot"}), "temperature"),
            (json!({"max_tokens": -3}), "max_tokens"),
            (json!({"n": "two"}), "n"),
            (json!({"stop": 5}), "stop"),
            (json!({"logit_bias": {"5": "x"}}), "logit_bias.5"),
            (json!({"stop_token_ids": ["a"]}), "stop_token_ids[0]"),
            (json!({"ignore_eos": "yes"}), "ignore_eos"),
            (json!({"seed": 1.5}), "seed"),
        ] {
            let err = convert(body.clone()).unwrap_err();
            assert_eq!(err.status, 400, "{body}");
            assert_eq!(err.param.as_deref(), Some(field), "{body}: {}", err.message);
            assert!(err.message.starts_with(field), "{}", err.message);
        }
    }

    #[test]
    fn logit_bias_keys_must_be_token_ids_in_vocab() {
        let err = convert(json!({"logit_bias": {"abc": 1.0}})).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("logit_bias"));
        assert!(err.message.contains("\"abc\""));
        let err = convert(json!({"logit_bias": {"5000": 1.0}})).unwrap_err();
        assert!(err.message.contains("5000"), "{}", err.message);
    }

    #[test]
    fn value_ranges_are_checked() {
        for (body, field) in [
            (json!({"temperature": -0.1}), "temperature"),
            (json!({"top_p": 0.0}), "top_p"),
            (json!({"top_k": -2}), "top_k"),
            (json!({"min_p": 1.5}), "min_p"),
            (json!({"repetition_penalty": 0.0}), "repetition_penalty"),
            (json!({"presence_penalty": 2.5}), "presence_penalty"),
            (json!({"frequency_penalty": -3}), "frequency_penalty"),
            (json!({"n": 0}), "n"),
            (json!({"max_tokens": 0}), "max_tokens"),
            (json!({"max_tokens": 5, "min_tokens": 6}), "min_tokens"),
            (json!({"allowed_token_ids": []}), "allowed_token_ids"),
            (json!({"stop_token_ids": [1000]}), "stop_token_ids"),
            (json!({"stop": [""]}), "stop"),
        ] {
            let err = convert(body.clone()).unwrap_err();
            assert_eq!(err.param.as_deref(), Some(field), "{body}: {}", err.message);
        }
    }

    #[test]
    fn context_length_error_text() {
        let err = convert(json!({"max_tokens": 95})).unwrap_err();
        assert_eq!(
            err.message,
            "This model's maximum context length is 100 tokens. However, you requested 105 \
             tokens (10 in the messages, 95 in the completion). Please reduce the length of the \
             messages or completion."
        );
        assert_eq!(err.body()["error"]["type"], "BadRequestError");
        // Exactly filling the window is allowed.
        assert_eq!(convert(json!({"max_tokens": 90})).unwrap().max_tokens, 90);
        let full = PromptLimits {
            prompt_len: 100,
            ..LIMITS
        };
        let err = sampling_params(
            &SamplingFields::default(),
            None,
            full,
            &SamplingParams::default(),
        )
        .unwrap_err();
        assert!(err
            .message
            .contains("you requested 100 tokens in the messages"));
    }

    #[test]
    fn unsupported_features_are_refused() {
        for (body, field) in [
            (json!({"prompt_logprobs": 1}), "prompt_logprobs"),
            (json!({"guided_json": {"type": "object"}}), "guided_json"),
            (json!({"guided_regex": "a+"}), "guided_regex"),
            (json!({"guided_choice": ["a"]}), "guided_choice"),
            (json!({"guided_grammar": "x"}), "guided_grammar"),
            (
                json!({"structured_outputs": {"json": {}}}),
                "structured_outputs",
            ),
            (
                json!({"response_format": {"type": "json_schema", "json_schema": {}}}),
                "response_format",
            ),
            (
                json!({"response_format": {"type": "json_object"}}),
                "response_format",
            ),
            (json!({"use_beam_search": true}), "use_beam_search"),
            (json!({"bad_words": ["x"]}), "bad_words"),
            (json!({"best_of": 3}), "best_of"),
        ] {
            let fields: SamplingFields = fields(&body).unwrap();
            let err = fields.reject_unsupported().unwrap_err();
            assert_eq!(err.param.as_deref(), Some(field), "{body}");
            assert!(err.message.contains("not supported"), "{}", err.message);
        }
        for body in [
            json!({"response_format": {"type": "text"}}),
            json!({"guided_json": null, "best_of": 2, "n": 2, "use_beam_search": false}),
        ] {
            let fields: SamplingFields = fields(&body).unwrap();
            assert!(fields.reject_unsupported().is_ok(), "{body}");
        }
    }

    #[test]
    fn chat_logprobs_flag_and_count() {
        let chat = |body: Value| -> ChatFields { fields(&body).unwrap() };
        assert_eq!(chat(json!({"messages": []})).logprobs().unwrap(), None);
        assert_eq!(
            chat(json!({"messages": [], "logprobs": true}))
                .logprobs()
                .unwrap(),
            Some(0)
        );
        assert_eq!(
            chat(json!({"messages": [], "logprobs": true, "top_logprobs": 3}))
                .logprobs()
                .unwrap(),
            Some(3)
        );
        let err = chat(json!({"messages": [], "top_logprobs": 3}))
            .logprobs()
            .unwrap_err();
        assert_eq!(err.param.as_deref(), Some("top_logprobs"));
        let err = fields::<ChatFields>(&json!({"model": "m"})).unwrap_err();
        assert!(
            err.message.contains("missing field `messages`"),
            "{}",
            err.message
        );
        let forced = chat(json!({"messages": [], "tool_choice": "required"}));
        assert!(forced.reject_unsupported().is_err());
        let auto = chat(json!({"messages": [], "tool_choice": "auto"}));
        assert!(auto.reject_unsupported().is_ok());
    }

    #[test]
    fn stream_usage_defaults_follow_vllm() {
        let usage = |body: Value| fields::<SamplingFields>(&body).unwrap().usage_reporting();
        assert_eq!(usage(json!({"stream": true})), UsageReporting::default());
        assert_eq!(
            usage(json!({"stream_options": {}})),
            UsageReporting {
                final_chunk: true,
                every_chunk: false
            }
        );
        assert_eq!(
            usage(json!({"stream_options": {"continuous_usage_stats": true}})),
            UsageReporting {
                final_chunk: true,
                every_chunk: true
            }
        );
        assert_eq!(
            usage(
                json!({"stream_options": {"include_usage": false, "continuous_usage_stats": true}})
            ),
            UsageReporting::default()
        );
    }

    #[test]
    fn prompt_shapes() {
        assert_eq!(
            parse_prompts(&json!("hi"), "prompt").unwrap(),
            vec![PromptInput::Text("hi".into())]
        );
        assert_eq!(
            parse_prompts(&json!(["a", "b"]), "prompt").unwrap(),
            vec![PromptInput::Text("a".into()), PromptInput::Text("b".into())]
        );
        assert_eq!(
            parse_prompts(&json!([1, 2, 3]), "prompt").unwrap(),
            vec![PromptInput::Tokens(vec![1, 2, 3])]
        );
        assert_eq!(
            parse_prompts(&json!([[1], [2, 3]]), "prompt").unwrap(),
            vec![
                PromptInput::Tokens(vec![1]),
                PromptInput::Tokens(vec![2, 3])
            ]
        );
        for bad in [
            json!(5),
            json!([]),
            json!(["a", 1]),
            json!([1, "a"]),
            json!([-1]),
            json!([[1], []]),
            json!({"x": 1}),
        ] {
            let err = parse_prompts(&bad, "prompt").unwrap_err();
            assert_eq!(err.param.as_deref(), Some("prompt"), "{bad}");
        }
    }

    #[test]
    fn truncation_keeps_the_tail() {
        assert_eq!(
            truncate_prompt(vec![1, 2, 3, 4], Some(2), 10).unwrap(),
            vec![3, 4]
        );
        assert_eq!(
            truncate_prompt(vec![1, 2], Some(5), 10).unwrap(),
            vec![1, 2]
        );
        assert_eq!(
            truncate_prompt(vec![1, 2, 3], Some(-1), 2).unwrap(),
            vec![2, 3]
        );
        assert_eq!(
            truncate_prompt(vec![1, 2, 3], None, 2).unwrap(),
            vec![1, 2, 3]
        );
        assert!(truncate_prompt(vec![1], Some(0), 10).is_err());
        assert!(truncate_prompt(vec![1], Some(11), 10).is_err());
    }

    #[test]
    fn messages_are_normalised() {
        let messages = json!([
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
        ]);
        let normalised = normalize_messages(&messages).unwrap();
        assert_eq!(normalised[1]["content"], "a\nb");
        assert_eq!(normalised[0], messages[0]);
        let image = json!([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]);
        assert!(normalize_messages(&image).is_err());
        assert!(normalize_messages(&json!([])).is_err());
        assert!(normalize_messages(&json!([{"content": "x"}])).is_err());
        assert!(normalize_messages(&json!("hi")).is_err());
    }

    #[test]
    fn echo_takes_the_last_message_of_the_role() {
        let messages =
            json!([{"role": "user", "content": "q"}, {"role": "assistant", "content": "The"}]);
        assert_eq!(
            last_message_content(&messages, "assistant").as_deref(),
            Some("The")
        );
        assert_eq!(last_message_content(&messages, "user"), None);
    }

    #[test]
    fn model_name_check() {
        assert!(check_model_name("smol", None).is_ok());
        assert!(check_model_name("smol", Some("smol")).is_ok());
        let err = check_model_name("smol", Some("gpt-4")).unwrap_err();
        assert_eq!(err.status, 404);
        assert_eq!(err.message, "The model `gpt-4` does not exist.");
    }

    #[test]
    fn malformed_bodies() {
        assert!(parse_body(b"{\"a\":")
            .unwrap_err()
            .message
            .starts_with("Invalid JSON body"));
        assert_eq!(parse_body(b"[1]").unwrap_err().status, 400);
        assert!(parse_body(b"{}").is_ok());
    }
}
