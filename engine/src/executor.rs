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

/// Runs decoders with a KV cache in host memory, on the rayon thread pool.
pub struct CpuExecutor {
    model: LlamaModel,
    cache: KvCache,
}

impl CpuExecutor {
    pub fn new(model: LlamaModel, block_size: usize, num_blocks: usize) -> Self {
        let cache = KvCache::new(&model.config, block_size, num_blocks);
        CpuExecutor { model, cache }
    }
}

impl Executor for CpuExecutor {
    fn execute(&mut self, plan: &StepPlan) -> Result<Vec<Vec<f32>>> {
        self.model.forward(&mut self.cache, plan)
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
