//! The engine loop and the handle the API talks to.

use std::sync::Arc;

use tokio::sync::mpsc;

use crate::error::Result;
use crate::metrics::Metrics;
use crate::sampling::{SamplingParams, TokenLogprob};
use crate::tokenizer::Tokenizer;

/// What the served model is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    Generate,
    Embed,
}

#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub served_model_name: String,
    /// The path the model was loaded from (`root` in /v1/models).
    pub root: String,
    pub max_model_len: usize,
    pub task: Task,
    /// Unix seconds when the engine started.
    pub created: u64,
}

pub struct GenerateRequest {
    pub request_id: String,
    pub prompt_tokens: Vec<u32>,
    pub params: SamplingParams,
    pub cache_salt: Option<String>,
    pub priority: i32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    Length,
    Abort,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Abort => "abort",
        }
    }
}

/// Why a choice stopped with `finish_reason: stop` (vLLM's `stop_reason`: null for EOS).
#[derive(Debug, Clone, PartialEq)]
pub enum StopReason {
    Eos,
    Token(u32),
    Text(String),
}

/// Events of one request, in order. Dropping the receiver aborts the request.
#[derive(Debug, Clone, PartialEq)]
pub enum GenerateEvent {
    /// New output of choice `index`: final text (a possible stop string is held back until
    /// resolved), the new token ids and, when asked, their logprobs.
    Delta {
        index: usize,
        text: String,
        token_ids: Vec<u32>,
        logprobs: Vec<TokenLogprob>,
    },
    /// Choice `index` ended.
    Finished {
        index: usize,
        reason: FinishReason,
        stop_reason: Option<StopReason>,
    },
    /// Sent once, last, after every choice finished.
    Done {
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    Error(String),
}

/// Shared by the API's handlers.
#[derive(Clone)]
pub struct EngineHandle {
    inner: Arc<Inner>,
}

struct Inner {
    info: ModelInfo,
    tokenizer: Arc<Tokenizer>,
    metrics: Arc<Metrics>,
}

impl EngineHandle {
    pub fn info(&self) -> &ModelInfo {
        &self.inner.info
    }
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.inner.tokenizer
    }
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }
    /// Queue a generation request. Validation (prompt + max_tokens within max_model_len) has
    /// been done by the caller.
    pub fn generate(
        &self,
        request: GenerateRequest,
    ) -> Result<mpsc::UnboundedReceiver<GenerateEvent>> {
        let _ = request;
        todo!("engine loop")
    }
    /// Sentence embeddings (embedding models): one L2-normalised vector per input.
    pub async fn embed(&self, inputs: Vec<Vec<u32>>) -> Result<Vec<Vec<f32>>> {
        let _ = inputs;
        todo!("engine loop")
    }
    /// Requests in flight (`/load`).
    pub fn load(&self) -> usize {
        todo!()
    }
    /// False once the engine loop died (`/health` then answers 5xx).
    pub fn is_alive(&self) -> bool {
        todo!()
    }
}
