//! `POST /v1/chat/completions`: messages → chat template → tokens → engine, answered whole or
//! streamed as `chat.completion.chunk`s.

use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::errors::ApiError;
use super::generation::{self, RequestOutput, RequestSettings};
use super::logprobs::{chat_logprobs, TokenText};
use super::openai::{
    check_model, check_task, fields, last_message_content, normalize_messages, parse_body,
    sampling_params, ChatFields, PromptLimits, SamplingFields, UsageReporting,
};
use super::sse::{
    finish_reason_json, sse_body, sse_response, steps, stop_reason_json, usage_json, ChunkDue,
    ChunkFormatter, StreamStep,
};
use crate::chat_template::ChatTemplateOptions;
use crate::engine::{EngineHandle, GenerateEvent, Task};

/// How a chat response is dressed, whole or streamed.
#[derive(Clone)]
pub struct ChatShape {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub n: usize,
    /// `echo`: the last message's text, repeated before the answer.
    pub echo: Option<String>,
    pub logprobs: bool,
    pub token_text: TokenText,
    /// `return_token_ids`: the prompt ids to report.
    pub prompt_token_ids: Option<Vec<u32>>,
}

pub async fn chat_completions(
    State(handle): State<EngineHandle>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let body = parse_body(&body)?;
    let sampling: SamplingFields = fields(&body)?;
    let chat: ChatFields = fields(&body)?;
    check_model(&handle, sampling.model.as_deref())?;
    check_task(&handle, Task::Generate, "Chat Completions")?;
    sampling.reject_unsupported()?;
    chat.reject_unsupported()?;
    let logprobs = chat.logprobs()?;

    let add_generation_prompt = chat.add_generation_prompt.unwrap_or(true);
    let continue_final_message = chat.continue_final_message.unwrap_or(false);
    if add_generation_prompt && continue_final_message {
        return Err(ApiError::bad_param(
            "continue_final_message",
            "Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
        ));
    }
    let messages = normalize_messages(&chat.messages)?;
    let options = ChatTemplateOptions {
        add_generation_prompt,
        continue_final_message,
        chat_template: chat.chat_template.clone(),
        kwargs: chat.chat_template_kwargs.clone().unwrap_or_default(),
        tools: chat.tools.clone(),
        documents: chat.documents.clone(),
    };
    let tokenizer = handle.tokenizer();
    let prompt = tokenizer.apply_chat_template(&messages, &options)?;
    let add_special_tokens = chat.add_special_tokens.unwrap_or(false);
    let max_model_len = handle.info().max_model_len;
    let prompt_tokens = sampling.truncate_prompt(
        tokenizer.encode(&prompt, add_special_tokens)?,
        max_model_len,
    )?;
    let limits = PromptLimits {
        prompt_len: prompt_tokens.len(),
        max_model_len,
        vocab_size: tokenizer.vocab_size(),
    };
    let params = sampling_params(
        &sampling,
        logprobs,
        limits,
        &super::sampling_defaults(&handle),
    )?;

    // vLLM echoes the last message when it has the role being generated.
    let echo = if chat.echo.unwrap_or(false) {
        let role = if add_generation_prompt {
            "assistant"
        } else {
            messages
                .as_array()
                .and_then(|list| list.last())
                .and_then(|last| last["role"].as_str())
                .unwrap_or("assistant")
        };
        Some(last_message_content(&messages, role).unwrap_or_default())
    } else {
        None
    };
    let shape = ChatShape {
        id: generation::response_id("chatcmpl-", sampling.request_id.as_deref()),
        created: generation::unix_now(),
        model: handle.info().served_model_name.clone(),
        n: params.n,
        echo,
        logprobs: params.logprobs.is_some(),
        token_text: generation::token_text(
            &handle,
            sampling.return_tokens_as_token_ids.unwrap_or(false),
        ),
        prompt_token_ids: sampling
            .return_token_ids
            .unwrap_or(false)
            .then(|| prompt_tokens.clone()),
    };
    let prompt_len = prompt_tokens.len();
    let rx = generation::start(
        &handle,
        prompt_tokens,
        RequestSettings {
            engine_request_id: shape.id.clone(),
            params,
            cache_salt: sampling.cache_salt.as_deref(),
            priority: sampling.priority.unwrap_or(0),
        },
    )?;
    if sampling.wants_stream() {
        let formatter = ChatFormatter::new(shape, sampling.usage_reporting(), prompt_len);
        Ok(sse_response(sse_body(vec![rx], formatter)))
    } else {
        let output = generation::collect(rx, shape.n).await?;
        Ok(Json(chat_response(&shape, &output)).into_response())
    }
}

/// The whole `chat.completion` object.
pub fn chat_response(shape: &ChatShape, output: &RequestOutput) -> Value {
    let choices: Vec<Value> = output
        .choices
        .iter()
        .enumerate()
        .map(|(index, choice)| {
            let content = match &shape.echo {
                Some(echo) => format!("{echo}{}", choice.text),
                None => choice.text.clone(),
            };
            let mut value = json!({
                "index": index,
                "message": {
                    "role": "assistant",
                    "content": content,
                    "reasoning_content": null,
                    "tool_calls": [],
                },
                "logprobs": if shape.logprobs {
                    chat_logprobs(&choice.logprobs, &shape.token_text)
                } else {
                    Value::Null
                },
                "finish_reason": finish_reason_json(choice.finish_ref()),
                "stop_reason": stop_reason_json(choice.finish_ref()),
            });
            if shape.prompt_token_ids.is_some() {
                value["token_ids"] = json!(choice.token_ids);
            }
            value
        })
        .collect();
    let mut response = json!({
        "id": shape.id,
        "object": "chat.completion",
        "created": shape.created,
        "model": shape.model,
        "choices": choices,
        "usage": usage_json(output.prompt_tokens, output.completion_tokens),
    });
    if let Some(ids) = &shape.prompt_token_ids {
        response["prompt_token_ids"] = json!(ids);
    }
    response
}

/// Streams `chat.completion.chunk`s: a role chunk per choice, then content deltas with
/// `finish_reason` on each choice's last one, then the usage chunk when asked.
pub struct ChatFormatter {
    shape: ChatShape,
    usage: UsageReporting,
    prompt_tokens: usize,
    completion_tokens: usize,
}

impl ChatFormatter {
    pub fn new(shape: ChatShape, usage: UsageReporting, prompt_tokens: usize) -> Self {
        ChatFormatter {
            shape,
            usage,
            prompt_tokens,
            completion_tokens: 0,
        }
    }

    fn chunk(&self, choices: Vec<Value>) -> Value {
        let mut chunk = json!({
            "id": self.shape.id,
            "object": "chat.completion.chunk",
            "created": self.shape.created,
            "model": self.shape.model,
            "choices": choices,
        });
        if self.usage.every_chunk {
            chunk["usage"] = usage_json(self.prompt_tokens, self.completion_tokens);
        }
        chunk
    }

    fn choice(index: usize, delta: Value) -> Value {
        json!({
            "index": index,
            "delta": delta,
            "logprobs": null,
            "finish_reason": null,
        })
    }
}

impl ChunkFormatter for ChatFormatter {
    fn start(&mut self) -> Vec<Value> {
        let mut chunks = Vec::new();
        for index in 0..self.shape.n {
            let choice = Self::choice(index, json!({"role": "assistant", "content": ""}));
            let mut chunk = self.chunk(vec![choice]);
            if let Some(ids) = &self.shape.prompt_token_ids {
                chunk["prompt_token_ids"] = json!(ids);
            }
            chunks.push(chunk);
        }
        if let Some(echo) = self.shape.echo.clone().filter(|e| !e.is_empty()) {
            for index in 0..self.shape.n {
                chunks.push(self.chunk(vec![Self::choice(index, json!({"content": echo}))]));
            }
        }
        chunks
    }

    fn on_batch(&mut self, _source: usize, events: &[GenerateEvent]) -> Vec<Value> {
        let mut chunks = Vec::new();
        for step in steps(events) {
            match step {
                StreamStep::Choice {
                    index,
                    text,
                    token_ids,
                    logprobs,
                    finish,
                } => {
                    self.completion_tokens += token_ids.len();
                    let report_ids = self.shape.prompt_token_ids.is_some();
                    let due = ChunkDue {
                        text,
                        finish: finish.is_some(),
                        logprobs: self.shape.logprobs && !logprobs.is_empty(),
                        token_ids: report_ids && !token_ids.is_empty(),
                    };
                    if !due.any() {
                        continue;
                    }
                    let mut choice = json!({
                        "index": index,
                        "delta": {"content": text},
                        "logprobs": if self.shape.logprobs && !logprobs.is_empty() {
                            chat_logprobs(logprobs, &self.shape.token_text)
                        } else {
                            Value::Null
                        },
                        "finish_reason": finish_reason_json(finish),
                        "stop_reason": stop_reason_json(finish),
                    });
                    if report_ids {
                        choice["token_ids"] = json!(token_ids);
                    }
                    chunks.push(self.chunk(vec![choice]));
                }
                StreamStep::Done {
                    prompt_tokens,
                    completion_tokens,
                } => {
                    self.prompt_tokens = prompt_tokens;
                    self.completion_tokens = completion_tokens;
                }
            }
        }
        chunks
    }

    fn finish(&mut self) -> Vec<Value> {
        if !self.usage.final_chunk {
            return Vec::new();
        }
        vec![json!({
            "id": self.shape.id,
            "object": "chat.completion.chunk",
            "created": self.shape.created,
            "model": self.shape.model,
            "choices": [],
            "usage": usage_json(self.prompt_tokens, self.completion_tokens),
        })]
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::api::generation::ChoiceOutput;
    use crate::api::sse::tests::{collect_frames, delta, scripted};
    use crate::engine::{FinishReason, StopReason};
    use crate::sampling::TokenLogprob;

    fn shape(n: usize) -> ChatShape {
        ChatShape {
            id: "chatcmpl-test".into(),
            created: 1_700_000_000,
            model: "smol".into(),
            n,
            echo: None,
            logprobs: false,
            token_text: Arc::new(|id| format!("t{id}")),
            prompt_token_ids: None,
        }
    }

    fn parse(frames: &[String]) -> Vec<Value> {
        frames[..frames.len() - 1]
            .iter()
            .map(|f| serde_json::from_str(f).unwrap())
            .collect()
    }

    fn script() -> Vec<GenerateEvent> {
        vec![
            delta(0, "Hel", 1),
            delta(0, "lo", 2),
            GenerateEvent::Finished {
                index: 0,
                reason: FinishReason::Stop,
                stop_reason: None,
            },
            GenerateEvent::Done {
                prompt_tokens: 5,
                completion_tokens: 2,
            },
        ]
    }

    #[tokio::test]
    async fn stream_of_scripted_events() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let formatter = ChatFormatter::new(
            shape(1),
            UsageReporting {
                final_chunk: true,
                every_chunk: false,
            },
            5,
        );
        let body = sse_body(vec![rx], formatter);
        // All events are waiting when the body is first polled: one batch.
        for event in script() {
            tx.send(event).unwrap();
        }
        drop(tx);
        let frames = collect_frames(body).await;
        assert_eq!(frames.last().unwrap(), "[DONE]");
        let chunks = parse(&frames);
        assert_eq!(chunks.len(), 4, "{frames:#?}");
        for chunk in &chunks {
            assert_eq!(chunk["id"], "chatcmpl-test");
            assert_eq!(chunk["object"], "chat.completion.chunk");
            assert_eq!(chunk["model"], "smol");
            assert_eq!(chunk["created"], 1_700_000_000);
        }
        assert_eq!(
            chunks[0]["choices"],
            json!([{"index": 0, "delta": {"role": "assistant", "content": ""},
                    "logprobs": null, "finish_reason": null}])
        );
        // "Hel" and "lo" came in one batch with the end: "Hel" plain, "lo" finishing.
        assert_eq!(chunks[1]["choices"][0]["delta"], json!({"content": "Hel"}));
        assert_eq!(chunks[1]["choices"][0]["finish_reason"], Value::Null);
        assert_eq!(
            chunks[2]["choices"][0],
            json!({"index": 0, "delta": {"content": "lo"}, "logprobs": null,
                   "finish_reason": "stop", "stop_reason": null})
        );
        assert_eq!(chunks[3]["choices"], json!([]));
        assert_eq!(
            chunks[3]["usage"],
            json!({"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7})
        );
        assert!(chunks[..3].iter().all(|c| c.get("usage").is_none()));
    }

    #[test]
    fn finish_arriving_alone_gets_an_empty_content_chunk() {
        let mut formatter = ChatFormatter::new(shape(1), UsageReporting::default(), 5);
        let first = formatter.on_batch(0, &[delta(0, "a", 1)]);
        let last = formatter.on_batch(
            0,
            &[GenerateEvent::Finished {
                index: 0,
                reason: FinishReason::Stop,
                stop_reason: Some(StopReason::Token(42)),
            }],
        );
        assert_eq!(first[0]["choices"][0]["finish_reason"], Value::Null);
        assert_eq!(last[0]["choices"][0]["delta"], json!({"content": ""}));
        assert_eq!(last[0]["choices"][0]["finish_reason"], "stop");
        assert_eq!(last[0]["choices"][0]["stop_reason"], 42);
        // Without stream_options no usage chunk follows.
        assert!(formatter.finish().is_empty());
    }

    #[tokio::test]
    async fn continuous_usage_and_n_role_chunks() {
        let rx = scripted(vec![
            delta(1, "b", 7),
            delta(0, "a", 6),
            GenerateEvent::Finished {
                index: 0,
                reason: FinishReason::Length,
                stop_reason: None,
            },
            GenerateEvent::Finished {
                index: 1,
                reason: FinishReason::Length,
                stop_reason: None,
            },
            GenerateEvent::Done {
                prompt_tokens: 3,
                completion_tokens: 2,
            },
        ]);
        let formatter = ChatFormatter::new(
            shape(2),
            UsageReporting {
                final_chunk: true,
                every_chunk: true,
            },
            3,
        );
        let chunks = parse(&collect_frames(sse_body(vec![rx], formatter)).await);
        assert_eq!(chunks[0]["choices"][0]["index"], 0);
        assert_eq!(chunks[1]["choices"][0]["index"], 1);
        assert_eq!(chunks[1]["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(chunks[0]["usage"]["completion_tokens"], 0);
        assert_eq!(chunks[2]["choices"][0]["index"], 1);
        assert_eq!(chunks[2]["usage"]["completion_tokens"], 1);
        assert_eq!(chunks[3]["usage"]["completion_tokens"], 2);
        assert_eq!(chunks[3]["usage"]["total_tokens"], 5);
        let last = chunks.last().unwrap();
        assert_eq!(last["choices"], json!([]));
        assert_eq!(last["usage"]["prompt_tokens"], 3);
    }

    #[tokio::test]
    async fn stream_logprobs_echo_and_token_ids() {
        let mut shape = shape(1);
        shape.logprobs = true;
        shape.echo = Some("The".into());
        shape.prompt_token_ids = Some(vec![4, 5]);
        let rx = scripted(vec![
            GenerateEvent::Delta {
                index: 0,
                text: " end".into(),
                token_ids: vec![3],
                logprobs: vec![TokenLogprob {
                    token: 3,
                    logprob: -0.5,
                    top: vec![],
                }],
            },
            GenerateEvent::Finished {
                index: 0,
                reason: FinishReason::Stop,
                stop_reason: Some(StopReason::Text("!".into())),
            },
            GenerateEvent::Done {
                prompt_tokens: 2,
                completion_tokens: 1,
            },
        ]);
        let formatter = ChatFormatter::new(shape, UsageReporting::default(), 2);
        let chunks = parse(&collect_frames(sse_body(vec![rx], formatter)).await);
        assert_eq!(chunks.len(), 3);
        assert_eq!(chunks[0]["prompt_token_ids"], json!([4, 5]));
        assert_eq!(chunks[1]["choices"][0]["delta"], json!({"content": "The"}));
        let last = &chunks[2]["choices"][0];
        assert_eq!(last["token_ids"], json!([3]));
        assert_eq!(last["stop_reason"], "!");
        assert_eq!(
            last["logprobs"],
            json!({"content": [{"token": "t3", "logprob": -0.5, "bytes": [116, 51],
                                "top_logprobs": []}]})
        );
    }

    #[tokio::test]
    async fn held_back_tokens_make_no_empty_chunk() {
        let rx = scripted(vec![
            delta(0, "", 1),
            GenerateEvent::Done {
                prompt_tokens: 1,
                completion_tokens: 1,
            },
        ]);
        let formatter = ChatFormatter::new(shape(1), UsageReporting::default(), 1);
        let frames = collect_frames(sse_body(vec![rx], formatter)).await;
        // The role chunk and [DONE] only.
        assert_eq!(frames.len(), 2, "{frames:?}");
    }

    #[test]
    fn whole_response_shape() {
        let mut shape = shape(2);
        shape.echo = Some("Sure: ".into());
        let output = RequestOutput {
            choices: vec![
                ChoiceOutput {
                    text: "yes".into(),
                    token_ids: vec![1],
                    logprobs: vec![],
                    finish: Some((FinishReason::Stop, Some(StopReason::Eos))),
                },
                ChoiceOutput {
                    text: "no".into(),
                    token_ids: vec![2],
                    logprobs: vec![],
                    finish: Some((FinishReason::Length, None)),
                },
            ],
            prompt_tokens: 9,
            completion_tokens: 2,
        };
        let response = chat_response(&shape, &output);
        assert_eq!(
            response,
            json!({
                "id": "chatcmpl-test", "object": "chat.completion", "created": 1_700_000_000,
                "model": "smol",
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": "Sure: yes",
                     "reasoning_content": null, "tool_calls": []},
                     "logprobs": null, "finish_reason": "stop", "stop_reason": null},
                    {"index": 1, "message": {"role": "assistant", "content": "Sure: no",
                     "reasoning_content": null, "tool_calls": []},
                     "logprobs": null, "finish_reason": "length", "stop_reason": null}
                ],
                "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}
            })
        );
    }
}
