//! Continuous batching: decides each step which sequences run and how many tokens each feeds
//! (decodes first, then chunked prefill under the token budget), allocates their KV blocks, and
//! preempts (by recompute) when blocks run out. It only plans; see [`crate::plan`].

use crate::plan::{SeqId, StepPlan};

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    pub block_size: usize,
    pub num_blocks: usize,
    pub max_model_len: usize,
    pub enable_prefix_caching: bool,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct SchedulerStats {
    pub running: usize,
    pub waiting: usize,
    /// Fraction of blocks in use by live sequences, 0..1.
    pub kv_usage: f32,
    pub preemptions_total: u64,
    /// Prompt tokens looked up in the prefix cache / found there.
    pub prefix_queries_total: u64,
    pub prefix_hits_total: u64,
}

pub struct Scheduler {}

impl Scheduler {
    pub fn new(config: SchedulerConfig) -> Self {
        let _ = config;
        todo!("scheduler helper")
    }
    /// Queue a new sequence. Lower `priority` runs first; ties by arrival.
    pub fn add(
        &mut self,
        seq_id: SeqId,
        prompt: Vec<u32>,
        cache_salt: Option<&str>,
        priority: i32,
    ) {
        let _ = (seq_id, prompt, cache_salt, priority);
        todo!()
    }
    /// Plan the next step (may preempt).
    pub fn schedule(&mut self) -> StepPlan {
        todo!()
    }
    /// The executor ran `plan`: its chunks' tokens are in the cache. `sampled` holds the new
    /// token of each chunk that sampled.
    pub fn commit(&mut self, plan: &StepPlan, sampled: &[(SeqId, u32)]) {
        let _ = (plan, sampled);
        todo!()
    }
    /// Remove a sequence (finished or aborted), releasing its blocks to the prefix cache.
    pub fn finish(&mut self, seq_id: SeqId) {
        let _ = seq_id;
        todo!()
    }
    pub fn has_work(&self) -> bool {
        todo!()
    }
    pub fn stats(&self) -> SchedulerStats {
        todo!()
    }
}
