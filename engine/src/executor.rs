//! Executors run a planned step on a backend. The CPU executor is always built; a CUDA executor
//! will implement the same trait behind the `cuda` feature.

use crate::error::Result;
use crate::plan::StepPlan;

pub trait Executor: Send {
    /// Run `plan`; return one row of logits (vocab-sized) per chunk with `sample == true`, in
    /// plan order.
    fn execute(&mut self, plan: &StepPlan) -> Result<Vec<Vec<f32>>>;
    /// Number of KV blocks this executor allocated.
    fn num_blocks(&self) -> usize;
}
