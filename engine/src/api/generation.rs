//! What chat and completions share around the engine: ids, starting requests, gathering the
//! events of a non-streamed request.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc::UnboundedReceiver;

use super::errors::ApiError;
use super::logprobs::TokenText;
use crate::engine::{EngineHandle, FinishReason, GenerateEvent, GenerateRequest, StopReason};
use crate::sampling::{SamplingParams, TokenLogprob};

/// `prefix` + the client's `request_id`, or a fresh uuid (hex) as vLLM makes it.
pub fn response_id(prefix: &str, request_id: Option<&str>) -> String {
    match request_id {
        Some(id) => format!("{prefix}{id}"),
        None => format!("{prefix}{}", uuid::Uuid::new_v4().simple()),
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// How logprob tokens are shown: decoded text, or `token_id:N` when asked.
pub fn token_text(handle: &EngineHandle, as_token_ids: bool) -> TokenText {
    if as_token_ids {
        return Arc::new(|id| format!("token_id:{id}"));
    }
    let handle = handle.clone();
    Arc::new(move |id| handle.tokenizer().decode(&[id], false).unwrap_or_default())
}

/// Everything one request needs besides its prompt.
pub struct RequestSettings<'a> {
    pub engine_request_id: String,
    pub params: SamplingParams,
    pub cache_salt: Option<&'a str>,
    pub priority: i32,
}

pub fn start(
    handle: &EngineHandle,
    prompt_tokens: Vec<u32>,
    settings: RequestSettings<'_>,
) -> Result<UnboundedReceiver<GenerateEvent>, ApiError> {
    Ok(handle.generate(GenerateRequest {
        request_id: settings.engine_request_id,
        prompt_tokens,
        params: settings.params,
        cache_salt: settings.cache_salt.map(str::to_owned),
        priority: settings.priority,
    })?)
}

/// One choice, gathered.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChoiceOutput {
    pub text: String,
    pub token_ids: Vec<u32>,
    pub logprobs: Vec<TokenLogprob>,
    pub finish: Option<(FinishReason, Option<StopReason>)>,
}

impl ChoiceOutput {
    pub fn finish_ref(&self) -> Option<(FinishReason, Option<&StopReason>)> {
        self.finish.as_ref().map(|(r, s)| (*r, s.as_ref()))
    }
}

/// One request (one prompt, `n` choices), gathered.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RequestOutput {
    pub choices: Vec<ChoiceOutput>,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

/// Wait for a request to finish. Dropping this future drops the receiver, which aborts the
/// request (a client that disconnects).
pub async fn collect(
    mut rx: UnboundedReceiver<GenerateEvent>,
    n: usize,
) -> Result<RequestOutput, ApiError> {
    let mut output = RequestOutput {
        choices: vec![ChoiceOutput::default(); n],
        ..RequestOutput::default()
    };
    while let Some(event) = rx.recv().await {
        match event {
            GenerateEvent::Delta {
                index,
                text,
                token_ids,
                logprobs,
            } => {
                let choice = choice_mut(&mut output, index)?;
                choice.text.push_str(&text);
                choice.token_ids.extend(token_ids);
                choice.logprobs.extend(logprobs);
            }
            GenerateEvent::Finished {
                index,
                reason,
                stop_reason,
            } => choice_mut(&mut output, index)?.finish = Some((reason, stop_reason)),
            GenerateEvent::Done {
                prompt_tokens,
                completion_tokens,
            } => {
                output.prompt_tokens = prompt_tokens;
                output.completion_tokens = completion_tokens;
                return Ok(output);
            }
            GenerateEvent::Error(message) => return Err(ApiError::internal(message)),
        }
    }
    Err(ApiError::internal(
        "the engine stopped before the request finished",
    ))
}

fn choice_mut(output: &mut RequestOutput, index: usize) -> Result<&mut ChoiceOutput, ApiError> {
    output
        .choices
        .get_mut(index)
        .ok_or_else(|| ApiError::internal(format!("the engine sent unknown choice {index}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::sse::tests::{delta, scripted};

    #[tokio::test]
    async fn collect_gathers_choices_in_order() {
        let rx = scripted(vec![
            delta(1, "x", 5),
            delta(0, "He", 1),
            delta(0, "llo", 2),
            GenerateEvent::Finished {
                index: 0,
                reason: FinishReason::Stop,
                stop_reason: Some(StopReason::Token(9)),
            },
            GenerateEvent::Finished {
                index: 1,
                reason: FinishReason::Length,
                stop_reason: None,
            },
            GenerateEvent::Done {
                prompt_tokens: 4,
                completion_tokens: 3,
            },
        ]);
        let output = collect(rx, 2).await.unwrap();
        assert_eq!(output.choices[0].text, "Hello");
        assert_eq!(output.choices[0].token_ids, vec![1, 2]);
        assert_eq!(
            output.choices[0].finish,
            Some((FinishReason::Stop, Some(StopReason::Token(9))))
        );
        assert_eq!(output.choices[1].text, "x");
        assert_eq!(output.choices[1].finish, Some((FinishReason::Length, None)));
        assert_eq!((output.prompt_tokens, output.completion_tokens), (4, 3));
    }

    #[tokio::test]
    async fn collect_reports_errors_and_early_close() {
        let err = collect(scripted(vec![GenerateEvent::Error("kv full".into())]), 1)
            .await
            .unwrap_err();
        assert_eq!(err.status, 500);
        assert_eq!(err.message, "kv full");
        let err = collect(scripted(vec![delta(0, "a", 1)]), 1)
            .await
            .unwrap_err();
        assert!(err.message.contains("stopped"));
        let err = collect(scripted(vec![delta(3, "a", 1)]), 1)
            .await
            .unwrap_err();
        assert!(err.message.contains("unknown choice 3"));
    }

    #[test]
    fn ids() {
        assert_eq!(response_id("cmpl-", Some("abc")), "cmpl-abc");
        let fresh = response_id("chatcmpl-", None);
        let hex = fresh.strip_prefix("chatcmpl-").unwrap();
        assert_eq!(hex.len(), 32);
        assert!(hex.chars().all(|c| c.is_ascii_hexdigit()));
    }
}
