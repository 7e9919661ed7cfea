//! Pieces every translator shares: reading typed fields from the client's body, the OpenAI
//! message shape they all convert from, and the OpenAI usage object they all produce.

use serde::Deserialize;
use serde_json::{json, Value};

use crate::body::RequestBody;
use crate::error::ApiError;
use crate::usage::Usage;

pub(super) fn bad(msg: impl Into<String>) -> ApiError {
    ApiError::bad_request(msg)
}

/// A body field as `T`; absent or `null` is `None`, a wrong type is a 400 naming the field.
pub(super) fn parse_field<T: serde::de::DeserializeOwned>(
    body: &RequestBody<'_>,
    key: &str,
) -> Result<Option<T>, ApiError> {
    match body.raw(key) {
        None | Some("null") => Ok(None),
        Some(raw) => serde_json::from_str(raw)
            .map(Some)
            .map_err(|e| bad(format!("Invalid request body: `{key}`: {e}")).with_param(key)),
    }
}

/// A body field as a JSON value.
pub(super) fn raw_value(body: &RequestBody<'_>, key: &str) -> Result<Option<Value>, ApiError> {
    parse_field::<Value>(body, key)
}

/// One OpenAI chat message, as every translator reads it.
#[derive(Deserialize)]
pub(super) struct OpenAiMessage {
    pub role: String,
    #[serde(default)]
    pub content: Value,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub tool_calls: Option<Vec<OpenAiToolCall>>,
    #[serde(default)]
    pub tool_call_id: Option<String>,
    #[serde(default)]
    pub reasoning_content: Option<String>,
}

#[derive(Deserialize)]
pub(super) struct OpenAiToolCall {
    pub id: String,
    pub function: OpenAiFunctionCall,
}

#[derive(Deserialize)]
pub(super) struct OpenAiFunctionCall {
    pub name: String,
    #[serde(default)]
    pub arguments: String,
}

/// Seconds since the epoch, for `created`.
pub(super) fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// OpenAI's `usage` object.
pub(super) fn usage_json(u: &Usage) -> Value {
    json!({"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens, "total_tokens": u.total_tokens})
}

/// Token counts of providers that report prompt caching apart from fresh input (Anthropic,
/// Bedrock): OpenAI counts all of it as prompt tokens and names the cached part.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct CachedUsage {
    pub input: u64,
    pub output: u64,
    pub cache_read: u64,
    pub cache_write: u64,
}

impl CachedUsage {
    pub fn prompt(&self) -> u64 {
        self.input + self.cache_read + self.cache_write
    }

    /// OpenAI's `usage` object with the cache details LiteLLM adds.
    pub fn openai(&self) -> Value {
        json!({
            "prompt_tokens": self.prompt(),
            "completion_tokens": self.output,
            "total_tokens": self.prompt() + self.output,
            "prompt_tokens_details": {"cached_tokens": self.cache_read},
            "cache_creation_input_tokens": self.cache_write,
            "cache_read_input_tokens": self.cache_read,
        })
    }

    pub fn usage(&self) -> Usage {
        Usage {
            prompt_tokens: self.prompt(),
            completion_tokens: self.output,
            total_tokens: self.prompt() + self.output,
        }
    }
}
