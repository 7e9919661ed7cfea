//! Continuous batching: decides each step which sequences run and how many tokens each feeds
//! (decodes first, then chunked prefill under the token budget), allocates their KV blocks, and
//! preempts (by recompute) when blocks run out. It only plans; see [`crate::plan`].
//!
//! A step, in order:
//! 1. running sequences, those decoding (one uncomputed token) before those still in chunked
//!    prefill; each feeds `min(uncomputed tokens, budget left)` tokens. When a sequence needs a
//!    block and none is available, the running sequence with the lowest priority / latest arrival
//!    is preempted: it loses its blocks and KV, and waits again with all its tokens, to recompute
//!    them later (possibly from the prefix cache) and sample its next token as if nothing happened;
//! 2. unless someone was preempted this step, waiting sequences in (priority, arrival) order are
//!    admitted while `max_num_seqs`, the token budget and the free blocks allow; the first that
//!    does not fit stops admission, so later arrivals never overtake it. Admission never preempts.
//!
//! Plans are deterministic: the same calls give the same plans.
//!
//! Prefix-cache statistics count, at each admission (a resumed sequence is admitted again), the
//! tokens looked up and the tokens found in cached full blocks.
//!
//! The engine drives `schedule` → execute → [`Scheduler::commit`] strictly in turn, and keeps
//! sequences within `max_model_len` (and so within the pool) itself; a sequence that needs more
//! blocks than the pool has, or has no tokens, just stays waiting.

use std::collections::{BTreeMap, HashMap};

use crate::kv::{blocks_for, extend_block_hashes, BlockHash, BlockPool};
use crate::plan::{BlockId, ScheduledChunk, SeqId, StepPlan};

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

/// Orders sequences: lower priority value first, then earlier arrival.
type QueueKey = (i32, u64);

struct Sequence {
    /// Prompt and generated tokens, in order.
    tokens: Vec<u32>,
    /// Leading tokens whose keys and values are in `blocks`.
    num_computed: usize,
    blocks: Vec<BlockId>,
    /// Chained prefix-cache hashes of the full blocks of `tokens`, filled lazily.
    block_hashes: Vec<BlockHash>,
    /// Leading blocks already offered to the prefix cache.
    num_registered_blocks: usize,
    cache_salt: Option<String>,
    key: QueueKey,
}

impl Sequence {
    fn num_uncomputed(&self) -> usize {
        self.tokens.len() - self.num_computed
    }
}

pub struct Scheduler {
    config: SchedulerConfig,
    pool: BlockPool,
    seqs: HashMap<SeqId, Sequence>,
    /// Sorted by key, so the preemption victim is always the last.
    running: Vec<SeqId>,
    waiting: BTreeMap<QueueKey, SeqId>,
    next_arrival: u64,
    preemptions_total: u64,
    prefix_queries_total: u64,
    prefix_hits_total: u64,
}

impl Scheduler {
    pub fn new(config: SchedulerConfig) -> Self {
        assert!(
            config.max_num_batched_tokens > 0,
            "max_num_batched_tokens must be positive"
        );
        Scheduler {
            pool: BlockPool::new(config.num_blocks, config.block_size),
            config,
            seqs: HashMap::new(),
            running: Vec::new(),
            waiting: BTreeMap::new(),
            next_arrival: 0,
            preemptions_total: 0,
            prefix_queries_total: 0,
            prefix_hits_total: 0,
        }
    }
    /// Queue a new sequence. Lower `priority` runs first; ties by arrival.
    pub fn add(
        &mut self,
        seq_id: SeqId,
        prompt: Vec<u32>,
        cache_salt: Option<&str>,
        priority: i32,
    ) {
        // An id is never reused while live; should it be, the old sequence is gone.
        self.finish(seq_id);
        let key = (priority, self.next_arrival);
        self.next_arrival += 1;
        self.seqs.insert(
            seq_id,
            Sequence {
                tokens: prompt,
                num_computed: 0,
                blocks: Vec::new(),
                block_hashes: Vec::new(),
                num_registered_blocks: 0,
                cache_salt: cache_salt.map(str::to_owned),
                key,
            },
        );
        self.waiting.insert(key, seq_id);
    }
    /// Plan the next step (may preempt).
    pub fn schedule(&mut self) -> StepPlan {
        let mut chunks = Vec::new();
        let mut budget = self.config.max_num_batched_tokens;
        let preempted = self.schedule_running(&mut chunks, &mut budget);
        // After a preemption the pool is short: new sequences would only be preempted in turn.
        if !preempted {
            self.admit_waiting(&mut chunks, &mut budget);
        }
        StepPlan { chunks }
    }
    /// The executor ran `plan`: its chunks' tokens are in the cache. `sampled` holds the new
    /// token of each chunk that sampled.
    pub fn commit(&mut self, plan: &StepPlan, sampled: &[(SeqId, u32)]) {
        let block_size = self.config.block_size;
        for chunk in &plan.chunks {
            // A sequence finished since planning is gone; anything else would be a plan that
            // does not match the sequence's state, which must not corrupt it.
            let Some(seq) = self.seqs.get_mut(&chunk.seq_id) else {
                continue;
            };
            if seq.blocks.is_empty() || chunk.start_pos != seq.num_computed {
                tracing::warn!(seq_id = chunk.seq_id, "ignoring a stale chunk at commit");
                continue;
            }
            seq.num_computed = (seq.num_computed + chunk.tokens.len()).min(seq.tokens.len());
            if self.config.enable_prefix_caching {
                register_full_blocks(&mut self.pool, seq, block_size);
            }
        }
        for &(seq_id, token) in sampled {
            if let Some(seq) = self.seqs.get_mut(&seq_id) {
                seq.tokens.push(token);
            }
        }
    }
    /// Remove a sequence (finished or aborted), releasing its blocks to the prefix cache.
    pub fn finish(&mut self, seq_id: SeqId) {
        let Some(seq) = self.seqs.remove(&seq_id) else {
            return;
        };
        if let Some(index) = self.running.iter().position(|&id| id == seq_id) {
            self.running.remove(index);
        }
        self.waiting.remove(&seq.key);
        self.pool.release_all(&seq.blocks);
    }
    pub fn has_work(&self) -> bool {
        !self.running.is_empty() || !self.waiting.is_empty()
    }
    pub fn stats(&self) -> SchedulerStats {
        SchedulerStats {
            running: self.running.len(),
            waiting: self.waiting.len(),
            kv_usage: self.pool.usage(),
            preemptions_total: self.preemptions_total,
            prefix_queries_total: self.prefix_queries_total,
            prefix_hits_total: self.prefix_hits_total,
        }
    }
    /// All tokens of a live sequence (prompt then generated), as the scheduler knows them.
    pub fn tokens(&self, seq_id: SeqId) -> Option<&[u32]> {
        self.seqs.get(&seq_id).map(|seq| seq.tokens.as_slice())
    }
    /// The KV block pool, for inspection.
    pub fn pool(&self) -> &BlockPool {
        &self.pool
    }

    /// Plans the running sequences; returns whether anyone was preempted.
    fn schedule_running(&mut self, chunks: &mut Vec<ScheduledChunk>, budget: &mut usize) -> bool {
        let mut preempted = false;
        let (decodes, prefills): (Vec<SeqId>, Vec<SeqId>) = self
            .running
            .iter()
            .copied()
            .partition(|id| self.seqs[id].num_uncomputed() == 1);
        'sequences: for seq_id in decodes.into_iter().chain(prefills) {
            if *budget == 0 {
                break;
            }
            // Preempted earlier in this step.
            if !self.running.contains(&seq_id) {
                continue;
            }
            let seq = &self.seqs[&seq_id];
            // Zero when the engine did not hand back the token of a sampling chunk: nothing to do.
            let num_new = seq.num_uncomputed().min(*budget);
            if num_new == 0 {
                continue;
            }
            let blocks_needed = blocks_for(seq.num_computed + num_new, self.config.block_size)
                .saturating_sub(seq.blocks.len());
            while self.pool.num_available() < blocks_needed {
                let victim = *self
                    .running
                    .last()
                    .expect("the sequence being planned is running");
                self.preempt(victim);
                preempted = true;
                if let Some(index) = chunks.iter().position(|chunk| chunk.seq_id == victim) {
                    *budget += chunks.remove(index).tokens.len();
                }
                if victim == seq_id {
                    continue 'sequences;
                }
            }
            chunks.push(self.plan_chunk(seq_id, num_new, blocks_needed));
            *budget -= num_new;
        }
        preempted
    }

    fn admit_waiting(&mut self, chunks: &mut Vec<ScheduledChunk>, budget: &mut usize) {
        let block_size = self.config.block_size;
        let candidates: Vec<(QueueKey, SeqId)> =
            self.waiting.iter().map(|(&key, &id)| (key, id)).collect();
        for (key, seq_id) in candidates {
            if *budget == 0 || self.running.len() >= self.config.max_num_seqs {
                break;
            }
            let seq = self.seqs.get_mut(&seq_id).expect("waiting sequences exist");
            let num_tokens = seq.tokens.len();
            // Skipped rather than waited for, so it cannot block everyone behind it forever.
            if num_tokens == 0 || blocks_for(num_tokens, block_size) > self.pool.num_blocks() {
                continue;
            }
            let cached_blocks = if self.config.enable_prefix_caching {
                extend_block_hashes(
                    &mut seq.block_hashes,
                    &seq.tokens,
                    block_size,
                    seq.cache_salt.as_deref(),
                );
                // The last token is always computed, so that the step yields logits.
                let usable = (num_tokens - 1) / block_size;
                self.pool.longest_cached_prefix(&seq.block_hashes[..usable])
            } else {
                Vec::new()
            };
            let num_cached = cached_blocks.len() * block_size;
            let num_new = (num_tokens - num_cached).min(*budget);
            let blocks_needed = blocks_for(num_cached + num_new, block_size) - cached_blocks.len();
            // Reviving an evictable hit takes it out of the available blocks.
            let idle_hits = cached_blocks
                .iter()
                .filter(|&&block| self.pool.ref_count(block) == 0)
                .count();
            if self.pool.num_available() < blocks_needed + idle_hits {
                break;
            }
            for &block in &cached_blocks {
                self.pool.share(block);
            }
            if self.config.enable_prefix_caching {
                self.prefix_queries_total += num_tokens as u64;
                self.prefix_hits_total += num_cached as u64;
            }
            seq.num_registered_blocks = cached_blocks.len();
            seq.blocks = cached_blocks;
            seq.num_computed = num_cached;
            self.waiting.remove(&key);
            let position = self
                .running
                .partition_point(|other| self.seqs[other].key < key);
            self.running.insert(position, seq_id);
            chunks.push(self.plan_chunk(seq_id, num_new, blocks_needed));
            *budget -= num_new;
        }
    }

    /// Gives `seq_id` its `blocks_needed` new blocks (the caller checked they are available) and
    /// plans its next `num_new` tokens.
    fn plan_chunk(
        &mut self,
        seq_id: SeqId,
        num_new: usize,
        blocks_needed: usize,
    ) -> ScheduledChunk {
        let new_blocks = self
            .pool
            .allocate_many(blocks_needed)
            .expect("the caller checked that the blocks are available");
        let seq = self.seqs.get_mut(&seq_id).expect("planned sequences exist");
        seq.blocks.extend(new_blocks);
        let end = seq.num_computed + num_new;
        ScheduledChunk {
            seq_id,
            tokens: seq.tokens[seq.num_computed..end].to_vec(),
            start_pos: seq.num_computed,
            block_table: seq.blocks.clone(),
            sample: end == seq.tokens.len(),
        }
    }

    /// Preemption by recompute: `seq_id` loses its blocks and KV and waits again, keeping its
    /// tokens and its place (priority, arrival) in the queue.
    fn preempt(&mut self, seq_id: SeqId) {
        let index = self
            .running
            .iter()
            .position(|&id| id == seq_id)
            .expect("only running sequences are preempted");
        self.running.remove(index);
        let seq = self.seqs.get_mut(&seq_id).expect("running sequences exist");
        self.pool.release_all(&seq.blocks);
        seq.blocks.clear();
        seq.num_computed = 0;
        seq.num_registered_blocks = 0;
        self.waiting.insert(seq.key, seq_id);
        self.preemptions_total += 1;
    }
}

/// Offers the sequence's newly computed full blocks to the prefix cache.
fn register_full_blocks(pool: &mut BlockPool, seq: &mut Sequence, block_size: usize) {
    extend_block_hashes(
        &mut seq.block_hashes,
        &seq.tokens,
        block_size,
        seq.cache_salt.as_deref(),
    );
    let full_blocks = seq.num_computed / block_size;
    for index in seq.num_registered_blocks..full_blocks {
        pool.register(seq.blocks[index], seq.block_hashes[index]);
    }
    seq.num_registered_blocks = seq.num_registered_blocks.max(full_blocks);
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};

    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    fn config(
        block_size: usize,
        num_blocks: usize,
        max_num_seqs: usize,
        max_num_batched_tokens: usize,
        enable_prefix_caching: bool,
    ) -> SchedulerConfig {
        SchedulerConfig {
            max_num_seqs,
            max_num_batched_tokens,
            block_size,
            num_blocks,
            max_model_len: block_size * num_blocks,
            enable_prefix_caching,
        }
    }

    /// `len` distinct-looking tokens; different `seed`s give different prompts.
    fn prompt(seed: u32, len: usize) -> Vec<u32> {
        (0..len as u32).map(|i| seed * 1000 + i).collect()
    }

    /// Fingerprint of the key/value at a position: depends on the token there and, through
    /// `previous`, on every earlier token, like attention does.
    fn mix(previous: u64, token: u32) -> u64 {
        let mut z = previous ^ (u64::from(token) + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    const START: u64 = 0x5eed;

    fn expected_fingerprints(tokens: &[u32]) -> Vec<u64> {
        tokens
            .iter()
            .scan(START, |state, &token| {
                *state = mix(*state, token);
                Some(*state)
            })
            .collect()
    }

    /// Executes plans on a simulated KV memory: each slot holds the fingerprint of the
    /// sequence prefix written there, read back through the block table for the next position.
    /// "Sampling" derives the next token from the last fingerprint, so outputs depend only on
    /// what the KV cache really holds.
    struct FakeExecutor {
        block_size: usize,
        slots: Vec<Option<u64>>,
    }

    impl FakeExecutor {
        fn new(config: &SchedulerConfig) -> Self {
            FakeExecutor {
                block_size: config.block_size,
                slots: vec![None; config.block_size * config.num_blocks],
            }
        }
        fn slot(&self, block_table: &[BlockId], pos: usize) -> usize {
            block_table[pos / self.block_size] as usize * self.block_size + pos % self.block_size
        }
        fn run(&mut self, plan: &StepPlan) -> Vec<(SeqId, u32)> {
            let mut sampled = Vec::new();
            for chunk in &plan.chunks {
                let mut previous = if chunk.start_pos == 0 {
                    START
                } else {
                    self.slots[self.slot(&chunk.block_table, chunk.start_pos - 1)]
                        .expect("the KV before a chunk was written")
                };
                for (offset, &token) in chunk.tokens.iter().enumerate() {
                    previous = mix(previous, token);
                    let slot = self.slot(&chunk.block_table, chunk.start_pos + offset);
                    self.slots[slot] = Some(previous);
                }
                if chunk.sample {
                    sampled.push((chunk.seq_id, (previous % 50_000) as u32));
                }
            }
            sampled
        }
    }

    /// Checks everything a plan and the scheduler's books must satisfy. `known` holds every
    /// live sequence's tokens as the test itself recorded them.
    fn check_invariants(
        scheduler: &Scheduler,
        plan: &StepPlan,
        executor: &FakeExecutor,
        known: &HashMap<SeqId, Vec<u32>>,
    ) {
        let config = &scheduler.config;
        let pool = &scheduler.pool;
        pool.check_consistency();
        assert!(plan.num_tokens() <= config.max_num_batched_tokens);
        assert!(scheduler.running.len() <= config.max_num_seqs);
        let usage = scheduler.stats().kv_usage;
        assert!((0.0..=1.0).contains(&usage));
        assert_eq!(usage, pool.num_used() as f32 / pool.num_blocks() as f32);

        // Every held block is held exactly as often as running sequences list it.
        let mut holders: HashMap<BlockId, u32> = HashMap::new();
        for id in &scheduler.running {
            let seq = &scheduler.seqs[id];
            let distinct: HashSet<_> = seq.blocks.iter().collect();
            assert_eq!(
                distinct.len(),
                seq.blocks.len(),
                "a sequence lists a block twice"
            );
            assert!(seq.blocks.len() * config.block_size >= seq.num_computed);
            for &block in &seq.blocks {
                *holders.entry(block).or_default() += 1;
            }
        }
        for block in 0..pool.num_blocks() as BlockId {
            let expected = holders.get(&block).copied().unwrap_or(0);
            assert_eq!(
                pool.ref_count(block),
                expected,
                "ref count of block {block}"
            );
            if expected > 1 {
                assert!(pool.block_hash(block).is_some(), "shared but not cached");
            }
        }
        for id in scheduler.waiting.values() {
            let seq = &scheduler.seqs[id];
            assert!(seq.blocks.is_empty() && seq.num_computed == 0);
        }
        assert_eq!(
            scheduler.running.len() + scheduler.waiting.len(),
            scheduler.seqs.len()
        );
        let keys: Vec<_> = scheduler
            .running
            .iter()
            .map(|id| scheduler.seqs[id].key)
            .collect();
        assert!(keys.windows(2).all(|pair| pair[0] < pair[1]));

        let mut planned = HashSet::new();
        for chunk in &plan.chunks {
            assert!(
                planned.insert(chunk.seq_id),
                "one chunk per sequence per step"
            );
            let seq = &scheduler.seqs[&chunk.seq_id];
            let tokens = &known[&chunk.seq_id];
            let end = chunk.start_pos + chunk.tokens.len();
            assert!(!chunk.tokens.is_empty());
            assert_eq!(seq.tokens, *tokens);
            assert_eq!(chunk.start_pos, seq.num_computed);
            assert_eq!(chunk.tokens, tokens[chunk.start_pos..end]);
            assert_eq!(chunk.sample, end == tokens.len());
            assert_eq!(chunk.block_table, seq.blocks);
            assert!(chunk.block_table.len() * config.block_size >= end);
            // Written positions lie in blocks nobody else sees.
            for pos in chunk.start_pos..end {
                let block = chunk.block_table[pos / config.block_size];
                assert_eq!(pool.ref_count(block), 1, "writing into a shared block");
            }
            // Everything the chunk attends to is really in the cache.
            let expected = expected_fingerprints(tokens);
            for (pos, fingerprint) in expected.iter().enumerate().take(chunk.start_pos) {
                let slot = executor.slot(&chunk.block_table, pos);
                assert_eq!(
                    executor.slots[slot],
                    Some(*fingerprint),
                    "KV at position {pos}"
                );
            }
        }
    }

    struct Request {
        seq_id: SeqId,
        prompt: Vec<u32>,
        salt: Option<&'static str>,
        priority: i32,
        max_tokens: usize,
    }

    /// Runs `requests` (all queued up front) to completion; returns each one's generated
    /// tokens and the final stats.
    fn run_to_completion(
        config: SchedulerConfig,
        requests: &[Request],
    ) -> (HashMap<SeqId, Vec<u32>>, SchedulerStats) {
        let mut executor = FakeExecutor::new(&config);
        let mut scheduler = Scheduler::new(config);
        let mut known = HashMap::new();
        let mut outputs: HashMap<SeqId, Vec<u32>> = HashMap::new();
        for request in requests {
            scheduler.add(
                request.seq_id,
                request.prompt.clone(),
                request.salt,
                request.priority,
            );
            known.insert(request.seq_id, request.prompt.clone());
        }
        for _ in 0..10_000 {
            if !scheduler.has_work() {
                return (outputs, scheduler.stats());
            }
            let plan = scheduler.schedule();
            assert!(!plan.is_empty(), "no progress while work is left");
            check_invariants(&scheduler, &plan, &executor, &known);
            let sampled = executor.run(&plan);
            scheduler.commit(&plan, &sampled);
            for &(seq_id, token) in &sampled {
                known.get_mut(&seq_id).unwrap().push(token);
                let output = outputs.entry(seq_id).or_default();
                output.push(token);
                let request = requests.iter().find(|r| r.seq_id == seq_id).unwrap();
                if output.len() == request.max_tokens {
                    scheduler.finish(seq_id);
                    known.remove(&seq_id);
                }
            }
        }
        panic!("requests did not complete");
    }

    #[test]
    fn prefix_cache_hits_skip_prefill() {
        let mut scheduler = Scheduler::new(config(16, 32, 8, 256, true));
        let shared = prompt(1, 40);
        scheduler.add(1, shared.clone(), None, 0);
        let first = scheduler.schedule();
        assert_eq!(first.chunks.len(), 1);
        assert_eq!(first.chunks[0].start_pos, 0);
        assert_eq!(first.chunks[0].tokens, shared);
        scheduler.commit(&first, &[(1, 7)]);
        let first_blocks = first.chunks[0].block_table.clone();

        scheduler.add(2, shared.clone(), None, 0);
        let second = scheduler.schedule();
        let chunk = second.chunks.iter().find(|c| c.seq_id == 2).unwrap();
        assert_eq!(
            chunk.start_pos, 32,
            "two full 16-token blocks come from the cache"
        );
        assert_eq!(chunk.tokens, shared[32..]);
        assert!(chunk.sample);
        assert_eq!(chunk.block_table[..2], first_blocks[..2]);
        assert_ne!(
            chunk.block_table[2], first_blocks[2],
            "partial blocks are not shared"
        );
        assert_eq!(scheduler.pool.ref_count(first_blocks[0]), 2);
        assert_eq!(scheduler.pool.ref_count(first_blocks[1]), 2);
        let stats = scheduler.stats();
        assert_eq!(stats.prefix_queries_total, 80);
        assert_eq!(stats.prefix_hits_total, 32);

        // A prompt of exactly two blocks still computes its whole last block for the logits.
        scheduler.add(3, shared[..32].to_vec(), None, 0);
        let third = scheduler.schedule();
        let chunk = third.chunks.iter().find(|c| c.seq_id == 3).unwrap();
        assert_eq!(chunk.start_pos, 16);
        assert_eq!(chunk.tokens, shared[16..32]);
        assert_eq!(scheduler.stats().prefix_hits_total, 48);

        for seq_id in 1..=3 {
            scheduler.finish(seq_id);
        }
        assert_eq!(scheduler.stats().kv_usage, 0.0);
        assert!(!scheduler.has_work());
        // The blocks outlive their sequences: a later request still hits them.
        scheduler.add(4, shared.clone(), None, 0);
        assert_eq!(scheduler.schedule().chunks[0].start_pos, 32);
    }

    #[test]
    fn cache_salt_isolates_requests() {
        let mut scheduler = Scheduler::new(config(8, 32, 8, 256, true));
        let text = prompt(2, 20);
        scheduler.add(1, text.clone(), Some("tenant-a"), 0);
        let plan = scheduler.schedule();
        scheduler.commit(&plan, &[(1, 1)]);
        scheduler.add(2, text.clone(), Some("tenant-b"), 0);
        scheduler.add(3, text.clone(), None, 0);
        scheduler.add(4, text.clone(), Some("tenant-a"), 0);
        let plan = scheduler.schedule();
        let start = |id| {
            plan.chunks
                .iter()
                .find(|c| c.seq_id == id)
                .unwrap()
                .start_pos
        };
        assert_eq!(start(2), 0);
        assert_eq!(start(3), 0);
        assert_eq!(start(4), 16);
    }

    #[test]
    fn disabled_prefix_caching_never_shares() {
        let mut scheduler = Scheduler::new(config(8, 32, 8, 256, false));
        scheduler.add(1, prompt(3, 20), None, 0);
        let plan = scheduler.schedule();
        scheduler.commit(&plan, &[(1, 1)]);
        scheduler.add(2, prompt(3, 20), None, 0);
        let plan = scheduler.schedule();
        let chunk = plan.chunks.iter().find(|c| c.seq_id == 2).unwrap();
        assert_eq!(chunk.start_pos, 0);
        assert_eq!(scheduler.stats().prefix_queries_total, 0);
    }

    #[test]
    fn chunked_prefill_splits_a_long_prompt() {
        let mut scheduler = Scheduler::new(config(16, 64, 8, 32, true));
        let long = prompt(4, 100);
        scheduler.add(1, long.clone(), None, 0);
        let mut sizes = Vec::new();
        let mut fed = Vec::new();
        loop {
            let plan = scheduler.schedule();
            assert_eq!(plan.chunks.len(), 1);
            let chunk = &plan.chunks[0];
            assert_eq!(chunk.start_pos, fed.len(), "chunks are consecutive");
            assert!(chunk.block_table.len() * 16 >= chunk.start_pos + chunk.tokens.len());
            sizes.push(chunk.tokens.len());
            fed.extend_from_slice(&chunk.tokens);
            let sample = chunk.sample;
            let sampled = if sample { vec![(1, 5)] } else { vec![] };
            scheduler.commit(&plan, &sampled);
            if sample {
                break;
            }
        }
        assert_eq!(sizes, [32, 32, 32, 4]);
        assert_eq!(fed, long);
        // Then it decodes the sampled token.
        let plan = scheduler.schedule();
        assert_eq!(plan.chunks[0].tokens, [5]);
        assert_eq!(plan.chunks[0].start_pos, 100);
    }

    #[test]
    fn chunked_prefill_shares_the_budget_with_decodes() {
        let mut scheduler = Scheduler::new(config(4, 64, 8, 10, false));
        scheduler.add(1, prompt(1, 3), None, 0);
        let plan = scheduler.schedule();
        scheduler.commit(&plan, &[(1, 9)]);
        scheduler.add(2, prompt(2, 30), None, 0);
        let plan = scheduler.schedule();
        let sizes: Vec<_> = plan
            .chunks
            .iter()
            .map(|c| (c.seq_id, c.tokens.len()))
            .collect();
        assert_eq!(
            sizes,
            [(1, 1), (2, 9)],
            "decode first, prefill gets the rest"
        );
        assert!(!plan.chunks[1].sample);
    }

    #[test]
    fn continuous_batching_joins_and_leaves_between_steps() {
        let mut scheduler = Scheduler::new(config(4, 64, 8, 64, false));
        scheduler.add(1, prompt(1, 5), None, 0);
        scheduler.add(2, prompt(2, 6), None, 0);
        let plan = scheduler.schedule();
        scheduler.commit(&plan, &[(1, 11), (2, 21)]);
        let plan = scheduler.schedule();
        let ids: Vec<_> = plan.chunks.iter().map(|c| c.seq_id).collect();
        assert_eq!(ids, [1, 2]);
        assert!(plan.chunks.iter().all(|c| c.tokens.len() == 1 && c.sample));
        scheduler.commit(&plan, &[(1, 12), (2, 22)]);

        scheduler.add(3, prompt(3, 7), None, 0);
        let plan = scheduler.schedule();
        let shape: Vec<_> = plan
            .chunks
            .iter()
            .map(|c| (c.seq_id, c.tokens.len()))
            .collect();
        assert_eq!(shape, [(1, 1), (2, 1), (3, 7)]);
        assert_eq!(plan.chunks[0].tokens, [12]);
        assert_eq!(plan.chunks[0].start_pos, 6);
        scheduler.commit(&plan, &[(1, 13), (2, 23), (3, 31)]);

        scheduler.finish(1);
        let plan = scheduler.schedule();
        let ids: Vec<_> = plan.chunks.iter().map(|c| c.seq_id).collect();
        assert_eq!(ids, [2, 3]);
        assert_eq!(scheduler.stats().running, 2);
        assert_eq!(scheduler.tokens(1), None);
        assert_eq!(scheduler.tokens(3).unwrap().last(), Some(&31));
    }

    #[test]
    fn preemption_recomputes_the_latest_arrival() {
        let mut scheduler = Scheduler::new(config(4, 6, 8, 64, false));
        let mut executor = FakeExecutor::new(&scheduler.config);
        let mut known: HashMap<SeqId, Vec<u32>> = HashMap::new();
        for seq_id in [1, 2] {
            scheduler.add(seq_id, prompt(seq_id as u32, 8), None, 0);
            known.insert(seq_id, prompt(seq_id as u32, 8));
        }
        let mut step = |scheduler: &mut Scheduler, known: &mut HashMap<SeqId, Vec<u32>>| {
            let plan = scheduler.schedule();
            check_invariants(scheduler, &plan, &executor, known);
            let sampled = executor.run(&plan);
            scheduler.commit(&plan, &sampled);
            for &(seq_id, token) in &sampled {
                known.get_mut(&seq_id).unwrap().push(token);
            }
            plan
        };
        // Two 8-token prompts take 4 of 6 blocks; both decode until 12 tokens fill 3 blocks
        // each, and the 13th position needs a seventh block.
        for _ in 0..5 {
            let plan = step(&mut scheduler, &mut known);
            assert_eq!(plan.chunks.len(), 2);
        }
        assert_eq!(known[&2].len(), 13);
        let plan = step(&mut scheduler, &mut known);
        let ids: Vec<_> = plan.chunks.iter().map(|c| c.seq_id).collect();
        assert_eq!(ids, [1], "the later arrival gave its blocks up");
        let stats = scheduler.stats();
        assert_eq!(stats.preemptions_total, 1);
        assert_eq!((stats.running, stats.waiting), (1, 1));
        assert_eq!(scheduler.tokens(2), Some(&known[&2][..]), "tokens are kept");

        // Not enough blocks to resume it beside sequence 1 (which is never preempted for it).
        let plan = step(&mut scheduler, &mut known);
        assert_eq!(plan.chunks.len(), 1);
        assert_eq!(plan.chunks[0].seq_id, 1);
        assert_eq!(scheduler.stats().preemptions_total, 1);

        scheduler.finish(1);
        known.remove(&1);
        let before_resume = known[&2].clone();
        let plan = step(&mut scheduler, &mut known);
        assert_eq!(plan.chunks.len(), 1);
        let chunk = &plan.chunks[0];
        assert_eq!(chunk.seq_id, 2);
        assert_eq!(chunk.start_pos, 0);
        assert_eq!(
            chunk.tokens, before_resume,
            "recompute feeds prompt + generated"
        );
        assert!(chunk.sample);
    }

    #[test]
    fn preemption_victim_is_the_lowest_priority() {
        let mut scheduler = Scheduler::new(config(4, 4, 8, 64, false));
        scheduler.add(1, prompt(1, 8), None, 5);
        scheduler.add(2, prompt(2, 8), None, 0);
        let plan = scheduler.schedule();
        assert_eq!(
            plan.chunks[0].seq_id, 2,
            "higher priority is admitted first"
        );
        scheduler.commit(&plan, &[(1, 1), (2, 2)]);
        // Both need a third block; only the low-priority one, though it came first, yields.
        let plan = scheduler.schedule();
        let ids: Vec<_> = plan.chunks.iter().map(|c| c.seq_id).collect();
        assert_eq!(ids, [2]);
        assert_eq!(scheduler.stats().preemptions_total, 1);
        assert_eq!(scheduler.stats().waiting, 1);
    }

    #[test]
    fn max_num_seqs_is_respected() {
        let mut scheduler = Scheduler::new(config(4, 64, 2, 256, false));
        for seq_id in 1..=5 {
            scheduler.add(seq_id, prompt(seq_id as u32, 3), None, 0);
        }
        let plan = scheduler.schedule();
        let ids: Vec<_> = plan.chunks.iter().map(|c| c.seq_id).collect();
        assert_eq!(ids, [1, 2]);
        scheduler.commit(&plan, &[(1, 1), (2, 2)]);
        let plan = scheduler.schedule();
        assert_eq!(plan.chunks.len(), 2);
        scheduler.finish(1);
        let plan = scheduler.schedule();
        let ids: Vec<_> = plan.chunks.iter().map(|c| c.seq_id).collect();
        assert_eq!(ids, [2, 3]);
        assert_eq!(scheduler.stats().waiting, 2);
    }

    #[test]
    fn plans_stay_within_the_token_budget() {
        let mut scheduler = Scheduler::new(config(4, 256, 16, 20, true));
        let mut remaining: usize = 0;
        for seq_id in 1..=6 {
            let len = 3 + 7 * seq_id as usize;
            remaining += len;
            scheduler.add(seq_id, prompt(seq_id as u32, len), None, 0);
        }
        let mut steps = 0;
        while remaining > 0 {
            let plan = scheduler.schedule();
            assert!(plan.num_tokens() <= 20);
            // Prefill only (nothing is sampled back), so every step but the last is full.
            assert!(plan.num_tokens() == 20 || plan.num_tokens() == remaining);
            remaining -= plan.num_tokens();
            scheduler.commit(&plan, &[]);
            steps += 1;
        }
        assert_eq!(steps, (3 * 6 + 7 * 21usize).div_ceil(20));
    }

    #[test]
    fn a_sequence_too_big_for_the_pool_waits_without_blocking_others() {
        let mut scheduler = Scheduler::new(config(4, 4, 8, 64, true));
        scheduler.add(1, prompt(1, 17), None, 0);
        scheduler.add(2, prompt(2, 5), None, 0);
        let plan = scheduler.schedule();
        let ids: Vec<_> = plan.chunks.iter().map(|c| c.seq_id).collect();
        assert_eq!(ids, [2]);
        scheduler.finish(2);
        assert!(scheduler.schedule().is_empty());
        assert!(scheduler.has_work());
        assert_eq!(scheduler.stats().waiting, 1);
        scheduler.finish(1);
        assert!(!scheduler.has_work());
    }

    fn workload(prefix_sharing: bool) -> Vec<Request> {
        let system = prompt(99, 12);
        (1..=6)
            .map(|seq_id| {
                let mut tokens = if prefix_sharing {
                    system.clone()
                } else {
                    Vec::new()
                };
                tokens.extend(prompt(seq_id as u32, 3 + seq_id as usize));
                Request {
                    seq_id,
                    prompt: tokens,
                    salt: None,
                    priority: (seq_id % 2) as i32,
                    max_tokens: 6 + seq_id as usize,
                }
            })
            .collect()
    }

    #[test]
    fn preemption_and_resume_give_the_same_tokens() {
        for caching in [false, true] {
            let requests = workload(caching);
            let (roomy, roomy_stats) = run_to_completion(config(4, 256, 8, 64, caching), &requests);
            assert_eq!(roomy_stats.preemptions_total, 0);
            let (tight, tight_stats) = run_to_completion(config(4, 10, 8, 16, caching), &requests);
            assert!(
                tight_stats.preemptions_total > 0,
                "the tight pool must preempt"
            );
            assert_eq!(tight, roomy);
            if caching {
                assert!(tight_stats.prefix_hits_total > 0);
            }
        }
    }

    #[test]
    fn fuzz_random_traffic_keeps_the_books_straight() {
        for seed in 0..12u64 {
            let mut rng = StdRng::seed_from_u64(seed);
            let config = config(4, 12, 4, 1 + rng.gen_range(4..24), seed % 3 != 0);
            let mut executor = FakeExecutor::new(&config);
            let mut scheduler = Scheduler::new(config.clone());
            let mut known: HashMap<SeqId, Vec<u32>> = HashMap::new();
            let mut max_tokens: HashMap<SeqId, usize> = HashMap::new();
            let shared_prefixes = [prompt(500, 9), prompt(501, 4), Vec::new()];
            let mut next_id = 0;
            for _ in 0..300 {
                if rng.gen_bool(0.3) {
                    next_id += 1;
                    let mut tokens = shared_prefixes[rng.gen_range(0..3)].clone();
                    // Now and then longer than the whole pool (48 slots).
                    let extra = if rng.gen_bool(0.05) {
                        50
                    } else {
                        rng.gen_range(1..16)
                    };
                    tokens.extend((0..extra).map(|_| rng.gen_range(0..20u32)));
                    let salt = [None, Some("x")][rng.gen_range(0..2)];
                    scheduler.add(next_id, tokens.clone(), salt, rng.gen_range(0..3));
                    known.insert(next_id, tokens);
                    max_tokens.insert(next_id, rng.gen_range(1..12));
                }
                if rng.gen_bool(0.05) && !known.is_empty() {
                    let mut live: Vec<_> = known.keys().copied().collect();
                    live.sort_unstable();
                    let victim = live[rng.gen_range(0..live.len())];
                    scheduler.finish(victim);
                    known.remove(&victim);
                }
                let plan = scheduler.schedule();
                check_invariants(&scheduler, &plan, &executor, &known);
                let sampled = executor.run(&plan);
                scheduler.commit(&plan, &sampled);
                for &(seq_id, token) in &sampled {
                    let tokens = known.get_mut(&seq_id).unwrap();
                    tokens.push(token);
                    if rng.gen_bool(0.1) || tokens.len() >= 40 || max_tokens[&seq_id] == 0 {
                        scheduler.finish(seq_id);
                        known.remove(&seq_id);
                    } else {
                        *max_tokens.get_mut(&seq_id).unwrap() -= 1;
                    }
                }
                scheduler.pool.check_consistency();
            }
            for seq_id in known.keys() {
                scheduler.finish(*seq_id);
            }
            assert_eq!(scheduler.stats().kv_usage, 0.0);
            assert!(!scheduler.has_work());
        }
    }
}
