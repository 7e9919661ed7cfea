//! Server-sent events: the body stream that owns the engine receivers (dropping it aborts the
//! requests) and hands their events, in batches, to a route's [`ChunkFormatter`].
//!
//! Events already waiting in a receiver are handed over together, so a choice's last text and
//! its end (which the engine sends back to back) become one chunk carrying `finish_reason`, as
//! vLLM sends it, without delaying any text that arrives on its own.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::poll_fn;
use std::task::Poll;

use axum::body::{Body, Bytes};
use axum::http::header;
use axum::response::Response;
use futures_util::Stream;
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedReceiver;

use super::errors::ApiError;
use crate::engine::{FinishReason, GenerateEvent, StopReason};
use crate::sampling::TokenLogprob;

/// Turns one route's events into its JSON chunks.
pub trait ChunkFormatter: Send + 'static {
    /// Chunks sent before any engine output (chat: the role; echo).
    fn start(&mut self) -> Vec<Value>;
    /// Chunks for events that arrived together from request `source` (errors never get here).
    fn on_batch(&mut self, source: usize, events: &[GenerateEvent]) -> Vec<Value>;
    /// Chunks after every request finished (the usage chunk).
    fn finish(&mut self) -> Vec<Value>;
}

/// One chunk's worth of a choice: its new output and, on its last chunk, why it ended.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamStep<'a> {
    Choice {
        index: usize,
        text: &'a str,
        token_ids: &'a [u32],
        logprobs: &'a [TokenLogprob],
        finish: Option<(FinishReason, Option<&'a StopReason>)>,
    },
    Done {
        prompt_tokens: usize,
        completion_tokens: usize,
    },
}

/// Pair each `Delta` with a `Finished` of the same choice that follows it in the batch, so the
/// last content chunk carries `finish_reason`.
pub fn steps(events: &[GenerateEvent]) -> Vec<StreamStep<'_>> {
    let mut consumed = vec![false; events.len()];
    let mut steps = Vec::with_capacity(events.len());
    for (i, event) in events.iter().enumerate() {
        if consumed[i] {
            continue;
        }
        match event {
            GenerateEvent::Delta {
                index,
                text,
                token_ids,
                logprobs,
            } => {
                let next_of_choice = events[i + 1..].iter().position(|e| match e {
                    GenerateEvent::Delta { index: j, .. }
                    | GenerateEvent::Finished { index: j, .. } => j == index,
                    _ => false,
                });
                let mut finish = None;
                if let Some(offset) = next_of_choice {
                    if let GenerateEvent::Finished {
                        reason,
                        stop_reason,
                        ..
                    } = &events[i + 1 + offset]
                    {
                        finish = Some((*reason, stop_reason.as_ref()));
                        consumed[i + 1 + offset] = true;
                    }
                }
                steps.push(StreamStep::Choice {
                    index: *index,
                    text,
                    token_ids,
                    logprobs,
                    finish,
                });
            }
            GenerateEvent::Finished {
                index,
                reason,
                stop_reason,
            } => steps.push(StreamStep::Choice {
                index: *index,
                text: "",
                token_ids: &[],
                logprobs: &[],
                finish: Some((*reason, stop_reason.as_ref())),
            }),
            GenerateEvent::Done {
                prompt_tokens,
                completion_tokens,
            } => steps.push(StreamStep::Done {
                prompt_tokens: *prompt_tokens,
                completion_tokens: *completion_tokens,
            }),
            GenerateEvent::Error(_) => {}
        }
    }
    steps
}

/// What a choice's step has to report. Tokens whose text is held back (a possible stop string,
/// half a UTF-8 character) make no chunk of their own unless something else is due.
pub struct ChunkDue<'a> {
    pub text: &'a str,
    pub finish: bool,
    pub logprobs: bool,
    pub token_ids: bool,
}

impl ChunkDue<'_> {
    pub fn any(&self) -> bool {
        !self.text.is_empty() || self.finish || self.logprobs || self.token_ids
    }
}

/// vLLM's `stop_reason`: null for EOS (and for any other finish), the stop token id or string.
pub fn stop_reason_json(finish: Option<(FinishReason, Option<&StopReason>)>) -> Value {
    match finish {
        Some((FinishReason::Stop, Some(StopReason::Token(id)))) => json!(id),
        Some((FinishReason::Stop, Some(StopReason::Text(text)))) => json!(text),
        _ => Value::Null,
    }
}

pub fn finish_reason_json(finish: Option<(FinishReason, Option<&StopReason>)>) -> Value {
    match finish {
        Some((reason, _)) => json!(reason.as_str()),
        None => Value::Null,
    }
}

pub fn usage_json(prompt_tokens: usize, completion_tokens: usize) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
    })
}

fn frame(value: &Value) -> Bytes {
    Bytes::from(format!("data: {value}\n\n"))
}

const DONE_FRAME: &[u8] = b"data: [DONE]\n\n";

enum Phase {
    Start,
    Running,
    Ended,
}

struct BodyState<F> {
    receivers: Vec<Option<UnboundedReceiver<GenerateEvent>>>,
    done_seen: Vec<bool>,
    /// Where the next wait starts looking, so one busy request cannot starve the others.
    cursor: usize,
    formatter: F,
    pending: VecDeque<Bytes>,
    phase: Phase,
}

/// Wait for the next event of any live receiver; `None` means that receiver closed.
async fn next_event(
    receivers: &mut [Option<UnboundedReceiver<GenerateEvent>>],
    cursor: usize,
) -> (usize, Option<GenerateEvent>) {
    poll_fn(|cx| {
        let count = receivers.len();
        for step in 0..count {
            let source = (cursor + step) % count;
            if let Some(rx) = receivers[source].as_mut() {
                if let Poll::Ready(event) = rx.poll_recv(cx) {
                    return Poll::Ready((source, event));
                }
            }
        }
        Poll::Pending
    })
    .await
}

impl<F: ChunkFormatter> BodyState<F> {
    fn push_all(&mut self, chunks: Vec<Value>) {
        self.pending.extend(chunks.iter().map(frame));
    }

    fn end_with_error(&mut self, message: String) {
        self.pending
            .push_back(frame(&ApiError::internal(message).body()));
        self.pending.push_back(Bytes::from_static(DONE_FRAME));
        // Dropping the receivers aborts whatever is still running.
        self.receivers.iter_mut().for_each(|rx| *rx = None);
        self.phase = Phase::Ended;
    }

    fn end(&mut self) {
        if let Some(source) = self.done_seen.iter().position(|done| !done) {
            self.end_with_error(format!(
                "the engine stopped before request {source} finished"
            ));
            return;
        }
        let chunks = self.formatter.finish();
        self.push_all(chunks);
        self.pending.push_back(Bytes::from_static(DONE_FRAME));
        self.phase = Phase::Ended;
    }

    async fn advance(&mut self) {
        match self.phase {
            Phase::Start => {
                let chunks = self.formatter.start();
                self.push_all(chunks);
                self.phase = Phase::Running;
            }
            Phase::Running => {
                if self.receivers.iter().all(Option::is_none) {
                    self.end();
                    return;
                }
                let (source, first) = next_event(&mut self.receivers, self.cursor).await;
                self.cursor = (source + 1) % self.receivers.len();
                let Some(first) = first else {
                    self.receivers[source] = None;
                    return;
                };
                let mut batch = vec![first];
                if let Some(rx) = self.receivers[source].as_mut() {
                    while let Ok(event) = rx.try_recv() {
                        batch.push(event);
                    }
                }
                let error_at = batch
                    .iter()
                    .position(|e| matches!(e, GenerateEvent::Error(_)));
                let events = &batch[..error_at.unwrap_or(batch.len())];
                if events
                    .iter()
                    .any(|e| matches!(e, GenerateEvent::Done { .. }))
                {
                    self.done_seen[source] = true;
                }
                let chunks = self.formatter.on_batch(source, events);
                self.push_all(chunks);
                if let Some(i) = error_at {
                    let GenerateEvent::Error(message) = &batch[i] else {
                        unreachable!("position matched an error")
                    };
                    self.end_with_error(message.clone());
                }
            }
            Phase::Ended => {}
        }
    }
}

/// The SSE body of one response: `data: <chunk>\n\n` frames, then `data: [DONE]`. It owns the
/// receivers, so a client that goes away drops them and the engine aborts the requests. A
/// receiver that closes without `Done`, or an `Error` event, ends the stream with
/// `data: {"error": …}` before `[DONE]`.
pub fn sse_body<F: ChunkFormatter>(
    receivers: Vec<UnboundedReceiver<GenerateEvent>>,
    formatter: F,
) -> impl Stream<Item = Result<Bytes, Infallible>> + Send + 'static {
    let state = BodyState {
        done_seen: vec![false; receivers.len()],
        receivers: receivers.into_iter().map(Some).collect(),
        cursor: 0,
        formatter,
        pending: VecDeque::new(),
        phase: Phase::Start,
    };
    futures_util::stream::unfold(state, |mut state| async move {
        loop {
            if let Some(bytes) = state.pending.pop_front() {
                return Some((Ok(bytes), state));
            }
            if matches!(state.phase, Phase::Ended) {
                return None;
            }
            state.advance().await;
        }
    })
}

pub fn sse_response<S>(body: S) -> Response
where
    S: Stream<Item = Result<Bytes, Infallible>> + Send + 'static,
{
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(body))
        .expect("static headers are valid")
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use futures_util::StreamExt;
    use tokio::sync::mpsc;

    /// Collect a body into its `data:` payloads, checking the framing on the way.
    pub(crate) async fn collect_frames(
        body: impl Stream<Item = Result<Bytes, Infallible>>,
    ) -> Vec<String> {
        let chunks: Vec<_> = body.collect().await;
        let text: String = chunks
            .into_iter()
            .map(|chunk| String::from_utf8(chunk.unwrap().to_vec()).unwrap())
            .collect();
        assert!(text.ends_with("\n\n"), "{text}");
        text.trim_end_matches("\n\n")
            .split("\n\n")
            .map(|event| {
                event
                    .strip_prefix("data: ")
                    .unwrap_or_else(|| panic!("bad frame {event:?}"))
                    .to_string()
            })
            .collect()
    }

    /// A channel holding a scripted event sequence, its sender dropped.
    pub(crate) fn scripted(events: Vec<GenerateEvent>) -> UnboundedReceiver<GenerateEvent> {
        let (tx, rx) = mpsc::unbounded_channel();
        for event in events {
            tx.send(event).unwrap();
        }
        rx
    }

    pub(crate) fn delta(index: usize, text: &str, token: u32) -> GenerateEvent {
        GenerateEvent::Delta {
            index,
            text: text.into(),
            token_ids: vec![token],
            logprobs: vec![],
        }
    }

    /// Records what it was given, to test the driver alone.
    struct Recorder;

    impl ChunkFormatter for Recorder {
        fn start(&mut self) -> Vec<Value> {
            vec![json!("start")]
        }
        fn on_batch(&mut self, source: usize, events: &[GenerateEvent]) -> Vec<Value> {
            vec![json!({"source": source, "events": events.len()})]
        }
        fn finish(&mut self) -> Vec<Value> {
            vec![json!("finish")]
        }
    }

    #[test]
    fn delta_and_following_finish_pair_up() {
        let stop = GenerateEvent::Finished {
            index: 0,
            reason: FinishReason::Stop,
            stop_reason: Some(StopReason::Text("END".into())),
        };
        let events = vec![
            delta(0, "a", 1),
            delta(1, "b", 2),
            delta(0, "c", 3),
            stop,
            GenerateEvent::Finished {
                index: 1,
                reason: FinishReason::Length,
                stop_reason: None,
            },
        ];
        let steps = steps(&events);
        assert_eq!(steps.len(), 3);
        let finishes: Vec<_> = steps
            .iter()
            .map(|s| match s {
                StreamStep::Choice {
                    index,
                    text,
                    finish,
                    ..
                } => (*index, *text, finish.map(|(r, _)| r)),
                StreamStep::Done { .. } => unreachable!(),
            })
            .collect();
        assert_eq!(
            finishes,
            vec![
                (0, "a", None),
                // Choice 1's next event is its finish, even with choice 0 in between.
                (1, "b", Some(FinishReason::Length)),
                (0, "c", Some(FinishReason::Stop)),
            ]
        );
    }

    #[test]
    fn stop_reason_values() {
        assert_eq!(
            stop_reason_json(Some((FinishReason::Stop, None))),
            Value::Null
        );
        assert_eq!(
            stop_reason_json(Some((FinishReason::Stop, Some(&StopReason::Eos)))),
            Value::Null
        );
        assert_eq!(
            stop_reason_json(Some((FinishReason::Stop, Some(&StopReason::Token(7))))),
            json!(7)
        );
        assert_eq!(
            stop_reason_json(Some((
                FinishReason::Stop,
                Some(&StopReason::Text("x".into()))
            ))),
            json!("x")
        );
        assert_eq!(finish_reason_json(None), Value::Null);
        assert_eq!(
            finish_reason_json(Some((FinishReason::Abort, None))),
            json!("abort")
        );
    }

    #[tokio::test]
    async fn driver_batches_ready_events_and_ends_with_done() {
        let rx = scripted(vec![
            delta(0, "a", 1),
            GenerateEvent::Done {
                prompt_tokens: 1,
                completion_tokens: 1,
            },
        ]);
        let frames = collect_frames(sse_body(vec![rx], Recorder)).await;
        assert_eq!(
            frames,
            vec![
                "\"start\"",
                r#"{"events":2,"source":0}"#,
                "\"finish\"",
                "[DONE]"
            ]
        );
    }

    #[tokio::test]
    async fn error_event_ends_the_stream_with_an_error_frame() {
        let rx = scripted(vec![delta(0, "a", 1), GenerateEvent::Error("boom".into())]);
        let frames = collect_frames(sse_body(vec![rx], Recorder)).await;
        assert_eq!(frames.len(), 4, "{frames:?}");
        assert_eq!(frames[1], r#"{"events":1,"source":0}"#);
        let error: Value = serde_json::from_str(&frames[2]).unwrap();
        assert_eq!(error["error"]["message"], "boom");
        assert_eq!(error["error"]["code"], 500);
        assert_eq!(frames[3], "[DONE]");
    }

    #[tokio::test]
    async fn receiver_closing_without_done_is_an_error() {
        let rx = scripted(vec![delta(0, "a", 1)]);
        let frames = collect_frames(sse_body(vec![rx], Recorder)).await;
        let error: Value = serde_json::from_str(&frames[2]).unwrap();
        assert!(error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("stopped"));
        assert_eq!(frames.last().unwrap(), "[DONE]");
    }

    #[tokio::test]
    async fn dropping_the_body_drops_the_receivers() {
        let (tx, rx) = mpsc::unbounded_channel::<GenerateEvent>();
        let body = sse_body(vec![rx], Recorder);
        let mut body = Box::pin(body);
        // The start chunk comes without any engine output.
        assert!(body.next().await.is_some());
        assert!(!tx.is_closed());
        drop(body);
        assert!(tx.is_closed(), "the engine must see the request abandoned");
    }

    #[tokio::test]
    async fn events_stream_as_they_arrive() {
        let (tx, rx) = mpsc::unbounded_channel::<GenerateEvent>();
        let mut body = Box::pin(sse_body(vec![rx], Recorder));
        assert_eq!(
            &body.next().await.unwrap().unwrap()[..],
            b"data: \"start\"\n\n"
        );
        tx.send(delta(0, "a", 1)).unwrap();
        assert_eq!(
            &body.next().await.unwrap().unwrap()[..],
            b"data: {\"events\":1,\"source\":0}\n\n"
        );
        tx.send(GenerateEvent::Done {
            prompt_tokens: 1,
            completion_tokens: 1,
        })
        .unwrap();
        drop(tx);
        let rest = collect_frames(body).await;
        assert_eq!(rest.last().unwrap(), "[DONE]");
    }
}
