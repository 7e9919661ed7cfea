//! Executors run a planned step on a backend. The CPU executor is always built; a CUDA executor
//! will implement the same trait behind the `cuda` feature.

use crate::error::{EngineError, Result};
use crate::model::bert::BertModel;
use crate::model::llama::{KvCache, LlamaModel};
use crate::plan::StepPlan;

pub trait Executor: Send {
    /// Run `plan`; return one row of logits (vocab-sized) per chunk with `sample == true`, in
    /// plan order.
    fn execute(&mut self, plan: &StepPlan) -> Result<Vec<Vec<f32>>>;
    /// Number of KV blocks this executor allocated.
    fn num_blocks(&self) -> usize;
    /// Sentence embeddings (embedding models only).
    fn embed(&mut self, inputs: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        let _ = inputs;
        Err(EngineError::InvalidRequest(
            "this model does not support embeddings".into(),
        ))
    }
}

/// Runs decoders with a KV cache in host memory, on a rayon thread pool.
pub struct CpuExecutor {
    model: LlamaModel,
    cache: KvCache,
    pool: Option<rayon::ThreadPool>,
}

impl CpuExecutor {
    /// Uses the global rayon pool from whichever thread calls `execute`.
    pub fn new(model: LlamaModel, block_size: usize, num_blocks: usize) -> Self {
        let cache = KvCache::new(&model.config, block_size, num_blocks);
        CpuExecutor {
            model,
            cache,
            pool: None,
        }
    }

    /// Runs each step inside its own pool of `threads` compute threads. The whole forward pass
    /// executes on a pool thread, so the ~120 matrix products of a decode step split work
    /// between threads that are already awake, instead of handing each one over from the
    /// engine loop's thread and waking the pool every time (which cost more than the product
    /// itself at batch size 1).
    pub fn with_threads(
        model: LlamaModel,
        block_size: usize,
        num_blocks: usize,
        threads: usize,
    ) -> Result<Self> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads.max(1))
            .thread_name(|i| format!("compute-{i}"))
            .build()
            .map_err(|e| EngineError::Executor(format!("starting compute threads: {e}")))?;
        let mut executor = CpuExecutor::new(model, block_size, num_blocks);
        executor.pool = Some(pool);
        Ok(executor)
    }
}

impl Executor for CpuExecutor {
    fn execute(&mut self, plan: &StepPlan) -> Result<Vec<Vec<f32>>> {
        let (model, cache) = (&self.model, &mut self.cache);
        match &self.pool {
            Some(pool) => pool.install(|| model.forward(cache, plan)),
            None => model.forward(cache, plan),
        }
    }
    fn num_blocks(&self) -> usize {
        self.cache.num_blocks
    }
}

/// Runs an encoder; there is nothing to plan or cache.
pub struct CpuEmbedder {
    model: BertModel,
}

impl CpuEmbedder {
    pub fn new(model: BertModel) -> Self {
        CpuEmbedder { model }
    }
}

impl Executor for CpuEmbedder {
    fn execute(&mut self, _plan: &StepPlan) -> Result<Vec<Vec<f32>>> {
        Err(EngineError::InvalidRequest(
            "this model only serves embeddings".into(),
        ))
    }
    fn num_blocks(&self) -> usize {
        0
    }
    fn embed(&mut self, inputs: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        self.model.embed(inputs)
    }
}
