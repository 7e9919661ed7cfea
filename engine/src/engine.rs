//! The engine loop and the handle the API talks to.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc as std_mpsc, Arc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, oneshot};

use crate::detok::{IncrementalDecoder, StopMatcher};
use crate::error::{EngineError, Result};
use crate::executor::Executor;
use crate::metrics::Metrics;
use crate::plan::{SeqId, StepPlan};
use crate::sampling::{SampleContext, Sampler, SamplingParams, TokenLogprob};
use crate::scheduler::{Scheduler, SchedulerConfig};
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

/// Engine sizing, from the command line.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub served_model_name: String,
    pub root: String,
    pub max_model_len: usize,
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    pub block_size: usize,
    pub num_blocks: usize,
    pub enable_prefix_caching: bool,
    pub task: Task,
}

enum Command {
    Generate {
        request: Box<GenerateRequest>,
        events: mpsc::UnboundedSender<GenerateEvent>,
        arrival: Instant,
    },
    Embed {
        inputs: Vec<Vec<u32>>,
        reply: oneshot::Sender<Result<Vec<Vec<f32>>>>,
    },
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
    sampling_defaults: SamplingParams,
    commands: parking_lot::Mutex<std_mpsc::Sender<Command>>,
    in_flight: Arc<AtomicUsize>,
    alive: Arc<AtomicBool>,
}

impl EngineHandle {
    /// Start the engine loop on its own thread.
    pub fn start(
        config: EngineConfig,
        executor: Box<dyn Executor>,
        tokenizer: Tokenizer,
        sampling_defaults: SamplingParams,
    ) -> Result<Self> {
        let tokenizer = Arc::new(tokenizer);
        let metrics = Arc::new(Metrics::new(
            &config.served_model_name,
            config.block_size,
            config.num_blocks,
        ));
        let (tx, rx) = std_mpsc::channel();
        let in_flight = Arc::new(AtomicUsize::new(0));
        let alive = Arc::new(AtomicBool::new(true));
        let scheduler = Scheduler::new(SchedulerConfig {
            max_num_seqs: config.max_num_seqs,
            max_num_batched_tokens: config.max_num_batched_tokens,
            block_size: config.block_size,
            num_blocks: config.num_blocks,
            max_model_len: config.max_model_len,
            enable_prefix_caching: config.enable_prefix_caching,
        });
        let mut engine_loop = EngineLoop {
            commands: rx,
            scheduler,
            executor,
            tokenizer: tokenizer.clone(),
            metrics: metrics.clone(),
            in_flight: in_flight.clone(),
            max_model_len: config.max_model_len,
            requests: HashMap::new(),
            seqs: HashMap::new(),
            next_seq: 0,
            next_request: 0,
        };
        let alive_flag = alive.clone();
        std::thread::Builder::new()
            .name("engine-loop".into())
            .spawn(move || {
                // Whatever ends the loop (shutdown or a panic) marks the engine dead for /health.
                struct MarkDead(Arc<AtomicBool>);
                impl Drop for MarkDead {
                    fn drop(&mut self) {
                        self.0.store(false, Ordering::SeqCst);
                    }
                }
                let _dead_on_exit = MarkDead(alive_flag);
                engine_loop.run();
            })
            .map_err(|e| EngineError::Executor(format!("starting the engine thread: {e}")))?;
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        Ok(EngineHandle {
            inner: Arc::new(Inner {
                info: ModelInfo {
                    served_model_name: config.served_model_name,
                    root: config.root,
                    max_model_len: config.max_model_len,
                    task: config.task,
                    created,
                },
                tokenizer,
                metrics,
                sampling_defaults,
                commands: parking_lot::Mutex::new(tx),
                in_flight,
                alive,
            }),
        })
    }

    pub fn info(&self) -> &ModelInfo {
        &self.inner.info
    }
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.inner.tokenizer
    }
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }
    /// The model's default sampling parameters (vLLM defaults overridden by
    /// `generation_config.json`); requests override them field by field.
    pub fn sampling_defaults(&self) -> &SamplingParams {
        &self.inner.sampling_defaults
    }

    fn send(&self, command: Command) -> Result<()> {
        self.inner
            .commands
            .lock()
            .send(command)
            .map_err(|_| EngineError::Shutdown)
    }

    /// Queue a generation request. Validation (prompt + max_tokens within max_model_len) has
    /// been done by the caller.
    pub fn generate(
        &self,
        request: GenerateRequest,
    ) -> Result<mpsc::UnboundedReceiver<GenerateEvent>> {
        if self.info().task != Task::Generate {
            return Err(EngineError::InvalidRequest(
                "this model serves embeddings, not generation".into(),
            ));
        }
        if request.prompt_tokens.is_empty() {
            return Err(EngineError::InvalidRequest("the prompt is empty".into()));
        }
        if request.prompt_tokens.len() >= self.info().max_model_len {
            return Err(EngineError::InvalidRequest(format!(
                "This model's maximum context length is {} tokens. However, your prompt has {} \
                 tokens.",
                self.info().max_model_len,
                request.prompt_tokens.len()
            )));
        }
        let (events, rx) = mpsc::unbounded_channel();
        self.inner.in_flight.fetch_add(1, Ordering::SeqCst);
        let sent = self.send(Command::Generate {
            request: Box::new(request),
            events,
            arrival: Instant::now(),
        });
        if sent.is_err() {
            self.inner.in_flight.fetch_sub(1, Ordering::SeqCst);
        }
        sent.map(|_| rx)
    }

    /// Sentence embeddings (embedding models): one L2-normalised vector per input.
    pub async fn embed(&self, inputs: Vec<Vec<u32>>) -> Result<Vec<Vec<f32>>> {
        if self.info().task != Task::Embed {
            return Err(EngineError::InvalidRequest(
                "this model does not support embeddings".into(),
            ));
        }
        let (reply, rx) = oneshot::channel();
        self.inner.in_flight.fetch_add(1, Ordering::SeqCst);
        let result = match self.send(Command::Embed { inputs, reply }) {
            Ok(()) => rx.await.unwrap_or(Err(EngineError::Shutdown)),
            Err(e) => Err(e),
        };
        self.inner.in_flight.fetch_sub(1, Ordering::SeqCst);
        result
    }

    /// Requests in flight (`/load`).
    pub fn load(&self) -> usize {
        self.inner.in_flight.load(Ordering::SeqCst)
    }
    /// False once the engine loop died (`/health` then answers 5xx).
    pub fn is_alive(&self) -> bool {
        self.inner.alive.load(Ordering::SeqCst)
    }
}

struct RequestState {
    events: mpsc::UnboundedSender<GenerateEvent>,
    params: Arc<SamplingParams>,
    prompt: Arc<Vec<u32>>,
    seqs: Vec<SeqId>,
    unfinished: usize,
    completion_tokens: usize,
    arrival: Instant,
    /// When its first chunk ran (queue time ends).
    scheduled_at: Option<Instant>,
    first_token_at: Option<Instant>,
    /// The worst finish reason over its choices, for the request counter.
    finish_reason: FinishReason,
}

struct SeqState {
    request: u64,
    index: usize,
    sampler: Sampler,
    output: Vec<u32>,
    decoder: IncrementalDecoder,
    stop: StopMatcher,
    last_token_at: Option<Instant>,
    done: bool,
}

struct EngineLoop {
    commands: std_mpsc::Receiver<Command>,
    scheduler: Scheduler,
    executor: Box<dyn Executor>,
    tokenizer: Arc<Tokenizer>,
    metrics: Arc<Metrics>,
    in_flight: Arc<AtomicUsize>,
    max_model_len: usize,
    requests: HashMap<u64, RequestState>,
    seqs: HashMap<SeqId, SeqState>,
    next_seq: SeqId,
    next_request: u64,
}

impl EngineLoop {
    fn run(&mut self) {
        loop {
            // Idle: block for work. Busy: take what arrived without waiting.
            if self.requests.is_empty() {
                match self.commands.recv() {
                    Ok(cmd) => self.accept(cmd),
                    Err(_) => return,
                }
            }
            loop {
                match self.commands.try_recv() {
                    Ok(cmd) => self.accept(cmd),
                    Err(std_mpsc::TryRecvError::Empty) => break,
                    Err(std_mpsc::TryRecvError::Disconnected) if self.requests.is_empty() => return,
                    Err(std_mpsc::TryRecvError::Disconnected) => break,
                }
            }
            self.drop_abandoned();
            if self.requests.is_empty() {
                continue;
            }
            let plan = self.scheduler.schedule();
            if plan.is_empty() {
                // Work exists but nothing fits this step; wait briefly for new commands
                // instead of spinning.
                if let Ok(cmd) = self.commands.recv_timeout(Duration::from_millis(5)) {
                    self.accept(cmd);
                }
                continue;
            }
            self.step(plan);
        }
    }

    fn accept(&mut self, command: Command) {
        match command {
            Command::Embed { inputs, reply } => {
                let _ = reply.send(self.executor.embed(&inputs));
            }
            Command::Generate {
                request,
                events,
                arrival,
            } => {
                let id = self.next_request;
                self.next_request += 1;
                let n = request.params.n.max(1);
                let request = *request;
                let prompt = Arc::new(request.prompt_tokens);
                let params = Arc::new(request.params);
                let mut seqs = Vec::with_capacity(n);
                for index in 0..n {
                    let seq_id = self.next_seq;
                    self.next_seq += 1;
                    self.scheduler.add(
                        seq_id,
                        prompt.as_ref().clone(),
                        request.cache_salt.as_deref(),
                        request.priority,
                    );
                    self.seqs.insert(
                        seq_id,
                        SeqState {
                            request: id,
                            index,
                            sampler: Sampler::new(&params, index),
                            output: Vec::new(),
                            decoder: IncrementalDecoder::with_prompt(
                                params.skip_special_tokens,
                                &prompt,
                            ),
                            stop: StopMatcher::new(&params.stop, params.include_stop_str_in_output),
                            last_token_at: None,
                            done: false,
                        },
                    );
                    seqs.push(seq_id);
                }
                tracing::debug!(request_id = %request.request_id, n, prompt_tokens = prompt.len(), "request queued");
                self.requests.insert(
                    id,
                    RequestState {
                        events,
                        params,
                        prompt,
                        unfinished: seqs.len(),
                        seqs,
                        completion_tokens: 0,
                        arrival,
                        scheduled_at: None,
                        first_token_at: None,
                        finish_reason: FinishReason::Stop,
                    },
                );
            }
        }
    }

    /// Requests whose client went away are aborted: their sequences leave the batch.
    fn drop_abandoned(&mut self) {
        let gone: Vec<u64> = self
            .requests
            .iter()
            .filter(|(_, r)| r.events.is_closed())
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            if let Some(request) = self.requests.remove(&id) {
                for seq in &request.seqs {
                    if self.seqs.remove(seq).is_some_and(|s| !s.done) {
                        self.scheduler.finish(*seq);
                    }
                }
                self.finish_request(request, FinishReason::Abort);
            }
            self.publish_scheduler_stats();
        }
    }

    fn finish_request(&mut self, request: RequestState, reason: FinishReason) {
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        if let (Some(scheduled), Some(first)) = (request.scheduled_at, request.first_token_at) {
            self.metrics.observe_phases(
                first.duration_since(scheduled).as_secs_f64(),
                first.elapsed().as_secs_f64(),
                request.completion_tokens,
            );
        }
        self.metrics.observe_finished(
            reason,
            request.arrival.elapsed().as_secs_f64(),
            request.prompt.len(),
            request.completion_tokens,
            request.params.n.max(1),
            request.params.max_tokens,
        );
        let _ = request.events.send(GenerateEvent::Done {
            prompt_tokens: request.prompt.len(),
            completion_tokens: request.completion_tokens,
        });
    }

    fn step(&mut self, plan: StepPlan) {
        let started = Instant::now();
        for chunk in &plan.chunks {
            if let Some(seq) = self.seqs.get(&chunk.seq_id) {
                if let Some(request) = self.requests.get_mut(&seq.request) {
                    request.scheduled_at.get_or_insert(started);
                }
            }
        }
        let logits = match self.executor.execute(&plan) {
            Ok(logits) => logits,
            Err(err) => {
                tracing::error!(error = %err, "executor step failed");
                let affected: Vec<u64> = plan
                    .chunks
                    .iter()
                    .filter_map(|c| self.seqs.get(&c.seq_id).map(|s| s.request))
                    .collect();
                for id in affected {
                    if let Some(request) = self.requests.remove(&id) {
                        let _ = request.events.send(GenerateEvent::Error(err.to_string()));
                        for seq in &request.seqs {
                            if self.seqs.remove(seq).is_some_and(|s| !s.done) {
                                self.scheduler.finish(*seq);
                            }
                        }
                        self.finish_request(request, FinishReason::Abort);
                    }
                }
                return;
            }
        };
        let now = Instant::now();
        let mut sampled = Vec::with_capacity(logits.len());
        let mut finished = Vec::new();
        let mut prompt_tokens = 0;
        let mut rows = logits.into_iter();
        for chunk in &plan.chunks {
            let Some(seq) = self.seqs.get(&chunk.seq_id) else {
                continue;
            };
            let prompt_len = self
                .requests
                .get(&seq.request)
                .map_or(0, |r| r.prompt.len());
            prompt_tokens += chunk
                .tokens
                .len()
                .min(prompt_len.saturating_sub(chunk.start_pos));
            if !chunk.sample {
                continue;
            }
            let Some(mut row) = rows.next() else {
                break;
            };
            if let Some((token, done)) = self.sample_one(chunk.seq_id, &mut row, now) {
                sampled.push((chunk.seq_id, token));
                if done {
                    finished.push(chunk.seq_id);
                }
            }
        }
        self.scheduler.commit(&plan, &sampled);
        for seq in finished {
            self.scheduler.finish(seq);
        }
        self.publish_scheduler_stats();
        self.metrics.observe_step(prompt_tokens, sampled.len());
    }

    fn publish_scheduler_stats(&self) {
        let stats = self.scheduler.stats();
        self.metrics
            .set_queue(stats.running, stats.waiting, stats.kv_usage);
        self.metrics.set_scheduler_totals(
            stats.preemptions_total,
            stats.prefix_queries_total,
            stats.prefix_hits_total,
        );
    }

    /// Sample the next token of `seq_id`, emit its events; returns the token and whether the
    /// sequence ended.
    fn sample_one(
        &mut self,
        seq_id: SeqId,
        logits: &mut [f32],
        now: Instant,
    ) -> Option<(u32, bool)> {
        let seq = self.seqs.get_mut(&seq_id)?;
        let request = self.requests.get_mut(&seq.request)?;
        let params = request.params.clone();
        let eos = self.tokenizer.eos_token_ids();
        let picked = seq.sampler.sample(
            &params,
            logits,
            &SampleContext {
                prompt_tokens: &request.prompt,
                output_tokens: &seq.output,
                eos_token_ids: eos,
            },
        );
        let token = picked.token;
        seq.output.push(token);
        request.completion_tokens += 1;
        match request.first_token_at {
            None => {
                request.first_token_at = Some(now);
                let since = now.duration_since(request.arrival).as_secs_f64();
                let queued = request
                    .scheduled_at
                    .map_or(0.0, |at| at.duration_since(request.arrival).as_secs_f64());
                self.metrics.observe_first_token(since, queued);
            }
            Some(_) => {
                if let Some(last) = seq.last_token_at {
                    self.metrics
                        .observe_inter_token(now.duration_since(last).as_secs_f64());
                }
            }
        }
        seq.last_token_at = Some(now);

        let past_min = seq.output.len() > params.min_tokens;
        let mut text = String::new();
        let mut finish: Option<(FinishReason, Option<StopReason>)> = None;
        if past_min && !params.ignore_eos && eos.contains(&token) {
            finish = Some((FinishReason::Stop, Some(StopReason::Eos)));
        } else if past_min && params.stop_token_ids.contains(&token) {
            finish = Some((FinishReason::Stop, Some(StopReason::Token(token))));
        } else {
            let piece = seq.decoder.push(&self.tokenizer, token);
            let check = seq.stop.push(&piece);
            text = check.emit;
            if let Some(stop) = check.stopped {
                finish = Some((FinishReason::Stop, Some(StopReason::Text(stop))));
            }
        }
        if finish.is_none()
            && (seq.output.len() >= params.max_tokens
                || request.prompt.len() + seq.output.len() >= self.max_model_len)
        {
            finish = Some((FinishReason::Length, None));
        }
        if matches!(&finish, Some((_, reason)) if !matches!(reason, Some(StopReason::Text(_)))) {
            // The end: release an incomplete trailing character and held-back stop prefixes.
            let tail = seq.decoder.flush(&self.tokenizer);
            let check = seq.stop.push(&tail);
            text.push_str(&check.emit);
            text.push_str(&seq.stop.flush());
        }
        let _ = request.events.send(GenerateEvent::Delta {
            index: seq.index,
            text,
            token_ids: vec![token],
            logprobs: picked.logprob.into_iter().collect(),
        });
        let Some((reason, stop_reason)) = finish else {
            return Some((token, false));
        };
        seq.done = true;
        let _ = request.events.send(GenerateEvent::Finished {
            index: seq.index,
            reason,
            stop_reason,
        });
        if reason == FinishReason::Length {
            request.finish_reason = FinishReason::Length;
        }
        request.unfinished -= 1;
        if request.unfinished == 0 {
            let id = seq.request;
            if let Some(request) = self.requests.remove(&id) {
                for s in &request.seqs {
                    self.seqs.remove(s);
                }
                let reason = request.finish_reason;
                self.finish_request(request, reason);
            }
        }
        Some((token, true))
    }
}
