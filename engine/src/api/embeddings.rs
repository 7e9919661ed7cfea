//! `POST /v1/embeddings`: sentence embeddings of strings, token ids or a chat conversation, as
//! floats or base64 (little-endian f32, as OpenAI's clients decode it).

use axum::body::Bytes;
use axum::extract::State;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::errors::ApiError;
use super::generation::{response_id, unix_now};
use super::openai::{
    check_model, check_task, fields, normalize_messages, parse_body, parse_prompts,
    truncate_prompt, PromptInput,
};
use crate::chat_template::ChatTemplateOptions;
use crate::engine::{EngineHandle, Task};

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct EmbeddingFields {
    pub model: Option<String>,
    pub input: Option<Value>,
    pub messages: Option<Value>,
    pub encoding_format: Option<String>,
    pub dimensions: Option<u64>,
    pub truncate_prompt_tokens: Option<i64>,
    pub add_special_tokens: Option<bool>,
    pub request_id: Option<String>,
    pub add_generation_prompt: Option<bool>,
    pub continue_final_message: Option<bool>,
    pub chat_template: Option<String>,
    pub chat_template_kwargs: Option<Map<String, Value>>,
}

/// Tokenise inputs for a pooling model: truncate as asked, and refuse what does not fit (pooling
/// models cannot generate past their window, so there is no "completion" part to the message).
pub fn encode_for_pooling(
    handle: &EngineHandle,
    prompts: &[PromptInput],
    add_special_tokens: bool,
    truncate: Option<i64>,
) -> Result<Vec<Vec<u32>>, ApiError> {
    let tokenizer = handle.tokenizer();
    let max_model_len = handle.info().max_model_len;
    let vocab_size = tokenizer.vocab_size();
    prompts
        .iter()
        .map(|prompt| {
            let tokens = match prompt {
                PromptInput::Text(text) => tokenizer.encode(text, add_special_tokens)?,
                PromptInput::Tokens(ids) => {
                    if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab_size) {
                        return Err(ApiError::bad_param(
                            "input",
                            format!("Token id {bad} is out of vocabulary"),
                        ));
                    }
                    ids.clone()
                }
            };
            let tokens = truncate_prompt(tokens, truncate, max_model_len)?;
            check_pooling_length(tokens.len(), max_model_len)?;
            Ok(tokens)
        })
        .collect()
}

fn check_pooling_length(len: usize, max_model_len: usize) -> Result<(), ApiError> {
    if len > max_model_len {
        return Err(ApiError::bad_request(format!(
            "This model's maximum context length is {max_model_len} tokens. However, you \
             requested {len} tokens in the input for embedding generation. Please reduce the \
             length of the input."
        )));
    }
    Ok(())
}

pub async fn embeddings(
    State(handle): State<EngineHandle>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let body = parse_body(&body)?;
    let request: EmbeddingFields = fields(&body)?;
    check_model(&handle, request.model.as_deref())?;
    check_task(&handle, Task::Embed, "Embeddings")?;
    if request.dimensions.is_some() {
        return Err(ApiError::bad_param(
            "dimensions",
            format!(
                "Model \"{}\" does not support matryoshka representation, changing output \
                 dimensions will lead to poor results.",
                handle.info().served_model_name
            ),
        ));
    }
    let base64 = match request.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::bad_param(
                "encoding_format",
                format!("encoding_format must be `float` or `base64`, got `{other}`."),
            ))
        }
    };
    let (prompts, default_special) = match (&request.input, &request.messages) {
        (Some(input), None) => (parse_prompts(input, "input")?, true),
        (None, Some(messages)) => {
            let options = ChatTemplateOptions {
                add_generation_prompt: request.add_generation_prompt.unwrap_or(false),
                continue_final_message: request.continue_final_message.unwrap_or(false),
                chat_template: request.chat_template.clone(),
                kwargs: request.chat_template_kwargs.clone().unwrap_or_default(),
                tools: None,
                documents: None,
            };
            let messages = normalize_messages(messages)?;
            let text = handle
                .tokenizer()
                .apply_chat_template(&messages, &options)?;
            (vec![PromptInput::Text(text)], false)
        }
        _ => {
            return Err(ApiError::bad_request(
                "Either `input` or `messages` must be given, not both.",
            ))
        }
    };
    let inputs = encode_for_pooling(
        &handle,
        &prompts,
        request.add_special_tokens.unwrap_or(default_special),
        request.truncate_prompt_tokens,
    )?;
    let prompt_tokens: usize = inputs.iter().map(Vec::len).sum();
    let vectors = handle.embed(inputs).await?;
    let data: Vec<Value> = vectors
        .iter()
        .enumerate()
        .map(|(index, vector)| {
            let embedding = if base64 {
                json!(base64_f32(vector))
            } else {
                json!(vector)
            };
            json!({"index": index, "object": "embedding", "embedding": embedding})
        })
        .collect();
    Ok(Json(json!({
        "id": response_id("embd-", request.request_id.as_deref()),
        "object": "list",
        "created": unix_now(),
        "model": handle.info().served_model_name,
        "data": data,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    })))
}

/// Standard base64 (with padding) of the vector's little-endian f32 bytes.
pub fn base64_f32(vector: &[f32]) -> String {
    let bytes: Vec<u8> = vector.iter().flat_map(|v| v.to_le_bytes()).collect();
    base64(&bytes)
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for group in bytes.chunks(3) {
        let b = [
            group[0],
            group.get(1).copied().unwrap_or(0),
            group.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= group.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (input, expected) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(input.as_bytes()), expected, "{input}");
        }
    }

    #[test]
    fn base64_of_floats_is_little_endian() {
        // 1.0f32 = 0x3F800000 → bytes 00 00 80 3F; -2.0 = 0xC0000000 → 00 00 00 C0.
        assert_eq!(base64_f32(&[1.0]), "AACAPw==");
        assert_eq!(base64_f32(&[1.0, -2.0]), "AACAPwAAAMA=");
    }

    #[test]
    fn pooling_length_error() {
        assert!(check_pooling_length(512, 512).is_ok());
        let err = check_pooling_length(513, 512).unwrap_err();
        assert!(err.message.contains("maximum context length is 512 tokens"));
        assert!(err.message.contains("513 tokens in the input"));
    }

    #[test]
    fn fields_parse_and_name_bad_types() {
        let request: EmbeddingFields =
            fields(&json!({"input": "hi", "encoding_format": "base64"})).unwrap();
        assert_eq!(request.encoding_format.as_deref(), Some("base64"));
        let err = fields::<EmbeddingFields>(&json!({"dimensions": "x"})).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("dimensions"));
    }
}
