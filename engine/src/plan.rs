//! The seam between the scheduler (which only plans) and an executor (which only runs a plan).

/// A sequence: one choice of one request.
pub type SeqId = u64;
/// A KV-cache block index.
pub type BlockId = u32;

/// Work for one sequence in one step: feed `tokens` at positions `start_pos..start_pos +
/// tokens.len()`, writing their keys and values into the blocks of `block_table` (slot of
/// position p: block `block_table[p / block_size]`, offset `p % block_size`), attending to
/// every earlier position of the sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct ScheduledChunk {
    pub seq_id: SeqId,
    pub tokens: Vec<u32>,
    pub start_pos: usize,
    pub block_table: Vec<BlockId>,
    /// This chunk reaches the end of the known tokens: the executor returns logits for its last
    /// position so the engine can sample the next token.
    pub sample: bool,
}

/// One engine step.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepPlan {
    pub chunks: Vec<ScheduledChunk>,
}

impl StepPlan {
    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }
    pub fn num_tokens(&self) -> usize {
        self.chunks.iter().map(|c| c.tokens.len()).sum()
    }
}
