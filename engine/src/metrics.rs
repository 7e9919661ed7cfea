//! Engine metrics under vLLM's names.

use crate::engine::FinishReason;

/// The engine loop reports here; `/metrics` renders it.
pub struct Metrics {}

impl Metrics {
    pub fn new(model_name: &str, block_size: usize, num_blocks: usize) -> Self {
        let _ = (model_name, block_size, num_blocks);
        todo!("api helper")
    }
    /// Gauges, set once per step.
    pub fn set_queue(&self, running: usize, waiting: usize, kv_usage: f32) {
        let _ = (running, waiting, kv_usage);
    }
    /// Counters: totals since start, as the scheduler keeps them.
    pub fn set_scheduler_totals(&self, preemptions: u64, prefix_queries: u64, prefix_hits: u64) {
        let _ = (preemptions, prefix_queries, prefix_hits);
    }
    pub fn observe_step(&self, prompt_tokens: usize, generation_tokens: usize) {
        let _ = (prompt_tokens, generation_tokens);
    }
    pub fn observe_first_token(&self, seconds_since_arrival: f64, queue_seconds: f64) {
        let _ = (seconds_since_arrival, queue_seconds);
    }
    pub fn observe_inter_token(&self, seconds: f64) {
        let _ = seconds;
    }
    /// A request ended (all its choices).
    pub fn observe_finished(
        &self,
        reason: FinishReason,
        e2e_seconds: f64,
        prompt_tokens: usize,
        generation_tokens: usize,
        n: usize,
        max_tokens: usize,
    ) {
        let _ = (
            reason,
            e2e_seconds,
            prompt_tokens,
            generation_tokens,
            n,
            max_tokens,
        );
    }
    /// Prometheus text.
    pub fn render(&self) -> String {
        todo!()
    }
}
