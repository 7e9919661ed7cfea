//! `POST /v1/completions`: one engine request per prompt (a string, strings, token ids or lists
//! of ids), `n` choices each; choice `index` = prompt × n + choice, as vLLM numbers them.

use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::errors::ApiError;
use super::generation::{self, RequestOutput, RequestSettings};
use super::logprobs::{CompletionLogprobs, TokenText};
use super::openai::{
    check_context, check_model, check_task, fields, parse_body, parse_prompts, sampling_params,
    CompletionFields, PromptInput, PromptLimits, SamplingFields, UsageReporting,
};
use super::sse::{
    finish_reason_json, sse_body, sse_response, steps, stop_reason_json, usage_json, ChunkDue,
    ChunkFormatter, StreamStep,
};
use crate::engine::{EngineHandle, FinishReason, GenerateEvent, Task};

/// How a completion response is dressed, whole or streamed.
#[derive(Clone)]
pub struct CompletionShape {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub n: usize,
    /// Per prompt: its text when `echo` is on.
    pub echo: Vec<Option<String>>,
    pub logprobs: bool,
    pub token_text: TokenText,
    /// Per prompt, with `return_token_ids`: the ids to report.
    pub prompt_token_ids: Option<Vec<Vec<u32>>>,
}

impl CompletionShape {
    fn echo_text(&self, source: usize) -> &str {
        self.echo
            .get(source)
            .and_then(|e| e.as_deref())
            .unwrap_or("")
    }
}

pub async fn completions(
    State(handle): State<EngineHandle>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let body = parse_body(&body)?;
    let sampling: SamplingFields = fields(&body)?;
    let completion: CompletionFields = fields(&body)?;
    check_model(&handle, sampling.model.as_deref())?;
    check_task(&handle, Task::Generate, "Completions")?;
    sampling.reject_unsupported()?;
    if completion.suffix.is_some() {
        return Err(ApiError::unsupported("suffix", "suffix"));
    }
    let echo = completion.echo.unwrap_or(false);
    let logprobs = completion.logprobs.map(|k| k as usize);
    if echo && logprobs.is_some() {
        // The echoed prompt would need prompt logprobs.
        return Err(ApiError::unsupported("echo", "echo together with logprobs"));
    }
    let prompts = parse_prompts(&completion.prompt, "prompt")?;
    let tokenizer = handle.tokenizer();
    let max_model_len = handle.info().max_model_len;
    let vocab_size = tokenizer.vocab_size();
    let add_special_tokens = completion.add_special_tokens.unwrap_or(true);
    let requested_max = sampling.max_completion_tokens.or(sampling.max_tokens);
    // vLLM answers `echo` with max_tokens 0 from the prompt alone.
    let echo_only = echo && requested_max == Some(0);

    let id = generation::response_id("cmpl-", sampling.request_id.as_deref());
    let mut receivers = Vec::with_capacity(prompts.len());
    let mut echo_texts = Vec::with_capacity(prompts.len());
    let mut prompt_ids = Vec::with_capacity(prompts.len());
    let mut n = sampling.n.unwrap_or(1) as usize;
    for (source, prompt) in prompts.into_iter().enumerate() {
        let tokens = match &prompt {
            PromptInput::Text(text) => tokenizer.encode(text, add_special_tokens)?,
            PromptInput::Tokens(ids) => {
                if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab_size) {
                    return Err(ApiError::bad_param(
                        "prompt",
                        format!("Token id {bad} is out of vocabulary"),
                    ));
                }
                ids.clone()
            }
        };
        let tokens = sampling.truncate_prompt(tokens, max_model_len)?;
        if echo {
            let text = match (&prompt, sampling.truncate_prompt_tokens) {
                (PromptInput::Text(text), None) => text.clone(),
                _ => tokenizer.decode(&tokens, false)?,
            };
            echo_texts.push(Some(text));
        } else {
            echo_texts.push(None);
        }
        if echo_only {
            if n == 0 {
                return Err(ApiError::bad_param("n", "n must be at least 1, got 0."));
            }
            check_context(tokens.len(), Some(0), max_model_len)?;
            receivers.push(echo_only_events(n, tokens.len()));
        } else {
            let limits = PromptLimits {
                prompt_len: tokens.len(),
                max_model_len,
                vocab_size,
            };
            let params = sampling_params(
                &sampling,
                logprobs,
                limits,
                &super::sampling_defaults(&handle),
            )?;
            n = params.n;
            receivers.push(generation::start(
                &handle,
                tokens.clone(),
                RequestSettings {
                    engine_request_id: format!("{id}-{source}"),
                    params,
                    cache_salt: sampling.cache_salt.as_deref(),
                    priority: sampling.priority.unwrap_or(0),
                },
            )?);
        }
        prompt_ids.push(tokens);
    }

    let prompt_tokens: usize = prompt_ids.iter().map(Vec::len).sum();
    let shape = CompletionShape {
        id,
        created: generation::unix_now(),
        model: handle.info().served_model_name.clone(),
        n,
        echo: echo_texts,
        logprobs: logprobs.is_some(),
        token_text: generation::token_text(
            &handle,
            sampling.return_tokens_as_token_ids.unwrap_or(false),
        ),
        prompt_token_ids: sampling
            .return_token_ids
            .unwrap_or(false)
            .then_some(prompt_ids),
    };
    if sampling.wants_stream() {
        let formatter = CompletionFormatter::new(shape, sampling.usage_reporting(), prompt_tokens);
        Ok(sse_response(sse_body(receivers, formatter)))
    } else {
        let mut outputs = Vec::with_capacity(receivers.len());
        for rx in receivers {
            outputs.push(generation::collect(rx, n).await?);
        }
        Ok(Json(completion_response(&shape, &outputs)).into_response())
    }
}

/// The events of a request that only echoes its prompt: every choice ends at once.
fn echo_only_events(n: usize, prompt_len: usize) -> mpsc::UnboundedReceiver<GenerateEvent> {
    let (tx, rx) = mpsc::unbounded_channel();
    for index in 0..n {
        let _ = tx.send(GenerateEvent::Finished {
            index,
            reason: FinishReason::Length,
            stop_reason: None,
        });
    }
    let _ = tx.send(GenerateEvent::Done {
        prompt_tokens: prompt_len,
        completion_tokens: 0,
    });
    rx
}

/// The whole `text_completion` object, prompts in order.
pub fn completion_response(shape: &CompletionShape, outputs: &[RequestOutput]) -> Value {
    let mut choices = Vec::new();
    for (source, output) in outputs.iter().enumerate() {
        let echo = shape.echo_text(source);
        for (index, choice) in output.choices.iter().enumerate() {
            let logprobs = if shape.logprobs {
                let mut logprobs = CompletionLogprobs::starting_at(echo.chars().count());
                for entry in &choice.logprobs {
                    logprobs.push(entry, &shape.token_text);
                }
                logprobs.take()
            } else {
                Value::Null
            };
            let mut value = json!({
                "index": source * shape.n + index,
                "text": format!("{echo}{}", choice.text),
                "logprobs": logprobs,
                "finish_reason": finish_reason_json(choice.finish_ref()),
                "stop_reason": stop_reason_json(choice.finish_ref()),
            });
            if let Some(ids) = &shape.prompt_token_ids {
                value["prompt_token_ids"] = json!(ids[source]);
                value["token_ids"] = json!(choice.token_ids);
            }
            choices.push(value);
        }
    }
    let prompt_tokens = outputs.iter().map(|o| o.prompt_tokens).sum();
    let completion_tokens = outputs.iter().map(|o| o.completion_tokens).sum();
    json!({
        "id": shape.id,
        "object": "text_completion",
        "created": shape.created,
        "model": shape.model,
        "choices": choices,
        "usage": usage_json(prompt_tokens, completion_tokens),
    })
}

/// Streams `text_completion` chunks: echoed prompts first, then text deltas with
/// `finish_reason` on each choice's last one, then the usage chunk when asked.
pub struct CompletionFormatter {
    shape: CompletionShape,
    usage: UsageReporting,
    prompt_tokens: usize,
    completion_tokens: usize,
    /// Per prompt, from its `Done`: (prompt tokens, completion tokens).
    done: Vec<Option<(usize, usize)>>,
    /// Per global choice index: offsets carry on from chunk to chunk.
    logprobs: Vec<CompletionLogprobs>,
}

impl CompletionFormatter {
    pub fn new(shape: CompletionShape, usage: UsageReporting, prompt_tokens: usize) -> Self {
        let sources = shape.echo.len();
        let logprobs = (0..sources * shape.n)
            .map(|choice| {
                CompletionLogprobs::starting_at(shape.echo_text(choice / shape.n).chars().count())
            })
            .collect();
        CompletionFormatter {
            shape,
            usage,
            prompt_tokens,
            completion_tokens: 0,
            done: vec![None; sources],
            logprobs,
        }
    }

    fn chunk(&self, choice: Value) -> Value {
        let mut chunk = json!({
            "id": self.shape.id,
            "object": "text_completion",
            "created": self.shape.created,
            "model": self.shape.model,
            "choices": [choice],
        });
        if self.usage.every_chunk {
            chunk["usage"] = usage_json(self.prompt_tokens, self.completion_tokens);
        }
        chunk
    }
}

impl ChunkFormatter for CompletionFormatter {
    fn start(&mut self) -> Vec<Value> {
        let mut chunks = Vec::new();
        for source in 0..self.shape.echo.len() {
            let echo = self.shape.echo_text(source).to_owned();
            if echo.is_empty() {
                continue;
            }
            for index in 0..self.shape.n {
                chunks.push(self.chunk(json!({
                    "index": source * self.shape.n + index,
                    "text": echo,
                    "logprobs": null,
                    "finish_reason": null,
                    "stop_reason": null,
                })));
            }
        }
        chunks
    }

    fn on_batch(&mut self, source: usize, events: &[GenerateEvent]) -> Vec<Value> {
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
                    let global = source * self.shape.n + index;
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
                    let logprobs_json = match self.logprobs.get_mut(global) {
                        Some(state) if self.shape.logprobs => {
                            for entry in logprobs {
                                state.push(entry, &self.shape.token_text);
                            }
                            state.take()
                        }
                        _ => Value::Null,
                    };
                    let mut choice = json!({
                        "index": global,
                        "text": text,
                        "logprobs": logprobs_json,
                        "finish_reason": finish_reason_json(finish),
                        "stop_reason": stop_reason_json(finish),
                    });
                    if report_ids {
                        choice["token_ids"] = json!(token_ids);
                    }
                    chunks.push(self.chunk(choice));
                }
                StreamStep::Done {
                    prompt_tokens,
                    completion_tokens,
                } => {
                    if let Some(slot) = self.done.get_mut(source) {
                        *slot = Some((prompt_tokens, completion_tokens));
                    }
                }
            }
        }
        chunks
    }

    fn finish(&mut self) -> Vec<Value> {
        if !self.usage.final_chunk {
            return Vec::new();
        }
        // The engine's own counts when every prompt reported them.
        let (prompt_tokens, completion_tokens) = if self.done.iter().all(Option::is_some) {
            self.done
                .iter()
                .flatten()
                .fold((0, 0), |(p, c), (dp, dc)| (p + dp, c + dc))
        } else {
            (self.prompt_tokens, self.completion_tokens)
        };
        vec![json!({
            "id": self.shape.id,
            "object": "text_completion",
            "created": self.shape.created,
            "model": self.shape.model,
            "choices": [],
            "usage": usage_json(prompt_tokens, completion_tokens),
        })]
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::api::generation::ChoiceOutput;
    use crate::api::sse::tests::{collect_frames, delta, scripted};
    use crate::engine::StopReason;
    use crate::sampling::TokenLogprob;

    fn shape(prompts: usize, n: usize) -> CompletionShape {
        CompletionShape {
            id: "cmpl-test".into(),
            created: 1_700_000_000,
            model: "smol".into(),
            n,
            echo: vec![None; prompts],
            logprobs: false,
            token_text: Arc::new(|id| format!("t{id}")),
            prompt_token_ids: None,
        }
    }

    fn finished(index: usize, reason: FinishReason, stop: Option<StopReason>) -> GenerateEvent {
        GenerateEvent::Finished {
            index,
            reason,
            stop_reason: stop,
        }
    }

    fn done(prompt_tokens: usize, completion_tokens: usize) -> GenerateEvent {
        GenerateEvent::Done {
            prompt_tokens,
            completion_tokens,
        }
    }

    fn parse(frames: &[String]) -> Vec<Value> {
        assert_eq!(frames.last().unwrap(), "[DONE]");
        frames[..frames.len() - 1]
            .iter()
            .map(|f| serde_json::from_str(f).unwrap())
            .collect()
    }

    #[tokio::test]
    async fn two_prompts_stream_with_global_indices_and_usage() {
        let first = scripted(vec![
            delta(0, "a", 1),
            finished(0, FinishReason::Stop, Some(StopReason::Token(7))),
            done(3, 1),
        ]);
        let second = scripted(vec![
            delta(0, "b", 2),
            delta(0, "c", 3),
            finished(0, FinishReason::Length, None),
            done(4, 2),
        ]);
        let formatter = CompletionFormatter::new(
            shape(2, 1),
            UsageReporting {
                final_chunk: true,
                every_chunk: false,
            },
            7,
        );
        let chunks = parse(&collect_frames(sse_body(vec![first, second], formatter)).await);
        assert_eq!(chunks.len(), 4, "{chunks:#?}");
        for chunk in &chunks {
            assert_eq!(chunk["id"], "cmpl-test");
            assert_eq!(chunk["object"], "text_completion");
        }
        let by_index = |i: usize| -> Vec<&Value> {
            chunks[..3]
                .iter()
                .map(|c| &c["choices"][0])
                .filter(|c| c["index"] == i)
                .collect()
        };
        assert_eq!(
            *by_index(0)[0],
            json!({"index": 0, "text": "a", "logprobs": null, "finish_reason": "stop",
                   "stop_reason": 7})
        );
        let second_choice = by_index(1);
        assert_eq!(second_choice.len(), 2);
        assert_eq!(second_choice[0]["text"], "b");
        assert_eq!(second_choice[0]["finish_reason"], Value::Null);
        assert_eq!(second_choice[1]["text"], "c");
        assert_eq!(second_choice[1]["finish_reason"], "length");
        assert_eq!(
            chunks[3],
            json!({"id": "cmpl-test", "object": "text_completion", "created": 1_700_000_000,
                   "model": "smol", "choices": [],
                   "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}})
        );
    }

    #[tokio::test]
    async fn stream_logprobs_offsets_continue_across_chunks() {
        let mut shape = shape(1, 1);
        shape.logprobs = true;
        let lp = |token| TokenLogprob {
            token,
            logprob: -1.0,
            top: vec![],
        };
        let mut formatter = CompletionFormatter::new(shape, UsageReporting::default(), 1);
        let first = formatter.on_batch(
            0,
            &[GenerateEvent::Delta {
                index: 0,
                text: "t10".into(),
                token_ids: vec![10],
                logprobs: vec![lp(10)],
            }],
        );
        let second = formatter.on_batch(
            0,
            &[GenerateEvent::Delta {
                index: 0,
                text: "t2".into(),
                token_ids: vec![2],
                logprobs: vec![lp(2)],
            }],
        );
        assert_eq!(
            first[0]["choices"][0]["logprobs"],
            json!({"tokens": ["t10"], "token_logprobs": [-1.0],
                   "top_logprobs": [{"t10": -1.0}], "text_offset": [0]})
        );
        assert_eq!(
            second[0]["choices"][0]["logprobs"]["text_offset"],
            json!([3])
        );
    }

    #[tokio::test]
    async fn echo_only_request_streams_the_prompt() {
        let mut shape = shape(1, 2);
        shape.echo = vec![Some("Hello".into())];
        let rx = echo_only_events(2, 1);
        let formatter = CompletionFormatter::new(
            shape,
            UsageReporting {
                final_chunk: true,
                every_chunk: true,
            },
            1,
        );
        let chunks = parse(&collect_frames(sse_body(vec![rx], formatter)).await);
        assert_eq!(chunks[0]["choices"][0]["text"], "Hello");
        assert_eq!(chunks[1]["choices"][0]["index"], 1);
        assert_eq!(chunks[0]["usage"]["prompt_tokens"], 1);
        assert_eq!(chunks[2]["choices"][0]["finish_reason"], "length");
        assert_eq!(chunks[2]["choices"][0]["text"], "");
        assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], 0);
    }

    #[tokio::test]
    async fn echo_only_events_collect() {
        let output = generation::collect(echo_only_events(2, 4), 2)
            .await
            .unwrap();
        assert_eq!(output.prompt_tokens, 4);
        assert!(output
            .choices
            .iter()
            .all(|c| c.finish == Some((FinishReason::Length, None))));
    }

    #[test]
    fn whole_response_numbers_choices_across_prompts() {
        let mut shape = shape(2, 2);
        shape.echo = vec![Some("P0 ".into()), Some("P1 ".into())];
        shape.prompt_token_ids = Some(vec![vec![1], vec![2, 3]]);
        let out = |texts: [&str; 2], prompt_tokens| RequestOutput {
            choices: texts
                .iter()
                .map(|t| ChoiceOutput {
                    text: t.to_string(),
                    token_ids: vec![9],
                    logprobs: vec![],
                    finish: Some((FinishReason::Stop, Some(StopReason::Eos))),
                })
                .collect(),
            prompt_tokens,
            completion_tokens: 2,
        };
        let response = completion_response(&shape, &[out(["a", "b"], 1), out(["c", "d"], 2)]);
        let choices = response["choices"].as_array().unwrap();
        let summary: Vec<(u64, &str)> = choices
            .iter()
            .map(|c| (c["index"].as_u64().unwrap(), c["text"].as_str().unwrap()))
            .collect();
        assert_eq!(
            summary,
            vec![(0, "P0 a"), (1, "P0 b"), (2, "P1 c"), (3, "P1 d")]
        );
        assert_eq!(choices[2]["prompt_token_ids"], json!([2, 3]));
        assert_eq!(choices[2]["token_ids"], json!([9]));
        assert_eq!(choices[0]["stop_reason"], Value::Null);
        assert_eq!(choices[0]["finish_reason"], "stop");
        assert_eq!(
            response["usage"],
            json!({"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7})
        );
        assert_eq!(response["object"], "text_completion");
    }
}
