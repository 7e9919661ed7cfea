//! `POST /tokenize` (a prompt, or messages through the chat template) and `POST /detokenize`.

use axum::body::Bytes;
use axum::extract::State;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::errors::ApiError;
use super::openai::{check_model, fields, normalize_messages, parse_body};
use crate::chat_template::ChatTemplateOptions;
use crate::engine::EngineHandle;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct TokenizeFields {
    pub model: Option<String>,
    pub prompt: Option<String>,
    pub messages: Option<Value>,
    pub add_special_tokens: Option<bool>,
    pub return_token_strs: Option<bool>,
    pub add_generation_prompt: Option<bool>,
    pub continue_final_message: Option<bool>,
    pub chat_template: Option<String>,
    pub chat_template_kwargs: Option<Map<String, Value>>,
    pub tools: Option<Value>,
    pub documents: Option<Value>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct DetokenizeFields {
    pub model: Option<String>,
    pub tokens: Option<Vec<u32>>,
}

/// What to encode and with which default for special tokens (prompts: true, chat: false).
enum TokenizeInput {
    Prompt(String),
    Messages(Value),
}

impl TokenizeFields {
    fn input(&self) -> Result<TokenizeInput, ApiError> {
        match (&self.prompt, &self.messages) {
            (Some(prompt), None) => Ok(TokenizeInput::Prompt(prompt.clone())),
            (None, Some(messages)) => Ok(TokenizeInput::Messages(messages.clone())),
            _ => Err(ApiError::bad_request(
                "Either `prompt` or `messages` must be given, not both.",
            )),
        }
    }
}

pub async fn tokenize(
    State(handle): State<EngineHandle>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let body = parse_body(&body)?;
    let request: TokenizeFields = fields(&body)?;
    check_model(&handle, request.model.as_deref())?;
    let tokenizer = handle.tokenizer();
    let tokens = match request.input()? {
        TokenizeInput::Prompt(prompt) => {
            tokenizer.encode(&prompt, request.add_special_tokens.unwrap_or(true))?
        }
        TokenizeInput::Messages(messages) => {
            let add_generation_prompt = request.add_generation_prompt.unwrap_or(true);
            let continue_final_message = request.continue_final_message.unwrap_or(false);
            if add_generation_prompt && continue_final_message {
                return Err(ApiError::bad_param(
                    "continue_final_message",
                    "Cannot set both `continue_final_message` and `add_generation_prompt` to \
                     True.",
                ));
            }
            let options = ChatTemplateOptions {
                add_generation_prompt,
                continue_final_message,
                chat_template: request.chat_template.clone(),
                kwargs: request.chat_template_kwargs.clone().unwrap_or_default(),
                tools: request.tools.clone(),
                documents: request.documents.clone(),
            };
            let text = tokenizer.apply_chat_template(&normalize_messages(&messages)?, &options)?;
            tokenizer.encode(&text, request.add_special_tokens.unwrap_or(false))?
        }
    };
    let token_strs = request.return_token_strs.unwrap_or(false).then(|| {
        tokens
            .iter()
            .map(|&id| tokenizer.id_to_token(id).unwrap_or_default())
            .collect::<Vec<_>>()
    });
    Ok(Json(json!({
        "count": tokens.len(),
        "max_model_len": handle.info().max_model_len,
        "tokens": tokens,
        "token_strs": token_strs,
    })))
}

pub async fn detokenize(
    State(handle): State<EngineHandle>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let body = parse_body(&body)?;
    let request: DetokenizeFields = fields(&body)?;
    check_model(&handle, request.model.as_deref())?;
    let tokens = request
        .tokens
        .ok_or_else(|| ApiError::bad_param("tokens", "tokens is required."))?;
    let tokenizer = handle.tokenizer();
    let vocab_size = tokenizer.vocab_size();
    if let Some(bad) = tokens.iter().find(|&&id| id as usize >= vocab_size) {
        return Err(ApiError::bad_param(
            "tokens",
            format!("Token id {bad} is out of vocabulary"),
        ));
    }
    Ok(Json(json!({ "prompt": tokenizer.decode(&tokens, false)? })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_or_messages_but_not_both() {
        let prompt: TokenizeFields = fields(&json!({"prompt": "hi"})).unwrap();
        assert!(matches!(prompt.input(), Ok(TokenizeInput::Prompt(p)) if p == "hi"));
        let messages: TokenizeFields =
            fields(&json!({"messages": [{"role": "user", "content": "x"}]})).unwrap();
        assert!(matches!(messages.input(), Ok(TokenizeInput::Messages(_))));
        let both: TokenizeFields = fields(&json!({"prompt": "a", "messages": []})).unwrap();
        assert!(both.input().is_err());
        let neither: TokenizeFields = fields(&json!({})).unwrap();
        assert!(neither.input().is_err());
    }

    #[test]
    fn bad_types_name_the_field() {
        let err = fields::<DetokenizeFields>(&json!({"tokens": [1, "x"]})).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("tokens[1]"));
        let err = fields::<TokenizeFields>(&json!({"prompt": 5})).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("prompt"));
    }
}
